"""The running sequences' decode inputs, kept from step to step instead of rebuilt from Python lists every step.

One row per running sequence, rows ``0 .. size - 1`` dense, in host arrays of fixed capacity (``max_num_seqs``):
the last sampled token, the length, the block table, the sampling settings. What changes is all that is touched:

- a sequence starts running (after its prefill or fork): ``add`` writes its row;
- a sequence stops (finished, aborted, preempted): ``remove`` moves the last row into its place (O(row));
- a decode step advances every row by one token with vectorised numpy (``advance``), and a sequence whose next
  token opens a new KV block gets that block id written into its row (``add_blocks``).

The step's attention metadata, token ids, positions and sampling inputs are slices of these arrays
(``decode_inputs``): on the CPU the tensors share the arrays' memory (no copy), elsewhere one host-to-device copy
each. Stop checks after sampling are vectorised too (``advance``): EOS, length and ``max_model_len`` over all rows
at once; only the rows that finish, and the rare rows with their own ``stop_token_ids``, are looked at in Python.
The row order differs from the order sequences started in; samples do not depend on it (the sampler's noise is a
function of (seed, position) only).
"""

from __future__ import annotations

import numpy as np
import torch

from engine.generation.attention.metadata import AttentionMetadata
from engine.generation.sequence import Sequence


