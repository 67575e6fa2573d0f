"""Clipped PPO / GRPO policy loss, fused: ratio, clipping, dual clip, rollout IS weights, KL to the reference,
aggregation, the gradient w.r.t. ``logprobs`` and the clip/KL metrics in one kernel (plus a one-program reduction).
Three policy losses (``policy_loss``, veRL's ``loss_mode`` names; ``POLICY_LOSSES``) share the kernel, switched by a
compile-time constant: ``vanilla`` (below), ``gspo`` and ``cispo`` (after it).

Per token (``lp`` = logprobs, ``old`` = old_logprobs, ``A`` = advantages, eps_l/eps_h = clip_ratio_low/high):

    log_ratio = clamp(lp - old, -20, 20)                  (veRL, OpenRLHF; TRL does not clamp)
    r   = exp(log_ratio)
    L1  = -A * r ;  L2 = -A * clamp(r, 1 - eps_l, 1 + eps_h) ;  l = max(L1, L2)          (PPO, Schulman et al. 2017)
    dual clip (clip_ratio_c = c > 1, only where A < 0):  l = min(l, -A * c)              (Ye et al. 2020, veRL)
    l = l * rollout_is_weights                            (truncated IS correction; veRL, TRL, Liger)
    l = l + kl_coef * kl(lp, ref_logprobs)                (unclipped, not IS-weighted; TRL/Liger/veRL)
    loss = agg(l, response_mask, loss_agg_mode)           (kernels.loss_agg; seq-mean modes count non-empty rows)

Masked tokens (``response_mask == 0``) are never read: NaN or inf in any input there changes neither the loss, nor a
metric, nor the gradient, which is exactly 0 there (the kernel loads them under the mask, the reference selects them
away with ``torch.where`` before any arithmetic).

gspo (GSPO, Zheng et al. 2025, as veRL ``gspo`` writes it): one ratio per sequence, the geometric mean of its token
ratios, given to every token of the row with the token's own gradient (veRL's ``exp(lp - sg(lp) + sg(log s_i))``):

    log s_i = sum_t m*(lp - old) / max(sum_t m, 1)        (no +-20 clamp; a [B] float32 reduction run in PyTorch
                                                           before the kernel, selecting the valid tokens)
    r = exp(min(log s_i, 10))  (veRL's clamp) ; d r / d lp_t = s_i, 0 where log s_i > 10 (the clamp is active)
    then L1, L2, dual clip (if asked), IS weights and KL exactly as vanilla, with this r;
    aggregation: seq-mean-token-mean (veRL forces it; ``loss_agg_mode=None`` selects it, any other mode raises).

cispo (CISPO, MiniMax-M1 2025, as veRL ``cispo`` writes it: two-sided): the clipped ratio, detached, weighs the
log-prob of every token; no token loses its gradient to the clip:

    r = exp(clamp(lp - old, -20, 20)) ;  l = -sg(clamp(r, 1 - eps_l, 1 + eps_h)) * A * lp
    d l / d lp = -clamp(r, 1 - eps_l, 1 + eps_h) * A ;  then IS weights and KL as vanilla; no dual clip (raises).

Gradient (computed in the forward: the loss is a terminal node, so nothing needs recomputing in backward):
    d l / d lp = -A * r * 1[L1 >= L2] * 1[|lp - old| <= 20] * (dual clip gate) * isw + kl_coef * d kl / d lp

Metrics (detached 0-d float32 tensors, token means over the local ``response_mask``, no host synchronisation):
``pg_loss`` (the aggregated policy-gradient part, without the KL term), ``pg_clipfrac`` = mean(L2 > L1) (cispo:
mean(r outside [1 - eps_l, 1 + eps_h]), veRL), ``pg_clipfrac_lower`` = mean(A < 0 and max(L1, L2) > -A*c) (dual clip
active; veRL; 0 without it, so always 0 for cispo), ``ppo_kl`` = mean(old - lp) (the +-20-clamped log-ratio for
vanilla and cispo, the raw one for gspo: veRL), ``kl`` = mean(kl) (whenever ``ref_logprobs`` is given, also with
``kl_coef=0``; else 0), ``clip_ratio/low_mean`` = mean(r < 1 - eps_l and A < 0) and ``clip_ratio/high_mean`` =
mean(r > 1 + eps_h and A > 0) (TRL), with each mode's ratio r (gspo: the sequence's s_i).

Defaults: veRL ``vanilla`` (eps 0.2/0.2, token-mean; gspo: seq-mean-token-mean); veRL turns dual clip on with c = 3
by default, TRL and OpenRLHF leave it off: ours is off (``clip_ratio_c=None``). Dims: ``B`` sequences, ``T`` response
tokens.

Backends: Triton on CUDA. On the CPU, when the compiled extension is built (``kernels._extension``), the C++ kernel
``csrc/cpu/ppo_loss.cpp`` (op ``ppo_loss``) writes the same masked ``dl [B, T]`` and per-row statistics (one chunk per
row; rows in parallel, tokens in vectorised tiles, any input strides read in place, mixed input dtypes upcast to
float32 first; gspo's per-row log-ratios are an extra [B] float32 input), its ``loss_agg_rows`` op aggregates them as
``_agg_rows_kernel`` does, and the backward is ``grad * w[:, None] * dl`` in PyTorch. Without the extension (or with a
stale build whose op lacks the ``policy_loss`` argument: one warning, or an error when ``cpp`` is forced) the CPU runs
the reference ``ppo_loss_ref``.
"""

