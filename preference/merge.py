"""Merge checkpoints linearly, as SmolLM3 did after APO: a "soup" of several runs, or a merge with
another stage's checkpoint (SmolLM3 merged its APO soup back with the mid-training checkpoint to
recover long context).

    python -m preference.merge --config recipes/tiny/merge.yaml
    python -m preference.merge --model_name_or_path out/tiny/dpo out/tiny/sft --weights 0.5 0.5 \
        --output_dir out/tiny/merged

The merged weights are sum_i w_i * theta_i over every tensor, with the weights normalised to sum to
1 (`normalize`, as mergekit's `linear` method does by default); `normalize: false` uses them as
given (e.g. to extrapolate). Computed in float32, saved in the first checkpoint's dtype.

Checkpoints must share the architecture (config.json: every field except names, versions, dtype and
special-token ids), the vocabulary (the tokenizers' token -> id maps) and every tensor's name and
shape; otherwise the merge is refused naming the first difference. The output is a normal
checkpoint (core.checkpoint.save_checkpoint): the first checkpoint's config, tokenizer and generation
config with the merged weights, and stage.json with stage `merge`, `parent` listing every parent
and the weights used.

Not mergekit: it installs beside our pins (checked with `pip download`), but for a linear merge it
computes this same weighted average, and it needs an architecture definition for our `smolforge`
model type; a plain average has neither limit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from core.checkpoint import save_checkpoint
from core.lifecycle import stage_main
from core.recipe import resolved_recipe

# config.json fields that do not change what the weights compute.
NON_ARCHITECTURE_FIELDS = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache",
                           "pad_token_id", "bos_token_id", "eos_token_id"}


class MergeError(ValueError):
    """The checkpoints cannot be merged: names the checkpoints and the difference."""


@dataclass
class MergeConfig:
    model_name_or_path: list[str] = field(metadata={
        "help": "Checkpoints to merge (two or more local directories); the first one supplies config and tokenizer."})
    weights: list[float] = field(metadata={"help": "One weight per checkpoint, in the same order."})
    output_dir: str = field(metadata={"help": "Where the merged checkpoint is written (never over an existing one)."})
    normalize: bool = field(default=True, metadata={
        "help": "Divide the weights by their sum (a weighted average). False: use them as given."})

    def __post_init__(self):
        if len(self.model_name_or_path) < 2:
            raise MergeError(f"model_name_or_path lists {len(self.model_name_or_path)} checkpoint(s); a merge needs 2+")
        if len(self.weights) != len(self.model_name_or_path):
            raise MergeError(f"weights has {len(self.weights)} values for {len(self.model_name_or_path)} checkpoints; "
                             f"give one weight per checkpoint")
        if self.normalize and (sum(self.weights) <= 0 or any(w < 0 for w in self.weights)):
            raise MergeError(f"weights {self.weights}: a normalised merge needs non-negative weights with a positive "
                             f"sum (set normalize: false for negative ones)")


def architecture(path: str) -> dict:
    if not (Path(path) / "config.json").is_file():
        raise MergeError(f"{path} is not a checkpoint directory (no config.json)")
    config = json.loads((Path(path) / "config.json").read_text())
    return {k: v for k, v in config.items() if k not in NON_ARCHITECTURE_FIELDS}


def tensor_files(path: str) -> list[Path]:
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise MergeError(f"{path} holds no *.safetensors weights")
    return files


def tensor_shapes(path: str) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for file in tensor_files(path):
        with safe_open(file, framework="pt") as stream:
            for name in stream.keys():
                shapes[name] = tuple(stream.get_slice(name).get_shape())
    return shapes


def check_mergeable(paths: list[str]) -> None:
    """Refuse checkpoints that differ in architecture, vocabulary or tensors, naming the difference."""
    from transformers import AutoTokenizer

    first = paths[0]
    base_arch, base_vocab, base_shapes = architecture(first), AutoTokenizer.from_pretrained(first).get_vocab(), \
        tensor_shapes(first)
    for other in paths[1:]:
        arch = architecture(other)
        for key in sorted(set(base_arch) | set(arch)):
            if base_arch.get(key) != arch.get(key):
                raise MergeError(f"different architecture: {key} is {base_arch.get(key)!r} in {first} but "
                                 f"{arch.get(key)!r} in {other}")
        vocab = AutoTokenizer.from_pretrained(other).get_vocab()
        if vocab != base_vocab:
            only_first = sorted(set(base_vocab) - set(vocab))[:3]
            only_other = sorted(set(vocab) - set(base_vocab))[:3]
            moved = sorted(t for t in set(vocab) & set(base_vocab) if vocab[t] != base_vocab[t])[:3]
            raise MergeError(f"different vocabulary: {first} has {len(base_vocab)} tokens, {other} {len(vocab)}; "
                             f"only in the first: {only_first}, only in the other: {only_other}, other ids: {moved}")
        shapes = tensor_shapes(other)
        for name in sorted(set(base_shapes) | set(shapes)):
            if base_shapes.get(name) != shapes.get(name):
                raise MergeError(f"different tensors: {name} has shape {base_shapes.get(name)} in {first} but "
                                 f"{shapes.get(name)} in {other} (None: absent)")


def merged_state_dict(paths: list[str], weights: list[float]) -> dict[str, torch.Tensor]:
    """sum_i weights[i] * tensors of paths[i], in float32, one checkpoint in memory at a time."""
    merged: dict[str, torch.Tensor] = {}
    for path, weight in zip(paths, weights):
        for file in tensor_files(path):
            with safe_open(file, framework="pt") as stream:
                for name in stream.keys():
                    tensor = stream.get_tensor(name).to(torch.float32) * weight
                    merged[name] = merged[name] + tensor if name in merged else tensor
    return merged


def merge(cfg: MergeConfig) -> Path:
    import core  # noqa: F401  (registers the core with the Auto classes)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    paths = list(cfg.model_name_or_path)
    check_mergeable(paths)
    total = sum(cfg.weights) if cfg.normalize else 1.0
    weights = [w / total for w in cfg.weights]
    model = AutoModelForCausalLM.from_pretrained(paths[0], dtype="auto")
    state = merged_state_dict(paths, weights)
    # Tied weights are stored once; load_state_dict copies (and casts) into the first model's tensors.
    result = model.load_state_dict(state, strict=False)
    missing = [name for name in result.missing_keys if name not in model.all_tied_weights_keys]
    if missing or result.unexpected_keys:
        raise MergeError(f"the merged tensors do not fit {paths[0]}'s model: missing {missing[:5]}, unexpected "
                         f"{result.unexpected_keys[:5]}")
    out = save_checkpoint(cfg.output_dir, model, AutoTokenizer.from_pretrained(paths[0]), stage="merge",
                          recipe=resolved_recipe(cfg), parent=paths, data_fingerprint=None,
                          metrics={"weights": dict(zip(paths, weights))})
    print(f"merged {len(paths)} checkpoints with weights {', '.join(f'{w:.3f} x {p}' for p, w in zip(paths, weights))}"
          f" into {out}")
    return out


def main(argv: list[str] | None = None) -> Path:
    return stage_main(MergeConfig, merge, argv)


if __name__ == "__main__":
    main()
