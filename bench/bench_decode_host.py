"""Host time of one generator decode step: scheduling, block bookkeeping, attention metadata, sampling and the
per-token bookkeeping, with the model forward stubbed out (it returns zeros at once), so what is measured is the
Python/launch work the engine adds around the forward (issue 10's target: <= 1 ms per step at 512 running sequences).

    python bench/bench_decode_host.py                 # 512 sequences (64 prompts x 8), 64-token prompts
    python bench/bench_decode_host.py --seqs 128 --steps 50

The vocabulary is kept small (256) and the stub's logits are constant. The draw itself (``sampler.sample``: on the
CPU an integer hash over the ``[S, V]`` logits, arithmetic rather than bookkeeping; one fused kernel on CUDA) is
timed apart, and the bookkeeping is the step minus the draw. Prints medians and writes JSON under bench/results/.
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

import torch  # noqa: E402

import engine.generation.generator as generator_module  # noqa: E402
from engine.generation.generator import Generator  # noqa: E402
from engine.generation.sampling_params import SamplingParams  # noqa: E402
from engine.models.tiny import tiny_model  # noqa: E402
from kernels import _backend  # noqa: E402


def stub_model(gen: Generator) -> None:
    """Replace the generator model's forward and LM head by constant-time stubs (zeros, constant logits)."""
    model = gen.model
    logits_row = torch.randn(model.vocab_size, generator=torch.Generator().manual_seed(0))

    def forward(input_ids, positions, kv_caches, meta, backend):
        return torch.zeros(input_ids.shape[0], model.hidden_size, dtype=model.dtype, device=model.device)

    def compute_logits(hidden):
        return logits_row.to(hidden.device).expand(hidden.shape[0], -1)

    model.forward = forward
    model.compute_logits = compute_logits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", type=int, default=512, help="running sequences (prompts x n)")
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=100, help="decode steps timed")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    model = tiny_model("llama", vocab_size=256, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                       intermediate_size=64)
    gen = Generator(model, max_num_seqs=args.seqs, kv_cache_memory=256 << 20)
    stub_model(gen)
    prompts = torch.randint(3, 256, (args.seqs // args.n, args.prompt_len),
                            generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(n=args.n, temperature=1.0, max_tokens=args.steps + 8, ignore_eos=True, seed=0)
    for prompt in prompts:
        gen.add_request(prompt, params)
    while len(gen.scheduler.running) < args.seqs:  # prefill every prompt
        gen.step()
    real_sample, draw = generator_module.sample, []

    def timed_sample(*a, **k):
        t0 = time.perf_counter()
        out = real_sample(*a, **k)
        draw.append((time.perf_counter() - t0) * 1e3)
        return out

    generator_module.sample = timed_sample
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        gen.step()
        times.append((time.perf_counter() - t0) * 1e3)
    generator_module.sample = real_sample
    bookkeeping = [t - d for t, d in zip(times, draw)]
    running = len(gen.scheduler.running)
    for rid in list(gen._requests):
        gen.abort_request(rid)
    med, med_draw, med_book = statistics.median(times), statistics.median(draw), statistics.median(bookkeeping)
    info = _backend.describe()
    print(f"device: {info['device']} | torch {info['torch']} | {running} running sequences, prompt "
          f"{args.prompt_len}, forward stubbed | decode step: median {med:.3f} ms = bookkeeping {med_book:.3f} ms "
          f"+ the draw {med_draw:.3f} ms (step min {min(times):.3f}, max {max(times):.3f})")
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / \
        f"decode_host_{info['device'].replace(' ', '-')}_{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**info, "args": vars(args), "running": running, "median_ms": med,
                               "bookkeeping_median_ms": med_book, "draw_median_ms": med_draw,
                               "min_ms": min(times), "max_ms": max(times)}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
