"""Tests of loupe.objectives: constructed scenes, shapes, gradients, determinism (METHOD 6-9)."""
from __future__ import annotations

import math

import pytest
import torch

import loupe.objectives as lo
from loupe.config import LoupeConfig, ObjectiveOptions, options_from_config
from loupe.model import LoupeModel
from loupe.regions import candidate_boxes

SCENES = ("one", "noisy", "two", "border", "negbg")


def _all_boxes():
    boxes = candidate_boxes(8, 8)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return boxes[area >= 2]


@pytest.mark.parametrize("name", SCENES)
def test_object_box_gets_largest_target(name):
    boxes = _all_boxes()
    for seed in range(2):
        spec = lo.constructed_scene(name, seed=seed)
        t, se, _ = lo.region_targets(spec.patches[None], spec.words[None], None, boxes[None], 8, 8,
                                     num_samples=32, seed=seed)
        obj = {int(((boxes == torch.tensor(b)).all(1)).nonzero()[0]) for b in spec.objects}
        assert set(t[0].topk(len(obj)).indices.tolist()) == obj
        assert bool((se >= 0).all())


def test_region_targets_match_exact_expectation():
    # many samples: the redundancy equals -I/(s-1) of the exact interaction of the centred game
    from loupe_kernels.reference import exact_shapley_interaction
    g = torch.Generator().manual_seed(0)
    patches = torch.nn.functional.normalize(torch.randn(9, 8, generator=g), dim=-1)
    words = torch.nn.functional.normalize(torch.randn(3, 8, generator=g), dim=-1)
    sim = (words @ patches.T)
    sim = (sim - sim.mean(-1, keepdim=True)).clamp(min=0)
    box = torch.tensor([[[0, 0, 2, 2]]])  # patches 0, 1, 3, 4 of a 3x3 grid
    t, se, inter = lo.region_targets(patches[None], words[None], None, box, 3, 3, num_samples=20000, seed=1)

    def v(c):
        return 0.0 if not c else float(sim[:, sorted(c)].max(1).values.mean())
    exact = exact_shapley_interaction(v, 9, [0, 1, 3, 4])
    assert abs(float(inter) - exact) < 4 * float(se) * 3 + 1e-6
    assert abs(float(t) + exact / 3) < 4 * float(se) + 1e-6


def test_fsa_matching_region_gets_largest_label():
    g = torch.Generator().manual_seed(0)
    D = 16
    basis, _ = torch.linalg.qr(torch.randn(D, D, generator=g))
    regions = basis[:5].clone()[None]             # 5 orthogonal regions
    phrases = torch.stack([0.9 * basis[2] + 0.1 * basis[6], 0.8 * basis[4] + 0.2 * basis[7]])
    phrases = torch.nn.functional.normalize(phrases, dim=-1)[None]
    I, se = lo.phrase_region_interactions(phrases, torch.ones(1, 2, dtype=torch.bool), regions,
                                          torch.ones(1, 5, dtype=torch.bool), num_samples=256, seed=0)
    assert I[0].argmax(-1).tolist() == [2, 4]
    assert bool((I[0, 0, 2] > 0) & (I[0, 1, 4] > 0))