class RunningBatch:
    """Persistent per-row decode state; see the module docstring.

    Args:
        capacity: most rows (the generator's ``max_num_seqs``).
        max_blocks: most KV blocks one sequence can hold (``ceil(max_model_len / block_size)``).
        block_size: tokens per KV block.
        max_model_len: a sequence reaching this many tokens ends with ``finish_reason="length"``.
        eos_token_ids: token ids that end a sample unless its ``ignore_eos`` is set.
    """

    def __init__(self, capacity: int, max_blocks: int, block_size: int, max_model_len: int,
                 eos_token_ids: set[int]):
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.eos = np.array(sorted(eos_token_ids), dtype=np.int64)
        self.seqs: list[Sequence] = []
        self.seq_ids: list[int] = []
        self._row: dict[int, int] = {}
        self.version = 0
        """Bumped whenever rows are added, removed or moved: caches keyed on the row layout check it."""
        self.dirty: set[int] | None = None
        """With ``track_changes()``: the rows whose block table or sampling settings changed since ``take_dirty()``
        (a device copy of the rows then updates those rows only)."""
        self.tokens = np.zeros(capacity, dtype=np.int64)  # the last token of each sequence, fed by the next decode
        self.lens = np.zeros(capacity, dtype=np.int64)  # tokens of each sequence, that last token included
        self.max_lens = np.zeros(capacity, dtype=np.int64)  # the length at which it ends ("length")
        self.block_tables = np.zeros((capacity, max_blocks), dtype=np.int32)
        self.num_blocks = np.zeros(capacity, dtype=np.int64)
        self.seeds = np.zeros(capacity, dtype=np.int64)
        self.temperature = np.zeros(capacity, dtype=np.float32)
        self.top_k = np.zeros(capacity, dtype=np.int64)
        self.top_p = np.ones(capacity, dtype=np.float32)
        self.stop_on_eos = np.zeros(capacity, dtype=bool)
        self.has_stop_ids = np.zeros(capacity, dtype=bool)

    @property
    def size(self) -> int:
        return len(self.seqs)

    def track_changes(self) -> None:
        """Start recording changed rows in ``dirty`` (every current row counts as changed)."""
        self.dirty = set(range(self.size))

    def take_dirty(self) -> set[int]:
        """The rows changed since the last call (empty without ``track_changes``); resets the record."""
        if self.dirty is None:
            return set()
        taken, self.dirty = self.dirty, set()
        return taken

    def __contains__(self, seq: Sequence) -> bool:
        return seq.seq_id in self._row

    # ------------------------------------------------------------------------------------------------ rows
    def add(self, seq: Sequence, block_table: list[int]) -> None:
        """Start a row for ``seq``, whose KV blocks are ``block_table`` (it holds ``len(seq) - 1`` tokens in the
        cache: all but the last sampled one). Raises ``ValueError`` when the batch is full or ``seq`` is in it."""
        if seq.seq_id in self._row:
            raise ValueError(f"sequence {seq.seq_id} is already running")
        row = self.size
        if row >= len(self.tokens):
            raise ValueError(f"the running batch is full ({len(self.tokens)} rows)")
        p = seq.params
        self._row[seq.seq_id] = row
        self.seqs.append(seq)
        self.seq_ids.append(seq.seq_id)
        self.tokens[row] = seq.token_ids[-1]
        self.lens[row] = len(seq)
        self.max_lens[row] = min(seq.prompt_len + p.max_tokens, self.max_model_len)
        self.block_tables[row] = 0  # padding is block 0, as AttentionMetadata.build pads
        self.block_tables[row, :len(block_table)] = block_table
        self.num_blocks[row] = len(block_table)
        self.seeds[row] = seq.seed
        self.temperature[row] = p.temperature
        self.top_k[row] = p.top_k
        self.top_p[row] = p.top_p
        self.stop_on_eos[row] = not p.ignore_eos
        self.has_stop_ids[row] = bool(p.stop_token_ids)
        self.version += 1
        if self.dirty is not None:
            self.dirty.add(row)

    def remove(self, seq: Sequence) -> None:
        """Drop ``seq``'s row; the last row moves into its place. Raises ``KeyError`` when it has no row."""
        row = self._row.pop(seq.seq_id)
        last = self.size - 1
        if row != last:
            moved = self.seqs[last]
            for a in (self.tokens, self.lens, self.max_lens, self.num_blocks, self.seeds, self.temperature,
                      self.top_k, self.top_p, self.stop_on_eos, self.has_stop_ids):
                a[row] = a[last]
            self.block_tables[row] = self.block_tables[last]
            self.seqs[row], self.seq_ids[row] = moved, moved.seq_id
            self._row[moved.seq_id] = row
            if self.dirty is not None:
                self.dirty.add(row)
        self.seqs.pop()
        self.seq_ids.pop()
        self.version += 1

    # ------------------------------------------------------------------------------------------------ a step
    def num_needing_block(self) -> int:
        """Rows whose next cached token opens a new block (their cache holds ``len - 1`` tokens, a multiple of the
        block size): the blocks the next decode step takes."""
        n = self.size
        return int(np.count_nonzero((self.lens[:n] - 1) % self.block_size == 0))

    def add_blocks(self, grown: list[tuple[int, int]]) -> None:
        """Append block ``b`` to row ``r``'s table for every ``(r, b)`` (``BlockManager.append_one_each``)."""
        for row, block in grown:
            self.block_tables[row, self.num_blocks[row]] = block
            self.num_blocks[row] += 1
            if self.dirty is not None:
                self.dirty.add(row)

    def decode_inputs(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """``(input_ids [S], positions [S], meta)`` of a decode step: every row feeds its last token, at position
        ``len - 1``, written to its slot and attending to ``len`` cached tokens. Call after ``add_blocks``."""
        n, bs = self.size, self.block_size
        lens = self.lens[:n]
        pos = lens - 1
        blocks = self.block_tables[np.arange(n), pos // bs].astype(np.int64)
        slots = blocks * bs + pos % bs
        width = int(self.num_blocks[:n].max()) if n else 0
        to = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731 - a view on the CPU
        meta = AttentionMetadata(
            slot_mapping=to(slots),
            block_tables=to(self.block_tables[:n, :width]),
            context_lens=to(lens.astype(np.int32)),
            cu_seqlens_q=to(np.arange(n + 1, dtype=np.int32)),
            query_lens_list=[1] * n,
            context_lens_list=lens.tolist(),
            block_size=bs,
        )
        return to(self.tokens[:n]), to(pos), meta

    def sampling_inputs(self, device: torch.device) -> dict[str, torch.Tensor | None]:
        """Keyword arguments of ``engine.generation.sampler.sample`` for every row (``positions``: the position of
        the token being drawn, ``len``); ``top_k`` / ``top_p`` None when no row uses them."""
        n = self.size
        to = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
        return {
            "temperature": to(self.temperature[:n]),
            "top_k": to(self.top_k[:n]) if (self.top_k[:n] > 0).any() else None,
            "top_p": to(self.top_p[:n]) if (self.top_p[:n] < 1).any() else None,
            "seeds": to(self.seeds[:n]),
            "positions": to(self.lens[:n]),
        }

    def advance(self, tokens: np.ndarray, logprobs: np.ndarray) -> list[tuple[Sequence, str]]:
        """Append each row's sampled token and log-prob (``tokens``, ``logprobs``: ``[size]``, row order) and return
        the ``(sequence, finish_reason)`` of the rows that end: ``"stop"`` (an EOS unless ``ignore_eos``, or one of
        its ``stop_token_ids``) before ``"length"`` (``max_tokens`` generated or ``max_model_len`` reached). The rows
        stay until the caller removes them."""
        n = self.size
        for seq, token, logprob in zip(self.seqs, tokens.tolist(), logprobs.tolist()):
            seq.token_ids.append(token)
            seq.logprobs.append(logprob)
        self.tokens[:n] = tokens
        self.lens[:n] += 1
        stop = self.stop_on_eos[:n] & np.isin(tokens, self.eos)
        for row in np.flatnonzero(self.has_stop_ids[:n]):  # rare: per-request stop ids
            stop[row] |= int(tokens[row]) in self.seqs[row].params.stop_token_ids
        length = self.lens[:n] >= self.max_lens[:n]
        return [(self.seqs[row], "stop" if stop[row] else "length") for row in np.flatnonzero(stop | length)]


__all__ = ["RunningBatch"]
