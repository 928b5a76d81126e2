"""GPU scalar semantics in the Triton interpreter (issue 20, item 3).

On a GPU a Python float kernel argument is an fp32 scalar; the interpreter keeps it a Python float
(float64), so an fp64 kernel scaled by such an argument is exact here and off by fp32 rounding on the
GPU. Every interpreter launch in tests/triton therefore passes Python float arguments as fp32
scalars (as a GPU would) and records them: the ``float_args`` fixture returns the values passed
since the test began.
Constexpr arguments are compile-time constants and are not affected.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

_RECORD: list[float] = []


def _patch_interpreter() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    if getattr(interpreter, "_loupe_fp32_scalars", False):
        return
    original = interpreter._implicit_cvt

    def implicit_cvt(arg):
        if isinstance(arg, float):  # bool is not a float; constexprs never reach here
            _RECORD.append(arg)
            handle = interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32)
            return tl.tensor(handle, tl.float32)
        return original(arg)

    interpreter._implicit_cvt = implicit_cvt
    interpreter._loupe_fp32_scalars = True


_patch_interpreter()


@pytest.fixture
def float_args():
    """A function returning the Python float arguments of the Triton launches since the test began."""
    start = len(_RECORD)
    return lambda: list(_RECORD[start:])
