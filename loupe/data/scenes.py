"""Grounded scene generation shared by the synthetic, Fashion-MNIST and emoji sets.

A scene is 1-3 non-overlapping objects pasted on a lightly textured background. Each object is a
sprite (an RGB patch and a hard mask, cropped to the mask's tight bounding box) from a *catalog*;
the catalog decides what the objects look like (drawn shapes, Fashion-MNIST photos, emoji glyphs),
everything else (placement, phrases, captions, boxes, splits) is this one code path.

Everything is a pure function of ``(seed, split, index)``: each sample draws from its own
``random.Random`` stream, so samples can be generated in any order, by any worker, on any rank.

Boxes are ``xyxy`` in continuous pixel coordinates: pixel column ``i`` covers ``[i, i + 1)``, so a
box is ``(first column, first row, last column + 1, last row + 1)`` of the object's drawn pixels,
and whole-patch boxes on an 8-pixel grid are exactly ``[8a, 8b)``.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

__all__ = ["SHAPES", "COLORS", "SPLITS", "CONTROLLED", "HELD_OUT_SPLITS", "Catalog", "ShapeCatalog", "Scene",
           "SceneGenerator", "oracle_iou", "oracle_iou_bruteforce", "PATCH"]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "ring")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35), "green": (40, 165, 55), "blue": (40, 75, 220), "yellow": (240, 215, 35),
    "orange": (245, 135, 25), "purple": (135, 55, 185), "pink": (245, 125, 190),
    "cyan": (35, 210, 220), "white": (245, 245, 245), "black": (20, 20, 20),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
#: split name -> stream id. "compositional" holds only held-out colour-noun pairs (never in
#: train/val/test); "single" is one object per image (classification), seen pairs only.
#: Scenes with controlled distractors [ours] (see :meth:`SceneGenerator.controlled_scene`):
#: "hard" (every named object has an unnamed twin in colour and one in shape, so neither attribute
#: alone identifies it) and "relation" (two identical objects told apart only by their relation to
#: a third), each with a validation stream (``val_*``: for choosing defaults), a test stream, a
#: compositional stream (held-out pairs) and a training stream (``train_*``: for ``hard_mix``).
SPLITS: dict[str, int] = {"train": 1, "val": 2, "test": 3, "compositional": 4, "single": 5,
                          "hard": 6, "relation": 7, "hard_compositional": 8, "relation_compositional": 9,
                          "val_hard": 10, "val_relation": 11, "train_hard": 12, "train_relation": 13}
DEFAULT_SIZES: dict[str, int] = {"train": 50000, "val": 1000, "test": 1000, "compositional": 1000,
                                 "single": 1000, "hard": 1000, "relation": 1000, "hard_compositional": 1000,
                                 "relation_compositional": 1000, "val_hard": 1000, "val_relation": 1000,
                                 "train_hard": 50000, "train_relation": 50000}
#: the controlled family of a split ("hard" or "relation"), None for the plain scenes
CONTROLLED: dict[str, str] = {k: ("hard" if "hard" in k else "relation") for k in SPLITS
                              if "hard" in k or "relation" in k}
#: splits that draw held-out colour-noun pairs
HELD_OUT_SPLITS = ("compositional", "hard_compositional", "relation_compositional")
PATCH = 8
SIZE_WORDS = {0: ("small", "small", "small", "little", "tiny"), 1: ("large", "large", "large", "big")}
SIZE_NAMES = ("small", "large")

REL_WORDS = {
    "left": ("left of", "to the left of", "on the left of"),
    "right": ("right of", "to the right of", "on the right of"),
    "above": ("above", "over", "on top of"),
    "below": ("below", "under", "beneath"),
    "near": ("next to", "beside", "near"),
}
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above", "near": "near"}
# caption templates: {0},{1},{2} = phrases in mention order, {r01} = relation of 0 to 1 etc.
TEMPLATES = {
    1: ("{0}", "there is {0}", "a picture of {0}", "an image with {0}", "{0} on a textured background",
        "this shows {0}", "we can see {0}", "{0} in the scene"),
    2: ("{0} {r01} {1}", "{0} is {r01} {1}", "{0} sits {r01} {1}", "there is {0} {r01} {1}",
        "{0} and {1}", "{0} appears {r01} {1}", "{0} lies {r01} {1}", "we see {0} {r01} {1}"),
    3: ("{0} {r01} {1}, and {2}", "{0}, {1} and {2}", "{0} {r01} {1}, plus {2}",
        "there are {0}, {1} and {2}", "{0} is {r01} {1}, and {2} is {r21} it",
        "{0} sits {r01} {1}, which is {r12} {2}"),
}


# ------------------------------------------------------------------------------------------------
# geometry
# ------------------------------------------------------------------------------------------------
@lru_cache(maxsize=1 << 18)
def _oracle_int(box: tuple, image_size: int, patch: int):
    return oracle_iou.__wrapped__(box, image_size, patch)


def _cached_oracle(func):
    def wrapper(box, image_size: int = 64, patch: int = PATCH):
        key = tuple(box)
        if all(isinstance(v, int) for v in key):
            return _oracle_int(key, image_size, patch)
        return func(box, image_size, patch)
    wrapper.__wrapped__ = func
    wrapper.__doc__ = func.__doc__
    wrapper.__name__ = func.__name__
    return wrapper


@_cached_oracle
def oracle_iou(box, image_size: int = 64, patch: int = PATCH) -> tuple[float, tuple[int, int, int, int]]:
    """Best IoU any whole-patch box reaches with ``box``, and that box (``patch``-pixel grid).

    Exact: in each dimension the best start is the grid line just below or just above the box's
    start (moving further out only adds outside area, further in only removes inside area), and
    likewise for the end, so at most 4 x 4 candidates need scoring.
    """
    def cands(lo, hi):
        a = {min(image_size - patch, int(lo // patch) * patch), min(image_size - patch, -int(-lo // patch) * patch)}
        b = {max(patch, int(hi // patch) * patch), max(patch, -int(-hi // patch) * patch)}
        return [(s, e) for s in a for e in b if e > s]
    x0, y0, x1, y1 = (float(v) for v in box)
    area = (x1 - x0) * (y1 - y0)
    best, arg = -1.0, (0, 0, patch, patch)
    for sx, ex in cands(x0, x1):
        ix = max(0.0, min(ex, x1) - max(sx, x0))
        for sy, ey in cands(y0, y1):
            inter = ix * max(0.0, min(ey, y1) - max(sy, y0))
            iou = inter / (area + (ex - sx) * (ey - sy) - inter)
            if iou > best:
                best, arg = iou, (sx, sy, ex, ey)
    return best, arg


def oracle_iou_bruteforce(box, image_size: int = 64, patch: int = PATCH) -> float:
    """Best IoU over all ``(g(g+1)/2)^2`` whole-patch boxes (the reference for :func:`oracle_iou`)."""
    g = image_size // patch
    iv = np.array([(a * patch, b * patch) for a in range(g) for b in range(a + 1, g + 1)], np.float64)
    ix = np.clip(np.minimum(iv[:, 1], box[2]) - np.maximum(iv[:, 0], box[0]), 0, None)
    iy = np.clip(np.minimum(iv[:, 1], box[3]) - np.maximum(iv[:, 0], box[1]), 0, None)
    ln = iv[:, 1] - iv[:, 0]
    inter = iy[:, None] * ix[None, :]
    union = (box[2] - box[0]) * (box[3] - box[1]) + ln[:, None] * ln[None, :] - inter
    return float((inter / union).max())


# ------------------------------------------------------------------------------------------------
# catalogs: what an object looks like
# ------------------------------------------------------------------------------------------------
def _crop_to_mask(rgb: np.ndarray | None, mask: np.ndarray):
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        raise ValueError("empty sprite")
    sl = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    return (None if rgb is None else np.ascontiguousarray(rgb[sl])), np.ascontiguousarray(mask[sl])


@lru_cache(maxsize=None)
def shape_mask(shape: str, side: int) -> np.ndarray:
    """Hard mask of ``shape`` drawn in a ``side x side`` square, cropped to its tight box."""
    c = (np.arange(side) + 0.5) / side
    v, u = np.meshgrid(c, c, indexing="ij")  # v: rows (down), u: columns
    h = 0.5 / side
    du, dv = np.abs(u - 0.5), np.abs(v - 0.5)
    r2 = du ** 2 + dv ** 2
    if shape == "circle":
        m = r2 <= 0.25
    elif shape == "square":
        m = np.ones((side, side), bool)
    elif shape == "triangle":
        m = du <= v / 2 + h
    elif shape == "diamond":
        m = du + dv <= 0.5 + h
    elif shape == "cross":
        m = (du <= 0.18) | (dv <= 0.18)
    elif shape == "ring":
        m = (r2 <= 0.25) & (r2 >= 0.25 * 0.42)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return _crop_to_mask(None, m)[1]


class Catalog:
    """What objects look like. Subclasses set ``name``, ``nouns`` (class names, indexed by
    ``shape_id``), ``colored`` (objects take a named colour) and implement :meth:`sprite`."""

    name: str = "catalog"
    nouns: tuple[str, ...] = ()
    colored: bool = True
    small_sides: tuple[int, int] = (14, 18)
    large_sides: tuple[int, int] = (24, 30)

    def num_instances(self, noun: int, split: str) -> int:
        """How many distinct source instances the class has in ``split`` (1 for drawn shapes)."""
        return 1

    def sprite(self, noun: int, color: int, side: int, instance: int, rgb: tuple[int, int, int] | None,
               split: str = "train") -> tuple[np.ndarray | None, np.ndarray]:
        """``(rgb [3, h, w] uint8 or None for a flat fill with ``rgb``, mask [h, w] bool)``,
        both cropped to the mask's tight box; the longer side is at most ``side``."""
        raise NotImplementedError


