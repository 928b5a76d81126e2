"""The masked-encoder value function and the TSA game built on it (issue 19 item 1) [ours].

v(C) = cosine of the image embedding computed with only the patches of C in the image encoder's
attention, against the caption embedding; v(empty) = 0. Oracles: a loop that encodes each coalition
alone (the other patch tokens dropped from the sequence), and exact enumeration of the interaction.
"""
from __future__ import annotations

import math
from itertools import combinations

import pytest
import torch
import torch.nn.functional as F

import loupe.objectives as lo
from loupe.config import LoupeConfig, ObjectiveOptions
from loupe.model import LoupeModel
from loupe_kernels.testing import (SIZE_SCHEDULES, exact_shapley_interaction, sample_coalitions_reference,
                                   sample_stats, shapley_from_coalitions)

GRID = 3  # 3x3 patches: 9 players at most


def _model(radius=None, pool="cls", grid=GRID, dtype=torch.float64, **over):
    cfg = LoupeConfig(image_size=8 * grid, patch_size=8, vision_width=16, vision_layers=2, vision_heads=2,
                      text_width=16, text_layers=1, text_heads=2, embed_dim=8, vocab_size=50, context_length=16,
                      region_hidden=8, vision_local_radius=radius, vision_pool=pool, **over)
    torch.manual_seed(0)
    return LoupeModel(cfg).to(dtype).eval()


def _images(B, grid=GRID, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, 8 * grid, 8 * grid, generator=g, dtype=torch.float64)


@torch.no_grad()
def _alone(model, image, keep):
    """The oracle: encode ``image [C, H, W]`` with only the patches ``keep [n]`` in the sequence."""
    vt = model.visual
    x = vt.patch_embed(image[None]).flatten(2).transpose(1, 2)[0]  # [n, W]
    kept = keep.nonzero(as_tuple=True)[0]
    pos = torch.cat([torch.zeros(1, dtype=torch.long), kept + 1])
    seq = torch.cat([vt.class_embedding[None], x[kept]]) + vt.positional_embedding[pos]
    mask = None if vt.attn_mask is None else vt.attn_mask[pos[:, None], pos[None, :]]
    seq = vt.norm_pre(seq[None])
    for blk in vt.blocks:
        seq = blk(seq, mask)
    seq = vt.proj(vt.norm_post(seq))[0]
    emb = seq[0] if vt.pool == "cls" else seq[1:].mean(0)
    return F.normalize(emb, dim=-1), F.normalize(seq[1:], dim=-1), kept


def _score_alone(model, image, keep, text):
    if not bool(keep.any()):
        return 0.0
    return float(_alone(model, image, keep)[0] @ F.normalize(text, dim=-1))


def _coalitions(N, n, seed=2, p=0.5):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(N, n, generator=g) < p
    keep[0] = False        # the empty coalition
    keep[1] = True         # the whole image
    keep[2] = False
    keep[2, 4] = True      # one patch
    return keep


# ------------------------------------------------------------------------------------------------
# (a) the batched masked pass equals encoding each coalition alone
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("radius,pool", [(None, "cls"), (None, "mean"), (1, "cls"), (0, "mean")])
@pytest.mark.parametrize("compact", [False, True])
def test_coalition_scores_equal_encoding_each_coalition_alone(radius, pool, compact):
    m = _model(radius, pool)
    images = _images(2)
    N, n = 24, GRID * GRID
    keep = _coalitions(N, n)
    index = torch.arange(N) % 2
    g = torch.Generator().manual_seed(3)
    text = torch.randn(N, 8, generator=g, dtype=torch.float64)
    got = m.coalition_scores(images, index, keep, text, compact=compact, chunk=5)
    want = torch.tensor([_score_alone(m, images[int(index[j])], keep[j], text[j]) for j in range(N)],
                        dtype=torch.float64)
    assert got.dtype == torch.float64 and float(got[0]) == 0.0
    assert torch.allclose(got, want, rtol=0, atol=1e-12), (got - want).abs().max()
    assert float((want[1:] - want[1]).abs().max()) > 1e-3  # the coalitions do give different values


