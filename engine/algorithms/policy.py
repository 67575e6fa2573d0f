"""The clipped policy loss and its optimizer step, shared by GRPO and PPO's actor (Schulman et al. 2017, PPO; Shao et
al. 2024, GRPO; Yu et al. 2025, clip-higher; Liu et al. 2025, Dr. GRPO; the truncated IS correction of TRL/veRL).

``policy_update`` runs ``kernels.grpo_loss`` over micro-batches (``engine.algorithms.accumulation``), every
micro-batch normalised by the whole batch's counts (``global_denominators``), so the update does not depend on the
micro-batch size. Letters: ``B`` rows, ``T`` response tokens.
"""

from __future__ import annotations

import torch

import kernels as K
from engine.algorithms.accumulation import StepResult, accumulated_step
from engine.algorithms.batching import TokenBatch, response_logprobs
from engine.algorithms.packing import micro_batch, plan_micro_batches
from engine.algorithms.rollout_corr import RolloutCorrection, RolloutCorrMetrics
from engine.distributed.context import all_reduce_max, all_reduce_sum
from kernels.loss_agg import agg_loss_ref

# kernels.grpo_loss's metric names -> the engine's (TRL's) where they differ
_POLICY_METRICS = {"pg_clipfrac": "clip_ratio/region_mean"}
_CLIP_METRICS = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")


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


def policy_update(policy, optimizer, batch: TokenBatch, old_logprobs: torch.Tensor | None, advantages: torch.Tensor, *,
                  ref_logprobs: torch.Tensor | None, cfg, temperature: float, max_grad_norm: float,
                  rollout_logprobs: torch.Tensor | None = None, autocast_dtype: torch.dtype | None = None,
                  loss_scale_factor: float | None = None, measure_rollout_corr: bool = False) -> StepResult:
    """One optimizer step of the policy loss (``kernels.grpo_loss``: PPO's clipped surrogate, GSPO or CISPO, by
    ``cfg.policy_loss``) on ``batch`` (``B`` samples), accumulated over micro-batches.

    ``old_logprobs`` ``[B, T]``: the log-probs of the policy that sampled the batch, or None when this update runs
    exactly those weights (the first pass after the rollout): each micro-batch then uses its own detached log-probs
    (the ratio is exactly 1, as TRL does with one iteration), which saves a forward over the batch.
    ``advantages``: ``[B]`` per sequence or ``[B, T]`` per token.

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

    Rollout correction (``cfg.rollout_is``, with ``rollout_logprobs``): per micro-batch, importance weights of the
    old log-probs over the generator's (``RolloutCorrection``: token or sequence level, truncated or masking)
    multiply the token losses; their ``rollout_corr/is_weight_*`` statistics are added when
    ``measure_rollout_corr``.
    """
    if measure_rollout_corr and rollout_logprobs is None:
        raise ValueError("measure_rollout_corr=True needs the generator's rollout_logprobs")
    corr = RolloutCorrMetrics() if measure_rollout_corr else None
    correction = RolloutCorrection.from_config(cfg) if rollout_logprobs is not None else None
    policy_loss = getattr(cfg, "policy_loss", "vanilla")
    denominators = global_denominators(batch, loss_scale_factor)
    n_tok = denominators["global_num_tokens"]
    entropy_coef = getattr(cfg, "entropy_coef", 0.0)
    pick = lambda t, rows: None if t is None else t[rows]

    def micro_loss(rows: slice):
        mb = micro_batch(batch, rows, getattr(cfg, "max_tokens_per_micro_batch", None))  # packed when set
        logprobs, entropy = response_logprobs(policy, mb, temperature=temperature, return_entropy=True)
        if corr is not None:
            corr.add(logprobs, rollout_logprobs[rows], mb.response_mask)
        old = logprobs.detach() if old_logprobs is None else old_logprobs[rows]
        isw = None if correction is None else correction.weights(old, rollout_logprobs[rows], mb.response_mask)
        loss, metrics = K.grpo_loss(
            logprobs, old, advantages[rows], mb.response_mask, policy_loss=policy_loss,
            clip_ratio_low=cfg.clip_ratio_low, clip_ratio_high=cfg.clip_ratio_high, loss_agg_mode=cfg.loss_agg_mode,
            ref_logprobs=pick(ref_logprobs, rows), kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator,
            rollout_is_weights=isw, **denominators,
        )
        if entropy_coef:  # entropy bonus (veRL entropy_coeff), aggregated like the policy loss
            loss = loss - entropy_coef * agg_loss_ref(entropy, mb.response_mask, cfg.loss_agg_mode, **denominators)
        share = mb.num_tokens / n_tok  # token means: weight each micro-batch by its tokens; pg_loss is a loss share
        shares = {_POLICY_METRICS.get(name, name): value.item() * (1.0 if name == "pg_loss" else share)
                  for name, value in metrics.items()}
        shares["entropy"] = float(torch.where(mb.response_mask.bool(), entropy.detach(), 0.0).sum()) / n_tok
        return loss, shares

    result = accumulated_step(policy, optimizer,
                              plan_micro_batches(batch, cfg.micro_batch_size,
                                                 getattr(cfg, "max_tokens_per_micro_batch", None)),
                              micro_loss, max_grad_norm=max_grad_norm, device_type=batch.input_ids.device.type,
                              autocast_dtype=autocast_dtype)
    nan = float("nan")
    m = result.metrics
    result.metrics = {"loss": m["loss"], "pg_loss": m.get("pg_loss", nan), "kl": m.get("kl", nan),
                      "entropy": m.get("entropy", nan), **{name: m.get(name, nan) for name in _CLIP_METRICS},
                      "ppo_kl": m.get("ppo_kl", nan), "grad_norm": m["grad_norm"],
                      **(corr.metrics() if corr is not None else {}),
                      **(correction.metrics() if correction is not None and corr is not None else {})}
    if ref_logprobs is None:  # no reference, no KL: the kernel's 0 would be a metric that is 0 by construction
        del result.metrics["kl"]
    return result
