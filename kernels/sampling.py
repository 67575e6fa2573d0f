"""Fused next-token sampling: one pass over each row of the logits draws the token by an exponential race with
counter-based noise and returns its log-prob. The spec is ``engine.generation.sampler.sample`` (no top-k / top-p),
whose module docstring gives the method; this kernel computes the same function, bit for bit in the noise:

    s_j    = logits_j / t               (t = 1 for greedy rows, t = temperature otherwise)
    U_j    = ((fmix32(fmix32(j ^ ka) ^ kb) >> 9) + 0.5) * 2**-23           (ka, kb: the row's 32-bit keys)
    token  = argmax_j s_j                        greedy rows (lowest id on ties)
           = argmax_j (s_j - log(-log U_j))      the others (Gumbel-max: P(token = j) = softmax(s)_j)
    logprob = s_token - logsumexp_j s_j

The eager version materialises a dozen ``[S, V]`` int64/float32 temporaries for the hash and the race (measured on an
H100, 64 x 8 samples of a 151,936-token vocabulary: most of the device time of a decode step); this kernel reads the
logits once and writes two numbers per row. Rows go on grid axis 0; each program loops over the vocabulary in tiles,
keeping an online log-sum-exp and the running best race value. On the CPU the compiled extension runs the same
function (``csrc/cpu/sampling.cpp``: the noise in AVX2 registers with the SLEEF logs torch itself uses; 3.6x the
eager path at 128 x 2,048 on this project's 2-core CPU, tokens identical).
"""

from __future__ import annotations

import torch

from kernels import _extension
from kernels._backend import select_backend, tl, triton
from kernels._checks import check_tensor

BLOCK_V = 2048
_U_SCALE = 2.0 ** -23  # 23 bits of the hash: (m + 0.5) * 2**-23 is exact in float32 and strictly inside (0, 1)


@triton.jit
def _fmix32(h):
    """MurmurHash3's 32-bit finaliser on uint32 (wrapping multiplication mod 2**32, logical shifts)."""
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    return h ^ (h >> 16)


@triton.jit
def _race_sample_kernel(
    TOKENS,  # out: [S] int64
    LOGPROBS,  # out: [S] float32
    LOGITS,  # [S, V] float32/bf16/fp16, row stride stride_s, unit column stride
    TEMPERATURE,  # [S] float32 (0 = greedy)
    KA,  # [S] int64 row keys in [0, 2**32)
    KB,  # [S] int64
    V,
    stride_s,
    U_SCALE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    t = tl.load(TEMPERATURE + row)
    greedy = t == 0.0
    t_div = tl.where(greedy, 1.0, t)
    ka = tl.load(KA + row).to(tl.uint32)
    kb = tl.load(KB + row).to(tl.uint32)
    base = LOGITS + row.to(tl.int64) * stride_s
    offs = tl.arange(0, BLOCK_V)
    m = float("-inf")
    l = 0.0
    best = float("-inf")
    best_s = float("-inf")
    best_j = 0
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        ok = cols < V
        # a true division by t (1 for greedy rows), as the spec's ``logits / temperature``: a reciprocal multiply
        # would round differently and change which token wins a close race
        s = tl.load(base + cols, mask=ok, other=float("-inf")).to(tl.float32) / t_div
        # online log-sum-exp of the scaled logits
        m_new = tl.maximum(m, tl.max(s, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp(m - m_safe) + tl.sum(tl.exp(s - m_safe), axis=0)
        m = m_new
        # the race: s - log(-log U) (Gumbel noise), or s itself for greedy rows
        h = _fmix32(_fmix32(cols.to(tl.uint32) ^ ka) ^ kb)
        u = ((h >> 9).to(tl.float32) + 0.5) * U_SCALE
        race = tl.where(greedy, s, s - tl.log(-tl.log(u)))
        race = tl.where(ok, race, float("-inf"))
        tile_best = tl.max(race, axis=0)
        tile_j = tl.argmax(race, axis=0)  # the lowest index among equal maxima
        tile_s = tl.sum(tl.where(offs == tile_j, s, 0.0), axis=0)
        take = tile_best > best  # strictly: an earlier tile keeps ties (lowest id)
        best_j = tl.where(take, v0 + tile_j, best_j)
        best_s = tl.where(take, tile_s, best_s)
        best = tl.where(take, tile_best, best)
    tl.store(TOKENS + row, best_j.to(tl.int64))
    tl.store(LOGPROBS + row, best_s - (m + tl.log(l)))


def race_sample(logits: torch.Tensor, temperature: torch.Tensor, ka: torch.Tensor,
                kb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row of ``logits`` in one kernel (see the module docstring for the math).

    Args:
        logits: ``[S, V]`` float32/bf16/fp16 with unit column stride (a row slice of a bigger tensor is fine).
        temperature: ``[S]`` float32, >= 0 (0 = greedy).
        ka, kb: ``[S]`` int64 in ``[0, 2**32)``: each row's noise keys (``engine.generation.sampler._row_keys`` of
            the sample's seed and position).

    Returns:
        ``(token_ids [S] int64, logprobs [S] float32)`` on the logits' device; no host synchronisation. CUDA: the
        Triton kernel; CPU: the compiled extension (``RLHF_KERNELS_BACKEND=triton`` with ``TRITON_INTERPRET=1``
        forces the interpreted Triton kernel).

    Raises:
        TypeError / ValueError: a non-float or non-2-D ``logits``, a non-unit column stride, or per-row tensors whose
        shape is not ``[S]``.
    """
    check_tensor("logits", logits, ndim=2)
    S, V = logits.shape
    if logits.stride(1) != 1:
        raise ValueError(f"logits must have unit column stride, got strides {tuple(logits.stride())}")
    for name, x in (("temperature", temperature), ("ka", ka), ("kb", kb)):
        if tuple(x.shape) != (S,):
            raise ValueError(f"{name} must have shape ({S},) like logits' rows, got {tuple(x.shape)}")
    if select_backend("race_sample", logits) == "cpp":
        return _extension.op("race_sample")(logits, temperature.to(torch.float32), ka.to(torch.int64),
                                            kb.to(torch.int64))
    tokens = torch.empty(S, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(S, dtype=torch.float32, device=logits.device)
    if S:
        _race_sample_kernel[(S,)](tokens, logprobs, logits, temperature.to(torch.float32).contiguous(),
                                  ka.to(torch.int64).contiguous(), kb.to(torch.int64).contiguous(), V,
                                  logits.stride(0), U_SCALE=_U_SCALE, BLOCK_V=min(BLOCK_V, triton.next_power_of_2(V)))
    return tokens, logprobs


__all__ = ["race_sample"]