from __future__ import annotations

import warnings

import torch

from kernels import _extension
from kernels._backend import compute_dtype, forced_backend, select_backend, tl, triton
from kernels._checks import (
    check_broadcast_rows,
    check_choice,
    check_finite,
    check_mask,
    check_positive,
    check_same_device,
    check_same_shape,
    check_tensor,
)
from kernels.kl import _ESTIMATOR_ID, _kl_value_and_grad, kl_penalty_ref, resolve_kl_estimator
from kernels.loss_agg import (
    agg_loss_ref,
    aggregate_rows,
    apply_row_weights,
    as_kernel_mask,
    check_agg_args,
    launch_token_loss,
    masked_mean_ref,
    token_tile,
)

_LOG_RATIO_CLAMP = 20.0
_GSPO_LOG_RATIO_MAX = 10.0  # veRL gspo: clamp(log s_i, max=10) before exp
POLICY_LOSSES = ("vanilla", "gspo", "cispo")  # veRL loss_mode names; the kernel's POLICY_LOSS is the index
_POLICY_ID = {name: i for i, name in enumerate(POLICY_LOSSES)}
_GSPO_AGG = "seq-mean-token-mean"
# Per-(row, chunk) statistics written by the fused kernel; the first three are aggregated like the loss.
_STATS = ("tokens", "loss", "pg_loss", "pg_clipfrac", "pg_clipfrac_lower", "ppo_kl", "kl",
          "clip_ratio/low_mean", "clip_ratio/high_mean")
_N_WEIGHTED = 2  # "loss" and "pg_loss"
METRIC_NAMES = _STATS[2:]


def resolve_policy_loss(policy_loss: str, loss_agg_mode: str | None, clip_ratio_c) -> str:
    """Check ``policy_loss`` against the other options; returns the aggregation mode (``None`` -> token-mean for
    vanilla/cispo, seq-mean-token-mean for gspo). Raises ValueError for an unknown ``policy_loss``, gspo with another
    ``loss_agg_mode``, or cispo with ``clip_ratio_c``."""
    check_choice("policy_loss", policy_loss, POLICY_LOSSES)
    if policy_loss == "gspo":
        if loss_agg_mode not in (None, _GSPO_AGG):
            raise ValueError(f"policy_loss='gspo' aggregates per sequence (veRL forces it): loss_agg_mode must be "
                             f"{_GSPO_AGG!r} or None, got {loss_agg_mode!r}")
        return _GSPO_AGG
    if policy_loss == "cispo" and clip_ratio_c is not None:
        raise ValueError(f"policy_loss='cispo' has no dual clip: clip_ratio_c must be None, got {clip_ratio_c!r}")
    return "token-mean" if loss_agg_mode is None else loss_agg_mode


