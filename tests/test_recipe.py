"""Tests for core/recipe.py: YAML + command-line parsing into config dataclasses."""

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml
from trl import SFTConfig

from conftest import REPO
from core.recipe import RecipeError, parse_recipe, resolved_recipe


@dataclass
class ModelArgs:
    model_name_or_path: str = field(metadata={"help": "Checkpoint to start from."})
    dtype: Literal["float32", "bfloat16"] = field(default="float32", metadata={"help": "Weights dtype."})
    attention_dropout: float | None = field(default=None, metadata={"help": "Optional override."})


@dataclass
class TrainArgs:
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate."})
    max_steps: int = field(default=10, metadata={"help": "Optimizer steps."})
    packing: bool = field(default=False, metadata={"help": "Pack documents."})
    eval_steps: list[int] = field(default_factory=lambda: [5], metadata={"help": "Steps to evaluate at."})
    run_name: str = field(default="run", metadata={"help": "Name of the run."})
    model_kwargs: dict | None = field(default=None, metadata={"help": "Passed to from_pretrained."})


def write_recipe(tmp_path, content: dict | list | str, name: str = "recipe.yaml") -> str:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return str(path)


def test_yaml_sets_fields_and_converts_types(tmp_path):
    recipe = write_recipe(
        tmp_path,
        "model_name_or_path: runs/pretrain\n"
        "dtype: bfloat16\n"
        "attention_dropout: 0.1\n"
        "learning_rate: 3e-4\n"  # PyYAML reads this as the *string* '3e-4' (YAML 1.1)
        "max_steps: 20\n"
        "packing: true\n"
        "eval_steps: [2, 4]\n"
        "model_kwargs: {low_cpu_mem_usage: true}\n",
    )
    model_args, train_args = parse_recipe(ModelArgs, TrainArgs, args=["--config", recipe])

    assert model_args == ModelArgs("runs/pretrain", "bfloat16", 0.1)
    assert train_args.learning_rate == 3e-4 and isinstance(train_args.learning_rate, float)
    assert train_args.max_steps == 20
    assert train_args.packing is True
    assert train_args.eval_steps == [2, 4]
    assert train_args.model_kwargs == {"low_cpu_mem_usage": True}
    assert train_args.run_name == "run"  # untouched default


def test_command_line_overrides_yaml_and_yaml_overrides_defaults(tmp_path):
    recipe = write_recipe(tmp_path, {"model_name_or_path": "a", "max_steps": 20, "learning_rate": 0.5})
    _, train_args = parse_recipe(
        ModelArgs, TrainArgs, args=["--max_steps", "7", "--config", recipe, "--packing", "--eval_steps", "1", "3"]
    )
    assert train_args.max_steps == 7  # flag beats YAML, wherever --config sits
    assert train_args.learning_rate == 0.5  # YAML beats default
    assert train_args.packing is True  # bare bool flag
    assert train_args.eval_steps == [1, 3]


def test_command_line_only_and_config_equals_form(tmp_path):
    (model_args,) = parse_recipe(ModelArgs, args=["--model_name_or_path", "x", "--dtype", "bfloat16"])
    assert model_args.model_name_or_path == "x" and model_args.dtype == "bfloat16"

    recipe = write_recipe(tmp_path, {"model_name_or_path": "y"})
    (model_args,) = parse_recipe(ModelArgs, args=[f"--config={recipe}"])
    assert model_args.model_name_or_path == "y"


def test_unknown_yaml_key_names_key_file_and_closest_field(tmp_path):
    recipe = write_recipe(tmp_path, {"model_name_or_path": "a", "learning_rat": 0.1})
    with pytest.raises(RecipeError) as error:
        parse_recipe(ModelArgs, TrainArgs, args=["--config", recipe])
    assert str(error.value) == f"unknown key 'learning_rat' in {recipe}; did you mean 'learning_rate'?"


