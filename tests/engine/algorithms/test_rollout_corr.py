"""``RolloutCorrMetrics``: the rollout/trainer mismatch metrics against a direct float64 computation, independent of
the micro-batch split, blind to masked positions (NaN there changes nothing)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from engine.algorithms.rollout_corr import RolloutCorrMetrics


def reference(lp, q, mask) -> dict[str, float]:
    tokens = [(float(a), float(b)) for row_a, row_b, row_m in zip(lp, q, mask) for a, b, m in zip(row_a, row_b, row_m)
              if m]
    seqs = [[(float(a), float(b)) for a, b, m in zip(ra, rb, rm) if m] for ra, rb, rm in zip(lp, q, mask)]
    seqs = [s for s in seqs if s]
    d = [a - b for a, b in tokens]
    train = [math.exp(-sum(a for a, _ in s) / len(s)) for s in seqs]
    roll = [math.exp(-sum(b for _, b in s) / len(s)) for s in seqs]
    return {
        "rollout_corr/logp_diff_mean": sum(abs(x) for x in d) / len(d),
        "rollout_corr/logp_diff_max": max(abs(x) for x in d),
        "rollout_corr/kl": sum(-x for x in d) / len(d),
        "rollout_corr/k3_kl": sum(math.exp(x) - 1 - x for x in d) / len(d),
        "rollout_corr/training_ppl": sum(train) / len(seqs),
        "rollout_corr/rollout_ppl": sum(roll) / len(seqs),
        "rollout_corr/ppl_ratio": sum(t / r for t, r in zip(train, roll)) / len(seqs),
    }


@pytest.mark.parametrize("B,T", [(1, 1), (5, 7), (8, 3)])
def test_matches_float64_and_ignores_masked_positions_and_the_split(B, T):
    g = torch.Generator().manual_seed(B * 31 + T)
    lp = -torch.rand(B, T, generator=g) * 3
    q = lp + torch.randn(B, T, generator=g) * 0.1
    mask = torch.rand(B, T, generator=g) < 0.7
    mask[0, 0] = True
    if B > 2:
        mask[2] = False  # a fully masked row is not a sequence of the means
    want = reference(lp, q, mask)
    poisoned_lp = lp.masked_fill(~mask, float("nan"))
    poisoned_q = q.masked_fill(~mask, float("inf"))

    whole = RolloutCorrMetrics()
    whole.add(poisoned_lp, poisoned_q, mask)
    split = RolloutCorrMetrics()
    for rows in torch.arange(B).split(3):
        split.add(poisoned_lp[rows], poisoned_q[rows], mask[rows])
    for got in (whole.metrics(), split.metrics()):
        assert got.keys() == want.keys()
        for name, value in want.items():
            assert got[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name


def test_identical_logprobs_give_no_mismatch_and_nothing_added_gives_no_metrics():
    lp = -torch.rand(3, 4)
    m = RolloutCorrMetrics()
    m.add(lp, lp.clone(), torch.ones(3, 4, dtype=torch.bool))
    got = m.metrics()
    assert got["rollout_corr/logp_diff_max"] == 0 and got["rollout_corr/k3_kl"] == 0
    assert got["rollout_corr/ppl_ratio"] == pytest.approx(1.0)
    assert RolloutCorrMetrics().metrics() == {}


# ------------------------------------------------------------------------------------------------ in the trainers
TINY = "model.tiny_overrides={hidden_size: 32, num_layers: 1, num_heads: 2, num_kv_heads: 1, intermediate_size: 64}"
RUN = [TINY, "model.dtype=float32", "trainer.device=cpu", "trainer.progress_bar=false", "data.num_eval=4",
       "generation.max_tokens=6", "trainer.max_steps=3", "optim.lr=1e-2"]


def length_reward(prompts, completions, **kwargs) -> list[float]:
    return [float(len(c)) for c in completions]


def grpo_gaps(run_dir, perturb: float = 0.0) -> list[float]:
    """``rollout_corr/logp_diff_max`` of each step of a short GRPO run; with ``perturb`` > 0 the generator samples
    from a copy of the policy whose weights carry that much Gaussian noise (a deliberately mismatched rollout)."""
    from engine.config import GRPORunConfig, load_config
    from engine.generation import Generator
    from engine.runs.metrics import read_metrics
    from engine.trainers.grpo import GRPOTrainer

    tr = GRPOTrainer(load_config(GRPORunConfig, None, [
        f"trainer.output_dir={run_dir}", *RUN, "grpo.prompts_per_step=2", "grpo.num_generations=4",
        f"grpo.rewards=[{__name__}:length_reward]"]))
    if perturb:
        other = copy.deepcopy(tr.model)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in other.parameters():
                p.add_(torch.randn(p.shape, generator=g) * perturb)
        tr.rollout.generator = Generator(other, tr.tokenizer, attention_backend=None)
    tr.train()
    return [r["rollout_corr/logp_diff_max"] for r in read_metrics(run_dir)]


@pytest.mark.usefixtures("one_thread")
def test_grpo_measures_a_small_real_gap_and_a_mismatched_generator_moves_it(tmp_path):
    same = grpo_gaps(tmp_path / "same")
    assert max(same) < 1e-4 and max(same) > 0  # float32 on the CPU: rounding only, but not zero by construction
    mismatched = grpo_gaps(tmp_path / "mismatched", perturb=0.05)
    assert min(mismatched) > 100 * max(same)


@pytest.mark.usefixtures("one_thread")
def test_ppo_logs_the_mismatch_of_its_first_actor_step(tmp_path):
    from engine.config import PPORunConfig, load_config
    from engine.runs.metrics import read_metrics
    from engine.trainers.ppo import PPOTrainer

    PPOTrainer(load_config(PPORunConfig, None, [
        f"trainer.output_dir={tmp_path}", *RUN, f"ppo.rewards=[{__name__}:length_reward]", "ppo.prompts_per_step=4",
        "ppo.mini_batch_size=2", "ppo.micro_batch_size=2"])).train()
    for r in read_metrics(tmp_path):
        assert 0 <= r["rollout_corr/logp_diff_mean"] <= r["rollout_corr/logp_diff_max"] < 1e-4
        assert r["rollout_corr/ppl_ratio"] == pytest.approx(1.0, abs=1e-4)
