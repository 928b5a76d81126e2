// Uncertainty-weighted interaction loss on CUDA (METHOD section 8).
//
// One pass: a block of kThreads threads handles kItems consecutive tiles of kThreads elements
// (coalesced loads), computes each element's loss in float (double for float64 input) and either
// writes it (reduction none) or reduces the block's sum in shared memory into partials[block] and
// writes the gradients of the reduced loss (scaled by weight and 1/N). A single-block kernel then
// sums the partials in a fixed order (deterministic, no atomics) and ORs the status words. The
// backward of reduction none recomputes each element.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "interaction_loss.h"

namespace {

constexpr int kThreads = 256;
constexpr int kItems = 4;
constexpr int64_t kPerBlock = int64_t(kThreads) * kItems;

using loupe_cuda::from_acc;
using loupe_cuda::to_acc;
template <typename T> using Acc = loupe_cuda::AccOf<T>;

__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }
__device__ __forceinline__ float log_(float x) { return logf(x); }
__device__ __forceinline__ double log_(double x) { return log(x); }

// Tree reduction over the block: ssum[0] = sum of ssum[0..kThreads), sstat[0] = OR of sstat (fixed order).
__device__ __forceinline__ void block_reduce(double* ssum, int* sstat) {
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) {
      ssum[threadIdx.x] += ssum[threadIdx.x + stride];
      sstat[threadIdx.x] |= sstat[threadIdx.x + stride];
    }
    __syncthreads();
  }
}

template <typename A>
__device__ __forceinline__ bool not_finite(A x) {
  const A d = x - x;
  return d != d;
}

// Twin of element() in csrc/cpu/interaction_loss.cpp (torch-free here, ATen there; see cuda/common.h).
template <typename A, bool HAS_TV>
__device__ __forceinline__ void element(A m, A v, A t, A s, A& loss, A& dm, A& dv) {
  const A r = t - m;
  if (HAS_TV) {
    const A ev = exp_(v);
    const A var = ev + s;
    const A inv = A(1) / var;
    const A rs = r * inv;
    const A q = r * rs;
    loss = A(0.5) * (q + log_(var));
    dm = -rs;
    dv = A(0.5) * (ev * inv) * (A(1) - q);
  } else {
    const A e = exp_(A(-0.5) * v);
    const A z = r * e;
    const A z2 = z * z;
    loss = A(0.5) * (z2 + v);
    dm = -z * e;
    dv = A(0.5) * (A(1) - z2);
  }
}

// MODE 0 forward none, 1 forward reduce, 2 forward reduce + gradients, 3 backward none
template <typename T, int MODE, bool HAS_TV, bool HAS_W>
__global__ void __launch_bounds__(kThreads)
uil_kernel(const T* __restrict__ mu, const T* __restrict__ lv, const T* __restrict__ tg, const T* __restrict__ tv,
           const T* __restrict__ w, const T* __restrict__ gin, T* __restrict__ loss_out,
           typename Acc<T>::type* __restrict__ gmu_acc, typename Acc<T>::type* __restrict__ gv_acc,
           T* __restrict__ gmu_t, T* __restrict__ gv_t, double* __restrict__ partials, int* __restrict__ block_status,
           int64_t n, double grad_scale) {
  using A = typename Acc<T>::type;
  __shared__ double ssum[kThreads];
  __shared__ int sstat[kThreads];
  const A scale = A(grad_scale);
  const int64_t base = int64_t(blockIdx.x) * kPerBlock;
  double sum = 0.0;
  int status = 0;
#pragma unroll
  for (int it = 0; it < kItems; ++it) {
    const int64_t i = base + int64_t(it) * kThreads + threadIdx.x;
    if (i >= n) break;
    const A m = to_acc(mu[i]), v = to_acc(lv[i]);
    A t = to_acc(tg[i]);
    A s = HAS_TV ? to_acc(tv[i]) : A(0);
    const A wi = HAS_W ? to_acc(w[i]) : A(1);
    const bool live = HAS_W ? (wi != A(0)) : true;
    if (HAS_W) status |= (not_finite(wi) || wi < A(0)) ? LOUPE_UIL_BAD_WEIGHT : 0;
    if (MODE != 3) {
      status |= (live && not_finite(t)) ? LOUPE_UIL_BAD_TARGET : 0;
      if (HAS_TV) {
        status |= (s < A(0)) ? LOUPE_UIL_NEG_TARGET_VAR : 0;
        status |= (live && not_finite(s)) ? LOUPE_UIL_BAD_TARGET_VAR : 0;
      }
    }
    if (HAS_W && !live) {
      t = m;
      s = A(0);
    }
    A l, dm, dv;
    element<A, HAS_TV>(m, v, t, s, l, dm, dv);
    if (HAS_W) {
      l = live ? wi * l : A(0);
      dm = live ? wi * dm : A(0);
      dv = live ? wi * dv : A(0);
    }
    if (MODE == 0) {
      loss_out[i] = from_acc<T>(l);
    } else if (MODE == 1 || MODE == 2) {
      sum += double(l);
      if (MODE == 2) {
        gmu_acc[i] = dm * scale;
        gv_acc[i] = dv * scale;
      }
    } else {
      const A g = to_acc(gin[i]);
      gmu_t[i] = from_acc<T>(dm * g);
      gv_t[i] = from_acc<T>(dv * g);
    }
  }
  if (MODE == 3) return;
  ssum[threadIdx.x] = sum;
  sstat[threadIdx.x] = status;
  block_reduce(ssum, sstat);
  if (threadIdx.x == 0) {
    if (partials) partials[blockIdx.x] = ssum[0];
    block_status[blockIdx.x] = sstat[0];
  }
}

