"""Step 2 of LoRA-One: write the LoRA factors of a PEFT model from the one-step gradients.

The two-phase API follows PEFT's data-driven inits: `estimate_gradients` (step 1), then
`init_lora_one` (step 2); `get_lora_one_model` does both. `lora-ga` and `pissa` run PEFT's own
implementations behind the same front door; `lora` is PEFT's default init.

`gamma="auto"` (or a list of values) chooses the step by a line search (`search_gamma`): the loss of the
step-0 model at each gamma of a log grid, forward passes only, on as many training examples as the init
used, the ones that follow the init samples (held out from the gradient: on the init samples themselves
the fitted step looks better than it is, and larger steps win; benchmarks/results/gamma_auto.txt); the
lowest wins. Every factor of `lora-one` and `spectral` is `gamma**-1/2` times a matrix of the SVD alone,
so one SVD serves the whole grid.
"""

from __future__ import annotations

import copy
import math
import os
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from numbers import Real

import torch
from peft import LoraConfig, LoraGAConfig, PeftModel, get_peft_model
from peft.utils import NoMatchingPeftModuleError
from peft.utils.integrations import dequantize_module_weight
from torch import nn

from lora_one.core.errors import UsageError
from lora_one.core.gradcache import GradientCache, hash_batches
from lora_one.core.gradients import (
    DEFAULT_NUM_SAMPLES,
    DEFAULT_SKETCH_PASSES,
    TrainStep,
    estimate_gradients,
    examples_in,
    init_and_held_out_samples,
    init_samples,
    loss_sum,
)
from lora_one.core.parallel import all_reduce_sum, raise_together, world_size
from lora_one.core.save import guard_original_base
from lora_one.core.targets import lora_layers
from lora_one.linalg.spectral import (
    BASE_CHANGING_VARIANTS,
    GRADIENT_VARIANTS,
    VARIANTS,
    TopSVD,
    check_rank,
    lora_factors_and_spectrum,
    top_svd,
)

NEEDS_GRADIENT = GRADIENT_VARIANTS + ("lora-ga",)
NORMALISATION = {
    "lora-one": "1 / (gamma * sigma_1)",
    "spectral": "1 / gamma",
    "lora-one-v1": "out**0.25 / sqrt(gamma) per factor",
    "lora-ga": "PEFT LoraGAConfig(scale='stable', stable_gamma=gamma)",
    "pissa": "PEFT pissa",
    "lora": "PEFT default",
}
# The variants whose step-0 model moves with gamma, so that a loss can choose it.
GAMMA_SEARCH_VARIANTS = ("lora-one", "spectral")
DEFAULT_GAMMA_GRID = tuple(2.0**k for k in range(3, 14))  # 8, 16, ..., 8192; factor 2 apart; holds 128


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise UsageError(f"Unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}.")


def _normalise_name(name: str) -> str:
    """Accept names from a PeftModel's own named_modules() as well as from its base model."""
    name = name.removeprefix("base_model.model.")
    return name.removesuffix(".base_layer")


def _initial_state(peft_model: PeftModel, adapter: str) -> dict[str, torch.Tensor]:
    """CPU copy of the step-0 factors, kept for PEFT's rank-2r conversion at save time."""
    return {
        k: v.detach().to("cpu", copy=True)
        for k, v in _adapter_parameters(peft_model, adapter).items()
        if ".lora_A." in k or ".lora_B." in k
    }


def _reset_dora_magnitude(layer, adapter: str) -> None:
    """DoRA-One: DoRA's magnitude vector becomes the row norms of `W + s B A` (PEFT's norm, per output
    feature), so DoRA's step-0 weight `m * (W + s B A) / ||W + s B A||` is exactly `W + s B A`. PEFT
    computed it when the layer was made, with `B = 0`, i.e. `||W||`. In place: an optimizer that already
    holds the magnitude parameter (the Trainer callback) keeps it."""
    magnitude = layer.lora_magnitude_vector[adapter]
    W = dequantize_module_weight(layer.get_base_layer()).float()
    W = W.T if layer.fan_in_fan_out else W
    delta = layer.scaling[adapter] * (layer.lora_B[adapter].weight.float() @ layer.lora_A[adapter].weight.float())
    magnitude.weight.copy_(torch.linalg.norm(W + delta, dim=1).to(magnitude.weight.dtype))


