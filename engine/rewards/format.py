"""Format rewards: does a completion follow the DeepSeek-R1 layout ``<think>...</think><answer>...</answer>``?"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from engine.rewards.text import completion_text

# Text containing none of the four tags: so a second, nested or stray tag fails the match instead of being absorbed
# by a lazy ``.*?`` (``<answer>1</answer><answer>2</answer>`` would otherwise match with content ``1</answer>...``).
_NO_TAG = r"(?:(?!</?think>|</?answer>).)*"
R1_FORMAT = re.compile(rf"\s*<think>({_NO_TAG})</think>\s*<answer>({_NO_TAG})</answer>\s*", re.DOTALL)
_ANSWER_PAIR = re.compile(rf"<answer>{_NO_TAG}</answer>", re.DOTALL)


def format_reward(prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float]:
    """1.0 for each completion in the R1 format, else 0.0 (TRL reward signature).

    The format, matched against the whole completion (``re.DOTALL``): optional whitespace, ``<think>`` reasoning
    ``</think>``, optional whitespace, ``<answer>`` a non-blank answer ``</answer>``, and nothing but whitespace after.
    The reasoning may be empty (``<think></think>``); neither part may contain any of the four tags, so repeated,
    nested or stray tags score 0.0.

    Args:
        prompts: ``(B,)`` the prompts (unused).
        completions: ``(B,)`` strings or conversational message lists.
        **columns: dataset columns (ignored).

    Returns ``(B,)`` floats in ``{0.0, 1.0}``.
    """
    rewards = []
    for completion in completions:
        m = R1_FORMAT.fullmatch(completion_text(completion))
        rewards.append(1.0 if m is not None and m.group(2).strip() else 0.0)
    return rewards


def answer_tag_reward(prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float]:
    """1.0 for each completion holding exactly one ``<answer>...</answer>`` pair and no other answer tag, else 0.0
    (a looser format check than ``format_reward``: no ``<think>`` needed, text around the pair allowed).

    Args and returns as ``format_reward``.
    """
    rewards = []
    for completion in completions:
        text = completion_text(completion)
        pairs = _ANSWER_PAIR.findall(text)
        single = len(pairs) == 1 and text.count("<answer>") == 1 and text.count("</answer>") == 1
        rewards.append(1.0 if single else 0.0)
    return rewards
