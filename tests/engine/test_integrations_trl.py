"""``engine.integrations.trl``: our Generator as TRL's ``GRPOTrainer(rollout_func=...)``, on the CPU with a tiny random
Qwen2 and a tiny BPE tokenizer with a chat template. One 3-step TRL run (generations at steps 0 and 2) is shared by
the tests: it trains, the rollouts read the live weights (no copy), ``num_generations`` and ``max_completion_length``
are honoured, prompts are templated as TRL templates them, and our log-probs agree with TRL's own recomputation."""

import copy
import dataclasses
import math

import pytest
import torch

pytest.importorskip("trl")

import huggingface_hub
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from engine.generation import Generator, SamplingParams
from engine.integrations.trl import _runs, check_trainer, make_rollout_func, sampling_params, tokenize_prompts
from engine.models.tiny import tiny_model, train_bpe_tokenizer

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "one two three four five", "user: hi assistant: hello"]
CHAT_TEMPLATE = ("{% if hint %}<bos>system: {{ hint }}\n{% endif %}"
                 "{% for m in messages %}<bos>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<bos>assistant:{% endif %}")
PROMPTS = [[{"role": "user", "content": text}] for text in ("the cat", "a dog", "one two", "the park")]
G, MAX_NEW, LR = 4, 8, 1e-2
# transformers 5.x renamed gradient_checkpointing (deprecated) to activation_checkpointing
_CHECKPOINTING = next(name for name in ("activation_checkpointing", "gradient_checkpointing")
                      if name in {f.name for f in dataclasses.fields(GRPOConfig)})


def _tokenizer():
    tok = train_bpe_tokenizer(TEXTS * 4, vocab_size=300)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _config(out_dir, **overrides):
    # a generation every 2 steps with 1 accumulation step: TRL recomputes the old log-probs, the numbers its
    # sampling/sampling_logp_difference metrics compare ours with
    kwargs = {"output_dir": str(out_dir), "use_cpu": True, "report_to": "none", "logging_steps": 1,
              "save_strategy": "no", "bf16": False, "seed": 0, "max_steps": 3, "learning_rate": LR,
              "per_device_train_batch_size": G, "gradient_accumulation_steps": 1, "steps_per_generation": 2,
              "num_generations": G, "max_completion_length": MAX_NEW, "chat_template_kwargs": {"hint": "be brief"}}
    kwargs[_CHECKPOINTING] = False
    kwargs.update(overrides)
    return GRPOConfig(**kwargs)


def _reward(completions, **kwargs):
    return [len(c[0]["content"]) / 10 for c in completions]


class _RecordingTrainer(GRPOTrainer):
    """Keeps every generation batch TRL builds (ours: ``sampling_per_token_logps``; TRL's recomputation:
    ``old_per_token_logps``), and the model's weights at each generation."""

    def _generate_and_score_completions(self, inputs):
        snapshot = copy.deepcopy(self.model.state_dict())
        out = super()._generate_and_score_completions(inputs)
        self.recorded.append((out, snapshot))
        return out


class _RecordingRollout:
    def __init__(self, rollout):
        self.rollout, self.calls = rollout, []

    def __call__(self, prompts, trainer):
        out = self.rollout(prompts, trainer)
        self.calls.append((copy.deepcopy(prompts), out))
        return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The 3-step TRL run: (trainer, model, rollout recorder, initial state dict, same-seed samples before)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)  # TRL pings the Hub on init
        mp.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny model: threads only add overhead (see conftest.one_thread)
        try:
            tok = _tokenizer()
            model = tiny_model("qwen2", seed=0).train()
            model.generation_config.eos_token_id = tok.eos_token_id
            initial = copy.deepcopy(model.state_dict())
            before = Generator(model, kv_cache_memory=1 << 22).generate([[5, 6, 7]], _probe())[0]
            recorder = _RecordingRollout(make_rollout_func(kv_cache_memory=1 << 22))
            trainer = _RecordingTrainer(model=model, reward_funcs=_reward, args=_config(tmp_path_factory.mktemp("trl")),
                                        train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tok,
                                        rollout_func=recorder)
            trainer.recorded = []
            trainer.train()
        finally:
            torch.set_num_threads(threads)
        yield trainer, model, recorder, initial, before


def _probe():
    return SamplingParams(n=2, max_tokens=MAX_NEW, ignore_eos=True, seed=123)


def test_trains_with_our_rollouts(run):
    trainer, model, recorder, initial, _ = run
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert trainer.state.global_step == 3
    changed = [name for name, p in model.state_dict().items() if not torch.equal(p, initial[name])]
    assert "lm_head.weight" in changed and any("layers.1.mlp" in name for name in changed)
    assert len(recorder.calls) == 2  # steps 0 and 2: steps_per_generation=2


def test_rollouts_read_the_live_weights_without_a_copy(run):
    trainer, model, recorder, _, before = run
    gen = recorder.rollout.generator
    assert gen.model.hf_model is model
    params = {p.data_ptr() for group in trainer.optimizer.param_groups for p in group["params"]}
    read = [gen.model._embed.weight, gen.model.hf_model.get_output_embeddings().weight,
            *(layer.self_attn.q_proj.weight for layer in gen.model._layers),
            *(layer.mlp.down_proj.weight for layer in gen.model._layers)]
    own = [model.model.embed_tokens.weight, model.lm_head.weight,
           *(layer.self_attn.q_proj.weight for layer in model.model.layers),
           *(layer.mlp.down_proj.weight for layer in model.model.layers)]
    assert [t.data_ptr() for t in read] == [t.data_ptr() for t in own]
    assert all(t.data_ptr() in params for t in read)  # the tensors the optimizer steps
    # the same seed after training: other log-probs than before, the ones a fresh Generator on the trained model gets
    after = gen.generate([[5, 6, 7]], _probe())[0]
    fresh = Generator(model, kv_cache_memory=1 << 22).generate([[5, 6, 7]], _probe())[0]
    for a, f in zip(after.outputs, fresh.outputs):
        assert a.token_ids == f.token_ids and a.logprobs == f.logprobs
    assert max(abs(a - b) for a, b in zip(after.outputs[0].logprobs, before.outputs[0].logprobs)) > 1e-3


