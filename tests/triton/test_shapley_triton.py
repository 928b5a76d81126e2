"""Shapley sampler, Triton backend: the pinned draw and the estimates against the reference.

Runs under the Triton interpreter (TRITON_INTERPRET=1 set by the runner) with tiny shapes, or on a GPU.
"""
from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET", "0") != "1" and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 (set before triton is imported) or a CUDA device",
                allow_module_level=True)
pytest.importorskip("triton")

import loupe_kernels as lk  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


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
    ref64 = lk.shapley_interaction(sim.double(), sub, backend="reference", **kw)
    ref_lo = lk.shapley_interaction(sim, sub, backend="reference", **kw)
    out = lk.shapley_interaction(sim, sub, backend="triton", **kw)
    assert out[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    for i in range(2):
        err_ref = float((ref_lo[i].double() - ref64[i]).abs().max())
        tol = 2 * err_ref + 1e-6 * float(ref64[i].abs().max()) + 1e-12
        assert float((out[i].double() - ref64[i]).abs().max()) <= tol


def test_additive_game_and_singletons_exactly_zero():
    w = torch.tensor([1.0, 3.0, 0.0, 2.0, 5.0, 1.0, 4.0, 2.0])
    sim = torch.diag(w)[None].repeat(2, 1, 1).to(DEV)
    sub = torch.zeros(2, 3, 8, dtype=torch.bool, device=DEV)
    sub[:, 0, [0, 1]] = True
    sub[:, 1, [2, 3, 4]] = True
    sub[:, 2, 5] = True
    est, se = lk.shapley_interaction(sim, sub, num_samples=17, seed=3, backend="triton")
    assert torch.equal(est, torch.zeros_like(est)) and torch.equal(se, torch.zeros_like(se))
    sim2, _, _, _ = _case(2, n=8)
    est, _ = lk.shapley_interaction(sim2, sub[:, 2:], num_samples=9, backend="triton")
    assert torch.equal(est, torch.zeros_like(est))


def test_region_phrase_game_not_on_triton():
    sim, _, _, _ = _case()
    sub = torch.zeros(2, 1, 16, dtype=torch.bool, device=DEV)
    sub[:, 0, [0, 6]] = True
    with pytest.raises(ValueError, match="backend 'triton'"):
        lk.shapley_interaction(sim, sub, query_players=True, backend="triton")
