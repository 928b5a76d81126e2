// The one binding file of the CUDA extension. CUDA kernels live in torch-free csrc/cuda/*.cu files
// (raw pointers + a small launcher declared in csrc/cuda/<op>.h); this file wraps the launchers
// for PyTorch: checks, allocation, the current stream.
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>

#ifndef LOUPE_TORCH_VERSION
#define LOUPE_TORCH_VERSION "unknown"
#endif

#include <c10/cuda/CUDAGuard.h>

#include "cuda/common.h"

namespace {

// The LoupeDtype code of a floating tensor; `what` names the op and the argument in the error.
int dtype_code(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return LOUPE_F32;
    case at::kDouble: return LOUPE_F64;
    case at::kHalf: return LOUPE_F16;
    case at::kBFloat16: return LOUPE_BF16;
    default: TORCH_CHECK(false, what, " must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
  }
  return -1;
}

}  // namespace

// ---- token_region_similarity (includes / wrappers) ----
#include "cuda/token_region_similarity.h"

namespace loupe_trs_cuda {

inline int dtype_code(const at::Tensor& t) { return ::dtype_code(t, "token_region_similarity (cuda): query/key"); }

inline void check_cuda(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(t.is_cuda(), "token_region_similarity (cuda): ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == ref.device(), "token_region_similarity (cuda): ", name, " is on ", t.device(),
              ", query on ", ref.device());
  TORCH_CHECK(t.is_contiguous(), "token_region_similarity (cuda): ", name, " must be contiguous");
}

inline const uint8_t* mask_ptr(const at::Tensor& m, const char* name, int64_t B, int64_t L, const at::Tensor& ref) {
  check_cuda(m, name, ref);
  TORCH_CHECK(m.scalar_type() == at::kBool, "token_region_similarity (cuda): ", name, " must be bool");
  TORCH_CHECK(m.dim() == 2 && m.size(0) == B && m.size(1) == L, "token_region_similarity (cuda): ", name,
              " must be [", B, ", ", L, "], got ", m.sizes());
  return reinterpret_cast<const uint8_t*>(m.data_ptr<bool>());
}

inline void check_int(int64_t v, const char* what) {
  TORCH_CHECK(v >= 0 && v <= INT32_MAX, "token_region_similarity (cuda): ", what, " = ", v, " is out of range");
}

// allow_tf32: fp32 on tensor cores in one TF32 pass (the Python wrapper passes
// torch.backends.cuda.matmul.allow_tf32); false: 3xTF32, about fp32 accuracy.
std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& qm, const at::Tensor& km,
                                bool pairwise, bool allow_tf32) {
  check_cuda(q, "query", q);
  check_cuda(k, "key", q);
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.size(2) == k.size(2),
              "token_region_similarity (cuda): query [Bq, Lq, D] and key [Bk, Lk, D] must share D");
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "token_region_similarity (cuda): query and key dtypes differ");
  const int64_t Bq = q.size(0), Lq = q.size(1), D = q.size(2), Bk = k.size(0), Lk = k.size(1);
  TORCH_CHECK(pairwise || Bq == Bk, "token_region_similarity (cuda): pairwise=False needs Bq == Bk");
  check_int(Bq * Lq, "Bq*Lq");
  check_int(Bk * Lk, "Bk*Lk");
  check_int(D, "D");
  const int dt = dtype_code(q);
  const uint8_t* qmp = mask_ptr(qm, "query_mask", Bq, Lq, q);
  const uint8_t* kmp = mask_ptr(km, "key_mask", Bk, Lk, q);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = pairwise ? at::empty({Bq, Bk}, q.options()) : at::empty({Bq}, q.options());
  at::Tensor amax = pairwise ? at::empty({Bq, Bk, Lq}, q.options().dtype(at::kInt))
                             : at::empty({Bq, Lq}, q.options().dtype(at::kInt));
  const size_t ws_bytes = loupe_trs_forward_workspace(dt, int(Bq), int(Bk), int(Lq), pairwise ? 1 : 0);
  at::Tensor ws = at::empty({static_cast<int64_t>(ws_bytes)}, q.options().dtype(at::kByte));
  const cudaError_t e = loupe_trs_forward(q.data_ptr(), k.data_ptr(), dt, qmp, kmp, int(Bq), int(Bk), int(Lq), int(Lk),
                                          int(D), pairwise ? 1 : 0, allow_tf32 ? 1 : 0, ws.data_ptr(), out.data_ptr(),
                                          amax.data_ptr<int32_t>(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(e == cudaSuccess, "token_region_similarity (cuda) forward: ", cudaGetErrorString(e));
  return {out, amax};
}

// d_query is always a deterministic gather; d_key is grouped per key row and summed in a fixed order
// when `deterministic` (the Python default), else added with shared-memory atomics (the rounding may vary).
std::vector<at::Tensor> backward(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& qm, const at::Tensor& amax, bool pairwise, bool deterministic) {
  check_cuda(q, "query", q);
  check_cuda(k, "key", q);
  check_cuda(grad, "grad", q);
  check_cuda(amax, "argmax", q);
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.size(2) == k.size(2) && q.scalar_type() == k.scalar_type(),
              "token_region_similarity (cuda) backward: query/key shapes or dtypes disagree");
  const int64_t Bq = q.size(0), Lq = q.size(1), D = q.size(2), Bk = k.size(0), Lk = k.size(1);
  TORCH_CHECK(grad.scalar_type() == q.scalar_type(), "token_region_similarity (cuda) backward: grad dtype ",
              grad.scalar_type(), " differs from query dtype ", q.scalar_type());
  TORCH_CHECK(pairwise ? (grad.dim() == 2 && grad.size(0) == Bq && grad.size(1) == Bk)
                       : (grad.dim() == 1 && grad.size(0) == Bq), "token_region_similarity (cuda) backward: grad shape");
  TORCH_CHECK(amax.scalar_type() == at::kInt && amax.numel() == (pairwise ? Bq * Bk * Lq : Bq * Lq),
              "token_region_similarity (cuda) backward: argmax must be the int32 arg-max of the forward");
  TORCH_CHECK(pairwise || Bq == Bk, "token_region_similarity (cuda) backward: pairwise=False needs Bq == Bk");
  // the launcher's int arithmetic, as in the forward (the grouped d_key indexes Bq*Lq entries per key item)
  check_int(Bq * Lq, "Bq*Lq");
  check_int(Bk * Lk, "Bk*Lk");
  check_int(D, "D");
  const int dt = dtype_code(q);
  const uint8_t* qmp = mask_ptr(qm, "query_mask", Bq, Lq, q);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k);
  if (D == 0) return {dq, dk};  // before the workspace: the grouped d_key's is as large as argmax
  const size_t ws_bytes = loupe_trs_backward_workspace(dt, int(Bq), int(Bk), int(Lq), int(Lk), int(D),
                                                     pairwise ? 1 : 0, deterministic ? 1 : 0);
  at::Tensor ws = at::empty({static_cast<int64_t>(ws_bytes)}, q.options().dtype(at::kByte));
  const cudaError_t e = loupe_trs_backward(grad.data_ptr(), q.data_ptr(), k.data_ptr(), dt, qmp,
                                           amax.data_ptr<int32_t>(), int(Bq), int(Bk), int(Lq), int(Lk), int(D),
                                           pairwise ? 1 : 0, deterministic ? 1 : 0, ws.data_ptr(), dq.data_ptr(),
                                           dk.data_ptr(),
                                           c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(e == cudaSuccess, "token_region_similarity (cuda) backward: ", cudaGetErrorString(e));
  return {dq, dk};
}

}  // namespace loupe_trs_cuda

