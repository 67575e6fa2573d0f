"""Shape functions ("fake" kernels) of the compiled ops, so that ``torch.compile`` can trace through them: the
outputs' shapes, dtypes and devices from the inputs' metadata, without computing anything (``torch.library
.register_fake``). Registered by ``kernels._extension`` once the libraries have loaded, for the ops that exist."""

from __future__ import annotations

import math

import torch

NSTAT_PPO = 9  # csrc/cpu/ppo_loss.cpp kNStat: tokens, loss, pg_loss, pg_clipfrac, pg_clipfrac_lower, ppo_kl, kl, low, high


def _f32(x: torch.Tensor, *shape: int) -> torch.Tensor:
    return x.new_empty(shape, dtype=torch.float32)


def _rows(logits: torch.Tensor) -> int:
    return math.prod(logits.shape[:-1])


FAKES = {
    "gae": lambda r, v, m, gamma, lam, skip: (_f32(r, *r.shape), _f32(r, *r.shape)),
    "discounted_returns": lambda r, m, gamma: _f32(r, *r.shape),
    "race_sample": lambda x, t, ka, kb: (x.new_empty((x.shape[0],), dtype=torch.int64), _f32(x, x.shape[0])),
    "logprobs_from_logits": lambda x, y, t, ignore: (_f32(x, _rows(x)), _f32(x, _rows(x)), _f32(x, 3, _rows(x))),
    "entropy_from_logits": lambda x, t: (_f32(x, _rows(x)), _f32(x, 3, _rows(x))),
    "logprobs_from_logits_backward": lambda x, y, dlp, dent, stats, t, ignore: torch.empty_like(
        x, memory_format=torch.contiguous_format),
    "ppo_loss": lambda lp, *rest: (_f32(lp, *lp.shape), _f32(lp, lp.shape[0], 1, NSTAT_PPO)),
    "loss_agg_rows": lambda stats, n_weighted, mode, n_tok, n_seq, scale: (_f32(stats, stats.shape[-1]),
                                                                          _f32(stats, stats.shape[0])),
    "paged_decode_attention": lambda q, *rest: (_f32(q, *q.shape), _f32(q, q.shape[0], q.shape[1])),
    "paged_prefill_attention": lambda q, *rest: _f32(q, *q.shape),
    "paged_prefix_attention": lambda q, *rest: (_f32(q, *q.shape), _f32(q, q.shape[0], q.shape[1])),
    "reshape_and_cache": lambda k, v, k_cache, v_cache, slots: None,
}


def register(namespace: str, present: set[str]) -> None:
    """Register the fake kernel of every op of ``FAKES`` that ``present`` holds (idempotent)."""
    for name, fn in FAKES.items():
        if name in present:
            torch.library.register_fake(f"{namespace}::{name}", fn, allow_override=True)
