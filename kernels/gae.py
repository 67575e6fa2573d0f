"""Generalised advantage estimation (GAE) and discounted returns, one backward sweep over the response tokens.

GAE, veRL semantics (``skip_masked=True``, the default; veRL ``core_algos.compute_gae_advantage_return``). With
``r`` the token-level rewards, ``V`` the critic values and ``m`` the response mask, iterate t = T-1 .. 0 with the
state ``nv = 0`` (next value) and ``A = 0`` (running advantage):

    delta_t = r_t + gamma * nv - V_t
    A'      = delta_t + gamma * lam * A
    nv      = V_t * m_t + (1 - m_t) * nv            # a masked token leaves the state unchanged ...
    A       = A' * m_t + (1 - m_t) * A
    adv_t   = A                                     # ... and reports the carried advantage
    ret_t   = adv_t + V_t

So a masked token (padding, or a tool/observation span inside the response) is skipped: the advantage of the token
before it bootstraps from the next *unmasked* value, and the masked token itself holds the advantage carried from
the right (0 on trailing padding). The two state updates are selections (``where(m_t, new, old)``), not the products
written above, so a NaN/inf reward or value at a masked token never enters the state (``0 * nan`` would be NaN).

GAE, OpenRLHF/TRL semantics (``skip_masked=False``; OpenRLHF ``experience_maker.get_advantages_and_returns``):

    V <- V * m;  r <- r * m                         # masked tokens become zero-reward, zero-value steps
    delta_t = r_t + gamma * V_{t+1} - V_t           # V_T = 0
    A_t     = delta_t + gamma * lam * A_{t+1}       # A_T = 0
    ret_t   = A_t + V_t                             # the masked V

(computed as ``where(m, V, 0)``, ``where(m, r, 0)``: NaN/inf at masked tokens is dropped, not multiplied by 0).

Where they differ: for pure right padding the advantages are identical everywhere and the returns are identical on
the response tokens (on the padding veRL's returns hold ``V_t``, OpenRLHF's hold 0). With a masked token *inside*
the response they differ: OpenRLHF/TRL bootstrap from the zeroed value at the masked token and decay the advantage by
``gamma * lam`` per masked step, veRL carries the state across unchanged.

Neither op whitens (veRL whitens GAE advantages with ``masked_whiten`` afterwards, OpenRLHF with a global whitening):
call :func:`kernels.advantages.masked_whiten` when that is wanted.

Discounted returns (REINFORCE, REINFORCE++; veRL ``compute_reinforce_plus_plus_outcome_advantage``, OpenRLHF
``get_cumulative_returns``), t = T-1 .. 0 with ``running = 0``:

    running = r_t + gamma * running;   ret_t = running;   running = running * m_t

(the running return restarts after every masked token: for right padding, each padded token holds its own reward;
the restart is ``where(m_t, running, 0)``).

Masked inputs never leak: a NaN/inf reward or value at a masked token changes no advantage anywhere and no output at
any other token. The only outputs that read a masked token's own input are the ones documented above as holding it:
veRL's return ``adv_t + V_t`` and the discounted return ``r_t + gamma * G_{t+1}`` *at that token*.

On the CPU the compiled extension (``csrc/cpu/advantages.cpp``) runs the same sweep, rows in parallel.

Why a kernel: the reference is a Python loop of T steps, 5-8 tiny launches each (tens of thousands of launches for a
4k-token response); the kernel is one launch that keeps the state in registers and reads each input once.
These are not differentiable: advantages and returns are constants of the loss (no autograd Function).
"""

from __future__ import annotations

import numbers

import torch

from kernels import _extension
from kernels._backend import compute_dtype, select_backend, tl, triton
from kernels._checks import check_mask, check_same_device, check_same_shape, check_tensor


