"""`LoraOneConfig`: the settings of a LoRA-One init, as one dataclass, checked once when it is made.

`get_lora_one_model` and `LoraOneCallback` take it; the command line's settings build it; the sidecar
`lora_one.json` records it (`as_json`). The checks of each setting are the functions below, which
`estimate_gradients`, `init_lora_one` and `search_gamma` call on the same settings passed as keywords.
Every bad value is a one-line `UsageError` that names the setting and what to give instead.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Real

from lora_one.core.constants import (
    DEFAULT_GAMMA,
    DEFAULT_GAMMA_GRID,
    DEFAULT_INIT_SAMPLES,
    DEFAULT_SKETCH_PASSES,
    GAMMA_SEARCH_VARIANTS,
    GRAD_MODES,
    NEEDS_GRADIENT,
    SVDS,
    VARIANTS,
)
from lora_one.core.errors import UsageError


@dataclass(frozen=True)
class LoraOneConfig:
    """The settings of a LoRA-One init (what the adapter starts from, and how the gradient is taken).

    Pass it to `get_lora_one_model(..., config=...)` or `LoraOneCallback(config=...)`. Every field is
    checked when the config is made; it is frozen, so a changed copy is `dataclasses.replace(config, ...)`,
    checked again.

    Args:
        variant: the step-0 factors: `lora-one` (default), `spectral`, `lora-one-v1`, `lora-ga`, `pissa` or
            `lora` (PEFT's default init); `lora_one.VARIANTS` lists them.
        gamma: the init step: a positive number (the step-0 update of `lora-one` is `-G_r / (gamma sigma_1)`),
            `"auto"` (a line search over `DEFAULT_GAMMA_GRID`) or a list of values to search (`lora-one`
            and `spectral` only); see `search_gamma`.
        svd: the top-r SVD of each gradient in `accumulate` mode: `randomized` (seeded, the same on every
            device) or `exact`.
        seed: the seed of the randomised SVD, of the sketch's test matrices and of PEFT's own inits.
        grad_mode: how the one-step gradient is taken: `accumulate` (the full `G` of every layer),
            `single-batch` or `sketch` (no weight gradient is ever formed: for large or quantised bases);
            docs/scaling.md#memory-modes.
        sketch_passes: `sketch` mode's passes over the init samples (None: `DEFAULT_SKETCH_PASSES`); each
            further pass is another forward and backward over them and sharpens the top-r subspace.
        init_samples: the examples the gradient is taken over, counted over all processes (the
            reference's 8); None takes every example of the batches given. A gamma search judges the
            step on as many examples that follow them.
        offload: `accumulate` mode keeps its float32 accumulators on the CPU.
        grad_cache: a folder where the one-step gradient is stored and read back by a later init with the
            same model, samples and gradient settings, which then skips the backward
            (`lora_one.core.gradcache`).

    Raises:
        UsageError: a value that is not one of the setting's choices, or settings that contradict each
            other (a gamma search for a variant gamma does not move, sketch passes without sketch mode).
    """

    variant: str = "lora-one"
    gamma: float | str | Sequence[float] = DEFAULT_GAMMA
    svd: str = "randomized"
    seed: int = 0
    grad_mode: str = "accumulate"
    sketch_passes: int | None = None
    init_samples: int | None = DEFAULT_INIT_SAMPLES
    offload: bool = False
    grad_cache: str | os.PathLike | None = None  # kept as a str

    def __post_init__(self):
        check_variant(self.variant)
        if isinstance(self.gamma, Sequence) and not isinstance(self.gamma, str):
            object.__setattr__(self, "gamma", tuple(self.gamma))  # comparable, whatever sequence was given
        gamma_grid(self.gamma, self.variant)
        check_svd(self.svd)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise UsageError(f"seed must be an integer, got {self.seed!r}.")
        check_grad_mode(self.grad_mode)
        resolve_sketch_passes(self.sketch_passes, self.grad_mode)
        check_init_samples(self.init_samples)
        if not isinstance(self.offload, bool):
            raise UsageError(f"offload must be True or False, got {self.offload!r}.")
        if self.grad_cache is not None:
            if not isinstance(self.grad_cache, (str, os.PathLike)):
                raise UsageError(f"grad_cache must be a folder (a path), got {type(self.grad_cache).__name__}.")
            object.__setattr__(self, "grad_cache", os.fspath(self.grad_cache))

    def as_json(self) -> dict:
        """The fields as JSON values (a gamma grid as a list), as the sidecar records them;
        `LoraOneConfig(**config.as_json())` is the same config."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(LoraOneConfig))


def as_config(config: LoraOneConfig | Mapping | None) -> LoraOneConfig:
    """`config` as a `LoraOneConfig`: None gives the defaults, a mapping its fields (a sidecar's `config`)."""
    if config is None:
        return LoraOneConfig()
    if isinstance(config, LoraOneConfig):
        return config
    if isinstance(config, Mapping):
        unknown = sorted(set(config) - set(CONFIG_FIELDS))
        if unknown:
            raise UsageError(f"config has no setting {unknown[0]!r}; LoraOneConfig takes {', '.join(CONFIG_FIELDS)}.")
        return LoraOneConfig(**config)
    raise UsageError(f"config must be a LoraOneConfig (or a dict of its fields), got {type(config).__name__}.")


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise UsageError(f"Unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}.")


def check_svd(svd: str) -> None:
    if svd not in SVDS:
        raise UsageError(f"Unknown svd {svd!r}; use one of {', '.join(SVDS)}.")


def check_grad_mode(grad_mode: str) -> None:
    if grad_mode not in GRAD_MODES:
        raise UsageError(f"Unknown grad_mode {grad_mode!r}; use one of {', '.join(GRAD_MODES)}.")


def resolve_sketch_passes(sketch_passes: int | None, grad_mode: str) -> int:
    """The number of passes over the init samples (None: the mode's default), checked."""
    if sketch_passes is None:
        return DEFAULT_SKETCH_PASSES if grad_mode == "sketch" else 1
    if isinstance(sketch_passes, bool) or not isinstance(sketch_passes, int) or sketch_passes < 1:
        raise UsageError(f"sketch_passes must be an integer >= 1, got {sketch_passes!r}.")
    if sketch_passes > 1 and grad_mode != "sketch":
        raise UsageError(f"sketch_passes={sketch_passes} needs grad_mode='sketch'; grad_mode={grad_mode!r} takes "
                         "its gradient in one pass.")
    return sketch_passes


def check_init_samples(init_samples: int | None) -> None:
    if init_samples is not None and (isinstance(init_samples, bool) or not isinstance(init_samples, int)
                                     or init_samples < 1):
        raise UsageError(f"init_samples must be an integer >= 1, or None for every example given; got "
                         f"{init_samples!r}.")


def gamma_grid(gamma, variant: str) -> tuple[float, ...] | None:
    """The grid that `gamma` asks to search (`"auto"`: `DEFAULT_GAMMA_GRID`; a sequence: its values,
    sorted), or None for one number; checked, and refused for a variant whose step-0 model does not
    depend on gamma."""
    if isinstance(gamma, Real) and not isinstance(gamma, bool):
        if not (gamma > 0 and math.isfinite(gamma)):
            raise UsageError(f"gamma must be a positive number, got {gamma}.")
        return None
    if isinstance(gamma, str):
        if gamma != "auto":
            raise UsageError(f"gamma={gamma!r}: give a positive number, 'auto' (a line search), or a list of numbers.")
        grid = DEFAULT_GAMMA_GRID
    elif isinstance(gamma, Sequence) and gamma and all(isinstance(g, Real) and not isinstance(g, bool) for g in gamma):
        if not all(g > 0 and math.isfinite(g) for g in gamma):
            raise UsageError(f"gamma={list(gamma)}: every value of a gamma grid must be a positive number.")
        grid = tuple(sorted({float(g) for g in gamma}))
    else:
        raise UsageError(f"gamma={gamma!r}: give a positive number, 'auto' (a line search), or a list of numbers.")
    if variant not in GAMMA_SEARCH_VARIANTS:
        why = ("its step-0 model is the base model whatever gamma (the adapter is subtracted from the base "
               "weight), so no loss can choose it" if variant in NEEDS_GRADIENT else "it takes no gamma")
        raise UsageError(f"gamma={gamma!r} searches the step of {' and '.join(GAMMA_SEARCH_VARIANTS)}; for "
                         f"{variant} {why}: pass a number (e.g. gamma=128).")
    return grid
