"""Ours against the peers, in one process, peers alternated, medians (issue 15): a GRPO step end to end, the fused
log-prob + policy losses, and rollout generation.

    python bench/bench_peers.py                          # every section; CPU shapes (~6 min on 2 cores) or GPU ones
    python bench/bench_peers.py --sections losses --loss-reps 5 --no-compile
    python bench/bench_peers.py --markdown bench/results/peers_cpu.json   # the README tables of a results file

Sections (``--sections grpo,losses,generate``):

- ``grpo``: one optimizer step of our ``GRPOTrainer`` (built from config overrides) against TRL's ``GRPOTrainer`` with
  Hugging Face ``generate``, and TRL's ``GRPOTrainer`` with our ``Generator`` as its ``rollout_func``
  (``engine.integrations.trl``), on the same saved checkpoint (a random Qwen2 and a byte-level BPE trained on the
  prompts), the same GSM8K prompts in the same order, the same rewards (``accuracy`` + ``format``), ``G`` samples per
  prompt, ``max_tokens`` new tokens, temperature 1, no KL, one update per rollout, the same micro-batch. Each step is
  split into generate and update (= step - generate). TRL runs its own ``train()`` loop in a thread that is parked
  between steps (a callback waits at ``on_step_end``), so the steps of all peers alternate and only one computes at a
  time; its step is timed from ``on_step_begin`` to ``on_step_end`` and its generation by wrapping the instance's bound
  ``_generate`` (tokenize, generate, decode; TRL's source is not patched). Ours: ``train_step`` timed around the call,
  generation = its ``perf/time/generate`` (rollout, decode, rewards).
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
import copy
import functools
import gc
import importlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from argparse import Namespace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # TRL pings the Hub on init; the GPU machine has no network
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is experimental in TRL 1.16

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import kernels as K  # noqa: E402
from kernels import _backend  # noqa: E402

SECTIONS = ("grpo", "losses", "generate")
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k"
PEERS = ("trl", "liger_kernel", "matplotlib")
# GRPO / generation model shapes: bench_generate's qwen2-cpu (3.5M parameters with vocab 2,048), a tiny_model preset
# name, or "tiny" (tiny_model's defaults: the smoke test's)
CPU_DEFAULTS = dict(model="qwen2-cpu", vocab=2048, model_vocab=0, prompts=8, n=8, max_tokens=128, micro_batch=16,
                    loss_reps=3, loss_shapes="16x128x256x2048,16x128x896x32768", dpo_shapes="16x128x256x2048",
                    gen_shape="16x8x128x128")
GPU_DEFAULTS = dict(model="qwen2.5-0.5b", vocab=32768, model_vocab=151936, prompts=16, n=8, max_tokens=256,
                    micro_batch=16, loss_reps=5, loss_shapes="16x1024x896x151936",
                    dpo_shapes="16x1024x896x151936", gen_shape="64x8x128x256")
CLIP = 0.2


# ------------------------------------------------------------------------------------------------------ common
class Report:
    """The run's JSON: versions, shapes, per-section results and every skipped peer with its reason."""

    def __init__(self, args, device: str):
        info = _backend.describe()
        self.data = {"device": info["device"], "torch": torch.__version__, "triton": info["triton"],
                     "transformers": _version("transformers"), "trl": _version("trl"),
                     "liger_kernel": _version("liger_kernel"), "host": platform.node(),
                     "cpu_threads": torch.get_num_threads(), "dtype": "bfloat16" if device == "cuda" else "float32",
                     "timestamp": time.strftime("%Y-%m-%d %H:%M:%S"), "args": vars(args), "sections": {},
                     "skipped": []}

    def skip(self, section: str, impl: str, reason: str) -> None:
        entry = {"section": section, "impl": impl, "reason": reason}
        if entry not in self.data["skipped"]:  # the same reason for every shape is said once
            print(f"[{section}] {impl}: skipped: {reason}", flush=True)
            self.data["skipped"].append(entry)


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name.replace("_", "-"))
    except Exception:  # noqa: BLE001 - not installed
        return None


def peer(name: str, without: set[str]):
    """The peer's module, or the reason it cannot be used (a string): not installed, or ``--without``."""
    if name in without:
        return f"{name} disabled (--without {name})"
    try:
        return importlib.import_module(name)
    except ImportError as err:
        return f"{name} not installed ({err}); pip install -e '.[bench]'"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",") if item]


