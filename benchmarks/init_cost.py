"""Cost of the LoRA-One init against LoRA training and against the reference approach, side by side.

SmolLM2-135M-Instruct, TREC prompts, max length 128, all linear layers, rank 8. For N = 8 and N = 64:

- wall time of the gradient phase and of the SVD phase per mode, as ratios to LoRA training steps on
  the same N samples (micro-batches of 1), and the CPU time of the gradient phase against LoRA's;
- for the sketch, each phase on its own: every pass over the samples, the orthonormal test matrices
  built between passes, and the final reconstruction and SVD;
- peak memory (RSS growth over the loaded model, each measurement in its own process) as a ratio to a
  LoRA training step on one micro-batch, and to LoRA training over the same N micro-batches;
- our randomised SVD and the sketch (1, 2 and 3 passes) against the reference's
  `torch.svd_lowrank(q=512, niter=16)` on the same real gradients: speed and top-r subspace error
  against an exact float64 SVD;
- bytes an all-reduce would move per mode (`sketch` is one pass, `sketch-P-passes` P passes);
- the same accounting projected on paper to LLaMA-2-7B shapes.

    python benchmarks/init_cost.py [--quick] [--accuracy-only]
    # --quick: N = 8 only, fewer layers for the errors; --accuracy-only: no timing or memory children
    OMP_NUM_THREADS=1 python benchmarks/init_cost.py --quick > benchmarks/results/init_cost_quick.txt

Reading the times. Every mode runs once, in a process of its own, one after the other: on a machine
whose cores other work shares, a job's wall time includes whatever ran beside it (and with several
torch threads, a thread that waits on a descheduled one stalls the others). `grad cpu s`, the
process's user + system time, does not: run with one thread and compare CPU ratios. In
results/init_cost_quick.txt (N = 8, one thread, a shared machine) every sketch pass costs 0.93 to
1.09 of LoRA training's CPU time, pass 3 as much as pass 1 or 2 (a forward and backward over the
samples, plus the sketch products: per token of an `(m, n)` layer `n k + l m` multiply-adds in odd
passes, `n l + k m` in even ones, as `k` and `l` swap sides; equal for square layers, swapped between
the MLP's up and down projections, and a tenth of the layer's own `4 m n` or less); the orthonormal
bases between two passes 0.06 to 0.07; the reconstruction and SVD after several passes 0.42 to 0.47
(after one: 0.12), once per estimate: a float64 QR of `[Q, Y]` (`m x (k + l)`) and SVD of the
`(k + l) x n` core, against `m x k` and `k x n` after one pass. So 1, 2 and 3 passes cost 1.06, 2.62
and 3.71 LoRA CPU: the third pass adds 1.09, the second 1.56 (its pass, the bases and the larger
reconstruction). Wall-clock ratios measured beside other work (1.49, 2.19 and 4.28 in issue 23, where
the third pass seemed to cost twice the second; 0.68, 1.87 and 3.04 in the same file, whose LoRA
training took 6.85 s of wall time for 4.29 s of CPU) are not comparable from job to job.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

R, MAX_LEN, SEED = 8, 128, 0
SKETCH_PASSES = (1, 2, 3)  # in the accuracy section


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """User + system CPU time of this process (all its threads): what it did, not what ran beside it."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class SketchPhases:
    """Wall and CPU seconds of each phase of a sketch estimate. `GradientSketch.next_pass` (between two
    passes) and `GradientSketch.top_svd` (at the end) run once per layer, back to back: each such run is
    a phase, and what lies before, between and after them are the passes over the samples (which call
    `add_tokens`)."""

    def __init__(self):
        self.runs: list[list] = []  # [label, (wall, cpu) at its start, at its end]
        self.passed = False  # whether a pass added tokens since the last run

    def __enter__(self):
        from lora_one.linalg.sketch import GradientSketch

        self.originals = {name: getattr(GradientSketch, name) for name in ("next_pass", "top_svd", "add_tokens")}
        for name, method in self.originals.items():
            setattr(GradientSketch, name, self._timed(name, method))
        self.start = (time.perf_counter(), cpu_seconds())
        return self

    def __exit__(self, *exc):
        from lora_one.linalg.sketch import GradientSketch

        for name, method in self.originals.items():
            setattr(GradientSketch, name, method)

    def _timed(self, name, method):
        def timed(*args, **kwargs):
            if name == "add_tokens":
                self.passed = True
                return method(*args, **kwargs)
            start = (time.perf_counter(), cpu_seconds())
            result = method(*args, **kwargs)
            end = (time.perf_counter(), cpu_seconds())
            if self.passed or not self.runs:
                self.runs.append([name, start, end])
            self.runs[-1][2] = end
            self.passed = False
            return result

        return timed

    def phases(self) -> list[tuple[str, float, float]]:
        """`(phase, wall s, cpu s)` in order: `pass 1`, `bases 1`, `pass 2`, ..., `reconstruction + SVD`."""
        out, before = [], self.start
        for p, (kind, start, end) in enumerate(self.runs, 1):
            out.append((f"pass {p}", start[0] - before[0], start[1] - before[1]))
            out.append((f"bases {p}" if kind == "next_pass" else "reconstruction + SVD", end[0] - start[0],
                        end[1] - start[1]))
            before = end
        return out


