"""Image opening, preprocessing and batch collation."""
from __future__ import annotations

import io
import os
import warnings

import numpy as np
import torch

__all__ = ["open_image", "Preprocess", "Collator", "CLIP_MEAN", "CLIP_STD"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def open_image(src, name: str | None = None):
    """Open an image file as an RGB ``PIL.Image`` (fully decoded, its file closed).

    ``src``: a path (str or ``os.PathLike``), ``bytes``, or a binary file object; ``name`` is what
    error messages call it (default: the path, or the file object's ``name``).

    - 8-bit modes (``1``, ``L``, ``P``, ``LA``, ``RGBA``, ``CMYK``, ...) go through
      ``Image.convert("RGB")`` (alpha dropped), as before.
    - 16-bit and 32-bit greyscale is scaled to 8 bits by the range of its type, not clipped at 255
      (which made 16-bit PNGs pure white): ``I;16*`` (0..65535) and ``I`` holding 0..65535 (how
      16-bit files decode as ``I``) -> ``round(v / 257)``; other ``I`` and ``F`` images -> their
      own min..max (``F`` within [0, 1] -> ``v * 255``; NaN -> 0).
    - EXIF orientation is not applied: pixels stay as stored, so boxes given in stored pixels
      (shard sidecars) stay valid.
    - An image of more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels raises ``ValueError`` naming the
      file, its size and the limit (before anything is decoded; PIL alone warns up to twice the
      limit and raises its own ``DecompressionBombError`` above). Raise ``Image.MAX_IMAGE_PIXELS``
      (or set it to None) to open larger trusted images.

    Unreadable or truncated files raise PIL's own errors (``OSError``,
    ``PIL.UnidentifiedImageError``).
    """
    from PIL import Image
    if name is None:
        name = os.fspath(src) if isinstance(src, (str, os.PathLike)) else str(getattr(src, "name", "<image>"))
    if isinstance(src, (bytes, bytearray, memoryview)):
        src = io.BytesIO(bytes(src))
    limit = Image.MAX_IMAGE_PIXELS
    hint = (f"PIL.Image.MAX_IMAGE_PIXELS = {limit} pixels, a guard against decompression bombs; "
            f"raise it to open larger trusted images")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(src)
    except Image.DecompressionBombError as e:
        raise ValueError(f"{name}: image too large ({e}); the limit is {hint}") from None
    with im:
        w, h = im.size
        if limit is not None and w * h > limit:
            raise ValueError(f"{name}: image too large ({w}x{h} = {w * h} pixels); the limit is {hint}")
        im.load()
        return _to_rgb(im)


def _to_rgb(im):
    """RGB copy of a loaded image; wide greyscale modes scaled to 8 bits (see :func:`open_image`)."""
    from PIL import Image
    mode = im.mode
    if not (mode.startswith("I;16") or mode in ("I", "F")):
        return im.convert("RGB")
    a = np.asarray(im)
    if mode.startswith("I;16"):
        a = a.astype(np.float64) + (32768.0 if a.dtype.kind == "i" else 0.0)  # I;16S: signed
        g = a / 257.0
    else:
        a = a.astype(np.float64)
        fin = np.isfinite(a)
        lo, hi = (float(a[fin].min()), float(a[fin].max())) if fin.any() else (0.0, 0.0)
        if mode == "I" and lo >= 0 and hi <= 65535:
            g = a / 257.0
        elif mode == "F" and lo >= 0 and hi <= 1:
            g = a * 255.0
        else:
            g = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        g = np.where(fin, g, 0.0)
    g = np.clip(np.round(g), 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(g)).convert("RGB")


class Preprocess:
    """Resize and crop a PIL image to ``image_size x image_size`` and move its boxes along.

    ``crop="center"``: scale the shorter side to ``image_size``, then take the centre square;
    ``crop="none"``: resize straight to the square (aspect ratio not kept). Returns a ``[3, S, S]``
    uint8 tensor (normalisation happens in :class:`Collator`, once per batch) and the boxes in the
    new pixels, clipped to the image (rows of NaN stay NaN).
    """

    def __init__(self, image_size: int = 64, crop: str = "center") -> None:
        if crop not in ("center", "none"):
            raise ValueError(f"crop must be 'center' or 'none', got {crop!r}")
        self.image_size, self.crop = int(image_size), crop

    def __call__(self, im, boxes: np.ndarray | None = None) -> tuple[torch.Tensor, np.ndarray]:
        from PIL import Image
        S = self.image_size
        w, h = im.size
        boxes = np.zeros((0, 4), np.float32) if boxes is None else np.asarray(boxes, np.float32).copy()
        if self.crop == "none":
            sx, sy, ox, oy = S / w, S / h, 0.0, 0.0
            if (w, h) != (S, S):
                im = im.resize((S, S), Image.BICUBIC)
        else:
            k = S / min(w, h)
            nw, nh = max(S, round(w * k)), max(S, round(h * k))
            if (nw, nh) != (w, h):
                im = im.resize((nw, nh), Image.BICUBIC)
            ox, oy = (nw - S) // 2, (nh - S) // 2
            if (nw, nh) != (S, S):
                im = im.crop((ox, oy, ox + S, oy + S))
            sx, sy = nw / w, nh / h
        if boxes.size:
            boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]] * sx - ox, 0, S)
            boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]] * sy - oy, 0, S)
        arr = np.asarray(im.convert("RGB"), np.uint8)
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))), boxes


