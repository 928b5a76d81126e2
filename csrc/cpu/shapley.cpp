// Fused Shapley coalition sampling on the CPU (METHOD section 5).
//
// One task per (game g, subset m), chunks of tasks claimed by the threads (parallel_chunks). Each task draws its K coalitions from
// the pinned Philox4x32-10 counter (k, m, g, b) in registers (selection sampling over the pool of
// valid players outside S: O(players) integer work, stopped as soon as the size is reached or the
// rest is forced), and evaluates one sample with one pass over the coalition: the masked max over
// C is built once, then v(C u {i}) and v(C u S) follow from element-wise maxima. Mean and standard
// error are accumulated with Welford's update in double. Nothing of size [K, P] or larger exists.
//
// The draw (issue 20): the words of a sample's stream are made 32 at a time (8 Philox blocks side
// by side, a loop the compiler vectorises), and the selection rule "u * rem < need * 2^32" is
// rewritten without branches: it holds iff floor(u * rem / 2^32) < need = r - c, i.e. iff
// c < thr = r - floor(u * rem / 2^32), and thr is computed for 32 players at once. The same rule
// also covers the two stops of the sequential form (need = 0: never true again; need = rem: always
// true), so the coalitions are bit for bit those of the sequential form (tests: the letter of the
// spec, the numpy Philox of loupe_kernels.testing, every backend). A group of 32 words is only made
// when the walk is not finished at its start.
// x86-64: the per-task loops are also compiled for AVX2 + FMA (x86-64-v3) and picked at run time
// (__builtin_cpu_supports); the build itself targets the baseline ISA.
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
#define LOUPE_SH_X86 1
#include <immintrin.h>
#define LOUPE_SH_AVX2 __attribute__((target("avx2,fma")))
#endif
#if defined(__GNUC__) || defined(__clang__)
#define LOUPE_SH_INLINE inline __attribute__((always_inline))
#else
#define LOUPE_SH_INLINE inline
#endif

