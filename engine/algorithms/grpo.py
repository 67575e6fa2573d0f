"""GRPO (DeepSeekMath, Shao et al. 2024): group-normalised outcome advantages, and RLOO's leave-one-out ones. The
policy loss and its update (clip-higher, GSPO/CISPO, KL to a reference, loss aggregation, Dr. GRPO, rollout
correction) are shared with PPO's actor: ``engine.algorithms.policy``."""

from __future__ import annotations

import torch

import kernels as K

# veRL's adv_estimator names of the estimators the GRPO trainer runs (reinforce_plus_plus: engine.algorithms.returns)
ADV_ESTIMATORS = ("grpo", "rloo", "reinforce_plus_plus")


def compute_advantages(scores: torch.Tensor, num_generations: int, *, estimator: str = "grpo",
                       norm_by_std: bool = True, unbiased_std: bool = True, epsilon: float = 1e-6) -> torch.Tensor:
    """``[B]`` float32 group advantages of ``scores [B]`` (rows ``g*G .. g*G+G-1`` are group g), via
    ``kernels.group_advantages``: ``estimator="grpo"`` (``(R - mean_g) / (std_g + epsilon)``, or ``R - mean_g``
    without ``norm_by_std``: Dr. GRPO) or ``"rloo"`` (``R_i`` minus the mean of the other ``G - 1`` rewards of its
    group; Ahmadian et al. 2024). Raises ``ValueError`` for another estimator."""
    if estimator not in ("grpo", "rloo"):
        raise ValueError(f"estimator must be 'grpo' or 'rloo' for group advantages, got {estimator!r}")
    return K.group_advantages(scores.float(), num_generations, estimator=estimator, norm_by_std=norm_by_std,
                              unbiased_std=unbiased_std, epsilon=epsilon)


