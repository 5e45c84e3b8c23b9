"""Rollout logging and RL alerts, once per logging step (main process).

- `output_dir/rollouts.jsonl`: per logging step, a sample of `rollout_samples` completions with their
  prompt, each reward, and the advantage (`rollout_rows`). The completion is the whole reply as the
  rewards read it (`rewards.functions.completion_text`), think block included: TRL's reply parser moves
  the think block into `reasoning_content`, and the think text is what length hacking grows; the same rows go to wandb as a table (`rollouts`) when
  wandb is on. The numbers next to them are TRL's own, logged to metrics.jsonl:
  `completions/mean_length`, `completions/max_length`, `completions/clipped_ratio` (the fraction of
  truncated completions: no EOS within max_completion_length), `frac_reward_zero_std` (the fraction
  of groups whose rewards all equal: zero advantage, no learning signal) and `rewards/<name>/mean`.
- `output_dir/alerts.jsonl` (core/alerts.py, the format pretraining writes too):
    truncated        clipped_ratio >= alert_fraction for alert_window logs in a row: completions
                     never finish; raise max_completion_length or penalise length.
    zero_variance    frac_reward_zero_std >= alert_fraction for alert_window logs in a row: every
                     group is all-right or all-wrong, GRPO's advantage is 0 and nothing is learned;
                     change the prompt difficulty, num_generations or temperature.
    length_hacking   mean completion length grew at every log of the last alert_window logs (by
                     10% or more in all) while the accuracy reward did not rise: the Playbook's
                     lesson that naive GRPO learns to win reward with length; add the DAPO overlong
                     penalty (soft_overlong_punishment) or a length-aware reward.
  An alert fires once, then its window starts over.

On resume both files drop the lines after the resumed step first (core.metrics.truncate_after), so they
continue without a gap or a duplicate step.
"""

from __future__ import annotations

import json
import os
import random
from collections import deque
from pathlib import Path

from core.alerts import Alert, AlertLog
from core.metrics import truncate_after
from rewards.functions import completion_text

ROLLOUTS_FILE = "rollouts.jsonl"
ALERTS_FILE = "alerts.jsonl"


def rollout_rows(prompts: list, completions: list, rewards: dict[str, list], advantages: list) -> list[dict]:
    """One row per completion of TRL's logs (`GRPOTrainer._logs`): the prompt's last message, the completion
    as the model wrote it (think block included, however TRL's parser split it), each reward, the advantage."""
    rows = []
    for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        rows.append({"prompt": prompt[-1]["content"] if isinstance(prompt, list) else prompt,
                     "completion": completion_text(completion),
                     **{f"reward/{name}": values[i] for name, values in rewards.items()},
                     "advantage": advantages[i]})
    return rows


class RolloutMonitor:
    """Writes the rollout sample and raises the RL alerts; `record` is called at each log (main process)."""

    def __init__(self, output_dir: str | os.PathLike, samples: int, window: int, fraction: float,
                 accuracy_reward: str, printer=print, wandb_run=None, resume_step: int | None = None, seed: int = 0):
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.rollouts_path = out / ROLLOUTS_FILE
        if resume_step is not None:
            truncate_after(self.rollouts_path, resume_step)
            truncate_after(out / ALERTS_FILE, resume_step)
        self.samples, self.window, self.fraction = samples, window, fraction
        self.accuracy_key = f"rewards/{accuracy_reward}/mean"
        self.alerts = AlertLog(out / ALERTS_FILE, True, printer, wandb_run)
        self.wandb = wandb_run
        self.rng = random.Random(seed)
        self.history: dict[str, deque] = {k: deque(maxlen=window) for k in ("truncated", "zero_variance", "length")}

    def record(self, step: int, logs: dict, rollouts: list[dict]) -> list[Alert]:
        self.write_sample(step, rollouts)
        return self.check(step, logs)

    def write_sample(self, step: int, rollouts: list[dict]) -> None:
        sample = rollouts if len(rollouts) <= self.samples else self.rng.sample(rollouts, self.samples)
        with self.rollouts_path.open("a") as stream:
            for row in sample:
                stream.write(json.dumps({"step": step, **row}, default=str) + "\n")
        if self.wandb is not None and sample:
            import wandb

            columns = ["step", *sample[0]]
            table = wandb.Table(columns=columns, data=[[step, *(str(v) if isinstance(v, (list, dict)) else v
                                                                for v in row.values())] for row in sample])
            # No explicit step: the Trainer logs to the same run with its own step counter; the table has a step column.
            self.wandb.log({"rollouts": table})

    def check(self, step: int, logs: dict) -> list[Alert]:
        fired = []
        for kind, key, advice in (
            ("truncated", "completions/clipped_ratio",
             "completions hit max_completion_length without EOS; raise it, or penalise length "
             "(soft_overlong_punishment)"),
            ("zero_variance", "frac_reward_zero_std",
             "groups have identical rewards, so advantages are 0 and nothing is learned; change prompt difficulty, "
             "num_generations or temperature"),
        ):
            if logs.get(key) is None:
                continue
            history = self.history[kind]
            history.append(logs[key])
            if len(history) == self.window and min(history) >= self.fraction:
                fired.append(Alert(step, kind, f"{key} >= {self.fraction} for the last {self.window} logs "
                                               f"(now {logs[key]:.3f}): {advice}", logs[key], self.fraction))
                history.clear()
        length, accuracy = logs.get("completions/mean_length"), logs.get(self.accuracy_key)
        if length is not None:
            history = self.history["length"]
            history.append((length, accuracy))
            if len(history) == self.window:
                lengths = [h[0] for h in history]
                accuracies = [h[1] for h in history if h[1] is not None]
                growing = all(b > a for a, b in zip(lengths, lengths[1:])) and lengths[-1] >= 1.1 * lengths[0]
                flat = not accuracies or accuracies[-1] <= accuracies[0]
                if growing and flat:
                    ratio = lengths[-1] / lengths[0]
                    accuracy_note = (f"{self.accuracy_key} {accuracies[0]:.3f} -> {accuracies[-1]:.3f}"
                                     if accuracies else f"no {self.accuracy_key} logged")
                    fired.append(Alert(step, "length_hacking",
                                       f"mean completion length grew {lengths[0]:.1f} -> {lengths[-1]:.1f} over "
                                       f"{self.window} logs while accuracy did not ({accuracy_note}): the policy may "
                                       f"be winning reward with length; add soft_overlong_punishment",
                                       ratio, 1.1))
                    history.clear()
        for alert in fired:
            self.alerts.emit(alert)
        return fired
