"""uncertainty_interaction_loss, Triton backend, against a float64 oracle and the reference.

Runs under the Triton interpreter (TRITON_INTERPRET=1 set by the runner) with small shapes, or on a GPU.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from _kernel_testing import require_triton_runs, uil_inputs
from _kernel_testing import uil_oracle as oracle
from _kernel_testing import uil_run as run

DEV = require_triton_runs()

import loupe_kernels as lk  # noqa: E402

REDUCTIONS = ["mean", "sum", "none"]
FLAGS = list(itertools.product([False, True], [False, True]))


def make(shape, seed, dtype, with_tv, with_w):
    """uil_inputs from a generator seeded with `seed`, on DEV."""
    xs = uil_inputs(shape, torch.Generator().manual_seed(seed), dtype, with_tv=with_tv, with_w=with_w)
    return tuple(None if x is None else x.to(DEV) for x in xs)


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
