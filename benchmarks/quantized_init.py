"""The LoRA-One init on a quantised or half-precision SmolLM2: memory, and the top-r subspaces of its
gradient against the float32 model's.

SmolLM2-135M-Instruct on TREC (the `lora-one init` defaults: N = 8 init samples, micro-batches of 1, all
linear layers, rank 8, sketch mode with its default 2 passes). Each configuration runs in its own process,
which reports the bytes of its model's parameters and buffers (a 4-bit weight: its packed bytes, without
the small quantisation state) and its resident memory from /proc/self/status (it counts what torch
allocates, unlike tracemalloc): the peak while loading (VmHWM), the resident set once loaded (VmRSS, after
handing freed heap back with malloc_trim), and the peak over the gradient phase alone above that (VmHWM
reset after loading); the gradient phase's time; the loss of its model on the init samples; the top-r
singular vectors of each layer's gradient. The reference is
accumulate mode on the float32 model, its gradients taken apart by an exact SVD. Per layer, against it:
`sine`, the larger sine of the largest principal angle between the left and right top-r subspaces (1 for
subspaces with a direction orthogonal to the reference's, so it is harsh where sigma_r ~ sigma_r+1), and
`kept`, the fraction of the float32 rank-r step `G_r` (Frobenius energy) that the configuration's rank-r
step can express, `||U^T G_r V||^2 / ||G_r||^2`.

    python benchmarks/quantized_init.py  # writes benchmarks/results/quantized_init.txt

15 minutes of CPU (19 of wall time) on the shared 2-core machine of the committed run, whose gradient phases
took 6.5 of them; 4 processes, each loading torch and the model and preparing the data.
"""

from __future__ import annotations

import ctypes
import gc
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

CONFIGS = {  # name -> (dtype, quantize, grad mode); sketch mode's own error: benchmarks/results/init_cost.txt
    "float32 accumulate (reference)": ("float32", None, "accumulate"),
    "bfloat16 accumulate": ("bfloat16", None, "accumulate"),
    "8bit sketch": ("float32", "8bit", "sketch"),
    "4bit sketch": ("float32", "4bit", "sketch"),
}
RESULTS = Path(__file__).parent / "results" / "quantized_init.txt"


def status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(name: str, out: str) -> None:
    import time

    from lora_one.core.gradients import estimate_gradients
    from lora_one.recipes.data import init_batches
    from lora_one.recipes.runs import complete_model_settings, load_task_data
    from lora_one.recipes.settings import InitSettings

    dtype, quantize, mode = CONFIGS[name]
    s = InitSettings(model="smollm2-135m", data="trec", out=tempfile.mkdtemp(), dtype=dtype, quantize=quantize,
                     grad_mode=mode, device="cpu")
    complete_model_settings(s)
    model, tok, _, _, feats, _ = load_task_data(s, s.data)
    batches = init_batches(feats, s.init_samples, s.init_batch_size, s.seed, tok.pad_token_id)
    with torch.no_grad():  # the token-weighted mean loss the gradient differentiates
        terms = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
        loss = sum(float(model(**b).loss) * t for b, t in zip(batches, terms)) / sum(terms)
    model_mb = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 2**20
    load_peak = status_mb("VmHWM")
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # the loading's freed copies leave the resident set
    loaded = status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    t0 = time.perf_counter()
    grads = estimate_gradients(model, batches, target_modules=s.target_modules, show_progress_bar=False,
                               grad_mode=mode, rank=s.rank, seed=s.seed, init_samples=None)
    seconds = time.perf_counter() - t0
    peak = status_mb("VmHWM")
    svds = {layer: exact_top(g, s.rank) if isinstance(g, torch.Tensor) else (g.U, g.S, g.Vh.mT)
            for layer, g in grads.items()}
    torch.save({"model_mb": model_mb, "load_peak_mb": load_peak, "loaded_mb": loaded, "init_extra_mb": peak - loaded,
                "seconds": seconds, "loss": loss, "svds": svds}, out)


def exact_top(g: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(U_r, S_r, V_r)` of `g` exactly, from the eigenvectors of its smaller Gram matrix in float64 (LAPACK's
    SVD of these gradients takes seconds a layer here)."""
    g = g.double()
    tall = g.shape[0] >= g.shape[1]
    values, vectors = torch.linalg.eigh(g.mT @ g if tall else g @ g.mT)
    top, S = vectors[:, -r:].flip(-1), values[-r:].flip(-1).clamp_min(0).sqrt()
    return (g @ top / S, S, top) if tall else (top, S, g.mT @ top / S)


def compare(reference: tuple, svd: tuple) -> tuple[float, float]:
    """`(sine, kept)` of one layer, see the module docstring."""
    from lora_one.linalg.spectral import subspace_sine

    (U0, S0, V0), (U, _, V) = [[t.double() for t in x] for x in (reference, svd)]
    sine = max(subspace_sine(U0, U), subspace_sine(V0, V))
    kept = float(((U.mT @ U0) * S0 @ (V0.mT @ V)).norm() ** 2 / (S0**2).sum())
    return sine, kept


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for i, name in enumerate(CONFIGS):
            out = f"{tmp}/{i}.pt"
            subprocess.run([sys.executable, __file__, "--child", name, out], check=True)
            runs[name] = torch.load(out)
    reference = runs["float32 accumulate (reference)"]["svds"]
    header = (f"{'configuration':32s} {'model MB':>8s} {'load peak':>9s} {'loaded':>6s} {'init +MB':>8s} "
              f"{'grad s':>6s} {'loss':>6s} {'sine median':>11s} {'sine max':>8s} {'kept median':>11s} {'kept min':>8s}")
    lines = [header]
    for name, run in runs.items():
        sines, kept = zip(*(compare(reference[n], svd) for n, svd in run["svds"].items()))
        lines.append(f"{name:32s} {run['model_mb']:8.0f} {run['load_peak_mb']:9.0f} {run['loaded_mb']:6.0f} "
                     f"{run['init_extra_mb']:8.0f} {run['seconds']:6.1f} {run['loss']:6.3f} {statistics.median(sines):11.2e} {max(sines):8.2e} "
                     f"{statistics.median(kept):11.3f} {min(kept):8.3f}")
    text = "\n".join(lines) + f"\n({len(reference)} layers, rank 8, N = 8; {json.dumps(CONFIGS)})\n"
    print(text, end="")
    RESULTS.write_text(text)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], sys.argv[3])
    else:
        main()
