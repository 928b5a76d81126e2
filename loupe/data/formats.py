"""The formats users bring: open_clip-style CSV/TSV and WebDataset tar shards (local).

Bad input never crashes a worker and is never silently dropped: a missing file, an unreadable,
truncated or oversized image, an empty caption, a CSV without the named columns, a CSV/TSV row
that is malformed (a quoted field spanning lines, too many or too few fields, a field over the
csv field limit), a shard sample whose ``.json`` sidecar is invalid, or a broken shard is
skipped, counted (``dataset.skipped`` at construction; the collator's ``"skipped"`` for samples
that only fail when decoded: an undecodable image, a box outside the decoded image) and named in
a ``warnings.warn`` message. When nothing valid remains a ``ValueError`` is raised.

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
import math
import os
import re
import tarfile
import warnings

import numpy as np
import torch

from .pipeline import Preprocess, open_image
from .text import chunk_noun_phrases

__all__ = ["CsvDataset", "ShardDataset", "write_shards", "write_csv", "expand_paths", "sample_fields",
           "decode_sample", "SampleProblem", "SKIP_KINDS"]

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


class SampleProblem(ValueError):
    """Why a sample is left out; ``kind`` is one of :data:`SKIP_KINDS`, ``str()`` the reason."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


#: the kinds of bad samples that are skipped and counted (``read_error``: a shard, or part of one,
#: that could not be read; the others name one sample)
SKIP_KINDS = ("read_error", "no_image", "no_caption", "empty_caption", "bad_json", "bad_image", "bad_box")


def decode_sample(src, name: str, caption: str, phrases: list[dict], preprocess: Preprocess,
                  index: int = -1) -> dict:
    """The sample dict (see :func:`loupe.data.build_dataset`) of an image (path, bytes or binary
    file) with its caption and validated phrases; :class:`SampleProblem` (``bad_image``: it cannot
    be decoded; ``bad_box``: a box outside the decoded image) otherwise."""
    try:
        im = open_image(src, name)
    except Exception as e:  # unreadable, truncated, vanished, too large
        raise SampleProblem("bad_image", f"unreadable image {name}: {type(e).__name__}: {e}") from None
    for p in phrases:
        why = p.get("box") is not None and _box_problem(p["box"], im.size)
        if why:
            raise SampleProblem("bad_box", f"{name}: {why}")
    boxes = np.array([p.get("box") or [np.nan] * 4 for p in phrases], np.float32).reshape(-1, 4)
    img, boxes = preprocess(im, boxes)
    return {"image": img, "caption": caption,
            "phrase_spans": [tuple(p["span"]) for p in phrases],
            "boxes": torch.from_numpy(boxes),
            "shape_ids": torch.tensor([p.get("shape_id", -1) for p in phrases], dtype=torch.long),
            "color_ids": torch.tensor([p.get("color_id", -1) for p in phrases], dtype=torch.long),
            "index": index}


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
        try:
            f = self._open(it)
        except Exception as e:  # the image's bytes could not be read (vanished, truncated)
            _warn(f"skipping unreadable image {it['name']}: {type(e).__name__}: {e}")
            return None
        with f:
            try:
                return decode_sample(f, it["name"], it["caption"], it["phrases"], self.preprocess, i)
            except SampleProblem as e:
                _warn(f"skipping {e}")
                return None

    @staticmethod
    def _phrases_from_chunker(caption: str) -> list[dict]:
        return [{"span": list(s)} for s in chunk_noun_phrases(caption)]


def _strip_eol(line: str) -> str:
    if line.endswith("\r\n"):
        return line[:-2]
    return line[:-1] if line.endswith(("\n", "\r")) else line