def test_logprobs_agree_with_trls_recomputation(run):
    """TRL's ``sampling/sampling_logp_difference/{mean,max}`` formula (logged by TRL 1.16 only with vLLM) on our
    log-probs against TRL's recomputation, at both generations; the second runs after two optimizer steps, and the
    weights of step 0 would be far off (so the Generator read the stepped weights)."""
    trainer, model, _, _, _ = run
    assert len(trainer.recorded) == 2
    for i, (out, snapshot) in enumerate(trainer.recorded):
        mask = out["completion_mask"].bool()
        delta = (out["old_per_token_logps"] - out["sampling_per_token_logps"]).abs()[mask]
        assert delta.mean().item() < 1e-5 and delta.max().item() < 1e-4, (i, delta.mean(), delta.max())
    out, _ = trainer.recorded[1]
    stale = copy.deepcopy(model)
    stale.load_state_dict(trainer.recorded[0][1])
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
    with torch.no_grad():
        logits = stale(ids, attention_mask=torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)).logits
    T = out["completion_ids"].shape[1]
    stale_lp = torch.log_softmax(logits[:, -T - 1:-1].float(), -1).gather(-1, out["completion_ids"][..., None])[..., 0]
    mask = out["completion_mask"].bool()
    assert (stale_lp - out["sampling_per_token_logps"]).abs()[mask].max().item() > 1e-3


def test_num_generations_and_max_completion_length(run):
    trainer, _, recorder, _, _ = run
    for prompts, out in recorder.calls:
        assert len(prompts) == trainer.args.generation_batch_size == 2 * G
        assert len(out["prompt_ids"]) == len(out["completion_ids"]) == len(out["logprobs"]) == len(prompts)
        groups = [prompts[i:i + G] for i in range(0, len(prompts), G)]
        assert all(group == [group[0]] * G for group in groups)  # TRL repeats each prompt G times in a row
        assert _runs(out["prompt_ids"], 256) == [(0, G), (G, G)]  # one request of n=G per group
        for i in range(0, len(prompts), G):  # a group's samples are distinct draws
            assert len({tuple(c) for c in out["completion_ids"][i:i + G]}) > 1
        lengths = [len(c) for c in out["completion_ids"]]
        assert max(lengths) == MAX_NEW and all(1 <= n <= MAX_NEW for n in lengths)
        assert [len(lp) for lp in out["logprobs"]] == lengths
        for ids, lp in zip(out["completion_ids"], out["logprobs"]):  # stopped early only on an EOS
            assert len(ids) == MAX_NEW or ids[-1] in trainer.eos_token_ids
            assert all(x <= 0 for x in lp)


def test_prompts_are_templated_as_trl_does(run):
    trainer, _, recorder, _, _ = run
    prompts, out = recorder.calls[0]
    assert out["prompt_ids"] == trainer._tokenize_prompts(prompts)[0]
    text = trainer.processing_class.decode(out["prompt_ids"][0])
    assert text.startswith("<bos>system: be brief\n<bos>user: ") and text.endswith("<bos>assistant:")
    plain = ["the cat sat", "a dog"]
    assert tokenize_prompts(plain, trainer.processing_class) == trainer._tokenize_prompts(plain)[0]


def test_seeds_come_from_the_trainer_state(run):
    trainer, _, _, _, _ = run
    prompts = [PROMPTS[0]] * G
    a, b = make_rollout_func(kv_cache_memory=1 << 22), make_rollout_func(kv_cache_memory=1 << 22)
    first = a(prompts, trainer)
    assert b(prompts, trainer) == first  # same seed, step and call number: same samples
    assert a(prompts, trainer)["completion_ids"] != first["completion_ids"]  # the next call at this step: new draws


def test_sampling_settings_map_and_unsupported_ones_are_refused(tmp_path):
    args = _config(tmp_path, temperature=0.7, top_p=0.9, top_k=5, max_completion_length=7)
    p = sampling_params(args, n=3, seed=11, stop_token_ids=[1, 4])
    assert (p.n, p.temperature, p.top_p, p.top_k, p.max_tokens, p.stop_token_ids, p.seed) == (
        3, 0.7, 0.9, 5, 7, [1, 4], 11)
    tok = _tokenizer()

    class FakeTrainer:  # what check_trainer reads, without building a trainer
        processing_class, tools, environment_factories = tok, None, None

    trainer = FakeTrainer()
    trainer.args = args
    check_trainer(trainer)
    trainer.args = _config(tmp_path, repetition_penalty=1.1, min_p=0.05, generation_kwargs={"num_beams": 2})
    with pytest.raises(ValueError, match=r"repetition_penalty=1.1.*min_p=0.05.*generation_kwargs"):
        check_trainer(trainer)
    trainer.args = _config(tmp_path, use_vllm=True)
    with pytest.raises(ValueError, match="use_vllm=True"):
        check_trainer(trainer)
    trainer.args, trainer.tools = args, [len]
    with pytest.raises(ValueError, match="tools"):
        check_trainer(trainer)
