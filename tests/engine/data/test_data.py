"""engine.data: load_records (jsonl/json/directories, errors), GSM8K conversion, prompt formatting, the arithmetic
task (determinism, disjoint splits, correct answers, SFT targets) and its character-level tokenizer."""

import gzip
import json
import operator
import re
import sys
from pathlib import Path

import pytest

from engine.data import (
    PLAIN_TEMPLATE,
    R1_SYSTEM_PROMPT,
    RAW_TEMPLATE,
    arithmetic_problems,
    arithmetic_sft_completion,
    arithmetic_splits,
    char_tokenizer,
    format_prompt,
    gsm8k_answer,
    load_gsm8k,
    load_records,
    to_prompt_record,
)
from engine.rewards import accuracy_reward, format_reward

GSM8K_TEST = Path("/work/shared/data/gsm8k/test.jsonl")
HH_TEST = Path("/work/shared/data/hh-rlhf/harmless-base-test.jsonl.gz")

GSM8K_SAMPLE = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples?", "answer": "3+4=<<3+4=7>>7\n#### 7"},
    {"question": "A house costs $80,000 plus $50,000. Total?",
     "answer": "80,000+50,000=<<80000+50000=130000>>130,000\n#### 130,000"},
    {"question": "It was 5 degrees and fell by 12. Now?", "answer": "5-12=<<5-12=-7>>-7\n#### -7"},
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------- load_records
def test_load_jsonl_and_limit(tmp_path):
    rows = [{"prompt": f"q{i}", "answer": str(i)} for i in range(5)]
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    with path.open("a") as f:
        f.write("\n   \n")  # blank lines are skipped
    assert load_records(path) == rows
    assert load_records(str(path), limit=2) == rows[:2]
    assert load_records(path, limit=0) == []
    with pytest.raises(ValueError, match="limit must be"):
        load_records(path, limit=-1)


