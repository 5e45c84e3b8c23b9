"""The one data-source loader every stage uses: built-in generators, local files, Hugging Face datasets.

A source is a mapping in a recipe's `sources` list, with the same keys in every stage:

    {path: "builtin:arithmetic", name: arithmetic, weight: 0.7, max_rows: 20000}        # pretraining
    {path: data/web.jsonl, text_field: text, filters: [gopher_repetition], dedup: true}  # pretraining
    {path: "builtin:arithmetic_chat", split: train}                                       # SFT
    {path: "builtin:arithmetic_preferences", split: test}                                 # reward model
    {path: "builtin:arithmetic_pairs", split: train}                                      # preference
    {path: "hf:HuggingFaceTB/smoltalk", subset: all, split: train, max_rows: 5000}        # SFT, needs network

Keys:
- `path`: `builtin:<generator>` (shipped, deterministic, no network: the tiny recipes, the demo and
  the tests use these), a local file (.txt: one row `{"text": line}` per line; .jsonl / .json /
  .parquet / .arrow: one row per record, read with `datasets`), or a Hugging Face dataset name,
  written `hf:<name>` (a bare `owner/name` that is not a local file means the same, as in TRL).
- `name`: the source's label in mixtures, logs and error messages (default: derived from `path`).
- `subset`: the Hugging Face dataset configuration (`datasets.load_dataset(path, subset)`; the Hub
  calls it a subset).
- `split`, `max_rows`, `seed` (built-in generators only).
- Pretraining only: `weight`, `text_field`, `filters` (datatrove quality filters), `dedup`.

Each stage states which keys it reads (`SourceSpec.from_dict(raw, i, keys=...)`), so a key that
would do nothing in that stage is an error naming it instead of being ignored.

Built-in generators live in the `BUILTIN_SOURCES` dict below: `(split, seed) -> iterator of rows`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import random
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from core import arithmetic

LOCAL_FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}

# Keys of earlier versions, so an old recipe is told the new word (issue 10: one key set).
RENAMED_KEYS = {"max_documents": "max_rows", "max_examples": "max_rows"}


class DataSourceError(ValueError):
    """A source is missing, unreadable, empty, or lacks a field: names the source, row and problem."""


@dataclass
class SourceSpec:
    path: str
    name: str = ""
    subset: str | None = None
    split: str = "train"
    max_rows: int | None = None
    seed: int = 0
    weight: float = 1.0
    text_field: str = "text"
    filters: list[str] | None = None
    dedup: bool = False

    def __post_init__(self):
        if not self.name:
            self.name = self.path.removeprefix("builtin:").removeprefix("hf:").rsplit("/", 1)[-1].split(".")[0]

    @classmethod
    def from_dict(cls, raw: dict, index: int, keys: Iterable[str] | None = None) -> SourceSpec:
        """Build and check `sources[index]`; `keys` are the ones the calling stage reads (default: all)."""
        where = f"sources[{index}]"
        if not isinstance(raw, dict) or "path" not in raw:
            raise DataSourceError(f"{where} must be a mapping with at least 'path', got {raw!r}")
        where = f"{where} ({raw['path']})"
        fields = [f.name for f in dataclasses.fields(cls)]
        allowed = set(fields if keys is None else keys)
        for key in raw:
            if key in RENAMED_KEYS:
                raise DataSourceError(f"{where}: unknown keys [{key!r}]; did you mean {RENAMED_KEYS[key]!r}?")
            if key not in fields:
                raise DataSourceError(f"{where}: unknown keys [{key!r}]; valid keys: {sorted(allowed)}")
            if key not in allowed:
                raise DataSourceError(f"{where}: key {key!r} is not used by this stage's sources; "
                                      f"keys here: {sorted(allowed)}")
        spec = cls(**raw)
        unknown_filters = sorted(set(spec.filters or []) - set(QUALITY_FILTERS))
        if unknown_filters:
            raise DataSourceError(f"source {spec.name!r}: unknown filters {unknown_filters}; filters: {sorted(QUALITY_FILTERS)}")
        if spec.weight < 0:
            raise DataSourceError(f"source {spec.name!r}: weight must be >= 0, got {spec.weight}")
        if spec.max_rows is not None and spec.max_rows < 1:
            raise DataSourceError(f"source {spec.name!r}: max_rows must be >= 1 (or null for all), got {spec.max_rows}")
        if spec.subset is not None and kind(spec) != "hf":
            raise DataSourceError(f"source {spec.name!r}: 'subset' is a Hugging Face dataset configuration, but "
                                  f"{spec.path} is not a Hugging Face dataset")
        return spec


def kind(spec: SourceSpec) -> str:
    """'builtin', 'local' or 'hf'."""
    if spec.path.startswith("builtin:"):
        return "builtin"
    if spec.path.startswith("hf:"):
        return "hf"
    path = Path(spec.path)
    # Anything that looks like a file is a file (and fails as one, naming it); a bare `owner/name`
    # is a Hub dataset, as TRL's scripts read it.
    if path.suffix or path.exists() or spec.path.startswith((".", "/", "~")):
        return "local"
    return "hf"


# --- rows -------------------------------------------------------------------------------------------

def iter_rows(spec: SourceSpec) -> Iterator[dict]:
    """The source's rows as dicts, streamed; unreadable or empty sources raise DataSourceError."""
    source_kind = kind(spec)
    if source_kind == "builtin":
        generator = spec.path.removeprefix("builtin:")
        if generator not in BUILTIN_SOURCES:
            raise DataSourceError(f"source {spec.name!r}: unknown built-in {spec.path!r}; built-ins: "
                                  f"{['builtin:' + b for b in BUILTIN_SOURCES]}")
        yield from BUILTIN_SOURCES[generator](spec.split, spec.seed)
        return
    import datasets

    if source_kind == "hf":
        dataset = spec.path.removeprefix("hf:")
        try:
            ds = datasets.load_dataset(dataset, spec.subset, split=spec.split, streaming=True)
        except Exception as e:  # network, missing dataset, bad split: name the source either way
            raise DataSourceError(f"source {spec.name!r}: cannot load Hugging Face dataset {dataset!r}: {e}") from e
    else:
        path = Path(spec.path).expanduser()
        fmt = LOCAL_FORMATS.get(path.suffix)
        if fmt is None:
            raise DataSourceError(f"source {spec.name!r}: {spec.path} has unsupported extension {path.suffix!r}; "
                                  f"use one of {sorted(LOCAL_FORMATS)}, builtin: or hf:")
        if not path.is_file():
            raise DataSourceError(f"source {spec.name!r}: file {spec.path} does not exist or is not a file")
        if path.stat().st_size == 0:
            raise DataSourceError(f"source {spec.name!r} ({spec.path}) is empty: the file has no bytes")
        try:
            # Streaming: rows are read lazily, so a large file is not loaded to check one field.
            ds = datasets.load_dataset(fmt, data_files=str(path), split="train", streaming=True)
        except Exception as e:
            raise DataSourceError(f"source {spec.name!r}: cannot read {spec.path}: {type(e).__name__}: {e}") from e
    rows = iter(ds)
    index = 0
    while True:
        try:
            row = next(rows)
        except StopIteration:
            break
        except Exception as e:  # a corrupt line or shard part-way through the file
            after = f"after row {index - 1}" if index else "at its first row"
            raise DataSourceError(f"source {spec.name!r}: cannot read {spec.path} {after}: "
                                  f"{type(e).__name__}: {e}") from e
        yield row
        index += 1
    if index == 0:
        raise DataSourceError(f"source {spec.name!r} ({spec.path}) is empty: it has no rows")


