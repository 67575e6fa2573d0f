// race_sample's CUDA kernels, split along the vocabulary. Plain CUDA (no torch headers), so that CI compiles it with
// nvcc for sm_90 on a machine without a CUDA torch; the torch binding (checks, allocation, stream, registration) is
// sampling.cpp beside it.
//
// Why: the Triton kernel (kernels/sampling.py) runs one program per row, which at batch 1 leaves all but one SM idle
// while it streams a 151,936-token row. Here each row is cut into `splits` chunks (enough blocks to fill the GPU),
// every block reduces its chunk to (max, sum of exps, best race value, its scaled logit, its id), and a second small
// kernel merges the chunks of each row by log-sum-exp. Same function as the spec (engine.generation.sampler.sample
// without top-k / top-p), same noise bits:
//   s_j = logits_j / t (t = 1 for greedy rows); U_j = ((fmix32(fmix32(j ^ ka) ^ kb) >> 9) + 0.5) * 2^-23
//   token = argmax_j s_j (greedy) or argmax_j (s_j - log(-log U_j)), lowest id on ties
//   logprob = s_token - logsumexp_j s_j
// No host synchronisation: safe inside a CUDA graph.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "sampling_launch.h"

namespace rlhf_engine {
namespace {

constexpr int kThreads = 256;
constexpr float kUScale = 1.0f / 8388608.0f;  // 2^-23

__device__ __forceinline__ uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  return h ^ (h >> 16);
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

// A chunk's partial result; merged associatively (online softmax + argmax with the lowest id on ties).
struct Partial {
  float m;       // max scaled logit
  float l;       // sum of exp(s - m)
  float best;    // best race value
  float best_s;  // its scaled logit
  int32_t best_j;
};

__device__ __forceinline__ Partial merge(const Partial& a, const Partial& b) {
  Partial r;
  r.m = fmaxf(a.m, b.m);
  const float m_safe = r.m == -INFINITY ? 0.f : r.m;
  r.l = a.l * expf(a.m - m_safe) + b.l * expf(b.m - m_safe);
  const bool take_b = b.best > a.best || (b.best == a.best && b.best_j < a.best_j);
  r.best = take_b ? b.best : a.best;
  r.best_s = take_b ? b.best_s : a.best_s;
  r.best_j = take_b ? b.best_j : a.best_j;
  return r;
}

__device__ __forceinline__ Partial shfl_down(const Partial& p, int offset) {
  Partial q;
  q.m = __shfl_down_sync(0xffffffffu, p.m, offset);
  q.l = __shfl_down_sync(0xffffffffu, p.l, offset);
  q.best = __shfl_down_sync(0xffffffffu, p.best, offset);
  q.best_s = __shfl_down_sync(0xffffffffu, p.best_s, offset);
  q.best_j = __shfl_down_sync(0xffffffffu, p.best_j, offset);
  return q;
}

__device__ Partial block_reduce(Partial p) {
  __shared__ Partial warp_out[kThreads / 32];
  for (int off = 16; off > 0; off >>= 1) p = merge(p, shfl_down(p, off));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_out[warp] = p;
  __syncthreads();
  if (warp == 0) {
    p = lane < kThreads / 32 ? warp_out[lane] : Partial{-INFINITY, 0.f, -INFINITY, -INFINITY, INT32_MAX};
    for (int off = 16; off > 0; off >>= 1) p = merge(p, shfl_down(p, off));
  }
  return p;
}

template <typename scalar_t>
__global__ void race_chunk_kernel(Partial* __restrict__ partials, const scalar_t* __restrict__ logits,
                                  const float* __restrict__ temperature, const int64_t* __restrict__ ka,
                                  const int64_t* __restrict__ kb, int64_t V, int64_t row_stride, int64_t chunk) {
  const int64_t row = blockIdx.x;
  const int split = blockIdx.y;
  const float t = temperature[row];
  const bool greedy = t == 0.f;
  const float t_div = greedy ? 1.f : t;
  const uint32_t a = static_cast<uint32_t>(ka[row]), b = static_cast<uint32_t>(kb[row]);
  const scalar_t* x = logits + row * row_stride;
  const int64_t lo = split * chunk, hi = min(V, lo + chunk);
  Partial p{-INFINITY, 0.f, -INFINITY, -INFINITY, INT32_MAX};
  for (int64_t j = lo + threadIdx.x; j < hi; j += kThreads) {
    const float s = __fdiv_rn(to_float(x[j]), t_div);  // a true division, as the spec
    float race = s;
    if (!greedy) {
      const uint32_t h = fmix32(fmix32(static_cast<uint32_t>(j) ^ a) ^ b);
      const float u = (static_cast<float>(h >> 9) + 0.5f) * kUScale;
      race = s - logf(-logf(u));
    }
    // online log-sum-exp of s, one element at a time
    if (s > p.m) {
      p.l = p.l * expf(p.m - s) + 1.f;
      p.m = s;
    } else if (s != -INFINITY) {
      p.l += expf(s - p.m);
    }
    if (race > p.best) {  // j grows within a thread: strict > keeps the lowest id
      p.best = race;
      p.best_s = s;
      p.best_j = static_cast<int32_t>(j);
    }
  }
  p = block_reduce(p);
  if (threadIdx.x == 0) partials[row * gridDim.y + split] = p;
}

__global__ void race_merge_kernel(int64_t* __restrict__ tokens, float* __restrict__ logprobs,
                                  const Partial* __restrict__ partials, int splits) {
  const int64_t row = blockIdx.x;
  Partial p{-INFINITY, 0.f, -INFINITY, -INFINITY, INT32_MAX};
  for (int i = threadIdx.x; i < splits; i += 32) p = merge(p, partials[row * splits + i]);
  for (int off = 16; off > 0; off >>= 1) p = merge(p, shfl_down(p, off));
  if (threadIdx.x == 0) {
    tokens[row] = p.best_j == INT32_MAX ? 0 : p.best_j;
    logprobs[row] = p.best_s - (p.m + logf(p.l));
  }
}

}  // namespace

int race_sample_splits(int64_t S, int64_t V, int num_sms) {
  // enough blocks for two waves over the SMs, each chunk at least 2,048 logits (8 per thread)
  const int64_t max_splits = (V + 2047) / 2048 > 1 ? (V + 2047) / 2048 : 1;
  const int64_t want = (2 * static_cast<int64_t>(num_sms) + S - 1) / (S > 0 ? S : 1);
  const int64_t splits = want < max_splits ? want : max_splits;
  return static_cast<int>(splits > 1 ? splits : 1);
}

int64_t race_sample_workspace_bytes(int64_t S, int splits) { return S * splits * static_cast<int64_t>(sizeof(Partial)); }

cudaError_t race_sample_launch(RaceDtype dtype, const void* logits, int64_t S, int64_t V, int64_t row_stride,
                               const float* temperature, const int64_t* ka, const int64_t* kb, int splits,
                               void* workspace, int64_t* tokens, float* logprobs, cudaStream_t stream) {
  if (S == 0) return cudaSuccess;
  auto* part = static_cast<Partial*>(workspace);
  const int64_t chunk = (V + splits - 1) / splits;
  const dim3 grid(static_cast<unsigned>(S), static_cast<unsigned>(splits));
  switch (dtype) {
    case RaceDtype::kFloat32:
      race_chunk_kernel<<<grid, kThreads, 0, stream>>>(part, static_cast<const float*>(logits), temperature, ka, kb,
                                                       V, row_stride, chunk);
      break;
    case RaceDtype::kBFloat16:
      race_chunk_kernel<<<grid, kThreads, 0, stream>>>(part, static_cast<const __nv_bfloat16*>(logits), temperature,
                                                       ka, kb, V, row_stride, chunk);
      break;
    case RaceDtype::kFloat16:
      race_chunk_kernel<<<grid, kThreads, 0, stream>>>(part, static_cast<const __half*>(logits), temperature, ka, kb,
                                                       V, row_stride, chunk);
      break;
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  race_merge_kernel<<<static_cast<unsigned>(S), 32, 0, stream>>>(tokens, logprobs, part, splits);
  return cudaGetLastError();
}

}  // namespace rlhf_engine
