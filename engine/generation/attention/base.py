"""The interface every attention backend implements, and the K/V write they share."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from engine.generation.attention.metadata import AttentionMetadata


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write the new tokens' ``k, v [N, H_kv, D]`` into ``k_cache, v_cache [num_blocks, block_size, H_kv, D]`` at the
    flat slots ``slot_mapping [N]`` (in place; one ``index_copy_`` per cache, no host sync)."""
    H_kv, D = k.shape[1], k.shape[2]
    k_cache.view(-1, H_kv, D).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, H_kv, D).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


class AttentionBackend(ABC):
    """Paged attention for the generator: write this step's K/V into the cache, then attend every new token to its
    sequence's context (cached + new, causal, aligned bottom-right; see ``metadata``)."""

    name: str = "base"
    graph_safe: bool = False
    """True when a decode step through this backend can be captured in a CUDA graph cheaply: it reads the context
    lengths on the device and plans its work from the host-side maximum (a graph plans for ``max_model_len``) without
    allocating in proportion to it."""
    accepts_kv_written: bool = False
    """True when ``forward`` takes ``kv_written=True`` and then leaves the cache write to the caller (the model's
    fused ``kernels.rope_and_cache``). A backend without it always writes ``k, v`` itself."""

    def validate(self, *, block_size: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        """Raise ``ValueError`` naming the setting this backend cannot run (e.g. flash-attn's block size)."""

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """``q [N, H, D]``, ``k, v [N, H_kv, D]`` (H a multiple of H_kv: GQA), caches ``[num_blocks, block_size, H_kv,
        D]`` -> ``[N, H, D]`` in q's dtype. Writes ``k, v`` into the caches in place.

        Backends with ``accepts_kv_written`` take a keyword ``kv_written: bool = False``: when True the caller has
        already stored this step's ``k, v`` at ``meta.slot_mapping`` (and ``k`` holds the stored values), so the
        backend skips ``write_kv``, or repeats it, which stores the same values."""
