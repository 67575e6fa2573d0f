"""Run directories hold one run, written by one process (issue 9, part 1): a fresh start into a used directory is
refused (``trainer.overwrite`` moves the old run aside), a second live writer fails at once naming the holder's pid
and a SIGKILLed holder leaves no stale lock, a failed resume leaves the configs as they were and each resumed segment
keeps its own config, pruning never leaves a ``COMPLETE``-marked checkpoint with files missing, and a resume keeps
each step of ``metrics.jsonl`` once, even after a crash tore its last line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

import engine.runs.checkpoint as ckpt
from engine.runs.checkpoint import MARKER, checkpoint_dir, find_latest_checkpoint, is_complete
from engine.config import GRPORunConfig, SFTRunConfig, load_config
from engine.runs.metrics import read_metrics
from engine.runs.directory import LOCK_FILE, RunDirectory, RunDirectoryError
from engine.trainers.sft import SFTTrainer
from engine.trainers.grpo import GRPOTrainer

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = "model.tiny_overrides={hidden_size: 32, num_layers: 1, num_heads: 2, num_kv_heads: 1, intermediate_size: 64}"
SFT = [TINY, "model.dtype=float32", "trainer.device=cpu", "trainer.progress_bar=false", "data.num_eval=4",
       "sft.batch_size=8", "sft.micro_batch_size=8", "optim.lr=1e-3"]


def sft(run_dir, *overrides: str) -> SFTTrainer:
    return SFTTrainer(load_config(SFTRunConfig, None, [f"trainer.output_dir={run_dir}", *SFT, *overrides]))


def test_a_fresh_start_into_a_used_directory_is_refused_and_changes_nothing(tmp_path):
    sft(tmp_path, "sft.max_steps=2", "trainer.save_every=1").train()
    before = {p.relative_to(tmp_path): p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.name != LOCK_FILE}
    metrics = (tmp_path / "metrics.jsonl").read_text()

    with pytest.raises(RunDirectoryError) as err:
        sft(tmp_path, "sft.max_steps=3")
    message = str(err.value)
    assert str(tmp_path) in message and "trainer.resume=auto" in message and "trainer.overwrite=true" in message
    after = {p.relative_to(tmp_path): p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.name != LOCK_FILE}
    assert after == before  # nothing truncated, rewritten or added
    assert (tmp_path / "metrics.jsonl").read_text() == metrics


def test_overwrite_moves_the_old_run_aside_and_never_mixes_checkpoints(tmp_path):
    sft(tmp_path, "sft.max_steps=3", "trainer.save_every=1", "trainer.keep_last=3").train()
    old_config = (tmp_path / "config.yaml").read_text()
    (tmp_path / "notes.txt").write_text("not the engine's")  # a file the engine did not write stays put

    sft(tmp_path, "sft.max_steps=1", "trainer.overwrite=true").train()

    assert find_latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 1)  # not the old run's step 3
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000001"]
    assert [r["step"] for r in read_metrics(tmp_path) if "loss" in r] == [1]
    (aside,) = tmp_path.glob(".overwritten-*")
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == [f"step-0000000{i}" for i in (1, 2, 3)]
    assert (aside / "config.yaml").read_text() == old_config
    assert [r["step"] for r in read_metrics(aside) if "loss" in r] == [1, 2, 3]
    assert (tmp_path / "notes.txt").read_text() == "not the engine's"


def test_a_second_trainer_on_a_held_directory_fails_at_once_naming_the_pid(tmp_path):
    first = sft(tmp_path, "sft.max_steps=1")  # holds the lock from construction until train() returns
    with pytest.raises(RunDirectoryError, match=rf"in use by another run \(pid {os.getpid()} holds"):
        sft(tmp_path, "sft.max_steps=1", "trainer.resume=auto")
    first.train()  # the refused start took nothing from the holder
    assert is_complete(checkpoint_dir(tmp_path, 1))
    resumed = sft(tmp_path, "sft.max_steps=2", "trainer.resume=auto")  # released when train() returned
    assert resumed.state["step"] == 1
    resumed.run.close()


HOLDER = textwrap.dedent("""
    import sys, time
    from engine.runs.directory import RunDirectory
    run = RunDirectory.open(sys.argv[1], resume="auto", overwrite=False)
    print("locked", flush=True)
    time.sleep(120)
