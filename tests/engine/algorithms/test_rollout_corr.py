"""``RolloutCorrMetrics``: the rollout/trainer mismatch metrics against a direct float64 computation, independent of
the micro-batch split, blind to masked positions (NaN there changes nothing); ``RolloutCorrection``: its weights and
metrics (token / sequence, truncate / mask) against a float64 transcription, bad settings named."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from engine.algorithms.rollout_corr import RolloutCorrection, RolloutCorrMetrics


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


# ---------------------------------------------------------------------------------------- the correction's weights
def reference_weights(old, q, mask, level, mode, cap, low):
    """A float64 transcription of the correction (engine.algorithms.rollout_corr docstring), row by row."""
    out, raw_all = [], []
    for o_row, q_row, m_row in zip(old.tolist(), q.tolist(), mask.tolist()):
        d = [a - b for a, b, m in zip(o_row, q_row, m_row) if m]
        if level == "token":
            raw = [math.exp(a - b) if m else None for a, b, m in zip(o_row, q_row, m_row)]
            raw_all += [w for w in raw if w is not None]
            if mode == "truncate":
                out.append([min(w, cap) if w is not None else 1.0 for w in raw])
            else:
                out.append([float(low <= w <= cap) if w is not None else 0.0 for w in raw])
        else:
            w = math.exp(sum(d) / len(d)) if d else 1.0
            if d:
                raw_all.append(w)
            out.append(min(w, cap) if mode == "truncate" else float(low <= w <= cap))
    dropped = [w > cap for w in raw_all] if mode == "truncate" else [not low <= w <= cap for w in raw_all]
    return out, {"rollout_corr/is_weight_mean": sum(raw_all) / len(raw_all),
                 "rollout_corr/is_weight_max": max(raw_all),
                 ("rollout_corr/truncated_frac" if mode == "truncate" else "rollout_corr/masked_frac"):
                     sum(dropped) / len(dropped)}


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("mode", ["truncate", "mask"])
@pytest.mark.parametrize("B,T", [(1, 1), (4, 5), (7, 3)])
def test_correction_weights_match_float64_and_ignore_masked_positions(level, mode, B, T):
    g = torch.Generator().manual_seed(B * 17 + T + len(level) + len(mode))
    old = -torch.rand(B, T, generator=g) * 3
    q = old + torch.randn(B, T, generator=g) * 0.6
    mask = torch.rand(B, T, generator=g) < 0.7
    mask[0, 0] = True
    if B > 1:
        mask[-1] = False  # an empty row: weight 1 (sequence level), never counted
    cap, low = 1.5, 0.7
    want, want_metrics = reference_weights(old, q, mask, level, mode, cap, low)
    poisoned_old, poisoned_q = old.masked_fill(~mask, float("nan")), q.masked_fill(~mask, -float("inf"))

    corr = RolloutCorrection(level, mode, cap=cap, low=low)
    got = torch.cat([corr.weights(poisoned_old[i:i + 2], poisoned_q[i:i + 2], mask[i:i + 2])
                     for i in range(0, B, 2)])  # two micro-batches' worth at a time: the metrics add up
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert got.shape == ((B, T) if level == "token" else (B,))
    if level == "token":
        got = torch.where(mask, got, 1.0 if mode == "truncate" else 0.0)  # masked positions are the loss's to drop
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=1e-7)
    metrics = corr.metrics()
    assert metrics.keys() == want_metrics.keys()
    for name, value in want_metrics.items():
        assert metrics[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name


@pytest.mark.parametrize("kwargs, message", [
    (dict(level="tok"), "rollout_is must be one of"),
    (dict(level="token", mode="clip"), "rollout_is_mode must be one of"),
    (dict(level="token", cap=0.0), "rollout_is_cap must be > 0"),
    (dict(level="token", mode="mask", cap=1.0, low=1.0), "rollout_is_low must be in"),
])
def test_correction_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RolloutCorrection(**kwargs)


def test_correction_from_config_is_none_when_off():
    assert RolloutCorrection.from_config(SimpleNamespace(rollout_is=None)) is None
    corr = RolloutCorrection.from_config(SimpleNamespace(rollout_is="sequence", rollout_is_mode="mask",
                                                         rollout_is_cap=3.0, rollout_is_low=0.5))
    assert (corr.level, corr.mode, corr.cap, corr.low) == ("sequence", "mask", 3.0, 0.5)
    assert corr.metrics() == {}  # nothing computed yet
