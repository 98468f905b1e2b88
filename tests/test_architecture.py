"""docs/architecture.md's module map names real modules, and every module has a line in it;
no import cycles in k3batch/ and pipelines/."""

import ast
import itertools
import re
from pathlib import Path

import networkx

REPO = Path(__file__).resolve().parent.parent
ARCHITECTURE = REPO / "docs" / "architecture.md"
PACKAGES = ("k3batch", "pipelines")
SHOWN_CYCLES = 20  # a tangle can hold very many; the first ones say where to look


def named_paths() -> set[str]:
    """Paths the page names in backticks: `k3batch/x.py`, `k3batch/pkg/`, `pipelines/x.py`."""
    return set(re.findall(r"`((?:k3batch|pipelines)/[\w/]*?(?:\.py|/))`", ARCHITECTURE.read_text()))


def test_every_module_the_map_names_exists():
    names = named_paths()
    assert len(names) > 20, names  # the pattern still finds the map
    missing = sorted(name for name in names if not (REPO / name).exists())
    assert not missing, f"docs/architecture.md names modules that do not exist: {missing}"


def test_every_module_has_a_line_in_the_map():
    names = named_paths()
    modules = sorted(
        path.relative_to(REPO).as_posix()
        for package in PACKAGES
        for path in (REPO / package).rglob("*.py")
        if path.name != "__init__.py"
    )
    unnamed = [module for module in modules if module not in names]
    assert not unnamed, f"docs/architecture.md's module map lacks: {unnamed}"


def test_the_dataflow_picture_renders_on_github():
    text = ARCHITECTURE.read_text()
    assert "```mermaid\nflowchart" in text


def module_files() -> dict[str, Path]:
    """Every module of k3batch/ and pipelines/ by dotted name (a package by its own name)."""
    modules = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def import_graph() -> networkx.DiGraph:
    """An edge from each module to each module of ours it imports, wherever the import
    statement is: at the top, inside a function, under `if TYPE_CHECKING:`. `import a.b.c` is
    an edge to the deepest of `a.b.c`, `a.b`, `a` that is a module; `from a import b` to
    `a.b` when that is a module, else to `a`; relative imports resolve against the module.

    Imports by name at run time (`importlib.import_module(f"pipelines.{name}")`) are not
    edges, on purpose: they are how the registries stay one-way. `k3batch.job.kinds` finds a
    job kind's module `pipelines/<kind>.py` by name, which imports `k3batch` statically, and
    `k3batch.outputs.base` finds an output format's module by name the same way.
    """
    modules = module_files()

    def deepest(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = networkx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets += [deepest(alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(parent + ([node.module] if node.module else []))
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.append(full if full in modules else deepest(base))
        graph.add_edges_from((name, t) for t in targets if t is not None and t != name)
    return graph


def test_the_import_graph_sees_function_level_and_type_checking_imports():
    """The walk below is only as good as its edges: these are each of one kind."""
    graph = import_graph()
    # Under `if TYPE_CHECKING:`.
    assert graph.has_edge("k3batch.job.kinds", "k3batch.outputs")
    # Inside a function.
    assert graph.has_edge("k3batch.model.superres.loading", "k3batch.testing.tiny_sr")
    # `from k3batch.outputs import records`: the submodule, not the package.
    assert graph.has_edge("k3batch.job.run", "k3batch.outputs.records")
    assert not graph.has_edge("k3batch.job.run", "k3batch.outputs")
    # By name at run time: no edge (see import_graph).
    assert not graph.has_edge("k3batch.job.kinds", "pipelines.text_to_image")


def test_no_import_cycles_in_k3batch_and_pipelines():
    """No module imports, however indirectly, a module that imports it back, counting every
    import statement (top-level, function-level, TYPE_CHECKING): each cycle is named."""
    graph = import_graph()
    cycles = []
    for cycle in itertools.islice(networkx.simple_cycles(graph), SHOWN_CYCLES):
        first = cycle.index(min(cycle))  # each cycle from its first module by name
        cycle = cycle[first:] + cycle[:first]
        cycles.append(" -> ".join([*cycle, cycle[0]]))
    assert not cycles, "import cycles:\n" + "\n".join(sorted(cycles))
