"""DPO loss (and its cDPO, robust and IPO variants) from sequence log-probs of chosen/rejected completions.

Per pair i, from the summed log-probs under the policy (pc, pr) and the frozen reference (rc, rr):

    h = (pc - rc) - (pr - rr)           implicit reward margin in nats, without beta
    u = beta * h
    sigmoid (DPO; cDPO when eps > 0):  L = -(1 - eps) * logsigmoid(u) - eps * logsigmoid(-u)
                                       dL/dh = beta * (-(1 - eps) * sigmoid(-u) + eps * sigmoid(u))
    robust:   L = (-(1 - eps) * logsigmoid(u) + eps * logsigmoid(-u)) / (1 - 2 eps)
              dL/dh = beta * (-(1 - eps) * sigmoid(-u) - eps * sigmoid(u)) / (1 - 2 eps)
    ipo:      L = (h - 1 / (2 beta))^2                 dL/dh = 2 (h - 1 / (2 beta))
    loss = mean_i L_i;   d loss / d pc = d loss / d rr = dL/dh / B;   d loss / d pr = d loss / d rc = -dL/dh / B

Sources: Rafailov et al. 2023 (DPO); Mitchell 2023, "A note on DPO with noisy preferences" (cDPO); Chowdhury et al.
2024 (robust DPO); Azar et al. 2023 (IPO). The formulas and metric names are TRL's ``DPOTrainer.dpo_loss``
(``loss_type`` "sigmoid", "robust", "ipo"); OpenRLHF ``DPOLoss`` has the same cDPO sigmoid and IPO forms, Liger
``LigerFusedLinearDPOLoss`` the same robust form. Where they differ: TRL ignores ``label_smoothing`` for IPO; we
refuse the combination instead of ignoring an argument. IPO as published uses *length-averaged* log-probs (TRL averages
them for ``ipo``); like OpenRLHF we take whatever log-probs the caller passes: averaging is the caller's job.

Metrics (TRL's names), with chosen reward cr = beta * (pc - rc) and rejected reward rj = beta * (pr - rr):
``rewards/chosen`` = mean(cr), ``rewards/rejected`` = mean(rj), ``rewards/accuracies`` = mean(cr > rj),
``rewards/margins`` = mean(cr - rj).

Why a kernel: the reference is ~20 tiny launches plus autograd bookkeeping; the kernel is one launch that computes the
loss, the four metrics and the per-pair gradient (the loss is a terminal node, so the gradient is known in forward),
and the backward is one elementwise launch. ``B`` (pairs in a micro-batch) is small, so one program walks it in blocks.
Dims: ``B`` pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._backend import compute_dtype, tl, triton, use_triton
from kernels._checks import check_choice, check_positive, check_same_device, check_same_shape, check_tensor
from kernels._math import _logsigmoid, _sigmoid

DPO_LOSS_TYPES = ("sigmoid", "robust", "ipo")
DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")
_ARG_NAMES = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")


def dpo_loss_ref(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                 ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1,
                 loss_type: str = "sigmoid", label_smoothing: float = 0.0
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Plain-PyTorch DPO loss (the spec): float64 in -> float64 out, anything else computes in float32.

    Differentiable in all four inputs; returns ``(loss, metrics)`` like ``dpo_loss`` (metrics detached)."""
    check_choice("loss_type", loss_type, DPO_LOSS_TYPES)
    dtype = compute_dtype(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    pc, pr, rc, rr = (x.to(dtype) for x in (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                            ref_rejected_logps))
    chosen, rejected = pc - rc, pr - rr
    h = chosen - rejected
    eps = label_smoothing
    if loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)).square()
    elif loss_type == "sigmoid":
        u = beta * h
        losses = -(1.0 - eps) * F.logsigmoid(u) - eps * F.logsigmoid(-u)
    else:
        u = beta * h
        losses = (-(1.0 - eps) * F.logsigmoid(u) + eps * F.logsigmoid(-u)) / (1.0 - 2.0 * eps)
    with torch.no_grad():
        cr, rj = beta * chosen, beta * rejected
        metrics = {
            "rewards/chosen": cr.mean(),
            "rewards/rejected": rj.mean(),
            "rewards/accuracies": (cr > rj).to(dtype).mean(),
            "rewards/margins": (cr - rj).mean(),
        }
    return losses.mean(), metrics


