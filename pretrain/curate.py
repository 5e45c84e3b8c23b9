"""Data curation in front of pretraining: datatrove pipelines that filter, deduplicate, scrub and decontaminate.

    python -m pretrain.curate --config recipes/tiny/curate.yaml [--workers 2 ...]

For each source of the recipe (core/sources.py keys), in this order, the way FineWeb's pipeline
(Penedo et al. 2024, datatrove's examples/fineweb.py) orders its steps:
  1. read (one datatrove task reads every `tasks`-th document of the source);
  2. quality filters: datatrove's Gopher repetition and quality (Rae et al. 2021), C4 (Raffel et al.
     2020) and FineWeb filters, with the thresholds of `filter_params` (their constructor arguments;
     datatrove's defaults are FineWeb's);
  3. decontamination: a document sharing a word 8-gram with a prompt of `decontaminate_against`
     goes (open-r1's method, core/decontaminate.py);
  4. exact dedup (datatrove's ExactDedup stages, whitespace-normalised text) across all sources;
  5. MinHash near-duplicate removal (datatrove's four MinHash stages) across all sources: FineWeb's
     5-grams, 14 buckets x 8 hashes, which removes pairs above about 75% Jaccard similarity;
  6. PII: e-mail addresses and public IP addresses replaced (datatrove's PIIFormatter);
  7. write: `<output_dir>/<source>.parquet`, rows `{"text", "id", "source"}`: a recipe source
     `{path: <output_dir>/<source>.parquet}` is read by pretrain/data.py as it is (core/sources.py
     reads one file per source; the stage's own shards are merged into it at the end).
Every removed document is kept, with its reason, under `<output_dir>/_work/removed/<step>/`, and the
report (`report.json`, `report.md`, `funnel.png`) counts documents and tokens in and out of every step.

Language ID is not run: datatrove's LanguageFilter downloads its fastText model (lid.176.bin or
GlotLID) at run time and no installed package ships one offline; the built-in sources are English.

Executors: `executor: local` runs each stage with datatrove's LocalPipelineExecutor (`tasks` shards,
`workers` processes). `executor: slurm` submits the same stages as a chain of datatrove
SlurmPipelineExecutor jobs (`slurm:` holds its arguments, e.g. partition, time, cpus_per_task; each
stage depends on the one before) and returns; run the same command with `--report_only true` once
the jobs have finished to merge the shards and write the report:

    python -m pretrain.curate --config recipes/tiny/curate.yaml --executor slurm \\
        --slurm '{partition: cpu, time: "04:00:00"}' --tasks 64 --workers 64
    python -m pretrain.curate --config recipes/tiny/curate.yaml --report_only true
"""

from __future__ import annotations

import inspect
import json
import time
from dataclasses import dataclass
from pathlib import Path

from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter

from core.decontaminate import NGRAM_SIZE, NGramIndex
from core.recipe import help_field as _help
from core.sources import QUALITY_FILTERS, ROW_SOURCE_KEYS, DataSourceError, SourceSpec, iter_rows
from rewards.suites import evaluation_prompts

# The keys a curation source reads: a row source's, the text field, and the filters, which are this
# stage's own (a source's `filters` replaces the recipe's list, [] for none); no mixture weight (that is
# pretraining's).
CURATION_KEYS = (*ROW_SOURCE_KEYS, "text_field", "filters")
STEPS_REMOVING = ("decontamination", "exact_dedup", "minhash_dedup")


