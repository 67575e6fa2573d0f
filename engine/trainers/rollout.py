"""The rollout part of the on-policy trainers (GRPO, PPO): the ``Generator`` on the policy's own weights, sampling
``num_generations`` completions per prompt, the old / reference log-probs of a rollout batch, and the metrics of a
rollout (rewards, lengths)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from engine.algorithms import make_batch, mixed_precision, response_logprobs
from engine.algorithms.packing import micro_batch, plan_micro_batches
from engine.algorithms.stats import nanmean
from engine.distributed import gather_lists, is_sharded, unsharded
from engine.generation import Generator, SamplingParams


def check_sampling(generation, section: str) -> None:
    """Raise ``ValueError`` before any work when ``generation.temperature <= 0``: the policy gradient needs samples
    from the policy (``section`` names the trainer in the message)."""
    if generation.temperature <= 0:
        raise ValueError(f"generation.temperature must be > 0 for {section.upper()}, got {generation.temperature}: "
                         "the policy gradient needs samples from the policy")


def check_prompts_per_step(section: str, prompts_per_step: int, train_examples: list) -> None:
    """Raise ``ValueError`` when ``prompts_per_step`` exceeds the training prompts: every step would draw some prompt
    twice, and its group would count twice in the batch's statistics."""
    if prompts_per_step > len(train_examples):
        raise ValueError(f"{section}.prompts_per_step={prompts_per_step} is more than the {len(train_examples)} "
                         "training prompts (after data.num_eval held out and prompts over data.max_prompt_tokens "
                         "left out): every step would draw some prompts twice; lower it or add prompts")


