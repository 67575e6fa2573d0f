"""Packed, token-budget micro-batches (veRL ``use_remove_padding`` + ``ppo_max_token_len_per_gpu``, slime
``--max-tokens-per-gpu``): an update's rows are grouped so that each micro-batch holds at most a budget of real
(prompt + response) tokens, and each group runs as one row of its sequences laid end to end, without padding.

Four parts, in the order a step uses them:

1. ``plan_micro_batches`` / ``token_groups``: which rows go together. A row longer than the budget goes alone; the
   others are spread over ``k`` groups by LPT (longest first, each into the lightest group), starting at the lower
   bound ``k = ceil(tokens / budget)`` and raising ``k`` until every group fits, but never past the number of groups
   of first-fit-decreasing (FFD, whose packing is taken when LPT cannot fit in as few). LPT's groups are balanced:
   the heaviest is within one row of the mean, so long and short sequences mix. Deterministic (ties go to the lower
   row index). Under ``torchrun`` every rank runs the largest rank's count (FSDP gathers in every forward): a rank
   with fewer groups splits its heaviest ones in two.
2. ``pack``: the rows of a ``TokenBatch`` as a ``PackedBatch``: input ids ``[1, N]`` of their real tokens only,
   position ids restarting at 0 with each sequence, the response index remapped into the flat sequence; labels and
   response mask stay ``[b, T]``, so a caller sees the padded path's shapes.
3. ``packed_hidden``: the decoder body's own forward on the flat row. Attention must not cross sequences. Hugging
   Face transformers (5.x; checked on 5.24) does it itself when it gets ``position_ids`` and no attention mask:
   ``masking_utils.find_packed_sequence_indices`` turns every restart of the positions into a new sequence, and
   ``create_causal_mask`` ANDs the causal mask with "same sequence" (a materialised block-diagonal mask for
   ``sdpa`` and ``eager``, a block mask for ``flex_attention``); the ``flash_attention_*`` implementations run
   varlen on ``cu_seqlens`` derived from the same positions. Any other implementation gets an explicit
   block-diagonal causal 4D mask (``block_causal_mask``; ``EXPLICIT_MASK = True`` forces it, for tests). Rotary
   embeddings read the restarted positions, so each sequence sees the positions it has in the padded layout.
4. Segment attention (``SEGMENT_ATTENTION``, on by default): the dense block-diagonal mask makes ``sdpa`` compute
   ``N^2`` scores per micro-batch, the masked ones included (the padded path computes ``b * L^2``), so with a large
   budget a packed step on the CPU was slower than the padded one. ``packed_hidden`` therefore passes the sequence
   bounds to the attention layers (a keyword transformers forwards to the attention function untouched, kept by
   activation checkpointing's recomputation) and wraps transformers' ``sdpa`` entry of ``AttentionInterface``
   (``_segment_sdpa``): a call that carries the bounds runs one causal SDPA per sequence (FlashAttention's kernel
   on each diagonal block, no mask), every other call goes to transformers' own function unchanged. Sliding-window,
   soft-capped or bidirectional layers keep transformers' mask. (transformers still builds its ``[N, N]`` bool mask
   once per forward, then unused: ``N^2`` bytes.)
   ``tests/engine/algorithms/test_packing.py`` checks that packed log-probs, values and gradients equal the padded
   ones on every path.

Cost: the padded path computes ``B * L`` token positions (``L`` the longest row); the packed one ``N``, the real
tokens; attention ``sum(l_i^2)`` scores with segment attention or FlashAttention's varlen kernels. Letters: ``B`` rows
of the step, ``b`` rows of a micro-batch, ``T`` response tokens (the step's padded length), ``L`` its padded row
length, ``N`` real tokens of a micro-batch, ``H`` hidden size.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.algorithms.accumulation import micro_slices
from engine.distributed.context import all_reduce_max

if TYPE_CHECKING:
    from engine.algorithms.batching import TokenBatch

EXPLICIT_MASK = False
"""Force the explicit block-diagonal mask (``block_causal_mask``) instead of transformers' own packed-sequence
detection (tests flip it, to run both paths on the same inputs)."""

SEGMENT_ATTENTION = True
"""Run ``sdpa`` layers one causal SDPA per packed sequence (module docstring, 4); False keeps transformers' dense
block-diagonal mask (tests flip it)."""

# attention implementations whose mask creation (or varlen kernel) transformers derives from packed position ids
_HF_PACKED = ("sdpa", "eager", "flex_attention")
_BOUNDS = "rlhf_packed_seq_bounds"  # the keyword that carries the sequence bounds to _segment_sdpa


# ----------------------------------------------------------------------------------------------------------- planner
def _ffd(items: list[int], lengths: Sequence[int], budget: int) -> list[list[int]]:
    """First-fit decreasing (``items`` sorted longest first): each row into the first group it fits, else a new one."""
    groups: list[list[int]] = []
    loads: list[int] = []
    for i in items:
        for g, load in enumerate(loads):
            if load + lengths[i] <= budget:
                groups[g].append(i)
                loads[g] += lengths[i]
                break
        else:
            groups.append([i])
            loads.append(lengths[i])
    return groups


def _lpt(items: list[int], lengths: Sequence[int], k: int) -> tuple[list[list[int]], list[int]]:
    """LPT over ``k`` groups (``items`` sorted longest first): each row into the lightest group (ties: lowest group).
    Returns the non-empty groups and their token counts."""
    heap = [(0, g) for g in range(k)]
    groups: list[list[int]] = [[] for _ in range(k)]
    for i in items:
        load, g = heapq.heappop(heap)
        groups[g].append(i)
        heapq.heappush(heap, (load + lengths[i], g))
    loads = [sum(lengths[i] for i in g) for g in groups]
    keep = [g for g, group in enumerate(groups) if group]
    return [groups[g] for g in keep], [loads[g] for g in keep]


def _longest_first(items, lengths: Sequence[int]) -> list[int]:
    return sorted(items, key=lambda i: (-lengths[i], i))


def token_groups(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Row indices grouped so that each group's ``lengths`` sum to at most ``budget`` (a row longer than ``budget``
    forms a group alone), in as few groups as first-fit-decreasing needs (often the lower bound ``ceil(sum /
    budget)``) and balanced by LPT (module docstring). Each row appears exactly once; a group's rows are ascending,
    the groups heaviest first (ties: lowest first row). Deterministic.

    ``lengths``: tokens per row (host ints, >= 0). Raises ``ValueError`` for ``budget < 1`` or a negative length."""
    if budget < 1:
        raise ValueError(f"the token budget must be >= 1, got {budget}")
    lengths = [int(n) for n in lengths]
    if any(n < 0 for n in lengths):
        raise ValueError(f"token counts must be >= 0, got {min(lengths)}")
    order = _longest_first(range(len(lengths)), lengths)
    groups = [[i] for i in order if lengths[i] > budget]
    fitting = [i for i in order if lengths[i] <= budget]
    if fitting:
        ffd = _ffd(fitting, lengths, budget)
        chosen = ffd
        for k in range(max(1, math.ceil(sum(lengths[i] for i in fitting) / budget)), len(ffd) + 1):
            lpt, loads = _lpt(fitting, lengths, k)
            if max(loads) <= budget:
                chosen = lpt
                break
        groups += chosen
    return _ordered(groups, lengths)


