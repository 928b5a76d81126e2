"""Triton kernels of token-region similarity (METHOD section 3); imported lazily.

``s(a, b) = mean over valid j of max over valid i of <q_aj, k_bi>``, with the contract of the cpu
backend: items without a valid query or key token score 0, arg-max ties go to the lowest key index,
and the saved int32 arg-max is -1 for invalid query tokens and for key items without a valid token
(the backward skips -1), exactly as ``csrc/cpu/token_region_similarity.cpp`` writes it.

Forward (``_fwd_kernel``), grid ``(cdiv(Bq, BLOCK_A), cdiv(Bk, ITEMS_B))`` (query blocks vary
fastest, so the programs that run together share the same key items in L2). A program owns the
``ROWS = BLOCK_A * LQ_PAD`` query rows of BLOCK_A query items (each item padded to LQ_PAD >= 16
rows, so row r belongs to item r // LQ_PAD) and ITEMS_B key items. The query tile ``[ROWS, D]`` is
loaded once when D fits one chunk (else D is walked in BLOCK_D chunks). For every key item it walks
the key tokens in tiles of BLOCK_K: ``S = tl.dot(Q, K_tile^T)`` in fp32 (fp64 for fp64 input),
invalid keys set to -inf, the tile max per row and its lowest index (``min`` of the indices equal
to the max), and a running max / arg-max updated only on a strictly larger tile max, so ties keep
the lowest index. The per-item sums over valid rows are formed in registers and divided by the count
of valid query tokens. Only ``[ROWS, BLOCK_K]`` scores exist at a time; the full
``[Bq, Bk, Lq, Lk]`` score tensor is never materialised. ``pairwise=False`` uses the same kernel
with BLOCK_A = 1 and the single key item b = a.

Backward from the saved arg-max, deterministic (no atomics; every output element is written by
exactly one program, reductions in a fixed order), with ``w(a, b) = g(a, b) / count_a``:

- ``d_query`` (``_dq_kernel``), grid ``(cdiv(Bq, BLOCK_A), cdiv(D, BLOCK_D))``: a program owns the
  rows of BLOCK_A query items and a D chunk, loops over key items b and gathers the arg-max key row
  ``k[b, amax[a, b, j]]`` of each query row, accumulating ``w * k`` in fp32.
- ``d_key``, default (``_dk_grouped_kernel``, issue 20 item 6): the arg-max entries are grouped by
  key row ``(b, i)`` first (:func:`group_by_key`: one stable sort of the keys ``b * Lk + i`` on the
  device, a counting sort in effect, and the segment offsets by ``searchsorted``); grid
  ``(Bk * Lk, cdiv(D, BLOCK_D))``, a program sums ``w(a, b) * q[a, j]`` over its segment in ascending
  ``(a, j)`` order. Work ``Bq * Bk * Lq * D`` multiply-adds (each arg-max entry once), against
  ``Bq * Bk * Lq * Lk * D`` for the dense path; temporaries about 24 bytes per arg-max entry.
- ``d_key``, dense (``_dk_kernel``, ``_Config.dk_grouped=False``), grid ``(Bk, cdiv(Lk, BLOCK_KR),
  cdiv(D, BLOCK_D))``: a program owns a tile of key rows of one key item and a D chunk, loops over
  blocks of query items and accumulates ``P @ Q_rows`` with ``tl.dot``, where
  ``P[i, (a, j)] = w(a, b) * [amax[a, b, j] == i]`` (the one-hot scatter as a matrix).
  Both round ``w`` to the input dtype (as the reference rounds ``g / count`` in that dtype) and
  accumulate in fp32.

Dtypes: fp16/bf16/fp32 accumulate in fp32; fp64 runs the same kernels in fp64 (a slow path on a
GPU, not a target). On a GPU fp32 dots run as three-pass TF32 (``tf32x3``, about fp32 accuracy on
tensor cores), or one-pass TF32 when ``torch.backends.cuda.matmul.allow_tf32`` is on. Under the
interpreter (``TRITON_INTERPRET=1``) tiles are upcast to the accumulator dtype before ``tl.dot``
(its bf16 dot is wrong) and the precision option is ignored; on a GPU the dot runs natively in
bf16/fp16. Block sizes come from ``_config`` (a fixed heuristic per dtype, no autotune).

Status: numerics run only in the Triton interpreter on CPU tensors; never run on a GPU. The real
compiler builds every kernel for sm_90 (an ahead-of-time compile in the tests checks shared memory
and register spills at the GPU target shape); speed is unmeasured.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import tf32_allowed, triton_acc, work_dtype

__all__ = ["forward", "backward"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _fwd_kernel(q_ptr, k_ptr, qm_ptr, km_ptr, cnt_ptr, out_ptr, amax_ptr,
                Bq, Bk, Lq, Lk, D, s_ga, s_gb,
                PAIRWISE: tl.constexpr, ITEMS_B: tl.constexpr, BLOCK_A: tl.constexpr,
                LQ_PAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                ONE_D: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    pid_a = tl.program_id(0)
    pid_b = tl.program_id(1)
    rows = tl.arange(0, ROWS)
    a = pid_a * BLOCK_A + rows // LQ_PAD  # query item of each row
    j = rows % LQ_PAD  # token of each row
    row_in = (a < Bq) & (j < Lq)
    qvalid = row_in & (tl.load(qm_ptr + a * Lq + j, mask=row_in, other=0) != 0)
    qrow = (a * Lq + j).to(tl.int64) * D
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    if ONE_D:
        dmask = offs_d < D
        qt = tl.load(q_ptr + qrow[:, None] + offs_d[None, :], mask=row_in[:, None] & dmask[None, :], other=0.0)
        if UPCAST:
            qt = qt.to(ACC)
    items = tl.arange(0, BLOCK_A)
    a_item = pid_a * BLOCK_A + items
    item_in = a_item < Bq
    sel = (rows[None, :] // LQ_PAD) == items[:, None]  # [BLOCK_A, ROWS]: row belongs to item
    cnt = tl.load(cnt_ptr + a_item, mask=item_in, other=1.0)
    if PAIRWISE:
        b_lo = pid_b * ITEMS_B
        b_hi = tl.minimum(b_lo + ITEMS_B, Bk)
    else:
        b_lo = pid_a
        b_hi = pid_a + 1
    for b in range(b_lo, b_hi):
        best = tl.full([ROWS], float("-inf"), ACC)
        arg = tl.full([ROWS], -1, tl.int32)
        for k0 in range(0, Lk, BLOCK_K):
            kk = k0 + offs_k
            kin = kk < Lk
            kvalid = kin & (tl.load(km_ptr + b * Lk + kk, mask=kin, other=0) != 0)
            krow = (b * Lk + kk).to(tl.int64) * D
            if ONE_D:
                kt = tl.load(k_ptr + krow[:, None] + offs_d[None, :], mask=kin[:, None] & dmask[None, :],
                             other=0.0)
                if UPCAST:
                    kt = kt.to(ACC)
                s = tl.dot(qt, tl.trans(kt), input_precision=PREC, out_dtype=ACC)
            else:
                s = tl.zeros([ROWS, BLOCK_K], ACC)
                for d0 in range(0, D, BLOCK_D):
                    dd = d0 + offs_d
                    dm = dd < D
                    qc = tl.load(q_ptr + qrow[:, None] + dd[None, :], mask=row_in[:, None] & dm[None, :], other=0.0)
                    kc = tl.load(k_ptr + krow[:, None] + dd[None, :], mask=kin[:, None] & dm[None, :], other=0.0)
                    if UPCAST:
                        qc = qc.to(ACC)
                        kc = kc.to(ACC)
                    s = tl.dot(qc, tl.trans(kc), s, input_precision=PREC, out_dtype=ACC)
            s = tl.where(kvalid[None, :], s, float("-inf"))
            tmax = tl.max(s, axis=1)
            targ = tl.min(tl.where(s == tmax[:, None], kk[None, :], 2147483647), axis=1)
            better = tmax > best  # strict: an equal max in a later tile keeps the lower index
            best = tl.where(better, tmax, best)
            arg = tl.where(better, targ, arg)
        keep = qvalid & (arg >= 0)  # arg < 0: the key item has no valid token
        arg = tl.where(keep, arg, -1)
        contrib = tl.where(keep, best, 0.0)
        total = tl.sum(tl.where(sel, contrib[None, :], 0.0), axis=1)
        pair = a.to(tl.int64) * s_ga + b * s_gb
        tl.store(amax_ptr + pair * Lq + j, arg, mask=row_in)
        pair_item = a_item.to(tl.int64) * s_ga + b * s_gb
        tl.store(out_ptr + pair_item, (total / cnt).to(out_ptr.dtype.element_ty), mask=item_in)


@triton.jit
def _partners(item, n, PAIRWISE: tl.constexpr):
    """The items [lo, hi) of the other side paired with ``item``: all ``n`` for all pairs, else itself."""
    if PAIRWISE:
        lo = 0
        hi = n
    else:
        lo = item
        hi = item + 1
    return lo, hi


@triton.jit
def _dq_kernel(g_ptr, k_ptr, cnt_ptr, amax_ptr, dq_ptr, Bq, Bk, Lq, Lk, D, s_ga, s_gb,
               PAIRWISE: tl.constexpr, BLOCK_A: tl.constexpr, LQ_PAD: tl.constexpr, ROWS: tl.constexpr,
               BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    pid_a = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = tl.arange(0, ROWS)
    a = pid_a * BLOCK_A + rows // LQ_PAD
    j = rows % LQ_PAD
    row_in = (a < Bq) & (j < Lq)
    cnt = tl.load(cnt_ptr + a, mask=row_in, other=1.0)
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_in = dd < D
    acc = tl.zeros([ROWS, BLOCK_D], ACC)
    b_lo, b_hi = _partners(pid_a, Bk, PAIRWISE)
    for b in range(b_lo, b_hi):
        pair = a.to(tl.int64) * s_ga + b * s_gb
        idx = tl.load(amax_ptr + pair * Lq + j, mask=row_in, other=-1)
        ok = idx >= 0
        w = tl.load(g_ptr + pair, mask=ok, other=0.0).to(ACC) / cnt
        krow = (b * Lk + idx).to(tl.int64) * D
        kv = tl.load(k_ptr + krow[:, None] + dd[None, :], mask=ok[:, None] & d_in[None, :], other=0.0)
        acc += w[:, None] * kv.to(ACC)
    qrow = (a * Lq + j).to(tl.int64) * D
    tl.store(dq_ptr + qrow[:, None] + dd[None, :], acc.to(dq_ptr.dtype.element_ty),
             mask=row_in[:, None] & d_in[None, :])


@triton.jit
def _dk_kernel(g_ptr, q_ptr, cnt_ptr, amax_ptr, dk_ptr, Bq, Bk, Lq, Lk, D, s_ga, s_gb,
               PAIRWISE: tl.constexpr, BLOCK_A: tl.constexpr, LQ_PAD: tl.constexpr, COLS: tl.constexpr,
               BLOCK_KR: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr,
               PREC: tl.constexpr):
    b = tl.program_id(0)
    pid_i = tl.program_id(1)
    pid_d = tl.program_id(2)
    ii = pid_i * BLOCK_KR + tl.arange(0, BLOCK_KR)
    i_in = ii < Lk
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_in = dd < D
    cols = tl.arange(0, COLS)
    col_item = cols // LQ_PAD
    j = cols % LQ_PAD
    acc = tl.zeros([BLOCK_KR, BLOCK_D], ACC)
    a_lo, a_hi = _partners(b, Bq, PAIRWISE)
    for a0 in range(a_lo, a_hi, BLOCK_A):
        a = a0 + col_item
        col_in = (a < a_hi) & (j < Lq)
        pair = a.to(tl.int64) * s_ga + b * s_gb
        idx = tl.load(amax_ptr + pair * Lq + j, mask=col_in, other=-1)
        ok = idx >= 0
        cnt = tl.load(cnt_ptr + a, mask=ok, other=1.0)
        w = tl.load(g_ptr + pair, mask=ok, other=0.0).to(ACC) / cnt
        p = tl.where(idx[None, :] == ii[:, None], w[None, :], 0.0).to(q_ptr.dtype.element_ty)
        qrow = (a * Lq + j).to(tl.int64) * D
        qt = tl.load(q_ptr + qrow[:, None] + dd[None, :], mask=ok[:, None] & d_in[None, :], other=0.0)
        if UPCAST:
            p = p.to(ACC)
            qt = qt.to(ACC)
        acc = tl.dot(p, qt, acc, input_precision=PREC, out_dtype=ACC)
    krow = (b * Lk + ii).to(tl.int64) * D
    tl.store(dk_ptr + krow[:, None] + dd[None, :], acc.to(dk_ptr.dtype.element_ty),
             mask=i_in[:, None] & d_in[None, :])


@triton.jit
def _dk_grouped_kernel(g_ptr, q_ptr, cnt_ptr, order_ptr, start_ptr, dk_ptr, Bk, Lq, D,
                       PAIRWISE: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """d_key by key row: program (r = b * Lk + i, D chunk) sums ``w(a, b) * q[a, j]`` over its segment
    ``order[start[r]:start[r + 1]]`` of the arg-max entries grouped by key row (flat arg-max indices
    ``e = pair * Lq + j``, ascending: a fixed order, no atomics)."""
    r = tl.program_id(0)
    pid_d = tl.program_id(1)
    lo = tl.load(start_ptr + r)
    hi = tl.load(start_ptr + r + 1)
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_in = dd < D
    acc = tl.zeros([BLOCK_D], ACC)
    for e0 in range(lo, hi, BLOCK_E):
        ee = e0 + tl.arange(0, BLOCK_E)
        e_in = ee < hi
        e = tl.load(order_ptr + ee, mask=e_in, other=0)
        pair = e // Lq
        j = e % Lq
        if PAIRWISE:
            a = pair // Bk
        else:
            a = pair
        cnt = tl.load(cnt_ptr + a, mask=e_in, other=1.0)
        w = tl.load(g_ptr + pair, mask=e_in, other=0.0).to(ACC) / cnt
        w = w.to(q_ptr.dtype.element_ty).to(ACC)   # rounded as the dense path and the reference round it
        qrow = (a * Lq + j).to(tl.int64) * D
        qt = tl.load(q_ptr + qrow[:, None] + dd[None, :], mask=e_in[:, None] & d_in[None, :], other=0.0)
        acc += tl.sum(w[:, None] * qt.to(ACC), axis=0)
    tl.store(dk_ptr + r.to(tl.int64) * D + dd, acc.to(dk_ptr.dtype.element_ty), mask=d_in)


# --------------------------------------------------------------------------------------------
# launch configuration
# --------------------------------------------------------------------------------------------
def _np2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


@dataclass(frozen=True)
class _Config:
    lq_pad: int
    fwd_block_a: int
    items_b: int
    block_k: int
    fwd_block_d: int
    one_d: bool
    fwd_warps: int
    dq_block_a: int
    dq_block_d: int
    dk_block_a: int
    dk_block_kr: int
    dk_block_d: int
    bwd_warps: int
    dk_grouped: bool = True      # d_key by key row over the grouped arg-max (else the dense one-hot dot)
    dkg_block_e: int = 32
    dkg_block_d: int = 128


def _config(Bq: int, Bk: int, Lq: int, Lk: int, D: int, pairwise: bool, itemsize: int = 2) -> _Config:
    """Block sizes (all >= 16 where they enter tl.dot) from a fixed heuristic aimed at the GPU target
    (Lq=32, Lk=196, D=256, bf16): 128 query rows per forward program, the whole D in one chunk while
    the query tile stays within 64 KiB (else chunks of 128), key tiles of 64. fp32/fp64 (``itemsize`` 4/8) take narrower D
    chunks so that shared memory and registers fit sm_90. Checked by an ahead-of-time compile for
    sm_90 (no spills and shared memory within limits at the target shape, all four dtypes); never
    timed on a GPU. The interpreter prefers few programs, so it takes more key items per program."""
    wide = max(1, itemsize // 2)  # 1 for fp16/bf16, 2 for fp32, 4 for fp64
    lq_pad = _np2(Lq)
    d_pad = _np2(D)
    rows_target = 128 if itemsize <= 2 else 64  # fp32 runs three TF32 dots (tf32x3): fewer rows
    fwd_block_a = max(1, min(rows_target // lq_pad, triton.next_power_of_2(max(Bq, 1)))) if pairwise else 1
    rows = fwd_block_a * lq_pad
    block_k = min(64, _np2(Lk))
    if itemsize <= 2:
        max_block_d = 256 if rows <= 128 else 64
    else:
        max_block_d = 64 if itemsize == 4 else 32
    one_d = d_pad <= max_block_d  # the query tile is loaded once and kept for every key tile
    # Walking D in chunks, both the query and the key chunk are pipelined (3 stages on sm_90): a 16-bit
    # chunk of 256 would ask for 3 * (128 + 64) * 256 * 2 = 294,912 B of shared memory, above the H100's
    # 232,448 B per block (issue 20), so 16-bit chunks are 128 wide when D > 256 (147,456 B at 128 rows).
    loop_block_d = min(max_block_d, 128)
    fwd_block_d = min(d_pad, max_block_d if one_d else loop_block_d)
    if not pairwise:
        items_b = 1
    elif _INTERPRET:
        items_b = max(1, min(Bk, 64))
    else:
        items_b = max(1, min(Bk, 8))
    fwd_warps = 8 if rows * block_k >= 128 * 64 or itemsize > 2 else 4
    dq_block_a = fwd_block_a
    dq_block_d = max(16, min(d_pad, 8192 // rows // wide))
    dk_block_a = max(1, min(64 // lq_pad, triton.next_power_of_2(max(Bq, 1)))) if pairwise else 1
    dk_block_kr = min(_np2(Lk), 128)
    dk_block_d = max(16, min(d_pad, 128, 16384 // (dk_block_a * lq_pad)) // wide)
    dkg_block_e = 128 if _INTERPRET else 32
    dkg_block_d = max(16, min(d_pad, 256 if _INTERPRET else 128))
    return _Config(lq_pad, fwd_block_a, items_b, block_k, fwd_block_d, one_d, fwd_warps,
                   dq_block_a, dq_block_d, dk_block_a, dk_block_kr, dk_block_d, 8,
                   True, dkg_block_e, dkg_block_d)


def group_by_key(argmax: torch.Tensor, pairwise: bool, Bk: int, Lk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The arg-max entries grouped by key row (a counting sort, as one stable sort on the device):
    ``order`` (int64) lists the flat indices ``e = pair * Lq + j`` of valid entries (arg-max >= 0)
    by key row ``b * Lk + i`` and, within a row, ascending; ``start [Bk * Lk + 1]`` (int64) are the
    segment offsets. Deterministic; no host sync. Temporaries: about 24 bytes per arg-max entry."""
    Lq = argmax.shape[-1]
    flat = argmax.reshape(-1)
    e = torch.arange(flat.numel(), device=flat.device)
    b = (e // Lq) % Bk if pairwise else e // Lq
    key = torch.where(flat >= 0, b * Lk + flat, Bk * Lk)   # invalid entries after every row
    skey, order = torch.sort(key, stable=True)
    start = torch.searchsorted(skey, torch.arange(Bk * Lk + 1, device=flat.device))
    return order, start


def _precision(dt: torch.dtype) -> str:
    """fp32: three-pass TF32 on tensor cores (about fp32 accuracy), or plain TF32 when PyTorch allows
    TF32 matmuls; fp16/bf16 ignore it; fp64 needs IEEE."""
    if dt == torch.float32:
        return "tf32" if tf32_allowed() else "tf32x3"
    return "ieee"


def _counts(qm: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """Number of valid query tokens per item, at least 1 (an empty item sums to 0 anyway)."""
    return qm.sum(dim=1).clamp(min=1).to(work_dtype(dt))


def _strides(pairwise: bool, Bk: int) -> tuple[int, int]:
    # pair (a, b) -> flat index a * s_ga + b * s_gb into out [Bq, Bk] or [B] (where b == a)
    return (Bk, 1) if pairwise else (1, 0)


def _on_device(t: torch.Tensor):
    """Launch on the tensor's GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _as_u8(mask: torch.Tensor) -> torch.Tensor:
    return mask.contiguous().view(torch.uint8)


# --------------------------------------------------------------------------------------------
# entry points called by loupe_kernels.token_region_similarity
# --------------------------------------------------------------------------------------------
def forward(query: torch.Tensor, key: torch.Tensor, qmask: torch.Tensor, kmask: torch.Tensor,
            pairwise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores ``[Bq, Bk]`` or ``[B]`` in the input dtype, int32 arg-max ``[Bq, Bk, Lq]`` or ``[B, Lq]``)."""
    acc = triton_acc(query.dtype, "token_region_similarity (triton): query")
    query, key = query.contiguous(), key.contiguous()
    Bq, Lq, D = query.shape
    Bk, Lk = key.shape[0], key.shape[1]
    out_shape = (Bq, Bk) if pairwise else (Bq,)
    out = torch.empty(out_shape, dtype=query.dtype, device=query.device)
    amax = torch.empty((*out_shape, Lq), dtype=torch.int32, device=query.device)
    if out.numel() == 0:
        return out, amax
    cfg = _config(Bq, Bk, Lq, Lk, D, pairwise, query.element_size())
    rows = cfg.fwd_block_a * cfg.lq_pad
    s_ga, s_gb = _strides(pairwise, Bk)
    grid = (triton.cdiv(Bq, cfg.fwd_block_a), triton.cdiv(Bk, cfg.items_b) if pairwise else 1)
    with _on_device(query):
        _fwd_kernel[grid](query, key, _as_u8(qmask), _as_u8(kmask), _counts(qmask, query.dtype), out, amax,
                          Bq, Bk, Lq, Lk, D, s_ga, s_gb,
                          PAIRWISE=pairwise, ITEMS_B=cfg.items_b, BLOCK_A=cfg.fwd_block_a, LQ_PAD=cfg.lq_pad,
                          ROWS=rows, BLOCK_K=cfg.block_k, BLOCK_D=cfg.fwd_block_d, ONE_D=cfg.one_d,
                          ACC=acc, UPCAST=_INTERPRET, PREC=_precision(query.dtype),
                          num_warps=cfg.fwd_warps)
    return out, amax


def backward(grad: torch.Tensor, query: torch.Tensor, key: torch.Tensor, qmask: torch.Tensor,
             argmax: torch.Tensor, pairwise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_query, d_key) in the input dtype, from the arg-max saved by :func:`forward`."""
    acc = triton_acc(query.dtype, "token_region_similarity (triton): query")
    query, key = query.contiguous(), key.contiguous()
    grad, argmax = grad.contiguous(), argmax.contiguous()
    if argmax.dtype != torch.int32:
        raise TypeError(f"token_region_similarity (triton): argmax must be int32, got {argmax.dtype}")
    Bq, Lq, D = query.shape
    Bk, Lk = key.shape[0], key.shape[1]
    dq = torch.empty_like(query)
    dk = torch.empty_like(key)
    if dq.numel() == 0 and dk.numel() == 0:
        return dq, dk
    cfg = _config(Bq, Bk, Lq, Lk, D, pairwise, query.element_size())
    s_ga, s_gb = _strides(pairwise, Bk)
    cnt = _counts(qmask, query.dtype)
    prec = _precision(query.dtype)
    with _on_device(query):
        if dq.numel():
            if Bk == 0:
                dq.zero_()
            else:
                grid = (triton.cdiv(Bq, cfg.dq_block_a), triton.cdiv(D, cfg.dq_block_d))
                _dq_kernel[grid](grad, key, cnt, argmax, dq, Bq, Bk, Lq, Lk, D, s_ga, s_gb,
                                 PAIRWISE=pairwise, BLOCK_A=cfg.dq_block_a, LQ_PAD=cfg.lq_pad,
                                 ROWS=cfg.dq_block_a * cfg.lq_pad, BLOCK_D=cfg.dq_block_d, ACC=acc,
                                 num_warps=cfg.bwd_warps)
        if dk.numel():
            if Bq == 0:
                dk.zero_()
            elif cfg.dk_grouped:
                order, start = group_by_key(argmax, pairwise, Bk, Lk)
                grid = (Bk * Lk, triton.cdiv(D, cfg.dkg_block_d))
                _dk_grouped_kernel[grid](grad, query, cnt, order, start, dk, Bk, Lq, D,
                                         PAIRWISE=pairwise, BLOCK_E=cfg.dkg_block_e, BLOCK_D=cfg.dkg_block_d,
                                         ACC=acc, num_warps=4)
            else:
                grid = (Bk, triton.cdiv(Lk, cfg.dk_block_kr), triton.cdiv(D, cfg.dk_block_d))
                _dk_kernel[grid](grad, query, cnt, argmax, dk, Bq, Bk, Lq, Lk, D, s_ga, s_gb,
                                 PAIRWISE=pairwise, BLOCK_A=cfg.dk_block_a, LQ_PAD=cfg.lq_pad,
                                 COLS=cfg.dk_block_a * cfg.lq_pad, BLOCK_KR=cfg.dk_block_kr,
                                 BLOCK_D=cfg.dk_block_d, ACC=acc, UPCAST=_INTERPRET, PREC=prec,
                                 num_warps=cfg.bwd_warps)
    return dq, dk
