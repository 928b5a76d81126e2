// Token-region similarity on CUDA (METHOD section 3). Torch-free: raw pointers and launchers.
//
// Forward: one block per (tile of 64 query rows, chunk of key items). Query rows are the rows of
// q viewed as [Bq*Lq, D] (pairwise) or the rows of one query item (aligned, pairwise = 0). For
// every key item of its chunk the block walks the key tokens in tiles of 64: the 64x64 score tile
// comes from WMMA (fp16/bf16, fp32 accumulation) or from a register-tiled FMA loop (fp32/fp64);
// each of the 256 threads holds 4 rows x 4 keys of it, reduces them to a per-row (max, lowest
// index) and a 16-lane butterfly gives the tile's row maxima; a running max is replaced only by a
// strictly larger tile max, so ties keep the lowest key index. Only one 64x64 tile of scores exists
// per block. Row maxima and arg-maxes go to global memory; a second kernel sums the row maxima of
// each pair over the valid query tokens in a fixed order and divides by their count.
// Backward (deterministic, no atomics), with w(a, b) = g(a, b) / count_a:
//   d_query[a, j, :] = sum_b w(a, b) k[b, amax(a, b, j), :]: a block per query row, a thread per
//     feature, b in order;
//   d_key[b, i, :] = sum_{a, j: amax(a, b, j) = i} w(a, b) q[a, j, :]: a warp per (key item, 32
//     features), each lane owning one feature column of the item in shared memory (global memory
//     when Lk is large), (a, j) in order.
#include "cuda/token_region_similarity.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cfloat>
#include <cstdint>

