"""estimate_gradients against an independent full-batch full fine-tuning backward, written out by hand."""

import copy

import pytest
import torch
from conftest import (
    VOCAB,
    full_finetuning_gradients,
    lm_batches,
    padded_batches,
    ragged_examples,
    tiny_bert,
    tiny_llama,
)
from numerics import gradient_tol, relative_error
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader
from transformers import T5Config, T5ForConditionalGeneration

from lora_one import estimate_gradients


def tiny_t5(seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(cfg).eval()


def snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        {n: m.training for n, m in model.named_modules()},
    )


def assert_unchanged(model, snap):
    state, flags, modes = snap
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(p.grad is None for p in model.parameters())


def assert_same_gradients(grads, reference, model, examples):
    """Every layer's gradient equal to the float64 reference's up to the float32 round-off of its chain
    of sums (relative Frobenius error, tests/numerics.py)."""
    tol = gradient_tol(model, examples)
    for name, g in grads.items():
        assert g.dtype == torch.float32 and g.shape == reference[name].shape, name
        rel = relative_error(g, reference[name])
        assert rel <= tol, (name, rel, tol)


@pytest.mark.parametrize(
    "make, task, n_targets",
    [(tiny_llama, "causal", 14), (tiny_bert, "classification", 13), (tiny_t5, "seq2seq", 32)],
)
def test_one_gradient_whatever_the_micro_batch_size(make, task, n_targets):
    """Ragged examples (5, 9, 14, 7 tokens, prompts masked) in micro-batches of 1, in one padded batch
    of 4 and in 3 + 1 (a short last batch) give one gradient: the reference's full-batch step. (The
    old mean of per-batch means was 104% off for the causal LM in micro-batches of 1.)"""
    examples = ragged_examples(task=task)
    model = make()
    model.train()  # the estimate must switch dropout off and restore train mode
    snap = snapshot(model)
    reference = full_finetuning_gradients(model, examples, task)
    for batch_size in (1, 4, 3):
        grads = estimate_gradients(model, padded_batches(examples, batch_size), show_progress_bar=False, init_samples=4)
        assert_unchanged(model, snap)
        assert len(grads) == n_targets  # all-linear: every Linear but the LM head / classifier
        assert "lm_head" not in grads and "classifier" not in grads
        assert_same_gradients(grads, reference, model, examples)


def test_init_samples_reads_only_its_share_of_a_dataloader():
    """A whole DataLoader is not a full-epoch gradient: init_samples=7 of batches of 3 reads three
    batches, the third sliced to one example, and equals the reference over those 7 examples."""
    model, examples = tiny_llama(), ragged_examples(lengths=(5, 9, 14, 7, 6, 11, 8, 4, 10, 12, 5, 9))
    read = []

    def collate(chunk):
        read.append(len(chunk))
        return padded_batches(chunk, len(chunk))[0]

    loader = DataLoader(examples, batch_size=3, collate_fn=collate)
    grads = estimate_gradients(model, loader, show_progress_bar=False, init_samples=7)
    assert read == [3, 3, 3]  # and not the fourth batch
    assert_same_gradients(grads, full_finetuning_gradients(model, examples[:7]), model, examples[:7])
    # None: every example given
    every = estimate_gradients(model, padded_batches(examples[:5], 2), show_progress_bar=False, init_samples=None)
    assert_same_gradients(every, full_finetuning_gradients(model, examples[:5]), model, examples[:5])
    with pytest.raises(ValueError, match="init_samples=13, but the batches hold only 12 examples"):
        estimate_gradients(model, loader, show_progress_bar=False, init_samples=13)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="init_samples must be an integer >= 1, or None"):
            estimate_gradients(model, loader, show_progress_bar=False, init_samples=bad)


