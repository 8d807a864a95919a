"""The top-level packages are layers: each imports only the layers below it, so there is no cycle.

    envs         the tool protocol, the sandbox that runs a tool call, the search tool
    data         tasks, answer metrics, SFT traces, the datamodule
    models       model plumbing: loading, LoRA, the test tokenizer
    grpo         the algorithm, its Lightning module, the CLI, inference
    callbacks    Lightning callbacks (metrics, report, export)
    experiments  scripts that run the model (closed-book memory, cold-start evaluation)

Every import statement of every module is read with `ast` (those inside functions too, and
whatever the module would do at run time), so a lazy import cannot hide an edge.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ALLOWED = {  # package: the packages it may import
    "envs": set(),
    "data": {"envs"},
    "models": {"envs", "data"},
    "grpo": {"envs", "data", "models"},
    "callbacks": {"envs", "data", "models", "grpo"},
    "experiments": {"envs", "data", "models", "grpo"},
}


def imported_packages(path: Path) -> list[tuple[str, int, str]]:
    """(top-level package, line, statement) of every absolute import of a project package in `path`."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:  # relative imports stay inside their package
            continue
        for name in names:
            top = name.split(".")[0]
            if top in ALLOWED:
                out.append((top, node.lineno, ast.unparse(node)))
    return out


def import_graph(repo: Path = REPO) -> dict[tuple[str, str], list[str]]:
    """{(package, imported package): ["file:line  statement", ...]} over every module of every package."""
    edges = defaultdict(list)
    for package in ALLOWED:
        for path in sorted((repo / package).rglob("*.py")):
            for dep, line, statement in imported_packages(path):
                if dep != package:
                    edges[package, dep].append(f"{path.relative_to(repo)}:{line}  {statement}")
    return dict(edges)


def find_cycle(edges) -> list[str] | None:
    """A cycle of the package graph as [a, b, ..., a], or None."""
    succ = defaultdict(set)
    for a, b in edges:
        succ[a].add(b)
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(succ[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(succ):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_the_allowed_order_has_no_cycle():
    assert find_cycle([(a, b) for a, deps in ALLOWED.items() for b in deps]) is None


def test_every_package_imports_only_the_layers_below_it():
    bad = [f"{a} -> {b}: {where[0]}" + (f" (and {len(where) - 1} more)" if len(where) > 1 else "")
           for (a, b), where in sorted(import_graph().items()) if b not in ALLOWED[a]]
    assert not bad, "imports against the layering (tests/test_layering.py, ALLOWED):\n" + "\n".join(bad)


def test_the_package_graph_has_no_cycle():
    edges = import_graph()
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle " + " -> ".join(cycle) + ":\n" + "\n".join(
        f"{a} -> {b}: {edges[a, b][0]}" for a, b in zip(cycle, cycle[1:]))


def test_every_package_is_layered_and_installed():
    tomllib = pytest.importorskip("tomllib")
    on_disk = {p.parent.name for p in REPO.glob("*/__init__.py")} - {"tests"}
    installed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    assert on_disk == set(ALLOWED) == installed, (on_disk, installed)


def test_the_checks_can_fail(tmp_path):
    """A cycle between two packages (as data -> grpo -> data was) is found and named."""
    for package, body in (("data", "from grpo.rollout import run_tool\n"), ("grpo", "import data.types\n")):
        (tmp_path / package).mkdir()
        (tmp_path / package / "m.py").write_text(body)
    edges = import_graph(tmp_path)
    assert edges == {("data", "grpo"): ["data/m.py:1  from grpo.rollout import run_tool"],
                     ("grpo", "data"): ["grpo/m.py:1  import data.types"]}
    assert find_cycle(edges) == ["data", "grpo", "data"]
    assert "grpo" not in ALLOWED["data"]
