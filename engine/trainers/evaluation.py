"""Held-out evaluation: greedy completions of the evaluation prompts, scored by the accuracy and format rewards."""

from __future__ import annotations

from engine.generation import SamplingParams
from engine.rewards import accuracy_reward, format_reward


def evaluate_accuracy(generator, tokenizer, examples: list, *, max_tokens: int) -> dict[str, float]:
    """``{"eval/accuracy", "eval/format", "eval/mean_length"}`` over ``examples`` (``engine.data.tasks.Example`` with an
    ``answer`` column), greedy decoding through ``generator`` (the policy's own weights)."""
    if not examples:
        return {}
    outs = generator.generate([e.prompt_ids for e in examples], SamplingParams(temperature=0.0,
                                                                                max_tokens=max_tokens))
    texts = [tokenizer.decode(o.outputs[0].token_ids, skip_special_tokens=True) for o in outs]
    prompts = [e.record["prompt"] for e in examples]
    acc = accuracy_reward(prompts, texts, answer=[e.record.get("answer") for e in examples])
    fmt = format_reward(prompts, texts)
    acc = [a for a in acc if a is not None]
    return {
        "eval/accuracy": sum(acc) / max(len(acc), 1),
        "eval/format": sum(fmt) / len(fmt),
        "eval/mean_length": sum(len(o.outputs[0].token_ids) for o in outs) / len(outs),
    }
