"""How every output is written: atomically, and never by deleting what we did not write.

The rules every writer of the package follows (library and command line alike):

1. A single file (`write_text_atomic`, `replacing`) is written to a temporary sibling in the same
   folder (so on the same file system) and renamed over its target with `os.replace`: a reader sees
   the old file or the new one, never a part.
2. A folder of outputs (an adapter, a model) is written into a temporary sibling folder by
   `staged_folder` and then published into `out`:
   - `out` does not exist: the temporary folder is renamed to `out`, one atomic step.
   - `out` exists: only our files move into it. A file of the same name as one of ours is replaced;
     a file matching the folder kind's `stale` patterns (an older save's weight shards or index) that
     this save does not write is removed; every other file stays, and `out` itself is never
     removed. A `README.md` is written only where there is none, since it may be the user's.
3. The moment a folder looks complete is atomic. Its kind's `marker` (the file a loader reads first:
   `adapter_config.json` for an adapter, `config.json` for a model) is the first file taken away and
   the last one put in: the old marker is moved aside, then our other old files, then the new files
   move in, the new marker last. So a process killed at any moment leaves the old complete state, the
   new complete state, or a folder without its marker, which no loader takes for complete (the old
   files then lie in a `.NAME.*.old` sibling). An exception instead rolls back to the old state.
4. Refused with a `UsageError`: an `out` that is an existing file, the root, the home folder, or an
   ancestor of the working folder (the working folder itself is fine: rule 2 keeps its files).
   Nothing is ever removed recursively but the temporary folders made here.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lora_one.core.errors import UsageError

KEEP_EXISTING = ("README.md",)  # written only where absent: the name is too common to claim


@dataclass(frozen=True)
class FolderKind:
    marker: str  # the file that makes the folder loadable: removed first, written last
    stale: tuple[str, ...] = ()  # glob patterns of files an older save of this kind may have left


ADAPTER = FolderKind("adapter_config.json", ("adapter_model.safetensors", "adapter_model.bin"))
MODEL = FolderKind("config.json", (
    "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
    "pytorch_model.bin", "pytorch_model-*-of-*.bin", "pytorch_model.bin.index.json",
))


def _temp_name(path: Path, suffix: str = "") -> Path:
    """A fresh hidden sibling name; `suffix` keeps a file's extension (matplotlib reads the format from it)."""
    return path.with_name(f".{path.name if not suffix else path.stem}.{secrets.token_hex(4)}.tmp{suffix}")


@contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of the file `path` to write; it replaces `path` when the block ends
    without an error, and is removed otherwise."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{str(path)!r} is a folder; give the path of a file.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path, path.suffix)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # mode as for an ordinary file
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def check_out_folder(out_dir: str | os.PathLike) -> Path:
    """`out_dir` made absolute (`..` taken lexically), if a folder of outputs may be published there."""
    out = Path(os.path.abspath(out_dir))
    if out.exists() and not out.is_dir():
        raise UsageError(f"{str(out_dir)!r} is a file, not a folder; give a folder path for the outputs.")
    real, cwd = out.resolve(), Path.cwd().resolve()
    what = ("the root folder" if real == Path(real.anchor) else "the home folder" if real == Path.home().resolve()
            else "above the working folder" if real != cwd and cwd.is_relative_to(real) else None)
    if what:
        raise UsageError(f"Refusing to write outputs into {str(out_dir)!r} ({real}), {what}; give a folder of its own.")
    return out


