"""The loop every trainer shares (``BaseTrainer``): it logs, evaluates, checkpoints (atomically;
``trainer.resume=auto`` continues exactly), skips non-finite steps (stopping after ``max_consecutive_nonfinite`` in a
row) and checkpoints on Ctrl-C; a trainer builds its parts and defines ``train_step(step) -> metrics``
(``engine.trainers.grpo``, ``.ppo``, ``.sft``, ``.preference``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import signal
import threading
from pathlib import Path

import numpy as np
import torch

from engine.algorithms.optim import make_optimizer, make_scheduler, sync_lr
from engine.data.tasks import PromptTask
from engine.models.builders import build_policy, resolve_device
from engine.runs.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    resolve_resume,
    restore_rng_state,
    save_checkpoint,
)
from engine.distributed import broadcast_object, init_distributed, shard_model, unsharded
from engine.distributed.context import env_world_size
from engine.runs.directory import FollowerRunDirectory, RunDirectory, RunDirectoryError
from engine.runs.metrics import MetricsLogger
from engine.trainers.evaluation import evaluate_accuracy

log = logging.getLogger("rlhf_engine")


class NonFiniteLossError(RuntimeError):
    """Raised when ``trainer.max_consecutive_nonfinite`` steps in a row were skipped: a non-finite reward, loss or
    gradient norm, or an update that would overflow the weights."""


def nonfinite_reward_cause(totals, per_fn: dict | None = None) -> str | None:
    """None when every total reward is finite; else the message naming how many were not and, from ``per_fn``
    (``{name: [reward | None]}``, ``engine.rewards.compute_rewards``), which reward functions gave them."""
    bad = [i for i, r in enumerate(totals) if not math.isfinite(float(r))]
    if not bad:
        return None
    culprits = [name for name, values in (per_fn or {}).items()
                if any(v is not None and not math.isfinite(v) for v in values)]
    source = f" from {', '.join(repr(n) for n in culprits)}" if culprits else ""
    return f"non-finite reward{source} for {len(bad)} of {len(totals)} samples (first: sample {bad[0]})"


def skip_cause(metrics: dict) -> str:
    """Why a step with these ``metrics`` was skipped, for the message: a non-finite ``loss``, else a non-finite
    ``grad_norm``, else (both finite) an update ``clip_and_step`` refused because it would overflow the weights."""
    loss, grad_norm = metrics.get("loss"), metrics.get("grad_norm")
    if loss is None or not math.isfinite(loss):
        return f"non-finite loss ({loss})"
    if grad_norm is None or not math.isfinite(grad_norm):
        return f"non-finite gradient norm ({grad_norm}) with a finite loss ({loss:.4g})"
    return (f"the update would make the weights non-finite (float16 overflow) with a finite loss ({loss:.4g}) and "
            f"gradient norm ({grad_norm:.4g})")


def autocast_dtype(model, device: torch.device) -> torch.dtype | None:
    """Mixed precision follows the parameters: bf16/fp16 weights on CUDA compute under autocast to their dtype
    (``engine.algorithms.mixed_precision``); float32 weights, and any weights on the CPU, compute as they are."""
    dtype = next(model.parameters()).dtype
    return dtype if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) else None


def policy_and_prompts(cfg, device: torch.device, model=None, tokenizer=None) -> tuple:
    """``(model, tokenizer, train_examples, eval_examples)`` of a prompt-driven run (SFT, GRPO, PPO): the prompts of
    ``cfg.data`` (``PromptTask``) tokenized by the policy's tokenizer; the policy is ``model`` when one is passed in,
    else built from ``cfg.model`` (a ``bpe`` tokenizer is trained on the training prompts). The model is put in train
    mode. ``PromptTask``'s and ``build_policy``'s errors."""
    task = PromptTask.load(cfg.data)
    if model is None:
        model, tokenizer = build_policy(cfg.model, device, seed=cfg.trainer.seed, texts=task.texts())
    return (model.train(), tokenizer, *task.examples(tokenizer, cfg.data))


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy and torch (CPU and CUDA) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _DeferredInterrupt:
    """Defers Ctrl-C to the next step boundary, so the checkpoint written on interrupt is the state after a whole
    step (a resumed run then continues exactly). A second Ctrl-C interrupts at once, without a checkpoint. Only in
    the main thread (signal handlers cannot be installed elsewhere)."""

    def __init__(self):
        self.pending = self.forced = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.pending:
            self.forced = True
            raise KeyboardInterrupt
        self.pending = True
        log.info("Ctrl-C: stopping after this step (press again to stop now, without a checkpoint)")

    def check(self) -> None:
        if self.pending:
            raise KeyboardInterrupt

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class _SilentLogger:
    """The metrics logger of a rank other than 0: the metrics (already global) are written by rank 0."""

    def log(self, step: int, metrics: dict) -> None:
        """Nothing."""

    def close(self) -> None:
        """Nothing."""


class BaseTrainer:
    """The loop around a trainer's parts. A subclass builds its parts in its own ``__init__``, in order and in plain
    sight, then hands over::

        def __init__(self, cfg, *, model=None, tokenizer=None):
            super().__init__(cfg)              # the run directory (locked), the seeds, the device
            with self.setting_up():            # the run directory is released if a part fails to build
                ...                            # data, policy (self.model, self.tokenizer), reference, generator
                self.start(total_steps=...)    # optimizer, schedule, then resume: the last step, always

    and defines ``train_step(step) -> metrics``. Nothing in a constructor calls a method a subclass overrides."""

    def __init__(self, cfg):
        self.cfg = cfg
        t = cfg.trainer
        local_rank = int(os.environ.get("LOCAL_RANK", "0")) if env_world_size() > 1 else None
        self.device = resolve_device(t.device, local_rank)
        # under torchrun: every rank joins the process group (engine.distributed); a single process joins nothing
        self.dist = init_distributed(self.device.type, cfg.distributed.timeout_s)
        if not self.dist.is_main:
            log.setLevel(logging.ERROR)  # logs, metrics and the progress bar come from rank 0
        # First, before any work: this process (rank 0) becomes the run directory's only writer, and a fresh start
        # never lands in another run's directory (engine.runs.directory).
        self.run = self._open_run_directory(t)
        self.run_dir = Path(t.output_dir)
        with self.setting_up():
            seed_everything(t.seed)
        self._config_written = False  # train() writes it: a start that fails anywhere before leaves none behind

    def _open_run_directory(self, t):
        """Rank 0 opens (locks, checks) the run directory and the other ranks learn whether it could: its error is
        raised on every rank, so that no rank waits for the others in a collective."""
        run, error = None, None
        if self.dist.is_main:
            try:
                run = RunDirectory.open(t.output_dir, resume=t.resume, overwrite=t.overwrite)
            except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
                error = err
        if self.dist.enabled:
            message = broadcast_object(None if error is None else f"{type(error).__name__}: {error}")
            if message is not None and error is None:
                raise RunDirectoryError(f"rank 0 could not open the run directory: {message}")
        if error is not None:
            raise error
        return run if run is not None else FollowerRunDirectory(t.output_dir)

    def shard(self, model, *, offload: bool = False):
        """Under ``torchrun``: ``model`` sharded with FSDP2 (``engine.distributed.shard_model``, the
        ``distributed`` config; bf16/fp16 weights on CUDA are sharded in float32 and computed in their dtype by
        FSDP's ``MixedPrecisionPolicy``); ``offload``: kept in CPU memory (a frozen reference). A single process
        gets ``model`` back unchanged. Call it before ``start`` (the optimizer is built over the sharded
        parameters)."""
        if not self.dist.enabled:
            return model
        d = self.cfg.distributed
        dtype = next(model.parameters()).dtype
        low = self.device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
        if low:
            model.float()  # float32 sharded parameters; FSDP casts to the compute dtype per forward
        # offload moves accelerator memory to the host: on a CPU run the parameters are there already
        return shard_model(model, param_dtype=dtype if low else None, reshard_after_forward=d.reshard_after_forward,
                           activation_checkpointing=d.activation_checkpointing,
                           cpu_offload=offload and self.device.type == "cuda")

    def local_part(self, items: list) -> list:
        """This rank's contiguous share of the step's global ``items`` (all of them in a single process). Raises
        ``ValueError`` when their count does not divide by the world size (the step sizes are checked at start)."""
        n, world = len(items), self.dist.world_size
        if n % world:
            raise ValueError(f"{n} items of a step do not divide over {world} ranks")
        per = n // world
        return items[self.dist.rank * per:(self.dist.rank + 1) * per]

    def check_divides(self, **sizes: int) -> None:
        """Raise ``ValueError`` naming the setting when a global step size does not divide by the world size (each
        rank takes an equal share: the same number of micro-batches, so FSDP's collectives line up)."""
        world = self.dist.world_size
        for name, size in sizes.items():
            if size % world:
                raise ValueError(f"{name}={size} does not divide over the {world} processes of this run: each rank "
                                 f"takes an equal share of a step; use a multiple of {world}")

    @contextlib.contextmanager
    def setting_up(self):
        """Wraps the construction of a trainer's parts: if one fails, the run directory is released (and the error
        raised), so that a corrected command can use it at once."""
        try:
            yield
        except BaseException:
            self.run.close()
            raise

    def start(self, *, total_steps: int, components: dict | None = None, state: dict | None = None) -> None:
        """The last step of a construction, once ``self.model`` and ``self.tokenizer`` are built: the policy's
        optimizer and schedule over ``total_steps``, the trainer state (``state`` adds trainer-specific keys, saved and
        restored with it), and then, with ``trainer.resume``, the checkpoint loaded into the policy and into
        ``components`` (``{name: {"model", "optimizer", "scheduler"}}`` checkpointed beside the policy: PPO's critic).
        Parts that copy the *initial* weights (a reference policy) are built before this is called."""
        t = self.cfg.trainer
        self.total_steps = total_steps
        self.components = components or {}
        self.autocast = autocast_dtype(self.model, self.device)
        self.optimizer = make_optimizer(self.model, self.cfg.optim)
        self.scheduler = make_scheduler(self.optimizer, self.cfg.optim, total_steps)
        self.state = {"step": 0, "epoch": 0, "position": 0, "nonfinite_in_a_row": 0, "skipped_steps": 0,
                      "zero_grad_in_a_row": 0, **(state or {})}
        resume = resolve_resume(t.resume, self.run_dir)
        if resume is None:
            return
        loaded = load_checkpoint(resume, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                 components=self.components)
        self.state.update(loaded["trainer_state"])
        restore_rng_state(loaded["rng_state"])
        for opt, sched in [(self.optimizer, self.scheduler)] + [
                (c["optimizer"], c["scheduler"]) for c in self.components.values()
                if c.get("optimizer") is not None and c.get("scheduler") is not None]:
            sync_lr(opt, sched)  # the schedule of this run's length, not the saved run's
        log.info(f"resumed from {resume} at step {self.state['step']}")

    # ------------------------------------------------------------------------------------------------------ data
    def next_examples(self, count: int) -> list:
        """The next ``count`` training examples in a per-epoch shuffled order that depends only on (data.seed,
        epoch), so a resumed run draws the same prompts."""
        out = []
        while len(out) < count:
            order = torch.randperm(len(self.train_examples),
                                   generator=torch.Generator().manual_seed(self.cfg.data.seed * 1000003
                                                                           + self.state["epoch"])).tolist()
            take = order[self.state["position"]:self.state["position"] + count - len(out)]
            out.extend(self.train_examples[i] for i in take)
            self.state["position"] += len(take)
            if self.state["position"] >= len(order):
                self.state["epoch"] += 1
                self.state["position"] = 0
        return out

    # ------------------------------------------------------------------------------------------------------ loop
    def train_step(self, step: int) -> dict[str, float]:
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        """Held-out accuracy of the policy's greedy completions (every rank evaluates all of them, on the gathered
        weights, and gets the same numbers)."""
        with unsharded(self.model):
            return evaluate_accuracy(self.generator, self.tokenizer, self.eval_examples,
                                     max_tokens=self.eval_max_tokens)

    def save(self) -> Path:
        t = self.cfg.trainer
        return save_checkpoint(self.run_dir, self.state["step"], model=self.model, tokenizer=self.tokenizer,
                               optimizer=self.optimizer, scheduler=self.scheduler, rng_state=capture_rng_state(),
                               trainer_state=dict(self.state), keep_last=t.keep_last, components=self.components)

    def record_step_outcome(self, stepped: bool, metrics: dict, cause: str | None = None) -> None:
        """Book-keeping after ``train_step``'s optimizer step, or its refusal.

        A skipped step is counted and printed with what was non-finite: ``cause`` when the trainer knows it (a
        reward, say), else read from ``metrics`` (``skip_cause``). ``trainer.max_consecutive_nonfinite`` skipped steps
        in a row raise ``NonFiniteLossError``. A taken step advances the schedule; a gradient norm of exactly 0 for
        ``trainer.zero_grad_warn_steps`` steps in a row prints a warning (a dead model learns nothing and would
        otherwise end with exit code 0). Step numbers printed are the 1-based ones of ``metrics.jsonl``."""
        step = self.state["step"] + 1  # this step's number in metrics.jsonl (state["step"] counts the steps done)
        t = self.cfg.trainer
        if stepped:
            self.scheduler.step()
            self.state["nonfinite_in_a_row"] = 0
            zero = metrics.get("grad_norm") == 0.0
            self.state["zero_grad_in_a_row"] = self.state.get("zero_grad_in_a_row", 0) + 1 if zero else 0
            if self.state["zero_grad_in_a_row"] == t.zero_grad_warn_steps:
                log.warning(f"step {step}: the gradient norm was exactly 0 for "
                      f"{t.zero_grad_warn_steps} steps in a row (steps {step - t.zero_grad_warn_steps + 1}-{step}): "
                      "nothing is learning. Dead weights after too large an optim.lr, or (GRPO) no reward variance "
                      "within any group? (trainer.zero_grad_warn_steps)")
            return
        cause = cause or skip_cause(metrics)
        self.state["nonfinite_in_a_row"] += 1
        self.state["skipped_steps"] += 1
        log.warning(f"step {step}: {cause}: optimizer step skipped")
        if self.state["nonfinite_in_a_row"] >= t.max_consecutive_nonfinite:
            if "non-finite reward" in cause:
                hint = "check the reward functions or the reward model"
            elif "the update would" in cause:
                hint = "lower optim.lr, or train float32 or bfloat16 weights (model.dtype)"
            else:
                hint = "lower optim.lr or check the data"
            raise NonFiniteLossError(
                f"{self.state['nonfinite_in_a_row']} non-finite steps in a row (trainer.max_consecutive_nonfinite="
                f"{t.max_consecutive_nonfinite}), the last at step {step}: {cause}; {hint}")

    def train(self, should_stop=None) -> dict[str, float]:
        """Run from the current step to ``total_steps``; returns the last metrics (with the final evaluation).

        ``should_stop(metrics) -> bool``, checked after every step (after its evaluation), ends the run early (the
        demo stops the cold-start SFT once the held-out accuracy leaves room for RL, or at a time budget).

        The run directory's lock is held until this returns or raises (then released: another process may continue
        the run); a second ``train()`` takes it again. The first call writes the resolved config (``config.yaml``,
        or ``config.<step>.yaml`` for a resumed segment): a trainer that failed to build leaves none behind."""
        self.run.relock()
        try:
            if not self._config_written:  # the checkpoint (if any) has loaded and every part of the trainer is built
                self.run.write_config(self.cfg, self.state["step"])
                self._config_written = True
            return self._train(should_stop)
        finally:
            self.run.close()

    def _train(self, should_stop) -> dict[str, float]:
        t = self.cfg.trainer
        logger = (MetricsLogger(self.run_dir, progress_total=self.total_steps if t.progress_bar else None,
                                start_step=self.state["step"], tensorboard=t.tensorboard, wandb=t.wandb)
                  if self.dist.is_main else _SilentLogger())
        metrics: dict[str, float] = {}
        interrupt = _DeferredInterrupt()
        try:
            if self.state["step"] == 0 and self.eval_examples and t.eval_every:
                logger.log(0, self.evaluate())
            while self.state["step"] < self.total_steps:
                interrupt.check()  # a Ctrl-C during the previous step lands here, between steps
                before = dict(self.state)
                try:
                    metrics = self.train_step(self.state["step"])
                except KeyboardInterrupt:
                    self.state = before  # the step did not happen: its prompts are drawn again on resume
                    raise
                self.state["step"] += 1
                step = self.state["step"]
                metrics["learning_rate"] = self.scheduler.get_last_lr()[0]
                metrics["skipped_steps"] = self.state["skipped_steps"]
                if t.eval_every and (step % t.eval_every == 0 or step == self.total_steps) and self.eval_examples:
                    metrics.update(self.evaluate())
                if step % t.log_every == 0 or step == self.total_steps:
                    logger.log(step, metrics)
                if t.save_every and step % t.save_every == 0:
                    self.save()
                if should_stop is not None and should_stop(metrics):
                    if step % t.log_every:
                        logger.log(step, metrics)
                    break
        except KeyboardInterrupt:
            if not interrupt.forced:
                log.info(f"interrupted: checkpoint at step {self.state['step']} -> {self.save()}")
            raise
        finally:
            interrupt.restore()
            logger.close()
        self.save()
        return metrics


