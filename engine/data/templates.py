"""Prompt text for a policy: the tokenizer's chat template when it has one, else a plain text template.

The plain default is ``"Question: {prompt}\\nAnswer:"``, preceded by ``"{system}\\n\\n"`` when a system prompt is
given: short, and a base model continues it with an answer. Use ``RAW_TEMPLATE`` (``"{prompt}"``) to feed prompts
as they are (the arithmetic task's ``"123+45="``).

A chat template usually writes the BOS token itself: encode its output with ``add_special_tokens=False``.
"""

from __future__ import annotations

import re
from typing import Any

PLAIN_TEMPLATE = "Question: {prompt}\nAnswer:"
RAW_TEMPLATE = "{prompt}"
_PLACEHOLDER = re.compile(r"\{(prompt|system)\}")

R1_SYSTEM_PROMPT = (
    "A conversation between a user and an assistant. The user asks a question and the assistant solves it. "
    "The assistant first reasons step by step, then states the final answer. The reasoning is written between "
    "<think> and </think>, and the final answer between <answer> and </answer>, like this: "
    "<think> reasoning here </think><answer> final answer here </answer>."
)


def _messages(prompt: str | list[dict[str, Any]], system: str | None) -> list[dict[str, Any]]:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system is not None and not (messages and messages[0].get("role") == "system"):
        messages.insert(0, {"role": "system", "content": system})
    return messages


def format_prompt(tokenizer: Any, prompt: str | list[dict[str, Any]], *, system: str | None = None,
                  template: str | None = None) -> str:
    """The text a policy is prompted with.

    Args:
        tokenizer: a transformers tokenizer, or ``None`` (plain template only).
        prompt: the user's question, or a conversation (TRL's conversational format: a list of
            ``{"role", "content"}`` messages).
        system: a system prompt (for example ``R1_SYSTEM_PROMPT``), or ``None``. With a chat template it becomes a
            leading system message (unless the conversation already starts with one).
        template: ``None`` to use the tokenizer's chat template when it has one
            (``apply_chat_template(messages, add_generation_prompt=True, tokenize=False)``) and ``PLAIN_TEMPLATE``
            otherwise; or a plain template string, used even when the tokenizer has a chat template. Its
            ``{prompt}`` and ``{system}`` placeholders are replaced literally (no other ``str.format`` processing,
            so braces in the text are safe); without ``{system}``, a given system prompt is put first, followed by a
            blank line.

    Returns the prompt text (no tokenization). Raises ``ValueError`` for a template without ``{prompt}``, or for a
    conversation with no chat template to render it.
    """
    if template is None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(_messages(prompt, system), add_generation_prompt=True, tokenize=False)
    template = PLAIN_TEMPLATE if template is None else template
    if "{prompt}" not in template:
        raise ValueError(f"a prompt template must contain '{{prompt}}', got {template!r}")
    if not isinstance(prompt, str):
        raise ValueError(  # noqa: TRY004 - a supported type, but not without a chat template
            "a conversational prompt (a list of messages) needs a tokenizer with a chat template")
    if system is not None and "{system}" not in template:
        template = "{system}\n\n" + template
    values = {"prompt": prompt, "system": system or ""}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)  # one pass: a "{prompt}" in the system stays
