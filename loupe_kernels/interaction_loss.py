"""Uncertainty-weighted interaction loss: heteroscedastic Gaussian NLL of UANSIL (METHOD section 8).

Contract
--------
``uncertainty_interaction_loss(mu, log_var, target, *, target_var=None, weight=None,
reduction="mean", backend=None) -> Tensor``

Per element, with ``v = log_var`` and ``r = target - mu``::

    l = 0.5 * (exp(-v) * r^2 + v)                          (target_var is None)
    l = 0.5 * (r^2 / (exp(v) + target_var) + log(exp(v) + target_var))

times ``weight`` when given. ``reduction``: ``"mean"`` (sum over elements / number of elements,
also with a weight; 0 for an empty input), ``"sum"`` or ``"none"`` (the shape of ``mu``).

- ``mu``, ``log_var``, ``target`` have one shape; ``target_var`` (the squared standard error of
  the sampled target) and ``weight`` broadcast to it. Floating dtypes; mixed dtypes are promoted.
  The result has the (promoted) dtype of the inputs; float16/bfloat16 are computed in float32,
  float64 in float64.
- Gradients flow to ``mu`` and ``log_var`` only; ``target``, ``target_var`` and ``weight`` are data.
  No second derivative on the kernel backends: a double backward (``create_graph=True``) raises
  ``RuntimeError("uncertainty_interaction_loss: no second derivative ...")``; the reference is
  differentiated by autograd and has one.
- Failure contract, the same on every backend (issue 21 item 8): the data checks below raise the
  same ValueError on every backend; NaN/inf in ``mu`` / ``log_var`` (the model's own outputs) are not
  checked and propagate to the loss as IEEE arithmetic gives; float16/bfloat16 are computed in
  float32 and the result rounded to the input dtype (a loss above 65504 is ``inf`` in float16, on
  every backend); an empty input gives 0 (mean, sum) or an empty tensor (none).
- Validation (ValueError naming the argument): ``target`` NaN or inf where ``weight != 0``;
  ``target_var`` negative anywhere, or NaN/inf where ``weight != 0``; ``weight`` negative or not
  finite. An element with weight 0 contributes exactly 0 to the loss and to both gradients whatever
  its target (selected, never multiplied: 0 * NaN is NaN). On GPU tensors these data checks never
  synchronise with the host: they are device-side asserts with the same message (a failure surfaces
  at the next synchronisation), unless debug mode is on (``LOUPE_KERNELS_DEBUG=1`` or
  ``loupe_kernels.set_debug(True)``), which raises the ValueError at the call.
- Stability: loss and gradients are finite for ``log_var`` in [-20, 20] and residuals up to
  ``|r| * exp(-log_var / 2) < 1e19`` (the loss itself is then representable in float32). The
  float32 kernels evaluate ``exp`` with a polynomial (about 1 ulp) clamped to [-87.3, 88.3].
- Agrees with ``torch.nn.functional.gaussian_nll_loss(mu, target, exp(log_var))`` wherever that
  does not clamp the variance (``log_var > -13.8``).
- One fused pass forward; for ``mean``/``sum`` the forward also writes the gradients (scaled by
  weight and 1/N) and the backward only multiplies them by the incoming scalar; for ``none`` the
  backward recomputes each element in one pass.
- Backends: ``cpu`` (C++), ``triton``, ``cuda`` where available, ``reference`` (the formula in
  PyTorch, differentiated by autograd).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ._backends import extension, resolve_backend
from ._common import FLOAT_DTYPES, host_checks, no_second_derivative, triton_loader, work_dtype

__all__ = ["uncertainty_interaction_loss", "uncertainty_interaction_loss_reference", "UncertaintyInteractionLoss"]

OP = "uncertainty_interaction_loss"
_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
STATUS_BITS = {
    1: "target contains NaN or inf where weight != 0",
    2: "target_var must be >= 0 (it is a squared standard error); it has negative entries",
    4: "target_var contains NaN or inf where weight != 0",
    8: "weight must be finite and >= 0; it has negative, NaN or inf entries",
}


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------
def _check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{OP}: {name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{OP}: {name} must be float16/bfloat16/float32/float64, got {t.dtype}")


def _validate(mu, log_var, target, target_var, weight, reduction):
    """Shapes, dtypes, devices, reduction. Returns (tensors in one dtype and shape, reduction code)."""
    _check_tensor(mu, "mu")
    _check_tensor(log_var, "log_var")
    _check_tensor(target, "target")
    if not isinstance(reduction, str) or reduction not in _REDUCTIONS:
        raise ValueError(f"{OP}: reduction must be one of {tuple(_REDUCTIONS)}, got {reduction!r}")
    for name, t in (("log_var", log_var), ("target", target)):
        if t.shape != mu.shape:
            raise ValueError(f"{OP}: {name} must have the shape of mu {list(mu.shape)}, got {list(t.shape)}")
    tensors = {"mu": mu, "log_var": log_var, "target": target}
    for name, t in (("target_var", target_var), ("weight", weight)):
        if t is None:
            continue
        _check_tensor(t, name)
        try:
            shape = torch.broadcast_shapes(t.shape, mu.shape)
        except RuntimeError:
            shape = None
        if shape != mu.shape:
            raise ValueError(f"{OP}: {name} of shape {list(t.shape)} does not broadcast to the shape of mu "
                             f"{list(mu.shape)}")
        tensors[name] = t
    for name, t in tensors.items():
        if t.device != mu.device:
            raise ValueError(f"{OP}: {name} is on {t.device} but mu is on {mu.device}")
    dtype = mu.dtype
    for t in tensors.values():
        dtype = torch.promote_types(dtype, t.dtype)
    out = []
    for name in ("mu", "log_var", "target", "target_var", "weight"):
        t = tensors.get(name)
        if t is not None:
            if name in ("target", "target_var", "weight"):
                t = t.detach()
            t = t.to(dtype)
            if name in ("target_var", "weight") and t.shape != mu.shape:
                t = t.expand(mu.shape)
        out.append(t)
    return (*out, _REDUCTIONS[reduction])


def _raise_status(status: torch.Tensor) -> None:
    """Raise for the status word (an integer tensor, the OR of STATUS_BITS) of a forward: a ValueError
    naming the first bad argument where it may be read on the host (CPU, or debug mode), else one
    device-side assert (no host sync on a GPU; see loupe_kernels._common)."""
    if host_checks(status):
        s = int(status)
        for bit, msg in STATUS_BITS.items():
            if s & bit:
                raise ValueError(f"{OP}: {msg}")
    else:
        what = "; ".join(f"{bit}: {msg}" for bit, msg in STATUS_BITS.items())
        torch._assert_async(status == 0, f"{OP}: invalid data (status bits {what}); set LOUPE_KERNELS_DEBUG=1 "
                                         f"for a ValueError at the call")


def _check_data(target, target_var, weight) -> None:
    """The kernels' status word computed in PyTorch (reference backend), raised as theirs is."""
    live = None if weight is None else weight != 0

    def any_bad(bad: torch.Tensor, bit: int) -> torch.Tensor:
        return (bad if live is None else bad & live).any().to(torch.int64) * bit

    status = any_bad(~torch.isfinite(target), 1)
    if target_var is not None:
        status = status + (target_var < 0).any().to(torch.int64) * 2 + any_bad(~torch.isfinite(target_var), 4)
    if weight is not None:
        status = status + (~(torch.isfinite(weight) & (weight >= 0))).any().to(torch.int64) * 8
    _raise_status(status)


