"""token_region_similarity, cuda backend: against a float64 loop oracle, the cpu backend and triton.

Runs only where a CUDA device and the built CUDA extension exist (skipped otherwise, with the reason).
"""
from __future__ import annotations

import pytest
import torch

import loupe_kernels as lk
from loupe_kernels._backends import backend_status
from loupe_kernels.token_region_similarity import token_region_similarity_reference

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
if "cuda" not in lk.available_backends():
    pytest.skip(f"cuda backend unavailable: {backend_status('cuda').reason}", allow_module_level=True)

pytestmark = pytest.mark.gpu
DEV = "cuda"


def oracle(q, k, qm, km, pairwise, gout):
    """(out, d_query, d_key, argmax) in float64 by loops; argmax -1 where undefined."""
    q, k, qm, km, gout = q.double().cpu(), k.double().cpu(), qm.cpu(), km.cpu(), gout.double().cpu()
    Bq, Lq, _ = q.shape
    Bk, Lk = k.shape[:2]
    shape = (Bq, Bk) if pairwise else (Bq,)
    pairs = [(a, b) for a in range(Bq) for b in range(Bk)] if pairwise else [(a, a) for a in range(Bq)]
    out = torch.zeros(shape, dtype=torch.float64)
    amax = torch.full((*shape, Lq), -1, dtype=torch.int32)
    dq, dk = torch.zeros_like(q), torch.zeros_like(k)
    for a, b in pairs:
        at = (a, b) if pairwise else (a,)
        qi = [j for j in range(Lq) if qm[a, j]]
        ki = [i for i in range(Lk) if km[b, i]]
        if not qi or not ki:
            continue
        w = float(gout[at]) / len(qi)
        scores = (q[a, qi] @ k[b, ki].T).tolist()
        total = 0.0
        for r, j in enumerate(qi):
            best = max(scores[r])
            i = ki[scores[r].index(best)]
            total += best
            amax[(*at, j)] = i
            dq[a, j] += w * k[b, i]
            dk[b, i] += w * q[a, j]
        out[at] = total / len(qi)
    return out, dq, dk, amax


def masks(Bq, Lq, Bk, Lk, gen):
    qm = torch.rand(Bq, Lq, generator=gen) > 0.3
    km = torch.rand(Bk, Lk, generator=gen) > 0.3
    qm[1] = False  # a query item without valid tokens
    km[min(2, Bk - 1)] = False  # a key item without valid tokens
    return qm, km


def quantized(shape, gen):
    """m/4 with |m| <= 6: exact in every dtype, exact dot products in fp32 -> exact ties everywhere."""
    return torch.randint(-6, 7, shape, generator=gen).double() / 4


def run(q64, k64, qm, km, pairwise, gout, dtype, backend):
    q = q64.to(DEV, dtype).requires_grad_()
    k = k64.to(DEV, dtype).requires_grad_()
    out = lk.token_region_similarity(q, k, qm.to(DEV), km.to(DEV), pairwise=pairwise, backend=backend)
    out.backward(gout.to(DEV, dtype))
    return out.detach(), q.grad, k.grad


SHAPES = [(3, 5, 3, 7, 11), (4, 70, 4, 13, 17), (5, 3, 6, 70, 33), (9, 32, 7, 196, 64)]  # Bq, Lq, Bk, Lk, D


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pairwise", [True, False])
def test_exact_against_oracle(shape, pairwise):
    Bq, Lq, Bk, Lk, D = shape
    Bk = Bk if pairwise else Bq
    g = torch.Generator().manual_seed(sum(shape))
    q, k = quantized((Bq, Lq, D), g), quantized((Bk, Lk, D), g)
    qm, km = masks(Bq, Lq, Bk, Lk, g)
    gout = quantized((Bq, Bk) if pairwise else (Bq,), g)
    want, wdq, wdk, wam = oracle(q, k, qm, km, pairwise, gout)
    for dtype in (torch.float32, torch.float64):
        out, dq, dk = run(q, k, qm, km, pairwise, gout, dtype, "cuda")
        _, amax = torch.ops.loupe_kernels.trs_forward(q.to(DEV, dtype), k.to(DEV, dtype), qm.to(DEV), km.to(DEV),
                                                      pairwise, "cuda")
        assert torch.equal(amax.cpu(), wam)
        tol = 64 * torch.finfo(dtype).eps
        assert torch.allclose(out.double().cpu(), want, atol=tol, rtol=tol)
        assert torch.allclose(dq.double().cpu(), wdq, atol=tol, rtol=tol)
        assert torch.allclose(dk.double().cpu(), wdk, atol=tol, rtol=tol)


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


@pytest.mark.parametrize("pairwise", [True, False])
def test_ties_and_argmax_identical_to_cpu_and_triton(pairwise):
    Bq, Lq, Bk, Lk, D = 7, 11, 6, 70, 8
    Bk = Bk if pairwise else Bq
    g = torch.Generator().manual_seed(3)
    q, k = quantized((Bq, Lq, D), g), quantized((Bk, Lk, D), g)
    qm, km = masks(Bq, Lq, Bk, Lk, g)
    args = lambda dev: (q.float().to(dev), k.float().to(dev), qm.to(dev), km.to(dev), pairwise)  # noqa: E731
    out_c, am_c = torch.ops.loupe_kernels.trs_forward(*args(DEV), "cuda")
    others = [b for b in ("cpu", "triton") if b in lk.available_backends()]
    for b in others:
        out_o, am_o = torch.ops.loupe_kernels.trs_forward(*args("cpu" if b == "cpu" else DEV), b)
        assert torch.equal(am_c.cpu(), am_o.cpu()), b
        # the sums of the row maxima are exact here; only the division by the count may round
        eps = torch.finfo(torch.float32).eps
        assert torch.allclose(out_c.cpu(), out_o.cpu(), rtol=2 * eps, atol=0), b


def test_backward_is_deterministic():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(64, 32, 64, generator=g)
    k = torch.randn(48, 50, 64, generator=g)
    qm, km = torch.ones(64, 32, dtype=torch.bool), torch.ones(48, 50, dtype=torch.bool)
    gout = torch.randn(64, 48, generator=g)
    torch.use_deterministic_algorithms(True)
    try:
        a = run(q.double(), k.double(), qm, km, True, gout.double(), torch.bfloat16, "cuda")
        b = run(q.double(), k.double(), qm, km, True, gout.double(), torch.bfloat16, "cuda")
    finally:
        torch.use_deterministic_algorithms(False)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_agrees_with_triton_and_reference_on_a_medium_shape():
    g = torch.Generator().manual_seed(5)
    q = torch.nn.functional.normalize(torch.randn(64, 32, 128, generator=g, dtype=torch.float64), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(64, 196, 128, generator=g, dtype=torch.float64), dim=-1)
    qm = torch.rand(64, 32, generator=g) > 0.2
    km = torch.ones(64, 196, dtype=torch.bool)
    gout = torch.randn(64, 64, generator=g, dtype=torch.float64)
    want = oracle(q, k, qm, km, True, gout)[:3]
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