def _keep_initial_state(peft_model: PeftModel, adapter: str, variant: str) -> None:
    peft_model.lora_one_initial_state = None
    if variant in BASE_CHANGING_VARIANTS:  # PEFT's own save would fit only the residual base
        peft_model.lora_one_initial_state = _initial_state(peft_model, adapter)
        guard_original_base(peft_model)


def _subtract_adapter(layer, adapter: str, variant: str) -> None:
    """Base weight `W <- W - s B A` from the layer's factors, in fp32 and cast back, in the operation
    order of the init that made it (PEFT's pissa scales `B` before the product; PEFT's lora-ga and our
    lora-one-v1 scale the product), so a restored residual base is bit-identical."""
    base = layer.get_base_layer()
    B, A, s = layer.lora_B[adapter].weight.float(), layer.lora_A[adapter].weight.float(), layer.scaling[adapter]
    delta = (s * B) @ A if variant == "pissa" else s * (B @ A)
    base.weight.copy_((base.weight.float() - delta).to(base.weight.dtype))


@torch.no_grad()
def init_lora_one(
    peft_model: PeftModel,
    gradients: Mapping[str, torch.Tensor | TopSVD] | None,
    variant: str = "lora-one",
    gamma: float = 128.0,
    svd: str = "randomized",
    seed: int = 0,
    adapter_name: str | None = None,
) -> list[dict]:
    """Overwrite `lora_A`/`lora_B` of every LoRA layer with `variant`'s step-0 factors.

    `gradients` maps layer names (as `estimate_gradients` returns them) to `G = dL/dW` or its top-r
    SVD (`single-batch` and `sketch` modes; `lora-ga` needs the full `G`); `pissa` and `lora` need
    none. Variants in `BASE_CHANGING_VARIANTS` also rewrite the base weight so that the model's
    function is unchanged at step 0. Returns per-layer statistics: `sigma_1` of `-G` (for the gradient
    variants) and the relative update `||s B A||_F / ||W||_F` (None for a quantised layer).
    """
    check_variant(variant)
    if gamma_grid(gamma, variant) is not None:
        raise UsageError(
            f"init_lora_one takes one gamma, not {gamma!r}: get_lora_one_model searches it for you, or pass "
            "search_gamma(...)['chosen']."
        )
    adapter = adapter_name or peft_model.active_adapter
    layers, grads = _checked_gradients(peft_model, gradients, variant, adapter)

    stats = []
    with torch.random.fork_rng(devices=[]):  # PEFT's lora-ga and lora inits draw from the global RNG
        torch.manual_seed(seed)
        for name, layer in layers.items():
            base = layer.get_base_layer()
            lora_A, lora_B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            s = layer.scaling[adapter]
            sigma_1 = None
            if variant in GRADIENT_VARIANTS:
                B, A, S = lora_factors_and_spectrum(grads[name], layer.r[adapter], variant, gamma, svd, seed)
                sigma_1 = float(S[0])
                lora_A.copy_(A.to(lora_A.dtype))
                lora_B.copy_(B.to(lora_B.dtype))
                if variant == "lora-one-v1":
                    _subtract_adapter(layer, adapter, variant)
                if layer.use_dora.get(adapter):
                    _reset_dora_magnitude(layer, adapter)
            elif variant == "lora-ga":
                base._peft_loraga_grad = grads[name].to(base.weight.device)
                layer.lora_ga_init(adapter, LoraGAConfig(stable_gamma=gamma))  # deletes the attribute
            elif variant == "pissa":
                layer.pissa_init(adapter, "pissa")
            else:
                layer.reset_lora_parameters(adapter, True)
            delta = s * (lora_B.float() @ lora_A.float())
            # a quantised layer's weight holds integer codes, whose norm is not |W|: no ratio then
            packed = not base.weight.is_floating_point()
            stats.append(
                {
                    "layer": name,
                    "shape": [layer.out_features, layer.in_features],  # not a packed weight's
                    "sigma_1": sigma_1,
                    "relative_update": None if packed else float(delta.norm() / base.weight.float().norm()),
                }
            )
    _keep_initial_state(peft_model, adapter, variant)
    return stats


