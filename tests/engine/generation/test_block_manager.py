"""The block manager (ref counts, fork sharing, appends, no leaks) and the paged KV cache tensor (views, block copies,
sizing from a memory budget)."""

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from engine.generation.attention.base import write_kv
from engine.generation.attention.metadata import AttentionMetadata
from engine.generation.block_manager import BlockManager, OutOfBlocksError
from engine.generation.kv_cache import (
    DEFAULT_HOST_BUDGET,
    KVCache,
    bytes_per_block,
    default_budget,
    num_blocks_for_budget,
)


def snapshot(bm: BlockManager):
    """Everything observable about the manager's state."""
    return ({s: (bm.block_table(s), bm.num_tokens(s)) for s in bm.seq_ids},
            [bm.ref_count(b) for b in range(bm.num_blocks)], list(bm._free))


def check_invariants(bm: BlockManager) -> None:
    """Ref counts equal the number of tables holding each block; free list = exactly the blocks at 0; each table has
    ceil(len / bs) blocks; a block shared by two sequences is full, so a partial last block has ref count 1."""
    holders = [0] * bm.num_blocks
    for s in bm.seq_ids:
        table, n = bm.block_table(s), bm.num_tokens(s)
        assert len(table) == bm.blocks_needed(n), (s, table, n)
        assert len(set(table)) == len(table), f"sequence {s} holds a block twice: {table}"
        for i, b in enumerate(table):
            holders[b] += 1
            if (i + 1) * bm.block_size > n:  # the partial last block: the only one this sequence still writes
                assert bm.ref_count(b) == 1, f"sequence {s} writes into shared block {b}"
    assert [bm.ref_count(b) for b in range(bm.num_blocks)] == holders
    free = list(bm._free)
    assert len(set(free)) == len(free)
    assert sorted(free) == [b for b in range(bm.num_blocks) if holders[b] == 0]
    assert bm.num_free_blocks + bm.num_used_blocks == bm.num_blocks


# --- block manager: unit tests -----------------------------------------------------------------------------------


def test_blocks_needed_and_can_allocate():
    bm = BlockManager(num_blocks=4, block_size=16)
    assert [bm.blocks_needed(n) for n in (0, 1, 15, 16, 17, 64, 65)] == [0, 1, 1, 1, 2, 4, 5]
    assert bm.can_allocate(64) and not bm.can_allocate(65)
    with pytest.raises(ValueError, match="num_tokens must be >= 0"):
        bm.blocks_needed(-1)
    for bad in ((0, 16), (4, 0)):
        with pytest.raises(ValueError, match="must be >= 1"):
            BlockManager(*bad)


def test_allocate_free_accounting_and_deterministic_order():
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.allocate(7, 9) == [0, 1, 2]
    assert bm.allocate(3, 4) == [3]
    assert bm.allocate(5, 0) == []
    assert (bm.num_free_blocks, bm.num_used_blocks) == (4, 4)
    assert bm.num_tokens(7) == 9 and bm.seq_ids == [7, 3, 5] and 3 in bm
    check_invariants(bm)
    bm.free(7)  # freed blocks go to the back of the free list, in table order
    assert bm.allocate(1, 4 * 5) == [4, 5, 6, 7, 0]
    for s in (1, 3, 5):
        bm.free(s)
    assert bm.num_free_blocks == 8 and all(bm.ref_count(b) == 0 for b in range(8))
    assert 3 not in bm


def test_allocate_errors_leave_state_unchanged():
    bm = BlockManager(num_blocks=4, block_size=8)
    bm.allocate(0, 20)
    before = snapshot(bm)
    with pytest.raises(ValueError, match="sequence 0 is already allocated"):
        bm.allocate(0, 1)
    with pytest.raises(OutOfBlocksError, match="needs 2 free blocks, 1 free"):
        bm.allocate(1, 9)
    assert isinstance(OutOfBlocksError("x"), RuntimeError)
    assert snapshot(bm) == before


