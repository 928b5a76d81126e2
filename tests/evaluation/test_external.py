"""loupe.external on small real files built from our own scenes: the numbers equal the built-in
evaluation's on the same scenes, pycocotools equals metrics.coco_map, boxes are mapped back to the
original pixels, and bad input is named (or skipped and counted)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from loupe import checkpoint
from loupe import data as ldata
from loupe import evaluate as E
from loupe import external as X
from loupe import metrics as M

SEED, N_TEST, N_SINGLE, BATCH = 3, 24, 40, 40
CATEGORY_IDS = [11, 3, 7, 20, 5, 9]  # COCO ids are arbitrary ints, not 0..C-1




@pytest.fixture(scope="module")
def model(ckpt):
    return checkpoint.load_checkpoint(ckpt)[0]


@pytest.fixture(scope="module")
def builtin(ckpt):
    """The built-in evaluation of the same scenes (test split and single split of seed 3)."""
    return E.evaluate_checkpoint(ckpt, None, num_test=N_TEST, num_compositional=0, num_single=N_SINGLE, num_hard=0,
                                 num_relation=0, batch_size=BATCH, figures=False, progress=False)


def _save(chw: torch.Tensor, path: str, pad: tuple[int, int] = (0, 0), scale: int = 1) -> None:
    """Save a scene image; ``pad = (px, py)`` grey pixels on each side, ``scale`` nearest upscaling."""
    from PIL import Image
    a = chw.numpy().transpose(1, 2, 0)
    px, py = pad
    if px or py:
        a = np.pad(a, ((py, py), (px, px), (0, 0)), constant_values=127)
    im = Image.fromarray(np.ascontiguousarray(a))
    if scale != 1:
        im = im.resize((im.size[0] * scale, im.size[1] * scale), Image.NEAREST)
    im.save(path, quality=95) if path.endswith(".jpg") else im.save(path)


def _layout(i: int, kind: str) -> tuple[str, tuple[int, int], int]:
    """File extension, padding and scale of image ``i`` for a set ``kind``: "same" (64x64 PNG),
    "padded" (every other image 64 wide x 96 tall: the centre crop cuts exactly the scene back out),
    "rescaled" (2x upscaled, some non-square, some JPEG)."""
    if kind == "same":
        return "png", (0, 0), 1
    if kind == "padded":
        return "png", ((0, 16) if i % 2 else (0, 0)), 1
    return ("jpg" if i % 3 == 0 else "png"), ((0, 8) if i % 2 else (0, 0)), 2


def _scenes(split: str, n: int):
    return ldata.build_dataset("synthetic", split, seed=SEED, size=n)


def write_grounding(tmp, kind: str = "same", n: int = N_TEST) -> str:
    ds = _scenes("test", n)
    os.makedirs(tmp / "img", exist_ok=True)
    path = str(tmp / f"grounding_{kind}.jsonl")
    with open(path, "w") as f:
        for i in range(n):
            s = ds[i]
            ext, (px, py), k = _layout(i, kind)
            name = f"img/{kind}_{i:03d}.{ext}"
            _save(s["image"], str(tmp / name), (px, py), k)
            boxes = [[(b[0] + px) * k, (b[1] + py) * k, (b[2] + px) * k, (b[3] + py) * k] for b in s["boxes"].tolist()]
            f.write(json.dumps({"image": name, "caption": s["caption"],
                                "phrases": [{"span": list(sp), "box": b} for sp, b in zip(s["phrase_spans"], boxes)]})
                    + "\n")
    return path


def write_coco(tmp, kind: str = "same", n: int = N_TEST) -> tuple[str, str]:
    ds = _scenes("test", n)
    img_dir = tmp / f"coco_{kind}"
    os.makedirs(img_dir, exist_ok=True)
    images, anns = [], []
    for i in range(n):
        s = ds[i]
        ext, (px, py), k = _layout(i, kind)
        name = f"{i:012d}.{ext}"
        _save(s["image"], str(img_dir / name), (px, py), k)
        images.append({"id": 100 + i, "file_name": name, "width": (64 + 2 * px) * k, "height": (64 + 2 * py) * k})
        for b, c in zip(s["boxes"].tolist(), s["shape_ids"].tolist()):
            x0, y0, x1, y1 = (b[0] + px) * k, (b[1] + py) * k, (b[2] + px) * k, (b[3] + py) * k
            anns.append({"id": len(anns) + 1, "image_id": 100 + i, "category_id": CATEGORY_IDS[c],
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
    cats = [{"id": CATEGORY_IDS[c], "name": name, "supercategory": "shape"} for c, name in enumerate(ldata.SHAPES)]
    path = str(tmp / f"coco_{kind}.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": cats}, f)
    return path, str(img_dir)


def write_class_tree(tmp, n: int = N_SINGLE, ext: str = "png") -> str:
    ds = _scenes("single", n)
    root = tmp / f"classes_{ext}"
    for i in range(n):
        s = ds[i]
        d = root / ldata.SHAPES[int(s["shape_ids"][0])]
        os.makedirs(d, exist_ok=True)
        _save(s["image"], str(d / f"{i:04d}.{ext}"))
    return str(root)


def _coco_map_of(res: dict) -> dict:
    """metrics.coco_map on the detections and ground truth pycocotools scored (xyxy, class indices)."""
    cls = {c: k for k, c in enumerate(res["category_ids"])}
    xyxy = lambda b: [b[0], b[1], b[0] + b[2], b[1] + b[3]]  # noqa: E731
    gts, dets = [], []
    for iid in res["image_ids"]:
        g = [a for a in res["ground_truth"] if a["image_id"] == iid]
        d = [r for r in res["detections"] if r["image_id"] == iid]
        gts.append({"boxes": np.array([xyxy(a["bbox"]) for a in g]).reshape(-1, 4),
                    "labels": np.array([cls[a["category_id"]] for a in g])})
        dets.append({"boxes": np.array([xyxy(r["bbox"]) for r in d]).reshape(-1, 4),
                     "scores": np.array([r["score"] for r in d]), "labels": np.array([cls[r["category_id"]] for r in d])})
    return M.coco_map(gts, dets, len(cls))


# ------------------------------------------------------------------------------------------------
def test_to_original_inverts_the_preprocessing(model):
    """Boxes in the model's square input, mapped back to the image, then moved forward again by
    loupe.data.Preprocess (an independent implementation of the crop) land where they started."""
    from PIL import Image
    from loupe.ground import prepare_image
    S = model.config.image_size
    g = torch.Generator().manual_seed(0)
    for (w, h) in ((64, 64), (64, 96), (200, 90), (33, 47), (128, 128)):
        for crop in ("center", "none"):
            _, mp, pil = prepare_image(model, Image.new("RGB", (w, h)), crop)
            a = torch.rand(20, 2, generator=g) * S * 0.5
            b = a + torch.rand(20, 2, generator=g) * S * 0.5 + 1
            boxes = torch.cat([a, b], 1).clamp(0, S)
            orig = X.to_original(boxes, mp, (w, h))
            assert float(orig[:, [0, 2]].max()) <= w and float(orig[:, [1, 3]].max()) <= h
            _, back = ldata.Preprocess(S, crop)(pil, orig.numpy())
            assert np.allclose(back, boxes.numpy(), atol=1e-3), (w, h, crop)


def test_grounding_jsonl_equals_the_builtin_evaluation(model, builtin, tmp_path):
    ref = builtin["grounding"]["test"]
    for kind in ("same", "padded"):  # padded: non-square files whose centre crop is the scene
        res = X.evaluate_grounding(model, write_grounding(tmp_path, kind), phrase_context="caption", batch_size=BATCH)
        assert res["skipped"] == 0 and res["entries"] == N_TEST and res["phrases"] == ref["phrases"]
        assert res["acc50"] == ref["acc50"] and res["pointing"] == ref["pointing"], kind
        assert res["mean_iou"] == pytest.approx(ref["mean_iou"], abs=1e-12)
        assert res["regions_acc50"] == ref["regions_acc50"]
        for key in ("own_acc50", "any_acc50", "discrimination", "pointing_own", "pointing_any",
                    "pointing_discrimination", "text_free", "text_free_caption", "text_free_objectness"):
            assert res["finding"][key] == pytest.approx(ref["finding"][key], abs=1e-12), (kind, key)
        assert set(res["finding"]["by_k"]) == set(ref["finding"]["by_k"])
        assert res["boxes_mostly_outside_crop"] == 0 and res["lone_phrases"] == 0
    # by default a phrase that is its whole caption ("a big cyan ring") is encoded beside partner phrases
    rows = [json.loads(x) for x in open(tmp_path / "grounding_same.jsonl").read().splitlines()]
    refer = tmp_path / "refer.jsonl"  # RefCOCO-style: the caption is one referring expression
    with open(refer, "w") as f:
        for r in rows:
            (s, e), box = r["phrases"][0]["span"], r["phrases"][0]["box"]
            text = r["caption"][s:e]
            f.write(json.dumps({"image": r["image"], "caption": text + ".", "phrases": [{"span": [0, len(text)],
                                                                                       "box": box}]}) + "\n")
    auto = X.evaluate_grounding(model, str(refer))
    assert auto["lone_phrases"] == auto["phrases"] == N_TEST
    assert X.evaluate_grounding(model, str(refer), phrase_context="caption")["lone_phrases"] == 0
    # rescaled (2x, some JPEG, some non-square): runs, boxes in the files' pixels, nothing cut off
    big = X.evaluate_grounding(model, write_grounding(tmp_path, "rescaled"), crop="none")
    assert big["skipped"] == 0 and 0.0 <= big["finding"]["own_acc50"] <= big["finding"]["any_acc50"] <= 1.0
    assert big["boxes_mostly_outside_crop"] == 0


def test_boxes_the_centre_crop_cuts_off_are_counted(model, tmp_path):
    """A 64x96 file seen through the centre crop: a box in the top 16 rows is invisible to the model."""
    write_grounding(tmp_path, "padded", n=2)  # image 1 is 64 wide, 96 tall
    row = json.loads(open(tmp_path / "grounding_padded.jsonl").read().splitlines()[1])
    row["phrases"].append({"span": row["phrases"][0]["span"], "box": [0, 0, 64, 12]})
    path = tmp_path / "cut.jsonl"
    path.write_text(json.dumps(row) + "\n")
    assert X.evaluate_grounding(model, str(path))["boxes_mostly_outside_crop"] == 1
    assert X.evaluate_grounding(model, str(path), crop="none")["boxes_mostly_outside_crop"] == 0


def test_coco_detection_pycocotools_equals_builtin_and_coco_map(model, builtin, tmp_path):
    for kind in ("same", "padded"):
        ann, img = write_coco(tmp_path, kind)
        res = X.evaluate_coco(model, ann, img, batch_size=BATCH, return_detections=True)
        assert res["skipped"] == 0 and res["images"] == N_TEST and res["categories"] == 6
        # pycocotools on the external path = the built-in detection (metrics.coco_map) on the same scenes
        assert res["map50"] == pytest.approx(builtin["detection"]["map50"], abs=1e-9), kind
        assert res["map"] == pytest.approx(builtin["detection"]["map"], abs=1e-9), kind
        ours = _coco_map_of(res)
        assert res["map"] == pytest.approx(ours["map"], abs=1e-9) and res["map50"] == pytest.approx(ours["map50"], abs=1e-9)
        assert set(res["per_class"]) == set(ldata.SHAPES)
    # rescaled images: detections in the files' pixels (up to 2x the model's), the two mAPs still agree
    ann, img = write_coco(tmp_path, "rescaled")
    res = X.evaluate_coco(model, ann, img, crop="none", return_detections=True)
    sizes = {im["id"]: (im["width"], im["height"]) for im in json.load(open(ann))["images"]}
    assert max(r["bbox"][0] + r["bbox"][2] for r in res["detections"]) > 64
    for r in res["detections"]:
        w, h = sizes[r["image_id"]]
        assert r["bbox"][0] >= 0 and r["bbox"][1] >= 0 and r["bbox"][0] + r["bbox"][2] <= w + 1e-6 \
            and r["bbox"][1] + r["bbox"][3] <= h + 1e-6
    ours = _coco_map_of(res)
    assert res["map"] == pytest.approx(ours["map"], abs=1e-9) and res["map50"] == pytest.approx(ours["map50"], abs=1e-9)


def test_pycocotools_equals_coco_map_on_planted_detections():
    """Jittered true boxes (hits at several IoUs), misses and duplicates: a non-trivial mAP, the same
    from pycocotools and from metrics.coco_map."""
    rng = np.random.default_rng(0)
    images = [{"id": i + 1, "width": 100, "height": 80, "file_name": f"{i}.png"} for i in range(15)]
    cats = [{"id": c, "name": n} for c, n in ((4, "cat"), (9, "dog"), (2, "bird"))]
    gt, res = [], []
    for im in images:
        for _ in range(rng.integers(1, 4)):
            x, y = rng.uniform(0, 60), rng.uniform(0, 40)
            w, h = rng.uniform(8, 40), rng.uniform(8, 40)
            c = int(rng.choice([4, 9, 2]))
            gt.append({"id": len(gt) + 1, "image_id": im["id"], "category_id": c, "bbox": [x, y, w, h],
                       "area": w * h, "iscrowd": 0})
            for _ in range(rng.integers(0, 3)):
                j = rng.normal(0, 4, 4)
                res.append({"image_id": im["id"], "category_id": c if rng.random() < 0.8 else 2,
                            "bbox": [max(0, x + j[0]), max(0, y + j[1]), max(1, w + j[2]), max(1, h + j[3])],
                            "score": float(rng.random())})
    stats, _, _ = X._pycocotools_eval(images, cats, gt, res)
    ours = _coco_map_of({"category_ids": [c["id"] for c in cats], "image_ids": [im["id"] for im in images],
                         "ground_truth": gt, "detections": res})
    assert 0.1 < stats["map50"] < 1.0
    assert stats["map"] == pytest.approx(ours["map"], abs=1e-9) and stats["map50"] == pytest.approx(ours["map50"], abs=1e-9)
    assert stats["map75"] == pytest.approx(ours["map75"], abs=1e-9)


def test_classification_folder_tree_equals_the_builtin_classification(model, builtin, tmp_path):
    root = write_class_tree(tmp_path)
    res = X.evaluate_classification(model, root, batch_size=BATCH)
    assert res["classes"] == 6 and res["images"] == N_SINGLE and res["skipped"] == 0
    assert res["top1"] == builtin["classification"]["top1"] and res["top5"] == builtin["classification"]["top5"]
    jpg = X.evaluate_classification(model, write_class_tree(tmp_path, ext="jpg"))
    assert jpg["images"] == N_SINGLE and 0.0 <= jpg["top1"] <= jpg["top5"] <= 1.0
    assert X.class_prompt("golden_retriever") == "a golden retriever" and X.class_prompt("owl") == "an owl"


def test_retrieval_csv_and_shards_equal_the_builtin_retrieval(model, builtin, tmp_path):
    ds = _scenes("test", N_TEST)
    csv = ldata.write_csv(ds, str(tmp_path / "csv"), n=N_TEST)
    shards = ldata.write_shards(ds, str(tmp_path / "shards"), n=N_TEST, per_shard=10)
    ref = builtin["retrieval"]
    spec = "pipe:cat " + os.path.join(str(tmp_path / "shards"), "shard-{000000..000002}.tar")
    assert len(shards) == 3
    for res in (X.evaluate_retrieval(model, csv=csv, batch_size=BATCH),
                X.evaluate_retrieval(model, shards=shards, batch_size=BATCH),
                X.evaluate_retrieval(model, shards=spec, batch_size=BATCH)):  # streamed (webdataset library)
        assert res["images"] == res["captions"] == N_TEST and res["skipped"] == 0
        for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"):
            assert res[k] == ref[k], k
    # several captions per image (rows naming the same file): one image, found by its best caption
    lines = open(csv).read().splitlines()
    with open(csv, "a") as f:
        for line in lines[1:6]:
            path, cap = line.split("\t")
            f.write(f"{path}\tanother view: {cap}\n")
    multi = X.evaluate_retrieval(model, csv=csv)
    assert multi["images"] == N_TEST and multi["captions"] == N_TEST + 5


def test_recall_with_several_captions_per_image():
    # image 0 owns captions 0, 1; image 1 owns caption 2
    s = torch.tensor([[0.1, 0.9, 0.5], [0.8, 0.2, 0.3]])
    r = X._recall_multi(s, torch.tensor([0, 0, 1]), (1, 2))
    assert r == {1: 0.5, 2: 1.0}  # image 0: its caption 1 ranks first; image 1: caption 2 ranks third
    one = torch.randn(7, 7)
    assert X._recall_multi(one, torch.arange(7)) == M.recall_at_k(one, torch.arange(7))


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
def test_bad_grounding_entries_are_skipped_counted_and_named(model, tmp_path):
    good = write_grounding(tmp_path, "same", n=4)
    rows = [json.loads(x) for x in open(good).read().splitlines()]
    bad_span = dict(rows[1], phrases=[{"span": [0, 999], "box": rows[1]["phrases"][0]["box"]}])
    bad_box = dict(rows[2], phrases=[{"span": rows[2]["phrases"][0]["span"], "box": [10, 10, 90, 30]}])
    missing = dict(rows[3], image="img/nowhere.png")
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([json.dumps(rows[0]), "{not json", json.dumps(bad_span), json.dumps(bad_box),
                               json.dumps(missing), json.dumps({"image": "x.png"})]) + "\n")
    with pytest.warns(UserWarning, match="skipped 5 bad entries"):
        res = X.evaluate_grounding(model, str(path))
    assert res["entries"] == 1 and res["skipped"] == 5
    assert res["skipped_reasons"] == {"box outside image": 1, "image not found": 1, "malformed JSON": 1,
                                      "malformed entry": 1, "span outside caption": 1}
    ex = " | ".join(res["skipped_examples"])
    assert "entry 1 (line 2)" in ex and "span [0, 999] is outside the caption" in ex
    assert "outside the image of 64x64 pixels" in ex and "nowhere.png" in ex and "entry 5 (line 6)" in ex
    with pytest.raises(X.ExternalDataError, match=r"entry 1 \(line 2\): not valid JSON"):
        X.read_grounding(str(path), strict=True)
    only_bad = tmp_path / "only_bad.json"
    only_bad.write_text(json.dumps([missing, bad_span]))
    with pytest.raises(ValueError, match="no valid entry"):
        X.evaluate_grounding(model, str(only_bad))
    with pytest.raises(FileNotFoundError, match="nope.jsonl' do not exist"):
        X.evaluate_grounding(model, str(tmp_path / "nope.jsonl"))
    broken = tmp_path / "broken.json"
    broken.write_text('[{"image": "a.png",')
    with pytest.raises(ValueError, match="not valid JSON"):
        X.read_grounding(str(broken))


def test_bad_coco_input_is_named_or_skipped(model, tmp_path):
    ann, img = write_coco(tmp_path, "same", n=4)
    d = json.load(open(ann))
    d["annotations"].append({"id": 99, "image_id": 100, "category_id": 12345, "bbox": [1, 1, 5, 5]})
    d["annotations"].append({"id": 98, "image_id": 101, "category_id": 3, "bbox": [50, 50, 40, 5]})
    d["images"].append({"id": 500, "file_name": "gone.png"})
    d["categories"][0]["name"] = "zebra"  # a word the model's tokenizer never saw: said, not hidden
    bad = tmp_path / "bad_coco.json"
    bad.write_text(json.dumps(d))
    with pytest.warns(UserWarning, match="skipped 3 bad entries"), \
            pytest.warns(UserWarning, match=r"1 of 6 category names hold no word the model knows"):
        res = X.evaluate_coco(model, str(bad), img)
    assert res["images"] == 4 and res["skipped"] == 3 and res["categories_without_known_words"] == ["zebra"]
    assert res["skipped_reasons"] == {"annotation of an unknown category": 1, "box outside image": 1,
                                      "image not found": 1}
    ex = " | ".join(res["skipped_examples"])
    assert "annotations[" in ex and "category_id 12345" in ex and "gone.png" in ex
    with pytest.raises(X.ExternalDataError, match=r"images\[4\] \(id 500\): image not found"):
        X.read_coco(str(bad), img, strict=True)
    with pytest.raises(FileNotFoundError, match="image folder"):
        X.read_coco(ann, str(tmp_path / "no_dir"))
    (tmp_path / "trunc.json").write_text('{"images": [')
    with pytest.raises(ValueError, match="not valid JSON"):
        X.read_coco(str(tmp_path / "trunc.json"), img)
    (tmp_path / "nocats.json").write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(ValueError, match="'categories'"):
        X.read_coco(str(tmp_path / "nocats.json"), img)


def test_class_tree_errors(tmp_path):
    root = tmp_path / "tree"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        X.read_class_folders(str(root))
    os.makedirs(root)
    with pytest.raises(ValueError, match="no class folders"):
        X.read_class_folders(str(root))
    os.makedirs(root / "circle")
    os.makedirs(root / "red_square")
    (root / "circle" / "notes.txt").write_text("x")
    _save(torch.zeros(3, 8, 8, dtype=torch.uint8), str(root / "red_square" / "a.png"))
    with pytest.raises(ValueError, match="without images.*circle"):
        X.read_class_folders(str(root))


def test_cli_writes_json_and_markdown_and_reports_errors(ckpt, tmp_path, capsys):
    path = write_grounding(tmp_path, "same", n=6)
    out = str(tmp_path / "out" / "g.json")
    assert X.main(["grounding", "--checkpoint", ckpt, "--annotations", path, "--out", out, "--no-progress"]) == 0
    saved = json.load(open(out))
    assert saved["task"] == "grounding" and saved["step"] == 7 and saved["entries"] == 6
    assert "Acc@0.5" in open(str(tmp_path / "out" / "g.md")).read()
    root = write_class_tree(tmp_path, n=12)
    assert X.main(["classify", "--checkpoint", ckpt, "--folder", root, "--no-progress"]) == 0
    assert os.path.exists(os.path.join(ckpt, "external_classify.json"))
    assert X.main(["coco", "--checkpoint", ckpt, "--coco-annotations", str(tmp_path / "missing.json"),
                   "--images", str(tmp_path), "--no-progress"]) == 2
    assert "missing.json" in capsys.readouterr().err
