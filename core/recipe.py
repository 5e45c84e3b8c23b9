"""The one recipe parser every stage uses.

A stage is launched as

    python -m <stage> --config recipes/tiny/<stage>.yaml [--field value ...]

and its `__main__.py` does

    from core.recipe import parse_recipe, resolved_recipe
    model_args, training_args = parse_recipe(ModelArguments, SFTConfig)
    ...
    save_checkpoint(..., recipe=resolved_recipe(model_args, training_args))

YAML keys are the dataclass field names; command-line flags override the YAML; YAML values
override the dataclass defaults. As in TRL, an optional `env:` mapping in the YAML sets
environment variables before anything else runs.

Built on TRL's `TrlParser` (a `transformers.HfArgumentParser`), so bool flags, lists,
Optional, Literal choices and TRL's config dataclasses behave exactly as in TRL scripts. We
deviate from `TrlParser.parse_args_and_config` in four ways, all so that a mistake in a
recipe stops the run before training with a message naming the key at fault:
  - an unknown key (YAML or command line) raises `RecipeError` naming the key, the file and
    the closest valid field, instead of a bare list of leftover strings;
  - YAML values are checked against the field's type (TRL passes them through unchecked, so
    `max_steps: 1.5` or a mapping given for a float would reach the trainer);
  - argparse's prefix matching is off, so `--learning_rat 1e-3` is an unknown flag rather than
    a silent alias of `--learning_rate`;
  - argparse errors (bad value on the command line, missing required field) raise
    `RecipeError` instead of exiting the process, so callers and tests can catch them.
"""

import argparse
import dataclasses
import difflib
import enum
import os
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from trl import TrlParser


# Fields renamed to the Hugging Face / TRL word for the same thing (issue 10). An old recipe is told
# the new name instead of a generic "unknown key".
RENAMED_FIELDS = {
    "per_device_batch_size": "per_device_train_batch_size",
    "lr_scheduler": "lr_scheduler_type",
    "decay_steps": "lr_scheduler_kwargs.num_decay_steps",
    "decay_type": "lr_scheduler_kwargs.decay_type",
    "min_lr_ratio": "lr_scheduler_kwargs.min_lr_ratio",
    "mixed_precision": "bf16",
    "seq_len": "max_length",
    "resume": "resume_from_checkpoint",
    "model": "model_name_or_path",
    "output": "output_dir",
    # One name per idea across stages (issue 29): distillation's prompts are named as rl's.
    "prompt_suite": "suite",
    "prompt_split": "suite_split",
    "prompt_data_path": "suite_data_path",
}

# Fields whose values are credentials: never printed, never written to stage.json. One rule for
# every stage (TrainingArguments.to_dict hides `*_token` the same way, but a tokenizer's special
# tokens are recipe, not secrets). A substring test such as "key" would hide num_key_value_heads.
SPECIAL_TOKEN_FIELDS = {f"{kind}_token" for kind in ("pad", "eos", "bos", "unk", "sep", "cls", "mask")}


def is_secret(field_name: str) -> bool:
    name = field_name.lower()
    if name in SPECIAL_TOKEN_FIELDS:
        return False
    return name.endswith(("_token", "_secret", "_password", "api_key")) or name in ("token", "secret", "password")


def redacted(recipe: dict) -> dict:
    """`recipe` with credential values replaced by "<redacted>", in nested mappings too."""
    return {key: "<redacted>" if is_secret(str(key)) and value not in (None, "", [])
            else redacted(value) if isinstance(value, dict) else value
            for key, value in recipe.items()}


class RecipeError(ValueError):
    """A recipe (YAML file or command line) names an unknown key or gives a key a bad value."""


