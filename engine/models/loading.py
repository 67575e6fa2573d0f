"""Load a causal LM checkpoint (a Hugging Face directory: ``config.json``, safetensors or ``.bin`` weights, tokenizer
files) from the local disk only, and fail early with an error that names the path and what is wrong with it.

Nothing is downloaded: a path that is not a directory is looked up in the local Hugging Face cache as a repo id
(``"Qwen/Qwen2.5-0.5B"`` works offline once it was downloaded), and otherwise is an error.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import transformers
from packaging.version import Version
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# transformers renamed from_pretrained's ``torch_dtype`` to ``dtype`` in 4.56 (the old name warns in 5.x)
_DTYPE_KWARG = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def _causal_lm_class_names() -> set[str]:
    names: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update([value] if isinstance(value, str) else value)
    return names


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str:
    """``None`` or ``"auto"`` -> ``"auto"`` (the checkpoint's saved dtype); ``"float32"``/``"bfloat16"``/
    ``"float16"`` or a floating ``torch.dtype`` -> that dtype. Raises ``ValueError`` for anything else."""
    if dtype is None:
        return "auto"
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"dtype must be a floating torch.dtype or one of {sorted(_DTYPES)}, got {dtype!r}")


def _looks_like_repo_id(path: str | os.PathLike) -> bool:
    """``"namespace/name"`` or ``"name"``: relative, at most one slash, not ``./...`` (could be a Hub repo id)."""
    text = str(path)
    return not Path(text).expanduser().is_absolute() and text.count("/") <= 1 and not text.startswith((".", "~"))


def _cached_snapshot(path: str | os.PathLike) -> Path | None:
    """The local Hugging Face cache's snapshot of the repo id ``path`` (no network), or None."""
    if not _looks_like_repo_id(path):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(path), local_files_only=True))
    except (OSError, ValueError):  # not a valid repo id, or not in the cache
        return None