namespace loupe {
namespace {

// ---- the pinned draw ------------------------------------------------------------------------
inline void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = uint64_t(0xD2511F53u) * c[0];
    const uint64_t p1 = uint64_t(0xCD9E8D57u) * c[2];
    const uint32_t n0 = uint32_t(p1 >> 32) ^ c[1] ^ k0;
    const uint32_t n1 = uint32_t(p1);
    const uint32_t n2 = uint32_t(p0 >> 32) ^ c[3] ^ k1;
    const uint32_t n3 = uint32_t(p0);
    c[0] = n0; c[1] = n1; c[2] = n2; c[3] = n3;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

// The word stream u0, u1, ... of one (k, m, g): block b holds words 4b..4b+3. Words are read in
// increasing order, so one block is kept. (Used for the round-robin offset only.)
struct Stream {
  uint32_t k0, k1, c0, c1, c2;
  int64_t blk = -1;
  uint32_t buf[4] = {0, 0, 0, 0};
  Stream(uint64_t seed, int64_t k, int64_t m, int64_t g)
      : k0(uint32_t(seed)), k1(uint32_t(seed >> 32)), c0(uint32_t(k)), c1(uint32_t(m)), c2(uint32_t(g)) {}
  inline uint32_t word(int64_t w) {
    const int64_t b = w >> 2;
    if (b != blk) {
      buf[0] = c0; buf[1] = c1; buf[2] = c2; buf[3] = uint32_t(b);
      philox4x32_10(buf, k0, k1);
      blk = b;
    }
    return buf[w & 3];
  }
};

// Words 4*b0 .. 4*b0+31 of the stream (k = c0, m = c1, g = c2): Philox blocks b0..b0+7 side by side.
constexpr int64_t kGroupWords = 32;
LOUPE_SH_INLINE void philox_words32(uint32_t k0, uint32_t k1, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t b0,
                                    uint32_t* out) {
  uint32_t x0[8], x1[8], x2[8], x3[8];
  for (int l = 0; l < 8; ++l) { x0[l] = c0; x1[l] = c1; x2[l] = c2; x3[l] = b0 + uint32_t(l); }
  for (int round = 0; round < 10; ++round) {
#pragma omp simd
    for (int l = 0; l < 8; ++l) {
      const uint64_t p0 = uint64_t(0xD2511F53u) * x0[l];
      const uint64_t p1 = uint64_t(0xCD9E8D57u) * x2[l];
      const uint32_t n0 = uint32_t(p1 >> 32) ^ x1[l] ^ k0;
      const uint32_t n2 = uint32_t(p0 >> 32) ^ x3[l] ^ k1;
      x1[l] = uint32_t(p1);
      x3[l] = uint32_t(p0);
      x0[l] = n0;
      x2[l] = n2;
    }
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  for (int l = 0; l < 8; ++l) {
    out[4 * l] = x0[l]; out[4 * l + 1] = x1[l]; out[4 * l + 2] = x2[l]; out[4 * l + 3] = x3[l];
  }
}

#ifdef LOUPE_SH_X86
// The same 32 words with AVX2 intrinsics: the 32 x 32 -> 64-bit products of even and odd lanes by
// two vpmuludq, their halves put back in place by blends; the four counter words of the 8 blocks
// are interleaved into stream order at the end.
LOUPE_SH_AVX2 inline void philox_words32_avx2(uint32_t k0, uint32_t k1, uint32_t c0, uint32_t c1, uint32_t c2,
                                              uint32_t b0, uint32_t* out) {
  __m256i x0 = _mm256_set1_epi32(int(c0)), x1 = _mm256_set1_epi32(int(c1)), x2 = _mm256_set1_epi32(int(c2));
  __m256i x3 = _mm256_add_epi32(_mm256_set1_epi32(int(b0)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const __m256i m0 = _mm256_set1_epi32(int(0xD2511F53u)), m1 = _mm256_set1_epi32(int(0xCD9E8D57u));
  for (int round = 0; round < 10; ++round) {
    const __m256i pe0 = _mm256_mul_epu32(x0, m0), po0 = _mm256_mul_epu32(_mm256_srli_epi64(x0, 32), m0);
    const __m256i pe1 = _mm256_mul_epu32(x2, m1), po1 = _mm256_mul_epu32(_mm256_srli_epi64(x2, 32), m1);
    const __m256i hi0 = _mm256_blend_epi32(_mm256_srli_epi64(pe0, 32), po0, 0xAA);
    const __m256i lo0 = _mm256_blend_epi32(pe0, _mm256_slli_epi64(po0, 32), 0xAA);
    const __m256i hi1 = _mm256_blend_epi32(_mm256_srli_epi64(pe1, 32), po1, 0xAA);
    const __m256i lo1 = _mm256_blend_epi32(pe1, _mm256_slli_epi64(po1, 32), 0xAA);
    x0 = _mm256_xor_si256(_mm256_xor_si256(hi1, x1), _mm256_set1_epi32(int(k0)));
    x2 = _mm256_xor_si256(_mm256_xor_si256(hi0, x3), _mm256_set1_epi32(int(k1)));
    x1 = lo1;
    x3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  const __m256i t0 = _mm256_unpacklo_epi32(x0, x1), t1 = _mm256_unpackhi_epi32(x0, x1);
  const __m256i t2 = _mm256_unpacklo_epi32(x2, x3), t3 = _mm256_unpackhi_epi32(x2, x3);
  const __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);  // blocks 0|4, 1|5
  const __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);  // blocks 2|6, 3|7
  __m256i* o = reinterpret_cast<__m256i*>(out);
  _mm256_storeu_si256(o, _mm256_permute2x128_si256(u0, u1, 0x20));
  _mm256_storeu_si256(o + 1, _mm256_permute2x128_si256(u2, u3, 0x20));
  _mm256_storeu_si256(o + 2, _mm256_permute2x128_si256(u0, u1, 0x31));
  _mm256_storeu_si256(o + 3, _mm256_permute2x128_si256(u2, u3, 0x31));
}
#endif

template <bool kAvx2>
LOUPE_SH_INLINE void philox_group(uint32_t k0, uint32_t k1, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t b0,
                                  uint32_t* out) {
#ifdef LOUPE_SH_X86
  if constexpr (kAvx2) return philox_words32_avx2(k0, k1, c0, c1, c2, b0, out);
#endif
  philox_words32(k0, k1, c0, c1, c2, b0, out);
}

struct Drawer {
  uint64_t seed;
  int64_t g, m, npool;
  int schedule;
  uint64_t rr_offset = 0;
  Drawer(uint64_t seed_, int64_t g_, int64_t m_, int64_t npool_, int64_t schedule_)
      : seed(seed_), g(g_), m(m_), npool(npool_), schedule(int(schedule_)) {
    if (schedule == 1) {
      Stream s0(seed, 0, m, g);
      rr_offset = (uint64_t(s0.word(0)) * uint64_t(npool + 1)) >> 32;
    }
  }
  // Pool positions of the members of sample k's coalition, ascending; returns their count.
  // pos: npool + 1 entries; words, thr: kGroupWords entries each (scratch).
  template <bool kAvx2 = false>
  LOUPE_SH_INLINE int64_t draw(int64_t k, int64_t* pos, uint32_t* words, int64_t* thr) const {
    const uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
    const uint32_t c0 = uint32_t(k), c1 = uint32_t(m), c2 = uint32_t(g);
    const uint64_t np = uint64_t(npool + 1);
    philox_group<kAvx2>(k0, k1, c0, c1, c2, 0, words);
    const int64_t r = schedule == 0 ? int64_t((uint64_t(words[0]) * np) >> 32)
                                    : int64_t((uint64_t(k) + rr_offset) % np);
    int64_t c = 0;
    // player t reads word 1 + t: group 0 holds t < 31, group q >= 1 holds t in [32q - 1, 32q + 31)
    for (int64_t t0 = 0, grp = 0; t0 < npool; ++grp) {
      const int64_t w0 = grp * kGroupWords;                  // first word of this group
      const int64_t t_lo = std::max<int64_t>(0, w0 - 1), t_hi = std::min(npool, w0 + kGroupWords - 1);
      if (grp > 0) {
        const int64_t need = r - c;
        if (need == 0) break;                                  // nothing more is drawn
        if (need == npool - t0) {                              // the rest is forced
          for (int64_t t = t0; t < npool; ++t) pos[c++] = t;
          break;
        }
        philox_group<kAvx2>(k0, k1, c0, c1, c2, uint32_t(w0 >> 2), words);
      }
      const int64_t n = t_hi - t_lo;
      const uint32_t* u = words + (t_lo + 1 - w0);
      if (npool <= int64_t(UINT32_MAX)) {   // rem fits 32 bits: a 32 x 32 -> 64-bit product per player
        const uint32_t rem0 = uint32_t(npool - t_lo);
#pragma omp simd
        for (int64_t x = 0; x < n; ++x)
          thr[x] = r - int64_t((uint64_t(u[x]) * uint64_t(rem0 - uint32_t(x))) >> 32);
      } else {
        for (int64_t x = 0; x < n; ++x)
          thr[x] = r - int64_t((uint64_t(u[x]) * uint64_t(npool - (t_lo + x))) >> 32);
      }
      for (int64_t x = 0; x < n; ++x) {
        pos[c] = t_lo + x;
        c += c < thr[x] ? 1 : 0;
      }
      t0 = t_hi;
    }
    return c;
  }
};

struct Welford {
  int64_t n = 0;
  double mean = 0, m2 = 0;
  inline void add(double x) {
    ++n;
    const double d = x - mean;
    mean += d / double(n);
    m2 += d * (x - mean);
  }
  double stderr_() const {
    if (n < 2) return std::numeric_limits<double>::infinity();
    return std::sqrt(m2 / double(n - 1)) / std::sqrt(double(n));
  }
};

// Pool (valid players outside S, ascending) and members of S of task (g, m).
inline void task_players(const bool* S, const bool* valid, int64_t P, std::vector<int64_t>& pool,
                         std::vector<int64_t>& members) {
  pool.clear();
  members.clear();
  for (int64_t p = 0; p < P; ++p) {
    if (S[p]) members.push_back(p);
    else if (valid[p]) pool.push_back(p);
  }
}

void check_common(const at::Tensor& subsets, const at::Tensor& player_mask, int64_t K, int64_t schedule) {
  TORCH_CHECK(subsets.dim() == 3 && subsets.scalar_type() == at::kBool && subsets.is_contiguous(),
              "subsets must be a contiguous bool [G, M, P] tensor");
  TORCH_CHECK(player_mask.dim() == 2 && player_mask.scalar_type() == at::kBool && player_mask.is_contiguous(),
              "player_mask must be a contiguous bool [G, P] tensor");
  TORCH_CHECK(player_mask.size(0) == subsets.size(0) && player_mask.size(1) == subsets.size(2),
              "player_mask must have shape [G, P]");
  TORCH_CHECK(K >= 1, "num_samples must be >= 1");
  TORCH_CHECK(schedule == 0 || schedule == 1, "schedule must be 0 (uniform) or 1 (round_robin)");
}

// ---- max-sim game (also with the query tokens as players) ----------------------------------
template <typename T>
struct MaxsimCtx {
  const T* simp;
  const bool* qmp;
  const bool* Sp;
  const bool* pmp;
  const int64_t* gidx;
  T* estp;
  T* sep;
  int64_t Lq, n, M, P, K;
  bool query_players;
  uint64_t seed;
  int64_t schedule;
};

struct MaxsimScratch {
  std::vector<int64_t> pool, members, pos, thr;
  std::vector<uint32_t> words;
  std::vector<const void*> kcols;         // the key columns of one coalition
  std::vector<int64_t> qrow, qpos;        // compact query rows; position of a query row (-1 = not valid)
  std::vector<uint8_t> inQ0, inQ, xq, sq;
  MaxsimScratch() : thr(kGroupWords), words(kGroupWords) {}
};

// value of C (column maxima mC over the compact query rows) plus an optional key column `extra`
// (element-wise max) and, with query players, the rows flagged in inQ or xflags. Sums in double.
template <typename T>
LOUPE_SH_INLINE double maxsim_value(const T* mC, const T* extra, const uint8_t* inQ, const uint8_t* xflags,
                                    int64_t nq, int64_t keys, bool query_players) {
  double sum = 0;
  int64_t cnt = 0;
  if (!query_players) {
    if (extra) {
#pragma omp simd reduction(+ : sum)
      for (int64_t jj = 0; jj < nq; ++jj) sum += double(extra[jj] > mC[jj] ? extra[jj] : mC[jj]);
    } else {
#pragma omp simd reduction(+ : sum)
      for (int64_t jj = 0; jj < nq; ++jj) sum += double(mC[jj]);
    }
    cnt = nq;
  } else {
#pragma omp simd reduction(+ : sum, cnt)
    for (int64_t jj = 0; jj < nq; ++jj) {
      const bool on = (inQ[jj] | xflags[jj]) != 0;
      const T a = mC[jj];
      const T v = extra && extra[jj] > a ? extra[jj] : a;
      sum += on ? double(v) : 0.0;
      cnt += on ? 1 : 0;
    }
  }
  if (keys == 0 || cnt == 0) return 0.0;
  return sum / double(cnt);
}

// out[jj] = max over the n columns cols[a][jj] (-inf when n = 0).
template <typename T>
LOUPE_SH_INLINE void column_max_generic(const T* const* cols, int64_t n, int64_t nq, T* out) {
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t jj = 0; jj < nq; ++jj) out[jj] = ninf;
  for (int64_t a = 0; a < n; ++a) {
    const T* cp = cols[a];
#pragma omp simd
    for (int64_t jj = 0; jj < nq; ++jj) out[jj] = cp[jj] > out[jj] ? cp[jj] : out[jj];
  }
}

#ifdef LOUPE_SH_X86
// float, AVX2: 32 entries of out in four registers while the columns stream through (the generic
// loop keeps out in memory, one store-to-load round trip per column).
LOUPE_SH_AVX2 inline void column_max_avx2(const float* const* cols, int64_t n, int64_t nq, float* out) {
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j0 = 0;
  for (; j0 + 32 <= nq; j0 += 32) {
    __m256 a0 = ninf, a1 = ninf, a2 = ninf, a3 = ninf;
    for (int64_t a = 0; a < n; ++a) {
      const float* cp = cols[a] + j0;
      a0 = _mm256_max_ps(_mm256_loadu_ps(cp), a0);
      a1 = _mm256_max_ps(_mm256_loadu_ps(cp + 8), a1);
      a2 = _mm256_max_ps(_mm256_loadu_ps(cp + 16), a2);
      a3 = _mm256_max_ps(_mm256_loadu_ps(cp + 24), a3);
    }
    _mm256_storeu_ps(out + j0, a0);
    _mm256_storeu_ps(out + j0 + 8, a1);
    _mm256_storeu_ps(out + j0 + 16, a2);
    _mm256_storeu_ps(out + j0 + 24, a3);
  }
  for (; j0 + 8 <= nq; j0 += 8) {
    __m256 a0 = ninf;
    for (int64_t a = 0; a < n; ++a) a0 = _mm256_max_ps(_mm256_loadu_ps(cols[a] + j0), a0);
    _mm256_storeu_ps(out + j0, a0);
  }
  for (; j0 < nq; ++j0) {
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t a = 0; a < n; ++a) m = cols[a][j0] > m ? cols[a][j0] : m;
    out[j0] = m;
  }
}
#endif

template <typename T, bool kAvx2>
LOUPE_SH_INLINE void column_max(const T* const* cols, int64_t n, int64_t nq, T* out) {
#ifdef LOUPE_SH_X86
  if constexpr (kAvx2 && std::is_same<T, float>::value) return column_max_avx2(cols, n, nq, out);
#endif
  column_max_generic<T>(cols, n, nq, out);
}

template <typename T, bool kAvx2>
LOUPE_SH_INLINE void maxsim_tasks_body(const MaxsimCtx<T>& x, int64_t lo, int64_t hi, MaxsimScratch& w,
                                       std::vector<T>& cols, std::vector<T>& mC, std::vector<T>& sS) {
  const int64_t Lq = x.Lq, n = x.n, M = x.M, P = x.P, K = x.K;
  const bool query_players = x.query_players;
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t task = lo; task < hi; ++task) {
    const int64_t g = task / M, m = task % M;
    const bool* S = x.Sp + (g * M + m) * P;
    const bool* valid = x.pmp + g * P;
    task_players(S, valid, P, w.pool, w.members);
    const int64_t npool = int64_t(w.pool.size()), s = int64_t(w.members.size());
    // query rows of this game
    w.qrow.clear();
    w.qpos.assign(Lq, -1);
    for (int64_t j = 0; j < Lq; ++j) {
      const bool ok = query_players ? valid[j] : x.qmp[g * Lq + j];
      if (ok) { w.qpos[j] = int64_t(w.qrow.size()); w.qrow.push_back(j); }
    }
    const int64_t nq = int64_t(w.qrow.size());
    cols.resize(size_t(n * nq));
    const T* sg = x.simp + (x.gidx ? x.gidx[g] : g) * Lq * n;   // game g plays on sim[game_index[g]]
    for (int64_t jj = 0; jj < nq; ++jj) {
      const T* row = sg + w.qrow[jj] * n;
      for (int64_t i = 0; i < n; ++i) cols[i * nq + jj] = row[i];
    }
    const int64_t qoff = query_players ? Lq : 0;   // players < qoff are query tokens
    const T* cols0 = cols.data();                   // cols0 + (p - qoff) * nq: the column of key player p
    w.inQ0.assign(nq, query_players ? 0 : 1);
    w.xq.assign(nq, 0);
    w.sq.assign(nq, 0);
    sS.assign(nq, ninf);
    int64_t s_keys = 0;
    for (int64_t p : w.members) {
      if (p >= qoff) {
        ++s_keys;
        const T* c = cols0 + (p - qoff) * nq;
        for (int64_t jj = 0; jj < nq; ++jj) sS[jj] = c[jj] > sS[jj] ? c[jj] : sS[jj];
      } else if (w.qpos[p] >= 0) {
        w.sq[w.qpos[p]] = 1;
      }
    }
    mC.resize(nq);
    w.inQ.resize(nq);
    w.pos.resize(npool + 1);
    const Drawer drawer(x.seed, g, m, npool, x.schedule);
    const int64_t* pool = w.pool.data();
    const int64_t* pos = w.pos.data();
    T* mp = mC.data();
    w.kcols.resize(size_t(npool + 1));
    const T** kc = reinterpret_cast<const T**>(w.kcols.data());

    Welford acc;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t c = drawer.template draw<kAvx2>(k, w.pos.data(), w.words.data(), w.thr.data());
      std::copy(w.inQ0.begin(), w.inQ0.end(), w.inQ.begin());
      int64_t nk = 0;
      for (int64_t a = 0; a < c; ++a) {
        const int64_t p = pool[pos[a]];
        if (p >= qoff) kc[nk++] = cols0 + (p - qoff) * nq;
        else if (w.qpos[p] >= 0) w.inQ[w.qpos[p]] = 1;
      }
      column_max<T, kAvx2>(kc, nk, nq, mp);
      const uint8_t* inQ = w.inQ.data();
      const double vC = maxsim_value<T>(mp, nullptr, inQ, w.xq.data(), nq, nk, query_players);
      double gk = maxsim_value<T>(mp, s_keys ? sS.data() : nullptr, inQ, w.sq.data(), nq, nk + s_keys, query_players);
      for (int64_t p : w.members) {
        double vi;
        if (p >= qoff) {
          vi = maxsim_value<T>(mp, cols0 + (p - qoff) * nq, inQ, w.xq.data(), nq, nk + 1, query_players);
        } else {
          w.xq[w.qpos[p]] = 1;
          vi = maxsim_value<T>(mp, nullptr, inQ, w.xq.data(), nq, nk, query_players);
          w.xq[w.qpos[p]] = 0;
        }
        gk -= vi;
      }
      gk += double(s - 1) * vC;
      acc.add(gk);
    }
    x.estp[g * M + m] = T(acc.mean);
    x.sep[g * M + m] = T(acc.stderr_());
  }
}