def test_phrase_contrast_hand_computed():
    inter = torch.tensor([[[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], [[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]]])
    ok = torch.ones(2, 2, 3, dtype=torch.bool)
    ok[1, 1] = False  # image 1 has one valid phrase: unchanged, and its invalid row untouched
    got = lo.phrase_contrast(inter, ok)
    assert got[0].tolist() == [[-1.0, 0.0, 1.0], [1.0, 0.0, -1.0]]
    assert torch.equal(got[1], inter[1])


def test_phrase_contrast_moves_label_off_a_region_every_phrase_needs():
    # region 0 holds both objects (a global patch), regions 1 and 2 one object each. Each phrase
    # matches region 0 best, so its raw label picks it; with the phrase contrast each phrase's
    # label goes to its own object's region.
    D = 16
    basis, _ = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(1)))
    a, b, ctx = basis[0], basis[1], basis[2]
    p1 = torch.nn.functional.normalize(a + 1.5 * ctx, dim=0)   # contextual phrases: both carry the caption
    p2 = torch.nn.functional.normalize(b + 1.5 * ctx, dim=0)
    regions = torch.nn.functional.normalize(torch.stack([a + b + 1.6 * ctx, a, b]), dim=-1)
    phrases = torch.stack([p1, p2])[None]
    pm, rv = torch.ones(1, 2, dtype=torch.bool), torch.ones(1, 3, dtype=torch.bool)
    I, _ = lo.phrase_region_interactions(phrases, pm, regions[None], rv, num_samples=512, seed=0)
    assert I[0].argmax(-1).tolist() == [0, 0]
    ok = pm[:, :, None] & rv[:, None, :]
    assert lo.phrase_contrast(I, ok)[0].argmax(-1).tolist() == [1, 2]


def test_cross_image_lse_against_a_loop_and_soft_kl_with_negatives():
    g = torch.Generator().manual_seed(2)
    pf = torch.nn.functional.normalize(torch.randn(3, 2, 8, generator=g), dim=-1)
    rf = torch.nn.functional.normalize(torch.randn(3, 4, 8, generator=g), dim=-1)
    rv = torch.tensor([[True, True, False, True], [True, False, False, False], [True, True, True, True]])
    got = lo.cross_image_lse(pf, rf, rv, 0.1)
    for b in range(3):
        for p in range(2):
            neg = torch.cat([pf[b, p] @ rf[c][rv[c]].T / 0.1 for c in range(3) if c != b])
            assert abs(float(got[b, p]) - float(torch.logsumexp(neg, 0))) < 1e-5
    assert bool(torch.isneginf(lo.cross_image_lse(pf[:1], rf[:1], rv[:1], 0.1)).all())  # no other image
    # soft_kl with negatives: the prediction normalised over the row and the negatives
    t, pr = torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g)
    ok = torch.ones(2, 4, dtype=torch.bool)
    extra = torch.randn(2, generator=g)
    q = t.softmax(-1)
    logp = pr - torch.logsumexp(torch.cat([pr, extra[:, None]], 1), 1, keepdim=True)
    assert torch.allclose(lo.soft_kl(t, pr, ok, extra), (q * (q.log() - logp)).sum(-1), atol=1e-6)
    assert torch.allclose(lo.soft_kl(t, pr, ok, torch.full((2,), float("-inf"))), lo.soft_kl(t, pr, ok))
    # a negative as likely as the row's regions raises the loss
    assert bool((lo.soft_kl(t, pr, ok, pr.max(-1).values) > lo.soft_kl(t, pr, ok)).all())


def test_cross_image_negatives_push_a_positional_constant_region_away():
    # region 0 has the same feature in both images and the phrase prefers it; the labels are uniform
    # over the own image's regions. Without negatives, the gradient on the phrase does not care
    # that region 0 is in every image; with them, the loss is larger and its gradient moves the
    # phrase away from the constant region.
    torch.manual_seed(0)
    const = torch.nn.functional.normalize(torch.randn(8), dim=0)
    rf = torch.nn.functional.normalize(torch.randn(2, 3, 8), dim=-1)
    rf[:, 0] = const
    pf = torch.nn.functional.normalize(const + 0.3 * torch.randn(2, 1, 8), dim=-1).requires_grad_(True)
    rv = torch.ones(2, 3, dtype=torch.bool)
    ok = torch.ones(2, 1, 3, dtype=torch.bool)
    target = torch.zeros(2, 1, 3)
    pred = torch.einsum("bpd,brd->bpr", pf, rf) / 0.05
    plain = lo.soft_kl(target, pred, ok).sum()
    crossed = lo.soft_kl(target, pred, ok, lo.cross_image_lse(pf, rf, rv, 0.05)).sum()
    assert float(crossed.detach()) > float(plain.detach())
    (grad,) = torch.autograd.grad(crossed, pf)
    assert float((grad * const).sum()) > 0  # descent lowers the phrase's similarity to the constant


