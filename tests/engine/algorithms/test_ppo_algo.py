"""engine.algorithms.ppo: KL-in-reward token rewards, GAE wiring, KL controllers, the critic's values and update, and
a tiny PPO run with a scripted reward (CPU, small)."""

import copy
import math
import types

import pytest
import torch

from engine.algorithms.batching import make_batch, response_logprobs
from engine.algorithms.critic import critic_values
from engine.algorithms.policy import policy_update
from engine.algorithms.ppo import AdaptiveKLController, FixedKLController, gae_advantages, ppo_epochs
from engine.algorithms.returns import token_level_rewards
from engine.models import tiny_model
from engine.models.value_model import value_model_from_causal_lm

TINY = {"vocab_size": 32, "hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1,
        "intermediate_size": 64}


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**overrides):
    return types.SimpleNamespace(**{
        "ppo_epochs": 2, "mini_batch_size": 16, "micro_batch_size": 8, "clip_ratio_low": 0.2, "clip_ratio_high": 0.2,
        "loss_agg_mode": "token-mean", "kl_coef": 0.0, "kl_estimator": "k3", "rollout_is": None,
        "rollout_is_cap": 2.0, "cliprange_value": 0.2, **overrides})


def _assert_close(actual, expected, atol=1e-6, rtol=1e-5):
    err = (actual - expected).abs()
    worst = divmod(int(err.argmax()), actual.shape[-1]) if actual.dim() == 2 else int(err.argmax())
    assert torch.allclose(actual, expected, atol=atol, rtol=rtol), \
        f"max err {float(err.max()):.3g} at {worst}\nactual\n{actual}\nexpected\n{expected}"


# ------------------------------------------------------------------------------------------ token_level_rewards
def test_token_level_rewards_hand_computed():
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    lp = torch.tensor([[-1.0, -2.0, -0.5, -1.5], [-0.2, -3.0, -9.0, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, -1.0], [-0.7, -2.0, -1.0, -1.0]])
    scores = torch.tensor([2.0, -1.0])
    rewards, kl = token_level_rewards(scores, mask, logprobs=lp, ref_logprobs=ref, kl_coef=0.1, kl_estimator="k1")
    # k1 = lp - ref: row 0 [0.5, -1, 0, -0.5]; row 1 [0.5, -1, (pad), (pad)]
    expected_kl = torch.tensor([[0.5, -1.0, 0.0, -0.5], [0.5, -1.0, 0.0, 0.0]])
    expected = torch.tensor([[-0.05, 0.1, 0.0, 0.05 + 2.0], [-0.05, 0.1 - 1.0, 0.0, 0.0]])
    assert rewards.dtype == kl.dtype == torch.float32
    _assert_close(kl, expected_kl)
    _assert_close(rewards, expected)


def test_token_level_rewards_without_reference_and_empty_row():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 1]], dtype=torch.bool)  # an empty row; a hole inside row 2
    rewards, kl = token_level_rewards(torch.tensor([1.0, 5.0, 3.0]), mask)
    _assert_close(rewards, torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 3.0]]))
    assert torch.equal(kl, torch.zeros(3, 3))
    # kl_coef 0 with a reference: no KL, logprobs may be omitted
    rewards0, kl0 = token_level_rewards(torch.tensor([1.0, 5.0, 3.0]), mask, ref_logprobs=torch.zeros(3, 3))
    assert torch.equal(rewards0, rewards) and torch.equal(kl0, torch.zeros(3, 3))


@pytest.mark.parametrize("kwargs, name", [
    ({"scores": torch.zeros(3)}, "scores"),
    ({"logprobs": torch.zeros(2, 4), "ref_logprobs": torch.zeros(2, 3), "kl_coef": 0.1}, "ref_logprobs"),
    ({"logprobs": torch.zeros(2, 5), "ref_logprobs": torch.zeros(2, 4), "kl_coef": 0.1}, "logprobs"),
    ({"ref_logprobs": torch.zeros(2, 4), "kl_coef": 0.1}, "logprobs"),
])
def test_token_level_rewards_shape_errors(kwargs, name):
    args = {"scores": torch.zeros(2), "response_mask": torch.ones(2, 4, dtype=torch.bool), **kwargs}
    with pytest.raises(ValueError, match=f"^{name} "):
        token_level_rewards(args.pop("scores"), args.pop("response_mask"), **args)


