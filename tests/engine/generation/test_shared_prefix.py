"""Shared-prefix (cascade) decode attention of the torch backend: the samples of a prompt read its shared KV blocks
once per group, their own suffix separately, merged by log-sum-exp. It must equal the plain paged decode and a dense
float64 reference, whatever the group sizes, prefix lengths and GQA; grouping must only ever join rows whose tables
really share the blocks; and the generator must produce the same samples with it on and off."""

from __future__ import annotations

import pytest
import torch

from engine.generation import Generator, SamplingParams
from engine.generation.attention import AttentionMetadata, TorchAttention
from engine.generation.attention.metadata import PrefixGroups
from engine.models import tiny_model
from tests._numerics import assert_close


def grouped_case(groups, block_size, H, H_kv, D, dtype, seed=0):
    """``groups``: per prompt ``(shared_blocks, [suffix length of each sample])``. Returns the decode step's
    ``(q, k_new, v_new, k_cache, v_cache, meta, keys, values, request_ids, shared)`` with each sample's table =
    its prompt's shared blocks + blocks of its own, in a shuffled pool whose other slots hold large garbage."""
    g = torch.Generator().manual_seed(seed)
    need = sum(n + sum(-(-s // block_size) for s in suffixes) for n, suffixes in groups) + 2
    pool = torch.randperm(need, generator=g).tolist()
    shape = (need, block_size, H_kv, D)
    k_cache = (torch.randn(shape, generator=g, dtype=torch.float64) * 100).to(dtype)
    v_cache = (torch.randn(shape, generator=g, dtype=torch.float64) * 100).to(dtype)
    tables, ctx_lens, keys, values, request_ids, shared = [], [], [], [], [], []
    for r, (n, suffixes) in enumerate(groups):
        head = [pool.pop() for _ in range(n)]
        pk = torch.randn(n * block_size, H_kv, D, generator=g, dtype=torch.float64).to(dtype)
        pv = torch.randn(n * block_size, H_kv, D, generator=g, dtype=torch.float64).to(dtype)
        for j in range(n * block_size):
            k_cache[head[j // block_size], j % block_size] = pk[j]
            v_cache[head[j // block_size], j % block_size] = pv[j]
        for s in suffixes:
            own = [pool.pop() for _ in range(-(-s // block_size))]
            sk = torch.randn(s, H_kv, D, generator=g, dtype=torch.float64).to(dtype)
            sv = torch.randn(s, H_kv, D, generator=g, dtype=torch.float64).to(dtype)
            for j in range(s - 1):  # the last suffix token is this step's new token: the backend writes it
                k_cache[own[j // block_size], j % block_size] = sk[j]
                v_cache[own[j // block_size], j % block_size] = sv[j]
            tables.append(head + own)
            ctx_lens.append(n * block_size + s)
            keys.append(torch.cat([pk, sk]))
            values.append(torch.cat([pv, sv]))
            request_ids.append(r)
            shared.append(n)
    S = len(tables)
    q = torch.randn(S, H, D, generator=g, dtype=torch.float64).to(dtype)
    k_new = torch.stack([k[-1] for k in keys])
    v_new = torch.stack([v[-1] for v in values])
    meta = AttentionMetadata.build(tables, ctx_lens, [1] * S, block_size, torch.device("cpu"))
    return q, k_new, v_new, k_cache, v_cache, meta, keys, values, request_ids, shared, tables


def dense_decode(q, keys, values, scale):
    out = []
    for qs, K, V in zip(q.double(), keys, values):
        r = qs.shape[0] // K.shape[1]
        K, V = K.double().repeat_interleave(r, dim=1), V.double().repeat_interleave(r, dim=1)
        p = (torch.einsum("hd,thd->ht", qs, K) * scale).softmax(-1)
        out.append(torch.einsum("ht,thd->hd", p, V))
    return torch.stack(out)


CASES = {
    "groups of 4, 1, 3": [(2, [1, 5, 9, 4]), (2, [3]), (1, [2, 7, 1])],
    "one token each": [(3, [1, 1, 1, 1, 1])],
    "uneven prefixes": [(1, [6, 2]), (4, [1, 8]), (2, [5, 5, 5])],
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("heads", [(4, 2), (2, 2), (6, 1)], ids=["gqa", "mha", "mqa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cascade_equals_plain_paged_decode_and_the_reference(case, heads, dtype):
    H, H_kv = heads
    D, bs = 16, 4
    q, k, v, kc, vc, meta, keys, values, rids, shared, tables = grouped_case(CASES[case], bs, H, H_kv, D, dtype)
    scale = D ** -0.5
    plain = TorchAttention().forward(q, k, v, kc.clone(), vc.clone(), meta, scale)
    meta.prefix_groups = PrefixGroups.build(rids, tables, shared, torch.device("cpu"), min_saving=0.0)
    assert meta.prefix_groups is not None
    cascade = TorchAttention().forward(q, k, v, kc, vc, meta, scale)
    assert cascade.dtype == dtype and cascade.shape == q.shape
    want = dense_decode(q, keys, values, scale)
    if dtype == torch.float32:
        assert_close(cascade, want, dtype, "cascade vs float64")
        assert_close(cascade, plain.double(), dtype, "cascade vs plain paged decode")
    else:  # STYLE.md 3 (flash-attention's rule): at most twice plain PyTorch's error in the same dtype, plus an atol
        err_cascade = (cascade.double() - want).abs().max().item()
        err_plain = (plain.double() - want).abs().max().item()
        assert err_cascade <= 2 * err_plain + 1e-3, (err_cascade, err_plain)


def test_grouping_joins_only_rows_that_share_the_blocks():
    tables = [[5, 6, 9], [5, 6, 10], [5, 7, 11], [8, 12], [1, 2, 3]]
    groups = PrefixGroups.build([0, 0, 0, 1, 2], tables, [2, 2, 2, 1, 2], torch.device("cpu"), min_saving=0.0)
    # row 2 holds block 7 where its siblings hold 6 (re-prefilled after preemption): it reads its own context
    assert groups.rows.tolist() == [[0, 1]] and groups.valid.tolist() == [[True, True]]
    assert groups.blocks.tolist() == [[5, 6]] and groups.num_blocks.tolist() == [2]
    assert groups.seq_prefix_blocks.tolist() == [2, 2, 0, 0, 0]
    assert PrefixGroups.build([0, 1], [[1, 2], [1, 3]], [1, 1], torch.device("cpu"), min_saving=0.0) is None
    # 2 of 8 block reads saved: below the default threshold, no cascade
    assert PrefixGroups.build([0, 0], [[1, 2, 3, 4], [1, 5, 6, 7]], [1, 1], torch.device("cpu")) is None


@pytest.mark.usefixtures("one_thread")
def test_the_generator_samples_the_same_with_and_without_the_shared_prefix(monkeypatch):
    calls = []
    real = TorchAttention._attend_prefixes

    def spy(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(TorchAttention, "_attend_prefixes", spy)
    model = tiny_model("qwen2", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                       intermediate_size=64)
    prompts = torch.randint(3, 64, (3, 40), generator=torch.Generator().manual_seed(0)).tolist()
    outs = {}
    for shared in (True, False):
        gen = Generator(model, block_size=8, attention_backend="torch", shared_prefix=shared)
        params = SamplingParams(n=4, temperature=1.0, max_tokens=6, seed=3)
        outs[shared] = gen.generate(prompts, params)
    assert calls  # the cascade ran (40-token prompts, 6 new tokens: most block reads are the shared prompt's)
    for a, b in zip(outs[True], outs[False]):
        for ca, cb in zip(a.outputs, b.outputs):
            assert ca.token_ids == cb.token_ids
            assert ca.logprobs == pytest.approx(cb.logprobs, abs=1e-5)
