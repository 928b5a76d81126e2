"""token_region_similarity: reference and cpu backends against an independent float64 oracle."""
from __future__ import annotations

import pytest
import torch

import loupe_kernels as lk
from loupe_kernels.token_region_similarity import token_region_similarity_reference

BACKENDS = [b for b in ("reference", "cpu") if b in lk.available_backends()]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


# ------------------------------------------------------------------------------------------------
# independent float64 oracle: explicit loops over pairs, explicit arg-max, explicit gradients
# ------------------------------------------------------------------------------------------------
def oracle(q, k, qm, km, pairwise, grad_out=None):
    q, k = q.double(), k.double()
    Bq, Lq, _ = q.shape
    Bk = k.shape[0]
    pairs = [(a, b) for a in range(Bq) for b in range(Bk)] if pairwise else [(a, a) for a in range(Bq)]
    out = torch.zeros((Bq, Bk) if pairwise else (Bq,), dtype=torch.float64)
    dq, dk = torch.zeros_like(q), torch.zeros_like(k)
    for a, b in pairs:
        idx_out = (a, b) if pairwise else (a,)
        qi = [j for j in range(Lq) if qm[a, j]]
        ki = [i for i in range(k.shape[1]) if km[b, i]]
        if not qi or not ki:
            continue
        g = 0.0 if grad_out is None else float(grad_out[idx_out]) / len(qi)
        total = 0.0
        for j in qi:
            scores = [float(q[a, j] @ k[b, i]) for i in ki]
            best = max(scores)
            i_best = ki[scores.index(best)]  # first occurrence = lowest index
            total += best
            dq[a, j] += g * k[b, i_best]
            dk[b, i_best] += g * q[a, j]
        out[idx_out] = total / len(qi)
    return out, dq, dk


def random_masks(Bq, Lq, Bk, Lk, gen):
    qm = torch.rand(Bq, Lq, generator=gen) > 0.3
    km = torch.rand(Bk, Lk, generator=gen) > 0.3
    if Bq > 1:
        qm[1] = False  # a fully masked query item
    if Bk > 2:
        km[2] = False  # a fully masked key item
    return qm, km


def quantized(shape, gen):
    """Entries k/4 with |k| <= 6: exact in fp16/bf16, and dot products exact in fp32, so every
    backend sees the same scores and the same arg-max (ties included)."""
    return torch.randint(-6, 7, shape, generator=gen).double() / 4


SHAPES = [  # Bq, Lq, Bk, Lk, D
    (1, 1, 1, 1, 1),
    (3, 5, 3, 7, 11),
    (5, 7, 4, 13, 17),
    (4, 3, 6, 29, 31),
]


def tol_bound(dtype, ref_err, scale):
    """Allowed error of a backend in `dtype`: twice the error of the same PyTorch math in that dtype,
    plus one unit of rounding of the output's magnitude."""
    return 2 * ref_err + torch.finfo(dtype).eps * max(scale, 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pairwise", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_forward_fp64_matches_oracle(backend, shape, pairwise, masked):
    Bq, Lq, Bk, Lk, D = shape
    if not pairwise:
        Bk = Bq
    gen = torch.Generator().manual_seed(hash((shape, pairwise, masked)) % 2**31)
    q = torch.randn(Bq, Lq, D, generator=gen, dtype=torch.float64)
    k = torch.randn(Bk, Lk, D, generator=gen, dtype=torch.float64)
    qm, km = random_masks(Bq, Lq, Bk, Lk, gen) if masked else (torch.ones(Bq, Lq, dtype=torch.bool),
                                                              torch.ones(Bk, Lk, dtype=torch.bool))
    want, _, _ = oracle(q, k, qm, km, pairwise)
    got = lk.token_region_similarity(q, k, qm if masked else None, km if masked else None,
                                     pairwise=pairwise, backend=backend)
    assert got.dtype == torch.float64 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert not torch.isnan(got).any()
    if masked and Bq > 1:
        assert (got[1] == 0).all()  # fully masked query item scores 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pairwise", [True, False])
def test_forward_low_precision_error_bounded_by_torch_math(backend, dtype, pairwise):
    gen = torch.Generator().manual_seed(7)
    Bq, Lq, Bk, Lk, D = 6, 9, 6, 23, 37
    q64 = torch.randn(Bq, Lq, D, generator=gen, dtype=torch.float64) / D**0.25
    k64 = torch.randn(Bk, Lk, D, generator=gen, dtype=torch.float64) / D**0.25
    qm, km = random_masks(Bq, Lq, Bk, Lk, gen)
    want, _, _ = oracle(q64, k64, qm, km, pairwise)
    q, k = q64.to(dtype), k64.to(dtype)
    # the oracle of the *rounded* inputs: the backend should only add accumulation/output rounding
    want_r, _, _ = oracle(q, k, qm, km, pairwise)
    ref = token_region_similarity_reference(q, k, qm, km, pairwise=pairwise)
    got = lk.token_region_similarity(q, k, qm, km, pairwise=pairwise, backend=backend)
    assert got.dtype == dtype
    ref_err = (ref.double() - want_r).abs().max().item()
    err = (got.double() - want_r).abs().max().item()
    assert err <= tol_bound(dtype, ref_err, want.abs().max().item()), (err, ref_err)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES[1:])
