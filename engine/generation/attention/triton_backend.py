"""The Triton backend: a paged flash-decoding kernel for the decode step; prefill falls back to the torch backend.

Decode is where generation time goes (one new token per sequence, the whole context read from the paged cache every
step), so that is what runs in Triton. Prefill and mixed steps (any sequence with more than one new token) call
``TorchAttention`` (SDPA per sequence over the gathered context, bottom-right causal), which is correct for every
shape and runs once per prompt.

Decode kernel (split-KV flash-decoding, as lightllm / SGLang / vLLM ``decode_attention.py``, page size >= 1):

- stage 1, grid ``(S, H_kv * ceil(G / BLOCK_H), num_splits)``: program ``(s, j, c)`` takes ``BLOCK_H`` of the
  ``G = H / H_kv`` query heads that share a kv head (GQA: one read of each K/V tile serves all of them; ``BLOCK_H =
  next_pow2(G)`` capped at 16, padded rows masked) and walks the tokens ``[c * split_len, min((c + 1) * split_len,
  L_s))`` of sequence ``s`` in tiles of ``BLOCK_N`` tokens. Token ``t`` is gathered through the block table (block
  ``block_tables[s, t // block_size]``, offset ``t % block_size``), so any block size works and tiles need not align
  with blocks. Scores ``q . k`` come from ``tl.dot`` when ``G >= dot_min_group`` (rows padded to 16, the tensor-core
  minimum) or a broadcast multiply-reduce otherwise; an online softmax in float32 (base 2, the scale folded into
  ``log2 e``) accumulates ``P V``. The split's normalised output and its log-sum-exp go to float32 scratch
  ``[S, H, num_splits, D]`` and ``[S, H, num_splits]``; splits past ``L_s`` do nothing.
- stage 2, grid ``(S, H)``: merges the ``ceil(L_s / split_len)`` splits of the sequence by their log-sum-exp
  (``o = sum_c 2^(lse_c - m) o_c / sum_c 2^(lse_c - m)``) and stores ``[S, H, D]`` in q's dtype. When every sequence
  fits in one split, stage 1 writes the output directly and stage 2 is skipped.

``split_len`` (tokens per split): fixed by ``split_size`` when given, so that a sequence's output does not depend on
which other sequences share the batch (batch invariance: the same splits, the same float32 sums); otherwise chosen from
the batch shape so that about ``4 x SMs`` programs run. Head dims up to 256 (padded to a power of two >= 16 with a
mask); float32, float16 and bfloat16 caches and queries (loads are upcast to float32; on the GPU the ``tl.dot`` path
keeps half-precision operands for the tensor cores, under the CPU interpreter it multiplies in float32). float64
inputs take the torch backend (the reference). The host never synchronises: the grid comes from the metadata's host
lists.

Shared-prefix (cascade) decode (``PrefixGroups``, one read of each group's prefix): ``triton_cascade.py``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from engine.generation.attention.base import AttentionBackend, write_kv
from engine.generation.attention.metadata import AttentionMetadata
from engine.generation.attention.torch_backend import TorchAttention
from kernels._backend import HAS_TRITON, interpreting, tl, triton

MAX_HEAD_DIM = 256
DOT_MIN_GROUP = 4  # G >= this uses tl.dot (rows padded to 16); smaller groups a broadcast multiply-reduce
_MAX_BLOCK_H = 16  # query rows per program (the tl.dot minimum); larger groups take several programs per kv head
# Query rows per program of the broadcast path. On an H100 (triton 3.6) a 16-row float32 broadcast-multiply-reduce
# came out 6e-4 off (relative; tf32-like, as if lowered to a tensor-core dot) while 8 rows matched to 1e-6.
_MAX_BROADCAST_H = 8
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634
_MIN_SPLIT = 256  # heuristic splits hold at least this many tokens (shorter ones cost more in the merge than they save)
_BROADCAST_TILE = 2048  # BLOCK_H * BLOCK_N * BLOCK_D of the broadcast path's product (registers)


# ------------------------------------------------------------------------------------------------------------ kernels
@triton.jit
def _paged_decode_split_kernel(
    O, LSE, Q, K_CACHE, V_CACHE, BLOCK_TABLES, CONTEXT_LENS, START_BLOCKS,
    scale_log2,  # softmax scale * log2(e)
    G, D, split_len, n_hblocks,
    stride_qs, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_bts,
    stride_os, stride_oh, stride_oc, stride_od,
    stride_ls, stride_lh,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_DOT: tl.constexpr, IS_DOT_F32: tl.constexpr, HAS_SPLITS: tl.constexpr, HAS_START: tl.constexpr,
):
    s = tl.program_id(0)
    kvh = tl.program_id(1) // n_hblocks
    rows = (tl.program_id(1) % n_hblocks) * BLOCK_H + tl.arange(0, BLOCK_H)  # of the G query heads of kv head kvh
    c = tl.program_id(2)
    ctx = tl.load(CONTEXT_LENS + s)
    start = c * split_len
    if HAS_START:  # the cascade's suffix: splits count from the sequence's first unshared block
        start += tl.load(START_BLOCKS + s).to(tl.int32) * BLOCK_SIZE
    if start < ctx:
        end = tl.minimum(start + split_len, ctx)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        h_mask = rows < G
        d_mask = offs_d < D
        heads = kvh * G + rows
        q = tl.load(Q + s.to(tl.int64) * stride_qs + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                    mask=h_mask[:, None] & d_mask[None, :], other=0.0)
        q_f32 = q.to(tl.float32)
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
        table = BLOCK_TABLES + s.to(tl.int64) * stride_bts
        k_head = K_CACHE + kvh.to(tl.int64) * stride_kh
        v_head = V_CACHE + kvh.to(tl.int64) * stride_vh
        for n0 in range(start, end, BLOCK_N):
            pos = n0 + offs_n
            n_mask = pos < end
            blk = tl.load(table + pos // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
            off = (pos % BLOCK_SIZE).to(tl.int64)
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(k_head + blk[:, None] * stride_kb + off[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                        mask=kv_mask, other=0.0)
            v = tl.load(v_head + blk[:, None] * stride_vb + off[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                        mask=kv_mask, other=0.0)
            if IS_DOT:
                if IS_DOT_F32:
                    qk = tl.dot(q_f32, tl.trans(k.to(tl.float32)), input_precision="ieee")
                else:
                    qk = tl.dot(q.to(k.dtype), tl.trans(k))
            else:
                qk = tl.sum(q_f32[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
            qk = tl.where(n_mask[None, :], qk * scale_log2, float("-inf"))
            # every tile holds at least one valid token, so m_new is finite
            m_new = tl.maximum(m_i, tl.max(qk, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if IS_DOT:
                if IS_DOT_F32:
                    pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
                else:
                    pv = tl.dot(p.to(v.dtype), v)
            else:
                pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        out = acc / l_i[:, None]
        o_row = O + s.to(tl.int64) * stride_os + c * stride_oc
        o_ptrs = o_row + heads[:, None] * stride_oh + offs_d[None, :] * stride_od
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=h_mask[:, None] & d_mask[None, :])
        if HAS_SPLITS:
            tl.store(LSE + s.to(tl.int64) * stride_ls + heads * stride_lh + c, m_i + tl.log2(l_i), mask=h_mask)


@triton.jit
def _paged_decode_reduce_kernel(
    OUT, O_PART, LSE_PART, CONTEXT_LENS, D, split_len,
    stride_outs, stride_outh, stride_outd,
    stride_ps, stride_ph, stride_pc,
    stride_ls, stride_lh,
    BLOCK_D: tl.constexpr,
):
    s = tl.program_id(0)
    h = tl.program_id(1)
    ctx = tl.load(CONTEXT_LENS + s)
    n_splits = (ctx + split_len - 1) // split_len
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    part = O_PART + s.to(tl.int64) * stride_ps + h * stride_ph + offs_d
    lse = LSE_PART + s.to(tl.int64) * stride_ls + h * stride_lh
    # split 0 always holds tokens (ctx >= 1): start the merge from it
    m = tl.load(lse)
    acc = tl.load(part, mask=d_mask, other=0.0)
    l = tl.full([], 1.0, tl.float32)
    for c in range(1, n_splits):
        lse_c = tl.load(lse + c)
        m_new = tl.maximum(m, lse_c)
        alpha = tl.exp2(m - m_new)
        w = tl.exp2(lse_c - m_new)
        acc = acc * alpha + w * tl.load(part + c * stride_pc, mask=d_mask, other=0.0)
        l = l * alpha + w
        m = m_new
    tl.store(OUT + s.to(tl.int64) * stride_outs + h * stride_outh + offs_d * stride_outd,
             (acc / l).to(OUT.dtype.element_ty), mask=d_mask)


# ----------------------------------------------------------------------------------------------------------- launcher
@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


class DecodeTiles(NamedTuple):
    """The decode kernel's compile-time tiling for one (G, D, cache dtype)."""

    is_dot: bool
    block_h: int  # query heads per program (padded; G > block_h runs ceil(G / block_h) programs per kv head)
    block_n: int  # tokens per tile
    block_d: int  # head dim padded to a power of two >= 16
    num_warps: int


