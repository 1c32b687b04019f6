"""mkdocs hook: publish the images under benchmarks/results/ with the site.

The pages in docs/ link the plots where they lie in the repository
(`../benchmarks/results/quality/summary.png`), which works when a page is read on a code host. This hook
registers each such image under that same relative path, so that mkdocs resolves (and, under `strict`,
validates) the link and copies the image into the site under `results/`.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files, InclusionLevel

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
SUFFIXES = (".png", ".svg", ".jpg")


def on_files(files: Files, config) -> Files:
    docs_dir = Path(config["docs_dir"]).resolve()
    for path in sorted(RESULTS.rglob("*")):
        if path.suffix not in SUFFIXES or not path.is_file():
            continue
        inside = path.relative_to(RESULTS).as_posix()
        src_uri = Path("..", "benchmarks", "results", inside).as_posix()
        file = File(src_uri, str(docs_dir), config["site_dir"], config["use_directory_urls"],
                    dest_uri=f"results/{inside}", inclusion=InclusionLevel.INCLUDED)
        file.abs_src_path = str(path)
        files.append(file)
    return files
