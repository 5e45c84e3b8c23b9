"""Online RL: GRPO with verifiable rewards and vLLM rollouts (TRL GRPOTrainer, rl/__main__.py), and the
reward models it can use (rl/reward_model.py)."""
