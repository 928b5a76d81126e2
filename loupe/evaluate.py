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
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

import loupe_kernels as K

from . import data as ldata
from . import regions as R
from .checkpoint import CheckpointError, RunLock, RunPaths, load_checkpoint, saved_step
from .data import Collator
from .metrics import (box_iou_pairs, chance_acc, coco_map, detection_confidence, discrimination, grounding_predictions,
                      map_diagnostics, matching_objects, object_hits, oracle_hits, patch_centres, patch_pair_cos,
                      pointing_hits, points_in_any, points_inside, recall_at_k, shared_attributes)
from .report import markdown_table, write_figures, write_report
from .transformer import center_words

__all__ = ["evaluate_checkpoint", "evaluate_model", "EvalOptions", "PROMPT_TEMPLATES", "RULE", "class_features",
           "class_phrase_features", "with_article", "main"]

#: prompt templates for class prompts; "{}" is the class phrase ("a circle", "a red circle"). Built
#: from the caption templates of the built-in sets, so every word is in the tokenizer's vocabulary.
RULE = ("sum over the box's patches of <p, x_i> - t_p, t_p = the phrase's 70th-percentile patch similarity "
        "+ 1e-4 of its range; best of all whole-patch boxes")
PROMPT_TEMPLATES: tuple[str, ...] = ("{}", "there is {}", "a picture of {}", "an image with {}",
                                     "this shows {}", "we can see {}", "{} in the scene")


