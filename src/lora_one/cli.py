"""`lora-one` command line. Each subcommand is a plain function over the library's parts."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from peft import LoraConfig

from lora_one import parallel
from lora_one.config import DEFAULT_MAX_LENGTH, check_shared_settings, check_writable, complete_model_settings
from lora_one.data import (
    TOO_LONG,
    Fields,
    causal_lm_features,
    classification_features,
    init_batches,
    label_mapping,
    read_records,
)
from lora_one.demo import add_demo_parser
from lora_one.errors import UsageError
from lora_one.evaluate import add_eval_parser
from lora_one.files import check_out_folder
from lora_one.finetune import add_finetune_parser
from lora_one.gradients import MODES
from lora_one.init import get_lora_one_model
from lora_one.merge import add_merge_parser
from lora_one.models import CAUSAL_LM, HUB_IDS, TASKS, infer_task, load_model, resolve_model_path
from lora_one.save import save_adapter
from lora_one.spectral import VARIANTS
from lora_one.toys import add_toy_parser


def add_model_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="alias (smollm2-135m, minilm-l6) or a local HF folder")
    p.add_argument("--data", required=True, help="training data: JSON Lines, a JSON array or CSV (UTF-8)")
    p.add_argument("--task", choices=TASKS, help="default: causal-lm for *ForCausalLM models, else classification")
    p.add_argument("--max-length", type=int,
                   help=f"tokens per example (default: {DEFAULT_MAX_LENGTH}, or the model's positions if fewer)")
    p.add_argument("--too-long", choices=TOO_LONG, default="truncate",
                   help="a longer record: truncate (causal LM: the prompt's start; classification: the text's "
                   "end), skip, or error; the count is printed")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--prompt-field", default="prompt")
    p.add_argument("--response-field", default="response")
    p.add_argument("--text-field", default="text")
    p.add_argument("--label-field", default="label")
    p.add_argument("--chat-template", action="store_true", help="wrap prompts in the tokenizer's chat template")


def add_lora_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--no-rslora", dest="rslora", action="store_false", help="scale alpha/r instead of alpha/sqrt(r)")
    p.add_argument("--dora", action="store_true",
                   help="DoRA adapters; with lora-one or spectral the magnitude starts at the norms of W + sBA (DoRA-One)")
    p.add_argument("--gamma", type=float, default=128.0)
    p.add_argument("--init-samples", type=int, default=8)
    p.add_argument("--init-batch-size", type=int, default=1)
    p.add_argument("--target", default="all-linear", help="'all-linear' or comma-separated module names")
    p.add_argument("--svd", choices=("randomized", "exact"), default="randomized")
    p.add_argument("--grad-mode", choices=MODES, default="accumulate",
                   help="memory mode of the gradient phase (sketch: no full gradient is ever formed)")
    p.add_argument("--offload", action="store_true", help="keep accumulate mode's fp32 accumulators on CPU")
    p.add_argument("--sketch-passes", type=int,
                   help="passes over the init data in sketch mode (default 2); more passes, a more accurate "
                   "top-r SVD (README: sketch accuracy)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base-model-name",
                   help="base model named in the saved adapter_config.json, e.g. a Hub id (default: an alias's "
                   "Hub id, else the --model folder)")


def base_model_name_of(args) -> str | None:
    """The base model the saved adapter names (None: PEFT's default, the folder the model came from)."""
    return args.base_model_name or HUB_IDS.get(args.model)


def fields_of(args) -> Fields:
    return Fields(args.prompt_field, args.response_field, args.text_field, args.label_field)


def target_modules_of(args):
    return args.target if args.target == "all-linear" else [t.strip() for t in args.target.split(",") if t.strip()]


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, an --out that cannot be a folder of outputs or holds files (unless --overwrite)."""
    check_out_folder(out)
    check_writable(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"--out {str(out)!r} exists and is not empty; pass --overwrite or choose another folder.")


def lora_config_of(args, task: str) -> LoraConfig:
    return LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha,
        use_rslora=args.rslora,
        use_dora=args.dora,
        target_modules=target_modules_of(args),
        lora_dropout=0.0,
        task_type="CAUSAL_LM" if task == CAUSAL_LM else "SEQ_CLS",
    )


def load_task_data(args, path: str):
    """`(model, tokenizer, task, records, features, label2id)` for the training data at `path`."""
    model_path = resolve_model_path(args.model)
    task = args.task or infer_task(model_path)
    fields = fields_of(args)
    records = read_records(path, task, fields)
    label2id = None if task == CAUSAL_LM else label_mapping(records, fields)
    model, tokenizer, task = load_model(args.model, task, num_labels=len(label2id) if label2id else None)
    if task == CAUSAL_LM:
        feats = causal_lm_features(records, tokenizer, args.max_length, fields, args.chat_template, args.too_long)
    else:
        model.config.label2id, model.config.id2label = label2id, {i: k for k, i in label2id.items()}
        feats = classification_features(records, tokenizer, args.max_length, label2id, fields, args.too_long)
    if feats.note and parallel.is_main_process():
        print(f"{path}: {feats.note}", flush=True)
    records = [records[i] for i in feats.kept]  # one record per feature, as the callers index them
    return model, tokenizer, task, records, feats, label2id


def print_layer_table(stats: list[dict]) -> None:
    print(f"{'layer':<48} {'shape':>12} {'sigma_1':>10} {'|sBA|/|W|':>10}")
    for s in stats:
        sigma = f"{s['sigma_1']:.3e}" if s["sigma_1"] is not None else "-"
        shape = "x".join(map(str, s["shape"]))
        print(f"{s['layer']:<48} {shape:>12} {sigma:>10} {s['relative_update']:>10.3e}")


def cmd_init(args) -> None:
    out = Path(args.out)
    check_shared_settings(args)
    check_out_dir(out, args.overwrite)
    complete_model_settings(args)
    torch.manual_seed(args.seed)
    model, tokenizer, task, _, feats, _ = load_task_data(args, args.data)
    model.to(args.device)
    batches = init_batches(feats, args.init_samples, args.init_batch_size, args.seed, tokenizer.pad_token_id)
    peft_model = get_lora_one_model(
        model, lora_config_of(args, task), batches, variant=args.variant, gamma=args.gamma,
        svd=args.svd, seed=args.seed, grad_mode=args.grad_mode, offload=args.offload,
        sketch_passes=args.sketch_passes, num_samples=None,  # the batches hold exactly --init-samples
    )
    meta = peft_model.lora_one_metadata
    print_layer_table(meta["layers"])
    print(f"gradient phase {meta['gradient_seconds']:.2f} s, SVD phase {meta['svd_seconds']:.2f} s")
    save_adapter(peft_model, out, extra={"model": args.model, "data": str(args.data), "task": task},
                 base_model_name=base_model_name_of(args))
    print(f"saved the step-0 adapter and {out / 'lora_one.json'}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-one", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="compute the LoRA-One init and save the step-0 adapter")
    add_model_data_args(p)
    add_lora_args(p)
    p.add_argument("--variant", choices=VARIANTS, default="lora-one")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_init)

    add_finetune_parser(sub)
    add_eval_parser(sub)
    add_merge_parser(sub)
    add_demo_parser(sub)
    add_toy_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except UsageError as e:
        if os.environ.get("LORA_ONE_DEBUG"):
            raise
        print(f"lora-one {args.command}: error: {e}", file=sys.stderr)
        return 2
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