// One block: sums the partials in a fixed order, writes the reduced loss and the status word.
template <typename T>
__global__ void __launch_bounds__(kThreads)
finish_kernel(const double* __restrict__ partials, const int* __restrict__ block_status, int64_t nblocks,
              int64_t n, int reduction, T* __restrict__ loss, int* __restrict__ status) {
  __shared__ double ssum[kThreads];
  __shared__ int sstat[kThreads];
  double sum = 0.0;
  int st = 0;
  for (int64_t b = threadIdx.x; b < nblocks; b += kThreads) {
    if (partials) sum += partials[b];
    st |= block_status[b];
  }
  ssum[threadIdx.x] = sum;
  sstat[threadIdx.x] = st;
  block_reduce(ssum, sstat);
  if (threadIdx.x == 0) {
    if (reduction != 0) {
      double total = ssum[0];
      if (reduction == 1) total = n > 0 ? total / double(n) : 0.0;
      loss[0] = from_acc<T>(typename Acc<T>::type(total));
    }
    *status = sstat[0];
  }
}

template <typename T, int MODE>
void launch_mode(const T* mu, const T* lv, const T* tg, const T* tv, const T* w, const T* gin, T* loss_out,
                 typename Acc<T>::type* gmu_acc, typename Acc<T>::type* gv_acc, T* gmu_t, T* gv_t, double* partials,
                 int* block_status, int64_t n, double grad_scale, cudaStream_t stream) {
  const unsigned nblocks = unsigned((n + kPerBlock - 1) / kPerBlock);
  if (nblocks == 0) return;
  const bool has_tv = tv != nullptr, has_w = w != nullptr;
#define LOUPE_UIL_LAUNCH(TV, W)                                                                              \
  uil_kernel<T, MODE, TV, W><<<nblocks, kThreads, 0, stream>>>(mu, lv, tg, tv, w, gin, loss_out, gmu_acc, gv_acc, \
                                                               gmu_t, gv_t, partials, block_status, n, grad_scale)
  if (has_tv && has_w) LOUPE_UIL_LAUNCH(true, true);
  else if (has_tv) LOUPE_UIL_LAUNCH(true, false);
  else if (has_w) LOUPE_UIL_LAUNCH(false, true);
  else LOUPE_UIL_LAUNCH(false, false);
#undef LOUPE_UIL_LAUNCH
}

