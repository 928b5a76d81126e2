"""CSV/TSV and WebDataset shards: round trips, preprocessing, and every kind of bad input."""
import csv
import io
import tarfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import loupe.data as ld


@pytest.fixture(scope="module")
def synth():
    return ld.build_dataset("synthetic", "test", seed=0, size=24)


def _rows(path, sep="\t"):
    with open(path, newline="") as f:
        return list(csv.reader(f, delimiter=sep))


def test_shard_round_trip(tmp_path, synth):
    paths = ld.write_shards(synth, str(tmp_path), per_shard=10)
    assert len(paths) == 3
    again = ld.write_shards(synth, str(tmp_path / "again"), per_shard=10)
    assert open(paths[0], "rb").read() == open(again[0], "rb").read()  # deterministic bytes
    ds = ld.build_dataset("webdataset", "train", path=str(tmp_path))
    assert len(ds) == 24 and ds.skipped == 0
    for i in range(24):
        a, b = synth[i], ds[i]
        assert torch.equal(a["image"], b["image"])  # png is lossless, 64x64 needs no resize
        assert a["caption"] == b["caption"] and list(a["phrase_spans"]) == b["phrase_spans"]
        assert torch.equal(a["boxes"], b["boxes"])
        assert torch.equal(a["shape_ids"], b["shape_ids"]) and torch.equal(a["color_ids"], b["color_ids"])
    # brace ranges and globs name the same shards
    assert len(ld.build_dataset("webdataset", path=str(tmp_path / "shard-{000000..000002}.tar"))) == 24
    assert len(ld.build_dataset("webdataset", path=str(tmp_path / "shard-00000[01].tar"))) == 20
    tok = ld.fit_tokenizer(ds, vocab_size=300, min_frequency=1)
    batch = ld.Collator(tok)([ds[i] for i in range(8)])
    assert batch["box_mask"].sum() == sum(len(ds[i]["phrase_spans"]) for i in range(8))


def test_csv_round_trip_and_chunked_phrases(tmp_path, synth):
    path = ld.write_csv(synth, str(tmp_path), n=12)
    ds = ld.build_dataset("csv", "train", path=path, img_key="filepath", caption_key="title", separator="\t")
    assert len(ds) == 12 and ds.skipped == 0
    for i in range(12):
        a, b = synth[i], ds[i]
        assert torch.equal(a["image"], b["image"]) and a["caption"] == b["caption"]
        # no boxes in a CSV: phrases come from the chunker and include the generator's phrases
        assert set(map(tuple, a["phrase_spans"])) <= set(b["phrase_spans"])
        assert torch.isnan(b["boxes"]).all()
    assert ds.tokenizer_kind == "subword"
    # configurable keys and separator
    rows = _rows(path)
    alt = tmp_path / "alt.csv"
    with open(alt, "w", newline="") as f:
        w = csv.writer(f, delimiter=",")
        w.writerow(["caption", "img"])
        for r in rows[1:]:
            w.writerow([r[1], r[0]])
    ds2 = ld.build_dataset("csv", path=str(alt), img_key="img", caption_key="caption", separator=",")
    assert len(ds2) == 12 and torch.equal(ds2[3]["image"], synth[3]["image"])


def test_preprocess_resize_crop_boxes():
    im = Image.new("RGB", (200, 100), (0, 0, 0))
    im.paste((255, 0, 0), (100, 20, 140, 60))
    img, boxes = ld.Preprocess(64, "center")(im, np.array([[100, 20, 140, 60]], np.float32))
    assert img.shape == (3, 64, 64) and img.dtype == torch.uint8
    # scale 0.64, offset (128-64)/2 = 32 -> x 32..57.6, y 12.8..38.4
    np.testing.assert_allclose(boxes[0], [32, 12.8, 57.6, 38.4], atol=1e-4)
    red = (img[0] > 128) & (img[1] < 64)
    ys, xs = torch.nonzero(red, as_tuple=True)
    assert abs(xs.min().item() - 32) <= 1 and abs(xs.max().item() + 1 - 57.6) <= 1
    img2, boxes2 = ld.Preprocess(64, "none")(im, np.array([[100, 20, 140, 60]], np.float32))
    np.testing.assert_allclose(boxes2[0], [32, 12.8, 44.8, 38.4], atol=1e-4)
    # boxes cropped away are clipped to the image
    _, b3 = ld.Preprocess(64, "center")(im, np.array([[0, 0, 20, 20]], np.float32))
    assert b3[0, 2] == 0


def _write_csv(path, rows, header=("filepath", "title"), sep="\t"):
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter=sep)
        w.writerow(header)
        w.writerows(rows)


