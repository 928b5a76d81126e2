"""token_region_similarity on a GPU (issue #3): cuda and triton against the reference and against
``torch.compile`` of the reference, forward+backward, bf16.

Shape: Bq = Bk = 1024, Lq = 32, Lk = 196, D = 256 (query masks with padding, all keys valid).
Targets: cuda and triton at least 3x faster than the reference and 2x faster than the compiled
reference. The conftest compares a variant with one other variant of its group, so each target
has its own group ("vs reference", "vs torch.compile"); the kernels run in both.

TFLOP/s: dense-equivalent FLOPs = 3 x 2*Bq*Bk*Lq*Lk*D (the score GEMM of the forward and the two
GEMMs of its backward, as the reference computes them; the fused backward gathers from the arg-max
instead), divided by the median time; ``matmul`` measures the card's bf16 GEMM rate (8192^3) for
comparison. Each timed call ends with ``torch.cuda.synchronize()``.
"""
from __future__ import annotations

import functools

import pytest
import torch

import loupe_kernels as lk
from loupe_kernels.token_region_similarity import token_region_similarity_reference

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (torch.cuda.is_available() is False)", allow_module_level=True)

BQ, BK, LQ, LK, D = 1024, 1024, 32, 196, 256
SHAPE = f"Bq={BQ} Lq={LQ} Bk={BK} Lk={LK} D={D}"
FLOPS = 3 * 2 * BQ * BK * LQ * LK * D


@functools.lru_cache(maxsize=1)
def inputs():
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(BQ, LQ, D, device="cuda", generator=g), dim=-1).bfloat16()
    k = torch.nn.functional.normalize(torch.randn(BK, LK, D, device="cuda", generator=g), dim=-1).bfloat16()
    qm = torch.rand(BQ, LQ, device="cuda", generator=g) > 0.25
    km = torch.ones(BK, LK, dtype=torch.bool, device="cuda")
    w = torch.randn(BQ, BK, device="cuda", generator=g).bfloat16()
    return q, k, qm, km, w


@functools.lru_cache(maxsize=1)
def compiled_reference():
    return torch.compile(token_region_similarity_reference)


def op(variant):
    if variant == "reference":
        return token_region_similarity_reference
    if variant == "compiled":
        return compiled_reference()
    return functools.partial(lk.token_region_similarity, backend=variant)


def fwd_bwd(fn):
    q0, k0, qm, km, w = inputs()
    q, k = q0.detach().requires_grad_(), k0.detach().requires_grad_()

    def run():
        q.grad = k.grad = None
        out = fn(q, k, qm, km)
        out.backward(w)
        torch.cuda.synchronize()
    return run


def _record(benchmark, variant):
    benchmark.extra_info["variant"] = variant
    benchmark.extra_info["device"] = torch.cuda.get_device_name(0)
    if benchmark.stats is not None:
        benchmark.extra_info["tflops"] = FLOPS / benchmark.stats.stats.median / 1e12


def _measure(benchmark, variant, group, target):
    if variant in ("cuda", "triton") and variant not in lk.available_backends():
        pytest.skip(f"backend {variant} unavailable")
    benchmark.group = group
    benchmark.extra_info["variant"] = variant
    if target is not None:
        benchmark.extra_info["target"] = target
    torch.cuda.empty_cache()
    try:
        run = fwd_bwd(op(variant))
        run()  # warm-up (compilation, allocator)
        benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    except torch.OutOfMemoryError as e:
        # the reference materialises Bq*Bk*Lq*Lk scores (13 GB in bf16, several copies with autograd)
        benchmark.extra_info["note"] = f"{variant}: out of memory ({str(e)[:120]})"
        torch.cuda.empty_cache()
        pytest.skip(f"{variant} ran out of memory on {torch.cuda.get_device_name(0)}")
    benchmark.extra_info["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    _record(benchmark, variant)


@pytest.mark.parametrize("variant", ["reference", "cuda", "triton"])
def test_vs_reference(benchmark, variant):
    _measure(benchmark, variant, f"token_region_similarity / {SHAPE} / fwd+bwd bf16 GPU / vs reference",
             None if variant == "reference" else {"vs": "reference", "min_speedup": 3.0})


@pytest.mark.parametrize("variant", ["compiled", "cuda", "triton"])
def test_vs_compiled(benchmark, variant):
    _measure(benchmark, variant, f"token_region_similarity / {SHAPE} / fwd+bwd bf16 GPU / vs torch.compile",
             None if variant == "compiled" else {"vs": "compiled", "min_speedup": 2.0})


def test_matmul_rate(benchmark):
    """The card's bf16 GEMM rate, for the TFLOP/s of the kernels above."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)

    def run():
        torch.mm(a, b)
        torch.cuda.synchronize()
    run()
    benchmark.group = "bf16 matmul 8192^3 (card rate)"
    benchmark.pedantic(run, rounds=10, iterations=1, warmup_rounds=2)
    benchmark.extra_info["variant"] = "matmul"
    benchmark.extra_info["device"] = torch.cuda.get_device_name(0)
    benchmark.extra_info["tflops"] = 2 * n ** 3 / benchmark.stats.stats.median / 1e12
