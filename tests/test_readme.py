"""Every README snippet runs when pasted.

- Python blocks run, in order, each in a fresh interpreter in one scratch directory (a later block
  may use what an earlier one wrote, e.g. `out/tiny`), as a user pasting them would.
- Shell blocks: every command is checked the way its program would read it, without training:
  the module exists, its recipe file exists and parses with the stage's own parser, the flags are
  known fields; an accelerate config file exists and parses; an sbatch job exists in recipes/slurm/. `make` targets are real Makefile
  targets. The training runs themselves are what `make demo` and the stage tests run for real.
"""

import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import REPO, stage_configs

README = (REPO / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, flags=re.DOTALL)
PYTHON = [code for lang, code in BLOCKS if lang == "python"]
SHELL = [line for lang, code in BLOCKS if lang == "bash" for line in
         code.replace("\\\n", " ").splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_python_blocks_run_in_order(tmp_path):
    assert PYTHON, "the README has no python block"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for number, code in enumerate(PYTHON):
        run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, f"README python block {number}:\n{code}\n{run.stderr[-3000:]}"


def command_words(line: str) -> list[str]:
    return shlex.split(line.split(" #", 1)[0])


@pytest.mark.parametrize("line", SHELL)
def test_shell_commands_parse(line):
    words = command_words(line)
    assert "..." not in words, f"placeholder in a README command: {line}"
    if words[0] == "make":
        targets = re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), flags=re.MULTILINE)
        assert words[1] in targets, line
        return
    if words[0] == "smolforge":
        from core.pipeline import build_parser, check_stage_names, load_pipeline

        args = build_parser().parse_args(words[1:])
        if args.verb == "run":
            check_stage_names(load_pipeline(str(REPO / args.pipeline), args.set or []), args)
        return
    if words[0] == "sbatch":  # a job of recipes/slurm/; tests/test_launch_configs.py dry-runs each one
        job = REPO / words[-1]
        assert job.parent == REPO / "recipes" / "slurm" and job.is_file(), line
        for word in words[1:-1]:
            for path in re.findall(r"recipes/[\w./-]+\.yaml", word):
                assert (REPO / path).is_file(), f"{line}: {path} does not exist"
        return
    if words[:2] == ["accelerate", "launch"]:
        config_file = words[words.index("--config_file") + 1]
        from accelerate.commands.config.config_args import load_config_from_file

        load_config_from_file(str(REPO / config_file))
        words = ["python", *words[words.index("-m"):]]
    assert words[:2] == ["python", "-m"], f"not a python -m / accelerate launch / make command: {line}"
    module, args = words[2], words[3:]
    configs = stage_configs()
    if module in configs:
        from core.recipe import parse_recipe

        args = [str(REPO / a) if a.startswith("recipes/") else a for a in args]
        parse_recipe(configs[module][0], args=args)
    else:  # a tool with its own argparse: its --help must work
        run = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
