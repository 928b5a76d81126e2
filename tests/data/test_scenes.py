"""Built-in synthetic scenes: determinism, splits, boxes vs drawn pixels, spans, oracle, speed."""
import hashlib
import itertools

import numpy as np
import pytest
import torch

import loupe.data as ld
from loupe.data.scenes import TEMPLATES, oracle_iou, oracle_iou_bruteforce
from loupe.regions import box_iou


def _hash(s):
    return hashlib.sha1(s["image"].numpy().tobytes() + s["caption"].encode()).hexdigest()


def test_determinism_per_seed():
    a = ld.build_dataset("synthetic", "train", seed=3, size=50)
    b = ld.build_dataset("synthetic", "train", seed=3, size=50)
    c = ld.build_dataset("synthetic", "train", seed=4, size=50)
    # any order, any instance: same sample
    assert [_hash(a[i]) for i in range(50)] == [_hash(b[i]) for i in reversed(range(50))][::-1]
    assert _hash(a[17]) == _hash(b[17])
    assert sum(_hash(a[i]) == _hash(c[i]) for i in range(50)) == 0
    assert torch.equal(a[5]["boxes"], b[5]["boxes"])


def test_splits_disjoint():
    seen = {}
    for split in ("train", "val", "test", "compositional", "single"):
        ds = ld.build_dataset("synthetic", split, seed=0, size=400)
        hs = {_hash(ds[i]) for i in range(len(ds))}
        assert len(hs) == 400, f"duplicates inside {split}"
        for other, ho in seen.items():
            assert not hs & ho, f"{split} overlaps {other}"
        seen[split] = hs


def test_compositional_holds_out_pairs():
    tr = ld.build_dataset("synthetic", "train", seed=1, size=3000)
    held = tr.generator.heldout
    assert len(held) >= len(ld.SHAPES)
    train_pairs = set()
    for split in ("train", "val", "test", "single"):
        ds = ld.build_dataset("synthetic", split, seed=1, size=3000 if split == "train" else 500)
        for i in range(len(ds)):
            sc = ds.scene(i, render=False)
            train_pairs |= set(zip(sc.shape_ids, sc.color_ids))
    assert not train_pairs & held
    comp = ld.build_dataset("synthetic", "compositional", seed=1, size=500)
    comp_pairs = set()
    for i in range(500):
        sc = comp.scene(i, render=False)
        comp_pairs |= set(zip(sc.shape_ids, sc.color_ids))
    assert comp_pairs == set(held)
    # every shape and every colour on its own is seen in training
    assert {s for s, _ in train_pairs} == set(range(len(ld.SHAPES)))
    assert {c for _, c in train_pairs} == set(range(len(ld.COLOR_NAMES)))


def test_single_object_split():
    ds = ld.build_dataset("synthetic", "single", seed=0, size=200)
    assert all(len(ds[i]["phrase_spans"]) == 1 for i in range(200))


def test_boxes_match_drawn_pixels_and_spans():
    ds = ld.build_dataset("synthetic", "train", seed=5, size=300)
    gen = ds.generator
    counts = set()
    for i in range(300):
        sc = ds.scene(i)
        img, inst = gen.render(sc, instance_masks=True)
        k = len(sc.phrases)
        counts.add(k)
        assert 1 <= k <= 3 and sc.boxes.shape == (k, 4)
        assert (sc.boxes >= 0).all() and (sc.boxes <= 64).all()
        for j in range(k):
            ys, xs = np.nonzero(inst == j)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == tuple(sc.boxes[j].astype(int))
            # the drawn pixels are the object's colour, far from the background next to the box
            col = img[:, ys, xs].astype(int)
            assert (col.max(1) - col.min(1)).max() == 0
            s, e = sc.spans[j]
            assert 0 <= s < e <= len(sc.caption) and sc.caption[s:e] == sc.phrases[j]
            assert ld.SHAPES[sc.shape_ids[j]] in sc.phrases[j]
            assert ld.COLOR_NAMES[sc.color_ids[j]] in sc.phrases[j]
        # boxes do not overlap
        for a in range(k):
            for b in range(a + 1, k):
                assert float(box_iou(torch.from_numpy(sc.boxes[a:a + 1]), torch.from_numpy(sc.boxes[b:b + 1]))[0, 0]) == 0
        # spans do not overlap
        sp = sorted(sc.spans)
        assert all(sp[t][1] <= sp[t + 1][0] for t in range(k - 1))
    assert counts == {1, 2, 3}


