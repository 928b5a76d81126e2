// Token-region similarity on CUDA (METHOD section 3): torch-free launchers.
//
// s(a, b) = mean over valid j of max over valid i of <q_aj, k_bi>; the int32 arg-max (ties: lowest
// key index; -1 for invalid query tokens and for key items without a valid token) is saved for the
// backward, exactly as the cpu backend writes it.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cuda_runtime.h>

#include "common.h"  // LoupeDtype: the dtype codes of query and key

// Bytes of the workspace the forward needs (row maxima, double for F64, float otherwise).
size_t loupe_trs_forward_workspace(int dtype, int Bq, int Bk, int Lq, int pairwise);

// q [Bq, Lq, D], k [Bk, Lk, D] (dtype, contiguous); qm [Bq, Lq], km [Bk, Lk] (uint8 0/1).
// pairwise = 1: out [Bq, Bk], amax [Bq, Bk, Lq]; pairwise = 0 (Bq == Bk): out [Bq], amax [Bq, Lq].
// out has the input dtype; fp16/bf16 use tensor cores (WMMA, sm_80+) with fp32 accumulation, fp32 and
// fp64 accumulate in their own precision (FMA). The current device must be the one of the pointers.
cudaError_t loupe_trs_forward(const void* q, const void* k, int dtype, const uint8_t* qm, const uint8_t* km,
                              int Bq, int Bk, int Lq, int Lk, int D, int pairwise, void* workspace, void* out,
                              int32_t* amax, cudaStream_t stream);

// Bytes of the workspace the backward needs.
size_t loupe_trs_backward_workspace(int dtype, int Bq, int Bk, int Lk, int D);

// grad [Bq, Bk] or [Bq] (dtype); amax from the forward. dq [Bq, Lq, D], dk [Bk, Lk, D] (dtype), written
// in full. d_query is a gather (one warp per query token, key items in order: always deterministic).
// d_key: deterministic != 0 -> every element is accumulated by one thread in a fixed (a, j) order;
// deterministic == 0 -> 8 warps per key item add into shared memory with atomics (faster, the
// rounding may differ between runs).
cudaError_t loupe_trs_backward(const void* grad, const void* q, const void* k, int dtype, const uint8_t* qm,
                               const int32_t* amax, int Bq, int Bk, int Lq, int Lk, int D, int pairwise,
                               int deterministic, void* workspace, void* dq, void* dk, cudaStream_t stream);
