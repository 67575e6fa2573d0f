"""Outcome-reward advantages (GRPO, Dr. GRPO, RLOO) and masked whitening.

Group advantages. ``scores`` ``[B]`` holds one scalar reward per completion; rows ``g*G .. g*G+G-1`` are the ``G``
completions of prompt ``g`` (G = ``num_generations``, the layout TRL, veRL and OpenRLHF all produce). With the group
mean ``mu_g`` and standard deviation ``sigma_g``:

    grpo (norm_by_std=True):   A_i = (R_i - mu_g) / (sigma_g + epsilon)        DeepSeekMath, Shao et al. 2024
    grpo (norm_by_std=False):  A_i = R_i - mu_g                                Dr. GRPO, Liu et al. 2025
    rloo:                      A_i = R_i - (sum_g R - R_i) / (G - 1)           Ahmadian et al. 2024
                                   = G / (G - 1) * (R_i - mu_g)                (the form computed here)

``sigma_g``: Bessel-corrected (``unbiased_std=True``, the default: ``torch.std`` in veRL, OpenRLHF and TRL's
``nanstd``) or the population std (``unbiased_std=False``, e.g. RL-Kernel). ``epsilon`` differs per anchor: TRL 1e-4,
veRL 1e-6 (our default), OpenRLHF 1e-9; it must be > 0 (with 0, a group of equal scores, common with 0/1 rewards,
gives 0 / 0 = NaN). (veRL's ``grpo_vectorized`` also floors the variance at epsilon: not done
here; it only changes groups whose std is below 1e-3.) The group mean is computed shifted by the group's first score
(``mu = R_0 + mean(R - R_0)``), so a group of identical scores has a mean equal to them *exactly* and gets advantage
0, never rounding noise amplified by ``1 / epsilon``.
Singleton groups (G == 1) follow veRL: grpo uses mean 0 and std 1, so ``A = R / (1 + epsilon)`` (or ``A = R``
without std normalisation); rloo gives 0 (veRL ``rloo_vectorized``; veRL's loop version leaves ``R`` unchanged).
NaN scores are not special-cased (TRL's NaN-aware ``nanstd`` is not reproduced): a NaN makes its group NaN.

Masked whitening (veRL ``verl.utils.torch_functional.masked_whiten``; statistics over all selected tokens of the
whole tensor, not per row), with ``n = sum(m)``:

    mu  = sum(m * v) / n
    var = sum(m * (v - mu)^2) / n * n / (n - 1)          (Bessel-corrected; veRL raises when n is 0 or 1)
    out = (v - mu) * rsqrt(var + epsilon)   (+ mu when shift_mean=False)

Every position is whitened, masked ones included (veRL does not zero them; select with ``torch.where(mask, out, 0)``
when needed). The statistics read only the selected entries (masked loads / ``torch.where``, never ``m * v``), so
NaN/inf at a masked entry changes no other output; that entry's own output is computed from its own value.
veRL's ``masked_mean`` divides by ``n + 1e-8``: a relative change below 1e-8, under float32 resolution, not copied.
OpenRLHF whitens with the biased variance and ``rsqrt(max(var, 1e-8))``; TRL's ``masked_whiten`` is veRL's.

Why kernels: the group statistics are a gather/scatter over groups in the anchors (veRL's reference loops over a
Python dict); here one program per group reads its G scores and writes G advantages. The whitening reductions are
deterministic (per-program partial sums, then a fixed-order sum: no atomics), so two runs give bitwise equal results.
Neither op is differentiable: advantages are constants of the loss (no autograd Function).
"""

from __future__ import annotations

import numbers

import torch

from kernels._backend import compute_dtype, tl, triton, use_triton
from kernels._checks import check_choice, check_mask, check_positive, check_same_device, check_tensor

ADVANTAGE_ESTIMATORS = ("grpo", "rloo")
_ESTIMATOR_ID = {name: i for i, name in enumerate(ADVANTAGE_ESTIMATORS)}


