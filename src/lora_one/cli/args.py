"""Flags from the settings dataclasses, and `--config FILE` (YAML or JSON) under the flags.

`add_settings(parser, cls)` adds one flag per field of `cls` (help, type, choices and default from
the field), grouped by the class that declares it, plus `--config`. Every flag's parsed default is a
sentinel, so after parsing, the flags the user typed are told apart from those left alone whatever
their value; `settings_from(args)` takes the typed flags, then the config file's keys (the fields'
names, with `-` or `_`), then the fields' defaults. A finished run's `args.json` loads back as a
config (JSON is YAML).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from pathlib import Path

import yaml

from lora_one.core.deprecation import REMOVED_IN
from lora_one.core.errors import UsageError


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


UNSET = _Unset()


def _base_type(hint) -> type:
    """`int | None` -> int."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def add_settings(parser: argparse.ArgumentParser, cls) -> argparse.ArgumentParser:
    hints = typing.get_type_hints(cls)
    groups = {}
    for f in dataclasses.fields(cls):
        owner = next(c for c in reversed(cls.__mro__) if f.name in getattr(c, "__dataclass_fields__", {}))
        if owner not in groups:
            groups[owner] = parser.add_argument_group(owner.__doc__.split("(")[0].strip())
        meta, kind = f.metadata, _base_type(hints[f.name])
        help_text = meta["help"]
        if f.default is not dataclasses.MISSING and f.default is not None and kind is not bool:
            help_text += f" (default: {f.default})"
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        if meta.get("parse"):  # read by the field's own parser in settings_from, so errors are ours
            groups[owner].add_argument(flag, dest=f.name, default=UNSET, help=help_text)
        elif kind is bool:
            action = "store_false" if f.default else "store_true"
            groups[owner].add_argument(flag, dest=f.name, action=action, default=UNSET, help=help_text)
        else:
            groups[owner].add_argument(flag, dest=f.name, type=kind, choices=meta.get("choices"), default=UNSET,
                                       help=help_text + (" (required)" if meta.get("required") else ""))
    parser.add_argument("--config", help="YAML or JSON file of settings (a run's args.json too); flags given on the "
                        "command line override it")
    parser.set_defaults(settings_class=cls)
    return parser


class _OldFlag(argparse.Action):
    """A flag's old name: it sets what the new one sets, with a warning naming the new one."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: warning: {option_string} is deprecated and is removed in lora-one {REMOVED_IN}; use "
              f"{self.new}.", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_old_flag(parser: argparse.ArgumentParser, old: str, new: str) -> None:
    """Keep `old` working for one release as another name of the flag `new` (hidden from --help)."""
    target = next(a for a in parser._actions if new in a.option_strings)
    parser.add_argument(old, dest=target.dest, type=target.type, default=target.default, action=_OldFlag, new=new,
                        help=argparse.SUPPRESS)


def _coerce(kind: type, choices, key: str, value, source: str):
    if value is None:
        return None
    if kind is bool:
        if not isinstance(value, bool):
            raise UsageError(f"{source}: {key}={value!r} must be true or false.")
        return value
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise UsageError(f"{source}: {key}={value!r} must be a {kind.__name__}.")
        if kind is int and isinstance(value, float) and value != int(value):
            raise UsageError(f"{source}: {key}={value!r} must be an integer.")
        try:
            value = kind(value)
        except (TypeError, ValueError):
            raise UsageError(f"{source}: {key}={value!r} is not a valid {kind.__name__}.") from None
    elif isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)  # e.g. target: [q_proj, v_proj]
    else:
        value = str(value)
    if choices is not None and value not in choices:
        raise UsageError(f"{source}: {key}={value!r} is not one of {list(choices)}.")
    return value


def convert(f: dataclasses.Field, hint, key: str, value, source: str):
    """A setting's value from a flag's text or a config's YAML value: the field's own parser (e.g.
    `--gamma`), else its type and choices."""
    parse = f.metadata.get("parse")
    if parse is None:
        return _coerce(_base_type(hint), f.metadata.get("choices"), key, value, source)
    if value is None:
        return None
    return parse(",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value))


def load_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"Config file {str(path)!r} does not exist.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UsageError(f"Cannot parse {str(path)!r} as YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{str(path)!r} must hold a mapping of settings (key: value), not a {type(data).__name__}.")
    return data


def settings_from(args: argparse.Namespace):
    """The settings dataclass of a parsed command: flags, else `--config`, else the defaults."""
    cls = args.settings_class
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    source = args.config
    from_file = {}
    for key, value in (load_config(source) if source else {}).items():
        name = str(key).replace("-", "_")
        if name not in fields:
            raise UsageError(f"{source}: unknown setting {key!r}; known: {', '.join(sorted(fields))}.")
        from_file[name] = convert(fields[name], hints[name], key, value, source)
    values = {}
    for name, f in fields.items():
        typed = getattr(args, name)
        if typed is not UNSET:
            values[name] = convert(f, hints[name], name, typed, "command line") if f.metadata.get("parse") else typed
        elif name in from_file:
            values[name] = from_file[name]
    missing = [f"--{n.replace('_', '-')}" for n, f in fields.items() if f.metadata.get("required") and n not in values]
    if missing:
        raise UsageError(f"missing required setting(s) {', '.join(missing)} (give the flag or a config key).")
    return cls(**values)
