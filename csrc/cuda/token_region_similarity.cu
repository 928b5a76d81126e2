// Token-region similarity on CUDA (METHOD section 3). Torch-free: raw pointers and launchers.
//
// Forward, fp16/bf16 pairwise (the training shape; D % 8 == 0, D <= 256, sm_80+): fwd_fast_kernel.
// A block keeps 128 query rows (q viewed as [Bq*Lq, D]) in shared memory and streams the key tokens of
// a chunk of key items (contiguous rows of k viewed as [Bk*Lk, D]) in 64-row tiles, double-buffered
// with cp.async; 4 warps compute the 128 x 64 score tile with WMMA (fp32 accumulation), the tile is
// staged key-major in shared memory and thread r scans row r in ascending key order, keeping a running
// (max, arg-max) per key item (a strictly larger score replaces: ties keep the lowest key index) and
// writing it when the scan reaches the next item. Only one score tile per block ever exists.
// Forward, other cases (fp32/fp64, pairwise = 0, odd D): one block per (tile of 64 query rows, chunk
// of 8 key items, or one query item when pairwise = 0); per key item the 64 x 64 score tiles come from
// WMMA (fp16/bf16) or a register-tiled FMA loop (fp32/fp64), 256 threads each hold 4 rows x 4 keys and
// a 16-lane butterfly gives the tile's row (max, lowest arg-max).
// Both write per (pair, query token) the row max and arg-max (-1 for an invalid query token or a key
// item without valid tokens); reduce_rows_kernel sums the row maxima of each pair over the valid query
// tokens in a fixed order and divides by their count (0 when there are none).
// Backward, with w(a, b) = g(a, b) / count_a:
//   d_query[a, j, :] = sum_b w(a, b) k[b, amax(a, b, j), :]: a warp per query row, key items in order
//     (a gather: deterministic, no atomics);
//   d_key[b, i, :] = sum_{a, j: amax(a, b, j) = i} w(a, b) q[a, j, :]: deterministic mode: a warp per
//     (key item, 32 features), each lane owning one feature column of the item (shared memory, or
//     global memory when Lk is large), (a, j) in order; fast mode: a block of 8 warps per (key item,
//     64 features) adding into one shared-memory accumulator with atomics.
#include "cuda/token_region_similarity.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>

namespace {

constexpr int kRows = 64;      // query rows per block
constexpr int kKeys = 64;      // key tokens per tile
constexpr int kThreads = 256;  // 16 x 16 threads; thread (ty, tx) owns rows ty + 16r, keys tx + 16c
constexpr int kItemsPerBlock = 8;

using loupe_cuda::AccOf;
using loupe_cuda::from_acc;
using loupe_cuda::to_acc;

template <typename T> __device__ __forceinline__ T zero_of() { return from_acc<T>(typename AccOf<T>::type(0)); }

// (value, index) that wins: larger value, or the same value at a lower index; index -1 never wins.
template <typename A>
__device__ __forceinline__ bool beats(A v, int i, A v2, int i2) {
  if (i < 0) return false;
  if (i2 < 0) return true;
  return v > v2 || (v == v2 && i < i2);
}

// Rows of this block: global row index into q viewed as [Bq*Lq, D], its item and token.
struct RowMap {
  int pairwise, Bq, Lq;
  int row0;      // first global row of the block
  int row_end;   // one past the last global row this block may use
  int b_begin, b_end;
};

__device__ __forceinline__ RowMap row_map(int Bq, int Bk, int Lq, int pairwise) {
  RowMap m;
  m.pairwise = pairwise;
  m.Bq = Bq;
  m.Lq = Lq;
  if (pairwise) {
    m.row0 = blockIdx.x * kRows;
    m.row_end = Bq * Lq;
    m.b_begin = blockIdx.y * kItemsPerBlock;
    m.b_end = min(Bk, m.b_begin + kItemsPerBlock);
  } else {  // one query item per block (tiles of its Lq rows); its key item is itself
    const int tiles = (Lq + kRows - 1) / kRows;
    const int a = blockIdx.x / tiles;
    m.row0 = a * Lq + (blockIdx.x % tiles) * kRows;
    m.row_end = (a + 1) * Lq;
    m.b_begin = a;
    m.b_end = a + 1;
  }
  return m;
}

// Fold this thread's 4x4 scores of one key tile into the running (max, arg-max) of its 4 rows.
template <typename A>
__device__ __forceinline__ void fold_tile(const A (&sc)[4][4], const uint8_t* km_b, int key0, int Lk, int tx,
                                          A (&best)[4], int (&arg)[4]) {
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    A v = 0;
    int idx = -1;
#pragma unroll
    for (int c = 0; c < 4; ++c) {  // keys ascend with c: strictly larger keeps the lowest index
      const int key = key0 + tx + 16 * c;
      if (key < Lk && km_b[key] && (idx < 0 || sc[r][c] > v)) {
        v = sc[r][c];
        idx = key;
      }
    }
#pragma unroll
    for (int off = 8; off >= 1; off >>= 1) {  // the 16 lanes sharing ty (same half-warp)
      const A v2 = __shfl_xor_sync(0xffffffffu, v, off, 16);
      const int i2 = __shfl_xor_sync(0xffffffffu, idx, off, 16);
      if (beats(v2, i2, v, idx)) {
        v = v2;
        idx = i2;
      }
    }
    // this tile's keys all come after earlier tiles' keys: only a strictly larger max replaces
    if (idx >= 0 && (arg[r] < 0 || v > best[r])) {
      best[r] = v;
      arg[r] = idx;
    }
  }
}

