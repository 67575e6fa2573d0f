"""Run configuration: nested dataclasses, read from YAML/JSON plus dotted command-line overrides, validated at once.

``load_config(GRPORunConfig, "run.yaml", ["grpo.num_generations=4", "optim.lr=1e-5"])`` reads the file into the
nested dataclasses (by their type annotations), applies the overrides (each value parsed as YAML, so ``1e-5``,
``true``, ``[a, b]`` and ``null`` mean what they look like), and checks every field: an unknown key, a value of the
wrong type or out of range raises ``ValueError`` (a ``ConfigError``) that names the full dotted key, what was expected
and what was given, before any model is loaded. ``save_config`` writes the resolved config back as YAML (the trainer
dumps it into the run directory).

Each section validates its own fields in ``__post_init__`` (so ``GRPOConfig(clip_ratio_low=-0.1)`` fails too, naming
``clip_ratio_low``); when a section is built inside a larger config the error is re-raised with the section's path
(``grpo.clip_ratio_low must be in [0, 1], got -0.1``).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

from kernels.dpo_loss import DPO_LOSS_TYPES
from kernels.kl import KL_ESTIMATORS
from kernels.loss_agg import LOSS_AGG_MODES

T = TypeVar("T")

# Kept here so that reading a config imports neither transformers nor the generator; tests check that they match
# engine.models.tiny.ARCHS / PRESETS and engine.generation.attention.ATTENTION_BACKENDS.
MODEL_ARCHS = ("llama", "qwen2", "qwen3", "mistral")
MODEL_PRESETS = ("llama-3.2-1b", "qwen2.5-0.5b")
MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTENTION_BACKENDS = ("auto", "flash_attn", "triton", "torch")
LR_SCHEDULES = ("constant", "linear", "cosine")
ROLLOUT_IS_LEVELS = ("token", "sequence")


# ------------------------------------------------------------------------------------------------------ errors
class ConfigError(ValueError):
    """A bad config value or key. ``key`` is the dotted path of the field (``"grpo.clip_ratio_low"``), relative to
    the config being built; ``str(err)`` is the message for the user.

    With ``valid`` given, the error is an unknown key and the message lists the valid keys of its section."""

    def __init__(self, key: str, problem: str = "", valid: Sequence[str] | None = None):
        self.key, self.problem, self.valid = key, problem, None if valid is None else list(valid)
        super().__init__(self._render())

    def _render(self) -> str:
        if self.valid is None:
            return f"{self.key} {self.problem}"
        parent, _, leaf = self.key.rpartition(".")
        where = f"of '{parent}'" if parent else "at the top level"
        close = difflib.get_close_matches(leaf, self.valid, n=1)
        hint = f" (did you mean '{parent + '.' if parent else ''}{close[0]}'?)" if close else ""
        return f"unknown config key '{self.key}'{hint}; valid keys {where}: {', '.join(self.valid)}"

    def under(self, prefix: str) -> ConfigError:
        """The same error with ``prefix`` prepended to its key."""
        return ConfigError(f"{prefix}.{self.key}" if prefix else self.key, self.problem, self.valid)


# ------------------------------------------------------------------------------------------------ type coercion
def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _show(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _optional_inner(tp: Any) -> tuple[Any, bool]:
    """``(X, True)`` for ``X | None`` / ``Optional[X]``, else ``(tp, False)``."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            return (args[0] if len(args) == 1 else Union[tuple(args)]), True  # noqa: UP007
    return tp, False


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against (and, for numbers and containers, converted to) the annotation ``tp``; raises
    ``ConfigError`` naming ``key``. Dataclass types are built from mappings, recursively."""
    if tp is Any:
        return value
    inner, optional = _optional_inner(tp)
    if optional:
        return None if value is None else _coerce(value, inner, key)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        for arg in args:
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(key, f"must be of type {_type_name(tp)}, got {_show(value)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if value is None:  # a YAML section with nothing under it: ``model:``
            value = {}
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"must be a mapping (section {tp.__name__}), got {_show(value)}")
        return _build(tp, value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(key, f"must be one of {list(args)}, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be of type bool (true/false), got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, float) and value.is_integer():  # 1e3 -> 1000
            return int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(key, f"must be of type int, got {_show(value)}")
        return value
    if tp is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(key, f"must be of type float, got {_show(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"must be of type str, got {_show(value)}")
        return value
    if tp in (list, tuple, dict):
        origin, args = tp, ()
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"must be a list ({_type_name(tp)}), got {_show(value)}")
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ConfigError(key, f"must have {len(args)} elements ({_type_name(tp)}), got {value!r}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
        elem = args[0] if args else Any
        items = [_coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"must be a mapping ({_type_name(tp)}), got {_show(value)}")
        ktp, vtp = args if args else (Any, Any)
        return {_coerce(k, ktp, f"{key}.{k}"): _coerce(v, vtp, f"{key}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(key, f"must be of type {_type_name(tp)}, got {_show(value)}")
    return value


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls: type[T], data: Mapping[str, Any], prefix: str) -> T:
    """``cls(**data)`` with unknown keys refused and errors re-raised under ``prefix``."""
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    for k in data:
        if k not in names:
            raise ConfigError(f"{prefix}.{k}" if prefix else str(k), valid=names)
    hints = _hints(cls)
    try:
        kwargs = {k: _coerce(v, hints[k], k) for k, v in data.items()}
        return cls(**kwargs)
    except ConfigError as err:
        raise err.under(prefix) from None


class Section:
    """Base of the config dataclasses: ``__post_init__`` converts every field to its annotated type (so a section
    built from plain dicts/lists is typed) and then runs ``validate()``, which raises ``ConfigError`` naming the
    field."""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            setattr(self, f.name, _coerce(getattr(self, f.name), hints[f.name], f.name))
        self.validate()

    def validate(self) -> None:
        """Check the fields' ranges and choices (cross-field rules included); override in each section."""


