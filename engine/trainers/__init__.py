"""The trainers: one module per trainer (GRPO, PPO, SFT, reward model and DPO), the loop they share, evaluation
and the demo. Import the trainer you need from its module (``engine.trainers.grpo.GRPOTrainer``)."""