def decode_tiles(G: int, D: int, cache_dtype: torch.dtype = torch.bfloat16, *, dot_min_group: int = DOT_MIN_GROUP,
                 interpret: bool | None = None) -> DecodeTiles:
    """The tiles the launcher uses for ``G`` query heads per kv head of dim ``D``.

    Sizes come from ptxas register counts for sm_90 (triton 3.6, ``tests/gpu_compile_check.py`` variants; no GPU
    timing yet): the broadcast path keeps ``block_h * block_n * block_d`` near 2048 (64-122 registers, 4-8 programs
    per SM); the dot path uses 32 tokens per tile for half-precision caches and 16 for float32 (ieee dot), 192-255
    registers without spills. A broadcast with 8 query rows costs as many registers as the padded 16-row dot for a
    quarter of the tile, hence ``DOT_MIN_GROUP = 4``."""
    interpret = interpreting() if interpret is None else interpret
    is_dot = G >= dot_min_group
    block_d = max(16, triton.next_power_of_2(D))
    block_h = _MAX_BLOCK_H if is_dot else min(triton.next_power_of_2(G), _MAX_BROADCAST_H)
    num_warps = 4
    if interpret:  # small tiles so that the tests cross tile, block and split boundaries
        block_n = 16 if is_dot else 4
    elif is_dot:
        block_n = 16 if cache_dtype == torch.float32 else 32
        num_warps = 8 if cache_dtype == torch.float32 and block_d >= 256 else 4
    else:
        block_n = max(4, min(64, _BROADCAST_TILE // (block_h * block_d)))
    return DecodeTiles(is_dot, block_h, block_n, block_d, num_warps)


def choose_split_len(num_seqs: int, head_programs: int, max_context_len: int, block_n: int, device: torch.device,
                     split_size: int | None = None, *, min_split: int = _MIN_SPLIT) -> int:
    """Tokens per split, a multiple of ``block_n``: ``split_size`` rounded up, or enough splits for ~4 programs per SM
    (never shorter than ``min_split`` tokens, so short contexts run as one split)."""
    if split_size is None:
        sms = _sm_count(device.index or 0) if device.type == "cuda" else 1
        want = max(1, -(-4 * sms // max(1, num_seqs * head_programs)))
        split_size = max(min_split, -(-max_context_len // want))
        split_size = triton.next_power_of_2(split_size)
    return max(block_n, -(-split_size // block_n) * block_n)


def _check_decode_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                         context_lens: torch.Tensor) -> None:
    S, H, D = q.shape
    H_kv, Dk = k_cache.shape[2], k_cache.shape[3]
    if v_cache.shape != k_cache.shape or Dk != D or H % H_kv:
        raise ValueError(f"paged decode needs q [S, H, D] and caches [num_blocks, block_size, H_kv, D] with H a "
                         f"multiple of H_kv; got q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache "
                         f"{tuple(v_cache.shape)}")
    if not (0 < D <= MAX_HEAD_DIM):
        raise ValueError(f"the triton attention backend supports head dims 1..{MAX_HEAD_DIM}, got {D}")
    if q.dtype not in _DTYPES or k_cache.dtype not in _DTYPES or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"the triton attention backend needs float32/float16/bfloat16 q and caches (one cache "
                         f"dtype); got q {q.dtype}, k_cache {k_cache.dtype}, v_cache {v_cache.dtype}")
    if block_tables.shape[0] != S or context_lens.shape != (S,):
        raise ValueError(f"block_tables [S, max_blocks] and context_lens [S] must have S={S} rows, got "
                         f"{tuple(block_tables.shape)} and {tuple(context_lens.shape)}")


def _empty_output(q: torch.Tensor) -> torch.Tensor:
    # Triton's interpreter truncates float32 -> bfloat16 (round toward zero; the GPU rounds to nearest even): there the
    # kernels store float32 and torch rounds.
    out_dtype = torch.float32 if interpreting() and q.dtype == torch.bfloat16 else q.dtype
    return torch.empty(q.shape, dtype=out_dtype, device=q.device)


def _split_pass(q, k_cache, v_cache, block_tables, context_lens, max_context_len, scale, split_size, dot_min_group,
                *, out=None, start_blocks=None):
    """Stage 1 (``_paged_decode_split_kernel``) over the tokens ``[start_blocks[s] * block_size, L_s)`` of each
    sequence (all of them when ``start_blocks`` is None). With ``out`` given and a single split, it writes ``out``
    and returns None; else it returns ``(o_part [S, H, num_splits, D], lse [S, H, num_splits], split_len)``, float32,
    split ``c`` of sequence ``s`` holding its tokens ``start + [c * split_len, (c + 1) * split_len)``."""
    S, H, D = q.shape
    block_size, H_kv = k_cache.shape[1], k_cache.shape[2]
    G = H // H_kv
    tiles = decode_tiles(G, D, k_cache.dtype, dot_min_group=dot_min_group)
    n_hblocks = -(-G // tiles.block_h)
    split_len = choose_split_len(S, H_kv * n_hblocks, max_context_len, tiles.block_n, q.device, split_size)
    num_splits = -(-max_context_len // split_len)
    has_splits = num_splits > 1 or out is None
    if has_splits:
        o_part = torch.empty((S, H, num_splits, D), dtype=torch.float32, device=q.device)
        lse = torch.empty((S, H, num_splits), dtype=torch.float32, device=q.device)
        o_strides = o_part.stride()
        lse_strides = lse.stride()[:2]
    else:  # one split: stage 1 writes the output
        o_part, lse = out, out
        o_strides = (out.stride(0), out.stride(1), 0, out.stride(2))
        lse_strides = (0, 0)
    is_dot_f32 = interpreting() or k_cache.dtype == torch.float32
    _paged_decode_split_kernel[(S, H_kv * n_hblocks, num_splits)](
        o_part, lse, q, k_cache, v_cache, block_tables, context_lens,
        context_lens if start_blocks is None else start_blocks,  # START_BLOCKS, read only with HAS_START
        scale * _LOG2E, G, D, split_len, n_hblocks,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), block_tables.stride(0),
        *o_strides, *lse_strides,
        BLOCK_SIZE=block_size, BLOCK_N=tiles.block_n, BLOCK_H=tiles.block_h, BLOCK_D=tiles.block_d,
        IS_DOT=tiles.is_dot, IS_DOT_F32=is_dot_f32, HAS_SPLITS=has_splits, HAS_START=start_blocks is not None,
        num_warps=tiles.num_warps,
    )
    return (o_part, lse, split_len) if has_splits else None


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, max_context_len: int, scale: float, *,
                           split_size: int | None = None, dot_min_group: int = DOT_MIN_GROUP) -> torch.Tensor:
    """Decode attention over the paged cache: ``q [S, H, D]`` (one new token per sequence, already written),
    ``k_cache, v_cache [num_blocks, block_size, H_kv, D]``, ``block_tables [S, max_blocks]`` int32, ``context_lens
    [S]`` int32 (>= 1; ``max_context_len`` its host max) -> ``[S, H, D]`` in q's dtype. See the module docstring."""
    _check_decode_inputs(q, k_cache, v_cache, block_tables, context_lens)
    out = _empty_output(q)
    if q.shape[0] == 0:
        return out.to(q.dtype)
    parts = _split_pass(q, k_cache, v_cache, block_tables, context_lens, max_context_len, scale, split_size,
                        dot_min_group, out=out)
    if parts is not None:
        o_part, lse, split_len = parts
        block_d = max(16, triton.next_power_of_2(q.shape[2]))
        _paged_decode_reduce_kernel[tuple(q.shape[:2])](
            out, o_part, lse, context_lens, q.shape[2], split_len,
            *out.stride(), *o_part.stride()[:3], *lse.stride()[:2],
            BLOCK_D=block_d, num_warps=1 if block_d <= 64 else 2,
        )
    return out.to(q.dtype)


# ------------------------------------------------------------------------------------------------------------ backend
class TritonAttention(AttentionBackend):
    """Paged flash-decoding in Triton for decode steps; prefill and mixed steps reuse ``TorchAttention``.

    ``forward(..., kv_written=True)`` (``accepts_kv_written``): the caller has stored this step's K/V (the model's
    fused ``kernels.rope_and_cache``), so decode skips ``write_kv``; prefill passes the flag on when the torch backend
    accepts it, else the torch backend stores ``k, v`` again (the values already there).

    Args:
        split_size: tokens per KV split of the decode kernel; None picks it from the batch shape (fast), a fixed
            value makes each sequence's output independent of the rest of the batch (batch invariance).
        dot_min_group: query heads per kv head from which the kernel uses ``tl.dot`` (padded to 16 rows) instead of
            a broadcast multiply-reduce.
    """

    name = "triton"
    accepts_kv_written = True
    supports_prefix_groups = True  # decode reads AttentionMetadata.prefix_groups: shared_prefix_decode_attention
    graph_safe = True  # the split grid is planned from the host-side maximum, lengths are read on the device

    def __init__(self, *, split_size: int | None = None, dot_min_group: int = DOT_MIN_GROUP):
        if not HAS_TRITON:
            raise ImportError("the triton attention backend needs the 'triton' package (pip install triton)")
        if split_size is not None and split_size < 1:
            raise ValueError(f"split_size must be a positive number of tokens or None, got {split_size}")
        if dot_min_group < 1:
            raise ValueError(f"dot_min_group must be >= 1, got {dot_min_group}")
        self.split_size = split_size
        self.dot_min_group = dot_min_group
        self._torch = TorchAttention()

    def validate(self, *, block_size: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        device = torch.device(device)
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int for the triton attention backend, got {block_size!r}")
        if not 0 < head_dim <= MAX_HEAD_DIM:
            raise ValueError(f"the triton attention backend supports head_dim 1..{MAX_HEAD_DIM}, got {head_dim}")
        if dtype not in _DTYPES:
            raise ValueError(f"the triton attention backend supports float32/float16/bfloat16, got {dtype} "
                             f"(use attention_backend='torch' for float64)")
        if device.type != "cuda" and not interpreting():
            raise ValueError(f"the triton attention backend runs on CUDA devices (or on the CPU with "
                             f"TRITON_INTERPRET=1 set before import, tests only); got device {device}")

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float, *,
                kv_written: bool = False) -> torch.Tensor:
        if not meta.is_decode or q.dtype == torch.float64 or k_cache.dtype == torch.float64:
            if kv_written and getattr(self._torch, "accepts_kv_written", False):
                return self._torch.forward(q, k, v, k_cache, v_cache, meta, scale, kv_written=True)
            # a torch backend that always writes stores k, v again: the same values (k holds the stored ones)
            return self._torch.forward(q, k, v, k_cache, v_cache, meta, scale)
        if k_cache.shape[1] != meta.block_size:
            raise ValueError(f"the cache holds blocks of {k_cache.shape[1]} tokens but the metadata says "
                             f"block_size={meta.block_size}")
        if not kv_written:
            write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        if meta.prefix_groups is not None:  # the cascade: each group's shared prefix read once for its members
            # imported here: triton_cascade imports this module's decode pass (a module-level import would be circular)
            from engine.generation.attention.triton_cascade import shared_prefix_decode_attention

            return shared_prefix_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens,
                                                  meta.max_context_len, scale, meta.prefix_groups,
                                                  split_size=self.split_size, dot_min_group=self.dot_min_group)
        return paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens,
                                      meta.max_context_len, scale, split_size=self.split_size,
                                      dot_min_group=self.dot_min_group)