class RecipeParser(TrlParser):
    """`TrlParser` with strict, named errors for unknown keys and badly typed YAML values."""

    def __init__(self, dataclass_types: Sequence[type]):
        # allow_abbrev=False: argparse would otherwise accept any unambiguous prefix of a flag,
        # so a typo that happens to be a prefix would silently set another field.
        super().__init__(dataclass_types=list(dataclass_types), allow_abbrev=False)
        # The declared type of every field, as written in the dataclass. HfArgumentParser
        # rewrites `field.type` while building arguments (e.g. `dict | str | None` -> str), so
        # read the annotations here to know which fields really accept a mapping or a list.
        self.declared_types: dict[str, Any] = {}
        for dataclass_type in self.dataclass_types:
            hints = typing.get_type_hints(dataclass_type)
            for field in dataclasses.fields(dataclass_type):
                if field.init:
                    self.declared_types[field.name] = hints[field.name]
        # A mapping on the command line is written as YAML/JSON (`--model_overrides '{qk_norm: true}'`);
        # argparse's own `dict("...")` cannot parse any string.
        for action in self._actions:
            declared = self.declared_types.get(action.dest)
            if declared is not None and action.type is dict:
                action.type = _mapping_from_text

    def error(self, message: str) -> typing.NoReturn:
        # argparse's default prints usage and calls sys.exit(2); raise instead so a bad flag
        # is an exception that names the flag (argparse's message does) and can be caught.
        raise RecipeError(f"{message} (see --help)")

    def parse_args_and_config(self, args: Sequence[str] | None = None) -> tuple[Any, ...]:
        """Parse `--config FILE` (if given) and the remaining flags into the dataclasses."""
        args = list(sys.argv[1:] if args is None else args)
        config_path, args = _pop_config_flag(args)
        if config_path is not None:
            recipe = load_recipe_file(config_path)
            env = recipe.pop("env", {})
            if not isinstance(env, dict):
                raise RecipeError(f"'env' in {config_path} must be a mapping of NAME: value")
            defaults = {key: self._check_yaml_value(key, value, config_path) for key, value in recipe.items()}
            # Same convention as TrlParser: `env:` sets environment variables for the run
            # (only once the whole recipe is known to be valid).
            for name, value in env.items():
                os.environ[str(name)] = str(value)
            # TrlParser's own method: YAML values become the argparse defaults (so flags still
            # win) and required fields given in the YAML stop being required.
            self.set_defaults_with_config(**defaults)

        # Check for unknown flags before anything else: a missing required field, or a
        # dataclass's __post_init__, would otherwise fail first and hide the typo.
        for token in args:
            key = token[2:].split("=", 1)[0].replace("-", "_") if token.startswith("--") else None
            if key and key != "help" and key not in self.declared_types:
                raise RecipeError(f"unknown command-line flag {token!r}{self._suggestion(key)}")
        _, remaining = self.parse_known_args(args)
        if remaining:
            flag = next((token for token in remaining if token.startswith("-")), None)
            if flag is None:
                raise RecipeError(f"unexpected command-line argument {remaining[0]!r}; flags are --field value")
            key = flag.lstrip("-").split("=", 1)[0].replace("-", "_")
            raise RecipeError(f"unknown command-line flag {flag!r}{self._suggestion(key)}")
        # look_for_args_file=False: HfArgumentParser would otherwise also read `<script>.args`.
        return self.parse_args_into_dataclasses(args=args, look_for_args_file=False)

    def _suggestion(self, key: str) -> str:
        renamed = RENAMED_FIELDS.get(key)
        if renamed is not None and renamed.split(".")[0] in self.declared_types:
            return f"; did you mean {renamed!r}? (renamed: one name per idea, the Hugging Face one where it has one)"
        close = difflib.get_close_matches(key, self.declared_types, n=1)
        return f"; did you mean {close[0]!r}?" if close else "; see --help for the valid fields"

    def _check_yaml_value(self, key: str, value: Any, path: str) -> Any:
        """Return `value` converted to the type of field `key`, or raise naming key and file."""
        if key not in self.declared_types:
            raise RecipeError(f"unknown key {key!r} in {path}{self._suggestion(key)}")
        if value is None:
            return None
        action = next(a for a in self._actions if a.dest == key)
        declared = self.declared_types[key]
        where = f"{key!r} in {path}"

        if isinstance(value, dict):
            if not _accepts(declared, dict):
                raise RecipeError(f"{where} is a mapping, but the field expects {_type_name(declared)}")
            return value
        if isinstance(value, list):
            if not _accepts(declared, list):
                raise RecipeError(f"{where} is a list, but the field expects {_type_name(declared)}")
            if action.nargs not in ("+", "*"):
                return value  # e.g. `dict | list | None`: argparse has no element type to apply
            # Nested mappings (e.g. TRL's list[DatasetConfig]) are built by the dataclass itself.
            item_where = f"an item of {where}"
            return [item if isinstance(item, dict) else self._convert(action, item, item_where) for item in value]
        # A scalar given for a list field is passed through as TRL does (`lora_target_modules:
        # all-linear` means the string, not a one-element list).
        return self._convert(action, value, where)

    def _convert(self, action: argparse.Action, value: Any, where: str) -> Any:
        # Run the same converter argparse applies to a command-line string, on str(value):
        # int("1.5") and int("True") fail where int(1.5) and int(True) would silently succeed.
        try:
            converted = action.type(str(value)) if action.type is not None else value
        except (ValueError, TypeError, argparse.ArgumentTypeError) as error:
            # For list fields argparse's converter is the element type (list[int] -> int).
            is_list = action.nargs in ("+", "*")
            expected = _type_name(action.type if is_list else self.declared_types[action.dest])
            raise RecipeError(f"{where}: {value!r} is not a valid {expected}") from error
        if action.choices is not None and converted not in action.choices:
            choices = ", ".join(repr(choice) for choice in action.choices)
            raise RecipeError(f"{where}: {value!r} is not one of {choices}")
        return converted


