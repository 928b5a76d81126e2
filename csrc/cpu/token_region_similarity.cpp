// Token-region similarity on the CPU (METHOD section 3).
//
// s(a, b) = mean over valid j of max over valid i of <q_aj, k_bi>.
// Forward: one parallel region over blocks of query items; each task computes score tiles of about
// 512 KiB with a sequential BLAS GEMM into its own buffer (the tile, the query panel and the packed
// key panel stay in L2) and reduces each tile, while it is in cache, to the running sum of row
// maxima and the int32 arg-max: an additive key mask (0 / -inf) and a vectorised max, then the first
// index that reaches it (ties go to the lowest index). The full Bq*Bk*Lq*Lk scores never exist.
// Backward: a gather (d_query, parallel over query items) and a scatter (d_key, parallel over key
// items, each thread owning its rows), both deterministic and both blocked so that the rows they
// read stay in cache: d_query walks the key items in blocks and sums, per query token, the
// block's arg-max key rows in registers; d_key walks the query items in blocks and, for each key
// item of its block, adds the block's query rows into the key item's rows. Each destination row
// receives its terms in the same order as an unblocked loop (key items, resp. query items and
// tokens, ascending).
// x86-64: the tile epilogues and the backward are also compiled for AVX2 + FMA (x86-64-v3) and
// picked at run time (__builtin_cpu_supports); the build itself targets the baseline ISA.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <type_traits>
#include <vector>

#include "ops.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__INTEL_COMPILER)
#define LOUPE_TRS_X86 1
#include <immintrin.h>
#define LOUPE_TRS_AVX2 __attribute__((target("avx2,fma")))
#endif
#if defined(__GNUC__) || defined(__clang__)
#define LOUPE_TRS_INLINE inline __attribute__((always_inline))
#else
#define LOUPE_TRS_INLINE inline
#endif

namespace loupe {
namespace {

constexpr int64_t kTileElems = int64_t(1) << 20;       // aligned path: 4 MiB of fp32 scores per bmm chunk
constexpr int64_t kTileBytes = int64_t(512) << 10;     // pairwise path: one score tile per task
constexpr int64_t kSrcBlockBytes = int64_t(512) << 10;  // backward: rows read per block
constexpr int64_t kDstBlockBytes = int64_t(256) << 10;  // backward: rows written per block


// Max and first arg-max of row[i] + bias[i], i in [0, n) (bias 0 for a valid key, -inf for padding;
// the scores are finite, so a padded key never reaches the max of a row with a valid key). -1 when
// no key is valid (the caller never asks then).
template <typename T>
LOUPE_TRS_INLINE int32_t row_argmax(const T* row, const T* bias, int64_t n, T* best_out) {
  T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) {
    const T v = row[i] + bias[i];
    m = v > m ? v : m;
  }
  *best_out = m;
  constexpr int64_t W = 16;
  for (int64_t i0 = 0; i0 < n; i0 += W) {
    const int64_t len = std::min(W, n - i0);
    int hit = 0;
#pragma omp simd reduction(| : hit)
    for (int64_t l = 0; l < len; ++l) hit |= (row[i0 + l] + bias[i0 + l] == m);
    if (!hit) continue;
    for (int64_t l = 0; l < len; ++l)
      if (row[i0 + l] + bias[i0 + l] == m) return static_cast<int32_t>(i0 + l);
  }
  return -1;
}

#ifdef LOUPE_TRS_X86
// float, AVX2: the same result as row_argmax<float> (the max is exact whatever the order; the index
// is the first that reaches it).
LOUPE_TRS_AVX2 inline int32_t row_argmax_avx2(const float* row, const float* bias, int64_t n, float* best_out) {
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  const int64_t n8 = n & ~int64_t(7);
  const int64_t rem = n - n8;
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i tail = _mm256_cmpgt_epi32(_mm256_set1_epi32(int32_t(rem)), lane);   // lanes < rem
  __m256 vm0 = ninf, vm1 = ninf;
  int64_t i = 0;
  for (; i + 16 <= n8; i += 16) {
    vm0 = _mm256_max_ps(vm0, _mm256_add_ps(_mm256_loadu_ps(row + i), _mm256_loadu_ps(bias + i)));
    vm1 = _mm256_max_ps(vm1, _mm256_add_ps(_mm256_loadu_ps(row + i + 8), _mm256_loadu_ps(bias + i + 8)));
  }
  if (i < n8) vm0 = _mm256_max_ps(vm0, _mm256_add_ps(_mm256_loadu_ps(row + i), _mm256_loadu_ps(bias + i)));
  __m256 vt = ninf;
  if (rem) {
    const __m256 x = _mm256_add_ps(_mm256_maskload_ps(row + n8, tail), _mm256_maskload_ps(bias + n8, tail));
    vt = _mm256_blendv_ps(ninf, x, _mm256_castsi256_ps(tail));
    vm1 = _mm256_max_ps(vm1, vt);
  }
  vm0 = _mm256_max_ps(vm0, vm1);
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(vm0), _mm256_extractf128_ps(vm0, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 0x55));
  const float m = _mm_cvtss_f32(h);
  *best_out = m;
  // the first index that reaches m: equality masks of 64 keys at a time, no data-dependent branch
  // inside a block (a branch on where the max sits would be mispredicted about once per row)
  const __m256 vmax = _mm256_set1_ps(m);
  for (int64_t b0 = 0; b0 < n8; b0 += 64) {
    const int64_t b1 = std::min(n8, b0 + 64);
    uint64_t hits = 0;
    for (i = b0; i < b1; i += 8) {
      const __m256 x = _mm256_add_ps(_mm256_loadu_ps(row + i), _mm256_loadu_ps(bias + i));
      hits |= uint64_t(unsigned(_mm256_movemask_ps(_mm256_cmp_ps(x, vmax, _CMP_EQ_OQ)))) << (i - b0);
    }
    if (hits) return static_cast<int32_t>(b0 + __builtin_ctzll(hits));
  }
  if (rem) {
    const int mask = _mm256_movemask_ps(_mm256_cmp_ps(vt, vmax, _CMP_EQ_OQ));
    if (mask) return static_cast<int32_t>(n8 + __builtin_ctz(unsigned(mask)));
  }
  return -1;
}
#endif

