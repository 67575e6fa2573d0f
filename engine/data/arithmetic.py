"""The built-in synthetic task: integer arithmetic, for the CPU demo and the tests.

A record is ``{"prompt": "123+45=", "answer": "168"}`` (operands in ``[0, 10**digits)``, results may be negative
for ``-``). Problems are deterministic in the seed and distinct, with ``a+b`` and ``b+a`` (and ``a*b``, ``b*a``)
counted as one problem, so a held-out set never holds a commuted copy of a training problem. ``accuracy_reward``
checks the answer; ``arithmetic_sft_completion`` writes the R1-format target text for the cold-start SFT;
``char_tokenizer`` is a character-level tokenizer in which each of these strings is a few dozen tokens at most.
"""

from __future__ import annotations

import random
import re
import string
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_COMMUTATIVE = {"+", "*"}
_PROBLEM = re.compile(r"(\d+)([+\-*])(\d+)=")

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")  # ids 0, 1, 2, 3
TAG_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")  # ids 4..7: one token each
# Digits and the task's symbols first (small, stable ids), then the rest of printable ASCII: 96 characters.
DEFAULT_CHARS = "".join(dict.fromkeys(string.digits + "+-*/= \n" + string.ascii_letters + string.punctuation))


def _problem_space(digits: int, ops: str) -> int:
    m = 10**digits
    return sum(m * (m + 1) // 2 if op in _COMMUTATIVE else m * m for op in ops)


def arithmetic_problems(n: int, *, seed: int, digits: int = 3, ops: str = "+-",
                        pad: bool = False) -> list[dict[str, str]]:
    """``n`` distinct arithmetic problems, deterministic in ``seed``.

    Args:
        n: how many problems.
        seed: the problems are the first ``n`` distinct draws of ``random.Random(seed)``, so a smaller ``n`` gives a
            prefix of a larger one.
        digits: operands are uniform in ``[0, 10**digits)``.
        ops: the operators drawn from, uniformly, a non-empty subset of ``"+-*"``.
        pad: write the operands zero-padded to ``digits`` characters (``007+123=``): fixed digit positions make
            the task much easier for a tiny transformer to learn (the answer stays the plain number).

    Returns ``n`` records ``{"prompt": "<a><op><b>=", "answer": "<exact result>"}``.
    Raises ``ValueError`` for ``n < 0``, ``digits < 1``, an unknown operator, or more problems than exist.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if digits < 1:
        raise ValueError(f"digits must be >= 1, got {digits}")
    ops = "".join(dict.fromkeys(ops))
    if not ops or any(op not in _OPS for op in ops):
        raise ValueError(f"ops must be a non-empty string of {''.join(_OPS)!r}, got {ops!r}")
    if n > _problem_space(digits, ops):
        raise ValueError(f"only {_problem_space(digits, ops)} distinct problems have {digits}-digit operands and "
                         f"ops {ops!r}, asked for {n}")
    rng = random.Random(seed)
    seen: set[tuple[int, str, int]] = set()
    records = []
    while len(records) < n:
        a, op, b = rng.randrange(10**digits), rng.choice(ops), rng.randrange(10**digits)
        key = (min(a, b), op, max(a, b)) if op in _COMMUTATIVE else (a, op, b)
        if key in seen:
            continue
        seen.add(key)
        records.append({"prompt": f"{a:0{digits}d}{op}{b:0{digits}d}=" if pad else f"{a}{op}{b}=",
                        "answer": str(_OPS[op](a, b))})
    return records


def arithmetic_splits(n_train: int, n_eval: int, *, seed: int, digits: int = 3, ops: str = "+-",
                      pad: bool = False) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Disjoint training and held-out sets: ``(train, eval)`` of ``n_train`` and ``n_eval`` records.

    Both come from one stream of distinct problems (``arithmetic_problems(n_eval + n_train, ...)``): the held-out
    set is its first ``n_eval`` problems, so it depends only on ``seed``, ``n_eval``, ``digits`` and ``ops``, not on
    ``n_train``. No problem (nor a commuted copy of it) is in both. Raises ``ValueError`` as ``arithmetic_problems``.
    """
    if n_train < 0 or n_eval < 0:
        raise ValueError(f"n_train and n_eval must be >= 0, got {n_train} and {n_eval}")
    problems = arithmetic_problems(n_eval + n_train, seed=seed, digits=digits, ops=ops, pad=pad)
    return problems[n_eval:], problems[:n_eval]


def arithmetic_sft_completion(record: dict[str, Any], *, style: str = "answer", width: int | None = None) -> str:
    """The target completion of an arithmetic record for cold-start SFT, in the format ``format_reward`` accepts.

    Styles (for ``123+45=``):
        ``"answer"``: ``<think></think><answer>168</answer>``, the shortest R1-format text;
        ``"echo"``: ``<think>123+45</think><answer>168</answer>``, restating the problem;
        ``"reverse"``: ``<think>861</think><answer>168</answer>``, the result's digits least significant first (the
        order in which carries are produced; a known aid for small transformers), then the answer.

    ``width``: for ``"reverse"``, zero-pad the result to this many digits before reversing (fixed digit positions,
    as with padded operands). No EOS is included: the trainer appends the tokenizer's. Raises ``ValueError`` for an unknown style or a prompt
    that is not ``<a><op><b>=``.
    """
    answer = str(record["answer"])
    if style == "answer":
        think = ""
    elif style == "echo":
        m = _PROBLEM.fullmatch(str(record["prompt"]).strip())
        if m is None:
            raise ValueError(f"not an arithmetic prompt: {record['prompt']!r}")
        think = "".join(m.groups())
    elif style == "reverse":
        sign, digits_ = ("-", answer[1:]) if answer.startswith("-") else ("", answer)
        think = sign + digits_.zfill(width or 0)[::-1]
    else:
        raise ValueError(f"style must be 'answer', 'echo' or 'reverse', got {style!r}")
    return f"<think>{think}</think><answer>{answer}</answer>"


def char_tokenizer(extra_tokens: tuple[str, ...] | list[str] = (), *, chars: str = DEFAULT_CHARS) -> PreTrainedTokenizerFast:
    """A character-level ``PreTrainedTokenizerFast`` for the arithmetic task (built offline with ``tokenizers``).

    Vocabulary, in id order: ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3 (special tokens); ``<think>``,
    ``</think>``, ``<answer>``, ``</answer>`` 4..7 (normal added tokens: one token each, kept by
    ``decode(..., skip_special_tokens=True)``); one token per character of ``chars`` (default: digits, ``+-*/=``,
    space, newline, then the other printable ASCII characters: 96 in all; pass ``chars="0123456789+-*="`` for a
    minimal vocabulary); then ``extra_tokens`` (strings of several characters become single added tokens).

    Encoding adds no BOS/EOS; a character outside the vocabulary encodes as ``<unk>``. ``decode(encode(s)) == s``
    for every string over the vocabulary, and ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` round-trips.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for token in (*SPECIAL_TOKENS, *TAG_TOKENS, *chars, *extra_tokens):
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character, \n included
    tok.decoder = decoders.Fuse()  # concatenate, no spaces between tokens
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.add_tokens([t for t in (*TAG_TOKENS, *extra_tokens) if len(t) > 1])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>", clean_up_tokenization_spaces=False)
