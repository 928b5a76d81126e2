"""Every backend fails the same way (issue 21, item 8): property-based agreement over backends.

Hypothesis draws shapes (including empty key sets, empty query sets, D = 0), masks, dtypes and
magnitudes (tiny, unit, above float16's range, near the ops' magnitude bounds, beyond them, NaN and
inf), and every available backend (reference, cpu, triton in the interpreter) must either agree with
the others within the dtype's tolerance (relative to the input scale) or raise the same error type.
Triton examples are few and small (the interpreter is slow).
"""
from __future__ import annotations

import math

import pytest
import torch

import loupe_kernels as lk
from loupe_kernels.shapley import sim_bound
from loupe_kernels.token_region_similarity import score_bound

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

BACKENDS = [b for b in ("reference", "cpu", "triton") if b in lk.available_backends()]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SCALES = [1e-30, 1e-3, 1.0, 300.0, 1e19, 1e30, float("nan"), float("inf")]
RTOL = {torch.float16: 2e-2, torch.bfloat16: 6e-2, torch.float32: 1e-4, torch.float64: 1e-9}
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def _run(fn):
    """(result, None) or (None, exception type) of one backend."""
    try:
        return fn(), None
    except (ValueError, TypeError, RuntimeError, IndexError) as e:  # noqa: PERF203
        return None, type(e)