def seq_log_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """GSPO's ``log s_i = sum_t m*(lp - old) / max(sum_t m, 1)``: ``[B]`` float32 (float64 for float64 inputs),
    detached. Masked tokens are selected away (``torch.where``), so NaN/inf there is never summed."""
    dtype = compute_dtype(logprobs, old_logprobs)
    valid = response_mask.bool()
    diff = torch.where(valid, logprobs.detach().to(dtype) - old_logprobs.detach().to(dtype),
                       torch.zeros((), dtype=dtype, device=logprobs.device))
    return diff.sum(-1) / valid.sum(-1).to(dtype).clamp_min(1.0)


def ppo_loss_ref(logprobs, old_logprobs, advantages, response_mask, *, clip_ratio_low=0.2, clip_ratio_high=0.2,
                 clip_ratio_c=None, loss_agg_mode=None, ref_logprobs=None, kl_coef=0.0, kl_estimator="k3",
                 rollout_is_weights=None, global_num_tokens=None, global_num_seqs=None, loss_scale_factor=None,
                 policy_loss="vanilla"):
    """Plain-PyTorch PPO loss (the spec; the formulas of the module docstring, written as veRL writes them:
    ``compute_policy_loss_vanilla`` / ``_gspo`` / ``_cispo``).

    Same arguments and returns as ``ppo_loss``; computes in float64 for float64 inputs, float32 otherwise, and is
    differentiable through autograd (``torch.maximum``/``torch.minimum`` split ties evenly, as the kernel does)."""
    loss_agg_mode = resolve_policy_loss(policy_loss, loss_agg_mode, clip_ratio_c)
    dtype = compute_dtype(logprobs, old_logprobs, advantages)
    valid = response_mask.bool()
    zero = torch.zeros((), dtype=dtype, device=logprobs.device)

    def live(x):  # masked tokens become 0 before any arithmetic: no NaN there, and a zero gradient, not 0 * nan
        x = x.to(dtype)
        return torch.where(valid, x[:, None] if x.dim() == 1 else x, zero)

    lp, old, adv = live(logprobs), live(old_logprobs), live(advantages)
    mask = valid
    lo, hi = 1.0 - clip_ratio_low, 1.0 + clip_ratio_high
    if policy_loss == "gspo":  # veRL: exp(lp - sg(lp) + sg(log s_i)), clamped at 10 in log space
        log_ratio = lp - old  # unclamped (veRL gspo); ppo_kl is its mean
        log_s = log_ratio.sum(-1) / valid.sum(-1).to(dtype).clamp_min(1.0)
        ratio = (lp - lp.detach() + log_s.detach()[:, None]).clamp(max=_GSPO_LOG_RATIO_MAX).exp()
    else:
        log_ratio = (lp - old).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
        ratio = log_ratio.exp()
    if policy_loss == "cispo":  # -sg(clip(r)) * A * lp: the clip weighs the gradient, never zeroes it
        pg = -ratio.clamp(lo, hi).detach() * adv * lp
        pg_clipfrac = masked_mean_ref(((ratio < lo) | (ratio > hi)).to(dtype), mask)
        pg_clipfrac_lower = torch.zeros((), dtype=dtype, device=lp.device)
    else:
        l1 = -adv * ratio
        l2 = -adv * ratio.clamp(lo, hi)
        clipped = torch.maximum(l1, l2)
        pg_clipfrac = masked_mean_ref((l2 > l1).to(dtype), mask)
        if clip_ratio_c is not None:
            l3 = -adv * clip_ratio_c
            dual = torch.minimum(l3, clipped)
            pg_clipfrac_lower = masked_mean_ref(((clipped > l3) & (adv < 0)).to(dtype), mask)
            pg = torch.where(adv < 0, dual, clipped)
        else:
            pg_clipfrac_lower = torch.zeros((), dtype=dtype, device=lp.device)
            pg = clipped
    if rollout_is_weights is not None:
        pg = pg * live(rollout_is_weights)
    agg = dict(global_num_tokens=global_num_tokens, global_num_seqs=global_num_seqs,
               loss_scale_factor=loss_scale_factor)
    pg_loss = agg_loss_ref(pg, mask, loss_agg_mode, **agg)
    if ref_logprobs is not None:
        kl = kl_penalty_ref(lp, live(ref_logprobs.detach()), kl_estimator)
        per_token = pg + kl_coef * kl
        kl_mean = masked_mean_ref(kl, mask)
    else:
        per_token = pg
        kl_mean = torch.zeros((), dtype=dtype, device=lp.device)
    loss = agg_loss_ref(per_token, mask, loss_agg_mode, **agg)
    ratio = ratio.detach()
    metrics = {
        "pg_loss": pg_loss,
        "pg_clipfrac": pg_clipfrac,
        "pg_clipfrac_lower": pg_clipfrac_lower,
        "ppo_kl": masked_mean_ref(-log_ratio, mask),
        "kl": kl_mean,
        "clip_ratio/low_mean": masked_mean_ref(((ratio < lo) & (adv < 0)).to(dtype), mask),
        "clip_ratio/high_mean": masked_mean_ref(((ratio > hi) & (adv > 0)).to(dtype), mask),
    }
    return loss, {k: v.detach() for k, v in metrics.items()}