# -------------------------------------------------------------------------------------------------------- GRPO
def model_kwargs(name: str) -> dict:
    """``tiny_model`` keyword arguments of a model name (see ``CPU_DEFAULTS``)."""
    from bench_generate import CPU_SHAPES

    if name in CPU_SHAPES:
        return {k: v for k, v in CPU_SHAPES[name].items() if k != "vocab_size"}
    return {"arch": "qwen2", "preset": None if name == "tiny" else name}


def build_checkpoint(args, work: Path) -> tuple[Path, dict]:
    """A random Qwen2 of ``args.model`` and a byte-level BPE of ``args.vocab`` tokens trained on the prompts'
    corpus, saved to ``work/ckpt`` (float32): the one checkpoint every GRPO peer loads. The model's vocabulary is
    ``args.model_vocab`` when set (padded beyond the tokenizer's, as Qwen's is), else the tokenizer's. Returns the
    path and ``{"parameters", "model_vocab", "tokenizer_vocab"}``."""
    from engine.config import GRPORunConfig, load_config
    from engine.data.tasks import PromptTask
    from engine.models.tiny import tiny_model, train_bpe_tokenizer

    cfg = load_config(GRPORunConfig, None, [f"data.train={args.data}", "data.num_eval=8"])
    tok = train_bpe_tokenizer(PromptTask.load(cfg.data).texts(), vocab_size=args.vocab)
    kw = model_kwargs(args.model)
    model = tiny_model(kw.pop("arch"), vocab_size=args.model_vocab or len(tok), pad_token_id=tok.pad_token_id,
                       eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, seed=0, **kw)
    path = work / "ckpt"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    meta = {"parameters": sum(p.numel() for p in model.parameters()), "model_vocab": model.config.vocab_size,
            "tokenizer_vocab": len(tok)}
    print(f"[grpo] checkpoint {path}: {args.model}, {meta}", flush=True)
    return path, meta


class OursStepper:
    """Our ``GRPOTrainer`` (``engine.trainers.grpo``) from config overrides, one ``train_step`` per ``step()``."""

    name = "ours"

    def __init__(self, args, ckpt: Path, work: Path, device: str, steps: int):
        from engine.config import GRPORunConfig, load_config
        from engine.trainers.grpo import GRPOTrainer

        self.overrides = [
            f"model.path={ckpt}", f"data.train={args.data}", f"data.max_prompt_tokens={args.max_prompt_tokens}",
            "data.num_eval=8", f"generation.max_tokens={args.max_tokens}", "generation.temperature=1.0",
            f"grpo.num_generations={args.n}", f"grpo.prompts_per_step={args.prompts}",
            f"grpo.micro_batch_size={args.micro_batch}", "grpo.kl_coef=0.0", "grpo.rewards=[accuracy, format]",
            f"optim.lr={args.lr}", f"trainer.output_dir={work / 'ours'}", f"trainer.max_steps={steps}",
            "trainer.progress_bar=false", "trainer.eval_every=0", "trainer.save_every=0", f"trainer.device={device}"]
        self.trainer = GRPOTrainer(load_config(GRPORunConfig, None, self.overrides))
        self.device, self.step_index = device, 0

    def upcoming_examples(self, count: int) -> list:
        """The next ``count`` training examples the trainer will draw, in order (its data state is restored)."""
        state = copy.deepcopy(self.trainer.state)
        examples = self.trainer.next_examples(count)
        self.trainer.state = state
        return examples

    def step(self) -> dict:
        sync(self.device)
        t0 = time.perf_counter()
        metrics = self.trainer.train_step(self.step_index)
        sync(self.device)
        step_s = time.perf_counter() - t0
        self.trainer.state["step"] += 1
        self.step_index += 1
        c = self.trainer.cfg.grpo
        tokens = round(metrics["completions/mean_length"] * c.num_generations * c.prompts_per_step)
        return {"step_s": step_s, "generate_s": metrics["perf/time/generate"], "output_tokens": tokens}

    def close(self) -> None:
        self.trainer.run.close()