def test_unknown_ids_raise_clear_errors():
    bm = BlockManager(num_blocks=2, block_size=4)
    bm.allocate(0, 3)
    bm.free(0)
    for call in (lambda: bm.free(0), lambda: bm.block_table(9), lambda: bm.num_tokens(9),
                 lambda: bm.append_tokens(9), lambda: bm.fork(9, 1), lambda: bm.can_append([9]),
                 lambda: bm.slot(9, 0)):
        with pytest.raises(KeyError, match="unknown sequence id"):
            call()
    with pytest.raises(IndexError, match="block id 2 out of range"):
        bm.ref_count(2)


@pytest.mark.parametrize("length", [0, 1, 15, 16, 48, 53])
@pytest.mark.parametrize("G", [1, 4])
def test_fork_shares_full_blocks_and_copies_the_partial_one(length, G):
    bs = 16
    bm = BlockManager(num_blocks=64, block_size=bs)
    parent = bm.allocate(100, length)
    n_full, rem = divmod(length, bs)
    for g in range(G):
        pairs = bm.fork(100, g)
        child = bm.block_table(g)
        assert bm.num_tokens(g) == length
        assert child[:n_full] == parent[:n_full]
        if rem:
            assert len(child) == n_full + 1 and child[-1] not in parent
            assert pairs == [(parent[-1], child[-1])]
        else:
            assert child == parent[:n_full] and pairs == []
    check_invariants(bm)
    assert all(bm.ref_count(b) == G + 1 for b in parent[:n_full])
    if rem:
        assert bm.ref_count(parent[-1]) == 1
    assert bm.num_used_blocks == n_full + (G + 1) * (rem > 0)
    bm.free(100)  # the children keep the shared blocks alive
    assert all(bm.ref_count(b) == G for b in parent[:n_full])
    for g in range(G):
        bm.free(g)
    assert bm.num_free_blocks == 64


def test_fork_errors_leave_state_unchanged():
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.allocate(0, 6)  # one full block + one partial
    bm.allocate(1, 1)
    before = snapshot(bm)
    with pytest.raises(ValueError, match="sequence 1 is already allocated"):
        bm.fork(0, 1)
    bm.fork(0, 2)  # takes the last free block for its tail copy
    before = snapshot(bm)
    with pytest.raises(OutOfBlocksError, match="needs 1 free blocks, 0 free"):
        bm.fork(0, 3)
    assert snapshot(bm) == before
    bm.append_tokens(0, 2)  # fill the parent's tail: now a fork needs no free block
    assert bm.fork(0, 3) == [] and bm.ref_count(bm.block_table(0)[0]) == 3


