"""The one alert record and alert log every stage writes: `output_dir/alerts.jsonl`, the console, wandb.

    log = AlertLog(Path(out) / "alerts.jsonl", enabled=is_main_process, printer=print)
    log.emit(Alert(step=40, kind="length_hacking", message="...", value=1.4, threshold=1.1))

Pretraining (pretrain/monitor.py: loss spikes, NaN, ...) and RL (rl/rollouts.py: truncation,
zero-variance groups, length hacking) raise their own kinds; the file has one format.
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class Alert:
    step: int
    kind: str
    message: str
    value: float
    threshold: float
    action: str = "warn"


class AlertLog:
    """alerts.jsonl (main process) + console + wandb."""

    def __init__(self, path: Path, enabled: bool, printer, wandb_run=None):
        self.path, self.enabled, self.print, self.wandb = path, enabled, printer, wandb_run

    def emit(self, alert: Alert, **extra) -> None:
        self.print(f"ALERT [{alert.kind}] step {alert.step}: {alert.message} -> {alert.action}")
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({**asdict(alert), **extra}) + "\n")
        if self.wandb is not None:
            self.wandb.alert(title=f"smolforge {alert.kind}", text=f"step {alert.step}: {alert.message}")
