"""Run observability: metrics appended to ``<run>/metrics.jsonl`` every step (names: ``engine.runs.vocabulary``), a
tqdm progress bar, and TensorBoard / Weights & Biases when installed and asked for."""

from __future__ import annotations

import logging
import json
import math
import os
import time
from pathlib import Path

log = logging.getLogger("rlhf_engine")


class MetricsLogger:
    """Writes one JSON line per ``log(step, metrics)`` call to ``run_dir/metrics.jsonl`` (appending, so a resumed run
    continues the file; lines of steps after the resume step, which the resumed run redoes, are dropped first so no
    step appears twice; a fresh start, ``start_step=0``, empties the file).

    Args:
        run_dir: the run directory (created if missing).
        progress_total: total steps for the tqdm bar (None: no bar).
        start_step: steps already done when this process starts (the resume point; 0 for a fresh run).
        tensorboard, wandb: also log there if the package imports (a warning otherwise, never an error).
    """

    BAR_KEYS = ("reward", "kl", "perf/tokens_per_sec")

    def __init__(self, run_dir: str | Path, *, progress_total: int | None = None, start_step: int = 0,
                 tensorboard: bool = False, wandb: bool = False, run_name: str | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_from(start_step)
        self._file = self.path.open("a")
        self._bar = None
        if progress_total is not None:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=progress_total, initial=start_step, dynamic_ncols=True)
        self._tb = self._wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.path.parent / "tensorboard"))
            except ImportError as e:
                log.warning(f"tensorboard requested but unavailable ({e}); logging to metrics.jsonl only")
        if wandb:
            try:
                import wandb as _wandb

                self._wandb = _wandb.init(project="rlhf-engine", name=run_name, dir=str(self.path.parent))
            except ImportError as e:
                log.warning(f"wandb requested but unavailable ({e}); logging to metrics.jsonl only")

    def _truncate_from(self, step: int) -> None:
        """Keep the lines of steps ``<= step`` (the checkpoint covers them, step ``step`` included); none when ``step``
        is 0 (a fresh run logs its own step-0 evaluation). The records are read by ``read_metrics`` (a last line cut
        short by a crash mid-write is dropped). The file is replaced atomically (temporary file + rename): a crash
        here loses nothing."""
        if not self.path.exists():
            return
        kept = [r for r in read_metrics(self.path.parent) if step > 0 and r.get("step", -1) <= step]
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record ``metrics`` of ``step`` (non-finite floats are written as null)."""
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        record = {"step": step, "time": time.time(), **clean}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)) and v is not None:
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(clean, step=step)
        if self._bar is not None:
            self._bar.update(1)
            shown = {k.split("/")[-1]: f"{clean[k]:.3g}" for k in self.BAR_KEYS if isinstance(clean.get(k), float)}
            self._bar.set_postfix(shown, refresh=False)

    def close(self) -> None:
        self._file.close()
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All records of ``run_dir/metrics.jsonl``, in file order. A last line cut short by a crash mid-write is
    skipped; a malformed line elsewhere raises ``ValueError`` naming the file and line."""
    path = Path(run_dir) / "metrics.jsonl"
    lines = path.read_text().splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as err:
            if i == len(lines) - 1:
                break  # torn by a crash while it was written
            raise ValueError(f"{path} line {i + 1} is not JSON: {err}") from None
    return records


# names of the engine's vocabulary (engine.runs.vocabulary), one panel each when the run has them
PLOTTED = ("reward", "eval/reward", "eval/accuracy", "eval/rewards/accuracies", "kl", "objective/kl",
           "completions/mean_length", "critic/vf_loss", "loss", "eval/loss", "entropy")


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the curves of ``PLOTTED`` metrics present in the run (one panel each) to a PNG; returns its path
    (default ``run_dir/curves.png``). Needs matplotlib (ImportError naming it otherwise)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("rlhf-engine plot needs matplotlib: pip install matplotlib") from e
    records = read_metrics(run_dir)
    names = [n for n in PLOTTED if any(r.get(n) is not None for r in records)]
    if not names:
        raise ValueError(f"{run_dir}/metrics.jsonl has none of the plotted metrics {PLOTTED}")
    fig, axes = plt.subplots(len(names), 1, figsize=(7, 2.2 * len(names)), sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        points = [(r["step"], r[name]) for r in records if r.get(name) is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 50 else None)
        ax.set_ylabel(name, fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
