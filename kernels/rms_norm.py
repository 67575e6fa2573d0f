"""RMSNorm, alone or fused with the residual add before it, with Hugging Face ``LlamaRMSNorm``'s numerics.

For a row ``x`` of ``C`` values in the model dtype ``dt`` and a weight ``w [C]``:

    r      = x + residual                                  (fused_add_rms_norm only; in dt, as HF adds the residual)
    rstd   = 1 / sqrt(mean_j(r_j^2) + eps)                 (float32)
    y      = w * round_dt(r * rstd)                        (in promote(w.dtype, dt): HF multiplies after rounding)

Source: B. Zhang and R. Sennrich, "Root Mean Square Layer Normalization" (2019), in the form of HF's
``LlamaRMSNorm.forward`` (normalise in float32, ``.to(input_dtype)``, then ``weight * ...``), shared by Llama, Qwen2,
Qwen3 (also per head, its q/k norms) and Mistral. ``rms_norm_ref`` is op for op what the generator's forward did
before this file existed, so the CPU path (which runs the reference) is bit-identical to it; float64 inputs are
normalised in float64 (the executable spec; HF would round them to float32).

Gradients (``rms_norm`` only; ``xhat = x * rstd``, ``g = dy * w``, rounding of ``xhat`` treated as the identity, as
autograd does through ``.to``):

    dx = rstd * (g - xhat * mean_j(g_j * xhat_j))          dw = sum_rows dy * round_dt(xhat)

Why a kernel: the eager RMSNorm is about seven launches (cast, pow, mean, add, rsqrt, mul, cast, mul) and as many
float32 temporaries of the activations, twice per layer, plus the residual add before each; fused, a row is read once
(twice with the residual) and written once (twice). Kernel: ``BLOCK_R`` rows per program (several when ``C`` is
small, e.g. the ``D``-sized rows of a per-head norm), the whole row in one ``BLOCK_C = next_pow2(C)`` tile (so
``C <= 65536``). Rows address the input through two strides (row ``i`` of ``x [..., K, C]`` viewed as ``[M, K, C]``
is ``x[i // K, i % K]``), so a ``[N, H, D]`` head view of a wider projection is normalised without a copy; the last dim
must be contiguous (else it is copied). Outputs are new contiguous tensors. Dims: ``M`` rows, ``C`` columns.
"""

from __future__ import annotations

import functools

import torch

from kernels._backend import compute_dtype, interpreting, tl, triton, use_triton
from kernels._checks import check_positive, check_same_device, check_tensor

MAX_COLUMNS = 65536  # the whole row lives in one tile (registers; the compiler spills above ~16K float32 values)


# ----------------------------------------------------------------------------------------------------------- reference
def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF ``LlamaRMSNorm`` in plain PyTorch: normalise ``x [..., C]`` over its last dim in float32 (float64 for
    float64 ``x``), round to ``x.dtype``, multiply by ``weight [C]``. Differentiable (autograd)."""
    xf = x.to(compute_dtype(x))
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def fused_add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm_ref(residual + x, weight, eps), residual + x)``: the residual stream is added in its own dtype."""
    residual_out = residual + x
    return rms_norm_ref(residual_out, weight, eps), residual_out


