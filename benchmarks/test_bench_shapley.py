"""shapley_interaction on the CPU: naive and vectorised PyTorch paths vs the C++ kernel.

Issue #4, fp32, G=32 games, n=49 players, Lq=32, D=256, M=8 subsets of size 3, K=64, similarity
given, coalition drawing inside the timed region on every side. Targets: cpu >= 100x faster than the
naive path (masked copies of the features per coalition, the value recomputed from the features for
each of the s+2 terms) and >= 10x faster than the vectorised path (similarity once, coalitions from
torch's RNG, each term by ``torch.where(mask, sim, -inf).amax(-1)`` then mean). Issue 20: cpu >= 2x
the kernel before it (``cpu_before``: the ``.so`` named by ``LOUPE_BENCH_BEFORE_SO``, a build of an
earlier commit; skipped when unset), both called directly, without the Python wrapper.
"""
from __future__ import annotations

import os

import pytest
import torch

import loupe_kernels as lk

from baselines import draw_coalitions_torch, load_cpu_extension, shapley_maxsim_naive, shapley_maxsim_vectorised

HAS_CPU = "cpu" in lk.available_backends()
BEFORE = load_cpu_extension(os.environ.get("LOUPE_BENCH_BEFORE_SO"))
G, N, LQ, D, M, S, K = 32, 49, 32, 256, 8, 3, 64
GROUP = f"shapley_interaction / G={G} n={N} Lq={LQ} D={D} M={M} s={S} K={K} / fp32"


def inputs():
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(G, LQ, D, generator=g), dim=-1)
    x = torch.nn.functional.normalize(torch.randn(G, N, D, generator=g), dim=-1)
    sim = torch.einsum("gjd,gid->gji", q, x).contiguous()
    subsets = torch.zeros(G, M, N, dtype=torch.bool)
    for gg in range(G):
        for m in range(M):
            subsets[gg, m, torch.randperm(N, generator=g)[:S]] = True
    return q, x, sim, subsets


def _sim_variant(variant, sim, subsets, gen):
    """(function, rounds, warmup rounds) of the paths that start from the similarity: "vectorised" or
    "cpu"."""
    if variant == "vectorised":
        return (lambda: shapley_maxsim_vectorised(sim, subsets, K, gen)), 3, 1
    return (lambda: lk.shapley_interaction(sim, subsets, num_samples=K, seed=1, backend="cpu")), 20, 2


@pytest.mark.parametrize("variant", ["naive", "vectorised", "cpu"])
def test_maxsim(benchmark, variant):
    if variant == "cpu" and not HAS_CPU:
        pytest.skip("cpu backend not built")
    q, x, sim, subsets = inputs()
    gen = torch.Generator().manual_seed(1)
    benchmark.group = GROUP
    benchmark.extra_info["variant"] = variant
    if variant == "naive":
        def fn():
            C = draw_coalitions_torch(subsets, None, K, gen)
            return shapley_maxsim_naive(q, x, subsets, C)
        rounds, warmup = 1, 0
    else:
        fn, rounds, warmup = _sim_variant(variant, sim, subsets, gen)
    if variant == "cpu":
        benchmark.extra_info["target"] = {"vs": "naive", "min_speedup": 100.0}
        benchmark.extra_info["note"] = ("cpu target also >= 10x vs vectorised; naive = masked feature copies "
                                        "per coalition and term, vectorised = torch RNG + where/amax per term")
    with torch.no_grad():
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=warmup)


@pytest.mark.parametrize("variant", ["vectorised", "cpu"])
def test_maxsim_vs_vectorised(benchmark, variant):
    """The same comparison grouped so the 10x target against the vectorised path is checked."""
    if variant == "cpu" and not HAS_CPU:
        pytest.skip("cpu backend not built")
    _, _, sim, subsets = inputs()
    gen = torch.Generator().manual_seed(1)
    benchmark.group = GROUP + " / vs vectorised"
    benchmark.extra_info["variant"] = variant
    fn, rounds, warmup = _sim_variant(variant, sim, subsets, gen)
    if variant == "cpu":
        benchmark.extra_info["target"] = {"vs": "vectorised", "min_speedup": 10.0}
    with torch.no_grad():
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=warmup)


@pytest.mark.parametrize("variant", ["cpu", "cpu_before"])
def test_maxsim_vs_before(benchmark, variant):
    """The kernel against its build before issue 20, both called directly (same arguments)."""
    if not HAS_CPU:
        pytest.skip("cpu backend not built")
    if variant == "cpu_before" and BEFORE is None:
        pytest.skip("LOUPE_BENCH_BEFORE_SO not set (path of an earlier build of loupe_kernels._cpu)")
    _, _, sim, subsets = inputs()
    qm = torch.ones(G, LQ, dtype=torch.bool)
    pm = torch.ones(G, N, dtype=torch.bool)
    ext = BEFORE if variant == "cpu_before" else lk._backends.extension("cpu")
    benchmark.group = GROUP + " / kernel vs before"
    benchmark.extra_info["variant"] = variant
    if variant == "cpu":
        benchmark.extra_info["target"] = {"vs": "cpu_before", "min_speedup": 2.0}
    with torch.no_grad():
        benchmark.pedantic(lambda: ext.shapley_maxsim(sim, qm, subsets, pm, False, K, 1, 0, None),
                           rounds=20, iterations=1, warmup_rounds=2)
