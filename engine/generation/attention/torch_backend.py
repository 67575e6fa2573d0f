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


def grouped_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention with grouped K/V heads (GQA) without repeating K/V: ``q [B, Q, H, D]``, ``k, v [B, L, H_kv, D]``,
    ``mask [B, Q, L]`` bool (True = attend) -> ``[B, Q, H, D]`` in q's dtype.

    The ``G = H / H_kv`` query heads that share a K/V head become ``G`` extra query rows of that head, so SDPA sees
    ``[B, H_kv, Q*G, D]`` against ``[B, H_kv, L, D]``."""
    B, Q, H, D = q.shape
    L, H_kv = k.shape[1], k.shape[2]
    G = H // H_kv
    qg = q.reshape(B, Q, H_kv, G, D).permute(0, 2, 1, 3, 4).reshape(B, H_kv, Q * G, D)
    m = mask[:, None, :, None, :].expand(B, 1, Q, G, L).reshape(B, 1, Q * G, L)
    o = F.scaled_dot_product_attention(qg, k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype),
                                       attn_mask=m, scale=scale)
    return o.reshape(B, H_kv, Q, G, D).permute(0, 2, 1, 3, 4).reshape(B, Q, H, D)


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
            out[start:start + q_len] = grouped_sdpa(qs[None], ks[None], vs[None], mask[None], scale)[0]
            start += q_len
        return out

    @staticmethod
    def _decode(q, k_cache, v_cache, meta: AttentionMetadata, scale):
        S, _, D = q.shape
        H_kv = k_cache.shape[2]
        L = meta.max_context_len
        block_size = meta.block_size
        n_blocks = -(-L // block_size)
        table = meta.block_tables[:, :n_blocks].long()
        k = k_cache[table].reshape(S, n_blocks * block_size, H_kv, D)[:, :L]
        v = v_cache[table].reshape(S, n_blocks * block_size, H_kv, D)[:, :L]
        mask = torch.arange(L, device=q.device)[None, :] < meta.context_lens[:, None]  # [S, L]
        return grouped_sdpa(q[:, None], k, v, mask[:, None, :], scale)[:, 0]
