"""The formats users bring: open_clip-style CSV/TSV and WebDataset tar shards (local).

Bad input never crashes a worker and is never silently dropped: a missing file, an unreadable or
truncated image, an empty caption, a CSV without the named columns or a broken shard is skipped,
counted (``dataset.skipped`` at construction; the collator's ``"skipped"`` for images that only
fail when decoded) and named in a ``warnings.warn`` message. When nothing valid remains a
``ValueError`` is raised.

Shard layout (WebDataset): ``<key>.png|jpg|jpeg|webp`` + ``<key>.txt`` (the caption) + optional
``<key>.json``::

    {"phrases": [{"span": [start, end], "box": [x0, y0, x1, y1], "label": "red circle"}, ...],
     "image_size": [width, height]}

``span`` is a character span into the caption, ``box`` is xyxy in pixels of the stored image.
"""
from __future__ import annotations

import csv
import glob
import io
import json
import os
import re
import tarfile
import warnings

import numpy as np
import torch

from .pipeline import Preprocess
from .text import chunk_noun_phrases

__all__ = ["CsvDataset", "ShardDataset", "write_shards", "write_csv", "expand_paths"]

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


def _warn(msg: str) -> None:
    warnings.warn(f"loupe.data: {msg}", stacklevel=3)


def expand_paths(spec: str | list[str], exts: tuple[str, ...] = ("tar",)) -> list[str]:
    """A list of files from a list, a directory (its files with ``exts``), a glob pattern, a
    ``::``-separated list, or a brace range ``shard-{000..009}.tar``."""
    if isinstance(spec, (list, tuple)):
        return [p for s in spec for p in expand_paths(s, exts)]
    if "::" in spec:
        return expand_paths(spec.split("::"), exts)
    m = re.search(r"\{(\d+)\.\.(\d+)\}", spec)
    if m:
        lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
        return [p for i in range(lo, hi + 1)
                for p in expand_paths(spec[:m.start()] + str(i).zfill(width) + spec[m.end():], exts)]
    if os.path.isdir(spec):
        return sorted(os.path.join(spec, f) for f in os.listdir(spec) if f.lower().endswith(exts))
    if any(c in spec for c in "*?["):
        found = sorted(glob.glob(spec))
        return found if found else [spec]  # reported as missing by the caller
    return [spec]


class _UserDataset(torch.utils.data.Dataset):
    """Shared decode path of the user formats: items are (caption, phrases, image source)."""

    tokenizer_kind = "subword"

    def __init__(self, preprocess: Preprocess | None) -> None:
        self.preprocess = preprocess or Preprocess()
        self.items: list[dict] = []
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.items)

    def captions(self):
        """The captions of every valid item (no image decoding)."""
        for it in self.items:
            yield it["caption"]

    def _open(self, it: dict):
        raise NotImplementedError

    def __getitem__(self, i: int) -> dict | None:
        """A sample (see :func:`loupe.data.build_dataset`) or None when its image cannot be decoded
        (warned, and counted by the collator)."""
        it = self.items[i]
        from PIL import Image
        try:
            with self._open(it) as f:
                im = Image.open(f)
                im.load()
                im = im.convert("RGB")
        except Exception as e:  # unreadable, truncated, vanished
            _warn(f"skipping unreadable image {it['name']}: {type(e).__name__}: {e}")
            return None
        phrases = it["phrases"]
        boxes = np.array([p.get("box") or [np.nan] * 4 for p in phrases], np.float32).reshape(-1, 4)
        img, boxes = self.preprocess(im, boxes)
        return {"image": img, "caption": it["caption"],
                "phrase_spans": [tuple(p["span"]) for p in phrases],
                "boxes": torch.from_numpy(boxes),
                "shape_ids": torch.tensor([p.get("shape_id", -1) for p in phrases], dtype=torch.long),
                "color_ids": torch.tensor([p.get("color_id", -1) for p in phrases], dtype=torch.long),
                "index": i}

    @staticmethod
    def _phrases_from_chunker(caption: str) -> list[dict]:
        return [{"span": list(s)} for s in chunk_noun_phrases(caption)]


