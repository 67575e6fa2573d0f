"""One writer per run directory, and no run mixed into another's.

A run directory holds one run: its resolved configs (``config.yaml`` of the first start, ``config.<step>.yaml`` of
each resumed segment), ``metrics.jsonl`` and ``checkpoints/``. ``RunDirectory.open`` is the only way a trainer gets
one:

- **Lock.** An exclusive ``fcntl.flock`` on ``<run>/.lock``, taken without waiting: a second process on the same
  directory fails at once, naming the holder's pid. The OS drops the lock when its process exits, SIGKILL included,
  so a killed run never leaves a stale lock (the file itself stays; only the flock counts).
- **Fresh start into a used directory** (``trainer.resume`` null, the directory already holds a config, metrics or
  checkpoints): refused with an error that names the directory and the two ways out, ``trainer.resume=auto`` (continue)
  and ``trainer.overwrite=true`` (start over: the old contents are moved aside into ``<run>/.overwritten-<time>/``,
  never deleted silently and never mixed with the new run's), as HF ``Trainer`` and Lightning refuse a non-empty
  output directory.
- **Configs** are written by ``write_config`` when training starts (the trainer's ``train()``), once the checkpoint
  has loaded and the trainer is built (a start that fails leaves the directory as it was): the first segment's as
  ``config.yaml``, a resumed segment's as ``config.<step>.yaml`` (``<step>`` = the step it resumed from), so every
  segment's settings are kept.
- **Resuming from another run's checkpoint** (``trainer.resume=<path>`` outside the directory) into a directory that
  holds a run is refused like a fresh start: the two runs would mix.
"""

from __future__ import annotations

import logging
import errno
import os
import re
import time
from pathlib import Path

from engine.config import save_config

log = logging.getLogger("rlhf_engine")

LOCK_FILE = ".lock"
CONFIG_FILE = "config.yaml"
# What marks a directory as holding a run (the lock file alone does not: a run that failed before writing anything).
RUN_ENTRIES = (CONFIG_FILE, "metrics.jsonl", "checkpoints")
OTHER_OUTPUTS = ("tensorboard", "wandb", "curves.png")  # also moved aside by trainer.overwrite
_SEGMENT_CONFIG = re.compile(r"config\.\d+\.yaml")
_ASIDE_PREFIX = ".overwritten-"

try:  # POSIX; on other platforms the lock is skipped (documented in RunDirectory.open)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


class RunDirectoryError(RuntimeError):
    """The run directory cannot be used as asked: it holds another run, or another process writes to it."""