template <typename A>
__device__ __forceinline__ void write_rows(const RowMap& m, const uint8_t* qm, int Bk, int b, int ty, int tx,
                                           const A (&best)[4], const int (&arg)[4], A* rowmax, int32_t* amax) {
  if (tx != 0) return;
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int row = m.row0 + ty + 16 * r;
    if (row >= m.row_end) continue;
    const int a = row / m.Lq, j = row % m.Lq;
    const bool valid = qm[row] != 0;
    const size_t o = m.pairwise ? (static_cast<size_t>(a) * Bk + b) * m.Lq + j : static_cast<size_t>(row);
    amax[o] = valid ? arg[r] : -1;
    rowmax[o] = (valid && arg[r] >= 0) ? best[r] : A(0);
  }
}

// ---- fp32 / fp64: register-tiled FMA --------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads) fwd_simt_kernel(const T* __restrict__ q, const T* __restrict__ k,
                                                            const uint8_t* __restrict__ qm,
                                                            const uint8_t* __restrict__ km, int Bq, int Bk,
                                                            int Lq, int Lk, int D, int pairwise,
                                                            typename AccOf<T>::type* rowmax, int32_t* amax) {
  using A = typename AccOf<T>::type;
  constexpr int kD = 16;
  __shared__ A Qs[kD][kRows];
  __shared__ A Ks[kD][kKeys];
  const RowMap m = row_map(Bq, Bk, Lq, pairwise);
  const int t = threadIdx.x, ty = t / 16, tx = t % 16;
  for (int b = m.b_begin; b < m.b_end; ++b) {
    A best[4];
    int arg[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) { best[r] = 0; arg[r] = -1; }
    const uint8_t* km_b = km + static_cast<size_t>(b) * Lk;
    for (int key0 = 0; key0 < Lk; key0 += kKeys) {
      A sc[4][4];
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) sc[r][c] = 0;
      for (int d0 = 0; d0 < D; d0 += kD) {
        for (int e = t; e < kD * kRows; e += kThreads) {  // element (row, dd), dd fastest
          const int rr = e / kD, dd = e % kD;
          const int row = m.row0 + rr, d = d0 + dd;
          Qs[dd][rr] = (row < m.row_end && d < D) ? to_acc(q[static_cast<size_t>(row) * D + d]) : A(0);
          const int key = key0 + rr;
          Ks[dd][rr] = (key < Lk && d < D) ? to_acc(k[(static_cast<size_t>(b) * Lk + key) * D + d]) : A(0);
        }
        __syncthreads();
#pragma unroll
        for (int dd = 0; dd < kD; ++dd) {
          A qa[4], kb[4];
#pragma unroll
          for (int r = 0; r < 4; ++r) qa[r] = Qs[dd][ty + 16 * r];
#pragma unroll
          for (int c = 0; c < 4; ++c) kb[c] = Ks[dd][tx + 16 * c];
#pragma unroll
          for (int r = 0; r < 4; ++r)
#pragma unroll
            for (int c = 0; c < 4; ++c) sc[r][c] = fma(qa[r], kb[c], sc[r][c]);
        }
        __syncthreads();
      }
      fold_tile<A>(sc, km_b, key0, Lk, tx, best, arg);
    }
    write_rows<A>(m, qm, Bk, b, ty, tx, best, arg, rowmax, amax);
  }
}

// ---- fp16 / bf16: WMMA 16x16x16 on tensor cores, fp32 accumulation ---------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads) fwd_wmma_kernel(const T* __restrict__ q, const T* __restrict__ k,
                                                            const uint8_t* __restrict__ qm,
                                                            const uint8_t* __restrict__ km, int Bq, int Bk,
                                                            int Lq, int Lk, int D, int pairwise, float* rowmax,
                                                            int32_t* amax) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  constexpr int kD = 64;    // features per shared-memory stage
  constexpr int kLd = 72;   // padded leading dimension (multiple of 8 elements, rows 32-byte aligned)
  constexpr int kLdS = 68;  // padded leading dimension of the fp32 score tile
  __shared__ __align__(32) T Qs[kRows][kLd];
  __shared__ __align__(32) T Ks[kKeys][kLd];
  __shared__ __align__(32) float S[kRows][kLdS];
  const RowMap m = row_map(Bq, Bk, Lq, pairwise);
  const int t = threadIdx.x, ty = t / 16, tx = t % 16;
  const int warp = t / 32;
  const int wr = warp / 2;        // 16-row strip of this warp
  const int wc = (warp % 2) * 2;  // its two 16-key column blocks
  const T zero = zero_of<T>();
  for (int b = m.b_begin; b < m.b_end; ++b) {
    float best[4];
    int arg[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) { best[r] = 0.f; arg[r] = -1; }
    const uint8_t* km_b = km + static_cast<size_t>(b) * Lk;
    for (int key0 = 0; key0 < Lk; key0 += kKeys) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
      wmma::fill_fragment(acc[0], 0.f);
      wmma::fill_fragment(acc[1], 0.f);
      for (int d0 = 0; d0 < D; d0 += kD) {
        for (int e = t; e < kRows * kD; e += kThreads) {  // element (row, dd), dd fastest: coalesced
          const int rr = e / kD, dd = e % kD;
          const int row = m.row0 + rr, d = d0 + dd, key = key0 + rr;
          Qs[rr][dd] = (row < m.row_end && d < D) ? q[static_cast<size_t>(row) * D + d] : zero;
          Ks[rr][dd] = (key < Lk && d < D) ? k[(static_cast<size_t>(b) * Lk + key) * D + d] : zero;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < kD; kk += 16) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
          wmma::load_matrix_sync(fa, &Qs[wr * 16][kk], kLd);
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            // B = K^T (d x key): element (d, key) at Ks[key][d], i.e. column-major with ld kLd
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
            wmma::load_matrix_sync(fb, &Ks[(wc + c) * 16][kk], kLd);
            wmma::mma_sync(acc[c], fa, fb, acc[c]);
          }
        }
        __syncthreads();
      }
