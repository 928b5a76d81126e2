"""Synthetic scene generation speed (the issue's target: 100k images in seconds on 2 cores)."""
from __future__ import annotations

import loupe.data as ld

N = 5000


def test_synthetic_generation(benchmark):
    ds = ld.build_dataset("synthetic", "train", seed=0, size=N)
    ds[0]
    benchmark.group = f"data / synthetic 64x64 scenes / {N} samples, one process"
    benchmark.extra_info["variant"] = "generate"

    def run():
        for i in range(N):
            ds[i]

    benchmark.pedantic(run, rounds=3, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: the scenes were generated once, nothing was timed
        return
    per = benchmark.stats.stats.median / N
    benchmark.extra_info["us_per_sample"] = per * 1e6
    benchmark.extra_info["note"] = f"{per * 1e6:.0f} us per sample, i.e. {per * 1e5:.1f} s per 100k on one core"
