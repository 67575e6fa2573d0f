"""The decode step on static buffers, padded to a bucket size, and replayed as one CUDA graph per bucket.

A decode step is the same few hundred kernels every time, only the batch size changes: on a GPU their launches, not
their work, set the step time (40.9 ms against a 0.87 ms memory roofline on an H100, issue 10). As vLLM and
nano-vllm do, the step's inputs live in persistent device buffers sized for ``max_num_seqs``, a batch of ``S``
sequences is padded to the next bucket size (1, 2, 4, 8, 16, then multiples of 16), and the whole step (model
forward, LM head, the draw) is captured once per bucket and replayed: one launch from the host.

- Padded rows feed token 0 at position 0, attend to one token, and write their K/V to a scratch block that no
  sequence owns (the generator reserves the cache's last block); their outputs are never read.
- The attention metadata of a captured step says ``max_model_len`` for every row's context length on the host side
  (the Triton decode kernel sizes its split grid from it once; the real lengths are read on the device).
- Nothing in the step synchronises with the host: inputs are copied in before the replay, the sampled tokens and
  log-probs are read back after it (one copy). The copy in is O(changes): every row's last token and position in
  one ``[2, B]`` transfer (the slots, context lengths and draw positions are derived from them on the device, inside
  the graph), and the block tables and sampling settings of only the rows that changed (``RunningBatch.dirty``) or
  became padding.
- One graph per (bucket, sampling mode): top-k / top-p batches take the sort path, others the fused race sampler.
  Graphs share one memory pool. Capture is lazy, at a bucket's first use.

Without CUDA (or ``use_graphs=False``) the same buffers run eagerly, step by step: what a graph would replay, for the
tests on the CPU.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import torch

from engine.generation.attention.metadata import AttentionMetadata
from engine.generation.running_batch import RunningBatch
from engine.generation.sampler import sample


def bucket_sizes(max_num_seqs: int) -> list[int]:
    """``1, 2, 4, 8, 16`` then multiples of 16, up to the first size >= ``max_num_seqs`` (>= 1)."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    sizes = [b for b in (1, 2, 4, 8, 16) if b < max_num_seqs]
    top = 16
    while top < max_num_seqs:
        top += 16
        sizes.append(top)
    if not sizes or sizes[-1] < max_num_seqs:
        sizes.append(max_num_seqs if max_num_seqs <= 16 else top)
    return sorted(set(sizes))


