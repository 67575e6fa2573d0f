"""Every kernel entry point rejects a NaN or infinite hyper-parameter (a ValueError naming the argument and the value;
NaN passes every ``<``/``>`` range check, so without this it reached the math and gave NaN on one backend and a finite
number on another), and every masked op rejects a number mask holding values other than 0 and 1."""

import pytest
import torch

import kernels as K
from kernels.loss_agg import agg_loss_ref

B, T = 2, 3


def _bt(seed):
    return torch.randn(B, T, generator=torch.Generator().manual_seed(seed))


MASK = torch.ones(B, T, dtype=torch.bool)
LP, OLD, ADV, REF = _bt(0), _bt(1), _bt(2), _bt(3)

# (entry point, hyper-parameter): one call each, with the hyper-parameter given as a keyword
CALLS = {
    "ppo_loss": lambda **kw: K.ppo_loss(LP, OLD, ADV, MASK, ref_logprobs=REF, **kw),
    "grpo_loss": lambda **kw: K.grpo_loss(LP, OLD, ADV, MASK, ref_logprobs=REF, **kw),
    "value_loss": lambda **kw: K.value_loss(LP, OLD, ADV, MASK, **kw),
    "agg_loss_ref": lambda **kw: agg_loss_ref(LP, MASK, "seq-mean-token-sum-norm", **kw),
    "kl_penalty": lambda **kw: K.kl_penalty(LP, REF, **kw),
    "gae": lambda **kw: K.gae(ADV, LP, MASK, **kw),
    "discounted_returns": lambda **kw: K.discounted_returns(ADV, MASK, **kw),
    "group_advantages": lambda **kw: K.group_advantages(ADV.flatten(), 2, **kw),
    "masked_whiten": lambda **kw: K.masked_whiten(ADV, MASK, **kw),
    "logprobs_from_logits": lambda **kw: K.logprobs_from_logits(LP, torch.zeros(B, dtype=torch.long), **kw),
    "entropy_from_logits": lambda **kw: K.entropy_from_logits(LP, **kw),
    "fused_linear_logprobs": lambda **kw: K.fused_linear_logprobs(LP, OLD, torch.zeros(B, dtype=torch.long), **kw),
    "dpo_loss": lambda **kw: K.dpo_loss(LP[0], OLD[0], ADV[0], REF[0], **kw),
    "pairwise_reward_loss": lambda **kw: K.pairwise_reward_loss(LP[0], OLD[0], **kw),
}
HYPER_PARAMETERS = [
    ("ppo_loss", "clip_ratio_low"), ("ppo_loss", "clip_ratio_high"), ("ppo_loss", "clip_ratio_c"),
    ("ppo_loss", "kl_coef"), ("ppo_loss", "global_num_tokens"), ("ppo_loss", "global_num_seqs"),
    ("ppo_loss", "loss_scale_factor"), ("grpo_loss", "kl_coef"), ("grpo_loss", "clip_ratio_high"),
    ("value_loss", "cliprange_value"), ("value_loss", "global_num_seqs"), ("value_loss", "loss_scale_factor"),
    ("agg_loss_ref", "global_num_seqs"), ("agg_loss_ref", "loss_scale_factor"),
    ("kl_penalty", "max_kl"), ("gae", "gamma"), ("gae", "lam"), ("discounted_returns", "gamma"),
    ("group_advantages", "epsilon"), ("masked_whiten", "epsilon"),
    ("logprobs_from_logits", "temperature"), ("entropy_from_logits", "temperature"),
    ("fused_linear_logprobs", "temperature"), ("dpo_loss", "beta"), ("dpo_loss", "label_smoothing"),
    ("pairwise_reward_loss", "margin"), ("pairwise_reward_loss", "center_rewards_coefficient"),
]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("entry, name", HYPER_PARAMETERS, ids=lambda x: x if isinstance(x, str) else None)
def test_non_finite_hyper_parameters_are_rejected(backend, entry, name, value):
    with pytest.raises(ValueError, match=rf"^{name} must .*got {value}"):
        CALLS[entry](**{name: value})


def test_the_finite_calls_run(backend):
    # the same calls with every hyper-parameter at its default are valid: the rejections above are the value's doing
    for call in CALLS.values():
        call()


MASKED = {
    "ppo_loss": ("response_mask", lambda m: K.ppo_loss(LP, OLD, ADV, m)),
    "value_loss": ("response_mask", lambda m: K.value_loss(LP, OLD, ADV, m)),
    "gae": ("response_mask", lambda m: K.gae(ADV, LP, m)),
    "discounted_returns": ("response_mask", lambda m: K.discounted_returns(ADV, m)),
    "masked_whiten": ("mask", lambda m: K.masked_whiten(ADV, m)),
    "agg_loss_ref": ("mask", lambda m: agg_loss_ref(LP, m)),
}


@pytest.mark.parametrize("entry", MASKED)
@pytest.mark.parametrize("bad", [0.5, float("nan"), -1.0, 2], ids=["half", "nan", "minus1", "int2"])
def test_masks_other_than_zero_one_are_rejected(backend, entry, bad):
    name, call = MASKED[entry]
    mask = torch.ones(B, T, dtype=torch.int64 if isinstance(bad, int) else torch.float32)
    mask[1, 1] = bad
    with pytest.raises(ValueError, match=rf"^{name} must be bool or hold only 0 and 1, got {bad} at index \(1, 1\)"):
        call(mask)
    mask[1, 1] = 0  # 0 / 1 numbers, and bool, are fine
    call(mask)
    call(mask.bool())
