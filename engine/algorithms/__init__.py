"""How a batch becomes a loss: SFT, GRPO, the reward model, DPO and PPO with a critic. Every loss goes through
``kernels``."""

from engine.algorithms.batching import TokenBatch, make_batch, make_pair_batch, response_logprobs
from engine.algorithms.dpo import dpo_step_loss, reference_logprobs, sequence_logprobs
from engine.algorithms.grpo import PolicyUpdateResult, compute_advantages, policy_update, rollout_is_weights
from engine.algorithms.ppo import (
    AdaptiveKLController,
    FixedKLController,
    critic_update,
    critic_values,
    gae_advantages,
    ppo_epochs,
    token_level_rewards,
)
from engine.algorithms.reward_model import pairwise_metrics, reward_model_loss, score_pairs
from engine.algorithms.sft import sft_loss

__all__ = ["AdaptiveKLController", "FixedKLController", "PolicyUpdateResult", "TokenBatch", "compute_advantages",
           "critic_update", "critic_values", "dpo_step_loss", "gae_advantages", "make_batch", "make_pair_batch",
           "pairwise_metrics", "policy_update", "ppo_epochs", "reference_logprobs", "response_logprobs",
           "reward_model_loss", "rollout_is_weights", "score_pairs", "sequence_logprobs", "sft_loss",
           "token_level_rewards"]
