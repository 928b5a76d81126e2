"""UANSIL: the predictor and the skip policy that loupe.objectives runs (decisions, running statistics)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import loupe_kernels as lk
from loupe_kernels.uansil import LOG_VAR_BOUND, InteractionPredictor, UansilPolicy

BACKEND = "cpu" if "cpu" in lk.available_backends() else "reference"


@pytest.fixture
def one_thread():
    """The study is many small ops: one thread avoids OpenMP contention on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------------
# a family of pooled games from latent factors (the predictor sees the factors)
# ------------------------------------------------------------------------------------------------
N, D, L = 12, 8, 3
SUBS = [(0, 1), (2, 3, 4)]
M = len(SUBS)


class Family:
    def __init__(self, seed: int = 123) -> None:
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(N, L, D, generator=g)
        self.B = torch.randn(N, D, generator=g) * 0.5
        self.U = torch.randn(L, D, generator=g)
        self.subsets = torch.zeros(M, N, dtype=torch.bool)
        for m, S in enumerate(SUBS):
            self.subsets[m, list(S)] = True

    def games(self, G: int, gen: torch.Generator):
        """(features [G, n, D], target [G, D], subsets [G, M, n], predictor input [G, M, L + M])."""
        z = torch.randn(G, L, generator=gen)
        X = torch.tanh(torch.einsum("gl,nld->gnd", z, self.W) + self.B)
        t = F.normalize(torch.tanh(z @ self.U) + 0.3, dim=-1)
        feats = torch.cat([z[:, None, :].expand(G, M, L), torch.eye(M).expand(G, M, M)], -1)
        return X, t, self.subsets.expand(G, M, N).contiguous(), feats


