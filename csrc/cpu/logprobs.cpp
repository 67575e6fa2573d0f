// Log-probs of the labels and the entropy from [..., V] logits (forward and backward), rows in parallel, the
// vocabulary in vectorised blocks. The math, the saved statistics and the ignore_index rules are the spec's,
// kernels/logprobs.py (module docstring); the outputs are those of its Triton kernels:
//   forward:  lp [N], entropy [N], stats [3, N] = (max of the raw logits m, log S, E_p[d]),
//             d_j = (x_j - m) / T, S = sum_j e^{d_j};
//   backward: dx_j = (g_ent * p_j * (E_p[d] - d_j) + g_lp * (1[j = y] - p_j)) / T, p_j = e^{d_j - log S}.
// The forward reads each row once: every block of kBlock elements is first scanned for its max (and converted to a
// float32 tile in L1 for bf16/fp16), the running sums are rebased to the new max once per block, then the block's
// e^d and e^d * d are summed from L1. Rows whose label is ignore_index are never read (all their outputs are 0).
#include "loss_common.h"

#include <vector>

namespace rlhf_engine {
namespace {

constexpr int64_t kBlock = 2048;  // elements per block: 8 KiB of float32, in L1

// Address of row n of the flattened [N, V] logits: the leading dims may have any strides (no copy).
struct RowIndex {
  std::vector<int64_t> sizes, strides;  // leading dims, innermost last

  explicit RowIndex(const at::Tensor& x) {
    for (int64_t d = 0; d + 1 < x.dim(); ++d) {
      sizes.push_back(x.size(d));
      strides.push_back(x.stride(d));
    }
  }

  int64_t offset(int64_t n) const {
    int64_t off = 0;
    for (int64_t d = static_cast<int64_t>(sizes.size()) - 1; d >= 0; --d) {
      off += (n % sizes[d]) * strides[d];
      n /= sizes[d];
    }
    return off;
  }
};

inline int64_t label_at(const at::Tensor& labels, int64_t n) {
  return labels.scalar_type() == at::kLong ? labels.data_ptr<int64_t>()[n * labels.stride(0)]
                                           : static_cast<int64_t>(labels.data_ptr<int32_t>()[n * labels.stride(0)]);
}

void check_logits(const at::Tensor& logits) {
  check_cpu(logits, "logits");
  TORCH_CHECK_VALUE(logits.dim() >= 1 && logits.size(-1) >= 1, "logits must have shape [..., V] with V >= 1, got ",
                    logits.sizes());
  check_float(logits, "logits");
  TORCH_CHECK_VALUE(logits.size(-1) == 1 || logits.stride(-1) == 1,
                    "logits must have unit stride in the last dim, got strides ", logits.strides());
}

// labels: 1-D, one per row, each in [0, V) or equal to ignore_index (read before any work: a bad label would address
// memory outside the row).
void check_labels(const at::Tensor& labels, int64_t n_rows, int64_t V, int64_t ignore_index) {
  check_cpu(labels, "labels");
  check_int_labels(labels, "labels");
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == n_rows, "labels must have shape [", n_rows,
                    "] (one per row of logits), got ", labels.sizes());
  for (int64_t n = 0; n < n_rows; ++n) {
    const int64_t y = label_at(labels, n);
    TORCH_CHECK_VALUE(y == ignore_index || (y >= 0 && y < V), "labels must be in [0, ", V,
                      ") or equal ignore_index=", ignore_index, ", got ", y, " at index ", n);
  }
}

void check_temperature(double temperature) {
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, "temperature must be finite and > 0, got ",
                    temperature);
}

// The float32 values of elements [start, start + n) of a row: the row itself for float32, else converted into tile.
template <typename scalar_t>
inline const float* as_float(const scalar_t* row, int64_t start, int64_t n, float* tile) {
  for (int64_t j = 0; j < n; ++j) tile[j] = to_float(row[start + j]);
  return tile;
}
template <>
inline const float* as_float<float>(const float* row, int64_t start, int64_t, float*) {
  return row + start;
}

