// Dense box objectness on the CPU: the region head's logit and the normalisation of every
// whole-patch box of an h x w grid, in one pass per image (loupe_kernels/box_objectness.py).
//
// For a box b with inside sum S_b = sum_{i in b} x_i and outside sum T - S_b (T = sum of all
// patches), the normalised inside / outside mean features are inv_in * S_b and inv_out * (T - S_b)
// with inv_in = 1 / max(||S_b||, eps * area), inv_out = 1 / max(||T - S_b||, eps * n_out) (0 when
// the box has no outside). The head's first layer is linear, so with z_in = W_in x_i and
// z_out = W_out x_i per patch (one GEMM for all images):
//   pre_b = bias_b + inv_in * sum_{i in b} z_in_i + inv_out * (sum_all z_out - sum_{i in b} z_out_i)
//   logit_b = b2 + <w2, gelu(pre_b)>
// Box sums are direct sums (no summed-area-table differences): for each row the sums over every
// column interval, then for each first row y0 the running sum over the following rows. The norms
// use float64 sums of the tokens, so ||T - S_b|| has no cancellation beyond float64 rounding.
// Boxes come in the order of loupe's candidate_boxes: row interval (y0 outer, y1 inner), then
// column interval (x0 outer, x1 inner). The boxes of one y0 are contiguous in that order, so their
// pre-activations fill one buffer row block that goes through ATen's vectorised gelu and a GEMV.
// Forward only (no gradient): the dense pass ranks boxes.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "ops.h"

// x86-64: also compile the per-image loop for AVX2 + FMA (x86-64-v3) and pick the version at load
// time (GCC/Clang function multi-versioning); the build itself targets the baseline ISA.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__INTEL_COMPILER)
#define LOUPE_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define LOUPE_MULTIVERSION
#endif