@triton.jit
def _ppo_loss_fwd_kernel(
    DL,  # out: [B, T] float32, masked per-token d l / d lp (before the aggregation weights)
    STATS,  # out: [B, C, NSTAT] float32 per-(row, chunk) sums, in the order of _STATS
    T,
    C,  # token chunks per row (grid axis 1)
    LP,  # [B, T] contiguous log-probs (any float dtype)
    OLD,  # [B, T] contiguous old (behaviour) log-probs
    ADV,  # advantages, element (i, t) at i * stride_adv_b + t * stride_adv_t (stride 0 for per-sequence)
    MASK,  # [B, T] contiguous response mask (uint8 view of bool, or numbers)
    REF,  # [B, T] contiguous reference log-probs (unused unless HAS_KL)
    ISW,  # rollout IS weights, element (i, t) at i * stride_isw_b + t * stride_isw_t (unused unless HAS_ISW)
    SEQ_LR,  # [B] float32 sequence log-ratios log s_i (gspo; unused unless POLICY_LOSS == 1)
    stride_adv_b,
    stride_adv_t,
    stride_isw_b,
    stride_isw_t,
    clip_low,  # 1 - clip_ratio_low
    clip_high,  # 1 + clip_ratio_high
    clip_c,  # dual-clip bound (unused unless HAS_DUAL_CLIP)
    kl_coef,
    HAS_DUAL_CLIP: tl.constexpr,
    HAS_ISW: tl.constexpr,
    HAS_KL: tl.constexpr,
    KL_ESTIMATOR: tl.constexpr,
    POLICY_LOSS: tl.constexpr,  # 0 vanilla, 1 gspo, 2 cispo (index in POLICY_LOSSES)
    NSTAT: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    row, cols, ok, offs, base = token_tile(STATS, T, C, NSTAT, BLOCK_T)
    m = tl.load(MASK + offs, mask=ok, other=0).to(tl.float32)
    # Masked tokens are never read: they load as 0, so NaN/inf there cannot reach the loss, metrics or gradient.
    live = ok & (m != 0)
    lp = tl.load(LP + offs, mask=live, other=0.0).to(tl.float32)
    old = tl.load(OLD + offs, mask=live, other=0.0).to(tl.float32)
    adv = tl.load(ADV + row.to(tl.int64) * stride_adv_b + cols * stride_adv_t, mask=live, other=0.0).to(tl.float32)

    raw = lp - old
    if POLICY_LOSS == 1:
        # gspo: the row's ratio s_i = exp(min(log s_i, 10)) on every token, d r / d lp_t = s_i (0 where clamped)
        log_s = tl.load(SEQ_LR + row) + tl.zeros((BLOCK_T,), dtype=tl.float32)
        ratio = tl.exp(tl.minimum(log_s, 10.0))
        dratio = tl.where(log_s <= 10.0, ratio, 0.0)
        neg_kl = -raw  # veRL gspo: ppo_kl of the unclamped log-ratio
    else:
        log_ratio = tl.minimum(tl.maximum(raw, -20.0), 20.0)
        ratio = tl.exp(log_ratio)
        dratio = tl.where((raw >= -20.0) & (raw <= 20.0), ratio, 0.0)
        neg_kl = -log_ratio
    if POLICY_LOSS == 2:
        # cispo: l = -sg(clip(r)) * A * lp, so d l / d lp = -clip(r) * A (no dual clip: the host refuses it)
        cr = tl.minimum(tl.maximum(ratio, clip_low), clip_high)
        pg = -cr * adv * lp
        dpg = -cr * adv
        clipfrac = tl.where((ratio < clip_low) | (ratio > clip_high), 1.0, 0.0)
        clipfrac_lower = tl.zeros((BLOCK_T,), dtype=tl.float32)
    else:
        l1 = -adv * ratio
        l2 = -adv * tl.minimum(tl.maximum(ratio, clip_low), clip_high)
        pg = tl.maximum(l1, l2)
        # d max(L1, L2): L2 only carries gradient inside the clip range, where it equals L1.
        dpg = tl.where(l1 >= l2, -adv * dratio, 0.0)
        clipfrac = tl.where(l2 > l1, 1.0, 0.0)
        if HAS_DUAL_CLIP:
            l3 = -adv * clip_c
            is_neg = adv < 0
            # torch.minimum splits a tie evenly; the kernel matches it.
            gate = tl.where(pg < l3, 1.0, tl.where(pg == l3, 0.5, 0.0))
            clipfrac_lower = tl.where(is_neg & (pg > l3), 1.0, 0.0)
            dpg = tl.where(is_neg, dpg * gate, dpg)
            pg = tl.where(is_neg, tl.minimum(pg, l3), pg)
        else:
            clipfrac_lower = tl.zeros((BLOCK_T,), dtype=tl.float32)
    if HAS_ISW:
        isw_ptrs = ISW + row.to(tl.int64) * stride_isw_b + cols * stride_isw_t
        isw = tl.load(isw_ptrs, mask=live, other=0.0).to(tl.float32)
        pg = pg * isw
        dpg = dpg * isw
    loss = pg
    dl = dpg
    if HAS_KL:
        ref = tl.load(REF + offs, mask=live, other=0.0).to(tl.float32)
        kl, dkl = _kl_value_and_grad(lp, ref, KL_ESTIMATOR, False, 0.0)
        loss = loss + kl_coef * kl
        dl = dl + kl_coef * dkl
    else:
        kl = tl.zeros((BLOCK_T,), dtype=tl.float32)
    tl.store(DL + offs, dl * m, mask=ok)

    low = tl.where((ratio < clip_low) & (adv < 0), 1.0, 0.0)
    high = tl.where((ratio > clip_high) & (adv > 0), 1.0, 0.0)
    tl.store(base + 0, tl.sum(m, axis=0))
    tl.store(base + 1, tl.sum(m * loss, axis=0))
    tl.store(base + 2, tl.sum(m * pg, axis=0))
    tl.store(base + 3, tl.sum(m * clipfrac, axis=0))
    tl.store(base + 4, tl.sum(m * clipfrac_lower, axis=0))
    tl.store(base + 5, tl.sum(m * neg_kl, axis=0))
    tl.store(base + 6, tl.sum(m * kl, axis=0))
    tl.store(base + 7, tl.sum(m * low, axis=0))
    tl.store(base + 8, tl.sum(m * high, axis=0))


def _ppo_loss_fwd(lp, old, adv, mask, ref, isw, *, clip_low, clip_high, clip_c, kl_coef, est, agg, policy,
                  backend):
    """Launch the fused kernel (Triton, or the compiled CPU kernel for ``backend="cpp"``) and the aggregation;
    returns ``(out [NSTAT], w [B], dl [B, T])`` float32. gspo first reduces the ``[B]`` sequence log-ratios in
    PyTorch (``seq_log_ratio``: one read of ``lp`` and ``old``)."""
    B, T = lp.shape
    mode = _POLICY_ID[policy]
    seq_lr = seq_log_ratio(lp, old, mask) if policy == "gspo" else None
    adv = adv.expand(B, T)  # a per-sequence [B, 1] view gets column stride 0
    isw = None if isw is None else isw.expand(B, T)
    if backend == "cpp":
        # the compiled kernel reads any strides in place but takes one dtype: mixed dtypes are upcast to float32
        floats = [lp, old, adv, ref, isw]
        if len({t.dtype for t in floats if t is not None}) > 1:
            lp, old, adv, ref, isw = (None if t is None else t.float() for t in floats)
        dl, stats = _extension.op("ppo_loss")(
            lp, old, adv, mask if mask.dtype == torch.bool else mask != 0, ref, isw, clip_low, clip_high, clip_c,
            kl_coef, est, mode, seq_lr)
        out, w = aggregate_rows(stats, _N_WEIGHTED, agg, B, T, backend="cpp")
        return out, w, dl
    lp, old = lp.contiguous(), old.contiguous()
    ref = None if ref is None else ref.contiguous()
    return launch_token_loss(
        _ppo_loss_fwd_kernel, B, T, len(_STATS), _N_WEIGHTED, agg, lp.device,
        lp, old, adv, as_kernel_mask(mask), ref if ref is not None else lp, isw if isw is not None else lp,
        seq_lr if seq_lr is not None else lp,
        adv.stride(0), adv.stride(1), isw.stride(0) if isw is not None else 0, isw.stride(1) if isw is not None else 0,
        1.0 - clip_low, 1.0 + clip_high, clip_c or 0.0, kl_coef,
        HAS_DUAL_CLIP=clip_c is not None, HAS_ISW=isw is not None, HAS_KL=ref is not None,
        KL_ESTIMATOR=_ESTIMATOR_ID[est], POLICY_LOSS=mode,
    )


_cpp_schema_ok: bool | None = None


def _cpp_has_policy_loss() -> bool:
    """Whether the loaded ``rlhf_engine::ppo_loss`` takes ``policy_loss`` (a build of the current source). A library
    compiled from an older source (e.g. loaded by a long-lived process before the source changed) would not: its
    schema is checked once, so it is never called with arguments it would misread."""
    global _cpp_schema_ok
    if _cpp_schema_ok is None:
        schema = _extension.op("ppo_loss").default._schema
        _cpp_schema_ok = any(a.name == "policy_loss" for a in schema.arguments)
    return _cpp_schema_ok


def _check_cpp_schema() -> str:
    """``"cpp"`` when the compiled op is current; else ``"torch"`` (one warning), or RuntimeError when forced."""
    if _cpp_has_policy_loss():
        return "cpp"
    msg = ("the compiled rlhf_engine::ppo_loss is a stale build without the policy_loss argument (rebuild: "
           "python -m kernels, or clear the cache under kernels._extension.build_root())")
    if forced_backend() == "cpp":
        raise RuntimeError(f"RLHF_KERNELS_BACKEND=cpp but {msg}")
    warnings.warn(f"rlhf-engine: {msg}; ppo_loss uses the PyTorch reference", RuntimeWarning, stacklevel=3)
    return "torch"


class PPOLossFunction(torch.autograd.Function):
    """Autograd wrapper of the fused PPO kernel (``kw["backend"]``: ``"triton"`` or ``"cpp"``); differentiable in
    ``logprobs`` only.

    Forward returns ``(loss, metrics_vector)``; the gradient per token is computed in the forward and saved
    (``[B, T]`` float32), so backward is one elementwise launch."""

    @staticmethod
    def forward(ctx, logprobs, old, adv, mask, ref, isw, kw):
        out, w, dl = _ppo_loss_fwd(logprobs, old, adv, mask, ref, isw, **kw)
        ctx.save_for_backward(dl, w)
        ctx.lp_dtype = logprobs.dtype
        ctx.backend = kw["backend"]
        ctx.mark_non_differentiable(out)
        return out[1].clone(), out

    @staticmethod
    def backward(ctx, grad_loss, _grad_out):
        dl, w = ctx.saved_tensors
        dx = apply_row_weights(grad_loss, dl, w, ctx.lp_dtype, ctx.backend)
        return dx, None, None, None, None, None, None


def ppo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
             response_mask: torch.Tensor, *, clip_ratio_low: float = 0.2, clip_ratio_high: float = 0.2,
             clip_ratio_c: float | None = None, loss_agg_mode: str | None = None,
             ref_logprobs: torch.Tensor | None = None, kl_coef: float = 0.0, kl_estimator: str = "k3",
             rollout_is_weights: torch.Tensor | None = None, global_num_tokens: float | None = None,
             global_num_seqs: float | None = None, loss_scale_factor: float | None = None,
             policy_loss: str = "vanilla") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped PPO policy loss (vanilla, GSPO or CISPO) with optional dual clip, rollout IS weights and KL term,
    fused in one kernel.

    Args:
        logprobs: ``[B, T]`` float32/bf16/fp16 (fp64 -> reference), log-probs of the response tokens under the
            current policy; the only differentiable input.
        old_logprobs: ``[B, T]``, log-probs under the policy that sampled them (no gradient).
        advantages: ``[B, T]`` per token, or ``[B]`` / ``[B, 1]`` per sequence (GRPO), broadcast over tokens.
        response_mask: ``[B, T]`` bool or {0, 1} numbers (a non-bool mask is checked for other values: one
            reduction and one host sync); tokens outside it are never read: zero loss, zero gradient, and NaN/inf
            in any input there is harmless.
        clip_ratio_low, clip_ratio_high: clip range ``[1 - low, 1 + high]`` of the ratio (finite, >= 0; DAPO
            clip-higher uses high = 0.28). ``clip_ratio_low`` must be <= 1.
        clip_ratio_c: dual-clip bound (finite, > 1, veRL uses 3.0) for negative advantages; None (default) = off.
            Not with ``policy_loss="cispo"``.
        loss_agg_mode: ``token-mean``, ``seq-mean-token-mean``, ``seq-mean-token-sum``,
            ``seq-mean-token-sum-norm`` (formulas in ``kernels.loss_agg``), or None (default): token-mean, and
            seq-mean-token-mean for gspo, which takes no other mode (veRL forces it).
        ref_logprobs: ``[B, T]`` reference log-probs; required when ``kl_coef`` > 0.
        kl_coef: weight (finite, >= 0) of the KL term added to every token's loss, unclipped.
        kl_estimator: ``k1``, ``k2``, ``k3`` (default) or ``abs`` (see ``kernels.kl``).
        rollout_is_weights: ``[B, T]`` or ``[B]`` importance weights (e.g. truncated pi_old / pi_rollout) multiplying
            the policy-gradient term (not the KL term); no gradient.
        global_num_tokens: token-mean denominator over the whole (global) batch; a positive finite number or
            1-element tensor (a tensor is read with ``.item()``: one host sync). Without it the local token count is
            used.
        global_num_seqs: the sequence count of the seq-mean modes over the whole batch: the number of rows with at
            least one response token (veRL/OpenRLHF). Default: that count in this call's ``response_mask`` (fully
            masked rows are excluded, never averaged in as zeros), at least 1.
        loss_scale_factor: the constant of ``seq-mean-token-sum-norm``, which divides the seq-mean of token sums
            (default ``T``; pass TRL's ``max_completion_length`` for its ``dr_grpo``).
            With global denominators, micro-batch losses sum to the full-batch loss (``kernels.loss_agg``).
        policy_loss: ``vanilla`` (default; PPO, veRL ``vanilla``), ``gspo`` (Zheng et al. 2025, veRL ``gspo``: the
            ratio of every token is its sequence's geometric mean ``s_i``) or ``cispo`` (MiniMax-M1 2025, veRL
            ``cispo``, two-sided: ``-sg(clip(r)) * A * lp``); formulas in the module docstring (``POLICY_LOSSES``).

    Returns:
        ``(loss, metrics)``: ``loss`` 0-d float32 (float64 for float64 inputs), differentiable w.r.t. ``logprobs``
        (gradient in ``logprobs.dtype``); ``metrics`` a dict of detached 0-d tensors named in the module docstring.

    Raises:
        TypeError: non-tensor or wrongly typed inputs, non-numeric hyper-parameters. ValueError: shape/device
        mismatches, a non-bool ``response_mask`` holding values other than 0 and 1, NaN or infinite
        hyper-parameters or denominators (named with their value), negative or out-of-range clip ratios,
        ``clip_ratio_c`` <= 1, ``kl_coef`` < 0 or > 0 without ``ref_logprobs``, unknown ``kl_estimator``,
        ``loss_agg_mode`` or ``policy_loss``, gspo with a ``loss_agg_mode`` other than seq-mean-token-mean, cispo
        with ``clip_ratio_c``, non-positive denominators. RuntimeError: ``RLHF_KERNELS_BACKEND=cpp`` with a stale
        compiled op (see the module docstring).
    """
    check_tensor("logprobs", logprobs, ndim=2)
    check_tensor("old_logprobs", old_logprobs)
    check_same_shape("old_logprobs", old_logprobs, "logprobs", logprobs)
    adv = check_broadcast_rows("advantages", advantages, logprobs)
    check_mask("response_mask", response_mask, "logprobs", logprobs)
    if ref_logprobs is not None:
        check_tensor("ref_logprobs", ref_logprobs)
        check_same_shape("ref_logprobs", ref_logprobs, "logprobs", logprobs)
    isw = None if rollout_is_weights is None else check_broadcast_rows("rollout_is_weights", rollout_is_weights,
                                                                       logprobs)
    check_same_device({"logprobs": logprobs, "old_logprobs": old_logprobs, "advantages": advantages,
                       "response_mask": response_mask, "ref_logprobs": ref_logprobs,
                       "rollout_is_weights": rollout_is_weights})
    check_positive("clip_ratio_low", clip_ratio_low, allow_zero=True)
    check_positive("clip_ratio_high", clip_ratio_high, allow_zero=True)
    if clip_ratio_low > 1.0:
        raise ValueError(f"clip_ratio_low must be <= 1 (the ratio's lower bound is 1 - clip_ratio_low), "
                         f"got {clip_ratio_low}")
    if clip_ratio_c is not None:
        if isinstance(clip_ratio_c, (int, float)) and not isinstance(clip_ratio_c, bool):
            check_finite("clip_ratio_c", clip_ratio_c)
        if not (isinstance(clip_ratio_c, (int, float)) and clip_ratio_c > 1.0):
            raise ValueError(f"clip_ratio_c must be a number > 1 (dual-clip lower bound) or None, "
                             f"got {clip_ratio_c!r}")
    check_positive("kl_coef", kl_coef, allow_zero=True)
    if kl_coef > 0 and ref_logprobs is None:
        raise ValueError(f"kl_coef={kl_coef} > 0 needs ref_logprobs (got None); pass kl_coef=0.0 to train without "
                         "a reference model")
    est = resolve_kl_estimator(kl_estimator)
    loss_agg_mode = resolve_policy_loss(policy_loss, loss_agg_mode, clip_ratio_c)
    agg = check_agg_args(loss_agg_mode, global_num_tokens, global_num_seqs, loss_scale_factor)
    backend = select_backend("ppo_loss", logprobs, old_logprobs, advantages, ref_logprobs, rollout_is_weights)
    if backend == "cpp":
        backend = _check_cpp_schema()
    if backend == "torch":
        return ppo_loss_ref(logprobs, old_logprobs.detach(), adv.detach(), response_mask,
                            clip_ratio_low=clip_ratio_low, clip_ratio_high=clip_ratio_high,
                            clip_ratio_c=clip_ratio_c, loss_agg_mode=agg[0], ref_logprobs=ref_logprobs,
                            kl_coef=kl_coef, kl_estimator=est,
                            rollout_is_weights=None if isw is None else isw.detach(),
                            global_num_tokens=agg[1], global_num_seqs=agg[2], loss_scale_factor=agg[3],
                            policy_loss=policy_loss)
    kw = dict(clip_low=float(clip_ratio_low), clip_high=float(clip_ratio_high),
              clip_c=None if clip_ratio_c is None else float(clip_ratio_c), kl_coef=float(kl_coef), est=est, agg=agg,
              policy=policy_loss, backend=backend)
    loss, out = PPOLossFunction.apply(
        logprobs, old_logprobs.detach(), adv.detach(), response_mask,
        None if ref_logprobs is None else ref_logprobs.detach(), None if isw is None else isw.detach(), kw,
    )
    return loss, {name: out[i + 2] for i, name in enumerate(METRIC_NAMES)}


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
              response_mask: torch.Tensor, *, kl_coef: float = 0.04, **kwargs) -> tuple[torch.Tensor, dict]:
    """GRPO policy loss: ``ppo_loss`` with the GRPO defaults (``kl_coef=0.04``, k3 KL to ``ref_logprobs``).

    ``advantages`` are usually per sequence (``[B]``, from ``kernels.group_advantages``). Every other keyword is
    ``ppo_loss``'s (same defaults: clip 0.2/0.2, token-mean, ``policy_loss="vanilla"``; ``"gspo"``/``"cispo"``
    select GSPO / CISPO). Pass ``kl_coef=0.0`` (TRL's default beta) to train
    without a reference model. Raises what ``ppo_loss`` raises."""
    return ppo_loss(logprobs, old_logprobs, advantages, response_mask, kl_coef=kl_coef, **kwargs)
