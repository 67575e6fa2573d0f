"""The preference-pair trainers and PPO end to end on the CPU, with a tiny random Llama and the character tokenizer.

Reward model: a synthetic separable preference set (chosen responses say "good", rejected ones "bad", with the same
random letters after it) is learnt to a high held-out accuracy, and the checkpoint reads back with
``AutoModelForSequenceClassification.from_pretrained`` giving the same scores; bad pair records fail when the trainer
starts, naming the record. DPO: the held-out reward accuracy rises and the reference log-probs stay those of the
initial policy; the ipo and robust losses run. PPO: a scripted rule reward (``digit_reward``, loaded by import
path like a user's function) rises, the veRL metric names are logged, and a resumed run equals the uninterrupted one
(actor, critic and the adaptive KL coefficient). The CLI writes a run directory.
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from engine.algorithms.dpo import reference_logprobs
from engine.runs.checkpoint import checkpoint_dir, is_complete
from engine.cli import main
from engine.config import DPORunConfig, PPORunConfig, RewardModelRunConfig, load_config
from engine.runs.metrics import read_metrics
from engine.runs.vocabulary import known
from engine.models.value_model import sequence_scores
from engine.algorithms.optim import MasterWeightAdamW
from engine.trainers.preference import DPOTrainer, RewardModelTrainer
from engine.trainers.ppo import PPOTrainer

COMMON = [
    "model.tiny_overrides={hidden_size: 32, num_layers: 1, num_heads: 2, num_kv_heads: 1, intermediate_size: 64}",
    "model.dtype=float32", "trainer.device=cpu", "trainer.progress_bar=false",
]
LETTERS = "cefhijklmnpqrstuvwxyz"  # none of the letters of "good" and "bad"


pytestmark = pytest.mark.usefixtures("one_thread")


def write_pairs(path, n: int = 120, seed: int = 0) -> list[dict]:
    """``n`` explicit-prompt pairs: ``"q{i}:"``, chosen ``" good <letters>"``, rejected ``" bad <letters>"`` (the same
    random letters on both sides, so the only preference signal is the word)."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        tail = "".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 6)))
        records.append({"prompt": f"q{i}:", "chosen": f" good {tail}", "rejected": f" bad {tail}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# ------------------------------------------------------------------------------------------------ reward model
RM = [*COMMON, "data.num_eval=40", "optim.lr=3e-3", "rm.batch_size=16", "rm.micro_batch_size=16"]


def rm_trainer(run_dir, data, *overrides: str) -> RewardModelTrainer:
    cfg = load_config(RewardModelRunConfig, None, [f"trainer.output_dir={run_dir}", f"data.train={data}", *RM,
                                                   *overrides])
    return RewardModelTrainer(cfg)


def test_reward_model_learns_separable_pairs_and_saves_a_from_pretrained_checkpoint(tmp_path):
    from transformers import AutoModelForSequenceClassification

    data = tmp_path / "pairs.jsonl"
    write_pairs(data)
    run = tmp_path / "run"
    tr = rm_trainer(run, data, "rm.epochs=4")
    assert len(tr.train_examples) == 80 and len(tr.eval_examples) == 40
    assert [e.pair.index for e in tr.eval_examples] == list(range(80, 120))  # the last rows are held out
    before = tr.evaluate()
    tr.train()
    after = tr.evaluate()

    records = read_metrics(run)
    assert all(known(k) for r in records for k in r)  # the engine's one metric vocabulary
    steps = 4 * 5  # 80 pairs / 16 per step, 4 epochs
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    losses = [r["loss"] for r in records]
    assert all(math.isfinite(x) for x in losses) and all(r["skipped_steps"] == 0 for r in records)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    assert after["eval/num_pairs"] == 40
    assert after["eval/accuracy"] >= 0.85, (before, after)
    assert after["eval/accuracy_ci_low"] <= after["eval/accuracy"] <= after["eval/accuracy_ci_high"]
    assert after["eval/accuracy_ci_high"] - after["eval/accuracy_ci_low"] > 0.05  # a real interval over 40 pairs
    assert after["eval/margin"] > before["eval/margin"] and after["eval/loss"] < before["eval/loss"]
    assert after["eval/loss"] < math.log(2)

    ckpt = checkpoint_dir(run, steps)
    assert is_complete(ckpt) and (run / "metrics.jsonl").is_file() and (run / "config.yaml").is_file()
    loaded = AutoModelForSequenceClassification.from_pretrained(ckpt).eval()
    assert loaded.config.num_labels == 1
    rows = [e.prompt_ids + e.chosen_ids for e in tr.eval_examples[:6]]
    rows += [e.prompt_ids + e.rejected_ids for e in tr.eval_examples[:6]]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    tr.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(sequence_scores(loaded, ids, mask), sequence_scores(tr.model, ids, mask))


@pytest.mark.parametrize("bad, message", [
    ({"prompt": "q3:", "chosen": " good x"}, r"record 3: missing 'rejected'"),
    ({"prompt": "q3:", "chosen": " good x", "rejected": " good x"}, r"record 3: the 'chosen' and 'rejected' resp"),
    ({"prompt": "q3:", "chosen": "", "rejected": " bad x"}, r"record 3: the chosen response is empty"),
    ({"prompt": "q3:", "chosen": " good x", "rejected": "   "}, r"record 3: the rejected response is empty"),
])
def test_bad_pair_records_fail_when_the_trainer_starts_naming_the_record(tmp_path, bad, message):
    data = tmp_path / "pairs.jsonl"
    records = write_pairs(data, n=12)
    good = records[3]
    records[3] = bad
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(ValueError, match=message) as err:
        rm_trainer(tmp_path / "run", data, "data.num_eval=4", "rm.max_steps=1")
    assert str(data) in str(err.value)

    records[3] = good  # fixed: the same file goes through
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    tr = rm_trainer(tmp_path / "run", data, "data.num_eval=4", "rm.max_steps=1")
    assert len(tr.train_examples) == 8


def test_cli_rm_writes_the_run_directory(tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    write_pairs(data, n=24)
    run = tmp_path / "cli-run"
    assert main(["rm", f"data.train={data}", f"trainer.output_dir={run}", *RM, "data.num_eval=8",
                 "rm.max_steps=2", "trainer.eval_every=2"]) == 0
    assert (run / "config.yaml").is_file()
    assert load_config(RewardModelRunConfig, run / "config.yaml").rm.max_steps == 2
    records = read_metrics(run)
    assert [r["step"] for r in records] == [0, 1, 2]
    assert "eval/accuracy" in records[0] and "eval/accuracy" in records[-1]
    assert all(known(k) for r in records for k in r)
    assert is_complete(checkpoint_dir(run, 2))
    printed = capsys.readouterr().out
    assert '"eval/accuracy"' in printed  # the final metrics as JSON


# ------------------------------------------------------------------------------------------------------- DPO
DPO = [*COMMON, "data.num_eval=40", "optim.lr=3e-3", "dpo.batch_size=16", "dpo.micro_batch_size=16",
       "dpo.beta=0.1"]


def test_resume_with_a_longer_run_uses_the_new_schedule(tmp_path):
    # the optimizer's saved lr belongs to the old (2-step) schedule, which had decayed to 0: after the resume the
    # lr must be the 4-step schedule's value at step 2
    data = tmp_path / "pairs.jsonl"
    write_pairs(data, n=48)
    args = ["data.num_eval=8", "optim.schedule=linear", "rm.batch_size=8", "rm.micro_batch_size=8"]
    rm_trainer(tmp_path / "run", data, "rm.max_steps=2", *args).train()
    resumed = rm_trainer(tmp_path / "run", data, "rm.max_steps=4", "trainer.resume=auto", *args)
    fresh = rm_trainer(tmp_path / "fresh", data, "rm.max_steps=4", *args)
    fresh.scheduler.step()
    fresh.scheduler.step()
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(fresh.optimizer.param_groups[0]["lr"])
    assert resumed.optimizer.param_groups[0]["lr"] > 0


def test_bf16_model_trains_through_master_weights_and_resumes_exactly(tmp_path):
    # bf16 parameters (the CUDA default) step float32 masters; the checkpoint carries them, so 2 steps + resume + 2
    # steps equals 4 steps bit for bit, and the weights do move at a learning rate below half a bf16 ulp per step
    data = tmp_path / "pairs.jsonl"
    write_pairs(data, n=48)
    args = ["data.num_eval=8", "model.dtype=bfloat16", "optim.lr=1e-4", "rm.batch_size=8", "rm.micro_batch_size=8"]
    full = rm_trainer(tmp_path / "full", data, "rm.max_steps=4", *args)
    assert isinstance(full.optimizer, MasterWeightAdamW)
    before = snapshot(full.model)
    full.train()
    rm_trainer(tmp_path / "half", data, "rm.max_steps=2", *args).train()
    resumed = rm_trainer(tmp_path / "half", data, "rm.max_steps=4", "trainer.resume=auto", *args)
    resumed.train()
    after, again = snapshot(full.model), snapshot(resumed.model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    for k in after:
        assert torch.equal(after[k], again[k]), k


def dpo_trainer(run_dir, data, *overrides: str) -> DPOTrainer:
    cfg = load_config(DPORunConfig, None, [f"trainer.output_dir={run_dir}", f"data.train={data}", *DPO, *overrides])
    return DPOTrainer(cfg)


def test_dpo_raises_the_heldout_reward_accuracy_and_keeps_the_reference(tmp_path):
    data = tmp_path / "pairs.jsonl"
    write_pairs(data)
    run = tmp_path / "run"
    tr = dpo_trainer(run, data, "dpo.max_steps=10", "trainer.eval_every=5")
    ref_at_start = {k: (c.clone(), r.clone()) for k, (c, r) in tr.ref_logps.items()}
    assert len(ref_at_start) == 120  # every train and held-out pair
    start = snapshot(tr.model)
    tr.train()

    records = {r["step"]: r for r in read_metrics(run)}
    assert records[0]["eval/rewards/accuracies"] == 0  # policy == reference: every margin is 0
    assert records[0]["eval/loss"] == pytest.approx(math.log(2), abs=1e-5)
    final = records[10]
    assert final["eval/rewards/accuracies"] >= 0.85, final
    assert final["eval/rewards/accuracies"] > records[0]["eval/rewards/accuracies"]
    assert final["eval/loss"] < records[0]["eval/loss"]
    assert final["eval/rewards/accuracies_ci_low"] <= final["eval/rewards/accuracies"]
    assert final["eval/rewards/accuracies"] <= final["eval/rewards/accuracies_ci_high"]
    assert final["eval/num_pairs"] == 40

    # The reference is the initial policy: its log-probs did not move with the weights.
    assert any(not torch.equal(start[k], p) for k, p in snapshot(tr.model).items())
    assert tr.ref_logps.keys() == ref_at_start.keys()
    for key, (c, r) in ref_at_start.items():
        assert torch.equal(tr.ref_logps[key][0], c) and torch.equal(tr.ref_logps[key][1], r)
    fresh = dpo_trainer(tmp_path / "fresh", data, "dpo.max_steps=10")  # same seed: same initial policy
    for e_new, e_old in zip(fresh.eval_examples, tr.eval_examples):
        torch.testing.assert_close(torch.stack(fresh.ref_logps[id(e_new)]), torch.stack(tr.ref_logps[id(e_old)]))


def test_dpo_resume_keeps_the_initial_reference_and_equals_the_uninterrupted_run(tmp_path):
    data = tmp_path / "pairs.jsonl"
    write_pairs(data, n=48)
    args = ["data.num_eval=8", "dpo.batch_size=8", "dpo.micro_batch_size=4", "optim.warmup_steps=2", "data.seed=1"]
    full = dpo_trainer(tmp_path / "full", data, "dpo.max_steps=4", *args)
    full.train()
    half = tmp_path / "half"
    dpo_trainer(half, data, "dpo.max_steps=2", *args).train()
    resumed = dpo_trainer(half, data, "dpo.max_steps=4", "trainer.resume=auto", *args)
    assert resumed.state["step"] == 2
    # The reference is the initial policy, not the step-2 weights the checkpoint put into the model.
    for e_full, e_res in zip(full.train_examples + full.eval_examples, resumed.train_examples + resumed.eval_examples):
        torch.testing.assert_close(torch.stack(resumed.ref_logps[id(e_res)]), torch.stack(full.ref_logps[id(e_full)]))
    resumed.train()
    want, got = snapshot(full.model), snapshot(resumed.model)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7, msg=k)
    losses = [r["loss"] for r in read_metrics(tmp_path / "full")]
    assert [r["loss"] for r in read_metrics(half)] == pytest.approx(losses, rel=1e-6)


@pytest.mark.parametrize("loss_type", ["ipo", "robust"])
def test_dpo_loss_variants_take_a_finite_step(tmp_path, loss_type):
    data = tmp_path / "pairs.jsonl"
    write_pairs(data, n=24)
    extra = ["dpo.label_smoothing=0.1"] if loss_type == "robust" else []
    tr = dpo_trainer(tmp_path / "run", data, "data.num_eval=8", "dpo.max_steps=1", "trainer.eval_every=1",
                     f"dpo.loss_type={loss_type}", *extra)
    # IPO compares length-averaged log-probs (TRL), the others summed ones: check the reference the trainer took
    e = tr.train_examples[0]
    summed = reference_logprobs(tr.model, [e], pad_id=tr.tokenizer.pad_token_id, device=tr.device)[0]
    expected = summed / len(e.chosen_ids) if loss_type == "ipo" else summed
    assert torch.allclose(tr.ref_logps[id(e)][0], expected[0], rtol=1e-5)
    start = snapshot(tr.model)
    metrics = tr.train()
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"]) and metrics["skipped_steps"] == 0
    assert math.isfinite(metrics["eval/loss"])
    assert any(not torch.equal(start[k], p) for k, p in snapshot(tr.model).items())


# ------------------------------------------------------------------------------------------------------- PPO
PPO_MAX_TOKENS = 8


def digit_reward(prompts, completions, **kwargs) -> list[float]:
    """Digits per possible completion token (``PPO_MAX_TOKENS`` one-character tokens; an early EOS scores the missing
    ones 0): about 0.1 for the random policy, 1.0 for a policy that writes only digits."""
    return [sum(ch.isdigit() for ch in c) / PPO_MAX_TOKENS for c in completions]


PPO = [*COMMON, "data.num_eval=8", f"generation.max_tokens={PPO_MAX_TOKENS}", "generation.temperature=1.0",
       f"ppo.rewards=[{__name__}:digit_reward]", "ppo.prompts_per_step=16", "ppo.mini_batch_size=8",
       "ppo.micro_batch_size=8", "ppo.ppo_epochs=2", "optim.lr=1e-2", "ppo.critic_lr=1e-2", "ppo.kl_coef=0.02"]
PPO_METRICS = ("critic/vf_loss", "critic/vpred_mean", "critic/advantages/mean", "clip_ratio/region_mean", "ppo_kl",
               "objective/kl", "reward", "pg_loss", "critic/values/mean", "critic/returns/mean", "kl_coef")


def ppo_trainer(run_dir, *overrides: str) -> PPOTrainer:
    return PPOTrainer(load_config(PPORunConfig, None, [f"trainer.output_dir={run_dir}", *PPO, *overrides]))


def test_ppo_raises_a_rule_reward_and_logs_its_metrics(tmp_path):
    steps = 12
    tr = ppo_trainer(tmp_path, f"trainer.max_steps={steps}")
    tr.train()
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    for r in records:
        assert all(known(k) for k in r), [k for k in r if not known(k)]  # the engine's one vocabulary
        bad = {k: r.get(k) for k in PPO_METRICS
               if not (isinstance(r.get(k), (int, float)) and math.isfinite(r[k]))}
        assert not bad, f"step {r['step']}: missing or non-finite metrics {bad}"
        assert r["skipped_steps"] == 0 and r["ppo/updates"] == 4  # 2 epochs x 16 samples / 8 per mini-batch
        assert r["rewards/digit_reward/mean"] == pytest.approx(r["reward"])
    rewards = [r["reward"] for r in records]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.2, rewards
    assert records[-1]["objective/kl"] > 0  # the actor left the reference
    ckpt = checkpoint_dir(tmp_path, steps)
    assert is_complete(ckpt)
    assert all((ckpt / "critic" / name).is_file() for name in ("config.json", "model.safetensors", "optimizer.pt"))


# Constant after a 2-step warmup: a run stopped by max_steps=2 then has the same schedule as the first half of the
# 4-step run (a decaying schedule over max_steps differs between the two by design).
RESUME = ["trainer.save_every=2", "ppo.adaptive_kl=true", "ppo.target_kl=0.01", "ppo.kl_horizon=64",
          "optim.warmup_steps=2", "optim.schedule=constant", "data.seed=3", "ppo.prompts_per_step=8",
          "ppo.mini_batch_size=4", "ppo.micro_batch_size=4"]


def test_ppo_resume_equals_the_uninterrupted_run(tmp_path):
    full = ppo_trainer(tmp_path / "full", "trainer.max_steps=4", *RESUME)
    full.train()
    half = tmp_path / "half"
    ppo_trainer(half, "trainer.max_steps=2", *RESUME).train()
    assert is_complete(checkpoint_dir(half, 2))
    resumed = ppo_trainer(half, "trainer.max_steps=4", "trainer.resume=auto", *RESUME)
    assert resumed.state["step"] == 2
    assert resumed.kl_ctl.value == resumed.state["kl_coef"] != 0.02  # the adapted coefficient carried over
    resumed.train()

    assert full.kl_ctl.value != 0.02
    assert resumed.kl_ctl.value == pytest.approx(full.kl_ctl.value, rel=1e-6)
    for name, (a, b) in {"actor": (full.model, resumed.model), "critic": (full.critic, resumed.critic)}.items():
        want, got = snapshot(a), snapshot(b)
        assert want.keys() == got.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7, msg=f"{name}.{k}")
    want = {r["step"]: r for r in read_metrics(tmp_path / "full")}
    got = {r["step"]: r for r in read_metrics(half)}
    assert sorted(want) == sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in ("reward", "objective/kl", "kl_coef", "critic/vf_loss", "pg_loss"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-5, abs=1e-7), (step, key)


def test_ppo_against_a_trained_reward_model_on_pair_prompts(tmp_path):
    # the classic pipeline end to end on a toy: a reward model trained on "good" vs "bad" pairs scores the policy's
    # completions of the pairs' prompts; the critic starts as a copy of that reward model (same tokenizer); the run
    # checkpoints and its reward, critic and KL metrics are finite
    data = tmp_path / "pairs.jsonl"
    write_pairs(data, n=48)
    rm_trainer(tmp_path / "rm", data, "rm.max_steps=3", "data.num_eval=8").train()
    trainer = PPOTrainer(load_config(PPORunConfig, None, [
        *COMMON, f"trainer.output_dir={tmp_path / 'ppo'}", f"data.train={data}", "data.num_eval=8",
        "data.template={prompt}", f"ppo.reward_model={tmp_path / 'rm'}", "generation.max_tokens=6",
        "ppo.prompts_per_step=8", "ppo.mini_batch_size=4", "ppo.micro_batch_size=4", "trainer.max_steps=2",
        "trainer.eval_every=2"]))
    assert trainer.rm_same_vocab
    rm_weights = snapshot(trainer.reward_model)
    critic_start = snapshot(trainer.critic)
    assert all(torch.equal(rm_weights[k], critic_start[k]) for k in rm_weights)  # the critic starts as the RM
    metrics = trainer.train()
    for name in ("reward", "objective/kl", "critic/vf_loss", "critic/advantages/mean", "clip_ratio/region_mean",
                 "eval/reward"):
        assert math.isfinite(metrics[name]), name
    assert all(torch.equal(rm_weights[k], v) for k, v in snapshot(trainer.reward_model).items())  # frozen
    assert any(not torch.equal(critic_start[k], v) for k, v in snapshot(trainer.critic).items())  # trained
    assert is_complete(checkpoint_dir(tmp_path / "ppo", 2))
    assert (checkpoint_dir(tmp_path / "ppo", 2) / "critic" / "optimizer.pt").is_file()


def test_ppo_critic_warmup_leaves_the_actor_alone(tmp_path):
    trainer = ppo_trainer(tmp_path / "run", "trainer.max_steps=2", "ppo.critic_warmup_steps=1")
    start = snapshot(trainer.model)
    trainer.train_step(0)  # warm-up: the critic alone
    assert all(torch.equal(start[k], v) for k, v in snapshot(trainer.model).items())
    trainer.train_step(1)  # then both
    assert any(not torch.equal(start[k], v) for k, v in snapshot(trainer.model).items())
