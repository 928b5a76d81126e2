"""Fused Shapley coalition sampling: unbiased interaction estimates (METHOD section 5).

Contract
--------
``shapley_interaction(sim, subsets, *, query_mask=None, player_mask=None, query_players=False,
num_samples=64, seed=0, size_schedule="uniform", backend=None) -> (estimate, stderr)``

``shapley_interaction_pooled(features, target, subsets, *, player_mask=None, num_samples=64,
seed=0, size_schedule="uniform", backend=None) -> (estimate, stderr)``

``sample_coalitions(subsets, *, player_mask=None, num_samples, seed, size_schedule="uniform",
backend=None) -> bool [G, M, K, P]``: exactly the coalitions the kernels draw.

Interaction of a subset ``S`` (s = |S| >= 1) of the players ``N`` of a game ``v`` (``v(empty) = 0``),
``n' = |N \\ S| + 1``::

    I([S]) = phi([S] | N\\S + {[S]}) - sum_{i in S} phi(i | N\\S + {i})
           = E_C[ v(C u S) - sum_{i in S} v(C u {i}) + (s - 1) v(C) ]

with ``C`` drawn as: size ``r`` uniform in ``{0..n'-1}``, then ``C`` uniform among the size-r subsets
of ``N \\ S``. ``estimate`` is the mean of ``K = num_samples`` samples, ``stderr`` the sample standard
deviation over ``sqrt(K)`` (``inf`` when K = 1). |S| = 1 gives exactly 0.

Games
- Max-sim: ``sim [G, Lq, n]``; ``v(C) = mean over valid query tokens j of max_{i in C} sim[g, j, i]``
  (``query_mask [G, Lq]``; a game without valid query tokens has v = 0). Players ``P = n``.
- Max-sim with ``query_players=True`` (region-phrase game): players ``P = Lq + n``, the Lq query
  tokens first, then the n keys; ``v(C)`` = mean over the query players in C of the max over the
  key players in C, 0 when C holds no query player or no key player. ``query_mask`` must be None.
- Pooled: ``features [G, n, D]``, ``target [G, D]``; ``v(C) = <normalize(sum_{i in C} x_i), t>``
  with ``normalize(z) = z / max(||z||, 1e-12)``. Players ``P = n``.

``subsets`` bool ``[G, M, P]`` (M subsets per game, each non-empty), ``player_mask`` bool ``[G, P]``
(None = all valid): invalid players are never drawn and may not be in a subset.

The pinned draw (identical on every backend): Philox4x32-10 with key ``(seed mod 2^32, seed >> 32)``
and counter ``(k, m, g, b)``; the words of blocks b = 0, 1, ... form the stream u0, u1, ....
The pool is the valid players outside S in ascending order, ``n' = |pool| + 1``;
``r = floor(u0 * n' / 2^32)`` (``round_robin``: ``r = (k + floor(u0' * n' / 2^32)) mod n'`` with u0' the
first word of sample 0); pool player t is taken iff ``u(1+t) * rem < (r - c) * 2^32`` (c taken so far,
rem pool players left including this one).

Outputs are float32 (float64 for float64 input; float16/bfloat16 are evaluated in float32). No
gradient flows (the inputs are detached). Backends: ``cpu`` (C++), ``triton``, ``cuda`` where
available, and ``reference`` (vectorised PyTorch over the coalitions of :func:`sample_coalitions`).
Every game runs on every backend (the cuda kernels are compiled, not run on a GPU here).
"""
from __future__ import annotations

import math
from itertools import combinations
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from ._backends import extension, resolve_backend

__all__ = ["shapley_interaction", "shapley_interaction_pooled", "sample_coalitions",
           "exact_shapley_interaction", "shapley_interaction_reference",
           "shapley_interaction_pooled_reference", "sample_coalitions_reference",
           "philox4x32_10", "draw_coalitions_torch", "shapley_maxsim_naive",
           "shapley_from_coalitions"]

