// Shapley coalition sampling on CUDA (METHOD section 5). Torch-free; compiled, not run on a GPU here.
//
// Max-sim, lanes kernel (used when Lq <= 64 and the game's columns fit in shared memory): one block
// per (game g, subset m), one THREAD per sample k (threads stride over K). The block stages the key
// columns of sim[g] transposed (colT[i][j], float) in shared memory and lists the pool and the members
// of S with ballots. Each thread draws its own coalition from its Philox stream (k, m, g, b), walking
// the pool positions in order, and folds each member into its running maxima mC[LQ] held in registers
// (all threads of a warp read the same column: broadcast loads). The query players of C (region-phrase
// game) are a bit set in registers. v(C), v(C u {i}), v(C u S) are then one masked sum over the tokens
// each, with identical arithmetic for v(C u S) and v(C u {i}) when S = {i} (so |S| = 1 gives exactly 0).
// Welford per thread, merged per block in a fixed order.
//
// Max-sim, warp kernel (any Lq, any n): one block per (game g, subset m), one warp per sample k.
// The warp draws its coalition from the pinned Philox4x32-10 counter (k, m, g, b) in registers
// (all lanes compute the same words: the decisions are warp-uniform), walking the players in order
// with selection sampling; each member taken is folded at once into the warp's running masked max
// mC[Lq] (lanes own tokens j = lane, lane + 32, ...). Then v(C), v(C u {i}), v(C u S) come from
// element-wise maxima and warp sums. Welford per warp, merged per block. Nothing of size [K, P].
#include "shapley.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace {

__device__ __forceinline__ void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = __umulhi(0xD2511F53u, c[0]), lo0 = 0xD2511F53u * c[0];
    const uint32_t hi1 = __umulhi(0xCD9E8D57u, c[2]), lo1 = 0xCD9E8D57u * c[2];
    const uint32_t n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
    c[0] = n0; c[1] = lo1; c[2] = n2; c[3] = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

struct Stream {
  uint32_t k0, k1, c0, c1, c2;
  int64_t blk;
  uint32_t buf[4];
  __device__ Stream(uint64_t seed, uint32_t k, uint32_t m, uint32_t g)
      : k0(uint32_t(seed)), k1(uint32_t(seed >> 32)), c0(k), c1(m), c2(g), blk(-1) {}
  __device__ __forceinline__ uint32_t word(int64_t w) {
    const int64_t b = w >> 2;
    if (b != blk) {
      buf[0] = c0; buf[1] = c1; buf[2] = c2; buf[3] = uint32_t(b);
      philox4x32_10(buf, k0, k1);
      blk = b;
    }
    const int j = int(w & 3);
    return j == 0 ? buf[0] : j == 1 ? buf[1] : j == 2 ? buf[2] : buf[3];
  }
};

// Size r of sample k's coalition (pool of npool players, n' = npool + 1).
__device__ __forceinline__ int64_t draw_size(Stream& st, uint64_t seed, int k, int m, int g, int64_t npool,
                                             int schedule) {
  const uint64_t np = uint64_t(npool + 1);
  const uint32_t u0 = st.word(0);
  if (schedule == 0) return int64_t((uint64_t(u0) * np) >> 32);
  Stream s0(seed, 0u, uint32_t(m), uint32_t(g));
  const uint64_t off = (uint64_t(s0.word(0)) * np) >> 32;
  return int64_t((uint64_t(k) + off) % np);
}

// Pinned selection rule for pool position t (rem = npool - t players left), need = r - c > 0.
__device__ __forceinline__ bool take_it(Stream& st, int64_t t, int64_t rem, int64_t need) {
  if (need == rem) return true;
  return uint64_t(st.word(1 + t)) * uint64_t(rem) < (uint64_t(need) << 32);
}

using loupe_cuda::load_acc;