def exact_pooled(X: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Exact I([S]) of every game and subset of SUBS by enumerating all 2^n coalitions (vectorised)."""
    codes = torch.arange(2 ** N)
    masks = ((codes[:, None] >> torch.arange(N)) & 1).double()  # row c = coalition with bit mask c
    sums = torch.einsum("cn,gnd->gcd", masks, X.double())
    v = (F.normalize(sums, dim=-1, eps=1e-12) * t.double()[:, None, :]).sum(-1)  # [G, 2^n]; v(empty) = 0
    out = torch.zeros(X.shape[0], M, dtype=torch.float64)
    for m, S in enumerate(SUBS):
        smask = sum(1 << i for i in S)
        C = codes[(codes & smask) == 0]
        nprime = N - len(S) + 1
        p = torch.tensor([1.0 / (nprime * math.comb(nprime - 1, int(k))) for k in masks[C].sum(-1)],
                         dtype=torch.float64)
        g = v[:, C | smask] - sum(v[:, C | (1 << i)] for i in S) + (len(S) - 1) * v[:, C]
        out[:, m] = (g * p).sum(-1)
    return out


def test_vectorised_exact_matches_library_oracle():
    fam = Family()
    X, t, _, _ = fam.games(2, torch.Generator().manual_seed(5))
    ex = exact_pooled(X, t)
    for g in range(2):
        def v(c, g=g):
            if not c:
                return 0.0
            s = X[g, sorted(c)].double().sum(0)
            return float(F.normalize(s, dim=0, eps=1e-12) @ t[g].double())
        for m, S in enumerate(SUBS):
            assert ex[g, m].item() == pytest.approx(lk.reference.exact_shapley_interaction(v, N, S), abs=1e-12)


def _decide(policy, log_var, step, *, enabled=True, warmup=2, threshold=0.5, calibration=0.25, seed=3):
    return policy.decide(log_var, step, torch.Generator().manual_seed(seed), enabled=enabled, warmup=warmup,
                         threshold=threshold, calibration=calibration)


def test_policy_samples_everything_when_off_warming_up_or_without_statistics():
    policy = UansilPolicy(4, hidden=8)
    lv = torch.full((10,), -30.0)  # very sure
    for kw, step in ((dict(enabled=False), 10), (dict(), 1), (dict(), 10)):  # off; warm-up; running_var = 0
        sample, calib = _decide(policy, lv, step, **kw)
        assert sample.all() and not calib.any()


def test_policy_skips_confident_games_except_calibration_draws():
    policy = UansilPolicy(4, hidden=8)
    policy.update(torch.tensor([0.0, 2.0]))  # running variance 1
    assert float(policy.running_var) == pytest.approx(1.0) and int(policy.steps) == 1
    G = 400
    lv = torch.full((G,), 5.0)  # unsure: std e^2.5 > 0.5
    lv[: G // 2] = -30.0         # sure
    sample, calib = _decide(policy, lv, step=5)
    assert sample[G // 2:].all() and not calib[G // 2:].any()
    assert torch.equal(sample[: G // 2], calib[: G // 2])
    share = float(calib[: G // 2].double().mean())
    assert 0.15 < share < 0.35  # calibration = 0.25 of the confident games
    again, _ = _decide(policy, lv, step=5)
    assert torch.equal(sample, again)  # the caller's generator fixes the decisions
    # the threshold is relative to the running standard deviation
    sample_hi, _ = _decide(policy, torch.zeros(G), step=5, threshold=2.0, calibration=0.0)
    sample_lo, _ = _decide(policy, torch.zeros(G), step=5, threshold=0.5, calibration=0.0)
    assert not sample_hi.any() and sample_lo.all()


def test_running_variance_is_an_ema_of_the_sampled_variance():
    policy = UansilPolicy(4, hidden=8)
    policy.update(torch.tensor([]))  # nothing sampled: no change
    assert int(policy.steps) == 0
    policy.update(torch.tensor([1.0, 3.0]))  # var 1
    policy.update(torch.tensor([0.0, 4.0]), momentum=0.5)  # var 4
    assert float(policy.running_var) == pytest.approx(2.5)
    assert int(policy.steps) == 2
    state = policy.state_dict()
    assert {"running_var", "steps"} <= set(state)  # checkpointed with the model


def test_predictor_log_variance_is_bounded_and_trains():
    pred = UansilPolicy(3, hidden=8)
    mu, lv = pred(torch.full((4, 3), 1e4))
    assert (lv.abs() <= LOG_VAR_BOUND).all()
    mu, lv = pred(torch.randn(6, 3))
    loss = lk.uncertainty_interaction_loss(mu, lv, torch.randn(6), target_var=torch.full((6,), 0.01))
    loss.backward()
    assert pred.predictor.net[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("make,words", [
    (lambda: InteractionPredictor(0), "in_features"),
    (lambda: InteractionPredictor(3, layers=0), "layers"),
    (lambda: InteractionPredictor(3)(torch.zeros(2, 4)), "must end in 3"),
])
def test_bad_input(make, words):
    with pytest.raises(ValueError, match=words):
        make()


def _stats(hits, games, sse=0.0, s1=0.0, s2=0.0):
    return torch.tensor([hits, games, sse, s1, s2], dtype=torch.float64)


def test_rolling_calibration_over_a_window_of_steps():
    policy = UansilPolicy(4, hidden=8, window=3, min_games=10)
    assert policy.rolling_calibration() is None
    policy.record_calibration(_stats(4, 5))
    assert policy.rolling_calibration() is None  # 5 checked games < min_games
    policy.record_calibration(_stats(5, 5))
    assert policy.rolling_calibration() == pytest.approx(9 / 10)
    policy.record_calibration(_stats(0, 10))
    policy.record_calibration(_stats(10, 10))  # the first step leaves the window of 3
    assert policy.rolling_calibration() == pytest.approx(15 / 25)
    assert {"calib_window", "calib_pos"} <= set(policy.state_dict())
    with pytest.raises(ValueError, match="5 statistics"):
        policy.record_calibration(torch.tensor([1.0, 2.0]))


def test_calibration_stats_and_skill_match_their_definitions():
    g = torch.Generator().manual_seed(0)
    I, mu = torch.randn(40, generator=g), torch.randn(40, generator=g)
    lv, tv = torch.randn(40, generator=g), torch.rand(40, generator=g)
    st = UansilPolicy.calibration_stats(I, mu, lv, tv)
    I64, mu64 = I.double(), mu.double()
    hits = ((I64 - mu64).abs() < 2 * (lv.double().exp() + tv.double()).sqrt()).sum()
    assert st.dtype == torch.float64 and st.tolist() == pytest.approx(
        [float(hits), 40.0, float(((I64 - mu64) ** 2).sum()), float(I64.sum()), float((I64 ** 2).sum())])
    coverage, skill = UansilPolicy.summarise(st)
    assert coverage == pytest.approx(float(hits) / 40)
    assert skill == pytest.approx(1 - float(((I64 - mu64) ** 2).sum() / ((I64 - I64.mean()) ** 2).sum()))
    # exact predictions: skill 1; the targets' own mean: skill 0; constant targets: no skill defined
    assert UansilPolicy.summarise(UansilPolicy.calibration_stats(I, I, lv))[1] == pytest.approx(1.0)
    assert UansilPolicy.summarise(UansilPolicy.calibration_stats(I, torch.full_like(I, float(I.double().mean())),
                                                                 lv))[1] == pytest.approx(0.0, abs=1e-9)
    assert UansilPolicy.summarise(UansilPolicy.calibration_stats(torch.ones(5), torch.ones(5), lv[:5]))[1] is None
    assert UansilPolicy.summarise(st, min_games=41) == (None, None)
    with pytest.raises(ValueError, match="one value per game"):
        UansilPolicy.calibration_stats(I, mu[:3], lv)


def _gate_stream(policy, predict, *, steps, G=400, min_skill, seed=0):
    """Run the policy on a stream of games whose interactions vary (std 1); ``predict(I) -> (mu,
    log_var)`` is the predictor. Returns the fraction of games sampled at each step."""
    g = torch.Generator().manual_seed(seed)
    kw = dict(enabled=True, warmup=0, threshold=1e9, calibration=0.05, min_fraction=0.1,
              min_calibration=0.8, min_skill=min_skill)
    gen = torch.Generator().manual_seed(seed + 1)
    fractions = []
    for step in range(steps):
        I = torch.randn(G, generator=g)
        mu, lv = predict(I, g)
        policy.update(I)
        sample, calib = policy.decide(lv, step, gen, **kw)
        fractions.append(float(sample.double().mean()))
        policy.record_calibration(UansilPolicy.calibration_stats(I[calib], mu[calib], lv[calib]))
    return fractions


def test_a_flat_wide_predictor_passes_coverage_but_not_the_skill_gate():
    """The collapse behind the gate (docs/METHOD-notes.md): a predictor that outputs the targets' mean
    with a wide variance covers every target (coverage ~1) and carries nothing (skill ~0). The
    coverage gate alone lets it skip; with the skill gate every game stays sampled. A predictor that
    knows the targets up to small noise passes both and skips."""
    def flat(I, g):
        return torch.zeros_like(I), torch.full_like(I, math.log(25.0))  # sd 5 around the mean 0

    def good(I, g):
        return I + 0.1 * torch.randn(I.shape, generator=g), torch.full_like(I, math.log(0.01))

    p = UansilPolicy(4, hidden=8, window=5, min_games=20)
    f = _gate_stream(p, flat, steps=8, min_skill=None)
    assert p.rolling_calibration() > 0.99 and abs(p.rolling_skill()) < 0.1
    assert f[-1] < 0.3  # the coverage gate alone: skipping
    p = UansilPolicy(4, hidden=8, window=5, min_games=20)
    f = _gate_stream(p, flat, steps=8, min_skill=0.5)
    assert all(x == 1.0 for x in f) and p.rolling_calibration() > 0.99 and abs(p.rolling_skill()) < 0.1
    p = UansilPolicy(4, hidden=8, window=5, min_games=20)
    f = _gate_stream(p, good, steps=8, min_skill=0.5)
    assert p.rolling_skill() > 0.95 and f[0] == 1.0 and f[-1] < 0.3


def test_an_old_checkpoint_window_restarts_empty():
    """Policies saved before the skill statistics hold a [window, 2] window: it loads, and the gate
    has to be earned again."""
    p = UansilPolicy(4, hidden=8, window=3, min_games=1)
    state = p.state_dict()
    state["calib_window"] = torch.tensor([[4.0, 5.0], [5.0, 5.0], [0.0, 0.0]], dtype=torch.float64)
    q = UansilPolicy(4, hidden=8, window=3, min_games=1)
    q.load_state_dict(state)
    assert q.calib_window.shape == (3, 5) and q.rolling_calibration() is None


def test_policy_skips_only_while_calibrated_and_keeps_a_floor():
    """A constructed stream: the predictor is calibrated for 5 steps, then wrong for 5 steps. Games
    are skipped only while the rolling calibration holds; a floor of games is always sampled."""
    torch.manual_seed(0)
    G, W = 2000, 3
    policy = UansilPolicy(4, hidden=8, window=W, min_games=20)
    policy.update(torch.tensor([0.0, 2.0]))  # running std 1
    lv = torch.full((G,), -30.0)  # every game confident
    kw = dict(enabled=True, warmup=0, threshold=0.5, calibration=0.05, min_fraction=0.1, min_calibration=0.8)
    gen = torch.Generator().manual_seed(1)
    # not calibrated yet: everything sampled, every confident game is a check
    sample, calib = policy.decide(lv, 1, gen, **kw)
    assert sample.all() and calib.all()
    fractions = []
    for step in range(10):
        sample, calib = policy.decide(lv, step, gen, **kw)
        fractions.append(float(sample.double().mean()))
        assert torch.equal(sample, calib)  # every sampled confident game is a check
        good = step < 5
        hits = int(calib.sum()) if good else 0  # calibrated: all checks inside 2 sigma; then none
        policy.record_calibration(_stats(hits, int(calib.sum())))
    # first step: nothing recorded -> all sampled; then skipping with ~5% + 10% sampled
    assert fractions[0] == 1.0
    assert all(0.1 < f < 0.2 for f in fractions[1:6])
    # after the predictor goes wrong, the rolling calibration falls below 0.8 and sampling is back to 100%
    assert fractions[-1] == 1.0 and policy.rolling_calibration() < 0.8
    # without the safety (min_calibration 0) the same stream keeps skipping
    s0, _ = policy.decide(lv, 20, gen, **{**kw, "min_calibration": 0.0})
    assert float(s0.double().mean()) < 0.2


def test_predictor_in_bf16_takes_float32_features():
    """Under mixed precision the predictor's weights are bf16 while the game features are float32."""
    policy = UansilPolicy(4, hidden=8).to(torch.bfloat16)
    mu, lv = policy(torch.randn(5, 4))
    assert mu.dtype == torch.float32 and lv.dtype == torch.float32 and torch.isfinite(mu).all()
