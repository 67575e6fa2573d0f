"""What one forward step of the generator tells the attention layers: where each new token's K/V goes in the paged
cache, and which cached tokens each sequence attends to.

Layout of the paged KV cache (flash-attn's): per layer, ``k_cache`` and ``v_cache`` are ``[num_blocks, block_size,
H_kv, D]``; token ``j`` of a sequence lives in block ``block_tables[s, j // block_size]`` at offset
``j % block_size``, i.e. in the flat slot ``block_id * block_size + offset``.

A step packs the new tokens of ``S`` sequences into ``N`` rows: sequence ``s`` owns rows
``cu_seqlens_q[s]:cu_seqlens_q[s+1]`` (its ``Q_s`` new tokens; decode: ``Q_s = 1``). After the step writes them, the
sequence has ``context_lens[s] = L_s`` cached tokens, and its new token ``i`` sits at position ``L_s - Q_s + i`` and
attends to positions ``0 .. L_s - Q_s + i`` (causal, aligned bottom-right: the new tokens are the last ones).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PREFIX_MIN_SAVING = 0.55
"""Cascade decode is used when reading each shared prefix once saves at least this share of a step's block reads
(``PrefixGroups.build``, measured there)."""


@dataclass
class PrefixGroups:
    """Decode sequences that share leading KV blocks (the ``n`` samples of a prompt share its full prompt blocks:
    ``BlockManager.fork``), so that attention can read each shared prefix once for its whole group (cascade
    attention, Hydragen / FlashInfer) instead of once per sample. ``P`` groups of at most ``G`` members, each group's
    prefix at most ``B_p`` blocks; a sequence in no group (a lone sample, or one re-prefilled after preemption into
    blocks of its own) has a prefix of 0 tokens and attends to its whole context as its suffix."""

    rows: torch.Tensor
    """``[P, G]`` int64: the decode rows (indices into the step's sequences) of each group, padded with row 0."""
    valid: torch.Tensor
    """``[P, G]`` bool: which entries of ``rows`` are real members."""
    blocks: torch.Tensor
    """``[P, B_p]`` int64: each group's shared block ids, padded with 0 (bounded by ``num_blocks``)."""
    num_blocks: torch.Tensor
    """``[P]`` int64: each group's shared prefix, in (whole) blocks."""
    seq_prefix_blocks: torch.Tensor
    """``[S]`` int64: per decode row, the blocks of its group's shared prefix (0 outside a group): its own context
    starts there."""
    saved_blocks: int = 0
    """Block reads a step saves by reading each prefix once: ``sum over groups of (members - 1) x prefix blocks``."""

    @classmethod
    def build(cls, keys: list, block_tables: list[list[int]], shareable_blocks: list[int],
              device: torch.device, *, min_saving: float = PREFIX_MIN_SAVING) -> PrefixGroups | None:
        """Group decode rows by ``keys[s]`` (e.g. the request id) and find how many leading blocks all members of a
        group share: at most ``shareable_blocks[s]`` (the full prompt blocks) and only where every member's table
        starts with the same block ids (a member re-prefilled after preemption has its own blocks: it leaves the
        group). Host work: O(S x shared blocks).

        Returns None (read every context whole) unless reading each shared prefix once saves at least
        ``min_saving`` of the step's block reads: below that the extra attention call and the merge cost more than
        they save. Measured on the CPU (qwen2-cpu shape, ``bench/bench_generate.py --compare-shared-prefix``): G = 8,
        64-token prompts, 128 new tokens (about 45% saved) ran 0.94x; G = 8, 128-token prompts, 64 new tokens (about
        64%) 1.10x; G = 16, 384-token prompts, 64 new tokens (about 87%) 1.24-1.36x: the break-even lies near 55%."""
        members: dict = {}
        for s, key in enumerate(keys):
            members.setdefault(key, []).append(s)
        groups, seq_prefix = [], [0] * len(keys)
        for rows in members.values():
            first = rows[0]
            n = shareable_blocks[first]
            head = block_tables[first][:n]
            same = [s for s in rows if shareable_blocks[s] == n and block_tables[s][:n] == head]
            if n > 0 and len(same) > 1:
                groups.append((same, head))
                for s in same:
                    seq_prefix[s] = n
        saved = sum((len(rows) - 1) * len(head) for rows, head in groups)
        if not groups or saved < min_saving * sum(len(t) for t in block_tables):
            return None
        G = max(len(rows) for rows, _ in groups)
        B_p = max(len(head) for _, head in groups)
        rows = [r + [0] * (G - len(r)) for r, _ in groups]
        valid = [[True] * len(r) + [False] * (G - len(r)) for r, _ in groups]
        blocks = [h + [0] * (B_p - len(h)) for _, h in groups]
        return cls(rows=torch.tensor(rows, dtype=torch.int64, device=device),
                   valid=torch.tensor(valid, dtype=torch.bool, device=device),
                   blocks=torch.tensor(blocks, dtype=torch.int64, device=device),
                   num_blocks=torch.tensor([len(h) for _, h in groups], dtype=torch.int64, device=device),
                   seq_prefix_blocks=torch.tensor(seq_prefix, dtype=torch.int64, device=device), saved_blocks=saved)


@dataclass
class AttentionMetadata:
    """Per-step attention inputs; tensors live on the model's device, the ``*_list`` twins on the host (no sync)."""

    slot_mapping: torch.Tensor
    """``[N]`` int64: flat cache slot of each new token's K/V."""
    block_tables: torch.Tensor
    """``[S, max_blocks]`` int32: block ids of each sequence's context, padded with 0 (bounded by context_lens)."""
    context_lens: torch.Tensor
    """``[S]`` int32: tokens in the cache for each sequence after this step's write."""
    cu_seqlens_q: torch.Tensor
    """``[S + 1]`` int32: prefix sums of the new-token counts."""
    query_lens_list: list[int]
    """``[S]`` host copy of the new-token counts."""
    context_lens_list: list[int]
    """``[S]`` host copy of ``context_lens``."""
    block_size: int
    """Tokens per cache block."""
    prefix_groups: PrefixGroups | None = None
    """Decode only, optional: sequences sharing prompt blocks, for backends that read a shared prefix once per group
    (the torch backend on the CPU); None: every sequence attends to its own context."""

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens_list)

    @property
    def is_decode(self) -> bool:
        """Every sequence has exactly one new token (the decode step)."""
        return all(q == 1 for q in self.query_lens_list)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens_list, default=0)

    @property
    def max_context_len(self) -> int:
        return max(self.context_lens_list, default=0)

    @classmethod
    def build(cls, block_tables: list[list[int]], context_lens: list[int], query_lens: list[int], block_size: int,
              device: torch.device) -> AttentionMetadata:
        """Build the metadata from host lists: per sequence its block ids, its context length after the step and its
        number of new tokens (the last ``query_lens[s]`` positions of the context)."""
        if not (len(block_tables) == len(context_lens) == len(query_lens)):
            raise ValueError(f"block_tables, context_lens and query_lens must have one entry per sequence, got "
                             f"{len(block_tables)}, {len(context_lens)}, {len(query_lens)}")
        slots: list[int] = []
        for table, ctx, q in zip(block_tables, context_lens, query_lens):
            if not 0 < q <= ctx or ctx > len(table) * block_size:
                raise ValueError(f"a sequence needs 0 < query_len <= context_len <= blocks * block_size, got "
                                 f"query_len={q}, context_len={ctx}, {len(table)} blocks of {block_size}")
            slots.extend(table[p // block_size] * block_size + p % block_size for p in range(ctx - q, ctx))
        width = max((len(t) for t in block_tables), default=0)
        padded = [t + [0] * (width - len(t)) for t in block_tables]
        cu = [0]
        for q in query_lens:
            cu.append(cu[-1] + q)
        return cls(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=device).reshape(len(padded), width),
            context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=device),
            query_lens_list=list(query_lens),
            context_lens_list=list(context_lens),
            block_size=block_size,
        )
