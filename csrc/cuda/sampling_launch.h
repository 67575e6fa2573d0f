// The launcher of race_sample's CUDA kernels (sampling_kernels.cu), callable from host C++ without CUDA headers of
// torch: raw pointers, the caller's stream and workspace.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace rlhf_engine {

enum class RaceDtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// How many chunks each row is cut into for S rows of V logits on a GPU with num_sms SMs.
int race_sample_splits(int64_t S, int64_t V, int num_sms);

// Bytes of workspace race_sample_launch needs (one partial result per row and chunk).
int64_t race_sample_workspace_bytes(int64_t S, int splits);

// tokens [S] int64 and logprobs [S] float32 from logits [S, V] (row stride row_stride, unit column stride),
// temperature [S] float32 (0 = greedy), ka, kb [S] int64 keys; asynchronous on `stream`.
cudaError_t race_sample_launch(RaceDtype dtype, const void* logits, int64_t S, int64_t V, int64_t row_stride,
                               const float* temperature, const int64_t* ka, const int64_t* kb, int splits,
                               void* workspace, int64_t* tokens, float* logprobs, cudaStream_t stream);

}  // namespace rlhf_engine
