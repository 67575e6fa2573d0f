"""Loss aggregation (``loss_agg_mode``): how per-token losses ``l[B, T]`` under a mask ``m[B, T]`` become one scalar.

    token-mean               sum_i sum_t m*l / D_tok                       D_tok = global_num_tokens, else max(sum m, 1)
    seq-mean-token-mean      sum_i (sum_t m*l / max(sum_t m, 1)) / D_seq
    seq-mean-token-sum       sum_i (sum_t m*l) / D_seq
    seq-mean-token-sum-norm  sum_i (sum_t m*l) / (D_seq * S)               S = loss_scale_factor, default T

    D_seq = global_num_seqs, else max(number of rows with sum_t m > 0, 1)

Source: veRL ``core_algos.agg_loss`` and OpenRLHF ``aggregate_loss`` (current versions): the seq-mean modes average
over the sequences that have at least one valid token (``seq_mask = mask.sum(-1) > 0``): a fully masked row adds 0 to
the numerator and is not counted in ``D_seq`` (not averaged in as a zero), unless the caller gives the count
(``global_num_seqs``, veRL's ``global_batch_size * dp_size``). veRL's ``seq-mean-token-sum-norm`` is that seq-mean of
token sums divided by ``loss_scale_factor`` (default: the padded response length ``T``; older veRL divided by the
horizon only). TRL's ``dr_grpo`` divides the token sum by ``B * max_completion_length``: the same number when every
row has a token and ``loss_scale_factor = max_completion_length``. TRL's loss types map as ``dapo``/``bnpo`` ->
token-mean, ``grpo`` -> seq-mean-token-mean, ``dr_grpo`` -> seq-mean-token-sum-norm.

Masked positions never leak: every reduction *selects* the valid tokens (``torch.where`` / ``tl.where``, or a load
masked by ``m``), it never multiplies by the mask, so NaN or inf at ``m = 0`` changes neither the loss, nor a metric,
nor any gradient (``0 * nan`` is NaN; ``where(m, nan, 0)`` is 0, with a zero gradient).

Micro-batching: with the *global* denominators given (``global_num_tokens``, ``global_num_seqs`` = the number of
non-empty rows of the whole batch, a constant ``loss_scale_factor``), the losses of the micro-batches SUM to the loss
of the whole batch, and so do their gradients: gradient accumulation and data parallelism (sum of gradients) then
reproduce the full-batch step exactly. Without them each micro-batch divides by its own counts.

Every aggregated loss is linear in the per-token losses: ``loss = sum_i w_i * sum_t m*l``, with a row weight ``w_i``
that only depends on the mask. The fused losses (``ppo_loss``, ``value_loss``) therefore compute per-token losses and
their gradients in one kernel, reduce per-row statistics, and run ``_agg_rows_kernel`` once to get the scalar, the
metrics and ``w``; backward is ``grad * w_i * dl/dx`` (``_apply_row_weights``). The compiled CPU losses
(``csrc/cpu/ppo_loss.cpp``) write the same per-row statistics and aggregate them with its ``loss_agg_rows`` op, the
CPU port of ``_agg_rows_kernel`` (``aggregate_rows(..., backend="cpp")``).
"""

from __future__ import annotations

import torch

from kernels import _extension
from kernels._backend import interpreting, tl, triton
from kernels._checks import check_choice, check_mask, check_positive, check_tensor

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
_MODE_ID = {name: i for i, name in enumerate(LOSS_AGG_MODES)}


def check_agg_args(loss_agg_mode: str, global_num_tokens, global_num_seqs, loss_scale_factor) -> tuple:
    """Validate the aggregation arguments; returns ``(mode, global_num_tokens, global_num_seqs, loss_scale_factor)``
    as Python floats (or None). A 0-d tensor denominator is read with ``.item()``: one host synchronisation.

    Raises ValueError for an unknown mode, a tensor of more than one element, or a denominator that is <= 0, NaN or
    infinite (naming it and its value); TypeError for a denominator that is not a number."""
    check_choice("loss_agg_mode", loss_agg_mode, LOSS_AGG_MODES)
    out = []
    for name, value in (("global_num_tokens", global_num_tokens), ("global_num_seqs", global_num_seqs),
                        ("loss_scale_factor", loss_scale_factor)):
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"{name} must be a number or a 1-element tensor, got shape {tuple(value.shape)}")
            value = value.item()
        out.append(None if value is None else check_positive(name, value))
    return (loss_agg_mode, *out)


