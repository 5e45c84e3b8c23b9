"""pretrain.curate on built-in prose with planted faults: each fault is removed by the step meant for it.

Clean documents are 6 consecutive `builtin:prose` paragraphs each, kept only if every quality filter
at the recipe's thresholds accepts them on its own: the quality filters' verdict on a single document
is theirs to make; what this test measures on the clean ones is what the whole pipeline (dedup across
documents, decontamination, PII) removes by mistake. Every run uses one worker process: datatrove's
process pool costs about 9 s of start-up per stage on these CPUs, more than the work itself.
"""

import json

import pytest
from datatrove.data import Document
from datatrove.pipeline import filters as datatrove_filters

from core.decontaminate import NGramIndex, decontaminate_rows
from rewards.suites import evaluation_prompts
from core.sources import QUALITY_FILTERS, SourceSpec, iter_rows
from pretrain.curate import CurateConfig, curate

N_CLEAN, N_PLANT = 40, 5
FILTER_PARAMS = {"gopher_quality": {"max_non_alpha_words_ratio": 0.6}}
EMAIL, IP = "jane.doe@university.edu", "93.184.216.34"


def screened_clean_docs(n: int) -> list[str]:
    paragraphs = [r["text"] for r in iter_rows(SourceSpec(path="builtin:prose"))]
    filters = [getattr(datatrove_filters, QUALITY_FILTERS[name])(**FILTER_PARAMS.get(name, {}))
               for name in QUALITY_FILTERS]
    docs = []
    for start in range(0, len(paragraphs) - 6, 6):
        text = "\n".join(paragraphs[start:start + 6])
        verdicts = [f.filter(Document(text=text, id=str(start))) for f in filters]
        if all(v is True or (isinstance(v, tuple) and v[0]) for v in verdicts):
            docs.append(text)
        if len(docs) == n:
            return docs
    raise AssertionError(f"only {len(docs)} clean prose documents")


