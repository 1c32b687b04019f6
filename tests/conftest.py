"""Tiny randomly initialised models built in the tests, and the real packaged ones."""

import copy

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

VOCAB = 96


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_bert(seed: int = 0, num_labels: int = 3) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, num_labels=num_labels,
    )
    return BertForSequenceClassification(cfg).eval()


def lm_batches(n: int = 4, length: int = 12, batch_size: int = 1, seed: int = 1) -> list[dict]:
    """Causal-LM batches with a masked 'prompt' half, as the data pipeline makes them."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, length), generator=g)
    labels = ids.clone()
    labels[:, : length // 2] = -100
    return [
        {"input_ids": ids[i : i + batch_size], "labels": labels[i : i + batch_size]}
        for i in range(0, n, batch_size)
    ]


def cls_batches(n: int = 4, length: int = 10, batch_size: int = 2, seed: int = 1, num_labels: int = 3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, length), generator=g)
    labels = torch.randint(0, num_labels, (n,), generator=g)
    return [
        {"input_ids": ids[i : i + batch_size], "attention_mask": torch.ones_like(ids[i : i + batch_size]),
         "labels": labels[i : i + batch_size]}
        for i in range(0, n, batch_size)
    ]


def full_finetuning_gradients(model, batches) -> dict[str, torch.Tensor]:
    """Independent reference: a plain full fine-tuning backward of every parameter, averaged."""
    ref = copy.deepcopy(model)
    ref.train()
    for m in ref.modules():  # dropout off, as for the estimate
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    for p in ref.parameters():
        p.requires_grad_(True)
    ref.zero_grad()
    for b in batches:
        (ref(**b).loss / len(batches)).backward()
    return {n[: -len(".weight")]: p.grad.clone() for n, p in ref.named_parameters() if n.endswith(".weight")}


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def bert():
    return tiny_bert()


@pytest.fixture(scope="session")
def smollm2_dir():
    from lora_one.models import resolve_model_path

    return resolve_model_path("smollm2-135m")  # converted once from the package's GGUF, then cached


@pytest.fixture(scope="session")
def minilm_dir():
    from lora_one.models import resolve_model_path

    return resolve_model_path("minilm-l6")


def save_tiny(path, model, tokenizer_dir):
    """Save a random model beside a real packaged tokenizer, as `--model FOLDER` expects."""
    from transformers import AutoTokenizer

    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_dir):
    """A 2-layer random Llama with SmolLM2's real tokenizer (vocabulary 49,152)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=49152, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        architectures=["LlamaForCausalLM"], eos_token_id=2,
    )
    return save_tiny(tmp_path_factory.mktemp("tiny_llama"), LlamaForCausalLM(cfg), smollm2_dir)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, minilm_dir):
    """A 2-layer random BERT encoder with MiniLM's real tokenizer (vocabulary 30,522)."""
    from transformers import BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=30522, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=128, architectures=["BertModel"],
    )
    return save_tiny(tmp_path_factory.mktemp("tiny_bert"), BertModel(cfg), minilm_dir)
