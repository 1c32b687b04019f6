"""The documentation site builds under `mkdocs build --strict`, and the strict build does catch a dead link
and an API name that does not exist (so that loosening mkdocs.yml fails here, not silently)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build(config_dir: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=config_dir, capture_output=True, text=True, timeout=300,
    )


def test_site_builds_strict(tmp_path):
    done = build(ROOT, tmp_path / "site")
    assert done.returncode == 0, done.stdout + done.stderr
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    for name in ("LoraOneConfig", "get_lora_one_model", "estimate_gradients", "init_lora_one", "search_gamma",
                 "LoraOneCallback", "create_optimizer", "save_adapter"):
        assert f'id="lora_one.{name}"' in api, f"{name} is missing from the API page"
    assert "init_samples" in api  # a docstring's text, not only the headings


def _copy_of_the_docs(tmp_path: Path) -> Path:
    """mkdocs.yml, docs/ and the hook copied; src/ and benchmarks/ linked (what the build reads)."""
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy(ROOT / "mkdocs.yml", root / "mkdocs.yml")
    shutil.copytree(ROOT / "docs", root / "docs")
    (root / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "mkdocs_hooks.py", root / "scripts" / "mkdocs_hooks.py")
    for name in ("src", "benchmarks"):
        (root / name).symlink_to(ROOT / name, target_is_directory=True)
    return root


def test_strict_build_fails_on_a_dead_link_and_on_a_missing_api_name(tmp_path):
    root = _copy_of_the_docs(tmp_path)
    page = root / "docs" / "index.md"
    text = page.read_text()
    page.write_text(text + "\nSee [a page that is not there](no-such-page.md).\n")
    dead_link = build(root, tmp_path / "site-link")
    assert dead_link.returncode != 0
    assert "no-such-page.md" in dead_link.stdout + dead_link.stderr

    page.write_text(text)
    api = root / "docs" / "api.md"
    api.write_text(api.read_text() + "\n::: lora_one.no_such_name\n")
    missing = build(root, tmp_path / "site-api")
    assert missing.returncode != 0
    assert "no_such_name" in missing.stdout + missing.stderr


def test_readme_links_resolve_and_it_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README links to {target}, which is not in the repository"
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    assert [b.strip() for b in blocks[:2]] == [
        "bash scripts/setup.sh && .venv/bin/lora-one demo",
        "bash scripts/setup.sh && .venv/bin/python -m pytest -q",
    ]
