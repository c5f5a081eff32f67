"""The library's shape: no import cycle (function-level imports included), core never imports the probes, the
tokenizers never import what is built on them, no function over 60 lines, and the registries list their parts."""
import ast
from pathlib import Path

import pytest

from conftest import REPO

FOLDERS = {"mim": "mimkit", "tokenizers": "mimkit.tokenizers", "probes": "mimkit.probes"}
CLI_LAYER = {"mimkit.cli", "mimkit.submit", "mimkit.study_cli"}  # the command line: may reach every command, probes included


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


def imports(name: str, path: Path, known: dict) -> set[str]:
    """mimkit modules `name` imports anywhere in its file (also inside functions), with the packages whose
    __init__ each import runs (except its own enclosing packages, whose __init__ is already running)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    enclosing = {".".join(name.split(".")[:i]) for i in range(1, len(name.split(".")))}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            while t:  # importing a.b.c runs a/__init__ and a/b/__init__ too
                if t in known and t != name and t not in enclosing:
                    found.add(t)
                t = t.rpartition(".")[0]
    return found


@pytest.fixture(scope="module")
def graph():
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_no_import_cycle(graph):
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = "done"

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_core_never_imports_probes(graph):
    core = [n for n in graph if not n.startswith("mimkit.probes") and n not in CLI_LAYER]
    bad = {n: sorted(m for m in graph[n] if m.startswith("mimkit.probes")) for n in core}
    assert not {n: m for n, m in bad.items() if m}


def test_tokenizers_never_import_what_is_built_on_them(graph):
    above = ("mimkit.targets", "mimkit.methods", "mimkit.engine", "mimkit.probes", "mimkit.cli")
    bad = {n: sorted(m for m in graph[n] if m.startswith(above)) for n in graph if n.startswith("mimkit.tokenizers")}
    assert not {n: m for n, m in bad.items() if m}


def test_no_library_function_over_60_lines():
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long


def test_registries_list_the_parts():
    from mimkit.heads import HEADS
    from mimkit.losses import LOSSES
    from mimkit.methods import METHODS
    from mimkit.targets import TARGETS
    from mimkit.tokenizers import TOKENIZERS
    assert {"pixels", "hog", "tokens", "teacher"} <= set(TARGETS)
    assert {"kmeans", "dvae", "vqkd"} <= set(TOKENIZERS)
    assert {"mae", "simmim", "maskfeat", "beit", "beitv2", "clustermim"} <= set(METHODS)
    assert {"decoder", "linear", "masked_linear"} <= set(HEADS) and {"mse", "l1", "ce"} <= set(LOSSES)