@dataclass
class CurateConfig:
    output_dir: str = _help("Where the curated `<source>.parquet` files, the report and `_work/` go; refused "
                            "if it already holds curated shards.", default="out/tiny/curated")
    sources: list[dict] = _help("Sources (core/sources.py keys: path, name, split, max_rows, seed, text_field, "
                                "subset, filters). A source's `filters` replaces `filters` below ([] for none).",
                                default_factory=list)
    filters: list[str] = _help(f"Quality filters in order, from {sorted(QUALITY_FILTERS)}.",
                               default_factory=lambda: list(QUALITY_FILTERS))
    filter_params: dict = _help("Per filter, constructor arguments of its datatrove class (the thresholds), e.g. "
                                "{gopher_quality: {min_doc_words: 20}}; unset ones keep datatrove's (FineWeb's).",
                                default_factory=dict)
    decontaminate_against: list[dict] = _help("Evaluation sets whose prompts no document may contain: "
                                              "[{suite, split, data_path}] of rewards/suites.py.",
                                              default_factory=lambda: [{"suite": "arithmetic", "split": "test"}])
    decontamination_ngram: int = _help("Word n-gram size of the overlap test (open-r1: 8).", default=NGRAM_SIZE)
    exact_dedup: bool = _help("Remove exact duplicates (whitespace-normalised) across sources.", default=True)
    minhash_dedup: bool = _help("Remove near-duplicates with MinHash across sources.", default=True)
    minhash: dict = _help("MinhashConfig fields: n_grams, num_buckets, hashes_per_bucket, seed (FineWeb: 5, 14, 8), "
                          "and norm_numbers (default true: digits become 0 before shingling).",
                          default_factory=lambda: {"n_grams": 5, "num_buckets": 14, "hashes_per_bucket": 8})
    pii: bool = _help("Replace e-mail addresses and public IP addresses (datatrove PIIFormatter).", default=True)
    tasks: int = _help("Shards per stage (datatrove tasks).", default=2)
    workers: int = _help("Processes running those tasks at once (local executor).", default=2)
    executor: str = _help("local | slurm (datatrove's LocalPipelineExecutor / SlurmPipelineExecutor).",
                          default="local")
    slurm: dict = _help("SlurmPipelineExecutor arguments for executor: slurm (partition and time at least).",
                        default_factory=dict)
    report_only: bool = _help("Skip the pipelines; merge the shards of a finished run and write the report "
                              "(after a Slurm run).", default=False)
    examples_per_step: int = _help("Removed documents quoted per step in the report.", default=3)
    tokenizer_name_or_path: str | None = _help("Count tokens with this tokenizer in the report; default: "
                                               "whitespace words.", default=None)


# --- datatrove steps of our own ----------------------------------------------------------------------

class SourceReader(PipelineStep):
    """Documents of one core/sources.py source; task `rank` reads every `world_size`-th of them."""

    name = "📖 smolforge source"
    type = "📖 - READER"

    def __init__(self, spec: SourceSpec):
        super().__init__()
        self.spec = spec

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        spec = self.spec
        for i, record in enumerate(iter_rows(spec)):
            if spec.max_rows is not None and i >= spec.max_rows:
                break
            if i % world_size != rank:
                continue
            text = record.get(spec.text_field)
            if not isinstance(text, str):
                raise DataSourceError(f"source {spec.name!r} ({spec.path}): row {i} field {spec.text_field!r} is "
                                      f"{type(text).__name__}, not text (fields: {sorted(record)})")
            self.stat_update("documents")
            yield Document(text=text, id=f"{spec.name}/{i}", metadata={"source": spec.name})


