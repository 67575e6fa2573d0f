"""Pairwise (Bradley-Terry) reward-model loss on chosen/rejected reward pairs, with TRL's optional reward centring.

Per pair i, with scalar rewards r_c, r_r from the reward model and an optional margin m (0 when absent):

    z = r_c - r_r - m
    L_i = -logsigmoid(z) = log(1 + exp(-z))                    d L_i / d z = -sigmoid(-z)
    loss = mean_i L_i  +  c * mean_i (r_c + r_r)^2           (the second term only with center_rewards_coefficient c)
    d loss / d r_c = (-sigmoid(-z) + 2 c (r_c + r_r)) / B
    d loss / d r_r = ( sigmoid(-z) + 2 c (r_c + r_r)) / B     (no gradient flows to the margin)

Sources: Bradley & Terry 1952; Ouyang et al. 2022 (InstructGPT RM loss); Touvron et al. 2023 (Llama 2: the margin
term). Formulas as TRL ``RewardTrainer.compute_loss`` (margin column, ``center_rewards_coefficient``, Eisenstein et
al. 2023 "Helping or herding?") and OpenRLHF ``PairWiseLoss`` (its ``LogExpLoss``, log(1 + e^(r_r - r_c)), is the
same function).

Why a kernel: as for ``dpo_loss``: one launch computes the loss and both per-pair gradients in forward (the loss is a
terminal node); the backward is one elementwise launch scaling them by the upstream gradient. Dims: ``B`` pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._backend import compute_dtype, tl, triton, use_triton
from kernels._checks import check_finite, check_positive, check_same_device, check_same_shape, check_tensor
from kernels._math import _logsigmoid, _sigmoid


def pairwise_reward_loss_ref(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                             margin: torch.Tensor | float | None = None,
                             center_rewards_coefficient: float | None = None) -> torch.Tensor:
    """Plain-PyTorch pairwise reward loss (the spec): float64 rewards -> float64, anything else float32.

    Differentiable in both rewards; a tensor ``margin`` is detached."""
    dtype = compute_dtype(chosen_rewards, rejected_rewards)
    rc, rr = chosen_rewards.to(dtype), rejected_rewards.to(dtype)
    z = rc - rr
    if isinstance(margin, torch.Tensor):
        z = z - margin.detach().to(dtype)
    elif margin is not None:
        z = z - margin
    loss = -F.logsigmoid(z).mean()
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * (rc + rr).square().mean()
    return loss


@triton.jit
def _pairwise_reward_loss_fwd_kernel(
    LOSS,  # out: [] float32, the loss
    GC,  # out: [B] float32, d loss / d chosen_rewards
    GR,  # out: [B] float32, d loss / d rejected_rewards
    RC,  # [B] chosen rewards, any float dtype
    RR,  # [B] rejected rewards
    M,  # [B] margins (read only when HAS_MARGIN_TENSOR)
    B,
    margin,  # scalar margin (used when not HAS_MARGIN_TENSOR; 0.0 for none)
    center_coef,
    inv_B,
    HAS_MARGIN_TENSOR: tl.constexpr,
    HAS_CENTER: tl.constexpr,
    BLOCK: tl.constexpr,
):
    loss_acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, B, BLOCK):  # one program: B is a batch of pairs, a few blocks at most
        offs = start + tl.arange(0, BLOCK)
        valid = offs < B
        rc = tl.load(RC + offs, mask=valid, other=0.0).to(tl.float32)
        rr = tl.load(RR + offs, mask=valid, other=0.0).to(tl.float32)
        if HAS_MARGIN_TENSOR:
            m = tl.load(M + offs, mask=valid, other=0.0).to(tl.float32)
        else:
            m = margin
        z = rc - rr - m
        loss = -_logsigmoid(z)
        dz = -_sigmoid(-z)
        gc = dz
        gr = -dz
        if HAS_CENTER:
            s = rc + rr
            loss += center_coef * s * s
            gc += 2.0 * center_coef * s
            gr += 2.0 * center_coef * s
        loss_acc += tl.where(valid, loss, 0.0)
        tl.store(GC + offs, gc * inv_B, mask=valid)
        tl.store(GR + offs, gr * inv_B, mask=valid)
    tl.store(LOSS, tl.sum(loss_acc, axis=0) * inv_B)


@triton.jit
def _pairwise_reward_loss_bwd_kernel(
    DC,  # out: [B] gradient w.r.t. chosen_rewards, in its dtype
    DR,  # out: [B] gradient w.r.t. rejected_rewards, in its dtype
    GC,  # [B] float32 per-pair gradients from the forward
    GR,
    DOUT,  # [] float32 upstream gradient of the loss
    B,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < B
    dout = tl.load(DOUT).to(tl.float32)
    gc = tl.load(GC + offs, mask=valid, other=0.0)
    gr = tl.load(GR + offs, mask=valid, other=0.0)
    tl.store(DC + offs, (gc * dout).to(DC.dtype.element_ty), mask=valid)
    tl.store(DR + offs, (gr * dout).to(DR.dtype.element_ty), mask=valid)


_MAX_BLOCK = 256


def _block(B: int) -> int:
    """Power-of-two block for B pairs: at most _MAX_BLOCK (bigger batches loop), at least 16."""
    return max(16, min(_MAX_BLOCK, triton.next_power_of_2(B)))


def _pairwise_reward_loss_fwd(rc, rr, margin, center_coef):
    """Launch the forward: returns ``(loss [], grad_chosen [B], grad_rejected [B])``, all float32."""
    B = rc.shape[0]
    loss = torch.empty((), dtype=torch.float32, device=rc.device)
    gc = torch.empty(B, dtype=torch.float32, device=rc.device)
    gr = torch.empty(B, dtype=torch.float32, device=rc.device)
    has_margin_tensor = isinstance(margin, torch.Tensor)
    _pairwise_reward_loss_fwd_kernel[(1,)](
        loss, gc, gr, rc, rr, margin.contiguous() if has_margin_tensor else rc, B,
        0.0 if has_margin_tensor or margin is None else float(margin),
        0.0 if center_coef is None else center_coef, 1.0 / B,
        HAS_MARGIN_TENSOR=has_margin_tensor, HAS_CENTER=center_coef is not None, BLOCK=_block(B),
    )
    return loss, gc, gr


def _pairwise_reward_loss_bwd(dloss, gc, gr, dtypes):
    """Launch the backward: ``(d chosen_rewards, d rejected_rewards)`` in the inputs' dtypes."""
    B = gc.shape[0]
    dc = torch.empty(B, dtype=dtypes[0], device=gc.device)
    dr = torch.empty(B, dtype=dtypes[1], device=gc.device)
    block = _block(B)
    _pairwise_reward_loss_bwd_kernel[(triton.cdiv(B, block),)](dc, dr, gc, gr, dloss.contiguous(), B, BLOCK=block)
    return dc, dr


class PairwiseRewardLossFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton pairwise reward-loss kernels; differentiable in both rewards."""

    @staticmethod
    def forward(ctx, chosen_rewards, rejected_rewards, margin, center_coef):
        loss, gc, gr = _pairwise_reward_loss_fwd(chosen_rewards.contiguous(), rejected_rewards.contiguous(),
                                                 margin, center_coef)
        ctx.save_for_backward(gc, gr)
        ctx.dtypes = (chosen_rewards.dtype, rejected_rewards.dtype)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        gc, gr = ctx.saved_tensors
        dc, dr = _pairwise_reward_loss_bwd(dloss, gc, gr, ctx.dtypes)
        return dc, dr, None, None


def pairwise_reward_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, *,
                         margin: torch.Tensor | float | None = None,
                         center_rewards_coefficient: float | None = None) -> torch.Tensor:
    """Bradley-Terry reward-model loss ``mean(-logsigmoid(r_c - r_r - margin))``, differentiable in both rewards.

    Args:
        chosen_rewards: ``[B]`` float32/bf16/fp16/fp64, the reward model's scalar score of each chosen completion
            (squeeze a ``[B, 1]`` head output first).
        rejected_rewards: ``[B]``, the scores of the rejected completions.
        margin: None (default, no margin), a float, or a ``[B]`` float tensor (Llama 2's per-pair preference margin,
            TRL's ``margin`` column) on the rewards' device. No gradient flows to it.
        center_rewards_coefficient: None (default) or ``c >= 0``: adds ``c * mean((r_c + r_r)^2)`` to push the
            rewards towards zero mean (TRL ``RewardConfig.center_rewards_coefficient``, which suggests 0.01).

    Returns:
        0-d float32 tensor (float64 for float64 rewards), the mean over the ``B`` pairs in nats. The arithmetic runs
        in the rewards' compute dtype; a float64 margin is rounded to it. Nothing synchronises with the host.

    Raises:
        TypeError: non-tensor or non-float rewards or margin tensor, non-numeric margin or coefficient.
        ValueError: rewards not 1-D, shape or device mismatch (margin included), ``B == 0``, negative coefficient,
        a NaN or infinite float ``margin`` or coefficient.
    """
    check_tensor("chosen_rewards", chosen_rewards, ndim=1)
    check_tensor("rejected_rewards", rejected_rewards, ndim=1)
    check_same_shape("rejected_rewards", rejected_rewards, "chosen_rewards", chosen_rewards)
    if isinstance(margin, torch.Tensor):
        check_tensor("margin", margin)
        check_same_shape("margin", margin, "chosen_rewards", chosen_rewards)
        margin = margin.detach()
    elif margin is not None and (not isinstance(margin, (int, float)) or isinstance(margin, bool)):
        raise TypeError(f"margin must be None, a number or a [B] tensor, got {type(margin).__name__}")
    elif margin is not None:
        margin = check_finite("margin", margin)
    check_same_device({"chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards,
                       "margin": margin if isinstance(margin, torch.Tensor) else None})
    if chosen_rewards.shape[0] == 0:
        raise ValueError("pairwise_reward_loss needs at least one pair: chosen_rewards has shape (0,)")
    if center_rewards_coefficient is not None:
        center_rewards_coefficient = check_positive("center_rewards_coefficient", center_rewards_coefficient,
                                                    allow_zero=True)
    if use_triton("pairwise_reward_loss", chosen_rewards, rejected_rewards):
        return PairwiseRewardLossFunction.apply(chosen_rewards, rejected_rewards, margin, center_rewards_coefficient)
    return pairwise_reward_loss_ref(chosen_rewards, rejected_rewards, margin, center_rewards_coefficient)