template <typename T>
void maxsim_tasks_base(const MaxsimCtx<T>& x, int64_t lo, int64_t hi, MaxsimScratch& w, std::vector<T>& cols,
                       std::vector<T>& mC, std::vector<T>& sS) {
  maxsim_tasks_body<T, false>(x, lo, hi, w, cols, mC, sS);
}
#ifdef LOUPE_SH_X86
template <typename T>
LOUPE_SH_AVX2 void maxsim_tasks_avx2(const MaxsimCtx<T>& x, int64_t lo, int64_t hi, MaxsimScratch& w,
                                     std::vector<T>& cols, std::vector<T>& mC, std::vector<T>& sS) {
  maxsim_tasks_body<T, true>(x, lo, hi, w, cols, mC, sS);
}
#endif

template <typename T>
void maxsim_kernel(const at::Tensor& sim, const at::Tensor& qm, const at::Tensor& subsets, const at::Tensor& pm,
                   bool query_players, int64_t K, uint64_t seed, int64_t schedule, const int64_t* gidx,
                   at::Tensor& est, at::Tensor& se) {
  const int64_t G = subsets.size(0);
  const MaxsimCtx<T> x{sim.data_ptr<T>(), qm.data_ptr<bool>(), subsets.data_ptr<bool>(), pm.data_ptr<bool>(), gidx,
                       est.data_ptr<T>(), se.data_ptr<T>(), sim.size(1), sim.size(2), subsets.size(1),
                       subsets.size(2), K, query_players, seed, schedule};
  const bool avx2 = cpu_use_avx2();
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  parallel_chunks(G * x.M, std::clamp<int64_t>(G * x.M / (8 * threads), 1, 16), [&](ChunkQueue& queue) {
    MaxsimScratch w;
    std::vector<T> cols, mC, sS;            // cols[i * nq + jj] = sim[g, qrow[jj], i]
    int64_t lo, hi;
    while (queue.claim(lo, hi)) {
#ifdef LOUPE_SH_X86
      if (avx2) { maxsim_tasks_avx2<T>(x, lo, hi, w, cols, mC, sS); continue; }
#endif
      maxsim_tasks_base<T>(x, lo, hi, w, cols, mC, sS);
    }
  });
  (void)avx2;
}

}  // namespace