def _ordered(groups: list[list[int]], lengths: Sequence[int]) -> list[list[int]]:
    groups = [sorted(g) for g in groups]
    return sorted(groups, key=lambda g: (-sum(lengths[i] for i in g), g[0]))


def split_groups(groups: list[list[int]], lengths: Sequence[int], count: int) -> list[list[int]]:
    """``groups`` split until there are ``count`` of them: the heaviest group of two or more rows is split in two by
    LPT, again and again (each part stays within the budget its group kept). Raises ``ValueError`` when there are
    fewer rows than ``count``."""
    groups = [list(g) for g in groups]
    while len(groups) < count:
        splittable = [g for g in groups if len(g) > 1]
        if not splittable:
            raise ValueError(f"cannot run {count} micro-batches on {len(groups)} rows: under torchrun every rank needs "
                             "at least as many rows as the largest rank has micro-batches (equal shares per rank)")
        heaviest = min(splittable, key=lambda g: (-sum(lengths[i] for i in g), min(g)))
        groups.remove(heaviest)
        groups += _lpt(_longest_first(heaviest, lengths), lengths, 2)[0]
    return _ordered(groups, lengths)


def plan_micro_batches(batch: TokenBatch, micro_batch_size: int,
                       max_tokens_per_micro_batch: int | None = None) -> list[slice | torch.Tensor]:
    """The micro-batches of one optimizer step over ``batch``, as row selections for ``batch.rows`` and for the
    per-row tensors (``old_logprobs[rows]``).

    ``max_tokens_per_micro_batch`` None: ``micro_slices(B, micro_batch_size)``, today's fixed-row slices. Else int64
    row-index tensors on the batch's device, one per group of ``token_groups(attention_mask.sum(-1), budget)``
    (one host read of the row lengths), split further (``split_groups``) to the largest count of any rank under
    ``torchrun`` (one all-reduce): every rank runs the same number of forwards and backwards, as FSDP needs.
    ``micro_batch_size`` is unused then."""
    rows = batch.labels.shape[0]
    if max_tokens_per_micro_batch is None:
        return list(micro_slices(rows, micro_batch_size))
    lengths = batch.attention_mask.sum(-1).tolist()
    groups = token_groups(lengths, max_tokens_per_micro_batch)
    count = int(all_reduce_max({"micro_batches": len(groups)})["micro_batches"])
    groups = split_groups(groups, lengths, count)
    device = batch.input_ids.device
    return [torch.tensor(g, dtype=torch.long, device=device) for g in groups]


