"""Benchmark every kernel op: ours vs the eager PyTorch reference vs torch.compile of the reference.

For each op and pass (fwd, fwd+bwd) it reports the median / p20 / p80 time in ms, the peak extra CUDA memory in MiB,
the effective bandwidth in GB/s (the bytes the op must move, formulas in BYTES below, divided by the median time), that
bandwidth as % of a device-to-device copy, and the speedup over eager. Prints a table, writes JSON under bench/results/.

    python bench/bench_kernels.py                          # CPU: realistic CPU shapes; CUDA: production shapes
    python bench/bench_kernels.py --no-compile --threads 1 --size cpu \
        --ops logprobs_from_logits,entropy_from_logits,ppo_loss,gae,discounted_returns   # the compiled CPU kernels
    python bench/bench_kernels.py --size smoke --no-compile                              # seconds: the script runs

"ours" is the public op with its default dispatch (``kernels._backend.select_backend``; the ``backend`` column says
which ran). On CUDA that is the Triton kernel; on the CPU it is the compiled extension (``csrc/cpu``, built on first
use) for the ops it has, and the PyTorch reference for the others (interpreted Triton is never timed), whose CPU rows
are then ours ~= eager. Ours and the reference run in the same process, one after the other, with the same threads.
The CPU rule for the compiled kernels (README, "The compiled extension"): an op's kernel stays in dispatch only if it
is >= 3x faster than the eager reference (fwd+bwd for differentiable ops); the summary prints each ratio.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import platform
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from kernels import _backend  # noqa: E402


def nb(*ts: torch.Tensor) -> int:
    """Bytes held by ``ts``."""
    return sum(t.numel() * t.element_size() for t in ts)


# Bytes each op must move: the forward reads every input once and writes every output once (float32 outputs, 0-d
# losses count 0); the backward reads the output gradient and the inputs again and writes the input gradient (in the
# input's dtype). op -> (formula, fn(tensor inputs in call order) -> (fwd bytes, fwd+bwd bytes or None)).
# e = element size of the input, N = rows of logits, n = B*T elements of a [B, T] tensor, labels int64, masks bool.
BYTES: dict[str, tuple[str, Callable]] = {
    "logprobs_from_logits": ("fwd N*V*e + N*8 + N*4; fwd+bwd adds N*4 (dlp) + N*V*e (re-read) + N*8 + N*V*e (dlogits)",
                             lambda x, y: (nb(x, y) + 4 * y.numel(), 2 * nb(x, y) + 8 * y.numel() + nb(x))),
    "entropy_from_logits": ("fwd N*V*e + N*4; fwd+bwd adds N*4 (dH) + N*V*e (re-read) + N*V*e (dlogits)",
                            lambda x: (nb(x) + 4 * x[..., 0].numel(), 3 * nb(x) + 8 * x[..., 0].numel())),
    "kl_penalty": ("fwd 2*n*e + n*4; fwd+bwd adds n*4 (dkl) + 2*n*e (re-read) + n*e (dlogprobs)",
                   lambda lp, ref: (nb(lp, ref) + 4 * lp.numel(), 2 * nb(lp, ref) + 8 * lp.numel() + nb(lp))),
    "ppo_loss": ("fwd n*(4*e + 1) [logprobs, old, adv, ref, mask]; fwd+bwd adds n*e (dlogprobs)",
                 lambda lp, old, adv, m, ref: (nb(lp, old, adv, m, ref), nb(lp, old, adv, m, ref) + nb(lp))),
    "value_loss": ("fwd n*(3*e + 1) [values, old, returns, mask]; fwd+bwd adds n*e (dvalues)",
                   lambda v, old, ret, m: (nb(v, old, ret, m), nb(v, old, ret, m) + nb(v))),
    "gae": ("n*(2*e + 1) in [rewards, values, mask] + n*2*4 out [advantages, returns]",
            lambda r, v, m: (nb(r, v, m) + 8 * r.numel(), None)),
    "discounted_returns": ("n*(e + 1) in + n*4 out", lambda r, m: (nb(r, m) + 4 * r.numel(), None)),
    "group_advantages": ("B*e in + B*4 out", lambda s: (nb(s) + 4 * s.numel(), None)),
    "masked_whiten": ("n*(e + 1) in + n*4 out (one read: a lower bound, the statistics need a second pass)",
                      lambda v, m: (nb(v, m) + 4 * v.numel(), None)),
    "dpo_loss": ("fwd 4*B*e; fwd+bwd adds 2*B*e (grads of the two policy inputs; the reference ones are detached)",
                 lambda pc, pr, rc, rr: (nb(pc, pr, rc, rr), nb(pc, pr, rc, rr) + nb(pc, pr))),
    "pairwise_reward_loss": ("fwd 2*B*e; fwd+bwd adds 2*B*e (both gradients)",
                             lambda c, r: (nb(c, r), 2 * nb(c, r))),
}

# Shapes: N x V logits (bf16), B x T per-token tensors (float32, as trainers pass log-probs), S scores, P pairs.
# "cpu" also times the logits ops at a Qwen-size vocabulary (N_big x V_big, ~the element count of N x V: the eager
# reference takes seconds per call there on one core); "gpu" has that V already.
SIZES = {
    "smoke": dict(N=256, V=4096, B=64, T=256, S=512, P=256),
    "cpu": dict(N=2048, V=32768, N_big=512, V_big=151936, B=64, T=1024, S=512, P=256),
    "gpu": dict(N=16384, V=151936, B=512, T=4096, S=8192, P=4096),
}
# torch.compile of a reference that loops over T in Python (gae_ref) unrolls the loop: T=256 already takes ~2 min of
# compilation on a small CPU, T=4096 far longer, so above this T the compile row is skipped (--compile-max-loop-t).
COMPILE_MAX_LOOP_T = 128


# ------------------------------------------------------------------------------------------------------------ inputs
def _mask(B: int, T: int, dev: str) -> torch.Tensor:
    """[B, T] bool right-padded response mask, lengths uniform in [T/4, T]."""
    return torch.arange(T, device=dev) < torch.randint(T // 4, T + 1, (B, 1), device=dev)


def _bt(s: dict, dev: str, k: int) -> list[torch.Tensor]:
    """k float32 [B, T] log-prob-like tensors close to each other (ratios near 1), then a mask."""
    lp = -torch.rand(s["B"], s["T"], device=dev) * 3
    return [lp] + [lp + 0.05 * torch.randn_like(lp) for _ in range(k - 1)] + [_mask(s["B"], s["T"], dev)]


def _randn(s: dict, dev: str) -> torch.Tensor:
    return torch.randn(s["B"], s["T"], device=dev)


def _logprobs(s, dev, big=False):
    N, V = (s["N_big"], s["V_big"]) if big else (s["N"], s["V"])
    labels = torch.randint(0, V, (N,), device=dev)
    return (torch.randn(N, V, device=dev, dtype=torch.bfloat16), labels), {}


def _entropy(s, dev, big=False):
    N, V = (s["N_big"], s["V_big"]) if big else (s["N"], s["V"])
    return (torch.randn(N, V, device=dev, dtype=torch.bfloat16),), {}


def _kl(s, dev):
    lp, ref, _ = _bt(s, dev, 2)
    return (lp, ref), dict(kl_estimator="k3")


def _ppo(s, dev):
    lp, old, ref, m = _bt(s, dev, 3)
    return (lp, old, torch.randn_like(lp), m), dict(ref_logprobs=ref, kl_coef=0.05, kl_estimator="k3")


def _value(s, dev):
    v = _randn(s, dev)
    return (v, v + 0.3 * torch.randn_like(v), _randn(s, dev), _mask(s["B"], s["T"], dev)), {}


def _gae(s, dev):
    return (_randn(s, dev), _randn(s, dev), _mask(s["B"], s["T"], dev)), dict(gamma=1.0, lam=0.95)


def _returns(s, dev):
    return (_randn(s, dev), _mask(s["B"], s["T"], dev)), dict(gamma=0.99)


def _whiten(s, dev):
    return (_randn(s, dev), _mask(s["B"], s["T"], dev)), {}


def _scores(G: int):
    return lambda s, dev: ((torch.randint(0, 2, (s["S"],), device=dev).float(), G), {})


def _pairs(k: int):
    return lambda s, dev: (tuple(-torch.rand(s["P"], device=dev) * 100 for _ in range(k)), {})


@dataclass
class Case:
    """One benchmarked op: ``op`` and ``op + "_ref"`` are looked up in ``kernels.<module>``."""

    op: str
    module: str
    make: Callable  # (size dict, device) -> (args tuple, kwargs dict)
    grad: tuple[int, ...] = ()  # positions of the args to differentiate; () = forward only
    tag: str = ""  # extra shape information for the table
    loop_over_T: bool = False  # the reference loops over T in Python (compile unrolls it)
    requires: tuple[str, ...] = ()  # size keys the case needs; a size set without them skips the case

    def load(self) -> tuple[Callable, Callable]:
        """(ours, reference); raises whatever a module that is still being written raises."""
        mod = importlib.import_module(f"kernels.{self.module}")
        return getattr(mod, self.op), getattr(mod, self.op + "_ref")


CASES = [
    Case("logprobs_from_logits", "logprobs", _logprobs, grad=(0,)),
    Case("logprobs_from_logits", "logprobs", lambda s, dev: _logprobs(s, dev, big=True), grad=(0,),
         requires=("N_big", "V_big")),
    Case("entropy_from_logits", "logprobs", _entropy, grad=(0,)),
    Case("entropy_from_logits", "logprobs", lambda s, dev: _entropy(s, dev, big=True), grad=(0,),
         requires=("N_big", "V_big")),
    Case("kl_penalty", "kl", _kl, grad=(0,), tag="k3"),
    Case("ppo_loss", "ppo_loss", _ppo, grad=(0,), tag="kl=k3"),
    Case("value_loss", "value_loss", _value, grad=(0,)),
    Case("gae", "gae", _gae, loop_over_T=True),
    Case("discounted_returns", "gae", _returns, loop_over_T=True),
    Case("group_advantages", "advantages", _scores(8), tag="G=8"),
    Case("group_advantages", "advantages", _scores(64), tag="G=64"),
    Case("masked_whiten", "advantages", _whiten),
    Case("dpo_loss", "dpo_loss", _pairs(4), grad=(0, 1)),
    Case("pairwise_reward_loss", "reward_loss", _pairs(2), grad=(0, 1)),
]


# ------------------------------------------------------------------------------------------------------------ timing
def bench(fn: Callable, dev: str, reps: int, rep_ms: int) -> tuple[float, float, float]:
    """(median, p20, p80) in ms. CUDA: triton.testing.do_bench (L2 flushed per rep, at least ~10 reps);
    CPU: time.perf_counter over `reps` calls (fewer if one call is slow: about 1 s per row, at least 5 calls), after
    3 warm-up calls (1 when a call takes over 0.5 s)."""
    if dev == "cuda":
        import triton.testing

        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        est_ms = (time.perf_counter() - t0) * 1e3
        return tuple(triton.testing.do_bench(fn, warmup=25, rep=max(rep_ms, int(10 * est_ms) + 1),
                                             quantiles=[0.5, 0.2, 0.8]))
    fn()
    t0 = time.perf_counter()
    fn()
    est_ms = (time.perf_counter() - t0) * 1e3
    if est_ms < 500:
        fn()
    times = []
    for _ in range(min(reps, max(5, int(1000 / max(est_ms, 1e-3))))):  # about 1 s per row at most
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = torch.tensor(times, dtype=torch.float64).quantile(torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return tuple(q.tolist())


def peak_mb(fn: Callable, dev: str) -> float | None:
    """Peak CUDA memory allocated during one call, above what was allocated before it (MiB); None on the CPU."""
    if dev != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def copy_gbps(dev: str, reps: int, rep_ms: int) -> float:
    """Device copy bandwidth: ``dst.copy_(src)`` of 1 GiB (CUDA) / 64 MiB (CPU), read + write bytes / median time."""
    n = (1 << 30 if dev == "cuda" else 1 << 26) // 4
    src, dst = torch.ones(n, device=dev), torch.empty(n, device=dev)
    med = bench(lambda: dst.copy_(src), dev, reps, rep_ms)[0]
    return 2 * nb(src) / (med * 1e-3) / 1e9


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def make_step(fn: Callable, args: tuple, kw: dict, leaves: list[torch.Tensor]) -> Callable:
    """The timed closure: ``fn(*args, **kw)``, or with ``leaves`` the forward then the backward of its (first)
    output, with a fixed random output gradient for a non-scalar output; grads are reset before each call."""
    if not leaves:
        return lambda: fn(*args, **kw)
    out = _first(fn(*args, **kw))
    grad = None if out.dim() == 0 else torch.randn_like(out)
    del out

    def step():
        for x in leaves:
            x.grad = None
        _first(fn(*args, **kw)).backward(grad)

    return step


# -------------------------------------------------------------------------------------------------------------- run
def _err(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0][:100] if lines else ''}"


def run_case(case: Case, ours: Callable, ref: Callable, s: dict, dev: str, opts, copy_bw: float | None
             ) -> list[dict]:
    """The rows of one case: every impl (ours, eager, compile) x every pass (fwd, fwd+bwd)."""
    args, kw = case.make(s, dev)
    tensors = [t for t in (*args, *kw.values()) if isinstance(t, torch.Tensor)]
    fwd_bytes, bwd_bytes = BYTES[case.op][1](*tensors)
    try:
        backend = _backend.select_backend(case.op, tensors[0])
    except RuntimeError as e:
        backend = f"error ({_err(e)})"
    impls = {"ours": (ours, backend), "eager": (ref, "torch")}
    if opts.compile:
        impls["compile"] = (torch.compile(ref, dynamic=False), "inductor")
    shape = "x".join(map(str, args[0].shape)) + (f" {case.tag}" if case.tag else "")
    rows = []
    for pas in ["fwd"] + (["fwd+bwd"] if case.grad else []):
        a = args if pas == "fwd" else tuple(x.detach().requires_grad_() if i in case.grad else x
                                            for i, x in enumerate(args))
        leaves = [a[i] for i in case.grad] if pas != "fwd" else []
        nbytes = fwd_bytes if pas == "fwd" else bwd_bytes
        for impl, (fn, be) in impls.items():
            row = dict(op=case.op, shape=shape, dtype=str(tensors[0].dtype).replace("torch.", ""), impl=impl,
                       backend=be, **{"pass": pas}, bytes=nbytes, median_ms=None, p20_ms=None, p80_ms=None,
                       peak_mem_mb=None, gbps=None, pct_copy=None, speedup_vs_eager=None, error=None)
            rows.append(row)
            if impl == "compile" and case.loop_over_T and s["T"] > opts.compile_max_loop_t:
                row["error"] = (f"compile skipped: the reference loops over T={s['T']} in Python "
                                f"(> --compile-max-loop-t {opts.compile_max_loop_t})")
                continue
            try:
                step = make_step(fn, a, kw, leaves)  # also the warm-up (and the compilation) of the compile variant
                row["median_ms"], row["p20_ms"], row["p80_ms"] = bench(step, dev, opts.reps, opts.rep_ms)
                row["peak_mem_mb"] = peak_mb(step, dev)
                row["gbps"] = nbytes / (row["median_ms"] * 1e-3) / 1e9
                row["pct_copy"] = 100 * row["gbps"] / copy_bw if copy_bw else None
            except Exception as e:  # noqa: BLE001 - a failing variant is reported in its row, the run goes on
                row["error"] = ("compile failed: " if impl == "compile" else "") + _err(e)
            finally:
                for x in leaves:
                    x.grad = None
                gc.collect()
                if dev == "cuda":
                    torch.cuda.empty_cache()
        eager = next(r for r in rows if r["pass"] == pas and r["impl"] == "eager")
        for r in rows:
            if r["pass"] == pas and r["median_ms"] and eager["median_ms"]:
                r["speedup_vs_eager"] = eager["median_ms"] / r["median_ms"]
    return rows


COLUMNS = [("op", 20, "s"), ("shape", 16, "s"), ("dtype", 8, "s"), ("impl", 7, "s"), ("backend", 8, "s"),
           ("pass", 7, "s"), ("median_ms", 10, ".4f"), ("p20_ms", 10, ".4f"), ("p80_ms", 10, ".4f"),
           ("peak_mem_mb", 11, ".1f"), ("gbps", 9, ".2f"), ("pct_copy", 8, ".1f"), ("speedup_vs_eager", 8, ".2f")]
HEADERS = {"peak_mem_mb": "peak_mb", "pct_copy": "%copy", "speedup_vs_eager": "x_eager"}


def format_row(r: dict | None) -> str:
    """One fixed-width table line; the header line for ``r=None``. Text left-aligned, numbers right-aligned."""
    cells = []
    for key, w, f in COLUMNS:
        v = HEADERS.get(key, key) if r is None else r[key]
        text = "-" if v is None else v if isinstance(v, str) else format(v, f)
        cells.append(f"{text:<{w}}" if f == "s" else f"{text:>{w}}")
    return " ".join(cells) + ("" if r is None or not r["error"] else f"  {r['error']}")


def summary(rows: list[dict], copy_bw: float | None, dev: str) -> list[str]:
    def get(op, impl, pas):
        return next((r for r in rows if (r["op"], r["impl"], r["pass"]) == (op, impl, pas) and r["median_ms"]), None)

    if dev != "cuda":
        return cpu_summary(rows)
    out = []
    lp = get("logprobs_from_logits", "ours", "fwd")
    out.append(f"logprobs_from_logits fwd: {lp['gbps']:,.0f} GB/s = {lp['pct_copy']:.0f}% of copy bandwidth "
               f"({copy_bw:,.0f} GB/s)" if lp else "logprobs_from_logits fwd: not measured")
    ours, eager, comp = (get("ppo_loss", i, "fwd+bwd") for i in ("ours", "eager", "compile"))
    if ours and eager:
        vs_c = f"{comp['median_ms'] / ours['median_ms']:.2f}x compile" if comp else "compile not measured"
        out.append(f"ppo_loss fwd+bwd: {eager['median_ms'] / ours['median_ms']:.2f}x eager (target >= 5x), "
                   f"{vs_c} (target >= 1.5x)")
    else:
        out.append("ppo_loss fwd+bwd: not measured")
    ours, loop = get("gae", "ours", "fwd"), get("gae", "eager", "fwd")
    out.append(f"gae: {loop['median_ms'] / ours['median_ms']:,.0f}x the Python loop over T (gae_ref)"
               if ours and loop else "gae: not measured")
    return out


CPP_RULE = 3.0  # a compiled CPU kernel stays in dispatch only if it beats the eager reference by this factor


def cpu_summary(rows: list[dict]) -> list[str]:
    """One line per op that ran a compiled CPU kernel: its speedup over eager per pass and shape, and the verdict of
    the >= 3x rule (decided on fwd+bwd for differentiable ops, on fwd otherwise)."""
    out = []
    for r in rows:
        if r["impl"] != "ours" or r["backend"] != "cpp":
            continue
        passes = {x["pass"] for x in rows if (x["op"], x["shape"], x["impl"]) == (r["op"], r["shape"], "ours")}
        decisive = "fwd+bwd" if "fwd+bwd" in passes else "fwd"
        ratio = r["speedup_vs_eager"]
        verdict = ("" if r["pass"] != decisive else
                   "  (not measured)" if ratio is None else
                   f"  -> {'keep' if ratio >= CPP_RULE else 'DROP'} (rule: >= {CPP_RULE:g}x on {decisive})")
        out.append(f"cpp {r['op']} [{r['shape']}] {r['pass']}: "
                   + ("not measured" if ratio is None else f"{ratio:.2f}x eager") + verdict)
    others = sorted({r["op"] for r in rows if r["impl"] == "ours" and r["backend"] != "cpp"})
    if others:
        out.append(f"no compiled CPU kernel (ours = the reference): {', '.join(others)}")
    return out or ["no compiled CPU kernel ran (extension disabled or not built?)"]


def _loadavg() -> list[float] | None:
    """The host's 1/5/15-minute load averages (a CPU run shares its cores: a load above the thread count means the
    timings, ours and the reference's alike, include waiting for a core)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def main() -> None:
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=SIZES, default="gpu" if cuda else "cpu", help="shape set (default: by device)")
    p.add_argument("--ops", default="", help="comma-separated op names (default: all)")
    p.add_argument("--reps", type=int, default=30, help="CPU: timed calls per row (default 30)")
    p.add_argument("--rep-ms", type=int, default=200, help="CUDA: do_bench time budget per row in ms (default 200)")
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's choice)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile of the references")
    p.add_argument("--compile-max-loop-t", type=int, default=COMPILE_MAX_LOOP_T,
                   help=f"compile Python-loop references (gae) only up to this T (default {COMPILE_MAX_LOOP_T})")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default bench/results/kernels_<device>_<YYYYmmdd-HHMMSS>.json)")
    opts = p.parse_args()
    if not cuda and _backend.forced_backend() == "triton":
        sys.exit(f"{_backend.ENV_VAR}=triton on the CPU would time interpreted Triton: unset it")
    selected = [o for o in opts.ops.split(",") if o]
    unknown = set(selected) - {c.op for c in CASES}
    if unknown:
        sys.exit(f"unknown --ops {sorted(unknown)}; known: {sorted({c.op for c in CASES})}")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    torch.manual_seed(0)
    env = _backend.describe()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    print(f"device: {env['device']} | torch {env['torch']} | triton {env['triton']} | size {opts.size} "
          f"{SIZES[opts.size]} | threads {torch.get_num_threads()} | load {_loadavg()} | {platform.platform()}")
    if not cuda:
        print("NOTE: no CUDA device: 'ours' runs the compiled CPU kernel where the extension has the op (backend "
              "'cpp'), else the PyTorch reference (ours ~= eager). Peak memory is CUDA-only.")
    copy_bw = copy_gbps(dev, opts.reps, opts.rep_ms)
    print(f"{dev} copy bandwidth (copy_, read+write): {copy_bw:,.1f} GB/s")
    slug = re.sub(r"[^a-z0-9]+", "-", str(env["device"]).lower()).strip("-")
    out = (opts.out or ROOT / "bench" / "results" / f"kernels_{slug}_{stamp}.json").resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    result = dict(device=env["device"], torch=env["torch"], triton=env["triton"], timestamp=stamp, size=opts.size,
                  shapes=SIZES[opts.size], cuda_copy_gbps=copy_bw if cuda else None, copy_gbps=copy_bw,
                  host=platform.platform(), cpu_threads=torch.get_num_threads(), backend=env,
                  compile=opts.compile, bytes_formulas={k: v[0] for k, v in BYTES.items()}, summary=None, rows=[],
                  loadavg_start=_loadavg(), loadavg_end=None)
    rows = result["rows"]
    print(format_row(None))
    for case in CASES:
        if selected and case.op not in selected:
            continue
        if any(k not in SIZES[opts.size] for k in case.requires):
            continue
        try:
            ours, ref = case.load()
        except Exception as e:  # noqa: BLE001 - a module being written may fail in any way
            print(f"skip {case.op}: kernels.{case.module} does not import ({_err(e)})")
            continue
        try:
            new = run_case(case, ours, ref, SIZES[opts.size], dev, opts, copy_bw)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory while making the inputs
            print(f"skip {case.op} {case.tag}: {_err(e)}")
            continue
        for r in new:
            print(format_row(r), flush=True)
        rows += new
        out.write_text(json.dumps(result, indent=1) + "\n")  # after every case: a run cut short keeps its rows
        if opts.compile:
            torch._dynamo.reset()
    result["summary"] = summary(rows, copy_bw, dev)
    result["loadavg_end"] = _loadavg()
    result["backend"] = _backend.describe()  # again at the end: the extension's libraries load on first use
    print("\n".join(result["summary"]))
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


if __name__ == "__main__":
    main()
