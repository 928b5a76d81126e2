// Token-region similarity on CUDA (METHOD section 3). Torch-free: raw pointers and launchers.
//
// Forward, pairwise with D a multiple of 16 bytes (fp16/bf16: D % 8 == 0; fp32: D % 4 == 0), 16-byte
// aligned inputs, sm_80+ (the training shape): fwd_fast_kernel. A block keeps 128 query rows (q viewed
// as [Bq*Lq, D]) in shared memory and streams the key tokens of a chunk of key items (contiguous rows
// of k viewed as [Bk*Lk, D]) in 64-row tiles, double-buffered with cp.async; when the query tile does
// not fit beside the key tiles (large D), D is walked in chunks and both are streamed per chunk, so every
// D takes this kernel. 4 warps compute the 128 x 64 score tile with WMMA (fp32 accumulation; fp32
// input as 3xTF32, or one TF32 pass when the caller allows TF32), the tile is staged key-major in shared
// memory and thread r scans row r in ascending key order, keeping a running (max, arg-max) per key item
// (a strictly larger score replaces: ties keep the lowest key index) and writing it when the scan
// reaches the next item. Only one score tile per block ever exists.
// Forward, other cases (fp64, pairwise = 0, other D, unaligned): one block per (tile of 64 query rows,
// chunk of 8 key items, or one query item when pairwise = 0); per key item the 64 x 64 score tiles come
// from WMMA (fp16/bf16) or a register-tiled FMA loop (fp32/fp64, exact in the input precision), 256
// threads each hold 4 rows x 4 keys and a 16-lane butterfly gives the tile's row (max, lowest arg-max).
// Both write per (pair, query token) the row max and arg-max (-1 for an invalid query token or a key
// item without valid tokens); reduce_rows_kernel sums the row maxima of each pair over the valid query
// tokens in a fixed order and divides by their count (0 when there are none).
// Backward, with w(a, b) = g(a, b) / count_a:
//   d_query[a, j, :] = sum_b w(a, b) k[b, amax(a, b, j), :]: a warp per query row, key items in order
//     (a gather: deterministic, no atomics);
//   d_key[b, i, :] = sum_{a, j: amax(a, b, j) = i} w(a, b) q[a, j, :]: deterministic mode (the default):
//     the arg-max entries grouped per key row by a stable counting sort (dk_group_kernel), then a warp
//     per key row sums its own entries in ascending (a, j) order (dk_sum_kernel); each arg-max entry is
//     read twice and added once. Fast mode: a block of 8 warps per (key item, 64 features) adding into
//     one shared-memory accumulator with atomics (dk_atomic_kernel).
#include "cuda/token_region_similarity.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <type_traits>

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
  // feature-major tiles, rows padded by 2: the loads below write (row, dd) with dd fastest, i.e. 16 dd
  // x 2 rows per warp; a stride of 66 words puts them in 32 distinct banks (64 gave 16-way conflicts)
  __shared__ A Qs[kD][kRows + 2];
  __shared__ A Ks[kD][kKeys + 2];
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
  // WMMA: ldm a multiple of 16 bytes, fragment pointers (16-row / 16-column steps) 256-bit aligned
  static_assert((kLd * sizeof(T)) % 16 == 0 && (16 * kLd * sizeof(T)) % 32 == 0, "fwd_wmma_kernel: ldm");
  static_assert((kLdS * sizeof(float)) % 16 == 0 && (16 * kLdS * sizeof(float)) % 32 == 0, "fwd_wmma_kernel: ldm");
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

// ---- pairwise fast path: fp16/bf16 (WMMA 16x16x16) and fp32 (WMMA TF32 16x16x8, 3xTF32 or 1xTF32) ----
// Block: 128 query rows (of q viewed as [Bq*Lq, D]) x a chunk of `items` key items. The chunk's key
// tokens are contiguous rows of k viewed as [Bk*Lk, D], streamed in tiles of 64 rows (a tile may span
// two or more key items: no padding of Lk to the tile size), double-buffered with cp.async. 4 warps,
// warp w owns rows 32w..32w+31 of the 128 x 64 score tile (2 x 4 WMMA accumulators, fp32).
// D (issue 20, item 2): when the whole [128, D] query tile fits next to two [64, D] key tiles (D <= ~376
// for 16-bit, <= ~184 for fp32 at the H100's 227 KiB), it stays resident and only key tiles stream;
// otherwise D is walked in chunks of dc features (128 for 16-bit, 64 for fp32): every (key tile, D
// chunk) step streams a [128, dc] query chunk and a [64, dc] key chunk (double-buffered) and the
// accumulators add the chunks up, so every D takes this kernel with ~135 KiB of shared memory.
// fp32 (issue 20, item 1): each fragment element x is split into hi = tf32(x), lo = tf32(x - hi) and
// the tile accumulates hi.lo + lo.hi + hi.hi (3xTF32: about fp32 accuracy; lo.lo, ~2^-22 relative,
// is dropped), or hi.hi only when kSplit is false (the caller's allow_tf32).
// The tile goes to shared memory key-major; thread r then scans row r's 64 scores in ascending key
// order (a strictly larger score replaces: ties keep the lowest key index) and writes (row max,
// arg-max) of a key item when the scan crosses into the next item. Needs D % (16 bytes) == 0, 16-byte
// aligned q and k, sm_80+.
// Row padding of every shared tile is 16 bytes: the row stride is 4 banks off a multiple of 32, so the
// 8 rows x 16 bytes that one WMMA fragment load phase reads hit 32 distinct banks.
constexpr int kFRows = 128;
constexpr int kFKeys = 64;
constexpr int kFThreads = 128;
constexpr int kFLdS = kFRows + 4;  // leading dimension of the key-major fp32 score tile

