"""Clipped value (critic) loss for PPO, fused: per-token loss, its gradient w.r.t. ``values``, aggregation and the
clip metric in one kernel (plus the one-program reduction of ``kernels.loss_agg``).

    v_clip = clamp(values, old_values - c, old_values + c)           (c = cliprange_value; no clip when None)
    l      = 0.5 * max((values - returns)^2, (v_clip - returns)^2)
    loss   = agg(l, response_mask, loss_agg_mode)           (kernels.loss_agg; seq-mean modes count non-empty rows)
    d l / d values = (values - returns) * 1[(v - R)^2 >= (v_clip - R)^2]    (ties outside the clip range split 1/2)

Source: PPO's clipped value objective as in veRL ``compute_value_loss`` (``0.5 * agg_loss(max(l1, l2))``, critic
``cliprange_value`` 0.5), OpenRLHF ``ValueLoss`` (``value_clip``, none when unset) and TRL's experimental PPO trainer.
Metrics (detached 0-d float32, token means over the local mask): ``vf_clipfrac`` = mean(clipped loss > unclipped
loss), ``vpred_mean`` = mean(values). Dims: ``B`` sequences, ``T`` response tokens.

Masked tokens are never read: NaN or inf in ``values``, ``old_values`` or ``returns`` where ``response_mask == 0``
changes neither the loss nor the metrics, and the gradient there is exactly 0.
"""

from __future__ import annotations

import torch

from kernels._backend import compute_dtype, tl, triton, use_triton
from kernels._checks import check_mask, check_positive, check_same_device, check_same_shape, check_tensor
from kernels.loss_agg import (
    agg_loss_ref,
    apply_row_weights,
    as_kernel_mask,
    check_agg_args,
    launch_token_loss,
    masked_mean_ref,
    token_tile,
)

_STATS = ("tokens", "loss", "vf_clipfrac", "vpred_mean")
METRIC_NAMES = _STATS[2:]


def value_loss_ref(values, old_values, returns, response_mask, *, cliprange_value=0.5, loss_agg_mode="token-mean",
                   global_num_tokens=None, global_num_seqs=None, loss_scale_factor=None):
    """Plain-PyTorch clipped value loss (the spec); same arguments and returns as ``value_loss``."""
    dtype = compute_dtype(values, old_values, returns)
    mask = response_mask.bool()
    zero = torch.zeros((), dtype=dtype, device=values.device)
    # masked tokens become 0 before any arithmetic: no NaN there, and a zero gradient (not 0 * nan)
    v, old, ret = (torch.where(mask, x.to(dtype), zero) for x in (values, old_values, returns))
    l1 = (v - ret).square()
    if cliprange_value is None:
        l2 = l1
        per_token = l1
    else:
        # clamp(v, lo, hi), not old + clamp(v - old): inside the range it returns v exactly, so rounding never
        # counts an unclipped token as clipped.
        v_clip = torch.clamp(v, old - cliprange_value, old + cliprange_value)
        l2 = (v_clip - ret).square()
        per_token = torch.maximum(l1, l2)
    loss = 0.5 * agg_loss_ref(per_token, mask, loss_agg_mode, global_num_tokens=global_num_tokens,
                              global_num_seqs=global_num_seqs, loss_scale_factor=loss_scale_factor)
    metrics = {"vf_clipfrac": masked_mean_ref((l2 > l1).to(dtype), mask), "vpred_mean": masked_mean_ref(v, mask)}
    return loss, {k: t.detach() for k, t in metrics.items()}


