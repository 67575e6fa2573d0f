"""The training loop end to end on the CPU, with a tiny random Llama and the character tokenizer of the built-in
arithmetic task: GRPO learns a reward (weights move, the reward rises, a held-out loss falls) and logs the TRL metric
names once per step; ``policy_update`` does not depend on the micro-batch split; a resumed run reproduces the
uninterrupted one (metrics and weights), also after Ctrl-C; torn checkpoints are ignored; non-finite steps are skipped
and too many in a row abort; ``ppo_epochs`` passes; SFT lowers its loss and writes a checkpoint ``from_pretrained``
reads; bad configs fail before any model is built.

The GRPO surrogate loss is ~0 on-policy and the built-in rewards are all 0 for a random model, so the learning test
uses its own reward (``reward_digits``, loaded by import path like a user's function): every group has reward variance
and the policy can learn it in a few steps.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import signal

import pytest
import torch

import kernels as K
from engine.algorithms import make_batch, policy_update, response_logprobs
from engine.runs.checkpoint import MARKER, checkpoint_dir, is_complete
from engine.config import GRPOConfig, GRPORunConfig, SFTRunConfig, load_config
from engine.runs.metrics import read_metrics
from engine.runs.vocabulary import known
from engine.models import tiny_model
from engine.trainers.sft import SFTTrainer
from engine.trainers.base import NonFiniteLossError
from engine.trainers.grpo import GRPOTrainer
from kernels.loss_agg import LOSS_AGG_MODES

MAX_TOKENS = 8
COMMON = [
    "model.tiny_overrides={hidden_size: 32, num_layers: 1, num_heads: 2, num_kv_heads: 1, intermediate_size: 64}",
    "model.dtype=float32", "trainer.device=cpu", "trainer.progress_bar=false", "data.num_eval=8",
]
GRPO = [*COMMON, "grpo.prompts_per_step=4", "grpo.num_generations=4", f"generation.max_tokens={MAX_TOKENS}",
        f"grpo.rewards=[{__name__}:reward_digits]", "optim.lr=3e-2"]

# The per-step metrics a GRPO run logs under TRL's names.
TRL_METRICS = (
    "reward", "reward_std", "rewards/reward_digits/mean", "kl", "entropy", "clip_ratio/low_mean",
    "completions/mean_length", "completions/clipped_ratio", "perf/tokens_per_sec", "perf/time/generate",
    "perf/time/update", "grad_norm", "learning_rate", "rollout_corr/logp_diff_mean", "rollout_corr/k3_kl", "loss",
    "skipped_steps",
)


REWARD_CALLS: list[list[float]] = []  # what reward_digits returned, one list per GRPO step


def reward_digits(prompts, completions, **kwargs):
    """Share of digit characters in a completion (up to ``MAX_TOKENS`` one-character tokens): about 0.1 for a random
    policy, with variance inside every group; 1.0 once it writes only digits."""
    rewards = [sum(ch.isdigit() for ch in c) / MAX_TOKENS for c in completions]
    REWARD_CALLS.append(rewards)
    return rewards


@pytest.fixture(autouse=True)
def _one_thread():
    """Kernel launches on these tiny tensors take microseconds; intra-op threads only add contention (tens of ms per
    matmul on a busy 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def grpo_trainer(run_dir, *overrides: str) -> GRPOTrainer:
    return GRPOTrainer(load_config(GRPORunConfig, None, [f"trainer.output_dir={run_dir}", *GRPO, *overrides]))


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def record_params_per_step(trainer) -> list[dict[str, torch.Tensor]]:
    """Wrap ``trainer.train_step`` so that the parameters after each step are appended to the returned list."""
    snaps, inner = [], trainer.train_step

    def spy(step):
        metrics = inner(step)
        snaps.append(snapshot(trainer.model))
        return metrics

    trainer.train_step = spy
    return snaps


@torch.no_grad()
def digit_nll(trainer) -> float:
    """Held-out loss of the rewarded behaviour: mean -log P(first completion token is a digit) over the evaluation
    prompts."""
    digits = [trainer.tokenizer.convert_tokens_to_ids(d) for d in "0123456789"]
    total = 0.0
    for e in trainer.eval_examples:
        logits = trainer.model(input_ids=torch.tensor([e.prompt_ids])).logits[0, -1].float()
        total -= torch.logsumexp(logits.log_softmax(-1)[digits], 0).item()
    return total / len(trainer.eval_examples)


# ---------------------------------------------------------------------------------------------------------- GRPO
def test_grpo_learns_a_reward_and_logs_trl_metrics(tmp_path):
    steps = 10
    tr = grpo_trainer(tmp_path, f"trainer.max_steps={steps}", "grpo.kl_coef=0.02")
    before, nll_before = snapshot(tr.model), digit_nll(tr)
    REWARD_CALLS.clear()
    tr.train()
    after, nll_after = snapshot(tr.model), digit_nll(tr)

    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert not unchanged, f"parameters not updated by training: {unchanged}"
    assert nll_after < nll_before - 0.5, (nll_before, nll_after)

    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(1, steps + 1))  # one line per step (eval_every=0: no step 0)
    assert all(known(k) for r in records for k in r)  # the engine's one metric vocabulary
    assert len(REWARD_CALLS) == steps and all(len(c) == 16 for c in REWARD_CALLS)  # 4 prompts x 4 samples a step
    for r, scores in zip(records, REWARD_CALLS):
        bad = {k: r.get(k) for k in TRL_METRICS if not (isinstance(r.get(k), (int, float)) and math.isfinite(r[k]))}
        assert not bad, f"step {r['step']}: missing or non-finite metrics {bad}"
        groups = torch.tensor(scores).view(4, 4)
        assert r["reward"] == pytest.approx(groups.mean().item())
        assert r["reward_std"] == pytest.approx(groups.std(-1).mean().item())  # TRL: mean within-group std
        assert r["frac_reward_zero_std"] == pytest.approx((groups.std(-1) == 0).float().mean().item())
        assert r["rewards/reward_digits/mean"] == pytest.approx(r["reward"])  # the only reward function
        assert 0 <= r["completions/clipped_ratio"] <= 1 and 1 <= r["completions/mean_length"] <= MAX_TOKENS
        assert r["skipped_steps"] == 0 and r["learning_rate"] == pytest.approx(3e-2)
        assert r["rollout_corr/logp_diff_max"] < 1e-4  # float32: generator and trainer agree to rounding
    rewards = [r["reward"] for r in records]
    assert sum(rewards[-3:]) / 3 > max(rewards[0], sum(rewards[:3]) / 3) + 0.2, rewards
    assert records[-1]["kl"] > 0  # the policy moved away from the reference

    assert is_complete(checkpoint_dir(tmp_path, steps))  # the final checkpoint


