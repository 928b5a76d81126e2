"""Command line: ``python -m loupe.data {preview,bench,oracle,write-shards,write-csv} ...``.

- ``preview --dataset-type synthetic --out FILE.png``: a PNG grid of samples with boxes and phrases.
- ``bench --n 100000 --workers 2``: generation speed (images per second, full samples).
- ``oracle --n 5000``: whole-patch oracle grounding accuracy (IoU >= 0.5).
- ``write-shards --out DIR --n 5000``: any set as WebDataset shards (``write-csv`` likewise).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time

import numpy as np

PALETTE = [(255, 64, 64), (64, 220, 64), (80, 140, 255), (255, 200, 0), (255, 0, 255), (0, 230, 230)]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset-type", default="synthetic",
                   choices=("synthetic", "fashion", "emoji", "csv", "webdataset"))
    p.add_argument("--split", default="train")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--path", default=None, help="CSV/TSV file or shards (csv, webdataset)")
    p.add_argument("--image-size", type=int, default=64)


def _int_at_least(lo: int):
    def parse(v: str) -> int:
        try:
            n = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{v!r} is not an integer") from None
        if n < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {n}")
        return n
    parse.__name__ = f"integer >= {lo}"
    return parse


def _build(args, size=None):
    from . import build_dataset
    try:
        return build_dataset(args.dataset_type, args.split, seed=args.seed, size=size, path=args.path,
                             image_size=args.image_size)
    except (ValueError, FileNotFoundError) as e:  # no valid data, a missing package: a message, no traceback
        raise SystemExit(f"python -m loupe.data {args.cmd}: {e}") from None


def _draw_box(draw, box, x, y, scale, col, label, font) -> None:
    """One box (any corner order; non-finite boxes are not drawn)."""
    if not all(math.isfinite(v) for v in box):
        return
    x0, x1 = sorted((box[0], box[2]))
    y0, y1 = sorted((box[1], box[3]))
    x0, y0, x1, y1 = x + x0 * scale, y + y0 * scale, x + x1 * scale - 1, y + y1 * scale - 1
    draw.rectangle([x0, y0, max(x0, x1), max(y0, y1)], outline=col, width=2)
    draw.text((x0 + 2, y0 + 1), label, fill=col, font=font)


def preview(args) -> int:
    from PIL import Image, ImageDraw, ImageFont
    ds = _build(args, size=max(args.n, 1) if args.dataset_type not in ("csv", "webdataset") else None)
    scale, cols = args.scale, args.cols
    S = args.image_size * scale
    text_h = 62
    rows = (args.n + cols - 1) // cols
    sheet = Image.new("RGB", (cols * (S + 8) + 8, rows * (S + text_h + 8) + 8), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    drawn = 0
    for k in range(min(args.n, len(ds))):
        s = ds[k]
        if s is None:  # unreadable (warned): its cell stays empty
            continue
        r, c = divmod(k, cols)
        x, y = 8 + c * (S + 8), 8 + r * (S + text_h + 8)
        im = Image.fromarray(np.ascontiguousarray(s["image"].numpy().transpose(1, 2, 0)))
        sheet.paste(im.resize((S, S), Image.NEAREST), (x, y))
        for j, box in enumerate(s["boxes"].tolist()[:len(s["phrase_spans"])]):
            _draw_box(draw, box, x, y, scale, PALETTE[j % len(PALETTE)], str(j), font)
        cap = s["caption"]
        # caption wrapped under the image (any whitespace, newlines included, separates words),
        # each phrase in its box colour
        cx, cy = x, y + S + 3
        for m in re.finditer(r"\S+", cap):
            word, start = m.group(), m.start()
            j = next((j for j, (a, b) in enumerate(s["phrase_spans"]) if a <= start < b), None)
            col = (0, 0, 0) if j is None else tuple(int(v * 0.8) for v in PALETTE[j % len(PALETTE)])
            wlen = draw.textlength(word + " ", font=font)
            if cx + wlen > x + S and cx > x:
                cx, cy = x, cy + 12
            if cy < y + S + text_h - 10:
                draw.text((cx, cy), word, fill=col, font=font)
            cx += wlen
        drawn += 1
    sheet.save(args.out)
    n = min(args.n, len(ds))
    bad = f" ({n - drawn} unreadable, left empty)" if drawn < n else ""
    print(f"wrote {args.out}: {drawn} {args.dataset_type} {args.split} samples{bad}")
    return 0


def _bench_worker(a):
    from . import build_dataset
    dtype, split, seed, lo, hi = a
    ds = build_dataset(dtype, split, seed=seed, size=hi)
    acc = 0
    for i in range(lo, hi):
        acc += int(ds[i]["image"][0, 0, 0])
    return hi - lo


def bench(args) -> int:
    import multiprocessing as mp
    n, w = args.n, args.workers
    chunks = [(args.dataset_type, args.split, args.seed, n * k // w, n * (k + 1) // w) for k in range(w)]
    t0 = time.perf_counter()
    if w == 1:
        done = _bench_worker(chunks[0])
    else:
        with mp.get_context("fork").Pool(w) as pool:
            done = sum(pool.map(_bench_worker, chunks))
    dt = time.perf_counter() - t0
    print(json.dumps({"dataset_type": args.dataset_type, "images": done, "workers": w, "seconds": round(dt, 2),
                      "images_per_s": round(done / dt)}))
    return 0


def oracle(args) -> int:
    from . import oracle_grounding
    ds = _build(args, size=args.n)
    r = oracle_grounding(ds, args.n)
    r.update(dataset_type=args.dataset_type, split=args.split, scenes=args.n)
    print(json.dumps(r))
    return 0


def write(args) -> int:
    from . import write_csv, write_shards
    ds = _build(args, size=args.n if args.dataset_type not in ("csv", "webdataset") else None)
    if args.cmd == "write-shards":
        paths = write_shards(ds, args.out, n=args.n, per_shard=args.per_shard, fmt=args.format)
        print(f"wrote {len(paths)} shards to {args.out}")
    else:
        print(f"wrote {write_csv(ds, args.out, n=args.n, fmt=args.format)}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m loupe.data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("preview", help="PNG grid of samples with boxes and phrases")
    _common(q)
    q.add_argument("--out", required=True)
    q.add_argument("--n", type=_int_at_least(0), default=12)
    q.add_argument("--cols", type=_int_at_least(1), default=4)
    q.add_argument("--scale", type=_int_at_least(1), default=4)
    q.set_defaults(func=preview)
    q = sub.add_parser("bench", help="generation speed")
    _common(q)
    q.add_argument("--n", type=int, default=100000)
    q.add_argument("--workers", type=int, default=2)
    q.set_defaults(func=bench)
    q = sub.add_parser("oracle", help="whole-patch oracle grounding accuracy")
    _common(q)
    q.add_argument("--n", type=int, default=5000)
    q.set_defaults(func=oracle)
    for name in ("write-shards", "write-csv"):
        q = sub.add_parser(name, help=f"{name.split('-')[1]} of any set")
        _common(q)
        q.add_argument("--out", required=True)
        q.add_argument("--n", type=int, default=1000)
        q.add_argument("--per-shard", type=int, default=1000)
        q.add_argument("--format", default="png", choices=("png", "jpg", "webp"))
        q.set_defaults(func=write)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
