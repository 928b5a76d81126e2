"""Automatic backend choice per dtype and shape class (issue 20 item 1): the table in
``loupe_kernels._backends.AUTO_TABLE``, its use by token_region_similarity, and its print-out by
``python -m loupe_kernels.env``. Runs without a GPU: the backends' availability is patched and
resolve_backend only reads the device type."""
from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import torch

import loupe_kernels as lk
from loupe_kernels import _backends
from loupe_kernels._backends import AUTO_TABLE, BackendStatus, auto_choice, resolve_backend

trs_mod = importlib.import_module("loupe_kernels.token_region_similarity")  # the module, not the function
CUDA = torch.device("cuda")
OP = "token_region_similarity"
SUPPORTED = ("reference", "cpu", "triton", "cuda")


@pytest.fixture
def gpu_backends(monkeypatch):
    """Pretend cuda and triton work; returns a setter to switch one off."""
    status = dict(_backends._STATUS)
    for name in ("cuda", "triton"):
        status[name] = BackendStatus(name, True, "patched for the test")
    monkeypatch.setattr(_backends, "_STATUS", status)
    monkeypatch.setattr(_backends, "_warned", set())  # fallback warnings of this test stay here

    def off(name):
        status[name] = BackendStatus(name, False, "patched off for the test")
    return off


@pytest.mark.parametrize("dtype, shape, want", [
    (torch.bfloat16, "fast", "cuda"), (torch.float16, "fast", "cuda"), (torch.float32, "fast", "cuda"),
    (torch.float32, "generic", "triton"), (torch.float32, "pairs", "triton"),
    (torch.bfloat16, "generic", "triton"), (torch.float16, "pairs", "triton"),
    (torch.float64, "fast", "cuda"), (torch.float64, "generic", "cuda"),
])
def test_choice_per_dtype_and_shape_class(gpu_backends, dtype, shape, want):
    assert resolve_backend(OP, None, CUDA, SUPPORTED, dtype=dtype, shape_class=shape) == want
    # CPU tensors keep cpu > reference whatever the table says
    assert resolve_backend(OP, None, torch.device("cpu"), SUPPORTED, dtype=dtype, shape_class=shape) == "cpu"


def test_falls_back_along_the_table_order(gpu_backends):
    gpu_backends("cuda")
    with pytest.warns(RuntimeWarning, match="'cuda' unavailable"):
        got = resolve_backend(OP, None, CUDA, SUPPORTED, dtype=torch.bfloat16, shape_class="fast")
    assert got == "triton"
    gpu_backends("triton")
    with pytest.warns(RuntimeWarning, match="'triton' unavailable"):
        got = resolve_backend(OP, None, CUDA, SUPPORTED, dtype=torch.float32, shape_class="generic")
    assert got == "reference"


def test_ops_without_table_entries_keep_the_default_order(gpu_backends):
    assert resolve_backend("shapley_interaction", None, CUDA, SUPPORTED) == "cuda"
    assert resolve_backend(OP, None, CUDA, SUPPORTED) == "cuda"  # no dtype given: default order
    assert auto_choice("shapley_interaction", torch.float32, "fast") is None


def test_table_entries_are_well_formed():
    assert AUTO_TABLE
    for (op, dt, shape), ch in AUTO_TABLE.items():
        assert dt == "*" or isinstance(getattr(torch, dt), torch.dtype), dt
        assert shape in ("fast", "generic", "pairs", "*"), shape
        assert ch.order[-1] == "reference" and len(set(ch.order)) == len(ch.order), ch
        assert set(ch.order) <= set(_backends.BACKENDS) - {"cpu"}, ch
        assert ch.why
        # no GPU timing exists yet: every entry must say it is provisional
        assert ch.measured is None and ch.source.startswith("provisional"), (op, dt, shape)


@pytest.mark.parametrize("dtype, D, pairwise, want", [
    (torch.bfloat16, 64, True, "fast"), (torch.float16, 1024, True, "fast"), (torch.bfloat16, 12, True, "generic"),
    (torch.float32, 12, True, "fast"), (torch.float32, 10, True, "generic"), (torch.float32, 64, False, "pairs"),
    (torch.float64, 64, True, "fast"), (torch.float32, 0, True, "generic"),
])
def test_shape_class(dtype, D, pairwise, want):
    q = torch.empty(2, 3, D, dtype=dtype, device="meta")
    assert trs_mod._shape_class(q, pairwise) == want


def test_op_passes_dtype_and_shape_class(monkeypatch):
    seen = []

    def spy(op, backend, device, supported, **kw):
        seen.append(kw)
        return "reference"
    monkeypatch.setattr(trs_mod, "resolve_backend", spy)
    q, k = torch.randn(2, 3, 12), torch.randn(4, 5, 12)
    lk.token_region_similarity(q, k)
    lk.token_region_similarity(q.double(), k[:2].double(), pairwise=False)
    assert seen == [dict(dtype=torch.float32, shape_class="fast"), dict(dtype=torch.float64, shape_class="pairs")]


def test_cuda_dkey_is_deterministic_by_default(monkeypatch):
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        monkeypatch.delenv("LOUPE_KERNELS_ATOMIC_DKEY", raising=False)
        assert trs_mod._cuda_deterministic_dkey()
        monkeypatch.setenv("LOUPE_KERNELS_ATOMIC_DKEY", "1")
        assert not trs_mod._cuda_deterministic_dkey()
        torch.use_deterministic_algorithms(True)  # torch's deterministic mode wins over the opt-in
        assert trs_mod._cuda_deterministic_dkey()
    finally:
        torch.use_deterministic_algorithms(before)


def test_env_prints_the_table():
    out = subprocess.run([sys.executable, "-m", "loupe_kernels.env"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "automatic choice on CPU tensors: cpu > reference" in out.stdout
    for (op, dt, shape), ch in AUTO_TABLE.items():
        line = [x for x in out.stdout.splitlines() if x.split()[:3] == [op, dt, shape]]
        assert len(line) == 1, (op, dt, shape)
        assert " > ".join(ch.order) in line[0] and ch.source in line[0]
