"""The package's shape: its import graph has no cycle, the layers of docs/architecture.md hold, and each fact below
has one owner."""

import ast
import textwrap
from pathlib import Path

import pytest

import oplora

PACKAGE = Path(oplora.__file__).parent
ARCHITECTURE = PACKAGE.parent / "docs" / "architecture.md"


def imports(package: Path = PACKAGE) -> dict[str, set[str]]:
    """{module: the modules of `package` it imports (anywhere in it, lazy imports included)}.

    Importing `a.b.c` first runs the package `a.b` (its `__init__`), so the packages above an imported module count as
    imported too, except the importer's own (they are already running when its code runs). A package whose
    `__init__` calls `discover` (oplora.registry: a package scan) imports each of its public modules. Imports under
    `if TYPE_CHECKING:` never run and do not count."""
    root = package.parent
    modules = {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
               for p in package.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        tree, found = ast.parse(path.read_text()), set()
        for node in ast.walk(strip_type_checking(tree)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == package.name:
                found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                          for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.split(".")[0] == package.name}
            elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == "discover":
                found |= {m for m in modules if m.rpartition(".")[0] == name and not m.split(".")[-1].startswith("_")}
        found |= {parent for m in found for parent in ancestors(m)}
        graph[name] = {m for m in found if m in modules and m != name and m not in ancestors(name)}
    return graph


def strip_type_checking(tree: ast.Module) -> ast.Module:
    """The module without its `if TYPE_CHECKING:` blocks: imports for annotations only, never run."""
    for node in ast.walk(tree):
        for field in ("body", "orelse"):
            statements = getattr(node, field, None)
            if isinstance(statements, list):
                setattr(node, field, [s for s in statements if not (isinstance(s, ast.If) and
                                                                     getattr(s.test, "id", "") == "TYPE_CHECKING")])
    return tree


def ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


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
    assert "oplora.methods.lora_null" in graph["oplora.methods"]  # the package scan counts
    assert "oplora.methods" in graph["oplora.diagnose"]  # importing oplora.methods.base runs oplora.methods first
    assert cycle(graph) is None, " → ".join(cycle(graph))


def test_the_cycle_finder_finds_one():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_a_cycle_through_a_package_init_is_found(tmp_path):
    """The cycle of issue 24: calibration → record → models, whose function-level `from pkg.methods.base import …` runs
    pkg/methods/__init__ first, which (by package scan) imports lora_null, which imports calibration."""
    files = {"__init__.py": "",
             "calibration.py": "from pkg.record import config_hash\n",
             "record.py": "from pkg.models import weights\n",
             "models.py": "def weights():\n    from pkg.methods.base import lora_layers\n",
             "registry.py": "def discover(package, path): ...\n",
             "methods/__init__.py": "from pkg.registry import discover\n\ndiscover(__name__, __path__)\n",
             "methods/base.py": "def lora_layers(): ...\n",
             "methods/lora_null.py": "from pkg.calibration import corpus\nfrom pkg.methods.base import lora_layers\n"}
    for name, text in files.items():
        (tmp_path / "pkg" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pkg" / name).write_text(textwrap.dedent(text))
    found = cycle(imports(tmp_path / "pkg"))
    assert found is not None and "pkg.methods" in found and "pkg.calibration" in found, found
    (tmp_path / "pkg" / "models.py").write_text("")  # the weight readers moved out: no cycle
    assert cycle(imports(tmp_path / "pkg")) is None


def layers(text: str) -> list[list[str]]:
    """The layers of the diagram under "## Layers", top first: each line's modules (`x.py`) and packages (`x/`),
    before its "←" comment."""
    block = text.split("## Layers", 1)[1].split("```", 2)[1]
    return [[word for word in line.split("←")[0].split() if word.endswith((".py", "/"))]
            for line in block.splitlines() if line.strip()]


def layer_of(module: str, placed: dict[str, int]) -> int | None:
    """The layer of a module: its own entry, or the nearest package above it that has one."""
    for name in [module, *reversed(ancestors(module))]:
        if name in placed:
            return placed[name]
    return None


def test_the_documented_layers_hold():
    """Every module sits in one layer of docs/architecture.md and imports only its own layer or those below."""
    placed = {}
    for index, names in enumerate(layers(ARCHITECTURE.read_text())):
        for word in names:
            module = f"{PACKAGE.name}.{word.removesuffix('.py').removesuffix('/').replace('/', '.')}"
            assert module not in placed, f"{word} is in two layers"
            placed[module] = index
    graph = imports()
    unplaced = sorted(m for m in graph if m != PACKAGE.name and layer_of(m, placed) is None)
    assert unplaced == [], f"modules in no layer of {ARCHITECTURE}"
    upward = sorted(f"{m} → {t}" for m, targets in graph.items() for t in targets
                    if m != PACKAGE.name and layer_of(t, placed) < layer_of(m, placed))
    assert upward == [], f"imports that go up a layer of {ARCHITECTURE}"


@pytest.mark.parametrize("name, owner", [("OPLORA_CACHE", "cache.py"), ("adapter_model.safetensors", "rundir.py")])
def test_a_name_is_spelled_by_its_owner_only(name, owner):
    """The cache root's variable only in oplora/cache.py, PEFT's adapter file name only in oplora/rundir.py: every
    other module asks them (a `Cache`, `ADAPTER_WEIGHTS`)."""
    def spells(path: Path) -> bool:
        return any(isinstance(node, ast.Constant) and isinstance(node.value, str) and name in node.value
                   for node in ast.walk(strip_docstrings(path)))

    assert sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if p.name != owner and spells(p)) == []


def strip_docstrings(path: Path) -> ast.Module:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value,
                                                                                             ast.Constant):
            node.body = body[1:]
    return tree


def test_gpu_or_cpu_is_decided_in_one_place():
    """Only oplora/device.py asks torch whether there is a GPU: every step, stage and method takes its answer."""
    askers = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                    if "cuda.is_available" in p.read_text() and p != PACKAGE / "device.py")
    assert askers == []
