"""SPARC's fine-grained loss (Bica et al., "Improving fine-grained understanding in image-text
pre-training", ICML 2024, arXiv 2401.09865), the ``sparc`` term of the ``sparc`` objective.

Written from the paper (section 2, eqs. 2-7; appendix C and D.4), per image-text pair ``b`` with
word tokens ``t_j`` (valid: ``word_mask``) and patch tokens ``v_p`` (valid: ``patch_mask``), both
normalised by the towers:

1. similarities of the pair's own tokens only: ``s_jp = <t_j, v_p>``;
2. min-max normalised over the patches of each token row: ``s^_jp = (s_jp - min_p s_jp) /
   (max_p s_jp - min_p s_jp)`` in [0, 1] (eq. 2);
3. sparsified: ``s~_jp = s^_jp`` if ``s^_jp >= sigma`` else 0, with ``sigma = 1/P`` (P = the image's
   valid patches; ``LoupeConfig.sparc_threshold`` overrides it) (eq. 3);
4. alignment weights ``a_jp = s~_jp / sum_p s~_jp`` (eq. 4) and language-grouped vision
   embeddings ``c_j = normalise(sum_p a_jp v_p)`` (eq. 5, normalised as in appendix C);
5. a contrastive loss inside the caption, both directions, ``scale = 1/tau``:
   ``l_j = -1/2 [log softmax_k(scale <t_j, c_k>)_j + log softmax_k(scale <c_j, t_k>)_j]`` over the
   caption's valid tokens k (the other tokens of the same caption are the negatives; no other
   sample is needed) (eq. 6);
6. ``L_f = 1/B sum_b 1/L_b sum_j l_j`` (eq. 6: mean over the caption's valid tokens, then over
   the batch's captions). The paper's pseudo-code (appendix C) averages over all valid tokens of
   the batch instead; eq. 6 is used here because it is a per-caption mean, so data-parallel ranks
   of equal batch size average to exactly the global batch's loss.

The objective is ``L = lambda_g L_CMC + lambda_f L_f`` (eq. 7). The paper sets ``lambda_g = 0.5``
and sweeps ``lambda_f in {0.5, 1, 5, 10}`` without saying which it kept (D.4); the starting point
here is ``lambda_f = 1``, i.e. ratio 2, written as the weights ``cmc = 1`` (the scale of CLIP's and
FILIP's L_CMC in this project, so that the same learning rate applies) and ``sparc = 2``
(:data:`SPARC_WEIGHT`). ``loss_weights={"cmc": 0.5, "sparc": 1.0}`` gives the paper's literal scale.
The temperature is learned (D.4), a scale of its own (``loss_modules["sparc"]``, initialised at
``logit_scale_init``, clamped at ``logit_scale_max``); ``LoupeConfig.sparc_scale`` fixes it instead.

Edge cases: a token row whose patch similarities are all equal (range below :data:`RANGE_EPS`) has
no min-max normalisation: it gets uniform weights over the valid patches (the limit the paper
names when it motivates sigma = 1/P; after min-max the best patch is 1 >= sigma, so no other row
is ever all zero). A caption with one valid token contributes 0 (a softmax over one token), one
with none contributes 0 and is still counted in B; padding tokens never enter a softmax.

A first look, not a tuning result (one seed, 150 steps at batch 32, default model otherwise, 100
test-split scenes, 2-core CPU): with word centring (``text_center_words``, the project's default)
L_f fell to ~0.05 within 100 steps while pointing stayed below chance (7.8% vs 11.7%); without it
L_f stayed ~1.9 and pointing reached 22.9%. ``text_center_words`` (and ``vision_pool``: the paper
pools the patches) belong in SPARC's tuning budget, on the validation split.

Why plain batched torch and not ``loupe_kernels.token_region_similarity``: that op reduces each
(query item, key item) pair to a max-sim score across the batch (FILIP). SPARC needs the full
token x patch matrix of each pair's own image only, min-max, a threshold and a weighted sum of
patches: two ``bmm`` of ``[B, L, D] x [B, D, P]`` and one ``[B, L, L]`` per step, no cross-batch
term, so a fused kernel would save nothing measurable at these sizes.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["sparc_alignment", "sparc_fine_loss", "SparcScale", "SPARC_WEIGHT", "RANGE_EPS",
           "sparc_term", "build_module"]

#: default weight of the ``sparc`` term beside ``cmc`` = 1: the paper's lambda_f / lambda_g = 1 / 0.5
SPARC_WEIGHT: float = 2.0
#: a token row whose similarity range over the patches is below this gets uniform alignment weights
RANGE_EPS: float = 1e-6
_NEG = -1e9  # logit of a padding token (exp underflows to exactly 0)


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def sparc_alignment(word_tokens: torch.Tensor, patch_tokens: torch.Tensor, patch_mask: torch.Tensor | None = None,
                    threshold: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Alignment weights ``a [B, L, P]`` and language-grouped vision embeddings ``c [B, L, D]``
    (normalised) of every token of caption b with the patches of image b (eqs. 2-5).

    ``threshold``: sigma; None = 1 / (valid patches of the image). Rows of padding tokens are
    computed like the others (the loss masks them). Differentiable (no stop-gradient, as in the paper).
    """
    if word_tokens.dim() != 3 or patch_tokens.dim() != 3:
        raise ValueError(f"sparc_alignment: word_tokens and patch_tokens must be [B, L, D] and [B, P, D], got "
                         f"{list(word_tokens.shape)} and {list(patch_tokens.shape)}")
    if word_tokens.shape[0] != patch_tokens.shape[0] or word_tokens.shape[2] != patch_tokens.shape[2]:
        raise ValueError(f"sparc_alignment: batch or width differ: {list(word_tokens.shape)} vs "
                         f"{list(patch_tokens.shape)}")
    work = _work_dtype(word_tokens)
    t, v = word_tokens.to(work), patch_tokens.to(work)
    B, P = v.shape[:2]
    if patch_mask is None:
        pm = torch.ones(B, P, dtype=torch.bool, device=v.device)
    else:
        pm = patch_mask.to(device=v.device, dtype=torch.bool)
    pmf = pm[:, None, :]                                              # [B, 1, P]
    s = torch.bmm(t, v.transpose(1, 2))                               # [B, L, P]
    hi = s.masked_fill(~pmf, -math.inf).amax(-1, keepdim=True)
    lo = s.masked_fill(~pmf, math.inf).amin(-1, keepdim=True)
    rng = hi - lo                                                     # -inf/nan only for an image without patches
    ok = rng > RANGE_EPS
    s_hat = torch.where(ok, (s - torch.where(ok, lo, 0.0)) / torch.where(ok, rng, 1.0), torch.ones_like(s))
    s_hat = s_hat * pmf                                               # invalid patches: 0
    if threshold is None:
        sigma = (1.0 / pm.sum(-1).clamp(min=1).to(work))[:, None, None]
    else:
        sigma = torch.as_tensor(float(threshold), dtype=work, device=v.device)
    s_tilde = torch.where(s_hat >= sigma, s_hat, torch.zeros_like(s_hat))
    a = s_tilde / s_tilde.sum(-1, keepdim=True).clamp(min=torch.finfo(work).tiny)
    c = F.normalize(torch.bmm(a, v), dim=-1)
    return a, c


