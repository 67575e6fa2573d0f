"""CUDA kernels launched by one decode step of the model forward: the eager per-op forward (what the generator ran
before the fused kernels) against the fused one (``kernels.rms_norm`` / ``silu_mul`` / ``rope_cache``), on the
Qwen2.5-0.5B shape in bf16 with the Triton decode backend (issue 10: ~1,000 launches a step from Python).

    python bench/count_launches.py            # 64 sequences of 40 tokens; --seqs N
    python bench/count_launches.py --out x.json

Needs CUDA to count anything (on the CPU the profiler sees no kernels, and it says so). Writes JSON under
bench/results/.
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
from torch.autograd import DeviceType  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from engine.generation.attention import AttentionMetadata, TritonAttention  # noqa: E402
from engine.generation.model_runner import LlamaFamilyModel  # noqa: E402
from engine.models import tiny_model  # noqa: E402
from kernels import _backend  # noqa: E402
from tests.engine.models.test_models import eager_forward  # noqa: E402


def kernels_per_call(fn, cuda: bool) -> int:
    """CUDA kernels one call of ``fn`` launches (after two warm-up calls)."""
    fn()
    fn()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    return sum(e.device_type == DeviceType.CUDA for e in prof.events())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", type=int, default=64)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    shape = {"preset": "qwen2.5-0.5b"} if cuda else {"num_layers": 2}
    lm = LlamaFamilyModel(tiny_model("qwen2", dtype=torch.bfloat16, **shape).to(dev))
    S, bs, ctx = args.seqs, 16, 40
    caches = [tuple(torch.zeros(4 * S, bs, lm.num_kv_heads, lm.head_dim, dtype=lm.dtype, device=dev)
                    for _ in range(2)) for _ in range(lm.num_layers)]
    meta = AttentionMetadata.build([[4 * s + j for j in range(4)] for s in range(S)], [ctx] * S, [1] * S, bs, dev)
    ids = torch.randint(0, lm.vocab_size, (S,), device=dev)
    pos = torch.full((S,), ctx - 1, device=dev)
    backend = TritonAttention() if cuda else None
    if backend is None:
        print("no CUDA: nothing to count (run on a GPU)")
        return
    rows = {}
    for name, fwd in (("eager", lambda: eager_forward(lm, ids, pos, caches, meta, backend)),
                      ("fused", lambda: lm.forward(ids, pos, caches, meta, backend))):
        n = kernels_per_call(fwd, cuda)
        rows[name] = {"kernels_per_step": n, "per_layer": n / lm.num_layers}
        print(f"{name:6}: {n} CUDA kernels per decode step ({n / lm.num_layers:.1f} per layer)")
    info = _backend.describe()
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / \
        f"launches_{info['device'].replace(' ', '-')}_{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**info, "args": vars(args), "layers": lm.num_layers, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