@pytest.mark.parametrize("compact", [False, True])
def test_vision_keep_path_patch_tokens_and_full_keep(compact):
    m = _model(1, "cls")
    images = _images(2)
    keep = _coalitions(6, GRID * GRID)[1:]  # non-empty rows
    index = torch.tensor([0, 1, 1, 0, 1])
    with torch.no_grad():
        emb, toks = m.visual(images, keep=keep, image_index=index, compact=compact)
        full_emb, full_toks = m.visual(images)
        all_emb, all_toks = m.visual(images, keep=torch.ones(2, GRID * GRID, dtype=torch.bool), compact=compact)
    for j in range(keep.shape[0]):
        e, t, kept = _alone(m, images[int(index[j])], keep[j])
        assert torch.allclose(emb[j], e, rtol=0, atol=1e-12)
        assert torch.allclose(toks[j, kept], t, rtol=0, atol=1e-12)
        assert bool((toks[j, ~keep[j]] == 0).all())
    # every patch kept: the plain forward
    assert torch.allclose(all_emb, full_emb, rtol=0, atol=1e-12)
    assert torch.allclose(all_toks, full_toks, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# (b) masked-out patches do not influence the value
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("radius,pool", [(None, "cls"), (1, "mean")])
@pytest.mark.parametrize("compact", [False, True])
def test_masked_patches_do_not_influence_the_value(radius, pool, compact):
    m = _model(radius, pool)
    images = _images(1)
    keep = torch.zeros(1, GRID * GRID, dtype=torch.bool)
    keep[0, [0, 1, 4]] = True  # patches (0,0), (0,1), (1,1)
    text = torch.randn(1, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    idx = torch.zeros(1, dtype=torch.long)
    base = m.coalition_scores(images, idx, keep, text, compact=compact)
    other = images.clone()
    other[:, :, 16:, :] = 1e3 * torch.randn_like(other[:, :, 16:, :])   # the bottom row of patches (outside)
    other[:, :, :8, 16:] = float("1e6")                                   # patch (0, 2) (outside)
    moved = m.coalition_scores(other, idx, keep, text, compact=compact)
    assert torch.equal(base, moved)
    inside = images.clone()
    inside[:, :, 8:16, 8:16] += 1.0  # patch (1, 1): inside, must matter
    assert float((m.coalition_scores(inside, idx, keep, text, compact=compact) - base).abs()) > 1e-6


# ------------------------------------------------------------------------------------------------
# (c) the estimator with the encoder value is unbiased
# ------------------------------------------------------------------------------------------------
def _encoder_value(m, images, text):
    def value(image, keep):
        return m.coalition_scores(images, image, keep, text[image])
    return value


@pytest.mark.parametrize("S", [(0, 1), (0, 1, 3, 4)])
def test_estimator_exact_expectation_equals_enumeration(S):
    """Players: the 8 valid patches of a 3x3 grid (patch 8 invalid). The estimator's exact expectation
    over its support, P(C) = 1 / (n' binom(n' - 1, |C|)), equals the exact interaction."""
    m = _model(1, "cls")
    images = _images(1)
    text = torch.randn(1, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    value = _encoder_value(m, images, text)
    n = GRID * GRID
    players = list(range(n - 1))
    sub = torch.zeros(1, n, dtype=torch.bool)
    sub[0, list(S)] = True
    pool = [p for p in players if p not in S]
    nprime = len(pool) + 1
    support = [c for r in range(len(pool) + 1) for c in combinations(pool, r)]
    C = torch.zeros(1, len(support), n, dtype=torch.bool)
    for k, c in enumerate(support):
        C[0, k, list(c)] = True
    samples = lo.coalition_samples(lambda g, keep: value(g, keep), sub, C)[0]
    weights = torch.tensor([1.0 / (nprime * math.comb(nprime - 1, len(c))) for c in support], dtype=torch.float64)
    expectation = float((weights * samples).sum())

    # every coalition's value in one batched call (test (a) ties it to encoding each coalition alone)
    every = [c for r in range(len(players) + 1) for c in combinations(players, r)]
    keep = torch.zeros(len(every), n, dtype=torch.bool)
    for k, c in enumerate(every):
        keep[k, list(c)] = True
    table = dict(zip(map(frozenset, every), value(torch.zeros(len(every), dtype=torch.long), keep).tolist()))

    def v(coalition):
        return table[frozenset(coalition)]

    exact = exact_shapley_interaction(v, len(players), S)
    assert abs(expectation - exact) < 1e-12, (expectation, exact)
    assert abs(exact) > 1e-4  # a real interaction, not 0 = 0

    # the pinned draw: many samples average to it within a few standard errors
    pm = torch.ones(1, n, dtype=torch.bool)
    pm[0, n - 1] = False
    est, se = lo.encoder_interactions(value, sub, pm, num_samples=4000, seed=11)
    assert est.dtype == torch.float64
    assert abs(float(est[0]) - exact) < 4 * float(se[0]), (float(est[0]), exact, float(se[0]))


def test_estimator_additive_game_is_exactly_zero():
    g = torch.Generator().manual_seed(6)
    n = 9
    w = torch.randint(-50, 50, (2, n), generator=g).double()  # integers: every sum is exact

    def additive(game, keep):
        return (keep.double() * w[game]).sum(-1)

    sub = torch.zeros(2, n, dtype=torch.bool)
    sub[0, [0, 1]] = True
    sub[1, [2, 5, 8]] = True
    est, se = lo.encoder_interactions(additive, sub, num_samples=16, seed=3)
    assert torch.equal(est, torch.zeros(2, dtype=torch.float64)) and torch.equal(se, torch.zeros(2, dtype=torch.float64))


def _normalized_sum_values(x: torch.Tensor, t: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """A plain PyTorch game: v(C) = <normalize(sum_{i in C} x_i), t> of coalition masks ``[G, X, n]``
    (``x [G, n, D]``, ``t [G, D]``) -> ``[G, X]``; v(empty) = 0."""
    z = masks.to(x.dtype) @ x
    return (F.normalize(z, dim=-1, eps=1e-12) * t[:, None, :]).sum(-1)


def test_encoder_targets_match_the_pinned_draw_on_a_plain_game():
    """region_targets(game="encoder") with a plain PyTorch value function gives exactly the sampled
    interaction of the pinned draw computed independently (numpy Philox coalitions, round robin, the
    sampled games numbered in order, every term evaluated separately), and its filling."""
    g = torch.Generator().manual_seed(7)
    B, n, D = 2, 16, 8
    patches = torch.randn(B, n, D, generator=g, dtype=torch.float64)
    text = F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=-1)
    boxes = torch.tensor([[[0, 0, 2, 2], [1, 1, 4, 3], [0, 0, 4, 1]], [[2, 0, 4, 2], [0, 2, 3, 4], [1, 0, 2, 4]]])
    valid = torch.tensor([[True, True, True], [True, False, True]])
    sample = torch.tensor([[True, False, True], [True, False, True]])
    fill = torch.full((B, 3), 0.25)
    K, seed = 32, 9
    kw = dict(num_samples=K, seed=seed, valid=valid, sample=sample, fill=fill)

    def value(image, keep):
        return _normalized_sum_values(patches[image], text[image], keep[:, None, :])[:, 0]

    got = lo.region_targets(patches, patches, None, boxes, 4, 4, game="encoder", value=value, **kw)
    # the oracle: the sampled games in order, one subset each, the pinned draw and the plain samples
    subsets = lo.box_subsets(boxes, 4, 4)
    gb, gm = sample.nonzero(as_tuple=True)
    S = subsets[gb, gm][:, None, :]                                               # [G, 1, n]
    C = sample_coalitions_reference(S, torch.ones(len(gb), n, dtype=torch.bool), K, seed,
                                    SIZE_SCHEDULES["round_robin"])
    samples, _ = shapley_from_coalitions(lambda m: _normalized_sum_values(patches[gb], text[gb], m), S, C)
    est, se = sample_stats(samples, torch.float64)
    sm1 = (S[:, 0].sum(-1) - 1).double()
    assert float(est.abs().max()) > 1e-3                                          # a non-trivial game
    # the outputs are float32: two roundings (the sampled value, then / (|S| - 1)) of values <= scale
    scale = float(torch.cat([est, se]).abs().max())
    tol = 2 * torch.finfo(torch.float32).eps * scale
    torch.testing.assert_close(got[2][gb, gm].double(), est[:, 0], rtol=0, atol=tol)
    torch.testing.assert_close(got[0][gb, gm].double(), -est[:, 0] / sm1, rtol=0, atol=tol)
    torch.testing.assert_close(got[1][gb, gm].double(), se[:, 0] / sm1, rtol=0, atol=tol)
    assert float(got[2][0, 1]) == 0.25 and float(got[1][0, 1]) == 0.0   # filled: UANSIL's mean, no stderr
    assert float(got[0][1, 1]) == 0.0                                     # invalid box


# ------------------------------------------------------------------------------------------------
# (d) end to end
# ------------------------------------------------------------------------------------------------
def _tiny_loupe(**options):
    cfg = LoupeConfig(image_size=32, patch_size=8, vision_width=32, vision_layers=1, vision_heads=2, text_width=32,
                      text_layers=1, text_heads=2, embed_dim=32, vocab_size=50, context_length=16, region_hidden=16,
                      loupe_options={"tsa_game": "encoder", **options})
    torch.manual_seed(0)
    return LoupeModel(cfg)


def _batch(B=4, L=10, seed=3, step=0):
    g = torch.Generator().manual_seed(seed)
    return {"images": torch.randn(B, 3, 32, 32, generator=g), "input_ids": torch.randint(0, 50, (B, L), generator=g),
            "attention_mask": torch.ones(B, L, dtype=torch.bool),
            "phrase_token_spans": torch.tensor([[[1, 3], [3, 5]]] * B), "phrase_mask": torch.ones(B, 2, dtype=torch.bool),
            "seed": seed, "step": step}


def test_loupe_losses_with_the_encoder_game():
    m = _tiny_loupe(encoder_images=2, encoder_boxes=3, encoder_samples=4)
    m.train()
    out = m(_batch())
    for k in ("loss_tsa", "loss_fsa", "loss_ua", "loss"):
        assert torch.isfinite(out[k]), k
    assert float(out["loss_tsa"].detach()) > 0
    # 2 images x 3 boxes of the 16 candidates of each of 4 images are played; the rest have no target
    assert out["uansil_fraction_sampled"] < 1.0
    assert out["diag_tsa_target_share"] == pytest.approx(6 / 64)
    m.zero_grad()
    out["loss_tsa"].backward(retain_graph=True)
    assert m.region_head.fc1.weight.grad.abs().sum() > 0
    out["loss"].backward()
    for p in m.parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all()
    again = _tiny_loupe(encoder_images=2, encoder_boxes=3, encoder_samples=4).train()(_batch())
    assert float(again["loss_tsa"].detach()) == float(out["loss_tsa"].detach())


def test_encoder_game_one_image_and_uansil_fill():
    # one image plays: the other rows have no target (KL 0), the loss stays finite
    m = _tiny_loupe(encoder_images=1, encoder_boxes=2, encoder_samples=2)
    out = m(_batch())
    assert torch.isfinite(out["loss_tsa"]) and out["diag_tsa_target_share"] == pytest.approx(2 / 64)
    # the skip policy on, warm, every game confident: the games not played take UANSIL's mean
    m = _tiny_loupe(encoder_images=1, encoder_boxes=2, encoder_samples=2, uansil=True, uansil_warmup=1,
                    uansil_threshold=1e6, uansil_min_calibration=0.0, uansil_min_skill=None, uansil_calibration=0.0,
                    uansil_min_fraction=0.0).train()
    m(_batch(step=0))  # warm-up step: the running variance of the sampled interactions
    out = m(_batch(step=1, seed=4))
    assert out["diag_tsa_target_share"] == 1.0 and torch.isfinite(out["loss_tsa"])
    assert float(out["loss_tsa"].detach()) > 0


# ------------------------------------------------------------------------------------------------
# (e) configuration and input errors
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key,value,match", [
    ("encoder_boxes", 1, "encoder_boxes must be an int >= 2"),
    ("encoder_samples", 1, "encoder_samples must be an int >= 2"),
    ("encoder_images", 0, "encoder_images must be an int >= 1"),
    ("encoder_images", True, "encoder_images"),
    ("encoder_boxes", 2.5, "encoder_boxes"),
    ("tsa_game", "masked", "encoder"),
])
def test_options_validation(key, value, match):
    with pytest.raises(ValueError, match=match):
        ObjectiveOptions(**{key: value})
    with pytest.raises(ValueError, match=match):
        LoupeConfig(loupe_options={key: value})


def test_input_errors():
    m = _model()
    images = _images(2)
    text = torch.randn(3, 8, dtype=torch.float64)
    idx = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="keep must be a bool tensor"):
        m.coalition_scores(images, idx, torch.ones(3, 4, dtype=torch.bool), text)
    with pytest.raises(ValueError, match="keep must be a bool tensor"):
        m.coalition_scores(images, idx, torch.ones(3, 9), text)
    with pytest.raises(ValueError, match="image_index must lie"):
        m.coalition_scores(images, torch.tensor([0, 1, 2]), torch.ones(3, 9, dtype=torch.bool), text)
    with pytest.raises(ValueError, match="text_emb must be"):
        m.coalition_scores(images, idx, torch.ones(3, 9, dtype=torch.bool), text[:2])
    p = torch.randn(1, 9, 8)
    with pytest.raises(ValueError, match="encoder game needs value"):
        lo.region_targets(p, p, None, torch.tensor([[[0, 0, 2, 1]]]), 3, 3, game="encoder")
    pm = torch.ones(1, 9, dtype=torch.bool)
    pm[0, 0] = False
    with pytest.raises(ValueError, match="player_mask marks invalid"):
        lo.region_targets(p, p, None, torch.tensor([[[0, 0, 2, 1]]]), 3, 3, game="encoder",
                          value=lambda g, k: k.sum(-1).float(), player_mask=pm)