class ShapeCatalog(Catalog):
    """Flat-coloured drawn shapes (the built-in synthetic set)."""

    name = "synthetic"
    nouns = SHAPES
    colored = True

    def sprite(self, noun, color, side, instance, rgb, split="train"):
        return None, shape_mask(self.nouns[noun], side)


# ------------------------------------------------------------------------------------------------
# scenes
# ------------------------------------------------------------------------------------------------
@dataclass
class Scene:
    """One grounded scene before preprocessing.

    ``phrases[k]`` is ``caption[spans[k][0]:spans[k][1]]`` and describes the object with
    ``boxes[k]`` (xyxy pixels), ``shape_ids[k]`` (index into the catalog's nouns), ``color_ids[k]``
    (index into :data:`COLOR_NAMES`, -1 when the catalog has no colours) and ``size_ids[k]``
    (0 small, 1 large). ``image`` is ``[3, H, W]`` uint8 (channels first) once rendered.
    ``other_*`` describe the objects the caption does not name (empty outside the controlled splits).
    """

    index: int
    caption: str
    phrases: list[str]
    spans: list[tuple[int, int]]
    boxes: np.ndarray
    shape_ids: list[int]
    color_ids: list[int]
    size_ids: list[int]
    labels: list[str]
    image: np.ndarray | None = None
    # objects the caption does not name (the distractors of the controlled splits): boxes [m, 4]
    # and attributes, in the same conventions
    other_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    other_shape_ids: list[int] = field(default_factory=list)
    other_color_ids: list[int] = field(default_factory=list)
    other_size_ids: list[int] = field(default_factory=list)
    # rendering parameters (private)
    _bg: tuple = field(default=(), repr=False)
    _objs: list = field(default_factory=list, repr=False)