template <typename T, bool kAvx2>
LOUPE_TRS_INLINE int32_t row_argmax_dispatch(const T* row, const T* bias, int64_t n, T* best_out) {
#ifdef LOUPE_TRS_X86
  if constexpr (kAvx2 && std::is_same<T, float>::value) return row_argmax_avx2(row, bias, n, best_out);
#endif
  return row_argmax<T>(row, bias, n, best_out);
}

template <typename T>
struct FwdCtx {
  const bool* qm;
  const bool* km;
  const T* kbias;                   // [Bk * Lk]: 0 valid, -inf padding
  const uint8_t* key_any_valid;     // [Bk]
  const uint8_t* query_any_valid;   // [Bq] (dual only)
  int64_t Bq, Bk, Lq, Lk;
  T* outp;
  int32_t* ap;
  T* out2p;                         // dual only (else nullptr)
  int32_t* ap2;
};

// Reduce one score tile s[(ai * Lq + j) * ld + bi * Lk + i] of query items a0.. and key items b0...
template <typename T, bool kAvx2>
LOUPE_TRS_INLINE void tile_epilogue_body(const FwdCtx<T>& c, const T* sp, int64_t ld, int64_t a0, int64_t na,
                                         int64_t b0, int64_t nb, T* cm, int32_t* ci) {
  const int64_t Lq = c.Lq, Lk = c.Lk, Bq = c.Bq, Bk = c.Bk;
  for (int64_t ai = 0; ai < na; ++ai) {
    const int64_t a = a0 + ai;
    for (int64_t bi = 0; bi < nb; ++bi) {
      const int64_t b = b0 + bi;
      // key -> query direction: column maxima over the valid tokens of query item a, rows read in
      // order (j ascending, strictly larger wins: ties keep the lowest j)
      if (c.out2p) {
        int32_t* crow = c.ap2 + (b * Bq + a) * Lk;
        T acc2 = 0;
        if (c.query_any_valid[a]) {
          bool first = true;
          for (int64_t j = 0; j < Lq; ++j) {
            if (!c.qm[a * Lq + j]) continue;
            const T* row = sp + (ai * Lq + j) * ld + bi * Lk;
            const int32_t jj = static_cast<int32_t>(j);
            if (first) {
#pragma omp simd
              for (int64_t i = 0; i < Lk; ++i) { cm[i] = row[i]; ci[i] = jj; }
              first = false;
              continue;
            }
#pragma omp simd
            for (int64_t i = 0; i < Lk; ++i) {
              const bool gt = row[i] > cm[i];
              cm[i] = gt ? row[i] : cm[i];
              ci[i] = gt ? jj : ci[i];
            }
          }
          const bool* kmb = c.km + b * Lk;
          for (int64_t i = 0; i < Lk; ++i) {
            if (!kmb[i]) { crow[i] = -1; continue; }
            crow[i] = ci[i];
            acc2 += cm[i];
          }
        } else {
          for (int64_t i = 0; i < Lk; ++i) crow[i] = -1;
        }
        c.out2p[b * Bq + a] = acc2;
      }
      // query -> key direction: row maxima
      int32_t* arow = c.ap + (a * Bk + b) * Lq;
      if (!c.key_any_valid[b]) {
        for (int64_t j = 0; j < Lq; ++j) arow[j] = -1;
        c.outp[a * Bk + b] = 0;
        continue;
      }
      const T* bias = c.kbias + b * Lk;
      T acc = 0;
      for (int64_t j = 0; j < Lq; ++j) {
        if (!c.qm[a * Lq + j]) { arow[j] = -1; continue; }
        T m;
        arow[j] = row_argmax_dispatch<T, kAvx2>(sp + (ai * Lq + j) * ld + bi * Lk, bias, Lk, &m);
        acc += m;
      }
      c.outp[a * Bk + b] = acc;
    }
  }
}

