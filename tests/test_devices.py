"""The init on a device that is not the CPU, on a CPU-only machine (tests/fake_device.py): on one without
float64 (`--device mps`), and under a NCCL process group, which reduces tensors on the device only
(with `offload=True` too, whose accumulators live on the CPU). Each gives the CPU's adapter, and both
equal the step-0 update of a dense float64 full fine-tuning gradient."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import full_finetuning_gradients, ragged_examples, tiny_llama
from fake_device import CASES, EXAMPLES, INIT, TARGETS
from numerics import assert_close_products, gradient_tol
from tiny_models import LORA

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every case, run in one process of its own (the fake backend must exist before its first backward)."""
    out = tmp_path_factory.mktemp("devices") / "results.pt"
    path = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(HERE / "fake_device.py"), str(out)], env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out)


@pytest.mark.parametrize("case", CASES)
def test_the_device_gives_the_cpu_adapter_and_the_lora_one_step(case, results):
    got = results[case]
    assert isinstance(got, dict), got  # else the traceback of the failed run
    examples = ragged_examples(lengths=EXAMPLES)[:INIT]  # the init samples; the rest judged gamma
    reference = full_finetuning_gradients(tiny_llama().double(), examples)
    rel = gradient_tol(tiny_llama(), examples)  # of a float32 gradient against the float64 one
    assert got["fakedev"]["gamma"] == got["cpu"]["gamma"]
    for where in ("cpu", "fakedev"):
        products = got[where]["products"]
        assert {n.rsplit(".", 1)[-1] for n in products} == set(TARGETS)
        assert_close_products(products, reference, LORA["r"], got[where]["gamma"], rel)
    if case.startswith("nccl"):  # the counts, every layer's gradient or sketch, the search's sums: on the device
        assert len(got["fakedev"]["reduced"]) > len(got["fakedev"]["products"])
