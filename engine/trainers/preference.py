"""Training on preference pairs: the reward model (``rlhf-engine rm``) and DPO (``rlhf-engine dpo``).

Both read chosen/rejected pairs in TRL's formats (``engine.data.tasks.PairTask``), hold out ``data.num_eval`` pairs
(the last ones of the file, or ``data.eval``), and run the loop, logging, checkpoints and resume of ``BaseTrainer``.
A step takes ``batch_size`` pairs and accumulates gradients over micro-batches of ``micro_batch_size`` pairs
(``pair_step``); each forward pass scores chosen and rejected together (``make_pair_batch``: 2x rows).
"""

from __future__ import annotations

import logging
import math
import time

import torch

from engine.algorithms import accumulated_step, make_pair_batch
from engine.algorithms.dpo import dpo_step_loss, evaluate_dpo, reference_logprobs
from engine.algorithms.reward_model import pairwise_metrics, reward_model_loss, score_pairs
from engine.data.tasks import PairTask
from engine.models.builders import build_policy, build_reward_model
from engine.trainers.base import BaseTrainer, autocast_dtype

log = logging.getLogger("rlhf_engine")


def pair_steps(section, num_pairs: int) -> int:
    """Optimizer steps of a pair run: ``max_steps``, else ``epochs`` passes of ``batch_size`` pairs."""
    return section.max_steps or section.epochs * math.ceil(num_pairs / section.batch_size)


def pair_step(trainer: BaseTrainer, section, pair_loss) -> dict[str, float]:
    """One optimizer step of ``trainer`` on its next ``section.batch_size`` pairs, accumulated over micro-batches of
    ``section.micro_batch_size`` pairs; ``pair_loss(examples) -> (loss, metrics)`` is the mean over ``examples``, so
    each micro-batch's share is its fraction of the step's pairs. Returns the step's metrics (their means over the
    pairs, ``grad_norm``, ``perf/pairs_per_sec``), its outcome recorded."""
    t0 = time.perf_counter()
    examples = trainer.local_part(trainer.next_examples(section.batch_size))  # this rank's pairs
    size = section.micro_batch_size

    def micro_loss(part: list):
        loss, metrics = pair_loss(part)
        share = len(part) / section.batch_size  # the step's loss is the mean over all its pairs (every rank's)
        return loss * share, {name: float(value) * share for name, value in {"loss": loss.detach(), **metrics}.items()}

    result = accumulated_step(trainer.model, trainer.optimizer,
                              (examples[start:start + size] for start in range(0, len(examples), size)), micro_loss,
                              max_grad_norm=trainer.cfg.optim.max_grad_norm, device_type=trainer.device.type,
                              autocast_dtype=trainer.autocast)
    metrics = {**result.metrics, "perf/pairs_per_sec": section.batch_size / max(time.perf_counter() - t0, 1e-9)}
    trainer.record_step_outcome(result.stepped, metrics)
    return metrics


def _pair_batch(trainer: BaseTrainer, examples: list):
    return make_pair_batch([e.prompt_ids for e in examples], [e.chosen_ids for e in examples],
                           [e.rejected_ids for e in examples], trainer.tokenizer.pad_token_id or 0, trainer.device)


class RewardModelTrainer(BaseTrainer):
    """Bradley-Terry reward model (``cfg``: a ``RewardModelRunConfig``); evaluation: held-out pairwise accuracy with
    its 95% Wilson interval, margin and loss. Parts: the pairs and the reward model."""

    def __init__(self, cfg, *, model=None, tokenizer=None):
        super().__init__(cfg)
        r = cfg.rm
        with self.setting_up():
            self.check_divides(**{"rm.batch_size": r.batch_size})
            task = PairTask.load(cfg.data, allow_empty_response=r.allow_empty_response)
            if model is None:
                model, tokenizer = build_reward_model(cfg.model, self.device, seed=cfg.trainer.seed,
                                                      texts=task.texts())
            self.model, self.tokenizer = model.train(), tokenizer
            self.train_examples, self.eval_examples = task.examples(tokenizer, cfg.data, max_length=r.max_length)
            self.model = self.shard(model)
            self.start(total_steps=pair_steps(r, len(self.train_examples)))

    def train_step(self, step: int) -> dict[str, float]:
        return pair_step(self, self.cfg.rm, self.pair_loss)

    def pair_loss(self, examples: list):
        """The Bradley-Terry loss and metrics of ``examples`` (``reward_model_loss``), with the per-pair margin of
        ``rm.margin_field`` when set."""
        margin = None
        if self.cfg.rm.margin_field:
            margin = torch.tensor([float(e.pair.record[self.cfg.rm.margin_field]) for e in examples],
                                  device=self.device)
        return reward_model_loss(self.model, _pair_batch(self, examples), margin=margin,
                                 center_rewards_coefficient=self.cfg.rm.center_rewards_coefficient)

    def evaluate(self) -> dict[str, float]:
        if not self.eval_examples:
            return {}
        chosen, rejected = score_pairs(self.model, self.eval_examples, pad_id=self.tokenizer.pad_token_id or 0,
                                       device=self.device, batch_size=self.cfg.rm.eval_batch_size,
                                       autocast_dtype=self.autocast)
        return pairwise_metrics(chosen, rejected)


