"""The compiled CPU paged-attention ops (``csrc/cpu/paged_attention.cpp``) against float64 PyTorch references written
here (gather each context, softmax), and the torch backend's use of them.

Every case scatters the contexts over a shuffled block pool whose every other slot holds NaN: blocks no sequence owns,
the slots past a context's end in its last block, and the padding of the block tables (which names a NaN block). An
op that read any of them would return NaN. The ops compute in float32 from the (rounded) inputs and return float32,
so bf16 inputs are held to float32's tolerance against a gold built from the same rounded values (tests/_numerics).

Skipped with ``RLHF_ENGINE_BUILD_EXT=0`` (the CI reruns the engine tests so); failed, not skipped, when the extension
is enabled but lacks the ops (a build failure).
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from engine.generation.attention import AttentionMetadata, TorchAttention
from engine.generation.attention.metadata import PrefixGroups
from kernels import _extension
from tests._numerics import assert_close

OPS = ("paged_decode_attention", "paged_prefill_attention", "paged_prefix_attention", "reshape_and_cache")


@pytest.fixture
def ops():
    """``torch.ops.rlhf_engine``, skipping when the extension is disabled and failing when it did not build."""
    if not _extension.enabled():
        pytest.skip("compiled extension disabled (RLHF_ENGINE_BUILD_EXT=0)")
    missing = [name for name in OPS if not _extension.has_op(name)]
    if missing:
        pytest.fail(f"compiled extension lacks {missing}: {_extension.extension_error()}")
    return torch.ops.rlhf_engine


# ------------------------------------------------------------------------------------------------------------ helpers
def paged_case(ctx_lens, H, H_kv, D, block_size, dtype, *, seed=0, cache_dtype=None):
    """Random ``q [S, H, D]`` and caches holding each sequence's context in shuffled blocks, NaN everywhere else.

    Returns ``(q, k_cache, v_cache, block_tables [S, W] int32, context_lens [S] int32, keys, values)`` with
    ``keys[s], values[s]`` the sequence's logical ``[ctx, H_kv, D]`` K/V (cache dtype)."""
    cache_dtype = cache_dtype or dtype
    g = torch.Generator().manual_seed(seed)
    n_blocks = [-(-c // block_size) for c in ctx_lens]
    total = sum(n_blocks) + 3
    perm = torch.randperm(total, generator=g).tolist()
    nan_block = perm[-1]  # never owned: the tables' padding points at it
    width = max(n_blocks, default=0) + 1
    tables, i = [], 0
    for n in n_blocks:
        tables.append(perm[i:i + n] + [nan_block] * (width - n))
        i += n
    k_cache = torch.full((total, block_size, H_kv, D), float("nan"), dtype=cache_dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    keys = [torch.randn(c, H_kv, D, generator=g, dtype=torch.float64).to(cache_dtype) for c in ctx_lens]
    values = [torch.randn(c, H_kv, D, generator=g, dtype=torch.float64).to(cache_dtype) for c in ctx_lens]
    for table, K, V in zip(tables, keys, values):
        for p in range(K.shape[0]):
            k_cache[table[p // block_size], p % block_size] = K[p]
            v_cache[table[p // block_size], p % block_size] = V[p]
    q = torch.randn(len(ctx_lens), H, D, generator=g, dtype=torch.float64).to(dtype)
    return (q, k_cache, v_cache, torch.tensor(tables, dtype=torch.int32).reshape(len(ctx_lens), width),
            torch.tensor(ctx_lens, dtype=torch.int32), keys, values)


def attend_ref(q, K, V, scale, visible=None):
    """float64 attention of ``q [Q, H, D]`` over ``K, V [L, H_kv, D]`` (GQA by repeating kv heads); ``visible [Q, L]``
    bool. Returns ``(out [Q, H, D], lse [Q, H])``; a row that sees nothing gets ``out = 0, lse = -inf``."""
    r = q.shape[1] // K.shape[1]
    K = K.double().repeat_interleave(r, dim=1)
    V = V.double().repeat_interleave(r, dim=1)
    s = torch.einsum("qhd,thd->qht", q.double(), K) * scale
    if visible is not None:
        s = s.masked_fill(~visible[:, None, :], -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.where(torch.isfinite(lse)[..., None], (s - lse[..., None]).exp(), torch.zeros_like(s))
    return torch.einsum("qht,thd->qhd", p, V), lse


def check_lse(lse, want):
    empty = torch.isinf(want)
    assert torch.equal(torch.isinf(lse) & (lse < 0), empty), "lse must be -inf exactly where nothing is attended"
    assert_close(lse[~empty], want[~empty], torch.float32, "lse")


# --------------------------------------------------------------------------------------------------------- decode
DECODE_CASES = [  # (context lengths, H, H_kv, D, block size)
    ([1], 1, 1, 16, 1),  # the smallest: one sequence, one token, blocks of one
    ([1, 7, 33, 0], 2, 2, 64, 16),  # MHA; an empty context
    ([5, 40, 17], 4, 2, 37, 3),  # GQA 2, odd D, odd block size
    ([64, 3, 129], 8, 2, 128, 16),  # GQA 4, several chunks of keys
    ([50, 19], 4, 1, 80, 1),  # MQA (GQA 4), block size 1
    ([21], 6, 3, 32, 3),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"ctx{c[0]}-H{c[1]}/{c[2]}-D{c[3]}-bs{c[4]}")
def test_decode_matches_float64_reference(ops, case, dtype):
    lens, H, H_kv, D, bs = case
    q, kc, vc, tables, ctx, keys, values = paged_case(lens, H, H_kv, D, bs, dtype, seed=len(lens) + D)
    scale = D ** -0.5
    out, lse = ops.paged_decode_attention(q, kc, vc, tables, ctx, None, scale)
    assert out.dtype == lse.dtype == torch.float32 and out.shape == (len(lens), H, D) and lse.shape == (len(lens), H)
    for s in range(len(lens)):
        want_o, want_l = attend_ref(q[s:s + 1], keys[s], values[s], scale)
        assert_close(out[s], want_o[0], torch.float32, f"out of sequence {s}")
        check_lse(lse[s], want_l[0])


def test_decode_bf16_queries_over_a_float32_cache(ops):
    q, kc, vc, tables, ctx, keys, values = paged_case([9, 30], 4, 2, 64, 4, torch.bfloat16, cache_dtype=torch.float32)
    out, _ = ops.paged_decode_attention(q, kc, vc, tables, ctx, None, 0.125)
    for s in range(2):
        assert_close(out[s], attend_ref(q[s:s + 1], keys[s], values[s], 0.125)[0][0], torch.float32, "out")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bs", [1, 3, 16])
def test_decode_from_start_blocks(ops, bs, dtype):
    # the cascade's suffix part: each sequence from block start_blocks[s] on; all blocks skipped -> empty
    lens = [1, 10, 47, 33]
    q, kc, vc, tables, ctx, keys, values = paged_case(lens, 4, 2, 16, bs, dtype, seed=bs)
    n_blocks = [-(-c // bs) for c in lens]
    start = torch.tensor([0, 1, n_blocks[2] // 2, n_blocks[3]])
    out, lse = ops.paged_decode_attention(q, kc, vc, tables, ctx, start, 0.25)
    for s in range(len(lens)):
        first = int(start[s]) * bs
        want_o, want_l = attend_ref(q[s:s + 1], keys[s][first:], values[s][first:], 0.25)
        assert_close(out[s], want_o[0], torch.float32, f"out of sequence {s}")
        check_lse(lse[s], want_l[0])
    assert torch.equal(out[3], torch.zeros_like(out[3]))  # nothing left after its start block
    # int32 start blocks are accepted as well
    assert torch.equal(ops.paged_decode_attention(q, kc, vc, tables, ctx, start.int(), 0.25)[0], out)


def test_nan_outside_the_contexts_never_reaches_an_output(ops):
    # every unused slot of paged_case is NaN already; here also the whole rest of the pool and large garbage values
    q, kc, vc, tables, ctx, _, _ = paged_case([3, 16, 17], 4, 2, 16, 16, torch.float32)
    out, lse = ops.paged_decode_attention(q, kc, vc, tables, ctx, None, 0.25)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


# --------------------------------------------------------------------------------------------------------- prefill
PREFILL_CASES = [  # (context lengths, new tokens each, H, H_kv, D, block size)
    ([1], [1], 1, 1, 16, 1),
    ([12, 5, 9], [4, 5, 1], 4, 4, 16, 4),  # cached prefix; a whole prompt; a one-token step
    ([70, 41], [37, 41], 4, 2, 37, 3),  # several query tiles per sequence, GQA 2, odd D
    ([33, 100, 2], [17, 3, 2], 8, 2, 64, 16),  # GQA 4
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: f"ctx{c[0]}-q{c[1]}-H{c[2]}/{c[3]}-D{c[4]}-bs{c[5]}")
def test_prefill_over_cached_context_matches_float64_reference(ops, case, dtype):
    lens, q_lens, H, H_kv, D, bs = case
    _, kc, vc, tables, ctx, keys, values = paged_case(lens, H, H_kv, D, bs, dtype, seed=D + bs)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(sum(q_lens), H, D, generator=g, dtype=torch.float64).to(dtype)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    scale = D ** -0.5
    out = ops.paged_prefill_attention(q, kc, vc, tables, ctx, cu, scale)
    assert out.dtype == torch.float32 and out.shape == q.shape
    for s, (L, Q) in enumerate(zip(lens, q_lens)):
        # new token i sits at position L - Q + i and sees positions <= it (bottom-right causal)
        visible = torch.arange(L)[None, :] <= torch.arange(L - Q, L)[:, None]
        want, _ = attend_ref(q[cu[s]:cu[s + 1]], keys[s], values[s], scale, visible)
        assert_close(out[cu[s]:cu[s + 1]], want, torch.float32, f"prefill of sequence {s}")


# ------------------------------------------------------------------------------------------------- shared prefix
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (8, 2)], ids=["G1", "G2", "G4"])
@pytest.mark.parametrize("bs", [1, 3, 16])
def test_prefix_attention_matches_float64_reference(ops, bs, heads, dtype):
    # groups of 3, 1 and 2 rows (padded with row 0 and valid=False) over prefixes of 4, 1 and 2 blocks; row 5 in none
    H, H_kv = heads
    D = 24
    prefix_blocks = [4, 1, 2]
    _, kc, vc, tables, _, keys, values = paged_case([n * bs for n in prefix_blocks], H, H_kv, D, bs, dtype, seed=bs)
    q = torch.randn(7, H, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype)
    rows = torch.tensor([[6, 0, 3], [2, 0, 0], [1, 4, 0]])
    valid = torch.tensor([[True, True, True], [True, False, False], [True, True, False]])
    num_blocks = torch.tensor(prefix_blocks)
    out, lse = ops.paged_prefix_attention(q, kc, vc, rows, valid, tables.long(), num_blocks, 0.3)
    seen = set()
    for p in range(3):
        for g in range(3):
            if valid[p, g]:
                row = int(rows[p, g])
                seen.add(row)
                want_o, want_l = attend_ref(q[row:row + 1], keys[p], values[p], 0.3)
                assert_close(out[row], want_o[0], torch.float32, f"row {row} of group {p}")
                check_lse(lse[row], want_l[0])
    for row in set(range(7)) - seen:  # in no group: nothing attended
        assert torch.equal(out[row], torch.zeros_like(out[row])) and bool(torch.isneginf(lse[row]).all())
    # int32 group tables are accepted as well
    again = ops.paged_prefix_attention(q, kc, vc, rows, valid, tables, num_blocks.int(), 0.3)
    assert torch.equal(again[0], out)


# --------------------------------------------------------------------------------------------------------- K/V store
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reshape_and_cache_writes_only_the_slots(ops, dtype):
    g = torch.Generator().manual_seed(3)
    kc = torch.randn(6, 3, 2, 5, generator=g).to(dtype)
    vc = torch.randn(6, 3, 2, 5, generator=g).to(dtype)
    k, v = torch.randn(4, 2, 5, generator=g).to(dtype), torch.randn(4, 2, 5, generator=g).to(dtype)
    slots = torch.tensor([0, 17, 5, 9])
    want_k, want_v = kc.clone(), vc.clone()
    want_k.view(-1, 2, 5)[slots] = k
    want_v.view(-1, 2, 5)[slots] = v
    ops.reshape_and_cache(k, v, kc, vc, slots)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)


# ------------------------------------------------------------------------------------------------- argument errors
def _decode_args():
    q, kc, vc, tables, ctx, _, _ = paged_case([5, 9], 4, 2, 16, 4, torch.float32)
    return {"q": q, "k_cache": kc, "v_cache": vc, "block_tables": tables, "context_lens": ctx, "start_blocks": None,
            "scale": 0.25}


def _call_decode(ops, args):
    return ops.paged_decode_attention(args["q"], args["k_cache"], args["v_cache"], args["block_tables"],
                                      args["context_lens"], args["start_blocks"], args["scale"])


DECODE_ERRORS = {  # change -> (error, message fragment)
    "q 2-D": (lambda a: {"q": a["q"][0]}, ValueError, "q must be 3-D"),
    "q float64": (lambda a: {"q": a["q"].double()}, TypeError, "q must be float32, bfloat16 or float16"),
    "q int": (lambda a: {"q": a["q"].int()}, TypeError, "q must be float32"),
    "cache 3-D": (lambda a: {"k_cache": a["k_cache"][0]}, ValueError, "k_cache must be 4-D"),
    "v_cache shape": (lambda a: {"v_cache": a["v_cache"][:, :2]}, ValueError, "v_cache must have the shape of"),
    "v_cache dtype": (lambda a: {"v_cache": a["v_cache"].bfloat16()}, TypeError, "v_cache must be"),
    "cache dtype": (lambda a: {"q": a["q"].float(), "k_cache": a["k_cache"].bfloat16(),
                   "v_cache": a["v_cache"].bfloat16()}, TypeError, "k_cache must have q's dtype"),
    "head dim": (lambda a: {"q": a["q"][..., :8]}, ValueError, "k_cache head dim (size 3) must equal q's 8"),
    "H % H_kv": (lambda a: {"q": a["q"][:, :3]}, ValueError, "H = 3 must be a multiple of k_cache's H_kv = 2"),
    "table dtype": (lambda a: {"block_tables": a["block_tables"].long()}, TypeError, "block_tables must be Int"),
    "table rows": (lambda a: {"block_tables": a["block_tables"][:1]}, ValueError, "block_tables must have 2 rows"),
    "table width": (lambda a: {"block_tables": a["block_tables"][:, :2]}, ValueError,
                    "context_lens[1] = 9 needs 3 blocks of 4 but block_tables has width 2"),
    "block id": (lambda a: {"block_tables": a["block_tables"] + 100}, ValueError, "is not a block of the cache"),
    "lens dtype": (lambda a: {"context_lens": a["context_lens"].long()}, TypeError, "context_lens must be Int"),
    "lens count": (lambda a: {"context_lens": a["context_lens"][:1]}, ValueError, "context_lens must have 2 rows"),
    "negative len": (lambda a: {"context_lens": torch.tensor([-1, 9], dtype=torch.int32)}, ValueError,
                     "context_lens[0] must be >= 0, got -1"),
    "start count": (lambda a: {"start_blocks": torch.zeros(3, dtype=torch.long)}, ValueError,
                    "start_blocks must have 2 rows"),
    "start dtype": (lambda a: {"start_blocks": torch.zeros(2)}, TypeError, "start_blocks must be int32 or int64"),
    "start < 0": (lambda a: {"start_blocks": torch.tensor([0, -1])}, ValueError, "start_blocks[1] must be >= 0"),
    "cache strides": (lambda a: {"k_cache": a["k_cache"].transpose(2, 3).contiguous().transpose(2, 3)},
                      ValueError, "contiguous in their last dim"),
}


@pytest.mark.parametrize("name", list(DECODE_ERRORS))
def test_decode_argument_errors(ops, name):
    change, error, message = DECODE_ERRORS[name]
    args = _decode_args()
    args.update(change(args))
    with pytest.raises(error, match=re.escape(message)):
        _call_decode(ops, args)


def test_prefill_prefix_and_store_argument_errors(ops):
    q, kc, vc, tables, ctx, _, _ = paged_case([5, 9], 4, 2, 16, 4, torch.float32)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    prefill = ops.paged_prefill_attention
    with pytest.raises(ValueError, match="cu_seqlens_q must have 3 rows"):
        prefill(q, kc, vc, tables, ctx, cu[:2], 0.25)
    with pytest.raises(ValueError, match="cu_seqlens_q must run from 0 to q's 2 rows"):
        prefill(q, kc, vc, tables, ctx, cu, 0.25)
    with pytest.raises(ValueError, match="sequence 0 has 7 new tokens"):
        prefill(torch.randn(9, 4, 16), kc, vc, tables, ctx, torch.tensor([0, 7, 9], dtype=torch.int32), 0.25)
    with pytest.raises(TypeError, match="cu_seqlens_q must be Int"):
        prefill(q, kc, vc, tables, ctx, cu.long(), 0.25)
    prefix = ops.paged_prefix_attention
    rows, valid = torch.tensor([[0, 1]]), torch.tensor([[True, True]])
    blocks, nb = tables[:1, :2], torch.tensor([2])
    with pytest.raises(ValueError, match=r"group_rows\[0, 1\] = 5 is not a row of q \(2 rows\)"):
        prefix(q, kc, vc, torch.tensor([[0, 5]]), valid, blocks, nb, 0.25)
    with pytest.raises(ValueError, match="group_valid must have the shape of group_rows"):
        prefix(q, kc, vc, rows, valid[:, :1], blocks, nb, 0.25)
    with pytest.raises(TypeError, match="group_rows must be Long"):
        prefix(q, kc, vc, rows.int(), valid, blocks, nb, 0.25)
    with pytest.raises(ValueError, match="group_num_blocks \\* block_size\\[0\\] = 12 needs 3 blocks"):
        prefix(q, kc, vc, rows, valid, blocks, torch.tensor([3]), 0.25)
    store = ops.reshape_and_cache
    k = torch.randn(2, 2, 16)
    with pytest.raises(ValueError, match=r"slot_mapping\[1\] = 1000 is not a slot of the cache"):
        store(k, k, kc, vc, torch.tensor([0, 1000]))
    with pytest.raises(TypeError, match="k must be"):
        store(k.double(), k, kc, vc, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="k must be \\[N, 2, 16\\]"):
        store(k[:, :1], k[:, :1], kc, vc, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="slot_mapping must have 2 entries"):
        store(k, k, kc, vc, torch.tensor([0]))


# ------------------------------------------------------------------------------------- the torch backend uses them
def _spy_ops(monkeypatch):
    """Record the compiled ops the backend calls."""
    called = []
    real = _extension.op

    def spy(name):
        called.append(name)
        return real(name)

    monkeypatch.setattr(_extension, "op", spy)
    return called


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backend_decode_and_cached_prefill_run_the_compiled_ops(ops, monkeypatch, dtype):
    called = _spy_ops(monkeypatch)
    H, H_kv, D, bs = 4, 2, 16, 4
    for lens, q_lens in (([3, 9, 17], [1, 1, 1]), ([12, 5, 9], [4, 5, 1])):
        _, kc, vc, tables, _, keys, values = paged_case(lens, H, H_kv, D, bs, dtype)
        meta = AttentionMetadata.build([t[:-(-c // bs)] for t, c in zip(tables.tolist(), lens)], lens, q_lens, bs,
                                       torch.device("cpu"))
        q = torch.randn(sum(q_lens), H, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(dtype)
        k = torch.cat([K[c - n:] for K, c, n in zip(keys, lens, q_lens)]).to(dtype)
        v = torch.cat([V[c - n:] for V, c, n in zip(values, lens, q_lens)]).to(dtype)
        out = TorchAttention().forward(q, k, v, kc, vc, meta, D ** -0.5)
        assert out.dtype == dtype
        row = 0
        for s, (L, Q) in enumerate(zip(lens, q_lens)):
            visible = torch.arange(L)[None, :] <= torch.arange(L - Q, L)[:, None]
            want, _ = attend_ref(q[row:row + Q], keys[s], values[s], D ** -0.5, visible)
            assert_close(out[row:row + Q], want, dtype, f"sequence {s}")
            row += Q
    assert called.count("paged_decode_attention") == 1 and called.count("paged_prefill_attention") == 1
    assert called.count("reshape_and_cache") == 2


def test_backend_cascade_runs_the_compiled_ops(ops, monkeypatch):
    called = _spy_ops(monkeypatch)
    bs, H, H_kv, D = 4, 4, 2, 16
    shared, own = [7, 2], [[11, 12], [3], [13], [8, 9, 10]]  # samples 0-2 share blocks 7, 2; sample 3 alone
    tables = [shared + own[0], shared + own[1], shared + own[2], own[3]]
    lens = [13, 10, 9, 12]
    kc = torch.randn(14, bs, H_kv, D)
    vc = torch.randn(14, bs, H_kv, D)
    q = torch.randn(4, H, D)
    meta = AttentionMetadata.build(tables, lens, [1] * 4, bs, torch.device("cpu"))
    meta.prefix_groups = PrefixGroups.build([0, 0, 0, 1], tables, [2, 2, 2, 0], torch.device("cpu"), min_saving=0.0)
    out = TorchAttention().forward(q, q[:, :H_kv], q[:, :H_kv], kc, vc, meta, 0.25, kv_written=True)
    assert called == ["paged_decode_attention", "paged_prefix_attention"]
    for s in range(4):
        K = kc[tables[s]].flatten(0, 1)[:lens[s]]
        V = vc[tables[s]].flatten(0, 1)[:lens[s]]
        assert_close(out[s], attend_ref(q[s:s + 1], K, V, 0.25)[0][0], torch.float32, f"sample {s}")


def test_backend_falls_back_to_pytorch_when_disabled_and_for_float64(ops, monkeypatch):
    called = _spy_ops(monkeypatch)
    q, kc, vc, tables, _, keys, values = paged_case([3, 9], 4, 2, 16, 4, torch.float64)
    kc, vc = kc.nan_to_num(0.0), vc.nan_to_num(0.0)  # the PyTorch path masks slots past a context, 0 x NaN is NaN
    meta = AttentionMetadata.build([t[:-(-c // 4)] for t, c in zip(tables.tolist(), [3, 9])], [3, 9], [1, 1], 4,
                                   torch.device("cpu"))
    k = torch.stack([keys[0][-1], keys[1][-1]])
    v = torch.stack([values[0][-1], values[1][-1]])
    out64 = TorchAttention().forward(q, k, v, kc, vc, meta, 0.25)
    monkeypatch.setenv("RLHF_ENGINE_BUILD_EXT", "0")
    out32 = TorchAttention().forward(q.float(), k.float(), v.float(), kc.float(), vc.float(), meta, 0.25)
    assert called == []
    for s in range(2):
        want = attend_ref(q[s:s + 1], keys[s], values[s], 0.25)[0][0]
        assert_close(out64[s], want, torch.float64, "float64 reference path")
        assert_close(out32[s], want, torch.float32, "PyTorch fallback")