def load_rows(spec: SourceSpec) -> list[dict]:
    """The first `max_rows` rows (all by default) in memory: chat, preference and prompt data are small."""
    rows = []
    for row in iter_rows(spec):
        if spec.max_rows is not None and len(rows) >= spec.max_rows:
            break
        rows.append(row)
    return rows


# The keys a row source of the post-training stages (sft, preference, rl, distill) reads: no weights,
# filters or text field, which only pretraining mixes documents with.
ROW_SOURCE_KEYS = ("path", "name", "subset", "split", "max_rows", "seed")


def labelled_rows(sources: list[dict], keys: Iterable[str] = ROW_SOURCE_KEYS) -> Iterator[tuple[dict, str]]:
    """Each row of each source in order, with where it came from ("source <path> row <i>"), which every
    stage's data error names."""
    for index, raw in enumerate(sources):
        spec = SourceSpec.from_dict(raw, index, keys=keys)
        for i, row in enumerate(load_rows(spec)):
            yield row, f"source {spec.path} row {i}"


# --- documents (pretraining) -------------------------------------------------------------------------

# datatrove's heuristic filters (the ones behind FineWeb: Penedo et al. 2024), by recipe name. Their
# English word tokenizer is spaCy's, which runs offline. Applied document by document, in order.
QUALITY_FILTERS = {
    "gopher_repetition": "GopherRepetitionFilter",  # repeated lines / n-grams (Rae et al. 2021)
    "gopher_quality": "GopherQualityFilter",  # word counts, symbol ratios, stop words (Rae et al. 2021)
    "c4_quality": "C4QualityFilter",  # sentence punctuation, boilerplate lines (Raffel et al. 2020)
    "fineweb_quality": "FineWebQualityFilter",  # line punctuation, short lines, char duplication
}