# ------------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------------
@dataclass
class EvalOptions:
    """What :func:`evaluate_model` measures and on how much data."""

    dataset_type: str | None = None   # None: the training run's (config.json), else "synthetic"
    seed: int | None = None           # None: the training run's seed (fixes the held-out pairs)
    # the seed of the evaluation scenes (None: ``seed``): a seed no development run read gives fresh
    # scenes while the held-out pairs stay the training run's
    eval_seed: int | None = None
    num_test: int = 500               # test-split images (retrieval, grounding, detection)
    num_compositional: int = 500
    num_hard: int = 500               # "hard" scenes (and as many "hard_compositional"; 0: skip)
    num_relation: int = 500           # "relation" scenes (and as many "relation_compositional"; 0: skip)
    # measure on the validation streams (val, val_hard, val_relation; no compositional splits) for
    # choosing defaults (docs/PROTOCOL.md); the JSON keeps the test split names, ``data.validation`` says which
    validation: bool = False
    num_single: int = 500             # single-object images (classification)
    batch_size: int = 100
    max_dets: int = 10                # detections kept per image and class after NMS
    figures: bool = True
    num_examples: int = 8             # grounding examples in the figure
    progress: bool = True
    device: str | None = None
    # word tokens centred on their caption (LoupeConfig.text_center_words) at evaluation: None = as
    # trained; True/False = post hoc (e.g. FILIP's best variant: trained without, evaluated with)
    center_words: bool | None = None


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
    dev = model.logit_scale.device
    centred_model = bool(getattr(model.config, "text_center_words", False))
    g, p = model.grid_size, model.config.patch_size
    cand_px = model.candidate_boxes.double() * p
    collate = Collator(model.tokenizer, max_length=min(32, model.config.context_length))
    rec: dict[str, list] = {k: [] for k in ("hit", "point", "oracle", "chance", "chance_point", "size", "iou",
                                            "hit_regions", "score", "in_out", "best_patch", "pair_corr",
                                            "point_wc", "area_ratio", "patch_cos", "any_hit", "point_any", "k",
                                            "n_attr", "n_shape", "shared", "tf_cap_own", "tf_cap_any",
                                            "tf_obj_own", "tf_obj_any")}
    colored = bool(getattr(ds, "color_names", ()))
    centres = patch_centres(g, p)
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
        pf, pmask = R.phrase_features(words, wmask, batch["phrase_spans"].to(dev), batch["phrase_mask"].to(dev))
        # the same phrases from word tokens centred on their caption (loupe.model.center_words), post hoc
        # for models trained without it: how much of a map is a component every word of the caption shares
        pf_wc = pf if centred_model else R.phrase_features(center_words(words, wmask), wmask, batch["phrase_spans"].to(dev),
                                                         batch["phrase_mask"].to(dev))[0]
        valid = (pmask.cpu() & batch["box_mask"])
        idx, score = grounding_predictions(pf, patches, g)  # every box, in model.candidate_boxes order
        idx_r = None
        # text-free boxes: the best box of the caption's pooled embedding (the same for every phrase
        # of the caption), and for models with a region head the top objectness box
        idx_cap, _ = grounding_predictions(txt_emb[:, None, :], patches, g)
        idx_obj = None
        if regions:
            reg = model.regions(patches)
            allowed = torch.zeros(idx.shape[0], cand_px.shape[0], dtype=torch.bool, device=dev)
            allowed.scatter_(1, reg["region_index"], reg["region_mask"])
            idx_r, _ = grounding_predictions(pf, patches, g, allowed=allowed)
            idx_obj = reg["box_logits"].argmax(-1)
        rec["patch_cos"].append(patch_pair_cos(patches.float().cpu()))
        bi, pi = valid.nonzero(as_tuple=True)
        if bi.numel():
            true = batch["boxes"][bi, pi].double()
            pred = cand_px.cpu()[idx.cpu()[bi, pi]]
            iou = box_iou_pairs(pred, true)
            rec["area_ratio"].append(R.box_area(pred) / R.box_area(true).clamp(min=1e-12))
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
            rec["chance_point"].append(points_inside(patch_centres(g, p)[None].expand(len(true), -1, -1), true).double().mean(1))
            if idx_r is not None:
                pred_r = cand_px.cpu()[idx_r.cpu()[bi, pi]]
                rec["hit_regions"].append(box_iou_pairs(pred_r, true) >= 0.5)
            # finding vs naming: every object of the scene (named or not)
            objects = [items[b_].get("all_boxes", items[b_]["boxes"]).reshape(-1, 4) for b_ in bi.tolist()]
            rec["any_hit"].append(object_hits(pred, objects))
            top = torch.einsum("nd,nkd->nk", pf.cpu()[bi, pi].float(), patches.cpu()[bi].float()).argmax(-1)
            rec["point_any"].append(points_in_any(centres[top], objects))
            rec["k"].append(torch.tensor([len(o) for o in objects], dtype=torch.long))
            pred_cap = cand_px.cpu()[idx_cap.cpu()[bi, 0]]
            rec["tf_cap_own"].append(box_iou_pairs(pred_cap, true) >= 0.5)
            rec["tf_cap_any"].append(object_hits(pred_cap, objects))
            if idx_obj is not None:
                pred_obj = cand_px.cpu()[idx_obj.cpu()[bi]]
                rec["tf_obj_own"].append(box_iou_pairs(pred_obj, true) >= 0.5)
                rec["tf_obj_any"].append(object_hits(pred_obj, objects))
            own_a, all_a, own_s, all_s = [], [], [], []
            for b_, p_ in zip(bi.tolist(), pi.tolist()):
                it = items[b_]
                shapes = it.get("all_shape_ids", it.get("shape_ids", torch.zeros(0))).tolist()
                attrs = (it.get("all_color_ids", it.get("color_ids", torch.zeros(0))) if colored
                         else it.get("all_size_ids", torch.full((len(shapes),), -1))).tolist()
                if p_ < len(shapes) and p_ < len(attrs):
                    own_a.append(attrs[p_])
                    own_s.append(shapes[p_])
                    rec["shared"].append(shared_attributes(attrs[p_], shapes[p_], attrs, shapes, p_))
                else:  # no attributes known (csv, shards)
                    own_a.append(None)
                    own_s.append(None)
                    rec["shared"].append("unknown")
                all_a.append(attrs)
                all_s.append(shapes)
            rec["n_attr"].append(matching_objects(own_a, all_a))
            rec["n_shape"].append(matching_objects(own_s, all_s))
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
    out.update(_finding_vs_naming(rec))
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


