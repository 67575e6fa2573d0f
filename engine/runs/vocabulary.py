"""The engine's one metric vocabulary: every name a trainer writes to ``metrics.jsonl``, what it means, and the name
TRL and veRL give the same quantity (the README's "Metrics" table is generated from ``METRICS``).

The choice: TRL's names wherever TRL logs the quantity (users compare GRPO curves with TRL's first), veRL's for what
TRL has no name for (the critic, GAE statistics, the rollout/trainer mismatch), one name per meaning in every trainer.
A test runs every trainer and checks that each key it logs is ``known``.
"""

from __future__ import annotations

import re
from typing import NamedTuple


class Metric(NamedTuple):
    """One entry: ``name`` as logged (``<fn>`` stands for a reward function's name), its meaning and unit, the
    trainers that log it, and the TRL and veRL names of the same quantity ("" when the peer has none)."""

    name: str
    meaning: str
    trainers: str
    trl: str
    verl: str


METRICS: tuple[Metric, ...] = (
    # every trainer
    Metric("loss", "the step's loss (mean over its tokens or pairs, as the mode aggregates)", "all", "loss", ""),
    Metric("grad_norm", "gradient norm before clipping (the actor's in PPO)", "all", "grad_norm", "actor/grad_norm"),
    Metric("learning_rate", "the policy's learning rate at the step", "all", "learning_rate", "actor/lr"),
    Metric("skipped_steps", "optimizer steps skipped so far (non-finite loss, gradient or reward)", "all", "", ""),
    # rollouts
    Metric("reward", "mean total reward (score) of the step's completions", "grpo, ppo", "reward",
           "critic/score/mean"),
    Metric("reward_std", "mean over groups of the reward std within a group", "grpo", "reward_std", ""),
    Metric("frac_reward_zero_std", "fraction of groups whose rewards all agree (no advantage)", "grpo",
           "frac_reward_zero_std", ""),
    Metric("rewards/<fn>/mean", "mean reward of one reward function", "grpo, ppo", "rewards/<fn>/mean", ""),
    Metric("completions/mean_length", "mean completion length, tokens", "grpo, ppo", "completions/mean_length",
           "response_length/mean"),
    Metric("completions/clipped_ratio", "fraction of completions cut at generation.max_tokens", "grpo, ppo",
           "completions/clipped_ratio", "response_length/clip_ratio"),
    # the policy loss (GRPO and PPO's actor)
    Metric("pg_loss", "the clipped policy-gradient term of the loss", "grpo, ppo", "", "actor/pg_loss"),
    Metric("kl", "token-mean KL to the reference in the loss (kl_estimator)", "grpo, ppo", "kl", "actor/kl_loss"),
    Metric("entropy", "token-mean entropy of the policy on the completions, nats", "grpo, ppo", "entropy",
           "actor/entropy"),
    Metric("ppo_kl", "token-mean KL of the policy to the rollout's (old) policy", "grpo, ppo", "",
           "actor/ppo_kl"),
    Metric("clip_ratio/region_mean", "fraction of tokens whose ratio was clipped", "grpo, ppo",
           "clip_ratio/region_mean", "actor/pg_clipfrac"),
    Metric("clip_ratio/low_mean", "fraction clipped below 1 - clip_ratio_low (negative advantage)", "grpo, ppo",
           "clip_ratio/low_mean", "actor/pg_clipfrac_lower"),
    Metric("clip_ratio/high_mean", "fraction clipped above 1 + clip_ratio_high (positive advantage)", "grpo, ppo",
           "clip_ratio/high_mean", ""),
    Metric("rollout_corr/<stat>", "generator vs trainer log-probs of the sampled tokens: logp_diff_mean|max, kl, "
           "k3_kl, training_ppl, rollout_ppl, ppl_ratio; with grpo.rollout_is the weights' is_weight_mean|max and "
           "truncated_frac or masked_frac", "grpo, ppo", "sampling/sampling_logp_difference/*", "rollout_corr/*"),
    Metric("dynamic_sampling/num_gen_batches", "rollouts made this step to fill it with informative groups (DAPO)",
           "grpo", "", "train/num_gen_batches"),
    Metric("dynamic_sampling/kept_ratio", "fraction of the step's sampled groups whose rewards differ (kept)",
           "grpo", "", ""),
    Metric("dynamic_sampling/groups", "groups the step trained on (below grpo.prompts_per_step when the attempts ran "
           "out)", "grpo", "", ""),
    Metric("completions/overlong_masked_ratio", "fraction of completions cut at max_tokens and masked out of the "
           "loss (grpo.overlong_filtering)", "grpo", "", ""),
    # PPO
    Metric("objective/kl", "mean per-sequence KL to the reference (k1 summed over the response), nats", "ppo",
           "objective/kl", "actor/reward_kl_penalty"),
    Metric("kl_coef", "the KL coefficient of the step (adaptive controller)", "ppo", "",
           "actor/reward_kl_penalty_coeff"),
    Metric("critic/vf_loss", "the critic's clipped value loss", "ppo", "loss/value_avg", "critic/vf_loss"),
    Metric("critic/vf_clipfrac", "fraction of values clipped", "ppo", "val/clipfrac_avg", "critic/vf_clipfrac"),
    Metric("critic/vpred_mean", "token-mean predicted value", "ppo", "", "critic/vpred_mean"),
    Metric("critic/grad_norm", "the critic's gradient norm", "ppo", "", "critic/grad_norm"),
    Metric("critic/rewards/mean", "mean per-sequence sum of token rewards (score minus in-reward KL)", "ppo", "",
           "critic/rewards/mean"),
    Metric("critic/advantages/<stat>", "GAE advantages: token mean, max, min", "ppo", "", "critic/advantages/*"),
    Metric("critic/returns/mean", "token-mean GAE return", "ppo", "", "critic/returns/mean"),
    Metric("critic/values/mean", "token-mean value of the rollout's critic", "ppo", "", "critic/values/mean"),
    Metric("ppo/actor_stepped", "fraction of the mini-batch actor steps taken", "ppo", "", ""),
    Metric("ppo/critic_stepped", "fraction of the mini-batch critic steps taken", "ppo", "", ""),
    Metric("ppo/updates", "mini-batch steps run this iteration", "ppo", "", ""),
    # pairs
    Metric("accuracy", "fraction of pairs the reward model ranks right", "rm", "accuracy", ""),
    Metric("margin", "mean chosen - rejected reward", "rm", "margin", ""),
    Metric("rewards/chosen", "mean reward of the chosen responses (DPO: beta x log-ratio)", "rm, dpo",
           "rewards/chosen", ""),
    Metric("rewards/rejected", "mean reward of the rejected responses", "rm, dpo", "rewards/rejected", ""),
    Metric("rewards/accuracies", "fraction of pairs with the chosen reward above the rejected", "dpo",
           "rewards/accuracies", ""),
    Metric("rewards/margins", "mean chosen - rejected DPO reward", "dpo", "rewards/margins", ""),
    Metric("logps/chosen", "mean policy log-prob of the chosen responses, nats", "dpo", "logps/chosen", ""),
    Metric("logps/rejected", "mean policy log-prob of the rejected responses, nats", "dpo", "logps/rejected", ""),
    # held-out evaluation
    Metric("eval/accuracy", "held-out accuracy: task answers (sft, grpo, ppo with rule rewards) or pairs ranked "
           "right (rm)", "all but dpo", "eval_accuracy", "val-core/<source>/acc"),
    Metric("eval/<metric>", "other held-out metrics: format, mean_length, reward (ppo with a reward model), loss, "
           "margin, num_pairs, accuracy_ci_low|high, rewards/* (dpo)", "all", "eval_<metric>", "val-core/*"),
    # throughput
    Metric("perf/tokens_per_sec", "completion (or target) tokens per second of the step", "sft, grpo, ppo", "",
           "perf/throughput"),
    Metric("perf/pairs_per_sec", "preference pairs per second of the step", "rm, dpo", "", ""),
    Metric("perf/time/<phase>", "seconds in a phase of the step: generate, update", "grpo, ppo", "",
           "timing_s/<phase>"),
)


def _pattern(name: str) -> re.Pattern:
    return re.compile("^" + re.sub(r"<[a-z]+>", ".+", re.escape(name).replace(r"\<", "<").replace(r"\>", ">")) + "$")


_PATTERNS = tuple(_pattern(m.name) for m in METRICS)


def known(name: str) -> bool:
    """Whether ``name`` (a key of ``metrics.jsonl``; ``step`` and ``time`` are the record's own) is in the vocabulary."""
    return name in ("step", "time") or any(p.match(name) for p in _PATTERNS)


def markdown_table() -> str:
    """The vocabulary as the README's Markdown table (ours, meaning, trainers, TRL, veRL)."""
    cell = lambda s: f"`{s}`" if s else "-"
    rows = ["| ours | meaning | trainers | TRL | veRL |", "|---|---|---|---|---|"]
    rows += [f"| {cell(m.name)} | {m.meaning} | {m.trainers} | {cell(m.trl)} | {cell(m.verl)} |" for m in METRICS]
    return "\n".join(rows)
