"""Zero-shot evaluation of a trained checkpoint (METHOD section 10).

    python -m loupe.evaluate --checkpoint runs/loupe --out runs/loupe/eval.json

Measures, on the built-in grounded sets generated with the training run's seed (so the
compositional split holds the colour-noun pairs that training never saw):

- **retrieval** (test split): R@1/5/10 image->text and text->image on the global embeddings, and
  FILIP's token-wise late-interaction scores as an extra row (``retrieval.filip``);
- **classification** (single-object split): top-1/top-5 with prompt templates, class = shape
  (``classification.top1``) and class = colour + shape (``classification.color_shape_top1``);
- **grounding** (test and compositional splits): every whole-patch box is scored for the phrase
  with one fixed rule for every model, ``sum_{i in b} (<p, x_i> - t_p)`` with ``t_p`` just above
  the 70th percentile of the phrase's patch similarities (:func:`loupe.regions.grounding_scores`);
  the best box is correct when IoU >= 0.5 (Acc@0.5); beside it pointing accuracy (the phrase's most
  similar patch has its centre inside the true box), chance (the exact expectation for a uniformly
  random whole-patch box, and for a random patch), the whole-patch oracle, each by object size;
  for models trained with a region head (objective ``loupe``) an extra row restricted to the top-M
  objectness regions after NMS (``grounding.regions``);
- **detection** (test split): every whole-patch box scored against each class prompt with the same
  rule, NMS per class, COCO-style mAP@0.5 and mAP@[.5:.95] (:func:`coco_map`, an exact
  re-implementation of pycocotools' bbox evaluation, tested against it).

Writes the JSON, a Markdown table (``.md`` beside it) and PNG figures (``<out stem>_figures/``).
All metric values are in [0, 1]. Ranks count ties against the model (a constant score matrix gets
R@1 = 0, not 1).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

__all__ = ["evaluate_checkpoint", "evaluate_model", "recall_at_k", "coco_map", "COCO_IOU_THRESHOLDS",
           "grounding_predictions", "pointing_hits", "chance_acc", "oracle_hits", "box_iou_pairs",
           "patch_centres", "markdown_table", "CheckpointError", "EvalOptions", "PROMPT_TEMPLATES"]

#: IoU thresholds of COCO's mAP@[.5:.95] (the same floats pycocotools uses)
COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
#: COCO's 101 recall points
COCO_RECALL_POINTS = np.linspace(0.0, 1.0, int(np.round((1.0 - 0.0) / 0.01)) + 1, endpoint=True)
#: prompt templates for class prompts; "{}" is the class phrase ("a circle", "a red circle"). Built
#: from the caption templates of the built-in sets, so every word is in the tokenizer's vocabulary.
RULE = ("sum over the box's patches of <p, x_i> - t_p, t_p = the phrase's 70th-percentile patch similarity "
        "+ 1e-4 of its range; best of all whole-patch boxes")
PROMPT_TEMPLATES: tuple[str, ...] = ("{}", "there is {}", "a picture of {}", "an image with {}",
                                     "this shows {}", "we can see {}", "{} in the scene")


class CheckpointError(ValueError):
    """The checkpoint is missing, unreadable, or does not fit this version of loupe."""


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


def _box_area(b: torch.Tensor) -> torch.Tensor:
    """Area of xyxy boxes ``[N, 4]`` -> ``[N]`` (0 for inverted boxes)."""
    return (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)


def box_iou_pairs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of aligned boxes ``a[i]`` and ``b[i]`` (``[N, 4]`` xyxy) -> ``[N]`` float64 (0 for empty unions)."""
    a, b = a.double(), b.double()
    iw = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp(min=0)
    ih = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp(min=0)
    inter = iw * ih
    union = _box_area(a) + _box_area(b) - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def patch_centres(grid: int, patch_size: int) -> torch.Tensor:
    """Pixel centres ``[grid*grid, 2]`` (x, y) of the patches in row-major order."""
    c = torch.arange(grid, dtype=torch.float64) * patch_size + patch_size / 2.0
    ys, xs = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1)


