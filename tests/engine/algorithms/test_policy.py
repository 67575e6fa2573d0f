"""engine.algorithms.grpo: the loss denominators of one policy step (rows with at least one response token, the Dr.
GRPO ``loss_scale_factor``), invariance to the micro-batch split and to fully masked rows, the on-policy pass
(``old_logprobs=None``), each policy loss and the rollout correction wired through (CPU, tiny model)."""

import copy
import math
import types

import pytest
import torch

from engine.algorithms.batching import make_batch, response_logprobs
from engine.algorithms.policy import global_denominators, policy_update
from engine.models import tiny_model
from kernels.loss_agg import LOSS_AGG_MODES

TINY = {"vocab_size": 32, "hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1,
        "intermediate_size": 64}

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [[1, 2], [3, 4, 5], [6], [7, 8], [9, 10, 11]]
RESPONSES = [[12, 13, 14], [], [15, 16, 17, 18], [19], [20, 21]]  # row 1: an empty completion (fully masked)


def _cfg(**overrides):
    return types.SimpleNamespace(**{
        "micro_batch_size": 5, "clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "loss_agg_mode": "token-mean",
        "kl_coef": 0.1, "kl_estimator": "k3", "rollout_is": None, "rollout_is_cap": 2.0, "entropy_coef": 0.01,
        **overrides})


def _rollout(prompts=PROMPTS, responses=RESPONSES, seed=0):
    policy = tiny_model("llama", seed=0, **TINY).train()
    batch = make_batch(prompts, responses, pad_id=0, device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lp = response_logprobs(policy, batch)
    mask = batch.response_mask
    old = torch.where(mask, lp + 0.3 * torch.randn(lp.shape, generator=g), 0.0)  # off-policy: the clip is active
    ref = torch.where(mask, lp + 0.2 * torch.randn(lp.shape, generator=g), 0.0)
    advantages = torch.randn(len(prompts), generator=g)
    return policy, batch, old, ref, advantages


def _step(policy, batch, old, ref, advantages, **kw):
    """One policy_update with SGD(lr=1) on a copy: the parameter change is minus the gradient."""
    model = copy.deepcopy(policy)
    result = policy_update(model, torch.optim.SGD(model.parameters(), lr=1.0), batch, old, advantages,
                           ref_logprobs=ref, temperature=1.0, max_grad_norm=1e9, **kw)
    assert result.stepped
    return result.metrics, {k: p.detach().clone() for k, p in model.named_parameters()}


def test_global_denominators_count_rows_with_a_response_token():
    batch = make_batch(PROMPTS, RESPONSES, pad_id=0, device="cpu")
    assert global_denominators(batch) == {"global_num_tokens": 10, "global_num_seqs": 4, "loss_scale_factor": 4}
    assert global_denominators(batch, 64)["loss_scale_factor"] == 64
    empty = make_batch([[1], [2]], [[], []], pad_id=0, device="cpu")
    # every completion empty (T = 0): all counts floor at 1, so the (zero) loss is never 0 / 0
    assert global_denominators(empty) == {"global_num_tokens": 1, "global_num_seqs": 1, "loss_scale_factor": 1}


@pytest.mark.parametrize("loss_agg_mode", LOSS_AGG_MODES)
def test_policy_update_micro_batches_and_fully_masked_rows_change_nothing(loss_agg_mode):
    """Micro-batches of 1 row (one of them the fully masked row) and of 2 give the one-micro-batch step; and the step
    on the batch with the empty completion equals the step on the batch without it (the seq-mean modes count only
    rows with a response token: veRL agg_loss / OpenRLHF)."""
    policy, batch, old, ref, advantages = _rollout()
    cfg = _cfg(loss_agg_mode=loss_agg_mode)
    full_metrics, full_params = _step(policy, batch, old, ref, advantages, cfg=cfg)
    for mbs in (1, 2):
        metrics, params = _step(policy, batch, old, ref, advantages, cfg=_cfg(loss_agg_mode=loss_agg_mode,
                                                                                  micro_batch_size=mbs))
        for name, value in full_metrics.items():
            assert metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-6), (mbs, name)
        for name, p in full_params.items():
            torch.testing.assert_close(params[name], p, rtol=1e-5, atol=1e-6, msg=f"{mbs} {name}")

    keep = torch.tensor([0, 2, 3, 4])
    sub = batch.rows(keep)  # same T (row 2 is the longest)
    metrics, params = _step(policy, sub, old[keep], ref[keep], advantages[keep], cfg=cfg)
    for name, value in full_metrics.items():
        assert metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    for name, p in full_params.items():
        torch.testing.assert_close(params[name], p, rtol=1e-5, atol=1e-6, msg=name)


