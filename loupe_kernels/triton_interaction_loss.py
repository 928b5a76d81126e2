"""Triton kernels of the uncertainty-weighted interaction loss (METHOD section 8); imported lazily.

One program per block of BLOCK elements, one pass: it loads mu, log_var, target (and target_var,
weight), computes the element loss in float32 (float64 for float64 input) and either writes it
(reduction none) or writes its block's partial sum plus the gradients of the reduced loss (scaled
by weight and 1/N). The partial sums and the per-block status words are reduced by PyTorch in a
fixed order (no atomics: deterministic). The backward of reduction none recomputes the element.
Status bits as in the C++ kernel: 1 target not finite where weight != 0, 2 target_var < 0,
4 target_var not finite where weight != 0, 8 weight negative or not finite.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import work_dtype

__all__ = ["forward", "backward"]

BLOCK = 1024


@triton.jit
def _not_finite(x):
    d = x - x
    return d != d


@triton.jit
def _element(m, v, t, s, HAS_TV: tl.constexpr):
    r = t - m
    if HAS_TV:
        ev = tl.exp(v)
        var = ev + s
        inv = 1.0 / var
        rs = r * inv
        q = r * rs
        loss = 0.5 * (q + tl.log(var))
        dm = -rs
        dv = 0.5 * (ev * inv) * (1.0 - q)
    else:
        e = tl.exp(-0.5 * v)
        z = r * e
        z2 = z * z
        loss = 0.5 * (z2 + v)
        dm = -z * e
        dv = 0.5 * (1.0 - z2)
    return loss, dm, dv


@triton.jit
def _uil_kernel(mu_ptr, lv_ptr, t_ptr, tv_ptr, w_ptr, gin_ptr, loss_ptr, gmu_ptr, gv_ptr, part_ptr, status_ptr,
                n, MODE: tl.constexpr, MEAN: tl.constexpr, HAS_TV: tl.constexpr, HAS_W: tl.constexpr,
                F64: tl.constexpr, BLOCK: tl.constexpr):
    # MODE 0 forward none, 1 forward reduce, 2 forward reduce + gradients, 3 backward none.
    # MEAN: the gradients of MODE 2 are scaled by 1/n, computed here in the accumulator type (a float
    # kernel argument would be an fp32 scalar on a GPU, wrong for float64: issue 20).
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    if F64:
        acc = tl.float64
    else:
        acc = tl.float32
    m = tl.load(mu_ptr + offs, mask=mask, other=0.0).to(acc)
    v = tl.load(lv_ptr + offs, mask=mask, other=0.0).to(acc)
    t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(acc)
    if HAS_TV:
        s = tl.load(tv_ptr + offs, mask=mask, other=0.0).to(acc)
    else:
        s = tl.zeros_like(m)
    if HAS_W:
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(acc)
        live = w != 0.0
        bad_w = tl.max((_not_finite(w) | (w < 0.0)).to(tl.int32), axis=0)
    else:
        w = tl.full(m.shape, 1.0, acc)
        live = mask
        bad_w = 0
    live = live & mask
    bad_t = tl.max((live & _not_finite(t)).to(tl.int32), axis=0)
    if HAS_TV:
        bad_sn = tl.max(((s < 0.0) & mask).to(tl.int32), axis=0)
        bad_s = tl.max((live & _not_finite(s)).to(tl.int32), axis=0)
    else:
        bad_sn = 0
        bad_s = 0
    t = tl.where(live, t, m)  # a dead element's data never enters the arithmetic
    s = tl.where(live, s, 0.0)
    loss, dm, dv = _element(m, v, t, s, HAS_TV)
    zero = tl.zeros_like(loss)
    loss = tl.where(live, w * loss, zero)
    dm = tl.where(live, w * dm, zero)
    dv = tl.where(live, w * dv, zero)
    if MODE == 0:
        tl.store(loss_ptr + offs, loss.to(loss_ptr.dtype.element_ty), mask=mask)
    if MODE == 1 or MODE == 2:
        tl.store(part_ptr + pid, tl.sum(loss, axis=0))
    if MODE == 2:
        if MEAN:
            inv_n = 1.0 / n.to(acc)
            dm = dm * inv_n
            dv = dv * inv_n
        tl.store(gmu_ptr + offs, dm.to(gmu_ptr.dtype.element_ty), mask=mask)
        tl.store(gv_ptr + offs, dv.to(gv_ptr.dtype.element_ty), mask=mask)
    if MODE == 3:
        g = tl.load(gin_ptr + offs, mask=mask, other=0.0).to(acc)
        tl.store(gmu_ptr + offs, (dm * g).to(gmu_ptr.dtype.element_ty), mask=mask)
        tl.store(gv_ptr + offs, (dv * g).to(gv_ptr.dtype.element_ty), mask=mask)
    if MODE != 3:
        tl.store(status_ptr + pid, bad_t | (bad_sn << 1) | (bad_s << 2) | (bad_w << 3))


def _launch(mode, mu, lv, t, tv, w, gin, loss, gmu, gv, part, status, mean=False):
    n = mu.numel()
    grid = (max(triton.cdiv(n, BLOCK), 1),)
    dummy = mu
    _uil_kernel[grid](mu, lv, t, tv if tv is not None else dummy, w if w is not None else dummy,
                      gin if gin is not None else dummy, loss if loss is not None else dummy,
                      gmu if gmu is not None else dummy, gv if gv is not None else dummy,
                      part if part is not None else dummy, status if status is not None else dummy,
                      n, MODE=mode, MEAN=mean, HAS_TV=tv is not None, HAS_W=w is not None,
                      F64=mu.dtype == torch.float64, BLOCK=BLOCK)


def forward(mu, log_var, target, target_var, weight, red: int, need_grad: bool):
    """(loss, grad_mu, grad_log_var, status) with the contract of the other backends."""
    n = mu.numel()
    nprog = max(triton.cdiv(n, BLOCK), 1)
    work = work_dtype(mu.dtype)
    status = torch.zeros(nprog, dtype=torch.int32, device=mu.device)
    write_grad = need_grad and red != 0
    gshape = mu.shape if write_grad else (0,)
    gmu = torch.empty(gshape, dtype=work, device=mu.device)
    gv = torch.empty(gshape, dtype=work, device=mu.device)
    if n == 0:
        loss = torch.empty_like(mu) if red == 0 else torch.zeros((), dtype=mu.dtype, device=mu.device)
        return loss, gmu, gv, torch.zeros((), dtype=torch.int64, device=mu.device)
    if red == 0:
        loss = torch.empty_like(mu)
        _launch(0, mu, log_var, target, target_var, weight, None, loss, None, None, None, status)
    else:
        part = torch.empty(nprog, dtype=work, device=mu.device)
        _launch(2 if write_grad else 1, mu, log_var, target, target_var, weight, None, None,
                gmu if write_grad else None, gv if write_grad else None, part, status, mean=red == 1)
        total = part.double().sum()
        loss = (total / n if red == 1 else total).to(mu.dtype)
    return loss, gmu, gv, _or_reduce(status)


def _or_reduce(status: torch.Tensor) -> torch.Tensor:
    """OR of the per-program status words, as a 0-d int64 tensor on their device (no host sync)."""
    bits = 1 << torch.arange(4, dtype=status.dtype, device=status.device)   # 1, 2, 4, 8 (no host-to-device copy)
    return (((status[:, None] & bits) != 0).any(0).to(torch.int64) * bits.to(torch.int64)).sum()


def backward(grad, mu, log_var, target, target_var, weight):
    """(d_mu, d_log_var) of reduction none, in the input dtype."""
    dmu, dv = torch.empty_like(mu), torch.empty_like(mu)
    if mu.numel() == 0:
        return dmu, dv
    _launch(3, mu, log_var, target, target_var, weight, grad, None, dmu, dv, None, None)
    return dmu, dv
