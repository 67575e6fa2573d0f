"""rlhf-engine: models, rollout generation, RL algorithms, the trainer and the CLI (built on ``kernels``)."""

import kernels as _kernels

if not getattr(_kernels, "__rlhf_engine_kernels__", False):  # pragma: no cover - depends on the environment
    raise ImportError(
        f"the top-level package 'kernels' imported from {getattr(_kernels, '__file__', '?')} is not rlhf-engine's: "
        "Hugging Face's 'kernels' distribution (hub kernel loader) installs a package of the same name. "
        "Uninstall it (pip uninstall kernels) or use a separate virtual environment for rlhf-engine."
    )

__version__ = "0.1.0"

_LAZY = {
    "Generator": "engine.generation.generator",
    "SamplingParams": "engine.generation.sampling_params",
    "RequestOutput": "engine.generation.outputs",
    "CompletionOutput": "engine.generation.outputs",
}


def __getattr__(name: str):
    """``from engine import Generator, SamplingParams`` without importing transformers on ``import engine``."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
