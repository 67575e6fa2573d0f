"""The ``grpo`` section: one optimizer step of our ``GRPOTrainer`` against TRL's ``GRPOTrainer`` (with Hugging Face
``generate``, and with our ``Generator`` as its ``rollout_func``), on the same checkpoint, prompts, rewards and shapes.

Each peer runs in a process of its own (``spawn``), stepped over a pipe by the parent, which alternates the peers
step by step so that only one computes at a time and drifting machine load hits all alike. Why processes: in one
process each Python thread that runs torch ops gets an OpenMP pool of its own, and a parked peer's pool slowed the
running peer's CPU steps by up to 1.8x (measured on the 2-core CPU: ours 4.1 s alone, 7.4 s beside two parked TRL
trainers; ``OMP_WAIT_POLICY=PASSIVE`` removed most of that but slowed every step it ran alone by ~20%). In its own
process each peer runs as it would alone, on one thread: TRL's ``train()`` loop is that process's main thread, parked
in a callback at ``on_step_end`` until the parent asks for the next step."""

from __future__ import annotations

import copy
import multiprocessing
import shutil
import tempfile
import time
import traceback
from pathlib import Path

import torch

from peers.common import Report, median, peer, sync


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

    def __init__(self, args, ckpt: Path, work: Path, device: str, steps: int, extra: tuple[str, ...] = (),
                 name: str = "ours"):
        self.name = name
        from engine.config import GRPORunConfig, load_config
        from engine.trainers.grpo import GRPOTrainer

        self.overrides = [
            f"model.path={ckpt}", f"data.train={args.data}", f"data.max_prompt_tokens={args.max_prompt_tokens}",
            "data.num_eval=8", f"generation.max_tokens={args.max_tokens}", "generation.temperature=1.0",
            f"grpo.num_generations={args.n}", f"grpo.prompts_per_step={args.prompts}",
            f"grpo.micro_batch_size={args.micro_batch}", "grpo.kl_coef=0.0", "grpo.rewards=[accuracy, format]",
            f"optim.lr={args.lr}", f"trainer.output_dir={work / self.name}", f"trainer.max_steps={steps}",
            "trainer.progress_bar=false", "trainer.eval_every=0", "trainer.save_every=0", f"trainer.device={device}",
            *extra]
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


def trl_trainer(args, ckpt: Path, rows: list[dict], work: Path, device: str, steps: int, rollout_func=None):
    """TRL's ``GRPOTrainer`` on the checkpoint, the prompts (``rows`` of ``{"prompt", "answer"}``, in order, not
    shuffled) and our reward functions, with the settings of ``OursStepper``: ``G`` samples,
    ``max_completion_length``, temperature 1, top-p 1, top-k 0, no KL (``beta=0``), one update per generation
    (``steps_per_generation = gradient_accumulation_steps``), the same micro-batch, no activation checkpointing (TRL
    1.16 defaults it on; ours does not checkpoint). On CUDA the model is loaded in bf16, as TRL loads a bf16
    checkpoint (``dtype="auto"``), with ``bf16=True``; ours trains bf16 weights with float32 master weights
    (``optim.master_weights``)."""
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
    dataset = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    trainer = GRPOTrainer(model=model, reward_funcs=[accuracy_reward, format_reward], args=config,
                          train_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(ckpt),
                          rollout_func=rollout_func)
    trainer.remove_callback(PrinterCallback)
    return trainer


# ------------------------------------------------------------------------------------------- peers in processes
class PeerProcess:
    """The parent's handle on one peer running in its own process (``target(conn, *args)``, spawned): ``info`` is what
    the peer sent when it was ready, ``step()`` one optimizer step's record (``step_s``, ``generate_s``,
    ``output_tokens``), ``close()`` ends it. A peer that fails raises ``RuntimeError`` with its last traceback line
    (the whole traceback is printed)."""

    def __init__(self, name: str, target, *args):
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch state, threads or pools inherited
        self.name = name
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(child, *args), name=f"bench-{name}", daemon=True)
        self.proc.start()
        child.close()
        self.info = self._receive()

    def _receive(self):
        try:
            kind, payload = self.conn.recv()
        except EOFError:
            self.proc.join(timeout=10)
            raise RuntimeError(f"{self.name}: its process ended without an answer (exit code {self.proc.exitcode})")
        if kind == "error":
            print(f"[grpo] {self.name} failed:\n{payload}", flush=True)
            raise RuntimeError(f"{self.name}: {payload.strip().splitlines()[-1]}")
        return payload

    def step(self) -> dict:
        self.conn.send("step")
        return self._receive()

    def close(self) -> None:
        try:
            self.conn.send("close")
        except OSError:  # the process is gone already
            pass
        self.proc.join(timeout=120)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


