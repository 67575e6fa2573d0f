"""The block manager of the paged KV cache: a pool of ``num_blocks`` fixed-size blocks of ``block_size`` token slots,
a reference count per block, and a block table per sequence (the block ids holding its tokens, in order).

Token ``j`` of a sequence lives in block ``block_table[j // block_size]`` at offset ``j % block_size``, i.e. in the
flat cache slot ``block_id * block_size + offset`` (the layout of ``attention.metadata`` and ``kv_cache``).

The samples of a GRPO group share their prompt's KV: ``fork`` gives a child every FULL block of its parent by
reference (ref count + 1, nothing copied) and a private copy of the parent's partial last block, whose
``(src, dst)`` pair the caller copies in the cache (``KVCache.copy_blocks``). Hence the invariant the whole design
rests on: **a block shared by two or more sequences is always full**. A full block is never written again (a sequence
only writes at its current length, which lies in its last block, or in a new one when the last is full), so appends
need no copy-on-write.

Pure host-side bookkeeping (no tensors, no device). Every operation is O(1) per block it touches; the free list is a
deque taken from the left and refilled on the right, so the order blocks are handed out in is deterministic.
Sequence ids are ints chosen by the caller.
"""

from __future__ import annotations

from collections import deque


class OutOfBlocksError(RuntimeError):
    """The pool has fewer free blocks than an operation needs. The manager's state is unchanged."""


