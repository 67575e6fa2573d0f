"""Datasets as lists of records (``load_records``: jsonl/json/parquet, directories, the Hub), GSM8K conversion,
prompt formatting (chat templates or a plain template), and the built-in arithmetic task with its character-level
tokenizer. Importing this package does not import ``transformers`` (``char_tokenizer`` does, when called)."""

from engine.data.arithmetic import (
    DEFAULT_CHARS,
    SPECIAL_TOKENS,
    TAG_TOKENS,
    arithmetic_problems,
    arithmetic_sft_completion,
    arithmetic_splits,
    char_tokenizer,
)
from engine.data.datasets import load_records
from engine.data.gsm8k import gsm8k_answer, load_gsm8k, to_prompt_record
from engine.data.templates import PLAIN_TEMPLATE, R1_SYSTEM_PROMPT, RAW_TEMPLATE, format_prompt

__all__ = [
    "DEFAULT_CHARS", "PLAIN_TEMPLATE", "R1_SYSTEM_PROMPT", "RAW_TEMPLATE", "SPECIAL_TOKENS", "TAG_TOKENS",
    "arithmetic_problems", "arithmetic_sft_completion", "arithmetic_splits", "char_tokenizer", "format_prompt",
    "gsm8k_answer", "load_gsm8k", "load_records", "to_prompt_record",
]
