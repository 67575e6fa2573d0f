"""Preference pairs in TRL's formats, for a reward model, DPO, and the prompts of PPO.

Flow: ``load_records`` -> ``to_preference_pairs`` (validate; split an implicit prompt off) -> ``split_pairs`` (hold
out the last rows) -> ``tokenize_pairs`` (``render_pair`` to text, then token ids, truncated).

Formats (TRL's): explicit prompt ``{"prompt", "chosen", "rejected"}`` or implicit prompt ``{"chosen", "rejected"}``
(full texts sharing the prompt as a prefix, as Anthropic's HH-RLHF: ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``); each
either all strings ("standard") or all lists of ``{"role", "content"}`` messages ("conversational").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_ASSISTANT_MARKER = "\n\nAssistant:"  # Anthropic HH's assistant turn
_HH_NAMES = {"user": "Human", "assistant": "Assistant", "system": "System"}
_STATS_KEYS = ("pairs", "truncated_prompt", "truncated_response", "dropped_identical", "dropped_empty")


@dataclass
class PreferencePair:
    """One preference pair. prompt: str, or list of chat messages ({"role", "content"}); chosen / rejected: the
    response text (str), or the list of messages after the prompt (conversational). index: the record's 0-based
    number in its source (for error messages). record: the raw row (other columns, e.g. a 'margin')."""

    prompt: str | list[dict]
    chosen: str | list[dict]
    rejected: str | list[dict]
    index: int
    record: dict


@dataclass
class TokenizedPair:
    """Token ids of one pair, without padding: the model reads ``prompt_ids + chosen_ids`` and
    ``prompt_ids + rejected_ids``, each at most ``max_length`` long."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    pair: PreferencePair


