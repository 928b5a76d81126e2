"""Real-image catalogs that install offline: Fashion-MNIST photos and Noto colour emoji.

Both plug into :class:`loupe.data.scenes.SceneGenerator`, so their scenes, captions, boxes and
splits come from the same code path as the synthetic shapes.

- Fashion-MNIST (Debian ``dataset-fashion-mnist``): 10 clothing classes, grayscale photos tinted
  with one of the named colours (phrases like "a large red sneaker"); train/val scenes use the
  official training images (last 5000 for val), test scenes the official test images.
- Emoji (Debian ``fonts-noto-color-emoji`` + PyPI ``emoji``): a few hundred named objects, animals,
  plants and foods rendered from the colour font; phrases like "a small red apple".
"""
from __future__ import annotations

import gzip
import os
import unicodedata
from functools import lru_cache

import numpy as np

from .scenes import Catalog, _crop_to_mask

__all__ = ["FashionCatalog", "EmojiCatalog", "fashion_available", "emoji_available",
           "FASHION_DIR", "EMOJI_FONT"]

FASHION_DIR = os.environ.get("LOUPE_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
EMOJI_FONT = os.environ.get("LOUPE_EMOJI_FONT", "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                   "bag", "ankle boot")


def fashion_available() -> tuple[bool, str]:
    """``(available, reason)`` for the Fashion-MNIST files."""
    need = [os.path.join(FASHION_DIR, f"{p}-{k}-idx{d}-ubyte.gz")
            for p in ("train", "t10k") for k, d in (("images", 3), ("labels", 1))]
    missing = [p for p in need if not os.path.exists(p)]
    if missing:
        return False, (f"Fashion-MNIST not found ({missing[0]} missing): install the Debian package "
                       f"dataset-fashion-mnist or set LOUPE_FASHION_MNIST_DIR")
    return True, ""


def emoji_available() -> tuple[bool, str]:
    """``(available, reason)`` for the emoji font and the ``emoji`` package."""
    if not os.path.exists(EMOJI_FONT):
        return False, (f"emoji font {EMOJI_FONT} not found: install the Debian package "
                       f"fonts-noto-color-emoji or set LOUPE_EMOJI_FONT")
    try:
        import emoji  # noqa: F401
    except ImportError:
        return False, "the PyPI package 'emoji' is not installed (pip install emoji)"
    return True, ""


@lru_cache(maxsize=4)
def _read_idx(path: str) -> np.ndarray:
    raw = gzip.open(path).read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _resize(arr: np.ndarray, side: int, mode) -> np.ndarray:
    """Resize ``[h, w]`` or ``[h, w, c]`` uint8 so its longer side is ``side``."""
    from PIL import Image
    h, w = arr.shape[:2]
    k = side / max(h, w)
    size = (max(1, round(w * k)), max(1, round(h * k)))
    return np.asarray(Image.fromarray(arr).resize(size, mode))


class FashionCatalog(Catalog):
    """Fashion-MNIST photos, tinted with a named colour."""

    name = "fashion"
    nouns = FASHION_CLASSES
    colored = True
    small_sides = (16, 19)
    large_sides = (24, 30)

    def __init__(self, root: str | None = None) -> None:
        global FASHION_DIR
        if root is not None:
            FASHION_DIR = root
        ok, why = fashion_available()
        if not ok:
            raise FileNotFoundError(why)
        self._root = FASHION_DIR
        self._by_class: dict[str, list[np.ndarray]] = {}

    def _pool(self, split: str) -> list[np.ndarray]:
        part = "t10k" if split in ("test", "compositional", "single") else "train"
        key = part + ("-val" if split == "val" else "")
        if key not in self._by_class:
            images = _read_idx(os.path.join(self._root, f"{part}-images-idx3-ubyte.gz"))
            labels = _read_idx(os.path.join(self._root, f"{part}-labels-idx1-ubyte.gz"))
            idx = np.arange(len(labels))
            if part == "train":
                idx = idx[-5000:] if split == "val" else idx[:-5000]
            self._by_class[key] = [idx[labels[idx] == c] for c in range(10)]
            self._images = getattr(self, "_images", {})
            self._images[part] = images
        return self._by_class[key], self._images[part]

    def num_instances(self, noun: int, split: str) -> int:
        return len(self._pool(split)[0][noun])

    def sprite(self, noun, color, side, instance, rgb, split="train"):
        pool, images = self._pool(split)
        gray = images[pool[noun][instance]]
        fg = gray > 24
        gray = gray[np.ix_(np.flatnonzero(fg.any(1)), np.flatnonzero(fg.any(0)))]
        g = _resize(np.ascontiguousarray(gray), side, 2)  # bilinear
        mask = g > 40
        shade = 0.35 + 0.65 * (g.astype(np.float32) / 255.0)
        col = np.array(rgb if rgb is not None else (200, 200, 200), np.float32)
        out = np.clip(shade[None] * col[:, None, None] * 1.1, 0, 255).astype(np.uint8)
        spr, mask = _crop_to_mask(out.transpose(1, 2, 0), mask)
        return np.ascontiguousarray(spr.transpose(2, 0, 1)), mask


def _emoji_name(code: str) -> str:
    name = code.strip(":").replace("_", " ").lower()
    name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    return " ".join(name.split())


_EMOJI_RANGES = ((0x1F330, 0x1F37F), (0x1F380, 0x1F393), (0x1F3A0, 0x1F3C2), (0x1F3C8, 0x1F3D3),
                 (0x1F400, 0x1F43E), (0x1F4A1, 0x1F4A1), (0x1F4BB, 0x1F4DF), (0x1F680, 0x1F6A4),
                 (0x1F941, 0x1F9AF), (0x1F9C0, 0x1F9FF))
_EMOJI_SKIP = ("face", "person", "man", "woman", "people", "hand", "sign", "symbol", "button",
               "flag", "family", "skin", "mark", "card", "arrow", "zombie", "fairy", "vampire",
               "mage", "elf", "genie", "merperson", "superhero", "supervillain", "ninja", "kiss",
               "couple", "baby", "child", "adult", "boy", "girl", "older", "sign", "tone")


@lru_cache(maxsize=1)
def _emoji_table() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(characters, names)`` of the usable emoji, sorted by code point."""
    import emoji
    chars, names = [], []
    for ch, info in sorted(emoji.EMOJI_DATA.items()):
        base = ch.replace("\ufe0f", "")
        if len(base) != 1 or info.get("status", 2) != 2:
            continue
        cp = ord(base)
        if not any(lo <= cp <= hi for lo, hi in _EMOJI_RANGES):
            continue
        name = _emoji_name(info["en"])
        words = name.split()
        if not words or len(words) > 3 or any(w in _EMOJI_SKIP for w in words) or not name.isascii():
            continue
        if any(not (w.replace("-", "").isalpha()) for w in words):
            continue
        chars.append(ch)
        names.append(name)
    return tuple(chars), tuple(names)


@lru_cache(maxsize=1)
def _emoji_font():
    from PIL import ImageFont
    return ImageFont.truetype(EMOJI_FONT, 109)


@lru_cache(maxsize=None)
def _emoji_glyph(ch: str) -> np.ndarray | None:
    """RGBA ``[h, w, 4]`` of one emoji cropped to its alpha, or None when the font lacks it."""
    from PIL import Image, ImageDraw
    im = Image.new("RGBA", (160, 160), (0, 0, 0, 0))
    ImageDraw.Draw(im).text((10, 10), ch, font=_emoji_font(), embedded_color=True)
    bbox = im.getchannel("A").point(lambda a: 255 if a > 127 else 0).getbbox()
    if bbox is None:
        return None
    arr = np.asarray(im.crop(bbox))
    # tofu/notdef boxes are hollow grey squares: reject glyphs without colour
    rgb = arr[..., :3].astype(int)
    if (rgb.max(-1) - rgb.min(-1))[arr[..., 3] > 127].mean() < 8:
        return None
    return arr


class EmojiCatalog(Catalog):
    """Named emoji (objects, animals, plants, food) from the Noto colour emoji font."""

    name = "emoji"
    colored = False
    small_sides = (16, 19)
    large_sides = (24, 30)

    def __init__(self, max_classes: int | None = None) -> None:
        ok, why = emoji_available()
        if not ok:
            raise FileNotFoundError(why)
        chars, names = _emoji_table()
        keep_c, keep_n, seen = [], [], set()
        for ch, nm in zip(chars, names):
            if nm in seen or _emoji_glyph(ch) is None:
                continue
            seen.add(nm)
            keep_c.append(ch)
            keep_n.append(nm)
            if max_classes and len(keep_c) >= max_classes:
                break
        self.chars, self.nouns = tuple(keep_c), tuple(keep_n)

    @lru_cache(maxsize=None)
    def _sized(self, noun: int, side: int):
        arr = _resize(_emoji_glyph(self.chars[noun]), side, 1)  # LANCZOS
        spr, mask = _crop_to_mask(arr[..., :3], arr[..., 3] > 127)
        return np.ascontiguousarray(spr.transpose(2, 0, 1)), mask

    def sprite(self, noun, color, side, instance, rgb, split="train"):
        return self._sized(noun, side)
