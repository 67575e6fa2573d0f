"""Scalar-head models: the reward model and the PPO critic.

Both are Hugging Face ``AutoModelForSequenceClassification`` models with ``num_labels=1`` (``LlamaForSequenceClassification``,
``Qwen2ForSequenceClassification``, ...): the causal LM's decoder body (``model.base_model``) plus a linear ``score``
head ``H -> 1``. That is what TRL's ``RewardTrainer`` saves and what OpenRLHF and veRL load, so a checkpoint of ours
loads with ``AutoModelForSequenceClassification.from_pretrained`` and theirs load here.

We do not use HF's own pooling (the last token that is not ``pad_token_id``: wrong when pad == eos, as in Qwen): the
score is read at the last position the attention mask marks, with right padding.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedModel

from engine.distributed.fsdp import call_in_root
from engine.models.loading import resolve_checkpoint_dir, resolve_model_dir

if TYPE_CHECKING:
    from engine.algorithms.packing import PackedBatch


def _score_head(model: PreTrainedModel) -> torch.nn.Module:
    head = getattr(model, "score", None)
    if head is None or getattr(head, "out_features", 1) != 1:
        raise ValueError(f"{type(model).__name__} is not a scalar-head model: expected a 'score' Linear with one "
                         f"output (AutoModelForSequenceClassification with num_labels=1), got {head!r}")
    return head


def is_value_model(model: torch.nn.Module) -> bool:
    """True for a sequence-classification model with a one-output ``score`` head (a reward model or critic)."""
    head = getattr(model, "score", None)
    return isinstance(head, torch.nn.Linear) and head.out_features == 1


def value_model_from_causal_lm(causal_lm: PreTrainedModel, *, seed: int = 0) -> PreTrainedModel:
    """A new ``*ForSequenceClassification`` (``num_labels=1``) whose decoder body is a copy of ``causal_lm``'s, with
    a fresh score head drawn from ``N(0, 1/(H+1))`` (Stiennon et al. 2020 / TRL's value-head init), on the causal
    LM's device and dtype, in train mode. The InstructGPT recipe initialises the reward model from the SFT policy
    this way (and PPO's critic from the reward model).

    Raises ``ValueError`` when transformers has no sequence-classification class for the architecture."""
    fields = {k: v for k, v in causal_lm.config.to_dict().items() if k not in ("id2label", "label2id")}
    config = AutoConfig.for_model(**{**fields, "num_labels": 1})
    config.architectures = None
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForSequenceClassification.from_config(config)
    except ValueError as err:
        raise ValueError(f"no sequence-classification model for model_type={config.model_type!r}: {err}") from None
    body = causal_lm.base_model
    missing, unexpected = model.base_model.load_state_dict(body.state_dict(), strict=False)
    if missing or unexpected:
        raise ValueError(f"the decoder of {type(causal_lm).__name__} does not fit {type(model).__name__}: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}")
    head = _score_head(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        torch.nn.init.normal_(head.weight, std=1.0 / (config.hidden_size + 1) ** 0.5)
    param = next(causal_lm.parameters())
    return model.to(device=param.device, dtype=param.dtype).train()


def load_value_model(path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                     device: str | torch.device = "cpu") -> PreTrainedModel:
    """Load a reward model / critic saved as ``*ForSequenceClassification`` with ``num_labels=1`` from a local
    directory (or a repo id in the local Hugging Face cache), offline, in eval mode. Raises ``FileNotFoundError``
    when the directory does not exist or has no ``config.json`` (``resolve_checkpoint_dir``), ``ValueError`` for a
    checkpoint of another kind (a causal LM: build one with ``value_model_from_causal_lm``) or with more than one
    label."""
    path = resolve_checkpoint_dir(path)  # else transformers reports a missing directory as a bad Hub repo id
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    archs = list(getattr(config, "architectures", None) or [])
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise ValueError(f"{path} holds {archs or config.model_type}, not a reward model "
                         "(*ForSequenceClassification with num_labels=1)")
    if config.num_labels != 1:
        raise ValueError(f"{path}: a reward model has one output, this one has num_labels={config.num_labels}")
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True, **kwargs)
    return model.to(device).eval()


def token_values(model: PreTrainedModel, input_ids: torch.Tensor | PackedBatch,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The score head at every position: ``[B, L]`` float32 (differentiable). ``input_ids``/``attention_mask``
    ``[B, L]`` int64, right-padded. The critic's ``V(s_t)`` for response token t is the value at the position that
    predicts it (veRL's ``values[:, -T-1:-1]``; ``TokenBatch.response_index`` here).

    A packed batch (``engine.algorithms.packing.PackedBatch``) in place of ``input_ids`` (no mask): ``[1, N]``, the
    values along its flat row of ``N`` tokens, each sequence attending only to itself."""
    return call_in_root(model, _token_values, input_ids, attention_mask)


def _token_values(model, input_ids: torch.Tensor | PackedBatch, attention_mask: torch.Tensor | None) -> torch.Tensor:
    head = _score_head(model)
    if isinstance(input_ids, torch.Tensor):
        hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    else:  # a PackedBatch; imported here: engine.models does not import engine.algorithms at load
        from engine.algorithms.packing import packed_hidden

        hidden = packed_hidden(model.base_model, input_ids)
    return head(hidden.to(head.weight.dtype)).squeeze(-1).float()


def sequence_scores(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The reward of each row: the score head at its last attended position (``attention_mask.sum(-1) - 1``, right
    padding), ``[B]`` float32, differentiable. Raises ``ValueError`` for a row with no attended token."""
    lengths = attention_mask.sum(-1)
    if bool((lengths == 0).any()):
        raise ValueError("sequence_scores: a row of attention_mask is all zeros (an empty sequence has no score)")
    return call_in_root(model, _sequence_scores, input_ids, attention_mask, lengths)


def _sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, lengths: torch.Tensor):
    head = _score_head(model)
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    last = hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]
    return head(last.to(head.weight.dtype)).squeeze(-1).float()


def is_value_model_dir(path: Path) -> bool:
    """True when the checkpoint at ``path`` is a ``*ForSequenceClassification`` (a reward model or critic)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    archs = json.loads(config.read_text()).get("architectures") or []
    return any(a.endswith("ForSequenceClassification") for a in archs)


def load_reward_model(path: str | Path, device: torch.device, dtype: torch.dtype):
    """``(frozen reward model, tokenizer)`` from a reward-model run directory or checkpoint (``ValueError`` for a
    checkpoint of another kind, or one without a tokenizer)."""
    from transformers import AutoTokenizer

    path = resolve_model_dir(path)
    model = load_value_model(path, dtype=dtype, device=device).requires_grad_(False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"reward model {path} has no readable tokenizer: {err}") from None
    return model, tokenizer
