"""Run configuration: pydantic models read from YAML/JSON plus dotted command-line overrides, validated at once.

``load_config(GRPORunConfig, "run.yaml", ["grpo.num_generations=4", "optim.lr=1e-5"])`` reads the file, applies the
overrides (each value parsed as YAML, so ``1e-5``, ``true``, ``[a, b]`` and ``null`` mean what they look like) and
validates every field: an unknown key, a value of the wrong type or out of range raises ``ValueError`` (a
``ConfigError``) that names the full dotted key, what was expected and what was given, before any model is loaded.
A section built directly validates too (``GRPOConfig(clip_ratio_low=-0.1)`` raises, naming ``clip_ratio_low``).
``save_config`` writes the resolved config back (the trainer dumps it into the run directory).

Modules: ``base`` (the ``Section`` model, field types, ``ConfigError``), ``sections`` (model, data, generation,
optimizer, trainer, distributed), ``algorithms`` (GRPO, PPO, SFT, reward model, DPO), ``runs`` (one run config per command),
``loading`` (files, overrides, saving)."""

from engine.config.algorithms import (
    ROLLOUT_IS_LEVELS, DPOConfig, GRPOConfig, PairTrainingConfig, PolicyLossConfig, PPOConfig, RewardModelConfig,
    SFTConfig,
)
from engine.config.base import ConfigError, Section
from engine.config.loading import apply_overrides, load_config, parse_value, save_config, to_dict
from engine.config.runs import DPORunConfig, GRPORunConfig, PPORunConfig, RewardModelRunConfig, RunConfig, SFTRunConfig
from engine.config.sections import (
    ATTENTION_BACKENDS, LR_SCHEDULES, MODEL_ARCHS, MODEL_DTYPES, MODEL_PRESETS, DataConfig, DistributedConfig,
    GenerationConfig, ModelConfig, OptimConfig, TrainerConfig,
)

__all__ = [
    "ATTENTION_BACKENDS", "LR_SCHEDULES", "MODEL_ARCHS", "MODEL_DTYPES", "MODEL_PRESETS", "ROLLOUT_IS_LEVELS",
    "ConfigError", "DPOConfig", "DPORunConfig", "DataConfig", "DistributedConfig", "GRPOConfig", "GRPORunConfig", "GenerationConfig",
    "ModelConfig", "OptimConfig", "PPOConfig", "PPORunConfig", "PairTrainingConfig", "PolicyLossConfig",
    "RewardModelConfig", "RewardModelRunConfig", "RunConfig", "SFTConfig", "SFTRunConfig", "Section", "TrainerConfig",
    "apply_overrides", "load_config", "parse_value", "save_config", "to_dict",
]
