"""Constructed-scene study of the TSA region target (METHOD 6); writes the "centered redundancy" rows of
the table of docs/METHOD-notes.md.

Run from the repo root:  python tests/objectives/scene_study.py [--samples 2000]
(the centred max-sim game and the per-pair redundancy R, the only game and rule left of that table:
the ``raw`` rows and the ``redundancy_minus_outside`` rows need commit 0899940, tag pre-retire-switches;
``--game pooled`` needs commit 72b2211, tag pre-retire-pooled)

Scenes on an 8x8 patch grid with hand-built unit embeddings (D=32):
- ``one``: one 3x3 object of identical patches on a neutral background (identical patches);
- ``noisy``: the same on a noisy background (independent small perturbations per patch);
- ``two``: two different objects (3x3 and 2x4), a caption that names both;
- ``border``: a 3x2 object touching the top-left corner;
- ``negbg``: background patches with negative similarity to the object words.
For every box of >= 2 patches (1260 of 1296), the box with the largest target is compared with
the object box(es).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from loupe.objectives import region_targets, SceneSpec, constructed_scene  # noqa: E402
from loupe.regions import candidate_boxes  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--game", default="maxsim", choices=("maxsim",))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    g = 8
    boxes = candidate_boxes(g, g)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    boxes = boxes[area >= 2]
    label = "centered redundancy"
    print(f"game={args.game} K={args.samples} boxes={len(boxes)}")
    print(f"{'scene':8s} {'rule':35s} {'argmax box':16s} {'object(s)':24s} ok  margin(z)")
    for name in ("one", "noisy", "two", "border", "negbg"):
        spec: SceneSpec = constructed_scene(name, seed=args.seed)
        t = region_targets(spec.patches[None], spec.words[None], None, boxes[None], g, g,
                           game=args.game, num_samples=args.samples, seed=args.seed)[0][0]
        z = (t - t.mean()) / t.std().clamp(min=1e-12)
        best = int(t.argmax())
        obj_idx = [int(((boxes == torch.tensor(b)).all(1)).nonzero()[0]) for b in spec.objects]
        # ok: the top-|objects| boxes are exactly the object boxes
        top = set(t.topk(len(obj_idx)).indices.tolist())
        ok = top == set(obj_idx)
        others = torch.ones(len(boxes), dtype=torch.bool)
        others[obj_idx] = False
        margin = float(z[obj_idx].min() - z[others].max())
        print(f"{name:8s} {label:35s} {str(tuple(boxes[best].tolist())):16s} "
              f"{str(spec.objects):24s} {'Y' if ok else 'N'}  {margin:+.3f}")

    print(f"\nstandardised targets (over all {len(boxes)} boxes) of the object, its best sub-box, super-box, other box")
    for name in ("one", "noisy", "border"):
        spec = constructed_scene(name, seed=args.seed)
        ob = torch.tensor(spec.objects[0]).float()
        b = boxes.float()
        same = (b == ob).all(1)
        sub = (b[:, :2] >= ob[:2]).all(1) & (b[:, 2:] <= ob[2:]).all(1) & ~same
        sup = (b[:, :2] <= ob[:2]).all(1) & (b[:, 2:] >= ob[2:]).all(1) & ~same
        t = region_targets(spec.patches[None], spec.words[None], None, boxes[None], g, g,
                           game=args.game, num_samples=args.samples, seed=args.seed)[0][0]
        z = (t - t.mean()) / t.std().clamp(min=1e-12)
        print(f"{name:8s} {label:35s} object {float(z[same][0]):+6.2f}  "
              f"sub {float(z[sub].max()):+6.2f}  super {float(z[sup].max()):+6.2f}  "
              f"other {float(z[~sub & ~sup & ~same].max()):+6.2f}")


if __name__ == "__main__":
    main()