// ---- shapley (includes / wrappers) ----
#include "cuda/shapley.h"

namespace loupe_shapley_cuda {

inline const uint8_t* u8(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.is_contiguous() && t.scalar_type() == at::kBool, name,
              " must be a contiguous bool CUDA tensor");
  return reinterpret_cast<const uint8_t*>(t.data_ptr<bool>());
}

inline void check_common(const at::Tensor& subsets, const at::Tensor& player_mask, int64_t K, int64_t schedule) {
  TORCH_CHECK(subsets.dim() == 3, "subsets must be [G, M, P]");
  TORCH_CHECK(player_mask.dim() == 2 && player_mask.size(0) == subsets.size(0) &&
              player_mask.size(1) == subsets.size(2), "player_mask must be [G, P]");
  TORCH_CHECK(K >= 1 && K <= INT32_MAX, "num_samples out of range");
  TORCH_CHECK(schedule == 0 || schedule == 1, "schedule must be 0 or 1");
}

std::vector<at::Tensor> maxsim(const at::Tensor& sim, const at::Tensor& query_mask, const at::Tensor& subsets,
                               const at::Tensor& player_mask, bool query_players, int64_t num_samples, int64_t seed,
                               int64_t schedule, const c10::optional<at::Tensor>& game_index) {
  check_common(subsets, player_mask, num_samples, schedule);
  TORCH_CHECK(sim.is_cuda() && sim.is_contiguous() && sim.dim() == 3, "sim must be a contiguous [G, Lq, n] CUDA tensor");
  const int64_t Lq = sim.size(1), n = sim.size(2), M = subsets.size(1);
  int64_t G = sim.size(0);
  const int64_t* gidx = nullptr;
  if (game_index.has_value() && game_index->defined()) {  // rows validated by the caller (device-side)
    TORCH_CHECK(game_index->is_cuda() && game_index->dim() == 1 && game_index->scalar_type() == at::kLong &&
                game_index->is_contiguous() && game_index->device() == sim.device(),
                "game_index must be a contiguous int64 [G] CUDA tensor on sim's device");
    G = game_index->size(0);
    gidx = game_index->data_ptr<int64_t>();
  }
  TORCH_CHECK(subsets.size(0) == G && subsets.size(2) == (query_players ? Lq + n : n), "subsets shape");
  TORCH_CHECK(query_mask.dim() == 2 && query_mask.size(0) == G && query_mask.size(1) == Lq, "query_mask shape");
  const int dtype = dtype_code(sim, "shapley_maxsim (cuda): sim");
  const c10::cuda::CUDAGuard guard(sim.device());
  const auto opts = sim.options().dtype(dtype == LOUPE_F64 ? at::kDouble : at::kFloat);
  at::Tensor est = at::empty({G, M}, opts), se = at::empty({G, M}, opts);
  const cudaError_t e = loupe_shapley_maxsim(
      sim.data_ptr(), dtype, gidx, u8(query_mask, "query_mask"), u8(subsets, "subsets"), u8(player_mask, "player_mask"),
      int(G), int(M), int(Lq), int(n), int(num_samples), query_players ? 1 : 0, static_cast<uint64_t>(seed),
      int(schedule), est.data_ptr(), se.data_ptr(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(e == cudaSuccess, "shapley_maxsim: CUDA error ", cudaGetErrorString(e));
  return {est, se};
}

at::Tensor coalitions(const at::Tensor& subsets, const at::Tensor& player_mask, int64_t num_samples, int64_t seed,
                      int64_t schedule) {
  check_common(subsets, player_mask, num_samples, schedule);
  const int64_t G = subsets.size(0), M = subsets.size(1), P = subsets.size(2);
  const c10::cuda::CUDAGuard guard(subsets.device());
  at::Tensor out = at::empty({G, M, num_samples, P}, subsets.options());
  const cudaError_t e = loupe_shapley_coalitions(
      u8(subsets, "subsets"), u8(player_mask, "player_mask"), int(G), int(M), int(P), int(num_samples),
      static_cast<uint64_t>(seed), int(schedule), reinterpret_cast<uint8_t*>(out.data_ptr<bool>()),
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(e == cudaSuccess, "shapley_coalitions: CUDA error ", cudaGetErrorString(e));
  return out;
}

}  // namespace loupe_shapley_cuda

// ---- interaction_loss (includes / wrappers) ----
#include "cuda/interaction_loss.h"

namespace loupe_uil_cuda {

inline int dtype_code(const at::Tensor& t) { return ::dtype_code(t, "uil_cuda: mu"); }

inline const void* ptr(const at::Tensor& mu, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.is_contiguous() && t.device() == mu.device(), "uil_cuda: ", name,
              " must be a contiguous CUDA tensor on the device of mu");
  TORCH_CHECK(t.scalar_type() == mu.scalar_type(), "uil_cuda: ", name, " must have the dtype of mu");
  TORCH_CHECK(t.numel() == mu.numel(), "uil_cuda: ", name, " must have as many elements as mu");
  return t.data_ptr();
}

inline const void* opt_ptr(const at::Tensor& mu, const c10::optional<at::Tensor>& t, const char* name) {
  return (t.has_value() && t->defined()) ? ptr(mu, *t, name) : nullptr;
}

std::vector<at::Tensor> forward(const at::Tensor& mu, const at::Tensor& log_var, const at::Tensor& target,
                                const c10::optional<at::Tensor>& target_var, const c10::optional<at::Tensor>& weight,
                                int64_t reduction, bool need_grad) {
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "uil_forward: reduction must be 0, 1 or 2");
  const int dt = dtype_code(mu);
  const c10::cuda::CUDAGuard guard(mu.device());
  const int64_t n = mu.numel();
  const bool write_grad = need_grad && reduction != 0;
  const auto gdt = mu.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor loss = reduction == 0 ? at::empty_like(mu) : at::empty({}, mu.options());
  at::Tensor gmu = at::empty(write_grad ? mu.sizes() : at::IntArrayRef{0}, mu.options().dtype(gdt));
  at::Tensor gv = at::empty(write_grad ? mu.sizes() : at::IntArrayRef{0}, mu.options().dtype(gdt));
  const int64_t nb = std::max<int64_t>(loupe_uil_num_blocks(n), 1);
  at::Tensor partials = at::empty({nb}, mu.options().dtype(at::kDouble));
  at::Tensor block_status = at::zeros({nb}, mu.options().dtype(at::kInt));
  at::Tensor status = at::zeros({}, mu.options().dtype(at::kInt));
  const cudaError_t e = loupe_uil_forward(
      ptr(mu, mu, "mu"), ptr(mu, log_var, "log_var"), ptr(mu, target, "target"), opt_ptr(mu, target_var, "target_var"),
      opt_ptr(mu, weight, "weight"), dt, n, int(reduction), write_grad ? 1 : 0, loss.data_ptr(),
      write_grad ? gmu.data_ptr() : nullptr, write_grad ? gv.data_ptr() : nullptr, partials.data_ptr<double>(),
      block_status.data_ptr<int>(), status.data_ptr<int>(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(e == cudaSuccess, "uil_forward: CUDA error ", cudaGetErrorString(e));
  return {loss, gmu, gv, status.to(at::kLong)};
}

std::vector<at::Tensor> backward(const at::Tensor& grad, const at::Tensor& mu, const at::Tensor& log_var,
                                 const at::Tensor& target, const c10::optional<at::Tensor>& target_var,
                                 const c10::optional<at::Tensor>& weight) {
  const int dt = dtype_code(mu);
  const c10::cuda::CUDAGuard guard(mu.device());
  at::Tensor dmu = at::empty_like(mu), dv = at::empty_like(mu);
  const cudaError_t e = loupe_uil_backward(
      ptr(mu, grad, "grad"), ptr(mu, mu, "mu"), ptr(mu, log_var, "log_var"), ptr(mu, target, "target"),
      opt_ptr(mu, target_var, "target_var"), opt_ptr(mu, weight, "weight"), dt, mu.numel(), dmu.data_ptr(),
      dv.data_ptr(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(e == cudaSuccess, "uil_backward: CUDA error ", cudaGetErrorString(e));
  return {dmu, dv};
}

}  // namespace loupe_uil_cuda

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "loupe CUDA kernels";
  m.def("torch_version", []() { return std::string(LOUPE_TORCH_VERSION); });
  // ---- token_region_similarity (m.def) ----
  m.def("trs_forward", &loupe_trs_cuda::forward, "token-region similarity forward: (out, int32 argmax) (CUDA)");
  m.def("trs_backward", &loupe_trs_cuda::backward, "token-region similarity backward: (d_query, d_key) (CUDA)");

  // ---- shapley (m.def) ----
  m.def("shapley_maxsim", &loupe_shapley_cuda::maxsim, "Shapley interaction, max-sim game (CUDA)");
  m.def("shapley_coalitions", &loupe_shapley_cuda::coalitions, "coalitions of the pinned draw (CUDA)");

  // ---- interaction_loss (m.def) ----
  m.def("uil_forward", &loupe_uil_cuda::forward, "uncertainty-weighted interaction loss forward (CUDA)");
  m.def("uil_backward", &loupe_uil_cuda::backward, "uncertainty-weighted interaction loss backward, none (CUDA)");
}
