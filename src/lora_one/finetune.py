"""`lora-one finetune`: data -> (linear probe) -> LoRA-One init -> training -> adapter + report files.

Output folder: the stock PEFT adapter with its `lora_one.json` sidecar, `args.json` (every setting
used; it loads back with `--config`), `metrics.jsonl`, `loss.png` and `checkpoints/`.

Under `torchrun` or `accelerate launch` every process runs this same function: the init samples are
split across the ranks (`lora_one.gradients` sums their gradients), training splits every micro-batch
(`lora_one.train`), and rank 0 alone evaluates and writes the output folder.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from lora_one import embedded_data, parallel
from lora_one.config import (
    check_shared_settings,
    check_writable,
    complete_model_settings,
    config_aware,
    resolve,
    settings_of,
)
from lora_one.data import init_batches, init_sample_indices, read_records
from lora_one.errors import UsageError
from lora_one.evaluate import infer_choices, make_evaluator, parse_choices
from lora_one.files import ADAPTER, check_out_folder, remove_ours, write_text_atomic
from lora_one.init import get_lora_one_model, lora_one_state, restore_lora_one
from lora_one.models import CAUSAL_LM, CLASSIFICATION, infer_task, resolve_model_path
from lora_one.optim import DEFAULT_REG
from lora_one.plots import plot_loss
from lora_one.probe import probe_head
from lora_one.save import SIDECAR, save_adapter
from lora_one.spectral import VARIANTS
from lora_one.train import (
    CHECKPOINTS,
    METRICS,
    SCHEDULES,
    TrainingInterrupted,
    TrainSettings,
    latest_checkpoint,
    read_checkpoint,
    train,
)

ARGS = "args.json"
# Settings that may change between a run and its --resume without changing the result.
RESUME_FREE = ("resume", "overwrite", "save_every", "quiet", "eval_batch_size", "device", "offload",
               "base_model_name")
# The files of a run in its folder, which --overwrite deletes (and nothing else), the adapter's marker
# first so the folder never looks like a finished run; a README.md is left alone (it may be the user's).
RUN_FILES = (ADAPTER.marker, *ADAPTER.stale, SIDECAR, ARGS, METRICS, "loss.png", "eval.json",
             f"{CHECKPOINTS}/step-*.pt", f"{CHECKPOINTS}/.step-*")


def add_finetune_parser(sub) -> argparse.ArgumentParser:
    from lora_one.cli import add_lora_args, add_model_data_args  # noqa: PLC0415 (cli imports this module)

    p = sub.add_parser("finetune", help="LoRA-One init + fine-tuning; saves a stock PEFT adapter")
    add_model_data_args(p)
    add_lora_args(p)
    g = p.add_argument_group("method")
    g.add_argument("--method", choices=VARIANTS, default="lora-one", help="adapter init")
    g.add_argument("--precondition", action="store_true", help="Riemannian (scaled) AdamW")
    g.add_argument("--prec-reg", type=float, default=DEFAULT_REG, help="damping of the preconditioner")
    g.add_argument("--lora-plus-ratio", type=float, default=1.0, help="LoRA+: lr of lora_B = ratio * lr")
    g.add_argument("--head-init", choices=("random", "probe"), default="random",
                   help="classification head: keep the fresh random head, or fit a linear probe on frozen "
                   "features before the init (see docs/demo.md for what each gave)")
    g.add_argument("--probe-samples", type=int, default=2000, help="training examples for the linear probe")
    g.add_argument("--probe-l2", type=float, default=1e-4, help="L2 penalty of the linear probe")
    g = p.add_argument_group("training")
    g.add_argument("--lr", type=float, default=2e-4, help="learning rate")
    g.add_argument("--schedule", choices=SCHEDULES, default="linear")
    g.add_argument("--warmup-steps", type=int, default=0, help="overrides --warmup-ratio when > 0")
    g.add_argument("--warmup-ratio", type=float, default=0.03)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--epochs", type=float, default=1.0)
    g.add_argument("--max-steps", type=int, default=0, help="optimizer steps; overrides --epochs when > 0")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    g.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--eval-data", help="held-out data (default for embedded data: its :val split)")
    g.add_argument("--eval-split", type=float, help="hold out this fraction of --data instead")
    g.add_argument("--choices", help="comma-separated closed label set of a causal LM (default: inferred)")
    g.add_argument("--eval-every", type=int, default=0, help="steps between evals (0: step 0 and the end only)")
    g.add_argument("--eval-batch-size", type=int, default=16)
    g.add_argument("--save-every", type=int, default=100, help="steps between checkpoints")
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    config_aware(p)
    p.set_defaults(func=cmd_finetune)
    return p


def finetune_args(**settings) -> argparse.Namespace:
    """A resolved finetune namespace from keyword settings (defaults for the rest), for Python callers."""
    parser = argparse.ArgumentParser()
    add_finetune_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["finetune"])
    for key, value in settings.items():
        if key not in args._config_actions and key != "config":
            raise UsageError(f"Unknown finetune setting {key!r}.")
        setattr(args, key, value)
    return resolve(args)


def train_settings_of(args) -> TrainSettings:
    return TrainSettings(
        lr=args.lr, schedule=args.schedule, warmup_steps=args.warmup_steps, warmup_ratio=args.warmup_ratio,
        weight_decay=args.weight_decay, batch_size=args.batch_size, grad_accum=args.grad_accum,
        epochs=args.epochs, max_steps=args.max_steps, eval_every=args.eval_every, save_every=args.save_every,
        max_grad_norm=args.max_grad_norm, precondition=args.precondition, prec_reg=args.prec_reg,
        lora_plus_ratio=args.lora_plus_ratio, bf16=args.bf16, seed=args.seed, progress=not args.quiet,
    )


def _check_settings(args) -> None:
    """Refuse bad settings before anything is loaded: those shared with `init` in one place
    (`check_shared_settings`), then the training and evaluation ones."""
    check_shared_settings(args)
    check_writable(args.out)
    train_settings_of(args).check()
    problems = []
    if args.probe_samples < 1:
        problems.append(f"--probe-samples must be >= 1, got {args.probe_samples}")
    if not args.probe_l2 >= 0:
        problems.append(f"--probe-l2 must be >= 0, got {args.probe_l2}")
    if args.eval_batch_size < 1:
        problems.append(f"--eval-batch-size must be >= 1, got {args.eval_batch_size}")
    if args.eval_split is not None and not 0 < args.eval_split < 1:
        problems.append(f"--eval-split must lie in (0, 1), got {args.eval_split}")
    if args.eval_split is not None and args.eval_data:
        problems.append("give --eval-data or --eval-split, not both")
    if args.resume and args.overwrite:
        problems.append("--resume continues the run in --out, --overwrite replaces it: choose one")
    if problems:
        raise UsageError("; ".join(problems) + ".")


def _complete_defaults(args) -> None:
    """Fill the settings whose default depends on the model or data, so args.json records them."""
    args.task = args.task or infer_task(resolve_model_path(args.model))
    data = str(args.data)
    if not args.eval_data and args.eval_split is None and embedded_data.is_embedded(data):
        name, _, split = data.partition(":")
        if split in ("", "train"):
            args.eval_data = f"{name}:val"
    complete_model_settings(args)


def _check_out_dir(out: Path, args) -> None:
    """Refuse an --out that holds something, unless --overwrite, or --resume of the same run."""
    check_out_folder(out)
    current = settings_of(args)
    if args.resume:
        if not (out / ARGS).is_file():
            raise UsageError(f"--resume: {str(out)!r} holds no run (no {ARGS}); start it without --resume.")
        saved = json.loads((out / ARGS).read_text())
        differ = [
            f"{k} {saved.get(k)!r} there, {current.get(k)!r} now"
            for k in sorted(set(saved) | set(current))
            if k not in RESUME_FREE and saved.get(k) != current.get(k)
        ]
        if differ:
            raise UsageError(f"--resume: {str(out)!r} is a run with other settings: {'; '.join(differ)}.")
        if latest_checkpoint(out) is None:
            raise UsageError(f"--resume: {str(out)!r} has no checkpoint yet; start again with --overwrite.")
        return
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UsageError(
            f"--out {str(out)!r} exists and is not empty; pass --resume to continue its run, --overwrite to "
            "replace it, or choose another folder."
        )
    if out.exists() and any(out.iterdir()) and not (out / ARGS).is_file():
        # --overwrite deletes an earlier run's files by name: only where a run was, never a user's namesakes
        raise UsageError(
            f"--overwrite: {str(out)!r} holds files but no lora-one run (no {ARGS}), so nothing in it is ours to "
            "replace; choose a new or empty folder."
        )


def _start_out_dir(out: Path, args) -> None:
    """Delete the files of an earlier run in --out (if any; only RUN_FILES) and record this run's settings."""
    remove_ours(out, RUN_FILES)
    write_text_atomic(out / ARGS, json.dumps(settings_of(args), indent=2) + "\n")


