"""token_region_similarity, cuda backend: against a float64 loop oracle, the cpu backend and triton.

Runs only where a CUDA device and the built CUDA extension exist (skipped otherwise, with the reason).
"""
from __future__ import annotations

import contextlib
import os

import pytest
import torch

import loupe_kernels as lk
from _kernel_testing import quantized, random_masks
from _kernel_testing import trs_oracle as oracle
from loupe_kernels._backends import backend_status

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
if "cuda" not in lk.available_backends():
    pytest.skip(f"cuda backend unavailable: {backend_status('cuda').reason}", allow_module_level=True)

pytestmark = pytest.mark.gpu
DEV = "cuda"


def masks(Bq, Lq, Bk, Lk, gen):
    """random_masks, with a fully masked key item also where Bk <= 2 (the last one)."""
    qm, km = random_masks(Bq, Lq, Bk, Lk, gen)
    km[min(2, Bk - 1)] = False
    return qm, km


def run(q64, k64, qm, km, pairwise, gout, dtype, backend):
    q = q64.detach().to(DEV, dtype).clone().requires_grad_()
    k = k64.detach().to(DEV, dtype).clone().requires_grad_()
    out = lk.token_region_similarity(q, k, qm.to(DEV), km.to(DEV), pairwise=pairwise, backend=backend)
    out.backward(gout.to(DEV, dtype))
    return out.detach(), q.grad, k.grad


@contextlib.contextmanager
def deterministic(on: bool):
    """Deterministic d_key (the default) or the atomic one (LOUPE_KERNELS_ATOMIC_DKEY=1 with torch's
    deterministic mode off) for the block."""
    before = torch.are_deterministic_algorithms_enabled()
    env = os.environ.get("LOUPE_KERNELS_ATOMIC_DKEY")
    torch.use_deterministic_algorithms(on)
    os.environ["LOUPE_KERNELS_ATOMIC_DKEY"] = "0" if on else "1"
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)
        if env is None:
            os.environ.pop("LOUPE_KERNELS_ATOMIC_DKEY", None)
        else:
            os.environ["LOUPE_KERNELS_ATOMIC_DKEY"] = env


# Bq, Lq, Bk, Lk, D. Kernel paths (fp16/bf16, pairwise): D % 8 == 0 -> the fast kernel
# (query tile resident, key rows streamed across items: Lk = 7 puts many items in one 64-row tile,
# Lk = 130 and 196 straddle tiles, Bq*Lq > 128 gives several row tiles); odd D -> the generic WMMA
# kernel; fp32 with D % 4 == 0 -> the fast kernel on tensor cores (3xTF32); fp64 and pairwise=False ->
# the generic kernels. D = 520 (all three) and 1028 (fp32; 16-bit takes the generic kernel, 1028 % 8 != 0):
# the query tile does not stay resident, D is streamed in chunks (128 features for 16-bit, 64 for fp32)
# with a partial last chunk (8 and 4 features).
SHAPES = [(3, 5, 3, 7, 11), (4, 70, 4, 13, 17), (5, 3, 6, 70, 33), (9, 32, 7, 196, 64), (6, 40, 9, 7, 24),
          (3, 50, 5, 130, 256), (3, 40, 4, 70, 520), (2, 20, 3, 33, 1028)]
EXACT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pairwise", [True, False])
@pytest.mark.parametrize("det", [True, False], ids=["deterministic", "atomic"])
def test_exact_against_oracle(shape, pairwise, det):
    """Quantized inputs: every score is exact in every dtype, so the arg-max must equal the oracle's
    (ties included) and the values may differ only by the final rounding to the dtype."""
    Bq, Lq, Bk, Lk, D = shape
    Bk = Bk if pairwise else Bq
    g = torch.Generator().manual_seed(sum(shape))
    q, k = quantized((Bq, Lq, D), g), quantized((Bk, Lk, D), g)
    qm, km = masks(Bq, Lq, Bk, Lk, g)
    gout = quantized((Bq, Bk) if pairwise else (Bq,), g)
    want, wdq, wdk, wam = oracle(q, k, qm, km, pairwise, gout)
    for dtype in EXACT_DTYPES:
        with deterministic(det):
            out, dq, dk = run(q, k, qm, km, pairwise, gout, dtype, "cuda")
        _, amax = torch.ops.loupe_kernels.trs_forward(q.to(DEV, dtype), k.to(DEV, dtype), qm.to(DEV), km.to(DEV),
                                                      pairwise, "cuda")
        assert torch.equal(amax.cpu(), wam), dtype
        # rounding of the result to the dtype + fp32 (fp64) accumulation of up to Bk*Lq terms
        eps, acc_eps = torch.finfo(dtype).eps, torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
        for name, x, w in (("out", out, want), ("d_query", dq, wdq), ("d_key", dk, wdk)):
            scale = max(w.abs().max().item(), 1.0)
            err = (x.double().cpu() - w).abs()
            bound = eps * w.abs() + 64 * acc_eps * scale
            assert bool((err <= bound).all()), (dtype, name, (err - bound).max().item())


