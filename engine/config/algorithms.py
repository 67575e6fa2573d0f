"""The algorithm sections: the clipped policy loss shared by GRPO and PPO (``PolicyLossConfig``, ``GRPOConfig``,
``PPOConfig``), supervised fine-tuning (``SFTConfig``) and the preference-pair runs (``PairTrainingConfig``,
``RewardModelConfig``, ``DPOConfig``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from engine.algorithms.grpo import ADV_ESTIMATORS
from engine.algorithms.rollout_corr import ROLLOUT_IS_LEVELS, ROLLOUT_IS_MODES
from engine.config.base import ConfigError, Int, Section, Text
from kernels.dpo_loss import DPO_LOSS_TYPES
from kernels.kl import KL_ESTIMATORS
from kernels.loss_agg import LOSS_AGG_MODES
from kernels.ppo_loss import POLICY_LOSSES


class PolicyLossConfig(Section):
    """What GRPO and PPO share: the rollout batch, the clipped policy loss with its KL penalty, aggregation and
    entropy bonus, rule rewards and rollout importance sampling. The defaults are GRPO's but ``num_generations``;
    each algorithm overrides those that differ."""

    num_generations: Int = Field(1, ge=1)
    """Completions sampled per prompt."""
    prompts_per_step: Int = Field(16, ge=1)
    """Prompts per optimizer step; at most the number of training prompts (see the algorithm's section)."""
    clip_ratio_low: float = Field(0.2, ge=0, le=1)
    """PPO clip: the policy ratio is clipped below at ``1 - clip_ratio_low``; in [0, 1]."""
    clip_ratio_high: float = Field(0.2, ge=0)
    """PPO clip: the policy ratio is clipped above at ``1 + clip_ratio_high`` (DAPO's clip-higher uses 0.28); >= 0."""
    policy_loss: Literal[POLICY_LOSSES] = "vanilla"
    """The policy loss (veRL's ``loss_mode``; ``kernels.ppo_loss``): vanilla (PPO's clipped token ratio), gspo
    (GSPO, Zheng et al. 2025: one clipped ratio per sequence, the geometric mean of its token ratios; the paper clips
    at ``clip_ratio_low/high`` ~3e-4/4e-4 and forces ``loss_agg_mode: seq-mean-token-mean``) or cispo (CISPO,
    MiniMax-M1 2025: the clipped ratio, detached, weighs the log-prob gradient of every token)."""
    kl_coef: float = Field(0.0, ge=0)
    """Weight of the KL penalty to the reference (initial) policy in the loss; 0 needs no reference model."""
    kl_estimator: Literal[KL_ESTIMATORS] = "k3"
    """KL estimator of the penalty: k1, k2, k3 or abs (``kernels.KL_ESTIMATORS``)."""
    loss_agg_mode: Literal[LOSS_AGG_MODES] = "token-mean"
    """How token losses (PPO: the policy's and the value's) become one number: token-mean, seq-mean-token-mean,
    seq-mean-token-sum or seq-mean-token-sum-norm (``kernels.LOSS_AGG_MODES``)."""
    ppo_epochs: Int = Field(1, ge=1)
    """Passes over each rollout batch; 1 is on-policy (the ratio is exactly 1 on the first pass)."""
    micro_batch_size: Int = Field(32, ge=1)
    """Completions per forward/backward pass (gradient accumulation over the rollout batch); need not divide it (the
    last micro-batch is smaller, the update the same), and a value above the batch means one pass."""
    entropy_coef: float = Field(0.0, ge=0)
    """Entropy bonus: subtracts this times the aggregated token entropy from the (policy) loss (veRL's
    ``entropy_coeff``); 0 is off."""
    rewards: list[Text] = Field(default_factory=lambda: ["accuracy", "format"], min_length=1)
    """Reward functions: built-in names (``engine.rewards.REWARDS``) or import paths ``pkg.module:function``; their
    weighted sum is the reward. Resolved when the trainer starts. An import path imports that module, which runs
    its code with your permissions (as TRL's ``trust_remote_code``): run only configs whose reward modules you
    trust."""
    reward_weights: list[float] | None = None
    """One weight per entry of ``rewards``; null weighs them all 1."""
    rollout_is: Literal[ROLLOUT_IS_LEVELS] | None = None
    """Rollout correction (veRL ``rollout_corr``): importance weights ``pi_trainer / pi_rollout`` of the sampled
    tokens, correcting the generator/trainer log-prob gap, per token or per sequence (the geometric mean of its token
    ratios); null is off. ``rollout_is_mode`` says what the weights do."""
    rollout_is_mode: Literal[ROLLOUT_IS_MODES] = "truncate"
    """truncate: the loss of a token is multiplied by ``min(w, rollout_is_cap)`` (TIS; slime, NeMo ``tis``). mask:
    tokens (or whole sequences) whose weight is outside ``[rollout_is_low, rollout_is_cap]`` are dropped from the
    loss and its token/sequence counts, the others weigh 1 (veRL rejection sampling, NeMo ``icepop``/
    ``seq-mask-tis``, slime OPSM)."""
    rollout_is_cap: float = Field(2.0, gt=0)
    """Upper bound of the rollout importance weights (> 0): the truncation cap, or the mask's upper bound."""
    rollout_is_low: float = Field(0.5, ge=0)
    """Lower bound of the weights kept by ``rollout_is_mode: mask`` (>= 0, below ``rollout_is_cap``)."""
    max_tokens_per_micro_batch: Int | None = Field(None, ge=1)
    """Packed, token-budget updates (veRL ``ppo_max_token_len_per_gpu``, slime ``--max-tokens-per-gpu``): each
    forward/backward pass packs whole sequences, without padding, up to this many prompt + response tokens (a longer
    sequence goes alone), balanced so long and short ones mix; ``micro_batch_size`` is then unused. Null: fixed
    ``micro_batch_size`` rows, right-padded."""

    @model_validator(mode="before")
    @classmethod
    def _gspo_aggregates_per_sequence(cls, data: Any) -> Any:
        """GSPO's loss is a mean over sequences of their token means: veRL forces ``seq-mean-token-mean``; so do we,
        and an explicit other mode is an error."""
        if not isinstance(data, dict) or data.get("policy_loss") != "gspo":
            return data
        given = data.get("loss_agg_mode", "seq-mean-token-mean")
        if given != "seq-mean-token-mean":
            raise ConfigError("loss_agg_mode", f"must be seq-mean-token-mean with policy_loss: gspo (a sequence-level "
                              f"ratio), got {given}")
        return {**data, "loss_agg_mode": "seq-mean-token-mean"}

    @model_validator(mode="after")
    def _consistent(self) -> PolicyLossConfig:
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            raise ConfigError("reward_weights", f"must have one weight per reward ({len(self.rewards)}: "
                              f"{self.rewards}), got {len(self.reward_weights)}: {self.reward_weights}")
        if self.rollout_is_mode == "mask" and not self.rollout_is_low < self.rollout_is_cap:
            raise ConfigError("rollout_is_low", f"must be below rollout_is_cap ({self.rollout_is_cap}) with "
                              f"rollout_is_mode: mask, got {self.rollout_is_low}")
        return self


class GRPOConfig(PolicyLossConfig):
    """GRPO: groups of completions per prompt, group-normalised advantages, the clipped policy loss
    (``engine.algorithms.grpo``, ``kernels.grpo_loss``).

    The rollout batch is ``prompts_per_step * num_generations`` completions; it is split into micro-batches of
    ``micro_batch_size`` (the last may be smaller: it need not divide the batch, because the loss is normalised by
    the whole batch's token/sequence count, so the split does not change it). ``prompts_per_step`` may not exceed
    the number of training prompts (a prompt drawn twice into one step would count twice in the group statistics
    of the batch): the trainer raises ``ValueError`` when it starts."""

    num_generations: Int = Field(8, ge=2)
    """Completions sampled per prompt (the group); >= 2, since advantages are relative to the group."""
    norm_adv_by_std: bool = True
    """Divide advantages by the group's reward std (GRPO); false keeps only the mean baseline (Dr. GRPO)."""
    unbiased_std: bool = True
    """Group std with Bessel's correction (n - 1), as TRL and veRL compute it."""
    epsilon: float = Field(1e-6, gt=0)
    """Added to the group std before dividing (> 0)."""
    adv_estimator: Literal[ADV_ESTIMATORS] = "grpo"
    """Advantage estimator (veRL's ``adv_estimator``): grpo (group-normalised scores), rloo (leave-one-out group
    baseline, Ahmadian et al. 2024) or reinforce_plus_plus (REINFORCE++, Hu 2025: token rewards = the score at the
    last token minus ``kl_coef`` times the per-token KL to the reference, discounted returns with ``gamma``, whitened
    over the whole batch; the KL is then in the reward, not in the loss)."""
    gamma: float = Field(1.0, ge=0, le=1)
    """Discount of the REINFORCE++ returns, in [0, 1]; unused by grpo and rloo."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling (Yu et al. 2025): groups whose rewards all agree (zero std: no advantage) are dropped
    and new prompts sampled until the step has ``prompts_per_step`` informative groups, or ``max_num_gen_batches``
    rollouts were made (then the step trains on what it has and says so in ``dynamic_sampling/*``)."""
    max_num_gen_batches: Int = Field(10, ge=1)
    """Most rollouts (of ``prompts_per_step`` prompts each) per step with ``dynamic_sampling`` (veRL's name)."""
    overlong_buffer_len: Int = Field(0, ge=0)
    """DAPO's soft overlong punishment: a completion longer than ``generation.max_tokens - overlong_buffer_len``
    tokens loses ``overlong_penalty_factor`` times the fraction of this buffer it used (up to the whole factor at
    ``max_tokens``); 0 is off."""
    overlong_penalty_factor: float = Field(1.0, ge=0)
    """The largest overlong punishment, reached at ``generation.max_tokens``."""
    overlong_filtering: bool = False
    """DAPO's overlong filtering: completions cut at ``generation.max_tokens`` (no EOS) are masked out of the loss
    (TRL's ``mask_truncated_completions``); they still count in the group statistics of their prompt."""


class PPOConfig(PolicyLossConfig):
    """PPO with a critic (Ouyang et al. 2022; ``engine.algorithms.ppo``): one completion per prompt scored by a frozen
    reward model (or rule rewards), token rewards = the score at the last response token minus ``kl_coef`` times the
    per-token KL to the reference (KL in the reward), GAE advantages (whitened) and returns, then ``ppo_epochs``
    passes of clipped policy and value losses over mini-batches."""

    prompts_per_step: Int = Field(32, ge=1)
    """Prompts per rollout batch (one completion each, or ``num_generations``); at most the number of training
    prompts (the trainer raises ``ValueError`` when it starts: a prompt would be drawn twice into one batch)."""
    ppo_epochs: Int = Field(2, ge=1)
    """Passes over each rollout batch."""
    mini_batch_size: Int = Field(16, ge=1)
    """Completions per optimizer step (of the actor and of the critic) within a pass. Must divide the rollout batch
    ``prompts_per_step * num_generations`` (as veRL asserts): a smaller last mini-batch would be an optimizer step
    on a few samples, weighted like a whole one."""
    micro_batch_size: Int = Field(16, ge=1)
    """Completions per forward/backward pass (gradient accumulation inside a mini-batch); at most
    ``mini_batch_size``. It need not divide ``mini_batch_size``: the losses are normalised by the mini-batch's
    token/sequence counts, so the last, smaller micro-batch gives the same update."""
    cliprange_value: float | None = Field(0.5, gt=0)
    """Value clip half-width around the rollout's values (veRL's 0.5); null for the unclipped value loss."""
    gamma: float = Field(1.0, ge=0, le=1)
    """Discount factor of GAE, in [0, 1]."""
    lam: float = Field(0.95, ge=0, le=1)
    """GAE lambda, in [0, 1] (TRL and OpenRLHF use 0.95)."""
    whiten_advantages: bool = True
    """Whiten the advantages over the batch's response tokens (veRL's recipe)."""
    kl_coef: float = Field(0.05, ge=0)
    """Weight of the KL to the reference policy (the initial one); 0 needs no reference model."""
    kl_estimator: Literal[KL_ESTIMATORS] = "k1"
    """KL estimator (``kernels.KL_ESTIMATORS``); k1 in the reward is InstructGPT's."""
    use_kl_loss: bool = False
    """False: the KL is a per-token reward penalty (InstructGPT). True: it is a loss term instead (GRPO style; pair
    it with ``kl_estimator: k3``)."""
    adaptive_kl: bool = False
    """Adapt ``kl_coef`` towards ``target_kl`` (Ziegler et al. 2019)."""
    target_kl: float = Field(6.0, gt=0)
    """Target of the adaptive controller: the mean per-sequence KL, in nats."""
    kl_horizon: Int = Field(10000, ge=1)
    """Horizon of the adaptive controller, in samples."""
    critic_warmup_steps: Int = Field(0, ge=0)
    """Steps at the start of the run that update the critic only (veRL's ``critic_warmup``): the value head, fresh
    or fitted to scores rather than returns, first learns the returns."""
    critic_lr: float = Field(1e-5, gt=0)
    """Learning rate of the critic's own AdamW (the other optimizer settings are ``optim``'s)."""
    critic_path: Text | None = None
    """Initial critic: a reward-model / critic checkpoint (directory or run directory). Null: the reward model's weights
    when ``reward_model`` is set (InstructGPT, OpenRLHF), else the policy's body with a fresh value head."""
    reward_model: Text | None = None
    """The frozen reward model: a run directory of ``rlhf-engine rm`` or a ``*ForSequenceClassification``
    checkpoint. Null: the rule rewards of ``rewards``."""
    rewards: list[Text] = Field(default_factory=list)
    """Rule reward functions (as in ``grpo.rewards``; an import path runs that module's code), used when
    ``reward_model`` is null."""
    reward_clip: float | None = Field(None, gt=0)
    """Clip scores to ``[-reward_clip, reward_clip]`` before they enter the rewards (OpenRLHF clips at 10); null: no
    clip."""
    missing_eos_penalty: float | None = Field(None, ge=0)
    """Subtracted from the score of a completion that hit ``generation.max_tokens`` without EOS (TRL's option)."""

    @model_validator(mode="after")
    def _batches_nest_and_one_reward_source(self) -> PPOConfig:
        batch = self.prompts_per_step * self.num_generations
        if batch % self.mini_batch_size:
            raise ConfigError("mini_batch_size", f"must divide the rollout batch prompts_per_step * num_generations = "
                              f"{self.prompts_per_step} * {self.num_generations} = {batch}, got "
                              f"{self.mini_batch_size}")
        if self.micro_batch_size > self.mini_batch_size:
            raise ConfigError("micro_batch_size", f"must be <= mini_batch_size ({self.mini_batch_size}): a "
                              f"forward/backward pass splits a mini-batch; got {self.micro_batch_size}")
        if self.reward_model is None and not self.rewards:
            raise ConfigError("reward_model", "or ppo.rewards must give the reward: set a reward-model run directory "
                              "(rlhf-engine rm) or rule reward names, got neither")
        if self.reward_model is not None and self.rewards:
            raise ConfigError("rewards", f"must be empty when reward_model is set (one reward source), got "
                              f"{self.rewards}")
        return self


class SFTConfig(Section):
    """Supervised fine-tuning on prompt/completion pairs (``engine.algorithms.sft``)."""

    epochs: Int = Field(1, ge=1)
    """Passes over the training set."""
    batch_size: Int = Field(32, ge=1)
    """Examples per optimizer step."""
    micro_batch_size: Int = Field(32, ge=1)
    """Examples per forward/backward pass (need not divide ``batch_size``: the loss is normalised by the step's
    token count, so the last, smaller micro-batch gives the same update); a value above ``batch_size`` means one
    pass per step."""
    max_steps: Int | None = Field(None, ge=1)
    """Stop after this many optimizer steps even if ``epochs`` are not done; null: ``epochs`` alone decide.
    (``trainer.max_steps`` is the GRPO budget; SFT runs use this field.)"""
    max_tokens_per_micro_batch: Int | None = Field(None, ge=1)
    """Packed, token-budget passes: each forward/backward packs whole examples, without padding, up to this many
    tokens (a longer one goes alone), balanced; ``micro_batch_size`` is then unused. Null: fixed rows, padded."""


class PairTrainingConfig(Section):
    """Batching of a preference-pair run (reward model, DPO): pairs per step, epochs, sequence lengths."""

    batch_size: Int = Field(32, ge=1)
    """Pairs per optimizer step."""
    micro_batch_size: Int = Field(16, ge=1)
    """Pairs per forward/backward pass (each pass runs chosen and rejected together: 2x rows). Need not divide
    ``batch_size``: each micro-batch's mean loss is weighted by its share of the step's pairs, so the last, smaller
    one gives the same update; a value above ``batch_size`` means one pass per step."""
    epochs: Int = Field(1, ge=1)
    """Passes over the training pairs."""
    max_steps: Int | None = Field(None, ge=1)
    """Stop after this many optimizer steps even if ``epochs`` are not done; null: ``epochs`` alone decide."""
    max_length: Int = Field(512, ge=2)
    """Most tokens of prompt + response; responses are cut to fit (the prompt is cut first, to
    ``data.max_prompt_tokens``, from the left)."""
    eval_batch_size: Int = Field(64, ge=1)
    """Pairs per forward pass when scoring the held-out split."""
    allow_empty_response: bool = False
    """Accept pairs whose chosen or rejected response is empty or whitespace only (Anthropic HH has 4 where saying
    nothing was preferred); false raises on them, naming the record."""


class RewardModelConfig(PairTrainingConfig):
    """Bradley-Terry reward model on chosen/rejected pairs (``engine.algorithms.reward_model``,
    ``kernels.pairwise_reward_loss``)."""

    center_rewards_coefficient: float | None = Field(None, ge=0)
    """Adds ``c * mean((r_c + r_r)^2)`` to keep rewards near zero (TRL's option; it suggests 0.01); null is off."""
    margin_field: Text | None = None
    """Column holding a per-pair margin subtracted inside the sigmoid (Llama 2); null: no margin."""


class DPOConfig(PairTrainingConfig):
    """Direct Preference Optimization (Rafailov et al. 2023; ``engine.algorithms.dpo``, ``kernels.dpo_loss``). The
    reference is the initial policy; its log-probs of every pair are computed once, before training."""

    beta: float = Field(0.1, gt=0)
    """KL-regularisation strength (TRL's default 0.1); > 0."""
    loss_type: Literal[DPO_LOSS_TYPES] = "sigmoid"
    """sigmoid (DPO; cDPO with ``label_smoothing``), robust or ipo (``kernels.DPO_LOSS_TYPES``). ipo compares
    length-averaged sequence log-probs, as TRL does; the others summed ones."""
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    """Assumed probability that a preference label is flipped, in [0, 0.5); must be 0 for ipo."""

    @model_validator(mode="after")
    def _no_smoothing_with_ipo(self) -> DPOConfig:
        if self.loss_type == "ipo" and self.label_smoothing:
            raise ConfigError("label_smoothing", f"must be 0 with loss_type='ipo', got {self.label_smoothing}")
        return self