#pragma unroll
      for (int c = 0; c < 2; ++c)
        wmma::store_matrix_sync(&S[wr * 16][(wc + c) * 16], acc[c], kLdS, wmma::mem_row_major);
      __syncthreads();
      float sc[4][4];
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) sc[r][c] = S[ty + 16 * r][tx + 16 * c];
      __syncthreads();  // S is rewritten by the next tile
      fold_tile<float>(sc, km_b, key0, Lk, tx, best, arg);
    }
    write_rows<float>(m, qm, Bk, b, ty, tx, best, arg, rowmax, amax);
  }
#endif
}

// ---- fp16 / bf16 pairwise fast path: Q resident in shared memory, K streamed with cp.async -------
// Block: 128 query rows (of q viewed as [Bq*Lq, D]) x a chunk of `items` key items. The chunk's key
// tokens are contiguous rows of k viewed as [Bk*Lk, D], streamed in tiles of 64 rows (a tile may span
// two or more key items: no padding of Lk to the tile size), double-buffered with cp.async. 4 warps,
// warp w owns rows 32w..32w+31 of the 128 x 64 score tile (2 x 4 WMMA 16x16x16 accumulators, fp32).
// The tile goes to shared memory key-major; thread r then scans row r's 64 scores in ascending key
// order (a strictly larger score replaces: ties keep the lowest key index) and writes (row max,
// arg-max) of a key item when the scan crosses into the next item. Needs D % 8 == 0, D <= 256,
// 16-byte aligned q and k, sm_80+ and ~169 KiB of opt-in shared memory (D = 256).
// D > 256 (issue 20, item 2; not done): Q stays resident for the whole D, so at D = 512 this layout would
// need ~293 KiB, above the H100's 227 KiB; such D take fwd_wmma_kernel, which reloads Q and K per 64
// features. A D loop here (Q and K both streamed in D chunks, scores accumulated across chunks) is the
// planned fix; it needs a GPU to validate and time, so it is not written yet.
constexpr int kFRows = 128;
constexpr int kFKeys = 64;
constexpr int kFThreads = 128;
constexpr int kFMaxD = 256;
constexpr int kFLdS = kFRows + 4;  // leading dimension of the key-major fp32 score tile

__host__ __device__ inline int fast_ldq(int D) { return ((D + 15) / 16) * 16 + 8; }
__host__ __device__ inline size_t fast_smem_bytes(int D) {
  const size_t ldq = static_cast<size_t>(fast_ldq(D));
  return (kFRows + 2 * kFKeys) * ldq * 2 + static_cast<size_t>(kFKeys) * kFLdS * sizeof(float) + kFKeys;
}

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800  // used only by the sm_80+ kernel body
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
#endif

