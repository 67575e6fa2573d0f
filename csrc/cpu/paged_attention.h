// The worker of csrc/cpu/paged_attention.cpp: online-softmax attention of a few query rows over one sequence's paged
// K/V, reading the cache blocks in place. Plain C++ (no torch), so that it can be timed and inspected on its own.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace rlhf_engine {
namespace paged {

constexpr int64_t kChunk = 64;  // keys per online-softmax update
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// A K or V cache seen from one head of one sequence: row(pos) is token pos's [D] vector.
template <typename cache_t>
struct PagedHead {
  const cache_t* base;  // cache data + head * stride(2)
  int64_t stride_block, stride_slot, block_size;
  const int32_t* table;  // the sequence's block ids
};

// Row pointers of keys [c0, c0 + len): one division per chunk, not one per key.
template <typename cache_t>
void chunk_rows(const PagedHead<cache_t>& h, int64_t c0, int64_t len, const cache_t** rows) {
  int64_t b = c0 / h.block_size, o = c0 % h.block_size;
  for (int64_t t = 0; t < len; ++t) {
    rows[t] = h.base + h.table[b] * h.stride_block + o * h.stride_slot;
    if (++o == h.block_size) o = 0, ++b;
  }
}

// Ask for a row's cache lines ahead of its use: the rows of a sequence are scattered over its blocks (and strided by
// H_kv * D within one), a pattern the hardware prefetcher does not follow (measured: 128 contexts of 200 tokens
// beyond the L2, 1.25x).
template <typename cache_t>
inline void prefetch_row(const cache_t* row, int64_t D) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t off = 0; off < D * static_cast<int64_t>(sizeof(cache_t)); off += 64) __builtin_prefetch(p + off);
}

// The chunk's rows as float: the rows themselves for a float cache, else converted once into buf [len, D].
inline void float_rows(const float* const* rows, int64_t len, int64_t, float*, const float** out) {
  std::copy(rows, rows + len, out);
}
template <typename T>
void float_rows(const T* const* rows, int64_t len, int64_t D, float* buf, const float** out) {
  for (int64_t t = 0; t < len; ++t) {
    float* dst = buf + t * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<float>(rows[t][d]);
    out[t] = dst;
  }
}

// 16 floats (GCC/Clang vector extensions: one zmm register under AVX-512, two ymm under AVX2). Written out because
// GCC compiled the `omp simd` forms of the reductions below to chains of scalar adds, and the exp to scalar code.
typedef float fvec __attribute__((vector_size(64)));
typedef int32_t ivec __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;

inline fvec load(const float* p) {
  fvec v;
  std::memcpy(&v, p, sizeof v);  // an unaligned vector load
  return v;
}
inline void store(float* p, fvec v) { std::memcpy(p, &v, sizeof v); }

inline float hsum(fvec v) {
#if defined(__clang__) || __GNUC__ >= 12  // halving: log2(16) shuffle + add steps
  typedef float f8 __attribute__((vector_size(32)));
  typedef float f4 __attribute__((vector_size(16)));
  const f8 h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
               __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const f4 q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
  return (q[0] + q[2]) + (q[1] + q[3]);
#else
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
#endif
}

// a . b over D (a tail past the last multiple of 16 in scalar)
inline float dot(const float* a, const float* b, int64_t D) {
  fvec acc = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) acc += load(a + d) * load(b + d);
  float sum = hsum(acc);
  for (; d < D; ++d) sum += a[d] * b[d];
  return sum;
}

// x[i] = exp(x[i] - m) for i < n, n a multiple of 16 (x[i] <= m; -inf, a masked key, gives 0); returns their sum.
// No libm call per key: x - m = k ln2 + r with |r| <= ln2/2 (ln2 in two parts, Cody-Waite), e^r by its degree-7
// Taylor polynomial (relative error < 1e-8, below float's 6e-8 ulp), times 2^k built in the exponent bits.
inline float exp_shifted(float* x, int64_t n, float m) {
  const fvec lo = fvec{} - 87.f;  // e^-87 ~ 1.6e-38: below it the result is 0 (and 2^k stays a normal float)
  const fvec magic = fvec{} + 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer, held in the low bits
  fvec sum = {};
  for (int64_t i = 0; i < n; i += kLanes) {
    const fvec t = load(x + i) - m;
    const fvec tc = t < lo ? lo : t;
    const fvec y = tc * 1.44269504f + magic;
    const fvec k = y - magic;
    const fvec r = (tc - k * 0.693359375f) + k * 2.12194440e-4f;
    fvec p = r * (1.f / 5040.f) + 1.f / 720.f;
    p = p * r + 1.f / 120.f;
    p = p * r + 1.f / 24.f;
    p = p * r + 1.f / 6.f;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    const ivec two_k = (((ivec)y - (ivec)magic) + 127) << 23;  // (ivec)x: the same bits, as integers
    const fvec e = t < lo ? fvec{} : p * (fvec)two_k;
    store(x + i, e);
    sum += e;
  }
  return hsum(sum);
}

inline float max_of(const float* x, int64_t n) {  // n a multiple of 16
  fvec mx = load(x);
  for (int64_t i = kLanes; i < n; i += kLanes) {
    const fvec v = load(x + i);
    mx = v > mx ? v : mx;
  }
  float m = mx[0];
  for (int i = 1; i < kLanes; ++i) m = std::max(m, mx[i]);
  return m;
}

