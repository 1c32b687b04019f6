"""The library's names and defaults: the choices and default values of the init's settings, which the
implementation, `LoraOneConfig` and the command line's settings all read from here. Plain values only,
no imports, so that a settings module can take them without loading torch."""

VARIANTS = ("lora-one", "spectral", "lora-one-v1", "lora-ga", "pissa", "lora")
# Variants whose factors come from the one-step gradient by a formula of ours.
GRADIENT_VARIANTS = ("lora-one", "spectral", "lora-one-v1")
# Variants that take the one-step gradient (lora-ga through PEFT's own implementation).
NEEDS_GRADIENT = (*GRADIENT_VARIANTS, "lora-ga")
# Variants whose step-0 adapter cancels against a modified base weight.
BASE_CHANGING_VARIANTS = ("lora-one-v1", "lora-ga", "pissa")
# The variants whose step-0 model moves with gamma, so that a loss can choose it.
GAMMA_SEARCH_VARIANTS = ("lora-one", "spectral")

GRAD_MODES = ("accumulate", "single-batch", "sketch")
SVDS = ("randomized", "exact")

DEFAULT_GAMMA = 128.0
DEFAULT_GAMMA_GRID = tuple(2.0**k for k in range(3, 14))  # 8, 16, ..., 8192; factor 2 apart; holds 128
DEFAULT_INIT_SAMPLES = 8  # the reference's N
# Sketch passes when none are asked for; what each number of passes costs and gives is measured in
# docs/scaling.md#memory-modes (benchmarks/results/init_cost.txt).
DEFAULT_SKETCH_PASSES = 2
# The preconditioner's damping. The authors' is 1e-6, PEFT's 1e-2; ours was chosen by the quality
# benchmark's levers (docs/benchmark.md).
DEFAULT_PREC_REG = 1e-4
