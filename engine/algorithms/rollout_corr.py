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

The correction (``RolloutCorrection``; veRL ``rollout_corr``, slime TIS/OPSM, NeMo ``tis``/``icepop``/``seq-mask-tis``,
OpenRLHF ``vllm_is_correction_type``): importance weights ``w = pi_old / pi_rollout`` of the sampled tokens, per token
(``w_t = exp(old_t - q_t)``) or per sequence (the geometric mean ``w_i = exp(mean_t(old_t - q_t))``), each either
truncated (the token losses are multiplied by ``min(w, cap)``: TIS, Yao et al. 2025) or masking (tokens / sequences
with ``w`` outside ``[low, high]`` get weight 0, the others 1: icepop / seq-mask-tis; they stay in the loss's
token and sequence counts, as in NeMo and OpenRLHF, so that the weights of one micro-batch need nothing from the
others). Its metrics, over the raw weights (token means for token weights, sequence means for sequence weights):

    rollout_corr/is_weight_mean   mean of w (before truncation or masking)
    rollout_corr/is_weight_max    max of w
    rollout_corr/truncated_frac   fraction of weights above the cap (truncate mode)
    rollout_corr/masked_frac      fraction of weights outside [low, high], dropped (mask mode)
"""

from __future__ import annotations

import torch

from engine.distributed.context import all_reduce_max, all_reduce_sum

ROLLOUT_IS_LEVELS = ("token", "sequence")
ROLLOUT_IS_MODES = ("truncate", "mask")


class RolloutCorrection:
    """The rollout correction weights of one configuration: ``level`` ("token" or "sequence"), ``mode``
    ("truncate" or "mask"), the upper bound ``cap`` (the truncation cap, or the mask's upper bound; > 0) and the
    mask's lower bound ``low`` (>= 0, below ``cap``). Raises ``ValueError`` naming a bad argument.

    ``weights`` returns what multiplies the token losses (``kernels.ppo_loss``'s ``rollout_is_weights``) and adds
    the weights' statistics to its running sums; ``metrics`` reads them out (one host sync)."""

    def __init__(self, level: str, mode: str = "truncate", cap: float = 2.0, low: float = 0.0):
        if level not in ROLLOUT_IS_LEVELS:
            raise ValueError(f"rollout_is must be one of {ROLLOUT_IS_LEVELS}, got {level!r}")
        if mode not in ROLLOUT_IS_MODES:
            raise ValueError(f"rollout_is_mode must be one of {ROLLOUT_IS_MODES}, got {mode!r}")
        if not cap > 0:
            raise ValueError(f"rollout_is_cap must be > 0, got {cap}")
        if mode == "mask" and not 0 <= low < cap:
            raise ValueError(f"rollout_is_low must be in [0, rollout_is_cap={cap}) for mode 'mask', got {low}")
        self.level, self.mode, self.cap, self.low = level, mode, float(cap), float(low)
        self._sums: dict[str, torch.Tensor] = {}
        self._max: torch.Tensor | None = None

    @classmethod
    def from_config(cls, cfg) -> RolloutCorrection | None:
        """The correction asked for by a ``PolicyLossConfig`` (``rollout_is``, ``rollout_is_mode``,
        ``rollout_is_cap``, ``rollout_is_low``), or None when ``rollout_is`` is null."""
        if not getattr(cfg, "rollout_is", None):
            return None
        return cls(cfg.rollout_is, getattr(cfg, "rollout_is_mode", "truncate"), cfg.rollout_is_cap,
                   getattr(cfg, "rollout_is_low", 0.0))

    @torch.no_grad()
    def weights(self, old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor,
                response_mask: torch.Tensor) -> torch.Tensor:
        """``[b, T]`` (token level) or ``[b]`` (sequence level) float32 weights from the trainer's ``old_logprobs``
        and the generator's ``rollout_logprobs`` ``[b, T]`` over ``response_mask``; masked positions are never read
        (``torch.where``: NaN or -inf there changes nothing) and a row without response tokens gets weight 1."""
        mask = response_mask.bool()
        log_ratio = torch.where(mask, old_logprobs.detach().double() - rollout_logprobs.detach().double(), 0.0)
        if self.level == "token":
            raw, valid = log_ratio.exp(), mask
        else:
            raw, valid = (log_ratio.sum(-1) / mask.sum(-1).clamp_min(1)).exp(), mask.any(-1)
        if self.mode == "truncate":
            out, dropped = raw.clamp(max=self.cap), raw > self.cap
        else:
            keep = (raw >= self.low) & (raw <= self.cap)
            out, dropped = keep.double(), ~keep
        zero = torch.zeros((), dtype=torch.float64, device=raw.device)
        parts = {"n": valid.sum().double(), "w": torch.where(valid, raw, zero).sum(),
                 "dropped": (dropped & valid).sum().double()}
        for name, value in parts.items():
            self._sums[name] = self._sums.get(name, zero) + value
        worst = torch.where(valid, raw, zero).max() if raw.numel() else zero
        self._max = worst if self._max is None else torch.maximum(self._max, worst)
        return out.float()

    def metrics(self) -> dict[str, float]:
        """``rollout_corr/is_weight_mean|max`` and ``truncated_frac`` (truncate) or ``masked_frac`` (mask) of every
        weight computed so far, over every rank's rows; an empty dict before the first ``weights``."""
        if not self._sums:
            return {}
        s = all_reduce_sum({k: float(v) for k, v in self._sums.items()})
        worst = all_reduce_max({"max": float(self._max)})["max"]
        n = max(s["n"], 1.0)
        frac = "rollout_corr/truncated_frac" if self.mode == "truncate" else "rollout_corr/masked_frac"
        return {"rollout_corr/is_weight_mean": s["w"] / n, "rollout_corr/is_weight_max": worst, frac: s["dropped"] / n}


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


__all__ = ["ROLLOUT_IS_LEVELS", "ROLLOUT_IS_MODES", "RolloutCorrMetrics", "RolloutCorrection"]
