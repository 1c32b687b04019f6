"""The library: the init's settings (`config`, `constants`), the one-step gradient (`gradients`,
`gradcache`, `parallel`), the init (`init`, `targets`), the optimizer (`optim`), saving (`save`, `files`),
the Trainer callback (`callback`), the old argument spellings (`deprecation`) and `errors`. It imports
torch, transformers, peft and safetensors (and what they require), never a recipe; `lora_one` re-exports
its public names. Nothing is imported here: `linalg` imports `core.errors` and `core.constants`."""