def _split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    n_eval = round(fraction * n)
    if not 0 < n_eval < n:
        raise UsageError(f"--eval-split {fraction} of {n} records leaves an empty part; change it.")
    return sorted(idx[n_eval:]), sorted(idx[:n_eval])


def run_finetune(args, on_step=None, step0_eval: dict | None = None) -> dict:
    """The whole `finetune` command on a resolved namespace; returns a summary of the run."""
    _check_settings(args)
    _complete_defaults(args)
    _check_out_dir(Path(args.out), args)  # on every rank, before rank 0 can write (it waits for all to join)
    parallel.refuse_ignored_launch_settings(args.bf16)
    with parallel.process_group(args.device) as device:
        return _run(args, device, on_step, step0_eval)


def _run(args, device: torch.device, on_step, step0_eval: dict | None) -> dict:
    from lora_one.cli import base_model_name_of, fields_of, load_task_data, lora_config_of  # noqa: PLC0415

    out = Path(args.out)
    main = parallel.is_main_process()
    task = args.task
    quiet = args.quiet
    fields = fields_of(args)
    torch.manual_seed(args.seed)
    model, tokenizer, task, records, feats, label2id = load_task_data(args, args.data)
    eval_records = None
    if args.eval_split is not None:
        train_idx, eval_idx = _split(len(records), args.eval_split, args.seed)
        feats, eval_records = [feats[i] for i in train_idx], [records[i] for i in eval_idx]
        records = [records[i] for i in train_idx]
    elif args.eval_data:
        eval_records = read_records(args.eval_data, task, fields)
    init_sample_indices(len(feats), args.init_samples, args.seed)  # too few records: refuse before writing
    choices = None
    if task == CAUSAL_LM:
        responses = [str(r[fields.response]) for r in records]
        choices = parse_choices(args.choices) if args.choices else infer_choices(responses)
    evaluator = None
    if eval_records is not None:
        evaluator = make_evaluator(task, eval_records, tokenizer, fields, args.max_length, args.chat_template,
                                   choices, label2id, args.eval_batch_size, too_long=args.too_long)
        if evaluator.note and main:
            print(f"{args.eval_data or 'the held-out split'}: {evaluator.note}", flush=True)
    model.to(device)
    pad_id = tokenizer.pad_token_id
    if not args.resume and main:  # only now that model and data are known to load
        _start_out_dir(out, args)

    t0 = time.perf_counter()
    if args.resume:  # the step-0 adapter is in the checkpoint: no probe, no gradient pass, no SVD
        saved = read_checkpoint(latest_checkpoint(out))
        if "init" not in saved:
            raise UsageError(f"--resume: the checkpoint in {str(out)!r} predates stored step-0 adapters; start "
                             "again with --overwrite.")
        peft_model = restore_lora_one(model, lora_config_of(args, task), saved["init"])
        probe_info, probe_seconds = saved["probe"], 0.0
    else:
        probe_info = {}
        if task == CLASSIFICATION and args.head_init == "probe":
            probe_info = probe_head(model, feats, pad_id, args.probe_samples, args.seed, args.probe_l2)
        probe_seconds = time.perf_counter() - t0
        batches = init_batches(feats, args.init_samples, args.init_batch_size, args.seed, pad_id)
        batches = batches[parallel.rank() :: parallel.world_size()]  # this rank's shard of the init samples
        peft_model = get_lora_one_model(
            model, lora_config_of(args, task), batches, variant=args.method, gamma=args.gamma, svd=args.svd,
            seed=args.seed, progress=not quiet, grad_mode=args.grad_mode, offload=args.offload,
            sketch_passes=args.sketch_passes, num_samples=None,  # the shards hold exactly --init-samples
        )
    init_seconds = time.perf_counter() - t0
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    if main:
        print(f"{args.method}{' + preconditioner' if args.precondition else ''}: init {init_seconds:.1f} s "
              f"(probe {probe_seconds:.1f} s), {trainable:,} trainable parameters", flush=True)

    settings = train_settings_of(args)
    extra = {"init": lora_one_state(peft_model), "probe": probe_info}  # what --resume restores
    resume_hint = f"lora-one finetune --config {out / ARGS} --resume"
    try:
        result = train(peft_model, feats, pad_id, settings, out, evaluator, resume=args.resume,
                       step0_eval=step0_eval, checkpoint_extra=extra, on_step=on_step)
    except TrainingInterrupted as e:
        if main:
            print(f"Interrupted after step {e.step}; checkpoint {e.checkpoint} is complete. Resume with:\n"
                  f"  {resume_hint}", file=sys.stderr, flush=True)
        raise
    except KeyboardInterrupt:
        if not main:
            raise
        last = latest_checkpoint(out)
        hint = (f"The last checkpoint {last} is complete; resume with:\n  {resume_hint}" if last
                else "There is no checkpoint yet; start again with --overwrite.")
        print(f"Stopped at once. {hint}", file=sys.stderr, flush=True)
        raise

    evals = [m for m in result.metrics if any(k.startswith("eval_") for k in m)]
    summary = {
        "method": args.method,
        "precondition": args.precondition,
        "out": str(out),
        "rank": parallel.rank(),
        "steps": result.steps,
        "init_seconds": round(init_seconds, 3),
        "probe_seconds": round(probe_seconds, 3),
        "train_seconds": round(result.train_seconds, 3),
        "eval_seconds": round(result.eval_seconds, 3),
        "steps_per_second": round(result.steps_per_second, 4),
        "trainable_parameters": trainable,
        "processes": parallel.world_size(),
        "step0_eval": evals[0] if evals and evals[0]["step"] == 0 else None,
        "final_eval": evals[-1] if evals else None,
        "metrics": result.metrics,
    }
    meta = {
        "model": args.model, "data": str(args.data), "task": task, "method": args.method,
        "precondition": args.precondition, "prec_reg": args.prec_reg, "chat_template": args.chat_template,
        "fields": vars(fields), "choices": choices, "label2id": label2id, "head_init": args.head_init,
        **probe_info,
        "init_sample_indices": init_sample_indices(len(feats), args.init_samples, args.seed),
        "training": {k: v for k, v in summary.items() if k not in ("metrics", "out", "rank")},
    }
    if main:
        plot_loss(result.metrics, out / "loss.png", title=f"{args.method}{' + precond' if args.precondition else ''}")
        # last, into the run folder (its other files stay): adapter_config.json marks the run complete
        save_adapter(peft_model, out, meta, base_model_name=base_model_name_of(args))
    parallel.barrier()  # the other ranks wait for the files, so the job ends when they are written
    return summary


def cmd_finetune(args) -> dict:
    args = resolve(args)
    try:
        summary = run_finetune(args)
    except (TrainingInterrupted, KeyboardInterrupt):
        raise SystemExit(130) from None
    if summary["rank"] != 0:
        return summary
    final = summary["final_eval"]
    if final:
        shown = ", ".join(f"{k[5:]} {v:.4f}" for k, v in final.items() if k.startswith("eval_") and k != "eval_n")
        print(f"step {final['step']}: {shown}")
    print(f"saved the adapter, metrics.jsonl and loss.png in {summary['out']}")
    return summary
