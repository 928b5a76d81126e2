"""Test-session set-up shared by every test directory.

Without a CUDA device the Triton kernels can only run in the Triton interpreter, which reads
TRITON_INTERPRET when triton is first imported: set it here, before any test imports triton, so
that one `pytest` run covers tests/triton too. (Automatic backend choice never picks the
interpreter; only tests that ask for backend="triton" use it.)
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