@lru_cache(maxsize=1)
def _texture() -> np.ndarray:
    """A fixed smooth noise field (int16, +-12) that backgrounds crop from."""
    rng = np.random.default_rng(20220806)
    coarse = rng.normal(0, 1, (3, 66, 66)).astype(np.float32)
    fine = rng.normal(0, 1, (256, 256)).astype(np.float32)
    # bilinear 4x upsampling of the coarse field, then a little fine grain
    x = np.linspace(0, 64, 256, endpoint=False, dtype=np.float32)
    i0 = x.astype(int)
    f = x - i0
    up = coarse[:, i0] * (1 - f)[None, :, None] + coarse[:, i0 + 1] * f[None, :, None]
    up = up[:, :, i0] * (1 - f)[None, None, :] + up[:, :, i0 + 1] * f[None, None, :]
    tex = 7.0 * up.mean(0, keepdims=True) + 2.0 * up + 2.5 * fine[None]
    # stored as uint8 in 0..24 (noise + 12): adding a base of 83..146 never leaves 0..255
    return np.ascontiguousarray((np.clip(tex, -12, 12) + 12).round().astype(np.uint8))  # [3, 256, 256]


def _ri(r: random.Random, lo: int, hi: int) -> int:
    """Uniform int in ``[lo, hi]`` (faster than ``randint``; bias below 2^-50)."""
    return lo + int(r.random() * (hi - lo + 1))