def agg_loss_ref(loss_mat: torch.Tensor, mask: torch.Tensor, loss_agg_mode: str = "token-mean", *,
                 global_num_tokens: float | None = None, global_num_seqs: float | None = None,
                 loss_scale_factor: float | None = None) -> torch.Tensor:
    """Plain-PyTorch aggregation (the spec, formulas in the module docstring).

    Args:
        loss_mat: ``[B, T]`` float per-token losses; differentiable. Entries where ``mask`` is 0 are never read into
            the result (NaN/inf there is harmless, their gradient is 0).
        mask: ``[B, T]`` bool or {0, 1} numbers.
        loss_agg_mode, global_num_tokens, global_num_seqs, loss_scale_factor: as in ``ppo_loss``; the denominators
            are positive finite numbers or 1-element tensors (read with ``.item()``: one host sync each).

    Returns:
        A 0-d tensor in ``loss_mat``'s dtype.

    Raises:
        TypeError / ValueError: from ``check_agg_args``; ``loss_mat`` not a 2-D float tensor; ``mask`` of another
        shape or (a non-bool mask, one host sync) holding values other than 0 and 1.
    """
    mode, n_tok, n_seq, scale = check_agg_args(loss_agg_mode, global_num_tokens, global_num_seqs, loss_scale_factor)
    check_tensor("loss_mat", loss_mat, ndim=2)
    check_mask("mask", mask, "loss_mat", loss_mat)
    valid = mask.bool()
    row_sum = torch.where(valid, loss_mat, torch.zeros((), dtype=loss_mat.dtype, device=loss_mat.device)).sum(-1)
    row_tok = valid.sum(-1).to(loss_mat.dtype)
    if mode == "token-mean":
        return row_sum.sum() / (n_tok if n_tok is not None else row_tok.sum().clamp_min(1.0))
    # rows without a valid token are not counted (veRL / OpenRLHF seq_mask), unless the caller gives the count
    d_seq = n_seq if n_seq is not None else (row_tok > 0).sum().to(loss_mat.dtype).clamp_min(1.0)
    if mode == "seq-mean-token-mean":
        return (row_sum / row_tok.clamp_min(1.0)).sum() / d_seq
    if mode == "seq-mean-token-sum":
        return row_sum.sum() / d_seq
    return row_sum.sum() / (d_seq * (scale if scale is not None else loss_mat.shape[1]))