def test_unaligned_inputs_take_the_generic_kernel():
    """Pointers that are not 16-byte aligned (views at an odd element offset) must not reach the
    cp.async kernel; the generic kernel gives the same arg-max and (exact) scores."""
    g = torch.Generator().manual_seed(11)
    Bq, Lq, Bk, Lk, D = 4, 9, 5, 21, 32
    q, k = quantized((Bq, Lq, D), g), quantized((Bk, Lk, D), g)
    qm, km = masks(Bq, Lq, Bk, Lk, g)
    want, _, _, wam = oracle(q, k, qm, km, True, torch.zeros(Bq, Bk, dtype=torch.float64))
    qb = torch.empty(q.numel() + 1, dtype=torch.float16, device=DEV)
    kb = torch.empty(k.numel() + 1, dtype=torch.float16, device=DEV)
    qu, ku = qb[1:].view(Bq, Lq, D), kb[1:].view(Bk, Lk, D)
    qu.copy_(q.half())
    ku.copy_(k.half())
    assert qu.is_contiguous() and qu.data_ptr() % 16 != 0
    out, amax = torch.ops.loupe_kernels.trs_forward(qu, ku, qm.to(DEV), km.to(DEV), True, "cuda")
    assert torch.equal(amax.cpu(), wam)
    torch.testing.assert_close(out.double().cpu(), want, atol=0, rtol=torch.finfo(torch.float16).eps)


@pytest.mark.parametrize("shape", [(3, 4, 2, 0, 8), (3, 0, 2, 5, 8)])
def test_empty_token_dims_match_cpu(shape):
    Bq, Lq, Bk, Lk, D = shape
    q, k = torch.randn(Bq, Lq, D), torch.randn(Bk, Lk, D)
    qm, km = torch.ones(Bq, Lq, dtype=torch.bool), torch.ones(Bk, Lk, dtype=torch.bool)
    for dtype in (torch.float32, torch.bfloat16):
        out_c, am_c = torch.ops.loupe_kernels.trs_forward(q.to(DEV, dtype), k.to(DEV, dtype), qm.to(DEV),
                                                          km.to(DEV), True, "cuda")
        out_o, am_o = torch.ops.loupe_kernels.trs_forward(q.to(dtype), k.to(dtype), qm, km, True, "cpu")
        assert torch.equal(am_c.cpu(), am_o)
        assert torch.equal(out_c.cpu(), out_o)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pairwise", [True, False])
