"""Multi-process training on the CPU (gloo, world size 2, forked ranks): two ranks sharing a step's global batch give
the same update as one process on the whole batch (loss, metrics, weights), for SFT, GRPO (rollouts on the gathered
weights), the reward model and DPO, tied and untied heads; DCP checkpoints resume at the same and at another world
size; a non-finite step is skipped on every rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.config import (
    DPORunConfig,
    GRPORunConfig,
    PPORunConfig,
    RewardModelRunConfig,
    SFTRunConfig,
    load_config,
)
from engine.runs.checkpoint import checkpoint_dir, is_complete
from engine.runs.metrics import read_metrics
from engine.trainers.grpo import GRPOTrainer
from engine.trainers.ppo import PPOTrainer
from engine.trainers.preference import DPOTrainer, RewardModelTrainer
from engine.trainers.sft import SFTTrainer
from tests.engine.distributed.ranks import run_ranks

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = "model.tiny_overrides={hidden_size: 32, num_layers: 2, num_heads: 2, num_kv_heads: 1, intermediate_size: 64}"
COMMON = [TINY, "model.dtype=float32", "trainer.device=cpu", "trainer.progress_bar=false", "optim.lr=1e-2",
          "optim.warmup_steps=0", "optim.schedule=constant"]
SFT = [*COMMON, "data.train=builtin:arithmetic", "data.num_eval=4", "sft.batch_size=8", "sft.micro_batch_size=2"]
GRPO = [*COMMON, "data.train=builtin:arithmetic", "data.num_eval=4", "grpo.prompts_per_step=4",
        "grpo.num_generations=4", "grpo.micro_batch_size=4", "generation.max_tokens=6", "grpo.kl_coef=0.05",
        "grpo.rewards=[accuracy, format]"]
PAIRS = [*COMMON, "data.num_eval=8", "trainer.eval_every=2"]
RM = [*PAIRS, "rm.batch_size=8", "rm.micro_batch_size=2"]
DPO = [*PAIRS, "dpo.batch_size=8", "dpo.micro_batch_size=2", "dpo.beta=0.1"]
PPO = [*COMMON, "data.train=builtin:arithmetic", "data.num_eval=4", "ppo.prompts_per_step=4", "ppo.num_generations=2",
       "ppo.mini_batch_size=8", "ppo.micro_batch_size=2", "ppo.ppo_epochs=2", "generation.max_tokens=6",
       "ppo.kl_coef=0.05", "ppo.rewards=[accuracy, format]"]
KINDS = {
    "ppo": (PPOTrainer, PPORunConfig, PPO, "trainer.max_steps"),
    "sft": (SFTTrainer, SFTRunConfig, SFT, "sft.max_steps"),
    "grpo": (GRPOTrainer, GRPORunConfig, GRPO, "trainer.max_steps"),
    "rm": (RewardModelTrainer, RewardModelRunConfig, RM, "rm.max_steps"),
    "dpo": (DPOTrainer, DPORunConfig, DPO, "dpo.max_steps"),
}


def write_pairs(path, n: int = 40) -> str:
    """``n`` explicit-prompt pairs whose only preference signal is the word ``good`` vs ``bad``."""
    rows = [{"prompt": f"q{i}:", "chosen": f" good {'xyz'[i % 3] * (1 + i % 4)}",
             "rejected": f" bad {'xyz'[i % 3] * (1 + i % 4)}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _cfg(kind: str, run_dir, steps: int, *extra: str):
    """The config of a ``kind`` run of ``steps`` steps in ``run_dir``, with ``extra`` overrides."""
    _, config, base, steps_key = KINDS[kind]
    return load_config(config, None, [f"trainer.output_dir={run_dir}", *base, f"{steps_key}={steps}", *extra])


def _train(rank, *, kind: str, run_dir: str, steps: int, extra=()):
    """One rank (or the single process) of a run; returns its metrics (rank 0) and final weights."""
    trainer = KINDS[kind][0](_cfg(kind, run_dir, steps, *extra))
    trainer.train()
    return read_metrics(run_dir) if rank == 0 else None


def _weights(run_dir, steps: int) -> dict[str, torch.Tensor]:
    ckpt = checkpoint_dir(run_dir, steps)
    assert is_complete(ckpt)
    return load_file(str(ckpt / "model.safetensors"))


def _assert_same_run(single_dir, dist_dir, steps: int, keys: tuple[str, ...]):
    want, got = read_metrics(single_dir), read_metrics(dist_dir)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    assert any(key in r for r in want for key in keys)
    for a, b in zip(want, got):
        assert a.keys() == b.keys()
        for key in (k for k in keys if k in a):  # the step-0 record holds the evaluation only
            assert b[key] == pytest.approx(a[key], rel=2e-5, abs=1e-6), (a["step"], key)
    w_single, w_dist = _weights(single_dir, steps), _weights(dist_dir, steps)
    assert w_single.keys() == w_dist.keys()
    for name in w_single:
        torch.testing.assert_close(w_dist[name], w_single[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("tied, checkpointing", [(True, False), (False, False), (True, True)])
def test_sft_on_two_ranks_equals_one_process(tmp_path, tied, checkpointing):
    # (activation checkpointing recomputes each layer in the backward: the same gradients)
    extra = (f"model.tiny_overrides.tie_word_embeddings={str(tied).lower()}",
             f"distributed.activation_checkpointing={str(checkpointing).lower()}")
    _train(0, kind="sft", run_dir=str(tmp_path / "single"), steps=3, extra=extra)
    run_ranks(_train, tmp_path / "ranks", kind="sft", run_dir=str(tmp_path / "dist"), steps=3, extra=extra)
    _assert_same_run(tmp_path / "single", tmp_path / "dist", 3, ("loss", "grad_norm"))
    assert (checkpoint_dir(tmp_path / "dist", 3) / "dcp").is_dir()
    assert ("lm_head.weight" in _weights(tmp_path / "dist", 3)) == (not tied)


def test_grpo_on_two_ranks_equals_one_process(tmp_path):
    # each rank samples its own prompts' groups on the gathered weights, with the seeds of their global positions:
    # the same tokens, rewards and update as one process on the whole step (the KL to a sharded reference included)
    _train(0, kind="grpo", run_dir=str(tmp_path / "single"), steps=3)
    run_ranks(_train, tmp_path / "ranks", kind="grpo", run_dir=str(tmp_path / "dist"), steps=3)
    _assert_same_run(tmp_path / "single", tmp_path / "dist", 3,
                     ("reward", "reward_std", "completions/mean_length", "loss", "kl", "entropy", "grad_norm",
                      "rollout_corr/logp_diff_mean"))


def test_ppo_on_two_ranks_equals_one_process(tmp_path):
    # the actor, the critic (a fresh value head on the policy's body), the reference: all sharded; one mini-batch
    # of the whole rollout per epoch, so that the ranks' shares make up the same mini-batch as one process's;
    # whitening and the KL controller's input over every rank's tokens
    _train(0, kind="ppo", run_dir=str(tmp_path / "single"), steps=3)
    run_ranks(_train, tmp_path / "ranks", kind="ppo", run_dir=str(tmp_path / "dist"), steps=3)
    _assert_same_run(tmp_path / "single", tmp_path / "dist", 3,
                     ("reward", "objective/kl", "kl_coef", "pg_loss", "critic/vf_loss", "critic/advantages/mean",
                      "critic/returns/mean", "grad_norm", "critic/grad_norm", "ppo/updates"))
    critic = load_file(str(checkpoint_dir(tmp_path / "dist", 3) / "critic" / "model.safetensors"))
    want = load_file(str(checkpoint_dir(tmp_path / "single", 3) / "critic" / "model.safetensors"))
    for name in want:
        torch.testing.assert_close(critic[name], want[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("kind, keys", [
    ("rm", ("loss", "accuracy", "margin", "grad_norm", "eval/accuracy", "eval/loss")),
    ("dpo", ("loss", "rewards/margins", "logps/chosen", "grad_norm", "eval/loss", "eval/rewards/accuracies")),
])
def test_pair_trainers_on_two_ranks_equal_one_process(tmp_path, kind, keys):
    data = write_pairs(tmp_path / "pairs.jsonl")
    extra = (f"data.train={data}",)
    _train(0, kind=kind, run_dir=str(tmp_path / "single"), steps=2, extra=extra)
    run_ranks(_train, tmp_path / "ranks", kind=kind, run_dir=str(tmp_path / "dist"), steps=2, extra=extra)
    _assert_same_run(tmp_path / "single", tmp_path / "dist", 2, keys)


# ------------------------------------------------------------------------------------------------ resume
RESUME = ("trainer.save_every=2", "trainer.keep_last=5")


def _resume_weights(run_dir, steps):
    return {k: v.clone() for k, v in _weights(run_dir, steps).items()}


def test_dcp_resume_on_two_ranks_is_bitwise_the_uninterrupted_run(tmp_path):
    run_ranks(_train, tmp_path / "r1", kind="sft", run_dir=str(tmp_path / "full"), steps=4, extra=RESUME)
    run_ranks(_train, tmp_path / "r2", kind="sft", run_dir=str(tmp_path / "half"), steps=2, extra=RESUME)
    run_ranks(_train, tmp_path / "r3", kind="sft", run_dir=str(tmp_path / "half"), steps=4,
              extra=(*RESUME, "trainer.resume=auto"))
    want, got = _weights(tmp_path / "full", 4), _weights(tmp_path / "half", 4)
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert [r["loss"] for r in read_metrics(tmp_path / "half")] == [r["loss"] for r in read_metrics(tmp_path / "full")]


@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_a_checkpoint_resumes_at_another_world_size(tmp_path, first, then):
    # 2 -> 1 reads the DCP shards into a plain model, 1 -> 2 the HF weights and optimizer.pt into a sharded one: the
    # state loaded is the state saved, so the continuation matches an uninterrupted run up to reduction order
    def segment(world, steps, *extra, name):
        if world == 1:
            return _train(0, kind="sft", run_dir=str(tmp_path / "run"), steps=steps, extra=(*RESUME, *extra))
        return run_ranks(_train, tmp_path / name, kind="sft", run_dir=str(tmp_path / "run"), steps=steps,
                         extra=(*RESUME, *extra))

    _train(0, kind="sft", run_dir=str(tmp_path / "full"), steps=4, extra=RESUME)
    segment(first, 2, name="a")
    segment(then, 4, "trainer.resume=auto", name="b")
    want, got = _weights(tmp_path / "full", 4), _weights(tmp_path / "run", 4)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=k)
    losses = [r["loss"] for r in read_metrics(tmp_path / "run")]
    assert losses == pytest.approx([r["loss"] for r in read_metrics(tmp_path / "full")], rel=1e-5)


# ------------------------------------------------------------------------------------------------ reliability
def inf_on_rank_1_at_step_1(prompts, completions, **kwargs) -> list[float]:
    """A reward that is infinite on rank 1 during the second step (``calls`` counts this rank's calls), 0 elsewhere."""
    inf_on_rank_1_at_step_1.calls += 1
    bad = os.environ.get("RANK") == "1" and inf_on_rank_1_at_step_1.calls == 2
    return [float("inf") if bad else 0.0 for _ in completions]  # (a NaN would count as "no reward", as in TRL)


inf_on_rank_1_at_step_1.calls = 0


def test_a_non_finite_reward_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    # one rank's NaN reward must not make it skip alone: the others would wait for it in the update's collectives
    extra = (f"grpo.rewards=[{__name__}:inf_on_rank_1_at_step_1]",)
    run_ranks(_train, tmp_path / "ranks", kind="grpo", run_dir=str(tmp_path / "dist"), steps=3, extra=extra)
    records = read_metrics(tmp_path / "dist")
    assert [r["skipped_steps"] for r in records] == [0, 1, 1]
    assert records[1]["loss"] is None and records[2]["loss"] is not None


def _nan_loss_on_rank_1(rank):
    from engine.algorithms import accumulated_step
    from engine.distributed import call_in_root, shard_model
    from engine.models import tiny_model

    model = shard_model(tiny_model("llama", vocab_size=32, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                                   intermediate_size=32, seed=0))
    before = {n: p.detach().full_tensor().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.tensor([[1, 2, 3, 4]])

    def micro_loss(_):
        loss = call_in_root(model, lambda m: m(input_ids=ids).logits.float().mean())
        return (loss * float("nan") if rank == 1 else loss), {}

    result = accumulated_step(model, opt, [0, 1], micro_loss, max_grad_norm=1.0)
    after = {n: p.detach().full_tensor() for n, p in model.named_parameters()}
    return result.stepped, all(torch.equal(before[n], after[n]) for n in before)


def test_a_non_finite_loss_on_one_rank_skips_the_step_everywhere_without_a_deadlock(tmp_path):
    assert run_ranks(_nan_loss_on_rank_1, tmp_path, timeout=60) == [(False, True), (False, True)]


def test_a_step_size_that_does_not_divide_over_the_ranks_is_named(tmp_path):
    with pytest.raises(AssertionError, match=r"sft\.batch_size=5 does not divide over the 2 processes"):
        run_ranks(_train, tmp_path / "ranks", kind="sft", run_dir=str(tmp_path / "dist"), steps=1,
                  extra=("sft.batch_size=5", "sft.micro_batch_size=1"))


def _hung_collective(rank):
    from engine.distributed import barrier, init_distributed

    init_distributed("cpu", timeout_s=1.0)
    if rank == 1:
        time.sleep(6)  # never reaches the barrier in time
        return None
    start = time.perf_counter()
    try:
        barrier()
    except RuntimeError as err:
        return time.perf_counter() - start, str(err)
    return None


def test_a_hung_collective_fails_after_distributed_timeout_s(tmp_path):
    waited, message = run_ranks(_hung_collective, tmp_path, init=False, timeout=60)[0]
    assert waited < 5, waited
    assert "timed out" in message.lower() or "timeout" in message.lower(), message


def test_the_cli_runs_under_torchrun(tmp_path):
    # the real launcher: torchrun's environment, the CLI's config and overrides, gloo picked for the CPU
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.is_file():
        pytest.skip("torchrun is not installed next to this python")
    run_dir = tmp_path / "run"
    overrides = [f"trainer.output_dir={run_dir}", *SFT, "sft.max_steps=2"]
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "engine.cli", "sft",
                           *overrides], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]
    assert (checkpoint_dir(run_dir, 2) / "dcp").is_dir() and (checkpoint_dir(run_dir, 2) / "rng-rank1.pt").is_file()
