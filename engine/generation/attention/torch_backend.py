"""The portable backend: PyTorch's ``scaled_dot_product_attention`` over K/V gathered from the paged cache. Runs on
any device (the CPU path of the generator, and the reference the faster backends are tested against).

Decode (one new token per sequence) is batched: the contexts are gathered into a padded ``[S, H_kv, L_max, D]`` and
masked by length. Prefill loops over the sequences (each is one SDPA call with an explicit bottom-right causal mask;
``is_causal=True`` would align the mask top-left, wrong whenever cached tokens precede the new ones).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.generation.attention.base import AttentionBackend, write_kv
from engine.generation.attention.metadata import AttentionMetadata


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` cached tokens of one sequence: ``cache [num_blocks, block_size, H_kv, D]``, its
    ``block_table [max_blocks]`` -> ``[length, H_kv, D]`` (a gather: a copy)."""
    block_size = cache.shape[1]
    n_blocks = -(-length // block_size)
    return cache[block_table[:n_blocks].long()].flatten(0, 1)[:length]


class TorchAttention(AttentionBackend):
    """SDPA over gathered paged K/V; see the module docstring."""

    name = "torch"

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        if meta.is_decode:
            return self._decode(q, k_cache, v_cache, meta, scale)
        out = torch.empty_like(q)
        start = 0
        for s, (q_len, ctx) in enumerate(zip(meta.query_lens_list, meta.context_lens_list)):
            ks = gather_context(k_cache, meta.block_tables[s], ctx)
            vs = gather_context(v_cache, meta.block_tables[s], ctx)
            qs = q[start:start + q_len]
            # new token i sits at position ctx - q_len + i and sees positions <= it
            rows = torch.arange(ctx - q_len, ctx, device=q.device)[:, None]
            mask = torch.arange(ctx, device=q.device)[None, :] <= rows
            out[start:start + q_len] = self._sdpa(qs, ks, vs, mask, scale)
            start += q_len
        return out

    @staticmethod
    def _sdpa(q, k, v, mask, scale):
        """``q [Q, H, D]``, ``k, v [L, H_kv, D]``, ``mask [Q, L]`` bool -> ``[Q, H, D]``."""
        groups = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1).to(q.dtype),
                                           v.transpose(0, 1).to(q.dtype), attn_mask=mask, scale=scale)
        return o.transpose(0, 1)

    @staticmethod
    def _decode(q, k_cache, v_cache, meta: AttentionMetadata, scale):
        S, H, D = q.shape
        H_kv = k_cache.shape[2]
        L = meta.max_context_len
        block_size = meta.block_size
        n_blocks = -(-L // block_size)
        table = meta.block_tables[:, :n_blocks].long()
        k = k_cache[table].reshape(S, n_blocks * block_size, H_kv, D)[:, :L]
        v = v_cache[table].reshape(S, n_blocks * block_size, H_kv, D)[:, :L]
        groups = H // H_kv
        k = k.repeat_interleave(groups, dim=2).permute(0, 2, 1, 3).to(q.dtype)  # [S, H, L, D]
        v = v.repeat_interleave(groups, dim=2).permute(0, 2, 1, 3).to(q.dtype)
        mask = torch.arange(L, device=q.device)[None, :] < meta.context_lens[:, None]  # [S, L]
        o = F.scaled_dot_product_attention(q[:, :, None, :], k, v, attn_mask=mask[:, None, None, :], scale=scale)
        return o[:, :, 0, :]
