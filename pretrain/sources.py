"""Data sources for pretraining: where documents come from, checked before anything trains.

A source is a dict in the recipe:

    {name: arithmetic, path: "builtin:arithmetic", weight: 0.7, max_documents: 20000}
    {name: web, path: data/web.jsonl, text_field: text, filters: [gopher_repetition, fineweb_quality], dedup: true}
    {name: fineweb, path: "hf:HuggingFaceFW/fineweb-edu", split: train, max_documents: 100000}

`path` is a `builtin:` generator (no network: the tiny recipes, the demo and the tests use these),
a local file (.txt: one document per line; .jsonl / .json / .parquet / .arrow: one per row, read
with `datasets`), or `hf:<dataset name>` (streamed from the Hub where the network allows).

Built-in sources, all deterministic:
- arithmetic: single-digit `a+b=c` and `a*b=c` facts (core/arithmetic.py), the task family a
  0.8M-parameter model learns in minutes here; the chat and reward stages use the same facts.
- prose: English from the documentation topics bundled with Python (`pydoc_data.topics`).
- code: Python source of the standard library.
- math: generated sentences about arithmetic, equations and fractions.
"""

import hashlib
import random
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from core.arithmetic import answer, expression, sample_fact

LOCAL_FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
BUILTINS = ("arithmetic", "prose", "code", "math")


class DataSourceError(ValueError):
    """A source is missing, unreadable, empty, or lacks its text field: names the source and the problem."""


@dataclass
class SourceSpec:
    name: str
    path: str
    weight: float = 1.0
    text_field: str = "text"
    max_documents: int | None = None
    split: str = "train"
    seed: int = 0
    filters: list[str] | None = None
    dedup: bool = False

    @classmethod
    def from_dict(cls, raw: dict, index: int) -> "SourceSpec":
        where = f"sources[{index}]"
        if not isinstance(raw, dict):
            raise DataSourceError(f"{where} must be a mapping with at least 'name' and 'path', got {raw!r}")
        missing = [k for k in ("name", "path") if k not in raw]
        if missing:
            raise DataSourceError(f"{where} is missing {missing}; each source needs 'name' and 'path'")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise DataSourceError(f"{where} ({raw['name']}): unknown keys {unknown}; valid keys: {sorted(known)}")
        spec = cls(**raw)
        unknown_filters = sorted(set(spec.filters or []) - set(QUALITY_FILTERS))
        if unknown_filters:
            raise DataSourceError(f"source {spec.name!r}: unknown filters {unknown_filters}; filters: {sorted(QUALITY_FILTERS)}")
        if spec.weight < 0:
            raise DataSourceError(f"source {spec.name!r}: weight must be >= 0, got {spec.weight}")
        return spec


def generator_fingerprint(spec: SourceSpec) -> str:
    """For built-ins, a hash of the code that generates them, so editing a generator invalidates
    the token caches built from it (a file path or dataset name identifies the data otherwise)."""
    if not spec.path.startswith("builtin:"):
        return ""
    import core.arithmetic

    code = Path(__file__).read_bytes() + Path(core.arithmetic.__file__).read_bytes()
    return hashlib.sha256(code).hexdigest()[:16]


# datatrove's heuristic filters (the ones behind FineWeb: Penedo et al. 2024), by recipe name. Their
# English word tokenizer is spaCy's, which runs offline. Applied document by document, in order.
QUALITY_FILTERS = {
    "gopher_repetition": "GopherRepetitionFilter",  # repeated lines / n-grams (Rae et al. 2021)
    "gopher_quality": "GopherQualityFilter",  # word counts, symbol ratios, stop words (Rae et al. 2021)
    "c4_quality": "C4QualityFilter",  # sentence punctuation, boilerplate lines (Raffel et al. 2020)
    "fineweb_quality": "FineWebQualityFilter",  # line punctuation, short lines, char duplication
}


def iter_documents(spec: SourceSpec, stats: dict | None = None) -> Iterator[str]:
    """Yield the documents of a source, raising DataSourceError naming the source when it is bad.

    `stats`, when given, receives the count of documents kept and of those dropped per reason
    (empty, duplicate, each filter's own reason)."""
    stats = stats if stats is not None else {}
    stats.setdefault("kept", 0)
    filters = _quality_filters(spec)
    seen: set[bytes] = set()
    for row, text in enumerate(_raw_documents(spec)):
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
        if spec.max_documents is not None and stats["kept"] >= spec.max_documents:
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


def _raw_documents(spec: SourceSpec) -> Iterator[str]:
    if spec.path.startswith("builtin:"):
        kind = spec.path.removeprefix("builtin:")
        if kind not in BUILTINS:
            raise DataSourceError(f"source {spec.name!r}: unknown built-in {spec.path!r}; built-ins: "
                                  f"{['builtin:' + b for b in BUILTINS]}")
        yield from globals()[f"_builtin_{kind}"](spec.seed)
        return
    import datasets

    if spec.path.startswith("hf:"):
        try:
            ds = datasets.load_dataset(spec.path.removeprefix("hf:"), split=spec.split, streaming=True)
        except Exception as e:  # network, missing dataset, bad split: name the source either way
            raise DataSourceError(f"source {spec.name!r}: cannot load Hugging Face dataset {spec.path!r}: {e}") from e
    else:
        path = Path(spec.path)
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
            first = next(iter(ds), None)
        except Exception as e:
            raise DataSourceError(f"source {spec.name!r}: cannot read {spec.path}: {type(e).__name__}: {e}") from e
        if first is None:
            raise DataSourceError(f"source {spec.name!r} ({spec.path}) is empty: it has no rows")
    column = spec.text_field
    rows = iter(ds)
    i = 0
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as e:  # a corrupt line or shard part-way through the file
            raise DataSourceError(f"source {spec.name!r}: cannot read {spec.path} after row {i - 1}: "
                                  f"{type(e).__name__}: {e}") from e
        i += 1
        if column not in row:
            raise DataSourceError(f"source {spec.name!r} ({spec.path}): row {i - 1} has no {column!r} field "
                                  f"(fields: {sorted(row)}); set text_field to the column holding the text")
        yield row[column]


# --- built-in generators ------------------------------------------------------------------------

def _builtin_arithmetic(seed: int) -> Iterator[str]:
    rng = random.Random(seed)
    while True:  # endless; max_documents bounds it
        facts = [sample_fact(rng) for _ in range(8)]
        yield "\n".join(f"{expression(f)}={answer(f)}" for f in facts)


def _builtin_prose(seed: int) -> Iterator[str]:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    for name in sorted(topics):
        for paragraph in topics[name].split("\n\n"):
            text = " ".join(line.strip() for line in paragraph.splitlines())
            # Keep paragraphs that read as English sentences, not code listings or grammar rules.
            if len(text) > 80 and text[0].isalpha() and text.count(" ") > 10 and "::=" not in text:
                yield text


def _builtin_code(seed: int) -> Iterator[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if 200 < len(text) < 200_000:
            yield text


def _builtin_math(seed: int) -> Iterator[str]:
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
        yield " ".join(rng.choice(templates)(rng.randrange(50), rng.randrange(50)) for _ in range(6))


if __name__ == "__main__":  # a quick look at a source: python -m pretrain.sources builtin:prose
    spec = SourceSpec(name="preview", path=sys.argv[1], max_documents=3)
    for doc in iter_documents(spec):
        print(doc[:400], "\n---")
