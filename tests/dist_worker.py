"""Run under `torchrun --nproc_per_node 2`: each rank initialises from its shard of the batches."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from conftest import lm_batches, tiny_llama
from peft import LoraConfig

from lora_one import get_lora_one_model, save_adapter

# get_lora_one_model keywords per case; tests/test_distributed.py checks each against one process
CASES = {
    "accumulate": {},
    "sketch": {"grad_mode": "sketch"},
    "sketch_2_passes": {"grad_mode": "sketch", "sketch_passes": 2},
}


def lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    batches = lm_batches(n=4)[rank::world]  # this rank's shard
    config = LoraConfig(r=4, lora_alpha=16, use_rslora=True, target_modules="all-linear")
    results = {}
    for mode, kwargs in CASES.items():
        model = get_lora_one_model(tiny_llama(), config, batches, gamma=16, progress=False, **kwargs)
        results[mode] = lora_state(model)
        save_adapter(model, out / f"adapter_{mode}")  # rank 0 only
    torch.save(results, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