def help_field(text: str, **kw):
    """A dataclass field with its --help text, which RecipeParser (HfArgumentParser) shows."""
    return dataclasses.field(metadata={"help": text}, **kw)


def _mapping_from_text(text: str) -> dict:
    value = yaml.safe_load(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a mapping; write it as YAML or JSON, e.g. '{{key: value}}'")
    return value


def parse_recipe(*dataclass_types: type, args: Sequence[str] | None = None) -> tuple[Any, ...]:
    """Parse `--config recipe.yaml [--field value ...]` into one instance of each dataclass type.

    `args` defaults to `sys.argv[1:]`. Raises `RecipeError` naming the key at fault.
    """
    return RecipeParser(dataclass_types).parse_args_and_config(args)


def load_recipe_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML recipe and return its top-level mapping; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {str(path)!r} does not exist (passed with --config)")
    try:
        recipe = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise RecipeError(f"recipe file {str(path)!r} is not valid YAML: {error}") from error
    if not isinstance(recipe, dict):
        raise RecipeError(
            f"recipe file {str(path)!r} must be a YAML mapping of field: value, got {type(recipe).__name__}"
        )
    return recipe


def resolved_recipe(*instances: Any) -> dict[str, Any]:
    """The parsed dataclasses as one flat, JSON-serialisable dict: field -> value.

    Flat like the YAML itself, so the `recipe` saved in stage.json can be fed back with
    `--config` to repeat the run. Values are taken after each dataclass's `__post_init__`,
    i.e. as the run actually used them. Credentials (`is_secret`) are redacted because
    stage.json travels with the checkpoint.
    """
    recipe: dict[str, Any] = {}
    for instance in instances:
        for field in dataclasses.fields(instance):
            if not field.init:
                continue
            recipe[field.name] = _jsonable(getattr(instance, field.name))
    return redacted(recipe)


def _pop_config_flag(args: list[str]) -> tuple[str | None, list[str]]:
    """Split `--config FILE` / `--config=FILE` out of `args`."""
    for index, token in enumerate(args):
        if token == "--config":
            if index + 1 >= len(args):
                raise RecipeError("--config needs a path to a YAML recipe")
            return args[index + 1], args[:index] + args[index + 2 :]
        if token.startswith("--config="):
            return token.split("=", 1)[1], args[:index] + args[index + 1 :]
    return None, args


def _accepts(declared: Any, container: type) -> bool:
    """Whether the annotation `declared` admits a value of type `container` (dict or list)."""
    if declared is container or typing.get_origin(declared) is container:
        return True
    if typing.get_origin(declared) in (typing.Union, types.UnionType):
        return any(_accepts(arg, container) for arg in typing.get_args(declared))
    return declared is Any


def _type_name(declared: Any) -> str:
    return declared.__name__ if isinstance(declared, type) else str(declared).replace("typing.", "")


def _jsonable(value: Any) -> Any:
    # Enums first: transformers' enums also subclass str, and json would keep the enum type.
    if isinstance(value, enum.Enum):
        return value.value
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(item) for item in value]
    if dataclasses.is_dataclass(value):
        return {field.name: _jsonable(getattr(value, field.name)) for field in dataclasses.fields(value)}
    # Paths, dtypes and the like: their string form is what a recipe would contain.
    return str(value)