// acc [D] += sum over t < len of p[t] * rows[t] [D]. The accumulator stays in registers across the keys (four
// independent chains hide the FMA latency), instead of a store and reload of acc per key.
inline void accumulate(float* acc, const float* p, const float* const* rows, int64_t len, int64_t D) {
  int64_t d = 0;
  for (; d + 4 * kLanes <= D; d += 4 * kLanes) {
    fvec a0 = load(acc + d), a1 = load(acc + d + kLanes), a2 = load(acc + d + 2 * kLanes),
         a3 = load(acc + d + 3 * kLanes);
    for (int64_t t = 0; t < len; ++t) {
      const float* v = rows[t] + d;
      a0 += p[t] * load(v);
      a1 += p[t] * load(v + kLanes);
      a2 += p[t] * load(v + 2 * kLanes);
      a3 += p[t] * load(v + 3 * kLanes);
    }
    store(acc + d, a0), store(acc + d + kLanes, a1), store(acc + d + 2 * kLanes, a2), store(acc + d + 3 * kLanes, a3);
  }
  for (; d + kLanes <= D; d += kLanes) {
    fvec a = load(acc + d);
    for (int64_t t = 0; t < len; ++t) a += p[t] * load(rows[t] + d);
    store(acc + d, a);
  }
  for (; d < D; ++d) {
    float a = acc[d];
    for (int64_t t = 0; t < len; ++t) a += p[t] * rows[t][d];
    acc[d] = a;
  }
}

// Per-thread scratch of attend_rows, allocated once per parallel chunk.
template <typename cache_t>
struct Scratch {
  std::vector<float> scores, kbuf, vbuf;  // [n, kChunk] scores; converted K, V rows [kChunk, D] (bf16/fp16 caches)
  std::vector<const cache_t*> krows, vrows;  // this chunk's rows, then the next chunk's
  std::vector<const float*> kf, vf;
  Scratch(int64_t n, int64_t D)
      : scores(n * kChunk), kbuf(kChunk * D), vbuf(kChunk * D), krows(2 * kChunk), vrows(2 * kChunk), kf(kChunk),
        vf(kChunk) {}
};

// Online softmax of n query rows q [n, D] (float, scale applied) over keys [begin, end) of one sequence's K/V head;
// row j sees only keys < row_end[j] (<= end; nullptr: all). Updates acc [n, D] (unnormalised output), m [n]
// (running max) and l [n] (running sum) in place. Keys at or past `end` are never read.
template <typename cache_t>
void attend_rows(const PagedHead<cache_t>& K, const PagedHead<cache_t>& V, int64_t begin, int64_t end,
                 const float* q, const int64_t* row_end, int64_t n, int64_t D, float* acc, float* m, float* l,
                 Scratch<cache_t>& s) {
  const cache_t** krows = s.krows.data();  // this chunk's rows, then the next chunk's (prefetched meanwhile)
  const cache_t** vrows = s.vrows.data();
  float* sc = s.scores.data();
  if (begin < end) {
    chunk_rows(K, begin, std::min(kChunk, end - begin), krows);
    chunk_rows(V, begin, std::min(kChunk, end - begin), vrows);
  }
  for (int64_t c0 = begin; c0 < end; c0 += kChunk) {
    const int64_t len = std::min(kChunk, end - c0), padded = (len + kLanes - 1) / kLanes * kLanes;
    const int64_t next = std::max<int64_t>(0, std::min(kChunk, end - c0 - kChunk));
    const cache_t** knext = krows + kChunk;
    const cache_t** vnext = vrows + kChunk;
    chunk_rows(K, c0 + kChunk, next, knext);
    chunk_rows(V, c0 + kChunk, next, vnext);
    float_rows(krows, len, D, s.kbuf.data(), s.kf.data());
    float_rows(vrows, len, D, s.vbuf.data(), s.vf.data());
    for (int64_t t = 0; t < len; ++t) {  // scores: each K row read once for all n rows
      if (t < next) prefetch_row(knext[t], D), prefetch_row(vnext[t], D);
      const float* k = s.kf[t];
      for (int64_t j = 0; j < n; ++j)
        sc[j * kChunk + t] = (row_end == nullptr || c0 + t < row_end[j]) ? dot(q + j * D, k, D) : kNegInf;
    }
    for (int64_t j = 0; j < n; ++j) {  // softmax update: rescale the row once per chunk
      float* sj = sc + j * kChunk;
      std::fill(sj + len, sj + padded, kNegInf);
      const float cmax = max_of(sj, padded);
      if (cmax == kNegInf) {  // the whole chunk is masked for this row
        std::fill(sj, sj + len, 0.f);
        continue;
      }
      const float m_new = std::max(m[j], cmax);
      if (m_new != m[j] && m[j] != kNegInf) {  // rescale what is accumulated (nothing yet while m = -inf)
        const float alpha = std::exp(m[j] - m_new);
        float* aj = acc + j * D;
        l[j] *= alpha;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) aj[d] *= alpha;
      }
      m[j] = m_new;
      l[j] += exp_shifted(sj, padded, m_new);
    }
    for (int64_t j = 0; j < n; ++j)  // acc += p V (a masked key, p = 0, is a real token of the context: finite)
      accumulate(acc + j * D, sc + j * kChunk, s.vf.data(), len, D);
    std::swap_ranges(krows, krows + next, knext);
    std::swap_ranges(vrows, vrows + next, vnext);
  }
}

// out = acc / l, lse = m + log l; an empty row (l = 0) gives out = 0, lse = -inf.
inline void finish_row(const float* acc, float m, float l, int64_t D, float* out, float* lse) {
  const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) out[d] = acc[d] * inv;
  *lse = l > 0.f ? m + std::log(l) : kNegInf;
}

}  // namespace paged
}  // namespace rlhf_engine
