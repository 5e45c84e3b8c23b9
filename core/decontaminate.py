"""Decontamination: drop training text that contains an evaluation prompt, by word n-gram overlap.

    from core.decontaminate import NGramIndex, decontaminate_rows
    from rewards.suites import evaluation_prompts
    index = NGramIndex(evaluation_prompts([{"suite": "arithmetic", "split": "test"}]))
    index.match("... What is 7+5? ...")          # the evaluation prompt it overlaps, or None
    rows, dropped = decontaminate_rows(rows, index, where="sft")

The method is open-r1's (scripts/decontaminate.py, used for its Mixture-of-Thoughts data): lower-case,
collapse whitespace, split on whitespace, and flag a text that shares any word 8-gram with an
evaluation prompt. 8 words is open-r1's default `ngram_size` (and the n of the GPT-3 paper's
13-gram check scaled down for short math prompts). One deviation: open-r1 gives a prompt shorter
than n words no n-gram at all, so it can never match; the arithmetic suite's prompts are 3 words
("What is 7+5?"), and such a prompt is indexed as one whole-prompt n-gram instead, which a text
matches when it contains the prompt's words in a row. Punctuation stays attached to words as in
open-r1, so "What is 7+5?" does not match "what is 7+5=12".

Used by pretrain/curate.py (a datatrove filter over documents) and by SFT and RL data loading
(`decontaminate_rows`), so every stage checks against the same prompts the same way.
"""

from __future__ import annotations

from collections.abc import Iterable

NGRAM_SIZE = 8  # open-r1's scripts/decontaminate.py default


def normalize(text: str) -> list[str]:
    """open-r1's normalisation: lower case, whitespace collapsed; the words."""
    return text.lower().split()


def word_ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


class NGramIndex:
    """Every word n-gram of every evaluation prompt, mapped back to the prompt it came from."""

    def __init__(self, prompts: Iterable[str], n: int = NGRAM_SIZE):
        if n < 1:
            raise ValueError(f"decontamination n-gram size must be >= 1, got {n}")
        self.n = n
        self.grams: dict[tuple[str, ...], str] = {}
        self.lengths: set[int] = set()  # n, and the lengths of prompts shorter than n
        for prompt in prompts:
            words = normalize(prompt)
            if not words:
                continue
            grams = word_ngrams(words, n) if len(words) >= n else [tuple(words)]
            for gram in grams:
                self.grams.setdefault(gram, prompt)
                self.lengths.add(len(gram))

    def __len__(self) -> int:
        return len(self.grams)

    def match(self, text: str) -> str | None:
        """The first evaluation prompt whose n-gram `text` contains, or None."""
        words = normalize(text)
        for length in sorted(self.lengths):
            for gram in word_ngrams(words, length):
                prompt = self.grams.get(gram)
                if prompt is not None:
                    return prompt
        return None


def prompt_text(prompt) -> str:
    """A prompt as plain text: a string, or the contents of a message list joined."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(str(m.get("content", "")) for m in prompt if isinstance(m, dict))


def row_prompt(row: dict) -> str:
    """What a training row asks: `prompt`, or the user turns of `messages`."""
    if row.get("prompt") is not None:
        return prompt_text(row["prompt"])
    return prompt_text([m for m in row.get("messages") or [] if isinstance(m, dict) and m.get("role") == "user"])


def decontaminate_rows(rows: list[dict], index: NGramIndex, where: str,
                       origins: list[str] | None = None) -> tuple[list[dict], list[str] | None, int]:
    """Drop the rows whose prompt overlaps an evaluation prompt; print and return how many went."""
    keep = [i for i, row in enumerate(rows) if index.match(row_prompt(row)) is None]
    dropped = len(rows) - len(keep)
    print(f"[decontaminate] {where}: dropped {dropped} of {len(rows)} rows whose prompt shares a "
          f"{index.n}-gram with an evaluation prompt", flush=True)
    return [rows[i] for i in keep], None if origins is None else [origins[i] for i in keep], dropped
