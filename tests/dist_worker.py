"""Two-process workers for tests/test_distributed.py.

`dist_worker.py OUT` runs under `torchrun --nproc_per_node 2`: each rank initialises from its own
batches. `dist_worker.py --bad-rank-1 STORE RANK` is started twice by hand (one process per rank, each
with its own stderr): rank 1's data is bad in a way that only rank 1 can see, case after case.
"""

import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from conftest import padded_batches, ragged_examples, tiny_llama
from peft import LoraConfig
from tiny_models import LORA

from lora_one import LoraOneConfig, estimate_gradients, get_lora_one_model, save_adapter
from lora_one.core.errors import UsageError

# LoraOneConfig settings and init micro-batch size per case; tests/test_distributed.py checks
# each against one process holding all 4 ragged examples
CASES = {
    "accumulate": ({}, 1),
    "sketch": ({"grad_mode": "sketch"}, 1),
    "sketch_2_passes": ({"grad_mode": "sketch", "sketch_passes": 2}, 1),
    "single-batch": ({"grad_mode": "single-batch"}, 2),
}
CONFIG = LoraConfig(**LORA)


def lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    shard = ragged_examples()[rank::world]  # this rank's examples: 5 and 14 tokens, or 9 and 7
    results = {}
    for mode, (kwargs, batch_size) in CASES.items():
        model = get_lora_one_model(tiny_llama(), CONFIG, padded_batches(shard, batch_size),
                                   config=LoraOneConfig(gamma=16, init_samples=4, **kwargs), show_progress_bar=False)
        results[mode] = lora_state(model)
        save_adapter(model, out / f"adapter_{mode}")  # rank 0 only
    torch.save(results, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def nan_on_rank_1(model, batch):
    return model(**batch).loss * (math.nan if dist.get_rank() == 1 else 1.0)


def bad_rank_1(store: str, rank: int) -> None:
    """Each case raises on rank 1 alone; every rank must raise the same error, then go on in step with
    the others (caught here, printed as `CASE name: message`). The last case is not caught."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    model, good = tiny_llama(), padded_batches(ragged_examples(), 2)
    bad = rank == 1
    cases = {
        "no labels": {"batches": [{k: v for k, v in b.items() if k != "labels"} for b in good] if bad else good},
        "nan loss": {"batches": good, "train_step": nan_on_rank_1},
        "nan loss before single-batch's all-reduce": {"batches": good[:1], "train_step": nan_on_rank_1,
                                                      "grad_mode": "single-batch", "rank": 2, "init_samples": None},
        "single-batch with fewer batches than ranks": {"batches": [] if bad else good[:1],
                                                       "grad_mode": "single-batch", "rank": 2, "init_samples": None},
        "too few samples": {"batches": good[:1] if bad else good, "init_samples": 8},
    }
    *caught, last = cases
    for name in caught:
        try:
            estimate_gradients(model, **{"init_samples": 4, "show_progress_bar": False, **cases[name]})
        except UsageError as e:
            print(f"CASE {name}: {e}", file=sys.stderr, flush=True)
    estimate_gradients(model, **{"show_progress_bar": False, **cases[last]})


if __name__ == "__main__":
    if sys.argv[1] == "--bad-rank-1":
        bad_rank_1(sys.argv[2], int(sys.argv[3]))
    else:
        main(Path(sys.argv[1]))