template <typename T>
__global__ void __launch_bounds__(kFThreads, 1) fwd_fast_kernel(const T* __restrict__ q, const T* __restrict__ k,
                                                                const uint8_t* __restrict__ qm,
                                                                const uint8_t* __restrict__ km, int Bq, int Bk,
                                                                int Lq, int Lk, int D, int items,
                                                                float* __restrict__ rowmax,
                                                                int32_t* __restrict__ amax) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  extern __shared__ __align__(128) unsigned char fast_smem[];
  const int DP = ((D + 15) / 16) * 16;  // D rounded up to the WMMA k-step; columns D..DP-1 are zero
  const int ldq = DP + 8;               // padded row (elements): rows stay 32-byte aligned
  const int vec = D / 8;                // 16-byte chunks per row
  T* Qs = reinterpret_cast<T*>(fast_smem);            // [kFRows][ldq]
  T* Ks0 = Qs + static_cast<size_t>(kFRows) * ldq;      // [kFKeys][ldq], buffer 0
  T* Ks1 = Ks0 + static_cast<size_t>(kFKeys) * ldq;     // [kFKeys][ldq], buffer 1
  float* S = reinterpret_cast<float*>(Ks1 + static_cast<size_t>(kFKeys) * ldq);  // [kFKeys][kFLdS]
  uint8_t* Ms = reinterpret_cast<uint8_t*>(S + kFKeys * kFLdS);                  // [kFKeys] key validity
  const int tid = threadIdx.x, warp = tid / 32;
  const int64_t rows = static_cast<int64_t>(Bq) * Lq;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kFRows;
  const int b_begin = blockIdx.y * items;
  const int b_end = min(Bk, b_begin + items);
  const int64_t kr_begin = static_cast<int64_t>(b_begin) * Lk, kr_end = static_cast<int64_t>(b_end) * Lk;
  const int ntiles = static_cast<int>((kr_end - kr_begin + kFKeys - 1) / kFKeys);
  const T zero = zero_of<T>();

  // zero the padding columns D..DP-1 of Qs, Ks0, Ks1 (256 contiguous rows of ldq; cp.async never writes them)
  if (DP > D) {
    const int pad = DP - D;
    for (int e = tid; e < (kFRows + 2 * kFKeys) * pad; e += kFThreads) Qs[(e / pad) * ldq + D + e % pad] = zero;
  }
  // query rows of this block (rows past Bq*Lq are zero)
  for (int e = tid; e < kFRows * vec; e += kFThreads) {
    const int r = e / vec, c = (e % vec) * 8;
    T* dst = Qs + r * ldq + c;
    if (row0 + r < rows) cp_async16(dst, q + (row0 + r) * D + c);
    else *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
  }
  auto load_keys = [&](int t, T* Kb) {  // key rows kr_begin + 64t .. + 63 (rows past the chunk are zero)
    const int64_t base = kr_begin + static_cast<int64_t>(t) * kFKeys;
    for (int e = tid; e < kFKeys * vec; e += kFThreads) {
      const int r = e / vec, c = (e % vec) * 8;
      T* dst = Kb + r * ldq + c;
      if (base + r < kr_end) cp_async16(dst, k + (base + r) * D + c);
      else *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
    }
  };
  load_keys(0, Ks0);
  cp_async_commit();

  // running (max, arg-max) of this thread's row against the current key item
  const int64_t row = row0 + tid;
  const bool row_ok = row < rows;
  const int a = row_ok ? static_cast<int>(row / Lq) : 0;
  const int j = row_ok ? static_cast<int>(row % Lq) : 0;
  const bool q_ok = row_ok && qm[row] != 0;
  int cur = b_begin;
  int64_t next_b = kr_begin + Lk;  // first key row of item cur + 1
  float best = 0.f;
  int arg = -1;
  auto finish = [&](int b) {
    if (row_ok) {
      const size_t o = (static_cast<size_t>(a) * Bk + b) * Lq + j;
      amax[o] = q_ok ? arg : -1;
      rowmax[o] = (q_ok && arg >= 0) ? best : 0.f;
    }
    best = 0.f;
    arg = -1;
  };

  for (int t = 0; t < ntiles; ++t) {
    const T* Kc = (t & 1) ? Ks1 : Ks0;
    if (t + 1 < ntiles) {  // the other buffer was last read by tile t-1's MMA, finished before its 2nd barrier
      load_keys(t + 1, (t & 1) ? Ks0 : Ks1);
      cp_async_commit();
      cp_async_wait<1>();  // everything but tile t+1 has landed (this thread's copies)
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // tile t (and Q) visible to all; every thread is done with the previous S and Ms
    const int64_t base = kr_begin + static_cast<int64_t>(t) * kFKeys;
    if (tid < kFKeys) Ms[tid] = (base + tid < kr_end && km[base + tid]) ? 1 : 0;

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) wmma::fill_fragment(acc[mi][ni], 0.f);
#pragma unroll 2
    for (int kk = 0; kk < DP; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) wmma::load_matrix_sync(fa[mi], Qs + (warp * 32 + mi * 16) * ldq + kk, ldq);
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
        // B = K^T (d x key): element (d, key) at Kc[key * ldq + d], i.e. column-major with ld = ldq
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
        wmma::load_matrix_sync(fb, Kc + (ni * 16) * ldq + kk, ldq);
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) wmma::mma_sync(acc[mi][ni], fa[mi], fb, acc[mi][ni]);
      }
    }
    // key-major store: score (row r, key c) at S[c * kFLdS + r], so that the row scan below is conflict-free
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
        wmma::store_matrix_sync(S + (ni * 16) * kFLdS + warp * 32 + mi * 16, acc[mi][ni], kFLdS,
                                wmma::mem_col_major);
    __syncthreads();  // S and Ms complete

    // scan row tid in ascending key order, one segment per key item present in this tile
    const int n = static_cast<int>(min(static_cast<int64_t>(kFKeys), kr_end - base));
    int c = 0;
    while (c < n) {
      if (base + c == next_b) {  // item cur is complete
        finish(cur);
        ++cur;
        next_b += Lk;
      }
      const int seg = static_cast<int>(min(static_cast<int64_t>(n), next_b - base));  // > c
      const int i0 = static_cast<int>(base - (next_b - Lk));  // key index of column 0 within item cur
#pragma unroll 8
      for (; c < seg; ++c) {
        const float v = S[c * kFLdS + tid];
        if (Ms[c] && (arg < 0 || v > best)) {
          best = v;
          arg = i0 + c;
        }
      }
    }
  }
  finish(cur);  // the chunk's last item
