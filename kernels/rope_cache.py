"""Rotary position embedding of this step's queries and keys, fused with the write of K/V into the paged cache.

For a token with ``cos, sin [D]`` (its row of the rotary table) and a head ``x [D]``, pairs ``(i, i + D/2)``:

    out[i]       = x[i] * cos[i]       - x[i + D/2] * sin[i]              i < D/2
    out[i + D/2] = x[i + D/2] * cos[i + D/2] + x[i] * sin[i + D/2]

i.e. HF's ``q * cos + rotate_half(q) * sin`` (``rotate_half(x) = cat(-x2, x1)``, the GPT-NeoX layout that Llama,
Qwen2/3 and Mistral checkpoints use). Source: J. Su et al., "RoFormer: Enhanced Transformer with Rotary Position
Embedding" (2021); HF ``apply_rotary_pos_emb``. The rotated ``k`` and the plain ``v`` then go to the paged cache
``[num_blocks, block_size, H_kv, D]`` at flat slot ``slot_mapping[n] = block_id * block_size + offset``
(``engine/generation/attention/metadata.py``).

Numerics: ``rope_and_cache_ref`` is op for op the generator's former ``apply_rope`` + ``write_kv`` (so the CPU path is
bit-identical). The kernel rounds each product and the sum to the input dtype as eager PyTorch does, and is compiled
without FMA contraction (``enable_fp_fusion=False``), so it reproduces the reference bit for bit in every dtype (the
Triton CPU interpreter's bf16 cast truncates instead: there bf16 results may differ by one ulp).

Why a kernel: the eager form is about ten launches per layer (two chunks, a negation, a concatenation, two products
and a sum for each of q and k, then two index copies) with ``[N, H, D]`` temporaries; here one program per token reads
its ``cos``/``sin`` row once, rotates its query heads and key heads in place (tiles of ``BLOCK_HQ`` / ``BLOCK_HKV``
heads by ``D/2`` pairs), and stores ``k`` and ``v`` into their slot. Dims: ``N`` tokens, ``H`` query heads, ``H_kv``
K/V heads, ``D`` head dim (even).

Inference only: no autograd (``q`` and ``k`` are overwritten); callers run it under ``torch.no_grad()``.
"""

from __future__ import annotations

import torch

from kernels._backend import interpreting, tl, triton, use_triton
from kernels._checks import FLOAT_DTYPES, check_same_device, check_tensor


# ----------------------------------------------------------------------------------------------------------- reference
def apply_rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [N, heads, D]`` by ``cos, sin [N, D]`` (HF's rotate-half convention: dims ``i`` and ``i + D/2``
    form a pair); a new tensor in ``promote(x, cos)`` dtype."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None, :] + torch.cat((-x2, x1), dim=-1) * sin[:, None, :]


