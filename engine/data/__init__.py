"""Datasets as lists of records (``load_records``: jsonl/json/parquet, plain or gzipped, directories, the Hub),
GSM8K conversion, prompt formatting (chat templates or a plain template), preference pairs (TRL's formats, for a
reward model, DPO and PPO prompts), and the built-in arithmetic task with its character-level tokenizer. Importing
this package does not import ``transformers`` (``char_tokenizer`` does, when called)."""

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
from engine.data.preferences import (
    PreferencePair,
    TokenizedPair,
    render_pair,
    split_pairs,
    split_shared_prefix,
    to_preference_pairs,
    tokenize_pairs,
)
from engine.data.templates import PLAIN_TEMPLATE, R1_SYSTEM_PROMPT, RAW_TEMPLATE, format_prompt

__all__ = [
    "DEFAULT_CHARS", "PLAIN_TEMPLATE", "R1_SYSTEM_PROMPT", "RAW_TEMPLATE", "SPECIAL_TOKENS", "TAG_TOKENS",
    "PreferencePair", "TokenizedPair", "arithmetic_problems", "arithmetic_sft_completion", "arithmetic_splits",
    "char_tokenizer", "format_prompt", "gsm8k_answer", "load_gsm8k", "load_records", "render_pair", "split_pairs",
    "split_shared_prefix", "to_preference_pairs", "to_prompt_record", "tokenize_pairs",
]
