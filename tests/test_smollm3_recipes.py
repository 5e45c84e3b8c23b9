"""recipes/smollm3/: the pretraining recipe builds SmolLM3-3B (same architecture and parameter count as the
published model), and its mixture and batch are the published ones. Models are built on the `meta` device:
shapes only, no memory."""

import re
import pytest
import torch
from transformers import SmolLM3Config, SmolLM3ForCausalLM

from conftest import REPO
from core.export import native_config
from core.recipe import parse_recipe
from pretrain.config import PretrainConfig
from pretrain.train import build_model

RECIPES = REPO / "recipes" / "smollm3"
# hf.co/HuggingFaceTB/SmolLM3-3B config.json, the architecture fields (the checkpoint's final RoPE theta and
# 64k context come from the long-context stages, recipes/smollm3/midtrain_64k.yaml).
PUBLISHED = dict(vocab_size=128256, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                 num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=True, rms_norm_eps=1e-6,
                 no_rope_layer_interval=4, rope_parameters={"rope_type": "default", "rope_theta": 5000000.0},
                 max_position_embeddings=65536)
# transformers' SmolLM3ForCausalLM built from PUBLISHED (measured with transformers 5.17); the model card
# rounds it to 3.08B.
PUBLISHED_PARAMETERS = 3_075_098_624
TOKENS_PER_STEP = 2_359_296  # hf.co/HuggingFaceTB/SmolLM3-3B-checkpoints: "GBS ... 2,359,296"


class SmolLM3TokenizerLength:
    """What build_model reads of a tokenizer: its length and special ids. The recipe's tokenizer is on the Hub;
    these are its published values (128,256 tokens; eos <|im_end|> 128012, pad 128004 in config.json)."""
    eos_token_id = 128012
    pad_token_id = 128004

    def __len__(self) -> int:
        return 128256


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied embeddings are one parameter, counted once


def recipe(name: str) -> PretrainConfig:
    (cfg,) = parse_recipe(PretrainConfig, args=["--config", str(RECIPES / name)])
    return cfg


def test_published_smollm3_config_has_the_published_parameter_count():
    with torch.device("meta"):
        model = SmolLM3ForCausalLM(SmolLM3Config(**PUBLISHED))
    assert parameter_count(model) == PUBLISHED_PARAMETERS
    assert round(PUBLISHED_PARAMETERS / 1e9, 2) == 3.08
    assert model.config.no_rope_layers == [0 if (i + 1) % 4 == 0 else 1 for i in range(36)]


def test_pretraining_recipe_builds_smollm3_3b():
    cfg = recipe("pretrain.yaml")
    with torch.device("meta"):
        model = build_model(cfg, SmolLM3TokenizerLength())
    ours = parameter_count(model)
    assert ours == pytest.approx(PUBLISHED_PARAMETERS, rel=0.005)
    assert ours == PUBLISHED_PARAMETERS  # the shapes are the same, so the count is exact

    # Exported (core.export), it is a SmolLM3 config with the published architecture, and the exported model
    # has the published parameter count.
    native = native_config(model.config)
    assert native.model_type == "smollm3"
    published = SmolLM3Config(**PUBLISHED)
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "tie_word_embeddings", "rms_norm_eps", "no_rope_layers",
                  "hidden_act", "attention_bias", "initializer_range"):
        assert getattr(native, field) == getattr(published, field), field
    assert native.head_dim == published.hidden_size // published.num_attention_heads  # SmolLM3Config derives it
    with torch.device("meta"):
        assert parameter_count(SmolLM3ForCausalLM(native)) == PUBLISHED_PARAMETERS
    # Pretraining runs at 4k with RoPE theta 50k (the blog); the long-context stages reach the published values.
    assert (native.max_position_embeddings, native.rope_parameters["rope_theta"]) == (4096, 50000.0)
    final = recipe("midtrain_64k.yaml").model_overrides
    assert final["max_position_embeddings"] == PUBLISHED["max_position_embeddings"]
    assert final["rope_parameters"]["rope_theta"] == PUBLISHED["rope_parameters"]["rope_theta"]


def test_pretraining_mixture_has_the_published_shares_per_stage():
    """hf.co/blog/smollm3: web / code / math 85/12/3, 75/15/10, 63/24/13, with 12% of the web multilingual."""
    cfg = recipe("pretrain.yaml")
    names = {source["name"] for source in cfg.sources}
    published = [(85, 12, 3), (75, 15, 10), (63, 24, 13)]
    assert len(cfg.stages) == len(published)
    for stage, (web, code, math) in zip(cfg.stages, published):
        weights = stage["weights"]
        assert set(weights) <= names
        total = sum(weights.values())
        share = {kind: 100 * sum(w for n, w in weights.items() if n.startswith(kind + "-")) / total
                 for kind in ("web", "code", "math")}
        assert share == pytest.approx({"web": web, "code": code, "math": math}, abs=1e-9)
        multilingual = sum(w for n, w in weights.items() if n.startswith("web-fineweb2-"))
        assert 100 * multilingual / total == pytest.approx(0.12 * web, abs=1e-9)


def test_pretraining_batch_steps_and_schedule_match_the_published_run():
    cfg = recipe("pretrain.yaml")
    # The world size is the slurm job's: nodes x GPUs per node.
    job = (REPO / "recipes/slurm/train_multinode.sbatch").read_text()
    nodes = int(re.search(r"^#SBATCH --nodes=(\d+)$", job, re.M).group(1))
    gpus = int(re.search(r"^GPUS_PER_NODE=\$\{GPUS_PER_NODE:-(\d+)\}$", job, re.M).group(1))
    rows = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * nodes * gpus
    assert rows * cfg.max_length == TOKENS_PER_STEP
    # Stages 2 and 3 start at steps 3,450,000 and 4,200,000 and the run ends at 4,720,000 (the checkpoints'
    # card): 8.1T, 9.9T and 11.1T tokens (the blog's 8T, 10T, 11.1T).
    starts = [stage["start_step"] for stage in cfg.stages]
    assert starts == [0, 3_450_000, 4_200_000] and cfg.max_steps == 4_720_000
    assert [round(s * TOKENS_PER_STEP / 1e12, 1) for s in [*starts[1:], cfg.max_steps]] == [8.1, 9.9, 11.1]
    # WSD: decay over the last 10% of the steps, inside the last stage; peak 2e-4 after 2,000 warmup steps.
    assert cfg.lr_scheduler_type == "warmup_stable_decay" and cfg.warmup_steps == 2000
    assert cfg.lr_scheduler_kwargs["num_decay_steps"] == cfg.max_steps // 10
    assert cfg.max_steps - cfg.lr_scheduler_kwargs["num_decay_steps"] > starts[-1]
    assert (cfg.learning_rate, cfg.weight_decay, cfg.adam_beta2, cfg.max_grad_norm) == (2e-4, 0.1, 0.95, 1.0)


def test_merge_takes_the_apo_model_and_the_mid_training_checkpoint_9_to_1():
    from preference.merge import MergeConfig

    (cfg,) = parse_recipe(MergeConfig, args=["--config", str(RECIPES / "merge.yaml")])
    assert cfg.model_name_or_path == ["out/smollm3/apo", "out/smollm3/midtrain_reasoning"]
    assert cfg.weights == [0.9, 0.1]
