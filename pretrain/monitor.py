"""Training alerts: loss spikes, NaN/Inf, gradient explosions, throughput drops, stalled data.

"Monitor everything, expect failures" (Smol Training Playbook, the training marathon). Each
detector returns Alerts; the loop applies the configured policy of each kind:

    warn      log it and go on
    skip      drop this step's update: optimizer and scheduler untouched, rows recorded as skipped
    rollback  reload the last checkpoint and replay without this step's rows (deterministic)
    stop      end the run with an error, the bad update not applied

Every alert goes to the console, to `alerts.jsonl` in the run directory and to wandb when on.

Detectors (defaults in PretrainConfig):
- nan: loss or gradient norm not finite; checked before the optimizer step.
Every input of a detector is reduced across ranks first (the global loss, the flag of a non-finite
value anywhere, the slowest rank's step time and data wait), so every rank sees the same values,
takes the same decision and none is left waiting in a collective for a rank that stopped.
- loss_spike: loss > median + k * scale of the last `spike_window` applied steps, where scale is
  the robust standard deviation 1.4826 * MAD, floored at 2% of the median (a robust z-score:
  unlike an EMA variance it is not inflated by the loss's own downward trend, which hid a 5x
  spike in our first version). The spiking step does not enter the window.
- grad_explosion: gradient norm > factor x its EMA.
- throughput_drop: tokens/s below a fraction of the running median for N steps in a row.
- data_stall: waiting longer than a limit for the next batch.
- expert_collapse (MoE, core/moe.py): in the worst MoE layer, over the step's global batch, the busiest
  expert's load above `expert_collapse_ratio` x the mean, or an expert that got no token at all (dead).
  Once per episode, like throughput_drop. Routing collapse is the classic MoE failure (Shazeer et al.
  2017): a few experts get every token, the rest stop learning, and a quiet loss curve hides it.
- straggler: one rank consistently slower than the others (node health, issue 21). Each rank times its own
  forward passes (hooks on the unwrapped model: RankTimer), the one part of a step with no collective
  under DDP (the backward's all-reduce makes
  every rank wait for the slowest, so whole-step times are all equal); the times are gathered only at
  logging steps. A rank whose time is more than `straggler_fraction` above the median of the other ranks
  in `straggler_windows` logging windows in a row is named. (Under FSDP2 and TP the forward has
  collectives too, which pull every rank toward the slowest and hide it: there, run `python -m core.infra`
  across the ranks instead.)
"""

import math
import statistics
import time

from core.alerts import Alert, AlertLog  # noqa: F401  (the shared alert record and log; re-exported)

POLICIES = ("warn", "skip", "rollback", "stop")
KINDS = ("nan", "loss_spike", "grad_explosion", "throughput_drop", "data_stall", "expert_collapse", "straggler")
DEFAULT_POLICIES = {"nan": "skip", "loss_spike": "warn", "grad_explosion": "warn", "throughput_drop": "warn",
                    "data_stall": "warn", "expert_collapse": "warn", "straggler": "warn"}
# What an alert can do depends on when it is seen: step alerts come before the optimizer step,
# throughput and data alerts only after it, when there is nothing left to skip.
STEP_KINDS = ("nan", "loss_spike", "grad_explosion")


def resolve_policies(overrides: dict) -> dict[str, str]:
    unknown = set(overrides) - set(KINDS)
    if unknown:
        raise ValueError(f"alert_policies has unknown alerts {sorted(unknown)}; alerts: {list(KINDS)}")
    policies = {**DEFAULT_POLICIES, **overrides}
    for kind, policy in policies.items():
        allowed = POLICIES if kind in STEP_KINDS else ("warn", "stop")
        if policy not in allowed:
            raise ValueError(f"alert_policies.{kind}={policy!r}; allowed for {kind}: {allowed}")
    return policies


