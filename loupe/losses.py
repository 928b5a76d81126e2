"""Training objectives: L_CMC, L_FILIP and the registry that composes an objective (METHOD 2, 3, 9).

Every loss is computed inside ``LoupeModel.forward`` (ZeRO-3 safe) from the dict of model outputs.

Across ranks (data parallel) the losses follow open_clip's "local loss": each rank gathers the
features of every rank *with gradient*, scores its own rows against all columns, and uses labels
offset by the number of samples on the ranks before it. Without an initialised process group, or
with world size 1, nothing is gathered. Ranks may hold different batch sizes and caption lengths:
shapes are exchanged first and padded for the collective, then trimmed.

Objectives are weighted sums of registered :class:`LossTerm` s:

- ``clip``  = L_CMC
- ``filip`` = L_CMC + L_FILIP
- ``loupe`` = L_CMC + f L_FILIP + a L_TSA + b L_FSA + c L_UA (the Shapley terms live in
  ``loupe.objectives``; the table at the end of this module lists them explicitly).
- ``sparc`` = L_CMC + 2 L_SPARC (SPARC's fine-grained loss, ``loupe.sparc``: the paper's
  lambda_g = 0.5, lambda_f = 1, times 2).

Further terms can be added with :func:`register_loss_term`.

``LoupeConfig.loss_weights`` overrides the weights (a weight of 0 drops the term).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from loupe_kernels import token_region_similarity, token_region_similarity_dual

from . import objectives as _objectives
from . import sparc as _sparc
from .config import FILIP_QUERIES, OBJECTIVES, options_from_config
from .metrics import patch_pair_cos

__all__ = ["dist_info", "gather_with_grad", "gather_padded", "cmc_loss", "filip_loss", "filip_scores", "patch_spread_loss",
           "LossTerm", "LOSS_TERMS", "register_loss_term", "resolve_loss_weights"]


# ------------------------------------------------------------------------------------------------
# distributed helpers
# ------------------------------------------------------------------------------------------------
def dist_info() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGatherGrad(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient for this rank's piece (all_reduce).

    all_reduce works on every backend (gloo has no reduce_scatter), and the sum is right for the
    local loss, where each rank's loss depends on every rank's features.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        ctx.rank, ctx.n = rank, x.shape[0]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate equally-shaped ``x`` of every rank along dim 0, differentiable (identity at world 1)."""
    _, world = dist_info()
    if world == 1:
        return x
    if x.is_floating_point():
        return _AllGatherGrad.apply(x)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def gather_padded(x: torch.Tensor, pad_value: float | bool = 0) -> tuple[torch.Tensor, int]:
    """Gather ``x [B_r, *rest]`` from every rank, with gradient, allowing B_r and ``rest`` to differ.

    Every dim is padded to the largest size over ranks with ``pad_value`` for the collective; the
    leading (batch) padding is then removed, the other dims stay padded (so token masks gathered
    with ``pad_value=False`` mark the padding). Returns ``(gathered [sum B_r, *max rest], offset)``
    where ``offset`` is the number of samples on lower ranks (the label offset of this rank).
    """
    rank, world = dist_info()
    if world == 1:
        return x, 0
    dev = x.device
    shape = torch.tensor(list(x.shape), dtype=torch.long, device=dev)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    shapes_t = torch.stack(shapes)  # [world, ndim]
    max_shape = shapes_t.max(dim=0).values.tolist()
    sizes = shapes_t[:, 0].tolist()
    pad = []
    for d in reversed(range(x.dim())):
        pad += [0, max_shape[d] - x.shape[d]]
    orig_dtype = x.dtype
    if orig_dtype == torch.bool:  # bool collectives are not supported on every backend
        x = x.to(torch.uint8)
        pad_value = int(bool(pad_value))
    if any(pad):
        x = F.pad(x, pad, value=pad_value)
    full = gather_with_grad(x)  # [world * maxB, ...]
    maxb = max_shape[0]
    pieces = [full[r * maxb:r * maxb + sizes[r]] for r in range(world)]
    out = torch.cat(pieces, dim=0)
    if orig_dtype == torch.bool:
        out = out.bool()
    return out, int(sum(sizes[:rank]))