def _child_setup(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def _serve_steps(conn, step) -> None:
    """Answers ``"step"`` with ``("step", step())`` until ``"close"``, or a failure (sent as ``("error", tb)``)."""
    while conn.recv() == "step":
        try:
            conn.send(("step", step()))
        except Exception:  # noqa: BLE001 - the parent reports it
            conn.send(("error", traceback.format_exc()))
            return


def serve_ours(conn, args, ckpt: Path, work: Path, device: str, steps: int, extra: tuple[str, ...] = (),
               name: str = "ours") -> None:
    """Process target: our trainer (``extra``: config overrides on top of ``OursStepper``'s; ``name``: its run
    directory under ``work``). Ready info: the prompts it will draw (``{"prompt", "answer", "prompt_ids"}``, in
    order) and its config overrides."""
    _child_setup(args)
    try:
        ours = OursStepper(args, ckpt, work, device, steps, extra, name)
        rows = [{"prompt": e.prompt_text, "answer": e.record["answer"], "prompt_ids": list(e.prompt_ids)}
                for e in ours.upcoming_examples(args.prompts * steps)]
    except Exception:  # noqa: BLE001 - the parent reports it
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ready", {"rows": rows, "overrides": ours.overrides}))
    try:
        _serve_steps(conn, ours.step)
    finally:
        ours.close()


def serve_trl(conn, args, ckpt: Path, rows: list[dict], work: Path, device: str, steps: int,
              our_rollout: bool, our_head: bool = False) -> None:
    """Process target: TRL's ``GRPOTrainer`` (with our ``Generator`` as ``rollout_func`` when ``our_rollout``, and
    our ``fused_linear_logprobs`` as its LM head when ``our_head``: ``engine.integrations.trl``), its
    ``train()`` in this process's main thread, parked at ``on_step_end`` until the next ``"step"``. The step is timed
    from ``on_step_begin`` to ``on_step_end``, generation by wrapping the instance's bound ``_generate`` (tokenize,
    generate, decode; TRL's source is not patched). Ready info: whether TRL tokenizes the first prompts as ours."""
    _child_setup(args)
    try:
        from transformers import TrainerCallback

        rollout_func = None
        if our_rollout:
            from engine.integrations.trl import make_rollout_func

            rollout_func = make_rollout_func()
        trainer = trl_trainer(args, ckpt, rows, work, device, steps, rollout_func=rollout_func)
        if our_head:
            from engine.integrations.trl import use_fused_logprobs

            use_fused_logprobs(trainer)
        same_tokens = trainer._tokenize_prompts([r["prompt"] for r in rows[:4]])[0] == [r["prompt_ids"]
                                                                                        for r in rows[:4]]
        rec = {"generate_s": 0.0, "output_tokens": 0}
        generate = trainer._generate  # the bound method; the wrapper shadows it on this instance only

        def timed_generate(prompts):
            sync(device)
            t0 = time.perf_counter()
            out = generate(prompts)
            sync(device)
            rec["generate_s"] += time.perf_counter() - t0
            rec["output_tokens"] += sum(len(ids) for ids in out[1])  # (prompt_ids, completion_ids, ...)
            return out

        trainer._generate = timed_generate

        class Baton(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                sync(device)
                rec["t0"] = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                sync(device)
                step = {"step_s": time.perf_counter() - rec.pop("t0"), **rec}
                rec.update(generate_s=0.0, output_tokens=0)
                conn.send(("step", step))
                if conn.recv() != "step":  # parked until the next step, or told to stop
                    control.should_training_stop = True
                return control

        trainer.add_callback(Baton())
    except Exception:  # noqa: BLE001 - the parent reports it
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ready", {"same_tokens": same_tokens}))
    if conn.recv() != "step":
        return
    try:
        trainer.train()
    except Exception:  # noqa: BLE001 - the parent reports it
        conn.send(("error", traceback.format_exc()))


# ------------------------------------------------------------------------------------------------------ section
def grpo_section(args, report: Report, device: str, without: set[str]) -> None:
    steps = args.warmup + args.repeats
    work = Path(tempfile.mkdtemp(prefix="bench_peers_"))
    steppers: list[PeerProcess] = []
    try:
        ckpt, meta = build_checkpoint(args, work)
        ours = PeerProcess("ours", serve_ours, args, ckpt, work, device, steps)
        steppers.append(ours)
        rows = ours.info["rows"]
        prompt_lens = [len(r["prompt_ids"]) for r in rows]
        if args.ours_packed:  # the same trainer with packed, padding-free micro-batches of the padded ones' mean size
            budget = args.micro_batch * round(median(prompt_lens) + args.max_tokens)
            packed = (f"grpo.max_tokens_per_micro_batch={budget}",)
            steppers.append(PeerProcess("ours_packed", serve_ours, args, ckpt, work, device, steps, packed,
                                        "ours_packed"))
        else:
            report.skip("grpo", "ours_packed", "disabled (--no-ours-packed)")
        trl = peer("trl", without)
        # TRL as it comes; with our Generator as its rollout_func; with that and our fused log-prob head too
        variants = {"trl_hf_generate": (False, False), "trl_our_generator": (True, False),
                    "trl_our_generator_and_head": (True, True)}
        if args.no_trl_generator:
            for name in ("trl_our_generator", "trl_our_generator_and_head"):
                del variants[name]
                report.skip("grpo", name, "disabled (--no-trl-generator)")
        for name, (our_rollout, our_head) in variants.items():
            if isinstance(trl, str):
                report.skip("grpo", name, trl)
                continue
            try:
                proc = PeerProcess(name, serve_trl, args, ckpt, rows, work, device, steps, our_rollout, our_head)
            except RuntimeError as err:  # a peer that cannot be built is a reason, not a crash
                report.skip("grpo", name, f"GRPOTrainer could not be built: {err}"[:300])
                continue
            steppers.append(proc)
            if not proc.info["same_tokens"]:
                raise RuntimeError("TRL tokenizes the prompts differently from ours: the peers would not see the same "
                                   "prompts")
        runs: dict[str, list[dict]] = {s.name: [] for s in steppers}
        for k in range(steps):  # alternate the peers step by step, so that drifting machine load hits all alike
            for s in list(steppers):
                try:
                    rec = s.step()
                except RuntimeError as err:  # a peer failing mid-run is reported; ours failing is a failure
                    if s is ours:
                        raise
                    report.skip("grpo", s.name, f"step {k} failed: {err}"[:300])
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
    rows_out = []
    for name, recs in runs.items():
        timed = [r for r in recs if not r["warmup"]] or recs
        med = {key: median([r[key] for r in timed]) for key in ("step_s", "generate_s", "update_s")}
        tokens = median([r["output_tokens"] for r in timed])
        rows_out.append({"impl": name, **med, "output_tokens": tokens, "tokens_per_s": tokens / med["step_s"],
                         "runs": recs})
    base = rows_out[0]
    for r in rows_out:  # > 1: ours is faster than this peer
        r["ours_speedup"] = r["step_s"] / base["step_s"]
        # the median of the step-by-step ratios (the same round of the alternation): robust to drifting load
        r["ours_speedup_paired"] = median([p["step_s"] / o["step_s"] for p, o in zip(r["runs"], base["runs"])
                                           if not p["warmup"]])
        r["ours_generate_speedup"] = r["generate_s"] / base["generate_s"]
        r["ours_update_speedup"] = r["update_s"] / base["update_s"]
    report.data["sections"]["grpo"] = {
        "shape": {"model": args.model, **meta,
                  "prompts": args.prompts, "n": args.n, "max_tokens": args.max_tokens, "micro_batch": args.micro_batch,
                  "max_prompt_tokens": args.max_prompt_tokens, "prompt_tokens_min": min(prompt_lens),
                  "prompt_tokens_median": median(prompt_lens), "prompt_tokens_max": max(prompt_lens),
                  "data": str(args.data), "kl": 0.0, "lr": args.lr, "warmup_steps": args.warmup,
                  "steps": args.repeats},
        "isolation": "each peer in its own process (spawn), stepped in turn over a pipe",
        "ours_overrides": ours.info["overrides"],
        "ours_packed_overrides": packed[0] if args.ours_packed else None, "rows": rows_out}
