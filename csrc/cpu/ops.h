// Declarations of the C++ CPU kernels bound in csrc/bind_cpu.cpp.
#pragma once
#include <ATen/ATen.h>
#include <vector>

namespace loupe {

// Token-region similarity (METHOD section 3). Inputs contiguous, float32 or float64; masks bool.
// Returns {out [Bq, Bk] (pairwise) or [B], argmax int32 [Bq, Bk, Lq] or [B, Lq] (-1 = none)}.
std::vector<at::Tensor> trs_forward_cpu(const at::Tensor& query, const at::Tensor& key,
                                        const at::Tensor& query_mask, const at::Tensor& key_mask,
                                        bool pairwise);

// Gradients {d_query, d_key} from the saved arg-max; deterministic (no atomics).
std::vector<at::Tensor> trs_backward_cpu(const at::Tensor& grad_out, const at::Tensor& query,
                                         const at::Tensor& key, const at::Tensor& query_mask,
                                         const at::Tensor& argmax, bool pairwise);

// Shapley interaction by the pinned Philox coalition draw (METHOD section 5). seed is the uint64
// seed; schedule 0 = uniform sizes, 1 = round robin. Inputs contiguous; float32 or float64.
// Returns {estimate [G, M], stderr [G, M]} in the input dtype.
std::vector<at::Tensor> shapley_maxsim_cpu(const at::Tensor& sim, const at::Tensor& query_mask,
                                           const at::Tensor& subsets, const at::Tensor& player_mask,
                                           bool query_players, int64_t num_samples, uint64_t seed,
                                           int64_t schedule);
std::vector<at::Tensor> shapley_pooled_cpu(const at::Tensor& features, const at::Tensor& target,
                                           const at::Tensor& subsets, const at::Tensor& player_mask,
                                           int64_t num_samples, uint64_t seed, int64_t schedule);
// The coalitions the kernels draw: bool [G, M, K, P].
at::Tensor shapley_coalitions_cpu(const at::Tensor& subsets, const at::Tensor& player_mask, int64_t num_samples,
                                  uint64_t seed, int64_t schedule);

}  // namespace loupe
