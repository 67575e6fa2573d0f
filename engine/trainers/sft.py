"""Supervised fine-tuning (the cold start of the R1 recipe): prompt -> target completion (+ EOS), loss on the
completion tokens only, with the loop, logging, evaluation and checkpoints of ``BaseTrainer``."""

from __future__ import annotations

import logging
import math
import time

from engine.algorithms import accumulated_step, make_batch, sft_loss
from engine.algorithms.packing import micro_batch, plan_micro_batches
from engine.distributed import all_reduce_sum
from engine.generation import Generator
from engine.trainers.base import BaseTrainer, policy_and_prompts

log = logging.getLogger("rlhf_engine")


class SFTTrainer(BaseTrainer):
    """SFT on the examples' ``completion`` column (``cfg``: an ``SFTRunConfig``). Steps: ``sft.max_steps``, else
    ``sft.epochs`` passes over the data at ``sft.batch_size`` examples per optimizer step. Each example is at most
    ``data.max_length`` tokens: longer completions are cut (``sft_targets``). Parts: the prompts and their targets,
    the policy, and a generator on its weights for the held-out accuracy."""

    def __init__(self, cfg, *, model=None, tokenizer=None):
        super().__init__(cfg)
        data = cfg.data
        with self.setting_up():
            self.check_divides(**{"sft.batch_size": cfg.sft.batch_size})
            if data.max_length <= data.max_prompt_tokens:
                raise ValueError(f"data.max_length={data.max_length} must be > data.max_prompt_tokens="
                                 f"{data.max_prompt_tokens}: an SFT example is a prompt of up to max_prompt_tokens "
                                 "tokens plus its completion and EOS")
            model, tokenizer, self.train_examples, self.eval_examples = policy_and_prompts(cfg, self.device, model,
                                                                                           tokenizer)
            self.tokenizer = tokenizer
            self.targets, self.truncated_completions = sft_targets(self.train_examples, tokenizer, data.max_length)
            s = cfg.sft
            self.model = model = self.shard(model)
            self.generator = Generator(model, tokenizer, attention_backend=None,
                                       enforce_eager=True if self.dist.enabled else None)
            self.eval_max_tokens = max(len(t) for t in self.targets.values()) + 8
            self.start(total_steps=s.max_steps or s.epochs * math.ceil(len(self.train_examples) / s.batch_size))

    def train_step(self, step: int) -> dict[str, float]:
        s = self.cfg.sft
        t0 = time.perf_counter()
        examples = self.local_part(self.next_examples(s.batch_size))
        batch = make_batch([e.prompt_ids for e in examples], [self.targets[id(e)] for e in examples],
                           self.tokenizer.pad_token_id or 0, self.device)
        # every micro-batch's loss is normalised by the step's token count (over every rank's rows)
        n_tok = max(int(all_reduce_sum({"tokens": batch.num_tokens})["tokens"]), 1)
        budget = s.max_tokens_per_micro_batch  # None: micro_batch_size rows, padded; else packed micro-batches
        result = accumulated_step(self.model, self.optimizer, plan_micro_batches(batch, s.micro_batch_size, budget),
                                  lambda rows: (sft_loss(self.model, micro_batch(batch, rows, budget),
                                                         num_tokens=n_tok), {}),
                                  max_grad_norm=self.cfg.optim.max_grad_norm, device_type=self.device.type,
                                  autocast_dtype=self.autocast)
        metrics = {**result.metrics, "perf/tokens_per_sec": n_tok / max(time.perf_counter() - t0, 1e-9)}
        self.record_step_outcome(result.stepped, metrics)
        return metrics


def sft_targets(examples: list, tokenizer, max_length: int) -> tuple[dict[int, list[int]], int]:
    """``({id(example): completion token ids + EOS}, truncated)`` for the training examples, each completion cut at
    the end so that prompt + target fit ``max_length`` tokens (one long completion would otherwise allocate its
    squared length in attention at the step that draws it); ``truncated`` counts the cut ones (logged when not 0).

    Raises ``ValueError`` when an example has no completion, or when the tokenizer has no EOS token."""
    missing = sum(e.completion is None for e in examples)
    if missing:
        raise ValueError(f"{missing} of {len(examples)} training records have no completion "
                         "(a 'completion' column, or GSM8K's worked answer) to fine-tune on")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("SFT ends every target with the tokenizer's EOS token, and this tokenizer has none")
    targets, truncated = {}, 0
    for e in examples:
        ids = tokenizer.encode(e.completion, add_special_tokens=False)
        room = max_length - len(e.prompt_ids) - 1  # >= 0: prompts are at most max_prompt_tokens < max_length long
        if len(ids) > room:
            ids = ids[:room]
            truncated += 1
        targets[id(e)] = ids + [eos]
    if truncated:
        log.info(f"SFT: {truncated} of {len(examples)} completions cut to fit data.max_length={max_length} tokens "
                 "(prompt + completion + EOS)")
    return targets, truncated