template <typename T>
void tile_epilogue_base(const FwdCtx<T>& c, const T* sp, int64_t ld, int64_t a0, int64_t na, int64_t b0, int64_t nb,
                        T* cm, int32_t* ci) {
  tile_epilogue_body<T, false>(c, sp, ld, a0, na, b0, nb, cm, ci);
}
#ifdef LOUPE_TRS_X86
template <typename T>
LOUPE_TRS_AVX2 void tile_epilogue_avx2(const FwdCtx<T>& c, const T* sp, int64_t ld, int64_t a0, int64_t na,
                                       int64_t b0, int64_t nb, T* cm, int32_t* ci) {
  tile_epilogue_body<T, true>(c, sp, ld, a0, na, b0, nb, cm, ci);
}
#endif
template <typename T>
inline void tile_epilogue(bool avx2, const FwdCtx<T>& c, const T* sp, int64_t ld, int64_t a0, int64_t na, int64_t b0,
                          int64_t nb, T* cm, int32_t* ci) {
#ifdef LOUPE_TRS_X86
  if (avx2) return tile_epilogue_avx2<T>(c, sp, ld, a0, na, b0, nb, cm, ci);
#endif
  (void)avx2;
  tile_epilogue_base<T>(c, sp, ld, a0, na, b0, nb, cm, ci);
}

// Aligned pairs: rows of item b of a [nb, Lq, Lk] score chunk.
template <typename T, bool kAvx2>
LOUPE_TRS_INLINE void aligned_item_body(const T* sp, const bool* qmb, const T* bias, int64_t Lq, int64_t Lk,
                                        int32_t* arow, T* out) {
  T acc = 0;
  for (int64_t j = 0; j < Lq; ++j) {
    if (!qmb[j]) { arow[j] = -1; continue; }
    T m;
    arow[j] = row_argmax_dispatch<T, kAvx2>(sp + j * Lk, bias, Lk, &m);
    acc += m;
  }
  *out = acc;
}
template <typename T>
void aligned_item_base(const T* sp, const bool* qmb, const T* bias, int64_t Lq, int64_t Lk, int32_t* arow, T* out) {
  aligned_item_body<T, false>(sp, qmb, bias, Lq, Lk, arow, out);
}
#ifdef LOUPE_TRS_X86
template <typename T>
LOUPE_TRS_AVX2 void aligned_item_avx2(const T* sp, const bool* qmb, const T* bias, int64_t Lq, int64_t Lk,
                                      int32_t* arow, T* out) {
  aligned_item_body<T, true>(sp, qmb, bias, Lq, Lk, arow, out);
}
#endif

template <typename T>
std::vector<T> key_bias(const bool* km, int64_t Bk, int64_t Lk) {
  std::vector<T> bias(size_t(Bk * Lk));
  for (int64_t t = 0; t < Bk * Lk; ++t) bias[t] = km[t] ? T(0) : -std::numeric_limits<T>::infinity();
  return bias;
}

template <typename T>
void forward_aligned(const at::Tensor& q, const at::Tensor& k, const bool* qm, const bool* km,
                     const std::vector<uint8_t>& key_any_valid, at::Tensor& out, at::Tensor& amax) {
  const int64_t B = q.size(0), Lq = q.size(1), Lk = k.size(1);
  const int64_t cb = std::clamp<int64_t>(kTileElems / std::max<int64_t>(1, Lq * Lk), 1, B);
  at::Tensor buf = at::empty({cb, Lq, Lk}, q.options());
  const std::vector<T> kbias = key_bias<T>(km, B, Lk);
  const bool avx2 = cpu_use_avx2();
  T* outp = out.data_ptr<T>();
  int32_t* ap = amax.data_ptr<int32_t>();
  for (int64_t b0 = 0; b0 < B; b0 += cb) {
    const int64_t nb = std::min(cb, B - b0);
    at::Tensor s = buf.narrow(0, 0, nb);
    at::bmm_out(s, q.narrow(0, b0, nb), k.narrow(0, b0, nb).transpose(1, 2));
    const T* sp = s.data_ptr<T>();
    at::parallel_for(0, nb, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t bi = lo; bi < hi; ++bi) {
        const int64_t b = b0 + bi;
        int32_t* arow = ap + b * Lq;
        if (!key_any_valid[b]) {
          for (int64_t j = 0; j < Lq; ++j) arow[j] = -1;
          outp[b] = 0;
          continue;
        }
        const T* tile = sp + bi * Lq * Lk;
        const T* bias = kbias.data() + b * Lk;
#ifdef LOUPE_TRS_X86
        if (avx2) { aligned_item_avx2<T>(tile, qm + b * Lq, bias, Lq, Lk, arow, outp + b); continue; }
#endif
        aligned_item_base<T>(tile, qm + b * Lq, bias, Lq, Lk, arow, outp + b);
      }
    });
  }
  (void)avx2;
}

