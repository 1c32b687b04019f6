"""Peak memory of a gradient cache read against the size of the entry it reads.

An `accumulate` entry (G of each target layer, float32) of about --mb MB is written once with
`GradientCache.store`; then a fresh process, its imports done and its peak resident set reset
(`/proc/self/clear_refs`, Linux), looks it up with `GradientCache.lookup` (checksum and read) and touches
every value (its sum), as the init does. The peak growth of the resident set (file-backed pages of a
mapping included) over its size before the lookup, divided by the entry's size, is the ratio; 1 is the
entry held once.

    python benchmarks/grad_cache_memory.py [--mb 400] > benchmarks/results/grad_cache_memory.txt
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

SHAPE = (2048, 4096)  # one layer: 32 MiB of float32


def fields(layers: int) -> dict:
    return {"benchmark": "grad_cache_memory", "grad_mode": "accumulate",
            "targets": {f"layer{i}": list(SHAPE) for i in range(layers)}}


def targets(layers: int) -> dict:
    """Stand-ins for the target layers: `lookup` reads only the device of their weight."""
    return {f"layer{i}": SimpleNamespace(weight=torch.empty(0)) for i in range(layers)}


def status(key: str) -> int:
    """A `/proc/self/status` field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def read(folder: str, layers: int) -> dict:
    """Run in a fresh process: the peak resident-set growth of one lookup and a pass over its values."""
    from lora_one.core.gradcache import GradientCache

    cache = GradientCache(folder)
    Path("/proc/self/clear_refs").write_text("5")  # the peak so far (imports) starts again from here
    before = status("VmRSS")
    found = cache.lookup(fields(layers), None, targets(layers), offload=False)
    assert found is not None, "no cache hit"
    total = sum(float(g.sum()) for g in found.values())
    return {"before": before, "peak": status("VmHWM"), "sum": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=400, help="approximate entry size in MB")
    parser.add_argument("--read", metavar="FOLDER", help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.read:
        print(json.dumps(read(args.read, args.layers)))
        return

    import lora_one.core.gradcache as gradcache

    layer_bytes = SHAPE[0] * SHAPE[1] * 4
    layers = max(1, round(args.mb * 1e6 / layer_bytes))
    source = Path(gradcache.__file__)
    print(f"lora_one.core.gradcache: {source} (sha256 {hashlib.sha256(source.read_bytes()).hexdigest()[:12]})")
    with tempfile.TemporaryDirectory() as folder:
        generator = torch.Generator().manual_seed(0)
        grads = {name: torch.randn(SHAPE, generator=generator) for name in fields(layers)["targets"]}
        expected = sum(float(g.sum()) for g in grads.values())
        gradcache.GradientCache(folder).store(fields(layers), None, grads)
        del grads
        size = sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
        done = subprocess.run([sys.executable, __file__, "--read", folder, "--layers", str(layers)],
                              capture_output=True, text=True, check=True)
        child = json.loads(done.stdout.splitlines()[-1])
    assert abs(child["sum"] - expected) <= 1e-3 * layers, (child["sum"], expected)  # the values stored come back
    growth = child["peak"] - child["before"]
    print(f"entry {size / 1e6:.1f} MB ({layers} layers of {SHAPE[0]}x{SHAPE[1]} float32)")
    print(f"read: resident set {child['before'] / 1e6:.1f} MB before, peak {child['peak'] / 1e6:.1f} MB, "
          f"growth {growth / 1e6:.1f} MB")
    print(f"peak growth / entry size: {growth / size:.3f}")


if __name__ == "__main__":
    main()
