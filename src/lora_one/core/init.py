"""Step 2 of LoRA-One: write the LoRA factors of a PEFT model from the one-step gradients.

The two-phase API follows PEFT's data-driven inits: `estimate_gradients` (step 1), then
`init_lora_one` (step 2); `get_lora_one_model` does both, with its settings in a `LoraOneConfig`.
`lora-ga` and `pissa` run PEFT's own implementations behind the same front door; `lora` is PEFT's
default init.

`gamma="auto"` (or a list of values) chooses the step by a line search (`search_gamma`): the loss of the
step-0 model at each gamma of a log grid, forward passes only, on as many training examples as the init
used, the ones that follow the init samples (held out from the gradient: on the init samples themselves
the fitted step looks better than it is, and larger steps win: docs/gamma.md); the lowest wins. Every
factor of `lora-one` and `spectral` is `gamma**-1/2` times a matrix of the SVD alone, so one SVD serves
the whole grid.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence

import torch
from peft import LoraConfig, LoraGAConfig, PeftModel, get_peft_model
from peft.utils import NoMatchingPeftModuleError
from peft.utils.integrations import dequantize_module_weight
from torch import nn

from lora_one.core.config import (
    LoraOneConfig,
    as_config,
    check_svd,
    check_variant,
    gamma_grid,
    resolve_sketch_passes,
)
from lora_one.core.constants import (
    BASE_CHANGING_VARIANTS,
    DEFAULT_GAMMA,
    GRADIENT_VARIANTS,
    NEEDS_GRADIENT,
)
from lora_one.core.deprecation import deprecated_arguments
from lora_one.core.errors import UsageError
from lora_one.core.gradcache import GradientCache, hash_batches
from lora_one.core.gradients import TrainStep, estimate_gradients, examples_in, init_and_search_samples, loss_sum
from lora_one.core.parallel import all_reduce_sum, raise_together, world_size
from lora_one.core.save import guard_original_base
from lora_one.core.targets import lora_layers
from lora_one.linalg.spectral import TopSVD, check_rank, lora_factors_and_spectrum, top_svd

NORMALISATION = {
    "lora-one": "1 / (gamma * sigma_1)",
    "spectral": "1 / gamma",
    "lora-one-v1": "out**0.25 / sqrt(gamma) per factor",
    "lora-ga": "PEFT LoraGAConfig(scale='stable', stable_gamma=gamma)",
    "pissa": "PEFT pissa",
    "lora": "PEFT default",
}


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


@deprecated_arguments(old_positional=("variant", "gamma", "svd", "seed", "adapter_name"))
@torch.no_grad()
def init_lora_one(
    peft_model: PeftModel,
    gradients: Mapping[str, torch.Tensor | TopSVD] | None,
    *,
    variant: str = "lora-one",
    gamma: float = DEFAULT_GAMMA,
    svd: str = "randomized",
    seed: int = 0,
    adapter_name: str | None = None,
) -> list[dict]:
    """Step 2: overwrite `lora_A`/`lora_B` of every LoRA layer with `variant`'s step-0 factors.

    Variants in `BASE_CHANGING_VARIANTS` also rewrite the base weight so that the model's function is
    unchanged at step 0. The settings are `LoraOneConfig`'s fields of the same names.

    Args:
        peft_model: the PEFT model whose LoRA layers are written, each at its own r.
        gradients: `{layer name: G}` as `estimate_gradients` returns it, `G = dL/dW` or its top-r SVD
            (`single-batch` and `sketch` modes; `lora-ga` needs the full `G`); `pissa` and `lora` need
            none (None).
        variant: the step-0 factors (`lora_one.VARIANTS`).
        gamma: the init step, one positive number (`search_gamma` chooses one from a grid).
        svd: `randomized` or `exact`, the top-r SVD of a full `G`.
        seed: the seed of the randomised SVD and of PEFT's own inits.
        adapter_name: the adapter to write (default: the active one).

    Returns:
        Per-layer statistics, one dict per LoRA layer: `layer`, `shape`, `sigma_1` of `-G` (for the
        gradient variants, else None) and the relative update `||s B A||_F / ||W||_F` (None for a
        quantised layer).

    Raises:
        UsageError: a bad setting, a gamma grid instead of one gamma, a LoRA layer without a gradient
            (or with only its SVD for `lora-ga`), a rank larger than a layer.
    """
    check_variant(variant)
    if gamma_grid(gamma, variant) is not None:
        raise UsageError(
            f"init_lora_one takes one gamma, not {gamma!r}: get_lora_one_model searches it for you, or pass "
            "search_gamma(...)['chosen']."
        )
    check_svd(svd)
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
                "with grad_mode='accumulate'."
            )
    return layers, grads


def _top_svds(layers: Mapping, grads: Mapping, svd: str, seed: int, adapter: str) -> dict[str, TopSVD]:
    """Each layer's top-r SVD of its gradient, exactly as `lora_factors_and_spectrum` takes it from `G`
    (a `TopSVD` passes through), so that a gamma search and the init share one SVD."""
    return {name: g if isinstance(g, TopSVD) else top_svd(g.float(), layers[name].r[adapter], svd, seed)
            for name, g in grads.items() if name in layers}


@deprecated_arguments(old_positional=("variant", "grid", "svd", "seed", "adapter_name", "train_step"))
@torch.no_grad()
def search_gamma(
    peft_model: PeftModel,
    gradients: Mapping[str, torch.Tensor | TopSVD],
    batches: list[Mapping],
    *,
    variant: str = "lora-one",
    grid: Sequence[float] | str = "auto",
    svd: str = "randomized",
    seed: int = 0,
    adapter_name: str | None = None,
    train_step: TrainStep | None = None,
) -> dict:
    """The line search of `gamma="auto"`: for each gamma of `grid`, the loss of the step-0 model that
    `init_lora_one` would write (DoRA's magnitude reset too), on `batches`: forward passes only, in eval
    mode, the loss `estimate_gradients` differentiates (the mean over all loss terms, of all ranks).

    The adapter is left as it was found. Warns when the lowest loss lies at an end of the grid, or above
    the loss without a step.

    Args:
        peft_model: the PEFT model whose adapter the search tries (and restores).
        gradients: `{layer name: G or its top-r SVD}`, as for `init_lora_one`.
        batches: the examples the step is judged on: training examples held out from the gradient, as
            `get_lora_one_model` takes them; this rank's own under `torch.distributed`.
        variant: `lora-one` or `spectral`, whose step-0 model moves with gamma.
        grid: `"auto"` (`DEFAULT_GAMMA_GRID`) or the gamma values to try.
        svd: `randomized` or `exact`, the top-r SVD of a full `G` (taken once for the whole grid).
        seed: the seed of the randomised SVD.
        adapter_name: the adapter to try (default: the active one).
        train_step: the loss, as `estimate_gradients` takes it.

    Returns:
        `{"grid", "losses", "loss_without_step", "chosen", "samples", "samples_sha256", "seconds"}`:
        `chosen` has the lowest loss (a non-finite loss, recorded as None, never wins);
        `loss_without_step` is the base model's; `samples` counts the examples over all ranks.

    Raises:
        UsageError: a grid that is one number or a variant gamma does not move, samples with nothing
            to predict, a non-finite loss at every gamma.
    """
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
    caller = 4  # past torch.no_grad's and deprecated_arguments' wrappers
    if len(grid) > 1 and chosen in (grid[0], grid[-1]):
        side = "smallest (the largest step)" if chosen == grid[0] else "largest (the smallest step)"
        warnings.warn(f"gamma search: the lowest loss is at the grid's {side} gamma {chosen:g}; the best gamma may "
                      "lie beyond it: pass a grid that reaches further (gamma=[...]).", stacklevel=caller)
    if without_step is not None and best >= without_step:
        warnings.warn(f"gamma search: no gamma of the grid lowers the loss below the model's without a step "
                      f"({best:.4g} >= {without_step:.4g}).", stacklevel=caller)
    local = torch.tensor([sum(examples_in(b) for b in batches)])
    return {"grid": list(grid), "losses": losses, "loss_without_step": without_step, "chosen": chosen,
            "samples": int(all_reduce_sum(local, device).item()), "samples_sha256": hash_batches(batches),
            "seconds": round(time.perf_counter() - t0, 4)}


def _factors_at_chosen_gamma(peft_model: PeftModel, gradients, config: LoraOneConfig, adapter: str,
                       batches: list[Mapping], train_step: TrainStep | None) -> tuple[list[dict], float, dict | None]:
    """`init_lora_one` at `config.gamma`, or at the gamma `search_gamma` picks on `batches` when it asks for
    a search (one SVD for both). Returns the layer statistics, the gamma used and the search's record."""
    settings = {"variant": config.variant, "svd": config.svd, "seed": config.seed, "adapter_name": adapter}
    if gamma_grid(config.gamma, config.variant) is None:
        return init_lora_one(peft_model, gradients, gamma=config.gamma, **settings), config.gamma, None
    layers, grads = _checked_gradients(peft_model, gradients, config.variant, adapter)
    svds = _top_svds(layers, grads, config.svd, config.seed, adapter)
    search = search_gamma(peft_model, svds, batches, grid=config.gamma, train_step=train_step, **settings)
    return init_lora_one(peft_model, svds, gamma=search["chosen"], **settings), search["chosen"], search


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


def _step0_gradients(peft_model: PeftModel, batches: Iterable[Mapping], adapter: str, **kwargs
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


def init_adapter(peft_model: PeftModel, adapter: str, config: LoraOneConfig, batches: Iterable[Mapping] | None,
                 search_batches: Iterable[Mapping] | None, train_step: TrainStep | None,
                 show_progress_bar: bool) -> dict:
    """The LoRA-One init of `adapter` of a wrapped model, as `get_lora_one_model` and `LoraOneCallback` run
    it: the samples (`init_and_search_samples`; none when `batches` is None), the one-step gradient of its
    LoRA layers (`_step0_gradients`), the factors (`_factors_at_chosen_gamma`). Returns the sidecar's metadata."""
    device = next(peft_model.parameters()).device  # NCCL reduces on the GPU
    searching = gamma_grid(config.gamma, config.variant) is not None
    # taken once, so that the sidecar records exactly the samples of the gradient
    samples, held_out = ([], []) if batches is None else init_and_search_samples(
        batches, config.init_samples, device, searching, search_batches)
    cache = GradientCache(config.grad_cache) if config.grad_cache is not None else None
    t0 = time.perf_counter()
    gradients = None
    if config.variant in NEEDS_GRADIENT:
        gradients = _step0_gradients(
            peft_model, samples, adapter, grad_mode=config.grad_mode, sketch_passes=config.sketch_passes,
            init_samples=None, offload=config.offload, seed=config.seed, grad_cache=cache, train_step=train_step,
            show_progress_bar=show_progress_bar,
        )
    t1 = time.perf_counter()
    stats, gamma, search = _factors_at_chosen_gamma(peft_model, gradients, config, adapter, held_out, train_step)
    svd_seconds = time.perf_counter() - t1 - (search["seconds"] if search else 0.0)
    return _init_metadata(config, gamma, samples, device, t1 - t0, svd_seconds, stats, gamma_search=search,
                         gradient_cache=cache.last if cache else None)


@deprecated_arguments(old_positional=("variant", "gamma", "svd", "seed", "adapter_name", "progress", "grad_mode",
                                      "offload", "sketch_passes", "num_samples", "train_step", "cache_dir",
                                      "search_batches"), into_config=True)
def get_lora_one_model(
    model: nn.Module,
    lora_config: LoraConfig,
    batches: Iterable[Mapping] | None,
    *,
    config: LoraOneConfig | None = None,
    search_batches: Iterable[Mapping] | None = None,
    train_step: TrainStep | None = None,
    adapter_name: str = "default",
    show_progress_bar: bool = True,
) -> PeftModel:
    """Wrap `model` with PEFT, estimate the one-step gradient on `batches`, initialise the adapter.

    PEFT's wrapping decides everything the `LoraConfig` says: which layers (`target_modules` or PEFT's
    default for the architecture, `exclude_modules`, `layers_to_transform`), each layer's r and scale
    (`rank_pattern`, `alpha_pattern`); only those layers take a gradient. Under `torch.distributed`,
    each rank passes its own batches and gets the same adapter. The LoRA-One variants expect
    `use_rslora=True` (the spec's default) and warn without it.

    Args:
        model: any transformers model whose forward returns a `.loss` (or see `train_step`).
        lora_config: PEFT's `LoraConfig`; its `init_lora_weights` is replaced by the init.
        batches: model-input dicts with `labels`, e.g. a DataLoader (shuffling or not) or a generator:
            `config.init_samples` examples are read (over all ranks), and with a gamma search as many
            after them, on which the search judges the step. None for the variants without a gradient
            (`pissa`, `lora`).
        config: the init's settings (`LoraOneConfig`; None: its defaults).
        search_batches: the examples a gamma search judges the step on, instead of those after the init
            samples (`search_batches=batches`: the init samples themselves).
        train_step: `train_step(model, batch) -> loss` replaces `model(**batch).loss`, as in
            `estimate_gradients`.
        adapter_name: the name of the adapter PEFT makes.
        show_progress_bar: print the sample count and show the gradient's progress bar.

    Returns:
        The `PeftModel`, its adapter at LoRA-One's step-0 factors. It carries `lora_one_metadata`
        (what `save_adapter` writes to the sidecar `lora_one.json`).

    Raises:
        UsageError: PEFT cannot wrap the model with `lora_config`, too few examples, a batch without
            labels, a layer the loss never reaches, a gamma search without examples to judge on. On an
            error the model is handed back without LoRA layers.
    """
    config = as_config(config)
    warn_without_rslora(config.variant, lora_config.use_rslora, stacklevel=4)  # the caller, past the decorator
    peft_model = _wrap(model, lora_config, adapter_name, config.seed)
    try:
        _checked_layers(peft_model, adapter_name)  # each layer's own r, before any work
        peft_model.lora_one_metadata = init_adapter(peft_model, adapter_name, config, batches, search_batches,
                                                    train_step, show_progress_bar)
    except BaseException:
        peft_model.unload()  # the model as it came, without LoRA layers
        raise
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


def _init_metadata(config: LoraOneConfig, gamma: float, batches: list[Mapping], device, gradient_seconds: float,
                  svd_seconds: float, stats: list[dict], gamma_search: dict | None = None,
                  gradient_cache: dict | None = None) -> dict:
    """What the sidecar records about an init: the config as given, and what the init made of it
    (`gamma`: the one used, `gamma_search`: `search_gamma`'s record when it chose it; `batches`: this
    rank's init samples, whose counts are summed over the ranks; `gradient_cache`: `GradientCache.last`)."""
    local = torch.tensor([sum(examples_in(b) for b in batches), len(batches)])
    n_samples, n_batches = all_reduce_sum(local, device).tolist()  # over the ranks' shards
    grad_mode = config.grad_mode
    return {
        "config": config.as_json(),
        "variant": config.variant,
        "gamma": gamma,
        "normalisation": NORMALISATION[config.variant],
        "svd": config.svd if grad_mode == "accumulate" else f"{grad_mode} (top-r SVD in the gradient phase)",
        "grad_mode": grad_mode,
        **({"sketch_passes": resolve_sketch_passes(config.sketch_passes, grad_mode)} if grad_mode == "sketch" else {}),
        "world_size": world_size(),
        "seed": config.seed,
        "init_samples": int(n_samples),
        "init_batches": int(n_batches),
        "init_samples_sha256": hash_batches(batches),  # of this rank's shard under torch.distributed
        "base_changed": config.variant in BASE_CHANGING_VARIANTS,
        "gradient_seconds": round(gradient_seconds, 4),
        "svd_seconds": round(svd_seconds, 4),
        **({"gamma_search": gamma_search} if gamma_search else {}),
        **({"gradient_cache": gradient_cache} if gradient_cache else {}),
        "layers": stats,
    }
