"""token_region_similarity: reference and cpu backends against an independent float64 oracle."""
from __future__ import annotations

import os

import pytest
import torch

import loupe_kernels as lk
from _kernel_testing import check_trs_compiles_fullgraph, quantized, random_masks, tol_bound
from _kernel_testing import trs_oracle as oracle
from loupe_kernels.token_region_similarity import token_region_similarity_reference

BACKENDS = [b for b in ("reference", "cpu") if b in lk.available_backends()]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
needs_cpu = pytest.mark.skipif("cpu" not in BACKENDS, reason="cpu backend not built")


SHAPES = [  # Bq, Lq, Bk, Lk, D
    (1, 1, 1, 1, 1),
    (3, 5, 3, 7, 11),
    (5, 7, 4, 13, 17),
    (4, 3, 6, 29, 31),
]


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
    want, _, _, _ = oracle(q, k, qm, km, pairwise)
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
    want, _, _, _ = oracle(q64, k64, qm, km, pairwise)
    q, k = q64.to(dtype), k64.to(dtype)
    # the oracle of the *rounded* inputs: the backend should only add accumulation/output rounding
    want_r, _, _, _ = oracle(q, k, qm, km, pairwise)
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
    _, dq_want, dk_want, _ = oracle(q64, k64, qm, km, pairwise, gout)

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


@needs_cpu
@pytest.mark.parametrize("pairwise", [True, False])
def test_gradcheck_fp64_cpu(pairwise):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, 6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    qm, km = random_masks(3, 4, 3, 6, gen)
    qm[0, 0] = True
    assert torch.autograd.gradcheck(
        lambda q, k: lk.token_region_similarity(q, k, qm, km, pairwise=pairwise, backend="cpu"), (q, k))


@needs_cpu
def test_cpu_backward_deterministic():
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


# ------------------------------------------------------------------------------------------------
# cpu: shapes that cross the kernel's blocks (issue 20). Score tiles of 512 KiB, several per task and
# a short last one; arg-max searched 64 keys at a time, then an 8-wide tail; backward blocks of
# 256-512 KiB of rows with short last blocks; 64-wide register chunks of D and their remainders.
# Quantized inputs: every score exact in any summation order, so the arg-max (ties included) is
# defined exactly and must equal the reference's first maximal index.
# ------------------------------------------------------------------------------------------------
BLOCK_CASES = [  # dtype, Bq, Lq, Bk, Lk, D
    (torch.float32, 40, 5, 24, 131, 75),    # 2 key chunks per task; Lk = 2*64 + 3; D = 64 + 8 + 3
    (torch.float64, 40, 9, 25, 70, 300),    # 3 key chunks; backward: several blocks on both sides
    (torch.float32, 9, 3, 7, 8, 64),        # Lk and D exactly one block, no tail
]


def _reference_argmax(q, k, qm, km):
    scores = torch.einsum("aqd,bkd->abqk", q.double(), k.double())
    best = scores.masked_fill(~km[None, :, None, :], float("-inf")).max(dim=-1).indices.to(torch.int32)
    live = qm[:, None, :] & km.any(dim=1)[None, :, None]
    return torch.where(live, best, torch.full_like(best, -1))


