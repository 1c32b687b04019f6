"""The old spellings of the public functions' arguments, accepted for one release with a `DeprecationWarning`.

Before `LoraOneConfig`, the init's settings were flat keywords (`get_lora_one_model(..., variant=...,
num_samples=8)`), some under other names (`mode`, `passes`, `num_samples`, `progress`, `cache_dir`,
`reg`), and every argument could be passed by position. `deprecated_arguments` maps such a call onto the
current signature: extra positional arguments to the names they had, old names to new ones, and the
config's fields given flat into `config=LoraOneConfig(...)`; one warning per call says what to write now.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable

from lora_one.core.config import CONFIG_FIELDS, LoraOneConfig
from lora_one.core.errors import UsageError

REMOVED_IN = "0.3"  # the release that drops the old spellings

# old name -> the name every public function now gives the same concept
RENAMED = {"mode": "grad_mode", "passes": "sketch_passes", "num_samples": "init_samples",
           "progress": "show_progress_bar", "cache_dir": "grad_cache", "reg": "prec_reg"}


def deprecated_arguments(old_positional: tuple[str, ...] = (), into_config: bool = False) -> Callable:
    """Decorate a public function so that calls written for its previous signature still work.

    Args:
        old_positional: the previous names, in order, of the positional arguments that follow the
            current positional ones (now keyword-only).
        into_config: the function takes `config`; `LoraOneConfig`'s fields given as keywords go into it.

    Returns:
        The decorator.
    """

    def decorate(fn: Callable) -> Callable:
        params = inspect.signature(fn).parameters
        n_positional = sum(p.kind is p.POSITIONAL_OR_KEYWORD for p in params.values())
        takes = set(params) | (set(CONFIG_FIELDS) if into_config else set())
        renamed = {old: new for old, new in RENAMED.items() if new in takes and old not in takes}
        name = fn.__qualname__.removesuffix(".__init__")

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            notes = []
            if len(args) > n_positional:
                extra = args[n_positional:]
                given = old_positional[: len(extra)]
                for key, value in zip(given, extra):
                    if key in kwargs:
                        raise TypeError(f"{name}() got multiple values for argument {key!r}")
                    kwargs[key] = value
                args = args[:n_positional] + extra[len(given):]  # too many: the function's own TypeError
                notes.append(f"pass {', '.join(given)} by keyword")
            for old, new in renamed.items():
                if old in kwargs:
                    if new in kwargs:
                        raise UsageError(f"{name}: give {new}= alone ({old}= is its old name).")
                    kwargs[new] = kwargs.pop(old)
                    notes.append(f"{old}= is now {new}=")
            if into_config:
                _flat_settings_into_config(name, kwargs, notes)
            if notes:
                warnings.warn(f"{name}: {'; '.join(notes)} (the old spelling is removed in lora-one {REMOVED_IN}).",
                              DeprecationWarning, stacklevel=2)
            return fn(*args, **kwargs)

        return wrapper

    return decorate


def _flat_settings_into_config(name: str, kwargs: dict, notes: list[str]) -> None:
    flat = {key: kwargs.pop(key) for key in CONFIG_FIELDS if key in kwargs}
    if not flat:
        return
    if kwargs.get("config") is not None:
        raise UsageError(f"{name}: give {', '.join(flat)} inside config (dataclasses.replace(config, ...)), not "
                         "beside it.")
    kwargs["config"] = LoraOneConfig(**flat)
    shown = ", ".join(f"{key}={value!r}" for key, value in flat.items())
    notes.append(f"{', '.join(f'{k}=' for k in flat)} belong in config=LoraOneConfig({shown})")
