// Paged attention on the CPU, reading K/V in place from the block tables (no gathered copy of the contexts), the
// approach of vLLM's CPU backend. Caches are [num_blocks, block_size, H_kv, D]; token j of a sequence lives in block
// table[j / block_size] at offset j % block_size (engine/generation/attention/metadata.py).
//
// One worker, attend_rows, runs every op: n query rows that share one K/V head against a range of one sequence's
// keys, with an online softmax in float32 (one max/rescale per chunk of keys, not per key). The H/H_kv query heads of
// a K/V head are rows of one task, so each K/V row is read (and converted from bf16/fp16) once per task:
//   decode:  task (sequence, kv head): H/H_kv rows, keys [start_blocks[s] * block_size, context_len)
//   prefill: task (tile of new tokens, kv head): tile x H/H_kv rows, causal (bottom-right) per row
//   prefix:  task (group, kv head): members x H/H_kv rows over the group's shared blocks (cascade attention)
// and reshape_and_cache, the store of a step's K/V into its slots.
#include "common.h"
#include "paged_attention.h"

#include <cstring>
#include <optional>

namespace rlhf_engine {
namespace {

using namespace paged;

constexpr int64_t kPrefillTile = 16;  // new tokens per prefill task: their rows share each K/V row read

// ------------------------------------------------------------------------------------------------- argument checks
struct Dims {
  int64_t H, H_kv, D, r, block_size, num_blocks;
};

// The paged K/V caches: CPU, [num_blocks, block_size, H_kv, D], one float dtype for both.
void check_caches(const at::Tensor& k_cache, const at::Tensor& v_cache) {
  check_cpu(k_cache, "k_cache");
  check_dim(k_cache, 4, "k_cache");
  check_float(k_cache, "k_cache");
  check_cpu(v_cache, "v_cache");
  check_same_shape(v_cache, "v_cache", k_cache, "k_cache");
  check_dtype(v_cache, k_cache.scalar_type(), "v_cache");
}

Dims check_q_and_caches(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache) {
  check_cpu(q, "q");
  check_dim(q, 3, "q");
  check_float(q, "q");
  check_caches(k_cache, v_cache);
  TORCH_CHECK_TYPE(k_cache.scalar_type() == q.scalar_type() || k_cache.scalar_type() == at::kFloat,
                   "k_cache must have q's dtype ", q.scalar_type(), " or float32, got ", k_cache.scalar_type());
  const int64_t H = q.size(1), D = q.size(2), H_kv = k_cache.size(2);
  TORCH_CHECK_VALUE(k_cache.size(3) == D, "k_cache head dim (size 3) must equal q's ", D, ", got shape ",
                    k_cache.sizes());
  TORCH_CHECK_VALUE(H_kv >= 1 && H % H_kv == 0, "q's heads H = ", H, " must be a multiple of k_cache's H_kv = ", H_kv);
  TORCH_CHECK_VALUE(k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
                    "k_cache and v_cache must be contiguous in their last dim, got strides ", k_cache.strides(),
                    " and ", v_cache.strides());
  return {H, H_kv, D, H / H_kv, k_cache.size(1), k_cache.size(0)};
}

void check_index(const at::Tensor& t, int64_t dim, int64_t rows, const char* name, const char* rows_name) {
  check_cpu(t, name);
  check_dim(t, dim, name);
  check_dtype(t, at::kInt, name);
  TORCH_CHECK_VALUE(t.size(0) == rows, name, " must have ", rows, " rows (", rows_name, "), got shape ", t.sizes());
}

// An index tensor that may be int32 or int64 (PrefixGroups' are int64).
void check_block_ids(const at::Tensor& t, int64_t dim, int64_t rows, const char* name, const char* rows_name) {
  check_cpu(t, name);
  check_dim(t, dim, name);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, name, " must be int32 or int64, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.size(0) == rows, name, " must have ", rows, " rows (", rows_name, "), got shape ", t.sizes());
}

// Every context fits its table row and every block it reads is a block of the cache (read before any work: the
// kernels then index without checks).
void check_tables(const at::Tensor& tables, const at::Tensor& lens, const int64_t* first_block, const Dims& dims,
                  const char* tables_name, const char* lens_name) {
  const int64_t S = tables.size(0), width = tables.size(1);
  const int32_t* tp = tables.data_ptr<int32_t>();
  const int32_t* lp = lens.data_ptr<int32_t>();
  for (int64_t s = 0; s < S; ++s) {
    const int64_t len = lp[s], n = (len + dims.block_size - 1) / dims.block_size;
    TORCH_CHECK_VALUE(len >= 0, lens_name, "[", s, "] must be >= 0, got ", len);
    TORCH_CHECK_VALUE(n <= width, lens_name, "[", s, "] = ", len, " needs ", n, " blocks of ", dims.block_size,
                      " but ", tables_name, " has width ", width);
    for (int64_t b = first_block ? first_block[s] : 0; b < n; ++b) {
      const int32_t id = tp[s * width + b];
      TORCH_CHECK_VALUE(id >= 0 && id < dims.num_blocks, tables_name, "[", s, ", ", b, "] = ", id,
                        " is not a block of the cache (num_blocks = ", dims.num_blocks, ")");
    }
  }
}

// The queries as float [rows, H, D], scale applied (small: one token per sequence at decode).
at::Tensor scaled_float(const at::Tensor& q, double scale) {
  return (q.to(at::kFloat) * scale).contiguous();
}

template <typename cache_t>
PagedHead<cache_t> head_of(const at::Tensor& cache, int64_t h, int64_t block_size, const int32_t* table) {
  return {cache.data_ptr<cache_t>() + h * cache.stride(2), cache.stride(0), cache.stride(1), block_size, table};
}

// the cache dtypes check_float admits
#define DISPATCH_CACHE(cache, NAME, ...)                                                                   \
  AT_DISPATCH_SWITCH((cache).scalar_type(), NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)              \
                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

// ---------------------------------------------------------------------------------------------------------- decode
std::tuple<at::Tensor, at::Tensor> paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                                          const at::Tensor& v_cache, const at::Tensor& block_tables,
                                                          const at::Tensor& context_lens,
                                                          const std::optional<at::Tensor>& start_blocks,
                                                          double scale) {
  const Dims dims = check_q_and_caches(q, k_cache, v_cache);
  const int64_t S = q.size(0);
  check_index(block_tables, 2, S, "block_tables", "one per sequence of q");
  check_index(context_lens, 1, S, "context_lens", "one per sequence of q");
  at::Tensor first;
  if (start_blocks.has_value()) {
    check_block_ids(*start_blocks, 1, S, "start_blocks", "one per sequence of q");
    first = start_blocks->to(at::kLong).contiguous();
    const int64_t* fp = first.data_ptr<int64_t>();
    for (int64_t s = 0; s < S; ++s)
      TORCH_CHECK_VALUE(fp[s] >= 0, "start_blocks[", s, "] must be >= 0, got ", fp[s]);
  }
  const at::Tensor tables = block_tables.contiguous(), lens = context_lens.contiguous();
  const int64_t* fp = first.defined() ? first.data_ptr<int64_t>() : nullptr;
  check_tables(tables, lens, fp, dims, "block_tables", "context_lens");

  const at::Tensor qf = scaled_float(q, scale);
  auto out = at::empty({S, dims.H, dims.D}, q.options().dtype(at::kFloat));
  auto lse = at::empty({S, dims.H}, q.options().dtype(at::kFloat));
  const int32_t* tp = tables.data_ptr<int32_t>();
  const int32_t* lp = lens.data_ptr<int32_t>();
  const float* qp = qf.data_ptr<float>();
  float* op = out.data_ptr<float>();
  float* lsep = lse.data_ptr<float>();
  const int64_t width = tables.size(1), H_kv = dims.H_kv, r = dims.r, D = dims.D, bs = dims.block_size;
  int64_t longest = 0;
  for (int64_t s = 0; s < S; ++s) longest = std::max<int64_t>(longest, lp[s]);
  DISPATCH_CACHE(k_cache, "paged_decode_attention", [&] {
    at::parallel_for(0, S * H_kv, grain_rows(longest * D * (r + 1)), [&](int64_t t0, int64_t t1) {
      Scratch<scalar_t> scratch(r, D);
      std::vector<float> m(r), l(r);
      for (int64_t task = t0; task < t1; ++task) {
        const int64_t s = task / H_kv, h = task % H_kv;
        const int64_t row0 = s * dims.H + h * r;  // the r query heads of K/V head h: contiguous rows
        float* o = op + row0 * D;
        std::fill(o, o + r * D, 0.f);  // the accumulator, normalised in place below
        std::fill(m.begin(), m.end(), kNegInf);
        std::fill(l.begin(), l.end(), 0.f);
        const int32_t* table = tp + s * width;
        attend_rows(head_of<scalar_t>(k_cache, h, bs, table), head_of<scalar_t>(v_cache, h, bs, table),
                    fp ? fp[s] * bs : 0, lp[s], qp + row0 * D, nullptr, r, D, o, m.data(), l.data(), scratch);
        for (int64_t j = 0; j < r; ++j) finish_row(o + j * D, m[j], l[j], D, o + j * D, lsep + row0 + j);
      }
    });
  });
  return {out, lse};
}

// --------------------------------------------------------------------------------------- prefill over the cache
at::Tensor paged_prefill_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                   const at::Tensor& block_tables, const at::Tensor& context_lens,
                                   const at::Tensor& cu_seqlens_q, double scale) {
  const Dims dims = check_q_and_caches(q, k_cache, v_cache);
  const int64_t N = q.size(0), S = block_tables.dim() >= 1 ? block_tables.size(0) : 0;
  check_index(block_tables, 2, S, "block_tables", "one per sequence");
  check_index(context_lens, 1, S, "context_lens", "one per sequence of block_tables");
  check_index(cu_seqlens_q, 1, S + 1, "cu_seqlens_q", "sequences + 1");
  const at::Tensor tables = block_tables.contiguous(), lens = context_lens.contiguous();
  const at::Tensor cu = cu_seqlens_q.contiguous();
  const int32_t* cp = cu.data_ptr<int32_t>();
  const int32_t* lp = lens.data_ptr<int32_t>();
  TORCH_CHECK_VALUE(cp[0] == 0 && cp[S] == N, "cu_seqlens_q must run from 0 to q's ", N, " rows, got ", cp[0],
                    " .. ", cp[S]);
  for (int64_t s = 0; s < S; ++s)
    TORCH_CHECK_VALUE(cp[s] <= cp[s + 1] && cp[s + 1] - cp[s] <= lp[s], "sequence ", s, " has ", cp[s + 1] - cp[s],
                      " new tokens (cu_seqlens_q) but context_lens[", s, "] = ", lp[s],
                      ": need 0 <= new tokens <= context");
  check_tables(tables, lens, nullptr, dims, "block_tables", "context_lens");

  // tasks: tiles of up to kPrefillTile new tokens of one sequence, times the K/V heads
  std::vector<int64_t> tile_seq, tile_row;
  for (int64_t s = 0; s < S; ++s)
    for (int64_t i = cp[s]; i < cp[s + 1]; i += kPrefillTile) tile_seq.push_back(s), tile_row.push_back(i);
  const at::Tensor qf = scaled_float(q, scale);
  auto out = at::empty({N, dims.H, dims.D}, q.options().dtype(at::kFloat));
  const float* qp = qf.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int32_t* tp = tables.data_ptr<int32_t>();
  const int64_t width = tables.size(1), H = dims.H, H_kv = dims.H_kv, r = dims.r, D = dims.D;
  const int64_t bs = dims.block_size, n_tiles = static_cast<int64_t>(tile_seq.size());
  int64_t longest = 0;
  for (int64_t s = 0; s < S; ++s) longest = std::max<int64_t>(longest, lp[s]);
  DISPATCH_CACHE(k_cache, "paged_prefill_attention", [&] {
    const int64_t rows = kPrefillTile * r;
    at::parallel_for(0, n_tiles * H_kv, grain_rows(longest * D * (rows + 1)), [&](int64_t t0, int64_t t1) {
      Scratch<scalar_t> scratch(rows, D);
      std::vector<float> qbuf(rows * D), acc(rows * D), m(rows), l(rows), lse(rows);
      std::vector<int64_t> row_end(rows);
      for (int64_t task = t0; task < t1; ++task) {
        const int64_t tile = task / H_kv, h = task % H_kv, s = tile_seq[tile], i0 = tile_row[tile];
        const int64_t n_tok = std::min<int64_t>(kPrefillTile, cp[s + 1] - i0), n = n_tok * r;
        // new token i sits at position ctx - q_len + i and sees the keys up to it (bottom-right causal)
        const int64_t first_pos = lp[s] - (cp[s + 1] - cp[s]) + (i0 - cp[s]);
        for (int64_t i = 0; i < n_tok; ++i) {
          const float* src = qp + ((i0 + i) * H + h * r) * D;
          std::copy(src, src + r * D, qbuf.data() + i * r * D);
          std::fill(row_end.begin() + i * r, row_end.begin() + (i + 1) * r, first_pos + i + 1);
        }
        std::fill(acc.begin(), acc.begin() + n * D, 0.f);
        std::fill(m.begin(), m.begin() + n, kNegInf);
        std::fill(l.begin(), l.begin() + n, 0.f);
        const int32_t* table = tp + s * width;
        attend_rows(head_of<scalar_t>(k_cache, h, bs, table), head_of<scalar_t>(v_cache, h, bs, table), 0,
                    first_pos + n_tok, qbuf.data(), row_end.data(), n, D, acc.data(), m.data(), l.data(), scratch);
        for (int64_t i = 0; i < n_tok; ++i)
          for (int64_t j = 0; j < r; ++j)
            finish_row(acc.data() + (i * r + j) * D, m[i * r + j], l[i * r + j], D,
                       op + ((i0 + i) * H + h * r + j) * D, lse.data() + i * r + j);
      }
    });
  });
  return out;
}

