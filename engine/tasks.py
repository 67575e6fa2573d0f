"""From a ``DataConfig`` to tokenized training/evaluation examples: the built-in arithmetic task or a dataset
(GSM8K-style ``question``/``answer`` rows and chosen/rejected preference pairs are recognised: a pair gives its
prompt, and its chosen response as the SFT completion), prompt templates, and SFT target completions.

Sources (``data.train``): ``builtin:arithmetic[:DIGITS[:OPS[:STYLE]]]`` (e.g. ``builtin:arithmetic:3:+-:reverse``;
STYLE is the SFT target format of ``engine.data.arithmetic_sft_completion``; operands are zero-padded to DIGITS), or
anything
``engine.data.load_records`` reads (a .jsonl/.json/.parquet file, a directory with ``<split>.jsonl``, a HF dataset
name). ``data.eval``: a source for held-out prompts; default: the ``test`` split of a directory source, the disjoint
held-out problems of the built-in task, else the last ``num_eval`` training rows (taken out of training; with
``num_eval=0`` nothing is held out and there is no evaluation).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from engine.data import RAW_TEMPLATE, arithmetic_sft_completion, arithmetic_splits, format_prompt, load_records
from engine.data.gsm8k import to_prompt_record
from engine.data.preferences import to_preference_pairs

_BUILTIN = re.compile(r"^builtin:arithmetic(?::(\d+))?(?::([+\-*]+))?(?::(answer|echo|reverse))?$")
_GSM8K_FINAL = re.compile(r"\n?####\s*(.+?)\s*$")


@dataclass
class Example:
    """One prompt: its text, token ids, the raw record (columns for the reward functions) and, for SFT, the target
    completion text (None when the source has none)."""

    record: dict
    prompt_text: str
    prompt_ids: list[int]
    completion: str | None


def _sft_completion(record: dict) -> str | None:
    if "completion" in record:
        return str(record["completion"])
    if "solution" in record and "answer" in record:  # GSM8K: reasoning then "#### N", rewritten in R1 format
        reasoning = _GSM8K_FINAL.sub("", str(record["solution"])).strip()
        return f"<think>{reasoning}</think><answer>{record['answer']}</answer>"
    return None


def _from_preferences(rows: list[dict], source: str) -> list[dict]:
    """Preference pairs (``chosen``/``rejected``, TRL's formats) as prompt records: the prompt, the chosen response
    as the SFT ``completion``, and the ``rejected`` response. Empty responses are accepted here (SFT on an empty
    chosen response teaches the model to stop)."""
    out = []
    for pair in to_preference_pairs(rows, source=source, allow_empty_response=True):
        completion = pair.chosen if isinstance(pair.chosen, str) else "".join(m["content"] for m in pair.chosen)
        out.append({**pair.record, "prompt": pair.prompt, "completion": completion, "answer": None,
                    "rejected": pair.rejected})
    return out


def _normalise(rows: list[dict], prompt_field: str, answer_field: str, source: str = "data") -> list[dict]:
    if rows and {"chosen", "rejected"} <= set(rows[0]) and (prompt_field == "prompt" or prompt_field not in rows[0]):
        return _from_preferences(rows, source)
    out = []
    for row in rows:
        if "question" in row and "####" in str(row.get("answer", "")):  # GSM8K
            row = {**to_prompt_record(row), "solution": row["answer"]}
        if prompt_field not in row:
            raise ValueError(f"data records need a {prompt_field!r} column (data.prompt_field); got {sorted(row)}")
        out.append({**row, "prompt": row[prompt_field], "answer": row.get(answer_field)})
    return out


def load_task(data, *, limit_train: int | None = None) -> tuple[list[dict], list[dict], bool]:
    """``(train_records, eval_records, builtin)`` for ``data`` (a ``DataConfig``); records have ``prompt`` and
    ``answer`` (and ``completion`` for the built-in task)."""
    m = _BUILTIN.match(data.train)
    if m:
        digits, ops, style = int(m.group(1) or 3), m.group(2) or "+-", m.group(3) or "answer"
        train, held_out = arithmetic_splits(limit_train or 20000, data.num_eval, seed=data.seed, digits=digits,
                                            ops=ops, pad=True)
        for r in train + held_out:
            r["completion"] = arithmetic_sft_completion(r, style=style, width=digits + 1 if "*" not in ops else None)
        return train, held_out, True
    train = _normalise(load_records(data.train, split="train", limit=limit_train), data.prompt_field,
                       data.answer_field, data.train)
    eval_source = data.eval or (data.train if Path(data.train).is_dir() else None)
    if eval_source is not None:  # num_eval=0: every evaluation record
        held_out = _normalise(load_records(eval_source, split="test", limit=data.num_eval or None),
                              data.prompt_field, data.answer_field, eval_source)
    elif data.num_eval:
        held_out, train = train[-data.num_eval:], train[:-data.num_eval]
    else:  # no evaluation source and nothing to carve out of the training rows
        held_out = []
    return train, held_out, False


def tokenize(records: list[dict], tokenizer, data, *, builtin: bool) -> tuple[list[Example], int]:
    """Render and tokenize every prompt; drops (and counts) prompts longer than ``data.max_prompt_tokens``."""
    template = RAW_TEMPLATE if builtin and data.template is None else data.template
    examples, dropped = [], 0
    for r in records:
        text = format_prompt(tokenizer, r["prompt"], system=data.system_prompt, template=template)
        chat = template is None and bool(getattr(tokenizer, "chat_template", None))
        ids = tokenizer.encode(text, add_special_tokens=not chat and not builtin)
        if len(ids) > data.max_prompt_tokens:
            dropped += 1
            continue
        examples.append(Example(r, text, ids, _sft_completion(r)))
    return examples, dropped
