"""Candidate boxes, summed-area box features, NMS and phrase features against direct computations."""
import itertools

import pytest
import torch

from loupe.regions import (GROUNDING_MARGIN, box_features, box_features_at, box_geometry, box_iou, candidate_boxes, grounding_scores, nms_topk,
                           phrase_features, sat_pooling_matrix, summed_area_table)


def test_candidate_boxes_enumerate_every_whole_patch_box():
    boxes = candidate_boxes(8, 8)
    assert boxes.shape == (1296, 4)
    for h, w in ((1, 1), (3, 5), (4, 2)):
        b = candidate_boxes(h, w)
        assert b.shape[0] == (h * (h + 1) // 2) * (w * (w + 1) // 2)
        direct = {(x0, y0, x1, y1) for y0, y1 in itertools.combinations(range(h + 1), 2)
                  for x0, x1 in itertools.combinations(range(w + 1), 2)}
        assert {tuple(r) for r in b.tolist()} == direct
        assert len(direct) == b.shape[0]  # no duplicates
    with pytest.raises(ValueError, match="positive"):
        candidate_boxes(0, 3)


def test_box_iou_known_values():
    a = torch.tensor([[0, 0, 2, 2], [0, 0, 1, 1]])
    b = torch.tensor([[1, 1, 3, 3], [0, 0, 2, 2], [5, 5, 6, 6]])
    iou = box_iou(a, b)
    expected = torch.tensor([[1 / 7, 1.0, 0.0], [0.0, 0.25, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(iou, expected)


def test_box_geometry_fractions():
    g = box_geometry(torch.tensor([[0, 0, 4, 2], [1, 3, 2, 4]]), h=4, w=4)
    torch.testing.assert_close(g[0], torch.tensor([0, 0, 1, 0.5, 1, 0.5, 0.5]))
    torch.testing.assert_close(g[1], torch.tensor([0.25, 0.75, 0.5, 1, 0.25, 0.25, 0.0625]))


@pytest.mark.parametrize("h,w", [(4, 3), (8, 8)])
def test_summed_area_box_features_equal_direct_means(h, w):
    torch.manual_seed(0)
    B, D = 2, 5
    tokens = torch.randn(B, h * w, D, dtype=torch.float64)
    boxes = candidate_boxes(h, w)
    sat = summed_area_table(tokens, h, w)
    grid = tokens.reshape(B, h, w, D)
    assert torch.allclose(sat[:, 2, 3], grid[:, :2, :3].sum(dim=(1, 2)))
    inside, outside, outside_valid = box_features(tokens, h, w, boxes)
    raw_in, raw_out, _ = box_features(tokens, h, w, boxes, normalize=False)
    for k in torch.randperm(boxes.shape[0])[:60].tolist() + [0, boxes.shape[0] - 1]:
        x0, y0, x1, y1 = boxes[k].tolist()
        sel = torch.zeros(h, w, dtype=torch.bool)
        sel[y0:y1, x0:x1] = True
        sel = sel.flatten()
        mean_in = tokens[:, sel].mean(dim=1)
        torch.testing.assert_close(raw_in[:, k], mean_in, rtol=0, atol=1e-12)
        torch.testing.assert_close(inside[:, k], torch.nn.functional.normalize(mean_in, dim=-1), rtol=0, atol=1e-12)
        if (~sel).any():
            assert outside_valid[k]
            mean_out = tokens[:, ~sel].mean(dim=1)
            torch.testing.assert_close(raw_out[:, k], mean_out, rtol=0, atol=1e-12)
            torch.testing.assert_close(outside[:, k], torch.nn.functional.normalize(mean_out, dim=-1),
                                       rtol=0, atol=1e-12)
        else:
            assert not outside_valid[k]
            assert torch.all(outside[:, k] == 0)
    assert int((~outside_valid).sum()) == 1  # only the whole-grid box has no outside


def test_box_features_gradient_matches_direct():
    torch.manual_seed(1)
    h = w = 3
    tokens = torch.randn(1, 9, 4, dtype=torch.float64, requires_grad=True)
    boxes = candidate_boxes(h, w)
    inside, outside, _ = box_features(tokens, h, w, boxes)
    weights = torch.randn_like(inside)
    (g,) = torch.autograd.grad((inside * weights).sum() + (outside * weights).sum(), tokens)
    t2 = tokens.detach().clone().requires_grad_(True)
    total = 0
    for k, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        sel = torch.zeros(h, w, dtype=torch.bool)
        sel[y0:y1, x0:x1] = True
        sel = sel.flatten()
        total = total + (torch.nn.functional.normalize(t2[0, sel].mean(0), dim=-1) * weights[0, k]).sum()
        if (~sel).any():
            total = total + (torch.nn.functional.normalize(t2[0, ~sel].mean(0), dim=-1) * weights[0, k]).sum()
    (g2,) = torch.autograd.grad(total, t2)
    torch.testing.assert_close(g, g2, rtol=1e-10, atol=1e-12)


def direct_nms(scores, boxes, iou_thr, k):
    """Plain greedy NMS: stable descending order, keep a box unless IoU > thr with a kept one."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # sorted() is stable: ties keep index order
    iou = box_iou(boxes, boxes)
    kept = []
    for i in order:
        if scores[i] == float("-inf"):
            continue
        if all(iou[i, j] <= iou_thr for j in kept):
            kept.append(i)
        if len(kept) == k:
            break
    return kept


@pytest.mark.parametrize("grid,thr,k", [(8, 0.5, 8), (4, 0.3, 6), (2, 0.5, 8), (3, 0.1, 9)])
def test_nms_topk_matches_direct_loop(grid, thr, k):
    torch.manual_seed(grid)
    boxes = candidate_boxes(grid, grid)
    K = boxes.shape[0]
    suppress = box_iou(boxes, boxes) > thr
    scores = torch.cat([torch.randn(3, K),
                        torch.randint(0, 4, (2, K)).float()])  # integer scores: many ties
    scores[0, :5] = float("-inf")  # excluded boxes
    idx, valid = nms_topk(scores, suppress, k)
    for b in range(scores.shape[0]):
        expected = direct_nms(scores[b].tolist(), boxes, thr, k)
        got = idx[b][valid[b]].tolist()
        assert got == expected
        assert valid[b].tolist() == [True] * len(expected) + [False] * (k - len(expected))


def test_nms_topk_fewer_survivors_than_k():
    boxes = candidate_boxes(1, 2)  # 3 boxes: left, both, right
    suppress = box_iou(boxes, boxes) > 0.4
    idx, valid = nms_topk(torch.tensor([[0.0, 1.0, 0.5]]), suppress, 3)
    assert valid.tolist() == [[True, False, False]] and idx[0, 0].item() == 1
    with pytest.raises(ValueError, match="suppress"):
        nms_topk(torch.zeros(1, 3), suppress[:2], 2)


def test_phrase_features_equal_direct_means():
    torch.manual_seed(2)
    B, L, D, P = 3, 7, 4, 3
    tokens = torch.randn(B, L, D, dtype=torch.float64)
    word_mask = torch.ones(B, L, dtype=torch.bool)
    word_mask[:, 0] = False           # [CLS]
    word_mask[0, 5:] = False          # caption 0: [SEP] at 5, padding at 6
    word_mask[1, 3] = False           # a special token inside a span
    spans = torch.tensor([[[1, 3], [3, 5], [0, 0]],
                          [[1, 4], [4, 6], [3, 4]],
                          [[0, 0], [0, 0], [0, 0]]])
    pmask = torch.tensor([[True, True, False], [True, True, True], [False, False, False]])
    feats, mask = phrase_features(tokens, word_mask, spans, pmask)
    # caption 1 phrase 2 covers only a non-word token: invalid; caption 2 has no phrases
    assert mask.tolist() == [[True, True, False], [True, True, False], [False, False, False]]
    for b in range(B):
        for p in range(P):
            if not mask[b, p]:
                assert torch.all(feats[b, p] == 0)
                continue
            s, e = spans[b, p].tolist()
            sel = [i for i in range(s, e) if word_mask[b, i]]
            ref = torch.nn.functional.normalize(tokens[b, sel].mean(0), dim=-1)
            torch.testing.assert_close(feats[b, p], ref, rtol=0, atol=1e-12)
    empty, empty_mask = phrase_features(tokens, word_mask, torch.zeros(B, 0, 2, dtype=torch.long),
                                        torch.zeros(B, 0, dtype=torch.bool))
    assert empty.shape == (B, 0, D) and empty_mask.shape == (B, 0)
    with pytest.raises(ValueError, match="spans"):
        phrase_features(tokens, word_mask, spans[..., :1])


def _brute_grounding_scores(p, x, h, w, boxes, q):
    """Loop-over-boxes float64 oracle of the fixed rule: sum over the box of <p, x_i> - t, t = Q_q + margin."""
    out = torch.empty(p.shape[0], p.shape[1], len(boxes), dtype=torch.float64)
    for b in range(p.shape[0]):
        for j in range(p.shape[1]):
            sim = (x[b].double() @ p[b, j].double()).reshape(h, w)
            t = torch.quantile(sim.reshape(-1), q) + GROUNDING_MARGIN * (sim.max() - sim.min())
            for k, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
                out[b, j, k] = (sim[y0:y1, x0:x1] - t).sum()
    return out


@pytest.mark.parametrize("h,w,q", [(6, 6, 0.7), (4, 7, 0.5), (5, 3, 0.9), (1, 1, 0.7)])
def test_grounding_scores_equal_brute_force(h, w, q):
    torch.manual_seed(h * 10 + w)
    x = torch.nn.functional.normalize(torch.randn(2, h * w, 5, dtype=torch.float64), dim=-1)
    p = torch.nn.functional.normalize(torch.randn(2, 3, 5, dtype=torch.float64), dim=-1)
    boxes = candidate_boxes(h, w)
    want = _brute_grounding_scores(p, x, h, w, boxes, q)
    # every box (the separable box sums) and an explicit subset (the membership matrix) agree
    torch.testing.assert_close(grounding_scores(p, x, h, w, quantile=q), want, rtol=1e-12, atol=1e-12)
    sub = boxes[torch.randperm(len(boxes))[:7]]
    torch.testing.assert_close(grounding_scores(p, x, h, w, sub, quantile=q),
                               _brute_grounding_scores(p, x, h, w, sub, q), rtol=1e-12, atol=1e-12)
    # float32 in, float32 out
    assert grounding_scores(p.float(), x.float(), h, w).dtype == torch.float32


def test_grounding_scores_ignore_a_shared_offset():
    """A component every patch shares (a register-like offset) shifts the map and its quantile alike."""
    torch.manual_seed(0)
    h = w = 5
    x = torch.randn(1, h * w, 6, dtype=torch.float64)
    p = torch.nn.functional.normalize(torch.randn(1, 2, 6, dtype=torch.float64), dim=-1)
    shared = torch.randn(6, dtype=torch.float64) * 3.0
    torch.testing.assert_close(grounding_scores(p, x + shared, h, w), grounding_scores(p, x, h, w),
                               rtol=1e-9, atol=1e-9)


def test_grounding_scores_pick_the_object_box():
    """A constructed image: an object of identical tokens on a noisy background.

    The object covers 9 of 36 patches; with ``quantile=0.75`` the threshold lies between the best
    background patch and the object, so the object's box alone collects every positive term. Under
    the default (0.7) the two best background patches are above the threshold too; a box reaching
    them would have to cross background below it, and here it does not pay.
    """
    h = w = 6
    D = 4
    gen = torch.Generator().manual_seed(3)
    obj = torch.tensor([1.0, 0, 0, 0])
    grid = torch.nn.functional.normalize(torch.tensor([0, 1.0, 0, 0]) + 0.3 * torch.randn(h, w, D, generator=gen), dim=-1)
    grid[1:4, 2:5] = obj  # rows 1..3, columns 2..4
    tokens = grid.reshape(1, h * w, D)
    boxes = candidate_boxes(h, w)
    for q in (0.75, 0.7):
        scores = grounding_scores(obj.reshape(1, 1, D), tokens, h, w, quantile=q)
        assert scores.shape == (1, 1, boxes.shape[0])
        assert boxes[scores[0, 0].argmax()].tolist() == [2, 1, 5, 4]


def test_grounding_scores_prefer_the_smaller_of_tied_boxes():
    """On a flat background (similarity exactly at the quantile) the object's own box wins, not a
    larger box that adds background patches worth nothing."""
    h = w = 8
    x = torch.zeros(1, h * w, 3)
    x[..., 2] = 1.0
    grid = x.reshape(h, w, 3)
    grid[5:7, 4:6] = torch.tensor([1.0, 0.0, 0.0])
    p = torch.tensor([[[1.0, 0.0, 0.0]]])
    boxes = candidate_boxes(h, w)
    assert boxes[grounding_scores(p, x, h, w)[0, 0].argmax()].tolist() == [4, 5, 6, 7]


def test_grounding_scores_reject_bad_input():
    x = torch.zeros(1, 16, 4)
    with pytest.raises(ValueError, match="patch_tokens"):
        grounding_scores(torch.zeros(1, 2, 4), x, 3, 3)
    with pytest.raises(ValueError, match="patch_tokens"):
        grounding_scores(torch.zeros(1, 2, 5), x, 4, 4)
    with pytest.raises(ValueError, match="quantile"):
        grounding_scores(torch.zeros(1, 2, 4), x, 4, 4, quantile=1.5)
    assert grounding_scores(torch.zeros(1, 0, 4), x, 4, 4).shape == (1, 0, 100)


def test_box_features_at_equal_dense_features_and_gradients():
    torch.manual_seed(5)
    h, w, B, D = 4, 3, 2, 6
    boxes = candidate_boxes(h, w)
    M = sat_pooling_matrix(h, w, boxes)
    idx = torch.randint(0, boxes.shape[0], (B, 5))
    tokens = torch.randn(B, h * w, D, dtype=torch.float64, requires_grad=True)
    inside, outside, _ = box_features(tokens, h, w, boxes, pooling_matrix=M)
    sel_in, sel_out = box_features_at(tokens, h, w, M, idx)
    gather = lambda x: x.gather(1, idx[..., None].expand(-1, -1, D))  # noqa: E731
    torch.testing.assert_close(sel_in, gather(inside), rtol=0, atol=1e-12)
    torch.testing.assert_close(sel_out, gather(outside), rtol=0, atol=1e-12)
    wts = torch.randn_like(sel_in)
    g1 = torch.autograd.grad(((gather(inside) + gather(outside)) * wts).sum(), tokens)[0]
    g2 = torch.autograd.grad(((sel_in + sel_out) * wts).sum(), tokens)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)