class TRLStepper:
    """TRL's ``GRPOTrainer.train()`` in a thread, parked at ``on_step_end`` until the next ``step()``: its own loop,
    one optimizer step at a time, never computing while another peer does."""

    def __init__(self, name: str, trainer, device: str):
        from transformers import TrainerCallback

        self.name, self.trainer, self.device = name, trainer, device
        self.go, self.done = threading.Semaphore(0), threading.Semaphore(0)
        self.thread, self.error, self.stop = None, None, False
        self.rec: dict = {}
        generate = trainer._generate  # the bound method; the wrapper shadows it on this instance only

        def timed_generate(prompts):
            sync(device)
            t0 = time.perf_counter()
            out = generate(prompts)
            sync(device)
            self.rec["generate_s"] += time.perf_counter() - t0
            self.rec["output_tokens"] += sum(len(ids) for ids in out[1])  # (prompt_ids, completion_ids, ...)
            return out

        trainer._generate = timed_generate
        stepper = self

        class Baton(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                sync(device)
                stepper.rec["t0"] = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                sync(device)
                stepper.rec["step_s"] = time.perf_counter() - stepper.rec.pop("t0")
                stepper.done.release()
                stepper.go.acquire()  # parked until the next step() (or close())
                if stepper.stop:
                    control.should_training_stop = True
                return control

        trainer.add_callback(Baton())

    def _train(self) -> None:
        try:
            self.trainer.train()
        except BaseException as err:  # noqa: BLE001 - re-raised in the main thread by step()
            self.error = err
        finally:
            self.done.release()

    def step(self) -> dict:
        self.rec = {"generate_s": 0.0, "output_tokens": 0}
        if self.thread is None:
            self.thread = threading.Thread(target=self._train, name=f"trl-{self.name}", daemon=True)
            self.thread.start()
        else:
            self.go.release()
        self.done.acquire()
        if self.error is not None:
            raise RuntimeError(f"{self.name}: TRL's train() failed: {self.error!r}") from self.error
        return dict(self.rec)

    def close(self) -> None:
        if self.thread is not None and self.thread.is_alive():
            self.stop = True
            self.go.release()
            self.thread.join(timeout=600)


def trl_trainer(args, ckpt: Path, examples: list, work: Path, device: str, steps: int, rollout_func=None):
    """TRL's ``GRPOTrainer`` on the checkpoint, the examples (in order, not shuffled) and our reward functions, with
    the settings of ``OursStepper``: ``G`` samples, ``max_completion_length``, temperature 1, top-p 1, top-k 0, no
    KL (``beta=0``), one update per generation (``steps_per_generation = gradient_accumulation_steps``), the same
    micro-batch, no activation checkpointing (TRL 1.16 defaults it on; ours does not checkpoint). On CUDA the
    model is loaded in bf16, as TRL loads a bf16 checkpoint (``dtype="auto"``), with ``bf16=True``; ours trains
    bf16 weights with float32 master weights (``optim.master_weights``)."""
    import dataclasses

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from engine.rewards import accuracy_reward, format_reward

    samples = args.prompts * args.n
    if samples % args.micro_batch:
        raise ValueError(f"--micro-batch {args.micro_batch} must divide prompts x n = {samples}")
    fields = {f.name for f in dataclasses.fields(GRPOConfig)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    config = GRPOConfig(
        output_dir=str(work / f"trl{'_gen' if rollout_func else ''}"), use_cpu=device == "cpu", report_to="none",
        logging_steps=1, save_strategy="no", disable_tqdm=True, bf16=device == "cuda", seed=0, max_steps=steps,
        learning_rate=args.lr, per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=samples // args.micro_batch, num_generations=args.n,
        max_completion_length=args.max_tokens, temperature=1.0, top_p=1.0, top_k=0, beta=0.0,
        shuffle_dataset=False, **{checkpointing: False})
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    model = model.to(device)
    rows = [{"prompt": e.prompt_text, "answer": e.record["answer"]} for e in examples]
    trainer = GRPOTrainer(model=model, reward_funcs=[accuracy_reward, format_reward], args=config,
                          train_dataset=Dataset.from_list(rows), processing_class=AutoTokenizer.from_pretrained(ckpt),
                          rollout_func=rollout_func)
    trainer.remove_callback(PrinterCallback)
    return trainer


def grpo_section(args, report: Report, device: str, without: set[str]) -> None:
    steps = args.warmup + args.repeats
    work = Path(tempfile.mkdtemp(prefix="bench_peers_"))
    ckpt, meta = build_checkpoint(args, work)
    ours = OursStepper(args, ckpt, work, device, steps)
    examples = ours.upcoming_examples(args.prompts * steps)
    prompt_lens = [len(e.prompt_ids) for e in examples]
    steppers = [ours]
    trl = peer("trl", without)
    variants = {"trl_hf_generate": False, "trl_our_generator": True}
    if args.no_trl_generator:
        del variants["trl_our_generator"]
        report.skip("grpo", "trl_our_generator", "disabled (--no-trl-generator)")
    for name, ours_rollout in variants.items():
        if isinstance(trl, str):
            report.skip("grpo", name, trl)
            continue
        try:
            rollout_func = None
            if ours_rollout:
                from engine.integrations.trl import make_rollout_func

                rollout_func = make_rollout_func()
            trainer = trl_trainer(args, ckpt, examples, work, device, steps, rollout_func=rollout_func)
        except Exception as err:  # noqa: BLE001 - a peer that cannot be built is a reason, not a crash
            report.skip("grpo", name, f"GRPOTrainer could not be built: {type(err).__name__}: {err}"[:300])
            continue
        prompt_ids = trainer._tokenize_prompts([e.prompt_text for e in examples[:4]])[0]
        if prompt_ids != [e.prompt_ids for e in examples[:4]]:
            raise RuntimeError("TRL tokenizes the prompts differently from ours: the peers would not see the same "
                               "prompts")
        steppers.append(TRLStepper(name, trainer, device))
    runs: dict[str, list[dict]] = {s.name: [] for s in steppers}
    try:
        for k in range(steps):  # alternate the peers step by step, so that drifting machine load hits all alike
            for s in list(steppers):
                try:
                    rec = s.step()
                except Exception as err:  # a peer failing mid-run is reported; ours failing is a failure
                    if s is ours:
                        raise
                    report.skip("grpo", s.name, f"step {k} failed: {type(err).__name__}: {err}"[:300])
                    s.close()
                    steppers.remove(s)
                    runs.pop(s.name)
                    continue
                rec["update_s"] = rec["step_s"] - rec["generate_s"]
                rec["warmup"] = k < args.warmup
                runs[s.name].append(rec)
                print(f"[grpo] step {k}{' (warm-up)' if rec['warmup'] else ''} {s.name:18} {rec['step_s']:7.2f} s "
                      f"(generate {rec['generate_s']:.2f}, update {rec['update_s']:.2f}) {rec['output_tokens']} "
                      "tokens", flush=True)
    finally:
        for s in steppers:
            s.close()
        shutil.rmtree(work, ignore_errors=True)
    for name, recs in runs.items():
        if any(r["output_tokens"] == 0 for r in recs):  # one generation per optimizer step, or the split is wrong
            raise RuntimeError(f"{name}: a step without a generation; runs: {recs}")
    rows = []
    for name, recs in runs.items():
        timed = [r for r in recs if not r["warmup"]] or recs
        med = {key: median([r[key] for r in timed]) for key in ("step_s", "generate_s", "update_s")}
        tokens = median([r["output_tokens"] for r in timed])
        rows.append({"impl": name, **med, "output_tokens": tokens, "tokens_per_s": tokens / med["step_s"],
                     "runs": recs})
    base = rows[0]
    for r in rows:  # > 1: ours is faster than this peer
        r["ours_speedup"] = r["step_s"] / base["step_s"]
        r["ours_generate_speedup"] = r["generate_s"] / base["generate_s"]
        r["ours_update_speedup"] = r["update_s"] / base["update_s"]
    report.data["sections"]["grpo"] = {
        "shape": {"model": args.model, **meta,
                  "prompts": args.prompts, "n": args.n, "max_tokens": args.max_tokens, "micro_batch": args.micro_batch,
                  "max_prompt_tokens": args.max_prompt_tokens, "prompt_tokens_min": min(prompt_lens),
                  "prompt_tokens_median": median(prompt_lens), "prompt_tokens_max": max(prompt_lens),
                  "data": str(args.data), "kl": 0.0, "lr": args.lr, "warmup_steps": args.warmup,
                  "steps": args.repeats},
        "ours_overrides": ours.overrides, "rows": rows}


# ------------------------------------------------------------------------------------------------------ losses
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


# ---------------------------------------------------------------------------------------------------- generate
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


# ------------------------------------------------------------------------------------------ tables and figure
def _fmt(v, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def render_markdown(data: dict) -> str:
    """The README tables of a results dict (the JSON this script writes)."""
    s = data["sections"]
    out = [f"Device: {data['device']}, {data['cpu_threads']} threads, {data['dtype']}; torch {data['torch']}, "
           f"triton {data['triton']}, transformers {data['transformers']}, trl {data['trl']}, "
           f"liger-kernel {data['liger_kernel']}; {data['timestamp']}.", ""]
    if "grpo" in s:
        sh = s["grpo"]["shape"]
        out += [f"**GRPO step** ({sh['model']}, {sh['parameters'] / 1e6:.1f}M parameters, vocab {sh['model_vocab']}; "
                f"{sh['prompts']} GSM8K prompts of "
                f"{sh['prompt_tokens_min']}-{sh['prompt_tokens_max']} tokens x {sh['n']} samples, {sh['max_tokens']} "
                f"new tokens, micro-batch {sh['micro_batch']}, no KL; median of {sh['steps']} steps after "
                f"{sh['warmup_steps']} warm-up, each column its own median; speedup = peer time / ours, > 1: ours "
                "faster)", "",
                "| impl | step s | generate s | update s | output tok/s | ours speedup (step / generate / update) |",
                "|---|---:|---:|---:|---:|---:|"]
        for r in s["grpo"]["rows"]:
            out.append(f"| {r['impl']} | {r['step_s']:.2f} | {r['generate_s']:.2f} | {r['update_s']:.2f} | "
                       f"{r['tokens_per_s']:.0f} | {r['ours_speedup']:.2f}x / {r['ours_generate_speedup']:.2f}x / "
                       f"{r['ours_update_speedup']:.2f}x |")
        out.append("")
    if "losses" in s:
        out += ["**Losses**, fwd + bwd from hidden states and the LM head (shape B x T x H x V; speedup and memory "
                "ratio = peer / ours)", "", "| loss | shape | impl | median ms | peak MiB | ours speedup | "
                "peer/ours memory |", "|---|---|---|---:|---:|---:|---:|"]
        for r in s["losses"]["rows"]:
            out.append(f"| {r['loss']} | {r['shape']} | {r['impl']} | {r['median_ms']:.1f} | {r['peak_mib']:.1f} | "
                       f"{_fmt(r['ours_speedup'])}x | {_fmt(r['ours_memory_ratio'])}x |")
        out.append("")
    if "generate" in s:
        sh = s["generate"]["shape"]
        out += [f"**Generation** ({sh['model']}, {sh['prompts']} prompts x {sh['n']}, prompt {sh['prompt_len']}, "
                f"{sh['max_tokens']} new tokens, EOS ignored)", "",
                "| impl | seconds | output tok/s | ours speedup |", "|---|---:|---:|---:|"]
        for r in s["generate"]["rows"]:
            out.append(f"| {r['impl']} | {r['seconds']:.2f} | {r['tokens_per_s']:.0f} | {r['ours_speedup']:.2f}x |")
        out.append("")
    out += ["**Skipped**", "", "| section | impl | reason |", "|---|---|---|"]
    out += [f"| {k['section']} | {k['impl']} | {k['reason'].replace('|', '/')} |" for k in data["skipped"]]
    out += [] if data["skipped"] else ["| - | - | none: every peer ran |"]
    out.append("")
    return "\n".join(out)


def plot(data: dict, path: Path) -> str | None:
    """Bars of ours vs the peers, one panel per section; returns the reason when no figure could be made."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        return f"matplotlib not installed ({err})"
    s = data["sections"]
    panels = [name for name in SECTIONS if name in s]
    if not panels:
        return "no section ran"
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, name in zip(axes[0], panels):
        rows = s[name]["rows"]
        if name == "grpo":
            labels = [r["impl"] for r in rows]
            ax.bar(labels, [r["generate_s"] for r in rows], label="generate")
            ax.bar(labels, [r["update_s"] for r in rows], bottom=[r["generate_s"] for r in rows], label="update")
            ax.set_ylabel("seconds per GRPO step (median)")
            ax.legend()
        elif name == "losses":
            groups = sorted({(r["loss"], r["shape"]) for r in rows})
            impls = list(dict.fromkeys(r["impl"] for r in rows))
            width = 0.8 / len(impls)
            for i, impl in enumerate(impls):
                vals = [next((r["median_ms"] for r in rows if (r["loss"], r["shape"]) == grp and r["impl"] == impl),
                             0) for grp in groups]
                ax.bar([j + i * width for j in range(len(groups))], vals, width, label=impl)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], [f"{k}\n{sh}" for k, sh in groups],
                          fontsize=7)
            ax.set_yscale("log")
            ax.set_ylabel("ms per fwd+bwd (median, log)")
            ax.legend(fontsize=7)
        else:
            ax.bar([r["impl"] for r in rows], [r["tokens_per_s"] for r in rows])
            ax.set_ylabel("output tokens/s")
        ax.set_title(name)
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"ours vs peers, {data['device']} ({data['dtype']}), torch {data['torch']}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# -------------------------------------------------------------------------------------------------------- main
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
    p.add_argument("--no-trl-generator", action="store_true", help="skip TRL + our Generator (rollout_func)")
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
