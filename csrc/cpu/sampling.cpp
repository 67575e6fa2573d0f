// race_sample on the CPU: one pass over each row of the logits draws a token by an exponential race with
// counter-based noise and returns its log-prob. The math is kernels/sampling.py's (the spec:
// engine.generation.sampler.sample without top-k / top-p):
//   s_j = logits_j / t  (t = 1 for greedy rows);  U_j = ((fmix32(fmix32(j ^ ka) ^ kb) >> 9) + 0.5) * 2^-23
//   token = argmax_j s_j (greedy) or argmax_j (s_j - log(-log U_j));  logprob = s_token - logsumexp_j s_j
// The eager PyTorch version allocates a dozen [S, V] temporaries; here the noise is made in registers.
// On AVX2 + FMA machines the logs and exps are SLEEF's 1-ulp vector functions, the ones torch's own CPU kernels call
// (exported by libtorch_cpu), so the noise matches the eager path's bits; elsewhere a scalar loop.
#include "common.h"

#include <cstring>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#include <sleef.h>
#define RLHF_RACE_AVX2 1
#endif

namespace rlhf_engine {
namespace {

constexpr float kUScale = 1.0f / 8388608.0f;  // 2^-23

inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  return h ^ (h >> 16);
}

struct RowResult {
  int64_t token;
  float logprob;
};

// Scalar reference of one row (also the tail of the vector loop on non-AVX2 machines).
template <typename scalar_t>
RowResult race_row_scalar(const scalar_t* x, int64_t V, float t, uint32_t ka, uint32_t kb) {
  const bool greedy = t == 0.f;
  const float t_div = greedy ? 1.f : t;
  float m = -std::numeric_limits<float>::infinity(), best = m, best_s = m;
  int64_t best_j = 0;
  for (int64_t j = 0; j < V; ++j) {
    const float s = static_cast<float>(x[j]) / t_div;
    m = std::max(m, s);
    float race = s;
    if (!greedy) {
      const uint32_t h = fmix32(fmix32(static_cast<uint32_t>(j) ^ ka) ^ kb);
      const float u = (static_cast<float>(h >> 9) + 0.5f) * kUScale;
      race = s - std::log(-std::log(u));
    }
    if (race > best) {  // strictly: the lowest id keeps a tie
      best = race;
      best_s = s;
      best_j = j;
    }
  }
  float l = 0.f;
  if (m != -std::numeric_limits<float>::infinity())
    for (int64_t j = 0; j < V; ++j) l += std::exp(static_cast<float>(x[j]) / t_div - m);
  return {best_j, best_s - (m + std::log(l))};
}

#ifdef RLHF_RACE_AVX2
// 8 logits from j on as float32; lanes at or past V read as -inf (masked load: nothing past the row is touched).
template <typename scalar_t>
inline __m256 load8(const scalar_t* x, int64_t j, int64_t V);

template <>
inline __m256 load8<float>(const float* x, int64_t j, int64_t V) {
  if (j + 8 <= V) return _mm256_loadu_ps(x + j);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(V - j)), lane);
  const __m256 v = _mm256_maskload_ps(x + j, keep);
  return _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), v, _mm256_castsi256_ps(keep));
}

template <typename half_t>
inline __m256 load8_16bit(const half_t* x, int64_t j, int64_t V, bool bf16) {
  alignas(32) uint16_t buf[8];
  const int64_t n = std::min<int64_t>(8, V - j);
  std::memcpy(buf, reinterpret_cast<const uint16_t*>(x + j), n * sizeof(uint16_t));
  for (int64_t i = n; i < 8; ++i) buf[i] = bf16 ? 0xFF80 : 0xFC00;  // -inf in each format
  const __m128i h = _mm_load_si128(reinterpret_cast<const __m128i*>(buf));
  if (bf16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  return _mm256_cvtph_ps(h);
}

template <>
inline __m256 load8<c10::BFloat16>(const c10::BFloat16* x, int64_t j, int64_t V) { return load8_16bit(x, j, V, true); }

template <>
inline __m256 load8<c10::Half>(const c10::Half* x, int64_t j, int64_t V) { return load8_16bit(x, j, V, false); }

inline __m256i fmix32_8(__m256i h) {
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
  h = _mm256_mullo_epi32(h, _mm256_set1_epi32(static_cast<int>(0x85EBCA6Bu)));
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 13));
  h = _mm256_mullo_epi32(h, _mm256_set1_epi32(static_cast<int>(0xC2B2AE35u)));
  return _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
}

