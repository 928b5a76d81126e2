"""token_region_similarity on the CPU: reference vs the C++ kernel, forward and forward+backward.

Targets (fp32, 2-core CPU): cpu >= 2x faster than the reference for forward+backward with at most
1/8 of its extra peak memory; cpu forward within 1.5x of one fp32 GEMM of the same FLOPs.
"""
from __future__ import annotations

import pytest
import torch

import loupe_kernels as lk

SHAPES = {"A": (128, 16, 128, 64, 128), "B": (256, 32, 256, 64, 256)}  # Bq, Lq, Bk, Lk, D
HAS_CPU = "cpu" in lk.available_backends()


def inputs(shape, requires_grad=False):
    Bq, Lq, Bk, Lk, D = shape
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(Bq, Lq, D, generator=g), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(Bk, Lk, D, generator=g), dim=-1)
    qm = torch.rand(Bq, Lq, generator=g) > 0.2
    km = torch.rand(Bk, Lk, generator=g) > 0.1
    w = torch.randn(Bq, Bk, generator=g)
    return q.requires_grad_(requires_grad), k.requires_grad_(requires_grad), qm, km, w


def shape_label(name):
    Bq, Lq, Bk, Lk, D = SHAPES[name]
    return f"{name} Bq={Bq} Lq={Lq} Bk={Bk} Lk={Lk} D={D}"


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("variant", ["reference", "cpu", "gemm"])
def test_forward(benchmark, shape, variant):
    if variant == "cpu" and not HAS_CPU:
        pytest.skip("cpu backend not built")
    q, k, qm, km, _ = inputs(SHAPES[shape])
    benchmark.group = f"token_region_similarity / {shape_label(shape)} / forward fp32"
    benchmark.extra_info["variant"] = variant
    if variant == "gemm":
        a, b = q.reshape(-1, q.shape[-1]), k.reshape(-1, k.shape[-1])
        fn = lambda: torch.mm(a, b.t())  # noqa: E731
        benchmark.extra_info["note"] = "gemm = one fp32 [Bq*Lq, D] @ [D, Bk*Lk] (same FLOPs)"
    else:
        fn = lambda: lk.token_region_similarity(q, k, qm, km, backend=variant)  # noqa: E731
    if variant == "cpu":
        benchmark.extra_info["target"] = {"vs": "gemm", "min_speedup": round(1 / 1.5, 3)}
    with torch.no_grad():
        benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)


MEM_SETUP = """
import torch, loupe_kernels as lk
g = torch.Generator().manual_seed(0)
Bq, Lq, Bk, Lk, D = {shape}
q = torch.randn(Bq, Lq, D, generator=g).requires_grad_()
k = torch.randn(Bk, Lk, D, generator=g).requires_grad_()
qm = torch.rand(Bq, Lq, generator=g) > 0.2
km = torch.rand(Bk, Lk, generator=g) > 0.1
w = torch.randn(Bq, Bk, generator=g)
q.grad = torch.zeros_like(q); k.grad = torch.zeros_like(k)
"""
# a small warm-up call first, so that one-time library start-up (BLAS/OpenMP buffers) is not counted
MEM_WARMUP = ("_q = torch.randn(4, 3, D, requires_grad=True); _k = torch.randn(5, 7, D, requires_grad=True)\n"
              "lk.token_region_similarity(_q, _k, backend={variant!r}).sum().backward()\n")
MEM_RUN = "(lk.token_region_similarity(q, k, qm, km, backend={variant!r}) * w).sum().backward()"


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("variant", ["reference", "cpu"])
def test_forward_backward(benchmark, peak_rss, shape, variant):
    if variant == "cpu" and not HAS_CPU:
        pytest.skip("cpu backend not built")
    q, k, qm, km, w = inputs(SHAPES[shape], requires_grad=True)
    benchmark.group = f"token_region_similarity / {shape_label(shape)} / forward+backward fp32"
    benchmark.extra_info["variant"] = variant
    if variant == "cpu":
        benchmark.extra_info["target"] = {"vs": "reference", "min_speedup": 2.0, "max_mem_ratio": 0.125}

    def step():
        out = lk.token_region_similarity(q, k, qm, km, backend=variant)
        torch.autograd.grad((out * w).sum(), (q, k))

    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info["peak_rss_mb"] = peak_rss(MEM_SETUP.format(shape=SHAPES[shape]) + MEM_WARMUP.format(variant=variant),
                                                   MEM_RUN.format(variant=variant))
