// Fused uncertainty-weighted interaction loss on the CPU (METHOD section 8).
//
// Per element, with r = target - mu and v = log_var (math in float for float16/bfloat16/float32
// inputs, in double for float64):
//   no target_var:  l = 0.5 * (z^2 + v),            z = r * exp(-v / 2)
//                   dl/dmu = -z * exp(-v / 2),       dl/dv = 0.5 * (1 - z^2)
//   target_var s:   l = 0.5 * (r^2 / V + log V),    V = exp(v) + s
//                   dl/dmu = -r / V,                 dl/dv = 0.5 * (exp(v) / V) * (1 - r^2 / V)
// times weight w (an element with w == 0 contributes exactly 0, whatever its target).
//
// One pass over the inputs. For reduction mean/sum the same pass also writes the gradients of the
// reduced loss (already scaled by w and 1/N), so the backward only multiplies them by the incoming
// scalar; for reduction none the backward recomputes the element in one pass. The reduced loss is
// summed per fixed block of elements in double, then the blocks in order: the result does not
// depend on the number of threads. Invalid data is reported in a status word instead of thrown, so
// that the Python side raises a ValueError naming the argument:
//   bit 1: target not finite where weight != 0;  bit 2: target_var negative;
//   bit 4: target_var not finite where weight != 0;  bit 8: weight negative or not finite.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cuda/common.h"  // LoupeUilStatus: the status bits (plain enums, no CUDA headers)
#include "ops.h"