@triton.jit
def _dpo_loss_fwd_kernel(
    LOSS,  # out: [] float32, mean loss
    METRICS,  # out: [4] float32, the means named in DPO_METRICS
    GRAD,  # out: [B] float32, d loss / d h_i (already divided by B)
    PC,  # [B] policy chosen log-probs, any float dtype
    PR,  # [B] policy rejected log-probs
    RC,  # [B] reference chosen log-probs
    RR,  # [B] reference rejected log-probs
    B,
    beta,
    c_pos,  # sigmoid/robust: L = -c_pos * logsigmoid(u) - c_neg * logsigmoid(-u)
    c_neg,
    inv_B,
    IS_IPO: tl.constexpr,
    BLOCK: tl.constexpr,
):
    loss_acc = tl.zeros([BLOCK], tl.float32)
    chosen_acc = tl.zeros([BLOCK], tl.float32)
    rejected_acc = tl.zeros([BLOCK], tl.float32)
    correct_acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, B, BLOCK):  # one program: B is a batch of pairs, a few blocks at most
        offs = start + tl.arange(0, BLOCK)
        valid = offs < B
        pc = tl.load(PC + offs, mask=valid, other=0.0).to(tl.float32)
        pr = tl.load(PR + offs, mask=valid, other=0.0).to(tl.float32)
        rc = tl.load(RC + offs, mask=valid, other=0.0).to(tl.float32)
        rr = tl.load(RR + offs, mask=valid, other=0.0).to(tl.float32)
        chosen = pc - rc
        rejected = pr - rr
        h = chosen - rejected
        if IS_IPO:
            d = h - 0.5 / beta
            loss = d * d
            dh = 2.0 * d
        else:
            u = beta * h
            loss = -c_pos * _logsigmoid(u) - c_neg * _logsigmoid(-u)
            dh = beta * (-c_pos * _sigmoid(-u) + c_neg * _sigmoid(u))
        tl.store(GRAD + offs, dh * inv_B, mask=valid)
        cr = beta * chosen
        rj = beta * rejected
        loss_acc += tl.where(valid, loss, 0.0)
        chosen_acc += tl.where(valid, cr, 0.0)
        rejected_acc += tl.where(valid, rj, 0.0)
        correct_acc += tl.where(valid & (cr > rj), 1.0, 0.0)
    tl.store(LOSS, tl.sum(loss_acc, axis=0) * inv_B)
    tl.store(METRICS + 0, tl.sum(chosen_acc, axis=0) * inv_B)
    tl.store(METRICS + 1, tl.sum(rejected_acc, axis=0) * inv_B)
    tl.store(METRICS + 2, tl.sum(correct_acc, axis=0) * inv_B)
    tl.store(METRICS + 3, tl.sum(chosen_acc - rejected_acc, axis=0) * inv_B)


