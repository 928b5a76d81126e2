"""Shapley coalition sampling: the pinned draw, the exact oracle, unbiasedness, every CPU backend."""
from __future__ import annotations

import importlib.util
import math
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import torch

import loupe_kernels as lk
from loupe_kernels import shapley as sh
from loupe_kernels import testing as lkt
from loupe_kernels.testing import exact_shapley_interaction

BACKENDS = [b for b in ("reference", "cpu") if b in lk.available_backends()]
HAS_CPU = "cpu" in lk.available_backends()


# ------------------------------------------------------------------------------------------------
# independent float64 games on frozensets of player indices (python loops, no shared code)
# ------------------------------------------------------------------------------------------------
def maxsim_game(sim: torch.Tensor, qmask=None):
    """v(C) = mean over valid tokens j of max_{i in C} sim[j, i]; sim [Lq, n] float64."""
    s = sim.double().tolist()
    rows = [j for j in range(len(s)) if qmask is None or bool(qmask[j])]

    def v(C):
        if not C or not rows:
            return 0.0
        return sum(max(s[j][i] for i in C) for j in rows) / len(rows)
    return v


def region_phrase_game(sim: torch.Tensor):
    """Players: Lq queries first, then n keys; v = mean over queries in C of max over keys in C."""
    s = sim.double().tolist()
    Lq = len(s)

    def v(C):
        qs = [j for j in C if j < Lq]
        ks = [i - Lq for i in C if i >= Lq]
        if not qs or not ks:
            return 0.0
        return sum(max(s[j][i] for i in ks) for j in qs) / len(qs)
    return v


def normalized_sum_game(x: torch.Tensor, t: torch.Tensor):
    """v(C) = <normalize(sum_{i in C} x_i), t>: a smooth non-additive test game for the oracle identities."""
    x, t = x.double(), t.double()

    def v(C):
        if not C:
            return 0.0
        z = x[sorted(C)].sum(0)
        return float(z @ t) / max(float(z.norm()), 1e-12)
    return v


def unanimity(T):
    T = frozenset(T)
    return lambda C: 1.0 if T <= C else 0.0


def restrict(v, valid):
    """The game on the valid players only, relabelled 0..n_valid-1."""
    valid = list(valid)
    return lambda C: v(frozenset(valid[i] for i in C))


def exact_for(v, valid_players, S):
    valid = [p for p in range(len(valid_players)) if valid_players[p]]
    pos = {p: i for i, p in enumerate(valid)}
    return exact_shapley_interaction(restrict(v, valid), len(valid), [pos[p] for p in S])


def expectation_over_support(v, players, S):
    """Sum over every coalition C of the pool of P(C) * G(C), P(C) = 1 / (n' binom(n'-1, |C|))."""
    S = frozenset(S)
    pool = [p for p in players if p not in S]
    nprime = len(pool) + 1
    total = 0.0
    for size in range(len(pool) + 1):
        p = 1.0 / (nprime * math.comb(nprime - 1, size))
        for tup in combinations(pool, size):
            C = frozenset(tup)
            total += p * (v(C | S) - sum(v(C | {i}) for i in S) + (len(S) - 1) * v(C))
    return total


def subsets_from(lists, P):
    """bool [G, M, P] from a nested list [G][M] of member lists."""
    G, M = len(lists), len(lists[0])
    out = torch.zeros((G, M, P), dtype=torch.bool)
    for g in range(G):
        for m in range(M):
            out[g, m, list(lists[g][m])] = True
    return out


# ------------------------------------------------------------------------------------------------
# the pinned draw
# ------------------------------------------------------------------------------------------------
def test_philox_known_answers():
    # METHOD section 5 / Random123 known-answer vectors for Philox4x32-10
    w = lkt.philox4x32_10(0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344, 0xA4093822, 0x299F31D0)
    assert [int(x) for x in w] == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]
    w = lkt.philox4x32_10(0, 0, 0, 0, 0, 0)
    assert [int(x) for x in w] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    w = lkt.philox4x32_10(*[0xFFFFFFFF] * 6)
    assert [int(x) for x in w] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


