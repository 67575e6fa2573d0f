"""Continuous batching: which sequences run in the next forward step.

Prefill has priority (nano-vllm's policy): while requests wait and there is room (sequence slots, batched-token
budget, free KV blocks), the next step prefills a batch of them; otherwise every running sequence decodes one token.
A new request's prompt is prefilled ONCE, for its first sample; its other samples are forked from it after the step
(``BlockManager.fork``: full blocks shared, the partial block copied). When the KV pool cannot hold one more token for
every running sequence, the most recently admitted sequence is preempted: its blocks are freed and it waits to be
prefilled again from its prompt + output (recompute, as vLLM and nano-vllm do).

The running sequences' decode inputs live in a ``RunningBatch`` (persistent rows, updated by what changed): a decode
step costs the host O(changes) numpy/Python work, plus one tight loop over the running sequences' block counts.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from engine.generation.block_manager import BlockManager
from engine.generation.running_batch import RunningBatch
from engine.generation.sequence import Request, Sequence, SequenceStatus


@dataclass
class PrefillBatch:
    """Sequences whose whole ``token_ids`` are computed this step; ``requests[i]`` is the request of ``seqs[i]`` when
    the sequence is a new request's first sample (its siblings are forked after the step), else None."""

    seqs: list[Sequence]
    requests: list[Request | None]


@dataclass
class DecodeBatch:
    """Every running sequence feeds its last sampled token; their inputs are the rows of ``batch`` (each has the KV
    block its token goes to)."""

    batch: RunningBatch


class Scheduler:
    """Waiting queue (new requests and preempted sequences) and the running set, over one ``BlockManager``.

    ``running`` maps seq id -> sequence in the order they started running (the last one is preempted first);
    ``batch`` holds their decode inputs (``RunningBatch``). ``max_model_len`` and ``eos_token_ids`` are the
    generator's (they decide when a decode ends a sequence)."""

    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, eos_token_ids: set[int] = frozenset()):
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request | Sequence] = deque()
        self.running: dict[int, Sequence] = {}
        self.batch = RunningBatch(max_num_seqs, block_manager.blocks_needed(max_model_len), block_manager.block_size,
                                  max_model_len, set(eos_token_ids))

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _cost(self, item: Request | Sequence) -> tuple[int, int, int]:
        """(tokens to prefill, sequences it will run as, KV blocks it needs now incl. one growth block per sample)."""
        if isinstance(item, Request):
            L, n = len(item.prompt_token_ids), item.params.n
        else:
            L, n = len(item.token_ids), 1
        partial_copies = (n - 1) if L % self.blocks.block_size else 0
        return L, n, self.blocks.blocks_needed(L) + partial_copies + n

    def schedule(self) -> PrefillBatch | DecodeBatch | None:
        """The next step's batch, with its KV blocks allocated; None when nothing can run."""
        batch = self._schedule_prefill()
        if batch is not None:
            return batch
        if not self.running:
            if self.waiting:
                item = self.waiting[0]
                tokens, _, blocks = self._cost(item)
                raise RuntimeError(
                    f"the KV cache cannot hold one request: it needs {blocks} blocks of {self.blocks.block_size} "
                    f"tokens for a {tokens}-token prefill and has {self.blocks.num_free_blocks} free; raise "
                    "kv_cache_memory or lower max_model_len / SamplingParams.n"
                )
            return None
        while self.batch.num_needing_block() > self.blocks.num_free_blocks:
            self._preempt(self.running.popitem()[1])  # the most recently started
        if not self.running:
            return None  # everything was preempted: the next step prefills again
        self.batch.add_blocks(self.blocks.append_one_each(self.batch.seq_ids))
        return DecodeBatch(self.batch)

    def start(self, seq: Sequence) -> None:
        """``seq`` (prefilled or forked, its first token sampled) runs from the next decode step on."""
        seq.status = SequenceStatus.RUNNING
        self.running[seq.seq_id] = seq
        self.batch.add(seq, self.blocks.block_table(seq.seq_id))

    def _schedule_prefill(self) -> PrefillBatch | None:
        seqs: list[Sequence] = []
        requests: list[Request | None] = []
        tokens, free = 0, self.blocks.num_free_blocks
        num_seqs = len(self.running)
        while self.waiting:
            item = self.waiting[0]
            L, n, blocks = self._cost(item)
            if num_seqs + n > self.max_num_seqs or blocks > free:
                break
            if seqs and tokens + L > self.max_num_batched_tokens:
                break
            self.waiting.popleft()
            seq = item.seqs[0] if isinstance(item, Request) else item
            self.blocks.allocate(seq.seq_id, len(seq.token_ids))
            seqs.append(seq)
            requests.append(item if isinstance(item, Request) else None)
            tokens, free, num_seqs = tokens + L, free - blocks, num_seqs + n
        return PrefillBatch(seqs, requests) if seqs else None

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq.seq_id)
        self.batch.remove(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark ``seq`` finished and give its blocks back (it must hold blocks: running or just prefilled)."""
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.blocks.free(seq.seq_id)
        if self.running.pop(seq.seq_id, None) is not None:
            self.batch.remove(seq)

    def abort(self, request: Request) -> None:
        """Finish every unfinished sample of ``request`` with reason "abort", freeing whatever blocks they hold."""
        if request in self.waiting:
            self.waiting.remove(request)
        for seq in request.seqs:
            if seq.status is SequenceStatus.FINISHED:
                continue
            if seq in self.waiting:
                self.waiting.remove(seq)
            if seq.seq_id in self.running:
                self.finish(seq, "abort")
            else:  # waiting, or prefilled / forked in a step that raised before it started running
                if seq.seq_id in self.blocks:
                    self.blocks.free(seq.seq_id)
                seq.status, seq.finish_reason = SequenceStatus.FINISHED, "abort"
