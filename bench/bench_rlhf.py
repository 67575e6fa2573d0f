"""Time per step of the classic RLHF pipeline on Anthropic HH: SFT -> reward model -> PPO, and DPO, each run for a
few steps through the real trainers (``engine.trainers.sft``, ``engine.trainers.preference``, ``engine.trainers.ppo``) on a
random model of a chosen shape, with a byte-level BPE tokenizer trained on the data.

    python bench/bench_rlhf.py                                   # CUDA: Qwen2.5-0.5B-shaped model, bf16
    python bench/bench_rlhf.py --preset none --steps 3           # CPU smoke run: the tiny default model

Reports, per stage, the median seconds per step over the steps after the first (warm-up: compilation, allocator),
the throughput the trainer logs (tokens/s or pairs/s), peak CUDA memory, and the stage's last metrics; prints a table
and writes JSON under bench/results/ (device, versions, shapes, medians).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from engine import config as C  # noqa: E402

HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"


class StepTimer:
    """``should_stop`` hook of ``BaseTrainer.train``: records the wall time of every step."""

    def __init__(self):
        self.times: list[float] = []
        self.last = time.perf_counter()

    def __call__(self, metrics) -> bool:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.times.append(now - self.last)
        self.last = now
        return False


def run_stage(name: str, trainer_cls, cfg) -> dict:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer = trainer_cls(cfg)
    setup = time.perf_counter() - t0
    timer = StepTimer()
    metrics = trainer.train(should_stop=timer)
    steady = timer.times[1:] or timer.times
    out = {
        "stage": name, "steps": len(timer.times), "setup_s": setup, "step_s_median": statistics.median(steady),
        "step_s_first": timer.times[0],
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "params_m": sum(p.numel() for p in trainer.model.parameters()) / 1e6,
        "last_metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
    }
    del trainer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(HH))
    p.add_argument("--preset", default="qwen2.5-0.5b" if cuda else "none", help="tiny_model preset, or 'none'")
    p.add_argument("--arch", default="qwen2" if cuda else "llama")
    p.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary trained on the data")
    p.add_argument("--steps", type=int, default=6, help="steps per stage (the first is warm-up)")
    p.add_argument("--batch", type=int, default=64 if cuda else 8, help="examples / pairs / prompts per step")
    p.add_argument("--max-tokens", type=int, default=128 if cuda else 16, help="PPO response length")
    p.add_argument("--max-length", type=int, default=512 if cuda else 128, help="pair length (prompt + response)")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_rlhf_"))
    preset = None if args.preset == "none" else args.preset
    common = [f"data.train={args.data}", "data.num_eval=64", "data.template={prompt}", "data.max_prompt_tokens=256",
              f"model.arch={args.arch}", "trainer.progress_bar=false", "trainer.eval_every=0", "trainer.log_every=1",
              "optim.lr=1e-5"]
    if preset:
        common.append(f"model.preset={preset}")
    from engine.trainers.preference import DPOTrainer, RewardModelTrainer
    from engine.trainers.ppo import PPOTrainer
    from engine.trainers.sft import SFTTrainer

    sft_dir, rm_dir = work / "sft", work / "rm"
    from_sft = [c for c in common if not c.startswith("model.")] + [f"model.path={sft_dir}"]  # later stages
    stages = [
        ("sft", SFTTrainer, C.SFTRunConfig, common + [
            f"model.tokenizer=bpe:{args.vocab}", f"sft.max_steps={args.steps}", f"sft.batch_size={args.batch}",
            f"sft.micro_batch_size={min(args.batch, 32)}", f"trainer.output_dir={sft_dir}"]),
        ("rm", RewardModelTrainer, C.RewardModelRunConfig, from_sft + [
            f"rm.max_steps={args.steps}", f"rm.batch_size={args.batch}", "rm.micro_batch_size=16",
            f"rm.max_length={args.max_length}", "rm.allow_empty_response=true", f"trainer.output_dir={rm_dir}"]),
        ("ppo", PPOTrainer, C.PPORunConfig, from_sft + [
            f"ppo.reward_model={rm_dir}", f"trainer.max_steps={args.steps}", f"ppo.prompts_per_step={args.batch}",
            f"ppo.mini_batch_size={max(args.batch // 2, 1)}",
            f"ppo.micro_batch_size={min(16, max(args.batch // 2, 1))}",
            f"generation.max_tokens={args.max_tokens}", f"trainer.output_dir={work / 'ppo'}"]),
        ("dpo", DPOTrainer, C.DPORunConfig, from_sft + [
            f"dpo.max_steps={args.steps}", f"dpo.batch_size={args.batch}", "dpo.micro_batch_size=16",
            f"dpo.max_length={args.max_length}", "dpo.allow_empty_response=true",
            f"trainer.output_dir={work / 'dpo'}"]),
    ]
    results = []
    for name, trainer_cls, cfg_cls, overrides in stages:
        print(f"=== {name}: {' '.join(overrides)}", flush=True)
        results.append(run_stage(name, trainer_cls, C.load_config(cfg_cls, None, overrides)))
        r = results[-1]
        print(f"{name}: {r['steps']} steps, median {r['step_s_median']:.3f} s/step (first {r['step_s_first']:.2f} s, "
              f"set-up {r['setup_s']:.1f} s), {r['params_m']:.1f} M parameters", flush=True)

    device = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"\ndevice: {device} | torch {torch.__version__} | model {args.arch} {preset or 'tiny'} | batch {args.batch} "
          f"| PPO response {args.max_tokens} tokens | pair length {args.max_length}")
    print(f"{'stage':6} {'s/step':>8} {'first_s':>8} {'peak_mb':>9}  throughput")
    for r in results:
        m = r["last_metrics"]
        tput = m.get("perf/tokens_per_sec") or m.get("perf/pairs_per_sec")
        unit = "tok/s" if "perf/tokens_per_sec" in m else "pairs/s"
        peak = f"{r['peak_cuda_mb']:.0f}" if r["peak_cuda_mb"] is not None else "-"
        print(f"{r['stage']:6} {r['step_s_median']:8.3f} {r['step_s_first']:8.2f} {peak:>9}  {tput:,.0f} {unit}")
    import triton

    stamp = time.strftime("%Y%m%d-%H%M%S")
    slug = "cpu" if not cuda else device.lower().replace("nvidia ", "").split()[0]
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"rlhf_{slug}_{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device, "torch": torch.__version__, "triton": triton.__version__,
                               "args": vars(args), "stages": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