// One row of the forward: (m, S, U) with U = sum_j e^{d_j} d_j, d_j = (x_j - m) * inv_t.
template <typename scalar_t>
void row_stats(const scalar_t* row, int64_t V, float inv_t, float* tile, float& m_out, float& s_out, float& u_out) {
  float m = -std::numeric_limits<float>::infinity(), s = 0.f, u = 0.f;
  for (int64_t start = 0; start < V; start += kBlock) {
    const int64_t n = std::min(kBlock, V - start);
    const float* x = as_float(row, start, n, tile);
    float bm = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : bm)
    for (int64_t j = 0; j < n; ++j) bm = x[j] > bm ? x[j] : bm;  // (std::max's form does not vectorise in GCC 12)
    if (bm == -std::numeric_limits<float>::infinity() && m == bm) {
      // a block of -inf logits before any finite one: it adds 0 to S; to U it adds 0 * -inf, NaN, as the reference's
      // p * log p does for every -inf logit (rebasing to a max of -inf would make S NaN too, and lp with it). The max
      // skips NaN: a NaN logit in such a block makes S NaN, as anywhere else.
      u = std::numeric_limits<float>::quiet_NaN();
      for (int64_t j = 0; j < n; ++j)
        if (x[j] != x[j]) s = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    if (bm > m) {  // rebase S and U to the new max: sum e^{d - shift}(d - shift) = alpha * (U + shift * S)
      if (s > 0.f) {
        const float shift = (m - bm) * inv_t;  // < 0
        const float alpha = std::exp(shift);
        u = alpha * (u + shift * s);
        s = alpha * s;
      }
      m = bm;
    }
    float bs = 0.f, bu = 0.f;
#pragma omp simd reduction(+ : bs, bu)
    for (int64_t j = 0; j < n; ++j) {
      const float d = (x[j] - m) * inv_t;
      const float e = fast_exp(d);
      bs += e;
      bu += e * d;
    }
    s += bs;
    u += bu;
  }
  m_out = m;
  s_out = s;
  u_out = u;
}

