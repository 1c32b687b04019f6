"""The fine-tuning loop: a plain PyTorch loop with a progress bar, checkpoints and exact resume.

The optimizer and the learning-rate schedule are created here, after the LoRA-One init, so the init
never advances them. The data order is a function of the seed and the step alone (one seeded
permutation per epoch), and a checkpoint holds the trainable tensors, the optimizer, the schedule and
the RNG state, so a resumed run ends with the same adapter as an uninterrupted one.

Ctrl-C or SIGTERM asks the loop to stop after the optimizer step in progress; it then writes a
checkpoint and raises `TrainingInterrupted`. A second Ctrl-C stops at once (the last checkpoint is
still whole: checkpoints are written to a temporary file and renamed into place).

Under `torchrun` / `accelerate launch` (an initialised `torch.distributed` group) the model is wrapped
in `DistributedDataParallel` and every micro-batch of the single-process run is split across the
ranks, each rank's mean loss weighted by its share of the loss terms of the whole optimizer step (so
are the `grad_accum` micro-batches of one step: one full-batch gradient per step). So `--batch-size` is
the global micro-batch, the steps and the data order do not depend on the number of processes, and
the adapter equals the single-process one up to float rounding. Only rank 0 evaluates and writes.
"""

from __future__ import annotations

import json
import math
import pickle
import signal
import threading
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm
from transformers import get_scheduler

from lora_one import parallel
from lora_one.data import collate, loss_terms
from lora_one.errors import UsageError
from lora_one.files import replacing, write_text_atomic
from lora_one.optim import DEFAULT_REG, create_optimizer

SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup")
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"


