"""DPO (Rafailov et al. 2023, "Direct Preference Optimization") and its cDPO / robust / IPO variants, on pair batches.

The policy is a causal LM; a pair batch (``make_pair_batch``) holds ``2B`` rows, chosen first, so one forward pass
gives the sequence log-probs of both sides of ``B`` pairs. The frozen reference model's log-probs are computed once
before training (``reference_logprobs``, as TRL's ``precompute_ref_log_probs``), so the reference never sits in memory
next to the policy during the update. The loss is ``kernels.dpo_loss`` (formulas and metric names in its module
docstring: Rafailov et al. 2023; Mitchell 2023 for cDPO; Chowdhury et al. 2024 for robust DPO; Azar et al. 2023 for
IPO, which uses length-averaged log-probs: ``average=True``). Dims: ``B`` pairs per batch, ``P`` pairs in a dataset,
``T`` padded response length.
"""

from __future__ import annotations

import torch

import kernels as K
from engine.algorithms.batching import TokenBatch, map_pairs, response_logprobs
from engine.algorithms.stats import wilson_interval


def sequence_logprobs(model, batch: TokenBatch, *, average: bool = False) -> torch.Tensor:
    """Log-prob of each row's response under the causal LM ``model``: ``[rows]`` float32 in nats, differentiable.

    The sum over the response tokens (``batch.response_mask``) of the per-token log-probs
    (``engine.algorithms.batching.response_logprobs``, the fused LM head, temperature 1); with ``average=True`` the
    mean over them instead (IPO, SimPO), the denominator being each row's own response length. A row with no
    response token gives 0."""
    logprobs = response_logprobs(model, batch)
    mask = batch.response_mask.to(logprobs.dtype)
    total = (logprobs * mask).sum(-1)
    if average:
        return total / mask.sum(-1).clamp_min(1.0)
    return total


