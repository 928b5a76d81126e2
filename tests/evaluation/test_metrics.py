"""Metric functions of loupe.evaluate against direct computations and pycocotools."""
from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn.functional as F

from loupe import metrics as M
from loupe import regions as R


# ------------------------------------------------------------------------------------------------
# recall@K
# ------------------------------------------------------------------------------------------------
def test_recall_at_k_hand_computed_with_ties():
    s = torch.tensor([[0.9, 0.1, 0.2, 0.3],    # target 0 ranks 0
                      [0.5, 0.5, 0.1, 0.0],    # target 1 tied with key 0: rank 1 (ties count against)
                      [0.8, 0.7, 0.1, 0.6],    # target 2 is last: rank 3
                      [0.1, 0.2, 0.3, 0.25]])  # target 3 ranks 1
    r = M.recall_at_k(s, torch.arange(4), ks=(1, 2, 3, 4))
    assert r == {1: 0.25, 2: 0.75, 3: 0.75, 4: 1.0}


def test_recall_constant_scores_is_zero_not_one():
    r = M.recall_at_k(torch.zeros(5, 5), torch.arange(5), ks=(1, 4, 5))
    assert r[1] == 0.0 and r[4] == 0.0 and r[5] == 1.0


def test_recall_matches_a_sort_without_ties():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(30, 40, generator=g)
    t = torch.randint(0, 40, (30,), generator=g)
    r = M.recall_at_k(s, t, ks=(1, 5, 10))
    order = s.argsort(dim=1, descending=True)
    rank = (order == t[:, None]).float().argmax(1)
    for k in (1, 5, 10):
        assert r[k] == pytest.approx(float((rank < k).float().mean()))


def test_recall_rejects_bad_input():
    with pytest.raises(ValueError, match="targets"):
        M.recall_at_k(torch.zeros(3, 3), torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match="NaN"):
        M.recall_at_k(torch.tensor([[float("nan")]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="2-D"):
        M.recall_at_k(torch.zeros(3), torch.tensor([0, 1, 2]))


# ------------------------------------------------------------------------------------------------
# IoU helpers, chance, oracle
# ------------------------------------------------------------------------------------------------
def test_box_iou_pairs_edge_cases():
    a = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 0, 0], [0, 0, 10, 10]], dtype=torch.float)
    b = torch.tensor([[0, 0, 10, 10], [10, 0, 20, 10], [5, 0, 15, 10], [0, 0, 0, 0], [2, 2, 4, 4]], dtype=torch.float)
    iou = M.box_iou_pairs(a, b)
    assert iou.tolist() == pytest.approx([1.0, 0.0, 50 / 150, 0.0, 4 / 100])


def test_chance_and_oracle_against_loops():
    cand = R.candidate_boxes(8, 8).double() * 8
    true = torch.tensor([[3.0, 5.0, 20.0, 17.0], [0.0, 0.0, 64.0, 64.0], [40.0, 41.0, 54.0, 60.0]])
    ch = M.chance_acc(true, cand)
    orc = M.oracle_hits(true, cand)
    from loupe.data import oracle_iou
    for i, t in enumerate(true.tolist()):
        ious = [M.box_iou_pairs(torch.tensor([c]), torch.tensor([t]))[0].item() for c in cand.tolist()]
        assert ch[i].item() == pytest.approx(sum(x >= 0.5 for x in ious) / len(ious))
        assert bool(orc[i]) == (oracle_iou(tuple(t), 64, 8)[0] >= 0.5) == (max(ious) >= 0.5)
    assert ch[1].item() == pytest.approx(sum(1 for c in cand.tolist() if (c[2] - c[0]) * (c[3] - c[1]) >= 2048)
                                         / len(cand))