def test_children_appending_never_write_shared_blocks():
    bs, L, G, new = 8, 21, 5, 30
    bm = BlockManager(num_blocks=64, block_size=bs)
    bm.allocate(-1, L)
    for g in range(G):
        bm.fork(-1, g)
    shared = set(bm.block_table(-1)[:L // bs])
    for _ in range(new):  # decode: every child writes the token at its current length
        assert bm.can_append(list(range(G)))
        for g in range(G):
            pos = bm.num_tokens(g)
            bm.append_tokens(g)
            written = bm.block_table(g)[pos // bs]
            assert bm.ref_count(written) == 1 and written not in shared
            assert bm.slot(g, pos) // bs == written
    check_invariants(bm)
    assert all(bm.ref_count(b) == G + 1 for b in shared)


def test_append_tokens_allocates_at_block_boundaries_and_oob_leaves_state_unchanged():
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.allocate(0, 3)
    bm.append_tokens(0)  # fills block 0
    assert bm.block_table(0) == [0]
    bm.append_tokens(0)  # position 4 -> new block
    assert bm.block_table(0) == [0, 1] and bm.num_tokens(0) == 5
    bm.append_tokens(0, 0)
    bm.append_tokens(0, 7)  # 12 tokens, 3 blocks
    assert bm.block_table(0) == [0, 1, 2]
    bm.allocate(1, 4)
    assert bm.num_free_blocks == 0
    assert not bm.can_append([0]) and not bm.can_append([1]) and bm.can_append([0, 1], n=0)
    before = snapshot(bm)
    with pytest.raises(OutOfBlocksError, match="needs 1 free blocks, 0 free"):
        bm.append_tokens(0)
    with pytest.raises(ValueError, match="n must be >= 0"):
        bm.append_tokens(0, -1)
    assert snapshot(bm) == before
    bm.free(1)
    assert bm.can_append([0]) and not bm.can_append([0], n=5)
    bm.append_tokens(0, 4)
    assert bm.num_tokens(0) == 16 and bm.num_free_blocks == 0


def test_can_append_counts_all_sequences_together():
    bm = BlockManager(num_blocks=5, block_size=4)
    bm.allocate(0, 4)  # full: the next token needs a block
    bm.allocate(1, 4)
    bm.allocate(2, 3)  # partial: the next token does not
    assert bm.num_free_blocks == 2
    assert bm.can_append([0, 1, 2]) and bm.can_append([0, 2], n=1)
    bm.allocate(3, 1)
    assert not bm.can_append([0, 1]) and bm.can_append([0, 2, 3])


def test_slot_matches_metadata_slot_mapping():
    bs = 4
    bm = BlockManager(num_blocks=7, block_size=bs)
    bm.allocate(0, 3)
    bm.allocate(1, 10)
    bm.free(0)  # so that sequence 2's blocks are not contiguous
    bm.allocate(2, 13)
    table = bm.block_table(2)
    assert table == [4, 5, 6, 0]
    assert [bm.slot(2, p) for p in (0, 3, 4, 12)] == [16, 19, 20, 0]
    meta = AttentionMetadata.build([table], [13], [13], bs, torch.device("cpu"))
    assert meta.slot_mapping.tolist() == [bm.slot(2, p) for p in range(13)]
    for bad in (-1, 13):
        with pytest.raises(IndexError, match="out of range for sequence 2 of 13 tokens"):
            bm.slot(2, bad)


# --- block manager: randomised state machine ---------------------------------------------------------------------


class BlockManagerMachine(RuleBasedStateMachine):
    """Random allocate/fork/append/free against a model: each sequence's token values, written through ``slot()`` into
    a flat list standing for the cache (fork copies the returned pairs). A sequence reading back its slots must see
    its own tokens, so no sequence ever overwrites another's; at the end every block is free."""

    def __init__(self):
        super().__init__()
        self.bm = BlockManager(num_blocks=12, block_size=3)
        self.cache = [None] * (12 * 3)
        self.tokens: dict[int, list[int]] = {}
        self.next_id = 0
        self.next_token = 0

    def _write(self, s: int, count: int) -> None:
        for _ in range(count):
            pos = len(self.tokens[s])
            self.tokens[s].append(self.next_token)
            self.cache[self.bm.slot(s, pos)] = self.next_token
            self.next_token += 1

    @rule(n=st.integers(0, 14))
    def allocate(self, n):
        s, self.next_id = self.next_id, self.next_id + 1
        if not self.bm.can_allocate(n):
            before = snapshot(self.bm)
            with pytest.raises(OutOfBlocksError):
                self.bm.allocate(s, n)
            assert snapshot(self.bm) == before
            return
        self.bm.allocate(s, n)
        self.tokens[s] = []
        self._write(s, n)  # the manager reserved n slots; the prefill fills them

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(sorted(self.tokens)))
        child, self.next_id = self.next_id, self.next_id + 1
        before = snapshot(self.bm)
        try:
            pairs = self.bm.fork(parent, child)
        except OutOfBlocksError:
            assert len(self.tokens[parent]) % self.bm.block_size and self.bm.num_free_blocks == 0
            assert snapshot(self.bm) == before
            return
        assert len(pairs) == int(len(self.tokens[parent]) % self.bm.block_size > 0)
        bs = self.bm.block_size
        for src, dst in pairs:
            self.cache[dst * bs:(dst + 1) * bs] = self.cache[src * bs:(src + 1) * bs]
        self.tokens[child] = list(self.tokens[parent])

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), n=st.integers(0, 5))
    def append(self, data, n):
        s = data.draw(st.sampled_from(sorted(self.tokens)))
        ok = self.bm.can_append([s], n)
        before = snapshot(self.bm)
        try:
            self.bm.append_tokens(s, n)
        except OutOfBlocksError:
            assert not ok and snapshot(self.bm) == before
            return
        assert ok
        start = len(self.tokens[s])
        self._write(s, n)
        table = self.bm.block_table(s)
        for pos in range(start, start + n):  # every block written has ref count 1
            assert self.bm.ref_count(table[pos // self.bm.block_size]) == 1

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        s = data.draw(st.sampled_from(sorted(self.tokens)))
        self.bm.free(s)
        del self.tokens[s]

    @invariant()
    def consistent(self):
        check_invariants(self.bm)
        for s, toks in self.tokens.items():
            assert self.bm.num_tokens(s) == len(toks)
            assert [self.cache[self.bm.slot(s, p)] for p in range(len(toks))] == toks, f"sequence {s} corrupted"

    def teardown(self):
        for s in list(self.tokens):
            self.bm.free(s)
        assert self.bm.num_free_blocks == self.bm.num_blocks and self.bm.num_used_blocks == 0
        assert all(self.bm.ref_count(b) == 0 for b in range(self.bm.num_blocks))


BlockManagerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                                                 suppress_health_check=[HealthCheck.too_slow])
test_block_manager_state_machine = BlockManagerMachine.TestCase


# --- KV cache ------------------------------------------------------------------------------------------------------


def test_kv_cache_shape_and_views_alias_the_big_tensor():
    c = KVCache(num_layers=3, num_blocks=5, block_size=4, num_kv_heads=2, head_dim=8, dtype=torch.float16)
    assert c.data.shape == (3, 2, 5, 4, 2, 8) and c.dtype == torch.float16 and c.device.type == "cpu"
    assert c.nbytes == 5 * bytes_per_block(3, 4, 2, 8, torch.float16)
    assert torch.count_nonzero(c.data) == 0
    layers = c.as_list()
    assert len(layers) == 3
    for i, (k, v) in enumerate(layers):
        assert k.shape == v.shape == (5, 4, 2, 8)
        assert k.data_ptr() == c.layer(i)[0].data_ptr()
        k[2, 1, 0, 3] = i + 1
        v[4, 3, 1, 7] = -(i + 1)
        assert c.data[i, 0, 2, 1, 0, 3] == i + 1 and c.data[i, 1, 4, 3, 1, 7] == -(i + 1)
    # the attention backends write through the views
    k_cache, v_cache = c.layer(1)
    write_kv(k_cache, v_cache, torch.full((1, 2, 8), 7.0), torch.full((1, 2, 8), 9.0), torch.tensor([3 * 4 + 2]))
    assert (c.data[1, 0, 3, 2] == 7).all() and (c.data[1, 1, 3, 2] == 9).all()
    for bad in ("num_layers", "num_blocks", "block_size", "num_kv_heads", "head_dim"):
        args = {"num_layers": 1, "num_blocks": 1, "block_size": 1, "num_kv_heads": 1, "head_dim": 1}
        args[bad] = 0
        with pytest.raises(ValueError, match=f"{bad} must be >= 1"):
            KVCache(**args)


def test_copy_blocks_copies_k_and_v_of_every_layer():
    c = KVCache(num_layers=4, num_blocks=6, block_size=3, num_kv_heads=2, head_dim=5)
    c.data.copy_(torch.randn(c.data.shape))
    orig = c.data.clone()
    c.copy_blocks([])
    assert torch.equal(c.data, orig)
    c.copy_blocks([(1, 4), (2, 1)])  # sources are read before any destination is written
    expected = orig.clone()
    expected[:, :, 4] = orig[:, :, 1]
    expected[:, :, 1] = orig[:, :, 2]
    assert torch.equal(c.data, expected)
    for i in range(4):
        k, v = c.layer(i)
        assert torch.equal(k[4], orig[i, 0, 1]) and torch.equal(v[4], orig[i, 1, 1])
    with pytest.raises(IndexError, match="block id 6 out of range"):
        c.copy_blocks([(6, 0)])
    with pytest.raises(ValueError, match="destinations must be distinct"):
        c.copy_blocks([(0, 3), (1, 3)])


def test_fork_then_copy_blocks_gives_the_child_the_parents_kv():
    bs, L, H_kv, D = 4, 10, 2, 3
    bm = BlockManager(num_blocks=8, block_size=bs)
    c = KVCache(2, 8, bs, H_kv, D)
    bm.allocate(0, L)
    slots = torch.tensor([bm.slot(0, p) for p in range(L)])
    kv = torch.randn(2, 2, L, H_kv, D)
    for i, (k_cache, v_cache) in enumerate(c.as_list()):
        write_kv(k_cache, v_cache, kv[i, 0], kv[i, 1], slots)
    c.copy_blocks(bm.fork(0, 1))
    child_slots = torch.tensor([bm.slot(1, p) for p in range(L)])
    assert not torch.equal(child_slots, slots)  # the tail lives in another block
    for i, (k_cache, v_cache) in enumerate(c.as_list()):
        assert torch.equal(k_cache.view(-1, H_kv, D)[child_slots], kv[i, 0])
        assert torch.equal(v_cache.view(-1, H_kv, D)[child_slots], kv[i, 1])


def test_bytes_per_block_for_known_models():
    # Llama-3-8B: 32 layers, 8 kv heads of 128, bf16, 16-token blocks -> 2 MiB a block (128 KiB a token)
    assert bytes_per_block(32, 16, 8, 128, torch.bfloat16) == 2 * 2**20
    # Qwen2.5-0.5B: 24 layers, 2 kv heads of 64, bf16, 256-token blocks (flash-attn's paged size)
    assert bytes_per_block(24, 256, 2, 64, torch.bfloat16) == 2 * 24 * 256 * 2 * 64 * 2 == 3 * 2**20
    assert bytes_per_block(1, 1, 1, 1, torch.float32) == 8


def test_num_blocks_for_budget():
    per = bytes_per_block(2, 16, 4, 32, torch.float16)  # 16 KiB
    assert per == 16 * 2**10
    assert num_blocks_for_budget(10 * per, 2, 16, 4, 32, torch.float16) == 10
    assert num_blocks_for_budget(10 * per + per - 1, 2, 16, 4, 32, torch.float16) == 10
    assert num_blocks_for_budget(10 * per, 2, 16, 4, 32, torch.float16, min_blocks=10, max_blocks=3) == 3
    with pytest.raises(ValueError, match=r"holds 9 blocks, need at least 10 \(163840 bytes at 16384 bytes per"):
        num_blocks_for_budget(10 * per - 1, 2, 16, 4, 32, torch.float16, min_blocks=10)
    with pytest.raises(ValueError, match="holds 0 blocks, need at least 1"):
        num_blocks_for_budget(per - 1, 2, 16, 4, 32, torch.float16)
    c = KVCache.from_budget(10 * per, 2, 16, 4, 32, torch.float16, max_blocks=7)
    assert c.num_blocks == 7 and c.nbytes == 7 * per


def test_default_budget(monkeypatch):
    assert default_budget("cpu") == DEFAULT_HOST_BUDGET == 256 * 2**20
    assert default_budget(torch.device("cpu"), fraction=0.9) == DEFAULT_HOST_BUDGET
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="fraction must be in"):
            default_budget("cpu", bad)
    calls = []

    def fake_mem_get_info(device):
        calls.append(device)
        return 10 * 2**30, 80 * 2**30

    monkeypatch.setattr(torch.cuda, "mem_get_info", fake_mem_get_info)
    assert default_budget("cuda") == int(0.3 * 10 * 2**30)
    assert default_budget("cuda:0", fraction=0.5) == 5 * 2**30
    assert calls == [torch.device("cuda"), torch.device("cuda:0")]