class DecontaminationFilter(BaseFilter):
    """Drops a document that shares a word n-gram with an evaluation prompt (core/decontaminate.py)."""

    name = "🧼 decontamination"

    def __init__(self, prompts: list[str], n: int, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.index = NGramIndex(prompts, n)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        prompt = self.index.match(doc.text)
        return True if prompt is None else (False, f"contains evaluation prompt {prompt!r}")


class PIIScrubber(PipelineStep):
    """datatrove's PIIFormatter, logging each changed document (before and after) for the report."""

    name = "🔒 PII"
    type = "✂️ - FORMAT"

    def __init__(self, log_writer):
        super().__init__()
        from datatrove.pipeline.formatters import PIIFormatter

        self.formatter = PIIFormatter()
        self.log_writer = log_writer

    def run(self, data, rank: int = 0, world_size: int = 1):
        with self.log_writer as log:
            for doc in data:
                scrubbed = self.formatter.format(doc.text)
                if scrubbed != doc.text:
                    self.stat_update("scrubbed")
                    log.write(Document(text=doc.text, id=doc.id, metadata={**doc.metadata, "scrubbed": scrubbed}),
                              rank)
                    doc.text = scrubbed
                yield doc


def normalized_text(doc: Document) -> bytes:
    """What exact dedup compares: the text with whitespace runs collapsed (bytes: datatrove picks its hash
    function from this annotation, which `from __future__ import annotations` turns into a string)."""
    return " ".join(doc.text.split()).encode()


def curated_row(self, doc: Document) -> dict:
    """The row written for pretraining: its text, id and source (a writer adapter)."""
    return {"text": doc.text, "id": doc.id, "source": doc.metadata["source"]}


# --- checks before any work --------------------------------------------------------------------------

def check_config(cfg: CurateConfig) -> list[SourceSpec]:
    """Every mistake that would otherwise surface inside a worker: raise naming the key or file."""
    if not cfg.sources:
        raise ValueError("sources is empty: give at least one source, e.g. {path: 'builtin:prose', max_rows: 1000}")
    specs = [SourceSpec.from_dict(raw, i, keys=CURATION_KEYS) for i, raw in enumerate(cfg.sources)]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"sources: names must be unique (they name the output files), got {names}")
    unknown = sorted(set(cfg.filters) - set(QUALITY_FILTERS))
    if unknown:
        raise ValueError(f"filters: unknown {unknown}; filters: {sorted(QUALITY_FILTERS)}")
    from datatrove.pipeline import filters as datatrove_filters

    for name, params in cfg.filter_params.items():
        if name not in QUALITY_FILTERS:
            raise ValueError(f"filter_params: unknown filter {name!r}; filters: {sorted(QUALITY_FILTERS)}")
        accepted = set(inspect.signature(getattr(datatrove_filters, QUALITY_FILTERS[name])).parameters)
        bad = sorted(set(params) - (accepted - {"exclusion_writer"}))
        if bad:
            raise ValueError(f"filter_params.{name}: unknown threshold keys {bad}; "
                             f"{QUALITY_FILTERS[name]} takes {sorted(accepted - {'exclusion_writer'})}")
    keys = {"n_grams", "num_buckets", "hashes_per_bucket", "seed", "norm_numbers"}
    bad = sorted(set(cfg.minhash) - keys)
    if bad:
        raise ValueError(f"minhash: unknown keys {bad}; keys: {sorted(keys)}")
    minhash_config(cfg.minhash)
    if cfg.executor not in ("local", "slurm"):
        raise ValueError(f"executor: {cfg.executor!r} is not one of local, slurm")
    if cfg.executor == "slurm":
        from datatrove.executor import SlurmPipelineExecutor

        accepted = set(inspect.signature(SlurmPipelineExecutor).parameters) - {"pipeline", "depends", "tasks",
                                                                                 "logging_dir", "workers"}
        bad = sorted(set(cfg.slurm) - accepted)
        if bad or not {"partition", "time"} <= set(cfg.slurm):
            raise ValueError(f"slurm: needs partition and time; unknown keys {bad}; keys: {sorted(accepted)}")
    if cfg.tasks < 1 or cfg.workers < 1:
        raise ValueError(f"tasks and workers must be >= 1, got tasks={cfg.tasks}, workers={cfg.workers}")
    if cfg.decontamination_ngram < 1:
        raise ValueError(f"decontamination_ngram must be >= 1, got {cfg.decontamination_ngram}")
    for spec in specs:  # a missing file, a bad built-in or a missing text field fails here, not in a worker
        first = next(iter_rows(spec))
        if spec.text_field not in first:
            raise DataSourceError(f"source {spec.name!r} ({spec.path}): row 0 has no {spec.text_field!r} field "
                                  f"(fields: {sorted(first)}); set text_field")
    out = Path(cfg.output_dir)
    if not cfg.report_only and (any(out.glob("*.parquet")) or (out / "_work").exists()):
        raise FileExistsError(f"output_dir {out} already holds curated shards; choose a new output_dir "
                              "(curation never overwrites)")
    return specs


# --- the pipelines -----------------------------------------------------------------------------------