namespace loupe {
namespace {

// index of the interval [a, b) among all intervals of 0..n-1 ordered by a, then b
inline int64_t interval_index(int64_t a, int64_t b, int64_t n) {
  return a * n - a * (a - 1) / 2 + (b - a - 1);
}

template <typename T>
__attribute__((always_inline)) inline void objectness_image(const T* x, const T* z, int64_t h, int64_t w, int64_t D, int64_t H, const T* bias,
                      const T* w2, double b2, double eps, T* logits, T* inv_in_out, T* inv_out_out,
                      std::vector<double>& rowx, std::vector<T>& rowz, std::vector<double>& accx,
                      std::vector<T>& accz, at::Tensor& buf) {
  const int64_t kx = w * (w + 1) / 2, n = h * w, C = 2 * H;
  // row sums over every column interval: rowx [h, kx, D] (float64), rowz [h, kx, 2H]
  for (int64_t y = 0; y < h; ++y) {
    for (int64_t x0 = 0; x0 < w; ++x0) {
      const int64_t j0 = interval_index(x0, x0 + 1, w);
      double* rx = rowx.data() + (y * kx + j0) * D;
      T* rz = rowz.data() + (y * kx + j0) * C;
      const T* xp = x + (y * w + x0) * D;
      const T* zp = z + (y * w + x0) * C;
      for (int64_t d = 0; d < D; ++d) rx[d] = static_cast<double>(xp[d]);
      for (int64_t c = 0; c < C; ++c) rz[c] = zp[c];
      for (int64_t x1 = x0 + 2; x1 <= w; ++x1) {  // interval [x0, x1) = [x0, x1-1) + patch x1-1
        double* nx = rx + D;  // intervals with the same x0 are consecutive
        T* nz = rz + C;
        const T* xq = x + (y * w + x1 - 1) * D;
        const T* zq = z + (y * w + x1 - 1) * C;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) nx[d] = rx[d] + static_cast<double>(xq[d]);
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) nz[c] = rz[c] + zq[c];
        rx = nx;
        rz = nz;
      }
    }
  }
  // totals: tokens (float64) and z_out
  std::vector<double> tx(D, 0.0);
  std::vector<T> tz(H, T(0));
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t d = 0; d < D; ++d) tx[d] += static_cast<double>(x[i * D + d]);
    for (int64_t c = 0; c < H; ++c) tz[c] += z[i * C + H + c];
  }
  T* bp = buf.data_ptr<T>();
  for (int64_t y0 = 0; y0 < h; ++y0) {
    std::fill(accx.begin(), accx.end(), 0.0);
    std::fill(accz.begin(), accz.end(), T(0));
    const int64_t i0 = interval_index(y0, y0 + 1, h);  // first row interval of this y0
    for (int64_t y1 = y0 + 1; y1 <= h; ++y1) {
      const double* rx = rowx.data() + (y1 - 1) * kx * D;
      const T* rz = rowz.data() + (y1 - 1) * kx * C;
#pragma omp simd
      for (int64_t e = 0; e < kx * D; ++e) accx[e] += rx[e];
#pragma omp simd
      for (int64_t e = 0; e < kx * C; ++e) accz[e] += rz[e];
      const int64_t rows = y1 - y0;
      for (int64_t x0 = 0; x0 < w; ++x0) {
        for (int64_t x1 = x0 + 1; x1 <= w; ++x1) {
          const int64_t j = interval_index(x0, x1, w);
          const int64_t k = (i0 + y1 - y0 - 1) * kx + j;  // box index in candidate order
          const double area = static_cast<double>(rows * (x1 - x0));
          const double n_out = static_cast<double>(n) - area;
          const double* s = accx.data() + j * D;
          double sq_in = 0.0, sq_out = 0.0;
#pragma omp simd reduction(+ : sq_in, sq_out)
          for (int64_t d = 0; d < D; ++d) {
            const double o = tx[d] - s[d];
            sq_in += s[d] * s[d];
            sq_out += o * o;
          }
          const double ii = 1.0 / std::max(std::sqrt(sq_in), eps * area);
          const double io = n_out > 0 ? 1.0 / std::max(std::sqrt(sq_out), eps * n_out) : 0.0;
          const T a = static_cast<T>(ii), o = static_cast<T>(io);
          inv_in_out[k] = a;
          inv_out_out[k] = o;
          const T* zs = accz.data() + j * C;
          const T* bk = bias + k * H;
          T* row = bp + ((y1 - y0 - 1) * kx + j) * H;
#pragma omp simd
          for (int64_t c = 0; c < H; ++c) row[c] = bk[c] + a * zs[c] + o * (tz[c] - zs[H + c]);
        }
      }
    }
    // the boxes of this y0 are rows [i0 * kx, (i0 + h - y0) * kx) of the candidate order
    const int64_t nb = (h - y0) * kx;
    at::Tensor pre = buf.narrow(0, 0, nb);
    at::gelu_(pre);
    at::Tensor out = at::from_blob(logits + i0 * kx, {nb}, buf.options());
    at::mv_out(out, pre, at::from_blob(const_cast<T*>(w2), {H}, buf.options()));
    for (int64_t r = 0; r < nb; ++r) logits[i0 * kx + r] += static_cast<T>(b2);
  }
}

// one multi-versioned entry per dtype (target_clones does not apply to templates)
#define LOUPE_OBJECTNESS_ENTRY(NAME, T)                                                                      \
  LOUPE_MULTIVERSION void NAME(const T* x, const T* z, int64_t h, int64_t w, int64_t D, int64_t H,            \
                               const T* bias, const T* w2, double b2, double eps, T* logits, T* inv_in,      \
                               T* inv_out, std::vector<double>& rowx, std::vector<T>& rowz,                  \
                               std::vector<double>& accx, std::vector<T>& accz, at::Tensor& buf) {           \
    objectness_image<T>(x, z, h, w, D, H, bias, w2, b2, eps, logits, inv_in, inv_out, rowx, rowz, accx, accz, \
                        buf);                                                                                 \
  }
LOUPE_OBJECTNESS_ENTRY(objectness_image_f32, float)
LOUPE_OBJECTNESS_ENTRY(objectness_image_f64, double)
#undef LOUPE_OBJECTNESS_ENTRY

