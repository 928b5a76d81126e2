"""No host synchronisation on the ops' hot path for GPU tensors (issue 20, item 5).

Reading a GPU tensor's value on the host (``bool(t)``, ``t.item()``, ``int(t)``, ``.tolist()``,
``.cpu()``) waits for the GPU, stalls the launch queue and rules out CUDA graphs. Without a GPU the
device path is forced on CPU tensors (``loupe_kernels._common._device_path_on_cpu``) and every such
read raises; the compiled ``cpu`` backend stands in for the GPU kernels (same Python path up to the
kernel call). The Triton launchers are checked statically. On CPU tensors and in debug mode the
data checks still raise a ValueError naming the problem at the call.
"""
from __future__ import annotations

import ast
import contextlib
from pathlib import Path

import pytest
import torch

import loupe_kernels as lk
from loupe_kernels import _common

HAS_CPU = "cpu" in lk.available_backends()
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason="cpu backend not built")


def _no_read(name):
    def raise_(self, *args, **kwargs):
        raise AssertionError(f"host read of a tensor on the hot path: Tensor.{name}")
    return raise_


@contextlib.contextmanager
def device_path(monkeypatch):
    """Treat CPU tensors as GPU tensors and fail on every host read of a tensor value."""
    monkeypatch.setattr(_common, "_device_path_on_cpu", True)
    monkeypatch.setattr(_common, "_debug", False)
    with monkeypatch.context() as m:
        for name in ("__bool__", "item", "__int__", "__float__", "__index__", "tolist", "numpy", "cpu"):
            m.setattr(torch.Tensor, name, _no_read(name))
        yield


def _inputs(dt=torch.float32):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 16, generator=g, dtype=dt, requires_grad=True)
    k = torch.randn(2, 5, 16, generator=g, dtype=dt, requires_grad=True)
    qm = torch.rand(3, 4, generator=g) > 0.3
    km = torch.rand(2, 5, generator=g) > 0.3
    sim = torch.randn(2, 3, 7, generator=g, dtype=dt)
    subsets = torch.zeros(2, 3, 7, dtype=torch.bool)
    subsets[:, 0, :2] = True
    subsets[:, 1, 4] = True
    subsets[:, 2, 1:4] = True
    return g, q, k, qm, km, sim, subsets


@needs_cpu
def test_hot_path_reads_no_tensor_value_on_the_host(monkeypatch):
    g, q, k, qm, km, sim, subsets = _inputs()
    mu = torch.randn(6, generator=g, requires_grad=True)
    lv = torch.randn(6, generator=g, requires_grad=True)
    t, tv, w = torch.randn(6, generator=g), torch.rand(6, generator=g), torch.rand(6, generator=g)
    qp = torch.zeros(2, 3, 10, dtype=torch.bool)
    qp[:, :, 0] = qp[:, :, 5] = True
    tokens = torch.randn(2, 6, 8, generator=g)
    with device_path(monkeypatch):
        for read in (bool, int, float, torch.Tensor.item, torch.Tensor.tolist):   # the guard is armed
            with pytest.raises(AssertionError, match="host read"):
                read(torch.ones(()))
        for pw in (True, False):
            kk = k if pw else k[:1].expand(3, -1, -1)
            kmm = km if pw else km[:1].expand(3, -1)
            lk.token_region_similarity(q, kk, qm, kmm, pairwise=pw, backend="cpu").sum().backward()
        a, b = lk.token_region_similarity_dual(q, k, qm, km, backend="cpu")
        (a.sum() + b.sum()).backward()
        lk.shapley_interaction(sim, subsets, num_samples=8, seed=3, backend="cpu")
        lk.shapley_interaction(sim, qp, query_players=True, num_samples=8, backend="cpu")
        lk.sample_coalitions(subsets, num_samples=8, seed=1, backend="cpu")
        for red in ("mean", "sum", "none"):
            lk.uncertainty_interaction_loss(mu, lv, t, target_var=tv, weight=w, reduction=red,
                                            backend="cpu").sum().backward()
            lk.uncertainty_interaction_loss(mu, lv, t, reduction=red, backend="cpu").sum().backward()
        with torch.no_grad():
            lk.box_objectness(tokens, 2, 3, torch.randn(4, 8), torch.randn(4, 8), torch.randn(18, 4),
                              torch.randn(4), 0.5, backend="cpu")


