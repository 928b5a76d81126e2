"""Fused Shapley coalition sampling: unbiased interaction estimates (METHOD section 5).

Contract
--------
``shapley_interaction(sim, subsets, *, query_mask=None, player_mask=None, query_players=False,
num_samples=64, seed=0, size_schedule="uniform", game_index=None, backend=None) -> (estimate, stderr)``

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

(The pooled game ``v(C) = <normalize(sum_{i in C} x_i), t>``, ``shapley_interaction_pooled``, was
retired after it lost every measurement: docs/METHOD-notes.md, "Retired: the pooled game"; commit
72b2211 has it.)

``subsets`` bool ``[G, M, P]`` (M subsets per game, each non-empty), ``player_mask`` bool ``[G, P]``
(None = all valid): invalid players are never drawn and may not be in a subset.

The pinned draw (identical on every backend): Philox4x32-10 with key ``(seed mod 2^32, seed >> 32)``
and counter ``(k, m, g, b)``; the words of blocks b = 0, 1, ... form the stream u0, u1, ....
The pool is the valid players outside S in ascending order, ``n' = |pool| + 1``;
``r = floor(u0 * n' / 2^32)`` (``round_robin``: ``r = (k + floor(u0' * n' / 2^32)) mod n'`` with u0' the
first word of sample 0); pool player t is taken iff ``u(1+t) * rem < (r - c) * 2^32`` (c taken so far,
rem pool players left including this one).

``game_index`` (``shapley_interaction`` only; int64 ``[G]``, None = the identity): game g plays on
``sim[game_index[g]]`` (sim may then have any number of rows); ``subsets``, ``query_mask`` and
``player_mask`` stay per game, and the draw keys on the game index g, so the results are
bit-identical to ``shapley_interaction(sim[game_index], ...)`` without the copy of ``sim``.

Contract on bad and extreme input, the same on every backend (reference included; issue 21 items
8-9). Data checks raise a ValueError on CPU tensors; on GPU tensors they are device-side asserts with
the same message and never synchronise with the host (debug mode, ``loupe_kernels.set_debug(True)``,
raises at the call instead):

- NaN or inf in ``sim``: ValueError naming the input.
- Empty subsets, subsets holding invalid players, ``game_index`` rows outside ``sim``: ValueError.
- Max-sim games: ``|sim| <= 2^64`` (float64: ``2^512``), else ValueError ("sim must stay within");
  under it no sum of the game can overflow the work dtype, so every backend agrees to rounding.
- ``num_samples`` in ``[1, 2^20]`` (``loupe_kernels._common.MAX_SAMPLES``), else ValueError; an int.
- Games without valid players outside S, with no key players (``n = 0`` with ``query_players``) or
  without valid query tokens: 0 (never NaN); ``G = 0`` or ``M = 0``: empty outputs.

Outputs are float32 (float64 for float64 input; float16/bfloat16 are evaluated in float32). No
gradient flows (the inputs are detached). Backends: ``cpu`` (C++), ``triton``, ``cuda`` where
available, and ``reference`` (vectorised PyTorch over the coalitions of :func:`sample_coalitions`).
Every game runs on every backend (the cuda kernels are compiled, not run on a GPU here).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ._backends import extension, resolve_backend
from ._common import (FLOAT_DTYPES, MAX_SAMPLES, check, check_finite, check_int, sample_stats, to_work,
                      triton_loader, work_dtype, work_max_exponent)
from .testing import SIZE_SCHEDULES, maxsim_values, sample_coalitions_reference, shapley_from_coalitions

__all__ = ["shapley_interaction", "sample_coalitions", "shapley_interaction_reference"]

OP = "shapley_interaction"
MAX_PLAYERS = 8192
SCHEDULES = SIZE_SCHEDULES


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------
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
    if subsets.numel():  # data checks: no host sync on a GPU (see loupe_kernels._common.check)
        check(OP, subsets.any(-1), "subsets holds an empty subset S (every S needs at least one player)")
        check(OP, ~(subsets & ~pm[:, None, :]), "subsets holds players that player_mask marks invalid")
    return subsets, pm


def _check_float(t, name: str, ndim: int, layout: str) -> torch.Tensor:
    """Type, rank and dtype (raised at the call), then no NaN/inf (a data check: no host sync on a
    GPU). Returns max |t| (a 0-d float64 tensor, never read on the host)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{OP}: {name} must be a tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{OP}: {name} must have shape {layout} ({ndim}-D), got {list(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{OP}: {name} must be float16/bfloat16/float32/float64, got {t.dtype}")
    return check_finite(OP, t, name)


def sim_bound(dt: torch.dtype) -> float:
    """The bound on ``|sim|`` of the max-sim games: ``2^64`` when the games are evaluated in float32
    (float16/bfloat16/float32 input), ``2^512`` in float64. Under it no sum of a game (at most
    ``Lq`` values per mean, ``s + 2`` means per sample) can overflow the work dtype."""
    return 2.0 ** ((work_max_exponent(dt) + 1) // 2)


def _check_samples(num_samples) -> int:
    K = check_int(OP, num_samples, "num_samples", 1)
    if K > MAX_SAMPLES:
        raise ValueError(f"{OP}: num_samples must be <= 2^20 = {MAX_SAMPLES} (one call's sampling stays bounded), "
                         f"got {K}; for more samples, average the estimates of several calls with different seeds")
    return K


def _check_game_index(game_index, G: int, rows: int, device) -> torch.Tensor | None:
    """``game_index`` (long [G]: game g uses row ``game_index[g]`` of a tensor with ``rows`` rows)."""
    if game_index is None:
        return None
    if not isinstance(game_index, torch.Tensor):
        raise TypeError(f"{OP}: game_index must be an int64 tensor or None, got {type(game_index).__name__}")
    if game_index.dtype != torch.int64:
        raise TypeError(f"{OP}: game_index must have dtype torch.int64, got {game_index.dtype}")
    if tuple(game_index.shape) != (G,):
        raise ValueError(f"{OP}: game_index must have shape [G={G}] (one sim row per game of subsets), "
                         f"got {list(game_index.shape)}")
    if game_index.device != device:
        raise ValueError(f"{OP}: game_index is on {game_index.device} but sim is on {device}")
    if G:
        check(OP, (game_index >= 0) & (game_index < rows), f"game_index holds rows outside [0, {rows})")
    return game_index.contiguous()


def _validate_maxsim(sim, subsets, query_mask, player_mask, query_players, num_samples, seed, size_schedule,
                     game_index=None):
    m = _check_float(sim, "sim", 3, "[G, Lq, n]")
    bound = sim_bound(sim.dtype)
    check(OP, m <= bound, f"sim must stay within +-2^{int(math.log2(bound))} (larger values could overflow the "
                          f"sums of the game in {work_dtype(sim.dtype)}); rescale it")
    if not isinstance(query_players, bool):
        raise TypeError(f"{OP}: query_players must be a bool, got {type(query_players).__name__}")
    rows, Lq, n = sim.shape
    if game_index is not None:
        if not isinstance(subsets, torch.Tensor) or subsets.dim() != 3:
            _validate_subsets(subsets, None)
        G = subsets.shape[0]
    else:
        G = rows
    gi = _check_game_index(game_index, G, rows, sim.device)
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
    K = _check_samples(num_samples)
    seed = check_int(OP, seed, "seed", 0, 1 << 64)
    return qm, subsets, pm, K, seed, _check_schedule(size_schedule), gi


def _seed_i64(seed: int) -> int:
    """The uint64 seed as the int64 with the same bits (custom-op schemas carry int64)."""
    return seed - (1 << 64) if seed >= (1 << 63) else seed


def _seed_u64(seed: int) -> int:
    return seed + (1 << 64) if seed < 0 else seed


# --------------------------------------------------------------------------------------------
# reference: the pinned draw and the plain evaluation of loupe_kernels.testing
# --------------------------------------------------------------------------------------------
def shapley_interaction_reference(sim, subsets, *, query_mask=None, player_mask=None, query_players=False,
                                  num_samples=64, seed=0, size_schedule="uniform", game_index=None):
    """Reference: pinned draw (numpy Philox) + each term by ``where(mask, sim, -inf).amax(-1)``
    (``game_index``: the rows of sim are gathered first)."""
    qm, subsets, pm, K, seed, sched, gi = _validate_maxsim(sim, subsets, query_mask, player_mask, query_players,
                                                           num_samples, seed, size_schedule, game_index)
    sim = sim.detach()
    if gi is not None:
        sim = sim[gi]
    work = work_dtype(sim.dtype)
    C = sample_coalitions_reference(subsets, pm, K, seed, sched)
    Lq = sim.shape[1]
    samples, _ = shapley_from_coalitions(lambda m: maxsim_values(sim.to(work), qm, m, query_players),
                                         subsets, C, row_elems=Lq)
    return sample_stats(samples, work)


# --------------------------------------------------------------------------------------------
# compiled backends
#   maxsim(sim, qm, subsets, pm, query_players, K, seed_u64, sched) -> (est, se)
#   (the Triton launchers return the per-sample values [G, M, K]; they are reduced here)
#   coalitions(subsets, pm, K, seed_u64, sched) -> bool [G, M, K, P]
# --------------------------------------------------------------------------------------------
def _cpu_maxsim(sim, qm, subsets, pm, query_players, K, seed, sched, gi=None):
    est, se = extension("cpu").shapley_maxsim(to_work(sim), qm, subsets, pm, query_players, K, seed, sched, gi)
    return est, se


def _cpu_coalitions(subsets, pm, K, seed, sched):
    return extension("cpu").shapley_coalitions(subsets, pm, K, seed, sched)


_triton = triton_loader("shapley")


def _triton_maxsim(sim, qm, subsets, pm, query_players, K, seed, sched, gi=None):
    samples = _triton().maxsim_samples(sim.contiguous(), qm, subsets, pm, query_players, K, seed, sched, gi)
    return sample_stats(samples, work_dtype(sim.dtype))


def _triton_coalitions(subsets, pm, K, seed, sched):
    return _triton().coalitions(subsets, pm, K, seed, sched)


def _cuda_maxsim(sim, qm, subsets, pm, query_players, K, seed, sched, gi=None):
    return extension("cuda").shapley_maxsim(sim.contiguous(), qm, subsets, pm, query_players, K,
                                            _seed_i64(seed), sched, gi)


def _cuda_coalitions(subsets, pm, K, seed, sched):
    return extension("cuda").shapley_coalitions(subsets, pm, K, _seed_i64(seed), sched)


KERNELS: dict[str, dict[str, Callable]] = {
    # "maxsim_qp": the max-sim game with query_players=True (the region-phrase game)
    "cpu": {"maxsim": _cpu_maxsim, "maxsim_qp": _cpu_maxsim, "coalitions": _cpu_coalitions},
    "triton": {"maxsim": _triton_maxsim, "maxsim_qp": _triton_maxsim, "coalitions": _triton_coalitions},
    "cuda": {"maxsim": _cuda_maxsim, "maxsim_qp": _cuda_maxsim, "coalitions": _cuda_coalitions},
}


def _supported(game: str) -> tuple[str, ...]:
    return ("reference", *(b for b, fns in KERNELS.items() if game in fns))


@torch.library.custom_op("loupe_kernels::shapley_maxsim", mutates_args=())
def _maxsim_op(sim: torch.Tensor, query_mask: torch.Tensor, subsets: torch.Tensor, player_mask: torch.Tensor,
               query_players: bool, num_samples: int, seed: int, schedule: int,
               backend: str, game_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return KERNELS[backend]["maxsim"](sim, query_mask, subsets, player_mask, query_players, num_samples,
                                      _seed_u64(seed), schedule, game_index)


@_maxsim_op.register_fake
def _(sim, query_mask, subsets, player_mask, query_players, num_samples, seed, schedule, backend, game_index=None):
    G, M = subsets.shape[0], subsets.shape[1]
    dt = work_dtype(sim.dtype)
    return sim.new_empty((G, M), dtype=dt), sim.new_empty((G, M), dtype=dt)


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
    K = _check_samples(num_samples)
    seed = check_int(OP, seed, "seed", 0, 1 << 64)
    sched = _check_schedule(size_schedule)
    chosen = resolve_backend(OP, backend, subsets.device, supported=_supported("coalitions"))
    if chosen == "reference":
        return sample_coalitions_reference(subsets, pm, K, seed, sched)
    return _coalitions_op(subsets, pm, K, _seed_i64(seed), sched, chosen)


def shapley_interaction(sim: torch.Tensor, subsets: torch.Tensor, *, query_mask: torch.Tensor | None = None,
                        player_mask: torch.Tensor | None = None, query_players: bool = False,
                        num_samples: int = 64, seed: int = 0, size_schedule: str = "uniform",
                        game_index: torch.Tensor | None = None,
                        backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled interaction ``I([S])`` of the max-sim game (see the module docstring; ``game_index``:
    game g plays on ``sim[game_index[g]]``, without a copy)."""
    qm, subsets, pm, K, seed, sched, gi = _validate_maxsim(sim, subsets, query_mask, player_mask, query_players,
                                                           num_samples, seed, size_schedule, game_index)
    chosen = resolve_backend(OP, backend, sim.device, supported=_supported("maxsim_qp" if query_players else "maxsim"))
    if chosen == "reference":
        return shapley_interaction_reference(sim, subsets, query_mask=None if query_players else qm,
                                             player_mask=pm, query_players=query_players, num_samples=K,
                                             seed=seed, size_schedule=size_schedule, game_index=gi)
    return _maxsim_op(sim.detach(), qm, subsets, pm, query_players, K, _seed_i64(seed), sched, chosen, gi)