@torch.no_grad()
def reference_logprobs(ref_model, pairs: list, *, pad_id: int, device, batch_size: int = 32,
                       autocast_dtype: torch.dtype | None = None, average: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Precompute, once before training, the frozen reference's sequence log-probs of ``P`` preference pairs.

    ``pairs``: objects with ``.prompt_ids``, ``.chosen_ids``, ``.rejected_ids`` token lists
    (``engine.data.preferences.TokenizedPair``), run ``batch_size`` pairs (``2 * batch_size`` rows) per forward pass
    on ``device``, under autocast to ``autocast_dtype`` when given. ``average`` as in ``sequence_logprobs`` (it must
    match the training loss's). Returns ``(ref_chosen_logps [P], ref_rejected_logps [P])`` float32 on the CPU (nats);
    ``P == 0`` gives two empty tensors. The model is in eval mode during the call, its previous mode restored. One host
    sync per batch. Raises ``ValueError`` for ``batch_size < 1``."""
    return map_pairs(ref_model, pairs, lambda m, b: sequence_logprobs(m, b, average=average), pad_id=pad_id,
                     device=device, batch_size=batch_size, autocast_dtype=autocast_dtype)


def dpo_step_loss(policy, batch: TokenBatch, ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, *,
                  beta: float, loss_type: str, label_smoothing: float = 0.0, average: bool = False
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DPO loss of ``policy`` on a pair batch, with TRL ``DPOTrainer``'s metrics.

    Args:
        policy: the causal LM being trained.
        batch: ``2B`` rows from ``make_pair_batch`` (rows ``0..B-1`` chosen, ``B..2B-1`` rejected).
        ref_chosen_logps: ``[B]`` float, the reference model's sequence log-probs of the chosen rows
            (``reference_logprobs``; any device: moved to the batch's, detached).
        ref_rejected_logps: ``[B]``, the same for the rejected rows.
        beta, loss_type, label_smoothing: as ``kernels.dpo_loss`` (``"sigmoid"`` DPO/cDPO, ``"robust"``, ``"ipo"``).
        average: length-averaged log-probs (``sequence_logprobs``); must match how the reference ones were computed.

    Returns:
        ``(loss, metrics)``: ``loss`` a differentiable 0-d float32 tensor, the mean over the ``B`` pairs;
        ``metrics`` detached 0-d float32 tensors: the kernel's ``rewards/chosen``, ``rewards/rejected``,
        ``rewards/accuracies``, ``rewards/margins`` (``beta`` times nats), plus ``logps/chosen`` and
        ``logps/rejected`` (means of the policy's sequence log-probs, nats). No host sync.

    Raises:
        ValueError: an odd (or zero) row count, reference tensors not ``[B]``, and ``kernels.dpo_loss``'s errors
            (``beta <= 0``, unknown ``loss_type``, bad ``label_smoothing``).
    """
    rows = batch.input_ids.shape[0]
    if rows == 0 or rows % 2:
        raise ValueError(f"dpo_step_loss needs a pair batch of 2B > 0 rows (make_pair_batch), got {rows} rows")
    B = rows // 2
    for name, ref in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
        if tuple(ref.shape) != (B,):
            raise ValueError(f"{name} must have shape ({B},) for a batch of {B} pairs, got {tuple(ref.shape)}")
    logps = sequence_logprobs(policy, batch, average=average)
    chosen, rejected = logps[:B], logps[B:]
    device = batch.input_ids.device
    loss, metrics = K.dpo_loss(chosen, rejected, ref_chosen_logps.detach().to(device),
                               ref_rejected_logps.detach().to(device), beta=beta, loss_type=loss_type,
                               label_smoothing=label_smoothing)
    metrics = dict(metrics)
    metrics["logps/chosen"] = chosen.detach().mean()
    metrics["logps/rejected"] = rejected.detach().mean()
    return loss, metrics


def evaluate_dpo(policy, pairs: list, ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, *,
                 pad_id: int, device, beta: float, loss_type: str, label_smoothing: float = 0.0,
                 average: bool = False, batch_size: int = 32, autocast_dtype: torch.dtype | None = None
                 ) -> dict[str, float]:
    """Held-out DPO metrics of ``policy`` on ``P`` pairs (``engine.data.preferences.TokenizedPair``), against the
    reference's sequence log-probs ``ref_chosen_logps`` / ``ref_rejected_logps`` (``[P]``, ``reference_logprobs``).

    The policy's sequence log-probs come from ``reference_logprobs`` (no gradient, eval mode, ``batch_size`` pairs per
    forward pass); the loss and metrics from ``kernels.dpo_loss`` with ``beta``, ``loss_type``, ``label_smoothing``
    over all ``P`` pairs at once. Returns host floats: ``eval/loss``, ``eval/rewards/{chosen,rejected,accuracies,
    margins}`` (TRL's names), the 95% Wilson interval of the reward accuracy (``eval/rewards/accuracies_ci_low|high``,
    ``engine.algorithms.stats.wilson_interval``) and ``eval/num_pairs``. Raises ``ValueError`` for ``P == 0`` or
    reference tensors that are not ``[P]``."""
    P = len(pairs)
    if P == 0:
        raise ValueError("evaluate_dpo needs at least one pair")
    for name, ref in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
        if tuple(ref.shape) != (P,):
            raise ValueError(f"{name} must have shape ({P},) for {P} pairs, got {tuple(ref.shape)}")
    chosen, rejected = reference_logprobs(policy, pairs, pad_id=pad_id, device=device, batch_size=batch_size,
                                          autocast_dtype=autocast_dtype, average=average)
    ref_chosen, ref_rejected = ref_chosen_logps.detach().float().cpu(), ref_rejected_logps.detach().float().cpu()
    loss, metrics = K.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta, loss_type=loss_type,
                               label_smoothing=label_smoothing)
    wins = int((((chosen - ref_chosen) - (rejected - ref_rejected)) > 0).sum())
    low, high = wilson_interval(wins, P)
    return {"eval/loss": float(loss), **{f"eval/{k}": float(v) for k, v in metrics.items()},
            "eval/rewards/accuracies_ci_low": low, "eval/rewards/accuracies_ci_high": high, "eval/num_pairs": P}