@pytest.mark.parametrize("pairwise", [True, False])
def test_gradients_match_oracle(backend, dtype, shape, pairwise):
    Bq, Lq, Bk, Lk, D = shape
    if not pairwise:
        Bk = Bq
    gen = torch.Generator().manual_seed(11 + D)
    q64, k64 = quantized((Bq, Lq, D), gen), quantized((Bk, Lk, D), gen)
    qm, km = random_masks(Bq, Lq, Bk, Lk, gen)
    gout = torch.randn((Bq, Bk) if pairwise else (Bq,), generator=gen, dtype=torch.float64)
    _, dq_want, dk_want = oracle(q64, k64, qm, km, pairwise, gout)

    def grads(fn):
        q = q64.to(dtype).requires_grad_()
        k = k64.to(dtype).requires_grad_()
        out = fn(q, k)
        out.backward(gout.to(dtype))
        return q.grad, k.grad

    dq, dk = grads(lambda q, k: lk.token_region_similarity(q, k, qm, km, pairwise=pairwise, backend=backend))
    rq, rk = grads(lambda q, k: token_region_similarity_reference(q, k, qm, km, pairwise=pairwise))
    assert dq.dtype == dtype and dk.dtype == dtype
    for got, ref, want in ((dq, rq, dq_want), (dk, rk, dk_want)):
        ref_err = (ref.double() - want).abs().max().item()
        err = (got.double() - want).abs().max().item()
        assert err <= tol_bound(dtype, ref_err, want.abs().max().item()), (err, ref_err)


def test_ties_go_to_lowest_index():
    # two identical keys: the gradient goes to the first only
    q = torch.tensor([[[1.0, 0.0]]], requires_grad=True)
    k = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]], requires_grad=True)
    for backend in BACKENDS:
        q.grad = k.grad = None
        lk.token_region_similarity(q, k, backend=backend).sum().backward()
        assert k.grad[0, 1].tolist() == [1.0, 0.0], backend
        assert k.grad[0, 2].tolist() == [0.0, 0.0], backend


def test_negative_scores_padding_never_wins():
    # every valid score is negative; a zeroed pad would win the max, -inf padding does not
    q = torch.tensor([[[1.0, 0.0]]])
    k = torch.tensor([[[-1.0, 0.0], [0.0, 0.0]]])
    km = torch.tensor([[True, False]])
    for backend in BACKENDS:
        assert lk.token_region_similarity(q, k, key_mask=km, backend=backend).item() == -1.0


@pytest.mark.parametrize("pairwise", [True, False])
def test_gradcheck_fp64_cpu(pairwise):
    if "cpu" not in BACKENDS:
        pytest.skip("cpu backend not built")
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, 6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    qm, km = random_masks(3, 4, 3, 6, gen)
    qm[0, 0] = True
    assert torch.autograd.gradcheck(
        lambda q, k: lk.token_region_similarity(q, k, qm, km, pairwise=pairwise, backend="cpu"), (q, k))