namespace loupe {
namespace {

constexpr int64_t kBlock = 16384;  // elements per parallel task (fixed: the sum is thread-count free)
constexpr int64_t kChunk = 256;    // elements per vectorised inner loop

// GCC keeps floating-point comparisons and selects scalar under its default -ftrapping-math, which
// stops the element loop from vectorising (about 4x slower). The functions below only compute
// values, never inspect the FP exception flags: compile them without trapping math. Clang does
// not trap by default.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#endif

template <typename acc_t>
inline bool not_finite(acc_t x) {
  const acc_t d = x - x;  // NaN for NaN and +-inf, 0 otherwise; keeps the loop branch-free
  return d != d;
}

// exp for float math: Cody-Waite reduction and the Cephes degree-6 polynomial (about 1 ulp),
// written branch-free so that the element loop vectorises (std::exp is a scalar libm call).
// Arguments are clamped to [-87.3, 88.3]: the result stays a finite normal float.
inline float exp_approx(float x) {
  x = x < -87.3f ? -87.3f : x;
  x = x > 88.3f ? 88.3f : x;
  float fn = x * 1.44269504088896341f + 12582912.0f;  // round to nearest integer (magic constant)
  fn -= 12582912.0f;
  float r = x - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (int32_t(fn) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(float));
  return p * two_n;
}
inline double exp_approx(double x) { return std::exp(x); }

// log for float math on positive normal finite x (the only arguments it gets: exp_approx(v) +
// target_var >= 1.2e-38): exponent from the bits, Cephes' logf polynomial on the mantissa in
// [sqrt(1/2), sqrt(2)) (about 1 ulp), branch-free.
inline float log_approx(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(float));
  float e = float(((bits >> 23) & 0xff) - 126);
  const int32_t mbits = (bits & 0x007fffff) | 0x3f000000;  // mantissa in [0.5, 1)
  float m;
  std::memcpy(&m, &mbits, sizeof(float));
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1.0f : e;
  const float f = small ? (m + m - 1.0f) : (m - 1.0f);
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  y += -2.12194440e-4f * e;
  y += -0.5f * z;
  return f + y + 0.693359375f * e;
}
inline double log_approx(double x) { return std::log(x); }

// The loss of one element and its two derivatives, without weight.
// Twin of element() in csrc/cuda/interaction_loss.cu (and _element in triton_interaction_loss.py): the same
// formulas, kept apart because this file builds against ATen (at::parallel_for; its own vectorisable
// exp/log) while the .cu must compile with plain nvcc and no torch headers.
template <typename acc_t, bool HAS_TV>
inline void element(acc_t mu, acc_t v, acc_t t, acc_t s, acc_t& loss, acc_t& dmu, acc_t& dv) {
  const acc_t r = t - mu;
  if constexpr (!HAS_TV) {
    const acc_t e = exp_approx(acc_t(-0.5) * v);
    const acc_t z = r * e;
    const acc_t z2 = z * z;
    loss = acc_t(0.5) * (z2 + v);
    dmu = -z * e;
    dv = acc_t(0.5) * (acc_t(1) - z2);
  } else {
    const acc_t ev = exp_approx(v);
    const acc_t var = ev + s;
    const acc_t inv = acc_t(1) / var;
    const acc_t rs = r * inv;
    const acc_t q = r * rs;
    loss = acc_t(0.5) * (q + log_approx(var));
    dmu = -rs;
    dv = acc_t(0.5) * (ev * inv) * (acc_t(1) - q);
  }
}

// MODE 0: forward, reduction none (write loss per element).
// MODE 1: forward, reduction mean/sum, no gradient (sum the loss).
// MODE 2: forward, reduction mean/sum, sum the loss and write the scaled gradients.
// MODE 3: backward of reduction none (gradients times the incoming gradient of each element).
// The loop over at most kChunk contiguous acc_t elements; branch-free so that it vectorises. A
// floating-point sum in the loop would not vectorise (its order is fixed), so for MODE 1/2 the
// element losses go to a buffer that is then summed in eight interleaved acc_t lanes; the chunks
// are added in double. The integer status reductions vectorise as they are.
template <typename acc_t, int MODE, bool HAS_TV, bool HAS_W>
inline void core(const acc_t* __restrict mu, const acc_t* __restrict lv, const acc_t* __restrict tg,
                 const acc_t* __restrict tv, const acc_t* __restrict w, const acc_t* __restrict gin,
                 acc_t* __restrict loss_out, acc_t* __restrict gmu, acc_t* __restrict gv, int64_t n, acc_t scale,
                 double& sum_out, int& status_out) {
  acc_t lbuf[kChunk];
  int bad_t = 0, bad_s_neg = 0, bad_s = 0, bad_w = 0;
  for (int64_t i = 0; i < n; ++i) {
    const acc_t m = mu[i], v = lv[i];
    acc_t t = tg[i];
    acc_t s = HAS_TV ? tv[i] : acc_t(0);
    const acc_t wi = HAS_W ? w[i] : acc_t(1);
    const bool live = HAS_W ? (wi != acc_t(0)) : true;
    if constexpr (HAS_W) bad_w |= int(not_finite(wi)) | int(wi < acc_t(0));
    if constexpr (MODE != 3) {
      bad_t |= int(live) & int(not_finite(t));
      if constexpr (HAS_TV) {
        bad_s_neg |= int(s < acc_t(0));
        bad_s |= int(live) & int(not_finite(s));
      }
    }
    if constexpr (HAS_W) {  // a dead element's data never enters the arithmetic
      t = live ? t : m;
      s = live ? s : acc_t(0);
    }
    acc_t l, dm, dv;
    element<acc_t, HAS_TV>(m, v, t, s, l, dm, dv);
    if constexpr (HAS_W) {
      l = live ? wi * l : acc_t(0);
      dm = live ? wi * dm : acc_t(0);
      dv = live ? wi * dv : acc_t(0);
    }
    if constexpr (MODE == 0) {
      loss_out[i] = l;
    } else if constexpr (MODE == 1 || MODE == 2) {
      lbuf[i] = l;
      if constexpr (MODE == 2) {
        gmu[i] = dm * scale;
        gv[i] = dv * scale;
      }
    } else {
      gmu[i] = dm * gin[i];
      gv[i] = dv * gin[i];
    }
  }
  if constexpr (MODE == 1 || MODE == 2) {
    acc_t lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
      for (int j = 0; j < 8; ++j) lane[j] += lbuf[i + j];
    for (; i < n; ++i) lane[i & 7] += lbuf[i];
    acc_t sum = 0;
    for (int j = 0; j < 8; ++j) sum += lane[j];
    sum_out += double(sum);
  }
  static_assert(LOUPE_UIL_BAD_TARGET == 1 << 0 && LOUPE_UIL_NEG_TARGET_VAR == 1 << 1 &&
                LOUPE_UIL_BAD_TARGET_VAR == 1 << 2 && LOUPE_UIL_BAD_WEIGHT == 1 << 3, "status bits (cuda/common.h)");
  status_out |= bad_t | (bad_s_neg << 1) | (bad_s << 2) | (bad_w << 3);
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

// Blocks of kBlock elements in parallel. float/double inputs are read in place; float16/bfloat16
// inputs are converted chunk by chunk into float buffers on the stack (and the outputs back).
template <typename scalar_t, typename grad_t, int MODE, bool HAS_TV, bool HAS_W>
void run(const scalar_t* mu, const scalar_t* lv, const scalar_t* tg, const scalar_t* tv, const scalar_t* w,
         const scalar_t* gin, scalar_t* loss_out, grad_t* gmu, grad_t* gv, int64_t n, double grad_scale,
         double* block_sum, int* block_status) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t nblocks = (n + kBlock - 1) / kBlock;
  const acc_t scale = acc_t(grad_scale);
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t lo = b * kBlock, hi = std::min(n, lo + kBlock);
      double sum = 0.0;
      int status = 0;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        for (int64_t c0 = lo; c0 < hi; c0 += kChunk) {
          core<acc_t, MODE, HAS_TV, HAS_W>(mu + c0, lv + c0, tg + c0, HAS_TV ? tv + c0 : nullptr,
                                           HAS_W ? w + c0 : nullptr, MODE == 3 ? gin + c0 : nullptr,
                                           MODE == 0 ? loss_out + c0 : nullptr, MODE >= 2 ? gmu + c0 : nullptr,
                                           MODE >= 2 ? gv + c0 : nullptr, std::min(kChunk, hi - c0), scale, sum,
                                           status);
        }
      } else {
        constexpr int64_t C = kChunk;
        acc_t bm[C], bl[C], bt[C], bs[C], bw[C], bg[C], bo[C], bdm[C], bdv[C];
        for (int64_t c0 = lo; c0 < hi; c0 += C) {
          const int64_t len = std::min(C, hi - c0);
          for (int64_t i = 0; i < len; ++i) {
            bm[i] = acc_t(mu[c0 + i]);
            bl[i] = acc_t(lv[c0 + i]);
            bt[i] = acc_t(tg[c0 + i]);
            if constexpr (HAS_TV) bs[i] = acc_t(tv[c0 + i]);
            if constexpr (HAS_W) bw[i] = acc_t(w[c0 + i]);
            if constexpr (MODE == 3) bg[i] = acc_t(gin[c0 + i]);
          }
          // MODE 2 writes float gradients directly; MODE 3 goes through the buffers
          acc_t* dm_out = MODE == 2 ? reinterpret_cast<acc_t*>(gmu) + c0 : bdm;
          acc_t* dv_out = MODE == 2 ? reinterpret_cast<acc_t*>(gv) + c0 : bdv;
          core<acc_t, MODE, HAS_TV, HAS_W>(bm, bl, bt, bs, bw, bg, bo, dm_out, dv_out, len, scale, sum, status);
          for (int64_t i = 0; i < len; ++i) {
            if constexpr (MODE == 0) loss_out[c0 + i] = scalar_t(bo[i]);
            if constexpr (MODE == 3) {
              gmu[c0 + i] = grad_t(bdm[i]);
              gv[c0 + i] = grad_t(bdv[i]);
            }
          }
        }
      }
      if (block_sum) block_sum[b] = sum;
      if (block_status) block_status[b] = status;
    }
  });
}

