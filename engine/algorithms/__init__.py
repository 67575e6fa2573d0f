"""How a batch becomes a loss and an optimizer step: SFT, GRPO, the reward model, DPO, and PPO's actor and critic.
Every loss goes through ``kernels``; every step through ``accumulation.accumulated_step``."""

from engine.algorithms.accumulation import StepResult, accumulated_step, clip_and_step, mixed_precision
from engine.algorithms.batching import TokenBatch, make_batch, make_pair_batch, response_logprobs
from engine.algorithms.critic import critic_update, critic_values
from engine.algorithms.dpo import dpo_step_loss, evaluate_dpo, reference_logprobs, sequence_logprobs
from engine.algorithms.grpo import compute_advantages
from engine.algorithms.policy import policy_update
from engine.algorithms.ppo import AdaptiveKLController, FixedKLController, gae_advantages, ppo_epochs
from engine.algorithms.returns import reinforce_plus_plus_advantages, token_level_rewards, whiten
from engine.algorithms.reward_model import pairwise_metrics, reward_model_loss, score_pairs
from engine.algorithms.rollout_corr import RolloutCorrection
from engine.algorithms.sft import sft_loss

__all__ = ["AdaptiveKLController", "FixedKLController", "RolloutCorrection", "StepResult", "TokenBatch",
           "accumulated_step", "clip_and_step", "compute_advantages", "critic_update", "critic_values",
           "dpo_step_loss", "evaluate_dpo", "gae_advantages", "make_batch", "make_pair_batch", "mixed_precision",
           "pairwise_metrics", "policy_update", "ppo_epochs", "reference_logprobs", "reinforce_plus_plus_advantages",
           "response_logprobs", "reward_model_loss", "score_pairs", "sequence_logprobs", "sft_loss",
           "token_level_rewards", "whiten"]
