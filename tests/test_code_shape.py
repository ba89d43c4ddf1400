"""The package's shape: files under 500 lines, imports in one direction, no import circle, models that never
read the machine. Parsed from the source, so it runs in a second."""

import ast
import os
import re

import pytest

from tests import REPO

PACKAGE = os.path.join(REPO, "clusterformer_jax")
# the modules the trainer builds on: none of them may import from trainers/
BELOW_TRAINERS = (
    "clusterformer_jax.tasks",
    "clusterformer_jax.optim",
    "clusterformer_jax.sharding",
    "clusterformer_jax.models",
    "clusterformer_jax.data",
    "clusterformer_jax.errors",
    "clusterformer_jax.runtime",
    "clusterformer_jax.checkpointing",
    "clusterformer_jax.convert",
)


def _modules() -> dict[str, str]:
    """Dotted module name -> file path, for every module of the package."""
    found = {}
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                dotted = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".").removesuffix(".__init__")
                found[dotted] = path
    return found


def _imports(path: str, modules: dict[str, str]) -> set[str]:
    """The package modules ``path`` imports (at any depth: lazy imports count too)."""
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        out.update(n for n in names if n in modules)
    return out


def test_no_file_over_500_lines():
    long = {path: n for path in _modules().values() if (n := len(open(path).read().splitlines())) > 500}
    assert not long, long


def test_imports_point_one_way_and_form_no_circle():
    modules = _modules()
    graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
    upward = [
        (a, b)
        for a, deps in graph.items()
        for b in deps
        if a.startswith(BELOW_TRAINERS) and b.startswith("clusterformer_jax.trainers")
    ]
    assert not upward, upward
    assert not [d for d in graph["clusterformer_jax.errors"]], "errors.py is a leaf"

    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                pytest.fail("import circle: " + " -> ".join(path[path.index(dep) :] + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_models_never_read_the_machine():
    pattern = re.compile(r"default_backend|device_count|/proc/|host_allocator")
    hits = [
        f"{path}:{i}"
        for name, path in _modules().items()
        if name.startswith("clusterformer_jax.models")
        for i, line in enumerate(open(path), 1)
        if pattern.search(line)
    ]
    assert not hits, hits
