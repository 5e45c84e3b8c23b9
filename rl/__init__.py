"""Online RL (GRPO) and the reward models it can use (rl/reward_model.py)."""
