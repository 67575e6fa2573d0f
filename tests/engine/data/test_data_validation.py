"""Bad data and settings fail before training, naming the file, record and field (issue 9, part 3).

SFT examples are capped at ``data.max_length`` tokens (a long completion is cut, its EOS kept, and the count is
printed); prompts left out for length are counted aloud; bytes that are not UTF-8 name the file, line and column;
prompt / completion / answer values of the wrong type name the source, the record and the field at load time, before
a model is built; a missing model, tokenizer, reward-model or critic directory names its setting; ``prompts_per_step``
larger than the training set is refused; a micro-batch that does not divide its batch gives the same update (PPO).
"""

from __future__ import annotations

import copy
import gzip
import json
import types

import pytest
import torch

from engine.algorithms import make_batch
from engine.algorithms.ppo import ppo_epochs
from engine.config import DataConfig, GRPORunConfig, PPORunConfig, RewardModelRunConfig, SFTRunConfig, load_config
from engine.data import char_tokenizer, load_records
from engine.models import require_local_dir, tiny_model
from engine.models.value_model import load_value_model, value_model_from_causal_lm
from engine.trainers.preference import RewardModelTrainer
from engine.trainers.ppo import PPOTrainer
from engine.trainers.sft import SFTTrainer
from engine.data.tasks import load_task, tokenize
from engine.trainers.grpo import GRPOTrainer

COMMON = [
    "model.tiny_overrides={hidden_size: 32, num_layers: 1, num_heads: 2, num_kv_heads: 1, intermediate_size: 64}",
    "model.dtype=float32", "trainer.device=cpu", "trainer.progress_bar=false",
]

pytestmark = pytest.mark.usefixtures("one_thread")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def sft_config(tmp_path, data, *overrides: str) -> SFTRunConfig:
    return load_config(SFTRunConfig, None, [f"trainer.output_dir={tmp_path / 'run'}", f"data.train={data}", *COMMON,
                                            "data.template={prompt}", "data.num_eval=0", "sft.max_steps=1",
                                            "sft.batch_size=4", "sft.micro_batch_size=4", *overrides])


def no_model_build(monkeypatch):
    """Make building a model fail the test: the errors under test must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the bad input was reported")

    monkeypatch.setattr("engine.trainers.base.build_policy", refuse)


# ------------------------------------------------------------------------------------------- SFT max_length
def test_sft_cuts_a_long_completion_to_data_max_length_and_counts_it(tmp_path, capsys):
    rows = [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(7)]
    rows.append({"prompt": "9+9=", "completion": "18" * 2500})  # 5,000 characters, one token each
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    tr = SFTTrainer(sft_config(tmp_path, data, "data.max_length=64", "data.max_prompt_tokens=16"))
    tok = tr.tokenizer
    for e in tr.train_examples:
        target = tr.targets[id(e)]
        assert len(e.prompt_ids) + len(target) <= 64
        assert target[-1] == tok.eos_token_id  # a cut completion still ends with EOS: the model learns to stop
        full = tok.encode(e.completion, add_special_tokens=False)
        assert target[:-1] == full[:len(target) - 1]  # cut at the end, never elsewhere
    long = next(e for e in tr.train_examples if e.record["prompt"] == "9+9=")
    assert len(long.prompt_ids) + len(tr.targets[id(long)]) == 64
    assert tr.truncated_completions == 1
    assert "SFT: 1 of 8 completions cut to fit data.max_length=64" in capsys.readouterr().out
    assert tr.eval_max_tokens <= 64 + 8
    tr.train()  # the step that draws it is an ordinary step


def test_sft_default_max_length_caps_a_1mb_completion(tmp_path):
    """The issue's case: a 1 MB completion was kept whole and the step that drew it tried to allocate ~1 TB."""
    rows = [{"prompt": "1+1=", "completion": "2"}, {"prompt": "2+2=", "completion": "4" * 1_000_000}]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    tr = SFTTrainer(sft_config(tmp_path, data, "sft.batch_size=2", "sft.micro_batch_size=2"))
    assert max(len(e.prompt_ids) + len(tr.targets[id(e)]) for e in tr.train_examples) == 1024  # the default
    tr.train()


