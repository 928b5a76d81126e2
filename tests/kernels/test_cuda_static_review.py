"""Host-side checks of the cuda similarity's pairwise fast forward kernel (``fwd_fast_kernel`` in
csrc/cuda/token_region_similarity.cu) that need no GPU.

1. WMMA rules on the real shared-memory layout: the launcher's plan and the kernel carve their dynamic
   shared memory with one function (``fast_offsets``), exposed to the host as ``loupe_trs_fast_layout``;
   a small host program compiled with nvcc prints it for every dtype, D = 1..1024 and three opt-in limits
   (H100, A100, 99 KiB parts). Checked: ``ldm`` a multiple of 16 bytes (4 floats / 8 halves), every
   fragment pointer the kernel forms 256-bit aligned, cp.async destinations 16-byte aligned, no tile
   overlapping the next, the allocation equal to what the kernel indexes, and the row stride 4 mod 8 in
   32-bit words (the 8 rows x 16 bytes of a fragment load phase hit 32 distinct banks).
2. An emulation of the kernel's block loop, transcribed statement by statement (cp.async groups and
   ``wait_group``, barriers, the double-buffered key and query chunks, the D loop with its remainder
   chunk, the key-major score tile, the row scan across key items and tiles), run on that layout with a
   race detector on every shared byte (a read needs the write visible before the last barrier; a write
   needs every earlier read before the last barrier) and the scores computed exactly (quantized inputs),
   compared with the exact arg-max (ties: lowest key index) and row maxima.
3. ``tf32_allowed`` (cuda and triton): torch's TF32 setting read without the RuntimeError the legacy flag raises once the
   new ``fp32_precision`` API was used.

It checks the index arithmetic and the synchronisation protocol as written, not the hardware: the kernel
itself has only been compiled here.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
NVCC = os.environ.get("NVCC") or shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
H100, A100, SM86 = 232448, 166912, 101376  # per-block opt-in shared memory, bytes
F32, F16, BF16 = 0, 2, 3                   # LoupeDtype codes (csrc/cuda/common.h)

needs_nvcc = pytest.mark.skipif(not os.path.exists(NVCC), reason="nvcc not found")

DRIVER = r"""
#include <cstdio>
#include <cstdlib>
#include "cuda/token_region_similarity.h"
int main(int argc, char** argv) {
  for (int a = 1; a < argc; ++a) {
    const int optin = atoi(argv[a]);
    for (int dt : {LOUPE_F32, LOUPE_F16, LOUPE_BF16, LOUPE_F64})
      for (int D = 1; D <= 1024; ++D) {
        LoupeTrsFastLayout l;
        const int ok = loupe_trs_fast_layout(dt, D, optin, &l);
        int dc = -1;
        const size_t bytes = loupe_trs_fast_smem_bytes(dt, D, optin, &dc);
        printf("%d %d %d %d %zu %d %d %d %d %d %d %d %d %zu %zu %zu %zu %zu %zu %zu %zu\n", optin, dt, D, ok, bytes, dc,
               l.d_chunk, l.ld, l.elem_bytes, l.vec, l.k_step, l.rows, l.keys, (size_t)l.ld_scores, l.q0, l.q1, l.k0,
               l.k1, l.scores, l.key_mask, l.bytes);
      }
  }
  return 0;
}
"""


@dataclass(frozen=True)
class Layout:
    dc: int
    ld: int
    elem: int
    vec: int
    kk: int
    rows: int
    keys: int
    lds: int
    q0: int
    q1: int
    k0: int
    k1: int
    s: int
    ms: int
    bytes: int


@functools.lru_cache(maxsize=None)
def layouts(tmp: str) -> dict[tuple[int, int, int], tuple[Layout | None, int, int]]:
    """(optin, dtype, D) -> (layout or None, loupe_trs_fast_smem_bytes, its d_chunk)."""
    src = Path(tmp) / "layout.cu"
    src.write_text(DRIVER)
    exe = Path(tmp) / "layout"
    # PTX only for the device code (no ptxas): the host plan is what runs here
    proc = subprocess.run([NVCC, "-std=c++17", f"-I{ROOT / 'csrc'}", "-gencode=arch=compute_90,code=compute_90",
                           str(src), str(ROOT / "csrc" / "cuda" / "token_region_similarity.cu"), "-o", str(exe)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = subprocess.run([str(exe), str(H100), str(A100), str(SM86)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    table = {}
    for line in out.stdout.splitlines():
        v = [int(x) for x in line.split()]
        optin, dt, D, ok, nbytes, dc = v[:6]
        table[optin, dt, D] = (Layout(*v[6:]) if ok else None, nbytes, dc)
    assert len(table) == 3 * 4 * 1024
    return table


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    return layouts(str(tmp_path_factory.mktemp("fast_layout")))


def _vec_ok(dt: int, D: int) -> bool:
    return dt != 1 and (D * {0: 4, 2: 2, 3: 2}[dt]) % 16 == 0


@needs_nvcc
def test_fast_layout_obeys_the_wmma_rules(table):
    """ldm a multiple of 16 bytes, fragment pointers 256-bit aligned, tiles disjoint and inside the launch's
    allocation, conflict-free row stride, for every (opt-in limit, dtype, D) the fast kernel takes."""
    taken = 0
    for (optin, dt, D), (lay, nbytes, dc) in table.items():
        if lay is None:
            assert nbytes == 0 and dc == 0, (optin, dt, D)
            continue
        taken += 1
        key = (optin, dt, D)
        assert _vec_ok(dt, D), key
        assert nbytes == lay.bytes <= optin and dc == lay.dc, key
        e, ld = lay.elem, lay.ld
        assert e == (4 if dt == F32 else 2) and lay.vec * e == 16 and lay.kk == (8 if dt == F32 else 16), key
        # WMMA: ldm in elements a multiple of 16 bytes (4 floats, 8 halves); the score tile too
        assert (ld * e) % 16 == 0 and (lay.lds * 4) % 16 == 0, key
        # 32-bit words per row = 4 mod 8: rows r = 0..7 start in distinct 4-bank groups
        assert (ld * e // 4) % 8 == 4, key
        nch = -(-D // lay.dc)
        stream_q = nch > 1
        assert (lay.q1 != lay.q0) == stream_q, key
        assert lay.dc == D or (lay.dc < D and lay.dc % lay.kk == 0), key
        # every chunk's width rounded up to the k-step fits the row (the zero-padded columns included)
        widths = {min(lay.dc, D - c * lay.dc) for c in range(nch)}
        assert all(-(-w // lay.kk) * lay.kk <= ld for w in widths), key
        # tiles in order and disjoint: [Qs0][Qs1][Ks0][Ks1][S][Ms], the last byte is the allocation's last
        qt, kt = lay.rows * ld * e, lay.keys * ld * e
        assert lay.q0 == 0 and lay.k0 == lay.q1 + qt and lay.k1 == lay.k0 + kt and lay.s == lay.k1 + kt, key
        assert lay.ms == lay.s + lay.keys * lay.lds * 4 and lay.bytes == lay.ms + lay.keys, key
        # fragment pointers (matrix_a rows warp*32 + mi*16, matrix_b rows ni*16, column kk; the store of
        # the score tile at key ni*16, row warp*32 + mi*16): 256-bit aligned from the 128-byte aligned base
        width = max(-(-w // lay.kk) * lay.kk for w in widths)
        for base in {lay.q0, lay.q1}:
            for warp in range(4):
                for mi in range(2):
                    for kk in range(0, width, lay.kk):
                        assert (base + ((warp * 32 + mi * 16) * ld + kk) * e) % 32 == 0, key
        for base in (lay.k0, lay.k1):
            for ni in range(4):
                for kk in range(0, width, lay.kk):
                    assert (base + (ni * 16 * ld + kk) * e) % 32 == 0, key
        for ni in range(4):
            for warp in range(4):
                for mi in range(2):
                    assert (lay.s + (ni * 16 * lay.lds + warp * 32 + mi * 16) * 4) % 32 == 0, key
    # every D that is a multiple of 16 bytes takes the fast kernel at the H100 and A100 limits
    for optin in (H100, A100):
        for dt in (F32, F16, BF16):
            assert all((table[optin, dt, D][0] is not None) == _vec_ok(dt, D) for D in range(1, 1025)), (optin, dt)
    assert taken > 0


# ---- emulation of fwd_fast_kernel's block loop ------------------------------------------------------

class RaceError(AssertionError):
    pass


class Smem:
    """Dynamic shared memory of one block: element values by byte offset, and per byte the epoch (barrier
    count) at which its last write became visible to its writer (inf: never written / in flight) and the
    epoch of its last read."""

    def __init__(self, nbytes: int):
        self.val = np.zeros(nbytes, dtype=np.float64)
        self.visible = np.full(nbytes, np.inf)
        self.last_read = np.full(nbytes, -1.0)
        self.epoch = 0
        self.open_group: list[np.ndarray] = []
        self.groups: list[list[np.ndarray]] = []  # committed, not yet waited for

    @staticmethod
    def _bytes(off: np.ndarray, size: int) -> np.ndarray:
        return (np.asarray(off, dtype=np.int64).reshape(-1, 1) + np.arange(size)).reshape(-1)

    def _check_write(self, b: np.ndarray, what: str):
        if len(b) and (b.min() < 0 or b.max() >= len(self.val)):
            raise RaceError(f"{what}: outside the allocation")
        if len(b) and self.last_read[b].max() >= self.epoch:
            raise RaceError(f"{what}: overwrites bytes read since the last barrier (write after read)")
        pending = [g for grp in self.groups + [self.open_group] for g in grp]
        if pending and np.isin(b, np.concatenate(pending)).any():
            raise RaceError(f"{what}: overwrites bytes of a cp.async still in flight")

    def store(self, off, vals, size: int, what: str):
        b = self._bytes(off, size)
        self._check_write(b, what)
        self.val[np.asarray(off, dtype=np.int64).reshape(-1)] = np.asarray(vals, dtype=np.float64).reshape(-1)
        self.visible[b] = self.epoch

    def cp_async(self, off, vals, size: int, what: str):
        b = self._bytes(off, size)
        self._check_write(b, what)
        self.val[np.asarray(off, dtype=np.int64).reshape(-1)] = np.asarray(vals, dtype=np.float64).reshape(-1)
        self.visible[b] = np.inf
        self.open_group.append(b)

    def commit(self):
        self.groups.append(self.open_group)
        self.open_group = []

    def wait(self, n: int):
        assert not self.open_group, "wait_group with uncommitted copies"
        keep = self.groups[len(self.groups) - n:] if n else []
        for grp in self.groups[:len(self.groups) - n]:
            for b in grp:
                self.visible[b] = self.epoch
        self.groups = keep

    def barrier(self):
        self.epoch += 1

    def load(self, off, size: int, what: str) -> np.ndarray:
        off = np.asarray(off, dtype=np.int64)
        b = self._bytes(off, size)
        if len(b) and (b.min() < 0 or b.max() >= len(self.val)):
            raise RaceError(f"{what}: outside the allocation")
        if len(b) and self.visible[b].max() >= self.epoch:
            raise RaceError(f"{what}: reads bytes not written and made visible before the last barrier")
        self.last_read[b] = self.epoch
        return self.val[off]


def emulate_block(q2, k2, qm, km, Bq, Bk, Lq, Lk, D, items, lay: Layout, bx, by, rowmax, amax, written):
    """fwd_fast_kernel for block (bx, by), statement by statement. q2 [Bq*Lq, D], k2 [Bk*Lk, D] float64."""
    R, K, ld, e, dc, kK, vec = lay.rows, lay.keys, lay.ld, lay.elem, lay.dc, lay.kk, lay.vec
    sm = Smem(lay.bytes)
    nch = -(-D // dc)
    stream_q = nch > 1
    Qs0, Qs1, Ks0, Ks1, S, Ms = lay.q0, lay.q1, lay.k0, lay.k1, lay.s, lay.ms
    rows = Bq * Lq
    row0 = bx * R
    b_begin = by * items
    b_end = min(Bk, b_begin + items)
    kr_begin, kr_end = b_begin * Lk, b_end * Lk
    ntiles = -(-(kr_end - kr_begin) // K)
    nsteps = ntiles * nch

    def load_tile(dst, src, r0, rend, nrows, c0, w, what):
        wv = -(-w // kK) * (kK // vec)
        ee = np.arange(nrows * wv)
        r, c = ee // wv, (ee % wv) * vec
        d = dst + (r * ld + c) * e
        live = (r0 + r < rend) & (c < w)
        elems = d[:, None] + np.arange(vec) * e
        if live.any():
            cols = c0 + c[live][:, None] + np.arange(vec)
            sm.cp_async(elems[live], src[(r0 + r[live])[:, None], cols], e, what)
        if (~live).any():
            sm.store(elems[~live], np.zeros((int((~live).sum()), vec)), e, what + " (zeros)")

    def load_step(s):
        t, c0 = s // nch, (s % nch) * dc
        w = min(dc, D - c0)
        load_tile(Ks1 if s & 1 else Ks0, k2, kr_begin + t * K, kr_end, K, c0, w, f"key tile, step {s}")
        if stream_q:
            load_tile(Qs1 if s & 1 else Qs0, q2, row0, rows, R, c0, w, f"query chunk, step {s}")

    if not stream_q:
        load_tile(Qs0, q2, row0, rows, R, 0, D, "resident query tile")
    load_step(0)
    sm.commit()

    tid = np.arange(R)
    row = row0 + tid
    row_ok = row < rows
    a = np.where(row_ok, row // max(Lq, 1), 0)
    j = np.where(row_ok, row % max(Lq, 1), 0)
    q_ok = row_ok & np.where(row_ok, qm.reshape(-1)[np.minimum(row, rows - 1)], False)
    state = dict(cur=b_begin, next_b=kr_begin + Lk)
    best = np.zeros(R)
    arg = np.full(R, -1, dtype=np.int64)

    def finish(b):
        for t_ in np.nonzero(row_ok)[0]:
            o = (a[t_] * Bk + b, j[t_])
            written[o] += 1
            amax[o] = arg[t_] if q_ok[t_] else -1
            rowmax[o] = best[t_] if (q_ok[t_] and arg[t_] >= 0) else 0.0
        best[:] = 0.0
        arg[:] = -1

    acc = np.zeros((R, K))
    for s in range(nsteps):
        if s + 1 < nsteps:
            load_step(s + 1)
            sm.commit()
            sm.wait(1)
        else:
            sm.wait(0)
        sm.barrier()
        t, c = s // nch, s % nch
        base = kr_begin + t * K
        if c == 0:
            kk_ = np.arange(K)
            mval = np.array([1.0 if (base + x < kr_end and km.reshape(-1)[base + x]) else 0.0 for x in kk_])
            sm.store(Ms + kk_, mval, 1, "key validity")
            acc[:] = 0.0
        w = min(dc, D - c * dc)
        width = -(-w // kK) * kK
        Qc = Qs1 if (stream_q and s & 1) else Qs0
        Kc = Ks1 if s & 1 else Ks0
        for kk in range(0, width, kK):  # fragment loads of the k-step, every warp's rows
            qa = sm.load(Qc + (np.arange(R)[:, None] * ld + kk + np.arange(kK)) * e, e, f"A fragments, step {s}")
            kb = sm.load(Kc + (np.arange(K)[:, None] * ld + kk + np.arange(kK)) * e, e, f"B fragments, step {s}")
            acc += qa @ kb.T
        if c + 1 < nch:
            sm.barrier()
            continue
        sm.store(S + (np.arange(K)[None, :] * lay.lds + np.arange(R)[:, None]) * 4, acc, 4, "score tile")
        sm.barrier()
        n = min(K, kr_end - base)
        col = 0
        while col < n:
            if base + col == state["next_b"]:
                finish(state["cur"])
                state["cur"] += 1
                state["next_b"] += Lk
            seg = min(n, state["next_b"] - base)
            i0 = base - (state["next_b"] - Lk)
            while col < seg:
                v = sm.load(S + (col * lay.lds + tid) * 4, 4, "row scan")
                mk = sm.load(np.array([Ms + col]), 1, "row scan mask")[0]
                take = (mk != 0) & ((arg < 0) | (v > best))
                best[take] = v[take]
                arg[take] = i0 + col
                col += 1
    finish(state["cur"])


def exact_maxsim(q, k, qm, km):
    """Exact scores (float64 of quantized inputs): row max and arg-max, ties -> lowest key index."""
    Bq, Lq, _ = q.shape
    Bk, Lk, _ = k.shape
    sc = np.einsum("ajd,bid->abji", q, k)
    sc = np.where(km[None, :, None, :], sc, -np.inf)
    am = np.argmax(sc, axis=-1)  # first maximal index
    mx = np.max(sc, axis=-1)
    has = km.any(axis=1)[None, :, None] & qm[:, None, :]
    return np.where(has, mx, 0.0), np.where(has, am, -1)


def launcher_items(Bk, Lk):
    items = max(1, min(Bk, 3136 // Lk))
    if -(-Bk // items) > 65535:
        items = -(-Bk // 65535)
    return items


# (dtype, optin, D, Bq, Lq, Bk, Lk, items or None = the launcher's choice)
CASES = [
    (F32, A100, 132, 3, 50, 5, 37, 2),     # fp32 D streamed: chunks 64, 64, 4 (remainder below the k-step)
    (F32, H100, 36, 2, 70, 4, 64, None),   # fp32 resident, D % 8 = 4; Lk = one tile exactly
    (F16, A100, 392, 2, 65, 3, 150, 2),    # 16-bit streamed: chunks 128 x 3 + 8; items spanning 3 tiles
    (BF16, H100, 24, 3, 45, 7, 9, None),   # 16-bit resident, key tiles spanning several items
    (F32, H100, 1024, 1, 20, 3, 70, 1),    # fp32 D = 1024: 16 chunks
]


@needs_nvcc
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"dt{c[0]}-optin{c[1]}-D{c[2]}-Lk{c[6]}")
def test_fast_kernel_block_loop_emulation(table, case):
    dt, optin, D, Bq, Lq, Bk, Lk, items = case
    lay = table[optin, dt, D][0]
    assert lay is not None, case
    g = np.random.default_rng(D * 1000 + Lk)
    q = g.integers(-3, 4, (Bq, Lq, D)) / 2.0   # small integers: exact sums, many arg-max ties
    k = g.integers(-3, 4, (Bk, Lk, D)) / 2.0
    k[1, 3] = k[1, 1]                            # an exact duplicate key: the tie goes to index 1
    qm = g.random((Bq, Lq)) > 0.15
    km = g.random((Bk, Lk)) > 0.15
    km[0] = False                                # a key item without valid tokens
    qm[-1, :] = False                            # a query item without valid tokens
    items = items or launcher_items(Bk, Lk)
    rowmax = np.full((Bq * Bk, Lq), np.nan)
    amax = np.full((Bq * Bk, Lq), -7, dtype=np.int64)
    written = np.zeros((Bq * Bk, Lq), dtype=np.int64)
    grid = (-(-(Bq * Lq) // lay.rows), -(-Bk // items))
    for bx in range(grid[0]):
        for by in range(grid[1]):
            emulate_block(q.reshape(-1, D), k.reshape(-1, D), qm, km, Bq, Bk, Lq, Lk, D, items, lay, bx, by,
                          rowmax, amax, written)
    assert (written == 1).all()  # every (pair, query token) written exactly once
    mx, am = exact_maxsim(q, k, qm, km)
    np.testing.assert_array_equal(amax.reshape(Bq, Bk, Lq), am)
    np.testing.assert_array_equal(rowmax.reshape(Bq, Bk, Lq), mx)


@needs_nvcc
def test_emulation_detects_a_missing_barrier(table):
    """The race detector is live: dropping the barrier that closes a non-final D chunk (so the next step's
    copies may overwrite a buffer another warp is still reading) is reported."""
    lay = table[A100, F32, 132][0]
    sm = Smem(lay.bytes)
    sm.store(np.array([lay.k0]), [1.0], 4, "x")
    sm.barrier()
    sm.load(np.array([lay.k0]), 4, "mma")
    with pytest.raises(RaceError, match="write after read"):
        sm.cp_async(np.array([lay.k0]), [2.0], 4, "next step's copy without a barrier")
    sm2 = Smem(lay.bytes)
    sm2.cp_async(np.array([lay.k0]), [1.0], 4, "copy")
    sm2.commit()
    sm2.barrier()
    with pytest.raises(RaceError, match="not written and made visible"):
        sm2.load(np.array([lay.k0]), 4, "read before wait_group")


# ---- torch's TF32 flag ---------------------------------------------------------------------------

def test_tf32_flag_reads_the_new_api_without_raising():
    from loupe_kernels._common import tf32_allowed as _tf32_allowed

    matmul = torch.backends.cuda.matmul
    if getattr(matmul, "fp32_precision", None) is None:
        pytest.skip("torch without fp32_precision: only the legacy flag exists")
    before = matmul.fp32_precision
    try:
        for setting, want in (("tf32", True), ("ieee", False)):
            matmul.fp32_precision = setting
            assert _tf32_allowed() is want
            if importlib.util.find_spec("triton") is not None:  # Triton's fp32 precision reads the same flag
                from loupe_kernels import triton_token_region_similarity as T
                assert T._precision(torch.float32) == ("tf32" if want else "tf32x3")
    finally:
        matmul.fp32_precision = before
    assert _tf32_allowed() is (matmul.fp32_precision == "tf32")
