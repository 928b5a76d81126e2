// The one binding file of the CUDA extension. CUDA kernels live in torch-free csrc/cuda/*.cu files
// (raw pointers + a small launcher declared in csrc/cuda/<op>.h); this file wraps the launchers
// for PyTorch: checks, allocation, the current stream.
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>

#ifndef LOUPE_TORCH_VERSION
#define LOUPE_TORCH_VERSION "unknown"
#endif

// ---- token_region_similarity (includes / wrappers) ----

// ---- shapley (includes / wrappers) ----
#include <c10/cuda/CUDAGuard.h>

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
                               int64_t schedule) {
  check_common(subsets, player_mask, num_samples, schedule);
  TORCH_CHECK(sim.is_cuda() && sim.is_contiguous() && sim.dim() == 3, "sim must be a contiguous [G, Lq, n] CUDA tensor");
  const int64_t G = sim.size(0), Lq = sim.size(1), n = sim.size(2), M = subsets.size(1);
  TORCH_CHECK(subsets.size(0) == G && subsets.size(2) == (query_players ? Lq + n : n), "subsets shape");
  TORCH_CHECK(query_mask.dim() == 2 && query_mask.size(0) == G && query_mask.size(1) == Lq, "query_mask shape");
  int dtype;
  switch (sim.scalar_type()) {
    case at::kFloat: dtype = LOUPE_F32; break;
    case at::kDouble: dtype = LOUPE_F64; break;
    case at::kHalf: dtype = LOUPE_F16; break;
    case at::kBFloat16: dtype = LOUPE_BF16; break;
    default: TORCH_CHECK(false, "sim must be float16, bfloat16, float32 or float64");
  }
  const c10::cuda::CUDAGuard guard(sim.device());
  const auto opts = sim.options().dtype(dtype == LOUPE_F64 ? at::kDouble : at::kFloat);
  at::Tensor est = at::empty({G, M}, opts), se = at::empty({G, M}, opts);
  const cudaError_t e = loupe_shapley_maxsim(
      sim.data_ptr(), dtype, u8(query_mask, "query_mask"), u8(subsets, "subsets"), u8(player_mask, "player_mask"),
      int(G), int(M), int(Lq), int(n), int(num_samples), query_players ? 1 : 0, static_cast<uint64_t>(seed),
      int(schedule), est.data_ptr(), se.data_ptr(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(e == cudaSuccess, "shapley_maxsim: CUDA error ", cudaGetErrorString(e));
  return {est, se};
}

std::vector<at::Tensor> pooled(const at::Tensor& features, const at::Tensor& target, const at::Tensor& subsets,
                               const at::Tensor& player_mask, int64_t num_samples, int64_t seed, int64_t schedule) {
  check_common(subsets, player_mask, num_samples, schedule);
  TORCH_CHECK(features.is_cuda() && features.is_contiguous() && features.dim() == 3,
              "features must be a contiguous [G, n, D] CUDA tensor");
  const int64_t G = features.size(0), n = features.size(1), D = features.size(2), M = subsets.size(1);
  TORCH_CHECK(target.is_cuda() && target.is_contiguous() && target.dim() == 2 && target.size(0) == G &&
              target.size(1) == D && target.scalar_type() == features.scalar_type() &&
              target.device() == features.device(),
              "target must be a contiguous [G, D] CUDA tensor of the dtype and device of features");
  TORCH_CHECK(subsets.size(0) == G && subsets.size(2) == n, "subsets must be [G, M, n]");
  TORCH_CHECK(G * M <= INT32_MAX && D <= INT32_MAX && n <= INT32_MAX, "features/subsets too large");
  int dtype;
  switch (features.scalar_type()) {
    case at::kFloat: dtype = LOUPE_F32; break;
    case at::kDouble: dtype = LOUPE_F64; break;
    case at::kHalf: dtype = LOUPE_F16; break;
    case at::kBFloat16: dtype = LOUPE_BF16; break;
    default: TORCH_CHECK(false, "features must be float16, bfloat16, float32 or float64");
  }
  const c10::cuda::CUDAGuard guard(features.device());
  const auto opts = features.options().dtype(dtype == LOUPE_F64 ? at::kDouble : at::kFloat);
  at::Tensor est = at::empty({G, M}, opts), se = at::empty({G, M}, opts);
  const cudaError_t e = loupe_shapley_pooled(
      features.data_ptr(), target.data_ptr(), dtype, u8(subsets, "subsets"), u8(player_mask, "player_mask"), int(G),
      int(M), int(n), int(D), int(num_samples), static_cast<uint64_t>(seed), int(schedule), est.data_ptr(),
      se.data_ptr(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(e == cudaSuccess, "shapley_pooled: CUDA error ", cudaGetErrorString(e));
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
#include <c10/cuda/CUDAGuard.h>

#include "cuda/interaction_loss.h"

namespace loupe_uil_cuda {

inline int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return LOUPE_UIL_F32;
    case at::kDouble: return LOUPE_UIL_F64;
    case at::kHalf: return LOUPE_UIL_F16;
    case at::kBFloat16: return LOUPE_UIL_BF16;
    default: TORCH_CHECK(false, "uil_cuda: mu must be float16, bfloat16, float32 or float64");
  }
  return -1;
}

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

  // ---- shapley (m.def) ----
  m.def("shapley_maxsim", &loupe_shapley_cuda::maxsim, "Shapley interaction, max-sim game (CUDA)");
  m.def("shapley_pooled", &loupe_shapley_cuda::pooled, "Shapley interaction, pooled game (CUDA)");
  m.def("shapley_coalitions", &loupe_shapley_cuda::coalitions, "coalitions of the pinned draw (CUDA)");

  // ---- interaction_loss (m.def) ----
  m.def("uil_forward", &loupe_uil_cuda::forward, "uncertainty-weighted interaction loss forward (CUDA)");
  m.def("uil_backward", &loupe_uil_cuda::backward, "uncertainty-weighted interaction loss backward, none (CUDA)");
}
