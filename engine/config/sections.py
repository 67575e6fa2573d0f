"""The sections every run shares: the model (``ModelConfig``), the data (``DataConfig``), rollout sampling
(``GenerationConfig``), the optimizer (``OptimConfig``) and the loop around the algorithm (``TrainerConfig``)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from engine.config.base import ConfigError, Int, Section, Text

# Kept here so that reading a config imports neither transformers nor the generator; tests check that they match
# engine.models.tiny.ARCHS / PRESETS and engine.generation.attention.ATTENTION_BACKENDS.
MODEL_ARCHS = ("llama", "qwen2", "qwen3", "mistral")
MODEL_PRESETS = ("llama-3.2-1b", "qwen2.5-0.5b")
MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTENTION_BACKENDS = ("auto", "flash_attn", "triton", "torch")
LR_SCHEDULES = ("constant", "linear", "cosine")

Beta = Annotated[float, Field(ge=0, lt=1)]
Betas = Annotated[tuple[Beta, Beta], BeforeValidator(lambda v: tuple(v) if isinstance(v, list) else v)]  # YAML: a list


class ModelConfig(Section):
    """The policy model and its tokenizer."""

    path: Text | None = None
    """A local Hugging Face model directory (``config.json`` + safetensors), or null for a tiny random model of
    ``arch`` / ``preset`` (tests, demos, CPU smoke runs)."""
    arch: Literal[MODEL_ARCHS] = "llama"
    """Architecture of the tiny random model: llama, qwen2, qwen3 or mistral. Ignored when ``path`` is set (the
    checkpoint's ``config.json`` decides)."""
    preset: Literal[MODEL_PRESETS] | None = None
    """Published dimensions for the random model (``qwen2.5-0.5b``, ``llama-3.2-1b``; must match ``arch``); null for
    the tiny defaults. Ignored when ``path`` is set."""
    dtype: Literal[MODEL_DTYPES] = "auto"
    """Parameter dtype: auto (bfloat16 on CUDA, float32 on the CPU), float32, bfloat16 or float16. Training computes
    under autocast to a bf16/fp16 dtype (with float32 master weights in the optimizer); float32 runs everything in
    float32, generation included."""
    tokenizer: Text | None = None
    """Tokenizer directory; null means ``path``'s own, or for a random model the character tokenizer
    (``engine.data.char_tokenizer``). ``bpe`` or ``bpe:N`` (random model only) trains a byte-level BPE of at most N
    tokens (default 2048) on the run's training texts (``engine.models.train_bpe_tokenizer``); it is saved with every
    checkpoint, so later runs that start from this one use it."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, about a third more compute)."""
    tiny_overrides: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword arguments of ``engine.models.tiny_model`` for the random model (``hidden_size``, ``num_layers``,
    ``tie_word_embeddings``, ...). Ignored when ``path`` is set."""

    @model_validator(mode="after")
    def _bpe_tokenizer(self) -> ModelConfig:
        tok = self.tokenizer
        if tok is not None and tok.startswith("bpe"):
            if not re.fullmatch(r"bpe(:\d+)?", tok):
                raise ConfigError("tokenizer", f"must be a directory, 'bpe' or 'bpe:N', got {tok!r}")
            if self.path is not None:
                raise ConfigError("tokenizer", f"{tok!r} trains a tokenizer for a random model; with "
                                  f"path={self.path!r} the checkpoint's tokenizer is used")
        return self


class DataConfig(Section):
    """Where prompts come from and how they are turned into model input."""

    train: Text = "builtin:arithmetic"
    """Training prompts: ``builtin:<task>`` (generated offline), a ``.jsonl``/``.json``/``.parquet`` file, a
    directory of split files, or a Hugging Face dataset name (needs ``datasets``); read by ``engine.data``."""
    eval: Text | None = None
    """Evaluation prompts, in the same forms as ``train``; null: the held-out split of a built-in task, or none."""
    prompt_field: Text = "prompt"
    """Column holding the prompt: a string, or a list of chat messages (TRL's conversational format)."""
    answer_field: Text = "answer"
    """Column holding the reference answer passed to the reward functions (as the keyword argument ``answer``
    whatever the column is called)."""
    template: str | None = None
    """A plain prompt template with a ``{prompt}`` placeholder (and optionally ``{system}``), used even when the
    tokenizer has a chat template; null: the tokenizer's chat template when it has one, else
    ``"Question: {prompt}\\nAnswer:"`` (``engine.data.format_prompt``)."""
    system_prompt: str | None = None
    """System message prepended when the chat template is used; null for none."""
    max_prompt_tokens: Int = Field(256, ge=1)
    """Longest prompt, in tokens; longer prompts are left out of the data (a truncated question is another
    question). Preference pairs (reward model, DPO) instead keep the last ``max_prompt_tokens`` tokens of a longer
    prompt (the most recent turns of the dialogue)."""
    max_length: Int = Field(1024, ge=2)
    """Longest SFT example, in tokens: prompt + completion + EOS. A longer completion is cut at the end to fit (its
    EOS kept, so the model still learns to stop) and the run prints how many were cut; >= 2, and an SFT run needs it
    above ``max_prompt_tokens``. GRPO/PPO completions are bounded by ``generation.max_tokens`` instead, reward-model
    and DPO pairs by ``rm.max_length`` / ``dpo.max_length``."""
    num_eval: Int = Field(200, ge=0)
    """At most this many evaluation examples are scored (the first ones, in a fixed order); 0 means all of them."""
    seed: Int = Field(0, ge=0)
    """Seed of the data order (and of the built-in task generators). The order is a pure function of
    ``(seed, step)``, so a resumed run sees the same prompts."""

    @field_validator("template")
    @classmethod
    def _has_prompt(cls, template: str | None) -> str | None:
        if template is not None and "{prompt}" not in template:
            raise ValueError("must contain '{prompt}' or be null")
        return template


class GenerationConfig(Section):
    """Rollout sampling and the generator's memory (``engine.Generator``, ``engine.SamplingParams``)."""

    max_tokens: Int = Field(64, ge=1)
    """Most tokens generated per completion; longer ones end with ``finish_reason="length"``."""
    temperature: float = Field(1.0, ge=0)
    """Sampling temperature; 0 is greedy (every sample of a group is then the same)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass, in (0, 1]; 1 is off. Anything but 1 makes the sampled distribution differ from the
    policy's, which the trainer's log-probs do not model."""
    top_k: Int = Field(0, ge=-1)
    """Keep the k most likely tokens; 0 (or -1) is off."""
    attention_backend: Literal[ATTENTION_BACKENDS] | None = None
    """Generator attention backend: auto, flash_attn, triton or torch; null means auto (the fastest that runs)."""
    kv_cache_memory_mb: Int | None = Field(None, ge=1)
    """Memory of the paged KV cache in MiB; null lets the generator size it from free memory."""
    max_num_seqs: Int = Field(256, ge=1)
    """Most sequences decoded together in one generator step (continuous batching)."""


class OptimConfig(Section):
    """AdamW and the learning-rate schedule (``engine.algorithms.optim``)."""

    lr: float = Field(1e-5, gt=0)
    """Peak learning rate (after warmup)."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW decoupled weight decay; biases and norm weights are never decayed."""
    betas: Betas = (0.9, 0.999)
    """AdamW ``(beta1, beta2)``, each in [0, 1)."""
    eps: float = Field(1e-8, gt=0)
    """AdamW epsilon."""
    warmup_steps: Int = Field(0, ge=0)
    """Optimizer steps of linear warmup from lr/warmup_steps to lr."""
    schedule: Literal[LR_SCHEDULES] = "constant"
    """After warmup: constant, linear or cosine decay to ``min_lr_ratio * lr`` at the last step."""
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    """Floor of the decay as a fraction of ``lr``, in [0, 1]."""
    max_grad_norm: float = Field(1.0, gt=0, allow_inf_nan=True)
    """Clip the global gradient norm to this (> 0; ``.inf`` turns clipping off but the norm is still computed for the
    non-finite check)."""
    master_weights: bool = True
    """For bf16/fp16 parameters (``model.dtype`` auto on CUDA): step float32 master copies and write the rounded
    result back (``engine.algorithms.optim.MasterWeightAdamW``). False steps the low-precision parameters directly, which loses
    updates smaller than half an ulp of the weight (most of them at RL learning rates)."""


class TrainerConfig(Section):
    """The loop around the algorithm: steps, seeds, logging, evaluation, checkpoints, failure handling."""

    output_dir: Text = "runs/run"
    """Run directory: resolved config, metrics JSONL, checkpoints (``checkpoints/step-XXXXXXXX``)."""
    max_steps: Int = Field(100, ge=1)
    """Optimizer steps of the run (GRPO: one rollout batch per step)."""
    seed: Int = Field(0, ge=0)
    """Seed of python/numpy/torch RNGs and of the sampler; the whole run is a function of it."""
    log_every: Int = Field(1, ge=1)
    """Write metrics every this many steps."""
    eval_every: Int = Field(0, ge=0)
    """Evaluate on ``data.eval`` every this many steps; 0 means never."""
    save_every: Int = Field(0, ge=0)
    """Save a checkpoint every this many steps; 0 means only the final one at the end of the run."""
    keep_last: Int = Field(2, ge=1)
    """Complete checkpoints kept on disk; older ones are deleted after a new one is committed."""
    resume: Text | None = None
    """null: start fresh (refused when ``output_dir`` already holds a run, unless ``overwrite``); ``auto``: resume
    from the newest complete checkpoint in ``output_dir`` if there is one; a path: resume from that checkpoint (it
    must be complete)."""
    overwrite: bool = False
    """Start fresh in an ``output_dir`` that already holds a run: its contents (checkpoints, metrics, configs) are
    moved aside into ``output_dir/.overwritten-<time>-<pid>/`` first, never mixed with the new run's. False refuses
    to start."""
    zero_grad_warn_steps: Int = Field(5, ge=1)
    """Warn when the gradient norm is exactly 0 this many optimizer steps in a row (a dead model: nothing learns)."""
    max_consecutive_nonfinite: Int = Field(3, ge=1)
    """Steps with a non-finite loss or grad norm are skipped (no optimizer step); this many in a row abort the run."""
    device: str = "auto"
    """auto (CUDA when available, else CPU), cpu, cuda, cuda:N or mps."""
    tensorboard: bool = False
    """Also log to TensorBoard under ``output_dir/tensorboard`` (needs the tensorboard package)."""
    wandb: bool = False
    """Also log to Weights & Biases (needs wandb and a login; off by default: no network unless asked)."""
    progress_bar: bool = True
    """Show a tqdm progress bar (only when stdout is a terminal)."""

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", device):
            raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
        return device


class DistributedConfig(Section):
    """Data-parallel sharded training under ``torchrun`` (FSDP2, ``engine.distributed``); a single process ignores
    it. One process per device; ``trainer.device=auto`` picks ``cuda:LOCAL_RANK``; NCCL on GPUs, gloo on the CPU."""

    timeout_s: float = Field(600.0, gt=0)
    """Seconds a collective may wait (``init_process_group(timeout=...)``): a hung rank fails the run with a message
    instead of waiting torch's default 30 minutes."""
    reshard_after_forward: bool = True
    """FSDP frees the gathered parameters of a layer after its forward (less memory, one more all-gather in the
    backward); False keeps them until the backward."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward instead of keeping them (memory for time)."""
    offload_reference: bool = False
    """Keep the sharded reference policy (GRPO/PPO with a KL term) in CPU memory, gathered to the GPU per use (a CPU
    run has it there already: ignored)."""