def _tiny(objective="loupe", weights=None, **overrides):
    cfg = LoupeConfig(image_size=32, patch_size=8, vision_width=32, vision_layers=1, vision_heads=2, text_width=32,
                      text_layers=1, text_heads=2, embed_dim=32, vocab_size=50, context_length=16, region_hidden=16,
                      objective=objective, **({"loss_weights": weights} if weights is not None else {}), **overrides)
    torch.manual_seed(0)
    return LoupeModel(cfg)


def _batch(B=4, L=10, P=2, seed=3, step=0):
    g = torch.Generator().manual_seed(seed)
    pm = torch.ones(B, P, dtype=torch.bool)
    if B > 1:
        pm[1, 1:] = False
        pm[2] = False  # a caption without phrases
    return {"images": torch.randn(B, 3, 32, 32, generator=g), "input_ids": torch.randint(0, 50, (B, L), generator=g),
            "attention_mask": torch.ones(B, L, dtype=torch.bool),
            "phrase_token_spans": torch.tensor([[[1 + 2 * p, 3 + 2 * p] for p in range(P)]] * B), "phrase_mask": pm,
            "boxes": torch.tensor([[[0., 0, 16, 16], [16, 8, 32, 32]] + [[0, 0, 8, 8]] * (P - 2)] * B),
            "seed": seed, "step": step}


def test_forward_shapes_terms_and_diagnostics():
    m = _tiny()
    assert set(m.loss_weights) == {"cmc", "filip", "tsa", "fsa", "ua"}
    assert m.loss_weights["tsa"] == 0.5 and m.loss_weights["fsa"] == 0.5 and m.loss_weights["ua"] == 0.1
    out = m(_batch())
    for k in ("loss_tsa", "loss_fsa", "loss_ua"):
        assert torch.isfinite(out[k]) and out[k].dim() == 0
    assert float(out["loss_tsa"].detach()) > 0 and float(out["loss_fsa"].detach()) >= 0
    for k in ("diag_phrase_iou50", "diag_phrase_iou50_topm", "diag_top_box_overlap", "uansil_fraction_sampled"):
        assert 0.0 <= out[k] <= 1.0
    assert out["diag_phrase_iou50"] >= out["diag_phrase_iou50_topm"]
    # L_FILIP is ramped in over the first 200 training steps (LOSS_RAMP_DEFAULTS): 0 at step 0
    assert m.loss_ramp == {"filip": 200}
    total = sum(m.loss_weights[n] * out[f"loss_{n}"] for n in m.loss_weights if n != "filip")
    assert torch.allclose(out["loss"], total)
    out = m(_batch(step=100))
    total = sum(m.loss_weights[n] * out[f"loss_{n}"] * (0.5 if n == "filip" else 1.0) for n in m.loss_weights)
    assert torch.allclose(out["loss"], total)


def test_no_phrases_and_few_candidates():
    # a 2x2 grid has 5 boxes of >= 2 patches: fewer than M' = 16
    cfg = LoupeConfig(image_size=16, patch_size=8, vision_width=32, vision_layers=1, vision_heads=2, text_width=32,
                      text_layers=1, text_heads=2, embed_dim=32, vocab_size=50, context_length=16, region_hidden=16)
    m = LoupeModel(cfg)
    b = _batch(B=3)
    b["images"] = b["images"][:, :, :16, :16]
    b["phrase_mask"][:] = False
    out = m(b)
    assert float(out["loss_fsa"]) == 0.0 and torch.isfinite(out["loss_tsa"])
    idx, valid = lo.tsa_candidates(out["box_logits"], m.candidate_boxes, m.nms_suppress, 8, 8, torch.Generator())
    assert idx.shape[1] == 5 and len(set(idx[0][valid[0]].tolist())) == int(valid[0].sum())
    out["loss"].backward()
    # no phrase spans at all
    b2 = {k: v for k, v in _batch().items() if k not in ("phrase_token_spans", "phrase_mask", "boxes")}
    out2 = _tiny()(b2)
    assert float(out2["loss_fsa"]) == 0.0 and "diag_phrase_iou50" not in out2


