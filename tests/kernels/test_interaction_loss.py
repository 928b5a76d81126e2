"""uncertainty_interaction_loss: reference and cpu backends against an independent float64 oracle."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import loupe_kernels as lk
from _kernel_testing import uil_inputs as make
from _kernel_testing import uil_oracle as oracle
from _kernel_testing import uil_run as run
from loupe_kernels.interaction_loss import uncertainty_interaction_loss_reference

BACKENDS = [b for b in ("reference", "cpu") if b in lk.available_backends()]
HAS_CPU = "cpu" in BACKENDS
REDUCTIONS = ["mean", "sum", "none"]
LOW = [torch.float32, torch.bfloat16, torch.float16]


def tol_bound(dtype, ref_err, scale):
    """Twice the error of the same PyTorch math in `dtype`, plus one unit of rounding at the scale."""
    return 2 * ref_err + torch.finfo(dtype).eps * max(scale, 1e-30)


SHAPES = [(1,), (7,), (5, 33), (3, 4, 129)]
FLAGS = list(itertools.product([False, True], [False, True]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: f"tv{int(f[0])}w{int(f[1])}")
def test_fp64_matches_oracle(backend, shape, reduction, flags):
    gen = torch.Generator().manual_seed(hash((shape, reduction, flags)) % 2**31)
    mu, lv, t, tv, w = make(shape, gen, with_tv=flags[0], with_w=flags[1])
    grad_out = torch.randn(shape, generator=gen, dtype=torch.float64) if reduction == "none" else \
        torch.tensor(1.7, dtype=torch.float64)
    want, wmu, wlv = oracle(mu, lv, t, tv, w, reduction)
    got, gmu, glv = run(backend, mu, lv, t, tv, w, reduction, grad_out)
    assert got.dtype == torch.float64 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gmu, wmu * grad_out, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(glv, wlv * grad_out, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: f"tv{int(f[0])}w{int(f[1])}")
def test_low_precision_error_bounded_by_torch_math(backend, dtype, reduction, flags):
    gen = torch.Generator().manual_seed(11)
    shape = (4, 777)
    mu, lv, t, tv, w = make(shape, gen, dtype=dtype, with_tv=flags[0], with_w=flags[1])
    grad_out = torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5 if reduction == "none" else \
        torch.tensor(1.0, dtype=torch.float64)
    # the oracle of the *rounded* inputs: a backend only adds its own rounding
    want, wmu, wlv = oracle(mu, lv, t, tv, w, reduction)
    ref, rmu, rlv = run("reference", mu, lv, t, tv, w, reduction, grad_out)
    got, gmu, glv = run(backend, mu, lv, t, tv, w, reduction, grad_out)
    assert got.dtype == dtype and gmu.dtype == dtype and glv.dtype == dtype
    for g, r, o in ((got, ref, want), (gmu, rmu, wmu * grad_out), (glv, rlv, wlv * grad_out)):
        ref_err = (r.double() - o).abs().max().item()
        err = (g.double() - o).abs().max().item()
        assert err <= tol_bound(dtype, ref_err, o.abs().max().item()), (err, ref_err)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_agrees_with_gaussian_nll_loss_where_it_does_not_clamp(backend, reduction):
    gen = torch.Generator().manual_seed(3)
    mu = torch.randn(300, generator=gen, dtype=torch.float64)
    lv = torch.empty(300, dtype=torch.float64).uniform_(-13.7, 20, generator=gen)
    t = mu + torch.randn(300, generator=gen, dtype=torch.float64) * torch.exp(0.5 * lv)
    got = lk.uncertainty_interaction_loss(mu, lv, t, reduction=reduction, backend=backend)
    want = F.gaussian_nll_loss(mu, t, torch.exp(lv), reduction=reduction)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # below the clamp gaussian_nll_loss departs from the formula; the op does not
    lv_low = torch.full((3,), -18.0, dtype=torch.float64)
    got = lk.uncertainty_interaction_loss(mu[:3], lv_low, mu[:3] + 1e-4, reduction="none", backend=backend)
    clamped = F.gaussian_nll_loss(mu[:3], mu[:3] + 1e-4, torch.exp(lv_low), reduction="none")
    torch.testing.assert_close(got, 0.5 * (1e-8 * torch.exp(torch.tensor(18.0, dtype=torch.float64)) - 18.0)
                               .expand(3), rtol=1e-6, atol=0)
    assert not torch.allclose(got, clamped)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_tv", [False, True])
def test_extreme_log_variances_and_residuals_are_finite_and_accurate(backend, dtype, with_tv):
    lv = torch.tensor([-20.0, -20.0, -19.5, -13.8, -1.0, 0.0, 5.0, 19.5, 20.0, 20.0, -20.0, 20.0])
    r = torch.tensor([1e3, 1e-9, 3e6, 1e6, 1e10, 1e-30, 1e12, 1e14, 0.0, 1e-3, 0.0, 1e18])
    mu = torch.linspace(-3, 3, 12)
    lv, mu = lv.to(dtype), mu.to(dtype)
    t = (mu.double() + r.double()).to(dtype)
    tv = torch.tensor([0.0, 1e-12, 0.0, 1e-3, 0.0, 2.0, 1e4, 0.0, 0.0, 1e-6, 1e-30, 3.0]).to(dtype) if with_tv else None
    for reduction in REDUCTIONS:
        out, dmu, dlv = run(backend, mu, lv, t, tv, None, reduction)
        for x in (out, dmu, dlv):
            assert torch.isfinite(x).all(), (reduction, x)
    want, wmu, wlv = oracle(mu, lv, t, tv, None, "none")
    got, gmu, glv = run(backend, mu, lv, t, tv, None, "none")
    eps = torch.finfo(dtype).eps
    for g, o in ((got, want), (gmu, wmu), (glv, wlv)):
        rel = ((g.double() - o).abs() / o.abs().clamp(min=1e-30)).max().item()
        assert rel <= 8 * eps, rel


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_zero_masks_nan_and_inf_targets(backend):
    gen = torch.Generator().manual_seed(5)
    mu, lv, t, tv, _ = make((50,), gen, dtype=torch.float32, with_tv=True)
    w = torch.ones(50)
    w[[3, 10, 11]] = 0.0
    t_bad, tv_bad = t.clone(), tv.clone()
    t_bad[3], t_bad[10] = float("nan"), float("inf")
    tv_bad[11] = float("nan")
    for reduction in REDUCTIONS:
        out, dmu, dlv = run(backend, mu, lv, t_bad, tv_bad, w, reduction)
        want, wmu, wlv = run("reference", mu, lv, t, tv, w, reduction)
        for x in (out, dmu, dlv):
            assert torch.isfinite(x).all()
        assert (dmu[[3, 10, 11]] == 0).all() and (dlv[[3, 10, 11]] == 0).all()
        if reduction == "none":
            assert (out[[3, 10, 11]] == 0).all()
        torch.testing.assert_close(out, want, rtol=2e-6, atol=1e-7)
        torch.testing.assert_close(dmu, wmu, rtol=2e-6, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_broadcast_weight_and_target_var_and_promotion(backend):
    gen = torch.Generator().manual_seed(6)
    mu, lv, t, _, _ = make((6, 5), gen)
    w = torch.tensor([0.5, 1.0, 0.0, 2.0, 1.0], dtype=torch.float64)
    tv = torch.tensor(0.25, dtype=torch.float64)
    got = lk.uncertainty_interaction_loss(mu, lv, t, target_var=tv, weight=w, backend=backend)
    want, _, _ = oracle(mu, lv, t, tv, w, "mean")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # bfloat16 predictions against a float32 target: computed and returned in float32
    mu16 = mu.to(torch.bfloat16).requires_grad_()
    out = lk.uncertainty_interaction_loss(mu16, lv.to(torch.bfloat16), t.float(), backend=backend)
    assert out.dtype == torch.float32
    out.backward()
    assert mu16.grad.dtype == torch.bfloat16 and torch.isfinite(mu16.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_input(backend):
    e = torch.empty(0, 3)
    assert lk.uncertainty_interaction_loss(e, e, e, backend=backend).item() == 0.0
    assert lk.uncertainty_interaction_loss(e, e, e, reduction="sum", backend=backend).item() == 0.0
    assert lk.uncertainty_interaction_loss(e, e, e, reduction="none", backend=backend).shape == (0, 3)


@pytest.mark.skipif(not HAS_CPU, reason="cpu backend not built")
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: f"tv{int(f[0])}w{int(f[1])}")
def test_gradcheck_fp64_cpu(reduction, flags):
    gen = torch.Generator().manual_seed(8)
    mu, lv, t, tv, w = make((3, 5), gen, lv_scale=1.0, with_tv=flags[0], with_w=flags[1])
    mu.requires_grad_()
    lv.requires_grad_()

    def f(mu, lv):
        return lk.uncertainty_interaction_loss(mu, lv, t, target_var=tv, weight=w, reduction=reduction,
                                               backend="cpu")
    assert torch.autograd.gradcheck(f, (mu, lv))


@pytest.mark.skipif(not HAS_CPU, reason="cpu backend not built")
def test_cpu_sum_independent_of_thread_count():
    gen = torch.Generator().manual_seed(9)
    mu, lv, t, _, _ = make((300_000,), gen, dtype=torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run("cpu", mu, lv, t, None, None, "mean")
        torch.set_num_threads(max(2, threads))
        two = run("cpu", mu, lv, t, None, None, "mean")
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_no_gradient_needed_forward_matches():
    if not HAS_CPU:
        pytest.skip("cpu backend not built")
    gen = torch.Generator().manual_seed(10)
    mu, lv, t, _, _ = make((40,), gen, dtype=torch.float32)
    with torch.no_grad():
        a = lk.uncertainty_interaction_loss(mu, lv, t, backend="cpu")
    b, _, _ = run("cpu", mu, lv, t, None, None, "mean")
    assert torch.equal(a, b.detach())


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
X = torch.zeros(4)


def _nan(i=1):
    t = torch.zeros(4)
    t[i] = float("nan")
    return t


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(target=_nan()), ValueError, "target contains NaN"),
    (dict(target=_nan(), weight=torch.tensor([1.0, 0.5, 1.0, 1.0])), ValueError, "target contains NaN"),
    (dict(target_var=torch.tensor([0.0, -1e-3, 0.0, 0.0])), ValueError, "target_var must be >= 0"),
    (dict(target_var=torch.tensor([0.0, -1.0, 0.0, 0.0]), weight=torch.tensor([1.0, 0.0, 1.0, 1.0])),
     ValueError, "target_var must be >= 0"),
    (dict(target_var=_nan(2)), ValueError, "target_var contains NaN"),
    (dict(weight=torch.tensor([1.0, -1.0, 1.0, 1.0])), ValueError, "weight must be finite and >= 0"),
    (dict(weight=_nan(0)), ValueError, "weight must be finite and >= 0"),
    (dict(target=torch.zeros(5)), ValueError, "target must have the shape of mu"),
    (dict(log_var=torch.zeros(4, 1)), ValueError, "log_var must have the shape of mu"),
    (dict(weight=torch.zeros(3)), ValueError, "weight of shape"),
    (dict(target_var=torch.zeros(2, 4)), ValueError, "target_var of shape"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(target=[0.0, 0.0, 0.0, 0.0]), TypeError, "target must be a tensor"),
    (dict(mu=torch.zeros(4, dtype=torch.int64)), TypeError, "mu must be float"),
    (dict(weight=torch.zeros(4, device="meta")), ValueError, "weight is on meta"),
])
def test_bad_input(backend, kwargs, exc, words):
    args = dict(mu=X, log_var=X, target=X)
    args.update(kwargs)
    with pytest.raises(exc, match=words):
        lk.uncertainty_interaction_loss(args.pop("mu"), args.pop("log_var"), args.pop("target"), backend=backend,
                                        **args)


def test_bad_backend():
    with pytest.raises(ValueError, match="unknown backend"):
        lk.uncertainty_interaction_loss(X, X, X, backend="fast")
    with pytest.raises(ValueError, match="cuda"):
        lk.uncertainty_interaction_loss(X, X, X, backend="cuda")


def test_reference_function_and_module():
    gen = torch.Generator().manual_seed(12)
    mu, lv, t, tv, w = make((9,), gen, with_tv=True, with_w=True)
    want, _, _ = oracle(mu, lv, t, tv, w, "sum")
    got = uncertainty_interaction_loss_reference(mu, lv, t, target_var=tv, weight=w, reduction="sum")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    m = lk.UncertaintyInteractionLoss(reduction="sum")
    torch.testing.assert_close(m(mu, lv, t, tv, w), want, rtol=1e-12, atol=1e-12)
    assert "sum" in repr(m)


# ------------------------------------------------------------------------------------------------
# custom op / torch.compile
# ------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not HAS_CPU, reason="cpu backend not built")
@pytest.mark.parametrize("reduction", [0, 1])
def test_opcheck_custom_op(reduction):
    gen = torch.Generator().manual_seed(13)
    mu, lv, t, tv, w = make((3, 4), gen, dtype=torch.float32, with_tv=True, with_w=True)
    mu.requires_grad_()
    lv.requires_grad_()
    torch.library.opcheck(torch.ops.loupe_kernels.uil_forward.default, (mu, lv, t, tv, w, reduction, True, "cpu"))
    torch.library.opcheck(torch.ops.loupe_kernels.uil_forward.default, (mu, lv, t, None, None, reduction, True, "cpu"))


@pytest.mark.skipif(not HAS_CPU, reason="cpu backend not built")
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_through_op(reduction):
    gen = torch.Generator().manual_seed(14)
    mu, lv, t, tv, _ = make((5, 6), gen, dtype=torch.float32, with_tv=True)
    mu.requires_grad_()
    lv.requires_grad_()

    def loss(mu, lv):
        out = lk.uncertainty_interaction_loss(mu * 2.0, lv, t, target_var=tv, reduction=reduction, backend="cpu")
        return out.sum() * 3.0

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    got = compiled(mu, lv)
    g = torch.autograd.grad(got, (mu, lv))
    want = loss(mu, lv)
    w = torch.autograd.grad(want, (mu, lv))
    torch.testing.assert_close(got, want)
    for a, b in zip(g, w):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_zero_dim_inputs(backend):
    gen = torch.Generator().manual_seed(15)
    mu = torch.randn(6, 8, generator=gen, dtype=torch.float64)[:, ::2]
    lv = torch.randn(4, 6, generator=gen, dtype=torch.float64).t()
    t = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    for reduction in REDUCTIONS:
        got = lk.uncertainty_interaction_loss(mu, lv, t, reduction=reduction, backend=backend)
        want, _, _ = oracle(mu, lv, t, reduction=reduction)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    s = torch.tensor(0.3, dtype=torch.float64)
    out, dmu, dlv = run(backend, s, torch.tensor(-1.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64),
                        None, None, "none")
    want, wmu, wlv = oracle(s, torch.tensor(-1.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64),
                            reduction="none")
    assert out.shape == () and dmu.shape == ()
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dmu, wmu, rtol=1e-12, atol=1e-12)