# --------------------------------------------------------------------------------------------- validation
def _common_prefix_len(a: str | list, b: str | list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def split_shared_prefix(chosen: str, rejected: str) -> tuple[str, str, str]:
    """``(prompt, chosen_response, rejected_response)`` of an implicit-prompt pair; ``prompt + response`` gives back
    each text.

    The prompt is the longest common prefix, cut back to just after the last assistant turn marker
    (``"\\n\\nAssistant:"``, Anthropic HH) when the common prefix holds one, so responses that share their first
    words are still split at the turn. Otherwise it is cut at a word boundary: back over a partial word (when the
    texts diverge inside a word), then back over the whitespace before it, which goes to the responses (TRL's
    ``extract_prompt`` likewise leaves the space before a response to the response): ``"Q? A: 4"`` / ``"Q? A: 5"``
    -> ``("Q? A:", " 4", " 5")``.

    Raises ``ValueError`` when there is no common prefix, or when the common prefix has no marker and no word
    boundary to cut at (``"2+2=4"`` / ``"2+2=5"``: give such data an explicit ``prompt`` column).
    """
    k = _common_prefix_len(chosen, rejected)
    if k == 0:
        raise ValueError(f"chosen and rejected share no prefix, so there is no implicit prompt (chosen starts "
                         f"{chosen[:40]!r}, rejected {rejected[:40]!r}); give an explicit 'prompt'")
    common = chosen[:k]
    marker = common.rfind(_ASSISTANT_MARKER)
    if marker >= 0:
        cut = marker + len(_ASSISTANT_MARKER)
    else:
        cut = k
        if not common[-1].isspace() and any(k < len(t) and not t[k].isspace() for t in (chosen, rejected)):
            while cut > 0 and not common[cut - 1].isspace():  # diverged inside a word: back over it
                cut -= 1
        while cut > 0 and common[cut - 1].isspace():
            cut -= 1
        if cut == 0:
            raise ValueError(f"the common prefix {common[:60]!r} of chosen and rejected has no assistant marker "
                             f"({_ASSISTANT_MARKER!r}) and no word boundary to cut the prompt at; give an explicit "
                             "'prompt'")
    return chosen[:cut], chosen[cut:], rejected[cut:]


def preview(value: Any, width: int = 60) -> str:
    """``repr(value)`` cut to about ``width`` characters, for error messages that quote a record's value."""
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def content_kind(value: Any, name: str, where: str) -> str:
    """``"text"`` for a string, ``"messages"`` for a list of ``{"role": str, "content": str}`` dicts (TRL's
    conversational format). Raises ``ValueError`` for anything else, as ``f"{where}: {name!r} must be ..."``
    naming the type and value found (or the first bad message and what is wrong with it)."""
    if isinstance(value, str):
        return "text"
    expected = f"{where}: {name!r} must be a string or a list of {{'role', 'content'}} messages"
    if not isinstance(value, list):
        raise ValueError(  # noqa: TRY004 - bad data, not a bad call
            f"{expected}, got {type(value).__name__}: {preview(value)}")
    for j, m in enumerate(value):
        if not isinstance(m, dict):
            problem = f"is a {type(m).__name__}"
        elif not {"role", "content"} <= m.keys():
            problem = f"has keys {sorted(m)}"
        elif not (isinstance(m["role"], str) and isinstance(m["content"], str)):
            problem = (f"has a {type(m['role']).__name__} role and a {type(m['content']).__name__} content (both "
                       "must be str)")
        else:
            continue
        raise ValueError(f"{expected}; its message {j} {problem}")
    return "messages"


def _is_blank(value: str | list[dict]) -> bool:
    """An empty or whitespace-only text, or messages whose contents are all whitespace (or no messages)."""
    return not (value if isinstance(value, str) else "".join(m["content"] for m in value)).strip()


def _to_pair(record: Any, i: int, source: str, allow_empty_response: bool) -> PreferencePair:
    where = f"{source} record {i}"
    if not isinstance(record, dict):
        raise ValueError(f"{where} is a {type(record).__name__}, expected a dict (a row)")  # noqa: TRY004
    missing = [k for k in ("chosen", "rejected") if k not in record]
    if missing:
        raise ValueError(f"{where}: missing {' and '.join(map(repr, missing))} (its keys: {sorted(record)})")
    prompt, chosen, rejected = record.get("prompt"), record["chosen"], record["rejected"]
    names = ("prompt", "chosen", "rejected") if prompt is not None else ("chosen", "rejected")
    kinds = {name: content_kind(record[name], name, where) for name in names}
    if len(set(kinds.values())) > 1:
        described = ", ".join(f"{n} is {'a string' if k == 'text' else 'a list of messages'}" for n, k in kinds.items())
        raise ValueError(f"{where}: mixes strings and conversations ({described}); use one format for all fields")
    if prompt is None:  # implicit prompt: the shared prefix
        if chosen == rejected:
            raise ValueError(f"{where}: 'chosen' and 'rejected' are identical, so the pair states no preference")
        if kinds["chosen"] == "text":
            try:
                prompt, chosen, rejected = split_shared_prefix(chosen, rejected)
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
        else:
            k = _common_prefix_len(chosen, rejected)
            if k == 0:
                raise ValueError(f"{where}: the 'chosen' and 'rejected' conversations share no leading message, so "
                                 "there is no implicit prompt; give an explicit 'prompt'")
            prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
    elif chosen == rejected:
        raise ValueError(f"{where}: the 'chosen' and 'rejected' responses are identical, so the pair states no "
                         "preference")
    if _is_blank(prompt):
        raise ValueError(f"{where}: the prompt is empty or whitespace-only")
    for name, response in (("chosen", chosen), ("rejected", rejected)):
        if isinstance(response, list) and not response:
            raise ValueError(f"{where}: the {name} response has no message (the conversation ends with the prompt)")
        if isinstance(response, list) and response[0]["role"] != "assistant":
            raise ValueError(f"{where}: the {name} response must start with an assistant message, got role "
                             f"{response[0]['role']!r}")
        if not allow_empty_response and _is_blank(response):
            raise ValueError(f"{where}: the {name} response is empty or whitespace-only ({response!r}); pass "
                             "allow_empty_response=True to keep such pairs")
    return PreferencePair(prompt, chosen, rejected, i, record)


def to_preference_pairs(records: list[dict], *, source: str = "data",
                        allow_empty_response: bool = False) -> list[PreferencePair]:
    """Validate rows in TRL's preference formats and split off their prompts.

    Formats:
      - explicit prompt: ``{"prompt", "chosen", "rejected"}``, all strings, or all conversational (prompt = list of
        messages, chosen/rejected = list of assistant message(s)); a ``prompt`` of ``None`` counts as absent;
      - implicit prompt: ``{"chosen", "rejected"}`` full texts (or full conversations): the prompt is the shared
        prefix (strings: ``split_shared_prefix``; conversations: the longest run of identical leading messages).
    Other columns stay in ``PreferencePair.record``.

    ``allow_empty_response``: keep pairs whose chosen or rejected response is whitespace-only (a conversational
    response still needs one message). Off by default, but HH-RLHF has such pairs: in ``harmless-base`` test, 4 of
    2,312 chosen responses are ``" "`` (saying nothing was preferred to a harmful reply), records 86, 516, 925, 1103.

    Raises ``ValueError`` naming the record as ``f"{source} record {i}"`` (0-based) and saying what is wrong, for:
    a missing ``'chosen'`` or ``'rejected'`` (the record's keys are listed); wrong types (not a string, not a list
    of ``{role: str, content: str}`` dicts, or strings mixed with conversations); chosen identical to rejected
    (whole texts for implicit, responses for explicit); no shared prefix to take an implicit prompt from; an empty
    or whitespace-only prompt, chosen or rejected response (after the split); a conversational response that does
    not start with an assistant message; an empty ``records`` list.
    """
    if not records:
        raise ValueError(f"{source}: no records (an empty list), so there are no preference pairs")
    return [_to_pair(r, i, source, allow_empty_response) for i, r in enumerate(records)]


# --------------------------------------------------------------------------------------------- rendering
def _hh_turn(message: dict, index: int) -> str:
    name = _HH_NAMES.get(message["role"])
    if name is None:
        raise ValueError(f"preference record {index}: role {message['role']!r} has no Anthropic-HH rendering "
                         f"(only {sorted(_HH_NAMES)}); pass a tokenizer with a chat template")
    return f"\n\n{name}: {message['content']}"


def _hh_response(messages: list[dict], index: int) -> str:
    if not messages or messages[0]["role"] != "assistant":
        raise ValueError(f"preference record {index}: a response must start with an assistant message")
    return " " + messages[0]["content"] + "".join(_hh_turn(m, index) for m in messages[1:])


def render_pair(pair: PreferencePair, tokenizer: Any = None) -> tuple[str, str, str]:
    """``(prompt_text, chosen_text, rejected_text)``; ``prompt_text + chosen_text`` is the whole chosen text.

    Strings are returned as they are. Conversations: with a tokenizer that has a ``chat_template``,
    ``prompt_text = apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)`` and each response text
    is the template's rendering of ``prompt + response`` minus ``prompt_text`` (it keeps the template's end-of-turn
    text). Without a chat template, Anthropic-HH style: each message as ``"\\n\\nHuman: {content}"`` (user),
    ``"\\n\\nAssistant: {content}"`` (assistant) or ``"\\n\\nSystem: {content}"`` (system); ``prompt_text`` ends
    with ``"\\n\\nAssistant:"`` and a response is ``" {content}"``, then its later messages in HH style.

    Raises ``ValueError`` naming the record when the full rendering does not start with the prompt's (a template
    that rewrites earlier turns), for another role in the HH fallback, or a response not starting with an
    assistant message.
    """
    if isinstance(pair.prompt, str):
        return pair.prompt, pair.chosen, pair.rejected
    if getattr(tokenizer, "chat_template", None):
        prompt_text = tokenizer.apply_chat_template(pair.prompt, add_generation_prompt=True, tokenize=False)
        responses = []
        for name, response in (("chosen", pair.chosen), ("rejected", pair.rejected)):
            full = tokenizer.apply_chat_template(pair.prompt + response, tokenize=False)
            if not full.startswith(prompt_text):
                raise ValueError(f"preference record {pair.index}: the chat template's rendering of prompt + {name} "
                                 f"response does not start with its rendering of the prompt (with the generation "
                                 f"prompt), so the response cannot be cut off it: {full[:80]!r} vs "
                                 f"{prompt_text[:80]!r}")
            responses.append(full[len(prompt_text):])
        return prompt_text, responses[0], responses[1]
    prompt_text = "".join(_hh_turn(m, pair.index) for m in pair.prompt) + _ASSISTANT_MARKER
    return prompt_text, _hh_response(pair.chosen, pair.index), _hh_response(pair.rejected, pair.index)


# --------------------------------------------------------------------------------------------- tokenization
def tokenize_pairs(pairs: list[PreferencePair], tokenizer: Any, *, max_length: int, max_prompt_length: int,
                   add_eos: bool = True) -> tuple[list[TokenizedPair], dict[str, int]]:
    """Token ids of each pair: ``render_pair``, then ``tokenizer.encode(text, add_special_tokens=False)`` of the
    prompt and of each response separately (a chat template writes its own BOS; a plain-text pair gets none).

    ``add_eos``: append ``tokenizer.eos_token_id`` to each response (before truncation, so a cut response has none).
    A chat template's response text already ends its turn (``<|im_end|>``); pass ``False`` when that token is the
    EOS. A prompt longer than ``max_prompt_length`` keeps its LAST ``max_prompt_length`` tokens (the most recent
    turns); each response is cut so that ``len(prompt_ids) + len(response_ids) <= max_length``.

    Dropped: pairs whose truncated chosen and rejected ids are identical (they carry no preference), and pairs whose
    prompt or a response tokenizes to nothing. Returns ``(tokenized, stats)``; ``stats`` (counts of pairs):
    ``"pairs"`` (kept), ``"truncated_prompt"`` / ``"truncated_response"`` (kept pairs whose prompt / at least one
    response was cut), ``"dropped_identical"``, ``"dropped_empty"``; ``pairs + dropped_* == len(pairs)``.

    Raises ``ValueError`` if ``max_prompt_length < 1`` or ``max_length <= max_prompt_length`` (naming the argument
    and the values), or ``add_eos`` with a tokenizer without an EOS token; ``render_pair``'s errors.
    """
    if max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be >= 1, got {max_prompt_length}")
    if max_length <= max_prompt_length:
        raise ValueError(f"max_length must be > max_prompt_length (room for a response), got max_length={max_length}, "
                         f"max_prompt_length={max_prompt_length}")
    eos = [tokenizer.eos_token_id] if add_eos else []
    if add_eos and eos[0] is None:
        raise ValueError("add_eos=True needs tokenizer.eos_token_id, which is None; set one or pass add_eos=False")
    stats = dict.fromkeys(_STATS_KEYS, 0)
    tokenized = []
    for pair in pairs:
        prompt_text, chosen_text, rejected_text = render_pair(pair, tokenizer)
        prompt_ids = tokenizer.encode(prompt_text, add_special_tokens=False)
        cut_prompt = len(prompt_ids) > max_prompt_length
        prompt_ids = prompt_ids[-max_prompt_length:]
        budget = max_length - len(prompt_ids)  # >= 1
        chosen_ids, rejected_ids = (tokenizer.encode(t, add_special_tokens=False) + eos
                                    for t in (chosen_text, rejected_text))
        cut_response = max(len(chosen_ids), len(rejected_ids)) > budget
        chosen_ids, rejected_ids = chosen_ids[:budget], rejected_ids[:budget]
        if not prompt_ids or not chosen_ids or not rejected_ids:
            stats["dropped_empty"] += 1
        elif chosen_ids == rejected_ids:
            stats["dropped_identical"] += 1
        else:
            stats["truncated_prompt"] += cut_prompt
            stats["truncated_response"] += cut_response
            tokenized.append(TokenizedPair(prompt_ids, chosen_ids, rejected_ids, pair))
    stats["pairs"] = len(tokenized)
    return tokenized, stats


def split_pairs(pairs: list, num_eval: int) -> tuple[list, list]:
    """``(train, eval)``: the LAST ``num_eval`` pairs are held out (the same convention as ``engine/data/tasks.py``'s
    ``load_task``, so SFT, RM, DPO and PPO runs on one file hold out the same rows). ``num_eval=0`` ->
    ``(pairs, [])``. Raises ``ValueError`` when ``num_eval`` is negative or ``num_eval >= len(pairs)`` (nothing
    would be left to train on)."""
    if num_eval < 0:
        raise ValueError(f"num_eval must be >= 0, got {num_eval}")
    if num_eval == 0:
        return list(pairs), []
    if num_eval >= len(pairs):
        raise ValueError(f"num_eval={num_eval} must be < the number of pairs ({len(pairs)}) so that some remain for "
                         "training")
    return list(pairs[:-num_eval]), list(pairs[-num_eval:])
