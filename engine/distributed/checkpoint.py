"""Checkpoints of sharded models: PyTorch Distributed Checkpoint (DCP) for the model and optimizer state, which
loads at any world size (2 -> 1, 1 -> 2: DCP reshards), and the full weights gathered on rank 0 for the
Hugging Face export (``from_pretrained`` loads a multi-process run's checkpoint like any other).

``get_state_dict`` / ``set_state_dict`` key everything by parameter name (FQN), the same with and without FSDP, so
a plain single-process model reads a sharded run's ``dcp/`` folder as it is (``distributed_facts.md``: the loaded
state is bitwise equal to the saved one).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of ``model`` on rank 0's CPU, ``{}`` on the other ranks (a collective: every
    rank calls it), a tied parameter under its first name only. A model that is not sharded gives its own
    ``state_dict()``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from engine.distributed.context import current
    from engine.distributed.fsdp import is_sharded

    if not is_sharded(model):
        return model.state_dict()
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(param), name) != name:
            state.pop(name, None)  # a tied twin (lm_head.weight): gathered as a copy, saved once as HF does
    return state if current().is_main else {}


def save_sharded(folder: Path, model: nn.Module, optimizer=None) -> None:
    """``model``'s (and ``optimizer``'s) state into the DCP folder ``folder``, each rank writing its shards (a
    collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
    else:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
    dcp.save(state, checkpoint_id=str(folder))


def load_sharded(folder: Path, model: nn.Module, optimizer=None) -> None:
    """The DCP folder ``folder`` into ``model`` (and ``optimizer``), in place, at this run's world size (any: DCP
    reshards; a single process without a process group reads it too)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict, set_state_dict

    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
    else:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
    with warnings.catch_warnings():  # a single process reading a multi-process run's shards is meant (2 -> 1)
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, [] if optimizer is None else optimizer, model_state_dict=state["model"],
                   optim_state_dict=state.get("optim", {}))


def load_full(model: nn.Module, weights: dict[str, torch.Tensor], optimizer=None,
              optimizer_state: dict | None = None) -> None:
    """A single-process checkpoint into a sharded ``model``: the full ``weights`` (a tied name missing from them
    is filled by its twin) and ``optimizer_state`` (``optimizer.state_dict()`` of the same parameters, in the same
    groups and order), each rank keeping its shards (1 -> N)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, weights, options=options)
    if optimizer is None or optimizer_state is None:
        return
    names = {id(p): n for n, p in model.named_parameters()}
    by_index: dict[int, str] = {}
    for saved, group in zip(optimizer_state["param_groups"], optimizer.param_groups):
        for index, param in zip(saved["params"], group["params"]):
            by_index[index] = names[id(param)]
    named_state = {
        "state": {by_index[i]: s for i, s in optimizer_state["state"].items()},
        "param_groups": [{**g, "params": [by_index[i] for i in g["params"]]} for g in optimizer_state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, named_state, options=StateDictOptions(full_state_dict=True))
