"""The gradient cache (`grad_cache=`): a later run with the same model, samples and gradient settings skips the
backward and gives the uncached run's adapter bit for bit; anything that changes the gradient is another entry;
a damaged entry is never used. Also the worker of the two-process test (`python test_grad_cache.py OUT`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import lm_batches, padded_batches, ragged_examples, tiny_llama
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from tiny_models import LORA

from lora_one import LoraOneConfig, estimate_gradients, get_lora_one_model
from lora_one.core import gradcache
from lora_one.core.errors import UsageError
from lora_one.core.gradcache import GradientCache

HERE = Path(__file__).parent
MODES = {"accumulate": ({}, 1), "sketch": ({"grad_mode": "sketch"}, 3),
         "single-batch": ({"grad_mode": "single-batch"}, 4)}  # mode: (settings, micro-batch size)
GRID = [2.0, 8.0, 32.0, 128.0]
LENGTHS = (5, 9, 14, 7, 6, 11, 8, 10)  # 4 init examples, 4 held out for the gamma search


def adapter(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}


def assert_identical(a, b):
    assert a.keys() == b.keys() and a and all(torch.equal(a[k], b[k]) for k in a)


def products(state):
    """`B @ A` per layer: fixed by the init, unlike the factors' joint sign per singular pair."""
    return {n: state[n.replace(".lora_A.", ".lora_B.")] @ a for n, a in state.items() if ".lora_A." in n}


def counted(model):
    """`model` and the list its forward calls are appended to."""
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    return model, calls


def init(batches, model=None, lora=LORA, search_batches=None, show_progress_bar=True, **settings):
    """`get_lora_one_model` with `settings` (`LoraOneConfig`'s; every example of `batches` by default)."""
    return get_lora_one_model(model or tiny_llama(), LoraConfig(**lora), batches, search_batches=search_batches,
                              show_progress_bar=show_progress_bar,
                              config=LoraOneConfig(**{"init_samples": None, **settings}))


