"""Checkpoints: HF-loadable weights plus everything needed to resume a run exactly, committed atomically.

Layout of ``run_dir/checkpoints/step-00000120/``::

    config.json, generation_config.json, model.safetensors   the model (``save_pretrained``: ``from_pretrained`` works)
    tokenizer.json, tokenizer_config.json, ...                 when a tokenizer is passed
    optimizer.pt, scheduler.pt                                 their ``state_dict()``s (``torch.save``)
    rng.pt                                                     ``capture_rng_state()``
    trainer_state.json                                         the caller's dict (data position, counters, ...)
    critic/  (model + optimizer.pt + scheduler.pt)             each extra component (``components=``), e.g. PPO's critic
    COMPLETE                                                   JSON marker (step, versions, time), written last

Everything is written into a temporary sibling ``.tmp-step-00000120-<pid>``, the files are fsync'd, the marker is
written and fsync'd last, and the directory is renamed into place with ``os.replace`` (atomic on POSIX): a crash
leaves either the previous state or the complete new checkpoint, never a half-written ``step-*``. A ``step-*``
directory without the marker (from another writer, or a copy interrupted by hand) is ignored with a warning and
deleted by the next save, as are leftover ``.tmp-*`` directories.

Single writer: call ``save_checkpoint`` on one process (rank 0) only. ``.pt`` files are read back with
``torch.load(weights_only=True)``: only tensors and plain Python containers/scalars, no arbitrary pickles.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.algorithms.optim import NonFiniteWeightsError, nonfinite_tensors
from engine.distributed.checkpoint import full_state_dict, load_full, load_sharded, save_sharded
from engine.distributed.context import any_rank, barrier, broadcast_object, current
from engine.distributed.fsdp import is_sharded

logger = logging.getLogger("rlhf_engine.checkpoint")

MARKER = "COMPLETE"
CHECKPOINTS_DIR = "checkpoints"
_STEP_RE = re.compile(r"^step-(\d+)$")
_TMP_PREFIX = ".tmp-"


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """``run_dir/checkpoints/step-{step:08d}``: where ``save_checkpoint`` commits step ``step``."""
    return Path(run_dir) / CHECKPOINTS_DIR / f"step-{step:08d}"


def is_complete(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a checkpoint directory with its ``COMPLETE`` marker."""
    return (Path(path) / MARKER).is_file()


# ------------------------------------------------------------------------------------------------ RNG state
def capture_rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """The state of every random number generator a run draws from: python ``random``, numpy's global generator,
    torch's CPU generator, each CUDA device's generator (when CUDA is available), and the named extra
    ``generators`` (the sampler's, a data shuffler's, ...). Tensors and plain values only (``weights_only``-safe)."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    return state


def restore_rng_state(state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Put back what ``capture_rng_state`` captured; each of ``generators`` gets the state saved under its name.

    CUDA states are restored when CUDA is available (on as many devices as both sides have; a different count is
    logged); a checkpoint from a CUDA run resumed on the CPU skips them with a warning. Raises ``ValueError`` when
    one of ``generators`` has no saved state."""
    random.setstate(_as_tuple(state["python"]))
    ns = state["numpy"]
    np.random.set_state({"bit_generator": ns["bit_generator"],
                         "state": {"key": ns["key"].numpy().astype(np.uint32), "pos": int(ns["pos"])},
                         "has_gauss": int(ns["has_gauss"]), "gauss": float(ns["gauss"])})
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None:
        if not torch.cuda.is_available():
            logger.warning("checkpoint holds CUDA RNG states but CUDA is not available; they are not restored")
        else:
            n = torch.cuda.device_count()
            if n != len(cuda):
                logger.warning("checkpoint holds %d CUDA RNG states, this process sees %d devices; restoring %d",
                               len(cuda), n, min(n, len(cuda)))
            for i in range(min(n, len(cuda))):
                torch.cuda.set_rng_state(cuda[i], device=i)
    saved = state.get("generators", {})
    for name, gen in (generators or {}).items():
        if name not in saved:
            raise ValueError(f"no saved RNG state for generator {name!r}; the checkpoint has {sorted(saved)}")
        gen.set_state(saved[name])