# ------------------------------------------------------------------------------------------------
# grounding and pointing on constructed embeddings
# ------------------------------------------------------------------------------------------------
def _scene(obj, g=8, D=16, noise=0.0, seed=0):
    """Patch tokens: e0 inside the patch-unit box ``obj`` (x0, y0, x1, y1), e1 elsewhere."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.zeros(g, g, D)
    x[..., 1] = 1.0
    x0, y0, x1, y1 = obj
    x[y0:y1, x0:x1] = 0.0
    x[y0:y1, x0:x1, 0] = 1.0
    x = x + noise * torch.randn(g, g, D, generator=gen)
    return F.normalize(x.reshape(1, g * g, D), dim=-1)


# objects of 2+ patches: under i.i.d. noise a one-patch object can lose to a box that also takes
# neighbouring background patches above the phrase's 70th percentile (the rule's known limit)
@pytest.mark.parametrize("obj", [(2, 2, 5, 5), (0, 0, 3, 2), (6, 1, 8, 8), (3, 4, 5, 6)])
def test_grounding_picks_the_object_box(obj):
    g, D = 8, 16
    patches = _scene(obj, g, D, noise=0.05, seed=1)
    phrase = torch.zeros(1, 2, D)
    phrase[0, 0, 0] = 1.0  # names the object
    phrase[0, 1, 1] = 1.0  # names the background
    cand = R.candidate_boxes(g, g)
    idx, score = M.grounding_predictions(phrase, patches, g, cand)
    assert tuple(cand[idx[0, 0]].tolist()) == obj
    true = torch.tensor([obj], dtype=torch.float64) * 8
    pred = cand[idx[0, :1]].double() * 8
    assert M.box_iou_pairs(pred, true).item() == 1.0
    # the background phrase does not pick the object
    assert tuple(cand[idx[0, 1]].tolist()) != obj
    # pointing: the most similar patch of the object phrase lies in the object, the background one's does not
    hits = M.pointing_hits(phrase[0], patches.expand(2, -1, -1), true.expand(2, -1), g, 8)
    assert hits.tolist() == [True, False]


def test_grounding_respects_allowed_boxes():
    g, D = 8, 16
    obj = (2, 2, 5, 5)
    patches = _scene(obj, g, D)
    phrase = torch.zeros(1, 1, D)
    phrase[0, 0, 0] = 1.0
    cand = R.candidate_boxes(g, g)
    allowed = torch.zeros(1, len(cand), dtype=torch.bool)
    other = ((cand == torch.tensor([0, 0, 2, 2])).all(1)).nonzero().item()
    allowed[0, other] = True
    idx, _ = M.grounding_predictions(phrase, patches, g, cand, allowed=allowed)
    assert idx.item() == other


def test_pointing_on_patch_boundaries():
    # patch (row 1, col 2) has centre (20, 12); a box ending at x=20 excludes it (half-open)
    D, g = 4, 8
    patches = torch.zeros(1, g * g, D)
    patches[0, :, 1] = 1.0
    patches[0, 1 * g + 2] = torch.tensor([1.0, 0, 0, 0])
    p = torch.tensor([[1.0, 0, 0, 0]])
    assert M.pointing_hits(p, patches, torch.tensor([[16.0, 8.0, 24.0, 16.0]]), g, 8).item()
    assert not M.pointing_hits(p, patches, torch.tensor([[0.0, 0.0, 20.0, 16.0]]), g, 8).item()


# ------------------------------------------------------------------------------------------------
# COCO AP
# ------------------------------------------------------------------------------------------------
def test_coco_map_hand_cases():
    gt = [{"boxes": [[0, 0, 10, 10]], "labels": [0]}]
    perfect = [{"boxes": [[0, 0, 10, 10]], "scores": [0.9], "labels": [0]}]
    r = M.coco_map(gt, perfect, 1)
    assert r["map"] == pytest.approx(1.0) and r["map50"] == pytest.approx(1.0)
    # a false positive ranked first: precision 0.5 at recall 1 -> AP 0.5 at every threshold
    fp_first = [{"boxes": [[20, 20, 30, 30], [0, 0, 10, 10]], "scores": [0.95, 0.9], "labels": [0, 0]}]
    assert M.coco_map(gt, fp_first, 1)["map"] == pytest.approx(0.5)
    # false positive ranked last: AP 1
    fp_last = [{"boxes": [[20, 20, 30, 30], [0, 0, 10, 10]], "scores": [0.1, 0.9], "labels": [0, 0]}]
    assert M.coco_map(gt, fp_last, 1)["map"] == pytest.approx(1.0)
    # IoU 0.6: a hit at 0.5, 0.55, 0.6 (3 of 10 thresholds)
    loose = [{"boxes": [[0, 0, 10, 6]], "scores": [0.9], "labels": [0]}]
    r = M.coco_map(gt, loose, 1)
    assert r["map50"] == pytest.approx(1.0) and r["map"] == pytest.approx(0.3)
    # two ground truths, one found: AP = mean over recall points <= 0.5 of precision 1 = 51/101
    gt2 = [{"boxes": [[0, 0, 10, 10], [20, 20, 30, 30]], "labels": [0, 0]}]
    assert M.coco_map(gt2, perfect, 1)["map50"] == pytest.approx(51 / 101)
    # a class without ground truth is left out; its detections do not count
    mixed = [{"boxes": [[0, 0, 10, 10], [0, 0, 10, 10]], "scores": [0.9, 0.99], "labels": [0, 1]}]
    r = M.coco_map(gt, mixed, 2)
    assert r["map"] == pytest.approx(1.0) and np.isnan(r["per_class_ap"][1])
    # a duplicate detection is a false positive
    dup = [{"boxes": [[0, 0, 10, 10], [0, 0, 10, 10]], "scores": [0.9, 0.8], "labels": [0, 0]}]
    assert M.coco_map(gt2, dup, 1)["map50"] == pytest.approx(51 / 101)


def test_coco_map_validates():
    with pytest.raises(ValueError, match="label"):
        M.coco_map([{"boxes": [[0, 0, 1, 1]], "labels": [3]}], [{"boxes": [], "scores": [], "labels": []}], 2)
    with pytest.raises(ValueError, match="images"):
        M.coco_map([], [{"boxes": [], "scores": [], "labels": []}], 2)


def _random_fixture(seed: int, n_img: int = 12, C: int = 3):
    rng = np.random.default_rng(seed)
    gts, dets = [], []
    for i in range(n_img):
        G = rng.integers(0, 4)
        gb = rng.uniform(0, 50, (G, 2))
        gb = np.concatenate([gb, gb + rng.uniform(5, 20, (G, 2))], 1)
        gl = rng.integers(0, C - 1, G)  # the last class never has ground truth
        D = rng.integers(0, 7)
        # detections: jittered copies of ground truth and random boxes
        db = []
        for _ in range(D):
            if G and rng.random() < 0.7:
                b = gb[rng.integers(0, G)] + rng.normal(0, 1.0, 4)
            else:
                b = rng.uniform(0, 50, 2)
                b = np.concatenate([b, b + rng.uniform(5, 20, 2)])
            b[2:] = np.maximum(b[2:], b[:2] + 1)
            db.append(b)
        db = np.array(db).reshape(-1, 4)
        ds = rng.random(D).round(6)
        dl = rng.integers(0, C, D)
        gts.append({"boxes": gb, "labels": gl})
        dets.append({"boxes": db, "scores": ds, "labels": dl})
    return gts, dets


def _pycoco(gts, dets, C):
    coco_mod = pytest.importorskip("pycocotools.coco", reason="pycocotools is not installed (pip install pycocotools)")
    from pycocotools.cocoeval import COCOeval
    import contextlib
    import io
    images = [{"id": i + 1, "width": 100, "height": 100} for i in range(len(gts))]
    anns, aid = [], 1
    for i, g in enumerate(gts):
        for b, l in zip(g["boxes"], g["labels"]):
            w, h = b[2] - b[0], b[3] - b[1]
            anns.append({"id": aid, "image_id": i + 1, "category_id": int(l) + 1, "bbox": [b[0], b[1], w, h],
                         "area": w * h, "iscrowd": 0})
            aid += 1
    res = []
    for i, d in enumerate(dets):
        for b, s, l in zip(d["boxes"], d["scores"], d["labels"]):
            res.append({"image_id": i + 1, "category_id": int(l) + 1, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                        "score": float(s)})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = coco_mod.COCO()
        gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": c + 1} for c in range(C)]}
        gt.createIndex()
        dt = gt.loadRes(res) if res else coco_mod.COCO()
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


@pytest.mark.parametrize("seed", range(8))
def test_coco_map_matches_pycocotools(seed):
    C = 3
    gts, dets = _random_fixture(seed, C=C)
    if not any(len(d["scores"]) for d in dets):
        pytest.skip("empty fixture")
    ev = _pycoco(gts, dets, C)
    ours = M.coco_map(gts, dets, C, max_dets=100)
    assert ours["map"] == pytest.approx(ev.stats[0], abs=1e-12)
    assert ours["map50"] == pytest.approx(ev.stats[1], abs=1e-12)
    assert ours["map75"] == pytest.approx(ev.stats[2], abs=1e-12)
    # the precision array itself: [T, R, C] against pycocotools' [T, R, K, A=all, M=100]
    np.testing.assert_allclose(ours["precision"], ev.eval["precision"][:, :, :, 0, 2], atol=1e-12)
    assert 0.0 < ours["map"] < 1.0  # the fixtures are neither trivial nor empty


def test_coco_map_ties_and_max_dets_match_pycocotools():
    # tied scores across images and more than max_dets detections per image and class
    rng = np.random.default_rng(7)
    gts, dets = [], []
    for i in range(5):
        gb = np.array([[10.0, 10, 30, 30], [40, 40, 60, 70]])
        gts.append({"boxes": gb, "labels": np.array([0, 0])})
        db = np.concatenate([gb + rng.normal(0, 3, gb.shape), rng.uniform(0, 40, (6, 2))[:, [0, 1, 0, 1]]
                             + np.array([0, 0, 15, 15])])
        dets.append({"boxes": db, "scores": np.array([0.5, 0.5, 0.5, 0.9, 0.1, 0.5, 0.3, 0.7]),
                     "labels": np.zeros(8, int)})
    ev = _pycoco(gts, dets, 1)
    ours = M.coco_map(gts, dets, 1)
    assert ours["map"] == pytest.approx(ev.stats[0], abs=1e-12)
    assert ours["map50"] == pytest.approx(ev.stats[1], abs=1e-12)
    # max_dets: pycocotools' maxDets=10 row
    ours10 = M.coco_map(gts, dets, 1, max_dets=3)
    with __import__("contextlib").redirect_stdout(__import__("io").StringIO()):
        ev.params.maxDets = [1, 3, 100]
        ev.evaluate()
        ev.accumulate()
    np.testing.assert_allclose(ours10["precision"], ev.eval["precision"][:, :, :, 0, 1], atol=1e-12)


def test_detection_confidence_hand_computed():
    # image 0: class 0 present (0.9), class 1 absent (0.1); scores of 2 boxes per image and class
    scores = torch.tensor([[[4.0, 1.0], [8.0, 6.0]], [[-1.0, -2.0], [2.0, -1.0]]])
    presence = torch.tensor([[0.9, 0.1], [0.5, 0.5]])
    got = M.detection_confidence(scores, presence)
    want = torch.tensor([[[0.9, 0.225], [0.1, 0.075]], [[0.5, 0.5], [0.5, 0.0]]])
    assert torch.allclose(got, want)
    # the absent class's best box, though its rule score is higher, ranks below the present class's
    assert float(got[0, 1, 0]) < float(got[0, 0, 0])
    with pytest.raises(ValueError, match="detection_confidence"):
        M.detection_confidence(scores, presence[:, :1])


def test_patch_pair_cos_hand_computed():
    """Image 0: three unit patches, two equal and one orthogonal: cosines 1, 0, 0 -> mean 1/3.
    Image 1: unnormalised copies of one direction -> 1. Too few patches is an error."""
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]],
                      [[2.0, 2.0], [0.5, 0.5], [3.0, 3.0]]])
    got = M.patch_pair_cos(x)
    assert torch.allclose(got, torch.tensor([1 / 3, 1.0], dtype=torch.float64), atol=1e-12)
    with pytest.raises(ValueError, match="patch_pair_cos"):
        M.patch_pair_cos(torch.ones(2, 1, 3))


def test_patch_pair_cos_with_a_mask_against_the_pair_loop():
    """With a patch mask only the kept patches count (float64 loop over pairs); an image with fewer
    than two kept patches gets 0; the float32 result matches float64 to float32's precision; a mask
    of the wrong shape is an error."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 1, 0, 0], [0, 0, 0, 1, 0, 0], [1, 0, 1, 0, 0, 0]], dtype=torch.bool)
    got = M.patch_pair_cos(x, mask)
    for b in range(4):
        keep = x[b][mask[b]]
        k = keep.shape[0]
        pairs = [torch.nn.functional.cosine_similarity(keep[i], keep[j], dim=0)
                 for i in range(k) for j in range(k) if i != j]
        expect = torch.stack(pairs).mean() if pairs else torch.tensor(0.0, dtype=torch.float64)
        assert abs(float(got[b]) - float(expect)) < 1e-12, b
    assert torch.equal(M.patch_pair_cos(x, torch.ones(4, 6, dtype=torch.bool)), M.patch_pair_cos(x))
    low = M.patch_pair_cos(x.float(), mask, dtype=torch.float32)
    assert low.dtype == torch.float32
    eps = torch.finfo(torch.float32).eps
    assert (low.double() - got).abs().max() < 50 * eps
    with pytest.raises(ValueError, match="patch_mask"):
        M.patch_pair_cos(x, mask[:, :5])


def test_map_diagnostics_hand_computed():
    """2x2 grid, 16-pixel patches, D=2. Image 0: phrase 0 likes the top-left patch (its box), phrase 1
    the bottom-right; image 1: one phrase whose box covers the whole image (no outside -> NaN)."""
    patches = torch.tensor([[[1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 1.0]],
                            [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]])
    phrase = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    image = torch.tensor([0, 0, 1])
    boxes = torch.tensor([[0.0, 0, 16, 16], [16.0, 16, 32, 32], [0.0, 0, 32, 32]])
    d = M.map_diagnostics(phrase, patches[image], boxes, image, grid=2, patch_size=16)
    # maps: [1,0,0,0], [0,0,0,1], [1,1,1,1]; inside minus outside: 1 - 0, 1 - 0, NaN
    assert d["inside_minus_outside"][:2].tolist() == [1.0, 1.0] and torch.isnan(d["inside_minus_outside"][2])
    assert d["best_patch"].tolist() == [0, 3, 0]
    # one pair of phrases in image 0: corr([1,0,0,0], [0,0,0,1]) = -1/3
    assert d["pair_corr"].shape == (1,)
    assert abs(float(d["pair_corr"][0]) + 1 / 3) < 1e-12