def _checked_layers(peft_model: PeftModel, adapter: str) -> dict:
    """The LoRA layers, each checked against its own r (PEFT's `rank_pattern` gives layers their own)."""
    layers = lora_layers(peft_model)
    if not layers:
        raise UsageError("The model has no LoRA layers; wrap it with peft.get_peft_model first.")
    for name, layer in layers.items():
        check_rank((layer.out_features, layer.in_features), layer.r[adapter], f"layer {name!r}")
    return layers


def _checked_gradients(peft_model: PeftModel, gradients, variant: str, adapter: str) -> tuple[dict, dict]:
    """`(LoRA layers, gradients by layer name)`, everything checked before any weight is touched."""
    layers = _checked_layers(peft_model, adapter)
    grads = {_normalise_name(k): v for k, v in (gradients or {}).items()}
    for name in layers:
        if variant in NEEDS_GRADIENT and name not in grads:
            raise UsageError(
                f"No gradient for LoRA layer {name!r}; estimate_gradients must cover the same "
                "target_modules as the LoRA config."
            )
        if variant == "lora-ga" and not isinstance(grads[name], torch.Tensor):
            raise UsageError(
                "lora-ga runs PEFT's own implementation, which needs the full gradient; estimate it "
                "with mode='accumulate'."
            )
    return layers, grads


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


def parse_gamma(text: str) -> float | str | tuple[float, ...]:
    """A `--gamma` value: a number, `auto`, or numbers separated by commas (a grid to search)."""
    text = text.strip()
    if text == "auto":
        return text
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--gamma {text!r}: give a positive number, auto, or numbers separated by commas "
                         "(e.g. 32,64,128,256).") from None
    return values[0] if len(values) == 1 else values


def _top_svds(layers: Mapping, grads: Mapping, svd: str, seed: int, adapter: str) -> dict[str, TopSVD]:
    """Each layer's top-r SVD of its gradient, exactly as `lora_factors_and_spectrum` takes it from `G`
    (a `TopSVD` passes through), so that a gamma search and the init share one SVD."""
    return {name: g if isinstance(g, TopSVD) else top_svd(g.float(), layers[name].r[adapter], svd, seed)
            for name, g in grads.items() if name in layers}