def entries(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.json"))


@pytest.mark.parametrize("mode", MODES)
def test_a_second_run_skips_the_backward_and_gives_the_uncached_adapter(mode, tmp_path, capsys):
    kwargs, batch_size = MODES[mode]
    batches = padded_batches(ragged_examples(), batch_size)  # ragged, padded; sketch: a short last batch
    uncached = adapter(init(batches, show_progress_bar=False, **kwargs))
    for hit in (False, True):
        model, forwards = counted(tiny_llama())
        got = init(batches, model, grad_cache=tmp_path, **kwargs)
        assert bool(forwards) != hit  # a hit runs no forward, so no backward
        record = got.lora_one_metadata["gradient_cache"]
        assert record["hit"] == hit and record["entry"].endswith(".safetensors")
        assert_identical(adapter(got), uncached)
    assert f"gradient cache hit: {record['entry']} (backward skipped)" in capsys.readouterr().out
    assert len(entries(tmp_path)) == 1


def test_what_changes_the_gradient_is_another_entry_and_what_does_not_is_a_hit(tmp_path):
    batches = lm_batches(n=4)
    init(batches, grad_cache=tmp_path, show_progress_bar=False)
    one_ulp = tiny_llama()
    with torch.no_grad():  # not a target layer: the key covers every weight
        one_ulp.model.norm.weight[0] = torch.nextafter(one_ulp.model.norm.weight[0], torch.tensor(2.0))
    misses = {
        "other samples": {"batches": lm_batches(n=4, seed=2)},
        "one sample fewer": {"batches": batches[:3]},
        "one weight one ulp away": {"model": one_ulp},
        "other targets": {"lora": {**LORA, "target_modules": ["q_proj", "v_proj"]}},
        "sketch mode": {"grad_mode": "sketch"},
        "sketch, 3 passes": {"grad_mode": "sketch", "sketch_passes": 3},
        "sketch, another seed": {"grad_mode": "sketch", "seed": 1},
        "micro-batches of 2": {"batches": lm_batches(n=4, batch_size=2)},  # G equal to round-off only
    }
    for what, kwargs in misses.items():
        model = init(**{"batches": batches, **kwargs}, grad_cache=tmp_path, show_progress_bar=False)
        assert not model.lora_one_metadata["gradient_cache"]["hit"], what
    assert len(entries(tmp_path)) == 1 + len(misses)
    hits = {"another rank": {"lora": {**LORA, "r": 2}}, "another gamma": {"gamma": 16.0},
            "another variant": {"variant": "spectral"}, "a gamma search": {"gamma": GRID, "search_batches": batches},
            "another seed (accumulate)": {"seed": 5}}
    for what, kwargs in hits.items():
        model = init(**{"batches": batches, **kwargs}, grad_cache=tmp_path, show_progress_bar=False)
        assert model.lora_one_metadata["gradient_cache"]["hit"], what


def test_a_peft_model_counts_by_its_function(tmp_path):
    """On a PeftModel (the Trainer callback's case) the gradient is taken at the model's function: a fresh
    adapter's random A beside B = 0 is the base model, whatever A; a moved B is another model."""
    from peft import get_peft_model

    def peft(seed, move_b=False):
        torch.manual_seed(seed)  # lora_A's Kaiming init
        model = get_peft_model(tiny_llama(), LoraConfig(**LORA))
        if move_b:
            with torch.no_grad():
                model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight[0, 0] = 1e-3
        return model

    hits = []
    for model in (peft(0), peft(1), peft(1, move_b=True)):
        cache = GradientCache(tmp_path)
        estimate_gradients(model, lm_batches(n=4), show_progress_bar=False, init_samples=None, grad_cache=cache)
        hits.append(cache.last["hit"])
    assert hits == [False, True, False]


def test_a_quantised_base_hits_and_its_scales_are_part_of_the_key(tmp_path):
    """A 4-bit base (sketch mode): a second load hits with the same SVD bit for bit; the same packed weights
    with one changed quantisation scale are another model."""
    pytest.importorskip("bitsandbytes")
    from tiny_models import tiny_llama as tiny_llama_folder

    from lora_one.recipes.models import load_model

    folder = tiny_llama_folder(tmp_path / "model")
    batches = [{"input_ids": b["input_ids"] % 30, "labels": torch.where(b["labels"] < 0, -100, b["labels"] % 30)}
               for b in lm_batches(n=4)]  # the folder's vocabulary is smaller

    def sketch(scale_moved=False):
        model = load_model(str(folder), "causal-lm", quantize="4bit")[0]
        if scale_moved:
            model.model.layers[0].mlp.up_proj.weight.quant_state.absmax[0] += 1
        cache = GradientCache(tmp_path / "cache")
        out = estimate_gradients(model, batches, grad_mode="sketch", rank=4, init_samples=None,
                                 show_progress_bar=False, grad_cache=cache)
        return out, cache.last["hit"]

    (first, hit1), (second, hit2), (_, hit3) = sketch(), sketch(), sketch(scale_moved=True)
    assert (hit1, hit2, hit3) == (False, True, False)
    assert all(torch.equal(first[n].U, second[n].U) and torch.equal(first[n].S, second[n].S) for n in first)


def _flip_a_byte(manifest, tensors):
    data = bytearray(tensors.read_bytes())
    data[-5] ^= 1  # in the last tensor's data, past the header
    tensors.write_bytes(bytes(data))


DAMAGE = {
    "a flipped bit": _flip_a_byte,
    "a truncated tensor file": lambda manifest, tensors: tensors.write_bytes(tensors.read_bytes()[:-100]),
    "no tensor file": lambda manifest, tensors: tensors.unlink(),
    "a manifest that is no JSON": lambda manifest, tensors: manifest.write_text('{"format": '),
    "a manifest of another gradient": lambda manifest, tensors: manifest.write_text(
        manifest.read_text().replace('"grad_mode": "accumulate"', '"grad_mode": "sketch"')),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_entry_is_never_used_and_is_rewritten(damage, tmp_path):
    batches = lm_batches(n=4)
    first = adapter(init(batches, grad_cache=tmp_path, show_progress_bar=False))
    (manifest,) = entries(tmp_path)
    DAMAGE[damage](manifest, manifest.with_suffix(".safetensors"))
    model, forwards = counted(tiny_llama())
    with pytest.warns(UserWarning, match=r"gradient cache entry .* is damaged \(.*\); not using it: the gradient is "
                                         r"recomputed and the entry rewritten"):
        second = init(batches, model, grad_cache=tmp_path, show_progress_bar=False)
    assert forwards and not second.lora_one_metadata["gradient_cache"]["hit"]
    assert_identical(adapter(second), first)
    third = init(batches, grad_cache=tmp_path, show_progress_bar=False)
    assert third.lora_one_metadata["gradient_cache"]["hit"]
    assert_identical(adapter(third), first)


def test_a_top_r_svd_serves_smaller_ranks_and_a_larger_rank_recomputes(tmp_path, capsys):
    batches = padded_batches(ragged_examples(), 2)

    def sketch(rank, cache=None):
        cache = cache or GradientCache(tmp_path)
        model, forwards = counted(tiny_llama())
        out = estimate_gradients(model, batches, grad_mode="sketch", rank=rank, init_samples=None, grad_cache=cache)
        return out, cache.last["hit"], bool(forwards)

    rank4, hit, ran = sketch(4)
    assert not hit and ran
    rank2, hit, ran = sketch(2)
    assert hit and not ran
    for name, t in rank2.items():  # the first triplets of the stored SVD
        assert t.S.shape == (2,)
        assert torch.equal(t.U, rank4[name].U[:, :2]) and torch.equal(t.S, rank4[name].S[:2])
        assert torch.equal(t.Vh, rank4[name].Vh[:2])
    rank8, hit, ran = sketch(8)
    assert not hit and ran
    assert "holds a rank-4 SVD of 'model.layers.0.self_attn.q_proj', fewer than rank 8; recomputing" in \
        capsys.readouterr().out
    (manifest,) = entries(tmp_path)
    assert set(json.loads(manifest.read_text())["ranks"].values()) == {8}  # replaced by the larger one
    uncached = estimate_gradients(tiny_llama(), batches, grad_mode="sketch", rank=8, init_samples=None,
                                  show_progress_bar=False)
    for name, t in rank8.items():
        assert torch.equal(t.U, uncached[name].U) and torch.equal(t.S, uncached[name].S)
    assert sketch(4)[1]


def test_a_custom_loss_or_a_file_for_a_folder_is_refused(tmp_path):
    with pytest.raises(UsageError, match="grad_cache with train_step: .*drop grad_cache"):
        estimate_gradients(tiny_llama(), lm_batches(), train_step=lambda m, b: m(**b).loss, grad_cache=tmp_path)
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="is a file; give a folder"):
        init(lm_batches(n=4), grad_cache=tmp_path / "file")


def test_two_ranks_share_one_entry_and_match_one_process(tmp_path):
    """Two gloo processes on ragged shards, twice, with gamma searched: the first run writes one entry (rank 0),
    the second hits on both ranks; every adapter is the same bit for bit, and the one-process search's."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert [[run["cache"]["hit"] for run in r] for r in ranks] == [[False, True], [False, True]]
    assert len(entries(tmp_path / "cache")) == 1
    single = init(padded_batches(ragged_examples(LENGTHS), 2), gamma=GRID, show_progress_bar=False, init_samples=4)
    search = single.lora_one_metadata["gamma_search"]
    for r in ranks:
        for run in r:
            assert run["search"]["chosen"] == search["chosen"]
            assert run["search"]["losses"] == pytest.approx(search["losses"], rel=1e-5)
            assert_identical(run["adapter"], ranks[0][0]["adapter"])
    got, expected = products(ranks[0][0]["adapter"]), products(adapter(single))
    assert got.keys() == expected.keys()
    for name in expected:
        assert float((got[name] - expected[name]).norm() / expected[name].norm()) <= 1e-5, name



def _status(key: str) -> int:
    """A `/proc/self/status` field in bytes."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(f"{key}:"))
    return int(line.split()[1]) * 1024


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="the peak resident set is read on Linux")
def test_a_read_holds_the_entry_once(tmp_path):
    """The checksum and the read of a 64 MB entry grow the resident set by the entry once, mapped pages
    included (reading the file into memory and loading tensors from those bytes held it twice).
    `benchmarks/grad_cache_memory.py` measures the same in a fresh process."""
    shape = (2048, 4096)
    fields = {"grad_mode": "accumulate", "targets": {"a": list(shape), "b": list(shape)}}
    stored = {name: torch.randn(shape, generator=torch.Generator().manual_seed(i))
              for i, name in enumerate(fields["targets"])}
    GradientCache(tmp_path).store(fields, None, stored)
    size = sum(p.stat().st_size for p in tmp_path.glob("*.safetensors"))
    Path("/proc/self/clear_refs").write_text("5")  # the peak starts again from the present resident set
    before = _status("VmRSS")
    found = GradientCache(tmp_path).lookup(fields, None, {name: torch.nn.Linear(1, 1) for name in stored},
                                           offload=False)
    assert all(torch.equal(found[name], stored[name]) for name in stored)  # every page read
    assert (_status("VmHWM") - before) / size <= 1.1


