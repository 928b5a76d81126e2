"""shapley_interaction on a GPU: the cuda and triton kernels against the vectorised PyTorch path
and against the compute floor (issue #4).

Shape: G=1024 games, n=196 players, Lq=32 query tokens, (D=256 only to build the similarity), M=16
subsets of size s=3, K=64 samples, bf16 similarity given; coalition drawing inside the timed region on
every side. Each timed call ends with ``torch.cuda.synchronize()``.

Variants (group ``shapley_interaction / ... / bf16 / GPU``):
- ``vectorised``: coalitions from torch's RNG (``baselines.draw_coalitions_torch``), each of the s + 2 terms by
  ``torch.where(mask, sim, -inf).amax(-1)`` then mean (``baselines.shapley_maxsim_vectorised``, large chunks).
- ``triton``, ``cuda``: the fused kernels; ``extra_info["target"]`` compares them with ``vectorised``.
- ``floor``: a register-only chain of float32 maxima (inline PTX ``max.f32``, so the compiler cannot fold
  it) doing exactly the fused algorithm's number of compare operations, i.e. that count at the card's
  measured max rate. Count: one masked max per sample over the drawn coalition, E|C| = (n - s) / 2
  players, plus s + 1 element-wise maxima for v(C u {i}) and v(C u S), each over Lq tokens:
  ``G * M * K * Lq * ((n - s) / 2 + s + 1)`` = 3.37e9. The dense count of the vectorised path,
  ``G * M * K * (s + 2) * Lq * n`` = 3.29e10, is recorded too. Kernels and ``vectorised`` record
  ``floor_ms`` and ``x_floor`` (their median / the floor time) in ``extra_info``.
"""
from __future__ import annotations

import functools
import statistics

import pytest
import torch

import loupe_kernels as lk

from baselines import shapley_maxsim_vectorised

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (torch.cuda.is_available() is False)", allow_module_level=True)

G, N, LQ, D, M, S, K = 1024, 196, 32, 256, 16, 3, 64
GROUP = f"shapley_interaction / G={G} n={N} Lq={LQ} D={D} M={M} s={S} K={K} / bf16 / GPU"
N_CMP_FUSED = G * M * K * LQ * ((N - S) / 2 + S + 1)
N_CMP_DENSE = G * M * K * (S + 2) * LQ * N


@functools.lru_cache(maxsize=1)
def inputs():
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(G, LQ, D, device="cuda", generator=gen), dim=-1)
    x = torch.nn.functional.normalize(torch.randn(G, N, D, device="cuda", generator=gen), dim=-1)
    sim = torch.einsum("gjd,gid->gji", q, x).to(torch.bfloat16).contiguous()
    pick = torch.rand(G, M, N, device="cuda", generator=gen).argsort(-1)[..., :S]
    subsets = torch.zeros(G, M, N, dtype=torch.bool, device="cuda").scatter_(-1, pick, True)
    return sim, subsets


# ------------------------------------------------------------------------------------------------
# the floor: float32 maxima at the card's rate
# ------------------------------------------------------------------------------------------------
_FLOOR_BLOCK, _FLOOR_WARPS = 4096, 8


@functools.lru_cache(maxsize=1)
def _floor_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _fmax(a, b):
        return tl.inline_asm_elementwise("max.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)

    @triton.jit
    def max_chain(x_ptr, out_ptr, R, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        a = tl.load(x_ptr + offs)
        b = a + 1.0
        c = a - 1.0
        d = a * 0.5
        for _ in range(R):          # 4 dependent-chain maxima per element and iteration
            a = _fmax(a, b)
            b = _fmax(b, c)
            c = _fmax(c, d)
            d = _fmax(d, a)
        tl.store(out_ptr + offs, a + b + c + d)

    return max_chain


def _floor_launch():
    """A launch doing N_CMP_FUSED float32 maxima (rounded to whole iterations); returns (fn, ops)."""
    kern = _floor_kernel()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    programs = 8 * sms
    elems = programs * _FLOOR_BLOCK
    R = max(1, round(N_CMP_FUSED / (4 * elems)))
    x = torch.randn(elems, device="cuda")
    out = torch.empty_like(x)

    def fn():
        kern[(programs,)](x, out, R, BLOCK=_FLOOR_BLOCK, num_warps=_FLOOR_WARPS)
        torch.cuda.synchronize()
    return fn, 4 * elems * R


@functools.lru_cache(maxsize=1)
def floor_seconds() -> tuple[float, float]:
    """(seconds for N_CMP_FUSED maxima, measured maxima per second), median of 7 timed runs."""
    fn, ops = _floor_launch()
    fn()
    times = []
    for _ in range(7):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    t = statistics.median(times)
    rate = ops / t
    return N_CMP_FUSED / rate, rate


def _record_floor(benchmark):
    if benchmark.stats is None:      # --benchmark-disable: nothing was timed
        return
    try:
        floor, rate = floor_seconds()
    except Exception as e:  # noqa: BLE001 - the floor is informative; never fail the timing for it
        benchmark.extra_info["floor_error"] = repr(e)[:200]
        return
    med = benchmark.stats.stats.median
    benchmark.extra_info["floor_ms"] = floor * 1e3
    benchmark.extra_info["x_floor"] = med / floor
    benchmark.extra_info["max_rate_gops"] = rate / 1e9
    benchmark.extra_info["dense_floor_ms"] = N_CMP_DENSE / rate * 1e3


# ------------------------------------------------------------------------------------------------
# the benchmark
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["floor", "vectorised", "triton", "cuda"])
def test_maxsim_gpu(benchmark, variant):
    if variant in ("cuda", "triton") and variant not in lk.available_backends():
        pytest.skip(f"{variant} backend unavailable: {lk.backend_status(variant).reason}")
    benchmark.group = GROUP
    benchmark.extra_info["variant"] = variant
    benchmark.extra_info["device"] = torch.cuda.get_device_name(0)
    benchmark.extra_info["n_cmp_fused"] = N_CMP_FUSED
    benchmark.extra_info["n_cmp_dense"] = N_CMP_DENSE
    if variant == "floor":
        fn, ops = _floor_launch()
        benchmark.extra_info["ops"] = ops
        benchmark.extra_info["note"] = ("floor = G*M*K*Lq*((n-s)/2+s+1) float32 maxima (fused count) at the "
                                        "card's rate, from a register-only chain of inline-PTX max.f32; "
                                        "x_floor in extra_info of the other variants")
        rounds, warmup = 10, 2
    elif variant == "vectorised":
        sim, subsets = inputs()
        gen = torch.Generator(device="cuda").manual_seed(1)

        def fn():
            out = shapley_maxsim_vectorised(sim, subsets, K, gen, chunk_elems=1 << 29)
            torch.cuda.synchronize()
            return out
        rounds, warmup = 3, 1
    else:
        sim, subsets = inputs()

        def fn():
            out = lk.shapley_interaction(sim, subsets, num_samples=K, seed=1, backend=variant)
            torch.cuda.synchronize()
            return out
        benchmark.extra_info["target"] = {"vs": "vectorised"}
        rounds, warmup = 10, 2
    with torch.no_grad():
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=warmup)
    if variant != "floor":
        _record_floor(benchmark)