def iter_documents(spec: SourceSpec, stats: dict | None = None) -> Iterator[str]:
    """The `text_field` of each row, after dedup and quality filters, up to `max_rows` kept.

    `stats`, when given, receives the count of documents kept and of those dropped per reason
    (empty, duplicate, each filter's own reason)."""
    stats = stats if stats is not None else {}
    stats.setdefault("kept", 0)
    filters = _quality_filters(spec)
    seen: set[bytes] = set()
    for row, record in enumerate(iter_rows(spec)):
        if spec.text_field not in record:
            raise DataSourceError(f"source {spec.name!r} ({spec.path}): row {row} has no {spec.text_field!r} field "
                                  f"(fields: {sorted(record)}); set text_field to the column holding the text")
        text = record[spec.text_field]
        if not isinstance(text, str):
            raise DataSourceError(f"source {spec.name!r} ({spec.path}): row {row} field {spec.text_field!r} "
                                  f"is {type(text).__name__}, not text")
        reason = "empty" if not text.strip() else None
        if reason is None and spec.dedup:
            # Exact dedup after whitespace normalisation; fuzzy (MinHash) dedup of a whole corpus is
            # datatrove's multi-stage pipeline, beyond what one training process should run.
            digest = hashlib.blake2b(" ".join(text.split()).encode(), digest_size=16).digest()
            reason = "duplicate" if digest in seen else None
            seen.add(digest)
        if reason is None and filters:
            reason = _first_rejection(filters, text, f"{spec.name}/{row}")
        if reason is not None:
            stats[reason] = stats.get(reason, 0) + 1
            continue
        yield text
        stats["kept"] += 1
        if spec.max_rows is not None and stats["kept"] >= spec.max_rows:
            break
    if stats["kept"] == 0:
        dropped = {k: v for k, v in stats.items() if k != "kept"}
        raise DataSourceError(f"source {spec.name!r} ({spec.path}) is empty: it yielded no document"
                              + (f" (dropped: {dropped})" if dropped else ""))


def _quality_filters(spec: SourceSpec) -> list:
    if not spec.filters:
        return []
    from datatrove.pipeline import filters as datatrove_filters

    return [(name, getattr(datatrove_filters, QUALITY_FILTERS[name])()) for name in spec.filters]


def _first_rejection(filters: list, text: str, doc_id: str) -> str | None:
    from datatrove.data import Document

    doc = Document(text=text, id=doc_id)
    for name, f in filters:
        verdict = f.filter(doc)
        keep, reason = verdict if isinstance(verdict, tuple) else (verdict, None)
        if not keep:
            return f"{name}: {reason or 'rejected'}"
    return None


# --- identity ------------------------------------------------------------------------------------------

def content_fingerprint(spec: SourceSpec) -> str:
    """What the source's data *is*, for caches and stage.json's data_fingerprint (issue 11).

    A local file: its size and a sha256 of its bytes, so an edited file never reuses a stale cache.
    A built-in: a hash of the generator's code (and of core/arithmetic.py, which the generators draw
    from), so editing a generator invalidates what was built from it. A Hub dataset: its name,
    subset and split (the Hub's own revision is not known without the network)."""
    digest = hashlib.sha256()
    source_kind = kind(spec)
    if source_kind == "local":
        path = Path(spec.path).expanduser()
        if path.is_file():
            digest.update(str(path.stat().st_size).encode())
            with open(path, "rb") as stream:
                for chunk in iter(lambda: stream.read(1 << 20), b""):
                    digest.update(chunk)
    elif source_kind == "builtin":
        generator = BUILTIN_SOURCES.get(spec.path.removeprefix("builtin:"))
        if generator is not None:
            digest.update(inspect.getsource(generator).encode())
        digest.update(Path(arithmetic.__file__).read_bytes())
    else:
        digest.update(f"{spec.path}|{spec.subset}|{spec.split}".encode())
    return digest.hexdigest()[:16]


def data_identity(spec: SourceSpec) -> dict:
    """The fields that decide which documents a source yields (not its mixture weight) + its content."""
    fields = dataclasses.asdict(spec)
    fields.pop("weight")  # changing only the weight must not re-tokenise (issue 11)
    return {**fields, "content": content_fingerprint(spec)}


