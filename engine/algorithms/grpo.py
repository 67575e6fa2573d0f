"""GRPO (DeepSeekMath, Shao et al. 2024): group-normalised outcome advantages. The clipped policy loss and its update
(clip-higher, KL to a reference, loss aggregation, Dr. GRPO, truncated IS) are shared with PPO's actor:
``engine.algorithms.policy``."""

from __future__ import annotations

import torch

import kernels as K


def compute_advantages(scores: torch.Tensor, num_generations: int, *, norm_by_std: bool = True,
                       unbiased_std: bool = True, epsilon: float = 1e-6) -> torch.Tensor:
    """``[B]`` float32 GRPO advantages of ``scores [B]`` (rows ``g*G .. g*G+G-1`` are group g), via
    ``kernels.group_advantages``."""
    return K.group_advantages(scores.float(), num_generations, estimator="grpo", norm_by_std=norm_by_std,
                              unbiased_std=unbiased_std, epsilon=epsilon)


