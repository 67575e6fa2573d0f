"""Log-probs (and entropy) of the labels straight from hidden states and the LM head, without materialising the
``[N, V]`` logits: tokens are processed in chunks of ``C`` rows, so the extra memory is two ``[C, V]`` float32 tiles
(about ``chunk_elems * 8`` bytes) plus, when the head is trainable, the float32 ``[V, H]`` gradient accumulator.

    z = hidden @ weight.T + bias          (float32 accumulation; bf16/fp16 inputs are never rounded to logits dtype)
    logprobs = log_softmax(z / temperature)[labels],   entropy = H(softmax(z / temperature))

Forward, per chunk: one GEMM into a float32 tile, then ``logprobs_from_logits``'s fused kernel (one read of the tile).
Backward, per chunk: recompute the tile (the 2NHV recompute of TRL/Liger/veRL: cheaper in memory than saving the
logits), run the same kernel's backward to get ``dz`` (float32), then ``dh = dz @ W`` and ``dW += dz.T @ h``
(accumulated in place: no ``[V, H]`` temporary per chunk), ``db += sum(dz)``, all in float32 ("rounding every
vocabulary chunk's product to bf16 before summing biases training", TRL ``chunked_logprob``). One copy of the softmax
math: ``kernels.logprobs``.

A call whose ``N`` tokens fit in one chunk keeps its tile from the forward for the backward instead of recomputing it
(one GEMM of four saved; the tile, at most the chunk budget, lives from the forward to the backward): the small
micro-batches of a CPU run, where the recompute made the fused path slower than eager PyTorch.

Dims: ``N`` tokens, ``H`` hidden, ``V`` vocabulary, ``C`` tokens per chunk.
"""

from __future__ import annotations

import torch

from kernels._checks import check_positive, check_same_device, check_tensor
from kernels.logprobs import _logprobs_from_logits, check_labels, logprobs_from_logits_ref

_DEFAULT_CHUNK_ELEMS = 1 << 25  # 32M float32 logits per tile = 128 MiB (x2 with dz in backward)


def fused_linear_logprobs_ref(hidden, weight, labels, *, bias=None, temperature=1.0, ignore_index=-100,
                              return_entropy=False):
    """Plain-PyTorch reference: materialises the logits (in float64 for float64 inputs, float32 otherwise). Rows at
    ``ignore_index`` are zeroed before the product, so NaN/inf hidden states there reach no gradient (``0 * nan``)."""
    dtype = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32
    keep = (labels != ignore_index).unsqueeze(-1)
    hidden = torch.where(keep, hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device))
    logits = hidden.to(dtype) @ weight.to(dtype).t()
    if bias is not None:
        logits = logits + bias.to(dtype)
    return logprobs_from_logits_ref(logits, labels, temperature=temperature, ignore_index=ignore_index,
                                    return_entropy=return_entropy)


