"""The module map of docs/architecture.md, checked: imports point one way (core → kinds → ops
→ engine → files → the public modules), no module imports another in a circle, and nothing is
imported inside a function but optional dependencies."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "lora_jax"
LAYERS = ["_core", "_kinds", "_ops", "_engine", "_files"]  # each may import the ones before it only
OPTIONAL = {"gguf"}  # imported where used, so that lora_jax works without them


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, ast.parse(path.read_text())


def _imports(tree):
    """``(module imported, whether at the top level)`` of every import in a module."""
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [f"{node.module}.{a.name}" for a in node.names]
            yield from ((n, id(node) in top) for n in [node.module, *names])
        elif isinstance(node, ast.Import):
            yield from ((a.name, id(node) in top) for a in node.names)


MODULES = dict(_modules())


def _edges():
    """``{module: {lora_jax modules it imports}}``."""
    out = {}
    for name, tree in MODULES.items():
        out[name] = {m for m, _ in _imports(tree) if m in MODULES and m != name and m != "lora_jax"}
    return out


def _layer(module):
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else len(LAYERS)


def test_imports_point_one_way():
    wrong = sorted(
        f"{m} (layer {LAYERS[_layer(m)] if _layer(m) < len(LAYERS) else 'public'}) imports {d}"
        for m, deps in _edges().items()
        for d in deps
        if _layer(d) > _layer(m)
    )
    assert not wrong, "\n".join(wrong)


def test_no_import_circle():
    edges = _edges()
    state = {}

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(edges.get(m, ())):
            if state.get(d) == "open":
                pytest.fail("import circle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])


def test_no_import_inside_a_function_but_optional_dependencies():
    inner = sorted(
        f"{name}: {m}"
        for name, tree in MODULES.items()
        for m, at_top in _imports(tree)
        if not at_top and m.split(".")[0] not in OPTIONAL
    )
    assert not inner, "\n".join(inner)


def test_the_layers_are_the_packages():
    packages = sorted(p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert packages == sorted(LAYERS)
