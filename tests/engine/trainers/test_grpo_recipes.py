"""The RL recipes of the GRPO trainer end to end on the CPU (tiny Llama, the built-in arithmetic prompts, the
``reward_digits`` reward of ``test_trainer``): each policy loss (GSPO, CISPO), advantage estimator (RLOO,
REINFORCE++), rollout correction, DAPO's dynamic sampling and overlong shaping/filtering runs, logs only names of
the vocabulary, and its reward rises; dynamic sampling fills a step with informative groups, stops at its attempt
cap and trains on what it found."""

from __future__ import annotations

import math

import pytest
import torch

from engine.config import GRPORunConfig, load_config
from engine.runs.metrics import read_metrics
from engine.runs.vocabulary import known
from engine.trainers.grpo import GRPOTrainer
from tests.engine.trainers.test_trainer import GRPO

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPES = {
    "gspo": ["grpo.policy_loss=gspo", "grpo.clip_ratio_low=3e-4", "grpo.clip_ratio_high=4e-4", "grpo.ppo_epochs=2"],
    "cispo": ["grpo.policy_loss=cispo", "grpo.clip_ratio_low=1.0", "grpo.clip_ratio_high=0.28"],
    "rloo": ["grpo.adv_estimator=rloo"],
    "reinforce_plus_plus": ["grpo.adv_estimator=reinforce_plus_plus", "grpo.kl_coef=0.01", "grpo.kl_estimator=k1",
                            "grpo.gamma=0.99"],
    "dynamic_sampling": ["grpo.dynamic_sampling=true", "grpo.max_num_gen_batches=3"],
    "rollout_is_sequence_mask": ["grpo.rollout_is=sequence", "grpo.rollout_is_mode=mask",
                                 "grpo.rollout_is_low=0.5", "grpo.rollout_is_cap=2.0"],
    "rollout_is_token_truncate": ["grpo.rollout_is=token", "generation.top_k=20"],
    "overlong": ["grpo.overlong_buffer_len=4", "grpo.overlong_penalty_factor=0.1"],
    # packed updates, and packed old/reference forwards (the KL needs the reference, top-k the old log-probs)
    "packed": ["grpo.max_tokens_per_micro_batch=40", "grpo.kl_coef=0.01", "generation.top_k=20", "grpo.ppo_epochs=2"],
}


def trainer(run_dir, *overrides: str) -> GRPOTrainer:
    return GRPOTrainer(load_config(GRPORunConfig, None, [f"trainer.output_dir={run_dir}", *GRPO, *overrides]))


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_each_recipe_trains_and_its_reward_rises(tmp_path, recipe):
    steps = 10
    tr = trainer(tmp_path, f"trainer.max_steps={steps}", *RECIPES[recipe])
    tr.train()
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    unknown = {k for r in records for k in r if not known(k)}
    assert not unknown, unknown
    for r in records:
        assert r["skipped_steps"] == 0 and math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]), r
    rewards = [r["reward"] for r in records]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.1, rewards
    last = records[-1]
    if recipe.startswith("rollout_is"):
        assert last["rollout_corr/is_weight_mean"] > 0 and last["rollout_corr/is_weight_max"] >= 1e-3
        assert 0 <= last.get("rollout_corr/masked_frac", last.get("rollout_corr/truncated_frac")) <= 1
    if recipe == "dynamic_sampling":
        assert all(1 <= r["dynamic_sampling/num_gen_batches"] <= 3 for r in records)
        assert all(0 < r["dynamic_sampling/kept_ratio"] <= 1 for r in records)
    if recipe == "overlong":
        assert all(-0.1 - 1e-6 <= r["rewards/overlong/mean"] <= 0 for r in records)
        assert any(r["rewards/overlong/mean"] < 0 for r in records)  # a random policy rarely stops before 8 tokens
    if recipe == "reinforce_plus_plus":
        assert last["kl"] > 0  # the KL is in the reward; the loss still reports it


