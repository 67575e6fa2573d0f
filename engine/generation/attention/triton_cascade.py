"""Shared-prefix (cascade) decode for the Triton attention backend: the prefix and merge kernels and their launcher,
``shared_prefix_decode_attention``, which ``triton_backend.TritonAttention`` calls for decode steps with prefix groups.

When the step's metadata carries ``PrefixGroups`` (the ``M`` samples of a prompt share its full prompt blocks:
``BlockManager.fork``), ``shared_prefix_decode_attention`` reads each group's prefix once for all its members instead
of once per sample (Hydragen, Juravsky et al. 2024; FlashInfer's cascade attention), the same math as the torch
backend's CPU cascade. A prefix kernel (grid ``(P, H_kv * ceil(M G / BLOCK_R), prefix splits)``) applies each prefix
K/V tile, with ``tl.dot``, to the ``M x G`` query rows of its group and kv head; stage 1 of ``triton_backend``'s decode
kernel (``_paged_decode_split_kernel`` with ``HAS_START``), started at each sequence's first unshared block, covers the
suffix; a merge kernel (grid ``(S, H)``) combines the prefix and suffix splits by log-sum-exp. See
``shared_prefix_decode_attention``'s docstring.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from engine.generation.attention.metadata import PrefixGroups
from engine.generation.attention.triton_backend import (
    _LOG2E,
    DOT_MIN_GROUP,
    _check_decode_inputs,
    _empty_output,
    _split_pass,
    choose_split_len,
)
from kernels._backend import interpreting, tl, triton

_MAX_PREFIX_ROWS = 64  # query rows per shared-prefix program (one Hopper wgmma M); more rows, more programs
# heuristic prefix splits hold at least this many tokens: a prefix program does M x G rows of work per token,
# so splits pay off sooner than in single-row decode (a guess until bench/gpu_checks.sh times it)
_MIN_PREFIX_SPLIT = 128


# ------------------------------------------------------------------------------------------------------------ kernels
@triton.jit
def _shared_prefix_kernel(
    O, LSE, Q, K_CACHE, V_CACHE, GROUP_ROWS, GROUP_VALID, GROUP_BLOCKS, GROUP_NUM_BLOCKS,
    scale_log2,  # softmax scale * log2(e)
    G, D, M, split_len, n_rblocks,
    stride_qs, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_gr, stride_gv, stride_gb,
    stride_os, stride_oh, stride_oc, stride_od,
    stride_ls, stride_lh,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_DOT_F32: tl.constexpr,
):
    p = tl.program_id(0)
    kvh = tl.program_id(1) // n_rblocks
    # query row r of kv head kvh in group p: member r // G, query head kvh * G + r % G (M * G rows, padded)
    r = (tl.program_id(1) % n_rblocks) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(2)
    plen = tl.load(GROUP_NUM_BLOCKS + p).to(tl.int32) * BLOCK_SIZE
    start = c * split_len
    if start < plen:
        end = tl.minimum(start + split_len, plen)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        d_mask = offs_d < D
        member = r // G
        in_group = member < M
        valid = tl.load(GROUP_VALID + p.to(tl.int64) * stride_gv + member, mask=in_group, other=0)
        r_mask = in_group & (valid != 0)  # padded group slots (and rows past M * G) are computed on zeros, not stored
        seq = tl.load(GROUP_ROWS + p.to(tl.int64) * stride_gr + member, mask=r_mask, other=0).to(tl.int64)
        heads = kvh * G + r % G
        q = tl.load(Q + seq[:, None] * stride_qs + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                    mask=r_mask[:, None] & d_mask[None, :], other=0.0)
        m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
        table = GROUP_BLOCKS + p.to(tl.int64) * stride_gb
        k_head = K_CACHE + kvh.to(tl.int64) * stride_kh
        v_head = V_CACHE + kvh.to(tl.int64) * stride_vh
        for n0 in range(start, end, BLOCK_N):
            pos = n0 + offs_n
            n_mask = pos < end
            blk = tl.load(table + pos // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
            off = (pos % BLOCK_SIZE).to(tl.int64)
            kv_mask = n_mask[:, None] & d_mask[None, :]
            # one load of the tile serves every member and query head of the group
            k = tl.load(k_head + blk[:, None] * stride_kb + off[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                        mask=kv_mask, other=0.0)
            v = tl.load(v_head + blk[:, None] * stride_vb + off[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                        mask=kv_mask, other=0.0)
            if IS_DOT_F32:
                qk = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                qk = tl.dot(q.to(k.dtype), tl.trans(k))
            qk = tl.where(n_mask[None, :], qk * scale_log2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, axis=1))  # finite: every tile holds a valid token
            alpha = tl.exp2(m_i - m_new)
            pr = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(pr, axis=1)
            if IS_DOT_F32:
                pv = tl.dot(pr, v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(pr.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        o_ptrs = O + seq[:, None] * stride_os + heads[:, None] * stride_oh + c * stride_oc + offs_d[None, :] * stride_od
        tl.store(o_ptrs, acc / l_i[:, None], mask=r_mask[:, None] & d_mask[None, :])
        tl.store(LSE + seq * stride_ls + heads * stride_lh + c, m_i + tl.log2(l_i), mask=r_mask)


@triton.jit
def _merge_part(m, l, acc, lse_c, o_c):
    """Fold one partial softmax (normalised ``o_c``, base-2 log-sum-exp ``lse_c``) into the running ``(m, l, acc)``;
    from ``m = -inf, l = 0, acc = 0`` the first part gets weight 1 (its ``lse_c`` is finite)."""
    m_new = tl.maximum(m, lse_c)
    alpha = tl.exp2(m - m_new)
    w = tl.exp2(lse_c - m_new)
    return m_new, l * alpha + w, acc * alpha + w * o_c


@triton.jit
def _cascade_merge_kernel(
    OUT, O_PREFIX, LSE_PREFIX, O_SUFFIX, LSE_SUFFIX, CONTEXT_LENS, START_BLOCKS,
    D, prefix_split_len, split_len,
    stride_outs, stride_outh, stride_outd,
    stride_pos, stride_poh, stride_poc,
    stride_pls, stride_plh,
    stride_sos, stride_soh, stride_soc,
    stride_sls, stride_slh,
    BLOCK_SIZE: tl.constexpr, BLOCK_D: tl.constexpr,
):
    s = tl.program_id(0)
    h = tl.program_id(1)
    ctx = tl.load(CONTEXT_LENS + s)
    plen = tl.load(START_BLOCKS + s).to(tl.int32) * BLOCK_SIZE  # 0 outside a group: no prefix part
    n_prefix = (plen + prefix_split_len - 1) // prefix_split_len
    n_suffix = (ctx - plen + split_len - 1) // split_len
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    o_pre = O_PREFIX + s.to(tl.int64) * stride_pos + h * stride_poh + offs_d
    lse_pre = LSE_PREFIX + s.to(tl.int64) * stride_pls + h * stride_plh
    o_suf = O_SUFFIX + s.to(tl.int64) * stride_sos + h * stride_soh + offs_d
    lse_suf = LSE_SUFFIX + s.to(tl.int64) * stride_sls + h * stride_slh
    # the partial softmaxes of the prefix splits, then of the suffix splits, merged by their log-sum-exp (base 2)
    m = tl.full([], float("-inf"), tl.float32)
    l = tl.full([], 0.0, tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for c in range(n_prefix):
        m, l, acc = _merge_part(m, l, acc, tl.load(lse_pre + c),
                                tl.load(o_pre + c * stride_poc, mask=d_mask, other=0.0))
    for c in range(n_suffix):
        m, l, acc = _merge_part(m, l, acc, tl.load(lse_suf + c),
                                tl.load(o_suf + c * stride_soc, mask=d_mask, other=0.0))
    tl.store(OUT + s.to(tl.int64) * stride_outs + h * stride_outh + offs_d * stride_outd,
             (acc / l).to(OUT.dtype.element_ty), mask=d_mask)


# ----------------------------------------------------------------------------------------------------------- launcher
class PrefixTiles(NamedTuple):
    """The shared-prefix kernel's compile-time tiling for ``rows = members x G`` query rows per kv head."""

    block_r: int  # query rows per program, a power of two >= 16 (tl.dot); more rows take several programs
    block_n: int  # prefix tokens per tile (the inner dim of P V: >= 16)
    block_d: int  # head dim padded to a power of two >= 16
    num_warps: int


