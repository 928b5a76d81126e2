"""Shapley sampler, Triton backend: the pinned draw and the estimates against the reference.

Runs under the Triton interpreter (TRITON_INTERPRET=1 set by the runner) with tiny shapes, or on a GPU.
"""
from __future__ import annotations

import pytest
import torch

from _kernel_testing import (additive_game, check_invalid_players_change_nothing, check_shapley_close,
                             require_triton_runs, shapley_references)

DEV = require_triton_runs()

import loupe_kernels as lk  # noqa: E402


def _case(seed=0, G=2, M=3, Lq=5, n=11):
    g = torch.Generator().manual_seed(seed)
    pm = torch.rand(G, n, generator=g) > 0.2
    pm[:, :4] = True
    sub = torch.zeros(G, M, n, dtype=torch.bool)
    sub[:, 0, [0, 1]] = True
    sub[:, 1, 2] = True
    sub[:, 2, [0, 2, 3]] = True
    sim = torch.randn(G, Lq, n, generator=g)
    qm = torch.rand(G, Lq, generator=g) > 0.3
    return sim.to(DEV), qm.to(DEV), sub.to(DEV), pm.to(DEV)


@pytest.mark.parametrize("schedule", ["uniform", "round_robin"])
@pytest.mark.parametrize("seed", [0, 1, 2**63 + 5, 2**64 - 1])
def test_coalitions_identical_to_reference(schedule, seed):
    _, _, sub, pm = _case()
    kw = dict(player_mask=pm, num_samples=20, seed=seed, size_schedule=schedule)
    ref = lk.sample_coalitions(sub, backend="reference", **kw)
    out = lk.sample_coalitions(sub, backend="triton", **kw)
    assert torch.equal(out.cpu(), ref.cpu())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("schedule", ["uniform", "round_robin"])
def test_estimates_match_reference(dtype, schedule):
    sim, qm, sub, pm = _case(1)
    sim = sim.to(dtype)
    kw = dict(query_mask=qm, player_mask=pm, num_samples=20, seed=7, size_schedule=schedule)
    ref64, ref_lo = shapley_references(sim, sub, **kw)
    out = lk.shapley_interaction(sim, sub, backend="triton", **kw)
    check_shapley_close(out, ref_lo, ref64, 5 * float(sim.double().abs().max()), dtype)


def test_additive_game_and_singletons_exactly_zero():
    sim, sub = additive_game(DEV, M=3)
    est, se = lk.shapley_interaction(sim, sub, num_samples=17, seed=3, backend="triton")
    assert torch.equal(est, torch.zeros_like(est)) and torch.equal(se, torch.zeros_like(se))
    sim2, _, _, _ = _case(2, n=8)
    est, _ = lk.shapley_interaction(sim2, sub[:, 2:], num_samples=9, backend="triton")
    assert torch.equal(est, torch.zeros_like(est))


def _rp_case(seed=0, G=2, M=3, Lq=5, n=11):
    """Region-phrase game: players = Lq query tokens, then n keys; some invalid on both sides."""
    g = torch.Generator().manual_seed(seed)
    P = Lq + n
    pm = torch.rand(G, P, generator=g) > 0.25
    pm[:, [0, 1, Lq, Lq + 1]] = True
    sub = torch.zeros(G, M, P, dtype=torch.bool)
    sub[:, 0, [0, Lq]] = True            # a phrase and a region
    sub[:, 1, [0, 1]] = True             # two phrases
    sub[:, 2, [1, Lq, Lq + 1]] = True    # a phrase and two regions
    sim = torch.randn(G, Lq, n, generator=g)
    return sim.to(DEV), sub.to(DEV), pm.to(DEV)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("schedule", ["uniform", "round_robin"])
def test_region_phrase_estimates_match_reference(dtype, schedule):
    sim, sub, pm = _rp_case(3)
    sim = sim.to(dtype)
    kw = dict(player_mask=pm, query_players=True, num_samples=20, seed=11, size_schedule=schedule)
    ref64, ref_lo = shapley_references(sim, sub, **kw)
    out = lk.shapley_interaction(sim, sub, backend="triton", **kw)
    assert float(ref64[0].abs().max()) > 0.05          # a non-trivial game
    check_shapley_close(out, ref_lo, ref64, 5 * float(sim.double().abs().max()), dtype)


def test_singletons_exactly_zero_region_phrase():
    sim, sub, pm = _rp_case(8)
    one = torch.zeros_like(sub[:, :2])
    one[:, 0, 1] = True        # a phrase
    one[:, 1, 5] = True        # a region
    est, se = lk.shapley_interaction(sim, one, player_mask=pm, query_players=True, num_samples=18, seed=1,
                                     backend="triton")
    assert torch.equal(est, torch.zeros_like(est)) and torch.equal(se, torch.zeros_like(se))


def test_invalid_players_never_drawn_nor_used():
    """Coalitions avoid S and invalid players; changing what invalid players hold changes nothing."""
    _, _, sub, pm = _case(9)
    C = lk.sample_coalitions(sub, player_mask=pm, num_samples=40, seed=3, backend="triton")
    assert not bool((C & ~pm[:, None, None, :]).any()) and not bool((C & sub[:, :, None, :]).any())
    assert bool(C.any())
    sim, qm, sub, pm = _case(9)
    check_invalid_players_change_nothing(sim, sub, pm, "triton", query_mask=qm, num_samples=20, seed=3)
    sim, sub, pm = _rp_case(9)
    check_invalid_players_change_nothing(sim, sub, pm, "triton", query_players=True, num_samples=20, seed=3)


def test_many_players_coalitions_and_determinism():
    """260 players (more than one 256-wide block for the pool count; 65 Philox blocks per stream)."""
    g = torch.Generator().manual_seed(10)
    P = 260
    pm = torch.rand(1, P, generator=g) > 0.1
    pm[0, :3] = True
    sub = torch.zeros(1, 2, P, dtype=torch.bool)
    sub[0, 0, [0, 1]] = True
    sub[0, 1, 2] = True
    sub, pm = sub.to(DEV), pm.to(DEV)
    kw = dict(player_mask=pm, num_samples=16, seed=123, size_schedule="round_robin")
    ref = lk.sample_coalitions(sub, backend="reference", **kw)
    out = lk.sample_coalitions(sub, backend="triton", **kw)
    assert torch.equal(out.cpu(), ref.cpu())
    assert torch.equal(out, lk.sample_coalitions(sub, backend="triton", **kw))