@pytest.mark.parametrize("micro_batch_size", [1, 3])
@pytest.mark.parametrize("loss_agg_mode", LOSS_AGG_MODES)
def test_policy_update_is_invariant_to_the_micro_batch_split(loss_agg_mode, micro_batch_size):
    """The same batch, one micro-batch of all 8 rows vs micro-batches of 1 or 3 (3 does not divide 8): equal loss and
    metrics, and with SGD (lr 1, no clipping: the update *is* the gradient) equal parameters."""
    torch.manual_seed(0)
    model = tiny_model(vocab_size=40, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                       seed=0).train()
    B = 8
    prompts = [torch.randint(4, 40, (int(n),)).tolist() for n in torch.randint(2, 7, (B,))]
    responses = [torch.randint(4, 40, (int(n),)).tolist() for n in torch.randint(1, 9, (B,))]
    batch = make_batch(prompts, responses, 0, "cpu")
    mask = batch.response_mask
    with torch.no_grad():
        lp = response_logprobs(model, batch, temperature=0.9)
    old = (lp + 0.3 * torch.randn_like(lp)) * mask  # off-policy, so that the clip is active
    ref = (lp + 0.2 * torch.randn_like(lp)) * mask
    advantages = torch.randn(B)
    cfg = GRPOConfig(loss_agg_mode=loss_agg_mode, kl_coef=0.1, micro_batch_size=B)

    results, params = [], []
    for mbs in (B, micro_batch_size):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=1.0)
        results.append(policy_update(m, opt, batch, old, advantages, ref_logprobs=ref,
                                     cfg=cfg.model_copy(update={"micro_batch_size": mbs}), temperature=0.9,
                                     max_grad_norm=1e9))
        params.append(snapshot(m))
    full, split = results
    assert full.stepped and split.stepped
    assert full.metrics["clip_ratio/region_mean"] > 0 and full.metrics["kl"] > 0
    assert full.metrics.keys() == split.metrics.keys()
    for name, value in full.metrics.items():
        assert split.metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    start = snapshot(model)
    assert any(not torch.equal(start[k], params[0][k]) for k in start)
    for name in start:
        torch.testing.assert_close(params[1][name], params[0][name], rtol=1e-5, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------------------ resume / torn
RESUME = ["trainer.save_every=2", "trainer.eval_every=2", "grpo.kl_coef=0.05", "optim.warmup_steps=2",
          "optim.schedule=cosine", "grpo.micro_batch_size=6", "data.seed=3"]
VOLATILE = ("time", "perf/")  # wall-clock metrics differ between any two runs


def comparable(records: list[dict]) -> dict[int, dict]:
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in records}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """4 GRPO steps in one go (with KL to the reference, warmup then cosine decay, evaluation and checkpoints every
    2 steps): ``(metrics by step, final parameters)``."""
    run = tmp_path_factory.mktemp("uninterrupted")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tr = grpo_trainer(run, "trainer.max_steps=4", *RESUME)
        tr.train()
    finally:
        torch.set_num_threads(n)
    return comparable(read_metrics(run)), snapshot(tr.model)


