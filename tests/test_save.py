"""Saving through the stock paths (issue 9, section 2): `save_pretrained` and `transformers.Trainer`
on a base-changing variant write the adapter for the ORIGINAL base, and Trainer resumes from its own
checkpoints; the adapter names a base model that loads elsewhere (`base_model_name`)."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from conftest import VOCAB, tiny_llama
from huggingface_hub import ModelCard
from numerics import BUG, assert_same_outputs
from peft import LoraConfig, PeftModel
from tiny_models import one_thread, question_records, sentiment_records, tiny_bert, write_jsonl  # noqa: F401
from tiny_models import tiny_llama as tiny_llama_folder
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from lora_one import LoraOneConfig, get_lora_one_model, save_adapter
from lora_one.cli import main
from lora_one.core.constants import BASE_CHANGING_VARIANTS
from lora_one.core.errors import UsageError

RANK = 4


def rows(n: int = 5, seed: int = 0) -> list[dict]:
    """Causal-LM rows of lengths 6, 9, 12, ...: the first half of each is an unsupervised prompt."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, VOCAB, (6 + 3 * (i % 4),), generator=g)
        labels = ids.clone()
        labels[: len(ids) // 2] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def pad(batch: list[dict]) -> dict:
    width = max(len(r["input_ids"]) for r in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    labels = torch.full((len(batch), width), -100)
    for i, r in enumerate(batch):
        n = len(r["input_ids"])
        ids[i, :n], mask[i, :n], labels[i, :n] = r["input_ids"], 1, r["labels"]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lora_one_model(base, variant: str, data_seed: int = 0):
    config = LoraConfig(r=RANK, lora_alpha=8, use_rslora=True, target_modules="all-linear", task_type="CAUSAL_LM")
    init = [pad(rows(seed=data_seed)[:3]), pad(rows(seed=data_seed)[3:])]
    return get_lora_one_model(copy.deepcopy(base), config, init, show_progress_bar=False,
                              config=LoraOneConfig(variant=variant, gamma=16, init_samples=None))


def trainer(model, out, **settings) -> Trainer:
    """A stock Trainer: 5 rows in batches of 2 (a short last batch), AdamW at a large lr."""
    args = TrainingArguments(str(out), use_cpu=True, report_to=[], bf16=False, learning_rate=1e-2,
                             per_device_train_batch_size=2, logging_steps=1000, disable_tqdm=True,
                             **{"save_strategy": "no", "max_steps": 3, **settings})
    return Trainer(model=model, args=args, train_dataset=rows(), data_collator=pad)


def logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("variant", BASE_CHANGING_VARIANTS)
def test_trainer_save_model_writes_the_adapter_for_the_original_base(variant, tmp_path):
    base, held_out = tiny_llama(), pad(rows(7, seed=9))
    model = lora_one_model(base, variant)
    t = trainer(model, tmp_path / "run")
    t.train()
    with pytest.warns(UserWarning, match=r"ORIGINAL base.*save_adapter.*for_residual_base=True"):
        t.save_model()
    want = logits(model, held_out)
    config = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert config["r"] == 2 * RANK and (tmp_path / "run" / "lora_one.json").is_file()
    assert (tmp_path / "run" / "training_args.bin").is_file()  # the Trainer's own files stay
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "run")
    positions = held_out["input_ids"].shape[1]
    # the original base with a rank-2r adapter against the residual base with the rank-r one: other arithmetic
    assert_same_outputs(logits(loaded, held_out), want, loaded, positions)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning comes once per model
        model.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "run" / "adapter_model.safetensors").read_bytes()

    # The opt-out gives PEFT's own rank-r adapter, which fits the residual base only.
    model.save_pretrained(tmp_path / "residual", for_residual_base=True)
    assert json.loads((tmp_path / "residual" / "adapter_config.json").read_text())["r"] == RANK
    residual = copy.deepcopy(model).unload()
    # the same residual weights and the same adapter, read back bit for bit: the same arithmetic
    assert torch.equal(logits(PeftModel.from_pretrained(residual, tmp_path / "residual"), held_out), want)
    wrong = logits(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "residual"), held_out)
    assert (wrong - want).abs().max() > BUG * want.abs().max()  # what a habitual save used to give: a real error


