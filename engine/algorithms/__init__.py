"""How a batch becomes a loss: SFT and GRPO (reward model, DPO and PPO arrive with the classic-RLHF issue). Every loss
goes through ``kernels``."""

from engine.algorithms.batching import TokenBatch, make_batch, response_logprobs
from engine.algorithms.grpo import PolicyUpdateResult, compute_advantages, policy_update, rollout_is_weights
from engine.algorithms.sft import sft_loss

__all__ = ["PolicyUpdateResult", "TokenBatch", "compute_advantages", "make_batch", "policy_update",
           "response_logprobs", "rollout_is_weights", "sft_loss"]
