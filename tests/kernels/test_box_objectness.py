"""box_objectness: the cpu kernel and the PyTorch reference against an independent float64 oracle
(a loop over boxes: inside / outside means, normalised, then the MLP)."""
from __future__ import annotations

import importlib
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import loupe_kernels as lk

bo = importlib.import_module("loupe_kernels.box_objectness")  # the package attribute is the function
BACKENDS = [b for b in ("reference", "cpu") if b in lk.available_backends()]
HAS_CPU = "cpu" in BACKENDS
GRIDS = [(1, 1), (1, 4), (3, 1), (3, 5), (8, 8)]


def boxes_in_order(h, w):
    ys = [(a, b) for a in range(h) for b in range(a + 1, h + 1)]
    xs = [(a, b) for a in range(w) for b in range(a + 1, w + 1)]
    return [(y0, y1, x0, x1) for (y0, y1) in ys for (x0, x1) in xs]


def oracle(tokens, h, w, w_in, w_out, bias, w2, b2, eps=1e-12):
    """float64 loop over the boxes."""
    x = tokens.double().reshape(tokens.shape[0], h, w, -1)
    B = x.shape[0]
    boxes = boxes_in_order(h, w)
    K = len(boxes)
    bias = bias.double().expand(B, K, bias.shape[-1])
    logits, inv_in, inv_out = (torch.zeros(B, K, dtype=torch.float64) for _ in range(3))
    total = x.sum((1, 2))
    for b in range(B):
        for k, (y0, y1, x0, x1) in enumerate(boxes):
            s = x[b, y0:y1, x0:x1].sum((0, 1))
            area = (y1 - y0) * (x1 - x0)
            n_out = h * w - area
            ii = 1.0 / max(s.norm().item(), eps * area)
            io = 1.0 / max((total[b] - s).norm().item(), eps * n_out) if n_out > 0 else 0.0
            fin, fout = ii * s, io * (total[b] - s)
            pre = bias[b, k] + w_in.double() @ fin + w_out.double() @ fout
            logits[b, k] = F.gelu(pre) @ w2.double() + float(b2)
            inv_in[b, k], inv_out[b, k] = ii, io
    return logits, inv_in, inv_out


