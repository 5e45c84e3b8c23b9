"""The hybrid core (issue 19): gated delta-net layers (core/ssm.py) interleaved with attention by
`layer_types`. Parity with transformers' Qwen3-Next mixer, the state cache in generation, packed
documents, training, the preset, and export refusing the knob."""

from huggingface_hub.errors import StrictDataclassClassValidationError
import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, Qwen3NextConfig
from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

from core import PRESETS, SmolForgeConfig, SmolForgeForCausalLM
from core.export import ExportError, native_target
from core.ssm import SmolForgeGatedDeltaNet, causal_conv1d_installed, fla_installed
from conftest import VOCAB, assert_trains_every_parameter, perturb_

# One key head shared by two value heads (the grouping Qwen3-Next uses), unequal key/value widths.
MIXER = dict(linear_num_key_heads=1, linear_num_value_heads=2, linear_key_head_dim=16, linear_value_head_dim=24,
             linear_conv_kernel_dim=4)


def hybrid_model(seed: int = 0, **overrides) -> SmolForgeForCausalLM:
    torch.manual_seed(seed)
    model = perturb_(SmolForgeForCausalLM(SmolForgeConfig.from_preset("tiny-hybrid", vocab_size=VOCAB, **overrides)),
                     seed=seed)
    return slow_decay_(model).eval()


def slow_decay_(module: torch.nn.Module) -> torch.nn.Module:
    """A = exp(A_log) small: the state then remembers across many tokens and across 64-token chunks, so
    a wrong carry between chunks or decode steps shows (perturb_'s A ~ e forgets within a few tokens)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.empty(p.shape).uniform_(0.01, 0.3, generator=gen).log())
    return module


def paired_mixers():
    """Our mixer and transformers' Qwen3-Next mixer (its torch path) with the same random weights."""
    assert not fla_installed() and not causal_conv1d_installed(), "the torch path is what is compared"
    ours_cfg = SmolForgeConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=1, head_dim=64, rms_norm_eps=1e-6,
                               layer_types=["linear_attention", "full_attention"], **MIXER)
    ref_cfg = Qwen3NextConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, rms_norm_eps=1e-6,
                              layer_types=["linear_attention", "full_attention"], **MIXER)
    torch.manual_seed(0)
    ref = slow_decay_(perturb_(Qwen3NextGatedDeltaNet(ref_cfg, layer_idx=0))).eval()
    ours = SmolForgeGatedDeltaNet(ours_cfg, layer_idx=0).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)  # same names and shapes, nothing re-laid out
    return ours, ref, ours_cfg, ref_cfg


