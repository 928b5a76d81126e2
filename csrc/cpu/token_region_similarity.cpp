// Token-region similarity on the CPU (METHOD section 3).
//
// s(a, b) = mean over valid j of max over valid i of <q_aj, k_bi>.
// Forward: one parallel region over blocks of query items; each task computes score tiles with a
// sequential BLAS GEMM into its own buffer (at most kTileElems/4 scores) and reduces each tile to
// the running sum of row maxima and the int32 arg-max. The full Bq*Bk*Lq*Lk scores never exist.
// Backward: a gather (d_query, parallel over query items) and a scatter (d_key, parallel over key
// items, each thread owning its rows), both deterministic.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "ops.h"

namespace loupe {
namespace {

constexpr int64_t kTileElems = int64_t(1) << 20;  // 4 MiB of fp32 scores per tile

// Max and first arg-max of row[0..n) restricted to valid entries (valid == nullptr: all valid).
template <typename T>
inline int32_t row_argmax(const T* row, const bool* valid, int64_t n, T* best_out) {
  if (valid == nullptr) {
    T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
    for (int64_t i = 0; i < n; ++i) m = row[i] > m ? row[i] : m;
    for (int64_t i = 0; i < n; ++i)
      if (row[i] == m) { *best_out = m; return static_cast<int32_t>(i); }
    return -1;  // unreachable for finite input
  }
  T m = -std::numeric_limits<T>::infinity();
  int32_t idx = -1;
  for (int64_t i = 0; i < n; ++i) {
    if (valid[i] && (idx < 0 || row[i] > m)) { m = row[i]; idx = static_cast<int32_t>(i); }
  }
  *best_out = m;
  return idx;
}

template <typename T>
void forward_aligned(const at::Tensor& q, const at::Tensor& k, const bool* qm, const bool* km,
                     const std::vector<uint8_t>& key_all_valid, const std::vector<uint8_t>& key_any_valid,
                     at::Tensor& out, at::Tensor& amax) {
  const int64_t B = q.size(0), Lq = q.size(1), Lk = k.size(1);
  const int64_t cb = std::clamp<int64_t>(kTileElems / std::max<int64_t>(1, Lq * Lk), 1, B);
  at::Tensor buf = at::empty({cb, Lq, Lk}, q.options());
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
        T acc = 0;
        const bool* kv = key_all_valid[b] ? nullptr : km + b * Lk;
        for (int64_t j = 0; j < Lq; ++j) {
          if (!qm[b * Lq + j] || !key_any_valid[b]) { arow[j] = -1; continue; }
          T m;
          arow[j] = row_argmax<T>(sp + (bi * Lq + j) * Lk, kv, Lk, &m);
          acc += m;
        }
        outp[b] = acc;
      }
    });
  }
}

