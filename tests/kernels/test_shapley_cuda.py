"""Shapley sampler on a GPU: the cuda backend (and triton on CUDA) against the reference and the cpu backend.

Every test needs a CUDA device and the compiled CUDA extension; without them the module is skipped
with the reason. Tolerances: 2x the error of the same PyTorch math run in the working dtype (float32,
float64 for float64 input) against a float64 run of the reference, plus one rounding unit of the size of a
sample.
"""
from __future__ import annotations

import pytest
import torch

import loupe_kernels as lk
from _kernel_testing import (additive_game, check_invalid_players_change_nothing, check_shapley_close,
                             shapley_references, shapley_tol)

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (torch.cuda.is_available() is False)", allow_module_level=True)
if "cuda" not in lk.available_backends():
    pytest.skip(f"cuda backend unavailable: {lk.backend_status('cuda').reason}", allow_module_level=True)

pytestmark = pytest.mark.gpu

DEV = torch.device("cuda")
HAS_CPU = "cpu" in lk.available_backends()
HAS_TRITON = "triton" in lk.available_backends()
SEEDS = [0, 1, 2**40 + 7, 2**63 + 5, 2**64 - 1]


# ------------------------------------------------------------------------------------------------
# cases
# ------------------------------------------------------------------------------------------------
def _subsets(G, M, P, sizes, gen, pm):
    """M subsets per game of the given sizes, drawn among the valid players."""
    sub = torch.zeros(G, M, P, dtype=torch.bool)
    for g in range(G):
        valid = pm[g].nonzero().flatten()
        for m in range(M):
            pick = valid[torch.randperm(len(valid), generator=gen)[:sizes[m % len(sizes)]]]
            sub[g, m, pick] = True
    return sub


def maxsim_case(seed=0, G=4, M=4, Lq=32, n=196, sizes=(1, 2, 3)):
    gen = torch.Generator().manual_seed(seed)
    pm = torch.rand(G, n, generator=gen) > 0.15
    sub = _subsets(G, M, n, sizes, gen, pm)
    sim = torch.randn(G, Lq, n, generator=gen)
    qm = torch.rand(G, Lq, generator=gen) > 0.2
    return sim.to(DEV), qm.to(DEV), sub.to(DEV), pm.to(DEV)


def region_phrase_case(seed=0, G=4, M=4, Lq=12, n=36, sizes=(1, 2, 3)):
    gen = torch.Generator().manual_seed(seed)
    P = Lq + n
    pm = torch.rand(G, P, generator=gen) > 0.15
    pm[:, 0] = True
    pm[:, Lq] = True
    sub = _subsets(G, M, P, sizes, gen, pm)
    sub[:, 0] = False
    sub[:, 0, [0, Lq]] = True            # one phrase and one region in every game
    sim = torch.randn(G, Lq, n, generator=gen)
    return sim.to(DEV), sub.to(DEV), pm.to(DEV)


def _check_close(out, ref_lo, ref64, scale, dtype):
    assert out[0].device.type == "cuda"
    check_shapley_close(out, ref_lo, ref64, scale, dtype)


# ------------------------------------------------------------------------------------------------
# the pinned draw
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["uniform", "round_robin"])
@pytest.mark.parametrize("seed", SEEDS)
def test_coalitions_identical_to_reference(schedule, seed):
    _, _, sub, pm = maxsim_case(1, G=3, M=3, n=70)
    kw = dict(player_mask=pm, num_samples=40, seed=seed, size_schedule=schedule)
    ref = lk.sample_coalitions(sub.cpu(), **{**kw, "player_mask": pm.cpu()}, backend="reference")
    out = lk.sample_coalitions(sub, backend="cuda", **kw)
    assert out.device.type == "cuda" and out.dtype == torch.bool
    assert torch.equal(out.cpu(), ref)
    assert not bool((out & ~pm[:, None, None, :]).any()) and not bool((out & sub[:, :, None, :]).any())
    if HAS_CPU:
        cpu = lk.sample_coalitions(sub.cpu(), **{**kw, "player_mask": pm.cpu()}, backend="cpu")
        assert torch.equal(out.cpu(), cpu)
    if HAS_TRITON:
        assert torch.equal(lk.sample_coalitions(sub, backend="triton", **kw), out)


def test_coalitions_many_players():
    _, _, sub, pm = maxsim_case(2, G=2, M=2, Lq=4, n=600)
    kw = dict(player_mask=pm, num_samples=24, seed=99)
    ref = lk.sample_coalitions(sub.cpu(), **{**kw, "player_mask": pm.cpu()}, backend="reference")
    assert torch.equal(lk.sample_coalitions(sub, backend="cuda", **kw).cpu(), ref)


# ------------------------------------------------------------------------------------------------
# estimates against the reference (and the cpu backend, and triton on CUDA)
# ------------------------------------------------------------------------------------------------
def _maxsim_all(sim, sub, backend, **kw):
    return lk.shapley_interaction(sim, sub, backend=backend, **kw)


