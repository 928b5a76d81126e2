"""token_region_similarity, Triton backend, against an independent float64 oracle and the cpu backend.

Runs under the Triton interpreter (TRITON_INTERPRET=1, set by tests/conftest.py without a GPU) with
tiny shapes, or on a GPU. Each case runs twice where it matters: with the automatic block sizes and
with forced 16-wide blocks ("small"), so that the multi-tile paths (several key tiles with a running
max across them, D in chunks, several key-row tiles and query blocks in the backward, several key
items per program) are exercised by odd, non-multiple-of-16 sizes too.
"""
from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from _kernel_testing import (check_trs_compiles_fullgraph, quantized, random_masks, require_triton_runs,
                             run_aot_script, tol_bound)
from _kernel_testing import trs_oracle as oracle

DEV = require_triton_runs()

import loupe_kernels as lk  # noqa: E402
from loupe_kernels import triton_token_region_similarity as T  # noqa: E402
from loupe_kernels.token_region_similarity import token_region_similarity_reference  # noqa: E402

HAS_CPU = "cpu" in lk.available_backends()
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason="cpu backend (C++ extension) not built")


def assert_bounded(got, ref, want, dtype, what=""):
    ref_err = (ref.double().cpu() - want).abs().max().item() if want.numel() else 0.0
    err = (got.double().cpu() - want).abs().max().item() if want.numel() else 0.0
    scale = want.abs().max().item() if want.numel() else 0.0
    assert err <= tol_bound(dtype, ref_err, scale), (what, err, ref_err)


def _small_config(orig):
    def cfg(Bq, Bk, Lq, Lk, D, pairwise, itemsize=2):
        c = orig(Bq, Bk, Lq, Lk, D, pairwise, itemsize)
        return dataclasses.replace(
            c, fwd_block_a=2 if pairwise else 1, items_b=2 if pairwise else 1, block_k=16, fwd_block_d=16,
            one_d=False, dq_block_a=2 if pairwise else 1, dq_block_d=16, dk_block_a=2 if pairwise else 1,
            dk_block_kr=16, dk_block_d=16, dkg_block_e=16, dkg_block_d=16)
    return cfg


def _dense_dk_config(orig):
    def cfg(*args, **kw):
        return dataclasses.replace(orig(*args, **kw), dk_grouped=False)
    return cfg


@pytest.fixture(params=["auto", "small", "dense_dk"])
def blocks(request, monkeypatch):
    """Block configurations: automatic, small blocks (every loop runs several times; small grouped
    d_key chunks), and the dense one-hot d_key of before the grouping (issue 20 item 6)."""
    if request.param == "small":
        monkeypatch.setattr(T, "_config", _small_config(T._config))
    elif request.param == "dense_dk":
        monkeypatch.setattr(T, "_config", _dense_dk_config(T._config))
    return request.param


def grads(fn, q64, k64, gout, dtype):
    q = q64.to(DEV, dtype).requires_grad_()
    k = k64.to(DEV, dtype).requires_grad_()
    out = fn(q, k)
    out.backward(gout.to(DEV, dtype))
    return out.detach(), q.grad, k.grad


SHAPES = [  # Bq, Lq, Bk, Lk, D (odd; Lk=70 spans two 64-wide key tiles)
    (3, 5, 3, 7, 11),
    (5, 7, 4, 13, 17),
    (4, 3, 6, 70, 19),
]