// All pairs: out [Bq, Bk] = sums over valid j of max_i <q_aj, k_bi>, amax [Bq, Bk, Lq]. One parallel
// region over blocks of query items; each task walks all key items in chunks, with its own score
// tile and a sequential GEMM (BLAS runs single-threaded inside the region), and reduces each tile
// while it is in cache. A single region matters on a loaded machine: every extra fork/join waits
// for the slowest core.
// With query_any_valid / out2 / amax2 (both directions, FILIP): also out2 [Bk, Bq] = sums of
// s(k_b, q_a) with amax2 [Bk, Bq, Lk], the column maxima of the same tile (for each key token, the
// max over the query item's valid tokens). Sums only; the caller divides by the counts. Each tile
// owns its (query item, key item) pairs, so out[a, b] and out2[b, a] have exactly one writer.
template <typename T>
void forward_pairwise(const at::Tensor& q, const at::Tensor& k, const bool* qm, const bool* km,
                      const std::vector<uint8_t>& key_any_valid, at::Tensor& out, at::Tensor& amax,
                      const std::vector<uint8_t>* query_any_valid = nullptr, at::Tensor* out2 = nullptr,
                      at::Tensor* amax2 = nullptr) {
  const int64_t Bq = q.size(0), Lq = q.size(1), D = q.size(2);
  const int64_t Bk = k.size(0), Lk = k.size(1);
  const at::Tensor q2 = q.view({Bq * Lq, D});
  const at::Tensor k2 = k.view({Bk * Lk, D});
  // A task is one score tile: ta query items x cb key items. The threads claim tiles one at a time,
  // row block by row block (consecutive tiles share their query panel), so the work is handed out in
  // steps of one tile (about 0.3 ms at D=128) rather than of a whole row block: with row blocks as
  // the tasks, shape A (Bq=128, Lq=16) had 8 tasks of 16 tiles for 2 threads, and a thread that
  // started late or ran slower left the other idle for up to a row block (0.73x the tiled GEMM).
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t rows_target = 256;
  int64_t ta = std::clamp<int64_t>(rows_target / std::max<int64_t>(1, Lq), 1, Bq);
  const int64_t tile_elems = kTileBytes / int64_t(sizeof(T));
  int64_t cb = std::clamp<int64_t>(tile_elems / std::max<int64_t>(1, ta * Lq * Lk), 1, Bk);
  const int64_t n_ablk = (Bq + ta - 1) / ta;
  // a single row block with fewer key chunks than threads: narrower tiles, so that every thread works
  if (n_ablk * ((Bk + cb - 1) / cb) < threads) cb = std::max<int64_t>(1, (Bk + threads - 1) / threads);
  const int64_t n_bchk = (Bk + cb - 1) / cb;
  const int64_t n_tasks = n_ablk * n_bchk;
  const std::vector<T> kbias = key_bias<T>(km, Bk, Lk);
  FwdCtx<T> ctx{qm, km, kbias.data(), key_any_valid.data(),
                query_any_valid ? query_any_valid->data() : nullptr, Bq, Bk, Lq, Lk,
                out.data_ptr<T>(), amax.data_ptr<int32_t>(),
                out2 ? out2->data_ptr<T>() : nullptr, amax2 ? amax2->data_ptr<int32_t>() : nullptr};
  const bool avx2 = cpu_use_avx2();
  parallel_chunks(n_tasks, 1, [&](ChunkQueue& queue) {
    at::Tensor buf = at::empty({ta * Lq, cb * Lk}, q.options());
    std::vector<T> cm(ctx.out2p ? Lk : 0);
    std::vector<int32_t> ci(ctx.out2p ? Lk : 0);
    int64_t t_lo, t_hi;
    while (queue.claim(t_lo, t_hi))
    for (int64_t t = t_lo; t < t_hi; ++t) {
      const int64_t a0 = (t / n_bchk) * ta, na = std::min(ta, Bq - a0);
      const int64_t b0 = (t % n_bchk) * cb, nb = std::min(cb, Bk - b0);
      at::Tensor s = buf.narrow(0, 0, na * Lq).narrow(1, 0, nb * Lk);
      at::mm_out(s, q2.narrow(0, a0 * Lq, na * Lq), k2.narrow(0, b0 * Lk, nb * Lk).t());
      tile_epilogue<T>(avx2, ctx, s.data_ptr<T>(), s.stride(0), a0, na, b0, nb, cm.data(), ci.data());
    }
  });
}

// Per item: are all / any of its L tokens valid?
void item_validity(const bool* m, int64_t B, int64_t L, std::vector<uint8_t>& all, std::vector<uint8_t>& any) {
  all.assign(B, 1);
  any.assign(B, 0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < L; ++i) {
      all[b] = all[b] && m[b * L + i];
      any[b] = any[b] || m[b * L + i];
    }
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& qm, const at::Tensor& km) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3, "query and key must be 3-D");
  TORCH_CHECK(q.size(2) == k.size(2), "query and key must share D");
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "query and key dtypes differ");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "the CPU kernel takes float32 or float64 (the wrapper upcasts half types)");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && qm.is_contiguous() && km.is_contiguous(),
              "inputs must be contiguous");
  TORCH_CHECK(qm.scalar_type() == at::kBool && km.scalar_type() == at::kBool, "masks must be bool");
  TORCH_CHECK(qm.size(0) == q.size(0) && qm.size(1) == q.size(1), "query_mask shape");
  TORCH_CHECK(km.size(0) == k.size(0) && km.size(1) == k.size(1), "key_mask shape");
  TORCH_CHECK(k.size(1) < std::numeric_limits<int32_t>::max(), "Lk too large for int32 arg-max");
}

