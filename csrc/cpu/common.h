// Shared helpers of the CPU libraries: argument checks that name the argument, expected and actual values (raised
// as Python ValueError / TypeError through TORCH_CHECK_VALUE / TORCH_CHECK_TYPE), before any work is done.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>

namespace rlhf_engine {

inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got device ", t.device());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must be ", dim, "-D, got shape ", t.sizes());
}

inline void check_float(const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kBFloat16 || s == at::kHalf, name,
                   " must be float32, bfloat16 or float16, got ", s);
}

inline void check_same_shape(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK_VALUE(a.sizes() == b.sizes(), a_name, " must have the shape of ", b_name, " ", b.sizes(), ", got ",
                    a.sizes());
}

inline void check_dtype(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
}

// Rows per parallel task: enough work per task that thread start-up is amortised.
inline int64_t grain_rows(int64_t work_per_row) {
  const int64_t target = 1 << 14;
  return std::max<int64_t>(1, target / std::max<int64_t>(1, work_per_row));
}

}  // namespace rlhf_engine
