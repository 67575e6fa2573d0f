"""The lean training loop. ``GRPOTrainer.step`` reads as its phases:

    rollout (the Generator, on the policy's own weights) -> rewards -> advantages -> policy update -> metrics

and the loop around it logs, evaluates, checkpoints (atomically; ``trainer.resume=auto`` continues exactly), skips
non-finite steps (stopping after ``max_consecutive_nonfinite`` in a row) and checkpoints on Ctrl-C. ``BaseTrainer``
holds what SFT and GRPO share; ``engine.sft_trainer.SFTTrainer`` is the cold start.
"""

from __future__ import annotations

import copy
import math
import random
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch

from engine.algorithms import compute_advantages, make_batch, policy_update, response_logprobs
from engine.algorithms.grpo import PolicyUpdateResult
from engine.checkpoint import (
    capture_rng_state,
    find_latest_checkpoint,
    load_checkpoint,
    resolve_resume,
    restore_rng_state,
    save_checkpoint,
)
from engine.data import char_tokenizer
from engine.evaluation import evaluate_accuracy
from engine.generation import Generator, SamplingParams
from engine.metrics import MetricsLogger
from engine.models import load_policy, require_local_dir, tiny_model, train_bpe_tokenizer
from engine.optim import make_optimizer, make_scheduler, sync_lr
from engine.rewards import compute_rewards, load_reward
from engine.run_dir import RunDirectory
from engine.stats import nanmean
from engine.tasks import load_task, tokenize


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


def resolve_device(name: str) -> torch.device:
    """``trainer.device``: ``"auto"`` is CUDA when available, else the CPU; anything else is passed to torch."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def resolve_dtype_name(name: str, device: torch.device) -> torch.dtype:
    """``model.dtype`` as a torch dtype: ``auto`` is bfloat16 on CUDA, float32 elsewhere."""
    return {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
            "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def resolve_model_dir(path: str | Path) -> Path:
    """A model directory, or the newest complete checkpoint of a run directory (one holding ``checkpoints/``)."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        latest = find_latest_checkpoint(path)
        if latest is None:
            raise ValueError(f"{path} is a run directory without a complete checkpoint")
        return latest
    return path


def build_tokenizer(model_cfg, texts=None):
    """The tokenizer of a random model: the character tokenizer, a directory's, or (``bpe[:N]``) a byte-level BPE
    trained on ``texts`` (an iterable of strings; required then)."""
    spec = model_cfg.tokenizer
    if spec is None:
        return char_tokenizer()
    if spec.startswith("bpe"):
        if texts is None:
            raise ValueError(f"model.tokenizer={spec!r} needs training texts to learn the BPE from")
        vocab = int(spec.partition(":")[2] or 2048)
        return train_bpe_tokenizer(texts, vocab_size=vocab)
    from transformers import AutoTokenizer

    require_local_dir(spec, "model.tokenizer")  # else transformers calls a missing directory a bad Hub repo id
    return AutoTokenizer.from_pretrained(spec, local_files_only=True)