// Per query item: 1 / (number of valid query tokens), 0 when there are none.
template <typename T>
std::vector<T> inverse_counts(const bool* qm, int64_t B, int64_t L) {
  std::vector<T> inv(B);
  for (int64_t a = 0; a < B; ++a) {
    int64_t c = 0;
    for (int64_t j = 0; j < L; ++j) c += qm[a * L + j];
    inv[a] = c > 0 ? T(1) / T(c) : T(0);
  }
  return inv;
}

// ---- backward ------------------------------------------------------------------------------
template <typename T>
struct BwdCtx {
  const T* gp;      // grad_out [Bq, cols]
  const T* inv;     // [Bq] 1 / valid query tokens (0: none)
  const T* qp;
  const T* kp;
  T* dqp;
  T* dkp;
  const int32_t* ap;  // argmax [Bq, cols, Lq]
  int64_t Bq, Bk, Lq, Lk, D, cols;
  bool pairwise;
};

// dst[d] += sum_r w[r] * src[r][d] for d in [0, D), the terms of each element added in r order.
template <typename T>
LOUPE_TRS_INLINE void gather_rows(T* dst, const T* const* src, const T* w, int64_t n, int64_t D) {
  // the generic copy adds the terms into dst directly (the row stays in L1); keeping a chunk of dst
  // in a local array instead was 3x slower without AVX2 (the array lived on the stack)
  for (int64_t r = 0; r < n; ++r) {
    const T* s = src[r];
    const T wr = w[r];
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) dst[d] += wr * s[d];
  }
}

#ifdef LOUPE_TRS_X86
// float, AVX2: 64 columns in eight registers, the terms streamed through them.
LOUPE_TRS_AVX2 inline void gather_rows_avx2(float* dst, const float* const* src, const float* w, int64_t n,
                                            int64_t D) {
  int64_t d0 = 0;
  for (; d0 + 64 <= D; d0 += 64) {
    __m256 a0 = _mm256_loadu_ps(dst + d0), a1 = _mm256_loadu_ps(dst + d0 + 8);
    __m256 a2 = _mm256_loadu_ps(dst + d0 + 16), a3 = _mm256_loadu_ps(dst + d0 + 24);
    __m256 a4 = _mm256_loadu_ps(dst + d0 + 32), a5 = _mm256_loadu_ps(dst + d0 + 40);
    __m256 a6 = _mm256_loadu_ps(dst + d0 + 48), a7 = _mm256_loadu_ps(dst + d0 + 56);
    for (int64_t r = 0; r < n; ++r) {
      const float* s = src[r] + d0;
      const __m256 wr = _mm256_set1_ps(w[r]);
      a0 = _mm256_fmadd_ps(wr, _mm256_loadu_ps(s), a0);
      a1 = _mm256_fmadd_ps(wr, _mm256_loadu_ps(s + 8), a1);
      a2 = _mm256_fmadd_ps(wr, _mm256_loadu_ps(s + 16), a2);
      a3 = _mm256_fmadd_ps(wr, _mm256_loadu_ps(s + 24), a3);
      a4 = _mm256_fmadd_ps(wr, _mm256_loadu_ps(s + 32), a4);
      a5 = _mm256_fmadd_ps(wr, _mm256_loadu_ps(s + 40), a5);
      a6 = _mm256_fmadd_ps(wr, _mm256_loadu_ps(s + 48), a6);
      a7 = _mm256_fmadd_ps(wr, _mm256_loadu_ps(s + 56), a7);
    }
    _mm256_storeu_ps(dst + d0, a0); _mm256_storeu_ps(dst + d0 + 8, a1);
    _mm256_storeu_ps(dst + d0 + 16, a2); _mm256_storeu_ps(dst + d0 + 24, a3);
    _mm256_storeu_ps(dst + d0 + 32, a4); _mm256_storeu_ps(dst + d0 + 40, a5);
    _mm256_storeu_ps(dst + d0 + 48, a6); _mm256_storeu_ps(dst + d0 + 56, a7);
  }
  for (; d0 + 8 <= D; d0 += 8) {
    __m256 a = _mm256_loadu_ps(dst + d0);
    for (int64_t r = 0; r < n; ++r) a = _mm256_fmadd_ps(_mm256_set1_ps(w[r]), _mm256_loadu_ps(src[r] + d0), a);
    _mm256_storeu_ps(dst + d0, a);
  }
  for (; d0 < D; ++d0) {
    float acc = dst[d0];
    for (int64_t r = 0; r < n; ++r) acc = std::fma(w[r], src[r][d0], acc);
    dst[d0] = acc;
  }
}
#endif

