"""Small random models and tokenizers of real architectures, built offline: for tests, the demo and benchmarks.

``tiny_model("qwen3")`` is a randomly initialised ``Qwen3ForCausalLM`` of a few hundred thousand parameters (CPU
tests run in milliseconds); ``tiny_config("qwen2", preset="qwen2.5-0.5b")`` has the published dimensions of
Qwen2.5-0.5B (no download: the numbers are written here). ``train_bpe_tokenizer`` trains a byte-level BPE tokenizer
on a few lines of text, so that a tiny model and its tokenizer can be saved with ``save_pretrained`` and read back by
``engine.models.load_policy`` like any checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

ARCHS: dict[str, type[PretrainedConfig]] = {
    "llama": LlamaConfig,  # no biases
    "qwen2": Qwen2Config,  # q/k/v biases (Qwen2 and Qwen2.5)
    "qwen3": Qwen3Config,  # per-head q/k RMSNorm before RoPE, explicit head_dim
    "mistral": MistralConfig,  # Llama with a sliding window; built here with sliding_window=None (full attention)
}

# Small enough for CPU tests, large enough to exercise GQA (4 query heads share 2 K/V heads) and several layers.
_TINY: dict[str, Any] = {
    "vocab_size": 512, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
    "intermediate_size": 128, "max_position_embeddings": 512, "tie_word_embeddings": False,
}

# Published dimensions (the checkpoints' config.json), keyed by preset name: (arch, dims, extra config fields).
PRESETS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "qwen2.5-0.5b": (
        "qwen2",
        {"vocab_size": 151936, "hidden_size": 896, "num_layers": 24, "num_heads": 14, "num_kv_heads": 2,
         "intermediate_size": 4864, "max_position_embeddings": 32768, "tie_word_embeddings": True},
        {"rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6, "bos_token_id": 151643, "eos_token_id": 151643,
         "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": 24},
    ),
    "llama-3.2-1b": (
        "llama",
        {"vocab_size": 128256, "hidden_size": 2048, "num_layers": 16, "num_heads": 32, "num_kv_heads": 8,
         "intermediate_size": 8192, "max_position_embeddings": 131072, "tie_word_embeddings": True},
        {"rope_theta": 500_000.0, "rms_norm_eps": 1e-5, "head_dim": 64, "bos_token_id": 128000,
         "eos_token_id": 128001,
         "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 8192}},
    ),
}


def tiny_config(arch: str = "llama", *, preset: str | None = None, vocab_size: int | None = None,
                hidden_size: int | None = None, num_layers: int | None = None, num_heads: int | None = None,
                num_kv_heads: int | None = None, intermediate_size: int | None = None,
                max_position_embeddings: int | None = None, tie_word_embeddings: bool | None = None,
                **config_overrides: Any) -> PretrainedConfig:
    """The HF config ``tiny_model`` builds from; see there for the arguments. Raises ``ValueError`` for an unknown
    ``arch`` or ``preset``, or a preset of another architecture than ``arch``."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
    dims, extra = dict(_TINY), {}
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
        preset_arch, preset_dims, extra = PRESETS[preset]
        if preset_arch != arch:
            raise ValueError(f"preset {preset!r} is a {preset_arch!r} model, but arch={arch!r}")
        dims.update(preset_dims)
    given = {"vocab_size": vocab_size, "hidden_size": hidden_size, "num_layers": num_layers, "num_heads": num_heads,
                 "num_kv_heads": num_kv_heads, "intermediate_size": intermediate_size,
                 "max_position_embeddings": max_position_embeddings, "tie_word_embeddings": tie_word_embeddings}
    dims.update({k: v for k, v in given.items() if v is not None})
    kwargs: dict[str, Any] = {
        "vocab_size": dims["vocab_size"], "hidden_size": dims["hidden_size"], "num_hidden_layers": dims["num_layers"],
        "num_attention_heads": dims["num_heads"], "num_key_value_heads": dims["num_kv_heads"],
        "intermediate_size": dims["intermediate_size"], "max_position_embeddings": dims["max_position_embeddings"],
        "tie_word_embeddings": dims["tie_word_embeddings"], "hidden_act": "silu",
    }
    if arch == "qwen3":  # Qwen3Config's own default head_dim is 128; the usual hidden // heads fits tiny shapes
        kwargs["head_dim"] = dims["hidden_size"] // dims["num_heads"]
    if arch == "mistral":
        kwargs["sliding_window"] = None
    kwargs.update(extra)
    kwargs.update(config_overrides)
    return ARCHS[arch](**kwargs)


