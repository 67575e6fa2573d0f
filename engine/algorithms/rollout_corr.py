"""The rollout/trainer mismatch: how far the generator's log-probs of the sampled tokens are from the trainer's.

The generator and the trainer run the same weights through different code (paged-KV decode vs the padded training
forward, other kernels, other reduction orders, bf16 vs float32): their log-probs of the same tokens differ, and a
large gap makes the "on-policy" update off-policy (Liu, Li et al. 2025, "When Speed Kills Stability"). The first
pass of a policy update runs with exactly the rollout's weights, so its detached log-probs ARE the trainer's
log-probs of the sampled tokens: measuring the gap there costs no extra forward.

Metrics (veRL's ``rollout_corr/*`` names; ``lp`` = trainer, ``q`` = rollout log-probs, ``d = lp - q``; token means
over the response tokens, sequence means over the sequences with at least one token):

    rollout_corr/logp_diff_mean   token mean of |d|
    rollout_corr/logp_diff_max    max |d|
    rollout_corr/kl               token mean of -d = q - lp        (k1 estimate of KL(rollout || trainer))
    rollout_corr/k3_kl            token mean of exp(d) - 1 - d     (k3, Schulman 2020; >= 0, same KL)
    rollout_corr/training_ppl     sequence mean of exp(-token mean of lp)
    rollout_corr/rollout_ppl      sequence mean of exp(-token mean of q)
    rollout_corr/ppl_ratio        sequence mean of training_ppl / rollout_ppl of the sequence
"""

from __future__ import annotations

import torch

from engine.distributed.context import all_reduce_max, all_reduce_sum


class RolloutCorrMetrics:
    """Accumulates the mismatch over micro-batches (``add``), reads it out once (``metrics``: one host sync)."""

    def __init__(self):
        self._sums: dict[str, torch.Tensor] = {}
        self._max: torch.Tensor | None = None

    @torch.no_grad()
    def add(self, logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, response_mask: torch.Tensor) -> None:
        """Add one micro-batch: ``logprobs`` (the trainer's, at the rollout's weights), ``rollout_logprobs`` (the
        generator's) and ``response_mask``, all ``[b, T]``. Masked positions are never read (``torch.where``), so
        padding holding NaN changes nothing."""
        mask = response_mask.bool()
        zero = torch.zeros((), dtype=torch.float64, device=logprobs.device)
        lp = torch.where(mask, logprobs.detach().double(), zero)
        q = torch.where(mask, rollout_logprobs.detach().double(), zero)
        d = lp - q
        n_tok = mask.sum(-1)
        has = n_tok > 0
        per_seq = n_tok.clamp_min(1).double()
        log_ppl_train, log_ppl_rollout = -lp.sum(-1) / per_seq, -q.sum(-1) / per_seq
        parts = {
            "tokens": n_tok.sum().double(),
            "seqs": has.sum().double(),
            "abs": d.abs().sum(),
            "k1": (-d).sum(),
            "k3": torch.where(mask, torch.expm1(d) - d, zero).sum(),
            "training_ppl": torch.where(has, log_ppl_train.exp(), zero).sum(),
            "rollout_ppl": torch.where(has, log_ppl_rollout.exp(), zero).sum(),
            "ppl_ratio": torch.where(has, (log_ppl_train - log_ppl_rollout).exp(), zero).sum(),
        }
        for name, value in parts.items():
            self._sums[name] = self._sums.get(name, zero) + value
        batch_max = d.abs().max() if d.numel() else zero
        self._max = batch_max if self._max is None else torch.maximum(self._max, batch_max)

    def metrics(self) -> dict[str, float]:
        """The ``rollout_corr/*`` metrics of everything added (an empty dict when nothing was)."""
        if not self._sums:
            return {}
        s = all_reduce_sum({k: float(v) for k, v in self._sums.items()})  # under torchrun: over every rank's rows
        worst = all_reduce_max({"max": float(self._max)})["max"]
        tok, seq = max(s["tokens"], 1.0), max(s["seqs"], 1.0)
        return {
            "rollout_corr/logp_diff_mean": s["abs"] / tok,
            "rollout_corr/logp_diff_max": worst,
            "rollout_corr/kl": s["k1"] / tok,
            "rollout_corr/k3_kl": s["k3"] / tok,
            "rollout_corr/training_ppl": s["training_ppl"] / seq,
            "rollout_corr/rollout_ppl": s["rollout_ppl"] / seq,
            "rollout_corr/ppl_ratio": s["ppl_ratio"] / seq,
        }


__all__ = ["RolloutCorrMetrics"]
