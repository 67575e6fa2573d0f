"""GRPO (DeepSeekMath, Shao et al. 2024): group-normalised outcome advantages and the clipped policy loss, with TRL/veRL
options (clip-higher, KL to a reference, loss aggregation, Dr. GRPO without std normalisation, truncated IS
correction of rollout/trainer mismatch). All loss math goes through ``kernels`` (one copy of it)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

import kernels as K
from engine.algorithms.batching import TokenBatch, clip_and_step, response_logprobs
from engine.algorithms.rollout_corr import RolloutCorrMetrics
from kernels.loss_agg import agg_loss_ref


@dataclass
class PolicyUpdateResult:
    """What one policy update did: ``stepped`` False when the step was skipped (non-finite loss or gradient)."""

    metrics: dict[str, float]
    stepped: bool


def compute_advantages(scores: torch.Tensor, num_generations: int, *, norm_by_std: bool = True,
                       unbiased_std: bool = True, epsilon: float = 1e-6) -> torch.Tensor:
    """``[B]`` float32 GRPO advantages of ``scores [B]`` (rows ``g*G .. g*G+G-1`` are group g), via
    ``kernels.group_advantages``."""
    return K.group_advantages(scores.float(), num_generations, estimator="grpo", norm_by_std=norm_by_std,
                              unbiased_std=unbiased_std, epsilon=epsilon)


def rollout_is_weights(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor, level: str,
                       cap: float) -> torch.Tensor:
    """Truncated importance weights ``min(pi_old / pi_rollout, cap)`` per token (``level="token"``) or per sequence
    (geometric mean over the response, ``"sequence"``): the TIS correction of TRL/veRL for a rollout engine whose
    log-probs differ from the trainer's. Returns ``[B, T]`` or ``[B]``, no gradient."""
    # where, not * mask: a NaN/-inf log-prob on a padded token must not reach the weights of the real ones
    log_ratio = torch.where(mask.bool(), (old_logprobs - rollout_logprobs).detach(), 0.0)
    if level == "token":
        return log_ratio.exp().clamp(max=cap)
    per_seq = log_ratio.sum(-1) / mask.sum(-1).clamp_min(1)
    return per_seq.exp().clamp(max=cap)


def global_denominators(batch: TokenBatch, loss_scale_factor: float | None = None) -> dict[str, float]:
    """The ``kernels.loss_agg`` denominators of one optimizer step over ``batch``, for every micro-batch's loss:
    ``global_num_tokens`` (response tokens), ``global_num_seqs`` (rows with at least one response token: veRL's
    ``agg_loss`` and OpenRLHF exclude fully masked rows from the seq-mean), each at least 1, and
    ``loss_scale_factor`` (the Dr. GRPO constant; None -> the batch's ``T``, its longest completion, at least 1).
    Computed once on the host from ``batch.response_mask`` (one device synchronisation)."""
    mask = batch.response_mask
    counts = torch.stack([mask.sum(), mask.any(-1).sum()]).tolist()  # one read-back for both counts
    return {"global_num_tokens": max(int(counts[0]), 1), "global_num_seqs": max(int(counts[1]), 1),
            "loss_scale_factor": loss_scale_factor if loss_scale_factor is not None else max(mask.shape[1], 1)}


