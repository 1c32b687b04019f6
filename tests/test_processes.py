"""Several processes on one machine: the packaged GGUF model is converted once, and the process group's
collectives wait long enough for rank 0 to evaluate alone."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from tiny_models import slow_conversion

from lora_one.recipes import models


def _rank_on_a_fresh_machine(root: Path, barrier, results) -> None:
    """One forked process: resolve the alias once the other is ready too, the conversion replaced by a
    slow stand-in that logs its call."""
    models._convert_gguf = slow_conversion(root)  # in this child only
    models._package_dir = lambda package, alias: root / "package"
    barrier.wait()
    results.put(str(models.resolve_model_path("smollm2-135m")))


def test_two_processes_on_a_fresh_machine_convert_the_gguf_once(tmp_path, monkeypatch, capfd):
    (tmp_path / "package").mkdir()
    (tmp_path / "package" / "model.gguf").write_bytes(b"GGUF")
    monkeypatch.setenv("LORA_ONE_CACHE", str(tmp_path / "cache"))
    ctx = multiprocessing.get_context("fork")  # the children share this process's imports: fast
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_rank_on_a_fresh_machine, args=(tmp_path, barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    dest = str(tmp_path / "cache" / "smollm2-135m-instruct")
    assert [results.get(timeout=5) for _ in procs] == [dest, dest]
    assert len((tmp_path / "conversions.log").read_text().splitlines()) == 1
    assert capfd.readouterr().out.count("Converting model.gguf once") == 1
