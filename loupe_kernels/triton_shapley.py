"""Triton kernels of the Shapley coalition sampler (METHOD section 5); imported lazily.

One program per (game g, subset m, block of BLOCK_K samples); the lanes are the samples. Each lane
draws its coalition with ``tl.random.philox(seed, k, m, g, b)`` (the pinned Philox4x32-10 draw,
identical to the reference and the C++ kernel) by selection sampling over the players in order:
the four words of the current block are kept in registers and the next block is computed only when
the pool position moves past it. Every member is folded into the lane's running state as it is
taken, so nothing of size [K, P] is materialised:

- max-sim game (also with ``query_players=True``, the region-phrase game): the running masked max
  ``mC [BLOCK_K, BLOCK_Q]`` over the key players in C (and, for the region-phrase game, the query
  players in C as a bit tile). ``v(C u {i})`` and ``v(C u S)`` follow from element-wise maxima.

Accumulation is in float32 (float64 for float64 input). The per-sample values ``G(C)``
``[G, M, K]`` are written out and returned; ``loupe_kernels.shapley`` reduces them to the mean and
standard error. The coalition kernel
(the same draw, writing C) serves the cross-backend tests.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import triton_acc, work_dtype

__all__ = ["maxsim_samples", "coalitions"]


# --------------------------------------------------------------------------------------------
# the pinned draw
# --------------------------------------------------------------------------------------------
@triton.jit
def _pool_size(S_ptr, pm_ptr, pid, g, P, BLOCK_P: tl.constexpr):
    """Number of valid players outside S of task (g, m) (scalar int32)."""
    npool = 0
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        pmask = offs_p < P
        s = tl.load(S_ptr + pid * P + offs_p, mask=pmask, other=1)
        v = tl.load(pm_ptr + g * P + offs_p, mask=pmask, other=0)
        npool += tl.sum(((v != 0) & (s == 0)).to(tl.int32), axis=0)
    return npool


@triton.jit
def _draw_init(seed, npool, offs_k, m, g, SCHED: tl.constexpr):
    """Counters of the lanes, the coalition sizes r and the words of block 0 of each stream."""
    npr = (npool + 1).to(tl.uint64)
    kvec = offs_k.to(tl.uint32)
    zero = kvec * 0
    m32 = zero + m.to(tl.uint32)
    g32 = zero + g.to(tl.uint32)
    w0, w1, w2, w3 = tl.random.philox(seed, kvec, m32, g32, zero)
    if SCHED == 0:
        r = ((w0.to(tl.uint64) * npr) >> 32).to(tl.int64)
    else:
        o0, _a, _b, _c = tl.random.philox(seed, zero, m32, g32, zero)
        off = (o0.to(tl.uint64) * npr) >> 32
        r = ((offs_k.to(tl.uint64) + off) % npr).to(tl.int64)
    return kvec, m32, g32, r, w0, w1, w2, w3


@triton.jit
def _draw_start(S_ptr, pm_ptr, seed, K, M, P, SCHED: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr):
    """Start of every program: its task (g, m) and lanes (samples k), and the state of the draw."""
    pid = tl.program_id(0)
    kb = tl.program_id(1)
    g = pid // M
    m = pid % M
    offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = offs_k < K
    npool = _pool_size(S_ptr, pm_ptr, pid, g, P, BLOCK_P)
    kvec, m32, g32, r, w0, w1, w2, w3 = _draw_init(seed, npool, offs_k, m, g, SCHED)
    c = tl.zeros([BLOCK_K], dtype=tl.int64)
    t = npool * 0
    blk = npool * 0
    return pid, g, offs_k, kmask, npool, kvec, m32, g32, r, c, t, blk, w0, w1, w2, w3


@triton.jit
def _draw_step(seed, kvec, m32, g32, inpool, npool, t, c, r, blk, w0, w1, w2, w3):
    """Selection-sampling decision of the next player (pool position t when ``inpool``).

    Word ``1 + t`` of each lane's stream decides: take iff ``u * rem < (r - c) * 2^32``. Returns the
    decisions and the updated state (t, c, current block index and its four words).
    """
    w = 1 + t
    b = w // 4
    if b != blk:
        w0, w1, w2, w3 = tl.random.philox(seed, kvec, m32, g32, kvec * 0 + b.to(tl.uint32))
        blk = b
    j = w % 4
    u = tl.where(j == 0, w0, tl.where(j == 1, w1, tl.where(j == 2, w2, w3)))
    rem = (npool - t).to(tl.uint64)
    need = (r - c).to(tl.uint64)
    take = inpool & ((u.to(tl.uint64) * rem) < (need << 32))
    c += take.to(tl.int64)
    t += inpool.to(tl.int32)
    return take, t, c, blk, w0, w1, w2, w3


@triton.jit
def _coalitions_kernel(S_ptr, pm_ptr, coal_ptr, seed, K, M, P,
                       SCHED: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr):
    pid, g, offs_k, kmask, npool, kvec, m32, g32, r, c, t, blk, w0, w1, w2, w3 = _draw_start(
        S_ptr, pm_ptr, seed, K, M, P, SCHED, BLOCK_K, BLOCK_P)
    for p in range(0, P):
        sp = tl.load(S_ptr + pid * P + p) != 0
        vp = tl.load(pm_ptr + g * P + p) != 0
        take, t, c, blk, w0, w1, w2, w3 = _draw_step(seed, kvec, m32, g32, vp & (sp == 0), npool, t, c, r,
                                                     blk, w0, w1, w2, w3)
        tl.store(coal_ptr + (pid * K + offs_k) * P + p, take.to(tl.int8), mask=kmask)


# --------------------------------------------------------------------------------------------
# max-sim game (keys as players, or queries and keys as players: the region-phrase game)
# --------------------------------------------------------------------------------------------
@triton.jit
def _maxsim_value(best, inq, keys, ACC: tl.constexpr):
    """Mean over the query tokens marked in ``inq`` of ``best``; 0 without keys or query tokens."""
    cnt = tl.sum(inq.to(ACC), axis=1)
    tot = tl.sum(tl.where(inq, best, 0.0), axis=1)
    return tl.where((keys > 0) & (cnt > 0), tot / tl.maximum(cnt, 1.0), 0.0)


@triton.jit
def _maxsim_kernel(sim_ptr, gidx_ptr, qm_ptr, S_ptr, pm_ptr, samples_ptr, seed, K, M, Lq, n,
                   SCHED: tl.constexpr, QP: tl.constexpr, HAS_INDEX: tl.constexpr, ACC: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr):
    if QP:
        qoff = Lq          # players 0..Lq-1 are the query tokens, then the n keys
    else:
        qoff = 0
    P = qoff + n
    pid, g, offs_k, kmask, npool, kvec, m32, g32, r, c, t, blk, w0, w1, w2, w3 = _draw_start(
        S_ptr, pm_ptr, seed, K, M, P, SCHED, BLOCK_K, BLOCK_P)
    offs_q = tl.arange(0, BLOCK_Q)
    qin = offs_q < Lq
    if HAS_INDEX:
        row = tl.load(gidx_ptr + g)   # game g plays on sim[game_index[g]]
    else:
        row = g.to(tl.int64)
    sim_g = sim_ptr + row * Lq * n + offs_q * n
    mC = tl.full([BLOCK_K, BLOCK_Q], float("-inf"), ACC)
    sS = tl.full([BLOCK_Q], float("-inf"), ACC)
    sq = offs_q < 0                      # query players of S
    s_cnt = npool * 0                    # |S|
    s_keys = npool * 0                   # key players in S
    if QP:
        inq = (offs_k[:, None] < 0) & (offs_q[None, :] < 0)   # query players in C
        for p in range(0, qoff):
            sp = tl.load(S_ptr + pid * P + p) != 0
            vp = tl.load(pm_ptr + g * P + p) != 0
            take, t, c, blk, w0, w1, w2, w3 = _draw_step(seed, kvec, m32, g32, vp & (sp == 0), npool, t, c, r,
                                                         blk, w0, w1, w2, w3)
            hit = offs_q == p
            inq = inq | (take[:, None] & hit[None, :])
            sq = sq | (hit & sp)
            s_cnt += sp.to(tl.int32)
    else:
        qv = (tl.load(qm_ptr + g * Lq + offs_q, mask=qin, other=0) != 0) & qin
        inq = (offs_k[:, None] >= 0) & qv[None, :]
    nk = tl.zeros([BLOCK_K], dtype=tl.int32)   # key players in C
    for p in range(qoff, P):
        sp = tl.load(S_ptr + pid * P + p) != 0
        vp = tl.load(pm_ptr + g * P + p) != 0
        take, t, c, blk, w0, w1, w2, w3 = _draw_step(seed, kvec, m32, g32, vp & (sp == 0), npool, t, c, r,
                                                     blk, w0, w1, w2, w3)
        col = tl.load(sim_g + (p - qoff), mask=qin, other=float("-inf")).to(ACC)
        mC = tl.where(take[:, None], tl.maximum(mC, col[None, :]), mC)
        sS = tl.where(sp, tl.maximum(sS, col), sS)
        nk += take.to(tl.int32)
        s_cnt += sp.to(tl.int32)
        s_keys += sp.to(tl.int32)
    vC = _maxsim_value(mC, inq, nk, ACC)
    acc = _maxsim_value(tl.maximum(mC, sS[None, :]), inq | sq[None, :], nk + s_keys, ACC)
    if QP:
        for p in range(0, qoff):
            sp = tl.load(S_ptr + pid * P + p) != 0
            if sp:
                acc -= _maxsim_value(mC, inq | (offs_q == p)[None, :], nk, ACC)
    for p in range(qoff, P):
        sp = tl.load(S_ptr + pid * P + p) != 0
        if sp:
            col = tl.load(sim_g + (p - qoff), mask=qin, other=float("-inf")).to(ACC)
            acc -= _maxsim_value(tl.maximum(mC, col[None, :]), inq, nk + 1, ACC)
    acc += (s_cnt - 1).to(ACC) * vC
    tl.store(samples_ptr + pid * K + offs_k, acc, mask=kmask)


# --------------------------------------------------------------------------------------------
# launchers (validated, contiguous inputs; called from loupe_kernels.shapley)
# --------------------------------------------------------------------------------------------
def _block_k(K: int) -> int:
    return max(16, min(64, triton.next_power_of_2(K)))


def _block_p(P: int) -> int:
    return max(16, min(256, triton.next_power_of_2(P)))


def _u8(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def coalitions(subsets: torch.Tensor, player_mask: torch.Tensor, K: int, seed: int, schedule: int) -> torch.Tensor:
    """The coalitions of the pinned draw, bool ``[G, M, K, P]``."""
    G, M, P = subsets.shape
    out = torch.zeros((G, M, K, P), dtype=torch.int8, device=subsets.device)
    if out.numel() == 0:
        return out.bool()
    BLOCK_K = _block_k(K)
    grid = (G * M, math.ceil(K / BLOCK_K))
    _coalitions_kernel[grid](_u8(subsets), _u8(player_mask), out, int(seed), K, M, P,
                             SCHED=schedule, BLOCK_K=BLOCK_K, BLOCK_P=_block_p(P))
    return out.bool()


def maxsim_samples(sim: torch.Tensor, query_mask: torch.Tensor, subsets: torch.Tensor, player_mask: torch.Tensor,
                   query_players: bool, K: int, seed: int, schedule: int,
                   game_index: torch.Tensor | None = None) -> torch.Tensor:
    """Max-sim game (``query_players``: the region-phrase game): the per-sample values ``[G, M, K]``
    (float32, float64 for float64 input). ``game_index`` (int64 [G]): game g plays on
    ``sim[game_index[g]]``."""
    _, Lq, n = sim.shape
    G, M, P = subsets.shape
    dt = work_dtype(sim.dtype)
    samples = torch.empty((G, M, K), dtype=dt, device=sim.device)
    if samples.numel():
        BLOCK_Q = max(16, triton.next_power_of_2(Lq))
        # the running maxima mC [BLOCK_K, BLOCK_Q] stay at or under 4096 registers-resident elements
        # (sm_90 builds: 72-133 registers a thread, no spills, for BLOCK_Q up to 64)
        BLOCK_K = max(16, min(_block_k(K), 4096 // BLOCK_Q))
        grid = (G * M, math.ceil(K / BLOCK_K))
        has_index = game_index is not None
        gidx = game_index.contiguous() if has_index else samples  # an unused pointer without an index
        _maxsim_kernel[grid](sim.contiguous(), gidx, _u8(query_mask), _u8(subsets), _u8(player_mask), samples,
                             int(seed), K, M, Lq, n,
                             SCHED=schedule, QP=bool(query_players), HAS_INDEX=has_index, ACC=triton_acc(dt),
                             BLOCK_K=BLOCK_K, BLOCK_Q=BLOCK_Q, BLOCK_P=_block_p(P))
    return samples
