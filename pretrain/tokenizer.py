"""Train a byte-level BPE tokenizer on a sample of the data mixture, and measure tokenizers.

    python -m pretrain.tokenizer --config recipes/tiny/tokenizer.yaml [--vocab_size 1024 ...]

Writes a Hugging Face tokenizer directory (tokenizer.json + config) and `tokenizer_report.json`
with fertility (tokens per whitespace word) and bytes per token for every source, for the trained
tokenizer and for each tokenizer in `compare_with`, so "custom vs existing" is a measured choice
(the Playbook's tokenizer chapter compares exactly these two numbers).

Digits are split one by one (as Llama 3 and SmolLM do): numbers then tokenise uniformly, which is
what lets a small model learn arithmetic digit by digit.
"""

import json
from dataclasses import dataclass, field
from itertools import islice, zip_longest
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from core.checkpoint import MANIFEST_NAME, manifest_json
from core.recipe import parse_recipe, resolved_recipe
from core.sources import SourceSpec, iter_documents

EOS = "<|endoftext|>"
PAD = "<|pad|>"
# The chat stages' tokens, reserved now so SFT never has to resize the embeddings of a base model.
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]
# Reasoning tags are ordinary added tokens (special=False), as in the SmolLM3 and Qwen3 tokenizers: TRL decodes
# completions with skip_special_tokens=True, which deletes special tokens before a reward function sees the text,
# so a correct think block would score 0 (issue 15). They are still single tokens with reserved ids.
REASONING_TOKENS = ["<think>", "</think>"]


@dataclass
class TokenizerConfig:
    sources: list[dict] = field(default_factory=list, metadata={"help": "Data sources to sample (core/sources.py)."})
    output_dir: str = field(default="out/tokenizer", metadata={"help": "New directory for the trained tokenizer."})
    vocab_size: int = field(default=1024, metadata={"help": "Vocabulary size including special tokens."})
    sample_documents: int = field(default=2000, metadata={"help": "Documents per source used for training and measuring."})
    compare_with: list[str] = field(default_factory=list, metadata={"help": "Tokenizer paths to measure on the same sample."})


def interleave(documents_by_source: dict[str, list[str]]) -> list[str]:
    """Every sampled document, sources taking turns, so the merges are not dominated by whichever
    source comes first. zip() would cut each source to the shortest one (issue 11: builtin:code's
    166 documents once limited BPE to 664 of 4,287 sampled documents)."""
    return [d for group in zip_longest(*documents_by_source.values()) for d in group if d is not None]


def train_tokenizer(documents_by_source: dict[str, list[str]], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    special = [EOS, PAD, *CHAT_TOKENS]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(interleave(documents_by_source), trainer=trainer)
    tok = _as_ordinary_tokens(tok, REASONING_TOKENS)
    control = [t for t in CHAT_TOKENS if t not in REASONING_TOKENS]
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD,
                                   additional_special_tokens=control, model_max_length=1_000_000)


def _as_ordinary_tokens(tok: Tokenizer, tokens: list[str]) -> Tokenizer:
    """`tok` with `tokens` (already added) re-registered as non-special added tokens, keeping their ids.

    The BPE trainer registers every token it reserves as special, and re-adding one with special=False
    does not clear the flag in memory, so the flag is cleared in the serialized state."""
    state = json.loads(tok.to_str())
    for added in state["added_tokens"]:
        if added["content"] in tokens:
            added["special"] = False
    return Tokenizer.from_str(json.dumps(state))


def measure(tokenizer: PreTrainedTokenizerBase, documents: list[str]) -> dict[str, float]:
    """Fertility (tokens per whitespace word) and bytes per token over the documents."""
    n_tokens = sum(len(ids) for ids in tokenizer(documents, add_special_tokens=False)["input_ids"])
    n_words = sum(len(d.split()) for d in documents)
    n_bytes = sum(len(d.encode("utf-8")) for d in documents)
    return {"tokens_per_word": round(n_tokens / max(n_words, 1), 4), "bytes_per_token": round(n_bytes / max(n_tokens, 1), 4)}


def sample_sources(sources: list[dict], per_source: int) -> dict[str, list[str]]:
    specs = [SourceSpec.from_dict(s, i) for i, s in enumerate(sources)]
    return {s.name: list(islice(iter_documents(s), per_source)) for s in specs}


def main(argv: list[str] | None = None) -> None:
    (cfg,) = parse_recipe(TokenizerConfig, args=argv)
    if not cfg.sources:
        raise SystemExit("sources: give at least one data source to train the tokenizer on")
    out = Path(cfg.output_dir)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"output_dir {out} already exists and is not empty; choose a new directory")
    samples = sample_sources(cfg.sources, cfg.sample_documents)
    tokenizer = train_tokenizer(samples, cfg.vocab_size)
    report = {"trained": {name: measure(tokenizer, docs) for name, docs in samples.items()}}
    for path in cfg.compare_with:
        other = AutoTokenizer.from_pretrained(path)
        report[path] = {name: measure(other, docs) for name, docs in samples.items()}
    tmp = out.with_name(f".{out.name}.tmp")
    tokenizer.save_pretrained(tmp)
    (tmp / "tokenizer_report.json").write_text(json.dumps(report, indent=2))
    # stage.json last: like every stage's output, the directory is complete when it has one.
    (tmp / MANIFEST_NAME).write_text(manifest_json(stage="tokenizer", recipe=resolved_recipe(cfg), parent=None,
                                                   metrics={"vocab_size": len(tokenizer)}))
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.rmdir()  # empty (checked above)
    tmp.rename(out)
    print(f"tokenizer with {len(tokenizer)} tokens written to {out}")
    for who, rows in report.items():
        for name, m in rows.items():
            print(f"  {who:>12} | {name:<12} tokens/word {m['tokens_per_word']:6.3f}  bytes/token {m['bytes_per_token']:6.3f}")


if __name__ == "__main__":
    main()