// ------------------------------------------------------------------------------------ shared prefix (cascade)
std::tuple<at::Tensor, at::Tensor> paged_prefix_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                                          const at::Tensor& v_cache, const at::Tensor& group_rows,
                                                          const at::Tensor& group_valid,
                                                          const at::Tensor& group_blocks,
                                                          const at::Tensor& group_num_blocks, double scale) {
  const Dims dims = check_q_and_caches(q, k_cache, v_cache);
  const int64_t S = q.size(0), P = group_rows.dim() >= 1 ? group_rows.size(0) : 0;
  check_cpu(group_rows, "group_rows");
  check_dim(group_rows, 2, "group_rows");
  check_dtype(group_rows, at::kLong, "group_rows");
  check_cpu(group_valid, "group_valid");
  check_same_shape(group_valid, "group_valid", group_rows, "group_rows");
  check_dtype(group_valid, at::kBool, "group_valid");
  check_block_ids(group_blocks, 2, P, "group_blocks", "one per group of group_rows");
  check_block_ids(group_num_blocks, 1, P, "group_num_blocks", "one per group of group_rows");
  const int64_t G = group_rows.size(1);
  const at::Tensor rows_t = group_rows.contiguous(), valid_t = group_valid.contiguous();
  // PrefixGroups holds int64; the tables are small (groups x prefix blocks)
  const at::Tensor tables = group_blocks.to(at::kInt).contiguous(), nblocks = group_num_blocks.to(at::kInt);
  const int64_t* rp = rows_t.data_ptr<int64_t>();
  const bool* vp = valid_t.data_ptr<bool>();
  for (int64_t i = 0; i < P * G; ++i)
    TORCH_CHECK_VALUE(!vp[i] || (rp[i] >= 0 && rp[i] < S), "group_rows[", i / G, ", ", i % G, "] = ", rp[i],
                      " is not a row of q (", S, " rows)");
  // the prefix length in tokens, checked against the table as a context length would be
  const at::Tensor prefix_lens = (nblocks * dims.block_size).contiguous();
  check_tables(tables, prefix_lens, nullptr, dims, "group_blocks", "group_num_blocks * block_size");

  const at::Tensor qf = scaled_float(q, scale);
  auto out = at::zeros({S, dims.H, dims.D}, q.options().dtype(at::kFloat));
  auto lse = at::full({S, dims.H}, kNegInf, q.options().dtype(at::kFloat));
  const float* qp = qf.data_ptr<float>();
  float* op = out.data_ptr<float>();
  float* lsep = lse.data_ptr<float>();
  const int32_t* tp = tables.data_ptr<int32_t>();
  const int32_t* np = prefix_lens.data_ptr<int32_t>();
  const int64_t width = tables.size(1), H = dims.H, H_kv = dims.H_kv, r = dims.r, D = dims.D, bs = dims.block_size;
  int64_t longest = 0;
  for (int64_t p = 0; p < P; ++p) longest = std::max<int64_t>(longest, np[p]);
  DISPATCH_CACHE(k_cache, "paged_prefix_attention", [&] {
    const int64_t rows = G * r;
    at::parallel_for(0, P * H_kv, grain_rows(longest * D * (rows + 1)), [&](int64_t t0, int64_t t1) {
      Scratch<scalar_t> scratch(rows, D);
      std::vector<float> qbuf(rows * D), acc(rows * D), m(rows), l(rows);
      std::vector<int64_t> member(G);
      for (int64_t task = t0; task < t1; ++task) {
        const int64_t p = task / H_kv, h = task % H_kv;
        int64_t g_n = 0;  // the group's real members, packed
        for (int64_t g = 0; g < G; ++g)
          if (vp[p * G + g]) member[g_n++] = rp[p * G + g];
        const int64_t n = g_n * r;
        for (int64_t g = 0; g < g_n; ++g) {
          const float* src = qp + (member[g] * H + h * r) * D;
          std::copy(src, src + r * D, qbuf.data() + g * r * D);
        }
        std::fill(acc.begin(), acc.begin() + n * D, 0.f);
        std::fill(m.begin(), m.begin() + n, kNegInf);
        std::fill(l.begin(), l.begin() + n, 0.f);
        const int32_t* table = tp + p * width;
        attend_rows(head_of<scalar_t>(k_cache, h, bs, table), head_of<scalar_t>(v_cache, h, bs, table), 0, np[p],
                    qbuf.data(), nullptr, n, D, acc.data(), m.data(), l.data(), scratch);
        for (int64_t g = 0; g < g_n; ++g)
          for (int64_t j = 0; j < r; ++j) {
            const int64_t row = member[g] * H + h * r + j;
            finish_row(acc.data() + (g * r + j) * D, m[g * r + j], l[g * r + j], D, op + row * D, lsep + row);
          }
      }
    });
  });
  return {out, lse};
}

