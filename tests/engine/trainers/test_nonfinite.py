"""Never save poisoned weights (issue 9, part 2): an update that would overflow float16 weights is refused before it
happens (weights and optimizer state untouched) and counted like a non-finite loss; an unforeseen non-finite update
stops the run; ``save_checkpoint`` refuses non-finite weights; a dead model (gradient norm exactly 0) is warned
about; skip messages name what was non-finite (reward, loss, gradient norm, weights) with the step number of
``metrics.jsonl``."""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch

import engine.trainers.sft as sft_module
from engine.algorithms.accumulation import clip_and_step
from engine.runs.checkpoint import checkpoint_dir, load_checkpoint, save_checkpoint
from engine.config import GRPORunConfig, SFTRunConfig, load_config
from engine.runs.metrics import read_metrics
from engine.models import tiny_model
from engine.algorithms.optim import MasterWeightAdamW, NonFiniteWeightsError, update_would_overflow
from engine.trainers.sft import SFTTrainer
from engine.trainers.base import NonFiniteLossError
from engine.trainers.grpo import GRPOTrainer

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = "model.tiny_overrides={hidden_size: 32, num_layers: 1, num_heads: 2, num_kv_heads: 1, intermediate_size: 64}"
SFT = [TINY, "trainer.device=cpu", "trainer.progress_bar=false", "data.num_eval=4", "sft.batch_size=8",
       "sft.micro_batch_size=8"]


def sft(run_dir, *overrides: str) -> SFTTrainer:
    return SFTTrainer(load_config(SFTRunConfig, None, [f"trainer.output_dir={run_dir}", *SFT, *overrides]))


def all_finite(model) -> bool:
    return all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point())


def test_float16_overflow_is_refused_and_no_checkpoint_is_poisoned(tmp_path, capsys):
    """lr=1e6 on float16 weights: loss and gradient norm are finite but the update overflows. Every step is refused
    (the weights and Adam's state stay as they were), the checkpoints hold finite weights, and the run stops after
    ``max_consecutive_nonfinite`` such steps with a message that names the weights, not the loss."""
    tr = sft(tmp_path, "model.dtype=float16", "optim.lr=1e6", "sft.max_steps=5", "trainer.save_every=1")
    assert isinstance(tr.optimizer, MasterWeightAdamW)
    start = {k: v.clone() for k, v in tr.model.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match=r"step 3: the update would make the weights non-finite"):
        tr.train()
    assert all(torch.equal(start[k], v) for k, v in tr.model.state_dict().items())
    assert not tr.optimizer.state or all(int(s["step"]) == 0 for s in tr.optimizer.state.values())
    out = capsys.readouterr().out
    assert [int(n) for n in re.findall(r"step (\d+): the update would", out)] == [1, 2, 3]
    records = read_metrics(tmp_path)
    assert [(r["step"], r["skipped_steps"]) for r in records] == [(1, 1), (2, 2)]  # step 3 raised before logging
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records)
    for step in (1, 2):
        model = tiny_model("llama", vocab_size=len(tr.tokenizer), hidden_size=32, num_layers=1, num_heads=2,
                           num_kv_heads=1, intermediate_size=64, dtype=torch.float16)
        load_checkpoint(checkpoint_dir(tmp_path, step), model=model)
        assert all_finite(model), step


def test_update_would_overflow_is_computed_out_of_place():
    fine = torch.nn.Parameter(torch.zeros(2, dtype=torch.float16))
    p = torch.nn.Parameter(torch.full((3, 5), 60000.0, dtype=torch.float16))
    optimizer = MasterWeightAdamW([{"params": [fine, p]}], lr=1e4)
    fine.grad, p.grad = torch.ones_like(fine), torch.ones_like(p)
    assert update_would_overflow(optimizer) == [1]  # 60000 + 1e4 > 65504; 0 + 1e4 fits
    assert optimizer.state == {} and torch.equal(p, torch.full_like(p, 60000.0))
    optimizer.param_groups[0]["lr"] = 1.0
    assert update_would_overflow(optimizer) == []
    optimizer.step()
    assert torch.isfinite(p).all()


def test_float16_weights_without_master_weights_are_refused(tmp_path):
    """Plain AdamW on float16 keeps float16 moments: a squared gradient of 1e-4 underflows to 0 and the update
    divides by zero (inf weights from an ordinary step), so that combination fails when the trainer starts."""
    with pytest.raises(ValueError, match=r"optim.master_weights=false with float16 parameters"):
        sft(tmp_path, "model.dtype=float16", "optim.master_weights=false")


