"""Math answer checking: extract the final answer of a completion, normalise numbers, and the accuracy reward.

Where the answer is read from, in priority order (``extract_answer``):

1. the last ``<answer>...</answer>`` pair (DeepSeek-R1 format); a ``\\boxed{}`` inside it is unwrapped;
2. the last complete ``\\boxed{...}`` (nested braces allowed: ``\\boxed{\\frac{3}{4}}`` gives ``\\frac{3}{4}``);
3. GSM8K's ``#### N`` (the text after the last ``####`` on its line);
4. only with ``fallback_last_number=True``: the last number in the text (off by default: a model that is rewarded
   for any trailing number learns to end with guesses, not with a stated answer).

Numbers are compared exactly as rationals (``normalize_number``): ``1,234`` = ``1234.00`` = ``$1,234``,
``3/4`` = ``0.75`` = ``\\frac{3}{4}``, ``50%`` = ``50`` (the percent sign is dropped, the value is not divided by 100).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any

from engine.rewards.text import completion_text

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_BOXED_START = re.compile(r"\\(?:boxed|fbox)\s*\{")
_GSM8K = re.compile(r"####([^\n]*)")
# Last-number fallback: optional sign and dollar, thousands groups or plain digits, decimals, a fraction, a percent.
_ANY_NUMBER = re.compile(r"[-+]?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?%?")

_LATEX_FRAC = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")
_DROP = re.compile(r"\\[!,;: ]|\\\$|\\%|\$|%|\s+")  # LaTeX spaces, escaped/plain dollars and percents, whitespace
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")
_DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_MAX_EXPONENT = 1000  # |log10| beyond this is refused rather than expanded into a huge integer


def _boxed_contents(text: str) -> list[tuple[int, int, str]]:
    """(end, start, content) of every ``\\boxed{...}`` whose braces close, in order of their start."""
    found = []
    for m in _BOXED_START.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found.append((i, m.start(), text[m.end():i - 1]))
    return found


def _last_boxed(text: str) -> str | None:
    """The content of the ``\\boxed{}`` that closes last (the outer one when nested), unwrapped until no box is
    left (``\\boxed{\\boxed{5}}`` gives ``5``); ``None`` if there is no complete box."""
    boxes = _boxed_contents(text)
    if not boxes:
        return None
    content = max(boxes)[2].strip()
    if any(start == 0 and end == len(content) for end, start, _ in _boxed_contents(content)):
        return _last_boxed(content)
    return content


def extract_answer(text: Any, *, fallback_last_number: bool = False) -> str | None:
    """The final answer stated in ``text`` (a completion, or a ground-truth solution), stripped; ``None`` if none.

    Sources in priority order: the last ``<answer>...</answer>`` (an empty pair gives ``None``; a ``\\boxed{}``
    inside is unwrapped), the last complete ``\\boxed{...}``, the last GSM8K ``#### N``, and, only when
    ``fallback_last_number`` is true, the last number in the text. An unclosed ``<answer>`` or ``\\boxed{`` (a
    truncated completion) is not an answer. ``text`` may be a conversational completion (see ``completion_text``).
    """
    text = completion_text(text)
    tags = _ANSWER_TAG.findall(text)
    if tags:
        content = tags[-1].strip()
        boxed = _last_boxed(content)
        content = boxed if boxed is not None else content
        return content or None
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed or None
    marks = _GSM8K.findall(text)
    if marks:
        return marks[-1].strip() or None
    if fallback_last_number:
        numbers = _ANY_NUMBER.findall(text)
        if numbers:
            return numbers[-1]
    return None


def _to_fraction(s: str) -> Fraction | None:
    """A decimal string (no thousands separators) as an exact ``Fraction``; ``None`` if it is not one."""
    if not _DECIMAL.fullmatch(s):
        return None
    try:
        d = Decimal(s)
    except InvalidOperation:  # pragma: no cover - the regex admits only valid literals
        return None
    if not d.is_finite() or (d != 0 and abs(d.adjusted()) > _MAX_EXPONENT):
        return None
    return Fraction(d)


def _canonical(f: Fraction) -> str:
    """Integers as ``"-12"``, terminating decimals as ``"0.75"`` (no trailing zeros), others as ``"1/3"``."""
    if f.denominator == 1:
        return str(f.numerator)
    den, twos, fives = f.denominator, 0, 0
    while den % 2 == 0:
        den, twos = den // 2, twos + 1
    while den % 5 == 0:
        den, fives = den // 5, fives + 1
    if den != 1:
        return f"{f.numerator}/{f.denominator}"
    k = max(twos, fives)
    digits = str(abs(f.numerator) * 10**k // f.denominator).rjust(k + 1, "0")
    return ("-" if f < 0 else "") + digits[:-k] + "." + digits[-k:].rstrip("0")


def normalize_number(s: Any) -> str | None:
    """A canonical string for the number written in ``s``, or ``None`` if ``s`` is not a number.

    Accepted: surrounding and inner whitespace, ``$`` / ``\\$`` anywhere (``-$5`` and ``$-5``), a leading ``+``, a
    trailing ``.`` (``72.``), a ``%`` sign (dropped: ``50%`` gives ``"50"``), commas only as thousands separators
    (``1,234.5``; ``1,23`` is not a number), exponents (``1e3``), fractions ``a/b`` and ``\\frac{a}{b}`` of such
    numbers. The value is exact (``Fraction``), so equal numbers give equal strings: ``"1234.00"`` -> ``"1234"``,
    ``"3.50"`` -> ``"3.5"``, ``"-0"`` -> ``"0"``, ``"6/8"`` and ``"0.75"`` -> ``"0.75"``, ``"2/6"`` -> ``"1/3"``
    (non-terminating fractions stay ``p/q`` in lowest terms). A zero denominator gives ``None``.
    """
    if s is None:
        return None
    t = _LATEX_FRAC.sub(r"\1/\2", str(s))
    t = _DROP.sub("", t)
    if t.endswith(".") and not _DECIMAL.fullmatch(t):  # a sentence's full stop: "5.5." (a bare "72." is valid)
        t = t[:-1]
    if "," in t:
        if not _THOUSANDS.fullmatch(t):
            return None
        t = t.replace(",", "")
    if t.count("/") == 1:
        num, den = (_to_fraction(part) for part in t.split("/"))
        if num is None or den is None or den == 0:
            return None
        return _canonical(num / den)
    value = _to_fraction(t)
    return None if value is None else _canonical(value)


def answers_match(predicted: str | None, truth: str) -> bool:
    """Whether an extracted answer equals the ground truth: as numbers when the truth is a number (see
    ``normalize_number``), else as strings with whitespace stripped. ``None`` never matches."""
    if predicted is None:
        return False
    truth_number = normalize_number(truth)
    if truth_number is not None:
        return normalize_number(predicted) == truth_number
    return predicted.strip() == truth.strip()


def accuracy_reward(prompts: Sequence[Any], completions: Sequence[Any], answer: Sequence[Any] | None = None, *,
                    fallback_last_number: bool = False, **columns: Any) -> list[float | None]:
    """1.0 for each completion whose final answer equals the ground truth, else 0.0 (TRL reward signature).

    Args:
        prompts: ``(B,)`` the prompts (unused; part of the signature).
        completions: ``(B,)`` completions, strings or conversational message lists.
        answer: ``(B,)`` the dataset's ``answer`` column: a bare answer (``"18"``, ``"\\frac{1}{2}"``, ``"Paris"``)
            or a full solution ending in GSM8K's ``#### N`` or a ``\\boxed{}`` (its final answer is extracted).
            ``None`` (no ground truth) gives ``None`` for that row: the reward is skipped, as TRL does. Without an
            ``answer`` column, TRL's ``solution`` column is read instead.
        fallback_last_number: also accept the last number of a completion that states no answer
            (``extract_answer``).
        **columns: other dataset columns (ignored).

    Returns ``(B,)`` floats (or ``None``). The answer is extracted with ``extract_answer`` and compared with
    ``answers_match``; a completion with no answer scores 0.0. Raises ``ValueError`` if there is neither an
    ``answer`` nor a ``solution`` column, or if it and ``completions`` differ in length.
    """
    if answer is None:
        answer = columns.get("solution")
        if answer is None:
            raise ValueError("accuracy_reward needs the ground truth in an 'answer' (or 'solution') column; the "
                             f"columns passed are {sorted(columns)}")
    if len(answer) != len(completions):
        raise ValueError(f"accuracy_reward: {len(completions)} completions but {len(answer)} answers")
    rewards: list[float | None] = []
    for completion, truth in zip(completions, answer):
        if truth is None:
            rewards.append(None)
            continue
        truth = str(truth)
        gold = extract_answer(truth) or truth.strip()
        predicted = extract_answer(completion, fallback_last_number=fallback_last_number)
        rewards.append(1.0 if answers_match(predicted, gold) else 0.0)
    return rewards