def _inside(points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
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
    return _inside(pts, true_boxes.to(best.device))[:, 0]


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
    inside = _inside(patch_centres(grid, patch_size).to(sim.device)[None].expand(len(sim), -1, -1),
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


def patch_pair_cos(patch_tokens: torch.Tensor) -> torch.Tensor:
    """Mean cosine between two different patch tokens of the same image: ``[B, n, D]`` -> ``[B]``.

    Near 1 when the patches carry one shared component (the image's global content) rather than
    their own; CLIP here keeps about 0.7, runs whose phrases all point at one patch 0.85 and more.
    """
    if patch_tokens.dim() != 3 or patch_tokens.shape[1] < 2:
        raise ValueError(f"patch_pair_cos: expected [B, n >= 2, D], got {list(patch_tokens.shape)}")
    x = torch.nn.functional.normalize(patch_tokens.double(), dim=-1)
    n = x.shape[1]
    s = x.sum(1)
    return ((s * s).sum(-1) - n) / (n * (n - 1))  # sum over i != j of <x_i, x_j>, each x_i unit


def chance_acc(true_boxes: torch.Tensor, candidates: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Expected hit of a uniformly random candidate box: per true box ``[N, 4]``, the share of the
    ``candidates [K, 4]`` (pixels) with IoU >= ``threshold`` -> ``[N]`` float64 (exact, not sampled)."""
    from .regions import box_iou
    return (box_iou(true_boxes.double(), candidates.double()) >= threshold).double().mean(1)


def oracle_hits(true_boxes: torch.Tensor, candidates: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Whole-patch oracle: does any candidate reach IoU >= ``threshold`` with each true box? -> bool ``[N]``."""
    from .regions import box_iou
    return box_iou(true_boxes.double(), candidates.double()).max(1).values >= threshold


def grounding_predictions(phrase_feats: torch.Tensor, patch_tokens: torch.Tensor, grid: int,
                          candidates: torch.Tensor | None = None,
                          allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Best candidate box per phrase under the fixed rule :func:`loupe.regions.grounding_scores`.

    ``phrase_feats [B, P, D]``, ``patch_tokens [B, n, D]``, ``candidates [K, 4]`` long patch units
    (``None``: every whole-patch box); ``allowed [B, K]`` bool restricts the choice (e.g. to
    objectness regions). Returns the chosen candidate index ``[B, P]`` and its score ``[B, P]``.
    Ties go to the lowest index.
    """
    from . import regions as R
    s = R.grounding_scores(phrase_feats.float(), patch_tokens.float(), grid, grid, candidates)  # [B, P, K]
    if allowed is not None:
        s = s.masked_fill(~allowed[:, None, :], float("-inf"))
    score, idx = s.max(-1)
    return idx, score


# ------------------------------------------------------------------------------------------------
# COCO-style average precision
# ------------------------------------------------------------------------------------------------
def _iou_matrix_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.shape[0] == 0 or b.shape[0] == 0:
        return np.zeros((a.shape[0], b.shape[0]))
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


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


# ------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------
def load_checkpoint(directory: str, device: str | torch.device = "cpu"):
    """``(model, train_config)`` of a training output directory; :class:`CheckpointError` when the
    checkpoint is missing, unreadable, incompatible, or was saved without its tokenizer."""
    from .model import load
    if not os.path.exists(directory):
        raise CheckpointError(f"checkpoint {directory!r} does not exist")
    try:
        model = load(directory, map_location=device)
    except (FileNotFoundError, ValueError, TypeError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"cannot evaluate checkpoint {directory!r}: {e}") from e
    d = directory if os.path.isdir(directory) else os.path.dirname(directory) or "."
    if getattr(model, "tokenizer", None) is None:
        raise CheckpointError(f"checkpoint {directory!r} has no readable tokenizer.json beside model.pt; "
                              f"evaluation needs the tokenizer the model was trained with")
    train_cfg: dict = {}
    path = os.path.join(d, "config.json")
    if os.path.exists(path):
        try:
            with open(path) as f:
                train_cfg = json.load(f).get("train", {}) or {}
        except (ValueError, AttributeError) as e:
            raise CheckpointError(f"{path!r} is not valid JSON: {e}") from e
    return model, train_cfg


# ------------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------------
@dataclass
class EvalOptions:
    """What :func:`evaluate_model` measures and on how much data."""

    dataset_type: str | None = None   # None: the training run's (config.json), else "synthetic"
    seed: int | None = None           # None: the training run's seed (fixes the held-out pairs)
    num_test: int = 500               # test-split images (retrieval, grounding, detection)
    num_compositional: int = 500
    num_single: int = 500             # single-object images (classification)
    batch_size: int = 100
    max_dets: int = 10                # detections kept per image and class after NMS
    figures: bool = True
    num_examples: int = 8             # grounding examples in the figure
    progress: bool = True
    device: str | None = None
    extra: dict = field(default_factory=dict)


def _size_bucket(ds, index: int, boxes: torch.Tensor, image_size: int) -> list[str]:
    """Object size names of a sample's boxes: the scene's own size ids for the built-in sets,
    else by area (small: below (0.3 * image side)^2)."""
    scene = getattr(ds, "scene", None)
    if scene is not None:
        try:
            from .data.scenes import SIZE_NAMES
            return [SIZE_NAMES[s] for s in scene(int(index), render=False).size_ids]
        except (AttributeError, IndexError, ValueError):
            pass
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return ["small" if float(a) < (0.3 * image_size) ** 2 else "large" for a in area]


class _Bar:
    def __init__(self, total: int, enabled: bool, desc: str) -> None:
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                self.bar = None

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _batches(ds, n: int, collate, batch_size: int):
    for lo in range(0, n, batch_size):
        items = [ds[i] for i in range(lo, min(n, lo + batch_size))]
        yield items, collate(items)


@torch.no_grad()
def _encode_split(model, ds, n: int, opts: EvalOptions, desc: str, *, regions: bool, keep_examples: int = 0):
    """Encode ``n`` samples; per phrase: grounding predictions, pointing, oracle, chance, size."""
    from .data import Collator
    from .model import center_words
    from .regions import phrase_features
    dev = model.logit_scale.device
    centred_model = bool(getattr(model.config, "text_center_words", False))
    g, p = model.grid_size, model.config.patch_size
    cand_px = model.candidate_boxes.double() * p
    collate = Collator(model.tokenizer, max_length=min(32, model.config.context_length))
    rec: dict[str, list] = {k: [] for k in ("hit", "point", "oracle", "chance", "chance_point", "size", "iou",
                                            "hit_regions", "score", "in_out", "best_patch", "pair_corr",
                                            "point_wc", "area_ratio", "patch_cos")}
    glob = {"img": [], "txt": [], "patches": [], "words": [], "wmask": []}
    examples = []
    bar = _Bar(n, opts.progress, desc)
    for items, batch in _batches(ds, n, collate, opts.batch_size):
        images = batch["images"].to(dev)
        img_emb, patches = model.encode_image_tokens(images)
        txt_emb, words, wmask = model.encode_text_tokens(batch["input_ids"].to(dev), batch["attention_mask"].to(dev))
        wmask = wmask & batch["word_mask"].to(dev)
        glob["img"].append(img_emb.float().cpu())
        glob["txt"].append(txt_emb.float().cpu())
        glob["patches"].append(patches.float().cpu())
        glob["words"].append(words.float().cpu())
        glob["wmask"].append(wmask.cpu())
        pf, pmask = phrase_features(words, wmask, batch["phrase_spans"].to(dev), batch["phrase_mask"].to(dev))
        # the same phrases from word tokens centred on their caption (loupe.model.center_words), post hoc
        # for models trained without it: how much of a map is a component every word of the caption shares
        pf_wc = pf if centred_model else phrase_features(center_words(words, wmask), wmask, batch["phrase_spans"].to(dev),
                                                         batch["phrase_mask"].to(dev))[0]
        valid = (pmask.cpu() & batch["box_mask"])
        idx, score = grounding_predictions(pf, patches, g)  # every box, in model.candidate_boxes order
        idx_r = None
        if regions:
            reg = model.regions(patches)
            allowed = torch.zeros(idx.shape[0], cand_px.shape[0], dtype=torch.bool, device=dev)
            allowed.scatter_(1, reg["region_index"], reg["region_mask"])
            idx_r, _ = grounding_predictions(pf, patches, g, allowed=allowed)
        rec["patch_cos"].append(patch_pair_cos(patches.float().cpu()))
        bi, pi = valid.nonzero(as_tuple=True)
        if bi.numel():
            true = batch["boxes"][bi, pi].double()
            pred = cand_px.cpu()[idx.cpu()[bi, pi]]
            iou = box_iou_pairs(pred, true)
            rec["area_ratio"].append(_box_area(pred) / _box_area(true).clamp(min=1e-12))
            rec["iou"].append(iou)
            rec["hit"].append(iou >= 0.5)
            rec["score"].append(score.cpu()[bi, pi])
            rec["point"].append(pointing_hits(pf.cpu()[bi, pi].float(), patches.cpu()[bi].float(), true, g, p))
            rec["point_wc"].append(pointing_hits(pf_wc.cpu()[bi, pi].float(), patches.cpu()[bi].float(), true, g, p))
            diag = map_diagnostics(pf.cpu()[bi, pi], patches.cpu()[bi], true, bi, g, p)
            rec["in_out"].append(diag["inside_minus_outside"])
            rec["best_patch"].append(diag["best_patch"])
            rec["pair_corr"].append(diag["pair_corr"])
            rec["oracle"].append(oracle_hits(true, cand_px.cpu()))
            rec["chance"].append(chance_acc(true, cand_px.cpu()))
            rec["chance_point"].append(_inside(patch_centres(g, p)[None].expand(len(true), -1, -1), true).double().mean(1))
            if idx_r is not None:
                pred_r = cand_px.cpu()[idx_r.cpu()[bi, pi]]
                rec["hit_regions"].append(box_iou_pairs(pred_r, true) >= 0.5)
            sizes = {}
            for b_, p_ in zip(bi.tolist(), pi.tolist()):
                if b_ not in sizes:
                    sizes[b_] = _size_bucket(ds, int(batch["index"][b_]), batch["boxes"][b_], model.config.image_size)
                rec["size"].append(sizes[b_][p_] if p_ < len(sizes[b_]) else "unknown")
            for k, (b_, p_) in enumerate(zip(bi.tolist(), pi.tolist())):
                if len(examples) >= keep_examples:
                    break
                if any(e["index"] == int(batch["index"][b_]) for e in examples):
                    continue  # one phrase per image in the figure
                cs, ce = batch["phrase_char_spans"][b_][p_]
                examples.append({"index": int(batch["index"][b_]), "image": items[b_]["image"].numpy(),
                                 "caption": batch["captions"][b_], "phrase": batch["captions"][b_][cs:ce],
                                 "true": true[k].tolist(), "pred": pred[k].tolist(), "iou": float(iou[k])})
        bar.update(len(items))
    bar.close()
    cat = {k: (torch.cat(v) if v and isinstance(v[0], torch.Tensor) else v) for k, v in rec.items()}
    L = max(w.shape[1] for w in glob["words"])
    pad = lambda t, fill: torch.nn.functional.pad(t, (0, 0, 0, L - t.shape[1]) if t.dim() == 3 else (0, L - t.shape[1]), value=fill)  # noqa: E731
    enc = {"img": torch.cat(glob["img"]), "txt": torch.cat(glob["txt"]), "patches": torch.cat(glob["patches"]),
           "words": torch.cat([pad(w, 0.0) for w in glob["words"]]),
           "wmask": torch.cat([pad(m, False) for m in glob["wmask"]])}
    return cat, enc, examples


def _summarise_grounding(rec: dict) -> dict:
    n = len(rec["hit"]) if isinstance(rec["hit"], torch.Tensor) else 0
    if n == 0:
        return {"acc50": None, "pointing": None, "oracle_acc50": None, "chance_acc50": None,
                "chance_pointing": None, "mean_iou": None, "phrases": 0, "by_size": {}}
    mean = lambda t: float(t.double().mean())  # noqa: E731
    out = {"acc50": mean(rec["hit"]), "pointing": mean(rec["point"]), "oracle_acc50": mean(rec["oracle"]),
           "chance_acc50": mean(rec["chance"]), "chance_pointing": mean(rec["chance_point"]),
           "mean_iou": mean(rec["iou"]), "phrases": n, "by_size": {}}
    if isinstance(rec["hit_regions"], torch.Tensor) and len(rec["hit_regions"]):
        out["regions_acc50"] = mean(rec["hit_regions"])
    if isinstance(rec.get("in_out"), torch.Tensor):
        d = rec["in_out"][~torch.isnan(rec["in_out"])]
        counts = torch.bincount(rec["best_patch"])
        pc = rec["pair_corr"] if isinstance(rec.get("pair_corr"), torch.Tensor) else torch.zeros(0)
        out["map_diagnostics"] = {
            "inside_above_outside": mean(d > 0) if len(d) else None,   # share of phrases
            "inside_minus_outside": mean(d) if len(d) else None,       # mean similarity gap
            "top_patch_share": float(counts.max()) / n,                # share of phrases won by one patch index
            "phrase_map_corr": mean(pc) if len(pc) else None,          # same image, different phrases
            # how broad the maps are under the fixed rule: median area of the chosen box / the true box
            "box_area_ratio": float(rec["area_ratio"].double().median()) if len(rec["area_ratio"]) else None,
            # mean cosine of two patch tokens of one image (near 1: the patches share one component)
            "patch_pair_cos": mean(rec["patch_cos"]) if isinstance(rec.get("patch_cos"), torch.Tensor) else None,
        }
    if isinstance(rec.get("point_wc"), torch.Tensor):
        out["pointing_word_centred"] = mean(rec["point_wc"])
    sizes = np.array(rec["size"])
    for s in sorted(set(rec["size"])):
        m = torch.from_numpy(sizes == s)
        row = {"acc50": mean(rec["hit"][m]), "pointing": mean(rec["point"][m]),
               "oracle_acc50": mean(rec["oracle"][m]), "chance_acc50": mean(rec["chance"][m]),
               "phrases": int(m.sum())}
        if "regions_acc50" in out:
            row["regions_acc50"] = mean(rec["hit_regions"][m])
        out["by_size"][s] = row
    return out


@torch.no_grad()
def _class_features(model, phrases: Sequence[str], templates: Sequence[str] = PROMPT_TEMPLATES) -> torch.Tensor:
    """Normalised global text embeddings of each class, averaged over prompt templates -> ``[C, D]``."""
    embs = []
    for t in templates:
        e = model.encode_captions([t.format(ph) for ph in phrases]).float()
        embs.append(e)
    return torch.nn.functional.normalize(torch.stack(embs).mean(0), dim=-1)


@torch.no_grad()
def _class_phrase_features(model, phrases: Sequence[str], templates: Sequence[str] = PROMPT_TEMPLATES) -> torch.Tensor:
    """Phrase features of each class phrase ``[C, D]``: the grounding rule's ``p`` for a class.

    Each class phrase is encoded in context, inside every template and beside each partner phrase of
    :data:`loupe.model.LONE_PHRASE_PARTNERS` (:meth:`LoupeModel.encode_lone_phrases`), and averaged:
    a phrase that is its whole caption centres to noise in word-centred models."""
    return model.encode_lone_phrases(list(phrases), templates=templates)


def _article(phrase: str) -> str:
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


@torch.no_grad()
def _classification(model, ds, n: int, opts: EvalOptions) -> dict:
    from .data import Collator
    dev = model.logit_scale.device
    classes = list(getattr(ds, "class_names", ()))
    colors = list(getattr(ds, "color_names", ()))
    if not classes:
        return {}
    shape_t = _class_features(model, [_article(c) for c in classes])
    both_names = [f"{col} {c}" for col in colors for c in classes]
    both_t = _class_features(model, [_article(x) for x in both_names]) if colors else None
    collate = Collator(model.tokenizer, max_length=min(32, model.config.context_length))
    imgs, shape_y, color_y = [], [], []
    bar = _Bar(n, opts.progress, "classify (single)")
    for items, batch in _batches(ds, n, collate, opts.batch_size):
        imgs.append(model.encode_image(batch["images"].to(dev)).float().cpu())
        shape_y.append(batch["shape_ids"][:, 0])
        color_y.append(batch["color_ids"][:, 0])
        bar.update(len(items))
    bar.close()
    img = torch.cat(imgs)
    sy, cy = torch.cat(shape_y), torch.cat(color_y)
    r = recall_at_k(img @ shape_t.cpu().T, sy, (1, 5))
    out = {"top1": r[1], "top5": r[5], "classes": len(classes), "images": int(img.shape[0])}
    if both_t is not None and bool((cy >= 0).all()):
        r2 = recall_at_k(img @ both_t.cpu().T, cy * len(classes) + sy, (1, 5))
        out.update({"color_shape_top1": r2[1], "color_shape_top5": r2[5], "color_shape_classes": len(both_names)})
    return out


@torch.no_grad()
def _detection(model, ds, n: int, opts: EvalOptions) -> dict:
    from . import regions as R
    from .data import Collator
    dev = model.logit_scale.device
    classes = list(getattr(ds, "class_names", ()))
    if not classes:
        return {}
    cf = _class_phrase_features(model, [_article(c) for c in classes])  # [C, D]
    ct = _class_features(model, [_article(c) for c in classes])  # [C, D] global class embeddings
    scale = float(model.scale("cmc"))
    C, g, p = len(classes), model.grid_size, model.config.patch_size
    cand_px = model.candidate_boxes.float() * p
    collate = Collator(model.tokenizer, max_length=min(32, model.config.context_length))
    gts, dets, dets_box = [], [], []
    bar = _Bar(n, opts.progress, "detect (test)")
    for items, batch in _batches(ds, n, collate, opts.batch_size):
        img_emb, patches = model.encode_image_tokens(batch["images"].to(dev))
        B = patches.shape[0]
        s = R.grounding_scores(cf.to(dev)[None].expand(B, C, -1), patches.float(), g, g)  # [B, C, K]
        flat = s.reshape(B * C, -1)
        idx, ok = R.nms_topk(flat, model.nms_suppress, opts.max_dets)
        sc = flat.gather(1, idx).reshape(B, C, -1).cpu()
        idx, ok = idx.reshape(B, C, -1).cpu(), ok.reshape(B, C, -1).cpu()
        presence = (scale * img_emb.float() @ ct.to(dev).T).softmax(-1).cpu()  # [B, C]
        conf = detection_confidence(sc, presence)
        for b in range(B):
            m = batch["box_mask"][b]
            gts.append({"boxes": batch["boxes"][b][m], "labels": batch["shape_ids"][b][m]})
            lab = torch.arange(C)[:, None].expand_as(idx[b])
            boxes, labels = cand_px.cpu()[idx[b][ok[b]]], lab[ok[b]]
            dets.append({"boxes": boxes, "scores": conf[b][ok[b]], "labels": labels})
            dets_box.append({"boxes": boxes, "scores": sc[b][ok[b]], "labels": labels})
        bar.update(len(items))
    bar.close()
    res = coco_map(gts, dets, C)
    res_box = coco_map(gts, dets_box, C)
    return {"map50": res["map50"], "map": res["map"], "map75": res["map75"],
            "per_class_ap50": {c: (None if math.isnan(v) else float(v)) for c, v in zip(classes, res["per_class_ap50"])},
            "per_class_ap": {c: (None if math.isnan(v) else float(v)) for c, v in zip(classes, res["per_class_ap"])},
            # the boxes ranked across images by the rule's score alone (before 2026-11-28, fifth session)
            "box_score_only": {"map50": res_box["map50"], "map": res_box["map"]},
            "confidence": "P(class | image) from the global embeddings x box score / the image-class's best box score",
            "images": len(gts), "max_dets": opts.max_dets}


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


def _retrieval(enc: dict) -> dict:
    import loupe_kernels as K
    n = enc["img"].shape[0]
    tgt = torch.arange(n)
    sim = enc["img"] @ enc["txt"].T
    i2t, t2i = recall_at_k(sim, tgt), recall_at_k(sim.T.contiguous(), tgt)
    out = {f"i2t_r{k}": v for k, v in i2t.items()}
    out.update({f"t2i_r{k}": v for k, v in t2i.items()})
    # FILIP token-wise late interaction: mean over the query's tokens of the max over the other side
    words, wmask, patches = enc["words"].contiguous(), enc["wmask"].contiguous(), enc["patches"].contiguous()
    s_t2i = K.token_region_similarity(words, patches, wmask, None)           # [Nt, Ni]
    s_i2t = K.token_region_similarity(patches, words, None, wmask)           # [Ni, Nt]
    fi, ft = recall_at_k(s_i2t, tgt), recall_at_k(s_t2i, tgt)
    out["filip"] = {**{f"i2t_r{k}": v for k, v in fi.items()}, **{f"t2i_r{k}": v for k, v in ft.items()}}
    out["images"] = n
    return out


def evaluate_model(model, opts: EvalOptions | None = None, *, log_path: str | None = None,
                   figures_dir: str | None = None) -> dict:
    """Evaluate a loaded :class:`loupe.model.LoupeModel` (with ``model.tokenizer``) -> nested dict."""
    from . import data as ldata
    opts = opts or EvalOptions()
    if getattr(model, "tokenizer", None) is None:
        raise CheckpointError("evaluate_model: the model has no tokenizer (load it with loupe.load)")
    dtype = opts.dataset_type or "synthetic"
    if dtype not in ("synthetic", "fashion", "emoji"):
        raise ValueError(f"evaluation runs on the built-in grounded sets (synthetic, fashion, emoji), not {dtype!r}")
    seed = 0 if opts.seed is None else int(opts.seed)
    S = model.config.image_size
    t0 = time.perf_counter()
    model.eval()
    regions = bool(getattr(model, "needs_regions", False))
    test = ldata.build_dataset(dtype, "test", seed=seed, size=opts.num_test, image_size=S)
    rec, enc, examples = _encode_split(model, test, opts.num_test, opts, "encode (test)", regions=regions,
                                       keep_examples=opts.num_examples)
    result: dict[str, Any] = {"objective": model.config.objective,
                              "data": {"type": dtype, "seed": seed, "test": opts.num_test,
                                       "compositional": 0, "single": opts.num_single}}
    result["retrieval"] = _retrieval(enc)
    gt = _summarise_grounding(rec)
    grounding = {"acc50": gt["acc50"], "pointing": gt["pointing"], "oracle_acc50": gt["oracle_acc50"],
                 "chance_acc50": gt["chance_acc50"], "chance_pointing": gt["chance_pointing"],
                 "pointing_word_centred": gt.get("pointing_word_centred"),
                 "rule": RULE,
                 "test": gt}
    comp_ok = bool(getattr(test, "color_names", ()))
    if comp_ok and opts.num_compositional > 0:
        comp = ldata.build_dataset(dtype, "compositional", seed=seed, size=opts.num_compositional, image_size=S)
        crec, _, _ = _encode_split(model, comp, opts.num_compositional, opts, "encode (compositional)",
                                   regions=regions)
        gc = _summarise_grounding(crec)
        result["data"]["compositional"] = opts.num_compositional
    else:  # no colours, no held-out pairs: the compositional split does not exist
        gc = {"acc50": None, "pointing": None, "oracle_acc50": None, "chance_acc50": None}
    grounding.update({"acc50_compositional": gc["acc50"], "pointing_compositional": gc["pointing"],
                      "oracle_acc50_compositional": gc["oracle_acc50"],
                      "pointing_word_centred_compositional": gc.get("pointing_word_centred"),
                      "chance_acc50_compositional": gc["chance_acc50"], "compositional": gc})
    if regions:
        grounding["regions"] = {"acc50": gt.get("regions_acc50"), "acc50_compositional": gc.get("regions_acc50"),
                                "rule": f"the same rule over the top-{model.config.num_regions} objectness "
                                        f"regions after NMS"}
    result["grounding"] = grounding
    single = ldata.build_dataset(dtype, "single", seed=seed, size=opts.num_single, image_size=S)
    result["classification"] = _classification(model, single, opts.num_single, opts)
    result["detection"] = _detection(model, test, opts.num_test, opts)
    result["seconds"] = time.perf_counter() - t0
    if figures_dir and opts.figures:
        result["figures"] = write_figures(model, test, result, examples, figures_dir, log_path=log_path)
    return result


def evaluate_checkpoint(directory: str, out_json: str | None = None, **opts) -> dict:
    """Evaluate a training output directory; write ``out_json`` (+ ``.md`` and figures) when given.

    ``opts`` are :class:`EvalOptions` fields (``num_test``, ``figures``, ``progress``, ...). The
    dataset type and seed default to the training run's (``config.json``). Raises
    :class:`CheckpointError` for a missing or incompatible checkpoint.
    """
    eo = EvalOptions(**opts)
    device = eo.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, train_cfg = load_checkpoint(directory, device)
    if eo.dataset_type is None:
        eo.dataset_type = train_cfg.get("dataset_type", "synthetic")
    if eo.seed is None:
        eo.seed = int(train_cfg.get("seed", 0))
    d = directory if os.path.isdir(directory) else os.path.dirname(directory) or "."
    log_path = os.path.join(d, "log.jsonl")
    fig_dir = None
    if out_json is not None and eo.figures:
        fig_dir = os.path.splitext(out_json)[0] + "_figures"
    result = evaluate_model(model, eo, log_path=log_path if os.path.exists(log_path) else None, figures_dir=fig_dir)
    result["checkpoint"] = os.path.abspath(directory)
    try:
        result["step"] = int(torch.load(os.path.join(d, "model.pt"), map_location="cpu", weights_only=True).get("step", -1))
    except Exception:  # noqa: BLE001  (the step is informative only)
        result["step"] = None
    if out_json is not None:
        os.makedirs(os.path.dirname(os.path.abspath(out_json)), exist_ok=True)
        tmp = out_json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2)
        os.replace(tmp, out_json)
        with open(os.path.splitext(out_json)[0] + ".md", "w") as f:
            f.write(markdown_table(result) + "\n")
    return result


# ------------------------------------------------------------------------------------------------
# figures (matplotlib, Agg)
# ------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def _draw_box(ax, box, color, label=None) -> None:
    from matplotlib.patches import Rectangle
    x0, y0, x1, y1 = box
    ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=color, linewidth=1.8,
                           label=label))


def figure_grounding_examples(examples: list[dict], path: str) -> str:
    """Images with a phrase, its true box (green) and the predicted box (red)."""
    plt = _plt()
    n = max(1, len(examples))
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, e in zip(axes.flat, examples):
        ax.imshow(np.transpose(e["image"], (1, 2, 0)))
        _draw_box(ax, e["true"], "lime", "true")
        _draw_box(ax, e["pred"], "red", "predicted")
        ax.set_title(f"\"{e['phrase']}\"\nIoU {e['iou']:.2f}", fontsize=8)
    if examples:
        axes.flat[0].legend(loc="lower left", fontsize=6, framealpha=0.6)
    fig.suptitle("Phrase grounding (fixed rule: sum over the box of <p, x_i> - q70(p)): true green, predicted red",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@torch.no_grad()
def figure_interaction_maps(model, ds, path: str, num_captions: int = 3) -> str:
    """Patch-phrase cosine similarity maps of a few captions (what the token-level interaction sees)."""
    from .data import Collator
    from .regions import phrase_features
    plt = _plt()
    items = [ds[i] for i in range(min(num_captions, len(ds)))]
    batch = Collator(model.tokenizer, max_length=min(32, model.config.context_length))(items)
    dev = model.logit_scale.device
    _, patches = model.encode_image_tokens(batch["images"].to(dev))
    _, words, wmask = model.encode_text_tokens(batch["input_ids"].to(dev), batch["attention_mask"].to(dev))
    pf, pm = phrase_features(words, wmask & batch["word_mask"].to(dev), batch["phrase_spans"].to(dev),
                             batch["phrase_mask"].to(dev))
    g, S = model.grid_size, model.config.image_size
    P = max(1, int(pm.sum(1).max()))
    fig, axes = plt.subplots(len(items), P + 1, figsize=(2.6 * (P + 1), 2.8 * len(items)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for b, it in enumerate(items):
        axes[b, 0].imshow(np.transpose(it["image"].numpy(), (1, 2, 0)))
        axes[b, 0].set_title(batch["captions"][b][:48], fontsize=7)
        for j, p in enumerate(pm[b].nonzero().flatten().tolist()):
            sim = (patches[b].float() @ pf[b, p].float()).reshape(g, g).cpu().numpy()
            ax = axes[b, j + 1]
            ax.imshow(np.transpose(it["image"].numpy(), (1, 2, 0)), alpha=0.45)
            im = ax.imshow(sim, cmap="magma", alpha=0.65, extent=(-0.5, S - 0.5, S - 0.5, -0.5), vmin=-1, vmax=1)
            cs, ce = batch["phrase_char_spans"][b][p]
            ax.set_title(f"\"{batch['captions'][b][cs:ce]}\"", fontsize=7)
            if p < len(it["boxes"]) and bool(torch.isfinite(it["boxes"][p]).all()):
                _draw_box(ax, it["boxes"][p].tolist(), "lime")
    fig.colorbar(im, ax=axes[:, 1:].ravel().tolist(), shrink=0.6, label="cosine(phrase feature, patch token)") \
        if P >= 1 and len(items) and "im" in locals() else None
    fig.suptitle("Patch-phrase similarity maps (cosine of the phrase feature with each patch token; "
                 "not Shapley interactions); true box green", fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def figure_detection_per_class(detection: dict, path: str) -> str:
    """Bar chart of per-class AP@0.5 and AP@[.5:.95]."""
    plt = _plt()
    names = list((detection.get("per_class_ap50") or {}).keys())
    a50 = [detection["per_class_ap50"][k] or 0.0 for k in names]
    a = [(detection.get("per_class_ap") or {}).get(k) or 0.0 for k in names]
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * max(1, len(names)), 3.2))
    x = np.arange(len(names))
    ax.bar(x - 0.2, a50, 0.4, label="AP@0.5")
    ax.bar(x + 0.2, a, 0.4, label="AP@[.5:.95]")
    ax.set_xticks(x, names, rotation=30, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("AP")
    ax.set_title(f"Zero-shot detection with class prompts: mAP@0.5 {detection.get('map50', float('nan')):.3f}, "
                 f"mAP {detection.get('map', float('nan')):.3f}", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def figure_training_curves(log_path: str, path: str) -> str | None:
    """Loss terms and learning rate against the step, from a training run's ``log.jsonl``."""
    recs = []
    with open(log_path) as f:
        for line in f:
            try:
                recs.append(json.loads(line))
            except ValueError:
                continue
    if not recs:
        return None
    plt = _plt()
    steps = [r.get("step") for r in recs]
    keys = sorted({k for r in recs for k, v in r.items() if k.startswith("loss") and isinstance(v, (int, float))})
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.4))
    for k in keys:
        a1.plot(steps, [r.get(k, float("nan")) if r.get(k) is not None else float("nan") for r in recs],
                label=k, linewidth=1.0 if k != "loss" else 1.8)
    a1.set_xlabel("step")
    a1.set_ylabel("loss")
    a1.legend(fontsize=6)
    a1.set_title("training losses (log.jsonl)", fontsize=9)
    a2.plot(steps, [r.get("lr", float("nan")) for r in recs], label="lr")
    a2.set_xlabel("step")
    a2.set_ylabel("learning rate (blue)")
    if any("logit_scale" in r for r in recs):
        ax3 = a2.twinx()
        ax3.plot(steps, [r.get("logit_scale", float("nan")) for r in recs], color="tab:orange", label="logit scale")
        ax3.set_ylabel("logit scale (orange)")
    a2.set_title("learning rate and logit scale", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_figures(model, test_ds, result: dict, examples: list[dict], directory: str,
                  log_path: str | None = None) -> dict[str, str]:
    """Write the PNG figures into ``directory``; returns name -> path."""
    os.makedirs(directory, exist_ok=True)
    out = {"grounding_examples": figure_grounding_examples(examples, os.path.join(directory, "grounding_examples.png")),
           "interaction_maps": figure_interaction_maps(model, test_ds, os.path.join(directory, "interaction_maps.png"))}
    if result.get("detection"):
        out["detection_per_class"] = figure_detection_per_class(result["detection"],
                                                                os.path.join(directory, "detection_per_class.png"))
    if log_path and os.path.exists(log_path):
        p = figure_training_curves(log_path, os.path.join(directory, "training_curves.png"))
        if p:
            out["training_curves"] = p
    return out


# ------------------------------------------------------------------------------------------------
# reporting
# ------------------------------------------------------------------------------------------------
def _fmt(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def markdown_table(result: dict) -> str:
    """A Markdown report of one evaluation (percentages)."""
    r, c, g, d = (result.get(k, {}) or {} for k in ("retrieval", "classification", "grounding", "detection"))
    f = r.get("filip", {})
    lines = [f"## loupe evaluation: objective `{result.get('objective')}`, step {result.get('step')}", "",
             f"Data: {result.get('data', {})}. All numbers in %.", "",
             "| retrieval | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 |",
             "|---|---|---|---|---|---|---|",
             "| global embeddings | " + " | ".join(_fmt(r.get(k)) for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1",
                                                                           "t2i_r5", "t2i_r10")) + " |",
             "| FILIP token-wise | " + " | ".join(_fmt(f.get(k)) for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1",
                                                                           "t2i_r5", "t2i_r10")) + " |",
             "", "| classification (single objects) | top-1 | top-5 |", "|---|---|---|",
             f"| shape | {_fmt(c.get('top1'))} | {_fmt(c.get('top5'))} |",
             f"| colour + shape | {_fmt(c.get('color_shape_top1'))} | {_fmt(c.get('color_shape_top5'))} |",
             "", "| grounding | Acc@0.5 | pointing | pointing, word-centred | oracle Acc@0.5 | chance Acc@0.5 "
                 "| chance pointing |",
             "|---|---|---|---|---|---|---|"]
    for split in ("test", "compositional"):
        s = g.get(split, {}) or {}
        lines.append(f"| {split} | {_fmt(s.get('acc50'))} | {_fmt(s.get('pointing'))} "
                     f"| {_fmt(s.get('pointing_word_centred'))} | {_fmt(s.get('oracle_acc50'))} "
                     f"| {_fmt(s.get('chance_acc50'))} | {_fmt(s.get('chance_pointing'))} |")
        for size, row in sorted((s.get("by_size") or {}).items()):
            lines.append(f"| {split}, {size} objects ({row.get('phrases')}) | {_fmt(row.get('acc50'))} | "
                         f"{_fmt(row.get('pointing'))} | | {_fmt(row.get('oracle_acc50'))} | "
                         f"{_fmt(row.get('chance_acc50'))} | |")
    if g.get("regions"):
        lines.append(f"| objectness regions (test / compositional) | {_fmt(g['regions'].get('acc50'))} / "
                     f"{_fmt(g['regions'].get('acc50_compositional'))} | | | | | |")
    diag = (g.get("test") or {}).get("map_diagnostics")
    if diag:
        lines += ["", "| phrase-patch maps (test) | inside > outside | top-patch share | phrase-map correlation "
                  "| patch-pair cosine | chosen / true box area (median) |",
                  "|---|---|---|---|---|---|",
                  f"| | {_fmt(diag.get('inside_above_outside'))} | {_fmt(diag.get('top_patch_share'))} | "
                  f"{_fmt(diag.get('phrase_map_corr'))} | {_fmt(diag.get('patch_pair_cos'))} | "
                  f"{_fmt(diag.get('box_area_ratio'))} |"]
    lines += ["", f"Scoring rule: {g.get('rule', '')}.", "",
              "| detection | mAP@0.5 | mAP@[.5:.95] | " + " | ".join(f"AP50 {k}" for k in (d.get("per_class_ap50") or {})) + " |",
              "|---|---|---|" + "---|" * len(d.get("per_class_ap50") or {}),
              f"| class prompts | {_fmt(d.get('map50'))} | {_fmt(d.get('map'))} | "
              + " | ".join(_fmt(v) for v in (d.get("per_class_ap50") or {}).values()) + " |"]
    if d.get("box_score_only"):
        lines.append(f"| ranked by box score alone | {_fmt(d['box_score_only'].get('map50'))} | "
                     f"{_fmt(d['box_score_only'].get('map'))} |" + " |" * len(d.get("per_class_ap50") or {}))
    return "\n".join(lines)


REQUIRED_PATHS = ("retrieval.i2t_r1", "retrieval.t2i_r1", "classification.top1", "grounding.acc50",
                  "grounding.acc50_compositional", "grounding.oracle_acc50", "grounding.chance_acc50",
                  "grounding.pointing", "grounding.pointing_compositional", "detection.map50", "detection.map")


def get_path(d: dict, dotted: str):
    """``d['a']['b']`` for ``'a.b'`` (KeyError naming the path when absent)."""
    cur = d
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise KeyError(dotted)
        cur = cur[part]
    return cur


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loupe.evaluate", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="training output directory (holds model.pt, tokenizer.json)")
    ap.add_argument("--out", default=None, help="JSON file to write (also FILE.md and FILE_figures/); "
                                                "default: CHECKPOINT/eval.json")
    ap.add_argument("--num-test", type=int, default=500, help="test-split images")
    ap.add_argument("--num-compositional", type=int, default=500, help="compositional-split images (0: skip)")
    ap.add_argument("--num-single", type=int, default=500, help="single-object images for classification")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--max-dets", type=int, default=10, help="detections per image and class after NMS")
    ap.add_argument("--dataset-type", default=None, choices=("synthetic", "fashion", "emoji"),
                    help="default: the training run's")
    ap.add_argument("--seed", type=int, default=None, help="dataset seed (default: the training run's)")
    ap.add_argument("--no-figures", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--device", default=None)
    a = ap.parse_args(argv)
    for name in ("num_test", "num_single", "batch_size", "max_dets"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.num_compositional < 0:
        ap.error("--num-compositional must be >= 0")
    out = a.out or os.path.join(a.checkpoint, "eval.json")
    try:
        res = evaluate_checkpoint(a.checkpoint, out, dataset_type=a.dataset_type, seed=a.seed, num_test=a.num_test,
                                  num_compositional=a.num_compositional, num_single=a.num_single,
                                  batch_size=a.batch_size, max_dets=a.max_dets, figures=not a.no_figures,
                                  progress=not a.no_progress, device=a.device)
    except CheckpointError as e:
        print(f"loupe.evaluate: error: {e}", file=sys.stderr)
        return 2
    print(markdown_table(res))
    print(f"\nwrote {out} ({res['seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