def test_error_bounded_by_torch_math_in_the_dtype(dtype, pairwise):
    """Random (not quantized) inputs whose top-2 gap exceeds the dtype's error: the kernel's error
    against float64 is at most twice the error of the same PyTorch math in that dtype (+ one ulp)."""
    Bq, Lq, Bk, Lk, D = 6, 9, 5, 37, 48
    Bk = Bk if pairwise else Bq
    g = torch.Generator().manual_seed(7)
    q = torch.nn.functional.normalize(torch.randn(Bq, Lq, D, generator=g, dtype=torch.float64), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(Bk, Lk, D, generator=g, dtype=torch.float64), dim=-1)
    qm, km = masks(Bq, Lq, Bk, Lk, g)
    gout = torch.randn((Bq, Bk) if pairwise else (Bq,), generator=g, dtype=torch.float64)
    want, wdq, wdk, _ = oracle(q, k, qm, km, pairwise, gout)
    got = run(q, k, qm, km, pairwise, gout, dtype, "cuda")
    ref = run(q, k, qm, km, pairwise, gout, dtype, "reference")
    for name, x, r, w in zip(("out", "d_query", "d_key"), got, ref, (want, wdq, wdk)):
        err = (x.double().cpu() - w).abs().max().item()
        ref_err = (r.double().cpu() - w).abs().max().item()
        bound = 2 * ref_err + torch.finfo(dtype).eps * max(w.abs().max().item(), 1.0)
        assert err <= bound, (name, err, ref_err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pairwise", [True, False])
def test_ties_and_argmax_identical_to_cpu_and_triton(pairwise, dtype):
    Bq, Lq, Bk, Lk, D = 7, 11, 6, 70, 8
    Bk = Bk if pairwise else Bq
    g = torch.Generator().manual_seed(3)
    q, k = quantized((Bq, Lq, D), g), quantized((Bk, Lk, D), g)
    qm, km = masks(Bq, Lq, Bk, Lk, g)
    args = lambda dev: (q.to(dev, dtype), k.to(dev, dtype), qm.to(dev), km.to(dev), pairwise)  # noqa: E731
    out_c, am_c = torch.ops.loupe_kernels.trs_forward(*args(DEV), "cuda")
    others = [b for b in ("cpu", "triton") if b in lk.available_backends()]
    for b in others:
        out_o, am_o = torch.ops.loupe_kernels.trs_forward(*args("cpu" if b == "cpu" else DEV), b)
        assert torch.equal(am_c.cpu(), am_o.cpu()), b
        # the sums of the row maxima are exact here; only the division by the count and the final
        # rounding to the dtype may differ (one ulp)
        eps = torch.finfo(dtype).eps
        assert torch.allclose(out_c.cpu().double(), out_o.cpu().double(), rtol=2 * eps, atol=0), b


def test_backward_is_deterministic():
    """Deterministic mode: bit-identical gradients across runs; the atomic mode agrees with it up to
    the rounding of fp32 sums in a different order."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(64, 32, 64, generator=g)
    k = torch.randn(48, 50, 64, generator=g)
    qm, km = torch.ones(64, 32, dtype=torch.bool), torch.ones(48, 50, dtype=torch.bool)
    gout = torch.randn(64, 48, generator=g)
    with deterministic(True):
        a = run(q.double(), k.double(), qm, km, True, gout.double(), torch.bfloat16, "cuda")
        b = run(q.double(), k.double(), qm, km, True, gout.double(), torch.bfloat16, "cuda")
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    with deterministic(False):
        c = run(q.double(), k.double(), qm, km, True, gout.double(), torch.bfloat16, "cuda")
    assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])  # forward and the d_query gather
    eps = torch.finfo(torch.bfloat16).eps
    torch.testing.assert_close(c[2].float(), a[2].float(), rtol=2 * eps, atol=2 * eps * a[2].abs().max().item())


def test_agrees_with_triton_and_reference_on_a_medium_shape():
    g = torch.Generator().manual_seed(5)
    q = torch.nn.functional.normalize(torch.randn(64, 32, 128, generator=g, dtype=torch.float64), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(64, 196, 128, generator=g, dtype=torch.float64), dim=-1)
    qm = torch.rand(64, 32, generator=g) > 0.2
    km = torch.ones(64, 196, dtype=torch.bool)
    gout = torch.randn(64, 64, generator=g, dtype=torch.float64)
    # float64 oracle, vectorised (the loop oracle takes minutes here): the reference in float64
    want = [x.cpu() for x in run(q, k, qm, km, True, gout, torch.float64, "reference")]
    ref = run(q, k, qm, km, True, gout, torch.bfloat16, "reference")
    for backend in [b for b in ("cuda", "triton") if b in lk.available_backends()]:
        got = run(q, k, qm, km, True, gout, torch.bfloat16, backend)
        for x, r, w in zip(got, ref, want):
            err = (x.double().cpu() - w).abs().max().item()
            ref_err = (r.double().cpu() - w).abs().max().item()
            assert err <= 2 * ref_err + torch.finfo(torch.bfloat16).eps * max(w.abs().max().item(), 1.0), backend


def test_autocast_and_compile():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(4, 6, 32, generator=g, device="cpu").to(DEV).requires_grad_()
    k = torch.randn(5, 9, 32, generator=g, device="cpu").to(DEV).requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = lk.token_region_similarity(q, k, backend="cuda")
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.float32
    f = torch.compile(lambda a, b: lk.token_region_similarity(a, b, backend="cuda"), fullgraph=True)
    torch.testing.assert_close(f(q.detach(), k.detach()), lk.token_region_similarity(q.detach(), k.detach(),
                                                                                    backend="cuda"))
