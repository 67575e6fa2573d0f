"""The paged KV cache: ONE tensor ``[L, 2, num_blocks, block_size, H_kv, D]`` for all layers (``L`` layers, K at
index 0 and V at 1 of dim 1), handed to the attention layers as per-layer views ``k_cache, v_cache [num_blocks,
block_size, H_kv, D]`` (the layout of ``attention.metadata``; token slot ``block_id * block_size + offset``).

One allocation means one sizing decision and one indexed op to copy blocks across every layer (``copy_blocks``, used
after ``BlockManager.fork``). The cache is sized from a memory budget in bytes: ``default_budget`` gives one (on CUDA
a fraction of the memory free now, on other devices a fixed 256 MiB), ``num_blocks_for_budget`` turns it into a
number of blocks.
"""

from __future__ import annotations

import torch

DEFAULT_HOST_BUDGET = 256 * 2**20
"""Bytes the cache takes by default off CUDA (CPU runs use small models; the budget is capped by ``max_blocks``)."""


def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers, K and V: ``2 * L * block_size * H_kv * D * itemsize``."""
    return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize


def num_blocks_for_budget(budget_bytes: int, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                          dtype: torch.dtype, *, min_blocks: int = 1, max_blocks: int | None = None) -> int:
    """How many blocks fit in ``budget_bytes``: ``budget_bytes // bytes_per_block``, capped at ``max_blocks`` (e.g.
    ``max_num_seqs * ceil(max_model_len / block_size)``, more are never used). Raises ``ValueError`` when fewer than
    ``min_blocks`` fit (pass ``ceil(max_model_len / block_size)``: the cache must hold one whole sequence)."""
    per_block = bytes_per_block(num_layers, block_size, num_kv_heads, head_dim, dtype)
    n = int(budget_bytes) // per_block
    if n < min_blocks:
        raise ValueError(
            f"KV cache budget of {int(budget_bytes)} bytes holds {n} blocks, need at least {min_blocks} "
            f"({min_blocks * per_block} bytes at {per_block} bytes per block: {num_layers} layers x {block_size} "
            f"tokens x {num_kv_heads} kv heads x {head_dim} head_dim x K,V in {dtype}); raise kv_cache_memory, or "
            f"lower max_model_len or block_size")
    return n if max_blocks is None else min(n, max_blocks)


def default_budget(device: torch.device | str, fraction: float = 0.3) -> int:
    """Default KV cache budget in bytes. On CUDA: ``fraction`` of the memory free on ``device`` now
    (``torch.cuda.mem_get_info``; call it after the weights and optimizer state are resident, and leave room for the
    forward's activations, hence the modest default). Elsewhere: ``DEFAULT_HOST_BUDGET`` (256 MiB), ``fraction``
    unused. Synchronises with the device (the query), once."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * fraction)
    return DEFAULT_HOST_BUDGET


class KVCache:
    """All layers' paged K/V in one zero-initialised tensor; see the module docstring.

    ``data: (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)``. Zero-initialised rather than empty, so
    that slots no sequence has written hold finite values (a masked NaN would still poison ``softmax @ V``)."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        dims = {"num_layers": num_layers, "num_blocks": num_blocks, "block_size": block_size,
                "num_kv_heads": num_kv_heads, "head_dim": head_dim}
        for name, value in dims.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.data = torch.zeros(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype,
                                device=device)
        self._views = [(self.data[i, 0], self.data[i, 1]) for i in range(num_layers)]

    @classmethod
    def from_budget(cls, budget_bytes: int, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                    dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", *, min_blocks: int = 1,
                    max_blocks: int | None = None) -> KVCache:
        """The largest cache that fits ``budget_bytes`` (see ``num_blocks_for_budget``)."""
        n = num_blocks_for_budget(budget_bytes, num_layers, block_size, num_kv_heads, head_dim, dtype,
                                  min_blocks=min_blocks, max_blocks=max_blocks)
        return cls(num_layers, n, block_size, num_kv_heads, head_dim, dtype, device)

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views ``k_cache, v_cache [num_blocks, block_size, H_kv, D]`` of layer ``layer_idx`` (writes go to ``data``)."""
        return self._views[layer_idx]

    def as_list(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``[(k_cache, v_cache)]`` per layer, views as in ``layer``."""
        return list(self._views)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy block ``src`` onto block ``dst`` for every ``(src, dst)`` pair, K and V of every layer, in place, in
        one gather + one scatter (no loop over layers). All sources are read before any destination is written.
        Destinations must be distinct. Ids are checked on the host (no device sync)."""
        if not pairs:
            return
        src, dst = (list(t) for t in zip(*pairs))
        for b in src + dst:
            if not 0 <= b < self.num_blocks:
                raise IndexError(f"block id {b} out of range [0, {self.num_blocks})")
        if len(set(dst)) != len(dst):
            raise ValueError(f"copy_blocks destinations must be distinct, got {dst}")
        src_t = torch.tensor(src, dtype=torch.int64, device=self.device)
        dst_t = torch.tensor(dst, dtype=torch.int64, device=self.device)
        self.data.index_copy_(2, dst_t, self.data.index_select(2, src_t))