""")


def test_the_lock_of_another_process_is_refused_and_dies_with_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__)))))
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirectoryError, match=rf"pid {holder.pid} holds"):
            RunDirectory.open(tmp_path, resume="auto", overwrite=False)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    run = RunDirectory.open(tmp_path, resume="auto", overwrite=False)  # no stale lock after a SIGKILL
    assert (tmp_path / LOCK_FILE).read_text().strip() == str(os.getpid())
    run.close()


GRPO = [TINY, "model.dtype=float32", "trainer.device=cpu", "trainer.progress_bar=false", "data.num_eval=4",
        "grpo.prompts_per_step=2", "grpo.num_generations=2", "generation.max_tokens=4"]


def test_a_failed_resume_keeps_the_config_and_each_segment_keeps_its_own(tmp_path):
    base = [f"trainer.output_dir={tmp_path}", *GRPO]
    GRPOTrainer(load_config(GRPORunConfig, None, [*base, "trainer.max_steps=1"])).train()
    first = (tmp_path / "config.yaml").read_text()

    wider = TINY.replace("hidden_size: 32", "hidden_size: 48")  # a changed architecture cannot load the checkpoint
    with pytest.raises(ValueError, match="shape"):
        GRPOTrainer(load_config(GRPORunConfig, None, [*base, wider, "trainer.max_steps=2", "trainer.resume=auto"]))
    assert (tmp_path / "config.yaml").read_text() == first
    assert sorted(p.name for p in tmp_path.glob("config*.yaml")) == ["config.yaml"]

    GRPOTrainer(load_config(GRPORunConfig, None, [*base, "trainer.max_steps=2", "trainer.resume=auto",
                                                  "optim.lr=2e-5"])).train()
    assert (tmp_path / "config.yaml").read_text() == first  # the first segment's settings are kept
    second = load_config(GRPORunConfig, tmp_path / "config.1.yaml")
    assert second.optim.lr == 2e-5 and second.trainer.max_steps == 2


def test_a_crash_while_pruning_never_leaves_a_complete_checkpoint_with_files_missing(tmp_path, monkeypatch):
    tr = sft(tmp_path, "sft.max_steps=3", "trainer.keep_last=1")
    tr.train()  # only step 3 is kept
    real_rmtree = ckpt.shutil.rmtree

    def killed_halfway(path, *args, **kwargs):  # deletes the weights, then the process "dies" (marker still there)
        weights = os.path.join(path, "model.safetensors")
        if os.path.exists(weights):
            os.remove(weights)
        raise KeyboardInterrupt

    tr.state["step"] = 4
    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        tr.save()  # commits step 4, then prunes step 3
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    for step_dir in (tmp_path / "checkpoints").glob("step-*"):
        if is_complete(step_dir):
            listed = json.loads((step_dir / MARKER).read_text())["files"]
            assert all((step_dir / name).exists() for name in listed), step_dir
    assert find_latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 4)
    tr.run.close()


def test_resume_keeps_each_step_once_even_after_a_torn_metrics_line(tmp_path):
    sft(tmp_path, "sft.max_steps=3", "trainer.save_every=2").train()  # checkpoints at 2 and 3
    import shutil

    shutil.rmtree(checkpoint_dir(tmp_path, 3))  # as if killed after logging step 3, before its checkpoint
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 1.2')  # and a line torn by the kill
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]  # the torn last line is skipped

    resumed = sft(tmp_path, "sft.max_steps=4", "trainer.resume=auto")
    assert resumed.state["step"] == 2
    resumed.train()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]  # step 3 redone, logged once


def test_a_start_that_fails_after_the_base_set_up_leaves_no_config(tmp_path):
    """A typo in a reward's import path fails in GRPOTrainer's own set-up: nothing may be left that makes the
    directory look used, and the lock is released."""
    base = [f"trainer.output_dir={tmp_path}", *GRPO, "trainer.max_steps=1"]
    with pytest.raises(ModuleNotFoundError):
        GRPOTrainer(load_config(GRPORunConfig, None, [*base, "grpo.rewards=[no_such_module_here:reward]"]))
    assert not (tmp_path / "config.yaml").exists()
    GRPOTrainer(load_config(GRPORunConfig, None, base)).train()  # a fresh start is not refused
    assert (tmp_path / "config.yaml").is_file()


def test_resuming_another_runs_checkpoint_into_a_used_directory_is_refused(tmp_path):
    sft(tmp_path / "a", "sft.max_steps=1").train()
    sft(tmp_path / "b", "sft.max_steps=1").train()
    other = checkpoint_dir(tmp_path / "a", 1)
    with pytest.raises(RunDirectoryError, match=r"resuming from .* a checkpoint of another run"):
        sft(tmp_path / "b", "sft.max_steps=2", f"trainer.resume={other}")
    fresh = sft(tmp_path / "c", "sft.max_steps=2", f"trainer.resume={other}")  # into an empty directory: fine
    assert fresh.state["step"] == 1
    fresh.run.close()
    own = sft(tmp_path / "b", "sft.max_steps=2", f"trainer.resume={checkpoint_dir(tmp_path / 'b', 1)}")
    assert own.state["step"] == 1
    own.run.close()
