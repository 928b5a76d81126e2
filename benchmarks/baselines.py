"""Baselines of the benchmarks (not part of loupe_kernels): what the fused kernels are measured against.

- :func:`draw_coalitions_torch`: coalitions with the pinned draw's distribution from torch's RNG.
- :func:`shapley_maxsim_naive`: the naive path, a masked copy of the key features per coalition and
  the value recomputed from the features for each of the s + 2 terms.
- :func:`shapley_maxsim_vectorised`: coalitions from torch's RNG, each of the s + 2 terms by
  ``torch.where(mask, sim, -inf).amax(-1)`` (``loupe_kernels.testing``), then mean and stderr.
- :class:`CacheResidentGemm`: the FLOPs of the similarity forward as GEMMs on small output tiles that
  stay in cache (one worker thread per intra-op thread, each a sequential BLAS GEMM per tile into
  its own reused buffer): the GEMM rate the fused forward is measured against.
- :func:`load_cpu_extension`: an earlier build of ``loupe_kernels._cpu`` (a ``.so`` path), loaded
  under another module name, so a benchmark can time the old and the new kernels in one run.

Imported by the benchmarks (``benchmarks/`` is put on ``sys.path`` by ``benchmarks/conftest.py``) and
by ``tests/kernels/test_shapley.py`` (by path), which checks them against the reference.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor

import torch

from loupe_kernels.testing import maxsim_values, sample_stats, shapley_from_coalitions

__all__ = ["draw_coalitions_torch", "shapley_maxsim_naive", "shapley_maxsim_vectorised", "CacheResidentGemm",
           "load_cpu_extension"]


def _out_dtype(dt: torch.dtype) -> torch.dtype:
    return torch.float64 if dt == torch.float64 else torch.float32


def draw_coalitions_torch(subsets: torch.Tensor, player_mask: torch.Tensor | None, num_samples: int,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """Same distribution as the pinned draw, from torch's RNG (size uniform, then a random sort)."""
    G, M, P = subsets.shape
    pm = torch.ones((G, P), dtype=torch.bool, device=subsets.device) if player_mask is None else player_mask
    pool = pm[:, None, :] & ~subsets
    nprime = pool.sum(-1) + 1
    u = torch.rand((G, M, num_samples), generator=generator, device=subsets.device)
    r = (u * nprime[..., None]).long().clamp(max=(nprime - 1)[..., None])
    keys = torch.rand((G, M, num_samples, P), generator=generator, device=subsets.device)
    keys = keys.masked_fill(~pool[:, :, None, :], 2.0)
    ranks = keys.argsort(-1).argsort(-1)
    return ranks < r[..., None]


def shapley_maxsim_naive(query: torch.Tensor, keys: torch.Tensor, subsets: torch.Tensor,
                         coalitions: torch.Tensor, query_mask: torch.Tensor | None = None):
    """Naive path: per coalition a masked copy of the key features, the value recomputed from the
    features for each of the s + 2 terms. ``query [G, Lq, D]``, ``keys [G, n, D]``."""
    G, M, K, n = coalitions.shape
    out = torch.empty((G, M, K), dtype=query.dtype)

    def v(g: int, mask: torch.Tensor) -> torch.Tensor:
        x = keys[g][mask]                                  # masked copy of the features
        if x.shape[0] == 0:
            return query.new_zeros(())
        q = query[g] if query_mask is None else query[g][query_mask[g]]
        if q.shape[0] == 0:
            return query.new_zeros(())
        return (q @ x.T).amax(-1).mean()

    for g in range(G):
        for m in range(M):
            S = subsets[g, m]
            members = S.nonzero().flatten().tolist()
            for k in range(K):
                C = coalitions[g, m, k]
                total = v(g, C | S) + (len(members) - 1) * v(g, C)
                for i in members:
                    one = C.clone()
                    one[i] = True
                    total = total - v(g, one)
                out[g, m, k] = total
    return sample_stats(out, _out_dtype(query.dtype))