def make(B, h, w, D, H, dtype=torch.float32, seed=0, batch_bias=False):
    g = torch.Generator().manual_seed(seed)
    tokens = F.normalize(torch.randn(B, h * w, D, generator=g, dtype=torch.float64) + 0.3, dim=-1)
    K = bo.num_boxes(h, w)
    w_in = torch.randn(H, D, generator=g, dtype=torch.float64) / math.sqrt(D)
    w_out = torch.randn(H, D, generator=g, dtype=torch.float64) / math.sqrt(D)
    bias = torch.randn(*((B,) if batch_bias else ()), K, H, generator=g, dtype=torch.float64) * 0.1
    w2 = torch.randn(H, generator=g, dtype=torch.float64) / math.sqrt(H)
    return [t.to(dtype) for t in (tokens, w_in, w_out, bias, w2)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("h,w", GRIDS)
@pytest.mark.parametrize("batch_bias", [False, True])
def test_float64_matches_the_oracle(backend, h, w, batch_bias):
    tokens, w_in, w_out, bias, w2 = make(3, h, w, 6, 5, torch.float64, batch_bias=batch_bias)
    want = oracle(tokens, h, w, w_in, w_out, bias, w2, 0.25)
    got = lk.box_objectness(tokens, h, w, w_in, w_out, bias, w2, 0.25, backend=backend)
    for g_, w_, name in zip(got, want, ("logits", "inv_in", "inv_out")):
        assert g_.dtype == torch.float64 and g_.shape == (3, bo.num_boxes(h, w)), name
        torch.testing.assert_close(g_, w_, rtol=1e-11, atol=1e-12, msg=name)


@pytest.mark.parametrize("h,w", [(3, 5), (8, 8)])
def test_float32_error_is_that_of_the_same_math_in_float32(h, w):
    """The cpu kernel's float32 error against the float64 oracle is no larger than the reference's
    (the same formula in PyTorch, float32), up to a few float32 ulps of the logits."""
    if not HAS_CPU:
        pytest.skip("cpu backend not built")
    args = make(4, h, w, 32, 24, torch.float32)
    want = oracle(*args[:1], h, w, *args[1:], b2=-0.1)
    ref = lk.box_objectness(args[0], h, w, *args[1:], -0.1, backend="reference")
    cpu = lk.box_objectness(args[0], h, w, *args[1:], -0.1, backend="cpu")
    for r, c, o, name in zip(ref, cpu, want, ("logits", "inv_in", "inv_out")):
        assert c.dtype == torch.float32
        err_ref = (r.double() - o).abs().max().item()
        err_cpu = (c.double() - o).abs().max().item()
        ulp = torch.finfo(torch.float32).eps * o.abs().max().item()
        assert err_cpu <= 2 * err_ref + 4 * ulp, (name, err_cpu, err_ref)


def test_whole_grid_box_has_no_outside_and_zero_tokens_use_eps():
    for backend in BACKENDS:
        tokens, w_in, w_out, bias, w2 = make(2, 3, 3, 4, 3, torch.float64)
        _, _, io = lk.box_objectness(tokens, 3, 3, w_in, w_out, bias, w2, backend=backend)
        whole = boxes_in_order(3, 3).index((0, 3, 0, 3))
        assert io[:, whole].eq(0).all() and io.ne(0).sum() == io.numel() - 2
        zeros = torch.zeros_like(tokens)
        lg, ii, io = lk.box_objectness(zeros, 3, 3, w_in, w_out, bias, w2, 0.5, eps=1e-3, backend=backend)
        want = oracle(zeros, 3, 3, w_in, w_out, bias, w2, 0.5, eps=1e-3)
        for g_, w_ in zip((lg, ii, io), want):
            torch.testing.assert_close(g_, w_, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not HAS_CPU, reason="cpu backend not built")
def test_cpu_is_deterministic_across_thread_counts():
    args = make(9, 8, 8, 16, 8)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = lk.box_objectness(args[0], 8, 8, *args[1:], backend="cpu")
        torch.set_num_threads(max(2, threads))
        many = lk.box_objectness(args[0], 8, 8, *args[1:], backend="cpu")
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_compute_in_float32(dtype):
    args = make(2, 3, 4, 8, 4, dtype)
    for backend in BACKENDS:
        out = lk.box_objectness(args[0], 3, 4, *args[1:], backend=backend)
        want = lk.box_objectness(*(a.float() for a in args[:1]), 3, 4, *(a.float() for a in args[1:]),
                                 backend="reference")
        for o, w_ in zip(out, want):
            assert o.dtype == torch.float32
            torch.testing.assert_close(o, w_, rtol=1e-5, atol=1e-6)


def test_gradients_take_the_reference_and_match_the_oracle():
    tokens, w_in, w_out, bias, w2 = make(2, 2, 3, 4, 3, torch.float64)
    tokens.requires_grad_(True)
    w_in.requires_grad_(True)
    logits, _, _ = lk.box_objectness(tokens, 2, 3, w_in, w_out, bias, w2)  # automatic: reference
    assert logits.requires_grad
    assert torch.autograd.gradcheck(
        lambda t, a: bo.box_objectness_reference(t, 2, 3, a, w_out, bias, w2, 0.0)[0], (tokens, w_in))
    if HAS_CPU:
        with pytest.raises(ValueError, match="forward only"):
            lk.box_objectness(tokens, 2, 3, w_in, w_out, bias, w2, backend="cpu")
        with torch.no_grad():
            out = lk.box_objectness(tokens, 2, 3, w_in, w_out, bias, w2)  # automatic: cpu
        assert not out[0].requires_grad
        torch.testing.assert_close(out[0], logits.detach(), rtol=1e-12, atol=1e-12)


def test_bad_input_names_the_problem():
    tokens, w_in, w_out, bias, w2 = make(2, 3, 3, 4, 3)
    cases = [
        (lambda: lk.box_objectness(tokens[0], 3, 3, w_in, w_out, bias, w2), "tokens must be"),
        (lambda: lk.box_objectness(tokens, 3, 2, w_in, w_out, bias, w2), "grid is 3x2"),
        (lambda: lk.box_objectness(tokens, 0, 3, w_in, w_out, bias, w2), "h must be a positive int"),
        (lambda: lk.box_objectness(tokens, 3, 3, w_in[:, :2], w_out, bias, w2), "w_in must be"),
        (lambda: lk.box_objectness(tokens, 3, 3, w_in, w_out[:2], bias, w2), "w_out must be"),
        (lambda: lk.box_objectness(tokens, 3, 3, w_in, w_out, bias[:5], w2), "bias must be"),
        (lambda: lk.box_objectness(tokens, 3, 3, w_in, w_out, bias, w2[:2]), "w2 must be"),
        (lambda: lk.box_objectness(tokens, 3, 3, w_in, w_out, bias, w2, torch.ones(2)), "b2 must be"),
        (lambda: lk.box_objectness(tokens, 3, 3, w_in, w_out, bias, w2, eps=-1.0), "eps must be"),
        (lambda: lk.box_objectness(tokens, 3, 3, w_in, w_out, bias, w2, backend="cuda"), "does not implement"),
        (lambda: lk.box_objectness(tokens, 3, 3, w_in, w_out, bias, w2, backend="nope"), "unknown backend"),
    ]
    bad = tokens.clone()
    bad[1, 2, 0] = float("nan")
    cases.append((lambda: lk.box_objectness(bad, 3, 3, w_in, w_out, bias, w2), "NaN or inf"))
    cases.append((lambda: lk.box_objectness(tokens.long(), 3, 3, w_in, w_out, bias, w2), "floating point"))
    for fn, match in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            fn()


def test_empty_batch():
    tokens, w_in, w_out, bias, w2 = make(1, 2, 2, 4, 3)
    for backend in BACKENDS:
        out = lk.box_objectness(tokens[:0], 2, 2, w_in, w_out, bias, w2, backend=backend)
        assert all(o.shape == (0, 9) for o in out)


@pytest.mark.skipif(not HAS_CPU, reason="cpu backend not built")
def test_opcheck_and_compile():
    tokens, w_in, w_out, bias, w2 = make(2, 3, 4, 8, 5)
    torch.library.opcheck(torch.ops.loupe_kernels.box_objectness.default,
                          (tokens, 3, 4, w_in, w_out, bias, w2, 0.5, 1e-12),
                          test_utils=("test_schema", "test_faketensor"))
    fn = torch.compile(lambda t: lk.box_objectness(t, 3, 4, w_in, w_out, bias, w2, 0.5, backend="cpu"),
                       fullgraph=True, backend="eager")
    for a, b in zip(fn(tokens), lk.box_objectness(tokens, 3, 4, w_in, w_out, bias, w2, 0.5, backend="cpu")):
        assert torch.equal(a, b)


def test_box_order_is_row_interval_then_column_interval():
    h, w = 3, 4
    rows = bo.interval_matrix(h)
    cols = bo.interval_matrix(w)
    for k, (y0, y1, x0, x1) in enumerate(boxes_in_order(h, w)):
        i, j = divmod(k, cols.shape[0])
        assert rows[i].nonzero().flatten().tolist() == list(range(y0, y1))
        assert cols[j].nonzero().flatten().tolist() == list(range(x0, x1))
    assert len(list(itertools.islice(boxes_in_order(h, w), None))) == bo.num_boxes(h, w)
