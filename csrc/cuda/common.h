// What the torch-free CUDA kernels (csrc/cuda/*.cu) and their binding (csrc/bind_cuda.cpp) share:
// the dtype codes of every launcher, the status bits of the interaction loss and, for nvcc only, the
// conversions between a storage type and its accumulator type.
//
// The C++ CPU kernels (csrc/cpu/*.cpp) are twins of these kernels and stay apart on purpose: they
// are built against torch (at::Half, at::BFloat16, ATen's vectorised math, OpenMP), while every .cu
// here must compile with plain nvcc, without torch headers, so that CI compile-checks it on a machine
// without a GPU. Only this header's plain part (the enums) is meant for both.
#pragma once

// dtype code of a launcher's floating inputs (all floating inputs of one call share it)
enum LoupeDtype { LOUPE_F32 = 0, LOUPE_F64 = 1, LOUPE_F16 = 2, LOUPE_BF16 = 3 };

// Status bits of the interaction loss: the OR over all elements (also written by the C++ and Triton
// kernels, and decoded by loupe_kernels/interaction_loss.py, STATUS_BITS).
enum LoupeUilStatus {
  LOUPE_UIL_BAD_TARGET = 1,      // target not finite where weight != 0
  LOUPE_UIL_NEG_TARGET_VAR = 2,  // target_var < 0
  LOUPE_UIL_BAD_TARGET_VAR = 4,  // target_var not finite where weight != 0
  LOUPE_UIL_BAD_WEIGHT = 8,      // weight negative or not finite
};

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace loupe_cuda {

// accumulator of a storage type: float, or double for double
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

// storage value of an accumulator value (round to nearest); from double by conversion
template <typename T> __device__ __forceinline__ T from_acc(float x);
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <typename T> __device__ __forceinline__ T from_acc(double x) { return T(x); }

// *p in the compute type A
template <typename T, typename A> __device__ __forceinline__ A load_acc(const T* p) { return A(to_acc(*p)); }

}  // namespace loupe_cuda
#endif  // __CUDACC__