def test_default_init_samples_is_the_references_eight(llama, capsys):
    examples = ragged_examples(lengths=(5, 9, 14, 7, 6, 11, 8, 4, 10, 12))
    grads = estimate_gradients(llama, padded_batches(examples, 4), show_progress_bar=True)
    assert_same_gradients(grads, full_finetuning_gradients(llama, examples[:8]), llama, examples[:8])
    # what was used, in one line: 8 samples, their predicted label tokens, 2 micro-batches
    terms = sum(int((e["labels"][1:] != -100).sum()) for e in examples[:8])
    assert f"one-step gradient: 8 samples, {terms} loss terms, 2 micro-batches\n" in capsys.readouterr().out


def test_train_step_gives_the_gradient_of_a_custom_loss(llama):
    """train_step's loss is taken as its batch's mean over the batch's loss terms: label-smoothed
    token cross-entropy (labels counted as for .loss), then a per-example loss on batches without
    labels (one term per example), each in ragged micro-batches of 3 + 1."""
    examples = ragged_examples()

    def smoothed(model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                                 label_smoothing=0.1)

    def smoothed_sum(model, e):
        logits, labels = model(input_ids=e["input_ids"][None]).logits[0, :-1], e["labels"][1:]
        keep = labels != -100
        return (torch.nn.functional.cross_entropy(logits[keep], labels[keep], label_smoothing=0.1, reduction="sum"),
                int(keep.sum()))

    grads = estimate_gradients(llama, padded_batches(examples, 3), show_progress_bar=False, init_samples=4,
                               train_step=smoothed)
    assert_same_gradients(grads, full_finetuning_gradients(llama, examples, loss_fn=smoothed_sum), llama, examples)

    def last_predicts_first(model, batch):  # per example: the last real position predicts token 0
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        last = batch["attention_mask"].sum(1) - 1
        return torch.nn.functional.cross_entropy(logits[torch.arange(len(last)), last], batch["input_ids"][:, 0])

    def last_predicts_first_sum(model, e):
        logits = model(input_ids=e["input_ids"][None]).logits[0, -1]
        return torch.nn.functional.cross_entropy(logits, e["input_ids"][0]), 1

    unlabelled = [{k: v for k, v in b.items() if k != "labels"} for b in padded_batches(examples, 3)]
    grads = estimate_gradients(llama, unlabelled, show_progress_bar=False, init_samples=4,
                               train_step=last_predicts_first)
    assert_same_gradients(grads, full_finetuning_gradients(llama, examples, loss_fn=last_predicts_first_sum), llama,
                          examples)
    with pytest.raises(ValueError, match="train_step returned Tensor .* must return the batch's mean loss as a scalar"):
        estimate_gradients(llama, unlabelled, show_progress_bar=False, init_samples=4,
                           train_step=lambda m, b: m(input_ids=b["input_ids"]).logits.mean(-1))


