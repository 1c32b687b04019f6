"""The library installs and runs on its four dependencies; the command line's packages are an extra.

- In a process where datasets, gguf, matplotlib, bitsandbytes and trl are not installed (hidden from
  every import finder before anything is imported), `import lora_one` works, imports no recipe, and
  `LoraOneCallback` initialises a tiny random Llama's LoRA adapter inside a stock `transformers.Trainer`
  for one step. yaml cannot be hidden:
  huggingface_hub imports it when it is imported (huggingface_hub/utils/_fixes.py), and transformers,
  huggingface_hub and PEFT all require pyyaml; that the library itself imports no yaml is checked
  statically (tests/test_layers.py).
- The wheel's metadata: its unconditional requirements are exactly torch, transformers, peft and
  safetensors; datasets, gguf, matplotlib and pyyaml are required only by the `cli` extra.
"""

import os
import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE = {"torch", "transformers", "peft", "safetensors"}
HIDDEN = ("datasets", "gguf", "matplotlib", "bitsandbytes", "trl")

# Hides HIDDEN from every finder on sys.meta_path, as if they were not installed (find_spec answers None,
# so transformers' and PEFT's availability checks see them absent), then trains.
WITHOUT_EXTRAS = """
import sys

HIDDEN = set(sys.argv[1].split(","))


class Hide:
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            return None
        return self.finder.find_spec(name, path, target)

    def __getattr__(self, attr):
        return getattr(self.finder, attr)


sys.meta_path[:] = [Hide(f) for f in sys.meta_path]

import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

import lora_one
from lora_one import LoraOneCallback

for name in HIDDEN:
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{name} was imported")
ours = sorted(m for m in sys.modules if m.startswith(("lora_one.recipes", "lora_one.cli")))
assert not ours, ours


class Step0(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.b_nonzero = [bool(p.any()) for n, p in model.named_parameters() if "lora_B" in n]


torch.manual_seed(0)
config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1, max_position_embeddings=16, pad_token_id=0, bos_token_id=None,
                     eos_token_id=1)
model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=2, lora_alpha=4, use_rslora=True,
                                                             target_modules=["q_proj", "v_proj"]))
ids = torch.randint(2, 32, (8, 6), generator=torch.Generator().manual_seed(0))
examples = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in ids]
out = Path(sys.argv[2])
args = TrainingArguments(str(out), max_steps=1, per_device_train_batch_size=2, learning_rate=1e-3, use_cpu=True,
                         report_to=[], disable_tqdm=True, save_strategy="no", dataloader_num_workers=0, seed=0)
callback, probe = LoraOneCallback(init_samples=4, gamma=16), Step0()
trainer = Trainer(model=model, args=args, train_dataset=examples, callbacks=[callback, probe])
trainer.train()

assert trainer.state.global_step == 1
assert probe.b_nonzero and all(probe.b_nonzero), probe.b_nonzero  # PEFT's own init leaves B at zero
assert json.loads((out / "lora_one.json").read_text())["variant"] == "lora-one"
ours = sorted(m for m in sys.modules if m.startswith(("lora_one.recipes", "lora_one.cli")))
assert not ours, ours
print("trained")
"""


def test_the_library_runs_in_a_trainer_without_the_cli_packages(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-c", WITHOUT_EXTRAS, ",".join(HIDDEN), str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith("trained")


def test_the_command_line_without_its_packages_names_the_extra(tmp_path):
    """The same process, the command line imported: one line naming the missing package and the extra."""
    hide = WITHOUT_EXTRAS.split("import json")[0]
    done = subprocess.run([sys.executable, "-c", hide + "import lora_one.cli\n", ",".join(HIDDEN)],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert done.returncode == 1 and done.stdout == "", done.stdout + done.stderr
    assert re.fullmatch(r"lora-one: error: the command line needs the package '(datasets|gguf|matplotlib)'; "
                        r"install it with pip install 'lora-one\[cli\]'\.\n", done.stderr), done.stderr


def wheel_metadata(tmp_path: Path) -> tuple[dict, zipfile.ZipFile]:
    """Build the wheel from a copy of what it is built from (the working tree stays untouched), offline."""
    shutil.copytree(ROOT / "src" / "lora_one", tmp_path / "src" / "lora_one",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-q", "-w", str(tmp_path / "dist"), str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = (tmp_path / "dist").glob("lora_one-*.whl")
    archive = zipfile.ZipFile(wheel)
    (metadata,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
    return Parser().parsestr(archive.read(metadata).decode()), archive


def test_the_wheel_requires_the_core_alone_and_the_cli_packages_in_an_extra(tmp_path):
    metadata, archive = wheel_metadata(tmp_path)
    requires = metadata.get_all("Requires-Dist")
    unconditional = {re.split(r"[<>=!~ ;\[]", r)[0] for r in requires if ";" not in r}
    assert unconditional == CORE, requires
    extra_of = {}
    for r in requires:
        if ";" in r:
            name = re.split(r"[<>=!~ ;\[]", r)[0].lower()
            extra_of.setdefault(name, set()).add(re.search(r'extra == "([^"]+)"', r).group(1))
    for name in ("datasets", "gguf", "matplotlib", "pyyaml"):
        assert extra_of.get(name) == {"cli"}, (name, extra_of.get(name))
    assert "cli" in metadata.get_all("Provides-Extra")
    names = set(archive.namelist())
    for package in ("linalg", "core", "recipes", "recipes/toys", "cli"):
        assert f"lora_one/{package}/__init__.py" in names
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "lora-one = lora_one.cli:main" in archive.read(entry_points).decode()


def test_the_public_api_is_at_the_top_level():
    import importlib.metadata

    import lora_one
    from lora_one.core.errors import UsageError

    assert set(lora_one.__all__) == {
        "__version__", "LoraOneConfig", "estimate_gradients", "init_lora_one", "get_lora_one_model", "search_gamma",
        "DEFAULT_GAMMA_GRID", "create_optimizer", "save_adapter", "LoraOneCallback", "UsageError", "VARIANTS",
    }
    assert all(hasattr(lora_one, name) for name in lora_one.__all__)
    assert lora_one.__version__ == importlib.metadata.version("lora-one")
    assert lora_one.UsageError is UsageError and 128.0 in lora_one.DEFAULT_GAMMA_GRID
