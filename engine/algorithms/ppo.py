"""PPO with a critic, the InstructGPT recipe (Ouyang et al. 2022; Ziegler et al. 2019; Schulman et al. 2017).

One iteration: the rollout's sequence scores become token-level rewards with the KL to the reference subtracted on
every response token (``returns.token_level_rewards``, veRL ``use_kl_in_reward`` / OpenRLHF ``compute_reward``), the critic
scores every response state (``engine.algorithms.critic``), GAE turns both into advantages and returns
(``gae_advantages``), and ``ppo_epochs`` runs a few passes of clipped actor steps (``engine.algorithms.policy``, with
token-level advantages) and clipped value steps (``critic_update``) over shuffled mini-batches. The KL coefficient may adapt between iterations
(``AdaptiveKLController``). All loss math goes through ``kernels``; letters: ``B`` rows, ``T`` response tokens.
"""

from __future__ import annotations

import torch

import kernels as K
from engine.algorithms.accumulation import StepResult
from engine.algorithms.batching import TokenBatch, check_like_mask
from engine.algorithms.critic import critic_update
from engine.algorithms.policy import policy_update
from engine.algorithms.returns import whiten as whiten_batch


class FixedKLController:
    """A constant KL coefficient ``value`` (veRL ``FixedKLController``)."""

    def __init__(self, kl_coef: float):
        if not kl_coef >= 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient stays fixed."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. 2019 (as TRL/veRL/OpenRLHF): value *= 1 + clip(current_kl / target_kl - 1, -0.2, 0.2) * n_steps /
    horizon.

    ``current_kl`` is the measured KL of the last rollout (veRL: the token mean of the in-reward KL), ``n_steps`` the
    samples it covered, ``horizon`` how many samples it takes to close the gap to ``target_kl``."""

    def __init__(self, init_kl_coef: float, target_kl: float, horizon: int):
        if not init_kl_coef >= 0:
            raise ValueError(f"init_kl_coef must be >= 0, got {init_kl_coef}")
        if not target_kl > 0:
            raise ValueError(f"target_kl must be > 0, got {target_kl}")
        if not horizon > 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target_kl)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move ``value`` toward the coefficient that would give ``target_kl`` (at most +-20% per horizon)."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


def gae_advantages(token_rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor, *,
                   gamma: float = 1.0, lam: float = 0.95, whiten: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) [B, T] float32: kernels.gae(token_rewards, values, response_mask, gamma, lam), then, when
    whiten, advantages = kernels.masked_whiten(advantages, response_mask) (veRL's recipe; returns are NOT whitened).
    Both are 0 on padding (selected with the mask, so a NaN/inf reward or value there reaches no output).

    Whitening needs at least two response tokens in the batch (``ValueError`` from ``kernels.masked_whiten``) and
    reads the mask count back to the host once. Under ``torchrun`` the mean and variance are those of every rank's
    tokens (``engine.algorithms.returns.whiten``), as one process on the whole batch."""
    adv, ret = K.gae(token_rewards, values.detach(), response_mask, gamma=gamma, lam=lam)
    if whiten:
        adv = whiten_batch(adv, response_mask)
    m = response_mask.bool()
    return torch.where(m, adv.float(), 0.0), torch.where(m, ret.float(), 0.0)


# the actor's metrics averaged over the mini-batch steps (policy_update's names); NaN while the critic warms up
_ACTOR_METRICS = ("loss", "pg_loss", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "ppo_kl",
                  "entropy", "kl", "grad_norm")
_CRITIC_METRICS = ("critic/vf_loss", "critic/vf_clipfrac", "critic/vpred_mean", "critic/grad_norm")