def masked_mean_ref(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum_{m != 0} x / max(sum(m), 1)``: the token mean used by every metric (local to the batch given). Selects
    with ``torch.where``, so NaN/inf where ``mask`` is 0 is never read. No input checks (callers validated)."""
    valid = mask.bool()
    total = torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum()
    return total / valid.sum().to(x.dtype).clamp_min(1.0)


@triton.jit
def _agg_rows_kernel(
    OUT,  # out: [NSTAT] float32; OUT[0] = local token count, OUT[1:N_WEIGHTED+1] aggregated losses, rest token means
    W,  # out: [B] float32 row weights w_i (d loss / d (sum_t m*l of row i))
    STATS,  # [B, C, NSTAT] float32 per-(row, chunk) sums; stat 0 = sum m, stats 1..N_WEIGHTED = sum m*l
    B,
    C,  # chunks per row
    n_tok,  # global token count (0 = use the local count)
    n_seq,  # global sequence count of the seq-mean modes (0 = the local count of non-empty rows)
    scale,  # loss_scale_factor for seq-mean-token-sum-norm
    NSTAT: tl.constexpr,
    N_WEIGHTED: tl.constexpr,
    MODE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    cols = tl.arange(0, BLOCK_S)
    col_ok = cols < NSTAT
    # Pass 1: local token count, local count of non-empty rows, and the plain sums of every statistic (for the
    # token-mean metrics).
    totals = tl.zeros((BLOCK_S,), dtype=tl.float32)
    nonempty = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for start in range(0, B, BLOCK_B):
        rows = start + tl.arange(0, BLOCK_B)
        ok = (rows < B)[:, None] & col_ok[None, :]
        row_stats = tl.zeros((BLOCK_B, BLOCK_S), dtype=tl.float32)
        for c in range(0, C):
            offs = (rows.to(tl.int64)[:, None] * C + c) * NSTAT + cols[None, :]
            row_stats += tl.load(STATS + offs, mask=ok, other=0.0)
        totals += tl.sum(row_stats, axis=0)
        row_tok = tl.sum(tl.where(cols[None, :] == 0, row_stats, 0.0), axis=1)
        nonempty += tl.where(row_tok > 0, 1.0, 0.0)  # rows past B load 0 tokens
    local_tok = tl.sum(tl.where(cols == 0, totals, 0.0), axis=0)
    tok_denom = tl.maximum(local_tok, 1.0)
    if n_tok > 0:
        loss_tok_denom = n_tok
    else:
        loss_tok_denom = tok_denom
    if n_seq > 0:
        seq_denom = n_seq
    else:  # veRL / OpenRLHF: fully masked rows are not counted
        seq_denom = tl.maximum(tl.sum(nonempty, axis=0), 1.0)
    # Pass 2: row weights, and the weighted sums of the loss-like statistics.
    weighted = tl.zeros((BLOCK_S,), dtype=tl.float32)
    for start in range(0, B, BLOCK_B):
        rows = start + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        ok = row_ok[:, None] & col_ok[None, :]
        row_stats = tl.zeros((BLOCK_B, BLOCK_S), dtype=tl.float32)
        for c in range(0, C):
            offs = (rows.to(tl.int64)[:, None] * C + c) * NSTAT + cols[None, :]
            row_stats += tl.load(STATS + offs, mask=ok, other=0.0)
        row_tok = tl.sum(tl.where(cols[None, :] == 0, row_stats, 0.0), axis=1)
        if MODE == 0:
            w = tl.zeros((BLOCK_B,), dtype=tl.float32) + 1.0 / loss_tok_denom
        elif MODE == 1:
            w = 1.0 / (seq_denom * tl.maximum(row_tok, 1.0))
        elif MODE == 2:
            w = tl.zeros((BLOCK_B,), dtype=tl.float32) + 1.0 / seq_denom
        else:
            w = tl.zeros((BLOCK_B,), dtype=tl.float32) + 1.0 / (seq_denom * scale)
        tl.store(W + rows, w, mask=row_ok)
        weighted += tl.sum(tl.where(row_ok[:, None], row_stats * w[:, None], 0.0), axis=0)
    is_loss = (cols >= 1) & (cols <= N_WEIGHTED)
    out = tl.where(cols == 0, local_tok, tl.where(is_loss, weighted, totals / tok_denom))
    tl.store(OUT + cols, out, mask=col_ok)


@triton.jit
def token_tile(STATS, T, C, NSTAT: tl.constexpr, BLOCK_T: tl.constexpr):
    """Prologue of the per-token loss kernels on a ``(B, C)`` grid: program ``(row, chunk)`` owns ``BLOCK_T`` tokens of
    one row. Returns ``(row, cols, ok, offs, stats_ptr)``: column indices, their validity, int64 offsets into a
    contiguous ``[B, T]`` tensor, and the address of this program's ``NSTAT`` statistics in ``STATS [B, C, NSTAT]``."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = chunk * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = cols < T
    offs = row.to(tl.int64) * T + cols
    return row, cols, ok, offs, STATS + (row.to(tl.int64) * C + chunk) * NSTAT


@triton.jit
def _apply_row_weights_kernel(
    DX,  # out: [B, T] gradient, in the dtype of the differentiated input
    DL,  # [B, T] float32 masked per-token d l / d x
    W,  # [B] float32 row weights from _agg_rows_kernel
    G,  # [1] upstream gradient of the scalar loss (read on the device: no host sync)
    T,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = cols < T
    offs = row.to(tl.int64) * T + cols
    scale = tl.load(G).to(tl.float32) * tl.load(W + row)
    d = tl.load(DL + offs, mask=ok, other=0.0)
    tl.store(DX + offs, (d * scale).to(DX.dtype.element_ty), mask=ok)


def as_kernel_mask(mask: torch.Tensor) -> torch.Tensor:
    """A contiguous mask the kernels can load: bool is viewed as uint8 (no copy), numbers pass through. The kernels
    read the other inputs of a token only where the mask is non-zero (``check_mask`` guarantees {0, 1})."""
    mask = mask.contiguous()
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def block_t(T: int) -> int:
    """Tokens per program of the per-token loss kernels (grid axis 1 = ceil(T / block_t) <= 65,535)."""
    cap = 128 if interpreting() else 1024
    return max(16, min(cap, triton.next_power_of_2(T)))


def aggregate_rows(stats: torch.Tensor, n_weighted: int, agg: tuple, B: int, T: int, backend: str = "triton"):
    """Run ``_agg_rows_kernel`` on ``stats [B, C, NSTAT]`` with ``agg`` = ``check_agg_args(...)``; returns
    ``(out [NSTAT], w [B])`` float32. ``backend="cpp"``: its CPU port, ``torch.ops.rlhf_engine.loss_agg_rows``
    (``csrc/cpu/ppo_loss.cpp``; float64 sums)."""
    mode, n_tok, n_seq, scale = agg
    if backend == "cpp":
        return _extension.op("loss_agg_rows")(stats, n_weighted, mode, n_tok, n_seq, float(scale or T))
    nstat = stats.shape[-1]
    out = torch.empty(nstat, dtype=torch.float32, device=stats.device)
    w = torch.empty(B, dtype=torch.float32, device=stats.device)
    _agg_rows_kernel[(1,)](
        out, w, stats, B, stats.shape[1], float(n_tok or 0.0), float(n_seq or 0.0), float(scale or T),
        NSTAT=nstat, N_WEIGHTED=n_weighted, MODE=_MODE_ID[mode],
        BLOCK_B=32 if interpreting() else 256, BLOCK_S=triton.next_power_of_2(nstat),
    )
    return out, w


def launch_token_loss(kernel, B: int, T: int, nstat: int, n_weighted: int, agg: tuple, device: torch.device,
                      *args, **meta) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run a fused per-token loss kernel and the aggregation.

    ``kernel(DL, STATS, T, C, *args, **meta, NSTAT=, BLOCK_T=)`` runs on a ``(B, C)`` grid and writes the masked
    per-token gradient ``DL [B, T]`` and per-chunk sums ``STATS [B, C, nstat]`` (layout of ``_agg_rows_kernel``).
    Returns ``(out [nstat], w [B], dl [B, T])`` float32."""
    bt = block_t(T)
    C = triton.cdiv(T, bt)
    dl = torch.empty((B, T), dtype=torch.float32, device=device)
    stats = torch.empty((B, C, nstat), dtype=torch.float32, device=device)
    if B * T:
        kernel[(B, C)](dl, stats, T, C, *args, NSTAT=nstat, BLOCK_T=bt, **meta)
    out, w = aggregate_rows(stats, n_weighted, agg, B, T)
    return out, w, dl


def apply_row_weights(grad: torch.Tensor, dl: torch.Tensor, w: torch.Tensor, dtype: torch.dtype,
                      backend: str = "triton") -> torch.Tensor:
    """``grad * w[:, None] * dl`` in one launch, cast to ``dtype`` (the gradient of the differentiated input).
    ``backend="cpp"`` (the compiled CPU losses): the same product as a PyTorch expression (two elementwise ops)."""
    if backend == "cpp":
        return (dl * (grad.reshape(1).float() * w)[:, None]).to(dtype)
    B, T = dl.shape
    dx = torch.empty((B, T), dtype=dtype, device=dl.device)
    if dx.numel():
        bt = block_t(T)
        _apply_row_weights_kernel[(B, triton.cdiv(T, bt))](dx, dl, w, grad.reshape(1).float(), T, BLOCK_T=bt)
    return dx
