"""engine.data.preferences: TRL's preference formats (explicit/implicit, strings/conversations), the HH-style prompt
split, every validation error (with the record's index), rendering (HH fallback and chat templates), tokenization
with truncation and drops, the held-out split, and the real HH-RLHF test file."""

from pathlib import Path

import pytest

from engine.data import (
    PreferencePair,
    char_tokenizer,
    load_records,
    render_pair,
    split_pairs,
    split_shared_prefix,
    to_preference_pairs,
    tokenize_pairs,
)

HH_TEST = Path("/work/shared/data/hh-rlhf/harmless-base-test.jsonl.gz")
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def _user(text):
    return {"role": "user", "content": text}


def _assistant(text):
    return {"role": "assistant", "content": text}


def _pair(prompt, chosen, rejected, index=0):
    return PreferencePair(prompt, chosen, rejected, index, {})


def _chat_tokenizer(template=TEMPLATE):
    tok = char_tokenizer()
    tok.chat_template = template
    return tok


# --------------------------------------------------------------------------------------------- formats
def test_explicit_string_pairs_keep_their_record():
    records = [{"prompt": "2+2=", "chosen": " 4", "rejected": " 5", "margin": 1.5},
               {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Lyon"}]
    pairs = to_preference_pairs(records)
    assert [(p.prompt, p.chosen, p.rejected, p.index) for p in pairs] == [
        ("2+2=", " 4", " 5", 0), ("Capital of France?", "Paris", "Lyon", 1)]
    assert pairs[0].record["margin"] == 1.5 and pairs[0].record is records[0]
    assert render_pair(pairs[0]) == ("2+2=", " 4", " 5")  # strings come back as they are
    assert render_pair(pairs[0], _chat_tokenizer()) == ("2+2=", " 4", " 5")  # even with a chat template
    # a None prompt (a column missing in some rows of a Parquet file) counts as absent: implicit
    assert to_preference_pairs([{"prompt": None, "chosen": "Q? yes", "rejected": "Q? no"}])[0].prompt == "Q?"


def test_implicit_string_split_at_word_boundaries():
    assert split_shared_prefix("Q? A: 4", "Q? A: 5") == ("Q? A:", " 4", " 5")
    assert split_shared_prefix("Q? A: four", "Q? A: five") == ("Q? A:", " four", " five")  # back over "f"
    assert split_shared_prefix("Q? A\nyes", "Q? A no") == ("Q? A", "\nyes", " no")  # diverged at whitespace
    assert split_shared_prefix("say B", "say BC") == ("say", " B", " BC")  # one text ends inside the other's word
    assert split_shared_prefix("2+2= 4", "2+2= 5") == ("2+2=", " 4", " 5")
    pairs = to_preference_pairs([{"chosen": "Q? A: 4", "rejected": "Q? A: 5"}])
    assert (pairs[0].prompt, pairs[0].chosen, pairs[0].rejected) == ("Q? A:", " 4", " 5")
    with pytest.raises(ValueError, match="share no prefix"):
        split_shared_prefix("yes", "no")
    with pytest.raises(ValueError, match="no word boundary"):
        split_shared_prefix("2+2=4", "2+2=5")


def test_implicit_hh_split_at_the_last_assistant_marker():
    chosen, rejected = "\n\nHuman: hi\n\nAssistant: I can help", "\n\nHuman: hi\n\nAssistant: I cannot"
    assert split_shared_prefix(chosen, rejected) == ("\n\nHuman: hi\n\nAssistant:", " I can help", " I cannot")
    # responses sharing their first words are still cut at the marker, not at "Sure,"
    history = "\n\nHuman: hi\n\nAssistant: Hello.\n\nHuman: a recipe?\n\nAssistant:"
    prompt, c, r = split_shared_prefix(history + " Sure, take flour", history + " Sure, no")
    assert (prompt, c, r) == (history, " Sure, take flour", " Sure, no")
    # the responses diverge in an earlier turn: the last marker of the common prefix, several turns after it
    c_text = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d"
    r_text = "\n\nHuman: a\n\nAssistant: x\n\nHuman: c\n\nAssistant: d"
    assert split_shared_prefix(c_text, r_text) == (
        "\n\nHuman: a\n\nAssistant:", " b\n\nHuman: c\n\nAssistant: d", " x\n\nHuman: c\n\nAssistant: d")


def test_conversational_explicit_and_implicit():
    prompt = [{"role": "system", "content": "Be kind."}, _user("hi")]
    explicit = {"prompt": prompt, "chosen": [_assistant("Hello!")], "rejected": [_assistant("Go away.")]}
    implicit = {"chosen": [*prompt, _assistant("Hello!")], "rejected": [*prompt, _assistant("Go away.")]}
    for record in (explicit, implicit):
        (pair,) = to_preference_pairs([record])
        assert pair.prompt == prompt
        assert pair.chosen == [_assistant("Hello!")] and pair.rejected == [_assistant("Go away.")]
    # implicit, diverging in an earlier assistant turn: the prompt is the identical leading run
    chosen = [_user("a"), _assistant("b"), _user("c"), _assistant("d")]
    rejected = [_user("a"), _assistant("x"), _user("c"), _assistant("d")]
    (pair,) = to_preference_pairs([{"chosen": chosen, "rejected": rejected}])
    assert pair.prompt == [_user("a")] and pair.chosen == chosen[1:] and pair.rejected == rejected[1:]
    # extra message keys are allowed
    (pair,) = to_preference_pairs([{"prompt": [dict(_user("q"), name="bob")], "chosen": [_assistant("y")],
                                    "rejected": [_assistant("n")]}])
    assert pair.prompt[0]["name"] == "bob"


# --------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(("record", "message"), [
    ({"prompt": "q", "chosen": "a"}, r"data record 1: missing 'rejected' \(its keys: \['chosen', 'prompt'\]\)"),
    ({"text": "q"}, r"data record 1: missing 'chosen' and 'rejected' \(its keys: \['text'\]\)"),
    ({"chosen": "Q? yes", "rejected": "Q? yes"}, "data record 1: 'chosen' and 'rejected' are identical"),
    ({"prompt": "Q?", "chosen": " a", "rejected": " a"},
     "data record 1: the 'chosen' and 'rejected' responses are identical"),
    ({"prompt": " \n", "chosen": "a", "rejected": "b"}, "data record 1: the prompt is empty or whitespace-only"),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "data record 1: the chosen response is empty"),
    ({"prompt": "q", "chosen": "a", "rejected": "\t"}, "data record 1: the rejected response is empty"),
    ({"chosen": "\n\nHuman: x\n\nAssistant: ", "rejected": "\n\nHuman: x\n\nAssistant: no"},
     "data record 1: the chosen response is empty or whitespace-only"),  # empty after the split
    ({"chosen": "yes", "rejected": "no"}, "data record 1: chosen and rejected share no prefix"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"},
     "data record 1: 'chosen' must be a string or a list of .* got int: 3$"),
    ({"prompt": "q", "chosen": "a", "rejected": None}, "data record 1: 'rejected' must be .* got NoneType: None$"),
    ({"prompt": [_user("q")], "chosen": [{"role": "assistant"}], "rejected": [_assistant("n")]},
     r"data record 1: 'chosen' must be .*its message 0 has keys \['role'\]"),
    ({"prompt": [_user("q"), "hi"], "chosen": [_assistant("y")], "rejected": [_assistant("n")]},
     "data record 1: 'prompt' must be .*its message 1 is a str"),
    ({"prompt": [_user("q")], "chosen": [{"role": "assistant", "content": ["part"]}], "rejected": [_assistant("n")]},
     "data record 1: 'chosen' must be .*message 0 has a str role and a list content"),
    ({"prompt": "q", "chosen": [_assistant("y")], "rejected": [_assistant("n")]},
     "data record 1: mixes strings and conversations .*prompt is a string, chosen is a list of messages"),
    ({"prompt": [], "chosen": [_assistant("y")], "rejected": [_assistant("n")]},
     "data record 1: the prompt is empty"),
    ({"prompt": [_user("q")], "chosen": [], "rejected": [_assistant("n")]},
     "data record 1: the chosen response has no message"),
    ({"prompt": [_user("q")], "chosen": [_user("y")], "rejected": [_assistant("n")]},
     "data record 1: the chosen response must start with an assistant message, got role 'user'"),
    ({"prompt": [_user("q")], "chosen": [_assistant("y")], "rejected": [_assistant(" ")]},
     "data record 1: the rejected response is empty or whitespace-only"),
    ({"chosen": [_user("a"), _assistant("b")], "rejected": [_user("z"), _assistant("b")]},
     "data record 1: the 'chosen' and 'rejected' conversations share no leading message"),
    ({"chosen": [_user("a"), _assistant("b")], "rejected": [_user("a"), _assistant("b")]},
     "data record 1: 'chosen' and 'rejected' are identical"),
    ("not a row", "data record 1 is a str, expected a dict"),
])
def test_to_preference_pairs_errors_name_the_record(record, message):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    with pytest.raises(ValueError, match=message):
        to_preference_pairs([good, record])


