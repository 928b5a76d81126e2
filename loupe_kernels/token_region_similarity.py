"""Token-region similarity: FILIP-style masked max-sim over all pairs (METHOD section 3).

Contract
--------
``token_region_similarity(query, key, query_mask=None, key_mask=None, *, pairwise=True, backend=None)``

- ``query [Bq, Lq, D]``, ``key [Bk, Lk, D]``; masks bool ``[Bq, Lq]`` / ``[Bk, Lk]`` (None = all valid).
- ``pairwise=True`` -> ``[Bq, Bk]`` with
  ``s(a, b) = mean over valid j of max over valid i of <q_aj, k_bi>``;
  ``pairwise=False`` needs ``Bq == Bk`` and returns ``[B]`` for the aligned pairs ``(a, a)``.
- A query item without valid tokens, or a key item without valid tokens, scores 0 (never NaN).
  Padding is excluded from the max (it is never zeroed, which would win against negative scores).
- Differentiable in ``query`` and ``key``; the gradient flows only through the arg-max key of each
  query token, ties going to the lowest index (as ``max(dim).indices``).
- fp32, fp16 and bf16 accumulate in fp32; fp64 on the reference and cpu backends. The output has
  the dtype of the inputs. The cpu backward is deterministic.
- Failure contract, the same on every backend (reference included; issue 21 item 8):

  * NaN or inf in ``query`` / ``key``: ``ValueError("token_region_similarity: query contains NaN or
    inf")`` (or ``key``) on CPU tensors; on GPU tensors a device-side assert with the same message,
    no host sync (debug mode: ValueError at the call, see ``loupe_kernels.set_debug``).
  * Magnitudes: every score is computed in the work dtype (float32 for float16/bfloat16/float32,
    float64 for float64) on every backend, the reference included. ``max|query| * max|key| * D``
    must be ``<= 2^126`` (float64: ``2^1022``), which keeps every dot product and partial sum finite in
    any summation order; above it the same ValueError / device-side assert ("query and key are too
    large"). No input is silently clamped.
  * Overflow of the output dtype: the result (exact to fp32 rounding) is rounded to the input dtype
    as IEEE rounding does, so a float16 score above 65504 is ``inf`` (``-inf`` below -65504) on
    every backend; never 0, never NaN.
  * Empty sets: ``Lk = 0``, ``Lq = 0``, an all-False mask row, ``D = 0`` (all scores 0) give 0; ``Bq = 0``
    or ``Bk = 0`` give an empty output. The gradients of such items are 0.
  * Double backward: the kernel backends raise ``RuntimeError("token_region_similarity: no second
    derivative ...")``; only the reference is twice differentiable.
- Under ``torch.autocast`` (cpu or cuda) fp16/fp32 inputs are cast to the autocast dtype first.
- Backends: ``cpu`` (C++), ``triton`` (tiled ``tl.dot`` with a running max over key tiles),
  ``cuda`` (torch-free kernels in ``csrc/cuda/token_region_similarity.cu``), ``reference`` (plain
  PyTorch, materialises all scores). ``backend=None`` chooses automatically: cpu > reference on CPU
  tensors; on CUDA tensors per dtype and shape class from ``loupe_kernels._backends.AUTO_TABLE``
  (printed, with whether each entry is measured, by ``python -m loupe_kernels.env``).
- fp32 on the ``cuda`` backend (pairwise, D % 4 == 0, 16-byte aligned inputs, sm_80+): tensor cores
  with a 3xTF32 split (``x = hi + lo``, ``hi = tf32(x)``, ``lo = tf32(x - hi)``; ``q.k ~ hi.hi + hi.lo +
  lo.hi`` accumulated in fp32): about fp32 accuracy (a few fp32 ulps of ``|q| |k|``), checked by a host
  emulation in ``tests/kernels/test_tf32_split_numerics.py``. When
  ``torch.backends.cuda.matmul.allow_tf32`` is True it runs one TF32 pass instead (about 1e-3
  relative, as torch's own fp32 matmuls then). Other fp32 shapes run exact fp32 FMA.
- Backward on ``cuda``: d_query is a gather (deterministic). d_key is deterministic by default: the
  forward's arg-max entries are grouped per key row (a stable counting sort) and each key row is
  summed over its entries in ascending (query item, token) order. ``LOUPE_KERNELS_ATOMIC_DKEY=1``
  picks the faster shared-memory-atomic d_key (rounding may vary between runs), unless
  ``torch.use_deterministic_algorithms(True)`` is on.
"""
from __future__ import annotations

