"""Models: local checkpoint loading (``load_policy``), the builders a trainer uses (``build_policy``: a checkpoint or a
tiny random model with its tokenizer), the value model (reward model and critic), and tiny random models/tokenizers
for tests and demos. The generator's paged-KV forward over these models' parameters lives in
``engine.generation.model_runner``: ``generation`` reads ``models``' modules, never the other way round."""

from engine.models.loading import load_policy, require_local_dir
from engine.models.tiny import PRESETS, tiny_config, tiny_model, train_bpe_tokenizer

__all__ = ["PRESETS", "load_policy", "require_local_dir", "tiny_config", "tiny_model", "train_bpe_tokenizer"]