std::vector<at::Tensor> shapley_maxsim_cpu(const at::Tensor& sim, const at::Tensor& query_mask,
                                           const at::Tensor& subsets, const at::Tensor& player_mask,
                                           bool query_players, int64_t num_samples, uint64_t seed,
                                           int64_t schedule, const c10::optional<at::Tensor>& game_index) {
  check_common(subsets, player_mask, num_samples, schedule);
  TORCH_CHECK(sim.dim() == 3 && sim.is_contiguous(), "sim must be a contiguous [G, Lq, n] tensor");
  TORCH_CHECK(sim.scalar_type() == at::kFloat || sim.scalar_type() == at::kDouble, "sim must be float32 or float64");
  const int64_t Lq = sim.size(1), n = sim.size(2);
  const int64_t* gidx = nullptr;
  int64_t G = sim.size(0);
  if (game_index.has_value() && game_index->defined()) {
    // validated by the caller (rows in [0, sim.size(0)))
    TORCH_CHECK(game_index->dim() == 1 && game_index->scalar_type() == at::kLong && game_index->is_contiguous(),
                "game_index must be a contiguous int64 [G] tensor");
    G = game_index->size(0);
    gidx = game_index->data_ptr<int64_t>();
  }
  TORCH_CHECK(subsets.size(0) == G && subsets.size(2) == (query_players ? Lq + n : n),
              "subsets must have shape [G, M, P] with P = n (or Lq + n with query_players)");
  TORCH_CHECK(query_mask.dim() == 2 && query_mask.size(0) == G && query_mask.size(1) == Lq &&
              query_mask.scalar_type() == at::kBool && query_mask.is_contiguous(),
              "query_mask must be a contiguous bool [G, Lq] tensor");
  at::Tensor est = at::empty({G, subsets.size(1)}, sim.options());
  at::Tensor se = at::empty({G, subsets.size(1)}, sim.options());
  AT_DISPATCH_FLOATING_TYPES(sim.scalar_type(), "shapley_maxsim_cpu", [&] {
    maxsim_kernel<scalar_t>(sim, query_mask, subsets, player_mask, query_players, num_samples, seed, schedule, gidx,
                            est, se);
  });
  return {est, se};
}

