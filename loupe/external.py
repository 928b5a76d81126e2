"""Zero-shot evaluation on public benchmarks a user has on disk (issue 22).

    python -m loupe.external coco      --checkpoint runs/loupe --coco-annotations instances_val2017.json --images val2017/
    python -m loupe.external grounding --checkpoint runs/loupe --annotations refcoco_val.jsonl --images train2014/
    python -m loupe.external classify  --checkpoint runs/loupe --folder imagenet/val/
    python -m loupe.external retrieval --checkpoint runs/loupe --csv captions.tsv   (or --shards 'shards/{000..009}.tar')

Formats (docs/FORMATS.md has converter notes for RefCOCO-style and Flickr30k-Entities-style sets):

- **coco**: a COCO-format annotation file (``images``, ``annotations`` with ``bbox = [x, y, w, h]``,
  ``categories`` with ``name``) and the image folder. Class prompts come from the category names
  and are encoded the way the built-in detection encodes them (``"a <name>"`` inside every prompt
  template, beside neutral partner phrases: :meth:`LoupeModel.encode_lone_phrases`). Every
  whole-patch box is scored for every class with the built-in rule
  (:func:`loupe.regions.grounding_scores`), NMS per class, confidence = P(class | image) x the box's
  score relative to the class's best box (:func:`loupe.metrics.detection_confidence`); the boxes
  are mapped from the model's square input back to the image's pixels and scored by
  **pycocotools** (``COCOeval``, ``maxDets`` [1, 10, 100]).
- **grounding**: JSON (a list) or JSONL of ``{"image": path, "caption": str, "phrases": [{"span":
  [start, end], "box": [x0, y0, x1, y1]}]}`` (character span into the caption, box xyxy in the
  image's pixels). Each phrase is the mean of its word tokens in its caption; a phrase that is its
  whole caption (RefCOCO) is encoded beside neutral partner phrases like ``loupe.ground`` does
  (``phrase_context="auto"``; ``"caption"`` never does, as the built-in evaluation). Acc@0.5 and
  pointing in the image's pixels, and finding vs naming: ``own`` (the phrase's own box), ``any``
  (any annotated box of the image, over every entry of that image), ``discrimination = own / any``
  and the text-free bar ``1/k`` (k = the image's distinct annotated boxes).
- **classify**: an ImageNet-style tree ``DIR/<class>/*.jpg|png``; prompts from the folder names
  (underscores -> spaces) as the built-in classification builds them; top-1 / top-5.
- **retrieval**: an open_clip-style CSV/TSV (:class:`loupe.data.CsvDataset`) or tar shards
  (:class:`loupe.data.ShardDataset`); R@1/5/10 image->text and text->image on the global
  embeddings. Rows naming the same image file are one image with several captions (COCO/Flickr:
  an image counts as found when any of its captions ranks in the top k).

Bad input: a missing annotation file, image folder or class folder, a file that is not valid JSON,
an empty class folder raise ``ValueError``/``FileNotFoundError`` naming the problem. Bad *entries*
(a malformed JSON line, an image not found or unreadable, a span outside its caption, a box outside
its image, an annotation of an unknown image or category) are skipped and counted: the output
holds ``skipped`` (a count), ``skipped_reasons`` (count per reason) and ``skipped_examples`` (the
first messages, each naming the entry's index or line); ``strict=True`` (``--strict``) raises at
the first one instead. When nothing valid remains a ``ValueError`` says so.

All metric values are in [0, 1].
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import math
import os
import sys
import time
import warnings
from typing import Any, Sequence

import torch

from . import data as ldata
from . import regions as R
from .checkpoint import CheckpointError, load_checkpoint, saved_step
from .data.pipeline import open_image
from .evaluate import with_article, class_features, class_phrase_features
from .ground import prepare_image
from .report import write_report
from .metrics import (box_iou_pairs, detection_confidence, discrimination, grounding_predictions, object_hits,
                      patch_centres, points_in_any, points_inside, recall_at_k)

__all__ = ["evaluate_coco", "evaluate_grounding", "evaluate_classification", "evaluate_retrieval",
           "read_coco", "read_grounding", "read_class_folders", "to_original", "ExternalDataError", "main",
           "IMAGE_EXTS", "BOX_TOLERANCE"]

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
#: pixels a box may reach past the image border (float rounding in converted sets); such boxes are clipped
BOX_TOLERANCE = 1.0
_EXAMPLES = 10


class ExternalDataError(ValueError):
    """A bad entry of a user's file (raised with ``strict=True``; skipped and counted otherwise)."""


class _Problems:
    """Skip-and-count of bad entries: counts per reason, the first messages, or raise when strict."""

    def __init__(self, source: str, strict: bool) -> None:
        self.source, self.strict = source, strict
        self.reasons: dict[str, int] = {}
        self.examples: list[str] = []

    def add(self, reason: str, message: str) -> None:
        if self.strict:
            raise ExternalDataError(f"{self.source}: {message}")
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        if len(self.examples) < _EXAMPLES:
            self.examples.append(message)

    @property
    def count(self) -> int:
        return sum(self.reasons.values())

    def report(self) -> dict:
        if self.count:
            warnings.warn(f"loupe.external: {self.source}: skipped {self.count} bad entries ("
                          + ", ".join(f"{n} {r}" for r, n in sorted(self.reasons.items())) + "); first: "
                          + self.examples[0], stacklevel=3)
        return {"skipped": self.count, "skipped_reasons": dict(sorted(self.reasons.items())),
                "skipped_examples": list(self.examples)}


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def _box_problem(box, size: tuple[int, int] | None, fmt: str = "xyxy") -> str | None:
    """Why ``box`` is not a valid box inside an image of ``size = (w, h)``, or None."""
    if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(_is_num(v) for v in box):
        want = "[x0, y0, x1, y1]" if fmt == "xyxy" else "[x, y, w, h]"
        return f"box {box!r} is not 4 finite numbers {want}"
    x0, y0, a, b = (float(v) for v in box)
    x1, y1 = (a, b) if fmt == "xyxy" else (x0 + a, y0 + b)
    if not (x0 < x1 and y0 < y1):
        return f"box {box!r} is empty or inverted"
    t = BOX_TOLERANCE
    if x0 < -t or y0 < -t or (size is not None and (x1 > size[0] + t or y1 > size[1] + t)):
        where = f"the image of {size[0]}x{size[1]} pixels" if size is not None else "the image"
        return f"box {box!r} is outside {where}"
    return None


