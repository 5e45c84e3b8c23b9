"""SmolForgeConfig: the one configuration of the model core, and its named size presets.

Every knob here is real: it changes what `core.modeling` computes, and `core.vllm` serves the same
thing. A bad combination fails when the config is built, naming the field at fault (transformers'
`@strict` dataclass configs call every `validate_*` method on construction and on `from_pretrained`).

    >>> from core import SmolForgeConfig
    >>> cfg = SmolForgeConfig.from_preset("tiny", vocab_size=512)
"""

import dataclasses
import difflib
from types import MappingProxyType

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

POSITION_EMBEDDINGS = ("rope", "learned", "none")
# RoPE variants the core computes frequencies for (transformers' ROPE_INIT_FUNCTIONS) and serves in
# vLLM from the same table. "dynamic" is left out on purpose: it changes frequencies with the
# sequence length at run time, which a fixed vLLM cos/sin cache cannot reproduce.
ROPE_TYPES = ("default", "linear", "yarn")
# Token mixers of the hybrid core, named as transformers' Qwen3-Next names them (its cache reads them too).
LAYER_TYPES = ("full_attention", "linear_attention")


@strict
class SmolForgeConfig(PreTrainedConfig):
    r"""
    vocab_size: rows of the embedding matrix; must cover every id of the tokenizer.
    hidden_size: width of the residual stream.
    intermediate_size: width of the SwiGLU MLP (gate and up projections).
    num_hidden_layers: number of decoder blocks.
    num_attention_heads: query heads.
    num_key_value_heads: key/value heads. Equal to the query heads is MHA, 1 is MQA, in between
        is GQA: one code path, `num_attention_heads // num_key_value_heads` queries share a KV head.
    head_dim: per-head width; defaults to hidden_size // num_attention_heads. vLLM's CPU attention
        only serves some sizes (64 works, 16 does not: shared/FACTS.md).
    max_position_embeddings: longest sequence the model is meant for (size of the learned position
        table, and the original context for YaRN).
    rms_norm_eps: epsilon of every RMSNorm.
    position_embedding: "rope" (rotary), "learned" (absolute table added to the token embeddings,
        GPT-2 style) or "none" (NoPE everywhere, Kazemnejad et al. 2023).
    rope_parameters: transformers' RoPE dict: rope_theta, rope_type ("default" | "linear" |
        "yarn"), factor, original_max_position_embeddings, beta_fast/beta_slow, and
        partial_rotary_factor (rotate only the leading fraction of each head's dims, GPT-NeoX style).
    rope_low_freq_removed: fraction of the lowest RoPE frequencies set to zero, so those dims carry
        no position at all ("p-RoPE", Barbero et al. 2024, "Round and Round We Go").
    no_rope_layer_interval: RNoPE. When k > 0, every k-th layer (layer_idx + 1 divisible by k)
        drops RoPE, as SmolLM3 does with k=4 (Yang et al. 2025, "Rope to Nope and back again").
    qk_norm: RMSNorm over each query and key head before RoPE (Qwen3, OLMo 2): keeps attention
        logits bounded at high learning rates.
    tie_word_embeddings: share the input embedding with the output head (SmolLM's choice: saves
        vocab x hidden parameters, most of a small model's budget).
    initializer_range: std of the normal init of every linear and embedding.
    z_loss_coefficient: weight of the z-loss (mean of logsumexp(logits)^2, PaLM, Chowdhery et al.
        2022) added to the training loss; the model reports it separately as `z_loss`.
    use_liger_kernels: None picks Liger kernels on CUDA when liger-kernel is installed and plain
        torch elsewhere; True or False overrides that choice. An execution choice, not part of the
        architecture: True where Liger cannot run warns and falls back to plain torch, so a checkpoint
        saved with it loads anywhere.
    attention_dropout: dropout on attention probabilities (0 in every modern recipe).

    kv_lora_rank, q_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim: multi-head latent attention
        (MLA, DeepSeek-V2/V3; `core.mla`). kv_lora_rank > 0 replaces GQA in every layer: keys and values are
        expanded per head from one RMS-normalised latent of kv_lora_rank dims per token, and only that latent
        plus one shared rotated key of qk_rope_head_dim dims is cached (kv_lora_rank + qk_rope_head_dim numbers
        per token per layer). Each query/key head is qk_nope_head_dim position-free dims followed by
        qk_rope_head_dim RoPE dims; values are v_head_dim wide. q_lora_rank > 0 routes the queries through a
        normalised bottleneck of that width (None or 0: a direct projection). With MLA, head_dim is the RoPE
        width (it sizes the frequency table, as in transformers' DeepseekV3Config) and defaults to
        qk_rope_head_dim; num_key_value_heads must equal num_attention_heads (every head has its own key and
        value). 0 (the default) is plain GQA, and the four other fields must then be left unset.
    Hybrid (issue 19): layer_types: None (every layer attention) or one entry per layer,
        "full_attention" or "linear_attention", as transformers' Qwen3-Next spells it; a
        "linear_attention" layer is a gated delta-net (`core.ssm`, Yang et al. 2024) whose fixed-size
        state replaces the KV cache. Qwen3-Next interleaves three linear layers per attention layer.
        linear_num_key_heads / linear_num_value_heads: key and value heads of the delta-net (value
        heads share key heads as query heads share KV heads in GQA). linear_key_head_dim /
        linear_value_head_dim: per-head widths; the state per value head is key_dim x value_dim.
        linear_conv_kernel_dim: width of the depthwise causal conv over q, k and v (4, as Mamba-2).
    Mixture of experts (issue 19, core/moe.py). num_experts: routed experts per MoE layer; 0 keeps the
    dense SwiGLU MLP everywhere. num_experts_per_tok: experts each token is sent to (top-k token choice).
    moe_intermediate_size: width of one expert; against num_experts it sets the granularity (many
    small experts, as in DeepSeekMoE / Qwen3-MoE; k x moe_intermediate_size = intermediate_size keeps
    the active MLP parameters of the dense model). first_k_dense_layers: the first k layers keep the
    dense MLP (DeepSeek-V3's first_k_dense_replace: early layers route poorly). moe_router_scores:
    "softmax" (Mixtral, Qwen-MoE) or "sigmoid" (DeepSeek-V3) expert scores. norm_topk_prob: rescale the
    k chosen scores to sum to 1. shared_expert_intermediate_size: width of an always-on shared expert
    with a sigmoid gate (Qwen2-MoE; several DeepSeek shared experts are one wider one); 0 = none.
    moe_expert_share_group: consecutive MoE layers in groups of this size use one set of expert weights,
    each layer keeping its own router (1 = no sharing). router_aux_loss_coef: weight of the
    load-balancing loss (Switch / Qwen-MoE form), whose expert fractions f_i are counted over the
    global batch, not per micro-batch (Qiu et al. 2025). router_z_loss_coef: weight of the router
    z-loss (ST-MoE, Zoph et al. 2022). moe_bias_update_rate: aux-loss-free balancing (DeepSeek-V3): a
    per-expert bias added to the scores for the choice of experts only, moved by this much against
    the sign of each expert's load error after every optimizer step; 0 = off.
    """

    model_type = "smolforge"
    keys_to_ignore_at_inference = ["past_key_values"]
    # No remote code: the Auto classes know the core by registration (core/__init__.py). TRL reads
    # `config.auto_map` of any architecture transformers does not ship (trl/trainer/utils.py,
    # create_model_from_path: GRPO's reference model when beta > 0, distillation's teacher), and a config
    # without remote code has no such attribute. Empty, as transformers tests `name in config.auto_map`; a
    # read-only class attribute, so config.json never carries it and no instance can fill it for all.
    auto_map = MappingProxyType({})
    # Parameter names follow Llama's, so transformers' tensor-parallel and pipeline plans, PEFT's
    # default LoRA targets and vLLM's weight mapping apply unchanged.
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        # MLA (core/mla.py): whole heads of queries and of the keys/values expanded from the latent per rank;
        # the latent projections (q_a_proj, kv_a_proj_with_mqa) stay replicated, as in DeepSeek's serving.
        "layers.*.self_attn.q_b_proj": "colwise",
        "layers.*.self_attn.kv_b_proj": "colwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    # Sequence parallelism (Korthikanti et al. 2022, sec. 4.2.2), the option on top of the plan above: the
    # norms (and so the residual stream between the sublayers) run split along the sequence across the TP
    # ranks instead of replicated, which divides their activations by the TP size; the colwise inputs
    # then all-gather the sequence and the rowwise outputs reduce-scatter it (torch's SequenceParallel
    # style). Applied from outside the model (pretrain/parallel.py), like the plan above.
    base_model_sequence_parallel_plan = {
        "layers.*.input_layernorm": "sequence_parallel",
        "layers.*.post_attention_layernorm": "sequence_parallel",
        "norm": "sequence_parallel",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    position_embedding: str = "rope"
    rope_parameters: RopeParameters | dict | None = None
    rope_low_freq_removed: float = 0.0
    no_rope_layer_interval: int = 0
    qk_norm: bool = False
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    z_loss_coefficient: float = 0.0
    use_liger_kernels: bool | None = None
    attention_dropout: float = 0.0
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # --- MLA (issue 19) ---
    kv_lora_rank: int = 0
    q_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None
    # --- hybrid (issue 19) ---
    layer_types: list[str] | None = None
    linear_num_key_heads: int = 2
    linear_num_value_heads: int = 2
    linear_key_head_dim: int = 32
    linear_value_head_dim: int = 32
    linear_conv_kernel_dim: int = 4
    # --- MoE (issue 19) ---
    num_experts: int = 0
    num_experts_per_tok: int = 2
    moe_intermediate_size: int | None = None
    first_k_dense_layers: int = 0
    moe_router_scores: str = "softmax"
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int = 0
    moe_expert_share_group: int = 1
    router_aux_loss_coef: float = 0.0
    router_z_loss_coef: float = 0.0
    moe_bias_update_rate: float = 0.0

    def __post_init__(self, **kwargs):
        if self.head_dim is None and self.kv_lora_rank and self.qk_rope_head_dim:
            self.head_dim = self.qk_rope_head_dim  # MLA: the RoPE tables are built for the rope dims
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads > 0:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                    f"{self.num_attention_heads}; set head_dim explicitly or change one of them"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)

    # --- validation (run by @strict at construction and on from_pretrained) -------------------

    def validate_architecture(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads={self.num_key_value_heads} must divide num_attention_heads="
                f"{self.num_attention_heads} (each KV head serves a whole group of query heads)"
            )
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(f"position_embedding must be one of {POSITION_EMBEDDINGS}, got {self.position_embedding!r}")
        if not 0.0 <= self.rope_low_freq_removed < 1.0:
            raise ValueError(f"rope_low_freq_removed must be in [0, 1), got {self.rope_low_freq_removed}")
        if self.no_rope_layer_interval < 0:
            raise ValueError(f"no_rope_layer_interval must be >= 0 (0 = RoPE in every layer), got {self.no_rope_layer_interval}")
        if self.z_loss_coefficient < 0:
            raise ValueError(f"z_loss_coefficient must be >= 0, got {self.z_loss_coefficient}")
        if self.position_embedding != "rope":
            for name, off in (("rope_low_freq_removed", 0.0), ("no_rope_layer_interval", 0)):
                if getattr(self, name) != off:
                    raise ValueError(f"{name} only applies with position_embedding='rope' (got {self.position_embedding!r})")
            return
        rope_type = self.rope_parameters.get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_parameters.rope_type must be one of {ROPE_TYPES}, got {rope_type!r}")
        rotary_dim = self.rotary_dim
        if rotary_dim < 2 or rotary_dim % 2:
            raise ValueError(
                f"rope_parameters.partial_rotary_factor={self.rope_parameters.get('partial_rotary_factor')} "
                f"gives {rotary_dim} rotary dims of head_dim={self.head_dim}; it must be a positive even number"
            )

    def validate_mla(self):
        mla_dims = ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
        if self.kv_lora_rank < 0:
            raise ValueError(f"kv_lora_rank must be >= 0 (0 = plain GQA attention), got {self.kv_lora_rank}")
        if not self.kv_lora_rank:
            for name in (*mla_dims, "q_lora_rank"):
                if getattr(self, name):
                    raise ValueError(f"{name}={getattr(self, name)} only applies to multi-latent attention; "
                                     "set kv_lora_rank > 0 to use MLA, or leave it unset")
            return
        for name in mla_dims:
            if getattr(self, name) is None or getattr(self, name) <= 0:
                raise ValueError(f"kv_lora_rank={self.kv_lora_rank} (MLA) needs {name} > 0, got {getattr(self, name)}")
        if self.q_lora_rank is not None and self.q_lora_rank < 0:
            raise ValueError(f"q_lora_rank must be >= 0 (None or 0 = no query compression), got {self.q_lora_rank}")
        if self.head_dim != self.qk_rope_head_dim:
            raise ValueError(
                f"with MLA, head_dim is the RoPE width and must equal qk_rope_head_dim={self.qk_rope_head_dim}, got "
                f"head_dim={self.head_dim}; leave head_dim unset (the head widths are qk_nope_head_dim + "
                "qk_rope_head_dim for queries and keys, v_head_dim for values)"
            )
        if self.num_key_value_heads != self.num_attention_heads:
            raise ValueError(
                f"with MLA, every query head has its own key and value expanded from the latent, so "
                f"num_key_value_heads must equal num_attention_heads={self.num_attention_heads}, got "
                f"{self.num_key_value_heads}; the cache size is set by kv_lora_rank instead"
            )
        if self.qk_norm:
            # Qwen3's per-head key norm would act on keys expanded from the latent, and RoPE comes after it:
            # the cache would have to hold un-rotated expanded keys, which is what MLA exists to avoid. The
            # latent is normalised already (kv_a_layernorm), as DeepSeek-V2 does instead.
            raise ValueError("qk_norm does not combine with MLA (kv_lora_rank > 0): MLA normalises the KV latent "
                             "instead (kv_a_layernorm); set qk_norm to false")
    def validate_hybrid(self):
        if self.layer_types is None:
            return
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers={self.num_hidden_layers}; "
                "give one type per layer"
            )
        unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if unknown:
            raise ValueError(f"layer_types may only hold {LAYER_TYPES}, got {unknown}")
        if "full_attention" not in self.layer_types:
            # transformers' cache counts generated tokens on an attention layer (Cache.get_seq_length).
            raise ValueError("layer_types needs at least one 'full_attention' layer: the cache reads the sequence length from it")
        for name in ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                     "linear_value_head_dim", "linear_conv_kernel_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ValueError(
                f"linear_num_key_heads={self.linear_num_key_heads} must divide linear_num_value_heads="
                f"{self.linear_num_value_heads} (each key head serves a whole group of value heads)"
            )
    def validate_moe(self):
        if self.num_experts < 0:
            raise ValueError(f"num_experts must be >= 0 (0 = dense MLP everywhere), got {self.num_experts}")
        if self.num_experts == 0:
            for name, off in (("first_k_dense_layers", 0), ("shared_expert_intermediate_size", 0),
                              ("moe_expert_share_group", 1), ("router_aux_loss_coef", 0.0),
                              ("router_z_loss_coef", 0.0), ("moe_bias_update_rate", 0.0)):
                if getattr(self, name) != off:
                    raise ValueError(f"{name}={getattr(self, name)} only applies with num_experts > 0")
            return
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, num_experts="
                             f"{self.num_experts}]")
        if self.moe_intermediate_size is None or self.moe_intermediate_size <= 0:
            raise ValueError(f"moe_intermediate_size={self.moe_intermediate_size}: set the width of one expert "
                             f"(e.g. intermediate_size // num_experts_per_tok for the dense model's active size)")
        if not 0 <= self.first_k_dense_layers < self.num_hidden_layers:
            raise ValueError(f"first_k_dense_layers={self.first_k_dense_layers} must be in [0, num_hidden_layers="
                             f"{self.num_hidden_layers}) so that at least one layer is MoE")
        if self.moe_router_scores not in ("softmax", "sigmoid"):
            raise ValueError(f"moe_router_scores must be 'softmax' or 'sigmoid', got {self.moe_router_scores!r}")
        if self.moe_expert_share_group < 1:
            raise ValueError(f"moe_expert_share_group must be >= 1 (1 = every layer its own experts), "
                             f"got {self.moe_expert_share_group}")
        for name in ("shared_expert_intermediate_size", "router_aux_loss_coef", "router_z_loss_coef",
                     "moe_bias_update_rate"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def layer_is_moe(self, layer_idx: int) -> bool:
        """MoE MLP in this layer (else the dense SwiGLU MLP): every layer after the first k dense ones."""
        return self.num_experts > 0 and layer_idx >= self.first_k_dense_layers

    # --- derived quantities used by the HF model and the vLLM model alike ----------------------

    def layer_is_linear_attention(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` is a gated delta-net (`core.ssm`) instead of attention."""
        return self.layer_types is not None and self.layer_types[layer_idx] == "linear_attention"

    @property
    def rotary_dim(self) -> int:
        """Leading dims of each head that RoPE rotates (all of them unless partial_rotary_factor < 1)."""
        return int(self.head_dim * self.rope_parameters.get("partial_rotary_factor", 1.0))

    def layer_uses_rope(self, layer_idx: int) -> bool:
        if self.position_embedding != "rope":
            return False
        k = self.no_rope_layer_interval
        return not (k and (layer_idx + 1) % k == 0)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "SmolForgeConfig":
        """A named size with some knobs changed. Unlike the constructor (which, like every
        transformers config, keeps unknown keys as attributes so old config.json files still load),
        an override that is not a field is an error: a recipe's typo must not be silently ignored."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        for key in overrides:
            if key not in fields:
                close = difflib.get_close_matches(key, fields, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"unknown model config key {key!r}{hint}")
        return cls(**{**PRESETS[name], **overrides})


# Named sizes. `tiny` trains on a laptop CPU in seconds; head_dim 64 because vLLM's CPU attention
# rejects 16 (shared/FACTS.md). The others take SmolLM2's widths (135M, 360M: Allal et al. 2025) and
# Llama 3.2 1B's, with SmolLM3's architecture choices: GQA, tied embeddings, RNoPE every 4th layer,
# no weight decay tricks needed in the model; 3B is SmolLM3-3B's shape (hf.co/HuggingFaceTB/SmolLM3-3B).
_SMOLLM3_CHOICES = dict(tie_word_embeddings=True, no_rope_layer_interval=4, rms_norm_eps=1e-6)
PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=512,
                 tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "135M": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=4096,
                 rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, **_SMOLLM3_CHOICES),
    "360M": dict(vocab_size=49152, hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                 num_attention_heads=15, num_key_value_heads=5, max_position_embeddings=4096,
                 rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, **_SMOLLM3_CHOICES),
    "1B": dict(vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
               rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, **_SMOLLM3_CHOICES),
    "3B": dict(vocab_size=128256, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
               num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=65536,
               rope_parameters={"rope_type": "default", "rope_theta": 5000000.0}, **_SMOLLM3_CHOICES),
}

# `tiny` with MLA in place of its GQA (2 query heads, 1 KV head of 64), sized for a one-knob ablation: the
# query/key heads stay 64 wide (32 position-free + 32 RoPE dims), values stay 64, and kv_lora_rank 40 makes
# the attention 49,704 parameters per layer against GQA's 49,152 (+0.24% of the whole 0.92M model), while the
# cache holds 40 + 32 = 72 numbers per token per layer against GQA's 2 x 64 = 128.
PRESETS["tiny-mla"] = {**{k: v for k, v in PRESETS["tiny"].items() if k not in ("head_dim", "num_key_value_heads")},
                       "num_key_value_heads": 2, "kv_lora_rank": 40, "qk_nope_head_dim": 32, "qk_rope_head_dim": 32,
                       "v_head_dim": 64}
# Hybrid (issue 19): `tiny` with three of its four layers gated delta-nets, Qwen3-Next's 3:1 ratio. The
# delta-net widths are chosen so a linear layer has about the parameters of the attention layer it
# replaces (48.5k vs 49.2k), so the hybrid-vs-dense ablation compares token mixers, not sizes.
PRESETS["tiny-hybrid"] = dict(
    PRESETS["tiny"],
    layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
    linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=32, linear_value_head_dim=40,
    linear_conv_kernel_dim=4,
)
# `tiny` with MoE MLPs at equal active parameters: 8 experts of 192, 2 per token = the dense 384 (the
# router's 8 x 128 per layer aside), first layer dense. Balanced without an auxiliary loss, by the
# DeepSeek-V3 bias, plus the ST-MoE router z-loss at its paper value 1e-3. The bias rate is 10x the paper's
# 1e-3 (tuned for a 14.8T-token run): on the tiny recipe the routing collapses within 20 steps (every token
# on 2 experts, 5 dead), and at 1e-3 max/mean load was still 2.4 after 150 steps, at 1e-2 about 1.3
# (bench/moe_balance.py; measured 2026-11-26).
PRESETS["tiny-moe"] = dict(PRESETS["tiny"], num_experts=8, num_experts_per_tok=2, moe_intermediate_size=192,
                           first_k_dense_layers=1, moe_bias_update_rate=1e-2, router_z_loss_coef=1e-3)
