"""loupe.evaluate and loupe.ground end to end on a tiny checkpoint saved the way train.py saves it."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from loupe import data as ldata
from loupe import checkpoint, report
from loupe import evaluate as E
from loupe.ground import ground
from loupe.checkpoint import load_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))




def test_evaluate_checkpoint_paths_ranges_and_files(ckpt, tmp_path):
    out = str(tmp_path / "ev" / "eval.json")
    res = E.evaluate_checkpoint(ckpt, out, num_test=40, num_compositional=30, num_single=30, batch_size=20,
                                num_hard=16, num_relation=16, eval_seed=11, progress=False)
    with open(out) as f:
        saved = json.load(f)
    for path in report.REQUIRED_PATHS:
        v = report.get_path(saved, path)
        assert isinstance(v, float) and 0.0 <= v <= 1.0, (path, v)
    g = saved["grounding"]
    # the built-in scenes are made so that whole-patch boxes reach IoU >= 0.5 with every object
    assert g["oracle_acc50"] == 1.0 and g["oracle_acc50_compositional"] == 1.0
    assert 0.0 < g["chance_acc50"] < 0.1 and 0.0 < g["chance_pointing"] < 0.5
    assert set(g["test"]["by_size"]) <= {"small", "large"} and g["test"]["by_size"]
    assert sum(r["phrases"] for r in g["test"]["by_size"].values()) == g["test"]["phrases"] > 40
    assert g["regions"]["acc50"] is not None  # objective loupe: the objectness row exists
    assert saved["data"]["seed"] == 3 and saved["step"] == 7  # the training run's seed and step
    assert saved["data"]["eval_seed"] == 11
    # finding vs naming on every split: own <= any, the text-free and attribute bars from the scenes
    for split, ks in (("test", {1, 2, 3}), ("compositional", {1, 2, 3}), ("hard", {4, 5}),
                      ("hard_compositional", {4, 5}), ("relation", {3}), ("relation_compositional", {3})):
        f = g[split]["finding"]
        assert 0.0 <= f["own_acc50"] <= f["any_acc50"] <= 1.0 and 0.0 <= f["pointing_own"] <= f["pointing_any"] <= 1.0
        assert set(int(k) for k in f["by_k"]) <= ks
        assert min(1 / k for k in ks) <= f["text_free"] <= max(1 / k for k in ks)
        assert sum(r["phrases"] for r in f["by_k"].values()) == f["phrases"] == sum(
            r["phrases"] for r in f["by_shared"].values())
        assert 0.0 <= f["text_free_caption"]["own_acc50"] <= f["text_free_caption"]["any_acc50"] <= 1.0
        assert "text_free_objectness" in f  # objective loupe: a region head
    for split in ("hard", "hard_compositional"):  # every named object has a colour and a shape twin
        f = g[split]["finding"]
        assert set(f["by_shared"]) == {"both"} and f["attribute_color"] <= 0.5 and f["attribute_shape"] <= 0.5
    for split in ("relation", "relation_compositional"):  # the target has an identical twin, the anchor none
        assert set(g[split]["finding"]["by_shared"]) == {"identical", "unique"}
    assert "filip" in saved["retrieval"] and 0.0 <= saved["retrieval"]["filip"]["t2i_r5"] <= 1.0
    assert saved["classification"]["classes"] == 6 and saved["classification"]["color_shape_classes"] == 60
    assert set(saved["detection"]["per_class_ap50"]) == set(ldata.SHAPES)
    md = open(str(tmp_path / "ev" / "eval.md")).read()
    assert "Acc@0.5" in md and "mAP@0.5" in md
    for name in ("grounding_examples", "interaction_maps", "detection_per_class", "training_curves"):
        p = res["figures"][name]
        assert os.path.getsize(p) > 1000 and open(p, "rb").read(4) == b"\x89PNG"


def test_validation_streams_are_measured_apart_from_the_test_splits(ckpt):
    kw = dict(num_test=12, num_compositional=12, num_single=8, num_hard=8, num_relation=8, figures=False,
              progress=False)
    val = E.evaluate_checkpoint(ckpt, None, validation=True, **kw)
    test = E.evaluate_checkpoint(ckpt, None, **kw)
    assert val["data"]["validation"] is True and test["data"]["validation"] is False
    assert "hard" in val["grounding"] and "hard_compositional" not in val["grounding"]
    assert val["grounding"]["compositional"]["acc50"] is None  # no compositional stream for validation
    assert val["grounding"]["hard"]["finding"] != test["grounding"]["hard"]["finding"]


def test_same_numbers_twice_and_an_untrained_model_is_near_chance(ckpt):
    a = E.evaluate_checkpoint(ckpt, None, num_test=30, num_compositional=0, num_single=20, figures=False,
                              num_hard=0, num_relation=0, progress=False)
    b = E.evaluate_checkpoint(ckpt, None, num_test=30, num_compositional=0, num_single=20, figures=False,
                              num_hard=0, num_relation=0, progress=False)
    assert a["grounding"]["test"] == b["grounding"]["test"] and a["retrieval"] == b["retrieval"]
    assert a["grounding"]["acc50_compositional"] is None  # skipped split: null, not a made-up number
    # a random model: retrieval R@10 of 30 pairs far from perfect
    assert a["retrieval"]["i2t_r10"] < 0.9


def test_evaluating_a_run_that_still_trains_says_so(make_checkpoint, tmp_path, capsys):
    from loupe.checkpoint import RunLock
    ck = make_checkpoint(tmp_path / "run")
    kw = dict(num_test=6, num_compositional=0, num_single=0, num_hard=0, num_relation=0, figures=False,
              progress=False)
    assert E.evaluate_checkpoint(ck, None, **kw)["still_training"] is False
    assert "still being trained" not in capsys.readouterr().err
    lock = RunLock(ck).acquire()
    try:
        res = E.evaluate_checkpoint(ck, None, **kw)
    finally:
        lock.release()
    err = capsys.readouterr().err
    assert res["still_training"] is True and res["step"] == 7
    assert "still being trained" in err and f"pid {os.getpid()}" in err and "step 7" in err


def test_grounding_metric_counts_a_planted_answer(ckpt, monkeypatch):
    """Replace the encoders so that phrases and patches carry the true boxes: Acc@0.5 and pointing 1."""
    model, _ = checkpoint.load_checkpoint(ckpt)
    ds = ldata.build_dataset("synthetic", "test", seed=3, size=12)
    D, g, p = model.config.embed_dim, model.grid_size, model.config.patch_size
    from loupe.data import oracle_iou
    planted = {}
    for i in range(len(ds)):
        sc = ds.scene(i, render=False)
        planted[i] = [oracle_iou(tuple(float(v) for v in b), 64, 8)[1] for b in sc.boxes]

    state = {}

    def enc_img(images):
        B = images.shape[0]
        idx = state["index"]
        x = torch.zeros(B, g, g, D)
        x[..., D - 1] = 1.0
        for b in range(B):
            for k, (x0, y0, x1, y1) in enumerate(planted[int(idx[b])]):
                x[b, y0 // p:y1 // p, x0 // p:x1 // p] = 0.0
                x[b, y0 // p:y1 // p, x0 // p:x1 // p, k] = 1.0
        x = x.reshape(B, g * g, D)
        return x[:, 0], x

    orig_text = model.encode_text_tokens

    def enc_txt(input_ids, attention_mask=None):
        pooled, tokens, wmask = orig_text(input_ids, attention_mask)
        t = torch.zeros_like(tokens)
        spans = state["spans"]
        for b in range(t.shape[0]):
            for k in range(spans.shape[1]):
                s, e = spans[b, k].tolist()
                t[b, s:e, k] = 1.0
        return pooled, t, wmask

    real_batches = E._batches

    def batches(ds_, n, collate, bs):
        for items, batch in real_batches(ds_, n, collate, bs):
            state["index"], state["spans"] = batch["index"], batch["phrase_spans"]
            yield items, batch

    monkeypatch.setattr(model, "encode_image_tokens", enc_img)
    monkeypatch.setattr(model, "encode_text_tokens", enc_txt)
    monkeypatch.setattr(E, "_batches", batches)
    rec, _, _ = E._encode_split(model, ds, len(ds), E.EvalOptions(progress=False), "x", regions=False)
    s = E._summarise_grounding(rec)
    assert s["phrases"] == sum(len(v) for v in planted.values())
    assert s["acc50"] == 1.0 and s["pointing"] == 1.0


def test_ground_returns_boxes_in_input_pixels(ckpt):
    model, _ = checkpoint.load_checkpoint(ckpt)
    img = (torch.rand(3, 48, 96) * 255).to(torch.uint8)
    res = ground(model, img, "a small red circle left of a big blue square", top_k=3)
    assert [r["phrase"] for r in res] == ["a small red circle", "a big blue square"]
    for r in res:
        assert len(r["boxes"]) == 3 and r["scores"] == sorted(r["scores"], reverse=True)
        x0, y0, x1, y1 = r["box"]
        # the centre crop of a 96x48 image is columns 24..72: boxes map back inside it
        assert 24 - 1e-6 <= x0 < x1 <= 72 + 1e-6 and 0 <= y0 < y1 <= 48 + 1e-6
    one = ground(model, img, "ring")
    assert len(one) == 1 and one[0]["phrase"] == "ring"
    with pytest.raises(ValueError, match="text"):
        ground(model, img, "   ")


def test_lone_phrases_are_encoded_beside_partners(ckpt):
    """``encode_lone_phrases`` = the normalised mean of the phrase's features in each context caption;
    ``ground`` uses it for a text with one phrase, and class prompts use it with their templates."""
    from loupe.model import LONE_PHRASE_PARTNERS
    model, _ = checkpoint.load_checkpoint(ckpt)
    assert model.config.text_center_words
    got = model.encode_lone_phrases(["a red circle", "a ring"])
    want = []
    for ph in ("a red circle", "a ring"):
        caps = [f"{ph} next to {q}" for q in LONE_PHRASE_PARTNERS]
        f, m = model.encode_phrases(caps, [[(0, len(ph))]] * len(caps))
        assert bool(m.all())
        want.append(torch.nn.functional.normalize(f[:, 0].float().mean(0), dim=-1))
    assert torch.allclose(got, torch.stack(want), atol=1e-6)
    assert torch.allclose(got.norm(dim=-1), torch.ones(2), atol=1e-6)
    # alone, a phrase that is its whole caption centres to (near) noise: a different feature
    alone, _ = model.encode_phrases(["a red circle"], [[(0, 12)]])
    assert float(alone[0, 0].float() @ got[0]) < 0.999
    # templates: one '{}' each
    t = model.encode_lone_phrases("a ring", templates=("there is {}", "{} in the scene"))
    assert t.shape == (1, model.config.embed_dim)
    with pytest.raises(ValueError, match="template"):
        model.encode_lone_phrases("a ring", templates=("no slot",))
    with pytest.raises(ValueError, match="non-empty"):
        model.encode_lone_phrases(["a ring", " "])
    # ground on a single phrase scores with the same feature
    img = (torch.rand(3, 32, 32) * 255).to(torch.uint8)
    from loupe import regions as R
    from loupe.ground import prepare_image
    res = ground(model, img, "a red circle", top_k=1)
    x, _, _ = prepare_image(model, img, "center")
    _, patches = model.encode_image_tokens(x)
    g = model.grid_size
    sc = R.grounding_scores(got[:1][None], patches.float(), g, g)[0, 0]
    assert abs(float(sc.max()) - res[0]["score"]) < 1e-5


def _cli(args, timeout=120):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=REPO)


def test_cli_errors_for_missing_and_incompatible_checkpoints(tmp_path, make_checkpoint):
    p = _cli(["loupe.evaluate", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "x.json")])
    assert p.returncode == 2 and "does not exist" in p.stderr
    bad = make_checkpoint(tmp_path / "bad")
    ck = torch.load(os.path.join(bad, "model.pt"), weights_only=True)
    ck["config"]["embed_dim"] = 48  # the weights no longer fit the config
    torch.save(ck, os.path.join(bad, "model.pt"))
    p = _cli(["loupe.evaluate", "--checkpoint", bad, "--out", str(tmp_path / "x.json"), "--no-progress"])
    assert p.returncode == 2 and "does not fit" in p.stderr, p.stderr
    ck["config"]["no_such_field"] = 1
    torch.save(ck, os.path.join(bad, "model.pt"))
    p = _cli(["loupe.evaluate", "--checkpoint", bad, "--out", str(tmp_path / "x.json"), "--no-progress"])
    assert p.returncode == 2 and "incompatible config" in p.stderr, p.stderr
    assert not os.path.exists(tmp_path / "x.json")


def test_cli_evaluate_and_ground(ckpt, tmp_path):
    out = str(tmp_path / "e.json")
    p = _cli(["loupe.evaluate", "--checkpoint", ckpt, "--out", out, "--num-test", "20", "--num-compositional", "10",
              "--num-single", "10", "--num-hard", "8", "--num-relation", "0", "--no-figures"])
    assert p.returncode == 0, p.stderr
    assert "| grounding |" in p.stdout and os.path.exists(out)
    assert "encode (test)" in p.stderr  # the progress bar
    from PIL import Image
    Image.fromarray(ldata.build_dataset("synthetic", "test", seed=3, size=1)[0]["image"].numpy().transpose(1, 2, 0)
                    ).save(tmp_path / "im.png")
    p = _cli(["loupe.ground", "--checkpoint", ckpt, str(tmp_path / "im.png"), "a red circle and a blue square",
              "--out", str(tmp_path / "g.png")])
    assert p.returncode == 0, p.stderr
    lines = [json.loads(x) for x in p.stdout.strip().splitlines()]
    assert [x["phrase"] for x in lines] == ["a red circle", "a blue square"]
    assert all(x["unknown_words"] == 0 and x["known_words"] == 3 for x in lines)
    assert "warning" not in p.stderr
    assert open(tmp_path / "g.png", "rb").read(4) == b"\x89PNG"
    # text the model cannot read: still a box, but flagged and warned about
    for text in ("!!!???", "一个红色的圆"):
        p = _cli(["loupe.ground", "--checkpoint", ckpt, str(tmp_path / "im.png"), text, "--out", str(tmp_path / "u.png")])
        assert p.returncode == 0, p.stderr
        (r,) = [json.loads(x) for x in p.stdout.strip().splitlines()]
        assert r["known_words"] == 0 and r["unknown_words"] >= 1 and r["box"] is not None
        assert "holds no word the model knows" in p.stderr


def test_post_hoc_word_centring_is_the_centred_pointing_of_the_trained_model(tmp_path, make_checkpoint):
    ck = make_checkpoint(tmp_path / "nocentre", text_center_words=False)
    kw = dict(num_test=24, num_compositional=0, num_single=8, num_hard=0, num_relation=0, figures=False,
              progress=False)
    plain = E.evaluate_checkpoint(ck, None, **kw)
    post = E.evaluate_checkpoint(ck, None, center_words=True, **kw)
    assert plain["text_center_words"] == {"trained": False, "evaluated": False}
    assert post["text_center_words"] == {"trained": False, "evaluated": True}
    # the plain run's post-hoc column is what the centred evaluation measures as its main figure
    assert post["grounding"]["pointing"] == pytest.approx(plain["grounding"]["pointing_word_centred"], abs=1e-12)
    assert post["grounding"]["test"] != plain["grounding"]["test"]
    model, _ = load_checkpoint(ck, "cpu")
    E.evaluate_model(model, E.EvalOptions(center_words=True, **kw))
    assert model.config.text_center_words is False  # the override is for the evaluation only
    with pytest.raises(ValueError, match="center_words"):
        E.evaluate_model(model, E.EvalOptions(center_words="yes", **kw))
