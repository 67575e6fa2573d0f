"""Attention backends of the generator against a dense float64 reference written here.

Every case builds the logical K/V of each sequence, scatters its cached prefix into a paged cache through a shuffled
(non-contiguous) block table whose unused slots hold garbage, and hands the step's new tokens to the backend, which
writes them and attends. The reference attends each new token at position ``L - Q + i`` to positions ``0 .. L - Q + i``
of its own sequence, in float64, with GQA by repeating kv heads. The Triton decode kernel runs in the CPU interpreter
here (``TRITON_INTERPRET=1``, tests/conftest.py) and on the GPU where there is one; shapes are tiny for the interpreter.

Low-precision tolerances follow flash-attention's rule (STYLE.md 3): a kernel's max error against the float64
reference is at most twice plain PyTorch's (the torch backend on the same rounded inputs, in the same dtype) plus a
small atol.
"""

from __future__ import annotations

import pytest
import torch

from engine.generation.attention import (
    AttentionMetadata,
    FlashAttnBackend,
    TorchAttention,
    TritonAttention,
    get_attention_backend,
    paged_decode_attention,
)
from engine.generation.attention import flash_attn_backend as fab
from engine.generation.attention.base import write_kv
from engine.generation.attention.triton_backend import decode_tiles
from kernels._backend import HAS_TRITON, interpreting
from tests._numerics import assert_close

needs_triton = pytest.mark.skipif(not HAS_TRITON or not (torch.cuda.is_available() or interpreting()),
                                  reason="needs triton with CUDA or TRITON_INTERPRET=1")

RAGGED = [1, 7, 33]  # context lengths of one decode batch: one token, within a block, many blocks