# ----------------------------------------------------------------------------------------------- gae_advantages
def test_gae_whitening_wiring_hand_computed():
    """GAE/whitening wiring checked against a hand-computed case."""
    gamma, lam = 0.9, 0.8
    r = [[0.0, 0.5, 1.0], [0.2, -1.0, 7.0]]
    v = [[0.3, -0.2, 0.4], [1.0, 0.5, 9.0]]
    lengths = [3, 2]  # row 1's last token is padding (its reward and value must not leak in)
    adv = [[0.0] * 3 for _ in range(2)]
    ret = [[0.0] * 3 for _ in range(2)]
    for b in range(2):
        a_next = 0.0
        for t in reversed(range(lengths[b])):  # the textbook recursion, zero after the last response token
            v_next = v[b][t + 1] if t + 1 < lengths[b] else 0.0
            delta = r[b][t] + gamma * v_next - v[b][t]
            a_next = delta + gamma * lam * a_next
            adv[b][t] = a_next
            ret[b][t] = a_next + v[b][t]
    # spelled out for row 1: delta_1 = -1 - 0.5 = -1.5; A_1 = -1.5; delta_0 = 0.2 + 0.9*0.5 - 1 = -0.35;
    # A_0 = -0.35 + 0.72*(-1.5) = -1.43
    assert adv[1][:2] == pytest.approx([-1.43, -1.5])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    rt, vt = torch.tensor(r), torch.tensor(v)
    a, R = gae_advantages(rt, vt, mask, gamma=gamma, lam=lam, whiten=False)
    _assert_close(a, torch.tensor(adv))
    _assert_close(R, torch.tensor(ret))

    flat = [adv[b][t] for b in range(2) for t in range(lengths[b])]
    mean = sum(flat) / len(flat)
    var = sum((x - mean) ** 2 for x in flat) / (len(flat) - 1)
    white = [[(adv[b][t] - mean) / math.sqrt(var + 1e-8) if t < lengths[b] else 0.0 for t in range(3)]
             for b in range(2)]
    aw, Rw = gae_advantages(rt, vt, mask, gamma=gamma, lam=lam, whiten=True)
    _assert_close(aw, torch.tensor(white))
    _assert_close(Rw, torch.tensor(ret))  # returns are not whitened
    assert aw[1, 2] == 0 and Rw[1, 2] == 0


def test_gae_advantages_and_token_rewards_ignore_non_finite_padding():
    # NaN/inf on padded tokens (a -inf log-prob, a garbage value) reach no reward, advantage or return: all 0 there
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    lp = torch.tensor([[-1.0, -2.0, -0.5, -float("inf")], [-0.2, -3.0, float("nan"), 0.0], [float("nan")] * 4])
    ref = torch.tensor([[-1.5, -1.0, -0.5, -1.0], [-0.7, -2.0, -1.0, -1.0], [-1.0] * 4])
    rewards, kl = token_level_rewards(torch.tensor([1.0, -1.0, 3.0]), mask, logprobs=lp, ref_logprobs=ref,
                                      kl_coef=0.1, kl_estimator="k3")
    assert torch.isfinite(rewards).all() and torch.isfinite(kl).all()
    assert torch.all(rewards[~mask] == 0) and torch.all(kl[~mask] == 0)
    values = torch.tensor([[0.3, -0.2, 0.4, float("nan")], [1.0, 0.5, float("inf"), float("nan")], [float("nan")] * 4])
    clean = torch.where(mask, values, 0.0)
    for whiten in (False, True):
        adv, ret = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8, whiten=whiten)
        gold_adv, gold_ret = gae_advantages(rewards, clean, mask, gamma=0.9, lam=0.8, whiten=whiten)
        assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
        _assert_close(adv, gold_adv)
        _assert_close(ret, gold_ret)
        assert torch.all(adv[~mask] == 0) and torch.all(ret[~mask] == 0)


# --------------------------------------------------------------------------------------------- KL controllers
def test_adaptive_kl_controller():
    ctl = AdaptiveKLController(0.1, target_kl=6.0, horizon=10000)
    ctl.update(12.0, 256)  # error 1.0 clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))
    ctl = AdaptiveKLController(0.1, target_kl=6.0, horizon=10000)
    ctl.update(0.0, 256)  # error -1.0 clipped to -0.2
    assert ctl.value == pytest.approx(0.1 * (1 - 0.2 * 256 / 10000))
    ctl = AdaptiveKLController(0.1, target_kl=6.0, horizon=10000)
    ctl.update(6.6, 1000)  # error 0.1, inside the clip
    assert ctl.value == pytest.approx(0.1 * (1 + 0.1 * 1000 / 10000))

    other = AdaptiveKLController(0.5, target_kl=6.0, horizon=10000)
    other.load_state_dict(ctl.state_dict())
    assert other.state_dict() == {"value": ctl.value}
    with pytest.raises(ValueError, match="target_kl"):
        AdaptiveKLController(0.1, target_kl=0.0, horizon=10)