def test_empty_records_and_source_name():
    with pytest.raises(ValueError, match="train.jsonl: no records"):
        to_preference_pairs([], source="train.jsonl")
    with pytest.raises(ValueError, match="train.jsonl record 0: missing 'chosen'"):
        to_preference_pairs([{"rejected": "x"}], source="train.jsonl")


def test_allow_empty_response():
    record = {"chosen": "\n\nHuman: x\n\nAssistant: ", "rejected": "\n\nHuman: x\n\nAssistant: no"}
    (pair,) = to_preference_pairs([record], allow_empty_response=True)
    assert (pair.prompt, pair.chosen, pair.rejected) == ("\n\nHuman: x\n\nAssistant:", " ", " no")
    with pytest.raises(ValueError, match="the prompt is empty"):  # the prompt is still checked
        to_preference_pairs([{"prompt": "", "chosen": "", "rejected": "b"}], allow_empty_response=True)


# --------------------------------------------------------------------------------------------- rendering
def test_render_hh_fallback_round_trips_through_the_implicit_split():
    prompt = [{"role": "system", "content": "Be kind."}, _user("hi"), _assistant("Hello."), _user("help?")]
    pair = _pair(prompt, [_assistant("Sure.")], [_assistant("No."), _user("why?"), _assistant("Because.")], index=7)
    prompt_text, chosen_text, rejected_text = render_pair(pair)
    assert prompt_text == ("\n\nSystem: Be kind.\n\nHuman: hi\n\nAssistant: Hello.\n\nHuman: help?"
                           "\n\nAssistant:")
    assert chosen_text == " Sure."
    assert rejected_text == " No.\n\nHuman: why?\n\nAssistant: Because."
    assert render_pair(pair, char_tokenizer()) == (prompt_text, chosen_text, rejected_text)  # no chat template
    # the rendered full texts, read back as an implicit HH pair, split at the same place
    assert split_shared_prefix(prompt_text + chosen_text, prompt_text + rejected_text) == (
        prompt_text, chosen_text, rejected_text)
    with pytest.raises(ValueError, match="preference record 3: role 'tool' has no Anthropic-HH rendering"):
        render_pair(_pair([{"role": "tool", "content": "42"}], [_assistant("y")], [_assistant("n")], index=3))
    with pytest.raises(ValueError, match="preference record 4: a response must start with an assistant message"):
        render_pair(_pair([_user("q")], [_user("y")], [_assistant("n")], index=4))


