"""Classic RLHF with PPO (Ouyang et al. 2022, InstructGPT): ``PPOTrainer.train_step`` reads as its phases:

    rollout (the Generator, on the actor's weights) -> scores (frozen reward model, or rule rewards)
    -> token rewards (score at the last token minus kl_coef * KL to the reference) -> values (critic) -> GAE
    -> ppo_epochs x mini-batches of clipped policy and value updates -> KL controller -> metrics

The reference is the initial policy (copied before a checkpoint is loaded). The critic starts from the reward model
(InstructGPT, OpenRLHF) when it shares the policy's vocabulary, else from the policy's body with a fresh value head;
it has its own AdamW (``ppo.critic_lr``) and is checkpointed under ``critic/`` beside the actor. Metrics use veRL's
names (``critic/vf_loss``, ``critic/advantages/mean``, ``actor/pg_clipfrac``, ``actor/ppo_kl``, ...) plus ``reward``
(the mean score) and ``kl`` (the mean per-sequence KL to the reference, nats).
"""

from __future__ import annotations

import logging
import copy
import time

import torch

from engine.algorithms import (
    AdaptiveKLController,
    FixedKLController,
    critic_values,
    gae_advantages,
    make_batch,
    ppo_epochs,
    token_level_rewards,
)
from engine.algorithms.optim import make_optimizer, make_scheduler
from engine.algorithms.stats import nanmean
from engine.models.loading import require_local_dir, resolve_model_dir
from engine.models.value_model import (
    load_reward_model,
    load_value_model,
    sequence_scores,
    value_model_from_causal_lm,
)
from engine.rewards import compute_rewards, load_reward
from engine.trainers.base import nonfinite_reward_cause, skip_cause
from engine.trainers.rollout import RolloutTrainer

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