def test_fixed_kl_controller():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 1000)
    assert ctl.value == 0.05
    other = FixedKLController(0.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


# --------------------------------------------------------------------------------------------- ppo_epochs
EOS = 31  # odd: stopping early is not itself rewarded


@torch.no_grad()
def _sample(policy, prompts, max_tokens, generator):
    """Plain autoregressive sampling (softmax at temperature 1, recomputing the prefix each step); prompts of one
    length at a time so no padding enters the forward. A response ends at EOS (kept) or after max_tokens."""
    responses = [None] * len(prompts)
    for n in sorted({len(p) for p in prompts}):
        rows = [i for i, p in enumerate(prompts) if len(p) == n]
        ids = torch.tensor([prompts[i] for i in rows])
        for _ in range(max_tokens):
            logits = policy(input_ids=ids).logits[:, -1].float()
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
            ids = torch.cat([ids, nxt], 1)
        for j, i in enumerate(rows):
            out = ids[j, n:].tolist()
            responses[i] = out[:out.index(EOS) + 1] if EOS in out else out
    return responses


def test_ppo_with_scripted_reward_raises_the_reward():
    """PPO with a scripted reward raises the reward: reward = fraction of even token ids, KL-in-reward to a frozen
    copy (k1, 0.05), GAE + whitening, 2 epochs of 2 mini-batches per iteration."""
    torch.manual_seed(0)
    policy = tiny_model("llama", seed=0, **TINY).train()
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    critic = value_model_from_causal_lm(policy, seed=0)
    popt = torch.optim.Adam(policy.parameters(), lr=5e-3)
    copt = torch.optim.Adam(critic.parameters(), lr=5e-3)
    gen = torch.Generator().manual_seed(0)
    shuffle = torch.Generator().manual_seed(1)
    cfg = _cfg(mini_batch_size=16, micro_batch_size=8)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, EOS, (2 + i % 2,), generator=g).tolist() for i in range(32)]
    rewards, kls = [], []
    for _ in range(20):
        responses = _sample(policy, prompts, 8, gen)
        scores = torch.tensor([sum(t % 2 == 0 for t in r) / len(r) for r in responses])
        batch = make_batch(prompts, responses, pad_id=0, device="cpu")
        with torch.no_grad():
            old_lp = response_logprobs(policy, batch)
            ref_lp = response_logprobs(ref, batch)
            values = critic_values(critic, batch)
        token_r, kl = token_level_rewards(scores, batch.response_mask, logprobs=old_lp, ref_logprobs=ref_lp,
                                          kl_coef=0.05, kl_estimator="k1")
        adv, ret = gae_advantages(token_r, values, batch.response_mask, gamma=1.0, lam=0.95)
        metrics = ppo_epochs(policy, popt, critic, copt, batch, old_logprobs=old_lp, advantages=adv,
                             old_values=values, returns=ret, ref_logprobs=ref_lp, cfg=cfg, temperature=1.0,
                             max_grad_norm=1.0, generator=shuffle)
        assert metrics["ppo/updates"] == 4 and metrics["ppo/actor_stepped"] == metrics["ppo/critic_stepped"] == 1.0
        assert all(math.isfinite(v) for v in metrics.values()), metrics
        rewards.append(float(scores.mean()))
        kls.append(float(kl.sum() / batch.response_mask.sum()))
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.15, rewards
    assert all(math.isfinite(k) and abs(k) < 2.0 for k in kls), kls