template <typename T> struct FastTraits {  // fp16 / bf16
  static constexpr int kK = 16;       // WMMA k-step
  static constexpr int kVec = 8;      // elements per 16-byte copy
  static constexpr int kChunk = 128;  // D chunk when the query tile cannot stay resident
};
template <> struct FastTraits<float> {
  static constexpr int kK = 8;
  static constexpr int kVec = 4;
  static constexpr int kChunk = 64;
};

struct FastPlan {
  int dc = 0;       // features per chunk (D when the query tile is resident)
  int ld = 0;       // row stride of the shared tiles, elements
  size_t smem = 0;  // dynamic shared memory, bytes
};

// Byte offsets of fwd_fast_kernel's shared tiles: [Qs0][Qs1 when the query is streamed][Ks0][Ks1][S][Ms].
// The one definition of the layout: the kernel carves its dynamic shared memory with it and the host plan
// sizes the allocation with it (loupe_trs_fast_layout exposes it to the host-side tests).
struct FastOffsets {
  size_t q0, q1, k0, k1, s, ms, end;
};
__host__ __device__ __forceinline__ FastOffsets fast_offsets(int ld, int elem_bytes, bool stream_q) {
  const size_t qt = static_cast<size_t>(kFRows) * ld * elem_bytes, kt = static_cast<size_t>(kFKeys) * ld * elem_bytes;
  FastOffsets o;
  o.q0 = 0;
  o.q1 = stream_q ? qt : 0;
  o.k0 = o.q1 + qt;
  o.k1 = o.k0 + kt;
  o.s = o.k1 + kt;
  o.ms = o.s + static_cast<size_t>(kFKeys) * kFLdS * sizeof(float);
  o.end = o.ms + kFKeys;
  return o;
}

// WMMA needs ldm a multiple of 16 bytes and 256-bit aligned fragment pointers: the score tile's rows
// (kFLdS floats; fragments start at multiples of 16 rows / 16 columns) and the fixed tiles of fwd_wmma_kernel.
static_assert((kFLdS * sizeof(float)) % 16 == 0 && (16 * kFLdS * sizeof(float)) % 32 == 0, "score tile ldm");
static_assert(kFLdS % 8 == 4, "score tile: 4 banks off a multiple of 32 words");

// Shared-memory plan of fwd_fast_kernel<T> for D: resident query tile when it fits smem_optin, else D chunks.
// ld = (width rounded up to the k-step) + 16 bytes: a multiple of 16 bytes (WMMA ldm) whose 32-bit word
// count is 4 mod 8, so 16 rows of a tile are 256-bit aligned and a fragment load hits 32 distinct banks.
template <typename T>
FastPlan fast_plan(int D, size_t smem_optin) {
  using Tr = FastTraits<T>;
  static_assert(Tr::kChunk % Tr::kK == 0 && Tr::kK % Tr::kVec == 0 && Tr::kVec * sizeof(T) == 16, "fast traits");
  const int pad = 16 / static_cast<int>(sizeof(T));
  FastPlan p;
  p.dc = D;
  p.ld = (D + Tr::kK - 1) / Tr::kK * Tr::kK + pad;
  p.smem = fast_offsets(p.ld, sizeof(T), false).end;
  if (p.smem <= smem_optin || D <= Tr::kChunk) return p;
  p.dc = Tr::kChunk;
  p.ld = Tr::kChunk + pad;
  p.smem = fast_offsets(p.ld, sizeof(T), true).end;
  return p;
}

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800  // used only by the sm_80+ kernel bodies
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

using FastAcc = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
using FastAccTf32 = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 8, float>;
template <typename T> struct FastAccOf { using type = FastAcc; };
template <> struct FastAccOf<float> { using type = FastAccTf32; };

