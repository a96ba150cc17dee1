"""The harness's shape, checked: imports go downward only (no circle in parity/, no function-local import of a
sibling to hide one, no private name used from another file), `compare` stays a short list of phases, and only
`candidates/open.py` tells the candidate kinds apart."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARITY = ROOT / "parity"


def _module(path: Path) -> str:
    rel = path.relative_to(PARITY).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(["parity", *parts])


def _resolve(path: Path, node: ast.ImportFrom) -> list[str]:
    """The parity modules an ``from … import …`` names (``from . import render`` names parity.render)."""
    package = _module(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    if node.level:
        base = package[: len(package) - (node.level - 1)]
    else:
        mod = node.module or ""
        if not mod.startswith("siglip_scratch.parity"):
            return []
        base, node_module = ["parity"], mod[len("siglip_scratch.parity") :].lstrip(".")
        return [".".join([*base, *node_module.split(".")]) if node_module else "parity"]
    target = ".".join([*base, *(node.module.split(".") if node.module else [])])
    if node.module:
        return [target]
    return [f"{target}.{a.name}" for a in node.names]


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    files = {_module(p): p for p in PARITY.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in files}
    local = []
    for mod, path in files.items():
        tree = ast.parse(path.read_text())
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            for target in _resolve(path, node):
                while target not in files and "." in target:
                    target = target.rsplit(".", 1)[0]  # parity.render.x -> parity.render
                if target in files and target != mod:
                    edges[mod].add(target)
                    if id(node) not in top and path.name != "cli.py":  # the entry point defers heavy imports
                        local.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {target} inside a function")
    return edges, local


def test_parity_has_no_import_circle():
    edges, local = _graph()
    # A package's __init__ imports its children; a child importing the package itself is the circle to find.
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join([*stack[stack.index(t) :], t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, "import circles in parity/:\n" + "\n".join(cycles)
    assert not local, "function-local imports of parity modules (they hide circles):\n" + "\n".join(local)


def test_no_private_name_crosses_a_file():
    offenders = []
    for path in PARITY.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("siglip_scratch")):
                offenders += [
                    f"{path.relative_to(ROOT)}:{node.lineno} imports {a.name}"
                    for a in node.names
                    if a.name.startswith("_")
                ]
    assert not offenders, "\n".join(offenders)


def test_compare_is_a_short_list_of_phases():
    tree = ast.parse((PARITY / "compare.py").read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "compare")
    length = fn.end_lineno - fn.lineno + 1
    assert length <= 120, f"compare is {length} lines (the redesign's bound is 120)"


# What told the kinds apart before the Candidate interface: a getattr/hasattr on a candidate, the
# ActivationCandidate/OnnxCandidate flags, and a suffix test on the spec.
KIND_TESTS = {
    "getattr/hasattr on a candidate": r"(getattr|hasattr)\((cand|candidate|spec)\b",
    "the old flags": r"external_candidate|set_run_mode",
    "a suffix test": r"endswith\(\(?[\"'.A-Z_]*(onnx|SUFFIX)",
}


@pytest.mark.parametrize("what", sorted(KIND_TESTS))
def test_candidate_kinds_are_told_apart_only_in_open(what):
    """Only candidates/open.py looks at what kind of thing a candidate spec is."""
    pattern = re.compile(KIND_TESTS[what])
    offenders = [
        f"{path.relative_to(ROOT)}:{i}"
        for path in PARITY.rglob("*.py")
        if path.name != "open.py"
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, f"{what} outside candidates/open.py: {offenders}"
