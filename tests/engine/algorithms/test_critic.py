"""The critic's values and its accumulated value-loss step (engine.algorithms.critic)."""

import copy
import math

import pytest
import torch

from engine.algorithms.batching import make_batch
from engine.algorithms.critic import critic_update, critic_values
from engine.models import tiny_model
from engine.models.value_model import token_values, value_model_from_causal_lm
from kernels.loss_agg import LOSS_AGG_MODES

TINY = {"vocab_size": 32, "hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1,
        "intermediate_size": 64}

pytestmark = pytest.mark.usefixtures("one_thread")


def _assert_close(actual, expected, atol=1e-6, rtol=1e-5):
    err = (actual - expected).abs()
    assert torch.allclose(actual, expected, atol=atol, rtol=rtol), f"max err {float(err.max()):.3g}"


def _critic_and_batch(seed=0, empty_row=False):
    policy = tiny_model("llama", seed=seed, **TINY)
    critic = value_model_from_causal_lm(policy, seed=seed)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8], [9]]
    responses = [[10, 11, 12, 13], [14], [15, 16, 17], [18, 19]]
    if empty_row:  # an empty completion in the middle: a fully masked row
        prompts.insert(2, [20, 21])
        responses.insert(2, [])
    batch = make_batch(prompts, responses, pad_id=0, device="cpu")
    return critic, batch


def test_critic_values_gather_response_states():
    critic, batch = _critic_and_batch()
    vals = critic_values(critic, batch)
    full = token_values(critic, batch.input_ids, batch.attention_mask)
    assert vals.shape == batch.labels.shape and vals.dtype == torch.float32
    for b in range(batch.labels.shape[0]):
        for t in range(batch.labels.shape[1]):
            if batch.response_mask[b, t]:
                assert vals[b, t] == full[b, batch.response_index[b, t]]
            else:
                assert vals[b, t] == 0
    vals.sum().backward()
    assert critic.score.weight.grad is not None and critic.score.weight.grad.abs().sum() > 0


def _targets(batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    m = batch.response_mask
    return torch.randn(m.shape, generator=g) * m, torch.randn(m.shape, generator=g) * m  # old_values, returns


@pytest.mark.parametrize("loss_agg_mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("empty_row", [False, True])
def test_critic_update_micro_batch_invariance(loss_agg_mode, empty_row):
    critic, batch = _critic_and_batch(empty_row=empty_row)
    old_values, returns = _targets(batch)
    params = {}
    for mbs in (1, 4):
        c = copy.deepcopy(critic)
        opt = torch.optim.SGD(c.parameters(), lr=0.5)
        res = critic_update(c, opt, batch, old_values, returns, cliprange_value=0.5, loss_agg_mode=loss_agg_mode,
                            micro_batch_size=mbs, max_grad_norm=1e9)
        assert res.stepped and all(math.isfinite(v) for v in res.metrics.values()), res.metrics
        params[mbs] = (res.metrics, {k: p.detach().clone() for k, p in c.named_parameters()})
    for name, p in params[4][1].items():
        _assert_close(params[1][1][name], p, atol=1e-6, rtol=1e-4)
    before = dict(critic.named_parameters())
    assert any(not torch.equal(before[k], p) for k, p in params[4][1].items())  # the step did something
    for key in params[4][0]:
        assert params[1][0][key] == pytest.approx(params[4][0][key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("loss_agg_mode", LOSS_AGG_MODES)
def test_critic_update_fully_masked_row_changes_nothing(loss_agg_mode):
    # the seq-mean modes count only rows with a response token (veRL agg_loss / OpenRLHF): adding an empty completion
    # (whose padded targets are garbage) changes neither the loss nor the step
    critic, batch = _critic_and_batch(empty_row=True)
    old_values, returns = _targets(batch)
    old_values[2], returns[2] = float("nan"), float("inf")  # the fully masked row's targets never reach the loss
    keep = torch.tensor([0, 1, 3, 4])
    results = []
    for b, ov, ret in ((batch, old_values, returns), (batch.rows(keep), old_values[keep], returns[keep])):
        c = copy.deepcopy(critic)
        res = critic_update(c, torch.optim.SGD(c.parameters(), lr=0.5), b, ov, ret, cliprange_value=0.5,
                            loss_agg_mode=loss_agg_mode, micro_batch_size=2, max_grad_norm=1e9)
        assert res.stepped
        results.append((res.metrics, {k: p.detach().clone() for k, p in c.named_parameters()}))
    (with_empty, p_with), (without, p_without) = results
    for key, value in without.items():
        assert with_empty[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    for name, p in p_without.items():
        _assert_close(p_with[name], p, atol=1e-6, rtol=1e-4)


def test_critic_update_loss_scale_factor():
    # seq-mean-token-sum-norm divides by loss_scale_factor (default: the batch's T = 4): doubling it halves the loss
    critic, batch = _critic_and_batch()
    old_values, returns = _targets(batch)
    losses = []
    for factor in (None, 8):
        c = copy.deepcopy(critic)
        res = critic_update(c, torch.optim.SGD(c.parameters(), lr=0.0), batch, old_values, returns,
                            cliprange_value=0.5, loss_agg_mode="seq-mean-token-sum-norm", micro_batch_size=2,
                            max_grad_norm=1e9, loss_scale_factor=factor)
        losses.append(res.metrics["critic/vf_loss"])
    assert losses[1] == pytest.approx(losses[0] / 2, rel=1e-5)


def test_critic_update_non_finite_returns_skip_the_step():
    critic, batch = _critic_and_batch()
    old_values, returns = _targets(batch)
    returns[2, 1] = float("nan")
    opt = torch.optim.SGD(critic.parameters(), lr=0.5)
    before = {k: p.detach().clone() for k, p in critic.named_parameters()}
    res = critic_update(critic, opt, batch, old_values, returns, cliprange_value=0.5, loss_agg_mode="token-mean",
                        micro_batch_size=1, max_grad_norm=1.0)
    assert not res.stepped
    assert all(torch.equal(before[k], p) for k, p in critic.named_parameters())
    assert all(p.grad is None for p in critic.parameters())


def test_critic_update_value_loss_decreases():
    critic, batch = _critic_and_batch()
    _, returns = _targets(batch)
    opt = torch.optim.Adam(critic.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        with torch.no_grad():
            old_values = critic_values(critic, batch)
        res = critic_update(critic, opt, batch, old_values, returns, cliprange_value=0.2, loss_agg_mode="token-mean",
                            micro_batch_size=2, max_grad_norm=1.0)
        assert res.stepped
        losses.append(res.metrics["critic/vf_loss"])
    assert losses[-1] < 0.5 * losses[0], losses


