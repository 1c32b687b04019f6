"""LoraOneCallback in a stock transformers.Trainer and in TRL's SFTTrainer, on a tiny Llama.

Each step-0 adapter is checked against an independent dense reference: a full fine-tuning backward
of the untouched base over exactly the examples the callback drew (each on its own, unpadded), the
summed per-token cross-entropy divided by the token count, then `torch.linalg.svd`.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from callback_worker import BATCH_PER_PROCESS, INIT_SAMPLES, QUIET, lm_rows, lora_model, step0_factors
from datasets import Dataset
from numerics import (
    assert_close_products,
    checked,
    expected_products,
    gradient_tol,
    output_tol,
    products,
    relative_error,
    sum_tol,
)
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file
from tiny_models import LORA, one_thread, tiny_llama_folder, tiny_llama_tokenizer  # noqa: F401 (fixtures)
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    DataCollatorForSeq2Seq,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from lora_one import LoraOneCallback, LoraOneConfig, create_optimizer
from lora_one.core.errors import UsageError
from lora_one.core.targets import lora_layers

HERE = Path(__file__).parent
GAMMA = 16.0


def lm_dataset(tok):
    return Dataset.from_list(lm_rows(tok))


def examples(dataset):
    return [(torch.tensor(r["input_ids"]), torch.tensor(r["labels"])) for r in dataset]


class Recorder:
    """A collator that keeps every batch it makes, tagged with the phase it was made in."""

    def __init__(self, collate):
        self.collate, self.phase, self.batches = collate, "before", []

    def __call__(self, features):
        batch = self.collate(features)
        self.batches.append((self.phase, {k: v.clone() for k, v in batch.items()}))
        return batch

    def examples(self, phase, n=None):
        """The first `n` examples made in `phase`, unpadded: `[(input_ids, labels)]`."""
        out = []
        for tag, b in self.batches:
            if tag == phase:
                for ids, labels, mask in zip(b["input_ids"], b["labels"], b["attention_mask"]):
                    out.append((ids[mask.bool()], labels[mask.bool()]))
        return out[:n]


class Probe(TrainerCallback):
    """Sets the recorder's phase; the one after LoraOneCallback keeps the step-0 factors, the optimizer's
    state and the loss over `examples` at step 0."""

    def __init__(self, recorder, phase, examples=None):
        self.recorder, self.phase, self.examples = recorder, phase, examples

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.recorder.phase = self.phase
        self.rng = torch.get_rng_state()
        self.factors = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        self.optimizer_state = len(optimizer.state)
        if self.examples:
            with torch.no_grad():
                self.start_loss = float(token_loss(model, self.examples))


class ProbeAfter(Probe):
    """The same, as a class of its own: a Trainer warns about two callbacks of one class."""


def token_loss(model, examples, label_smoothing=0.0):
    """(Sum of the per-token cross-entropies of `examples`, each run on its own) / (their label tokens)."""
    total, count = 0.0, 0
    for ids, labels in examples:
        logits = model(input_ids=ids[None]).logits[0, :-1]
        target = labels[1:]
        total = total + F.cross_entropy(logits, target, ignore_index=-100, reduction="sum",
                                        label_smoothing=label_smoothing)
        count += int((target != -100).sum())
    return total / count


def reference_gradients(base_dir, examples, label_smoothing=0.0):
    """d token_loss / dW of every weight of the untouched base: a plain full fine-tuning backward."""
    ref = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float64).train()  # float64: tests/numerics.py
    token_loss(ref, examples, label_smoothing).backward()
    return {n.removesuffix(".weight"): p.grad for n, p in ref.named_parameters()}


def assert_step0(base_dir, factors, drawn, want=None, gamma=GAMMA, **reference):
    """The step-0 `B @ A` of every layer is lora-one's formula for the float64 reference gradient of the
    drawn examples (or equals `want`, another float32 computation of it), to float32 round-off."""
    examples = [{"input_ids": ids, "labels": labels} for ids, labels in drawn]
    rel = gradient_tol(AutoConfig.from_pretrained(base_dir), examples)
    gradients = reference_gradients(base_dir, drawn, **reference)
    assert_close_products(products(factors), gradients, LORA["r"], gamma, rel, want=want)


def train_stock(base_dir, tok, out, callback, steps=10, lr=1e-2, model=None, **kwargs):
    """A stock Trainer over ragged examples in batches of 3 (an init of 5 examples ends on a sliced batch)."""
    recorder = Recorder(DataCollatorForSeq2Seq(tok, padding=True))
    dataset = lm_dataset(tok)
    probes = [Probe(recorder, "init"), ProbeAfter(recorder, "train", examples(dataset))]
    callbacks = [probes[0], callback, probes[1]] if callback else probes
    args = TrainingArguments(str(out), per_device_train_batch_size=3, max_steps=steps, learning_rate=lr,
                             save_strategy=kwargs.pop("save_strategy", "no"), **QUIET, **kwargs.pop("args", {}))
    trainer = Trainer(model=model or lora_model(base_dir), args=args, train_dataset=dataset,
                          data_collator=recorder, callbacks=callbacks, **kwargs)
    return trainer, recorder, *probes


@pytest.fixture(scope="module")
def stock_run(base_dir, tok, tmp_path_factory):
    callback = LoraOneCallback(config=LoraOneConfig(init_samples=5, gamma=GAMMA))
    trainer, recorder, before, after = train_stock(base_dir, tok, tmp_path_factory.mktemp("stock"), callback)
    trainer.train()
    return trainer, recorder, before, after, callback


def test_stock_trainer_step0_is_the_formula_for_the_drawn_samples(stock_run, base_dir):
    trainer, recorder, _, probe, _ = stock_run
    drawn = recorder.examples("init", 5)
    assert len(drawn) == 5
    assert_step0(base_dir, probe.factors, drawn)
    assert probe.optimizer_state == 0  # the init wrote the factors before the optimizer held any state


def test_stock_trainer_loss_falls_and_training_sees_what_it_would_without_the_init(stock_run, base_dir, tok, tmp_path):
    trainer, recorder, before, after, _ = stock_run
    with torch.no_grad():
        final_loss = float(token_loss(trainer.model, after.examples))
    assert final_loss < after.start_loss - 0.05, (after.start_loss, final_loss)  # ten steps at lr 1e-2
    plain, plain_recorder, _, plain_after = train_stock(base_dir, tok, tmp_path, None, steps=10)
    plain.train()
    assert after.start_loss < plain_after.start_loss - 0.1  # LoRA-One's step 0 is already a descent step
    # drawing from the Trainer's dataloader left the global RNG and the training batches as they were
    assert torch.equal(before.rng, after.rng)
    train_batches = [b for tag, b in recorder.batches if tag == "train"]
    plain_batches = [b for tag, b in plain_recorder.batches if tag == "train"]
    assert len(train_batches) == len(plain_batches) >= 10
    for b, c in zip(train_batches, plain_batches):
        assert all(torch.equal(b[k], c[k]) for k in b)
    # the init drew the first examples of the epoch: those training starts with
    drawn, first_trained = recorder.examples("init", 5), recorder.examples("train", 5)
    assert [x.tolist() for x, _ in drawn] == [x.tolist() for x, _ in first_trained]


def test_save_model_loads_with_stock_peft_and_has_the_sidecar(stock_run, base_dir):
    trainer = stock_run[0]
    trainer.save_model()
    out = Path(trainer.args.output_dir)
    meta = json.loads((out / "lora_one.json").read_text())
    assert meta["variant"] == "lora-one" and meta["gamma"] == GAMMA and meta["init_samples"] == 5
    assert len(meta["layers"]) == len(lora_layers(trainer.model)) and meta["seed"] == 0
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), out)
    ids = torch.tensor([[5, 9, 12, 7, 30, 2]])
    trained = trainer.model.eval()
    with torch.no_grad():
        assert torch.equal(loaded.eval()(input_ids=ids).logits, trained(input_ids=ids).logits)  # same weights, same sums
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)(input_ids=ids).logits
        assert not torch.allclose(base, trained(input_ids=ids).logits, atol=1e-3)  # training did change it


def test_bound_trainer_takes_the_gradient_of_its_own_loss(base_dir, tok, tmp_path):
    """With label smoothing (0.3) the Trainer's loss is not the model's: bind() makes G follow the Trainer's."""
    callback = LoraOneCallback(config=LoraOneConfig(init_samples=5, gamma=GAMMA))
    trainer, recorder, _, after = train_stock(base_dir, tok, tmp_path, callback, steps=1,
                                              args={"label_smoothing_factor": 0.3})
    callback.bind(trainer)
    trainer.train()
    drawn = recorder.examples("init", 5)
    layers = lora_layers(trainer.model)
    assert_step0(base_dir, after.factors, drawn, label_smoothing=0.3)
    expected = expected_products(reference_gradients(base_dir, drawn, label_smoothing=0.3), layers, LORA["r"], GAMMA)
    unsmoothed = expected_products(reference_gradients(base_dir, drawn), layers, LORA["r"], GAMMA)
    # the smoothing moves the step by more than the 1% every bound leaves visible
    assert max(float((unsmoothed[n] - expected[n]).norm() / expected[n].norm()) for n in layers) > 1e-2