class Rollout:
    """Samples from ``model`` (the policy, read in place by the ``Generator``: no copy, no weight sync) with the
    ``generation`` settings (a ``GenerationConfig``), ``num_generations`` completions per prompt; ``rollout_is``
    (None, ``"token"`` or ``"sequence"``) asks for the trainer's own old log-probs."""

    def __init__(self, model, tokenizer, generation, *, num_generations: int, seed: int,
                 rollout_is: str | None = None):
        g = generation
        self.model, self.tokenizer, self.generation = model, tokenizer, g
        self.num_generations, self.seed, self.rollout_is = num_generations, seed, rollout_is
        # a sharded model's parameters are gathered anew for every rollout: no CUDA graph can keep their addresses
        self.generator = Generator(model, tokenizer, max_num_seqs=g.max_num_seqs,
                                   attention_backend=g.attention_backend,
                                   kv_cache_memory=g.kv_cache_memory_mb << 20 if g.kv_cache_memory_mb else None,
                                   enforce_eager=True if is_sharded(model) else None)

    def sample(self, examples: list, step: int, first: int = 0, attempt: int = 0) -> tuple[list, list]:
        """``num_generations`` completions per prompt, prompt ``i`` seeded by ``(seed, step, attempt, first + i)``
        (``first``: the index of this rank's first prompt in the step's global list, so that the samples do not
        depend on how many processes share the step; ``attempt``: the rollout's number within the step, for DAPO's
        dynamic sampling); returns (examples repeated per sample, completions in the same order). The model is in
        eval mode while sampling, its mode restored; a sharded model is gathered for it (every rank must call
        this)."""
        g, n = self.generation, self.num_generations
        base = (self.seed * 1_000_003 + step) * 4096 + first
        if attempt:  # a stream of its own, far from every step's first rollout
            digest = hashlib.blake2b(f"{self.seed},{step},{attempt}".encode(), digest_size=5).digest()
            base = (int.from_bytes(digest, "little") + (1 << 40)) * 4096 + first
        params = [SamplingParams(n=n, temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
                                 max_tokens=g.max_tokens, seed=base + i) for i in range(len(examples))]
        was_training = self.model.training
        self.model.eval()
        with unsharded(self.model):
            outs = self.generator.generate([e.prompt_ids for e in examples], params)
        self.model.train(was_training)
        per_sample = [e for e in examples for _ in range(n)]
        return per_sample, [c for o in outs for c in sorted(o.outputs, key=lambda c: c.index)]

    def batch(self, examples: list, completions: list, device):
        """The ``TokenBatch`` of prompt + completion rows (``make_batch``)."""
        return make_batch([e.prompt_ids for e in examples], [list(c.token_ids) for c in completions],
                          self.tokenizer.pad_token_id or 0, device)

    @staticmethod
    def rollout_logprobs(completions: list, batch) -> torch.Tensor:
        """``[B, T]`` float32: the generator's log-probs of the sampled tokens, 0 on padding (filled on the host, one
        copy to the device)."""
        out = torch.zeros(batch.labels.shape, dtype=torch.float32)
        for b, c in enumerate(completions):
            out[b, :len(c.logprobs)] = torch.tensor(c.logprobs)
        return out.to(batch.labels.device)

    @torch.no_grad()
    def old_and_ref_logprobs(self, batch, rollout_lp: torch.Tensor, ref_model, autocast_dtype, *,
                             on_policy: bool = False, max_tokens_per_micro_batch: int | None = None
                             ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Old log-probs: the generator's (same weights, same math) unless truncated sampling (top-p/top-k) makes
        them those of another distribution, or a rollout correction compares them with the generator's: then the
        trainer's. With ``on_policy`` (one update pass, which runs the rollout's weights) those are None instead: the
        update takes each micro-batch's own detached log-probs, and no forward is spent here. Reference log-probs of
        ``ref_model`` (None -> None). Both ``[B, T]`` float32, 0 on padding. ``max_tokens_per_micro_batch``: the
        forwards run packed, that many tokens at a time (``engine.algorithms.packing``), as the update does; None:
        one padded forward over the batch."""
        g = self.generation
        mask = batch.response_mask
        with mixed_precision(batch.input_ids.device.type, autocast_dtype):
            recompute = g.top_p < 1.0 or g.top_k > 0 or self.rollout_is is not None
            if recompute and on_policy:
                old = None
            elif recompute:
                old = _logprobs(self.model, batch, g.temperature, max_tokens_per_micro_batch)
            else:
                old = rollout_lp
            ref = None
            if ref_model is not None:
                ref = _logprobs(ref_model, batch, g.temperature, max_tokens_per_micro_batch).float() * mask
        return (None if old is None else old.float() * mask), ref


def _logprobs(model, batch, temperature: float, max_tokens_per_micro_batch: int | None) -> torch.Tensor:
    """``response_logprobs`` of the whole batch ``[B, T]``: one padded forward, or packed micro-batches of at most
    ``max_tokens_per_micro_batch`` tokens whose rows are written back in place."""
    if max_tokens_per_micro_batch is None:
        return response_logprobs(model, batch, temperature=temperature)
    out = torch.zeros(batch.labels.shape, dtype=torch.float32, device=batch.labels.device)
    for rows in plan_micro_batches(batch, 1, max_tokens_per_micro_batch):
        out[rows] = response_logprobs(model, micro_batch(batch, rows, max_tokens_per_micro_batch),
                                      temperature=temperature).float()
    return out


@dataclass
class RolloutSummary:
    """What the metrics of a rollout read, per sample, over the whole step (every rank's samples, in rank order):
    ``scores`` (total rewards), ``per_fn`` (``{name: [reward | None]}``), ``lengths`` (tokens) and ``truncated``
    (cut at ``max_tokens``)."""

    scores: list[float]
    per_fn: dict[str, list]
    lengths: list[int]
    truncated: list[bool]

    @classmethod
    def gather(cls, scores: list[float], completions: list, per_fn: dict | None = None) -> RolloutSummary:
        """This rank's samples joined with every other rank's (one ``all_gather_object``; none in a single
        process). Every rank gets the same summary."""
        names = list(per_fn or {})
        rows = [(float(s), [per_fn[n][i] for n in names], len(c.token_ids), c.finish_reason == "length")
                for i, (s, c) in enumerate(zip(scores, completions))]
        rows = gather_lists(rows)
        return cls([r[0] for r in rows], {n: [r[1][j] for r in rows] for j, n in enumerate(names)},
                   [r[2] for r in rows], [r[3] for r in rows])

    def metrics(self) -> dict[str, float]:
        """TRL's rollout metrics: ``reward`` (mean score), ``rewards/<fn>/mean`` per reward function,
        ``completions/mean_length`` (tokens) and ``completions/clipped_ratio`` (the fraction cut at
        ``max_tokens``)."""
        n = len(self.scores)
        return {
            "reward": torch.tensor(self.scores, dtype=torch.float32).mean().item(),
            **{f"rewards/{name}/mean": nanmean(vals) for name, vals in self.per_fn.items()},
            "completions/mean_length": sum(self.lengths) / n,
            "completions/clipped_ratio": sum(self.truncated) / n,
        }