def build_policy(model_cfg, device: torch.device, *, seed: int = 0, texts=None):
    """``(model, tokenizer)``: a checkpoint (``model.path``: a HF directory, or a run directory whose newest complete
    checkpoint is used) or a tiny random model of ``model.arch`` with the tokenizer of ``build_tokenizer`` (``texts``
    feed a ``bpe`` tokenizer)."""
    dtype = resolve_dtype_name(model_cfg.dtype, device)
    if model_cfg.path:
        path = resolve_model_dir(require_local_dir(model_cfg.path, "model.path"))
        model, tokenizer = load_policy(str(path), dtype=dtype, device=device)
        if tokenizer is None:
            raise ValueError(f"model.path={model_cfg.path} has no tokenizer; training needs one")
    else:
        tokenizer = build_tokenizer(model_cfg, texts)
        overrides = dict(model_cfg.tiny_overrides)
        model = tiny_model(model_cfg.arch, preset=model_cfg.preset, vocab_size=len(tokenizer), dtype=dtype,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                           bos_token_id=tokenizer.bos_token_id, seed=seed, **overrides).to(device)
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model, tokenizer


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
        print("\n[rlhf-engine] Ctrl-C: stopping after this step (press again to stop now, without a checkpoint)")

    def check(self) -> None:
        if self.pending:
            raise KeyboardInterrupt

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class BaseTrainer:
    """Model, tokenizer, data, optimizer, schedule, run directory, metrics and checkpoints; subclasses define
    ``total_steps`` and ``train_step(step) -> metrics``."""

    kind = "base"

    def __init__(self, cfg, *, model=None, tokenizer=None):
        self.cfg = cfg
        t = cfg.trainer
        # First, before any work: this process becomes the run directory's only writer, and a fresh start never lands
        # in another run's directory (engine.run_dir).
        self.run = RunDirectory.open(t.output_dir, resume=t.resume, overwrite=t.overwrite)
        try:
            self._set_up(cfg, model, tokenizer)
        except BaseException:
            self.run.close()
            raise

    def _set_up(self, cfg, model, tokenizer) -> None:
        t = cfg.trainer
        seed_everything(t.seed)
        self.device = resolve_device(t.device)
        self.run_dir = Path(t.output_dir)
        self.load_data()
        if model is None:
            model, tokenizer = self.build_model()
        self.model, self.tokenizer = model.train(), tokenizer
        self.prepare_examples()
        # Mixed precision follows the parameters: bf16/fp16 weights on CUDA compute under autocast to their dtype;
        # float32 weights (model.dtype=float32) train and generate in full float32.
        param_dtype = next(self.model.parameters()).dtype
        low = param_dtype in (torch.bfloat16, torch.float16)
        self.autocast = param_dtype if self.device.type == "cuda" and low else None
        self.optimizer = make_optimizer(self.model, cfg.optim)
        self.scheduler = make_scheduler(self.optimizer, cfg.optim, self.total_steps)
        self.state = {"step": 0, "epoch": 0, "position": 0, "nonfinite_in_a_row": 0, "skipped_steps": 0,
                      "zero_grad_in_a_row": 0}
        self.before_resume()
        resume = resolve_resume(t.resume, self.run_dir)
        if resume is not None:
            loaded = load_checkpoint(resume, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                     components=self.checkpoint_components())
            self.state.update(loaded["trainer_state"])
            restore_rng_state(loaded["rng_state"])
            for opt, sched in [(self.optimizer, self.scheduler)] + [
                    (c["optimizer"], c["scheduler"]) for c in self.checkpoint_components().values()
                    if c.get("optimizer") is not None and c.get("scheduler") is not None]:
                sync_lr(opt, sched)  # the schedule of this run's length, not the saved run's
            print(f"[rlhf-engine] resumed from {resume} at step {self.state['step']}")
        self._config_written = False  # train() writes it: a start that fails anywhere before leaves none behind

    # ------------------------------------------------------------------------------------------------ set-up hooks
    def load_data(self) -> None:
        """Set ``train_records`` and ``eval_records`` (lists of dicts) from ``cfg.data``; prompts by default."""
        self.train_records, self.eval_records, self._builtin_task = load_task(self.cfg.data)

    def training_texts(self):
        """Texts a ``bpe`` tokenizer is trained on: the training prompts and completions."""
        for r in self.train_records:
            if isinstance(r.get("prompt"), str):
                yield r["prompt"]
            if isinstance(r.get("completion"), str):
                yield r["completion"]

    def build_model(self):
        """``(model, tokenizer)`` when none was passed in: the policy of ``cfg.model``."""
        return build_policy(self.cfg.model, self.device, seed=self.cfg.trainer.seed, texts=self.training_texts())

    def prepare_examples(self) -> None:
        """Set ``train_examples`` and ``eval_examples`` from the records (tokenized prompts by default), printing how
        many prompts were left out for length; raises ``ValueError`` when no training example is left."""
        data, builtin = self.cfg.data, self._builtin_task
        self.train_examples, dropped = tokenize(self.train_records, self.tokenizer, data, builtin=builtin)
        self.eval_examples, eval_dropped = tokenize(self.eval_records, self.tokenizer, data, builtin=builtin)
        if dropped or eval_dropped:
            print(f"[rlhf-engine] prompts longer than data.max_prompt_tokens={data.max_prompt_tokens} left out: "
                  f"{dropped} of {len(self.train_records)} training, {eval_dropped} of {len(self.eval_records)} "
                  "held-out")
        if not self.train_examples:
            raise ValueError(f"no training prompt fits data.max_prompt_tokens={data.max_prompt_tokens} "
                             f"({dropped} dropped)")

    def before_resume(self) -> None:
        """Hook run once the model is built and before a checkpoint is loaded into it: copies of the *initial*
        weights (GRPO's reference policy) are taken here, so that a resumed run has the same reference."""

    def checkpoint_components(self) -> dict:
        """Further models checkpointed beside the policy (``save_checkpoint(components=...)``): PPO's critic."""
        return {}

    @property
    def total_steps(self) -> int:
        return self.cfg.trainer.max_steps

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
        return evaluate_accuracy(self.generator, self.tokenizer, self.eval_examples,
                                 max_tokens=self.eval_max_tokens)

    def save(self) -> Path:
        t = self.cfg.trainer
        return save_checkpoint(self.run_dir, self.state["step"], model=self.model, tokenizer=self.tokenizer,
                               optimizer=self.optimizer, scheduler=self.scheduler, rng_state=capture_rng_state(),
                               trainer_state=dict(self.state), keep_last=t.keep_last,
                               components=self.checkpoint_components())

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
                print(f"[rlhf-engine] warning: step {step}: the gradient norm was exactly 0 for "
                      f"{t.zero_grad_warn_steps} steps in a row (steps {step - t.zero_grad_warn_steps + 1}-{step}): "
                      "nothing is learning. Dead weights after too large an optim.lr, or (GRPO) no reward variance "
                      "within any group? (trainer.zero_grad_warn_steps)")
            return
        cause = cause or skip_cause(metrics)
        self.state["nonfinite_in_a_row"] += 1
        self.state["skipped_steps"] += 1
        print(f"[rlhf-engine] step {step}: {cause}: optimizer step skipped")
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
        logger = MetricsLogger(self.run_dir, progress_total=self.total_steps if t.progress_bar else None,
                               start_step=self.state["step"], tensorboard=t.tensorboard, wandb=t.wandb)
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
                print(f"\n[rlhf-engine] interrupted: checkpoint at step {self.state['step']} -> {self.save()}")
            raise
        finally:
            interrupt.restore()
            logger.close()
        self.save()
        return metrics