class PPOTrainer(RolloutTrainer):
    """PPO with a critic and GAE against a frozen reward model or rule rewards (``cfg``: a ``PPORunConfig``)."""

    kind = "ppo"
    algo = "ppo"

    def __init__(self, cfg, *, model=None, tokenizer=None):
        self.reward_model = None
        for name in ("reward_model", "critic_path"):  # a missing directory fails now, naming the setting
            if getattr(cfg.ppo, name):
                require_local_dir(getattr(cfg.ppo, name), f"ppo.{name}")
        super().__init__(cfg, model=model, tokenizer=tokenizer)
        p = cfg.ppo
        self.reward_fns = [load_reward(spec) for spec in p.rewards]
        kl_value = self.state.get("kl_coef", p.kl_coef)  # a resumed run continues the adapted coefficient
        self.kl_ctl = (AdaptiveKLController(kl_value, p.target_kl, p.kl_horizon) if p.adaptive_kl
                       else FixedKLController(kl_value))

    # ------------------------------------------------------------------------------------------------ set-up
    def before_resume(self) -> None:
        p = self.cfg.ppo
        dtype = next(self.model.parameters()).dtype
        self.ref_model = None
        if p.kl_coef > 0 or p.adaptive_kl:
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        if p.reward_model:
            self.reward_model, self.rm_tokenizer = load_reward_model(p.reward_model, self.device, dtype)
            self.rm_same_vocab = _same_vocab(self.rm_tokenizer, self.tokenizer)
        self.critic = self._build_critic(dtype)
        critic_optim = self.cfg.optim.model_copy(update={"lr": p.critic_lr})
        self.critic_optimizer = make_optimizer(self.critic, critic_optim)
        self.critic_scheduler = make_scheduler(self.critic_optimizer, critic_optim, self.total_steps)
        self.state["kl_coef"] = p.kl_coef

    def _build_critic(self, dtype: torch.dtype):
        p = self.cfg.ppo
        if p.critic_path:
            return load_value_model(resolve_model_dir(p.critic_path), dtype=dtype, device=self.device).train()
        if self.reward_model is not None and self.rm_same_vocab:
            return copy.deepcopy(self.reward_model).requires_grad_(True).train()
        if self.reward_model is not None:
            log.warning("the reward model's tokenizer differs from the policy's: the critic starts from the "
                  "policy's body with a fresh value head")
        return value_model_from_causal_lm(self.model, seed=self.cfg.trainer.seed)

    def checkpoint_components(self) -> dict:
        return {"critic": {"model": self.critic, "optimizer": self.critic_optimizer,
                           "scheduler": self.critic_scheduler}}

    # ------------------------------------------------------------------------------------------------ phases
    @torch.no_grad()
    def score(self, examples: list, completions: list) -> tuple[torch.Tensor, dict[str, float]]:
        """``[B]`` float32 scores on the device (reward model or rule rewards, then the EOS penalty and the clip)."""
        p = self.cfg.ppo
        extra: dict[str, float] = {}
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
                with torch.autocast(self.device.type, dtype=self.autocast or torch.bfloat16,
                                    enabled=self.autocast is not None):
                    chunks.append(sequence_scores(self.reward_model, ids, mask).float())
            scores = torch.cat(chunks)
        else:
            texts = [self.tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in completions]
            columns = {k: [e.record.get(k) for e in examples] for k in examples[0].record if k != "prompt"}
            totals, per_fn = compute_rewards(self.reward_fns, p.reward_weights, [e.record["prompt"] for e in examples],
                                             texts, columns)
            scores = torch.tensor(totals, dtype=torch.float32, device=self.device)
            extra = {f"rewards/{name}/mean": nanmean(vals) for name, vals in per_fn.items()}
        if p.missing_eos_penalty is not None:
            truncated = torch.tensor([c.finish_reason == "length" for c in completions], device=self.device)
            scores = scores - p.missing_eos_penalty * truncated.float()
        if p.reward_clip is not None:
            scores = scores.clamp(-p.reward_clip, p.reward_clip)
        return scores, extra

    def train_step(self, step: int) -> dict[str, float]:
        cfg, p, g = self.cfg, self.cfg.ppo, self.cfg.generation
        t0 = time.perf_counter()
        examples, completions = self.rollout(self.next_examples(p.prompts_per_step), step)
        t_gen = time.perf_counter() - t0
        scores, reward_metrics = self.score(examples, completions)
        bad_reward = nonfinite_reward_cause(scores.tolist())
        if bad_reward is not None:  # no advantage can be formed from it: skip the update, name the source
            source = "the reward model" if self.reward_model is not None else "the reward functions"
            self.record_step_outcome(False, {}, cause=f"{bad_reward}, from {source}")
            return {"reward": scores.mean().item(), **reward_metrics, "loss": float("nan"),
                    "perf/time/generate": t_gen}

        t1 = time.perf_counter()
        batch = make_batch([e.prompt_ids for e in examples], [list(c.token_ids) for c in completions],
                           self.tokenizer.pad_token_id or 0, self.device)
        mask = batch.response_mask
        rollout_lp = self.rollout_logprobs(completions, batch)
        old_lp, ref_lp = self.old_and_ref_logprobs(batch, rollout_lp)
        with torch.no_grad(), torch.autocast(self.device.type, dtype=self.autocast or torch.bfloat16,
                                             enabled=self.autocast is not None):
            values = critic_values(self.critic, batch).float() * mask
        kl_coef = self.kl_ctl.value
        token_rewards, _ = token_level_rewards(scores, mask, logprobs=old_lp, ref_logprobs=ref_lp,
                                               kl_coef=0.0 if p.use_kl_loss else kl_coef,
                                               kl_estimator=p.kl_estimator)
        advantages, returns = gae_advantages(token_rewards, values, mask, gamma=p.gamma, lam=p.lam,
                                             whiten=p.whiten_advantages)
        # the KL is in the reward already, unless it is a loss term
        update_cfg = p.model_copy(update={"kl_coef": kl_coef if p.use_kl_loss else 0.0})
        shuffle = torch.Generator().manual_seed(cfg.trainer.seed * 1_000_003 + step)
        update = ppo_epochs(self.model, self.optimizer, self.critic, self.critic_optimizer, batch,
                            old_logprobs=old_lp, advantages=advantages, old_values=values, returns=returns,
                            ref_logprobs=ref_lp if p.use_kl_loss else None, cfg=update_cfg,
                            temperature=g.temperature, max_grad_norm=cfg.optim.max_grad_norm,
                            rollout_logprobs=rollout_lp, autocast_dtype=self.autocast, generator=shuffle,
                            update_actor=step >= p.critic_warmup_steps, loss_scale_factor=g.max_tokens)
        t_update = time.perf_counter() - t1
        actor_ok = step < p.critic_warmup_steps or update["actor/stepped"] == 1.0
        stepped = actor_ok and update["critic/stepped"] == 1.0
        if stepped:
            self.critic_scheduler.step()
        cause = None
        if not stepped:  # name the model whose step was skipped
            who = "actor" if not actor_ok else "critic"
            loss_key = "actor/pg_loss" if who == "actor" else "critic/vf_loss"
            cause = f"{who}: " + skip_cause({"loss": update.get(loss_key), "grad_norm": update.get(f"{who}/grad_norm")})
        self.record_step_outcome(stepped, {"loss": update.get("actor/pg_loss"),
                                           "grad_norm": update.get("actor/grad_norm")}, cause=cause)

        # the KL to the reference per sequence (k1 summed over the response, nats): the controller's input
        kl_seq = ((old_lp - ref_lp) * mask).sum(-1).mean().item() if ref_lp is not None else 0.0
        self.kl_ctl.update(kl_seq, len(completions))
        self.state["kl_coef"] = self.kl_ctl.value
        n_tok = mask.sum(-1).float()
        masked = lambda t: (t * mask).sum() / mask.sum().clamp_min(1)  # a token mean
        return {
            "reward": scores.mean().item(),
            **reward_metrics,
            "kl": kl_seq,
            "kl_coef": kl_coef,
            "critic/score/mean": scores.mean().item(),
            "critic/rewards/mean": (token_rewards * mask).sum(-1).mean().item(),
            "critic/advantages/mean": masked(advantages).item(),
            "critic/advantages/max": advantages.masked_fill(~mask, float("-inf")).max().item(),
            "critic/advantages/min": advantages.masked_fill(~mask, float("inf")).min().item(),
            "critic/returns/mean": masked(returns).item(),
            "critic/values/mean": masked(values).item(),
            **update,
            "response_length/mean": n_tok.mean().item(),
            "response_length/clip_ratio": sum(c.finish_reason == "length" for c in completions) / len(completions),
            "perf/tokens_per_sec": float(n_tok.sum()) / max(t_gen + t_update, 1e-9),
            "perf/time/generate": t_gen,
            "perf/time/update": t_update,
        }

    def evaluate(self) -> dict[str, float]:
        """With a reward model: the mean score of sampled completions of the held-out prompts (``eval/reward``, at
        the rollout temperature, one sample each, fixed seeds) and their length. Rule rewards: accuracy/format."""
        if not self.eval_examples:
            return {}
        if self.reward_model is None:
            return super().evaluate()
        examples, completions = self.rollout(self.eval_examples, 10**6)  # seeds apart from the training steps
        examples, completions = examples[::self.cfg.ppo.num_generations], completions[::self.cfg.ppo.num_generations]
        scores, _ = self.score(examples, completions)
        return {"eval/reward": scores.mean().item(),
                "eval/mean_length": sum(len(c.token_ids) for c in completions) / len(completions)}


__all__ = ["PPOTrainer"]