def test_gradients_through_predictions_not_targets():
    m = _tiny()
    out = m(_batch())
    m.zero_grad()
    out["loss_tsa"].backward(retain_graph=True)
    assert m.region_head.fc1.weight.grad.abs().sum() > 0
    assert m.visual.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    m.zero_grad()
    out["loss_fsa"].backward(retain_graph=True)
    assert m.text.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert m.visual.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    # targets carry no gradient: the KL's gradient w.r.t. the target logits is zero
    tl = torch.randn(2, 5, requires_grad=True)
    pl = torch.randn(2, 5, requires_grad=True)
    lo.soft_kl(tl, pl, torch.ones(2, 5, dtype=torch.bool)).sum().backward()
    assert tl.grad is None and pl.grad.abs().sum() > 0
    # and region_targets returns tensors without a graph
    p = torch.randn(1, 16, 8, requires_grad=True)
    w = torch.randn(1, 3, 8, requires_grad=True)
    t, se, i = lo.region_targets(p, w, None, torch.tensor([[[0, 0, 2, 2]]]), 4, 4, num_samples=8)
    assert not t.requires_grad and not i.requires_grad


def test_same_seed_same_losses():
    a = _tiny()(_batch(seed=5))
    b = _tiny()(_batch(seed=5))
    c = _tiny()(_batch(seed=6))
    for k in ("loss_tsa", "loss_fsa", "loss_ua"):
        assert float(a[k]) == float(b[k])
    assert float(a["loss_tsa"]) != float(c["loss_tsa"])


def test_uansil_policy_after_warmup():
    m = _tiny()
    mod = m.loss_modules["tsa"]
    mod.options = ObjectiveOptions(uansil=True, uansil_warmup=2, uansil_threshold=1e6, uansil_calibration=0.5,
                                   uansil_min_calibration=0.0, uansil_min_skill=None, uansil_min_fraction=0.0)
    for step in range(3):
        out = m(_batch(step=step))
    # threshold huge: every game is confident; only the calibration fraction is sampled
    assert out["uansil_warm"] == 1.0
    assert 0.2 < out["uansil_fraction_sampled"] < 0.8
    assert out["uansil_calibration_games"] > 0 and 0.0 <= out["uansil_calibration"] <= 1.0
    out["loss"].backward()
    assert mod.uansil.predictor.net[0].weight.grad.abs().sum() > 0
    assert float(mod.uansil.running_var) > 0


def test_uansil_never_fills_an_ssim_label():
    """The policy acts on TSA games only: with every game confident and the policy warm, L_FSA is
    exactly what it is with the policy off (same weights, batch and coalitions), while L_TSA changes."""
    m = _tiny()
    mod = m.loss_modules["tsa"]
    base = m(_batch(step=5, seed=9))
    mod.options = ObjectiveOptions(uansil=True, uansil_warmup=0, uansil_threshold=1e6, uansil_calibration=0.0,
                                   uansil_min_calibration=0.0, uansil_min_skill=None, uansil_min_fraction=0.0)
    mod.uansil.running_var.fill_(1.0)
    on = m(_batch(step=5, seed=9))
    assert on["uansil_warm"] == 1.0 and on["uansil_fraction_sampled"] < 1.0
    assert float(on["loss_fsa"]) == float(base["loss_fsa"])
    assert float(on["loss_tsa"]) != float(base["loss_tsa"])


