"""The gradient cache: time of `get_lora_one_model` without a cache, on a first run (computes and writes
the entry) and on a second run (reads it, no backward).

SmolLM2-135M-Instruct, TREC, 8 init samples in micro-batches of 1, rank 8, all linear layers, one thread;
`accumulate` mode (the entry is `G`, 4 bytes per target weight) and `sketch` mode with its default 2 passes
(the entry is the top-8 SVD). The model is loaded afresh for every run, outside the timing. Also the time
of the key's weight hash alone (part of both cached runs).

    python benchmarks/grad_cache.py > benchmarks/results/grad_cache.txt
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

SEED, N = 0, 8


def main() -> None:
    from peft import LoraConfig

    from lora_one import LoraOneConfig, get_lora_one_model
    from lora_one.core.gradcache import weights_sha256
    from lora_one.recipes.data import causal_lm_features, init_batches
    from lora_one.recipes.embedded_data import load
    from lora_one.recipes.models import load_model

    torch.set_num_threads(1)
    model, tok, _ = load_model("smollm2-135m", "causal-lm")
    batches = init_batches(causal_lm_features(load("trec:train"), tok, 128), N, 1, SEED, tok.pad_token_id)
    t0 = time.perf_counter()
    weights_sha256(model)
    print(f"weight hash of the key: {time.perf_counter() - t0:.2f} s "
          f"({sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6:.0f} MB of parameters)")
    config = LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear")
    for mode in ("accumulate", "sketch"):
        with tempfile.TemporaryDirectory() as cache:
            for run, cache_dir in (("no cache", None), ("first run", cache), ("second run", cache)):
                model = load_model("smollm2-135m", "causal-lm")[0]
                t0 = time.perf_counter()
                peft_model = get_lora_one_model(
                    model, config, batches, show_progress_bar=False,
                    config=LoraOneConfig(grad_mode=mode, seed=SEED, init_samples=None, grad_cache=cache_dir))
                seconds = time.perf_counter() - t0
                meta = peft_model.lora_one_metadata
                record = meta.get("gradient_cache")
                size = sum(f.stat().st_size for f in Path(cache).iterdir()) / 1e6
                print(f"{mode:10} {run:10}: {seconds:6.2f} s (gradient phase {meta['gradient_seconds']:6.2f} s, "
                      f"SVD {meta['svd_seconds']:5.2f} s)" + (f", cache hit {record['hit']}, entry {size:.0f} MB"
                                                              if record else ""), flush=True)


if __name__ == "__main__":
    main()
