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

    def __post_init__(self, **kwargs):
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

    # --- derived quantities used by the HF model and the vLLM model alike ----------------------

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