# --------------------------------------------------------------------------------------------
# reference: the formula in plain PyTorch, differentiated by autograd
# --------------------------------------------------------------------------------------------
def _reference(mu, log_var, target, target_var, weight, red: int):
    _check_data(target, target_var, weight)
    work = work_dtype(mu.dtype)
    m, v, t = mu.to(work), log_var.to(work), target.to(work)
    s = target_var.to(work) if target_var is not None else None
    if weight is not None:
        live = weight != 0
        t = torch.where(live, t, m.detach())  # a dead element's data never enters the arithmetic
        if s is not None:
            s = torch.where(live, s, torch.zeros((), dtype=work, device=s.device))
    r = t - m
    if s is None:
        z = r * torch.exp(-0.5 * v)
        per = 0.5 * (z * z + v)
    else:
        var = torch.exp(v) + s
        per = 0.5 * (r * r / var + torch.log(var))
    if weight is not None:
        w = weight.to(work)
        per = torch.where(live, w * per, torch.zeros((), dtype=work, device=per.device))
    if red == 0:
        out = per
    elif red == 2:
        out = per.sum()
    else:
        out = per.sum() / per.numel() if per.numel() > 0 else per.sum()
    return out.to(mu.dtype)


def uncertainty_interaction_loss_reference(mu: torch.Tensor, log_var: torch.Tensor, target: torch.Tensor, *,
                                           target_var: Optional[torch.Tensor] = None,
                                           weight: Optional[torch.Tensor] = None,
                                           reduction: str = "mean") -> torch.Tensor:
    """The op as the formula in plain PyTorch (float32 math for float16/bfloat16), autograd backward."""
    mu, log_var, target, target_var, weight, red = _validate(mu, log_var, target, target_var, weight, reduction)
    return _reference(mu, log_var, target, target_var, weight, red)


