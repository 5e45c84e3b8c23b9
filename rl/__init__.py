"""Online RL: GRPO with verifiable rewards and vLLM rollouts (TRL GRPOTrainer). See rl/__main__.py."""
