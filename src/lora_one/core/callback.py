"""LoRA-One inside `transformers.Trainer` (and TRL's trainers, and any `Trainer` subclass).

    trainer = SFTTrainer(model=model, args=SFTConfig(...), train_dataset=ds,
                         peft_config=LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear"),
                         callbacks=[LoraOneCallback(config=LoraOneConfig(init_samples=8, gamma=128))])
    trainer.train()

At `on_train_begin` (after the Trainer built its optimizer and prepared model and dataloader, before
the first step) the callback runs the init as `get_lora_one_model` does (`init_adapter`) on the trainer's
own training dataloader: it draws `init_samples` examples (with `gamma="auto"`, as many more after them,
on which the line search judges the step), takes the one-step gradient of the LoRA layers' base weights
and writes `lora_A`/`lora_B` in place. The optimizer holds those same Parameter objects and has no state
yet, so nothing else needs to change. Resuming from a checkpoint (`state.global_step > 0`) keeps the
factors the Trainer restored.
"""

from __future__ import annotations

import logging
import random
import weakref
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from lora_one.core.config import LoraOneConfig, as_config
from lora_one.core.constants import BASE_CHANGING_VARIANTS, NEEDS_GRADIENT
from lora_one.core.deprecation import deprecated_arguments
from lora_one.core.errors import UsageError
from lora_one.core.files import write_text_atomic
from lora_one.core.init import init_adapter, warn_without_rslora
from lora_one.core.parallel import is_main_process
from lora_one.core.save import SIDECAR, sidecar_text
from lora_one.core.targets import lora_layers

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
    beside every adapter the Trainer saves. Guide: docs/trainer.md.

    The base-changing variants (`lora-one-v1`, `lora-ga`, `pissa`) are refused here: a Trainer saves only
    the adapter, not the rewritten base weights they need.

    The gradient is that of the model's own `.loss` on the drawn batches. For a Trainer whose loss is
    not the model's (a `compute_loss` override, `compute_loss_func`, label smoothing, TRL's `dft`
    loss), call `callback.bind(trainer)`: the gradient is then that of `trainer.compute_loss`.

    Sidecars: `on_save` writes `lora_one.json` into each checkpoint folder; `on_train_end` writes it
    into `args.output_dir`, where `trainer.save_model()` and `trainer.push_to_hub()` put the adapter
    by default; for another folder call `callback.save_metadata(folder)` after `save_model(folder)`.

    Args:
        config: the init's settings (`LoraOneConfig`, or a dict of its fields as a checkpoint's
            `trainer_state.json` keeps it; None: the defaults). `init_samples` examples, counted over all
            processes, are drawn from the trainer's training dataloader (with a gamma search, as many
            more after them); the progress bar follows the Trainer's `disable_tqdm`.

    Raises:
        UsageError: a base-changing variant, or `init_samples=None` (which would read the whole epoch);
            when training starts, a model without LoRA layers or what `get_lora_one_model` refuses.
    """

    @deprecated_arguments(old_positional=("init_samples", "variant", "gamma", "grad_mode", "sketch_passes", "seed",
                                          "svd", "cache_dir"), into_config=True)
    def __init__(self, *, config: LoraOneConfig | Mapping | None = None):
        config = as_config(config)
        if config.variant in BASE_CHANGING_VARIANTS:
            raise UsageError(
                f"variant={config.variant!r} rewrites the base weights, which a Trainer's checkpoints and "
                "save_model() do not hold; use get_lora_one_model(...) and save_adapter(...) for it, or lora-one / "
                "spectral here."
            )
        if config.init_samples is None:
            raise UsageError("LoraOneCallback reads init_samples examples from the training dataloader; give a "
                             "number (init_samples=None would read the whole epoch).")
        self.config = config
        self.metadata: dict | None = None  # what the sidecar records; kept in checkpoints' trainer_state.json
        self._trainer = None
        self._initialised = None  # a weak reference to the model the init wrote

    def bind(self, trainer) -> LoraOneCallback:
        """Take the gradient of `trainer.compute_loss` instead of the model's `.loss`; returns self."""
        self._trainer = trainer
        return self

    def state(self) -> dict:
        return {"args": {"config": self.config.as_json()}, "attributes": {"metadata": self.metadata}}

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
        warn_without_rslora(self.config.variant, model.peft_config[adapter].use_rslora)
        # this rank's share, read from its own (already sharded) dataloader and no further
        batches = train_dataloader if self.config.variant in NEEDS_GRADIENT else None
        with _rng_untouched(next(model.parameters()).device):
            meta = init_adapter(model, adapter, self.config, batches, None, self._train_step(),
                                show_progress_bar=not args.disable_tqdm)
        self._initialised = weakref.ref(model)
        self.metadata = {**meta, "loss": f"{type(self._trainer).__name__}.compute_loss" if self._trainer
                         else "model(**batch).loss"}

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
