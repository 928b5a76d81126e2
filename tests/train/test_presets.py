"""Issue 22: model presets by name (``--model``, ``--list-models``, ``loupe/configs/<name>.json``),
the candidate-box machinery at 14x14 / 16x16 grids, and a ViT-B-16 LOUPE training step on CPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import loupe
import loupe.train as train_mod
from loupe import regions as R
from loupe.config import (CONFIG_DIR, DEFAULT_MODEL, LoupeConfig, list_models, model_preset,
                          preset_config)

from .test_train import env, launch_cmd, read_log, run

TRAIN = train_mod.__file__

#: open_clip's sizes (open_clip/model_configs/*.json) and the grids they give
OPEN_CLIP = {
    "ViT-B-32": dict(image_size=224, patch_size=32, vision_width=768, vision_layers=12, vision_heads=12,
                     text_width=512, text_layers=12, text_heads=8, context_length=77, embed_dim=512),
    "ViT-B-16": dict(image_size=224, patch_size=16, vision_width=768, vision_layers=12, vision_heads=12,
                     text_width=512, text_layers=12, text_heads=8, context_length=77, embed_dim=512),
    "ViT-L-14": dict(image_size=224, patch_size=14, vision_width=1024, vision_layers=24, vision_heads=16,
                     text_width=768, text_layers=12, text_heads=12, context_length=77, embed_dim=768),
}
GRIDS = {"loupe-tiny": 8, "ViT-B-32": 7, "ViT-B-16": 14, "ViT-L-14": 16}


def test_presets_are_shipped_and_match_open_clip():
    assert list_models() == ["loupe-tiny", "ViT-B-16", "ViT-B-32", "ViT-L-14"]
    assert DEFAULT_MODEL == "loupe-tiny"
    assert preset_config("loupe-tiny") == LoupeConfig()  # the default model is the tiny one, unchanged
    for name, sizes in OPEN_CLIP.items():
        assert {k: model_preset(name)[k] for k in sizes} == sizes, name
    for name in list_models():
        c = preset_config(name)
        assert c.grid_size == GRIDS[name]
        with open(os.path.join(CONFIG_DIR, f"{name}.json")) as f:
            assert json.load(f)["description"]
    with pytest.raises(ValueError, match="known: loupe-tiny"):
        model_preset("ViT-H-14")


def test_list_models_and_model_flags():
    for cmd in ([sys.executable, TRAIN, "--list-models"], [sys.executable, "-m", "loupe.train", "--list-models"]):
        p = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr[-2000:]
        for name in list_models():
            assert name in p.stdout
        assert "loupe-tiny (default)" in p.stdout and "grid 14x14, 11025 candidate boxes" in p.stdout
        assert "grid 16x16, 18496 candidate boxes" in p.stdout
    p = subprocess.run([sys.executable, TRAIN, "--model", "ViT-Z"], env=env(), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and "is not a preset; known: loupe-tiny, ViT-B-16" in p.stderr
    # --model-config applies on top of the preset, and is validated with it
    p = subprocess.run([sys.executable, TRAIN, "--model", "ViT-B-16", "--model-config", '{"patch_size": 15}'],
                       env=env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "image_size (224) must be a multiple of patch_size (15)" in p.stderr
    args = train_mod.parse_args(["--model", "ViT-B-16", "--model-config", '{"vision_layers": 2}',
                                 "--output", "/tmp/loupe-presets-unused"])
    fields = train_mod.model_fields(args, vocab_size=99)
    assert fields["vision_layers"] == 2 and fields["vision_width"] == 768 and fields["vocab_size"] == 99
    assert fields["objective"] == "loupe"


@pytest.mark.parametrize("h, w", [(8, 8), (5, 7), (1, 3)])
@pytest.mark.parametrize("threshold", [0.5, 0.3, 0.7, 1.0, 0.123])
def test_suppression_matrix_is_the_direct_comparison(h, w, threshold):
    boxes = R.candidate_boxes(h, w)
    got = R.suppression_matrix(boxes, threshold, chunk=37)
    assert got.dtype == torch.bool and torch.equal(got, R.box_iou(boxes, boxes) > threshold)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_candidate_buffers_at_the_vit_grids():
    """Building the K x K NMS matrix directly peaked at 10.6 GB (14x14) and about 30 GB (16x16)."""
    code = ("import resource, torch; from loupe import regions as R; b = R.candidate_boxes(16, 16); "
            "s = R.suppression_matrix(b, 0.5); assert s.shape == (18496, 18496) and bool(s.diagonal().all()); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    p = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True, timeout=280)
    assert p.returncode == 0, p.stderr[-2000:]
    peak_mb = int(p.stdout.split()[-1]) / 1024
    assert peak_mb < 2500, peak_mb  # the 342 MB matrix, the interpreter and torch


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_vit_b16_loupe_trains_one_step_at_batch_2(tmp_path):
    """The full ViT-B-16 preset (224 px, 14x14 grid, 11025 candidate boxes, about 125M parameters with
    the built-in vocabulary), LOUPE objective, through the DeepSpeed trainer on CPU: about 1-2 min
    on the 2-core machine (model build, one step, the checkpoint of about 1.5 GB)."""
    out = tmp_path / "vitb16"
    cmd = launch_cmd(out, steps=1, objective="loupe")
    cmd = cmd[:cmd.index("--model-config")]  # the preset as it is
    cmd[cmd.index("--batch-size") + 1] = "2"
    cmd[cmd.index("--train-size") + 1] = "16"
    cmd += ["--model", "ViT-B-16", "--diag-every", "1"]
    run(cmd, timeout=840)
    (rec,) = read_log(out)
    assert rec["step"] == 1 and all(v is None or v == v for v in rec.values())
    for key in ("loss", "loss_tsa", "loss_fsa", "loss_ua", "val_top_patch_share", "val_patch_pair_cos"):
        assert rec[key] is not None and abs(rec[key]) < 1e6, key
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["model"] == "ViT-B-16"
    assert {k: saved["model"][k] for k in OPEN_CLIP["ViT-B-16"]} == OPEN_CLIP["ViT-B-16"]
    model = loupe.load(str(out))
    assert model.candidate_boxes.shape[0] == 11025
    with torch.no_grad():
        emb = model.encode_image(torch.zeros(1, 3, 224, 224))
    assert emb.shape == (1, 512) and torch.isfinite(emb).all()
