"""The import graph of ``src/herald``: no cycles, and the layers point one way.

Every module is parsed with :mod:`ast` (nothing is imported), and each ``import`` statement
that names a herald module is an edge, wherever it stands: at module level, under
``if TYPE_CHECKING:``, in a ``try:``, or inside a function. Imports inside functions count
too because a lazy import that closes a circle is still a circle in the design (it only moves
the failure from import time to call time); none is needed today. What does not count:

* module names held as data and loaded with :func:`importlib.import_module`, as the
  URL-scheme registry in ``herald/transports/__init__.py`` loads the engines and
  ``herald/inbox/__init__.py`` loads the optional inbox stores: a registry names its plug-ins,
  it does not depend on them;
* the implicit import of parent packages: ``from herald.transports.base import X`` is an edge
  to ``herald.transports.base`` only, not to ``herald.transports`` (whose ``__init__`` may
  re-export its submodules), as import-linter and grimp count them.

``from package import name`` is an edge to ``package.name`` when that is a module, else to
``package``.
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Iterable
from itertools import pairwise
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"

#: The packages that build on the public App API (the target map in ARCHITECTURE.md).
PATTERNS = (
    "herald.eventsourcing",
    "herald.saga",
    "herald.outbox",
    "herald.observability",
    "herald.schema",
    "herald.tasks",
    "herald.web",
)
#: The core: the App, its consume loop and what they are made of. Tooling above it (the CLI,
#: the benchmark, the demo, the test helpers) may use the patterns; the core may not.
CORE = (
    "herald.app",
    "herald.app_like",
    "herald.codec",
    "herald.consumer",
    "herald.context",
    "herald.dlq",
    "herald.errors",
    "herald.inbox",
    "herald.message",
    "herald.middleware",
    "herald.subscriber",
    "herald.transports",
)
#: What sits above the transports: a transport never imports any of it.
ABOVE_TRANSPORTS = (
    "herald.app",
    "herald.app_like",
    "herald.cli",
    "herald.consumer",
    "herald.context",
    "herald.dlq",
    "herald.inbox",
    "herald.middleware",
    "herald.subscriber",
)

Edge = tuple[str, int]  # (target module, line number in the importing file)


def _modules(src: Path) -> dict[str, Path]:
    out = {}
    for path in sorted((src / "herald").rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def import_graph(src: Path = SRC) -> dict[str, dict[str, int]]:
    """``{module: {imported herald module: first line}}`` for every module under ``src``."""
    modules = _modules(src)
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: dict[str, int] = {}
        for target, line in _imports(ast.parse(path.read_text(), str(path)), package, modules):
            edges.setdefault(target, line)
        graph[name] = edges
    return graph


def _imports(tree: ast.Module, package: str, modules: dict[str, Path]) -> Iterable[Edge]:
    for node in ast.walk(tree):  # every statement, nested ones included
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                if f"{base}.{alias.name}" in modules:
                    yield f"{base}.{alias.name}", node.lineno
                elif base in modules:
                    yield base, node.lineno


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One shortest cycle (``[a, b, ..., a]``) through each strongly connected component."""
    return [_shortest_cycle(graph, set(c), c[0]) for c in tangles(graph)]


def tangles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with a cycle: modules that import each other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan; the graph is small enough for recursion
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
            if len(component) > 1 or v in graph[v]:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(components)


def _shortest_cycle(graph: dict[str, dict[str, int]], within: set[str], start: str) -> list[str]:
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(graph[v]):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [start, *reversed(path[:-1]), start]
            if w in within and w not in parent:
                parent[w] = v
                queue.append(w)
    raise AssertionError(f"no cycle through {start}")  # unreachable for an SCC