template <typename scalar_t>
void forward_rows(const at::Tensor& logits, const at::Tensor* labels, int64_t ignore_index, float inv_t, float* lp,
                  float* ent, float* stats, int64_t n_rows) {
  const int64_t V = logits.size(-1);
  const scalar_t* base = logits.data_ptr<scalar_t>();
  const RowIndex index(logits);
  float* row_max = stats;
  float* log_sum = stats + n_rows;
  float* mean_d = stats + 2 * n_rows;
  at::parallel_for(0, n_rows, grain_rows(V), [&](int64_t r0, int64_t r1) {
    std::vector<float> tile(std::is_same<scalar_t, float>::value ? 0 : kBlock);
    for (int64_t n = r0; n < r1; ++n) {
      int64_t y = 0;
      if (labels != nullptr) {
        y = label_at(*labels, n);
        if (y == ignore_index) {  // never read
          lp[n] = ent[n] = row_max[n] = log_sum[n] = mean_d[n] = 0.f;
          continue;
        }
      }
      const scalar_t* row = base + index.offset(n);
      float m, s, u;
      row_stats(row, V, inv_t, tile.data(), m, s, u);
      const float ls = std::log(s);
      const float md = u / s;
      ent[n] = ls - md;
      row_max[n] = m;
      log_sum[n] = ls;
      mean_d[n] = md;
      if (labels != nullptr) lp[n] = (to_float(row[y]) - m) * inv_t - ls;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& logits, const at::Tensor* labels,
                                                       double temperature, int64_t ignore_index) {
  const int64_t V = logits.size(-1);
  const int64_t n_rows = logits.numel() / V;
  const auto f32 = logits.options().dtype(at::kFloat);
  auto lp = at::empty({labels != nullptr ? n_rows : 0}, f32);
  auto ent = at::empty({n_rows}, f32);
  auto stats = at::empty({3, n_rows}, f32);
  if (n_rows == 0) return {lp, ent, stats};
  const float inv_t = static_cast<float>(1.0 / temperature);
  dispatch_float(logits.scalar_type(), "logits", [&](auto tag) {
    using scalar_t = decltype(tag);
    forward_rows<scalar_t>(logits, labels, ignore_index, inv_t, labels != nullptr ? lp.data_ptr<float>() : nullptr,
                           ent.data_ptr<float>(), stats.data_ptr<float>(), n_rows);
  });
  return {lp, ent, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_from_logits(const at::Tensor& logits, const at::Tensor& labels,
                                                                    double temperature, int64_t ignore_index) {
  check_logits(logits);
  check_temperature(temperature);
  check_labels(labels, logits.numel() / logits.size(-1), logits.size(-1), ignore_index);
  return forward(logits, &labels, temperature, ignore_index);
}

std::tuple<at::Tensor, at::Tensor> entropy_from_logits(const at::Tensor& logits, double temperature) {
  check_logits(logits);
  check_temperature(temperature);
  auto out = forward(logits, nullptr, temperature, 0);
  return {std::get<1>(out), std::get<2>(out)};
}

// One row of the backward: HAS_DLP / HAS_DENT select the terms (an absent upstream gradient adds nothing, not
// 0 * something). dx is a contiguous row of the output.
template <typename scalar_t, bool HAS_DLP, bool HAS_DENT>
void backward_row(const scalar_t* row, scalar_t* dx, int64_t V, int64_t y, float g_lp, float g_ent, float m,
                  float ls, float md, float inv_t, float* tile) {
  for (int64_t start = 0; start < V; start += kBlock) {
    const int64_t n = std::min(kBlock, V - start);
    const float* x = as_float(row, start, n, tile);
    scalar_t* out = dx + start;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float d = (x[j] - m) * inv_t;
      const float p = fast_exp(d - ls);
      float g = 0.f;
      if constexpr (HAS_DENT) g += g_ent * p * (md - d);
      if constexpr (HAS_DLP) g -= g_lp * p;
      store_float(out + j, g * inv_t);
    }
  }
  if constexpr (HAS_DLP) {  // the label's element: + g_lp, the same float32 expression otherwise
    const float d = (to_float(row[y]) - m) * inv_t;
    const float p = fast_exp(d - ls);
    float g = 0.f;
    if constexpr (HAS_DENT) g += g_ent * p * (md - d);
    g += g_lp * (1.f - p);
    store_float(dx + y, g * inv_t);
  }
}

template <typename scalar_t>
void backward_rows(const at::Tensor& logits, const at::Tensor* labels, const at::Tensor* dlp, const at::Tensor* dent,
                   const at::Tensor& stats, int64_t ignore_index, float inv_t, at::Tensor& dx) {
  const int64_t V = logits.size(-1);
  const int64_t n_rows = dx.numel() / V;
  const scalar_t* base = logits.data_ptr<scalar_t>();
  scalar_t* dbase = dx.data_ptr<scalar_t>();
  const RowIndex index(logits);
  const float* sp = stats.data_ptr<float>();
  const int64_t ss0 = stats.stride(0), ss1 = stats.stride(1);
  const float* dlp_p = dlp != nullptr ? dlp->data_ptr<float>() : nullptr;
  const float* dent_p = dent != nullptr ? dent->data_ptr<float>() : nullptr;
  const int64_t dlp_s = dlp != nullptr ? dlp->stride(0) : 0, dent_s = dent != nullptr ? dent->stride(0) : 0;
  const bool has_dlp = dlp != nullptr && labels != nullptr;
  at::parallel_for(0, n_rows, grain_rows(V), [&](int64_t r0, int64_t r1) {
    std::vector<float> tile(std::is_same<scalar_t, float>::value ? 0 : kBlock);
    for (int64_t n = r0; n < r1; ++n) {
      scalar_t* out = dbase + n * V;
      int64_t y = 0;
      if (labels != nullptr) {
        y = label_at(*labels, n);
        if (y == ignore_index) {  // never read: a zero gradient
          std::fill(out, out + V, scalar_t(0.f));
          continue;
        }
      }
      const scalar_t* row = base + index.offset(n);
      const float m = sp[n * ss1], ls = sp[ss0 + n * ss1], md = sp[2 * ss0 + n * ss1];
      const float g_lp = has_dlp ? dlp_p[n * dlp_s] : 0.f;
      const float g_ent = dent_p != nullptr ? dent_p[n * dent_s] : 0.f;
      if (has_dlp && dent_p != nullptr) {
        backward_row<scalar_t, true, true>(row, out, V, y, g_lp, g_ent, m, ls, md, inv_t, tile.data());
      } else if (has_dlp) {
        backward_row<scalar_t, true, false>(row, out, V, y, g_lp, g_ent, m, ls, md, inv_t, tile.data());
      } else {
        backward_row<scalar_t, false, true>(row, out, V, y, g_lp, g_ent, m, ls, md, inv_t, tile.data());
      }
    }
  });
}

void check_row_grad(const c10::optional<at::Tensor>& g, int64_t n_rows, const char* name) {
  if (!g.has_value()) return;
  check_cpu(*g, name);
  check_dtype(*g, at::kFloat, name);
  TORCH_CHECK_VALUE(g->dim() == 1 && g->size(0) == n_rows, name, " must have shape [", n_rows, "], got ",
                    g->sizes());
}

at::Tensor logprobs_from_logits_backward(const at::Tensor& logits, const c10::optional<at::Tensor>& labels,
                                         const c10::optional<at::Tensor>& grad_logprobs,
                                         const c10::optional<at::Tensor>& grad_entropy, const at::Tensor& stats,
                                         double temperature, int64_t ignore_index) {
  check_logits(logits);
  check_temperature(temperature);
  const int64_t V = logits.size(-1);
  const int64_t n_rows = logits.numel() / V;
  if (labels.has_value()) check_labels(*labels, n_rows, V, ignore_index);
  TORCH_CHECK_VALUE(!grad_logprobs.has_value() || labels.has_value(),
                    "grad_logprobs needs labels (the entropy-only forward has no log-probs), got labels=None");
  check_row_grad(grad_logprobs, n_rows, "grad_logprobs");
  check_row_grad(grad_entropy, n_rows, "grad_entropy");
  check_cpu(stats, "stats");
  check_dtype(stats, at::kFloat, "stats");
  TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(0) == 3 && stats.size(1) == n_rows,
                    "stats must have shape [3, ", n_rows, "] (row max, log S, E_p[d] of the forward), got ",
                    stats.sizes());
  auto dx = at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  if (n_rows == 0) return dx;
  if (!grad_logprobs.has_value() && !grad_entropy.has_value()) return dx.zero_();
  const float inv_t = static_cast<float>(1.0 / temperature);
  const at::Tensor* lab = labels.has_value() ? &*labels : nullptr;
  const at::Tensor* dlp = grad_logprobs.has_value() ? &*grad_logprobs : nullptr;
  const at::Tensor* dent = grad_entropy.has_value() ? &*grad_entropy : nullptr;
  dispatch_float(logits.scalar_type(), "logits", [&](auto tag) {
    using scalar_t = decltype(tag);
    backward_rows<scalar_t>(logits, lab, dlp, dent, stats, ignore_index, inv_t, dx);
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rlhf_engine, m) {
  m.def("logprobs_from_logits(Tensor logits, Tensor labels, float temperature, int ignore_index) "
        "-> (Tensor logprobs, Tensor entropy, Tensor stats)");
  m.def("entropy_from_logits(Tensor logits, float temperature) -> (Tensor entropy, Tensor stats)");
  m.def("logprobs_from_logits_backward(Tensor logits, Tensor? labels, Tensor? grad_logprobs, "
        "Tensor? grad_entropy, Tensor stats, float temperature, int ignore_index) -> Tensor");
}

TORCH_LIBRARY_IMPL(rlhf_engine, CPU, m) {
  m.impl("logprobs_from_logits", &logprobs_from_logits);
  m.impl("entropy_from_logits", &entropy_from_logits);
  m.impl("logprobs_from_logits_backward", &logprobs_from_logits_backward);
}

}  // namespace rlhf_engine