template <typename T, bool kAvx2>
LOUPE_TRS_INLINE void gather_dispatch(T* dst, const T* const* src, const T* w, int64_t n, int64_t D) {
#ifdef LOUPE_TRS_X86
  if constexpr (kAvx2 && std::is_same<T, float>::value) return gather_rows_avx2(dst, src, w, n, D);
#endif
  gather_rows<T>(dst, src, w, n, D);
}

// query items per d_query block (their rows ~kDstBlockBytes), key items per d_key block (likewise)
template <typename T>
int64_t dquery_block(const BwdCtx<T>& c) {
  const int64_t row_bytes = std::max<int64_t>(1, c.D * int64_t(sizeof(T)));
  return std::max<int64_t>(1, kDstBlockBytes / (row_bytes * std::max<int64_t>(1, c.Lq)));
}
template <typename T>
int64_t dkey_block(const BwdCtx<T>& c) {
  const int64_t row_bytes = std::max<int64_t>(1, c.D * int64_t(sizeof(T)));
  return std::max<int64_t>(1, kDstBlockBytes / (row_bytes * std::max<int64_t>(1, c.Lk)));
}

// d_query of query items [lo, hi): tiles of query items (their d_query rows, ~kDstBlockBytes) by key
// items (their rows, ~kSrcBlockBytes); per query token the tile's arg-max key rows are summed in
// registers, key items ascending.
template <typename T, bool kAvx2>
LOUPE_TRS_INLINE void dquery_body(const BwdCtx<T>& c, int64_t lo, int64_t hi, const T** src, T* wv) {
  const int64_t Lq = c.Lq, Lk = c.Lk, D = c.D, cols = c.cols;
  const int64_t row_bytes = std::max<int64_t>(1, D * int64_t(sizeof(T)));
  const int64_t CB = c.pairwise ? std::clamp<int64_t>(kSrcBlockBytes / (row_bytes * std::max<int64_t>(1, Lk)), 1, cols) : 1;
  const int64_t AB = dquery_block<T>(c);
  for (int64_t a0 = lo; a0 < hi; a0 += AB) {
    const int64_t a1 = std::min(hi, a0 + AB);
    for (int64_t c0 = 0; c0 < cols; c0 += CB) {
      const int64_t c1 = std::min(cols, c0 + CB);
      for (int64_t a = a0; a < a1; ++a) {
        if (c.inv[a] == T(0)) continue;
        for (int64_t j = 0; j < Lq; ++j) {
          int64_t n = 0;
          for (int64_t cc = c0; cc < c1; ++cc) {
            const T w = c.gp[a * cols + cc] * c.inv[a];
            if (w == T(0)) continue;
            const int32_t i = c.ap[(a * cols + cc) * Lq + j];
            if (i < 0) continue;
            const int64_t b = c.pairwise ? cc : a;
            src[n] = c.kp + (b * Lk + i) * D;
            wv[n] = w;
            ++n;
          }
          if (n) gather_dispatch<T, kAvx2>(c.dqp + (a * Lq + j) * D, src, wv, n, D);
        }
      }
    }
  }
}

// d_key of key items [lo, hi): tiles of key items (their d_key rows, ~kDstBlockBytes) by query
// items (their rows, ~kSrcBlockBytes). Pairwise: per key item, the tile's terms (a, j) are sorted by
// their arg-max key i (a counting sort, stable), and each d_key row sums its terms in registers;
// aligned: added directly. Either way each d_key row gets its terms with query items, then tokens,
// ascending.
template <typename T>
struct DkeyScratch {
  std::vector<int64_t> start;    // [Lk + 1] bucket offsets
  std::vector<int32_t> key;      // the arg-max key of each term, in (a, j) order
  std::vector<const T*> src, src_sorted;
  std::vector<T> w, w_sorted;
};