# ------------------------------------------------------------------------------------------------
# losses
# ------------------------------------------------------------------------------------------------
def cmc_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE on normalised global embeddings ``[B, D]`` with the (clamped) scale.

    Rows are this rank's samples, columns every rank's; labels are offset by rank (open_clip's local
    loss). Computed in float32 at least.
    """
    if image_emb.shape != text_emb.shape or image_emb.dim() != 2:
        raise ValueError(f"cmc_loss: image_emb and text_emb must both be [B, D], got "
                         f"{list(image_emb.shape)} and {list(text_emb.shape)}")
    img = image_emb.float() if image_emb.dtype != torch.float64 else image_emb
    txt = text_emb.float() if text_emb.dtype != torch.float64 else text_emb
    all_img, offset = gather_padded(img)
    all_txt, _ = gather_padded(txt)
    scale = logit_scale.to(img.dtype)
    logits_i2t = scale * img @ all_txt.t()
    logits_t2i = scale * txt @ all_img.t()
    labels = torch.arange(img.shape[0], device=img.device) + offset
    return 0.5 * (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels))


def filip_scores(patch_tokens: torch.Tensor, patch_mask: torch.Tensor | None, word_tokens: torch.Tensor,
                 word_mask: torch.Tensor, *, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """FILIP token-wise scores of every pair (single process): ``(s_i2t [Bi, Bt], s_t2i [Bt, Bi])``.

    ``s_i2t[a, b]`` = mean over image a's patches of the max over caption b's words; ``s_t2i[b, a]``
    = mean over caption b's words of the max over image a's patches (METHOD 3).
    """
    s_i2t = token_region_similarity(patch_tokens, word_tokens, patch_mask, word_mask, backend=backend)
    s_t2i = token_region_similarity(word_tokens, patch_tokens, word_mask, patch_mask, backend=backend)
    return s_i2t, s_t2i


def _masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the valid tokens per item ``[B, D]`` (zero for an item without valid tokens)."""
    m = mask.to(tokens.dtype)[..., None]
    return (tokens * m).sum(1) / m.sum(1).clamp(min=1)


def filip_loss(patch_tokens: torch.Tensor, patch_mask: torch.Tensor | None, word_tokens: torch.Tensor,
               word_mask: torch.Tensor, logit_scale: torch.Tensor, *, backend: str | None = None,
               center: bool = False, queries: str = "both") -> torch.Tensor:
    """Token-wise (FILIP) contrastive loss, both directions, through ``token_region_similarity``.

    ``center=True`` [ours] plays the max-sim on similarities centred per query token over the key
    item's tokens, ``max_i (s_ji - mean_i' s_ji')``: a key token earns credit only for standing out
    from the average token of its item (a background patch that carries the image's global content
    no longer wins). Exactly ``s(a, b) - <mean_j q_aj, mean_i k_bi>``, so it costs one small GEMM.

    ``queries="words"`` [ours] scores every pair by its words alone (mean over caption b's words of
    the max over image a's patches, METHOD 3's text->image direction) in both softmaxes: the
    image->text logits are the transpose of the text->image scores. FILIP's patch-query direction
    asks *every* patch, background included, to match some word of its caption; with word queries
    a patch that is no word's best match gets no gradient from this loss. ``"both"`` (FILIP's own).

    Image->text: this rank's images (patches as queries) against every rank's captions; text->image:
    this rank's captions (words as queries) against every rank's images. Tokens and masks are
    gathered with gradient; labels are offset by rank. A caption without word tokens scores 0
    against every image (never NaN).
    """
    if patch_tokens.dim() != 3 or word_tokens.dim() != 3:
        raise ValueError(f"filip_loss: patch_tokens and word_tokens must be [B, L, D], got "
                         f"{list(patch_tokens.shape)} and {list(word_tokens.shape)}")
    if patch_tokens.shape[0] != word_tokens.shape[0]:
        raise ValueError(f"filip_loss: batch sizes differ: {patch_tokens.shape[0]} images, "
                         f"{word_tokens.shape[0]} captions")
    if queries not in FILIP_QUERIES:
        raise ValueError(f"filip_loss: queries must be one of {FILIP_QUERIES}, got {queries!r}")
    if patch_mask is None:
        patch_mask = torch.ones(patch_tokens.shape[:2], dtype=torch.bool, device=patch_tokens.device)
    all_patch, offset = gather_padded(patch_tokens)
    all_pmask, _ = gather_padded(patch_mask, pad_value=False)
    all_word, _ = gather_padded(word_tokens)
    all_wmask, _ = gather_padded(word_mask, pad_value=False)
    one_process = dist_info()[1] == 1
    if queries == "words":  # word queries only: one max-sim direction
        s_t2i = token_region_similarity(word_tokens, all_patch, word_mask, all_pmask, backend=backend)
        # image->text: every rank's captions (words as queries) against this rank's images
        s_i2t = (s_t2i if one_process else
                 token_region_similarity(all_word, patch_tokens, all_wmask, patch_mask, backend=backend)).t()
    elif one_process:  # both directions share their token similarities (one GEMM)
        s_i2t, s_t2i = token_region_similarity_dual(patch_tokens, word_tokens, patch_mask, word_mask,
                                                    backend=backend)
    else:
        s_i2t = token_region_similarity(patch_tokens, all_word, patch_mask, all_wmask, backend=backend)
        s_t2i = token_region_similarity(word_tokens, all_patch, word_mask, all_pmask, backend=backend)
    if center:
        s_i2t = s_i2t - _masked_mean(patch_tokens, patch_mask) @ _masked_mean(all_word, all_wmask).T
        s_t2i = s_t2i - _masked_mean(word_tokens, word_mask) @ _masked_mean(all_patch, all_pmask).T
    work = torch.float64 if s_i2t.dtype == torch.float64 else torch.float32
    scale = logit_scale.to(work)
    labels = torch.arange(patch_tokens.shape[0], device=patch_tokens.device) + offset
    return 0.5 * (F.cross_entropy(scale * s_i2t.to(work), labels)
                  + F.cross_entropy(scale * s_t2i.to(work), labels))


