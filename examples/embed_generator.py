"""The engine's ``Generator`` on your own Hugging Face model, driven by your own loop.

    python examples/embed_generator.py                                 # tiny random Llama on the CPU, a few seconds
    python examples/embed_generator.py --model /path/to/hf_checkpoint

You build the model with transformers (here a tiny random Llama; any Llama / Qwen2 / Qwen3 / Mistral causal LM) and
pass it in: ``Generator(model)`` reads its parameters in place, so there is no copy and no sync call after you change
them. The loop below samples (``add_request`` / ``step``: results as they finish; ``generator.generate(prompts,
params)`` is the one-call form), checks each token's returned log-prob against ``log_softmax`` of the model's own
logits, takes one optimizer step on the model (a loss that favours one token), samples again with the same seed and
shows that the samples follow the new weights.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from engine import Generator, RequestOutput, SamplingParams


def build_model(path: str | None = None, seed: int = 0):
    """A checkpoint (float32), or a tiny random Llama (vocab 128, hidden 64, 2 layers) built with transformers."""
    if path:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=0, eos_token_id=1, pad_token_id=0)
    return LlamaForCausalLM(config)


def sample(generator: Generator, prompts: list[list[int]], params: SamplingParams) -> list[RequestOutput]:
    """Your sampling loop: queue every prompt, step the generator, collect each request as it finishes."""
    ids = [generator.add_request(prompt, params) for prompt in prompts]
    done: dict = {}
    while generator.has_unfinished_requests():
        for out in generator.step():  # one prefill or one decode step; the requests that finished in it
            done[out.request_id] = out
    return [done[rid] for rid in ids]


@torch.no_grad()
def logprob_error(model, outputs: list[RequestOutput]) -> float:
    """Largest gap between the returned log-probs and ``log_softmax`` of the model's logits (temperature 1)."""
    worst = 0.0
    for out in outputs:
        for completion in out.outputs:
            ids = torch.tensor([out.prompt_token_ids + completion.token_ids], device=model.device)
            logits = model(ids).logits[0, len(out.prompt_token_ids) - 1:-1].float().cpu()  # [T, V]: predict the next
            expected = logits.log_softmax(-1).gather(-1, torch.tensor(completion.token_ids)[:, None])[:, 0]
            worst = max(worst, (torch.tensor(completion.logprobs) - expected).abs().max().item())
    return worst


def share_of(token: int, outputs: list[RequestOutput]) -> float:
    tokens = [t for out in outputs for c in out.outputs for t in c.token_ids]
    return sum(t == token for t in tokens) / len(tokens)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a local HF checkpoint (Llama / Qwen2 / Qwen3 / Mistral); default: tiny random")
    p.add_argument("--n", type=int, default=4, help="samples per prompt")
    p.add_argument("--max-tokens", type=int, default=12)
    p.add_argument("--target", type=int, default=7, help="the token id the weight edit favours")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--threads", type=int, help="torch threads (default: 1 for the tiny model, torch's otherwise)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    """Returns ``{"model", "prompts", "before", "after", "logprob_error", "target_share"}``; ``before``/``after``
    are the ``RequestOutput`` lists of the two rounds, ``logprob_error`` the worst gap over both, ``target_share``
    the share of the target token in each round. The thread count is restored on return (a tiny model runs on one:
    more only add OpenMP overhead, 10x on a busy CPU)."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or (threads if args.model else 1))
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = build_model(args.model, args.seed).to(device)  # yours: built or loaded with transformers
    generator = Generator(model, kv_cache_memory=16 << 20)  # a small KV pool; default: 256 MiB on the CPU
    g = torch.Generator().manual_seed(args.seed)
    prompts = [torch.randint(2, model.config.vocab_size, (n,), generator=g).tolist() for n in (3, 5, 8)]
    # temperature 1, no top-k/top-p: the returned log-probs are log_softmax of the raw logits; a fixed seed makes the
    # sampling noise identical in both rounds, so any difference between them comes from the weights
    params = SamplingParams(n=args.n, temperature=1.0, max_tokens=args.max_tokens, seed=args.seed)

    model.eval()
    before = sample(generator, prompts, params)
    error_before = logprob_error(model, before)

    # your training step: here one AdamW step raising log p(target) after each prompt token; it writes the
    # parameters in place, which is all the generator needs to see
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    batch = torch.tensor([p[:3] for p in prompts], device=device)  # [3, 3]: the prompts cut to the shortest
    loss = -model(batch).logits.log_softmax(-1)[..., args.target].mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    after = sample(generator, prompts, params)  # no sync, no reload: the same Generator object
    error_after = logprob_error(model, after)
    shares = (share_of(args.target, before), share_of(args.target, after))
    for name, outs in (("before", before), ("after", after)):
        first = outs[0].outputs[0]
        print(f"{name:6s} prompt 0, sample 0: {first.token_ids}")
        print(f"{'':6s} logprobs: {[round(x, 3) for x in first.logprobs]}")
    print(f"share of token {args.target}: {shares[0]:.3f} -> {shares[1]:.3f} after one optimizer step")
    print(f"returned vs recomputed log-probs, max |diff|: {max(error_before, error_after):.2e}")
    return {"model": model, "prompts": prompts, "before": before, "after": after,
            "logprob_error": max(error_before, error_after), "target_share": shares}


if __name__ == "__main__":
    main()
