"""``engine.runs.checkpoint``: an exact round trip of weights (tied and untied heads), AdamW and scheduler state and every
RNG; the saved directory loads with ``from_pretrained``; atomic commits (a failed save leaves nothing under a
``step-*`` name and the previous checkpoint intact); torn and temporary directories ignored and cleaned; keep_last;
``resolve_resume``."""

import json
import logging
import random

import numpy as np
import pytest
import torch

from engine.runs import checkpoint as ckpt
from engine.runs.checkpoint import (
    capture_rng_state,
    checkpoint_dir,
    find_latest_checkpoint,
    load_checkpoint,
    resolve_resume,
    restore_rng_state,
    save_checkpoint,
)
from engine.models import tiny_model, train_bpe_tokenizer

TEXTS = ["what is 2 + 3? the answer is 5", "what is 7 * 6? the answer is 42"] * 8


def _setup(tied: bool, seed: int = 0):
    model = tiny_model(tie_word_embeddings=tied, num_layers=1, seed=seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    return model, opt, sched


def _train_step(model, opt, sched):
    ids = torch.randint(0, model.config.vocab_size, (2, 8))  # draws from torch's global RNG
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)


def _draws(gen: torch.Generator):
    return (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(),
            torch.rand(3, generator=gen).tolist())


def _assert_same_params(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _assert_same_optimizer(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys() and sa["state"]
    for i in sa["state"]:
        for k, v in sa["state"][i].items():
            assert torch.equal(v, sb["state"][i][k]), (i, k)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_round_trip_resumes_exactly(tmp_path, tied):
    torch.manual_seed(0)
    model, opt, sched = _setup(tied)
    gen = torch.Generator().manual_seed(123)
    torch.rand(5, generator=gen)
    _train_step(model, opt, sched)
    random.seed(1)
    np.random.seed(2)
    tok = train_bpe_tokenizer(TEXTS, vocab_size=300)
    path = save_checkpoint(tmp_path, 1, model=model, tokenizer=tok, optimizer=opt, scheduler=sched,
                           rng_state=capture_rng_state({"sampler": gen}),
                           trainer_state={"data_position": 16, "skipped_steps": 0, "wandb_id": "abc"})
    assert path == tmp_path / "checkpoints" / "step-00000001" and ckpt.is_complete(path)
    marker = json.loads((path / "COMPLETE").read_text())
    assert marker["step"] == 1 and "model.safetensors" in marker["files"] and "optimizer.pt" in marker["files"]
    _train_step(model, opt, sched)  # the step the resumed run must reproduce (its batch comes from torch's RNG)
    expected_draws = _draws(gen)  # and what every generator draws next

    torch.manual_seed(99)  # a fresh process: other weights, other RNG states
    random.seed(99)
    np.random.seed(99)
    model2, opt2, sched2 = _setup(tied, seed=7)
    gen2 = torch.Generator().manual_seed(7)
    state = load_checkpoint(path, model=model2, optimizer=opt2, scheduler=sched2)
    assert state["step"] == 1
    assert state["trainer_state"] == {"data_position": 16, "skipped_steps": 0, "wandb_id": "abc"}
    restore_rng_state(state["rng_state"], {"sampler": gen2})
    if tied:
        assert model2.lm_head.weight is model2.model.embed_tokens.weight
    assert sched2.last_epoch == 1 and sched2.get_last_lr() == pytest.approx([1e-2 * 2 / 3])
    _train_step(model2, opt2, sched2)
    assert _draws(gen2) == expected_draws
    _assert_same_params(model, model2)
    _assert_same_optimizer(opt, opt2)
    assert sched.state_dict() == sched2.state_dict()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_from_pretrained_loads_saved_dir(tmp_path, tied):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, _, _ = _setup(tied)
    tok = train_bpe_tokenizer(TEXTS, vocab_size=300)
    path = save_checkpoint(tmp_path, 3, model=model, tokenizer=tok)
    hf = AutoModelForCausalLM.from_pretrained(path)
    _assert_same_params(model, hf)
    assert AutoTokenizer.from_pretrained(path).encode("what is 2 + 3?") == tok.encode("what is 2 + 3?")
    state = load_checkpoint(path, model=tiny_model(tie_word_embeddings=tied, num_layers=1, seed=5))
    assert state == {"step": 3, "trainer_state": {}, "rng_state": None}


def test_load_into_other_dtype_and_mismatches(tmp_path):
    model, opt, _ = _setup(False)
    path = save_checkpoint(tmp_path, 0, model=model)
    bf16 = tiny_model(num_layers=1, seed=3, dtype=torch.bfloat16)
    load_checkpoint(path, model=bf16)
    assert torch.equal(bf16.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))
    with pytest.raises(ValueError, match="does not match the model: missing"):
        load_checkpoint(path, model=tiny_model(num_layers=2))
    with pytest.raises(ValueError, match="has shape"):
        load_checkpoint(path, model=tiny_model(num_layers=1, intermediate_size=64))
    with pytest.raises(ValueError, match="has no optimizer.pt"):
        load_checkpoint(path, model=model, optimizer=opt)


def _complete_steps(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def test_keep_last_prunes(tmp_path):
    model = tiny_model(num_layers=1)
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, model=model, keep_last=2)
    assert _complete_steps(tmp_path) == ["step-00000030", "step-00000040"]
    save_checkpoint(tmp_path, 40, model=model, trainer_state={"again": True}, keep_last=2)  # same step: replaced
    assert _complete_steps(tmp_path) == ["step-00000030", "step-00000040"]
    assert json.loads((checkpoint_dir(tmp_path, 40) / "trainer_state.json").read_text()) == {"again": True}
    save_checkpoint(tmp_path, 25, model=model, keep_last=2)  # the new one is always kept
    assert _complete_steps(tmp_path) == ["step-00000025", "step-00000040"]
    save_checkpoint(tmp_path, 50, model=model, keep_last=1)
    assert _complete_steps(tmp_path) == ["step-00000050"]
    with pytest.raises(ValueError, match="keep_last must be >= 1"):
        save_checkpoint(tmp_path, 60, model=model, keep_last=0)


def test_torn_checkpoints_ignored_then_cleaned(tmp_path, caplog):
    model = tiny_model(num_layers=1)
    good = save_checkpoint(tmp_path, 5, model=model)
    torn = checkpoint_dir(tmp_path, 9)
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"half")
    leftover = tmp_path / "checkpoints" / ".tmp-step-00000010-4242"
    leftover.mkdir()
    (leftover / "optimizer.pt").write_bytes(b"half")
    with caplog.at_level(logging.WARNING, logger="rlhf_engine.checkpoint"):
        assert find_latest_checkpoint(tmp_path) == good
    assert "ignoring incomplete checkpoint" in caplog.text and "step-00000009" in caplog.text
    assert resolve_resume("auto", tmp_path) == good
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        resolve_resume(str(torn), tmp_path)
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        load_checkpoint(torn, model=model)
    save_checkpoint(tmp_path, 6, model=model, keep_last=3)
    assert _complete_steps(tmp_path) == ["step-00000005", "step-00000006"]