@dataclass
class TrainSettings:
    lr: float = 2e-4
    schedule: str = "linear"
    warmup_steps: int = 0  # > 0 overrides warmup_ratio
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    batch_size: int = 8
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int = 0  # > 0 overrides epochs
    eval_every: int = 0  # 0: evaluate at step 0 and at the end only
    save_every: int = 100  # 0: checkpoint only at the end (and on interruption)
    max_grad_norm: float = 1.0  # 0 disables clipping
    precondition: bool = False
    prec_reg: float = DEFAULT_REG
    lora_plus_ratio: float = 1.0
    bf16: bool = False
    seed: int = 0
    progress: bool = True

    def check(self) -> None:
        """Reject settings that make no sense, before anything is loaded."""
        problems = []
        if not (0 < self.lr < 1):
            problems.append(f"learning rate must lie in (0, 1), got {self.lr}")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                problems.append(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "max_steps", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                problems.append(f"{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.max_steps == 0 and not self.epochs > 0:
            problems.append(f"epochs must be > 0 (or give max-steps), got {self.epochs}")
        if self.max_steps and self.warmup_steps >= self.max_steps:
            problems.append(f"{self.warmup_steps} warm-up steps leave nothing of the {self.max_steps} training steps")
        if not (0 <= self.warmup_ratio < 1):
            problems.append(f"warmup-ratio must lie in [0, 1), got {self.warmup_ratio}")
        if not self.weight_decay >= 0 or not self.max_grad_norm >= 0 or not self.prec_reg >= 0:
            problems.append("weight-decay, max-grad-norm and prec-reg must be >= 0")
        if not self.lora_plus_ratio > 0:
            problems.append(f"lora-plus-ratio must be > 0, got {self.lora_plus_ratio}")
        if problems:
            raise UsageError("; ".join(problems) + ".")

    def total_steps(self, n_examples: int) -> int:
        if self.max_steps:
            return self.max_steps
        per_epoch = math.ceil(n_examples / (self.batch_size * self.grad_accum))
        return max(1, math.ceil(self.epochs * per_epoch))

    def warmup(self, total: int) -> int:
        n = self.warmup_steps or round(self.warmup_ratio * total)
        if n >= total:
            raise UsageError(f"{n} warm-up steps leave nothing of the {total} training steps; lower the warm-up.")
        return n


@dataclass
class TrainResult:
    steps: int
    train_seconds: float  # forward, backward and optimizer steps only
    eval_seconds: float
    metrics: list[dict] = field(default_factory=list)
    resumed_from: int | None = None

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.train_seconds if self.train_seconds else float("nan")


class TrainingInterrupted(Exception):
    def __init__(self, step: int, checkpoint: Path):
        super().__init__(f"interrupted after step {step}; checkpoint {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def build_optimizer(model: torch.nn.Module, s: TrainSettings) -> torch.optim.Optimizer:
    """AdamW (optionally preconditioned); with LoRA+ the `lora_B` factors get `ratio * lr`."""
    opt = create_optimizer(model, s.lr, precondition=s.precondition, reg=s.prec_reg, weight_decay=s.weight_decay)
    if s.lora_plus_ratio != 1.0:
        b_ids = {id(p) for n, p in model.named_parameters() if ".lora_B." in n and p.requires_grad}
        group = opt.param_groups[0]
        b_params = [p for p in group["params"] if id(p) in b_ids]
        group["params"] = [p for p in group["params"] if id(p) not in b_ids]
        opt.add_param_group({"params": b_params, "lr": s.lr * s.lora_plus_ratio})
    return opt


class BatchOrder:
    """Example indices of micro-batch `m` of an endless sequence of epochs, each a permutation seeded
    by (seed, epoch)."""

    def __init__(self, n_examples: int, batch_size: int, seed: int):
        if not n_examples:
            raise UsageError("No training examples.")
        self.n, self.batch_size, self.seed = n_examples, batch_size, seed
        self.per_epoch = math.ceil(n_examples / batch_size)
        self._perm_epoch, self._perm = None, None

    def __getitem__(self, m: int) -> list[int]:
        epoch, j = divmod(m, self.per_epoch)
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=gen).tolist(), epoch
        return self._perm[j * self.batch_size : (j + 1) * self.batch_size]


def rank_share(
    features: list[dict], idx: list[int], rank: int, world: int, step_terms: int
) -> tuple[list[dict], float]:
    """This rank's examples of the micro-batch `idx` (every `world`-th one) and the weight that turns
    their mean loss into `world` times their part of the mean loss over all `step_terms` loss terms of
    the optimizer step (DDP's gradient average divides the `world` out): so the step's gradient is one
    full-batch gradient whatever `grad_accum` and the number of processes (Trainer's
    `num_items_in_batch`). A rank left without loss terms (a short last batch) runs one example at
    weight 0, so that it still joins the gradient all-reduce."""
    terms = [loss_terms(features[i]) for i in idx]
    total, mine = sum(terms), sum(terms[rank::world])
    if total == 0:
        raise UsageError("A training micro-batch has no tokens to predict; check the data's responses.")
    if mine == 0:
        return [features[idx[terms.index(max(terms))]]], 0.0
    return [features[i] for i in idx[rank::world]], mine * world / step_terms


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on one (so all ranks stop at the same step)."""
    return bool(parallel.all_reduce_sum(torch.tensor([float(flag)], device=device)).item())


def rng_states() -> list[dict]:
    """Every rank's RNG state, gathered (rank order) so that each rank resumes its own stream."""
    mine = {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    if not parallel.distributed():
        return [mine]
    states = [None] * parallel.world_size()
    dist.all_gather_object(states, mine)
    return states


@contextmanager
def graceful_interrupt():
    """While active, the first SIGINT/SIGTERM only sets `flag["stop"]`; a second one interrupts at once."""
    flag = {"stop": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    old = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = True
        print("\nStopping after the current step (press Ctrl-C again to stop at once) ...", flush=True)

    for sig in old:
        signal.signal(sig, handler)
    try:
        yield flag
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def latest_checkpoint(out_dir: Path) -> Path | None:
    ckpts = sorted((out_dir / CHECKPOINTS).glob("step-*.pt"))
    return ckpts[-1] if ckpts else None


def save_checkpoint(out_dir: Path, step: int, model, optimizer, scheduler, extra: dict) -> Path:
    """Write `checkpoints/step-N.pt` atomically (a temporary file renamed into place); drop older ones.
    Every rank calls it (the RNG states are gathered); rank 0 writes."""
    state = {
        "step": step,
        "trainable": trainable_state(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_states(),
        **extra,
    }
    folder = out_dir / CHECKPOINTS
    final = folder / f"step-{step:07d}.pt"
    if not parallel.is_main_process():
        return final
    with replacing(final) as tmp:
        torch.save(state, tmp)
    for old in folder.glob("step-*.pt"):
        if old != final:
            old.unlink(missing_ok=True)
    return final


def read_checkpoint(ckpt: Path) -> dict:
    """A checkpoint's contents. Only tensors and plain containers are read (`weights_only=True`): a
    checkpoint from elsewhere cannot run code."""
    try:
        return torch.load(ckpt, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UsageError(f"Checkpoint {ckpt} holds more than tensors and plain containers, so it is not "
                         "loaded (it could run code); resume only checkpoints lora-one wrote.") from None
    except (RuntimeError, EOFError) as e:  # truncated or not a torch file at all
        raise UsageError(f"Checkpoint {ckpt} cannot be read ({e}); it is damaged: start again with --overwrite.") from None


def load_checkpoint(ckpt: Path, model, optimizer, scheduler) -> dict:
    state = read_checkpoint(ckpt)
    params = dict(model.named_parameters())
    missing = set(state["trainable"]) ^ {n for n, p in params.items() if p.requires_grad}
    if missing:
        raise UsageError(f"Checkpoint {ckpt} does not match this model's trainable parameters ({sorted(missing)[:3]} ...).")
    with torch.no_grad():
        for name, value in state["trainable"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rngs, world = state["rng"], parallel.world_size()
    if len(rngs) != world:
        warnings.warn(
            f"{ckpt} was written by {len(rngs)} processes, this run has {world}: the random streams "
            "(dropout) continue from rank 0's, so the run may not match an uninterrupted one.", stacklevel=2,
        )
    rng = rngs[parallel.rank() if len(rngs) == world else 0]
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state


class MetricsLog:
    """`metrics.jsonl`: one JSON object per line, flushed at once; truncated to a step on resume.
    With `path=None` (ranks other than 0) the entries are only kept in memory."""

    def __init__(self, path: Path | None, keep_until: int | None = None):
        self.path = path
        self.entries: list[dict] = []
        if path is None:
            return
        if keep_until is not None and path.exists():
            with path.open(encoding="utf-8") as f:
                self.entries = [e for e in map(json.loads, filter(str.strip, f)) if e["step"] <= keep_until]
        write_text_atomic(path, "".join(json.dumps(e) + "\n" for e in self.entries))

    def log(self, entry: dict) -> None:
        self.entries.append(entry)
        if self.path is None:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def train(
    model: torch.nn.Module,
    features: list[dict],
    pad_id: int,
    settings: TrainSettings,
    out_dir: str | Path,
    evaluate: Callable[[torch.nn.Module], dict] | None = None,
    resume: bool = False,
    step0_eval: dict | None = None,
    checkpoint_extra: dict | None = None,
    on_step: Callable[[int, dict], None] | None = None,
) -> TrainResult:
    """Train the trainable parameters of `model` (a PEFT model, already initialised) on `features`.

    `evaluate(model) -> {metric: value}` runs at step 0, every `eval_every` steps and at the end, in
    eval mode and without gradients; its results go to `metrics.jsonl` as `eval_<metric>`.
    `step0_eval` supplies the step-0 results when the caller already knows them (an identical init).
    `checkpoint_extra` is stored in every checkpoint (finetune keeps the step-0 adapter there).
    `on_step(step, entry)` is called after each optimizer step with that step's log entry.
    """
    s = settings
    s.check()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = _device_of(model)
    rank, world = parallel.rank(), parallel.world_size()
    main = rank == 0
    total = s.total_steps(len(features))
    optimizer = build_optimizer(model, s)
    scheduler = get_scheduler(s.schedule, optimizer, num_warmup_steps=s.warmup(total), num_training_steps=total)
    params = [p for p in model.parameters() if p.requires_grad]
    order = BatchOrder(len(features), s.batch_size, s.seed)
    ddp = None
    if world > 1:
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    forward = ddp or model
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if s.bf16 else nullcontext()
    )

    step, resumed_from = 0, None
    log_path = out / METRICS if main else None
    if resume:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            raise UsageError(f"--resume: {out} holds no checkpoint to resume from; run without --resume.")
        state = load_checkpoint(ckpt, model, optimizer, scheduler)
        step = resumed_from = state["step"]
        log = MetricsLog(log_path, keep_until=step)
    else:
        torch.manual_seed(s.seed + rank)  # each rank its own dropout stream
        log = MetricsLog(log_path)
    extra = dict(checkpoint_extra or {})
    timers = {"train": 0.0, "eval": 0.0}

    def run_eval(at: int) -> None:
        if evaluate is None or not main:
            return
        t = time.perf_counter()
        if at == 0 and step0_eval is not None:
            results = step0_eval
        else:
            was_training = model.training
            model.eval()
            with torch.no_grad(), autocast:
                results = evaluate(model)
            model.train(was_training)
        timers["eval"] += time.perf_counter() - t
        log.log({"step": at, **{f"eval_{k}": v for k, v in results.items()}})

    def checkpoint(at: int) -> Path:
        return save_checkpoint(out, at, model, optimizer, scheduler, extra)

    if step == 0:
        run_eval(0)
    last_saved = step if resumed_from is not None else None
    bar = tqdm(total=total, initial=step, desc="training", unit="step", disable=not (s.progress and main),
               dynamic_ncols=True)
    model.train()
    try:
        with graceful_interrupt() as flag:
            while step < total:
                if any_rank(flag["stop"], device):
                    break
                t = time.perf_counter()
                micro = [order[step * s.grad_accum + k] for k in range(s.grad_accum)]
                step_terms = sum(loss_terms(features[i]) for idx in micro for i in idx)
                micro_losses = torch.zeros(s.grad_accum, dtype=torch.float64, device=device)
                for k, idx in enumerate(micro):
                    feats, weight = rank_share(features, idx, rank, world, step_terms)
                    batch = {key: v.to(device) for key, v in collate(feats, pad_id).items()}
                    last = k == s.grad_accum - 1
                    with nullcontext() if ddp is None or last else ddp.no_sync():  # all-reduce once per step
                        with autocast:
                            loss = forward(**batch).loss
                        (loss * weight).backward()
                    micro_losses[k] = loss.detach() * (weight / world)
                step_loss = parallel.all_reduce_sum(micro_losses).sum()  # the mean over the step's loss terms
                if not torch.isfinite(step_loss):
                    raise UsageError(
                        f"The training loss became {step_loss.item()} at step {step + 1}; lower the learning rate."
                    )
                if s.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                timers["train"] += time.perf_counter() - t
                entry = {"step": step, "train_loss": step_loss.item(), "lr": lr}
                log.log(entry)
                bar.update(1)
                bar.set_postfix(loss=f"{entry['train_loss']:.4f}", lr=f"{lr:.2e}")
                if step == total or (s.eval_every and step % s.eval_every == 0):
                    run_eval(step)
                if step == total or (s.save_every and step % s.save_every == 0):
                    checkpoint(step)
                    last_saved = step
                if on_step is not None:
                    on_step(step, entry)
            if step < total:  # asked to stop
                ckpt = checkpoint(step) if last_saved != step else latest_checkpoint(out)
                raise TrainingInterrupted(step, ckpt)
    finally:
        bar.close()
    return TrainResult(step, timers["train"], timers["eval"], log.entries, resumed_from)