# ------------------------------------------------------------------------------------------------
# forward, gradients and arg-max against the oracle (fp32, quantized: exact scores)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pairwise", [True, False])
def test_matches_oracle_with_masks(shape, pairwise, blocks):
    Bq, Lq, Bk, Lk, D = shape
    if not pairwise:
        Bk = Bq
    gen = torch.Generator().manual_seed(hash((shape, pairwise)) % 2**31)
    q64, k64 = quantized((Bq, Lq, D), gen), quantized((Bk, Lk, D), gen)
    qm, km = random_masks(Bq, Lq, Bk, Lk, gen)
    gout = torch.randn((Bq, Bk) if pairwise else (Bq,), generator=gen, dtype=torch.float64)
    want, dq_want, dk_want, amax_want = oracle(q64, k64, qm, km, pairwise, gout)
    qm_d, km_d = qm.to(DEV), km.to(DEV)

    out, amax = T.forward(q64.float().to(DEV), k64.float().to(DEV), qm_d, km_d, pairwise)
    assert out.dtype == torch.float32 and amax.dtype == torch.int32
    assert torch.equal(amax.cpu(), amax_want)  # exact scores: the same first arg-max, -1 where undefined
    assert (out.cpu()[1] == 0).all()  # the fully masked query item
    if Bk > 2 and pairwise:
        assert (out.cpu()[:, 2] == 0).all()  # the fully masked key item

    got, dq, dk = grads(lambda q, k: lk.token_region_similarity(q, k, qm_d, km_d, pairwise=pairwise,
                                                                 backend="triton"), q64, k64, gout, torch.float32)
    ref, rq, rk = grads(lambda q, k: token_region_similarity_reference(q, k, qm_d, km_d, pairwise=pairwise),
                        q64, k64, gout, torch.float32)
    assert_bounded(got, ref, want, torch.float32, "out")
    assert_bounded(dq, rq, dq_want, torch.float32, "d_query")
    assert_bounded(dk, rk, dk_want, torch.float32, "d_key")
    assert dq.abs().sum() > 0 and dk.abs().sum() > 0  # the test can fail: gradients are not all zero