def test_cpu_backward_deterministic():
    if "cpu" not in BACKENDS:
        pytest.skip("cpu backend not built")
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(16, 8, 32, generator=gen, requires_grad=True)
    k = torch.randn(16, 12, 32, generator=gen, requires_grad=True)
    runs = []
    for _ in range(3):
        q.grad = k.grad = None
        (lk.token_region_similarity(q, k, backend="cpu") ** 2).sum().backward()
        runs.append((q.grad.clone(), k.grad.clone()))
    for dq, dk in runs[1:]:
        assert torch.equal(dq, runs[0][0]) and torch.equal(dk, runs[0][1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    gen = torch.Generator().manual_seed(9)
    qt = torch.randn(7, 4, 5, generator=gen, dtype=torch.float64)  # [D, Bq, Lq] storage
    kt = torch.randn(7, 3, 6, generator=gen, dtype=torch.float64)
    q, k = qt.permute(1, 2, 0), kt.permute(1, 2, 0)
    qm = (torch.rand(5, 4, generator=gen) > 0.2).t()
    assert not q.is_contiguous() and not qm.is_contiguous()
    km = torch.ones(3, 6, dtype=torch.bool)
    want, _, _ = oracle(q, k, qm, km, True)
    torch.testing.assert_close(lk.token_region_similarity(q, k, qm, backend=backend), want, rtol=1e-12, atol=1e-12)


def test_module_wrapper():
    m = lk.TokenRegionSimilarity(pairwise=False)
    q, k = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    torch.testing.assert_close(m(q, k), token_region_similarity_reference(q, k, pairwise=False))
    assert "pairwise=False" in repr(m)


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("call, exc, words", [
    (lambda: lk.token_region_similarity(torch.randn(2, 3), torch.randn(2, 3, 4)), ValueError, "query"),
    (lambda: lk.token_region_similarity(torch.randn(2, 3, 4), torch.randn(2, 3, 5)), ValueError, "share D"),
    (lambda: lk.token_region_similarity(torch.randn(2, 3, 4), torch.randn(2, 3, 4).double()), TypeError, "dtype"),
    (lambda: lk.token_region_similarity(torch.randn(2, 3, 4).int(), torch.randn(2, 3, 4).int()), TypeError, "float"),
    (lambda: lk.token_region_similarity(torch.randn(2, 3, 4), torch.randn(2, 3, 4),
                                        torch.ones(2, 4, dtype=torch.bool)), ValueError, "query_mask"),
    (lambda: lk.token_region_similarity(torch.randn(2, 3, 4), torch.randn(2, 3, 4), None,
                                        torch.ones(2, 3)), TypeError, "key_mask"),
    (lambda: lk.token_region_similarity(torch.randn(2, 3, 4), torch.randn(3, 3, 4), pairwise=False),
     ValueError, "Bq == Bk"),
    (lambda: lk.token_region_similarity(torch.randn(2, 3, 4), torch.randn(2, 3, 4, device="meta")),
     ValueError, "same device"),
    (lambda: lk.token_region_similarity(torch.randn(2, 3, 4), torch.randn(2, 3, 4), backend="fast"),
     ValueError, "unknown backend"),
    (lambda: lk.token_region_similarity(torch.randn(2, 3, 4), torch.randn(2, 3, 4), backend="cuda"),
     ValueError, "cuda"),
    (lambda: lk.token_region_similarity(torch.full((2, 3, 4), float("nan")), torch.randn(2, 3, 4),
                                        backend="cpu"), ValueError, "NaN"),
])
def test_bad_input(call, exc, words):
    if "cpu" not in BACKENDS and "cpu" in str(call.__code__.co_consts):
        pytest.skip("cpu backend not built")
    with pytest.raises(exc, match=words):
        call()


# ------------------------------------------------------------------------------------------------
# torch.compile / custom op
# ------------------------------------------------------------------------------------------------
def test_opcheck_custom_op():
    if "cpu" not in BACKENDS:
        pytest.skip("cpu backend not built")
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(3, 4, 8, generator=gen, requires_grad=True)
    k = torch.randn(2, 5, 8, generator=gen, requires_grad=True)
    qm = torch.ones(3, 4, dtype=torch.bool)
    km = torch.ones(2, 5, dtype=torch.bool)
    torch.library.opcheck(torch.ops.loupe_kernels.trs_forward.default, (q, k, qm, km, True, "cpu"))


def test_torch_compile_through_op():
    if "cpu" not in BACKENDS:
        pytest.skip("cpu backend not built")
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(4, 5, 8, generator=gen, requires_grad=True)
    k = torch.randn(3, 6, 8, generator=gen, requires_grad=True)

    def loss(q, k):
        return (lk.token_region_similarity(q, k, backend="cpu") * 2.0).logsumexp(dim=1).sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    got = compiled(q, k)
    gq, gk = torch.autograd.grad(got, (q, k))
    want = loss(q, k)
    wq, wk = torch.autograd.grad(want, (q, k))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(gq, wq)
    torch.testing.assert_close(gk, wk)


def test_available_backends_and_env_report():
    names = lk.available_backends()
    assert "reference" in names
    from loupe_kernels.env import report
    text = report()
    for b in lk.BACKENDS:
        assert b in text


def test_mismatched_or_missing_extension_degrades_with_reason(monkeypatch):
    import sys
    import types

    from loupe_kernels import _backends

    fake = types.ModuleType("loupe_kernels._fake")
    fake.torch_version = lambda: "1.0.0"
    monkeypatch.setitem(sys.modules, "loupe_kernels._fake", fake)
    st = _backends._load_extension("_fake")
    assert not st.available and "built against torch 1.0.0" in st.reason and torch.__version__ in st.reason
    st = _backends._load_extension("_does_not_exist")
    assert not st.available and "not built" in st.reason