@torch.no_grad()
def search_gamma(
    peft_model: PeftModel,
    gradients: Mapping[str, torch.Tensor | TopSVD],
    batches: list[Mapping],
    variant: str = "lora-one",
    grid: Sequence[float] | str = "auto",
    svd: str = "randomized",
    seed: int = 0,
    adapter_name: str | None = None,
    train_step: TrainStep | None = None,
) -> dict:
    """The line search of `gamma="auto"`: for each gamma of `grid` (`"auto"`: `DEFAULT_GAMMA_GRID`), the
    loss of the step-0 model that `init_lora_one` would write (DoRA's magnitude reset too), on `batches`
    (training examples held out from the gradient, as `get_lora_one_model` takes them; this rank's own
    under `torch.distributed`): forward passes only, in eval mode, the loss `estimate_gradients`
    differentiates (the mean over all loss terms, of all ranks; `train_step` as there).

    Returns `{"grid", "losses", "loss_without_step", "chosen", "samples", "samples_sha256", "seconds"}`:
    `chosen` has the lowest loss (a non-finite loss, recorded as None, never wins); `loss_without_step`
    is the base model's; `samples` counts the examples over all ranks. The adapter is left as it was
    found. Warns when the lowest loss lies at an end of the grid, or above the loss without a step."""
    t0 = time.perf_counter()
    grid = gamma_grid(grid, variant)
    if grid is None:
        raise UsageError("search_gamma needs a grid: 'auto' or a list of gamma values.")
    adapter = adapter_name or peft_model.active_adapter
    layers, grads = _checked_gradients(peft_model, gradients, variant, adapter)
    svds = _top_svds(layers, grads, svd, seed, adapter)
    params = _adapter_parameters(peft_model, adapter)
    found = {k: v.detach().clone() for k, v in params.items()}
    device = next(peft_model.parameters()).device
    parts = []  # (this rank's loss sum, its loss terms) per gamma, then without a step
    try:
        with raise_together(device):
            for gamma in grid:
                for name, layer in layers.items():
                    B, A, _ = lora_factors_and_spectrum(svds[name], layer.r[adapter], variant, gamma)
                    layer.lora_A[adapter].weight.copy_(A.to(layer.lora_A[adapter].weight.dtype))
                    layer.lora_B[adapter].weight.copy_(B.to(layer.lora_B[adapter].weight.dtype))
                    if layer.use_dora.get(adapter):
                        _reset_dora_magnitude(layer, adapter)
                parts.append(loss_sum(peft_model, batches, train_step))
            with peft_model.disable_adapter():
                parts.append(loss_sum(peft_model, batches, train_step))
    finally:
        for k, v in found.items():
            params[k].copy_(v)
    # float64 sums on the CPU (MPS has none), summed over the ranks on the model's device
    sums = all_reduce_sum(torch.tensor(parts, dtype=torch.float64), device).tolist()
    if sums[0][1] == 0:
        raise UsageError("The gamma search's samples have nothing to predict: every label is -100. Check the data.")
    *losses, without_step = [total / count if math.isfinite(total) else None for total, count in sums]
    finite = [(loss, g) for loss, g in zip(losses, grid) if loss is not None]
    if not finite:
        raise UsageError(f"Every gamma of the grid {list(grid)} gives a non-finite loss; try larger values.")
    best, chosen = min(finite)  # ties, which only exact round-off makes, go to the smaller gamma
    if len(grid) > 1 and chosen in (grid[0], grid[-1]):
        side = "smallest (the largest step)" if chosen == grid[0] else "largest (the smallest step)"
        warnings.warn(f"gamma search: the lowest loss is at the grid's {side} gamma {chosen:g}; the best gamma may "
                      "lie beyond it: pass a grid that reaches further (gamma=[...]).", stacklevel=3)
    if without_step is not None and best >= without_step:
        warnings.warn(f"gamma search: no gamma of the grid lowers the loss below the model's without a step "
                      f"({best:.4g} >= {without_step:.4g}).", stacklevel=3)
    local = torch.tensor([sum(examples_in(b) for b in batches)])
    return {"grid": list(grid), "losses": losses, "loss_without_step": without_step, "chosen": chosen,
            "samples": int(all_reduce_sum(local, device).item()), "samples_sha256": hash_batches(batches),
            "seconds": round(time.perf_counter() - t0, 4)}


def initialise_adapter(peft_model: PeftModel, gradients, variant: str, gamma, svd: str, seed: int, adapter: str,
                       batches: list[Mapping], train_step: TrainStep | None) -> tuple[list[dict], float, dict | None]:
    """`init_lora_one` at `gamma`, or at the gamma `search_gamma` picks on `batches` when `gamma` asks for
    a search (one SVD for both). Returns the layer statistics, the gamma used and the search's record."""
    if gamma_grid(gamma, variant) is None:
        return init_lora_one(peft_model, gradients, variant, gamma, svd, seed, adapter), gamma, None
    layers, grads = _checked_gradients(peft_model, gradients, variant, adapter)
    svds = _top_svds(layers, grads, svd, seed, adapter)
    search = search_gamma(peft_model, svds, batches, variant, gamma, svd, seed, adapter, train_step)
    return init_lora_one(peft_model, svds, variant, search["chosen"], svd, seed, adapter), search["chosen"], search