@needs_cpu
def test_device_path_still_names_the_problem(monkeypatch):
    """On the device path a bad input fails through a device-side assert carrying the message (on a CPU
    tensor torch._assert_async raises at once; on a GPU at the next synchronisation)."""
    _, q, k, qm, km, sim, subsets = _inputs()
    bad = q.detach().clone()
    bad[0, 0, 0] = float("nan")
    monkeypatch.setattr(_common, "_device_path_on_cpu", True)
    monkeypatch.setattr(_common, "_debug", False)
    with pytest.raises(RuntimeError, match="query contains NaN or inf"):
        lk.token_region_similarity(bad, k.detach(), backend="cpu")
    empty = subsets.clone()
    empty[0, 0] = False
    with pytest.raises(RuntimeError, match="empty subset"):
        lk.shapley_interaction(sim, empty, num_samples=4, backend="cpu")
    x = torch.zeros(4)
    with pytest.raises(RuntimeError, match="target contains NaN or inf"):
        lk.uncertainty_interaction_loss(x, x, torch.tensor([0.0, float("inf"), 0.0, 0.0]), backend="cpu")
    with pytest.raises(RuntimeError, match="target contains NaN or inf"):
        lk.uncertainty_interaction_loss(x, x, torch.tensor([0.0, float("inf"), 0.0, 0.0]), backend="reference")


@needs_cpu
def test_debug_mode_raises_value_errors_on_the_device_path(monkeypatch):
    _, q, k, *_ = _inputs()
    bad = k.detach().clone()
    bad[1, 2, 3] = float("inf")
    monkeypatch.setattr(_common, "_device_path_on_cpu", True)
    monkeypatch.setattr(_common, "_debug", False)
    lk.set_debug(True)
    try:
        assert lk.debug_enabled()
        with pytest.raises(ValueError, match="key contains NaN or inf"):
            lk.token_region_similarity(q.detach(), bad, backend="cpu")
        x = torch.zeros(3)
        with pytest.raises(ValueError, match="weight must be finite"):
            lk.uncertainty_interaction_loss(x, x, x, weight=torch.tensor([1.0, -1.0, 1.0]), backend="cpu")
    finally:
        lk.set_debug(False)


@needs_cpu
def test_cpu_tensors_keep_eager_value_errors():
    _, q, k, *_ = _inputs()
    bad = q.detach().clone()
    bad[0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="query contains NaN or inf"):
        lk.token_region_similarity(bad, k.detach(), backend="cpu")


# ------------------------------------------------------------------------------------------------
# the Triton launchers (the interpreter itself reads values on the host, so a static check)
# ------------------------------------------------------------------------------------------------
_SCALAR_PARAMS = {"seed", "query_players", "n"}   # Python scalars the launchers may convert
_READS = {"item", "tolist", "cpu", "numpy"}


def _launcher_functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.FunctionDef) and not any("jit" in ast.unparse(d) for d in node.decorator_list):
            yield node


def _host_reads(fn: ast.FunctionDef) -> list[str]:
    found = []
    for node in ast.walk(fn):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr in _READS:
                found.append(ast.unparse(node))
            if isinstance(f, ast.Name) and f.id in ("bool", "int", "float") and node.args:
                arg = node.args[0]
                if not (isinstance(arg, ast.Constant) or (isinstance(arg, ast.Name) and arg.id in _SCALAR_PARAMS)):
                    found.append(ast.unparse(node))
        if isinstance(node, (ast.If, ast.While, ast.IfExp, ast.Assert)):
            test = ast.unparse(node.test)
            if ".any(" in test or ".all(" in test or ".item(" in test:
                found.append(test)
    return found


def test_triton_launchers_read_no_tensor_value_on_the_host():
    pkg = Path(lk.__file__).resolve().parent
    files = sorted(pkg.glob("triton_*.py"))
    assert len(files) == 3
    bad = {f"{p.name}:{fn.name}": r for p in files for fn in _launcher_functions(p) if (r := _host_reads(fn))}
    assert not bad, bad
