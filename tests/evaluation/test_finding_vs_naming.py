"""Finding objects vs naming them: the own/any/discrimination metrics and the text-free and
attribute-only bars, on hand-made predictions and brute-force counts."""
from __future__ import annotations

import itertools
import random

import pytest
import torch

from loupe import metrics as M


def _scene(k: int, gen: random.Random) -> torch.Tensor:
    """k disjoint 8x8 boxes on a row."""
    return torch.tensor([[16.0 * j, 0.0, 16.0 * j + 8, 8.0] for j in range(k)])


def test_a_text_free_finder_discriminates_at_one_over_k_and_a_perfect_one_at_one():
    gen = random.Random(0)
    own_tf, any_tf, own_p, any_p, ks = [], [], [], [], []
    for _ in range(4000):
        k = gen.choice([2, 3, 4, 5])
        boxes = _scene(k, gen)
        target = gen.randrange(k)
        pick = gen.randrange(k)  # finds an object, ignores the text
        objects = [boxes]
        own_tf.append(bool(M.box_iou_pairs(boxes[pick:pick + 1], boxes[target:target + 1])[0] >= 0.5))
        any_tf.append(bool(M.object_hits(boxes[pick:pick + 1], objects)[0]))
        own_p.append(True)
        any_p.append(bool(M.object_hits(boxes[target:target + 1], objects)[0]))
        ks.append(k)
    own_tf, any_tf = torch.tensor(own_tf), torch.tensor(any_tf)
    text_free = float((1.0 / torch.tensor(ks, dtype=torch.float64)).mean())
    assert any_tf.all()
    assert M.discrimination(own_tf, any_tf) == pytest.approx(text_free, abs=0.02)
    assert M.discrimination(torch.tensor(own_p), torch.tensor(any_p)) == 1.0
    assert M.discrimination(torch.zeros(3, dtype=torch.bool), torch.zeros(3, dtype=torch.bool)) is None


def test_a_box_on_the_background_hits_no_object():
    boxes = _scene(3, random.Random(0))
    bg = torch.tensor([[0.0, 40.0, 8.0, 48.0]])
    assert not M.object_hits(bg, [boxes])[0]
    assert M.points_in_any(torch.tensor([[20.0, 4.0], [4.0, 44.0]]), [boxes, boxes]).tolist() == [True, False]
    assert not M.object_hits(bg, [torch.zeros(0, 4)])[0]  # a scene without objects


def test_attribute_bars_against_a_brute_force_count():
    """An attribute-only finder picks uniformly among the objects with the phrase's value: its
    expected accuracy, enumerated over every pick, is 1 / matching_objects."""
    gen = random.Random(1)
    for _ in range(200):
        k = gen.randint(1, 5)
        colors = [gen.randrange(3) for _ in range(k)]
        me = gen.randrange(k)
        candidates = [j for j in range(k) if colors[j] == colors[me]]
        brute = sum(1 for j in candidates if j == me) / len(candidates)
        got = float(1.0 / M.matching_objects([colors[me]], [colors])[0])
        assert got == pytest.approx(brute)


@pytest.mark.parametrize("colors,shapes,me,want", [
    ([0, 1], [0, 1], 0, "unique"), ([0, 0], [0, 1], 0, "color"), ([0, 1], [0, 0], 0, "shape"),
    ([0, 0, 1], [0, 1, 0], 0, "both"), ([0, 0, 1], [0, 0, 1], 0, "identical"), ([0, 0, 1], [0, 0, 1], 2, "unique"),
])
def test_shared_attributes(colors, shapes, me, want):
    assert M.shared_attributes(colors[me], shapes[me], colors, shapes, me) == want


def test_every_combination_of_shared_attributes_is_named():
    seen = set()
    for colors in itertools.product(range(2), repeat=3):
        for shapes in itertools.product(range(2), repeat=3):
            seen.add(M.shared_attributes(colors[0], shapes[0], colors, shapes, 0))
    assert seen == {"unique", "color", "shape", "both", "identical"}