@contextmanager
def staged_folder(out_dir: str | os.PathLike, kind: FolderKind) -> Iterator[Path]:
    """Yield an empty temporary sibling folder of `out_dir`; write the outputs there. When the block
    ends without an error they are published into `out_dir` (module docstring, rules 2 and 3); the
    temporary folder is removed in any case."""
    out = check_out_folder(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(out)
    try:
        tmp.mkdir()
    except PermissionError:
        raise UsageError(f"Cannot write {str(out_dir)!r}: no permission to write in {str(out.parent)!r}; "
                         "choose a folder you can write.") from None
    try:
        if tmp.resolve().is_relative_to(out.resolve()):  # only through a symlinked parent
            raise UsageError(f"{str(out_dir)!r} contains its own parent folder (a symlink); choose another.")
        yield tmp
        if out.exists():
            _publish_into(tmp, out, kind)
        else:
            os.rename(tmp, out)
    finally:
        if tmp.exists():  # ours alone: made above, holding only what the block wrote
            shutil.rmtree(tmp)


def _publish_into(tmp: Path, out: Path, kind: FolderKind) -> None:
    """Move the files under `tmp` into the existing folder `out`, the marker last (rule 3)."""
    new = [p.relative_to(tmp) for p in sorted(tmp.rglob("*")) if not p.is_dir()]
    new = [f for f in new if not (f.name in KEEP_EXISTING and (out / f).exists())]
    clash = [str(out / f) for f in new if (out / f).is_dir()]
    if clash:
        raise UsageError(f"{clash[0]!r} is a folder where a file of the output goes; move it away.")
    wanted = set(new)
    old = [f for f in new if (out / f).exists()]
    for folder in {f.parent for f in new}:
        old += [q.relative_to(out) for pattern in kind.stale for q in sorted((out / folder).glob(pattern))
                if q.is_file() and q.relative_to(out) not in wanted]
    old.sort(key=lambda f: f.name != kind.marker)  # the old marker leaves first ...
    new.sort(key=lambda f: f.name == kind.marker)  # ... and the new one arrives last
    aside = _temp_name(out).with_suffix(".old")
    aside.mkdir()
    moved_aside, moved_in, made = [], [], []
    try:
        for f in old:
            (aside / f).parent.mkdir(parents=True, exist_ok=True)
            os.replace(out / f, aside / f)
            moved_aside.append(f)
        for f in new:
            for d in reversed((out / f).parents):
                if d.is_relative_to(out) and not d.exists():
                    d.mkdir()
                    made.append(d)
            os.replace(tmp / f, out / f)
            moved_in.append(f)
    except BaseException:
        for f in reversed(moved_in):
            (out / f).unlink()
        for d in reversed(made):
            d.rmdir()
        for f in reversed(moved_aside):  # the old marker returns last
            os.replace(aside / f, out / f)
        shutil.rmtree(aside)  # reached only once every old file is back
        raise
    shutil.rmtree(aside)  # our own replaced files


def remove_ours(folder: str | os.PathLike, patterns: tuple[str, ...]) -> None:
    """Delete the files (never folders) in `folder` that match `patterns` (globs, also in subfolders:
    `checkpoint-*/optimizer.pt`), in the patterns' order (name the marker first), then the subfolders
    the patterns name if that left them empty."""
    folder = Path(folder)
    for pattern in patterns:
        for path in sorted(folder.glob(pattern)):
            if path.is_file() or path.is_symlink():
                path.unlink()
    for sub_pattern in sorted({str(Path(p).parent) for p in patterns} - {"."}):
        for sub in sorted(folder.glob(sub_pattern)):
            if sub.is_dir() and not any(sub.iterdir()):
                sub.rmdir()


def check_writable(path: str | os.PathLike, flag: str = "--out") -> None:
    """Refuse, before any work, an output path that cannot be made: outputs are written into a temporary
    sibling first, so the nearest existing folder above `path` must be a folder we may write in."""
    where = Path(os.path.abspath(path)).parent
    while not where.exists():
        where = where.parent
    if not where.is_dir():
        raise UsageError(f"{flag} {str(path)!r}: {str(where)!r} is a file, so nothing can be made under it; "
                         "choose another path.")
    if not os.access(where, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {str(path)!r}: no permission to write in {str(where)!r}; choose a folder you "
                         "can write in.")
