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


def ragged_examples(lengths=(5, 9, 14, 7), seed: int = 1, task: str = "causal", num_labels: int = 3) -> list[dict]:
    """Unpadded examples of the given lengths: 1-D `input_ids`, and `labels` that mask a prompt of
    about a third of each (causal, seq2seq: a target of its own, shorter, ragged length) or one class."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, VOCAB, (n,), generator=g)
        if task == "causal":
            labels = ids.clone()
            labels[: n // 3 + 1] = -100
        elif task == "seq2seq":
            labels = torch.randint(3, VOCAB, (n // 2 + 1,), generator=g)
        else:
            labels = torch.randint(0, num_labels, (), generator=g)
        out.append({"input_ids": ids, "labels": labels})
    return out


def padded_batches(examples: list[dict], batch_size: int, pad_id: int = 0) -> list[dict]:
    """Right-padded micro-batches (the last one short) with an attention mask; token labels padded with -100."""
    batches = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        width = max(len(e["input_ids"]) for e in chunk)
        ids = torch.full((len(chunk), width), pad_id)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, e in enumerate(chunk):
            ids[j, : len(e["input_ids"])] = e["input_ids"]
            mask[j, : len(e["input_ids"])] = 1
        if chunk[0]["labels"].ndim:
            lwidth = max(len(e["labels"]) for e in chunk)
            labels = torch.full((len(chunk), lwidth), -100)
            for j, e in enumerate(chunk):
                labels[j, : len(e["labels"])] = e["labels"]
        else:
            labels = torch.stack([e["labels"] for e in chunk])
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def full_finetuning_gradients(model, examples, task: str = "causal", loss_fn=None) -> dict[str, torch.Tensor]:
    """Independent reference: the gradient of one full-batch step of full fine-tuning over `examples`
    (unpadded, as `ragged_examples` makes them), written out by hand: a copy with every parameter
    trainable, in eval mode (no dropout of any kind), each example's logits without padding, the
    cross-entropy summed over every supervised term of all examples (a causal LM predicts label t + 1
    at position t; a seq2seq model and a classifier predict their labels as they are) and divided by
    the number of those terms.
    `loss_fn(model, example) -> (loss summed over the example's terms, their number)` replaces it.
    Right-padded batches are taken apart into their examples first. In float64, so that the float32
    work it checks is measured against (nearly) exact values (tests/numerics.py)."""
    ref = copy.deepcopy(model).double().eval()
    for p in ref.parameters():
        p.requires_grad_(True)
    ref.zero_grad()
    total, count = 0.0, 0
    for e in _unpadded(examples):
        part, n = loss_fn(ref, e) if loss_fn else _summed_cross_entropy(ref, e, task)
        total, count = total + part, count + n
    (total / count).backward()
    return {n[: -len(".weight")]: p.grad.clone() for n, p in ref.named_parameters() if n.endswith(".weight")}


def _unpadded(items):
    """Examples as given (1-D `input_ids`), or the rows of right-padded batches, cut to their length."""
    for item in items:
        ids = item["input_ids"]
        if ids.ndim == 1:
            yield item
            continue
        mask = item.get("attention_mask", torch.ones_like(ids))
        for i, n in enumerate(mask.sum(1).tolist()):
            labels = item["labels"][i]
            yield {"input_ids": ids[i, :n], "labels": labels[:n] if labels.ndim else labels}


def _summed_cross_entropy(model, example, task: str):
    ids, labels = example["input_ids"][None], example["labels"]
    if task == "causal":
        logits, labels = model(input_ids=ids).logits[0, :-1], labels[1:]
    elif task == "seq2seq":  # T5's decoder input: the start token, then the labels but the last
        start = torch.tensor([model.config.decoder_start_token_id])
        logits = model(input_ids=ids, decoder_input_ids=torch.cat([start, labels[:-1]])[None]).logits[0]
    else:
        logits, labels = model(input_ids=ids).logits, labels.reshape(1)
    keep = labels != -100
    return torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum"), int(keep.sum())


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def bert():
    return tiny_bert()


@pytest.fixture(scope="session")
def smollm2_dir():
    from lora_one.recipes.models import resolve_model_path

    return resolve_model_path("smollm2-135m")  # converted once from the package's GGUF, then cached


@pytest.fixture(scope="session")
def minilm_dir():
    from lora_one.recipes.models import resolve_model_path

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


def pytest_collection_modifyitems(items):
    """`numerics`: the tests of a module that bounds float round-off with tests/numerics.py, which CI runs
    a second time under other CPU kernels."""
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and any(getattr(v, "__module__", None) == "numerics" for v in vars(module).values()):
            item.add_marker(pytest.mark.numerics)