template <typename T>
cudaError_t forward_t(const void* mu, const void* lv, const void* tg, const void* tv, const void* w, int64_t n,
                      int reduction, int need_grad, void* loss, void* gmu, void* gv, double* partials,
                      int* block_status, int* status, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  auto c = [](const void* p) { return static_cast<const T*>(p); };
  const int64_t nblocks = loupe_uil_num_blocks(n);
  const double scale = reduction == 1 ? (n > 0 ? 1.0 / double(n) : 0.0) : 1.0;
  if (reduction == 0) {
    launch_mode<T, 0>(c(mu), c(lv), c(tg), c(tv), c(w), nullptr, static_cast<T*>(loss), nullptr, nullptr, nullptr,
                      nullptr, nullptr, block_status, n, 1.0, stream);
  } else if (need_grad) {
    launch_mode<T, 2>(c(mu), c(lv), c(tg), c(tv), c(w), nullptr, nullptr, static_cast<A*>(gmu), static_cast<A*>(gv),
                      nullptr, nullptr, partials, block_status, n, scale, stream);
  } else {
    launch_mode<T, 1>(c(mu), c(lv), c(tg), c(tv), c(w), nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                      partials, block_status, n, scale, stream);
  }
  finish_kernel<T><<<1, kThreads, 0, stream>>>(reduction == 0 ? nullptr : partials, block_status, nblocks, n,
                                               reduction, static_cast<T*>(loss), status);
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_t(const void* grad, const void* mu, const void* lv, const void* tg, const void* tv,
                       const void* w, int64_t n, void* dmu, void* dv, cudaStream_t stream) {
  auto c = [](const void* p) { return static_cast<const T*>(p); };
  launch_mode<T, 3>(c(mu), c(lv), c(tg), c(tv), c(w), c(grad), nullptr, nullptr, nullptr, static_cast<T*>(dmu),
                    static_cast<T*>(dv), nullptr, nullptr, n, 1.0, stream);
  return cudaGetLastError();
}

}  // namespace

int64_t loupe_uil_num_blocks(int64_t n) { return (n + kPerBlock - 1) / kPerBlock; }

cudaError_t loupe_uil_forward(const void* mu, const void* log_var, const void* target, const void* target_var,
                              const void* weight, int dtype, int64_t n, int reduction, int need_grad, void* loss,
                              void* grad_mu, void* grad_log_var, double* partials, int* block_status, int* status,
                              cudaStream_t stream) {
  if (reduction < 0 || reduction > 2) return cudaErrorInvalidValue;
  switch (dtype) {
    case LOUPE_F32:
      return forward_t<float>(mu, log_var, target, target_var, weight, n, reduction, need_grad, loss, grad_mu,
                              grad_log_var, partials, block_status, status, stream);
    case LOUPE_F64:
      return forward_t<double>(mu, log_var, target, target_var, weight, n, reduction, need_grad, loss, grad_mu,
                               grad_log_var, partials, block_status, status, stream);
    case LOUPE_F16:
      return forward_t<__half>(mu, log_var, target, target_var, weight, n, reduction, need_grad, loss, grad_mu,
                               grad_log_var, partials, block_status, status, stream);
    case LOUPE_BF16:
      return forward_t<__nv_bfloat16>(mu, log_var, target, target_var, weight, n, reduction, need_grad, loss,
                                      grad_mu, grad_log_var, partials, block_status, status, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t loupe_uil_backward(const void* grad, const void* mu, const void* log_var, const void* target,
                               const void* target_var, const void* weight, int dtype, int64_t n, void* d_mu,
                               void* d_log_var, cudaStream_t stream) {
  switch (dtype) {
    case LOUPE_F32:
      return backward_t<float>(grad, mu, log_var, target, target_var, weight, n, d_mu, d_log_var, stream);
    case LOUPE_F64:
      return backward_t<double>(grad, mu, log_var, target, target_var, weight, n, d_mu, d_log_var, stream);
    case LOUPE_F16:
      return backward_t<__half>(grad, mu, log_var, target, target_var, weight, n, d_mu, d_log_var, stream);
    case LOUPE_BF16:
      return backward_t<__nv_bfloat16>(grad, mu, log_var, target, target_var, weight, n, d_mu, d_log_var, stream);
    default:
      return cudaErrorInvalidValue;
  }
}
