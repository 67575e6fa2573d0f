"""Token-level rewards and returns of the critic-free and critic estimators: the KL-in-reward token rewards
(InstructGPT; veRL ``use_kl_in_reward``, OpenRLHF ``compute_reward``), batch whitening (global under ``torchrun``)
and REINFORCE++ advantages (Hu 2025; veRL ``reinforce_plus_plus``, OpenRLHF ``reinforce``). Letters: ``B`` rows,
``T`` response tokens."""

from __future__ import annotations

import torch

import kernels as K
from engine.algorithms.batching import check_like_mask
from engine.distributed.context import all_reduce_sum, current


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
        check_like_mask("ref_logprobs", ref_logprobs, mask.shape)
        if logprobs is None:
            raise ValueError("logprobs is required when ref_logprobs is given and kl_coef > 0")
        check_like_mask("logprobs", logprobs, mask.shape)
        # where, not * mask: a NaN/inf log-prob on a padded token must not become a NaN reward there
        kl = torch.where(mask, K.kl_penalty(logprobs.detach(), ref_logprobs.detach(), kl_estimator).float(), 0.0)
        rewards = -kl_coef * kl
    if T:
        last = T - 1 - mask.flip(-1).to(torch.int8).argmax(-1)  # the last True of each row
        score = scores.detach().float().to(mask.device) * mask.any(-1)
        rewards = rewards.scatter_add(1, last[:, None], score[:, None])
    return rewards, kl


def whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``kernels.masked_whiten(values, mask)``: ``(x - mean) / sqrt(var + 1e-8)`` over the masked entries
    (Bessel-corrected variance, veRL's ``masked_whiten``). Under ``torchrun`` the statistics are those of every rank's
    masked entries (two all-reduces: the mean, then the variance), as one process on the whole batch. Raises
    ``ValueError`` for fewer than two masked entries in all."""
    if not current().enabled:
        return K.masked_whiten(values, mask)
    return _whiten_global(values, mask)


def _whiten_global(values: torch.Tensor, mask: torch.Tensor, epsilon: float = 1e-8) -> torch.Tensor:
    m, v = mask.bool(), values.float()
    first = all_reduce_sum({"n": m.sum().item(), "sum": torch.where(m, v, 0.0).double().sum().item()})
    n = first["n"]
    if n < 2:
        raise ValueError(f"whitening needs at least 2 masked entries over all ranks, got {int(n)}")
    mean = first["sum"] / n
    var = all_reduce_sum({"sq": torch.where(m, (v.double() - mean).square(), 0.0).sum().item()})["sq"] / (n - 1)
    return ((v.double() - mean) / (var + epsilon) ** 0.5).float()


def reinforce_plus_plus_advantages(scores: torch.Tensor, response_mask: torch.Tensor, *,
                                   logprobs: torch.Tensor | None = None, ref_logprobs: torch.Tensor | None = None,
                                   kl_coef: float = 0.0, kl_estimator: str = "k1", gamma: float = 1.0
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (Hu 2025; veRL ``compute_reinforce_plus_plus_outcome_advantage``, OpenRLHF ``reinforce``):
    ``(advantages [B, T], kl [B, T])`` float32, 0 on padding.

    token rewards ``r_t`` = ``scores[b]`` at the last response token minus ``kl_coef * kl_t`` on every response token
    (``token_level_rewards``: the KL is in the reward), returns ``R_t = r_t + gamma * R_{t+1}``
    (``kernels.discounted_returns``), advantages = the returns whitened over every response token of the batch
    (``whiten``: global under ``torchrun``). No critic, no group: the baseline is the batch mean. Raises
    ``ValueError`` for shape mismatches and for fewer than two response tokens in the batch."""
    rewards, kl = token_level_rewards(scores, response_mask, logprobs=logprobs, ref_logprobs=ref_logprobs,
                                      kl_coef=kl_coef, kl_estimator=kl_estimator)
    returns = K.discounted_returns(rewards, response_mask, gamma=gamma)
    advantages = whiten(returns, response_mask)
    return torch.where(response_mask.bool(), advantages.float(), 0.0), kl