#endif
}

// out[pair] = (sum over valid j, in order, of the row maxima) / count of valid query tokens.
template <typename T>
__global__ void reduce_rows_kernel(const typename AccOf<T>::type* rowmax, const int32_t* amax,
                                   const uint8_t* qm, int Bq, int Bk, int Lq, int pairwise, T* out) {
  using A = typename AccOf<T>::type;
  const size_t pairs = pairwise ? static_cast<size_t>(Bq) * Bk : static_cast<size_t>(Bq);
  for (size_t p = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; p < pairs;
       p += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const int a = pairwise ? static_cast<int>(p / Bk) : static_cast<int>(p);
    A sum = 0;
    int cnt = 0;
    for (int j = 0; j < Lq; ++j) {
      if (!qm[static_cast<size_t>(a) * Lq + j]) continue;
      ++cnt;
      const size_t o = p * Lq + j;
      if (amax[o] >= 0) sum += rowmax[o];
    }
    out[p] = from_acc<T>(cnt > 0 ? sum / A(cnt) : A(0));
  }
}

// ---- backward ------------------------------------------------------------------------------------
template <typename T>
__global__ void inv_count_kernel(const uint8_t* qm, int Bq, int Lq, typename AccOf<T>::type* inv) {
  using A = typename AccOf<T>::type;
  const int a = blockIdx.x * blockDim.x + threadIdx.x;
  if (a >= Bq) return;
  int cnt = 0;
  for (int j = 0; j < Lq; ++j) cnt += qm[static_cast<size_t>(a) * Lq + j] ? 1 : 0;
  inv[a] = cnt > 0 ? A(1) / A(cnt) : A(0);
}

// d_query: a warp per query row (a, j), lane l owning features d0 + l + 32s (s < 8) of each 256-feature
// chunk; key items b in order (4 at a time: their arg-maxes and rows are loaded before they are added).
constexpr int kDqWarps = 8;
template <typename T>
__global__ void __launch_bounds__(kDqWarps * 32) dq_kernel(const T* __restrict__ grad, const T* __restrict__ k,
                                                           const int32_t* __restrict__ amax,
                                                           const typename AccOf<T>::type* __restrict__ inv, int Bq,
                                                           int Bk, int Lq, int Lk, int D, int pairwise,
                                                           T* __restrict__ dq) {
  using A = typename AccOf<T>::type;
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kDqWarps + threadIdx.x / 32;
  if (row >= static_cast<int64_t>(Bq) * Lq) return;  // whole warp; no barriers below
  const int a = static_cast<int>(row / Lq), j = static_cast<int>(row % Lq);
  const A ia = inv[a];
  for (int d0 = 0; d0 < D; d0 += 256) {
    A acc[8];
#pragma unroll
    for (int s = 0; s < 8; ++s) acc[s] = A(0);
    if (ia != A(0)) {
      const int b_begin = pairwise ? 0 : a, b_end = pairwise ? Bk : a + 1;
      for (int b0 = b_begin; b0 < b_end; b0 += 4) {
        int ii[4];
        A ww[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const int b = b0 + u;
          const size_t pair = pairwise ? static_cast<size_t>(a) * Bk + b : static_cast<size_t>(a);
          ii[u] = b < b_end ? amax[pair * Lq + j] : -1;
          ww[u] = ii[u] >= 0 ? to_acc(grad[pair]) * ia : A(0);
        }
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          if (ii[u] < 0) continue;
          const T* kr = k + (static_cast<size_t>(b0 + u) * Lk + ii[u]) * D + d0 + lane;
#pragma unroll
          for (int s = 0; s < 8; ++s)
            if (d0 + lane + 32 * s < D) acc[s] += ww[u] * to_acc(kr[32 * s]);
        }
      }
    }
    T* out = dq + static_cast<size_t>(row) * D + d0 + lane;
#pragma unroll
    for (int s = 0; s < 8; ++s)
      if (d0 + lane + 32 * s < D) out[32 * s] = from_acc<T>(acc[s]);
  }
}