def test_csv_bad_input(tmp_path, synth):
    src = ld.write_csv(synth, str(tmp_path), n=6)
    rows = _rows(src)[1:]
    # truncated and non-image files
    good = tmp_path / rows[0][0]
    trunc = tmp_path / "images" / "trunc.png"
    trunc.write_bytes(good.read_bytes()[:100])
    junk = tmp_path / "images" / "junk.png"
    junk.write_bytes(b"not an image at all")
    bad = tmp_path / "bad.tsv"
    _write_csv(bad, rows[:4] + [["images/missing.png", "a cat"], [rows[4][0], "   "],
                                 ["images/trunc.png", "a truncated dog"], ["images/junk.png", "junk"]])
    with pytest.warns(UserWarning) as rec:
        ds = ld.build_dataset("csv", path=str(bad))
    msgs = " ".join(str(w.message) for w in rec)
    assert "bad.tsv" in msgs and "1 rows with an empty caption" in msgs and "1 rows whose image is missing" in msgs
    assert "missing.png" in msgs
    assert len(ds) == 6 and ds.skipped == 2
    with pytest.warns(UserWarning, match="trunc.png"):
        assert ds[4] is None
    with pytest.warns(UserWarning, match="junk.png"):
        assert ds[5] is None
    tok = ld.fit_tokenizer(ds, vocab_size=200, min_frequency=1)
    col = ld.Collator(tok)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loader = torch.utils.data.DataLoader(ds, batch_size=6, collate_fn=col, num_workers=1)
        (batch,) = list(loader)
    assert batch["skipped"] == 2 and batch["images"].shape[0] == 4
    # a CSV without the named columns: skipped with a warning, an error when nothing else remains
    nocol = tmp_path / "nocol.tsv"
    _write_csv(nocol, rows, header=("path", "text"))
    with pytest.warns(UserWarning, match="nocol.tsv"), pytest.raises(ValueError, match="no valid rows"):
        ld.build_dataset("csv", path=str(nocol))
    with pytest.warns(UserWarning, match="nocol.tsv"):
        both = ld.build_dataset("csv", path=[str(nocol), src])
    assert len(both) == 6 and both.skipped == 1
    # a missing CSV file
    with pytest.warns(UserWarning, match="nothere.tsv"), pytest.raises(ValueError):
        ld.build_dataset("csv", path=str(tmp_path / "nothere.tsv"))
    # every row bad -> error
    allbad = tmp_path / "allbad.tsv"
    _write_csv(allbad, [["images/missing.png", "x"], [rows[0][0], ""]])
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no valid rows"):
        ld.build_dataset("csv", path=str(allbad))
    # all images of a batch undecodable -> error from the collator, not a silent empty batch
    only_trunc = tmp_path / "trunc.tsv"
    _write_csv(only_trunc, [["images/trunc.png", "a dog"]])
    ds_t = ld.build_dataset("csv", path=str(only_trunc))
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="nothing valid"):
        col([ds_t[0]])


def _add(tf, name, data):
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))


def test_shard_bad_input(tmp_path, synth):
    d = tmp_path / "shards"
    paths = ld.write_shards(synth, str(d), per_shard=8)
    # a shard truncated in the middle of a member
    data = open(paths[1], "rb").read()
    open(paths[1], "wb").write(data[:len(data) // 2 + 100])
    # a shard that is not a tar at all
    (d / "shard-000009.tar").write_bytes(b"garbage" * 100)
    # a shard with incomplete samples, an empty caption, a bad json and a truncated image
    png = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(png, format="PNG")
    png = png.getvalue()
    with tarfile.open(d / "shard-000010.tar", "w") as tf:
        _add(tf, "a.png", png)                       # no caption
        _add(tf, "b.txt", b"a lonely caption")       # no image
        _add(tf, "c.png", png); _add(tf, "c.txt", b"  ")     # empty caption
        _add(tf, "e.png", png); _add(tf, "e.txt", b"a red box"); _add(tf, "e.json", b"{broken")
        _add(tf, "f.png", png[:40]); _add(tf, "f.txt", b"a truncated picture")
        _add(tf, "g.webp", png); _add(tf, "g.txt", b"png bytes named webp still decode")
    with pytest.warns(UserWarning) as rec:
        ds = ld.build_dataset("webdataset", path=str(d))
    msgs = " | ".join(str(w.message) for w in rec)
    assert "shard-000001.tar" in msgs and "broken" in msgs
    assert "shard-000009.tar" in msgs
    assert "shard-000010.tar: skipped 1 samples without an image, 1 without a caption, 1 with an empty caption" in msgs
    assert "e.json" in msgs
    assert "skipped 1 samples with an invalid .json sidecar (e.json: not JSON" in msgs
    n_first = 8
    n_second = len(ds) - n_first - 8 - 2
    assert 0 <= n_second < 8  # only the complete samples before the break survive
    assert ds.skipped == 1 + 1 + 3 + 1  # two broken shards, three incomplete samples, one bad json
    keys = [it["name"] for it in ds.items]
    assert f"{d / 'shard-000010.tar'}:e.png" not in keys  # bad json: the sample is skipped (issue 21)
    f = keys.index(f"{d / 'shard-000010.tar'}:f.png")
    with pytest.warns(UserWarning, match="f.png"):
        assert ds[f] is None
    # every sample of every shard good in the surviving part decodes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        good = [i for i in range(len(ds)) if ds[i] is not None]
    assert len(good) == len(ds) - 1
    # nothing valid -> error
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no valid samples"):
        ld.build_dataset("webdataset", path=str(d / "shard-000009.tar"))
    with pytest.warns(UserWarning, match="missing shard"), pytest.raises(ValueError):
        ld.build_dataset("webdataset", path=str(d / "nope-{0..1}.tar"))


def test_gzip_shards(tmp_path, synth):
    paths = ld.write_shards(synth, str(tmp_path), n=5)
    import gzip
    gz = tmp_path / "z.tar.gz"
    gz.write_bytes(gzip.compress(open(paths[0], "rb").read()))
    ds = ld.build_dataset("webdataset", path=str(gz))
    assert len(ds) == 5 and torch.equal(ds[2]["image"], synth[2]["image"])