def minhash_config(fields: dict):
    """datatrove's MinhashConfig from the recipe's `minhash` mapping. `norm_numbers: false` keeps digits
    (datatrove replaces every number with 0 before shingling, which makes documents that differ only in
    their numbers, like generated arithmetic, near-duplicates)."""
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.utils.hashing import HashConfig
    from datatrove.utils.text import TextNormConfig

    fields = dict(fields)
    norm = TextNormConfig(norm_numbers=fields.pop("norm_numbers", True))
    # sha1 shingle hashes, 64-bit (FineWeb's setting): datatrove's xxhash path hands str to xxhash, which
    # xxhash 4 refuses ("Strings must be encoded before hashing").
    return MinhashConfig(**fields, norm_config=norm, hash_config=HashConfig(hash_fc="sha1", precision=64))


def build_stages(cfg: CurateConfig, specs: list[SourceSpec], prompts: list[str]) -> list[tuple[str, list, int]]:
    """(stage name, datatrove pipeline, tasks) in the order they must run."""
    from datatrove.pipeline import filters as datatrove_filters
    from datatrove.pipeline.dedup import (MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter,
                                          MinhashDedupSignature)
    from datatrove.pipeline.dedup.exact_dedup import (ExactDedupConfig, ExactDedupFilter, ExactDedupSignature,
                                                      ExactFindDedups)
    from datatrove.pipeline.readers import ParquetReader
    from datatrove.pipeline.writers import ParquetWriter

    work = Path(cfg.output_dir).resolve() / "_work"

    def removed(step: str):
        return ParquetWriter(str(work / "removed" / step), output_filename="${source}/${rank}.parquet")

    stages = []
    for spec in specs:
        steps: list = [SourceReader(spec)]
        for name in (cfg.filters if spec.filters is None else spec.filters):
            cls = getattr(datatrove_filters, QUALITY_FILTERS[name])
            steps.append(cls(**cfg.filter_params.get(name, {}), exclusion_writer=removed(name)))
        if prompts:
            steps.append(DecontaminationFilter(prompts, cfg.decontamination_ngram, exclusion_writer=removed("decontamination")))
        steps.append(ParquetWriter(str(work / "filtered"), output_filename=f"{spec.name}_" + "${rank}.parquet"))
        stages.append((f"filter_{spec.name}", steps, cfg.tasks))

    current = work / "filtered"
    if cfg.exact_dedup:
        exact = ExactDedupConfig(content_getter=normalized_text)
        stages.append(("exact_signatures", [ParquetReader(str(current)),
                                            ExactDedupSignature(str(work / "exact_sigs"), config=exact)], cfg.tasks))
        stages.append(("exact_find", [ExactFindDedups(str(work / "exact_sigs"), str(work / "exact_dups"), config=exact)], 1))
        stages.append(("exact_filter", [ParquetReader(str(current)),
                                        ExactDedupFilter(str(work / "exact_dups"), config=exact,
                                                         exclusion_writer=removed("exact_dedup")),
                                        ParquetWriter(str(work / "exact"))], cfg.tasks))
        current = work / "exact"
    minhash = minhash_config(cfg.minhash)
    final: list = [ParquetReader(str(current))]
    if cfg.minhash_dedup:
        stages.append(("minhash_signatures", [ParquetReader(str(current)),
                                              MinhashDedupSignature(str(work / "mh_sigs"), config=minhash)], cfg.tasks))
        stages.append(("minhash_buckets", [MinhashDedupBuckets(str(work / "mh_sigs"), str(work / "mh_buckets"),
                                                               config=minhash)], minhash.num_buckets))
        stages.append(("minhash_cluster", [MinhashDedupCluster(str(work / "mh_buckets"), str(work / "mh_remove"),
                                                               config=minhash, save_cluster_size=True)], 1))
        final.append(MinhashDedupFilter(str(work / "mh_remove"), load_cluster_sizes=True,  # for the report
                                        exclusion_writer=removed("minhash_dedup")))
    if cfg.pii:
        final.append(PIIScrubber(ParquetWriter(str(work / "pii"), output_filename="${source}/${rank}.parquet")))
    final.append(ParquetWriter(str(work / "curated"), output_filename="${source}/${rank}.parquet", adapter=curated_row))
    stages.append(("write", final, cfg.tasks))
    return stages


