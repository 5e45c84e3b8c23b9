"""SmolForgeForCausalLM: the one decoder every smolforge stage trains (and, with a score head instead
of the LM head, SmolForgeForSequenceClassification: the reward models of issue 16).

A Llama-shaped pre-norm decoder (RMSNorm, SwiGLU, GQA) whose knobs — positions (learned / RoPE
with linear or YaRN scaling, partial rotary, low frequencies removed / NoPE / RNoPE), QK-norm,
tied embeddings, z-loss — come from `SmolForgeConfig`. Parameter names are Llama's, so a
checkpoint exports to Llama / Qwen3 / SmolLM3 by renaming the config only (`core.export`).
Where `config.layer_types` says "linear_attention", a layer mixes tokens with a gated delta-net
(`core/ssm.py`, the hybrid of issue 19) instead of attention; its state rides in the same cache.

Single-device code: sharding, activation checkpointing and compile are applied from outside
(torchtitan's split). Attention goes through transformers' attention interface (eager / sdpa /
flash / flex), and masks through `create_causal_mask`, which turns per-document `position_ids` of
a packed row into a block-diagonal mask, so packed documents never attend to each other. Flash
attention takes no mask: it separates documents by sequence lengths, which transformers derives from
`position_ids` only for a single row, so a packed (B, T) batch runs as one (1, B*T) row with the
document lengths passed explicitly (`packed_sequence_lengths`).

Imports run one way: the blocks (`core/mla.py`, `core/moe.py`, `core/ssm.py`) and this file take what they
share (`attend`, `SmolForgeMLP`, `packed_sequence_lengths`) from `core/layers.py`, and only this file
assembles them.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask, create_recurrent_attention_mask
from transformers.modeling_layers import GenericForSequenceClassification, GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.utils.generic import is_flash_attention_requested, maybe_autocast

from .config import SmolForgeConfig
from .kernels import RMSNorm, apply_rope, causal_lm_loss, resolve_use_liger
from .layers import SmolForgeMLP, attend, packed_sequence_lengths
from .mla import SmolForgeMLAttention
from .moe import SmolForgeExperts, SmolForgeMoE, SmolForgeRouter, router_losses, share_experts_between_layers
from .ssm import SmolForgeGatedDeltaNet


def rope_frequencies(config: SmolForgeConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (rotary_dim // 2,) and the attention scaling of the config's RoPE.

    The HF model and the vLLM model both build their cos/sin from this, so they cannot disagree.
    "default" is computed here because transformers' default ignores partial_rotary_factor;
    linear and YaRN come from transformers' ROPE_INIT_FUNCTIONS (which honour it).
    """
    params = config.rope_parameters
    if params["rope_type"] == "default":
        dim = config.rotary_dim
        inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        scaling = 1.0
    else:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[params["rope_type"]](config)
    removed = round(inv_freq.numel() * config.rope_low_freq_removed)
    if removed:
        # Lowest frequencies are the last entries; a zero frequency is an identity rotation.
        inv_freq = inv_freq.clone()
        inv_freq[-removed:] = 0.0
    return inv_freq.float(), float(scaling)


class SmolForgeRotaryEmbedding(nn.Module):
    def __init__(self, config: SmolForgeConfig):
        super().__init__()
        inv_freq, self.attention_scaling = rope_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Angles in fp32 even under autocast: bf16 positions lose whole radians past ~256 tokens.
        with maybe_autocast(device_type=x.device.type, enabled=False):
            freqs = position_ids[:, :, None].float() * self.inv_freq.to(x.device)[None, None, :]  # (B, T, rd/2)
            emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, rd)
            cos = emb.cos() * self.attention_scaling
            sin = emb.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


class SmolForgeAttention(nn.Module):
    def __init__(self, config: SmolForgeConfig, layer_idx: int, use_liger: bool):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        self.use_rope = config.layer_uses_rope(layer_idx)
        self.use_liger = use_liger
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, use_liger)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, use_liger)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
                attention_mask: torch.Tensor | None, past_key_values: Cache | None = None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape)  # (B, T, nh, hd)
        k = self.k_proj(hidden_states).view(hidden_shape)  # (B, T, nkv, hd)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, nkv, T, hd)
        if self.config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, nh, T, hd), (B, nkv, T, hd)
        if self.use_rope:
            q, k = apply_rope(q, k, *position_embeddings, use_liger=self.use_liger)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)

        out, weights = attend(self, q, k, v, attention_mask, **kwargs)
        out = self.o_proj(out.reshape(*input_shape, -1).contiguous())
        return out, weights


class SmolForgeDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: SmolForgeConfig, layer_idx: int, use_liger: bool):
        super().__init__()
        # Token mixer: attention, or a gated delta-net where config.layer_types says "linear_attention"
        # (hybrid, core/ssm.py; named `linear_attn` as in Qwen3-Next).
        self.is_linear_attention = config.layer_is_linear_attention(layer_idx)
        if self.is_linear_attention:
            self.linear_attn = SmolForgeGatedDeltaNet(config, layer_idx)
        else:
            attention = SmolForgeMLAttention if config.kv_lora_rank else SmolForgeAttention
            self.self_attn = attention(config, layer_idx, use_liger)
        self.mlp = SmolForgeMoE(config, use_liger) if config.layer_is_moe(layer_idx) else SmolForgeMLP(config, use_liger)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, use_liger)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, use_liger)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                past_key_values: Cache | None = None, linear_attention_mask: torch.Tensor | None = None,
                **kwargs) -> torch.Tensor:
        if self.is_linear_attention:
            attn_out = self.linear_attn(self.input_layernorm(hidden_states), past_key_values, linear_attention_mask,
                                        **kwargs)
        else:
            attn_out, _ = self.self_attn(self.input_layernorm(hidden_states), position_embeddings,
                                         attention_mask, past_key_values, **kwargs)
        hidden_states = hidden_states + attn_out
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class SmolForgePreTrainedModel(PreTrainedModel):
    config_class = SmolForgeConfig
    config: SmolForgeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["SmolForgeDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, SmolForgeGatedDeltaNet):
            module.reset_ssm_parameters(std)
        elif isinstance(module, SmolForgeRouter):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if hasattr(module, "e_score_correction_bias"):
                nn.init.zeros_(module.e_score_correction_bias)
        elif isinstance(module, SmolForgeExperts):
            nn.init.normal_(module.gate_up_proj, mean=0.0, std=std)
            nn.init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, SmolForgeRotaryEmbedding):
            # Buffers are not saved (persistent=False); recompute them when weights are
            # materialised from the meta device by from_pretrained.
            module.inv_freq.copy_(rope_frequencies(self.config)[0])


class SmolForgeModel(SmolForgePreTrainedModel):
    def __init__(self, config: SmolForgeConfig):
        super().__init__(config)
        self.use_liger = use_liger = resolve_use_liger(config.use_liger_kernels)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        if config.position_embedding == "learned":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(
            [SmolForgeDecoderLayer(config, i, use_liger) for i in range(config.num_hidden_layers)]
        )
        if config.moe_expert_share_group > 1:
            share_experts_between_layers(self.layers, config)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, use_liger)
        self.rotary_emb = SmolForgeRotaryEmbedding(config) if config.position_embedding == "rope" else None
        self.gradient_checkpointing = False
        self.post_init()

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.FloatTensor | None = None, use_cache: bool | None = None,
                **kwargs) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # (B, T, d)
        # A cache only when asked for (generate asks): an implicit one would also turn off the
        # packed-document mask below, which is only built when there is no cache.
        use_cache = bool(use_cache)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen)[None]

        # Flash attention builds no mask: it keeps packed documents apart only through sequence
        # lengths, and transformers derives those from position_ids only when the batch size is 1
        # (`_is_packed_sequence`), so a packed (B, T) pretraining batch would attend across documents
        # (issue 11). Every op but attention is per token, so the batch runs as one (1, B*T) row with
        # the document lengths given explicitly, and the output is reshaped back. Not with an
        # attention mask (flash unpads by it) or a cache (generation), nor when the caller already
        # passes lengths (padding-free collators).
        batch_size, seq_len = inputs_embeds.shape[:2]
        flatten_batch = (is_flash_attention_requested(self.config) and batch_size > 1 and attention_mask is None
                         and past_key_values is None and "cu_seq_lens_q" not in kwargs)
        if flatten_batch:
            position_ids = position_ids.expand(batch_size, -1)  # (B, T); a (1, T) default is broadcast
            kwargs.update(packed_sequence_lengths(position_ids))
            inputs_embeds = inputs_embeds.reshape(1, batch_size * seq_len, -1)  # (1, B*T, d)
            position_ids = position_ids.reshape(1, batch_size * seq_len)  # (1, B*T)

        # With position_ids that restart at 0 and no attention_mask, this detects packed documents
        # and returns a block-diagonal causal mask (transformers' find_packed_sequence_indices).
        causal_mask = create_causal_mask(
            config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
            past_key_values=past_key_values, position_ids=position_ids,
        )
        hidden_states = inputs_embeds
        if self.config.position_embedding == "learned":
            hidden_states = hidden_states + self.embed_positions(position_ids)
        position_embeddings = self.rotary_emb(hidden_states, position_ids) if self.rotary_emb is not None else None
        if self.config.layer_types is not None:
            # Delta-net layers take the 2D padding mask (None when nothing is padded), as Qwen3-Next's do.
            kwargs["linear_attention_mask"] = create_recurrent_attention_mask(
                config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                past_key_values=past_key_values,
            )

        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask=causal_mask, position_embeddings=position_embeddings,
                                  past_key_values=past_key_values, position_ids=position_ids, **kwargs)
        hidden_states = self.norm(hidden_states)
        if flatten_batch:
            hidden_states = hidden_states.view(batch_size, seq_len, -1)  # (B, T, d)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=past_key_values)


