"""UANSIL: the predictor, the sampling policy and the issue-#5 study on pooled games."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import loupe_kernels as lk
from loupe_kernels.uansil import InteractionPredictor, UansilConfig, UansilPolicy, maxsim_sampler, pooled_sampler

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


@pytest.mark.timeout(120)
def test_uansil_study_calibration_skips_and_error(one_thread):
    """Issue #5: after training, calibration in [0.85, 0.99] on held-out games; with the policy on
    at least half the games skip sampling, and the mean squared error of the returned interactions
    against the exact ones is at most 1.5x that of sampling every game with K = 64."""
    torch.manual_seed(0)
    K, BATCH, WARMUP = 64, 128, 1500
    fam = Family()
    pred = InteractionPredictor(L + M, hidden=64, layers=2)
    policy = UansilPolicy(pred, UansilConfig(warmup_steps=WARMUP, skip_threshold=0.5, calibration_fraction=0.1,
                                             seed=0))
    opt = torch.optim.Adam(pred.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(WARMUP):
        X, t, subs, feats = fam.games(BATCH, gen)
        res = policy(feats, pooled_sampler(X, t, subs, num_samples=K, backend=BACKEND))
        assert res.sampled.all()  # warm-up samples every game
        loss = policy.loss(res)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not policy.warming_up

    X, t, subs, feats = fam.games(1000, torch.Generator().manual_seed(99))
    exact = exact_pooled(X, t)
    est_all, se_all = lk.shapley_interaction_pooled(X, t, subs, num_samples=K, seed=7, backend=BACKEND)
    with torch.no_grad():
        mu, log_var = policy.predict(feats)
    total_sd = (torch.exp(log_var.double()) + se_all.double() ** 2).sqrt()
    calibration = ((est_all.double() - mu.double()).abs() < 2 * total_sd).double().mean().item()
    mse_all = ((est_all.double() - exact) ** 2).mean().item()

    res = policy(feats, pooled_sampler(X, t, subs, num_samples=K, backend=BACKEND))
    mse_policy = ((res.interactions.double() - exact) ** 2).mean().item()
    report = (f"calibration={calibration:.3f} policy={res.stats} mse_policy={mse_policy:.3e} "
              f"mse_sample_all={mse_all:.3e} ratio={mse_policy / mse_all:.2f}")
    print(report)
    assert 0.85 <= calibration <= 0.99, report
    assert res.stats["fraction_sampled"] <= 0.5, report
    assert res.stats["work_saved"] == pytest.approx(1 - res.stats["fraction_sampled"])
    assert mse_policy <= 1.5 * mse_all, report
    # the returned interactions are the sampled estimate where sampled, mu elsewhere
    assert torch.equal(res.interactions[res.sampled], res.estimate[res.sampled])
    assert torch.equal(res.interactions[~res.sampled], res.mu.detach()[~res.sampled].float())
    assert res.calibration.any() and res.sampled[res.calibration].all()
    assert 0.0 <= res.stats["calibration"] <= 1.0


# ------------------------------------------------------------------------------------------------
# policy mechanics with a stub predictor
# ------------------------------------------------------------------------------------------------
class Fixed(torch.nn.Module):
    """Predicts mu = feature 0, log_var = feature 1 (a parameter keeps it trainable)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.a * x[..., 0], x[..., 1]


def stub_sampler(calls):
    def sample(pairs, seed):
        calls.append(pairs.clone())
        return pairs[:, 0].double() + 0.5 * pairs[:, 1].double(), torch.full((pairs.shape[0],), 0.1)
    return sample


def test_policy_warmup_skip_calibration_and_loss():
    policy = UansilPolicy(Fixed(), UansilConfig(warmup_steps=2, skip_threshold=0.5, calibration_fraction=0.25,
                                                seed=3, standardize=False))
    G, Mm = 40, 2
    feats = torch.ones(G, Mm, 2)  # mu = 1
    feats[..., 1] = 5.0  # very unsure
    feats[:20, :, 1] = -30.0  # sure: predicted std tiny
    calls = []
    for _ in range(2):
        res = policy(feats, stub_sampler(calls))
        assert res.sampled.all() and res.stats["warming_up"] is True
        assert calls[-1].shape[0] == G * Mm
    assert policy.running_std > 0
    res = policy(feats, stub_sampler(calls))
    # sure games skip unless drawn for calibration; unsure games are sampled
    assert res.sampled[20:].all()
    assert torch.equal(res.sampled[:20], res.calibration[:20])
    assert calls[-1].shape[0] == int(res.sampled.sum())  # the sampler only sees the sampled pairs
    assert res.stats["fraction_sampled"] < 1.0
    assert torch.isnan(res.estimate[~res.sampled]).all()
    g = torch.arange(G)[:, None].double().expand(G, Mm)
    want = g + 0.5 * torch.arange(Mm).double()
    assert torch.allclose(res.interactions[res.sampled].double(), want[res.sampled])
    assert (res.interactions[~res.sampled] == 1).all()  # mu of the stub
    # the loss covers the sampled games only (NaN targets of the skipped never enter) and trains g
    loss = policy.loss(res)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(policy.predictor.a.grad) and policy.predictor.a.grad != 0


def test_standardized_predictions_follow_running_statistics():
    pred = InteractionPredictor(3, hidden=8)
    policy = UansilPolicy(pred, UansilConfig(warmup_steps=0, calibration_fraction=0.0))
    x = torch.randn(5, 2, 3)
    raw_mu, raw_lv = pred(x)
    policy.run_mean.fill_(0.2)
    policy.run_sq.fill_(0.2 ** 2 + 0.03 ** 2)
    mu, lv = policy.predict(x)
    torch.testing.assert_close(mu, 0.2 + 0.03 * raw_mu)
    torch.testing.assert_close(lv, raw_lv + 2 * math.log(0.03))
    _, lv_bound = pred(torch.full((4, 3), 1e4))
    assert (lv_bound.abs() <= 20).all()


def test_maxsim_sampler_equals_direct_call_on_the_selected_pairs():
    g = torch.Generator().manual_seed(4)
    sim = torch.randn(3, 5, 9, generator=g)
    subsets = torch.zeros(3, 2, 9, dtype=torch.bool)
    subsets[:, 0, [0, 1]] = True
    subsets[:, 1, [2, 5, 7]] = True
    pairs = torch.tensor([[0, 1], [2, 0], [1, 1]])
    est, se = maxsim_sampler(sim, subsets, num_samples=16, backend=BACKEND)(pairs, 11)
    want, wse = lk.shapley_interaction(sim[pairs[:, 0]], subsets[pairs[:, 0], pairs[:, 1]][:, None], num_samples=16,
                                       seed=11, backend=BACKEND)
    torch.testing.assert_close(est, want[:, 0])
    torch.testing.assert_close(se, wse[:, 0])


@pytest.mark.parametrize("make,words", [
    (lambda: UansilConfig(calibration_fraction=1.5), "calibration_fraction"),
    (lambda: UansilConfig(warmup_steps=-1), "warmup_steps"),
    (lambda: UansilConfig(skip_threshold=-0.1), "skip_threshold"),
    (lambda: UansilConfig(std_momentum=1.0), "std_momentum"),
    (lambda: InteractionPredictor(0), "in_features"),
    (lambda: InteractionPredictor(3)(torch.zeros(2, 4)), "must end in 3"),
    (lambda: UansilPolicy(InteractionPredictor(3))(torch.zeros(2, 3), None), r"\[G, M, F\]"),
])
def test_bad_input(make, words):
    with pytest.raises(ValueError, match=words):
        make()
