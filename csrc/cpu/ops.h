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

}  // namespace loupe