def test_relations_are_true():
    ds = ld.build_dataset("synthetic", "train", seed=2, size=500)
    checked = 0
    for i in range(500):
        sc = ds.scene(i, render=False)
        if len(sc.phrases) != 2:
            continue
        first = min(range(2), key=lambda j: sc.spans[j][0])
        a, b = sc.boxes[first], sc.boxes[1 - first]
        mid = sc.caption[sc.spans[first][1]:sc.spans[1 - first][0]]
        cx = (a[0] + a[2]) - (b[0] + b[2])
        cy = (a[1] + a[3]) - (b[1] + b[3])
        if "left of" in mid:
            assert cx < 0 and abs(cx) >= abs(cy); checked += 1
        elif "right of" in mid:
            assert cx > 0 and abs(cx) >= abs(cy); checked += 1
        elif mid.strip().endswith(("above", "over", "on top of")):
            assert cy < 0 and abs(cy) > abs(cx); checked += 1
        elif mid.strip().endswith(("below", "under", "beneath")):
            assert cy > 0 and abs(cy) > abs(cx); checked += 1
    assert checked > 100


def test_caption_variety():
    ds = ld.build_dataset("synthetic", "train", seed=0, size=2000)
    caps = list(ds.captions())
    words = {w for c in caps for w in c.replace(",", " ").replace(".", " ").split()}
    for w in ("sits", "lies", "above", "beneath", "one", "an", "there", "tiny", "big"):
        assert w in words, w
    assert len(set(caps)) > 1900
    for k, ts in TEMPLATES.items():  # each object mentioned exactly once per template
        for t in ts:
            assert all(t.count("{%d}" % j) == 1 for j in range(k)), t


def test_whole_patch_oracle_reaches_half():
    for t in range(300):  # the fast oracle equals brute force over all 1296 whole-patch boxes
        r = np.random.default_rng(t)
        x0, y0 = r.uniform(0, 50, 2)
        b = (x0, y0, x0 + r.uniform(1, 14), y0 + r.uniform(1, 14))
        assert abs(ld.oracle_iou(b)[0] - oracle_iou_bruteforce(b)) < 1e-12
    for split in ("train", "test", "compositional", "single"):
        ds = ld.build_dataset("synthetic", split, seed=0, size=1000)
        r = ld.oracle_grounding(ds)
        assert r["accuracy"] == 1.0 and r["min_iou"] >= 0.5, (split, r)


def test_rank_shards_disjoint_and_cover():
    full = ld.build_dataset("synthetic", "train", seed=0, size=103)
    parts = [ld.build_dataset("synthetic", "train", seed=0, size=103, rank=r, world_size=4) for r in range(4)]
    got = [p[i]["index"] for p in parts for i in range(len(p))]
    assert sorted(got) == list(range(103))
    assert _hash(parts[2][3]) == _hash(full[2 + 3 * 4])
    assert sum(1 for p in parts for _ in p.captions()) == 103


