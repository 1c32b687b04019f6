"""Two gloo processes give the single-process adapter on every rank, and raise one error together."""

import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from conftest import full_finetuning_gradients, padded_batches, ragged_examples, tiny_llama
from dist_worker import CASES, CONFIG
from numerics import assert_close_products, gradient_tol, products

from lora_one import LoraOneConfig, get_lora_one_model

HERE = Path(__file__).parent
ENV = {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1"}


# Sketch of one pass: its least-squares solve with an l x k Gaussian (l >= 2k - 1 here) amplifies an error of
# the sketches by cond(Psi Q) <= (sqrt(l) + sqrt(k)) / (sqrt(l) - sqrt(k)) ~ 6 (Davidson-Szarek, with high
# probability); rounded up. The other modes decompose the summed gradient itself (or orthonormal sketches).
AMPLIFICATION = {"sketch": 10.0}


def test_two_ranks_match_one_process(tmp_path):
    """The ranks hold ragged examples with different numbers of label tokens (5 + 14 tokens against
    9 + 7), so a mean over the ranks' means would differ from the one-process gradient. Each mode's
    adapter on two ranks equals the one-process adapter up to the round-off of two float32 gradients
    of the same examples, carried through the top-r truncation (tests/numerics.py)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "dist_worker.py"), str(tmp_path)]
    done = subprocess.run(cmd, check=False, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    examples = ragged_examples()
    reference = full_finetuning_gradients(tiny_llama(), examples)  # float64
    rel_G = 2 * gradient_tol(tiny_llama(), examples)  # each of the two float32 gradients within one bound
    for mode, (kwargs, batch_size) in CASES.items():
        batches = padded_batches(examples, 2 * batch_size)  # the union of the ranks' batches
        single = get_lora_one_model(tiny_llama(), CONFIG, batches, show_progress_bar=False,
                                    config=LoraOneConfig(gamma=16, init_samples=4, **kwargs))
        expected = products(single)
        for r in (0, 1):
            assert_close_products(products(ranks[r][mode]), reference, CONFIG.r, 16, rel_G * AMPLIFICATION.get(mode, 1),
                                  want=expected)
        for n in ranks[0][mode]:  # identical on every rank, bit for bit
            assert torch.equal(ranks[0][mode][n], ranks[1][mode][n])
        assert (tmp_path / f"adapter_{mode}" / "adapter_model.safetensors").exists()


def test_an_error_on_one_rank_reaches_every_rank(tmp_path):
    """Rank 1 alone has a batch without labels, a NaN loss (also where single-batch all-reduces in
    its backward), no batch for single-batch mode, too few samples: both processes raise the same
    error each time and stay in step; both exit non-zero within seconds. Two plain processes (each
    with its own stderr, and no launcher that would kill the waiting one) rather than torchrun."""
    cmd = [sys.executable, str(HERE / "dist_worker.py"), "--bad-rank-1", str(tmp_path / "store")]
    procs = [subprocess.Popen([*cmd, str(r)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    try:
        outs = [p.communicate(timeout=120)[1] for p in procs]  # a hang fails here (TimeoutExpired)
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode for p in procs), outs
    expected = {
        "no labels": "process 1 of 2: A batch has no 'labels'",
        "nan loss": "process 1 of 2: The loss of batch 0 is nan",
        "nan loss before single-batch's all-reduce": "process 1 of 2: The loss of batch 0 is nan",
        "single-batch with fewer batches than ranks": "process 1 of 2: grad_mode='single-batch' needs exactly one "
                                                      "micro-batch per rank, holding all of its init samples; "
                                                      "this rank has 0",
    }
    lines = [{line.split(": ", 1)[0][5:]: line.split(": ", 1)[1] for line in out.splitlines()
              if line.startswith("CASE ")} for out in outs]
    assert lines[0] == lines[1], outs
    assert lines[0].keys() == expected.keys(), outs
    for case, start_of_message in expected.items():
        assert lines[0][case].startswith(start_of_message), (case, lines[0][case])
    # the uncaught error, the same on both ranks (torch prefixes its traceback lines with the rank)
    last = [re.sub(r"^\[rank\d\]: ", "", out.strip().splitlines()[-1]) for out in outs]
    assert last[0] == last[1], outs
    assert last[0].startswith("lora_one.core.errors.UsageError: process 1 of 2: init_samples=8 asks this rank for 4 of "
                              "them (over 2 ranks), but the batches hold only 2 examples"), last[0]
