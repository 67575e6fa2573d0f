"""One optimizer step accumulated over micro-batches, the loop every trainer shares:

    for each micro-batch: forward -> loss -> finite check -> backward;   then clip the gradient norm and step

Each micro-batch's loss is its share of the whole step's loss (normalised by the step's global denominators: response
tokens, non-empty rows, pairs), so the summed gradient equals the full-batch gradient whatever the micro-batch size.
A non-finite loss stops the accumulation and skips the optimizer step (``clip_and_step``). ``mixed_precision`` is the
one autocast expression of the engine.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from engine.algorithms.optim import NonFiniteWeightsError, nonfinite_tensors, update_would_overflow
from engine.distributed.context import all_reduce_sum, any_rank, current


@dataclass
class StepResult:
    """What one optimizer step did: host-float ``metrics`` (``loss`` and ``grad_norm`` always present, NaN when the
    step's loss was non-finite) and ``stepped`` (False when the step was skipped)."""

    metrics: dict[str, float]
    stepped: bool


def mixed_precision(device_type: str, dtype: torch.dtype | None):
    """``torch.autocast(device_type, dtype)`` when ``dtype`` is given (bf16/fp16 weights on CUDA), else a no-op
    context: float32 weights compute in float32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def micro_slices(rows: int, micro_batch_size: int) -> Iterator[slice]:
    """``slice(start, start + micro_batch_size)`` over ``rows`` rows, the last one shorter. Raises ``ValueError``
    for ``micro_batch_size < 1``."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    for start in range(0, rows, micro_batch_size):
        yield slice(start, min(start + micro_batch_size, rows))


def clip_and_step(model, optimizer, max_grad_norm: float, finite: bool) -> tuple[float, bool]:
    """Finish an accumulated step: clip the gradient norm to ``max_grad_norm`` and step ``optimizer`` unless the loss
    (``finite`` False) or the gradient norm is non-finite, or the update would overflow float16 weights
    (``engine.algorithms.optim.update_would_overflow``, checked before the step so that the weights and the optimizer
    state are left as they were); the gradients are zeroed either way, so a bad step never reaches the weights.
    Returns ``(grad_norm, stepped)`` (grad_norm NaN when the loss was non-finite; ``stepped`` False with a finite loss
    and gradient norm means the update was refused).

    After a step the updated parameters are checked (one fused reduction): non-finite weights that were not foreseen
    raise ``NonFiniteWeightsError`` naming them (on every rank), before anything can save them."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    grad_norm = _global_norm(torch.nn.utils.clip_grad_norm_(params, max_grad_norm)) if finite else float("nan")
    # sharded (FSDP) parameters: the norm is global; the overflow check reads this rank's shards, so any rank decides
    stepped = finite and math.isfinite(grad_norm) and not any_rank(update_would_overflow(optimizer))
    if stepped:
        optimizer.step()
        bad = nonfinite_tensors(named)
        if any_rank(bool(bad)):
            raise NonFiniteWeightsError(
                f"the optimizer step made {len(bad)} of {len(named)} parameter tensors non-finite ({bad[:4]}"
                f"{'...' if len(bad) > 4 else ''}) with a finite loss and gradient norm ({grad_norm:.4g}); the run "
                "stops and no checkpoint is written from these weights: lower optim.lr")
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, stepped


def _global_norm(norm: torch.Tensor) -> float:
    """The gradient norm as a float; a sharded model's (a ``DTensor``) is already reduced over the ranks."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


MicroLoss = Callable[[Any], "tuple[torch.Tensor, dict[str, float]]"]


def accumulated_step(model, optimizer, micro_batches: Iterable, micro_loss: MicroLoss, *, max_grad_norm: float,
                     device_type: str = "cpu", autocast_dtype: torch.dtype | None = None) -> StepResult:
    """One optimizer step of ``model`` over ``micro_batches``.

    ``micro_loss(micro_batch) -> (loss, metrics)`` runs under ``mixed_precision(device_type, autocast_dtype)``:
    ``loss`` is a differentiable 0-d tensor, this micro-batch's share of the step's loss (so the shares sum to it);
    ``metrics`` are host floats, each this micro-batch's share of the step's metric (summed over the micro-batches).
    The step's ``loss`` metric is the sum of ``loss.item()``, unless ``metrics`` gives its own ``"loss"`` share.

    The first non-finite loss stops the accumulation before its backward (under ``torchrun`` the remaining
    micro-batches still run, their gradients discarded, so that every rank makes the same FSDP collectives); the
    optimizer step is then skipped and every summed metric is NaN. Returns a ``StepResult`` with the summed metrics, ``loss`` and ``grad_norm``
    (``clip_and_step``); the gradients are zeroed before and after.

    Under ``torchrun`` each rank passes its own rows (the same number of micro-batches on every rank, with the same
    metric names: FSDP's collectives run in every forward and backward), the losses normalised by the global
    batch's denominators: the skip decision is global (any rank's non-finite loss), the metrics are summed over the
    ranks, and FSDP sums the gradients."""
    optimizer.zero_grad(set_to_none=True)
    sums: dict[str, float] = {"loss": 0.0}
    finite = True
    lockstep = current().enabled  # FSDP gathers and reduces in every forward and backward: all ranks run them all
    for micro_batch in micro_batches:
        with mixed_precision(device_type, autocast_dtype):
            loss, metrics = micro_loss(micro_batch)
        if not finite or not torch.isfinite(loss):
            finite = False
            if not lockstep:
                break
            loss.backward()  # its gradients are discarded with the step; the collectives stay in step
            continue
        loss.backward()
        metrics = dict(metrics)
        sums["loss"] += metrics.pop("loss") if "loss" in metrics else loss.item()
        for name, value in metrics.items():
            sums[name] = sums.get(name, 0.0) + value
    finite = not any_rank(not finite)  # one rank's non-finite loss skips the step on every rank
    grad_norm, stepped = clip_and_step(model, optimizer, max_grad_norm, finite)
    sums = all_reduce_sum(sums) if finite else {name: float("nan") for name in sums}
    return StepResult({**sums, "grad_norm": grad_norm}, stepped)
