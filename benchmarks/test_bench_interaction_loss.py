"""uncertainty_interaction_loss on the CPU: the fused C++ kernel vs the autograd reference.

Issue #5: 4M elements, fp32, forward + backward of the mean loss (gradients for mu and log_var).
Target: cpu >= 2x faster than the reference (the formula in PyTorch, differentiated by autograd).
The fused path reads each input once and writes each gradient once in the forward; the backward
scales the two gradients by the incoming scalar. A second group adds target_var and weight.
"""
from __future__ import annotations

import pytest
import torch

import loupe_kernels as lk

HAS_CPU = "cpu" in lk.available_backends()
N = 4 * 1024 * 1024


def inputs(extras: bool):
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(N, generator=g)
    lv = torch.randn(N, generator=g) * 3
    t = mu + torch.randn(N, generator=g) * torch.exp(0.5 * lv)
    tv = torch.rand(N, generator=g) * 0.1 if extras else None
    w = torch.rand(N, generator=g) if extras else None
    return mu.requires_grad_(), lv.requires_grad_(), t, tv, w


@pytest.mark.parametrize("extras", [False, True], ids=["plain", "target_var+weight"])
@pytest.mark.parametrize("variant", ["reference", "cpu"])
def test_forward_backward(benchmark, variant, extras):
    if variant == "cpu" and not HAS_CPU:
        pytest.skip("cpu backend not built")
    mu, lv, t, tv, w = inputs(extras)
    benchmark.group = (f"uncertainty_interaction_loss / N={N} "
                       f"{'target_var+weight' if extras else 'plain'} / fp32 fwd+bwd mean")
    benchmark.extra_info["variant"] = variant
    if variant == "cpu":
        benchmark.extra_info["target"] = {"vs": "reference", "min_speedup": 2.0}

    def fn():
        loss = lk.uncertainty_interaction_loss(mu, lv, t, target_var=tv, weight=w, backend=variant)
        return torch.autograd.grad(loss, (mu, lv))

    benchmark.pedantic(fn, rounds=10, iterations=1, warmup_rounds=2)
