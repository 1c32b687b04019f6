"""gamma="auto": the line search over gamma, checked against step-0 models built the plain way (a fixed gamma)
and a hand-written token-weighted loss on the held-out examples that follow the init samples; refusals; the
search leaves the model as it found it."""

import math
import warnings

import pytest
import torch
from conftest import _summed_cross_entropy, _unpadded, padded_batches, ragged_examples, tiny_bert, tiny_llama
from numerics import output_tol
from peft import LoraConfig
from tiny_models import LORA

from lora_one import LoraOneCallback, LoraOneConfig, estimate_gradients, get_lora_one_model, init_lora_one
from lora_one.core.constants import DEFAULT_GAMMA_GRID
from lora_one.core.errors import UsageError
from lora_one.core.gradcache import hash_batches
from lora_one.core.init import search_gamma
from lora_one.recipes.settings import parse_gamma

GRID = [1.0, 4.0, 16.0, 64.0, 256.0]


def reference_loss(model, batches, task) -> float:
    """The loss the gradient is of, written out: each example on its own, unpadded, in eval mode, the
    cross-entropy summed over every supervised term of all examples, over their number."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for example in _unpadded(batches):
            part, n = _summed_cross_entropy(model, example, task)
            total, count = total + float(part), count + n
    return total / count


def loss_tol(model, examples) -> float:
    """Relative bound between the search's loss of `examples` (in its batches) and `reference_loss` (each alone):
    two float32 computations of one loss, each within `output_tol` of the exact value."""
    positions = max(len(e["input_ids"]) for e in examples)
    terms = sum(int((e["labels"] != -100).sum()) for e in examples)  # label tokens, or one class each
    return 2 * output_tol(model, positions, terms)


def adapter(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}


LENGTHS = (5, 9, 14, 7, 6, 11, 8, 10)  # 4 init examples, then 4 held out


def examples(task="causal"):
    return ragged_examples(LENGTHS, task=task)


def ragged(task="causal"):
    """8 ragged examples in micro-batches of 3: right padding, a batch cut between the init samples and the
    held-out ones, and a short last batch."""
    return padded_batches(examples(task), 3)


def build(make, batches, variant="lora-one", gamma=128.0, search_batches=None, **config):
    return get_lora_one_model(make(), LoraConfig(**{**LORA, **config}), batches,
                              config=LoraOneConfig(variant=variant, gamma=gamma, init_samples=4),
                              show_progress_bar=False, search_batches=search_batches)


@pytest.mark.parametrize(("variant", "make", "task", "config"), [
    ("lora-one", tiny_llama, "causal", {}), ("spectral", tiny_llama, "causal", {}),
    ("lora-one", tiny_bert, "cls", {"task_type": "SEQ_CLS"}),  # the loss: a mean over examples
])
def test_search_picks_the_lowest_reference_loss_and_builds_the_fixed_gamma_adapter(variant, make, task, config):
    batches, held_out = ragged(task), examples(task)[4:]
    expected = [reference_loss(build(make, batches, variant, g, **config), held_out, task) for g in GRID]
    tol = loss_tol(make(), held_out)
    best, second = sorted(expected)[:2]
    assert second - best > 2 * tol * second  # the argmin is not round-off: both computations find the same
    auto = build(make, batches, variant, GRID, **config)
    search = auto.lora_one_metadata["gamma_search"]
    assert search["grid"] == GRID and search["samples"] == 4
    assert search["losses"] == pytest.approx(expected, rel=tol)
    assert search["loss_without_step"] == pytest.approx(reference_loss(make(), held_out, task), rel=tol)
    chosen = GRID[expected.index(min(expected))]
    assert search["chosen"] == chosen == auto.lora_one_metadata["gamma"]
    fixed = adapter(build(make, batches, variant, chosen, **config))
    got = adapter(auto)
    assert got.keys() == fixed.keys() and all(torch.equal(got[k], fixed[k]) for k in fixed)  # bit for bit


def test_dora_one_searches_the_exact_step0_model():
    """With DoRA the search resets the magnitude for each gamma, so its losses are those of the DoRA-One
    models built at each fixed gamma, and the adapter (magnitude included) is that of the chosen one."""
    batches = ragged()
    expected = [reference_loss(build(tiny_llama, batches, gamma=g, use_dora=True), examples()[4:], "causal")
                for g in GRID]
    auto = build(tiny_llama, batches, gamma=GRID, use_dora=True)
    search = auto.lora_one_metadata["gamma_search"]
    assert search["losses"] == pytest.approx(expected, rel=loss_tol(tiny_llama(), examples()[4:]))
    fixed = adapter(build(tiny_llama, batches, gamma=search["chosen"], use_dora=True))
    got = adapter(auto)
    assert any("magnitude" in k for k in got)
    assert got.keys() == fixed.keys() and all(torch.equal(got[k], fixed[k]) for k in fixed)


def test_the_search_samples_are_the_held_out_ones_or_those_given():
    """By default the examples after the init samples (the init's own would favour larger steps); the init
    samples themselves with search_batches=batches; any batches given."""
    batches = ragged()
    held_out = build(tiny_llama, batches, gamma=GRID).lora_one_metadata
    on_init = build(tiny_llama, batches, gamma=GRID, search_batches=batches).lora_one_metadata
    given = padded_batches(examples()[4:], 4)
    on_given = build(tiny_llama, batches, gamma=GRID, search_batches=given).lora_one_metadata
    assert on_init["gamma_search"]["samples_sha256"] == on_init["init_samples_sha256"]
    assert held_out["gamma_search"]["samples_sha256"] != held_out["init_samples_sha256"]
    assert on_given["gamma_search"]["samples_sha256"] == hash_batches(given)
    # the same examples in other batches
    assert on_given["gamma_search"]["losses"] == pytest.approx(held_out["gamma_search"]["losses"],
                                                               rel=loss_tol(tiny_llama(), examples()[4:]))
    init_model = build(tiny_llama, batches, gamma=GRID[0])
    assert on_init["gamma_search"]["losses"][0] == pytest.approx(
        reference_loss(init_model, examples()[:4], "causal"), rel=loss_tol(init_model, examples()[:4]))
    with pytest.raises(UsageError, match=r"judges each step on init_samples=4 training examples after the init "
                                         r"samples, .* hold only 3 more; pass more batches, or search_batches="):
        build(tiny_llama, ragged()[:-1] + [{k: v[:1] for k, v in ragged()[-1].items()}], gamma=GRID)
    with pytest.raises(UsageError, match=r"gamma search with init_samples=None: .*pass search_batches="):
        get_lora_one_model(tiny_llama(), LoraConfig(**LORA), batches,
                           config=LoraOneConfig(gamma="auto", init_samples=None))


def test_auto_is_the_default_grid_with_128():
    assert 128.0 in DEFAULT_GAMMA_GRID and list(DEFAULT_GAMMA_GRID) == sorted(DEFAULT_GAMMA_GRID)
    batches = ragged()
    search = build(tiny_llama, batches, gamma="auto").lora_one_metadata["gamma_search"]
    assert search["grid"] == list(DEFAULT_GAMMA_GRID) and len(search["losses"]) == len(DEFAULT_GAMMA_GRID)
    assert search["seconds"] > 0


def test_the_search_leaves_factors_and_modes_as_found():
    batches = ragged()
    model = build(tiny_llama, batches, gamma=16.0, use_dora=True)
    before = adapter(model)
    model.train()
    modes = {n: m.training for n, m in model.named_modules()}
    search_gamma(model, estimate_gradients(tiny_llama(), batches, show_progress_bar=False, init_samples=None), batches,
                 grid=GRID)
    after = adapter(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert modes == {n: m.training for n, m in model.named_modules()}


def test_a_non_finite_loss_is_recorded_as_none_and_never_wins():
    """A loss that overflows at the largest step (the smallest gamma, evaluated first): that gamma is skipped."""
    batches = ragged()
    model = build(tiny_llama, batches)
    G = estimate_gradients(tiny_llama(), batches, show_progress_bar=False, init_samples=None)
    calls = []

    def train_step(model, batch):
        calls.append(batch)
        loss = model(**batch).loss
        return loss * math.inf if len(calls) <= len(batches) else loss

    search = search_gamma(model, G, batches, grid=GRID, train_step=train_step)
    assert search["losses"][0] is None and all(loss is not None for loss in search["losses"][1:])
    assert search["chosen"] != GRID[0]
    with pytest.raises(UsageError, match="Every gamma of the grid"):
        search_gamma(model, G, batches, grid=GRID, train_step=lambda m, b: m(**b).loss * math.nan)


def test_warnings_at_the_ends_of_the_grid():
    batches = ragged()
    with pytest.warns(UserWarning, match=r"grid's smallest \(the largest step\) gamma 1e\+06"):
        build(tiny_llama, batches, gamma=[1e6, 1e7])  # tiny steps: the larger one is better
    # small steps down the loss's gradient all raise its negative: the smallest step is the best, and no good
    model, G = build(tiny_llama, batches), estimate_gradients(tiny_llama(), batches, show_progress_bar=False,
                                                              init_samples=None)
    with pytest.warns(UserWarning) as caught:
        search_gamma(model, G, batches, grid=[1e3, 1e4], train_step=lambda m, b: -m(**b).loss)
    said = [str(w.message) for w in caught]
    assert any("grid's largest (the smallest step) gamma 10000;" in m for m in said), said
    assert any("no gamma of the grid lowers the loss below the model's without a step" in m for m in said), said


@pytest.mark.parametrize("variant", ["lora-one-v1", "lora-ga", "pissa", "lora"])
def test_variants_whose_step0_model_ignores_gamma_refuse_auto_before_any_work(variant):
    def never():
        raise AssertionError("read the batches")
        yield

    with pytest.raises(UsageError, match=r"searches the step of lora-one and spectral; .*pass a number"):
        get_lora_one_model(tiny_llama(), LoraConfig(**LORA), never(),
                           config=LoraOneConfig(variant=variant, gamma="auto"))
    if variant == "lora":  # the only one of them the callback takes
        with pytest.raises(UsageError, match="pass a number"):
            LoraOneCallback(config=LoraOneConfig(variant=variant, gamma="auto"))


@pytest.mark.parametrize("gamma", ["fast", [], [0.0, 8.0], -1.0, math.inf, True, ["a"]])
def test_bad_gamma_is_one_line(gamma):
    with pytest.raises(UsageError, match="gamma"):
        get_lora_one_model(tiny_llama(), LoraConfig(**LORA), ragged(), config=LoraOneConfig(gamma=gamma))


def test_init_lora_one_takes_one_gamma():
    model = build(tiny_llama, None, variant="lora")
    with pytest.raises(UsageError, match=r"takes one gamma.*search_gamma"):
        init_lora_one(model, {}, gamma="auto")


def test_parse_gamma():
    assert parse_gamma("auto") == "auto"
    assert parse_gamma(" 64 ") == 64.0
    assert parse_gamma("32,64,128") == (32.0, 64.0, 128.0)
    with pytest.raises(UsageError, match="--gamma 'big'"):
        parse_gamma("big")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert parse_gamma("1e3") == 1000.0
