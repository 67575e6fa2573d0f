"""Supervised fine-tuning (the cold start): masked next-token loss on the completion tokens only, through the fused
LM head (``kernels.fused_linear_logprobs``)."""

from __future__ import annotations

import torch

from engine.algorithms.batching import TokenBatch, response_logprobs
from engine.algorithms.packing import PackedBatch


def sft_loss(model, batch: TokenBatch | PackedBatch, *, num_tokens: int | None = None) -> torch.Tensor:
    """Mean negative log-likelihood of the completion tokens of ``batch`` (prompt tokens are not trained on); a
    packed batch (``engine.algorithms.packing``) gives the padded batch's loss.

    ``num_tokens``: the denominator; pass the token count of the whole (accumulated) batch so that micro-batch losses
    sum to the full-batch loss; default: this micro-batch's own count. Returns a 0-d float32 tensor."""
    logprobs = response_logprobs(model, batch)
    denom = num_tokens if num_tokens is not None else max(batch.num_tokens, 1)
    return -(logprobs * batch.response_mask).sum() / denom