def lora_one_state(peft_model: PeftModel) -> dict:
    """What `restore_lora_one` needs to rebuild this model's step-0 state without the gradient phase:
    the active adapter's step-0 parameters and the init metadata, as tensors and plain containers (so
    `torch.load(..., weights_only=True)` reads them back). Take it right after `get_lora_one_model`."""
    adapter = peft_model.active_adapter
    return {
        "adapter": adapter,
        "parameters": {k: v.detach().to("cpu", copy=True) for k, v in _adapter_parameters(peft_model, adapter).items()},
        "metadata": copy.deepcopy(peft_model.lora_one_metadata),
    }


@torch.no_grad()
def restore_lora_one(model: nn.Module, lora_config: LoraConfig, state: Mapping) -> PeftModel:
    """`get_lora_one_model`'s result from `lora_one_state`, without the gradient phase or any SVD.

    `model` must be the base model the init started from, untouched. It is wrapped as the init wraps
    it, the step-0 parameters are copied in, and for the base-changing variants the residual base
    weight is recomputed exactly (bit for bit) as the init computed it.
    """
    adapter, meta = state["adapter"], state["metadata"]
    peft_model = _wrap(model, lora_config, adapter, meta["seed"])
    params = _adapter_parameters(peft_model, adapter)
    saved = state["parameters"]
    if {k: tuple(v.shape) for k, v in saved.items()} != {k: tuple(v.shape) for k, v in params.items()}:
        raise UsageError("The saved step-0 adapter does not fit this model's LoRA layers (another model, target "
                         "or rank); start the run again.")
    for name, value in saved.items():
        params[name].copy_(value)
    if meta["variant"] in BASE_CHANGING_VARIANTS:
        for layer in lora_layers(peft_model).values():
            _subtract_adapter(layer, adapter, meta["variant"])
    _keep_initial_state(peft_model, adapter, meta["variant"])
    peft_model.lora_one_metadata = copy.deepcopy(meta)
    return peft_model


def _adapter_parameters(peft_model: PeftModel, adapter: str) -> dict[str, nn.Parameter]:
    """The adapter's own parameters (`lora_A`, `lora_B`, DoRA's magnitude), not modules_to_save."""
    return {k: v for k, v in peft_model.named_parameters() if ".lora_" in k and f".{adapter}." in k}


def _wrap(model: nn.Module, lora_config: LoraConfig, adapter_name: str, seed: int) -> PeftModel:
    """`model` wrapped by PEFT, which chooses the layers and each one's r and scale from the whole config."""
    config = copy.deepcopy(lora_config)
    config.init_lora_weights = True  # the saved config must load as a plain LoRA adapter
    name = type(model).__name__
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return get_peft_model(model, config, adapter_name=adapter_name)
    except NoMatchingPeftModuleError as e:
        raise UsageError(f"No nn.Linear layer of {name} matches the LoraConfig ({e}). Use 'all-linear' or names from "
                         "model.named_modules(), e.g. ['q_proj', 'v_proj'].") from None
    except ValueError as e:  # PEFT's checks of the config against the model
        raise UsageError(f"PEFT cannot wrap {name} with this LoraConfig: {e}") from None


