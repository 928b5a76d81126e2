// Fused Shapley coalition sampling on the CPU (METHOD section 5).
//
// One task per (game g, subset m), run by at::parallel_for. Each task draws its K coalitions from
// the pinned Philox4x32-10 counter (k, m, g, b) in registers (selection sampling over the pool of
// valid players outside S: O(players) integer work, stopped as soon as the size is reached or the
// rest is forced), and evaluates one sample with one pass over the coalition: the masked max over
// C is built once, then v(C u {i}) and v(C u S) follow from element-wise maxima. Mean and standard
// error are accumulated with Welford's update in double. Nothing of size [K, P] or larger exists.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "ops.h"

namespace loupe {
namespace {

constexpr double kNormEps = 1e-12;

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
// increasing order, so one block is kept.
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
  inline int64_t draw(int64_t k, int64_t* pos) const {
    Stream st(seed, k, m, g);
    const uint64_t np = uint64_t(npool + 1);
    const uint32_t u0 = st.word(0);
    const int64_t r = schedule == 0 ? int64_t((uint64_t(u0) * np) >> 32) : int64_t((uint64_t(k) + rr_offset) % np);
    int64_t c = 0;
    for (int64_t t = 0; t < npool; ++t) {
      const int64_t need = r - c;
      if (need == 0) break;                 // u * rem < 0 never holds
      const int64_t rem = npool - t;
      if (need == rem) {                    // u * rem < rem * 2^32 always holds
        for (; t < npool; ++t) pos[c++] = t;
        break;
      }
      const uint64_t u = st.word(1 + t);
      if (u * uint64_t(rem) < (uint64_t(need) << 32)) pos[c++] = t;
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
void maxsim_kernel(const at::Tensor& sim, const at::Tensor& qm, const at::Tensor& subsets, const at::Tensor& pm,
                   bool query_players, int64_t K, uint64_t seed, int64_t schedule, const int64_t* gidx,
                   at::Tensor& est, at::Tensor& se) {
  const int64_t G = subsets.size(0), Lq = sim.size(1), n = sim.size(2);
  const int64_t M = subsets.size(1), P = subsets.size(2);
  const T* simp = sim.data_ptr<T>();
  const bool* qmp = qm.data_ptr<bool>();
  const bool* Sp = subsets.data_ptr<bool>();
  const bool* pmp = pm.data_ptr<bool>();
  T* estp = est.data_ptr<T>();
  T* sep = se.data_ptr<T>();
  const T ninf = -std::numeric_limits<T>::infinity();

  at::parallel_for(0, G * M, 1, [&](int64_t lo, int64_t hi) {
    std::vector<int64_t> pool, members, pos;
    std::vector<int64_t> qrow, qpos;        // compact query rows; position of a query row (-1 = not valid)
    std::vector<T> cols, mC, sS;            // cols[i * nq + jj] = sim[g, qrow[jj], i]
    std::vector<uint8_t> inQ0, inQ, xq, sq;
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t g = task / M, m = task % M;
      const bool* S = Sp + (g * M + m) * P;
      const bool* valid = pmp + g * P;
      task_players(S, valid, P, pool, members);
      const int64_t npool = int64_t(pool.size()), s = int64_t(members.size());
      // query rows of this game
      qrow.clear();
      qpos.assign(Lq, -1);
      for (int64_t j = 0; j < Lq; ++j) {
        const bool ok = query_players ? valid[j] : qmp[g * Lq + j];
        if (ok) { qpos[j] = int64_t(qrow.size()); qrow.push_back(j); }
      }
      const int64_t nq = int64_t(qrow.size());
      cols.resize(size_t(n * nq));
      const T* sg = simp + (gidx ? gidx[g] : g) * Lq * n;   // game g plays on sim[game_index[g]]
      for (int64_t jj = 0; jj < nq; ++jj) {
        const T* row = sg + qrow[jj] * n;
        for (int64_t i = 0; i < n; ++i) cols[i * nq + jj] = row[i];
      }
      const int64_t qoff = query_players ? Lq : 0;   // players < qoff are query tokens
      auto is_key = [&](int64_t p) { return p >= qoff; };
      auto col = [&](int64_t p) { return cols.data() + (p - qoff) * nq; };
      inQ0.assign(nq, query_players ? 0 : 1);
      xq.assign(nq, 0);
      sq.assign(nq, 0);
      sS.assign(nq, ninf);
      int64_t s_keys = 0;
      for (int64_t p : members) {
        if (is_key(p)) {
          ++s_keys;
          const T* c = col(p);
          for (int64_t jj = 0; jj < nq; ++jj) sS[jj] = c[jj] > sS[jj] ? c[jj] : sS[jj];
        } else if (qpos[p] >= 0) {
          sq[qpos[p]] = 1;
        }
      }
      mC.resize(nq);
      inQ.resize(nq);
      pos.resize(npool + 1);
      const Drawer drawer(seed, g, m, npool, schedule);

      // value of C plus an optional key column (element-wise max) and optional extra query players
      auto value = [&](const T* extra, const uint8_t* xflags, int64_t keys) -> double {
        double sum = 0;
        int64_t cnt = 0;
        if (!query_players) {
          if (extra) {
            for (int64_t jj = 0; jj < nq; ++jj) sum += double(extra[jj] > mC[jj] ? extra[jj] : mC[jj]);
          } else {
            for (int64_t jj = 0; jj < nq; ++jj) sum += double(mC[jj]);
          }
          cnt = nq;
        } else {
          for (int64_t jj = 0; jj < nq; ++jj) {
            if (!(inQ[jj] | xflags[jj])) continue;
            const T a = mC[jj];
            sum += double(extra && extra[jj] > a ? extra[jj] : a);
            ++cnt;
          }
        }
        if (keys == 0 || cnt == 0) return 0.0;
        return sum / double(cnt);
      };

      Welford acc;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t c = drawer.draw(k, pos.data());
        std::fill(mC.begin(), mC.end(), ninf);
        std::copy(inQ0.begin(), inQ0.end(), inQ.begin());
        int64_t nk = 0;
        for (int64_t a = 0; a < c; ++a) {
          const int64_t p = pool[pos[a]];
          if (is_key(p)) {
            ++nk;
            const T* cp = col(p);
            T* mp = mC.data();
            for (int64_t jj = 0; jj < nq; ++jj) mp[jj] = cp[jj] > mp[jj] ? cp[jj] : mp[jj];
          } else if (qpos[p] >= 0) {
            inQ[qpos[p]] = 1;
          }
        }
        const double vC = value(nullptr, xq.data(), nk);
        double gk = value(s_keys ? sS.data() : nullptr, sq.data(), nk + s_keys);
        for (int64_t p : members) {
          double vi;
          if (is_key(p)) {
            vi = value(col(p), xq.data(), nk + 1);
          } else {
            xq[qpos[p]] = 1;
            vi = value(nullptr, xq.data(), nk);
            xq[qpos[p]] = 0;
          }
          gk -= vi;
        }
        gk += double(s - 1) * vC;
        acc.add(gk);
      }
      estp[g * M + m] = T(acc.mean);
      sep[g * M + m] = T(acc.stderr_());
    }
  });
}

// ---- pooled game: v(C) = <normalize(sum_{i in C} x_i), t>, in double ------------------------
template <typename T>
void pooled_kernel(const at::Tensor& feat, const at::Tensor& target, const at::Tensor& subsets, const at::Tensor& pm,
                   int64_t K, uint64_t seed, int64_t schedule, at::Tensor& est, at::Tensor& se) {
  const int64_t G = feat.size(0), D = feat.size(2);
  const int64_t M = subsets.size(1), P = subsets.size(2);
  const T* fp = feat.data_ptr<T>();
  const T* tp = target.data_ptr<T>();
  const bool* Sp = subsets.data_ptr<bool>();
  const bool* pmp = pm.data_ptr<bool>();
  T* estp = est.data_ptr<T>();
  T* sep = se.data_ptr<T>();

  at::parallel_for(0, G * M, 1, [&](int64_t lo, int64_t hi) {
    std::vector<int64_t> pool, members, pos;
    std::vector<double> t, xs, zS, zC, at_, nn_;
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t g = task / M, m = task % M;
      task_players(Sp + (g * M + m) * P, pmp + g * P, P, pool, members);
      const int64_t npool = int64_t(pool.size()), s = int64_t(members.size());
      const T* xg = fp + g * P * D;
      t.assign(tp + g * D, tp + (g + 1) * D);
      auto dot = [&](const double* a, const double* b) {
        double r = 0;
        for (int64_t d = 0; d < D; ++d) r += a[d] * b[d];
        return r;
      };
      xs.resize(size_t(s * D));
      zS.assign(D, 0.0);
      at_.resize(s);
      nn_.resize(s);
      for (int64_t a = 0; a < s; ++a) {
        double* xa = xs.data() + a * D;
        const T* src = xg + members[a] * D;
        for (int64_t d = 0; d < D; ++d) { xa[d] = double(src[d]); zS[d] += xa[d]; }
        at_[a] = dot(xa, t.data());
        nn_[a] = dot(xa, xa);
      }
      const double aS = dot(zS.data(), t.data()), nS = dot(zS.data(), zS.data());
      auto v = [](double zt, double zz) { return zt / std::max(std::sqrt(std::max(zz, 0.0)), kNormEps); };
      zC.resize(D);
      pos.resize(npool + 1);
      const Drawer drawer(seed, g, m, npool, schedule);
      Welford acc;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t c = drawer.draw(k, pos.data());
        std::fill(zC.begin(), zC.end(), 0.0);
        for (int64_t a = 0; a < c; ++a) {
          const T* src = xg + pool[pos[a]] * D;
          for (int64_t d = 0; d < D; ++d) zC[d] += double(src[d]);
        }
        const double zt = dot(zC.data(), t.data()), zz = dot(zC.data(), zC.data());
        double gk = v(zt + aS, zz + 2.0 * dot(zC.data(), zS.data()) + nS);
        for (int64_t a = 0; a < s; ++a)
          gk -= v(zt + at_[a], zz + 2.0 * dot(zC.data(), xs.data() + a * D) + nn_[a]);
        gk += double(s - 1) * v(zt, zz);
        acc.add(gk);
      }
      estp[g * M + m] = T(acc.mean);
      sep[g * M + m] = T(acc.stderr_());
    }
  });
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

std::vector<at::Tensor> shapley_pooled_cpu(const at::Tensor& features, const at::Tensor& target,
                                           const at::Tensor& subsets, const at::Tensor& player_mask,
                                           int64_t num_samples, uint64_t seed, int64_t schedule) {
  check_common(subsets, player_mask, num_samples, schedule);
  TORCH_CHECK(features.dim() == 3 && features.is_contiguous(), "features must be a contiguous [G, n, D] tensor");
  TORCH_CHECK(features.scalar_type() == at::kFloat || features.scalar_type() == at::kDouble,
              "features must be float32 or float64");
  TORCH_CHECK(target.dim() == 2 && target.is_contiguous() && target.scalar_type() == features.scalar_type() &&
              target.size(0) == features.size(0) && target.size(1) == features.size(2),
              "target must be a contiguous [G, D] tensor of the dtype of features");
  TORCH_CHECK(subsets.size(0) == features.size(0) && subsets.size(2) == features.size(1),
              "subsets must have shape [G, M, n]");
  at::Tensor est = at::empty({features.size(0), subsets.size(1)}, features.options());
  at::Tensor se = at::empty({features.size(0), subsets.size(1)}, features.options());
  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "shapley_pooled_cpu", [&] {
    pooled_kernel<scalar_t>(features, target, subsets, player_mask, num_samples, seed, schedule, est, se);
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
  at::parallel_for(0, G * M, 1, [&](int64_t lo, int64_t hi) {
    std::vector<int64_t> pool, members, pos;
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t g = task / M, m = task % M;
      task_players(Sp + task * P, pmp + g * P, P, pool, members);
      pos.resize(pool.size() + 1);
      const Drawer drawer(seed, g, m, int64_t(pool.size()), schedule);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t c = drawer.draw(k, pos.data());
        bool* row = op + (task * K + k) * P;
        for (int64_t a = 0; a < c; ++a) row[pool[pos[a]]] = true;
      }
    }
  });
  return out;
}

}  // namespace loupe