# ------------------------------------------------------------------------------------------------------ packed batch
@dataclass
class PackedBatch:
    """``b`` rows of a ``TokenBatch``, their real tokens laid end to end in one row (no padding).

    input_ids ``[1, N]`` int64; position_ids ``[1, N]`` int64 (0, 1, ... within each sequence); response_index
    ``[b, T]`` int64 (flat position of the hidden state that predicts response token t; 0 where padded); labels
    ``[b, T]`` int64 (-100 where padded) and response_mask ``[b, T]`` bool, as the padded batch's; seq_bounds: the
    host offsets ``0, l_0, l_0 + l_1, ..., N`` of the sequences (None: derived from position_ids where needed)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    response_index: torch.Tensor
    labels: torch.Tensor
    response_mask: torch.Tensor
    seq_bounds: tuple[int, ...] | None = None

    @property
    def num_tokens(self) -> int:
        """Response tokens in the batch (host-side count)."""
        return int(self.response_mask.sum())


def pack(batch: TokenBatch) -> PackedBatch:
    """The rows of ``batch`` (right-padded) packed into one row of ``N = attention_mask.sum()`` tokens, in row order.
    One host read (the row lengths, for ``seq_bounds``)."""
    mask = batch.attention_mask.bool()
    lengths = mask.sum(-1)
    ends = lengths.cumsum(0)
    index = torch.where(batch.response_mask, batch.response_index + (ends - lengths)[:, None], 0)
    return PackedBatch(batch.input_ids[mask][None], (mask.cumsum(-1) - 1)[mask][None], index, batch.labels,
                       batch.response_mask, seq_bounds=(0, *ends.tolist()))


def micro_batch(batch: TokenBatch, rows: slice | torch.Tensor,
                max_tokens_per_micro_batch: int | None = None) -> TokenBatch | PackedBatch:
    """The micro-batch ``rows`` of ``batch`` (one entry of ``plan_micro_batches``): ``batch.rows(rows)``, packed
    (``pack``) when ``max_tokens_per_micro_batch`` is set."""
    mb = batch.rows(rows)
    return mb if max_tokens_per_micro_batch is None else pack(mb)


# --------------------------------------------------------------------------------------------------- packed forward
def _transformers_packs(config) -> bool:
    """Whether transformers isolates packed sequences itself for this model's attention implementation."""
    impl = getattr(config, "_attn_implementation", None) or "eager"
    return not EXPLICIT_MASK and (impl in _HF_PACKED or impl.startswith("flash"))


