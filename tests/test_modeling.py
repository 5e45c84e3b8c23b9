"""The model core: Auto classes, training, packing, z-loss, KV cache, and that every knob acts."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from core import SmolForgeForCausalLM
from conftest import VOCAB, assert_trains_every_parameter, tiny_config, tiny_model


def test_auto_class_round_trip(tmp_path):
    model = tiny_model(qk_norm=True, no_rope_layer_interval=2, z_loss_coefficient=1e-4)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    assert AutoConfig.from_pretrained(tmp_path).model_type == "smolforge"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(loaded) is SmolForgeForCausalLM
    x = torch.randint(0, VOCAB, (2, 24))
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    for (name, p), (_, q) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("overrides", [
    dict(qk_norm=True, no_rope_layer_interval=2, z_loss_coefficient=1e-3, tie_word_embeddings=False),
    dict(position_embedding="learned"),
])
def test_training_steps_change_every_parameter(overrides):
    model = tiny_model(**overrides)
    assert_trains_every_parameter(model, VOCAB)


def _flash_attn_func_on_cpu(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
    """flash_attn_func's contract in plain torch: q (B, T, nh, hd), k/v (B, T, nkv, hd)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p,
                                         is_causal=causal, scale=softmax_scale, enable_gqa=True)
    return out.transpose(1, 2)  # (B, T, nh, hd)


def _flash_attn_varlen_func_on_cpu(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                   softmax_scale=None, causal=False):
    """flash_attn_varlen_func's contract in plain torch: q (total, nh, hd), k/v (total, nkv, hd), and
    attention only within each [cu_seqlens[i], cu_seqlens[i+1]) sequence."""
    assert torch.equal(cu_seqlens_q, cu_seqlens_k)
    assert int(max_seqlen_q) == int(cu_seqlens_q.diff().max())
    out = torch.empty_like(q)
    bounds = cu_seqlens_q.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        out[start:end] = _flash_attn_func_on_cpu(q[None, start:end], k[None, start:end], v[None, start:end],
                                                 dropout_p, softmax_scale, causal)[0]
    return out


@pytest.fixture
def flash_attention_on_cpu(monkeypatch):
    """attn_implementation="flash_attention_2" on a CPU: transformers' own flash path (its
    `flash_attention_forward`, the packed-sequence detection and varlen dispatch of
    `_flash_attention_forward`) with only the CUDA kernels replaced by the plain-torch functions above,
    so what flash would compute for our inputs is tested here."""
    import transformers.modeling_flash_attention_utils as fa

    def kernels(implementation, attention_wrapper=None, allow_all_kernels=False):
        return _flash_attn_func_on_cpu, _flash_attn_varlen_func_on_cpu, None, fa._pad_input, fa._unpad_input

    monkeypatch.setattr(fa, "_lazy_imports", kernels)
    monkeypatch.setattr(fa, "_loaded_implementation", None)  # forget a cached real import
    return "flash_attention_2"


# Documents packed into rows of 32 tokens as (length, first position). Row 1 starts with the tail of
# a document continued from an earlier row (positions 5...): it must not run on from row 0 either.
PACKED_ROWS = [[(9, 0), (17, 0), (6, 0)], [(20, 5), (12, 0)]]