def _pinned_draw_by_hand(S, valid, k, m, g, seed, schedule="uniform"):
    """One coalition by the letter of METHOD section 5 (python ints, one word at a time)."""
    k0, k1 = seed & 0xFFFFFFFF, seed >> 32

    def word(kk, w):
        blk = lkt.philox4x32_10(kk, m, g, w // 4, k0, k1)
        return int(blk[w % 4])
    pool = [p for p in range(len(valid)) if valid[p] and p not in S]
    nprime = len(pool) + 1
    if schedule == "uniform":
        r = (word(k, 0) * nprime) >> 32
    else:
        r = (k + ((word(0, 0) * nprime) >> 32)) % nprime
    c, C = 0, set()
    for t, p in enumerate(pool):
        rem = len(pool) - t
        if word(k, 1 + t) * rem < (r - c) * (1 << 32):
            C.add(p)
            c += 1
    assert c == r
    return C


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("schedule", ["uniform", "round_robin"])
def test_sample_coalitions_matches_the_letter_of_the_spec(backend, schedule):
    P = 11
    valid = [True] * P
    valid[3] = valid[8] = False
    subsets = subsets_from([[[0, 1], [5]], [[2, 4, 6], [10]]], P)
    pm = torch.tensor(valid)[None].repeat(2, 1)
    seed = (7 << 32) + 12345
    C = lk.sample_coalitions(subsets, player_mask=pm, num_samples=6, seed=seed, size_schedule=schedule,
                             backend=backend)
    assert C.shape == (2, 2, 6, P) and C.dtype == torch.bool
    for g in range(2):
        for m in range(2):
            S = set(subsets[g, m].nonzero().flatten().tolist())
            for k in range(6):
                want = _pinned_draw_by_hand(S, valid, k, m, g, seed, schedule)
                assert set(C[g, m, k].nonzero().flatten().tolist()) == want


def test_sample_coalitions_identical_across_backends():
    gen = torch.Generator().manual_seed(0)
    G, M, P = 3, 4, 300  # more than 256 players
    pm = torch.rand(G, P, generator=gen) > 0.2
    subsets = torch.zeros(G, M, P, dtype=torch.bool)
    for g in range(G):
        valid = pm[g].nonzero().flatten()
        for m in range(M):
            subsets[g, m, valid[torch.randperm(len(valid), generator=gen)[: m + 1]]] = True
    outs = {}
    for b in BACKENDS:
        for sched in ("uniform", "round_robin"):
            outs[b, sched] = lk.sample_coalitions(subsets, player_mask=pm, num_samples=20, seed=2**63 + 5,
                                                  size_schedule=sched, backend=b)
    for (b, sched), C in outs.items():
        assert torch.equal(C, outs["reference", sched]), (b, sched)
        assert not (C & ~pm[:, None, None, :]).any(), "an invalid player was drawn"
        assert not (C & subsets[:, :, None, :]).any(), "a member of S was drawn into C"


@pytest.mark.skipif(not HAS_CPU, reason="the C++ CPU extension is not built")
@pytest.mark.parametrize("schedule", ["uniform", "round_robin"])
def test_cpu_draw_across_word_groups(schedule):
    """The cpu draw makes the stream's words 32 at a time (player t reads word 1 + t) and stops at a
    group's start when the walk is done: pools of 30..65 players put the end of the walk and the
    group boundaries (t = 31, 63) at every relative position; every coalition must equal the
    reference's, which reads one word at a time."""
    gen = torch.Generator().manual_seed(4)
    for P in (1, 2, 30, 31, 32, 33, 62, 63, 64, 65, 97):
        pm = torch.ones(2, P, dtype=torch.bool)
        pm[1, 3::7] = False
        subsets = torch.zeros(2, 3, P, dtype=torch.bool)
        subsets[:, 0, P - 1] = True
        subsets[:, 1, 0] = True
        subsets[:, 2, P // 2] = True
        subsets &= pm[:, None, :]
        subsets[:, :, 1 if P > 1 else 0] |= ~subsets.any(-1)   # player 1 is valid in both games
        kw = dict(player_mask=pm, num_samples=40, seed=int(torch.randint(0, 2**62, (1,), generator=gen)),
                  size_schedule=schedule)
        C = lk.sample_coalitions(subsets, backend="cpu", **kw)
        assert torch.equal(C, lk.sample_coalitions(subsets, backend="reference", **kw)), P
        # the full range of sizes occurs, so the forced tail and the early stop are both exercised
        sizes = C.sum(-1)
        if P >= 30:
            assert int(sizes.min()) == 0 and bool((sizes == (pm[:, None, None, :] & ~subsets[:, :, None, :]).sum(-1)).any())


@pytest.mark.parametrize("backend", BACKENDS)
def test_invalid_players_never_drawn_and_determinism(backend):
    gen = torch.Generator().manual_seed(1)
    G, Lq, n, M = 4, 5, 12, 3
    sim = torch.randn(G, Lq, n, generator=gen)
    pm = torch.rand(G, n, generator=gen) > 0.4
    pm[:, :3] = True
    subsets = torch.zeros(G, M, n, dtype=torch.bool)
    subsets[:, 0, [0, 1]] = True
    subsets[:, 1, [2]] = True
    subsets[:, 2, [0, 1, 2]] = True
    C = lk.sample_coalitions(subsets, player_mask=pm, num_samples=200, seed=9, backend=backend)
    assert not (C & ~pm[:, None, None, :]).any()
    # sizes cover the whole range 0..n'-1, so the pool really is used
    sizes = C.sum(-1)
    nprime = (pm[:, None, :] & ~subsets).sum(-1) + 1
    assert torch.equal(sizes.amax(-1), nprime - 1) and int(sizes.amin()) == 0
    a = lk.shapley_interaction(sim, subsets, player_mask=pm, num_samples=32, seed=4, backend=backend)
    b = lk.shapley_interaction(sim, subsets, player_mask=pm, num_samples=32, seed=4, backend=backend)
    c = lk.shapley_interaction(sim, subsets, player_mask=pm, num_samples=32, seed=5, backend=backend)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0][:, [0, 2]], c[0][:, [0, 2]])
    # changing an invalid player's similarities changes nothing
    sim2 = sim.clone()
    sim2[~pm[:, None, :].expand_as(sim)] = 100.0
    d = lk.shapley_interaction(sim2, subsets, player_mask=pm, num_samples=32, seed=4, backend=backend)
    assert torch.equal(a[0], d[0])