// acc[mi][ni] += Qw[rows 16mi.., cols 0..width) . Kc[keys 16ni.., cols 0..width)^T; Qw = this warp's 32 rows.
template <typename T, bool kSplit>
__device__ __forceinline__ void fast_mma(typename FastAccOf<T>::type (&acc)[2][4], const T* Qw, const T* Kc, int ld,
                                         int width) {
  using namespace nvcuda;
#pragma unroll 2
  for (int kk = 0; kk < width; kk += 16) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) wmma::load_matrix_sync(fa[mi], Qw + (mi * 16) * ld + kk, ld);
#pragma unroll
    for (int ni = 0; ni < 4; ++ni) {
      // B = K^T (d x key): element (d, key) at Kc[key * ld + d], i.e. column-major with ld
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
      wmma::load_matrix_sync(fb, Kc + (ni * 16) * ld + kk, ld);
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) wmma::mma_sync(acc[mi][ni], fa[mi], fb, acc[mi][ni]);
    }
  }
}

// hi = tf32(x) in place; lo = tf32(x - hi) (x - hi is exact in fp32). Same fragment type: same layout.
template <typename Frag>
__device__ __forceinline__ void tf32_split(Frag& hi, Frag& lo) {
#pragma unroll
  for (int e = 0; e < hi.num_elements; ++e) {
    const float x = hi.x[e];
    const float h = nvcuda::wmma::__float_to_tf32(x);
    hi.x[e] = h;
    lo.x[e] = nvcuda::wmma::__float_to_tf32(x - h);
  }
}
template <typename Frag>
__device__ __forceinline__ void tf32_round(Frag& f) {
#pragma unroll
  for (int e = 0; e < f.num_elements; ++e) f.x[e] = nvcuda::wmma::__float_to_tf32(f.x[e]);
}

template <>
__device__ __forceinline__ void fast_mma<float, true>(FastAccTf32 (&acc)[2][4], const float* Qw, const float* Kc,
                                                      int ld, int width) {
  using namespace nvcuda;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major>;
  for (int kk = 0; kk < width; kk += 8) {
    FragA ah[2], al[2];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
      wmma::load_matrix_sync(ah[mi], Qw + (mi * 16) * ld + kk, ld);
      tf32_split(ah[mi], al[mi]);
    }
#pragma unroll
    for (int ni = 0; ni < 4; ++ni) {
      FragB bh, bl;
      wmma::load_matrix_sync(bh, Kc + (ni * 16) * ld + kk, ld);
      tf32_split(bh, bl);
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {  // the small terms first, the large one last
        wmma::mma_sync(acc[mi][ni], ah[mi], bl, acc[mi][ni]);
        wmma::mma_sync(acc[mi][ni], al[mi], bh, acc[mi][ni]);
        wmma::mma_sync(acc[mi][ni], ah[mi], bh, acc[mi][ni]);
      }
    }
  }
}

template <>
__device__ __forceinline__ void fast_mma<float, false>(FastAccTf32 (&acc)[2][4], const float* Qw, const float* Kc,
                                                       int ld, int width) {
  using namespace nvcuda;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major>;
#pragma unroll 2
  for (int kk = 0; kk < width; kk += 8) {
    FragA fa[2];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
      wmma::load_matrix_sync(fa[mi], Qw + (mi * 16) * ld + kk, ld);
      tf32_round(fa[mi]);
    }
#pragma unroll
    for (int ni = 0; ni < 4; ++ni) {
      FragB fb;
      wmma::load_matrix_sync(fb, Kc + (ni * 16) * ld + kk, ld);
      tf32_round(fb);
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) wmma::mma_sync(acc[mi][ni], fa[mi], fb, acc[mi][ni]);
    }
  }
}
#endif

