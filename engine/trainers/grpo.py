"""The GRPO trainer: ``train_step`` reads as its phases, rollout (the generator, on the policy's own weights) ->
rewards -> advantages and policy update -> metrics; the loop around it is ``BaseTrainer``'s."""

from __future__ import annotations

import copy
import time

import torch

from engine.algorithms import StepResult, compute_advantages, policy_update, reinforce_plus_plus_advantages
from engine.distributed.context import all_reduce_min, all_reduce_sum
from engine.rewards import load_reward, overlong_penalty, score_records
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
        examples, completions, totals, summary, sampling = self.sample_groups(step)
        t_gen = time.perf_counter() - t0
        bad_reward = nonfinite_reward_cause(summary.scores, summary.per_fn)
        t1 = time.perf_counter()
        if bad_reward is None:
            scores = torch.tensor(totals, dtype=torch.float32, device=self.device)
            result = self.update(examples, completions, scores)
        else:  # no advantage can be formed from an infinite reward: nothing to learn from this batch
            result = StepResult({"loss": float("nan"), "grad_norm": float("nan")}, stepped=False)
        t_update = time.perf_counter() - t1
        self.record_step_outcome(result.stepped, result.metrics, cause=bad_reward)
        return {**summary.metrics(), **self.group_metrics(summary.scores), **sampling, **result.metrics,
                "perf/tokens_per_sec": sum(summary.lengths) / max(t_gen + t_update, 1e-9),
                "perf/time/generate": t_gen, "perf/time/update": t_update}

    def rollout_groups(self, step: int, attempt: int = 0):
        """One rollout of ``grpo.prompts_per_step`` prompts (this rank's whole groups) and its rewards: ``(examples,
        completions, totals, per_fn)`` per sample, ``num_generations`` consecutive samples per prompt."""
        c = self.cfg.grpo
        prompts = self.local_part(self.next_examples(c.prompts_per_step))
        examples, completions = self.rollout.sample(prompts, step, first=self.dist.rank * len(prompts),
                                                    attempt=attempt)
        texts = [self.tokenizer.decode(t.token_ids, skip_special_tokens=True) for t in completions]
        totals, per_fn = score_records(self.reward_fns, c.reward_weights, [e.record for e in examples], texts)
        if c.overlong_buffer_len:  # DAPO's soft overlong punishment, a reward of its own
            per_fn["overlong"] = overlong_penalty([len(t.token_ids) for t in completions],
                                                  max_tokens=self.cfg.generation.max_tokens,
                                                  buffer_len=c.overlong_buffer_len,
                                                  penalty_factor=c.overlong_penalty_factor)
            totals = [r + p for r, p in zip(totals, per_fn["overlong"])]
        return examples, completions, totals, per_fn

    def sample_groups(self, step: int):
        """The step's groups: one rollout, or with ``grpo.dynamic_sampling`` (DAPO) rollouts of new prompts until
        ``prompts_per_step`` groups have rewards that differ (the others carry no advantage) or
        ``max_num_gen_batches`` rollouts were made. Returns ``(examples, completions, totals, summary, metrics)``:
        the samples to train on, with their total rewards; ``summary`` (``RolloutSummary``) covers every sample drawn
        this step, over all ranks, so ``reward`` is the policy's, not the kept groups'; ``metrics`` are the
        ``dynamic_sampling/*`` ones (none without dynamic sampling).

        Under ``torchrun`` each rank keeps its own informative groups; the stop decision reads every rank's count
        (the smallest), and each rank then trains on that many groups, so the ranks run the same micro-batches."""
        c = self.cfg.grpo
        if not c.dynamic_sampling:
            examples, completions, totals, per_fn = self.rollout_groups(step)
            return examples, completions, totals, RolloutSummary.gather(totals, completions, per_fn), {}
        G, want = c.num_generations, c.prompts_per_step // self.dist.world_size
        drawn: list = []  # every sample of the step: (example, completion, total, {fn: reward})
        kept: list = []  # the samples of informative groups
        attempts = 0
        while attempts < c.max_num_gen_batches:
            examples, completions, totals, per_fn = self.rollout_groups(step, attempt=attempts)
            attempts += 1
            rows = [(e, o, t, {n: v[i] for n, v in per_fn.items()})
                    for i, (e, o, t) in enumerate(zip(examples, completions, totals))]
            drawn += rows
            for g in range(0, len(rows), G):
                if len({r[2] for r in rows[g:g + G]}) > 1:
                    kept += rows[g:g + G]
            if all_reduce_min({"groups": len(kept) // G})["groups"] >= want:
                break
        n_groups = min(int(all_reduce_min({"groups": len(kept) // G})["groups"]), want)
        # no informative group at all: train on the last rollout (zero advantages; only a KL term can move)
        train = kept[:n_groups * G] if n_groups else drawn[-want * G:]
        summary = RolloutSummary.gather([r[2] for r in drawn], [r[1] for r in drawn],
                                        {n: [r[3][n] for r in drawn] for n in (drawn[0][3] if drawn else {})})
        totals_all = all_reduce_sum({"drawn": len(drawn) // G, "kept": len(kept) // G,
                                     "train": (n_groups if n_groups else want)})
        metrics = {"dynamic_sampling/num_gen_batches": float(attempts),
                   "dynamic_sampling/kept_ratio": totals_all["kept"] / max(totals_all["drawn"], 1),
                   "dynamic_sampling/groups": float(totals_all["train"])}
        return [r[0] for r in train], [r[1] for r in train], [r[2] for r in train], summary, metrics

    def update(self, examples: list, completions: list, scores: torch.Tensor) -> StepResult:
        """Advantages of ``scores`` (``grpo.adv_estimator``) and ``grpo.ppo_epochs`` policy steps on the rollout
        batch; the first pass is on-policy (it runs the rollout's weights and measures ``rollout_corr/*``), later
        ones reuse the rollout. With ``grpo.overlong_filtering`` the completions cut at ``max_tokens`` are masked out
        of the loss (they still counted in their group's advantages)."""
        cfg, c = self.cfg, self.cfg.grpo
        batch = self.rollout.batch(examples, completions, self.device)
        filtered = {}
        if c.overlong_filtering:
            truncated = torch.tensor([o.finish_reason == "length" for o in completions], device=self.device)
            batch.response_mask = batch.response_mask & ~truncated[:, None]
            counts = all_reduce_sum({"n": float(truncated.sum()), "of": float(len(completions))})
            filtered = {"completions/overlong_masked_ratio": counts["n"] / max(counts["of"], 1.0)}
        rollout_lp = self.rollout.rollout_logprobs(completions, batch)
        on_policy = c.ppo_epochs == 1 and not (c.adv_estimator == "reinforce_plus_plus" and c.kl_coef > 0)
        old_lp, ref_lp = self.rollout.old_and_ref_logprobs(
            batch, rollout_lp, self.ref_model, self.autocast, on_policy=on_policy,
            max_tokens_per_micro_batch=c.max_tokens_per_micro_batch)
        loss_cfg = c
        if c.adv_estimator == "reinforce_plus_plus":  # the KL is in the reward: the loss only reports it
            behaviour = rollout_lp if old_lp is None else old_lp
            advantages, _ = reinforce_plus_plus_advantages(scores, batch.response_mask, logprobs=behaviour,
                                                           ref_logprobs=ref_lp, kl_coef=c.kl_coef,
                                                           kl_estimator=c.kl_estimator, gamma=c.gamma)
            loss_cfg = c.model_copy(update={"kl_coef": 0.0})
        else:
            advantages = compute_advantages(scores, c.num_generations, estimator=c.adv_estimator,
                                            norm_by_std=c.norm_adv_by_std, unbiased_std=c.unbiased_std,
                                            epsilon=c.epsilon)
        corr = {}
        for epoch in range(c.ppo_epochs):
            result = policy_update(self.model, self.optimizer, batch, old_lp, advantages, ref_logprobs=ref_lp,
                                   cfg=loss_cfg, temperature=cfg.generation.temperature,
                                   max_grad_norm=cfg.optim.max_grad_norm, rollout_logprobs=rollout_lp,
                                   autocast_dtype=self.autocast, loss_scale_factor=cfg.generation.max_tokens,
                                   measure_rollout_corr=epoch == 0)
            corr = corr or {k: v for k, v in result.metrics.items() if k.startswith("rollout_corr/")}
            if not result.stepped:
                break
        result.metrics.update(corr)
        result.metrics.update(filtered)
        return result

    def group_metrics(self, scores: list[float]) -> dict[str, float]:
        """TRL's group statistics of the step's ``scores``: ``reward_std`` (the mean of the groups' reward stds) and
        ``frac_reward_zero_std`` (the fraction of groups whose rewards all agree: no advantage, nothing learnt)."""
        group_std = torch.tensor(scores, dtype=torch.float32).view(-1, self.cfg.grpo.num_generations).std(-1)
        return {"reward_std": group_std.mean().item(),
                "frac_reward_zero_std": (group_std == 0).float().mean().item()}