def prefix_tiles(rows: int, D: int, cache_dtype: torch.dtype = torch.bfloat16, *,
                 interpret: bool | None = None) -> PrefixTiles:
    """Tiles of ``_shared_prefix_kernel`` for ``rows = M x G`` query rows per kv head (a small prefill-like block).

    Sizes come from ptxas register counts for sm_90 (triton 3.9 here, the launch's divisibility-16 strides; no GPU
    timing yet, ``bench/gpu_checks.sh`` owes it). Half-precision caches: up to 64 rows per program (one Hopper
    wgmma M), 64-token tiles (32 for head dims above 128), 8 warps from 64 x 128 (rows x padded head dim) on:
    150-230 registers, no spills. float32 caches (ieee dot, FMA-lowered): 16 x 16 tiles as the decode kernel's
    (68-179 registers; 64-row float32 tiles spilled). Under the interpreter: 16-token tiles and at most 32 rows, so
    the tests cross tiles and row blocks."""
    interpret = interpreting() if interpret is None else interpret
    block_d = max(16, triton.next_power_of_2(D))
    block_r = max(16, triton.next_power_of_2(rows))
    if interpret:
        return PrefixTiles(min(block_r, 32), 16, block_d, 4)
    if cache_dtype == torch.float32:
        return PrefixTiles(16, 16, block_d, 4)
    block_r = min(block_r, _MAX_PREFIX_ROWS)
    return PrefixTiles(block_r, 32 if block_d > 128 else 64, block_d, 8 if block_r * block_d >= 64 * 128 else 4)


