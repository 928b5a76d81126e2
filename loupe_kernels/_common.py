"""What the ops of loupe_kernels share, written once: the float dtypes they accept, the work dtype
they compute in, the mean / standard error of sampled values, integer argument checks and the lazy
loader of the Triton modules.

A leaf module: it imports only torch (and, inside :func:`triton_acc`, ``triton.language``), so that
every op file and every ``triton_*`` launcher may import it without a cycle.
"""
from __future__ import annotations

import importlib
import math
from types import ModuleType
from typing import Callable

import numpy as np
import torch

__all__ = ["FLOAT_DTYPES", "POOLED_NORM_EPS", "work_dtype", "to_work", "sample_stats", "check_int", "triton_loader", "triton_acc"]

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
