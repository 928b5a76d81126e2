"""Tools to verify Shapley estimators: the pinned coalition draw in numpy, the exact enumerator, and
the plain evaluation of a game on explicit coalitions.

Public, so that users can check any estimator (ours or their own) against the definitions of
METHOD section 5:

- :func:`philox4x32_10`: Philox4x32-10 (Random123) in numpy integer arithmetic.
- :func:`sample_coalitions_reference`: the pinned draw, bit-identical to every backend of
  :func:`loupe_kernels.sample_coalitions`.
- :func:`exact_shapley_interaction`: ``I([S])`` of any game by enumeration (n <= 12), in float64.
- :func:`shapley_from_coalitions`: the per-sample values ``G(C)`` of given coalitions for a game
  evaluated by a function on coalition masks; :func:`maxsim_values` is the library's game in that
  form; :func:`sample_stats` reduces samples to the estimate and its standard error, as the ops do.

The reference backend of :mod:`loupe_kernels.shapley` is built from these functions.
"""
from __future__ import annotations

import math
from itertools import combinations
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from ._common import check_int, sample_stats

__all__ = ["philox4x32_10", "sample_coalitions_reference", "exact_shapley_interaction", "shapley_from_coalitions",
           "maxsim_values", "subset_members", "sample_stats", "SIZE_SCHEDULES", "MAX_EXACT_PLAYERS"]

OP = "shapley_interaction"
MAX_EXACT_PLAYERS = 12
SIZE_SCHEDULES = {"uniform": 0, "round_robin": 1}   # size_schedule name -> the code the kernels take

# Philox4x32-10 constants (Random123)
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF


# --------------------------------------------------------------------------------------------
# Philox4x32-10 in integer arithmetic (numpy uint64 holding 32-bit words)
# --------------------------------------------------------------------------------------------
def philox4x32_10(c0, c1, c2, c3, k0, k1) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One Philox4x32-10 block per element of the (broadcast) counters; key ``(k0, k1)``.

    Returns the four output words as uint64 arrays holding values below 2^32.
    """
    m = np.uint64(_MASK32)
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) & m for c in (c0, c1, c2, c3))
    c0, c1, c2, c3 = np.broadcast_arrays(c0, c1, c2, c3)
    k0, k1 = np.uint64(int(k0) & _MASK32), np.uint64(int(k1) & _MASK32)
    M0, M1, W0, W1 = np.uint64(_M0), np.uint64(_M1), np.uint64(_W0), np.uint64(_W1)
    s32 = np.uint64(32)
    for _ in range(10):
        p0 = M0 * c0  # < 2^64: exact
        p1 = M1 * c2
        c0, c1, c2, c3 = (p1 >> s32) ^ c1 ^ k0, p1 & m, (p0 >> s32) ^ c3 ^ k1, p0 & m
        k0 = (k0 + W0) & m
        k1 = (k1 + W1) & m
    return c0, c1, c2, c3


# --------------------------------------------------------------------------------------------
# the pinned draw, vectorised over (g, m, k) in numpy integer arithmetic
# --------------------------------------------------------------------------------------------
def sample_coalitions_reference(subsets: torch.Tensor, player_mask: torch.Tensor, num_samples: int,
                                seed: int, schedule: int) -> torch.Tensor:
    """The pinned draw of METHOD section 5 in numpy (validated inputs). bool ``[G, M, K, P]``."""
    S = subsets.detach().cpu().numpy()
    pm = player_mask.detach().cpu().numpy()
    G, M, P = S.shape
    K = int(num_samples)
    pool = pm[:, None, :] & ~S                                   # [G, M, P]
    npool = pool.sum(-1).astype(np.int64)                        # [G, M]
    nprime = npool + 1
    rank = np.cumsum(pool, axis=-1).astype(np.int64) - 1         # pool position of each player
    nwords = 1 + (int(npool.max()) if npool.size else 0)
    nblocks = (nwords + 3) // 4
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    kk = np.arange(K, dtype=np.uint64)[None, None, :, None]
    mm = np.arange(M, dtype=np.uint64)[None, :, None, None]
    gg = np.arange(G, dtype=np.uint64)[:, None, None, None]
    bb = np.arange(nblocks, dtype=np.uint64)[None, None, None, :]
    w = philox4x32_10(kk, mm, gg, bb, k0, k1)                   # 4 x [G, M, K, B]
    U = np.stack(w, axis=-1).reshape(G, M, K, 4 * nblocks).astype(np.int64)  # stream words
    u0 = U[..., 0]
    if schedule == SIZE_SCHEDULES["uniform"]:
        r = (u0 * nprime[:, :, None]) >> 32
    else:
        off = (u0[:, :, :1] * nprime[:, :, None]) >> 32
        r = (np.arange(K, dtype=np.int64)[None, None, :] + off) % nprime[:, :, None]
    c = np.zeros((G, M, K), dtype=np.int64)
    out = np.zeros((G, M, K, P), dtype=bool)
    for p in range(P):
        inpool = pool[:, :, p]
        if not inpool.any():
            continue
        t = np.where(inpool, rank[:, :, p], 0)
        u = np.take_along_axis(U, (1 + t)[:, :, None, None], axis=-1)[..., 0]   # [G, M, K]
        rem = (npool - t)[:, :, None]
        take = inpool[:, :, None] & (u * rem < ((r - c) << 32))
        out[..., p] = take
        c += take
    return torch.from_numpy(out).to(subsets.device)


# --------------------------------------------------------------------------------------------
# evaluation of the games on explicit coalitions (vectorised PyTorch)
# --------------------------------------------------------------------------------------------
def subset_members(subsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the members of each S, padded: (idx [G, M, smax] int64, valid [G, M, smax])."""
    s = subsets.sum(-1)
    smax = int(s.max()) if s.numel() else 0
    order = torch.argsort((~subsets).to(torch.int8), dim=-1, stable=True)[..., :smax]
    valid = torch.arange(smax, device=subsets.device)[None, None, :] < s[..., None]
    return order, valid