def _finding_vs_naming(rec: dict) -> dict:
    """own / any / discrimination for Acc@0.5 and pointing, the text-free bar (mean 1/k), the
    attribute-only bars and the model's own text-free boxes, overall, by k and by which attributes
    other objects share (:func:`loupe.metrics.shared_attributes`)."""
    if not isinstance(rec.get("any_hit"), torch.Tensor) or not len(rec["any_hit"]):
        return {}
    mean = lambda t: float(t.double().mean()) if len(t) else None  # noqa: E731
    shared = np.array(rec["shared"])

    def block(m: torch.Tensor) -> dict:
        known = m & torch.from_numpy(shared != "unknown")
        row = {"phrases": int(m.sum()),
               "own_acc50": mean(rec["hit"][m]), "any_acc50": mean(rec["any_hit"][m]),
               "discrimination": discrimination(rec["hit"][m], rec["any_hit"][m]),
               "pointing_own": mean(rec["point"][m]), "pointing_any": mean(rec["point_any"][m]),
               "pointing_discrimination": discrimination(rec["point"][m], rec["point_any"][m]),
               "text_free": mean(1.0 / rec["k"][m].double()),
               "attribute_color": mean(1.0 / rec["n_attr"][known].double()),
               "attribute_shape": mean(1.0 / rec["n_shape"][known].double()),
               "text_free_caption": {"own_acc50": mean(rec["tf_cap_own"][m]),
                                     "any_acc50": mean(rec["tf_cap_any"][m])}}
        if isinstance(rec.get("tf_obj_own"), torch.Tensor) and len(rec["tf_obj_own"]):
            row["text_free_objectness"] = {"own_acc50": mean(rec["tf_obj_own"][m]),
                                           "any_acc50": mean(rec["tf_obj_any"][m])}
        return row

    every = torch.ones(len(rec["any_hit"]), dtype=torch.bool)
    out = {"finding": block(every)}
    out["finding"]["by_k"] = {str(k): block(rec["k"] == k) for k in sorted(set(rec["k"].tolist()))}
    out["finding"]["by_shared"] = {c: block(torch.from_numpy(shared == c)) for c in sorted(set(rec["shared"]))}
    return out


@torch.no_grad()
def class_features(model, phrases: Sequence[str], templates: Sequence[str] = PROMPT_TEMPLATES) -> torch.Tensor:
    """Normalised global text embeddings of each class, averaged over prompt templates -> ``[C, D]``."""
    embs = []
    for t in templates:
        e = model.encode_captions([t.format(ph) for ph in phrases]).float()
        embs.append(e)
    return torch.nn.functional.normalize(torch.stack(embs).mean(0), dim=-1)


@torch.no_grad()
def class_phrase_features(model, phrases: Sequence[str], templates: Sequence[str] = PROMPT_TEMPLATES) -> torch.Tensor:
    """Phrase features of each class phrase ``[C, D]``: the grounding rule's ``p`` for a class.

    Each class phrase is encoded in context, inside every template and beside each partner phrase of
    :data:`loupe.model.LONE_PHRASE_PARTNERS` (:meth:`LoupeModel.encode_lone_phrases`), and averaged:
    a phrase that is its whole caption centres to noise in word-centred models."""
    return model.encode_lone_phrases(list(phrases), templates=templates)


def with_article(phrase: str) -> str:
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


@torch.no_grad()
def _classification(model, ds, n: int, opts: EvalOptions) -> dict:
    dev = model.logit_scale.device
    classes = list(getattr(ds, "class_names", ()))
    colors = list(getattr(ds, "color_names", ()))
    if not classes or n == 0:  # nothing to classify (num_single 0): no numbers, not a crash
        return {}
    shape_t = class_features(model, [with_article(c) for c in classes])
    both_names = [f"{col} {c}" for col in colors for c in classes]
    both_t = class_features(model, [with_article(x) for x in both_names]) if colors else None
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
    dev = model.logit_scale.device
    classes = list(getattr(ds, "class_names", ()))
    if not classes:
        return {}
    cf = class_phrase_features(model, [with_article(c) for c in classes])  # [C, D]
    ct = class_features(model, [with_article(c) for c in classes])  # [C, D] global class embeddings
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


