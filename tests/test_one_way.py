"""Issue 10 ("one way to do each thing") and the data-identity fixes of issue 11: one definition of
each shared piece, HF field names with pointers from the old ones, short named loop steps."""

import ast
import json
import re
from pathlib import Path

import pytest

from core.metrics import MetricsWriter, read_metrics
from core.recipe import RecipeError, parse_recipe
from core.sources import DataSourceError, SourceSpec, content_fingerprint, data_identity, load_rows
from conftest import REPO

PACKAGES = ["core", "pretrain", "sft", "rewards", "chat_templates", "rl", "preference", "distill"]


def definitions(pattern: str) -> list[str]:
    found = []
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if re.match(pattern, line):
                    found.append(f"{path.relative_to(REPO)}:{number}")
    return found


@pytest.mark.parametrize("pattern", [
    r"class SourceSpec\b", r"class MetricsWriter\b", r"def kill_if\b", r"def fault\b",
    r"def generate_transformers\b", r"def question\b", r"def redacted\b", r"class \w*Metrics\w*Callback\b",
    r"LOCAL_FORMATS = ", r"def is_secret\b", r"class AlertLog\b", r"def truncate_after\b",
    r"\w*SOURCE_KEYS = ", r"def _?help\w*\(", r"\s+use_peft: ",
])
def test_one_definition_of_each_shared_piece(pattern):
    assert len(definitions(pattern)) == 1, definitions(pattern)


def test_pretraining_loop_reads_as_named_steps():
    for path in (REPO / "pretrain").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef):
                length = node.end_lineno - node.lineno + 1
                limit = 80 if (path.name, node.name) == ("train.py", "run") else 60
                assert length < limit, f"{path.name}:{node.name} is {length} lines"


@pytest.mark.parametrize("old, new", [
    ("per_device_batch_size: 4", "per_device_train_batch_size"), ("lr_scheduler: wsd", "lr_scheduler_type"),
    ("decay_steps: 3", "lr_scheduler_kwargs.num_decay_steps"), ("decay_type: linear", "lr_scheduler_kwargs.decay_type"),
    ("min_lr_ratio: 0.1", "lr_scheduler_kwargs.min_lr_ratio"), ("mixed_precision: bf16", "bf16"),
    ("seq_len: 64", "max_length"), ("resume: true", "resume_from_checkpoint"),
])
def test_old_pretraining_names_point_to_the_new_ones(tmp_path, old, new):
    from pretrain.config import PretrainConfig

    path = tmp_path / "old.yaml"
    path.write_text(old + "\n")
    with pytest.raises(RecipeError, match=f"did you mean {new!r}"):
        parse_recipe(PretrainConfig, args=["--config", str(path)])


def test_evaluate_and_export_take_hf_names_and_need_an_output_dir():
    from core.export import ExportConfig
    from rewards.config import EvaluateConfig

    with pytest.raises(RecipeError, match="did you mean 'model_name_or_path'"):
        parse_recipe(EvaluateConfig, args=["--model", "a", "--output_dir", "x"])
    with pytest.raises(RecipeError, match="output_dir"):  # required: no cwd-relative default
        parse_recipe(EvaluateConfig, args=["--model_name_or_path", "a"])
    (cfg,) = parse_recipe(ExportConfig, args=["--model_name_or_path", "a", "--output_dir", "b"])
    assert (cfg.model_name_or_path, cfg.output_dir) == ("a", "b")


def test_sft_rejects_options_that_would_do_nothing(tmp_path):
    """Issue 11: TRL's chat_template_path would silently replace chat_template."""
    from sft.config import SFTConfig

    with pytest.raises(ValueError, match="chat_template_path.*set chat_template instead"):
        SFTConfig(output_dir=str(tmp_path), chat_template_path="my.jinja")
    with pytest.raises(RecipeError, match="did you mean 'resume_from_checkpoint'"):
        parse_recipe(SFTConfig, args=["--resume", "true"])


def test_one_source_key_set_with_stage_specific_keys_refused():
    from core.sources import ROW_SOURCE_KEYS as SOURCE_KEYS

    with pytest.raises(DataSourceError, match=r"unknown keys \['max_documents'\]; did you mean 'max_rows'"):
        SourceSpec.from_dict({"path": "builtin:arithmetic", "max_documents": 3}, 0)
    with pytest.raises(DataSourceError, match="key 'weight' is not used by this stage's sources"):
        SourceSpec.from_dict({"path": "builtin:arithmetic_chat", "weight": 2.0}, 0, keys=SOURCE_KEYS)
    with pytest.raises(DataSourceError, match="'subset' is a Hugging Face dataset configuration"):
        SourceSpec.from_dict({"path": "builtin:arithmetic_chat", "subset": "all"}, 0)
    chats = load_rows(SourceSpec.from_dict({"path": "builtin:arithmetic_chat", "max_rows": 5}, 0, keys=SOURCE_KEYS))
    assert len(chats) == 5 and chats[0]["messages"][0]["role"] == "user"
    assert SourceSpec(path="hf:HuggingFaceTB/smoltalk").name == "smoltalk"