def test_policy_update_loss_scale_factor_is_the_dr_grpo_constant():
    # seq-mean-token-sum-norm: loss = sum of token losses / (non-empty rows * loss_scale_factor); the default is the
    # batch's T (4 here), so a factor of 8 halves the loss, and the other modes ignore it
    policy, batch, old, ref, advantages = _rollout()
    cfg = _cfg(loss_agg_mode="seq-mean-token-sum-norm")
    default, _ = _step(policy, batch, old, ref, advantages, cfg=cfg)
    explicit, _ = _step(policy, batch, old, ref, advantages, cfg=cfg, loss_scale_factor=4)
    doubled, _ = _step(policy, batch, old, ref, advantages, cfg=cfg, loss_scale_factor=8)
    assert explicit["loss"] == pytest.approx(default["loss"], rel=1e-6)
    assert doubled["loss"] == pytest.approx(default["loss"] / 2, rel=1e-5)
    assert doubled["pg_loss"] == pytest.approx(default["pg_loss"] / 2, rel=1e-5)
    token_mean = _cfg(loss_agg_mode="token-mean")
    a, _ = _step(policy, batch, old, ref, advantages, cfg=token_mean)
    b, _ = _step(policy, batch, old, ref, advantages, cfg=token_mean, loss_scale_factor=8)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)


@pytest.mark.parametrize("policy_loss", ["vanilla", "gspo", "cispo"])
@pytest.mark.parametrize("rollout_is", [None, "token", "sequence"])
def test_on_policy_pass_equals_old_logprobs_from_the_same_weights(policy_loss, rollout_is):
    """``old_logprobs=None`` (the first pass after the rollout) uses each micro-batch's own detached log-probs: the
    step equals the one given those log-probs computed beforehand, with no extra forward."""
    policy, batch, _, ref, advantages = _rollout()
    with torch.no_grad():
        old = response_logprobs(policy, batch)
    rollout = torch.where(batch.response_mask, old + 0.05, 0.0)  # the generator's, a little off
    agg = "seq-mean-token-mean" if policy_loss == "gspo" else "token-mean"
    cfg = _cfg(policy_loss=policy_loss, loss_agg_mode=agg, rollout_is=rollout_is, micro_batch_size=2)
    kw = dict(cfg=cfg, rollout_logprobs=rollout, measure_rollout_corr=True)
    given_metrics, given = _step(policy, batch, old, ref, advantages, **kw)
    none_metrics, none = _step(policy, batch, None, ref, advantages, **kw)
    for name, value in given_metrics.items():
        assert none_metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    for name, p in given.items():
        torch.testing.assert_close(none[name], p, rtol=1e-5, atol=1e-6, msg=name)
    if rollout_is:  # the correction's weights exp(old - rollout) = exp(-0.05) < 1 are reported
        assert given_metrics["rollout_corr/is_weight_mean"] == pytest.approx(math.exp(-0.05), rel=1e-5)
        assert given_metrics["rollout_corr/truncated_frac"] == 0.0


def test_the_policy_loss_and_the_correction_reach_the_gradient():
    """gspo, cispo and a masking correction each change the step (they are not dropped on the way to the kernel)."""
    policy, batch, old, ref, advantages = _rollout()
    rollout = torch.where(batch.response_mask, old + torch.linspace(-0.5, 0.5, old.shape[1]), 0.0)
    base_cfg = dict(rollout_logprobs=rollout, measure_rollout_corr=True)
    steps = {
        "vanilla": _step(policy, batch, old, ref, advantages, cfg=_cfg(), **base_cfg),
        "gspo": _step(policy, batch, old, ref, advantages, cfg=_cfg(policy_loss="gspo",
                                                                   loss_agg_mode="seq-mean-token-mean"), **base_cfg),
        "cispo": _step(policy, batch, old, ref, advantages, cfg=_cfg(policy_loss="cispo"), **base_cfg),
        "mask": _step(policy, batch, old, ref, advantages, cfg=_cfg(rollout_is="token", rollout_is_mode="mask",
                                                                   rollout_is_low=0.8, rollout_is_cap=1.2),
                      **base_cfg),
    }
    name = "model.layers.0.mlp.down_proj.weight"
    for mode in ("gspo", "cispo", "mask"):
        assert not torch.allclose(steps[mode][1][name], steps["vanilla"][1][name], rtol=0, atol=1e-7), mode
    assert 0 < steps["mask"][0]["rollout_corr/masked_frac"] < 1


@pytest.mark.parametrize("policy_loss", ["gspo", "cispo"])
@pytest.mark.parametrize("correction", [None, ("token", "truncate"), ("sequence", "mask")])
def test_policy_losses_and_corrections_do_not_depend_on_the_micro_batch_split(policy_loss, correction):
    policy, batch, old, ref, advantages = _rollout()
    rollout = torch.where(batch.response_mask, old + torch.linspace(-0.5, 0.5, old.shape[1]), 0.0)
    extra = {} if correction is None else dict(rollout_is=correction[0], rollout_is_mode=correction[1],
                                               rollout_is_low=0.8, rollout_is_cap=1.3)
    agg = "seq-mean-token-mean" if policy_loss == "gspo" else "token-mean"
    steps = [_step(policy, batch, old, ref, advantages, rollout_logprobs=rollout, measure_rollout_corr=True,
                   cfg=_cfg(policy_loss=policy_loss, loss_agg_mode=agg, micro_batch_size=mbs, **extra))
             for mbs in (5, 2, 1)]
    (full_metrics, full_params), rest = steps[0], steps[1:]
    for metrics, params in rest:
        for name, value in full_metrics.items():
            assert metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
        for name, p in full_params.items():
            torch.testing.assert_close(params[name], p, rtol=1e-5, atol=1e-6, msg=name)