def _check_num_generations(num_generations: object, B: int) -> int:
    if isinstance(num_generations, bool) or not isinstance(num_generations, numbers.Integral):
        raise TypeError(f"num_generations must be an int, got {type(num_generations).__name__}")
    num_generations = int(num_generations)
    if num_generations < 1:
        raise ValueError(f"num_generations must be >= 1, got {num_generations}")
    if B % num_generations != 0:
        raise ValueError(f"group size num_generations={num_generations} does not divide the batch B={B}")
    return num_generations


def _check_mask_count(mask: torch.Tensor) -> float:
    """``sum(mask)`` as a Python float, raising when it is 0 or 1 (veRL's errors). Synchronises with the device."""
    n = float(mask.sum(dtype=torch.float64).item())
    if n <= 0:
        raise ValueError("mask must select at least one element for masked_whiten, got sum(mask) = 0")
    if n == 1:
        raise ValueError("mask selects exactly one element: masked_whiten's unbiased variance divides by "
                         "sum(mask) - 1 = 0; whiten over a larger batch")
    return n


def group_advantages_ref(scores: torch.Tensor, num_generations: int, estimator: str = "grpo",
                         norm_by_std: bool = True, unbiased_std: bool = True,
                         epsilon: float = 1e-6) -> torch.Tensor:
    """Plain-PyTorch group advantages (the spec; formulas in the module docstring): float64 in -> float64 out, else
    float32."""
    dtype = compute_dtype(scores)
    G = num_generations
    x = scores.to(dtype).reshape(-1, G)
    if G == 1:  # veRL: singleton groups have mean 0 and std 1 (grpo), advantage 0 (rloo)
        if estimator == "rloo":
            return torch.zeros_like(x).reshape(-1)
        return (x / (1.0 + epsilon) if norm_by_std else x).reshape(-1)
    x0 = x[:, :1]
    centered = x - (x0 + (x - x0).mean(dim=1, keepdim=True))
    if estimator == "rloo":
        return (centered * (G / (G - 1))).reshape(-1)
    if not norm_by_std:
        return centered.reshape(-1)
    std = (centered.square().sum(dim=1, keepdim=True) / (G - 1 if unbiased_std else G)).sqrt()
    return (centered / (std + epsilon)).reshape(-1)


def masked_whiten_ref(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                      epsilon: float = 1e-8) -> torch.Tensor:
    """Plain-PyTorch masked whitening (the spec): float64 in -> float64 out, else float32. Raises like veRL when
    ``sum(mask)`` is 0 or 1 (a host synchronisation)."""
    dtype = compute_dtype(values)
    v, m = values.to(dtype), mask.bool()
    n = _check_mask_count(mask)
    zero = torch.zeros((), dtype=dtype, device=v.device)
    mean = torch.where(m, v, zero).sum() / n  # where, not v * m: a masked NaN must not reach the statistics
    var = torch.where(m, (v - mean).square(), zero).sum() / n * (n / (n - 1))
    whitened = (v - mean) * torch.rsqrt(var + epsilon)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


