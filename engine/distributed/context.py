"""The process group of a multi-process run, and the few collectives the trainers need (``torch.distributed``).

A run started by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) joins the process group here: NCCL when the
run is on CUDA, gloo on the CPU, with ``distributed.timeout_s``. Every helper is a no-op in a single process (no
process group), so the trainers call them unconditionally. Every rank must call every collective in the same order:
a helper is never called from one rank only (``distributed_facts.md`` trap 4: a per-rank skip deadlocks).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size`` processes, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes metrics, logs, configs and the run directory's lock."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (``torchrun`` sets it), 1 when absent."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device_type: str, timeout_s: float) -> DistContext:
    """Join the process group of a ``torchrun`` run (``WORLD_SIZE`` > 1): ``nccl`` for CUDA, ``gloo`` otherwise,
    with ``timeout_s`` seconds for every collective. A group already initialised (by the caller, or a test) is
    used as it is. A single process (no ``WORLD_SIZE``, or 1) returns ``DistContext()`` and joins nothing."""
    if dist.is_available() and dist.is_initialized():
        return current()
    if env_world_size() <= 1:
        return DistContext()
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=timeout_s))
    return current()


def current() -> DistContext:
    """The ``DistContext`` of the initialised process group, else a single process's."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistContext()
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def _initialised() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(values: dict[str, float]) -> dict[str, float]:
    """``values`` summed over the ranks (one float64 all-reduce for the whole dict; every rank must pass the same
    keys, in any order). NaN on any rank makes the sum NaN. Unchanged in a single process."""
    if not _initialised() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def all_reduce_max(values: dict[str, float]) -> dict[str, float]:
    """``values`` maximised over the ranks (one float64 all-reduce; the same keys on every rank)."""
    if not _initialised() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return dict(zip(keys, t.tolist()))


def all_reduce_min(values: dict[str, float]) -> dict[str, float]:
    """``values`` minimised over the ranks (``all_reduce_max`` of the negated values; the same keys on every rank)."""
    return {k: -v for k, v in all_reduce_max({k: -float(v) for k, v in values.items()}).items()}


def any_rank(flag: bool) -> bool:
    """True when ``flag`` is True on any rank (a MAX all-reduce): one rank's non-finite loss skips the step on all."""
    if not _initialised():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_lists(items: list) -> list:
    """The concatenation, in rank order, of every rank's ``items`` (picklable; ``all_gather_object``)."""
    if not _initialised():
        return list(items)
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, list(items))
    return [x for part in out for x in part]


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not _initialised():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if _initialised():
        dist.barrier()


def _comm_device() -> torch.device:
    """The device collectives run on: the current CUDA device under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