def test_an_unforeseen_nonfinite_update_stops_before_anything_saves_it():
    """An optimizer the overflow check cannot predict (SGD): the check after the step raises, naming the tensors."""
    model = torch.nn.Linear(4, 3).half()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(-60000.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e4)
    model(torch.ones(2, 4, dtype=torch.float16)).sum().backward()  # every gradient is 2: -60000 - 2e4 overflows
    with pytest.raises(NonFiniteWeightsError, match=r"made 2 of 2 parameter tensors non-finite \(\['weight', 'bias'\]"):
        clip_and_step(model, optimizer, max_grad_norm=float("inf"), finite=True)


def test_save_checkpoint_refuses_nonfinite_weights(tmp_path):
    model = tiny_model("llama", vocab_size=16, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                       intermediate_size=64)
    save_checkpoint(tmp_path, 1, model=model)
    with torch.no_grad():
        model.model.norm.weight[3] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match=r"step 2 .* 1 tensors of the model are non-finite "
                                                     r"\(\['model.norm.weight'\]\)"):
        save_checkpoint(tmp_path, 2, model=model)
    assert not checkpoint_dir(tmp_path, 2).exists() and checkpoint_dir(tmp_path, 1).exists()


def test_a_dead_model_is_warned_about(tmp_path, capsys):
    """lr=1e6 in float32: after one step the gradient norm is exactly 0 and the loss flat; a warning names it."""
    sft(tmp_path, "model.dtype=float32", "optim.lr=1e6", "sft.max_steps=6", "trainer.zero_grad_warn_steps=3").train()
    assert [r["grad_norm"] for r in read_metrics(tmp_path)][1:] == [0.0] * 5
    warnings = re.findall(r"warning: step (\d+): the gradient norm was exactly 0 for 3 steps in a row "
                          r"\(steps (\d+)-(\d+)\)", capsys.readouterr().out)
    assert warnings == [("4", "2", "4")]  # once per streak, with the steps of metrics.jsonl


def test_a_nan_loss_message_gives_the_step_of_metrics_jsonl(tmp_path, capsys, monkeypatch):
    real, calls = sft_module.sft_loss, itertools.count(1)

    def nan_on_second_step(*args, **kwargs):
        loss = real(*args, **kwargs)
        return loss * float("nan") if next(calls) == 2 else loss

    monkeypatch.setattr(sft_module, "sft_loss", nan_on_second_step)
    sft(tmp_path, "model.dtype=float32", "optim.lr=1e-3", "sft.max_steps=3").train()
    assert "step 2: non-finite loss (nan): optimizer step skipped" in capsys.readouterr().out
    skipped = [r["step"] for r in read_metrics(tmp_path) if r["loss"] is None]
    assert skipped == [2]


CALLS = itertools.count()


def reward_inf_on_second_call(prompts, completions, **kwargs):
    """A reward function that returns +inf for one sample of its second batch."""
    rewards = [float(len(c)) for c in completions]
    if next(CALLS) == 1:
        rewards[1] = float("inf")
    return rewards


def test_an_infinite_reward_is_named_and_the_step_skipped(tmp_path, capsys):
    global CALLS
    CALLS = itertools.count()
    cfg = load_config(GRPORunConfig, None, [
        f"trainer.output_dir={tmp_path}", TINY, "model.dtype=float32", "trainer.device=cpu",
        "trainer.progress_bar=false", "data.num_eval=4", "grpo.prompts_per_step=2", "grpo.num_generations=2",
        "generation.max_tokens=4", f"grpo.rewards=[{__name__}:reward_inf_on_second_call]", "trainer.max_steps=3"])
    tr = GRPOTrainer(cfg)
    tr.train()
    out = capsys.readouterr().out
    assert ("step 2: non-finite reward from 'reward_inf_on_second_call' for 1 of 4 samples (first: sample 1): "
            "optimizer step skipped") in out
    records = read_metrics(tmp_path)
    assert [(r["step"], r["skipped_steps"]) for r in records] == [(1, 0), (2, 1), (3, 1)]
    assert records[1]["reward"] is None and records[1]["loss"] is None
    assert all_finite(tr.model)