OP = "shapley_interaction"
MAX_PLAYERS = 8192
MAX_EXACT_PLAYERS = 12
SCHEDULES = {"uniform": 0, "round_robin": 1}
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_NORM_EPS = 1e-12

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
# validation
# --------------------------------------------------------------------------------------------
def _check_int(x, name: str, lo: int, hi: int | None = None) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{OP}: {name} must be an int, got {type(x).__name__}")
    x = int(x)
    if x < lo or (hi is not None and x >= hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi})"
        raise ValueError(f"{OP}: {name} must be {rng}, got {x}")
    return x


def _check_schedule(size_schedule) -> int:
    if not isinstance(size_schedule, str) or size_schedule not in SCHEDULES:
        raise ValueError(f"{OP}: unknown size_schedule {size_schedule!r}; expected one of {tuple(SCHEDULES)}")
    return SCHEDULES[size_schedule]


def _check_bool_tensor(t, name: str, shape: tuple[int, ...], device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{OP}: {name} must be a bool tensor, got {type(t).__name__}")
    if t.dtype != torch.bool:
        raise TypeError(f"{OP}: {name} must have dtype torch.bool, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{OP}: {name} must have shape {list(shape)}, got {list(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{OP}: {name} is on {t.device} but the other inputs are on {device}")
    return t.contiguous()


def _validate_subsets(subsets, player_mask, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(subsets, torch.Tensor):
        raise TypeError(f"{OP}: subsets must be a bool tensor [G, M, P], got {type(subsets).__name__}")
    if subsets.dim() != 3:
        raise ValueError(f"{OP}: subsets must have shape [G, M, P] (3-D), got {list(subsets.shape)}")
    if subsets.dtype != torch.bool:
        raise TypeError(f"{OP}: subsets must have dtype torch.bool, got {subsets.dtype}")
    device = subsets.device if device is None else device
    if subsets.device != device:
        raise ValueError(f"{OP}: subsets is on {subsets.device} but the other inputs are on {device}")
    G, M, P = subsets.shape
    if P > MAX_PLAYERS:
        raise ValueError(f"{OP}: too many players in subsets: P={P} > {MAX_PLAYERS}")
    if player_mask is None:
        pm = torch.ones((G, P), dtype=torch.bool, device=device)
    else:
        pm = _check_bool_tensor(player_mask, "player_mask", (G, P), device)
    subsets = subsets.contiguous()
    if subsets.numel() and bool((subsets.sum(-1) == 0).any()):
        raise ValueError(f"{OP}: subsets holds an empty subset S (every S needs at least one player)")
    if subsets.numel() and bool((subsets & ~pm[:, None, :]).any()):
        raise ValueError(f"{OP}: subsets holds players that player_mask marks invalid")
    return subsets, pm


def _check_float(t, name: str, ndim: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{OP}: {name} must be a tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{OP}: {name} must have shape {layout} ({ndim}-D), got {list(t.shape)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{OP}: {name} must be float16/bfloat16/float32/float64, got {t.dtype}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{OP}: {name} contains NaN or inf")


def _validate_maxsim(sim, subsets, query_mask, player_mask, query_players, num_samples, seed, size_schedule):
    _check_float(sim, "sim", 3, "[G, Lq, n]")
    if not isinstance(query_players, bool):
        raise TypeError(f"{OP}: query_players must be a bool, got {type(query_players).__name__}")
    G, Lq, n = sim.shape
    P = Lq + n if query_players else n
    if not isinstance(subsets, torch.Tensor) or subsets.dim() != 3:
        _validate_subsets(subsets, None)  # raises the type/shape error
    if tuple(subsets.shape[::2]) != (G, P):
        what = "Lq + n (query_players=True)" if query_players else "n"
        raise ValueError(f"{OP}: subsets must have shape [G={G}, M, P={P}] with P = {what}, "
                         f"got {list(subsets.shape)}")
    if query_players:
        if query_mask is not None:
            raise ValueError(f"{OP}: query_mask must be None with query_players=True "
                             f"(mark invalid query players in player_mask)")
        qm = torch.ones((G, Lq), dtype=torch.bool, device=sim.device)
    elif query_mask is None:
        qm = torch.ones((G, Lq), dtype=torch.bool, device=sim.device)
    else:
        qm = _check_bool_tensor(query_mask, "query_mask", (G, Lq), sim.device)
    subsets, pm = _validate_subsets(subsets, player_mask, sim.device)
    K = _check_int(num_samples, "num_samples", 1)
    seed = _check_int(seed, "seed", 0, 1 << 64)
    return qm, subsets, pm, K, seed, _check_schedule(size_schedule)


def _validate_pooled(features, target, subsets, player_mask, num_samples, seed, size_schedule):
    _check_float(features, "features", 3, "[G, n, D]")
    _check_float(target, "target", 2, "[G, D]")
    G, n, D = features.shape
    if tuple(target.shape) != (G, D):
        raise ValueError(f"{OP}: target must have shape [G={G}, D={D}], got {list(target.shape)}")
    if target.dtype != features.dtype:
        raise TypeError(f"{OP}: features and target must share a dtype, got {features.dtype} and {target.dtype}")
    if target.device != features.device:
        raise ValueError(f"{OP}: features and target must be on the same device")
    if not isinstance(subsets, torch.Tensor) or subsets.dim() != 3:
        _validate_subsets(subsets, None)
    if tuple(subsets.shape[::2]) != (G, n):
        raise ValueError(f"{OP}: subsets must have shape [G={G}, M, n={n}], got {list(subsets.shape)}")
    subsets, pm = _validate_subsets(subsets, player_mask, features.device)
    K = _check_int(num_samples, "num_samples", 1)
    seed = _check_int(seed, "seed", 0, 1 << 64)
    return subsets, pm, K, seed, _check_schedule(size_schedule)


def _seed_i64(seed: int) -> int:
    """The uint64 seed as the int64 with the same bits (custom-op schemas carry int64)."""
    return seed - (1 << 64) if seed >= (1 << 63) else seed


def _seed_u64(seed: int) -> int:
    return seed + (1 << 64) if seed < 0 else seed


def _out_dtype(dt: torch.dtype) -> torch.dtype:
    return torch.float64 if dt == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# reference sampler: the pinned draw, vectorised over (g, m, k) in numpy integer arithmetic
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
    if schedule == SCHEDULES["uniform"]:
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
def _subset_members(subsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the members of each S, padded: (idx [G, M, smax] int64, valid [G, M, smax])."""
    s = subsets.sum(-1)
    smax = int(s.max()) if s.numel() else 0
    order = torch.argsort((~subsets).to(torch.int8), dim=-1, stable=True)[..., :smax]
    valid = torch.arange(smax, device=subsets.device)[None, None, :] < s[..., None]
    return order, valid


def _maxsim_values(sim: torch.Tensor, qm: torch.Tensor, masks: torch.Tensor, query_players: bool) -> torch.Tensor:
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


def _pooled_values(features: torch.Tensor, target: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    z = masks.to(features.dtype) @ features                                               # [G, X, D]
    return (F.normalize(z, dim=-1, eps=_NORM_EPS) * target[:, None, :]).sum(-1)


def shapley_from_coalitions(value: Callable[[torch.Tensor], torch.Tensor], subsets: torch.Tensor,
                            coalitions: torch.Tensor, chunk_elems: int = 1 << 24,
                            row_elems: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample values ``G(C)`` ``[G, M, K]`` of given coalitions ``[G, M, K, P]``.

    ``value(masks [G, X, P]) -> [G, X]`` evaluates a game; every one of the s + 2 terms is a
    separate evaluation (the plain vectorised path). Returns (samples, s) with s = |S| [G, M].
    """
    G, M, K, P = coalitions.shape
    idx, valid = _subset_members(subsets)
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


def _stats(samples: torch.Tensor, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    x = samples.double()
    K = x.shape[-1]
    est = x.mean(-1)
    if K > 1:
        se = x.std(-1, correction=1) / math.sqrt(K)
    else:
        se = torch.full_like(est, float("inf"))
    return est.to(out_dtype), se.to(out_dtype)


def shapley_interaction_reference(sim, subsets, *, query_mask=None, player_mask=None, query_players=False,
                                  num_samples=64, seed=0, size_schedule="uniform"):
    """Reference: pinned draw (numpy Philox) + each term by ``where(mask, sim, -inf).amax(-1)``."""
    qm, subsets, pm, K, seed, sched = _validate_maxsim(sim, subsets, query_mask, player_mask, query_players,
                                                       num_samples, seed, size_schedule)
    sim = sim.detach()
    work = _out_dtype(sim.dtype)
    C = sample_coalitions_reference(subsets, pm, K, seed, sched)
    Lq = sim.shape[1]
    samples, _ = shapley_from_coalitions(lambda m: _maxsim_values(sim.to(work), qm, m, query_players),
                                         subsets, C, row_elems=Lq)
    return _stats(samples, work)


def shapley_interaction_pooled_reference(features, target, subsets, *, player_mask=None, num_samples=64,
                                         seed=0, size_schedule="uniform"):
    """Reference of the pooled game: pinned draw + normalised masked sums per term."""
    subsets, pm, K, seed, sched = _validate_pooled(features, target, subsets, player_mask, num_samples,
                                                   seed, size_schedule)
    work = _out_dtype(features.dtype)
    f, t = features.detach().to(work), target.detach().to(work)
    C = sample_coalitions_reference(subsets, pm, K, seed, sched)
    samples, _ = shapley_from_coalitions(lambda m: _pooled_values(f, t, m), subsets, C,
                                         row_elems=max(1, f.shape[2] // 8))
    return _stats(samples, work)


# --------------------------------------------------------------------------------------------
# baselines of the benchmark: torch-RNG coalitions; the naive per-coalition path
# --------------------------------------------------------------------------------------------
def draw_coalitions_torch(subsets: torch.Tensor, player_mask: torch.Tensor | None, num_samples: int,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """Same distribution as the pinned draw, from torch's RNG (size uniform, then a random sort)."""
    G, M, P = subsets.shape
    pm = torch.ones((G, P), dtype=torch.bool, device=subsets.device) if player_mask is None else player_mask
    pool = pm[:, None, :] & ~subsets
    nprime = pool.sum(-1) + 1
    u = torch.rand((G, M, num_samples), generator=generator, device=subsets.device)
    r = (u * nprime[..., None]).long().clamp(max=(nprime - 1)[..., None])
    keys = torch.rand((G, M, num_samples, P), generator=generator, device=subsets.device)
    keys = keys.masked_fill(~pool[:, :, None, :], 2.0)
    ranks = keys.argsort(-1).argsort(-1)
    return ranks < r[..., None]


def shapley_maxsim_naive(query: torch.Tensor, keys: torch.Tensor, subsets: torch.Tensor,
                         coalitions: torch.Tensor, query_mask: torch.Tensor | None = None):
    """Naive path: per coalition a masked copy of the key features, the value recomputed from the
    features for each of the s + 2 terms. ``query [G, Lq, D]``, ``keys [G, n, D]``."""
    G, M, K, n = coalitions.shape
    out = torch.empty((G, M, K), dtype=query.dtype)

    def v(g: int, mask: torch.Tensor) -> torch.Tensor:
        x = keys[g][mask]                                  # masked copy of the features
        if x.shape[0] == 0:
            return query.new_zeros(())
        q = query[g] if query_mask is None else query[g][query_mask[g]]
        if q.shape[0] == 0:
            return query.new_zeros(())
        return (q @ x.T).amax(-1).mean()

    for g in range(G):
        for m in range(M):
            S = subsets[g, m]
            members = S.nonzero().flatten().tolist()
            for k in range(K):
                C = coalitions[g, m, k]
                total = v(g, C | S) + (len(members) - 1) * v(g, C)
                for i in members:
                    one = C.clone()
                    one[i] = True
                    total = total - v(g, one)
                out[g, m, k] = total
    return _stats(out, _out_dtype(query.dtype))


# --------------------------------------------------------------------------------------------
# exact enumeration (the oracle)
# --------------------------------------------------------------------------------------------
def exact_shapley_interaction(value_fn: Callable[[frozenset], float], n: int, S: Iterable[int]) -> float:
    """Exact ``I([S])`` of the game ``value_fn`` on players ``0..n-1`` by enumeration (n <= 12).

    ``value_fn(frozenset_of_players) -> float`` is called once per needed coalition (including the
    empty one: the games of this library define ``v(empty) = 0``). Computed in float64.
    """
    n = _check_int(n, "n", 1, MAX_EXACT_PLAYERS + 1)
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


# --------------------------------------------------------------------------------------------
# compiled backends
#   maxsim(sim, qm, subsets, pm, query_players, K, seed_u64, sched) -> (est, se)
#   pooled(features, target, subsets, pm, K, seed_u64, sched) -> (est, se)
#   coalitions(subsets, pm, K, seed_u64, sched) -> bool [G, M, K, P]
# --------------------------------------------------------------------------------------------
def _work(t: torch.Tensor) -> torch.Tensor:
    return t.to(_out_dtype(t.dtype)).contiguous()


def _cpu_maxsim(sim, qm, subsets, pm, query_players, K, seed, sched):
    est, se = extension("cpu").shapley_maxsim(_work(sim), qm, subsets, pm, query_players, K, seed, sched)
    return est, se


def _cpu_pooled(features, target, subsets, pm, K, seed, sched):
    return extension("cpu").shapley_pooled(_work(features), _work(target), subsets, pm, K, seed, sched)


def _cpu_coalitions(subsets, pm, K, seed, sched):
    return extension("cpu").shapley_coalitions(subsets, pm, K, seed, sched)


def _triton_mod():
    from . import triton_shapley
    return triton_shapley


def _triton_maxsim(sim, qm, subsets, pm, query_players, K, seed, sched):
    return _triton_mod().maxsim(sim.contiguous(), qm, subsets, pm, query_players, K, seed, sched)


def _triton_pooled(features, target, subsets, pm, K, seed, sched):
    return _triton_mod().pooled(features.contiguous(), target.contiguous(), subsets, pm, K, seed, sched)


def _triton_coalitions(subsets, pm, K, seed, sched):
    return _triton_mod().coalitions(subsets, pm, K, seed, sched)


def _cuda_maxsim(sim, qm, subsets, pm, query_players, K, seed, sched):
    return extension("cuda").shapley_maxsim(sim.contiguous(), qm, subsets, pm, query_players, K,
                                            _seed_i64(seed), sched)


def _cuda_pooled(features, target, subsets, pm, K, seed, sched):
    return extension("cuda").shapley_pooled(features.contiguous(), target.contiguous(), subsets, pm, K,
                                            _seed_i64(seed), sched)


def _cuda_coalitions(subsets, pm, K, seed, sched):
    return extension("cuda").shapley_coalitions(subsets, pm, K, _seed_i64(seed), sched)


KERNELS: dict[str, dict[str, Callable]] = {
    # "maxsim_qp": the max-sim game with query_players=True (the region-phrase game)
    "cpu": {"maxsim": _cpu_maxsim, "maxsim_qp": _cpu_maxsim, "pooled": _cpu_pooled, "coalitions": _cpu_coalitions},
    "triton": {"maxsim": _triton_maxsim, "maxsim_qp": _triton_maxsim, "pooled": _triton_pooled,
               "coalitions": _triton_coalitions},
    "cuda": {"maxsim": _cuda_maxsim, "maxsim_qp": _cuda_maxsim, "pooled": _cuda_pooled, "coalitions": _cuda_coalitions},
}


def _supported(game: str) -> tuple[str, ...]:
    return ("reference", *(b for b, fns in KERNELS.items() if game in fns))


@torch.library.custom_op("loupe_kernels::shapley_maxsim", mutates_args=())
def _maxsim_op(sim: torch.Tensor, query_mask: torch.Tensor, subsets: torch.Tensor, player_mask: torch.Tensor,
               query_players: bool, num_samples: int, seed: int, schedule: int,
               backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return KERNELS[backend]["maxsim"](sim, query_mask, subsets, player_mask, query_players, num_samples,
                                      _seed_u64(seed), schedule)


@_maxsim_op.register_fake
def _(sim, query_mask, subsets, player_mask, query_players, num_samples, seed, schedule, backend):
    G, M = subsets.shape[0], subsets.shape[1]
    dt = _out_dtype(sim.dtype)
    return sim.new_empty((G, M), dtype=dt), sim.new_empty((G, M), dtype=dt)


@torch.library.custom_op("loupe_kernels::shapley_pooled", mutates_args=())
def _pooled_op(features: torch.Tensor, target: torch.Tensor, subsets: torch.Tensor, player_mask: torch.Tensor,
               num_samples: int, seed: int, schedule: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return KERNELS[backend]["pooled"](features, target, subsets, player_mask, num_samples, _seed_u64(seed), schedule)


@_pooled_op.register_fake
def _(features, target, subsets, player_mask, num_samples, seed, schedule, backend):
    G, M = subsets.shape[0], subsets.shape[1]
    dt = _out_dtype(features.dtype)
    return features.new_empty((G, M), dtype=dt), features.new_empty((G, M), dtype=dt)


@torch.library.custom_op("loupe_kernels::shapley_coalitions", mutates_args=())
def _coalitions_op(subsets: torch.Tensor, player_mask: torch.Tensor, num_samples: int, seed: int,
                   schedule: int, backend: str) -> torch.Tensor:
    return KERNELS[backend]["coalitions"](subsets, player_mask, num_samples, _seed_u64(seed), schedule)


@_coalitions_op.register_fake
def _(subsets, player_mask, num_samples, seed, schedule, backend):
    G, M, P = subsets.shape
    return subsets.new_empty((G, M, num_samples, P), dtype=torch.bool)


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def sample_coalitions(subsets: torch.Tensor, *, player_mask: torch.Tensor | None = None, num_samples: int,
                      seed: int, size_schedule: str = "uniform", backend: str | None = None) -> torch.Tensor:
    """The coalitions ``C`` (bool ``[G, M, K, P]``) that every backend draws for this seed."""
    subsets, pm = _validate_subsets(subsets, player_mask)
    K = _check_int(num_samples, "num_samples", 1)
    seed = _check_int(seed, "seed", 0, 1 << 64)
    sched = _check_schedule(size_schedule)
    chosen = resolve_backend(OP, backend, subsets.device, supported=_supported("coalitions"))
    if chosen == "reference":
        return sample_coalitions_reference(subsets, pm, K, seed, sched)
    return _coalitions_op(subsets, pm, K, _seed_i64(seed), sched, chosen)


def shapley_interaction(sim: torch.Tensor, subsets: torch.Tensor, *, query_mask: torch.Tensor | None = None,
                        player_mask: torch.Tensor | None = None, query_players: bool = False,
                        num_samples: int = 64, seed: int = 0, size_schedule: str = "uniform",
                        backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled interaction ``I([S])`` of the max-sim game (see the module docstring)."""
    qm, subsets, pm, K, seed, sched = _validate_maxsim(sim, subsets, query_mask, player_mask, query_players,
                                                       num_samples, seed, size_schedule)
    chosen = resolve_backend(OP, backend, sim.device, supported=_supported("maxsim_qp" if query_players else "maxsim"))
    if chosen == "reference":
        return shapley_interaction_reference(sim, subsets, query_mask=None if query_players else qm,
                                             player_mask=pm, query_players=query_players, num_samples=K,
                                             seed=seed, size_schedule=size_schedule)
    return _maxsim_op(sim.detach(), qm, subsets, pm, query_players, K, _seed_i64(seed), sched, chosen)


def shapley_interaction_pooled(features: torch.Tensor, target: torch.Tensor, subsets: torch.Tensor, *,
                               player_mask: torch.Tensor | None = None, num_samples: int = 64, seed: int = 0,
                               size_schedule: str = "uniform",
                               backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled interaction ``I([S])`` of the pooled game (see the module docstring)."""
    subsets, pm, K, seed, sched = _validate_pooled(features, target, subsets, player_mask, num_samples,
                                                   seed, size_schedule)
    chosen = resolve_backend(OP, backend, features.device, supported=_supported("pooled"))
    if chosen == "reference":
        return shapley_interaction_pooled_reference(features, target, subsets, player_mask=pm, num_samples=K,
                                                    seed=seed, size_schedule=size_schedule)
    return _pooled_op(features.detach(), target.detach(), subsets, pm, K, _seed_i64(seed), sched, chosen)
