"""What the on-policy trainers (GRPO, PPO) share: the generator on the policy's own weights, rollouts of
``num_generations`` samples per prompt, and the old / reference log-probs of a rollout batch."""

from __future__ import annotations

import torch

from engine.algorithms import response_logprobs
from engine.generation import Generator, SamplingParams
from engine.trainers.base import BaseTrainer


class RolloutTrainer(BaseTrainer):
    """What the on-policy trainers (GRPO, PPO) share: the ``Generator`` on the policy's own weights, sampling
    ``num_generations`` completions per prompt, and the old / reference log-probs of a rollout batch. Subclasses set
    ``algo`` (the config section with ``num_generations`` and ``rollout_is``)."""

    algo = ""

    def __init__(self, cfg, *, model=None, tokenizer=None):
        if cfg.generation.temperature <= 0:
            raise ValueError(f"generation.temperature must be > 0 for {self.kind.upper()}, got "
                             f"{cfg.generation.temperature}: the policy gradient needs samples from the policy")
        super().__init__(cfg, model=model, tokenizer=tokenizer)
        g = cfg.generation
        self.generator = Generator(self.model, self.tokenizer, max_num_seqs=g.max_num_seqs,
                                   attention_backend=g.attention_backend,
                                   kv_cache_memory=g.kv_cache_memory_mb << 20 if g.kv_cache_memory_mb else None)
        self.eval_max_tokens = g.max_tokens

    @property
    def algo_cfg(self):
        return getattr(self.cfg, self.algo)

    def prepare_examples(self) -> None:
        """The tokenized prompts; raises ``ValueError`` when ``prompts_per_step`` exceeds their number (every step
        would draw some prompt twice, and its group would count twice in the batch's statistics)."""
        super().prepare_examples()
        want, have = self.algo_cfg.prompts_per_step, len(self.train_examples)
        if want > have:
            raise ValueError(f"{self.algo}.prompts_per_step={want} is more than the {have} training prompts (after "
                             "data.num_eval held out and prompts over data.max_prompt_tokens left out): every step "
                             "would draw some prompts twice; lower it or add prompts")

    def rollout(self, examples: list, step: int) -> tuple[list, list]:
        """Sample ``num_generations`` completions per prompt, seeded by ``(trainer.seed, step)``; returns (examples
        repeated per sample, completions in the same order)."""
        g, n = self.cfg.generation, self.algo_cfg.num_generations
        base = (self.cfg.trainer.seed * 1_000_003 + step) * 4096
        params = [SamplingParams(n=n, temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
                                 max_tokens=g.max_tokens, seed=base + i) for i in range(len(examples))]
        was_training = self.model.training
        self.model.eval()
        outs = self.generator.generate([e.prompt_ids for e in examples], params)
        self.model.train(was_training)
        per_sample = [e for e in examples for _ in range(n)]
        return per_sample, [c for o in outs for c in sorted(o.outputs, key=lambda c: c.index)]

    def rollout_logprobs(self, completions: list, batch) -> torch.Tensor:
        """``[B, T]`` float32: the generator's log-probs of the sampled tokens, 0 on padding (filled on the host, one
        copy to the device)."""
        out = torch.zeros(batch.labels.shape, dtype=torch.float32)
        for b, c in enumerate(completions):
            out[b, :len(c.logprobs)] = torch.tensor(c.logprobs)
        return out.to(self.device)

    @torch.no_grad()
    def old_and_ref_logprobs(self, batch, rollout_lp) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Old log-probs: the generator's (same weights, same math) unless truncated sampling (top-p/top-k) makes
        them those of another distribution, then the trainer's; always recomputed with the trainer's forward when a
        rollout-IS correction is asked for. Reference log-probs when there is a reference model (else None). Both
        float32, 0 on padding."""
        g = self.cfg.generation
        mask = batch.response_mask
        with torch.autocast(self.device.type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None):
            recompute = g.top_p < 1.0 or g.top_k > 0 or self.algo_cfg.rollout_is is not None
            old = response_logprobs(self.model, batch, temperature=g.temperature) if recompute else rollout_lp
            ref = None
            if self.ref_model is not None:
                ref = response_logprobs(self.ref_model, batch, temperature=g.temperature).float() * mask
        return old.float() * mask, ref