template <typename scalar_t>
RowResult race_row(const scalar_t* x, int64_t V, float t, uint32_t ka, uint32_t kb) {
  const bool greedy = t == 0.f;
  const __m256 t_div = _mm256_set1_ps(greedy ? 1.f : t);
  const __m256i vka = _mm256_set1_epi32(static_cast<int>(ka)), vkb = _mm256_set1_epi32(static_cast<int>(kb));
  __m256i ids = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i step = _mm256_set1_epi32(8);
  __m256 m = _mm256_set1_ps(-INFINITY), best = m, best_s = m;
  __m256i best_j = _mm256_setzero_si256();
  for (int64_t j = 0; j < V; j += 8) {
    const __m256 s = _mm256_div_ps(load8(x, j, V), t_div);  // a true division, as the spec
    m = _mm256_max_ps(m, s);
    __m256 race = s;
    if (!greedy) {
      const __m256i h = fmix32_8(_mm256_xor_si256(fmix32_8(_mm256_xor_si256(ids, vka)), vkb));
      const __m256 u = _mm256_mul_ps(
          _mm256_add_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(h, 9)), _mm256_set1_ps(0.5f)), _mm256_set1_ps(kUScale));
      const __m256 noise = Sleef_logf8_u10(_mm256_sub_ps(_mm256_setzero_ps(), Sleef_logf8_u10(u)));
      race = _mm256_sub_ps(s, noise);
      // masked tail lanes have s = -inf and finite noise: race = -inf, they never win
    }
    const __m256 take = _mm256_cmp_ps(race, best, _CMP_GT_OQ);  // per lane, strictly: lower ids keep ties
    best = _mm256_blendv_ps(best, race, take);
    best_s = _mm256_blendv_ps(best_s, s, take);
    best_j = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(best_j), _mm256_castsi256_ps(ids), take));
    ids = _mm256_add_epi32(ids, step);
  }
  alignas(32) float lane_best[8], lane_s[8], lane_m[8];
  alignas(32) int32_t lane_j[8];
  _mm256_store_ps(lane_best, best);
  _mm256_store_ps(lane_s, best_s);
  _mm256_store_ps(lane_m, m);
  _mm256_store_si256(reinterpret_cast<__m256i*>(lane_j), best_j);
  float mx = lane_m[0], b = lane_best[0], bs = lane_s[0];
  int32_t bj = lane_j[0];
  for (int i = 1; i < 8; ++i) {
    mx = std::max(mx, lane_m[i]);
    if (lane_best[i] > b || (lane_best[i] == b && lane_j[i] < bj)) {
      b = lane_best[i];
      bs = lane_s[i];
      bj = lane_j[i];
    }
  }
  if (mx == -INFINITY) return {0, NAN};  // an all -inf row: no distribution to draw from
  const __m256 vmx = _mm256_set1_ps(mx);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t j = 0; j < V; j += 8)
    acc = _mm256_add_ps(acc, Sleef_expf8_u10(_mm256_sub_ps(_mm256_div_ps(load8(x, j, V), t_div), vmx)));
  alignas(32) float lane_l[8];
  _mm256_store_ps(lane_l, acc);
  float l = 0.f;
  for (int i = 0; i < 8; ++i) l += lane_l[i];
  return {bj, bs - (mx + std::log(l))};
}
#else
template <typename scalar_t>
RowResult race_row(const scalar_t* x, int64_t V, float t, uint32_t ka, uint32_t kb) {
  return race_row_scalar(x, V, t, ka, kb);
}
#endif

std::tuple<at::Tensor, at::Tensor> race_sample(const at::Tensor& logits, const at::Tensor& temperature,
                                               const at::Tensor& ka, const at::Tensor& kb) {
  check_cpu(logits, "logits");
  check_dim(logits, 2, "logits");
  check_float(logits, "logits");
  const int64_t S = logits.size(0), V = logits.size(1);
  TORCH_CHECK_VALUE(V <= (int64_t{1} << 31), "logits: vocabulary size must be < 2**31 (32-bit noise ids), got ", V);
  TORCH_CHECK_VALUE(logits.stride(1) == 1 || V == 1, "logits must have unit column stride, got strides ",
                    logits.strides());
  const std::pair<const at::Tensor*, const char*> rows[] = {{&temperature, "temperature"}, {&ka, "ka"}, {&kb, "kb"}};
  for (const auto& [x, name] : rows) {
    check_cpu(*x, name);
    TORCH_CHECK_VALUE(x->dim() == 1 && x->size(0) == S, name, " must have shape (", S, ",) like logits' rows, got ",
                      x->sizes());
  }
  check_dtype(temperature, at::kFloat, "temperature");
  check_dtype(ka, at::kLong, "ka");
  check_dtype(kb, at::kLong, "kb");
  auto tokens = at::empty({S}, logits.options().dtype(at::kLong));
  auto logprobs = at::empty({S}, logits.options().dtype(at::kFloat));
  const auto t = temperature.contiguous(), a = ka.contiguous(), b = kb.contiguous();
  const float* tp = t.data_ptr<float>();
  const int64_t *ap = a.data_ptr<int64_t>(), *bp = b.data_ptr<int64_t>();
  int64_t* out_t = tokens.data_ptr<int64_t>();
  float* out_lp = logprobs.data_ptr<float>();
  auto run = [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* x = logits.data_ptr<scalar_t>();
    const int64_t row_stride = logits.stride(0);
    at::parallel_for(0, S, grain_rows(V * 8), [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) {
        const RowResult r = race_row<scalar_t>(x + s * row_stride, V, tp[s], static_cast<uint32_t>(ap[s]),
                                               static_cast<uint32_t>(bp[s]));
        out_t[s] = r.token;
        out_lp[s] = r.logprob;
      }
    });
  };
  switch (logits.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kBFloat16: run(c10::BFloat16{}); break;
    default: run(c10::Half{}); break;  // check_float admitted only these three
  }
  return {tokens, logprobs};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rlhf_engine, m) {
  m.def("race_sample(Tensor logits, Tensor temperature, Tensor ka, Tensor kb) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rlhf_engine, CPU, m) { m.impl("race_sample", &race_sample); }

}  // namespace rlhf_engine