def _describe(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    steps = [f"{a} (line {graph[a][b]}) -> {b}" for a, b in pairwise(cycle)]
    return "\n    ".join(steps)


def _within(module: str, prefixes: Iterable[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _violations(
    graph: dict[str, dict[str, int]], importers: Iterable[str], forbidden: Iterable[str]
) -> list[str]:
    importers, forbidden = tuple(importers), tuple(forbidden)
    return [
        f"{src} (line {line}) imports {dst}"
        for src, edges in sorted(graph.items())
        if _within(src, importers)
        for dst, line in sorted(edges.items())
        if _within(dst, forbidden)
    ]


def test_no_import_cycles() -> None:
    graph = import_graph()
    report = []
    for tangle in tangles(graph):
        cycle = _shortest_cycle(graph, set(tangle), tangle[0])
        report.append(f"{', '.join(tangle)}; for example:\n    {_describe(graph, cycle)}")
    assert not report, "modules that import each other:\n  " + "\n  ".join(report)


def test_transports_import_nothing_above_them() -> None:
    bad = _violations(import_graph(), ["herald.transports"], ABOVE_TRANSPORTS)
    assert not bad, "a transport imports a layer above it:\n  " + "\n  ".join(bad)


def test_core_does_not_import_the_patterns() -> None:
    bad = _violations(import_graph(), CORE, PATTERNS)
    assert not bad, "the core imports a pattern package:\n  " + "\n  ".join(bad)


def test_patterns_do_not_reach_into_an_engine() -> None:
    graph = import_graph()
    engines = sorted({m for m in graph if m.count(".") >= 2 and _within(m, ["herald.transports"])})
    engines = [e for e in engines if e != "herald.transports.base"]
    bad = _violations(graph, PATTERNS, engines)
    assert not bad, "a pattern package reaches into an engine:\n  " + "\n  ".join(bad)


def test_every_listed_package_is_a_real_prefix() -> None:
    # a typo in CORE or ABOVE_TRANSPORTS would silently check nothing
    graph = import_graph()
    for prefix in (*CORE, *ABOVE_TRANSPORTS):
        assert any(_within(m, [prefix]) for m in graph), prefix


# --- the checker itself, on small made-up trees ------------------------------------------------


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / "herald" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_checker_sees_type_checking_function_and_relative_imports(tmp_path: Path) -> None:
    src = _tree(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "import typing\nif typing.TYPE_CHECKING:\n    from herald.b import B\n",
            "b.py": "def f():\n    from . import c\n",
            "c.py": "import herald.a\n",
            "d.py": "import importlib\nimportlib.import_module('herald.a')\n",
        },
    )
    graph = import_graph(src)
    assert graph["herald.a"] == {"herald.b": 3}
    assert graph["herald.b"] == {"herald.c": 2}
    assert graph["herald.d"] == {}
    assert find_cycles(graph) == [["herald.a", "herald.b", "herald.c", "herald.a"]]


def test_checker_finds_no_cycle_through_a_parent_package(tmp_path: Path) -> None:
    src = _tree(
        tmp_path,
        {
            "__init__.py": "from herald.p.x import X\n",
            "p/__init__.py": "from herald.p.x import X\n",
            "p/x.py": "from herald.p.y import Y\nX = 1\n",
            "p/y.py": "Y = 2\n",
        },
    )
    assert find_cycles(import_graph(src)) == []


def test_checker_reports_a_self_import(tmp_path: Path) -> None:
    src = _tree(tmp_path, {"a.py": "import herald.a\n"})
    assert find_cycles(import_graph(src)) == [["herald.a", "herald.a"]]


def test_public_names_resolve() -> None:
    import herald

    assert set(herald.__all__) >= {
        "App",
        "Context",
        "DecodeError",
        "Delivery",
        "Features",
        "Message",
        "Permanent",
        "Retry",
        "Subscription",
        "Transport",
        "TransportError",
        "dead_letter_topic",
        "event_type",
    }
    for name in herald.__all__:
        assert getattr(herald, name) is not None, name
    from herald.dlq import REPLAY_GROUP, TOOL_GROUP  # moved, still importable from the tool

    assert (REPLAY_GROUP, TOOL_GROUP) == ("replay_group", "herald.dlq")


def test_checker_reports_a_layer_violation(tmp_path: Path) -> None:
    src = _tree(
        tmp_path,
        {
            "__init__.py": "",
            "consumer.py": "",
            "transports/__init__.py": "",
            "transports/x/__init__.py": "",
            "transports/x/transport.py": "def f():\n    import herald.consumer\n",
        },
    )
    bad = _violations(import_graph(src), ["herald.transports"], ABOVE_TRANSPORTS)
    assert bad == ["herald.transports.x.transport (line 2) imports herald.consumer"]
