"""Issue 21, data items: nothing lost, nothing silent.

5. CSV/TSV: a quote never spans rows silently; an over-long field or a tab inside a caption is one
   reported row, not a failed or silently wrong dataset.
6. Shard sidecar JSON validated at scan time (bad samples skipped and counted); boxes checked
   against the decoded image; ``preview`` survives inverted boxes, multi-line captions, --cols 0.
7. ``open_image``: 16-bit images scaled, not white; oversized images a clear ValueError.
"""
import csv
import io
import json
import struct
import tarfile
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import loupe.data as ld
from loupe.data import __main__ as cli
from loupe.data.pipeline import open_image


def _png_bytes(arr_or_im) -> bytes:
    im = arr_or_im if isinstance(arr_or_im, Image.Image) else Image.fromarray(arr_or_im)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _images(tmp_path, n, size=32):
    d = tmp_path / "images"
    d.mkdir(exist_ok=True)
    names = []
    for i in range(n):
        Image.new("RGB", (size, size), (10 * i, 20, 30)).save(d / f"{i}.png")
        names.append(f"images/{i}.png")
    return names


def _caps(ds):
    return [it["caption"] for it in ds.items]


# ------------------------------------------------------------------------------------------------
# 5. CSV / TSV
# ------------------------------------------------------------------------------------------------
def test_tsv_unmatched_quote_does_not_swallow_rows(tmp_path):
    imgs = _images(tmp_path, 4)
    caps = ["a red circle", '"a big dog on the grass', "a blue square", 'a cat said "hi']
    p = tmp_path / "q.tsv"
    p.write_text("filepath\ttitle\n" + "".join(f"{a}\t{c}\n" for a, c in zip(imgs, caps)))
    with pytest.warns(UserWarning, match=r"q.tsv: read 1 rows with an unmatched quote literally .*line 3"):
        ds = ld.build_dataset("csv", path=str(p))
    assert len(ds) == 4 and ds.skipped == 0
    assert _caps(ds) == caps  # the quote is text, the rows after it are all there


def test_tsv_quoted_fields_within_a_line_still_read(tmp_path):
    """What csv.writer / pandas write (a field quoted on its own line) reads as before."""
    imgs = _images(tmp_path, 3)
    caps = ['he said "hi" to a red circle', "a tab\tinside quotes", "plain caption"]
    p = tmp_path / "w.tsv"
    with open(p, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["filepath", "title"])
        w.writerows(zip(imgs, caps))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = ld.build_dataset("csv", path=str(p))
    assert _caps(ds) == caps and ds.skipped == 0


def test_tsv_tab_in_caption_and_short_rows_reported(tmp_path):
    imgs = _images(tmp_path, 4)
    p = tmp_path / "t.tsv"
    p.write_text("filepath\ttitle\n"
                 f"{imgs[0]}\ta red circle\n"
                 f"{imgs[1]}\ta caption\twith a tab\n"   # line 3: 3 fields
                 f"{imgs[2]}\n"                           # line 4: 1 field
                 f"\n"                                    # blank: ignored
                 f"{imgs[3]}\ta blue square\n")
    with pytest.warns(UserWarning) as rec:
        ds = ld.build_dataset("csv", path=str(p))
    msgs = " | ".join(str(w.message) for w in rec)
    assert "t.tsv: skipped 2 lines" in msgs and "a separator inside a caption?" in msgs
    assert "line 3" in msgs and "line 4" in msgs
    assert _caps(ds) == ["a red circle", "a blue square"] and ds.skipped == 2


