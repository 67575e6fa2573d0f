"""How to sample the completions of one prompt (vLLM's ``SamplingParams`` names and meanings, a subset of them)."""

from __future__ import annotations

import math
from dataclasses import dataclass


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class SamplingParams:
    """Sampling settings of a request; every field is checked when constructed (``ValueError`` naming the field).

    The sampler processes the logits of a row in this order: ``/ temperature``, top-k, top-p, renormalise; it draws
    from that distribution and returns the token's log-prob under it (``engine.generation.sampler.sample``).
    """

    n: int = 1
    """Samples (completions) per prompt: the group size of GRPO. They share the prompt's KV blocks."""
    temperature: float = 1.0
    """Divides the logits before softmax; 0 means greedy (argmax of the raw logits)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of most likely tokens whose probability mass is >= top_p (always at
    least one token); 1 keeps all. In (0, 1]."""
    top_k: int = 0
    """Keep the k most likely tokens (ties at the k-th value kept too); 0 or -1 means off (stored as 0)."""
    max_tokens: int = 16
    """Most tokens generated per sample; a sample that reaches it ends with ``finish_reason="length"``."""
    stop_token_ids: list[int] | None = None
    """Token ids that end a sample (``finish_reason="stop"``, the token is kept in the output), in addition to the
    tokenizer's EOS ids, which the generator adds unless ``ignore_eos``."""
    ignore_eos: bool = False
    """Do not stop at the tokenizer's EOS ids (``stop_token_ids`` still stop); for benchmarks of fixed length."""
    seed: int | None = None
    """Seed of the request's sampling noise: sample ``i`` of the group draws with ``child_seed(seed, i)``, so the
    output does not depend on which other requests share a batch. None: the generator draws one (``make_seed``)."""

    def __post_init__(self) -> None:
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"SamplingParams.n must be an int >= 1, got {self.n!r}")
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be a finite number >= 0 (0 = greedy), "
                             f"got {self.temperature!r}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:  # NaN fails the comparison
            raise ValueError(f"SamplingParams.top_p must be a number in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"SamplingParams.top_k must be an int >= -1 (0 or -1 = off), got {self.top_k!r}")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if self.stop_token_ids is not None:
            ids = list(self.stop_token_ids) if isinstance(self.stop_token_ids, (list, tuple)) else None
            if ids is None or not all(_is_int(t) and t >= 0 for t in ids):
                raise ValueError(f"SamplingParams.stop_token_ids must be a list of non-negative ints or None, "
                                 f"got {self.stop_token_ids!r}")
            self.stop_token_ids = ids
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"SamplingParams.ignore_eos must be a bool, got {self.ignore_eos!r}")  # noqa: TRY004 - the contract: ValueError naming the field
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"SamplingParams.seed must be an int or None, got {self.seed!r}")
        self.temperature = float(self.temperature)
        self.top_p = float(self.top_p)
        if self.top_k == -1:
            self.top_k = 0

    @property
    def greedy(self) -> bool:
        """Temperature 0: every token is the argmax (top-k/top-p are then irrelevant)."""
        return self.temperature == 0

    @property
    def uses_top_k(self) -> bool:
        """Top-k truncation is on (the sampler must sort this row's logits)."""
        return self.top_k > 0 and not self.greedy

    @property
    def uses_top_p(self) -> bool:
        """Top-p truncation is on (the sampler must sort this row's logits)."""
        return self.top_p < 1 and not self.greedy
