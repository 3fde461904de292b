"""Imports only point down the package's layers, and no module imports itself back through others.

Layers, lowest first: utils <- data, models <- optim, evaluate <- adapters <- train <- pipeline <- demo, bench, cli,
commands, deploy.
A module may import its own layer and the ones below; every import counts, also those inside functions and under
TYPE_CHECKING, because each is a dependency a reader has to follow.
"""

from __future__ import annotations

import ast
from pathlib import Path

import arenaseg

PACKAGE = Path(arenaseg.__file__).parent
LAYERS = {
    "utils": 0,
    "data": 1,
    "models": 1,
    "run_record": 1,
    "optim": 2,
    "evaluate": 2,
    "adapters": 3,
    "train": 4,
    "pipeline": 5,
    "demo": 6,
    "bench": 6,
    "cli": 6,
    "commands": 6,
    "deploy": 6,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(name: str) -> set[str]:
    """The arenaseg modules that ``name`` imports; ``from package import submodule`` names the submodule."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in MODULES else node.module)
    return {m for m in found if m.split(".")[0] == "arenaseg" and m != name}


def layer(name: str) -> int:
    parts = name.split(".")
    return LAYERS[parts[1]] if len(parts) > 1 else 0  # the package root holds only __version__


GRAPH = {name: imports(name) for name in MODULES}


def test_every_module_has_a_layer() -> None:
    assert {name.split(".")[1] for name in MODULES if "." in name} == set(LAYERS)


def upward(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{name} imports {dep}" for name, deps in graph.items() for dep in deps if layer(dep) > layer(name))


def cycles(graph: dict[str, set[str]]) -> list[str]:
    """Depth-first search; a module met again while it is still on the path closes a cycle."""
    found, done = [], set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            found.append(" -> ".join([*path[path.index(name) :], name]))
            return
        if name in done:
            return
        for dep in sorted(graph.get(name, ())):
            visit(dep, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
    return found


def test_imports_point_down() -> None:
    assert upward(GRAPH) == []


def test_no_import_cycle() -> None:
    assert cycles(GRAPH) == []


def test_the_checks_catch_what_they_are_for() -> None:
    """The graph is read right (known edges, a lazy import inside a function included), and the two checks flag
    an upward import and a cycle."""
    assert "arenaseg.adapters.tuners" in GRAPH["arenaseg.train.loop"]
    assert "arenaseg.adapters.peft_baselines" in GRAPH["arenaseg.adapters.tuners"]
    assert "arenaseg.adapters" in GRAPH["arenaseg.pipeline"]
    # the configs import no adapter code: the settings fields and the optimizer's names of its step directions
    assert GRAPH["arenaseg.adapters.config"] == {"arenaseg.utils.settings", "arenaseg.optim.proximal"}
    bad = {"arenaseg.adapters.factory": {"arenaseg.train.loop"}, "arenaseg.train.loop": {"arenaseg.adapters.factory"}}
    assert upward(bad) == ["arenaseg.adapters.factory imports arenaseg.train.loop"]
    assert cycles(bad) == ["arenaseg.adapters.factory -> arenaseg.train.loop -> arenaseg.adapters.factory"]