def patch_spread_loss(patch_tokens: torch.Tensor, patch_mask: torch.Tensor | None, target: float) -> torch.Tensor:
    """[ours] How far each image's patch tokens are alike beyond ``target``: the mean over images of
    ``relu(c - target)``, ``c`` the mean cosine between two different (unmasked) patch tokens of the
    image (:func:`loupe.metrics.patch_pair_cos`). Images with fewer than two patches count 0.
    ``patch_tokens [B, n, D]``, ``patch_mask [B, n]`` bool or None (all patches)."""
    if patch_tokens.dim() != 3:
        raise ValueError(f"patch_spread_loss: expected patch_tokens [B, n, D], got {list(patch_tokens.shape)}")
    if patch_mask is not None and patch_mask.shape != patch_tokens.shape[:2]:
        raise ValueError(f"patch_spread_loss: patch_mask {list(patch_mask.shape)} does not match "
                         f"patch_tokens {list(patch_tokens.shape)}")
    work = torch.float64 if patch_tokens.dtype == torch.float64 else torch.float32
    mask = (torch.ones(patch_tokens.shape[:2], dtype=torch.bool, device=patch_tokens.device)
            if patch_mask is None else patch_mask.to(patch_tokens.device))
    pairs = patch_pair_cos(patch_tokens, mask, dtype=work)
    excess = F.relu(pairs - float(target)) * (mask.sum(1) >= 2).to(work)
    return excess.mean()


def _patch_spread_term(out: dict, batch: Mapping[str, Any], model: nn.Module, module: nn.Module | None) -> torch.Tensor:
    return patch_spread_loss(out["patch_tokens"], out["patch_mask"],
                             options_from_config(model.config).patch_spread_target)


# ------------------------------------------------------------------------------------------------
# the registry of loss terms
# ------------------------------------------------------------------------------------------------
LossFn = Callable[[dict, Mapping[str, Any], nn.Module, "nn.Module | None"], torch.Tensor]


@dataclass(frozen=True)
class LossTerm:
    """One term of an objective.

    - ``fn(outputs, batch, model, module) -> scalar tensor``: ``outputs`` is the dict that
      ``LoupeModel.forward`` has built so far (embeddings, tokens, masks, scales, regions when
      ``needs`` asks for them, and the earlier terms' ``loss_<name>``); ``fn`` may add its own
      diagnostics to it (scalar tensors or floats, e.g. ``uansil_fraction_sampled``).
      ``module`` is the term's own trainable module (from ``build``) or None; call it through its
      ``forward`` so that ZeRO-3 gathers its parameters.
    - ``default_weight``: its weight in the objectives listed in ``objectives``.
    - ``needs``: extra outputs the model must compute: ``"regions"`` (objectness of every candidate
      box, box features, top-M regions after NMS) or ``"filip_scale"`` (a learnable FILIP scale).
    - ``build(config) -> nn.Module | None``: parameters of the term, registered on the model under
      ``loss_modules[name]`` (so they are checkpointed and seen by the optimizer / ZeRO).
    """

    name: str
    fn: LossFn
    default_weight: float = 1.0
    objectives: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()
    build: Callable[[Any], "nn.Module | None"] | None = None