def _table_records(f, separator: str, problems: dict, literal: list):
    """``(line_number, fields)`` of each record of a CSV/TSV file; blank lines are left out.

    A record never silently spans lines:

    - tab separator (TSV, captions are free text): every physical line is one record. A field
      quoted within its line (``"a ""b"" c"``, as ``csv.writer`` and pandas write them) is
      unquoted; any other quote (an unmatched ``"``, text after a closing quote) is read literally
      and its line noted in ``literal``.
    - other separators (CSV): standard CSV quoting, but a record whose quoted field spans lines
      (a newline inside quotes, or an unmatched quote swallowing the lines after it) is left out
      and reported.

    A field over ``csv.field_size_limit()`` leaves its record out. Records left out go to
    ``problems[reason]`` as ``(first_line, last_line)``.
    """
    limit = csv.field_size_limit()
    too_long = f"a field over the csv field limit of {limit} characters"
    if separator == "\t":
        for n, raw in enumerate(f, 1):
            line = _strip_eol(raw)
            if not line:
                continue
            try:
                if '"' not in line:  # what csv would give, faster
                    fields = line.split(separator)
                else:
                    rows = list(csv.reader([line], delimiter=separator, strict=True))
                    fields = rows[0] if rows else [""]
            except csv.Error as e:
                fields = line.split(separator)
                if "field limit" not in str(e) and all(len(x) <= limit for x in fields):
                    literal.append(n)
            if any(len(x) > limit for x in fields):
                problems.setdefault(too_long, []).append((n, n))
                continue
            yield n, fields
        return
    reader = csv.reader(f, delimiter=separator)
    prev = 0
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            reason = too_long if "field limit" in str(e) else f"bad CSV ({e})"
            problems.setdefault(reason, []).append((prev + 1, reader.line_num))
            prev = reader.line_num
            continue
        first, last = prev + 1, reader.line_num
        prev = last
        if last > first:
            problems.setdefault("a quoted field that spans lines (an unmatched quote?)", []).append((first, last))
            continue
        if fields:
            yield first, fields


def _lines(ranges: list, k: int = 4) -> str:
    """``"line 3"``, ``"lines 3, 7-9, ..."``."""
    parts = [str(a) if a == b else f"{a}-{b}" for a, b in ranges[:k]]
    more = ", ..." if len(ranges) > k else ""
    return ("line " if len(ranges) == 1 and ranges[0][0] == ranges[0][1] else "lines ") + ", ".join(parts) + more


class CsvDataset(_UserDataset):
    """open_clip-style CSV/TSV: one row per image, ``img_key`` column (paths relative to the CSV's
    folder or absolute) and ``caption_key`` column. Phrases come from the noun-phrase chunker.

    Rows are read so that a quote never spans rows silently (see :func:`_table_records`): with
    the default tab separator each line is one row; with another separator a quoted field that
    spans lines is skipped. Rows with a field over the csv field limit, or with more or fewer
    fields than the header (a tab inside a caption), are skipped; all are counted in ``skipped``
    and named (file and line) in a warning."""

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
                problems: dict[str, list] = {}
                literal: list[int] = []
                records = _table_records(f, separator, problems, literal)
                _, cols = next(records, (0, []))
                if img_key not in cols or caption_key not in cols:
                    _warn(f"skipping {fn}: it has no column {img_key!r} and {caption_key!r} with "
                          f"separator {separator!r} (found {cols[:8]})")
                    self.skipped += 1
                    continue
                i_img, i_cap = cols.index(img_key), cols.index(caption_key)
                base = os.path.dirname(os.path.abspath(fn))
                empty = missing = 0
                example = None
                for n, row in records:
                    if len(row) != len(cols):
                        hint = " (a separator inside a caption?)" if len(row) > len(cols) else ""
                        problems.setdefault(f"a wrong number of fields{hint}", []).append((n, n))
                        continue
                    cap = row[i_cap].strip()
                    rel = row[i_img].strip()
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
                if problems:
                    lost = sum(b - a + 1 for r in problems.values() for a, b in r)
                    _warn(f"{fn}: skipped {lost} lines: " + "; ".join(
                        f"{len(r)} records with {why} ({_lines(r)})" for why, r in problems.items()))
                    self.skipped += lost
                if literal:
                    _warn(f"{fn}: read {len(literal)} rows with an unmatched quote literally (a TSV "
                          f"field is quoted only within its line; {_lines([(n, n) for n in literal])})")
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


_BOX_EPS = 1e-3  # pixels: float rounding allowed past the image border


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def _box_problem(box, size=None) -> str | None:
    """Why ``box`` is not a valid xyxy pixel box inside an image of ``size = (w, h)`` (None: size
    unknown, only ``x0, y0 >= 0`` checked), or None when it is."""
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        return f"box {box!r} is not [x0, y0, x1, y1]"
    if not all(_is_num(v) for v in box):
        return f"box {box!r} does not hold 4 finite numbers"
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x0 < x1 and y0 < y1):
        return f"box {box!r} is empty or inverted (needs x0 < x1 and y0 < y1)"
    if x0 < -_BOX_EPS or y0 < -_BOX_EPS:
        return f"box {box!r} has negative coordinates"
    if size is not None and (x1 > size[0] + _BOX_EPS or y1 > size[1] + _BOX_EPS):
        return f"box {box!r} is outside the image of {size[0]}x{size[1]} pixels"
    return None


