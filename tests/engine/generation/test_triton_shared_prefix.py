"""Shared-prefix (cascade) decode of the Triton backend (``shared_prefix_decode_attention``): each group's shared
prompt blocks read once for all its members (prefix kernel), each sequence's own blocks by the split kernel from its
first unshared block (suffix), both merged by log-sum-exp. It must equal the plain Triton paged decode and the float64
dense reference for groups of 1..5 members (padded slots ignored), prefixes of 1..3 blocks, suffixes of one token to
several blocks, GQA 1/2/3/7, block sizes 1/4/16, head dims 16/64; rows outside any group read their whole context;
no cache slot outside a context is read, none but the new tokens' is written.

The cases come from ``tests/engine/generation/test_shared_prefix.py`` (``grouped_case``: a shuffled pool whose unused slots hold
large garbage). ``PrefixGroups`` are built here by hand, so that they can hold a group of one, rows left out of their
prompt's group, and padding wider than the largest group (``PrefixGroups.build`` makes none of these). Triton runs in
the CPU interpreter here (tests/conftest.py), where its tiles are 16 tokens and at most 32 query rows, so the cases
cross tiles, splits and row blocks. bf16/fp16 follow STYLE.md 3 (``assert_within_baseline``).
"""

from __future__ import annotations

import pytest
import torch

from engine.generation.attention import AttentionMetadata, TorchAttention, TritonAttention, paged_decode_attention
from engine.generation.attention import triton_cascade as tc
from engine.generation.attention.base import write_kv
from engine.generation.attention.metadata import PrefixGroups
from kernels._backend import HAS_TRITON, interpreting
from tests._numerics import assert_close
from tests.engine.generation.test_attention import assert_within_baseline
from tests.engine.generation.test_shared_prefix import dense_decode, grouped_case

pytestmark = pytest.mark.skipif(not HAS_TRITON or not (torch.cuda.is_available() or interpreting()),
                                reason="needs triton with CUDA or TRITON_INTERPRET=1")


def groups_by_hand(spec, width: int | None = None, leave_out=(), device="cpu") -> PrefixGroups:
    """One group per prompt of ``spec`` (``grouped_case``'s ``[(shared_blocks, [suffix lengths])]``) with shared
    blocks, in ``spec``'s row order, a group of one included; rows in ``leave_out`` join no group (they read their
    shared blocks as part of their own context). Groups are padded to ``width`` members (default: the largest group)
    with ``valid = False`` and the first group's first row (as ``PrefixGroups.build`` pads): a padded slot taken for a
    member would overwrite that row's prefix output from a later group's program."""
    S = sum(len(suffixes) for _, suffixes in spec)
    groups, prefix, row = [], [0] * S, 0
    for n, suffixes in spec:
        members = [r for r in range(row, row + len(suffixes)) if r not in leave_out]
        if n > 0 and members:
            groups.append((members, n))
            for r in members:
                prefix[r] = n
        row += len(suffixes)
    return _pack(groups, prefix, S, width, device)


def _pack(groups, prefix, S, width, device) -> PrefixGroups:
    M = width or max(len(m) for m, _ in groups)
    B_p = max(n for _, n in groups)
    rows = [m + [groups[0][0][0]] * (M - len(m)) for m, _ in groups]
    valid = [[True] * len(m) + [False] * (M - len(m)) for m, _ in groups]
    return PrefixGroups(rows=torch.tensor(rows, device=device), valid=torch.tensor(valid, device=device),
                        blocks=torch.zeros(len(groups), B_p, dtype=torch.int64, device=device),  # set by _with_blocks
                        num_blocks=torch.tensor([n for _, n in groups], device=device),
                        seq_prefix_blocks=torch.tensor(prefix, device=device))


def _with_blocks(groups: PrefixGroups, tables) -> PrefixGroups:
    """Fill ``groups.blocks`` from the first member's table (padded with 0, which the kernel must not read)."""
    for p in range(groups.rows.shape[0]):
        first, n = int(groups.rows[p, 0]), int(groups.num_blocks[p])
        groups.blocks[p, :n] = torch.tensor(tables[first][:n])
    return groups