def ppo_epochs(policy, policy_optimizer, critic, critic_optimizer, batch: TokenBatch, *, old_logprobs: torch.Tensor,
               advantages: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               ref_logprobs: torch.Tensor | None = None, cfg, temperature: float, max_grad_norm: float,
               rollout_logprobs: torch.Tensor | None = None, autocast_dtype: torch.dtype | None = None,
               generator: torch.Generator | None = None, update_actor: bool = True,
               loss_scale_factor: float | None = None) -> dict[str, float]:
    """``cfg.ppo_epochs`` passes over the rollout batch, each shuffling the rows (with ``generator``, so runs are
    reproducible) into mini-batches of ``cfg.mini_batch_size`` rows; per mini-batch one actor step
    (``engine.algorithms.policy.policy_update`` on the mini-batch's rows with token-level advantages ``[b, T]``;
    ``cfg`` provides ``micro_batch_size`` (or ``max_tokens_per_micro_batch``: packed micro-batches, both steps),
    ``clip_ratio_low/high``, ``loss_agg_mode``, ``kl_coef`` (the KL as a loss term; 0 when it is in the reward),
    ``kl_estimator``, ``rollout_is``, ``rollout_is_cap``) and one critic step
    (``engine.algorithms.critic.critic_update`` with ``cfg.cliprange_value``). A skipped step (non-finite) ends the
    epochs once both steps of its mini-batch were attempted.

    Returns the metrics averaged over the mini-batch steps: the actor's under ``policy_update``'s names (``loss``,
    ``pg_loss``, ``clip_ratio/*``, ``ppo_kl``, ``entropy``, ``kl`` (the KL loss term), ``grad_norm``), the critic's
    (``critic/vf_loss``, ``critic/vf_clipfrac``, ``critic/vpred_mean``, ``critic/grad_norm``), the fractions of steps
    taken ``ppo/actor_stepped`` and ``ppo/critic_stepped``, and the count ``ppo/updates``. ``update_actor=False``
    (veRL's critic warm-up) steps the critic alone: the actor metrics are NaN then. With ``rollout_logprobs`` the first
    mini-batch's actor step, which runs the rollout's weights, adds the ``rollout_corr/*`` mismatch metrics of that
    mini-batch's rows.

    old_logprobs, advantages, old_values, returns, ref_logprobs, rollout_logprobs: ``[B, T]`` rollout tensors (no
    gradient; a wrong shape raises ``ValueError`` naming it). ``generator``: a CPU generator (``torch.randperm``);
    None draws from the global RNG. ``loss_scale_factor``: the Dr. GRPO constant of
    ``loss_agg_mode="seq-mean-token-sum-norm"`` for both steps (the trainer passes ``generation.max_tokens``); None
    falls back to the rollout batch's ``T``. Each step normalises by its own mini-batch's counts (one optimizer step =
    one global batch)."""
    B = batch.labels.shape[0]
    if cfg.mini_batch_size < 1 or cfg.ppo_epochs < 0:
        raise ValueError(f"need mini_batch_size >= 1 and ppo_epochs >= 0, got {cfg.mini_batch_size}, "
                         f"{cfg.ppo_epochs}")
    for name, t in (("old_logprobs", old_logprobs), ("advantages", advantages), ("old_values", old_values),
                    ("returns", returns), ("ref_logprobs", ref_logprobs), ("rollout_logprobs", rollout_logprobs)):
        if t is not None:
            check_like_mask(name, t, batch.response_mask.shape)
    pick = lambda t, idx: None if t is None else t[idx]
    history: list[dict[str, float]] = []
    corr: dict[str, float] = {}
    skipped = False
    for _ in range(cfg.ppo_epochs):
        if skipped:  # a skipped step ends the epochs
            break
        order = torch.randperm(B, generator=generator).to(batch.input_ids.device)
        for start in range(0, B, cfg.mini_batch_size):
            idx = order[start:start + cfg.mini_batch_size]
            mb = batch.rows(idx)
            if update_actor:
                actor = policy_update(policy, policy_optimizer, mb, old_logprobs[idx], advantages[idx],
                                      ref_logprobs=pick(ref_logprobs, idx), cfg=cfg, temperature=temperature,
                                      max_grad_norm=max_grad_norm, rollout_logprobs=pick(rollout_logprobs, idx),
                                      autocast_dtype=autocast_dtype, loss_scale_factor=loss_scale_factor,
                                      # only the first actor step runs the rollout's weights
                                      measure_rollout_corr=rollout_logprobs is not None and not history)
                corr = corr or {k: v for k, v in actor.metrics.items() if k.startswith("rollout_corr/")}
            else:
                actor = StepResult({name: float("nan") for name in _ACTOR_METRICS}, True)
            crit = critic_update(critic, critic_optimizer, mb, old_values[idx], returns[idx],
                                 cliprange_value=cfg.cliprange_value, loss_agg_mode=cfg.loss_agg_mode,
                                 micro_batch_size=cfg.micro_batch_size, max_grad_norm=max_grad_norm,
                                 autocast_dtype=autocast_dtype, loss_scale_factor=loss_scale_factor,
                                 max_tokens_per_micro_batch=getattr(cfg, "max_tokens_per_micro_batch", None))
            history.append({**{name: actor.metrics.get(name, float("nan")) for name in _ACTOR_METRICS}, **crit.metrics,
                            "ppo/actor_stepped": float(actor.stepped), "ppo/critic_stepped": float(crit.stepped)})
            skipped = not (actor.stepped and crit.stepped)
            if skipped:
                break
    names = [*_ACTOR_METRICS, *_CRITIC_METRICS, "ppo/actor_stepped", "ppo/critic_stepped"]
    out = {name: sum(r[name] for r in history) / len(history) if history else float("nan") for name in names}
    out["ppo/updates"] = float(len(history))
    if ref_logprobs is None:  # no reference: no KL term to report
        del out["kl"]
    out.update(corr)
    return out
