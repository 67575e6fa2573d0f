"""The embedding examples (``examples/embed_*.py``) run in-process with tiny settings and do what they claim: the
hand-written GRPO loop trains (finite loss, weights change) and its micro-batched fused-LM-head loss has the gradient
of an eager full-batch ``log_softmax`` reference; the Generator sees a weight edit without any sync call and returns
the log-probs of the model's own logits."""

import importlib.util
import io
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

import kernels as K
from engine import Generator, SamplingParams
from engine.algorithms import make_batch
from tests._numerics import assert_close

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def loop():
    return load("embed_kernels_loop")


@pytest.fixture(scope="module")
def gen_example():
    return load("embed_generator")


def run_quietly(module, argv):
    with redirect_stdout(io.StringIO()) as out:
        result = module.main(argv)
    return result, out.getvalue()


def test_kernels_loop_trains(loop, one_thread):
    result, printed = run_quietly(loop, ["--steps", "3", "--prompts", "2", "--num-generations", "4",
                                         "--max-tokens", "8", "--micro-batch-size", "3", "--device", "cpu"])
    assert len(result["losses"]) == 3 and printed.count("loss") == 3
    assert all(torch.isfinite(torch.tensor(result[k])).all() for k in ("losses", "rewards", "grad_norms"))
    assert max(result["grad_norms"]) > 0
    initial = loop.build_model(None, seed=0)
    trained = dict(result["model"].named_parameters())
    changed = [name for name, p in initial.named_parameters() if not torch.equal(p, trained[name])]
    assert changed, "no parameter changed"
    assert "lm_head.weight" in changed


def eager_reference(model, batch, advantages, temperature):
    """Full-batch loss and gradients from materialised logits: at ratio 1 (old = detached current) with kl_coef 0,
    the token-mean clipped surrogate is ``-sum(A * exp(lp - sg(lp)) * mask) / num_tokens``."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()  # [B, L, V]
    B, T = batch.labels.shape
    picked = logits.gather(1, batch.response_index[..., None].expand(B, T, logits.shape[-1]))  # [B, T, V]
    logprobs = (picked / temperature).log_softmax(-1).gather(-1, batch.labels.clamp(min=0)[..., None])[..., 0]
    mask = batch.response_mask
    ratio = torch.exp(logprobs - logprobs.detach())
    loss = -torch.where(mask, advantages[:, None] * ratio, 0.0).sum() / mask.sum()
    loss.backward()
    return loss.item()


def grads(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def test_micro_batched_fused_gradient_equals_full_batch_eager(loop, one_thread):
    model = loop.build_model(None, seed=0).train()
    g = torch.Generator().manual_seed(1)
    V = model.config.vocab_size
    lengths = [(3, 5), (7, 1), (2, 8), (4, 0), (6, 3), (1, 6), (5, 2)]  # (prompt, response); one empty response
    prompts = [torch.randint(2, V, (p,), generator=g).tolist() for p, _ in lengths]
    responses = [torch.randint(2, V, (r,), generator=g).tolist() for _, r in lengths]
    batch = make_batch(prompts, responses, pad_id=0, device="cpu")
    advantages = torch.randn(len(lengths), generator=g)
    temperature = 0.7

    expected_loss = eager_reference(model, batch, advantages, temperature)
    expected = grads(model)
    for micro_batch_size in (3, len(lengths)):  # an uneven split, and one micro-batch
        model.zero_grad(set_to_none=True)
        loss = loop.grpo_backward(model, batch, advantages, micro_batch_size=micro_batch_size,
                                  temperature=temperature)
        got = grads(model)
        assert abs(loss - expected_loss) <= 2e-6 + 2e-5 * abs(expected_loss), (micro_batch_size, loss, expected_loss)
        assert got.keys() == expected.keys()
        for name, grad in expected.items():
            assert_close(got[name], grad, torch.float32, name=f"{name} (micro_batch_size={micro_batch_size})")


def test_generator_sees_the_weight_edit_and_returns_true_logprobs(gen_example, one_thread):
    n, max_tokens = 2, 6
    result, printed = run_quietly(gen_example, ["--n", str(n), "--max-tokens", str(max_tokens), "--device", "cpu"])
    before = [c.token_ids for out in result["before"] for c in out.outputs]
    after = [c.token_ids for out in result["after"] for c in out.outputs]
    assert len(after) == len(result["prompts"]) * n and "share of token" in printed
    assert before != after
    share_before, share_after = result["target_share"]
    assert share_after > share_before
    assert result["logprob_error"] <= 1e-4
    model = result["model"]
    with torch.no_grad():  # the "after" log-probs against the float64 reference on the edited model's logits
        for out in result["after"]:
            for c in out.outputs:
                ids = torch.tensor([out.prompt_token_ids + c.token_ids])
                logits = model(ids).logits[0, len(out.prompt_token_ids) - 1:-1].double()
                expected = K.logprobs_from_logits_ref(logits, torch.tensor(c.token_ids))
                assert (torch.tensor(c.logprobs, dtype=torch.float64) - expected).abs().max() <= 1e-4
    # the example's add_request/step loop is what generate() does: a fresh Generator on the edited weights agrees
    params = SamplingParams(n=n, temperature=1.0, max_tokens=max_tokens, seed=0)
    fresh = Generator(model, kv_cache_memory=1 << 22).generate(result["prompts"], params)
    assert [c.token_ids for out in fresh for c in out.outputs] == after
