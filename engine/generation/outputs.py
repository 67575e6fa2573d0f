"""What ``Generator.generate`` returns (vLLM's names): one ``RequestOutput`` per prompt, holding one
``CompletionOutput`` per sample."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

FinishReason = Literal["stop", "length", "abort"]
FINISH_REASONS = ("stop", "length", "abort")


@dataclass
class CompletionOutput:
    """One sample (completion) of a prompt."""

    index: int
    """Which of the request's ``n`` samples this is (0-based)."""
    token_ids: list[int]
    """``[T]`` generated token ids, the stop token included when the sample stopped on one."""
    logprobs: list[float]
    """``[T]`` log-prob of each generated token under the distribution it was sampled from (after temperature,
    top-k, top-p, renormalised; greedy: log-softmax of the raw logits), computed in float32."""
    finish_reason: FinishReason
    """"stop" (EOS or a stop token), "length" (``max_tokens`` or the model's length) or "abort" (cancelled)."""
    text: str | None = None
    """The detokenised ``token_ids`` (special tokens skipped) when the generator has a tokenizer, else None."""

    def __post_init__(self) -> None:
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"CompletionOutput.finish_reason must be one of {FINISH_REASONS}, "
                             f"got {self.finish_reason!r}")
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(f"CompletionOutput.logprobs must have one entry per token ({len(self.token_ids)}), "
                             f"got {len(self.logprobs)}")

    @property
    def cumulative_logprob(self) -> float:
        """Sum of ``logprobs``: the log-prob of the whole completion given the prompt (0.0 when empty)."""
        return math.fsum(self.logprobs)


@dataclass
class RequestOutput:
    """The result of one prompt: its ``n`` samples, in sample order."""

    request_id: int | str
    """The id ``add_request`` returned (``generate`` numbers prompts from 0 in input order)."""
    prompt_token_ids: list[int]
    """The prompt, as given."""
    outputs: list[CompletionOutput]
    """``[n]`` samples, ``outputs[i].index == i``."""
    finished: bool = True
    """Every sample has ended (always true for what ``generate`` returns)."""