__device__ __forceinline__ double warp_sum(double x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// One more sample x in a running Welford state (count n, mean, m2).
__device__ __forceinline__ void welford_add(double x, double& n, double& mean, double& m2) {
  n += 1.0;
  const double d = x - mean;
  mean += d / n;
  m2 += d * (x - mean);
}

// Welford states (count, mean, m2) of the threads (or warps) in wf[3 * i], merged in index order.
__device__ __forceinline__ void merge_welford(const double* wf, int parts, double& mean, double& se) {
  double N = 0, mu = 0, m2 = 0;
  for (int w = 0; w < parts; ++w) {  // Chan et al. merge
    const double nb = wf[3 * w], mb = wf[3 * w + 1], qb = wf[3 * w + 2];
    if (nb == 0) continue;
    const double tot = N + nb, delta = mb - mu;
    mu += delta * nb / tot;
    m2 += qb + delta * delta * N * nb / tot;
    N = tot;
  }
  mean = mu;
  se = N > 1 ? sqrt(m2 / (N - 1)) / sqrt(N) : double(INFINITY);
}

// Thread 0 merges the Welford states of the block's parts (wf) in a fixed order into est / se of the task.
template <typename A>
__device__ __forceinline__ void write_stats(const double* wf, int parts, int task, A* est, A* se) {
  if (threadIdx.x == 0) {
    double mean, sd;
    merge_welford(wf, parts, mean, sd);
    est[task] = A(mean);
    se[task] = A(sd);
  }
}

// T: input type, A: compute type (float, or double for double input)
template <typename T, typename A>
__global__ void maxsim_kernel(const T* __restrict__ sim, const int64_t* __restrict__ gidx, const uint8_t* __restrict__ qm,
                              const uint8_t* __restrict__ S, const uint8_t* __restrict__ pm, int M, int Lq, int n,
                              int P, int K, int query_players, uint64_t seed, int schedule, A* est, A* se) {
  extern __shared__ unsigned char smem_raw[];
  const int warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int task = blockIdx.x, g = task / M, m = task % M;
  const uint8_t* Sg = S + int64_t(task) * P;
  const uint8_t* valid = pm + int64_t(g) * P;
  const T* sg = sim + (gidx ? gidx[g] : int64_t(g)) * Lq * n;   // game g plays on sim[game_index[g]]
  const int qoff = query_players ? Lq : 0;  // players < qoff are query tokens

  // shared layout: sS[Lq] (A), mC[warps][Lq] (A), welford[warps][3] (double), flags
  double* wf = reinterpret_cast<double*>(smem_raw);
  A* sS = reinterpret_cast<A*>(wf + 3 * warps);
  A* mCall = sS + Lq;
  uint8_t* qv = reinterpret_cast<uint8_t*>(mCall + int64_t(warps) * Lq);  // query token counts
  uint8_t* sq = qv + Lq;                                                   // query players in S
  uint8_t* inQall = sq + Lq;                                               // [warps][Lq]
  __shared__ int64_t npool_s;
  __shared__ int s_count, s_keys;

  for (int j = threadIdx.x; j < Lq; j += blockDim.x) {
    qv[j] = query_players ? valid[j] : qm[int64_t(g) * Lq + j];
    sq[j] = query_players ? Sg[j] : 0;
    A best = -INFINITY;
    for (int p = qoff; p < P; ++p)
      if (Sg[p]) { const A x = load_acc<T, A>(sg + int64_t(j) * n + (p - qoff)); best = x > best ? x : best; }
    sS[j] = best;
  }
  if (threadIdx.x == 0) {
    int64_t np = 0;
    int sc = 0, sk = 0;
    for (int p = 0; p < P; ++p) {
      if (Sg[p]) { ++sc; sk += p >= qoff; }
      else if (valid[p]) ++np;
    }
    npool_s = np; s_count = sc; s_keys = sk;
  }
  __syncthreads();
  const int64_t npool = npool_s;
  A* mC = mCall + int64_t(warp) * Lq;
  uint8_t* inQ = inQall + int64_t(warp) * Lq;

  // value of C plus an optional extra key column (col >= 0: sim[:, col]; col == -2: sS) and extra
  // query players (xq >= 0: that token; xq == -2: the query players of S); keys = key count of the union.
  auto value = [&](int col, int xq, int keys) -> double {
    double sum = 0, cnt = 0;
    for (int j = lane; j < Lq; j += 32) {
      if (!qv[j]) continue;
      const bool in = !query_players || inQ[j] || (xq == j) || (xq == -2 && sq[j]);
      if (!in) continue;
      A a = mC[j];
      if (col >= 0) { const A x = load_acc<T, A>(sg + int64_t(j) * n + col); a = x > a ? x : a; }
      else if (col == -2) { const A x = sS[j]; a = x > a ? x : a; }
      sum += double(a);
      cnt += 1.0;
    }
    sum = warp_sum(sum);
    cnt = warp_sum(cnt);
    return (keys == 0 || cnt == 0.0) ? 0.0 : sum / cnt;
  };

  double w_n = 0, w_mean = 0, w_m2 = 0;
  for (int k = warp; k < K; k += warps) {
    Stream st(seed, uint32_t(k), uint32_t(m), uint32_t(g));
    const int64_t r = draw_size(st, seed, k, m, g, npool, schedule);
    for (int j = lane; j < Lq; j += 32) { mC[j] = -INFINITY; inQ[j] = 0; }
    __syncwarp();
    int64_t c = 0, t = 0;
    int nk = 0;
    for (int p = 0; p < P && c < r; ++p) {
      if (Sg[p] || !valid[p]) continue;
      const bool take = take_it(st, t, npool - t, r - c);
      ++t;
      if (!take) continue;
      ++c;
      if (p >= qoff) {
        ++nk;
        for (int j = lane; j < Lq; j += 32) {
          const A x = load_acc<T, A>(sg + int64_t(j) * n + (p - qoff));
          mC[j] = x > mC[j] ? x : mC[j];
        }
      } else if (lane == 0) {
        inQ[p] = 1;
      }
      __syncwarp();
    }
    __syncwarp();
    const double vC = value(-1, -1, nk);
    double gk = value(s_keys ? -2 : -1, -2, nk + s_keys);
    for (int p = 0; p < P; ++p) {
      if (!Sg[p]) continue;
      gk -= p >= qoff ? value(p - qoff, -1, nk + 1) : value(-1, p, nk);
    }
    gk += double(s_count - 1) * vC;
    welford_add(gk, w_n, w_mean, w_m2);
    __syncwarp();
  }
  if (lane == 0) { wf[3 * warp] = w_n; wf[3 * warp + 1] = w_mean; wf[3 * warp + 2] = w_m2; }
  __syncthreads();
  write_stats(wf, warps, task, est, se);
}

__device__ __forceinline__ float amax(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double amax(double a, double b) { return fmax(a, b); }

// LQ: compile-time bound on Lq (32 or 64); T input type, A compute type.
template <typename T, typename A, int LQ>
__global__ void maxsim_lanes_kernel(const T* __restrict__ sim, const int64_t* __restrict__ gidx,
                                    const uint8_t* __restrict__ qm,
                                    const uint8_t* __restrict__ S, const uint8_t* __restrict__ pm, int M, int Lq,
                                    int n, int P, int K, int query_players, uint64_t seed, int schedule, A* est,
                                    A* se) {
  constexpr int W = LQ / 32;  // bit-set words over the tokens
  extern __shared__ __align__(16) unsigned char lanes_smem[];
  const int nthreads = blockDim.x, tid = threadIdx.x, lane = tid & 31;
  const int task = blockIdx.x, g = task / M, m = task % M;
  const uint8_t* Sg = S + int64_t(task) * P;
  const uint8_t* valid = pm + int64_t(g) * P;
  const T* sg = sim + (gidx ? gidx[g] : int64_t(g)) * Lq * n;   // game g plays on sim[game_index[g]]
  const int qoff = query_players ? Lq : 0;  // players < qoff are query tokens

  // shared layout: welford[threads][3] (double), colT[n][LQ] (A), sS[LQ] (A), idx[P] (int), bits
  double* wf = reinterpret_cast<double*>(lanes_smem);
  A* colT = reinterpret_cast<A*>(wf + 3 * nthreads);
  A* sS = colT + int64_t(n) * LQ;
  int* idx = reinterpret_cast<int*>(sS + LQ);   // idx[0..npool) pool ascending, idx[P-1-j] member j of S
  uint32_t* qvb = reinterpret_cast<uint32_t*>(idx + P);   // query tokens counted (non-QP: query_mask)
  uint32_t* sqb = qvb + W;                                // query players of S (QP)
  __shared__ int npool_s, s_s, skeys_s;

  for (int e = tid; e < Lq * n; e += nthreads) {     // coalesced reads of sim[g], transposed writes
    const int j = e / n, i = e - j * n;
    colT[int64_t(i) * LQ + j] = load_acc<T, A>(sg + e);
  }
  for (int e = tid; e < n * (LQ - Lq); e += nthreads) {
    const int i = e / (LQ - Lq), j = Lq + (e - i * (LQ - Lq));
    colT[int64_t(i) * LQ + j] = A(0);   // padding tokens: never counted
  }
  if (tid < 32) {
    const unsigned lt = (1u << lane) - 1u;
    int np = 0, ns = 0, nk = 0;
    for (int base = 0; base < P; base += 32) {
      const int p = base + lane;
      const bool inS = p < P && Sg[p] != 0;
      const bool inPool = p < P && !inS && valid[p] != 0;
      const unsigned bp = __ballot_sync(0xffffffffu, inPool), bs = __ballot_sync(0xffffffffu, inS);
      const unsigned bk = __ballot_sync(0xffffffffu, inS && p >= qoff);
      if (inPool) idx[np + __popc(bp & lt)] = p;
      if (inS) idx[P - 1 - (ns + __popc(bs & lt))] = p;
      np += __popc(bp);
      ns += __popc(bs);
      nk += __popc(bk);
    }
#pragma unroll
    for (int w = 0; w < W; ++w) {
      const int j = 32 * w + lane;
      const bool q = j < Lq && (query_players ? valid[j] != 0 : qm[int64_t(g) * Lq + j] != 0);
      const bool sq = j < Lq && query_players && Sg[j] != 0;
      const unsigned bq = __ballot_sync(0xffffffffu, q), bsq = __ballot_sync(0xffffffffu, sq);
      if (lane == 0) { qvb[w] = bq; sqb[w] = bsq; }
    }
    if (lane == 0) { npool_s = np; s_s = ns; skeys_s = nk; }
  }
  __syncthreads();
  const int npool = npool_s, s = s_s, s_keys = skeys_s;
  for (int j = tid; j < LQ; j += nthreads) {
    A best = A(-INFINITY);
    for (int a = 0; a < s; ++a) {
      const int p = idx[P - 1 - a];
      if (p >= qoff) best = amax(best, colT[int64_t(p - qoff) * LQ + j]);
    }
    sS[j] = best;
  }
  __syncthreads();

  A mC[LQ];
  uint32_t inq[W];
  // v of C plus an optional extra column (element-wise max) and optional extra query players;
  // keys = key players in the union. Identical arithmetic whatever the extras come from.
  auto value = [&](const A* extra, const uint32_t* addq, int keys) -> double {
    A sum = A(0);
    int cnt = 0;
#pragma unroll
    for (int w = 0; w < W; ++w) {
      const uint32_t bits = inq[w] | (addq ? addq[w] : 0u);
      cnt += __popc(bits);
#pragma unroll
      for (int b = 0; b < 32; ++b) {
        A v = mC[32 * w + b];
        if (extra) v = amax(v, extra[32 * w + b]);
        sum += ((bits >> b) & 1u) ? v : A(0);
      }
    }
    return (keys == 0 || cnt == 0) ? 0.0 : double(sum) / double(cnt);
  };

  double w_n = 0, w_mean = 0, w_m2 = 0;
  for (int k = tid; k < K; k += nthreads) {
    Stream st(seed, uint32_t(k), uint32_t(m), uint32_t(g));
    const int64_t r = draw_size(st, seed, k, m, g, npool, schedule);
#pragma unroll
    for (int j = 0; j < LQ; ++j) mC[j] = A(-INFINITY);
#pragma unroll
    for (int w = 0; w < W; ++w) inq[w] = query_players ? 0u : qvb[w];
    int64_t c = 0;
    int nk = 0;
    for (int64_t t = 0; t < npool && c < r; ++t) {
      if (!take_it(st, t, npool - t, r - c)) continue;
      ++c;
      const int p = idx[t];
      if (p >= qoff) {
        ++nk;
        const A* col = colT + int64_t(p - qoff) * LQ;
#pragma unroll
        for (int j = 0; j < LQ; ++j) mC[j] = amax(mC[j], col[j]);
      } else {
#pragma unroll
        for (int w = 0; w < W; ++w)
          if (w == (p >> 5)) inq[w] |= 1u << (p & 31);
      }
    }
    const double vC = value(nullptr, nullptr, nk);
    double gk = value(s_keys ? sS : nullptr, sqb, nk + s_keys);
    for (int a = 0; a < s; ++a) {
      const int p = idx[P - 1 - a];
      if (p >= qoff) {
        gk -= value(colT + int64_t(p - qoff) * LQ, nullptr, nk + 1);
      } else {
        uint32_t qb[W];
#pragma unroll
        for (int w = 0; w < W; ++w) qb[w] = (w == (p >> 5)) ? (1u << (p & 31)) : 0u;
        gk -= value(nullptr, qb, nk);
      }
    }
    gk += double(s - 1) * vC;
    welford_add(gk, w_n, w_mean, w_m2);
  }
  wf[3 * tid] = w_n;
  wf[3 * tid + 1] = w_mean;
  wf[3 * tid + 2] = w_m2;
  __syncthreads();
  write_stats(wf, nthreads, task, est, se);
}

__global__ void coalitions_kernel(const uint8_t* __restrict__ S, const uint8_t* __restrict__ pm, int G, int M,
                                  int P, int K, uint64_t seed, int schedule, uint8_t* out) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= int64_t(G) * M * K) return;
  const int k = int(idx % K);
  const int task = int(idx / K), g = task / M, m = task % M;
  const uint8_t* Sg = S + int64_t(task) * P;
  const uint8_t* valid = pm + int64_t(g) * P;
  int64_t npool = 0;
  for (int p = 0; p < P; ++p) npool += (!Sg[p] && valid[p]);
  Stream st(seed, uint32_t(k), uint32_t(m), uint32_t(g));
  const int64_t r = draw_size(st, seed, k, m, g, npool, schedule);
  uint8_t* row = out + idx * P;
  int64_t c = 0, t = 0;
  for (int p = 0; p < P; ++p) {
    bool take = false;
    if (!Sg[p] && valid[p]) {
      take = c < r && take_it(st, t, npool - t, r - c);
      ++t;
      c += take;
    }
    row[p] = take;
  }
}