// d_key, deterministic: one warp per (key item b, 32 features); lane l owns feature column d of the
// item's Lk rows, in shared memory (SHARED) or in the global workspace, and adds the (a, j) terms in
// order (the warp loads 32 arg-maxes at once and broadcasts them with a shuffle).
template <typename T, bool SHARED>
__global__ void __launch_bounds__(32) dk_kernel(const T* __restrict__ grad, const T* __restrict__ q,
                                                const int32_t* __restrict__ amax,
                                                const typename AccOf<T>::type* __restrict__ inv, int Bq, int Bk,
                                                int Lq, int Lk, int D, int pairwise,
                                                typename AccOf<T>::type* __restrict__ ws, T* __restrict__ dk) {
  using A = typename AccOf<T>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int b = blockIdx.x;
  const int lane = threadIdx.x;
  const int d = blockIdx.y * 32 + lane;
  const bool live = d < D;  // dead lanes stay for the shuffles but touch no memory
  A* col = SHARED ? reinterpret_cast<A*>(smem_raw) + lane : ws + static_cast<size_t>(b) * Lk * D + (live ? d : 0);
  const size_t stride = SHARED ? 32 : static_cast<size_t>(D);
  if (live)
    for (int i = 0; i < Lk; ++i) col[i * stride] = 0;
  const int a_begin = pairwise ? 0 : b, a_end = pairwise ? Bq : b + 1;
  for (int a = a_begin; a < a_end; ++a) {
    const size_t pair = pairwise ? static_cast<size_t>(a) * Bk + b : static_cast<size_t>(a);
    const A w = to_acc(grad[pair]) * inv[a];
    if (w == A(0)) continue;  // uniform across the warp
    const int32_t* am = amax + pair * Lq;
    const T* qa = q + static_cast<size_t>(a) * Lq * D + (live ? d : 0);
    for (int j0 = 0; j0 < Lq; j0 += 32) {
      const int mine = j0 + lane < Lq ? am[j0 + lane] : -1;
      const int n = min(32, Lq - j0);
      for (int jj = 0; jj < n; ++jj) {
        const int i = __shfl_sync(0xffffffffu, mine, jj);
        if (i >= 0 && live) col[i * stride] += w * to_acc(qa[static_cast<size_t>(j0 + jj) * D]);
      }
    }
  }
  if (!live) return;
  T* out = dk + static_cast<size_t>(b) * Lk * D + d;
  for (int i = 0; i < Lk; ++i) out[static_cast<size_t>(i) * D] = from_acc<T>(col[i * stride]);
}

// d_key, fast (not deterministic): a block of 8 warps per (key item b, 64 features); warp w takes the
// query items a = w, w + 8, ... and adds its terms into one [Lk][64] accumulator in shared memory
// with shared-memory atomics (the order of the additions varies from run to run).
constexpr int kDkWarps = 8;
constexpr int kDkCols = 64;
template <typename T>
__global__ void __launch_bounds__(kDkWarps * 32) dk_atomic_kernel(const T* __restrict__ grad,
                                                                  const T* __restrict__ q,
                                                                  const int32_t* __restrict__ amax,
                                                                  const typename AccOf<T>::type* __restrict__ inv,
                                                                  int Bq, int Bk, int Lq, int Lk, int D, int pairwise,
                                                                  T* __restrict__ dk) {
  using A = typename AccOf<T>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* acc = reinterpret_cast<A*>(smem_raw);  // [Lk][kDkCols]
  const int b = blockIdx.x;
  const int d0 = blockIdx.y * kDkCols;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int e = threadIdx.x; e < Lk * kDkCols; e += blockDim.x) acc[e] = A(0);
  __syncthreads();
  const bool live0 = d0 + lane < D, live1 = d0 + lane + 32 < D;
  const int a_begin = pairwise ? 0 : b, a_end = pairwise ? Bq : b + 1;
  for (int a = a_begin + warp; a < a_end; a += kDkWarps) {
    const size_t pair = pairwise ? static_cast<size_t>(a) * Bk + b : static_cast<size_t>(a);
    const A w = to_acc(grad[pair]) * inv[a];
    if (w == A(0)) continue;  // uniform across the warp
    const int32_t* am = amax + pair * Lq;
    const T* qa = q + static_cast<size_t>(a) * Lq * D + d0 + lane;
    for (int j0 = 0; j0 < Lq; j0 += 32) {
      const int mine = j0 + lane < Lq ? am[j0 + lane] : -1;
      const int n = min(32, Lq - j0);
      for (int jj = 0; jj < n; ++jj) {
        const int i = __shfl_sync(0xffffffffu, mine, jj);
        if (i < 0) continue;  // uniform across the warp
        const T* src = qa + static_cast<size_t>(j0 + jj) * D;
        if (live0) atomicAdd(acc + i * kDkCols + lane, w * to_acc(src[0]));
        if (live1) atomicAdd(acc + i * kDkCols + lane + 32, w * to_acc(src[32]));
      }
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < Lk * kDkCols; e += blockDim.x) {
    const int i = e / kDkCols, c = e % kDkCols;
    if (d0 + c < D) dk[(static_cast<size_t>(b) * Lk + i) * D + d0 + c] = from_acc<T>(acc[e]);
  }
}

int grid_1d(size_t n, int threads) {
  const size_t blocks = (n + threads - 1) / threads;
  return static_cast<int>(blocks < 65535 * 32 ? (blocks > 0 ? blocks : 1) : 65535 * 32);
}

size_t acc_size(int dtype) { return dtype == LOUPE_F64 ? sizeof(double) : sizeof(float); }

struct DeviceInfo {
  int major = 0;
  int smem_optin = 0;  // bytes of shared memory a block may opt in to
};