def _choice(r: random.Random, seq):
    return seq[int(r.random() * len(seq))]


def _rr(r: random.Random, n: int) -> int:
    return int(r.random() * n)


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _fill_template(tmpl: str, order: list[int], phrases: list[str], rel: dict[str, str]):
    """Fill a caption template piece by piece (``{i}`` = the phrase of object ``order[i]``, ``{rij}``
    = a relation phrase), recording where each phrase lands: ``(caption, spans)``."""
    caption, spans = "", [None] * len(phrases)
    pos = 0
    while pos < len(tmpl):
        o = tmpl.find("{", pos)
        if o < 0:
            caption += tmpl[pos:]
            break
        caption += tmpl[pos:o]
        c = tmpl.index("}", o)
        key = tmpl[o + 1:c]
        if key.isdigit():
            obj = order[int(key)]
            if spans[obj] is None:  # (templates mention each object once)
                spans[obj] = (len(caption), len(caption) + len(phrases[obj]))
            caption += phrases[obj]
        else:
            caption += rel[key]
        pos = c + 1
    return caption, spans


def _rel_key(a, b) -> tuple[str, int]:
    """The left/right/above/below relation of box ``a`` to box ``b`` and the sign along its axis."""
    dx = (a[0] + a[2]) - (b[0] + b[2])
    dy = (a[1] + a[3]) - (b[1] + b[3])
    if abs(dx) >= abs(dy):
        return ("left" if dx < 0 else "right"), (1 if dx > 0 else -1)
    return ("above" if dy < 0 else "below"), (1 if dy > 0 else -1)


#: caption templates of the relation split: {0} the target, {1} the anchor, {r} the relation
RELATION_TEMPLATES = ("{0} {r} {1}", "{0} is {r} {1}", "{0} sits {r} {1}", "there is {0} {r} {1}",
                      "we see {0} {r} {1}", "{0} lies {r} {1}")


