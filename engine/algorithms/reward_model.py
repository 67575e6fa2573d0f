"""Reward-model training and evaluation: the Bradley-Terry pairwise loss on a pair batch, and held-out pair metrics.

The reward model is a Hugging Face ``*ForSequenceClassification`` with ``num_labels=1`` (``engine.models.value_model``);
its reward for a row is the score head at the row's last attended token (``sequence_scores``). A pair batch
(``make_pair_batch``) holds ``2B`` rows, chosen first, so one forward pass scores both sides of ``B`` pairs.

Math: Bradley & Terry 1952; Ouyang et al. 2022 (InstructGPT, the RM loss ``-log sigmoid(r_c - r_r)``); Touvron et al.
2023 (Llama 2, the margin); TRL ``RewardTrainer`` (reward centring, metric names). The loss itself is
``kernels.pairwise_reward_loss`` (one copy of the math). Dims: ``B`` pairs per batch, ``P`` pairs in a dataset.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import kernels as K
from engine.algorithms.batching import TokenBatch, map_pairs
from engine.algorithms.stats import wilson_interval
from engine.models.value_model import sequence_scores


def _split_halves(x: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x[:B], x[B:])`` for ``x`` of ``2B`` rows (chosen first). Raises ``ValueError`` for an odd or zero count."""
    rows = x.shape[0]
    if rows == 0 or rows % 2:
        raise ValueError(f"{what} needs a pair batch of 2B > 0 rows (chosen rows first, then rejected; "
                         f"make_pair_batch), got {rows} rows")
    return x[: rows // 2], x[rows // 2:]


def reward_model_loss(model, batch: TokenBatch, *, margin: torch.Tensor | float | None = None,
                      center_rewards_coefficient: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry loss of the reward model ``model`` on a pair batch, with TRL ``RewardTrainer``'s metrics.

    ``scores = sequence_scores(model, ...)`` over the ``2B`` rows of ``batch`` (rows ``0..B-1`` chosen, ``B..2B-1``
    rejected, as ``make_pair_batch`` lays them out); ``loss = mean_i -logsigmoid(r_c - r_r - margin)`` (plus
    ``c * mean((r_c + r_r)^2)`` with ``center_rewards_coefficient`` c), computed by ``kernels.pairwise_reward_loss``.

    Args:
        model: ``*ForSequenceClassification`` with one output (``value_model_from_causal_lm``, ``load_value_model``).
        batch: ``2B`` rows, right-padded.
        margin: None, a float, or a ``[B]`` float tensor (Llama 2's per-pair margin; moved to the scores' device; no
            gradient).
        center_rewards_coefficient: None or ``c >= 0`` (TRL suggests 0.01).

    Returns:
        ``(loss, metrics)``: ``loss`` a differentiable 0-d float32 tensor in nats; ``metrics`` detached 0-d float32
        tensors ``"accuracy"`` (fraction of pairs with ``r_c > r_r``, ties count as wrong, as in TRL), ``"margin"``
        (mean ``r_c - r_r``), ``"rewards/chosen"`` and ``"rewards/rejected"`` (mean scores). No host sync.

    Raises:
        ValueError: an odd (or zero) row count, an empty row; the kernel's errors for a bad margin/coefficient.
    """
    scores = sequence_scores(model, batch.input_ids, batch.attention_mask)
    chosen, rejected = _split_halves(scores, "reward_model_loss")
    if isinstance(margin, torch.Tensor):
        margin = margin.to(chosen.device)
    loss = K.pairwise_reward_loss(chosen, rejected, margin=margin,
                                  center_rewards_coefficient=center_rewards_coefficient)
    with torch.no_grad():
        diff = chosen.detach() - rejected.detach()
        metrics = {
            "accuracy": (diff > 0).float().mean(),
            "margin": diff.mean(),
            "rewards/chosen": chosen.detach().mean(),
            "rewards/rejected": rejected.detach().mean(),
        }
    return loss, metrics


@torch.no_grad()
def score_pairs(model, pairs: list, *, pad_id: int, device, batch_size: int = 32,
                autocast_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reward-model scores of ``P`` preference pairs: ``(chosen_scores [P], rejected_scores [P])``, float32 on the CPU.

    ``pairs``: objects with ``.prompt_ids``, ``.chosen_ids`` and ``.rejected_ids`` token lists
    (``engine.data.preferences.TokenizedPair``), scored ``batch_size`` pairs (``2 * batch_size`` rows) per forward
    pass on ``device`` under autocast to ``autocast_dtype`` when given. The model is in eval mode during the call
    and its previous mode is restored. One host sync per batch (the copy to the CPU). Raises ``ValueError`` for
    ``batch_size < 1``; ``P == 0`` gives two empty tensors."""
    return map_pairs(model, pairs, lambda m, b: sequence_scores(m, b.input_ids, b.attention_mask), pad_id=pad_id,
                     device=device, batch_size=batch_size, autocast_dtype=autocast_dtype)


def pairwise_metrics(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> dict[str, float]:
    """Held-out reward-model metrics of ``P`` scored pairs (``chosen_scores``, ``rejected_scores``: ``[P]`` float).

    Returns host floats: ``"eval/accuracy"`` (fraction of pairs with ``r_c > r_r``, a tie counts half),
    ``"eval/accuracy_ci_low"`` / ``"eval/accuracy_ci_high"`` (95% Wilson interval over the ``P`` pairs,
    ``engine.algorithms.stats.wilson_interval``),
    ``"eval/margin"`` (mean ``r_c - r_r``), ``"eval/loss"`` (mean ``-logsigmoid(r_c - r_r)``, nats, in float64) and
    ``"eval/num_pairs"``. Raises ``ValueError`` for shapes that are not the same ``[P]`` with ``P >= 1``."""
    if chosen_scores.dim() != 1 or chosen_scores.shape != rejected_scores.shape:
        raise ValueError(f"chosen_scores and rejected_scores must both be [P], got {tuple(chosen_scores.shape)} and "
                         f"{tuple(rejected_scores.shape)}")
    n = chosen_scores.shape[0]
    if n == 0:
        raise ValueError("pairwise_metrics needs at least one pair")
    diff = chosen_scores.detach().double().cpu() - rejected_scores.detach().double().cpu()
    wins = float((diff > 0).sum()) + 0.5 * float((diff == 0).sum())
    low, high = wilson_interval(wins, n)
    return {
        "eval/accuracy": wins / n,
        "eval/accuracy_ci_low": low,
        "eval/accuracy_ci_high": high,
        "eval/margin": float(diff.mean()),
        "eval/loss": float(-F.logsigmoid(diff).mean()),
        "eval/num_pairs": float(n),
    }
