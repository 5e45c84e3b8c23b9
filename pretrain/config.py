"""PretrainConfig: every field of a pretraining (or mid-training) recipe, with its meaning."""

from dataclasses import dataclass

from core.recipe import help_field as _help


@dataclass
class PretrainConfig:
    # --- model -----------------------------------------------------------------------------------
    output_dir: str = _help("Run directory: checkpoint-<step>/ subfolders, metrics.jsonl, then the final model.",
                            default="out/pretrain")
    tokenizer_name_or_path: str | None = _help("Tokenizer directory (python -m pretrain.tokenizer) or any HF tokenizer.",
                                               default=None)
    model_name_or_path: str | None = _help("Start from this checkpoint (mid-training) instead of random weights.",
                                           default=None)
    model_preset: str = _help("Size preset of core/config.py for a model from scratch.", default="tiny")
    model_overrides: dict = _help("SmolForgeConfig fields changed from the preset (vocab_size defaults to the "
                                  "tokenizer's length).", default_factory=dict)
    attn_implementation: str = _help("eager | sdpa | flash_attention_2 | flex_attention", default="sdpa")

    # --- data ------------------------------------------------------------------------------------
    sources: list[dict] = _help("Data sources (core/sources.py): {path, name, weight, text_field, max_rows, split, "
                                "subset, seed, filters, dedup}.", default_factory=list)
    stages: list[dict] | None = _help("Curriculum: [{start_step | start_tokens, weights: {source: w}}]; "
                                      "default: one stage with the sources' weights.", default=None)
    adaptive_mixture: bool = _help("Shift weight toward sources whose validation loss improves most slowly "
                                   "(rule in pretrain/data.py:adapt_factors), at every evaluation.", default=False)
    adaptive_rate: float = _help("Step size of the adaptive rule.", default=0.5)
    max_length: int = _help("Tokens per packed row (the sequence length).", default=256)
    validation_rows: int = _help("Rows held out per source for its validation loss.", default=8)
    data_cache_dir: str = _help("Where tokenised sources are cached (keyed by source content, tokenizer, max_length).",
                                default="out/data_cache")

    # --- optimisation ------------------------------------------------------------------------------
    max_steps: int = _help("Optimizer steps.", default=200)
    per_device_train_batch_size: int = _help("Rows per micro-batch per process.", default=16)
    gradient_accumulation_steps: int = _help("Micro-batches per optimizer step.", default=1)
    learning_rate: float = _help("Peak learning rate.", default=3e-3)
    weight_decay: float = _help("AdamW weight decay on the matrices.", default=0.1)
    no_decay: list[str] = _help("Parameter kinds without weight decay: any of embeddings, norms, biases.",
                                default_factory=lambda: ["embeddings", "norms", "biases"])
    adam_beta1: float = _help("AdamW beta1.", default=0.9)
    adam_beta2: float = _help("AdamW beta2 (0.95 as in SmolLM3 / Llama).", default=0.95)
    adam_epsilon: float = _help("AdamW epsilon.", default=1e-8)
    lr_scheduler_type: str = _help("Any transformers scheduler name (transformers.get_scheduler, as in SFT): "
                                   "warmup_stable_decay, cosine, cosine_with_min_lr, linear, constant_with_warmup, ...",
                                   default="warmup_stable_decay")
    lr_scheduler_kwargs: dict = _help("The scheduler's own arguments. warmup_stable_decay: num_decay_steps (SmolLM3 "
                                      "decays over the last ~10%), decay_type (linear, cosine, 1-sqrt), min_lr_ratio; "
                                      "cosine_with_min_lr: min_lr_rate.",
                                      default_factory=lambda: {"num_decay_steps": 40, "decay_type": "linear"})
    warmup_steps: int = _help("Linear warmup steps.", default=20)
    max_grad_norm: float = _help("Gradient clipping norm (0 = off).", default=1.0)
    bf16: bool = _help("bf16 autocast (on CPU too) for the matmuls; weights, loss, norms and the residual stream stay "
                       "fp32. Faster here from the tiny preset up (1.3x per CPU-second at tiny, 1.3-1.8x wall at 135M; "
                       "bench/pretrain_vs_trainer.py, issue 22).", default=False)
    torch_compile: bool = _help("torch.compile each decoder block (core/kernels.py:compile_blocks; inductor).",
                                default=False)
    tp_size: int = _help("Tensor-parallel ranks per model replica (Megatron colwise/rowwise, the model's "
                         "base_model_tp_plan); the processes form a (processes / tp_size) x tp_size mesh, FSDP2 "
                         "over the first dimension when it is > 1 (pretrain/parallel.py). 1 = no TP.", default=1)
    sequence_parallel: bool = _help("With tp_size > 1, also split the norms and the residual stream along the "
                                    "sequence (Korthikanti et al. 2022): less activation memory, same numbers.",
                                    default=False)
    seed: int = _help("Seed of the init (same on every rank) and of the data order.", default=0)

    # --- checkpoints, evaluation, logging -------------------------------------------------------
    save_steps: int = _help("Checkpoint every N steps (and at the end).", default=100)
    save_total_limit: int | None = _help("Keep the newest K >= 1 checkpoints (null: keep all).", default=2)
    resume_from_checkpoint: str | None = _help("Continue an interrupted run: true (or latest) for the newest complete "
                                               "checkpoint in output_dir, or the path of one checkpoint.", default=None)
    eval_steps: int = _help("Per-source validation loss every N steps (and at the end).", default=50)
    logging_steps: int = _help("Log every N steps.", default=10)
    report_to: list[str] = _help("Remote trackers, through accelerate (log_with): tensorboard, wandb (offline unless "
                                 "WANDB_MODE says otherwise), ..., all or none. output_dir/metrics.jsonl is always "
                                 "written (core/metrics.py).", default_factory=lambda: ["none"])
    peak_flops: float | None = _help("Peak FLOP/s per process for MFU; default: core/infra/devices.py's figure for "
                                     "this device and dtype (bf16 when bf16 is on, else fp32): the datasheet for a "
                                     "known GPU (H100, H200, A100), a matmul measured at start on a CPU or an unknown "
                                     "GPU. The log says which peak it uses.", default=None)
    preflight: bool = _help("Run the preflight checks only, print them, and exit.", default=False)
    preflight_hardware: bool = _help("Add the quick hardware diagnostics (python -m core.infra --quick: matmul and "
                                     "copy bandwidth against the device's peak) to the preflight checks.",
                                     default=False)
    skip_preflight: bool = _help("Do not run the preflight checks before training.", default=False)

    # --- monitoring and alerts (pretrain/monitor.py) --------------------------------------------
    alert_policies: dict = _help("Policy per alert (warn | skip | rollback | stop; throughput_drop and data_stall: "
                                 "warn | stop). Defaults: nan skip, everything else warn.", default_factory=dict)
    spike_sigma: float = _help("Loss spike: loss above the median of the last spike_window steps by this many robust "
                               "standard deviations (1.4826 x MAD, at least 2% of the median).", default=6.0)
    spike_window: int = _help("Applied steps the spike statistics look back over.", default=50)
    spike_warmup: int = _help("Steps of statistics before spike and explosion alerts can fire.", default=20)
    ema_beta: float = _help("Decay of the grad-norm EMA.", default=0.95)
    grad_explosion_factor: float = _help("Grad-norm explosion: norm above this multiple of its EMA.", default=10.0)
    throughput_fraction: float = _help("Throughput drop: tokens/s below this fraction of the running median...",
                                       default=0.5)
    throughput_windows: int = _help("...for this many steps in a row (also the steps needed before it can fire).",
                                    default=10)
    data_stall_seconds: float = _help("Data stall: waiting longer than this for a batch.", default=30.0)
    expert_collapse_ratio: float = _help("MoE routing collapse: busiest expert's load above this multiple of the mean "
                                         "(1 = balanced), or any expert without a token, in the step's global batch.",
                                         default=3.0)
    straggler_fraction: float = _help("Straggler: a rank whose forward time over a logging window is more than this "
                                      "fraction above the median of the other ranks...", default=0.2)
    straggler_windows: int = _help("...in this many logging windows in a row (per-rank times are gathered only at "
                                   "logging steps).", default=3)
    max_rollbacks: int = _help("Rollbacks allowed in one run before a rollback alert stops it instead.", default=3)
    log_sequence_ids: bool = _help("Write every consumed (source, row) to sequence_ids.jsonl, to audit the stream.",
                                   default=False)