namespace {

constexpr int kRows = 64;      // query rows per block
constexpr int kKeys = 64;      // key tokens per tile
constexpr int kThreads = 256;  // 16 x 16 threads; thread (ty, tx) owns rows ty + 16r, keys tx + 16c
constexpr int kItemsPerBlock = 8;

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_acc(typename AccOf<T>::type x);
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename T> __device__ __forceinline__ T zero_of() { return from_acc<T>(0); }

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

// d_query: block (query row, 128-feature chunk), thread per feature; key items in order.
template <typename T>
__global__ void dq_kernel(const T* __restrict__ grad, const T* __restrict__ k, const int32_t* __restrict__ amax,
                          const typename AccOf<T>::type* __restrict__ inv, int Bk, int Lq, int Lk, int D,
                          int pairwise, T* __restrict__ dq) {
  using A = typename AccOf<T>::type;
  const int row = blockIdx.x;
  const int d = blockIdx.y * blockDim.x + threadIdx.x;
  if (d >= D) return;
  const int a = row / Lq, j = row % Lq;
  A acc = 0;
  const A ia = inv[a];
  if (pairwise) {
    for (int b = 0; b < Bk; ++b) {
      const int i = amax[(static_cast<size_t>(a) * Bk + b) * Lq + j];
      if (i < 0) continue;
      const A w = to_acc(grad[static_cast<size_t>(a) * Bk + b]) * ia;
      acc += w * to_acc(k[(static_cast<size_t>(b) * Lk + i) * D + d]);
    }
  } else {
    const int i = amax[row];
    if (i >= 0) acc = to_acc(grad[a]) * ia * to_acc(k[(static_cast<size_t>(a) * Lk + i) * D + d]);
  }
  dq[static_cast<size_t>(row) * D + d] = from_acc<T>(acc);
}

// d_key: one warp per (key item, 32 features); lane l owns feature column d of the item's Lk rows,
// in shared memory (SHARED) or in the global workspace; (a, j) in order -> deterministic.
template <typename T, bool SHARED>
__global__ void dk_kernel(const T* __restrict__ grad, const T* __restrict__ q, const int32_t* __restrict__ amax,
                          const typename AccOf<T>::type* __restrict__ inv, int Bq, int Bk, int Lq, int Lk, int D,
                          int pairwise, typename AccOf<T>::type* __restrict__ ws, T* __restrict__ dk) {
  using A = typename AccOf<T>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int b = blockIdx.x;
  const int lane = threadIdx.x;
  const int d = blockIdx.y * 32 + lane;
  if (d >= D) return;  // no barrier below: every lane only touches its own column
  A* col = SHARED ? reinterpret_cast<A*>(smem_raw) + lane : ws + static_cast<size_t>(b) * Lk * D + d;
  const size_t stride = SHARED ? 32 : static_cast<size_t>(D);
  for (int i = 0; i < Lk; ++i) col[i * stride] = 0;
  const int a_begin = pairwise ? 0 : b, a_end = pairwise ? Bq : b + 1;
  for (int a = a_begin; a < a_end; ++a) {
    const A w = to_acc(grad[pairwise ? static_cast<size_t>(a) * Bk + b : static_cast<size_t>(a)]) * inv[a];
    if (w == A(0)) continue;
    const int32_t* am = amax + (pairwise ? (static_cast<size_t>(a) * Bk + b) * Lq : static_cast<size_t>(a) * Lq);
    const T* qa = q + static_cast<size_t>(a) * Lq * D + d;
    for (int j = 0; j < Lq; ++j) {
      const int i = am[j];
      if (i >= 0) col[i * stride] += w * to_acc(qa[static_cast<size_t>(j) * D]);
    }
  }
  T* out = dk + static_cast<size_t>(b) * Lk * D + d;
  for (int i = 0; i < Lk; ++i) out[static_cast<size_t>(i) * D] = from_acc<T>(col[i * stride]);
}

int grid_1d(size_t n, int threads) {
  const size_t blocks = (n + threads - 1) / threads;
  return static_cast<int>(blocks < 65535 * 32 ? (blocks > 0 ? blocks : 1) : 65535 * 32);
}

size_t acc_size(int dtype) { return dtype == LOUPE_TRS_F64 ? sizeof(double) : sizeof(float); }

template <typename T>
cudaError_t forward_t(const T* q, const T* k, const uint8_t* qm, const uint8_t* km, int Bq, int Bk, int Lq,
                      int Lk, int D, int pairwise, void* ws, T* out, int32_t* amax, cudaStream_t stream,
                      bool tensor_cores) {
  using A = typename AccOf<T>::type;
  A* rowmax = static_cast<A*>(ws);
  if (Bq > 0 && Lq > 0 && (pairwise ? Bk > 0 : true)) {
    dim3 grid;
    if (pairwise) {
      grid = dim3(static_cast<unsigned>((static_cast<size_t>(Bq) * Lq + kRows - 1) / kRows),
                  static_cast<unsigned>((Bk + kItemsPerBlock - 1) / kItemsPerBlock));
    } else {
      grid = dim3(static_cast<unsigned>(static_cast<size_t>(Bq) * ((Lq + kRows - 1) / kRows)), 1);
    }
    if (grid.y > 65535) return cudaErrorInvalidConfiguration;
    if constexpr (sizeof(T) == 2) {
      if (tensor_cores) {
        fwd_wmma_kernel<T><<<grid, kThreads, 0, stream>>>(q, k, qm, km, Bq, Bk, Lq, Lk, D, pairwise, rowmax, amax);
      } else {
        fwd_simt_kernel<T><<<grid, kThreads, 0, stream>>>(q, k, qm, km, Bq, Bk, Lq, Lk, D, pairwise, rowmax, amax);
      }
    } else {
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
                       int Bk, int Lq, int Lk, int D, int pairwise, void* ws, T* dq, T* dk, cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  if (D == 0) return cudaSuccess;
  A* inv = static_cast<A*>(ws);
  A* colws = inv + (Bq > 0 ? Bq : 1);
  if (Bq > 0) {
    inv_count_kernel<T><<<(Bq + 255) / 256, 256, 0, stream>>>(qm, Bq, Lq, inv);
    if (Lq > 0) {
      const dim3 grid(static_cast<unsigned>(static_cast<size_t>(Bq) * Lq), static_cast<unsigned>((D + 127) / 128));
      dq_kernel<T><<<grid, 128, 0, stream>>>(grad, k, amax, inv, Bk, Lq, Lk, D, pairwise, dq);
    }
  }
  if (Bk > 0 && Lk > 0) {
    const dim3 grid(static_cast<unsigned>(Bk), static_cast<unsigned>((D + 31) / 32));
    const size_t smem = static_cast<size_t>(Lk) * 32 * sizeof(A);
    if (smem <= 48 * 1024) {
      dk_kernel<T, true><<<grid, 32, smem, stream>>>(grad, q, amax, inv, Bq, Bk, Lq, Lk, D, pairwise, colws, dk);
    } else {
      dk_kernel<T, false><<<grid, 32, 0, stream>>>(grad, q, amax, inv, Bq, Bk, Lq, Lk, D, pairwise, colws, dk);
    }
  }
  return cudaGetLastError();
}

bool has_tensor_cores() {
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return false;
  return major >= 8;  // the WMMA kernel is compiled for sm_80 and newer (bf16 fragments)
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
  const bool tc = has_tensor_cores();
  switch (dtype) {
    case LOUPE_TRS_F32:
      return forward_t(static_cast<const float*>(q), static_cast<const float*>(k), qm, km, Bq, Bk, Lq, Lk, D,
                       pairwise, workspace, static_cast<float*>(out), amax, stream, tc);
    case LOUPE_TRS_F64:
      return forward_t(static_cast<const double*>(q), static_cast<const double*>(k), qm, km, Bq, Bk, Lq, Lk, D,
                       pairwise, workspace, static_cast<double*>(out), amax, stream, tc);
    case LOUPE_TRS_F16:
      return forward_t(static_cast<const __half*>(q), static_cast<const __half*>(k), qm, km, Bq, Bk, Lq, Lk, D,
                       pairwise, workspace, static_cast<__half*>(out), amax, stream, tc);
    case LOUPE_TRS_BF16:
      return forward_t(static_cast<const __nv_bfloat16*>(q), static_cast<const __nv_bfloat16*>(k), qm, km, Bq, Bk,
                       Lq, Lk, D, pairwise, workspace, static_cast<__nv_bfloat16*>(out), amax, stream, tc);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t loupe_trs_backward(const void* grad, const void* q, const void* k, int dtype, const uint8_t* qm,
                               const int32_t* amax, int Bq, int Bk, int Lq, int Lk, int D, int pairwise,
                               void* workspace, void* dq, void* dk, cudaStream_t stream) {
  if (Bq < 0 || Bk < 0 || Lq < 0 || Lk < 0 || D < 0) return cudaErrorInvalidValue;
  if (!pairwise && Bq != Bk) return cudaErrorInvalidValue;
  switch (dtype) {
    case LOUPE_TRS_F32:
      return backward_t(static_cast<const float*>(grad), static_cast<const float*>(q), static_cast<const float*>(k),
                        qm, amax, Bq, Bk, Lq, Lk, D, pairwise, workspace, static_cast<float*>(dq),
                        static_cast<float*>(dk), stream);
    case LOUPE_TRS_F64:
      return backward_t(static_cast<const double*>(grad), static_cast<const double*>(q),
                        static_cast<const double*>(k), qm, amax, Bq, Bk, Lq, Lk, D, pairwise, workspace,
                        static_cast<double*>(dq), static_cast<double*>(dk), stream);
    case LOUPE_TRS_F16:
      return backward_t(static_cast<const __half*>(grad), static_cast<const __half*>(q),
                        static_cast<const __half*>(k), qm, amax, Bq, Bk, Lq, Lk, D, pairwise, workspace,
                        static_cast<__half*>(dq), static_cast<__half*>(dk), stream);
    case LOUPE_TRS_BF16:
      return backward_t(static_cast<const __nv_bfloat16*>(grad), static_cast<const __nv_bfloat16*>(q),
                        static_cast<const __nv_bfloat16*>(k), qm, amax, Bq, Bk, Lq, Lk, D, pairwise, workspace,
                        static_cast<__nv_bfloat16*>(dq), static_cast<__nv_bfloat16*>(dk), stream);
    default:
      return cudaErrorInvalidValue;
  }
}