@pytest.mark.parametrize("sep", ["\t", ","])
def test_field_over_the_csv_limit_is_one_skipped_row(tmp_path, sep):
    imgs = _images(tmp_path, 3)
    huge = "a red circle " * (csv.field_size_limit() // 13 + 10)
    p = tmp_path / ("long.tsv" if sep == "\t" else "long.csv")
    with open(p, "w", newline="") as f:
        f.write(f"filepath{sep}title\n{imgs[0]}{sep}first\n{imgs[1]}{sep}{huge}\n{imgs[2]}{sep}third\n")
    with pytest.warns(UserWarning, match=r"over the csv field limit .*line 3"):
        ds = ld.build_dataset("csv", path=str(p), separator=sep)
    assert _caps(ds) == ["first", "third"] and ds.skipped == 1


def test_csv_field_spanning_lines_reported(tmp_path):
    imgs = _images(tmp_path, 6)
    p = tmp_path / "span.csv"
    p.write_text("filepath,title\n"
                 f"{imgs[0]},a red circle\n"
                 f'{imgs[1]},"a caption on\ntwo lines"\n'          # lines 3-4: a real multi-line field
                 f"{imgs[2]},a green square\n"
                 f'{imgs[3]},"an unmatched quote\n'                 # lines 6-8: swallows the rest,
                 f"{imgs[4]},a blue triangle\n"                     # but counted and named
                 f"{imgs[5]},a yellow star\n")
    with pytest.warns(UserWarning) as rec:
        ds = ld.build_dataset("csv", path=str(p), separator=",")
    msgs = " | ".join(str(w.message) for w in rec)
    assert "span.csv: skipped 5 lines: 2 records with a quoted field that spans lines" in msgs
    assert "lines 3-4, 6-8" in msgs
    assert _caps(ds) == ["a red circle", "a green square"] and ds.skipped == 5


def test_csv_good_quoting_unchanged(tmp_path):
    imgs = _images(tmp_path, 2)
    p = tmp_path / "ok.csv"
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "title"])
        w.writerows([(imgs[0], 'a "red", big circle'), (imgs[1], "two, commas, here")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = ld.build_dataset("csv", path=str(p), separator=",")
    assert _caps(ds) == ['a "red", big circle', "two, commas, here"] and ds.skipped == 0


# ------------------------------------------------------------------------------------------------
# 6. shard sidecars, preview
# ------------------------------------------------------------------------------------------------
def _add(tf, name, data):
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))


def _shard(path, samples, size=64):
    """samples: (key, caption, json object or raw bytes or None)."""
    png = _png_bytes(Image.new("RGB", (size, size), (200, 30, 30)))
    with tarfile.open(path, "w") as tf:
        for key, cap, meta in samples:
            _add(tf, f"{key}.png", png)
            _add(tf, f"{key}.txt", cap.encode())
            if meta is not None:
                _add(tf, f"{key}.json", meta if isinstance(meta, bytes) else json.dumps(meta).encode())
    return str(path)


def _ph(box, span=(0, 5), **kw):
    return {"phrases": [{"span": list(span), "box": box, **kw}], **({"image_size": [64, 64]})}


BAD_SIDECARS = {
    "strings": _ph(["a", "b", "c", "d"]),
    "three": _ph([1, 2, 3]),
    "nan": b'{"phrases": [{"span": [0, 5], "box": [NaN, 1, 2, 3]}]}',
    "inf": b'{"phrases": [{"span": [0, 5], "box": [0, 1, Infinity, 3]}]}',
    "bool": _ph([0, 0, True, 4]),
    "inverted": _ph([30, 30, 10, 40]),
    "flat": _ph([10, 30, 20, 30]),
    "negative": _ph([-5, 0, 10, 10]),
    "outside": _ph([0, 0, 65, 10]),
    "span_out": _ph([0, 0, 10, 10], span=(0, 99)),
    "span_str": {"phrases": [{"span": ["0", "5"], "box": None}]},
    "span_rev": _ph(None, span=(5, 2)),
    "no_span": {"phrases": [{"box": [0, 0, 1, 1]}]},
    "list": b"[1, 2]",
    "phr_dict": {"phrases": {"span": [0, 5]}},
    "phr_str": {"phrases": ["red"]},
    "size_bad": {"phrases": [], "image_size": [64]},
    "shape_str": _ph([0, 0, 10, 10], shape_id="circle"),
    "huge_int": b'{"phrases": [{"span": [0, 5], "box": [0, 0, 1' + b"0" * 400 + b', 3]}]}',
    "not_json": b"{broken",
    "latin1": b'{"phrases": [], "x": "\xff"}',
}