def test_a_tensor_file_replaced_after_its_checksum_is_not_used(tmp_path, monkeypatch):
    """A writer's `os.replace` between the checksum and the mapping: the file mapped is not the file
    checked, so the entry is not used."""
    batches = lm_batches(n=4)
    first = adapter(init(batches, grad_cache=tmp_path, show_progress_bar=False))
    (manifest,) = entries(tmp_path)
    tensors = manifest.with_suffix(".safetensors")
    real = gradcache.safe_open

    def replaced_first(path, **kwargs):
        save_file({name: 2 * g for name, g in load_file(tensors).items()}, tmp_path / "other")
        os.replace(tmp_path / "other", tensors)
        return real(path, **kwargs)

    monkeypatch.setattr(gradcache, "safe_open", replaced_first)
    with pytest.warns(UserWarning, match=r"is damaged \(the tensor file was replaced while it was read\)"):
        second = init(batches, grad_cache=tmp_path, show_progress_bar=False)
    assert not second.lora_one_metadata["gradient_cache"]["hit"]
    assert_identical(adapter(second), first)


def worker(out: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    shard = padded_batches(ragged_examples(LENGTHS)[rank::2], 1)  # init 5 and 14 tokens, or 9 and 7; then held out
    runs = []
    for _ in range(2):
        model = init(shard, gamma=GRID, show_progress_bar=False, grad_cache=out / "cache", init_samples=4)
        meta = model.lora_one_metadata
        runs.append({"adapter": adapter(model), "search": meta["gamma_search"], "cache": meta["gradient_cache"]})
    torch.save(runs, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
