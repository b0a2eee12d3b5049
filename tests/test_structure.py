"""The package's shape: its import graph has no cycle, and each fact below has one owner."""

import ast
from pathlib import Path

import oplora

PACKAGE = Path(oplora.__file__).parent


def imports() -> dict[str, set[str]]:
    """{module: the oplora modules it imports (anywhere in it, lazy imports included)}."""
    modules = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
               for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("oplora"):
                found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                          for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("oplora")}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return [*path[path.index(nxt):], nxt] if nxt in path else [*path, nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_the_import_graph_has_no_cycle():
    graph = imports()
    assert "oplora.resources" in graph["oplora.data"]  # the graph is really read
    assert cycle(graph) is None, " → ".join(cycle(graph))


def test_the_cycle_finder_finds_one():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_gpu_or_cpu_is_decided_in_one_place():
    """Only oplora/device.py asks torch whether there is a GPU: every step, stage and method takes its answer."""
    askers = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                    if "cuda.is_available" in p.read_text() and p != PACKAGE / "device.py")
    assert askers == []