def test_render_with_chat_template():
    tok = _chat_tokenizer()
    pair = _pair([_user("hi")], [_assistant("Hello!")], [_assistant("Bye."), _user("?"), _assistant("!")])
    assert render_pair(pair, tok) == ("<user>hi\n<assistant>", "Hello!\n", "Bye.\n<user>?\n<assistant>!\n")
    # a template that renders earlier turns differently once an assistant reply follows cannot be cut
    odd = _chat_tokenizer("{% if not add_generation_prompt %}[done]{% endif %}" + TEMPLATE)
    with pytest.raises(ValueError, match="preference record 9: the chat template's rendering of prompt \\+ chosen"):
        render_pair(_pair([_user("hi")], [_assistant("a")], [_assistant("b")], index=9), odd)


# --------------------------------------------------------------------------------------------- tokenization
def test_tokenize_pairs_truncates_and_appends_eos():
    tok = char_tokenizer()
    ids = lambda text: tok.encode(text, add_special_tokens=False)
    eos = tok.eos_token_id
    pairs = [_pair("abcdef", "xy", "z", index=0),  # prompt cut to its last 4 tokens
             _pair("ab", "0123456789", "9", index=1),  # chosen cut to max_length - 2
             _pair("ab", "abc", "abd", index=2)]  # short: both EOS-terminated
    tokenized, stats = tokenize_pairs(pairs, tok, max_length=8, max_prompt_length=4)
    assert [t.pair.index for t in tokenized] == [0, 1, 2]
    assert tokenized[0].prompt_ids == ids("cdef")
    assert tokenized[0].chosen_ids == ids("xy") + [eos] and tokenized[0].rejected_ids == ids("z") + [eos]
    assert tokenized[1].prompt_ids == ids("ab") and tokenized[1].chosen_ids == ids("012345")  # no room for EOS
    assert tokenized[1].rejected_ids == ids("9") + [eos]
    assert tokenized[2].chosen_ids == ids("abc") + [eos]
    assert all(len(t.prompt_ids) + max(len(t.chosen_ids), len(t.rejected_ids)) <= 8 for t in tokenized)
    assert stats == {"pairs": 3, "truncated_prompt": 1, "truncated_response": 1, "dropped_identical": 0,
                     "dropped_empty": 0}
    no_eos, _ = tokenize_pairs(pairs[2:], tok, max_length=8, max_prompt_length=4, add_eos=False)
    assert no_eos[0].chosen_ids == ids("abc")