def test_target_modules_and_pending_grad_untouched(llama):
    examples = ragged_examples()
    w = llama.model.layers[0].self_attn.q_proj.weight
    w.grad = torch.full_like(w, 7.0)  # a user's pending gradient must neither leak in nor vanish
    grads = estimate_gradients(llama, padded_batches(examples, 2), target_modules=["q_proj", "v_proj"],
                               show_progress_bar=False, init_samples=4)
    assert sorted(grads) == sorted(f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj"))
    assert torch.equal(w.grad, torch.full_like(w, 7.0))
    w.grad = None
    assert_same_gradients(grads, full_finetuning_gradients(llama, examples), llama, examples)


def test_peft_model_gives_base_layer_gradients(llama):
    batches = lm_batches()
    plain = estimate_gradients(llama, batches, show_progress_bar=False, init_samples=4)
    peft_model = get_peft_model(copy.deepcopy(llama), LoraConfig(r=2, target_modules="all-linear"))
    snap = snapshot(peft_model)
    wrapped = estimate_gradients(peft_model, batches, show_progress_bar=False, init_samples=4)
    assert_unchanged(peft_model, snap)
    assert sorted(wrapped) == sorted(plain)
    for name in plain:
        torch.testing.assert_close(wrapped[name], plain[name], rtol=1e-5, atol=1e-8)


def test_no_batches(llama):
    with pytest.raises(ValueError, match="No batches"):
        estimate_gradients(llama, [], show_progress_bar=False, init_samples=None)
    with pytest.raises(ValueError, match="init_samples=8, but the batches hold only 0 examples"):
        estimate_gradients(llama, [], show_progress_bar=False)


def test_batch_without_labels(llama):
    batch = {"input_ids": torch.zeros(1, 4, dtype=torch.long)}
    snap = snapshot(llama)
    with pytest.raises(ValueError, match="no 'labels'.* or pass train_step"):
        estimate_gradients(llama, [batch], show_progress_bar=False, init_samples=1)
    assert_unchanged(llama, snap)


def test_nothing_to_predict(llama):
    batch = {"input_ids": torch.ones(2, 4, dtype=torch.long), "labels": torch.full((2, 4), -100)}
    batch["labels"][:, 0] = 5  # the first label is never predicted by a causal LM
    with pytest.raises(ValueError, match="nothing to predict: every label is -100"):
        estimate_gradients(llama, [batch], show_progress_bar=False, init_samples=2)


def test_no_module_matches(llama):
    with pytest.raises(ValueError, match="No nn.Linear layer .* matches"):
        estimate_gradients(llama, lm_batches(), target_modules=["nonexistent_proj"], show_progress_bar=False,
                           init_samples=4)


def test_layer_the_loss_never_reaches(llama):
    llama.model.unused = torch.nn.Linear(32, 32)
    with pytest.raises(ValueError, match="'model.unused' is exactly zero"):
        estimate_gradients(llama, lm_batches(), show_progress_bar=False, init_samples=4)


def test_inf_in_a_gradient(llama):
    def poison(module, grad_input, grad_output):
        return (torch.full_like(grad_input[0], float("inf")),)

    handle = llama.model.layers[1].mlp.register_full_backward_hook(poison)
    with pytest.raises(ValueError, match="contains NaN or Inf"):
        estimate_gradients(llama, lm_batches(), show_progress_bar=False, init_samples=4)
    handle.remove()


def test_nan_loss(llama):
    with torch.no_grad():
        llama.lm_head.weight[3, 0] = float("nan")
    with pytest.raises(ValueError, match="loss of batch 0 is nan"):
        estimate_gradients(llama, lm_batches(), show_progress_bar=False, init_samples=4)


def test_weight_that_cannot_take_a_gradient(llama):
    """A quantised weight: the error names the problem and the fix (sketch mode needs no weight grad)."""
    q = llama.model.layers[0].self_attn.q_proj
    q.weight = torch.nn.Parameter(q.weight.to(torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match="cannot take a gradient") as info:
        estimate_gradients(llama, lm_batches(), show_progress_bar=False, init_samples=4)
    assert "Use grad_mode='sketch'" in str(info.value)


def test_sharded_weights_are_refused(llama):
    """DeepSpeed ZeRO-3 marks its partitioned parameters with `ds_id`; their data is not the weight."""
    llama.model.layers[0].self_attn.q_proj.weight.ds_id = 0
    with pytest.raises(ValueError, match="sharded .FSDP or DeepSpeed ZeRO-3.") as info:
        estimate_gradients(llama, lm_batches(), show_progress_bar=False, grad_mode="sketch", rank=2, init_samples=4)
    assert "torchrun/DDP" in str(info.value)


def test_batches_are_read_once(llama):
    """The samples are read once and kept, even over several sketch passes; a progress bar must not
    start a second iteration (a DataLoader would re-spawn its workers and draw its seed again)."""

    class Counting:
        def __init__(self, batches):
            self.batches, self.iterations = batches, 0

        def __iter__(self):
            self.iterations += 1
            return iter(self.batches)

        def __len__(self):
            return len(self.batches)

    for mode, kwargs in (("accumulate", {}), ("sketch", {"rank": 2, "sketch_passes": 2})):
        batches = Counting(lm_batches())
        estimate_gradients(llama, batches, show_progress_bar=True, grad_mode=mode, init_samples=4, **kwargs)
        assert batches.iterations == 1, mode