def test_gamma_search_and_gradient_cache_in_a_trainer(base_dir, tok, tmp_path):
    """gamma=[...] takes the gradient on the first 5 drawn examples and searches on the next 5: the factors
    are the formula's at the chosen gamma; each recorded loss is the hand-written token loss on the next 5
    of the step-0 model at that gamma (lora-one's factors scale as gamma^-1/2), and the chosen gamma has the
    lowest. A second Trainer with the same cache_dir reads the gradient (no backward) and starts from the
    same factors bit for bit."""
    grid, runs = [1.0, 4.0, 16.0, 64.0], []
    for run in ("first", "second"):
        callback = LoraOneCallback(config=LoraOneConfig(init_samples=5, gamma=grid, grad_cache=tmp_path / "cache"))
        trainer, recorder, _, after = train_stock(base_dir, tok, tmp_path / run, callback, steps=1)
        trainer.train()
        runs.append((callback.metadata, after.factors, recorder.examples("init", 10)))
    (meta, factors, drawn), (meta2, factors2, _) = runs
    assert len(drawn) == 10
    assert (meta["gradient_cache"]["hit"], meta2["gradient_cache"]["hit"]) == (False, True)
    assert factors.keys() == factors2.keys() and all(torch.equal(factors[k], factors2[k]) for k in factors)
    assert_step0(base_dir, factors, drawn[:5], gamma=meta["gamma"])
    expected = []
    for gamma in grid:
        model = lora_model(base_dir)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.copy_(factors[n] * (meta["gamma"] / gamma) ** 0.5)
            expected.append(float(token_loss(model.eval(), drawn[5:])))
    search = meta["gamma_search"]
    tokens = sum(int((labels[1:] != -100).sum()) for _, labels in drawn[5:])
    positions = max(len(ids) for ids, _ in drawn[5:])
    # two float32 evaluations of one loss (batched and padded, or one example at a time), and the scaled factors
    rel = 2 * output_tol(AutoConfig.from_pretrained(base_dir), positions, tokens) + sum_tol(2)
    assert search["losses"] == pytest.approx(expected, rel=rel)
    assert search["chosen"] == meta["gamma"] == grid[expected.index(min(expected))]