class DPOTrainer(BaseTrainer):
    """DPO (``cfg``: a ``DPORunConfig``). Parts: the pairs, the policy, and the reference's log-probs of every train
    and held-out pair, computed once from the initial policy before a checkpoint is loaded (so a resumed run has the
    same reference; the reference model never sits beside the policy). Evaluation: the DPO loss and reward
    accuracy/margin on the held-out pairs (``engine.algorithms.dpo.evaluate_dpo``)."""

    def __init__(self, cfg, *, model=None, tokenizer=None):
        super().__init__(cfg)
        d = cfg.dpo
        # IPO compares length-averaged sequence log-probs (TRL's ``ipo``); sigmoid and robust the summed ones
        self.average_logps = d.loss_type == "ipo"
        with self.setting_up():
            self.check_divides(**{"dpo.batch_size": d.batch_size})
            task = PairTask.load(cfg.data, allow_empty_response=d.allow_empty_response)
            if model is None:
                model, tokenizer = build_policy(cfg.model, self.device, seed=cfg.trainer.seed, texts=task.texts())
            self.model, self.tokenizer = model.train(), tokenizer
            self.train_examples, self.eval_examples = task.examples(tokenizer, cfg.data, max_length=d.max_length)
            self.ref_logps = {**self.reference_logps(self.train_examples), **self.reference_logps(self.eval_examples)}
            self.model = self.shard(model)
            self.start(total_steps=pair_steps(d, len(self.train_examples)))

    def reference_logps(self, examples: list) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """``{id(example): (chosen, rejected)}``: the current policy's sequence log-probs of ``examples``."""
        t0 = time.perf_counter()
        if not examples:
            return {}
        chosen, rejected = reference_logprobs(self.model, examples, pad_id=self.tokenizer.pad_token_id or 0,
                                              device=self.device, batch_size=self.cfg.dpo.eval_batch_size,
                                              autocast_dtype=autocast_dtype(self.model, self.device),
                                              average=self.average_logps)
        log.info(f"reference log-probs of {len(examples)} pairs in {time.perf_counter() - t0:.1f}s")
        return {id(e): (chosen[i], rejected[i]) for i, e in enumerate(examples)}

    def _ref(self, examples) -> tuple[torch.Tensor, torch.Tensor]:
        chosen = torch.stack([self.ref_logps[id(e)][0] for e in examples]).to(self.device)
        rejected = torch.stack([self.ref_logps[id(e)][1] for e in examples]).to(self.device)
        return chosen, rejected

    def train_step(self, step: int) -> dict[str, float]:
        return pair_step(self, self.cfg.dpo, self.pair_loss)

    def pair_loss(self, examples: list):
        """The DPO loss and metrics of ``examples`` against their reference log-probs (``dpo_step_loss``)."""
        d = self.cfg.dpo
        ref_c, ref_r = self._ref(examples)
        return dpo_step_loss(self.model, _pair_batch(self, examples), ref_c, ref_r, beta=d.beta,
                             loss_type=d.loss_type, label_smoothing=d.label_smoothing, average=self.average_logps)

    def evaluate(self) -> dict[str, float]:
        if not self.eval_examples:
            return {}
        d = self.cfg.dpo
        ref_c, ref_r = self._ref(self.eval_examples)
        return evaluate_dpo(self.model, self.eval_examples, ref_c, ref_r, pad_id=self.tokenizer.pad_token_id or 0,
                            device=self.device, beta=d.beta, loss_type=d.loss_type,
                            label_smoothing=d.label_smoothing, average=self.average_logps,
                            batch_size=d.eval_batch_size, autocast_dtype=self.autocast)


__all__ = ["DPOTrainer", "RewardModelTrainer", "pair_step", "pair_steps"]
