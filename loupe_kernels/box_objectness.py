"""Dense box objectness: the region head's logit and the normalisation of every whole-patch box.

Contract
--------
``box_objectness(tokens, h, w, w_in, w_out, bias, w2, b2, *, eps=1e-12, backend=None)
-> (logits [B, K], inv_in [B, K], inv_out [B, K])``

- ``tokens [B, h*w, D]``: patch tokens of an ``h x w`` grid (row-major). The boxes are every
  axis-aligned box of whole patches, ``K = h(h+1)/2 * w(w+1)/2``, ordered by row interval
  ``(y0, y1)`` then column interval ``(x0, x1)``, each interval by its start, then its end (the order
  of ``loupe.regions.candidate_boxes``).
- ``inv_in``, ``inv_out``: the normalised inside / outside mean features of box ``b`` are
  ``inv_in * S_b`` and ``inv_out * (T - S_b)`` (``S_b`` the sum of the tokens inside, ``T`` of all):
  ``inv_in = 1 / max(||S_b||, eps * area)`` and ``inv_out = 1 / max(||T - S_b||, eps * n_out)``
  (``F.normalize``'s eps on the means), ``inv_out = 0`` for the whole-grid box (no outside).
- ``logits``: a one-hidden-layer MLP on (inside feature, outside feature, per-box bias) with GELU
  (erf): ``b2 + <w2, gelu(bias_b + W_in in_b + W_out out_b)>``, with ``w_in, w_out [H, D]``,
  ``bias [K, H]`` or ``[B, K, H]`` (the geometry part of the first layer plus its bias), ``w2 [H]``,
  ``b2`` a float or 0-d tensor.
- Outputs are float32 (float64 for float64 tokens). The norms are accumulated in float64.
- Checks (issue 21 item 9): shapes, dtypes and devices of ``tokens`` and every weight raise at the call;
  NaN or inf in ``tokens``, ``w_in``, ``w_out``, ``bias``, ``w2`` or ``b2`` raise
  ``ValueError("box_objectness: <name> contains NaN or inf")`` on CPU tensors and are device-side
  asserts on GPU tensors (no host sync; debug mode raises at the call), on both backends.

The first layer is linear and the box mean is linear, so the layer runs on the patch tokens and its
outputs are summed per box: the ``[B, K, 2D]`` box features are never formed.

Backends: ``cpu`` (C++: one pass per image, direct box sums, the boxes of one first row through one
vectorised GELU and a GEMV; forward only) and ``reference`` (PyTorch: separable interval matmuls,
blocks of images sized for the cache; differentiable). There is no GPU kernel: on CUDA tensors the
reference runs (the dense pass is a few large GEMMs and element-wise passes, which a GPU does well).
Gradients: with grad mode on and an input that requires grad, the automatic choice is the
reference; an explicit ``backend="cpu"`` then raises.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._backends import extension, resolve_backend
from ._common import FLOAT_DTYPES, check_finite, work_dtype

__all__ = ["box_objectness", "box_objectness_reference", "interval_matrix", "box_sums", "box_inverse_scales",
           "num_boxes"]

OP = "box_objectness"


def num_boxes(h: int, w: int) -> int:
    """Number of whole-patch boxes on an ``h x w`` grid."""
    return h * (h + 1) // 2 * (w * (w + 1) // 2)


# --------------------------------------------------------------------------------------------
# reference: separable box sums
# --------------------------------------------------------------------------------------------
def interval_matrix(n: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                    ) -> torch.Tensor:
    """``[n(n+1)/2, n]`` 0/1 matrix whose row ``(a, b)`` (``a < b``, ``a`` outer, ``b`` inner: the box
    order) marks the positions ``a..b-1``."""
    a = torch.tensor([i for i in range(n) for _ in range(i + 1, n + 1)], device=device)
    b = torch.tensor([j for i in range(n) for j in range(i + 1, n + 1)], device=device)
    pos = torch.arange(n, device=device)
    return ((pos[None] >= a[:, None]) & (pos[None] < b[:, None])).to(dtype)


def box_sums(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Sum of the tokens inside every box: ``[B, h*w, C]`` -> ``[B, K, C]`` (box order).

    A box is a row interval times a column interval, so the pooling map is the Kronecker product of
    two interval matrices and runs as two small matmuls (``B h Kx w C + B Ky h Kx C`` multiply-adds).
    Every output is a direct sum of its patches (no corner differences).
    """
    if tokens.dim() != 3 or tokens.shape[1] != h * w:
        raise ValueError(f"box_sums: tokens must be [B, h*w={h * w}, C], got {list(tokens.shape)}")
    B, _, C = tokens.shape
    rx = interval_matrix(w, tokens.device, tokens.dtype)  # [Kx, w]
    ry = interval_matrix(h, tokens.device, tokens.dtype)  # [Ky, h]
    t = torch.matmul(rx, tokens.reshape(B * h, w, C))  # [B*h, Kx, C]
    s = torch.matmul(ry, t.reshape(B, h, rx.shape[0] * C))  # [B, Ky, Kx*C]
    return s.reshape(B, ry.shape[0] * rx.shape[0], C)