def test_uansil_safety_samples_everything_until_calibrated():
    """With the safety on (the defaults of the policy), nothing is skipped before the rolling
    calibration is known, and the check results are logged. The untrained predictor is wide enough
    to cover the checked games (coverage >= 0.85) but has no skill: with the skill gate (default)
    nothing is skipped; with coverage alone (the gate of before) step 2 skips."""
    fr = {}
    for min_skill in (ObjectiveOptions().uansil_min_skill, None):
        m = _tiny()
        mod = m.loss_modules["tsa"]
        mod.options = ObjectiveOptions(uansil=True, uansil_warmup=1, uansil_threshold=1e6, uansil_min_skill=min_skill)
        fr[min_skill] = []
        for step in range(3):
            out = m(_batch(step=step))
            fr[min_skill].append(out["uansil_fraction_sampled"])
        # step 0 warms up; step 1 has no calibration record yet: all sampled, every game a check
        assert out["uansil_calibration_rolling"] >= 0.85
        assert out["uansil_skill_rolling"] < ObjectiveOptions().uansil_min_skill
        assert int(mod.uansil.calib_pos) == 3
    assert fr[0.5] == [1.0, 1.0, 1.0]
    assert fr[None][:2] == [1.0, 1.0] and fr[None][2] < 1.0


def test_default_samples_every_game_and_still_trains_the_predictor():
    m = _tiny()
    mod = m.loss_modules["tsa"]
    mod.options = ObjectiveOptions(uansil_warmup=2, uansil_threshold=1e6, uansil_calibration=0.5)
    assert mod.options.uansil is False
    for step in range(3):
        out = m(_batch(step=step))
    assert out["uansil_warm"] == 0.0 and out["uansil_fraction_sampled"] == 1.0
    out["loss"].backward()
    assert mod.uansil.predictor.net[0].weight.grad.abs().sum() > 0


def test_fsa_cross_image_weight_interpolates_between_off_and_on():
    """The negatives' weight w scales their share of the normaliser: w=0 is the term without them,
    w=1 (and true) the full term, and L_FSA rises with w (each row's KL grows with its normaliser)."""
    assert ObjectiveOptions(fsa_cross_image=True).fsa_cross_image == 1.0
    assert ObjectiveOptions(fsa_cross_image=False).fsa_cross_image == 0.0
    for bad in (-0.5, float("nan"), float("inf"), "yes"):
        with pytest.raises(ValueError, match="fsa_cross_image"):
            ObjectiveOptions(fsa_cross_image=bad)
    losses = {}  # keyed by name: True and 1.0 are the same dict key
    for name, w in (("0", 0.0), ("1e-12", 1e-12), ("0.3", 0.3), ("1", 1.0), ("true", True)):
        m = _tiny()
        m.loss_modules["tsa"].options = ObjectiveOptions(fsa_cross_image=w)
        out = m(_batch(seed=5))
        losses[name] = (out["loss_fsa"].item(), out["loss_tsa"].item())
    assert losses["true"] == losses["1"]
    assert losses["1e-12"][0] == pytest.approx(losses["0"][0], rel=1e-6)
    assert losses["0"][0] < losses["0.3"][0] < losses["1"][0]
    assert len({v[1] for v in losses.values()}) == 1  # L_TSA does not read it


def test_fsa_contrast_options_change_only_l_fsa():
    assert ObjectiveOptions().fsa_phrase_contrast and ObjectiveOptions().fsa_cross_image  # the defaults
    off = {"fsa_phrase_contrast": False, "fsa_cross_image": False}
    base_model = _tiny()
    base_model.loss_modules["tsa"].options = ObjectiveOptions(**off)
    base = base_model(_batch(seed=5))
    for opts in ({"fsa_phrase_contrast": True, "fsa_cross_image": False},
                 {"fsa_phrase_contrast": False, "fsa_cross_image": True}, {}):
        m = _tiny()
        m.loss_modules["tsa"].options = ObjectiveOptions(**opts)
        out = m(_batch(seed=5))
        assert float(out["loss_tsa"]) == float(base["loss_tsa"])
        assert torch.isfinite(out["loss_fsa"]) and float(out["loss_fsa"]) != float(base["loss_fsa"])
        out["loss"].backward()
        assert any(q.grad is not None and float(q.grad.abs().sum()) > 0 for q in m.visual.parameters())


