"""What every section of ``bench/bench_peers.py`` shares: the run's report, peer lookup, shapes and defaults."""

from __future__ import annotations

import importlib
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # TRL pings the Hub on init; the GPU machine has no network
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is experimental in TRL 1.16

import torch  # noqa: E402

from kernels import _backend  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ("grpo", "losses", "generate")
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k"
PEERS = ("trl", "liger_kernel", "matplotlib")
# GRPO / generation model shapes: bench_generate's qwen2-cpu (3.5M parameters with vocab 2,048), a tiny_model preset
# name, or "tiny" (tiny_model's defaults: the smoke test's)
CPU_DEFAULTS = dict(model="qwen2-cpu", vocab=2048, model_vocab=0, prompts=8, n=8, max_tokens=128, micro_batch=16,
                    loss_reps=3, loss_shapes="16x128x256x2048,16x128x896x32768", dpo_shapes="16x128x256x2048",
                    gen_shape="16x8x128x128")
GPU_DEFAULTS = dict(model="qwen2.5-0.5b", vocab=32768, model_vocab=151936, prompts=16, n=8, max_tokens=256,
                    micro_batch=16, loss_reps=5, loss_shapes="16x1024x896x151936",
                    dpo_shapes="16x1024x896x151936", gen_shape="64x8x128x256")


class Report:
    """The run's JSON: versions, shapes, per-section results and every skipped peer with its reason."""

    def __init__(self, args, device: str):
        info = _backend.describe()
        self.data = {"device": info["device"], "torch": torch.__version__, "triton": info["triton"],
                     "transformers": _version("transformers"), "trl": _version("trl"),
                     "liger_kernel": _version("liger_kernel"), "host": platform.node(),
                     "cpu_threads": torch.get_num_threads(), "dtype": "bfloat16" if device == "cuda" else "float32",
                     "timestamp": time.strftime("%Y-%m-%d %H:%M:%S"), "args": vars(args), "sections": {},
                     "skipped": []}

    def skip(self, section: str, impl: str, reason: str) -> None:
        entry = {"section": section, "impl": impl, "reason": reason}
        if entry not in self.data["skipped"]:  # the same reason for every shape is said once
            print(f"[{section}] {impl}: skipped: {reason}", flush=True)
            self.data["skipped"].append(entry)


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name.replace("_", "-"))
    except Exception:  # noqa: BLE001 - not installed
        return None


def peer(name: str, without: set[str]):
    """The peer's module, or the reason it cannot be used (a string): not installed, or ``--without``."""
    if name in without:
        return f"{name} disabled (--without {name})"
    try:
        return importlib.import_module(name)
    except ImportError as err:
        return f"{name} not installed ({err}); pip install -e '.[bench]'"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",") if item]