# ------------------------------------------------------------------------------------------------ check helpers
def _num(name: str, value: float, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
         hi_open: bool = False) -> None:
    """Raise ``ConfigError`` unless ``value`` is finite and within the interval (``*_open``: that end excluded)."""
    ok = (math.isfinite(value) and (lo is None or (value > lo if lo_open else value >= lo))
          and (hi is None or (value < hi if hi_open else value <= hi)))
    if ok:
        return
    if lo is not None and hi is not None:
        bounds = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    elif lo is not None:
        bounds = f"a finite number {'>' if lo_open else '>='} {lo:g}"
    else:
        bounds = f"a finite number {'<' if hi_open else '<='} {hi:g}"
    raise ConfigError(name, f"must be {bounds}, got {value!r}")


def _int(name: str, value: int, lo: int) -> None:
    if value < lo:
        raise ConfigError(name, f"must be >= {lo}, got {value!r}")


def _choice(name: str, value: Any, choices: Sequence[Any], *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value not in choices:
        extra = " or null" if allow_none else ""
        raise ConfigError(name, f"must be one of {list(choices)}{extra}, got {value!r}")


def _nonempty(name: str, value: str | None, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or not value.strip():
        raise ConfigError(name, f"must be a non-empty string, got {value!r}")


# ------------------------------------------------------------------------------------------------ sections
@dataclass
class ModelConfig(Section):
    """The policy model and its tokenizer."""

    path: str | None = None
    """A local Hugging Face model directory (``config.json`` + safetensors), or null for a tiny random model of
    ``arch`` / ``preset`` (tests, demos, CPU smoke runs)."""
    arch: str = "llama"
    """Architecture of the tiny random model: llama, qwen2, qwen3 or mistral. Ignored when ``path`` is set (the
    checkpoint's ``config.json`` decides)."""
    preset: str | None = None
    """Published dimensions for the random model (``qwen2.5-0.5b``, ``llama-3.2-1b``; must match ``arch``); null for
    the tiny defaults. Ignored when ``path`` is set."""
    dtype: str = "auto"
    """Parameter dtype: auto (bfloat16 on CUDA, float32 on the CPU), float32, bfloat16 or float16. Training computes
    under autocast to a bf16/fp16 dtype (with float32 master weights in the optimizer); float32 runs everything in
    float32, generation included."""
    tokenizer: str | None = None
    """Tokenizer directory; null means ``path``'s own, or for a random model the character tokenizer
    (``engine.data.char_tokenizer``). ``bpe`` or ``bpe:N`` (random model only) trains a byte-level BPE of at most N
    tokens (default 2048) on the run's training texts (``engine.models.train_bpe_tokenizer``); it is saved with every
    checkpoint, so later runs that start from this one use it."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, about a third more compute)."""
    tiny_overrides: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments of ``engine.models.tiny_model`` for the random model (``hidden_size``, ``num_layers``,
    ``tie_word_embeddings``, ...). Ignored when ``path`` is set."""

    def validate(self) -> None:
        """Non-empty paths, known arch/preset/dtype."""
        _nonempty("path", self.path, allow_none=True)
        _choice("arch", self.arch, MODEL_ARCHS)
        _choice("preset", self.preset, MODEL_PRESETS, allow_none=True)
        _choice("dtype", self.dtype, MODEL_DTYPES)
        _nonempty("tokenizer", self.tokenizer, allow_none=True)
        if self.tokenizer is not None and self.tokenizer.startswith("bpe"):
            if not re.fullmatch(r"bpe(:\d+)?", self.tokenizer):
                raise ConfigError("tokenizer", f"must be a directory, 'bpe' or 'bpe:N', got {self.tokenizer!r}")
            if self.path is not None:
                raise ConfigError("tokenizer", f"{self.tokenizer!r} trains a tokenizer for a random model; with "
                                  f"path={self.path!r} the checkpoint's tokenizer is used")


@dataclass
class DataConfig(Section):
    """Where prompts come from and how they are turned into model input."""

    train: str = "builtin:arithmetic"
    """Training prompts: ``builtin:<task>`` (generated offline), a ``.jsonl``/``.json``/``.parquet`` file, a
    directory of split files, or a Hugging Face dataset name (needs ``datasets``); read by ``engine.data``."""
    eval: str | None = None
    """Evaluation prompts, in the same forms as ``train``; null: the held-out split of a built-in task, or none."""
    prompt_field: str = "prompt"
    """Column holding the prompt: a string, or a list of chat messages (TRL's conversational format)."""
    answer_field: str = "answer"
    """Column holding the reference answer passed to the reward functions (as the keyword argument ``answer``
    whatever the column is called)."""
    template: str | None = None
    """A plain prompt template with a ``{prompt}`` placeholder (and optionally ``{system}``), used even when the
    tokenizer has a chat template; null: the tokenizer's chat template when it has one, else
    ``"Question: {prompt}\\nAnswer:"`` (``engine.data.format_prompt``)."""
    system_prompt: str | None = None
    """System message prepended when the chat template is used; null for none."""
    max_prompt_tokens: int = 256
    """Longest prompt, in tokens; longer prompts are left out of the data (a truncated question is another
    question). Preference pairs (reward model, DPO) instead keep the last ``max_prompt_tokens`` tokens of a longer
    prompt (the most recent turns of the dialogue)."""
    max_length: int = 1024
    """Longest SFT example, in tokens: prompt + completion + EOS. A longer completion is cut at the end to fit (its
    EOS kept, so the model still learns to stop) and the run prints how many were cut; >= 2, and an SFT run needs it
    above ``max_prompt_tokens``. GRPO/PPO completions are bounded by ``generation.max_tokens`` instead, reward-model
    and DPO pairs by ``rm.max_length`` / ``dpo.max_length``."""
    num_eval: int = 200
    """At most this many evaluation examples are scored (the first ones, in a fixed order); 0 means all of them."""
    seed: int = 0
    """Seed of the data order (and of the built-in task generators). The order is a pure function of
    ``(seed, step)``, so a resumed run sees the same prompts."""

    def validate(self) -> None:
        """Non-empty sources and field names, positive limits."""
        _nonempty("train", self.train)
        _nonempty("eval", self.eval, allow_none=True)
        _nonempty("prompt_field", self.prompt_field)
        _nonempty("answer_field", self.answer_field)
        if self.template is not None and "{prompt}" not in self.template:
            raise ConfigError("template", f"must contain '{{prompt}}' or be null, got {self.template!r}")
        _int("max_prompt_tokens", self.max_prompt_tokens, 1)
        _int("max_length", self.max_length, 2)
        _int("num_eval", self.num_eval, 0)
        _int("seed", self.seed, 0)


@dataclass
class GenerationConfig(Section):
    """Rollout sampling and the generator's memory (``engine.Generator``, ``engine.SamplingParams``)."""

    max_tokens: int = 64
    """Most tokens generated per completion; longer ones end with ``finish_reason="length"``."""
    temperature: float = 1.0
    """Sampling temperature; 0 is greedy (every sample of a group is then the same)."""
    top_p: float = 1.0
    """Nucleus sampling mass, in (0, 1]; 1 is off. Anything but 1 makes the sampled distribution differ from the
    policy's, which the trainer's log-probs do not model."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 (or -1) is off."""
    attention_backend: str | None = None
    """Generator attention backend: auto, flash_attn, triton or torch; null means auto (the fastest that runs)."""
    kv_cache_memory_mb: int | None = None
    """Memory of the paged KV cache in MiB; null lets the generator size it from free memory."""
    max_num_seqs: int = 256
    """Most sequences decoded together in one generator step (continuous batching)."""

    def validate(self) -> None:
        """Positive lengths and sizes, sampling parameters in range, known backend."""
        _int("max_tokens", self.max_tokens, 1)
        _num("temperature", self.temperature, 0.0)
        _num("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        _int("top_k", self.top_k, -1)
        _choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS, allow_none=True)
        if self.kv_cache_memory_mb is not None:
            _int("kv_cache_memory_mb", self.kv_cache_memory_mb, 1)
        _int("max_num_seqs", self.max_num_seqs, 1)


@dataclass
class OptimConfig(Section):
    """AdamW and the learning-rate schedule (``engine.optim``)."""

    lr: float = 1e-5
    """Peak learning rate (after warmup)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay; biases and norm weights are never decayed."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW ``(beta1, beta2)``, each in [0, 1)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup from lr/warmup_steps to lr."""
    schedule: str = "constant"
    """After warmup: constant, linear or cosine decay to ``min_lr_ratio * lr`` at the last step."""
    min_lr_ratio: float = 0.0
    """Floor of the decay as a fraction of ``lr``, in [0, 1]."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (> 0; ``.inf`` turns clipping off but the norm is still computed for the
    non-finite check)."""
    master_weights: bool = True
    """For bf16/fp16 parameters (``model.dtype`` auto on CUDA): step float32 master copies and write the rounded
    result back (``engine.optim.MasterWeightAdamW``). False steps the low-precision parameters directly, which loses
    updates smaller than half an ulp of the weight (most of them at RL learning rates)."""

    def validate(self) -> None:
        """lr > 0, betas in [0, 1), eps > 0, known schedule, ratios in range."""
        _num("lr", self.lr, 0.0, lo_open=True)
        _num("weight_decay", self.weight_decay, 0.0)
        for i, b in enumerate(self.betas):
            _num(f"betas[{i}]", b, 0.0, 1.0, hi_open=True)
        _num("eps", self.eps, 0.0, lo_open=True)
        _int("warmup_steps", self.warmup_steps, 0)
        _choice("schedule", self.schedule, LR_SCHEDULES)
        _num("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        if math.isnan(self.max_grad_norm) or self.max_grad_norm <= 0:
            raise ConfigError("max_grad_norm", f"must be > 0 (.inf: no clipping), got {self.max_grad_norm!r}")


@dataclass
class GRPOConfig(Section):
    """GRPO: groups of completions per prompt, group-normalised advantages, the clipped policy loss
    (``engine.algorithms.grpo``, ``kernels.grpo_loss``).

    The rollout batch is ``prompts_per_step * num_generations`` completions; it is split into micro-batches of
    ``micro_batch_size`` (the last may be smaller: it need not divide the batch, because the loss is normalised by
    the whole batch's token/sequence count, so the split does not change it). ``prompts_per_step`` may not exceed
    the number of training prompts (a prompt drawn twice into one step would count twice in the group statistics
    of the batch): the trainer raises ``ValueError`` when it starts."""

    num_generations: int = 8
    """Completions sampled per prompt (the group); >= 2, since advantages are relative to the group."""
    prompts_per_step: int = 16
    """Prompts per optimizer step; at most the number of training prompts (see above)."""
    clip_ratio_low: float = 0.2
    """PPO clip: the ratio is clipped below at ``1 - clip_ratio_low``; in [0, 1]."""
    clip_ratio_high: float = 0.2
    """PPO clip: the ratio is clipped above at ``1 + clip_ratio_high`` (DAPO's clip-higher uses 0.28); >= 0."""
    kl_coef: float = 0.0
    """Weight of the KL penalty to the reference (initial) policy in the loss; 0 needs no reference model."""
    kl_estimator: str = "k3"
    """KL estimator of the penalty: k1, k2, k3 or abs (``kernels.KL_ESTIMATORS``)."""
    loss_agg_mode: str = "token-mean"
    """How token losses become one number: token-mean, seq-mean-token-mean, seq-mean-token-sum or
    seq-mean-token-sum-norm (``kernels.LOSS_AGG_MODES``)."""
    norm_adv_by_std: bool = True
    """Divide advantages by the group's reward std (GRPO); false keeps only the mean baseline (Dr. GRPO)."""
    unbiased_std: bool = True
    """Group std with Bessel's correction (n - 1), as TRL and veRL compute it."""
    epsilon: float = 1e-6
    """Added to the group std before dividing (> 0)."""
    ppo_epochs: int = 1
    """Passes over each rollout batch; 1 is on-policy (the ratio is exactly 1 on the first pass)."""
    micro_batch_size: int = 32
    """Completions per forward/backward pass (gradient accumulation over the rollout batch); need not divide it (the
    last micro-batch is smaller, the update the same), and a value above the batch means one pass."""
    rollout_is: str | None = None
    """Truncated importance sampling correcting the generator/trainer log-prob gap: token, sequence, or null (off)."""
    rollout_is_cap: float = 2.0
    """Upper bound of the rollout importance weights (> 0)."""
    entropy_coef: float = 0.0
    """Entropy bonus: subtracts this times the aggregated token entropy from the loss; 0 is off."""
    rewards: list[str] = field(default_factory=lambda: ["accuracy", "format"])
    """Reward functions: built-in names (``engine.rewards.REWARDS``) or import paths ``pkg.module:function``; their
    weighted sum is the reward. Resolved when the trainer starts. An import path imports that module, which runs
    its code with your permissions (as TRL's ``trust_remote_code``): run only configs whose reward modules you
    trust."""
    reward_weights: list[float] | None = None
    """One weight per entry of ``rewards``; null weighs them all 1."""

    def validate(self) -> None:
        """Group size >= 2, clip ratios and coefficients in range, known estimator/mode/IS level, one weight per
        reward."""
        _int("num_generations", self.num_generations, 2)
        _int("prompts_per_step", self.prompts_per_step, 1)
        _num("clip_ratio_low", self.clip_ratio_low, 0.0, 1.0)
        _num("clip_ratio_high", self.clip_ratio_high, 0.0)
        _num("kl_coef", self.kl_coef, 0.0)
        _choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        _choice("loss_agg_mode", self.loss_agg_mode, LOSS_AGG_MODES)
        _num("epsilon", self.epsilon, 0.0, lo_open=True)
        _int("ppo_epochs", self.ppo_epochs, 1)
        _int("micro_batch_size", self.micro_batch_size, 1)
        _choice("rollout_is", self.rollout_is, ROLLOUT_IS_LEVELS, allow_none=True)
        _num("rollout_is_cap", self.rollout_is_cap, 0.0, lo_open=True)
        _num("entropy_coef", self.entropy_coef, 0.0)
        if not self.rewards:
            raise ConfigError("rewards", "must name at least one reward function, got []")
        for i, name in enumerate(self.rewards):
            _nonempty(f"rewards[{i}]", name)
        if self.reward_weights is not None:
            if len(self.reward_weights) != len(self.rewards):
                raise ConfigError("reward_weights", f"must have one weight per reward ({len(self.rewards)}: "
                                  f"{self.rewards}), got {len(self.reward_weights)}: {self.reward_weights}")
            for i, w in enumerate(self.reward_weights):
                if not math.isfinite(w):
                    raise ConfigError(f"reward_weights[{i}]", f"must be a finite number, got {w!r}")


@dataclass
class SFTConfig(Section):
    """Supervised fine-tuning on prompt/completion pairs (``engine.algorithms.sft``)."""

    epochs: int = 1
    """Passes over the training set."""
    batch_size: int = 32
    """Examples per optimizer step."""
    micro_batch_size: int = 32
    """Examples per forward/backward pass (need not divide ``batch_size``: the loss is normalised by the step's
    token count, so the last, smaller micro-batch gives the same update); a value above ``batch_size`` means one
    pass per step."""
    max_steps: int | None = None
    """Stop after this many optimizer steps even if ``epochs`` are not done; null: ``epochs`` alone decide.
    (``trainer.max_steps`` is the GRPO budget; SFT runs use this field.)"""

    def validate(self) -> None:
        """Positive counts and sizes."""
        _int("epochs", self.epochs, 1)
        _int("batch_size", self.batch_size, 1)
        _int("micro_batch_size", self.micro_batch_size, 1)
        if self.max_steps is not None:
            _int("max_steps", self.max_steps, 1)


@dataclass
class PairTrainingConfig(Section):
    """Batching of a preference-pair run (reward model, DPO): pairs per step, epochs, sequence lengths."""

    batch_size: int = 32
    """Pairs per optimizer step."""
    micro_batch_size: int = 16
    """Pairs per forward/backward pass (each pass runs chosen and rejected together: 2x rows). Need not divide
    ``batch_size``: each micro-batch's mean loss is weighted by its share of the step's pairs, so the last, smaller
    one gives the same update; a value above ``batch_size`` means one pass per step."""
    epochs: int = 1
    """Passes over the training pairs."""
    max_steps: int | None = None
    """Stop after this many optimizer steps even if ``epochs`` are not done; null: ``epochs`` alone decide."""
    max_length: int = 512
    """Most tokens of prompt + response; responses are cut to fit (the prompt is cut first, to
    ``data.max_prompt_tokens``, from the left)."""
    eval_batch_size: int = 64
    """Pairs per forward pass when scoring the held-out split."""
    allow_empty_response: bool = False
    """Accept pairs whose chosen or rejected response is empty or whitespace only (Anthropic HH has 4 where saying
    nothing was preferred); false raises on them, naming the record."""

    def validate(self) -> None:
        """Positive counts and sizes."""
        _int("batch_size", self.batch_size, 1)
        _int("micro_batch_size", self.micro_batch_size, 1)
        _int("epochs", self.epochs, 1)
        if self.max_steps is not None:
            _int("max_steps", self.max_steps, 1)
        _int("max_length", self.max_length, 2)
        _int("eval_batch_size", self.eval_batch_size, 1)


@dataclass
class RewardModelConfig(PairTrainingConfig):
    """Bradley-Terry reward model on chosen/rejected pairs (``engine.algorithms.reward_model``,
    ``kernels.pairwise_reward_loss``)."""

    center_rewards_coefficient: float | None = None
    """Adds ``c * mean((r_c + r_r)^2)`` to keep rewards near zero (TRL's option; it suggests 0.01); null is off."""
    margin_field: str | None = None
    """Column holding a per-pair margin subtracted inside the sigmoid (Llama 2); null: no margin."""

    def validate(self) -> None:
        """The batching checks, and a non-negative centring coefficient."""
        super().validate()
        if self.center_rewards_coefficient is not None:
            _num("center_rewards_coefficient", self.center_rewards_coefficient, 0.0)
        _nonempty("margin_field", self.margin_field, allow_none=True)


@dataclass
class DPOConfig(PairTrainingConfig):
    """Direct Preference Optimization (Rafailov et al. 2023; ``engine.algorithms.dpo``, ``kernels.dpo_loss``). The
    reference is the initial policy; its log-probs of every pair are computed once, before training."""

    beta: float = 0.1
    """KL-regularisation strength (TRL's default 0.1); > 0."""
    loss_type: str = "sigmoid"
    """sigmoid (DPO; cDPO with ``label_smoothing``), robust or ipo (``kernels.DPO_LOSS_TYPES``). ipo compares
    length-averaged sequence log-probs, as TRL does; the others summed ones."""
    label_smoothing: float = 0.0
    """Assumed probability that a preference label is flipped, in [0, 0.5); must be 0 for ipo."""

    def validate(self) -> None:
        """The batching checks, beta > 0, known loss type, label smoothing in range."""
        super().validate()
        _num("beta", self.beta, 0.0, lo_open=True)
        _choice("loss_type", self.loss_type, DPO_LOSS_TYPES)
        _num("label_smoothing", self.label_smoothing, 0.0, 0.5, hi_open=True)
        if self.loss_type == "ipo" and self.label_smoothing:
            raise ConfigError("label_smoothing", f"must be 0 with loss_type='ipo', got {self.label_smoothing}")


@dataclass
class PPOConfig(Section):
    """PPO with a critic (Ouyang et al. 2022; ``engine.algorithms.ppo``): one completion per prompt scored by a frozen
    reward model (or rule rewards), token rewards = the score at the last response token minus ``kl_coef`` times the
    per-token KL to the reference (KL in the reward), GAE advantages (whitened) and returns, then ``ppo_epochs``
    passes of clipped policy and value losses over mini-batches."""

    prompts_per_step: int = 32
    """Prompts per rollout batch (one completion each, or ``num_generations``); at most the number of training
    prompts (the trainer raises ``ValueError`` when it starts: a prompt would be drawn twice into one batch)."""
    num_generations: int = 1
    """Completions sampled per prompt."""
    ppo_epochs: int = 2
    """Passes over each rollout batch."""
    mini_batch_size: int = 16
    """Completions per optimizer step (of the actor and of the critic) within a pass. Must divide the rollout batch
    ``prompts_per_step * num_generations`` (as veRL asserts): a smaller last mini-batch would be an optimizer step
    on a few samples, weighted like a whole one."""
    micro_batch_size: int = 16
    """Completions per forward/backward pass (gradient accumulation inside a mini-batch); at most
    ``mini_batch_size``. It need not divide ``mini_batch_size``: the losses are normalised by the mini-batch's
    token/sequence counts, so the last, smaller micro-batch gives the same update."""
    clip_ratio_low: float = 0.2
    """Policy ratio clipped below at ``1 - clip_ratio_low``; in [0, 1]."""
    clip_ratio_high: float = 0.2
    """Policy ratio clipped above at ``1 + clip_ratio_high``; >= 0."""
    cliprange_value: float | None = 0.5
    """Value clip half-width around the rollout's values (veRL's 0.5); null for the unclipped value loss."""
    loss_agg_mode: str = "token-mean"
    """Aggregation of the policy and value token losses (``kernels.LOSS_AGG_MODES``)."""
    gamma: float = 1.0
    """Discount factor of GAE, in [0, 1]."""
    lam: float = 0.95
    """GAE lambda, in [0, 1] (TRL and OpenRLHF use 0.95)."""
    whiten_advantages: bool = True
    """Whiten the advantages over the batch's response tokens (veRL's recipe)."""
    kl_coef: float = 0.05
    """Weight of the KL to the reference policy (the initial one); 0 needs no reference model."""
    kl_estimator: str = "k1"
    """KL estimator (``kernels.KL_ESTIMATORS``); k1 in the reward is InstructGPT's."""
    use_kl_loss: bool = False
    """False: the KL is a per-token reward penalty (InstructGPT). True: it is a loss term instead (GRPO style; pair
    it with ``kl_estimator: k3``)."""
    adaptive_kl: bool = False
    """Adapt ``kl_coef`` towards ``target_kl`` (Ziegler et al. 2019)."""
    target_kl: float = 6.0
    """Target of the adaptive controller: the mean per-sequence KL, in nats."""
    kl_horizon: int = 10000
    """Horizon of the adaptive controller, in samples."""
    entropy_coef: float = 0.0
    """Entropy bonus: subtracts this times the aggregated token entropy from the policy loss (veRL's
    ``entropy_coeff``); 0 is off."""
    critic_warmup_steps: int = 0
    """Steps at the start of the run that update the critic only (veRL's ``critic_warmup``): the value head, fresh
    or fitted to scores rather than returns, first learns the returns."""
    critic_lr: float = 1e-5
    """Learning rate of the critic's own AdamW (the other optimizer settings are ``optim``'s)."""
    critic_path: str | None = None
    """Initial critic: a reward-model / critic checkpoint (directory or run directory). Null: the reward model's weights
    when ``reward_model`` is set (InstructGPT, OpenRLHF), else the policy's body with a fresh value head."""
    reward_model: str | None = None
    """The frozen reward model: a run directory of ``rlhf-engine rm`` or a ``*ForSequenceClassification``
    checkpoint. Null: the rule rewards of ``rewards``."""
    rewards: list[str] = field(default_factory=list)
    """Rule reward functions (as in ``grpo.rewards``; an import path runs that module's code), used when
    ``reward_model`` is null."""
    reward_weights: list[float] | None = None
    """One weight per entry of ``rewards``; null weighs them all 1."""
    reward_clip: float | None = None
    """Clip scores to ``[-reward_clip, reward_clip]`` before they enter the rewards (OpenRLHF clips at 10); null: no
    clip."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of a completion that hit ``generation.max_tokens`` without EOS (TRL's option)."""
    rollout_is: str | None = None
    """Truncated importance sampling of the generator/trainer log-prob gap: token, sequence, or null."""
    rollout_is_cap: float = 2.0
    """Upper bound of the rollout importance weights (> 0)."""

    def validate(self) -> None:
        """Positive sizes, a mini-batch that divides the rollout batch and a micro-batch no larger than it, clip
        ratios, discounting and KL settings in range; a reward source."""
        _int("prompts_per_step", self.prompts_per_step, 1)
        _int("num_generations", self.num_generations, 1)
        _int("ppo_epochs", self.ppo_epochs, 1)
        _int("mini_batch_size", self.mini_batch_size, 1)
        _int("micro_batch_size", self.micro_batch_size, 1)
        batch = self.prompts_per_step * self.num_generations
        if batch % self.mini_batch_size:
            raise ConfigError("mini_batch_size", f"must divide the rollout batch prompts_per_step * num_generations = "
                              f"{self.prompts_per_step} * {self.num_generations} = {batch}, got "
                              f"{self.mini_batch_size}")
        if self.micro_batch_size > self.mini_batch_size:
            raise ConfigError("micro_batch_size", f"must be <= mini_batch_size ({self.mini_batch_size}): a "
                              f"forward/backward pass splits a mini-batch; got {self.micro_batch_size}")
        _num("clip_ratio_low", self.clip_ratio_low, 0.0, 1.0)
        _num("clip_ratio_high", self.clip_ratio_high, 0.0)
        if self.cliprange_value is not None:
            _num("cliprange_value", self.cliprange_value, 0.0, lo_open=True)
        _choice("loss_agg_mode", self.loss_agg_mode, LOSS_AGG_MODES)
        _num("gamma", self.gamma, 0.0, 1.0)
        _num("lam", self.lam, 0.0, 1.0)
        _num("kl_coef", self.kl_coef, 0.0)
        _choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        _num("target_kl", self.target_kl, 0.0, lo_open=True)
        _int("kl_horizon", self.kl_horizon, 1)
        _num("critic_lr", self.critic_lr, 0.0, lo_open=True)
        _num("entropy_coef", self.entropy_coef, 0.0)
        _int("critic_warmup_steps", self.critic_warmup_steps, 0)
        _nonempty("critic_path", self.critic_path, allow_none=True)
        _nonempty("reward_model", self.reward_model, allow_none=True)
        if self.reward_model is None and not self.rewards:
            raise ConfigError("reward_model", "or ppo.rewards must give the reward: set a reward-model run directory "
                              "(rlhf-engine rm) or rule reward names, got neither")
        if self.reward_model is not None and self.rewards:
            raise ConfigError("rewards", f"must be empty when reward_model is set (one reward source), got "
                              f"{self.rewards}")
        for i, name in enumerate(self.rewards):
            _nonempty(f"rewards[{i}]", name)
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            raise ConfigError("reward_weights", f"must have one weight per reward ({len(self.rewards)}), got "
                              f"{len(self.reward_weights)}")
        if self.reward_clip is not None:
            _num("reward_clip", self.reward_clip, 0.0, lo_open=True)
        if self.missing_eos_penalty is not None:
            _num("missing_eos_penalty", self.missing_eos_penalty, 0.0)
        _choice("rollout_is", self.rollout_is, ROLLOUT_IS_LEVELS, allow_none=True)
        _num("rollout_is_cap", self.rollout_is_cap, 0.0, lo_open=True)


_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")


@dataclass
class TrainerConfig(Section):
    """The loop around the algorithm: steps, seeds, logging, evaluation, checkpoints, failure handling."""

    output_dir: str = "runs/run"
    """Run directory: resolved config, metrics JSONL, checkpoints (``checkpoints/step-XXXXXXXX``)."""
    max_steps: int = 100
    """Optimizer steps of the run (GRPO: one rollout batch per step)."""
    seed: int = 0
    """Seed of python/numpy/torch RNGs and of the sampler; the whole run is a function of it."""
    log_every: int = 1
    """Write metrics every this many steps."""
    eval_every: int = 0
    """Evaluate on ``data.eval`` every this many steps; 0 means never."""
    save_every: int = 0
    """Save a checkpoint every this many steps; 0 means only the final one at the end of the run."""
    keep_last: int = 2
    """Complete checkpoints kept on disk; older ones are deleted after a new one is committed."""
    resume: str | None = None
    """null: start fresh (refused when ``output_dir`` already holds a run, unless ``overwrite``); ``auto``: resume
    from the newest complete checkpoint in ``output_dir`` if there is one; a path: resume from that checkpoint (it
    must be complete)."""
    overwrite: bool = False
    """Start fresh in an ``output_dir`` that already holds a run: its contents (checkpoints, metrics, configs) are
    moved aside into ``output_dir/.trash-<time>/`` first, never mixed with the new run's. False refuses to start."""
    zero_grad_warn_steps: int = 5
    """Warn when the gradient norm is exactly 0 this many optimizer steps in a row (a dead model: nothing learns)."""
    max_consecutive_nonfinite: int = 3
    """Steps with a non-finite loss or grad norm are skipped (no optimizer step); this many in a row abort the run."""
    device: str = "auto"
    """auto (CUDA when available, else CPU), cpu, cuda, cuda:N or mps."""
    tensorboard: bool = False
    """Also log to TensorBoard under ``output_dir/tensorboard`` (needs the tensorboard package)."""
    wandb: bool = False
    """Also log to Weights & Biases (needs wandb and a login; off by default: no network unless asked)."""
    progress_bar: bool = True
    """Show a tqdm progress bar (only when stdout is a terminal)."""

    def validate(self) -> None:
        """Positive step counts and periods, keep_last >= 1, a known device form."""
        _nonempty("output_dir", self.output_dir)
        _int("max_steps", self.max_steps, 1)
        _int("seed", self.seed, 0)
        _int("log_every", self.log_every, 1)
        _int("eval_every", self.eval_every, 0)
        _int("save_every", self.save_every, 0)
        _int("keep_last", self.keep_last, 1)
        _nonempty("resume", self.resume, allow_none=True)
        _int("max_consecutive_nonfinite", self.max_consecutive_nonfinite, 1)
        _int("zero_grad_warn_steps", self.zero_grad_warn_steps, 1)
        if not _DEVICE_RE.match(self.device):
            raise ConfigError("device", f"must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")


@dataclass
class GRPORunConfig(Section):
    """Everything a GRPO run reads (``rlhf-engine grpo --config run.yaml key=value ...``)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy (and the reference model, when ``grpo.kl_coef > 0``)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompt sources and formatting."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Rollout sampling."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    """The algorithm."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Loop, logging, checkpoints."""


@dataclass
class SFTRunConfig(Section):
    """Everything an SFT run reads (``rlhf-engine sft --config run.yaml key=value ...``)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The model to fine-tune."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompt/completion sources and formatting."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """Batching and the step budget."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Loop, logging, checkpoints (``trainer.max_steps`` is not used: see ``sft.max_steps``)."""


@dataclass
class RewardModelRunConfig(Section):
    """Everything a reward-model run reads (``rlhf-engine rm --config run.yaml key=value ...``)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The backbone: a causal LM checkpoint (a fresh value head is added; InstructGPT starts from the SFT model), a
    reward-model checkpoint (training continues), or a tiny random model."""
    data: DataConfig = field(default_factory=DataConfig)
    """Preference pairs (``chosen``/``rejected``, with or without ``prompt``) and the held-out split."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    rm: RewardModelConfig = field(default_factory=RewardModelConfig)
    """Batching and the loss."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Loop, logging, checkpoints (``trainer.max_steps`` is not used: see ``rm.max_steps``)."""


@dataclass
class DPORunConfig(Section):
    """Everything a DPO run reads (``rlhf-engine dpo --config run.yaml key=value ...``)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy; its initial weights are the frozen reference."""
    data: DataConfig = field(default_factory=DataConfig)
    """Preference pairs and the held-out split."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    dpo: DPOConfig = field(default_factory=DPOConfig)
    """Batching and the loss."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Loop, logging, checkpoints (``trainer.max_steps`` is not used: see ``dpo.max_steps``)."""


@dataclass
class PPORunConfig(Section):
    """Everything a PPO run reads (``rlhf-engine ppo --config run.yaml key=value ...``)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy (actor); its initial weights are the frozen reference."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompt sources and formatting (preference data gives its prompts)."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Rollout sampling."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """The actor's optimizer and schedule (the critic's lr is ``ppo.critic_lr``)."""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    """The algorithm, the reward model and the critic."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Loop, logging, checkpoints."""


# ------------------------------------------------------------------------------------------------ YAML / JSON I/O
def _yaml():
    try:
        import yaml
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("YAML configs need PyYAML (pip install pyyaml); JSON configs work without it") from err
    return yaml


_SCI_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
_YAML_CLASSES: tuple[Any, Any] | None = None


def _yaml_classes() -> tuple[Any, Any]:
    """``(Loader, Dumper)``: PyYAML's safe ones, also resolving ``1e-5`` as a float (YAML 1.1 wants a dot:
    ``1.0e-5``); the dumper then quotes strings such as ``'1e5'`` so that they read back as strings."""
    global _YAML_CLASSES
    if _YAML_CLASSES is None:
        yaml = _yaml()

        class Loader(yaml.SafeLoader):
            pass

        class Dumper(yaml.SafeDumper):
            pass

        for cls in (Loader, Dumper):
            cls.add_implicit_resolver("tag:yaml.org,2002:float", _SCI_FLOAT, list("-+0123456789"))
        _YAML_CLASSES = (Loader, Dumper)
    return _YAML_CLASSES


def parse_value(text: str) -> Any:
    """A command-line value as YAML: ``1e-5`` -> 1e-05, ``true`` -> True, ``[a, b]`` -> ['a', 'b'], ``null`` ->
    None, anything else that is not YAML syntax -> the string itself."""
    try:
        return _yaml().load(text, Loader=_yaml_classes()[0])
    except Exception:  # noqa: BLE001 - yaml.YAMLError; a value like "a: b: c" is just a string
        return text


def _read_file(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {p} {'is not a file' if p.exists() else 'does not exist'}")
    text = p.read_text()
    if p.suffix == ".json":
        data = json.loads(text)
    else:
        data = _yaml().load(text, Loader=_yaml_classes()[0])
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(  # noqa: TRY004 - bad file content, like a parse error
            f"config file {p} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def _leaf_type(cls: type, parts: list[str], full: str) -> Any:
    """The annotation of the field that the dotted ``parts`` address in ``cls`` (``Any`` inside a dict field)."""
    tp: Any = cls
    for i, part in enumerate(parts):
        inner, _ = _optional_inner(tp)
        if dataclasses.is_dataclass(inner):
            names = [f.name for f in dataclasses.fields(inner) if f.init]
            if part not in names:
                raise ConfigError(".".join(parts[: i + 1]), valid=names)
            tp = _hints(inner)[part]
        elif inner is dict or typing.get_origin(inner) is dict or inner is Any:
            return Any
        else:
            raise ConfigError(".".join(parts[:i]), f"is a value of type {_type_name(inner)}, not a section: cannot "
                                                   f"set '{full}'")
    return tp


def apply_overrides(cls: type, data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set each ``a.b.c=value`` of ``overrides`` in the raw mapping ``data`` (in place; returned), with the value
    parsed by ``parse_value``. Keys are checked against ``cls`` (unknown -> ``ConfigError`` listing the valid
    ones); a value for a string field is kept as typed (``model.path=001`` stays ``"001"``)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not p for p in key.split(".")):
            raise ValueError(f"override {item!r} must have the form 'section.field=value'")
        parts = key.split(".")
        tp = _leaf_type(cls, parts, key)
        value = parse_value(text)
        inner, _ = _optional_inner(tp)
        if inner is str and value is not None and not isinstance(value, str):
            value = text.strip()
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(".".join(parts[: i + 1]), f"must be a mapping to set '{key}', got {_show(child)}")
            node = child
        node[parts[-1]] = value
    return data


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> T:
    """Build the config dataclass ``cls`` from a YAML/JSON file (``.json`` is read as JSON, anything else as YAML;
    None: all defaults) and dotted ``overrides`` (``["grpo.num_generations=4", "optim.betas=[0.9, 0.95]"]``),
    applied in order after the file.

    Raises ``ValueError`` (``ConfigError``) for an unknown key anywhere (the message lists the valid keys of its
    section), a value of the wrong type (naming the field, the expected type and the value) or out of range (the
    section's ``validate``); the message always carries the full dotted key."""
    data = _read_file(path) if path is not None else {}
    apply_overrides(cls, data, list(overrides))
    return _build(cls, data, "")


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested dicts/lists/scalars (tuples become lists), in field order."""
    return _plain(cfg)


def save_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write the resolved ``cfg`` to ``path`` (YAML, or JSON when the name ends in ``.json``) through a temporary
    file and a rename; ``load_config(type(cfg), path)`` gives back an equal config. Returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.suffix == ".json":
        text = json.dumps(to_dict(cfg), indent=2) + "\n"
    else:
        text = _yaml().dump(to_dict(cfg), Dumper=_yaml_classes()[1], sort_keys=False, default_flow_style=False,
                            allow_unicode=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, p)
    return p


__all__ = [
    "ConfigError", "DPOConfig", "DPORunConfig", "DataConfig", "GRPOConfig", "GRPORunConfig", "GenerationConfig",
    "ModelConfig", "OptimConfig", "PPOConfig", "PPORunConfig", "PairTrainingConfig", "RewardModelConfig",
    "RewardModelRunConfig", "SFTConfig", "SFTRunConfig", "Section", "TrainerConfig", "apply_overrides", "load_config", "parse_value",
    "save_config", "to_dict",
]
