"""Triton kernels of the Shapley coalition sampler (METHOD section 5); imported lazily.

One program per (game g, subset m, block of BLOCK_K samples); the lanes are the samples. Each lane
draws its coalition with ``tl.random.philox(seed, k, m, g, b)`` (the pinned Philox4x32-10 draw,
identical to the reference and the C++ kernel) by selection sampling over the players in order,
and folds every member into its running masked max ``mC [BLOCK_K, Lq]`` as it is taken: nothing of
size [K, P] is materialised. ``v(C u {i})`` and ``v(C u S)`` then follow from element-wise maxima.
The per-sample values ``G(C)`` ``[G, M, K]`` are written out; mean and standard error are reduced
by PyTorch. The coalition kernel (the same draw, writing C) serves the cross-backend tests.

Supports the max-sim game with ``query_players=False``; the pooled game and the region-phrase
game run on the other backends.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

__all__ = ["maxsim", "coalitions"]


@triton.jit
def _stream_word(seed, kvec, m32, g32, w):
    """Word w (scalar) of the streams of the lanes' counters (k, m, g, .)."""
    b = (w // 4).to(tl.uint32)
    j = w % 4
    u0, u1, u2, u3 = tl.random.philox(seed, kvec, m32, g32, kvec * 0 + b)
    return tl.where(j == 0, u0, tl.where(j == 1, u1, tl.where(j == 2, u2, u3)))


@triton.jit
def _shapley_kernel(sim_ptr, qm_ptr, S_ptr, pm_ptr, coal_ptr, samples_ptr, seed, K, M, Lq, n,
                    SCHED: tl.constexpr, HAS_SIM: tl.constexpr, WRITE_C: tl.constexpr,
                    ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr):
    pid = tl.program_id(0)
    kb = tl.program_id(1)
    g = pid // M
    m = pid % M
    offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = offs_k < K
    # pool size: valid players outside S
    npool = 0
    for p0 in range(0, n, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        pmask = offs_p < n
        s = tl.load(S_ptr + pid * n + offs_p, mask=pmask, other=1)
        v = tl.load(pm_ptr + g * n + offs_p, mask=pmask, other=0)
        npool += tl.sum(((v != 0) & (s == 0)).to(tl.int32), axis=0)
    npr = (npool + 1).to(tl.uint64)
    kvec = offs_k.to(tl.uint32)
    zero = kvec * 0
    m32 = zero + m.to(tl.uint32)
    g32 = zero + g.to(tl.uint32)
    u0, _a, _b, _c = tl.random.philox(seed, kvec, m32, g32, zero)
    if SCHED == 0:
        r = ((u0.to(tl.uint64) * npr) >> 32).to(tl.int64)
    else:
        o0, _d, _e, _f = tl.random.philox(seed, zero, m32, g32, zero)
        off = (o0.to(tl.uint64) * npr) >> 32
        r = ((offs_k.to(tl.uint64) + off) % npr).to(tl.int64)
    c = tl.zeros([BLOCK_K], dtype=tl.int64)
    t = npool * 0
    if HAS_SIM:
        offs_q = tl.arange(0, BLOCK_Q)
        qin = offs_q < Lq
        qv = (tl.load(qm_ptr + g * Lq + offs_q, mask=qin, other=0) != 0) & qin
        nq = tl.maximum(tl.sum(qv.to(ACC), axis=0), 1.0)
        mC = tl.full([BLOCK_K, BLOCK_Q], float("-inf"), ACC)
        sS = tl.full([BLOCK_Q], float("-inf"), ACC)
        s_cnt = npool * 0
    for p in range(0, n):
        sp = tl.load(S_ptr + pid * n + p) != 0
        vp = tl.load(pm_ptr + g * n + p) != 0
        inpool = vp & (sp == 0)
        u = _stream_word(seed, kvec, m32, g32, 1 + t)
        rem = (npool - t).to(tl.uint64)
        need = (r - c).to(tl.uint64)
        take = inpool & ((u.to(tl.uint64) * rem) < (need << 32))
        c += take.to(tl.int64)
        t += inpool.to(tl.int32)
        if WRITE_C:
            tl.store(coal_ptr + (pid * K + offs_k) * n + p, take.to(tl.int8), mask=kmask)
        if HAS_SIM:
            col = tl.load(sim_ptr + g * Lq * n + offs_q * n + p, mask=qin, other=float("-inf")).to(ACC)
            mC = tl.where(take[:, None], tl.maximum(mC, col[None, :]), mC)
            sS = tl.where(sp, tl.maximum(sS, col), sS)
            s_cnt += sp.to(tl.int32)
    if HAS_SIM:
        vC = tl.sum(tl.where(qv[None, :], mC, 0.0), axis=1) / nq
        vC = tl.where(c > 0, vC, 0.0)
        acc = tl.sum(tl.where(qv[None, :], tl.maximum(mC, sS[None, :]), 0.0), axis=1) / nq
        for p in range(0, n):
            sp = tl.load(S_ptr + pid * n + p) != 0
            col = tl.load(sim_ptr + g * Lq * n + offs_q * n + p, mask=qin, other=float("-inf")).to(ACC)
            vi = tl.sum(tl.where(qv[None, :], tl.maximum(mC, col[None, :]), 0.0), axis=1) / nq
            acc = acc - tl.where(sp, vi, 0.0)
        acc = acc + (s_cnt - 1).to(ACC) * vC
        tl.store(samples_ptr + pid * K + offs_k, acc, mask=kmask)


def _blocks(K: int, n: int):
    return max(16, min(64, triton.next_power_of_2(K))), max(16, min(256, triton.next_power_of_2(n)))


def _seed_arg(seed: int) -> int:
    return int(seed)


def coalitions(subsets: torch.Tensor, player_mask: torch.Tensor, K: int, seed: int, schedule: int) -> torch.Tensor:
    G, M, P = subsets.shape
    out = torch.zeros((G, M, K, P), dtype=torch.int8, device=subsets.device)
    if out.numel() == 0:
        return out.bool()
    BLOCK_K, BLOCK_P = _blocks(K, P)
    S8 = subsets.contiguous().view(torch.uint8)
    pm8 = player_mask.contiguous().view(torch.uint8)
    grid = (G * M, math.ceil(K / BLOCK_K))
    _shapley_kernel[grid](S8, S8, S8, pm8, out, out, _seed_arg(seed), K, M, 1, P,
                          SCHED=schedule, HAS_SIM=False, WRITE_C=True, ACC=tl.float32,
                          BLOCK_K=BLOCK_K, BLOCK_Q=16, BLOCK_P=BLOCK_P)
    return out.bool()


def maxsim(sim, query_mask, subsets, player_mask, query_players, K, seed, schedule):
    """Per-sample values in the kernel, then mean and standard error (max-sim game, keys as players)."""
    from .shapley import _stats, _out_dtype
    if query_players:
        raise NotImplementedError("the triton backend implements the max-sim game with query_players=False")
    G, Lq, n = sim.shape
    M = subsets.shape[1]
    dt = _out_dtype(sim.dtype)
    samples = torch.empty((G, M, K), dtype=dt, device=sim.device)
    if samples.numel():
        BLOCK_K, BLOCK_P = _blocks(K, n)
        BLOCK_Q = max(16, triton.next_power_of_2(Lq))
        grid = (G * M, math.ceil(K / BLOCK_K))
        _shapley_kernel[grid](sim.contiguous(), query_mask.contiguous().view(torch.uint8),
                              subsets.contiguous().view(torch.uint8), player_mask.contiguous().view(torch.uint8),
                              samples, samples, _seed_arg(seed), K, M, Lq, n,
                              SCHED=schedule, HAS_SIM=True, WRITE_C=False,
                              ACC=tl.float64 if dt == torch.float64 else tl.float32,
                              BLOCK_K=BLOCK_K, BLOCK_Q=BLOCK_Q, BLOCK_P=BLOCK_P)
    return _stats(samples, dt)
