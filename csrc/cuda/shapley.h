// Shapley coalition sampling on CUDA (METHOD section 5): torch-free launchers.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "common.h"  // LoupeDtype: the dtype codes of sim

// Max-sim game. sim [G, Lq, n] (dtype), query_mask [G, Lq], subsets [G, M, P], player_mask [G, P]
// (uint8 0/1, contiguous), P = n or Lq + n (query_players). est / se [G, M]: double for LOUPE_F64,
// float otherwise. schedule 0 = uniform, 1 = round robin. One block per (g, m); one thread per sample
// when Lq <= 64 and the game's columns fit in 96 KiB of shared memory, else one warp per sample.
// game_index (int64 [G], or nullptr for the identity): game g plays on sim[game_index[g]]; query_mask,
// subsets and player_mask stay per game.
cudaError_t loupe_shapley_maxsim(const void* sim, int dtype, const int64_t* game_index, const uint8_t* query_mask,
                                 const uint8_t* subsets,
                                 const uint8_t* player_mask, int G, int M, int Lq, int n, int K,
                                 int query_players, uint64_t seed, int schedule, void* est, void* se,
                                 cudaStream_t stream);

// The coalitions of the pinned draw: out [G, M, K, P] uint8 (written in full).
cudaError_t loupe_shapley_coalitions(const uint8_t* subsets, const uint8_t* player_mask, int G, int M, int P,
                                     int K, uint64_t seed, int schedule, uint8_t* out, cudaStream_t stream);