def test_sft_trainer_with_peft_config(base_dir, tok, tmp_path):
    from trl import SFTConfig, SFTTrainer

    callback = LoraOneCallback(config=LoraOneConfig(init_samples=5, gamma=GAMMA))
    data = Dataset.from_list([{"prompt": tok.decode(r["input_ids"][: r["labels"].count(-100)]),
                               "completion": " " + tok.decode(r["input_ids"][r["labels"].count(-100):-1])}
                              for r in lm_rows(tok)])
    args = SFTConfig(str(tmp_path), per_device_train_batch_size=3, max_steps=10, learning_rate=1e-2,
                     save_strategy="no", **QUIET)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), args=args,
                         train_dataset=data, processing_class=tok, peft_config=LoraConfig(**LORA),
                         callbacks=[callback])
    trainer.data_collator = recorder = Recorder(trainer.data_collator)
    after = ProbeAfter(recorder, "train", examples(lm_dataset(tok)))
    trainer.add_callback(after)
    recorder.phase = "init"
    trainer.train()
    drawn = recorder.examples("init", 5)
    rows = {tuple(r["input_ids"]): r["labels"] for r in lm_rows(tok)}  # TRL masked the prompts as we do
    assert all(rows[tuple(ids.tolist())] == labels.tolist() for ids, labels in drawn) and len(drawn) == 5
    assert_step0(base_dir, after.factors, drawn)
    with torch.no_grad():
        assert float(token_loss(trainer.model, after.examples)) < after.start_loss - 0.05