class CsvDataset(_UserDataset):
    """open_clip-style CSV/TSV: one row per image, ``img_key`` column (paths relative to the CSV's
    folder or absolute) and ``caption_key`` column. Phrases come from the noun-phrase chunker."""

    def __init__(self, path: str | list[str], img_key: str = "filepath", caption_key: str = "title",
                 separator: str = "\t", preprocess: Preprocess | None = None) -> None:
        super().__init__(preprocess)
        files = expand_paths(path, (".csv", ".tsv"))
        for fn in files:
            if not os.path.isfile(fn):
                _warn(f"skipping missing CSV file {fn}")
                self.skipped += 1
                continue
            with open(fn, newline="", encoding="utf-8", errors="replace") as f:
                reader = csv.DictReader(f, delimiter=separator)
                cols = reader.fieldnames or []
                if img_key not in cols or caption_key not in cols:
                    _warn(f"skipping {fn}: it has no column {img_key!r} and {caption_key!r} with "
                          f"separator {separator!r} (found {cols[:8]})")
                    self.skipped += 1
                    continue
                base = os.path.dirname(os.path.abspath(fn))
                empty = missing = 0
                example = None
                for row in reader:
                    cap = (row.get(caption_key) or "").strip()
                    rel = (row.get(img_key) or "").strip()
                    if not cap:
                        empty += 1
                        continue
                    p = rel if os.path.isabs(rel) else os.path.join(base, rel)
                    if not rel or not os.path.isfile(p):
                        missing += 1
                        example = example or p
                        continue
                    self.items.append({"path": p, "name": p, "caption": cap,
                                       "phrases": self._phrases_from_chunker(cap)})
                if empty or missing:
                    _warn(f"{fn}: skipped {empty} rows with an empty caption and {missing} rows whose "
                          f"image is missing" + (f" (e.g. {example})" if example else ""))
                self.skipped += empty + missing
        if not self.items:
            raise ValueError(f"no valid rows in {files} (columns {img_key!r}, {caption_key!r}, separator "
                             f"{separator!r}); {self.skipped} skipped, see the warnings")

    def _open(self, it):
        return open(it["path"], "rb")


class _Bytes(io.BytesIO):
    pass


class ShardDataset(_UserDataset):
    """WebDataset tar shards read locally with random access (uncompressed shards are read by
    offset; compressed ones are loaded into memory)."""

    def __init__(self, path: str | list[str], preprocess: Preprocess | None = None) -> None:
        super().__init__(preprocess)
        shards = expand_paths(path, (".tar", ".tar.gz", ".tgz"))
        for sh in shards:
            self._scan(sh)
        if not self.items:
            raise ValueError(f"no valid samples in the shards {shards[:4]}{'...' if len(shards) > 4 else ''}; "
                             f"{self.skipped} skipped, see the warnings")

    def _scan(self, sh: str) -> None:
        if not os.path.isfile(sh):
            _warn(f"skipping missing shard {sh}")
            self.skipped += 1
            return
        size = os.path.getsize(sh)
        groups: dict[str, dict] = {}
        order: list[str] = []
        error = None
        with open(sh, "rb") as f:
            magic = f.read(6)
        compressed = magic[:2] == b"\x1f\x8b" or magic[:3] == b"BZh" or magic[:6] == b"\xfd7zXZ\x00"
        try:
            with tarfile.open(sh, "r:*") as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    if not compressed and m.offset_data + m.size > size:
                        error = f"member {m.name} is truncated"
                        break
                    d, base = os.path.split(m.name)
                    if "." not in base:
                        continue
                    stem, ext = base.split(".", 1)
                    key = os.path.join(d, stem)
                    if key not in groups:
                        groups[key] = {}
                        order.append(key)
                    ext = ext.lower()
                    if compressed or ext in ("txt", "json"):
                        data = tf.extractfile(m).read()
                        if len(data) != m.size:
                            error = f"member {m.name} is truncated"
                            break
                        groups[key][ext] = data
                    else:
                        groups[key][ext] = (m.offset_data, m.size)
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            error = f"{type(e).__name__}: {e}"
        if error is not None:
            if not groups:
                _warn(f"skipping broken shard {sh}: {error}")
                self.skipped += 1
                return
            _warn(f"shard {sh} is broken ({error}); keeping the complete samples read before it")
            self.skipped += 1
            # the last group may be incomplete: drop it
            groups.pop(order.pop(), None)
        no_img = no_txt = empty = bad_json = 0
        for key in order:
            g = groups[key]
            img_ext = next((e for e in IMAGE_EXTS if e in g), None)
            if img_ext is None:
                no_img += 1
                continue
            if "txt" not in g:
                no_txt += 1
                continue
            cap = g["txt"].decode("utf-8", "replace").strip()
            if not cap:
                empty += 1
                continue
            phrases = None
            if "json" in g:
                try:
                    meta = json.loads(g["json"].decode("utf-8"))
                    phrases = [dict(p) for p in meta.get("phrases", [])]
                    for p in phrases:
                        s, e = p["span"]
                        if not 0 <= s < e <= len(cap):
                            raise ValueError(f"span {p['span']} outside the caption")
                        if p.get("box") is not None and len(p["box"]) != 4:
                            raise ValueError(f"box {p['box']} is not xyxy")
                except Exception as e:
                    bad_json += 1
                    _warn(f"{sh}: ignoring the bad {key}.json ({type(e).__name__}: {e}); using chunked phrases")
                    phrases = None
            if phrases is None:
                phrases = self._phrases_from_chunker(cap)
            self.items.append({"shard": sh, "src": g[img_ext], "name": f"{sh}:{key}.{img_ext}",
                               "caption": cap, "phrases": phrases})
        if no_img or no_txt or empty:
            _warn(f"{sh}: skipped {no_img} samples without an image, {no_txt} without a caption, "
                  f"{empty} with an empty caption")
        self.skipped += no_img + no_txt + empty

    def _open(self, it):
        src = it["src"]
        if isinstance(src, bytes):
            return _Bytes(src)
        off, n = src
        with open(it["shard"], "rb") as f:
            f.seek(off)
            data = f.read(n)
        if len(data) != n:
            raise OSError(f"shard ended after {len(data)} of {n} bytes")
        return _Bytes(data)