def step0_gradients(peft_model: PeftModel, batches: Iterable[Mapping], adapter: str, **kwargs
                    ) -> dict[str, torch.Tensor | TopSVD]:
    """`estimate_gradients(peft_model, batches, **kwargs)` for the init of `adapter`: the targets are its
    LoRA layers, which PEFT chose from the whole `LoraConfig`, each SVD of the layer's own r
    (`rank_pattern`). Taken with the adapters off, so that it is the base model's gradient whatever the
    adapter holds (a fresh one adds nothing, B = 0, but DoRA's step-0 scale `m / ||W||` is 1 only to
    round-off in low precision)."""
    ranks = {name: layer.r[adapter] for name, layer in lora_layers(peft_model).items()}
    flags = {p: p.requires_grad for p in peft_model.parameters()}
    try:
        with warnings.catch_warnings():
            # PEFT warns that a bias it trains stays on; at step 0 it is still the base model's own
            warnings.filterwarnings("ignore", message="Careful, disabling adapter layers with bias")
            with peft_model.disable_adapter():
                return estimate_gradients(peft_model, batches, rank=ranks, **kwargs)
    finally:  # leaving disable_adapter makes the active adapter trainable, whatever it was
        for p, flag in flags.items():
            p.requires_grad_(flag)


def get_lora_one_model(
    model: nn.Module,
    lora_config: LoraConfig,
    batches: Iterable[Mapping] | None,
    variant: str = "lora-one",
    gamma: float | str | Sequence[float] = 128.0,
    svd: str = "randomized",
    seed: int = 0,
    adapter_name: str = "default",
    progress: bool = True,
    grad_mode: str = "accumulate",
    offload: bool = False,
    sketch_passes: int | None = None,
    num_samples: int | None = DEFAULT_NUM_SAMPLES,
    train_step: TrainStep | None = None,
    cache_dir: str | os.PathLike | None = None,
    search_batches: Iterable[Mapping] | None = None,
) -> PeftModel:
    """Wrap `model` with PEFT, estimate the one-step gradient on `batches`, initialise the adapter.

    PEFT's wrapping decides everything the `LoraConfig` says: which layers (`target_modules` or PEFT's
    default for the architecture, `exclude_modules`, `layers_to_transform`), each layer's r and scale
    (`rank_pattern`, `alpha_pattern`); only those layers take a gradient (`step0_gradients`), in
    `grad_mode` (`accumulate`, `single-batch` or `sketch`, see `estimate_gradients`; `sketch_passes` is
    its `passes`, default 2) on `num_samples` examples of `batches` over all ranks (default 8; `None`:
    all of them) and with `train_step`, both as `estimate_gradients` takes them. Under
    `torch.distributed`, each rank passes its own batches and gets the same adapter.
    `gamma="auto"` (or a list of values) picks gamma by `search_gamma` (`lora-one`, `spectral`) on
    `search_batches`, by default the `num_samples` examples that follow the init samples in `batches`
    (read in the same pass; `search_batches=batches` searches on the init samples themselves).
    `cache_dir`: a folder where the gradient is stored, and read back by a later call with the same
    model, samples and gradient settings, skipping the backward (`lora_one.core.gradcache`).
    The returned `PeftModel` carries `lora_one_metadata` (what `save_adapter` writes to the sidecar).
    The LoRA-One variants expect `use_rslora=True` (the spec's default) and warn without it. On an error
    the model is handed back without LoRA layers.
    """
    check_variant(variant)
    searching = gamma_grid(gamma, variant) is not None  # a bad gamma fails before any work
    if searching and search_batches is None and num_samples is None:
        raise UsageError(
            "gamma search with num_samples=None: every example of batches is an init sample, and the search "
            "judges the step on other training examples; pass search_batches=... (search_batches=batches: on the "
            "init samples themselves), or a number of init samples."
        )
    warn_without_rslora(variant, lora_config.use_rslora, stacklevel=3)
    device = next(model.parameters()).device  # NCCL reduces on the GPU
    peft_model = _wrap(model, lora_config, adapter_name, seed)
    try:
        _checked_layers(peft_model, adapter_name)  # each layer's own r, before any work
        # taken once, so that the sidecar records exactly the samples of the gradient
        if batches is None:
            batches = []
        elif searching and search_batches is None:  # the examples after the init samples, held out from G
            batches, search_batches = init_and_held_out_samples(batches, num_samples, device)
        else:
            on_init_samples = search_batches is batches
            batches = init_samples(batches, num_samples, device)
            if searching:
                search_batches = batches if on_init_samples else init_samples(search_batches, None, device)
        gradients, cache = None, GradientCache(cache_dir) if cache_dir is not None else None
        t0 = time.perf_counter()
        if variant in NEEDS_GRADIENT:
            gradients = step0_gradients(
                peft_model, batches, adapter_name, progress=progress, mode=grad_mode, offload=offload, seed=seed,
                passes=sketch_passes, num_samples=None, train_step=train_step, cache_dir=cache,
            )
        grad_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        stats, gamma, search = initialise_adapter(peft_model, gradients, variant, gamma, svd, seed, adapter_name,
                                                  search_batches, train_step)
    except BaseException:
        peft_model.unload()  # the model as it came, without LoRA layers
        raise
    svd_seconds = time.perf_counter() - t1 - (search["seconds"] if search else 0.0)
    peft_model.lora_one_metadata = init_metadata(
        variant, gamma, svd, grad_mode, sketch_passes, seed, batches, device, grad_seconds, svd_seconds, stats,
        gamma_search=search, gradient_cache=cache.last if cache else None,
    )
    return peft_model


