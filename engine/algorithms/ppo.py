"""PPO with a critic, the InstructGPT recipe (Ouyang et al. 2022; Ziegler et al. 2019; Schulman et al. 2017).

One iteration: the rollout's sequence scores become token-level rewards with the KL to the reference subtracted on
every response token (``token_level_rewards``, veRL ``use_kl_in_reward`` / OpenRLHF ``compute_reward``), the critic
scores every response state (``critic_values``), GAE turns both into advantages and returns (``gae_advantages``), and
``ppo_epochs`` runs a few passes of clipped actor steps (``grpo.policy_update`` with token-level advantages) and
clipped value steps (``critic_update``) over shuffled mini-batches. The KL coefficient may adapt between iterations
(``AdaptiveKLController``). All loss math goes through ``kernels``; letters: ``B`` rows, ``T`` response tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import kernels as K
from engine.algorithms.batching import TokenBatch, clip_and_step
from engine.algorithms.grpo import PolicyUpdateResult, global_denominators, policy_update
from engine.models.value_model import token_values


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


def _check_bt(name: str, t: torch.Tensor, shape: torch.Size) -> None:
    if not isinstance(t, torch.Tensor) or t.shape != shape:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must have shape {tuple(shape)} (like response_mask), got {got}")


def token_level_rewards(scores: torch.Tensor, response_mask: torch.Tensor, *, logprobs: torch.Tensor | None = None,
                        ref_logprobs: torch.Tensor | None = None, kl_coef: float = 0.0, kl_estimator: str = "k1"
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(token_rewards [B, T] float32, kl [B, T] float32): rewards = -kl_coef * kernels.kl_penalty(logprobs,
    ref_logprobs, kl_estimator) on response tokens (0 elsewhere), plus scores[b] added at row b's LAST response token
    (the last True of response_mask[b]; rows with an empty response get nothing). kl is 0 when ref_logprobs is None
    or kl_coef == 0 (then logprobs may be None). InstructGPT's KL-in-reward (veRL use_kl_in_reward, OpenRLHF
    compute_reward). Raises ValueError for shape mismatches, naming the argument.

    scores ``[B]``; response_mask ``[B, T]`` bool or {0, 1}; logprobs / ref_logprobs ``[B, T]`` (rollout policy and
    reference log-probs of the sampled tokens). Outputs carry no gradient."""
    if not isinstance(response_mask, torch.Tensor) or response_mask.dim() != 2:
        raise ValueError(f"response_mask must be a [B, T] tensor, got "
                         f"{tuple(response_mask.shape) if isinstance(response_mask, torch.Tensor) else response_mask!r}")
    B, T = response_mask.shape
    if not isinstance(scores, torch.Tensor) or scores.shape != (B,):
        got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"scores must have shape ({B},) (one per row of response_mask), got {got}")
    if not kl_coef >= 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    mask = response_mask.bool()
    rewards = torch.zeros((B, T), dtype=torch.float32, device=mask.device)
    kl = torch.zeros((B, T), dtype=torch.float32, device=mask.device)
    if ref_logprobs is not None and kl_coef > 0:
        _check_bt("ref_logprobs", ref_logprobs, mask.shape)
        if logprobs is None:
            raise ValueError("logprobs is required when ref_logprobs is given and kl_coef > 0")
        _check_bt("logprobs", logprobs, mask.shape)
        # where, not * mask: a NaN/inf log-prob on a padded token must not become a NaN reward there
        kl = torch.where(mask, K.kl_penalty(logprobs.detach(), ref_logprobs.detach(), kl_estimator).float(), 0.0)
        rewards = -kl_coef * kl
    if T:
        last = T - 1 - mask.flip(-1).to(torch.int8).argmax(-1)  # the last True of each row
        score = scores.detach().float().to(mask.device) * mask.any(-1)
        rewards = rewards.scatter_add(1, last[:, None], score[:, None])
    return rewards, kl


