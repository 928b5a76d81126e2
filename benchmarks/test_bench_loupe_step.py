"""One LOUPE training step vs one CLIP step at the default size (METHOD 9 cost target: <= 1.5x).

Batch 128, default model (64x64, 8x8 grid, D=128, 4+4 layers), captions of 16 tokens with 3 phrases,
K=32, M'=16. Records the share of the LOUPE step spent
in the Shapley sampler, the fraction of games sampled and the targets' relative standard error.

Variants: ``clip``; ``loupe`` (the default options: the UANSIL skip policy is off, every game is
sampled, the predictor trains); ``loupe_no_uansil`` (policy on, warm-up never ends: every game
sampled); ``loupe_uansil_skip`` (policy on after a 1-step warm-up with skip threshold 1e6: every game
counts as confident, only the 10% calibration games are sampled, i.e. the most UANSIL can save).

On a shared machine the variants, run one after another, see different loads.
``test_bench_step_encoder_pairs`` therefore rotates CLIP and the LOUPE variants step by step and
records the ratio of their medians, at the process's thread count (wall time) and at one thread
(thread CPU time, which other processes barely move).

``loupe_encoder`` (issue 19 item 1): ``tsa_game="encoder"`` at its default subsample (2 images x 3
boxes, K=8 samples of s + 2 masked encoder passes); target <= 2x a CLIP step (speedup >= 0.5). It
records the share of the step spent in the masked encoder passes (``value_share``) and the
coalitions encoded. ``test_bench_step_encoder_pairs`` rotates CLIP, LOUPE, LOUPE-encoder and
LOUPE-encoder with the UANSIL policy warm (every confident game filled with the predictor's mean:
what UANSIL adds to the step when it extends the played subsample to the other boxes).

``test_bench_step_vit_grid`` (issue 22): the same CLIP / LOUPE pair at batch 2 with the ``ViT-B-16``
preset, at its 14x14 grid (11025 candidate boxes) and at the 16x16 grid of ``ViT-L-14`` (18496).
"""
from __future__ import annotations

import time

import pytest
import torch

import loupe.objectives as lo
from loupe.config import LoupeConfig, ObjectiveOptions
from loupe.model import LoupeModel

B, L, P = 128, 16, 3


def _batch(step: int):
    g = torch.Generator().manual_seed(step)
    return {"images": torch.randn(B, 3, 64, 64, generator=g), "input_ids": torch.randint(0, 1000, (B, L), generator=g),
            "attention_mask": torch.ones(B, L, dtype=torch.bool),
            "phrase_token_spans": torch.tensor([[[1, 4], [6, 9], [11, 14]]] * B),
            "phrase_mask": torch.ones(B, P, dtype=torch.bool),
            "boxes": torch.tensor([[[0., 0, 24, 24], [32, 8, 56, 40], [8, 40, 40, 64]]] * B),
            "seed": step, "step": step}


def _setup(objective: str, warm: bool, threshold: float = 0.5, policy: bool = False, game: str = "maxsim"):
    torch.manual_seed(0)
    model = LoupeModel(LoupeConfig(objective=objective))
    if objective == "loupe":
        mod = model.loss_modules["tsa"]
        if policy:
            # warm: the policy acts from step 1 without waiting for its rolling calibration (the
            # most it can skip or fill, which is what the step time should show)
            mod.options = ObjectiveOptions(uansil=True, uansil_warmup=1 if warm else 10 ** 9,
                                           uansil_threshold=threshold, tsa_game=game,
                                           uansil_min_calibration=0.0 if warm else 0.85)
        else:
            mod.options = ObjectiveOptions(tsa_game=game)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, opt


def _step(model, opt, batch):
    out = model(batch)
    opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    opt.step()
    return out