# ------------------------------------------------------------------------------------------------------------ helpers
def make_case(ctx_lens, q_lens, H, H_kv, D, block_size, dtype, device, *, seed=0, cache_dtype=None, fill=None):
    """Random q/k/v and a paged cache holding each sequence's first ``ctx - q`` tokens.

    Returns ``(q [N, H, D], k_new, v_new [N, H_kv, D], k_cache, v_cache, meta, keys, values)`` where ``keys[s],
    values[s]`` are the sequence's full logical ``[ctx, H_kv, D]`` K/V (in the cache dtype)."""
    cache_dtype = cache_dtype or dtype
    g = torch.Generator().manual_seed(seed)
    n_blocks = [-(-c // block_size) for c in ctx_lens]
    total = sum(n_blocks) + 3  # spare blocks: garbage that no sequence owns
    perm = torch.randperm(total, generator=g).tolist()
    tables, i = [], 0
    for n in n_blocks:
        tables.append(perm[i:i + n])
        i += n
    shape = (total, block_size, H_kv, D)
    if fill is None:  # finite garbage, large enough to wreck any output that reads it
        k_cache = (torch.randn(shape, generator=g, dtype=torch.float64) * 100).to(cache_dtype)
        v_cache = (torch.randn(shape, generator=g, dtype=torch.float64) * 100).to(cache_dtype)
    else:
        k_cache = torch.full(shape, fill, dtype=cache_dtype)
        v_cache = torch.full(shape, fill, dtype=cache_dtype)
    keys = [torch.randn(c, H_kv, D, generator=g, dtype=torch.float64).to(cache_dtype) for c in ctx_lens]
    values = [torch.randn(c, H_kv, D, generator=g, dtype=torch.float64).to(cache_dtype) for c in ctx_lens]
    for table, ctx, q_len, K, V in zip(tables, ctx_lens, q_lens, keys, values):
        for p in range(ctx - q_len):  # the cached prefix
            k_cache[table[p // block_size], p % block_size] = K[p]
            v_cache[table[p // block_size], p % block_size] = V[p]
    k_new = torch.cat([K[c - q:] for K, c, q in zip(keys, ctx_lens, q_lens)]).to(dtype)
    v_new = torch.cat([V[c - q:] for V, c, q in zip(values, ctx_lens, q_lens)]).to(dtype)
    q = torch.randn(sum(q_lens), H, D, generator=g, dtype=torch.float64).to(dtype)
    meta = AttentionMetadata.build(tables, list(ctx_lens), list(q_lens), block_size, torch.device(device))
    to = lambda t: t.to(device)
    return to(q), to(k_new), to(v_new), to(k_cache), to(v_cache), meta, keys, values


def dense_reference(q, keys, values, q_lens, scale) -> torch.Tensor:
    """float64 attention of the packed new tokens ``q [N, H, D]`` over their sequences' logical K/V (bottom-right
    causal, GQA by repeating each kv head over its ``H / H_kv`` query heads) -> ``[N, H, D]`` float64."""
    q = q.detach().cpu().to(torch.float64)
    out, row = [], 0
    for K, V, q_len in zip(keys, values, q_lens):
        groups = q.shape[1] // K.shape[1]
        K = K.to(torch.float64).repeat_interleave(groups, dim=1)  # [L, H, D]
        V = V.to(torch.float64).repeat_interleave(groups, dim=1)
        L = K.shape[0]
        for i in range(q_len):
            pos = L - q_len + i
            scores = torch.einsum("hd,thd->ht", q[row + i], K[:pos + 1]) * scale
            out.append(torch.einsum("ht,thd->hd", scores.softmax(dim=-1), V[:pos + 1]))
        row += q_len
    return torch.stack(out)


def run_backend(backend, ctx_lens, q_lens, H, H_kv, D, block_size, dtype, device, **case_kw):
    """Run one step through ``backend``; returns ``(out, reference, case)`` and checks the cache write."""
    q, k, v, kc, vc, meta, keys, values = make_case(ctx_lens, q_lens, H, H_kv, D, block_size, dtype, device,
                                                    **case_kw)
    scale = D ** -0.5
    out = backend.forward(q, k, v, kc, vc, meta, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    slots = meta.slot_mapping.cpu()
    assert torch.equal(kc.view(-1, H_kv, D)[slots.to(kc.device)].cpu(), k.to(kc.dtype).cpu())
    assert torch.equal(vc.view(-1, H_kv, D)[slots.to(vc.device)].cpu(), v.to(vc.dtype).cpu())
    return out, dense_reference(q, keys, values, q_lens, scale), (q, k, v, meta, scale)


def assert_within_baseline(out, ref, baseline, dtype, name):
    """flash-attention's acceptance rule: ``max|out - ref| <= 2 max|baseline - ref| + atol`` (atol: the dtype's)."""
    err = (out.cpu().double() - ref).abs().max().item()
    base = (baseline.cpu().double() - ref).abs().max().item()
    atol = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}[dtype]
    assert err <= 2 * base + atol, f"{name}: max err {err:.3g} > 2 * torch's {base:.3g} + {atol:g}"


# -------------------------------------------------------------------------------------------------- torch backend
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2)], ids=["mha", "gqa3"])
def test_torch_prefill_with_cached_prefix(dtype, heads, device):
    # a full prompt, a prompt whose first 8 tokens are cached, and a one-token step: a mixed (prefill) batch
    H, H_kv = heads
    out, ref, _ = run_backend(TorchAttention(), [5, 12, 9], [5, 4, 1], H, H_kv, 16, 4, dtype, device, seed=1)
    assert_close(out, ref, dtype, "prefill")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (4, 1)], ids=["mha", "gqa3", "mqa4"])
def test_torch_prefill_of_whole_prompts_attends_the_packed_kv(dtype, heads, device):
    # whole prompts (nothing cached before them: the generator's prefills) attend over the step's own packed K/V,
    # without reading the cache back (the cache is still written, checked by run_backend); bf16 against the
    # gather-from-cache path on the same inputs, by STYLE.md 3's rule
    H, H_kv = heads
    lens = [5, 17, 1, 9]
    out, ref, _ = run_backend(TorchAttention(), lens, lens, H, H_kv, 16, 4, dtype, device, seed=4)
    if dtype == torch.bfloat16:
        q, k, v, kc, vc, meta, _, _ = make_case(lens, lens, H, H_kv, 16, 4, dtype, device, seed=4)  # the same case
        write_kv(kc, vc, k, v, meta.slot_mapping)
        base = TorchAttention._prefill_from_cache(q, kc, vc, meta, 16 ** -0.5)
        assert_within_baseline(out, ref, base, dtype, "whole-prompt prefill")
    else:
        assert_close(out, ref, dtype, "whole-prompt prefill")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("heads", [(2, 2), (4, 1), (6, 2)], ids=["mha", "mqa4", "gqa3"])
def test_torch_decode_ragged(dtype, heads, device):
    H, H_kv = heads
    out, ref, _ = run_backend(TorchAttention(), RAGGED, [1, 1, 1], H, H_kv, 16, 4, dtype, device, seed=2)
    assert_close(out, ref, dtype, "decode")


# ------------------------------------------------------------------------------------------------- triton decode
@needs_triton
@pytest.mark.parametrize("D", [16, 64])
@pytest.mark.parametrize("heads", [(2, 2), (4, 2), (8, 2), (7, 1)], ids=["G1", "G2", "G4", "G7"])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_triton_decode_float32(block_size, heads, D, device):
    # G1/G2 take the broadcast path, G4/G7 tl.dot (rows padded to 16); split_size 8: up to 5 splits of 33 tokens
    H, H_kv = heads
    out, ref, _ = run_backend(TritonAttention(split_size=8), RAGGED, [1, 1, 1], H, H_kv, D, block_size,
                              torch.float32, device, seed=block_size * 10 + H)
    assert_close(out, ref, torch.float32, "triton decode")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads,D,block_size", [((8, 2), 64, 4), ((2, 2), 16, 16), ((7, 1), 16, 1)],
                         ids=["G4-D64-b4", "G1-D16-b16", "G7-D16-b1"])