LOSS_TERMS: dict[str, LossTerm] = {}
_KNOWN_NEEDS = ("regions", "filip_scale")


def register_loss_term(term: LossTerm, *, replace: bool = False) -> LossTerm:
    """Add ``term`` to the registry (``replace=True`` to overwrite an existing name)."""
    if not isinstance(term, LossTerm):
        raise TypeError(f"register_loss_term: term must be a LossTerm, got {type(term).__name__}")
    if not term.name.isidentifier():
        raise ValueError(f"register_loss_term: name must be an identifier, got {term.name!r}")
    if term.name in LOSS_TERMS and not replace:
        raise ValueError(f"register_loss_term: a term named {term.name!r} is already registered")
    bad = [o for o in term.objectives if o not in OBJECTIVES]
    if bad:
        raise ValueError(f"register_loss_term: unknown objectives {bad}; known: {list(OBJECTIVES)}")
    bad = [n for n in term.needs if n not in _KNOWN_NEEDS]
    if bad:
        raise ValueError(f"register_loss_term: unknown needs {bad}; known: {list(_KNOWN_NEEDS)}")
    LOSS_TERMS[term.name] = term
    return term


def resolve_loss_weights(objective: str, loss_weights: Mapping[str, float] | None = None) -> dict[str, float]:
    """The terms and weights of ``objective``: the registered defaults, updated by ``loss_weights``.

    Terms with weight 0 are dropped. Raises for an unknown objective or an unregistered term.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {objective!r}")
    weights = {name: t.default_weight for name, t in LOSS_TERMS.items() if objective in t.objectives}
    for name, w in (loss_weights or {}).items():
        if name not in LOSS_TERMS:
            raise ValueError(f"loss_weights: no loss term named {name!r} is registered "
                             f"(registered: {sorted(LOSS_TERMS)})")
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) or w < 0:
            raise ValueError(f"loss_weights[{name!r}] must be a finite number >= 0, got {w!r}")
        weights[name] = float(w)
    weights = {k: v for k, v in weights.items() if v != 0}
    if not weights:
        raise ValueError(f"objective {objective!r} with loss_weights={dict(loss_weights or {})} has no term")
    return weights


def _cmc_term(out: dict, batch: Mapping[str, Any], model: nn.Module, module: nn.Module | None) -> torch.Tensor:
    return cmc_loss(out["image_emb"], out["text_emb"], out["logit_scale"])


def _filip_term(out: dict, batch: Mapping[str, Any], model: nn.Module, module: nn.Module | None) -> torch.Tensor:
    return filip_loss(out["patch_tokens"], out["patch_mask"], out["word_tokens"], out["word_mask"],
                      out["filip_logit_scale"], backend=getattr(model.config, "kernel_backend", None),
                      center=bool(getattr(model.config, "filip_center", False)),
                      queries=getattr(model.config, "filip_queries", "both"))


# the table: every term of every built-in objective
register_loss_term(LossTerm("cmc", _cmc_term, 1.0, objectives=("clip", "filip", "loupe", "sparc")))
register_loss_term(LossTerm("filip", _filip_term, 1.0, objectives=("filip", "loupe"), needs=("filip_scale",)))
for _name, _weight in _objectives.SHAPLEY_TERMS.items():
    register_loss_term(LossTerm(_name, _objectives.term_fn(_name), _weight, objectives=("loupe",),
                                needs=("regions",), build=_objectives.build_module(_name)))
# [ours, off by default; measured: rescued one of three failing seeds, stays off]: aimed at the seeds
# whose patch tokens become alike early and never localise (docs/METHOD-notes.md, 14th/15th sessions)
register_loss_term(LossTerm("patch_spread", _patch_spread_term, 0.0))  # in no objective unless weighted
register_loss_term(LossTerm("sparc", _sparc.sparc_term, _sparc.SPARC_WEIGHT, objectives=("sparc",),
                            build=_sparc.build_module))
