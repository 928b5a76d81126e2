// Declarations of the C++ CPU kernels bound in csrc/bind_cpu.cpp.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <vector>

namespace loupe {

// Whether the AVX2+FMA copies of the hot loops run: the CPU has both, and LOUPE_CPU_BASELINE_ISA=1
// (read once per process) does not ask for the baseline copies (for tests of the code that
// machines without AVX2 run). The kernels compile those copies only on x86-64 GCC/Clang.
inline bool cpu_use_avx2() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__INTEL_COMPILER)
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         !(std::getenv("LOUPE_CPU_BASELINE_ISA") && std::getenv("LOUPE_CPU_BASELINE_ISA")[0] == '1');
  return ok;
#else
  return false;
#endif
}

// Chunks of [0, n) handed out one at a time to the threads of one parallel region (dynamic
// scheduling). at::parallel_for splits a range evenly in advance, so on a shared machine a thread
// that loses its core holds up the whole call; here the other threads take its remaining chunks.
// Which thread runs a chunk never changes a result: every chunk owns its outputs.
class ChunkQueue {
 public:
  ChunkQueue(int64_t n, int64_t chunk) : n_(n), chunk_(std::max<int64_t>(1, chunk)) {}
  bool claim(int64_t& lo, int64_t& hi) {
    lo = next_.fetch_add(chunk_, std::memory_order_relaxed);
    if (lo >= n_) return false;
    hi = std::min(n_, lo + chunk_);
    return true;
  }
  int64_t chunks() const { return (n_ + chunk_ - 1) / chunk_; }

 private:
  const int64_t n_, chunk_;
  std::atomic<int64_t> next_{0};
};

// worker(queue) runs once on each thread of one region (once in all when already inside a parallel
// region); it sets up its scratch, then claims chunks until none is left.
template <typename Worker>
void parallel_chunks(int64_t n, int64_t chunk, const Worker& worker) {
  ChunkQueue queue(n, chunk);
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), queue.chunks()));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) { worker(queue); });
}

// Token-region similarity (METHOD section 3). Inputs contiguous, float32 or float64; masks bool.
// Returns {out [Bq, Bk] (pairwise) or [B], argmax int32 [Bq, Bk, Lq] or [B, Lq] (-1 = none)}.
std::vector<at::Tensor> trs_forward_cpu(const at::Tensor& query, const at::Tensor& key,
                                        const at::Tensor& query_mask, const at::Tensor& key_mask,
                                        bool pairwise);

// Gradients {d_query, d_key} from the saved arg-max; deterministic (no atomics).
std::vector<at::Tensor> trs_dual_forward_cpu(const at::Tensor& query, const at::Tensor& key,
                                             const at::Tensor& query_mask, const at::Tensor& key_mask);
std::vector<at::Tensor> trs_backward_cpu(const at::Tensor& grad_out, const at::Tensor& query,
                                         const at::Tensor& key, const at::Tensor& query_mask,
                                         const at::Tensor& argmax, bool pairwise);

// Shapley interaction by the pinned Philox coalition draw (METHOD section 5). seed is the uint64
// seed; schedule 0 = uniform sizes, 1 = round robin. Inputs contiguous; float32 or float64.
// Returns {estimate [G, M], stderr [G, M]} in the input dtype. game_index (int64 [G], optional): game g
// plays on sim[game_index[g]] (query_mask, subsets and player_mask stay per game).
std::vector<at::Tensor> shapley_maxsim_cpu(const at::Tensor& sim, const at::Tensor& query_mask,
                                           const at::Tensor& subsets, const at::Tensor& player_mask,
                                           bool query_players, int64_t num_samples, uint64_t seed,
                                           int64_t schedule, const c10::optional<at::Tensor>& game_index);
// The coalitions the kernels draw: bool [G, M, K, P].
at::Tensor shapley_coalitions_cpu(const at::Tensor& subsets, const at::Tensor& player_mask, int64_t num_samples,
                                  uint64_t seed, int64_t schedule);

// Uncertainty-weighted interaction loss (METHOD section 8). Inputs contiguous, one dtype (float16,
// bfloat16, float32, float64), same numel; target_var / weight optional. reduction 0 none, 1 mean,
// 2 sum. Returns {loss, grad_mu, grad_log_var, status}: for mean/sum with need_grad the gradients
// of the reduced loss (float32, float64 for float64 input), else empty; status int64 bit mask
// (1 target not finite where weight != 0, 2 target_var < 0, 4 target_var not finite where weight
// != 0, 8 weight negative or not finite).
std::vector<at::Tensor> uil_forward_cpu(const at::Tensor& mu, const at::Tensor& log_var, const at::Tensor& target,
                                        const c10::optional<at::Tensor>& target_var,
                                        const c10::optional<at::Tensor>& weight, int64_t reduction, bool need_grad);
// Backward of reduction none: {d_mu, d_log_var} = grad * dl/d(.), in the input dtype.
std::vector<at::Tensor> uil_backward_cpu(const at::Tensor& grad, const at::Tensor& mu, const at::Tensor& log_var,
                                         const at::Tensor& target, const c10::optional<at::Tensor>& target_var,
                                         const c10::optional<at::Tensor>& weight);

// Dense box objectness (loupe_kernels/box_objectness.py): for every whole-patch box of the h x w grid
// (candidate order), {logits [B, K], inv_in [B, K], inv_out [B, K]} with
// logit = b2 + <w2, gelu(bias + inv_in * W_in S_in + inv_out * W_out S_out)>. tokens [B, h*w, D];
// w_in, w_out [H, D]; bias [1 or B, K, H]; w2 [H]; all contiguous, one dtype (float32 or float64).
// Forward only.
std::vector<at::Tensor> box_objectness_cpu(const at::Tensor& tokens, int64_t h, int64_t w, const at::Tensor& w_in,
                                           const at::Tensor& w_out, const at::Tensor& bias, const at::Tensor& w2,
                                           double b2, double eps);

}  // namespace loupe