def load(n: int, batch_size: int = 1):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_one.recipes.data import causal_lm_features, init_batches
    from lora_one.recipes.embedded_data import load as load_data
    from lora_one.recipes.models import resolve_model_path

    path = resolve_model_path("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    feats = causal_lm_features(load_data("trec:train"), tok, MAX_LEN)
    return model, init_batches(feats, n, batch_size, SEED, tok.pad_token_id)


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=R, lora_alpha=16, use_rslora=True, target_modules="all-linear")


def reference_svd(G: torch.Tensor):
    """The reference's SVD setting (q capped by the matrix size, as svd_lowrank requires)."""
    return torch.svd_lowrank(G, q=min(512, *G.shape), niter=16)


def child(job: str, n: int) -> dict:
    """One measurement in a fresh process: times and peak RSS growth over the loaded model."""
    from peft import get_peft_model

    from lora_one import create_optimizer, estimate_gradients, init_lora_one
    from lora_one.linalg.spectral import top_svd

    batch_size = n if job == "single-batch" else 1
    model, batches = load(n, batch_size)
    torch.manual_seed(SEED)
    for b in batches[:1]:  # warm-up forward so one-off allocations do not count
        with torch.no_grad():
            model(**b)
    base = rss_mb()
    out: dict = {"job": job, "n": n}
    if job == "lora-train":
        peft_model = get_peft_model(model, lora_config())
        opt = create_optimizer(peft_model, lr=2e-4)
        t0, c0 = time.perf_counter(), cpu_seconds()
        for b in batches:
            peft_model(**b).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        out.update(seconds=time.perf_counter() - t0, cpu_seconds=cpu_seconds() - c0)
    elif job in ("accumulate", "sketch", "sketch-2-passes", "sketch-3-passes", "single-batch", "reference"):
        mode = "accumulate" if job == "reference" else job.split("-")[0] if job.startswith("sketch") else job
        passes = int(job.split("-")[1]) if job.startswith("sketch-") else 1
        t0, c0 = time.perf_counter(), cpu_seconds()
        with SketchPhases() as clock:
            grads = estimate_gradients(model, batches, show_progress_bar=False, grad_mode=mode, rank=R, seed=SEED,
                                       sketch_passes=passes, init_samples=None)
        t1, c1 = time.perf_counter(), cpu_seconds()
        if job == "accumulate":
            svds = {k: top_svd(g, R, "randomized", SEED) for k, g in grads.items()}
        elif job == "reference":
            svds = {k: reference_svd(g) for k, g in grads.items()}
        else:
            svds = grads  # the SVD was taken in the gradient phase
        t2 = time.perf_counter()
        peft_model = get_peft_model(model, lora_config())
        init_lora_one(peft_model, {k: v for k, v in grads.items()}, seed=SEED)
        out.update(gradient_seconds=t1 - t0, gradient_cpu_seconds=c1 - c0, svd_seconds=t2 - t1,
                   phases=clock.phases())
        del svds
    out["peak_mb_over_model"] = rss_mb() - base
    return out


