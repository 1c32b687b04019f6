"""Two gloo processes (torchrun) give the single-process adapter on every rank."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import lm_batches, tiny_llama
from dist_worker import CASES
from peft import LoraConfig

from lora_one import get_lora_one_model

HERE = Path(__file__).parent


def products(state):
    """`B @ A` per layer: fixed by the init, unlike the factors' joint sign per singular pair."""
    return {
        n.replace(".lora_A.", "."): state[n.replace(".lora_A.", ".lora_B.")] @ a
        for n, a in state.items()
        if ".lora_A." in n
    }


def test_two_ranks_match_one_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "dist_worker.py"), str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    config = LoraConfig(r=4, lora_alpha=16, use_rslora=True, target_modules="all-linear")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for mode, kwargs in CASES.items():
        single = get_lora_one_model(tiny_llama(), config, lm_batches(n=4), gamma=16, progress=False, **kwargs)
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