template <typename scalar_t, typename grad_t, int MODE>
void dispatch_flags(bool has_tv, bool has_w, const scalar_t* mu, const scalar_t* lv, const scalar_t* tg,
                    const scalar_t* tv, const scalar_t* w, const scalar_t* gin, scalar_t* loss_out, grad_t* gmu,
                    grad_t* gv, int64_t n, double grad_scale, double* block_sum,
                    int* block_status) {
  if (has_tv && has_w)
    run<scalar_t, grad_t, MODE, true, true>(mu, lv, tg, tv, w, gin, loss_out, gmu, gv, n, grad_scale,
                                            block_sum, block_status);
  else if (has_tv)
    run<scalar_t, grad_t, MODE, true, false>(mu, lv, tg, tv, w, gin, loss_out, gmu, gv, n, grad_scale,
                                             block_sum, block_status);
  else if (has_w)
    run<scalar_t, grad_t, MODE, false, true>(mu, lv, tg, tv, w, gin, loss_out, gmu, gv, n, grad_scale,
                                             block_sum, block_status);
  else
    run<scalar_t, grad_t, MODE, false, false>(mu, lv, tg, tv, w, gin, loss_out, gmu, gv, n, grad_scale,
                                              block_sum, block_status);
}

void check_inputs(const at::Tensor& mu, const at::Tensor& log_var, const at::Tensor& target,
                  const c10::optional<at::Tensor>& target_var, const c10::optional<at::Tensor>& weight) {
  const auto dt = mu.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "uil_cpu: mu must be float16, bfloat16, float32 or float64");
  auto same = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "uil_cpu: ", name, " must be a contiguous CPU tensor");
    TORCH_CHECK(t.scalar_type() == dt, "uil_cpu: ", name, " must have the dtype of mu");
    TORCH_CHECK(t.numel() == mu.numel(), "uil_cpu: ", name, " must have as many elements as mu");
  };
  same(mu, "mu");
  same(log_var, "log_var");
  same(target, "target");
  if (target_var.has_value() && target_var->defined()) same(*target_var, "target_var");
  if (weight.has_value() && weight->defined()) same(*weight, "weight");
}

template <typename scalar_t>
const scalar_t* opt_ptr(const c10::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? t->data_ptr<scalar_t>() : nullptr;
}

}  // namespace

