"""Our ``Generator`` as the rollout engine of TRL's ``GRPOTrainer``, through its ``rollout_func`` argument; and
(``use_fused_logprobs``, ``trl_lm_head.py``) our fused log-prob kernel as its LM head.

    from trl import GRPOConfig, GRPOTrainer
    from engine.integrations.trl import make_rollout_func, use_fused_logprobs

    trainer = GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=reward, train_dataset=dataset,
                          args=GRPOConfig(..., num_generations=8, max_completion_length=256, temperature=1.0),
                          rollout_func=make_rollout_func())
    use_fused_logprobs(trainer)   # optional: kernels.fused_linear_logprobs for every log-prob of TRL's loss
    trainer.train()

Tested with TRL 1.16.0 (transformers 5.24, torch 2.13, CPU). ``rollout_func`` is experimental in TRL: it warns once
(silence with ``TRL_EXPERIMENTAL_SILENCE=1``) and may change between TRL releases.

**What it does.** On its first call the rollout function builds a ``Generator`` on the trainer's model
(``trainer.accelerator.unwrap_model(trainer.model)``), which reads the parameter tensors in place: there is no copy
and no weight sync, so every rollout after an optimizer step samples from the new weights. Each call

- tokenizes the prompts as TRL does without a ``rollout_func`` (``tokenize_prompts``): conversational prompts
  (lists of ``{"role", "content"}`` messages) through the processing class's chat template with
  ``add_generation_prompt=True`` and ``GRPOConfig.chat_template_kwargs``; plain strings through the tokenizer;
- samples one completion per prompt it receives. TRL's sampler already repeats each prompt ``num_generations``
  times (``num_generations_eval`` in evaluation) before the prompts reach ``rollout_func``; each run of identical
  consecutive prompts becomes one request of ``n`` samples, so the group's prompt is prefilled once and its KV blocks
  are shared;
- maps ``temperature``, ``top_p``, ``top_k`` and ``max_completion_length`` to ``SamplingParams`` and stops on TRL's
  EOS ids (the tokenizer's EOS plus ``model.generation_config.eos_token_id``), with the model in eval mode (its mode
  is restored);
- seeds request ``i`` from ``(GRPOConfig.seed, process index, global step, mode, call number at that step)``, so a
  run is reproducible, independent of the global RNG, and the same after resuming from a checkpoint;
- returns ``{"prompt_ids", "completion_ids", "logprobs"}``: ``[B]`` lists of token ids and ``[B]`` lists of float
  log-probs of the sampled tokens (``B = len(prompts)``), in the order of ``prompts``.

**Settings it refuses** (``ValueError`` on the first call, naming each): ``repetition_penalty != 1``, ``min_p``,
``generation_kwargs``, ``temperature <= 0``, ``max_completion_length=None``, ``use_vllm=True`` (the Generator takes
vLLM's place), ``tools`` / ``environment_factory`` (TRL's tool loop would sample the follow-up turns with its own
backend), multimodal processors, and FSDP / DeepSpeed (the Generator reads whole parameter tensors; single process
and DDP work). Models: the Llama family the Generator runs (Llama, Qwen2/2.5, Qwen3, Mistral without a sliding
window), plain ``nn.Linear`` layers (merge LoRA adapters first).

**Log-probs.** The returned log-probs are those of the distribution each token was drawn from: logits / temperature,
then top-k, then top-p, renormalised (vLLM's ``processed_logprobs``), in float32. TRL recomputes log-probs as
``log_softmax(logits / temperature)``: with ``top_k=0`` and ``top_p=1`` (TRL's defaults) the two agree to ~1e-6 in
float32 (the test asserts 1e-4); with truncation on they differ on purpose, as vLLM's do. TRL 1.16 uses the rollout
log-probs (its ``sampling_per_token_logps``) only with ``use_vllm=True``: the importance-sampling correction and the
``sampling/sampling_logp_difference/{mean,max}`` and ``sampling/importance_sampling_ratio/*`` metrics are computed
under ``use_vllm and vllm_importance_sampling_correction`` alone, and ``use_vllm`` needs vLLM installed. Without vLLM
TRL keeps them in its batch (and reads them for ``off_policy_mask_threshold``); the test compares them with TRL's own
recomputation (``old_per_token_logps``, which TRL computes when ``gradient_accumulation_steps`` is not a multiple of
``steps_per_generation * num_iterations``) with TRL's formula for those metrics.

**TRL's loss path: what is and is not replaced.** TRL 1.16 offers no hook for the loss itself: ``GRPOTrainer.
compute_loss`` calls its own ``_compute_loss``, which does the policy loss inline in PyTorch for every ``loss_type``
(``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``, ``cispo``, ``sapo``, ``vespo``, ``luspo``) together with the entropy
mask, the off-policy mask, the IS correction, the entropy bonus, the MoE auxiliary loss and its metrics;
``transformers.Trainer``'s ``compute_loss_func`` is not consulted; and ``use_liger_kernel`` is deprecated there and
applies only Liger's layer kernels, not a loss. Replacing ``_compute_loss`` would mean a copy of it that drifts with
every TRL release; we do not. What TRL does allow is the log-prob path under that loss: every per-token log-prob and
entropy comes from the model's ``forward(..., fused_lm_head=True)``, a documented contract that TRL installs on the
model (``trl.trainer.utils.add_fused_lm_head``). ``use_fused_logprobs(trainer)`` (``engine/integrations/
trl_lm_head.py``) puts our ``kernels.fused_linear_logprobs`` behind that contract. So with both, TRL's rollouts are
our Generator's (its fused layer ops, paged attention and sampler) and its log-probs our fused kernel's; the loss
arithmetic on top of them stays TRL's.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np
from packaging.version import Version
from transformers import ProcessorMixin

from engine.generation import Generator, SamplingParams

try:
    import trl
    from trl.data_utils import is_conversational
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("engine.integrations.trl needs TRL: pip install 'trl>=1.16'") from err

if Version(trl.__version__) < Version("1.16"):  # pragma: no cover - depends on the environment
    raise ImportError(f"engine.integrations.trl needs trl>=1.16 (rollout_func's dict contract), "
                      f"found {trl.__version__}")

if TYPE_CHECKING:
    from trl import GRPOTrainer

from engine.integrations.trl_lm_head import use_fused_logprobs  # noqa: E402 - needs the version check above

__all__ = ["GeneratorRollout", "check_trainer", "make_rollout_func", "sampling_params", "tokenize_prompts",
           "use_fused_logprobs"]

_M63 = (1 << 63) - 1


def check_trainer(trainer: GRPOTrainer) -> None:
    """Raise ``ValueError`` listing every setting of ``trainer`` (and its ``GRPOConfig``) that the Generator cannot
    honour; see the module docstring."""
    args = trainer.args
    problems = []
    if args.repetition_penalty != 1.0:
        problems.append(f"repetition_penalty={args.repetition_penalty} (no repetition penalty: use 1.0)")
    if args.min_p:
        problems.append(f"min_p={args.min_p} (no min-p sampling: use None)")
    if args.generation_kwargs:
        problems.append(f"generation_kwargs={args.generation_kwargs!r} (only temperature, top_p, top_k and "
                        "max_completion_length are read)")
    if not args.temperature > 0:
        problems.append(f"temperature={args.temperature} (must be > 0: TRL divides the logits by it)")
    if args.max_completion_length is None:
        problems.append("max_completion_length=None (set a number of tokens)")
    if args.use_vllm:
        problems.append("use_vllm=True (the Generator replaces vLLM: set use_vllm=False)")
    if getattr(trainer, "tools", None) or getattr(trainer, "environment_factories", None):
        problems.append("tools / environment_factory (TRL's tool loop samples follow-up turns with its own backend)")
    if isinstance(trainer.processing_class, ProcessorMixin):
        problems.append(f"a multimodal processing class ({type(trainer.processing_class).__name__}): text only")
    if getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False):
        problems.append("FSDP / DeepSpeed (the Generator reads whole parameter tensors in place)")
    if problems:
        raise ValueError("the engine's rollout_func cannot honour these GRPOTrainer settings: " + "; ".join(problems))


def sampling_params(args, *, n: int, seed: int, stop_token_ids: list[int]) -> SamplingParams:
    """``SamplingParams`` of ``n`` samples from a ``GRPOConfig`` (``temperature``, ``top_p``, ``top_k``,
    ``max_completion_length``), stopping on ``stop_token_ids``; TRL's ``top_k=0`` and ``top_p=1.0`` mean off, as
    ours do."""
    return SamplingParams(n=n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k or 0,
                          max_tokens=args.max_completion_length, stop_token_ids=list(stop_token_ids), seed=seed)


def tokenize_prompts(prompts: list, processing_class, chat_template_kwargs: dict | None = None) -> list[list[int]]:
    """Token ids of each prompt as ``GRPOTrainer`` makes them without a ``rollout_func`` (its ``_tokenize_prompts``,
    text only): conversational prompts through the chat template with ``add_generation_prompt=True`` and
    ``chat_template_kwargs``, strings through the tokenizer (special tokens as it adds them)."""
    if is_conversational({"prompt": prompts[0]}):
        out = processing_class.apply_chat_template(conversation=prompts, add_generation_prompt=True, tokenize=True,
                                                   return_dict=True, **(chat_template_kwargs or {}))
    else:
        out = processing_class(text=prompts)
    return [list(map(int, ids)) for ids in out["input_ids"]]


def _runs(prompt_ids: list[list[int]], max_len: int) -> list[tuple[int, int]]:
    """``(start, length)`` of each run of identical consecutive prompts (TRL repeats a prompt ``num_generations``
    times in a row), split at ``max_len``."""
    runs: list[tuple[int, int]] = []
    for i, ids in enumerate(prompt_ids):
        if runs and runs[-1][1] < max_len and prompt_ids[runs[-1][0]] == ids:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


class GeneratorRollout:
    """TRL's ``RolloutFunc``: ``rollout(prompts, trainer) -> {"prompt_ids", "completion_ids", "logprobs"}``.

    Args:
        release_kv_cache: free the KV cache after each rollout, for the training phase (default True).
        **generator_kwargs: passed to ``Generator`` (``max_num_seqs``, ``max_model_len``, ``kv_cache_memory``,
            ``attention_backend``, ``block_size``, ...).

    Attributes: ``generator`` (None before the first call; rebuilt if the trainer's unwrapped model changes).
    """

    def __init__(self, *, release_kv_cache: bool = True, **generator_kwargs: Any):
        self.release_kv_cache = release_kv_cache
        self.generator_kwargs = generator_kwargs
        self.generator: Generator | None = None
        self._calls: Counter = Counter()  # rollouts so far per (global step, mode): part of the seed

    def _generator_for(self, trainer: GRPOTrainer) -> Generator:
        model = trainer.accelerator.unwrap_model(trainer.model)
        if self.generator is None or self.generator.model.hf_model is not model:
            check_trainer(trainer)
            # no tokenizer: nothing to decode, and TRL's EOS ids come in as stop_token_ids
            self.generator = Generator(model, None, **self.generator_kwargs)
        return self.generator

    def _seeds(self, trainer: GRPOTrainer, mode: str, count: int) -> list[int]:
        step = trainer.state.global_step
        call = self._calls[step, mode]
        self._calls[step, mode] += 1
        entropy = [int(trainer.args.seed), trainer.accelerator.process_index, step, mode == "eval", call]
        return [int(s) & _M63 for s in np.random.SeedSequence(entropy).generate_state(count, np.uint64)]

    def __call__(self, prompts: list, trainer: GRPOTrainer) -> dict[str, list]:
        """One completion per entry of ``prompts`` (``[B]``, TRL's per-process slice, each prompt already repeated
        per generation). Returns ``prompt_ids``, ``completion_ids`` (``[B]`` lists of ints) and ``logprobs`` (``[B]``
        lists of floats, one per completion token)."""
        generator = self._generator_for(trainer)
        model = generator.model.hf_model
        mode = "train" if trainer.model.training else "eval"
        prompt_ids = tokenize_prompts(prompts, trainer.processing_class, trainer.args.chat_template_kwargs)
        runs = _runs(prompt_ids, generator.max_num_seqs)
        seeds = self._seeds(trainer, mode, len(runs))
        params = [sampling_params(trainer.args, n=length, seed=seed, stop_token_ids=trainer.eos_token_ids)
                  for (_, length), seed in zip(runs, seeds)]
        was_training = model.training
        model.eval()
        try:
            outs = generator.generate([prompt_ids[start] for start, _ in runs], params)
        finally:
            model.train(was_training)
            if self.release_kv_cache:
                generator.release_kv_cache()
        completion_ids: list[list[int]] = []
        logprobs: list[list[float]] = []
        for out in outs:
            for c in sorted(out.outputs, key=lambda c: c.index):
                completion_ids.append(list(c.token_ids))
                logprobs.append(list(c.logprobs))
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": logprobs}


def make_rollout_func(**kwargs: Any) -> GeneratorRollout:
    """A ``GeneratorRollout(**kwargs)`` to pass as ``GRPOTrainer(rollout_func=...)``."""
    return GeneratorRollout(**kwargs)
