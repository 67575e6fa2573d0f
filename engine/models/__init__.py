"""Models: local checkpoint loading (``load_policy``), the generator's paged-KV forward of the Llama family that runs
on the HF module's own parameters (``LlamaFamilyModel``), and tiny random models/tokenizers for tests and demos."""

from engine.models.llama import SUPPORTED_MODEL_TYPES, LlamaFamilyModel, unsupported_reason
from engine.models.loading import load_policy, require_local_dir
from engine.models.tiny import PRESETS, tiny_config, tiny_model, train_bpe_tokenizer

__all__ = ["PRESETS", "SUPPORTED_MODEL_TYPES", "LlamaFamilyModel", "load_policy", "require_local_dir", "tiny_config",
           "tiny_model", "train_bpe_tokenizer", "unsupported_reason"]