def test_ppo_epochs_is_reproducible_and_stops_on_non_finite():
    policy = tiny_model("llama", seed=0, **TINY)
    critic = value_model_from_causal_lm(policy, seed=0)
    prompts = [[1, 2], [3, 4, 5], [6, 7], [8, 9, 10]]
    batch = make_batch(prompts, [[11, 12, 13], [14, 15], [16], [17, 18, 19, 20]], pad_id=0, device="cpu")
    with torch.no_grad():
        old_lp = response_logprobs(policy, batch)
        values = critic_values(critic, batch)
    adv = torch.randn(batch.labels.shape, generator=torch.Generator().manual_seed(0)) * batch.response_mask
    runs = []
    for _ in range(2):
        p, c = copy.deepcopy(policy), copy.deepcopy(critic)
        m = ppo_epochs(p, torch.optim.Adam(p.parameters(), lr=1e-3), c, torch.optim.Adam(c.parameters(), lr=1e-3),
                       batch, old_logprobs=old_lp, advantages=adv, old_values=values, returns=values + adv,
                       cfg=_cfg(mini_batch_size=2, micro_batch_size=1, loss_agg_mode="seq-mean-token-sum-norm"),
                       temperature=1.0, max_grad_norm=1.0, generator=torch.Generator().manual_seed(3),
                       loss_scale_factor=8)
        runs.append((m, [t.detach().clone() for t in p.parameters()]))
    assert runs[0][0] == runs[1][0] and runs[0][0]["ppo/updates"] == 4
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))

    bad = adv.clone()
    bad[0, 0] = float("nan")  # mini-batch containing row 0 is skipped, and the epochs stop there
    m = ppo_epochs(policy, torch.optim.Adam(policy.parameters(), lr=1e-3), critic,
                   torch.optim.Adam(critic.parameters(), lr=1e-3), batch, old_logprobs=old_lp, advantages=bad,
                   old_values=values, returns=values + adv, cfg=_cfg(mini_batch_size=2, micro_batch_size=1),
                   temperature=1.0, max_grad_norm=1.0, generator=torch.Generator().manual_seed(3))
    assert m["ppo/actor_stepped"] < 1.0 and m["ppo/updates"] <= 2


def _tiny_rollout():
    policy = tiny_model("llama", seed=0, **TINY)
    critic = value_model_from_causal_lm(policy, seed=0)
    batch = make_batch([[1, 2], [3, 4, 5], [6, 7]], [[11, 12, 13], [14, 15], [16]], pad_id=0, device="cpu")
    with torch.no_grad():
        old_lp = response_logprobs(policy, batch)
        values = critic_values(critic, batch)
    return policy, critic, batch, old_lp, values


def test_critic_warmup_steps_the_critic_alone():
    policy, critic, batch, old_lp, values = _tiny_rollout()
    actor_before = [t.detach().clone() for t in policy.parameters()]
    critic_before = [t.detach().clone() for t in critic.parameters()]
    adv = torch.randn(batch.labels.shape, generator=torch.Generator().manual_seed(0)) * batch.response_mask
    m = ppo_epochs(policy, torch.optim.Adam(policy.parameters(), lr=1e-2), critic,
                   torch.optim.Adam(critic.parameters(), lr=1e-2), batch, old_logprobs=old_lp, advantages=adv,
                   old_values=values, returns=values + 1.0, cfg=_cfg(mini_batch_size=3, micro_batch_size=3),
                   temperature=1.0, max_grad_norm=1.0, update_actor=False)
    assert all(torch.equal(a, b) for a, b in zip(actor_before, policy.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(critic_before, critic.parameters()))
    assert math.isnan(m["pg_loss"]) and m["ppo/critic_stepped"] == 1.0


def test_entropy_bonus_is_minus_coef_times_the_aggregated_entropy_and_raises_it():
    # zero advantages and no KL: the loss is the entropy term alone, -coef * token-mean entropy, and one step up that
    # gradient raises the entropy of the same tokens
    policy, _, batch, old_lp, _ = _tiny_rollout()
    zero = torch.zeros(batch.labels.shape)
    with torch.no_grad():
        _, ent = response_logprobs(policy, batch, return_entropy=True)
    mask = batch.response_mask.float()
    mean_ent = float((ent * mask).sum() / mask.sum())
    result = policy_update(policy, torch.optim.SGD(policy.parameters(), lr=1.0), batch, old_lp, zero,
                           ref_logprobs=None, cfg=_cfg(micro_batch_size=3, entropy_coef=0.5), temperature=1.0,
                           max_grad_norm=100.0)
    assert result.stepped
    assert result.metrics["loss"] == pytest.approx(-0.5 * mean_ent, rel=1e-5)
    with torch.no_grad():
        _, ent_after = response_logprobs(policy, batch, return_entropy=True)
    assert float((ent_after * mask).sum() / mask.sum()) > mean_ent