def test_data_identity_follows_content_not_weight(tmp_path):
    """Issue 11: the cache key and data_fingerprint hashed the spec, so an edited file reused a
    stale cache, and changing only the weight re-tokenised."""
    data = tmp_path / "docs.jsonl"
    data.write_text(json.dumps({"text": "one"}) + "\n")
    spec = SourceSpec(path=str(data), name="docs")
    before = data_identity(spec)
    assert data_identity(SourceSpec(path=str(data), name="docs", weight=5.0)) == before
    data.write_text(json.dumps({"text": "two"}) + "\n")  # same size, other bytes
    assert content_fingerprint(spec) != before["content"] and data_identity(spec) != before


def test_edited_source_is_re_tokenised(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    from pretrain.data import pack_source

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    data = tmp_path / "docs.txt"
    data.write_text("\n".join(f"document number {i} with some words" for i in range(40)))
    first = pack_source(SourceSpec(path=str(data), name="docs"), tokenizer, 16, tmp_path / "cache")
    assert pack_source(SourceSpec(path=str(data), name="docs", weight=3.0), tokenizer, 16, tmp_path / "cache") == first
    data.write_text("\n".join(f"another text {i} entirely different" for i in range(40)))
    assert pack_source(SourceSpec(path=str(data), name="docs"), tokenizer, 16, tmp_path / "cache") != first


def test_tokenizer_trains_on_every_sampled_document():
    """Issue 11: zip(*sources) cut every source to the shortest one."""
    from pretrain.tokenizer import interleave

    docs = interleave({"long": [f"l{i}" for i in range(10)], "short": ["s0", "s1"]})
    assert len(docs) == 12 and docs[:4] == ["l0", "s0", "l1", "s1"]


def test_metrics_continue_after_resume_without_duplicates(tmp_path):
    writer = MetricsWriter(tmp_path)
    for step in range(1, 6):
        writer.write(step, {"loss": float(step)})
    resumed = MetricsWriter(tmp_path, resume_step=3)  # killed after logging 5, resumed from checkpoint 3
    for step in range(4, 7):
        resumed.write(step, {"loss": float(step)})
    assert [row["step"] for row in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]


def test_sft_model_init_kwargs_reach_from_pretrained(tmp_path):
    """Issue 11: TRL's model_init_kwargs were ignored (the stage loads the model itself)."""
    import torch

    from conftest import tiny_model
    from sft.config import SFTConfig
    from core.lifecycle import load_policy

    tiny_model().save_pretrained(tmp_path / "base")
    cfg = SFTConfig(output_dir=str(tmp_path / "out"), model_name_or_path=str(tmp_path / "base"),
                    model_init_kwargs={"attn_implementation": "eager", "dtype": "bfloat16"})

    class Tokenizer:  # only its length is read
        def __len__(self):
            return 8

    model = load_policy(cfg, Tokenizer())
    assert model.config._attn_implementation == "eager" and next(model.parameters()).dtype == torch.bfloat16


def project_imports() -> dict[str, set[str]]:
    """module -> the project modules it imports, at the top or inside a function alike."""
    modules = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for module, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            else:
                continue
            for name in names:
                while name and name not in modules:  # `from core.recipe import redacted` -> core.recipe
                    name = name.rpartition(".")[0]
                if name and name != module:
                    imported.add(name)
        graph[module] = imported
    return graph


def test_no_import_cycles_between_project_modules():
    """Issue 30: core/report.py imported input_stage from core/pipeline.py, which imports write_report (inside a
    function, to dodge the circle). Dependencies go one way."""
    graph = project_imports()
    assert "core.report" in graph["core.pipeline"]  # the scan sees imports (not a vacuous pass)

    def cycle_through(start: str) -> list[str] | None:
        stack, seen = [[start]], set()
        while stack:
            path = stack.pop()
            for imported in sorted(graph[path[-1]]):
                if imported == start:
                    return [*path, start]
                if imported not in seen:
                    seen.add(imported)
                    stack.append([*path, imported])
        return None

    cycles = [cycle for module in sorted(graph) if (cycle := cycle_through(module))]
    assert not cycles, cycles


TRL_STAGES = ["sft/train.py", "preference/train.py", "rl/train.py", "rl/reward_model.py", "distill/train.py"]


@pytest.mark.parametrize("path", TRL_STAGES)
def test_each_trl_stage_goes_through_the_one_lifecycle_in_a_short_run(path):
    """Issue 29: recipe -> data -> trainer -> train -> finish, each step core/lifecycle.py's; run() at most 40 lines."""
    source = (REPO / path).read_text()
    (run,) = [node for node in ast.parse(source).body if isinstance(node, ast.FunctionDef) and node.name == "run"]
    assert run.end_lineno - run.lineno + 1 <= 40, f"{path}: run() is {run.end_lineno - run.lineno + 1} lines"
    for step in ("preflight(", "load_policy(", "stage_callbacks(", "begin(", "finish("):
        assert step in source, f"{path} does not call core.lifecycle's {step[:-1]}"
    for private_copy in ("save_checkpoint(", "trainer_resume_point(", "get_state_dict(", "merge_and_unload(",
                         "copy.deepcopy(", "MetricsCallback(", "from_pretrained(cfg.model_name_or_path"):
        assert private_copy not in source, f"{path} does {private_copy[:-1]} itself instead of core/lifecycle.py"
