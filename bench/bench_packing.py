"""Packed, token-budget policy updates against padded fixed-row ones (``engine.algorithms.packing``), on the shape of
the GSM8K GRPO example (``examples/gsm8k_grpo.yaml``).

    python bench/bench_packing.py                          # CPU: about 2 minutes
    python bench/bench_packing.py --budgets 5120,2048 --repeats 9 --threads 2

Data: GSM8K training prompts (``../shared/data/gsm8k``, formatted as the example's data section does) and, as the
completions, GSM8K worked answers in the R1 format (the SFT targets of ``examples/gsm8k_sft.yaml``), cut at the
example's ``generation.max_tokens``, all tokenized by the example's own tokenizer: the character tokenizer of its
tiny random Llama (``model.path: null`` in ``gsm8k_sft.yaml``, which the GRPO example starts from), so the token
counts are those of that run. One step = ``prompts_per_step x num_generations`` rows, each prompt's samples being
the answers of other random questions (GRPO's samples differ in length). Model: that Llama (hidden 128, 4 layers).

Paths: ``padded`` (``micro_batch_size`` rows, today's path), ``packed@<budget>`` (``max_tokens_per_micro_batch``,
one causal SDPA per sequence: ``packing.SEGMENT_ATTENTION``) and ``dense-mask@<budget>`` (packed, with transformers'
dense block-diagonal mask instead). Per step and path: the tokens the forwards compute (padded: every micro-batch
``b x L``, ``L`` the step's longest row; packed: the real tokens), the attention scores (padded ``b x L^2``; packed
``sum(l_i^2)``, or ``N^2`` per micro-batch with the dense mask), and the time of one ``policy_update`` (forward,
backward, AdamW step), median over ``--repeats`` steps, the paths interleaved. Prints a table and one JSON line;
writes ``bench/results/packing_cpu.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch

from engine.algorithms import (
    make_batch,
    packing,
    policy_update,
)
from engine.algorithms.packing import plan_micro_batches
from engine.config import GRPORunConfig, SFTRunConfig, load_config
from engine.data.tasks import PromptTask
from engine.models.builders import build_policy
from kernels import _backend


def _rows(task_examples, tokenizer, n_prompts: int, n_samples: int, max_tokens: int, g: torch.Generator):
    """``n_prompts x n_samples`` (prompt ids, completion ids + EOS, cut at ``max_tokens``) drawn with ``g``."""
    pick = lambda: task_examples[int(torch.randint(len(task_examples), (1,), generator=g))]
    prompts, responses = [], []
    for _ in range(n_prompts):
        prompt = pick().prompt_ids
        for _ in range(n_samples):
            ids = tokenizer.encode(pick().completion, add_special_tokens=False) + [tokenizer.eos_token_id]
            prompts.append(prompt)
            responses.append(ids[:max_tokens])
    return prompts, responses


def _cost(batch, plan, segments: bool) -> tuple[int, int]:
    """(tokens, attention scores) the forwards of ``plan`` compute: padded slices ``b x L`` and ``b x L^2``, packed
    groups ``N`` and ``sum(l_i^2)`` (segment attention) or ``N^2`` (the dense block-diagonal mask)."""
    lengths = batch.attention_mask.sum(-1)
    L = batch.input_ids.shape[1]
    tokens = scores = 0
    for rows in plan:
        if isinstance(rows, slice):
            b = rows.stop - rows.start
            tokens, scores = tokens + b * L, scores + b * L * L
        else:
            n = int(lengths[rows].sum())
            tokens += n
            scores += int((lengths[rows] ** 2).sum()) if segments else n * n
    return tokens, scores


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", default="5120,2048,1024",
                   help="max_tokens_per_micro_batch values to time (5120 = micro_batch_size x (max prompt + "
                        "max response) of the example: a padded micro-batch's worst case)")
    p.add_argument("--dense-budgets", default="5120",
                   help="budgets also timed with transformers' dense block-diagonal mask (segment attention off)")
    p.add_argument("--repeats", type=int, default=7, help="timed steps per path (after one warm-up each)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable timings on a shared CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda (the GPU check: bench/gpu_checks.sh, step packing)")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "gsm8k"),
                   help="the GSM8K directory (../shared/data/gsm8k; copy it beside the checkout on a GPU box)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "packing_cpu.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    sft = load_config(SFTRunConfig, ROOT / "examples" / "gsm8k_sft.yaml",
                      [f"data.train={args.data}"])
    grpo = load_config(GRPORunConfig, ROOT / "examples" / "gsm8k_grpo.yaml")
    task = PromptTask.load(sft.data)
    device = torch.device(args.device)
    model, tokenizer = build_policy(sft.model, device, seed=args.seed, texts=task.texts())
    model.train()
    train, _ = task.examples(tokenizer, sft.data)
    g = grpo.grpo
    prompts, responses = _rows(train, tokenizer, g.prompts_per_step, g.num_generations, grpo.generation.max_tokens,
                               torch.Generator().manual_seed(args.seed))
    batch = make_batch(prompts, responses, tokenizer.pad_token_id or 0, device)
    B, L = batch.input_ids.shape
    gen = torch.Generator().manual_seed(args.seed + 1)
    old = (torch.randn(batch.labels.shape, generator=gen) * 0.1 - 2.0).to(device)
    advantages = torch.randn(B, generator=gen).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    cfg = g.model_copy(update={"kl_coef": 0.0})

    # name -> (budget, segment attention)
    paths = {"padded": (None, True), **{f"packed@{b}": (int(b), True) for b in args.budgets.split(",") if b},
             **{f"dense-mask@{b}": (int(b), False) for b in args.dense_budgets.split(",") if b}}
    info = _backend.describe()
    lengths = batch.attention_mask.sum(-1)
    print(f"device: {info['device']} | torch {info['torch']} | {args.threads} thread(s) | tiny Llama "
          f"(hidden {model.config.hidden_size}, {model.config.num_hidden_layers} layers), char tokenizer | "
          f"{B} rows (GSM8K {g.prompts_per_step} prompts x {g.num_generations}), row tokens {int(lengths.min())}.."
          f"{int(lengths.max())} (mean {float(lengths.float().mean()):.0f}), L = {L} | micro_batch_size "
          f"{g.micro_batch_size}")
    times: dict[str, list[float]] = {name: [] for name in paths}
    for rep in range(args.repeats + 1):  # rep 0 warms up
        for name, (budget, segments) in paths.items():
            packing.SEGMENT_ATTENTION = segments
            step_cfg = cfg.model_copy(update={"max_tokens_per_micro_batch": budget})
            sync()
            t0 = time.perf_counter()
            result = policy_update(model, opt, batch, old, advantages, ref_logprobs=None, cfg=step_cfg,
                                   temperature=1.0, max_grad_norm=1.0)
            sync()
            elapsed = time.perf_counter() - t0
            assert result.stepped
            if rep:
                times[name].append(elapsed)
    rows = []
    padded_tokens, _ = _cost(batch, plan_micro_batches(batch, g.micro_batch_size), True)
    padded_s = statistics.median(times["padded"])
    print(f"{'path':<14}{'micro-batches':>14}{'tokens':>9}{'saved':>8}{'attn scores':>13}{'median s':>10}"
          f"{'min s':>8}{'x padded':>10}")
    for name, (budget, segments) in paths.items():
        plan = plan_micro_batches(batch, g.micro_batch_size, budget)
        tokens, scores = _cost(batch, plan, segments)
        med = statistics.median(times[name])
        row = {"path": name, "max_tokens_per_micro_batch": budget, "segment_attention": segments and budget is not None,
               "micro_batches": len(plan), "tokens": tokens,
               "padding_saved": 1 - tokens / padded_tokens, "attention_scores": scores, "median_s": med,
               "min_s": min(times[name]), "times_s": times[name], "speedup": padded_s / med}
        rows.append(row)
        print(f"{name:<14}{len(plan):>14}{tokens:>9}{row['padding_saved']:>8.1%}{scores:>13.3g}{med:>10.3f}"
              f"{row['min_s']:>8.3f}{row['speedup']:>10.2f}")
    summary = {"bench": "packing", "device": info["device"], "torch": info["torch"], "threads": args.threads,
               "rows": B, "padded_L": L, "real_tokens": int(lengths.sum()), "padded_tokens": padded_tokens,
               **{f"{r['path']}_median_s": round(r["median_s"], 4) for r in rows},
               **{f"{r['path']}_padding_saved": round(r["padding_saved"], 4) for r in rows if r["path"] != "padded"}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**info, "timestamp": time.strftime("%Y%m%d-%H%M%S"), "args": vars(args),
                               "model": {"arch": sft.model.arch, **dict(sft.model.tiny_overrides),
                                         "vocab_size": model.config.vocab_size, "dtype": "float32"},
                               "data": "GSM8K train prompts + worked answers (R1 format), char tokenizer",
                               "shapes": {"rows": B, "L": L, "T": batch.labels.shape[1],
                                          "row_tokens": lengths.tolist(),
                                          "micro_batch_size": g.micro_batch_size},
                               "summary": summary, "results": rows}, indent=2))
    print(json.dumps(summary))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