def gae_advantages(token_rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor, *,
                   gamma: float = 1.0, lam: float = 0.95, whiten: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) [B, T] float32: kernels.gae(token_rewards, values, response_mask, gamma, lam), then, when
    whiten, advantages = kernels.masked_whiten(advantages, response_mask) (veRL's recipe; returns are NOT whitened).
    Both are 0 on padding (selected with the mask, so a NaN/inf reward or value there reaches no output).

    Whitening needs at least two response tokens in the batch (``ValueError`` from ``kernels.masked_whiten``) and
    reads the mask count back to the host once."""
    adv, ret = K.gae(token_rewards, values.detach(), response_mask, gamma=gamma, lam=lam)
    if whiten:
        adv = K.masked_whiten(adv, response_mask)
    m = response_mask.bool()
    return torch.where(m, adv.float(), 0.0), torch.where(m, ret.float(), 0.0)


def critic_values(critic, batch: TokenBatch) -> torch.Tensor:
    """[B, T] float32 values V(s_t) of each response token's state: engine.models.value_model.token_values(critic,
    batch.input_ids, batch.attention_mask) gathered at batch.response_index, times response_mask. Differentiable."""
    values = token_values(critic, batch.input_ids, batch.attention_mask)
    return values.gather(1, batch.response_index) * batch.response_mask


@dataclass
class CriticUpdateResult:
    """What one critic update did: ``stepped`` False when the step was skipped (non-finite loss or gradient)."""

    metrics: dict[str, float]
    stepped: bool


def critic_update(critic, optimizer, batch: TokenBatch, old_values: torch.Tensor, returns: torch.Tensor, *,
                  cliprange_value: float | None, loss_agg_mode: str, micro_batch_size: int, max_grad_norm: float,
                  autocast_dtype: torch.dtype | None = None, loss_scale_factor: float | None = None
                  ) -> CriticUpdateResult:
    """One optimizer step of kernels.value_loss over batch (gradient accumulation over micro-batches of rows, each
    normalised by the WHOLE batch's token count (global_num_tokens) and count of rows with at least one response token
    (global_num_seqs), with loss_scale_factor (None -> the batch's T), via grpo.global_denominators exactly as
    grpo.policy_update does for the policy, so the summed gradient equals the full-batch gradient). Uses
    engine.algorithms.batching.clip_and_step (non-finite loss or grad norm -> no step, stepped=False). Metrics
    (veRL names): "critic/vf_loss", "critic/vf_clipfrac", "critic/vpred_mean", "critic/grad_norm".

    old_values, returns: ``[B, T]`` (the rollout critic's values and the GAE returns; no gradient). One host sync per
    micro-batch (the loss and metrics are read back)."""
    B = batch.labels.shape[0]
    _check_bt("old_values", old_values, batch.response_mask.shape)
    _check_bt("returns", returns, batch.response_mask.shape)
    denominators = global_denominators(batch, loss_scale_factor)
    n_tok = denominators["global_num_tokens"]
    sums = {"vf_loss": 0.0, "vf_clipfrac": 0.0, "vpred_mean": 0.0}
    finite = True
    optimizer.zero_grad(set_to_none=True)
    for start in range(0, B, micro_batch_size):
        rows = slice(start, min(start + micro_batch_size, B))
        mb = batch.rows(rows)
        with torch.autocast(device_type=mb.input_ids.device.type, dtype=autocast_dtype or torch.bfloat16,
                            enabled=autocast_dtype is not None):
            values = critic_values(critic, mb)
        loss, metrics = K.value_loss(values, old_values[rows], returns[rows], mb.response_mask,
                                     cliprange_value=cliprange_value, loss_agg_mode=loss_agg_mode, **denominators)
        if not torch.isfinite(loss):
            finite = False
            break
        loss.backward()
        share = mb.num_tokens / n_tok  # the metrics are token means: weight each micro-batch by its tokens
        sums["vf_loss"] += loss.item()
        for name, value in metrics.items():
            sums[name] += value.item() * share
    grad_norm, stepped = clip_and_step(critic, optimizer, max_grad_norm, finite)
    out = {f"critic/{name}": value if finite else float("nan") for name, value in sums.items()}
    out["critic/grad_norm"] = grad_norm
    return CriticUpdateResult(out, stepped)


def _rows_or_none(t: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t[idx]


_ACTOR_METRICS = {"actor/pg_loss": "pg_loss", "actor/pg_clipfrac": "clip_ratio/region_mean", "actor/ppo_kl": "ppo_kl",
                  "actor/entropy": "entropy", "actor/grad_norm": "grad_norm", "actor/kl_loss": "kl"}


def ppo_epochs(policy, policy_optimizer, critic, critic_optimizer, batch: TokenBatch, *, old_logprobs: torch.Tensor,
               advantages: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               ref_logprobs: torch.Tensor | None = None, cfg, temperature: float, max_grad_norm: float,
               rollout_logprobs: torch.Tensor | None = None, autocast_dtype: torch.dtype | None = None,
               generator: torch.Generator | None = None, update_actor: bool = True,
               loss_scale_factor: float | None = None) -> dict[str, float]:
    """cfg.ppo_epochs passes over the rollout batch; each pass shuffles the rows (with `generator`, so runs are
    reproducible) into mini-batches of cfg.mini_batch_size rows; per mini-batch one actor step
    (engine.algorithms.grpo.policy_update with the mini-batch's rows, token-level advantages [b, T]; cfg provides
    micro_batch_size, clip_ratio_low, clip_ratio_high, loss_agg_mode, kl_coef (KL as a loss term; 0 when the KL is in
    the reward), kl_estimator, rollout_is, rollout_is_cap — pass cfg through to policy_update, it reads those names)
    and one critic step (critic_update with cfg.cliprange_value, cfg.loss_agg_mode, cfg.micro_batch_size). If a step
    is skipped as non-finite, stop the epochs. Returns averaged metrics with veRL names: "actor/pg_loss",
    "actor/pg_clipfrac", "actor/ppo_kl", "actor/entropy", "actor/grad_norm", "actor/kl_loss" (policy_update's "kl"),
    "critic/vf_loss", "critic/vf_clipfrac", "critic/vpred_mean", "critic/grad_norm", plus "actor/stepped" and
    "critic/stepped" (fraction of steps taken, floats) and the count "ppo/updates".

    old_logprobs, advantages, old_values, returns, ref_logprobs, rollout_logprobs: ``[B, T]`` rollout tensors (no
    gradient). `generator` is a CPU generator (``torch.randperm``); None draws from the global RNG. Both steps of a
    mini-batch are attempted before stopping; ``ppo/updates`` counts the mini-batches processed. ``update_actor=False``
    (veRL's critic warm-up) steps the critic alone: the actor metrics are NaN then. With ``rollout_logprobs`` the
    first mini-batch's actor step, which runs the rollout's weights, adds the ``rollout_corr/*`` mismatch metrics of
    that mini-batch's rows (``policy_update(measure_rollout_corr=True)``).

    ``loss_scale_factor``: the Dr. GRPO constant of ``loss_agg_mode="seq-mean-token-sum-norm"``, passed to both
    ``policy_update`` and ``critic_update`` (the trainer passes ``generation.max_tokens``, as TRL's
    ``max_completion_length``); None falls back to the rollout batch's ``T``. Each mini-batch step normalises by its
    own mini-batch's token count and count of non-empty rows (one optimizer step = one global batch)."""
    B = batch.labels.shape[0]
    if cfg.mini_batch_size < 1 or cfg.ppo_epochs < 0:
        raise ValueError(f"need mini_batch_size >= 1 and ppo_epochs >= 0, got {cfg.mini_batch_size}, "
                         f"{cfg.ppo_epochs}")
    for name, t in (("old_logprobs", old_logprobs), ("advantages", advantages), ("old_values", old_values),
                    ("returns", returns), ("ref_logprobs", ref_logprobs), ("rollout_logprobs", rollout_logprobs)):
        if t is not None:
            _check_bt(name, t, batch.response_mask.shape)
    history: list[dict[str, float]] = []
    corr: dict[str, float] = {}
    stop = False
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(B, generator=generator).to(batch.input_ids.device)
        for start in range(0, B, cfg.mini_batch_size):
            idx = order[start:start + cfg.mini_batch_size]
            mb = batch.rows(idx)
            if update_actor:
                actor = policy_update(policy, policy_optimizer, mb, old_logprobs[idx], advantages[idx],
                                      ref_logprobs=_rows_or_none(ref_logprobs, idx), cfg=cfg, temperature=temperature,
                                      max_grad_norm=max_grad_norm,
                                      rollout_logprobs=_rows_or_none(rollout_logprobs, idx),
                                      autocast_dtype=autocast_dtype, loss_scale_factor=loss_scale_factor,
                                      # only the first actor step runs the rollout's weights
                                      measure_rollout_corr=rollout_logprobs is not None and not history)
                corr = corr or {k: v for k, v in actor.metrics.items() if k.startswith("rollout_corr/")}
            else:
                actor = PolicyUpdateResult({src: float("nan") for src in _ACTOR_METRICS.values()}, True)
            crit = critic_update(critic, critic_optimizer, mb, old_values[idx], returns[idx],
                                 cliprange_value=cfg.cliprange_value, loss_agg_mode=cfg.loss_agg_mode,
                                 micro_batch_size=cfg.micro_batch_size, max_grad_norm=max_grad_norm,
                                 autocast_dtype=autocast_dtype, loss_scale_factor=loss_scale_factor)
            row = {out: actor.metrics[src] for out, src in _ACTOR_METRICS.items()}
            row.update(crit.metrics)
            row["actor/stepped"] = float(actor.stepped)
            row["critic/stepped"] = float(crit.stepped)
            history.append(row)
            if not (actor.stepped and crit.stepped):
                stop = True
                break
        if stop:
            break
    names = [*_ACTOR_METRICS, "critic/vf_loss", "critic/vf_clipfrac", "critic/vpred_mean", "critic/grad_norm",
             "actor/stepped", "critic/stepped"]
    out = {name: sum(r[name] for r in history) / len(history) if history else float("nan") for name in names}
    out["ppo/updates"] = float(len(history))
    out.update(corr)
    return out
