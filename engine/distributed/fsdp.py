"""FSDP2 sharding of the engine's models (``torch.distributed.fsdp.fully_shard``), and the two rules that make it
correct (``../shared/research/distributed_facts.md``, measured on this torch):

1. Every computation reads the parameters inside the root module's forward. ``shard_model`` makes an ``FSDPRoot``
   around the Hugging Face model the FSDP root (its group: the embedding, tied or not with the LM head, the final
   norm, a score head); ``call_in_root(model, fn, ...)`` runs ``fn(model, ...)`` as that root's forward, so FSDP has
   gathered the root group when the fused LM-head op reads ``lm_head.weight`` (called outside, the op meets a
   ``DTensor`` and fails). Each decoder layer is its own FSDP group, gathered by its own forward.
2. Rollouts read the live weights: ``unsharded(model)`` gathers every FSDP group (``unshard`` is not recursive),
   so each parameter is a plain full tensor the generator reads in place (no copy, no weight sync), and reshards on
   exit. Memory: the full parameters on every rank while it generates.

The losses of the engine carry the global batch's denominators (``engine.algorithms.policy.global_denominators``),
so the gradients are summed over the ranks, not averaged: every group's divide factor is 1.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils._pytree import tree_map_only

# torch.distributed.fsdp is imported where it is used: it costs ~0.7 s, and a single process never needs it

_ROOT = "_rlhf_engine_fsdp_root"  # the attribute of a sharded HF model that holds its FSDPRoot (not a submodule)


class FSDPRoot(nn.Module):
    """The FSDP root around a Hugging Face model ``module``: ``forward(fn, *args, **kwargs)`` returns
    ``fn(module, *args, **kwargs)``, run inside the root's forward (so with the root group gathered)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, fn, *args, **kwargs):
        out = fn(self.module, *args, **kwargs)
        # FSDP warns about every view its root returns (an in-place op on it would skip its backward hook): the
        # log-probs are reshaped views of the fused op's output, so hand back tensors of their own
        return tree_map_only(torch.Tensor, lambda t: t.clone() if t._is_view() else t, out)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a Hugging Face causal LM or sequence classifier (``model.base_model.layers``). Raises
    ``ValueError`` naming the class when it has none."""
    layers = getattr(getattr(model, "base_model", None), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no base_model.layers to shard one FSDP group per decoder layer")
    return list(layers)


def shard_model(model: nn.Module, *, param_dtype: torch.dtype | None = None, reshard_after_forward: bool = True,
                activation_checkpointing: bool = False, cpu_offload: bool = False) -> nn.Module:
    """Shard ``model`` in place over the default process group: ``fully_shard`` on each decoder layer, then on an
    ``FSDPRoot`` around it (tied embedding and LM head stay in that one group). ``param_dtype``: compute dtype of
    ``MixedPrecisionPolicy(param_dtype, reduce_dtype=float32)`` (bf16 on CUDA), None keeps the parameters' dtype.
    ``activation_checkpointing``: HF's ``gradient_checkpointing_enable`` (non-reentrant), so module names and the
    generator's references stay as they are. ``cpu_offload``: ``CPUOffloadPolicy`` (a frozen reference). Gradients
    are summed over the ranks (divide factor 1). Returns ``model``; ``call_in_root`` and ``unsharded`` find its root."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    if is_sharded(model):
        return model
    policy = {"mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)}
    if cpu_offload:
        policy["offload_policy"] = CPUOffloadPolicy()
    if activation_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for layer in decoder_layers(model):
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **policy)
    root = FSDPRoot(model)
    fully_shard(root, reshard_after_forward=reshard_after_forward, **policy)
    for module in fsdp_modules(root):
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-multiplied sum)
    object.__setattr__(model, _ROOT, root)  # not a submodule: the root holds the model, not the other way round
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether ``shard_model`` sharded ``model``."""
    return getattr(model, _ROOT, None) is not None


def fsdp_modules(module: nn.Module) -> list:
    """Every FSDP group (``FSDPModule``) under ``module``, its root included."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def call_in_root(model: nn.Module, fn, *args, **kwargs):
    """``fn(model, *args, **kwargs)``; for a sharded model run as its FSDP root's forward (rule 1 above)."""
    root = getattr(model, _ROOT, None)
    return fn(model, *args, **kwargs) if root is None else root(fn, *args, **kwargs)


@contextlib.contextmanager
def unsharded(*models: nn.Module):
    """Gather every FSDP group of the sharded ``models`` for the duration (each parameter a full tensor, read in
    place by the generator), reshard on exit. No-op for models that are not sharded. Every rank must enter it."""
    groups = [m for model in models if is_sharded(model) for m in fsdp_modules(getattr(model, _ROOT))]
    for group in groups:
        group.unshard()
    try:
        yield
    finally:
        for group in groups:
            group.reshard()