def test_bad_sidecars_skipped_and_counted_at_scan(tmp_path):
    good = [("g0", "a red circle", _ph([1, 2, 30, 40])),
            ("g1", "a red circle", {"phrases": [{"span": [2, 12], "box": None}]}),
            ("g2", "a red circle", None),  # no sidecar: chunked phrases
            ("g3", "a red circle", {"phrases": [{"span": [0, 5], "box": [0.0, 0, 64, 64]}], "image_size": [64, 64]})]
    bad = [(k, "a red circle", m) for k, m in BAD_SIDECARS.items()]
    path = _shard(tmp_path / "s.tar", good[:2] + bad + good[2:])
    with pytest.warns(UserWarning) as rec:
        ds = ld.build_dataset("webdataset", path=path)
    msgs = " | ".join(str(w.message) for w in rec)
    assert f"skipped {len(bad)} samples with an invalid .json sidecar" in msgs
    assert "strings.json: phrase 0: box ['a', 'b', 'c', 'd'] does not hold 4 finite numbers" in msgs
    assert len(ds) == len(good) and ds.skipped == len(bad)
    assert [it["name"].rsplit(":", 1)[1] for it in ds.items] == [f"{k}.png" for k, _, _ in good]
    # everything kept decodes and trains: a 2-process loader over the whole set, nothing skipped later
    tok = ld.fit_tokenizer(ds, vocab_size=100, min_frequency=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=ld.Collator(tok), num_workers=2)
        batches = list(loader)
    assert sum(b["images"].shape[0] for b in batches) == len(good)
    assert sum(b["skipped"] for b in batches) == 0
    assert sum(int(b["box_mask"].sum()) for b in batches) == 2


def test_box_outside_the_decoded_image_skipped_when_decoded(tmp_path):
    # no image_size in the sidecar: the scan cannot know the image is 64x64
    path = _shard(tmp_path / "s.tar", [("a", "a red circle", {"phrases": [{"span": [0, 5], "box": [0, 0, 100, 20]}]}),
                                       ("b", "a red circle", {"phrases": [{"span": [0, 5], "box": [0, 0, 64, 20]}]})])
    ds = ld.build_dataset("webdataset", path=path)
    assert len(ds) == 2 and ds.skipped == 0
    with pytest.warns(UserWarning, match=r"s.tar:a.png: box \[0, 0, 100, 20\] is outside the image of 64x64"):
        assert ds[0] is None
    assert ds[1] is not None
    tok = ld.fit_tokenizer(ds, vocab_size=100, min_frequency=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = ld.Collator(tok)([ds[0], ds[1]])
    assert batch["skipped"] == 1 and batch["images"].shape[0] == 1


def test_preview_inverted_box_newline_caption(tmp_path, capsys):
    path = _shard(tmp_path / "s.tar", [
        ("a", "a red circle", {"phrases": [{"span": [0, 5], "box": [40, 40, 10, 10]}], "image_size": [64, 64]}),
        ("b", "a red\ncircle and\n\na blue one", {"phrases": [{"span": [2, 12], "box": [1, 1, 20, 20]}]}),
        ("c", "a tiny box", {"phrases": [{"span": [0, 6], "box": [3, 3, 3.1, 3.1]}]}),
    ])
    out = tmp_path / "p.png"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(["preview", "--dataset-type", "webdataset", "--path", path, "--out", str(out),
                         "--n", "4", "--cols", "2"]) == 0
    assert Image.open(out).size[0] > 0
    assert "2 webdataset train samples" in capsys.readouterr().out


def test_preview_draws_what_it_can(tmp_path, monkeypatch, capsys):
    """Samples that reach the drawing code with odd boxes (inverted, NaN, inf) and captions."""
    good = ld.build_dataset("synthetic", "test", size=3)
    samples = []
    for i, (box, cap) in enumerate([([40.0, 40, 10, 10], "line one\nline two"),
                                    ([float("nan")] * 4, "  spaced   out\t\tcaption "),
                                    ([0, 0, float("inf"), 5], "")]):
        s = dict(good[i])
        s["caption"], s["phrase_spans"], s["boxes"] = cap, [(0, 4)], torch.tensor([box])
        samples.append(s)
    samples.append(None)  # unreadable
    monkeypatch.setattr(cli, "_build", lambda args, size=None: samples)
    out = tmp_path / "p.png"
    assert cli.main(["preview", "--out", str(out), "--n", "4", "--cols", "3"]) == 0
    assert out.exists() and "3 synthetic train samples (1 unreadable, left empty)" in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["--cols", "--scale"])