def maxsim_values(sim: torch.Tensor, qm: torch.Tensor, masks: torch.Tensor, query_players: bool) -> torch.Tensor:
    """v(C) for coalition masks ``[G, X, P]`` -> ``[G, X]``; each term by where(..., -inf).amax."""
    G, Lq, n = sim.shape
    ninf = torch.tensor(float("-inf"), dtype=sim.dtype, device=sim.device)
    zero = torch.zeros((), dtype=sim.dtype, device=sim.device)
    if not query_players:
        best = torch.where(masks[:, :, None, :], sim[:, None], ninf).amax(-1)        # [G, X, Lq]
        best = torch.where(qm[:, None, :] & masks.any(-1)[..., None], best, zero)
        cnt = qm.sum(-1).clamp(min=1).to(sim.dtype)[:, None]
        return best.sum(-1) / cnt
    qin, kin = masks[..., :Lq], masks[..., Lq:]
    best = torch.where(kin[:, :, None, :], sim[:, None], ninf).amax(-1)               # [G, X, Lq]
    best = torch.where(qin & kin.any(-1)[..., None], best, zero)
    cnt = qin.sum(-1).clamp(min=1).to(sim.dtype)
    return best.sum(-1) / cnt


def shapley_from_coalitions(value: Callable[[torch.Tensor], torch.Tensor], subsets: torch.Tensor,
                            coalitions: torch.Tensor, chunk_elems: int = 1 << 24,
                            row_elems: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample values ``G(C)`` ``[G, M, K]`` of given coalitions ``[G, M, K, P]``.

    ``value(masks [G, X, P]) -> [G, X]`` evaluates a game; every one of the s + 2 terms is a
    separate evaluation (the plain vectorised path). Returns (samples, s) with s = |S| [G, M].
    """
    G, M, K, P = coalitions.shape
    idx, valid = subset_members(subsets)
    smax = idx.shape[-1]
    s = subsets.sum(-1)
    kc = max(1, min(K, chunk_elems // max(1, G * M * P * row_elems)))
    parts = []
    for k0 in range(0, K, kc):
        C = coalitions[:, :, k0:k0 + kc]
        kk = C.shape[2]
        flat = lambda x: x.reshape(G, M * kk, P)  # noqa: E731
        vC = value(flat(C)).reshape(G, M, kk)
        vS = value(flat(C | subsets[:, :, None, :])).reshape(G, M, kk)
        acc = vS + (s - 1).to(vC.dtype)[..., None] * vC
        for t in range(smax):
            one = F.one_hot(idx[..., t], P).bool() & valid[..., t, None]                # [G, M, P]
            vi = value(flat(C | one[:, :, None, :])).reshape(G, M, kk)
            acc = acc - torch.where(valid[..., t, None], vi, torch.zeros((), dtype=vi.dtype, device=vi.device))
        parts.append(acc)
    return torch.cat(parts, dim=2), s


# --------------------------------------------------------------------------------------------
# exact enumeration (the oracle)
# --------------------------------------------------------------------------------------------
def exact_shapley_interaction(value_fn: Callable[[frozenset], float], n: int, S: Iterable[int]) -> float:
    """Exact ``I([S])`` of the game ``value_fn`` on players ``0..n-1`` by enumeration (n <= 12).

    ``value_fn(frozenset_of_players) -> float`` is called once per needed coalition (including the
    empty one: the games of this library define ``v(empty) = 0``). Computed in float64.
    """
    n = check_int(OP, n, "n", 1, MAX_EXACT_PLAYERS + 1)
    S = frozenset(int(i) for i in S)
    if not S:
        raise ValueError(f"{OP}: S must hold at least one player")
    if any(i < 0 or i >= n for i in S):
        raise ValueError(f"{OP}: S holds players outside 0..{n - 1}: {sorted(S)}")
    s = len(S)
    rest = [i for i in range(n) if i not in S]
    nprime = len(rest) + 1
    cache: dict[frozenset, float] = {}

    def v(c: frozenset) -> float:
        if c not in cache:
            cache[c] = float(value_fn(c))
        return cache[c]

    total = 0.0
    for size in range(len(rest) + 1):
        weight = 1.0 / (nprime * math.comb(nprime - 1, size))
        acc = 0.0
        for tup in combinations(rest, size):
            C = frozenset(tup)
            g = v(C | S) - sum(v(C | {i}) for i in S) + (s - 1) * v(C)
            acc += g
        total += weight * acc
    return total
