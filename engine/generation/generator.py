"""The rollout generator: batched sampling from the trainer's own model, with a paged KV cache in which the ``n``
samples of a prompt share the prompt's blocks, and the log-prob of every sampled token.

    gen = Generator(hf_model, tokenizer)
    outs = gen.generate([[1, 2, 3], [4, 5]], SamplingParams(n=8, temperature=1.0, max_tokens=256))
    outs[0].outputs[3].token_ids, outs[0].outputs[3].logprobs

The forward reads the HF module's parameter tensors (``engine.generation.model_runner.LlamaFamilyModel``): after an optimizer step the
next ``generate`` uses the new weights, with no copy. One step = one forward: a prefill of waiting prompts (each
prompt once, whatever its ``n``) or a decode of every running sample (``engine.generation.scheduler``).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

from engine.generation.attention import AttentionMetadata, get_attention_backend
from engine.generation.attention.metadata import PREFIX_MIN_SAVING, PrefixGroups
from engine.generation.block_manager import BlockManager
from engine.generation.graph_decoder import GraphCaptureError, StaticDecoder, warn_graphs_off
from engine.generation.kv_cache import KVCache, default_budget, num_blocks_for_budget
from engine.generation.model_runner import LlamaFamilyModel
from engine.generation.outputs import CompletionOutput, RequestOutput
from engine.generation.sampler import child_seed, make_seed, sample
from engine.generation.sampling_params import SamplingParams
from engine.generation.scheduler import DecodeBatch, PrefillBatch, Scheduler
from engine.generation.sequence import Request, Sequence, SequenceStatus


def _eos_ids(model, tokenizer) -> set[int]:
    ids = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if ids is None:
        ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if ids is None:
        ids = getattr(model.config, "eos_token_id", None)
    if ids is None:
        return set()
    return {int(i) for i in ids} if isinstance(ids, (list, tuple)) else {int(ids)}


class Generator:
    """Batched generation with continuous batching over a paged, group-shared KV cache.

    Args:
        model: a Hugging Face causal LM of the Llama family (Llama, Qwen2/2.5, Qwen3, Mistral); its parameters are
            read in place (never copied).
        tokenizer: optional; gives the EOS id (else ``model.generation_config.eos_token_id``) and decodes ``text``.
        max_num_seqs: most samples decoding at once (default 256).
        max_model_len: longest prompt + completion in tokens (default ``config.max_position_embeddings``).
        kv_cache_memory: bytes of KV cache (default: ``kv_cache.default_budget`` — a fraction of free GPU memory, or a
            fixed CPU budget). The cache is allocated on first use and freed by ``release_kv_cache()``.
        block_size: tokens per KV block (default 16; flash-attn needs a multiple of 256).
        attention_backend: ``"torch"``, ``"triton"``, ``"flash_attn"`` or None/``"auto"`` (best available).
        max_num_batched_tokens: most prompt tokens in one prefill step (default 8192 or ``max_model_len``).
        shared_prefix: decode attention reads each prompt's shared KV blocks once for all its samples (cascade
            attention) on the eager rows path, where the backend supports it (Triton; the torch backend on the CPU);
            False reads them once per sample. The results agree to rounding.
        enforce_eager: how decode steps run (``engine.generation.graph_decoder``). None (default): on CUDA with a
            graph-safe backend (``triton``), static buffers padded to a bucket size and one CUDA graph per bucket,
            replayed every step; elsewhere, eager steps on the running rows. True: eager steps everywhere (vLLM's
            flag). False: the static buffers everywhere (on the CPU run eagerly: what a graph replays; for tests).
            The static path reserves one KV block as the padded rows' scratch. A graph that fails to capture falls
            back to eager steps with a warning. Graphs read the parameters' storage, which optimizers and
            ``load_state_dict`` update in place; parameters replaced by new tensors (``model.to(...)``) are noticed
            and the graphs captured again.
        fuse_projections: one GEMM for q/k/v and one for gate/up over concatenated copies of those weights, refreshed
            in place when the trainer's weights change (``LlamaFamilyModel``); costs two thirds of the weights' memory
            again. Off by default: 1.01x on the CPU; the GPU decision waits for its measurement
            (``bench/bench_generate.py --compare-fused-projections``).

    Attributes (public, read-only; every other attribute is private):
        model: the ``LlamaFamilyModel`` view of the weights; ``model.hf_model`` is the model passed in.
        tokenizer, max_num_seqs, max_model_len, block_size, max_num_batched_tokens: as resolved from the arguments.
        kv_cache_memory: as passed (None: the default budget, taken when the cache is first allocated).
        eos_token_ids: ``set[int]``, the ids that end a sample (besides ``SamplingParams.stop_token_ids``).
        backend: the attention backend chosen (``backend.name``).
        use_cuda_graphs: whether decode steps replay CUDA graphs.

    Raises:
        ValueError: an unsupported architecture, invalid sizes, or a backend that cannot run this configuration.
    """

    def __init__(self, model, tokenizer=None, *, max_num_seqs: int = 256, max_model_len: int | None = None,
                 kv_cache_memory: int | None = None, block_size: int = 16, attention_backend: str | None = None,
                 max_num_batched_tokens: int | None = None, shared_prefix: bool = True,
                 enforce_eager: bool | None = None, fuse_projections: bool = False):
        self.model = LlamaFamilyModel(model, fuse_projections=fuse_projections)
        self.tokenizer = tokenizer
        self.eos_token_ids = _eos_ids(model, tokenizer)
        self.max_model_len = max_model_len or self.model.max_position_embeddings
        for name, value in (("max_num_seqs", max_num_seqs), ("max_model_len", self.max_model_len),
                            ("block_size", block_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.max_num_seqs = max_num_seqs
        self.block_size = block_size
        self.max_num_batched_tokens = max_num_batched_tokens or max(8192, self.max_model_len)
        self.backend = get_attention_backend(attention_backend, self.model.device, block_size=block_size,
                                             head_dim=self.model.head_dim, dtype=self.model.dtype)
        self.backend.validate(block_size=block_size, head_dim=self.model.head_dim, dtype=self.model.dtype,
                              device=self.model.device)
        on_cuda = self.model.device.type == "cuda"
        # graphs by default only through a backend that plans for max_model_len cheaply (not the torch backend's
        # gathers, nor float64, which the Triton backend hands to it)
        graph_safe = self.backend.graph_safe and self.model.dtype != torch.float64
        self.static_decode = (on_cuda and graph_safe and enforce_eager is None) or enforce_eager is False
        self.use_cuda_graphs = self.static_decode and on_cuda
        # the cascade runs on the eager rows path (a graph would need padded group shapes per bucket), in the Triton
        # backend and in the torch backend's CPU decode (its CUDA decode ignores the groups)
        self.shared_prefix = (shared_prefix and getattr(self.backend, "supports_prefix_groups", False)
                              and not self.static_decode and not (on_cuda and self.backend.name == "torch"))
        self._static: StaticDecoder | None = None
        self.kv_cache_memory = kv_cache_memory
        self.kv_cache: KVCache | None = None
        self.scheduler: Scheduler | None = None
        self._requests: dict[int | str, Request] = {}
        self._seq_ids = itertools.count()
        self._request_ids = itertools.count()
        self._rng = torch.Generator().manual_seed(torch.initial_seed() % 2**63)

    # ----------------------------------------------------------------------------------------------------- cache
    def _ensure_cache(self) -> None:
        if self.kv_cache is not None:
            return
        m = self.model
        budget = self.kv_cache_memory or default_budget(m.device)
        scratch = int(self.static_decode)  # the static path's padded rows write to a block no sequence owns
        max_blocks = math.ceil(self.max_model_len / self.block_size)
        num_blocks = num_blocks_for_budget(budget, num_layers=m.num_layers, block_size=self.block_size,
                                           num_kv_heads=m.num_kv_heads, head_dim=m.head_dim, dtype=m.dtype,
                                           min_blocks=max_blocks + 1 + scratch)
        self.kv_cache = KVCache(m.num_layers, num_blocks, self.block_size, m.num_kv_heads, m.head_dim, m.dtype,
                                m.device)
        if self.static_decode:
            self._static = StaticDecoder(m, self.backend, self.kv_cache.as_list(), max_num_seqs=self.max_num_seqs,
                                         max_blocks=max_blocks, block_size=self.block_size,
                                         max_model_len=self.max_model_len, scratch_block=num_blocks - 1,
                                         use_graphs=self.use_cuda_graphs)
        self.scheduler = Scheduler(BlockManager(num_blocks - scratch, self.block_size), max_num_seqs=self.max_num_seqs,
                                   max_num_batched_tokens=self.max_num_batched_tokens,
                                   max_model_len=self.max_model_len, eos_token_ids=self.eos_token_ids)
        if self._static is not None:  # its device rows are updated by what changed
            self.scheduler.batch.track_changes()
        self._prefix_cache: tuple[int, PrefixGroups | None] | None = None

    def release_kv_cache(self) -> None:
        """Free the KV cache (e.g. before the training phase). Raises ``RuntimeError`` while requests are running."""
        if self.scheduler is not None and self.scheduler.has_work():
            raise RuntimeError("release_kv_cache() while requests are unfinished: abort them first")
        self.kv_cache = None
        self.scheduler = None
        self._static = None  # its graphs point into the freed cache

    @property
    def block_manager(self) -> BlockManager | None:
        """The block manager of the live cache (None before first use / after ``release_kv_cache``)."""
        return None if self.scheduler is None else self.scheduler.blocks

    # -------------------------------------------------------------------------------------------------- requests
    def add_request(self, prompt_token_ids: list[int], params: SamplingParams,
                    request_id: int | str | None = None) -> int | str:
        """Queue one prompt for ``params.n`` samples; returns its request id.

        Raises:
            ValueError: empty prompt, a token id outside the vocabulary, a prompt of ``max_model_len`` tokens or more,
                a duplicate request id. TypeError: ``params`` not a ``SamplingParams``.
        """
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        if params.n > self.max_num_seqs:
            raise ValueError(f"SamplingParams.n={params.n} exceeds max_num_seqs={self.max_num_seqs}: a group's "
                             "samples decode together")
        prompt = [int(t) for t in prompt_token_ids]
        if not prompt:
            raise ValueError("prompt_token_ids must not be empty")
        if len(prompt) >= self.max_model_len:
            raise ValueError(f"prompt of {len(prompt)} tokens does not fit max_model_len={self.max_model_len} "
                             "(it needs room for at least one generated token)")
        bad = [t for t in prompt if not 0 <= t < self.model.vocab_size]
        if bad:
            raise ValueError(f"prompt_token_ids must be in [0, {self.model.vocab_size}), got {bad[0]}")
        rid = next(self._request_ids) if request_id is None else request_id
        if rid in self._requests:
            raise ValueError(f"request_id {rid!r} is already in use")
        self._ensure_cache()
        seed = params.seed if params.seed is not None else make_seed(self._rng)
        seqs = [Sequence(next(self._seq_ids), rid, i, list(prompt), len(prompt), child_seed(seed, i), params)
                for i in range(params.n)]
        request = Request(rid, prompt, params, seqs)
        self._requests[rid] = request
        self.scheduler.add(request)
        return rid

    def abort_request(self, request_id: int | str) -> RequestOutput:
        """Stop a request now; its unfinished samples end with ``finish_reason="abort"`` and free their blocks."""
        request = self._requests.pop(request_id)
        self.scheduler.abort(request)
        return self._output(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    # ------------------------------------------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        """Run one forward step (a prefill or a decode) and return the requests that finished in it."""
        if self.scheduler is None:
            return []
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        if isinstance(batch, PrefillBatch):
            self._prefill(batch)
        else:
            self._decode(batch)
        done = [rid for rid, r in self._requests.items() if r.finished]
        return [self._output(self._requests.pop(rid)) for rid in done]

    def _forward(self, seqs: list[Sequence], query_lens: list[int]) -> torch.Tensor:
        """Run the model on the last ``query_lens[i]`` tokens of each sequence; returns float32 logits of each
        sequence's last token, ``[S, V]``."""
        dev = self.model.device
        blocks = self.scheduler.blocks
        ids, pos = [], []
        for seq, q in zip(seqs, query_lens):
            L = len(seq.token_ids)
            ids.extend(seq.token_ids[L - q:])
            pos.extend(range(L - q, L))
        meta = AttentionMetadata.build([blocks.block_table(s.seq_id) for s in seqs], [len(s) for s in seqs],
                                       query_lens, self.block_size, dev)
        hidden = self.model.forward(torch.tensor(ids, dtype=torch.long, device=dev),
                                    torch.tensor(pos, dtype=torch.long, device=dev),
                                    self.kv_cache.as_list(), meta, self.backend)
        last = (meta.cu_seqlens_q[1:] - 1).long()
        return self.model.compute_logits(hidden[last])

    def _prefill(self, batch: PrefillBatch) -> None:
        logits = self._forward(batch.seqs, [len(s) for s in batch.seqs])
        rows, samples = [], []
        for i, (seq, request) in enumerate(zip(batch.seqs, batch.requests)):
            family = [seq]
            if request is not None:  # a new prompt: fork its other samples from the prefilled first one
                request.prefilled = True
                for sibling in request.seqs[1:]:
                    copies = self.scheduler.blocks.fork(seq.seq_id, sibling.seq_id)
                    self.kv_cache.copy_blocks(copies)
                    family.append(sibling)
            for member in family:
                member.status = SequenceStatus.RUNNING
                rows.append(i)
                samples.append(member)
        self._sample_and_append(logits[torch.tensor(rows, device=logits.device)], samples)
        for member in samples:  # the ones its first token did not finish decode from the next step on
            if member.status is SequenceStatus.RUNNING:
                self.scheduler.start(member)

    def _decode(self, batch: DecodeBatch) -> None:
        """One decode step of every running sequence, from the persistent rows of ``batch.batch``: metadata and
        sampling inputs are slices of its arrays, the sampled tokens and log-probs come back in one copy, and the
        stop checks are vectorised (``RunningBatch``)."""
        rows = batch.batch
        if self._static is not None:
            tokens, logprobs = self._static_step(rows)
        else:
            dev = self.model.device
            input_ids, positions, meta = rows.decode_inputs(dev)
            if self.shared_prefix:
                meta.prefix_groups = self._prefix_groups(rows)
            hidden = self.model.forward(input_ids, positions, self.kv_cache.as_list(), meta, self.backend)
            tokens, logprobs = sample(self.model.compute_logits(hidden), **rows.sampling_inputs(dev))
        host = torch.stack((tokens.to(torch.float64), logprobs.to(torch.float64))).cpu().numpy()  # one copy
        for seq, reason in rows.advance(host[0].astype(np.int64), host[1]):
            self.scheduler.finish(seq, reason)

    def _static_step(self, rows) -> tuple[torch.Tensor, torch.Tensor]:
        """The decode step on the static buffers (a CUDA graph replay on CUDA); a capture that fails switches to
        eager steps on the same buffers, with a warning."""
        try:
            return self._static.step(rows)
        except GraphCaptureError as err:  # decoding goes on, correctly, without graphs
            warn_graphs_off(err)
            self._static.use_graphs = False
            return self._static.step(rows)

    def _prefix_groups(self, rows) -> PrefixGroups | None:
        """The shared-prefix groups of the running rows, rebuilt only when the rows changed (the groups' shared blocks
        never change while they run), used only while they save at least ``PREFIX_MIN_SAVING`` of the step's block
        reads."""
        if self._prefix_cache is None or self._prefix_cache[0] != rows.version:
            n = rows.size
            tables = [rows.block_tables[r, :rows.num_blocks[r]].tolist() for r in range(n)]
            groups = PrefixGroups.build([s.request_id for s in rows.seqs], tables,
                                        [s.prompt_len // self.block_size for s in rows.seqs], self.model.device,
                                        min_saving=0.0)
            self._prefix_cache = (rows.version, groups)
        groups = self._prefix_cache[1]
        if groups is None or groups.saved_blocks < PREFIX_MIN_SAVING * int(rows.num_blocks[:rows.size].sum()):
            return None
        return groups

    def _sample_and_append(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        dev = logits.device
        params = [s.params for s in seqs]
        tokens, logprobs = sample(
            logits,
            temperature=torch.tensor([p.temperature for p in params], dtype=torch.float32, device=dev),
            top_k=torch.tensor([p.top_k for p in params], dtype=torch.long, device=dev)
            if any(p.uses_top_k for p in params) else None,
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32, device=dev)
            if any(p.uses_top_p for p in params) else None,
            seeds=torch.tensor([s.seed for s in seqs], dtype=torch.long, device=dev),
            positions=torch.tensor([len(s) for s in seqs], dtype=torch.long, device=dev),
        )
        for seq, token, logprob in zip(seqs, tokens.tolist(), logprobs.tolist()):  # one host sync per step
            seq.token_ids.append(token)
            seq.logprobs.append(logprob)
            p = seq.params
            if (not p.ignore_eos and token in self.eos_token_ids) or token in (p.stop_token_ids or ()):
                self.scheduler.finish(seq, "stop")
            elif seq.num_generated >= p.max_tokens or len(seq) >= self.max_model_len:
                self.scheduler.finish(seq, "length")

    def _output(self, request: Request) -> RequestOutput:
        outs = []
        for s in request.seqs:
            text = None
            if self.tokenizer is not None:
                text = self.tokenizer.decode(s.output_token_ids, skip_special_tokens=True)
            outs.append(CompletionOutput(index=s.index, token_ids=s.output_token_ids, logprobs=list(s.logprobs),
                                         finish_reason=s.finish_reason or "abort", text=text))
        return RequestOutput(request_id=request.request_id, prompt_token_ids=request.prompt_token_ids, outputs=outs)

    # -------------------------------------------------------------------------------------------------- generate
    def generate(self, prompt_token_ids: list[list[int]], sampling_params: SamplingParams | list[SamplingParams]
                 | None = None) -> list[RequestOutput]:
        """Generate for every prompt; returns one ``RequestOutput`` per prompt, in input order.

        ``sampling_params``: one for all prompts or one per prompt (default ``SamplingParams()``). If anything
        raises midway, the unfinished requests are aborted so the KV blocks are all returned."""
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompt_token_ids)
        if len(sampling_params) != len(prompt_token_ids):
            raise ValueError(f"sampling_params must be one SamplingParams or one per prompt "
                             f"({len(prompt_token_ids)}), got {len(sampling_params)}")
        ids = []
        results: dict[int | str, RequestOutput] = {}
        try:
            for prompt, params in zip(prompt_token_ids, sampling_params):
                ids.append(self.add_request(prompt, params))
            while any(rid not in results for rid in ids):
                finished = self.step()
                results.update((o.request_id, o) for o in finished)
                if not finished and not self.scheduler.has_work():
                    raise RuntimeError("generator stalled with unfinished requests (a bug: please report)")
        finally:
            for rid in ids:
                if rid in self._requests:
                    self.abort_request(rid)
        return [results[rid] for rid in ids]