// Shared memory of the lanes kernel for a block of `threads` threads.
template <typename A>
size_t lanes_smem_bytes(int LQ, int n, int P, int threads) {
  return size_t(3 * threads) * sizeof(double) + (size_t(n) + 1) * size_t(LQ) * sizeof(A) + size_t(P) * sizeof(int) +
         size_t(2 * (LQ / 32)) * sizeof(uint32_t);
}

constexpr size_t kLanesSmemMax = 96 * 1024;   // above this the warp kernel is used (occupancy)

template <typename T, typename A, int LQ>
cudaError_t launch_maxsim_lanes(const void* sim, const int64_t* gidx, const uint8_t* qm, const uint8_t* S, const uint8_t* pm, int G,
                                int M, int Lq, int n, int P, int K, int query_players, uint64_t seed, int schedule,
                                void* est, void* se, cudaStream_t stream) {
  const int threads = K >= 128 ? 128 : ((K + 31) / 32) * 32;
  const size_t smem = lanes_smem_bytes<A>(LQ, n, P, threads);
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(maxsim_lanes_kernel<T, A, LQ>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (e != cudaSuccess) return e;
  }
  if (G * M == 0) return cudaSuccess;
  maxsim_lanes_kernel<T, A, LQ><<<G * M, threads, smem, stream>>>(static_cast<const T*>(sim), gidx, qm, S, pm, M, Lq, n, P,
                                                                  K, query_players, seed, schedule,
                                                                  static_cast<A*>(est), static_cast<A*>(se));
  return cudaGetLastError();
}