@pytest.mark.parametrize("rows", [PACKED_ROWS[:1], PACKED_ROWS], ids=["B=1", "B=2"])
@pytest.mark.parametrize("attn", ["eager", "sdpa", "flash_attention_2"])
def test_packed_documents_do_not_attend_to_each_other(attn, rows, request):
    if attn == "flash_attention_2":
        request.getfixturevalue("flash_attention_on_cpu")
    model = tiny_model(no_rope_layer_interval=2)
    model.config._attn_implementation = attn
    gen = torch.Generator().manual_seed(0)
    docs = [[(torch.randint(0, VOCAB, (1, n), generator=gen), torch.arange(p0, p0 + n)[None]) for n, p0 in row]
            for row in rows]
    packed = torch.cat([torch.cat([ids for ids, _ in row], dim=1) for row in docs])  # (B, 32)
    position_ids = torch.cat([torch.cat([pos for _, pos in row], dim=1) for row in docs])  # restart per document
    logits = model(packed, position_ids=position_ids, use_cache=False).logits
    for b, row in enumerate(docs):
        start = 0
        for ids, pos in row:
            alone = model(ids, position_ids=pos, use_cache=False).logits
            # Float noise only (different matmul shapes); leakage between documents moves logits by O(1).
            scale = alone.abs().max().item()
            torch.testing.assert_close(logits[b:b + 1, start:start + ids.shape[1]], alone, rtol=0, atol=1e-5 * scale)
            start += ids.shape[1]
    # Packing is detected in eval mode with the default arguments too (no implicit KV cache).
    torch.testing.assert_close(model(packed, position_ids=position_ids).logits, logits)
    # Control: the same rows read as one long document each do leak, far beyond that tolerance.
    leaked = model(packed, use_cache=False).logits[:1, 9:26]
    assert (leaked - model(docs[0][1][0], use_cache=False).logits).abs().max() > 1e-2 * scale


def test_packed_rows_under_flex_attention_equal_eager():
    """flex_attention runs on CPU only without gradients and compiles for ~10 s, so one packed (B=2)
    forward against eager's, which the test above checks against each document alone."""
    model = tiny_model(no_rope_layer_interval=2).requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    packed = torch.randint(0, VOCAB, (2, 32), generator=gen)
    position_ids = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in ([9, 17, 6], [20, 12])])
    model.config._attn_implementation = "eager"
    eager = model(packed, position_ids=position_ids, use_cache=False).logits
    model.config._attn_implementation = "flex_attention"
    flex = model(packed, position_ids=position_ids, use_cache=False).logits
    torch.testing.assert_close(flex, eager, rtol=0, atol=1e-5 * eager.abs().max().item())
    # Control: without the document boundaries the logits move far beyond that tolerance.
    model.config._attn_implementation = "eager"
    assert (model(packed, use_cache=False).logits - eager).abs().max() > 1e-2 * eager.abs().max()


def test_z_loss_added_and_reported():
    x = torch.randint(0, VOCAB, (2, 16))
    plain = tiny_model()(x, labels=x)
    zl = tiny_model(z_loss_coefficient=1e-2)(x, labels=x)
    logits = plain.logits[:, :-1].reshape(-1, VOCAB)
    expected_z = 1e-2 * torch.logsumexp(logits, -1).pow(2).mean()
    torch.testing.assert_close(zl.z_loss, expected_z)
    torch.testing.assert_close(zl.loss, plain.loss + expected_z)
    assert plain.z_loss.item() == 0.0


def test_loss_normalised_by_num_items_in_batch():
    """Gradient accumulation: the trainer passes the token count of all micro-batches."""
    model = tiny_model()
    x = torch.randint(0, VOCAB, (2, 16))
    labels = x.clone()
    labels[1, :10] = -100
    full = model(x, labels=labels).loss
    halves = [model(x[i:i + 1], labels=labels[i:i + 1], num_items_in_batch=(labels[:, 1:] != -100).sum()).loss
              for i in range(2)]
    torch.testing.assert_close(sum(halves), full)


def test_kv_cache_generation_matches_full_forward():
    model = tiny_model(qk_norm=True, no_rope_layer_interval=2)
    prompt = torch.randint(0, VOCAB, (1, 5))
    out = model.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    seq = prompt
    for _ in range(12):  # greedy without any cache
        seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, seq)