class StaticDecoder:
    """Static decode buffers and their CUDA graphs (module docstring).

    Args:
        model: the generator's ``LlamaFamilyModel``.
        backend: its ``AttentionBackend``.
        kv_caches: the per-layer ``(k_cache, v_cache)`` views of the generator's ``KVCache``.
        max_num_seqs: most rows a step has.
        max_blocks: the block-table width (``ceil(max_model_len / block_size)``).
        block_size: tokens per KV block.
        max_model_len: the longest sequence.
        scratch_block: a KV block no sequence owns, written by the padded rows.
        use_graphs: capture and replay CUDA graphs (requires the model on CUDA); False runs the buffers eagerly.
    """

    def __init__(self, model, backend, kv_caches, *, max_num_seqs: int, max_blocks: int, block_size: int,
                 max_model_len: int, scratch_block: int, use_graphs: bool):
        if use_graphs and model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on CUDA, it is on {model.device}")
        self.model, self.backend, self.kv_caches = model, backend, kv_caches
        self.buckets = bucket_sizes(max_num_seqs)
        self.block_size, self.max_model_len, self.scratch_block = block_size, max_model_len, scratch_block
        self.use_graphs = use_graphs
        B, dev = self.buckets[-1], model.device
        pin = dev.type == "cuda"  # page-locked staging: the copies in are asynchronous
        # Every step: each row's last token and its position, one [2, B] copy; the slots, context lengths and draw
        # positions are derived from them on the device, inside the graph.
        self._step_in = torch.zeros(2, B, dtype=torch.int64, device=dev)
        self._step_stage = torch.zeros(2, B, dtype=torch.int64, pin_memory=pin)
        # Per row, rewritten only for the rows that changed (RunningBatch.take_dirty) or became padding.
        self._rows = {
            "block_tables": torch.zeros(B, max_blocks, dtype=torch.int32, device=dev),
            "temperature": torch.ones(B, dtype=torch.float32, device=dev),
            "top_k": torch.zeros(B, dtype=torch.int64, device=dev),
            "top_p": torch.ones(B, dtype=torch.float32, device=dev),
            "seeds": torch.zeros(B, dtype=torch.int64, device=dev),
        }
        self._rows["block_tables"][:, 0] = scratch_block  # every row starts as padding
        self._rows_stage = {k: torch.empty_like(v, device="cpu", pin_memory=pin) for k, v in self._rows.items()}
        self._rows_incoming = {k: torch.empty_like(v) for k, v in self._rows.items()}
        self._index_stage = torch.empty(B, dtype=torch.int64, pin_memory=pin)
        self._index = torch.empty(B, dtype=torch.int64, device=dev)
        self._real = np.zeros(B, dtype=bool)  # which device rows hold a sequence (the others: padding)
        self._cu_seqlens = torch.arange(B + 1, dtype=torch.int32, device=dev)
        self._graphs: dict[tuple[int, bool, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._pool = None
        self._captured_params: tuple[int, ...] | None = None
        self.plan_for_max_len = use_graphs
        """Tell the kernels every context may be ``max_model_len`` long (what a captured graph must plan for); on
        eager steps False plans for the real lengths. Tests set it on the CPU to run what a graph would replay."""
        self.capture_seconds = 0.0
        """Total time spent capturing graphs (a one-off per bucket and sampling mode)."""

    def bucket_for(self, n: int) -> int:
        """The smallest bucket that holds ``n`` rows."""
        return next(b for b in self.buckets if b >= n)

    # ------------------------------------------------------------------------------------------------ a step
    @torch.no_grad()
    def step(self, rows: RunningBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode every row of ``rows`` (its blocks already grown for this step): ``(tokens [S] int64, logprobs [S]
        float32)`` on the model's device, valid until the next call."""
        S = rows.size
        B = self.bucket_for(S)
        self._load(rows, S, B)
        top_k = bool((rows.top_k[:S] > 0).any())
        top_p = bool((rows.top_p[:S] < 1).any())
        if not self.use_graphs:
            lens_list = ([self.max_model_len] * B if self.plan_for_max_len
                         else rows.lens[:S].tolist() + [1] * (B - S))
            tokens, logprobs = self._run(B, top_k, top_p, context_lens_list=lens_list)
            return tokens[:S], logprobs[:S]
        key = (B, top_k, top_p)
        self.model.sync_fused_weights()  # outside the graph: the replay reads the copies' (unchanged) addresses
        params = self._param_ptrs()
        if params != self._captured_params:  # parameters replaced (not updated in place): the graphs read stale memory
            self.drop_graphs()
            self._captured_params = params
        if key not in self._graphs:
            self._capture(key)
        graph, tokens, logprobs = self._graphs[key]
        graph.replay()
        return tokens[:S], logprobs[:S]

    def _load(self, rows: RunningBatch, S: int, B: int) -> None:
        """Copy this step's inputs to the device: every row's last token and position (one ``[2, B]`` copy; padding
        rows feed token 0 at position 0), and the block tables and sampling settings of the rows that changed since
        the last step or just became padding (block table ``[scratch, 0, ...]``) -- O(changes), not O(rows)."""
        step = self._step_stage.numpy()
        step[0, :S] = rows.tokens[:S]
        step[1, :S] = rows.lens[:S] - 1
        step[:, S:B] = 0
        self._step_in[:, :B].copy_(self._step_stage[:, :B], non_blocking=True)
        changed = [r for r in rows.take_dirty() if r < S]
        now_padding = (np.flatnonzero(self._real[S:B]) + S).tolist()  # rows that held a sequence before
        k = len(changed) + len(now_padding)
        if not k:
            return
        stage = {name: t.numpy() for name, t in self._rows_stage.items()}
        width = stage["block_tables"].shape[1]
        index = self._index_stage.numpy()
        index[:k] = changed + now_padding
        n = len(changed)
        if n:
            stage["block_tables"][:n] = rows.block_tables[changed, :width]
            for name in ("temperature", "top_k", "top_p", "seeds"):
                stage[name][:n] = getattr(rows, name)[changed]
        stage["block_tables"][n:k] = 0
        stage["block_tables"][n:k, 0] = self.scratch_block
        for name, value in (("temperature", 1.0), ("top_k", 0), ("top_p", 1.0), ("seeds", 0)):
            stage[name][n:k] = value
        self._index[:k].copy_(self._index_stage[:k], non_blocking=True)
        for name, buf in self._rows.items():
            incoming = self._rows_incoming[name][:k]
            incoming.copy_(self._rows_stage[name][:k], non_blocking=True)
            buf.index_copy_(0, self._index[:k], incoming)
        self._real[changed] = True
        self._real[now_padding] = False

    def _run(self, B: int, top_k: bool, top_p: bool, context_lens_list: list[int]):
        """The step on the first ``B`` rows of the buffers: forward, LM head, draw. The slots, context lengths and
        draw positions are derived from the positions on the device. No host synchronisation."""
        ids, pos = self._step_in[0, :B], self._step_in[1, :B]
        r, bs = self._rows, self.block_size
        tables = r["block_tables"][:B]
        block = tables.gather(1, (pos // bs)[:, None])[:, 0].long()
        meta = AttentionMetadata(slot_mapping=block * bs + pos % bs, block_tables=tables,
                                 context_lens=(pos + 1).to(torch.int32), cu_seqlens_q=self._cu_seqlens[:B + 1],
                                 query_lens_list=[1] * B, context_lens_list=context_lens_list,
                                 block_size=bs)
        hidden = self.model.forward(ids, pos, self.kv_caches, meta, self.backend)
        logits = self.model.compute_logits(hidden)
        return sample(logits, r["temperature"][:B], r["top_k"][:B] if top_k else None,
                      r["top_p"][:B] if top_p else None, r["seeds"][:B], pos + 1)

    def _param_ptrs(self) -> tuple[int, ...]:
        """Where the model's parameters live: a graph replays reads of these addresses."""
        return tuple(p.data_ptr() for p in self.model.hf_model.parameters())

    def drop_graphs(self) -> None:
        """Forget every captured graph and their memory pool (they are captured again at next use)."""
        self._graphs.clear()
        self._pool = None

    def _capture(self, key: tuple[int, bool, bool]) -> None:
        """Warm the step up on a side stream (Triton compiles, allocator settles), then capture it on another.

        A capture that fails (a host synchronisation inside the step, an unsupported op) raises
        ``GraphCaptureError`` naming the first error, after putting the caller's stream back, synchronising, and
        dropping every graph: ``torch.cuda.graph`` would otherwise leave the process on its capture stream."""
        B, top_k, top_p = key
        t0 = time.perf_counter()
        lens_list = [self.max_model_len] * B  # the host-side size the kernels plan for: the longest possible
        caller = torch.cuda.current_stream()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(caller)
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._run(B, top_k, top_p, lens_list)
            caller.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, stream=torch.cuda.Stream()):
                tokens, logprobs = self._run(B, top_k, top_p, lens_list)
        except Exception as err:
            torch.cuda.set_stream(caller)
            torch.cuda.synchronize()
            self.drop_graphs()
            cause = err.__context__ or err  # capture_end's error hides the one that invalidated the capture
            raise GraphCaptureError(f"capturing the decode step of bucket {B} failed: {type(cause).__name__}: "
                                    f"{cause}") from err
        self._pool = graph.pool()
        self._graphs[key] = (graph, tokens, logprobs)
        torch.cuda.synchronize()
        self.capture_seconds += time.perf_counter() - t0

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)


class GraphCaptureError(RuntimeError):
    """A decode step could not be captured in a CUDA graph (the generator then decodes eagerly)."""


def warn_graphs_off(err: BaseException) -> None:
    """The warning printed when capturing fails and the generator falls back to eager decoding."""
    warnings.warn(f"CUDA graph capture failed ({type(err).__name__}: {err}); decoding eagerly from now on "
                  "(Generator(enforce_eager=True) silences this)", RuntimeWarning, stacklevel=3)


__all__ = ["GraphCaptureError", "StaticDecoder", "bucket_sizes"]
