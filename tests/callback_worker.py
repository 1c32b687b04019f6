"""A stock Trainer with LoraOneCallback; run under `torchrun --nproc_per_node 2` (tests/test_callback.py
compares each rank's step-0 factors with one process calling `step0_factors` directly)."""

import sys
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from tiny_models import LORA, TYPES, question_records
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from lora_one import LoraOneCallback, LoraOneConfig

# Each of 2 ranks draws its first batch of 2 from its own shard: together the examples that one process
# with batches of 2 draws from its first two batches.
INIT_SAMPLES, BATCH_PER_PROCESS = 4, 2
# the quiet CPU Trainer of test_callback.py too
QUIET = {"bf16": False, "activation_checkpointing": False, "use_cpu": True, "report_to": [],
         "dataloader_num_workers": 0, "disable_tqdm": True, "logging_steps": 1, "seed": 0}


def lora_model(base_dir: Path):
    return get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), LoraConfig(**LORA))


def lm_rows(tok, n: int = 40) -> list[dict]:
    """Question -> its type, repeated once per word of the question's body, so that the number of
    label tokens varies from example to example (2 to 5 plus the end token); the prompt is masked."""
    rows = []
    for r in question_records(n):
        body = r["prompt"].split()[3:-3]  # "question : WH ... ? type :"
        prompt = tok(r["prompt"])["input_ids"]
        answer = tok(" " + " ".join([TYPES[r["prompt"].split()[2]]] * len(body)))["input_ids"] + [tok.eos_token_id]
        rows.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    return rows


class Step0(TrainerCallback):
    """After LoraOneCallback: keeps the step-0 factors and the examples the init drew (the batches
    collated so far), unpadded, as `(input_ids, labels)`."""

    def __init__(self, collate):
        self.batches = []
        self.collate = lambda features: self.batches.append(collate(features)) or self.batches[-1]

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.factors = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        self.drawn = [(ids[mask.bool()], labels[mask.bool()]) for b in self.batches
                      for ids, labels, mask in zip(b["input_ids"], b["labels"], b["attention_mask"])]


def step0_factors(base_dir: Path, out: Path, batch_size: int) -> tuple[dict, list]:
    """The adapter after LoraOneCallback's init, before the first step, and the examples this process
    drew for it; the Trainer then takes one step and saves the model (with the sidecar) into `out`."""
    tok = AutoTokenizer.from_pretrained(base_dir)
    probe = Step0(DataCollatorForSeq2Seq(tok, padding=True))
    args = TrainingArguments(str(out), per_device_train_batch_size=batch_size, max_steps=1, learning_rate=1e-2,
                             save_strategy="no", **QUIET)
    trainer = Trainer(model=lora_model(base_dir), args=args, train_dataset=Dataset.from_list(lm_rows(tok)),
                      data_collator=probe.collate,
                      callbacks=[LoraOneCallback(config=LoraOneConfig(init_samples=INIT_SAMPLES, gamma=16.0)), probe])
    trainer.train()
    trainer.save_model()
    return probe.factors, probe.drawn


if __name__ == "__main__":
    import torch.distributed as dist

    base, out = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    factors, drawn = step0_factors(base, out / "adapter", BATCH_PER_PROCESS)
    torch.save({"factors": factors, "drawn": drawn}, out / f"rank{dist.get_rank()}.pt")
