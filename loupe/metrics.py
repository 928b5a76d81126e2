"""Evaluation metrics: pure functions of model outputs and ground truth (METHOD section 10).

Retrieval recall, pointing, box accuracy against the fixed grounding rule, chance and oracle
bounds, map diagnostics, COCO-style mAP (an exact re-implementation of pycocotools' bbox
evaluation, tested against it) and the detection confidence. IoU comes from
:func:`loupe.regions.box_iou`, the project's one IoU.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from . import regions as R

__all__ = ["recall_at_k", "box_iou_pairs", "patch_centres", "points_inside", "pointing_hits", "map_diagnostics", "patch_pair_cos",
           "chance_acc", "oracle_hits", "grounding_predictions", "coco_map", "detection_confidence",
           "COCO_IOU_THRESHOLDS", "COCO_RECALL_POINTS", "object_hits", "points_in_any", "matching_objects",
           "shared_attributes", "discrimination"]

#: IoU thresholds of COCO's mAP@[.5:.95] (the same floats pycocotools uses)
COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
#: COCO's 101 recall points
COCO_RECALL_POINTS = np.linspace(0.0, 1.0, int(np.round((1.0 - 0.0) / 0.01)) + 1, endpoint=True)


# ------------------------------------------------------------------------------------------------
# metric functions (pure; tested against direct computations)
# ------------------------------------------------------------------------------------------------
def recall_at_k(scores: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """Share of queries whose target key ranks in the top ``k``, for each ``k`` in ``ks``.

    ``scores [Nq, Nk]`` (higher = more similar), ``targets [Nq]`` long (the index of each query's
    correct key). The rank of the target is the number of *other* keys scoring ``>=`` it: ties
    count against the model, so a constant score matrix gets 0 for every ``k < Nk``.
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        raise ValueError(f"recall_at_k: scores must be a 2-D tensor [Nq, Nk], got {getattr(scores, 'shape', scores)!r}")
    targets = torch.as_tensor(targets, dtype=torch.long, device=scores.device)
    if targets.shape != (scores.shape[0],):
        raise ValueError(f"recall_at_k: targets must have shape [{scores.shape[0]}], got {list(targets.shape)}")
    if scores.shape[0] == 0:
        raise ValueError("recall_at_k: no queries")
    if bool((targets < 0).any()) or bool((targets >= scores.shape[1]).any()):
        raise ValueError(f"recall_at_k: targets must lie in [0, {scores.shape[1]})")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("recall_at_k: scores contain NaN or inf")
    correct = scores.gather(1, targets[:, None])
    rank = (scores >= correct).sum(1) - 1  # other keys at least as good
    return {int(k): float((rank < k).double().mean()) for k in ks}


