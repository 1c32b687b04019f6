"""LoRA-One: LoRA adapters initialised from the top singular subspace of the one-step full gradient.

    peft_model = get_lora_one_model(model, lora_config, batches, variant="lora-one", gamma=128)
    opt = create_optimizer(peft_model, lr=2e-4, precondition=True)
    ...train...
    save_adapter(peft_model, "out")   # stock PEFT adapter + lora_one.json sidecar
"""

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