def tiny_model(arch: str = "llama", *, preset: str | None = None, vocab_size: int | None = None,
               hidden_size: int | None = None, num_layers: int | None = None, num_heads: int | None = None,
               num_kv_heads: int | None = None, intermediate_size: int | None = None,
               max_position_embeddings: int | None = None, tie_word_embeddings: bool | None = None,
               dtype: torch.dtype = torch.float32, seed: int = 0, **config_overrides: Any) -> PreTrainedModel:
    """A randomly initialised ``*ForCausalLM`` of a real architecture (HF's own init, ``initializer_range``), in eval
    mode, on the CPU.

    Args:
        arch: ``"llama"``, ``"qwen2"`` (q/k/v biases), ``"qwen3"`` (q/k norm) or ``"mistral"`` (full attention).
        preset: ``None`` for the tiny defaults (vocab 512, hidden 64, 2 layers, 4 heads, 2 K/V heads, MLP 128,
            untied head), or ``"qwen2.5-0.5b"`` / ``"llama-3.2-1b"`` for those models' published dimensions, rope and
            norm settings (a full-size model: pass ``num_layers=1`` or build on the meta device to keep it small).
        vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size, max_position_embeddings,
        tie_word_embeddings: override the defaults / the preset (``None`` keeps them).
        dtype: parameter dtype.
        seed: the initialisation is deterministic in ``seed`` (the global RNG state is left untouched).
        **config_overrides: any other config field (``rope_theta``, ``rms_norm_eps``, ``head_dim``,
            ``initializer_range``, ``eos_token_id``, ``rope_scaling``, ...).

    Raises ``ValueError`` as ``tiny_config`` does.
    """
    config = tiny_config(arch, preset=preset, vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers,
                         num_heads=num_heads, num_kv_heads=num_kv_heads, intermediate_size=intermediate_size,
                         max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie_word_embeddings,
                         **config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model.to(dtype).eval()


def train_bpe_tokenizer(texts: Iterable[str], *, vocab_size: int = 512,
                        special_tokens: Iterable[str] = ("<pad>", "<eos>", "<bos>"), pad_token: str = "<pad>",
                        eos_token: str = "<eos>", bos_token: str = "<bos>",
                        min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (GPT-2/Llama-3/Qwen style: every byte is a token, so any text encodes and
    decodes losslessly) on ``texts`` with the ``tokenizers`` library.

    The special tokens take ids ``0 .. len(special_tokens) - 1`` in order (defaults: pad 0, eos 1, bos 2), then the
    256 byte tokens, then up to ``vocab_size - 256 - len(special_tokens)`` merges seen at least ``min_frequency``
    times (fewer when the texts are short: ``len(tokenizer) <= vocab_size``). No BOS/EOS is added on encoding.

    Raises ``ValueError`` when ``vocab_size`` cannot hold the bytes and the special tokens, or when pad/eos/bos is not
    among ``special_tokens``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    special_tokens = list(special_tokens)
    for name, token in (("pad_token", pad_token), ("eos_token", eos_token), ("bos_token", bos_token)):
        if token not in special_tokens:
            raise ValueError(f"{name}={token!r} is not among special_tokens={special_tokens}")
    if vocab_size < 256 + len(special_tokens):
        raise ValueError(f"vocab_size={vocab_size} cannot hold the 256 byte tokens and {len(special_tokens)} "
                         "special tokens")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad_token, eos_token=eos_token,
                                   bos_token=bos_token, clean_up_tokenization_spaces=False)