class Monitor:
    def __init__(self, *, spike_sigma: float, spike_warmup: int, ema_beta: float, grad_factor: float,
                 throughput_fraction: float, throughput_windows: int, data_stall_seconds: float,
                 spike_window: int = 50, expert_collapse_ratio: float = 3.0, straggler_fraction: float = 0.2,
                 straggler_windows: int = 3):
        self.spike_sigma, self.spike_warmup, self.beta = spike_sigma, spike_warmup, ema_beta
        self.spike_window = spike_window
        self.recent_losses: list[float] = []
        self.grad_factor = grad_factor
        self.tp_fraction, self.tp_windows = throughput_fraction, throughput_windows
        self.data_stall_seconds = data_stall_seconds
        self.grad_mean = None
        self.seen = 0
        self.throughputs: list[float] = []
        self.slow_windows = 0
        self.expert_collapse_ratio = expert_collapse_ratio
        # Not in COUNTERS: a run resumed inside a collapse episode reports it once more, which is harmless.
        self.collapsed = False
        self.straggler_fraction, self.straggler_windows = straggler_fraction, straggler_windows
        self.straggler_counts: dict[str, int] = {}  # rank (as a JSON key) -> slow logging windows in a row
        self.straggler_warm = False  # not saved: a resumed process warms up again

    def check_step(self, step: int, loss: float, grad_norm: float) -> list[Alert]:
        """Alerts about a step's loss and gradient, before its update is applied."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return [Alert(step, "nan", f"loss {loss} / grad norm {grad_norm} is not finite", float("nan"), 0.0)]
        alerts = []
        if self.seen >= self.spike_warmup:
            median = statistics.median(self.recent_losses)
            mad = statistics.median(abs(x - median) for x in self.recent_losses)
            limit = median + self.spike_sigma * max(1.4826 * mad, 0.02 * abs(median))
            if loss > limit:
                alerts.append(Alert(step, "loss_spike", f"loss {loss:.4f} above the recent median {median:.4f} + "
                                    f"{self.spike_sigma} robust sigma = {limit:.4f}", loss, limit))
            if self.grad_mean and grad_norm > self.grad_factor * self.grad_mean:
                alerts.append(Alert(step, "grad_explosion", f"grad norm {grad_norm:.3f} above {self.grad_factor} x "
                                    f"its EMA {self.grad_mean:.3f}", grad_norm, self.grad_factor * self.grad_mean))
        return alerts

    def accept_step(self, loss: float, grad_norm: float) -> None:
        """Fold an applied step into the running statistics (skipped or spiking steps are not)."""
        self.recent_losses = (self.recent_losses + [loss])[-self.spike_window:]
        self.grad_mean = grad_norm if self.grad_mean is None else self.beta * self.grad_mean + (1 - self.beta) * grad_norm
        self.seen += 1

    def check_throughput(self, step: int, tokens_per_s: float) -> list[Alert]:
        alerts = []
        if len(self.throughputs) >= self.tp_windows:
            median = statistics.median(self.throughputs[-50:])
            if tokens_per_s < self.tp_fraction * median:
                self.slow_windows += 1
                if self.slow_windows == self.tp_windows:  # once per slow episode, not every step of it
                    alerts.append(Alert(step, "throughput_drop", f"{tokens_per_s:,.0f} tok/s for {self.slow_windows} "
                                        f"steps, below {self.tp_fraction:.0%} of the median {median:,.0f}",
                                        tokens_per_s, self.tp_fraction * median))
                return alerts  # slow steps do not drag the median down
            self.slow_windows = 0
        self.throughputs.append(tokens_per_s)
        return alerts

    def check_data_wait(self, step: int, seconds: float) -> list[Alert]:
        if seconds > self.data_stall_seconds:
            return [Alert(step, "data_stall", f"waited {seconds:.2f}s for the next batch", seconds,
                          self.data_stall_seconds)]
        return []

    def check_expert_load(self, step: int, load: dict) -> list[Alert]:
        """`load`: core.moe.expert_load of the step (empty for a dense model)."""
        if not load:
            return []
        ratio, dead = load["moe/max_mean_load"], load["moe/dead_experts"]
        collapsed = ratio > self.expert_collapse_ratio or dead > 0
        alerts = []
        if collapsed and not self.collapsed:
            alerts.append(Alert(step, "expert_collapse", f"expert load max/mean {ratio:.2f} (limit "
                                f"{self.expert_collapse_ratio}), {dead} of {load['moe/num_experts']} experts got no "
                                "token", ratio, self.expert_collapse_ratio))
        self.collapsed = collapsed
        return alerts

    def check_stragglers(self, step: int, seconds_per_rank: list[float]) -> list[Alert]:
        """Ranks slower than the median of the other ranks by straggler_fraction, straggler_windows times in a
        row (once per episode). The other ranks' median, not all ranks': with 2 ranks the median of all is
        their mean, which a straggler drags halfway toward itself.

        The first window of a process (a start or a resume) is not judged: it holds each rank's first forwards
        (allocations, lazy initialisation, compilation), whose one-off cost differs between ranks. A fresh-clone
        `make test` once named rank 0 in the first two windows of a 2-process run whose slowed rank was 1."""
        if not self.straggler_warm:
            self.straggler_warm = True
            return []
        alerts = []
        for rank, seconds in enumerate(seconds_per_rank):
            others = statistics.median(seconds_per_rank[:rank] + seconds_per_rank[rank + 1:])
            limit = (1 + self.straggler_fraction) * others
            key = str(rank)
            self.straggler_counts[key] = self.straggler_counts.get(key, 0) + 1 if seconds > limit else 0
            if self.straggler_counts[key] == self.straggler_windows:
                alerts.append(Alert(step, "straggler", f"rank {rank} forward {seconds:.3f}s per window, above "
                                    f"{1 + self.straggler_fraction:.2f} x the other ranks' median {others:.3f}s for "
                                    f"{self.straggler_windows} logging windows: check that node "
                                    f"(python -m core.infra across the ranks)", seconds, limit))
        return alerts

    # What a checkpoint keeps: the running statistics only. The thresholds come from the recipe, so
    # a resumed run with changed thresholds uses the new ones (issue 11).
    COUNTERS = ("recent_losses", "grad_mean", "seen", "throughputs", "slow_windows", "straggler_counts")

    def state_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.COUNTERS}

    def load_state_dict(self, state: dict) -> None:
        for name in self.COUNTERS:  # a checkpoint from before a counter existed keeps its fresh value
            setattr(self, name, state.get(name, getattr(self, name)))



class RankTimer:
    """Seconds this rank spends inside the forward of the model it is attached to, read and reset with
    `take()`. Hooks on the unwrapped model, not a timer around the wrapped call: DDP broadcasts buffers
    before it calls the module, and that collective would make a fast rank wait for the slow one inside
    the timed span. CUDA work is asynchronous: there, CUDA events time the forward on the GPU and are
    read only at `take()` (a logging step), so timing adds no synchronisation to the other steps."""

    def __init__(self, cuda: bool):
        self.cuda, self.pending, self.seconds, self.started = cuda, [], 0.0, 0.0

    def attach(self, module) -> None:
        module.register_forward_pre_hook(lambda *_: self.start())
        module.register_forward_hook(lambda *_: self.stop())

    def start(self) -> None:
        if self.cuda:
            import torch

            self.pending.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            self.pending[-1][0].record()
        else:
            self.started = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            self.pending[-1][1].record()
        else:
            self.seconds += time.perf_counter() - self.started

    def take(self) -> float:
        if self.pending:
            self.pending[-1][1].synchronize()
            self.seconds += sum(start.elapsed_time(end) for start, end in self.pending) / 1000
            self.pending = []
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def cuda_health(device) -> dict[str, float]:
    """Temperature (C), utilisation (%) and memory (GiB) of this rank's GPU. Temperature and utilisation
    come from NVML (nvidia-ml-py, through torch.cuda); without it, memory only."""
    import torch

    health = {"memory_gib": torch.cuda.max_memory_allocated(device) / 2**30,
              "memory_reserved_gib": torch.cuda.memory_reserved(device) / 2**30}
    try:
        health["temperature_c"] = float(torch.cuda.temperature(device))
        health["utilization_pct"] = float(torch.cuda.utilization(device))
    except (ModuleNotFoundError, RuntimeError):  # no nvidia-ml-py, or NVML not answering
        pass
    return health
