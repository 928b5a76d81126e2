"""Index logic of the cuda backend's deterministic d_key (csrc/cuda/token_region_similarity.cu,
``dk_group_kernel`` + ``dk_sum_kernel``, issue 20 item 6), transcribed step by step in Python and checked
against the cpu backend's d_key. The CUDA kernels themselves are compiled only (no GPU here); this
checks the counting sort (32-lane steps, ``__match_any_sync`` peers, lowest peer advances the counter,
warp scan of the counts) and the fixed summation order, not the hardware."""
from __future__ import annotations

import pytest
import torch

import loupe_kernels  # noqa: F401  (registers torch.ops.loupe_kernels)


def group_transcription(entries: list[int], Lk: int) -> tuple[list[int], list[int]]:
    """dk_group_kernel for one key item: entries[t] = arg-max i of entry t (-1: none).
    Returns (seg_end[Lk], slots: ent list of entry indices t)."""
    N = len(entries)
    cnt = [0] * Lk
    for t0 in range(0, N, 32):  # pass 1
        lanes = [entries[t] if t < N else -1 for t in range(t0, t0 + 32)]
        for lane, i in enumerate(lanes):
            peers = [m for m, x in enumerate(lanes) if x == i]
            if i >= 0 and peers[0] == lane:  # the lowest peer adds popc(peers)
                cnt[i] += len(peers)
    carry = 0
    for i0 in range(0, Lk, 32):  # exclusive scan, 32 at a time
        v = [cnt[i] if i < Lk else 0 for i in range(i0, i0 + 32)]
        incl = [sum(v[: lane + 1]) for lane in range(32)]
        for lane in range(32):
            if i0 + lane < Lk:
                cnt[i0 + lane] = carry + incl[lane] - v[lane]
        carry += incl[31]
    ent = [None] * sum(1 for i in entries if i >= 0)
    for t0 in range(0, N, 32):  # pass 2
        lanes = [entries[t] if t < N else -1 for t in range(t0, t0 + 32)]
        slots = {}
        for lane, i in enumerate(lanes):  # every lane reads cnt[i] before any leader advances it
            if i >= 0:
                slots[lane] = cnt[i] + sum(1 for m in range(lane) if lanes[m] == i)
        for lane, i in enumerate(lanes):
            if i >= 0:
                assert ent[slots[lane]] is None, "two lanes wrote the same slot"
                ent[slots[lane]] = t0 + lane
                if all(lanes[m] != i for m in range(lane)):
                    cnt[i] += sum(1 for x in lanes if x == i)
    return cnt, ent


@pytest.mark.parametrize("pairwise", [True, False])
@pytest.mark.parametrize("shape", [(5, 9, 4, 70, 6), (3, 40, 3, 5, 4), (2, 33, 2, 1, 3)])
def test_grouped_dkey_matches_cpu(pairwise, shape):
    Bq, Lq, Bk, Lk, D = shape
    Bk = Bk if pairwise else Bq
    g = torch.Generator().manual_seed(Bq * 100 + Lk)
    q = torch.randint(-3, 4, (Bq, Lq, D), generator=g).double() / 2  # small integers: many arg-max ties
    k = torch.randint(-3, 4, (Bk, Lk, D), generator=g).double() / 2
    qm = torch.rand(Bq, Lq, generator=g) > 0.2
    km = torch.rand(Bk, Lk, generator=g) > 0.2
    km[0] = False  # a key item without valid tokens
    grad = torch.randn((Bq, Bk) if pairwise else (Bq,), generator=g, dtype=torch.float64)
    _, amax = torch.ops.loupe_kernels.trs_forward(q, k, qm, km, pairwise, "cpu")
    _, dk_cpu = torch.ops.loupe_kernels.trs_backward(grad, q, k, qm, amax, pairwise, "cpu")
    cnt_q = qm.sum(1).double()
    inv = torch.where(cnt_q > 0, 1 / cnt_q.clamp(min=1), torch.zeros_like(cnt_q))
    dk = torch.zeros_like(k)
    qrows = q.reshape(Bq * Lq, D)
    N = (Bq if pairwise else 1) * Lq
    for b in range(Bk):
        if pairwise:  # entry t = a * Lq + j -> amax[a, b, j]
            entries = [int(amax[t // Lq, b, t % Lq]) for t in range(N)]
        else:
            entries = [int(amax[b, t]) for t in range(N)]
        seg_end, ent = group_transcription(entries, Lk)
        e_off = 0 if pairwise else b * Lq
        # every valid entry exactly once; each segment holds its key row's entries in ascending t
        assert sorted(ent) == [t for t in range(N) if entries[t] >= 0]
        for i in range(Lk):
            start = seg_end[i - 1] if i > 0 else 0
            seg = ent[start:seg_end[i]]
            assert seg == sorted(seg) and all(entries[t] == i for t in seg)
            acc = torch.zeros(D, dtype=torch.float64)
            for t in seg:  # dk_sum_kernel: w(a, b) q[e] added in segment order
                e = e_off + t
                a = e // Lq
                w = (grad[a, b] if pairwise else grad[a]) * inv[a]
                if w != 0:
                    acc += w * qrows[e]
            dk[b, i] = acc
    torch.testing.assert_close(dk, dk_cpu, rtol=1e-12, atol=1e-12)
