"""The GRPO trainer: ``train_step`` reads as its phases, rollout (the generator, on the policy's own weights) ->
rewards -> advantages and policy update -> metrics; the loop around it is ``BaseTrainer``'s."""

from __future__ import annotations

import copy
import time

import torch

from engine.algorithms import StepResult, compute_advantages, policy_update
from engine.rewards import load_reward, score_records
from engine.trainers.base import BaseTrainer, nonfinite_reward_cause, policy_and_prompts
from engine.trainers.rollout import Rollout, RolloutSummary, check_prompts_per_step, check_sampling


class GRPOTrainer(BaseTrainer):
    """GRPO with rule-based rewards on the policy's own rollouts (``cfg``: a ``GRPORunConfig``). Parts: the prompts,
    the policy, its reference (the initial policy, when ``grpo.kl_coef > 0``), the rollout (a ``Generator`` on the
    policy's weights) and the reward functions."""

    def __init__(self, cfg, *, model=None, tokenizer=None):
        check_sampling(cfg.generation, "grpo")
        super().__init__(cfg)
        c = cfg.grpo
        with self.setting_up():
            model, tokenizer, self.train_examples, self.eval_examples = policy_and_prompts(cfg, self.device, model,
                                                                                           tokenizer)
            self.tokenizer = tokenizer
            check_prompts_per_step("grpo", c.prompts_per_step, self.train_examples)
            self.check_divides(**{"grpo.prompts_per_step": c.prompts_per_step})  # a group never straddles ranks
            # the reference is the initial policy: copied before a checkpoint overwrites the weights on resume
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False) if c.kl_coef > 0 else None
            if self.ref_model is not None:
                self.ref_model = self.shard(self.ref_model, offload=cfg.distributed.offload_reference)
            self.model = model = self.shard(model)
            self.rollout = Rollout(model, tokenizer, cfg.generation, num_generations=c.num_generations,
                                   seed=cfg.trainer.seed, rollout_is=c.rollout_is)
            self.generator, self.eval_max_tokens = self.rollout.generator, cfg.generation.max_tokens
            self.reward_fns = [load_reward(spec) for spec in c.rewards]
            self.start(total_steps=cfg.trainer.max_steps)

    def train_step(self, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        prompts = self.local_part(self.next_examples(self.cfg.grpo.prompts_per_step))  # this rank's whole groups
        examples, completions = self.rollout.sample(prompts, step, first=self.dist.rank * len(prompts))
        t_gen = time.perf_counter() - t0
        texts = [self.tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in completions]
        totals, per_fn = score_records(self.reward_fns, self.cfg.grpo.reward_weights, [e.record for e in examples],
                                       texts)
        summary = RolloutSummary.gather(totals, completions, per_fn)  # the whole step's, on every rank
        bad_reward = nonfinite_reward_cause(summary.scores, summary.per_fn)
        t1 = time.perf_counter()
        if bad_reward is None:
            scores = torch.tensor(totals, dtype=torch.float32, device=self.device)
            result = self.update(examples, completions, scores)
        else:  # no advantage can be formed from an infinite reward: nothing to learn from this batch
            result = StepResult({"loss": float("nan"), "grad_norm": float("nan")}, stepped=False)
        t_update = time.perf_counter() - t1
        self.record_step_outcome(result.stepped, result.metrics, cause=bad_reward)
        return {**summary.metrics(), **self.group_metrics(summary.scores), **result.metrics,
                "perf/tokens_per_sec": sum(summary.lengths) / max(t_gen + t_update, 1e-9),
                "perf/time/generate": t_gen, "perf/time/update": t_update}

    def update(self, examples: list, completions: list, scores: torch.Tensor) -> StepResult:
        """Group advantages of ``scores`` and ``grpo.ppo_epochs`` policy steps on the rollout batch; the first pass
        is on-policy (it runs the rollout's weights and measures ``rollout_corr/*``), later ones reuse the rollout."""
        cfg, c = self.cfg, self.cfg.grpo
        batch = self.rollout.batch(examples, completions, self.device)
        rollout_lp = self.rollout.rollout_logprobs(completions, batch)
        advantages = compute_advantages(scores, c.num_generations, norm_by_std=c.norm_adv_by_std,
                                        unbiased_std=c.unbiased_std, epsilon=c.epsilon)
        old_lp, ref_lp = self.rollout.old_and_ref_logprobs(batch, rollout_lp, self.ref_model, self.autocast)
        corr = {}
        for epoch in range(c.ppo_epochs):
            result = policy_update(self.model, self.optimizer, batch, old_lp, advantages, ref_logprobs=ref_lp, cfg=c,
                                   temperature=cfg.generation.temperature, max_grad_norm=cfg.optim.max_grad_norm,
                                   rollout_logprobs=rollout_lp, autocast_dtype=self.autocast,
                                   loss_scale_factor=cfg.generation.max_tokens, measure_rollout_corr=epoch == 0)
            corr = corr or {k: v for k, v in result.metrics.items() if k.startswith("rollout_corr/")}
            if not result.stepped:
                break
        result.metrics.update(corr)
        return result

    def group_metrics(self, scores: list[float]) -> dict[str, float]:
        """TRL's group statistics of the step's ``scores``: ``reward_std`` (the mean of the groups' reward stds) and
        ``frac_reward_zero_std`` (the fraction of groups whose rewards all agree: no advantage, nothing learnt)."""
        group_std = torch.tensor(scores, dtype=torch.float32).view(-1, self.cfg.grpo.num_generations).std(-1)
        return {"reward_std": group_std.mean().item(),
                "frac_reward_zero_std": (group_std == 0).float().mean().item()}
