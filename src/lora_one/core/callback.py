"""LoRA-One inside `transformers.Trainer` (and TRL's trainers, and any `Trainer` subclass).

    trainer = SFTTrainer(model=model, args=SFTConfig(...), train_dataset=ds,
                         peft_config=LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear"),
                         callbacks=[LoraOneCallback(init_samples=8, gamma=128)])
    trainer.train()

At `on_train_begin` (after the Trainer built its optimizer and prepared model and dataloader, before
the first step) the callback draws `init_samples` examples from the trainer's own training dataloader
(with `gamma="auto"`, as many more after them, on which the line search judges the step), takes the
one-step gradient of the LoRA layers' base weights (`step0_gradients`) and writes `lora_A`/`lora_B`
in place (`init_lora_one`). The optimizer holds those same Parameter objects and has
no state yet, so nothing else needs to change. Resuming from a checkpoint (`state.global_step > 0`)
keeps the factors the Trainer restored.
"""

from __future__ import annotations

import logging
import os
import random
import time
import weakref
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from lora_one.core.errors import UsageError
from lora_one.core.files import write_text_atomic
from lora_one.core.gradcache import GradientCache
from lora_one.core.gradients import init_and_held_out_samples
from lora_one.core.gradients import init_samples as take_init_samples
from lora_one.core.init import (
    NEEDS_GRADIENT,
    check_variant,
    gamma_grid,
    init_metadata,
    initialise_adapter,
    step0_gradients,
    warn_without_rslora,
)
from lora_one.core.parallel import is_main_process
from lora_one.core.save import SIDECAR, sidecar_text
from lora_one.core.targets import lora_layers
from lora_one.linalg.spectral import BASE_CHANGING_VARIANTS

logger = logging.getLogger(__name__)


@contextmanager
def _rng_untouched(device: torch.device):
    """Restore every global RNG afterwards: iterating a DataLoader draws its base seed from torch's
    global RNG, so without this the training run's dropout masks (and, without a seeded sampler, its
    data order) would differ from a run without the callback."""
    py, np_state = random.getstate(), np.random.get_state()
    accel = [device.index or 0] if device.type not in ("cpu", "meta") else []
    with torch.random.fork_rng(devices=accel, device_type=device.type if accel else "cuda"):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(np_state)