# ------------------------------------------------------------------------------------------------------------ kernels
@triton.jit
def _rms_norm_fwd_kernel(
    Y,  # out: [M, C] contiguous, promote(w, x) dtype
    RES_OUT,  # out: [M, C] contiguous, x's dtype: x + residual (written only if HAS_RESIDUAL)
    RSTD,  # out: [M] float32, 1 / rms of each row (written only if HAS_RSTD, for the backward)
    X,  # [M // K, K, C] by (stride_x0, stride_x1, 1)
    RES,  # like X, x's dtype (read only if HAS_RESIDUAL)
    W,  # [C]
    M, C, K,
    stride_x0, stride_x1, stride_r0, stride_r1,
    eps,
    HAS_RESIDUAL: tl.constexpr, HAS_RSTD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < M
    col_ok = cols < C
    mask = row_ok[:, None] & col_ok[None, :]
    outer, inner = rows // K, rows % K
    x = tl.load(X + (outer * stride_x0 + inner * stride_x1)[:, None] + cols[None, :], mask=mask, other=0.0)
    out_offs = rows[:, None] * C + cols[None, :]
    if HAS_RESIDUAL:
        res = tl.load(RES + (outer * stride_r0 + inner * stride_r1)[:, None] + cols[None, :], mask=mask, other=0.0)
        x = (x.to(tl.float32) + res.to(tl.float32)).to(X.dtype.element_ty)  # HF adds in the model dtype
        tl.store(RES_OUT + out_offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=1) / C + eps)
    xn = (xf * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)  # HF rounds before the weight
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(Y + out_offs, (w[None, :] * xn).to(Y.dtype.element_ty), mask=mask)
    if HAS_RSTD:
        tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _rms_norm_bwd_kernel(
    DX,  # out: [M, C] contiguous, x's dtype
    DW_PART,  # out: [num_programs, C] float32, this program's share of dw
    DY,  # [M, C] contiguous
    X,  # [M // K, K, C] by (stride_x0, stride_x1, 1)
    W,  # [C]
    RSTD,  # [M] float32, from the forward
    M, C, K, rows_per_program,
    stride_x0, stride_x1,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_C], tl.float32)
    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, M)
    for r0 in range(first, last, BLOCK_R):
        rows = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        row_ok = rows < last
        mask = row_ok[:, None] & col_ok[None, :]
        x_offs = ((rows // K) * stride_x0 + (rows % K) * stride_x1)[:, None] + cols[None, :]
        x = tl.load(X + x_offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        xhat = x * rstd[:, None]
        dw += tl.sum(dy * xhat.to(X.dtype.element_ty).to(tl.float32), axis=0)
        g = dy * w[None, :]
        c = tl.sum(g * xhat, axis=1) / C
        dx = (g - xhat * c[:, None]) * rstd[:, None]
        tl.store(DX + rows[:, None] * C + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PART + pid.to(tl.int64) * C + cols, dw, mask=col_ok)


# ----------------------------------------------------------------------------------------------------------- launchers
@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def tiles(C: int, M: int) -> tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_C, num_warps)`` for ``M`` rows of ``C`` columns: a tile of about 4096 values (several rows
    when rows are short), 4 warps up to 2048 values, then one warp per 512 (at most 16)."""
    block_c = triton.next_power_of_2(C)
    block_r = max(1, min(16, 4096 // block_c, triton.next_power_of_2(max(M, 1))))
    num_warps = max(4, min(16, block_r * block_c // 512))
    return block_r, block_c, num_warps


def _rows3d(t: torch.Tensor) -> torch.Tensor:
    """``t [..., K, C]`` (non-empty) as a ``[M // K, K, C]`` view with a unit column stride (a copy only when the
    leading dims cannot be merged or the last dim is strided). 1-D and 2-D inputs get ``K = 1`` (a constexpr at
    launch: no division per row)."""
    C = t.shape[-1]
    if t.dim() <= 2:
        t3 = t.reshape(-1, C)[:, None, :]
    else:
        t3 = t.reshape(-1, t.shape[-2], C)
    return t3 if t3.stride(-1) == 1 or C == 1 else t3.contiguous()


def _rms_norm_fwd(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                  save_rstd: bool = False):
    """Launch the forward; returns ``(y, residual_out or None, rstd or None, x3)`` (``x3`` the input as read)."""
    C = x.shape[-1]
    M = x.numel() // C
    y = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    res_out = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else None
    rstd = torch.empty(M, dtype=torch.float32, device=x.device) if save_rstd else None
    if M == 0:
        return y, res_out, rstd, x
    x3 = _rows3d(x)
    r3 = _rows3d(residual) if residual is not None else x3
    block_r, block_c, num_warps = tiles(C, M)
    _rms_norm_fwd_kernel[(triton.cdiv(M, block_r),)](
        y, res_out if res_out is not None else y, rstd if rstd is not None else y, x3, r3, weight.contiguous(),
        M, C, x3.shape[1], x3.stride(0), x3.stride(1), r3.stride(0), r3.stride(1), eps,
        HAS_RESIDUAL=residual is not None, HAS_RSTD=save_rstd, BLOCK_R=block_r, BLOCK_C=block_c,
        num_warps=num_warps,
    )
    return y, res_out, rstd, x3


def _rms_norm_bwd(dy: torch.Tensor, x3: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor):
    """Launch the backward; returns ``(dx [M, C] in x's dtype, dw [C] in weight's dtype)``."""
    C = x3.shape[-1]
    M = rstd.numel()
    dx = torch.empty((M, C), dtype=x3.dtype, device=x3.device)
    if M == 0:
        return dx, torch.zeros_like(weight)
    dy = dy.reshape(M, C).contiguous()
    block_r, block_c, num_warps = tiles(C, M)
    programs = 4 if interpreting() or not x3.is_cuda else 4 * _sm_count(x3.device.index or 0)
    rows_per_program = triton.cdiv(M, min(M, programs))
    grid = triton.cdiv(M, rows_per_program)
    dw_part = torch.empty((grid, C), dtype=torch.float32, device=x3.device)
    _rms_norm_bwd_kernel[(grid,)](
        dx, dw_part, dy, x3, weight.contiguous(), rstd, M, C, x3.shape[1], rows_per_program,
        x3.stride(0), x3.stride(1), BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps,
    )
    return dx, dw_part.sum(0).to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton RMSNorm: gradients for ``x`` and ``weight`` (Triton backward)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        y, _, rstd, x3 = _rms_norm_fwd(x, None, weight, eps, save_rstd=True)
        ctx.save_for_backward(x3, weight, rstd)
        ctx.x_shape = x.shape
        return y

    @staticmethod
    def backward(ctx, dy):
        x3, weight, rstd = ctx.saved_tensors
        if x3.numel() == 0:
            return torch.zeros(ctx.x_shape, dtype=x3.dtype, device=x3.device), torch.zeros_like(weight), None
        dx, dw = _rms_norm_bwd(dy, x3, weight, rstd)
        return dx.view(ctx.x_shape), dw, None


# -------------------------------------------------------------------------------------------------------------- public
def _check(x: torch.Tensor, weight: torch.Tensor, eps: float) -> float:
    check_tensor("x", x)
    check_tensor("weight", weight, ndim=1)
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dimension (the normalised one), got a 0-d tensor")
    if weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must have shape ({x.shape[-1]},) (x's last dim), got {tuple(weight.shape)}")
    if not 1 <= x.shape[-1] <= MAX_COLUMNS:
        raise ValueError(f"x's last dim must be in [1, {MAX_COLUMNS}], got {x.shape[-1]}")
    return check_positive("eps", eps, allow_zero=True)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """HF ``LlamaRMSNorm`` of ``x`` over its last dim, differentiable in ``x`` and ``weight``.

    Args:
        x: ``[..., C]`` float32/bf16/fp16/fp64 (e.g. ``[N, H]`` hidden states, or ``[N, heads, D]`` for Qwen3's
            per-head q/k norm; any strides, a contiguous last dim avoids a copy).
        weight: ``[C]``, any float dtype.
        eps: added to the mean square (``config.rms_norm_eps``); default 1e-6.

    Returns:
        ``[..., C]`` in ``promote(weight.dtype, x.dtype)`` (HF: ``weight * normed.to(x.dtype)``), a new contiguous
        tensor. Triton: normalisation in float32, then the two roundings HF does; only the float32 sum of squares and
        rsqrt differ from the reference (~1e-7 relative before rounding).

    Raises:
        TypeError: non-tensor or non-float inputs. ValueError: ``x`` 0-d or its last dim outside [1, 65536],
            ``weight`` not ``[C]``, ``eps`` negative or not finite, inputs on different devices.
    """
    eps = _check(x, weight, eps)
    check_same_device({"x": x, "weight": weight})
    if not use_triton("rms_norm", x, weight):
        return rms_norm_ref(x, weight, eps)
    if _needs_grad(x, weight):
        return RMSNormFunction.apply(x, weight, eps)
    return _rms_norm_fwd(x, None, weight, eps)[0]


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the RMSNorm after it, in one pass: ``r = residual + x`` (in their dtype),
    ``(rms_norm(r, weight, eps), r)``.

    Args:
        x: ``[..., C]`` float32/bf16/fp16/fp64, the block's output (e.g. ``o_proj`` or ``down_proj``).
        residual: same shape and dtype, the residual stream.
        weight, eps: as ``rms_norm``.

    Returns:
        ``(normed, residual_out)``: ``normed [..., C]`` in ``promote(weight.dtype, x.dtype)``, ``residual_out
        [..., C]`` in x's dtype (rounded as HF's ``hidden_states = residual + hidden_states``); both new tensors.
        For inference: when autograd needs a gradient of an input it runs the (differentiable) reference.

    Raises:
        TypeError: non-tensor or non-float inputs, ``residual`` of another dtype than ``x``. ValueError: as
            ``rms_norm``, or ``residual`` of another shape than ``x``.
    """
    eps = _check(x, weight, eps)
    check_tensor("residual", residual)
    if residual.shape != x.shape:
        raise ValueError(f"residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}")
    if residual.dtype != x.dtype:
        raise TypeError(f"residual must have x's dtype {x.dtype}, got {residual.dtype}")
    check_same_device({"x": x, "residual": residual, "weight": weight})
    if not use_triton("fused_add_rms_norm", x, residual, weight) or _needs_grad(x, residual, weight):
        return fused_add_rms_norm_ref(x, residual, weight, eps)
    y, res_out, _, _ = _rms_norm_fwd(x, residual, weight, eps)
    return y, res_out
