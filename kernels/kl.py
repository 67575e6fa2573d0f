"""Per-token KL penalty between the policy and a reference policy, from their log-probs of the sampled tokens.

    delta = ref_logprobs - logprobs                 (per token, float32)
    k1  = -delta = logprobs - ref_logprobs          d k1 / d lp = 1
    k2  = delta^2 / 2                               d k2 / d lp = -delta
    k3  = exp(delta) - delta - 1                    d k3 / d lp = 1 - exp(delta)
    abs = |delta|                                   d abs / d lp = sign(lp - ref)

Source: J. Schulman, "Approximating KL Divergence" (2020); the same formulas as veRL ``kl_penalty`` (aliases ``kl``,
``mse``, ``low_var_kl`` accepted), TRL's GRPO k3 and OpenRLHF ``compute_approx_kl``. Where the anchors differ:
- k3's ``delta`` is clamped to [-20, 20] before ``exp`` (veRL, OpenRLHF; TRL does not clamp): it only changes tokens whose
  log-ratio is beyond 20 nats, where the unclamped value overflows float32 anyway.
- ``max_kl`` clamps the result to [-max_kl, max_kl] (veRL and OpenRLHF use 10 for k3; TRL and Liger none, our
  default). Clamped entries get zero gradient, as ``torch.clamp`` gives.

Why a kernel: the reference is 5-8 elementwise launches and as many float32 temporaries; fused it reads lp and ref once
and writes the result once. ``_kl_value_and_grad`` is also the KL term inside the fused PPO/GRPO loss kernel, so there is
one copy of this math. Dims: any shape, typically ``[B, T]``.
"""

from __future__ import annotations

import torch

from kernels._backend import compute_dtype, tl, triton, use_triton
from kernels._checks import check_choice, check_positive, check_same_device, check_same_shape, check_tensor

KL_ESTIMATORS = ("k1", "k2", "k3", "abs")
_ALIASES = {"kl": "k1", "mse": "k2", "low_var_kl": "k3"}
_ESTIMATOR_ID = {name: i for i, name in enumerate(KL_ESTIMATORS)}
_K3_LOG_RATIO_CLAMP = 20.0


def resolve_kl_estimator(kl_estimator: str) -> str:
    """Map veRL's aliases to our names and validate; raises ``ValueError`` naming ``kl_estimator``."""
    name = _ALIASES.get(kl_estimator, kl_estimator)
    return check_choice("kl_estimator", name, KL_ESTIMATORS)


def kl_penalty_ref(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kl_estimator: str = "k3",
                   max_kl: float | None = None) -> torch.Tensor:
    """Plain-PyTorch KL penalty (the spec): float64 in -> float64 out, anything else computes in float32."""
    est = resolve_kl_estimator(kl_estimator)
    dtype = compute_dtype(logprobs, ref_logprobs)
    lp, ref = logprobs.to(dtype), ref_logprobs.to(dtype)
    if est == "k1":
        kl = lp - ref
    elif est == "k2":
        kl = 0.5 * (ref - lp).square()
    elif est == "k3":
        delta = (ref - lp).clamp(-_K3_LOG_RATIO_CLAMP, _K3_LOG_RATIO_CLAMP)
        kl = delta.exp() - delta - 1.0
    else:
        kl = (lp - ref).abs()
    if max_kl is not None:
        kl = kl.clamp(-max_kl, max_kl)
    return kl


@triton.jit
def _kl_value_and_grad(lp, ref, ESTIMATOR: tl.constexpr, HAS_MAX_KL: tl.constexpr, max_kl):
    """float32 ``(kl, d kl / d lp)`` for one block of tokens; ESTIMATOR indexes ``KL_ESTIMATORS``."""
    if ESTIMATOR == 0:
        kl = lp - ref
        dkl = tl.full(lp.shape, 1.0, tl.float32)
    elif ESTIMATOR == 1:
        kl = 0.5 * (ref - lp) * (ref - lp)
        dkl = lp - ref
    elif ESTIMATOR == 2:
        raw = ref - lp
        delta = tl.minimum(tl.maximum(raw, -20.0), 20.0)
        e = tl.exp(delta)
        kl = e - delta - 1.0
        dkl = tl.where((raw >= -20.0) & (raw <= 20.0), 1.0 - e, 0.0)
    else:
        kl = tl.abs(lp - ref)
        dkl = tl.where(lp > ref, 1.0, tl.where(lp < ref, -1.0, 0.0))
    if HAS_MAX_KL:
        dkl = tl.where((kl >= -max_kl) & (kl <= max_kl), dkl, 0.0)
        kl = tl.minimum(tl.maximum(kl, -max_kl), max_kl)
    return kl, dkl