@triton.jit
def _dpo_loss_bwd_kernel(
    DPC,  # out: [B] gradients, each in the dtype of its input (unused when its HAS_* flag is off)
    DPR,
    DRC,
    DRR,
    GRAD,  # [B] float32 d loss / d h from the forward
    DOUT,  # [] float32 upstream gradient of the loss
    B,
    HAS_POLICY_GRAD: tl.constexpr,
    HAS_REF_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < B
    g = tl.load(GRAD + offs, mask=valid, other=0.0) * tl.load(DOUT).to(tl.float32)
    if HAS_POLICY_GRAD:
        tl.store(DPC + offs, g.to(DPC.dtype.element_ty), mask=valid)
        tl.store(DPR + offs, (-g).to(DPR.dtype.element_ty), mask=valid)
    if HAS_REF_GRAD:
        tl.store(DRC + offs, (-g).to(DRC.dtype.element_ty), mask=valid)
        tl.store(DRR + offs, g.to(DRR.dtype.element_ty), mask=valid)


_MAX_BLOCK = 256


def _block(B: int) -> int:
    """Power-of-two block for B pairs: at most _MAX_BLOCK (bigger batches loop), at least 16."""
    return max(16, min(_MAX_BLOCK, triton.next_power_of_2(B)))


def _dpo_coefficients(loss_type: str, eps: float) -> tuple[float, float]:
    """``(c_pos, c_neg)`` with L = -c_pos * logsigmoid(u) - c_neg * logsigmoid(-u), computed in double on the host."""
    if loss_type == "robust":
        return (1.0 - eps) / (1.0 - 2.0 * eps), -eps / (1.0 - 2.0 * eps)
    return 1.0 - eps, eps


def _dpo_loss_fwd(pc, pr, rc, rr, beta: float, loss_type: str, eps: float):
    """Launch the forward: returns ``(loss [], metrics [4], grad [B])``, all float32."""
    B = pc.shape[0]
    loss = torch.empty((), dtype=torch.float32, device=pc.device)
    metrics = torch.empty(4, dtype=torch.float32, device=pc.device)
    grad = torch.empty(B, dtype=torch.float32, device=pc.device)
    c_pos, c_neg = _dpo_coefficients(loss_type, eps)
    _dpo_loss_fwd_kernel[(1,)](
        loss, metrics, grad, pc, pr, rc, rr, B, beta, c_pos, c_neg, 1.0 / B,
        IS_IPO=loss_type == "ipo", BLOCK=_block(B),
    )
    return loss, metrics, grad


def _dpo_loss_bwd(dloss, grad, dtypes, needs_policy: bool, needs_ref: bool):
    """Launch the backward: the four input gradients (None where not needed), each in its input's dtype."""
    B = grad.shape[0]
    outs = [torch.empty(B, dtype=dt, device=grad.device) if need else None
            for dt, need in zip(dtypes, (needs_policy, needs_policy, needs_ref, needs_ref))]
    ptrs = [o if o is not None else grad for o in outs]
    block = _block(B)
    _dpo_loss_bwd_kernel[(triton.cdiv(B, block),)](
        *ptrs, grad, dloss.contiguous(), B,
        HAS_POLICY_GRAD=needs_policy, HAS_REF_GRAD=needs_ref, BLOCK=block,
    )
    return outs


class DPOLossFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton DPO kernels: gradients computed in forward, scaled by ``dloss`` in backward."""

    @staticmethod
    def forward(ctx, pc, pr, rc, rr, beta, loss_type, eps):
        pc, pr, rc, rr = (x.contiguous() for x in (pc, pr, rc, rr))
        loss, metrics, grad = _dpo_loss_fwd(pc, pr, rc, rr, beta, loss_type, eps)
        ctx.save_for_backward(grad)
        ctx.dtypes = (pc.dtype, pr.dtype, rc.dtype, rr.dtype)
        ctx.mark_non_differentiable(metrics)
        return loss, metrics

    @staticmethod
    def backward(ctx, dloss, _dmetrics):
        (grad,) = ctx.saved_tensors
        need = ctx.needs_input_grad
        dpc, dpr, drc, drr = _dpo_loss_bwd(dloss, grad, ctx.dtypes, need[0] or need[1], need[2] or need[3])
        return dpc, dpr, drc, drr, None, None, None


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, *, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO loss over a batch of preference pairs, with TRL's reward metrics, differentiable in all four log-probs.

    Args:
        policy_chosen_logps: ``[B]`` float32/bf16/fp16/fp64, log-prob of each chosen completion under the policy,
            summed over its tokens (nats).
        policy_rejected_logps: ``[B]``, the same for the rejected completions.
        ref_chosen_logps: ``[B]``, log-probs of the chosen completions under the frozen reference model.
        ref_rejected_logps: ``[B]``, the same for the rejected completions. The reference inputs get their analytic
            gradients too (``-g`` and ``+g`` where the policy ones get ``+g`` and ``-g``); pass them detached (as
            trainers do) and none is computed.
        beta: > 0, the KL-regularisation strength (TRL/OpenRLHF default 0.1). For ``ipo`` it sets the target margin
            ``1 / (2 beta)``.
        loss_type: ``"sigmoid"`` (default: DPO, cDPO with ``label_smoothing``), ``"robust"`` or ``"ipo"``; formulas in
            the module docstring (TRL ``DPOTrainer`` semantics).
        label_smoothing: ``eps`` in ``[0, 0.5)``, the assumed probability that a label is flipped (default 0). Must
            be 0 for ``ipo``.

    Returns:
        ``(loss, metrics)``: ``loss`` is a 0-d float32 tensor (float64 for float64 inputs), the mean over the ``B``
        pairs; ``metrics`` maps ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies`` and
        ``rewards/margins`` to detached 0-d tensors of the same dtype (rewards in nats times beta; the accuracy is a
        fraction in [0, 1]). Nothing synchronises with the host.

    Raises:
        TypeError: non-tensor or non-float inputs, non-numeric ``beta``/``label_smoothing``. ValueError: inputs not
            1-D, shape or device mismatch among the four, ``B == 0``, ``beta <= 0``, NaN or infinite ``beta`` /
            ``label_smoothing``, unknown ``loss_type``, ``label_smoothing`` outside ``[0, 0.5)`` or non-zero with
            ``ipo``.
    """
    inputs = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    for name, x in zip(_ARG_NAMES, inputs):
        check_tensor(name, x, ndim=1)
    for name, x in zip(_ARG_NAMES[1:], inputs[1:]):
        check_same_shape(name, x, _ARG_NAMES[0], inputs[0])
    check_same_device(dict(zip(_ARG_NAMES, inputs)))
    if inputs[0].shape[0] == 0:
        raise ValueError("dpo_loss needs at least one pair: policy_chosen_logps has shape (0,)")
    beta = check_positive("beta", beta)
    check_choice("loss_type", loss_type, DPO_LOSS_TYPES)
    eps = check_positive("label_smoothing", label_smoothing, allow_zero=True)
    if eps >= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if loss_type == "ipo" and eps != 0.0:
        raise ValueError(f"label_smoothing must be 0 with loss_type='ipo' (IPO has no label smoothing), got {eps}")
    if use_triton("dpo_loss", *inputs):
        loss, metrics = DPOLossFunction.apply(*inputs, beta, loss_type, eps)
        return loss, dict(zip(DPO_METRICS, metrics.unbind(0)))
    return dpo_loss_ref(*inputs, beta, loss_type, eps)
