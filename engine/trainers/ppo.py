"""Classic RLHF with PPO (Ouyang et al. 2022, InstructGPT): ``PPOTrainer.train_step`` reads as its phases:

    rollout (the Generator, on the actor's weights) -> scores (frozen reward model, or rule rewards)
    -> token rewards (score at the last token minus kl_coef * KL to the reference) -> values (critic) -> GAE
    -> ppo_epochs x mini-batches of clipped policy and value updates -> KL controller -> metrics

The reference is the initial policy (copied before a checkpoint is loaded). The critic starts from the reward model
(InstructGPT, OpenRLHF) when it shares the policy's vocabulary, else from the policy's body with a fresh value head;
it has its own AdamW (``ppo.critic_lr``) and is checkpointed under ``critic/`` beside the actor. Metrics: the
engine's vocabulary (README, "Metrics"): the actor's under TRL's names (``pg_loss``, ``clip_ratio/region_mean``,
``ppo_kl``, ``entropy``, ``grad_norm``), the critic's and the advantages' under veRL's (``critic/vf_loss``,
``critic/advantages/mean``, ...), ``reward`` (the mean score) and ``objective/kl`` (TRL PPO's mean per-sequence KL to
the reference, nats).
"""

from __future__ import annotations

import copy
import logging
import time

import torch

from engine.algorithms import (
    AdaptiveKLController,
    FixedKLController,
    critic_values,
    gae_advantages,
    mixed_precision,
    ppo_epochs,
    token_level_rewards,
)
from engine.algorithms.optim import make_optimizer, make_scheduler
from engine.distributed import all_reduce_max, all_reduce_sum
from engine.models.loading import require_local_dir, resolve_model_dir
from engine.models.value_model import (
    load_reward_model,
    load_value_model,
    sequence_scores,
    value_model_from_causal_lm,
)
from engine.rewards import load_reward, score_records
from engine.trainers.base import BaseTrainer, nonfinite_reward_cause, policy_and_prompts, skip_cause
from engine.trainers.rollout import Rollout, RolloutSummary, check_prompts_per_step, check_sampling

log = logging.getLogger("rlhf_engine")


def _same_vocab(a, b) -> bool:
    return a is b or (len(a) == len(b) and a.get_vocab() == b.get_vocab())


