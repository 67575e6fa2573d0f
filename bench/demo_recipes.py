"""The demo task (built-in 3-digit additions, tiny model, CPU) trained by GRPO with each policy loss and with DAPO's
dynamic sampling, at the same wall-clock budget from the same cold-start SFT checkpoint, per seed: held-out greedy
accuracy before and after, steps taken. One JSON line per run; the table goes to ``bench/results/``.

    python bench/demo_recipes.py --seeds 0 1 --grpo-budget-s 150 --out bench/results/demo_recipes_cpu.json

Every variant runs ``grpo.ppo_epochs=2`` (the second pass is off-policy, where the losses differ: on the first,
on-policy pass the ratio is 1 and the three losses give the same gradient up to their aggregation)."""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

VARIANTS = {
    "vanilla": ["grpo.ppo_epochs=2"],
    "gspo": ["grpo.ppo_epochs=2", "grpo.policy_loss=gspo", "grpo.clip_ratio_low=3e-4", "grpo.clip_ratio_high=4e-4"],
    "cispo": ["grpo.ppo_epochs=2", "grpo.policy_loss=cispo", "grpo.clip_ratio_low=1.0", "grpo.clip_ratio_high=4.0"],
    "vanilla+dynamic_sampling": ["grpo.ppo_epochs=2", "grpo.dynamic_sampling=true", "grpo.max_num_gen_batches=3"],
}


def eval_curve(run_dir: Path) -> dict:
    """From a GRPO run's ``metrics.jsonl``: held-out accuracy by step and by seconds since the first record, the
    steps taken, and the mean training reward of the first and last 10 steps."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    t0 = records[0]["time"]
    evals = [{"step": r["step"], "seconds": round(r["time"] - t0, 1), "accuracy": r["eval/accuracy"]}
             for r in records if "eval/accuracy" in r]
    rewards = [r["reward"] for r in records if "reward" in r]
    return {"evals": evals, "steps": max(r["step"] for r in records),
            "reward_first10": sum(rewards[:10]) / max(len(rewards[:10]), 1),
            "reward_last10": sum(rewards[-10:]) / max(len(rewards[-10:]), 1)}


def main() -> None:
    from engine.trainers.demo import cold_start_sft, demo_settings, run_demo

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--grpo-budget-s", type=float, default=150.0)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--root", default="runs/demo_recipes")
    p.add_argument("--out", default="bench/results/demo_recipes_cpu.json")
    args = p.parse_args()
    rows = []
    for seed in args.seeds:
        root = Path(args.root) / f"seed{seed}"
        t0 = time.time()
        checkpoint, sft_accuracy = cold_start_sft(root, demo_settings(seed=seed), t0)
        print(json.dumps({"seed": seed, "phase": "sft", "accuracy": sft_accuracy, "seconds": time.time() - t0}))
        for name in args.variants:
            result = run_demo(str(root / name), seed=seed, sft_checkpoint=str(checkpoint),
                              grpo_overrides=VARIANTS[name], grpo_budget_s=args.grpo_budget_s, grpo_steps=100000)
            row = {"seed": seed, "variant": name, "overrides": VARIANTS[name], **result,
                   **eval_curve(root / name / "grpo")}
            print(json.dumps(row), flush=True)
            rows.append(row)
    out = {"device": platform.processor() or platform.machine(), "cpu_threads": torch.get_num_threads(),
           "torch": torch.__version__, "grpo_budget_s": args.grpo_budget_s, "task": "builtin:arithmetic:3:+:reverse",
           "runs": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
