"""Command-line entry point: ``rlhf-engine {demo,sft,grpo,rm,dpo,ppo,generate,plot,env,bench}``.

Training commands take ``--config file.yaml`` plus dotted overrides (``optim.lr=1e-5 trainer.max_steps=50``); the
resolved config is written into the run directory."""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
from pathlib import Path


def _env(_args: argparse.Namespace) -> int:
    import kernels

    kernels.has_extension()  # builds the compiled extension if it is not cached yet, so the report is the truth
    print(json.dumps(kernels.backend_report(), indent=2))
    return 0


BENCHES = {"peers": "bench_peers.py", "kernels": "bench_kernels.py", "generate": "bench_generate.py",
           "e2e": "bench_e2e.py", "rlhf": "bench_rlhf.py", "packing": "bench_packing.py"}


def _bench(args: argparse.Namespace) -> int:
    """``rlhf-engine bench [NAME] [ARGS...]``: runs ``bench/<BENCHES[NAME]>`` with ``ARGS``; no name (or arguments
    only) is ``peers``: ours vs TRL / Liger-Kernel / HF generate, which prints the tables and writes the PNG.
    ``rlhf-engine bench tables FILE.json ...`` prints the tables of earlier ``peers`` results without running."""
    rest = list(args.rest)
    name = rest.pop(0) if rest and (rest[0] in BENCHES or rest[0] == "tables") else "peers"
    if name == "tables":
        name, rest = "peers", ["--markdown", *rest]
    script = Path(__file__).resolve().parent.parent / "bench" / BENCHES[name]
    if not script.exists():
        print(f"error: {script} not found (the benchmarks ship with the source checkout, not the wheel)")
        return 2
    argv, sys.argv = sys.argv, [str(script), *rest]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv
    return 0


def _demo(args: argparse.Namespace) -> int:
    from engine.trainers.demo import run_demo

    result = run_demo(args.output_dir, digits=args.digits, ops=args.ops, sft_budget_s=args.sft_budget_s,
                      sft_target=args.sft_target, grpo_steps=args.grpo_steps, grpo_budget_s=args.grpo_budget_s,
                      seed=args.seed, style=args.style, num_eval=args.num_eval, sft_max_steps=args.sft_max_steps,
                      sft_checkpoint=args.sft_checkpoint, grpo_overrides=args.grpo_override)
    return 0 if result["grpo_accuracy"] >= result["sft_accuracy"] else 1


def _train(kind: str):
    def run(args: argparse.Namespace) -> int:
        from engine import config as C

        if kind == "sft":
            from engine.trainers.sft import SFTTrainer as Trainer
        elif kind == "grpo":
            from engine.trainers.grpo import GRPOTrainer as Trainer
        elif kind == "ppo":
            from engine.trainers.ppo import PPOTrainer as Trainer
        elif kind == "rm":
            from engine.trainers.preference import RewardModelTrainer as Trainer
        else:
            from engine.trainers.preference import DPOTrainer as Trainer
        run_config = {"sft": C.SFTRunConfig, "grpo": C.GRPORunConfig, "ppo": C.PPORunConfig,
                      "rm": C.RewardModelRunConfig, "dpo": C.DPORunConfig}[kind]
        cfg = C.load_config(run_config, args.config, args.overrides)
        metrics = Trainer(cfg).train()
        print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, indent=2))
        return 0

    return run


def _generate(args: argparse.Namespace) -> int:
    from engine.generation import Generator, SamplingParams
    from engine.models import load_policy
    from engine.models.builders import resolve_device
    from engine.models.loading import resolve_model_dir

    device = resolve_device(args.device)
    model, tokenizer = load_policy(str(resolve_model_dir(args.model)), device=device)
    if tokenizer is None:
        raise ValueError(f"--model {args.model} has no tokenizer to encode the prompts with")
    gen = Generator(model, tokenizer)
    params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                            seed=args.seed)
    for out in gen.generate([tokenizer.encode(p) for p in args.prompts], params):
        for c in out.outputs:
            print(json.dumps({"request": out.request_id, "index": c.index, "text": c.text,
                              "finish_reason": c.finish_reason, "logprob": c.cumulative_logprob}))
    return 0


def _plot(args: argparse.Namespace) -> int:
    from engine.runs.metrics import plot_run

    print(plot_run(args.run_dir, args.out))
    return 0


def _error_line(err: BaseException) -> str:
    """The one line printed for an error without ``--debug``: its message, its lines joined."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
    return f"rlhf-engine: error: {text} (--debug or RLHF_ENGINE_DEBUG=1 shows the traceback)"


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the sub-command; returns the exit code: 0 on success, 1 on
    an error (one line on stderr: the message; ``--debug`` anywhere on the line, or ``RLHF_ENGINE_DEBUG=1``, re-raises
    it with its traceback instead), 130 on Ctrl-C, 2 for a command line argparse rejects."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if command is not None and argv[command] == "bench":  # everything after it is the bench script's, options too
        args = parser.parse_args(argv[:command + 1])
        args.rest = argv[command + 1:]
    else:
        args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("RLHF_ENGINE_DEBUG", "") not in ("", "0")
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("rlhf-engine: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the CLI's boundary: every error becomes one line
        if debug:
            raise
        print(_error_line(err), file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    """The ``rlhf-engine`` argument parser (sub-commands set ``fn``, the function that runs them)."""
    parser = argparse.ArgumentParser(prog="rlhf-engine", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error (also "
                        "RLHF_ENGINE_DEBUG=1); without it an error prints one line")
    common = argparse.ArgumentParser(add_help=False)  # --debug after the sub-command too
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=argparse.ArgumentParser)
    _add = sub.add_parser
    sub.add_parser = lambda *a, **k: _add(*a, parents=[common], **k)  # every sub-command accepts --debug
    demo = sub.add_parser("demo", help="cold-start SFT then GRPO of a tiny model on arithmetic (CPU, minutes)")
    from engine.trainers.demo import add_arguments

    add_arguments(demo)
    demo.set_defaults(fn=_demo)
    helps = {"sft": "supervised fine-tuning", "grpo": "GRPO with rule rewards", "rm": "a Bradley-Terry reward model "
             "on preference pairs", "dpo": "DPO on preference pairs", "ppo": "PPO with a critic against a reward model"}
    for kind, text in helps.items():
        p = sub.add_parser(kind, help=f"{text}, from --config and dotted overrides")
        p.add_argument("--config", default=None, help="YAML/JSON config file")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-5")
        p.set_defaults(fn=_train(kind))
    gen = sub.add_parser("generate", help="sample completions from a checkpoint")
    gen.add_argument("--model", required=True, help="HF checkpoint directory, or a run directory (its newest "
                     "complete checkpoint)")
    gen.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    gen.add_argument("prompts", nargs="+")
    gen.add_argument("--n", type=int, default=1)
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--seed", type=int, default=None)
    gen.set_defaults(fn=_generate)
    plot = sub.add_parser("plot", help="draw reward/accuracy/KL/length curves of a run to PNG")
    plot.add_argument("run_dir")
    plot.add_argument("--out", default=None)
    plot.set_defaults(fn=_plot)
    sub.add_parser("env", help="print the active kernel backends (building the compiled extension if needed), versions and device").set_defaults(fn=_env)
    bench = sub.add_parser("bench", help="ours vs the peers: tables + PNG (bench/bench_peers.py); 'bench NAME ARGS' runs "
                           f"bench/bench_NAME.py, NAME one of {', '.join(BENCHES)}; 'bench tables FILE.json' prints "
                           "the tables of earlier results")
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(fn=_bench)
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
