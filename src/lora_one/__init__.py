"""LoRA-One: LoRA adapters initialised from the top singular subspace of the one-step full gradient.

    peft_model = get_lora_one_model(model, lora_config, batches, config=LoraOneConfig(gamma=128))
    opt = create_optimizer(peft_model, lr=2e-4, precondition=True)
    ...train...
    save_adapter(peft_model, "out")   # stock PEFT adapter + lora_one.json sidecar

The package's layers, each importing only those below it: `lora_one.linalg` (tensors in, tensors out),
`lora_one.core` (the library re-exported here; torch, transformers, peft and safetensors are all it
imports), `lora_one.recipes` (data, models, fine-tuning, comparison, the toys: the `cli` extra's
packages) and `lora_one.cli` (the `lora-one` command). The names below are the stable API; the
modules' paths may move.
"""

import logging
import importlib.metadata

# `import peft` imports bitsandbytes when it is installed (peft/helpers.py), whose import fetches an optional
# CPU kernel from the Hub through `kernels` and warns when it cannot (offline, untrusted), its own kernels then
# serving. The kernel serves only weights repacked for inference, which lora-one never makes
# (`recipes.models._keep_4bit_layers_differentiable`), so those warnings are muted while PEFT is imported, and
# the loggers' levels restored after.
_muted = {name: logging.getLogger(name).level for name in ("kernels", "bitsandbytes.backends.cpu.ops")}
for _name in _muted:
    logging.getLogger(_name).setLevel(logging.ERROR)
try:
    import peft  # noqa: F401
finally:
    for _name, _level in _muted.items():
        logging.getLogger(_name).setLevel(_level)
    del _muted, _name, _level

from lora_one.core.callback import LoraOneCallback
from lora_one.core.config import LoraOneConfig
from lora_one.core.constants import DEFAULT_GAMMA_GRID, VARIANTS
from lora_one.core.errors import UsageError
from lora_one.core.gradients import estimate_gradients
from lora_one.core.init import get_lora_one_model, init_lora_one, search_gamma
from lora_one.core.optim import create_optimizer
from lora_one.core.save import save_adapter

__version__ = importlib.metadata.version("lora-one")

__all__ = [
    "__version__",
    "LoraOneConfig",
    "estimate_gradients",
    "init_lora_one",
    "get_lora_one_model",
    "search_gamma",
    "DEFAULT_GAMMA_GRID",
    "create_optimizer",
    "save_adapter",
    "LoraOneCallback",
    "UsageError",
    "VARIANTS",
]
