"""End-to-end GRPO step throughput: rollout (our Generator on the policy's weights) + policy update, split into
generate and update time, with a scripted reward (no tokenizer: the fraction of even token ids), so any model shape
can be measured.

    python bench/bench_e2e.py                      # CUDA: Qwen2.5-0.5B-shaped random model, bf16; CPU: tiny Llama
    python bench/bench_e2e.py --prompts 8 --n 4 --max-tokens 64 --steps 3

Reports per step: generate seconds, update seconds, output tokens, tokens/s (output tokens / step time) and the
generator-vs-trainer log-prob gap; prints a table and writes JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from engine.algorithms import compute_advantages, make_batch, policy_update  # noqa: E402
from engine.config import GRPOConfig  # noqa: E402
from engine.generation import Generator, SamplingParams  # noqa: E402
from engine.models import tiny_model  # noqa: E402
from kernels import _backend  # noqa: E402


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=32 if cuda else 8)
    p.add_argument("--n", type=int, default=8 if cuda else 4, help="samples per prompt (num_generations)")
    p.add_argument("--prompt-len", type=int, default=128 if cuda else 32)
    p.add_argument("--max-tokens", type=int, default=256 if cuda else 32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--preset", default="qwen2.5-0.5b" if cuda else None)
    p.add_argument("--backend", default=None, help="attention backend of the generator (default: best available)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    dev = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    model = tiny_model("qwen2", preset=args.preset, dtype=dtype).to(dev).train()
    gen = Generator(model, max_num_seqs=args.prompts * args.n, attention_backend=args.backend)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    cfg = GRPOConfig(num_generations=args.n, prompts_per_step=args.prompts, micro_batch_size=args.micro_batch)
    g = torch.Generator().manual_seed(0)
    V = model.config.vocab_size
    info = _backend.describe()
    print(f"device: {info['device']} | torch {info['torch']} | model qwen2 {args.preset or 'tiny'} {dtype} | "
          f"{args.prompts} prompts x n={args.n}, prompt {args.prompt_len}, {args.max_tokens} new tokens | "
          f"attention {gen.backend.name}")
    rows = []
    for step in range(args.steps + 1):  # step 0 warms up (allocations, Triton compilation)
        prompts = torch.randint(0, V, (args.prompts, args.prompt_len), generator=g).tolist()
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        sync()
        t0 = time.perf_counter()
        outs = gen.generate(prompts, SamplingParams(n=args.n, max_tokens=args.max_tokens, ignore_eos=True,
                                                    seed=step))
        sync()
        t_gen = time.perf_counter() - t0
        completions = [c for o in outs for c in o.outputs]
        scores = torch.tensor([sum(t % 2 == 0 for t in c.token_ids) / len(c.token_ids) for c in completions],
                              device=dev)
        advantages = compute_advantages(scores, args.n)
        batch = make_batch([pr for pr in prompts for _ in range(args.n)], [c.token_ids for c in completions], 0, dev)
        old = torch.zeros(batch.labels.shape, device=dev)
        for b, c in enumerate(completions):
            old[b, :len(c.logprobs)] = torch.tensor(c.logprobs)
        t1 = time.perf_counter()
        # old = the generator's log-probs; the update's forward measures its gap to the trainer's (rollout_corr/*)
        result = policy_update(model, opt, batch, old, advantages, ref_logprobs=None, cfg=cfg, temperature=1.0,
                               max_grad_norm=1.0, autocast_dtype=torch.bfloat16 if cuda else None,
                               rollout_logprobs=old, measure_rollout_corr=True)
        sync()
        t_update = time.perf_counter() - t1
        tokens = sum(len(c.token_ids) for c in completions)
        row = {"step": step, "generate_s": t_gen, "update_s": t_update, "output_tokens": tokens,
               "tokens_per_s": tokens / (t_gen + t_update), "ppo_kl": result.metrics["ppo_kl"],
               **{k: v for k, v in result.metrics.items() if k.startswith("rollout_corr/")},
               "peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}
        if step:
            rows.append(row)
        print(f"step {step}{' (warm-up)' if not step else ''}: generate {t_gen:.2f}s  update {t_update:.2f}s  "
              f"{tokens} tokens  {row['tokens_per_s']:.0f} tok/s  ppo_kl {row['ppo_kl']:.2e}  rollout/trainer "
              f"|dlogp| mean {row['rollout_corr/logp_diff_mean']:.2e} max {row['rollout_corr/logp_diff_max']:.2e}")
    med = sorted(rows, key=lambda r: r["tokens_per_s"])[len(rows) // 2]
    print(f"median step: generate {med['generate_s']:.2f}s ({med['generate_s'] / (med['generate_s'] + med['update_s']):.0%}"
          f"), update {med['update_s']:.2f}s, {med['tokens_per_s']:.0f} output tok/s")
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / \
        f"e2e_{info['device'].replace(' ', '-')}_{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**info, "args": vars(args), "rows": rows, "median": med}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