def warn_without_rslora(variant: str, use_rslora: bool, stacklevel: int = 2) -> None:
    """The LoRA-One variants expect rsLoRA's `alpha / sqrt(r)` (the spec's default): say so if it is off."""
    if variant in GRADIENT_VARIANTS and not use_rslora:
        warnings.warn(
            f"LoraConfig(use_rslora=False) with variant {variant!r}: the adapter is scaled by alpha / r, sqrt(r) "
            "times less than by the alpha / sqrt(r) of LoRA-One's default, so its update (for lora-one and "
            "spectral, the step-0 update itself) is sqrt(r) times smaller. Pass use_rslora=True unless you "
            "mean it.",
            stacklevel=stacklevel,
        )


def init_metadata(variant: str, gamma: float, svd: str, grad_mode: str, sketch_passes: int | None, seed: int,
                  batches: list[Mapping], device, gradient_seconds: float, svd_seconds: float,
                  stats: list[dict], gamma_search: dict | None = None, gradient_cache: dict | None = None) -> dict:
    """What the sidecar records about an init (`batches`: this rank's init samples; the counts are summed
    over the ranks; `gamma`: the one used, `gamma_search`: `search_gamma`'s record when it chose it;
    `gradient_cache`: `GradientCache.last`)."""
    local = torch.tensor([sum(examples_in(b) for b in batches), len(batches)])
    n_samples, n_batches = all_reduce_sum(local, device).tolist()  # over the ranks' shards
    return {
        "variant": variant,
        "gamma": gamma,
        "normalisation": NORMALISATION[variant],
        "svd": svd if grad_mode == "accumulate" else f"{grad_mode} (top-r SVD in the gradient phase)",
        "grad_mode": grad_mode,
        **({"sketch_passes": sketch_passes or DEFAULT_SKETCH_PASSES} if grad_mode == "sketch" else {}),
        "world_size": world_size(),
        "seed": seed,
        "init_samples": int(n_samples),
        "init_batches": int(n_batches),
        "init_samples_sha256": hash_batches(batches),  # of this rank's shard under torch.distributed
        "base_changed": variant in BASE_CHANGING_VARIANTS,
        "gradient_seconds": round(gradient_seconds, 4),
        "svd_seconds": round(svd_seconds, 4),
        **({"gamma_search": gamma_search} if gamma_search else {}),
        **({"gradient_cache": gradient_cache} if gradient_cache else {}),
        "layers": stats,
    }