def test_sft_needs_max_length_above_max_prompt_tokens(tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "1+1=", "completion": "2"}])
    monkeypatch.setattr("engine.trainers.base.PromptTask", None)  # fails before any data is loaded
    with pytest.raises(ValueError, match=r"data\.max_length=16 must be > data\.max_prompt_tokens=16"):
        SFTTrainer(sft_config(tmp_path, data, "data.max_length=16", "data.max_prompt_tokens=16"))


def test_prompts_left_out_for_length_are_counted_at_start(tmp_path, capsys):
    rows = [{"prompt": "1+1=", "completion": "2"}] * 5 + [{"prompt": "x" * 50, "completion": "2"}] * 2
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    tr = SFTTrainer(sft_config(tmp_path, data, "data.max_prompt_tokens=20", "data.num_eval=3"))
    assert len(tr.train_examples) == 4 and len(tr.eval_examples) == 1
    out = capsys.readouterr().out
    assert "prompts longer than data.max_prompt_tokens=20 left out: 0 of 4 training, 2 of 3 held-out" in out


# ------------------------------------------------------------------------------------------------- UTF-8
@pytest.mark.parametrize("name", ["data.jsonl", "data.jsonl.gz", "data.json", "data.json.gz"])
def test_non_utf8_bytes_name_the_file_line_and_column(tmp_path, name):
    # Line 400, after ~10 kB: beyond the read-ahead chunk of a text stream, whose error would point elsewhere.
    lines = [json.dumps({"prompt": f"question {i} " + "x" * 20, "answer": str(i)}).encode() for i in range(600)]
    lines[399] = b'{"prompt": "caf\xe9", "answer": "1"}'  # Latin-1 e-acute
    if name.endswith((".json", ".json.gz")):
        lines = [b"["] + [line + b"," for line in lines[:-1]] + [lines[-1], b"]"]
        lineno = 401
    else:
        lineno = 400
    raw = b"\n".join(lines) + b"\n"
    path = tmp_path / name
    path.write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    with pytest.raises(ValueError) as err:
        load_records(path)
    assert not isinstance(err.value, UnicodeDecodeError)
    assert str(err.value).startswith(f"{path}: line {lineno} is not valid UTF-8 (byte 0xe9 at column 16")


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "caf\xc3\xa9"}\n{"prompt": "b"}\n')
    assert load_records(path) == [{"prompt": "caf\u00e9"}, {"prompt": "b"}]
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + b'[{"prompt": "a"}]')
    assert load_records(tmp_path / "bom.json") == [{"prompt": "a"}]


def test_non_utf8_pairs_fail_when_the_reward_model_trainer_starts(tmp_path, monkeypatch):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b'{"prompt": "q", "chosen": " a", "rejected": " b"}\n'
                     b'{"prompt": "q", "chosen": " \x80", "rejected": " b"}\n')
    monkeypatch.setattr("engine.models.builders.build_policy", None)
    cfg = load_config(RewardModelRunConfig, None, [f"trainer.output_dir={tmp_path / 'run'}", f"data.train={path}",
                                                   *COMMON, "data.num_eval=0"])
    with pytest.raises(ValueError, match=rf"^{path}: line 2 is not valid UTF-8 \(byte 0x80 at column 29: invalid "
                                         r"start byte\); re-encode the file as UTF-8$"):
        RewardModelTrainer(cfg)


