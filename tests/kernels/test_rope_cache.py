"""rope_and_cache against its float64 reference through every backend: GQA/MQA/MHA, odd head dims, several block
sizes, scattered slot mappings, cache slots outside the mapping untouched, strided q/k/v views, bad input."""

import pytest
import torch

import kernels as K
from kernels.rope_cache import apply_rope_ref
from tests._numerics import INPUT_DTYPES, assert_close, assert_within_twice_eager_error, randn

# (N tokens, H, H_kv, D, block_size, num_blocks)
CASES = {
    "gqa": (5, 4, 2, 16, 4, 8),
    "mha-half-dim-5-block-1": (3, 3, 3, 10, 1, 8),
    "one-of-everything": (1, 1, 1, 2, 16, 2),
    "mqa-d64-block16": (9, 8, 1, 64, 16, 4),
    "block-3-d40": (7, 6, 2, 40, 3, 5),
    "qwen-14-2-d64": (4, 14, 2, 64, 16, 3),
    "no-tokens": (0, 4, 2, 16, 4, 2),
}


def make_inputs(N, H, H_kv, D, block_size, num_blocks, dtype, device, cache_dtype=None, seed=0):
    cache_dtype = cache_dtype or dtype
    q = randn(N, H, D, dtype=dtype, device=device, seed=seed + 1, scale=2.0)
    k = randn(N, H_kv, D, dtype=dtype, device=device, seed=seed + 2, scale=2.0)
    v = randn(N, H_kv, D, dtype=dtype, device=device, seed=seed + 3, scale=2.0)
    # a real rotary table's halves are equal; random ones check that each half is read where it belongs
    cos = randn(N, D, dtype=dtype, device=device, seed=seed + 4)
    sin = randn(N, D, dtype=dtype, device=device, seed=seed + 5)
    shape = (num_blocks, block_size, H_kv, D)
    k_cache = randn(*shape, dtype=cache_dtype, device=device, seed=seed + 6, scale=100.0)  # sentinels
    v_cache = randn(*shape, dtype=cache_dtype, device=device, seed=seed + 7, scale=100.0)
    g = torch.Generator().manual_seed(seed + 8)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:N].to(device)  # scattered, any block order
    return q, k, v, cos, sin, k_cache, v_cache, slots


def bit_exact_expected(dtype: torch.dtype, device) -> bool:
    """Where the kernel must equal the eager reference bit for bit: it rounds each product and sum as eager does
    (compiled without FMA contraction). Everywhere but bf16 under the Triton interpreter, whose float32 -> bf16 cast
    truncates."""
    return dtype != torch.bfloat16 or torch.device(device).type == "cuda"


def check_caches(k_cache, v_cache, k_before, v_before, slots, k_stored, v):
    """Slots in ``slots`` hold ``k_stored``/``v`` (cast to the cache dtype); every other slot is untouched."""
    H_kv, D = k_cache.shape[2:]
    flat_k, flat_v = k_cache.view(-1, H_kv, D), v_cache.view(-1, H_kv, D)
    assert torch.equal(flat_k[slots], k_stored.to(k_cache.dtype))
    assert torch.equal(flat_v[slots], v.to(v_cache.dtype))
    other = torch.ones(flat_k.shape[0], dtype=torch.bool, device=slots.device)
    other[slots] = False
    assert torch.equal(flat_k[other], k_before.view(-1, H_kv, D)[other]), "a K slot outside slot_mapping changed"
    assert torch.equal(flat_v[other], v_before.view(-1, H_kv, D)[other]), "a V slot outside slot_mapping changed"


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
def test_rope_and_cache_matches_float64(backend, device, case, dtype):
    q, k, v, cos, sin, k_cache, v_cache, slots = make_inputs(*CASES[case], dtype, device)
    q0, k0, kc0, vc0 = q.clone(), k.clone(), k_cache.clone(), v_cache.clone()

    out = K.rope_and_cache(q, k, v, cos, sin, k_cache, v_cache, slots)

    assert out is q  # rotated in place
    check_caches(k_cache, v_cache, kc0, vc0, slots, k, v)
    q_ref, k_ref, kc_ref, vc_ref = q0.clone(), k0.clone(), kc0.clone(), vc0.clone()
    K.rope_and_cache_ref(q_ref, k_ref, v, cos, sin, kc_ref, vc_ref, slots)
    # each output is two products and a sum, each rounded to dtype as eager rounds them; the sum can cancel, so in
    # bf16/fp16 it is judged against eager's own error
    for name, got, x0, eager in (("q", q, q0, q_ref), ("k", k, k0, k_ref)):
        gold = apply_rope_ref(x0.double(), cos.double(), sin.double())
        assert_within_twice_eager_error(got, gold, eager, dtype, name)
    if bit_exact_expected(dtype, device) or backend == "torch":
        assert torch.equal(q, q_ref) and torch.equal(k, k_ref)
        assert torch.equal(k_cache, kc_ref) and torch.equal(v_cache, vc_ref)


