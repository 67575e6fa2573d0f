"""The fused draw (``kernels.race_sample``) against the eager sampler, per device, in one process.

CPU: the eager PyTorch sampler vs the compiled kernel (``csrc/cpu/sampling.cpp``). CUDA: the eager sampler vs the Triton
kernel (one program per row) vs the CUDA C++ kernel (``csrc/cuda/sampling_kernels.cu``: rows split along the vocabulary,
for small batches), when the extension is built. Temperature 1, no top-k/top-p (the fused path), rows x vocabulary
grid; medians of repeated calls, with the ratio to the eager path. Prints a table, writes JSON under bench/results/.

    python bench/bench_sampler.py                          # CPU: 8..512 rows x 2,048 and 32,000
    python bench/bench_sampler.py --rows 1,8,64,512 --vocab 151936 --dtype bfloat16     # CUDA
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from engine.generation.sampler import _row_keys, sample  # noqa: E402
from kernels import _backend, _extension  # noqa: E402
from kernels.sampling import race_sample  # noqa: E402


def timed(fn, reps: int, cuda: bool) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` calls after 3 warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def eager(logits, temperature, seeds, positions):
    os.environ[_backend.ENV_VAR] = "torch"
    try:
        return sample(logits, temperature, None, None, seeds, positions)
    finally:
        os.environ.pop(_backend.ENV_VAR, None)


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,8,64,512" if cuda else "8,128,512")
    p.add_argument("--vocab", default="151936" if cuda else "2048,32000")
    p.add_argument("--dtype", default="bfloat16" if cuda else "float32")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    dev = "cuda" if cuda else "cpu"
    dtype = getattr(torch, args.dtype)
    impls = {"eager": None}
    if cuda:
        impls["triton"] = race_sample
        if _extension.has_op("race_sample", "cuda"):
            impls["cuda_cpp"] = torch.ops.rlhf_engine.race_sample
    elif _extension.has_op("race_sample"):
        impls["cpp"] = torch.ops.rlhf_engine.race_sample
    rows = []
    for V in (int(v) for v in args.vocab.split(",")):
        for S in (int(s) for s in args.rows.split(",")):
            g = torch.Generator().manual_seed(S * V)
            logits = (torch.randn(S, V, generator=g) * 3).to(dtype).to(dev)
            temperature = torch.ones(S, device=dev)
            seeds = torch.randint(0, 2**62, (S,), generator=g).to(dev)
            positions = torch.randint(0, 10_000, (S,), generator=g).to(dev)
            ka, kb = _row_keys(seeds, positions)
            row = {"rows": S, "vocab": V}
            for name, fn in impls.items():
                call = (lambda: eager(logits, temperature, seeds, positions)) if fn is None else \
                    (lambda fn=fn: fn(logits, temperature, ka, kb))
                row[f"{name}_ms"] = timed(call, args.reps, cuda)
            for name in impls:
                row[f"{name}_speedup"] = row["eager_ms"] / row[f"{name}_ms"]
            rows.append(row)
            print(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    info = {**_backend.describe(), "threads": torch.get_num_threads(), "dtype": args.dtype, "reps": args.reps}
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / \
        f"sampler_{info['device'].replace(' ', '-')}_{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**info, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