def test_triton_decode_half(dtype, heads, D, block_size, device):
    H, H_kv = heads
    args = (RAGGED, [1, 1, 1], H, H_kv, D, block_size, dtype, device)
    out, ref, _ = run_backend(TritonAttention(split_size=8), *args, seed=3)
    baseline, _, _ = run_backend(TorchAttention(), *args, seed=3)
    assert_within_baseline(out, ref, baseline, dtype, "triton decode")


@needs_triton
@pytest.mark.parametrize("dot_min_group", [1, 100], ids=["dot", "broadcast"])
@pytest.mark.parametrize("heads", [(2, 1), (7, 1), (20, 1)], ids=["G2", "G7", "G20"])
def test_triton_decode_paths(heads, dot_min_group, device):
    # both score paths for the same groups; G20 runs two programs of 16 rows (dot) or three of 8 (broadcast) per kv head
    H, H_kv = heads
    backend = TritonAttention(split_size=8, dot_min_group=dot_min_group)
    out, ref, _ = run_backend(backend, RAGGED, [1, 1, 1], H, H_kv, 16, 4, torch.float32, device, seed=H)
    assert_close(out, ref, torch.float32, "triton decode")


@needs_triton
@pytest.mark.parametrize("split_size", [None, 1, 8, 20, 1000])
def test_triton_decode_splits(split_size, device):
    # None: the heuristic (one split for short contexts: stage 1 writes the output); 1: one tile per split; 20: split
    # boundaries that cut through blocks and tiles; 1000: one split
    out, ref, _ = run_backend(TritonAttention(split_size=split_size), [1, 7, 33, 16], [1, 1, 1, 1], 4, 2, 16, 4,
                              torch.float32, device, seed=5)
    assert_close(out, ref, torch.float32, "triton decode")


@needs_triton
def test_triton_decode_odd_block_and_head_dim(device):
    # a block size that is not a power of two, and a head dim padded to 32 with a mask
    out, ref, _ = run_backend(TritonAttention(split_size=8), RAGGED, [1, 1, 1], 4, 2, 24, 3, torch.float32, device,
                              seed=6)
    assert_close(out, ref, torch.float32, "triton decode")


@needs_triton
def test_triton_decode_reads_only_the_context(device):
    # every cache slot the batch does not own is NaN: a read past a context (or into another block) shows up
    out, ref, _ = run_backend(TritonAttention(split_size=8), RAGGED, [1, 1, 1], 4, 2, 16, 4, torch.float32, device,
                              seed=7, fill=float("nan"))
    assert torch.isfinite(out).all()
    assert_close(out, ref, torch.float32, "triton decode")


@needs_triton
def test_triton_decode_strided_q_and_bf16_cache(device):
    # q a view into a fused qkv projection (row stride > H * D); a bfloat16 cache under float32 queries
    H, H_kv, D = 4, 2, 16
    q, k, v, kc, vc, meta, keys, values = make_case(RAGGED, [1, 1, 1], H, H_kv, D, 4, torch.float32, device, seed=8,
                                                    cache_dtype=torch.bfloat16)
    qkv = torch.cat([q.flatten(1), k.flatten(1), v.flatten(1)], dim=1)
    q_view = qkv[:, :H * D].view(-1, H, D)
    assert not q_view.is_contiguous()
    out = TritonAttention(split_size=8).forward(q_view, k, v, kc, vc, meta, D ** -0.5)
    baseline = TorchAttention().forward(q, k, v, kc.clone(), vc.clone(), meta, D ** -0.5)
    assert out.dtype == torch.float32
    assert_close(out, dense_reference(q, keys, values, [1, 1, 1], D ** -0.5), torch.float32, "triton")
    assert_close(out, baseline, torch.float32, "triton vs torch")


