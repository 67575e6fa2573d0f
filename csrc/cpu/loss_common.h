// Shared by the loss-side CPU libraries (logprobs.cpp, ppo_loss.cpp): scalar helpers written so that GCC/Clang
// vectorise the loops that call them (-O3 -march=native): a branch-free float32 exp, and float32 <-> bfloat16 /
// float16 element conversions. All math of these kernels is float32, whatever the input dtype.
#pragma once

#include "common.h"

#include <cstring>

// The helpers below sit inside vectorised loops: a call that GCC declines to inline (its size budget runs out in the
// larger loop bodies) keeps the whole loop scalar, so they are forced inline.
#if defined(__GNUC__) || defined(__clang__)
#define RLHF_INLINE inline __attribute__((always_inline))
#else
#define RLHF_INLINE inline
#endif

namespace rlhf_engine {

RLHF_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

RLHF_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

// exp(x) in float32, branch-free (vectorises): x is reduced to r = x - n ln2 with |r| <= ln2 / 2 (ln2 split in two
// parts, so the reduction is exact to float32 for |n| <= 128), exp(r) is a degree-7 polynomial (the Taylor
// coefficients of exp, enough for a relative error below 2 ulp on that interval), and 2^n is built in the exponent
// bits. x below -87.3 (where exp(x) leaves the normal range) gives exactly 0, so exp(-inf) = 0; x above 88 saturates
// at exp(88) (callers pass x <= 20); NaN gives NaN.
RLHF_INLINE float fast_exp(float x) {
  constexpr float kLo = -87.33654f;  // ln(2^-126): the smallest normal float
  constexpr float kHi = 88.0f;
  const float xc = x < kLo ? kLo : (x > kHi ? kHi : x);  // NaN fails both tests and stays NaN
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer (|t| < 2^22)
  const float shifted = xc * kLog2e + kRound;
  const uint32_t n_bits = float_to_bits(shifted) - float_to_bits(kRound);  // n as a two's-complement integer
  const float n = shifted - kRound;
  constexpr float kLn2Hi = 0.693359375f;  // 8 significant bits: n * kLn2Hi is exact
  constexpr float kLn2Lo = -2.12194440e-4f;
  const float r = (xc - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float scale = bits_to_float((n_bits + 127u) << 23);  // 2^n, n in [-126, 127]
  const float y = p * scale;
  return x < kLo ? 0.0f : y;
}

// Element loads (any input dtype -> float32) and stores (float32 -> output dtype, round to nearest even).
RLHF_INLINE float to_float(float v) { return v; }
RLHF_INLINE float to_float(c10::BFloat16 v) { return bits_to_float(static_cast<uint32_t>(v.x) << 16); }
// float16 -> float32, branch-free (c10::Half's conversion does not vectorise): normal numbers rebias the exponent
// (15 -> 127), subnormals and zero are the integer significand times 2^-24 (exact), inf/NaN keep all exponent bits.
RLHF_INLINE float to_float(c10::Half v) {
  const uint32_t h = v.x;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t em = h & 0x7FFFu;  // exponent and significand
  const uint32_t normal = (em << 13) + 0x38000000u;  // + (127 - 15) << 23
  const uint32_t sub = float_to_bits(static_cast<float>(static_cast<int32_t>(em)) * 5.9604644775390625e-8f);
  const uint32_t special = (em << 13) | 0x7F800000u;  // inf, or NaN with its payload
  const uint32_t is_special = 0u - static_cast<uint32_t>(em >= 0x7C00u);  // all ones or zero: selects as masks,
  const uint32_t is_sub = 0u - static_cast<uint32_t>(em < 0x0400u);       // which GCC vectorises (not so ?: here)
  return bits_to_float(sign | (special & is_special) | (sub & is_sub) | (normal & ~(is_sub | is_special)));
}

RLHF_INLINE void store_float(float* p, float v) { *p = v; }
RLHF_INLINE void store_float(c10::BFloat16* p, float v) {
  const uint32_t u = float_to_bits(v);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  p->x = static_cast<uint16_t>(v != v ? 0x7FC0u : rounded);  // NaN stays a (quiet) NaN
}
// float32 -> float16, round to nearest even, branch-free: |v| >= 65520 -> inf (NaN -> quiet NaN); below 2^-14 the
// result is subnormal: adding 0.5 puts the significand's bits at the bottom of the float, rounded by the FPU itself;
// otherwise the exponent is rebiased and the 13 dropped bits rounded to even.
RLHF_INLINE void store_float(c10::Half* p, float v) {
  const uint32_t u = float_to_bits(v);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7FFFFFFFu;
  const uint32_t overflow = a > 0x7F800000u ? 0x7E00u : 0x7C00u;
  const uint32_t sub = float_to_bits(bits_to_float(a) + 0.5f) - 0x3F000000u;  // 0.5f's bits
  const uint32_t normal = (a - 0x38000000u + 0x0FFFu + ((a >> 13) & 1u)) >> 13;
  const uint32_t h = a >= 0x477FF000u ? overflow : (a < 0x38800000u ? sub : normal);
  p->x = static_cast<uint16_t>(sign | h);
}

// Calls f(scalar_t{}) for the float32 / bfloat16 / float16 dtype s (callers checked it with check_float).
template <typename F>
inline void dispatch_float(at::ScalarType s, const char* name, F&& f) {
  switch (s) {
    case at::kFloat:
      f(float{});
      break;
    case at::kBFloat16:
      f(c10::BFloat16{});
      break;
    case at::kHalf:
      f(c10::Half{});
      break;
    default:
      TORCH_CHECK_TYPE(false, name, " must be float32, bfloat16 or float16, got ", s);
  }
}

inline void check_int_labels(const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kLong || s == at::kInt, name, " must be int64 or int32, got ", s);
}

}  // namespace rlhf_engine