@needs_cpu
@pytest.mark.parametrize("pairwise", [True, False])
def test_argmax_agrees_with_cpu_backend(pairwise, blocks):
    gen = torch.Generator().manual_seed(21)
    Bq, Lq, Bk, Lk, D = 5, 9, 4 if pairwise else 5, 21, 13
    q, k = quantized((Bq, Lq, D), gen).float(), quantized((Bk, Lk, D), gen).float()
    qm, km = random_masks(Bq, Lq, Bk, Lk, gen)
    from loupe_kernels.token_region_similarity import KERNELS
    out_c, amax_c = KERNELS["cpu"][0](q, k, qm, km, pairwise)
    out_t, amax_t = T.forward(q.to(DEV), k.to(DEV), qm.to(DEV), km.to(DEV), pairwise)
    assert torch.equal(amax_t.cpu(), amax_c)
    assert (amax_c == -1).any()  # the undefined positions are compared too
    torch.testing.assert_close(out_t.cpu(), out_c, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# dtypes: error bounded by the same PyTorch math in that dtype
# ------------------------------------------------------------------------------------------------
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pairwise", [True, False])
def test_forward_dtypes_error_bounded_by_torch_math(dtype, pairwise):
    gen = torch.Generator().manual_seed(7)
    Bq, Lq, Bk, Lk, D = 6, 9, 6, 23, 37
    q64 = torch.randn(Bq, Lq, D, generator=gen, dtype=torch.float64) / D**0.25
    k64 = torch.randn(Bk, Lk, D, generator=gen, dtype=torch.float64) / D**0.25
    qm, km = random_masks(Bq, Lq, Bk, Lk, gen)
    q, k = q64.to(DEV, dtype), k64.to(DEV, dtype)
    qm_d, km_d = qm.to(DEV), km.to(DEV)
    want, _, _, _ = oracle(q, k, qm, km, pairwise)  # the oracle of the rounded inputs
    ref = token_region_similarity_reference(q, k, qm_d, km_d, pairwise=pairwise)
    got = lk.token_region_similarity(q, k, qm_d, km_d, pairwise=pairwise, backend="triton")
    assert got.dtype == dtype and got.shape == want.shape
    assert not torch.isnan(got).any()
    assert_bounded(got, ref, want, dtype, "out")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pairwise", [True, False])
def test_gradients_dtypes_error_bounded_by_torch_math(dtype, pairwise):
    Bq, Lq, Bk, Lk, D = 5, 7, 4 if pairwise else 5, 13, 17
    gen = torch.Generator().manual_seed(11)
    q64, k64 = quantized((Bq, Lq, D), gen), quantized((Bk, Lk, D), gen)
    qm, km = random_masks(Bq, Lq, Bk, Lk, gen)
    qm_d, km_d = qm.to(DEV), km.to(DEV)
    gout = torch.randn((Bq, Bk) if pairwise else (Bq,), generator=gen, dtype=torch.float64)
    want, dq_want, dk_want, _ = oracle(q64, k64, qm, km, pairwise, gout)
    got, dq, dk = grads(lambda q, k: lk.token_region_similarity(q, k, qm_d, km_d, pairwise=pairwise,
                                                                 backend="triton"), q64, k64, gout, dtype)
    ref, rq, rk = grads(lambda q, k: token_region_similarity_reference(q, k, qm_d, km_d, pairwise=pairwise),
                        q64, k64, gout, dtype)
    assert got.dtype == dq.dtype == dk.dtype == dtype
    assert_bounded(got, ref, want, dtype, "out")
    assert_bounded(dq, rq, dq_want, dtype, "d_query")
    assert_bounded(dk, rk, dk_want, dtype, "d_key")


# ------------------------------------------------------------------------------------------------
# ties
# ------------------------------------------------------------------------------------------------
def _pow2_masks(Bq, Lq, Bk, Lk, gen):
    """Query items with 0, 1, 2 or 4 valid tokens (1/count exact), random key masks."""
    qm = torch.zeros(Bq, Lq, dtype=torch.bool)
    for a in range(Bq):
        n = (0, 1, 2, 4)[a % 4]
        qm[a, torch.randperm(Lq, generator=gen)[:n]] = True
    km = torch.rand(Bk, Lk, generator=gen) > 0.2
    km[min(2, Bk - 1)] = False
    return qm, km


@needs_cpu
@pytest.mark.parametrize("pairwise", [True, False])
def test_exact_ties_identical_to_cpu(pairwise, blocks):
    # entries in {-1/2, 0, 1/2} with D=5: many exactly tied scores; gradients m/4 with power-of-two
    # counts: every operation is exact, so outputs, arg-max and gradients must be bit-identical.
    gen = torch.Generator().manual_seed(5)
    Bq, Lq, Lk, D = 6, 6, 37, 5
    Bk = 5 if pairwise else Bq
    q64 = torch.randint(-1, 2, (Bq, Lq, D), generator=gen).double() / 2
    k64 = torch.randint(-1, 2, (Bk, Lk, D), generator=gen).double() / 2
    qm, km = _pow2_masks(Bq, Lq, Bk, Lk, gen)
    gout = torch.randint(-8, 9, (Bq, Bk) if pairwise else (Bq,), generator=gen).double() / 4
    want, dq_want, dk_want, amax_want = oracle(q64, k64, qm, km, pairwise, gout)
    from loupe_kernels.token_region_similarity import KERNELS
    q, k = q64.float(), k64.float()
    out_c, amax_c = KERNELS["cpu"][0](q, k, qm, km, pairwise)
    dq_c, dk_c = KERNELS["cpu"][1](gout.float(), q, k, qm, amax_c, pairwise)
    out_t, amax_t = T.forward(q.to(DEV), k.to(DEV), qm.to(DEV), km.to(DEV), pairwise)
    dq_t, dk_t = T.backward(gout.float().to(DEV), q.to(DEV), k.to(DEV), qm.to(DEV), amax_t, pairwise)
    assert torch.equal(amax_t.cpu(), amax_c) and torch.equal(amax_c, amax_want)
    for t, c, w in ((out_t, out_c, want), (dq_t, dq_c, dq_want), (dk_t, dk_c, dk_want)):
        assert torch.equal(t.cpu(), c) and torch.equal(t.cpu().double(), w)
    # the data really has ties: some query token has several keys at its maximum
    s = torch.einsum("aqd,bkd->abqk", q64, k64) if pairwise else torch.einsum("bqd,bkd->bqk", q64, k64)
    s = s.masked_fill(~(km[None, :, None, :] if pairwise else km[:, None, :]), float("-inf"))
    assert ((s == s.max(dim=-1, keepdim=True).values) & torch.isfinite(s)).sum(dim=-1).max() > 1


@pytest.mark.parametrize("pairwise", [True, False])
def test_ties_across_key_tiles_go_to_lowest_index(pairwise, blocks):
    # the maximum is reached at keys 3, 5 and 67 (another 64-wide tile); with 3 masked, 5 wins
    Lk, D = 70, 4
    q = torch.zeros(1, 2, D)
    q[0, 0, 0] = 1.0
    q[0, 1, 1] = 1.0
    k = torch.full((1, Lk, D), 0.25)
    for i in (3, 5, 67):
        k[0, i] = torch.tensor([2.0, -1.0, 0.0, 0.0])
    k[0, 40] = torch.tensor([0.0, 3.0, 0.0, 0.0])
    k[0, 69] = torch.tensor([0.0, 3.0, 0.0, 0.0])
    qm = torch.ones(1, 2, dtype=torch.bool)
    for masked, first in ((None, 3), (3, 5), ((3, 5), 67)):
        km = torch.ones(1, Lk, dtype=torch.bool)
        if masked is not None:
            km[0, list(masked) if isinstance(masked, tuple) else masked] = False
        out, amax = T.forward(q.to(DEV), k.to(DEV), qm.to(DEV), km.to(DEV), pairwise)
        assert amax.cpu().reshape(-1).tolist() == [first, 40]
        assert out.cpu().reshape(-1).tolist() == [2.5]
        dq, dk = T.backward(torch.ones_like(out), q.to(DEV), k.to(DEV), qm.to(DEV), amax, pairwise)
        hit = dk.cpu()[0].abs().sum(dim=1).nonzero().reshape(-1).tolist()
        assert hit == sorted([first, 40])


def test_negative_scores_padding_never_wins():
    q = torch.tensor([[[1.0, 0.0]]], device=DEV)
    k = torch.tensor([[[-1.0, 0.0], [0.0, 0.0]]], device=DEV)
    km = torch.tensor([[True, False]], device=DEV)
    assert lk.token_region_similarity(q, k, key_mask=km, backend="triton").item() == -1.0


# ------------------------------------------------------------------------------------------------
# autograd, autocast, torch.compile, determinism, edge sizes
# ------------------------------------------------------------------------------------------------
@needs_cpu
@pytest.mark.parametrize("pairwise", [True, False])
def test_autograd_under_autocast_matches_cpu_backend(pairwise):
    # fp32 leaves, autocast to bf16: the op runs in bf16 and returns bf16; exact-arithmetic data
    # (quantized values, power-of-two counts, gradients m/4) makes both backends bit-identical.
    gen = torch.Generator().manual_seed(3)
    Bq, Lq, Lk, D = 5, 6, 11, 8
    Bk = 3 if pairwise else Bq
    q0, k0 = quantized((Bq, Lq, D), gen).float(), quantized((Bk, Lk, D), gen).float()
    qm, km = _pow2_masks(Bq, Lq, Bk, Lk, gen)
    w = torch.randint(-4, 5, (Bq, Bk) if pairwise else (Bq,), generator=gen).float() / 4
    res = {}
    for backend in ("cpu", "triton"):
        dev = "cpu" if backend == "cpu" else DEV
        q = q0.to(dev).requires_grad_()
        k = k0.to(dev).requires_grad_()
        with torch.autocast(dev, dtype=torch.bfloat16):
            out = lk.token_region_similarity(q, k, qm.to(dev), km.to(dev), pairwise=pairwise, backend=backend)
        assert out.dtype == torch.bfloat16
        (out.float() * w.to(dev)).sum().backward()
        assert q.grad.dtype == torch.float32
        res[backend] = (out.cpu(), q.grad.cpu(), k.grad.cpu())
    for t, c in zip(res["triton"], res["cpu"]):
        assert torch.equal(t, c)
    assert res["triton"][2].abs().sum() > 0


def test_torch_compile_fullgraph():
    gen = torch.Generator().manual_seed(2)
    q = quantized((4, 5, 8), gen).float().to(DEV).requires_grad_()
    k = quantized((3, 6, 8), gen).float().to(DEV).requires_grad_()
    t0 = time.time()
    check_trs_compiles_fullgraph(q, k, "triton")
    assert time.time() - t0 < 60


def test_backward_deterministic():
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(6, 7, 9, generator=gen).to(DEV)
    k = torch.randn(5, 10, 9, generator=gen).to(DEV)
    qm = torch.ones(6, 7, dtype=torch.bool, device=DEV)
    km = torch.ones(5, 10, dtype=torch.bool, device=DEV)
    out, amax = T.forward(q, k, qm, km, True)
    g = torch.randn(out.shape, generator=gen).to(DEV)
    first = T.backward(g, q, k, qm, amax, True)
    second = T.backward(g, q, k, qm, amax, True)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize("shape", [(2, 0, 3, 4, 5), (2, 3, 3, 0, 5), (0, 3, 2, 4, 5), (2, 3, 3, 4, 0)])
def test_empty_sizes(shape):
    Bq, Lq, Bk, Lk, D = shape
    q, k = torch.randn(Bq, Lq, D, device=DEV), torch.randn(Bk, Lk, D, device=DEV)
    qm = torch.ones(Bq, Lq, dtype=torch.bool, device=DEV)
    km = torch.ones(Bk, Lk, dtype=torch.bool, device=DEV)
    want, dq_want, dk_want, amax_want = oracle(q, k, qm, km, True, torch.ones(Bq, Bk))
    out, amax = T.forward(q, k, qm, km, True)
    assert torch.equal(out.cpu().double(), want) and torch.equal(amax.cpu(), amax_want)
    dq, dk = T.backward(torch.ones_like(out), q, k, qm, amax, True)
    assert torch.equal(dq.cpu().double(), dq_want) and torch.equal(dk.cpu().double(), dk_want)


def test_bad_dtype_is_a_clear_error():
    x = torch.ones(1, 2, 3, dtype=torch.int32, device=DEV)
    m = torch.ones(1, 2, dtype=torch.bool, device=DEV)
    with pytest.raises(TypeError, match="query must be"):
        T.forward(x, x, m, m, True)


# ------------------------------------------------------------------------------------------------
# the real compiler: the kernels compile for sm_90 at the GPU target shape (no GPU needed)
# ------------------------------------------------------------------------------------------------
# run after _kernel_testing.AOT_PRELUDE (imports, compile_one, the rows in `out`)
_AOT_SCRIPT = r'''
from loupe_kernels import triton_token_region_similarity as T

Bq, Bk, Lq, Lk, D = 1024, 1024, 32, 196, 256
TYPES = {"bf16": ("*bf16", 2, "ieee"), "fp32": ("*fp32", 4, "tf32x3")}
for dt, pw in [("bf16", True), ("bf16", False), ("fp32", True)]:
    P, size, prec = TYPES[dt]
    c = T._config(Bq, Bk, Lq, Lk, D, pw, size)
    common = dict(PAIRWISE=pw, LQ_PAD=c.lq_pad, ACC=tl.float32)
    ptrs = {"*": P, "qm_ptr": "*u8", "km_ptr": "*u8", "amax_ptr": "*i32", "cnt_ptr": "*fp32"}
    vals = dict(Bq=Bq, Bk=Bk, Lq=Lq, Lk=Lk, D=D, s_ga=Bk if pw else 1, s_gb=1 if pw else 0)
    row = dict(dtype=dt, pairwise=pw)
    compile_one(T._fwd_kernel, {**common, **dict(
        ITEMS_B=c.items_b, BLOCK_A=c.fwd_block_a, ROWS=c.fwd_block_a * c.lq_pad, BLOCK_K=c.block_k,
        BLOCK_D=c.fwd_block_d, ONE_D=c.one_d, UPCAST=False, PREC=prec)}, ptrs, vals, c.fwd_warps, row)
    compile_one(T._dq_kernel, {**common, **dict(
        BLOCK_A=c.dq_block_a, ROWS=c.dq_block_a * c.lq_pad, BLOCK_D=c.dq_block_d)}, ptrs, vals, c.bwd_warps, row)
    compile_one(T._dk_kernel, {**common, **dict(
        BLOCK_A=c.dk_block_a, COLS=c.dk_block_a * c.lq_pad, BLOCK_KR=c.dk_block_kr, BLOCK_D=c.dk_block_d,
        UPCAST=False, PREC=prec)}, ptrs, vals, c.bwd_warps, row)
print(json.dumps(out))
'''


def test_kernels_compile_for_sm90_at_the_target_shape():
    """The Triton compiler (not the interpreter) builds every kernel for sm_90 at Bq=Bk=1024, Lq=32,
    Lk=196, D=256: shared memory within the H100 limit, and no register spills in bf16."""
    rows = run_aot_script(_AOT_SCRIPT, timeout=300)
    assert len(rows) == 9
    for r in rows:
        assert r["smem"] <= 232448, r  # 227 KiB: the most one block may use on an H100
        if r["dtype"] == "bf16":
            assert r["stack"] == 0, r  # no register spills at the target shape
        if r["kernel"] != "_dq_kernel":  # (dq gathers rows; the others stream tiles through shared memory)
            assert r["pipelined"] > 0, r  # the tile loads are software-pipelined (cp.async)


# ------------------------------------------------------------------------------------------------
# embedding sizes above 256 with the real launch configuration (D walked in 128-wide chunks in 16-bit:
# the chunking that keeps shared memory within the H100's limit, issue 20)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("D,dtype", [(384, torch.bfloat16), (1024, torch.float16), (512, torch.float32)])
def test_large_embeddings_real_config(D, dtype):
    Bq, Lq, Bk, Lk = 2, 5, 3, 9
    cfg = T._config(Bq, Bk, Lq, Lk, D, True, torch.empty((), dtype=dtype).element_size())
    assert not cfg.one_d and cfg.fwd_block_d == (128 if dtype != torch.float32 else 64)
    gen = torch.Generator().manual_seed(D)
    q64, k64 = quantized((Bq, Lq, D), gen), quantized((Bk, Lk, D), gen)
    qm, km = random_masks(Bq, Lq, Bk, Lk, gen)
    gout = torch.randn((Bq, Bk), generator=gen, dtype=torch.float64)
    want, dq_want, dk_want, amax_want = oracle(q64, k64, qm, km, True, gout)
    qm_d, km_d = qm.to(DEV), km.to(DEV)
    got, dq, dk = grads(lambda q, k: lk.token_region_similarity(q, k, qm_d, km_d, backend="triton"),
                        q64, k64, gout, dtype)
    ref, rq, rk = grads(lambda q, k: token_region_similarity_reference(q, k, qm_d, km_d), q64, k64, gout, dtype)
    assert_bounded(got, ref, want, dtype, "out")
    assert_bounded(dq, rq, dq_want, dtype, "d_query")
    assert_bounded(dk, rk, dk_want, dtype, "d_key")


# ------------------------------------------------------------------------------------------------
# d_key grouped by key row (issue 20 item 6)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pairwise", [True, False])
def test_group_by_key_is_a_stable_counting_sort(pairwise):
    g = torch.Generator().manual_seed(1)
    B, Bk, Lq, Lk = 3, 3 if pairwise else 3, 4, 5
    shape = (B, Bk, Lq) if pairwise else (B, Lq)
    amax = torch.randint(-1, Lk, shape, generator=g, dtype=torch.int32)
    order, start = T.group_by_key(amax, pairwise, Bk, Lk)
    flat = amax.reshape(-1).tolist()
    want = {}
    for e, i in enumerate(flat):          # ascending e: the order a then j
        if i >= 0:
            b = (e // Lq) % Bk if pairwise else e // Lq
            want.setdefault(b * Lk + i, []).append(e)
    for r in range(Bk * Lk):
        assert order[start[r]:start[r + 1]].tolist() == want.get(r, [])
    assert int(start[-1]) == sum(i >= 0 for i in flat)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("pairwise", [True, False])
def test_grouped_d_key_matches_the_dense_one_and_is_deterministic(dtype, pairwise, monkeypatch):
    g = torch.Generator().manual_seed(2)
    Bq, Bk, Lq, Lk, D = 3, 3, 5, 7, 24
    q = torch.randn(Bq, Lq, D, generator=g).to(dtype)
    k = torch.randn(Bk, Lk, D, generator=g).to(dtype)
    k[:, 0] = 3 * k[:, 1].abs().max()    # a key token that wins for many queries: a long segment
    qm = torch.rand(Bq, Lq, generator=g) > 0.2
    _, amax = T.forward(q, k, qm, torch.ones(Bk, Lk, dtype=torch.bool), pairwise)
    grad = torch.randn(amax.shape[:-1], generator=g).to(dtype)
    dq1, dk1 = T.backward(grad, q, k, qm, amax, pairwise)
    dq2, dk2 = T.backward(grad, q, k, qm, amax, pairwise)
    assert torch.equal(dk1, dk2) and torch.equal(dq1, dq2)
    monkeypatch.setattr(T, "_config", _dense_dk_config(T._config))
    _, dk_dense = T.backward(grad, q, k, qm, amax, pairwise)
    tol = {torch.float16: 2e-3, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(dk1.double(), dk_dense.double(), rtol=tol, atol=tol * 4)
