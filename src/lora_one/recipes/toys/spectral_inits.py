"""Experiment 3: which inits reach the global minimiser of the linear toy, with GD and preconditioned GD.

The LoRA-One inits and the random init go through the project's front door
`lora_one.core.init.init_lora_one` on a one-layer PEFT model (PEFT's default init for `random`), so the
factors and any base-weight change are exactly what a real run would get. LoRA-GA is the baseline as
its paper defines it (`paper_lora_ga`, ALGORITHM.md's `lora-ga` row), which is what the paper's claim
is about; PEFT 0.21's `lora_ga_init` (the library's `lora-ga` variant) differs, see `paper_lora_ga`.
Training is full-batch GD or preconditioned GD on the factors; the risk is
`0.5 ||W_eff - (W0 + Delta)||_F^2` with the effective weight `base + s B A` (base-changing inits move
the target of `B A` away from `Delta`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from lora_one.recipes.toys.common import (
    DTYPE,
    Adapter,
    Teacher,
    first_step_below,
    generator,
    make_teacher,
    normalised,
    train,
)
from lora_one.recipes.toys.report import Report, optimiser_panels, save

TITLE = "Spectral study: inits x (GD, preconditioned GD) on the linear toy"
FULL = dict(d=100, k=100, n_per_d=16, r=8, steps=100, lr_gd=0.5, lr_prec=0.5, reg=1e-3)
QUICK = dict(d=40, k=40, n_per_d=16, r=8, steps=100, lr_gd=0.5, lr_prec=0.5, reg=1e-3)
SINGULAR_VALUES = normalised([4, 3, 2, 1])
# label -> (init, gamma): an `init_lora_one` variant, or `paper-lora-ga` (`paper_lora_ga`). s = 1
# throughout (lora_alpha = r, no rsLoRA). lora-one at the project's default gamma 128
# (s B A = -G_r / (128 sigma_1), small but aligned); spectral with gamma = 1 starts at s B A = -G_r ~ Delta
# (the theory's init, E[-G] = Delta); lora-one-v1 and lora-ga use gamma 16 (LoRA-GA's stable_gamma default).
INITS = {
    "lora-one": ("lora-one", 128.0),
    "spectral": ("spectral", 1.0),
    "lora-one-v1": ("lora-one-v1", 16.0),
    "lora-ga": ("paper-lora-ga", 16.0),
    "random": ("lora", 1.0),
}
TARGET = 1e-6  # "reaches the global minimiser"
FAR = 100  # "far above": at least this many times TARGET


class _OneLayer(nn.Module):
    def __init__(self, W0: torch.Tensor):
        super().__init__()
        self.proj = nn.Linear(W0.shape[1], W0.shape[0], bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(W0)

    def forward(self, x):
        return self.proj(x)


def front_door_adapter(teacher: Teacher, r: int, variant: str, gamma: float, seed: int) -> Adapter:
    """Initialise a one-layer PEFT model holding `W0` with `init_lora_one`; read factors and base back."""
    from peft import LoraConfig, get_peft_model

    from lora_one.core.init import init_lora_one

    config = LoraConfig(r=r, lora_alpha=r, target_modules=["proj"], init_lora_weights=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(_OneLayer(teacher.W0.float()), config)
    gradients = {"proj": teacher.one_step_gradient().float()}
    init_lora_one(peft_model, gradients, variant=variant, gamma=gamma, svd="exact", seed=seed)
    layer = peft_model.get_base_model().proj
    return Adapter(
        B=layer.lora_B["default"].weight.detach().to(DTYPE),
        A=layer.lora_A["default"].weight.detach().to(DTYPE),
        base=layer.get_base_layer().weight.detach().to(DTYPE),
        scale=float(layer.scaling["default"]),
    )


def paper_lora_ga(G: torch.Tensor, W0: torch.Tensor, r: int, gamma: float) -> Adapter:
    """LoRA-GA as its paper defines it (Wang et al. 2024), with s = 1: for `G = U S V^T`,
    `lora_A = V_{1..r}^T` and `lora_B = U_{r+1..2r}`, unit singular directions each times
    `out^(1/4) / sqrt(gamma)`, on the base `W0 - B A`, so the function is unchanged at step 0.

    PEFT 0.21's `lora_ga_init` (the library's `lora-ga` variant) instead multiplies `lora_B` by the
    singular values `r+1..2r` and puts the whole scale on `lora_B`; where `rank(G) < 2r`, as here, those
    singular values are round-off, its `lora_B` starts near 0 and it no longer shows the paper's failure.
    """
    U, _, Vh = torch.linalg.svd(G)
    scale = G.shape[0] ** 0.25 / gamma**0.5
    B, A = U[:, r : 2 * r] * scale, Vh[:r] * scale
    return Adapter(B=B, A=A, base=W0 - B @ A, scale=1.0)


def run(out: Path, seed: int, quick: bool) -> Report:
    cfg = QUICK if quick else FULL
    d, k, r = cfg["d"], cfg["k"], cfg["r"]
    teacher = make_teacher(d, k, cfg["n_per_d"] * d, SINGULAR_VALUES, generator(seed))
    optimisers = {"GD": (cfg["lr_gd"], None), "preconditioned GD": (cfg["lr_prec"], cfg["reg"])}
    risks: dict[str, dict[str, list[float]]] = {o: {} for o in optimisers}
    init_stats = {}
    for name, (variant, gamma) in tqdm(INITS.items(), desc="spectral", leave=False):
        if variant == "paper-lora-ga":
            start = paper_lora_ga(teacher.one_step_gradient(), teacher.W0, r, gamma)
        else:
            start = front_door_adapter(teacher, r, variant, gamma, seed)
        init_stats[name] = {
            "lora_B_norm": float(start.B.norm()),
            "lora_A_norm": float(start.A.norm()),
            "base_change_norm": float((start.base - teacher.W0).norm()),
        }
        for opt, (lr, reg) in optimisers.items():
            risks[opt][name] = train(teacher, start.copy(), cfg["steps"], lr, reg).risk

    report = Report(
        "spectral",
        TITLE,
        {**cfg, "singular_values": SINGULAR_VALUES,
         "inits": {n: {"variant": v, "gamma": g} for n, (v, g) in INITS.items()},
         "random_init": "PEFT default: lora_A Kaiming-uniform, lora_B = 0",
         "scale_s": 1.0, "seed": seed, "quick": quick, "target_risk": TARGET},
    )
    final = {o: {n: v[-1] for n, v in risks[o].items()} for o in optimisers}
    best = {o: {n: min(v) for n, v in risks[o].items()} for o in optimisers}
    reach = {o: {n: first_step_below(v, TARGET) for n, v in risks[o].items()} for o in optimisers}
    report.data = {"risk": risks, "final_risk": final, "min_risk": best, "steps_to_target": reach,
                   "init_stats": init_stats}
    report.notes.append(
        "lora-ga is the paper's formula (unit singular directions r+1..2r of G for lora_B, 1..r for lora_A, "
        "each times out^(1/4)/sqrt(gamma), base W0 - B A), not PEFT 0.21's lora_ga_init, which scales lora_B "
        f"by the singular values r+1..2r of G: here G has rank {len(SINGULAR_VALUES)} < r = {r}, so those "
        "are round-off and PEFT's version would start at lora_B ~ 0, an aligned init."
    )

    prec = "preconditioned GD"
    report.claim(
        "lora_one_reaches_global_minimiser",
        f"LoRA-One (gamma = {INITS['lora-one'][1]:g}) reaches risk <= {TARGET:g} within {cfg['steps']} "
        "preconditioned GD steps.",
        reach[prec]["lora-one"] is not None,
        steps_to_target=reach[prec]["lora-one"],
        final_risk=final[prec]["lora-one"],
    )
    report.claim(
        "lora_ga_stays_far_above",
        f"LoRA-GA (the paper's formula, gamma 16) stays far above: its lowest risk over {cfg['steps']} "
        f"preconditioned GD steps is >= {FAR} x {TARGET:g}.",
        best[prec]["lora-ga"] >= FAR * TARGET,
        min_risk=best[prec]["lora-ga"],
        final_risk=final[prec]["lora-ga"],
        steps_to_target=reach[prec]["lora-ga"],
        lora_ga_init=init_stats["lora-ga"],
        final_risk_every_init=final,
    )

    panels = {opt: (*optimisers[opt], risks[opt]) for opt in optimisers}
    fig = optimiser_panels(panels, TARGET, f"risk {TARGET:g}", "risk 0.5 ||W_t - W*||_F^2")
    sizes = f"d={d}, N={cfg['n_per_d']}d, r={r}, Delta sv (4,3,2,1)/4"
    save(fig, report, out, "spectral.png", f"{TITLE} ({sizes})")
    return report
