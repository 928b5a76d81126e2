// Uncertainty-weighted interaction loss on CUDA (METHOD section 8): torch-free launchers.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "common.h"  // LoupeDtype (the dtype argument), LoupeUilStatus (the status bits)

// Elements per block of the forward; the workspace holds one partial sum and one status per block.
int64_t loupe_uil_num_blocks(int64_t n);

// Forward. mu, log_var, target [n] (dtype), target_var / weight [n] or null. reduction 0 none,
// 1 mean, 2 sum. loss: [n] (none) or [1] (mean/sum), in dtype. For mean/sum with need_grad, grad_mu
// / grad_log_var [n] receive the gradients of the reduced loss (double for F64, float otherwise);
// else they may be null. partials: loupe_uil_num_blocks(n) doubles; block_status: as many ints;
// status: one int, the OR of the LoupeUilStatus bits (1 target not finite where weight != 0,
// 2 target_var < 0, 4 target_var not finite where weight != 0, 8 weight negative or not finite). The partial sums are
// reduced in a fixed order: the loss is deterministic.
cudaError_t loupe_uil_forward(const void* mu, const void* log_var, const void* target, const void* target_var,
                              const void* weight, int dtype, int64_t n, int reduction, int need_grad, void* loss,
                              void* grad_mu, void* grad_log_var, double* partials, int* block_status, int* status,
                              cudaStream_t stream);

// Backward of reduction none: grad [n] (dtype); d_mu / d_log_var [n] in dtype.
cudaError_t loupe_uil_backward(const void* grad, const void* mu, const void* log_var, const void* target,
                               const void* target_var, const void* weight, int dtype, int64_t n, void* d_mu,
                               void* d_log_var, cudaStream_t stream);
