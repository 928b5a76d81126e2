"""Fashion-MNIST and emoji scenes (skipped with the reason when their packages are missing), and the preview CLI."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import loupe.data as ld
from loupe.data import real

FASHION_OK, FASHION_WHY = real.fashion_available()
EMOJI_OK, EMOJI_WHY = real.emoji_available()


def _check_scenes(ds, n=60):
    gen = ds.generator
    for i in range(n):
        sc = ds.scene(i)
        _, inst = gen.render(sc, instance_masks=True)
        for j in range(len(sc.phrases)):
            ys, xs = np.nonzero(inst == j)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == tuple(sc.boxes[j].astype(int))
            s, e = sc.spans[j]
            assert sc.caption[s:e] == sc.phrases[j]
            assert ds.class_names[sc.shape_ids[j]] in sc.phrases[j]
    assert ld.oracle_grounding(ds, n)["accuracy"] == 1.0


@pytest.mark.skipif(not FASHION_OK, reason=FASHION_WHY)
def test_fashion_scenes():
    a = ld.build_dataset("fashion", "train", seed=0, size=60)
    b = ld.build_dataset("fashion", "train", seed=0, size=60)
    assert a[7]["caption"] == b[7]["caption"] and (a[7]["image"] == b[7]["image"]).all()
    _check_scenes(a)
    t = ld.build_dataset("fashion", "test", seed=0, size=60)
    _check_scenes(t)
    comp = ld.build_dataset("fashion", "compositional", seed=0, size=100)
    assert {p for i in range(100) for p in zip(comp.scene(i, False).shape_ids, comp.scene(i, False).color_ids)} \
        <= set(comp.generator.heldout)


@pytest.mark.skipif(not EMOJI_OK, reason=EMOJI_WHY)
def test_emoji_scenes():
    ds = ld.build_dataset("emoji", "train", seed=0, size=60)
    assert len(ds.class_names) >= 200
    _check_scenes(ds)
    with pytest.raises(ValueError, match="no colours"):
        ld.build_dataset("emoji", "compositional")


def test_missing_packages_raise_clear_error(monkeypatch):
    monkeypatch.setattr(real, "FASHION_DIR", "/nonexistent")
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        ld.build_dataset("fashion", "train", size=10)
    monkeypatch.setattr(real, "EMOJI_FONT", "/nonexistent.ttf")
    with pytest.raises(FileNotFoundError, match="fonts-noto-color-emoji"):
        ld.build_dataset("emoji", "train", size=10)


@pytest.mark.parametrize("kind", ["synthetic",
                                  pytest.param("fashion", marks=pytest.mark.skipif(not FASHION_OK, reason=FASHION_WHY)),
                                  pytest.param("emoji", marks=pytest.mark.skipif(not EMOJI_OK, reason=EMOJI_WHY))])
def test_preview_cli(tmp_path, kind):
    out = tmp_path / f"{kind}.png"
    subprocess.run([sys.executable, "-m", "loupe.data", "preview", "--dataset-type", kind, "--out", str(out),
                    "--n", "4"], check=True, capture_output=True,
                   cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    im = np.asarray(Image.open(out).convert("RGB"))
    assert im.shape[0] > 256 and im.shape[1] > 256
    # box outlines in the palette colours were drawn
    assert ((im[..., 0] == 255) & (im[..., 1] == 64) & (im[..., 2] == 64)).sum() > 50