def sparc_fine_loss(word_tokens: torch.Tensor, word_mask: torch.Tensor, patch_tokens: torch.Tensor,
                    patch_mask: torch.Tensor | None, scale: torch.Tensor | float, *,
                    threshold: float | None = None) -> torch.Tensor:
    """SPARC's fine-grained loss L_f (eq. 6, see the module docstring), a scalar in float32 at least.

    ``word_tokens [B, L, D]`` and ``patch_tokens [B, P, D]`` as the model outputs them (normalised),
    ``word_mask [B, L]``, ``patch_mask [B, P]`` or None, ``scale`` = 1/tau.
    """
    if word_mask.shape != word_tokens.shape[:2]:
        raise ValueError(f"sparc_fine_loss: word_mask {list(word_mask.shape)} does not match word_tokens "
                         f"{list(word_tokens.shape)}")
    work = _work_dtype(word_tokens)
    _, c = sparc_alignment(word_tokens, patch_tokens, patch_mask, threshold)
    t = F.normalize(word_tokens.to(work), dim=-1)
    m = word_mask.to(device=t.device, dtype=torch.bool)
    scale = torch.as_tensor(scale, device=t.device).to(work)
    logits = scale * torch.bmm(t, c.transpose(1, 2))                 # [B, L, L]: <t_j, c_k>
    L = logits.shape[1]
    eye = torch.eye(L, dtype=torch.bool, device=t.device)
    # token -> grouped embeddings: softmax over k of <t_j, c_k>; grouped -> tokens: over k of <c_j, t_k>
    t2c = logits.masked_fill(~m[:, None, :], _NEG)
    c2t = logits.transpose(1, 2).masked_fill(~m[:, None, :], _NEG)
    nll = -0.5 * ((t2c.log_softmax(-1) * eye).sum(-1) + (c2t.log_softmax(-1) * eye).sum(-1))  # [B, L]
    mf = m.to(work)
    per_caption = (nll * mf).sum(-1) / mf.sum(-1).clamp(min=1)      # 0 for captions of 0 or 1 tokens
    return per_caption.mean() if per_caption.numel() else logits.sum() * 0


class SparcScale(nn.Module):
    """The learned inverse temperature of L_f (the paper learns tau, D.4): ``exp(param)`` clamped at
    ``max_scale``. The parameter has shape ``[1]`` (DeepSpeed cannot broadcast 0-dim parameters) and
    is named ``logit_scale`` (no weight decay in ``loupe.train``). Call it (``forward``) so that ZeRO-3
    gathers it."""

    def __init__(self, init: float, max_scale: float) -> None:
        super().__init__()
        self.max_scale = float(max_scale)
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(init)))

    def forward(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=self.max_scale).squeeze(0)


# ------------------------------------------------------------------------------------------------
# what the table of loupe.losses needs
# ------------------------------------------------------------------------------------------------
def build_module(config: Any) -> SparcScale | None:
    """The term's learned scale, or None when ``config.sparc_scale`` fixes it."""
    if getattr(config, "sparc_scale", None) is not None:
        return None
    return SparcScale(config.logit_scale_init, config.logit_scale_max)


def sparc_term(out: dict, batch: Mapping[str, Any], model: nn.Module, module: nn.Module | None) -> torch.Tensor:
    """``fn`` of the ``sparc`` term: L_f of this rank's pairs (no gather: the loss is per pair).
    Adds ``logit_scale_sparc`` to ``out`` (logged by ``loupe.train``)."""
    fixed = getattr(model.config, "sparc_scale", None)
    scale = module() if module is not None else torch.tensor(float(fixed), device=out["word_tokens"].device)
    out["logit_scale_sparc"] = scale.detach()
    return sparc_fine_loss(out["word_tokens"], out["word_mask"], out["patch_tokens"], out.get("patch_mask"),
                           scale, threshold=getattr(model.config, "sparc_threshold", None))