def box_inverse_scales(tokens: torch.Tensor, h: int, w: int, eps: float = 1e-12,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inv_in, inv_out) [B, K]`` of the contract, in PyTorch.

    ``||S||^2`` of every box comes from the patches' Gram matrix summed over the box's pairs of
    patches (separable, like :func:`box_sums`); the outside norm is ``||T||^2 - 2 <T, S> + ||S||^2``.
    All of it in float64, so the cancellation in the outside norm stays far below float32 rounding.
    """
    if tokens.dim() != 3 or tokens.shape[1] != h * w:
        raise ValueError(f"box_inverse_scales: tokens must be [B, h*w={h * w}, D], got {list(tokens.shape)}")
    B, n, _ = tokens.shape
    x = tokens.to(torch.float64)
    rx = interval_matrix(w, tokens.device, torch.float64)  # [Kx, w]
    ry = interval_matrix(h, tokens.device, torch.float64)  # [Ky, h]
    kx, ky = rx.shape[0], ry.shape[0]
    gram = torch.matmul(x, x.transpose(1, 2))  # [B, (y, x), (y', x')]
    # sum over x, x' in each column interval j: diag_j(rx G rx^T), as one GEMM and one reduction
    q = torch.matmul(gram.reshape(B * n * h, w), rx.t()).reshape(B, h, w, h, kx)  # [B, y, x, y', j]
    q = (q * rx.t()[None, None, :, None, :]).sum(2)  # [B, y, y', j]
    # the same over y, y' in each row interval i
    q = torch.matmul(q.transpose(2, 3).reshape(B * h * kx, h), ry.t()).reshape(B, h, kx, ky)  # [B, y, j, i]
    q = (q * ry.t()[None, :, None, :]).sum(1)  # [B, j, i]
    sq_in = q.transpose(1, 2).reshape(B, ky * kx)  # [B, K] in box order (i outer, j inner)
    total = x.sum(1)  # [B, D]
    cross = box_sums(torch.matmul(x, total[:, :, None]), h, w)[..., 0]  # [B, K]: <T, S>
    sq_out = (total * total).sum(-1, keepdim=True) - 2 * cross + sq_in
    area = torch.matmul(ry.sum(1)[:, None], rx.sum(1)[None]).reshape(-1)  # [K] patches inside
    n_out = n - area
    has_out = n_out > 0
    norm_in = sq_in.clamp(min=0).sqrt()
    norm_out = torch.where(has_out, sq_out, torch.ones_like(sq_out)).clamp(min=0).sqrt()
    inv_in = 1.0 / torch.maximum(norm_in, eps * area)
    inv_out = torch.where(has_out, 1.0 / torch.maximum(norm_out, eps * n_out.clamp(min=1)),
                          torch.zeros_like(norm_out))
    dt = tokens.dtype if tokens.dtype in (torch.float32, torch.float64) else torch.float32
    return inv_in.to(dt), inv_out.to(dt)


#: elements of one block of box sums in the reference (about 16 MB of float32): the element-wise
#: passes over [B, K, H] are memory-bound and blocks that stay in cache make them 3-4x faster
REFERENCE_BLOCK_ELEMS = 1 << 22


def box_objectness_reference(tokens: torch.Tensor, h: int, w: int, w_in: torch.Tensor, w_out: torch.Tensor,
                             bias: torch.Tensor, w2: torch.Tensor, b2, eps: float = 1e-12,
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The contract in PyTorch (differentiable in ``tokens`` and the weights; no validation)."""
    work = work_dtype(tokens.dtype)
    x = tokens.to(work)
    inv_in, inv_out = box_inverse_scales(x, h, w, eps)
    H = w_in.shape[0]
    # z = [W_in x, -W_out x] per patch; the outside sum is total - inside
    z = torch.matmul(x, torch.cat([w_in, -w_out], 0).to(work).t())  # [B, n, 2H]
    z_out_total = -z[..., H:].sum(1, keepdim=True)  # [B, 1, H]
    bias = bias.to(work)
    w2 = w2.to(work)
    B, K = x.shape[0], inv_in.shape[1]
    ii, io = inv_in[..., None], inv_out[..., None]
    step = max(1, REFERENCE_BLOCK_ELEMS // max(1, K * 2 * H))
    logits = []
    for s in range(0, B, step):
        zs = box_sums(z[s:s + step], h, w)  # [b, K, 2H]
        bs = bias if bias.dim() == 2 else bias[s:s + step]
        pre = torch.addcmul(bs, zs[..., :H], ii[s:s + step])
        pre = pre.addcmul_(zs[..., H:] + z_out_total[s:s + step], io[s:s + step])
        logits.append(torch.matmul(F.gelu(pre), w2) + b2)
    out = torch.cat(logits, 0) if len(logits) > 1 else (logits[0] if logits else x.new_zeros(0, K))
    return out, inv_in, inv_out


# --------------------------------------------------------------------------------------------
# the cpu kernel as a custom op (forward only)
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("loupe_kernels::box_objectness", mutates_args=())
def _box_objectness_op(tokens: torch.Tensor, h: int, w: int, w_in: torch.Tensor, w_out: torch.Tensor,
                       bias: torch.Tensor, w2: torch.Tensor, b2: float, eps: float,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    work = work_dtype(tokens.dtype)
    c = [t.to(work).contiguous() for t in (tokens, w_in, w_out, bias, w2)]
    if c[3].dim() == 2:
        c[3] = c[3][None]
    logits, inv_in, inv_out = extension("cpu").box_objectness(c[0], h, w, c[1], c[2], c[3], c[4], b2, eps)
    return logits, inv_in, inv_out


@_box_objectness_op.register_fake
def _(tokens, h, w, w_in, w_out, bias, w2, b2, eps):
    work = work_dtype(tokens.dtype)
    shape = (tokens.shape[0], num_boxes(h, w))
    return (tokens.new_empty(shape, dtype=work), tokens.new_empty(shape, dtype=work),
            tokens.new_empty(shape, dtype=work))


# --------------------------------------------------------------------------------------------
# public entry
# --------------------------------------------------------------------------------------------
def _validate(tokens, h, w, w_in, w_out, bias, w2, b2, eps):
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
        raise ValueError(f"{OP}: tokens must be a [B, h*w, D] tensor, got "
                         f"{list(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__}")
    for name, v in (("h", h), ("w", w)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{OP}: {name} must be a positive int, got {v!r}")
    B, n, D = tokens.shape
    if n != h * w:
        raise ValueError(f"{OP}: tokens has {n} patches, but the grid is {h}x{w}={h * w}")
    if tokens.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{OP}: tokens must be floating point, got {tokens.dtype}")
    K = num_boxes(h, w)
    if not isinstance(w_in, torch.Tensor) or w_in.dim() != 2 or w_in.shape[1] != D:
        raise ValueError(f"{OP}: w_in must be [H, D={D}], got "
                         f"{list(w_in.shape) if isinstance(w_in, torch.Tensor) else type(w_in).__name__}")
    H = w_in.shape[0]
    if not isinstance(w_out, torch.Tensor) or tuple(w_out.shape) != (H, D):
        raise ValueError(f"{OP}: w_out must be [H={H}, D={D}] like w_in, got "
                         f"{list(w_out.shape) if isinstance(w_out, torch.Tensor) else type(w_out).__name__}")
    if not isinstance(bias, torch.Tensor) or tuple(bias.shape) not in ((K, H), (B, K, H)):
        raise ValueError(f"{OP}: bias must be [K={K}, H={H}] or [B={B}, K, H], got "
                         f"{list(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
    if not isinstance(w2, torch.Tensor) or tuple(w2.shape) != (H,):
        raise ValueError(f"{OP}: w2 must be [H={H}], got "
                         f"{list(w2.shape) if isinstance(w2, torch.Tensor) else type(w2).__name__}")
    for name, t in (("w_in", w_in), ("w_out", w_out), ("bias", bias), ("w2", w2)):
        if t.device != tokens.device:
            raise ValueError(f"{OP}: {name} is on {t.device} but tokens are on {tokens.device}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{OP}: {name} must be floating point, got {t.dtype}")
    if isinstance(b2, torch.Tensor):
        if b2.numel() != 1:
            raise ValueError(f"{OP}: b2 must be a number or a one-element tensor, got shape {list(b2.shape)}")
        if b2.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{OP}: b2 must be floating point, got {b2.dtype}")
        if b2.device != tokens.device:
            raise ValueError(f"{OP}: b2 is on {b2.device} but tokens are on {tokens.device}")
    elif isinstance(b2, bool) or not isinstance(b2, (int, float)):
        raise TypeError(f"{OP}: b2 must be a number or a one-element tensor, got {type(b2).__name__}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"{OP}: eps must be a finite number >= 0, got {eps!r}")
    if not torch.compiler.is_compiling():
        # data checks: one min/max reduction each; no host sync on a GPU (device-side asserts)
        check_finite(OP, tokens, "tokens")
        for name, t in (("w_in", w_in), ("w_out", w_out), ("bias", bias), ("w2", w2)):
            check_finite(OP, t, name)
        if isinstance(b2, torch.Tensor):
            check_finite(OP, b2, "b2")
        elif not math.isfinite(float(b2)):
            raise ValueError(f"{OP}: b2 must be finite, got {b2!r}")


def box_objectness(tokens: torch.Tensor, h: int, w: int, w_in: torch.Tensor, w_out: torch.Tensor,
                   bias: torch.Tensor, w2: torch.Tensor, b2: float | torch.Tensor = 0.0, *, eps: float = 1e-12,
                   backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Objectness logits and inside/outside normalisations of every whole-patch box (see the module)."""
    _validate(tokens, h, w, w_in, w_out, bias, w2, b2, eps)
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (tokens, w_in, w_out, bias, w2, b2) if isinstance(t, torch.Tensor))
    if backend == "cpu" and needs_grad:
        raise ValueError(f"{OP}: the cpu kernel is forward only; call it under torch.no_grad() or use "
                         f"backend='reference' for gradients")
    chosen = "reference" if needs_grad and backend is None else \
        resolve_backend(OP, backend, tokens.device, supported=("cpu", "reference"))
    if chosen == "cpu":
        return _box_objectness_op(tokens, h, w, w_in, w_out, bias, w2, float(b2), float(eps))
    return box_objectness_reference(tokens, h, w, w_in, w_out, bias, w2, b2, float(eps))
