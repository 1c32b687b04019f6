"""Run settings as data: `--config run.yaml` supplies settings, flags given on the command line win.

`config_aware(parser)` replaces every option's default by a sentinel, so that after parsing, the
options the user typed are told apart from those left alone whatever their value. `resolve(args)`
fills the rest from the config file and then from the real defaults. Keys are the options' long
names, with `-` or `_`. A finished run's `args.json` loads back as a config (JSON is YAML).

`check_shared_settings` refuses bad settings that `init` and `finetune` share, before anything is
loaded, and `complete_model_settings` fills the defaults that depend on the machine or the model:
one place, so that both commands accept the same settings.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import yaml

from lora_one.errors import UsageError
from lora_one.models import max_positions, resolve_model_path
from lora_one.parallel import resolve_device


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


UNSET = _Unset()
# Keys of a saved args.json that are not settings of the run itself.
NOT_SETTINGS = ("command", "config")
# --max-length when not given, unless the model has fewer positions.
DEFAULT_MAX_LENGTH = 256


def config_aware(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add `--config`; remember the real defaults and which options are required."""
    parser.add_argument("--config", help="YAML or JSON file of settings; flags given on the command line override it")
    defaults, required = {}, []
    for action in parser._actions:
        if action.dest in ("help", "config") or action.default is argparse.SUPPRESS:
            continue
        defaults[action.dest] = action
        if action.required:  # may come from the config file instead
            action.required = False
            required.append(action.dest)
        elif action.default is not None and action.help is not argparse.SUPPRESS:
            action.help = f"{action.help or ''} (default: {action.default})".strip()
        action.real_default = action.default
        action.default = UNSET
    parser.set_defaults(_config_actions=defaults, _config_required=tuple(required))
    return parser


def _coerce(action: argparse.Action, key: str, value, source: str):
    if value is None:
        return None
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise UsageError(f"{source}: {key}={value!r} must be true or false.")
        return value
    kind = action.type
    if kind is not None:
        if isinstance(value, bool) or (kind in (int, float) and not isinstance(value, (int, float, str))):
            raise UsageError(f"{source}: {key}={value!r} must be a {kind.__name__}.")
        if kind is int and isinstance(value, float) and value != int(value):
            raise UsageError(f"{source}: {key}={value!r} must be an integer.")
        try:
            value = kind(value)
        except (TypeError, ValueError) as e:
            raise UsageError(f"{source}: {key}={value!r} is not a valid {kind.__name__}.") from e
    elif isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)  # e.g. target: [q_proj, v_proj]
    else:
        value = str(value)
    if action.choices is not None and value not in action.choices:
        raise UsageError(f"{source}: {key}={value!r} is not one of {list(action.choices)}.")
    return value


def load_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"Config file {str(path)!r} does not exist.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UsageError(f"Cannot parse {str(path)!r} as YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{str(path)!r} must hold a mapping of settings (key: value), not a {type(data).__name__}.")
    return data


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """A copy of `args` with every option set: command line, else config file, else default."""
    actions: dict[str, argparse.Action] = args._config_actions
    source = getattr(args, "config", None)
    from_file = {}
    for key, value in (load_config(source) if source else {}).items():
        dest = str(key).replace("-", "_")
        if dest in NOT_SETTINGS:
            continue
        if dest not in actions:
            raise UsageError(f"{source}: unknown setting {key!r}; known: {', '.join(sorted(actions))}.")
        from_file[dest] = _coerce(actions[dest], key, value, source)
    out = argparse.Namespace(**vars(args))
    for dest, action in actions.items():
        if getattr(out, dest, UNSET) is UNSET:
            setattr(out, dest, from_file.get(dest, action.real_default))
    missing = [f"--{d.replace('_', '-')}" for d in args._config_required if getattr(out, d) is None]
    if missing:
        raise UsageError(f"missing required setting(s) {', '.join(missing)} (give the flag or a config key).")
    return out


def settings_of(args: argparse.Namespace) -> dict:
    """The plain settings of a resolved namespace, as `args.json` records them."""
    return {
        k: v
        for k, v in sorted(vars(args).items())
        if not k.startswith("_") and k not in NOT_SETTINGS and k != "func"
    }


def check_shared_settings(args: argparse.Namespace) -> None:
    """Refuse bad values of the settings `init` and `finetune` share (the LoRA, init and data options,
    `--device`), before anything is loaded."""
    problems = []
    if args.rank < 1:
        problems.append(f"--rank must be >= 1, got {args.rank}")
    if not args.alpha > 0:
        problems.append(f"--alpha must be > 0, got {args.alpha} (a negative scale would step up the gradient)")
    if not args.gamma > 0:
        problems.append(f"--gamma must be > 0, got {args.gamma}")
    if args.init_samples < 1 or args.init_batch_size < 1:
        problems.append(f"--init-samples and --init-batch-size must be >= 1, got {args.init_samples} and "
                        f"{args.init_batch_size}")
    if args.sketch_passes is not None and args.sketch_passes < 1:
        problems.append(f"--sketch-passes must be >= 1, got {args.sketch_passes}")
    if args.max_length is not None and args.max_length < 2:
        problems.append(f"--max-length must be >= 2, got {args.max_length}")
    if not args.target.replace(",", "").strip():
        problems.append(f"--target {args.target!r} names no module; give all-linear or comma-separated module names")
    if problems:
        raise UsageError("; ".join(problems) + ".")
    resolve_device(args.device)


def complete_model_settings(args: argparse.Namespace) -> None:
    """Fill `--device auto` (with the kind of device: under a launcher each process takes its own
    index) and the default `--max-length` (256, or fewer when the model has fewer positions); refuse a
    `--max-length` above the model's positions."""
    if args.device == "auto":
        args.device = resolve_device("auto").type
    positions = max_positions(resolve_model_path(args.model))
    if args.max_length is None:
        args.max_length = min(DEFAULT_MAX_LENGTH, positions or DEFAULT_MAX_LENGTH)
    elif positions and args.max_length > positions:
        raise UsageError(f"--max-length {args.max_length} exceeds the model's {positions} positions "
                         f"(max_position_embeddings); give --max-length {positions} or less.")


def check_writable(path: str | os.PathLike, flag: str = "--out") -> None:
    """Refuse, before any work, an output path that cannot be made: outputs are written into a temporary
    sibling first, so the nearest existing folder above `path` must be a folder we may write in."""
    where = Path(os.path.abspath(path)).parent
    while not where.exists():
        where = where.parent
    if not where.is_dir():
        raise UsageError(f"{flag} {str(path)!r}: {str(where)!r} is a file, so nothing can be made under it; "
                         "choose another path.")
    if not os.access(where, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {str(path)!r}: no permission to write in {str(where)!r}; choose a folder you "
                         "can write in.")
