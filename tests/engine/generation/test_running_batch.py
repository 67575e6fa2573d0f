"""The persistent decode rows (``RunningBatch``) against the per-step rebuild they replace: the decode metadata equals
``AttentionMetadata.build`` from the block manager's tables step after step while sequences start, finish, get
preempted and aborted; stop checks are those of v1; ``BlockManager.append_one_each`` equals one ``append_tokens`` per
sequence; and a request samples the same tokens alone as in a crowded, preempting, aborting batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.generation import Generator, SamplingParams
from engine.generation.attention import AttentionMetadata
from engine.generation.block_manager import BlockManager, OutOfBlocksError
from engine.generation.kv_cache import bytes_per_block
from engine.generation.running_batch import RunningBatch
from engine.generation.scheduler import Scheduler
from engine.generation.sequence import Sequence
from engine.models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_append_one_each_equals_append_tokens_and_is_all_or_nothing():
    a, b = BlockManager(12, 4), BlockManager(12, 4)
    for bm in (a, b):
        for sid, n in ((0, 4), (1, 6), (2, 8), (3, 1)):
            bm.allocate(sid, n)
    grown = a.append_one_each([0, 1, 2, 3])
    for sid in (0, 1, 2, 3):
        b.append_tokens(sid, 1)
    assert [(i, blk) for i, blk in grown] == [(0, a.block_table(0)[-1]), (2, a.block_table(2)[-1])]
    assert all(a.block_table(s) == b.block_table(s) and a.num_tokens(s) == b.num_tokens(s) for s in range(4))
    short = BlockManager(3, 4)
    short.allocate(0, 4)
    short.allocate(1, 4)
    short.allocate(2, 3)
    with pytest.raises(OutOfBlocksError):
        short.append_one_each([0, 1, 2])  # two full blocks want a new one; none is free
    assert [short.num_tokens(s) for s in range(3)] == [4, 4, 3]


def make_seq(sid, prompt_len, *, max_tokens=5, ignore_eos=False, stop=None, rid=0):
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos, stop_token_ids=stop)
    seq = Sequence(sid, rid, 0, list(range(1, prompt_len + 1)), prompt_len, seed=sid, params=params)
    seq.token_ids.append(7)  # its first sampled token
    return seq


def test_decode_metadata_equals_the_per_step_rebuild_as_rows_come_and_go():
    bm, bs = BlockManager(64, 4), 4
    batch = RunningBatch(8, 16, bs, max_model_len=60, eos_token_ids={0})
    seqs = {}
    rng = np.random.default_rng(0)

    def start(sid, prompt_len):
        seq = make_seq(sid, prompt_len, max_tokens=100)
        bm.allocate(sid, prompt_len)
        batch.add(seq, bm.block_table(sid))
        seqs[sid] = seq

    for sid, L in enumerate((3, 4, 9, 1, 12)):
        start(sid, L)
    for step in range(14):
        if step in (3, 8):  # a sequence leaves from the middle (finish / preempt) and a new one starts
            gone = batch.seqs[1]
            batch.remove(gone)
            bm.free(gone.seq_id)
            start(100 + step, 5 + step % 3)
        batch.add_blocks(bm.append_one_each(batch.seq_ids))
        ids, pos, meta = batch.decode_inputs(torch.device("cpu"))
        want = AttentionMetadata.build([bm.block_table(s.seq_id) for s in batch.seqs], [len(s) for s in batch.seqs],
                                       [1] * batch.size, bs, torch.device("cpu"))
        assert torch.equal(meta.slot_mapping, want.slot_mapping)
        assert torch.equal(meta.block_tables, want.block_tables)
        assert torch.equal(meta.context_lens, want.context_lens) and meta.context_lens_list == want.context_lens_list
        assert ids.tolist() == [s.token_ids[-1] for s in batch.seqs]
        assert pos.tolist() == [len(s) - 1 for s in batch.seqs]
        tokens = rng.integers(1, 50, batch.size)  # never EOS (0)
        assert batch.advance(tokens, np.zeros(batch.size)) == []


def test_stop_checks_are_v1s():
    batch = RunningBatch(8, 8, 4, max_model_len=12, eos_token_ids={0, 9})
    eos = make_seq(0, 3)
    ignore = make_seq(1, 3, ignore_eos=True)
    own = make_seq(2, 3, stop=[42])
    short = make_seq(3, 3, max_tokens=2)  # one token generated already: the next is its last
    long_ = make_seq(4, 10, max_tokens=50)  # 11 tokens: the next reaches max_model_len
    for s in (eos, ignore, own, short, long_):
        batch.add(s, [0, 1, 2])
    done = batch.advance(np.array([9, 0, 42, 5, 5]), np.array([-0.5, -1.0, -1.5, -2.0, -2.5]))
    assert {(s.seq_id, r) for s, r in done} == {(0, "stop"), (2, "stop"), (3, "length"), (4, "length")}
    assert ignore.token_ids[-1] == 0 and ignore.logprobs == [-1.0] and batch.size == 5


def crowded_run(model, prompts, params, *, enforce_eager=None, blocks=14):
    """``prompts`` with ``params`` in a crowded generator: up to 6 sequences at once over a pool of ``blocks`` KV
    blocks of 4 tokens (one of them the static path's scratch block when ``enforce_eager=False``), so requests wait,
    finish mid-batch and get preempted, and an extra request is aborted after 5 steps. Returns ``(generator, outputs
    in the order of prompts)``; checks that every block came back."""
    per_block = bytes_per_block(2, 4, 2, 8, torch.float32)  # 2 layers, block 4, 2 K/V heads of 8
    gen = Generator(model, block_size=4, attention_backend="torch", max_num_seqs=6, max_model_len=40,
                    kv_cache_memory=blocks * per_block, enforce_eager=enforce_eager)
    extra = gen.add_request(prompts[0], SamplingParams(n=2, max_tokens=30, seed=99))
    ids = [gen.add_request(p, sp) for p, sp in zip(prompts, params)]
    results, steps = {}, 0
    while gen.has_unfinished_requests():
        for out in gen.step():
            results[out.request_id] = out
        steps += 1
        if steps == 5:
            gen.abort_request(extra)
    assert gen.block_manager.num_free_blocks == gen.block_manager.num_blocks
    return gen, [results[rid] for rid in ids]


def assert_same_samples(got, want):
    for g_out, w_out in zip(got, want):
        for a, b in zip(sorted(g_out.outputs, key=lambda c: c.index), sorted(w_out.outputs, key=lambda c: c.index)):
            assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


def small_qwen2():
    return tiny_model("qwen2", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=64)


def test_a_request_samples_the_same_alone_and_in_a_crowded_batch(monkeypatch):
    model = small_qwen2()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 64, (n,), generator=g).tolist() for n in (5, 13, 8, 21, 3, 9)]
    params = [SamplingParams(n=n, temperature=1.0, max_tokens=m, seed=10 + i, stop_token_ids=stop)
              for i, (n, m, stop) in enumerate([(3, 12, None), (2, 4, None), (4, 15, [5]), (1, 9, None),
                                                (2, 15, None), (3, 6, None)])]
    alone = [Generator(model, block_size=4, attention_backend="torch").generate([p], [sp])[0]
             for p, sp in zip(prompts, params)]
    preempted = []
    real = Scheduler._preempt
    monkeypatch.setattr(Scheduler, "_preempt", lambda self, seq: (preempted.append(seq.seq_id), real(self, seq)))
    crowded, outputs = crowded_run(model, prompts, params)
    assert crowded.block_manager.num_blocks == 14
    assert preempted  # the pool ran dry at least once
    assert_same_samples(outputs, alone)


# ------------------------------------------------------------------------------------------------ static buffers
def test_bucket_sizes():
    from engine.generation.graph_decoder import bucket_sizes

    assert bucket_sizes(1) == [1]
    assert bucket_sizes(6) == [1, 2, 4, 6]
    assert bucket_sizes(16) == [1, 2, 4, 8, 16]
    assert bucket_sizes(20) == [1, 2, 4, 8, 16, 32]
    assert bucket_sizes(256) == [1, 2, 4, 8, 16] + list(range(32, 257, 16))
    with pytest.raises(ValueError, match="max_num_seqs"):
        bucket_sizes(0)


def test_the_static_padded_buffers_sample_what_the_eager_rows_sample():
    """enforce_eager=False on the CPU runs the CUDA-graph path's static buffers eagerly: batches padded to bucket
    sizes (1, 2, 4, 6 here) whose padded rows write to a reserved scratch block; every sample and log-prob equals the
    eager rows path's, through finishing rows, preemption and an abort."""
    model = small_qwen2()
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 64, (n,), generator=g).tolist() for n in (5, 13, 8, 21, 3, 9)]
    params = [SamplingParams(n=n, temperature=t, max_tokens=m, seed=20 + i)
              for i, (n, t, m) in enumerate([(3, 1.0, 12), (2, 0.0, 4), (4, 1.0, 15), (1, 0.7, 9), (2, 1.0, 15),
                                             (3, 1.0, 6)])]
    eager_gen, eager = crowded_run(model, prompts, params, enforce_eager=True)
    static_gen, static = crowded_run(model, prompts, params, enforce_eager=False)
    assert static_gen._static is not None and eager_gen._static is None
    assert static_gen.block_manager.num_blocks == static_gen.kv_cache.num_blocks - 1  # the scratch block
    assert_same_samples(static, eager)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")


