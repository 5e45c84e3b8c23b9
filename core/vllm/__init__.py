"""Serving the core with vLLM.

`register` is the `vllm.general_plugins` entry point (pyproject.toml): vLLM calls it in every
process it starts, engine workers included, so `vllm.LLM(model=<core checkpoint>)` works anywhere
smolforge is installed. It registers the config with transformers' AutoConfig (vLLM reads the
checkpoint's config.json through it) and the vLLM-native model class, lazily by name so that
loading the plugin imports no vLLM model code.

`check_servable` is the guard stages call before they start vLLM, and the vLLM model calls on
construction: a config vLLM cannot serve fails naming the field, not deep inside a kernel.
"""

ARCHITECTURE = "SmolForgeForCausalLM"


def register() -> None:
    import core  # noqa: F401  (registers AutoConfig / AutoModelForCausalLM)
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "core.vllm.model:SmolForgeForCausalLM")


def check_servable(config) -> None:
    """Raise ValueError naming the field if vLLM on this machine cannot serve `config`."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        # The CPU attention backend has a fixed list of head sizes (16 is not among them: shared/FACTS.md).
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        supported = CPUAttentionBackend.get_supported_head_sizes()
        if config.head_dim not in supported:
            raise ValueError(
                f"head_dim={config.head_dim} cannot be served by vLLM's CPU attention, which supports head_dim in "
                f"{supported}; change head_dim (or hidden_size / num_attention_heads), or generate without vLLM"
            )


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
