"""The ``flash_attn`` backend: FlashAttention-2's paged-KV kernels, used only where the ``flash-attn`` package imports.

``flash-attn`` publishes no wheels (a source build of hours) and is on none of our GPU machines (DESIGN.md,
"FlashAttention here"), so this module never fails to import: it records whether ``import flash_attn`` worked
(``HAS_FLASH_ATTN``) and why not (``FLASH_ATTN_IMPORT_ERROR``, shown by ``describe()``), and only constructing the
backend raises.

- prefill (any step with more than one new token in some sequence): ``flash_attn_varlen_func`` over the paged cache
  (``block_table``; causal, aligned bottom-right when cached tokens precede the new ones, as the metadata defines);
- decode: ``flash_attn_with_kvcache(q[:, None], k_cache, v_cache, cache_seqlens=context_lens, block_table=...)``.

Both run after the step's K/V are stored (by ``write_kv`` here, or by the caller when ``kv_written=True``), so
the cache holds ``context_lens[s]`` tokens of each sequence.
Constraints of FlashAttention-2's paged KV (``csrc/flash_attn/flash_api.cpp``): CUDA (Ampere or newer), fp16/bf16 q
and cache, head dim <= 256 and a multiple of 8, block size a multiple of 256; ``validate`` checks them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.generation.attention.base import AttentionBackend, write_kv
from engine.generation.attention.metadata import AttentionMetadata

try:  # optional: a source build of the 'flash-attn' distribution; import errors of a broken build are caught too
    import flash_attn
    from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

    HAS_FLASH_ATTN = True
    FLASH_ATTN_IMPORT_ERROR: str | None = None
except Exception as exc:  # noqa: BLE001 - ImportError, or OSError/RuntimeError from a mismatched CUDA build
    flash_attn = None
    flash_attn_varlen_func = flash_attn_with_kvcache = None
    HAS_FLASH_ATTN = False
    FLASH_ATTN_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

PAGE_MULTIPLE = 256  # FlashAttention-2's paged KV: "Paged KV cache block size must be divisible by 256"
MAX_HEAD_DIM = 256
_DTYPES = (torch.float16, torch.bfloat16)


def describe() -> dict[str, object]:
    """Whether the backend can run here, and why not: ``{"available", "version", "import_error"}``."""
    return {
        "available": HAS_FLASH_ATTN,
        "version": getattr(flash_attn, "__version__", None) if HAS_FLASH_ATTN else None,
        "import_error": FLASH_ATTN_IMPORT_ERROR,
    }


def check_flash_attn_config(*, block_size: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
    """Raise ``ValueError`` naming the setting FlashAttention-2's paged KV cannot run (needs no ``flash_attn``)."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"the flash_attn attention backend runs on CUDA devices only, got device {device}")
    if torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] < 8:
        raise ValueError(f"the flash_attn attention backend needs an Ampere or newer GPU (sm_80+), got "
                         f"{torch.cuda.get_device_name(device)}")
    if dtype not in _DTYPES:
        raise ValueError(f"the flash_attn attention backend needs float16 or bfloat16, got dtype {dtype}")
    if block_size < 1 or block_size % PAGE_MULTIPLE:
        raise ValueError(f"the flash_attn attention backend needs block_size divisible by {PAGE_MULTIPLE} "
                         f"(flash-attn 2's paged KV cache), got block_size={block_size}; use block_size=256 or "
                         f"attention_backend='triton'")
    if not 0 < head_dim <= MAX_HEAD_DIM or head_dim % 8:
        raise ValueError(f"the flash_attn attention backend needs head_dim <= {MAX_HEAD_DIM} and a multiple of 8, "
                         f"got {head_dim}")


class FlashAttnBackend(AttentionBackend):
    """FlashAttention-2 over the paged cache; see the module docstring. Raises ``ImportError`` when ``flash_attn``
    does not import."""

    name = "flash_attn"
    accepts_kv_written = True

    def __init__(self):
        if not HAS_FLASH_ATTN:
            raise ImportError(
                "attention backend 'flash_attn' needs the 'flash-attn' package, which did not import "
                f"({FLASH_ATTN_IMPORT_ERROR}). Install it (pip install flash-attn --no-build-isolation, a long CUDA "
                "build) or use attention_backend='triton' (CUDA) or 'torch'."
            )

    def validate(self, *, block_size: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        check_flash_attn_config(block_size=block_size, head_dim=head_dim, dtype=dtype, device=device)

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float, *,
                kv_written: bool = False) -> torch.Tensor:
        if not kv_written:
            write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        if meta.is_decode:
            out = flash_attn_with_kvcache(q.unsqueeze(1), k_cache, v_cache, cache_seqlens=meta.context_lens,
                                          block_table=meta.block_tables, softmax_scale=scale, causal=True)
            return out.squeeze(1)
        # per-sequence key lengths as prefix sums, built on the device (no host sync)
        cu_seqlens_k = F.pad(meta.context_lens.cumsum(0, dtype=torch.int32), (1, 0))
        return flash_attn_varlen_func(q, k_cache, v_cache, cu_seqlens_q=meta.cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                      max_seqlen_q=meta.max_query_len, max_seqlen_k=meta.max_context_len,
                                      softmax_scale=scale, causal=True, block_table=meta.block_tables)