def shared_prefix_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                   block_tables: torch.Tensor, context_lens: torch.Tensor, max_context_len: int,
                                   scale: float, groups: PrefixGroups, *, split_size: int | None = None,
                                   dot_min_group: int = DOT_MIN_GROUP) -> torch.Tensor:
    """Cascade (shared-prefix) decode: ``paged_decode_attention``'s result, with each group's shared prefix read once
    for all its members (Hydragen, Juravsky et al. 2024; FlashInfer's cascade attention).

    Inputs as ``paged_decode_attention`` (``q [S, H, D]``, caches ``[num_blocks, block_size, H_kv, D]``,
    ``block_tables [S, max_blocks]`` int32, ``context_lens [S]`` int32, ``max_context_len`` host int) plus ``groups``
    (``metadata.PrefixGroups``: ``rows, valid [P, M]`` int64 / bool, ``blocks [P, B_p]`` int64, ``num_blocks [P]``
    int64, ``seq_prefix_blocks [S]`` int64, all on q's device; ``M`` members at most per group). Returns ``[S, H,
    D]`` in q's dtype. Three launches, no host synchronisation (grids from ``max_context_len`` and the shapes of
    ``groups``' tensors):

    - prefix, grid ``(P, H_kv * ceil(M * G / BLOCK_R), ceil(B_p * block_size / prefix_split_len))``
      (``_shared_prefix_kernel``): program ``(p, j, c)`` loads each K/V tile of split ``c`` of group ``p``'s prefix
      once and applies it, with ``tl.dot``, to the ``BLOCK_R`` query rows ``(member, query head)`` of kv head ``j``
      (``M x G`` rows padded to a power of two >= 16; padded slots and rows masked); online softmax in float32, base
      2. Writes the normalised partial output and log-sum-exp of each member row to float32 scratch ``[S, H,
      n_prefix_splits, D]`` / ``[S, H, n_prefix_splits]``;
    - suffix: ``_paged_decode_split_kernel`` with ``HAS_START``: each sequence's tokens from
      ``seq_prefix_blocks[s] * block_size`` on, in splits counted from there -> ``[S, H, num_splits, D]`` / ``[S, H,
      num_splits]``;
    - merge, grid ``(S, H)`` (``_cascade_merge_kernel``): ``o = sum_i 2^(lse_i - m) o_i / sum_i 2^(lse_i - m)`` over
      the row's prefix splits (none outside a group) and suffix splits.

    Every sequence must keep at least one token after its shared prefix (the generator shares only full prompt
    blocks; the decode token follows them). ``split_size`` fixes the tokens per split of both the prefix and the
    suffix (batch invariance, as in ``paged_decode_attention``), else both come from the batch shape."""
    _check_decode_inputs(q, k_cache, v_cache, block_tables, context_lens)
    S, H, D = q.shape
    P, M = groups.rows.shape
    B_p = groups.blocks.shape[1]
    if groups.valid.shape != (P, M) or groups.blocks.shape[0] != P or groups.num_blocks.shape != (P,) \
            or groups.seq_prefix_blocks.shape != (S,):
        raise ValueError(f"prefix groups need rows, valid [P, M], blocks [P, B_p], num_blocks [P] and "
                         f"seq_prefix_blocks [S={S}]; got {tuple(groups.rows.shape)}, {tuple(groups.valid.shape)}, "
                         f"{tuple(groups.blocks.shape)}, {tuple(groups.num_blocks.shape)}, "
                         f"{tuple(groups.seq_prefix_blocks.shape)}")
    out = _empty_output(q)
    if S == 0:
        return out.to(q.dtype)
    block_size, H_kv = k_cache.shape[1], k_cache.shape[2]
    G = H // H_kv
    o_s, lse_s, split_len = _split_pass(q, k_cache, v_cache, block_tables, context_lens, max_context_len, scale,
                                        split_size, dot_min_group, start_blocks=groups.seq_prefix_blocks)
    # no groups: every row has 0 prefix splits and nothing reads these (a split this long keeps even inconsistent
    # seq_prefix_blocks to one read of a real split)
    o_p, lse_p, prefix_split_len = o_s, lse_s, 2**30
    if P * M * B_p > 0:
        tiles = prefix_tiles(M * G, D, k_cache.dtype)
        n_rblocks = -(-(M * G) // tiles.block_r)
        max_prefix = B_p * block_size
        prefix_split_len = choose_split_len(P, H_kv * n_rblocks, max_prefix, tiles.block_n, q.device, split_size,
                                            min_split=_MIN_PREFIX_SPLIT)
        n_prefix_splits = -(-max_prefix // prefix_split_len)
        o_p = torch.empty((S, H, n_prefix_splits, D), dtype=torch.float32, device=q.device)
        lse_p = torch.empty((S, H, n_prefix_splits), dtype=torch.float32, device=q.device)
        _shared_prefix_kernel[(P, H_kv * n_rblocks, n_prefix_splits)](
            o_p, lse_p, q, k_cache, v_cache, groups.rows, groups.valid.view(torch.uint8), groups.blocks,
            groups.num_blocks, scale * _LOG2E, G, D, M, prefix_split_len, n_rblocks,
            *q.stride(), *k_cache.stride(), *v_cache.stride(),
            groups.rows.stride(0), groups.valid.stride(0), groups.blocks.stride(0),
            *o_p.stride(), *lse_p.stride()[:2],
            BLOCK_SIZE=block_size, BLOCK_N=tiles.block_n, BLOCK_R=tiles.block_r, BLOCK_D=tiles.block_d,
            IS_DOT_F32=interpreting() or k_cache.dtype == torch.float32, num_warps=tiles.num_warps,
        )
    block_d = max(16, triton.next_power_of_2(D))
    _cascade_merge_kernel[(S, H)](
        out, o_p, lse_p, o_s, lse_s, context_lens, groups.seq_prefix_blocks, D, prefix_split_len, split_len,
        *out.stride(), *o_p.stride()[:3], *lse_p.stride()[:2], *o_s.stride()[:3], *lse_s.stride()[:2],
        BLOCK_SIZE=block_size, BLOCK_D=block_d, num_warps=1 if block_d <= 64 else 2,
    )
    return out.to(q.dtype)