def require_local_dir(path: str | os.PathLike, field: str) -> Path:
    """The directory that the setting ``field`` (``"model.path"``, ``"ppo.reward_model"``, ...) names: ``path``
    itself, or the cached snapshot of the repo id ``path`` (no network). Call it before handing ``path`` to
    transformers, which reports a missing local directory as a malformed Hub repo id.

    Raises ``FileNotFoundError`` naming ``field``, ``path`` (and, for a relative path, the absolute path it was
    looked for at) when nothing exists there, or when it is a file rather than a directory."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise FileNotFoundError(f"{field}={str(path)!r} is a file, not a directory (expected a checkpoint or run "
                                "directory)")
    cached = _cached_snapshot(path)
    if cached is not None:
        return cached
    where = "" if p.is_absolute() else f" (looked for at {p.absolute()})"
    hub = ", and it is not a repo id in the local Hugging Face cache (nothing is downloaded)" \
        if _looks_like_repo_id(path) else ""
    raise FileNotFoundError(f"{field}={str(path)!r}: the directory does not exist{where}{hub}")


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """The local directory of a checkpoint: ``path`` itself, or the cached snapshot of the repo id ``path`` (no
    network). Raises ``FileNotFoundError`` when neither exists, and when the directory has no ``config.json``."""
    p = Path(path).expanduser()
    if not p.exists():
        cached = _cached_snapshot(path)
        if cached is None:
            raise FileNotFoundError(f"model path {str(path)!r} does not exist (and is not a repo id in the local "
                                    "Hugging Face cache; nothing is downloaded)")
        p = cached
    if not p.is_dir():
        raise FileNotFoundError(f"model path {str(p)!r} is not a directory (expected a Hugging Face checkpoint "
                                "directory with config.json and weights)")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"model directory {str(p)!r} has no config.json")
    return p


def resolve_model_dir(path: str | Path) -> Path:
    """A model directory, or the newest complete checkpoint of a run directory (one holding ``checkpoints/``)."""
    from engine.runs.checkpoint import find_latest_checkpoint  # here: runs -> algorithms -> models at import

    path = Path(path)
    if (path / "checkpoints").is_dir():
        latest = find_latest_checkpoint(path)
        if latest is None:
            raise ValueError(f"{path} is a run directory without a complete checkpoint")
        return latest
    return path


def load_policy(path: str | os.PathLike, *, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
                trust_remote_code: bool = False) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Load a causal LM and its tokenizer from a local checkpoint directory (``save_pretrained`` layout), offline.

    Args:
        path: the checkpoint directory, or a repo id already in the local Hugging Face cache.
        dtype: parameter dtype: a floating ``torch.dtype``, ``"float32"``, ``"bfloat16"``, ``"float16"``, or
            ``"auto"``/``None`` for the dtype saved in ``config.json`` (float32 when it names none).
        device: where the model is moved after loading.
        trust_remote_code: passed to transformers (custom modelling code shipped with the checkpoint).

    Returns:
        ``(model, tokenizer)``: the ``*ForCausalLM`` in eval mode on ``device``, and the tokenizer, or ``None`` when the
        directory holds no tokenizer files (``tokenizer.json``, ``tokenizer_config.json``, ``tokenizer.model``,
        ``vocab.json``).

    Raises:
        FileNotFoundError: the path does not exist, is not a directory, has no ``config.json``, or has no weights file.
        ValueError: bad ``dtype``; unreadable ``config.json``; an architecture that is not a causal LM (e.g. a
            ``BertModel`` or a ``*ForSequenceClassification`` reward model); corrupt or truncated weights; weights
            missing from the checkpoint (they would be randomly initialised); an unreadable tokenizer.
    """
    torch_dtype = resolve_dtype(dtype)
    p = resolve_checkpoint_dir(path)
    try:
        config = AutoConfig.from_pretrained(p, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ValueError(f"cannot read {p / 'config.json'}: {type(e).__name__}: {e}") from e
    _check_causal_lm(config, p, trust_remote_code)
    if not any(f.name.endswith(_WEIGHT_SUFFIXES) for f in p.iterdir()):
        raise FileNotFoundError(f"model directory {str(p)!r} has no weights file (*.safetensors, "
                                "model.safetensors.index.json or pytorch_model.bin)")
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            p, config=config, local_files_only=True, trust_remote_code=trust_remote_code, output_loading_info=True,
            **{_DTYPE_KWARG: torch_dtype})
    except Exception as e:  # safetensors' SafetensorError, torch's unpickling errors, OSError, shape mismatches...
        raise ValueError(f"cannot load the weights in {str(p)!r} (corrupt or truncated file?): "
                         f"{type(e).__name__}: {e}") from e
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise ValueError(f"the checkpoint in {str(p)!r} lacks weights of {type(model).__name__}: {shown}; they would "
                         "be randomly initialised")
    model = model.to(device).eval()
    return model, _load_tokenizer(p, trust_remote_code)


def _check_causal_lm(config, p: Path, trust_remote_code: bool) -> None:
    """Raise ``ValueError`` unless ``config`` describes a causal LM (its saved ``architectures``, else its type)."""
    if trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}):
        return
    model_type = getattr(config, "model_type", None)
    archs = list(getattr(config, "architectures", None) or [])
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"the model in {str(p)!r} (model_type={model_type!r}, architectures={archs}) is not a "
                         "causal language model known to transformers' AutoModelForCausalLM")
    if archs and not set(archs) & _causal_lm_class_names():
        raise ValueError(f"the checkpoint in {str(p)!r} was saved as {archs}, which is not a causal LM "
                         f"(expected e.g. {MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]!r}); its LM head would be "
                         "randomly initialised")


def _load_tokenizer(p: Path, trust_remote_code: bool) -> PreTrainedTokenizerBase | None:
    if not any((p / name).is_file() for name in _TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(p, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ValueError(f"cannot load the tokenizer in {str(p)!r}: {type(e).__name__}: {e}") from e