@needs_cuda
def test_cuda_graph_replay_equals_eager_and_never_syncs_with_the_host():
    model = tiny_model("qwen2", vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       intermediate_size=128, dtype=torch.bfloat16).cuda()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (7, 30, 17)]
    params = SamplingParams(n=4, temperature=1.0, max_tokens=24, seed=5, ignore_eos=True)
    graphs = Generator(model, block_size=16)  # enforce_eager=None: graphs on CUDA
    eager = Generator(model, block_size=16, enforce_eager=True)
    got, want = graphs.generate(prompts, params), eager.generate(prompts, params)
    assert graphs.use_cuda_graphs and graphs._static.num_graphs >= 1
    pairs = [(a, b) for o1, o2 in zip(got, want) for a, b in zip(o1.outputs, o2.outputs)]
    # the same kernels on the same bf16 weights; only the decode kernel's split plan differs (a graph plans for
    # max_model_len), which can move a float32 sum by an ulp: nearly every sample must be identical
    assert sum(a.token_ids == b.token_ids for a, b in pairs) >= 10, [(a.token_ids, b.token_ids) for a, b in pairs]
    for a, b in pairs:
        n = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), len(a.token_ids))
        assert a.logprobs[:n] == pytest.approx(b.logprobs[:n], abs=2e-2)
    # a replay with live rows, under the sync debugger: no host synchronisation inside the step
    graphs.add_request(prompts[0], SamplingParams(n=3, max_tokens=8, seed=1, ignore_eos=True))
    graphs.step()  # prefill
    graphs.step()  # one decode (its bucket is captured)
    rows = graphs.scheduler.batch
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        graphs._static.step(rows)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_a_prefill_that_raises_after_forking_leaks_no_block(monkeypatch):
    """The prompt is prefilled and its samples forked, then the draw raises: generate() aborts the request, and the
    blocks of the prefilled and forked samples (not running yet) come back."""
    gen = Generator(small_qwen2(), block_size=4, attention_backend="torch")

    def broken(*args, **kwargs):
        raise RuntimeError("the draw failed")

    monkeypatch.setattr(gen, "_sample_and_append", broken)
    with pytest.raises(RuntimeError, match="the draw failed"):
        gen.generate([list(range(3, 14))], SamplingParams(n=3, max_tokens=4))
    assert gen.block_manager.num_free_blocks == gen.block_manager.num_blocks


