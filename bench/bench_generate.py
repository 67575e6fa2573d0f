"""Rollout generation throughput: our Generator vs Hugging Face ``generate`` on the same model and prompts.

For P prompts x n samples (GRPO groups), prompt length Lp and Lg new tokens (EOS ignored, so every sample is Lg
tokens), it reports output tokens/s, time per output token (ms per decode step of the whole batch), peak CUDA
memory, and the decode roofline: each decode step must read the weights once and the K/V of every running sample,
so ``t_step >= (weight bytes + KV bytes) / copy bandwidth``.

    python bench/bench_generate.py                  # CPU: tiny random Llama; CUDA: Qwen2.5-0.5B-shaped random model
    python bench/bench_generate.py --prompts 8 --n 4 --prompt-len 32 --max-tokens 64 --no-hf

Prints a table and writes JSON under bench/results/ (device, versions, shapes, medians).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from bench_kernels import copy_gbps  # noqa: E402

from engine.generation.generator import Generator  # noqa: E402
from engine.generation.sampling_params import SamplingParams  # noqa: E402
from engine.models.tiny import tiny_model  # noqa: E402
from kernels import _backend  # noqa: E402

# Named CPU shapes (issue 10's CPU target): a random Qwen2 small enough for a 2-core machine, large enough that the
# forward, not only the host, costs something.
CPU_SHAPES = {"qwen2-cpu": dict(arch="qwen2", hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
                                intermediate_size=704, vocab_size=2048, tie_word_embeddings=True)}


def build_model(name: str, dtype: torch.dtype):
    """``tiny`` (the tiny Llama), a ``CPU_SHAPES`` name, or a ``tiny_model`` preset (``qwen2.5-0.5b``, ...)."""
    if name in CPU_SHAPES:
        return tiny_model(**CPU_SHAPES[name], dtype=dtype)
    preset = None if name == "tiny" else name
    return tiny_model("qwen2" if preset and preset.startswith("qwen") else "llama", preset=preset, dtype=dtype)


def sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def timed(fn, dev: str) -> tuple[float, object, float | None]:
    """(seconds, result, peak CUDA MiB above the start) of one call."""
    sync(dev)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    out = fn()
    sync(dev)
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if dev == "cuda" else None
    return seconds, out, peak


def without_extension(run):
    """``run()`` with the compiled extension switched off (``RLHF_ENGINE_BUILD_EXT=0`` is read on every dispatch),
    relabelled ``ours_noext``: the generator on its PyTorch/Triton paths, in the same process."""
    os.environ["RLHF_ENGINE_BUILD_EXT"] = "0"
    try:
        return {**run(), "impl": "ours_noext"}
    finally:
        os.environ.pop("RLHF_ENGINE_BUILD_EXT", None)


def run_ours(model, prompts, args, dev, shared_prefix: bool = True, enforce_eager: bool | None = None,
             fuse_projections: bool = False):
    gen = Generator(model, max_num_seqs=args.prompts * args.n, block_size=args.block_size,
                    attention_backend=args.backend, kv_cache_memory=args.kv_mb << 20 if args.kv_mb else None,
                    shared_prefix=shared_prefix, enforce_eager=enforce_eager, max_model_len=args.max_model_len,
                    fuse_projections=fuse_projections)
    params = SamplingParams(n=args.n, temperature=1.0, max_tokens=args.max_tokens, ignore_eos=True, seed=0)
    gen.generate(prompts[:1], SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up (allocates the cache)
    seconds, outs, peak = timed(lambda: gen.generate(prompts, params), dev)
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    static = gen._static
    impl = ("ours_fused" if fuse_projections else "ours_noshare" if not shared_prefix
            else "ours_eager" if enforce_eager and not args.enforce_eager else "ours")
    refresh_s = None
    if fuse_projections:  # what refreshing the concatenated copies costs after an optimizer step (in-place writes)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0)
        sync(dev)
        t0 = time.perf_counter()
        gen.model.sync_fused_weights()
        sync(dev)
        refresh_s = time.perf_counter() - t0
    return dict(impl=impl, backend=gen.backend.name, seconds=seconds, output_tokens=tokens, peak_mb=peak,
                fused_refresh_s=refresh_s,
                shared_prefix=gen.shared_prefix, cuda_graphs=gen.use_cuda_graphs,
                graphs_captured=static.num_graphs if static else 0,
                graph_capture_s=static.capture_seconds if static else 0.0)


def run_hf(model, prompts, args, dev):
    ids = torch.tensor(prompts, device=dev)

    def call():
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                  top_p=1.0, top_k=0, num_return_sequences=args.n, max_new_tokens=args.max_tokens,
                                  min_new_tokens=args.max_tokens, pad_token_id=0)

    model.generate(ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=2, pad_token_id=0)
    seconds, out, peak = timed(call, dev)
    tokens = (out.shape[1] - ids.shape[1]) * out.shape[0]
    return dict(impl="hf_generate", backend="transformers", seconds=seconds, output_tokens=tokens, peak_mb=peak)


def roofline_ms_per_step(model, args, bandwidth_gbps: float) -> float:
    """Lower bound of one decode step: weights + the average K/V of all samples, read once, at copy bandwidth."""
    cfg = model.config
    elem = next(model.parameters()).element_size()
    weight_bytes = sum(p.numel() for p in model.parameters()) * elem
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    avg_ctx = args.prompt_len + args.max_tokens / 2
    kv_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * elem * avg_ctx * args.prompts * args.n
    return (weight_bytes + kv_bytes) / (bandwidth_gbps * 1e9) * 1e3


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--model", default="qwen2.5-0.5b" if cuda else "tiny",
                   help=f"'tiny', one of {sorted(CPU_SHAPES)}, or a tiny_model preset")
    p.add_argument("--dtype", default="bfloat16" if cuda else "float32")
    p.add_argument("--backend", default=None, help="attention backend (default: best available)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-mb", type=int, default=0, help="KV cache budget in MiB (default: the generator's)")
    p.add_argument("--no-hf", action="store_true", help="skip the HF generate baseline")
    p.add_argument("--compare-shared-prefix", action="store_true",
                   help="also run ours with shared_prefix=False (the prompt's K/V read once per sample)")
    p.add_argument("--repeats", type=int, default=1, help="alternating runs of every implementation; medians")
    p.add_argument("--enforce-eager", action="store_true",
                   help="run ours with enforce_eager=True (no CUDA graphs: the path the shared-prefix kernel runs on)")
    p.add_argument("--compare-eager", action="store_true",
                   help="also run ours with enforce_eager=True (no static buffers / CUDA graphs)")
    p.add_argument("--compare-fused-projections", action="store_true",
                   help="also run ours with fuse_projections=True (one GEMM for q/k/v, one for gate/up, over "
                        "concatenated weight copies) and time the copies' refresh")
    p.add_argument("--compare-extension", action="store_true",
                   help="also run ours with the compiled extension off (RLHF_ENGINE_BUILD_EXT=0; CPU attention, "
                        "draw and K/V store on their PyTorch paths)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="the generator's max_model_len (default: the model's; a graph plans its decode for it)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    dev = "cuda" if cuda else "cpu"
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = build_model(args.model, dtype).to(dev).eval()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, model.config.vocab_size, (args.prompts, args.prompt_len), generator=g).tolist()

    info = _backend.describe()
    bandwidth = copy_gbps(dev, reps=20, rep_ms=100)
    print(f"device: {info['device']} | torch {info['torch']} | model {args.model} {args.dtype} | "
          f"{args.prompts} prompts x n={args.n}, prompt {args.prompt_len}, {args.max_tokens} new tokens | "
          f"copy bandwidth {bandwidth:.1f} GB/s")
    eager = True if args.enforce_eager else None
    runners = [lambda: run_ours(model, prompts, args, dev, enforce_eager=eager)]
    if args.compare_shared_prefix:
        runners.append(lambda: run_ours(model, prompts, args, dev, shared_prefix=False, enforce_eager=eager))
    if args.compare_eager:
        runners.append(lambda: run_ours(model, prompts, args, dev, enforce_eager=True))
    if args.compare_fused_projections:
        runners.append(lambda: run_ours(model, prompts, args, dev, fuse_projections=True))
    if args.compare_extension:
        runners.append(lambda: without_extension(lambda: run_ours(model, prompts, args, dev, enforce_eager=eager)))
    if not args.no_hf:
        runners.append(lambda: run_hf(model, prompts, args, dev))
    runs = [[] for _ in runners]
    for _ in range(args.repeats):  # alternate the implementations so that drifting machine load hits all alike
        for i, run in enumerate(runners):
            runs[i].append(run())
    rows = []
    for results in runs:
        row = sorted(results, key=lambda r: r["seconds"])[len(results) // 2]  # the median run
        row["all_seconds"] = [r["seconds"] for r in results]
        rows.append(row)
    floor_ms = roofline_ms_per_step(model, args, bandwidth)
    header = f"{'impl':12} {'backend':12} {'seconds':>9} {'out_tok':>8} {'tok_per_s':>10} {'ms_per_step':>12} " \
             f"{'roofline_ms':>12} {'peak_mb':>9}"
    print(header)
    for r in rows:
        r["tokens_per_s"] = r["output_tokens"] / r["seconds"]
        r["ms_per_step"] = r["seconds"] / args.max_tokens * 1e3
        r["roofline_ms_per_step"] = floor_ms
        peak = f"{r['peak_mb']:.0f}" if r["peak_mb"] is not None else "-"
        print(f"{r['impl']:12} {r['backend']:12} {r['seconds']:9.2f} {r['output_tokens']:8d} "
              f"{r['tokens_per_s']:10.1f} {r['ms_per_step']:12.2f} {floor_ms:12.3f} {peak:>9}")
    by_impl = {r["impl"]: r for r in rows}
    if "hf_generate" in by_impl:
        print(f"ours / HF generate: {by_impl['ours']['tokens_per_s'] / by_impl['hf_generate']['tokens_per_s']:.2f}x "
              f"output tokens/s (targets: >= 1.2x on the CPU qwen2-cpu shape, >= 5x on a GPU at 64 x 8)")
    if "ours_eager" in by_impl and by_impl["ours"]["cuda_graphs"]:
        print(f"static buffers + CUDA graphs / eager: "
              f"{by_impl['ours']['tokens_per_s'] / by_impl['ours_eager']['tokens_per_s']:.2f}x "
              f"({by_impl['ours']['graphs_captured']} graphs captured in {by_impl['ours']['graph_capture_s']:.2f} s)")
    if "ours_fused" in by_impl:
        print(f"fused q/k/v and gate/up projections / separate: "
              f"{by_impl['ours_fused']['tokens_per_s'] / by_impl['ours']['tokens_per_s']:.2f}x; refreshing the "
              f"copies after a weight update: {by_impl['ours_fused']['fused_refresh_s'] * 1e3:.2f} ms")
    if "ours_noext" in by_impl:
        print(f"compiled extension on / off: "
              f"{by_impl['ours']['tokens_per_s'] / by_impl['ours_noext']['tokens_per_s']:.2f}x")
    if "ours_noshare" in by_impl:
        print(f"shared prefix on / off: {by_impl['ours']['tokens_per_s'] / by_impl['ours_noshare']['tokens_per_s']:.2f}x")
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / \
        f"generate_{info['device'].replace(' ', '-')}_{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**info, "copy_gbps": bandwidth, "args": vars(args), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
