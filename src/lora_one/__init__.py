"""LoRA-One: LoRA adapters initialised from the top singular subspace of the one-step full gradient.

    peft_model = get_lora_one_model(model, lora_config, batches, variant="lora-one", gamma=128)
    opt = create_optimizer(peft_model, lr=2e-4, precondition=True)
    ...train...
    save_adapter(peft_model, "out")   # stock PEFT adapter + lora_one.json sidecar
"""

import logging

# bitsandbytes (which PEFT imports when it is installed) says on every import that an optional Hub kernel
# is missing, its own CPU kernels then serving, and on every 8-bit matmul that its inputs go to float16, as
# int8 matmuls always take them: noise, once per process or per layer call.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)

from lora_one.callback import LoraOneCallback
from lora_one.gradients import estimate_gradients
from lora_one.init import get_lora_one_model, init_lora_one
from lora_one.optim import create_optimizer
from lora_one.save import save_adapter
from lora_one.spectral import VARIANTS

__all__ = [
    "estimate_gradients",
    "init_lora_one",
    "get_lora_one_model",
    "create_optimizer",
    "save_adapter",
    "LoraOneCallback",
    "VARIANTS",
]