class RolloutTrainer(BaseTrainer):
    """What the on-policy trainers (GRPO, PPO) share: the ``Generator`` on the policy's own weights, sampling
    ``num_generations`` completions per prompt, and the old / reference log-probs of a rollout batch. Subclasses set
    ``algo`` (the config section with ``num_generations`` and ``rollout_is``)."""

    algo = ""

    def __init__(self, cfg, *, model=None, tokenizer=None):
        if cfg.generation.temperature <= 0:
            raise ValueError(f"generation.temperature must be > 0 for {self.kind.upper()}, got "
                             f"{cfg.generation.temperature}: the policy gradient needs samples from the policy")
        super().__init__(cfg, model=model, tokenizer=tokenizer)
        g = cfg.generation
        self.generator = Generator(self.model, self.tokenizer, max_num_seqs=g.max_num_seqs,
                                   attention_backend=g.attention_backend,
                                   kv_cache_memory=g.kv_cache_memory_mb << 20 if g.kv_cache_memory_mb else None)
        self.eval_max_tokens = g.max_tokens

    @property
    def algo_cfg(self):
        return getattr(self.cfg, self.algo)

    def prepare_examples(self) -> None:
        """The tokenized prompts; raises ``ValueError`` when ``prompts_per_step`` exceeds their number (every step
        would draw some prompt twice, and its group would count twice in the batch's statistics)."""
        super().prepare_examples()
        want, have = self.algo_cfg.prompts_per_step, len(self.train_examples)
        if want > have:
            raise ValueError(f"{self.algo}.prompts_per_step={want} is more than the {have} training prompts (after "
                             "data.num_eval held out and prompts over data.max_prompt_tokens left out): every step "
                             "would draw some prompts twice; lower it or add prompts")

    def rollout(self, examples: list, step: int) -> tuple[list, list]:
        """Sample ``num_generations`` completions per prompt, seeded by ``(trainer.seed, step)``; returns (examples
        repeated per sample, completions in the same order)."""
        g, n = self.cfg.generation, self.algo_cfg.num_generations
        base = (self.cfg.trainer.seed * 1_000_003 + step) * 4096
        params = [SamplingParams(n=n, temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
                                 max_tokens=g.max_tokens, seed=base + i) for i in range(len(examples))]
        was_training = self.model.training
        self.model.eval()
        outs = self.generator.generate([e.prompt_ids for e in examples], params)
        self.model.train(was_training)
        per_sample = [e for e in examples for _ in range(n)]
        return per_sample, [c for o in outs for c in sorted(o.outputs, key=lambda c: c.index)]

    def rollout_logprobs(self, completions: list, batch) -> torch.Tensor:
        """``[B, T]`` float32: the generator's log-probs of the sampled tokens, 0 on padding (filled on the host, one
        copy to the device)."""
        out = torch.zeros(batch.labels.shape, dtype=torch.float32)
        for b, c in enumerate(completions):
            out[b, :len(c.logprobs)] = torch.tensor(c.logprobs)
        return out.to(self.device)

    @torch.no_grad()
    def old_and_ref_logprobs(self, batch, rollout_lp) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Old log-probs: the generator's (same weights, same math) unless truncated sampling (top-p/top-k) makes
        them those of another distribution, then the trainer's; always recomputed with the trainer's forward when a
        rollout-IS correction is asked for. Reference log-probs when there is a reference model (else None). Both
        float32, 0 on padding."""
        g = self.cfg.generation
        mask = batch.response_mask
        with torch.autocast(self.device.type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None):
            recompute = g.top_p < 1.0 or g.top_k > 0 or self.algo_cfg.rollout_is is not None
            old = response_logprobs(self.model, batch, temperature=g.temperature) if recompute else rollout_lp
            ref = None
            if self.ref_model is not None:
                ref = response_logprobs(self.ref_model, batch, temperature=g.temperature).float() * mask
        return old.float() * mask, ref


class GRPOTrainer(RolloutTrainer):
    """GRPO with rule-based rewards on the policy's own rollouts (``cfg``: a ``GRPORunConfig``)."""

    kind = "grpo"
    algo = "grpo"

    def __init__(self, cfg, *, model=None, tokenizer=None):
        super().__init__(cfg, model=model, tokenizer=tokenizer)
        self.reward_fns = [load_reward(spec) for spec in cfg.grpo.rewards]

    def before_resume(self) -> None:
        # The reference is the initial policy: copied before a checkpoint overwrites the weights on resume.
        self.ref_model = None
        if self.cfg.grpo.kl_coef > 0:
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)

    def train_step(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        t0 = time.perf_counter()
        examples, completions = self.rollout(self.next_examples(cfg.grpo.prompts_per_step), step)
        t_gen = time.perf_counter() - t0

        texts = [self.tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in completions]
        columns = {k: [e.record.get(k) for e in examples] for k in examples[0].record if k != "prompt"}
        totals, per_fn = compute_rewards(self.reward_fns, cfg.grpo.reward_weights,
                                         [e.record["prompt"] for e in examples], texts, columns)
        scores = torch.tensor(totals, dtype=torch.float32, device=self.device)
        bad_reward = nonfinite_reward_cause(totals, per_fn)

        t1 = time.perf_counter()
        batch = make_batch([e.prompt_ids for e in examples], [c.token_ids for c in completions],
                           self.tokenizer.pad_token_id or 0, self.device)
        rollout_lp = self.rollout_logprobs(completions, batch)
        if bad_reward is None:
            advantages = compute_advantages(scores, cfg.grpo.num_generations, norm_by_std=cfg.grpo.norm_adv_by_std,
                                            unbiased_std=cfg.grpo.unbiased_std, epsilon=cfg.grpo.epsilon)
            old_lp, ref_lp = self.old_and_ref_logprobs(batch, rollout_lp)
            corr = {}
            for epoch in range(cfg.grpo.ppo_epochs):  # pass 1 is on-policy; later ones reuse the rollout (old_lp fixed)
                result = policy_update(self.model, self.optimizer, batch, old_lp, advantages, ref_logprobs=ref_lp,
                                       cfg=cfg.grpo, temperature=cfg.generation.temperature,
                                       max_grad_norm=cfg.optim.max_grad_norm, rollout_logprobs=rollout_lp,
                                       autocast_dtype=self.autocast, loss_scale_factor=cfg.generation.max_tokens,
                                       measure_rollout_corr=epoch == 0)  # pass 1 runs the rollout's weights
                corr = corr or {k: v for k, v in result.metrics.items() if k.startswith("rollout_corr/")}
                if not result.stepped:
                    break
            result.metrics.update(corr)
        else:  # no advantage can be formed from an infinite reward: nothing to learn from this batch
            old_lp = rollout_lp
            result = PolicyUpdateResult({"loss": float("nan"), "grad_norm": float("nan")}, stepped=False)
        t_update = time.perf_counter() - t1
        self.record_step_outcome(result.stepped, result.metrics, cause=bad_reward)

        lengths = torch.tensor([len(c.token_ids) for c in completions], dtype=torch.float32)
        group_std = scores.view(-1, cfg.grpo.num_generations).std(-1)
        metrics = {
            "reward": scores.mean().item(),
            "reward_std": group_std.mean().item(),  # as TRL: the mean of the groups' reward stds
            "frac_reward_zero_std": (group_std == 0).float().mean().item(),
            **{f"rewards/{name}/mean": nanmean(vals) for name, vals in per_fn.items()},
            "completions/mean_length": lengths.mean().item(),
            "completions/clipped_ratio": sum(c.finish_reason == "length" for c in completions) / len(completions),
            **result.metrics,
            "perf/tokens_per_sec": float(lengths.sum()) / max(t_gen + t_update, 1e-9),
            "perf/time/generate": t_gen,
            "perf/time/update": t_update,
        }
        return metrics
