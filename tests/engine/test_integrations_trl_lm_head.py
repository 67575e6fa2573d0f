"""``engine.integrations.trl.use_fused_logprobs``: our ``kernels.fused_linear_logprobs`` behind TRL's fused-LM-head
contract (``model(..., labels=labels, fused_lm_head=True)``), on the CPU with a tiny random Qwen2. Values and
gradients equal TRL's own head's; other calls are untouched; a TRL run with our rollouts and our head trains;
what it cannot honour is refused before anything changes."""

import copy
import math
import sys

import pytest
import torch

pytest.importorskip("trl")

import huggingface_hub
from datasets import Dataset
from transformers import AutoModelForCausalLM
from trl import GRPOTrainer

from engine.integrations.trl import make_rollout_func, use_fused_logprobs
from engine.models.tiny import tiny_model
from tests.engine.test_integrations_trl import PROMPTS, _config, _reward, _tokenizer


@pytest.fixture
def trl_env(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)  # TRL pings the Hub on init
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _trainer(tmp_path, model=None, **overrides):
    if model is None:  # saved and reloaded: with beta > 0 TRL loads the reference model from the policy's path
        tiny_model("qwen2", seed=0).save_pretrained(tmp_path / "ckpt")
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").train()
    tok = _tokenizer()
    model.generation_config.eos_token_id = tok.eos_token_id
    return GRPOTrainer(model=model, reward_funcs=_reward, args=_config(tmp_path, **overrides),
                       train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tok,
                       rollout_func=make_rollout_func(kv_cache_memory=1 << 22))


def _batch(vocab: int):
    """Two rows, right-padded second row, labels only on the "completion" (positions 5..), as TRL builds them."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :5] = -100
    return ids, mask, labels


def _fused_call(model, ids, mask, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, **kwargs)
    g = torch.Generator().manual_seed(1)
    weights = torch.randn(out.log_probs.shape, generator=g)
    loss = (out.log_probs * weights).sum()
    if out.entropy is not None:
        loss = loss + (out.entropy * weights.flip(0)).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_and_gradients_equal_trls_head(tmp_path, trl_env, temperature):
    trainer = _trainer(tmp_path, temperature=temperature, beta=0.04)
    model = trainer.model
    ids, mask, labels = _batch(model.config.vocab_size)
    theirs, their_grads = _fused_call(model, ids, mask, labels)
    ref_theirs = trainer.ref_model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    use_fused_logprobs(trainer)
    ours, our_grads = _fused_call(model, ids, mask, labels)
    ref_ours = trainer.ref_model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)

    assert ours.log_probs.shape == theirs.log_probs.shape == (2, 11)
    assert torch.equal(ours.label_mask, theirs.label_mask)
    assert (ours.log_probs[~ours.label_mask] == 0).all() and (ours.entropy[~ours.label_mask] == 0).all()
    torch.testing.assert_close(ours.log_probs, theirs.log_probs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.entropy, theirs.entropy, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-5, rtol=1e-5)
    assert their_grads.keys() == our_grads.keys() and "lm_head.weight" in our_grads
    for name, grad in their_grads.items():
        torch.testing.assert_close(our_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    assert ref_ours.entropy is None and ref_theirs.entropy is None  # the reference asks for log-probs only
    torch.testing.assert_close(ref_ours.log_probs, ref_theirs.log_probs, atol=1e-5, rtol=1e-5)
    # the shifted-labels form (context parallelism) and num_items_in_batch
    shifted = labels[:, 1:]
    a = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], shift_labels=shifted, fused_lm_head=True,
              num_items_in_batch=7)
    torch.testing.assert_close(a.log_probs, ours.log_probs, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a.loss, -ours.log_probs.sum() / 7, atol=1e-6, rtol=1e-6)


def test_other_calls_and_a_second_install_are_untouched(tmp_path, trl_env):
    trainer = _trainer(tmp_path)
    model = trainer.model
    ids, mask, _ = _batch(model.config.vocab_size)
    before = model(input_ids=ids, attention_mask=mask).logits
    use_fused_logprobs(trainer)
    installed = model.forward
    use_fused_logprobs(trainer)  # idempotent: not wrapped twice
    assert model.forward.__func__ is installed.__func__
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, before, atol=0, rtol=0)
    out = model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


def test_a_trl_run_with_our_rollouts_and_our_head_trains(tmp_path, trl_env, monkeypatch):
    model = tiny_model("qwen2", seed=0).train()
    initial = copy.deepcopy(model.state_dict())
    trainer = _trainer(tmp_path, model=model, max_steps=2, steps_per_generation=1)
    use_fused_logprobs(trainer)
    head = sys.modules["engine.integrations.trl_lm_head"]
    calls = []
    monkeypatch.setattr(head, "fused_linear_logprobs",
                        lambda *a, _real=head.fused_linear_logprobs, **k: calls.append(1) or _real(*a, **k))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert len(calls) >= 2, "TRL's loss did not go through our head"  # one forward per optimizer step at least
    changed = [n for n, p in model.state_dict().items() if not torch.equal(p, initial[n])]
    assert "lm_head.weight" in changed and any("layers.0.self_attn" in n for n in changed)


def test_what_it_cannot_honour_is_refused_before_any_change(tmp_path, trl_env):
    trainer = _trainer(tmp_path)
    model = trainer.model
    model.config.final_logit_softcapping = 30.0
    forward = model.forward
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        use_fused_logprobs(trainer)
    assert model.forward == forward
    model.config.final_logit_softcapping = None
    plain = tiny_model("qwen2", seed=0)
    trainer.model = plain  # a model without TRL's head
    with pytest.raises(ValueError, match="no fused LM head installed"):
        use_fused_logprobs(trainer)