// ------------------------------------------------------------------------------------------------- K/V store
// k, v [N, H_kv, D] into the caches at flat slots slot_mapping [N] (block * block_size + offset): one call and one
// row copy per token and cache, where two index_copy_ calls cost 5x more at decode sizes. A slot named twice gets
// its last token's values.
void reshape_and_cache(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                       const at::Tensor& slot_mapping) {
  check_caches(k_cache, v_cache);
  check_cpu(k, "k");
  check_dim(k, 3, "k");
  check_dtype(k, k_cache.scalar_type(), "k");
  check_cpu(v, "v");
  check_same_shape(v, "v", k, "k");
  check_dtype(v, k_cache.scalar_type(), "v");
  const int64_t N = k.size(0), H_kv = k_cache.size(2), D = k_cache.size(3);
  TORCH_CHECK_VALUE(k.size(1) == H_kv && k.size(2) == D, "k must be [N, ", H_kv, ", ", D,
                    "] (the caches' H_kv and D), got shape ", k.sizes());
  for (const at::Tensor* c : {&k_cache, &v_cache})
    TORCH_CHECK_VALUE(c->stride(3) == 1 && c->stride(2) == D, "k_cache and v_cache must hold each slot's [H_kv, D] "
                      "contiguously, got strides ", c->strides());
  check_cpu(slot_mapping, "slot_mapping");
  check_dim(slot_mapping, 1, "slot_mapping");
  check_dtype(slot_mapping, at::kLong, "slot_mapping");
  TORCH_CHECK_VALUE(slot_mapping.size(0) == N, "slot_mapping must have ", N, " entries (one per row of k), got shape ",
                    slot_mapping.sizes());
  const at::Tensor slots = slot_mapping.contiguous(), k_rows = k.contiguous(), v_rows = v.contiguous();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t bs = k_cache.size(1), n_slots = k_cache.size(0) * bs;
  for (int64_t n = 0; n < N; ++n)
    TORCH_CHECK_VALUE(sp[n] >= 0 && sp[n] < n_slots, "slot_mapping[", n, "] = ", sp[n],
                      " is not a slot of the cache (num_blocks * block_size = ", n_slots, ")");
  const int64_t row_bytes = H_kv * D * k.element_size();
  char* kd = static_cast<char*>(k_cache.data_ptr());
  char* vd = static_cast<char*>(v_cache.data_ptr());
  const char* ks = static_cast<const char*>(k_rows.data_ptr());
  const char* vs = static_cast<const char*>(v_rows.data_ptr());
  const int64_t es = k.element_size();
  for (int64_t n = 0; n < N; ++n) {
    const int64_t b = sp[n] / bs, o = sp[n] % bs;
    std::memcpy(kd + (b * k_cache.stride(0) + o * k_cache.stride(1)) * es, ks + n * row_bytes, row_bytes);
    std::memcpy(vd + (b * v_cache.stride(0) + o * v_cache.stride(1)) * es, vs + n * row_bytes, row_bytes);
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rlhf_engine, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, "
        "Tensor? start_blocks, float scale) -> (Tensor, Tensor)");
  m.def("paged_prefill_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor context_lens, Tensor cu_seqlens_q, float scale) -> Tensor");
  m.def("paged_prefix_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor group_rows, Tensor group_valid, "
        "Tensor group_blocks, Tensor group_num_blocks, float scale) -> (Tensor, Tensor)");
  m.def("reshape_and_cache(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()");
}

TORCH_LIBRARY_IMPL(rlhf_engine, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention);
  m.impl("paged_prefill_attention", &paged_prefill_attention);
  m.impl("paged_prefix_attention", &paged_prefix_attention);
  m.impl("reshape_and_cache", &reshape_and_cache);
}

}  // namespace rlhf_engine
