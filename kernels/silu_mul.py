"""The SwiGLU activation of the Llama-family MLP: ``silu(gate) * up``, in one pass.

    silu(g)  = g * sigmoid(g) = g / (1 + exp(-g))
    y        = silu(gate) * up
    dy/dgate = up * sigmoid(g) * (1 + g * (1 - sigmoid(g)))        dy/dup = silu(g)

Source: N. Shazeer, "GLU Variants Improve Transformer" (2020), SwiGLU with Swish_1 = SiLU; HF's
``LlamaMLP.forward``: ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` with ``act_fn = ACT2FN["silu"]`` (the
``hidden_act`` of every Llama/Qwen2/Qwen3/Mistral checkpoint; callers check ``config.hidden_act == "silu"``).

Numerics: ``silu_and_mul_ref`` is HF op for op (``F.silu`` in the input dtype, rounded, then the product, rounded
again). The Triton kernel computes ``silu(g) * up`` in float32 and rounds once, so in bf16/fp16 it can differ from
the reference by one unit in the last place on some elements (it is the more exact of the two); in float32 the two
differ by a few ulp (the kernel's ``exp``).

Why a kernel: eager SwiGLU is two launches and one ``[N, I]`` temporary (``silu(gate)``) per layer; fused, gate and
up are read once and the product written once. Kernel: a 2-D grid, rows on axis 0 and ``BLOCK`` column tiles on
axis 1; rows are addressed by a stride, so ``gate``/``up`` may be the two halves of a fused ``[N, 2I]`` projection
(views, no copy); the last dim must be contiguous (else it is copied). Dims: ``N`` rows (tokens), ``I`` columns
(intermediate size).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._backend import interpreting, tl, triton, use_triton
from kernels._checks import check_same_device, check_tensor


# ----------------------------------------------------------------------------------------------------------- reference
def silu_and_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """HF's SwiGLU in plain PyTorch: ``F.silu(gate) * up`` in the inputs' dtype (float64 in, float64 out)."""
    return F.silu(gate) * up


# ------------------------------------------------------------------------------------------------------------ kernels
@triton.jit
def _silu_and_mul_fwd_kernel(
    Y,  # out: [N, I] contiguous, the inputs' dtype
    GATE,  # [N, I] by (stride_g, 1)
    UP,  # [N, I] by (stride_u, 1)
    I, stride_g, stride_u,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    g = tl.load(GATE + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(Y + row * I + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _silu_and_mul_bwd_kernel(
    DGATE,  # out: [N, I] contiguous, gate's dtype
    DUP,  # out: [N, I] contiguous, up's dtype
    DY,  # [N, I] contiguous
    GATE,  # [N, I] by (stride_g, 1)
    UP,  # [N, I] by (stride_u, 1)
    I, stride_g, stride_u,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    g = tl.load(GATE + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * I + cols, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    tl.store(DGATE + row * I + cols, (dy * u * sig * (1.0 + g * (1.0 - sig))).to(DGATE.dtype.element_ty), mask=mask)
    tl.store(DUP + row * I + cols, (dy * g * sig).to(DUP.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------- launchers
_BLOCK = 1024  # 8 values per thread at 4 warps
_INTERPRET_BLOCK = 64  # the CPU interpreter: small tiles so that the tests cross tile boundaries


def _block(I: int) -> int:
    return min(_INTERPRET_BLOCK if interpreting() else _BLOCK, triton.next_power_of_2(I))


def _rows2d(t: torch.Tensor) -> torch.Tensor:
    """``t [..., I]`` as ``[N, I]`` with a unit column stride (a view when the leading dims merge)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] == 1 else t2.contiguous()


def _silu_and_mul_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    y = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if y.numel() == 0:
        return y
    g2, u2 = _rows2d(gate), _rows2d(up)
    N, I = g2.shape
    block = _block(I)
    _silu_and_mul_fwd_kernel[(N, triton.cdiv(I, block))](y, g2, u2, I, g2.stride(0), u2.stride(0), BLOCK=block)
    return y


def _silu_and_mul_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    dup = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    if dgate.numel() == 0:
        return dgate, dup
    g2, u2 = _rows2d(gate), _rows2d(up)
    N, I = g2.shape
    block = _block(I)
    _silu_and_mul_bwd_kernel[(N, triton.cdiv(I, block))](dgate, dup, dy.reshape(N, I).contiguous(), g2, u2, I,
                                                         g2.stride(0), u2.stride(0), BLOCK=block)
    return dgate, dup


class SiluAndMulFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton SwiGLU: gradients for ``gate`` and ``up`` (Triton backward)."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return _silu_and_mul_fwd(gate, up)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        return _silu_and_mul_bwd(dy, gate, up)


# -------------------------------------------------------------------------------------------------------------- public
def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (SwiGLU), differentiable in both.

    Args:
        gate: ``[..., I]`` float32/bf16/fp16/fp64, ``gate_proj(x)`` (any row stride: the first half of a fused
            gate/up projection works without a copy; a strided last dim is copied).
        up: same shape and dtype, ``up_proj(x)``.

    Returns:
        ``[..., I]`` in the inputs' dtype, a new contiguous tensor. Triton rounds once (see the module docstring:
        within one ulp of HF's two roundings in bf16/fp16).

    Raises:
        TypeError: non-tensor or non-float inputs, ``up`` of another dtype than ``gate``. ValueError: ``up`` of
            another shape, a 0-d input, inputs on different devices.
    """
    check_tensor("gate", gate)
    check_tensor("up", up)
    if gate.dim() == 0:
        raise ValueError("gate must have at least 1 dimension, got a 0-d tensor")
    if up.shape != gate.shape:
        raise ValueError(f"up must have the shape of gate {tuple(gate.shape)}, got {tuple(up.shape)}")
    if up.dtype != gate.dtype:
        raise TypeError(f"up must have gate's dtype {gate.dtype}, got {up.dtype}")
    check_same_device({"gate": gate, "up": up})
    if not use_triton("silu_and_mul", gate, up):
        return silu_and_mul_ref(gate, up)
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return SiluAndMulFunction.apply(gate, up)
    return _silu_and_mul_fwd(gate, up)