# ------------------------------------------------------------------------------------------- record types
BAD_RECORDS = [
    ({"prompt": 42}, r"'prompt' must be a string or a list of \{'role', 'content'\} messages, got int: 42$"),
    ({"prompt": None}, r"'prompt' must be a string or .* got NoneType: None$"),
    ({"prompt": {"role": "user", "content": "hi"}}, r"'prompt' must be a string or .* got dict: \{'role'"),
    ({"prompt": []}, r"'prompt' is an empty list of messages"),
    ({"prompt": [{"role": "user", "content": 5}]}, r"'prompt' must be .* message 0 has a str role and a int content"),
    ({"prompt": [{"role": 1, "content": "x"}]}, r"'prompt' must be .* message 0 has a int role and a str content"),
    ({"prompt": ["hi"]}, r"'prompt' must be .* message 0 is a str"),
    ({"prompt": "q", "completion": ["4", 5]}, r"'completion' must be .* message 0 is a str"),
    ({"prompt": "q", "completion": 7}, r"'completion' must be a string or .* got int: 7$"),
    ({"prompt": "q", "solution": 7}, r"'solution' \(the worked answer .*\) must be a string, got int: 7$"),
    ({"prompt": "q", "answer": [1, 2]}, (r"'answer' \(data\.answer_field, .*\) must be a string, a number or null, "
                                         r"got list: \[1, 2\]$")),
    ({"prompt": "q", "answer": True}, r"'answer' .* must be a string, a number or null, got bool: True$"),
    ({"prompt": "q", "answer": {"x": 1}}, r"'answer' .* got dict"),
    ({"question": "q", "answer": "so #### many"}, r"the GSM8K answer after '####' is not a number: 'many'"),
    ({"query": "q"}, r"record 2 has no 'prompt' column \(data\.prompt_field\); its columns: \['query'\]"),
]


@pytest.mark.parametrize("bad, message", BAD_RECORDS, ids=[str(b) for b, _ in BAD_RECORDS])
def test_bad_record_types_name_the_source_record_and_field(tmp_path, bad, message):
    good = {"prompt": "1+1=", "answer": "2", "completion": "2"}
    data = write_jsonl(tmp_path / "data.jsonl", [good, good, bad, good])
    with pytest.raises(ValueError, match=message) as err:
        load_task(DataConfig(train=str(data), num_eval=0))
    assert str(err.value).startswith(f"{data} record 2")


def test_a_bad_record_fails_before_the_model_is_built(tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "1+1=", "answer": "2"}, {"prompt": 42, "answer": "2"}])
    no_model_build(monkeypatch)
    cfg = load_config(GRPORunConfig, None, [f"trainer.output_dir={tmp_path / 'run'}", f"data.train={data}", *COMMON,
                                            "data.num_eval=0"])
    with pytest.raises(ValueError, match=rf"^{data} record 1: 'prompt' must be .* got int: 42$"):
        GRPOTrainer(cfg)


def test_custom_fields_and_the_held_out_source_are_named(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"query": "a", "gold": "1"}])
    held_out = write_jsonl(tmp_path / "eval.jsonl", [{"query": "a", "gold": "1"}, {"query": "b", "gold": [1]}])
    with pytest.raises(ValueError, match=rf"^{held_out} record 1: 'gold' \(data\.answer_field"):
        load_task(DataConfig(train=str(train), eval=str(held_out), prompt_field="query", answer_field="gold"))
    bad_prompt = write_jsonl(tmp_path / "bad.jsonl", [{"query": 3.5}])
    with pytest.raises(ValueError, match=rf"^{bad_prompt} record 0: 'query' must be a string"):
        load_task(DataConfig(train=str(bad_prompt), prompt_field="query", num_eval=0))


def test_well_typed_records_load(tmp_path):
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+1?"}]
    rows = [
        {"prompt": "1+1=", "answer": "2", "completion": "2"},
        {"prompt": "2+2=", "answer": 4, "completion": [{"role": "assistant", "content": "4"}]},
        {"prompt": chat, "answer": 2.5, "completion": None, "solution": "2.5"},
        {"prompt": "3+3=", "answer": None},
    ]
    train, _, _ = load_task(DataConfig(train=str(write_jsonl(tmp_path / "d.jsonl", rows)), num_eval=0))
    assert [r["prompt"] for r in train] == ["1+1=", "2+2=", chat, "3+3="]
    examples, _ = tokenize([train[0], train[1], train[3]], char_tokenizer(), DataConfig(), builtin=False)
    assert [e.completion for e in examples] == ["2", "4", None]  # messages train on their text, not their repr