def _check_unit_interval(name: str, value: object) -> float:
    """Raise unless ``value`` is a real number in [0, 1]; return it as a float."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number in [0, 1], got {type(value).__name__}")
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def gae_ref(token_level_rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor,
            gamma: float = 1.0, lam: float = 1.0, skip_masked: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch GAE (the spec; formulas in the module docstring): float64 in -> float64 out, else float32."""
    dtype = compute_dtype(token_level_rewards, values)
    r, v, m = token_level_rewards.to(dtype), values.to(dtype), response_mask.bool()
    B, T = r.shape
    adv = torch.zeros((B, T), dtype=dtype, device=r.device)
    nextvalue = torch.zeros(B, dtype=dtype, device=r.device)
    lastgaelam = torch.zeros(B, dtype=dtype, device=r.device)
    if skip_masked:
        for t in reversed(range(T)):
            delta = r[:, t] + gamma * nextvalue - v[:, t]
            gae_new = delta + gamma * lam * lastgaelam
            # where, not v*m + (1-m)*nv: a NaN at a masked token must not enter the carried state
            nextvalue = torch.where(m[:, t], v[:, t], nextvalue)
            lastgaelam = torch.where(m[:, t], gae_new, lastgaelam)
            adv[:, t] = lastgaelam
        return adv, adv + v
    zero = torch.zeros((), dtype=dtype, device=r.device)
    v, r = torch.where(m, v, zero), torch.where(m, r, zero)
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * nextvalue - v[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        nextvalue = v[:, t]
        adv[:, t] = lastgaelam
    return adv, adv + v


def discounted_returns_ref(token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
                           gamma: float = 1.0) -> torch.Tensor:
    """Plain-PyTorch discounted returns (the spec): float64 in -> float64 out, else float32."""
    dtype = compute_dtype(token_level_rewards)
    r, m = token_level_rewards.to(dtype), response_mask.bool()
    B, T = r.shape
    returns = torch.zeros((B, T), dtype=dtype, device=r.device)
    running = torch.zeros(B, dtype=dtype, device=r.device)
    for t in reversed(range(T)):
        running = r[:, t] + gamma * running
        returns[:, t] = running
        running = torch.where(m[:, t], running, torch.zeros_like(running))  # restart; a masked NaN stays put
    return returns


@triton.jit
def _gae_fwd_kernel(
    ADV,  # out: [B, T] float32, contiguous
    RET,  # out: [B, T] float32, contiguous
    R,  # [B, T] token-level rewards, any float dtype, strides (stride_rb, stride_rt)
    V,  # [B, T] values, any float dtype
    M,  # [B, T] response mask, bool viewed as uint8 / int / float
    B,
    T,
    stride_rb, stride_rt, stride_vb, stride_vt, stride_mb, stride_mt,
    gamma,
    gamma_lam,
    SKIP_MASKED: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    # One program owns BLOCK_B rows and sweeps t = T-1 .. 0; the recurrence state lives in registers (float32).
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    valid = rows < B
    last = tl.zeros([BLOCK_B], tl.int64) + (T - 1)  # int64 column index, so no offset product overflows int32
    r_ptrs = R + rows * stride_rb + last * stride_rt
    v_ptrs = V + rows * stride_vb + last * stride_vt
    m_ptrs = M + rows * stride_mb + last * stride_mt
    o_offs = rows * T + last
    nextvalue = tl.zeros([BLOCK_B], tl.float32)
    lastgaelam = tl.zeros([BLOCK_B], tl.float32)
    for _ in range(0, T):
        r = tl.load(r_ptrs, mask=valid, other=0.0).to(tl.float32)
        v = tl.load(v_ptrs, mask=valid, other=0.0).to(tl.float32)
        live = tl.load(m_ptrs, mask=valid, other=0) != 0
        # selections, not products with the mask: NaN/inf at a masked token never enters the state
        if SKIP_MASKED:  # veRL
            delta = r + gamma * nextvalue - v
            gae_new = delta + gamma_lam * lastgaelam
            nextvalue = tl.where(live, v, nextvalue)
            lastgaelam = tl.where(live, gae_new, lastgaelam)
        else:  # OpenRLHF / TRL
            v = tl.where(live, v, 0.0)
            delta = tl.where(live, r, 0.0) + gamma * nextvalue - v
            lastgaelam = delta + gamma_lam * lastgaelam
            nextvalue = v
        tl.store(ADV + o_offs, lastgaelam, mask=valid)
        tl.store(RET + o_offs, lastgaelam + v, mask=valid)
        r_ptrs -= stride_rt
        v_ptrs -= stride_vt
        m_ptrs -= stride_mt
        o_offs -= 1


@triton.jit
def _discounted_returns_fwd_kernel(
    RET,  # out: [B, T] float32, contiguous
    R,  # [B, T] token-level rewards, any float dtype
    M,  # [B, T] response mask
    B,
    T,
    stride_rb, stride_rt, stride_mb, stride_mt,
    gamma,
    BLOCK_B: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    valid = rows < B
    last = tl.zeros([BLOCK_B], tl.int64) + (T - 1)
    r_ptrs = R + rows * stride_rb + last * stride_rt
    m_ptrs = M + rows * stride_mb + last * stride_mt
    o_offs = rows * T + last
    running = tl.zeros([BLOCK_B], tl.float32)
    for _ in range(0, T):
        r = tl.load(r_ptrs, mask=valid, other=0.0).to(tl.float32)
        live = tl.load(m_ptrs, mask=valid, other=0) != 0
        running = r + gamma * running
        tl.store(RET + o_offs, running, mask=valid)
        running = tl.where(live, running, 0.0)  # restart after a masked token; a NaN there stays put
        r_ptrs -= stride_rt
        m_ptrs -= stride_mt
        o_offs -= 1


def _block_b(B: int) -> int:
    # Rows per program: enough programs to spread over the SMs for typical B (256-4096), never below 16 lanes.
    return max(16, min(64, triton.next_power_of_2(max(B, 1))))


def _kernel_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool masks are read as uint8 (a free view): the same bytes, and every Triton version loads them alike."""
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def _gae_fwd(r: torch.Tensor, v: torch.Tensor, m: torch.Tensor, gamma: float, lam: float,
             skip_masked: bool) -> tuple[torch.Tensor, torch.Tensor]:
    B, T = r.shape
    adv = torch.empty((B, T), dtype=torch.float32, device=r.device)
    ret = torch.empty((B, T), dtype=torch.float32, device=r.device)
    if B and T:
        m = _kernel_mask(m)
        block_b = _block_b(B)
        _gae_fwd_kernel[(triton.cdiv(B, block_b),)](
            adv, ret, r, v, m, B, T,
            r.stride(0), r.stride(1), v.stride(0), v.stride(1), m.stride(0), m.stride(1),
            gamma, gamma * lam, SKIP_MASKED=skip_masked, BLOCK_B=block_b,
        )
    return adv, ret


def _discounted_returns_fwd(r: torch.Tensor, m: torch.Tensor, gamma: float) -> torch.Tensor:
    B, T = r.shape
    ret = torch.empty((B, T), dtype=torch.float32, device=r.device)
    if B and T:
        m = _kernel_mask(m)
        block_b = _block_b(B)
        _discounted_returns_fwd_kernel[(triton.cdiv(B, block_b),)](
            ret, r, m, B, T, r.stride(0), r.stride(1), m.stride(0), m.stride(1), gamma, BLOCK_B=block_b,
        )
    return ret


def gae(token_level_rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor, *,
        gamma: float = 1.0, lam: float = 1.0, skip_masked: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, "High-Dimensional Continuous Control Using GAE").

    Args:
        token_level_rewards: ``[B, T]`` float32/bf16/fp16/fp64 per-token rewards (e.g. ``-kl_coef * kl`` plus the
            sequence score on the last response token), in reward units.
        values: ``[B, T]`` float critic values ``V(s_t)``, same units.
        response_mask: ``[B, T]`` bool or {0, 1} numbers; 1 on the response tokens that take part. NaN/inf in the
            rewards or values of masked tokens never reaches an advantage (module docstring). A non-bool mask is
            checked for other values (one reduction, one host sync).
        gamma: discount factor in [0, 1] (default 1.0, veRL/OpenRLHF default).
        lam: GAE lambda in [0, 1] (default 1.0, veRL/OpenRLHF default).
        skip_masked: True (default) = veRL: masked tokens are skipped, the recurrence state is carried across them and
            they report the carried advantage. False = OpenRLHF/TRL: masked tokens are zero-reward, zero-value steps.
            Identical for pure right padding (returns differ only on the padding itself); see the module docstring.

    Returns:
        ``(advantages, returns)``, both ``[B, T]`` float32 (float64 when an input is float64), with
        ``returns = advantages + values`` (``where(response_mask, values, 0)`` when ``skip_masked=False``). Masked
        tokens hold the carried advantage (0 on trailing padding and on fully masked rows). Not whitened: apply
        :func:`kernels.advantages.masked_whiten` for veRL's PPO recipe. Not differentiable (no autograd graph is
        recorded through the kernel; advantages and returns are constants of the loss).

    Raises:
        TypeError: non-tensor or non-float inputs, a mask of another dtype, non-numeric ``gamma``/``lam``.
        ValueError: inputs that are not 2-D or do not share one shape or one device; ``gamma`` or ``lam`` outside
            [0, 1] (NaN and inf included); a non-bool mask holding values other than 0 and 1.
    """
    check_tensor("token_level_rewards", token_level_rewards, ndim=2)
    check_tensor("values", values, ndim=2)
    check_same_shape("values", values, "token_level_rewards", token_level_rewards)
    check_mask("response_mask", response_mask, "token_level_rewards", token_level_rewards)
    check_same_device({"token_level_rewards": token_level_rewards, "values": values,
                       "response_mask": response_mask})
    gamma = _check_unit_interval("gamma", gamma)
    lam = _check_unit_interval("lam", lam)
    skip_masked = bool(skip_masked)
    r, v = token_level_rewards.detach(), values.detach()
    backend = select_backend("gae", r, v)
    if backend == "triton":
        return _gae_fwd(r, v, response_mask, gamma, lam, skip_masked)
    if backend == "cpp" and r.dtype == v.dtype:
        return _extension.op("gae")(r, v, response_mask.bool(), gamma, lam, skip_masked)
    return gae_ref(r, v, response_mask, gamma, lam, skip_masked)


def discounted_returns(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, *,
                       gamma: float = 1.0) -> torch.Tensor:
    """Per-token discounted returns ``G_t = r_t + gamma * G_{t+1}`` restarted after masked tokens (REINFORCE++).

    Args:
        token_level_rewards: ``[B, T]`` float32/bf16/fp16/fp64 per-token rewards, in reward units.
        response_mask: ``[B, T]`` bool or {0, 1} numbers; the running return is reset to 0 after it is stored at a
            masked ``t`` (veRL ``compute_reinforce_plus_plus_outcome_advantage`` multiplies by ``m_t``; we select, so a
            NaN reward at a masked token stays at that token). A non-bool mask is checked (one host sync).
        gamma: discount factor in [0, 1] (default 1.0).

    Returns:
        ``[B, T]`` float32 (float64 for float64 rewards) returns. Not whitened (veRL/OpenRLHF REINFORCE++ whiten them
        with :func:`kernels.advantages.masked_whiten` and multiply by the mask). Not differentiable.

    Raises:
        TypeError: non-tensor or non-float rewards, a mask of another dtype, non-numeric ``gamma``.
        ValueError: rewards not 2-D, mask of another shape or device or holding values other than 0 and 1,
            ``gamma`` outside [0, 1].
    """
    check_tensor("token_level_rewards", token_level_rewards, ndim=2)
    check_mask("response_mask", response_mask, "token_level_rewards", token_level_rewards)
    check_same_device({"token_level_rewards": token_level_rewards, "response_mask": response_mask})
    gamma = _check_unit_interval("gamma", gamma)
    r = token_level_rewards.detach()
    backend = select_backend("discounted_returns", r)
    if backend == "triton":
        return _discounted_returns_fwd(r, response_mask, gamma)
    if backend == "cpp":
        return _extension.op("discounted_returns")(r, response_mask.bool(), gamma)
    return discounted_returns_ref(r, response_mask, gamma)