@dataclass
class SmolForgeCausalLMOutput(CausalLMOutputWithPast):
    """`loss` includes the z-loss and, training an MoE, the router losses; `z_loss` and `aux_loss` (the
    weighted load-balancing and router z-losses together) are those terms alone, for logging. `token_loss`
    (B, T), only when asked for with `return_token_loss=True`: each target's cross-entropy, detached
    (pretraining's per-source losses); None under Liger's fused loss, which never materialises it."""

    z_loss: torch.FloatTensor | None = None
    aux_loss: torch.FloatTensor | None = None
    token_loss: torch.FloatTensor | None = None


class SmolForgeForCausalLM(SmolForgePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: SmolForgeConfig):
        super().__init__(config)
        self.model = SmolForgeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.use_liger = self.model.use_liger  # resolved once, so a fallback warns once
        # A recurrent state cannot be rolled back to verify draft tokens: generate refuses assisted decoding.
        self._is_stateful = config.layer_types is not None and "linear_attention" in config.layer_types
        self.post_init()

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.FloatTensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                **kwargs) -> SmolForgeCausalLMOutput:
        # Loss-only kwargs are popped so they do not reach the attention functions.
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        shift_labels = kwargs.pop("shift_labels", None)
        return_token_loss = kwargs.pop("return_token_loss", False)
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                             **kwargs)
        hidden = outputs.last_hidden_state  # (B, T, d)
        wants_loss = labels is not None or shift_labels is not None
        logits = loss = z_loss = aux_loss = token_loss = None
        # Training with Liger on CUDA: fused linear + CE, logits never materialised (memory).
        fused = wants_loss and self.use_liger and hidden.is_cuda and self.training
        if not fused:
            slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden[:, slice_indices, :])  # (B, T', V)
        if wants_loss:
            loss, z_loss, token_loss = causal_lm_loss(hidden, self.lm_head, labels, shift_labels,
                                                      self.config.z_loss_coefficient, num_items_in_batch,
                                                      use_liger=fused, logits=logits, token_losses=return_token_loss)
            if self.training and self.config.num_experts and torch.is_grad_enabled():
                aux_loss = self.router_loss(labels, shift_labels, num_items_in_batch)
                loss = loss + aux_loss
        return SmolForgeCausalLMOutput(loss=loss, logits=logits, z_loss=z_loss, aux_loss=aux_loss, token_loss=token_loss,
                                       past_key_values=outputs.past_key_values)

    def router_loss(self, labels: torch.Tensor | None, shift_labels: torch.Tensor | None,
                    num_items_in_batch: int | torch.Tensor | None) -> torch.Tensor:
        """The MoE router losses of this forward (core/moe.py), weighted like the token loss: with
        `num_items_in_batch` (gradient accumulation) each micro-batch counts by its share of the step's
        target tokens, so the step's micro-batches add up to one router loss."""
        aux, z = router_losses(self.model)
        loss = self.config.router_aux_loss_coef * aux + self.config.router_z_loss_coef * z
        if num_items_in_batch is not None:
            targets = shift_labels if shift_labels is not None else labels[:, 1:]
            loss = loss * (targets != -100).sum() / num_items_in_batch
        return loss


class SmolForgeForSequenceClassification(GenericForSequenceClassification, SmolForgePreTrainedModel):
    """The core with a score head: `score` (hidden -> num_labels, no bias) read at the last token that is
    not `config.pad_token_id` (left or right padding alike), as transformers' Llama / Qwen3
    `*ForSequenceClassification` are built, from the same generic class. With `num_labels=1` it is a
    reward model (TRL's RewardTrainer). Loading a causal-LM checkpoint into it keeps the decoder
    (`model.*`), drops `lm_head` and initialises `score`."""