class LoraOneCallback(TrainerCallback, ExportableState):
    """Initialise a Trainer's LoRA adapter with LoRA-One when training starts; write `lora_one.json`
    beside every adapter the Trainer saves.

    Args mirror `get_lora_one_model` and the command line: `init_samples` (N, over all processes),
    `variant` (`lora-one`, `spectral` or `lora`), `gamma` (a number, `"auto"` or a list: the line search
    of `search_gamma` on the `init_samples` examples the dataloader yields after the init samples),
    `grad_mode` (`accumulate`, `single-batch`, `sketch`),
    `sketch_passes`, `seed`, `svd`, `cache_dir` (the gradient cache, `lora_one.core.gradcache`; not with
    `bind`); `estimate_gradients` and `init_lora_one` check them when training starts. The
    base-changing variants are refused here: a Trainer saves only the adapter, not the rewritten base
    weights they need. Guide: docs/trainer.md.

    The gradient is that of the model's own `.loss` on the drawn batches. For a Trainer whose loss is
    not the model's (a `compute_loss` override, `compute_loss_func`, label smoothing, TRL's `dft`
    loss), call `callback.bind(trainer)`: the gradient is then that of `trainer.compute_loss`.

    Sidecars: `on_save` writes `lora_one.json` into each checkpoint folder; `on_train_end` writes it
    into `args.output_dir`, where `trainer.save_model()` and `trainer.push_to_hub()` put the adapter
    by default; for another folder call `callback.save_metadata(folder)` after `save_model(folder)`.
    """

    def __init__(
        self,
        init_samples: int = 8,
        variant: str = "lora-one",
        gamma: float | str | Sequence[float] = 128.0,
        grad_mode: str = "accumulate",
        sketch_passes: int | None = None,
        seed: int = 0,
        svd: str = "randomized",
        cache_dir: str | os.PathLike | None = None,
    ):
        check_variant(variant)
        gamma_grid(gamma, variant)
        if variant in BASE_CHANGING_VARIANTS:
            raise UsageError(
                f"variant={variant!r} rewrites the base weights, which a Trainer's checkpoints and save_model() "
                "do not hold; use get_lora_one_model(...) and save_adapter(...) for it, or lora-one / spectral here."
            )
        self.init_samples, self.variant, self.gamma = init_samples, variant, gamma
        self.grad_mode, self.sketch_passes, self.seed, self.svd = grad_mode, sketch_passes, seed, svd
        self.cache_dir = None if cache_dir is None else str(cache_dir)
        self.metadata: dict | None = None  # what the sidecar records; kept in checkpoints' trainer_state.json
        self._trainer = None
        self._initialised = None  # a weak reference to the model the init wrote

    def bind(self, trainer) -> LoraOneCallback:
        """Take the gradient of `trainer.compute_loss` instead of the model's `.loss`; returns self."""
        self._trainer = trainer
        return self

    def state(self) -> dict:
        return {
            "args": {"init_samples": self.init_samples, "variant": self.variant, "gamma": self.gamma,
                     "grad_mode": self.grad_mode, "sketch_passes": self.sketch_passes, "seed": self.seed,
                     "svd": self.svd, "cache_dir": self.cache_dir},
            "attributes": {"metadata": self.metadata},
        }

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if state.global_step > 0:  # resumed: the Trainer restored the trained factors already
            saved = state.stateful_callbacks.get(type(self).__name__)
            if self.metadata is None and isinstance(saved, dict):
                self.metadata = saved.get("attributes", {}).get("metadata")
            return
        if self._initialised is not None and self._initialised() is model:
            return  # a second train() on the same Trainer continues from the trained factors
        if not isinstance(model, PeftModel) or not lora_layers(model):
            raise UsageError(
                f"LoraOneCallback initialises LoRA adapters, but the Trainer's model is a {type(model).__name__} "
                "without LoRA layers: pass peft_config=LoraConfig(...) to a TRL trainer, or wrap the model with "
                "peft.get_peft_model(model, LoraConfig(...)) before building the Trainer."
            )
        adapter = model.active_adapter
        warn_without_rslora(self.variant, model.peft_config[adapter].use_rslora)
        device = next(model.parameters()).device
        t0 = time.perf_counter()
        cache = GradientCache(self.cache_dir) if self.cache_dir is not None else None
        with _rng_untouched(device):
            batches, held_out, gradients = [], [], None
            if self.variant in NEEDS_GRADIENT:
                # this rank's share, read from its own (already sharded) dataloader and no further
                if gamma_grid(self.gamma, self.variant) is not None:
                    batches, held_out = init_and_held_out_samples(train_dataloader, self.init_samples, device)
                else:
                    batches = take_init_samples(train_dataloader, self.init_samples, device)
                gradients = step0_gradients(
                    model, batches, adapter, progress=not args.disable_tqdm, mode=self.grad_mode, seed=self.seed,
                    passes=self.sketch_passes, num_samples=None, train_step=self._train_step(), cache_dir=cache,
                )
            t1 = time.perf_counter()
            stats, gamma, search = initialise_adapter(model, gradients, self.variant, self.gamma, self.svd,
                                                      self.seed, adapter, held_out, self._train_step())
        t2 = time.perf_counter()
        self._initialised = weakref.ref(model)
        self.metadata = {
            **init_metadata(self.variant, gamma, self.svd, self.grad_mode, self.sketch_passes, self.seed,
                            batches, device, t1 - t0, t2 - t1 - (search["seconds"] if search else 0.0), stats,
                            gamma_search=search, gradient_cache=cache.last if cache else None),
            "loss": f"{type(self._trainer).__name__}.compute_loss" if self._trainer else "model(**batch).loss",
        }

    def _train_step(self):
        if self._trainer is None:
            return None
        trainer = self._trainer
        # a copy: Trainer.compute_loss pops `labels` when it smooths them or calls compute_loss_func
        return lambda model, batch: trainer.compute_loss(model, dict(batch))

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:  # the processes the Trainer saved the adapter on
            self._write(Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")

    def on_train_end(self, args, state, control, **kwargs):
        if args.should_save:
            self._write(Path(args.output_dir))

    def save_metadata(self, folder) -> None:
        """Write `lora_one.json` (the sidecar `save_adapter` writes) into `folder`, atomically, on the
        main process: call it after `trainer.save_model(folder)` for a folder other than `output_dir`."""
        if is_main_process():
            self._write(Path(folder))

    def _write(self, folder: Path) -> None:
        if self.metadata is None:
            logger.warning("LoraOneCallback has no LoRA-One metadata (resumed from a checkpoint written "
                           "without it?): no %s written to %s.", SIDECAR, folder)
            return
        write_text_atomic(folder / SIDECAR, sidecar_text(self.metadata))