// kSplit: fp32 only, 3xTF32 (true) or one TF32 pass (false); ignored for 16-bit types.
template <typename T, bool kSplit>
__global__ void __launch_bounds__(kFThreads, 1) fwd_fast_kernel(const T* __restrict__ q, const T* __restrict__ k,
                                                                const uint8_t* __restrict__ qm,
                                                                const uint8_t* __restrict__ km, int Bq, int Bk,
                                                                int Lq, int Lk, int D, int items, int dc, int ld,
                                                                float* __restrict__ rowmax,
                                                                int32_t* __restrict__ amax) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  using Tr = FastTraits<T>;
  extern __shared__ __align__(128) unsigned char fast_smem[];
  const int nch = (D + dc - 1) / dc;  // D chunks per key tile; 1: the query tile is resident
  const bool stream_q = nch > 1;
  const FastOffsets lay = fast_offsets(ld, sizeof(T), stream_q);  // the host plan sized the allocation with it
  T* Qs0 = reinterpret_cast<T*>(fast_smem + lay.q0);      // [kFRows][ld]
  T* Qs1 = reinterpret_cast<T*>(fast_smem + lay.q1);      // second query buffer (streamed), else Qs0
  T* Ks0 = reinterpret_cast<T*>(fast_smem + lay.k0);      // [kFKeys][ld], buffer 0
  T* Ks1 = reinterpret_cast<T*>(fast_smem + lay.k1);      // [kFKeys][ld], buffer 1
  float* S = reinterpret_cast<float*>(fast_smem + lay.s);  // [kFKeys][kFLdS]
  uint8_t* Ms = fast_smem + lay.ms;                        // [kFKeys] key validity
  const int tid = threadIdx.x, warp = tid / 32;
  const int64_t rows = static_cast<int64_t>(Bq) * Lq;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kFRows;
  const int b_begin = blockIdx.y * items;
  const int b_end = min(Bk, b_begin + items);
  const int64_t kr_begin = static_cast<int64_t>(b_begin) * Lk, kr_end = static_cast<int64_t>(b_end) * Lk;
  const int ntiles = static_cast<int>((kr_end - kr_begin + kFKeys - 1) / kFKeys);
  const int64_t nsteps = static_cast<int64_t>(ntiles) * nch;

  // rows r0.. r0+nrows-1 (zero at and past rend), columns c0.. c0+w-1 of a [*, D] matrix into dst[r][0..w),
  // zeros in columns w.. up to the next k-step (w is a multiple of the 16-byte vector: at most one vector)
  auto load_tile = [&](T* dst, const T* src, int64_t r0, int64_t rend, int nrows, int c0, int w) {
    const int wv = (w + Tr::kK - 1) / Tr::kK * (Tr::kK / Tr::kVec);  // vectors per row, k-step padding included
    for (int e = tid; e < nrows * wv; e += kFThreads) {
      const int r = e / wv, c = (e % wv) * Tr::kVec;
      T* d = dst + static_cast<size_t>(r) * ld + c;
      if (r0 + r < rend && c < w) cp_async16(d, src + (r0 + r) * D + c0 + c);
      else *reinterpret_cast<uint4*>(d) = make_uint4(0u, 0u, 0u, 0u);
    }
  };
  // step s = (key tile s / nch, D chunk s % nch) into buffer s & 1
  auto load_step = [&](int64_t s) {
    const int t = static_cast<int>(s / nch), c0 = static_cast<int>(s % nch) * dc;
    const int w = min(dc, D - c0);
    load_tile((s & 1) ? Ks1 : Ks0, k, kr_begin + static_cast<int64_t>(t) * kFKeys, kr_end, kFKeys, c0, w);
    if (stream_q) load_tile((s & 1) ? Qs1 : Qs0, q, row0, rows, kFRows, c0, w);
  };
  if (!stream_q) load_tile(Qs0, q, row0, rows, kFRows, 0, D);  // resident query tile, with step 0's group
  load_step(0);
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

  typename FastAccOf<T>::type acc[2][4];
  for (int64_t s = 0; s < nsteps; ++s) {
    // The buffers of step s + 1 were last read by step s - 1's MMA, which every thread finished before
    // step s - 1's closing barrier (the chunk barrier or the score-tile barrier below).
    if (s + 1 < nsteps) {
      load_step(s + 1);
      cp_async_commit();
      cp_async_wait<1>();  // everything but step s+1 has landed (this thread's copies)
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // step s (and a resident Q) visible to all; every thread is done with S and Ms
    const int t = static_cast<int>(s / nch), c = static_cast<int>(s % nch);
    const int64_t base = kr_begin + static_cast<int64_t>(t) * kFKeys;
    if (c == 0) {
      if (tid < kFKeys) Ms[tid] = (base + tid < kr_end && km[base + tid]) ? 1 : 0;
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) wmma::fill_fragment(acc[mi][ni], 0.f);
    }
    const int w = min(dc, D - c * dc);
    const int width = (w + Tr::kK - 1) / Tr::kK * Tr::kK;
    const T* Qc = (stream_q && (s & 1)) ? Qs1 : Qs0;
    fast_mma<T, kSplit>(acc, Qc + static_cast<size_t>(warp * 32) * ld, (s & 1) ? Ks1 : Ks0, ld, width);
    if (c + 1 < nch) {
      __syncthreads();  // this step's buffers are refilled by the load issued at step s + 1
      continue;
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
    int col = 0;
    while (col < n) {
      if (base + col == next_b) {  // item cur is complete
        finish(cur);
        ++cur;
        next_b += Lk;
      }
      const int seg = static_cast<int>(min(static_cast<int64_t>(n), next_b - base));  // > col
      const int i0 = static_cast<int>(base - (next_b - Lk));  // key index of column 0 within item cur
#pragma unroll 8
      for (; col < seg; ++col) {
        const float v = S[col * kFLdS + tid];
        if (Ms[col] && (arg < 0 || v > best)) {
          best = v;
          arg = i0 + col;
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

// d_key, deterministic (issue 20, item 6): the forward's arg-max entries are grouped per key row by a
// stable counting sort, then every key row is summed over its own entries.
// dk_group_kernel: one warp per key item b walks its N = (pairwise ? Bq : 1) * Lq entries t (entry t is
// query row e = a * Lq + j, arg-max i = amax(a, b, j)) twice in ascending t, 32 at a time: pass 1
// counts the entries of every key row i, a warp scan turns the counts into segment starts, pass 2 writes
// e at start[i] + (entries of row i met before it) and advances start[i]. Within a 32-entry step the
// lanes with the same i (__match_any_sync) take consecutive slots in lane order and only the lowest of
// them updates start[i], so no two lanes ever write the same word (no atomics) and every segment lists
// its entries in ascending t, i.e. ascending (a, j): the order is fixed by construction. Afterwards
// seg[b * Lk + i] is the end of row i's segment in ent[b * N ...] (its start: seg[... i - 1], or 0).
// The counters live in shared memory when Lk ints fit (SMEM), else in seg itself.
__device__ __forceinline__ int dk_entry_argmax(const int32_t* amax, int b, int t, int N, int Bk, int Lq, int pairwise) {
  if (t >= N) return -1;
  if (!pairwise) return amax[static_cast<size_t>(b) * Lq + t];
  const int a = t / Lq, j = t % Lq;
  return amax[(static_cast<size_t>(a) * Bk + b) * Lq + j];
}

__global__ void __launch_bounds__(32) dk_group_kernel(const int32_t* __restrict__ amax, int Bq, int Bk, int Lq, int Lk,
                                                      int pairwise, int use_smem, int32_t* __restrict__ seg,
                                                      int32_t* __restrict__ ent) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int b = blockIdx.x;
  const int lane = threadIdx.x;
  const unsigned lt = (1u << lane) - 1u;  // lanes below this one
  const int N = (pairwise ? Bq : 1) * Lq;
  int32_t* cnt = use_smem ? reinterpret_cast<int32_t*>(smem_raw) : seg + static_cast<size_t>(b) * Lk;
  int32_t* out = ent + static_cast<size_t>(b) * N;
  const int e_off = pairwise ? 0 : b * Lq;  // entry t is query row e_off + t
  for (int i = lane; i < Lk; i += 32) cnt[i] = 0;
  __syncwarp();
  // pass 1: counts (each distinct i of a step is added by one lane: its lowest peer)
  for (int t0 = 0; t0 < N; t0 += 32) {
    const int i = dk_entry_argmax(amax, b, t0 + lane, N, Bk, Lq, pairwise);
    const unsigned peers = __match_any_sync(0xffffffffu, i);
    if (i >= 0 && (peers & lt) == 0) cnt[i] += __popc(peers);
    __syncwarp();
  }
  // exclusive scan: cnt[i] = first slot of row i
  int carry = 0;
  for (int i0 = 0; i0 < Lk; i0 += 32) {
    const int v = i0 + lane < Lk ? cnt[i0 + lane] : 0;
    int incl = v;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int u = __shfl_up_sync(0xffffffffu, incl, off);
      if (lane >= off) incl += u;
    }
    if (i0 + lane < Lk) cnt[i0 + lane] = carry + incl - v;
    carry += __shfl_sync(0xffffffffu, incl, 31);
  }
  __syncwarp();
  // pass 2: stable scatter; afterwards cnt[i] is the end of row i's segment
  for (int t0 = 0; t0 < N; t0 += 32) {
    const int i = dk_entry_argmax(amax, b, t0 + lane, N, Bk, Lq, pairwise);
    const unsigned peers = __match_any_sync(0xffffffffu, i);
    const int slot = i >= 0 ? cnt[i] + __popc(peers & lt) : 0;
    __syncwarp();  // every peer has read cnt[i] before its leader advances it
    if (i >= 0) {
      out[slot] = e_off + t0 + lane;
      if ((peers & lt) == 0) cnt[i] += __popc(peers);
    }
    __syncwarp();
  }
  if (use_smem)
    for (int i = lane; i < Lk; i += 32) seg[static_cast<size_t>(b) * Lk + i] = cnt[i];
}

// dk_sum_kernel: one warp per key row (b, i); lane l owns features d0 + l + 32s (s < 8) of each 256-feature
// chunk and adds w(a, b) q[a, j, d] over the row's segment in its (ascending (a, j)) order: each output
// element is one lane's sequential sum in a fixed order, so the result is bit-identical across runs.
constexpr int kDkSumWarps = 8;
template <typename T>
__global__ void __launch_bounds__(kDkSumWarps * 32) dk_sum_kernel(const T* __restrict__ grad, const T* __restrict__ q,
                                                                  const typename AccOf<T>::type* __restrict__ inv,
                                                                  const int32_t* __restrict__ seg,
                                                                  const int32_t* __restrict__ ent, int Bq, int Bk,
                                                                  int Lq, int Lk, int D, int pairwise,
                                                                  T* __restrict__ dk) {
  using A = typename AccOf<T>::type;
  const int lane = threadIdx.x % 32;
  const int64_t krow = static_cast<int64_t>(blockIdx.x) * kDkSumWarps + threadIdx.x / 32;
  if (krow >= static_cast<int64_t>(Bk) * Lk) return;  // whole warp; no barriers below
  const int b = static_cast<int>(krow / Lk), i = static_cast<int>(krow % Lk);
  const int N = (pairwise ? Bq : 1) * Lq;
  const int32_t* list = ent + static_cast<size_t>(b) * N;
  const int p_begin = i > 0 ? seg[krow - 1] : 0, p_end = seg[krow];
  for (int d0 = 0; d0 < D; d0 += 256) {
    A acc[8];
#pragma unroll
    for (int s = 0; s < 8; ++s) acc[s] = A(0);
    for (int p0 = p_begin; p0 < p_end; p0 += 32) {
      // 32 entries at once: their query rows and weights, then added one by one in order
      int e_mine = 0;
      A w_mine = A(0);
      if (p0 + lane < p_end) {
        e_mine = list[p0 + lane];
        const int a = e_mine / Lq;
        const size_t pair = pairwise ? static_cast<size_t>(a) * Bk + b : static_cast<size_t>(a);
        w_mine = to_acc(grad[pair]) * inv[a];
      }
      const int n = min(32, p_end - p0);
      for (int u = 0; u < n; ++u) {
        const int e = __shfl_sync(0xffffffffu, e_mine, u);
        const A w = __shfl_sync(0xffffffffu, w_mine, u);
        if (w == A(0)) continue;  // uniform across the warp
        const T* qr = q + static_cast<size_t>(e) * D + d0 + lane;
#pragma unroll
        for (int s = 0; s < 8; ++s)
          if (d0 + lane + 32 * s < D) acc[s] += w * to_acc(qr[32 * s]);
      }
    }
    T* o = dk + static_cast<size_t>(krow) * D + d0 + lane;
#pragma unroll
    for (int s = 0; s < 8; ++s)
      if (d0 + lane + 32 * s < D) o[32 * s] = from_acc<T>(acc[s]);
  }
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
  int major = 0;                // 0 when unknown: no sm_80+ kernel is launched
  int smem_optin = 48 * 1024;   // bytes of shared memory a block may opt in to (48 KiB: every device)
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

// Launches fwd_fast_kernel<T, kSplit> when the call qualifies (sm_80+, pairwise, D a multiple of 16 bytes,
// 16-byte aligned q and k, the plan's shared memory within the device's opt-in limit); false otherwise.
template <typename T, bool kSplit>
bool launch_fast(const T* q, const T* k, const uint8_t* qm, const uint8_t* km, int Bq, int Bk, int Lq, int Lk, int D,
                 int pairwise, float* rowmax, int32_t* amax, const DeviceInfo& dev, cudaStream_t stream,
                 cudaError_t* err) {
  const bool aligned = reinterpret_cast<uintptr_t>(q) % 16 == 0 && reinterpret_cast<uintptr_t>(k) % 16 == 0;
  if (!(dev.major >= 8 && pairwise && Lk > 0 && D > 0 && D % FastTraits<T>::kVec == 0 && aligned)) return false;
  const FastPlan plan = fast_plan<T>(D, static_cast<size_t>(dev.smem_optin));
  if (plan.smem > static_cast<size_t>(dev.smem_optin)) return false;
  // about 3136 key rows (49 tiles of 64 at Lk = 196) per block: the query tile is loaded once per chunk
  int items = std::max(1, std::min(Bk, 3136 / Lk));
  if ((Bk + items - 1) / items > 65535) items = (Bk + 65534) / 65535;
  const dim3 grid(static_cast<unsigned>((static_cast<int64_t>(Bq) * Lq + kFRows - 1) / kFRows),
                  static_cast<unsigned>((Bk + items - 1) / items));
  *err = cudaFuncSetAttribute(fwd_fast_kernel<T, kSplit>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(plan.smem));
  if (*err == cudaSuccess)
    fwd_fast_kernel<T, kSplit><<<grid, kFThreads, plan.smem, stream>>>(q, k, qm, km, Bq, Bk, Lq, Lk, D, items,
                                                                      plan.dc, plan.ld, rowmax, amax);
  return true;
}

template <typename T>
cudaError_t forward_t(const T* q, const T* k, const uint8_t* qm, const uint8_t* km, int Bq, int Bk, int Lq,
                      int Lk, int D, int pairwise, int allow_tf32, void* ws, T* out, int32_t* amax,
                      cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  A* rowmax = static_cast<A*>(ws);
  if (Bq > 0 && Lq > 0 && Bk > 0) {
    const DeviceInfo dev = device_info();
    bool launched = false;
    cudaError_t e = cudaSuccess;
    if constexpr (sizeof(T) == 2) {
      launched = launch_fast<T, false>(q, k, qm, km, Bq, Bk, Lq, Lk, D, pairwise, rowmax, amax, dev, stream, &e);
      if (!launched && dev.major >= 8) {  // the WMMA kernels are compiled for sm_80 and newer
        const dim3 grid = tile_grid(Bq, Bk, Lq, pairwise);
        if (grid.y > 65535) return cudaErrorInvalidConfiguration;
        fwd_wmma_kernel<T><<<grid, kThreads, 0, stream>>>(q, k, qm, km, Bq, Bk, Lq, Lk, D, pairwise, rowmax, amax);
        launched = true;
      }
    } else if constexpr (std::is_same<T, float>::value) {
      launched = allow_tf32
                     ? launch_fast<float, false>(q, k, qm, km, Bq, Bk, Lq, Lk, D, pairwise, rowmax, amax, dev, stream, &e)
                     : launch_fast<float, true>(q, k, qm, km, Bq, Bk, Lq, Lk, D, pairwise, rowmax, amax, dev, stream, &e);
    }
    if (e != cudaSuccess) return e;
    if (!launched) {
      const dim3 grid = tile_grid(Bq, Bk, Lq, pairwise);
      if (grid.y > 65535) return cudaErrorInvalidConfiguration;
      fwd_simt_kernel<T><<<grid, kThreads, 0, stream>>>(q, k, qm, km, Bq, Bk, Lq, Lk, D, pairwise, rowmax, amax);
    }
    e = cudaGetLastError();
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
    // atomic only where it fits: <= 48 KiB always (no grouped workspace is allocated then: see
    // loupe_trs_backward_workspace), above that up to the device's opt-in limit
    if (!deterministic && (smem_atomic <= 48 * 1024 || smem_atomic <= static_cast<size_t>(dev.smem_optin))) {
      const dim3 grid(static_cast<unsigned>(Bk), static_cast<unsigned>((D + kDkCols - 1) / kDkCols));
      if (smem_atomic > 48 * 1024) {
        const cudaError_t e = cudaFuncSetAttribute(dk_atomic_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                   static_cast<int>(smem_atomic));
        if (e != cudaSuccess) return e;
      }
      dk_atomic_kernel<T><<<grid, kDkWarps * 32, smem_atomic, stream>>>(grad, q, amax, inv, Bq, Bk, Lq, Lk, D,
                                                                         pairwise, dk);
    } else {  // grouped by key row (the workspace holds seg and ent: see loupe_trs_backward_workspace)
      int32_t* seg = reinterpret_cast<int32_t*>(inv + (Bq > 0 ? Bq : 1));
      int32_t* ent = seg + static_cast<size_t>(Bk) * Lk;
      const size_t smem = static_cast<size_t>(Lk) * sizeof(int32_t);
      const int use_smem = smem <= 48 * 1024 ? 1 : 0;
      dk_group_kernel<<<static_cast<unsigned>(Bk), 32, use_smem ? smem : 0, stream>>>(amax, Bq, Bk, Lq, Lk, pairwise,
                                                                                     use_smem, seg, ent);
      const int64_t krows = static_cast<int64_t>(Bk) * Lk;
      dk_sum_kernel<T><<<static_cast<unsigned>((krows + kDkSumWarps - 1) / kDkSumWarps), kDkSumWarps * 32, 0,
                         stream>>>(grad, q, inv, seg, ent, Bq, Bk, Lq, Lk, D, pairwise, dk);
    }
  }
  return cudaGetLastError();
}

}  // namespace

size_t loupe_trs_forward_workspace(int dtype, int Bq, int Bk, int Lq, int pairwise) {
  const size_t rows = (pairwise ? static_cast<size_t>(Bq) * Bk : static_cast<size_t>(Bq)) * Lq;
  return (rows > 0 ? rows : 1) * acc_size(dtype);
}

size_t loupe_trs_backward_workspace(int dtype, int Bq, int Bk, int Lq, int Lk, int D, int pairwise,
                                    int deterministic) {
  (void)D;
  size_t bytes = static_cast<size_t>(Bq > 0 ? Bq : 1) * acc_size(dtype);  // inv
  // the grouped d_key: always when deterministic, and when the atomic accumulator may not fit (> 48 KiB)
  if (deterministic || static_cast<size_t>(Lk) * kDkCols * acc_size(dtype) > 48 * 1024) {
    const size_t N = static_cast<size_t>(pairwise ? Bq : 1) * Lq;
    bytes += (static_cast<size_t>(Bk) * Lk + static_cast<size_t>(Bk) * N) * sizeof(int32_t);  // seg + ent
  }
  return bytes;
}

cudaError_t loupe_trs_forward(const void* q, const void* k, int dtype, const uint8_t* qm, const uint8_t* km,
                              int Bq, int Bk, int Lq, int Lk, int D, int pairwise, int allow_tf32, void* workspace,
                              void* out, int32_t* amax, cudaStream_t stream) {
  if (Bq < 0 || Bk < 0 || Lq < 0 || Lk < 0 || D < 0) return cudaErrorInvalidValue;
  if (!pairwise && Bq != Bk) return cudaErrorInvalidValue;
  switch (dtype) {
    case LOUPE_F32:
      return forward_t(static_cast<const float*>(q), static_cast<const float*>(k), qm, km, Bq, Bk, Lq, Lk, D,
                       pairwise, allow_tf32, workspace, static_cast<float*>(out), amax, stream);
    case LOUPE_F64:
      return forward_t(static_cast<const double*>(q), static_cast<const double*>(k), qm, km, Bq, Bk, Lq, Lk, D,
                       pairwise, allow_tf32, workspace, static_cast<double*>(out), amax, stream);
    case LOUPE_F16:
      return forward_t(static_cast<const __half*>(q), static_cast<const __half*>(k), qm, km, Bq, Bk, Lq, Lk, D,
                       pairwise, allow_tf32, workspace, static_cast<__half*>(out), amax, stream);
    case LOUPE_BF16:
      return forward_t(static_cast<const __nv_bfloat16*>(q), static_cast<const __nv_bfloat16*>(k), qm, km, Bq, Bk,
                       Lq, Lk, D, pairwise, allow_tf32, workspace, static_cast<__nv_bfloat16*>(out), amax, stream);
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

int loupe_trs_fast_layout(int dtype, int D, int smem_optin, LoupeTrsFastLayout* out) {
  FastPlan p;
  int vec = 0, k_step = 0, elem = 0;
  switch (dtype) {
    case LOUPE_F32:
      p = fast_plan<float>(D, static_cast<size_t>(smem_optin));
      vec = FastTraits<float>::kVec, k_step = FastTraits<float>::kK, elem = 4;
      break;
    case LOUPE_F16:
      p = fast_plan<__half>(D, static_cast<size_t>(smem_optin));
      vec = FastTraits<__half>::kVec, k_step = FastTraits<__half>::kK, elem = 2;
      break;
    case LOUPE_BF16:
      p = fast_plan<__nv_bfloat16>(D, static_cast<size_t>(smem_optin));
      vec = FastTraits<__nv_bfloat16>::kVec, k_step = FastTraits<__nv_bfloat16>::kK, elem = 2;
      break;
    default: break;
  }
  const bool ok = vec > 0 && D > 0 && D % vec == 0 && p.smem <= static_cast<size_t>(smem_optin);
  if (!out) return ok ? 1 : 0;
  *out = LoupeTrsFastLayout{};
  if (!ok) return 0;
  const FastOffsets o = fast_offsets(p.ld, elem, (D + p.dc - 1) / p.dc > 1);
  out->d_chunk = p.dc;
  out->ld = p.ld;
  out->elem_bytes = elem;
  out->vec = vec;
  out->k_step = k_step;
  out->rows = kFRows;
  out->keys = kFKeys;
  out->ld_scores = kFLdS;
  out->q0 = o.q0, out->q1 = o.q1, out->k0 = o.k0, out->k1 = o.k1, out->scores = o.s, out->key_mask = o.ms;
  out->bytes = p.smem;
  return 1;
}

size_t loupe_trs_fast_smem_bytes(int dtype, int D, int smem_optin, int* d_chunk) {
  FastPlan p;
  int vec = 0;
  switch (dtype) {
    case LOUPE_F32: p = fast_plan<float>(D, static_cast<size_t>(smem_optin)); vec = FastTraits<float>::kVec; break;
    case LOUPE_F16: p = fast_plan<__half>(D, static_cast<size_t>(smem_optin)); vec = FastTraits<__half>::kVec; break;
    case LOUPE_BF16:
      p = fast_plan<__nv_bfloat16>(D, static_cast<size_t>(smem_optin));
      vec = FastTraits<__nv_bfloat16>::kVec;
      break;
    default: break;
  }
  const bool ok = vec > 0 && D > 0 && D % vec == 0 && p.smem <= static_cast<size_t>(smem_optin);
  if (d_chunk) *d_chunk = ok ? p.dc : 0;
  return ok ? p.smem : 0;
}