def _as_tuple(x: Any) -> Any:
    """Lists back to tuples, recursively (``random.setstate`` wants the tuple it gave)."""
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# ------------------------------------------------------------------------------------------------ save
def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _save_model(model: torch.nn.Module, path: Path, state_dict: dict | None = None) -> None:
    """``save_pretrained`` (safetensors), of ``state_dict`` when given (a sharded model's gathered weights)."""
    params = inspect.signature(model.save_pretrained).parameters
    kwargs = {} if state_dict is None else {"state_dict": state_dict}
    if "safe_serialization" in params:  # transformers 4.x; 5.x always writes safetensors
        kwargs["safe_serialization"] = True
    model.save_pretrained(path, **kwargs)


def _write_model_state(folder: Path, *, model, optimizer, scheduler) -> None:
    _save_model(model, folder)
    if optimizer is not None:
        torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    if scheduler is not None:
        torch.save(scheduler.state_dict(), folder / "scheduler.pt")


def _write_files(tmp: Path, step: int, *, model, tokenizer, optimizer, scheduler, rng_state, trainer_state,
                 components) -> None:
    """Every file of the checkpoint but the marker, into ``tmp``."""
    _write_model_state(tmp, model=model, optimizer=optimizer, scheduler=scheduler)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    for name, parts in (components or {}).items():
        (tmp / name).mkdir()
        _write_model_state(tmp / name, model=parts["model"], optimizer=parts.get("optimizer"),
                           scheduler=parts.get("scheduler"))
    if rng_state is not None:
        torch.save(rng_state, tmp / "rng.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(dict(trainer_state or {}), indent=2, sort_keys=True))


def _write_marker(tmp: Path, step: int) -> None:
    import transformers

    from engine import __version__

    info = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "engine": __version__,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "files": sorted(p.name for p in tmp.iterdir())}
    with open(tmp / MARKER, "w") as f:
        f.write(json.dumps(info, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(run_dir: str | os.PathLike, step: int, *, model, tokenizer=None, optimizer=None, scheduler=None,
                    rng_state: Mapping[str, Any] | None = None, trainer_state: Mapping[str, Any] | None = None,
                    keep_last: int = 2, components: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """Commit a checkpoint of step ``step`` to ``run_dir/checkpoints/step-{step:08d}`` and return that path.

    Args:
        run_dir: the run's output directory.
        step: optimizer steps done (the resumed run starts at step ``step``).
        model: a ``transformers`` ``PreTrainedModel`` (saved with ``save_pretrained``, safetensors).
        tokenizer: saved with ``save_pretrained`` next to the model when given.
        optimizer, scheduler: their ``state_dict()`` go to ``optimizer.pt`` / ``scheduler.pt``.
        rng_state: ``capture_rng_state()``, taken by the caller at the point the resumed run should continue from.
        trainer_state: a JSON-serialisable dict (data position, metric counters, ...), returned by
            ``load_checkpoint``.
        components: further models saved in sub-directories of the checkpoint, ``{name: {"model": m,
            "optimizer": o, "scheduler": s}}`` (optimizer and scheduler optional), e.g. PPO's critic under
            ``critic/``; names are plain identifiers. ``load_checkpoint(components=...)`` restores them.
        keep_last: complete checkpoints kept afterwards (>= 1): the new one plus the ``keep_last - 1`` others of
            highest step; older ones are deleted only after the new one is committed. Torn ``step-*`` dirs and
            leftover ``.tmp-*`` dirs are deleted too.

    A failure while writing (an exception, a full disk) removes the temporary directory and re-raises: the
    checkpoints already committed are untouched. An existing checkpoint of the same step is replaced.

    Raises ``NonFiniteWeightsError`` (nothing written) when a weight of ``model`` or of a component holds NaN or inf:
    a checkpoint is only ever written from finite weights.

    Under ``torchrun`` every rank calls it (``_save_distributed``): the model and optimizer state go to a DCP folder
    ``dcp/`` (each rank its shards), rank 0 writes the full weights in the HF layout, the scheduler, the trainer
    state and the marker, and each rank its RNG state (``rng-rank<r>.pt``).
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    for name in components or {}:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or name == CHECKPOINTS_DIR:
            raise ValueError(f"component names must be plain identifiers, got {name!r}")
    if current().enabled:
        return _save_distributed(run_dir, step, model=model, tokenizer=tokenizer, optimizer=optimizer,
                                 scheduler=scheduler, rng_state=rng_state, trainer_state=trainer_state,
                                 keep_last=keep_last, components=components)
    for name, m in [("model", model)] + [(f"{c}/model", parts["model"]) for c, parts in (components or {}).items()]:
        bad = nonfinite_tensors(list(m.state_dict().items()))
        if bad:  # never commit poisoned weights: the older checkpoints stay the newest usable ones
            raise NonFiniteWeightsError(f"refusing to save checkpoint step {step} to {run_dir}: {len(bad)} tensors of "
                                        f"the {name} are non-finite ({bad[:4]}{'...' if len(bad) > 4 else ''})")
    final = checkpoint_dir(run_dir, step)
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{_TMP_PREFIX}{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    replaced = root / f"{_TMP_PREFIX}replaced-{final.name}-{os.getpid()}"
    try:
        _write_files(tmp, step, model=model, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler,
                     rng_state=rng_state, trainer_state=trainer_state, components=components)
        _commit(tmp, final, step, replaced)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if replaced.exists() and not final.exists():
            os.replace(replaced, final)
        raise
    _prune(root, keep=final, keep_last=keep_last)
    logger.info("saved checkpoint %s", final)
    return final


def _commit(tmp: Path, final: Path, step: int, replaced: Path) -> None:
    """fsync every file of ``tmp``, write the marker, and rename ``tmp`` to ``final`` (an older ``final`` moved to
    ``replaced`` first)."""
    for p in tmp.rglob("*"):
        if p.is_file():
            _fsync_file(p)
    _write_marker(tmp, step)
    _fsync_dir(tmp)
    if final.exists():  # the same step saved again: move the old one aside, it is deleted below
        os.replace(final, replaced)
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def _save_distributed(run_dir, step: int, *, model, tokenizer, optimizer, scheduler, rng_state, trainer_state,
                      keep_last: int, components) -> Path:
    """``save_checkpoint`` of a multi-process run (every rank calls it; see there)."""
    ctx = current()
    parts = [("", model, optimizer, scheduler)] + [(name, c["model"], c.get("optimizer"), c.get("scheduler"))
                                                    for name, c in (components or {}).items()]
    full = [full_state_dict(m) for _, m, _, _ in parts]  # collectives: every rank, in the same order
    bad = [f"{name or 'model'}: {b[:4]}" for (name, *_), state in zip(parts, full)
           for b in [nonfinite_tensors(list(state.items()))] if b]
    if any_rank(bool(bad)):  # rank 0 holds the full weights: it decides, every rank raises
        raise NonFiniteWeightsError(f"refusing to save checkpoint step {step} to {run_dir}: non-finite weights "
                                    f"({'; '.join(bad) or 'on rank 0'})")
    final = checkpoint_dir(run_dir, step)
    root = final.parent
    tmp = root / f"{_TMP_PREFIX}{final.name}-{broadcast_object(os.getpid())}"
    replaced = root / f"{_TMP_PREFIX}replaced-{final.name}-{os.getpid()}"
    if ctx.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    try:
        for (name, m, opt, _), state in zip(parts, full):
            save_sharded(tmp / name / "dcp", m, opt)
        if rng_state is not None:
            torch.save(rng_state, tmp / f"rng-rank{ctx.rank}.pt")
        if ctx.is_main:
            for (name, m, _, sched), state in zip(parts, full):
                (tmp / name).mkdir(exist_ok=True)
                _save_model(m, tmp / name, state_dict=state)
                if sched is not None:
                    torch.save(sched.state_dict(), tmp / name / "scheduler.pt")
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            (tmp / "trainer_state.json").write_text(json.dumps(dict(trainer_state or {}), indent=2, sort_keys=True))
        barrier()
        if ctx.is_main:
            _commit(tmp, final, step, replaced)
    except BaseException:
        if ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier()
    if ctx.is_main:
        _prune(root, keep=final, keep_last=keep_last)
        logger.info("saved checkpoint %s", final)
    return final


def _scan(root: Path) -> tuple[list[tuple[int, Path]], list[Path]]:
    """``(complete checkpoints sorted by step, torn step-* dirs)`` under ``root``."""
    complete, torn = [], []
    if root.is_dir():
        for p in root.iterdir():
            m = _STEP_RE.match(p.name)
            if m and p.is_dir():
                (complete if is_complete(p) else torn).append((int(m.group(1)), p))
    complete.sort()
    return complete, [p for _, p in sorted(torn)]


def _prune(root: Path, *, keep: Path, keep_last: int) -> None:
    """Delete the complete checkpoints beyond ``keep_last`` (oldest first), torn ``step-*`` dirs and leftover
    ``.tmp-*`` dirs. Each ``step-*`` dir is first renamed to a ``.tmp-pruned-*`` name (atomic), then deleted: a crash
    halfway through a deletion leaves a ``.tmp-*`` dir that nothing reads (and the next save removes), never a
    ``COMPLETE``-marked directory with files missing."""
    complete, torn = _scan(root)
    others = [p for _, p in complete if p != keep]
    doomed = others[: max(0, len(others) - (keep_last - 1))] + torn
    for p in doomed:
        hidden = root / f"{_TMP_PREFIX}pruned-{p.name}-{os.getpid()}"
        if hidden.exists():
            shutil.rmtree(hidden)
        os.replace(p, hidden)
        logger.info("deleted checkpoint dir %s", p)
    _fsync_dir(root)
    for p in root.iterdir():
        if p.name.startswith(_TMP_PREFIX) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ find / resume
def find_latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint of highest step under ``run_dir/checkpoints``, or None. ``step-*`` directories
    without the ``COMPLETE`` marker (torn) are skipped with a warning; ``.tmp-*`` directories are never considered."""
    complete, torn = _scan(Path(run_dir) / CHECKPOINTS_DIR)
    for p in torn:
        logger.warning("ignoring incomplete checkpoint %s (no %s marker)", p, MARKER)
    return complete[-1][1] if complete else None


def resolve_resume(resume: str | os.PathLike | None, run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint a run resumes from: ``None`` -> None (fresh start); ``"auto"`` -> the newest complete checkpoint
    of ``run_dir`` or None when there is none; a path -> that checkpoint, which must exist and be complete
    (``ValueError`` otherwise, suggesting the newest complete one when ``resume`` is a run directory)."""
    if resume is None:
        return None
    if str(resume) == "auto":
        return find_latest_checkpoint(run_dir)
    path = Path(resume)
    if not path.is_dir():
        raise ValueError(f"resume checkpoint {str(path)!r} does not exist or is not a directory")
    if not is_complete(path):
        hint = ""
        if (path / CHECKPOINTS_DIR).is_dir():
            latest = find_latest_checkpoint(path)
            hint = f"; it looks like a run directory: its newest complete checkpoint is {latest}" if latest else ""
        raise ValueError(f"resume checkpoint {str(path)!r} is not a complete checkpoint (no {MARKER} marker: "
                         f"torn by a crash, or not a checkpoint){hint}")
    return path


# ------------------------------------------------------------------------------------------------ load
def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the ``*.safetensors`` files of ``path`` (``ValueError`` when there are none)."""
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [p.name for p in sorted(path.glob("*.safetensors"))]
    if not files:
        raise ValueError(f"checkpoint {path} holds no *.safetensors weights")
    loaded: dict[str, torch.Tensor] = {}
    for name in files:
        loaded.update(load_file(str(path / name)))
    return loaded


def _load_weights(path: Path, model: torch.nn.Module) -> None:
    """The safetensors weights of ``path`` into ``model`` in place. Keys missing from the files are allowed only
    when they are tied to a loaded one (HF drops a tied ``lm_head.weight``); anything else missing or unexpected
    raises ``ValueError``."""
    loaded = _read_weights(path)
    own = model.state_dict()
    unexpected = sorted(set(loaded) - set(own))
    storage = {}
    for k, t in own.items():  # tied parameters share one tensor under several names
        storage.setdefault((t.data_ptr(), tuple(t.shape)), []).append(k)
    missing = [k for k in own if k not in loaded
               and not any(o in loaded for o in storage[(own[k].data_ptr(), tuple(own[k].shape))])]
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the model: missing {missing[:8]}"
                         f"{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                         f"{'...' if len(unexpected) > 8 else ''}")
    for k, t in loaded.items():
        if tuple(t.shape) != tuple(own[k].shape):
            raise ValueError(f"checkpoint {path}: {k} has shape {tuple(t.shape)}, the model's is "
                             f"{tuple(own[k].shape)}")
    model.load_state_dict(loaded, strict=False)


def _load_model_state(path: Path, *, model, optimizer, scheduler) -> None:
    """The weights, optimizer and scheduler of ``path``: from its DCP folder when a multi-process run wrote it (at
    any world size), from the HF weights and ``optimizer.pt`` otherwise (into a sharded model too: 1 -> N)."""
    if (path / "dcp").is_dir():
        load_sharded(path / "dcp", model, optimizer)
        optimizer = None  # loaded with the model
    elif is_sharded(model):
        weights = _read_weights(path)
        state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True) if (
            optimizer is not None and (path / "optimizer.pt").is_file()) else None
        load_full(model, weights, optimizer, state)
        optimizer = None
    else:
        _load_weights(path, model)
    for obj, fname in ((optimizer, "optimizer.pt"), (scheduler, "scheduler.pt")):
        if obj is None:
            continue
        if not (path / fname).is_file():
            raise ValueError(f"checkpoint {path} has no {fname}, but a {type(obj).__name__} was passed to load into")
        obj.load_state_dict(torch.load(path / fname, map_location="cpu", weights_only=True))


def load_checkpoint(path: str | os.PathLike, *, model: torch.nn.Module, optimizer=None, scheduler=None,
                    components: Mapping[str, Mapping[str, Any]] | None = None) -> dict:
    """Load a complete checkpoint into existing objects, in place.

    Args:
        path: a ``step-*`` directory written by ``save_checkpoint`` (``resolve_resume`` finds one).
        model: receives the weights (cast to its dtype, on its device); the architecture must match.
        optimizer, scheduler: receive their saved state when given (``ValueError`` if the checkpoint has none).
            The optimizer must have been built over the model's parameters in the same order as when saved.
        components: ``{name: {"model", "optimizer", "scheduler"}}`` as given to ``save_checkpoint``; each is loaded
            from ``path/name`` (``ValueError`` when the checkpoint lacks it).

    Returns ``{"step": int, "trainer_state": dict, "rng_state": dict | None}``; pass ``rng_state`` to
    ``restore_rng_state`` (with the same named generators) at the point the run continues.
    """
    path = Path(path)
    if not is_complete(path):
        raise ValueError(f"{path} is not a complete checkpoint (no {MARKER} marker)")
    marker = json.loads((path / MARKER).read_text())
    _load_model_state(path, model=model, optimizer=optimizer, scheduler=scheduler)
    for name, parts in (components or {}).items():
        if not (path / name).is_dir():
            raise ValueError(f"checkpoint {path} has no {name}/ component to load")
        _load_model_state(path / name, model=parts["model"], optimizer=parts.get("optimizer"),
                          scheduler=parts.get("scheduler"))
    rng = path / f"rng-rank{current().rank}.pt"  # a multi-process run's: each rank its own
    rng = rng if rng.is_file() else path / "rng.pt"
    ts = path / "trainer_state.json"
    return {
        "step": int(marker["step"]),
        "trainer_state": json.loads(ts.read_text()) if ts.is_file() else {},
        "rng_state": torch.load(rng, map_location="cpu", weights_only=True) if rng.is_file() else None,
    }


__all__ = ["MARKER", "capture_rng_state", "checkpoint_dir", "find_latest_checkpoint", "is_complete",
           "load_checkpoint", "resolve_resume", "restore_rng_state", "save_checkpoint"]