def test_resume_keeps_the_checkpoint_factors_and_ends_as_an_uninterrupted_run(base_dir, tok, tmp_path):
    first = LoraOneCallback(config=LoraOneConfig(init_samples=5, gamma=GAMMA))
    whole, _, _, _ = train_stock(base_dir, tok, tmp_path / "whole", first, steps=6, save_strategy="steps",
                                 args={"save_steps": 3})
    whole.train()
    for step in (3, 6):
        meta = json.loads((tmp_path / "whole" / f"checkpoint-{step}" / "lora_one.json").read_text())
        assert {k: v for k, v in meta.items() if not k.endswith("_version")} == first.metadata
    checkpoint = tmp_path / "whole" / "checkpoint-3"
    again = LoraOneCallback(config=LoraOneConfig(init_samples=5, gamma=GAMMA))
    resumed, recorder, _, after = train_stock(base_dir, tok, tmp_path / "resumed", again, steps=6,
                                              save_strategy="steps", args={"save_steps": 3})
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert not any(tag == "init" for tag, _ in recorder.batches)  # nothing drawn, nothing re-initialised
    saved = load_file(checkpoint / "adapter_model.safetensors")
    at_start = {n.replace(".default.", "."): v for n, v in after.factors.items()}
    assert at_start.keys() == saved.keys() and all(torch.equal(at_start[n], saved[n]) for n in saved)
    final = {n: p for n, p in resumed.model.named_parameters() if "lora_" in n}
    for n, p in whole.model.named_parameters():
        if "lora_" in n:
            assert torch.equal(final[n], p), n  # the same steps on the same restored state
    assert again.metadata == first.metadata  # from the checkpoint's trainer_state.json
    resumed_meta = json.loads((tmp_path / "resumed" / "checkpoint-6" / "lora_one.json").read_text())
    assert resumed_meta["layers"] == first.metadata["layers"]