def test_tokenize_pairs_drops_identical_and_empty():
    tok = char_tokenizer()
    pairs = [_pair("p", "abc1", "abc2", index=0),  # identical once cut to 3 tokens
             _pair("", "a", "b", index=1),  # an empty prompt
             _pair("p", "abc", "abd", index=2),
             _pair("p", "", "b", index=3)]  # an empty chosen response without EOS
    tokenized, stats = tokenize_pairs(pairs, tok, max_length=4, max_prompt_length=1)
    assert [t.pair.index for t in tokenized] == [2, 3]  # with EOS, "" is one token
    assert stats == {"pairs": 2, "truncated_prompt": 0, "truncated_response": 1, "dropped_identical": 1,
                     "dropped_empty": 1}
    tokenized, stats = tokenize_pairs(pairs, tok, max_length=4, max_prompt_length=1, add_eos=False)
    assert [t.pair.index for t in tokenized] == [2]
    assert stats["dropped_empty"] == 2 and stats["dropped_identical"] == 1
    assert stats["pairs"] + stats["dropped_empty"] + stats["dropped_identical"] == len(pairs)


def test_tokenize_pairs_conversations_and_errors():
    tok = _chat_tokenizer()
    pair = _pair([_user("hi")], [_assistant("yo")], [_assistant("no")])
    (t,), _ = tokenize_pairs([pair], tok, max_length=64, max_prompt_length=32)
    assert tok.decode(t.prompt_ids) == "<user>hi\n<assistant>"
    assert tok.decode(t.chosen_ids) == "yo\n<eos>"
    with pytest.raises(ValueError, match="max_prompt_length must be >= 1, got 0"):
        tokenize_pairs([pair], tok, max_length=8, max_prompt_length=0)
    with pytest.raises(ValueError, match="max_length must be > max_prompt_length .*max_length=8, max_prompt_length=8"):
        tokenize_pairs([pair], tok, max_length=8, max_prompt_length=8)


# --------------------------------------------------------------------------------------------- split
def test_split_pairs_holds_out_the_last_rows():
    items = list(range(10))
    assert split_pairs(items, 3) == ([0, 1, 2, 3, 4, 5, 6], [7, 8, 9])
    assert split_pairs(items, 0) == (items, [])
    assert split_pairs(items, 9) == ([0], list(range(1, 10)))
    with pytest.raises(ValueError, match=r"num_eval=10 must be < the number of pairs \(10\)"):
        split_pairs(items, 10)
    with pytest.raises(ValueError, match="num_eval must be >= 0"):
        split_pairs(items, -1)


# --------------------------------------------------------------------------------------------- real data
@pytest.mark.skipif(not HH_TEST.is_file(), reason=f"{HH_TEST} not present")
def test_real_hh_harmless_test_split():
    records = load_records(HH_TEST)
    # 4 rows have a chosen response of " " (the preferred reply was to say nothing): rejected by default
    with pytest.raises(ValueError, match=r"hh record 86: the chosen response is empty or whitespace-only \(' '\)"):
        to_preference_pairs(records, source="hh")
    pairs = to_preference_pairs(records, source="hh", allow_empty_response=True)
    assert len(pairs) == 2312
    assert all(p.prompt.endswith("\n\nAssistant:") and p.prompt.startswith("\n\nHuman:") for p in pairs)
    assert all(p.prompt + p.chosen == r["chosen"] and p.prompt + p.rejected == r["rejected"]
               for p, r in zip(pairs, records, strict=True))
    assert all(p.chosen.startswith(" ") and p.rejected.startswith(" ") for p in pairs)
    empty = [p.index for p in pairs if not p.chosen.strip() or not p.rejected.strip()]
    assert empty == [86, 516, 925, 1103]
    assert all(not p.chosen.strip() for p in pairs if p.index in empty)  # only chosen ones
    train, held_out = split_pairs(pairs, 100)
    assert len(train) == 2212 and held_out[0].index == 2212