template <typename T, typename A>
cudaError_t launch_maxsim(const void* sim, const int64_t* gidx, const uint8_t* qm, const uint8_t* S, const uint8_t* pm, int G, int M,
                          int Lq, int n, int K, int query_players, uint64_t seed, int schedule, void* est, void* se,
                          cudaStream_t stream) {
  const int P = query_players ? Lq + n : n;
  if (Lq <= 64 && n >= 1 && K >= 1) {
    const int LQ = Lq <= 32 ? 32 : 64;
    if (lanes_smem_bytes<A>(LQ, n, P, 128) <= kLanesSmemMax) {
      if (LQ == 32)
        return launch_maxsim_lanes<T, A, 32>(sim, gidx, qm, S, pm, G, M, Lq, n, P, K, query_players, seed, schedule, est,
                                             se, stream);
      return launch_maxsim_lanes<T, A, 64>(sim, gidx, qm, S, pm, G, M, Lq, n, P, K, query_players, seed, schedule, est,
                                           se, stream);
    }
  }
  int warps = K < 8 ? (K < 1 ? 1 : K) : 8;
  const size_t smem = size_t(3 * warps) * sizeof(double) + size_t(Lq) * sizeof(A) * (1 + warps) +
                      size_t(Lq) * (2 + warps);
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(maxsim_kernel<T, A>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               int(smem));
    if (e != cudaSuccess) return e;
  }
  if (G * M == 0) return cudaSuccess;
  maxsim_kernel<T, A><<<G * M, warps * 32, smem, stream>>>(static_cast<const T*>(sim), gidx, qm, S, pm, M, Lq, n, P, K,
                                                           query_players, seed, schedule, static_cast<A*>(est),
                                                           static_cast<A*>(se));
  return cudaGetLastError();
}

}  // namespace