def _retrieval(enc: dict) -> dict:
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
    """Evaluate a loaded :class:`loupe.model.LoupeModel` (with ``model.tokenizer``) -> nested dict.
    ``opts.center_words`` overrides the model's word centring for the evaluation only."""
    opts = opts or EvalOptions()
    if opts.center_words is not None and not isinstance(opts.center_words, bool):
        raise ValueError(f"EvalOptions.center_words must be None or a bool, got {opts.center_words!r}")
    trained = bool(getattr(model.config, "text_center_words", False))
    if opts.center_words is not None:
        model.config.text_center_words = opts.center_words
    try:
        result = _evaluate_model(model, opts, log_path=log_path, figures_dir=figures_dir)
    finally:
        model.config.text_center_words = trained
    result["text_center_words"] = {"trained": trained, "evaluated": trained if opts.center_words is None
                                   else opts.center_words}
    return result


def _evaluate_model(model, opts: EvalOptions, *, log_path: str | None, figures_dir: str | None) -> dict:
    if getattr(model, "tokenizer", None) is None:
        raise CheckpointError("evaluate_model: the model has no tokenizer (load it with loupe.load)")
    dtype = opts.dataset_type or "synthetic"
    if dtype not in ("synthetic", "fashion", "emoji"):
        raise ValueError(f"evaluation runs on the built-in grounded sets (synthetic, fashion, emoji), not {dtype!r}")
    seed = 0 if opts.seed is None else int(opts.seed)
    sample_seed = seed if opts.eval_seed is None else int(opts.eval_seed)
    S = model.config.image_size
    val_name = {"test": "val", "hard": "val_hard", "relation": "val_relation"}

    def build(split: str, n: int):
        if opts.validation:
            split = val_name.get(split, split)
        return ldata.build_dataset(dtype, split, seed=seed, size=n, image_size=S, sample_seed=sample_seed)
    t0 = time.perf_counter()
    model.eval()
    regions = bool(getattr(model, "needs_regions", False))
    test = build("test", opts.num_test)
    rec, enc, examples = _encode_split(model, test, opts.num_test, opts, "encode (test)", regions=regions,
                                       keep_examples=opts.num_examples)
    result: dict[str, Any] = {"objective": model.config.objective,
                              "data": {"type": dtype, "seed": seed, "eval_seed": sample_seed,
                                       "validation": bool(opts.validation), "test": opts.num_test,
                                       "compositional": 0, "single": opts.num_single}}
    result["retrieval"] = _retrieval(enc)
    gt = _summarise_grounding(rec)
    grounding = {"acc50": gt["acc50"], "pointing": gt["pointing"], "oracle_acc50": gt["oracle_acc50"],
                 "chance_acc50": gt["chance_acc50"], "chance_pointing": gt["chance_pointing"],
                 "pointing_word_centred": gt.get("pointing_word_centred"),
                 "rule": RULE,
                 "test": gt}
    comp_ok = bool(getattr(test, "color_names", ())) and not opts.validation
    if comp_ok and opts.num_compositional > 0:
        comp = build("compositional", opts.num_compositional)
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
    # scenes that need the phrase: controlled distractors [ours]
    for family, n in (("hard", opts.num_hard), ("relation", opts.num_relation)):
        for split in (family, f"{family}_compositional") if comp_ok else (family,):
            if n <= 0:
                continue
            crec, _, _ = _encode_split(model, build(split, n), n, opts, f"encode ({split})", regions=regions)
            grounding[split] = _summarise_grounding(crec)
            result["data"][split] = n
    result["grounding"] = grounding
    single = build("single", opts.num_single)
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
    d = directory if os.path.isdir(directory) else os.path.dirname(directory) or "."
    training = RunLock.holder(d)
    if training is not None:
        print(f"loupe.evaluate: {d} is still being trained ({RunLock.describe(training)}): evaluating the "
              f"last model.pt it saved (step {saved_step(d)}); the next save replaces it", file=sys.stderr)
    model, train_cfg = load_checkpoint(directory, device)
    if eo.dataset_type is None:
        eo.dataset_type = train_cfg.get("dataset_type", "synthetic")
    if eo.seed is None:
        eo.seed = int(train_cfg.get("seed", 0))
    log_path = RunPaths(d).log
    fig_dir = None
    if out_json is not None and eo.figures:
        fig_dir = os.path.splitext(out_json)[0] + "_figures"
    result = evaluate_model(model, eo, log_path=log_path if os.path.exists(log_path) else None, figures_dir=fig_dir)
    result["checkpoint"] = os.path.abspath(directory)
    result["step"] = saved_step(d)
    result["still_training"] = training is not None
    if out_json is not None:
        write_report(result, out_json, markdown_table(result))
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loupe.evaluate", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="training output directory (holds model.pt, tokenizer.json)")
    ap.add_argument("--out", default=None, help="JSON file to write (also FILE.md and FILE_figures/); "
                                                "default: CHECKPOINT/eval.json")
    ap.add_argument("--num-test", type=int, default=500, help="test-split images")
    ap.add_argument("--num-compositional", type=int, default=500, help="compositional-split images (0: skip)")
    ap.add_argument("--num-single", type=int, default=500, help="single-object images for classification")
    ap.add_argument("--num-hard", type=int, default=500,
                    help="scenes with colour and shape distractors (and as many compositional ones; 0: skip)")
    ap.add_argument("--num-relation", type=int, default=500,
                    help="scenes with an identical twin told apart by a relation (and compositional; 0: skip)")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--max-dets", type=int, default=10, help="detections per image and class after NMS")
    ap.add_argument("--dataset-type", default=None, choices=("synthetic", "fashion", "emoji"),
                    help="default: the training run's")
    ap.add_argument("--seed", type=int, default=None,
                    help="dataset seed: the held-out colour-noun pairs (default: the training run's)")
    ap.add_argument("--eval-seed", type=int, default=None,
                    help="seed of the evaluation scenes (default: --seed); use one no development run read")
    ap.add_argument("--validation", action="store_true",
                    help="measure on the validation streams (for choosing defaults; docs/PROTOCOL.md)")
    ap.add_argument("--center-words", choices=("trained", "on", "off"), default="trained",
                    help="word tokens centred on their caption: as trained, or on/off post hoc")
    ap.add_argument("--no-figures", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--device", default=None)
    a = ap.parse_args(argv)
    for name in ("num_test", "num_single", "batch_size", "max_dets"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("num_compositional", "num_hard", "num_relation"):
        if getattr(a, name) < 0:
            ap.error(f"--{name.replace('_', '-')} must be >= 0")
    out = a.out or RunPaths(a.checkpoint).eval
    try:
        res = evaluate_checkpoint(a.checkpoint, out, dataset_type=a.dataset_type, seed=a.seed, num_test=a.num_test,
                                  num_compositional=a.num_compositional, num_single=a.num_single,
                                  num_hard=a.num_hard, num_relation=a.num_relation, eval_seed=a.eval_seed,
                                  validation=a.validation,
                                  batch_size=a.batch_size, max_dets=a.max_dets, figures=not a.no_figures,
                                  progress=not a.no_progress, device=a.device,
                                  center_words={"trained": None, "on": True, "off": False}[a.center_words])
    except CheckpointError as e:
        print(f"loupe.evaluate: error: {e}", file=sys.stderr)
        return 2
    print(markdown_table(res))
    print(f"\nwrote {out} ({res['seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
