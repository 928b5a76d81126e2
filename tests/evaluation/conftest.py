"""Shared by the evaluation tests: a tiny untrained checkpoint in the layout of loupe/train.py."""
from __future__ import annotations

import json
import os

import pytest
import torch

from loupe import data as ldata
from loupe.config import LoupeConfig
from loupe.model import LoupeModel

TINY = {"vision_width": 32, "vision_layers": 1, "vision_heads": 2, "text_width": 32, "text_layers": 1,
        "text_heads": 2, "embed_dim": 32, "region_hidden": 32}

def save_checkpoint(directory, objective="loupe", seed=3, **overrides) -> str:
    """model.pt / config.json / tokenizer.json / log.jsonl in the layout of loupe/train.py."""
    os.makedirs(directory, exist_ok=True)
    tok = ldata.fit_tokenizer(ldata.build_dataset("synthetic", "train", seed=seed, size=300))
    tok.save(os.path.join(directory, "tokenizer.json"))
    cfg = LoupeConfig(**{**TINY, **overrides, "vocab_size": tok.vocab_size, "objective": objective})
    torch.manual_seed(0)
    model = LoupeModel(cfg)
    torch.save({"config": cfg.to_dict(), "state_dict": model.state_dict(), "step": 7},
               os.path.join(directory, "model.pt"))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"model": cfg.to_dict(), "train": {"seed": seed, "dataset_type": "synthetic",
                                                      "objective": objective}}, f)
    with open(os.path.join(directory, "log.jsonl"), "w") as f:
        for s in range(1, 8):
            f.write(json.dumps({"step": s, "lr": 1e-3, "loss": 5.0 / s, "loss_cmc": 4.0 / s, "logit_scale": 14.3})
                    + "\n")
    return str(directory)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """One tiny LOUPE checkpoint (data seed 3, step 7) per test module."""
    return save_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture
def make_checkpoint():
    return save_checkpoint
