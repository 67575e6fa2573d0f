"""The rollout generator end to end on tiny random models (CPU, torch attention backend): greedy equals HF
``generate``; returned log-probs equal ``kernels.logprobs_from_logits`` of the HF forward; a group's samples share
the prompt's KV blocks; continuous batching, preemption and aborts never leak blocks; bad input is refused."""

import copy

import pytest
import torch

import kernels as K
from engine.generation.generator import Generator
from engine.generation.sampling_params import SamplingParams
from engine.models.tiny import tiny_model

PROMPTS = [[5, 17, 3, 99, 42], [7, 1, 250, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23], [3]]


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def model(request):
    return tiny_model(request.param, seed=0).eval()


def hf_greedy(model, prompt, n_new):
    """HF greedy decoding of exactly ``n_new`` tokens (no EOS stop, and EOS not suppressed: like ignore_eos)."""
    ids = torch.tensor([prompt])
    config = copy.deepcopy(model.generation_config)
    config.update(do_sample=False, max_new_tokens=n_new, eos_token_id=None, pad_token_id=0)
    saved, model.generation_config = model.generation_config, config  # HF falls back to the model's own EOS
    try:
        out = model.generate(ids, attention_mask=torch.ones_like(ids))
    finally:
        model.generation_config = saved
    return out[0, len(prompt):].tolist()


