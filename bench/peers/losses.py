"""The ``losses`` section: forward + backward of the policy loss from hidden states and the LM head, ours
(``kernels.fused_linear_logprobs`` + ``kernels.grpo_loss`` / ``kernels.dpo_loss``) against eager PyTorch,
``torch.compile`` of eager, TRL's log-prob paths and Liger-Kernel's fused linear GRPO / DPO losses: time per call and
peak memory above the inputs."""

from __future__ import annotations

import functools
import time

import torch
import torch.nn.functional as F

import kernels as K
from peers.common import Report, median, parse_shapes, peer, sync

CLIP = 0.2

def grpo_math(lp, old, adv, mask):
    """The GRPO policy loss in plain PyTorch, as ``kernels.grpo_loss(kl_coef=0)``: clipped ratio, token-mean.
    ``lp, old, mask``: ``[B, T]``; ``adv``: ``[B]``."""
    ratio = torch.exp(lp - old)
    a = adv[:, None]
    per_token = torch.maximum(-a * ratio, -a * ratio.clamp(1 - CLIP, 1 + CLIP))
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def dpo_math(lp, mask, beta: float = 0.1):
    """Sigmoid DPO on ``[B, T]`` log-probs (the ``B/2`` chosen rows first), reference log-probs 0, as
    ``kernels.dpo_loss``."""
    seq = (lp * mask).sum(-1)
    B = seq.shape[0] // 2
    return -F.logsigmoid(beta * (seq[:B] - seq[B:])).mean()


def loss_inputs(shape, kind: str, device: str):
    """Inputs of one loss call: ``hidden [B, T, H]`` (for DPO the first ``B/2`` rows are the chosen completions,
    the others the rejected ones), ``weight [V, H]`` (both leaves that require grad), ``labels [B, T]`` (-100 on the
    last eighth of each row: padding), ``mask [B, T]`` float, ``old [B, T]`` and ``adv [B]`` float32."""
    B, T, H, V = shape
    if kind == "dpo" and B % 2:
        raise ValueError(f"DPO needs an even B (chosen + rejected rows), got {B}")
    rows = B
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(rows, T, H, generator=g) * 0.5).to(device, dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * H ** -0.5).to(device, dtype).requires_grad_()
    labels = torch.randint(0, V, (rows, T), generator=g).to(device)
    mask = torch.ones(rows, T, device=device)
    mask[:, T - T // 8:] = 0
    labels[mask == 0] = -100
    old = (-torch.rand(rows, T, generator=g) * 5).to(device)
    adv = torch.randn(rows, generator=g).to(device)
    x = dict(hidden=hidden, weight=weight, labels=labels, mask=mask, old=old, adv=adv)
    # Liger marks the tensors it is given dynamic for its compiled chunks (an attribute on the tensor), which would
    # make the "compile" impl recompile and fail on them: it gets copies of its own
    x["liger"] = {key: x[key].clone() for key in ("mask", "old", "adv")} | {"labels": labels.clamp(min=0),
                                                                               "dpo_labels": labels.clone()}
    return x


def eager_logprobs(h, w, labels):
    """``[N]`` float32 log-probs through the full ``[N, V]`` logits."""
    logits = (h @ w.t()).float()
    return logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[:, None])[:, 0]


def loss_impls(kind: str, args, report: Report, without: set[str], device: str) -> dict:
    """``{impl: fn(inputs) -> scalar loss}`` for one loss kind; unavailable peers are reported as skipped."""

    def tail(lp, x):
        lp = lp.view(x["mask"].shape) * x["mask"]
        return grpo_math(lp, x["old"], x["adv"], x["mask"]) if kind == "grpo" else dpo_math(lp, x["mask"])

    def flat(x):
        return x["hidden"].reshape(-1, x["hidden"].shape[-1]), x["labels"].reshape(-1)

    def ours(x):
        h, y = flat(x)
        lp = K.fused_linear_logprobs(h, x["weight"], y).view(x["mask"].shape)
        if kind == "grpo":
            return K.grpo_loss(lp, x["old"], x["adv"], x["mask"].bool(), kl_coef=0.0)[0]
        seq = (lp * x["mask"]).sum(-1)
        B = seq.shape[0] // 2
        zero = torch.zeros_like(seq[:B])
        return K.dpo_loss(seq[:B], seq[B:], zero, zero, beta=0.1)[0]

    def eager(x):
        h, y = flat(x)
        return tail(eager_logprobs(h, x["weight"], y), x)

    impls = {"ours": ours, "eager": eager}
    if args.no_compile:
        report.skip("losses", f"{kind}/compile", "disabled (--no-compile)")
    else:
        impls["compile"] = torch.compile(eager, dynamic=False)
    trl = peer("trl", without)
    if isinstance(trl, str):
        report.skip("losses", f"{kind}/trl_chunked", trl)
        report.skip("losses", f"{kind}/trl_selective", trl)
    else:
        from trl.kernels import ChunkedLogProbFunction
        from trl.trainer.utils import selective_log_softmax

        def trl_chunked(x):  # GRPOTrainer's fused LM head (trl.trainer.utils.add_fused_lm_head), log-probs only
            h, y = flat(x)
            lp = ChunkedLogProbFunction.apply(h, x["weight"], None, y.clamp(min=0), 1.0, 32768, None, 1.0,
                                              ("log_probs",))[0]
            return tail(lp, x)

        def trl_selective(x):  # full logits, then TRL's selective_log_softmax
            h, y = flat(x)
            return tail(selective_log_softmax((h @ x["weight"].t()).float(), y.clamp(min=0)), x)

        impls.update(trl_chunked=trl_chunked, trl_selective=trl_selective)
    liger = peer("liger_kernel", without)
    if isinstance(liger, str):
        report.skip("losses", f"{kind}/liger", liger)
    else:
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss, LigerFusedLinearGRPOLoss
        except Exception as err:  # noqa: BLE001 - a broken install is a reason, not a crash
            report.skip("losses", f"{kind}/liger", f"liger_kernel.chunked_loss does not import: {err!r}")
        else:
            compiled = not args.no_compile  # Liger torch.compiles its chunk function by default
            if kind == "grpo":
                fn = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="bnpo", compiled=compiled,
                                              epsilon_low=CLIP, epsilon_high=CLIP, temperature=1.0)
                impls["liger"] = lambda x: fn(x["hidden"], x["weight"], x["liger"]["labels"], x["liger"]["mask"],
                                              x["liger"]["adv"], old_per_token_logps=x["liger"]["old"])[0]
            else:
                fn = LigerFusedLinearDPOLoss(beta=0.1, use_ref_model=False, compiled=compiled)
                impls["liger"] = lambda x: fn(x["weight"], x["hidden"], x["liger"]["dpo_labels"])[0]
    return impls