DeviceInfo device_info() {
  DeviceInfo info;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return info;
  if (cudaDeviceGetAttribute(&info.major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) info.major = 0;
  if (cudaDeviceGetAttribute(&info.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess)
    info.smem_optin = 48 * 1024;
  return info;
}

// Grid of the tiled forward kernels (fwd_wmma_kernel, fwd_simt_kernel): blocks of kRows query rows, and
// for all pairs kItemsPerBlock key items per block; pairwise = 0 tiles each item's own rows.
dim3 tile_grid(int Bq, int Bk, int Lq, int pairwise) {
  if (pairwise)
    return dim3(static_cast<unsigned>((static_cast<size_t>(Bq) * Lq + kRows - 1) / kRows),
                static_cast<unsigned>((Bk + kItemsPerBlock - 1) / kItemsPerBlock));
  return dim3(static_cast<unsigned>(static_cast<size_t>(Bq) * ((Lq + kRows - 1) / kRows)), 1);
}

template <typename T>
cudaError_t forward_t(const T* q, const T* k, const uint8_t* qm, const uint8_t* km, int Bq, int Bk, int Lq,
                      int Lk, int D, int pairwise, void* ws, T* out, int32_t* amax, cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  A* rowmax = static_cast<A*>(ws);
  if (Bq > 0 && Lq > 0 && Bk > 0) {
    const DeviceInfo dev = device_info();
    bool fast = false;
    if constexpr (sizeof(T) == 2) {
      // the WMMA kernels are compiled for sm_80 and newer (bf16 fragments, cp.async)
      const bool aligned = reinterpret_cast<uintptr_t>(q) % 16 == 0 && reinterpret_cast<uintptr_t>(k) % 16 == 0;
      const size_t smem = fast_smem_bytes(D);
      fast = dev.major >= 8 && pairwise && Lk > 0 && D > 0 && D % 8 == 0 && D <= kFMaxD && aligned &&
             smem <= static_cast<size_t>(dev.smem_optin);
      if (fast) {
        // about 3136 key rows (49 tiles of 64 at Lk = 196) per block: the query tile is loaded once per chunk
        int items = std::max(1, std::min(Bk, 3136 / Lk));
        if ((Bk + items - 1) / items > 65535) items = (Bk + 65534) / 65535;
        const dim3 grid(static_cast<unsigned>((static_cast<int64_t>(Bq) * Lq + kFRows - 1) / kFRows),
                        static_cast<unsigned>((Bk + items - 1) / items));
        cudaError_t e = cudaFuncSetAttribute(fwd_fast_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(smem));
        if (e != cudaSuccess) return e;
        fwd_fast_kernel<T><<<grid, kFThreads, smem, stream>>>(q, k, qm, km, Bq, Bk, Lq, Lk, D, items, rowmax, amax);
      } else if (dev.major >= 8) {
        const dim3 grid = tile_grid(Bq, Bk, Lq, pairwise);
        if (grid.y > 65535) return cudaErrorInvalidConfiguration;
        fwd_wmma_kernel<T><<<grid, kThreads, 0, stream>>>(q, k, qm, km, Bq, Bk, Lq, Lk, D, pairwise, rowmax, amax);
        fast = true;  // launched
      }
    }
    if (!fast) {
      const dim3 grid = tile_grid(Bq, Bk, Lq, pairwise);
      if (grid.y > 65535) return cudaErrorInvalidConfiguration;
      fwd_simt_kernel<T><<<grid, kThreads, 0, stream>>>(q, k, qm, km, Bq, Bk, Lq, Lk, D, pairwise, rowmax, amax);
    }
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  const size_t pairs = pairwise ? static_cast<size_t>(Bq) * Bk : static_cast<size_t>(Bq);
  if (pairs > 0) {
    reduce_rows_kernel<T><<<grid_1d(pairs, 256), 256, 0, stream>>>(rowmax, amax, qm, Bq, Bk, Lq, pairwise, out);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_t(const T* grad, const T* q, const T* k, const uint8_t* qm, const int32_t* amax, int Bq,
                       int Bk, int Lq, int Lk, int D, int pairwise, int deterministic, void* ws, T* dq, T* dk,
                       cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  if (D == 0) return cudaSuccess;
  A* inv = static_cast<A*>(ws);
  A* colws = inv + (Bq > 0 ? Bq : 1);
  if (Bq > 0) {
    inv_count_kernel<T><<<(Bq + 255) / 256, 256, 0, stream>>>(qm, Bq, Lq, inv);
    if (Lq > 0) {
      const int64_t rows = static_cast<int64_t>(Bq) * Lq;
      dq_kernel<T><<<static_cast<unsigned>((rows + kDqWarps - 1) / kDqWarps), kDqWarps * 32, 0, stream>>>(
          grad, k, amax, inv, Bq, Bk, Lq, Lk, D, pairwise, dq);
    }
  }
  if (Bk > 0 && Lk > 0) {
    const size_t smem_atomic = static_cast<size_t>(Lk) * kDkCols * sizeof(A);
    const DeviceInfo dev = deterministic ? DeviceInfo{} : device_info();
    if (!deterministic && smem_atomic <= static_cast<size_t>(dev.smem_optin)) {
      const dim3 grid(static_cast<unsigned>(Bk), static_cast<unsigned>((D + kDkCols - 1) / kDkCols));
      if (smem_atomic > 48 * 1024) {
        const cudaError_t e = cudaFuncSetAttribute(dk_atomic_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                   static_cast<int>(smem_atomic));
        if (e != cudaSuccess) return e;
      }
      dk_atomic_kernel<T><<<grid, kDkWarps * 32, smem_atomic, stream>>>(grad, q, amax, inv, Bq, Bk, Lq, Lk, D,
                                                                         pairwise, dk);
    } else {
      const dim3 grid(static_cast<unsigned>(Bk), static_cast<unsigned>((D + 31) / 32));
      const size_t smem = static_cast<size_t>(Lk) * 32 * sizeof(A);
      if (smem <= 48 * 1024) {
        dk_kernel<T, true><<<grid, 32, smem, stream>>>(grad, q, amax, inv, Bq, Bk, Lq, Lk, D, pairwise, colws, dk);
      } else {
        dk_kernel<T, false><<<grid, 32, 0, stream>>>(grad, q, amax, inv, Bq, Bk, Lq, Lk, D, pairwise, colws, dk);
      }
    }
  }
  return cudaGetLastError();
}

}  // namespace

size_t loupe_trs_forward_workspace(int dtype, int Bq, int Bk, int Lq, int pairwise) {
  const size_t rows = (pairwise ? static_cast<size_t>(Bq) * Bk : static_cast<size_t>(Bq)) * Lq;
  return (rows > 0 ? rows : 1) * acc_size(dtype);
}

size_t loupe_trs_backward_workspace(int dtype, int Bq, int Bk, int Lk, int D) {
  const size_t cols = static_cast<size_t>(Lk) * 32 * acc_size(dtype) > 48 * 1024
                          ? static_cast<size_t>(Bk) * Lk * D : 0;
  return (static_cast<size_t>(Bq > 0 ? Bq : 1) + cols) * acc_size(dtype);
}

cudaError_t loupe_trs_forward(const void* q, const void* k, int dtype, const uint8_t* qm, const uint8_t* km,
                              int Bq, int Bk, int Lq, int Lk, int D, int pairwise, void* workspace, void* out,
                              int32_t* amax, cudaStream_t stream) {
  if (Bq < 0 || Bk < 0 || Lq < 0 || Lk < 0 || D < 0) return cudaErrorInvalidValue;
  if (!pairwise && Bq != Bk) return cudaErrorInvalidValue;
  switch (dtype) {
    case LOUPE_F32:
      return forward_t(static_cast<const float*>(q), static_cast<const float*>(k), qm, km, Bq, Bk, Lq, Lk, D,
                       pairwise, workspace, static_cast<float*>(out), amax, stream);
    case LOUPE_F64:
      return forward_t(static_cast<const double*>(q), static_cast<const double*>(k), qm, km, Bq, Bk, Lq, Lk, D,
                       pairwise, workspace, static_cast<double*>(out), amax, stream);
    case LOUPE_F16:
      return forward_t(static_cast<const __half*>(q), static_cast<const __half*>(k), qm, km, Bq, Bk, Lq, Lk, D,
                       pairwise, workspace, static_cast<__half*>(out), amax, stream);
    case LOUPE_BF16:
      return forward_t(static_cast<const __nv_bfloat16*>(q), static_cast<const __nv_bfloat16*>(k), qm, km, Bq, Bk,
                       Lq, Lk, D, pairwise, workspace, static_cast<__nv_bfloat16*>(out), amax, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t loupe_trs_backward(const void* grad, const void* q, const void* k, int dtype, const uint8_t* qm,
                               const int32_t* amax, int Bq, int Bk, int Lq, int Lk, int D, int pairwise,
                               int deterministic, void* workspace, void* dq, void* dk, cudaStream_t stream) {
  if (Bq < 0 || Bk < 0 || Lq < 0 || Lk < 0 || D < 0) return cudaErrorInvalidValue;
  if (!pairwise && Bq != Bk) return cudaErrorInvalidValue;
  switch (dtype) {
    case LOUPE_F32:
      return backward_t(static_cast<const float*>(grad), static_cast<const float*>(q), static_cast<const float*>(k),
                        qm, amax, Bq, Bk, Lq, Lk, D, pairwise, deterministic, workspace, static_cast<float*>(dq),
                        static_cast<float*>(dk), stream);
    case LOUPE_F64:
      return backward_t(static_cast<const double*>(grad), static_cast<const double*>(q),
                        static_cast<const double*>(k), qm, amax, Bq, Bk, Lq, Lk, D, pairwise, deterministic, workspace,
                        static_cast<double*>(dq), static_cast<double*>(dk), stream);
    case LOUPE_F16:
      return backward_t(static_cast<const __half*>(grad), static_cast<const __half*>(q),
                        static_cast<const __half*>(k), qm, amax, Bq, Bk, Lq, Lk, D, pairwise, deterministic, workspace,
                        static_cast<__half*>(dq), static_cast<__half*>(dk), stream);
    case LOUPE_BF16:
      return backward_t(static_cast<const __nv_bfloat16*>(grad), static_cast<const __nv_bfloat16*>(q),
                        static_cast<const __nv_bfloat16*>(k), qm, amax, Bq, Bk, Lq, Lk, D, pairwise, deterministic, workspace,
                        static_cast<__nv_bfloat16*>(dq), static_cast<__nv_bfloat16*>(dk), stream);
    default:
      return cudaErrorInvalidValue;
  }
}
