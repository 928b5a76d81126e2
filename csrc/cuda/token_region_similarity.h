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
// out has the input dtype; fp16/bf16 use tensor cores (WMMA, sm_80+) with fp32 accumulation. fp32,
// pairwise, D % 4 == 0, 16-byte aligned, sm_80+: tensor cores, 3xTF32 (about fp32 accuracy) or, when
// allow_tf32 != 0, one TF32 pass (10-bit mantissa products); other fp32 calls and fp64 use exact FMA in
// their own precision. The current device must be the one of the pointers.
cudaError_t loupe_trs_forward(const void* q, const void* k, int dtype, const uint8_t* qm, const uint8_t* km,
                              int Bq, int Bk, int Lq, int Lk, int D, int pairwise, int allow_tf32, void* workspace,
                              void* out, int32_t* amax, cudaStream_t stream);

// Dynamic shared memory (bytes) the pairwise fast forward kernel asks for at width D and dtype on a device
// whose per-block opt-in limit is smem_optin, and its D chunk (D itself when the query tile stays resident);
// 0 bytes when such a call does not take the fast kernel (dtype, D % (16 bytes), or the limit). Host-only.
size_t loupe_trs_fast_smem_bytes(int dtype, int D, int smem_optin, int* d_chunk);

// The shared-memory layout behind that plan (host-only; the kernel carves its memory with the same
// function), for the host-side checks of the WMMA rules and of the index arithmetic: returns 1 and fills
// *out when the call takes the fast kernel, else 0 (and *out zeroed).
struct LoupeTrsFastLayout {
  int d_chunk;       // features per D chunk (D when the query tile is resident)
  int ld;            // row stride of the query and key tiles, elements
  int elem_bytes;    // bytes per element of q and k
  int vec;           // elements per 16-byte cp.async copy
  int k_step;        // WMMA k-step (16 for fp16/bf16, 8 for TF32)
  int rows, keys;    // query rows per block, key rows per tile
  int ld_scores;     // row stride of the key-major fp32 score tile, floats
  size_t q0, q1, k0, k1, scores, key_mask;  // byte offsets; q1 == q0 when the query tile is resident
  size_t bytes;      // dynamic shared memory of the launch
};
int loupe_trs_fast_layout(int dtype, int D, int smem_optin, LoupeTrsFastLayout* out);

// Bytes of the workspace the backward needs (the same deterministic flag as the backward call).
size_t loupe_trs_backward_workspace(int dtype, int Bq, int Bk, int Lq, int Lk, int D, int pairwise, int deterministic);

// grad [Bq, Bk] or [Bq] (dtype); amax from the forward. dq [Bq, Lq, D], dk [Bk, Lk, D] (dtype), written
// in full. d_query is a gather (one warp per query token, key items in order: always deterministic).
// d_key: deterministic != 0 -> the arg-max entries are grouped per key row by a stable counting sort
// and every element is one thread's sum over its row's entries in ascending (a, j) order (bit-identical
// across runs); deterministic == 0 -> 8 warps per key item add into shared memory with atomics (the
// rounding may differ between runs; the grouped path when that accumulator exceeds the opt-in limit).
cudaError_t loupe_trs_backward(const void* grad, const void* q, const void* k, int dtype, const uint8_t* qm,
                               const int32_t* amax, int Bq, int Bk, int Lq, int Lk, int D, int pairwise,
                               int deterministic, void* workspace, void* dq, void* dk, cudaStream_t stream);
