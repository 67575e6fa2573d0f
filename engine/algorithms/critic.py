"""The critic of PPO (Schulman et al. 2017; InstructGPT, Ouyang et al. 2022): its values of the response states and
its clipped value-loss step (``kernels.value_loss``, veRL's ``compute_value_loss``), accumulated over micro-batches
with the whole batch's denominators exactly as the policy's step (``engine.algorithms.policy``). Metric names are
veRL's (``critic/*``), TRL having no critic. Letters: ``B`` rows, ``T`` response tokens.
"""

from __future__ import annotations

import torch

import kernels as K
from engine.algorithms.accumulation import StepResult, accumulated_step
from engine.algorithms.batching import TokenBatch, check_like_mask
from engine.algorithms.packing import PackedBatch, micro_batch, plan_micro_batches
from engine.algorithms.policy import global_denominators
from engine.models.value_model import token_values


def critic_values(critic, batch: TokenBatch | PackedBatch) -> torch.Tensor:
    """``[B, T]`` float32 values ``V(s_t)`` of each response token's state: ``token_values(critic, batch.input_ids,
    batch.attention_mask)`` (``engine.models.value_model``) gathered at ``batch.response_index``, times
    ``response_mask``. Differentiable. A packed batch (``engine.algorithms.packing``) gives the same ``[B, T]``,
    gathered from the values ``[1, N]`` of its flat row."""
    if isinstance(batch, PackedBatch):
        return token_values(critic, batch)[0][batch.response_index] * batch.response_mask
    values = token_values(critic, batch.input_ids, batch.attention_mask)
    return values.gather(1, batch.response_index) * batch.response_mask


def critic_update(critic, optimizer, batch: TokenBatch, old_values: torch.Tensor, returns: torch.Tensor, *,
                  cliprange_value: float | None, loss_agg_mode: str, micro_batch_size: int, max_grad_norm: float,
                  autocast_dtype: torch.dtype | None = None, loss_scale_factor: float | None = None,
                  max_tokens_per_micro_batch: int | None = None) -> StepResult:
    """One optimizer step of ``kernels.value_loss`` over ``batch``, accumulated over micro-batches of
    ``micro_batch_size`` rows (with ``max_tokens_per_micro_batch``: packed micro-batches of at most that many tokens,
    ``engine.algorithms.packing``), each normalised by the whole batch's ``global_denominators``
    (``loss_scale_factor`` None -> the batch's ``T``), so the summed gradient equals the full-batch gradient. A
    non-finite loss or gradient norm skips the step (``stepped=False``,
    ``engine.algorithms.accumulation.clip_and_step``).

    ``old_values``, ``returns``: ``[B, T]`` (the rollout critic's values and the GAE returns; no gradient); a wrong
    shape raises ``ValueError`` naming the argument. Metrics: ``critic/vf_loss``, ``critic/vf_clipfrac``,
    ``critic/vpred_mean``, ``critic/grad_norm`` (NaN but the grad norm when the loss was non-finite)."""
    check_like_mask("old_values", old_values, batch.response_mask.shape)
    check_like_mask("returns", returns, batch.response_mask.shape)
    denominators = global_denominators(batch, loss_scale_factor)
    n_tok = denominators["global_num_tokens"]

    def micro_loss(rows: slice):
        mb = micro_batch(batch, rows, max_tokens_per_micro_batch)
        values = critic_values(critic, mb)
        loss, metrics = K.value_loss(values, old_values[rows], returns[rows], mb.response_mask,
                                     cliprange_value=cliprange_value, loss_agg_mode=loss_agg_mode, **denominators)
        share = mb.num_tokens / n_tok  # the metrics are token means: weight each micro-batch by its tokens
        return loss, {name: value.item() * share for name, value in metrics.items()}

    micro_batches = plan_micro_batches(batch, micro_batch_size, max_tokens_per_micro_batch)
    result = accumulated_step(critic, optimizer, micro_batches, micro_loss,
                              max_grad_norm=max_grad_norm, device_type=batch.input_ids.device.type,
                              autocast_dtype=autocast_dtype)
    m = result.metrics
    result.metrics = {"critic/vf_loss": m["loss"],
                      **{f"critic/{name}": m.get(name, float("nan")) for name in ("vf_clipfrac", "vpred_mean")},
                      "critic/grad_norm": m["grad_norm"]}
    return result