template <typename T, bool kAvx2>
LOUPE_TRS_INLINE void dkey_body(const BwdCtx<T>& c, int64_t lo, int64_t hi, DkeyScratch<T>& sc) {
  const int64_t Lq = c.Lq, Lk = c.Lk, D = c.D, cols = c.cols;
  const int64_t row_bytes = std::max<int64_t>(1, D * int64_t(sizeof(T)));
  const int64_t BB = dkey_block<T>(c);
  if (!c.pairwise) {   // aligned: one query item per key item (a = b)
    for (int64_t b = lo; b < hi; ++b) {
      if (c.inv[b] == T(0)) continue;
      const T w = c.gp[b] * c.inv[b];
      if (w == T(0)) continue;
      const int32_t* arow = c.ap + b * Lq;
      for (int64_t j = 0; j < Lq; ++j) {
        const int32_t i = arow[j];
        if (i < 0) continue;
        T* dst = c.dkp + (b * Lk + i) * D;
        const T* s = c.qp + (b * Lq + j) * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) dst[d] += w * s[d];
      }
    }
    return;
  }
  const int64_t AB = std::max<int64_t>(1, kSrcBlockBytes / (row_bytes * std::max<int64_t>(1, Lq)));
  const size_t cap = size_t(std::min(AB, c.Bq) * Lq);
  sc.start.resize(size_t(Lk + 1));
  sc.key.resize(cap);
  sc.src.resize(cap);
  sc.src_sorted.resize(cap);
  sc.w.resize(cap);
  sc.w_sorted.resize(cap);
  for (int64_t b0 = lo; b0 < hi; b0 += BB) {
    const int64_t b1 = std::min(hi, b0 + BB);
    for (int64_t a0 = 0; a0 < c.Bq; a0 += AB) {
      const int64_t a1 = std::min(c.Bq, a0 + AB);
      for (int64_t b = b0; b < b1; ++b) {
        int64_t n = 0;
        std::fill(sc.start.begin(), sc.start.end(), 0);
        for (int64_t a = a0; a < a1; ++a) {
          if (c.inv[a] == T(0)) continue;
          const T w = c.gp[a * cols + b] * c.inv[a];
          if (w == T(0)) continue;
          const int32_t* arow = c.ap + (a * cols + b) * Lq;
          for (int64_t j = 0; j < Lq; ++j) {
            const int32_t i = arow[j];
            if (i < 0) continue;
            sc.key[n] = i;
            sc.src[n] = c.qp + (a * Lq + j) * D;
            sc.w[n] = w;
            ++sc.start[size_t(i) + 1];
            ++n;
          }
        }
        if (n == 0) continue;
        for (int64_t i = 0; i < Lk; ++i) sc.start[i + 1] += sc.start[i];
        for (int64_t e = 0; e < n; ++e) {          // stable: each bucket keeps (a, j) order
          const int64_t at = sc.start[sc.key[e]]++;
          sc.src_sorted[at] = sc.src[e];
          sc.w_sorted[at] = sc.w[e];
        }
        // start[i] is now the end of bucket i (= the start of bucket i + 1)
        int64_t begin = 0;
        for (int64_t i = 0; i < Lk; ++i) {
          const int64_t end = sc.start[i];
          if (end > begin)
            gather_dispatch<T, kAvx2>(c.dkp + (b * Lk + i) * D, sc.src_sorted.data() + begin, sc.w_sorted.data() + begin,
                                      end - begin, D);
          begin = end;
        }
      }
    }
  }
}

template <typename T>
void dquery_base(const BwdCtx<T>& c, int64_t lo, int64_t hi, const T** src, T* wv) {
  dquery_body<T, false>(c, lo, hi, src, wv);
}
template <typename T>
void dkey_base(const BwdCtx<T>& c, int64_t lo, int64_t hi, DkeyScratch<T>& sc) {
  dkey_body<T, false>(c, lo, hi, sc);
}
#ifdef LOUPE_TRS_X86
template <typename T>
LOUPE_TRS_AVX2 void dquery_avx2(const BwdCtx<T>& c, int64_t lo, int64_t hi, const T** src, T* wv) {
  dquery_body<T, true>(c, lo, hi, src, wv);
}
template <typename T>
LOUPE_TRS_AVX2 void dkey_avx2(const BwdCtx<T>& c, int64_t lo, int64_t hi, DkeyScratch<T>& sc) {
  dkey_body<T, true>(c, lo, hi, sc);
}
#endif

}  // namespace

std::vector<at::Tensor> trs_forward_cpu(const at::Tensor& query, const at::Tensor& key,
                                        const at::Tensor& query_mask, const at::Tensor& key_mask,
                                        bool pairwise) {
  check_inputs(query, key, query_mask, key_mask);
  const int64_t Bq = query.size(0), Lq = query.size(1), Bk = key.size(0), Lk = key.size(1);
  TORCH_CHECK(pairwise || Bq == Bk, "pairwise=false needs Bq == Bk");
  const bool* qm = query_mask.data_ptr<bool>();
  const bool* km = key_mask.data_ptr<bool>();
  std::vector<uint8_t> all_valid, any_valid;
  item_validity(km, Bk, Lk, all_valid, any_valid);
  at::Tensor out = pairwise ? at::empty({Bq, Bk}, query.options()) : at::empty({Bq}, query.options());
  at::Tensor amax = pairwise ? at::empty({Bq, Bk, Lq}, query.options().dtype(at::kInt))
                             : at::empty({Bq, Lq}, query.options().dtype(at::kInt));
  if (out.numel() == 0) return {out, amax};
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "trs_forward_cpu", [&] {
    // detached views: grad mode is thread-local and the worker threads don't inherit no-grad
    const at::Tensor qd = query.detach(), kd = key.detach();
    if (pairwise) forward_pairwise<scalar_t>(qd, kd, qm, km, any_valid, out, amax);
    else forward_aligned<scalar_t>(qd, kd, qm, km, any_valid, out, amax);
    const std::vector<scalar_t> inv = inverse_counts<scalar_t>(qm, Bq, Lq);
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t cols = pairwise ? Bk : 1;
    for (int64_t a = 0; a < Bq; ++a)
      for (int64_t b = 0; b < cols; ++b) o[a * cols + b] *= inv[a];
  });
  return {out, amax};
}