def test_a_conversation_with_a_plain_template_or_no_chat_template_is_named(tmp_path):
    chat = [{"role": "user", "content": "1+1?"}]
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a"}, {"prompt": chat}])
    with pytest.raises(ValueError, match=rf"^{data} record 1: 'prompt' is a conversation .* data\.template="):
        load_task(DataConfig(train=str(data), num_eval=0, template="Q: {prompt}"))
    train, _, _ = load_task(DataConfig(train=str(data), num_eval=0))
    with pytest.raises(ValueError, match=r"^record 1 \('prompt': \[\{'role': 'user'.*\): a conversational prompt .* "
                                         r"needs a tokenizer with a chat template"):
        tokenize(train, char_tokenizer(), DataConfig(), builtin=False)


# ------------------------------------------------------------------------------------------- missing paths
def test_require_local_dir_names_the_setting_and_the_path(tmp_path, monkeypatch):
    assert require_local_dir(tmp_path, "model.path") == tmp_path
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=rf"^ppo\.reward_model='{missing}': the directory does not exist$"):
        require_local_dir(missing, "ppo.reward_model")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"^model\.path='.*file' is a file, not a directory"):
        require_local_dir(tmp_path / "file", "model.path")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"model\.tokenizer='org/tok': the directory does not exist \(looked "
                                                rf"for at {tmp_path}/org/tok\), and it is not a repo id in the local "):
        require_local_dir("org/tok", "model.tokenizer")


def test_load_value_model_of_a_missing_directory_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        load_value_model(tmp_path / "no_rm")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        load_value_model(tmp_path / "empty")


@pytest.mark.parametrize("cls, config, setting", [
    (PPOTrainer, PPORunConfig, "ppo.reward_model"),
    (PPOTrainer, PPORunConfig, "ppo.critic_path"),
    (GRPOTrainer, GRPORunConfig, "model.path"),
    (GRPOTrainer, GRPORunConfig, "model.tokenizer"),
])
def test_a_missing_model_directory_names_its_setting(tmp_path, monkeypatch, cls, config, setting):
    missing = tmp_path / "no_such_dir"
    extra = ["ppo.rewards=[accuracy]"] if setting == "ppo.critic_path" else []
    cfg = load_config(config, None, [f"trainer.output_dir={tmp_path / 'run'}", *COMMON, "data.num_eval=8",
                                     f"{setting}={missing}", *extra])
    monkeypatch.setattr("engine.models.builders.tiny_model", None)  # no model work before the check
    with pytest.raises(FileNotFoundError, match=rf"^{setting}='{missing}': the directory does not exist"):
        cls(cfg)


# ---------------------------------------------------------------------------------------- prompts_per_step
def test_prompts_per_step_above_the_training_set_is_refused(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(6)])
    common = [*COMMON, f"data.train={data}", "data.num_eval=2", "generation.max_tokens=4"]
    grpo = load_config(GRPORunConfig, None, [f"trainer.output_dir={tmp_path / 'g'}", *common,
                                             "grpo.prompts_per_step=5", "grpo.num_generations=2"])
    with pytest.raises(ValueError, match=r"^grpo\.prompts_per_step=5 is more than the 4 training prompts"):
        GRPOTrainer(grpo)
    ppo = load_config(PPORunConfig, None, [f"trainer.output_dir={tmp_path / 'p'}", *common, "ppo.rewards=[accuracy]",
                                           "ppo.prompts_per_step=8", "ppo.mini_batch_size=4",
                                           "ppo.micro_batch_size=4"])
    with pytest.raises(ValueError, match=r"^ppo\.prompts_per_step=8 is more than the 4 training prompts"):
        PPOTrainer(ppo)
    grpo.grpo.prompts_per_step = 4  # all of them: accepted
    grpo.trainer.output_dir = str(tmp_path / "g4")
    assert len(GRPOTrainer(grpo).train_examples) == 4