@torch.no_grad()
def test_gated_delta_net_matches_qwen3_next_mixer():
    ours, ref, ours_cfg, ref_cfg = paired_mixers()
    x = torch.randn(2, 150, 64)  # 150 tokens: two full 64-token chunks and a padded remainder
    diff = (ours(x) - ref(x)).abs().max().item()
    assert diff < 1e-5, f"prefill: max abs diff {diff}"
    assert ref(x).abs().max() > 0.1  # a real signal, not two zeros agreeing

    # With the state cache: prefill, three one-token decode steps, then a multi-token continuation.
    ours_cache, ref_cache = DynamicCache(config=ours_cfg), DynamicCache(config=ref_cfg)
    for lo, hi in ((0, 100), (100, 101), (101, 102), (102, 103), (103, 150)):
        a, b = ours(x[:, lo:hi], ours_cache), ref(x[:, lo:hi], cache_params=ref_cache)
        diff = (a - b).abs().max().item()
        assert diff < 1e-5, f"tokens {lo}:{hi} with the cache: max abs diff {diff}"
        # and continuing from the cache equals the uncached pass over the whole prefix (float noise only:
        # other chunk boundaries; outputs here reach ~10, so relative to their scale)
        full = ours(x[:, :hi])[:, lo:]
        assert (a - full).abs().max().item() < 1e-5 * full.abs().max().item()
    ours_state, ref_state = ours_cache.layers[0], ref_cache.layers[0]
    torch.testing.assert_close(ours_state.recurrent_states[0], ref_state.recurrent_states[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours_state.conv_states[0], ref_state.conv_states[0], rtol=0, atol=0)

    # Left padding: the 2D mask zeroes padded inputs, as transformers' mixer does.
    mask = torch.ones(2, 150, dtype=torch.long)
    mask[0, :7] = 0
    diff = (ours(x, attention_mask=mask) - ref(x, attention_mask=mask)).abs().max().item()
    assert diff < 1e-5, f"left-padded: max abs diff {diff}"


def test_generate_with_state_cache_equals_greedy_without_cache():
    model = hybrid_model()
    for prompt_len in (5, 70):  # 70: the prefill crosses a chunk boundary before decoding starts
        prompt = torch.randint(0, VOCAB, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
        out = model.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        seq = prompt
        for _ in range(12):  # greedy by full forward passes, no cache
            seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
        assert torch.equal(out, seq), f"prompt length {prompt_len}"
    # The cache holds a fixed-size state for the delta-net layers and keys/values for the attention layer.
    cache = model(prompt, use_cache=True).past_key_values
    linear = [i for i, t in enumerate(model.config.layer_types) if t == "linear_attention"]
    assert all(cache.layers[i].recurrent_states[0].shape == (1, 2, 32, 40) for i in linear)
    assert cache.get_seq_length() == 70


@torch.no_grad()
def test_left_padded_batch_equals_each_row_alone():
    model = hybrid_model()
    gen = torch.Generator().manual_seed(0)
    short, long = torch.randint(0, VOCAB, (1, 9), generator=gen), torch.randint(0, VOCAB, (1, 20), generator=gen)
    batch = torch.cat([torch.cat([torch.zeros(1, 11, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :11] = 0
    out = model.generate(batch, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    for row, ids in ((0, short), (1, long)):
        alone = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        assert torch.equal(out[row, -8:], alone[0, -8:]), f"row {row}"


@torch.no_grad()
def test_packed_documents_do_not_share_state():
    model = hybrid_model()
    gen = torch.Generator().manual_seed(0)
    # Rows of 96 tokens: documents that start mid-chunk and run across the 64-token chunk boundary.
    lengths = [[40, 50, 6], [20, 76]]
    docs = [[torch.randint(0, VOCAB, (1, n), generator=gen) for n in row] for row in lengths]
    packed = torch.cat([torch.cat(row, 1) for row in docs])  # (2, 96)
    position_ids = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    logits = model(packed, position_ids=position_ids, use_cache=False).logits
    scale = logits.abs().max().item()
    for b, row in enumerate(docs):
        start = 0
        for ids in row:
            alone = model(ids, use_cache=False).logits
            torch.testing.assert_close(logits[b:b + 1, start:start + ids.shape[1]], alone, rtol=0, atol=1e-5 * scale)
            start += ids.shape[1]
    # Control: read as one document per row, state flows across the boundaries, far beyond that tolerance.
    assert (model(packed, use_cache=False).logits[:1, 40:90] - model(docs[0][1]).logits).abs().max() > 1e-2 * scale


def test_training_steps_change_every_parameter(tmp_path):
    model = hybrid_model()
    assert_trains_every_parameter(model, VOCAB)
    # and the checkpoint loads back by path through the Auto classes, layer_types included
    model.eval().save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert loaded.config.layer_types == model.config.layer_types
    x = torch.randint(0, VOCAB, (4, 32))
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)


def test_pretraining_keeps_decay_rates_and_gated_norm_out_of_weight_decay():
    from pretrain.train import parameter_groups

    model = hybrid_model()
    names = {id(p): n for n, p in model.named_parameters()}
    decayed, exempt = ({names[id(p)] for p in group["params"]} for group in parameter_groups(model, 0.1, ["norms"]))
    mixer = "model.layers.0.linear_attn."
    assert {mixer + "A_log", mixer + "dt_bias", mixer + "norm.weight"} <= exempt
    assert {mixer + "in_proj_qkvz.weight", mixer + "conv1d.weight", mixer + "out_proj.weight"} <= decayed


def test_preset_matches_tiny_in_size_and_dense_is_unchanged():
    tiny, hybrid = (SmolForgeForCausalLM(SmolForgeConfig.from_preset(name)) for name in ("tiny", "tiny-hybrid"))
    sizes = [sum(p.numel() for p in m.parameters()) for m in (tiny, hybrid)]
    assert abs(sizes[1] - sizes[0]) / sizes[0] < 0.01, sizes  # the ablation compares mixers, not sizes
    assert PRESETS["tiny-hybrid"]["layer_types"].count("linear_attention") == 3
    # layer_types spelling out "all attention" is the dense core: same parameters, same logits.
    torch.manual_seed(0)
    dense = perturb_(SmolForgeForCausalLM(SmolForgeConfig.from_preset("tiny", vocab_size=VOCAB))).eval()
    spelled = SmolForgeForCausalLM(SmolForgeConfig.from_preset("tiny", vocab_size=VOCAB,
                                                               layer_types=["full_attention"] * 4)).eval()
    spelled.load_state_dict(dense.state_dict(), strict=True)
    x = torch.randint(0, VOCAB, (2, 16))
    torch.testing.assert_close(spelled(x).logits, dense(x).logits, rtol=0, atol=0)
    assert native_target(spelled.config) == "llama"


@pytest.mark.parametrize("overrides, message", [
    (dict(layer_types=["linear_attention"] * 3), "layer_types has 3 entries but num_hidden_layers=4"),
    (dict(layer_types=["linear_attention"] * 4), "at least one 'full_attention'"),
    (dict(layer_types=["mamba"] * 3 + ["full_attention"]), "layer_types may only hold"),
    (dict(layer_types=["linear_attention", "full_attention"] * 2, linear_num_key_heads=3), "linear_num_key_heads=3"),
])
def test_bad_hybrid_configs_name_the_field(overrides, message):
    with pytest.raises(StrictDataclassClassValidationError, match=message):
        SmolForgeConfig.from_preset("tiny", **overrides)


def test_export_refuses_naming_layer_types():
    with pytest.raises(ExportError, match="layer_types"):
        native_target(SmolForgeConfig.from_preset("tiny-hybrid"))
