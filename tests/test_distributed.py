"""Two gloo processes give the single-process adapter on every rank, and raise one error together."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import padded_batches, ragged_examples, tiny_llama
from dist_worker import CASES, CONFIG

from lora_one import get_lora_one_model

HERE = Path(__file__).parent
ENV = {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1"}


def products(state):
    """`B @ A` per layer: fixed by the init, unlike the factors' joint sign per singular pair."""
    return {
        n.replace(".lora_A.", "."): state[n.replace(".lora_A.", ".lora_B.")] @ a
        for n, a in state.items()
        if ".lora_A." in n
    }


def test_two_ranks_match_one_process(tmp_path):
    """The ranks hold ragged examples with different numbers of label tokens (5 + 14 tokens against
    9 + 7), so a mean over the ranks' means would differ from the one-process gradient."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "dist_worker.py"), str(tmp_path)]
    done = subprocess.run(cmd, check=False, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for mode, (kwargs, batch_size) in CASES.items():
        batches = padded_batches(ragged_examples(), 2 * batch_size)  # the union of the ranks' batches
        single = get_lora_one_model(tiny_llama(), CONFIG, batches, gamma=16, progress=False, num_samples=4, **kwargs)
        expected = products({n: p.detach() for n, p in single.named_parameters() if "lora_" in n})
        for r in (0, 1):
            got = products(ranks[r][mode])
            assert got.keys() == expected.keys()
            for n in expected:
                rel = float((got[n] - expected[n]).norm() / expected[n].norm())
                assert rel <= 1e-5, (mode, r, n, rel)
        for n in ranks[0][mode]:  # identical on every rank, bit for bit
            assert torch.equal(ranks[0][mode][n], ranks[1][mode][n])
        assert (tmp_path / f"adapter_{mode}" / "adapter_model.safetensors").exists()


def test_an_error_on_one_rank_reaches_every_rank(tmp_path):
    """Rank 1 alone has a batch without labels, a NaN loss (also where single-batch all-reduces in
    its backward), no batch for single-batch mode, too few samples: both processes raise the same
    error each time and stay in step; both exit non-zero within seconds. Two plain processes (each
    with its own stderr, and no launcher that would kill the waiting one) rather than torchrun."""
    cmd = [sys.executable, str(HERE / "dist_worker.py"), "--bad-rank-1", str(tmp_path / "store")]
    start = time.monotonic()
    procs = [subprocess.Popen([*cmd, str(r)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    try:
        outs = [p.communicate(timeout=60)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert time.monotonic() - start < 60
    assert all(p.returncode for p in procs), outs
    expected = {
        "no labels": "process 1 of 2: A batch has no 'labels'",
        "nan loss": "process 1 of 2: The loss of batch 0 is nan",
        "nan loss before single-batch's all-reduce": "process 1 of 2: The loss of batch 0 is nan",
        "single-batch with fewer batches than ranks": "process 1 of 2: mode='single-batch' needs exactly one "
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
    assert last[0].startswith("lora_one.errors.UsageError: process 1 of 2: num_samples=8 asks this rank for 4 of "
                              "them (over 2 ranks), but the batches hold only 2 examples"), last[0]
