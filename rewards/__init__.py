"""Reward functions, named reward suites, and checkpoint evaluation.

  rewards.functions      REWARD_FUNCS (by name): accuracy, format, think_format, boxed_format, tag_count,
                         reasoning_steps, cosine_scaled, soft_overlong_punishment, repetition_penalty
                         (TRL's own where they are the same thing);
                         compute_rewards / summarize enforce the `fn(completions, **columns)` contract
  rewards.math_grader    math-verify, corrected where it is known to be wrong (runs in the workers)
  rewards.verifier_pool  the worker processes that bound math grading in time
  rewards.suites         SUITES: built-in arithmetic, GSM8K-style and MATH-style jsonl
  rewards.evaluate       `python -m rewards.evaluate --model A [--model B ...] --suite NAME`

RL and preference stages import the functions from here: a reward is selected by name,
`REWARD_FUNCS["accuracy"]`, and called as TRL calls it.
"""
