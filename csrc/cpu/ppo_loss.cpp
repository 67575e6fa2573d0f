// Fused clipped PPO / GRPO loss on the CPU: one pass over each row (rows in parallel, tokens in vectorised tiles)
// writes the masked per-token gradient dl [B, T] and the row's statistics [B, 1, NSTAT], the layout of the Triton
// kernel's per-chunk statistics with one chunk per row; loss_agg_rows then aggregates them (the port of
// kernels/loss_agg.py's _agg_rows_kernel). The per-token math, the metric definitions and the masking rules are the
// spec's, kernels/ppo_loss.py (module docstring) and kernels/kl.py. policy_loss selects vanilla (0), gspo (1: the
// row's ratio exp(min(log s_i, 10)) from the caller's [B] seq_log_ratio) or cispo (2: -sg(clip(r)) * A * lp).
//
// Masked tokens (response_mask false) are never read: a tile's inputs are loaded under the mask (0 elsewhere), so
// NaN/inf there reaches no loss, no statistic and no gradient (their dl is exactly 0).
#include "loss_common.h"

#include <string>
#include <type_traits>
#include <vector>

namespace rlhf_engine {
namespace {

constexpr int64_t kTile = 256;  // tokens per tile: 6 float32 input arrays of 1 KiB, in L1
constexpr int kNStat = 9;       // tokens, loss, pg_loss, pg_clipfrac, pg_clipfrac_lower, ppo_kl, kl, low, high
constexpr float kLogRatioClamp = 20.f;

constexpr float kGspoLogRatioMax = 10.f;  // veRL gspo: clamp(log s_i, max=10)

enum KlEstimator { kNoKl = -1, kK1 = 0, kK2 = 1, kK3 = 2, kAbs = 3 };
enum PolicyLoss { kVanilla = 0, kGspo = 1, kCispo = 2 };  // kernels/ppo_loss.py POLICY_LOSSES

int parse_estimator(const std::string& name) {
  if (name == "k1") return kK1;
  if (name == "k2") return kK2;
  if (name == "k3") return kK3;
  if (name == "abs") return kAbs;
  TORCH_CHECK_VALUE(false, "kl_estimator must be one of ('k1', 'k2', 'k3', 'abs'), got '", name, "'");
  return kNoKl;
}

// A [B, T] input viewed row by row: element (b, t) at b * s0 + t * s1 (s1 = 0 for a per-sequence broadcast).
template <typename scalar_t>
struct Strided {
  const scalar_t* p = nullptr;
  int64_t s0 = 0, s1 = 0;
  Strided() = default;
  explicit Strided(const at::Tensor& t) : p(t.data_ptr<scalar_t>()), s0(t.stride(0)), s1(t.stride(1)) {}
};

// out[j] = float(x(b, t0 + j)) where m[j] (0 or 1) is set, else 0: the element is not read (a masked load).
// bf16/fp16 go through their 16-bit patterns: a masked 16-bit load, then the conversion of every element (0 -> 0.0),
// two loops that GCC vectorises (one loop with both does not).
template <typename scalar_t>
inline void load_tile(const Strided<scalar_t>& x, int64_t b, int64_t t0, int64_t n, const float* m, float* out) {
  const scalar_t* row = x.p + b * x.s0 + t0 * x.s1;
  const int64_t s = x.s1;
  if (s == 0) {  // one value per row (per-sequence advantages / IS weights): read once, if the tile has a token
    float any = 0.f;
    for (int64_t j = 0; j < n; ++j) any = m[j] > any ? m[j] : any;
    const float v = any != 0.f ? to_float(row[0]) : 0.f;
    for (int64_t j = 0; j < n; ++j) out[j] = m[j] != 0.f ? v : 0.f;
    return;
  }
  if constexpr (std::is_same<scalar_t, float>::value) {
    if (s == 1) {
      for (int64_t j = 0; j < n; ++j) out[j] = m[j] != 0.f ? row[j] : 0.f;
    } else {
      for (int64_t j = 0; j < n; ++j) out[j] = m[j] != 0.f ? row[j * s] : 0.f;
    }
  } else {
    static_assert(sizeof(scalar_t) == sizeof(uint16_t), "a 16-bit float type");
    const uint16_t* bits = reinterpret_cast<const uint16_t*>(row);
    alignas(64) scalar_t raw[kTile];
    uint16_t* raw_bits = reinterpret_cast<uint16_t*>(raw);
    if (s == 1) {
      for (int64_t j = 0; j < n; ++j) raw_bits[j] = m[j] != 0.f ? bits[j] : uint16_t(0);
    } else {
      for (int64_t j = 0; j < n; ++j) raw_bits[j] = m[j] != 0.f ? bits[j * s] : uint16_t(0);
    }
    for (int64_t j = 0; j < n; ++j) out[j] = to_float(raw[j]);
  }
}

struct Params {
  float clip_low, clip_high, clip_c, kl_coef;  // clip_low = 1 - clip_ratio_low, clip_high = 1 + clip_ratio_high
};

// The row's GSPO ratio (unused by the other modes): s = exp(min(log s_i, 10)), ds = d r / d lp_t (0 when clamped).
struct RowRatio {
  float s = 1.f, ds = 1.f;
};

// The per-token math of one tile (float32, as the Triton kernel): writes dl (0 where masked) and adds the tile's
// nine masked sums to acc.
template <int MODE, bool DUAL, bool ISW, int KL>
inline void tile_math(int64_t n, const float* m, const float* lp, const float* old, const float* adv,
                      const float* ref, const float* isw, const Params& P, RowRatio row, float* dl_out,
                      double* acc) {
  static_assert(!(MODE == kCispo && DUAL), "cispo has no dual clip");
  float s_tok = 0.f, s_loss = 0.f, s_pg = 0.f, s_cf = 0.f, s_cfl = 0.f, s_ppo_kl = 0.f, s_kl = 0.f, s_low = 0.f,
        s_high = 0.f;
#pragma omp simd reduction(+ : s_tok, s_loss, s_pg, s_cf, s_cfl, s_ppo_kl, s_kl, s_low, s_high)
  for (int64_t j = 0; j < n; ++j) {
    const float a = adv[j];
    const float raw = lp[j] - old[j];
    float ratio, dratio, neg_kl;
    if constexpr (MODE == kGspo) {  // the row's ratio on every token; ppo_kl of the unclamped log-ratio (veRL)
      ratio = row.s;
      dratio = row.ds;
      neg_kl = -raw;
    } else {
      const float log_ratio = std::min(std::max(raw, -kLogRatioClamp), kLogRatioClamp);
      ratio = fast_exp(log_ratio);
      dratio = (raw >= -kLogRatioClamp && raw <= kLogRatioClamp) ? ratio : 0.f;
      neg_kl = -log_ratio;
    }
    float pg, dpg, clipfrac, clipfrac_lower = 0.f;
    if constexpr (MODE == kCispo) {  // l = -sg(clip(r)) * A * lp: d l / d lp = -clip(r) * A
      const float cr = std::min(std::max(ratio, P.clip_low), P.clip_high);
      pg = -cr * a * lp[j];
      dpg = -cr * a;
      clipfrac = (ratio < P.clip_low || ratio > P.clip_high) ? 1.f : 0.f;
      (void)dratio;
    } else {
      const float l1 = -a * ratio;
      const float l2 = -a * std::min(std::max(ratio, P.clip_low), P.clip_high);
      pg = std::max(l1, l2);
      // d max(L1, L2): L2 only carries gradient inside the clip range, where it equals L1
      dpg = l1 >= l2 ? -a * dratio : 0.f;
      clipfrac = l2 > l1 ? 1.f : 0.f;
    }
    if constexpr (DUAL) {
      const float l3 = -a * P.clip_c;
      const bool neg = a < 0.f;
      const float gate = pg < l3 ? 1.f : (pg == l3 ? 0.5f : 0.f);  // torch.minimum splits a tie evenly
      clipfrac_lower = (neg && pg > l3) ? 1.f : 0.f;
      dpg = neg ? dpg * gate : dpg;
      pg = neg ? std::min(pg, l3) : pg;
    }
    if constexpr (ISW) {
      pg *= isw[j];
      dpg *= isw[j];
    }
    float loss = pg, dl = dpg, kl = 0.f;
    if constexpr (KL != kNoKl) {
      float dkl;
      const float x = lp[j], r = ref[j];
      if constexpr (KL == kK1) {
        kl = x - r;
        dkl = 1.f;
      } else if constexpr (KL == kK2) {
        kl = 0.5f * (r - x) * (r - x);
        dkl = x - r;
      } else if constexpr (KL == kK3) {
        const float delta_raw = r - x;
        const float delta = std::min(std::max(delta_raw, -kLogRatioClamp), kLogRatioClamp);
        const float e = fast_exp(delta);
        kl = e - delta - 1.f;
        dkl = (delta_raw >= -kLogRatioClamp && delta_raw <= kLogRatioClamp) ? 1.f - e : 0.f;
      } else {
        kl = std::fabs(x - r);
        dkl = x > r ? 1.f : (x < r ? -1.f : 0.f);
      }
      loss += P.kl_coef * kl;
      dl += P.kl_coef * dkl;
    }
    const float mj = m[j];
    dl_out[j] = mj != 0.f ? dl : 0.f;
    s_tok += mj;
    s_loss += mj * loss;
    s_pg += mj * pg;
    s_cf += mj * clipfrac;
    s_cfl += mj * clipfrac_lower;
    s_ppo_kl += mj * neg_kl;
    s_kl += mj * kl;
    s_low += (mj != 0.f && ratio < P.clip_low && a < 0.f) ? 1.f : 0.f;
    s_high += (mj != 0.f && ratio > P.clip_high && a > 0.f) ? 1.f : 0.f;
  }
  const float sums[kNStat] = {s_tok, s_loss, s_pg, s_cf, s_cfl, s_ppo_kl, s_kl, s_low, s_high};
  for (int k = 0; k < kNStat; ++k) acc[k] += sums[k];
}

using TileFn = void (*)(int64_t, const float*, const float*, const float*, const float*, const float*, const float*,
                        const Params&, RowRatio, float*, double*);

template <int MODE, bool DUAL, bool ISW>
TileFn pick_kl(int kl) {
  switch (kl) {
    case kK1:
      return &tile_math<MODE, DUAL, ISW, kK1>;
    case kK2:
      return &tile_math<MODE, DUAL, ISW, kK2>;
    case kK3:
      return &tile_math<MODE, DUAL, ISW, kK3>;
    case kAbs:
      return &tile_math<MODE, DUAL, ISW, kAbs>;
    default:
      return &tile_math<MODE, DUAL, ISW, kNoKl>;
  }
}

template <int MODE>
TileFn pick_dual_isw(bool dual, bool isw, int kl) {
  if constexpr (MODE != kCispo) {
    if (dual) return isw ? pick_kl<MODE, true, true>(kl) : pick_kl<MODE, true, false>(kl);
  }
  return isw ? pick_kl<MODE, false, true>(kl) : pick_kl<MODE, false, false>(kl);
}

TileFn pick_tile_fn(int mode, bool dual, bool isw, int kl) {
  if (mode == kGspo) return pick_dual_isw<kGspo>(dual, isw, kl);
  if (mode == kCispo) return pick_dual_isw<kCispo>(dual, isw, kl);  // dual refused by the caller
  return pick_dual_isw<kVanilla>(dual, isw, kl);
}

template <typename scalar_t>
void ppo_rows(const at::Tensor& lp_t, const at::Tensor& old_t, const at::Tensor& adv_t, const at::Tensor& mask_t,
              const at::Tensor* ref_t, const at::Tensor* isw_t, const at::Tensor* seq_t, const Params& P, TileFn fn,
              at::Tensor& dl_t, at::Tensor& stats_t) {
  const int64_t B = lp_t.size(0), T = lp_t.size(1);
  const Strided<scalar_t> lp(lp_t), old(old_t), adv(adv_t);
  const Strided<scalar_t> ref = ref_t != nullptr ? Strided<scalar_t>(*ref_t) : Strided<scalar_t>();
  const Strided<scalar_t> isw = isw_t != nullptr ? Strided<scalar_t>(*isw_t) : Strided<scalar_t>();
  // a bool is one byte holding 0 or 1: read as uint8 so that the conversion to a float 0/1 tile vectorises
  const uint8_t* mp = reinterpret_cast<const uint8_t*>(mask_t.data_ptr<bool>());
  const int64_t ms0 = mask_t.stride(0), ms1 = mask_t.stride(1);
  const float* seq = seq_t != nullptr ? seq_t->data_ptr<float>() : nullptr;
  const int64_t seq_s = seq_t != nullptr ? seq_t->stride(0) : 0;
  float* dl = dl_t.data_ptr<float>();
  float* stats = stats_t.data_ptr<float>();
  at::parallel_for(0, B, grain_rows(T), [&](int64_t b0, int64_t b1) {
    alignas(64) float m[kTile], x_lp[kTile], x_old[kTile], x_adv[kTile], x_ref[kTile], x_isw[kTile];
    for (int64_t b = b0; b < b1; ++b) {
      double acc[kNStat] = {0.0};
      RowRatio row;
      if (seq != nullptr) {
        const float log_s = seq[b * seq_s];
        row.s = std::exp(std::min(log_s, kGspoLogRatioMax));  // NaN stays NaN (std::min returns its first argument)
        row.ds = log_s <= kGspoLogRatioMax ? row.s : 0.f;
      }
      for (int64_t t0 = 0; t0 < T; t0 += kTile) {
        const int64_t n = std::min(kTile, T - t0);
        const uint8_t* mrow = mp + b * ms0 + t0 * ms1;
        if (ms1 == 1) {
          for (int64_t j = 0; j < n; ++j) m[j] = static_cast<float>(mrow[j]);
        } else {
          for (int64_t j = 0; j < n; ++j) m[j] = static_cast<float>(mrow[j * ms1]);
        }
        load_tile(lp, b, t0, n, m, x_lp);
        load_tile(old, b, t0, n, m, x_old);
        load_tile(adv, b, t0, n, m, x_adv);
        if (ref_t != nullptr) load_tile(ref, b, t0, n, m, x_ref);
        if (isw_t != nullptr) load_tile(isw, b, t0, n, m, x_isw);
        fn(n, m, x_lp, x_old, x_adv, x_ref, x_isw, P, row, dl + b * T + t0, acc);
      }
      for (int k = 0; k < kNStat; ++k) stats[b * kNStat + k] = static_cast<float>(acc[k]);
    }
  });
}

void check_bt(const at::Tensor& t, const char* name, const at::Tensor& like, at::ScalarType dtype) {
  check_cpu(t, name);
  check_same_shape(t, name, like, "logprobs");
  check_dtype(t, dtype, name);
}

void check_hyper(double v, const char* name, double lo, bool lo_open) {
  TORCH_CHECK_VALUE(std::isfinite(v), name, " must be finite, got ", v);
  TORCH_CHECK_VALUE(lo_open ? v > lo : v >= lo, name, " must be ", lo_open ? "> " : ">= ", lo, ", got ", v);
}

std::tuple<at::Tensor, at::Tensor> ppo_loss(const at::Tensor& logprobs, const at::Tensor& old_logprobs,
                                            const at::Tensor& advantages, const at::Tensor& response_mask,
                                            const c10::optional<at::Tensor>& ref_logprobs,
                                            const c10::optional<at::Tensor>& rollout_is_weights,
                                            double clip_ratio_low, double clip_ratio_high,
                                            c10::optional<double> clip_ratio_c, double kl_coef,
                                            c10::string_view kl_estimator, int64_t policy_loss,
                                            const c10::optional<at::Tensor>& seq_log_ratio) {
  check_cpu(logprobs, "logprobs");
  check_dim(logprobs, 2, "logprobs");
  check_float(logprobs, "logprobs");
  const auto dtype = logprobs.scalar_type();
  check_bt(old_logprobs, "old_logprobs", logprobs, dtype);
  check_bt(advantages, "advantages", logprobs, dtype);  // per-sequence advantages come expanded (stride 0)
  check_cpu(response_mask, "response_mask");
  check_same_shape(response_mask, "response_mask", logprobs, "logprobs");
  check_dtype(response_mask, at::kBool, "response_mask");
  if (ref_logprobs.has_value()) check_bt(*ref_logprobs, "ref_logprobs", logprobs, dtype);
  if (rollout_is_weights.has_value()) check_bt(*rollout_is_weights, "rollout_is_weights", logprobs, dtype);
  check_hyper(clip_ratio_low, "clip_ratio_low", 0.0, false);
  TORCH_CHECK_VALUE(clip_ratio_low <= 1.0, "clip_ratio_low must be <= 1, got ", clip_ratio_low);
  check_hyper(clip_ratio_high, "clip_ratio_high", 0.0, false);
  if (clip_ratio_c.has_value()) check_hyper(*clip_ratio_c, "clip_ratio_c", 1.0, true);
  check_hyper(kl_coef, "kl_coef", 0.0, false);
  const int est = parse_estimator(std::string(kl_estimator.data(), kl_estimator.size()));
  TORCH_CHECK_VALUE(kl_coef == 0.0 || ref_logprobs.has_value(), "kl_coef=", kl_coef,
                    " > 0 needs ref_logprobs, got None");
  TORCH_CHECK_VALUE(policy_loss >= kVanilla && policy_loss <= kCispo,
                    "policy_loss must be 0 (vanilla), 1 (gspo) or 2 (cispo), got ", policy_loss);
  TORCH_CHECK_VALUE(policy_loss != kCispo || !clip_ratio_c.has_value(),
                    "policy_loss=2 (cispo) has no dual clip: clip_ratio_c must be None, got ", clip_ratio_c.value_or(0));
  TORCH_CHECK_VALUE((policy_loss == kGspo) == seq_log_ratio.has_value(), "seq_log_ratio must be given for ",
                    "policy_loss=1 (gspo) and only then; got policy_loss=", policy_loss, " and ",
                    seq_log_ratio.has_value() ? "a tensor" : "None");
  if (seq_log_ratio.has_value()) {
    check_cpu(*seq_log_ratio, "seq_log_ratio");
    check_dim(*seq_log_ratio, 1, "seq_log_ratio");
    check_dtype(*seq_log_ratio, at::kFloat, "seq_log_ratio");
    TORCH_CHECK_VALUE(seq_log_ratio->size(0) == logprobs.size(0), "seq_log_ratio must have shape [",
                      logprobs.size(0), "] (one per row of logprobs), got ", seq_log_ratio->sizes());
  }

  const int64_t B = logprobs.size(0), T = logprobs.size(1);
  const auto f32 = logprobs.options().dtype(at::kFloat);
  auto dl = at::empty({B, T}, f32);
  auto stats = at::zeros({B, 1, kNStat}, f32);
  if (B * T == 0) return {dl, stats};
  const Params P{static_cast<float>(1.0 - clip_ratio_low), static_cast<float>(1.0 + clip_ratio_high),
                 static_cast<float>(clip_ratio_c.value_or(0.0)), static_cast<float>(kl_coef)};
  const TileFn fn = pick_tile_fn(static_cast<int>(policy_loss), clip_ratio_c.has_value(),
                                 rollout_is_weights.has_value(), ref_logprobs.has_value() ? est : kNoKl);
  const at::Tensor* ref = ref_logprobs.has_value() ? &*ref_logprobs : nullptr;
  const at::Tensor* isw = rollout_is_weights.has_value() ? &*rollout_is_weights : nullptr;
  const at::Tensor* seq = seq_log_ratio.has_value() ? &*seq_log_ratio : nullptr;
  dispatch_float(dtype, "logprobs", [&](auto tag) {
    using scalar_t = decltype(tag);
    ppo_rows<scalar_t>(logprobs, old_logprobs, advantages, response_mask, ref, isw, seq, P, fn, dl, stats);
  });
  return {dl, stats};
}

// ------------------------------------------------------------------------------------------------- aggregation
// kernels/loss_agg.py, _agg_rows_kernel: out[0] = local token count, out[1..n_weighted] = sum_i w_i * row sums
// (the aggregated losses), the rest token means over the local mask; w [B] the row weights (d loss / d row sum).
std::tuple<at::Tensor, at::Tensor> loss_agg_rows(const at::Tensor& stats, int64_t n_weighted,
                                                 c10::string_view loss_agg_mode,
                                                 c10::optional<double> global_num_tokens,
                                                 c10::optional<double> global_num_seqs, double loss_scale_factor) {
  check_cpu(stats, "stats");
  check_dim(stats, 3, "stats");
  check_dtype(stats, at::kFloat, "stats");
  const int64_t B = stats.size(0), C = stats.size(1), nstat = stats.size(2);
  TORCH_CHECK_VALUE(n_weighted >= 0 && n_weighted < nstat, "n_weighted must be in [0, ", nstat,
                    ") (stat 0 is the token count), got ", n_weighted);
  const std::string mode(loss_agg_mode.data(), loss_agg_mode.size());
  int mode_id = -1;
  const char* modes[] = {"token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"};
  for (int i = 0; i < 4; ++i)
    if (mode == modes[i]) mode_id = i;
  TORCH_CHECK_VALUE(mode_id >= 0, "loss_agg_mode must be one of ('token-mean', 'seq-mean-token-mean', "
                    "'seq-mean-token-sum', 'seq-mean-token-sum-norm'), got '", mode, "'");
  if (global_num_tokens.has_value()) check_hyper(*global_num_tokens, "global_num_tokens", 0.0, true);
  if (global_num_seqs.has_value()) check_hyper(*global_num_seqs, "global_num_seqs", 0.0, true);
  check_hyper(loss_scale_factor, "loss_scale_factor", 0.0, true);

  const auto s = stats.contiguous();
  const float* sp = s.data_ptr<float>();
  std::vector<double> rows(B * nstat, 0.0), totals(nstat, 0.0);
  int64_t nonempty = 0;
  for (int64_t b = 0; b < B; ++b) {
    double* r = rows.data() + b * nstat;
    for (int64_t c = 0; c < C; ++c)
      for (int64_t k = 0; k < nstat; ++k) r[k] += sp[(b * C + c) * nstat + k];
    for (int64_t k = 0; k < nstat; ++k) totals[k] += r[k];
    nonempty += r[0] > 0.0;
  }
  const double local_tok = totals[0];
  const double tok_denom = std::max(local_tok, 1.0);
  const double loss_tok_denom = global_num_tokens.has_value() ? *global_num_tokens : tok_denom;
  // veRL / OpenRLHF: fully masked rows are not counted
  const double seq_denom = global_num_seqs.has_value() ? *global_num_seqs : std::max<double>(nonempty, 1.0);
  auto f32 = stats.options().dtype(at::kFloat);
  auto out = at::empty({nstat}, f32);
  auto w = at::empty({B}, f32);
  float* wp = w.data_ptr<float>();
  std::vector<double> weighted(nstat, 0.0);
  for (int64_t b = 0; b < B; ++b) {
    const double* r = rows.data() + b * nstat;
    double wb;
    switch (mode_id) {
      case 0:
        wb = 1.0 / loss_tok_denom;
        break;
      case 1:
        wb = 1.0 / (seq_denom * std::max(r[0], 1.0));
        break;
      case 2:
        wb = 1.0 / seq_denom;
        break;
      default:
        wb = 1.0 / (seq_denom * loss_scale_factor);
    }
    wp[b] = static_cast<float>(wb);
    for (int64_t k = 1; k <= n_weighted; ++k) weighted[k] += r[k] * wb;
  }
  float* op = out.data_ptr<float>();
  op[0] = static_cast<float>(local_tok);
  for (int64_t k = 1; k < nstat; ++k)
    op[k] = static_cast<float>(k <= n_weighted ? weighted[k] : totals[k] / tok_denom);
  return {out, w};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rlhf_engine, m) {
  m.def("ppo_loss(Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor response_mask, "
        "Tensor? ref_logprobs, Tensor? rollout_is_weights, float clip_ratio_low, float clip_ratio_high, "
        "float? clip_ratio_c, float kl_coef, str kl_estimator, int policy_loss=0, Tensor? seq_log_ratio=None) "
        "-> (Tensor dl, Tensor stats)");
  m.def("loss_agg_rows(Tensor stats, int n_weighted, str loss_agg_mode, float? global_num_tokens, "
        "float? global_num_seqs, float loss_scale_factor) -> (Tensor out, Tensor w)");
}

TORCH_LIBRARY_IMPL(rlhf_engine, CPU, m) {
  m.impl("ppo_loss", &ppo_loss);
  m.impl("loss_agg_rows", &loss_agg_rows);
}

}  // namespace rlhf_engine
