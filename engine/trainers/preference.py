"""Training on preference pairs: the reward model (``rlhf-engine rm``) and DPO (``rlhf-engine dpo``).

Both read chosen/rejected pairs in TRL's formats (``engine.data.preferences``), hold out ``data.num_eval`` pairs (the
last ones of the file, or ``data.eval``), and run the loop, logging, checkpoints and resume of ``BaseTrainer``. A step
takes ``batch_size`` pairs and accumulates gradients over micro-batches of ``micro_batch_size`` pairs; each forward
pass scores chosen and rejected together (``make_pair_batch``: 2x rows).
"""

from __future__ import annotations

import logging
import math
import time

import torch

import kernels as K
from engine.algorithms.batching import clip_and_step, make_pair_batch
from engine.algorithms.dpo import dpo_step_loss, reference_logprobs, sequence_logprobs
from engine.algorithms.reward_model import pairwise_metrics, reward_model_loss, score_pairs
from engine.algorithms.stats import wilson_interval
from engine.data import load_records
from engine.data.preferences import render_pair, split_pairs, to_preference_pairs, tokenize_pairs
from engine.models.builders import build_reward_model
from engine.trainers.base import BaseTrainer

log = logging.getLogger("rlhf_engine")


class PairTrainer(BaseTrainer):
    """Shared by the reward-model and DPO trainers: pairs in, ``TokenizedPair`` examples out, step count from
    epochs. Subclasses set ``section`` (the config section with the batching fields) and ``pair_step``."""

    section = ""

    @property
    def pair_cfg(self):
        return getattr(self.cfg, self.section)

    def load_data(self) -> None:
        data = self.cfg.data
        allow = self.pair_cfg.allow_empty_response
        pairs = to_preference_pairs(load_records(data.train, split="train"), source=data.train,
                                    allow_empty_response=allow)
        if data.eval:
            held_out = to_preference_pairs(load_records(data.eval, split="test", limit=data.num_eval or None),
                                           source=data.eval, allow_empty_response=allow)
        else:
            pairs, held_out = split_pairs(pairs, data.num_eval)
        self.train_records, self.eval_records = pairs, held_out

    def training_texts(self):
        for pair in self.train_records:
            yield from render_pair(pair)

    def prepare_examples(self) -> None:
        c, data = self.pair_cfg, self.cfg.data
        kwargs = {"max_length": c.max_length, "max_prompt_length": min(data.max_prompt_tokens, c.max_length - 1)}
        self.train_examples, stats = tokenize_pairs(self.train_records, self.tokenizer, **kwargs)
        self.eval_examples, eval_stats = tokenize_pairs(self.eval_records, self.tokenizer, **kwargs)
        self.data_stats = {"train": stats, "eval": eval_stats}
        log.info(f"pairs: train {stats}, held-out {eval_stats}")
        if not self.train_examples:
            raise ValueError(f"no training pair is left after tokenization ({stats})")

    @property
    def total_steps(self) -> int:
        c = self.pair_cfg
        return c.max_steps or c.epochs * math.ceil(len(self.train_examples) / c.batch_size)

    def pair_batch(self, examples: list):
        return make_pair_batch([e.prompt_ids for e in examples], [e.chosen_ids for e in examples],
                               [e.rejected_ids for e in examples], self.tokenizer.pad_token_id or 0, self.device)

    def pair_step(self, examples: list) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss (mean over ``examples``) and detached metrics of one micro-batch of pairs."""
        raise NotImplementedError

    def train_step(self, step: int) -> dict[str, float]:
        c = self.pair_cfg
        t0 = time.perf_counter()
        examples = self.next_examples(c.batch_size)
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        finite = True
        for start in range(0, len(examples), c.micro_batch_size):
            part = examples[start:start + c.micro_batch_size]
            share = len(part) / len(examples)  # the step's loss is the mean over all its pairs
            with torch.autocast(self.device.type, dtype=self.autocast or torch.bfloat16,
                                enabled=self.autocast is not None):
                loss, metrics = self.pair_step(part)
            if not torch.isfinite(loss):
                finite = False
                break
            (loss * share).backward()
            for name, value in {"loss": loss.detach(), **metrics}.items():
                sums[name] = sums.get(name, 0.0) + float(value) * share
        grad_norm, stepped = clip_and_step(self.model, self.optimizer, self.cfg.optim.max_grad_norm, finite)
        out = {**sums, "loss": sums["loss"] if finite else float("nan"), "grad_norm": grad_norm,
               "perf/pairs_per_sec": len(examples) / max(time.perf_counter() - t0, 1e-9)}
        self.record_step_outcome(stepped, out)
        return out


class RewardModelTrainer(PairTrainer):
    """Bradley-Terry reward model (``cfg``: a ``RewardModelRunConfig``); evaluation: held-out pairwise accuracy with
    its 95% Wilson interval, margin and loss."""

    kind = "rm"
    section = "rm"

    def build_model(self):
        return build_reward_model(self.cfg.model, self.device, seed=self.cfg.trainer.seed,
                                  texts=self.training_texts())

    def pair_step(self, examples):
        margin = None
        if self.cfg.rm.margin_field:
            margin = torch.tensor([float(e.pair.record[self.cfg.rm.margin_field]) for e in examples],
                                  device=self.device)
        return reward_model_loss(self.model, self.pair_batch(examples), margin=margin,
                                 center_rewards_coefficient=self.cfg.rm.center_rewards_coefficient)

    def evaluate(self) -> dict[str, float]:
        if not self.eval_examples:
            return {}
        chosen, rejected = score_pairs(self.model, self.eval_examples, pad_id=self.tokenizer.pad_token_id or 0,
                                       device=self.device, batch_size=self.cfg.rm.eval_batch_size,
                                       autocast_dtype=self.autocast)
        return pairwise_metrics(chosen, rejected)


class DPOTrainer(PairTrainer):
    """DPO (``cfg``: a ``DPORunConfig``). The reference is the initial policy: its log-probs of every train and
    held-out pair are computed once, before a checkpoint is loaded, so a resumed run has the same reference.
    Evaluation: the DPO loss and reward accuracy/margin on the held-out pairs."""

    kind = "dpo"
    section = "dpo"

    @property
    def average_logps(self) -> bool:
        """IPO compares length-averaged sequence log-probs (TRL's ``ipo``); sigmoid and robust the summed ones."""
        return self.cfg.dpo.loss_type == "ipo"

    def before_resume(self) -> None:
        t0 = time.perf_counter()
        self.ref_logps = {}
        for examples in (self.train_examples, self.eval_examples):
            if not examples:
                continue
            chosen, rejected = reference_logprobs(self.model, examples, pad_id=self.tokenizer.pad_token_id or 0,
                                                  device=self.device, batch_size=self.cfg.dpo.eval_batch_size,
                                                  autocast_dtype=self.autocast, average=self.average_logps)
            for i, e in enumerate(examples):
                self.ref_logps[id(e)] = (chosen[i], rejected[i])
        log.info(f"reference log-probs of {len(self.ref_logps)} pairs in {time.perf_counter() - t0:.1f}s")

    def _ref(self, examples) -> tuple[torch.Tensor, torch.Tensor]:
        chosen = torch.stack([self.ref_logps[id(e)][0] for e in examples]).to(self.device)
        rejected = torch.stack([self.ref_logps[id(e)][1] for e in examples]).to(self.device)
        return chosen, rejected

    def pair_step(self, examples):
        d = self.cfg.dpo
        ref_c, ref_r = self._ref(examples)
        return dpo_step_loss(self.model, self.pair_batch(examples), ref_c, ref_r, beta=d.beta, loss_type=d.loss_type,
                             label_smoothing=d.label_smoothing, average=self.average_logps)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if not self.eval_examples:
            return {}
        d = self.cfg.dpo
        was_training = self.model.training
        self.model.eval()
        policy_c, policy_r = [], []
        for start in range(0, len(self.eval_examples), d.eval_batch_size):
            part = self.eval_examples[start:start + d.eval_batch_size]
            with torch.autocast(self.device.type, dtype=self.autocast or torch.bfloat16,
                                enabled=self.autocast is not None):
                logps = sequence_logprobs(self.model, self.pair_batch(part), average=self.average_logps).float()
            policy_c.append(logps[:len(part)])
            policy_r.append(logps[len(part):])
        self.model.train(was_training)
        ref_c, ref_r = self._ref(self.eval_examples)
        loss, metrics = K.dpo_loss(torch.cat(policy_c), torch.cat(policy_r), ref_c, ref_r, beta=d.beta,
                                   loss_type=d.loss_type, label_smoothing=d.label_smoothing)
        margins = (torch.cat(policy_c) - ref_c) - (torch.cat(policy_r) - ref_r)
        wins = int((margins > 0).sum())
        low, high = wilson_interval(wins, len(self.eval_examples))
        return {"eval/loss": float(loss), **{f"eval/{k}": float(v) for k, v in metrics.items()},
                "eval/rewards/accuracies_ci_low": low, "eval/rewards/accuracies_ci_high": high,
                "eval/num_pairs": len(self.eval_examples)}


__all__ = ["DPOTrainer", "PairTrainer", "RewardModelTrainer"]