@triton.jit
def _kl_penalty_fwd_kernel(
    KL,  # out: [N] float32
    LP,  # [N] policy log-probs, any float dtype
    REF,  # [N] reference log-probs, any float dtype
    N,
    max_kl,
    ESTIMATOR: tl.constexpr,
    HAS_MAX_KL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < N
    lp = tl.load(LP + offs, mask=valid, other=0.0).to(tl.float32)
    ref = tl.load(REF + offs, mask=valid, other=0.0).to(tl.float32)
    kl, _ = _kl_value_and_grad(lp, ref, ESTIMATOR, HAS_MAX_KL, max_kl)
    tl.store(KL + offs, kl, mask=valid)


@triton.jit
def _kl_penalty_bwd_kernel(
    DLP,  # out: [N] gradient w.r.t. logprobs, in the dtype of logprobs
    DKL,  # [N] float32 upstream gradient
    LP,
    REF,
    N,
    max_kl,
    ESTIMATOR: tl.constexpr,
    HAS_MAX_KL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < N
    lp = tl.load(LP + offs, mask=valid, other=0.0).to(tl.float32)
    ref = tl.load(REF + offs, mask=valid, other=0.0).to(tl.float32)
    dout = tl.load(DKL + offs, mask=valid, other=0.0).to(tl.float32)
    _, dkl = _kl_value_and_grad(lp, ref, ESTIMATOR, HAS_MAX_KL, max_kl)
    tl.store(DLP + offs, (dout * dkl).to(DLP.dtype.element_ty), mask=valid)


_BLOCK = 1024


def _kl_penalty_fwd(lp: torch.Tensor, ref: torch.Tensor, est: str, max_kl: float | None) -> torch.Tensor:
    lp, ref = lp.contiguous(), ref.contiguous()
    kl = torch.empty(lp.shape, dtype=torch.float32, device=lp.device)
    n = lp.numel()
    if n:
        _kl_penalty_fwd_kernel[(triton.cdiv(n, _BLOCK),)](
            kl, lp, ref, n, max_kl or 0.0, _ESTIMATOR_ID[est], max_kl is not None, BLOCK=_BLOCK
        )
    return kl


def _kl_penalty_bwd(dkl: torch.Tensor, lp: torch.Tensor, ref: torch.Tensor, est: str,
                    max_kl: float | None) -> torch.Tensor:
    dkl = dkl.contiguous()
    dlp = torch.empty_like(lp)
    n = lp.numel()
    if n:
        _kl_penalty_bwd_kernel[(triton.cdiv(n, _BLOCK),)](
            dlp, dkl, lp, ref, n, max_kl or 0.0, _ESTIMATOR_ID[est], max_kl is not None, BLOCK=_BLOCK
        )
    return dlp


class KLPenaltyFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton KL kernels; differentiable in ``logprobs`` only (the reference is frozen)."""

    @staticmethod
    def forward(ctx, logprobs, ref_logprobs, est, max_kl):
        lp, ref = logprobs.contiguous(), ref_logprobs.contiguous()
        ctx.save_for_backward(lp, ref)
        ctx.est, ctx.max_kl = est, max_kl
        return _kl_penalty_fwd(lp, ref, est, max_kl)

    @staticmethod
    def backward(ctx, dkl):
        lp, ref = ctx.saved_tensors
        return _kl_penalty_bwd(dkl, lp, ref, ctx.est, ctx.max_kl), None, None, None


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kl_estimator: str = "k3", *,
               max_kl: float | None = None) -> torch.Tensor:
    """Per-token KL estimate between the policy and the reference, differentiable in ``logprobs``.

    Args:
        logprobs: ``[B, T]`` (any shape) float32/bf16/fp16/fp64, log-probs of the sampled tokens under the policy.
        ref_logprobs: same shape, log-probs of the same tokens under the reference policy (no gradient flows to it).
        kl_estimator: ``"k1"``, ``"k2"``, ``"k3"`` (default, TRL/veRL GRPO) or ``"abs"``; veRL's aliases ``"kl"``,
            ``"mse"``, ``"low_var_kl"`` are accepted. Formulas in the module docstring.
        max_kl: if given, clamp the result to ``[-max_kl, max_kl]`` (veRL/OpenRLHF use 10); None (default) = no clamp.

    Returns:
        ``[B, T]`` float32 (float64 for float64 inputs) per-token KL in nats. Masking is the caller's job.

    Raises:
        TypeError: non-tensor or non-float inputs. ValueError: shape or device mismatch, unknown estimator,
            ``max_kl`` <= 0 or not finite (None is the way to turn the clamp off).
    """
    check_tensor("logprobs", logprobs)
    check_tensor("ref_logprobs", ref_logprobs)
    check_same_shape("ref_logprobs", ref_logprobs, "logprobs", logprobs)
    check_same_device({"logprobs": logprobs, "ref_logprobs": ref_logprobs})
    est = resolve_kl_estimator(kl_estimator)
    if max_kl is not None:
        max_kl = check_positive("max_kl", max_kl)
    if use_triton("kl_penalty", logprobs, ref_logprobs):
        return KLPenaltyFunction.apply(logprobs, ref_logprobs.detach(), est, max_kl)
    return kl_penalty_ref(logprobs, ref_logprobs.detach(), est, max_kl)