std::vector<at::Tensor> uil_forward_cpu(const at::Tensor& mu, const at::Tensor& log_var, const at::Tensor& target,
                                        const c10::optional<at::Tensor>& target_var,
                                        const c10::optional<at::Tensor>& weight, int64_t reduction, bool need_grad) {
  check_inputs(mu, log_var, target, target_var, weight);
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "uil_forward_cpu: reduction must be 0 (none), 1 (mean) or 2 (sum)");
  const int64_t n = mu.numel();
  const int64_t nblocks = (n + kBlock - 1) / kBlock;
  const bool has_tv = target_var.has_value() && target_var->defined();
  const bool has_w = weight.has_value() && weight->defined();
  const auto grad_dtype = (mu.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
  const bool write_grad = need_grad && reduction != 0;
  at::Tensor loss = reduction == 0 ? at::empty_like(mu) : at::empty({}, mu.options());
  at::Tensor gmu = at::empty(write_grad ? mu.sizes() : at::IntArrayRef{0}, mu.options().dtype(grad_dtype));
  at::Tensor gv = at::empty(write_grad ? mu.sizes() : at::IntArrayRef{0}, mu.options().dtype(grad_dtype));
  std::vector<double> block_sum(reduction == 0 ? 0 : nblocks, 0.0);
  std::vector<int> block_status(nblocks, 0);
  const double grad_scale = reduction == 1 ? (n > 0 ? 1.0 / double(n) : 0.0) : 1.0;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "uil_forward_cpu", [&] {
    using grad_t = at::opmath_type<scalar_t>;
    const scalar_t* tv = opt_ptr<scalar_t>(target_var);
    const scalar_t* w = opt_ptr<scalar_t>(weight);
    if (reduction == 0) {
      dispatch_flags<scalar_t, grad_t, 0>(has_tv, has_w, mu.data_ptr<scalar_t>(), log_var.data_ptr<scalar_t>(),
                                          target.data_ptr<scalar_t>(), tv, w, nullptr, loss.data_ptr<scalar_t>(),
                                          nullptr, nullptr, n, 1.0, nullptr, block_status.data());
    } else if (write_grad) {
      dispatch_flags<scalar_t, grad_t, 2>(has_tv, has_w, mu.data_ptr<scalar_t>(), log_var.data_ptr<scalar_t>(),
                                          target.data_ptr<scalar_t>(), tv, w, nullptr, nullptr,
                                          gmu.data_ptr<grad_t>(), gv.data_ptr<grad_t>(), n, grad_scale,
                                          block_sum.data(), block_status.data());
    } else {
      dispatch_flags<scalar_t, grad_t, 1>(has_tv, has_w, mu.data_ptr<scalar_t>(), log_var.data_ptr<scalar_t>(),
                                          target.data_ptr<scalar_t>(), tv, w, nullptr, nullptr, nullptr, nullptr, n,
                                          grad_scale, block_sum.data(), block_status.data());
    }
  });
  if (reduction != 0) {
    double total = 0.0;
    for (double s : block_sum) total += s;  // blocks in order: independent of the thread count
    if (reduction == 1) total = n > 0 ? total / double(n) : 0.0;
    loss.fill_(total);
  }
  int status = 0;
  for (int s : block_status) status |= s;
  return {loss, gmu, gv, at::scalar_tensor(int64_t(status), mu.options().dtype(at::kLong))};
}

std::vector<at::Tensor> uil_backward_cpu(const at::Tensor& grad, const at::Tensor& mu, const at::Tensor& log_var,
                                         const at::Tensor& target, const c10::optional<at::Tensor>& target_var,
                                         const c10::optional<at::Tensor>& weight) {
  check_inputs(mu, log_var, target, target_var, weight);
  TORCH_CHECK(grad.device().is_cpu() && grad.is_contiguous() && grad.scalar_type() == mu.scalar_type() &&
                  grad.numel() == mu.numel(),
              "uil_backward_cpu: grad must be a contiguous CPU tensor shaped and typed like mu");
  const int64_t n = mu.numel();
  const bool has_tv = target_var.has_value() && target_var->defined();
  const bool has_w = weight.has_value() && weight->defined();
  at::Tensor dmu = at::empty_like(mu), dv = at::empty_like(mu);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "uil_backward_cpu", [&] {
    dispatch_flags<scalar_t, scalar_t, 3>(has_tv, has_w, mu.data_ptr<scalar_t>(), log_var.data_ptr<scalar_t>(),
                                          target.data_ptr<scalar_t>(), opt_ptr<scalar_t>(target_var),
                                          opt_ptr<scalar_t>(weight), grad.data_ptr<scalar_t>(), nullptr,
                                          dmu.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(), n, 1.0, nullptr, nullptr);
  });
  return {dmu, dv};
}

}  // namespace loupe
