"""The generator's bookkeeping: a ``Request`` (one prompt, ``n`` samples) and its ``Sequence``s (one per sample)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from engine.generation.sampling_params import SamplingParams


class SequenceStatus(Enum):
    """Where a sample is in its life: waiting for a prefill, running (decoding), or finished."""

    WAITING = "waiting"  # needs a prefill: a new request's prompt, or a preempted sample's prompt + output
    RUNNING = "running"  # its K/V is cached except for the last sampled token, which the next decode step feeds
    FINISHED = "finished"


@dataclass
class Sequence:
    """One sample of a request: the prompt plus the tokens generated so far, with their log-probs."""

    seq_id: int
    request_id: int | str
    index: int
    """Which of the request's ``n`` samples this is."""
    token_ids: list[int]
    """Prompt followed by the generated tokens."""
    prompt_len: int
    seed: int
    """Counter-based sampling seed of this sample (the noise of token t depends on (seed, t) only)."""
    params: SamplingParams
    logprobs: list[float] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    def __len__(self) -> int:
        return len(self.token_ids)


@dataclass
class Request:
    """A prompt and its ``n`` samples. Its ``Sequence``s exist from the start; before the prompt is prefilled they are
    all WAITING and only the first one is scheduled (the others are forked from it after the prefill)."""

    request_id: int | str
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    prefilled: bool = False

    @property
    def finished(self) -> bool:
        return all(s.status is SequenceStatus.FINISHED for s in self.seqs)
