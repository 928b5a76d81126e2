"""Host emulation of the fp32 tensor-core arithmetic of the cuda similarity kernel (issue 20 item 1).

The kernel (csrc/cuda/token_region_similarity.cu, ``fwd_fast_kernel<float, ...>``) splits each fp32
value x into ``hi = tf32(x)`` and ``lo = tf32(x - hi)`` (``__float_to_tf32``: round to nearest, ties
away from zero, 10 mantissa bits kept) and accumulates ``hi.lo + lo.hi + hi.hi`` in fp32 on tensor
cores (3xTF32); with ``torch.backends.cuda.matmul.allow_tf32`` it runs ``hi.hi`` only. Products of
two TF32 values are exact in fp32 (11 + 11 significant bits), so an fp32 matmul of the rounded
operands emulates the tensor-core products; the accumulation order differs from the hardware's.
This justifies the default: 3xTF32 error at the fp32 level, one-pass TF32 error about 1000x larger.
Nothing here runs the CUDA kernel (no GPU on this machine).
"""
from __future__ import annotations

import pytest
import torch

U32 = torch.finfo(torch.float32).eps / 2  # unit roundoff of fp32, 2^-24


def round_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> nearest TF32 value (10 explicit mantissa bits), ties away from zero, as cvt.rna.tf32.f32."""
    assert x.dtype == torch.float32
    bits = x.view(torch.int32)
    return ((bits + 0x1000) & -0x2000).view(torch.float32)  # add half of the dropped 13 bits' ulp, clear them


def split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    hi = round_tf32(x)
    return hi, round_tf32(x - hi)  # x - hi is exact in fp32


def test_round_tf32_is_round_to_nearest_with_10_mantissa_bits():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(100_000, generator=g, dtype=torch.float64) * 2.0 ** torch.randint(-60, 60, (100_000,), generator=g))
    x = x.float()
    r = round_tf32(x)
    assert bool(((r.view(torch.int32) & 0x1FFF) == 0).all())  # only 10 mantissa bits left
    ulp = torch.ldexp(torch.ones_like(x, dtype=torch.float64), torch.frexp(x.double()).exponent - 11)
    err = (r.double() - x.double()).abs()
    assert bool((err <= ulp / 2).all())  # nearest: within half a TF32 ulp
    # ties go away from zero
    tie = torch.tensor([1.0 + 2.0 ** -11, -(1.0 + 2.0 ** -11), 1.0 + 3 * 2.0 ** -11], dtype=torch.float32)
    assert round_tf32(tie).tolist() == [1.0 + 2.0 ** -10, -(1.0 + 2.0 ** -10), 1.0 + 2 * 2.0 ** -10]


def test_split_product_error_is_bounded_per_term():
    """|hi_a hi_b + hi_a lo_b + lo_a hi_b - a b| <= 3 * 2^-22 |a b| for every product (fp64, exact):
    the dropped lo_a lo_b is <= 2^-22 |ab| and each rounding of lo costs <= 2^-11 |lo| <= 2^-22 |x|."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(200_000, generator=g).float()
    b = torch.randn(200_000, generator=g).float()
    ha, la = split(a)
    hb, lb = split(b)
    d = lambda t: t.double()  # noqa: E731
    approx = d(ha) * d(hb) + d(ha) * d(lb) + d(la) * d(hb)
    exact = d(a) * d(b)
    assert bool(((approx - exact).abs() <= 3 * 2.0 ** -22 * exact.abs()).all())


@pytest.mark.parametrize("D", [64, 256, 1024])
def test_3xtf32_dot_is_fp32_accurate_and_1xtf32_is_not(D):
    """Max normalised error |s - s64| / (|a| . |b|) over a 128 x 256 score tile: 3xTF32 within 2x the
    fp32 matmul's error (torch's own fp32 math on the same inputs); one-pass TF32 over 100x it."""
    g = torch.Generator().manual_seed(D)
    a = torch.randn(128, D, generator=g).float()
    b = torch.randn(256, D, generator=g).float()
    ref = a.double() @ b.double().T  # the fp32 inputs' exact dot products (to fp64 rounding)
    scale = a.double().abs() @ b.double().abs().T

    def err(s: torch.Tensor) -> float:
        return ((s.double() - ref).abs() / scale).max().item()

    ha, la = split(a)
    hb, lb = split(b)
    # one fp32 accumulator over the three partial products, as the kernel's mma_sync sequence
    s3 = torch.cat([ha, la, ha], dim=1) @ torch.cat([lb, hb, hb], dim=1).T
    s1 = ha @ hb.T
    e32, e3, e1 = err(a @ b.T), err(s3), err(s1)
    assert e32 <= 8 * D * U32  # sanity of the fp32 baseline (a loose textbook bound)
    assert e3 <= 2 * e32, (e3, e32)
    assert e1 >= 100 * e32, (e1, e32)


def test_quantized_inputs_are_exact_in_tf32():
    """The exact-tie tests of the cuda backend use m/4 (|m| <= 6): exact in TF32, so lo = 0 and both
    3xTF32 and one-pass TF32 reproduce the exact scores and arg-max ties."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randint(-6, 7, (10_000,), generator=g).float() / 4)
    hi, lo = split(x)
    assert torch.equal(hi, x) and bool((lo == 0).all())