def _sidecar_phrases(raw: bytes, caption: str) -> list[dict]:
    """The phrases of a shard's ``.json`` sidecar, fully validated; ``ValueError`` saying what is
    wrong otherwise. Checked: a JSON object; ``image_size`` (optional) two positive integers;
    ``phrases`` a list of objects with ``span`` two integers ``0 <= start < end <= len(caption)``,
    ``box`` null or 4 finite numbers with ``x0 < x1``, ``y0 < y1``, ``x0, y0 >= 0`` and inside
    ``image_size`` when given (against the decoded image otherwise, in ``__getitem__``),
    ``shape_id``/``color_id`` (optional) integers."""
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"not JSON ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"not a JSON object but {type(meta).__name__}")
    size = meta.get("image_size")
    if size is not None:
        if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) and v > 0 for v in size)):
            raise ValueError(f"image_size {size!r} is not [width, height]")
    phrases = meta.get("phrases", [])
    if not isinstance(phrases, list):
        raise ValueError(f"phrases is not a list but {type(phrases).__name__}")
    out = []
    for k, p in enumerate(phrases):
        if not isinstance(p, dict):
            raise ValueError(f"phrase {k} is not an object")
        sp = p.get("span")
        if not (isinstance(sp, list) and len(sp) == 2 and all(_is_int(v) for v in sp)):
            raise ValueError(f"phrase {k}: span {sp!r} is not [start, end] integers")
        if not 0 <= sp[0] < sp[1] <= len(caption):
            raise ValueError(f"phrase {k}: span {sp} outside the caption ({len(caption)} characters)")
        if p.get("box") is not None:
            why = _box_problem(p["box"], size)
            if why:
                raise ValueError(f"phrase {k}: {why}")
        for idk in ("shape_id", "color_id"):
            if idk in p and not (_is_int(p[idk]) and -1 <= p[idk] < 2 ** 31):
                raise ValueError(f"phrase {k}: {idk} {p[idk]!r} is not an integer >= -1")
        out.append(dict(p))
    return out


def sample_fields(group: dict) -> tuple[str, str, list[dict]]:
    """Validate one shard sample, ``group`` = its members by extension (lower case; ``txt`` and
    ``json`` as bytes, the image as anything): returns ``(image extension, caption, phrases)``, or
    raises :class:`SampleProblem` (``no_image``, ``no_caption``, ``empty_caption``, ``bad_json``
    with :func:`_sidecar_phrases`'s reason). Without a ``.json`` sidecar the phrases come from the
    noun-phrase chunker. Shared by :class:`ShardDataset` (at scan time) and the streaming reader."""
    img_ext = next((e for e in IMAGE_EXTS if e in group), None)
    if img_ext is None:
        raise SampleProblem("no_image", "no image")
    if "txt" not in group:
        raise SampleProblem("no_caption", "no caption")
    cap = bytes(group["txt"]).decode("utf-8", "replace").strip()
    if not cap:
        raise SampleProblem("empty_caption", "empty caption")
    if "json" not in group:
        return img_ext, cap, _UserDataset._phrases_from_chunker(cap)
    try:
        return img_ext, cap, _sidecar_phrases(bytes(group["json"]), cap)
    except ValueError as e:
        raise SampleProblem("bad_json", str(e)) from None


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
        no_img = no_txt = empty = 0
        bad_json: list[str] = []
        for key in order:
            try:
                img_ext, cap, phrases = sample_fields(groups[key])
            except SampleProblem as e:
                if e.kind == "bad_json":
                    bad_json.append(f"{key}.json: {e}")
                else:
                    no_img += e.kind == "no_image"
                    no_txt += e.kind == "no_caption"
                    empty += e.kind == "empty_caption"
                continue
            self.items.append({"shard": sh, "src": groups[key][img_ext], "name": f"{sh}:{key}.{img_ext}",
                               "caption": cap, "phrases": phrases})
        if no_img or no_txt or empty:
            _warn(f"{sh}: skipped {no_img} samples without an image, {no_txt} without a caption, "
                  f"{empty} with an empty caption")
        if bad_json:
            _warn(f"{sh}: skipped {len(bad_json)} samples with an invalid .json sidecar ("
                  + "; ".join(bad_json[:3]) + ("; ..." if len(bad_json) > 3 else "") + ")")
        self.skipped += no_img + no_txt + empty + len(bad_json)

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