def test_gradient_checkpointing_gives_same_gradients():
    x = torch.randint(0, VOCAB, (2, 16))
    grads = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(x, labels=x).loss.backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("knob", [
    dict(qk_norm=True),
    dict(no_rope_layer_interval=2),
    dict(position_embedding="none"),
    dict(position_embedding="learned"),
    dict(rope_low_freq_removed=0.5),
    dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
    dict(rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
    dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                          "original_max_position_embeddings": 128}),
    dict(num_key_value_heads=2),
    dict(tie_word_embeddings=False),
])
def test_every_knob_changes_the_output(knob):
    """Same weights where shapes allow, one knob flipped: the logits must move."""
    x = torch.randint(0, VOCAB, (1, 64))
    base = tiny_model()
    flipped = SmolForgeForCausalLM(tiny_config(**knob)).eval()
    shared = {k: v for k, v in base.state_dict().items() if flipped.state_dict()[k].shape == v.shape}
    missing, _ = flipped.load_state_dict(shared, strict=False)
    # Tied means one tensor for the embedding and the output head; untied means two. Checked for
    # every knob, because the re-randomised head below would move the logits either way.
    for model in (base, flipped):
        tied = model.config.tie_word_embeddings
        assert (model.lm_head.weight is model.model.embed_tokens.weight) is tied
        assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) is tied
    if "tie_word_embeddings" in knob:
        with torch.no_grad():
            flipped.lm_head.weight.normal_(0, 0.3)
        # A new head and the same embedding: the head really has its own storage.
        assert torch.equal(flipped.model.embed_tokens.weight, base.model.embed_tokens.weight)
    assert (flipped(x).logits - base(x).logits).abs().max() > 1e-3


def test_nope_is_position_blind_and_low_freq_removal_keeps_dims_fixed():
    model = tiny_model(position_embedding="none")
    x = torch.randint(0, VOCAB, (1, 1))
    # NoPE: a single token's output cannot depend on where it sits.
    torch.testing.assert_close(model(x, position_ids=torch.tensor([[0]])).logits,
                               model(x, position_ids=torch.tensor([[300]])).logits)
    half = tiny_model(rope_low_freq_removed=0.5).model.rotary_emb.inv_freq
    assert (half[:16] > 0).all() and (half[16:] == 0).all()


def test_rotated_queries_and_keys_follow_the_rope_formula():
    """partial_rotary_factor and rope_low_freq_removed against RoPE written out here from its formula
    (Su et al. 2021, GPT-NeoX halves; Barbero et al. 2024 for the removed frequencies), not from our
    `rope_frequencies`, which the HF and the vLLM model share (issue 11). The model's own q/k are read
    where they enter attention."""
    theta, head_dim = 100.0, 64
    model = tiny_model(rope_low_freq_removed=0.5, rope_parameters={
        "rope_type": "default", "rope_theta": theta, "partial_rotary_factor": 0.5})
    attn = model.model.layers[0].self_attn
    seen = {}
    attn.q_proj.register_forward_hook(lambda module, args, out: seen.update(q_in=out))
    attn.k_proj.register_forward_hook(lambda module, args, out: seen.update(k_in=out))

    def recording_sdpa(module, query, key, value, attention_mask, **kwargs):
        if module.layer_idx == 0:
            seen.update(q_out=query, k_out=key)
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("smolforge_test_recording_sdpa", recording_sdpa)
    model.config._attn_implementation = "smolforge_test_recording_sdpa"
    t = 40
    model(torch.randint(0, VOCAB, (1, t)))

    rotary_dim = head_dim // 2  # partial_rotary_factor 0.5
    half = rotary_dim // 2  # frequency i rotates the pair of dims (i, i + half)
    kept = half - half // 2  # rope_low_freq_removed 0.5: the lowest half of the frequencies become 0
    position = torch.arange(t, dtype=torch.float64)[None, :, None]  # (1, T, 1): broadcast over heads
    for name in ("q", "k"):
        x = seen[f"{name}_in"].double().view(1, t, -1, head_dim)  # (1, T, heads, hd), before RoPE
        expected = x.clone()
        for i in range(half):
            freq = theta ** (-2 * i / rotary_dim) if i < kept else 0.0
            cos, sin = torch.cos(position * freq), torch.sin(position * freq)
            expected[..., i] = x[..., i] * cos - x[..., i + half] * sin
            expected[..., i + half] = x[..., i + half] * cos + x[..., i] * sin
        got = seen[f"{name}_out"].transpose(1, 2).double()  # (1, T, heads, hd)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * x.abs().max().item())
        # Not vacuous: the rotated pairs really moved, and the rest (removed frequencies, dims past the
        # rotary part) is where it was.
        assert (got[..., :kept] - x[..., :kept]).abs().max() > 0.1 * x.abs().max()
        assert torch.equal(got[..., kept:half], x[..., kept:half]) and torch.equal(got[..., rotary_dim:], x[..., rotary_dim:])