def _pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, attention_mask)`` ``[B, L]`` int64."""
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids.to(device), mask.to(device)


def build_critic(ppo, policy, reward_model, same_vocab: bool, *, device, seed: int):
    """PPO's critic, in train mode: ``ppo.critic_path`` when given; else a copy of the reward model when it shares
    the policy's vocabulary (InstructGPT, OpenRLHF); else the policy's body with a fresh value head (a warning says
    why)."""
    dtype = next(policy.parameters()).dtype
    if ppo.critic_path:
        return load_value_model(resolve_model_dir(ppo.critic_path), dtype=dtype, device=device).train()
    if reward_model is not None and same_vocab:
        return copy.deepcopy(reward_model).requires_grad_(True).train()
    if reward_model is not None:
        log.warning("the reward model's tokenizer differs from the policy's: the critic starts from the "
                    "policy's body with a fresh value head")
    return value_model_from_causal_lm(policy, seed=seed)


class PPOTrainer(BaseTrainer):
    """PPO with a critic and GAE against a frozen reward model or rule rewards (``cfg``: a ``PPORunConfig``). Parts:
    the prompts, the actor, its reference (when ``ppo.kl_coef > 0`` or the KL adapts), the reward model (or reward
    functions), the critic with its optimizer, the rollout and the KL controller."""

    def __init__(self, cfg, *, model=None, tokenizer=None):
        p = cfg.ppo
        check_sampling(cfg.generation, "ppo")
        for name in ("reward_model", "critic_path"):  # a missing directory fails now, naming the setting
            if getattr(p, name):
                require_local_dir(getattr(p, name), f"ppo.{name}")
        super().__init__(cfg)
        with self.setting_up():
            # each rank takes whole groups, and an equal share of every mini-batch
            self.check_divides(**{"ppo.prompts_per_step": p.prompts_per_step, "ppo.mini_batch_size": p.mini_batch_size})
            model, tokenizer, self.train_examples, self.eval_examples = policy_and_prompts(cfg, self.device, model,
                                                                                           tokenizer)
            self.tokenizer = tokenizer
            check_prompts_per_step("ppo", p.prompts_per_step, self.train_examples)
            # the reference is the initial policy: copied before a checkpoint overwrites the weights on resume
            self.ref_model = (copy.deepcopy(model).eval().requires_grad_(False) if p.kl_coef > 0 or p.adaptive_kl
                              else None)
            self.reward_model = self.rm_tokenizer = None
            self.rm_same_vocab = False
            if p.reward_model:
                dtype = next(model.parameters()).dtype
                self.reward_model, self.rm_tokenizer = load_reward_model(p.reward_model, self.device, dtype)
                self.rm_same_vocab = _same_vocab(self.rm_tokenizer, tokenizer)
            self.reward_fns = [load_reward(spec) for spec in p.rewards]
            self.critic = build_critic(p, model, self.reward_model, self.rm_same_vocab, device=self.device,
                                       seed=cfg.trainer.seed)
            # under torchrun every model is sharded once all are built (the critic copies a whole body first)
            self.model = model = self.shard(model)
            self.critic = self.shard(self.critic)
            if self.ref_model is not None:
                self.ref_model = self.shard(self.ref_model, offload=cfg.distributed.offload_reference)
            if self.reward_model is not None:
                self.reward_model = self.shard(self.reward_model)
            critic_optim = cfg.optim.model_copy(update={"lr": p.critic_lr})
            self.critic_optimizer = make_optimizer(self.critic, critic_optim)
            self.critic_scheduler = make_scheduler(self.critic_optimizer, critic_optim, cfg.trainer.max_steps)
            self.rollout = Rollout(model, tokenizer, cfg.generation, num_generations=p.num_generations,
                                   seed=cfg.trainer.seed, rollout_is=p.rollout_is)
            self.generator, self.eval_max_tokens = self.rollout.generator, cfg.generation.max_tokens
            self.start(total_steps=cfg.trainer.max_steps, state={"kl_coef": p.kl_coef},
                       components={"critic": {"model": self.critic, "optimizer": self.critic_optimizer,
                                              "scheduler": self.critic_scheduler}})
            kl_value = self.state["kl_coef"]  # a resumed run continues the adapted coefficient
            self.kl_ctl = (AdaptiveKLController(kl_value, p.target_kl, p.kl_horizon) if p.adaptive_kl
                           else FixedKLController(kl_value))

    # ------------------------------------------------------------------------------------------------ phases
    @torch.no_grad()
    def score(self, examples: list, completions: list) -> tuple[torch.Tensor, dict]:
        """``([B] float32 scores on the device, per_fn)``: the reward model's scores, or the rule rewards' total (then
        ``per_fn`` is ``{name: [reward | None]}``, else empty), then the EOS penalty and the clip."""
        p = self.cfg.ppo
        per_fn: dict = {}
        if self.reward_model is not None:
            if self.rm_same_vocab:
                rows = [e.prompt_ids + list(c.token_ids) for e, c in zip(examples, completions)]
            else:  # another tokenizer: score the text, with the reward model's EOS when the completion stopped
                eos = [self.rm_tokenizer.eos_token_id] if self.rm_tokenizer.eos_token_id is not None else []
                rows = [self.rm_tokenizer.encode(e.prompt_text + self.tokenizer.decode(c.token_ids,
                                                 skip_special_tokens=True), add_special_tokens=False)
                        + (eos if c.finish_reason == "stop" else []) for e, c in zip(examples, completions)]
            pad = self.rm_tokenizer.pad_token_id or 0
            chunks = []
            for s in range(0, len(rows), 64):
                ids, mask = _pad(rows[s:s + 64], pad, self.device)
                with mixed_precision(self.device.type, self.autocast):
                    chunks.append(sequence_scores(self.reward_model, ids, mask).float())
            scores = torch.cat(chunks)
        else:
            texts = [self.tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in completions]
            totals, per_fn = score_records(self.reward_fns, p.reward_weights, [e.record for e in examples], texts)
            scores = torch.tensor(totals, dtype=torch.float32, device=self.device)
        if p.missing_eos_penalty is not None:
            truncated = torch.tensor([c.finish_reason == "length" for c in completions], device=self.device)
            scores = scores - p.missing_eos_penalty * truncated.float()
        if p.reward_clip is not None:
            scores = scores.clamp(-p.reward_clip, p.reward_clip)
        return scores, per_fn

    def train_step(self, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        prompts = self.local_part(self.next_examples(self.cfg.ppo.prompts_per_step))
        examples, completions = self.rollout.sample(prompts, step, first=self.dist.rank * len(prompts))
        t_gen = time.perf_counter() - t0
        scores, per_fn = self.score(examples, completions)
        summary = RolloutSummary.gather(scores.tolist(), completions, per_fn)  # the whole step's, on every rank
        metrics = summary.metrics()
        bad_reward = nonfinite_reward_cause(summary.scores)
        if bad_reward is not None:  # no advantage can be formed from it: skip the update, name the source
            source = "the reward model" if self.reward_model is not None else "the reward functions"
            self.record_step_outcome(False, {}, cause=f"{bad_reward}, from {source}")
            return {**metrics, "loss": float("nan"), "perf/time/generate": t_gen}
        t1 = time.perf_counter()
        batch = self.rollout.batch(examples, completions, self.device)
        rollout_lp = self.rollout.rollout_logprobs(completions, batch)
        old_lp, ref_lp = self.rollout.old_and_ref_logprobs(
            batch, rollout_lp, self.ref_model, self.autocast,
            max_tokens_per_micro_batch=self.cfg.ppo.max_tokens_per_micro_batch)
        kl_coef = self.kl_ctl.value
        advantages, returns, values, token_rewards = self.advantages(batch, scores, old_lp, ref_lp, kl_coef)
        update = self.update(step, batch, old_lp, ref_lp, rollout_lp, advantages, returns, values, kl_coef)
        t_update = time.perf_counter() - t1
        kl_seq = self.update_kl_controller(batch, old_lp, ref_lp)
        n_tokens = sum(summary.lengths)
        return {**metrics, "objective/kl": kl_seq, "kl_coef": kl_coef,
                **advantage_metrics(batch.response_mask, token_rewards, advantages, returns, values), **update,
                "perf/tokens_per_sec": n_tokens / max(t_gen + t_update, 1e-9),
                "perf/time/generate": t_gen, "perf/time/update": t_update}

    def advantages(self, batch, scores, old_lp, ref_lp, kl_coef: float):
        """``(advantages, returns, values, token_rewards)`` ``[B, T]``: the critic's values of the rollout, the
        scores as token rewards (minus ``kl_coef`` x the KL to the reference unless the KL is a loss term), GAE."""
        p = self.cfg.ppo
        mask = batch.response_mask
        with torch.no_grad(), mixed_precision(self.device.type, self.autocast):
            values = critic_values(self.critic, batch).float() * mask
        token_rewards, _ = token_level_rewards(scores, mask, logprobs=old_lp, ref_logprobs=ref_lp,
                                               kl_coef=0.0 if p.use_kl_loss else kl_coef,
                                               kl_estimator=p.kl_estimator)
        advantages, returns = gae_advantages(token_rewards, values, mask, gamma=p.gamma, lam=p.lam,
                                             whiten=p.whiten_advantages)
        return advantages, returns, values, token_rewards

    def update(self, step: int, batch, old_lp, ref_lp, rollout_lp, advantages, returns, values, kl_coef: float
               ) -> dict[str, float]:
        """``ppo.ppo_epochs`` passes of actor and critic steps over shuffled mini-batches (the actor waits for
        ``ppo.critic_warmup_steps``); records the step's outcome, naming the model whose step was skipped."""
        cfg, p = self.cfg, self.cfg.ppo
        # the KL is in the reward already, unless it is a loss term
        # each rank steps on its share of every mini-batch (the losses carry the global mini-batch's denominators)
        update_cfg = p.model_copy(update={"kl_coef": kl_coef if p.use_kl_loss else 0.0,
                                          "mini_batch_size": p.mini_batch_size // self.dist.world_size})
        shuffle = torch.Generator().manual_seed(cfg.trainer.seed * 1_000_003 + step)
        update = ppo_epochs(self.model, self.optimizer, self.critic, self.critic_optimizer, batch,
                            old_logprobs=old_lp, advantages=advantages, old_values=values, returns=returns,
                            ref_logprobs=ref_lp if p.use_kl_loss else None, cfg=update_cfg,
                            temperature=cfg.generation.temperature, max_grad_norm=cfg.optim.max_grad_norm,
                            rollout_logprobs=rollout_lp, autocast_dtype=self.autocast, generator=shuffle,
                            update_actor=step >= p.critic_warmup_steps, loss_scale_factor=cfg.generation.max_tokens)
        actor_ok = step < p.critic_warmup_steps or update["ppo/actor_stepped"] == 1.0
        stepped = actor_ok and update["ppo/critic_stepped"] == 1.0
        if stepped:
            self.critic_scheduler.step()
        cause = None
        if not stepped:  # name the model whose step was skipped
            if not actor_ok:
                cause = "actor: " + skip_cause({"loss": update.get("pg_loss"), "grad_norm": update.get("grad_norm")})
            else:
                cause = "critic: " + skip_cause({"loss": update.get("critic/vf_loss"),
                                                 "grad_norm": update.get("critic/grad_norm")})
        self.record_step_outcome(stepped, {"loss": update.get("pg_loss"), "grad_norm": update.get("grad_norm")},
                                 cause=cause)
        return update

    def update_kl_controller(self, batch, old_lp, ref_lp) -> float:
        """The mean per-sequence KL to the reference (k1 summed over the response, nats; 0 without a reference), fed
        to the KL controller, whose new coefficient is kept in the trainer state (checkpointed)."""
        mask = batch.response_mask
        local = ((old_lp - ref_lp) * mask).sum().item() if ref_lp is not None else 0.0
        total = all_reduce_sum({"kl": local, "seqs": mask.shape[0]})  # over every rank's sequences
        kl_seq = total["kl"] / total["seqs"]
        self.kl_ctl.update(kl_seq, int(total["seqs"]))
        self.state["kl_coef"] = self.kl_ctl.value
        return kl_seq

    def evaluate(self) -> dict[str, float]:
        """With a reward model: the mean score of sampled completions of the held-out prompts (``eval/reward``, at
        the rollout temperature, one sample each, fixed seeds) and their length. Rule rewards: accuracy/format."""
        if not self.eval_examples:
            return {}
        if self.reward_model is None:
            return super().evaluate()
        examples, completions = self.rollout.sample(self.eval_examples, 10**6)  # seeds apart from the training steps
        examples, completions = examples[::self.cfg.ppo.num_generations], completions[::self.cfg.ppo.num_generations]
        scores, _ = self.score(examples, completions)
        return {"eval/reward": scores.mean().item(),
                "eval/mean_length": sum(len(c.token_ids) for c in completions) / len(completions)}


__all__ = ["PPOTrainer", "build_critic"]

def advantage_metrics(mask, token_rewards, advantages, returns, values) -> dict[str, float]:
    """veRL's statistics of the rollout batch's token rewards (summed per sequence, then averaged), advantages (token
    mean, max, min), returns and values (token means), over every rank's rows."""
    sums = all_reduce_sum({"tokens": mask.sum().item(), "seqs": mask.shape[0],
                           "rewards": (token_rewards * mask).sum().item(), "advantages": (advantages * mask).sum().item(),
                           "returns": (returns * mask).sum().item(), "values": (values * mask).sum().item()})
    extremes = all_reduce_max({"max": advantages.masked_fill(~mask, float("-inf")).max().item(),
                               "neg_min": -advantages.masked_fill(~mask, float("inf")).min().item()})
    tokens = max(sums["tokens"], 1)
    return {"critic/rewards/mean": sums["rewards"] / sums["seqs"],
            "critic/advantages/mean": sums["advantages"] / tokens,
            "critic/advantages/max": extremes["max"],
            "critic/advantages/min": -extremes["neg_min"],
            "critic/returns/mean": sums["returns"] / tokens,
            "critic/values/mean": sums["values"] / tokens}
