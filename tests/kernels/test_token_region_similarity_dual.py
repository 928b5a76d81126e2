"""token_region_similarity_dual: both directions from one score GEMM equal two separate calls."""
from __future__ import annotations

import pytest
import torch

import loupe_kernels as lk

BACKENDS = [b for b in ("cpu", "reference") if b in lk.available_backends()]


def case(seed, Bq, Lq, Bk, Lk, D, dtype=torch.float64, quant=False):
    g = torch.Generator().manual_seed(seed)
    if quant:  # exact scores: ties everywhere, identical arg-max in every order of summation
        q = torch.randint(-3, 4, (Bq, Lq, D), generator=g).to(dtype) / 4
        k = torch.randint(-3, 4, (Bk, Lk, D), generator=g).to(dtype) / 4
    else:
        q = torch.randn(Bq, Lq, D, generator=g, dtype=dtype)
        k = torch.randn(Bk, Lk, D, generator=g, dtype=dtype)
    qm = torch.rand(Bq, Lq, generator=g) > 0.3
    km = torch.rand(Bk, Lk, generator=g) > 0.3
    qm[min(1, Bq - 1)] = False  # an item without valid tokens on each side
    km[min(2, Bk - 1)] = False
    w1 = torch.randn(Bq, Bk, generator=g, dtype=dtype)
    w2 = torch.randn(Bk, Bq, generator=g, dtype=dtype)
    return q, k, qm, km, w1, w2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1), (3, 5, 4, 7, 6), (5, 9, 3, 13, 11), (6, 33, 5, 20, 8)])
@pytest.mark.parametrize("quant", [False, True])
def test_dual_equals_two_calls(backend, shape, quant):
    q, k, qm, km, w1, w2 = case(sum(shape), *shape, quant=quant)
    qa, ka = q.clone().requires_grad_(), k.clone().requires_grad_()
    s1, s2 = lk.token_region_similarity_dual(qa, ka, qm, km, backend=backend)
    ((s1 * w1).sum() + (s2 * w2).sum()).backward()
    qb, kb = q.clone().requires_grad_(), k.clone().requires_grad_()
    r1 = lk.token_region_similarity(qb, kb, qm, km, backend="reference")
    r2 = lk.token_region_similarity(kb, qb, km, qm, backend="reference")
    ((r1 * w1).sum() + (r2 * w2).sum()).backward()
    tol = dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s1, r1, **tol)
    torch.testing.assert_close(s2, r2, **tol)
    torch.testing.assert_close(qa.grad, qb.grad, **tol)
    torch.testing.assert_close(ka.grad, kb.grad, **tol)


@pytest.mark.skipif("cpu" not in lk.available_backends(), reason="cpu backend not built")
def test_dual_argmax_equals_single_direction_kernels():
    q, k, qm, km, _, _ = case(3, 6, 9, 5, 14, 4, dtype=torch.float32, quant=True)
    _, a1, _, a2 = torch.ops.loupe_kernels.trs_dual_forward(q, k, qm, km, "cpu")
    _, b1 = torch.ops.loupe_kernels.trs_forward(q, k, qm, km, True, "cpu")
    _, b2 = torch.ops.loupe_kernels.trs_forward(k, q, km, qm, True, "cpu")
    assert torch.equal(a1, b1) and torch.equal(a2, b2)


@pytest.mark.skipif("cpu" not in lk.available_backends(), reason="cpu backend not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dual_low_precision_matches_single_direction(dtype):
    q, k, qm, km, _, _ = case(5, 4, 7, 6, 10, 16, dtype=torch.float32)
    q, k = q.to(dtype), k.to(dtype)
    s1, s2 = lk.token_region_similarity_dual(q, k, qm, km, backend="cpu")
    assert s1.dtype == dtype and s2.dtype == dtype
    torch.testing.assert_close(s1, lk.token_region_similarity(q, k, qm, km, backend="cpu"), rtol=0, atol=0)
    torch.testing.assert_close(s2, lk.token_region_similarity(k, q, km, qm, backend="cpu"), rtol=0, atol=0)


@pytest.mark.skipif("cpu" not in lk.available_backends(), reason="cpu backend not built")
def test_dual_gradcheck_opcheck_and_compile():
    q, k, qm, km, _, _ = case(7, 3, 4, 3, 5, 3)
    q, k = q.requires_grad_(), k.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: lk.token_region_similarity_dual(a, b, qm, km, backend="cpu"),
                                    (q, k))
    torch.library.opcheck(torch.ops.loupe_kernels.trs_dual_forward.default,
                          (q.detach(), k.detach(), qm, km, "cpu"), test_utils=("test_schema", "test_faketensor"))
    f = torch.compile(lambda a, b: lk.token_region_similarity_dual(a, b, qm, km, backend="cpu"), fullgraph=True)
    for x, y in zip(f(q.detach(), k.detach()), lk.token_region_similarity_dual(q.detach(), k.detach(), qm, km)):
        torch.testing.assert_close(x, y)