# ------------------------------------------------------------------------------------------------
# writers
# ------------------------------------------------------------------------------------------------
def _encode_image(chw: np.ndarray, fmt: str) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(np.asarray(chw).transpose(1, 2, 0))).save(
        buf, format={"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}[fmt],
        **({"quality": 95} if fmt in ("jpg", "jpeg") else {"lossless": True} if fmt == "webp" else {}))
    return buf.getvalue()


def _records(dataset, n: int | None):
    n = len(dataset) if n is None else min(n, len(dataset))
    for i in range(n):
        s = dataset[i]
        if s is None:
            continue
        yield i, s


def _meta(s: dict) -> dict:
    boxes = s["boxes"].tolist()
    return {"phrases": [
        {"span": list(sp), "box": (None if any(v != v for v in b) else b),
         "shape_id": int(si), "color_id": int(ci)}
        for sp, b, si, ci in zip(s["phrase_spans"], boxes, s["shape_ids"].tolist(), s["color_ids"].tolist())],
        "image_size": [int(s["image"].shape[2]), int(s["image"].shape[1])]}


def write_shards(dataset, out_dir: str, n: int | None = None, per_shard: int = 1000, fmt: str = "png",
                 prefix: str = "shard") -> list[str]:
    """Write the first ``n`` samples of ``dataset`` (any loupe dataset) as WebDataset shards
    ``out_dir/prefix-000000.tar`` ...; returns the shard paths. Deterministic bytes (fixed mtimes)."""
    os.makedirs(out_dir, exist_ok=True)
    paths, tf, count = [], None, 0

    def add(name: str, data: bytes):
        ti = tarfile.TarInfo(name)
        ti.size, ti.mtime, ti.mode = len(data), 0, 0o644
        tf.addfile(ti, io.BytesIO(data))

    try:
        for i, s in _records(dataset, n):
            if count % per_shard == 0:
                if tf is not None:
                    tf.close()
                paths.append(os.path.join(out_dir, f"{prefix}-{len(paths):06d}.tar"))
                tf = tarfile.open(paths[-1], "w", format=tarfile.USTAR_FORMAT)
            key = f"{i:08d}"
            add(f"{key}.{fmt}", _encode_image(s["image"].numpy(), fmt))
            add(f"{key}.txt", s["caption"].encode("utf-8"))
            add(f"{key}.json", json.dumps(_meta(s)).encode("utf-8"))
            count += 1
    finally:
        if tf is not None:
            tf.close()
    return paths


def write_csv(dataset, out_dir: str, n: int | None = None, separator: str = "\t", img_key: str = "filepath",
              caption_key: str = "title", fmt: str = "png") -> str:
    """Write the first ``n`` samples as image files plus an open_clip-style CSV/TSV; returns its path."""
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    path = os.path.join(out_dir, "captions.tsv" if separator == "\t" else "captions.csv")
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=separator)
        w.writerow([img_key, caption_key])
        for i, s in _records(dataset, n):
            rel = os.path.join("images", f"{i:08d}.{fmt}")
            with open(os.path.join(out_dir, rel), "wb") as g:
                g.write(_encode_image(s["image"].numpy(), fmt))
            w.writerow([rel, s["caption"]])
    return path