@pytest.mark.parametrize("stop", [
    "max_steps",
    "ctrl_c",
    "ctrl_c_mid_step",
])
def test_resume_equals_the_uninterrupted_run(tmp_path, uninterrupted, stop):
    """Stop after 2 steps (a run of max_steps=2, or Ctrl-C at the start of step 3 of a 4-step run, or while step 3
    samples), start a new trainer with ``trainer.resume=auto`` and max_steps=4: every logged metric of steps 0-4 and
    the final weights equal those of the run that was never stopped."""
    if stop == "max_steps":
        grpo_trainer(tmp_path, "trainer.max_steps=2", *RESUME).train()
    else:
        tr = grpo_trainer(tmp_path, "trainer.max_steps=4", *RESUME)
        # rollout.sample: after the step drew its prompts
        owner, name = (tr, "train_step") if stop == "ctrl_c" else (tr.rollout, "sample")
        inner = getattr(owner, name)

        def interrupted(*args, **kwargs):
            if args[-1] == 2:  # the step index is the last positional argument of both
                raise KeyboardInterrupt
            return inner(*args, **kwargs)

        setattr(owner, name, interrupted)
        with pytest.raises(KeyboardInterrupt):
            tr.train()
    assert is_complete(checkpoint_dir(tmp_path, 2))

    resumed = grpo_trainer(tmp_path, "trainer.max_steps=4", "trainer.resume=auto", *RESUME)
    assert resumed.state["step"] == 2
    resumed.train()

    expected, expected_params = uninterrupted
    got = comparable(read_metrics(tmp_path))
    assert sorted(got) == sorted(expected) == [0, 1, 2, 3, 4]  # no step lost or logged twice by the resume
    for step, want in expected.items():
        assert got[step].keys() == want.keys(), step
        for name, value in want.items():
            assert got[step][name] == pytest.approx(value, rel=1e-6, abs=1e-7), (step, name)
    assert expected[4]["kl"] > 0  # the reference is the initial policy in both runs
    final = snapshot(resumed.model)
    for name, value in expected_params.items():
        torch.testing.assert_close(final[name], value, rtol=1e-6, atol=1e-7, msg=name)