def test_fsa_min_phrases_drops_lone_phrase_captions():
    b = _batch(seed=5)
    b["phrase_mask"][:, 1:] = False  # every caption has one phrase
    assert ObjectiveOptions().fsa_min_phrases == 2  # the default
    m = _tiny()
    m.loss_modules["tsa"].options = ObjectiveOptions(fsa_min_phrases=1)
    assert float(m(b)["loss_fsa"]) > 0
    m.loss_modules["tsa"].options = ObjectiveOptions(fsa_min_phrases=2)
    out = m(b)
    assert float(out["loss_fsa"]) == 0.0 and torch.isfinite(out["loss"])
    # with two-phrase captions present, the term is back
    assert float(m(_batch(seed=5))["loss_fsa"]) > 0
    with pytest.raises(ValueError, match="fsa_min_phrases"):
        ObjectiveOptions(fsa_min_phrases=0)


def test_ua_loss_formula():
    est, mu, ls, tv = torch.tensor([0.3, -0.1]), torch.tensor([0.1, 0.0]), torch.tensor([-2.0, 0.5]), torch.tensor([0.01, 0.0])
    var = ls.exp() + tv
    want = (0.5 * ((est - mu) ** 2 / var + var.log())).mean()
    assert math.isclose(float(lo._ua_loss(est, mu, ls, tv)), float(want), rel_tol=1e-6)


def test_options_validation():
    with pytest.raises(ValueError, match="tsa_game"):
        ObjectiveOptions(tsa_game="nope")
    # the retired pooled game: a saved config naming it says which commit still has it
    with pytest.raises(ValueError, match=r"tsa_game='pooled' was removed .*git checkout 72b2211"):
        ObjectiveOptions(tsa_game="pooled")
    with pytest.raises(ValueError, match="72b2211"):
        options_from_config(LoupeConfig.from_dict({**LoupeConfig().to_dict(),
                                                   "loupe_options": {"tsa_game": "pooled"}}))
    with pytest.raises(ValueError, match="unknown keys"):
        class C:
            loupe_options = {"bogus": 1}
        options_from_config(C())


@pytest.mark.parametrize("labels", ["similarity", "uniform"])
def test_ablation_labels_sample_nothing_and_still_train(labels):
    """SSIM labels without the Shapley interaction (the ablation): no game is sampled, L_TSA is
    unchanged, L_FSA differs from the Shapley labels' and trains the encoders."""
    base = _tiny()
    ref = base(_batch(seed=5))
    m = _tiny()
    m.loss_modules["tsa"].options = ObjectiveOptions(fsa_labels=labels)
    out = m(_batch(seed=5))
    assert float(out["loss_tsa"]) == float(ref["loss_tsa"])
    assert torch.isfinite(out["loss_fsa"]) and float(out["loss_fsa"]) != float(ref["loss_fsa"])
    out["loss"].backward()
    assert any(q.grad is not None and float(q.grad.abs().sum()) > 0 for q in m.visual.parameters())
    with pytest.raises(ValueError, match="fsa_labels"):
        ObjectiveOptions(fsa_labels="random")


def test_every_ablation_variant_is_a_valid_config_and_runs():
    from loupe.experiments import ABLATIONS, merge_config
    assert merge_config({"loupe_options": {"num_samples": 8}, "embed_dim": 16},
                        {"loupe_options": {"fsa_labels": "uniform"}}) == {
        "loupe_options": {"num_samples": 8, "fsa_labels": "uniform"}, "embed_dim": 16}
    for name, over in ABLATIONS.items():
        m = _tiny(**merge_config(None, over))  # loss_weights / loupe_options
        out = m(_batch(seed=1))
        assert torch.isfinite(out["loss"]), name
        assert ("loss_tsa" in out) == (over.get("loss_weights", {}).get("tsa", 1.0) != 0), name


@pytest.mark.parametrize("bad", [float("nan"), 1.5, float("-inf"), True, "0.5"])
def test_uansil_min_skill_rejects_what_is_not_a_skill_bound(bad):
    with pytest.raises(ValueError, match="uansil_min_skill"):
        ObjectiveOptions(uansil_min_skill=bad)
    ObjectiveOptions(uansil_min_skill=None)  # coverage alone
    ObjectiveOptions(uansil_min_skill=-2.0)  # a skill may be negative
