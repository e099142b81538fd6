"""The layering of vp2o and the absence of import cycles, read from the source with ``ast``.

Layers, lowest first; a module may import from its own package and from lower layers only:

1. leaves: ``vp2o.registry``, ``vp2o.dtypes``, ``vp2o.console``, ``vp2o.files`` (import nothing
   from vp2o);
2. the core: ``vp2o.algo``, ``vp2o.rewards``, ``vp2o.rollout``, ``vp2o.data``: pure algorithm,
   rewards, generation and data code, each importing nothing from vp2o but itself and the
   leaves (so none of them imports another: ``rollout`` does not read a config or ``algo``);
3. ``vp2o.config`` (may check names against the core's registries);
4. ``vp2o.mcore``: megatron-core integration;
5. ``vp2o.convert``: checkpoint conversion;
6. the application: every other module (``session``, ``train``, ``evaluate``, ``cli``, ...),
   which may import each other (without cycles).

Every import counts: at module level, inside functions, and under ``if TYPE_CHECKING``. A
function-level import is still a dependency (the function fails without it); moving an import
into a function hides a cycle from the interpreter, not from a reader, and both cycles issue 19
removed (``vp2o.config`` <-> ``vp2o.data.tasks``, ``vp2o.cli`` <-> ``vp2o.convert.cli``) were held
together by function-level imports. Not seen: ``importlib.import_module`` with a computed name
(``vp2o.convert``'s lazy exports, ``reward.name`` dotted paths), which is how user code is
meant to be reached.

The graph is between modules (a ``from pkg import name`` counts as an import of ``pkg.name``
when that is a module, else of ``pkg``); importing ``pkg.mod`` does not count as importing
``pkg``'s ``__init__`` (Python runs it, but that is the package's business).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "vp2o"

LAYERS: list[tuple[str, ...]] = [
    ("vp2o.registry", "vp2o.dtypes", "vp2o.console", "vp2o.files"),
    ("vp2o.algo", "vp2o.rewards", "vp2o.rollout", "vp2o.data"),
    ("vp2o.config",),
    ("vp2o.mcore",),
    ("vp2o.convert",),
]
APPLICATION = len(LAYERS)  # every module no layer names


def modules(root: Path) -> dict[str, Path]:
    """Dotted name -> file of every module under ``root`` (the ``vp2o`` folder)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(root: Path) -> dict[str, dict[str, int]]:
    """Module -> {imported vp2o module: line of the first such import}, all imports included."""
    mods = modules(root)

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, dict[str, int]] = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(parent + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" for a in node.names]
            for target in targets:
                if target.split(".")[0] != "vp2o":
                    continue
                found = resolve(target)
                if found and found != name:
                    edges.setdefault(found, node.lineno)
        graph[name] = edges
    return graph


def layer(module: str) -> tuple[int, str]:
    """(layer index, the package or leaf that owns ``module``)."""
    for i, owners in enumerate(LAYERS):
        for owner in owners:
            if module == owner or module.startswith(owner + "."):
                return i, owner
    return APPLICATION, "application"


def layering_violations(graph: dict[str, dict[str, int]]) -> list[str]:
    """``module:line imports target`` for every import that goes up a layer or across the
    packages of one layer (except between application modules)."""
    out = []
    for module, edges in graph.items():
        (mine, owner) = layer(module)
        for target, line in edges.items():
            (theirs, their_owner) = layer(target)
            if theirs < mine or their_owner == owner:
                continue
            out.append(f"{module}:{line} imports {target} (layer {theirs} from layer {mine})")
    return sorted(out)


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


@pytest.fixture(scope="module")
def graph() -> dict[str, dict[str, int]]:
    return imports(SRC)


def test_lower_layers_never_import_higher_ones(graph):
    assert layering_violations(graph) == []


def test_no_import_cycles_among_vp2o_modules(graph):
    assert cycles(graph) == []


def test_the_checks_see_what_they_must(tmp_path):
    """The checks themselves: a function-level import closes a cycle, a relative import is
    resolved, and the core importing the config is a violation."""
    pkg = tmp_path / "vp2o"
    for folder in ("data", "config"):
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "tasks.py").write_text("from ..config import DataConfig\n")
    (pkg / "config" / "__init__.py").write_text(
        "def check():\n    from vp2o.data.tasks import ARITH_PROMPTS\n")
    (pkg / "cli.py").write_text("import vp2o.config\n")
    g = imports(pkg)
    assert g["vp2o.data.tasks"] == {"vp2o.config": 1}
    assert g["vp2o.config"] == {"vp2o.data.tasks": 2}
    assert cycles(g) == [["vp2o.config", "vp2o.data.tasks"]]
    assert layering_violations(g) == [
        "vp2o.data.tasks:1 imports vp2o.config (layer 2 from layer 1)"]
