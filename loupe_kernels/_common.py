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

__all__ = ["FLOAT_DTYPES", "POOLED_NORM_EPS", "work_dtype", "to_work", "sample_stats", "check_int", "set_debug",
           "debug_enabled", "host_checks", "check", "triton_loader", "triton_acc"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
POOLED_NORM_EPS = 1e-12  # the pooled Shapley game: normalize(z) = z / max(||z||, eps) (METHOD section 5)


def work_dtype(dt: torch.dtype) -> torch.dtype:
    """The dtype the kernels compute in: float64 for float64 input, float32 for every other float."""
    return torch.float64 if dt == torch.float64 else torch.float32


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