def shapley_maxsim_vectorised(sim: torch.Tensor, subsets: torch.Tensor, num_samples: int,
                              generator: torch.Generator | None = None, *, chunk_elems: int = 1 << 24,
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain vectorised path of the max-sim game (all query tokens valid): torch-RNG coalitions,
    every term a separate masked max, reduced in float32."""
    G, Lq, _ = sim.shape
    qm = torch.ones(G, Lq, dtype=torch.bool, device=sim.device)
    C = draw_coalitions_torch(subsets, None, num_samples, generator)
    samples, _ = shapley_from_coalitions(lambda m: maxsim_values(sim, qm, m, False), subsets, C,
                                         chunk_elems=chunk_elems, row_elems=Lq)
    return sample_stats(samples, torch.float32)


class CacheResidentGemm:
    """``a [R, D] @ b[C, D].T`` computed tile by tile into small reused buffers, never as one output.

    The rows are split evenly over ``threads`` Python worker threads (torch releases the GIL in a
    GEMM); each walks its row blocks of ``row_block`` rows and, for each, the column blocks of
    ``col_block`` columns, with one sequential BLAS call per ``[row_block, col_block]`` tile into its
    own buffer (BLAS is set to one thread during the call, as inside an ``at::parallel_for`` region).
    With the default tiles the output tile is 512 KiB (fp32), the row panel ``row_block * D`` and the
    packed column panel stay in L2: the rate of the GEMM on cache-resident tiles, without the cost
    of writing (and faulting in) a 64-512 MB output. The results are discarded; only the rate counts.
    """

    def __init__(self, a: torch.Tensor, b: torch.Tensor, *, row_block: int = 256, col_block: int = 512,
                 threads: int | None = None) -> None:
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
            raise ValueError(f"CacheResidentGemm: a [R, D] and b [C, D] needed, got {list(a.shape)} and {list(b.shape)}")
        self.a, self.b = a.contiguous(), b.contiguous()
        self.threads = max(1, threads or torch.get_num_threads())
        self.row_block, self.col_block = row_block, col_block
        R = a.shape[0]
        per = -(-R // self.threads)
        self.ranges = [(t * per, min(R, (t + 1) * per)) for t in range(self.threads) if t * per < R]
        self.bufs = [torch.empty(min(row_block, R), min(col_block, b.shape[0]), dtype=a.dtype)
                     for _ in self.ranges]
        self.pool = ThreadPoolExecutor(len(self.ranges))

    @property
    def flops(self) -> int:
        return 2 * self.a.shape[0] * self.b.shape[0] * self.a.shape[1]

    def _work(self, t: int) -> None:
        # OpenMP's thread count is per calling thread: a fresh worker would start a team of its own
        torch.set_num_threads(1)
        lo, hi = self.ranges[t]
        buf = self.bufs[t]
        C = self.b.shape[0]
        for r0 in range(lo, hi, self.row_block):
            r1 = min(hi, r0 + self.row_block)
            at = self.a[r0:r1]
            for c0 in range(0, C, self.col_block):
                c1 = min(C, c0 + self.col_block)
                out = buf if (r1 - r0, c1 - c0) == tuple(buf.shape) else buf.view(-1)[:(r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
                torch.mm(at, self.b[c0:c1].t(), out=out)

    def __call__(self) -> None:
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            list(self.pool.map(self._work, range(len(self.ranges))))
        finally:
            torch.set_num_threads(n)

    def close(self) -> None:
        self.pool.shutdown()


def load_cpu_extension(path: str | None):
    """Load a ``loupe_kernels._cpu`` build from ``path`` as a separate module (None, or a missing
    file: None). The module keeps its own name (``loupe_before._cpu``), so the installed extension
    is untouched; the functions take the same arguments as those in ``csrc/bind_cpu.cpp`` of the
    build's commit."""
    if not path or not os.path.exists(path):
        return None
    name = "loupe_before._cpu"
    loader = importlib.machinery.ExtensionFileLoader(name, path)
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod
