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

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from engine.data import RAW_TEMPLATE, arithmetic_sft_completion, arithmetic_splits, format_prompt, load_records
from engine.data.gsm8k import to_prompt_record
from engine.data.preferences import (
    content_kind,
    preview,
    render_pair,
    split_pairs,
    to_preference_pairs,
    tokenize_pairs,
)

log = logging.getLogger("rlhf_engine")

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


def _text(value: str | list[dict]) -> str:
    """A completion as text: a string as it is, messages as their contents joined (as the chosen response of a
    conversational preference pair)."""
    return value if isinstance(value, str) else "".join(m["content"] for m in value)


def _sft_completion(record: dict) -> str | None:
    if record.get("completion") is not None:  # type-checked by _check_record
        return _text(record["completion"])
    if record.get("solution") is not None and "answer" in record:  # GSM8K: reasoning, "#### N"; as R1 format
        reasoning = _GSM8K_FINAL.sub("", str(record["solution"])).strip()
        return f"<think>{reasoning}</think><answer>{record['answer']}</answer>"
    return None


def _check_record(row: dict, where: str, prompt_field: str, answer_field: str, template: str | None) -> None:
    """Raise ``ValueError`` (``f"{where}: ..."``, naming the field, the expected and the given value) unless the
    prompt is a string or a non-empty list of ``{role: str, content: str}`` messages (a list only when
    ``template`` is null: a plain template renders strings), a ``completion`` is null, a string or such messages, a
    ``solution`` (GSM8K's worked answer, the SFT target when there is no completion) null or a string, and the
    answer null, a string or a number."""
    prompt = row[prompt_field]
    if content_kind(prompt, prompt_field, where) == "messages":
        if not prompt:
            raise ValueError(f"{where}: {prompt_field!r} is an empty list of messages (no question to ask)")
        if template is not None:
            raise ValueError(f"{where}: {prompt_field!r} is a conversation (a list of messages), which needs the "
                             f"tokenizer's chat template, but data.template={template!r} renders strings only; set "
                             f"data.template=null, or give the prompt as a string")
    if row.get("completion") is not None:
        content_kind(row["completion"], "completion", where)
    elif row.get("solution") is not None and not isinstance(row["solution"], str):
        raise ValueError(f"{where}: 'solution' (the worked answer trained on when there is no 'completion') must "
                         f"be a string, got {type(row['solution']).__name__}: {preview(row['solution'])}")
    answer = row.get(answer_field)
    if answer is not None and (isinstance(answer, bool) or not isinstance(answer, (str, int, float))):
        raise ValueError(f"{where}: {answer_field!r} (data.answer_field, the reference answer the rewards compare "
                         f"with) must be a string, a number or null, got {type(answer).__name__}: {preview(answer)}")


def _from_preferences(rows: list[dict], source: str) -> list[dict]:
    """Preference pairs (``chosen``/``rejected``, TRL's formats) as prompt records: the prompt, the chosen response
    as the SFT ``completion``, and the ``rejected`` response. Empty responses are accepted here (SFT on an empty
    chosen response teaches the model to stop)."""
    out = []
    for pair in to_preference_pairs(rows, source=source, allow_empty_response=True):
        out.append({**pair.record, "prompt": pair.prompt, "completion": _text(pair.chosen), "answer": None,
                    "rejected": pair.rejected})
    return out


def _normalise(rows: list[dict], prompt_field: str, answer_field: str, source: str = "data",
               template: str | None = None) -> list[dict]:
    """Records with ``prompt`` and ``answer`` (from ``prompt_field`` / ``answer_field``), each checked by
    ``_check_record``: a bad one raises ``ValueError`` naming it as ``f"{source} record {i}"`` (0-based, as
    ``engine.data.to_preference_pairs`` does for pairs), before any model is built."""
    if rows and {"chosen", "rejected"} <= set(rows[0]) and (prompt_field == "prompt" or prompt_field not in rows[0]):
        return _from_preferences(rows, source)
    out = []
    for i, row in enumerate(rows):
        where = f"{source} record {i}"
        if "question" in row and "####" in str(row.get("answer", "")):  # GSM8K
            try:
                row = {**to_prompt_record(row), "solution": row["answer"]}
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
        if prompt_field not in row:
            raise ValueError(f"{where} has no {prompt_field!r} column (data.prompt_field); its columns: "
                             f"{sorted(row)}")
        _check_record(row, where, prompt_field, answer_field, template)
        out.append({**row, "prompt": row[prompt_field], "answer": row.get(answer_field)})
    return out


def load_task(data, *, limit_train: int | None = None) -> tuple[list[dict], list[dict], bool]:
    """``(train_records, eval_records, builtin)`` for ``data`` (a ``DataConfig``); records have ``prompt`` and
    ``answer`` (and ``completion`` for the built-in task).

    Every record of a file or Hub source is checked here, before any model is built: ``ValueError`` naming
    ``f"{source} record {i}"`` and the field, for a missing prompt column, a prompt that is not a string or a
    non-empty list of ``{role: str, content: str}`` messages (or is a conversation while ``data.template`` is set),
    a ``completion`` that is neither null, a string nor such messages, a non-string ``solution``, an answer that is
    not null, a string or a number, a GSM8K answer without a number after ``####``, and the errors of
    ``engine.data.to_preference_pairs`` for pairs; ``load_records``' errors for the files themselves."""
    m = _BUILTIN.match(data.train)
    if m:
        digits, ops, style = int(m.group(1) or 3), m.group(2) or "+-", m.group(3) or "answer"
        train, held_out = arithmetic_splits(limit_train or 20000, data.num_eval, seed=data.seed, digits=digits,
                                            ops=ops, pad=True)
        for r in train + held_out:
            r["completion"] = arithmetic_sft_completion(r, style=style, width=digits + 1 if "*" not in ops else None)
        return train, held_out, True
    train = _normalise(load_records(data.train, split="train", limit=limit_train), data.prompt_field,
                       data.answer_field, data.train, data.template)
    eval_source = data.eval or (data.train if Path(data.train).is_dir() else None)
    if eval_source is not None:  # num_eval=0: every evaluation record
        held_out = _normalise(load_records(eval_source, split="test", limit=data.num_eval or None),
                              data.prompt_field, data.answer_field, eval_source, data.template)
    elif data.num_eval:
        held_out, train = train[-data.num_eval:], train[:-data.num_eval]
    else:  # no evaluation source and nothing to carve out of the training rows
        held_out = []
    return train, held_out, False


def tokenize(records: list[dict], tokenizer, data, *, builtin: bool) -> tuple[list[Example], int]:
    """Render and tokenize every prompt; drops (and counts) prompts longer than ``data.max_prompt_tokens``. Returns
    ``(examples, dropped)``. Raises ``ValueError`` naming the record's position in ``records`` and its prompt for a
    conversation that the tokenizer cannot render (it has no chat template)."""
    template = RAW_TEMPLATE if builtin and data.template is None else data.template
    examples, dropped = [], 0
    for i, r in enumerate(records):
        try:
            text = format_prompt(tokenizer, r["prompt"], system=data.system_prompt, template=template)
        except ValueError as err:
            raise ValueError(f"record {i} ({data.prompt_field!r}: {preview(r['prompt'])}): {err}") from None
        chat = template is None and bool(getattr(tokenizer, "chat_template", None))
        ids = tokenizer.encode(text, add_special_tokens=not chat and not builtin)
        if len(ids) > data.max_prompt_tokens:
            dropped += 1
            continue
        examples.append(Example(r, text, ids, _sft_completion(r)))
    return examples, dropped


@dataclass
class PromptTask:
    """The prompts of a GRPO / PPO / SFT run: ``train_records`` and ``eval_records`` loaded and checked by
    ``load_task`` (``builtin`` for the arithmetic task), tokenized by ``examples`` once a tokenizer exists."""

    train_records: list[dict]
    eval_records: list[dict]
    builtin: bool

    @classmethod
    def load(cls, data) -> PromptTask:
        """The records of ``data`` (a ``DataConfig``); ``load_task``'s errors."""
        return cls(*load_task(data))

    def texts(self):
        """The training prompts and completions (the corpus of a ``bpe`` tokenizer trained for the run)."""
        for r in self.train_records:
            for key in ("prompt", "completion"):
                if isinstance(r.get(key), str):
                    yield r[key]

    def examples(self, tokenizer, data) -> tuple[list[Example], list[Example]]:
        """``(train_examples, eval_examples)``: the tokenized prompts (``tokenize``), logging how many were left out
        for length. Raises ``ValueError`` when no training prompt fits ``data.max_prompt_tokens``."""
        train, dropped = tokenize(self.train_records, tokenizer, data, builtin=self.builtin)
        held_out, eval_dropped = tokenize(self.eval_records, tokenizer, data, builtin=self.builtin)
        if dropped or eval_dropped:
            log.info(f"prompts longer than data.max_prompt_tokens={data.max_prompt_tokens} left out: {dropped} of "
                     f"{len(self.train_records)} training, {eval_dropped} of {len(self.eval_records)} held-out")
        if not train:
            raise ValueError(f"no training prompt fits data.max_prompt_tokens={data.max_prompt_tokens} "
                             f"({dropped} dropped)")
        return train, held_out


@dataclass
class PairTask:
    """The preference pairs of a reward-model or DPO run, in TRL's formats (``engine.data.preferences``): the
    training pairs and the held-out ones (``data.eval``, else the last ``data.num_eval`` of ``data.train``)."""

    train_pairs: list
    eval_pairs: list

    @classmethod
    def load(cls, data, *, allow_empty_response: bool = False) -> PairTask:
        """The pairs of ``data`` (a ``DataConfig``); ``to_preference_pairs``' and ``split_pairs``' errors."""
        pairs = to_preference_pairs(load_records(data.train, split="train"), source=data.train,
                                    allow_empty_response=allow_empty_response)
        if data.eval:
            held_out = to_preference_pairs(load_records(data.eval, split="test", limit=data.num_eval or None),
                                           source=data.eval, allow_empty_response=allow_empty_response)
        else:
            pairs, held_out = split_pairs(pairs, data.num_eval)
        return cls(pairs, held_out)

    def texts(self):
        """The rendered prompts and responses of the training pairs (the corpus of a ``bpe`` tokenizer)."""
        for pair in self.train_pairs:
            yield from render_pair(pair)

    def examples(self, tokenizer, data, *, max_length: int) -> tuple[list, list]:
        """``(train_examples, eval_examples)`` of ``TokenizedPair``: at most ``max_length`` tokens a row, prompts at
        most ``data.max_prompt_tokens`` (``tokenize_pairs``); the counts kept, cut and dropped are logged. Raises
        ``ValueError`` when no training pair is left."""
        kwargs = {"max_length": max_length, "max_prompt_length": min(data.max_prompt_tokens, max_length - 1)}
        train, stats = tokenize_pairs(self.train_pairs, tokenizer, **kwargs)
        held_out, eval_stats = tokenize_pairs(self.eval_pairs, tokenizer, **kwargs)
        log.info(f"pairs: train {stats}, held-out {eval_stats}")
        if not train:
            raise ValueError(f"no training pair is left after tokenization ({stats})")
        return train, held_out