def test_sampler_distribution_is_the_estimator_support():
    """Sizes uniform on {0..n'-1}; given its size, every coalition equally likely (chi-square)."""
    P, K = 6, 6000
    subsets = subsets_from([[[0, 1]]], P)  # pool = players 2..5, n' = 5
    C = lk.sample_coalitions(subsets, num_samples=K, seed=2024, backend="reference")[0, 0].numpy()
    sizes = C.sum(-1)
    counts = np.bincount(sizes, minlength=5)
    chi2 = ((counts - K / 5) ** 2 / (K / 5)).sum()
    assert chi2 < 30.0, counts  # 4 dof: P(chi2 > 30) ~ 5e-6
    for r in range(1, 4):
        rows = C[sizes == r][:, 2:]
        keys = [tuple(x) for x in rows.astype(int)]
        cats = sorted(set(keys))
        assert len(cats) == math.comb(4, r)
        obs = np.array([keys.count(c) for c in cats], dtype=float)
        exp = len(keys) / len(cats)
        assert ((obs - exp) ** 2 / exp).sum() < 35.0, (r, obs)


# ------------------------------------------------------------------------------------------------
# the exact oracle
# ------------------------------------------------------------------------------------------------
def test_exact_matches_shapiq_sii():
    shapiq = pytest.importorskip("shapiq", reason="shapiq<1.5 (test-only) is not installed")
    gen = torch.Generator().manual_seed(3)
    n = 6
    sim = torch.randn(4, n, generator=gen, dtype=torch.float64)
    v = maxsim_game(sim)

    def batch(coal):
        return np.array([v(frozenset(np.flatnonzero(row).tolist())) for row in coal])
    iv = shapiq.ExactComputer(n_players=n, game=batch)(index="SII", order=2)
    for i, j in combinations(range(n), 2):
        assert exact_shapley_interaction(v, n, [i, j]) == pytest.approx(iv[(i, j)], abs=1e-12)