def test_preview_cols_zero_is_an_argparse_error(tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as e:
        cli.main(["preview", "--out", str(tmp_path / "p.png"), flag, "0"])
    assert e.value.code == 2 and f"argument {flag}: must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()


def test_preview_no_valid_data_is_a_message(tmp_path):
    path = _shard(tmp_path / "s.tar", [("a", "a red circle", {"phrases": "bad"})])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(SystemExit, match="no valid samples"):
            cli.main(["preview", "--dataset-type", "webdataset", "--path", path, "--out", str(tmp_path / "p.png")])


# ------------------------------------------------------------------------------------------------
# 7. open_image
# ------------------------------------------------------------------------------------------------
def test_16bit_png_scaled_not_white(tmp_path):
    k = np.arange(256, dtype=np.uint16).reshape(16, 16)
    p = tmp_path / "g16.png"
    p.write_bytes(_png_bytes(k * 257))  # 16-bit greyscale, full range
    assert Image.open(p).mode.startswith("I")
    im = open_image(str(p))
    assert im.mode == "RGB" and im.size == (16, 16)
    a = np.asarray(im)
    assert np.array_equal(a[..., 0], k.astype(np.uint8)) and np.array_equal(a[..., 0], a[..., 2])
    # the same through a CSV dataset (the path every user format takes)
    (tmp_path / "c.tsv").write_text("filepath\ttitle\ng16.png\ta grey ramp\n")
    ds = ld.build_dataset("csv", path=str(tmp_path / "c.tsv"), image_size=16)
    img = ds[0]["image"]
    assert torch.equal(img[0], torch.from_numpy(k.astype(np.uint8)))


def test_wide_modes_scaled_by_their_range():
    from loupe.data.pipeline import _to_rgb
    k = np.arange(256).reshape(16, 16)
    assert np.array_equal(np.asarray(_to_rgb(Image.fromarray((k * 257).astype(np.int32))))[..., 1], k)  # "I"
    assert np.array_equal(np.asarray(_to_rgb(Image.fromarray((k / 255).astype(np.float32))))[..., 1], k)  # "F"
    f = (k * 1000.0 - 5).astype(np.float32)
    f[0, 0] = np.nan
    g = np.asarray(_to_rgb(Image.fromarray(f)))[..., 0]
    assert g[0, 0] == 0 and g[-1, -1] == 255 and g[0, 1] < g[0, 2]  # min..max, NaN -> 0


def test_8bit_modes_unchanged():
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (9, 7, 4), dtype=np.uint8), "RGBA")
    for im in (rgba, rgba.convert("RGB"), rgba.convert("L"), rgba.convert("LA"), rgba.convert("1"),
               rgba.convert("RGB").convert("P"), rgba.convert("CMYK")):
        for src in (_png_bytes(im) if im.mode != "CMYK" else None, im):
            if src is None:
                continue
            if isinstance(src, Image.Image):
                buf = io.BytesIO()
                src.save(buf, format="TIFF")
                src = buf.getvalue()
            ref = Image.open(io.BytesIO(src)).convert("RGB")
            got = open_image(src)
            assert got.mode == "RGB" and np.array_equal(np.asarray(got), np.asarray(ref)), im.mode


def _bilevel_png(w: int, h: int) -> bytes:
    """A real, valid 1-bit PNG of w x h white pixels, written without holding it in memory."""
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    c = zlib.compressobj(9)
    row = b"\x00" + b"\xff" * ((w + 7) // 8)
    idat = b"".join(c.compress(row) for _ in range(h)) + c.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_oversized_image_is_a_clear_value_error(tmp_path):
    p = tmp_path / "huge.png"
    p.write_bytes(_bilevel_png(16000, 16000))
    with pytest.raises(ValueError, match=rf"huge.png: image too large .*MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS}"):
        open_image(str(p))
    with open(p, "rb") as f, pytest.raises(ValueError, match="huge.png"):
        open_image(f)
    with pytest.raises(ValueError, match="my-name"):
        open_image(p.read_bytes(), name="my-name")
    # in a dataset: one unreadable sample, warned with the limit, not a crash
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "c.tsv").write_text("filepath\ttitle\nhuge.png\ta white page\nok.png\ta black square\n")
    ds = ld.build_dataset("csv", path=str(tmp_path / "c.tsv"))
    with pytest.warns(UserWarning, match="huge.png: image too large"):
        assert ds[0] is None
    assert ds[1] is not None


def test_pixel_limit_between_the_warning_and_the_error(tmp_path, monkeypatch):
    """PIL only warns up to twice MAX_IMAGE_PIXELS; open_image refuses anything over it."""
    p = tmp_path / "mid.png"
    p.write_bytes(_bilevel_png(150, 100))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"mid.png: image too large \(150x100 = 15000 pixels\).*= 10000 pixels"):
            open_image(p)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 15_000)
    assert open_image(p).size == (150, 100)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert np.asarray(open_image(p)).min() == 255
