"""What the ops of loupe_kernels share, written once: the float dtypes they accept, the work dtype
they compute in, the mean / standard error of sampled values, integer argument checks, the data
checks that never stall a GPU (and the debug switch that makes them eager), and the lazy loader of
the Triton modules.

Data checks (NaN, invalid masks, the loss's status word) and host synchronisation: reading a GPU
tensor's value on the host (``bool(t)``, ``.item()``, ``int(t)``) waits for the GPU to finish
everything queued so far, which stalls the launch queue and rules out CUDA graphs. So
:func:`check` reads the value only where that costs nothing (CPU tensors) or where it is asked for
(debug mode: ``LOUPE_KERNELS_DEBUG=1`` in the environment, or :func:`set_debug`); on a GPU it
queues a device-side assert instead (``torch._assert_async``), which fails at a later
synchronisation with the same message (and, as every CUDA assert, leaves the CUDA context unusable:
rerun with the debug switch for a ValueError at the call).

A leaf module: it imports only torch (and, inside :func:`triton_acc`, ``triton.language``), so that
every op file and every ``triton_*`` launcher may import it without a cycle.
"""
from __future__ import annotations

import importlib
import math
import os
from types import ModuleType
from typing import Callable

import numpy as np
import torch

__all__ = ["tf32_allowed", "FLOAT_DTYPES", "MAX_SAMPLES", "work_dtype", "work_max_exponent", "to_work",
           "sample_stats", "check_int", "set_debug", "debug_enabled", "host_checks", "check", "max_abs",
           "check_finite", "no_second_derivative", "triton_loader", "triton_acc"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_SAMPLES = 1 << 20   # the Shapley ops' bound on num_samples (K): 2^20 = 1,048,576 samples per subset


def tf32_allowed() -> bool:
    """Whether torch allows TF32 for fp32 matmuls. torch >= 2.9 has ``fp32_precision`` ("tf32" after
    ``allow_tf32 = True``, ``set_float32_matmul_precision("high")`` or the new API itself); reading the
    legacy ``allow_tf32`` raises RuntimeError once the new API was used, so it is read only without it."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is not None:
        return precision == "tf32"
    return bool(matmul.allow_tf32)


def work_dtype(dt: torch.dtype) -> torch.dtype:
    """The dtype the kernels compute in: float64 for float64 input, float32 for every other float."""
    return torch.float64 if dt == torch.float64 else torch.float32


def work_max_exponent(dt: torch.dtype) -> int:
    """The largest exponent ``e`` of the work dtype of ``dt``: its finite values are below ``2^(e+1)``
    (127 for float32, 1023 for float64)."""
    return 1023 if work_dtype(dt) == torch.float64 else 127


def to_work(t: torch.Tensor) -> torch.Tensor:
    """``t`` in its work dtype, contiguous (no copy when it already is)."""
    return t.to(work_dtype(t.dtype)).contiguous()


def sample_stats(samples: torch.Tensor, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard error (sample std over sqrt(K), ``inf`` for K = 1) over the last axis of
    ``samples`` (reduced in float64), as ``out_dtype``."""
    x = samples.double()
    K = x.shape[-1]
    est = x.mean(-1)
    if K > 1:
        se = x.std(-1, correction=1) / math.sqrt(K)
    else:
        se = torch.full_like(est, float("inf"))
    return est.to(out_dtype), se.to(out_dtype)


def check_int(op: str, x, name: str, lo: int, hi: int | None = None) -> int:
    """``x`` as an int in ``[lo, hi)`` (``>= lo`` without ``hi``); TypeError / ValueError naming ``op``."""
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{op}: {name} must be an int, got {type(x).__name__}")
    x = int(x)
    if x < lo or (hi is not None and x >= hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi})"
        raise ValueError(f"{op}: {name} must be {rng}, got {x}")
    return x


_debug = os.environ.get("LOUPE_KERNELS_DEBUG", "0").strip().lower() not in ("", "0", "false", "no", "off")
_device_path_on_cpu = False  # tests only: treat CPU tensors as GPU tensors (see tests/kernels/test_host_sync.py)


def set_debug(enabled: bool = True) -> None:
    """Debug mode on or off: every data check reads its result on the host and raises a ValueError at
    the call, also for GPU tensors (a host synchronisation per check). Default: the environment
    variable ``LOUPE_KERNELS_DEBUG`` (``1`` = on)."""
    global _debug
    _debug = bool(enabled)


