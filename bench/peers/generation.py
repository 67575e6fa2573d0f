"""The ``generate`` section: our ``Generator`` against Hugging Face ``generate`` (dynamic cache; static cache with its
decode step compiled) at ``bench_generate.py``'s shapes, output tokens/s."""

from __future__ import annotations

import time
from argparse import Namespace

import torch

from peers.common import Report, median, parse_shapes, sync


def generate_section(args, report: Report, device: str, without: set[str]) -> None:
    from bench_generate import build_model, run_hf, run_ours

    P, n, Lp, Lg = parse_shapes(args.gen_shape)[0]
    ns = Namespace(prompts=P, n=n, prompt_len=Lp, max_tokens=Lg, block_size=16, backend=None, kv_mb=0,
                   max_model_len=None, enforce_eager=False)
    torch.manual_seed(0)
    model = build_model(args.model if args.model != "tiny" else "tiny", torch.bfloat16 if device == "cuda"
                        else torch.float32).to(device).eval()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, model.config.vocab_size, (P, Lp), generator=g).tolist()
    runners = {"ours": lambda: run_ours(model, prompts, ns, device), "hf_generate": lambda: run_hf(model, prompts,
                                                                                                  ns, device)}
    if args.hf_static:
        warm: list[float] = []  # the first call compiles: a warm-up, once per process
        runners["hf_static_compile"] = lambda: run_hf_static(model, prompts, ns, device, warm)
    else:
        report.skip("generate", "hf_static_compile", "disabled (--no-hf-static)")
    runs: dict[str, list[dict]] = {name: [] for name in runners}
    for _ in range(args.gen_repeats):
        for name, run in list(runners.items()):
            try:
                runs[name].append(run())
            except Exception as err:  # noqa: BLE001 - HF's static cache / compile may not work here
                report.skip("generate", name, f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
                del runners[name]
                runs.pop(name)
                continue
            r = runs[name][-1]
            print(f"[generate] {name:18} {r['seconds']:7.2f} s  {r['output_tokens'] / r['seconds']:8.0f} tok/s",
                  flush=True)
    rows = []
    for name, results in runs.items():
        secs = [r["seconds"] for r in results]
        tokens = results[0]["output_tokens"]
        rows.append({"impl": name, "backend": results[0]["backend"], "seconds": median(secs), "all_seconds": secs,
                     "output_tokens": tokens, "tokens_per_s": tokens / median(secs),
                     "peak_mb": results[0].get("peak_mb"), "first_call_s": results[0].get("first_call_s")})
    for r in rows:  # > 1: ours is faster
        r["ours_speedup"] = rows[0]["tokens_per_s"] / r["tokens_per_s"]
    report.data["sections"]["generate"] = {
        "shape": {"model": args.model, "prompts": P, "n": n, "prompt_len": Lp, "max_tokens": Lg,
                  "vocab": model.config.vocab_size, "ignore_eos": True}, "rows": rows}


def run_hf_static(model, prompts, ns, device: str, warm: list[float]) -> dict:
    """HF ``generate`` with a static cache and its decode step compiled (``compile_config``; transformers compiles
    on CUDA by default, everywhere when told so); the first call of the process (compilation) is a warm-up, its
    seconds kept in ``warm``."""
    from transformers import CompileConfig

    ids = torch.tensor(prompts, device=device)
    cc = CompileConfig(fullgraph=True, dynamic=False, mode="default" if device != "cuda" else "reduce-overhead")
    cc._compile_all_devices = True

    def call():
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                  top_p=1.0, top_k=0, num_return_sequences=ns.n, max_new_tokens=ns.max_tokens,
                                  min_new_tokens=ns.max_tokens, pad_token_id=0, cache_implementation="static",
                                  compile_config=cc)

    if not warm:
        t0 = time.perf_counter()
        call()
        sync(device)
        warm.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    out = call()
    sync(device)
    return dict(impl="hf_static_compile", backend="transformers", seconds=time.perf_counter() - t0,
                output_tokens=(out.shape[1] - ids.shape[1]) * out.shape[0], peak_mb=None, first_call_s=warm[0])