def test_unknown_command_line_flag_names_key_and_closest_field(tmp_path):
    # 'learning_rat' is also a prefix of 'learning_rate': argparse would accept it silently
    # if prefix matching were on.
    with pytest.raises(RecipeError, match=r"'--learning_rat'.*did you mean 'learning_rate'\?"):
        parse_recipe(ModelArgs, TrainArgs, args=["--model_name_or_path", "a", "--learning_rat", "0.1"])
    with pytest.raises(RecipeError, match=r"'--max-stpes=3'.*did you mean 'max_steps'\?"):
        parse_recipe(ModelArgs, TrainArgs, args=["--model_name_or_path", "a", "--max-stpes=3"])
    with pytest.raises(RecipeError, match="unexpected command-line argument 'stray'"):
        parse_recipe(ModelArgs, TrainArgs, args=["--model_name_or_path", "a", "stray"])


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("max_steps", "ten", "'max_steps' in .*'ten' is not a valid int"),
        ("max_steps", 1.5, "'max_steps' in .*1.5 is not a valid int"),
        ("max_steps", True, "'max_steps' in .*True is not a valid int"),
        ("learning_rate", {"peak": 1}, "'learning_rate' in .* is a mapping, but the field expects float"),
        ("run_name", ["a", "b"], "'run_name' in .* is a list, but the field expects str"),
        ("eval_steps", [1, "x"], "an item of 'eval_steps' in .*'x' is not a valid int"),
        ("packing", "maybe", "'packing' in .*'maybe' is not a valid bool"),
        ("dtype", "float16", "'dtype' in .*'float16' is not one of 'float32', 'bfloat16'"),
    ],
)
def test_badly_typed_yaml_value_names_key_and_file(tmp_path, key, value, expected):
    recipe = write_recipe(tmp_path, {"model_name_or_path": "a", key: value})
    with pytest.raises(RecipeError, match=expected) as error:
        parse_recipe(ModelArgs, TrainArgs, args=["--config", recipe])
    assert recipe in str(error.value)


def test_badly_typed_flag_and_missing_required_field_raise_naming_the_field():
    with pytest.raises(RecipeError, match="--max_steps.*invalid int value: 'ten'"):
        parse_recipe(ModelArgs, TrainArgs, args=["--model_name_or_path", "a", "--max_steps", "ten"])
    with pytest.raises(RecipeError, match="required: --model_name_or_path"):
        parse_recipe(ModelArgs, TrainArgs, args=[])


def test_missing_or_non_mapping_recipe_file_names_the_file(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match=f"'{missing}' does not exist"):
        parse_recipe(ModelArgs, args=["--config", missing])

    as_list = write_recipe(tmp_path, ["model_name_or_path", "a"], "list.yaml")
    with pytest.raises(RecipeError, match=f"'{as_list}' must be a YAML mapping.*got list"):
        parse_recipe(ModelArgs, args=["--config", as_list])

    empty = write_recipe(tmp_path, "", "empty.yaml")
    with pytest.raises(RecipeError, match=f"'{empty}' must be a YAML mapping.*got NoneType"):
        parse_recipe(ModelArgs, args=["--config", empty])

    broken = write_recipe(tmp_path, "a: [1, 2\n", "broken.yaml")
    with pytest.raises(RecipeError, match=f"'{broken}' is not valid YAML"):
        parse_recipe(ModelArgs, args=["--config", broken])


def test_env_mapping_sets_environment_variables(tmp_path, monkeypatch):
    monkeypatch.delenv("SMOLFORGE_TEST_VAR", raising=False)
    recipe = write_recipe(tmp_path, {"model_name_or_path": "a", "env": {"SMOLFORGE_TEST_VAR": 3}})
    parse_recipe(ModelArgs, args=["--config", recipe])
    assert os.environ["SMOLFORGE_TEST_VAR"] == "3"
    monkeypatch.delenv("SMOLFORGE_TEST_VAR")


def test_sft_config_from_yaml_with_command_line_override(tmp_path):
    output_dir = str(tmp_path / "sft-out")
    recipe = write_recipe(
        tmp_path,
        f"output_dir: {output_dir}\n"
        "learning_rate: 1.0e-5\n"
        "max_length: 128\n"
        "lr_scheduler_type: cosine\n"
        "bf16: false\n"  # TRL defaults to bf16, which TrainingArguments rejects on a CPU
        "report_to: none\n"
        "model_init_kwargs: {dtype: float32}\n",
    )
    (config,) = parse_recipe(SFTConfig, args=["--config", recipe, "--learning_rate", "3e-4", "--packing"])

    assert isinstance(config, SFTConfig)
    assert config.learning_rate == 3e-4 and type(config.learning_rate) is float
    assert config.output_dir == output_dir
    assert config.max_length == 128 and type(config.max_length) is int
    assert config.packing is True
    assert config.lr_scheduler_type == "cosine"
    assert config.model_init_kwargs == {"dtype": "float32"}

    recipe_dict = resolved_recipe(config)
    assert recipe_dict["learning_rate"] == 3e-4
    assert recipe_dict["lr_scheduler_type"] == "cosine"
    # The recipe stored in stage.json, fed back with --config, gives the same configuration.
    stored = json.loads(json.dumps(recipe_dict))
    (reparsed,) = parse_recipe(SFTConfig, args=["--config", write_recipe(tmp_path, stored, "resolved.yaml")])
    assert resolved_recipe(reparsed) == recipe_dict