def test_exact_unanimity_closed_form():
    n = 7
    rng = np.random.default_rng(0)
    for _ in range(25):
        T = set(rng.choice(n, size=rng.integers(1, n + 1), replace=False).tolist())
        S = set(rng.choice(n, size=rng.integers(1, 5), replace=False).tolist())
        want = (1.0 if len(T & S) >= 2 else 0.0) / (len(T - S) + 1)
        assert exact_shapley_interaction(unanimity(T), n, S) == pytest.approx(want, abs=1e-12)


def test_exact_rejects_bad_input():
    with pytest.raises(ValueError, match="n"):
        exact_shapley_interaction(lambda C: 0.0, 13, [0, 1])
    with pytest.raises(ValueError, match="S"):
        exact_shapley_interaction(lambda C: 0.0, 4, [])
    with pytest.raises(ValueError, match="S"):
        exact_shapley_interaction(lambda C: 0.0, 4, [0, 7])


@pytest.mark.parametrize("game", ["maxsim", "normalized_sum", "region_phrase", "unanimity"])
def test_expectation_over_support_equals_exact(game):
    gen = torch.Generator().manual_seed(11)
    n = 8
    if game == "maxsim":
        v = maxsim_game(torch.randn(5, n, generator=gen, dtype=torch.float64))
    elif game == "normalized_sum":
        v = normalized_sum_game(torch.randn(n, 6, generator=gen, dtype=torch.float64),
                                torch.randn(6, generator=gen, dtype=torch.float64))
    elif game == "region_phrase":
        v = region_phrase_game(torch.randn(3, n - 3, generator=gen, dtype=torch.float64))
    else:
        v = unanimity({0, 2, 5})
    for S in ([0, 1], [2, 5], [0, 3, 6], [4], [1, 2, 5, 7]):
        want = exact_shapley_interaction(v, n, S)
        assert abs(expectation_over_support(v, range(n), S) - want) <= 1e-12


# ------------------------------------------------------------------------------------------------
# estimates: unbiasedness (seeded z-tests), exact zeros, error decay
# ------------------------------------------------------------------------------------------------
def _maxsim_case(gen, G=2, Lq=4, n=9, dtype=torch.float64):
    sim = torch.randn(G, Lq, n, generator=gen, dtype=torch.float64)
    pm = torch.ones(G, n, dtype=torch.bool)
    pm[1, [4, 7]] = False
    qm = torch.ones(G, Lq, dtype=torch.bool)
    qm[1, 0] = False
    subsets = subsets_from([[[0, 1], [2, 3, 5], [6, 8]], [[0, 1], [2, 3, 5], [6, 8]]], n)
    return sim.to(dtype), qm, pm, subsets


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("schedule", ["uniform", "round_robin"])
def test_ztest_maxsim(backend, schedule):
    gen = torch.Generator().manual_seed(5)
    sim, qm, pm, subsets = _maxsim_case(gen)
    est, se = lk.shapley_interaction(sim, subsets, query_mask=qm, player_mask=pm, num_samples=1500, seed=77,
                                     size_schedule=schedule, backend=backend)
    for g in range(sim.shape[0]):
        v = maxsim_game(sim[g], qm[g])
        for m in range(subsets.shape[1]):
            S = subsets[g, m].nonzero().flatten().tolist()
            exact = exact_for(v, pm[g].tolist(), S)
            z = (float(est[g, m]) - exact) / float(se[g, m])
            assert abs(z) < 5, (g, m, est[g, m], exact, se[g, m])