# --------------------------------------------------------------------------------------------
# compiled backends. Every input reaching a kernel is contiguous, of one dtype and one numel.
#   forward(mu, log_var, target, target_var|None, weight|None, reduction, need_grad)
#       -> (loss, grad_mu, grad_log_var, status: an integer tensor on the device, never read there):  gradients of the reduced loss (float32,
#          float64 for float64) for mean/sum with need_grad, else empty
#   backward(grad, mu, log_var, target, target_var|None, weight|None) -> (d_mu, d_log_var)  (none)
# --------------------------------------------------------------------------------------------
def _compiled(name: str) -> tuple[Callable, Callable]:
    """(forward, backward) of the compiled extension ``name`` ("cpu" or "cuda"): one binding contract."""
    def forward(mu, log_var, target, target_var, weight, red, need_grad):
        loss, gmu, gv, status = extension(name).uil_forward(mu, log_var, target, target_var, weight, red, need_grad)
        return loss, gmu, gv, status

    def backward(grad, mu, log_var, target, target_var, weight):
        return extension(name).uil_backward(grad, mu, log_var, target, target_var, weight)

    return forward, backward


_triton = triton_loader("interaction_loss")


def _triton_forward(mu, log_var, target, target_var, weight, red, need_grad):
    return _triton().forward(mu, log_var, target, target_var, weight, red, need_grad)


def _triton_backward(grad, mu, log_var, target, target_var, weight):
    return _triton().backward(grad, mu, log_var, target, target_var, weight)


KERNELS: dict[str, tuple[Callable, Callable]] = {
    "cpu": _compiled("cpu"),
    "triton": (_triton_forward, _triton_backward),
    "cuda": _compiled("cuda"),
}


