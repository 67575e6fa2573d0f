"""The GRPO trainer: ``train_step`` reads as its phases, rollout (the generator, on the policy's own weights) ->
rewards -> advantages -> policy update -> metrics; the loop around it is ``BaseTrainer``'s."""

from __future__ import annotations

import copy
import time

import torch

from engine.algorithms import compute_advantages, make_batch, policy_update
from engine.algorithms.grpo import PolicyUpdateResult
from engine.algorithms.stats import nanmean
from engine.rewards import compute_rewards, load_reward
from engine.trainers.base import nonfinite_reward_cause
from engine.trainers.rollout import RolloutTrainer


class GRPOTrainer(RolloutTrainer):
    """GRPO with rule-based rewards on the policy's own rollouts (``cfg``: a ``GRPORunConfig``)."""

    kind = "grpo"
    algo = "grpo"

    def __init__(self, cfg, *, model=None, tokenizer=None):
        super().__init__(cfg, model=model, tokenizer=tokenizer)
        self.reward_fns = [load_reward(spec) for spec in cfg.grpo.rewards]

    def before_resume(self) -> None:
        # The reference is the initial policy: copied before a checkpoint overwrites the weights on resume.
        self.ref_model = None
        if self.cfg.grpo.kl_coef > 0:
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)

    def train_step(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        t0 = time.perf_counter()
        examples, completions = self.rollout(self.next_examples(cfg.grpo.prompts_per_step), step)
        t_gen = time.perf_counter() - t0

        texts = [self.tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in completions]
        columns = {k: [e.record.get(k) for e in examples] for k in examples[0].record if k != "prompt"}
        totals, per_fn = compute_rewards(self.reward_fns, cfg.grpo.reward_weights,
                                         [e.record["prompt"] for e in examples], texts, columns)
        scores = torch.tensor(totals, dtype=torch.float32, device=self.device)
        bad_reward = nonfinite_reward_cause(totals, per_fn)

        t1 = time.perf_counter()
        batch = make_batch([e.prompt_ids for e in examples], [c.token_ids for c in completions],
                           self.tokenizer.pad_token_id or 0, self.device)
        rollout_lp = self.rollout_logprobs(completions, batch)
        if bad_reward is None:
            advantages = compute_advantages(scores, cfg.grpo.num_generations, norm_by_std=cfg.grpo.norm_adv_by_std,
                                            unbiased_std=cfg.grpo.unbiased_std, epsilon=cfg.grpo.epsilon)
            old_lp, ref_lp = self.old_and_ref_logprobs(batch, rollout_lp)
            corr = {}
            for epoch in range(cfg.grpo.ppo_epochs):  # pass 1 is on-policy; later ones reuse the rollout (old_lp fixed)
                result = policy_update(self.model, self.optimizer, batch, old_lp, advantages, ref_logprobs=ref_lp,
                                       cfg=cfg.grpo, temperature=cfg.generation.temperature,
                                       max_grad_norm=cfg.optim.max_grad_norm, rollout_logprobs=rollout_lp,
                                       autocast_dtype=self.autocast, loss_scale_factor=cfg.generation.max_tokens,
                                       measure_rollout_corr=epoch == 0)  # pass 1 runs the rollout's weights
                corr = corr or {k: v for k, v in result.metrics.items() if k.startswith("rollout_corr/")}
                if not result.stepped:
                    break
            result.metrics.update(corr)
        else:  # no advantage can be formed from an infinite reward: nothing to learn from this batch
            old_lp = rollout_lp
            result = PolicyUpdateResult({"loss": float("nan"), "grad_norm": float("nan")}, stepped=False)
        t_update = time.perf_counter() - t1
        self.record_step_outcome(result.stepped, result.metrics, cause=bad_reward)

        lengths = torch.tensor([len(c.token_ids) for c in completions], dtype=torch.float32)
        group_std = scores.view(-1, cfg.grpo.num_generations).std(-1)
        metrics = {
            "reward": scores.mean().item(),
            "reward_std": group_std.mean().item(),  # as TRL: the mean of the groups' reward stds
            "frac_reward_zero_std": (group_std == 0).float().mean().item(),
            **{f"rewards/{name}/mean": nanmean(vals) for name, vals in per_fn.items()},
            "completions/mean_length": lengths.mean().item(),
            "completions/clipped_ratio": sum(c.finish_reason == "length" for c in completions) / len(completions),
            **result.metrics,
            "perf/tokens_per_sec": float(lengths.sum()) / max(t_gen + t_update, 1e-9),
            "perf/time/generate": t_gen,
            "perf/time/update": t_update,
        }
        return metrics