def debug_enabled() -> bool:
    """Whether debug mode is on (see :func:`set_debug`)."""
    return _debug


def host_checks(t: torch.Tensor) -> bool:
    """Whether a data check on ``t`` may read its result on the host: CPU tensors (nothing to wait
    for) and debug mode; never a GPU tensor on the hot path."""
    return _debug or (t.device.type == "cpu" and not _device_path_on_cpu)


def check(op: str, ok: torch.Tensor, msg: str) -> None:
    """Require every element of the bool tensor ``ok``: ``ValueError(f"{op}: {msg}")`` at the call
    where :func:`host_checks` allows it, else a device-side assert with that message (no host sync)."""
    if host_checks(ok):
        if not bool(ok.all()):
            raise ValueError(f"{op}: {msg}")
    else:
        torch._assert_async(ok.all(), f"{op}: {msg} (set LOUPE_KERNELS_DEBUG=1 for a ValueError at the call)")


def max_abs(t: torch.Tensor) -> torch.Tensor:
    """``max |t|`` as a 0-d float64 tensor on ``t``'s device, without a host read and without a
    temporary of ``t``'s size (one min/max reduction): NaN when ``t`` holds a NaN, inf when it holds
    an inf, 0 for an empty ``t``."""
    if t.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=t.device)
    lo, hi = torch.aminmax(t.detach())
    return torch.maximum(hi.double(), -lo.double())  # maximum propagates NaN


def check_finite(op: str, t: torch.Tensor, name: str) -> torch.Tensor:
    """Require ``t`` to hold no NaN or inf (``ValueError(f"{op}: {name} contains NaN or inf")``, or a
    device-side assert: see :func:`check`); returns :func:`max_abs` of ``t`` for magnitude checks."""
    m = max_abs(t)
    check(op, torch.isfinite(m), f"{name} contains NaN or inf")
    return m


class _NoSecondDerivative(torch.autograd.Function):
    """Identity on the first ``n`` tensors, connected to the rest (the inputs they were computed from);
    its backward raises the message."""

    @staticmethod
    def forward(ctx, msg, n, *tensors):
        ctx.msg = msg
        return tuple(t.detach() for t in tensors[:n])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(ctx.msg)


def no_second_derivative(op: str, backend: str, grads: tuple, inputs: tuple) -> tuple:
    """The gradients ``grads`` computed by a kernel backward from ``inputs``, as they are; under
    ``create_graph=True`` (grad mode on inside the backward) connected to ``inputs`` through a node
    whose backward raises ``RuntimeError("<op>: no second derivative ...")``, so that a double
    backward says so plainly instead of a generic autograd message."""
    if not torch.is_grad_enabled() or not any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs):
        return tuple(grads)
    msg = (f"{op}: no second derivative: the {backend} backend's backward is a kernel and is not "
           f"differentiable (double backward, create_graph=True); use backend='reference' for it")
    live = [g for g in grads if g is not None]
    out = iter(_NoSecondDerivative.apply(msg, len(live), *live, *[t for t in inputs if isinstance(t, torch.Tensor)]))
    return tuple(None if g is None else next(out) for g in grads)


def triton_loader(op: str) -> Callable[[], ModuleType]:
    """A function returning the module ``loupe_kernels.triton_<op>``, imported on the first call.

    Lazy because ``triton`` reads ``TRITON_INTERPRET`` when it is imported, and because Triton is
    optional: importing ``loupe_kernels`` never imports it.
    """
    name = f"{__package__}.triton_{op}"

    def load() -> ModuleType:
        return importlib.import_module(name)

    load.__doc__ = f"The module {name} (imported on the first call)."
    return load


def triton_acc(dt: torch.dtype, what: str = "the input"):
    """The Triton accumulator type of input dtype ``dt`` (``tl.float64`` or ``tl.float32``); TypeError
    naming ``what`` for a dtype that is not a float of :data:`FLOAT_DTYPES`."""
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"{what} must be float16/bfloat16/float32/float64, got {dt}")
    import triton.language as tl
    return tl.float64 if work_dtype(dt) == torch.float64 else tl.float32