def test_reference_is_the_former_apply_rope_and_write_kv():
    """The CPU path runs the reference: bit for bit HF's ``apply_rotary_pos_emb`` and an ``index_copy_`` per cache."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    for dtype in INPUT_DTYPES:
        q, k, v, cos, sin, k_cache, v_cache, slots = make_inputs(*CASES["gqa"], dtype, "cpu", seed=20)
        # HF's layout: [batch, heads, seq, D] with cos/sin [batch, seq, D]
        hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
        kc, vc = k_cache.clone(), v_cache.clone()
        kc.view(-1, *kc.shape[2:]).index_copy_(0, slots, hf_k[0].transpose(0, 1))
        vc.view(-1, *vc.shape[2:]).index_copy_(0, slots, v)
        K.rope_and_cache_ref(q, k, v, cos, sin, k_cache, v_cache, slots)
        assert torch.equal(q, hf_q[0].transpose(0, 1)) and torch.equal(k, hf_k[0].transpose(0, 1))
        assert torch.equal(k_cache, kc) and torch.equal(v_cache, vc)


@pytest.mark.parametrize("block_size", [1, 2, 16])
def test_rope_and_cache_slots_in_non_consecutive_blocks(backend, device, block_size):
    """Six tokens of one sequence (positions with gaps) in blocks 5, 0, 3, 1, 4, 2 of a scattered block table."""
    N, H, H_kv, D = 6, 4, 2, 8
    q, k, v, cos, sin, k_cache, v_cache, _ = make_inputs(N, H, H_kv, D, block_size, 6, torch.float32, device, seed=30)
    table = [5, 0, 3, 1, 4, 2]
    bs = block_size
    positions = [0, bs, 2 * bs + bs // 2, 3 * bs, 4 * bs + bs - 1, 5 * bs]
    slots = torch.tensor([table[p // bs] * bs + p % bs for p in positions], device=device)
    k0, kc0, vc0 = k.clone(), k_cache.clone(), v_cache.clone()
    K.rope_and_cache(q, k, v, cos, sin, k_cache, v_cache, slots)
    assert_close(k, apply_rope_ref(k0.double(), cos.double(), sin.double()), torch.float32, "k")  # float32: no cancel
    check_caches(k_cache, v_cache, kc0, vc0, slots, k, v)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rope_and_cache_to_a_float32_cache(backend, device, dtype):
    """A cache in another dtype than the model's stores the rotated values cast (as ``write_kv``'s ``.to``)."""
    q, k, v, cos, sin, k_cache, v_cache, slots = make_inputs(*CASES["gqa"], dtype, device, torch.float32, seed=40)
    kc0, vc0 = k_cache.clone(), v_cache.clone()
    K.rope_and_cache(q, k, v, cos, sin, k_cache, v_cache, slots)
    assert k_cache.dtype == torch.float32
    check_caches(k_cache, v_cache, kc0, vc0, slots, k, v)


@pytest.mark.parametrize("dtype", INPUT_DTYPES)
def test_rope_and_cache_on_strided_views_of_a_fused_projection(backend, device, dtype):
    """q, k, v as ``[N, heads, D]`` views of one ``[N, (H + 2 H_kv) D]`` qkv output, cos/sin as column halves of a
    wider table: rotated in place in the buffer, the v columns left as they were."""
    N, H, H_kv, D = 5, 4, 2, 12
    qkv = randn(N, (H + 2 * H_kv) * D, dtype=dtype, device=device, seed=50, scale=2.0)
    q = qkv[:, : H * D].view(N, H, D)
    k = qkv[:, H * D: (H + H_kv) * D].view(N, H_kv, D)
    v = qkv[:, (H + H_kv) * D:].view(N, H_kv, D)
    table = randn(N, 2 * D, dtype=dtype, device=device, seed=51)
    cos, sin = table[:, :D], table[:, D:]
    k_cache = torch.zeros(4, 4, H_kv, D, dtype=dtype, device=device)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.tensor([13, 2, 7, 8, 0], device=device)
    before = qkv.clone()
    K.rope_and_cache(q, k, v, cos, sin, k_cache, v_cache, slots)
    q0 = before[:, : H * D].view(N, H, D)
    assert_within_twice_eager_error(q, apply_rope_ref(q0.double(), cos.double(), sin.double()),
                                    apply_rope_ref(q0, cos, sin), dtype, "q")
    assert torch.equal(qkv[:, (H + H_kv) * D:], before[:, (H + H_kv) * D:])
    check_caches(k_cache, v_cache, torch.zeros_like(k_cache), torch.zeros_like(v_cache), slots, k, v)


def test_rope_and_cache_float64_takes_the_reference(backend, device):
    q, k, v, cos, sin, k_cache, v_cache, slots = make_inputs(*CASES["gqa"], torch.float64, device, seed=60)
    q2, k2, kc2, vc2 = q.clone(), k.clone(), k_cache.clone(), v_cache.clone()
    K.rope_and_cache(q, k, v, cos, sin, k_cache, v_cache, slots)
    K.rope_and_cache_ref(q2, k2, v, cos, sin, kc2, vc2, slots)
    assert torch.equal(q, q2) and torch.equal(k_cache, kc2) and torch.equal(v_cache, vc2)


def test_rope_and_cache_bad_input():
    q, k, v, cos, sin, kc, vc, slots = make_inputs(*CASES["gqa"], torch.float32, "cpu")
    args = {"q": q, "k": k, "v": v, "cos": cos, "sin": sin, "k_cache": kc, "v_cache": vc, "slot_mapping": slots}

    def call(**over):
        K.rope_and_cache(**{**args, **over})

    with pytest.raises(ValueError, match="head dim must be even"):
        call(q=q[..., :15], k=k[..., :15], v=v[..., :15], cos=cos[:, :15], sin=sin[:, :15], k_cache=kc[..., :15],
             v_cache=vc[..., :15])
    with pytest.raises(TypeError, match="k must have dtype in \\(float32\\), got float16"):
        call(k=k.half())
    with pytest.raises(TypeError, match="cos must have dtype"):
        call(cos=cos.double())
    with pytest.raises(TypeError, match="slot_mapping must have dtype in \\(int64\\), got int32"):
        call(slot_mapping=slots.int())
    with pytest.raises(TypeError, match="v_cache must have dtype"):
        call(v_cache=vc.half())
    with pytest.raises(ValueError, match=r"k must have shape \(5, 2, 16\), got \(4, 2, 16\)"):
        call(k=k[:4])
    with pytest.raises(ValueError, match=r"slot_mapping must have shape \(5,\), got \(4,\)"):
        call(slot_mapping=slots[:4])
    with pytest.raises(ValueError, match=r"k_cache must have shape \(num_blocks, block_size, 2, 16\)"):
        call(k_cache=kc[:, :, :1], v_cache=vc[:, :, :1])
    with pytest.raises(ValueError, match="v_cache must have the shape of k_cache"):
        call(v_cache=vc[:, :2])
    with pytest.raises(ValueError, match="q must have 3 dimensions"):
        call(q=q[0])
    with pytest.raises(ValueError, match="q requires grad, but rope_and_cache is inference only"):
        call(q=q.clone().requires_grad_(True))
    with torch.no_grad():
        call(q=q.clone().requires_grad_(True))  # fine under no_grad