def block_causal_mask(position_ids: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The causal mask of packed sequences, ``[1, 1, N, N]``: query ``i`` sees key ``j <= i`` of its own sequence (a
    sequence starts wherever ``position_ids`` ``[1, N]`` does not step by 1). ``dtype`` None: bool (True = attend,
    SDPA's convention); a float dtype: additive (0 where seen, the dtype's minimum elsewhere; eager attention's)."""
    pos = position_ids[0]
    step = torch.diff(pos, prepend=pos[:1] - 1)
    seq = (step != 1).cumsum(0)
    idx = torch.arange(pos.shape[0], device=pos.device)
    seen = (seq[:, None] == seq[None, :]) & (idx[None, :] <= idx[:, None])
    if dtype is None:
        return seen[None, None]
    zero = torch.zeros((), dtype=dtype, device=pos.device)
    return torch.where(seen, zero, torch.finfo(dtype).min)[None, None]


def _segment_sdpa(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, *args,
                  **kwargs):
    """transformers' ``sdpa`` attention function, except for a packed row that carries its sequence bounds
    (``_BOUNDS``): then one causal ``scaled_dot_product_attention`` per sequence, ``query`` ``[1, heads, N, D]``,
    ``key``/``value`` ``[1, kv_heads, N, D]`` -> ``([1, N, heads, D], None)`` as transformers' function returns."""
    bounds = kwargs.pop(_BOUNDS, None)
    plain = (bounds is None or args or query.shape[0] != 1 or query.shape[2] != key.shape[2]
             or kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None
             or kwargs.get("position_bias") is not None or kwargs.get("is_causal") is False
             or not getattr(module, "is_causal", True))
    if plain:
        return _HF_SDPA[0](module, query, key, value, attention_mask, *args, **kwargs)
    from transformers.integrations.sdpa_attention import repeat_kv, use_gqa_in_sdpa

    gqa = query.shape[1] != key.shape[1]
    if gqa and not use_gqa_in_sdpa(None, key, value):
        key = repeat_kv(key, query.shape[1] // key.shape[1])
        value = repeat_kv(value, query.shape[1] // value.shape[1])
        gqa = False
    dropout = kwargs.get("dropout", 0.0)
    out = [torch.nn.functional.scaled_dot_product_attention(
        query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], dropout_p=dropout, is_causal=True,
        scale=kwargs.get("scaling"), **({"enable_gqa": True} if gqa else {}))
        for s, e in itertools.pairwise(bounds)]
    return torch.cat(out, 2).transpose(1, 2).contiguous(), None


_HF_SDPA: list = []  # transformers' own sdpa attention function, once _segment_sdpa wraps it


def _install_segment_sdpa() -> bool:
    """Wrap transformers' ``sdpa`` attention entry with ``_segment_sdpa`` (once per process; a call without the
    bounds keyword is passed through unchanged). Returns whether the wrapper is in place (False when another
    package replaced the entry after us: then the bounds are not passed and transformers' mask isolates)."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    current = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if not _HF_SDPA:
        _HF_SDPA.append(current)
        AttentionInterface.register("sdpa", _segment_sdpa)
        return True
    return current is _segment_sdpa


def packed_hidden(body, packed: PackedBatch) -> torch.Tensor:
    """The last hidden states ``[1, N, H]`` of the decoder body ``body`` (a HF ``*Model``: ``model.model`` of a
    causal LM, ``model.base_model`` of a value model) on ``packed``, each sequence attending only to itself (module
    docstring). No KV cache. Differentiable."""
    config = body.config
    impl = getattr(config, "_attn_implementation", None)
    extra = {}
    if _transformers_packs(config):
        mask = None
        if SEGMENT_ATTENTION and impl == "sdpa" and _install_segment_sdpa():
            bounds = packed.seq_bounds
            if bounds is None:  # where transformers sees a sequence start: the positions do not step by 1
                pos = packed.position_ids[0]
                starts = ((pos[1:] - pos[:-1]) != 1).nonzero().flatten().add(1).tolist()
                bounds = (0, *starts, pos.shape[0])
            extra[_BOUNDS] = tuple(bounds)
    else:
        mask = block_causal_mask(packed.position_ids, dtype=None if impl == "sdpa" else next(body.parameters()).dtype)
    return body(input_ids=packed.input_ids, position_ids=packed.position_ids, attention_mask=mask, use_cache=False,
                **extra).last_hidden_state
