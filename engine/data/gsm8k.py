"""GSM8K (grade-school math, Cobbe et al. 2021): rows ``{"question", "answer"}`` where ``answer`` is a worked
solution ending in ``#### N``. ``to_prompt_record`` turns a row into an RL record ``{"prompt", "answer": "N"}``,
which ``engine.rewards.accuracy_reward`` checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.data.datasets import load_records
from engine.rewards.math import normalize_number


def gsm8k_answer(answer_field: str) -> str:
    """The final answer of a GSM8K solution: the number after its last ``####``, normalised by
    ``normalize_number`` (``"... #### 1,234"`` -> ``"1234"``).

    Raises ``ValueError`` when there is no ``####`` or what follows is not a number (the message quotes the end of
    the text).
    """
    _, mark, tail = str(answer_field).rpartition("####")
    if not mark:
        raise ValueError(f"not a GSM8K answer (no '####'): ...{str(answer_field)[-80:]!r}")
    value = normalize_number(tail.strip().splitlines()[0] if tail.strip() else "")
    if value is None:
        raise ValueError(f"the GSM8K answer after '####' is not a number: {tail.strip()[:80]!r}")
    return value


def to_prompt_record(record: dict[str, Any]) -> dict[str, Any]:
    """A GSM8K row as an RL record: all its columns, with ``prompt`` = ``question`` and ``answer`` replaced by the
    normalised final answer (``gsm8k_answer``). Raises ``KeyError`` naming a missing column, ``ValueError`` as
    ``gsm8k_answer``."""
    for key in ("question", "answer"):
        if key not in record:
            raise KeyError(f"a GSM8K record needs a {key!r} column; it has {sorted(record)}")
    return {**record, "prompt": record["question"], "answer": gsm8k_answer(record["answer"])}


def load_gsm8k(source: str | Path, *, split: str = "train", limit: int | None = None) -> list[dict[str, Any]]:
    """GSM8K rows from ``source`` (a ``.jsonl``/``.parquet`` file, a directory with ``<split>.jsonl``, or the Hub's
    ``"openai/gsm8k"`` with ``datasets`` installed) converted by ``to_prompt_record``; see ``load_records``."""
    kwargs = {"name": "main"} if str(source) == "openai/gsm8k" else {}
    return [to_prompt_record(r) for r in load_records(source, split=split, limit=limit, **kwargs)]
