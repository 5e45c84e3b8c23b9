"""vLLM serves the core (through the plugin entry point) with the HF model's greedy tokens."""

import pytest
import torch

from conftest import VOCAB, tiny_model

vllm = pytest.importorskip("vllm")

PROMPTS = [torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (1, 5, 12, 31)]
NEW_TOKENS = 24


def vllm_greedy(llm) -> list[list[int]]:
    params = vllm.SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def hf_greedy(model) -> list[list[int]]:
    return [model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                           do_sample=False)[0, len(p):].tolist() for p in PROMPTS]


def test_plugin_entry_point_is_installed():
    from importlib.metadata import entry_points

    assert "core.vllm:register" in [e.value for e in entry_points(group="vllm.general_plugins")]


def test_tiny_preset_greedy_equals_hf_before_and_after_weight_update(vllm_llm_factory):
    from core.vllm import update_weights

    model = tiny_model(seed=1)
    llm = vllm_llm_factory("tiny", model)
    before = vllm_greedy(llm)
    assert before == hf_greedy(model)

    with torch.no_grad():  # a training step's worth of change to every weight
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    update_weights(llm, model.state_dict().items())
    after = vllm_greedy(llm)
    assert after == hf_greedy(model)
    assert after != before  # the update really changed what vLLM generates


@pytest.mark.parametrize("name, knobs", [
    ("rope-knobs", dict(qk_norm=True, no_rope_layer_interval=2, rope_low_freq_removed=0.25,
                        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
                                         "original_max_position_embeddings": 256, "partial_rotary_factor": 0.5})),
    ("learned-untied", dict(position_embedding="learned", tie_word_embeddings=False, num_key_value_heads=2)),
])
def test_knobs_greedy_equals_hf(vllm_llm_factory, name, knobs):
    model = tiny_model(seed=2, **knobs)
    assert vllm_greedy(vllm_llm_factory(name, model)) == hf_greedy(model)


def test_head_dim_rejected_by_cpu_attention_fails_naming_the_field(tmp_path):
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("the head_dim restriction is vLLM's CPU attention backend's")
    model = tiny_model(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="head_dim=16"):
        vllm.LLM(model=str(tmp_path), skip_tokenizer_init=True, dtype="float32", enforce_eager=True,
                 kv_cache_memory_bytes=64 << 20, max_model_len=256)