class BlockManager:
    """Ref-counted block pool with per-sequence block tables; see the module docstring."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._ref = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._tables: dict[int, list[int]] = {}
        self._lens: dict[int, int] = {}

    # --- queries -------------------------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def seq_ids(self) -> list[int]:
        """Ids of the live sequences, in allocation order."""
        return list(self._tables)

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._tables

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold ``num_tokens`` tokens: ``ceil(num_tokens / block_size)``."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) <= len(self._free)

    def num_tokens(self, seq_id: int) -> int:
        """Tokens the sequence holds (slots reserved for it in the cache)."""
        self._table(seq_id)
        return self._lens[seq_id]

    def block_table(self, seq_id: int) -> list[int]:
        """A copy of the sequence's block ids, ``blocks_needed(num_tokens(seq_id))`` of them."""
        return list(self._table(seq_id))

    def ref_count(self, block_id: int) -> int:
        """Number of sequences holding the block (0: free)."""
        if not 0 <= block_id < self.num_blocks:
            raise IndexError(f"block id {block_id} out of range [0, {self.num_blocks})")
        return self._ref[block_id]

    def slot(self, seq_id: int, position: int) -> int:
        """Flat cache slot of the sequence's token at ``position`` (``0 <= position < num_tokens``)."""
        table = self._table(seq_id)
        if not 0 <= position < self._lens[seq_id]:
            raise IndexError(f"position {position} out of range for sequence {seq_id} of {self._lens[seq_id]} tokens")
        return table[position // self.block_size] * self.block_size + position % self.block_size

    # --- mutations -----------------------------------------------------------------------------------------------

    def allocate(self, seq_id: int, num_tokens: int) -> list[int]:
        """Start sequence ``seq_id`` holding ``num_tokens`` tokens; returns (a copy of) its block table.
        Raises ``ValueError`` if the id is live, ``OutOfBlocksError`` if the pool is short."""
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id} is already allocated")
        need = self.blocks_needed(num_tokens)
        self._check_free(need, f"allocate sequence {seq_id} with {num_tokens} tokens")
        self._tables[seq_id] = [self._take() for _ in range(need)]
        self._lens[seq_id] = num_tokens
        return list(self._tables[seq_id])

    def fork(self, parent_id: int, child_id: int) -> list[tuple[int, int]]:
        """Start ``child_id`` as a copy of ``parent_id``: the parent's full blocks are shared (ref count + 1), its
        partial last block (if ``num_tokens % block_size != 0``) is replaced in the child by a fresh block. Returns
        the ``(src_block, dst_block)`` pairs the caller must copy in the KV cache: ``[]`` or one pair.
        Raises ``KeyError`` / ``ValueError`` for an unknown parent / a live child, ``OutOfBlocksError`` if short."""
        parent = self._table(parent_id)
        if child_id in self._tables:
            raise ValueError(f"sequence {child_id} is already allocated")
        length = self._lens[parent_id]
        num_full, rem = divmod(length, self.block_size)
        self._check_free(int(rem > 0), f"fork sequence {parent_id} into {child_id}")
        table = parent[:num_full]
        for b in table:
            self._ref[b] += 1
        copies = []
        if rem:
            dst = self._take()
            table.append(dst)
            copies.append((parent[-1], dst))
        self._tables[child_id] = table
        self._lens[child_id] = length
        return copies

    def append_tokens(self, seq_id: int, n: int = 1) -> None:
        """Grow the sequence by ``n`` tokens, taking new blocks as the last one fills. Raises ``OutOfBlocksError``
        (sequence unchanged) if the pool is short.

        No copy-on-write: the new tokens go to positions ``>= num_tokens``, i.e. into the partial last block or into
        new blocks. A partial last block is never shared (``fork`` copies it), and a shared block is full, so it
        lies wholly before ``num_tokens`` and is never written again."""
        table = self._table(seq_id)
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        new_len = self._lens[seq_id] + n
        need = self.blocks_needed(new_len) - len(table)
        self._check_free(need, f"append {n} tokens to sequence {seq_id}")
        table.extend(self._take() for _ in range(need))
        self._lens[seq_id] = new_len

    def append_one_each(self, seq_ids: list[int]) -> list[tuple[int, int]]:
        """Grow every sequence of ``seq_ids`` by one token (a decode step): the ones whose last block is full take a
        new block. Returns ``(index in seq_ids, new block id)`` for those. All or nothing: raises
        ``OutOfBlocksError`` (nothing changed) when the pool is short. One pass over ``seq_ids``, no per-sequence
        calls: this is on the decode step's host path."""
        bs, lens, tables = self.block_size, self._lens, self._tables
        try:
            full = [i for i, s in enumerate(seq_ids) if lens[s] % bs == 0]
        except KeyError as err:
            raise KeyError(f"unknown sequence id {err.args[0]} (never allocated, or already freed)") from None
        self._check_free(len(full), f"append one token to each of {len(seq_ids)} sequences")
        grown = []
        for i in full:
            block = self._take()
            tables[seq_ids[i]].append(block)
            grown.append((i, block))
        for s in seq_ids:
            lens[s] += 1
        return grown

    def can_append(self, seq_ids: list[int], n: int = 1) -> bool:
        """Whether the free blocks suffice for every sequence in ``seq_ids`` to grow by ``n`` tokens."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        need = 0
        for s in seq_ids:
            need += self.blocks_needed(self.num_tokens(s) + n) - len(self._tables[s])
        return need <= len(self._free)

    def free(self, seq_id: int) -> None:
        """End the sequence: drop one reference to each of its blocks; blocks reaching 0 go back to the free list
        (right end, in table order). Raises ``KeyError`` for an unknown id."""
        table = self._table(seq_id)
        for b in table:
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free.append(b)
        del self._tables[seq_id], self._lens[seq_id]

    # --- internals -----------------------------------------------------------------------------------------------

    def _table(self, seq_id: int) -> list[int]:
        try:
            return self._tables[seq_id]
        except KeyError:
            raise KeyError(f"unknown sequence id {seq_id} (never allocated, or already freed)") from None

    def _check_free(self, need: int, what: str) -> None:
        if need > len(self._free):
            raise OutOfBlocksError(f"cannot {what}: needs {need} free blocks, {len(self._free)} free "
                                   f"(of {self.num_blocks}, block_size {self.block_size})")

    def _take(self) -> int:
        b = self._free.popleft()
        self._ref[b] = 1
        return b
