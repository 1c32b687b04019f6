"""The package's layers are its folders, and their imports point one way (function-level imports included):

    lora_one.linalg   tensors in, tensors out: of lora_one, `core.errors` and `core.constants` alone
    lora_one.core     the library: core and linalg
    lora_one.recipes  the applications: recipes, core and linalg, never the cli
    lora_one.cli      the command line: anything, imported by no other layer

`lora_one/__init__.py` re-exports the library: core and linalg only (recipes and cli may import it). The
library imports, of third-party packages, only its declared dependencies and packages that transformers
requires unconditionally; and no module imports another that imports it back."""

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import lora_one

PACKAGE = Path(lora_one.__file__).parent
LAYERS = ("linalg", "core", "recipes", "cli")
MAY_IMPORT = {  # layer -> the lora_one modules it may import (a package stands for its modules)
    "__init__": {"core", "linalg"},
    "linalg": {"linalg", "core.errors", "core.constants"},
    "core": {"core", "linalg"},
    "recipes": {"recipes", "core", "linalg", "__init__"},
    "cli": {"cli", "recipes", "core", "linalg", "__init__"},
}
PYPROJECT = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
CORE_DEPENDENCIES = {re.split(r"[<>=!~;\[ ]", r)[0] for r in PYPROJECT["project"]["dependencies"]}
# imported by the library too, and required unconditionally by transformers (test_inherited_imports_are_required)
INHERITED = {"numpy", "tqdm", "huggingface_hub"}


def parsed() -> dict[str, tuple[Path, ast.Module]]:
    """module name (dotted, under lora_one; a package by its own name, the root as `__init__`) -> its tree."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        name = ".".join(p for p in rel.parts if p != "__init__") or "__init__"
        found[name] = (rel, ast.parse(path.read_text()))
    return found


def imports(rel: Path, tree: ast.Module) -> set[str]:
    """Every module that `tree` imports anywhere in its code, absolute and dotted."""
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = ("lora_one", *rel.parts[:-1])
                base = ".".join([*pkg[: len(pkg) - node.level + 1], *([node.module] if node.module else [])])
            imported.add(base)
            imported |= {f"{base}.{a.name}" for a in node.names}  # `from lora_one.core import files` too
    return imported


def modules() -> dict[str, set[str]]:
    """module name -> the lora_one modules (and names: `core.init.search_gamma`) it imports anywhere."""
    return {name: {i.removeprefix("lora_one.") if i != "lora_one" else "__init__"
                   for i in imports(rel, tree) if i == "lora_one" or i.startswith("lora_one.")} - {name}
            for name, (rel, tree) in parsed().items()}


def layer(name: str) -> str:
    return name.split(".")[0]


def allowed(dep: str, may: set[str]) -> bool:
    return any(dep == m or dep.startswith(m + ".") for m in may)


def test_every_module_lies_in_a_layer():
    stray = sorted(name for name in modules() if name != "__init__" and layer(name) not in LAYERS)
    assert not stray, f"move {stray} into one of {LAYERS} (src/lora_one/<layer>/)"


def test_imports_point_down():
    wrong = [f"{name} imports {dep}"
             for name, imported in modules().items()
             for dep in sorted(imported)
             if not allowed(dep, MAY_IMPORT[name if name == "__init__" else layer(name)])]
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_a_wrong_import():
    """A core module importing a recipe (in each spelling) and the front door importing the cli are caught."""
    for code, rel, may in (("from lora_one.recipes import data", Path("core/x"), MAY_IMPORT["core"]),
                           ("import lora_one.recipes.finetune", Path("core/x"), MAY_IMPORT["core"]),
                           ("from ..recipes.models import load_model", Path("core/x"), MAY_IMPORT["core"]),
                           ("from lora_one import get_lora_one_model", Path("linalg/x"), MAY_IMPORT["linalg"]),
                           ("from lora_one import cli", Path("__init__"), MAY_IMPORT["__init__"])):
        found = {i.removeprefix("lora_one.") if i != "lora_one" else "__init__"
                 for i in imports(rel, ast.parse(code)) if i == "lora_one" or i.startswith("lora_one.")}
        assert any(not allowed(dep, may) for dep in found), code


def test_settings_import_no_implementation():
    """The settings and the constants they read load nothing heavy: the command line's settings take only
    the constants and `LoraOneConfig`, which takes only the library's constants (and `errors`)."""
    light = {"core.constants", "core.errors", "core.config", "recipes.constants"}
    found = modules()
    for name, may in (("recipes.settings", light), ("core.config", {"core.constants", "core.errors"}),
                      ("core.constants", set()), ("recipes.constants", set())):
        wrong = sorted(dep for dep in found[name] if not allowed(dep, may))
        assert not wrong, f"{name} imports {wrong}; move what it needs into a constants module"
    for name in ("core.constants", "recipes.constants"):
        rel, tree = parsed()[name]
        assert imports(rel, tree) <= {"__future__", "__future__.annotations", "dataclasses",
                                      "dataclasses.dataclass"}, name


def test_the_library_imports_only_its_dependencies():
    """Third-party imports anywhere in core and linalg (and the front door): the core's dependencies and
    what they require; datasets, gguf, matplotlib, yaml and the like are the recipes' (the `cli` extra)."""
    wrong = []
    for name, (rel, tree) in parsed().items():
        if name == "__init__" or layer(name) in ("core", "linalg"):
            for dep in sorted(imports(rel, tree)):
                top = dep.split(".")[0]
                if top and top != "lora_one" and top not in sys.stdlib_module_names | CORE_DEPENDENCIES | INHERITED:
                    wrong.append(f"{name} imports {dep}")
    assert not wrong, "\n".join(wrong)


def test_inherited_imports_are_required():
    """What the library imports beyond its declared dependencies comes with transformers, unconditionally."""
    required = {re.split(r"[<>=!~;\[ ]", r)[0].lower().replace("-", "_")
                for r in importlib.metadata.requires("transformers") if "extra ==" not in r}
    assert INHERITED <= required, INHERITED - required


def test_no_import_cycles():
    found = modules()
    graph = {name: {d for d in imported if d in found} for name, imported in found.items()}
    state, cycle = {}, []

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                cycle.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycle, " -> ".join(cycle[0])
