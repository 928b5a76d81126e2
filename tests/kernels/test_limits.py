"""Bounds and plain errors (issue 21 item 9) and sim rows by index (issue 20 item 7).

- ``num_samples`` above 2^20 is a ValueError that names the bound (5e9 used to run until killed).
- ``box_objectness`` checks its weights (NaN/inf, dtype, device), not only ``tokens``.
- A double backward through a kernel backend says "no second derivative" with the op's name.
- ``shapley_interaction(sim, ..., game_index=idx)`` equals ``shapley_interaction(sim[idx], ...)``
  bit for bit on every backend, and ``loupe.objectives`` passes indices instead of copying.
"""
from __future__ import annotations

import importlib

import pytest
import torch

import loupe_kernels as lk
from loupe_kernels._common import MAX_SAMPLES

BACKENDS = [b for b in ("reference", "cpu", "triton") if b in lk.available_backends()]
KERNEL_BACKENDS = [b for b in BACKENDS if b != "reference"]


def _game(G=3, Lq=4, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    sim = torch.randn(G, Lq, n, generator=g)
    S = torch.zeros(G, 1, n, dtype=torch.bool)
    S[:, 0, :2] = True
    return sim, S


# ------------------------------------------------------------------------------------------------
# num_samples
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_num_samples_is_bounded(backend):
    sim, S = _game()
    for call in (lambda K: lk.shapley_interaction(sim, S, num_samples=K, backend=backend),
                 lambda K: lk.sample_coalitions(S, num_samples=K, seed=0, backend=backend)):
        with pytest.raises(ValueError, match=r"num_samples must be <= 2\^20 = 1048576"):
            call(5_000_000_000)
        with pytest.raises(ValueError, match="num_samples must be <= 2"):
            call(MAX_SAMPLES + 1)
    assert MAX_SAMPLES == 2 ** 20


# ------------------------------------------------------------------------------------------------
# box_objectness weights
# ------------------------------------------------------------------------------------------------
def _box_inputs(h=2, w=3, D=4, H=5, B=2):
    g = torch.Generator().manual_seed(0)
    K = importlib.import_module("loupe_kernels.box_objectness").num_boxes(h, w)
    return dict(tokens=torch.randn(B, h * w, D, generator=g), h=h, w=w, w_in=torch.randn(H, D, generator=g),
                w_out=torch.randn(H, D, generator=g), bias=torch.randn(K, H, generator=g),
                w2=torch.randn(H, generator=g), b2=torch.tensor(0.3))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("name", ["w_in", "w_out", "bias", "w2", "b2"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_box_objectness_checks_its_weights(backend, name, value):
    if backend not in lk.available_backends():
        pytest.skip("backend unavailable")
    kw = _box_inputs()
    lk.box_objectness(**kw, backend=backend)  # fine as drawn
    bad = kw[name].clone()
    bad.view(-1)[0] = value
    kw[name] = bad
    with torch.no_grad(), pytest.raises(ValueError, match=f"box_objectness: {name} contains NaN or inf"):
        lk.box_objectness(**kw, backend=backend)


def test_box_objectness_checks_weight_dtypes_and_b2():
    kw = _box_inputs()
    with pytest.raises(TypeError, match="w2 must be floating point"):
        lk.box_objectness(**{**kw, "w2": kw["w2"].to(torch.int64)})
    with pytest.raises(TypeError, match="b2 must be floating point"):
        lk.box_objectness(**{**kw, "b2": torch.tensor(1)})
    with pytest.raises(ValueError, match="b2 must be finite"):
        lk.box_objectness(**{**kw, "b2": float("nan")})
    with pytest.raises(ValueError, match=r"w_out must be \[H=5, D=4\]"):
        lk.box_objectness(**{**kw, "w_out": kw["w_out"][:, :3]})


# ------------------------------------------------------------------------------------------------
# double backward
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_double_backward_says_no_second_derivative(backend, reduction):
    mu = torch.randn(5, requires_grad=True)
    lv = torch.randn(5, requires_grad=True)
    loss = lk.uncertainty_interaction_loss(mu, lv, torch.randn(5), reduction=reduction, backend=backend).sum()
    g, = torch.autograd.grad(loss, mu, create_graph=True)
    with pytest.raises(RuntimeError, match="uncertainty_interaction_loss: no second derivative"):
        torch.autograd.grad(g.sum(), mu)
    # first derivatives are unchanged by the marking
    g2, = torch.autograd.grad(lk.uncertainty_interaction_loss(mu, lv, torch.zeros(5), reduction=reduction,
                                                              backend=backend).sum(), mu)
    ref, = torch.autograd.grad(lk.uncertainty_interaction_loss(mu, lv, torch.zeros(5), reduction=reduction,
                                                               backend="reference").sum(), mu)
    torch.testing.assert_close(g2, ref)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dual", [False, True])
def test_similarity_double_backward_says_no_second_derivative(backend, dual):
    q = torch.randn(2, 3, 4, requires_grad=True)
    k = torch.randn(3, 5, 4, requires_grad=True)
    if dual:
        a, b = lk.token_region_similarity_dual(q, k, backend=backend)
        s = a.sum() + b.sum()
    else:
        s = lk.token_region_similarity(q, k, backend=backend).sum()
    gq, = torch.autograd.grad(s, q, create_graph=True)
    with pytest.raises(RuntimeError, match="token_region_similarity: no second derivative"):
        torch.autograd.grad((gq * gq).sum(), k)


def test_reference_keeps_its_second_derivative():
    mu = torch.randn(5, requires_grad=True)
    loss = lk.uncertainty_interaction_loss(mu, torch.zeros(5), torch.randn(5), backend="reference")
    g, = torch.autograd.grad(loss, mu, create_graph=True)
    h, = torch.autograd.grad(g.sum(), mu)
    torch.testing.assert_close(h, torch.full((5,), 1 / 5))


# ------------------------------------------------------------------------------------------------
# game_index
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("query_players", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_game_index_is_bit_identical_to_the_gathered_copy(backend, query_players, dtype):
    g = torch.Generator().manual_seed(3)
    B, Lq, n, G = 4, 3, 7, 9
    sim = torch.randn(B, Lq, n, generator=g).to(dtype)
    idx = torch.randint(0, B, (G,), generator=g)
    P = Lq + n if query_players else n
    S = torch.zeros(G, 2, P, dtype=torch.bool)
    lo = Lq if query_players else 0
    for gg in range(G):
        S[gg, 0, lo + gg % (n - 1)] = True
        S[gg, 0, lo + n - 1] = True
        S[gg, 1, gg % P] = True
    pm = torch.rand(G, P, generator=g) > 0.2
    pm |= S.any(1)
    qm = None if query_players else torch.rand(G, Lq, generator=g) > 0.3
    kw = dict(query_mask=qm, player_mask=pm, query_players=query_players, num_samples=24, seed=11,
              size_schedule="round_robin", backend=backend)
    want = lk.shapley_interaction(sim[idx], S, **kw)
    got = lk.shapley_interaction(sim, S, game_index=idx, **kw)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_game_index_is_validated():
    sim, S = _game(G=3)
    S4 = torch.zeros(4, 1, 6, dtype=torch.bool)
    S4[:, 0, :2] = True
    with pytest.raises(TypeError, match="game_index must have dtype torch.int64"):
        lk.shapley_interaction(sim, S4, game_index=torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"game_index must have shape \[G=4\]"):
        lk.shapley_interaction(sim, S4, game_index=torch.zeros(3, dtype=torch.int64))
    for backend in BACKENDS:
        with pytest.raises(ValueError, match=r"game_index holds rows outside \[0, 3\)"):
            lk.shapley_interaction(sim, S4, game_index=torch.tensor([0, 1, 2, 3]), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_objectives_pass_indices_and_match_the_copy_bit_for_bit(backend, monkeypatch):
    """loupe.objectives' max-sim call sites pass game_index; the results equal those of the copy of
    sim[gb] that they made before (issue 20, item 7)."""
    objectives = pytest.importorskip("loupe.objectives")
    original = objectives.shapley_interaction
    seen = []

    def copying(sim, subsets, *, game_index=None, **kw):   # the old call: a copy per sampled game
        seen.append(game_index is not None)
        return original(sim if game_index is None else sim[game_index], subsets, **kw)

    g = torch.Generator().manual_seed(5)
    B, h, w, D, L, M = 3, 3, 3, 8, 4, 5
    patches, words = torch.randn(B, h * w, D, generator=g), torch.randn(B, L, D, generator=g)
    word_mask = torch.rand(B, L, generator=g) > 0.2
    x0 = torch.randint(0, 2, (B, M, 1), generator=g)
    y0 = torch.randint(0, 2, (B, M, 1), generator=g)
    boxes = torch.cat([x0, y0, x0 + 2, y0 + 1 + torch.randint(0, 2, (B, M, 1), generator=g)], -1).float()
    sample = torch.rand(B, M, generator=g) > 0.3
    pf, pmask = torch.randn(B, 3, D, generator=g), torch.rand(B, 3, generator=g) > 0.3
    rf, rvalid = torch.randn(B, 4, D, generator=g), torch.rand(B, 4, generator=g) > 0.3
    pmask[:, 0] = rvalid[:, 0] = True

    def run():
        a = objectives.region_targets(patches, words, word_mask, boxes, h, w, num_samples=16, seed=3,
                                      sample=sample, backend=backend)
        b = objectives.phrase_region_interactions(pf, pmask, rf, rvalid, num_samples=16, seed=4, backend=backend)
        return (*a, *b)

    new = run()
    monkeypatch.setattr(objectives, "shapley_interaction", copying)
    old = run()
    assert seen and all(seen), "the call sites must pass game_index over the un-copied sim"
    for x, y in zip(new, old):
        assert torch.equal(x, y)