def test_resolved_recipe_is_flat_json_and_reparses_to_the_same_config(tmp_path):
    model_args, train_args = parse_recipe(
        ModelArgs, TrainArgs, args=["--model_name_or_path", "m", "--max_steps", "3", "--eval_steps", "1", "2"]
    )
    resolved = resolved_recipe(model_args, train_args)
    assert resolved == {
        "model_name_or_path": "m",
        "dtype": "float32",
        "attention_dropout": None,
        "learning_rate": 1e-3,
        "max_steps": 3,
        "packing": False,
        "eval_steps": [1, 2],
        "run_name": "run",
        "model_kwargs": None,
    }
    recipe = write_recipe(tmp_path, json.loads(json.dumps(resolved)))
    assert parse_recipe(ModelArgs, TrainArgs, args=["--config", recipe]) == (model_args, train_args)


def test_resolved_recipe_redacts_tokens():
    @dataclass
    class HubArgs:
        hub_token: str | None = None

    assert resolved_recipe(HubArgs("hf_secret")) == {"hub_token": "<redacted>"}
    assert resolved_recipe(HubArgs()) == {"hub_token": None}


def test_mapping_field_from_the_command_line(tmp_path):
    from pretrain.config import PretrainConfig

    (cfg,) = parse_recipe(PretrainConfig, args=["--model_overrides", "{qk_norm: true, hidden_size: 64}",
                                                "--alert_policies", '{"nan": "stop"}'])
    assert cfg.model_overrides == {"qk_norm": True, "hidden_size": 64}
    assert cfg.alert_policies == {"nan": "stop"}
    with pytest.raises(RecipeError, match="model_overrides"):
        parse_recipe(PretrainConfig, args=["--model_overrides", "[1, 2]"])


# --- every shipped recipe parses (issue 11: only sft.yaml was checked) ------------------------------

RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))


def recipe_stage(path: Path) -> str:
    """The module a recipe is for, from its first line: `# python -m <module> --config ...` (or
    `# accelerate launch --config_file ...` for an accelerate config)."""
    first = path.read_text().splitlines()[0]
    if first.startswith("# accelerate launch --config_file"):
        return "accelerate"
    match = re.match(r"# python -m ([\w.]+) --config", first)
    assert match, f"{path}: the first line must say how to run it (# python -m <module> --config {path.name})"
    return match.group(1)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_every_recipe_parses(path):
    stage = recipe_stage(path)
    if stage == "accelerate":
        from accelerate.commands.config.config_args import load_config_from_file

        config = load_config_from_file(str(path))
        assert config.num_processes >= 1
        return
    from core.export import ExportConfig
    from core.sources import SourceSpec
    from pretrain.config import PretrainConfig
    from pretrain.tokenizer import TokenizerConfig
    from rewards.config import EvaluateConfig
    from rl.config import GRPOConfig
    from rl.data import SOURCE_KEYS as RL_SOURCE_KEYS
    from sft.config import SFTConfig
    from sft.data import SOURCE_KEYS

    classes = {"pretrain": (PretrainConfig, None), "pretrain.tokenizer": (TokenizerConfig, None),
               "sft": (SFTConfig, SOURCE_KEYS), "rewards.evaluate": (EvaluateConfig, None),
               "core.export": (ExportConfig, None), "rl": (GRPOConfig, RL_SOURCE_KEYS)}
    assert stage in classes, f"{path}: no config class known for stage {stage!r}"
    config_class, source_keys = classes[stage]
    (config,) = parse_recipe(config_class, args=["--config", str(path)])
    for index, source in enumerate(vars(config).get("sources") or []):
        SourceSpec.from_dict(source, index, keys=source_keys)
