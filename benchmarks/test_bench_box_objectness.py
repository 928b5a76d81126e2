"""box_objectness on the CPU: the fused C++ kernel vs the PyTorch reference (issue #8's cost).

The dense pass of the region generator at the LOUPE step's default size: batch 128, 8x8 grid
(1296 boxes), D = 128, hidden H = 128, fp32, no gradient (it ranks the boxes for NMS and the TSA
candidates). Both sides compute the logits and the inside/outside normalisation of every box.
Target: cpu >= 2x faster than the reference (separable interval GEMMs and cache-sized element-wise
passes in PyTorch).
"""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

import loupe_kernels as lk

bo = importlib.import_module("loupe_kernels.box_objectness")
HAS_CPU = "cpu" in lk.available_backends()
B, G, D, H = 128, 8, 128, 128


@pytest.mark.parametrize("variant", ["reference", "cpu"])
def test_box_objectness(benchmark, variant):
    if variant == "cpu" and not HAS_CPU:
        pytest.skip("cpu backend not built")
    g = torch.Generator().manual_seed(0)
    tokens = F.normalize(torch.randn(B, G * G, D, generator=g), dim=-1)
    K = bo.num_boxes(G, G)
    w_in, w_out = torch.randn(H, D, generator=g) / D ** 0.5, torch.randn(H, D, generator=g) / D ** 0.5
    bias, w2 = torch.randn(K, H, generator=g) * 0.1, torch.randn(H, generator=g) / H ** 0.5
    benchmark.group = f"box_objectness / B={B} {G}x{G} grid K={K} D={D} H={H} / fp32 forward"
    benchmark.extra_info["variant"] = variant
    if variant == "cpu":
        benchmark.extra_info["target"] = {"vs": "reference", "min_speedup": 2.0}

    def fn():
        with torch.no_grad():
            return lk.box_objectness(tokens, G, G, w_in, w_out, bias, w2, 0.0, backend=variant)

    benchmark.pedantic(fn, rounds=10, iterations=1, warmup_rounds=2)
