"""The house's one rule for imports: each folder of ftune/ imports only from folders below it, and
no two modules (of ftune/ or scripts/) import each other, however indirectly. Imports inside
functions count: they are how circles hide. A failure names the importing file, its line and the
layer it reaches up to."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "ftune"

# Bottom to top; a module may import from its own layer or any layer listed before it.
LAYERS = [
    ("errors",),
    ("guards",),
    ("recipe",),
    ("artifacts",),
    ("data",),
    ("modeling",),
    ("train", "merge"),
    ("stages",),
    ("commands",),
    ("gguf",),
    ("cli", "__main__"),
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    """ftune's modules by dotted name, and the scripts by their own (they import each other by bare name)."""
    out = {path.stem: path for path in (ROOT / "scripts").glob("*.py")}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _target(name: str) -> str | None:
    """The module of ours that `name` (a module, or module.attribute) lands in."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> list[tuple[int, str]]:
    """(line, imported module of ours) for every import in `module`, at any depth of its code."""
    found = []
    for node in ast.walk(ast.parse(MODULES[module].read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            target = _target(name)
            if target not in (None, module, "ftune"):  # ftune/__init__.py holds the version alone
                found.append((node.lineno, target))
    return found


def _layer(module: str) -> str:
    return module.split(".")[1] if "." in module else "ftune"


def test_every_module_is_in_a_layer():
    unplaced = sorted({_layer(m) for m in MODULES if m.startswith("ftune.")} - set(RANK))
    assert not unplaced, f"folders or modules of ftune/ in no layer of tests/test_layers.py: {unplaced}"


def test_imports_run_down_the_layers_only():
    upward = []
    for module in sorted(MODULES):
        if not module.startswith("ftune."):  # the scripts stand above the package; the circle test covers them
            continue
        for line, target in _imports(module):
            if RANK[_layer(target)] > RANK[_layer(module)]:
                upward.append(f"{MODULES[module].relative_to(ROOT)}:{line} imports {target} ({_layer(module)} -> {_layer(target)})")
    assert not upward, "imports that point up a layer:\n" + "\n".join(upward)


def test_no_import_circle():
    graph = {m: {t for _, t in _imports(m)} for m in MODULES}
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    assert not circles, "modules that import each other: " + "; ".join(" <-> ".join(c) for c in circles)


def test_no_module_holds_two_ideas_by_length():
    long = {str(p.relative_to(ROOT)): n for p in MODULES.values()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_the_rule_sees_an_upward_import_inside_a_function(tmp_path, monkeypatch):
    """The checks above would pass vacuously if imports inside functions went unseen."""
    fake = tmp_path / "ftune" / "guards" / "probe.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("def f():\n    from ftune.train import loop\n    return loop\n", encoding="utf-8")
    monkeypatch.setitem(MODULES, "ftune.guards.probe", fake)
    assert _imports("ftune.guards.probe") == [(2, "ftune.train.loop")]
