"""The package's shape: no import cycle among its modules, short modules, the CLI imported by no
one, and no domain module composing Hydra. Read from the sources (ast), nothing is imported."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 400
# The packages whose modules are checked: moeprune's own (pyproject lists them, with the folders
# prune/, quant/, evaluate/ installed as moeprune.prune ...) and the sweeper plugin.
ROOTS = ("moeprune", "hydra_plugins.moeprune_optuna_sweeper")


def _package_dirs() -> dict[str, Path]:
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    remap = tool.get("package-dir", {})
    out = {}
    for pkg in tool["packages"]:
        if not pkg.startswith(ROOTS):
            continue
        # the nearest remapped ancestor decides the folder (moeprune.prune.strategies -> prune/strategies)
        parts = pkg.split(".")
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in remap:
                base = REPO / remap[".".join(parts[:i])]
                out[pkg] = base.joinpath(*parts[i:])
                break
        else:
            out[pkg] = REPO.joinpath(*parts)
    return out


def modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> file (a package is its __init__.py)."""
    out = {}
    for pkg, folder in _package_dirs().items():
        for file in sorted(folder.glob("*.py")):
            out[pkg if file.stem == "__init__" else f"{pkg}.{file.stem}"] = file
    return out


def _imports(name: str, file: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules `name` imports, module-level and function-local alike: a local import
    runs whenever its function does, so a cycle through one is as real (it only moves the failure
    from import time to call time, which is how such cycles were dodged). An import of `a.b.c` is
    an edge to `a.b.c` alone: Python runs the parents' __init__ first, but a package importing its
    own submodules (adapters/__init__.py registering each adapter) is not a cycle of its modules."""
    package = name if file.stem == "__init__" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import moeprune.prune.x.attr`-like spellings
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: _imports(name, file, known) for name, file in known.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None (depth-first search, colouring nodes)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_and_passes_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_import_graph_sees_the_package_and_its_edges():
    graph = import_graph()
    assert {"moeprune.cli", "moeprune.prune.strategies.base", "moeprune.evaluate.backends.hf",
            "hydra_plugins.moeprune_optuna_sweeper._core"} <= set(graph)
    assert "moeprune.errors" in graph["moeprune.cli"] or any("moeprune.errors" in v for v in graph.values())


def test_no_module_of_the_package_takes_part_in_an_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_no_module_of_the_package_is_over_400_lines():
    long = {name: n for name, file in modules().items() if (n := len(file.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_no_module_but_the_entrypoint_imports_the_cli():
    graph = import_graph()
    importers = sorted(name for name, deps in graph.items() if "moeprune.cli" in deps and name != "moeprune.__main__")
    assert not importers, f"modules importing moeprune.cli: {importers}"


def test_no_benchmark_imports_the_cli():
    """Benchmarks register the config with moeprune.registrations, as the package's own modules do:
    importing the CLI for its side effects hides what a script needs."""
    importers = []
    for file in sorted((REPO / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [f"{node.module}.{a.name}" for a in node.names] + [node.module or ""]
                     if isinstance(node, ast.ImportFrom) else [])
            if any(n == "moeprune.cli" or n.startswith("moeprune.cli.") for n in names):
                importers.append(file.name)
    assert not importers, f"benchmarks importing moeprune.cli: {sorted(set(importers))}"


def _composes_hydra(file: Path) -> list[str]:
    """The Hydra composition a module reaches for: hydra's compose / initialize*, or moeprune's
    preset helpers, which compose the app's config."""
    found = []
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = {a.name for a in node.names}
            if node.module == "hydra" and names & {"compose", "initialize", "initialize_config_module",
                                                   "initialize_config_dir"}:
                found.append(f"from hydra import {', '.join(sorted(names))}")
            if node.module in ("moeprune.presets", "moeprune.config") and names & {"preset", "presets", "_hydra"}:
                found.append(f"from {node.module} import {', '.join(sorted(names))}")
            if node.module == "moeprune" and "presets" in names:
                found.append("from moeprune import presets")
        if isinstance(node, ast.Import) and any(a.name in ("moeprune.presets", "hydra.compose") for a in node.names):
            found.append("import moeprune.presets")
    return found


def test_no_domain_module_composes_hydra():
    domain = ("moeprune.prune", "moeprune.quant", "moeprune.evaluate")
    offenders = {name: found for name, file in modules().items()
                 if name.startswith(domain) and (found := _composes_hydra(file))}
    assert not offenders, f"domain modules composing Hydra (a stage should read the preset): {offenders}"


# The shared types and what loads a model: the domain (prune/, quant/, evaluate/), the wing and the
# CLI import them, never the other way round.
GROUND_FLOOR = ("moeprune.errors", "moeprune.artifacts", "moeprune.dropmap", "moeprune.profile",
                "moeprune.checkpoint", "moeprune.models", "moeprune.adapters")
ABOVE = ("moeprune.prune", "moeprune.quant", "moeprune.evaluate", "moeprune.stages", "moeprune.cli")


def test_the_shared_types_import_nothing_from_the_domain_above_them():
    graph = import_graph()
    upward = {name: sorted(d for d in deps if d.startswith(ABOVE)) for name, deps in graph.items()
              if name.startswith(GROUND_FLOOR) and any(d.startswith(ABOVE) for d in deps)}
    assert not upward, f"ground-floor modules importing upward: {upward}"


def test_every_package_folder_is_listed_in_pyproject_so_a_built_wheel_holds_it():
    # the list is explicit (the folders are remapped), so a new subpackage must be added by hand;
    # an editable install finds it anyway, which is how moeprune.stages went missing from it once
    listed = set(_package_dirs())
    for pkg, folder in _package_dirs().items():
        for sub in folder.iterdir():
            if (sub / "__init__.py").is_file():
                assert f"{pkg}.{sub.name}" in listed, f"{pkg}.{sub.name} ({sub}) is not in pyproject's packages"