def policy_update(policy, optimizer, batch: TokenBatch, old_logprobs: torch.Tensor, advantages: torch.Tensor, *,
                  ref_logprobs: torch.Tensor | None, cfg, temperature: float, max_grad_norm: float,
                  rollout_logprobs: torch.Tensor | None = None, autocast_dtype: torch.dtype | None = None,
                  loss_scale_factor: float | None = None, measure_rollout_corr: bool = False
                  ) -> PolicyUpdateResult:
    """One optimizer step of the GRPO loss on ``batch`` (``B`` samples), accumulated over micro-batches.

    The loss of each micro-batch is normalised by the whole batch's counts (``global_denominators``: response tokens,
    rows with at least one response token), so the summed gradient equals the full-batch gradient
    (``kernels.loss_agg``). A non-finite loss or gradient norm skips the optimizer step (``stepped=False``); the
    gradients are zeroed either way. ``cfg`` is a ``GRPOConfig`` (or any object with its fields; an ``entropy_coef``
    > 0 subtracts that times the entropy, aggregated like the loss). Metrics use TRL/veRL names.

    ``loss_scale_factor``: the Dr. GRPO constant of ``loss_agg_mode="seq-mean-token-sum-norm"`` (the loss is the
    seq-mean of token sums divided by it). The trainer passes ``generation.max_tokens``, as TRL's
    ``max_completion_length``, so the scale does not change with the batch; None falls back to the batch's ``T`` (its
    longest completion). Unused by the other modes.

    ``measure_rollout_corr``: this update's forward runs the weights the rollout was sampled with (the first update
    after a rollout), so its detached log-probs are the trainer's log-probs of the sampled tokens: compare them with
    ``rollout_logprobs`` (required then) and add the ``rollout_corr/*`` metrics (``engine.algorithms.rollout_corr``)
    at no extra forward.
    """
    if measure_rollout_corr and rollout_logprobs is None:
        raise ValueError("measure_rollout_corr=True needs the generator's rollout_logprobs")
    corr = RolloutCorrMetrics() if measure_rollout_corr else None
    B = batch.labels.shape[0]
    mask = batch.response_mask
    isw = None
    if cfg.rollout_is and rollout_logprobs is not None:
        isw = rollout_is_weights(old_logprobs, rollout_logprobs, mask.float(), cfg.rollout_is, cfg.rollout_is_cap)
    denominators = global_denominators(batch, loss_scale_factor)
    n_tok = denominators["global_num_tokens"]
    sums: dict[str, float] = {}
    entropy_sum = 0.0
    finite = True
    optimizer.zero_grad(set_to_none=True)
    for start in range(0, B, cfg.micro_batch_size):
        rows = slice(start, min(start + cfg.micro_batch_size, B))
        mb = batch.rows(rows)
        with torch.autocast(device_type=mb.input_ids.device.type, dtype=autocast_dtype or torch.bfloat16,
                            enabled=autocast_dtype is not None):
            logprobs, entropy = response_logprobs(policy, mb, temperature=temperature, return_entropy=True)
        if corr is not None:
            corr.add(logprobs, rollout_logprobs[rows], mb.response_mask)
        loss, metrics = K.grpo_loss(
            logprobs, old_logprobs[rows], advantages[rows], mb.response_mask,
            clip_ratio_low=cfg.clip_ratio_low, clip_ratio_high=cfg.clip_ratio_high, loss_agg_mode=cfg.loss_agg_mode,
            ref_logprobs=None if ref_logprobs is None else ref_logprobs[rows], kl_coef=cfg.kl_coef,
            kl_estimator=cfg.kl_estimator, rollout_is_weights=None if isw is None else isw[rows], **denominators,
        )
        entropy_coef = getattr(cfg, "entropy_coef", 0.0)
        if entropy_coef:  # entropy bonus (veRL entropy_coeff), aggregated like the policy loss
            loss = loss - entropy_coef * agg_loss_ref(entropy, mb.response_mask, cfg.loss_agg_mode, **denominators)
        if not torch.isfinite(loss):
            finite = False
            break
        loss.backward()
        share = mb.num_tokens / n_tok  # metrics are token means: weight each micro-batch by its tokens
        sums["loss"] = sums.get("loss", 0.0) + loss.item()
        for name, value in metrics.items():
            sums[name] = sums.get(name, 0.0) + value.item() * (share if name != "pg_loss" else 1.0)
        entropy_sum += float(torch.where(mb.response_mask.bool(), entropy.detach(), 0.0).sum())
    grad_norm, stepped = clip_and_step(policy, optimizer, max_grad_norm, finite)
    out = {
        "loss": sums.get("loss", float("nan")),
        "pg_loss": sums.get("pg_loss", float("nan")),
        "kl": sums.get("kl", 0.0),
        "entropy": entropy_sum / n_tok,
        "clip_ratio/low_mean": sums.get("clip_ratio/low_mean", 0.0),
        "clip_ratio/high_mean": sums.get("clip_ratio/high_mean", 0.0),
        "clip_ratio/region_mean": sums.get("pg_clipfrac", 0.0),
        "ppo_kl": sums.get("ppo_kl", 0.0),
        "grad_norm": grad_norm,
        **(corr.metrics() if corr is not None else {}),
    }
    return PolicyUpdateResult(out, stepped)