@pytest.mark.parametrize("route", ["optimizers", "optimizer_cls_and_kwargs"])
def test_preconditioner_plugs_in_and_preconditions_the_initialised_factors(base_dir, tok, tmp_path, route):
    class Grads(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if state.global_step == 0:
                self.raw = {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}

        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            if state.global_step == 0:  # PEFT's optimizer preconditions the .grad in place
                self.used = {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}

    reg, lr = 1e-6, 1e-2
    settings = {"lr": lr, "precondition": True, "reg": reg, "weight_decay": 0.0}
    model, grads = lora_model(base_dir), Grads()
    if route == "optimizers":
        hook = {"optimizers": (create_optimizer(model, **settings), None)}
    else:  # not an Optimizer class, so a factory: the Trainer calls create_optimizer(its model, **settings)
        hook = {"optimizer_cls_and_kwargs": (lambda: create_optimizer, settings)}
    callback = LoraOneCallback(config=LoraOneConfig(init_samples=5, gamma=GAMMA))
    trainer, _, _, after = train_stock(base_dir, tok, tmp_path, callback, steps=2, lr=lr, model=model, **hook)
    trainer.add_callback(grads)
    trainer.train()
    for n, a0 in after.factors.items():
        if ".lora_A." in n:
            b = n.replace(".lora_A.", ".lora_B.")
            A, B = a0.double(), after.factors[b].double()
            eye = torch.eye(A.shape[0], dtype=torch.float64)
            gram_B, gram_A = B.T @ B + reg * eye, A @ A.T + reg * eye
            want_a = torch.linalg.solve(gram_B, grads.raw[n].double())
            want_b = torch.linalg.solve(gram_A, grads.raw[b].double().T).T
            for got, want, gram in ((grads.used[n], want_a, gram_B), (grads.used[b], want_b, gram_A)):
                # a float32 gram (a sum over the out or in features) and an r x r solve: the round-off of
                # those sums, amplified by the gram's condition number
                tol = checked(float(torch.linalg.cond(gram)) * sum_tol(max(B.shape[0], A.shape[1]) + A.shape[0]))
                assert relative_error(got, want) <= tol, n
            assert float((grads.raw[n] - want_a).norm() / want_a.norm()) > 0.5  # it did precondition


def test_activation_checkpointing_gives_the_same_init(stock_run, base_dir, tok, tmp_path):
    """The Trainer turns checkpointing on before on_train_begin; the init runs through it unchanged."""
    callback = LoraOneCallback(config=LoraOneConfig(init_samples=5, gamma=GAMMA))
    trainer, _, _, after = train_stock(base_dir, tok, tmp_path, callback, steps=1)
    trainer.args.activation_checkpointing = True
    mlp, grad_calls = trainer.model.get_base_model().model.layers[0].mlp, []
    forward = mlp.forward  # counted on the instance: checkpointing replays forward without module hooks

    def counted(*args, **kwargs):
        grad_calls.append(torch.is_grad_enabled())
        return forward(*args, **kwargs)

    mlp.forward = counted
    trainer.train()
    assert sum(grad_calls) == 2 * (2 + 1)  # the init's two batches and the one step, each run twice
    got, want = after.factors, stock_run[3].factors
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)  # recomputed, not changed


def test_two_processes_give_the_one_process_init(base_dir, tmp_path):
    """torchrun, 2 gloo processes: each rank draws its share from its own shard of the Trainer's data."""
    env = {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "callback_worker.py"), str(base_dir), str(tmp_path)]
    done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one, drawn = step0_factors(base_dir, tmp_path / "one", BATCH_PER_PROCESS)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    key = lambda examples: sorted(tuple(ids.tolist()) for ids, _ in examples)  # noqa: E731
    # what each process collated before the first step, less the batch its dataloader fetched ahead
    drawn, share = drawn[:INIT_SAMPLES], INIT_SAMPLES // 2
    assert key(ranks[0]["drawn"][:share] + ranks[1]["drawn"][:share]) == key(drawn)
    for rank in ranks:  # each within two float32 gradients' round-off of the one-process init
        assert_step0(base_dir, rank["factors"], drawn, want=products(one))
    meta = json.loads((tmp_path / "adapter" / "lora_one.json").read_text())  # written once, by rank 0
    assert meta["world_size"] == 2 and meta["init_samples"] == INIT_SAMPLES


@pytest.mark.parametrize("variant", ["lora-one-v1", "lora-ga", "pissa"])
def test_base_changing_variants_are_refused_with_the_route_for_them(variant):
    with pytest.raises(UsageError, match=r"get_lora_one_model\(.*save_adapter\("):
        LoraOneCallback(config=LoraOneConfig(variant=variant))


def test_a_model_without_lora_is_refused(base_dir, tok, tmp_path):
    args = TrainingArguments(str(tmp_path), max_steps=1, save_strategy="no", **QUIET)
    trainer = Trainer(model=AutoModelForCausalLM.from_pretrained(base_dir), args=args, train_dataset=lm_dataset(tok),
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True), callbacks=[LoraOneCallback()])
    with pytest.raises(UsageError, match="peft_config=.*get_peft_model"):
        trainer.train()


def test_a_second_train_call_continues_from_the_trained_factors(base_dir, tok, tmp_path):
    trainer, recorder, _, after = train_stock(base_dir, tok, tmp_path,
                                              LoraOneCallback(config=LoraOneConfig(init_samples=5, gamma=GAMMA)),
                                              steps=2)
    trainer.train()
    trained = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    recorder.batches.clear()
    trainer.train()
    assert all(torch.equal(after.factors[n], trained[n]) for n in trained)
    assert not any(tag == "init" for tag, _ in recorder.batches)
