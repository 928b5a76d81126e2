"""The LOUPE objectives L_TSA, L_FSA and L_UA (METHOD sections 5-9), plugged into the loss registry.

Importing this module registers three terms of the ``loupe`` objective in :mod:`loupe.losses`:
``tsa`` (token-level Shapley interaction -> objectness), ``fsa`` (region-phrase interactions ->
phrase-to-region alignment) and ``ua`` (the UANSIL uncertainty-weighted interaction loss).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loupe_kernels import shapley_interaction, shapley_interaction_pooled

__all__ = ["region_targets", "box_subsets", "game_values", "SceneSpec", "constructed_scene", "TARGET_RULES",
           "GAMES"]

TARGET_RULES = ("redundancy", "redundancy_minus_outside")
GAMES = ("maxsim", "pooled")


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


def game_values(game: str, masks: torch.Tensor, *, sim: torch.Tensor | None = None,
                query_mask: torch.Tensor | None = None, features: torch.Tensor | None = None,
                target: torch.Tensor | None = None) -> torch.Tensor:
    """Exact ``v(C)`` for coalitions ``masks [B, M, n]`` (``v(empty) = 0``) -> ``[B, M]`` float.

    ``maxsim``: ``sim [B, L, n]`` with ``query_mask [B, L]``; ``pooled``: ``features [B, n, D]`` and
    ``target [B, D]``.
    """
    if game == "maxsim":
        s = sim.float()
        neg = torch.tensor(float("-inf"), device=s.device)
        mx = torch.where(masks[:, :, None, :], s[:, None], neg).amax(-1)  # [B, M, L]
        mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
        qm = torch.ones(s.shape[:2], dtype=torch.bool, device=s.device) if query_mask is None else query_mask
        qf = qm.to(mx.dtype)[:, None, :]
        return (mx * qf).sum(-1) / qf.sum(-1).clamp(min=1)
    if game == "pooled":
        pooled = masks.to(features.dtype) @ features  # [B, M, D]
        return torch.einsum("bmd,bd->bm", F.normalize(pooled.float(), dim=-1), target.float())
    raise ValueError(f"game must be one of {GAMES}, got {game!r}")


def region_targets(patches: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor | None,
                   boxes: torch.Tensor, h: int, w: int, *, rule: str = "redundancy",
                   game: str = "maxsim", num_samples: int = 32, seed: int = 0,
                   text_emb: torch.Tensor | None = None, center: bool = True, backend: str | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TSA region targets of candidate boxes (METHOD 6), detached.

    ``patches [B, n, D]``, ``words [B, L, D]`` (+ ``word_mask``), ``boxes [B, M, 4]`` patch units,
    each of >= 2 patches. The game is the max-sim game of the patches against the caption's words,
    or the pooled game against ``text_emb [B, D]``. Returns ``(target [B, M], stderr [B, M],
    interaction [B, M])``: ``interaction`` is the sampled ``I([S])``, ``stderr`` the target's
    standard error from the sampler. Rules (R = -I / (|S| - 1), the per-pair redundancy):

    - ``redundancy``: R;
    - ``redundancy_minus_outside``: R - R_out, ``R_out = v(S) + v(N\\S) - v(N)`` (the redundancy of
      the box with the rest of the image in the two-player game [S], [N\\S]);

    ``center`` (default) plays the game on what is specific to a patch within its image: the
    max-sim game on ``relu(s_ij - mean_i s_ij)`` (per word, mean over the image's patches), the
    pooled game on ``x_i - mean_i x_i``. Without it, what every patch shares (the generic words of
    a caption, the global context a ViT spreads over all patches) makes every pair of patches
    redundant and the largest boxes win (docs/METHOD-notes.md).
    """
    if rule not in TARGET_RULES:
        raise ValueError(f"rule must be one of {TARGET_RULES}, got {rule!r}")
    patches, words = patches.detach(), words.detach()
    subsets = box_subsets(boxes, h, w)
    size = subsets.sum(-1)
    if bool((size < 2).any()):
        raise ValueError("region_targets: every box needs at least 2 patches")
    B, n = patches.shape[:2]
    sim = None
    if game == "maxsim":
        sim = torch.einsum("bld,bnd->bln", words.float(), patches.float())
        if center:
            sim = (sim - sim.mean(-1, keepdim=True)).clamp(min=0)
        inter, se = shapley_interaction(sim, subsets, query_mask=word_mask, num_samples=num_samples,
                                        seed=seed, size_schedule="round_robin", backend=backend)
    elif game == "pooled":
        if text_emb is None:
            raise ValueError("region_targets: the pooled game needs text_emb")
        text_emb = text_emb.detach()
        if center:
            patches = patches - patches.mean(1, keepdim=True)
        inter, se = shapley_interaction_pooled(patches.float(), text_emb.float(), subsets,
                                               num_samples=num_samples, seed=seed,
                                               size_schedule="round_robin", backend=backend)
    else:
        raise ValueError(f"game must be one of {GAMES}, got {game!r}")
    sm1 = (size - 1).to(inter.dtype)
    red = -inter / sm1
    se_red = se / sm1
    if rule == "redundancy":
        return red, se_red, inter
    outside = ~subsets
    full = torch.ones_like(subsets[:, :1])
    kw = dict(sim=sim, query_mask=word_mask, features=patches, target=text_emb)
    v_in = game_values(game, subsets, **kw)
    v_out = game_values(game, outside, **kw)
    v_all = game_values(game, full, **kw)
    r_out = v_in + v_out - v_all
    return red - r_out, se_red, inter


# ------------------------------------------------------------------------------------------------
# constructed scenes (tests and docs/METHOD-notes.md)
# ------------------------------------------------------------------------------------------------
@dataclass
class SceneSpec:
    """A constructed scene on an 8x8 grid: unit ``patches [64, D]``, caption ``words [L, D]``,
    ``text_emb [D]`` and the object boxes (patch units, xyxy end-exclusive)."""

    patches: torch.Tensor
    words: torch.Tensor
    text_emb: torch.Tensor
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
    W = torch.stack(words)
    return SceneSpec(patches.float(), W.float(), F.normalize(W.mean(0), dim=0).float(), objects)