def test_resume_auto_ignores_a_torn_checkpoint(tmp_path):
    first = grpo_trainer(tmp_path, "trainer.max_steps=1")
    first.train()
    weights = snapshot(first.model)
    torn = checkpoint_dir(tmp_path, 7)  # newer than the complete one, but never committed (no marker)
    torn.mkdir()
    (torn / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (torn / "model.safetensors").write_bytes(b"half a file")
    (torn / "trainer_state.json").write_text(json.dumps({"step": 7}))
    assert not (torn / MARKER).exists()

    resumed = grpo_trainer(tmp_path, "trainer.max_steps=2", "trainer.resume=auto")
    assert resumed.state["step"] == 1
    assert same(snapshot(resumed.model), weights)
    resumed.train()
    assert is_complete(checkpoint_dir(tmp_path, 2))
    assert not torn.exists()  # the next save deletes the torn directory
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


# ------------------------------------------------------------------------------------------------ non-finite steps
@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_a_nonfinite_step_is_skipped_and_training_continues(tmp_path, monkeypatch, where):
    tr = grpo_trainer(tmp_path, "trainer.max_steps=4")
    bad_step = 1  # the second step (0-based)
    if where == "loss":
        real, calls = K.grpo_loss, itertools.count()

        def poisoned(*args, **kwargs):  # one call per step: the batch is a single micro-batch
            loss, metrics = real(*args, **kwargs)
            return (loss * float("nan") if next(calls) == bad_step else loss), metrics

        monkeypatch.setattr(K, "grpo_loss", poisoned)
    else:  # a finite loss whose gradient is not
        head = tr.model.get_output_embeddings().weight
        head.register_hook(lambda g: g * float("nan") if tr.state["step"] == bad_step else None)
    start = snapshot(tr.model)
    snaps = record_params_per_step(tr)
    tr.train()

    assert not same(snaps[0], start)
    assert same(snaps[bad_step], snaps[bad_step - 1])  # the optimizer step was skipped
    assert not same(snaps[bad_step + 1], snaps[bad_step])  # and training went on
    adam_steps = {int(s["step"]) for s in tr.optimizer.state.values()}
    assert adam_steps == {3}
    records = read_metrics(tmp_path)
    assert [r["skipped_steps"] for r in records] == [0, 1, 1, 1]
    assert records[bad_step]["grad_norm"] is None  # NaN is written as null
    if where == "loss":
        assert records[bad_step]["loss"] is None
    assert all(isinstance(r["loss"], float) and isinstance(r["grad_norm"], float)
               for i, r in enumerate(records) if i != bad_step)


def test_consecutive_nonfinite_steps_abort_the_run(tmp_path, monkeypatch):
    tr = grpo_trainer(tmp_path, "trainer.max_steps=5", "trainer.max_consecutive_nonfinite=2")
    real = K.grpo_loss

    def always_nan(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        return loss * float("nan"), metrics

    monkeypatch.setattr(K, "grpo_loss", always_nan)
    start = snapshot(tr.model)
    with pytest.raises(NonFiniteLossError, match=r"2 non-finite steps in a row \(trainer\.max_consecutive_nonfinite=2\)"):
        tr.train()
    assert same(snapshot(tr.model), start)
    assert tr.state["skipped_steps"] == 2
    assert [(r["step"], r["skipped_steps"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 1, None)]


def test_ppo_epochs_take_one_optimizer_step_per_pass(tmp_path):
    tr = grpo_trainer(tmp_path, "trainer.max_steps=2", "grpo.ppo_epochs=3")
    tr.train()
    assert {int(s["step"]) for s in tr.optimizer.state.values()} == {6}
    assert tr.scheduler.last_epoch == 2  # the schedule counts trainer steps
    records = read_metrics(tmp_path)
    assert len(records) == 2 and all(abs(r["ppo_kl"]) > 0 for r in records)  # the last pass is off-policy


# --------------------------------------------------------------------------------------------------------- SFT
def test_sft_lowers_the_loss_and_saves_a_from_pretrained_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = 10
    cfg = load_config(SFTRunConfig, None, [f"trainer.output_dir={tmp_path}", *COMMON, f"sft.max_steps={steps}",
                                           "sft.batch_size=8", "sft.micro_batch_size=3", "optim.lr=1e-2"])
    tr = SFTTrainer(cfg)
    tr.train()
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    losses = [r["loss"] for r in records]
    assert losses[-1] < 0.75 * losses[0], losses
    assert all(r["skipped_steps"] == 0 and math.isfinite(r["grad_norm"]) for r in records)

    ckpt = checkpoint_dir(tmp_path, steps)
    assert is_complete(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    example = tr.eval_examples[0]
    assert tokenizer.encode(example.prompt_text, add_special_tokens=False) == example.prompt_ids
    ids = torch.tensor([example.prompt_ids])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, tr.model(input_ids=ids).logits)


# ------------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("override, message", [
    ("grpo.clip_ratio_low=-1", r"^grpo\.clip_ratio_low must be >= 0, got -1"),
    ("grpo.num_generations=1", r"^grpo\.num_generations must be >= 2"),
    ("trainer.max_consecutive_nonfinite=0", r"^trainer\.max_consecutive_nonfinite must be >= 1"),
    ("grpo.ppo_epoch=2", r"unknown config key 'grpo\.ppo_epoch' \(did you mean 'grpo\.ppo_epochs'\?\)"),
])
def test_bad_overrides_fail_in_load_config(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(GRPORunConfig, None, [*GRPO, override])


def test_bad_run_settings_fail_when_the_trainer_starts(tmp_path):
    with pytest.raises(ValueError, match=r"generation\.temperature must be > 0 for GRPO"):
        grpo_trainer(tmp_path / "greedy", "generation.temperature=0")
    with pytest.raises(ValueError, match=r"unknown reward 'no_such_reward'"):
        grpo_trainer(tmp_path / "reward", "grpo.rewards=[no_such_reward]")


def test_a_real_ctrl_c_is_deferred_to_the_step_boundary(tmp_path):
    """SIGINT during step 2 finishes that step, then checkpoints step 2 and stops."""
    tr = grpo_trainer(tmp_path, "trainer.max_steps=4", *RESUME)
    inner = tr.train_step
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under nohup / a background job

    def step(i):
        if i == 1:
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-step
        return inner(i)

    tr.train_step = step
    with pytest.raises(KeyboardInterrupt):
        tr.train()
    assert tr.state["step"] == 2
    assert is_complete(checkpoint_dir(tmp_path, 2))
    assert signal.getsignal(signal.SIGINT) is before  # the handler the run found is put back
