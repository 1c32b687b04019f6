"""`lora-one finetune`, `eval`, `merge` end to end on tiny random models (CPU, seconds each).

Numbers are checked against independent computations: the saved adapter reloaded with stock PEFT
must reproduce the loss the run logged; resumed runs must end bit-identical to uninterrupted ones;
accuracies are recomputed by plain forward passes.
"""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from numerics import BUG, U64, assert_same_outputs, output_tol
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from tiny_models import one_thread, question_records, sentiment_records, tiny_bert, tiny_llama, write_jsonl  # noqa: F401
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

from lora_one.cli import build_parser, main
from lora_one.cli.args import settings_from
from lora_one.core.constants import VARIANTS
from lora_one.recipes.data import collate, prompt_ids, response_ids
from lora_one.recipes.finetune import TrainingInterrupted, run_finetune


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {
        "llama": str(tiny_llama(root / "llama")),
        "bert": str(tiny_bert(root / "bert")),
        "qa": str(write_jsonl(root / "qa.jsonl", question_records(48, seed=0))),
        "qa_eval": str(write_jsonl(root / "qa_eval.jsonl", question_records(12, seed=1))),
        "sent": str(write_jsonl(root / "sent.jsonl", sentiment_records(48, seed=0))),
        "sent_eval": str(write_jsonl(root / "sent_eval.jsonl", sentiment_records(12, seed=1))),
    }


def qa_args(tiny, out, *extra):
    return ["finetune", "--model", tiny["llama"], "--data", tiny["qa"], "--eval-data", tiny["qa_eval"],
            "--out", str(out), "--rank", "4", "--init-samples", "4", "--batch-size", "4", "--quiet", *extra]


def sent_args(tiny, out, *extra):
    return ["finetune", "--model", tiny["bert"], "--data", tiny["sent"], "--eval-data", tiny["sent_eval"],
            "--out", str(out), "--rank", "4", "--init-samples", "4", "--batch-size", "4", "--quiet",
            "--probe-samples", "48", *extra]


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def eval_features(tiny, tokenizer):
    recs = [json.loads(line) for line in open(tiny["qa_eval"])]
    feats = []
    for r in recs:
        p, a = prompt_ids(tokenizer, r["prompt"]), response_ids(tokenizer, r["response"])
        feats.append({"input_ids": p + a, "labels": [-100] * len(p) + a})
    return recs, feats


def plain_loss(model, feats, pad_id):
    """Token-averaged cross-entropy of the responses by one ordinary forward pass."""
    with torch.no_grad():
        return model(**collate(feats, pad_id)).loss.item()


def loss_tol(model, feats) -> float:
    """Relative bound between two float32 computations of the loss of `feats` by different arithmetic
    (other batches or padding, merged or residual weights): each within `output_tol` of the exact loss."""
    positions = max(len(f["input_ids"]) for f in feats)
    return 2 * output_tol(model, positions, sum(t != -100 for f in feats for t in f["labels"]))


@pytest.mark.parametrize("method,precondition", [(m, False) for m in VARIANTS] + [("lora-one", True)])
def test_each_method_trains_and_saves_a_stock_adapter(tiny, tmp_path, method, precondition):
    out = tmp_path / "run"
    extra = ["--variant", method, "--max-steps", "3", "--lr", "5e-3"] + (["--precondition"] if precondition else [])
    assert main(qa_args(tiny, out, *extra)) == 0
    metrics = read_metrics(out)
    assert metrics[0]["step"] == 0 and "eval_loss" in metrics[0] and "eval_accuracy" in metrics[0]
    train = [m for m in metrics if "train_loss" in m]
    assert [m["step"] for m in train] == [1, 2, 3]
    # The schedule starts at the full lr (no warm-up for 3 steps): the init never advanced it.
    # float64 Python: 5e-3 * fl(1 / 3) against fl(5e-3 / 3), three roundings (and their products) apart
    assert train[0]["lr"] == 5e-3 and train[-1]["lr"] == pytest.approx(5e-3 / 3, rel=4 * U64)
    sidecar = json.loads((out / "lora_one.json").read_text())
    assert sidecar["variant"] == method and len(sidecar["init_sample_indices"]) == 4
    assert json.loads((out / "args.json").read_text())["precondition"] is precondition
    assert (out / "loss.png").stat().st_size > 0

    tok = AutoTokenizer.from_pretrained(tiny["llama"])
    _, feats = eval_features(tiny, tok)
    base = AutoModelForCausalLM.from_pretrained(tiny["llama"])
    base_loss = plain_loss(base, feats, tok.pad_token_id)
    tol = loss_tol(base, feats)  # the run evaluates in batches of its own, maybe on a residual base
    if method in ("lora", "lora-ga", "pissa", "lora-one-v1"):  # these inits leave the function unchanged
        assert metrics[0]["eval_loss"] == pytest.approx(base_loss, rel=tol)
    else:
        assert metrics[0]["eval_loss"] != pytest.approx(base_loss, rel=tol)
    # Stock PEFT on the untouched base reproduces the trained model's logged final loss.
    loaded = PeftModel.from_pretrained(base, str(out)).eval()
    assert plain_loss(loaded, feats, tok.pad_token_id) == pytest.approx(metrics[-1]["eval_loss"], rel=tol)


