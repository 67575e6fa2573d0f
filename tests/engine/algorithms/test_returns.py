"""REINFORCE++ advantages and the GRPO trainer's group estimators against float64 transcriptions of the anchors'
formulas (veRL ``compute_reinforce_plus_plus_outcome_advantage``, ``compute_rloo_outcome_advantage``): token rewards
with the KL in the reward, discounted returns restarted by the mask, whitening over the batch's response tokens; NaN
on padding changes nothing."""

from __future__ import annotations

import math

import pytest
import torch

from engine.algorithms import compute_advantages, reinforce_plus_plus_advantages


def reference_reinforce_pp(scores, mask, lp, ref, kl_coef, gamma):
    """Per row: r_t = -kl_coef * (lp_t - ref_t) (k1), plus the score at the last response token; returns
    R_t = r_t + gamma R_{t+1} over the response tokens; then (R - mean) / sqrt(var_unbiased + 1e-8) over all of
    them."""
    returns = []
    for b in range(len(scores)):
        idx = [t for t in range(mask.shape[1]) if mask[b, t]]
        r = {t: -kl_coef * (float(lp[b, t]) - float(ref[b, t])) for t in idx}
        if idx:
            r[idx[-1]] += float(scores[b])
        running, row = 0.0, {}
        for t in reversed(idx):
            running = r[t] + gamma * running
            row[t] = running
        returns.append(row)
    flat = [v for row in returns for v in row.values()]
    mean = sum(flat) / len(flat)
    var = sum((v - mean) ** 2 for v in flat) / (len(flat) - 1)
    out = torch.zeros(mask.shape, dtype=torch.float64)
    for b, row in enumerate(returns):
        for t, v in row.items():
            out[b, t] = (v - mean) / math.sqrt(var + 1e-8)
    return out


@pytest.mark.parametrize("B,T", [(2, 1), (4, 5), (7, 9)])
@pytest.mark.parametrize("gamma", [1.0, 0.9])
@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
def test_reinforce_plus_plus_matches_float64(B, T, gamma, kl_coef):
    g = torch.Generator().manual_seed(B * 100 + T)
    scores = torch.randn(B, generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    lp = -torch.rand(B, T, generator=g) * 2
    ref = lp + 0.3 * torch.randn(B, T, generator=g)
    want = reference_reinforce_pp(scores, mask, lp, ref, kl_coef, gamma)
    poisoned_lp, poisoned_ref = lp.masked_fill(~mask, float("nan")), ref.masked_fill(~mask, float("inf"))
    adv, kl = reinforce_plus_plus_advantages(scores, mask, logprobs=poisoned_lp, ref_logprobs=poisoned_ref,
                                             kl_coef=kl_coef, kl_estimator="k1", gamma=gamma)
    assert adv.dtype == torch.float32 and adv.shape == (B, T) and torch.isfinite(adv).all()
    torch.testing.assert_close(adv.double(), want, rtol=1e-5, atol=1e-5)
    assert (adv[~mask] == 0).all() and (kl[~mask] == 0).all()


def test_reinforce_plus_plus_needs_two_tokens():
    with pytest.raises(ValueError):
        reinforce_plus_plus_advantages(torch.ones(1), torch.ones(1, 1, dtype=torch.bool))


@pytest.mark.parametrize("G", [2, 3, 5])
def test_rloo_is_the_leave_one_out_baseline(G):
    scores = torch.randn(4 * G, generator=torch.Generator().manual_seed(G))
    got = compute_advantages(scores, G, estimator="rloo")
    groups = scores.double().view(4, G)
    want = torch.stack([groups[:, i] - (groups.sum(-1) - groups[:, i]) / (G - 1) for i in range(G)], -1)
    torch.testing.assert_close(got.double(), want.reshape(-1), rtol=1e-5, atol=1e-6)


def test_group_estimators_reject_reinforce_plus_plus():
    with pytest.raises(ValueError, match="estimator must be 'grpo' or 'rloo'"):
        compute_advantages(torch.ones(4), 2, estimator="reinforce_plus_plus")
