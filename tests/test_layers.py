"""The package's imports point one way: base -> math -> library -> recipes -> command line, and no
module imports another that imports it back (function-level imports included)."""

import ast
from pathlib import Path

import lora_one

PACKAGE = Path(lora_one.__file__).parent
LAYERS = {  # layer -> modules (a package stands for its modules)
    0: ("errors", "files"),
    1: ("spectral", "sketch", "preconditioner"),
    2: ("parallel", "targets", "gradients", "gradcache", "init", "save", "optim", "callback", "plots", "hub"),
    3: ("data", "embedded_data", "models", "evaluate", "probe", "load", "merge", "settings", "runs", "finetune",
        "compare", "demo", "toys"),
    4: ("cli",),
}
LAYER_OF = {m: layer for layer, modules in LAYERS.items() for m in modules}


def modules() -> dict[str, set[str]]:
    """module name (dotted, under lora_one) -> the lora_one modules it imports anywhere in its code."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        name = ".".join(p for p in rel.parts if p != "__init__") or "__init__"
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                base = node.module
                if node.level:  # relative: resolve against this module's package
                    pkg = rel.parts[:-1]
                    base = ".".join(["lora_one", *pkg[: len(pkg) - node.level + 1], node.module])
                imported.add(base)
                imported |= {f"{base}.{a.name}" for a in node.names}  # `from lora_one import data` too
        found[name] = {i.removeprefix("lora_one.") for i in imported if i.startswith("lora_one.")} - {name}
    return found


def top(name: str) -> str:
    return name.split(".")[0]


def test_every_module_has_a_layer():
    missing = sorted({top(m) for m in modules()} - set(LAYER_OF) - {"__init__"})
    assert not missing, f"assign a layer to {missing} in tests/test_layers.py"


def test_imports_point_down():
    wrong = []
    for name, imported in modules().items():
        if name == "__init__":  # the package's front door re-exports the library
            continue
        for dep in imported:
            if top(dep) in LAYER_OF and LAYER_OF[top(dep)] > LAYER_OF[top(name)]:
                wrong.append(f"{name} (layer {LAYER_OF[top(name)]}) imports {dep} (layer {LAYER_OF[top(dep)]})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    graph = {name: {d for d in imported if d in modules_set} for name, imported in modules().items()
             for modules_set in [set(modules())]}
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