class Collator:
    """Pads a list of samples into a batch (samples that are None, i.e. bad input, are dropped and
    counted in ``"skipped"``; a batch with no valid sample raises ``RuntimeError``).

    Output keys:

    - ``images [B, 3, S, S]`` float32, normalised with ``mean``/``std`` (or uint8 if ``normalize=False``)
    - ``input_ids [B, L]`` long: ``[BOS] words [EOS] [PAD]...``, ``L <= max_length``
    - ``attention_mask [B, L]`` bool (BOS, words, EOS), ``word_mask [B, L]`` bool (words only),
      ``eos_index [B]`` long
    - ``phrase_spans [B, P, 2]`` long token positions into ``input_ids`` (end exclusive),
      ``phrase_mask [B, P]`` bool (the phrase kept at least one token after truncation)
    - ``boxes [B, P, 4]`` float32 xyxy pixels, ``box_mask [B, P]`` bool (the phrase has a box)
    - ``shape_ids, color_ids [B, P]`` long (-1 where unknown or padding)
    - ``captions`` list[str], ``phrase_char_spans`` list[list[(start, end)]], ``index [B]`` long,
      ``skipped`` int
    """

    def __init__(self, tokenizer, max_length: int = 32, normalize: bool = True,
                 mean: tuple[float, float, float] = CLIP_MEAN, std: tuple[float, float, float] = CLIP_STD) -> None:
        if max_length < 3:
            raise ValueError("max_length must be >= 3")
        self.tok, self.max_length, self.normalize = tokenizer, int(max_length), normalize
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0

    def __call__(self, samples: list) -> dict:
        good = [s for s in samples if s is not None]
        skipped = len(samples) - len(good)
        if not good:
            raise RuntimeError(f"loupe.data: all {len(samples)} samples of this batch were bad input "
                               f"(see the warnings naming the files); nothing valid remains")
        B = len(good)
        tok = self.tok
        enc = [tok.encode(s["caption"]) for s in good]
        L = min(self.max_length, max(len(ids) for ids, _ in enc) + 2)
        nw = L - 2
        P = max(1, max(len(s["phrase_spans"]) for s in good))
        input_ids = torch.full((B, L), tok.pad_id, dtype=torch.long)
        attn = torch.zeros(B, L, dtype=torch.bool)
        word = torch.zeros(B, L, dtype=torch.bool)
        eos = torch.zeros(B, dtype=torch.long)
        spans = torch.zeros(B, P, 2, dtype=torch.long)
        pmask = torch.zeros(B, P, dtype=torch.bool)
        boxes = torch.zeros(B, P, 4, dtype=torch.float32)
        bmask = torch.zeros(B, P, dtype=torch.bool)
        shape_ids = torch.full((B, P), -1, dtype=torch.long)
        color_ids = torch.full((B, P), -1, dtype=torch.long)
        for b, (s, (ids, offs)) in enumerate(zip(good, enc)):
            n = min(len(ids), nw)
            input_ids[b, 0] = tok.bos_id
            input_ids[b, 1:n + 1] = torch.tensor(ids[:n], dtype=torch.long)
            input_ids[b, n + 1] = tok.eos_id
            attn[b, :n + 2] = True
            word[b, 1:n + 1] = True
            eos[b] = n + 1
            for p, (cs, ce) in enumerate(s["phrase_spans"]):
                inside = [j for j in range(n) if offs[j][0] < ce and offs[j][1] > cs]
                if inside:
                    spans[b, p, 0], spans[b, p, 1] = inside[0] + 1, inside[-1] + 2
                    pmask[b, p] = True
            k = len(s["phrase_spans"])
            if k:
                bx = s["boxes"].reshape(-1, 4)[:k]
                ok = torch.isfinite(bx).all(1) & (bx[:, 2] > bx[:, 0]) & (bx[:, 3] > bx[:, 1])
                boxes[b, :k] = torch.where(ok[:, None], bx, torch.zeros_like(bx))
                bmask[b, :k] = ok
                shape_ids[b, :k] = s["shape_ids"][:k]
                color_ids[b, :k] = s["color_ids"][:k]
        imgs = torch.stack([s["image"] for s in good])
        if self.normalize:
            imgs = (imgs.float() - self.mean) / self.std
        return {"images": imgs, "input_ids": input_ids, "attention_mask": attn, "word_mask": word,
                "eos_index": eos, "phrase_spans": spans, "phrase_mask": pmask, "boxes": boxes,
                "box_mask": bmask, "shape_ids": shape_ids, "color_ids": color_ids,
                "captions": [s["caption"] for s in good],
                "phrase_char_spans": [list(s["phrase_spans"]) for s in good],
                "index": torch.tensor([s["index"] for s in good], dtype=torch.long), "skipped": skipped}