# --------------------------------------------------------------------------------------------- batch sizes
def test_ppo_micro_batch_that_does_not_divide_the_mini_batch_gives_the_same_update():
    """Documented behaviour: micro-batches of 3 over mini-batches of 4 (the last micro-batch has 1 row) step the actor
    and the critic exactly as one micro-batch of 4 does (losses normalised by the mini-batch's counts)."""
    torch.manual_seed(0)
    policy = tiny_model(vocab_size=40, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                        intermediate_size=64, seed=0).train()
    critic = value_model_from_causal_lm(policy, seed=0)
    B = 8
    prompts = [torch.randint(4, 40, (int(n),)).tolist() for n in torch.randint(2, 6, (B,))]
    responses = [torch.randint(4, 40, (int(n),)).tolist() for n in torch.randint(1, 7, (B,))]
    batch = make_batch(prompts, responses, 0, "cpu")
    mask = batch.response_mask
    old_lp = torch.randn(mask.shape) * 0.1 - 3.0
    advantages, values, returns = (torch.randn(mask.shape) * mask for _ in range(3))
    after = []
    for micro in (4, 3):
        cfg = types.SimpleNamespace(ppo_epochs=1, mini_batch_size=4, micro_batch_size=micro, clip_ratio_low=0.2,
                                    clip_ratio_high=0.2, loss_agg_mode="token-mean", kl_coef=0.0, kl_estimator="k3",
                                    rollout_is=None, rollout_is_cap=2.0, cliprange_value=0.5)
        p, c = copy.deepcopy(policy), copy.deepcopy(critic)
        out = ppo_epochs(p, torch.optim.SGD(p.parameters(), lr=0.1), c, torch.optim.SGD(c.parameters(), lr=0.1),
                         batch, old_logprobs=old_lp * mask, advantages=advantages, old_values=values,
                         returns=returns, cfg=cfg, temperature=1.0, max_grad_norm=1e9,
                         generator=torch.Generator().manual_seed(0))
        assert out["ppo/updates"] == 2
        after.append({**{f"actor.{k}": v.detach().clone() for k, v in p.named_parameters()},
                      **{f"critic.{k}": v.detach().clone() for k, v in c.named_parameters()}})
    assert any(not torch.equal(after[0][f"actor.{k}"], v) for k, v in policy.named_parameters())  # it moved
    for name, value in after[0].items():
        torch.testing.assert_close(after[1][name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("config, overrides", [
    (GRPORunConfig, ["grpo.prompts_per_step=3", "grpo.num_generations=3", "grpo.micro_batch_size=4"]),  # 4 of 9
    (GRPORunConfig, ["grpo.prompts_per_step=2", "grpo.num_generations=2", "grpo.micro_batch_size=64"]),  # one pass
    (SFTRunConfig, ["sft.batch_size=8", "sft.micro_batch_size=3"]),
    (SFTRunConfig, ["sft.batch_size=8", "sft.micro_batch_size=32"]),
    (RewardModelRunConfig, ["rm.batch_size=8", "rm.micro_batch_size=3"]),
    (RewardModelRunConfig, ["rm.batch_size=8", "rm.micro_batch_size=16"]),
    (PPORunConfig, ["ppo.rewards=[accuracy]", "ppo.prompts_per_step=2", "ppo.num_generations=2",
                    "ppo.mini_batch_size=4", "ppo.micro_batch_size=3"]),
])
def test_documented_batch_splits_are_accepted(config, overrides):
    """Micro-batches need not divide their batch (the last one is smaller, the update the same), and one larger
    than its batch is one pass, except in PPO, where it must fit the mini-batch (see test_config)."""
    load_config(config, None, overrides)