def _clip_box(box: Sequence[float], size: tuple[int, int]) -> list[float]:
    x0, y0, x1, y1 = (float(v) for v in box)
    return [min(max(x0, 0.0), size[0]), min(max(y0, 0.0), size[1]), min(max(x1, 0.0), size[0]),
            min(max(y1, 0.0), size[1])]


def _image_size(path: str) -> tuple[int, int] | str:
    """``(w, h)`` of an image file from its header, or the reason it cannot be read."""
    from PIL import Image
    if not os.path.isfile(path):
        return "image not found"
    try:
        with Image.open(path) as im:
            return im.size
    except Exception as e:  # noqa: BLE001  (not an image, truncated header, ...)
        return f"unreadable image ({type(e).__name__}: {e})"


def _resolve(root: str, rel: str) -> str:
    return rel if os.path.isabs(rel) else os.path.normpath(os.path.join(root, rel))


def to_original(boxes: torch.Tensor, mapping: tuple[float, float, float, float],
                size: tuple[int, int] | None = None) -> torch.Tensor:
    """Boxes ``[N, 4]`` xyxy in the model's square input -> the original image's pixels.

    ``mapping = (sx, sy, ox, oy)`` from :func:`loupe.ground.prepare_image` (``x_model = x * sx - ox``);
    ``size = (w, h)`` clips the result to the image. The inverse of what
    :class:`loupe.data.Preprocess` does to boxes."""
    sx, sy, ox, oy = mapping
    b = boxes.double().clone()
    b[:, [0, 2]] = (b[:, [0, 2]] + ox) / sx
    b[:, [1, 3]] = (b[:, [1, 3]] + oy) / sy
    if size is not None:
        b[:, [0, 2]] = b[:, [0, 2]].clamp(0, size[0])
        b[:, [1, 3]] = b[:, [1, 3]].clamp(0, size[1])
    return b


def _to_model(boxes: torch.Tensor, mapping) -> torch.Tensor:
    sx, sy, ox, oy = mapping
    b = boxes.double().clone()
    b[:, [0, 2]] = b[:, [0, 2]] * sx - ox
    b[:, [1, 3]] = b[:, [1, 3]] * sy - oy
    return b


def _visible_share(boxes: torch.Tensor, mapping, S: int) -> torch.Tensor:
    """Share of each original-pixel box that lies inside the model's (cropped) input."""
    m = _to_model(boxes, mapping)
    c = m.clamp(0, S)
    return R.box_area(c) / R.box_area(m).clamp(min=1e-12)


def _load_images(model, paths: Sequence[str], crop: str, problems: _Problems | None = None,
                 labels: Sequence[str] | None = None):
    """Model inputs of image files: ``(x [n, 3, S, S], mappings, sizes, ok_indices)``; unreadable
    files are skipped and counted (``labels[i]`` names the entry in the message)."""
    xs, maps, sizes, ok = [], [], [], []
    for i, p in enumerate(paths):
        try:
            pil = open_image(p)
        except FileNotFoundError:
            if problems is None:
                raise
            problems.add("image not found", f"{labels[i] if labels else p}: image {p!r} not found")
            continue
        except Exception as e:  # noqa: BLE001  (truncated, not an image, too large)
            if problems is None:
                raise
            problems.add("unreadable image", f"{labels[i] if labels else p}: cannot read image {p!r}: "
                                             f"{type(e).__name__}: {e}")
            continue
        x, mp, pil = prepare_image(model, pil, crop)
        xs.append(x)
        maps.append(mp)
        sizes.append(pil.size)
        ok.append(i)
    x = torch.cat(xs) if xs else None
    return x, maps, sizes, ok