def _block_case(dtype, Bq, Lq, Bk, Lk, D, seed):
    gen = torch.Generator().manual_seed(seed)
    q = quantized((Bq, Lq, D), gen).to(dtype)
    k = quantized((Bk, Lk, D), gen).to(dtype)
    # exact duplicates of a key token: within one 64-key block, across blocks, and into the tail
    k[:, Lk - 1] = k[:, 0]
    k[:, Lk // 2] = k[:, 1]
    qm, km = random_masks(Bq, Lq, Bk, Lk, gen)
    km[:, 0] = km[:, Lk - 1] = True
    km[:, 1] = km[:, Lk // 2] = True
    if Bk > 4:
        km[3] = False
        km[3, Lk - 1] = True   # the only valid key of item 3 is the last one (tail, or end of a block)
    if Bk > 5 and Lk > 64:
        km[4] = False
        km[4, 64] = True       # the only valid key of item 4 opens the second block
    if Bq > 2:
        qm[2] = True           # a query item with every token valid
    return q, k, qm, km


@needs_cpu
@pytest.mark.parametrize("case", BLOCK_CASES, ids=lambda c: "-".join(map(str, c)))
def test_cpu_blocked_forward_argmax_and_ties(case):
    dtype, *shape = case
    q, k, qm, km = _block_case(dtype, *shape, seed=sum(shape))
    out, amax = torch.ops.loupe_kernels.trs_forward(q, k, qm, km, True, "cpu")
    want_amax = _reference_argmax(q, k, qm, km)
    assert torch.equal(amax, want_amax)
    Lk = shape[3]
    live = qm.any(dim=1)
    # a duplicated key wins only through its first copy; the duplicates do win somewhere
    others = [b for b in range(shape[2]) if b not in (3, 4)]
    assert not ((amax[:, others] == Lk - 1) | (amax[:, others] == Lk // 2)).any()
    assert ((amax == 0) | (amax == 1)).any()
    # an item whose only valid key is the last one, or opens the second 64-key block
    if shape[2] > 4:
        assert (amax[live][:, 3][qm[live]] == Lk - 1).all()
    if shape[2] > 5 and Lk > 64:
        assert (amax[live][:, 4][qm[live]] == 64).all()
    # the sums of maxima are exact; the division by the count rounds (the kernel multiplies by 1/count)
    exact = token_region_similarity_reference(q.double(), k.double(), qm, km)
    eps = torch.finfo(dtype).eps
    assert ((out.double() - exact).abs() <= 2 * eps * exact.abs()).all()
    # aligned pairs take the same arg-max on the diagonal
    n = min(q.shape[0], k.shape[0])
    out_a, amax_a = torch.ops.loupe_kernels.trs_forward(q[:n], k[:n], qm[:n], km[:n], False, "cpu")
    idx = torch.arange(n)
    assert torch.equal(amax_a, want_amax[idx, idx])
    assert ((out_a.double() - exact[idx, idx]).abs() <= 2 * eps * exact[idx, idx].abs()).all()


@needs_cpu
@pytest.mark.parametrize("case", BLOCK_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("pairwise", [True, False])
def test_cpu_blocked_backward_matches_reference(case, pairwise):
    """Every gradient exact: quantized inputs, dyadic output gradients, and a power-of-two number of
    valid tokens per query item (so 1/count is exact): any order of summation gives the same bits."""
    dtype, Bq, Lq, Bk, Lk, D = case
    if not pairwise:
        Bk = Bq
    q64, k64, _, km = _block_case(torch.float64, Bq, Lq, Bk, Lk, D, seed=Bq + Lk + D)
    gen = torch.Generator().manual_seed(D)
    qm = torch.zeros(Bq, Lq, dtype=torch.bool)
    for a in range(Bq):
        qm[a, torch.randperm(Lq, generator=gen)[: 1 << (Lq.bit_length() - 1)]] = True
    qm[1] = False
    gout = torch.randint(-8, 9, (Bq, Bk) if pairwise else (Bq,), generator=gen).double() / 8
    gout.view(-1)[::5] = 0  # zero weights are skipped, which must not change anything

    def grads(backend, dt):
        q = q64.to(dt, copy=True).requires_grad_()
        k = k64.to(dt, copy=True).requires_grad_()
        lk.token_region_similarity(q, k, qm, km, pairwise=pairwise, backend=backend).backward(gout.to(dt))
        return q.grad, k.grad

    want = grads("reference", torch.float64)
    got = grads("cpu", dtype)
    assert want[0].abs().max() > 0 and want[1].abs().max() > 0
    for g, w in zip(got, want):
        assert torch.equal(g, w.to(dtype))


@needs_cpu
@pytest.mark.parametrize("case", BLOCK_CASES[:2], ids=lambda c: "-".join(map(str, c)))
def test_cpu_blocked_dual_matches_single_directions(case):
    dtype, *shape = case
    q, k, qm, km = _block_case(dtype, *shape, seed=3 + sum(shape))
    s1, a1, s2, a2 = torch.ops.loupe_kernels.trs_dual_forward(q, k, qm, km, "cpu")
    assert torch.equal(a1, _reference_argmax(q, k, qm, km))
    assert torch.equal(a2, _reference_argmax(k, q, km, qm))
    eps = torch.finfo(dtype).eps
    for got, exact in ((s1, token_region_similarity_reference(q.double(), k.double(), qm, km)),
                       (s2, token_region_similarity_reference(k.double(), q.double(), km, qm))):
        assert ((got.double() - exact).abs() <= 2 * eps * exact.abs()).all()


BASELINE_ISA_SCRIPT = """
import torch, loupe_kernels as lk
from loupe_kernels.token_region_similarity import token_region_similarity_reference as ref
torch.manual_seed(0)
# similarity: quantized inputs (exact scores), ties across 64-key blocks, blocked shapes, float32
q = torch.randint(-6, 7, (40, 5, 75)).float() / 4
k = torch.randint(-6, 7, (24, 131, 75)).float() / 4
k[:, 130] = k[:, 0]
qm = torch.rand(40, 5) > 0.2
km = torch.rand(24, 131) > 0.2
km[:, 0] = km[:, 130] = True
_, amax = torch.ops.loupe_kernels.trs_forward(q, k, qm, km, True, "cpu")
s = torch.einsum("aqd,bkd->abqk", q.double(), k.double()).masked_fill(~km[None, :, None, :], float("-inf"))
want = torch.where(qm[:, None, :], s.max(-1).indices.int(), -1)
assert torch.equal(amax, want), "arg-max"
qm = torch.zeros(40, 5, dtype=torch.bool); qm[:, :4] = True
g = torch.randint(-8, 9, (40, 24)).double() / 8
def grads(backend, dt):
    a = q.to(dt, copy=True).requires_grad_(); b = k.to(dt, copy=True).requires_grad_()
    lk.token_region_similarity(a, b, qm, km, backend=backend).backward(g.to(dt))
    return a.grad, b.grad
for x, y in zip(grads("cpu", torch.float32), grads("reference", torch.float64)):
    assert torch.equal(x, y.float()), "gradient"
# Shapley: the draw (scalar Philox path) and the max-sim values against the reference
P = 70
pm = torch.rand(3, P) > 0.1
sub = torch.zeros(3, 4, P, dtype=torch.bool)
for gg in range(3):
    v = pm[gg].nonzero().flatten()
    for m in range(4):
        sub[gg, m, v[torch.randperm(len(v))[: m + 1]]] = True
for sched in ("uniform", "round_robin"):
    kw = dict(player_mask=pm, num_samples=30, seed=2**63 + 7, size_schedule=sched)
    assert torch.equal(lk.sample_coalitions(sub, backend="cpu", **kw), lk.sample_coalitions(sub, backend="reference", **kw))
sim = torch.randn(3, 6, P, dtype=torch.float64)
kw = dict(player_mask=pm, num_samples=30, seed=3)
a = lk.shapley_interaction(sim, sub, backend="cpu", **kw)
b = lk.shapley_interaction(sim, sub, backend="reference", **kw)
for x, y in zip(a, b):
    torch.testing.assert_close(x, y, rtol=0, atol=1e-12)
print("BASELINE_ISA_OK")
"""


@needs_cpu
def test_cpu_baseline_isa_copies():
    """The kernels' baseline-ISA copies (what a machine without AVX2 runs; here forced by
    LOUPE_CPU_BASELINE_ISA=1 in a fresh process) give the same arg-max, the same exact gradients
    and the same coalitions as the reference."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, LOUPE_CPU_BASELINE_ISA="1")
    out = subprocess.run([sys.executable, "-c", BASELINE_ISA_SCRIPT], capture_output=True, text=True, env=env,
                         cwd=os.path.expanduser("~"), timeout=300)
    assert out.returncode == 0 and "BASELINE_ISA_OK" in out.stdout, out.stderr[-3000:]


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    gen = torch.Generator().manual_seed(9)
    qt = torch.randn(7, 4, 5, generator=gen, dtype=torch.float64)  # [D, Bq, Lq] storage
    kt = torch.randn(7, 3, 6, generator=gen, dtype=torch.float64)
    q, k = qt.permute(1, 2, 0), kt.permute(1, 2, 0)
    qm = (torch.rand(5, 4, generator=gen) > 0.2).t()
    assert not q.is_contiguous() and not qm.is_contiguous()
    km = torch.ones(3, 6, dtype=torch.bool)
    want, _, _, _ = oracle(q, k, qm, km, True)
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
@needs_cpu
def test_opcheck_custom_op():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(3, 4, 8, generator=gen, requires_grad=True)
    k = torch.randn(2, 5, 8, generator=gen, requires_grad=True)
    qm = torch.ones(3, 4, dtype=torch.bool)
    km = torch.ones(2, 5, dtype=torch.bool)
    torch.library.opcheck(torch.ops.loupe_kernels.trs_forward.default, (q, k, qm, km, True, "cpu"))


@needs_cpu
def test_torch_compile_through_op():
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(4, 5, 8, generator=gen, requires_grad=True)
    k = torch.randn(3, 6, 8, generator=gen, requires_grad=True)
    check_trs_compiles_fullgraph(q, k, "cpu")


def test_available_backends_and_env_report():
    names = lk.available_backends()
    assert "reference" in names
    from loupe_kernels.env import report
    text = report()
    for b in lk.BACKENDS:
        assert b in text
    assert "cpu kernels: AVX2+FMA copies" in text or os.environ.get("LOUPE_CPU_BASELINE_ISA") == "1"


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