@triton.jit
def _group_advantages_kernel(
    OUT,  # out: [B] float32
    S,  # [B] scores, any float dtype, stride stride_s
    stride_s,
    G,  # group size
    inv_g,  # 1 / G
    inv_dof,  # 1 / (G - 1) (Bessel) or 1 / G (population)
    rloo_scale,  # G / (G - 1)
    epsilon,
    ESTIMATOR: tl.constexpr,  # index into ADVANTAGE_ESTIMATORS
    NORM_BY_STD: tl.constexpr,
    SINGLETON: tl.constexpr,  # G == 1
    BLOCK: tl.constexpr,
):
    # One program per group; the group is read in BLOCK-wide chunks (one chunk for G <= BLOCK, the usual case).
    g = tl.program_id(0).to(tl.int64)
    if SINGLETON:
        x = tl.load(S + g * stride_s).to(tl.float32)
        if ESTIMATOR == 1:
            a = tl.zeros_like(x)
        elif NORM_BY_STD:
            a = x / (1.0 + epsilon)
        else:
            a = x
        tl.store(OUT + g, a)
    else:
        base = g * G
        offs = tl.arange(0, BLOCK)
        x0 = tl.load(S + base * stride_s).to(tl.float32)  # shift: identical scores give mean == x0 exactly
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, G, BLOCK):
            idx = start + offs
            ok = idx < G
            x = tl.load(S + (base + idx) * stride_s, mask=ok, other=0.0).to(tl.float32)
            acc += tl.where(ok, x - x0, 0.0)
        mean = x0 + tl.sum(acc, axis=0) * inv_g
        if ESTIMATOR == 1:
            scale = rloo_scale
        elif NORM_BY_STD:
            acc2 = tl.zeros([BLOCK], tl.float32)
            for start in range(0, G, BLOCK):
                idx = start + offs
                ok = idx < G
                x = tl.load(S + (base + idx) * stride_s, mask=ok, other=0.0).to(tl.float32)
                acc2 += tl.where(ok, (x - mean) * (x - mean), 0.0)
            std = tl.sqrt(tl.sum(acc2, axis=0) * inv_dof)
            scale = 1.0 / (std + epsilon)
        else:
            scale = 1.0
        for start in range(0, G, BLOCK):
            idx = start + offs
            ok = idx < G
            x = tl.load(S + (base + idx) * stride_s, mask=ok, other=0.0).to(tl.float32)
            tl.store(OUT + base + idx, (x - mean) * scale, mask=ok)


