"""Supervised fine-tuning (the cold start of the R1 recipe): prompt -> target completion (+ EOS), loss on the
completion tokens only, with the loop, logging, evaluation and checkpoints of ``BaseTrainer``."""

from __future__ import annotations

import logging
import math
import time

import torch

from engine.algorithms import make_batch, sft_loss
from engine.algorithms.batching import clip_and_step
from engine.generation import Generator
from engine.trainers.base import BaseTrainer

log = logging.getLogger("rlhf_engine")


class SFTTrainer(BaseTrainer):
    """SFT on the examples' ``completion`` column (``cfg``: an ``SFTRunConfig``). Steps: ``sft.max_steps``, else
    ``sft.epochs`` passes over the data at ``sft.batch_size`` examples per optimizer step. Each example is at most
    ``data.max_length`` tokens: longer completions are cut (``prepare_examples``)."""

    kind = "sft"

    def __init__(self, cfg, *, model=None, tokenizer=None):
        super().__init__(cfg, model=model, tokenizer=tokenizer)
        self.generator = Generator(self.model, self.tokenizer, attention_backend=None)
        self.eval_max_tokens = max(len(t) for t in self.targets.values()) + 8

    def prepare_examples(self) -> None:
        """The tokenized prompts (``BaseTrainer.prepare_examples``), then ``targets``: for each training example
        (by ``id``) its completion's token ids + EOS, the completion cut at the end so that prompt + target fit
        ``data.max_length`` tokens (one long completion would otherwise allocate its squared length in attention at
        the step that draws it). Sets ``truncated_completions`` (the count cut, printed when not 0). Runs before the
        run directory is written.

        Raises ``ValueError`` when ``data.max_length <= data.max_prompt_tokens`` (no room for a completion), when a
        training record has no completion, or when the tokenizer has no EOS token."""
        data = self.cfg.data
        if data.max_length <= data.max_prompt_tokens:
            raise ValueError(f"data.max_length={data.max_length} must be > data.max_prompt_tokens="
                             f"{data.max_prompt_tokens}: an SFT example is a prompt of up to max_prompt_tokens tokens "
                             "plus its completion and EOS")
        super().prepare_examples()
        missing = sum(e.completion is None for e in self.train_examples)
        if missing:
            raise ValueError(f"{missing} of {len(self.train_examples)} training records have no completion "
                             "(a 'completion' column, or GSM8K's worked answer) to fine-tune on")
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ValueError("SFT ends every target with the tokenizer's EOS token, and this tokenizer has none")
        self.targets, self.truncated_completions = {}, 0
        for e in self.train_examples:
            ids = self.tokenizer.encode(e.completion, add_special_tokens=False)
            room = data.max_length - len(e.prompt_ids) - 1  # >= 0: prompts are at most max_prompt_tokens long
            if len(ids) > room:
                ids = ids[:room]
                self.truncated_completions += 1
            self.targets[id(e)] = ids + [eos]
        if self.truncated_completions:
            log.info(f"SFT: {self.truncated_completions} of {len(self.train_examples)} completions cut "
                  f"to fit data.max_length={data.max_length} tokens (prompt + completion + EOS)")

    @property
    def total_steps(self) -> int:
        s = self.cfg.sft
        return s.max_steps or s.epochs * math.ceil(len(self.train_examples) / s.batch_size)

    def train_step(self, step: int) -> dict[str, float]:
        s = self.cfg.sft
        t0 = time.perf_counter()
        examples = self.next_examples(s.batch_size)
        batch = make_batch([e.prompt_ids for e in examples], [self.targets[id(e)] for e in examples],
                           self.tokenizer.pad_token_id or 0, self.device)
        n_tok = max(batch.num_tokens, 1)
        self.optimizer.zero_grad(set_to_none=True)
        total, finite = 0.0, True
        for start in range(0, len(examples), s.micro_batch_size):
            mb = batch.rows(slice(start, start + s.micro_batch_size))
            with torch.autocast(self.device.type, dtype=self.autocast or torch.bfloat16,
                                enabled=self.autocast is not None):
                loss = sft_loss(self.model, mb, num_tokens=n_tok)
            if not torch.isfinite(loss):
                finite = False
                break
            loss.backward()
            total += loss.item()
        grad_norm, stepped = clip_and_step(self.model, self.optimizer, self.cfg.optim.max_grad_norm, finite)
        metrics = {"loss": total if finite else float("nan"), "grad_norm": grad_norm,
                   "perf/tokens_per_sec": n_tok / max(time.perf_counter() - t0, 1e-9)}
        self.record_step_outcome(stepped, metrics)
        return metrics
