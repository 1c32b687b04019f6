"""Code written against the API before `LoraOneConfig` runs unchanged for one release: each public function
called the old way (flat settings, old names, arguments by position) warns once with a `DeprecationWarning`
that names the new spelling, and gives what the new way gives, bit for bit. `LoraOneConfig`'s checks are
one-line `UsageError`s naming the setting."""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import lm_batches, tiny_llama
from peft import LoraConfig
from tiny_models import LORA

from lora_one import (
    LoraOneCallback,
    LoraOneConfig,
    create_optimizer,
    estimate_gradients,
    get_lora_one_model,
    init_lora_one,
    save_adapter,
    search_gamma,
)
from lora_one.cli import build_parser
from lora_one.cli.args import settings_from
from lora_one.core.errors import UsageError

# the timings differ from call to call; everything else the init records must not
TIMINGS = ("gradient_seconds", "svd_seconds", "seconds")


def old_way(call, *args, says: tuple[str, ...], **kwargs):
    """`call(*args, **kwargs)`, which must warn exactly once, a DeprecationWarning saying each of `says`."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call(*args, **kwargs)
    deprecations = [w for w in caught if issubclass(w.category, DeprecationWarning)]
    assert len(deprecations) == 1, [str(w.message) for w in caught]
    message = str(deprecations[0].message)
    assert all(s in message for s in says), message
    assert deprecations[0].filename == __file__  # it points at the caller's line
    return result


def new_way(call, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        return call(*args, **kwargs)


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def lora_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def untimed(value):
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if k not in TIMINGS}
    return [untimed(v) for v in value] if isinstance(value, list) else value


def test_estimate_gradients_old_names_and_positions():
    batches = lm_batches(n=6, batch_size=2)
    new = new_way(estimate_gradients, tiny_llama(), batches, grad_mode="sketch", rank=2, sketch_passes=2,
                  init_samples=4, show_progress_bar=False)
    by_name = old_way(estimate_gradients, tiny_llama(), batches, mode="sketch", rank=2, passes=2, num_samples=4,
                      progress=False, says=("mode= is now grad_mode=", "passes= is now sketch_passes=",
                                            "num_samples= is now init_samples=",
                                            "progress= is now show_progress_bar="))
    # the old order: target_modules, progress, mode, offload, rank, oversample, seed, passes, num_samples
    by_position = old_way(estimate_gradients, tiny_llama(), batches, "all-linear", False, "sketch", False, 2, None, 0,
                          2, 4, says=("pass target_modules, progress, mode, offload, rank, oversample, seed, passes, "
                                      "num_samples by keyword",))
    for old in (by_name, by_position):
        assert old.keys() == new.keys()
        assert all(torch.equal(old[n].U, new[n].U) and torch.equal(old[n].S, new[n].S) for n in new)


def test_estimate_gradients_cache_dir_is_grad_cache(tmp_path):
    batches = lm_batches()
    new = new_way(estimate_gradients, tiny_llama(), batches, init_samples=4, grad_cache=tmp_path / "new",
                  show_progress_bar=False)
    old = old_way(estimate_gradients, tiny_llama(), batches, num_samples=4, cache_dir=tmp_path / "old", progress=False,
                  says=("cache_dir= is now grad_cache=",))
    assert same_tensors(old, new)
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == sorted(p.name for p in (tmp_path / "new").iterdir())


def test_get_lora_one_model_flat_settings_go_into_the_config():
    batches = lm_batches(n=8)
    new = new_way(get_lora_one_model, tiny_llama(), LoraConfig(**LORA), batches, show_progress_bar=False,
                  config=LoraOneConfig(variant="lora-one", gamma=[16, 64, 256], grad_mode="sketch", sketch_passes=3,
                                       init_samples=4, seed=2))
    old = old_way(get_lora_one_model, tiny_llama(), LoraConfig(**LORA), batches, variant="lora-one",
                  gamma=[16, 64, 256], grad_mode="sketch", sketch_passes=3, num_samples=4, seed=2, progress=False,
                  says=("num_samples= is now init_samples=", "progress= is now show_progress_bar=",
                        "variant=, gamma=, seed=, grad_mode=, sketch_passes=, init_samples= belong in "
                        "config=LoraOneConfig(variant='lora-one', gamma=[16, 64, 256]"))
    assert same_tensors(lora_state(old), lora_state(new))
    assert untimed(old.lora_one_metadata) == untimed(new.lora_one_metadata)
    assert new.lora_one_metadata["config"]["gamma"] == [16, 64, 256]


def test_get_lora_one_model_old_positions():
    batches = lm_batches()
    new = new_way(get_lora_one_model, tiny_llama(), LoraConfig(**LORA), batches,
                  config=LoraOneConfig(variant="spectral", gamma=64.0, svd="exact", seed=1, init_samples=4),
                  show_progress_bar=False)
    # the old order after the batches: variant, gamma, svd, seed, adapter_name, progress
    old = old_way(get_lora_one_model, tiny_llama(), LoraConfig(**LORA), batches, "spectral", 64.0, "exact", 1,
                  "default", False, num_samples=4,
                  says=("pass variant, gamma, svd, seed, adapter_name, progress by keyword",))
    assert same_tensors(lora_state(old), lora_state(new))
    assert untimed(old.lora_one_metadata) == untimed(new.lora_one_metadata)


def test_a_flat_setting_beside_a_config_is_one_error_line():
    with pytest.raises(UsageError, match=r"^get_lora_one_model: give gamma inside config") as info:
        get_lora_one_model(tiny_llama(), LoraConfig(**LORA), lm_batches(), config=LoraOneConfig(), gamma=64)
    assert "\n" not in str(info.value)
    with pytest.raises(UsageError, match=r"give init_samples= alone \(num_samples= is its old name\)"):
        estimate_gradients(tiny_llama(), lm_batches(), init_samples=4, num_samples=4)


def test_init_lora_one_and_search_gamma_old_positions():
    batches = lm_batches()
    G = new_way(estimate_gradients, tiny_llama(), batches, init_samples=4, show_progress_bar=False)

    def wrapped():
        return new_way(get_lora_one_model, tiny_llama(), LoraConfig(**LORA), None,
                       config=LoraOneConfig(variant="lora"))

    new_model, old_model = wrapped(), wrapped()
    new_stats = new_way(init_lora_one, new_model, G, variant="spectral", gamma=64.0, svd="exact", seed=3)
    old_stats = old_way(init_lora_one, old_model, G, "spectral", 64.0, "exact", 3,
                        says=("pass variant, gamma, svd, seed by keyword",))
    assert old_stats == new_stats and same_tensors(lora_state(old_model), lora_state(new_model))

    new_search = new_way(search_gamma, new_model, G, batches, variant="lora-one", grid=[16.0, 64.0])
    old_search = old_way(search_gamma, old_model, G, batches, "lora-one", [16.0, 64.0],
                         says=("pass variant, grid by keyword",))
    assert untimed(old_search) == untimed(new_search)


def test_callback_flat_settings_and_positions_go_into_the_config(tmp_path):
    new = new_way(LoraOneCallback, config=LoraOneConfig(init_samples=5, gamma=64.0, grad_mode="sketch",
                                                        grad_cache=tmp_path))
    by_name = old_way(LoraOneCallback, init_samples=5, gamma=64.0, grad_mode="sketch", cache_dir=tmp_path,
                      says=("cache_dir= is now grad_cache=", "belong in config=LoraOneConfig("))
    by_position = old_way(LoraOneCallback, 5, "lora-one", 64.0, "sketch", None, 0, "randomized", str(tmp_path),
                          says=("pass init_samples, variant, gamma, grad_mode, sketch_passes, seed, svd, cache_dir by "
                                "keyword",))
    for old in (by_name, by_position):
        assert old.config == new.config and old.state() == new.state()


def test_callback_state_restores_the_config_from_a_checkpoint(tmp_path):
    """`transformers.Trainer` rebuilds a stateful callback as `cls(**state["args"])`: from today's state, and
    from the flat args a checkpoint of the previous release holds (with the warning)."""
    callback = LoraOneCallback(config=LoraOneConfig(init_samples=5, gamma=[16.0, 64.0], grad_cache=tmp_path))
    state = json.loads(json.dumps(callback.state()))  # as trainer_state.json keeps it
    assert new_way(LoraOneCallback, **state["args"]).config == callback.config
    previous = {"init_samples": 5, "variant": "lora-one", "gamma": [16.0, 64.0], "grad_mode": "accumulate",
                "sketch_passes": None, "seed": 0, "svd": "randomized", "cache_dir": str(tmp_path)}
    assert old_way(LoraOneCallback, **previous, says=("cache_dir= is now grad_cache=",)).config == callback.config


def test_create_optimizer_reg_is_prec_reg_and_old_positions():
    model = new_way(get_lora_one_model, tiny_llama(), LoraConfig(**LORA), lm_batches(),
                    config=LoraOneConfig(init_samples=4), show_progress_bar=False)
    loss = model(**lm_batches()[0]).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def stepped(make):
        """The trainable parameters after one step of the optimizer `make` builds on a copy of the model."""
        twin = copy.deepcopy(model)
        for n, p in twin.named_parameters():
            p.grad = grads[n].clone() if n in grads else None  # the preconditioner rewrites it in place
        make(twin).step()
        return lora_state(twin)

    new = stepped(lambda m: new_way(create_optimizer, m, 1e-2, precondition=True, prec_reg=1e-3, weight_decay=0.1))
    by_name = stepped(lambda m: old_way(create_optimizer, m, 1e-2, precondition=True, reg=1e-3, weight_decay=0.1,
                                        says=("reg= is now prec_reg=",)))
    by_position = stepped(lambda m: old_way(create_optimizer, m, 1e-2, True, 1e-3, 0.1,
                                            says=("pass precondition, reg, weight_decay by keyword",)))
    assert same_tensors(by_name, new) and same_tensors(by_position, new)


def test_save_adapter_old_positions(tmp_path):
    model = new_way(get_lora_one_model, tiny_llama(), LoraConfig(**LORA), lm_batches(),
                    config=LoraOneConfig(init_samples=4), show_progress_bar=False)
    new_way(save_adapter, model, tmp_path / "new", extra={"run": 1}, base_model_name="owner/base")
    old_way(save_adapter, model, tmp_path / "old", {"run": 1}, "owner/base",
            says=("pass extra, base_model_name by keyword",))
    files = sorted(p.name for p in (tmp_path / "new").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "old").iterdir())
    for name in files:
        assert (tmp_path / "old" / name).read_bytes() == (tmp_path / "new" / name).read_bytes(), name


@pytest.mark.parametrize("command", ["compare", "demo"])
def test_the_steps_flag_is_max_steps(command, capsys):
    required = (["--model", "m", "--data", "d", "--eval-data", "v", "--out", "o"] if command == "compare" else [])

    def parsed(*flags):
        args = build_parser().parse_args([command, *required, *flags])
        return settings_from(args).max_steps if command == "compare" else args.max_steps

    assert parsed("--max-steps", "7") == 7 and capsys.readouterr().err == ""
    assert parsed("--steps", "7") == 7
    assert "--steps is deprecated and is removed in lora-one 0.3; use --max-steps" in capsys.readouterr().err
    assert "--steps" not in build_parser()._subparsers._group_actions[0].choices[command].format_help()


@pytest.mark.parametrize("settings, message", [
    ({"variant": "lora-two"}, "Unknown variant 'lora-two'; choose one of lora-one, spectral"),
    ({"gamma": 0}, "gamma must be a positive number, got 0"),
    ({"gamma": "fast"}, "gamma='fast': give a positive number, 'auto'"),
    ({"gamma": [8.0, -1.0]}, "every value of a gamma grid must be a positive number"),
    ({"gamma": "auto", "variant": "pissa"}, "searches the step of lora-one and spectral; for pissa"),
    ({"svd": "fast"}, "Unknown svd 'fast'; use one of randomized, exact"),
    ({"seed": 1.5}, "seed must be an integer, got 1.5"),
    ({"grad_mode": "stream"}, "Unknown grad_mode 'stream'; use one of accumulate, single-batch, sketch"),
    ({"sketch_passes": 0, "grad_mode": "sketch"}, "sketch_passes must be an integer >= 1, got 0"),
    ({"sketch_passes": 2}, "sketch_passes=2 needs grad_mode='sketch'"),
    ({"init_samples": 0}, "init_samples must be an integer >= 1, or None for every example given; got 0"),
    ({"init_samples": True}, "init_samples must be an integer >= 1"),
    ({"offload": "yes"}, "offload must be True or False, got 'yes'"),
    ({"grad_cache": 3}, "grad_cache must be a folder (a path), got int"),
])
def test_config_checks_are_one_line_usage_errors(settings, message):
    with pytest.raises(UsageError) as info:
        LoraOneConfig(**settings)
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)
    with pytest.raises(UsageError):  # a changed copy is checked again
        dataclasses.replace(LoraOneConfig(), **settings)


def test_config_is_frozen_and_round_trips_through_json(tmp_path):
    config = LoraOneConfig(gamma=[64, 16], grad_mode="sketch", sketch_passes=3, grad_cache=Path(tmp_path))
    assert config.gamma == (64, 16) and config.grad_cache == str(tmp_path)
    assert LoraOneConfig(**json.loads(json.dumps(config.as_json()))) == config
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.gamma = 8.0
    with pytest.raises(UsageError, match="config has no setting 'num_samples'"):
        LoraOneCallback(config={"num_samples": 8})
    with pytest.raises(UsageError, match="LoraOneCallback reads init_samples examples"):
        LoraOneCallback(config=LoraOneConfig(init_samples=None))