def _matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with a float32 result and float32 accumulation.

    On CUDA with a bf16/fp16 operand, both go to that dtype and cuBLAS writes float32 (``out_dtype``, torch >= 2.8):
    tensor-core speed, no float32 copy of the ``[V, H]`` weight (a float32 ``dz`` is rounded to bf16 first, as TRL
    and plain bf16 autograd do). Elsewhere the operands are rounded the same way and multiplied in float32, so the
    CPU computes what the GPU computes (up to summation order) and the CPU tests see the GPU's precision."""
    if a.dtype == b.dtype == torch.float32:
        return a @ b
    low = a.dtype if a.dtype != torch.float32 else b.dtype
    if a.is_cuda:
        try:
            return torch.mm(a.to(low), b.to(low), out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # older torch: no out_dtype
            pass
    return a.to(low).float() @ b.to(low).float()


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` in place, ``acc`` float32, with ``_matmul_fp32``'s rounding of the operands."""
    if a.dtype == b.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    low = a.dtype if a.dtype != torch.float32 else b.dtype
    if a.is_cuda:
        try:  # cuBLAS: bf16/fp16 operands, float32 C accumulated in place (beta = 1)
            torch.addmm(acc, a.to(low), b.to(low), out_dtype=torch.float32, out=acc)
            return
        except (TypeError, RuntimeError):  # older torch: no out_dtype
            pass
    acc.addmm_(a.to(low).float(), b.to(low).float())


def _chunk_logits(h, weight, bias):
    z = _matmul_fp32(h, weight.t())
    return z if bias is None else z + bias.float()


class FusedLinearLogprobsFunction(torch.autograd.Function):
    """Chunked forward/backward; differentiable in ``hidden``, ``weight`` and ``bias``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, ignore_index, return_entropy, chunk):
        N = hidden.shape[0]
        lp = torch.empty(N, dtype=torch.float32, device=hidden.device)
        ent = torch.empty(N, dtype=torch.float32, device=hidden.device) if return_entropy else None
        with torch.no_grad():
            for s in range(0, N, chunk):
                z = _chunk_logits(hidden[s:s + chunk], weight, bias)
                out = _logprobs_from_logits(z, labels[s:s + chunk], temperature, ignore_index, return_entropy)
                if return_entropy:
                    lp[s:s + chunk], ent[s:s + chunk] = out
                else:
                    lp[s:s + chunk] = out
        # one chunk: its tile is the backward's, kept instead of recomputed (an intermediate, so on ctx)
        ctx.tile = z if N <= chunk and N > 0 and any(ctx.needs_input_grad[:3]) else None
        ctx.save_for_backward(hidden, weight, bias, labels)
        ctx.args = (temperature, ignore_index, return_entropy, chunk)
        return (lp, ent) if return_entropy else lp

    @staticmethod
    def backward(ctx, grad_lp, grad_ent=None):
        hidden, weight, bias, labels = ctx.saved_tensors
        temperature, ignore_index, _, chunk = ctx.args
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dh = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        db = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s:s + chunk]
            z = ctx.tile
            if z is None:
                with torch.no_grad():  # recompute the tile; only the softmax part needs a graph
                    z = _chunk_logits(h, weight, bias)
            with torch.enable_grad():
                z.requires_grad_(True)
                lp, ent = _logprobs_from_logits(z, labels[s:s + chunk], temperature, ignore_index, True)
                outs, grads = [], []
                for out, g in ((lp, grad_lp), (ent, grad_ent)):
                    if g is not None:
                        outs.append(out)
                        grads.append(g[s:s + chunk])
                dz, = torch.autograd.grad(outs, (z,), grads)
            if need_h:
                dh[s:s + chunk] = _matmul_fp32(dz, weight)
            if need_w:  # ignored rows have dz = 0, but 0 * nan is NaN: drop their hidden states from dW
                keep = (labels[s:s + chunk] != ignore_index).unsqueeze(-1)
                _addmm_fp32_(dw, dz.t(), torch.where(keep, h, torch.zeros((), dtype=h.dtype, device=h.device)))
            if need_b:
                db += dz.sum(0)
        return (None if dh is None else dh.to(hidden.dtype), None if dw is None else dw.to(weight.dtype),
                None if db is None else db.to(bias.dtype), None, None, None, None, None)


def fused_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          bias: torch.Tensor | None = None, temperature: float = 1.0, ignore_index: int = -100,
                          return_entropy: bool = False, chunk_size: int | None = None):
    """Log-probs of ``labels`` under ``softmax((hidden @ weight.T + bias) / temperature)``, never materialising
    the ``[N, V]`` logits.

    Args:
        hidden: ``[N, H]`` float32/bf16/fp16 final hidden states (flatten ``[B, T, H]`` first); differentiable.
        weight: ``[V, H]`` LM-head weight, same dtype as ``hidden``; differentiable (skipped when it does not
            require grad, e.g. a frozen head).
        labels: ``[N]`` int64/int32 target ids in ``[0, V)`` or ``ignore_index``.
        bias: optional ``[V]`` LM-head bias; differentiable.
        temperature: > 0; the logits are divided by it (sampling temperature of the rollout).
        ignore_index: label value whose log-prob (and entropy) is 0 with zero gradient (default -100); the hidden
            states of such rows reach no output and no gradient (NaN/inf there is harmless).
        return_entropy: also return the entropy of each row's distribution.
        chunk_size: tokens per chunk ``C``; default keeps a float32 ``[C, V]`` tile at 32M elements (128 MiB).

    Returns:
        ``[N]`` float32 log-probs, or ``(logprobs, entropy)`` both ``[N]`` float32. Gradients are returned in the
        dtype of each input, accumulated in float32.

    Raises:
        TypeError / ValueError: wrong ranks, dtypes, devices, ``H`` or ``V`` mismatches, labels outside
        ``[0, V)`` (a host sync, as in ``logprobs_from_logits``), ``temperature`` <= 0 or not finite,
        ``chunk_size`` < 1.
    """
    check_tensor("hidden", hidden, ndim=2)
    check_tensor("weight", weight, ndim=2)
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must have shape [V, H] with H = hidden.shape[1] = {hidden.shape[1]}, "
                         f"got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    check_same_device({"hidden": hidden, "weight": weight, "labels": labels, "bias": bias})
    check_labels(labels, hidden.shape[:1], weight.shape[0], ignore_index)
    check_positive("temperature", temperature)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if torch.float64 in (hidden.dtype, weight.dtype):
        return fused_linear_logprobs_ref(hidden, weight, labels, bias=bias, temperature=temperature,
                                         ignore_index=ignore_index, return_entropy=return_entropy)
    chunk = chunk_size or max(1, _DEFAULT_CHUNK_ELEMS // max(weight.shape[0], 1))
    return FusedLinearLogprobsFunction.apply(hidden, weight, bias, labels, float(temperature), ignore_index,
                                             return_entropy, min(chunk, max(hidden.shape[0], 1)))