def test_collator_batch():
    ds = ld.build_dataset("synthetic", "train", seed=0, size=300)
    tok = ld.fit_tokenizer(ds)
    col = ld.Collator(tok, max_length=32)
    b = col([ds[i] for i in range(16)] + [None])
    assert b["skipped"] == 1 and b["images"].shape == (16, 3, 64, 64) and b["images"].dtype == torch.float32
    B, L = b["input_ids"].shape
    assert (b["input_ids"][:, 0] == tok.bos_id).all()
    assert (b["input_ids"][torch.arange(B), b["eos_index"]] == tok.eos_id).all()
    assert not (b["word_mask"] & ~b["attention_mask"]).any()
    assert (b["input_ids"][~b["attention_mask"]] == tok.pad_id).all()
    for i in range(B):
        ids, offs = tok.encode(b["captions"][i])
        for p, (cs, ce) in enumerate(b["phrase_char_spans"][i]):
            assert b["phrase_mask"][i, p] and b["box_mask"][i, p]
            s, e = b["phrase_spans"][i, p].tolist()
            assert b["word_mask"][i, s:e].all()
            # the phrase's tokens are exactly the caption's words inside its span
            words = [b["captions"][i][a:z].lower() for a, z in offs[s - 1:e - 1]]
            assert " ".join(words) == b["captions"][i][cs:ce].lower()
            assert torch.equal(b["boxes"][i, p], ds[int(b["index"][i])]["boxes"][p])
        assert not b["phrase_mask"][i, len(b["phrase_char_spans"][i]):].any()
    with pytest.raises(RuntimeError, match="nothing valid"):
        col([None, None])
    # truncation: phrases that lose all their tokens are masked, not mis-pointed
    short = ld.Collator(tok, max_length=4)([ds[i] for i in range(16)])
    assert short["input_ids"].shape[1] == 4
    assert (short["phrase_spans"][..., 1] <= 3).all()


# ------------------------------------------------------------------------------------------------
# controlled distractors: the hard and relation splits
# ------------------------------------------------------------------------------------------------
def _objects(sc):
    return ([tuple(b) for b in sc.boxes] + [tuple(b) for b in sc.other_boxes],
            sc.color_ids + sc.other_color_ids, sc.shape_ids + sc.other_shape_ids, sc.size_ids + sc.other_size_ids)


@pytest.mark.parametrize("split", ["hard", "hard_compositional", "val_hard", "train_hard"])
def test_hard_scenes_give_every_named_object_a_colour_and_a_shape_twin(split):
    gen = ld.SceneGenerator(ld.ShapeCatalog(), seed=4)
    for i in range(60):
        sc = gen.scene(split, i)
        boxes, colors, shapes, sizes = _objects(sc)
        assert len(sc.phrases) == 2 and 4 <= len(boxes) <= 5
        for k in range(2):
            others = [j for j in range(len(boxes)) if j != k]
            assert any(colors[j] == colors[k] and shapes[j] != shapes[k] for j in others)
            assert any(shapes[j] == shapes[k] and colors[j] != colors[k] for j in others)
            assert not any(shapes[j] == shapes[k] and colors[j] == colors[k] for j in others)  # unique referent
            assert ld.COLOR_NAMES[colors[k]] in sc.phrases[k] and ld.SHAPES[shapes[k]] in sc.phrases[k]
            assert sc.caption[sc.spans[k][0]:sc.spans[k][1]] == sc.phrases[k]
        assert len(set(sizes)) == 1  # size never tells them apart
        if split == "hard_compositional":
            assert all((shapes[k], colors[k]) in gen.heldout for k in range(2))
        else:
            assert all((s, c) not in gen.heldout for s, c in zip(shapes, colors))
        for b in boxes:
            assert oracle_iou(tuple(float(v) for v in b), 64)[0] >= 0.5
        for a, b in itertools.combinations(boxes, 2):
            assert float(box_iou(torch.tensor([a]), torch.tensor([b]))[0, 0]) == 0


