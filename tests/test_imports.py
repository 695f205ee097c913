"""The package's import structure: no import circle (function-level imports included), light layers stay
light, and every module imports in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "torchblt"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _skipped(node: ast.AST, parents: dict[ast.AST, ast.AST], module_level: bool) -> bool:
    """Under ``if TYPE_CHECKING`` (never run), or inside a function when only module-level imports count."""
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
        if module_level and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return True
    return False


def import_graph(module_level: bool = False) -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere (module level and inside functions, or with
    ``module_level`` only what importing it runs; never under ``if TYPE_CHECKING``). ``from pkg import sub``
    is an edge to the submodule ``pkg.sub``."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        is_package = path.name == "__init__.py"
        deps: set[str] = set()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or _skipped(node, parents, module_level):
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    here = name.split(".") if is_package else name.split(".")[:-1]
                    here = here[: len(here) - node.level + 1]
                    base = ".".join(here + ([node.module] if node.module else []))
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
                targets = subs if len(subs) == len(node.names) else [base, *subs]
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def closure(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph[todo.pop()]:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_no_import_circle():
    graph = import_graph()
    assert len(graph) > 50 and "torchblt.train.trainer" in graph["torchblt.commands.train"] | closure(
        graph, "torchblt.commands.train")
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_checker_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_light_layers_do_not_import_the_trainer():
    """STYLE.md: importing patching, tokenizer or data never imports the trainer or distributed code (a
    function may, when it is called: e.g. load_model reading a training checkpoint)."""
    graph = import_graph(module_level=True)
    for start in ["torchblt.patching", "torchblt.tokenizer"] + [m for m in graph if m.startswith("torchblt.data")]:
        heavy = sorted(m for m in closure(graph, start) if m.startswith(("torchblt.train", "torchblt.commands")))
        assert not heavy, f"{start} imports {heavy}"


def test_every_module_imports_in_a_fresh_interpreter():
    """Leaves first (the order a circle would break); the kinds table is complete without extra imports."""
    graph = import_graph()
    order: list[str] = []

    def place(node: str) -> None:
        if node not in order:
            for dep in sorted(graph[node]):
                place(dep)
            order.append(node)

    for node in sorted(graph):
        place(node)
    # adapters of optional extras: imported when their extra is installed
    optional = {"torchblt.eval.harness": "lm_eval", "torchblt.serve": "starlette", "torchblt.serve.app": "starlette"}
    optional.update({m: "starlette" for m in order if m.startswith("torchblt.serve.")})
    script = (
        "import importlib, importlib.util, sys\n"
        "from torchblt.train.kinds import KINDS\n"
        "assert {'blt', 'entropy', 'byte', 'bpe'} <= set(KINDS), sorted(KINDS)\n"
        f"optional = {optional!r}\n"
        f"for name in {order!r}:\n"
        "    if name in optional and importlib.util.find_spec(optional[name]) is None:\n"
        "        continue\n"
        "    importlib.import_module(name)\n"
    )
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