std::vector<at::Tensor> trs_dual_forward_cpu(const at::Tensor& query, const at::Tensor& key,
                                             const at::Tensor& query_mask, const at::Tensor& key_mask) {
  check_inputs(query, key, query_mask, key_mask);
  TORCH_CHECK(query.size(1) < std::numeric_limits<int32_t>::max(), "Lq too large for int32 arg-max");
  const int64_t Bq = query.size(0), Lq = query.size(1), Bk = key.size(0), Lk = key.size(1);
  const bool* qm = query_mask.data_ptr<bool>();
  const bool* km = key_mask.data_ptr<bool>();
  std::vector<uint8_t> all_valid, any_valid, q_all, q_any;
  item_validity(km, Bk, Lk, all_valid, any_valid);
  item_validity(qm, Bq, Lq, q_all, q_any);
  at::Tensor out = at::zeros({Bq, Bk}, query.options());
  at::Tensor amax = at::full({Bq, Bk, Lq}, -1, query.options().dtype(at::kInt));
  at::Tensor out2 = at::zeros({Bk, Bq}, query.options());
  at::Tensor amax2 = at::full({Bk, Bq, Lk}, -1, query.options().dtype(at::kInt));
  if (out.numel() == 0) return {out, amax, out2, amax2};
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "trs_dual_forward_cpu", [&] {
    const at::Tensor qd = query.detach(), kd = key.detach();
    forward_pairwise<scalar_t>(qd, kd, qm, km, any_valid, out, amax, &q_any, &out2, &amax2);
    const std::vector<scalar_t> inv_q = inverse_counts<scalar_t>(qm, Bq, Lq);
    const std::vector<scalar_t> inv_k = inverse_counts<scalar_t>(km, Bk, Lk);
    scalar_t* o = out.data_ptr<scalar_t>();
    scalar_t* o2 = out2.data_ptr<scalar_t>();
    for (int64_t a = 0; a < Bq; ++a)
      for (int64_t b = 0; b < Bk; ++b) o[a * Bk + b] *= inv_q[a];
    for (int64_t b = 0; b < Bk; ++b)
      for (int64_t a = 0; a < Bq; ++a) o2[b * Bq + a] *= inv_k[b];
  });
  return {out, amax, out2, amax2};
}

std::vector<at::Tensor> trs_backward_cpu(const at::Tensor& grad_out, const at::Tensor& query,
                                         const at::Tensor& key, const at::Tensor& query_mask,
                                         const at::Tensor& argmax, bool pairwise) {
  TORCH_CHECK(argmax.scalar_type() == at::kInt && argmax.is_contiguous(), "argmax must be contiguous int32");
  const int64_t Bq = query.size(0), Lq = query.size(1), D = query.size(2);
  const int64_t Bk = key.size(0), Lk = key.size(1);
  const at::Tensor g = grad_out.contiguous().to(query.scalar_type());
  at::Tensor dq = at::zeros_like(query);
  at::Tensor dk = at::zeros_like(key);
  const bool* qm = query_mask.data_ptr<bool>();
  const int32_t* ap = argmax.data_ptr<int32_t>();
  const bool avx2 = cpu_use_avx2();
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "trs_backward_cpu", [&] {
    using T = scalar_t;
    const std::vector<T> inv = inverse_counts<T>(qm, Bq, Lq);
    const BwdCtx<T> c{g.data_ptr<T>(), inv.data(), query.data_ptr<T>(), key.data_ptr<T>(), dq.data_ptr<T>(),
                      dk.data_ptr<T>(), ap, Bq, Bk, Lq, Lk, D, pairwise ? Bk : 1, pairwise};
    // d_query: gather of the arg-max keys; each thread owns its query items.
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    const int64_t qchunk = std::min(dquery_block<T>(c), std::max<int64_t>(1, (Bq + 4 * threads - 1) / (4 * threads)));
    parallel_chunks(Bq, qchunk, [&](ChunkQueue& queue) {
      std::vector<const T*> src(size_t(std::max<int64_t>(1, c.cols)));
      std::vector<T> wv(src.size());
      int64_t lo, hi;
      while (queue.claim(lo, hi)) {
#ifdef LOUPE_TRS_X86
        if (avx2) { dquery_avx2<T>(c, lo, hi, src.data(), wv.data()); continue; }
#endif
        dquery_base<T>(c, lo, hi, src.data(), wv.data());
      }
    });
    // d_key: scatter; each thread owns its key items and visits (a, j) in a fixed order.
    const int64_t kchunk = std::min(dkey_block<T>(c), std::max<int64_t>(1, (Bk + 4 * threads - 1) / (4 * threads)));
    parallel_chunks(Bk, kchunk, [&](ChunkQueue& queue) {
      DkeyScratch<T> sc;
      int64_t lo, hi;
      while (queue.claim(lo, hi)) {
#ifdef LOUPE_TRS_X86
        if (avx2) { dkey_avx2<T>(c, lo, hi, sc); continue; }
#endif
        dkey_base<T>(c, lo, hi, sc);
      }
    });
  });
  (void)avx2;
  return {dq, dk};
}

}  // namespace loupe