@pytest.mark.parametrize("backend", BACKENDS)
def test_ztest_region_phrase(backend):
    gen = torch.Generator().manual_seed(6)
    G, Lq, n = 2, 3, 6
    sim = torch.randn(G, Lq, n, generator=gen, dtype=torch.float64)
    P = Lq + n
    pm = torch.ones(G, P, dtype=torch.bool)
    pm[1, [1, 7]] = False
    subsets = subsets_from([[[0, 3], [1, 2], [4, 5, 0]], [[0, 3], [2, 8], [4, 5, 0]]], P)
    est, se = lk.shapley_interaction(sim, subsets, player_mask=pm, query_players=True, num_samples=1500,
                                     seed=3, backend=backend)
    for g in range(G):
        v = region_phrase_game(sim[g])
        for m in range(3):
            S = subsets[g, m].nonzero().flatten().tolist()
            exact = exact_for(v, pm[g].tolist(), S)
            assert abs((float(est[g, m]) - exact) / float(se[g, m])) < 5, (g, m, est[g, m], exact)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_additive_game_and_singletons_are_exactly_zero(backend, dtype):
    """sim = diag(w) with w >= 0 makes the max-sim game additive: every sample is exactly 0."""
    n = 8
    w = torch.tensor([1.0, 3.0, 0.0, 2.0, 5.0, 1.0, 4.0, 2.0], dtype=dtype)
    sim = torch.diag(w)[None].repeat(2, 1, 1)
    subsets = subsets_from([[[0, 1], [2, 3, 4], [1, 5, 6, 7], [3]]] * 2, n)
    for seed in (0, 1, 12345, 2**64 - 1):
        for sched in ("uniform", "round_robin"):
            est, se = lk.shapley_interaction(sim, subsets, num_samples=17, seed=seed, size_schedule=sched,
                                             backend=backend)
            assert torch.equal(est, torch.zeros_like(est)) and torch.equal(se, torch.zeros_like(se))
    # |S| = 1 gives exactly 0 in any game
    gen = torch.Generator().manual_seed(0)
    sim = torch.randn(2, 5, n, generator=gen, dtype=dtype)
    single = subsets_from([[[0], [3], [7]]] * 2, n)
    assert torch.equal(lk.shapley_interaction(sim, single, num_samples=9, backend=backend)[0], torch.zeros(2, 3, dtype=dtype))


def test_rmse_falls_like_one_over_sqrt_k():
    gen = torch.Generator().manual_seed(2)
    n, G = 8, 150  # G independent replicas of one game (each game has its own counter)
    sim = torch.randn(1, 4, n, generator=gen, dtype=torch.float64).repeat(G, 1, 1)
    subsets = subsets_from([[[0, 1, 2]]] * G, n)
    exact = exact_shapley_interaction(maxsim_game(sim[0]), n, [0, 1, 2])
    backend = "cpu" if HAS_CPU else "reference"
    rmse = {}
    for K in (8, 128):
        est, _ = lk.shapley_interaction(sim, subsets, num_samples=K, seed=1, backend=backend)
        rmse[K] = float(((est[:, 0] - exact) ** 2).mean().sqrt())
    assert 3.0 < rmse[8] / rmse[128] < 5.3, rmse  # sqrt(16) = 4


