"""Test-session set-up shared by every test directory.

Without a CUDA device the Triton kernels can only run in the Triton interpreter, which reads
TRITON_INTERPRET when triton is first imported: set it here, before any test imports triton, so
that one `pytest` run covers tests/triton too. (Automatic backend choice never picks the
interpreter; only tests that ask for backend="triton" use it.)

The helpers shared by the kernel tests of tests/kernels and tests/triton (oracles, inputs, tolerance
checks: tests/kernels/_kernel_testing.py) are imported as ``_kernel_testing``: tests/kernels is put on
sys.path here (importlib import mode puts no test folder there).
"""
import os
import sys

import torch

sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels"))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