cudaError_t loupe_shapley_maxsim(const void* sim, int dtype, const int64_t* game_index, const uint8_t* query_mask, const uint8_t* subsets,
                                 const uint8_t* player_mask, int G, int M, int Lq, int n, int K, int query_players,
                                 uint64_t seed, int schedule, void* est, void* se, cudaStream_t stream) {
  switch (dtype) {
    case LOUPE_F32:
      return launch_maxsim<float, float>(sim, game_index, query_mask, subsets, player_mask, G, M, Lq, n, K, query_players, seed,
                                         schedule, est, se, stream);
    case LOUPE_F64:
      return launch_maxsim<double, double>(sim, game_index, query_mask, subsets, player_mask, G, M, Lq, n, K, query_players,
                                           seed, schedule, est, se, stream);
    case LOUPE_F16:
      return launch_maxsim<__half, float>(sim, game_index, query_mask, subsets, player_mask, G, M, Lq, n, K, query_players,
                                          seed, schedule, est, se, stream);
    case LOUPE_BF16:
      return launch_maxsim<__nv_bfloat16, float>(sim, game_index, query_mask, subsets, player_mask, G, M, Lq, n, K,
                                                 query_players, seed, schedule, est, se, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t loupe_shapley_coalitions(const uint8_t* subsets, const uint8_t* player_mask, int G, int M, int P, int K,
                                     uint64_t seed, int schedule, uint8_t* out, cudaStream_t stream) {
  const int64_t total = int64_t(G) * M * K;
  if (total == 0) return cudaSuccess;
  const int threads = 128;
  coalitions_kernel<<<unsigned((total + threads - 1) / threads), threads, 0, stream>>>(subsets, player_mask, G, M, P,
                                                                                        K, seed, schedule, out);
  return cudaGetLastError();
}
