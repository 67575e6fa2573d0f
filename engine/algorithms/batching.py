"""Turning token lists into padded tensors, and the policy's log-probs of response tokens through the fused LM head.

Layout: each row is ``prompt + response`` right-padded to ``L``; the response token ``t`` of row ``b`` sits at
position ``prompt_len[b] + t`` and is predicted by the hidden state at the position before it. Log-probs are computed
only at response positions, with ``kernels.fused_linear_logprobs`` (the ``[N, V]`` logits never exist).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import kernels as K
from engine.algorithms.accumulation import mixed_precision
from engine.algorithms.packing import PackedBatch, packed_hidden
from engine.distributed.fsdp import call_in_root


@dataclass
class TokenBatch:
    """``B`` rows of prompt + response, right-padded.

    input_ids ``[B, L]`` int64; attention_mask ``[B, L]`` int64; response_index ``[B, T]`` int64 (position of the
    hidden state that predicts response token t; 0 where padded); labels ``[B, T]`` int64 (the response tokens, -100
    where padded); response_mask ``[B, T]`` bool."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_index: torch.Tensor
    labels: torch.Tensor
    response_mask: torch.Tensor

    @property
    def num_tokens(self) -> int:
        """Response tokens in the batch (host-side count)."""
        return int(self.response_mask.sum())

    def rows(self, sl: slice | torch.Tensor) -> TokenBatch:
        """The micro-batch of rows ``sl``: a slice (views) or a LongTensor of row indices (copies, in that order); the
        padded length ``T`` of the whole batch is kept."""
        return TokenBatch(*(t[sl] for t in (self.input_ids, self.attention_mask, self.response_index, self.labels,
                                             self.response_mask)))


def check_like_mask(name: str, t: torch.Tensor, shape: torch.Size) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``t`` is a tensor of ``shape`` (the response mask's ``[B, T]``)."""
    if not isinstance(t, torch.Tensor) or t.shape != shape:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must have shape {tuple(shape)} (like response_mask), got {got}")


def make_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int, device) -> TokenBatch:
    """Pad ``prompts[b] + responses[b]`` into a ``TokenBatch``. Raises ``ValueError`` on an empty prompt or length
    mismatch."""
    if len(prompts) != len(responses):
        raise ValueError(f"prompts and responses must pair up, got {len(prompts)} and {len(responses)}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (the first response token is predicted from it)")
    B = len(prompts)
    L = max(len(p) + len(r) for p, r in zip(prompts, responses))
    T = max((len(r) for r in responses), default=0)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attention = torch.zeros((B, L), dtype=torch.long)
    index = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        n = len(p) + len(r)
        input_ids[b, :n] = torch.tensor(p + r)
        attention[b, :n] = 1
        index[b, :len(r)] = torch.arange(len(p) - 1, n - 1)
        labels[b, :len(r)] = torch.tensor(r, dtype=torch.long)
    return TokenBatch(input_ids.to(device), attention.to(device), index.to(device), labels.to(device),
                      (labels != -100).to(device))


def make_pair_batch(prompts: list[list[int]], chosen: list[list[int]], rejected: list[list[int]], pad_id: int,
                    device) -> TokenBatch:
    """A ``TokenBatch`` of ``2B`` rows for ``B`` preference pairs, so that one forward pass scores both halves.

    Rows ``0 .. B-1`` are ``prompts[i] + chosen[i]``, rows ``B .. 2B-1`` are ``prompts[i] + rejected[i]``
    (``make_batch`` on the concatenated lists, so both halves share the padded lengths ``L`` and ``T``): row ``i`` and
    row ``B + i`` are the two sides of pair ``i``. Raises ``ValueError`` for lists of different lengths, ``B == 0``,
    or an empty prompt."""
    if not len(prompts) == len(chosen) == len(rejected):
        raise ValueError(f"prompts, chosen and rejected must pair up, got {len(prompts)}, {len(chosen)} and "
                         f"{len(rejected)}")
    if len(prompts) == 0:
        raise ValueError("make_pair_batch needs at least one pair, got none")
    return make_batch(list(prompts) + list(prompts), list(chosen) + list(rejected), pad_id, device)


def response_logprobs(model, batch: TokenBatch | PackedBatch, *, temperature: float = 1.0,
                      return_entropy: bool = False):
    """Log-probs ``[B, T]`` float32 of the response tokens under ``model`` (a HF causal LM), 0 where padded; with
    ``return_entropy`` also the entropy ``[B, T]``. Differentiable in the model's parameters.

    Runs the decoder body (``model.model``), gathers the hidden states at response positions and applies the LM head
    with ``kernels.fused_linear_logprobs`` (logits divided by ``temperature``, the rollout's sampling temperature).
    ``batch`` may be packed (``engine.algorithms.packing.PackedBatch``: one row of ``N`` tokens, no padding): the
    same ``[B, T]`` come back. A model sharded with FSDP runs all of it inside its root's forward
    (``engine.distributed.call_in_root``)."""
    return call_in_root(model, _response_logprobs, batch, temperature, return_entropy)


def _response_logprobs(model, batch: TokenBatch | PackedBatch, temperature: float, return_entropy: bool):
    B, T = batch.labels.shape
    if isinstance(batch, PackedBatch):  # hidden [1, N, H]: the response states by their flat positions
        picked = packed_hidden(model.model, batch)[0].index_select(0, batch.response_index.reshape(-1))
    else:
        hidden = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        H = hidden.shape[-1]
        picked = hidden.gather(1, batch.response_index[..., None].expand(B, T, H)).reshape(B * T, H)
    head = model.get_output_embeddings()
    out = K.fused_linear_logprobs(picked, head.weight.to(picked.dtype), batch.labels.reshape(-1),
                                  bias=head.bias, temperature=temperature, return_entropy=return_entropy)
    if return_entropy:
        return out[0].reshape(B, T), out[1].reshape(B, T)
    return out.reshape(B, T)


@torch.no_grad()
def map_pairs(model, pairs: list, row_fn, *, pad_id: int, device, batch_size: int = 32,
              autocast_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``row_fn(model, batch) -> [2b]`` over ``pairs`` (objects with ``prompt_ids``, ``chosen_ids``, ``rejected_ids``;
    ``engine.data.preferences.TokenizedPair``), ``batch_size`` pairs per ``make_pair_batch`` forward pass, under
    autocast to ``autocast_dtype`` when given, the model in eval mode (its mode restored). Returns
    ``(chosen [P], rejected [P])`` float32 on the CPU (two empty tensors for ``P == 0``); one host sync per batch.
    Raises ``ValueError`` for ``batch_size < 1``. Reward-model scores and DPO reference log-probs use it."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()
    chosen_out, rejected_out = [], []
    try:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            batch = make_pair_batch([p.prompt_ids for p in chunk], [p.chosen_ids for p in chunk],
                                    [p.rejected_ids for p in chunk], pad_id, device)
            with mixed_precision(batch.input_ids.device.type, autocast_dtype):
                values = row_fn(model, batch).float().cpu()
            chosen_out.append(values[:len(chunk)])
            rejected_out.append(values[len(chunk):])
    finally:
        model.train(was_training)
    if not chosen_out:
        return torch.zeros(0), torch.zeros(0)
    return torch.cat(chosen_out), torch.cat(rejected_out)
