"""Grounding as a product: boxes with scores for a phrase or caption in an image.

    python -m loupe.ground --checkpoint runs/loupe photo.png "a small red circle left of a blue square"

A caption is chunked into noun phrases (:func:`loupe.data.chunk_noun_phrases`); each phrase's
feature is the mean of its word tokens in the context of the whole caption (METHOD section 10),
and every whole-patch box is scored with the evaluation's fixed rule
:func:`loupe.regions.grounding_scores` (the sum over the box's patches of the phrase's patch
similarity minus its 70th percentile) (or, with ``regions=True``, only the
model's top-M objectness regions are candidates). Boxes come back in the pixels of the image that
was passed in (the centre crop to the model's square input is undone).

In Python::

    import loupe
    from loupe.ground import ground
    model = loupe.load("runs/loupe")
    for hit in ground(model, "photo.png", "a red circle next to a blue square"):
        print(hit["phrase"], hit["box"], hit["score"])
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

import numpy as np
import torch

from . import regions as R
from .checkpoint import CheckpointError, load_checkpoint
from .data import CLIP_MEAN, CLIP_STD, Preprocess, chunk_noun_phrases
from .data.pipeline import open_image

__all__ = ["ground", "prepare_image", "draw", "main"]


def _to_pil(image: Any):
    from PIL import Image
    if isinstance(image, (str, os.PathLike)):
        if not os.path.exists(image):
            raise FileNotFoundError(f"ground: image file {os.fspath(image)!r} does not exist")
        return open_image(image)  # 16-bit images scaled, the pixel limit named
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        a = image
        if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
            a = a.transpose(1, 2, 0)  # CHW -> HWC
        if a.ndim == 2:
            a = a[..., None]
        if a.ndim != 3 or a.shape[-1] not in (1, 3):
            raise ValueError(f"ground: image array must be HxWx3, 3xHxW or HxW, got shape {list(image.shape)}")
        if a.dtype != np.uint8:
            if np.issubdtype(a.dtype, np.floating) and a.size and float(a.max()) <= 1.0 and float(a.min()) >= 0.0:
                a = a * 255.0
            a = np.clip(np.round(a), 0, 255).astype(np.uint8)
        if a.shape[-1] == 1:
            a = np.repeat(a, 3, axis=-1)
        return Image.fromarray(np.ascontiguousarray(a), "RGB")
    raise TypeError(f"ground: image must be a path, PIL image, numpy array or tensor, got {type(image).__name__}")


def prepare_image(model, image: Any, crop: str = "center") -> tuple[torch.Tensor, tuple[float, float, float, float],
                                                                    Any]:
    """The model input ``[1, 3, S, S]`` (normalised as in training), the map ``(sx, sy, ox, oy)`` from
    original pixels to model pixels (``x_model = x * sx - ox``) and the RGB PIL image."""
    pil = _to_pil(image)
    S = model.config.image_size
    w, h = pil.size
    if w < 1 or h < 1:
        raise ValueError("ground: the image is empty")
    if crop == "center":
        k = S / min(w, h)
        nw, nh = max(S, round(w * k)), max(S, round(h * k))
        sx, sy, ox, oy = nw / w, nh / h, float((nw - S) // 2), float((nh - S) // 2)
    elif crop == "none":
        sx, sy, ox, oy = S / w, S / h, 0.0, 0.0
    else:
        raise ValueError(f"ground: crop must be 'center' or 'none', got {crop!r}")
    img, _ = Preprocess(S, crop)(pil)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1) * 255.0
    x = (img[None].float() - mean) / std
    return x.to(model.logit_scale.device), (sx, sy, ox, oy), pil


@torch.no_grad()
def ground(model, image: Any, text: str, *, phrases: Sequence[tuple[int, int]] | None = None, top_k: int = 1,
           regions: bool = False, crop: str = "center") -> list[dict]:
    """Boxes with scores for each phrase of ``text`` in ``image``.

    ``model``: a :class:`loupe.model.LoupeModel` with a tokenizer (``loupe.load``). ``image``: a path,
    PIL image, ``HxWx3``/``3xHxW`` uint8 array or tensor. ``text``: a phrase or a caption; a caption
    is chunked into noun phrases (``phrases`` = explicit character spans overrides the chunker; text
    without any noun phrase is grounded as one phrase; a text with a single phrase is encoded beside
    neutral partner phrases, :meth:`loupe.model.LoupeModel.encode_lone_phrases`). ``top_k`` boxes per phrase after NMS;
    ``regions=True`` restricts the candidates to the top-M objectness regions.

    Returns one dict per phrase: ``phrase``, ``span`` (characters of ``text``), ``box`` (xyxy in the
    input image's pixels) and ``score`` of the best box, ``boxes``/``scores`` of the ``top_k``, and
    ``unknown_words`` / ``known_words``: how many of the phrase's tokens the tokenizer does / does
    not map to ``[UNK]``. A phrase with no known token still gets a box, but it says nothing about
    the phrase (every such phrase gets the same feature): check ``known_words``.
    Scores are ``sum_{i in b} (<p, x_i> - t_p)`` (:func:`loupe.regions.grounding_scores`); they rank
    boxes for one phrase and are not probabilities.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError("ground: text must be a non-empty string")
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"ground: top_k must be a positive int, got {top_k!r}")
    if getattr(model, "tokenizer", None) is None:
        raise ValueError("ground: the model has no tokenizer; load it with loupe.load(dir)")
    if phrases is None:
        spans = list(chunk_noun_phrases(text)) or [(len(text) - len(text.lstrip()), len(text.rstrip()))]
    else:
        spans = [(int(s), int(e)) for s, e in phrases]
        for s, e in spans:
            if not 0 <= s < e <= len(text):
                raise ValueError(f"ground: phrase span {(s, e)} outside the text (length {len(text)})")
    x, (sx, sy, ox, oy), _ = prepare_image(model, image, crop)
    _, patches = model.encode_image_tokens(x)
    if len(spans) == 1:  # a phrase without other phrases: encode it in the context it was trained in
        s0, e0 = spans[0]
        pf = model.encode_lone_phrases([text[s0:e0]])[None]
        pmask = torch.ones(1, 1, dtype=torch.bool, device=pf.device)
    else:
        pf, pmask = model.encode_phrases([text], [spans])
    g, p = model.grid_size, model.config.patch_size
    scores = R.grounding_scores(pf.float(), patches.float(), g, g)[0]  # [P, K], model.candidate_boxes order
    if regions:
        reg = model.regions(patches)
        allowed = torch.zeros(scores.shape[1], dtype=torch.bool, device=scores.device)
        allowed[reg["region_index"][0][reg["region_mask"][0]]] = True
        scores = scores.masked_fill(~allowed[None], float("-inf"))
    idx, ok = R.nms_topk(scores, model.nms_suppress, top_k)
    boxes_px = R.boxes_to_pixels(model.candidate_boxes, p).double().cpu()
    out = []
    unk = getattr(model.tokenizer, "unk_id", None)
    for j, (s, e) in enumerate(spans):
        ids, _ = model.tokenizer.encode(text[s:e])
        n_unk = sum(1 for i in ids if unk is not None and i == unk)
        words = {"unknown_words": n_unk, "known_words": len(ids) - n_unk}
        if not bool(pmask[0, j]):
            out.append({"phrase": text[s:e], "span": (s, e), "box": None, "score": None, "boxes": [], "scores": [],
                        **words})
            continue
        keep = idx[j][ok[j]].cpu()
        b = boxes_px[keep].clone()
        b[:, [0, 2]] = (b[:, [0, 2]] + ox) / sx  # back to the input image's pixels
        b[:, [1, 3]] = (b[:, [1, 3]] + oy) / sy
        sc = scores[j, keep.to(scores.device)].cpu().tolist()
        bl = [[round(float(v), 2) for v in row] for row in b.tolist()]
        out.append({"phrase": text[s:e], "span": (s, e), "box": bl[0] if bl else None,
                    "score": sc[0] if sc else None, "boxes": bl, "scores": sc, **words})
    return out


