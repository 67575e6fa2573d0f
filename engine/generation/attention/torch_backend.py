"""The portable backend: attention over the paged K/V cache with PyTorch ops, and on the CPU with the compiled
extension's paged-attention kernels. Runs on any device (the CPU path of the generator, and the reference the faster
backends are tested against).

CPU, float32/bf16/fp16, when the compiled extension is there (``csrc/cpu/paged_attention.cpp``, ``kernels._extension``;
off with ``RLHF_ENGINE_BUILD_EXT=0``): decode and a prefill after cached tokens read each sequence's K/V blocks in
place through its block table (vLLM's CPU approach), the query heads that share a K/V head together, online softmax
in float32: no copy of the contexts, one call per layer (measured at 128 contexts of 200 tokens: about 3x the
gather + fused-kernel path below). With ``prefix_groups`` decode is cascaded as below, each group's shared prefix read
once by ``paged_prefix_attention``. The step's K/V, when the model has not stored it, goes in by one
``reshape_and_cache`` call (``write_kv``'s two ``index_copy_`` cost 5x more at decode sizes).

Elsewhere (CUDA, float64 (the reference), no extension): decode (one new token per sequence) is batched: the contexts'
blocks are gathered with one ``index_select`` per cache into a buffer reused from step to step (no fresh multi-MB
allocation, no advanced-indexing slow path), and attended with a length mask by PyTorch's fused kernel. When the step's
metadata carries ``prefix_groups`` (the samples of a prompt sharing its prompt blocks; CPU only) the shared prefix is
gathered and attended ONCE per group, its ``G x H/H_kv`` query rows against it in one call, each sample's own suffix
separately, and the two partial results merged by their log-sum-exp (cascade attention: Hydragen, Juravsky et al.
2024; FlashInfer): the prompt's K/V is read once instead of G times. A prefill after cached tokens (not issued by the
generator, supported for callers) gathers each sequence's context and uses an explicit bottom-right causal mask
(``is_causal=True`` would align the mask top-left, wrong whenever cached tokens precede the new ones).

Prefill of whole prompts (the generator's prefills: a prompt, or a preempted sample's prompt + output, recomputed)
attends over the step's packed new K/V directly, without reading the cache back: one FlashAttention varlen call on
CUDA where torch has it, else one fused causal SDPA per prompt.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from engine.generation.attention.base import AttentionBackend, write_kv
from engine.generation.attention.metadata import AttentionMetadata, PrefixGroups
from kernels import _extension

# PyTorch's CPU flash-attention kernel, which also returns the log-sum-exp the cascade merge needs (the public SDPA
# does not); absent on other builds, where decode falls back to grouped_sdpa without the shared-prefix path.
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
try:  # FlashAttention over packed variable-length sequences (CUDA; torch >= 2.10)
    from torch.nn.attention.varlen import varlen_attn as _VARLEN
except ImportError:  # pragma: no cover - older torch
    _VARLEN = None


def _cpp_op(name: str, q: torch.Tensor, k_cache: torch.Tensor):
    """The compiled CPU op ``name`` when it runs these inputs (CPU; float32/bf16/fp16 queries, a cache in their dtype
    or float32; the extension built and enabled), else None. float64 keeps the PyTorch path: the reference."""
    if q.device.type != "cpu" or q.dtype == torch.float64 or k_cache.dtype not in (q.dtype, torch.float32):
        return None
    return _extension.op(name) if _extension.has_op(name) else None


def _merge(o_p, lse_p, o_s, lse_s):
    """Two partial softmaxes of the same query rows merged by their log-sum-exp (``o [..., D]``, ``lse [...]``); a
    part with ``lse = -inf`` (nothing attended) has weight 0."""
    m = torch.maximum(lse_p, lse_s)
    w_p, w_s = (lse_p - m).exp(), (lse_s - m).exp()
    return (o_p * w_p[..., None] + o_s * w_s[..., None]) / (w_p + w_s)[..., None]


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
    """Paged attention: the compiled CPU kernels where they run, else SDPA over gathered K/V; see the module
    docstring."""

    name = "torch"
    supports_prefix_groups = True  # decode reads AttentionMetadata.prefix_groups (on the CPU)
    accepts_kv_written = True  # the model's fused rope_and_cache may store K/V first

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float, *,
                kv_written: bool = False) -> torch.Tensor:
        if not kv_written:
            store = _cpp_op("reshape_and_cache", q, k_cache)
            if store is not None:  # one call for both caches (write_kv's two index_copy_ cost 5x more at decode)
                store(k.to(k_cache.dtype), v.to(v_cache.dtype), k_cache, v_cache, meta.slot_mapping)
            else:
                write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        if meta.is_decode:
            return self._decode(q, k_cache, v_cache, meta, scale)
        if meta.query_lens_list == meta.context_lens_list:  # whole prompts: nothing cached before them
            return self._prefill_packed(q, k.to(k_cache.dtype), v.to(v_cache.dtype), meta, scale)
        op = _cpp_op("paged_prefill_attention", q, k_cache)
        if op is not None:  # all sequences in one call, each context read in place
            return op(q, k_cache, v_cache, meta.block_tables, meta.context_lens, meta.cu_seqlens_q, scale).to(q.dtype)
        return self._prefill_from_cache(q, k_cache, v_cache, meta, scale)

    @staticmethod
    def _prefill_from_cache(q, k_cache, v_cache, meta: AttentionMetadata, scale):
        """Any prefill, one sequence at a time, each over its whole context gathered from the cache (this step's
        K/V already written) with a bottom-right causal mask."""
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

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}
        self._varlen_ok = _VARLEN is not None

    def _prefill_packed(self, q, k, v, meta: AttentionMetadata, scale):
        """Causal attention of whole prompts over their own packed new K/V (``k, v`` as the cache stores them): no
        gather from the cache. On CUDA, one FlashAttention varlen call over all prompts
        (``torch.nn.attention.varlen``) where this torch has it; else one fused SDPA call per prompt."""
        H, H_kv = q.shape[1], k.shape[1]
        if self._varlen_ok and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            try:
                longest = max(meta.query_lens_list)
                return _VARLEN(q, k.to(q.dtype), v.to(q.dtype), meta.cu_seqlens_q, meta.cu_seqlens_q, longest,
                               longest, scale=scale, window_size=(-1, 0), enable_gqa=H != H_kv)
            except (RuntimeError, TypeError, NotImplementedError) as err:  # an older torch, an unsupported shape
                self._varlen_ok = False
                warnings.warn(f"varlen FlashAttention unavailable ({type(err).__name__}: {err}); prefill attends "
                              "prompt by prompt", RuntimeWarning, stacklevel=2)
        out = torch.empty_like(q)
        start = 0
        for q_len in meta.query_lens_list:
            rows = slice(start, start + q_len)
            out[rows] = F.scaled_dot_product_attention(
                q[rows].transpose(0, 1), k[rows].transpose(0, 1).to(q.dtype), v[rows].transpose(0, 1).to(q.dtype),
                is_causal=True, scale=scale, enable_gqa=H != H_kv).transpose(0, 1)
            start += q_len
        return out

    def _gather(self, name: str, cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """``cache [num_blocks, block_size, H_kv, D]`` rows ``blocks [...]`` (int64) -> ``[*blocks.shape, block_size,
        H_kv, D]``, written into a buffer kept under ``name`` and grown when too small (one copy, no allocation once
        warm). The result is valid until the next call with the same ``name``."""
        n = blocks.numel()
        buf = self._buffers.get(name)
        if buf is None or buf.shape[0] < n or buf.shape[1:] != cache.shape[1:] or buf.dtype != cache.dtype \
                or buf.device != cache.device:
            buf = self._buffers[name] = torch.empty((max(n, 1),) + tuple(cache.shape[1:]), dtype=cache.dtype,
                                                    device=cache.device)
        out = buf[:n]
        torch.index_select(cache, 0, blocks.reshape(-1), out=out)
        return out.view(*blocks.shape, *cache.shape[1:])

    def _decode(self, q, k_cache, v_cache, meta: AttentionMetadata, scale):
        op = _cpp_op("paged_decode_attention", q, k_cache)
        if op is not None:
            return self._decode_cpp(op, q, k_cache, v_cache, meta, scale)
        if _FLASH_CPU is None or q.device.type != "cpu":
            return self._decode_sdpa(q, k_cache, v_cache, meta, scale)
        groups = meta.prefix_groups
        prefix_blocks = groups.seq_prefix_blocks if groups is not None else None
        o_s, lse_s = self._attend_contexts(q, k_cache, v_cache, meta, scale, prefix_blocks)
        if groups is None:
            return o_s.to(q.dtype).reshape(q.shape)
        o_p, lse_p = self._attend_prefixes(q, k_cache, v_cache, groups, meta.block_size, scale)
        return _merge(o_p, lse_p, o_s, lse_s).to(q.dtype).reshape(q.shape)  # rows in no group: lse_p = -inf

    def _decode_cpp(self, op, q, k_cache, v_cache, meta: AttentionMetadata, scale):
        """Decode by the compiled kernel over the blocks in place; with ``prefix_groups``, each sequence from its
        first unshared block on, merged with its group's prefix attended once (``_attend_prefixes``)."""
        groups = meta.prefix_groups
        start = groups.seq_prefix_blocks if groups is not None else None
        o_s, lse_s = op(q, k_cache, v_cache, meta.block_tables, meta.context_lens, start, scale)
        if groups is None:
            return o_s.to(q.dtype)
        o_p, lse_p = self._attend_prefixes(q, k_cache, v_cache, groups, meta.block_size, scale)
        return _merge(o_p, lse_p, o_s, lse_s).to(q.dtype)

    def _attend_contexts(self, q, k_cache, v_cache, meta: AttentionMetadata, scale, skip_blocks):
        """Each sequence's query against its cached context from block ``skip_blocks[s]`` on (all of it when None):
        ``(o [S, H_kv, r, D], lse [S, H_kv, r])`` in float32 (float64 for float64 inputs), ``r = H / H_kv`` query
        heads per K/V head."""
        S, H, D = q.shape
        H_kv, bs = k_cache.shape[2], meta.block_size
        if skip_blocks is None:
            lens, n_blocks = meta.context_lens.long(), -(-meta.max_context_len // bs)
            table = meta.block_tables[:, :n_blocks].long()
        else:  # each context from its first unshared block on
            lens = meta.context_lens.long() - skip_blocks * bs
            n_blocks = -(-int(lens.max()) // bs)  # the CPU: reading it back costs nothing
            index = (skip_blocks[:, None] + torch.arange(n_blocks, device=q.device)[None, :])
            table = meta.block_tables.long().gather(1, index.clamp(max=meta.block_tables.shape[1] - 1))
        k = self._gather("k", k_cache, table).view(S, n_blocks * bs, H_kv, D).transpose(1, 2).to(q.dtype)
        v = self._gather("v", v_cache, table).view(S, n_blocks * bs, H_kv, D).transpose(1, 2).to(q.dtype)
        keep = torch.arange(n_blocks * bs, device=q.device)[None, :] < lens[:, None]
        mask = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill_(~keep, float("-inf"))
        o, lse = _FLASH_CPU(q.reshape(S, H_kv, H // H_kv, D), k, v, 0.0, False, attn_mask=mask[:, None, None, :],
                            scale=scale)
        acc = torch.promote_types(q.dtype, torch.float32)  # merge precision: float32, or float64 inputs' own
        return o.to(acc), lse.to(acc)

    def _attend_prefixes(self, q, k_cache, v_cache, groups: PrefixGroups, block_size: int, scale):
        """Each group's shared prefix, read once, against the queries of all its members: ``(o [S, H_kv, r, D],
        lse [S, H_kv, r])`` (float32, or float64 for float64 inputs), ``lse = -inf`` and ``o = 0`` for rows in no
        group. The compiled kernel reads the blocks in place (``[S, H, D]`` and ``[S, H]``, the same rows)."""
        op = _cpp_op("paged_prefix_attention", q, k_cache)
        if op is not None:
            return op(q, k_cache, v_cache, groups.rows, groups.valid, groups.blocks, groups.num_blocks, scale)
        S, H, D = q.shape
        H_kv = k_cache.shape[2]
        r = H // H_kv
        P, G = groups.rows.shape
        B_p = groups.blocks.shape[1]
        k = self._gather("prefix_k", k_cache, groups.blocks).view(P, B_p * block_size, H_kv, D).transpose(1, 2)
        v = self._gather("prefix_v", v_cache, groups.blocks).view(P, B_p * block_size, H_kv, D).transpose(1, 2)
        k, v = k.to(q.dtype), v.to(q.dtype)  # a cache in another dtype than the queries (no copy when equal)
        # the G members x r heads of a K/V head are query rows of one call: [P, H_kv, G * r, D]
        qg = q[groups.rows.reshape(-1)].view(P, G, H_kv, r, D).permute(0, 2, 1, 3, 4).reshape(P, H_kv, G * r, D)
        keep = torch.arange(B_p * block_size, device=q.device)[None, :] < (groups.num_blocks * block_size)[:, None]
        mask = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill_(~keep, float("-inf"))
        o, lse = _FLASH_CPU(qg.contiguous(), k, v, 0.0, False, attn_mask=mask[:, None, None, :], scale=scale)
        acc = torch.promote_types(q.dtype, torch.float32)
        o = o.to(acc).view(P, H_kv, G, r, D).permute(0, 2, 1, 3, 4)  # [P, G, H_kv, r, D]
        lse = lse.to(acc).view(P, H_kv, G, r).permute(0, 2, 1, 3)
        out_o = torch.zeros((S, H_kv, r, D), dtype=acc, device=q.device)
        out_lse = torch.full((S, H_kv, r), float("-inf"), dtype=acc, device=q.device)
        rows = groups.rows[groups.valid]
        out_o[rows] = o[groups.valid]
        out_lse[rows] = lse[groups.valid]
        return out_o, out_lse

    @staticmethod
    def _decode_sdpa(q, k_cache, v_cache, meta: AttentionMetadata, scale):
        """Decode through the public SDPA over advanced-indexed contexts (builds without the CPU flash op, CUDA)."""
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