def change_words(text: str, k: int) -> str:
    words = text.split(" ")
    for i in range(k):
        position = (i + 1) * len(words) // (k + 1)
        words[position] = f"changed{i}"
    return " ".join(words)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Run the curation once on the planted corpus; (rows written, report, kinds by id, output dir)."""
    docs = screened_clean_docs(N_CLEAN + 2 * N_PLANT)
    clean, spare = docs[:N_CLEAN], docs[N_CLEAN:]
    test_prompts = evaluation_prompts([{"suite": "arithmetic", "split": "test"}])
    kinds = ["clean"] * N_CLEAN
    texts = list(clean)
    for i in range(N_PLANT):
        texts.append("  " + clean[i].replace(" ", "  ") + "\n")  # same words, other whitespace
        kinds.append("exact_duplicate")
        texts.append(change_words(clean[N_PLANT + i], 3))
        kinds.append("near_duplicate")
        texts.append("\n".join(["Buy the best cheap watches online today."] * 40))
        kinds.append("repetition")
        texts.append("Home\nAbout\nShop\nContact\nLogin\nLorem ipsum dolor sit amet, consectetur adipiscing elit.\n"
                     "Privacy Policy\nTerms of Use\nCookie settings\nSitemap")
        kinds.append("boilerplate")
        texts.append(spare[i] + f"\nWrite to {EMAIL} or reach the mirror at {IP} for questions.")
        kinds.append("pii")
        texts.append(spare[N_PLANT + i] + f"\nExercise: {test_prompts[i]} Answer it before reading on.")
        kinds.append("eval_copy")
    root = tmp_path_factory.mktemp("curate")
    corpus = root / "planted.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cfg = CurateConfig(output_dir=str(root / "out"), sources=[{"name": "planted", "path": str(corpus)}],
                       filter_params=FILTER_PARAMS, tasks=2, workers=1)
    report = curate(cfg)
    import pyarrow.parquet as pq

    rows = pq.read_table(root / "out" / "planted.parquet").to_pylist()
    by_id = {f"planted/{i}": kind for i, kind in enumerate(kinds)}
    return rows, report, by_id, root / "out"


def removed_ids(out, step):
    import pyarrow.parquet as pq

    return {r["id"] for path in (out / "_work" / "removed" / step / "planted").glob("*.parquet")
            for r in pq.read_table(path).to_pylist()}


QUALITY = ("gopher_repetition", "gopher_quality", "c4_quality", "fineweb_quality")


def test_each_planted_fault_is_removed_by_its_step(planted):
    rows, report, kinds, out = planted
    removed = {step: removed_ids(out, step) for step in (*QUALITY, "decontamination", "exact_dedup", "minhash_dedup")}

    def count(kind, steps):
        return sum(1 for step in steps for i in removed[step] if kinds[i] == kind)

    caught = {"exact_duplicate": count("exact_duplicate", ["exact_dedup"]) + count("clean", ["exact_dedup"]),
              "near_duplicate": count("near_duplicate", ["minhash_dedup"]) + count("clean", ["minhash_dedup"]),
              "repetition": count("repetition", ["gopher_repetition"]),
              "boilerplate": count("boilerplate", QUALITY),
              "eval_copy": count("eval_copy", ["decontamination"])}
    pii_docs = [r for r in rows if kinds[r["id"]] == "pii"]
    caught["pii (scrubbed, kept)"] = sum(EMAIL not in r["text"] and IP not in r["text"] for r in pii_docs)
    for kind, n in caught.items():
        print(f"{kind:24s} planted {N_PLANT}  caught by its step {n}")
    # A duplicate pair loses one member: the planted copy or its clean original, whichever datatrove keeps.
    assert caught == {k: N_PLANT for k in caught}, caught
    assert report["sources"]["planted"]["pii_scrubbed"] == N_PLANT
    # Each duplicate pair's text survives once: what was removed was the duplicate, not content.
    kept_text = {" ".join(r["text"].split()) for r in rows}
    clean_lost = [i for i, k in kinds.items() if k == "clean" and i not in {r["id"] for r in rows}]
    duplicated_clean = {f"planted/{i}" for i in range(2 * N_PLANT)}  # originals of the planted copies
    false_removals = [i for i in clean_lost if i not in duplicated_clean]
    rate = len(false_removals) / (N_CLEAN - 2 * N_PLANT)
    print(f"false-removal rate of clean documents: {len(false_removals)}/{N_CLEAN - 2 * N_PLANT} = {rate:.1%}")
    assert rate <= 0.05
    assert len(kept_text) == len(rows)  # no exact duplicate left


def test_report_funnel_adds_up_and_has_examples(planted):
    rows, report, kinds, out = planted
    src = report["sources"]["planted"]
    funnel = src["funnel"]
    assert funnel[0]["documents"] == len(kinds)
    assert funnel[-1]["documents"] == len(rows)
    assert funnel[0]["documents"] - sum(f.get("removed", 0) for f in funnel) == len(rows)
    assert src["removed_examples"]["decontamination"][0]["reason"].startswith("contains evaluation prompt")
    assert src["minhash_cluster_sizes"] == {"2": N_PLANT}
    assert (out / "funnel.png").stat().st_size > 0 and (out / "report.md").read_text().startswith("# Curation")


def test_curated_shards_load_with_the_pretraining_loader(planted, tmp_path):
    from pretrain.data import PackedSource, pack_source
    from pretrain.tokenizer import sample_sources, train_tokenizer

    rows, _, _, out = planted

    tokenizer = train_tokenizer(sample_sources([{"name": "prose", "path": "builtin:prose"}], 200), 300)
    spec = SourceSpec.from_dict({"name": "curated", "path": str(out / "planted.parquet")}, 0)
    packed = PackedSource("curated", pack_source(spec, tokenizer, 32, tmp_path), validation_rows=2)
    assert packed.meta["documents"] == len(rows)
    assert packed.n_train > 0


def test_bad_input_fails_before_any_work(tmp_path, planted):
    from pretrain.curate import check_config

    good = {"name": "p", "path": "builtin:prose", "max_rows": 10}
    cases = [({"filters": ["gopher_qualty"]}, "gopher_qualty"),
             ({"filter_params": {"c4_quality": {"min_sentences": 3}}}, "min_sentences"),
             ({"sources": [{"path": str(tmp_path / "missing.jsonl")}]}, "missing.jsonl"),
             ({"minhash": {"buckets": 3}}, "buckets"),
             ({"executor": "slurm", "slurm": {"partition": "cpu", "time": "1:00:00", "gpus": 1}}, "gpus"),
             ({"output_dir": str(planted[3])}, "already holds curated shards")]
    for change, named in cases:
        cfg = CurateConfig(**{"output_dir": str(tmp_path / "o"), "sources": [good], **change})
        with pytest.raises((ValueError, FileExistsError)) as error:
            check_config(cfg)
        assert named in str(error.value)
        assert not (tmp_path / "o").exists()


def test_sft_data_of_the_tiny_recipe_loses_no_row_and_an_eval_prompt_is_dropped():
    from core.sources import load_rows

    index = NGramIndex(evaluation_prompts([{"suite": "arithmetic", "split": "test"}]))
    train = load_rows(SourceSpec(path="builtin:arithmetic_chat", split="train"))
    kept, _, dropped = decontaminate_rows(train, index, "sft")
    assert dropped == 0 and len(kept) == len(train)
    test = load_rows(SourceSpec(path="builtin:arithmetic_chat", split="test"))
    _, _, dropped = decontaminate_rows(test, index, "sft")
    assert dropped == len(test)
    long_prompt = "natalia sold clips to 48 of her friends in april and then half as many in may"
    assert NGramIndex([long_prompt]).match("Q: Natalia sold clips to 48 of her friends in April, then") is not None
    assert NGramIndex([long_prompt]).match("natalia sold clips to 48 of her cousins") is None
