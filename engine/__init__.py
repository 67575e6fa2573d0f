"""rlhf-engine: models, rollout generation, RL algorithms, the trainer and the CLI (built on ``kernels``)."""

import logging as _logging
import sys as _sys

import kernels as _kernels

if not getattr(_kernels, "__rlhf_engine_kernels__", False):  # pragma: no cover - depends on the environment
    raise ImportError(
        f"the top-level package 'kernels' imported from {getattr(_kernels, '__file__', '?')} is not rlhf-engine's: "
        "Hugging Face's 'kernels' distribution (hub kernel loader) installs a package of the same name. "
        "Uninstall it (pip uninstall kernels) or use a separate virtual environment for rlhf-engine."
    )

__version__ = "0.1.0"


class _StdoutHandler(_logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at the time of the record (so redirections and test capture see it)."""

    @property
    def stream(self):
        return _sys.stdout

    @stream.setter
    def stream(self, _value):
        pass


class _Formatter(_logging.Formatter):
    def format(self, record):
        prefix = "warning: " if record.levelno >= _logging.WARNING else ""
        return f"[rlhf-engine] {prefix}{record.getMessage()}"


# The engine's one logger, "rlhf_engine" (children: "rlhf_engine.checkpoint", ...). Like transformers, it prints its
# INFO messages to stdout by default, as "[rlhf-engine] message" ("[rlhf-engine] warning: ..." for warnings); to route them through your own logging setup
# instead, remove this handler: logging.getLogger("rlhf_engine").handlers.clear().
logger = _logging.getLogger("rlhf_engine")
if not logger.handlers:
    _handler = _StdoutHandler()
    _handler.setFormatter(_Formatter())
    logger.addHandler(_handler)
    logger.setLevel(_logging.INFO)

__all__ = ["CompletionOutput", "Generator", "RequestOutput", "SamplingParams", "__version__", "logger"]

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


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
