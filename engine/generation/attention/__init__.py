"""Attention backends of the generator behind one interface (``AttentionBackend``): ``torch`` (SDPA over gathered
paged K/V, any device), ``triton`` (paged flash-decoding kernel, CUDA), ``flash_attn`` (when the package imports).
``get_attention_backend(name, device)`` picks one by name, or the fastest that runs here."""

from __future__ import annotations

import torch

from engine.generation.attention.base import AttentionBackend, write_kv
from engine.generation.attention.flash_attn_backend import HAS_FLASH_ATTN, FlashAttnBackend
from engine.generation.attention.metadata import AttentionMetadata
from engine.generation.attention.torch_backend import TorchAttention
from engine.generation.attention.triton_backend import TritonAttention, paged_decode_attention
from engine.generation.attention.triton_cascade import shared_prefix_decode_attention
from kernels._backend import HAS_TRITON, interpreting

ATTENTION_BACKENDS = ("auto", "flash_attn", "triton", "torch")


def _build(name: str, device: torch.device) -> AttentionBackend:
    if name == "torch":
        return TorchAttention()
    if name == "triton":
        if not HAS_TRITON:
            raise ImportError("attention backend 'triton' needs the 'triton' package (pip install triton)")
        if device.type != "cuda" and not interpreting():
            raise RuntimeError(f"attention backend 'triton' needs a CUDA device, got {device}; on the CPU it runs only "
                               f"in Triton's interpreter (TRITON_INTERPRET=1 set before importing, tests only): use "
                               f"attention_backend='torch' there")
        return TritonAttention()
    backend = FlashAttnBackend()  # raises ImportError naming the package when flash_attn does not import
    if device.type != "cuda":
        raise RuntimeError(f"attention backend 'flash_attn' needs a CUDA device, got {device}")
    return backend


def get_attention_backend(name: str | None = None, device: torch.device | str = "cpu", *,
                          block_size: int | None = None, head_dim: int | None = None,
                          dtype: torch.dtype | None = None) -> AttentionBackend:
    """The attention backend ``name`` for ``device``.

    ``None`` / ``"auto"``: ``flash_attn`` where it imports and the device is CUDA, else ``triton`` on CUDA, else
    ``torch``; when ``block_size``, ``head_dim`` and ``dtype`` are all given, a backend whose ``validate`` rejects them
    is skipped (e.g. flash_attn with a block size that is not a multiple of 256). An explicit name returns that backend
    or raises: ``ValueError`` for an unknown name or a setting it cannot run, ``ImportError`` when its package is
    missing, ``RuntimeError`` when it cannot run on ``device``.
    """
    device = torch.device(device)
    key = "auto" if name is None else str(name).strip().lower().replace("-", "_")
    if key not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {ATTENTION_BACKENDS}")
    config = None
    if block_size is not None and head_dim is not None and dtype is not None:
        config = {"block_size": block_size, "head_dim": head_dim, "dtype": dtype, "device": device}
    if key != "auto":
        backend = _build(key, device)
        if config:
            backend.validate(**config)
        return backend
    candidates = []
    if device.type == "cuda":
        candidates += (["flash_attn"] if HAS_FLASH_ATTN else []) + (["triton"] if HAS_TRITON else [])
    for candidate in candidates:
        try:
            backend = _build(candidate, device)
            if config:
                backend.validate(**config)
        except (ImportError, RuntimeError, ValueError):
            continue
        return backend
    return TorchAttention()


__all__ = [
    "ATTENTION_BACKENDS",
    "AttentionBackend",
    "AttentionMetadata",
    "FlashAttnBackend",
    "TorchAttention",
    "TritonAttention",
    "get_attention_backend",
    "paged_decode_attention",
    "shared_prefix_decode_attention",
    "write_kv",
]