def _c(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.contiguous()


@torch.library.custom_op("loupe_kernels::uil_forward", mutates_args=())
def _uil_forward_op(mu: torch.Tensor, log_var: torch.Tensor, target: torch.Tensor,
                    target_var: Optional[torch.Tensor], weight: Optional[torch.Tensor], reduction: int,
                    need_grad: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    loss, gmu, gv, status = KERNELS[backend][0](mu.contiguous(), log_var.contiguous(), target.contiguous(),
                                                _c(target_var), _c(weight), reduction, need_grad)
    _raise_status(status)
    return loss, gmu, gv


@_uil_forward_op.register_fake
def _(mu, log_var, target, target_var, weight, reduction, need_grad, backend):
    loss = mu.new_empty(mu.shape) if reduction == 0 else mu.new_empty(())
    gshape = mu.shape if (need_grad and reduction != 0) else (0,)
    gdt = work_dtype(mu.dtype)
    return loss, mu.new_empty(gshape, dtype=gdt), mu.new_empty(gshape, dtype=gdt)


@torch.library.custom_op("loupe_kernels::uil_backward", mutates_args=())
def _uil_backward_op(grad: torch.Tensor, mu: torch.Tensor, log_var: torch.Tensor, target: torch.Tensor,
                     target_var: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                     backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return KERNELS[backend][1](grad.to(mu.dtype).contiguous(), mu.contiguous(), log_var.contiguous(),
                               target.contiguous(), _c(target_var), _c(weight))


@_uil_backward_op.register_fake
def _(grad, mu, log_var, target, target_var, weight, backend):
    return torch.empty_like(mu), torch.empty_like(log_var)


def _setup_context(ctx, inputs, output):
    mu, log_var, target, target_var, weight, reduction, _need_grad, backend = inputs
    _, gmu, gv = output
    ctx.reduction = reduction
    ctx.backend = backend
    ctx.dtype = mu.dtype
    ctx.has_tv = target_var is not None
    ctx.has_w = weight is not None
    if reduction == 0:
        saved = [mu, log_var, target]
        if target_var is not None:
            saved.append(target_var)
        if weight is not None:
            saved.append(weight)
        ctx.save_for_backward(*saved)
    else:
        ctx.save_for_backward(gmu, gv)
    ctx.mark_non_differentiable(gmu, gv)
    ctx.inputs_for_second = (mu, log_var)  # inputs (not outputs) on ctx: no reference cycle


def _backward(ctx, grad_loss, _g1, _g2):
    if ctx.reduction == 0:
        saved = list(ctx.saved_tensors)
        mu, log_var, target = saved[:3]
        rest = saved[3:]
        target_var = rest.pop(0) if ctx.has_tv else None
        weight = rest.pop(0) if ctx.has_w else None
        with torch.no_grad():
            dmu, dv = _uil_backward_op(grad_loss, mu, log_var, target, target_var, weight, ctx.backend)
    else:
        gmu, gv = ctx.saved_tensors  # gradients of the reduced loss, written by the forward
        with torch.no_grad():
            g = grad_loss.to(gmu.dtype)
            dmu, dv = (gmu * g).to(ctx.dtype), (gv * g).to(ctx.dtype)
    dmu, dv = no_second_derivative(OP, ctx.backend, (dmu, dv), ctx.inputs_for_second)
    return dmu, dv, None, None, None, None, None, None


_uil_forward_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def uncertainty_interaction_loss(mu: torch.Tensor, log_var: torch.Tensor, target: torch.Tensor, *,
                                 target_var: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None,
                                 reduction: str = "mean", backend: Optional[str] = None) -> torch.Tensor:
    """Heteroscedastic Gaussian NLL of predicted interactions ``(mu, log_var)`` against sampled
    ``target`` (see the module docstring for the exact contract)."""
    mu, log_var, target, target_var, weight, red = _validate(mu, log_var, target, target_var, weight, reduction)
    chosen = resolve_backend(OP, backend, mu.device, supported=("reference", *KERNELS))
    if chosen == "reference":
        return _reference(mu, log_var, target, target_var, weight, red)
    need_grad = torch.is_grad_enabled() and (mu.requires_grad or log_var.requires_grad)
    loss, _, _ = _uil_forward_op(mu, log_var, target, target_var, weight, red, need_grad, chosen)
    return loss


class UncertaintyInteractionLoss(torch.nn.Module):
    """``nn.Module`` wrapper of :func:`uncertainty_interaction_loss`."""

    def __init__(self, reduction: str = "mean", backend: Optional[str] = None) -> None:
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"{OP}: reduction must be one of {tuple(_REDUCTIONS)}, got {reduction!r}")
        self.reduction = reduction
        self.backend = backend

    def forward(self, mu, log_var, target, target_var=None, weight=None):
        return uncertainty_interaction_loss(mu, log_var, target, target_var=target_var, weight=weight,
                                            reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, backend={self.backend!r}"
