"""vLLM-native implementation of the core (`SmolForgeForCausalLM`), built from vLLM's own layers.

Same architecture as `core.modeling`, expressed the way vLLM models are: fused QKV and gate/up
projections (weights stacked at load time from the HF names), paged attention, RMSNorm fused with
the residual add. RoPE uses a cos/sin table built from `core.modeling.rope_frequencies`, so YaRN,
linear scaling, partial rotary and removed low frequencies are exactly the HF model's.

Loaded by vLLM through the `vllm.general_plugins` entry point (`core.vllm.register`); never
imported directly by training code.
"""

from collections.abc import Iterable

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.sequence import IntermediateTensors

from ..config import SmolForgeConfig
from ..modeling import rope_frequencies
from . import check_servable


class SmolForgeRope(RotaryEmbedding):
    """vLLM rotary embedding whose cos/sin cache comes from the HF core's frequencies."""

    def __init__(self, config: SmolForgeConfig, max_positions: int, dtype: torch.dtype):
        self._smolforge_config = config  # read by _compute_cos_sin_cache during super().__init__
        super().__init__(head_size=config.head_dim, rotary_dim=config.rotary_dim, max_position_embeddings=max_positions,
                         base=config.rope_parameters["rope_theta"], is_neox_style=True, dtype=dtype)

    def _compute_cos_sin_cache(self) -> torch.Tensor:
        inv_freq, scaling = rope_frequencies(self._smolforge_config)
        freqs = torch.outer(torch.arange(self.max_position_embeddings, dtype=torch.float), inv_freq)
        return torch.cat((freqs.cos() * scaling, freqs.sin() * scaling), dim=-1)  # (P, rotary_dim)


class SmolForgeAttention(nn.Module):
    def __init__(self, config: SmolForgeConfig, layer_idx: int, rope: SmolForgeRope | None, vllm_config: VllmConfig,
                 prefix: str):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads // tp
        self.num_kv_heads = max(1, config.num_key_value_heads // tp)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, bias=False,
                                          quant_config=vllm_config.quant_config, prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False,
                                        quant_config=vllm_config.quant_config, prefix=f"{prefix}.o_proj")
        self.qk_norm = config.qk_norm
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.rotary_emb = rope if config.layer_uses_rope(layer_idx) else None
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim**-0.5, num_kv_heads=self.num_kv_heads,
                              cache_config=vllm_config.cache_config, quant_config=vllm_config.quant_config,
                              prefix=f"{prefix}.attn")

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)  # (N, q + 2kv)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm:
            q = self.q_norm(q.view(-1, self.num_heads, self.head_dim)).view(q.shape)
            k = self.k_norm(k.view(-1, self.num_kv_heads, self.head_dim)).view(k.shape)
        if self.rotary_emb is not None:
            q, k = self.rotary_emb(positions, q, k)
        out, _ = self.o_proj(self.attn(q, k, v))
        return out


class SmolForgeMLP(nn.Module):
    def __init__(self, config: SmolForgeConfig, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2, bias=False,
                                                       quant_config=vllm_config.quant_config,
                                                       prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=False,
                                           quant_config=vllm_config.quant_config, prefix=f"{prefix}.down_proj")
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.gate_up_proj(x)
        x, _ = self.down_proj(self.act_fn(x))
        return x


class SmolForgeDecoderLayer(nn.Module):
    def __init__(self, config: SmolForgeConfig, layer_idx: int, rope: SmolForgeRope | None, vllm_config: VllmConfig,
                 prefix: str):
        super().__init__()
        self.self_attn = SmolForgeAttention(config, layer_idx, rope, vllm_config, f"{prefix}.self_attn")
        self.mlp = SmolForgeMLP(config, vllm_config, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        # vLLM's RMSNorm(x, residual) returns (norm(x + residual), x + residual): the pre-norm
        # residual stream of the HF model, with the add fused into the norm.
        if residual is None:
            residual, hidden_states = hidden_states, self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


# vLLM compiles the decoder stack (inductor on CPU, piecewise CUDA graphs on GPU) unless the engine runs
# eager, as its own LlamaModel does. Without the decorator our model always ran eager: rollouts of the
# 32M bench preset on 2 CPU threads ran at 1.5x transformers `generate`, against the 3x that FACTS.md
# measured for vLLM's compiled Llama (issue 15).
@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": 0, "inputs_embeds": 0})
class SmolForgeModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config: SmolForgeConfig = vllm_config.model_config.hf_config
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        if config.position_embedding == "learned":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        rope = None
        if config.position_embedding == "rope":
            factor = config.rope_parameters.get("factor", 1.0)
            max_positions = max(int(config.max_position_embeddings * factor), vllm_config.model_config.max_model_len)
            rope = SmolForgeRope(config, max_positions, torch.get_default_dtype())
        self.layers = nn.ModuleList([
            SmolForgeDecoderLayer(config, i, rope, vllm_config, f"{prefix}.layers.{i}")
            for i in range(config.num_hidden_layers)
        ])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)  # (N, d)
        if self.config.position_embedding == "learned":
            hidden_states = hidden_states + self.embed_positions(positions)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class SmolForgeForCausalLM(nn.Module):
    # HF checkpoint names -> vLLM's stacked parameters (shard id within the fused weight).
    stacked_params = [(".qkv_proj", ".q_proj", "q"), (".qkv_proj", ".k_proj", "k"), (".qkv_proj", ".v_proj", "v"),
                      (".gate_up_proj", ".gate_proj", 0), (".gate_up_proj", ".up_proj", 1)]
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config: SmolForgeConfig = vllm_config.model_config.hf_config
        check_servable(config)
        self.config = config
        self.model = SmolForgeModel(vllm_config=vllm_config, prefix=f"{prefix}.model" if prefix else "model")
        # Tied: the embedding itself computes the logits. Not `ParallelLMHead.tie_weights`, whose
        # aliased parameter keeps its pre-update values after vLLM's in-place `reload_weights`
        # (measured: greedy tokens diverged from HF after a weight update with tied heads only).
        if config.tie_word_embeddings:
            self.lm_head = self.model.embed_tokens
        else:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=vllm_config.quant_config)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, weight in weights:
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # tied to model.embed_tokens.weight, loaded under that name
            for fused, part, shard in self.stacked_params:
                if part in name:
                    name = name.replace(part, fused)
                    param = params[name]
                    param.weight_loader(param, weight, shard)
                    break
            else:
                if name not in params:
                    raise KeyError(f"checkpoint tensor {name!r} has no counterpart in the vLLM SmolForge model")
                param = params[name]
                getattr(param, "weight_loader", default_weight_loader)(param, weight)
            loaded.add(name)
        return loaded