class RunDirectory:
    """A locked run directory (see the module docstring). Build it with ``RunDirectory.open``; ``close()`` (or the
    process ending) releases the lock."""

    def __init__(self, path: Path, lock_fd: int | None):
        self.path = path
        self._lock_fd = lock_fd

    # ------------------------------------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | os.PathLike, *, resume: str | None, overwrite: bool) -> RunDirectory:
        """Create ``path`` if needed, take its lock, and check that this start may write there.

        Args:
            path: the run directory (``trainer.output_dir``).
            resume: ``trainer.resume``: None is a fresh start; ``"auto"`` or a checkpoint inside ``path`` continues
                (or starts, when there is nothing to continue) the run in ``path``; a checkpoint elsewhere starts
                this directory from another run's state (refused like a fresh start when ``path`` holds a run).
            overwrite: ``trainer.overwrite``: a fresh start moves an existing run aside instead of refusing.

        Raises ``RunDirectoryError`` when another live process holds the lock (naming its pid), or when a fresh start
        finds a run in ``path`` and ``overwrite`` is false (naming the directory, what it holds, and the two ways
        out). Nothing in ``path`` is changed before these checks pass."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path, _lock(path))
        try:
            held = run.contents()
            elsewhere = resume not in (None, "auto") and path.resolve() not in Path(resume).resolve().parents
            if (resume is None or elsewhere) and held:
                if not overwrite:
                    start = (f"resuming from {resume}, a checkpoint of another run," if elsewhere
                             else "a fresh start")
                    raise RunDirectoryError(
                        f"{path} already holds a run ({', '.join(held)}); {start} would mix the two. Continue "
                        f"it with trainer.resume=auto, start over with trainer.overwrite=true (the old contents are "
                        f"moved to {path}/{_ASIDE_PREFIX}<time>/), or choose another trainer.output_dir")
                aside = run.move_aside()
                log.info(f"trainer.overwrite=true: the previous run in {path} was moved to {aside} "
                      "(delete it when you no longer need it)")
        except BaseException:
            run.close()
            raise
        return run

    def contents(self) -> list[str]:
        """The names of the run entries (``RUN_ENTRIES``) present in the directory, in that order."""
        return [name for name in RUN_ENTRIES if (self.path / name).exists()]

    def move_aside(self) -> Path:
        """Move what a run writes (``RUN_ENTRIES``, ``config.<step>.yaml``, ``OTHER_OUTPUTS``) into a new
        ``.overwritten-<time>-<pid>`` sub-directory; returns it. Renames only: nothing is deleted, and files the
        engine does not write (a directory shared with other things) stay where they are."""
        aside = self.path / f"{_ASIDE_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        aside.mkdir()
        for entry in sorted(self.path.iterdir()):
            if entry.name in RUN_ENTRIES or entry.name in OTHER_OUTPUTS or _SEGMENT_CONFIG.fullmatch(entry.name):
                os.replace(entry, aside / entry.name)
        return aside

    # ------------------------------------------------------------------------------------------------ configs
    def write_config(self, cfg, resumed_step: int | None) -> Path:
        """Write the resolved ``cfg`` (call once the checkpoint, if any, has loaded): ``config.yaml`` for a run that
        starts at step 0, ``config.<step>.yaml`` for a segment resumed at ``resumed_step`` (the first segment's
        ``config.yaml`` is kept). Returns the path written."""
        name = CONFIG_FILE if not resumed_step else f"config.{resumed_step}.yaml"
        return save_config(cfg, self.path / name)

    # ------------------------------------------------------------------------------------------------ closing
    @property
    def locked(self) -> bool:
        """Whether this object holds the directory's lock now (always True where locks do not exist)."""
        return self._lock_fd is not None or fcntl is None

    def relock(self) -> None:
        """Take the lock again after ``close()`` (a trainer trained a second time); ``RunDirectoryError`` when
        another process took it meanwhile."""
        if not self.locked:
            self._lock_fd = _lock(self.path)

    def close(self, _close_fd=os.close) -> None:  # bound now: __del__ may run after interpreter teardown cleared os
        """Release the lock (idempotent). The lock file stays: only a held flock means a live writer."""
        if self._lock_fd is not None:
            _close_fd(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None

    def __del__(self):  # pragma: no cover - a safety net; trainers close explicitly
        self.close()


def _lock(path: Path) -> int | None:
    """Take the exclusive lock of ``path`` without waiting; returns the descriptor that holds it (None where
    ``fcntl`` does not exist). The holder's pid is written into the lock file for the error message of the next
    process."""
    if fcntl is None:  # pragma: no cover - Windows: no lock (single-writer is then the user's job)
        return None
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise
        holder = (path / LOCK_FILE).read_text().strip() or "unknown"
        mine = (" (this very process: an earlier trainer on this directory is still alive; it lets go when its "
                "train() returns, or when it is deleted)") if holder == str(os.getpid()) else ""
        raise RunDirectoryError(f"{path} is in use by another run (pid {holder} holds {path / LOCK_FILE}){mine}; one "
                                "process writes to a run directory at a time: wait for it to end, stop it, or "
                                "choose another trainer.output_dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


__all__ = ["CONFIG_FILE", "LOCK_FILE", "RUN_ENTRIES", "RunDirectory", "RunDirectoryError"]


class FollowerRunDirectory:
    """The run directory as a rank other than 0 of a multi-process run sees it: rank 0 holds the lock and writes
    the configs; this rank writes only its checkpoint shards. Its ``relock``, ``write_config`` and ``close`` do
    nothing."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def relock(self) -> None:
        """Nothing: rank 0 holds the lock."""

    def write_config(self, cfg, resumed_step: int | None) -> None:
        """Nothing: rank 0 writes the config."""

    def close(self) -> None:
        """Nothing to release."""