def test_load_json_layouts(tmp_path):
    rows = [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"}]
    (tmp_path / "list.json").write_text(json.dumps(rows))
    (tmp_path / "data.json").write_text(json.dumps({"version": 1, "data": rows}))
    (tmp_path / "splits.json").write_text(json.dumps({"train": rows, "test": rows[:1]}))
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in rows))  # JSON Lines named .json
    assert load_records(tmp_path / "list.json") == rows
    assert load_records(tmp_path / "data.json") == rows
    assert load_records(tmp_path / "splits.json") == rows  # "train" by default
    assert load_records(tmp_path / "splits.json", split="test") == rows[:1]
    assert load_records(tmp_path / "lines.json", limit=1) == rows[:1]
    (tmp_path / "bad.json").write_text(json.dumps({"a": rows, "b": rows}))
    with pytest.raises(ValueError, match="bad.json: a JSON object must hold the records"):
        load_records(tmp_path / "bad.json")
    (tmp_path / "scalar.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="record 0 is a JSON int"):
        load_records(tmp_path / "scalar.json")


def test_load_records_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\n\n{"a": 2\n{"a": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: line 3 is not valid JSON"):
        load_records(bad)
    (tmp_path / "list_line.jsonl").write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match="line 2 is a JSON list"):
        load_records(tmp_path / "list_line.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty.jsonl: the file is empty"):
        load_records(tmp_path / "empty.jsonl")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="holds no records"):
        load_records(tmp_path / "blank.jsonl")
    (tmp_path / "d.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="unsupported file type '.csv'"):
        load_records(tmp_path / "d.csv")
    with pytest.raises(FileNotFoundError, match="missing.jsonl: no such file"):
        load_records(tmp_path / "missing.jsonl")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_records("./nowhere/data.jsonl")
    with pytest.raises(FileNotFoundError, match="no file for split 'validation'"):
        load_records(tmp_path, split="validation")


def test_load_directory_splits(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", [{"x": 1}, {"x": 2}])
    _write_jsonl(tmp_path / "test.jsonl", [{"x": 3}])
    assert load_records(tmp_path) == [{"x": 1}, {"x": 2}]
    assert load_records(tmp_path, split="test") == [{"x": 3}]
    shards = tmp_path / "hub" / "data"
    shards.mkdir(parents=True)
    _write_jsonl(shards / "train-00001-of-00002.jsonl", [{"x": 12}])
    _write_jsonl(shards / "train-00000-of-00002.jsonl", [{"x": 10}, {"x": 11}])
    assert load_records(tmp_path / "hub") == [{"x": 10}, {"x": 11}, {"x": 12}]  # shards in order
    assert load_records(tmp_path / "hub", limit=2) == [{"x": 10}, {"x": 11}]


def test_load_gzip(tmp_path):
    rows = [{"chosen": f"c{i}", "rejected": f"r{i}"} for i in range(4)]
    path = tmp_path / "pairs.JSONL.gz"  # the suffix is matched case-insensitively
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    assert load_records(path) == rows
    assert load_records(str(path), limit=3) == rows[:3]
    with gzip.open(tmp_path / "d.json.gz", "wt", encoding="utf-8") as f:
        json.dump({"test": rows[:1], "train": rows}, f)
    assert load_records(tmp_path / "d.json.gz") == rows
    assert load_records(tmp_path / "d.json.gz", split="test") == rows[:1]
    with gzip.open(tmp_path / "lines.json.gz", "wt", encoding="utf-8") as f:  # JSON Lines named .json.gz
        f.write("\n".join(json.dumps(r) for r in rows))
    assert load_records(tmp_path / "lines.json.gz") == rows
    split_dir = tmp_path / "hh"
    split_dir.mkdir()
    (split_dir / "test.jsonl.gz").write_bytes(path.read_bytes())  # the Hub's HH-RLHF layout
    assert load_records(split_dir, split="test") == rows
    # errors: a missing .gz path is a path, not a Hub name; not gzip; a gzipped format we do not read
    with pytest.raises(FileNotFoundError, match="missing.jsonl.gz: no such file"):
        load_records("missing.jsonl.gz")
    (tmp_path / "plain.jsonl.gz").write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(ValueError, match="plain.jsonl.gz: not a valid gzip file"):
        load_records(tmp_path / "plain.jsonl.gz")
    (tmp_path / "cut.jsonl.gz").write_bytes(path.read_bytes()[:-12])
    with pytest.raises(ValueError, match="cut.jsonl.gz: not a valid gzip file"):
        load_records(tmp_path / "cut.jsonl.gz")
    (tmp_path / "d.csv.gz").write_bytes(gzip.compress(b"a,b\n1,2\n"))
    with pytest.raises(ValueError, match=r"unsupported file type '\.csv\.gz'"):
        load_records(tmp_path / "d.csv.gz")
    (tmp_path / "bad.jsonl.gz").write_bytes(gzip.compress(b'{"a": 1}\n{"a": \n'))
    with pytest.raises(ValueError, match="bad.jsonl.gz: line 2 is not valid JSON"):
        load_records(tmp_path / "bad.jsonl.gz")


@pytest.mark.skipif(not HH_TEST.is_file(), reason=f"{HH_TEST} not present")
def test_load_real_hh_gzip():
    rows = load_records(HH_TEST)
    assert len(rows) == 2312
    assert all(set(r) == {"chosen", "rejected"} for r in rows)
    assert rows[0]["chosen"].startswith("\n\nHuman: ")
    assert load_records(str(HH_TEST), limit=5) == rows[:5]


def test_parquet_without_pyarrow(tmp_path, monkeypatch):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1 not really")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # an import of a None entry raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match="d.parquet needs the 'pyarrow' package"):
        load_records(path)


def test_hub_name_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed here; make sure of it where it is
    with pytest.raises(ImportError, match=r"'openai/gsm8k'.*needs the 'datasets' package.*local \.jsonl"):
        load_records("openai/gsm8k", split="test")


# --------------------------------------------------------------------------------------------- GSM8K
def test_gsm8k_inline():
    assert gsm8k_answer("so 2+2=4\n#### 4") == "4"
    assert gsm8k_answer("#### 1,234") == "1234"
    assert gsm8k_answer("#### -7 ") == "-7"
    with pytest.raises(ValueError, match="no '####'"):
        gsm8k_answer("the answer is 4")
    with pytest.raises(ValueError, match="not a number: 'four'"):
        gsm8k_answer("#### four")
    records = [to_prompt_record(dict(r, id=i)) for i, r in enumerate(GSM8K_SAMPLE)]
    assert [r["answer"] for r in records] == ["7", "130000", "-7"]
    assert records[1]["prompt"] == GSM8K_SAMPLE[1]["question"] and records[1]["id"] == 1  # other columns kept
    with pytest.raises(KeyError, match="'answer'"):
        to_prompt_record({"question": "q"})
    # the converted answers are what accuracy_reward checks
    completions = ["<think>.</think><answer>7</answer>", "<answer>$130,000</answer>", "<answer>7</answer>"]
    assert accuracy_reward([r["prompt"] for r in records], completions,
                           answer=[r["answer"] for r in records]) == [1.0, 1.0, 0.0]


@pytest.mark.skipif(not GSM8K_TEST.is_file(), reason=f"{GSM8K_TEST} not present")
def test_gsm8k_real_test_split():
    records = load_gsm8k(GSM8K_TEST)
    assert len(records) == 1319
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", r["answer"]) for r in records)
    assert all(r["prompt"] for r in records)
    # the raw solutions themselves score 1.0 against their extracted answers (#### parsing both ways)
    raw = load_records(GSM8K_TEST, limit=50)
    assert accuracy_reward([""] * 50, [r["answer"] for r in raw], answer=[r["answer"] for r in records[:50]]) \
        == [1.0] * 50


# --------------------------------------------------------------------------------------------- templates
def test_format_prompt_plain():
    assert PLAIN_TEMPLATE == "Question: {prompt}\nAnswer:"
    assert format_prompt(None, "What is 2+2?") == "Question: What is 2+2?\nAnswer:"
    assert format_prompt(None, "2+2", system="Be brief.") == "Be brief.\n\nQuestion: 2+2\nAnswer:"
    assert format_prompt(None, "12+3=", template=RAW_TEMPLATE) == "12+3="
    assert format_prompt(None, "x", system="S", template="[{system}] {prompt} {json: 1}") == "[S] x {json: 1}"
    assert format_prompt(None, "{system}", system="{prompt}", template="{system}|{prompt}") == "{prompt}|{system}"
    tok = char_tokenizer()  # no chat template
    assert format_prompt(tok, "1+1=") == "Question: 1+1=\nAnswer:"
    with pytest.raises(ValueError, match="must contain '{prompt}'"):
        format_prompt(None, "x", template="no placeholder")
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        format_prompt(None, [{"role": "user", "content": "hi"}])
    assert "<think>" in R1_SYSTEM_PROMPT and "</answer>" in R1_SYSTEM_PROMPT


def test_format_prompt_chat_template():
    tok = char_tokenizer()
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    assert format_prompt(tok, "1+1=") == "<user>1+1=\n<assistant>"
    assert format_prompt(tok, "1+1=", system="S") == "<system>S\n<user>1+1=\n<assistant>"
    conversation = [{"role": "system", "content": "own"}, {"role": "user", "content": "q"}]
    assert format_prompt(tok, conversation, system="ignored") == "<system>own\n<user>q\n<assistant>"
    assert format_prompt(tok, "1+1=", template=RAW_TEMPLATE) == "1+1="  # an explicit template wins


# --------------------------------------------------------------------------------------------- arithmetic
_EVAL = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def _evaluate(prompt):
    a, op, b = re.fullmatch(r"(\d+)([+\-*])(\d+)=", prompt).groups()
    return _EVAL[op](int(a), int(b))


def _key(prompt):
    a, op, b = re.fullmatch(r"(\d+)([+\-*])(\d+)=", prompt).groups()
    return (op, *sorted((a, b))) if op in "+*" else (op, a, b)


def test_arithmetic_problems():
    problems = arithmetic_problems(300, seed=0, digits=3, ops="+-*")
    assert problems == arithmetic_problems(300, seed=0, digits=3, ops="+-*")
    assert problems[:100] == arithmetic_problems(100, seed=0, digits=3, ops="+-*")  # a prefix
    assert problems != arithmetic_problems(300, seed=1, digits=3, ops="+-*")
    assert all(str(_evaluate(p["prompt"])) == p["answer"] for p in problems)
    assert len({_key(p["prompt"]) for p in problems}) == 300  # distinct, commuted copies included
    assert {re.search(r"[+\-*]", p["prompt"]).group() for p in problems} == set("+-*")
    assert all(max(map(int, re.findall(r"\d+", p["prompt"]))) < 1000 for p in problems)
    assert any(p["answer"].startswith("-") for p in problems)
    # every 1-digit addition: 55 unordered pairs exist, and no more can be asked for
    assert len(arithmetic_problems(55, seed=3, digits=1, ops="+")) == 55
    with pytest.raises(ValueError, match="only 55 distinct problems"):
        arithmetic_problems(56, seed=3, digits=1, ops="+")
    with pytest.raises(ValueError, match="ops must be"):
        arithmetic_problems(3, seed=0, ops="/")


def test_arithmetic_splits_disjoint():
    train, held_out = arithmetic_splits(500, 200, seed=7, digits=2, ops="+-")
    assert len(train) == 500 and len(held_out) == 200
    assert not {_key(p["prompt"]) for p in train} & {_key(p["prompt"]) for p in held_out}
    _, held_out_2 = arithmetic_splits(50, 200, seed=7, digits=2, ops="+-")
    assert held_out_2 == held_out  # the held-out set does not depend on n_train


def test_arithmetic_sft_completion_scores_full_reward():
    problems = arithmetic_problems(20, seed=1, digits=3, ops="+-")
    record = {"prompt": "123+45=", "answer": "168"}
    assert arithmetic_sft_completion(record) == "<think></think><answer>168</answer>"
    assert arithmetic_sft_completion(record, style="echo") == "<think>123+45</think><answer>168</answer>"
    assert arithmetic_sft_completion(record, style="reverse") == "<think>861</think><answer>168</answer>"
    assert arithmetic_sft_completion({"prompt": "5-120=", "answer": "-115"}, style="reverse") == \
        "<think>-511</think><answer>-115</answer>"
    for style in ("answer", "echo", "reverse"):
        completions = [arithmetic_sft_completion(p, style=style) for p in problems]
        prompts = [p["prompt"] for p in problems]
        assert format_reward(prompts, completions) == [1.0] * 20
        assert accuracy_reward(prompts, completions, answer=[p["answer"] for p in problems]) == [1.0] * 20
    with pytest.raises(ValueError, match="style must be"):
        arithmetic_sft_completion(record, style="cot")


# --------------------------------------------------------------------------------------------- char_tokenizer
def test_char_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer

    tok = char_tokenizer(extra_tokens=["<sep>", "#"])
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert [tok.convert_tokens_to_ids(t) for t in ("<think>", "</think>", "<answer>", "</answer>")] == [4, 5, 6, 7]
    texts = [p["prompt"] + arithmetic_sft_completion(p, style=s)
             for p in arithmetic_problems(10, seed=0, ops="+-*") for s in ("answer", "echo", "reverse")]
    texts += ["Question: What is 2+2?\nAnswer: 4", "  two  spaces\n\nand <sep> tabs? no", "<think>\n</think>"]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
        assert tok.decode(ids, skip_special_tokens=True) == text  # the tags are not special tokens
    assert tok.encode("12", add_special_tokens=True) == tok.encode("12", add_special_tokens=False)  # no BOS/EOS
    # a tag is one token, so a completion is short: 4 tags + 3 digits
    assert len(tok.encode("<think></think><answer>168</answer>", add_special_tokens=False)) == 7
    assert len(tok.encode("<sep>", add_special_tokens=False)) == 1
    assert tok.decode(tok.encode("a\u00e9b", add_special_tokens=False)) == "a<unk>b"
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tok.get_vocab() and loaded.eos_token_id == 1
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        assert loaded.encode(text, add_special_tokens=False) == ids and loaded.decode(ids) == text
    small = char_tokenizer(chars="0123456789+-*=")
    assert len(small) == 8 + 14
    assert small.decode(small.encode("12+3=<answer>15</answer>", add_special_tokens=False)) == \
        "12+3=<answer>15</answer>"
