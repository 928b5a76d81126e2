"""The LOUPE objectives L_TSA, L_FSA and L_UA (METHOD sections 5-9).

Three terms of the ``loupe`` objective, listed in the table of :mod:`loupe.losses` (this module
registers nothing itself): ``tsa`` (token-level Shapley interaction -> objectness), ``fsa``
(region-phrase interactions -> phrase-to-region alignment) and ``ua`` (the UANSIL
uncertainty-weighted interaction loss). :data:`SHAPLEY_TERMS` gives their default weights,
:func:`term_fn` and :func:`build_module` what the table needs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from loupe_kernels import shapley_interaction
from loupe_kernels.shapley import sample_coalitions
from loupe_kernels.testing import sample_stats, subset_members
from loupe_kernels.uansil import CALIB_STATS, UansilPolicy

from . import regions as _regions
from .config import GAMES, options_from_config

__all__ = ["region_targets", "box_subsets", "coalition_samples", "encoder_interactions",
           "encoder_subsample", "SceneSpec", "constructed_scene", "LoupeShapleyTerms",
           "tsa_candidates", "fsa_candidates", "phrase_region_interactions", "phrase_contrast", "cross_image_lse", "soft_kl",
           "loupe_losses", "SHAPLEY_TERMS", "term_fn", "build_module"]


# ------------------------------------------------------------------------------------------------
# games and region targets (METHOD 5, 6)
# ------------------------------------------------------------------------------------------------
def box_subsets(boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Patch membership ``[B, M, h*w]`` bool of patch-unit boxes ``[B, M, 4]`` (x0, y0, x1, y1, end-exclusive)."""
    if boxes.dim() != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"box_subsets: boxes must be [B, M, 4], got {list(boxes.shape)}")
    ys = torch.arange(h, device=boxes.device)
    xs = torch.arange(w, device=boxes.device)
    x0, y0, x1, y1 = (boxes[..., k, None] for k in range(4))
    iny = (ys >= y0) & (ys < y1)  # [B, M, h]
    inx = (xs >= x0) & (xs < x1)  # [B, M, w]
    return (iny[..., :, None] & inx[..., None, :]).reshape(*boxes.shape[:2], h * w)


#: ``value(game [X] long, keep [X, P] bool) -> [X]``: v of coalitions ``keep`` of game ``game[x]``
#: (only non-empty coalitions are passed: ``v(empty) = 0``)
CoalitionValue = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def coalition_samples(value: CoalitionValue, subsets: torch.Tensor, coalitions: torch.Tensor) -> torch.Tensor:
    """The samples ``G(C) = v(C u S) - sum_{i in S} v(C u {i}) + (s - 1) v(C)`` (METHOD 5) of given
    coalitions ``C`` ``[G, K, P]`` (disjoint from ``S``), ``subsets [G, P]`` -> ``[G, K]``.

    All ``s + 2`` coalitions of every sample go to ``value`` in one call; identical coalitions of a
    game are evaluated once, empty ones not at all (``v(empty) = 0``). Returns ``value``'s dtype.
    """
    G, K, P = coalitions.shape
    dev = coalitions.device
    idx, ok = subset_members(subsets[:, None, :])
    idx, ok = idx[:, 0], ok[:, 0]  # [G, smax]
    smax = idx.shape[1]
    one = F.one_hot(idx, P).bool() & ok[..., None]  # [G, smax, P]
    rows = torch.cat([coalitions[:, :, None, :], (coalitions | subsets[:, None, :])[:, :, None, :],
                      coalitions[:, :, None, :] | one[:, None]], dim=2)  # [G, K, 2 + smax, P]
    slot_ok = torch.cat([torch.ones(G, 2, dtype=torch.bool, device=dev), ok], dim=1)[:, None, :].expand(G, K, -1)
    game = torch.arange(G, device=dev)[:, None, None].expand(G, K, 2 + smax)
    use = slot_ok & rows.any(-1)
    key = torch.cat([game[use][:, None], rows[use].long()], dim=1)
    vals = None
    if key.shape[0]:
        uniq, inverse = torch.unique(key, dim=0, return_inverse=True)
        v_u = value(uniq[:, 0], uniq[:, 1:].bool())
        vals = v_u[inverse]
    dtype = vals.dtype if vals is not None else torch.float32
    v = torch.zeros(G, K, 2 + smax, dtype=dtype, device=dev)
    if vals is not None:
        v[use] = vals
    s = subsets.sum(-1).to(dtype)
    return v[..., 1] + (s - 1)[:, None] * v[..., 0] - v[..., 2:].sum(-1)


