"""Attention backends of the generator behind one interface (``AttentionBackend``): ``torch`` (SDPA over gathered
paged K/V, any device), ``triton`` (paged flash-decoding kernel, CUDA), ``flash_attn`` (when the package imports)."""

from engine.generation.attention.base import AttentionBackend, write_kv
from engine.generation.attention.metadata import AttentionMetadata
from engine.generation.attention.torch_backend import TorchAttention

__all__ = ["AttentionBackend", "AttentionMetadata", "TorchAttention", "write_kv"]