def _check_backends(sim, sub, dtype, **kw):
    """cuda, and cpu and triton where built, against the reference (in float64 and in the dtype of
    ``sim``), and triton against cuda; returns the float64 reference."""
    ref64, ref_lo = shapley_references(sim, sub, **kw)
    scale = 5 * float(sim.double().abs().max())
    out = _maxsim_all(sim, sub, "cuda", **kw)
    _check_close(out, ref_lo, ref64, scale, dtype)
    if HAS_CPU:
        cpu = _maxsim_all(sim.cpu().float() if dtype != torch.float64 else sim.cpu(), sub.cpu(), "cpu",
                          **{k: v.cpu() if torch.is_tensor(v) else v for k, v in kw.items()})
        _check_close(out, cpu, ref64, scale, dtype)
    if HAS_TRITON:
        tri = _maxsim_all(sim, sub, "triton", **kw)
        _check_close(tri, ref_lo, ref64, scale, dtype)
        assert float((tri[0] - out[0]).abs().max()) <= 2 * shapley_tol(ref_lo[0], ref64[0], scale, dtype)
    return ref64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("schedule", ["uniform", "round_robin"])
def test_maxsim_matches_reference(dtype, schedule):
    sim, qm, sub, pm = maxsim_case(3)
    _check_backends(sim.to(dtype), sub, dtype, query_mask=qm, player_mask=pm, num_samples=64, seed=5,
                    size_schedule=schedule)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("schedule", ["uniform", "round_robin"])
def test_region_phrase_matches_reference(dtype, schedule):
    sim, sub, pm = region_phrase_case(4)
    ref64 = _check_backends(sim.to(dtype), sub, dtype, player_mask=pm, query_players=True, num_samples=64, seed=9,
                            size_schedule=schedule)
    assert float(ref64[0].abs().max()) > 0.05


@pytest.mark.parametrize("Lq,n,K", [(48, 30, 300), (100, 20, 40), (20, 1000, 40), (1, 5, 7)])
def test_maxsim_kernel_paths(Lq, n, K):
    """Thread-per-sample kernel with LQ = 64 and K > 128 (several samples a thread), and the
    warp-per-sample kernel (Lq > 64; n * Lq too large for shared memory); both games."""
    sim, qm, sub, pm = maxsim_case(10, G=2, M=3, Lq=Lq, n=n)
    kw = dict(query_mask=qm, player_mask=pm, num_samples=K, seed=21)
    ref64, ref_lo = shapley_references(sim, sub, **kw)
    _check_close(_maxsim_all(sim, sub, "cuda", **kw), ref_lo, ref64, 5 * float(sim.abs().max()), torch.float32)
    if n <= 100:
        sim, sub, pm = region_phrase_case(10, G=2, M=3, Lq=Lq, n=n)
        kw = dict(player_mask=pm, query_players=True, num_samples=K, seed=21)
        ref64, ref_lo = shapley_references(sim, sub, **kw)
        _check_close(_maxsim_all(sim, sub, "cuda", **kw), ref_lo, ref64, 5 * float(sim.abs().max()),
                     torch.float32)


# ------------------------------------------------------------------------------------------------
# exact properties
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_singletons_exactly_zero(backend):
    if backend == "triton" and not HAS_TRITON:
        pytest.skip("triton unavailable")
    sim, qm, sub, pm = maxsim_case(7, sizes=(1,))
    est, se = lk.shapley_interaction(sim, sub, query_mask=qm, player_mask=pm, num_samples=33, backend=backend)
    assert torch.equal(est, torch.zeros_like(est)) and torch.equal(se, torch.zeros_like(se))
    sim, sub, pm = region_phrase_case(7, sizes=(1,))
    one = sub[:, 1:]                     # singletons: phrases or regions
    est, se = lk.shapley_interaction(sim, one, player_mask=pm, query_players=True, num_samples=33, backend=backend)
    assert torch.equal(est, torch.zeros_like(est)) and torch.equal(se, torch.zeros_like(se))


def test_additive_game_exactly_zero_and_one_sample():
    sim, sub = additive_game(DEV)
    est, se = lk.shapley_interaction(sim, sub, num_samples=17, seed=3, backend="cuda")
    assert torch.equal(est, torch.zeros_like(est)) and torch.equal(se, torch.zeros_like(se))
    est, se = lk.shapley_interaction(sim, sub, num_samples=1, seed=3, backend="cuda")
    assert torch.isinf(se).all()


def test_invalid_players_change_nothing():
    sim, qm, sub, pm = maxsim_case(8)
    check_invalid_players_change_nothing(sim, sub, pm, "cuda", query_mask=qm, num_samples=40, seed=3)
    sim, sub, pm = region_phrase_case(8)
    check_invalid_players_change_nothing(sim, sub, pm, "cuda", query_players=True, num_samples=40, seed=3)


def test_automatic_choice_is_cuda_and_deterministic():
    sim, qm, sub, pm = maxsim_case(9)
    a = lk.shapley_interaction(sim, sub, query_mask=qm, player_mask=pm, num_samples=40, seed=3)
    b = lk.shapley_interaction(sim, sub, query_mask=qm, player_mask=pm, num_samples=40, seed=3, backend="cuda")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