def run_stages(cfg: CurateConfig, stages: list[tuple[str, list, int]]) -> None:
    logs = Path(cfg.output_dir).resolve() / "_work" / "logs"
    previous = None
    for name, pipeline, tasks in stages:
        if cfg.executor == "local":
            from datatrove.executor import LocalPipelineExecutor

            # fork, not datatrove's default forkserver: a forkserver worker imports this module again, and
            # with it torch and transformers (core/__init__.py), for every stage: about 9 s per stage on
            # these CPUs, 5x slower overall with 2 workers than with 1 (bench/curate_throughput.py).
            executor = LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=min(cfg.workers, tasks),
                                             logging_dir=str(logs / name), start_method="fork")
            start = time.perf_counter()
            executor.run()
            print(f"[curate] {name}: {tasks} tasks, {time.perf_counter() - start:.1f} s", flush=True)
        else:
            from datatrove.executor import SlurmPipelineExecutor

            previous = SlurmPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=cfg.workers,
                                             logging_dir=str(logs / name), depends=previous,
                                             job_name=f"curate_{name}", **cfg.slurm)
    if previous is not None:
        previous.run()  # submits the whole chain (each executor launches what it depends on first)


# --- merge and report --------------------------------------------------------------------------------

def read_parquet(paths) -> list[dict]:
    import pyarrow.parquet as pq

    return [row for path in sorted(paths) for row in pq.read_table(path).to_pylist()]