inline void objectness_dispatch(const float* x, const float* z, int64_t h, int64_t w, int64_t D, int64_t H,
                                const float* bias, const float* w2, double b2, double eps, float* logits,
                                float* inv_in, float* inv_out, std::vector<double>& rowx, std::vector<float>& rowz,
                                std::vector<double>& accx, std::vector<float>& accz, at::Tensor& buf) {
  objectness_image_f32(x, z, h, w, D, H, bias, w2, b2, eps, logits, inv_in, inv_out, rowx, rowz, accx, accz, buf);
}
inline void objectness_dispatch(const double* x, const double* z, int64_t h, int64_t w, int64_t D, int64_t H,
                                const double* bias, const double* w2, double b2, double eps, double* logits,
                                double* inv_in, double* inv_out, std::vector<double>& rowx,
                                std::vector<double>& rowz, std::vector<double>& accx, std::vector<double>& accz,
                                at::Tensor& buf) {
  objectness_image_f64(x, z, h, w, D, H, bias, w2, b2, eps, logits, inv_in, inv_out, rowx, rowz, accx, accz, buf);
}

}  // namespace

std::vector<at::Tensor> box_objectness_cpu(const at::Tensor& tokens, int64_t h, int64_t w, const at::Tensor& w_in,
                                           const at::Tensor& w_out, const at::Tensor& bias, const at::Tensor& w2,
                                           double b2, double eps) {
  TORCH_CHECK(tokens.dim() == 3 && tokens.size(1) == h * w, "box_objectness_cpu: tokens must be [B, h*w, D]");
  TORCH_CHECK(tokens.scalar_type() == at::kFloat || tokens.scalar_type() == at::kDouble,
              "box_objectness_cpu: tokens must be float32 or float64");
  const int64_t B = tokens.size(0), D = tokens.size(2), H = w_in.size(0);
  const int64_t kx = w * (w + 1) / 2, ky = h * (h + 1) / 2, K = kx * ky;
  TORCH_CHECK(w_in.dim() == 2 && w_in.size(1) == D && w_out.sizes() == w_in.sizes(),
              "box_objectness_cpu: w_in and w_out must be [H, D]");
  TORCH_CHECK(bias.dim() == 3 && bias.size(1) == K && bias.size(2) == H && (bias.size(0) == 1 || bias.size(0) == B),
              "box_objectness_cpu: bias must be [1 or B, K, H]");
  TORCH_CHECK(w2.dim() == 1 && w2.size(0) == H, "box_objectness_cpu: w2 must be [H]");
  for (const at::Tensor* t : {&w_in, &w_out, &bias, &w2})
    TORCH_CHECK(t->scalar_type() == tokens.scalar_type() && t->is_contiguous() && !t->is_cuda(),
                "box_objectness_cpu: weights must be contiguous CPU tensors of the tokens' dtype");
  TORCH_CHECK(tokens.is_contiguous() && !tokens.is_cuda(), "box_objectness_cpu: tokens must be contiguous CPU");
  at::Tensor logits = at::empty({B, K}, tokens.options());
  at::Tensor inv_in = at::empty({B, K}, tokens.options());
  at::Tensor inv_out = at::empty({B, K}, tokens.options());
  if (B == 0) return {logits, inv_in, inv_out};
  // z = [W_in x, W_out x] for every patch of every image: one GEMM
  const at::Tensor z = at::matmul(tokens.detach(), at::cat({w_in, w_out}, 0).t()).contiguous();  // [B, n, 2H]
  const int64_t bias_stride = bias.size(0) == 1 ? 0 : K * H;
  AT_DISPATCH_FLOATING_TYPES(tokens.scalar_type(), "box_objectness_cpu", [&] {
    using T = scalar_t;
    const T* xp = tokens.data_ptr<T>();
    const T* zp = z.data_ptr<T>();
    const T* bp = bias.data_ptr<T>();
    const T* w2p = w2.data_ptr<T>();
    T* lp = logits.data_ptr<T>();
    T* ip = inv_in.data_ptr<T>();
    T* op = inv_out.data_ptr<T>();
    at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
      std::vector<double> rowx(h * kx * D), accx(kx * D);
      std::vector<T> rowz(h * kx * 2 * H), accz(kx * 2 * H);
      at::Tensor buf = at::empty({h * kx, H}, tokens.options());
      for (int64_t b = lo; b < hi; ++b)
        objectness_dispatch(xp + b * h * w * D, zp + b * h * w * 2 * H, h, w, D, H, bp + b * bias_stride, w2p, b2,
                            eps, lp + b * K, ip + b * K, op + b * K, rowx, rowz, accx, accz, buf);
    });
  });
  return {logits, inv_in, inv_out};
}

}  // namespace loupe
