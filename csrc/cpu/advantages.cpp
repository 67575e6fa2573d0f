// GAE and discounted returns: one backward sweep per row, the state in registers, rows in parallel.
// The math and its masked-token rules are the spec's, kernels/gae.py (veRL skip_masked=True, OpenRLHF False).
#include "common.h"

namespace rlhf_engine {
namespace {

template <typename scalar_t>
void gae_rows(const at::Tensor& r, const at::Tensor& v, const at::Tensor& m, at::Tensor& adv, at::Tensor& ret,
              float gamma, float lam, bool skip_masked) {
  const int64_t B = r.size(0), T = r.size(1);
  const scalar_t* rp = r.data_ptr<scalar_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  const bool* mp = m.data_ptr<bool>();
  float* ap = adv.data_ptr<float>();
  float* op = ret.data_ptr<float>();
  const int64_t rs0 = r.stride(0), rs1 = r.stride(1), vs0 = v.stride(0), vs1 = v.stride(1);
  const int64_t ms0 = m.stride(0), ms1 = m.stride(1);
  const float gl = gamma * lam;
  at::parallel_for(0, B, grain_rows(T), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      float nv = 0.f, a = 0.f;
      for (int64_t t = T - 1; t >= 0; --t) {
        const bool keep = mp[b * ms0 + t * ms1];
        const float rt = static_cast<float>(rp[b * rs0 + t * rs1]);
        const float vt = static_cast<float>(vp[b * vs0 + t * vs1]);
        if (skip_masked) {
          // a masked token leaves the state as it was (a selection: NaN there never enters it)
          if (keep) {
            a = rt + gamma * nv - vt + gl * a;
            nv = vt;
          }
          ap[b * T + t] = a;
          op[b * T + t] = a + vt;
        } else {
          const float rz = keep ? rt : 0.f, vz = keep ? vt : 0.f;
          a = rz + gamma * nv - vz + gl * a;
          nv = vz;
          ap[b * T + t] = a;
          op[b * T + t] = a + vz;
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> gae(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask,
                                       double gamma, double lam, bool skip_masked) {
  check_cpu(rewards, "token_level_rewards");
  check_dim(rewards, 2, "token_level_rewards");
  check_float(rewards, "token_level_rewards");
  check_same_shape(values, "values", rewards, "token_level_rewards");
  check_dtype(values, rewards.scalar_type(), "values");
  check_same_shape(mask, "response_mask", rewards, "token_level_rewards");
  check_dtype(mask, at::kBool, "response_mask");
  auto adv = at::empty(rewards.sizes(), rewards.options().dtype(at::kFloat));
  auto ret = at::empty_like(adv);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rewards.scalar_type(), "gae", [&] {
    gae_rows<scalar_t>(rewards, values, mask, adv, ret, static_cast<float>(gamma), static_cast<float>(lam),
                       skip_masked);
  });
  return {adv, ret};
}

template <typename scalar_t>
void returns_rows(const at::Tensor& r, const at::Tensor& m, at::Tensor& ret, float gamma) {
  const int64_t B = r.size(0), T = r.size(1);
  const scalar_t* rp = r.data_ptr<scalar_t>();
  const bool* mp = m.data_ptr<bool>();
  float* op = ret.data_ptr<float>();
  const int64_t rs0 = r.stride(0), rs1 = r.stride(1), ms0 = m.stride(0), ms1 = m.stride(1);
  at::parallel_for(0, B, grain_rows(T), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      float running = 0.f;
      for (int64_t t = T - 1; t >= 0; --t) {
        running = static_cast<float>(rp[b * rs0 + t * rs1]) + gamma * running;
        op[b * T + t] = running;
        if (!mp[b * ms0 + t * ms1]) running = 0.f;  // restart after a masked token
      }
    }
  });
}

at::Tensor discounted_returns(const at::Tensor& rewards, const at::Tensor& mask, double gamma) {
  check_cpu(rewards, "token_level_rewards");
  check_dim(rewards, 2, "token_level_rewards");
  check_float(rewards, "token_level_rewards");
  check_same_shape(mask, "response_mask", rewards, "token_level_rewards");
  check_dtype(mask, at::kBool, "response_mask");
  auto ret = at::empty(rewards.sizes(), rewards.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rewards.scalar_type(), "discounted_returns", [&] {
    returns_rows<scalar_t>(rewards, mask, ret, static_cast<float>(gamma));
  });
  return ret;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rlhf_engine, m) {
  m.def("gae(Tensor token_level_rewards, Tensor values, Tensor response_mask, float gamma, float lam, "
        "bool skip_masked) -> (Tensor, Tensor)");
  m.def("discounted_returns(Tensor token_level_rewards, Tensor response_mask, float gamma) -> Tensor");
}

TORCH_LIBRARY_IMPL(rlhf_engine, CPU, m) {
  m.impl("gae", &gae);
  m.impl("discounted_returns", &discounted_returns);
}

}  // namespace rlhf_engine