def test_stderr_matches_the_sample_spread_and_k1_is_inf():
    gen = torch.Generator().manual_seed(4)
    sim, qm, pm, subsets = _maxsim_case(gen)
    for b in BACKENDS:
        est, se = lk.shapley_interaction(sim, subsets, num_samples=1, backend=b)
        assert torch.isinf(se).all() and torch.isfinite(est).all()
    C = lk.sample_coalitions(subsets, player_mask=pm, num_samples=40, seed=8)
    samples, _ = lkt.shapley_from_coalitions(lambda m: lkt.maxsim_values(sim, qm, m, False), subsets, C)
    est, se = lk.shapley_interaction(sim, subsets, query_mask=qm, player_mask=pm, num_samples=40, seed=8,
                                     backend="reference")
    torch.testing.assert_close(est, samples.mean(-1), rtol=0, atol=1e-14)
    torch.testing.assert_close(se, samples.std(-1) / math.sqrt(40), rtol=0, atol=1e-14)


def _benchmark_baselines():
    """benchmarks/baselines.py (not part of the package), loaded by path."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "baselines.py"
    spec = importlib.util.spec_from_file_location("loupe_benchmark_baselines", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_naive_and_torch_rng_baselines_agree_with_the_reference():
    gen = torch.Generator().manual_seed(12)
    G, Lq, n, D = 2, 3, 7, 4
    q = torch.randn(G, Lq, D, generator=gen, dtype=torch.float64)
    x = torch.randn(G, n, D, generator=gen, dtype=torch.float64)
    sim = torch.einsum("gjd,gid->gji", q, x)
    subsets = subsets_from([[[0, 1], [2, 3, 4]]] * G, n)
    C = lk.sample_coalitions(subsets, num_samples=12, seed=1)
    baselines = _benchmark_baselines()
    est, se = baselines.shapley_maxsim_naive(q, x, subsets, C)
    ref = lk.shapley_interaction(sim, subsets, num_samples=12, seed=1, backend="reference")
    torch.testing.assert_close(est, ref[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(se, ref[1], rtol=0, atol=1e-12)
    Ct = baselines.draw_coalitions_torch(subsets, None, 500, torch.Generator().manual_seed(0))
    assert not (Ct & subsets[:, :, None]).any()
    assert set(Ct[:, 0].sum(-1).unique().tolist()) == set(range(n - 1))  # sizes 0..n'-1, |S| = 2


# ------------------------------------------------------------------------------------------------
# backends agree with the float64 reference (to rounding)
# ------------------------------------------------------------------------------------------------
def _rounding_tol(ref_lo: torch.Tensor, ref64: torch.Tensor) -> float:
    return 2 * float((ref_lo.double() - ref64).abs().max()) + 1e-6 * float(ref64.abs().max()) + 1e-12


@pytest.mark.skipif(not HAS_CPU, reason="the C++ CPU extension is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("query_players", [False, True])
def test_cpu_maxsim_matches_reference(dtype, query_players):
    gen = torch.Generator().manual_seed(31)
    G, Lq, n = 3, 6, 20
    sim = torch.randn(G, Lq, n, generator=gen).to(dtype)
    P = Lq + n if query_players else n
    pm = torch.rand(G, P, generator=gen) > 0.25
    pm[:, :2] = True
    pm[:, Lq:Lq + 2] = True
    qm = None if query_players else torch.rand(G, Lq, generator=gen) > 0.3
    lists = [[[0, 1], [0], [1, Lq], [Lq, Lq + 1, 0]]] * G
    subsets = subsets_from(lists, P)
    kw = dict(query_mask=qm, player_mask=pm, query_players=query_players, num_samples=50, seed=99)
    ref64 = lk.shapley_interaction(sim.double(), subsets, backend="reference", **kw)
    ref_lo = lk.shapley_interaction(sim, subsets, backend="reference", **kw)
    out = lk.shapley_interaction(sim, subsets, backend="cpu", **kw)
    want_dt = torch.float64 if dtype == torch.float64 else torch.float32
    assert out[0].dtype == want_dt and out[1].dtype == want_dt
    for i in range(2):
        tol = _rounding_tol(ref_lo[i], ref64[i])
        assert float((out[i].double() - ref64[i]).abs().max()) <= tol


@pytest.mark.skipif(not HAS_CPU, reason="the C++ CPU extension is not built")
def test_cpu_many_players_and_empty_query_mask():
    gen = torch.Generator().manual_seed(33)
    G, Lq, n = 2, 3, 260
    sim = torch.randn(G, Lq, n, generator=gen, dtype=torch.float64)
    qm = torch.ones(G, Lq, dtype=torch.bool)
    qm[1] = False  # a game without valid query tokens: v = 0 everywhere
    subsets = subsets_from([[[0, 1, 250], [7, 259]]] * G, n)
    ref = lk.shapley_interaction(sim, subsets, query_mask=qm, num_samples=8, seed=1, backend="reference")
    out = lk.shapley_interaction(sim, subsets, query_mask=qm, num_samples=8, seed=1, backend="cpu")
    torch.testing.assert_close(out[0], ref[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(out[1], ref[1], rtol=0, atol=1e-12)
    assert torch.equal(out[0][1], torch.zeros(2, dtype=torch.float64))


@pytest.mark.skipif(not HAS_CPU, reason="the C++ CPU extension is not built")
def test_custom_ops_opcheck():
    gen = torch.Generator().manual_seed(34)
    sim = torch.randn(2, 3, 6, generator=gen)
    subsets = subsets_from([[[0, 1], [2, 3, 4]]] * 2, 6)
    ones = torch.ones(2, 3, dtype=torch.bool)
    pm = torch.ones(2, 6, dtype=torch.bool)
    torch.library.opcheck(sh._maxsim_op, (sim, ones, subsets, pm, False, 4, 3, 0, "cpu"))
    torch.library.opcheck(sh._maxsim_op, (sim, ones, subsets, pm, False, 4, -3, 1, "cpu"))  # seed >= 2^63, round robin
    torch.library.opcheck(sh._coalitions_op, (subsets, pm, 4, 3, 0, "cpu"))


# ------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------
def test_bad_input_names_the_argument():
    sim = torch.randn(2, 3, 5)
    subsets = subsets_from([[[0, 1]]] * 2, 5)
    f = lk.shapley_interaction
    with pytest.raises(ValueError, match="subsets"):
        f(sim, subsets_from([[[0, 1]]] * 2, 6))
    with pytest.raises(ValueError, match="empty subset"):
        f(sim, torch.zeros(2, 1, 5, dtype=torch.bool))
    pm = torch.ones(2, 5, dtype=torch.bool)
    pm[0, 1] = False
    with pytest.raises(ValueError, match="player_mask"):
        f(sim, subsets, player_mask=pm)
    with pytest.raises(ValueError, match="num_samples"):
        f(sim, subsets, num_samples=0)
    with pytest.raises(TypeError, match="num_samples"):
        f(sim, subsets, num_samples=2.0)
    with pytest.raises(ValueError, match="seed"):
        f(sim, subsets, seed=-1)
    with pytest.raises(ValueError, match="seed"):
        f(sim, subsets, seed=2**64)
    with pytest.raises(ValueError, match="size_schedule"):
        f(sim, subsets, size_schedule="sorted")
    bad = sim.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="sim"):
        f(bad, subsets)
    with pytest.raises(ValueError, match="query_mask"):
        f(sim, subsets_from([[[0, 1]]] * 2, 8), query_players=True, query_mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="query_mask"):
        f(sim, subsets, query_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="subsets"):
        f(sim, subsets.int())
    with pytest.raises(ValueError, match="too many players"):
        f(torch.randn(1, 1, sh.MAX_PLAYERS + 1), torch.ones(1, 1, sh.MAX_PLAYERS + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="backend"):
        f(sim, subsets, backend="metal")
    with pytest.raises(ValueError, match="num_samples"):
        lk.sample_coalitions(subsets, num_samples=0, seed=0)
