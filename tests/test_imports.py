"""Package boundaries: no import cycle between diffalign's modules or packages, and the toy world imported from
outside `toy/` only where it plugs in.

The graph is read from the source with `ast`: every `import` / `from ... import` of a diffalign module, relative
ones and ones inside functions included (a function-level import is still a dependency; it only runs later),
except under `if TYPE_CHECKING:` (type hints only, never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "diffalign"

# The modules outside toy/ that import diffalign.toy, each where the toy world plugs into the rest:
TOY_PLUGS = {
    "diffalign.models.source": "the model alias 'toy' (the shipped pipeline), resolved for every loader",
    "diffalign.rewards.toy": "the toy reward, registered as 'toy' like the other rewards",
    "diffalign.data.prompts": "the prompt sets 'toy', 'toy:train' and 'toy:heldout'",
    "diffalign.evaluation.toy_distribution": "the set measure 'toy' (--distribution toy): judge features of renders",
    "diffalign.commands.toy": "the `diffalign toy` command",
    "diffalign.demo": "the toy-world demo (`diffalign demo`)",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_modules(source: str, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The diffalign modules `source` (the text of `module`) imports; `from P import name` counts as P.name when
    that is a module, else as P."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit_one(other)
                continue
            visit_one(child)

    def visit_one(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
        visit(node)

    visit(ast.parse(source))
    return {m for m in found if m in known and m != module}


def module_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(files)
    return {m: imported_modules(p.read_text(encoding="utf-8"), m, p.name == "__init__.py", known)
            for m, p in files.items()}


def package_of(module: str) -> str:
    """diffalign.generation.pairs.run -> diffalign.generation; top-level modules are their own package."""
    return ".".join(module.split(".")[:2])


def package_graph(modules: dict[str, set[str]]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {package_of(m): set() for m in modules}
    for m, targets in modules.items():
        graph[package_of(m)] |= {package_of(t) for t in targets} - {package_of(m)}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None; depth-first, nodes and edges in sorted order."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = walk(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = walk(start)
            if cycle:
                return cycle
    return None


# ------------------------------------------------------------------------------------------- the checker
def test_the_cycle_finder_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) is None  # a diamond is no cycle


def test_the_import_reader_sees_relative_function_level_and_not_type_checking_imports():
    known = {"diffalign.x", "diffalign.x.a", "diffalign.x.b", "diffalign.y", "diffalign.y.c", "diffalign.z"}
    source = (
        "from typing import TYPE_CHECKING\n"
        "from . import b\n"
        "from ..y import c\n"
        "import diffalign.z\n"
        "if TYPE_CHECKING:\n"
        "    from ..y import nothing\n"
        "def f():\n"
        "    from ..y import some_name\n"
    )
    assert imported_modules(source, "diffalign.x.a", False, known) == {"diffalign.x.b", "diffalign.y.c",
                                                                        "diffalign.y", "diffalign.z"}
    modules = {"diffalign.x.a": {"diffalign.y.c"}, "diffalign.y.c": {"diffalign.x.b"}, "diffalign.x.b": set()}
    assert find_cycle(modules) is None
    assert find_cycle(package_graph(modules)) == ["diffalign.x", "diffalign.y", "diffalign.x"]


# ------------------------------------------------------------------------------------------- the package
@pytest.fixture(scope="module")
def modules():
    return module_graph()


def test_no_import_cycle_between_modules(modules):
    cycle = find_cycle(modules)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_cycle_between_packages(modules):
    graph = package_graph(modules)
    cycle = find_cycle(graph)
    if cycle:
        def why(a: str, b: str) -> str:  # the modules of a that import b
            return ", ".join(sorted(m for m, ts in modules.items()
                                    if package_of(m) == a and any(package_of(t) == b for t in ts)))

        edges = [f"{a} -> {b} ({why(a, b)})" for a, b in zip(cycle, cycle[1:])]
        pytest.fail("package import cycle: " + "; ".join(edges))


def test_only_the_toy_plugs_import_the_toy_world(modules):
    importers = {m for m, targets in modules.items()
                 if not package_of(m) == "diffalign.toy" and any(package_of(t) == "diffalign.toy" for t in targets)}
    assert importers <= set(TOY_PLUGS), f"only {sorted(TOY_PLUGS)} import diffalign.toy; also: " \
        f"{sorted(importers - set(TOY_PLUGS))}"
    assert importers == set(TOY_PLUGS), f"no longer importing the toy world (drop from TOY_PLUGS): " \
        f"{sorted(set(TOY_PLUGS) - importers)}"
