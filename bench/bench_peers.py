"""Ours against the peers, side by side in one run, peers alternated, medians (issue 15): a GRPO step end to end, the
fused log-prob + policy losses, and rollout generation. The sections live in ``bench/peers/``.

    python bench/bench_peers.py                          # every section; CPU shapes (~6 min on 2 cores) or GPU ones
    python bench/bench_peers.py --sections losses --loss-reps 5 --no-compile
    python bench/bench_peers.py --markdown bench/results/peers_cpu.json   # the README tables of a results file

Sections (``--sections grpo,losses,generate``):

- ``grpo``: one optimizer step of our ``GRPOTrainer`` (built from config overrides) against TRL's ``GRPOTrainer`` with
  Hugging Face ``generate``, and TRL's ``GRPOTrainer`` with our ``Generator`` as its ``rollout_func``
  (``engine.integrations.trl``), and that plus our fused log-prob kernel as TRL's LM head (``use_fused_logprobs``),
  on the same saved checkpoint (a random Qwen2 and a byte-level BPE trained on the prompts), the same GSM8K prompts
  in the same order, the same rewards (``accuracy`` + ``format``), ``G`` samples per prompt, ``max_tokens`` new
  tokens, temperature 1, no KL, one update per rollout, the same micro-batch; and ours again with packed,
  padding-free micro-batches (``ours_packed``: ``grpo.max_tokens_per_micro_batch`` = micro-batch x (median prompt +
  ``max_tokens``); TRL's GRPO has no padding-free mode). Each step is split into generate and update (= step -
  generate). Each peer runs in a process of its own, stepped in turn over a
  pipe, so only one computes at a time and none is slowed by another's idle thread pool (``peers/grpo_step.py``).
  TRL runs its own ``train()`` loop, parked between steps by a callback at ``on_step_end``; its step is timed from
  ``on_step_begin`` to ``on_step_end`` and its generation by wrapping the instance's bound ``_generate`` (tokenize,
  generate, decode; TRL's source is not patched). Ours: ``train_step`` timed around the call, generation = its
  ``perf/time/generate`` (rollout, decode, rewards).
- ``losses``: forward + backward of the policy loss from hidden states and the LM head, ``[B, T, H]`` and ``[V, H]``:
  ours (``kernels.fused_linear_logprobs`` + ``kernels.grpo_loss`` / ``kernels.dpo_loss``), eager PyTorch (full logits,
  ``log_softmax``, the same loss math), ``torch.compile`` of eager, TRL's log-prob paths (``trl.kernels``'
  ``ChunkedLogProbFunction``, the fused LM head GRPOTrainer installs; ``selective_log_softmax`` on full logits) + the
  same loss math, and Liger-Kernel's ``LigerFusedLinearGRPOLoss`` / ``LigerFusedLinearDPOLoss``. Time per call and
  peak memory above the inputs: CUDA ``max_memory_allocated``; CPU the allocator's own alloc/free events recorded by
  ``torch.profiler(profile_memory=True)``, summed in time order (torch tensors only, not RSS).
- ``generate``: our ``Generator`` against HF ``generate``, with its dynamic cache and with a static cache and its
  decode step compiled (``torch.compile``; a failure is reported as skipped), at ``bench_generate.py``'s shapes
  (reduced on the CPU); output tokens/s.

A missing peer (``pip install -e ".[bench]"``: trl, liger-kernel, matplotlib) or one that fails is reported under
``skipped`` with the reason, never dropped; ``--without trl,liger_kernel`` simulates its absence. Writes JSON (device,
versions, shapes, every run, medians, ratios) and a PNG; ``--markdown`` renders the README tables from a JSON file.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from peers.common import CPU_DEFAULTS, GPU_DEFAULTS, GSM8K, PEERS, SECTIONS, Report, peer  # noqa: E402
from peers.generation import generate_section  # noqa: E402
from peers.grpo_step import grpo_section  # noqa: E402
from peers.losses import losses_section  # noqa: E402
from peers.tables import plot, render_markdown  # noqa: E402

__all__ = ["main", "parse_args", "plot", "render_markdown"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of grpo,losses,generate")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--repeats", type=int, default=5, help="timed GRPO steps per peer (after --warmup)")
    p.add_argument("--warmup", type=int, default=1, help="GRPO warm-up steps per peer (not in the medians)")
    p.add_argument("--loss-reps", type=int, default=None, help="timed calls per loss implementation (after 1 warm-up)")
    p.add_argument("--gen-repeats", type=int, default=3, help="alternating runs per generation implementation")
    p.add_argument("--data", default=str(GSM8K), help="GSM8K (a directory with train.jsonl, or a .jsonl)")
    p.add_argument("--model", default=None, help="qwen2-cpu, tiny or a tiny_model preset (qwen2.5-0.5b)")
    p.add_argument("--vocab", type=int, default=None, help="BPE vocabulary trained on the prompts")
    p.add_argument("--model-vocab", type=int, default=None, help="model vocabulary (0: the tokenizer's)")
    p.add_argument("--prompts", type=int, default=None, help="prompts per GRPO step")
    p.add_argument("--n", type=int, default=None, help="samples per prompt (G)")
    p.add_argument("--max-tokens", type=int, default=None, help="new tokens per sample")
    p.add_argument("--max-prompt-tokens", type=int, default=300)
    p.add_argument("--micro-batch", type=int, default=None, help="rows per forward/backward (ours and TRL)")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--loss-shapes", default=None, help="GRPO loss shapes, BxTxHxV,...")
    p.add_argument("--dpo-shapes", default=None, help="DPO loss shapes, BxTxHxV,... (B/2 pairs)")
    p.add_argument("--gen-shape", default=None, help="prompts x n x prompt_len x max_tokens")
    p.add_argument("--no-hf-static", dest="hf_static", action="store_false",
                   help="skip HF generate with a static cache + torch.compile (its compilation takes ~30 s on a "
                        "2-core CPU)")
    p.add_argument("--no-compile", action="store_true", help="no torch.compile rows (and Liger uncompiled)")
    p.add_argument("--no-ours-packed", dest="ours_packed", action="store_false",
                   help="skip ours with packed micro-batches (grpo.max_tokens_per_micro_batch)")
    p.add_argument("--no-trl-generator", action="store_true",
                   help="skip TRL + our Generator (rollout_func) and TRL + our Generator + our LM head")
    p.add_argument("--without", default="", help=f"peers to treat as missing, of {','.join(PEERS)}")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/peers_<device>_<stamp>.json)")
    p.add_argument("--png", default=None, help="figure path (default: the JSON's, .png)")
    p.add_argument("--markdown", nargs="+", default=None, metavar="JSON",
                   help="print the README tables of results files and exit (nothing is run)")
    return p.parse_args(argv)


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.markdown:  # tables of existing results files (a run split over --sections, say), nothing run
        print("\n".join(render_markdown(json.loads(Path(path).read_text())) for path in args.markdown))
        return None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    for key, value in (GPU_DEFAULTS if device == "cuda" else CPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    without = {w for w in args.without.split(",") if w}
    report = Report(args, device)
    print(f"device: {report.data['device']} | torch {torch.__version__} | transformers {report.data['transformers']} "
          f"| trl {report.data['trl']} | liger-kernel {report.data['liger_kernel']} | threads "
          f"{torch.get_num_threads()} | sections {','.join(sections)}", flush=True)
    slug = "cpu" if device == "cpu" else report.data["device"].lower().replace("nvidia ", "").split()[0]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"peers_{slug}_{stamp}.json"
    run = {"grpo": grpo_section, "losses": losses_section, "generate": generate_section}
    for name in sections:
        t0 = time.perf_counter()
        run[name](args, report, device, without)
        report.data["sections"][name]["seconds"] = time.perf_counter() - t0
        gc.collect()  # the trainers' reference cycles (callbacks, closures) hold models and KV caches
        if device == "cuda":
            torch.cuda.empty_cache()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report.data, indent=1) + "\n")  # rewritten per section: a cut run keeps its part
    png = Path(args.png) if args.png else out.with_suffix(".png")
    reason = peer("matplotlib", without)
    reason = reason if isinstance(reason, str) else plot(report.data, png)
    if reason:
        report.skip("figure", "png", reason)
    report.data["png"] = None if reason else str(png)
    out.write_text(json.dumps(report.data, indent=1) + "\n")
    print(render_markdown(report.data))
    print(f"wrote {out}" + ("" if reason else f" and {png}"))
    return report.data


if __name__ == "__main__":
    main()