@triton.jit
def _value_loss_fwd_kernel(
    DL,  # out: [B, T] float32, masked per-token d l / d values (before the aggregation weights)
    STATS,  # out: [B, C, NSTAT] float32 per-(row, chunk) sums, in the order of _STATS
    T,
    C,  # token chunks per row (grid axis 1)
    V,  # [B, T] contiguous value predictions (any float dtype)
    OLD,  # [B, T] contiguous old value predictions
    RET,  # [B, T] contiguous returns
    MASK,  # [B, T] contiguous response mask (uint8 view of bool, or numbers)
    clip,  # cliprange_value (unused unless HAS_CLIP)
    HAS_CLIP: tl.constexpr,
    NSTAT: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    _, _, ok, offs, base = token_tile(STATS, T, C, NSTAT, BLOCK_T)
    m = tl.load(MASK + offs, mask=ok, other=0).to(tl.float32)
    # Masked tokens are never read: they load as 0, so NaN/inf there cannot reach the loss, metrics or gradient.
    live = ok & (m != 0)
    v = tl.load(V + offs, mask=live, other=0.0).to(tl.float32)
    ret = tl.load(RET + offs, mask=live, other=0.0).to(tl.float32)
    l1 = (v - ret) * (v - ret)
    if HAS_CLIP:
        old = tl.load(OLD + offs, mask=live, other=0.0).to(tl.float32)
        lo = old - clip
        hi = old + clip
        inside = (v >= lo) & (v <= hi)
        v_clip = tl.minimum(tl.maximum(v, lo), hi)
        l2 = (v_clip - ret) * (v_clip - ret)
        # d max(l1, l2) with torch's tie rule: l2 has the gradient of l1 inside the clip range and 0 outside.
        gate = tl.where(l1 > l2, 1.0, tl.where(l1 == l2, tl.where(inside, 1.0, 0.5), 0.0))
        loss = 0.5 * tl.maximum(l1, l2)
        clipped = tl.where(l2 > l1, 1.0, 0.0)
    else:
        gate = tl.full((BLOCK_T,), 1.0, tl.float32)
        loss = 0.5 * l1
        clipped = tl.zeros((BLOCK_T,), dtype=tl.float32)
    tl.store(DL + offs, m * gate * (v - ret), mask=ok)
    tl.store(base + 0, tl.sum(m, axis=0))
    tl.store(base + 1, tl.sum(m * loss, axis=0))
    tl.store(base + 2, tl.sum(m * clipped, axis=0))
    tl.store(base + 3, tl.sum(m * v, axis=0))


def _value_loss_fwd(v, old, ret, mask, clip, agg):
    """Launch the fused kernel and the aggregation; returns ``(out [NSTAT], w [B], dl [B, T])`` float32."""
    B, T = v.shape
    return launch_token_loss(_value_loss_fwd_kernel, B, T, len(_STATS), 1, agg, v.device,
                             v, old, ret, as_kernel_mask(mask), clip or 0.0, HAS_CLIP=clip is not None)


class ValueLossFunction(torch.autograd.Function):
    """Autograd wrapper of the fused value-loss kernel; differentiable in ``values`` only. The per-token gradient is
    computed in the forward and saved (``[B, T]`` float32); backward is one elementwise launch."""

    @staticmethod
    def forward(ctx, values, old_values, returns, mask, clip, agg):
        out, w, dl = _value_loss_fwd(values.contiguous(), old_values, returns, mask, clip, agg)
        ctx.save_for_backward(dl, w)
        ctx.v_dtype = values.dtype
        ctx.mark_non_differentiable(out)
        return out[1].clone(), out

    @staticmethod
    def backward(ctx, grad_loss, _grad_out):
        dl, w = ctx.saved_tensors
        return apply_row_weights(grad_loss, dl, w, ctx.v_dtype), None, None, None, None, None


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, response_mask: torch.Tensor,
               *, cliprange_value: float | None = 0.5, loss_agg_mode: str = "token-mean",
               global_num_tokens: float | None = None, global_num_seqs: float | None = None,
               loss_scale_factor: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped PPO value loss ``0.5 * agg(max((v - R)^2, (v_clip - R)^2))``, fused in one kernel.

    Args:
        values: ``[B, T]`` float32/bf16/fp16 (fp64 -> reference) current critic predictions; differentiable.
        old_values: ``[B, T]`` predictions of the critic that scored the rollout (no gradient).
        returns: ``[B, T]`` regression targets, e.g. from ``kernels.gae`` (no gradient).
        response_mask: ``[B, T]`` bool or {0, 1} numbers (a non-bool mask is checked: one host sync); tokens
            outside it are never read (zero loss, zero gradient, NaN/inf there is harmless).
        cliprange_value: clip half-width (finite, > 0; veRL's default 0.5), or None for the unclipped loss
            (OpenRLHF's default).
        loss_agg_mode, global_num_tokens, global_num_seqs, loss_scale_factor: as in ``ppo_loss`` / ``kernels.loss_agg``
            (``global_num_seqs`` defaults to the number of rows with at least one response token).

    Returns:
        ``(loss, metrics)``: ``loss`` 0-d float32 (float64 for float64 inputs), gradient in ``values.dtype``;
        ``metrics`` = ``{"vf_clipfrac", "vpred_mean"}`` detached 0-d tensors.

    Raises:
        TypeError / ValueError: wrong types, shapes or devices, a non-bool ``response_mask`` holding values other
        than 0 and 1, ``cliprange_value`` <= 0 or not finite, unknown ``loss_agg_mode``, non-positive or non-finite
        denominators.
    """
    check_tensor("values", values, ndim=2)
    for name, t in (("old_values", old_values), ("returns", returns)):
        check_tensor(name, t)
        check_same_shape(name, t, "values", values)
    check_mask("response_mask", response_mask, "values", values)
    check_same_device({"values": values, "old_values": old_values, "returns": returns,
                       "response_mask": response_mask})
    if cliprange_value is not None:
        cliprange_value = check_positive("cliprange_value", cliprange_value)
    agg = check_agg_args(loss_agg_mode, global_num_tokens, global_num_seqs, loss_scale_factor)
    if not use_triton("value_loss", values, old_values, returns):
        return value_loss_ref(values, old_values.detach(), returns.detach(), response_mask,
                              cliprange_value=cliprange_value, loss_agg_mode=agg[0], global_num_tokens=agg[1],
                              global_num_seqs=agg[2], loss_scale_factor=agg[3])
    loss, out = ValueLossFunction.apply(values, old_values.detach().contiguous(), returns.detach().contiguous(),
                                        response_mask, cliprange_value, agg)
    return loss, {name: out[i + 2] for i, name in enumerate(METRIC_NAMES)}
