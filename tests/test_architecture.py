"""The import graph of ``loupe`` and ``loupe_kernels``: no cycles (lazy imports inside functions
count), and the kernel library never imports ``loupe``. Read from the source with ``ast``."""
from __future__ import annotations

import ast
import os

import loupe
import loupe_kernels

PACKAGES = {"loupe": os.path.dirname(loupe.__file__), "loupe_kernels": os.path.dirname(loupe_kernels.__file__)}


def _modules() -> dict[str, str]:
    """module name -> file, for every .py of both packages."""
    out = {}
    for pkg, root in PACKAGES.items():
        for d, _, files in os.walk(root):
            for f in files:
                if not f.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(d, f), os.path.dirname(root))[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(d, f)
    return out


def _resolve(name: str, modules: dict[str, str]) -> str | None:
    """The longest known module that ``name`` (a dotted import target) lies in."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    """Edges module -> imported module (within the two packages), every import statement included."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        is_pkg = path.endswith("__init__.py")
        package = mod if is_pkg else mod.rpartition(".")[0]
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package
                    for _ in range(node.level - 1):
                        base = base.rpartition(".")[0]
                    stem = f"{base}.{node.module}" if node.module else base
                else:
                    stem = node.module or ""
                # "from pkg import sub" imports the submodule when there is one, else a name of pkg
                targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in modules else stem for a in node.names]
            # the lazy Triton loader of loupe_kernels names its module by a string
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "triton_loader"
                    and node.args and isinstance(node.args[0], ast.Constant)):
                targets = [f"loupe_kernels.triton_{node.args[0].value}"]
            for t in targets:
                r = _resolve(t, modules)
                if r is not None and r != mod:
                    graph[mod].add(r)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_cycles():
    cycle = _cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_kernel_library_never_imports_loupe():
    graph = import_graph()
    bad = {m: sorted(t for t in ts if t == "loupe" or t.startswith("loupe."))
           for m, ts in graph.items() if m.startswith("loupe_kernels")}
    assert not any(bad.values()), f"loupe_kernels imports loupe: {bad}"


def test_triton_launchers_do_not_import_the_op_files():
    """The launchers return per-sample values / raw outputs; the op files reduce them."""
    graph = import_graph()
    ops = {f"loupe_kernels.{m}" for m in ("shapley", "token_region_similarity", "interaction_loss")}
    for m, deps in graph.items():
        if m.startswith("loupe_kernels.triton_"):
            assert not deps & ops, (m, deps & ops)
    # and the op files reach their launchers through the lazy loader (an edge the graph sees)
    assert "loupe_kernels.triton_shapley" in graph["loupe_kernels.shapley"]


def test_the_cycle_finder_finds_cycles_and_lazy_imports_count():
    """The checker itself: a constructed loop is found, and a lazy import inside a function is an edge."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    graph = import_graph()
    assert "loupe.checkpoint" in graph["loupe"]  # loupe.load imports it inside the function