@triton.jit
def _masked_sum_kernel(
    PART,  # out: [P] float32, sum of m * v over this program's elements
    V,  # [N] values, any float dtype
    M,  # [N] mask
    N,
    BLOCK: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    acc = tl.zeros([BLOCK], tl.float32)
    for _ in range(pid * BLOCK, N, NUM_PROGRAMS * BLOCK):  # grid-stride
        ok = offs < N
        live = ok & (tl.load(M + offs, mask=ok, other=0) != 0)
        acc += tl.load(V + offs, mask=live, other=0.0).to(tl.float32)  # masked entries are never read
        offs += NUM_PROGRAMS * BLOCK
    tl.store(PART + pid, tl.sum(acc, axis=0))


@triton.jit
def _masked_mean(PART_SUM, inv_n, NUM_PROGRAMS: tl.constexpr, PART_BLOCK: tl.constexpr):
    """The masked mean from the pass-1 partials, summed in one fixed order by every program that needs it."""
    p = tl.arange(0, PART_BLOCK)
    return tl.sum(tl.load(PART_SUM + p, mask=p < NUM_PROGRAMS, other=0.0), axis=0) * inv_n


@triton.jit
def _masked_sq_dev_kernel(
    PART_SQ,  # out: [P] float32, sum of m * (v - mean)^2 over this program's elements
    PART_SUM,  # [P] pass-1 partials
    V,
    M,
    N,
    inv_n,
    BLOCK: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr,
    PART_BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    mean = _masked_mean(PART_SUM, inv_n, NUM_PROGRAMS, PART_BLOCK)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    acc = tl.zeros([BLOCK], tl.float32)
    for _ in range(pid * BLOCK, N, NUM_PROGRAMS * BLOCK):
        ok = offs < N
        live = ok & (tl.load(M + offs, mask=ok, other=0) != 0)
        v = tl.load(V + offs, mask=live, other=0.0).to(tl.float32)  # masked entries are never read
        acc += tl.where(live, (v - mean) * (v - mean), 0.0)
        offs += NUM_PROGRAMS * BLOCK
    tl.store(PART_SQ + pid, tl.sum(acc, axis=0))


@triton.jit
def _whiten_apply_kernel(
    OUT,  # out: [N] float32
    PART_SUM,
    PART_SQ,
    V,
    N,
    inv_n,
    inv_nm1,  # 1 / (n - 1): var = sum(m (v - mean)^2) / n * n / (n - 1)
    epsilon,
    SHIFT_MEAN: tl.constexpr,
    BLOCK: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr,  # of the reduction passes
    PART_BLOCK: tl.constexpr,
):
    mean = _masked_mean(PART_SUM, inv_n, NUM_PROGRAMS, PART_BLOCK)
    p = tl.arange(0, PART_BLOCK)
    var = tl.sum(tl.load(PART_SQ + p, mask=p < NUM_PROGRAMS, other=0.0), axis=0) * inv_nm1
    rstd = 1.0 / tl.sqrt(var + epsilon)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    ok = offs < N
    v = tl.load(V + offs, mask=ok, other=0.0).to(tl.float32)
    out = (v - mean) * rstd
    if not SHIFT_MEAN:
        out += mean
    tl.store(OUT + offs, out, mask=ok)


_GROUP_MAX_BLOCK = 1024
_BLOCK = 1024
_MAX_PARTS = 256  # programs of the reduction passes (about 2 per H100 SM); their partials are summed in-kernel


def _group_advantages_fwd(scores: torch.Tensor, G: int, est: str, norm_by_std: bool, unbiased_std: bool,
                          epsilon: float) -> torch.Tensor:
    B = scores.shape[0]
    out = torch.empty(B, dtype=torch.float32, device=scores.device)
    if B:
        block = 1 if G == 1 else min(triton.next_power_of_2(G), _GROUP_MAX_BLOCK)
        _group_advantages_kernel[(B // G,)](
            out, scores, scores.stride(0), G, 1.0 / G,
            1.0 / (G - 1 if unbiased_std else G) if G > 1 else 1.0,
            G / (G - 1) if G > 1 else 0.0,
            epsilon,
            ESTIMATOR=_ESTIMATOR_ID[est], NORM_BY_STD=norm_by_std, SINGLETON=G == 1, BLOCK=block,
        )
    return out


def _masked_whiten_fwd(values: torch.Tensor, mask: torch.Tensor, n: float, shift_mean: bool,
                       epsilon: float) -> torch.Tensor:
    v = values.reshape(-1)
    m = mask.reshape(-1)
    m = m.view(torch.uint8) if m.dtype == torch.bool else m
    N = v.numel()
    out = torch.empty(N, dtype=torch.float32, device=v.device)
    parts = max(1, min(triton.cdiv(N, _BLOCK), _MAX_PARTS))
    part_block = triton.next_power_of_2(parts)
    part_sum = torch.empty(parts, dtype=torch.float32, device=v.device)
    part_sq = torch.empty(parts, dtype=torch.float32, device=v.device)
    inv_n, inv_nm1 = 1.0 / n, 1.0 / (n - 1.0)
    _masked_sum_kernel[(parts,)](part_sum, v, m, N, BLOCK=_BLOCK, NUM_PROGRAMS=parts)
    _masked_sq_dev_kernel[(parts,)](part_sq, part_sum, v, m, N, inv_n, BLOCK=_BLOCK, NUM_PROGRAMS=parts,
                                    PART_BLOCK=part_block)
    _whiten_apply_kernel[(triton.cdiv(N, _BLOCK),)](
        out, part_sum, part_sq, v, N, inv_n, inv_nm1, epsilon, SHIFT_MEAN=shift_mean, BLOCK=_BLOCK,
        NUM_PROGRAMS=parts, PART_BLOCK=part_block,
    )
    return out.view(values.shape)


def group_advantages(scores: torch.Tensor, num_generations: int, *, estimator: str = "grpo",
                     norm_by_std: bool = True, unbiased_std: bool = True, epsilon: float = 1e-6) -> torch.Tensor:
    """Per-completion advantages from one scalar score per completion, normalised within each prompt's group.

    Args:
        scores: ``[B]`` float32/bf16/fp16/fp64 sequence rewards; rows ``g*G .. g*G+G-1`` belong to prompt ``g``.
        num_generations: ``G``, completions per prompt (an int >= 1 dividing ``B``). ``G == 1`` gives veRL's
            singleton rule: grpo ``A = R / (1 + epsilon)`` (``R`` without std normalisation), rloo ``A = 0``.
        estimator: ``"grpo"`` (default): ``(R - mean_g) / (std_g + epsilon)``; ``"rloo"``: ``R_i`` minus the mean
            of the other ``G - 1`` scores of its group.
        norm_by_std: grpo only; False = Dr. GRPO (``R - mean_g``, veRL ``norm_adv_by_std_in_grpo=False``, TRL
            ``scale_rewards="none"``). Default True.
        unbiased_std: grpo only; True (default) = Bessel-corrected std (veRL, OpenRLHF, TRL), False = population std.
        epsilon: > 0 and finite, added to the std (default 1e-6 = veRL; TRL uses 1e-4, OpenRLHF 1e-9). 0 is
            rejected: a group of identical scores would give 0 / 0 = NaN.

    Returns:
        ``[B]`` float32 advantages (float64 for float64 scores), in units of score (Dr. GRPO, rloo) or of group std
        (grpo). Broadcast over tokens with ``A[:, None] * response_mask``. Not differentiable.

    Raises:
        TypeError: ``scores`` not a float tensor; ``num_generations`` not an int; ``epsilon`` not a number.
        ValueError: ``scores`` not 1-D; ``num_generations`` < 1 or not dividing ``B``; unknown ``estimator``;
            ``epsilon`` <= 0, NaN or infinite.
    """
    check_tensor("scores", scores, ndim=1)
    G = _check_num_generations(num_generations, scores.shape[0])
    est = check_choice("estimator", estimator, ADVANTAGE_ESTIMATORS)
    epsilon = check_positive("epsilon", epsilon)  # > 0: with 0 a group of equal scores is 0 / 0
    norm_by_std, unbiased_std = bool(norm_by_std), bool(unbiased_std)
    s = scores.detach()
    if use_triton("group_advantages", s):
        return _group_advantages_fwd(s, G, est, norm_by_std, unbiased_std, epsilon)
    return group_advantages_ref(s, G, est, norm_by_std, unbiased_std, epsilon)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True,
                  epsilon: float = 1e-8) -> torch.Tensor:
    """Whiten ``values`` with the mean and Bessel-corrected variance of its masked entries (veRL ``masked_whiten``).

    Args:
        values: ``[B, T]`` (any shape) float32/bf16/fp16/fp64, e.g. GAE advantages or REINFORCE++ returns.
        mask: same shape, bool or {0, 1} numbers; selects the entries the statistics are taken over (whole tensor).
            Unselected entries are never read into the statistics (NaN/inf there is harmless to the others).
        shift_mean: True (default) = zero-mean output; False adds the mean back (only the scale changes).
        epsilon: >= 0 and finite, added to the variance under the square root (default 1e-8, as veRL).

    Returns:
        float32 (float64 for float64 values) tensor of ``values``' shape: ``(v - mean) * rsqrt(var + epsilon)``
        (``+ mean`` without ``shift_mean``) at *every* position, masked ones included (veRL does not zero them:
        select with ``torch.where(mask, out, 0)`` if needed). Not differentiable.

    Raises:
        TypeError: non-float ``values``, a mask of another dtype, ``epsilon`` not a number.
        ValueError: shape or device mismatch; ``epsilon`` < 0 or not finite; a non-bool mask holding values other
            than 0 and 1; ``sum(mask)`` equal to 0 or 1 (veRL raises too: the unbiased variance needs two entries).
            These checks read ``sum(mask)`` (and, for a non-bool mask, one flag) back to the host: one or two device
            synchronisations per call, before any kernel launch.
    """
    check_tensor("values", values)
    check_mask("mask", mask, "values", values)
    check_same_device({"values": values, "mask": mask})
    epsilon = check_positive("epsilon", epsilon, allow_zero=True)
    shift_mean = bool(shift_mean)
    v = values.detach()
    if use_triton("masked_whiten", v):
        n = _check_mask_count(mask)
        return _masked_whiten_fwd(v, mask, n, shift_mean, epsilon)
    return masked_whiten_ref(v, mask, shift_mean, epsilon)