def _tensor(gen_seed, shape, dtype, scale):
    g = torch.Generator().manual_seed(gen_seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if math.isnan(scale) or math.isinf(scale):
        x = x.clone()
        if x.numel():
            x.view(-1)[0] = scale
        return x.to(dtype)
    x = x * scale
    info = torch.finfo(dtype)
    return x.clamp(-info.max, info.max).to(dtype)   # finite in the dtype, however large the scale


def _close(a, b, dtype, scale):
    """Equal non-finite entries (inf of one sign), finite entries close relative to the input scale."""
    a, b = a.double(), b.double()
    assert a.shape == b.shape
    fin = torch.isfinite(a) & torch.isfinite(b)
    assert torch.equal(torch.isfinite(a), torch.isfinite(b)), (a, b)
    assert torch.equal(a[~fin], b[~fin]), (a, b)
    tol = RTOL[dtype] * max(1.0, a[fin].abs().max().item() if fin.any() else 0.0, scale)
    assert (a[fin] - b[fin]).abs().max().item() <= tol if fin.any() else True, (a, b, tol)


def _agree(results, check):
    errors = {b: e for b, (_, e) in results.items()}
    assert len(set(errors.values())) == 1, f"backends fail differently: {errors}"
    outs = [(b, r) for b, (r, e) in results.items() if e is None]
    for b, r in outs[1:]:
        check(outs[0][1], r)


# ------------------------------------------------------------------------------------------------
# token_region_similarity
# ------------------------------------------------------------------------------------------------
@st.composite
def trs_case(draw, small):
    hi = 3 if small else 5
    Bq, Bk = draw(st.integers(0, hi)), draw(st.integers(0, hi))
    Lq, Lk = draw(st.integers(0, hi)), draw(st.integers(0, hi + 2))
    D = draw(st.sampled_from([0, 1, 4, 16] if not small else [4, 16]))
    dtype = draw(st.sampled_from(DTYPES))
    qs, ks = draw(st.sampled_from(SCALES)), draw(st.sampled_from(SCALES))
    seed = draw(st.integers(0, 2**16))
    masks = draw(st.booleans())
    pairwise = draw(st.booleans()) or Bq != Bk
    return Bq, Bk, Lq, Lk, D, dtype, qs, ks, seed, masks, pairwise


def _trs_inputs(case):
    Bq, Bk, Lq, Lk, D, dtype, qs, ks, seed, masks, pairwise = case
    q = _tensor(seed, (Bq, Lq, D), dtype, qs)
    k = _tensor(seed + 1, (Bk, Lk, D), dtype, ks)
    g = torch.Generator().manual_seed(seed + 2)
    qm = (torch.rand(Bq, Lq, generator=g) > 0.3) if masks else None
    km = (torch.rand(Bk, Lk, generator=g) > 0.3) if masks else None
    return q, k, qm, km, pairwise


def _check_trs(case, backends):
    q, k, qm, km, pairwise = _trs_inputs(case)
    dtype = q.dtype
    scale = 1.0
    if q.numel() and k.numel() and torch.isfinite(q).all() and torch.isfinite(k).all():
        scale = q.double().abs().max().item() * k.double().abs().max().item() * q.shape[2]
    results = {b: _run(lambda b=b: lk.token_region_similarity(q, k, qm, km, pairwise=pairwise, backend=b))
               for b in backends}
    _agree(results, lambda a, b: _close(a, b, dtype, scale))
    # the contract's classes of outcome
    finite = bool(torch.isfinite(q).all() and torch.isfinite(k).all())
    if not finite:
        assert all(e is ValueError for _, e in results.values())
    elif scale > score_bound(dtype):
        assert all(e is ValueError for _, e in results.values())
    else:
        assert all(e is None for _, e in results.values()), results
        out = next(iter(results.values()))[0]
        assert not torch.isnan(out).any()
        if dtype in (torch.float16, torch.bfloat16):  # above the dtype's range: inf, never 0
            exact = lk.token_region_similarity(q.double(), k.double(), qm, km, pairwise=pairwise,
                                               backend="reference")
            big = exact.abs() > torch.finfo(dtype).max * 1.01
            assert torch.isinf(out[big]).all()


@settings(max_examples=120, **SETTINGS)
@given(trs_case(small=False))
def test_token_region_similarity_backends_agree(case):
    _check_trs(case, [b for b in BACKENDS if b != "triton"])


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton backend unavailable")
@settings(max_examples=8, **SETTINGS)
@given(trs_case(small=True))
def test_token_region_similarity_triton_agrees(case):
    _check_trs(case, BACKENDS)


# ------------------------------------------------------------------------------------------------
# Shapley: the max-sim games (keys as players, and the region-phrase game)
# ------------------------------------------------------------------------------------------------
@st.composite
def shapley_case(draw, small):
    G = draw(st.integers(0, 2 if small else 3))
    n = draw(st.integers(2, 5 if small else 7))
    Lq = draw(st.integers(0, 3))
    dtype = draw(st.sampled_from(DTYPES))
    scale = draw(st.sampled_from(SCALES + [2.0 ** 70]))
    qp = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    K = draw(st.sampled_from([1, 3, 8]))
    return G, n, Lq, dtype, scale, qp, seed, K


def _subsets(G, P, lo, seed):
    g = torch.Generator().manual_seed(seed)
    S = torch.zeros(G, 2, P, dtype=torch.bool)
    for gg in range(G):
        for m in range(2):
            pick = lo + torch.randperm(P - lo, generator=g)[:1 + m]
            S[gg, m, pick] = True
    return S


def _check_maxsim(case, backends):
    G, n, Lq, dtype, scale, qp, seed, K = case
    sim = _tensor(seed, (G, Lq, n), dtype, scale)
    P = Lq + n if qp else n
    S = _subsets(G, P, Lq if qp else 0, seed)
    kw = dict(query_players=qp, num_samples=K, seed=seed, size_schedule="round_robin")
    results = {b: _run(lambda b=b: lk.shapley_interaction(sim, S, backend=b, **kw)) for b in backends}
    ok = bool(torch.isfinite(sim).all())
    big = sim.double().abs().max().item() if sim.numel() and ok else 0.0
    _agree(results, lambda a, b: (_close(a[0], b[0], dtype, max(big, 1.0)), _close(a[1], b[1], dtype, max(big, 1.0))))
    expect_error = (not ok) or big > sim_bound(dtype)
    assert all((e is ValueError) == expect_error for _, e in results.values()), results


@settings(max_examples=80, **SETTINGS)
@given(shapley_case(small=False))
def test_shapley_backends_agree(case):
    bs = [b for b in BACKENDS if b != "triton"]
    _check_maxsim(case, bs)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton backend unavailable")
@settings(max_examples=6, **SETTINGS)
@given(shapley_case(small=True))
def test_shapley_triton_agrees(case):
    _check_maxsim(case, BACKENDS)


# ------------------------------------------------------------------------------------------------
# the cases of the issue, named
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_issue_cases(backend):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 8, generator=g), torch.randn(2, 4, 8, generator=g)
    bad = q.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="query contains NaN or inf"):
        lk.token_region_similarity(bad, k, backend=backend)
    # fp16 scores above 65504: inf (the reference gave 0)
    h = torch.full((1, 1, 4), 200.0, dtype=torch.float16)
    assert torch.isinf(lk.token_region_similarity(h, h, backend=backend)).all()
    # Lk = 0: zeros (the reference raised IndexError)
    out = lk.token_region_similarity(q, torch.randn(3, 0, 8), backend=backend)
    assert torch.equal(out, torch.zeros(2, 3))
    # magnitudes whose float32 scores would overflow: one ValueError everywhere
    with pytest.raises(ValueError, match="too large"):
        lk.token_region_similarity(q * 1e20, k * 1e20, backend=backend)