class SceneGenerator:
    """Deterministic grounded scenes from a catalog.

    ``seed`` fixes every sample and the held-out colour-noun pairs (``sample_seed``, when given,
    fixes the samples instead); ``image_size`` is the canvas
    side; ``max_objects`` in 1..3; whole-patch boxes (``patch`` pixels) reach IoU >= ``min_oracle_iou``
    with every object's box by construction (placements that miss it are redrawn).
    """

    def __init__(self, catalog: Catalog, seed: int = 0, image_size: int = 64, max_objects: int = 3,
                 patch: int = PATCH, min_oracle_iou: float = 0.5, holdout_per_noun: int = 1,
                 sample_seed: int | None = None) -> None:
        if not 1 <= max_objects <= 3:
            raise ValueError(f"max_objects must be 1..3, got {max_objects}")
        if image_size < 32:
            raise ValueError(f"image_size must be >= 32, got {image_size}")
        self.catalog, self.seed, self.image_size = catalog, int(seed), int(image_size)
        # the held-out colour-noun pairs follow ``seed`` (the training run's); the samples follow
        # ``sample_seed`` (default: ``seed``), so an evaluation can draw scenes no run has read while
        # keeping the run's compositional split compositional
        self.sample_seed = int(seed if sample_seed is None else sample_seed)
        self.max_objects, self.patch, self.min_oracle_iou = max_objects, patch, min_oracle_iou
        scale = image_size / 64.0
        self._sides = {0: tuple(max(4, round(s * scale)) for s in catalog.small_sides),
                       1: tuple(max(4, round(s * scale)) for s in catalog.large_sides)}
        self.heldout: frozenset[tuple[int, int]] = frozenset()
        if catalog.colored and holdout_per_noun > 0:
            r = random.Random(self.seed * 7919 + 17)
            held = set()
            colors = list(range(len(COLOR_NAMES)))
            r.shuffle(colors)
            for n in range(len(catalog.nouns)):
                for j in range(holdout_per_noun):
                    held.add((n, colors[(n * holdout_per_noun + j) % len(colors)]))
            self.heldout = frozenset(held)
        self._seen = [(n, c) for n in range(len(catalog.nouns))
                      for c in (range(len(COLOR_NAMES)) if catalog.colored else [-1])
                      if (n, c) not in self.heldout]
        self._held = sorted(self.heldout)

    # -- sampling -------------------------------------------------------------------------------
    def _rng(self, split: str, index: int) -> random.Random:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
        return random.Random((abs(self.sample_seed) << 40) + (SPLITS[split] << 36) + int(index)
                             + (1 << 62 if self.sample_seed < 0 else 0))

    def _place(self, r: random.Random, w: int, h: int, placed: list) -> tuple[int, int] | None:
        S, gap = self.image_size, 2
        for _ in range(40):
            x0, y0 = _ri(r, 1, S - 1 - w), _ri(r, 1, S - 1 - h)
            b = (x0, y0, x0 + w, y0 + h)
            if any(b[0] < p[2] + gap and p[0] < b[2] + gap and b[1] < p[3] + gap and p[1] < b[3] + gap
                   for p in placed):
                continue
            if self.min_oracle_iou > 0 and oracle_iou(b, S, self.patch)[0] < self.min_oracle_iou:
                continue
            return x0, y0
        return None

    def scene(self, split: str, index: int, render: bool = True) -> Scene:
        """Scene ``index`` of ``split``; ``render=False`` skips drawing (caption and boxes only)."""
        if split in CONTROLLED:
            return self.controlled_scene(split, index, render)
        r = self._rng(split, index)
        cat = self.catalog
        n_obj = 1 if split == "single" else _ri(r, 1, self.max_objects)
        pairs = self._held if split == "compositional" else self._seen
        if not pairs:
            raise ValueError(f"{cat.name}: split {split!r} has no colour-noun pairs")
        bg = (_rr(r, 256 - 64), _rr(r, 256 - 64), _rr(r, 2),
              _ri(r, 95, 150), _ri(r, -8, 8), _ri(r, -8, 8), _ri(r, -8, 8))
        objs, placed = [], []
        for slot in range(n_obj):
            pos = None
            for attempt in range(4 if slot == 0 else 2):  # the first object always finds room
                noun, color = pairs[_rr(r, len(pairs))]
                size = _rr(r, 2)
                inst = _rr(r, cat.num_instances(noun, split))
                jit = (_ri(r, -10, 10), _ri(r, -10, 10), _ri(r, -10, 10))
                rgb = None
                if color >= 0:
                    rgb = tuple(int(min(255, max(0, c + j))) for c, j in zip(COLORS[COLOR_NAMES[color]], jit))
                for size_try in (size, 1 - size):
                    side = _ri(r, *self._sides[size_try])
                    spr, mask = cat.sprite(noun, color, side, inst, rgb, split)
                    h, w = mask.shape
                    pos = self._place(r, w, h, placed)
                    if pos is not None:
                        break
                if pos is not None:
                    break
            if pos is None:
                continue  # no room left: fewer objects
            size = size_try
            placed.append((pos[0], pos[1], pos[0] + w, pos[1] + h))
            objs.append((noun, color, size, pos, spr, mask, rgb))
        if not objs:  # cannot happen with the default sizes; keep the contract anyway
            raise RuntimeError(f"{cat.name}: could not place any object in scene {split}/{index}")
        sc = self._describe(r, index, objs, placed)
        sc._bg, sc._objs = bg, objs
        if render:
            self.render(sc)
        return sc

    # -- controlled distractors [ours] --------------------------------------------------------------
    def controlled_scene(self, split: str, index: int, render: bool = True) -> Scene:
        """A scene of the controlled family of ``split`` (:data:`CONTROLLED`), all objects placed like
        :meth:`scene` (no overlap, whole-patch oracle IoU >= ``min_oracle_iou``).

        - ``hard``: two named objects T1 = (a1, n1) and T2 = (a2, n2) with a1 != a2 and n1 != n2,
          and two unnamed distractors (a1, n2) and (a2, n1), where ``a`` is the colour (or, for
          catalogs without colours, the size) and ``n`` the noun: each named object shares its
          attribute with one distractor and its noun with another, so only both together identify
          it. Every object has the same size when ``a`` is the colour. Up to one more unnamed object
          (``max_objects`` permitting) that repeats neither named object.
        - ``relation``: a named target A, an unnamed twin of A (same noun, colour and size) and a
          named anchor B of another noun and colour; the caption says where A is relative to B
          ("a red circle left of a blue square"), and the twin lies on the other side of B along
          that axis, so only the relation tells A from its twin.

        Phrases always name the identifying attributes (colour and noun, or size and noun).
        """
        kind = CONTROLLED.get(split)
        if kind is None:
            raise ValueError(f"split {split!r} has no controlled distractors; expected one of {sorted(CONTROLLED)}")
        r = self._rng(split, index)
        cat = self.catalog
        pairs = self._held if split in HELD_OUT_SPLITS else self._seen
        if not pairs:
            raise ValueError(f"{cat.name}: split {split!r} has no colour-noun pairs")
        if len(cat.nouns) < 2:
            raise ValueError(f"{cat.name}: controlled scenes need at least 2 nouns")
        bg = (_rr(r, 256 - 64), _rr(r, 256 - 64), _rr(r, 2),
              _ri(r, 95, 150), _ri(r, -8, 8), _ri(r, -8, 8), _ri(r, -8, 8))
        colored = cat.colored
        for _ in range(200):
            specs = self._controlled_specs(r, kind, pairs, colored)
            placed = self._place_all(r, specs, split)
            if placed is None:
                continue
            objs, boxes = placed
            if kind == "relation":
                key, sign = _rel_key(boxes[0], boxes[2])
                axis = key in ("left", "right")
                tdx = (boxes[1][0] + boxes[1][2]) - (boxes[2][0] + boxes[2][2])
                tdy = (boxes[1][1] + boxes[1][3]) - (boxes[2][1] + boxes[2][3])
                twin_side = (1 if tdx > 0 else -1) if axis else (1 if tdy > 0 else -1)
                if twin_side == sign or (tdx == 0 if axis else tdy == 0):
                    continue  # the twin would fit the relation too
            break
        else:
            raise RuntimeError(f"{cat.name}: could not lay out controlled scene {split}/{index}")
        named = [0, 1] if kind == "hard" else [0, 2]
        others = [i for i in range(len(objs)) if i not in named]
        phrases = [self._controlled_phrase(r, objs[i][0], objs[i][1], objs[i][2], colored) for i in named]
        if kind == "hard":
            order = [0, 1]
            r.shuffle(order)
            tmpl = _choice(r, TEMPLATES[2])
            rel = {"r01": self._relation(r, boxes[named[order[0]]], boxes[named[order[1]]]),
                   "r10": self._relation(r, boxes[named[order[1]]], boxes[named[order[0]]])}
        else:
            order = [0, 1]
            tmpl = _choice(r, RELATION_TEMPLATES)
            rel = {"r": _choice(r, REL_WORDS[key])}
        caption, spans = _fill_template(tmpl, order, phrases, rel)
        if r.random() < 0.3:
            caption += "."
        nouns = cat.nouns
        pick = lambda idx, j: [objs[i][j] for i in idx]  # noqa: E731
        sc = Scene(index=index, caption=caption, phrases=phrases, spans=spans,
                   boxes=np.array([boxes[i] for i in named], np.float32).reshape(-1, 4),
                   shape_ids=pick(named, 0), color_ids=pick(named, 1), size_ids=pick(named, 2),
                   labels=[(f"{COLOR_NAMES[objs[i][1]]} " if objs[i][1] >= 0 else "") + nouns[objs[i][0]]
                           for i in named],
                   other_boxes=np.array([boxes[i] for i in others], np.float32).reshape(-1, 4),
                   other_shape_ids=pick(others, 0), other_color_ids=pick(others, 1),
                   other_size_ids=pick(others, 2))
        sc._bg, sc._objs = bg, [objs[i] for i in named] + [objs[i] for i in others]
        if render:
            self.render(sc)
        return sc

    def _controlled_specs(self, r: random.Random, kind: str, pairs: list, colored: bool) -> list:
        """``(noun, color, size)`` of every object, named ones first (see :meth:`controlled_scene`)."""
        nouns = len(self.catalog.nouns)
        seen = set(self._seen)
        for _ in range(100):
            n1, c1 = pairs[_rr(r, len(pairs))]
            n2, c2 = pairs[_rr(r, len(pairs))]
            if n1 == n2 or (colored and c1 == c2):
                continue
            if kind == "relation":
                return [(n1, c1, 0), (n1, c1, 0), (n2, c2, 0)]
            if colored:
                d1, d2 = (n2, c1), (n1, c2)
                # outside the held-out splits, distractors are seen pairs too
                if pairs is self._seen and not (d1 in seen and d2 in seen):
                    continue
                specs = [(n1, c1, 0), (n2, c2, 0), (d1[0], d1[1], 0), (d2[0], d2[1], 0)]
            else:
                s1 = _rr(r, 2)
                specs = [(n1, -1, s1), (n2, -1, 1 - s1), (n2, -1, s1), (n1, -1, 1 - s1)]
            if self.max_objects >= 3 and r.random() < 0.5:  # one more object that repeats no named one
                for _ in range(20):
                    if colored:
                        n, c = self._seen[_rr(r, len(self._seen))] if pairs is self._seen else pairs[_rr(r, len(pairs))]
                        extra = (n, c, 0)
                    else:
                        extra = (_rr(r, nouns), -1, _rr(r, 2))
                    if extra[:2] not in [sp[:2] for sp in specs[:2]] and (colored or extra not in specs[:2]):
                        specs.append(extra)
                        break
            return specs
        raise RuntimeError(f"{self.catalog.name}: too few colour-noun pairs for controlled scenes")

    def _place_all(self, r: random.Random, specs: list, split: str):
        """Sprites and positions of every spec, or None when one finds no room."""
        objs, placed = [], []
        for noun, color, size in specs:
            inst = _rr(r, self.catalog.num_instances(noun, split))
            rgb = None
            if color >= 0:
                jit = (_ri(r, -10, 10), _ri(r, -10, 10), _ri(r, -10, 10))
                rgb = tuple(int(min(255, max(0, c + j))) for c, j in zip(COLORS[COLOR_NAMES[color]], jit))
            side = _ri(r, *self._sides[size])
            spr, mask = self.catalog.sprite(noun, color, side, inst, rgb, split)
            h, w = mask.shape
            pos = self._place(r, w, h, placed)
            if pos is None:
                return None
            placed.append((pos[0], pos[1], pos[0] + w, pos[1] + h))
            objs.append((noun, color, size, pos, spr, mask, rgb))
        return objs, placed

    def _controlled_phrase(self, r: random.Random, noun: int, color: int, size: int, colored: bool) -> str:
        words = [COLOR_NAMES[color]] if colored else [_choice(r, SIZE_WORDS[size])]
        words.append(self.catalog.nouns[noun])
        det = "one" if r.random() < 0.1 else _article(words[0])
        return " ".join([det] + words)

    def _phrase(self, r: random.Random, noun: int, color: int, size: int) -> str:
        words = []
        if r.random() < 0.85:
            words.append(_choice(r, SIZE_WORDS[size]))
        if color >= 0:
            words.append(COLOR_NAMES[color])
        words.append(self.catalog.nouns[noun])
        det = "one" if r.random() < 0.1 else _article(words[0])
        return " ".join([det] + words)

    @staticmethod
    def _relation(r: random.Random, a, b) -> str:
        if r.random() < 0.15:
            key = "near"
        else:
            dx = (a[0] + a[2]) - (b[0] + b[2])
            dy = (a[1] + a[3]) - (b[1] + b[3])
            key = ("left" if dx < 0 else "right") if abs(dx) >= abs(dy) else ("above" if dy < 0 else "below")
        return _choice(r, REL_WORDS[key])

    def _describe(self, r: random.Random, index: int, objs: list, boxes: list) -> Scene:
        k = len(objs)
        phrases = [self._phrase(r, o[0], o[1], o[2]) for o in objs]
        order = list(range(k))
        r.shuffle(order)
        tmpl = _choice(r, TEMPLATES[k])
        rel = {}
        for i in range(k):
            for j in range(k):
                if i != j:
                    rel[f"r{i}{j}"] = self._relation(r, boxes[order[i]], boxes[order[j]])
        caption, spans = _fill_template(tmpl, order, phrases, rel)
        if r.random() < 0.3:
            caption += "."
        nouns = self.catalog.nouns
        return Scene(
            index=index, caption=caption, phrases=phrases, spans=spans,
            boxes=np.array(boxes, np.float32).reshape(k, 4),
            shape_ids=[o[0] for o in objs], color_ids=[o[1] for o in objs], size_ids=[o[2] for o in objs],
            labels=[(f"{COLOR_NAMES[o[1]]} " if o[1] >= 0 else "") + nouns[o[0]] for o in objs])

    # -- drawing --------------------------------------------------------------------------------
    def render(self, sc: Scene, instance_masks: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Draw ``sc`` into ``sc.image`` ([3, H, W] uint8, channels first). With ``instance_masks`` also return an
        ``[H, W]`` int map: -1 background, k where object k was drawn."""
        S = self.image_size
        ox, oy, flip, g, tr, tg, tb = sc._bg
        tex = _texture()
        if S <= 256 - 64:
            t = tex[:, oy:oy + S, ox:ox + S]
        else:
            t = np.resize(tex, (3, S, S))
        if flip & 1:
            t = t[:, ::-1]
        img = t + np.array([g + tr - 12, g + tg - 12, g + tb - 12], np.uint8)[:, None, None]
        inst = np.full((S, S), -1, np.int16) if instance_masks else None
        for k, (noun, color, size, (x0, y0), spr, mask, rgb) in enumerate(sc._objs):
            h, w = mask.shape
            region = img[:, y0:y0 + h, x0:x0 + w]
            np.copyto(region, np.array(rgb, np.uint8)[:, None, None] if spr is None else spr, where=mask)
            if inst is not None:
                inst[y0:y0 + h, x0:x0 + w][mask] = k
        sc.image = img
        return (img, inst) if instance_masks else img

    def captions(self, split: str, n: int):
        """The captions of the first ``n`` scenes of ``split`` without drawing them."""
        for i in range(n):
            yield self.scene(split, i, render=False).caption
