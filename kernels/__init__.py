"""rlhf-engine kernels: fused Triton kernels for RLHF losses, each with a float64-correct PyTorch reference.

``import kernels as K``. Every public function validates its inputs, then dispatches: CUDA tensors -> Triton, CPU
tensors -> the compiled C++ kernel where ``csrc/`` has one (built on first use; ``has_extension()``), else the
reference (``RLHF_KERNELS_BACKEND=triton|cpp|torch`` forces one). All log-prob, ratio, KL and loss math
runs in float32 whatever the input dtype (float64 inputs run the float64 reference). Besides the RLHF losses, the
generator's fused layer ops live here (``rms_norm``, ``fused_add_rms_norm``, ``silu_and_mul``, ``rope_and_cache``):
they return the model dtype, rounded where Hugging Face's modelling code rounds (``silu_and_mul``'s kernel: once).
Contract: ``DESIGN.md``.

Name clash: Hugging Face's ``kernels`` distribution (the hub kernel loader) also installs a top-level package named
``kernels``. This package carries the marker ``__rlhf_engine_kernels__``; ``engine`` checks it on import and fails with
a clear message when the other package shadows this one.
"""

from kernels._backend import describe as backend_report
from kernels._extension import has_extension
from kernels.advantages import (
    ADVANTAGE_ESTIMATORS,
    group_advantages,
    group_advantages_ref,
    masked_whiten,
    masked_whiten_ref,
)
from kernels.dpo_loss import DPO_LOSS_TYPES, dpo_loss, dpo_loss_ref
from kernels.fused_linear_logprobs import fused_linear_logprobs, fused_linear_logprobs_ref
from kernels.gae import discounted_returns, discounted_returns_ref, gae, gae_ref
from kernels.kl import KL_ESTIMATORS, kl_penalty, kl_penalty_ref
from kernels.logprobs import (
    entropy_from_logits,
    entropy_from_logits_ref,
    logprobs_from_logits,
    logprobs_from_logits_ref,
)
from kernels.loss_agg import LOSS_AGG_MODES, agg_loss_ref
from kernels.ppo_loss import POLICY_LOSSES, grpo_loss, ppo_loss, ppo_loss_ref
from kernels.reward_loss import pairwise_reward_loss, pairwise_reward_loss_ref
from kernels.rms_norm import fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref
from kernels.rope_cache import rope_and_cache, rope_and_cache_ref
from kernels.sampling import race_sample
from kernels.silu_mul import silu_and_mul, silu_and_mul_ref
from kernels.value_loss import value_loss, value_loss_ref

__rlhf_engine_kernels__ = True
__version__ = "0.1.0"

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "DPO_LOSS_TYPES",
    "KL_ESTIMATORS",
    "LOSS_AGG_MODES",
    "POLICY_LOSSES",
    "agg_loss_ref",
    "backend_report",
    "discounted_returns",
    "discounted_returns_ref",
    "dpo_loss",
    "dpo_loss_ref",
    "entropy_from_logits",
    "entropy_from_logits_ref",
    "fused_add_rms_norm",
    "fused_add_rms_norm_ref",
    "fused_linear_logprobs",
    "fused_linear_logprobs_ref",
    "gae",
    "gae_ref",
    "group_advantages",
    "group_advantages_ref",
    "has_extension",
    "grpo_loss",
    "kl_penalty",
    "kl_penalty_ref",
    "logprobs_from_logits",
    "logprobs_from_logits_ref",
    "masked_whiten",
    "masked_whiten_ref",
    "pairwise_reward_loss",
    "pairwise_reward_loss_ref",
    "ppo_loss",
    "ppo_loss_ref",
    "race_sample",
    "rms_norm",
    "rms_norm_ref",
    "rope_and_cache",
    "rope_and_cache_ref",
    "silu_and_mul",
    "silu_and_mul_ref",
    "value_loss",
    "value_loss_ref",
]
