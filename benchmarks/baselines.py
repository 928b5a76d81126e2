"""Baselines of the benchmarks (not part of loupe_kernels): what the fused kernels are measured against.

- :func:`draw_coalitions_torch`: coalitions with the pinned draw's distribution from torch's RNG.
- :func:`shapley_maxsim_naive`: the naive path, a masked copy of the key features per coalition and
  the value recomputed from the features for each of the s + 2 terms.
- :func:`shapley_maxsim_vectorised`: coalitions from torch's RNG, each of the s + 2 terms by
  ``torch.where(mask, sim, -inf).amax(-1)`` (``loupe_kernels.testing``), then mean and stderr.

Imported by the benchmarks (``benchmarks/`` is put on ``sys.path`` by ``benchmarks/conftest.py``) and
by ``tests/kernels/test_shapley.py`` (by path), which checks them against the reference.
"""
from __future__ import annotations

import torch

from loupe_kernels.testing import maxsim_values, sample_stats, shapley_from_coalitions

__all__ = ["draw_coalitions_torch", "shapley_maxsim_naive", "shapley_maxsim_vectorised"]


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