def _weights(out):
    return load_file(str(out / "adapter_model.safetensors"))


@pytest.mark.parametrize("kind,method", [("causal", "lora-one"), ("causal", "pissa"), ("classification", "lora-one")])
def test_interrupt_and_resume_gives_the_uninterrupted_adapter(tiny, tmp_path, capsys, monkeypatch, kind, method):
    make = qa_args if kind == "causal" else sent_args
    settings = ["--max-steps", "7", "--save-every", "5", "--eval-every", "2", "--grad-accum", "2", "--lr", "5e-3",
                "--variant", method]  # pissa: a base-changing variant, its residual base rebuilt on resume
    if kind == "causal":
        settings += ["--precondition"]
    else:
        settings += ["--head-init", "probe"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(make(tiny, full, *settings)) == 0

    class CtrlCDuringStep3(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 2:  # the third step is under way
                os.kill(os.getpid(), signal.SIGINT)

    settings_3 = settings_from(build_parser().parse_args(make(tiny, cut, *settings)))
    with pytest.raises(TrainingInterrupted) as info:
        run_finetune(settings_3, callbacks=(CtrlCDuringStep3(),))
    assert info.value.step == 3
    assert info.value.checkpoint == cut / "checkpoint-3" and (cut / "checkpoint-3" / "trainer_state.json").is_file()
    assert "--resume" in capsys.readouterr().err
    assert not (cut / "adapter_model.safetensors").exists()

    def init_again(*args, **kwargs):
        raise AssertionError("--resume must restore the step-0 adapter from the checkpoint, not redo the init")

    monkeypatch.setattr("lora_one.core.init.estimate_gradients", init_again)
    monkeypatch.setattr(LoraLayer, "pissa_init", init_again)
    monkeypatch.setattr("lora_one.recipes.finetune.probe_head", init_again)
    assert main(make(tiny, cut, *settings, "--resume")) == 0
    a, b = _weights(full), _weights(cut)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert read_metrics(full) == read_metrics(cut)
    timings = ("training", "gradient_seconds", "svd_seconds")
    sidecars = [{k: v for k, v in json.loads((o / "lora_one.json").read_text()).items() if k not in timings}
                for o in (full, cut)]
    assert sidecars[0] == sidecars[1]


class RunsCode:
    """Unpickling this calls `open(path, "w")`: any code could run in its place."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_resume_refuses_a_checkpoint_that_could_run_code(tiny, tmp_path, capsys):
    out, ran = tmp_path / "run", tmp_path / "code-ran"
    assert main(qa_args(tiny, out, "--max-steps", "3", "--save-every", "2")) == 0
    ckpt = out / "checkpoint-3" / "optimizer.pt"
    state = torch.load(ckpt, weights_only=True)  # what the Trainer writes loads safely
    state["note"] = RunsCode(ran)
    torch.save(state, ckpt)
    assert main(qa_args(tiny, out, "--max-steps", "3", "--save-every", "2", "--resume")) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "could run code" in errors[0] and str(ckpt.parent) in errors[0]
    assert "Traceback" not in err
    assert not ran.exists()


def test_resume_refuses_other_settings_and_out_needs_overwrite(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(qa_args(tiny, out, "--max-steps", "2")) == 0
    assert main(qa_args(tiny, out, "--max-steps", "2")) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(qa_args(tiny, out, "--max-steps", "2", "--lr", "1e-3", "--resume")) == 2
    err = capsys.readouterr().err
    assert "lr 0.0002 there, 0.001 now" in err
    assert main(qa_args(tiny, out, "--max-steps", "2", "--overwrite")) == 0
    assert main(qa_args(tiny, tmp_path / "new", "--max-steps", "2", "--resume")) == 2
    assert "no run" in capsys.readouterr().err


def test_config_file_with_command_line_override(tiny, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {tiny['llama']}\ndata: {tiny['qa']}\nlr: 3e-3\nmax-steps: 5\nrank: 2\n"
                   f"target: [q_proj, v_proj]\nquiet: true\n")
    out = tmp_path / "run"
    assert main(["finetune", "--config", str(cfg), "--max-steps", "2", "--out", str(out), "--init-samples", "2"]) == 0
    used = json.loads((out / "args.json").read_text())
    assert (used["lr"], used["max_steps"], used["rank"], used["target"]) == (3e-3, 2, 2, "q_proj,v_proj")
    assert used["eval_data"] is None
    # args.json loads back as a config: resuming the finished run changes nothing.
    before = _weights(out)
    assert main(["finetune", "--config", str(out / "args.json"), "--resume"]) == 0
    after = _weights(out)
    assert all(torch.equal(before[k], after[k]) for k in before)
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 1e-3\n")
    assert main(["finetune", "--config", str(bad), "--out", str(tmp_path / "x")]) == 2


def test_classification_trains_the_probed_head(tiny, tmp_path):
    out = tmp_path / "run"
    assert main(sent_args(tiny, out, "--max-steps", "3", "--lr", "5e-3", "--head-init", "probe")) == 0
    metrics = read_metrics(out)
    sidecar = json.loads((out / "lora_one.json").read_text())
    assert sidecar["head_init"] == "probe" and sidecar["label2id"] == {"negative": 0, "positive": 1}
    # Recompute the logged final accuracy with stock PEFT and a plain loop.
    tok = AutoTokenizer.from_pretrained(tiny["bert"])
    base = AutoModelForSequenceClassification.from_pretrained(tiny["bert"], num_labels=2)
    model = PeftModel.from_pretrained(base, str(out)).eval()
    recs = [json.loads(line) for line in open(tiny["sent_eval"])]
    hits = 0
    with torch.no_grad():
        for r in recs:
            logits = model(**tok(r["text"], return_tensors="pt")).logits[0]
            hits += int(logits.argmax()) == sidecar["label2id"][r["label"]]
    assert metrics[-1]["eval_accuracy"] == pytest.approx(hits / len(recs))


def test_eval_matches_hand_computed_accuracy(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(qa_args(tiny, out, "--max-steps", "4", "--lr", "1e-2")) == 0
    res_path = tmp_path / "eval.json"
    assert main(["eval", "--model", tiny["llama"], "--adapter", str(out), "--data", tiny["qa_eval"],
                 "--batch-size", "5", "--out", str(res_path)]) == 0
    res = json.loads(res_path.read_text())
    tok = AutoTokenizer.from_pretrained(tiny["llama"])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["llama"]), str(out)).eval()
    recs, feats = eval_features(tiny, tok)
    choices = [" human", " location", " number"]
    hits = 0
    with torch.no_grad():
        for r in recs:
            p = prompt_ids(tok, r["prompt"])
            scores = []
            for c in choices:
                cand = response_ids(tok, c)
                logp = model(input_ids=torch.tensor([p + cand])).logits[0].log_softmax(-1)
                scores.append(sum(logp[len(p) - 1 + i, t].item() for i, t in enumerate(cand)))
            hits += choices[max(range(3), key=scores.__getitem__)] == r["response"]
    assert res["metric"] == "accuracy" and res["n"] == len(recs)
    assert res["accuracy"] == pytest.approx(hits / len(recs))
    assert res["loss"] == pytest.approx(plain_loss(model, feats, tok.pad_token_id), rel=loss_tol(model, feats))
    # Open-ended (4 distinct responses in 4 records): exact match of greedy generations, checked by a
    # hand-written greedy loop.
    answers = [" the city", " the river", " a king", " of year"]
    open_recs = [{"prompt": r["prompt"], "response": a} for r, a in zip(recs, answers)]
    open_path = write_jsonl(tmp_path / "open.jsonl", open_recs)
    assert main(["eval", "--model", tiny["llama"], "--data", str(open_path), "--out", str(res_path)]) == 0
    res = json.loads(res_path.read_text())
    base = AutoModelForCausalLM.from_pretrained(tiny["llama"]).eval()
    hits = 0
    with torch.no_grad():
        for r in open_recs:
            ids = prompt_ids(tok, r["prompt"])
            new = []
            for _ in range(3):  # the longest response + eos is 3 tokens
                t = int(base(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
                if t == tok.eos_token_id:
                    break
                new.append(t)
            hits += tok.decode(new).strip() == r["response"].strip()
    assert res["metric"] == "exact_match" and res["exact_match"] == pytest.approx(hits / 4)
    assert res["exact_match_n"] == 4  # the default sample (200) holds them all
    # A bounded sample and a cap on new tokens: generation runs on 2 of the 4 prompts, 1 token each,
    # and the loss stays on all 4.
    import lora_one.recipes.evaluate

    real, seen = lora_one.recipes.evaluate.greedy_generate, []

    def counted(model, tokenizer, prompts, max_new_tokens, *args):
        seen.append((len(prompts), max_new_tokens))
        return real(model, tokenizer, prompts, max_new_tokens, *args)

    monkeypatch.setattr(lora_one.recipes.evaluate, "greedy_generate", counted)
    loss_all = res["loss"]
    assert main(["eval", "--model", tiny["llama"], "--data", str(open_path), "--out", str(res_path),
                 "--generate-samples", "2", "--max-new-tokens", "1"]) == 0
    res = json.loads(res_path.read_text())
    assert seen == [(2, 1)] and (res["exact_match_n"], res["n"]) == (2, 4)
    assert res["loss"] == loss_all  # the same batches through the same evaluator: the same arithmetic


@pytest.mark.parametrize("kind", ["causal", "classification"])
def test_merge_equals_base_plus_adapter(tiny, tmp_path, kind):
    out, merged = tmp_path / "run", tmp_path / "merged"
    if kind == "causal":  # pissa: the adapter is PEFT's converted rank-2r one
        assert main(qa_args(tiny, out, "--max-steps", "2", "--variant", "pissa", "--lr", "1e-2")) == 0
        model_dir, auto = tiny["llama"], AutoModelForCausalLM
        kwargs = {}
    else:
        assert main(sent_args(tiny, out, "--max-steps", "2", "--lr", "1e-2")) == 0
        model_dir, auto = tiny["bert"], AutoModelForSequenceClassification
        kwargs = {"num_labels": 2}
    assert main(["merge", "--model", model_dir, "--adapter", str(out), "--out", str(merged)]) == 0
    x = torch.tensor([[5, 9, 12, 7, 30, 4]])
    with torch.no_grad():
        want = PeftModel.from_pretrained(auto.from_pretrained(model_dir, **kwargs), str(out)).eval()(input_ids=x).logits
        plain = auto.from_pretrained(model_dir, **kwargs).eval()(input_ids=x).logits
        merged_model = auto.from_pretrained(merged).eval()
        got = merged_model(input_ids=x).logits
    assert (want - plain).abs().max() > BUG * want.abs().max()  # the adapter does something
    assert_same_outputs(got, want, merged_model, x.shape[1])  # merged weights: other arithmetic


def test_bad_input_is_one_clean_line(tiny, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    nofield = write_jsonl(tmp_path / "nofield.jsonl", [{"question": "x", "answer": "y"}])
    unseen = write_jsonl(tmp_path / "unseen.jsonl", [{"text": "good movie", "label": "neutral"}])
    unseen_qa = write_jsonl(tmp_path / "unseen_qa.jsonl", [{"prompt": "question : who ? type :", "response": " city"}])
    cases = [
        (["--model", str(tmp_path / "nope")], "neither an alias"),
        (["--model", "gpt-17"], "neither an alias"),
        (["--data", str(tmp_path / "missing.jsonl")], "does not exist"),
        (["--data", str(empty)], "holds no records"),
        (["--data", str(nofield)], "lacks field"),
        (["--lr", "0"], "learning rate"),
        (["--lr=-1e-3"], "learning rate"),
        (["--max-steps=-5"], "max-steps"),
        (["--max-steps", "3", "--warmup-steps", "3"], "warm-up"),
        (["--batch-size", "0"], "batch-size"),
        (["--rank", "0"], "--rank"),
        (["--eval-data", str(unseen_qa)], "must occur in training"),
    ]
    for extra, message in cases:
        args = qa_args(tiny, tmp_path / "out", *extra)
        assert main(args) == 2, extra
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if "error:" in line]
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, (extra, err)
    assert main(sent_args(tiny, tmp_path / "out2", "--eval-data", str(unseen))) == 2
    assert "never occurs in the training data" in capsys.readouterr().err
    # eval and merge
    assert main(["eval", "--model", tiny["llama"], "--adapter", str(tmp_path / "none"), "--data", tiny["qa"]]) == 2
    assert "not an adapter folder" in capsys.readouterr().err
    assert main(["eval", "--model", tiny["bert"], "--data", tiny["sent"]]) == 2
    assert "needs the adapter that trained its head" in capsys.readouterr().err
    assert main(["merge", "--model", tiny["llama"], "--adapter", str(tmp_path / "none"), "--out", str(tmp_path / "m")]) == 2
    assert not (tmp_path / "m").exists()


def test_demo_pipeline_on_tiny_models(tiny, tmp_path, monkeypatch):
    from lora_one.recipes import demo

    monkeypatch.setitem(demo.DEMOS, "tiny", demo.Demo(
        model=tiny["llama"], data=tiny["qa"], val=tiny["qa_eval"], test=tiny["qa_eval"], what="tiny",
        common=dict(max_steps=4, eval_every=2, batch_size=4, rank=4, init_samples=4),
        methods=dict(demo.DEMOS["trec"].methods),
    ))
    result = demo.run_demo("tiny", tmp_path / "demo", quiet=True)
    methods = result["methods"]
    assert list(methods) == ["lora", "lora-one", "lora-one+precond"]
    runs = {}
    for name, r in methods.items():
        assert r["selection"] == []  # the demo's settings are fixed: nothing is chosen, the validation split unread
        [runs[name]] = r["runs"]
        assert runs[name]["folder"] == str(tmp_path / "demo" / "test" / name / f"lr={r['chosen']['lr']:g}" / "seed-0")
        assert (tmp_path / "demo" / "test" / name / f"lr={r['chosen']['lr']:g}" / "seed-0" /
                "adapter_model.safetensors").is_file()
        assert [m["step"] for m in runs[name]["metrics"] if "eval_loss" in m] == [0, 2, 4]
    # Same init -> the same step-0 numbers; different training -> different end points.
    assert runs["lora-one"]["step0_eval"] == runs["lora-one+precond"]["step0_eval"]
    assert runs["lora-one"]["final_eval"] != runs["lora-one+precond"]["final_eval"]
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "| lora-one+precond |" in report and (tmp_path / "demo" / "comparison.png").stat().st_size > 0


def test_bf16_autocast_run(tiny, tmp_path):
    out = tmp_path / "run"
    assert main(qa_args(tiny, out, "--max-steps", "2", "--bf16", "--lr", "5e-3")) == 0
    metrics = read_metrics(out)
    assert all(v == v and abs(v) < 1e3 for m in metrics for k, v in m.items() if k.endswith("loss"))
    # The run evaluated under bf16 autocast. `lora-one eval` of the saved adapter under the same autocast, in
    # the same batches (16), does the same arithmetic on the same weights: the logged loss, bit for bit (a
    # bound from bf16's round-off, 2^-8 per rounding over the network's chain, would exceed a 1% error).
    res = tmp_path / "eval.json"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert main(["eval", "--model", tiny["llama"], "--adapter", str(out), "--data", tiny["qa_eval"],
                     "--batch-size", "16", "--out", str(res)]) == 0
    got = json.loads(res.read_text())
    assert (got["loss"], got["accuracy"]) == (metrics[-1]["eval_loss"], metrics[-1]["eval_accuracy"])


def test_resume_refuses_a_damaged_checkpoint_in_one_line(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(qa_args(tiny, out, "--max-steps", "3", "--save-every", "2")) == 0
    ckpt = out / "checkpoint-3" / "optimizer.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])  # truncated, as by a full disk
    assert main(qa_args(tiny, out, "--max-steps", "3", "--save-every", "2", "--resume")) == 2
    err = capsys.readouterr().err
    assert "damaged" in err and str(ckpt.parent) in err and "Traceback" not in err
