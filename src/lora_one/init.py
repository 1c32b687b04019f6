"""Step 2 of LoRA-One: write the LoRA factors of a PEFT model from the one-step gradients.

The two-phase API follows PEFT's data-driven inits: `estimate_gradients` (step 1), then
`init_lora_one` (step 2); `get_lora_one_model` does both. `lora-ga` and `pissa` run PEFT's own
implementations behind the same front door; `lora` is PEFT's default init.
"""

from __future__ import annotations

import copy
import hashlib
import time
import warnings
from collections.abc import Iterable, Mapping

import torch
from peft import LoraConfig, LoraGAConfig, PeftModel, get_peft_model
from peft.utils.integrations import dequantize_module_weight
from torch import nn

from lora_one.errors import UsageError
from lora_one.gradients import (
    DEFAULT_NUM_SAMPLES,
    DEFAULT_SKETCH_PASSES,
    TrainStep,
    estimate_gradients,
    examples_in,
    init_samples,
)
from lora_one.parallel import all_reduce_sum, world_size
from lora_one.save import guard_original_base
from lora_one.spectral import (
    BASE_CHANGING_VARIANTS,
    GRADIENT_VARIANTS,
    VARIANTS,
    TopSVD,
    check_rank,
    lora_factors_and_spectrum,
)
from lora_one.targets import find_target_linears, lora_layers

NEEDS_GRADIENT = GRADIENT_VARIANTS + ("lora-ga",)
NORMALISATION = {
    "lora-one": "1 / (gamma * sigma_1)",
    "spectral": "1 / gamma",
    "lora-one-v1": "out**0.25 / sqrt(gamma) per factor",
    "lora-ga": "PEFT LoraGAConfig(scale='stable', stable_gamma=gamma)",
    "pissa": "PEFT pissa",
    "lora": "PEFT default",
}


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
    variants) and the relative update `||s B A||_F / ||W||_F`.
    """
    check_variant(variant)
    adapter = adapter_name or peft_model.active_adapter
    layers = lora_layers(peft_model)
    if not layers:
        raise UsageError("The model has no LoRA layers; wrap it with peft.get_peft_model first.")
    grads = {_normalise_name(k): v for k, v in (gradients or {}).items()}
    for name, layer in layers.items():  # validate everything before touching any weight
        check_rank((layer.out_features, layer.in_features), layer.r[adapter], f"layer {name!r}")
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
    if not gamma > 0:
        raise UsageError(f"gamma must be positive, got {gamma}.")

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
            stats.append(
                {
                    "layer": name,
                    "shape": [layer.out_features, layer.in_features],  # not a packed weight's
                    "sigma_1": sigma_1,
                    "relative_update": float(delta.norm() / base.weight.float().norm()),
                }
            )
    _keep_initial_state(peft_model, adapter, variant)
    return stats


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
    config = copy.deepcopy(lora_config)
    config.init_lora_weights = True  # the saved config must load as a plain LoRA adapter
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, config, adapter_name=adapter_name)


def hash_batches(batches: Iterable[Mapping]) -> str:
    """SHA-256 of the tensors of the init batches, to record which samples made the init."""
    h = hashlib.sha256()
    for batch in batches:
        for key in sorted(batch):
            value = batch[key]
            if isinstance(value, torch.Tensor):
                h.update(key.encode())
                h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def get_lora_one_model(
    model: nn.Module,
    lora_config: LoraConfig,
    batches: Iterable[Mapping] | None,
    variant: str = "lora-one",
    gamma: float = 128.0,
    svd: str = "randomized",
    seed: int = 0,
    adapter_name: str = "default",
    progress: bool = True,
    grad_mode: str = "accumulate",
    offload: bool = False,
    sketch_passes: int | None = None,
    num_samples: int | None = DEFAULT_NUM_SAMPLES,
    train_step: TrainStep | None = None,
) -> PeftModel:
    """Estimate the one-step gradient on `batches`, wrap `model` with PEFT, initialise the adapter.

    The gradient is taken on the plain model before wrapping (LoRA would add nothing at step 0), in
    `grad_mode` (`accumulate`, `single-batch` or `sketch`, see `estimate_gradients`; `sketch_passes` is
    its `passes`, default 2) on `num_samples` examples of `batches` over all ranks (default 8; `None`:
    all of them) and with `train_step`, both as `estimate_gradients` takes them. Under
    `torch.distributed`, each rank passes its own batches and gets the same adapter.
    The returned `PeftModel` carries `lora_one_metadata` (what `save_adapter` writes to the sidecar).
    The LoRA-One variants expect `use_rslora=True` (the spec's default) and warn without it.
    """
    check_variant(variant)
    warn_without_rslora(variant, lora_config.use_rslora, stacklevel=3)
    for name, linear in find_target_linears(model, lora_config.target_modules).items():
        check_rank((linear.out_features, linear.in_features), lora_config.r, f"layer {name!r}")
    device = next(model.parameters()).device  # NCCL reduces on the GPU
    # taken once, so that the sidecar records exactly the samples of the gradient
    batches = init_samples(batches, num_samples, device) if batches is not None else []
    gradients = None
    t0 = time.perf_counter()
    if variant in NEEDS_GRADIENT:
        gradients = estimate_gradients(
            model, batches, lora_config.target_modules, progress=progress, mode=grad_mode,
            offload=offload, rank=lora_config.r, seed=seed, passes=sketch_passes, num_samples=None,
            train_step=train_step,
        )
    grad_seconds = time.perf_counter() - t0
    peft_model = _wrap(model, lora_config, adapter_name, seed)
    t1 = time.perf_counter()  # the SVD phase starts after PEFT's wrapping
    stats = init_lora_one(peft_model, gradients, variant, gamma, svd, seed, adapter_name)
    t2 = time.perf_counter()
    peft_model.lora_one_metadata = init_metadata(
        variant, gamma, svd, grad_mode, sketch_passes, seed, batches, device, grad_seconds, t2 - t1, stats
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
                  stats: list[dict]) -> dict:
    """What the sidecar records about an init (`batches`: this rank's init samples; the counts are summed
    over the ranks)."""
    local = torch.tensor([sum(examples_in(b) for b in batches), len(batches)], device=device)
    n_samples, n_batches = all_reduce_sum(local).tolist()  # over the ranks' shards
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
        "layers": stats,
    }

