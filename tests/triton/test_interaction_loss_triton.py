"""uncertainty_interaction_loss, Triton backend, against a float64 oracle and the reference.

Runs under the Triton interpreter (TRITON_INTERPRET=1 set by the runner) with small shapes, or on a GPU.
"""
from __future__ import annotations

import itertools
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET", "0") != "1" and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 (set before triton is imported) or a CUDA device",
                allow_module_level=True)
pytest.importorskip("triton")

import loupe_kernels as lk  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
REDUCTIONS = ["mean", "sum", "none"]
FLAGS = list(itertools.product([False, True], [False, True]))


def oracle(mu, lv, t, tv=None, w=None, reduction="mean"):
    mu, lv, t = mu.double(), lv.double(), t.double()
    tv = torch.zeros_like(mu) if tv is None else tv.double().expand(mu.shape)
    w = torch.ones_like(mu) if w is None else w.double().expand(mu.shape)
    live = w != 0
    t = torch.where(live, t, mu)
    tv = torch.where(live, tv, torch.zeros_like(tv))
    var = torch.exp(lv) + tv
    r = t - mu
    out = [0.5 * (r * r / var + torch.log(var)), -r / var, 0.5 * torch.exp(lv) / var * (1 - r * r / var)]
    out = [torch.where(live, w * x, torch.zeros_like(x)) for x in out]
    n = max(mu.numel(), 1)
    if reduction == "none":
        return tuple(out)
    if reduction == "sum":
        return out[0].sum(), out[1], out[2]
    return out[0].sum() / n, out[1] / n, out[2] / n


def make(shape, seed, dtype, with_tv, with_w):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(shape, generator=g, dtype=torch.float64)
    lv = 3 * torch.randn(shape, generator=g, dtype=torch.float64)
    t = mu + torch.randn(shape, generator=g, dtype=torch.float64) * torch.exp(0.5 * lv) * 1.5
    tv = torch.rand(shape, generator=g, dtype=torch.float64) * 0.5 if with_tv else None
    w = None
    if with_w:
        w = torch.rand(shape, generator=g, dtype=torch.float64) * 2
        w[w < 0.3] = 0.0
    return tuple(None if x is None else x.to(dtype).to(DEV) for x in (mu, lv, t, tv, w))


def run(backend, mu, lv, t, tv, w, reduction, grad_out):
    mu = mu.detach().clone().requires_grad_()
    lv = lv.detach().clone().requires_grad_()
    out = lk.uncertainty_interaction_loss(mu, lv, t, target_var=tv, weight=w, reduction=reduction, backend=backend)
    dmu, dlv = torch.autograd.grad(out, (mu, lv), grad_out.to(out.dtype))
    return out, dmu, dlv


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: f"tv{int(f[0])}w{int(f[1])}")
def test_triton_matches_oracle(dtype, reduction, flags):
    shape = (3, 700)  # more than one program of 1024 elements
    mu, lv, t, tv, w = make(shape, 1, dtype, *flags)
    g = torch.Generator().manual_seed(2)
    grad_out = (torch.rand(shape, generator=g, dtype=torch.float64) + 0.5 if reduction == "none"
                else torch.tensor(1.3, dtype=torch.float64)).to(DEV)
    want = oracle(mu.cpu(), lv.cpu(), t.cpu(), None if tv is None else tv.cpu(), None if w is None else w.cpu(),
                  reduction)
    want = (want[0], want[1] * grad_out.cpu(), want[2] * grad_out.cpu())
    got = run("triton", mu, lv, t, tv, w, reduction, grad_out)
    ref = run("reference", mu, lv, t, tv, w, reduction, grad_out)
    assert got[0].dtype == dtype and got[0].shape == want[0].shape
    for gg, rr, oo in zip(got, ref, want):
        err = (gg.double().cpu() - oo).abs().max().item()
        if dtype == torch.float64:
            assert err <= 1e-12 * max(oo.abs().max().item(), 1.0), err
        else:
            ref_err = (rr.double().cpu() - oo).abs().max().item()
            assert err <= 2 * ref_err + torch.finfo(dtype).eps * oo.abs().max().item(), (err, ref_err)


@pytest.mark.parametrize("with_tv", [False, True])
def test_triton_extremes_finite(with_tv):
    lv = torch.tensor([-20.0, -20.0, -13.8, 0.0, 19.5, 20.0, 20.0, -20.0])
    r = torch.tensor([1e3, 1e-9, 1e6, 1e10, 1e14, 0.0, 1e18, 0.0])
    mu = torch.linspace(-3, 3, 8)
    t = mu + r
    tv = torch.tensor([0.0, 1e-12, 1e-3, 2.0, 0.0, 1e-6, 3.0, 1e-30]) if with_tv else None
    for reduction in REDUCTIONS:
        g = torch.ones(8) if reduction == "none" else torch.tensor(1.0)
        out = run("triton", mu.to(DEV), lv.to(DEV), t.to(DEV), None if tv is None else tv.to(DEV), None,
                  reduction, g.to(DEV))
        for x in out:
            assert torch.isfinite(x).all()


def test_triton_errors_and_masked_nan():
    x = torch.zeros(5, device=DEV)
    t = torch.zeros(5, device=DEV)
    t[2] = float("nan")
    with pytest.raises(ValueError, match="target contains NaN"):
        lk.uncertainty_interaction_loss(x, x, t, backend="triton")
    with pytest.raises(ValueError, match="target_var must be >= 0"):
        lk.uncertainty_interaction_loss(x, x, x, target_var=torch.full((5,), -1.0, device=DEV), backend="triton")
    w = torch.ones(5, device=DEV)
    w[2] = 0
    out = lk.uncertainty_interaction_loss(x, x, t, weight=w, reduction="none", backend="triton")
    assert torch.isfinite(out).all() and out[2] == 0
