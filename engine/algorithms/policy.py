"""The clipped policy loss and its optimizer step, shared by GRPO and PPO's actor (Schulman et al. 2017, PPO; Shao et
al. 2024, GRPO; Yu et al. 2025, clip-higher; Liu et al. 2025, Dr. GRPO; the truncated IS correction of TRL/veRL).

``policy_update`` runs ``kernels.grpo_loss`` over micro-batches (``engine.algorithms.accumulation``), every
micro-batch normalised by the whole batch's counts (``global_denominators``), so the update does not depend on the
micro-batch size. Letters: ``B`` rows, ``T`` response tokens.
"""

from __future__ import annotations

import torch

import kernels as K
from engine.algorithms.accumulation import StepResult, accumulated_step, micro_slices
from engine.algorithms.batching import TokenBatch, response_logprobs
from engine.algorithms.rollout_corr import RolloutCorrMetrics
from engine.distributed.context import all_reduce_max, all_reduce_sum
from kernels.loss_agg import agg_loss_ref

# kernels.grpo_loss's metric names -> the engine's (TRL's) where they differ
_POLICY_METRICS = {"pg_clipfrac": "clip_ratio/region_mean"}
_CLIP_METRICS = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")


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
    Computed once on the host from ``batch.response_mask`` (one device synchronisation); under ``torchrun`` summed
    (``T``: maximised) over the ranks, so each rank's loss is its share of the global batch's."""
    mask = batch.response_mask
    counts = torch.stack([mask.sum(), mask.any(-1).sum()]).tolist()  # one read-back for both counts
    counts = all_reduce_sum({"tokens": counts[0], "seqs": counts[1]})  # under torchrun: the global batch's
    longest = all_reduce_max({"T": mask.shape[1]})["T"]
    return {"global_num_tokens": max(int(counts["tokens"]), 1), "global_num_seqs": max(int(counts["seqs"]), 1),
            "loss_scale_factor": loss_scale_factor if loss_scale_factor is not None else max(int(longest), 1)}


def policy_update(policy, optimizer, batch: TokenBatch, old_logprobs: torch.Tensor, advantages: torch.Tensor, *,
                  ref_logprobs: torch.Tensor | None, cfg, temperature: float, max_grad_norm: float,
                  rollout_logprobs: torch.Tensor | None = None, autocast_dtype: torch.dtype | None = None,
                  loss_scale_factor: float | None = None, measure_rollout_corr: bool = False) -> StepResult:
    """One optimizer step of the clipped policy loss (``kernels.grpo_loss``, PPO's surrogate) on ``batch`` (``B`` samples), accumulated over micro-batches.

    The loss of each micro-batch is normalised by the whole batch's counts (``global_denominators``: response tokens,
    rows with at least one response token), so the summed gradient equals the full-batch gradient
    (``kernels.loss_agg``). A non-finite loss or gradient norm skips the optimizer step (``stepped=False``); the
    gradients are zeroed either way. ``cfg`` is a ``GRPOConfig`` (or any object with its fields; an ``entropy_coef``
    > 0 subtracts that times the entropy, aggregated like the loss). Metrics use the engine's names (TRL's; README, "Metrics").

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
    isw = None
    if cfg.rollout_is and rollout_logprobs is not None:
        isw = rollout_is_weights(old_logprobs, rollout_logprobs, batch.response_mask.float(), cfg.rollout_is,
                                 cfg.rollout_is_cap)
    denominators = global_denominators(batch, loss_scale_factor)
    n_tok = denominators["global_num_tokens"]
    entropy_coef = getattr(cfg, "entropy_coef", 0.0)
    pick = lambda t, rows: None if t is None else t[rows]

    def micro_loss(rows: slice):
        mb = batch.rows(rows)
        logprobs, entropy = response_logprobs(policy, mb, temperature=temperature, return_entropy=True)
        if corr is not None:
            corr.add(logprobs, rollout_logprobs[rows], mb.response_mask)
        loss, metrics = K.grpo_loss(
            logprobs, old_logprobs[rows], advantages[rows], mb.response_mask,
            clip_ratio_low=cfg.clip_ratio_low, clip_ratio_high=cfg.clip_ratio_high, loss_agg_mode=cfg.loss_agg_mode,
            ref_logprobs=pick(ref_logprobs, rows), kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator,
            rollout_is_weights=pick(isw, rows), **denominators,
        )
        if entropy_coef:  # entropy bonus (veRL entropy_coeff), aggregated like the policy loss
            loss = loss - entropy_coef * agg_loss_ref(entropy, mb.response_mask, cfg.loss_agg_mode, **denominators)
        share = mb.num_tokens / n_tok  # token means: weight each micro-batch by its tokens; pg_loss is a loss share
        shares = {_POLICY_METRICS.get(name, name): value.item() * (1.0 if name == "pg_loss" else share)
                  for name, value in metrics.items()}
        shares["entropy"] = float(torch.where(mb.response_mask.bool(), entropy.detach(), 0.0).sum()) / n_tok
        return loss, shares

    result = accumulated_step(policy, optimizer, micro_slices(batch.labels.shape[0], cfg.micro_batch_size),
                              micro_loss, max_grad_norm=max_grad_norm, device_type=batch.input_ids.device.type,
                              autocast_dtype=autocast_dtype)
    nan = float("nan")
    m = result.metrics
    result.metrics = {"loss": m["loss"], "pg_loss": m.get("pg_loss", nan), "kl": m.get("kl", nan),
                      "entropy": m.get("entropy", nan), **{name: m.get(name, nan) for name in _CLIP_METRICS},
                      "ppo_kl": m.get("ppo_kl", nan), "grad_norm": m["grad_norm"],
                      **(corr.metrics() if corr is not None else {})}
    return result