# --- built-in generators ---------------------------------------------------------------------------

def _arithmetic_text(split: str, seed: int) -> Iterator[dict]:
    """Endless documents of 8 single-digit facts, one per line, as `7+5=12` or as the question and its
    answer, `What is 7+5? 12` (max_rows bounds it).

    The question form is the web's Q&A text: without it the base model knows every fact as `7+5=` but
    SFT has to teach the question-to-fact mapping from the 160 training facts alone, and the SFT model
    reached 50% on the 40 held-out ones (measured, issue 18)."""
    rng = random.Random(seed)
    while True:
        facts = [arithmetic.sample_fact(rng) for _ in range(8)]
        lines = [f"{arithmetic.question(f)} {arithmetic.answer(f)}" if rng.random() < 0.5
                 else f"{arithmetic.expression(f)}={arithmetic.answer(f)}" for f in facts]
        yield {"text": "\n".join(lines)}


def _prose(split: str, seed: int) -> Iterator[dict]:
    """English from the documentation topics bundled with Python (`pydoc_data.topics`)."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    for name in sorted(topics):
        for paragraph in topics[name].split("\n\n"):
            text = " ".join(line.strip() for line in paragraph.splitlines())
            # Keep paragraphs that read as English sentences, not code listings or grammar rules.
            if len(text) > 80 and text[0].isalpha() and text.count(" ") > 10 and "::=" not in text:
                yield {"text": text}


def _code(split: str, seed: int) -> Iterator[dict]:
    """Python source of the standard library."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if 200 < len(text) < 200_000:
            yield {"text": text}


def _math(split: str, seed: int) -> Iterator[dict]:
    """Generated sentences about arithmetic, equations and fractions (endless)."""
    rng = random.Random(seed)
    templates = [
        lambda a, b: f"The sum of {a} and {b} is {a + b}.",
        lambda a, b: f"The product of {a} and {b} is {a * b}.",
        lambda a, b: f"If x + {a} = {a + b}, then x = {b}.",
        lambda a, b: f"{a} times {b} equals {a * b}, so {a * b} divided by {b} is {a}." if b else f"{a} plus zero is {a}.",
        lambda a, b: f"The fraction {a}/{b + 1} is {'less' if a < b + 1 else 'not less'} than one.",
        lambda a, b: f"Subtracting {b} from {a + b} leaves {a}.",
    ]
    while True:
        yield {"text": " ".join(rng.choice(templates)(rng.randrange(50), rng.randrange(50)) for _ in range(6))}


def _arithmetic_chat(split: str, seed: int) -> Iterator[dict]:
    """Chat rows (`messages`) asking the facts of one split (core/arithmetic.py: conversations)."""
    yield from arithmetic.conversations(split, seed)


def _arithmetic_preferences(split: str, seed: int) -> Iterator[dict]:
    """Preference rows (`prompt`/`chosen`/`rejected` message lists) for a reward model of the arithmetic
    assistant: the concise right answer over a wrong, a rambling or an evasive one (core/arithmetic.py: reward_model_pairs)."""
    yield from arithmetic.reward_model_pairs(split, seed)


def _arithmetic_pairs(split: str, seed: int) -> Iterator[dict]:
    """Preference rows (`prompt`/`chosen`/`rejected`): a right and a wrong reply (core/arithmetic.py)."""
    yield from arithmetic.preference_pairs(split, seed)


def _arithmetic_kto(split: str, seed: int) -> Iterator[dict]:
    """KTO rows (`prompt`/`completion`/`label`): the pairs above, unpaired (core/arithmetic.py)."""
    yield from arithmetic.kto_rows(split, seed)


# The one table of built-in generators: `(split, seed) -> rows`. Every stage reads them by name.
BUILTIN_SOURCES: dict[str, Callable[[str, int], Iterator[dict]]] = {
    "arithmetic": _arithmetic_text,
    "prose": _prose,
    "code": _code,
    "math": _math,
    "arithmetic_chat": _arithmetic_chat,
    "arithmetic_preferences": _arithmetic_preferences,
    "arithmetic_pairs": _arithmetic_pairs,
    "arithmetic_kto": _arithmetic_kto,
}


if __name__ == "__main__":  # a quick look at a source: python -m core.sources builtin:prose
    import sys

    for document in load_rows(SourceSpec(path=sys.argv[1], max_rows=3)):
        print(str(document)[:400], "\n---")