def run_child(job: str, n: int) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", job, "--n", str(n)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{job} N={n} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def svd_accuracy(n: int, layer_stride: int) -> dict:
    """Ours vs the reference SVD vs the sketch on the same real gradients, against float64 SVD."""
    from lora_one import estimate_gradients
    from lora_one.linalg.spectral import exact_svd, randomized_svd, subspace_sine

    model, batches = load(n)
    grads = estimate_gradients(model, batches, show_progress_bar=False, init_samples=None)
    sketches = {
        f"sketch {p} pass{'es' if p > 1 else ''}": estimate_gradients(
            model, batches, show_progress_bar=False, grad_mode="sketch", rank=R, seed=SEED, sketch_passes=p,
            init_samples=None)
        for p in SKETCH_PASSES
    }
    names = list(grads)[::layer_stride]
    t_ours = t_ref = 0.0
    err = {"ours": [], "reference": []} | {f"{k}{suffix}": [] for k in sketches for suffix in ("", " G_r")}
    for name in names:
        G = grads[name]
        t0 = time.perf_counter()
        ours = randomized_svd(G, R, seed=SEED)
        t1 = time.perf_counter()
        U, S, V = reference_svd(G)
        t2 = time.perf_counter()
        t_ours, t_ref = t_ours + t1 - t0, t_ref + t2 - t1
        truth = exact_svd(G.double(), R)
        err["ours"].append(subspace_sine(truth.U, ours.U))
        err["reference"].append(subspace_sine(truth.U, U[:, :R]))
        G_r = truth.U @ torch.diag(truth.S) @ truth.Vh
        for k, svds in sketches.items():
            sk = svds[name]
            err[k].append(subspace_sine(truth.U, sk.U))
            approx = sk.U.double() @ torch.diag(sk.S.double()) @ sk.Vh.double()
            err[f"{k} G_r"].append(float((approx - G_r).norm() / G_r.norm()))
    med = {k: sorted(v)[len(v) // 2] for k, v in err.items()}
    worst = {k: max(v) for k, v in err.items()}
    return {"layers": len(names), "ours_s": t_ours, "reference_s": t_ref, "median": med, "max": worst}


def allreduce_bytes(shapes, r: int) -> dict:
    from lora_one.linalg.sketch import default_sizes

    full = sum(m * n for m, n in shapes) * 4
    sketch = sum(m * k + l * n for (m, n) in shapes for k, l in [default_sizes(r, m, n)]) * 4
    # a later pass sketches with the widths swapped: G @ (n, l) and (k, m) @ G
    swapped = sum(m * l + k * n for (m, n) in shapes for k, l in [default_sizes(r, m, n)]) * 4
    return {"accumulate": full, "single-batch": full, "sketch": sketch, "sketch-2-passes": sketch + swapped,
            "sketch-3-passes": 2 * sketch + swapped, "reference": full}


def svd_flops(shapes, r: int) -> dict:
    """Leading-order FLOPs: matmuls with G dominate the randomised SVDs; Golub-Van Loan for exact."""
    from lora_one.linalg.sketch import default_sizes
    from lora_one.linalg.spectral import DEFAULT_NITER, MIN_OVERSAMPLE

    q_ours = r + max(r, MIN_OVERSAMPLE)
    ours = sum(2 * m * n * min(q_ours, m, n) * (2 + 2 * DEFAULT_NITER) for m, n in shapes)
    ref = sum(2 * m * n * min(512, m, n) * (2 + 2 * 16) for m, n in shapes)
    exact = sum(4 * m * n * min(m, n) + 8 * min(m, n) ** 3 for m, n in shapes)
    sketch = sum(4 * (m + l) * k * k + 4 * k * k * n for (m, n) in shapes for k, l in [default_sizes(r, m, n)])
    return {"ours (randomized)": ours, "reference (q=512, niter=16)": ref, "exact": exact, "sketch reconstruction": sketch}


def smollm2_shapes():
    return [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)] * 30


def llama7b_shapes():
    return [(4096, 4096)] * 4 * 32 + [(11008, 4096), (11008, 4096), (4096, 11008)] * 32


def fmt_bytes(b: float) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--accuracy-only", action="store_true")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.n)))
        return

    ns = (8,) if args.quick else (8, 64)
    print(f"SmolLM2-135M, max length {MAX_LEN}, all linear layers, rank {R}, torch threads {torch.get_num_threads()}")
    for n in () if args.accuracy_only else ns:
        lora = run_child("lora-train", n)
        one_step = run_child("lora-train", 1)
        print(f"\nN = {n}: LoRA training {lora['seconds']:.2f} s ({lora['cpu_seconds']:.2f} CPU s) for {n} steps of 1 "
              f"sample; peak +{one_step['peak_mb_over_model']:.0f} MB for one step, +{lora['peak_mb_over_model']:.0f} "
              f"MB for the {n} steps (the allocator's growth over sequences of varying length)")
        print(f"{'mode':<16}{'grad s':>9}{'svd s':>9}{'grad/LoRA':>11}{'svd/LoRA':>10}{'init/LoRA':>11}"
              f"{'grad cpu s':>12}{'cpu/LoRA cpu':>14}{'peak MB':>9}{'peak/LoRA step':>16}{'peak/LoRA N steps':>19}")
        phases = {}
        for job in ("accumulate", "sketch", "sketch-2-passes", "sketch-3-passes", "single-batch", "reference"):
            if job == "single-batch" and n > 8:
                continue  # 64 samples in one micro-batch is not the use case of this mode
            res = run_child(job, n)
            g, s = res["gradient_seconds"], res["svd_seconds"]
            c = res["gradient_cpu_seconds"]
            print(f"{job:<16}{g:>9.2f}{s:>9.2f}{g / lora['seconds']:>11.2f}{s / lora['seconds']:>10.3f}"
                  f"{(g + s) / lora['seconds']:>11.2f}{c:>12.2f}{c / lora['cpu_seconds']:>14.2f}"
                  f"{res['peak_mb_over_model']:>9.0f}"
                  f"{res['peak_mb_over_model'] / max(one_step['peak_mb_over_model'], 1):>16.2f}"
                  f"{res['peak_mb_over_model'] / max(lora['peak_mb_over_model'], 1):>19.2f}")
            if res["phases"]:
                phases[job] = res["phases"]
        print("sketch phases, CPU s (wall s); / LoRA: CPU against LoRA training's CPU:")
        for job, parts in phases.items():
            print(f"  {job:<16}" + ", ".join(f"{name} {cpu:.2f} ({wall:.2f}) / LoRA {cpu / lora['cpu_seconds']:.2f}"
                                             for name, wall, cpu in parts))
    acc = svd_accuracy(ns[-1], layer_stride=10 if args.quick else 3)
    print(f"\nSVD on {acc['layers']} real gradient layers (N = {ns[-1]}): ours {acc['ours_s']:.2f} s, "
          f"reference {acc['reference_s']:.2f} s, speed-up {acc['reference_s'] / acc['ours_s']:.0f}x")
    for k in acc["median"]:
        label = "relative error of G_r" if k.endswith(" G_r") else "top-r subspace sine"
        print(f"  {k.removesuffix(' G_r'):<16} {label}: median {acc['median'][k]:.2e}, max {acc['max'][k]:.2e}")

    for title, shapes in (("SmolLM2-135M", smollm2_shapes()), ("LLaMA-2-7B (on paper)", llama7b_shapes())):
        b = allreduce_bytes(shapes, R)
        f = svd_flops(shapes, R)
        print(f"\n{title}: {len(shapes)} target layers, rank {R}")
        for mode, v in b.items():
            print(f"  {mode:<16} accumulator / all-reduce bytes {fmt_bytes(v):>11}  ({v / b['accumulate']:.1%} of full)")
        for k, v in f.items():
            print(f"  SVD FLOPs {k:<28} {v / 1e12:10.3f} TFLOP")


if __name__ == "__main__":
    main()
