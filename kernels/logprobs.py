"""Log-probs of the sampled tokens, and the entropy, from ``[..., V]`` logits: one read of the logits, fp32 math.

With ``s = logits / T`` (``T`` the sampling temperature) and ``y`` the label of a row:

    lse  = logsumexp_j s_j
    lp   = s_y - lse                                   = log_softmax(s)_y
    H    = lse - sum_j p_j s_j                         p = softmax(s)
    d lp / d logits_j = (1[j=y] - p_j) / T
    d H  / d logits_j = p_j (E_p[s] - s_j) / T         (E_p[s] = sum_k p_k s_k)

Rows whose label equals ``ignore_index`` give ``lp = 0`` and ``H = 0``, with zero gradient (F.cross_entropy's
``ignore_index`` semantics; the entropy is masked too, since such rows are prompt/padding positions). Such rows are
never read (the kernel returns before loading them; the reference selects them away first), so NaN/inf logits there
change no output and no gradient.

Sources: the formulas of TRL ``trl/kernels/logprob_entropy.py`` and ``selective_log_softmax``, veRL
``logprobs_from_logits`` / ``verl_F.entropy_from_logits``, Liger ``fused_selective_log_softmax`` (our
``rl_anchors.md`` b1, b3). Differences from the anchors: the temperature is applied in-kernel (never
``logits.div_(T)`` in place, as veRL and OpenRLHF callers do); the default temperature is 1.0 (Liger's is 0.9); the
backward writes a new gradient buffer (Liger writes into the logits in place).

Kernel: the forward runs one program per row (grid axis 0, up to 2**31 - 1 rows) and streams the row in ``BLOCK_V``
tiles with an online log-sum-exp. It keeps, in float32, the running max ``m`` of the *raw* logits (the max of s is
``m / T`` since ``T > 0``), ``S = sum_j e^{d_j}`` and ``U = sum_j e^{d_j} d_j`` with ``d_j = (x_j - m) / T``; then
``log S``, ``lp = (x_y - m) / T - log S`` (``x_y`` is one scalar load) and ``H = log S - U / S``. Subtracting the max
before dividing by ``T`` keeps every quantity independent of a common offset of the logits (no cancellation at
logits ~ 1e3). The per-row ``m``, ``log S`` and ``U / S`` are kept for the backward, which runs on a 2-D grid (rows on
axis 0, vocabulary tiles on axis 1: at most ``ceil(V / BLOCK_V)`` = 38 for V = 151,936) and writes each gradient
element once, in the logits' dtype. Row offsets are int64 (N * V exceeds 2**31 for real vocabularies).

On the CPU, when the compiled extension is built (``kernels._extension``), the same forward and backward run as C++
kernels (``csrc/cpu/logprobs.cpp``, ops ``logprobs_from_logits``, ``entropy_from_logits`` and
``logprobs_from_logits_backward``): rows in parallel, each row read once in vectorised blocks of 2048 elements (the
block's max first, then its ``e^d`` sums from L1), the same three saved statistics, any leading strides read in place
(only a strided last dim is copied). Without the extension (``RLHF_ENGINE_BUILD_EXT=0``, no compiler) the CPU runs
the PyTorch reference.
"""

from __future__ import annotations

import math

import torch

from kernels import _extension
from kernels._backend import compute_dtype, interpreting, select_backend, tl, triton
from kernels._checks import check_class_labels, check_positive, check_same_device, check_tensor

_LOGITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ----------------------------------------------------------------------------------------------------------- reference
def _scaled_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``(logits - max) / T`` in the compute dtype. Log-softmax and entropy are invariant to the shift; taking it
    before the division keeps the float32 reference exact for large common offsets. The max is detached, so the
    gradient is that of ``logits / T`` exactly."""
    x = logits.to(compute_dtype(logits))
    if x.shape[-1] == 0 or x.numel() == 0:
        return x / temperature
    return (x - x.amax(dim=-1, keepdim=True).detach()) / temperature


def entropy_from_logits_ref(logits: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """Plain-PyTorch entropy of ``softmax(logits / T)`` over the last dim: float64 for float64 input, else float32."""
    logp = torch.log_softmax(_scaled_logits(logits, temperature), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def logprobs_from_logits_ref(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0,
                             ignore_index: int = -100, return_entropy: bool = False):
    """Plain-PyTorch ``log_softmax(logits / T)[label]`` (the spec); ignored rows are 0 with zero gradient.

    float64 for float64 input, else float32. With ``return_entropy``, returns ``(logprobs, entropy)``."""
    valid = labels != ignore_index
    # ignored rows become 0 before the softmax: NaN logits there give neither a NaN output nor a 0 * nan gradient
    logits = torch.where(valid.unsqueeze(-1), logits, torch.zeros((), dtype=logits.dtype, device=logits.device))
    logp = torch.log_softmax(_scaled_logits(logits, temperature), dim=-1)
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()  # any in-range index: the value is masked
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    lp = torch.where(valid, logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1), zero)
    if not return_entropy:
        return lp
    entropy = torch.where(valid, -(logp.exp() * logp).sum(dim=-1), zero)
    return lp, entropy


# ------------------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _logprobs_fwd_kernel(
    LP,  # out: [N] float32 log-probs (unused when HAS_LABELS is False)
    ENT,  # out: [N] float32 entropy
    ROW_MAX,  # out: [N] float32 max of the raw logits of the row          (saved for the backward)
    LOG_SUM,  # out: [N] float32 log sum_j exp((x_j - max) / T)             (saved for the backward)
    MEAN_D,  # out: [N] float32 E_p[(x - max) / T]                         (saved for the backward)
    X,  # [N, V] logits, any float dtype; row n starts at (n // L2) * stride_b + (n % L2) * stride_t, unit column stride
    LABELS,  # [N] int32/int64 labels (unused when HAS_LABELS is False)
    V,
    L2,
    stride_b,
    stride_t,
    inv_temp,
    ignore_index,
    HAS_LABELS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + (row // L2) * stride_b + (row % L2) * stride_t
    if HAS_LABELS:
        label = tl.load(LABELS + row).to(tl.int64)
        if label == ignore_index:
            tl.store(LP + row, 0.0)
            tl.store(ENT + row, 0.0)
            tl.store(ROW_MAX + row, 0.0)
            tl.store(LOG_SUM + row, 0.0)
            tl.store(MEAN_D + row, 0.0)
            return
    cols = tl.arange(0, BLOCK_V)
    m = float("-inf")  # running max of the raw logits
    s = 0.0  # sum_j exp(d_j), d_j = (x_j - m) / T
    u = 0.0  # sum_j exp(d_j) * d_j
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        valid = offs < V
        x = tl.load(x_row + offs, mask=valid, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        shift = (m - m_new) * inv_temp  # <= 0; -inf on the first tile, where s = u = 0
        alpha = tl.exp(shift)
        d = tl.where(valid, (x - m_new) * inv_temp, 0.0)
        e = tl.where(valid, tl.exp(d), 0.0)
        # rebase u to the new max: sum e^{d-shift'}(d') = alpha * (u + shift * s); guard 0 * -inf on the first tile
        u = alpha * (u + tl.where(s > 0.0, shift, 0.0) * s) + tl.sum(e * d, axis=0)
        s = alpha * s + tl.sum(e, axis=0)
        m = m_new
    log_s = tl.log(s)
    mean_d = u / s
    tl.store(ENT + row, log_s - mean_d)
    tl.store(ROW_MAX + row, m)
    tl.store(LOG_SUM + row, log_s)
    tl.store(MEAN_D + row, mean_d)
    if HAS_LABELS:
        x_y = tl.load(x_row + label).to(tl.float32)
        tl.store(LP + row, (x_y - m) * inv_temp - log_s)


@triton.jit
def _logprobs_bwd_kernel(
    DX,  # out: [N, V] contiguous gradient w.r.t. the logits, in the logits' dtype
    X,  # [N, V] logits, addressed as in the forward
    LABELS,  # [N] labels (unused when HAS_LABELS is False)
    DLP,  # [N] upstream gradient of the log-probs (unused when HAS_DLP is False)
    DENT,  # [N] upstream gradient of the entropy (unused when HAS_DENT is False)
    ROW_MAX,
    LOG_SUM,
    MEAN_D,
    V,
    L2,
    stride_b,
    stride_t,
    inv_temp,
    ignore_index,
    HAS_LABELS: tl.constexpr,
    HAS_DLP: tl.constexpr,
    HAS_DENT: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    valid = offs < V
    dx_ptrs = DX + row * V + offs
    if HAS_LABELS:
        label = tl.load(LABELS + row).to(tl.int64)
        if label == ignore_index:
            tl.store(dx_ptrs, tl.zeros([BLOCK_V], tl.float32).to(DX.dtype.element_ty), mask=valid)
            return
    x_row = X + (row // L2) * stride_b + (row % L2) * stride_t
    x = tl.load(x_row + offs, mask=valid, other=0.0).to(tl.float32)
    d = (x - tl.load(ROW_MAX + row)) * inv_temp
    p = tl.exp(d - tl.load(LOG_SUM + row))
    grad = tl.zeros([BLOCK_V], tl.float32)
    if HAS_DENT:
        g_ent = tl.load(DENT + row).to(tl.float32)
        grad += g_ent * p * (tl.load(MEAN_D + row) - d)
    if HAS_LABELS:
        if HAS_DLP:
            g_lp = tl.load(DLP + row).to(tl.float32)
            grad += g_lp * (tl.where(offs == label, 1.0, 0.0) - p)
    tl.store(dx_ptrs, (grad * inv_temp).to(DX.dtype.element_ty), mask=valid)


# ----------------------------------------------------------------------------------------------------------- launchers
_MAX_BLOCK_V = 4096  # GPU tile: 8 KiB of bf16 per load, 16 elements per thread at 8 warps
_INTERPRET_MAX_BLOCK_V = 256  # the CPU interpreter: small tiles so that the tests exercise the multi-tile merge
_MAX_GRID_Y = 65535  # CUDA limit of grid axes 1 and 2 (axis 0 allows 2**31 - 1)


def _block_v(V: int) -> int:
    cap = _INTERPRET_MAX_BLOCK_V if interpreting() else _MAX_BLOCK_V
    return max(16, min(triton.next_power_of_2(V), cap))


def _num_warps(block: int) -> int:
    return 8 if block >= 2048 else 4 if block >= 512 else 2


def _fwd_grid(n_rows: int) -> tuple[int]:
    """One program per row, all on axis 0 (the only axis that holds more than 65,535 programs)."""
    return (n_rows,)


def _bwd_grid(n_rows: int, V: int, block: int) -> tuple[int, int]:
    """Rows on axis 0, vocabulary tiles on axis 1."""
    tiles = triton.cdiv(V, block)
    if tiles > _MAX_GRID_Y:
        raise ValueError(f"logits: vocabulary size {V} needs {tiles} tiles of {block}, more than {_MAX_GRID_Y}")
    return (n_rows, tiles)


def _row_layout(logits: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """``(x, L2, stride_b, stride_t)`` such that row ``n`` of the flattened ``[N, V]`` logits starts at element
    ``(n // L2) * stride_b + (n % L2) * stride_t`` of ``x``, with unit column stride.

    ``x`` is ``logits`` itself whenever the leading dims collapse into at most two strided levels, e.g. the common
    ``logits[:, :-1, :]`` of a ``[B, L, V]`` tensor; otherwise (or when the last dim is strided) a contiguous copy."""
    V = logits.shape[-1]
    x = logits if V <= 1 or logits.stride(-1) == 1 else logits.contiguous()
    lead = tuple(x.shape[:-1])
    n_rows = math.prod(lead)
    try:
        flat = x.view(n_rows, V)
        return x, 1, flat.stride(0), 0
    except RuntimeError:
        pass
    for k in range(len(lead) - 1, 0, -1):
        try:
            two = x.view(math.prod(lead[:k]), math.prod(lead[k:]), V)
            return x, two.shape[1], two.stride(0), two.stride(1)
        except RuntimeError:
            continue
    return x.contiguous(), 1, V, 0  # e.g. logits[:, :-1, :-1, :]: no two-level split, one copy


def _logprobs_fwd(logits: torch.Tensor, labels: torch.Tensor | None, temperature: float, ignore_index: int,
                  backend: str = "triton"):
    """Launch the forward on ``logits`` ``[..., V]``: the Triton kernel, or with ``backend="cpp"`` the compiled CPU
    kernel (``csrc/cpu/logprobs.cpp``, which reads any leading strides in place: its layout is just ``(x,)``).

    Returns ``(lp [N] or None, ent [N], stats [3, N] = (row max, log S, E_p[d]), flat labels or None, layout)``."""
    if backend == "cpp":
        x = logits if logits.shape[-1] <= 1 or logits.stride(-1) == 1 else logits.contiguous()
        flat_x = x.unsqueeze(0) if x.dim() == 1 else x
        if labels is None:
            ent, stats = _extension.op("entropy_from_logits")(flat_x, temperature)
            return None, ent, stats, None, (x,)
        flat_labels = labels.reshape(-1)
        lp, ent, stats = _extension.op("logprobs_from_logits")(flat_x, flat_labels, temperature, ignore_index)
        return lp, ent, stats, flat_labels, (x,)
    x, L2, stride_b, stride_t = _row_layout(logits)
    V = x.shape[-1]
    n_rows = math.prod(x.shape[:-1])
    dev = x.device
    ent = torch.empty(n_rows, dtype=torch.float32, device=dev)
    stats = torch.empty(3, n_rows, dtype=torch.float32, device=dev)
    lp = torch.empty(n_rows, dtype=torch.float32, device=dev) if labels is not None else None
    flat_labels = labels.reshape(-1).contiguous() if labels is not None else None
    if n_rows:
        block = _block_v(V)
        _logprobs_fwd_kernel[_fwd_grid(n_rows)](
            lp if lp is not None else ent, ent, stats[0], stats[1], stats[2], x,
            flat_labels if flat_labels is not None else ent,
            V, L2, stride_b, stride_t, 1.0 / temperature, ignore_index,
            HAS_LABELS=labels is not None, BLOCK_V=block, num_warps=_num_warps(block),
        )
    return lp, ent, stats, flat_labels, (x, L2, stride_b, stride_t)


def _logprobs_bwd(dlp: torch.Tensor | None, dent: torch.Tensor | None, flat_labels: torch.Tensor | None,
                  stats: torch.Tensor, layout, temperature: float, ignore_index: int) -> torch.Tensor:
    """Launch the backward (Triton, or the compiled CPU kernel when ``layout`` is the cpp forward's ``(x,)``);
    returns a new contiguous ``[..., V]`` gradient in the logits' dtype."""
    if len(layout) == 1:
        x = layout[0]
        flat_x = x.unsqueeze(0) if x.dim() == 1 else x
        dx = _extension.op("logprobs_from_logits_backward")(
            flat_x, flat_labels, None if dlp is None else dlp.reshape(-1),
            None if dent is None else dent.reshape(-1), stats, temperature, ignore_index)
        return dx.view(x.shape)
    x, L2, stride_b, stride_t = layout
    V = x.shape[-1]
    n_rows = math.prod(x.shape[:-1])
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if n_rows and V:
        if dlp is None and dent is None:
            return dx.zero_()
        dlp = dlp.reshape(-1).contiguous() if dlp is not None else None
        dent = dent.reshape(-1).contiguous() if dent is not None else None
        block = _block_v(V)
        _logprobs_bwd_kernel[_bwd_grid(n_rows, V, block)](
            dx, x, flat_labels if flat_labels is not None else stats,
            dlp if dlp is not None else stats, dent if dent is not None else stats,
            stats[0], stats[1], stats[2],
            V, L2, stride_b, stride_t, 1.0 / temperature, ignore_index,
            HAS_LABELS=flat_labels is not None, HAS_DLP=dlp is not None, HAS_DENT=dent is not None,
            BLOCK_V=block, num_warps=_num_warps(block),
        )
    return dx


# ------------------------------------------------------------------------------------------------------------ autograd
class LogprobsFromLogitsFunction(torch.autograd.Function):
    """Autograd wrapper of the log-prob/entropy kernels (``backend``: ``"triton"`` or ``"cpp"``); returns
    ``(logprobs, entropy)``, differentiable in ``logits`` through both."""

    @staticmethod
    def forward(ctx, logits, labels, temperature, ignore_index, backend="triton"):
        lp, ent, stats, flat_labels, layout = _logprobs_fwd(logits, labels, temperature, ignore_index, backend)
        ctx.save_for_backward(layout[0], flat_labels, stats)
        ctx.layout = layout[1:]
        ctx.temperature, ctx.ignore_index = temperature, ignore_index
        ctx.set_materialize_grads(False)
        lead = logits.shape[:-1]
        return lp.view(lead), ent.view(lead)

    @staticmethod
    def backward(ctx, dlp, dent):
        x, flat_labels, stats = ctx.saved_tensors
        dx = _logprobs_bwd(dlp, dent, flat_labels, stats, (x, *ctx.layout), ctx.temperature, ctx.ignore_index)
        return dx, None, None, None, None


class EntropyFromLogitsFunction(torch.autograd.Function):
    """Autograd wrapper of the entropy kernels (the log-prob kernels without labels; ``backend``: ``"triton"`` or
    ``"cpp"``)."""

    @staticmethod
    def forward(ctx, logits, temperature, backend="triton"):
        _, ent, stats, _, layout = _logprobs_fwd(logits, None, temperature, 0, backend)
        ctx.save_for_backward(layout[0], stats)
        ctx.layout = layout[1:]
        ctx.temperature = temperature
        ctx.set_materialize_grads(False)
        return ent.view(logits.shape[:-1])

    @staticmethod
    def backward(ctx, dent):
        x, stats = ctx.saved_tensors
        return _logprobs_bwd(None, dent, None, stats, (x, *ctx.layout), ctx.temperature, 0), None, None


# -------------------------------------------------------------------------------------------------------------- public
def check_labels(labels: object, shape: torch.Size, vocab_size: int, ignore_index: int = -100) -> torch.Tensor:
    """Validate ``labels`` for a ``[..., vocab_size]`` distribution: an int64/int32 tensor of ``shape`` with entries in
    ``[0, vocab_size)`` or equal to ``ignore_index``. Reads the labels (one host sync on a GPU). Shared with
    ``fused_linear_logprobs``."""
    return check_class_labels("labels", labels, shape, vocab_size, ignore_index)


def _check_logits(logits: object, temperature: object) -> float:
    check_tensor("logits", logits, dtypes=_LOGITS_DTYPES)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    return check_positive("temperature", temperature)  # also rejects NaN and inf


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0,
                         ignore_index: int = -100, return_entropy: bool = False):
    """Log-probability of each label under ``softmax(logits / temperature)``, optionally with the entropy.

    One pass over the logits in float32 (online log-sum-exp); the ``[..., V]`` float32 log-softmax is never
    materialised. Math and sources in the module docstring (TRL ``selective_log_softmax``, veRL
    ``logprobs_from_logits``).

    Args:
        logits: ``[..., V]`` float32/bf16/fp16 (float64 runs the float64 reference), e.g. ``[B, T, V]``. Strided
            leading dims are read in place (``logits[:, :-1, :]`` of a ``[B, L, V]`` tensor is not copied); a strided
            last dim is copied once. Never modified.
        labels: ``[...]`` int64 or int32 token ids in ``[0, V)``, the shape of ``logits`` without its last dim.
        temperature: the sampling temperature ``T`` > 0; the logits are divided by it (in-kernel, not in place).
            Default 1.0.
        ignore_index: label value of rows to skip (prompt/padding positions): their log-prob and entropy are 0 and
            their gradient is 0. Default -100, as ``F.cross_entropy``.
        return_entropy: also return the entropy (nats) of the temperature-scaled distribution of every row.

    Returns:
        ``[...]`` float32 log-probs in nats (float64 for float64 logits), or ``(logprobs, entropy)`` with
        ``return_entropy``. Both are differentiable in ``logits``; the gradient is a new tensor in the logits' dtype.

    Raises:
        TypeError: ``logits`` not a float tensor, ``labels`` not an int64/int32 tensor, ``ignore_index`` not an int,
            ``temperature`` not a number.
        ValueError: ``labels`` shape differs from ``logits.shape[:-1]``; a label outside ``[0, V)`` that is not
            ``ignore_index`` (this check reads the labels: one host-device synchronisation on a GPU); ``temperature``
            <= 0 or not finite; ``V`` = 0; inputs on different devices.
    """
    temperature = _check_logits(logits, temperature)
    check_tensor("labels", labels, dtypes=None)
    check_same_device({"logits": logits, "labels": labels})
    check_labels(labels, logits.shape[:-1], logits.shape[-1], ignore_index)
    return _logprobs_from_logits(logits, labels, temperature, ignore_index, return_entropy)


def _logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float, ignore_index: int,
                          return_entropy: bool):
    """``logprobs_from_logits`` without the input checks (no host sync): for callers that validated once, e.g. a
    chunked caller looping over row slices of already checked labels."""
    backend = select_backend("logprobs_from_logits", logits)
    if backend != "torch":
        lp, ent = LogprobsFromLogitsFunction.apply(logits, labels, temperature, ignore_index, backend)
        return (lp, ent) if return_entropy else lp
    return logprobs_from_logits_ref(logits, labels, temperature=temperature, ignore_index=ignore_index,
                                    return_entropy=return_entropy)


def entropy_from_logits(logits: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """Entropy ``H = logsumexp(s) - sum_j softmax(s)_j s_j`` of ``s = logits / temperature`` over the last dim.

    One pass over the logits in float32 (the kernel of :func:`logprobs_from_logits` without labels). Gradient
    ``dH/dlogits_j = p_j (E_p[s] - s_j) / temperature``. Source: veRL ``verl_F.entropy_from_logits``, TRL
    ``entropy_from_logits`` (module docstring).

    Args:
        logits: ``[..., V]`` float32/bf16/fp16 (float64 runs the float64 reference); strided leading dims are read
            in place; never modified.
        temperature: ``T`` > 0, default 1.0.

    Returns:
        ``[...]`` float32 entropy in nats (float64 for float64 logits), differentiable in ``logits``.

    Raises:
        TypeError: ``logits`` not a float tensor, ``temperature`` not a number.
        ValueError: ``temperature`` <= 0 or not finite; ``V`` = 0.
    """
    temperature = _check_logits(logits, temperature)
    backend = select_backend("entropy_from_logits", logits)
    if backend != "torch":
        return EntropyFromLogitsFunction.apply(logits, temperature, backend)
    return entropy_from_logits_ref(logits, temperature=temperature)
