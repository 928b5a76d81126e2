"""GPU scalar semantics (issue 20, item 3): no Python float reaches a Triton kernel of loupe_kernels.

A float kernel argument is an fp32 scalar on a GPU but a float64 in the interpreter, so any such
argument could make the interpreter tests pass where the GPU differs. The launchers compute scales in
the kernel's accumulator type instead (or pass tensors). tests/triton/conftest.py passes float
arguments as fp32 in every interpreter test (as a GPU would) and records them.
"""
from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET", "0") != "1":
    pytest.skip("checks the Triton interpreter (TRITON_INTERPRET=1)", allow_module_level=True)
triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

import loupe_kernels as lk  # noqa: E402


@triton.jit
def _scale_kernel(x_ptr, out_ptr, scale):
    offs = tl.arange(0, 4)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs) * scale)


def test_interpreter_float_arguments_are_fp32_as_on_a_gpu(float_args):
    x = torch.ones(4, dtype=torch.float64)
    out = torch.empty_like(x)
    _scale_kernel[(1,)](x, out, 1.0 / 3.0)
    fp32_third = float(torch.tensor(1.0 / 3.0, dtype=torch.float32))
    assert out[0].item() == fp32_third != 1.0 / 3.0  # the emulation of tests/triton/conftest.py is on
    assert float_args() == [1.0 / 3.0]


def _run_every_triton_op():
    g = torch.Generator().manual_seed(0)
    for dt in (torch.float64, torch.float32):
        # similarity: forward and backward, all pairs and aligned pairs
        q = torch.randn(2, 3, 8, generator=g, dtype=dt, requires_grad=True)
        k = torch.randn(2, 5, 8, generator=g, dtype=dt, requires_grad=True)
        for pw in (True, False):
            lk.token_region_similarity(q, k, pairwise=pw, backend="triton").sum().backward()
        # Shapley: both games and the coalitions
        sim = torch.randn(2, 3, 6, generator=g, dtype=dt)
        subsets = torch.zeros(2, 2, 6, dtype=torch.bool)
        subsets[:, 0, :2] = True
        subsets[:, 1, 3] = True
        lk.shapley_interaction(sim, subsets, num_samples=4, backend="triton")
        qp = torch.zeros(2, 2, 9, dtype=torch.bool)
        qp[:, :, 0] = qp[:, :, 5] = True
        lk.shapley_interaction(sim, qp, query_players=True, num_samples=4, backend="triton")
        lk.sample_coalitions(subsets, num_samples=4, seed=1, backend="triton")
        # loss: every reduction, with and without target_var and weight, forward and backward
        mu = torch.randn(5, generator=g, dtype=dt, requires_grad=True)
        lv = torch.randn(5, generator=g, dtype=dt, requires_grad=True)
        t = torch.randn(5, generator=g, dtype=dt)
        for red in ("mean", "sum", "none"):
            for tv, w in ((None, None), (torch.rand(5, generator=g, dtype=dt), torch.rand(5, generator=g, dtype=dt))):
                lk.uncertainty_interaction_loss(mu, lv, t, target_var=tv, weight=w, reduction=red,
                                                backend="triton").sum().backward()


def test_no_kernel_receives_a_python_float(float_args):
    _run_every_triton_op()
    assert float_args() == [], "a Triton kernel got a Python float argument (fp32 on a GPU, float64 here)"