// All pairs: out [Bq, Bk] = sums over valid j of max_i <q_aj, k_bi>, amax [Bq, Bk, Lq]. One parallel
// region over blocks of query items; each task walks all key items in chunks, with its own score
// tile and a sequential GEMM (BLAS runs single-threaded inside the region). A single region matters
// on a loaded machine: every extra fork/join waits for the slowest core.
// With out2/amax2 (both directions, FILIP): also out2 [Bk, Bq] = sums of s(k_b, q_a) with amax2
// [Bk, Bq, Lk], the column maxima of the same tile (for each key token, the max over the query
// item's valid tokens). Sums only; the caller divides by the counts. Each task owns its query items,
// so out2[b, a] has exactly one writer.
template <typename T>
void forward_pairwise(const at::Tensor& q, const at::Tensor& k, const bool* qm, const bool* km,
                      const std::vector<uint8_t>& key_all_valid, const std::vector<uint8_t>& key_any_valid,
                      at::Tensor& out, at::Tensor& amax, const std::vector<uint8_t>* query_any_valid = nullptr,
                      at::Tensor* out2 = nullptr, at::Tensor* amax2 = nullptr) {
  const int64_t Bq = q.size(0), Lq = q.size(1), D = q.size(2);
  const int64_t Bk = k.size(0), Lk = k.size(1);
  const at::Tensor q2 = q.view({Bq * Lq, D});
  const at::Tensor k2 = k.view({Bk * Lk, D});
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t rows_target = 256;
  int64_t ta = std::clamp<int64_t>(rows_target / std::max<int64_t>(1, Lq), 1, Bq);
  ta = std::min(ta, std::max<int64_t>(1, (Bq + 2 * threads - 1) / (2 * threads)));
  const int64_t cb = std::clamp<int64_t>(kTileElems / 4 / std::max<int64_t>(1, ta * Lq * Lk), 1, Bk);
  const int64_t n_tasks = (Bq + ta - 1) / ta;
  T* outp = out.data_ptr<T>();
  T* out2p = out2 ? out2->data_ptr<T>() : nullptr;
  int32_t* ap = amax.data_ptr<int32_t>();
  int32_t* ap2 = amax2 ? amax2->data_ptr<int32_t>() : nullptr;
  at::parallel_for(0, n_tasks, 1, [&](int64_t t_lo, int64_t t_hi) {
    at::Tensor buf = at::empty({ta * Lq, cb * Lk}, q.options());
    std::vector<T> cm(out2p ? Lk : 0);
    std::vector<int32_t> ci(out2p ? Lk : 0);
    for (int64_t t = t_lo; t < t_hi; ++t) {
      const int64_t a0 = t * ta, na = std::min(ta, Bq - a0);
      const at::Tensor qa = q2.narrow(0, a0 * Lq, na * Lq);
      for (int64_t b0 = 0; b0 < Bk; b0 += cb) {
        const int64_t nb = std::min(cb, Bk - b0);
        at::Tensor s = buf.narrow(0, 0, na * Lq).narrow(1, 0, nb * Lk);
        at::mm_out(s, qa, k2.narrow(0, b0 * Lk, nb * Lk).t());
        const T* sp = s.data_ptr<T>();
        const int64_t ld = s.stride(0);
        for (int64_t ai = 0; ai < na; ++ai) {
          const int64_t a = a0 + ai;
          for (int64_t bi = 0; bi < nb; ++bi) {
            const int64_t b = b0 + bi;
            // key -> query direction: column maxima over the valid tokens of query item a, rows
            // read in order (j ascending, strictly larger wins: ties keep the lowest j)
            if (out2p) {
              int32_t* crow = ap2 + (b * Bq + a) * Lk;
              T acc2 = 0;
              if ((*query_any_valid)[a]) {
                bool first = true;
                for (int64_t j = 0; j < Lq; ++j) {
                  if (!qm[a * Lq + j]) continue;
                  const T* row = sp + (ai * Lq + j) * ld + bi * Lk;
                  const int32_t jj = static_cast<int32_t>(j);
                  if (first) {
                    for (int64_t i = 0; i < Lk; ++i) { cm[i] = row[i]; ci[i] = jj; }
                    first = false;
                    continue;
                  }
                  for (int64_t i = 0; i < Lk; ++i)
                    if (row[i] > cm[i]) { cm[i] = row[i]; ci[i] = jj; }
                }
                for (int64_t i = 0; i < Lk; ++i) {
                  if (!km[b * Lk + i]) { crow[i] = -1; continue; }
                  crow[i] = ci[i];
                  acc2 += cm[i];
                }
              } else {
                for (int64_t i = 0; i < Lk; ++i) crow[i] = -1;
              }
              out2p[b * Bq + a] = acc2;
            }
            // query -> key direction: row maxima
            int32_t* arow = ap + (a * Bk + b) * Lq;
            if (!key_any_valid[b]) {
              for (int64_t j = 0; j < Lq; ++j) arow[j] = -1;
              outp[a * Bk + b] = 0;
              continue;
            }
            const bool* kv = key_all_valid[b] ? nullptr : km + b * Lk;
            T acc = 0;
            for (int64_t j = 0; j < Lq; ++j) {
              if (!qm[a * Lq + j]) { arow[j] = -1; continue; }
              T m;
              arow[j] = row_argmax<T>(sp + (ai * Lq + j) * ld + bi * Lk, kv, Lk, &m);
              acc += m;
            }
            outp[a * Bk + b] = acc;
          }
        }
      }
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
    if (pairwise) forward_pairwise<scalar_t>(qd, kd, qm, km, all_valid, any_valid, out, amax);
    else forward_aligned<scalar_t>(qd, kd, qm, km, all_valid, any_valid, out, amax);
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
    forward_pairwise<scalar_t>(qd, kd, qm, km, all_valid, any_valid, out, amax, &q_any, &out2, &amax2);
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
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "trs_backward_cpu", [&] {
    using T = scalar_t;
    const std::vector<T> inv = inverse_counts<T>(qm, Bq, Lq);
    const T* gp = g.data_ptr<T>();
    const T* qp = query.data_ptr<T>();
    const T* kp = key.data_ptr<T>();
    T* dqp = dq.data_ptr<T>();
    T* dkp = dk.data_ptr<T>();
    const int64_t cols = pairwise ? Bk : 1;
    // d_query: gather of the arg-max keys; each thread owns its query items.
    at::parallel_for(0, Bq, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t a = lo; a < hi; ++a) {
        if (inv[a] == T(0)) continue;
        for (int64_t c = 0; c < cols; ++c) {
          const int64_t b = pairwise ? c : a;
          const T w = gp[a * cols + c] * inv[a];
          if (w == T(0)) continue;
          const int32_t* arow = ap + (a * cols + c) * Lq;
          for (int64_t j = 0; j < Lq; ++j) {
            const int32_t i = arow[j];
            if (i < 0) continue;
            T* dst = dqp + (a * Lq + j) * D;
            const T* src = kp + (b * Lk + i) * D;
            _Pragma("omp simd")
            for (int64_t d = 0; d < D; ++d) dst[d] += w * src[d];
          }
        }
      }
    });
    // d_key: scatter; each thread owns its key items and visits (a, j) in a fixed order.
    at::parallel_for(0, Bk, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b) {
        const int64_t a_lo = pairwise ? 0 : b, a_hi = pairwise ? Bq : b + 1;
        for (int64_t a = a_lo; a < a_hi; ++a) {
          if (inv[a] == T(0)) continue;
          const int64_t c = pairwise ? b : 0;
          const T w = gp[a * cols + c] * inv[a];
          if (w == T(0)) continue;
          const int32_t* arow = ap + (a * cols + c) * Lq;
          for (int64_t j = 0; j < Lq; ++j) {
            const int32_t i = arow[j];
            if (i < 0) continue;
            T* dst = dkp + (b * Lk + i) * D;
            const T* src = qp + (a * Lq + j) * D;
            _Pragma("omp simd")
            for (int64_t d = 0; d < D; ++d) dst[d] += w * src[d];
          }
        }
      }
    });
  });
  return {dq, dk};
}

}  // namespace loupe