class _SamplerTimer:
    def __init__(self):
        self.t = 0.0

    def wrap(self, fn):
        def inner(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.t += time.perf_counter() - t0
        return inner


class _ValueTimer:
    """Time and coalitions of :meth:`LoupeModel.coalition_scores` (the masked encoder passes)."""

    def __init__(self):
        self.t, self.rows, self.tokens = 0.0, 0, 0

    def wrap(self, fn):
        def inner(model, images, image_index, keep, text_emb, **k):
            t0 = time.perf_counter()
            try:
                return fn(model, images, image_index, keep, text_emb, **k)
            finally:
                self.t += time.perf_counter() - t0
                self.rows += int(keep.any(-1).sum())
                self.tokens += int(keep.sum())
        return inner


@pytest.mark.parametrize("variant", ["clip", "loupe", "loupe_no_uansil", "loupe_uansil_skip", "loupe_encoder"])
def test_bench_step(benchmark, variant, monkeypatch):
    objective = "clip" if variant == "clip" else "loupe"
    model, opt = _setup(objective, warm=(variant == "loupe_uansil_skip"),
                        threshold=1e6 if variant == "loupe_uansil_skip" else 0.5,
                        policy=variant in ("loupe_no_uansil", "loupe_uansil_skip"),
                        game="encoder" if variant == "loupe_encoder" else "maxsim")
    batches = [_batch(s) for s in range(3)]
    for s in range(2):  # warm-up (and the UANSIL running statistics)
        _step(model, opt, batches[s])
    timer = _SamplerTimer()
    monkeypatch.setattr(lo, "shapley_interaction", timer.wrap(lo.shapley_interaction))
    values = _ValueTimer()
    monkeypatch.setattr(LoupeModel, "coalition_scores", values.wrap(LoupeModel.coalition_scores))
    calls = {"n": 0, "t": 0.0}
    last = {}

    def run():  # timed here too: ``benchmark.stats`` is None under --benchmark-disable
        t0 = time.perf_counter()
        last["out"] = _step(model, opt, batches[2])
        calls["t"] += time.perf_counter() - t0
        calls["n"] += 1

    benchmark.group = f"loupe step / B={B} K=32 M'=16 / fwd+bwd+AdamW"
    benchmark.extra_info["variant"] = variant
    if variant == "loupe_encoder":
        benchmark.extra_info["target"] = {"vs": "clip", "min_speedup": 1 / 2.0}
    elif variant != "clip":
        benchmark.extra_info["target"] = {"vs": "clip", "min_speedup": 1 / 1.5}
    benchmark.pedantic(run, rounds=3, iterations=1)
    if variant != "clip":
        out = last["out"]
        step_time = calls["t"] / calls["n"]
        benchmark.extra_info["sampling_share"] = timer.t / calls["n"] / step_time
        benchmark.extra_info["fraction_sampled"] = out["uansil_fraction_sampled"]
        benchmark.extra_info["tsa_rel_stderr"] = out["diag_tsa_rel_stderr"]
        print(f"\n{variant}: step {step_time:.3f} s, sampling share {benchmark.extra_info['sampling_share']:.3f}, "
              f"fraction sampled {out['uansil_fraction_sampled']:.3f}, tsa rel. stderr {out['diag_tsa_rel_stderr']:.3f}")
        if values.rows:
            benchmark.extra_info["value_share"] = values.t / calls["n"] / step_time
            benchmark.extra_info["coalitions_per_step"] = values.rows / calls["n"]
            benchmark.extra_info["mean_coalition_patches"] = values.tokens / max(1, values.rows)
            print(f"{variant}: masked encoder passes {benchmark.extra_info['value_share']:.3f} of the step, "
                  f"{values.rows / calls['n']:.0f} coalitions per step of "
                  f"{benchmark.extra_info['mean_coalition_patches']:.1f} patches on average")


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else 0.5 * (xs[len(xs) // 2 - 1] + xs[len(xs) // 2])


def test_bench_step_encoder_pairs(benchmark):
    """CLIP, LOUPE (max-sim game), LOUPE with the masked-encoder game (issue 19 item 1, default
    subsample) with the UANSIL policy off and on (warm, every confident game filled), rotating;
    target: LOUPE-encoder <= 2x CLIP."""
    pairs = {"clip": _setup("clip", warm=False), "loupe": _setup("loupe", warm=False),
             "encoder": _setup("loupe", warm=False, game="encoder"),
             "encoder_uansil": _setup("loupe", warm=True, threshold=1e6, policy=True, game="encoder")}
    batches = [_batch(s) for s in range(3)]
    for s in range(2):
        for pair in pairs.values():
            _step(*pair, batches[s])
    names = list(pairs)
    times: dict[str, list[float]] = {k + sfx: [] for k in names for sfx in ("", "_1t")}

    fills: dict[str, float] = {}

    def timed(pair, clock, name=None):
        t0 = clock()
        out = _step(*pair, batches[2])
        t = clock() - t0
        if name and "diag_tsa_target_share" in out:
            fills[name] = float(out["diag_tsa_target_share"])
        return t

    def run():
        r = len(times["clip"]) % len(names)
        for name in names[r:] + names[:r]:  # rotate the order
            times[name].append(timed(pairs[name], time.perf_counter, name))

    benchmark.group = f"loupe step / B={B} / fwd+bwd+AdamW / rotating clip, loupe, loupe-encoder (UANSIL off, on)"
    benchmark.extra_info["variant"] = "+".join(names)
    benchmark.pedantic(run, rounds=3, iterations=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for r in range(3):
            for name in names[r % len(names):] + names[:r % len(names)]:
                times[name + "_1t"].append(timed(pairs[name], time.thread_time))
    finally:
        torch.set_num_threads(threads)
    ratios = {f"{k}_over_clip{sfx}": _median(times[k + sfx]) / _median(times["clip" + sfx])
              for k in names[1:] for sfx in ("", "_1t")}
    benchmark.extra_info.update({**ratios, "goal": "encoder/clip <= 2", "threads": threads,
                                 "times": {k: [round(t, 4) for t in v] for k, v in times.items()}})
    r = benchmark.extra_info["times"]
    shares = {k: round(v, 4) for k, v in fills.items()}
    benchmark.extra_info["tsa_target_share"] = shares
    print("\nrotating, over CLIP (wall, %d threads | thread CPU time, 1 thread): " % threads
          + ", ".join(f"{k} {ratios[k + '_over_clip']:.3f} | {ratios[k + '_over_clip_1t']:.3f}" for k in names[1:])
          + f"; TSA games with a target: {shares}; times {r}")


# ------------------------------------------------------------------------------------------------
# the candidate-box machinery at ViT grids (issue 22): 14x14 (ViT-B-16) and 16x16 (ViT-L-14's grid)
# ------------------------------------------------------------------------------------------------
VIT_B = 2  # batch


def _vit_batch(step: int, size: int):
    g = torch.Generator().manual_seed(step)
    s = size / 64.0
    return {"images": torch.randn(VIT_B, 3, size, size, generator=g),
            "input_ids": torch.randint(4, 1000, (VIT_B, L), generator=g),
            "attention_mask": torch.ones(VIT_B, L, dtype=torch.bool),
            "phrase_token_spans": torch.tensor([[[1, 4], [6, 9], [11, 14]]] * VIT_B),
            "phrase_mask": torch.ones(VIT_B, P, dtype=torch.bool),
            "boxes": torch.tensor([[[0., 0, 24, 24], [32, 8, 56, 40], [8, 40, 40, 64]]] * VIT_B) * s,
            "seed": step, "step": step}


@pytest.mark.parametrize("grid", [14, 16])
def test_bench_step_vit_grid(benchmark, grid):
    """One training step (fwd + bwd + AdamW) at batch 2 with the ``ViT-B-16`` preset: 224 px, 16 px
    patches (14x14 grid, K = 11025 whole-patch boxes), or 14 px patches (16x16, ViT-L-14's grid,
    K = 18496; ViT-B widths, so the box machinery's share is not hidden by ViT-L's 3x larger towers).
    CLIP and LOUPE steps alternate; records the median of each, their ratio, the model build time,
    the no-gradient region pass (objectness of all K boxes, NMS) and the K-sized buffers."""
    from loupe.config import preset_config

    over = {} if grid == 14 else {"patch_size": 14}
    models, builds = {}, {}
    for objective in ("clip", "loupe"):
        t0 = time.perf_counter()
        torch.manual_seed(0)
        model = LoupeModel(preset_config("ViT-B-16", objective=objective, vocab_size=1000, **over))
        builds[objective] = time.perf_counter() - t0
        models[objective] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    model = models["loupe"][0]
    assert model.grid_size == grid
    size = model.config.image_size
    batches = [_vit_batch(s, size) for s in range(2)]
    for pair in models.values():  # warm-up
        _step(*pair, batches[0])
    times: dict[str, list[float]] = {"clip": [], "loupe": []}

    def run():
        order = ("clip", "loupe") if len(times["clip"]) % 2 == 0 else ("loupe", "clip")
        for name in order:
            t0 = time.perf_counter()
            _step(*models[name], batches[1])
            times[name].append(time.perf_counter() - t0)

    benchmark.group = f"loupe step / ViT-B-16 widths, grid {grid}x{grid}, B={VIT_B} / fwd+bwd+AdamW / alternating pairs"
    benchmark.extra_info["variant"] = f"grid{grid}"
    benchmark.pedantic(run, rounds=2, iterations=1)
    with torch.no_grad():
        patches = model.encode_image_tokens(batches[1]["images"])[1]
        t0 = time.perf_counter()
        model.regions(patches)
        regions_s = time.perf_counter() - t0
    K = int(model.candidate_boxes.shape[0])
    buffers_mb = sum(b.numel() * b.element_size() for b in (model.nms_suppress, model.sat_pooling,
                                                            model.box_geometry, model.candidate_boxes)) / 2**20
    clip_s, loupe_s = _median(times["clip"]), _median(times["loupe"])
    benchmark.extra_info.update({"grid": grid, "K": K, "clip_step_s": clip_s, "loupe_step_s": loupe_s,
                                 "loupe_over_clip": loupe_s / clip_s, "build_s": builds, "regions_nograd_s": regions_s,
                                 "box_buffers_mb": buffers_mb, "threads": torch.get_num_threads()})
    print(f"\ngrid {grid}x{grid} (K={K}), B={VIT_B}: clip step {clip_s:.2f} s, loupe step {loupe_s:.2f} s "
          f"(x{loupe_s / clip_s:.2f}); build clip {builds['clip']:.1f} s, loupe {builds['loupe']:.1f} s; "
          f"region pass (no grad) {regions_s:.3f} s; K-sized buffers {buffers_mb:.0f} MB")