def rope_and_cache_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch ``rope_and_cache``: ``apply_rope_ref`` on q and k, one ``index_copy_`` per cache, then the
    rotated values copied back into ``q`` and ``k``. Returns ``q``."""
    q_rot, k_rot = apply_rope_ref(q, cos, sin), apply_rope_ref(k, cos, sin)
    H_kv, D = k.shape[1], k.shape[2]
    k_cache.view(-1, H_kv, D).index_copy_(0, slot_mapping, k_rot.to(k_cache.dtype))
    v_cache.view(-1, H_kv, D).index_copy_(0, slot_mapping, v.to(v_cache.dtype))
    q.copy_(q_rot)
    k.copy_(k_rot)
    return q


# ------------------------------------------------------------------------------------------------------------ kernels
@triton.jit
def _rope_pair(x1, x2, c1, c2, s1, s2, DT: tl.constexpr):
    """Rotated halves of ``x``, each product and each sum rounded to ``DT`` as eager PyTorch rounds them."""
    a1 = (x1 * c1).to(DT).to(tl.float32)
    b1 = (x2 * s1).to(DT).to(tl.float32)  # rotate_half gives -x2 here: -(x2 s1) rounds as x2 s1 does
    a2 = (x2 * c2).to(DT).to(tl.float32)
    b2 = (x1 * s2).to(DT).to(tl.float32)
    return (a1 - b1).to(DT), (a2 + b2).to(DT)


@triton.jit
def _rope_and_cache_kernel(
    Q,  # in/out: [N, H, D], rotated in place
    K,  # in/out: [N, H_kv, D], rotated in place
    V,  # [N, H_kv, D]
    COS, SIN,  # [N, D], q's dtype
    K_CACHE, V_CACHE,  # out: [num_blocks, block_size, H_kv, D], written at this step's slots only
    SLOTS,  # [N] int64 flat slots
    H, H_kv, HALF, block_size,
    stride_qn, stride_qh, stride_qd,
    stride_kn, stride_kh, stride_kd,
    stride_vn, stride_vh, stride_vd,
    stride_cn, stride_cd, stride_sn, stride_sd,
    stride_kcb, stride_kct, stride_kch, stride_kcd,
    stride_vcb, stride_vct, stride_vch, stride_vcd,
    BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    d_ok = d < HALF
    c1 = tl.load(COS + n * stride_cn + d * stride_cd, mask=d_ok, other=0.0).to(tl.float32)
    c2 = tl.load(COS + n * stride_cn + (d + HALF) * stride_cd, mask=d_ok, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + n * stride_sn + d * stride_sd, mask=d_ok, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + n * stride_sn + (d + HALF) * stride_sd, mask=d_ok, other=0.0).to(tl.float32)
    c1, c2, s1, s2 = c1[None, :], c2[None, :], s1[None, :], s2[None, :]

    hq = tl.arange(0, BLOCK_HQ)
    for h0 in range(0, H, BLOCK_HQ):
        heads = h0 + hq
        mask = (heads < H)[:, None] & d_ok[None, :]
        p1 = Q + n * stride_qn + heads[:, None] * stride_qh + d[None, :] * stride_qd
        p2 = p1 + HALF * stride_qd
        x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(p2, mask=mask, other=0.0).to(tl.float32)
        o1, o2 = _rope_pair(x1, x2, c1, c2, s1, s2, Q.dtype.element_ty)
        tl.store(p1, o1, mask=mask)
        tl.store(p2, o2, mask=mask)

    slot = tl.load(SLOTS + n)
    kc = K_CACHE + (slot // block_size) * stride_kcb + (slot % block_size) * stride_kct
    vc = V_CACHE + (slot // block_size) * stride_vcb + (slot % block_size) * stride_vct
    hk = tl.arange(0, BLOCK_HKV)
    for h0 in range(0, H_kv, BLOCK_HKV):
        heads = h0 + hk
        mask = (heads < H_kv)[:, None] & d_ok[None, :]
        p1 = K + n * stride_kn + heads[:, None] * stride_kh + d[None, :] * stride_kd
        p2 = p1 + HALF * stride_kd
        x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(p2, mask=mask, other=0.0).to(tl.float32)
        o1, o2 = _rope_pair(x1, x2, c1, c2, s1, s2, K.dtype.element_ty)
        tl.store(p1, o1, mask=mask)
        tl.store(p2, o2, mask=mask)
        kc1 = kc + heads[:, None] * stride_kch + d[None, :] * stride_kcd
        tl.store(kc1, o1.to(K_CACHE.dtype.element_ty), mask=mask)
        tl.store(kc1 + HALF * stride_kcd, o2.to(K_CACHE.dtype.element_ty), mask=mask)
        pv = V + n * stride_vn + heads[:, None] * stride_vh + d[None, :] * stride_vd
        vc1 = vc + heads[:, None] * stride_vch + d[None, :] * stride_vcd
        tl.store(vc1, tl.load(pv, mask=mask, other=0.0).to(V_CACHE.dtype.element_ty), mask=mask)
        tl.store(vc1 + HALF * stride_vcd, tl.load(pv + HALF * stride_vd, mask=mask, other=0.0)
                 .to(V_CACHE.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------------------ launcher
_TILE = 2048  # heads x pairs per loop step (about 16 values per thread and tensor at 4 warps)
_INTERPRET_MAX_HEADS = 2  # the CPU interpreter: a few heads per step so that the tests run the head loops


def tiles(H: int, H_kv: int, D: int, *, interpret: bool | None = None) -> tuple[int, int, int]:
    """``(BLOCK_HQ, BLOCK_HKV, BLOCK_HALF)`` for ``H`` query heads, ``H_kv`` K/V heads of dim ``D``."""
    interpret = interpreting() if interpret is None else interpret
    block_half = triton.next_power_of_2(D // 2)
    cap = _INTERPRET_MAX_HEADS if interpret else max(1, _TILE // block_half)
    return min(triton.next_power_of_2(H), cap), min(triton.next_power_of_2(H_kv), cap), block_half


def _rope_and_cache_fwd(q, k, v, cos, sin, k_cache, v_cache, slot_mapping) -> None:
    N, H, D = q.shape
    H_kv = k.shape[1]
    block_hq, block_hkv, block_half = tiles(H, H_kv, D)
    _rope_and_cache_kernel[(N,)](
        q, k, v, cos, sin, k_cache, v_cache, slot_mapping.contiguous(),
        H, H_kv, D // 2, k_cache.shape[1],
        *q.stride(), *k.stride(), *v.stride(), *cos.stride(), *sin.stride(), *k_cache.stride(), *v_cache.stride(),
        BLOCK_HQ=block_hq, BLOCK_HKV=block_hkv, BLOCK_HALF=block_half,
        enable_fp_fusion=False,  # no FMA: each product rounded as eager rounds it, so float32 matches bit for bit
    )


# -------------------------------------------------------------------------------------------------------------- public
def _check(q, k, v, cos, sin, k_cache, v_cache, slot_mapping) -> None:
    act = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    check_tensor("q", q, ndim=3, dtypes=act)
    check_tensor("k", k, ndim=3, dtypes=(q.dtype,))
    check_tensor("v", v, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("cos", cos, ndim=2, dtypes=(q.dtype,))
    check_tensor("sin", sin, ndim=2, dtypes=(q.dtype,))
    check_tensor("k_cache", k_cache, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("v_cache", v_cache, ndim=4, dtypes=(k_cache.dtype,))
    check_tensor("slot_mapping", slot_mapping, ndim=1, dtypes=(torch.int64,))
    N, _, D = q.shape
    H_kv = k.shape[1]
    if D % 2:
        raise ValueError(f"q's head dim must be even (rotate-half pairs i and i + D/2), got q of shape {tuple(q.shape)}")
    expected = {"k": (k, (N, H_kv, D)), "v": (v, (N, H_kv, D)), "cos": (cos, (N, D)), "sin": (sin, (N, D)),
                "slot_mapping": (slot_mapping, (N,))}
    for name, (t, shape) in expected.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if tuple(k_cache.shape[2:]) != (H_kv, D):
        raise ValueError(f"k_cache must have shape (num_blocks, block_size, {H_kv}, {D}), got {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache must have the shape of k_cache {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    check_same_device({"q": q, "k": k, "v": v, "cos": cos, "sin": sin, "k_cache": k_cache, "v_cache": v_cache,
                       "slot_mapping": slot_mapping})
    if torch.is_grad_enabled():
        for name, t in (("q", q), ("k", k), ("v", v), ("cos", cos), ("sin", sin)):
            if t.requires_grad:
                raise ValueError(f"{name} requires grad, but rope_and_cache is inference only (it overwrites q and "
                                 f"k): call it under torch.no_grad()")


def rope_and_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """Apply RoPE to ``q`` and ``k`` in place and store the rotated ``k`` and ``v`` into the paged caches.

    Args:
        q: ``[N, H, D]`` float32/bf16/fp16/fp64 (any strides), this step's queries; rotated in place.
        k: ``[N, H_kv, D]``, q's dtype (any strides), this step's keys; rotated in place, so that a backend that still
            stores ``k`` itself stores the same values.
        v: ``[N, H_kv, D]``, any float dtype, this step's values (read only).
        cos, sin: ``[N, D]`` in q's dtype, each token's row of the rotary table (HF's ``cos, sin``: attention scaling
            included, rounded to the model dtype).
        k_cache, v_cache: ``[num_blocks, block_size, H_kv, D]``, one float dtype (may differ from q's: stored values
            are cast); written in place at the slots of ``slot_mapping`` only.
        slot_mapping: ``[N]`` int64, token ``n``'s flat slot ``block_id * block_size + offset``; every slot must lie in
            ``[0, num_blocks * block_size)`` (not checked: checking would synchronise the host); a slot that appears
            more than once gets one of its tokens' values (the generator's padded rows all write one scratch slot).

    Returns:
        ``q`` (the same tensor, now rotated). Inference only: no autograd.

    Raises:
        TypeError: non-tensors, non-float tensors, ``k``/``cos``/``sin`` of another dtype than ``q``, ``v_cache`` of
            another dtype than ``k_cache``, ``slot_mapping`` not int64. ValueError: shapes that do not match the
            above (an odd ``D`` included), tensors on different devices, an input that requires grad while autograd
            is on.
    """
    _check(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)
    if q.shape[0] == 0:
        return q
    if not use_triton("rope_and_cache", q, k, v, cos, sin, k_cache, v_cache):
        return rope_and_cache_ref(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)
    _rope_and_cache_fwd(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)
    return q
