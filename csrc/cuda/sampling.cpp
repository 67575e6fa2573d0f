// The torch binding of race_sample's CUDA kernels (sampling_kernels.cu): argument checks, outputs and workspace from
// torch's caching allocator on the current stream, and the CUDA registration of the op declared (with its CPU
// kernel) in csrc/cpu/sampling.cpp. Built only on a CUDA build of torch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "sampling_launch.h"

namespace rlhf_engine {
namespace {

std::tuple<at::Tensor, at::Tensor> race_sample_cuda(const at::Tensor& logits, const at::Tensor& temperature,
                                                    const at::Tensor& ka, const at::Tensor& kb) {
  TORCH_CHECK_VALUE(logits.is_cuda(), "logits must be a CUDA tensor, got device ", logits.device());
  TORCH_CHECK_VALUE(logits.dim() == 2, "logits must be 2-D [S, V], got shape ", logits.sizes());
  const auto st = logits.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf,
                   "logits must be float32, bfloat16 or float16, got ", st);
  const int64_t S = logits.size(0), V = logits.size(1);
  TORCH_CHECK_VALUE(V < (int64_t{1} << 31), "logits: vocabulary size must be < 2**31, got ", V);
  TORCH_CHECK_VALUE(logits.stride(1) == 1 || V == 1, "logits must have unit column stride, got strides ",
                    logits.strides());
  const std::pair<const at::Tensor*, const char*> rows[] = {{&temperature, "temperature"}, {&ka, "ka"}, {&kb, "kb"}};
  for (const auto& [x, name] : rows) {
    TORCH_CHECK_VALUE(x->device() == logits.device(), name, " must be on ", logits.device(), ", got ", x->device());
    TORCH_CHECK_VALUE(x->dim() == 1 && x->size(0) == S, name, " must have shape (", S, ",) like logits' rows, got ",
                      x->sizes());
  }
  TORCH_CHECK_TYPE(temperature.scalar_type() == at::kFloat, "temperature must be float32, got ",
                   temperature.scalar_type());
  TORCH_CHECK_TYPE(ka.scalar_type() == at::kLong && kb.scalar_type() == at::kLong, "ka and kb must be int64, got ",
                   ka.scalar_type(), " and ", kb.scalar_type());
  const c10::cuda::CUDAGuard guard(logits.device());
  auto tokens = at::empty({S}, logits.options().dtype(at::kLong));
  auto logprobs = at::empty({S}, logits.options().dtype(at::kFloat));
  if (S == 0) return {tokens, logprobs};
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, logits.get_device()));
  const int splits = race_sample_splits(S, V, sms);
  auto workspace = at::empty({race_sample_workspace_bytes(S, splits)}, logits.options().dtype(at::kByte));
  const auto t = temperature.contiguous(), a = ka.contiguous(), b = kb.contiguous();
  const RaceDtype dtype = st == at::kFloat ? RaceDtype::kFloat32
                          : st == at::kBFloat16 ? RaceDtype::kBFloat16 : RaceDtype::kFloat16;
  C10_CUDA_CHECK(race_sample_launch(dtype, logits.data_ptr(), S, V, logits.stride(0), t.data_ptr<float>(),
                                    a.data_ptr<int64_t>(), b.data_ptr<int64_t>(), splits, workspace.data_ptr(),
                                    tokens.data_ptr<int64_t>(), logprobs.data_ptr<float>(),
                                    c10::cuda::getCurrentCUDAStream()));
  return {tokens, logprobs};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_engine, CUDA, m) { m.impl("race_sample", &race_sample_cuda); }

}  // namespace rlhf_engine