def test_resolve_resume(tmp_path):
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume("auto", tmp_path) is None  # no checkpoints dir at all
    (tmp_path / "checkpoints").mkdir()
    assert resolve_resume("auto", tmp_path) is None  # empty
    with pytest.raises(ValueError, match="does not exist"):
        resolve_resume(str(tmp_path / "nope"), tmp_path)
    path = save_checkpoint(tmp_path, 2, model=tiny_model(num_layers=1))
    assert resolve_resume(str(path), "elsewhere") == path
    with pytest.raises(ValueError, match="a run directory: its newest complete checkpoint is .*step-00000002"):
        resolve_resume(str(tmp_path), tmp_path)


@pytest.mark.parametrize("where", ["model", "optimizer", "marker", "rename", "trainer_state"])
def test_failed_save_leaves_previous_intact(tmp_path, monkeypatch, where):
    model, opt, sched = _setup(False)
    _train_step(model, opt, sched)
    first = save_checkpoint(tmp_path, 1, model=model, optimizer=opt, scheduler=sched)
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    _train_step(model, opt, sched)

    def boom(*args, **kwargs):
        raise OSError("No space left on device")

    state = None
    if where == "model":
        monkeypatch.setattr(model, "save_pretrained", boom)
    elif where == "optimizer":
        monkeypatch.setattr(opt, "state_dict", boom)
    elif where == "marker":
        monkeypatch.setattr(ckpt, "_write_marker", boom)
    elif where == "rename":
        real_replace = ckpt.os.replace
        monkeypatch.setattr(ckpt.os, "replace",
                            lambda a, b: boom() if "step-00000002" in str(b) else real_replace(a, b))
    else:
        state = {"not json": object()}
    with pytest.raises((OSError, TypeError)):
        save_checkpoint(tmp_path, 2, model=model, optimizer=opt, scheduler=sched, trainer_state=state)
    monkeypatch.undo()
    assert _complete_steps(tmp_path) == ["step-00000001"]  # no step-2, no .tmp-* left behind
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert find_latest_checkpoint(tmp_path) == first
    model2, opt2, sched2 = _setup(False, seed=3)
    assert load_checkpoint(first, model=model2, optimizer=opt2, scheduler=sched2)["step"] == 1


def test_failed_resave_of_same_step_restores_it(tmp_path, monkeypatch):
    model = tiny_model(num_layers=1)
    first = save_checkpoint(tmp_path, 1, model=model, trainer_state={"v": 1})
    real_replace = ckpt.os.replace

    def replace(a, b):
        if ".tmp-step" in str(a):
            raise OSError("rename failed")
        return real_replace(a, b)

    monkeypatch.setattr(ckpt.os, "replace", replace)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 1, model=model, trainer_state={"v": 2})
    monkeypatch.undo()
    assert _complete_steps(tmp_path) == ["step-00000001"] and ckpt.is_complete(first)
    assert json.loads((first / "trainer_state.json").read_text()) == {"v": 1}


def test_rng_state_errors_and_weights_only(tmp_path):
    state = capture_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)  # no pickled numpy arrays or other objects
    a = _draws(torch.Generator().manual_seed(0))
    restore_rng_state(loaded)
    assert _draws(torch.Generator().manual_seed(0)) == a
    with pytest.raises(ValueError, match="no saved RNG state for generator 'sampler'"):
        restore_rng_state(loaded, {"sampler": torch.Generator()})
