"""What a trainer builds from ``cfg.model``: the device and dtype it names, the policy and its tokenizer (a checkpoint
or a tiny random model), and the reward model to train (a reward-model checkpoint, or a fresh value head on a causal
LM's body)."""

from __future__ import annotations

import torch

from engine.data import char_tokenizer
from engine.models.loading import load_policy, require_local_dir, resolve_model_dir
from engine.models.tiny import tiny_model, train_bpe_tokenizer
from engine.models.value_model import is_value_model_dir, load_reward_model, value_model_from_causal_lm


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """``trainer.device``: ``"auto"`` is CUDA when available (``cuda:local_rank`` for one process of a multi-process
    run, made the current CUDA device), else the CPU; anything else is passed to torch."""
    if name != "auto":
        return torch.device(name)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if local_rank is None:
        return torch.device("cuda")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def resolve_dtype_name(name: str, device: torch.device) -> torch.dtype:
    """``model.dtype`` as a torch dtype: ``auto`` is bfloat16 on CUDA, float32 elsewhere."""
    return {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
            "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def build_tokenizer(model_cfg, texts=None):
    """The tokenizer of a random model: the character tokenizer, a directory's, or (``bpe[:N]``) a byte-level BPE
    trained on ``texts`` (an iterable of strings; required then)."""
    spec = model_cfg.tokenizer
    if spec is None:
        return char_tokenizer()
    if spec.startswith("bpe"):
        if texts is None:
            raise ValueError(f"model.tokenizer={spec!r} needs training texts to learn the BPE from")
        vocab = int(spec.partition(":")[2] or 2048)
        return train_bpe_tokenizer(texts, vocab_size=vocab)
    from transformers import AutoTokenizer

    require_local_dir(spec, "model.tokenizer")  # else transformers calls a missing directory a bad Hub repo id
    return AutoTokenizer.from_pretrained(spec, local_files_only=True)


def build_policy(model_cfg, device: torch.device, *, seed: int = 0, texts=None):
    """``(model, tokenizer)``: a checkpoint (``model.path``: a HF directory, or a run directory whose newest complete
    checkpoint is used) or a tiny random model of ``model.arch`` with the tokenizer of ``build_tokenizer`` (``texts``
    feed a ``bpe`` tokenizer)."""
    dtype = resolve_dtype_name(model_cfg.dtype, device)
    if model_cfg.path:
        path = resolve_model_dir(require_local_dir(model_cfg.path, "model.path"))
        model, tokenizer = load_policy(str(path), dtype=dtype, device=device)
        if tokenizer is None:
            raise ValueError(f"model.path={model_cfg.path} has no tokenizer; training needs one")
    else:
        tokenizer = build_tokenizer(model_cfg, texts)
        overrides = dict(model_cfg.tiny_overrides)
        model = tiny_model(model_cfg.arch, preset=model_cfg.preset, vocab_size=len(tokenizer), dtype=dtype,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                           bos_token_id=tokenizer.bos_token_id, seed=seed, **overrides).to(device)
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model, tokenizer


def build_reward_model(model_cfg, device: torch.device, *, seed: int = 0, texts=None):
    """``(reward_model, tokenizer)`` to train, for ``model_cfg``: a reward-model checkpoint as it is; a causal LM
    checkpoint (a run directory of ``rlhf-engine sft``, say) or a random tiny model with a fresh value head on its
    body (InstructGPT initialises the reward model from the SFT policy)."""
    if model_cfg.path and is_value_model_dir(resolve_model_dir(model_cfg.path)):
        model, tokenizer = load_reward_model(model_cfg.path, device, resolve_dtype_name(model_cfg.dtype, device))
        model.requires_grad_(True).train()
    else:
        lm, tokenizer = build_policy(model_cfg, device, seed=seed, texts=texts)
        model = value_model_from_causal_lm(lm, seed=seed)
        model.config.pad_token_id = tokenizer.pad_token_id
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model, tokenizer