def hf_logits(model, prompt, completion):
    """float32 logits that predicted each completion token: ``[len(completion), V]``."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    return logits[len(prompt) - 1:-1]


def test_greedy_matches_hf_generate(model):
    gen = Generator(model, block_size=4, attention_backend="torch", kv_cache_memory=1 << 22)
    outs = gen.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs):
        (completion,) = out.outputs
        assert completion.token_ids == hf_greedy(model, prompt, 12)
        assert completion.finish_reason == "length"
        expected = K.logprobs_from_logits(hf_logits(model, prompt, completion.token_ids),
                                          torch.tensor(completion.token_ids))
        assert max(abs(a - b) for a, b in zip(completion.logprobs, expected.tolist())) <= 1e-4
    assert gen.block_manager.num_free_blocks == gen.block_manager.num_blocks


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_logprobs_equal_the_trainers(model, temperature, top_p):
    gen = Generator(model, block_size=4, attention_backend="torch", kv_cache_memory=1 << 22)
    params = SamplingParams(n=3, temperature=temperature, top_p=top_p, max_tokens=10, ignore_eos=True, seed=123)
    for prompt, out in zip(PROMPTS, gen.generate(PROMPTS, params)):
        for completion in out.outputs:
            logits = hf_logits(model, prompt, completion.token_ids) / temperature
            if top_p < 1.0:  # the distribution actually sampled from: renormalised over the nucleus
                probs, order = logits.softmax(-1).sort(-1, descending=True)
                outside = (probs.cumsum(-1) - probs) >= top_p
                logits = logits.scatter(-1, order, torch.where(outside, float("-inf"), logits.gather(-1, order)))
            expected = K.logprobs_from_logits(logits, torch.tensor(completion.token_ids))
            assert max(abs(a - b) for a, b in zip(completion.logprobs, expected.tolist())) <= 1e-4


def test_group_shares_prompt_blocks_and_samples_differ(model):
    gen = Generator(model, block_size=4, attention_backend="torch", kv_cache_memory=1 << 22)
    prompt = list(range(10, 29))  # 19 tokens: 4 full blocks + a partial one
    rid = gen.add_request(prompt, SamplingParams(n=4, temperature=1.0, max_tokens=8, ignore_eos=True, seed=7))
    gen.step()  # the prefill: one prompt computed once, then forked
    bm = gen.block_manager
    tables = [bm.block_table(s.seq_id) for s in gen._requests[rid].seqs]
    shared = tables[0][:4]
    assert all(t[:4] == shared for t in tables)
    assert all(bm.ref_count(b) == 4 for b in shared)
    assert len({t[4] for t in tables}) == 4  # the partial block was copied per sample
    assert bm.num_used_blocks == 4 + 4
    while gen.has_unfinished_requests():
        done = gen.step()
    (out,) = done
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    assert bm.num_free_blocks == bm.num_blocks


def test_continuous_batching_preemption_and_abort_never_leak(model):
    greedy = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    reference = Generator(model, block_size=4, attention_backend="torch", kv_cache_memory=1 << 22)
    expected = [o.outputs[0].token_ids for o in reference.generate(PROMPTS * 2, greedy)]
    # room for ~3 sequences at a time: forces waiting, preemption and re-prefill
    tight = Generator(model, block_size=4, attention_backend="torch", max_num_seqs=2, max_model_len=48,
                      kv_cache_memory=_bytes_for_blocks(model, 4, 16))
    got = [o.outputs[0].token_ids for o in tight.generate(PROMPTS * 2, greedy)]
    assert got == expected
    bm = tight.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    a = tight.add_request(PROMPTS[1], SamplingParams(n=2, max_tokens=25, ignore_eos=True))
    b = tight.add_request(PROMPTS[0], greedy)
    for _ in range(4):
        tight.step()
    aborted = tight.abort_request(a)
    assert {c.finish_reason for c in aborted.outputs} <= {"abort", "length"}
    while tight.has_unfinished_requests():
        tight.step()
    assert bm.num_free_blocks == bm.num_blocks and b not in tight._requests


def test_generator_sees_new_weights_without_a_copy(model):
    gen = Generator(model, block_size=4, attention_backend="torch", kv_cache_memory=1 << 22)
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    before = gen.generate([PROMPTS[0]], greedy)[0].outputs[0].token_ids
    original = model.lm_head.weight.detach().clone()
    try:
        with torch.no_grad():
            model.lm_head.weight.add_(torch.randn_like(model.lm_head.weight) * 0.5)
        after = gen.generate([PROMPTS[0]], greedy)[0].outputs[0].token_ids
        assert after == hf_greedy(model, PROMPTS[0], 6)
        assert after != before
    finally:
        with torch.no_grad():
            model.lm_head.weight.copy_(original)


def test_bad_requests_are_refused(model):
    gen = Generator(model, block_size=4, attention_backend="torch", max_model_len=32, kv_cache_memory=1 << 22)
    with pytest.raises(ValueError, match="does not fit max_model_len=32"):
        gen.generate([list(range(32))])
    with pytest.raises(ValueError, match="prompt_token_ids must not be empty"):
        gen.generate([[]])
    with pytest.raises(ValueError, match=r"prompt_token_ids must be in \[0, "):
        gen.generate([[1, 10**6]])
    with pytest.raises(ValueError, match="n"):
        SamplingParams(n=0)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-0.5)
    assert gen.block_manager is None or gen.block_manager.num_free_blocks == gen.block_manager.num_blocks


def _bytes_for_blocks(model, block_size, num_blocks):
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_block = 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * head_dim * 4
    return per_block * num_blocks


def test_triton_decode_backend_matches_torch(model, device):
    """The Triton paged-decode kernel (interpreted on the CPU, compiled on CUDA) gives the same greedy tokens and
    log-probs."""
    params = SamplingParams(n=2, temperature=1.0, max_tokens=5, ignore_eos=True, seed=3)
    model = copy.deepcopy(model).to(device)
    outs = {}
    for backend in ("torch", "triton"):
        gen = Generator(model, block_size=4, attention_backend=backend, kv_cache_memory=1 << 22)
        outs[backend] = gen.generate(PROMPTS[:2], params)
    for a, b in zip(outs["torch"], outs["triton"]):
        for ca, cb in zip(a.outputs, b.outputs):
            assert ca.token_ids == cb.token_ids
            assert max(abs(x - y) for x, y in zip(ca.logprobs, cb.logprobs)) <= 1e-4
