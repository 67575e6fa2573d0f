"""The run configs, one per command (``rlhf-engine {grpo,sft,rm,dpo,ppo} --config run.yaml key=value ...``): the
sections of ``RunConfig`` that every run reads, plus the run's algorithm section (and rollout sampling for GRPO and
PPO)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from engine.config.algorithms import DPOConfig, GRPOConfig, PPOConfig, RewardModelConfig, SFTConfig
from engine.config.base import ConfigError, Section
from engine.config.sections import (
    DataConfig,
    DistributedConfig,
    GenerationConfig,
    ModelConfig,
    OptimConfig,
    TrainerConfig,
)


class RunConfig(Section):
    """What every run reads. A section left empty in the file (``model:``) takes its defaults."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    """The model to train: the policy (its initial weights are the frozen reference of DPO and PPO, and of GRPO
    when ``grpo.kl_coef > 0``), or the backbone of a reward model."""
    data: DataConfig = Field(default_factory=DataConfig)
    """Data sources and formatting: prompts (GRPO, PPO; preference data gives its prompts), prompt/completion pairs
    (SFT) or preference pairs (reward model, DPO), and the held-out split."""
    optim: OptimConfig = Field(default_factory=OptimConfig)
    """Optimizer and schedule (of PPO's actor: the critic's lr is ``ppo.critic_lr``)."""
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    """Loop, logging, checkpoints (``trainer.max_steps`` is the step budget of GRPO and PPO only: SFT, reward-model
    and DPO runs use ``sft.max_steps`` / ``rm.max_steps`` / ``dpo.max_steps``)."""
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    """Multi-process runs under ``torchrun``: collective timeout, FSDP2 resharding, activation checkpointing."""

    @model_validator(mode="before")
    @classmethod
    def _all_sections(cls, data: Any) -> Any:
        """Each section absent or empty (``model:``) as ``{}``: its defaults, validated under its name."""
        if not isinstance(data, dict):
            return data
        return {**dict.fromkeys(cls.model_fields, {}), **{k: v for k, v in data.items() if v is not None}}


class GRPORunConfig(RunConfig):
    """Everything a GRPO run reads (``rlhf-engine grpo --config run.yaml key=value ...``)."""

    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    """Rollout sampling."""
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    """The algorithm."""

    @model_validator(mode="after")
    def _buffer_inside_max_tokens(self) -> GRPORunConfig:
        if self.grpo.overlong_buffer_len >= self.generation.max_tokens:
            raise ConfigError("grpo.overlong_buffer_len", f"must be below generation.max_tokens "
                              f"({self.generation.max_tokens}): the punishment starts that many tokens before it, "
                              f"got {self.grpo.overlong_buffer_len}")
        return self


class SFTRunConfig(RunConfig):
    """Everything an SFT run reads (``rlhf-engine sft --config run.yaml key=value ...``)."""

    sft: SFTConfig = Field(default_factory=SFTConfig)
    """Batching and the step budget."""


class RewardModelRunConfig(RunConfig):
    """Everything a reward-model run reads (``rlhf-engine rm --config run.yaml key=value ...``). The model is the
    backbone: a causal LM checkpoint (a fresh value head is added; InstructGPT starts from the SFT model), a
    reward-model checkpoint (training continues), or a tiny random model; the data are preference pairs
    (``chosen``/``rejected``, with or without ``prompt``)."""

    rm: RewardModelConfig = Field(default_factory=RewardModelConfig)
    """Batching and the loss."""


class DPORunConfig(RunConfig):
    """Everything a DPO run reads (``rlhf-engine dpo --config run.yaml key=value ...``)."""

    dpo: DPOConfig = Field(default_factory=DPOConfig)
    """Batching and the loss."""


class PPORunConfig(RunConfig):
    """Everything a PPO run reads (``rlhf-engine ppo --config run.yaml key=value ...``)."""

    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    """Rollout sampling."""
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    """The algorithm, the reward model and the critic."""