@needs_triton
def test_triton_decode_is_batch_invariant_with_a_fixed_split_size(device):
    # with split_size fixed, a sequence's output does not depend on the other sequences of the batch (bitwise)
    H, H_kv, D = 4, 2, 16
    q, k, v, kc, vc, meta, _, _ = make_case(RAGGED, [1, 1, 1], H, H_kv, D, 4, torch.float32, device, seed=9)
    TorchAttention().forward(q, k, v, kc, vc, meta, 0.25)  # write the new tokens
    full = paged_decode_attention(q, kc, vc, meta.block_tables, meta.context_lens, 33, 0.25, split_size=8)
    alone = paged_decode_attention(q[2:], kc, vc, meta.block_tables[2:], meta.context_lens[2:], 33, 0.25,
                                   split_size=8)
    assert torch.equal(full[2:], alone)


@needs_triton
def test_triton_prefill_falls_back_to_torch(device):
    out, ref, _ = run_backend(TritonAttention(), [5, 12, 9], [5, 4, 1], 4, 2, 16, 4, torch.float32, device, seed=10)
    assert_close(out, ref, torch.float32, "triton prefill")


def test_decode_tiles():
    assert decode_tiles(1, 128, interpret=False) == (False, 1, 16, 128, 4)
    assert decode_tiles(7, 80, interpret=False).is_dot and decode_tiles(7, 80, interpret=False).block_d == 128
    assert decode_tiles(2, 8, interpret=False).block_d == 16
    assert decode_tiles(32, 64, dot_min_group=100, interpret=False).block_h == 8  # capped: four programs per kv head


# --------------------------------------------------------------------------------------------- validation, factory
def test_triton_validate():
    backend = TritonAttention.__new__(TritonAttention)
    cuda = torch.device("cuda")
    backend.validate(block_size=3, head_dim=256, dtype=torch.bfloat16, device=cuda)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        backend.validate(block_size=0, head_dim=64, dtype=torch.float16, device=cuda)
    with pytest.raises(ValueError, match="head_dim 1..256"):
        backend.validate(block_size=16, head_dim=512, dtype=torch.float16, device=cuda)
    with pytest.raises(ValueError, match="float64"):
        backend.validate(block_size=16, head_dim=64, dtype=torch.float64, device=cuda)
    with pytest.raises(ValueError, match="split_size"):
        TritonAttention(split_size=0)


def test_flash_attn_validation():
    ok = {"block_size": 256, "head_dim": 128, "dtype": torch.bfloat16, "device": torch.device("cuda")}
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] >= 8:
        fab.check_flash_attn_config(**ok)
    cases = [({"block_size": 16}, "divisible by 256"), ({"block_size": 384}, "divisible by 256"),
             ({"dtype": torch.float32}, "float16 or bfloat16"), ({"device": torch.device("cpu")}, "CUDA"),
             ({"head_dim": 100}, "multiple of 8"), ({"head_dim": 512}, "head_dim <= 256")]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            fab.check_flash_attn_config(**{**ok, **change})
        with pytest.raises(ValueError, match=message):  # the backend's validate needs no flash_attn
            FlashAttnBackend.__new__(FlashAttnBackend).validate(**{**ok, **change})


@pytest.mark.skipif(fab.HAS_FLASH_ATTN, reason="flash_attn is installed")
def test_flash_attn_missing_is_a_clear_error():
    assert fab.describe()["available"] is False and fab.describe()["import_error"]
    with pytest.raises(ImportError, match="needs the 'flash-attn' package"):
        FlashAttnBackend()
    with pytest.raises(ImportError, match="flash-attn"):
        get_attention_backend("flash_attn", "cuda")


def test_get_attention_backend_names():
    assert isinstance(get_attention_backend(None, "cpu"), TorchAttention)
    assert isinstance(get_attention_backend("auto", torch.device("cpu")), TorchAttention)
    assert isinstance(get_attention_backend("torch", "cpu"), TorchAttention)
    with pytest.raises(ValueError, match="unknown attention backend 'sdpa'"):
        get_attention_backend("sdpa", "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU rules")
def test_get_attention_backend_triton_on_cpu(monkeypatch):
    if HAS_TRITON:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert isinstance(get_attention_backend("triton", "cpu"), TritonAttention)
        with pytest.raises(ValueError, match="block_size must be a positive int"):  # an explicit name validates
            get_attention_backend("triton", "cpu", block_size=0, head_dim=16, dtype=torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises((RuntimeError, ImportError), match="attention backend 'triton' needs"):
        get_attention_backend("triton", "cpu")
    assert isinstance(get_attention_backend(None, "cpu"), TorchAttention)  # auto never picks the interpreter


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_get_attention_backend_auto_on_cuda():
    backend = get_attention_backend(None, "cuda", block_size=16, head_dim=128, dtype=torch.bfloat16)
    assert backend.name == ("triton" if HAS_TRITON else "torch")  # flash_attn rejects block_size 16
    assert get_attention_backend(None, "cuda", block_size=16, head_dim=64, dtype=torch.float64).name == "torch"
