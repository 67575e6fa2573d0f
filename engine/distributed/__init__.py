"""Multi-process training under ``torchrun`` on PyTorch's own stack: the process group and its collectives
(``context``), FSDP2 sharding with the root-forward and rollout rules (``fsdp``), and distributed checkpoints (DCP,
``checkpoint``). A single process runs the same code with every helper a no-op."""

from engine.distributed.context import (
    DistContext,
    all_reduce_max,
    all_reduce_min,
    all_reduce_sum,
    any_rank,
    barrier,
    broadcast_object,
    current,
    gather_lists,
    init_distributed,
)
from engine.distributed.fsdp import call_in_root, is_sharded, shard_model, unsharded

__all__ = ["DistContext", "all_reduce_max", "all_reduce_min", "all_reduce_sum", "any_rank", "barrier", "broadcast_object",
           "call_in_root", "current", "gather_lists", "init_distributed", "is_sharded", "shard_model", "unsharded"]
