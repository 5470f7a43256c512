"""The import graph runs down the data flow, with no cycles; kernels/ imports nothing of engine/.

Layers, top to bottom (a module may import its own wing and any layer below it):
cli, quickstart -> filter, finetune, evaluation -> teacher -> modeling -> data -> leaves
(errors, metrics, storage, config_args) -> kernels.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {
    "engine.cli": 5, "engine.quickstart": 5,
    "engine.filter": 4, "engine.finetune": 4, "engine.evaluation": 4,
    "engine.teacher": 3,
    "engine.modeling": 2,
    "engine.data": 1,
    "engine.errors": 0, "engine.metrics": 0, "engine.judge": 0, "engine.storage": 0, "engine.config_args": 0, "engine": 0,
    "kernels": -1,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _unit(module: str) -> str:
    """The wing (or top-level module) a module belongs to: its key in LAYERS."""
    parts = module.split(".")
    for n in (2, 1):
        if ".".join(parts[:n]) in LAYERS:
            return ".".join(parts[:n])
    raise AssertionError(f"{module} is in no layer")


def _imports() -> dict[str, set[str]]:
    graph = {}
    for folder in ("engine", "kernels"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            name = _module_name(path)
            found = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("refteacher."):
                    base = node.module[len("refteacher."):]
                    for alias in node.names:  # `from refteacher.engine.data import _packer` names a module
                        candidate = f"{base}.{alias.name}"
                        found.add(candidate if (ROOT / (candidate.replace(".", "/") + ".py")).exists() else base)
                elif isinstance(node, ast.Import):
                    found |= {a.name[len("refteacher."):] for a in node.names if a.name.startswith("refteacher.")}
            graph[name] = found
    return graph


GRAPH = _imports()


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_go_down_the_flow(module):
    here = _unit(module)
    for target in GRAPH[module]:
        there = _unit(target)
        assert there == here or LAYERS[there] < LAYERS[here], f"{module} imports {target}, which is above it"


def test_no_cycles():
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in GRAPH.get(node, ()):
            if state.get(nxt) == 1:
                raise AssertionError(" -> ".join(path + [node, nxt]))
            if nxt in GRAPH and not state.get(nxt):
                visit(nxt, path + [node])
        state[node] = 2

    for module in GRAPH:
        if not state.get(module):
            visit(module, [])


def test_the_graph_is_read():
    assert "engine.filter.run" in GRAPH and "engine.filter.scoring" in GRAPH["engine.filter.run"]
    assert GRAPH["kernels.cosine"] <= {"kernels.dispatch"}
