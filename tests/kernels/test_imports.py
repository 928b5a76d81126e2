"""The import graph of loupe_kernels has no cycle (lazy imports and the lazy Triton loader included)
and never reaches loupe."""
from __future__ import annotations

import ast
from pathlib import Path

import loupe_kernels

PKG = Path(loupe_kernels.__file__).resolve().parent


def _edges() -> dict[str, set[str]]:
    """Module -> the loupe_kernels modules it imports anywhere in its body (functions included)."""
    mods = {p.stem for p in PKG.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for p in PKG.glob("*.py"):
        deps: set[str] = set()
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:
                    if node.module:
                        deps.add(node.module.split(".")[0])
                    else:  # from . import x: a module, or a name of the package __init__
                        deps.update(a.name if a.name in mods else "__init__" for a in node.names)
                elif node.module and node.module.split(".")[0] in ("loupe_kernels", "loupe"):
                    deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.split(".")[0] in ("loupe_kernels", "loupe"))
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "triton_loader"
                  and node.args and isinstance(node.args[0], ast.Constant)):
                deps.add(f"triton_{node.args[0].value}")   # the lazy loader names its module by a string
        graph[p.stem] = {d.removeprefix("loupe_kernels.") for d in deps}
        assert all(d in mods or d.startswith("loupe") for d in graph[p.stem]), (p.stem, graph[p.stem])
    return graph


def test_loupe_kernels_never_imports_loupe():
    bad = {m: sorted(d for d in deps if d == "loupe" or d.startswith("loupe.")) for m, deps in _edges().items()}
    assert not any(bad.values()), bad


def test_no_import_cycle():
    graph = _edges()
    # the package __init__ re-exports every op; a cycle through it is the only kind allowed to exist
    # (Python initialises the package first), so the graph is checked without it
    graph = {m: deps - {"__init__"} for m, deps in graph.items() if m != "__init__"}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_triton_launchers_do_not_import_the_op_files():
    """The launchers return per-sample values / raw outputs; the op files reduce them (issue 17)."""
    graph = _edges()
    ops = {"shapley", "token_region_similarity", "interaction_loss"}
    for m, deps in graph.items():
        if m.startswith("triton_"):
            assert not deps & ops, (m, deps & ops)