def peak_mib(fn, device: str) -> float:
    """Peak torch memory of one ``fn()`` above what was allocated before it, in MiB: CUDA ``max_memory_allocated``;
    on the CPU the running sum of the allocator's alloc/free events that ``torch.profiler`` records."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak / 2**20


def time_loss(kind: str, shape: tuple[int, ...], args, report: Report, without: set[str], device: str) -> list:
    """Rows of every implementation of one loss kind at one shape: a warm-up call each, then ``args.loss_reps``
    alternating timed calls, then one call for the peak memory."""
    torch._dynamo.reset()  # a fresh compilation per shape: no recompilation limits, no shape guards
    impls = loss_impls(kind, args, report, without, device)
    x = loss_inputs(shape, kind, device)
    tag = "x".join(map(str, shape))

    def call(fn):
        x["hidden"].grad = x["weight"].grad = None
        fn(x).backward()
        sync(device)

    def attempt(name: str) -> float | None:  # seconds of one call; a failure removes the impl, with why
        t0 = time.perf_counter()
        try:
            call(impls[name])
        except Exception as err:  # noqa: BLE001 - e.g. a compile error or out of memory: a reason
            report.skip("losses", f"{kind}/{name}", f"{tag}: {type(err).__name__}: "
                        f"{(str(err).splitlines() or [''])[0][:200]}")
            del impls[name]
            return None
        return time.perf_counter() - t0

    first = {name: attempt(name) for name in list(impls)}  # warm-up: compilation, allocator
    times = {name: [] for name in impls}
    for _ in range(args.loss_reps):  # alternate the implementations
        for name in list(impls):
            seconds = attempt(name)
            if seconds is not None:
                times[name].append(seconds)
    rows = []
    for name, fn in impls.items():
        rows.append({"loss": kind, "shape": tag, "impl": name, "median_ms": median(times[name]) * 1e3,
                     "first_call_s": first[name], "all_ms": [t * 1e3 for t in times[name]],
                     "peak_mib": peak_mib(functools.partial(call, fn), device)})
        r = rows[-1]
        print(f"[losses] {kind} {tag:20} {name:14} {r['median_ms']:10.1f} ms  peak {r['peak_mib']:8.1f} MiB  "
              f"(first call {r['first_call_s']:.1f} s)", flush=True)
    return rows


def losses_section(args, report: Report, device: str, without: set[str]) -> None:
    rows = []
    for kind, shapes in (("grpo", args.loss_shapes), ("dpo", args.dpo_shapes)):
        for shape in parse_shapes(shapes):
            rows += time_loss(kind, shape, args, report, without, device)
    for r in rows:  # > 1: ours is faster / lighter than this implementation
        ours = next((o for o in rows if o["impl"] == "ours" and o["loss"] == r["loss"] and o["shape"] == r["shape"]),
                    None)
        r["ours_speedup"] = r["median_ms"] / ours["median_ms"] if ours else None
        r["ours_memory_ratio"] = r["peak_mib"] / ours["peak_mib"] if ours and ours["peak_mib"] else None
    report.data["sections"]["losses"] = {
        "shapes": {"grpo": [dict(zip("BTHV", s)) for s in parse_shapes(args.loss_shapes)],
                   "dpo": [dict(zip("BTHV", s)) for s in parse_shapes(args.dpo_shapes)]},
        "notes": "shape B x T x H x V; DPO: B/2 pairs (chosen + rejected rows), reference log-probs 0; the last T/8 "
                 "positions of each row are padding; fwd+bwd into hidden and weight; peak = "
                 + ("torch.cuda.max_memory_allocated above the inputs" if device == "cuda" else
                    "torch.profiler(profile_memory=True) allocator events, running sum, above the inputs"),
        "rows": rows}