def test_overlong_filtering_masks_truncated_completions_out_of_the_loss(tmp_path, monkeypatch):
    import engine.trainers.grpo as grpo_module

    seen = []
    inner = grpo_module.policy_update

    def spy(policy, optimizer, batch, *args, **kwargs):
        seen.append(batch.response_mask.clone())
        return inner(policy, optimizer, batch, *args, **kwargs)

    monkeypatch.setattr(grpo_module, "policy_update", spy)
    tr = trainer(tmp_path, "trainer.max_steps=1", "grpo.overlong_filtering=true")
    completions_seen = []
    sample = tr.rollout.sample

    def keep(*args, **kwargs):
        out = sample(*args, **kwargs)
        completions_seen.extend(out[1])
        return out

    tr.rollout.sample = keep
    tr.train()
    truncated = torch.tensor([c.finish_reason == "length" for c in completions_seen])
    assert truncated.any()  # a random policy is cut at max_tokens often
    mask = seen[0]
    assert not mask[truncated].any()  # no token of a truncated completion reaches the loss
    lengths = torch.tensor([len(c.token_ids) for c in completions_seen])
    assert (mask[~truncated].sum(-1) == lengths[~truncated]).all()
    record = read_metrics(tmp_path)[-1]
    assert record["completions/overlong_masked_ratio"] == pytest.approx(truncated.float().mean().item())


# --------------------------------------------------------------------------------------------- dynamic sampling
PATTERN = {"informative_every": 2}  # group k of a rollout is informative when k % informative_every == 0
CALLS: list[int] = []  # completions scored per reward call (one call per rollout)


def reward_pattern(prompts, completions, **kwargs):
    """Groups of 4 consecutive completions: every ``informative_every``-th group gets rewards 0, 1, 2, 3 (an
    advantage), the others all 0 (uniform: dropped by dynamic sampling). ``informative_every=0``: all uniform."""
    CALLS.append(len(completions))
    every = PATTERN["informative_every"]
    return [float(i % 4) if every and (i // 4) % every == 0 else 0.0 for i in range(len(completions))]


def run_one_step(tmp_path, every: int, max_batches: int):
    PATTERN["informative_every"] = every
    CALLS.clear()
    tr = trainer(tmp_path, "trainer.max_steps=1", f"grpo.rewards=[{__name__}:reward_pattern]",
                 "grpo.dynamic_sampling=true", f"grpo.max_num_gen_batches={max_batches}")
    trained: list[torch.Tensor] = []
    inner = tr.update

    def spy(examples, completions, scores):
        trained.append(scores.clone())
        return inner(examples, completions, scores)

    tr.update = spy
    tr.train()
    return read_metrics(tmp_path)[-1], trained[0]


def test_dynamic_sampling_fills_the_step_with_informative_groups(tmp_path):
    # 4 prompts a rollout, half of their groups informative: two rollouts give the 4 groups of the step
    record, scores = run_one_step(tmp_path, every=2, max_batches=10)
    assert CALLS == [16, 16]
    assert record["dynamic_sampling/num_gen_batches"] == 2
    assert record["dynamic_sampling/kept_ratio"] == 0.5 and record["dynamic_sampling/groups"] == 4
    assert scores.shape == (16,) and (scores.view(4, 4).std(-1) > 0).all()  # only informative groups trained on
    assert record["frac_reward_zero_std"] == 0.5  # the rollout metrics cover every group drawn


def test_dynamic_sampling_stops_at_the_cap_and_trains_on_what_it_found(tmp_path):
    # one informative group in four: two rollouts (the cap) find 2 of the 4 groups wanted
    record, scores = run_one_step(tmp_path, every=4, max_batches=2)
    assert CALLS == [16, 16]
    assert record["dynamic_sampling/num_gen_batches"] == 2 and record["dynamic_sampling/groups"] == 2
    assert record["dynamic_sampling/kept_ratio"] == 0.25
    assert scores.shape == (8,) and (scores.view(2, 4).std(-1) > 0).all()


def test_dynamic_sampling_with_no_informative_group_trains_on_the_last_rollout(tmp_path):
    record, scores = run_one_step(tmp_path, every=0, max_batches=3)
    assert CALLS == [16, 16, 16] and record["dynamic_sampling/kept_ratio"] == 0.0
    assert scores.shape == (16,) and (scores == 0).all() and record["skipped_steps"] == 0


def test_packed_old_and_reference_log_probs_equal_the_padded_ones(tmp_path):
    tr = trainer(tmp_path, "trainer.max_steps=1", "grpo.kl_coef=0.01", "generation.top_k=20")
    examples, completions = tr.rollout.sample(tr.next_examples(4), step=0)
    batch = tr.rollout.batch(examples, completions, tr.device)
    rollout_lp = tr.rollout.rollout_logprobs(completions, batch)
    padded = tr.rollout.old_and_ref_logprobs(batch, rollout_lp, tr.ref_model, None)
    for budget in (9, 25, 1000):  # 9: every row alone (each is longer); 1000: one packed forward
        packed = tr.rollout.old_and_ref_logprobs(batch, rollout_lp, tr.ref_model, None,
                                                 max_tokens_per_micro_batch=budget)
        for a, b in zip(padded, packed):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
