"""Our pretraining loop against transformers' `Trainer`: the same model, data, batch, optimizer and schedule.

    .venv/bin/python bench/pretrain_vs_trainer.py [--presets tiny 135M] [--dtypes fp32 bf16] [--compile]
                                                  [--steps 25] [--warmup 5] [--rounds 1]

What a small-scale user would pick instead of `python -m pretrain` is `Trainer` on a causal LM. Both sides
get: the core at the preset's shape (vocab kept at the preset's size), the same init (seed), the same packed
rows in the same order (our MixtureStream's, handed to Trainer as a sequential dataset with its
position_ids, so both see the same per-document attention), AdamW with pretraining's parameter groups
and betas, the same scheduler object type, clipping at 1.0, bf16 autocast or fp32, and logging every
`--warmup` steps. Our side is the real loop, `pretrain.train.run` (alerts, per-source losses, metrics.jsonl
and all); preflight is off (a one-off check before the first step).

Timing: the steps after the first `--warmup` (which absorb compilation, allocator growth and the first
log), from the end of step `warmup` to the end of the last step, on both sides, in wall time and in this
process's CPU time (steadier on a shared machine); checkpoints are written after that (ours at
max_steps, Trainer's save_strategy "no"). Both are clocked at the end of every step: ours after its
update and log line (a wrapper around pretrain.train.log_step), Trainer's by a callback. The two alternate (order flipped every round and configuration)
so a busy machine hits both alike; the ratio is the median of ours over the median of Trainer's.
With --compile each side also runs compiled (our `torch_compile`, Trainer's `torch_compile`): the speed-up
over eager and the compile time (the warm-up's extra wall time) are printed. Not part of the test run.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import SequentialSampler
from transformers import Trainer, TrainerCallback, TrainingArguments

from core import SmolForgeConfig, SmolForgeForCausalLM
from core.optim import parameter_groups
from pretrain.config import PretrainConfig
from pretrain.tokenizer import sample_sources, train_tokenizer
import pretrain.train
from pretrain.train import build_data, build_scheduler
from accelerate import Accelerator
from accelerate.state import AcceleratorState

SOURCES = [{"name": "arithmetic", "path": "builtin:arithmetic", "weight": 0.7, "max_rows": 3000},
           {"name": "prose", "path": "builtin:prose", "weight": 0.3}]
# rows x tokens per micro-batch: tiny as recipes/tiny/pretrain.yaml; 135M small enough for a few minutes a run.
SHAPES = {"tiny": (32, 128), "135M": (1, 256)}


def recipe(preset: str, bf16: bool, compile: bool, steps: int, warmup: int, work: Path, tokenizer: Path,
           name: str) -> PretrainConfig:
    batch, seq = SHAPES[preset]
    return PretrainConfig(
        output_dir=str(work / name), tokenizer_name_or_path=str(tokenizer), model_preset=preset,
        model_overrides={"vocab_size": SmolForgeConfig.from_preset(preset).vocab_size}, max_length=seq,
        sources=SOURCES, data_cache_dir=str(work / "data_cache"), max_steps=warmup + steps,
        per_device_train_batch_size=batch, learning_rate=3e-3, warmup_steps=warmup,
        lr_scheduler_kwargs={"num_decay_steps": max(1, steps // 5), "decay_type": "linear"}, bf16=bf16,
        torch_compile=compile, logging_steps=warmup, eval_steps=10**9, save_steps=10**9, save_total_limit=1,
        skip_preflight=True)


def clocks() -> tuple[float, float]:
    """Wall time, and this process's CPU time: on a machine shared with other jobs the CPU time of a
    single-threaded run is the steadier measure (it does not count the time other processes held the core)."""
    return time.perf_counter(), time.process_time()


def rates(ends: list[tuple[float, float]], warmup: int, tokens_per_step: int) -> tuple[float, float, float]:
    """(tokens/s wall, tokens per CPU-second, warm-up seconds) from the clocks at the end of every step
    (ends[0]: before the run's setup)."""
    steps = len(ends) - 1 - warmup
    return (steps * tokens_per_step / (ends[-1][0] - ends[warmup][0]),
            steps * tokens_per_step / (ends[-1][1] - ends[warmup][1]), ends[warmup][0] - ends[0][0])


def ours(cfg: PretrainConfig, warmup: int) -> tuple[float, float, float]:
    """Our loop, clocked at the end of every step (after its update and log line), as Trainer is below."""
    ends = [clocks()]
    log_step = pretrain.train.log_step

    def clocked_log_step(*args, **kwargs):
        log_step(*args, **kwargs)
        ends.append(clocks())

    pretrain.train.log_step = clocked_log_step  # run() looks it up at every step
    try:
        pretrain.train.run(cfg)
    finally:
        pretrain.train.log_step = log_step
    return rates(ends, warmup, cfg.per_device_train_batch_size * cfg.max_length)


class StepClock(TrainerCallback):
    def __init__(self):
        self.ends = [clocks()]

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(clocks())


class SequentialTrainer(Trainer):
    """Rows in the order our stream drew them (Trainer shuffles by default)."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def collate(rows: list[dict]) -> dict:
    return {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "position_ids", "labels")}


def trainer(cfg: PretrainConfig, warmup: int) -> tuple[float, float, float]:
    """The same run through transformers.Trainer, clocked at the end of every step."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_name_or_path)
    _, _, stream = build_data(cfg, Accelerator(cpu=True), tokenizer)
    batches = iter(stream)
    rows = []
    for _ in range(cfg.max_steps):
        mb = next(batches)
        rows += [{k: mb[k][i] for k in ("input_ids", "position_ids", "labels")} for i in range(len(mb["input_ids"]))]
    config = SmolForgeConfig.from_preset(cfg.model_preset, **cfg.model_overrides)
    config._attn_implementation = cfg.attn_implementation
    torch.manual_seed(cfg.seed)
    model = SmolForgeForCausalLM(config)
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.weight_decay, cfg.no_decay), lr=cfg.learning_rate,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
    args = TrainingArguments(
        output_dir=cfg.output_dir, max_steps=cfg.max_steps, per_device_train_batch_size=cfg.per_device_train_batch_size,
        bf16=cfg.bf16, use_cpu=not torch.cuda.is_available(), torch_compile=cfg.torch_compile,
        max_grad_norm=cfg.max_grad_norm, logging_steps=warmup, save_strategy="no", report_to=[],
        remove_unused_columns=False, dataloader_num_workers=0, seed=cfg.seed, disable_tqdm=True)
    clock = StepClock()
    SequentialTrainer(model=model, args=args, train_dataset=rows, data_collator=collate,
                      optimizers=(optimizer, build_scheduler(cfg, optimizer)), callbacks=[clock]).train()
    return rates(clock.ends, warmup, cfg.per_device_train_batch_size * cfg.max_length)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "135M"], choices=sorted(SHAPES))
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--compile", action="store_true", help="also run both sides with torch.compile")
    parser.add_argument("--steps", type=int, default=25, help="timed optimizer steps (a multiple of --warmup)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first; also the logging interval")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each side per configuration, alternating")
    parser.add_argument("--sides", nargs="+", default=["ours", "trainer"], choices=["ours", "trainer"],
                        help="which loops to run (ours alone: the compile speed-up of our loop)")
    parser.add_argument("--work_dir", default=None, help="where runs write (default: a temporary directory)")
    args = parser.parse_args()
    if args.steps % args.warmup:
        parser.error("--steps must be a multiple of --warmup (the log window)")

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="pretrain_vs_trainer_"))
    tokenizer = work / "tokenizer"
    if not tokenizer.exists():
        train_tokenizer(sample_sources(SOURCES, 600), 512).save_pretrained(tokenizer)
    results, flip = [], False
    for preset in args.presets:
        for dtype in args.dtypes:
            for compile in ([False, True] if args.compile else [False]):
                runs = {side: [] for side in args.sides}
                cpu = {side: [] for side in args.sides}
                warm = {side: [] for side in args.sides}
                for r in range(args.rounds):
                    for side in (args.sides[::-1] if flip else args.sides):
                        name = f"{preset}-{dtype}-{'compiled' if compile else 'eager'}-{side}-{r}"
                        AcceleratorState._reset_state(reset_partial_state=True)  # bf16 or not, per run
                        cfg = recipe(preset, dtype == "bf16", compile, args.steps, args.warmup, work, tokenizer, name)
                        tps, cpu_tps, warmup_s = (ours if side == "ours" else trainer)(cfg, args.warmup)
                        runs[side].append(tps)
                        cpu[side].append(cpu_tps)
                        warm[side].append(warmup_s)
                        print(f"  {name}: {tps:,.0f} tokens/s, {cpu_tps:,.0f} tokens per CPU-second "
                              f"(warm-up {warmup_s:.1f} s)", flush=True)
                    flip = not flip
                row = {"preset": preset, "dtype": dtype, "compile": compile, "batch": "x".join(map(str, SHAPES[preset])),
                       "threads": torch.get_num_threads()}
                for side in args.sides:
                    row[f"{side}_tokens_per_s"] = round(statistics.median(runs[side]), 1)
                    row[f"{side}_tokens_per_cpu_s"] = round(statistics.median(cpu[side]), 1)
                    row[f"{side}_warmup_s"] = round(statistics.median(warm[side]), 1)
                if len(args.sides) == 2:
                    row["ratio_ours_over_trainer"] = round(row["ours_tokens_per_s"] / row["trainer_tokens_per_s"], 3)
                    row["cpu_ratio_ours_over_trainer"] = round(row["ours_tokens_per_cpu_s"] /
                                                               row["trainer_tokens_per_cpu_s"], 3)
                results.append(row)
                print(json.dumps(row), flush=True)
    if args.compile:
        eager = {(r["preset"], r["dtype"]): r for r in results if not r["compile"]}
        for r in results:
            if r["compile"]:
                e = eager[(r["preset"], r["dtype"])]
                summary = {"preset": r["preset"], "dtype": r["dtype"]}
                for side in args.sides:
                    summary[f"compile_speedup_{side}"] = round(r[f"{side}_tokens_per_s"] / e[f"{side}_tokens_per_s"], 3)
                    summary[f"compile_cpu_speedup_{side}"] = round(r[f"{side}_tokens_per_cpu_s"] /
                                                                   e[f"{side}_tokens_per_cpu_s"], 3)
                    summary[f"compile_time_s_{side}"] = round(r[f"{side}_warmup_s"] - e[f"{side}_warmup_s"], 1)
                print(json.dumps(summary))
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(f"results in {work / 'results.json'}")


if __name__ == "__main__":
    main()