def case_on(device, spec, bs, H, H_kv, D, dtype, *, seed=0, nan_garbage=False):
    """``grouped_case`` moved to ``device`` (the float64 ``keys, values`` stay on the CPU); with ``nan_garbage`` every
    slot outside a context is NaN first. Returns ``(q, k, v, kc, vc, meta, keys, values, tables)``."""
    q, k, v, kc, vc, meta, keys, values, _, _, tables = grouped_case(spec, bs, H, H_kv, D, dtype, seed=seed)
    if nan_garbage:  # block padding, other sequences' spare slots, the free pool: any read of one shows
        owned = torch.zeros(kc.shape[:2], dtype=torch.bool)
        for table, ctx in zip(tables, meta.context_lens_list):
            for p in range(ctx):
                owned[table[p // bs], p % bs] = True
        kc[~owned] = float("nan")
        vc[~owned] = float("nan")
    meta = AttentionMetadata.build(tables, meta.context_lens_list, [1] * len(tables), bs, torch.device(device))
    q, k, v, kc, vc = (t.to(device) for t in (q, k, v, kc, vc))
    return q, k, v, kc, vc, meta, keys, values, tables


def run_cascade(spec, bs, H, H_kv, D, dtype, *, split_size=16, width=None, leave_out=(), seed=0, nan_garbage=False,
                device="cpu"):
    """Plain Triton decode and the cascade on the same case; returns ``(cascade, plain, reference, case)`` and checks
    that the caches hold exactly the new tokens' K/V besides what they held before."""
    q, k, v, kc, vc, meta, keys, values, tables = case_on(device, spec, bs, H, H_kv, D, dtype, seed=seed,
                                                          nan_garbage=nan_garbage)
    scale = D ** -0.5
    backend = TritonAttention(split_size=split_size)
    plain = backend.forward(q, k, v, kc.clone(), vc.clone(), meta, scale)
    meta.prefix_groups = _with_blocks(groups_by_hand(spec, width, leave_out, device), tables)
    k_before, v_before = kc.clone(), vc.clone()
    cascade = backend.forward(q, k, v, kc, vc, meta, scale)
    write_kv(k_before, v_before, k, v, meta.slot_mapping)  # the only change the step may make
    assert torch.equal(kc.view(torch.uint8), k_before.view(torch.uint8))  # bitwise, NaN slots included
    assert torch.equal(vc.view(torch.uint8), v_before.view(torch.uint8))
    assert cascade.shape == q.shape and cascade.dtype == dtype
    return cascade, plain, dense_decode(q.cpu(), keys, values, scale), (q, k, v, kc, vc, meta, scale)


# (spec, block size, H, H_kv, D): members 1..5, prefixes 1..3 blocks, suffixes 1 token .. 3 blocks, G = H / H_kv
CASES = {
    "G1-b4-D16": ([(2, [1, 5, 9, 4, 3]), (1, [3]), (0, [6, 2]), (3, [1, 7])], 4, 2, 2, 16),
    "G2-b1-D16": ([(3, [1, 2]), (1, [4, 1, 1]), (2, [5])], 1, 4, 2, 16),
    "G3-b16-D64": ([(1, [1, 20, 40]), (3, [17, 1]), (2, [33])], 16, 6, 2, 64),
    "G7-b4-D64": ([(3, [1, 9, 2, 5, 4]), (2, [13, 1]), (1, [1])], 4, 7, 1, 64),  # 35 rows: two row blocks
    "G7-b16-D16": ([(2, [1, 3, 16, 17, 30])], 16, 14, 2, 16),
    "G2-b4-D64": ([(1, [2, 6]), (2, [1, 1, 1, 8]), (3, [4])], 4, 4, 2, 64),
}


@pytest.mark.parametrize("case", list(CASES))
def test_cascade_float32(case, device):
    spec, bs, H, H_kv, D = CASES[case]
    cascade, plain, want, _ = run_cascade(spec, bs, H, H_kv, D, torch.float32, device=device)
    assert_close(cascade, want, torch.float32, "triton cascade vs float64")
    assert_close(cascade, plain, torch.float32, "triton cascade vs plain triton decode")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["G2-b1-D16", "G3-b16-D64", "G7-b4-D64"])
def test_cascade_half(case, dtype, device):
    spec, bs, H, H_kv, D = CASES[case]
    cascade, plain, want, (q, k, v, kc, vc, meta, scale) = run_cascade(spec, bs, H, H_kv, D, dtype, seed=1,
                                                                       device=device)
    meta.prefix_groups = None
    baseline = TorchAttention().forward(q, k, v, kc, vc, meta, scale)  # plain PyTorch in the same dtype
    assert_within_baseline(cascade, want, baseline, dtype, "triton cascade")
    assert_within_baseline(plain, want, baseline, dtype, "plain triton decode")


@pytest.mark.parametrize("split_size", [None, 1, 40])
def test_cascade_split_sizes(split_size, device):
    # None: the heuristic (one split of each pass here); 1: one tile per split (interpreter: 48-token prefixes in
    # three); 40: splits that end inside blocks and tiles
    spec, bs, H, H_kv, D = CASES["G3-b16-D64"]
    cascade, plain, want, _ = run_cascade(spec, bs, H, H_kv, D, torch.float32, split_size=split_size, seed=2,
                                          device=device)
    assert_close(cascade, want, torch.float32, "triton cascade vs float64")
    assert_close(cascade, plain, torch.float32, "triton cascade vs plain triton decode")


def test_padded_slots_and_rows_left_out(device):
    # groups padded to 8 slots (largest group 3) with row 0, a member of the first group; rows 1 and 5 left out of
    # their prompts' groups (they read their whole context as a suffix), rows 4 and 6 groups of one
    spec = [(2, [3, 1, 6, 2]), (1, [5, 4]), (3, [2])]
    cascade, plain, want, (*_, meta, _) = run_cascade(spec, 4, 6, 2, 16, torch.float32, width=8, leave_out=(1, 5),
                                                      seed=3, device=device)
    groups = meta.prefix_groups
    assert groups.rows.shape == (3, 8) and groups.seq_prefix_blocks.tolist() == [2, 0, 2, 2, 1, 0, 3]
    assert_close(cascade, want, torch.float32, "triton cascade vs float64")
    assert_close(cascade, plain, torch.float32, "triton cascade vs plain triton decode")


def test_unused_slots_are_never_read(device):
    # every cache slot outside a context is NaN (block padding, other sequences' spare slots, the free pool)
    spec, bs, H, H_kv, D = CASES["G1-b4-D16"]
    cascade, _, want, _ = run_cascade(spec, bs, H, H_kv, D, torch.float32, width=7, nan_garbage=True, seed=4,
                                      device=device)
    assert torch.isfinite(cascade).all()
    assert_close(cascade, want, torch.float32, "triton cascade vs float64")


def test_the_backend_takes_the_cascade_only_with_prefix_groups(monkeypatch, device):
    assert TritonAttention.supports_prefix_groups
    calls = []
    real = tc.shared_prefix_decode_attention
    monkeypatch.setattr(tc, "shared_prefix_decode_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    spec, bs, H, H_kv, D = CASES["G2-b1-D16"]
    cascade, plain, _, _ = run_cascade(spec, bs, H, H_kv, D, torch.float32, device=device)
    assert calls == [1]  # the plain forward (no groups) did not take it
    assert_close(cascade, plain, torch.float32, "triton cascade vs plain triton decode")


def test_no_host_synchronisation(monkeypatch, device):
    # the launcher plans from host ints and tensor shapes only: reading a tensor's value back raises here (and on
    # CUDA, so does any synchronising call: torch's sync debug mode)
    spec, bs, H, H_kv, D = CASES["G2-b4-D64"]
    q, k, v, kc, vc, meta, _, _, tables = case_on(device, spec, bs, H, H_kv, D, torch.float32)
    write_kv(kc, vc, k, v, meta.slot_mapping)
    groups = _with_blocks(groups_by_hand(spec, device=device), tables)
    want = paged_decode_attention(q, kc, vc, meta.block_tables, meta.context_lens, meta.max_context_len, 0.125,
                                  split_size=16)

    def readback(*_args, **_kwargs):
        raise AssertionError("the cascade launcher read a tensor value back to the host")

    tc.shared_prefix_decode_attention(q, kc, vc, meta.block_tables, meta.context_lens, meta.max_context_len, 0.125,
                                      groups, split_size=16)  # compile first (Triton's own launch bookkeeping)
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, readback)
    if q.is_cuda:
        torch.cuda.set_sync_debug_mode("error")
    try:
        out = tc.shared_prefix_decode_attention(q, kc, vc, meta.block_tables, meta.context_lens,
                                                meta.max_context_len, 0.125, groups, split_size=16)
    finally:
        if q.is_cuda:
            torch.cuda.set_sync_debug_mode("default")
        monkeypatch.undo()
    assert_close(out, want, torch.float32, "triton cascade vs plain triton decode")


def test_prefix_tiles():
    assert tc.prefix_tiles(56, 128, torch.bfloat16, interpret=False) == (64, 64, 128, 8)  # Qwen2.5-7B, 8 samples
    assert tc.prefix_tiles(8, 64, torch.float16, interpret=False) == (16, 64, 64, 4)  # padded to the dot minimum
    assert tc.prefix_tiles(200, 256, torch.bfloat16, interpret=False) == (64, 32, 256, 8)  # several row blocks
    assert tc.prefix_tiles(56, 80, torch.float32, interpret=False) == (16, 16, 128, 4)  # float32: FMA dot tiles
    assert tc.prefix_tiles(35, 16, interpret=True) == (32, 16, 16, 4)


def test_bad_prefix_groups_are_refused():
    spec, bs, H, H_kv, D = CASES["G2-b1-D16"]
    q, _, _, kc, vc, meta, _, _, _, _, tables = grouped_case(spec, bs, H, H_kv, D, torch.float32)
    groups = _with_blocks(groups_by_hand(spec), tables)
    groups.seq_prefix_blocks = groups.seq_prefix_blocks[:-1]
    with pytest.raises(ValueError, match="seq_prefix_blocks"):
        tc.shared_prefix_decode_attention(q, kc, vc, meta.block_tables, meta.context_lens, meta.max_context_len,
                                          0.25, groups)
