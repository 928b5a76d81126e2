"""token_region_similarity on the CPU: reference vs the C++ kernel, forward, backward, forward+backward.

Targets (fp32, 2-core CPU): cpu >= 2x faster than the reference for forward+backward with at most
1/8 of its extra peak memory; cpu forward >= 0.9x the rate of the same FLOPs as GEMMs on
cache-resident tiles (``gemm_tiled``, ``baselines.CacheResidentGemm``; issue 20; the earlier
baseline, one GEMM writing the whole 64-512 MB score matrix, is kept as ``gemm_one_output``);
cpu backward >= 2x the kernel before issue 20 (``cpu_before``: the ``.so`` named by the environment
variable ``LOUPE_BENCH_BEFORE_SO``, a build of an earlier commit; skipped when unset).
"""
from __future__ import annotations

import os

import pytest
import torch

import loupe_kernels as lk

from baselines import CacheResidentGemm, load_cpu_extension

SHAPES = {"A": (128, 16, 128, 64, 128), "B": (256, 32, 256, 64, 256)}  # Bq, Lq, Bk, Lk, D
HAS_CPU = "cpu" in lk.available_backends()
BEFORE = load_cpu_extension(os.environ.get("LOUPE_BENCH_BEFORE_SO"))


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


def _skip(variant):
    if variant.startswith("cpu") and not HAS_CPU:
        pytest.skip("cpu backend not built")
    if variant == "cpu_before" and BEFORE is None:
        pytest.skip("LOUPE_BENCH_BEFORE_SO not set (path of an earlier build of loupe_kernels._cpu)")


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("variant", ["reference", "cpu", "cpu_before", "gemm_tiled", "gemm_one_output"])
def test_forward(benchmark, shape, variant):
    _skip(variant)
    q, k, qm, km, _ = inputs(SHAPES[shape])
    benchmark.group = f"token_region_similarity / {shape_label(shape)} / forward fp32"
    benchmark.extra_info["variant"] = variant
    a, b = q.reshape(-1, q.shape[-1]), k.reshape(-1, k.shape[-1])
    gemm = None
    if variant == "gemm_one_output":
        fn = lambda: torch.mm(a, b.t())  # noqa: E731
    elif variant == "gemm_tiled":
        fn = gemm = CacheResidentGemm(a, b)
        benchmark.extra_info["note"] = (
            "gemm_tiled = the same FLOPs as fp32 GEMMs [256, D] @ [D, 512] into reused per-thread buffers "
            "(baselines.CacheResidentGemm); gemm_one_output = one [Bq*Lq, D] @ [D, Bk*Lk] GEMM")
    elif variant == "cpu_before":
        fn = lambda: BEFORE.trs_forward(q, k, qm, km, True)  # noqa: E731
    else:
        fn = lambda: lk.token_region_similarity(q, k, qm, km, backend=variant)  # noqa: E731
    if variant == "cpu":
        benchmark.extra_info["target"] = {"vs": "gemm_tiled", "min_speedup": 0.9}
    try:
        with torch.no_grad():
            benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)
    finally:
        if gemm is not None:
            gemm.close()


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("variant", ["reference", "cpu", "cpu_before"])
def test_backward(benchmark, shape, variant):
    """The backward alone, from the saved arg-max (cpu: the kernel behind the autograd Function;
    reference: autograd through the reference's retained graph)."""
    _skip(variant)
    q, k, qm, km, w = inputs(SHAPES[shape], requires_grad=variant == "reference")
    benchmark.group = f"token_region_similarity / {shape_label(shape)} / backward fp32"
    benchmark.extra_info["variant"] = variant
    if variant == "reference":
        out = lk.token_region_similarity(q, k, qm, km, backend="reference")
        fn = lambda: torch.autograd.grad(out, (q, k), w, retain_graph=True)  # noqa: E731
    else:
        _, amax = lk._backends.extension("cpu").trs_forward(q, k, qm, km, True)
        ext = BEFORE if variant == "cpu_before" else lk._backends.extension("cpu")
        fn = lambda: ext.trs_backward(w, q, k, qm, amax, True)  # noqa: E731
    if variant == "cpu":
        benchmark.extra_info["target"] = {"vs": "cpu_before", "min_speedup": 2.0}
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