def _device(device: str | None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def _without_known_words(model, texts: Sequence[str]) -> list[str]:
    """The texts none of whose tokens the model's tokenizer knows (each maps to ``[UNK]``): their
    features are all the same, so their boxes and scores say nothing about them."""
    tok = model.tokenizer
    unk = getattr(tok, "unk_id", None)
    if unk is None:
        return []
    out = []
    for t in texts:
        ids, _ = tok.encode(t)
        if all(i == unk for i in ids):
            out.append(t)
    return out


def _warn_unknown(what: str, texts: list[str], total: int) -> None:
    if texts:
        warnings.warn(f"loupe.external: {len(texts)} of {total} {what} hold no word the model knows (e.g. "
                      f"{texts[:5]}); the model's tokenizer was fitted on its training captions", stacklevel=3)


def _bar(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, file=sys.stderr)
    except ImportError:
        return None


# ------------------------------------------------------------------------------------------------
# COCO detection
# ------------------------------------------------------------------------------------------------
def _read_json(path: str, what: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path!r} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None


def read_coco(annotations: str, images: str, *, strict: bool = False, limit: int | None = None) -> dict:
    """Read and check a COCO-format detection file against its image folder.

    Returns ``{"images": [{"id", "path", "width", "height"}], "categories": [{"id", "name"}] (sorted
    by id), "annotations": [...] (valid ones, ``area``/``iscrowd``/``id`` filled in), "problems":
    _Problems}``. Images whose file is missing or unreadable, and annotations that are malformed, of
    an unknown image or category, or outside their image, are skipped and counted."""
    if not os.path.isdir(images):
        raise FileNotFoundError(f"image folder {images!r} does not exist")
    d = _read_json(annotations, "COCO annotation file")
    if not isinstance(d, dict):
        raise ValueError(f"{annotations!r}: a COCO annotation file is a JSON object, got {type(d).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(d.get(key), list):
            raise ValueError(f"{annotations!r}: no {key!r} list (a COCO detection file has 'images', "
                             f"'annotations' and 'categories')")
    pr = _Problems(os.path.basename(annotations), strict)
    cats: dict[int, str] = {}
    for i, c in enumerate(d["categories"]):
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str) \
                or not c["name"].strip():
            raise ValueError(f"{annotations!r}: categories[{i}] needs an integer 'id' and a non-empty 'name', "
                             f"got {c!r}")
        if c["id"] in cats:
            raise ValueError(f"{annotations!r}: categories[{i}]: category id {c['id']} appears twice")
        cats[c["id"]] = c["name"].strip()
    if not cats:
        raise ValueError(f"{annotations!r}: no categories")
    imgs: dict[int, dict] = {}
    for i, im in enumerate(d["images"]):
        if not isinstance(im, dict) or not isinstance(im.get("id"), int) or not isinstance(im.get("file_name"), str):
            pr.add("malformed image entry", f"images[{i}]: needs an integer 'id' and a 'file_name', got {im!r}"[:300])
            continue
        if im["id"] in imgs:
            pr.add("malformed image entry", f"images[{i}]: image id {im['id']} appears twice")
            continue
        imgs[im["id"]] = {"id": im["id"], "path": _resolve(images, im["file_name"]), "file_name": im["file_name"],
                          "index": i}
    order = sorted(imgs)
    if limit is not None:
        order = order[:int(limit)]
    found: dict[int, dict] = {}
    for iid in order:
        im = imgs[iid]
        size = _image_size(im["path"])
        if isinstance(size, str):
            pr.add(size.split(" (")[0], f"images[{im['index']}] (id {iid}): {size}: {im['path']!r}")
            continue
        found[iid] = {"id": iid, "path": im["path"], "file_name": im["file_name"], "width": size[0], "height": size[1]}
    anns = []
    for i, a in enumerate(d["annotations"]):
        if not isinstance(a, dict):
            pr.add("malformed annotation", f"annotations[{i}]: not an object")
            continue
        iid, cid = a.get("image_id"), a.get("category_id")
        if iid not in imgs:
            pr.add("annotation of an unknown image", f"annotations[{i}]: image_id {iid!r} is not in 'images'")
            continue
        if cid not in cats:
            pr.add("annotation of an unknown category", f"annotations[{i}]: category_id {cid!r} is not in 'categories'")
            continue
        if iid not in found:  # image skipped (missing, unreadable, or past --limit): not evaluated
            continue
        im = found[iid]
        why = _box_problem(a.get("bbox"), (im["width"], im["height"]), fmt="xywh")
        if why:
            reason = "box outside image" if "outside" in why else "malformed box"
            pr.add(reason, f"annotations[{i}] (image {im['file_name']!r}): {why}")
            continue
        x, y, w, h = (float(v) for v in a["bbox"])
        x0, y0, x1, y1 = _clip_box([x, y, x + w, y + h], (im["width"], im["height"]))
        anns.append({"id": len(anns) + 1, "image_id": iid, "category_id": cid, "bbox": [x0, y0, x1 - x0, y1 - y0],
                     "area": float(a["area"]) if _is_num(a.get("area")) else (x1 - x0) * (y1 - y0),
                     "iscrowd": int(bool(a.get("iscrowd", 0)))})
    if not found:
        raise ValueError(f"{annotations!r}: none of its {len(imgs)} images could be read from {images!r} "
                         f"({pr.count} problems; first: {pr.examples[:1]})")
    return {"images": [found[i] for i in sorted(found)],
            "categories": [{"id": c, "name": cats[c]} for c in sorted(cats)], "annotations": anns, "problems": pr}


def _pycocotools_eval(images: list[dict], categories: list[dict], annotations: list[dict], results: list[dict]):
    """``COCOeval`` bbox stats of ``results`` (COCO result format) against the ground truth."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as e:  # a runtime dependency; say how to get it
        raise ImportError("loupe.external coco needs pycocotools: pip install 'pycocotools>=2.0'") from e
    names = ["map", "map50", "map75", "map_small", "map_medium", "map_large", "ar1", "ar10", "ar100",
             "ar_small", "ar_medium", "ar_large"]
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):
        gt = COCO()
        gt.dataset = {"images": [{"id": im["id"], "width": im["width"], "height": im["height"],
                                  "file_name": im["file_name"]} for im in images],
                      "categories": [dict(c) for c in categories], "annotations": [dict(a) for a in annotations]}
        gt.createIndex()
        if not results:  # pycocotools cannot load an empty result list: nothing found, AP 0
            return {n: (0.0 if n.startswith(("map", "ar")) else None) for n in names}, None, quiet.getvalue()
        dt = gt.loadRes([dict(r) for r in results])
        ev = COCOeval(gt, dt, "bbox")
        ev.params.imgIds = [im["id"] for im in images]
        ev.params.maxDets = [1, 10, 100]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = {n: (None if float(v) < 0 else float(v)) for n, v in zip(names, ev.stats)}
    return stats, ev, quiet.getvalue()


def _per_class_ap(ev, categories: list[dict]) -> dict[str, dict]:
    """AP and AP50 per category from a ``COCOeval`` (area all, maxDets 100); None without ground truth."""
    out = {}
    if ev is None:
        return {c["name"]: {"ap": 0.0, "ap50": 0.0} for c in categories}
    prec = ev.eval["precision"]  # [T, R, K, A, M]
    for k, c in enumerate(ev.params.catIds):
        p = prec[:, :, k, 0, -1]
        name = next(x["name"] for x in categories if x["id"] == c)
        ok = p[p > -1]
        p50 = prec[0, :, k, 0, -1]
        out[name] = {"ap": float(ok.mean()) if ok.size else None,
                     "ap50": float(p50[p50 > -1].mean()) if (p50 > -1).any() else None}
    return out


@torch.no_grad()
def evaluate_coco(model, annotations: str, images: str, *, max_dets_per_class: int = 10, max_dets: int = 100,
                  crop: str = "center", batch_size: int = 32, limit: int | None = None, strict: bool = False,
                  progress: bool = False, return_detections: bool = False) -> dict:
    """Zero-shot detection on a COCO-format set (see the module docstring) -> result dict.

    ``max_dets_per_class`` boxes per image and class after NMS (the built-in evaluation keeps 10),
    then the ``max_dets`` most confident per image (COCO's 100). With ``return_detections`` the
    result holds ``"detections"`` (COCO result format, original pixels) and ``"ground_truth"``
    (the valid annotations) for cross-checks."""
    t0 = time.perf_counter()
    ds = read_coco(annotations, images, strict=strict, limit=limit)
    pr: _Problems = ds["problems"]
    cats = ds["categories"]
    names = [c["name"] for c in cats]
    phrases = [with_article(n.replace("_", " ")) for n in names]
    dev = model.logit_scale.device
    cf = class_phrase_features(model, phrases).to(dev)  # [C, D]: the rule's p of each class
    ct = class_features(model, phrases).to(dev)         # [C, D]: global class embeddings (presence)
    scale = float(model.scale("cmc"))
    C, g, p = len(cats), model.grid_size, model.config.patch_size
    cand_px = model.candidate_boxes.float().cpu() * p
    S = model.config.image_size
    results: list[dict] = []
    evaluated: list[dict] = []
    bar = _bar(len(ds["images"]), progress, "detect (coco)")
    k = max(1, int(max_dets_per_class))
    for lo in range(0, len(ds["images"]), batch_size):
        chunk = ds["images"][lo:lo + batch_size]
        x, maps, sizes, ok = _load_images(model, [im["path"] for im in chunk], crop, pr,
                                          [f"image id {im['id']}" for im in chunk])
        if x is None:
            continue
        img_emb, patches = model.encode_image_tokens(x)
        B = patches.shape[0]
        s = R.grounding_scores(cf[None].expand(B, C, -1), patches.float(), g, g)  # [B, C, K]
        flat = s.reshape(B * C, -1)
        idx, valid = R.nms_topk(flat, model.nms_suppress, k)
        sc = flat.gather(1, idx).reshape(B, C, -1).cpu()
        idx, valid = idx.reshape(B, C, -1).cpu(), valid.reshape(B, C, -1).cpu()
        presence = (scale * img_emb.float() @ ct.T).softmax(-1).cpu()  # [B, C]
        conf = detection_confidence(sc, presence)
        for b, j in enumerate(ok):
            im = chunk[j]
            evaluated.append({**im, "map": maps[b]})
            lab = torch.arange(C)[:, None].expand_as(idx[b])[valid[b]]
            boxes = to_original(cand_px[idx[b][valid[b]]], maps[b], sizes[b])
            scores = conf[b][valid[b]].double()
            top = torch.argsort(-scores, stable=True)[:max_dets]
            for t in top.tolist():
                x0, y0, x1, y1 = boxes[t].tolist()
                if x1 <= x0 or y1 <= y0:
                    continue  # a box wholly in padding cannot be (never happens with crop center/none)
                results.append({"image_id": im["id"], "category_id": cats[int(lab[t])]["id"],
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(scores[t])})
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    if not evaluated:
        raise ValueError(f"{annotations!r}: no image could be evaluated ({pr.count} problems; first: {pr.examples[:1]})")
    ids = {im["id"] for im in evaluated}
    gt_anns = [a for a in ds["annotations"] if a["image_id"] in ids]
    stats, ev, _ = _pycocotools_eval(evaluated, cats, gt_anns, results)
    by_id = {im["id"]: im for im in evaluated}
    crop_cut = sum(1 for a in gt_anns if float(_visible_share(
        torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]]),
        by_id[a["image_id"]]["map"], S)[0]) < 0.5)
    unknown = _without_known_words(model, names)
    _warn_unknown("category names", unknown, len(names))
    out = {"task": "coco", "annotations": os.path.abspath(annotations), "images_dir": os.path.abspath(images),
           **stats, "per_class": _per_class_ap(ev, cats),
           "evaluator": "pycocotools COCOeval (bbox, maxDets [1, 10, 100])",
           "images": len(evaluated), "categories": len(cats), "ground_truth_boxes": len(gt_anns),
           "detections": len(results), "max_dets_per_class": k, "max_dets": max_dets, "crop": crop,
           "boxes_mostly_outside_crop": crop_cut, "categories_without_known_words": unknown,
           "prompts": "'a <category>' in every prompt template beside neutral partner phrases (as built-in detection)",
           **pr.report(), "seconds": time.perf_counter() - t0}
    if return_detections:
        out["detections"] = results
        out["ground_truth"] = gt_anns
        out["image_ids"] = [im["id"] for im in evaluated]
        out["category_ids"] = [c["id"] for c in cats]
    else:
        out["detections"] = len(results)
    return out


# ------------------------------------------------------------------------------------------------
# phrase grounding
# ------------------------------------------------------------------------------------------------
def _entries_from_text(text: str, path: str, pr: _Problems) -> list[tuple[str, Any]]:
    """``(label, entry)`` of a JSON list or a JSONL file; malformed lines are skipped and counted."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"grounding annotations {path!r} are not valid JSON: {e.msg} at line {e.lineno} "
                             f"column {e.colno}") from None
        return [(f"entry {i}", e) for i, e in enumerate(data)]
    if stripped.startswith("{") and not path.lower().endswith(".jsonl"):
        try:  # a JSON object holding the list
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # read as JSONL below
        if isinstance(data, dict):
            lst = data.get("entries", data.get("annotations"))
            if isinstance(lst, list):
                return [(f"entry {i}", e) for i, e in enumerate(lst)]
            if {"image", "caption", "phrases"} <= set(data):
                return [("entry 0", data)]
            raise ValueError(f"grounding annotations {path!r}: a JSON object must hold an 'entries' list")
    out = []
    n = 0
    for ln, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        label = f"entry {n} (line {ln})"
        n += 1
        try:
            out.append((label, json.loads(line)))
        except json.JSONDecodeError as e:
            pr.add("malformed JSON", f"{label}: not valid JSON ({e.msg} at column {e.colno})")
    return out


def read_grounding(path: str, images: str | None = None, *, strict: bool = False,
                   limit: int | None = None) -> tuple[list[dict], _Problems]:
    """Read and check a grounding file (JSON list or JSONL, see the module docstring).

    Image paths are relative to ``images`` (default: the annotation file's folder). Returns the
    valid entries ``{"label", "path", "caption", "spans", "boxes" (original pixels, clipped),
    "size"}`` and the problems (skipped entries, by reason, each message naming the entry)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"grounding annotations {path!r} do not exist")
    if images is not None and not os.path.isdir(images):
        raise FileNotFoundError(f"image folder {images!r} does not exist")
    root = images if images is not None else os.path.dirname(os.path.abspath(path))
    pr = _Problems(os.path.basename(path), strict)
    with open(path, encoding="utf-8") as f:
        raw = _entries_from_text(f.read(), path, pr)
    if limit is not None:
        raw = raw[:int(limit)]
    out = []
    sizes: dict[str, Any] = {}
    for label, e in raw:
        if not isinstance(e, dict):
            pr.add("malformed entry", f"{label}: not a JSON object")
            continue
        img, cap, phrases = e.get("image"), e.get("caption"), e.get("phrases")
        if not isinstance(img, str) or not img.strip():
            pr.add("malformed entry", f"{label}: no 'image' path")
            continue
        if not isinstance(cap, str) or not cap.strip():
            pr.add("malformed entry", f"{label}: no 'caption' (a non-empty string)")
            continue
        if not isinstance(phrases, list) or not phrases:
            pr.add("malformed entry", f"{label}: 'phrases' must be a non-empty list of {{'span', 'box'}}")
            continue
        p = _resolve(root, img)
        if p not in sizes:
            sizes[p] = _image_size(p)
        size = sizes[p]
        if isinstance(size, str):
            pr.add(size.split(" (")[0], f"{label}: {size}: {p!r}")
            continue
        spans, boxes, why = [], [], None
        for j, ph in enumerate(phrases):
            if not isinstance(ph, dict):
                why = ("malformed entry", f"{label}: phrases[{j}] is not an object")
                break
            sp = ph.get("span")
            if not (isinstance(sp, (list, tuple)) and len(sp) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                            for v in sp)):
                why = ("malformed entry", f"{label}: phrases[{j}]: 'span' must be [start, end] integers, got {sp!r}")
                break
            if not 0 <= sp[0] < sp[1] <= len(cap):
                why = ("span outside caption", f"{label}: phrases[{j}]: span {list(sp)} is outside the caption "
                                               f"(length {len(cap)}) or empty")
                break
            if not cap[sp[0]:sp[1]].strip():
                why = ("span outside caption", f"{label}: phrases[{j}]: span {list(sp)} holds only spaces")
                break
            bp = _box_problem(ph.get("box"), size)
            if bp:
                why = ("box outside image" if "outside" in bp else "malformed box", f"{label}: phrases[{j}]: {bp}")
                break
            spans.append((int(sp[0]), int(sp[1])))
            boxes.append(_clip_box(ph["box"], size))
        if why:
            pr.add(*why)
            continue
        out.append({"label": label, "path": p, "caption": cap, "spans": spans, "boxes": boxes, "size": size})
    return out, pr


def _whole_caption(caption: str, span: tuple[int, int]) -> bool:
    """Is the phrase its whole caption (up to spaces and final punctuation)?"""
    s, e = span
    return not caption[:s].strip() and not caption[e:].strip().strip(".!?,;:")


@torch.no_grad()
def evaluate_grounding(model, annotations: str, images: str | None = None, *, crop: str = "center",
                       phrase_context: str = "auto", batch_size: int = 32, limit: int | None = None,
                       strict: bool = False, progress: bool = False) -> dict:
    """Phrase grounding on a user's JSON/JSONL (see the module docstring) -> result dict.

    ``phrase_context``: ``"auto"`` encodes a phrase that is its whole caption beside neutral partner
    phrases (:meth:`LoupeModel.encode_lone_phrases`, as ``loupe.ground``), ``"caption"`` always in
    its caption (as the built-in evaluation)."""
    if phrase_context not in ("auto", "caption"):
        raise ValueError(f"phrase_context must be 'auto' or 'caption', got {phrase_context!r}")
    t0 = time.perf_counter()
    entries, pr = read_grounding(annotations, images, strict=strict, limit=limit)
    if not entries:
        raise ValueError(f"{annotations!r}: no valid entry ({pr.count} skipped; first: {pr.examples[:1]})")
    # every annotated box of an image, over all its entries (deduplicated): "any" and k
    objects: dict[str, list[tuple]] = {}
    for e in entries:
        lst = objects.setdefault(e["path"], [])
        for b in e["boxes"]:
            key = tuple(round(v, 2) for v in b)
            if key not in lst:
                lst.append(key)
    dev = model.logit_scale.device
    g, p, S = model.grid_size, model.config.patch_size, model.config.image_size
    cand_px = model.candidate_boxes.double().cpu() * p
    centres = patch_centres(g, p)
    regions = bool(getattr(model, "needs_regions", False))
    rec: dict[str, list] = {k: [] for k in ("hit", "point", "iou", "any_hit", "point_any", "k", "tf_cap_own",
                                            "tf_cap_any", "tf_obj_own", "tf_obj_any", "hit_regions", "visible")}
    n_lone = n_trunc = n_done = 0
    bar = _bar(len(entries), progress, "ground")
    for lo in range(0, len(entries), batch_size):
        chunk = entries[lo:lo + batch_size]
        uniq = list(dict.fromkeys(e["path"] for e in chunk))
        first = {pth: next(e["label"] for e in chunk if e["path"] == pth) for pth in uniq}
        x, maps, sizes, ok = _load_images(model, uniq, crop, pr, [first[u] for u in uniq])
        if bar is not None:
            bar.update(len(chunk))
        if x is None:
            continue
        slot = {uniq[j]: b for b, j in enumerate(ok)}
        for e in chunk:  # entries whose image failed to decode: counted once per entry
            if e["path"] not in slot and first[e["path"]] != e["label"]:
                pr.add("unreadable image", f"{e['label']}: cannot read image {e['path']!r}")
        chunk = [e for e in chunk if e["path"] in slot]
        if not chunk:
            continue
        n_done += len(chunk)
        img_emb, patches_u = model.encode_image_tokens(x)
        rows = torch.tensor([slot[e["path"]] for e in chunk], device=patches_u.device)
        patches = patches_u[rows]
        t = model.tokenize([e["caption"] for e in chunk], [e["spans"] for e in chunk])
        txt_emb, words, wmask = model.encode_text_tokens(t["input_ids"], t["attention_mask"])
        wmask = wmask & t["word_mask"]
        pf, pmask = R.phrase_features(words, wmask, t["phrase_token_spans"], t["phrase_mask"])
        if phrase_context == "auto":
            lone = [(b, j) for b, e in enumerate(chunk) for j, sp in enumerate(e["spans"])
                    if _whole_caption(e["caption"], sp) and bool(pmask[b, j])]
            if lone:
                f = model.encode_lone_phrases([chunk[b]["caption"][slice(*chunk[b]["spans"][j])] for b, j in lone])
                for (b, j), v in zip(lone, f):
                    pf[b, j] = v.to(pf.dtype)
                n_lone += len(lone)
        idx, _ = grounding_predictions(pf, patches, g)
        idx_cap, _ = grounding_predictions(txt_emb[:, None, :], patches, g)
        idx_r = idx_obj = None
        if regions:
            reg = model.regions(patches)
            allowed = torch.zeros(idx.shape[0], cand_px.shape[0], dtype=torch.bool, device=dev)
            allowed.scatter_(1, reg["region_index"], reg["region_mask"])
            idx_r, _ = grounding_predictions(pf, patches, g, allowed=allowed)
            idx_obj = reg["box_logits"].argmax(-1)
        sim = torch.einsum("bpd,bnd->bpn", pf.float(), patches.float()).cpu()
        pmask = pmask.cpu()
        for b, e in enumerate(chunk):
            mp, size = maps[slot[e["path"]]], e["size"]
            objs = torch.tensor(objects[e["path"]], dtype=torch.float64).reshape(-1, 4)
            for j in range(len(e["spans"])):
                if not bool(pmask[b, j]):
                    n_trunc += 1  # the phrase lost every token to truncation: a miss
                true = torch.tensor([e["boxes"][j]], dtype=torch.float64)
                pred = to_original(cand_px[idx[b, j].cpu()][None], mp, size)
                iou = box_iou_pairs(pred, true)
                ok_p = bool(pmask[b, j])
                rec["iou"].append(iou if ok_p else torch.zeros(1, dtype=torch.float64))
                rec["hit"].append((iou >= 0.5) & ok_p)
                rec["any_hit"].append(object_hits(pred, [objs]) & ok_p)
                top = to_original(torch.cat([centres[int(sim[b, j].argmax())]] * 2)[None], mp)[0, :2]
                rec["point"].append(points_inside(top[None], true)[:, 0] & ok_p)
                rec["point_any"].append(points_in_any(top[None], [objs]) & ok_p)
                rec["k"].append(torch.tensor([len(objs)]))
                rec["visible"].append(_visible_share(true, mp, S))
                pred_cap = to_original(cand_px[idx_cap[b, 0].cpu()][None], mp, size)
                rec["tf_cap_own"].append(box_iou_pairs(pred_cap, true) >= 0.5)
                rec["tf_cap_any"].append(object_hits(pred_cap, [objs]))
                if regions:
                    pred_r = to_original(cand_px[idx_r[b, j].cpu()][None], mp, size)
                    rec["hit_regions"].append((box_iou_pairs(pred_r, true) >= 0.5) & ok_p)
                    pred_o = to_original(cand_px[idx_obj[b].cpu()][None], mp, size)
                    rec["tf_obj_own"].append(box_iou_pairs(pred_o, true) >= 0.5)
                    rec["tf_obj_any"].append(object_hits(pred_o, [objs]))
    if bar is not None:
        bar.close()
    if not rec["hit"]:
        raise ValueError(f"{annotations!r}: no entry could be evaluated ({pr.count} skipped; first: {pr.examples[:1]})")
    r = {k: torch.cat(v) for k, v in rec.items() if v}
    mean = lambda v: float(v.double().mean()) if len(v) else None  # noqa: E731

    def block(m: torch.Tensor) -> dict:
        row = {"phrases": int(m.sum()), "own_acc50": mean(r["hit"][m]), "any_acc50": mean(r["any_hit"][m]),
               "discrimination": discrimination(r["hit"][m], r["any_hit"][m]),
               "pointing_own": mean(r["point"][m]), "pointing_any": mean(r["point_any"][m]),
               "pointing_discrimination": discrimination(r["point"][m], r["point_any"][m]),
               "text_free": mean(1.0 / r["k"][m].double()),
               "text_free_caption": {"own_acc50": mean(r["tf_cap_own"][m]), "any_acc50": mean(r["tf_cap_any"][m])}}
        if "tf_obj_own" in r:
            row["text_free_objectness"] = {"own_acc50": mean(r["tf_obj_own"][m]), "any_acc50": mean(r["tf_obj_any"][m])}
        return row

    every = torch.ones(len(r["hit"]), dtype=torch.bool)
    finding = block(every)
    finding["by_k"] = {str(k): block(r["k"] == k) for k in sorted(set(r["k"].tolist()))}
    unknown = _without_known_words(model, [e["caption"][s_:e_] for e in entries for s_, e_ in e["spans"]])
    _warn_unknown("phrases", unknown, sum(len(e["spans"]) for e in entries))
    out = {"task": "grounding", "annotations": os.path.abspath(annotations),
           "acc50": mean(r["hit"]), "pointing": mean(r["point"]), "mean_iou": mean(r["iou"]),
           "phrases": len(r["hit"]), "entries": n_done, "images": len(objects),
           "finding": finding, "crop": crop, "phrase_context": phrase_context,
           "lone_phrases": n_lone, "phrases_truncated": n_trunc, "phrases_without_known_words": len(unknown),
           "boxes_mostly_outside_crop": int((r["visible"] < 0.5).sum()),
           "rule": "best whole-patch box under loupe.regions.grounding_scores, mapped to the image's pixels"}
    if "hit_regions" in r:
        out["regions_acc50"] = mean(r["hit_regions"])
    out.update(pr.report())
    out["seconds"] = time.perf_counter() - t0
    return out


# ------------------------------------------------------------------------------------------------
# zero-shot classification on a class-folder tree
# ------------------------------------------------------------------------------------------------
def read_class_folders(root: str) -> tuple[list[str], list[tuple[str, int]]]:
    """``(class folder names (sorted), [(image path, class index)])`` of ``root/<class>/...``.

    Images are the files with an image extension (any depth below the class folder). A root
    without class folders, or a class folder without images, raises ``ValueError`` naming them."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"class folder tree {root!r} does not exist")
    classes = sorted(d for d in os.listdir(root) if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise ValueError(f"{root!r} holds no class folders (expected {root}/<class>/*.jpg)")
    items, empty = [], []
    for ci, c in enumerate(classes):
        n0 = len(items)
        for d, subdirs, files in os.walk(os.path.join(root, c)):
            subdirs[:] = sorted(s for s in subdirs if not s.startswith("."))
            items += [(os.path.join(d, f), ci) for f in sorted(files)
                      if f.lower().endswith(IMAGE_EXTS) and not f.startswith(".")]
        if len(items) == n0:
            empty.append(c)
    if empty:
        raise ValueError(f"{root!r}: class folder(s) without images ({', '.join(IMAGE_EXTS)}): "
                         f"{', '.join(empty[:10])}{' ...' if len(empty) > 10 else ''}; remove them or add images")
    return classes, items


def class_prompt(folder: str) -> str:
    """The class phrase of a folder name: underscores -> spaces, with an article ("golden_retriever" ->
    "a golden retriever")."""
    return with_article(" ".join(folder.replace("_", " ").split()))


@torch.no_grad()
def evaluate_classification(model, folder: str, *, crop: str = "center", batch_size: int = 64,
                            strict: bool = False, progress: bool = False) -> dict:
    """Zero-shot top-1 / top-5 on ``folder/<class>/*`` with prompts from the folder names."""
    t0 = time.perf_counter()
    classes, items = read_class_folders(folder)
    pr = _Problems(os.path.basename(os.path.normpath(folder)), strict)
    dev = model.logit_scale.device
    ct = class_features(model, [class_prompt(c) for c in classes]).to(dev)
    embs, ys = [], []
    bar = _bar(len(items), progress, "classify")
    for lo in range(0, len(items), batch_size):
        chunk = items[lo:lo + batch_size]
        x, _, _, ok = _load_images(model, [p for p, _ in chunk], crop, pr, [p for p, _ in chunk])
        if x is not None:
            embs.append(model.encode_image(x).float())
            ys += [chunk[j][1] for j in ok]
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    if not embs:
        raise ValueError(f"{folder!r}: no image could be read ({pr.count} skipped; first: {pr.examples[:1]})")
    img = torch.cat(embs)
    y = torch.tensor(ys, dtype=torch.long)
    r = recall_at_k((img @ ct.float().T).cpu(), y, (1, 5))
    per_class = {}
    pred = (img @ ct.float().T).cpu().argmax(-1)
    for ci, c in enumerate(classes):
        m = y == ci
        per_class[c] = {"images": int(m.sum()), "top1": float((pred[m] == ci).double().mean()) if m.any() else None}
    unknown = _without_known_words(model, [" ".join(c.replace("_", " ").split()) for c in classes])
    _warn_unknown("class names", unknown, len(classes))
    return {"task": "classify", "folder": os.path.abspath(folder), "top1": r[1], "top5": r[5],
            "classes": len(classes), "images": int(len(y)), "per_class": per_class, "crop": crop,
            "classes_without_known_words": unknown,
            "prompts": "'a <folder name, _ -> space>' averaged over the prompt templates (as built-in classification)",
            **pr.report(), "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------------
# retrieval on a CSV/TSV or tar shards
# ------------------------------------------------------------------------------------------------
def _recall_multi(scores: torch.Tensor, owner: torch.Tensor, ks=(1, 5, 10)) -> dict[int, float]:
    """Image -> text recall when an image has several captions: ``scores [Ni, Nt]``, ``owner [Nt]``
    (the image of each caption). An image is found at k when its best caption ranks in the top k;
    ties count against the model (as :func:`loupe.metrics.recall_at_k`)."""
    own = owner[None, :] == torch.arange(scores.shape[0])[:, None]  # [Ni, Nt]
    best = scores.masked_fill(~own, float("-inf")).max(1, keepdim=True).values
    rank = ((scores >= best) & ~own).sum(1)
    return {int(k): float((rank < k).double().mean()) for k in ks}


@torch.no_grad()
def evaluate_retrieval(model, *, csv: str | None = None, shards: str | list[str] | None = None,
                       img_key: str = "filepath", caption_key: str = "title", separator: str = "\t",
                       crop: str = "center", batch_size: int = 64, limit: int | None = None,
                       progress: bool = False) -> dict:
    """Image<->text recall@1/5/10 on a CSV/TSV (``csv``) or WebDataset shards (``shards``).

    Rows are read by :class:`loupe.data.CsvDataset` / :class:`loupe.data.ShardDataset` (or, for
    ``https://`` and ``pipe:`` shard specs, :class:`loupe.data.StreamingShardDataset`), with their own
    skip-and-count of bad rows and samples; CSV rows naming the same image file are one image
    with several captions."""
    if (csv is None) == (shards is None):
        raise ValueError("evaluate_retrieval: give exactly one of csv= and shards=")
    t0 = time.perf_counter()
    S = model.config.image_size
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if csv is not None:
            if not os.path.isfile(csv):
                raise FileNotFoundError(f"retrieval CSV {csv!r} does not exist")
            ds = ldata.build_dataset("csv", path=csv, image_size=S, crop=crop, img_key=img_key,
                                     caption_key=caption_key, separator=separator)
        else:
            # local shards: the map-style reader; URLs and pipe: commands: streamed in file order, whole
            ds = ldata.build_dataset("webdataset", "test", path=shards, image_size=S, crop=crop, rank=0, world_size=1)
    skipped_read = int(getattr(ds, "skipped", 0))
    streamed = isinstance(ds, torch.utils.data.IterableDataset)
    n = None if streamed else (len(ds) if limit is None else min(len(ds), int(limit)))
    dev = model.logit_scale.device
    mean = (torch.tensor(ldata.CLIP_MEAN).view(1, 3, 1, 1) * 255.0).to(dev)
    std = (torch.tensor(ldata.CLIP_STD).view(1, 3, 1, 1) * 255.0).to(dev)
    items = getattr(ds, "items", None)

    def samples_of():
        """``(sample or None, image key)`` in file order; warnings collected in ``caught``."""
        it = iter(ds) if streamed else (ds[i] for i in range(n))
        for i in range(n) if n is not None else itertools.count():
            if limit is not None and i >= int(limit):
                return
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                s = next(it, StopIteration)
            caught.extend(w)
            if s is StopIteration:
                return
            key = items[i].get("path") if (csv is not None and items is not None and i < len(items)) else None
            yield s, (key if key is not None else f"#{i}")

    keys: dict[str, int] = {}
    img_embs, txt_embs, owner = [], [], []
    skipped_decode = 0
    bar = _bar(n or 0, progress, "retrieval")
    stream = samples_of()
    while True:
        raw = [x for _, x in zip(range(batch_size), stream)]
        if not raw:
            break
        if bar is not None:
            bar.update(len(raw))
        samples = [(s, k) for s, k in raw if s is not None]
        skipped_decode += len(raw) - len(samples)
        if not samples:
            continue
        new = [(s, k) for s, k in samples if k not in keys]
        new = list({k: s for s, k in new}.items())  # one per image file
        if new:
            x = (torch.stack([s["image"] for _, s in new]).to(dev).float() - mean) / std
            img_embs.append(model.encode_image(x).float().cpu())
            for k, _ in new:
                keys[k] = len(keys)
        txt_embs.append(model.encode_captions([s["caption"] for s, _ in samples]).float().cpu())
        owner += [keys[k] for _, k in samples]
    if streamed:  # a stream drops bad samples itself and counts them as it goes
        skipped_read = int(getattr(ds, "skipped", 0))
    if bar is not None:
        bar.close()
    if not owner:
        raise ValueError(f"{csv or shards!r}: no sample could be read (see the warnings)")
    img, txt = torch.cat(img_embs), torch.cat(txt_embs)
    own = torch.tensor(owner, dtype=torch.long)
    sim = img @ txt.T  # [Ni, Nt]
    t2i = recall_at_k(sim.T.contiguous(), own)
    one_each = len(img) == len(txt) and torch.equal(own, torch.arange(len(txt)))
    i2t = recall_at_k(sim, own) if one_each else _recall_multi(sim, own)
    messages = [str(w.message) for w in caught]
    out = {"task": "retrieval", "source": os.path.abspath(csv) if csv is not None else shards,
           **{f"i2t_r{k}": v for k, v in i2t.items()}, **{f"t2i_r{k}": v for k, v in t2i.items()},
           "images": int(len(img)), "captions": int(len(txt)), "crop": crop,
           "skipped": skipped_read + skipped_decode,
           "skipped_reasons": {"rows or samples left out when read": skipped_read,
                               "images that could not be decoded": skipped_decode},
           "skipped_examples": messages[:_EXAMPLES], "seconds": time.perf_counter() - t0}
    for m in messages:
        warnings.warn(m, stacklevel=2)
    return out


# ------------------------------------------------------------------------------------------------
# output and CLI
# ------------------------------------------------------------------------------------------------
_HEADLINES = {
    "coco": [("mAP@[.5:.95]", "map"), ("mAP@0.5", "map50"), ("mAP@0.75", "map75"), ("AR@1", "ar1"),
             ("AR@10", "ar10"), ("AR@100", "ar100")],
    "grounding": [("Acc@0.5", "acc50"), ("pointing", "pointing"), ("mean IoU", "mean_iou"),
                  ("own Acc@0.5", "finding.own_acc50"), ("any Acc@0.5", "finding.any_acc50"),
                  ("discrimination (own/any)", "finding.discrimination"),
                  ("pointing own / any", "finding.pointing_discrimination"),
                  ("text-free bar (mean 1/k)", "finding.text_free"), ("Acc@0.5 over objectness regions", "regions_acc50")],
    "classify": [("top-1", "top1"), ("top-5", "top5")],
    "retrieval": [("i2t R@1", "i2t_r1"), ("i2t R@5", "i2t_r5"), ("i2t R@10", "i2t_r10"), ("t2i R@1", "t2i_r1"),
                  ("t2i R@5", "t2i_r5"), ("t2i R@10", "t2i_r10")],
}
_COUNTS = {"coco": ("images", "categories", "ground_truth_boxes", "detections", "boxes_mostly_outside_crop"),
           "grounding": ("entries", "phrases", "images", "lone_phrases", "phrases_truncated",
                         "boxes_mostly_outside_crop"),
           "classify": ("images", "classes"), "retrieval": ("images", "captions")}


def _get(d: dict, path: str):
    for k in path.split("."):
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def markdown(result: dict) -> str:
    """A Markdown table of a result's headline metrics (in %) and counts."""
    task = result["task"]
    lines = [f"| {task} | value |", "|---|---|"]
    for name, key in _HEADLINES[task]:
        v = _get(result, key)
        if v is None and key == "regions_acc50":
            continue
        lines.append(f"| {name} | {'-' if v is None else f'{100 * v:.1f}%'} |")
    for key in _COUNTS[task] + ("skipped",):
        if key in result:
            lines.append(f"| {key.replace('_', ' ')} | {result[key]} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loupe.external",
                                 description="Zero-shot evaluation of a checkpoint on benchmark files on disk: "
                                             "COCO detection, phrase grounding, class folders, retrieval.")
    sub = ap.add_subparsers(dest="task", required=True)

    def common(p):
        p.add_argument("--checkpoint", required=True, help="training output directory (model.pt, tokenizer.json)")
        p.add_argument("--out", default=None, help="JSON to write (and FILE.md); default CHECKPOINT/external_TASK.json")
        p.add_argument("--crop", choices=("center", "none"), default="center",
                       help="center: shorter side to the model's size, centre square (objects at the edges may be "
                            "cut off); none: squash the whole image to the square")
        p.add_argument("--batch-size", type=int, default=32)
        p.add_argument("--device", default=None)
        p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("coco", help="detection on a COCO-format annotation file + image folder (mAP by pycocotools)")
    common(p)
    p.add_argument("--coco-annotations", required=True, help="COCO instances JSON")
    p.add_argument("--images", required=True, help="folder the file_name entries are relative to")
    p.add_argument("--max-dets-per-class", type=int, default=10, help="boxes per image and class after NMS")
    p.add_argument("--max-dets", type=int, default=100, help="most confident boxes kept per image")
    p.add_argument("--limit", type=int, default=None, help="only the first N images (by id)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad entry instead of skipping it")
    p = sub.add_parser("grounding", help="phrase grounding on a JSON/JSONL of {image, caption, phrases: [{span, box}]}")
    common(p)
    p.add_argument("--annotations", required=True, help="JSON list or JSONL file (docs/FORMATS.md)")
    p.add_argument("--images", default=None, help="folder image paths are relative to (default: the file's folder)")
    p.add_argument("--phrase-context", choices=("auto", "caption"), default="auto",
                   help="auto: a phrase that is its whole caption is encoded beside neutral partner phrases")
    p.add_argument("--limit", type=int, default=None, help="only the first N entries")
    p.add_argument("--strict", action="store_true", help="stop at the first bad entry instead of skipping it")
    p = sub.add_parser("classify", help="zero-shot classification on DIR/<class>/*.jpg|png (top-1/top-5)")
    common(p)
    p.add_argument("--folder", required=True, help="root of the class folders")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable image")
    p = sub.add_parser("retrieval", help="image<->text recall@1/5/10 on a CSV/TSV or tar shards")
    common(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--csv", default=None, help="CSV/TSV with an image path and a caption column")
    g.add_argument("--shards", default=None, help="tar shards: a file, folder, glob or {000..009} range")
    p.add_argument("--img-key", default="filepath")
    p.add_argument("--caption-key", default="title")
    p.add_argument("--separator", default="\t", help="column separator of --csv (default: tab)")
    p.add_argument("--limit", type=int, default=None, help="only the first N rows/samples")
    a = ap.parse_args(argv)
    if a.batch_size < 1:
        ap.error("--batch-size must be >= 1")
    if getattr(a, "limit", None) is not None and a.limit < 1:
        ap.error("--limit must be >= 1")
    try:
        model, _ = load_checkpoint(a.checkpoint, _device(a.device))
        kw = dict(crop=a.crop, batch_size=a.batch_size, progress=not a.no_progress)
        if a.task == "coco":
            if a.max_dets_per_class < 1 or a.max_dets < 1:
                ap.error("--max-dets-per-class and --max-dets must be >= 1")
            res = evaluate_coco(model, a.coco_annotations, a.images, max_dets_per_class=a.max_dets_per_class,
                                max_dets=a.max_dets, limit=a.limit, strict=a.strict, **kw)
        elif a.task == "grounding":
            res = evaluate_grounding(model, a.annotations, a.images, phrase_context=a.phrase_context, limit=a.limit,
                                     strict=a.strict, **kw)
        elif a.task == "classify":
            res = evaluate_classification(model, a.folder, strict=a.strict, **kw)
        else:
            res = evaluate_retrieval(model, csv=a.csv, shards=a.shards, img_key=a.img_key, caption_key=a.caption_key,
                                     separator=a.separator, limit=a.limit, **kw)
    except (CheckpointError, FileNotFoundError, ValueError, ImportError, OSError) as e:
        print(f"loupe.external {a.task}: error: {e}", file=sys.stderr)
        return 2
    res["checkpoint"] = os.path.abspath(a.checkpoint)
    res["step"] = saved_step(a.checkpoint)
    out = a.out or os.path.join(a.checkpoint if os.path.isdir(a.checkpoint) else os.path.dirname(a.checkpoint) or ".",
                                f"external_{a.task}.json")
    write_report(res, out, markdown(res))
    print(markdown(res))
    print(f"\nwrote {out} ({res['seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