def box_iou_pairs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of aligned boxes ``a[i]`` and ``b[i]`` (``[N, 4]`` xyxy) -> ``[N]`` float64 (0 for empty unions)."""
    return R.box_iou(a.double()[:, None], b.double()[:, None])[:, 0, 0]


def patch_centres(grid: int, patch_size: int) -> torch.Tensor:
    """Pixel centres ``[grid*grid, 2]`` (x, y) of the patches in row-major order."""
    c = torch.arange(grid, dtype=torch.float64) * patch_size + patch_size / 2.0
    ys, xs = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1)


def points_inside(points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """``points [N, 2]`` or ``[N, n, 2]`` inside ``boxes [N, 4]`` (half-open: x0 <= x < x1)."""
    if points.dim() == 2:
        points = points[:, None]
    b = boxes.double()[:, None]
    x, y = points[..., 0], points[..., 1]
    return (x >= b[..., 0]) & (x < b[..., 2]) & (y >= b[..., 1]) & (y < b[..., 3])


def pointing_hits(phrase_feats: torch.Tensor, patch_tokens: torch.Tensor, true_boxes: torch.Tensor,
                  grid: int, patch_size: int) -> torch.Tensor:
    """Pointing game: is the phrase's most similar patch (its centre) inside its true box?

    ``phrase_feats [N, D]``, ``patch_tokens [N, n, D]`` (the image of each phrase), ``true_boxes
    [N, 4]`` pixels xyxy -> bool ``[N]``. Ties go to the lowest patch index.
    """
    if phrase_feats.dim() != 2 or patch_tokens.dim() != 3 or patch_tokens.shape[0] != phrase_feats.shape[0]:
        raise ValueError(f"pointing_hits: expected phrase_feats [N, D] and patch_tokens [N, n, D], got "
                         f"{list(phrase_feats.shape)} and {list(patch_tokens.shape)}")
    if patch_tokens.shape[1] != grid * grid:
        raise ValueError(f"pointing_hits: patch_tokens has {patch_tokens.shape[1]} patches, grid {grid}x{grid}")
    sim = torch.einsum("nd,nkd->nk", phrase_feats.float(), patch_tokens.float())
    best = sim.argmax(1)
    pts = patch_centres(grid, patch_size).to(best.device)[best]
    return points_inside(pts, true_boxes.to(best.device))[:, 0]


def map_diagnostics(phrase_feats: torch.Tensor, patch_tokens: torch.Tensor, true_boxes: torch.Tensor,
                    image_ids: torch.Tensor, grid: int, patch_size: int) -> dict[str, torch.Tensor]:
    """Per-phrase facts about the phrase-patch similarity map that need no scoring rule.

    Returns ``inside_minus_outside [N]`` (mean similarity of the patches inside the true box minus
    the mean outside it; NaN where the box covers every patch), ``best_patch [N]`` (the index of the
    most similar patch) and ``pair_corr [Q]``: the Pearson correlation of the maps of every pair of
    phrases of the same image (``image_ids [N]``). Maps of different phrases that correlate near 1
    mean the patch tokens share one component that every phrase follows (e.g. register-like
    background patches that carry the image's global content).
    """
    sim = torch.einsum("nd,nkd->nk", phrase_feats.double(), patch_tokens.double())
    inside = points_inside(patch_centres(grid, patch_size).to(sim.device)[None].expand(len(sim), -1, -1),
                     true_boxes.to(sim.device))
    n_in, n_out = inside.sum(1), (~inside).sum(1)
    mean_in = (sim * inside).sum(1) / n_in.clamp(min=1)
    mean_out = (sim * ~inside).sum(1) / n_out.clamp(min=1)
    diff = torch.where((n_in > 0) & (n_out > 0), mean_in - mean_out, torch.full_like(mean_in, float("nan")))
    corr = []
    for img in image_ids.unique():
        rows = sim[image_ids == img]
        if len(rows) < 2:
            continue
        c = torch.corrcoef(rows)
        iu = torch.triu_indices(len(rows), len(rows), 1)
        corr.append(c[iu[0], iu[1]])
    pair_corr = torch.cat(corr) if corr else torch.zeros(0, dtype=torch.float64)
    return {"inside_minus_outside": diff, "best_patch": sim.argmax(1), "pair_corr": pair_corr}


def patch_pair_cos(patch_tokens: torch.Tensor, patch_mask: torch.Tensor | None = None,
                   dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Mean cosine between two different patch tokens of the same image: ``[B, n, D]`` -> ``[B]``.

    Near 1 when the patches carry one shared component (the image's global content) rather than
    their own; CLIP here keeps about 0.7, runs whose phrases all point at one patch 0.85 and more.
    ``patch_mask [B, n]`` (bool, optional) keeps only the real patches; an image with fewer than two
    of them gets 0. Computed in ``dtype`` (float64 for diagnostics; the training term
    :func:`loupe.losses.patch_spread_loss` uses its working dtype) and differentiable.
    """
    if patch_tokens.dim() != 3 or (patch_mask is None and patch_tokens.shape[1] < 2):
        raise ValueError(f"patch_pair_cos: expected [B, n >= 2, D], got {list(patch_tokens.shape)}")
    if patch_mask is not None and patch_mask.shape != patch_tokens.shape[:2]:
        raise ValueError(f"patch_pair_cos: patch_mask {list(patch_mask.shape)} does not match "
                         f"patch_tokens {list(patch_tokens.shape)}")
    x = torch.nn.functional.normalize(patch_tokens.to(dtype), dim=-1)
    if patch_mask is None:
        n = torch.full(x.shape[:1], float(x.shape[1]), dtype=dtype, device=x.device)
    else:
        m = patch_mask.to(device=x.device, dtype=dtype)
        x = x * m[..., None]
        n = m.sum(1)
    s = x.sum(1)
    # sum over i != j of <x_i, x_j>: |sum x_i|^2 minus the diagonal (each kept x_i a unit vector)
    return ((s * s).sum(-1) - (x * x).sum((1, 2))) / (n * (n - 1)).clamp_min(1.0)


def chance_acc(true_boxes: torch.Tensor, candidates: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Expected hit of a uniformly random candidate box: per true box ``[N, 4]``, the share of the
    ``candidates [K, 4]`` (pixels) with IoU >= ``threshold`` -> ``[N]`` float64 (exact, not sampled)."""
    return (R.box_iou(true_boxes.double(), candidates.double()) >= threshold).double().mean(1)


def oracle_hits(true_boxes: torch.Tensor, candidates: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Whole-patch oracle: does any candidate reach IoU >= ``threshold`` with each true box? -> bool ``[N]``."""
    return R.box_iou(true_boxes.double(), candidates.double()).max(1).values >= threshold


def grounding_predictions(phrase_feats: torch.Tensor, patch_tokens: torch.Tensor, grid: int,
                          candidates: torch.Tensor | None = None,
                          allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Best candidate box per phrase under the fixed rule :func:`loupe.regions.grounding_scores`.

    ``phrase_feats [B, P, D]``, ``patch_tokens [B, n, D]``, ``candidates [K, 4]`` long patch units
    (``None``: every whole-patch box); ``allowed [B, K]`` bool restricts the choice (e.g. to
    objectness regions). Returns the chosen candidate index ``[B, P]`` and its score ``[B, P]``.
    Ties go to the lowest index.
    """
    s = R.grounding_scores(phrase_feats.float(), patch_tokens.float(), grid, grid, candidates)  # [B, P, K]
    if allowed is not None:
        s = s.masked_fill(~allowed[:, None, :], float("-inf"))
    score, idx = s.max(-1)
    return idx, score


# ------------------------------------------------------------------------------------------------
# COCO-style average precision
# ------------------------------------------------------------------------------------------------
def _iou_matrix_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return R.box_iou(torch.from_numpy(np.asarray(a, dtype=np.float64)).reshape(-1, 4),
                     torch.from_numpy(np.asarray(b, dtype=np.float64)).reshape(-1, 4)).numpy()


def coco_map(ground_truth: Sequence[dict], detections: Sequence[dict], num_classes: int,
             iou_thresholds: Sequence[float] = COCO_IOU_THRESHOLDS, max_dets: int = 100) -> dict[str, Any]:
    """COCO bbox AP, computed the way pycocotools computes it (area range "all", no crowd boxes).

    ``ground_truth[i]`` / ``detections[i]`` describe image ``i``: ``{"boxes": [G, 4] xyxy,
    "labels": [G]}`` and ``{"boxes": [D, 4], "scores": [D], "labels": [D]}`` (arrays or tensors).
    Per image and class, detections are sorted by score (stable) and cut at ``max_dets``; each one,
    in that order, matches the not yet matched ground-truth box of its class with the highest IoU
    >= t. Per class, detections of all images are ranked by score (stable, image order), precision
    is made monotone, sampled at 101 recall points and averaged. Classes without ground truth are
    left out of the mean (their AP is NaN).

    Returns ``map`` (mean over IoU thresholds and classes), ``map50``, ``map75`` (when 0.5/0.75 are
    thresholds), ``per_class_ap [C]``, ``per_class_ap50 [C]`` (NaN for classes without ground truth)
    and ``precision [T, 101, C]`` (-1 where undefined, like pycocotools).
    """
    if len(ground_truth) != len(detections):
        raise ValueError(f"coco_map: {len(ground_truth)} ground-truth images but {len(detections)} detection images")
    if num_classes < 1:
        raise ValueError(f"coco_map: num_classes must be >= 1, got {num_classes}")
    thr = np.asarray(iou_thresholds, dtype=np.float64)
    T, R, C = len(thr), len(COCO_RECALL_POINTS), num_classes
    # per class: lists over images of (scores, matched[T, d]) and the number of ground-truth boxes
    per_scores: list[list[np.ndarray]] = [[] for _ in range(C)]
    per_match: list[list[np.ndarray]] = [[] for _ in range(C)]
    n_gt = np.zeros(C, dtype=np.int64)

    def arr(x, shape_tail, dtype):
        a = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=dtype)
        return a.reshape((-1,) + shape_tail)

    for i, (g, d) in enumerate(zip(ground_truth, detections)):
        gb, gl = arr(g["boxes"], (4,), np.float64), arr(g["labels"], (), np.int64)
        db, ds, dl = arr(d["boxes"], (4,), np.float64), arr(d["scores"], (), np.float64), arr(d["labels"], (), np.int64)
        if gb.shape[0] != gl.shape[0] or not (db.shape[0] == ds.shape[0] == dl.shape[0]):
            raise ValueError(f"coco_map: image {i}: boxes, labels (and scores) must have the same length")
        for c in np.union1d(np.unique(gl), np.unique(dl)):
            if not 0 <= c < C:
                raise ValueError(f"coco_map: image {i}: label {c} outside [0, {C})")
            gcb = gb[gl == c]
            sel = np.flatnonzero(dl == c)
            order = np.argsort(-ds[sel], kind="mergesort")[:max_dets]
            dcb, dcs = db[sel][order], ds[sel][order]
            n_gt[c] += gcb.shape[0]
            ious = _iou_matrix_np(dcb, gcb)
            matched = np.zeros((T, dcb.shape[0]), dtype=bool)
            for t, th in enumerate(thr):
                taken = np.zeros(gcb.shape[0], dtype=bool)
                lim = min(th, 1 - 1e-10)
                for k in range(dcb.shape[0]):
                    best, m = lim, -1
                    for j in range(gcb.shape[0]):
                        if taken[j] or ious[k, j] < best:
                            continue
                        best, m = ious[k, j], j
                    if m >= 0:
                        taken[m] = True
                        matched[t, k] = True
            per_scores[c].append(dcs)
            per_match[c].append(matched)

    precision = -np.ones((T, R, C))
    recall = -np.ones((T, C))
    for c in range(C):
        if n_gt[c] == 0:
            continue
        scores = np.concatenate(per_scores[c]) if per_scores[c] else np.zeros(0)
        match = np.concatenate(per_match[c], axis=1) if per_match[c] else np.zeros((T, 0), bool)
        order = np.argsort(-scores, kind="mergesort")
        match = match[:, order]
        tp = np.cumsum(match, axis=1, dtype=np.float64)
        fp = np.cumsum(~match, axis=1, dtype=np.float64)
        for t in range(T):
            nd = tp.shape[1]
            rc = tp[t] / n_gt[c]
            pr = tp[t] / (fp[t] + tp[t] + np.spacing(1))
            recall[t, c] = rc[-1] if nd else 0.0
            pr = np.maximum.accumulate(pr[::-1])[::-1] if nd else pr  # monotone from the right
            q = np.zeros(R)
            idx = np.searchsorted(rc, COCO_RECALL_POINTS, side="left")
            ok = idx < nd
            q[ok] = pr[idx[ok]]
            precision[t, :, c] = q
    valid = n_gt > 0
    ap_tc = np.where(precision >= 0, precision, np.nan)  # [T, R, C]
    per_class = np.full(C, np.nan)
    per_class[valid] = ap_tc[:, :, valid].mean(axis=(0, 1))  # every entry of a class with ground truth is >= 0

    def at(th: float) -> tuple[float, np.ndarray]:
        hit = np.flatnonzero(np.isclose(thr, th))
        if hit.size == 0:
            return float("nan"), np.full(C, np.nan)
        pc = np.where(valid, precision[hit[0]].mean(0), np.nan)
        return (float(np.nanmean(pc)) if valid.any() else float("nan")), pc

    m50, pc50 = at(0.5)
    m75, _ = at(0.75)
    sel = precision[precision > -1]
    return {"map": float(sel.mean()) if sel.size else float("nan"), "map50": m50, "map75": m75,
            "per_class_ap": per_class, "per_class_ap50": pc50, "precision": precision, "recall": recall,
            "num_gt": n_gt}


def detection_confidence(box_scores: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
    """Confidence of each detection ``[B, C, k]`` from its rule score and the class's presence.

    The fixed rule's score (:func:`loupe.regions.grounding_scores`) says where a class would be in
    an image, not whether it is there: its threshold is set per image and class, so an absent class
    still gets a positive best box. A detection's confidence is therefore ``presence[b, c]`` (the
    zero-shot ``P(class | image)`` from the global embeddings) times the box's score relative to
    the best box of that image and class, clamped to [0, 1] (1 where the best score is not
    positive). Within an image and class the order of the boxes is the rule's. [ours]
    """
    if box_scores.dim() != 3 or presence.shape != box_scores.shape[:2]:
        raise ValueError(f"detection_confidence: expected box_scores [B, C, k] and presence [B, C], got "
                         f"{list(box_scores.shape)} and {list(presence.shape)}")
    top = box_scores.max(-1, keepdim=True).values
    rel = torch.where(top > 0, (box_scores / top.clamp(min=1e-12)).clamp(0, 1), torch.ones_like(box_scores))
    return presence[..., None].to(rel.dtype) * rel


# ------------------------------------------------------------------------------------------------
# finding objects vs. naming them [ours]: what a phrase adds over a text-free object finder
# ------------------------------------------------------------------------------------------------
def object_hits(pred: torch.Tensor, objects: Sequence[torch.Tensor], threshold: float = 0.5) -> torch.Tensor:
    """Does the predicted box ``pred[i]`` ``[N, 4]`` reach IoU >= ``threshold`` with *any* object box
    of its scene ``objects[i]`` ``[k_i, 4]``? -> bool ``[N]`` (the "any" hit: an object was found)."""
    out = torch.zeros(len(objects), dtype=torch.bool)
    for i, boxes in enumerate(objects):
        if len(boxes):
            out[i] = bool((R.box_iou(pred[i:i + 1].double(), boxes.double()) >= threshold).any())
    return out


def points_in_any(points: torch.Tensor, objects: Sequence[torch.Tensor]) -> torch.Tensor:
    """Is ``points[i]`` ``[N, 2]`` (x, y pixels) inside any object box of ``objects[i]``? -> bool ``[N]``."""
    out = torch.zeros(len(objects), dtype=torch.bool)
    for i, boxes in enumerate(objects):
        if len(boxes):
            out[i] = bool(points_inside(points[i].double()[None, None].expand(len(boxes), 1, 2), boxes.double()).any())
    return out


def matching_objects(own: Sequence[int], scene: Sequence[Sequence[int]]) -> torch.Tensor:
    """How many objects of each phrase's scene share the phrase object's attribute value (itself
    included): ``own[i]`` is the value of phrase i's object, ``scene[i]`` the values of every object
    of its scene -> long ``[N]``. An attribute-only finder (it knows every object's true value of this
    attribute and nothing else) picks among them at random: its expected accuracy is ``1 / count``."""
    return torch.tensor([max(1, sum(1 for v in vals if v == o)) for o, vals in zip(own, scene)], dtype=torch.long)


def shared_attributes(color: int, shape: int, colors: Sequence[int], shapes: Sequence[int], me: int) -> str:
    """Which attributes of object ``me`` other objects of its scene share: ``identical`` (another
    object has both), ``both`` (one shares the colour, another the shape), ``color``, ``shape`` or
    ``unique``. With no colours (-1) the size plays the colour's part (the caller passes sizes)."""
    others = [(c, s) for j, (c, s) in enumerate(zip(colors, shapes)) if j != me]
    if (color, shape) in others:
        return "identical"
    sc = any(c == color for c, _ in others)
    ss = any(s == shape for _, s in others)
    return "both" if sc and ss else "color" if sc else "shape" if ss else "unique"


def discrimination(own: torch.Tensor, any_: torch.Tensor) -> float | None:
    """``own / any``: of the phrases for which some object was found, the share where it was the
    phrase's own object (1/k in expectation for a finder that ignores the text; None when nothing
    was found)."""
    n_any = float(any_.double().sum())
    return float(own.double().sum()) / n_any if n_any > 0 else None