import math
import os
from typing import Callable

import torch

from ._backends import extension, resolve_backend
from ._common import (FLOAT_DTYPES, check, check_finite, no_second_derivative, tf32_allowed, to_work, triton_loader,
                      work_dtype, work_max_exponent)

__all__ = ["token_region_similarity", "token_region_similarity_dual", "TokenRegionSimilarity",
           "token_region_similarity_reference"]

OP = "token_region_similarity"


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------
def _check_mask(mask, name: str, expected: tuple[int, int], ref: torch.Tensor) -> torch.Tensor:
    if mask is None:
        return torch.ones(expected, dtype=torch.bool, device=ref.device)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{OP}: {name} must be a bool tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{OP}: {name} must have dtype torch.bool, got {mask.dtype}")
    if tuple(mask.shape) != expected:
        raise ValueError(f"{OP}: {name} must have shape {list(expected)}, got {list(mask.shape)}")
    if mask.device != ref.device:
        raise ValueError(f"{OP}: {name} is on {mask.device} but the inputs are on {ref.device}")
    return mask.contiguous()


def _validate(query, key, query_mask, key_mask, pairwise):
    for name, t in (("query", query), ("key", key)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{OP}: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{OP}: {name} must have shape [B, L, D] (3-D), got {t.dim()}-D {list(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{OP}: {name} must be float16/bfloat16/float32/float64, got {t.dtype}")
    if query.dtype != key.dtype:
        raise TypeError(f"{OP}: query and key must have the same dtype, got {query.dtype} and {key.dtype}")
    if query.device != key.device:
        raise ValueError(f"{OP}: query and key must be on the same device, got {query.device} and {key.device}")
    if query.shape[2] != key.shape[2]:
        raise ValueError(f"{OP}: query and key must share D, got {query.shape[2]} and {key.shape[2]}")
    if not isinstance(pairwise, bool):
        raise TypeError(f"{OP}: pairwise must be a bool, got {type(pairwise).__name__}")
    if not pairwise and query.shape[0] != key.shape[0]:
        raise ValueError(f"{OP}: pairwise=False needs Bq == Bk, got Bq={query.shape[0]} and Bk={key.shape[0]}")
    qm = _check_mask(query_mask, "query_mask", tuple(query.shape[:2]), query)
    km = _check_mask(key_mask, "key_mask", tuple(key.shape[:2]), key)
    return qm, km


def score_bound(dt: torch.dtype) -> float:
    """The bound on ``max|query| * max|key| * D`` for inputs of dtype ``dt``: ``2^126`` when the scores
    are computed in float32 (float16/bfloat16/float32 input), ``2^1022`` in float64. Under it every
    dot product and every partial sum of one is finite in the work dtype, in any summation order
    (``|sum_{d in any subset} q_d k_d| <= max|q| * max|k| * D``), with room for rounding."""
    return 2.0 ** (work_max_exponent(dt) - 1)


def _check_data(query: torch.Tensor, key: torch.Tensor) -> None:
    """The data checks of every backend: no NaN/inf, and magnitudes whose scores cannot overflow the
    work dtype. Two min/max reductions; no host sync on a GPU (see ``loupe_kernels._common.check``)."""
    mq = check_finite(OP, query, "query")
    mk = check_finite(OP, key, "key")
    D = query.shape[2]
    bound = score_bound(query.dtype)
    wd = "float64" if work_dtype(query.dtype) == torch.float64 else "float32"
    check(OP, mq * mk * D <= bound,
          f"query and key are too large: max|query| * max|key| * D must be <= 2^{int(math.log2(bound))}, "
          f"or the {wd} scores could overflow (rescale the inputs)")




# --------------------------------------------------------------------------------------------
# reference (plain PyTorch; materialises every score)
# --------------------------------------------------------------------------------------------
def token_region_similarity_reference(query, key, query_mask=None, key_mask=None, *, pairwise=True):
    """The op in plain PyTorch, differentiable by autograd: scores in the work dtype (float32 for
    float16/bfloat16), the result rounded to the dtype of the inputs (see the Contract)."""
    qm, km = _validate(query, key, query_mask, key_mask, pairwise)
    if not torch.compiler.is_compiling():
        _check_data(query, key)
    dt = query.dtype
    q, k = query.to(work_dtype(dt)), key.to(work_dtype(dt))
    if pairwise:
        scores = torch.einsum("aqd,bkd->abqk", q, k)
        kmask = km[None, :, None, :]
        live = qm[:, None, :] & km.any(dim=1)[None, :, None]   # valid query token, key item with a valid token
    else:
        scores = torch.einsum("bqd,bkd->bqk", q, k)
        kmask = km[:, None, :]
        live = qm & km.any(dim=1)[:, None]
    zero = torch.zeros((), dtype=scores.dtype, device=scores.device)
    if scores.shape[-1] == 0:  # Lk = 0: no key token anywhere, every score is 0
        best = scores.sum(dim=-1)
    else:
        best = scores.masked_fill(~kmask, float("-inf")).max(dim=-1).values  # -inf where no valid key
    best = torch.where(live, best, zero)
    count = qm.sum(dim=1).clamp(min=1).to(best.dtype)
    count = count[:, None] if pairwise else count
    return (best.sum(dim=-1) / count).to(dt)


# --------------------------------------------------------------------------------------------
# compiled backends: (forward, backward) per backend. GPU backends register themselves here.
#   forward(query, key, qmask, kmask, pairwise) -> (out in input dtype, argmax int32)
#   backward(grad, query, key, qmask, argmax, pairwise) -> (d_query, d_key) in input dtype
# --------------------------------------------------------------------------------------------
def _cpu_forward(query, key, qm, km, pairwise):
    out, amax = extension("cpu").trs_forward(to_work(query), to_work(key), qm, km, pairwise)
    return out.to(query.dtype), amax


def _cpu_backward(grad, query, key, qm, amax, pairwise):
    g = grad.to(work_dtype(query.dtype)).contiguous()
    dq, dk = extension("cpu").trs_backward(g, to_work(query), to_work(key), qm, amax, pairwise)
    return dq.to(query.dtype), dk.to(query.dtype)


_triton = triton_loader("token_region_similarity")


def _triton_forward(query, key, qm, km, pairwise):
    return _triton().forward(query, key, qm, km, pairwise)


def _triton_backward(grad, query, key, qm, amax, pairwise):
    return _triton().backward(grad, query, key, qm, amax, pairwise)


def _cuda_forward(query, key, qm, km, pairwise):
    # fp32 on tensor cores: one TF32 pass only when torch allows TF32 for matmuls, else 3xTF32
    return extension("cuda").trs_forward(query, key, qm, km, pairwise, tf32_allowed())


def _cuda_deterministic_dkey() -> bool:
    """Deterministic d_key (the default, for training) unless LOUPE_KERNELS_ATOMIC_DKEY=1 asks for the
    atomic one and torch's deterministic mode is off."""
    return torch.are_deterministic_algorithms_enabled() or os.environ.get("LOUPE_KERNELS_ATOMIC_DKEY", "0") != "1"


def _cuda_backward(grad, query, key, qm, amax, pairwise):
    return extension("cuda").trs_backward(grad.contiguous(), query, key, qm, amax, pairwise,
                                          _cuda_deterministic_dkey())


def _shape_class(query: torch.Tensor, pairwise: bool) -> str:
    """Shape class of a call for the automatic backend choice (``_backends.AUTO_TABLE``): ``pairs``
    (pairwise=False), ``fast`` (pairwise and D a multiple of 16 bytes: the cuda fast kernel's shapes)
    or ``generic``."""
    if not pairwise:
        return "pairs"
    D = query.shape[2]
    vec = 16 // query.element_size()
    return "fast" if D > 0 and D % vec == 0 else "generic"


KERNELS: dict[str, tuple[Callable, Callable]] = {
    "cpu": (_cpu_forward, _cpu_backward),
    "triton": (_triton_forward, _triton_backward),
    "cuda": (_cuda_forward, _cuda_backward),
}


@torch.library.custom_op("loupe_kernels::trs_forward", mutates_args=())
def _trs_forward_op(query: torch.Tensor, key: torch.Tensor, query_mask: torch.Tensor,
                    key_mask: torch.Tensor, pairwise: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    _check_data(query, key)
    return KERNELS[backend][0](query.contiguous(), key.contiguous(), query_mask, key_mask, pairwise)


@_trs_forward_op.register_fake
def _(query, key, query_mask, key_mask, pairwise, backend):
    Bq, Lq = query.shape[0], query.shape[1]
    if pairwise:
        Bk = key.shape[0]
        return query.new_empty((Bq, Bk)), query.new_empty((Bq, Bk, Lq), dtype=torch.int32)
    return query.new_empty((Bq,)), query.new_empty((Bq, Lq), dtype=torch.int32)


@torch.library.custom_op("loupe_kernels::trs_backward", mutates_args=())
def _trs_backward_op(grad: torch.Tensor, query: torch.Tensor, key: torch.Tensor, query_mask: torch.Tensor,
                     argmax: torch.Tensor, pairwise: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return KERNELS[backend][1](grad, query.contiguous(), key.contiguous(), query_mask, argmax, pairwise)


@_trs_backward_op.register_fake
def _(grad, query, key, query_mask, argmax, pairwise, backend):
    return torch.empty_like(query), torch.empty_like(key)


def _setup_context(ctx, inputs, output):
    query, key, query_mask, _key_mask, pairwise, backend = inputs
    _, amax = output
    ctx.save_for_backward(query, key, query_mask, amax)
    ctx.pairwise = pairwise
    ctx.backend = backend
    ctx.mark_non_differentiable(amax)


def _backward(ctx, grad_out, _grad_amax):
    query, key, query_mask, amax = ctx.saved_tensors
    with torch.no_grad():
        dq, dk = _trs_backward_op(grad_out, query, key, query_mask, amax, ctx.pairwise, ctx.backend)
    dq, dk = no_second_derivative(OP, ctx.backend, (dq, dk), (query, key))
    return dq, dk, None, None, None, None


_trs_forward_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def _autocast_inputs(query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Follow autocast like a matmul: inputs in the autocast dtype, fp32 accumulation inside."""
    dev = query.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev) and query.dtype != torch.float64:
        amp = torch.get_autocast_dtype(dev)
        return query.to(amp), key.to(amp)
    return query, key


def token_region_similarity(query: torch.Tensor, key: torch.Tensor, query_mask: torch.Tensor | None = None,
                            key_mask: torch.Tensor | None = None, *, pairwise: bool = True,
                            backend: str | None = None) -> torch.Tensor:
    """Masked max-sim of every query item against every key item (see the module docstring)."""
    qm, km = _validate(query, key, query_mask, key_mask, pairwise)
    query, key = _autocast_inputs(query, key)
    chosen = resolve_backend(OP, backend, query.device, supported=("reference", *KERNELS), dtype=query.dtype,
                             shape_class=_shape_class(query, pairwise))
    if chosen == "reference":
        return token_region_similarity_reference(query, key, qm, km, pairwise=pairwise)
    out, _ = _trs_forward_op(query, key, qm, km, pairwise, chosen)
    return out


# --------------------------------------------------------------------------------------------
# both directions at once (FILIP): s(q_a, k_b) and s(k_b, q_a) from one score GEMM
# --------------------------------------------------------------------------------------------
DUAL_KERNELS: dict[str, Callable] = {
    "cpu": lambda q, k, qm, km: extension("cpu").trs_dual_forward(q, k, qm, km),
}


@torch.library.custom_op("loupe_kernels::trs_dual_forward", mutates_args=())
def _trs_dual_op(query: torch.Tensor, key: torch.Tensor, query_mask: torch.Tensor, key_mask: torch.Tensor,
                 backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_data(query, key)
    dt = query.dtype
    out, amax, out2, amax2 = DUAL_KERNELS[backend](to_work(query), to_work(key), query_mask, key_mask)
    return out.to(dt), amax, out2.to(dt), amax2


@_trs_dual_op.register_fake
def _(query, key, query_mask, key_mask, backend):
    Bq, Lq, Bk, Lk = query.shape[0], query.shape[1], key.shape[0], key.shape[1]
    return (query.new_empty((Bq, Bk)), query.new_empty((Bq, Bk, Lq), dtype=torch.int32),
            query.new_empty((Bk, Bq)), query.new_empty((Bk, Bq, Lk), dtype=torch.int32))


def _dual_setup_context(ctx, inputs, output):
    query, key, query_mask, key_mask, backend = inputs
    _, amax, _, amax2 = output
    ctx.save_for_backward(query, key, query_mask, key_mask, amax, amax2)
    ctx.backend = backend
    ctx.mark_non_differentiable(amax, amax2)


def _dual_backward(ctx, g1, _ga1, g2, _ga2):
    query, key, query_mask, key_mask, amax, amax2 = ctx.saved_tensors
    with torch.no_grad():
        dq, dk = torch.zeros_like(query), torch.zeros_like(key)
        if g1 is not None:
            a, b = _trs_backward_op(g1, query, key, query_mask, amax, True, ctx.backend)
            dq, dk = dq + a, dk + b
        if g2 is not None:
            b, a = _trs_backward_op(g2, key, query, key_mask, amax2, True, ctx.backend)
            dq, dk = dq + a, dk + b
    dq, dk = no_second_derivative(OP, ctx.backend, (dq, dk), (query, key))
    return dq, dk, None, None, None


_trs_dual_op.register_autograd(_dual_backward, setup_context=_dual_setup_context)


def token_region_similarity_dual(query: torch.Tensor, key: torch.Tensor, query_mask: torch.Tensor | None = None,
                                 key_mask: torch.Tensor | None = None, *,
                                 backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(token_region_similarity(query, key), token_region_similarity(key, query))``, all pairs.

    The two directions share their token similarities; the ``cpu`` backend computes each score tile
    once and takes row and column maxima from it (FILIP's image->text and text->image scores).
    Other backends run the two directions separately. Same contract, masks and gradients as
    :func:`token_region_similarity`.
    """
    qm, km = _validate(query, key, query_mask, key_mask, True)
    query, key = _autocast_inputs(query, key)
    chosen = resolve_backend(OP, backend, query.device, supported=("reference", *KERNELS), dtype=query.dtype,
                             shape_class=_shape_class(query, True))
    if chosen in DUAL_KERNELS:
        out, _, out2, _ = _trs_dual_op(query, key, qm, km, chosen)
        return out, out2
    return (token_region_similarity(query, key, qm, km, backend=chosen),
            token_region_similarity(key, query, km, qm, backend=chosen))


class TokenRegionSimilarity(torch.nn.Module):
    """``nn.Module`` wrapper of :func:`token_region_similarity`."""

    def __init__(self, pairwise: bool = True, backend: str | None = None) -> None:
        super().__init__()
        self.pairwise = pairwise
        self.backend = backend

    def forward(self, query, key, query_mask=None, key_mask=None):
        return token_region_similarity(query, key, query_mask, key_mask, pairwise=self.pairwise,
                                       backend=self.backend)

    def extra_repr(self) -> str:
        return f"pairwise={self.pairwise}, backend={self.backend!r}"
