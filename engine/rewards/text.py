"""Completions as text: reward functions receive either strings (standard format) or lists of chat messages
(conversational format, TRL's ``[{"role": "assistant", "content": "..."}]``); ``completion_text`` turns both into the
string the rule-based rewards read."""

from __future__ import annotations

from typing import Any


def completion_text(completion: Any) -> str:
    """The text of one completion.

    Args:
        completion: a ``str``, or a list of message dicts with a ``"content"`` field (TRL's conversational
            completions, usually one assistant message), or ``None`` (an empty completion).

    Returns the string itself, or the messages' contents joined in order (``""`` for ``None``).
    Raises ``TypeError`` for anything else, naming the type.
    """
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict) and "content" in completion:
        return str(completion["content"] or "")
    if isinstance(completion, (list, tuple)) and all(isinstance(m, dict) and "content" in m for m in completion):
        return "".join(str(m["content"] or "") for m in completion)
    raise TypeError(f"a completion must be a str or a list of {{'role', 'content'}} messages, "
                    f"got {type(completion).__name__}")