def test_what_a_graph_replays_through_the_triton_backend_samples_what_eager_steps_sample(monkeypatch):
    """The static buffers through the Triton decode kernel (interpreted on the CPU) with the kernels planned for
    max_model_len, as a captured graph is, and the fused layer kernels forced to Triton: the same samples as eager
    steps on the running rows."""
    from kernels._backend import HAS_TRITON, interpreting

    if not (HAS_TRITON and (torch.cuda.is_available() or interpreting())):
        pytest.skip("needs triton with CUDA or TRITON_INTERPRET=1")
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "triton")
    model = small_qwen2()
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [3, 4, 5], [20, 21, 22, 23, 24]]
    params = SamplingParams(n=2, temperature=1.0, max_tokens=6, seed=8)
    outs = {}
    for eager in (True, False):
        gen = Generator(model, block_size=4, attention_backend="triton", max_model_len=64, enforce_eager=eager)
        if not eager:
            gen._ensure_cache()
            gen._static.plan_for_max_len = True
        outs[eager] = gen.generate(prompts, params)
    assert_same_samples(outs[False], outs[True])


def test_the_device_rows_updated_by_changes_equal_the_host_rows(monkeypatch):
    """After every static step of the crowded scenario (rows added, finished, moved, preempted, grown), the device
    block tables and sampling settings updated row by row equal the host rows, and the padded rows of the bucket
    point at the scratch block."""
    from engine.generation.graph_decoder import StaticDecoder

    checked = []
    real = StaticDecoder.step

    def checking_step(self, rows):
        out = real(self, rows)
        S, B = rows.size, self.bucket_for(rows.size)
        width = self._rows["block_tables"].shape[1]
        assert torch.equal(self._rows["block_tables"][:S], torch.from_numpy(rows.block_tables[:S, :width]))
        assert torch.equal(self._rows["seeds"][:S], torch.from_numpy(rows.seeds[:S]))
        assert torch.equal(self._rows["temperature"][:S], torch.from_numpy(rows.temperature[:S]))
        assert (self._rows["block_tables"][S:B, 0] == self.scratch_block).all()
        checked.append(S)
        return out

    monkeypatch.setattr(StaticDecoder, "step", checking_step)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 64, (n,), generator=g).tolist() for n in (5, 13, 8, 21, 3, 9)]
    params = [SamplingParams(n=n, temperature=t, max_tokens=m, seed=30 + i)
              for i, (n, t, m) in enumerate([(3, 1.0, 12), (2, 0.5, 4), (4, 1.0, 15), (1, 0.7, 9), (2, 1.0, 15),
                                             (3, 1.0, 6)])]
    crowded_run(small_qwen2(), prompts, params, enforce_eager=False)
    assert len(set(checked)) >= 3  # the batch size moved through several buckets