def merge_shards(cfg: CurateConfig, specs: list[SourceSpec]) -> dict[str, list[dict]]:
    """`_work/curated/<source>/*.parquet` -> `<output_dir>/<source>.parquet`, the file a recipe source names."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(cfg.output_dir)
    kept = {}
    for spec in specs:
        rows = read_parquet((out / "_work" / "curated" / spec.name).glob("*.parquet"))
        rows.sort(key=lambda r: int(r["id"].rsplit("/", 1)[1]))  # source order, whatever the task count
        table = pa.table({"text": [r["text"] for r in rows], "id": [r["id"] for r in rows],
                          "source": [r["source"] for r in rows]})
        tmp = out / f".{spec.name}.parquet.tmp"
        pq.write_table(table, tmp)
        tmp.rename(out / f"{spec.name}.parquet")  # written whole, then renamed: never a half file
        kept[spec.name] = rows
    return kept


def write_report(cfg: CurateConfig, specs: list[SourceSpec], kept: dict[str, list[dict]]) -> dict:
    """report.json / report.md / funnel.png: per source, documents and tokens left after each step.

    Every document read is either in the output or in exactly one step's removed files, so the counts
    are taken from those files: `read` is their sum. Tokens are counted on the text as each document
    left the pipeline (C4's filter drops lines it judges boilerplate from the documents it keeps)."""
    out = Path(cfg.output_dir)
    work = out / "_work"
    count = _token_counter(cfg.tokenizer_name_or_path)
    unit = "tokens" if cfg.tokenizer_name_or_path else "words"
    report = {"unit": unit, "sources": {}}
    for spec in specs:
        steps = [*(cfg.filters if spec.filters is None else spec.filters), *STEPS_REMOVING]
        removed = {step: read_parquet((work / "removed" / step / spec.name).glob("*.parquet")) for step in steps}
        out_docs = kept[spec.name]
        total_docs = len(out_docs) + sum(len(r) for r in removed.values())
        total_tokens = sum(count(r["text"]) for r in out_docs) + sum(count(d["text"]) for r in removed.values() for d in r)
        funnel, docs, tokens = [{"step": "read", "documents": total_docs, unit: total_tokens}], total_docs, total_tokens
        examples = {}
        for step in steps:
            docs -= len(removed[step])
            tokens -= sum(count(d["text"]) for d in removed[step])
            funnel.append({"step": step, "documents": docs, unit: tokens, "removed": len(removed[step])})
            examples[step] = [{"id": d["id"], "reason": d.get("metadata", {}).get("filter_reason"),
                               "text": d["text"][:300]} for d in removed[step][:cfg.examples_per_step]]
        pii = read_parquet((work / "pii" / spec.name).glob("*.parquet"))
        # Near-duplicate clusters by size, from their removed members (a cluster of size s loses s - 1):
        # datatrove 0.10.1 did not load the size onto a kept member whose cluster spans two tasks.
        members: dict[int, int] = {}
        for doc in removed["minhash_dedup"]:
            size = doc["metadata"]["minhash_cluster_size"]
            members[size] = members.get(size, 0) + 1
        sizes = {size: n // (size - 1) for size, n in members.items()}
        report["sources"][spec.name] = {
            "funnel": funnel, "removed_examples": examples,
            "pii_scrubbed": len(pii),
            "pii_examples": [_changed_window(d["id"], d["text"], d["metadata"]["scrubbed"]) for d in pii[:cfg.examples_per_step]],
            "minhash_cluster_sizes": {str(k): v for k, v in sorted(sizes.items())},
            "output": str(out / f"{spec.name}.parquet"),
        }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(_markdown(report))
    _plot_funnel(report, out / "funnel.png")
    return report


def _changed_window(doc_id: str, before: str, after: str, width: int = 80) -> dict:
    """The text around the first replacement, before and after scrubbing."""
    first = next((i for i, (a, b) in enumerate(zip(before, after)) if a != b), 0)
    start = max(0, first - width)
    return {"id": doc_id, "before": before[start:first + width], "after": after[start:first + width]}


def _token_counter(tokenizer_name_or_path: str | None):
    if tokenizer_name_or_path is None:
        return lambda text: len(text.split())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_name_or_path)
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _markdown(report: dict) -> str:
    unit = report["unit"]
    lines = ["# Curation report", ""]
    for name, src in report["sources"].items():
        lines += [f"## {name}", "", f"| step | documents | {unit} | removed |", "|---|---|---|---|"]
        lines += [f"| {f['step']} | {f['documents']} | {f[unit]} | {f.get('removed', '')} |" for f in src["funnel"]]
        lines += ["", f"PII scrubbed in {src['pii_scrubbed']} documents. Near-duplicate clusters "
                      f"(size: count): {src['minhash_cluster_sizes'] or 'none'}.", ""]
        for step, examples in src["removed_examples"].items():
            for ex in examples:
                text = ex["text"].replace("\n", " ")[:160]
                lines.append(f"- {step} removed `{ex['id']}` ({ex['reason'] or 'duplicate'}): {text}")
        for ex in src["pii_examples"]:
            lines.append(f"- PII: `{ex['id']}`: {ex['before']!r} -> {ex['after']!r}")
        lines.append("")
    return "\n".join(lines)


def _plot_funnel(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = report["sources"]
    fig, axes = plt.subplots(1, len(sources), figsize=(5 * len(sources), 4), squeeze=False)
    for ax, (name, src) in zip(axes[0], sources.items()):
        steps = [f["step"] for f in src["funnel"]]
        ax.barh(range(len(steps)), [f["documents"] for f in src["funnel"]])
        ax.set_yticks(range(len(steps)), steps, fontsize=8)
        ax.invert_yaxis()
        ax.set(title=f"{name}: documents after each step", xlabel="documents")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def curate(cfg: CurateConfig) -> dict:
    specs = check_config(cfg)
    prompts = evaluation_prompts(cfg.decontaminate_against)
    if not cfg.report_only:
        work = Path(cfg.output_dir) / "_work"
        work.mkdir(parents=True)
        stages = build_stages(cfg, specs, prompts)
        run_stages(cfg, stages)
        if cfg.executor == "slurm":
            print(f"[curate] submitted {len(stages)} Slurm stages; when they finish run the same command with "
                  "--report_only true", flush=True)
            return {}
    report = write_report(cfg, specs, merge_shards(cfg, specs))
    print(_markdown(report), flush=True)
    return report


def main(argv: list[str] | None = None) -> dict:
    from core.lifecycle import stage_main

    return stage_main(CurateConfig, curate, argv)


if __name__ == "__main__":
    main()
