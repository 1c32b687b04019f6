"""The oldest Python that pyproject.toml declares (`requires-python`) runs the package: vermin finds no
syntax or standard-library use in src/ newer than it (e.g. `hashlib.file_digest`, 3.11)."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def test_the_package_needs_no_newer_python_than_it_declares():
    pytest.importorskip("vermin")
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["requires-python"]
    minimum = re.fullmatch(r">=\s*(3\.\d+)", declared)
    assert minimum, f"requires-python {declared!r} is not of the form >=3.N"
    done = subprocess.run([sys.executable, "-c", "import sys; from vermin.main import main; sys.exit(main())",
                           "--no-tips", "--violations", f"--target={minimum[1]}-", str(ROOT / "src")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