def encoder_interactions(value: CoalitionValue, subsets: torch.Tensor, player_mask: torch.Tensor | None = None, *,
                         num_samples: int = 8, seed: int = 0, size_schedule: str = "round_robin",
                         backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled ``I([S])`` of any game given by ``value`` (the masked-encoder game of TSA) [ours].

    ``subsets [G, P]`` bool (one S per game), ``player_mask [G, P]``. The coalitions are the pinned
    draw of :func:`loupe_kernels.shapley.sample_coalitions` (the ones every backend of the fused
    games draws for this seed), the samples :func:`coalition_samples`; returns ``(estimate [G],
    stderr [G])``: the mean of the ``num_samples`` samples and its standard error from their sample
    variance, as the fused ops do.
    """
    G, P = subsets.shape
    if G == 0:
        z = torch.zeros(0, dtype=torch.float32, device=subsets.device)
        return z, z.clone()
    C = sample_coalitions(subsets[:, None, :], player_mask=player_mask, num_samples=num_samples, seed=seed,
                          size_schedule=size_schedule, backend=backend)[:, 0]  # [G, K, P]
    samples = coalition_samples(value, subsets, C)
    return sample_stats(samples, samples.dtype)


def region_targets(patches: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor | None,
                   boxes: torch.Tensor, h: int, w: int, *,
                   game: str = "maxsim", num_samples: int = 32, seed: int = 0,
                   backend: str | None = None,
                   valid: torch.Tensor | None = None, sample: torch.Tensor | None = None,
                   fill: torch.Tensor | None = None, value: CoalitionValue | None = None,
                   player_mask: torch.Tensor | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TSA region targets of candidate boxes (METHOD 6, settled in docs/METHOD-notes.md), detached.

    ``patches [B, n, D]``, ``words [B, L, D]`` (+ ``word_mask``), ``boxes [B, M, 4]`` patch units,
    each valid box of >= 2 patches. The game is the max-sim game of the patches against the
    caption's words (or the masked-encoder game, below). Returns ``(target [B, M],
    stderr [B, M], interaction [B, M])``: ``interaction`` is the sampled ``I([S])``, ``target`` the
    per-pair redundancy ``R = -I / (|S| - 1)``, ``stderr`` its standard error from the sampler.

    The max-sim game is played on what is specific to a patch within its image: the max-sim on
    ``relu(s_ij - mean_i s_ij)`` (per word, mean over the image's patches). On the raw similarities,
    what every patch shares (the generic words of a caption, the global context a ViT spreads over
    all patches) makes every pair of patches redundant and the largest boxes win; that game and the
    rule R - R_out were retired (docs/METHOD-notes.md, "Retired switches (issue 19 item 6)").

    ``valid [B, M]`` marks real boxes (others get target 0, stderr 0); ``sample [B, M]`` the games
    to sample (default: every valid one); the others take their interaction from ``fill [B, M]``
    (UANSIL's prediction) with stderr 0. Only sampled games reach the sampler.

    ``game="encoder"`` [ours] plays the masked-encoder game: ``value(image [X], keep [X, n]) -> [X]``
    (e.g. :meth:`loupe.model.LoupeModel.coalition_scores` against each image's caption) gives the
    value of the patch coalitions ``keep`` of image ``image[x]``; ``player_mask [B, n]`` marks the
    players (the valid patches; default all); ``patches`` and ``words`` are not used.
    Its samples come from :func:`encoder_interactions`.
    """
    if game not in GAMES:
        raise ValueError(f"game must be one of {GAMES}, got {game!r}")
    if game == "encoder":
        if value is None:
            raise ValueError("region_targets: the encoder game needs value (the coalition scores)")
        return _encoder_targets(value, boxes, h, w, num_samples=num_samples, seed=seed, backend=backend,
                                valid=valid, sample=sample, fill=fill, player_mask=player_mask)
    patches, words = patches.detach(), words.detach()
    subsets = box_subsets(boxes, h, w)
    B, M = subsets.shape[:2]
    valid = torch.ones(B, M, dtype=torch.bool, device=subsets.device) if valid is None else valid
    sample = valid if sample is None else (sample & valid)
    size = subsets.sum(-1)
    if bool((valid & (size < 2)).any()):
        raise ValueError("region_targets: every box needs at least 2 patches")
    sim = torch.einsum("bld,bnd->bln", words.float(), patches.float())
    sim = (sim - sim.mean(-1, keepdim=True)).clamp(min=0)
    if word_mask is not None:
        sim = sim * word_mask[..., None].to(sim.dtype)
    gb, gm = sample.nonzero(as_tuple=True)
    inter = torch.zeros(B, M, dtype=torch.float32, device=subsets.device)
    se = torch.zeros(B, M, dtype=torch.float32, device=subsets.device)
    if fill is not None:
        inter = torch.where(valid & ~sample, fill.detach().float(), inter)
    if gb.numel():
        sub = subsets[gb, gm][:, None, :]
        qm = None if word_mask is None else word_mask[gb]
        i_s, se_s = shapley_interaction(sim, sub, query_mask=qm, num_samples=num_samples, seed=seed,
                                        size_schedule="round_robin", game_index=gb, backend=backend)
        inter[gb, gm] = i_s[:, 0].float()
        se[gb, gm] = se_s[:, 0].float()
    sm1 = (size - 1).clamp(min=1).to(inter.dtype)
    red = -inter / sm1
    se_red = se / sm1
    zero = torch.zeros_like(red)
    return torch.where(valid, red, zero), torch.where(valid, se_red, zero), torch.where(valid, inter, zero)


def _encoder_targets(value: CoalitionValue, boxes: torch.Tensor, h: int, w: int, *, num_samples: int,
                     seed: int, backend: str | None, valid: torch.Tensor | None, sample: torch.Tensor | None,
                     fill: torch.Tensor | None, player_mask: torch.Tensor | None,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`region_targets` of the masked-encoder game (same outputs)."""
    subsets = box_subsets(boxes, h, w)
    B, M, n = subsets.shape
    dev = subsets.device
    valid = torch.ones(B, M, dtype=torch.bool, device=dev) if valid is None else valid
    sample = valid if sample is None else (sample & valid)
    pm = torch.ones(B, n, dtype=torch.bool, device=dev) if player_mask is None else player_mask.to(dev).bool()
    if tuple(pm.shape) != (B, n):
        raise ValueError(f"region_targets: player_mask must be [B={B}, n={n}], got {list(pm.shape)}")
    size = subsets.sum(-1)
    if bool((valid & (size < 2)).any()):
        raise ValueError("region_targets: every box needs at least 2 patches")
    if bool((valid[..., None] & subsets & ~pm[:, None, :]).any()):
        raise ValueError("region_targets: a box holds patches that player_mask marks invalid")
    inter = torch.zeros(B, M, dtype=torch.float32, device=dev)
    se = torch.zeros(B, M, dtype=torch.float32, device=dev)
    if fill is not None:
        inter = torch.where(valid & ~sample, fill.detach().float(), inter)
    gb, gm = sample.nonzero(as_tuple=True)
    if gb.numel():
        i_s, se_s = encoder_interactions(lambda g, keep: value(gb[g], keep), subsets[gb, gm], pm[gb],
                                         num_samples=num_samples, seed=seed, backend=backend)
        inter[gb, gm] = i_s.float()
        se[gb, gm] = se_s.float()
    sm1 = (size - 1).clamp(min=1).to(inter.dtype)
    red = -inter / sm1
    se_red = se / sm1
    zero = torch.zeros_like(red)
    return torch.where(valid, red, zero), torch.where(valid, se_red, zero), torch.where(valid, inter, zero)


def encoder_subsample(valid: torch.Tensor, images: int, boxes: int, gen: torch.Generator) -> torch.Tensor:
    """``[B, M]`` bool: the games of the masked-encoder TSA game played at this step [ours]: up to
    ``boxes`` valid boxes (uniformly at random) in each of up to ``images`` images (uniformly at
    random among the images with at least 2 valid boxes)."""
    B, M = valid.shape
    dev = valid.device
    out = torch.zeros(B, M, dtype=torch.bool, device=dev)
    if B == 0 or M == 0:
        return out
    u = torch.rand(B + B * M, generator=gen)
    ok = (valid.sum(-1) >= 2).cpu()
    img_key = torch.where(ok, u[:B], torch.full((B,), 2.0))
    k = min(int(images), int(ok.sum()))
    if k == 0:
        return out
    chosen = img_key.topk(k, largest=False).indices.to(dev)
    box_key = torch.where(valid, u[B:].reshape(B, M).to(dev), torch.full((B, M), 2.0, device=dev))
    kb = min(int(boxes), M)
    kv, bi = box_key[chosen].topk(kb, dim=1, largest=False)
    out[chosen[:, None].expand(-1, kb), bi] = kv < 1.5
    return out


# ------------------------------------------------------------------------------------------------
# constructed scenes (tests and docs/METHOD-notes.md)
# ------------------------------------------------------------------------------------------------
@dataclass
class SceneSpec:
    """A constructed scene on an 8x8 grid: unit ``patches [64, D]``, caption ``words [L, D]`` and the
    object boxes (patch units, xyxy end-exclusive)."""

    patches: torch.Tensor
    words: torch.Tensor
    objects: list[tuple[int, int, int, int]]


def constructed_scene(name: str, seed: int = 0, dim: int = 32, grid: int = 8) -> SceneSpec:
    """Scenes ``one``, ``noisy``, ``two``, ``border``, ``negbg`` (see tests/objectives/scene_study.py)."""
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    c, u1, u2, ubg, wgen = basis.T[:5]
    o1 = F.normalize(u1 + 0.5 * c, dim=0)
    o2 = F.normalize(u2 + 0.5 * c, dim=0)
    bg = F.normalize(ubg + 0.5 * c, dim=0)
    t1 = F.normalize(u1 + 0.3 * c, dim=0)
    t2 = F.normalize(u2 + 0.3 * c, dim=0)
    tg = F.normalize(wgen + c, dim=0)
    n = grid * grid
    patches = bg.expand(n, dim).clone()
    words = [tg, t1, tg]
    if name == "one" or name == "noisy" or name == "negbg":
        objects = [(2, 2, 5, 5)]
    elif name == "two":
        objects = [(1, 1, 4, 4), (5, 3, 7, 7)]
        words = [tg, t1, tg, t2]
    elif name == "border":
        objects = [(0, 0, 3, 2)]
    else:
        raise ValueError(f"unknown scene {name!r}")
    if name == "noisy":
        patches = F.normalize(patches + 0.15 * torch.randn(n, dim, generator=gen, dtype=torch.float64), dim=-1)
    if name == "negbg":
        patches = F.normalize(ubg - 0.4 * u1 + 0.5 * c, dim=0).expand(n, dim).clone()
    objs = [o1, o2]
    for k, (x0, y0, x1, y1) in enumerate(objects):
        for y in range(y0, y1):
            for x in range(x0, x1):
                patches[y * grid + x] = objs[k]
    return SceneSpec(patches.float(), torch.stack(words).float(), objects)


# ------------------------------------------------------------------------------------------------
# UANSIL (METHOD 8)
# ------------------------------------------------------------------------------------------------
NUM_GAME_FEATURES_EXTRA = _regions.NUM_GEOMETRY + 2  # geometry, s/n, kind (0 TSA, 1 FSA)


def _ua_loss(estimate: torch.Tensor, mu: torch.Tensor, log_var: torch.Tensor, target_var: torch.Tensor) -> torch.Tensor:
    """Heteroscedastic Gaussian NLL of METHOD 8 with variance ``exp(ls) + se^2`` (mean over games).

    Through the fused ``loupe_kernels.uncertainty_interaction_loss`` (targets are data).
    """
    from loupe_kernels import uncertainty_interaction_loss
    return uncertainty_interaction_loss(mu, log_var, estimate.detach(), target_var=target_var.detach())


class LoupeShapleyTerms(nn.Module):
    """Trainable parts of the Shapley terms (the UANSIL predictor) and their options."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.options = options_from_config(config)
        self.uansil = UansilPolicy(2 * config.embed_dim + NUM_GAME_FEATURES_EXTRA, self.options.uansil_hidden)


def _policy(module: LoupeShapleyTerms, feats: torch.Tensor, step: int, gen: torch.Generator,
            use_policy: bool) -> dict[str, torch.Tensor]:
    """Run the predictor and let :class:`loupe_kernels.uansil.UansilPolicy` decide which games are
    sampled. Returns ``mu``, ``ls`` (with gradient), ``sample`` (bool: sample this game), ``calib``
    (bool: would have been skipped but sampled for calibration)."""
    opts = module.options
    mu, ls = module.uansil(feats)
    sample, calib = module.uansil.decide(ls, step, gen, enabled=use_policy and opts.uansil,
                                         warmup=opts.uansil_warmup, threshold=opts.uansil_threshold,
                                         calibration=opts.uansil_calibration,
                                         min_fraction=opts.uansil_min_fraction,
                                         min_calibration=opts.uansil_min_calibration,
                                         min_skill=opts.uansil_min_skill)
    return {"mu": mu, "ls": ls, "sample": sample, "calib": calib}


# ------------------------------------------------------------------------------------------------
# candidates
# ------------------------------------------------------------------------------------------------
def tsa_candidates(box_logits: torch.Tensor, candidate_boxes: torch.Tensor, suppress: torch.Tensor,
                   top: int, random: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """M' = top + random candidate boxes of >= 2 patches per image: the top by objectness after NMS,
    then distinct random boxes. Returns ``index [B, M']`` (into the candidates) and ``valid [B, M']``
    (False where fewer boxes exist)."""
    B, Kall = box_logits.shape
    dev = box_logits.device
    area = (candidate_boxes[:, 2] - candidate_boxes[:, 0]) * (candidate_boxes[:, 3] - candidate_boxes[:, 1])
    eligible = (area >= 2).to(dev)
    n_el = int(eligible.sum())
    Mp = min(top + random, n_el)
    index = torch.zeros(B, max(Mp, 1), dtype=torch.long, device=dev)
    valid = torch.zeros(B, max(Mp, 1), dtype=torch.bool, device=dev)
    if Mp == 0:
        return index[:, :0], valid[:, :0]
    ntop = min(top, Mp)
    taken = torch.zeros(B, Kall, dtype=torch.bool, device=dev)
    if ntop:
        scores = torch.where(eligible[None], box_logits.detach().float(), torch.tensor(float("-inf"), device=dev))
        idx, ok = _regions.nms_topk(scores, suppress, ntop)
        index[:, :ntop], valid[:, :ntop] = idx, ok
        taken.scatter_(1, idx, ok)
    nrand = Mp - ntop
    if nrand:
        keys = torch.rand(B, Kall, generator=gen).to(dev)
        keys = torch.where(eligible[None] & ~taken, keys, torch.full_like(keys, 2.0))
        kv, ridx = keys.topk(nrand, dim=1, largest=False)  # the nrand smallest keys, ascending
        rok = kv < 1.5
        index[:, ntop:], valid[:, ntop:] = ridx, rok
    return index, valid


def fsa_candidates(region_index: torch.Tensor, region_mask: torch.Tensor, phrase_mask: torch.Tensor,
                   grounding: torch.Tensor | None, per_phrase: int,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """SSIM candidate regions per image: the top-M semantic regions, plus each phrase's ``per_phrase``
    best boxes by the fixed grounding score (METHOD 10; ``grounding [B, P, K]`` over all candidates,
    :func:`loupe.regions.grounding_scores`); duplicates removed. Returns ``index [B, R]``, ``valid [B, R]``."""
    B = region_index.shape[0]
    parts, oks = [region_index], [region_mask]
    if per_phrase and phrase_mask.shape[1] > 0 and grounding is not None:
        with torch.no_grad():
            score = grounding.detach().float()  # [B, P, K]
            pm = phrase_mask[..., None].expand(-1, -1, per_phrase)
            if per_phrase:
                best = score.topk(min(per_phrase, score.shape[-1]), dim=-1).indices  # [B, P, k]
                parts.append(best.reshape(B, -1))
                oks.append(pm[..., :best.shape[-1]].reshape(B, -1))
    index = torch.cat(parts, dim=1)
    valid = torch.cat(oks, dim=1).to(index.device)
    # remove duplicates: keep the first occurrence of each box
    R = index.shape[1]
    same = (index[:, :, None] == index[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    earlier = torch.ones(R, R, dtype=torch.bool, device=index.device).tril(-1)
    dup = (same & earlier[None]).any(-1)
    valid = valid & ~dup
    # compact: valid first (stable)
    order = (~valid).to(torch.int8).argsort(dim=1, stable=True)
    index, valid = index.gather(1, order), valid.gather(1, order)
    keep = max(1, int(valid.sum(1).max()))
    return index[:, :keep], valid[:, :keep]


# ------------------------------------------------------------------------------------------------
# SSIM interactions and the losses
# ------------------------------------------------------------------------------------------------
def phrase_region_interactions(phrase_feats: torch.Tensor, phrase_mask: torch.Tensor, region_feats: torch.Tensor,
                               region_valid: torch.Tensor, *, num_samples: int = 32, seed: int = 0,
                               sample: torch.Tensor | None = None, fill: torch.Tensor | None = None,
                               backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``I([{r, p}])`` in the region-phrase game of each pair (METHOD 5, 7), detached.

    ``phrase_feats [B, P, D]``/``phrase_mask [B, P]``, ``region_feats [B, R, D]``/``region_valid [B, R]``.
    Players of pair b's game: its valid phrases and valid regions. Returns ``(I [B, P, R], stderr
    [B, P, R])``, 0 for invalid pairs; pairs outside ``sample`` take ``fill`` (stderr 0).
    """
    B, P, _ = phrase_feats.shape
    R = region_feats.shape[1]
    dev = phrase_feats.device
    pair_ok = phrase_mask[:, :, None] & region_valid[:, None, :]
    todo = pair_ok if sample is None else (pair_ok & sample)
    inter = torch.zeros(B, P, R, dtype=torch.float32, device=dev)
    se = torch.zeros_like(inter)
    if fill is not None:
        inter = torch.where(pair_ok & ~todo, fill.detach().float(), inter)
    gb, gp, gr = todo.nonzero(as_tuple=True)
    if gb.numel():
        sim = torch.einsum("bpd,brd->bpr", phrase_feats.detach().float(), region_feats.detach().float())
        G = gb.numel()
        sub = torch.zeros(G, 1, P + R, dtype=torch.bool, device=dev)
        ar = torch.arange(G, device=dev)
        sub[ar, 0, gp] = True
        sub[ar, 0, P + gr] = True
        pm = torch.cat([phrase_mask, region_valid], dim=1)[gb]
        i_s, se_s = shapley_interaction(sim, sub, player_mask=pm, query_players=True,
                                        num_samples=num_samples, seed=seed, size_schedule="round_robin",
                                        game_index=gb, backend=backend)
        inter[gb, gp, gr] = i_s[:, 0].float()
        se[gb, gp, gr] = se_s[:, 0].float()
    return inter, se


def phrase_contrast(inter: torch.Tensor, pair_ok: torch.Tensor) -> torch.Tensor:
    """``inter [B, P, R]`` minus, per region, the mean over the image's valid phrases ([ours]).

    Only images with at least two valid phrases change; invalid pairs stay as they are. A region
    that every phrase of the caption needs equally (e.g. a patch holding the image's global content)
    gets 0 for each; a region that one phrase needs more than the others stays positive for it.
    """
    vf = pair_ok.to(inter.dtype)
    cnt = vf.sum(1, keepdim=True)  # valid phrases per region [B, 1, R]
    mean = (inter * vf).sum(1, keepdim=True) / cnt.clamp(min=1)
    return torch.where(pair_ok & (cnt >= 2), inter - mean, inter)


def cross_image_lse(phrase_feats: torch.Tensor, region_feats: torch.Tensor, region_valid: torch.Tensor,
                    tau: float) -> torch.Tensor:
    """``[B, P]``: log-sum-exp of ``<p, r> / tau`` of each phrase over the valid regions of every
    *other* image of the batch (``-inf`` for a batch of one) [ours]. These are the negatives of
    ``fsa_cross_image``; they carry gradient into the phrases and the other images' regions."""
    B = phrase_feats.shape[0]
    logits = torch.einsum("bpd,crd->bpcr", phrase_feats.float(), region_feats.float()) / tau  # [B, P, B, R]
    other = ~torch.eye(B, dtype=torch.bool, device=logits.device)  # [B, B]
    keep = other[:, None, :, None] & region_valid[None, None, :, :]
    logits = logits.masked_fill(~keep, float("-inf"))
    return torch.logsumexp(logits.flatten(2), -1)


def _standardise(t: torch.Tensor, valid: torch.Tensor, floor: float) -> torch.Tensor:
    """Zero mean, unit spread over the last dim's valid entries (0 elsewhere)."""
    vf = valid.to(t.dtype)
    cnt = vf.sum(-1, keepdim=True).clamp(min=1)
    mean = (t * vf).sum(-1, keepdim=True) / cnt
    var = (((t - mean) * vf) ** 2).sum(-1, keepdim=True) / cnt
    return torch.where(valid, (t - mean) / var.sqrt().clamp(min=floor), torch.zeros_like(t))


def soft_kl(target_logits: torch.Tensor, pred_logits: torch.Tensor, valid: torch.Tensor,
            extra_lse: torch.Tensor | None = None) -> torch.Tensor:
    """``KL(softmax(target) || softmax(pred))`` over the valid entries of the last dim, per row.

    Rows with fewer than 2 valid entries give 0. The target side carries no gradient.
    ``extra_lse`` (shape of a row index, may be ``-inf``) is the log-sum-exp of further prediction
    logits that the target gives probability 0 (negatives): the prediction is normalised over the
    row's valid entries and them.
    """
    neg = torch.tensor(float("-inf"), device=pred_logits.device, dtype=torch.float32)
    tl = torch.where(valid, target_logits.detach().float(), neg)
    pl = torch.where(valid, pred_logits.float(), neg)
    ok = valid.sum(-1) >= 2
    tl = torch.where(ok[..., None], tl, torch.zeros_like(tl))
    pl = torch.where(ok[..., None], pl, torch.zeros_like(pl))
    logq = torch.log_softmax(tl, -1)
    if extra_lse is None:
        logp = torch.log_softmax(pl, -1)
    else:
        extra = torch.where(ok, extra_lse.float(), neg)
        logp = pl - torch.logaddexp(torch.logsumexp(pl, -1), extra)[..., None]
    q = logq.exp()
    kl = torch.where(q > 0, q * (logq - torch.where(torch.isfinite(logp), logp, torch.zeros_like(logp))),
                     torch.zeros_like(q)).sum(-1)
    return torch.where(ok, kl, torch.zeros_like(kl))


def _seed_of(batch: Mapping[str, Any], salt: int) -> int:
    base = int(batch.get("seed", 0)) if not isinstance(batch.get("seed", 0), torch.Tensor) \
        else int(batch["seed"].reshape(-1)[0])
    return (base * 1000003 + salt) % (1 << 62)


def _phrases(out: dict, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    if "phrase_feats" in out:
        return out["phrase_feats"], out["phrase_mask"]
    spans = batch.get("phrase_token_spans", batch.get("phrase_spans"))
    wt = out["word_tokens"]
    if spans is None:
        return wt.new_zeros(wt.shape[0], 0, wt.shape[-1]), torch.zeros(wt.shape[0], 0, dtype=torch.bool,
                                                                       device=wt.device)
    return _regions.phrase_features(wt, out["word_mask"], spans, batch.get("phrase_mask"))


def _true_boxes(batch: Mapping[str, Any], phrase_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    boxes = batch.get("boxes")
    if not isinstance(boxes, torch.Tensor) or boxes.dim() != 3 or boxes.shape[:2] != phrase_mask.shape:
        return None
    bm = batch.get("box_mask")
    ok = phrase_mask.clone() if bm is None else (phrase_mask & bm.to(phrase_mask.device).bool())
    return boxes.to(phrase_mask.device).float(), ok


def _any_iou50(cand_px: torch.Tensor, cand_ok: torch.Tensor, true_px: torch.Tensor) -> torch.Tensor:
    """``[B, P]``: some valid candidate ``[B, R, 4]`` has IoU >= 0.5 with the true box ``[B, P, 4]``."""
    ious = _regions.box_iou(true_px.double(), cand_px.double())  # [B, P, R]
    return ((ious >= 0.5 - 1e-9) & cand_ok[:, None, :]).any(-1)


def _find_module(model: nn.Module) -> "LoupeShapleyTerms | None":
    mods = getattr(model, "loss_modules", {})
    for name in ("tsa", "fsa", "ua"):
        if name in mods:
            return mods[name]
    return None


def loupe_losses(out: dict, batch: Mapping[str, Any], model: nn.Module) -> dict[str, Any]:
    """Compute L_TSA, L_FSA, L_UA, the UANSIL statistics and diagnostics once per forward (cached in
    ``out["_loupe_shapley"]``)."""
    cache = out.get("_loupe_shapley")
    if cache is not None:
        return cache
    module = _find_module(model)
    opts = module.options if module is not None else options_from_config(model.config)
    weights = getattr(model, "loss_weights", {})
    use_ua = module is not None and "ua" in weights
    step = batch.get("step")
    if step is None:
        step = int(module.uansil.steps) if module is not None else 0
    step = int(step)
    gen = torch.Generator().manual_seed(_seed_of(batch, 7))
    patches, words, wmask = out["patch_tokens"], out["word_tokens"], out["word_mask"]
    B, n, D = patches.shape
    g = model.config.grid_size
    cand = model.candidate_boxes
    res: dict[str, Any] = {}
    ua_parts: list[torch.Tensor] = []
    sampled_I: list[torch.Tensor] = []
    n_games = n_sampled = 0
    calib = torch.zeros(CALIB_STATS, dtype=torch.float64)  # UansilPolicy.calibration_stats, summed
    dev = patches.device

    def policy(feats: torch.Tensor) -> dict[str, torch.Tensor] | None:
        if not use_ua:
            return None
        return _policy(module, feats, step, gen, True)

    # ---------------------------------------------------------------- TSA
    if "tsa" in weights:
        idx, valid = tsa_candidates(out["box_logits"], cand, model.nms_suppress, opts.tsa_top, opts.tsa_random, gen)
        boxes = cand[idx]  # [B, M', 4]
        Mp = idx.shape[1]
        pol = None
        tsa_in, tsa_out = model.box_features_at(patches, idx)  # the M' boxes only
        o = model.objectness(tsa_in, tsa_out, idx)
        if use_ua and Mp:
            geo = model.box_geometry[idx]  # [B, M', 7]
            size = ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])).float()
            feats = torch.cat([tsa_in.detach().float(),
                               out["text_emb"].detach().float()[:, None].expand(B, Mp, D), geo.float(),
                               (size / n)[..., None], torch.zeros(B, Mp, 1, device=dev)], dim=-1)
            pol = policy(feats.reshape(B * Mp, -1))
        fill = None if pol is None else pol["mu"].detach().reshape(B, Mp)
        cand_valid = valid
        if opts.tsa_game == "encoder":
            # a subsample of games is played; the others take UANSIL's mean where the policy skips
            # them (confident), else they are left out of L_TSA for this step
            sample = valid & encoder_subsample(valid, opts.encoder_images, opts.encoder_boxes, gen)
            if pol is not None:
                valid = sample | (valid & ~pol["sample"].reshape(B, Mp))
            else:
                valid = sample
            images = batch["images"]
            text = out["text_emb"].detach()
            pmask = out.get("patch_mask")

            def value(image: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
                return model.coalition_scores(images, image, keep, text[image]).float()

            t, se, inter = region_targets(patches, words, wmask, boxes, g, g, game="encoder",
                                          num_samples=opts.encoder_samples, seed=_seed_of(batch, 1),
                                          backend=model.config.kernel_backend, valid=valid, sample=sample,
                                          fill=fill, value=value, player_mask=pmask)
        else:
            sample = valid if pol is None else (valid & pol["sample"].reshape(B, Mp))
            t, se, inter = region_targets(patches, words, wmask, boxes, g, g, game=opts.tsa_game,
                                          num_samples=opts.num_samples, seed=_seed_of(batch, 1),
                                          backend=model.config.kernel_backend, valid=valid, sample=sample, fill=fill)
        z = _standardise(t, valid, opts.min_spread)
        kl = soft_kl(z / opts.tau_i, o, valid)
        rows = valid.sum(-1) >= 2
        res["loss_tsa"] = kl.sum() / rows.sum().clamp(min=1) + 0.0 * o.sum()
        vf = valid.float()
        cnt = vf.sum(-1).clamp(min=1)
        mean_t = (t * vf).sum(-1) / cnt
        std_t = ((((t - mean_t[:, None]) * vf) ** 2).sum(-1) / cnt).sqrt()
        samp = sample.float()
        mse = (se * samp).sum(-1) / samp.sum(-1).clamp(min=1)
        ok_rows = rows & (std_t > 0) & (samp.sum(-1) > 0)
        res["diag_tsa_rel_stderr"] = float((mse[ok_rows] / std_t[ok_rows]).mean()) if bool(ok_rows.any()) else float("nan")
        n_games += int(cand_valid.sum())
        n_sampled += int(sample.sum())
        if opts.tsa_game == "encoder":  # the share of candidate games with a target (played or filled)
            res["diag_tsa_target_share"] = float(valid.sum() / cand_valid.sum().clamp(min=1))
        if pol is not None:
            sv = sample.reshape(-1)
            # the sampler's stderr of I itself (se is the stderr of R = -I / (|S| - 1))
            se_i = (se * ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1]) - 1).float()).reshape(-1)
            if bool(sv.any()):
                ua_parts.append(_ua_loss(inter.reshape(-1)[sv], pol["mu"][sv], pol["ls"][sv], se_i[sv] ** 2))
            sampled_I.append(inter.reshape(-1)[sv])
            cm = pol["calib"] & sv
            if bool(cm.any()):
                calib += UansilPolicy.calibration_stats(inter.reshape(-1)[cm], pol["mu"][cm], pol["ls"][cm], se_i[cm] ** 2)
        # diagnostic: the top-objectness box against the objects
        res["_tsa_idx"], res["_tsa_valid"] = idx, valid

    # ---------------------------------------------------------------- FSA
    pf, pmask = _phrases(out, batch)
    if opts.fsa_min_phrases > 1 and pmask.shape[1] > 0:
        pmask = pmask & (pmask.sum(1, keepdim=True) >= opts.fsa_min_phrases)
    if "fsa" in weights or "ua" in weights:
        grounding = None
        if opts.fsa_per_phrase and pf.shape[1] > 0:
            with torch.no_grad():
                grounding = _regions.grounding_scores(pf.detach().float(), patches.detach().float(), g, g)
        ridx, rvalid = fsa_candidates(out["region_index"], out["region_mask"], pmask, grounding, opts.fsa_per_phrase)
        R = ridx.shape[1]
        P = pf.shape[1]
        rfeat, _ = model.box_features_at(patches, ridx)
        pair_ok = pmask[:, :, None] & rvalid[:, None, :]
        pol = None
        shapley_labels = opts.fsa_labels == "shapley"
        if use_ua and P and R and shapley_labels:
            geo = model.box_geometry[ridx][:, None].expand(B, P, R, -1)
            nplayers = (pmask.sum(-1) + rvalid.sum(-1)).clamp(min=1).float()[:, None, None, None].expand(B, P, R, 1)
            feats = torch.cat([rfeat.detach().float()[:, None].expand(B, P, R, D),
                               pf.detach().float()[:, :, None].expand(B, P, R, D), geo.float(),
                               2.0 / nplayers, torch.ones(B, P, R, 1, device=dev)], dim=-1)
            pol = policy(feats.reshape(B * P * R, -1))
        # every SSIM game is sampled: the policy never fills a label here [ours, measured]. Predicted
        # interactions inside the phrase's label softmax collapsed the phrase maps twice (the max-sim
        # game, and the encoder game behind the calibration gate: docs/METHOD-notes.md), and these
        # games are cheap. The predictor still trains on them (L_UA) and is checked on them.
        sample = pair_ok
        fill = None
        if shapley_labels:
            inter, se = phrase_region_interactions(pf, pmask, rfeat, rvalid, num_samples=opts.num_samples,
                                                   seed=_seed_of(batch, 2), sample=sample, fill=fill,
                                                   backend=model.config.kernel_backend)
        else:  # the ablation: labels without the Shapley interaction, nothing sampled
            sample = torch.zeros_like(pair_ok)
            se = torch.zeros(B, P, R, dtype=torch.float32, device=dev)
            inter = (torch.einsum("bpd,brd->bpr", pf.detach().float(), rfeat.detach().float())
                     if opts.fsa_labels == "similarity" else torch.zeros_like(se)).masked_fill(~pair_ok, 0.0)
        z = _standardise(phrase_contrast(inter, pair_ok) if opts.fsa_phrase_contrast else inter, pair_ok,
                         opts.min_spread)
        pred = torch.einsum("bpd,brd->bpr", pf.float(), rfeat.float()) / opts.tau
        # the negatives count fsa_cross_image times each in the normaliser
        extra = (cross_image_lse(pf, rfeat, rvalid, opts.tau) + math.log(opts.fsa_cross_image)
                 if opts.fsa_cross_image > 0 else None)
        kl = soft_kl(z / opts.tau_s, pred, pair_ok, extra)
        rows = pair_ok.sum(-1) >= 2
        res["loss_fsa"] = kl.sum() / rows.sum().clamp(min=1) + 0.0 * pred.sum()
        n_games += int(pair_ok.sum())
        n_sampled += int(sample.sum())
        if pol is not None:
            sv = sample.reshape(-1)
            if bool(sv.any()):
                ua_parts.append(_ua_loss(inter.reshape(-1)[sv], pol["mu"][sv], pol["ls"][sv], se.reshape(-1)[sv] ** 2))
            sampled_I.append(inter.reshape(-1)[sv])
            cm = pol["calib"] & sv
            if bool(cm.any()):
                calib += UansilPolicy.calibration_stats(inter.reshape(-1)[cm], pol["mu"][cm], pol["ls"][cm],
                                                        se.reshape(-1)[cm] ** 2)
        # diagnostics: candidates against the true boxes
        tb = _true_boxes(batch, pmask)
        if tb is not None:
            true_px, tok = tb
            ps = model.config.patch_size
            hit = _any_iou50(_regions.boxes_to_pixels(cand[ridx], ps), rvalid, true_px)
            hit_m = _any_iou50(_regions.boxes_to_pixels(cand[out["region_index"]], ps), out["region_mask"], true_px)
            if bool(tok.any()):
                res["diag_phrase_iou50"] = float(hit[tok].float().mean())
                res["diag_phrase_iou50_topm"] = float(hit_m[tok].float().mean())
            has = tok.any(-1)
            if bool(has.any()):
                top = out["box_logits"].detach().argmax(-1)
                top_px = _regions.boxes_to_pixels(cand[top], ps)[:, None]  # [B, 1, 4]
                ious = _regions.box_iou(true_px.double(), top_px.double())[..., 0]  # [B, P]
                over = ((ious > 0) & tok).any(-1)
                good = ((ious >= 0.5 - 1e-9) & tok).any(-1)
                res["diag_top_box_overlap"] = float(over[has].float().mean())
                res["diag_top_box_iou50"] = float(good[has].float().mean())

    # ---------------------------------------------------------------- UA
    parts = [p for p in ua_parts if p is not None]
    if use_ua:
        ref = next(iter(module.parameters()))
        res["loss_ua"] = torch.stack(parts).mean() if parts else ref.sum() * 0.0
        if module.training:
            allI = torch.cat(sampled_I) if sampled_I else torch.zeros(0, device=dev)
            module.uansil.update(allI)
            module.uansil.record_calibration(calib)
    res["uansil_fraction_sampled"] = float(n_sampled / n_games) if n_games else 1.0
    coverage, skill = UansilPolicy.summarise(calib)
    res["uansil_calibration"] = float("nan") if coverage is None else coverage
    res["uansil_calibration_games"] = float(calib[1])
    res["uansil_skill"] = float("nan") if skill is None else skill
    rolling = module.uansil.rolling_calibration() if use_ua else None
    res["uansil_calibration_rolling"] = float("nan") if rolling is None else float(rolling)
    rolling = module.uansil.rolling_skill() if use_ua else None
    res["uansil_skill_rolling"] = float("nan") if rolling is None else float(rolling)
    res["uansil_warm"] = float(use_ua and opts.uansil and step >= opts.uansil_warmup)
    out["_loupe_shapley"] = res
    for k, v in res.items():
        if not k.startswith("_") and not k.startswith("loss_"):
            out[k] = v
    return res


# ------------------------------------------------------------------------------------------------
# what the table of loupe.losses needs
# ------------------------------------------------------------------------------------------------
#: the Shapley terms of the ``loupe`` objective and their default weights a, b, c (METHOD 9)
SHAPLEY_TERMS: dict[str, float] = {"tsa": 0.5, "fsa": 0.5, "ua": 0.1}


def build_module(name: str):
    """``build(config)`` of term ``name``: the terms share one :class:`LoupeShapleyTerms`, built by the
    first of them whose weight (default or ``config.loss_weights``) is not 0."""
    def build(config: Any) -> "LoupeShapleyTerms | None":
        weights = {**SHAPLEY_TERMS, **(config.loss_weights or {})}
        first = next((t for t in SHAPLEY_TERMS if weights.get(t, 0) != 0), None)
        return LoupeShapleyTerms(config) if first == name else None
    return build


def term_fn(name: str):
    """``fn(out, batch, model, module)`` of term ``name`` (all three read one cached computation)."""
    def fn(out: dict, batch: Mapping[str, Any], model: nn.Module, module: nn.Module | None) -> torch.Tensor:
        return loupe_losses(out, batch, model)[f"loss_{name}"]
    return fn
