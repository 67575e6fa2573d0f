"""The rollout generator: paged KV cache shared by the samples of a group, continuous batching, a sampler that returns
the log-prob of every token it draws. Public API (vLLM's vocabulary): ``Generator``, ``SamplingParams``,
``RequestOutput``, ``CompletionOutput``."""

from engine.generation.generator import Generator
from engine.generation.outputs import CompletionOutput, RequestOutput
from engine.generation.sampling_params import SamplingParams

__all__ = ["CompletionOutput", "Generator", "RequestOutput", "SamplingParams"]