at::Tensor shapley_coalitions_cpu(const at::Tensor& subsets, const at::Tensor& player_mask, int64_t num_samples,
                                  uint64_t seed, int64_t schedule) {
  check_common(subsets, player_mask, num_samples, schedule);
  const int64_t G = subsets.size(0), M = subsets.size(1), P = subsets.size(2), K = num_samples;
  at::Tensor out = at::zeros({G, M, K, P}, subsets.options());
  const bool* Sp = subsets.data_ptr<bool>();
  const bool* pmp = player_mask.data_ptr<bool>();
  bool* op = out.data_ptr<bool>();
  const bool avx2 = cpu_use_avx2();
  at::parallel_for(0, G * M, 1, [&](int64_t lo, int64_t hi) {
    std::vector<int64_t> pool, members, pos, thr(kGroupWords);
    std::vector<uint32_t> words(kGroupWords);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t g = task / M, m = task % M;
      task_players(Sp + task * P, pmp + g * P, P, pool, members);
      pos.resize(pool.size() + 1);
      const Drawer drawer(seed, g, m, int64_t(pool.size()), schedule);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t c = avx2 ? drawer.draw<true>(k, pos.data(), words.data(), thr.data())
                               : drawer.draw<false>(k, pos.data(), words.data(), thr.data());
        bool* row = op + (task * K + k) * P;
        for (int64_t a = 0; a < c; ++a) row[pool[pos[a]]] = true;
      }
    }
  });
  return out;
}

}  // namespace loupe