def test_trainer_resumes_from_its_converted_checkpoint_exactly(tmp_path):
    base = tiny_llama()
    straight = lora_one_model(base, "lora-one-v1")
    with pytest.warns(UserWarning):
        trainer(straight, tmp_path / "a", max_steps=4, save_strategy="steps", save_steps=2).train()
    checkpoint = tmp_path / "a" / "checkpoint-2"
    assert json.loads((checkpoint / "adapter_config.json").read_text())["r"] == 2 * RANK

    resumed = lora_one_model(base, "lora-one-v1")  # the same init, rebuilt as a new process would
    with pytest.warns(UserWarning):
        trainer(resumed, tmp_path / "b", max_steps=4, save_strategy="steps", save_steps=2).train(
            resume_from_checkpoint=str(checkpoint))
    got, want = dict(resumed.named_parameters()), dict(straight.named_parameters())
    assert all(torch.equal(p, want[n]) for n, p in got.items() if p.requires_grad)

    other = lora_one_model(base, "lora-one-v1", data_seed=1)  # another init: its step-0 factors differ
    with pytest.raises(UsageError, match="another init"):
        trainer(other, tmp_path / "c", max_steps=4).train(resume_from_checkpoint=str(checkpoint))


def test_save_pretrained_refuses_what_save_adapter_cannot_do(tmp_path):
    model = lora_one_model(tiny_llama(), "pissa")
    with pytest.raises(UsageError, match=r"safe_serialization.*for_residual_base=True"):
        model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert not (tmp_path / "bin").exists()


@pytest.mark.parametrize("variant", ["lora-one", "pissa"])
def test_save_adapter_names_the_given_base_model(variant, tmp_path):
    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    model = lora_one_model(AutoModelForCausalLM.from_pretrained(base_dir), variant)
    save_adapter(model, tmp_path / "default")
    assert json.loads((tmp_path / "default" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    save_adapter(model, tmp_path / "named", base_model_name="org/tiny-llama")
    config = json.loads((tmp_path / "named" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/tiny-llama"
    assert config["r"] == (2 * RANK if variant in BASE_CHANGING_VARIANTS else RANK)
    assert ModelCard.load(tmp_path / "named" / "README.md").data.base_model == "org/tiny-llama"


def test_cli_base_model_name_for_init_and_finetune(tmp_path):
    """Also the classifier run with pissa that used to crash when it saved, after training."""
    llama, bert = tiny_llama_folder(tmp_path / "llama"), tiny_bert(tmp_path / "bert")
    qa = write_jsonl(tmp_path / "qa.jsonl", question_records(8))
    sent = write_jsonl(tmp_path / "sent.jsonl", sentiment_records(8))
    assert main(["init", "--model", str(llama), "--data", str(qa), "--out", str(tmp_path / "init"), "--rank", "2",
                 "--init-samples", "4", "--base-model-name", "org/llama"]) == 0
    assert main(["finetune", "--model", str(bert), "--data", str(sent), "--out", str(tmp_path / "run"), "--rank", "2",
                 "--init-samples", "4", "--batch-size", "4", "--max-steps", "1", "--quiet", "--variant", "pissa",
                 "--base-model-name", "org/bert"]) == 0
    for out, name in (("init", "org/llama"), ("run", "org/bert")):
        assert json.loads((tmp_path / out / "adapter_config.json").read_text())["base_model_name_or_path"] == name


@pytest.mark.slow
def test_an_alias_is_named_by_its_hub_id(tmp_path):
    """The packaged MiniLM lives in site-packages; the adapter names it by its Hub id."""
    data = write_jsonl(tmp_path / "sent.jsonl", sentiment_records(4))
    assert main(["init", "--model", "minilm-l6", "--data", str(data), "--out", str(tmp_path / "a"), "--rank", "2",
                 "--init-samples", "2", "--target", "query"]) == 0
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
