"""Where the time goes, on a GPU: the fused ``ppo_loss`` (host overhead vs kernel time) and one generation run (host
time per decode step by Python function, device time by kernel). Writes a text report; prints its summary.

    python bench/profile_gpu.py --out profile.txt

The numbers guide the next optimisation; they are not benchmark claims (the profilers add their own overhead).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402

import kernels as K  # noqa: E402
from engine.generation import Generator, SamplingParams  # noqa: E402
from engine.models import tiny_model  # noqa: E402


def profile_ppo_loss(report: list[str]) -> None:
    B, T = 512, 4096
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    lp = (torch.randn(B, T, device=dev, generator=g) * 0.1 - 1).requires_grad_(True)
    old = lp.detach() + torch.randn(B, T, device=dev, generator=g) * 0.05
    ref = lp.detach() + torch.randn(B, T, device=dev, generator=g) * 0.05
    adv = torch.randn(B, T, device=dev, generator=g)
    mask = torch.rand(B, T, device=dev, generator=g) > 0.1

    def call():
        lp.grad = None
        loss, _ = K.ppo_loss(lp, old, adv, mask, ref_logprobs=ref, kl_coef=0.01)
        loss.backward()

    for _ in range(5):
        call()
    torch.cuda.synchronize()
    wall = triton.testing.do_bench(call, warmup=50, rep=300, return_mode="median")
    n = 200
    t0 = time.perf_counter()
    for _ in range(n):
        call()
    host_us = (time.perf_counter() - t0) / n * 1e6  # launches are async: mostly host time, unless the GPU is slower
    torch.cuda.synchronize()
    try:  # device time without launch gaps; fails if the call synchronises with the host
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            for _ in range(3):
                call()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        lp.grad = None
        with torch.cuda.graph(graph):
            loss, _ = K.ppo_loss(lp, old, adv, mask, ref_logprobs=ref, kl_coef=0.01)
            loss.backward()
        graphed = f"{triton.testing.do_bench(graph.replay, warmup=50, rep=300, return_mode='median') * 1e3:.1f} us"
    except Exception as err:  # noqa: BLE001 - report and go on
        graphed = f"capture failed: {type(err).__name__}: {err}"[:300]
        torch.cuda.synchronize()
    report.append(f"ppo_loss fwd+bwd {B}x{T} fp32: do_bench median {wall * 1e3:.1f} us; host time per call "
                  f"{host_us:.1f} us; CUDA-graph replay {graphed}")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            call()
        torch.cuda.synchronize()
    report.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    report.append(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15))


def profile_generation(report: list[str], prompts: int, n: int, prompt_len: int, max_tokens: int) -> None:
    dev = torch.device("cuda")
    model = tiny_model("qwen2", preset="qwen2.5-0.5b", dtype=torch.bfloat16).to(dev)
    gen = Generator(model, attention_backend="triton")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, model.config.vocab_size - 100, (prompts, prompt_len), generator=g).tolist()
    params = SamplingParams(n=n, temperature=1.0, max_tokens=max_tokens, ignore_eos=True, seed=0)
    gen.generate(ids[:2], SamplingParams(n=2, max_tokens=4, ignore_eos=True, seed=0))  # warm-up: compile, allocate
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    gen.generate(ids, params)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    report.append(f"generation {prompts}x{n}, prompt {prompt_len}, {max_tokens} new: {seconds:.2f} s, "
                  f"{seconds / max_tokens * 1e3:.1f} ms per decode step (prefill included)")
    prof = cProfile.Profile()
    prof.enable()
    gen.generate(ids, params)
    torch.cuda.synchronize()
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(35)
    report.append("cProfile of one generate call, by own time:\n" + s.getvalue())
    short = SamplingParams(n=n, temperature=1.0, max_tokens=16, ignore_eos=True, seed=1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as tprof:
        gen.generate(ids, short)
        torch.cuda.synchronize()
    report.append(tprof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25))
    report.append(tprof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="profile.txt")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args()
    report = [f"device {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}"]
    profile_ppo_loss(report)
    print(report[1], flush=True)
    profile_generation(report, args.prompts, args.n, args.prompt_len, args.max_tokens)
    print(report[4], flush=True)
    Path(args.out).write_text("\n\n".join(report))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