@pytest.mark.parametrize("split", ["relation", "relation_compositional", "val_relation"])
def test_relation_scenes_tell_identical_twins_apart_only_by_the_relation(split):
    gen = ld.SceneGenerator(ld.ShapeCatalog(), seed=4)
    for i in range(60):
        sc = gen.scene(split, i)
        boxes, colors, shapes, _ = _objects(sc)
        assert len(sc.phrases) == 2 and len(boxes) == 3
        target, anchor, twin = 0, 1, 2  # named first: the target, the anchor; then the twin
        assert (colors[twin], shapes[twin]) == (colors[target], shapes[target])
        assert colors[anchor] != colors[target] and shapes[anchor] != shapes[target]
        rel = sc.caption[sc.spans[0][1]:sc.spans[1][0]]
        cx = lambda b: b[0] + b[2]  # noqa: E731
        cy = lambda b: b[1] + b[3]  # noqa: E731
        A, B, T = boxes[target], boxes[anchor], boxes[twin]
        if any(w in rel for w in ("left",)):
            assert cx(A) < cx(B) and cx(T) > cx(B)
        elif "right" in rel:
            assert cx(A) > cx(B) and cx(T) < cx(B)
        elif any(w in rel for w in ("above", "over", "top")):
            assert cy(A) < cy(B) and cy(T) > cy(B)
        else:
            assert any(w in rel for w in ("below", "under", "beneath")), rel
            assert cy(A) > cy(B) and cy(T) < cy(B)
        for b in boxes:
            assert oracle_iou(tuple(float(v) for v in b), 64)[0] >= 0.5


def test_controlled_scenes_are_deterministic_and_eval_seeds_keep_the_held_out_pairs():
    a = ld.SceneGenerator(ld.ShapeCatalog(), seed=4)
    b = ld.SceneGenerator(ld.ShapeCatalog(), seed=4, sample_seed=99)
    assert a.scene("hard", 3).caption == ld.SceneGenerator(ld.ShapeCatalog(), seed=4).scene("hard", 3).caption
    assert a.heldout == b.heldout
    assert [a.scene("test", i).caption for i in range(5)] != [b.scene("test", i).caption for i in range(5)]
    sc = b.scene("hard_compositional", 0)
    assert all((s, c) in a.heldout for s, c in zip(sc.shape_ids, sc.color_ids))


def test_hard_mix_draws_a_share_of_training_scenes_from_the_controlled_streams():
    plain = ld.build_dataset("synthetic", "train", seed=2, size=400)
    mixed = ld.build_dataset("synthetic", "train", seed=2, size=400, hard_mix=0.5)
    n_ctrl = sum(len(mixed[i]["all_boxes"]) > len(mixed[i]["boxes"]) or len(mixed[i]["all_boxes"]) >= 4
                 for i in range(400))
    assert 140 < n_ctrl < 260
    assert all(len(plain[i]["all_boxes"]) == len(plain[i]["boxes"]) for i in range(100))
    with pytest.raises(ValueError, match="hard_mix"):
        ld.build_dataset("synthetic", "test", size=4, hard_mix=0.5)
    with pytest.raises(ValueError, match="hard_mix"):
        ld.build_dataset("synthetic", "train", size=4, hard_mix=1.5)


@pytest.mark.parametrize("dataset_type", ["fashion", "emoji"])
def test_controlled_scenes_on_the_real_image_catalogs(dataset_type):
    try:
        ds = ld.build_dataset(dataset_type, "hard", seed=1, size=20)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    colored = bool(ds.color_names)
    for i in range(20):
        sc = ds.scene(i, render=False)
        boxes, colors, shapes, sizes = _objects(sc)
        attr = colors if colored else sizes
        for k in range(2):
            others = [j for j in range(len(boxes)) if j != k]
            assert any(attr[j] == attr[k] and shapes[j] != shapes[k] for j in others)
            assert any(shapes[j] == shapes[k] and attr[j] != attr[k] for j in others)


def test_captions_follow_hard_mix():
    ds = ld.build_dataset("synthetic", "train", seed=2, size=60, hard_mix=0.5)
    assert list(ds.captions()) == [ds[i]["caption"] for i in range(60)]