_COLORS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c")


def draw(image: Any, results: list[dict], path: str, min_side: int = 256) -> str:
    """Write ``image`` with each phrase's boxes and labels to ``path`` (PNG); small images are
    enlarged to ``min_side`` pixels so that labels stay readable."""
    from PIL import Image, ImageDraw
    pil = _to_pil(image)
    k = max(1.0, min_side / min(pil.size))
    if k > 1:
        pil = pil.resize((round(pil.size[0] * k), round(pil.size[1] * k)), Image.NEAREST)
    d = ImageDraw.Draw(pil)
    for i, r in enumerate(results):
        col = _COLORS[i % len(_COLORS)]
        for rank, (b, s) in enumerate(zip(r["boxes"], r["scores"])):
            x0, y0, x1, y1 = (v * k for v in b)
            d.rectangle([x0, y0, x1 - 1, y1 - 1], outline=col, width=3 if rank == 0 else 1)
            if rank == 0:
                d.text((x0 + 2, y0 + 1), f"{r['phrase']} {s:.2f}", fill=col)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    pil.save(path)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loupe.ground",
                                 description="Ground a phrase or caption in an image with a trained checkpoint.")
    ap.add_argument("--checkpoint", required=True, help="training output directory (model.pt, tokenizer.json)")
    ap.add_argument("image", help="image file")
    ap.add_argument("text", help="a phrase or a caption (chunked into noun phrases)")
    ap.add_argument("--out", default=None, help="PNG with the boxes (default: IMAGE_STEM_grounded.png here)")
    ap.add_argument("--top-k", type=int, default=1, help="boxes per phrase (after NMS)")
    ap.add_argument("--regions", action="store_true", help="only the model's objectness regions as candidates")
    ap.add_argument("--crop", choices=("center", "none"), default="center")
    a = ap.parse_args(argv)
    if a.top_k < 1:
        ap.error("--top-k must be >= 1")
    try:
        model, _ = load_checkpoint(a.checkpoint)
        res = ground(model, a.image, a.text, top_k=a.top_k, regions=a.regions, crop=a.crop)
    except (CheckpointError, FileNotFoundError, ValueError, TypeError, OSError) as e:
        print(f"loupe.ground: error: {e}", file=sys.stderr)
        return 2
    out = a.out or os.path.splitext(os.path.basename(a.image))[0] + "_grounded.png"
    draw(a.image, res, out)
    for r in res:
        if r["known_words"] == 0:
            print(f"loupe.ground: warning: the phrase {r['phrase']!r} holds no word the model knows "
                  f"({r['unknown_words']} unknown token(s)); its box says nothing about it", file=sys.stderr)
        print(json.dumps(r))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
