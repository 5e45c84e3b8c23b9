"""The launch configurations: every accelerate config is valid for accelerate itself, the DeepSpeed ones
train on 2 CPU processes, and the slurm jobs launch our modules with flags they parse.

What runs on 2 CPU processes (gloo), measured with deepspeed 0.19.8, accelerate 1.15, torch 2.13 CPU:
- ddp.yaml, fsdp2.yaml: every stage (tests/test_pretrain_train.py, test_sft_stage.py, ...).
- zero2.yaml, zero3.yaml: the TRL stages (here: SFT), through DeepSpeed's CPU accelerator (picked on its own
  where there is no GPU; its communication backend is gloo without oneCCL). The first DeepSpeed run on a
  machine JIT-compiles DeepSpeed's shared-memory communication op (deepspeed_shm_comm, needs a C++ compiler;
  about a minute on 2 cores, cached in ~/.cache/torch_extensions afterwards); later runs take ~20 s each.
- The pretraining stage does not run under DeepSpeed: its loop owns the optimizer step, clipping and
  checkpoints (DDP / FSDP2). Launched with zero2.yaml or zero3.yaml, accelerate would fail in
  Accelerator() with "ValueError: invalid literal for int() with base 10: 'auto'" (the configs leave
  gradient_accumulation_steps to the TRL Trainer); the stage refuses first, naming the configs to use.
"""

import importlib.util
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from conftest import REPO, logged_losses, ok, stage_configs, write_recipe
from core import SmolForgeConfig, SmolForgeForCausalLM
from core.recipe import parse_recipe

ACCELERATE_CONFIGS = sorted((REPO / "recipes" / "accelerate_configs").glob("*.yaml"))
SLURM_JOBS = sorted((REPO / "recipes" / "slurm").glob("*.sbatch"))


def launch_args(config: Path, *extra: str):
    """accelerate's own reading of `accelerate launch --config_file CONFIG ... -m sft`: its parser, then the
    validation that merges the file into the arguments (what `accelerate launch` does before starting)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(config), *extra, "-m", "sft", "--config", "x"])
    args, defaults, mp_from_config_flag = _validate_launch_command(args)
    return args


def test_the_four_configs_are_shipped():
    assert [p.stem for p in ACCELERATE_CONFIGS] == ["ddp", "fsdp2", "zero2", "zero3"]


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.stem)
def test_accelerate_config_is_valid_and_says_how_to_launch_it(path):
    first = path.read_text().splitlines()[0]
    assert first == f"# accelerate launch --config_file recipes/accelerate_configs/{path.name} -m <stage> --config ..."
    args = launch_args(path, "--num_processes", "2")
    assert args.num_processes == 2 and args.num_machines == 1
    kind = {"ddp": "multi_gpu", "fsdp2": "use_fsdp", "zero2": "use_deepspeed", "zero3": "use_deepspeed"}[path.stem]
    assert getattr(args, kind), f"{path.name}: accelerate does not read it as {kind}"
    if path.stem == "fsdp2":
        assert str(args.fsdp_version) == "2"
    if path.stem.startswith("zero"):
        assert args.zero_stage == int(path.stem[-1])
        assert args.gradient_accumulation_steps == "auto" and args.gradient_clipping == "auto"
    if path.stem == "zero3":
        assert args.zero3_init_flag and args.zero3_save_16bit_model


def test_accelerate_config_multi_node_flags_are_accepted():
    """What recipes/slurm/*.sbatch pass on top of a config: the node count, this node's rank, the rendezvous."""
    args = launch_args(REPO / "recipes/accelerate_configs/zero3.yaml", "--num_machines", "3", "--num_processes", "24",
                       "--machine_rank", "2", "--main_process_ip", "node-0", "--main_process_port", "29500")
    assert (args.num_machines, args.num_processes, args.machine_rank) == (3, 24, 2)
    assert (args.main_process_ip, args.main_process_port) == ("node-0", 29500)


# --- DeepSpeed on 2 CPU processes -------------------------------------------------------------------

@pytest.fixture(scope="module")
def sft_reference(tmp_path_factory, tokenizer_dir):
    """A random tiny base model, an SFT recipe for it, and the recipe's 1-process run (2 rows per step)."""
    tmp = tmp_path_factory.mktemp("deepspeed")
    base = tmp / "base"
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    SmolForgeForCausalLM(SmolForgeConfig.from_preset("tiny", vocab_size=len(tokenizer))).save_pretrained(base)
    tokenizer.save_pretrained(base)
    recipe = write_recipe(tmp, {
        "model_name_or_path": str(base), "chat_template": "smollm3", "max_length": 512,
        "sources": [{"path": "builtin:arithmetic_chat", "max_rows": 48}], "think_ratio": 0.5, "max_steps": 3,
        "learning_rate": 1e-3, "logging_steps": 1, "save_strategy": "no", "seed": 0})
    single = tmp / "single"
    ok(subprocess.run([sys.executable, "-m", "sft", "--config", str(recipe), "--output_dir", str(single),
                       "--per_device_train_batch_size", "2"], capture_output=True, text=True, cwd=REPO, timeout=300))
    return base, recipe, single


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_deepspeed_config_trains_sft_on_two_cpu_processes_like_one_process(tmp_path, sft_reference, zero):
    base, recipe, single = sft_reference
    out = tmp_path / "run"
    result = ok(subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         str(REPO / f"recipes/accelerate_configs/{zero}.yaml"), "--num_processes", "2", "-m", "sft",
         "--config", str(recipe), "--output_dir", str(out), "--per_device_train_batch_size", "1"],
        capture_output=True, text=True, cwd=REPO, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}))
    assert "sft: 2 process(es) (world size 2, DistributedType.DEEPSPEED)" in result.stdout
    # 2 processes x 1 row take the single process's 2 rows of each step: the same losses.
    assert sorted(logged_losses(out)) == [1, 2, 3]
    for step, loss in logged_losses(single).items():
        assert logged_losses(out)[step] == pytest.approx(loss, rel=1e-4), step
    # The saved model is whole (ZeRO-3: gathered from the shards) and is the 1-process model.
    trained, reference, start = (load_file(p / "model.safetensors") for p in (out, single, base))
    assert trained.keys() == reference.keys()
    for name, tensor in trained.items():
        assert tensor.shape == reference[name].shape, name
        # ZeRO sums gradients in another order than one process: measured up to 1.1e-5 apart after 3 Adam
        # steps, against an update of up to lr = 1e-3 per step.
        torch.testing.assert_close(tensor, reference[name], rtol=1e-4, atol=5e-5, msg=name)
    assert any(not torch.equal(trained[k], start[k]) for k in trained)
    assert json.loads((out / "stage.json").read_text())["stage"] == "sft"


def test_pretraining_refuses_a_deepspeed_launch_naming_the_configs_to_use(tmp_path, tokenizer_dir, monkeypatch):
    from pretrain.train import main as pretrain_main

    # What `accelerate launch --config_file recipes/accelerate_configs/zero2.yaml` sets in every process.
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "auto")
    recipe = write_recipe(tmp_path, {"tokenizer_name_or_path": str(tokenizer_dir), "max_length": 64,
                                     "sources": [{"name": "prose", "path": "builtin:prose"}], "max_steps": 2})
    with pytest.raises(ValueError, match=r"pretrain runs on DDP or FSDP2 .*ddp\.yaml, fsdp2\.yaml.*zero2\.yaml, "
                                         r"zero3\.yaml\) are for the TRL stages"):
        pretrain_main(["--config", str(recipe), "--output_dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


# --- slurm jobs ---------------------------------------------------------------------------------------

# Stand-ins for the cluster's commands: each records its argv (one JSON list per line) and does the least a
# real one would. `srun` runs its command on "node" SHIM_NODEID with the step's SLURM_NNODES; `python` and
# `accelerate` only record (nothing trains); `curl` answers the health check.
SHIMS = {
    "scontrol": 'printf "gpu-node-%s\\n" $(seq 0 $((SHIM_NODES - 1)))',
    "srun": '''args=("$@"); nodes=$SHIM_NODES
while [[ ${#args[@]} -gt 0 && ${args[0]} == -* ]]; do
  case ${args[0]} in --nodes=*) nodes=${args[0]#--nodes=};; esac; args=("${args[@]:1}"); done
SLURM_NODEID=${SHIM_NODEID:-0} SLURM_NNODES=$nodes "${args[@]}"''',
    "python": "true",
    "accelerate": "true",
    "curl": "true",
}


def run_job(tmp_path: Path, job: Path, nodes: int, node_id: int = 0, **env: str) -> list[list[str]]:
    """Run a slurm job script under the stand-ins (from the repository root, as sbatch would be); the commands
    it ran, in order."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "commands.jsonl"
    log.unlink(missing_ok=True)
    for name, body in SHIMS.items():
        shim = bin_dir / name
        # One O_APPEND write per command: the GRPO job's server runs in the background, and two stand-ins
        # printing at once could interleave their lines.
        record = ("import json, os, sys; fd = os.open(os.environ['SHIM_LOG'], os.O_WRONLY | os.O_APPEND | os.O_CREAT); "
                  "os.write(fd, (json.dumps(sys.argv[1:]) + chr(10)).encode())")
        shim.write_text(f'#!/bin/bash\n{sys.executable} -c "{record}" {name} "$@"\n{body}\n')
        shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    environment = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SHIM_LOG": str(log),
                   "SHIM_NODES": str(nodes), "SHIM_NODEID": str(node_id), "SLURM_JOB_NODELIST": "gpu-node-[0-9]",
                   "SLURM_NNODES": str(nodes), **env}
    ok(subprocess.run(["bash", str(job)], capture_output=True, text=True, cwd=REPO, env=environment, timeout=60))
    return [json.loads(line) for line in log.read_text().splitlines()]


def module_command(argv: list[str]) -> tuple[list[str], str, list[str]]:
    """Split `accelerate launch <launch flags> -m <module> <module flags>`."""
    assert argv[:2] == ["accelerate", "launch"], argv
    at = argv.index("-m")
    return argv[2:at], argv[at + 1], argv[at + 2:]


def check_module_flags(module: str, flags: list[str]) -> None:
    """The flags parse with the module's own recipe parser (the recipe file included); nothing trains. The
    scripts name files relative to the repository root, where sbatch is run."""
    config_class, _ = stage_configs()[module]
    recipe = flags.index("--config") + 1
    assert (REPO / flags[recipe]).is_file()
    parse_recipe(config_class, args=[*flags[:recipe], str(REPO / flags[recipe]), *flags[recipe + 1:]])


@pytest.mark.parametrize("job", SLURM_JOBS, ids=lambda p: p.name)
def test_slurm_job_is_valid_bash_and_says_how_to_submit_it(job):
    assert subprocess.run(["bash", "-n", str(job)]).returncode == 0
    lines = job.read_text().splitlines()
    assert lines[0] == "#!/bin/bash" and lines[1] == f"# sbatch recipes/slurm/{job.name}"


def test_multinode_training_job_launches_every_node_into_one_rendezvous(tmp_path):
    from accelerate.commands.launch import launch_command_parser

    job = REPO / "recipes/slurm/train_multinode.sbatch"
    ranks = []
    for node in (0, 3):
        commands = run_job(tmp_path, job, nodes=24, node_id=node)
        assert commands[0][:3] == ["scontrol", "show", "hostnames"]
        launch = [c for c in commands if c[0] == "accelerate"]
        assert len(launch) == 1
        launch_flags, module, flags = module_command(launch[0])
        args = launch_command_parser().parse_args([*launch_flags, "-m", module, *flags])
        assert (args.num_machines, args.num_processes) == (24, 192)
        assert (args.main_process_ip, args.main_process_port) == ("gpu-node-0", 29500)
        assert Path(REPO / args.config_file).is_file()
        assert module == "pretrain" and flags[:2] == ["--config", "recipes/smollm3/pretrain.yaml"]
        check_module_flags(module, flags)
        ranks.append(args.machine_rank)
    assert ranks == [0, 3]
    # Another stage, through the variables the script's comment documents.
    commands = run_job(tmp_path, job, nodes=8, MODULE="sft", RECIPE="recipes/smollm3/sft.yaml",
                       ACCELERATE_CONFIG="recipes/accelerate_configs/zero3.yaml")
    launch_flags, module, flags = module_command([c for c in commands if c[0] == "accelerate"][0])
    assert module == "sft" and "recipes/accelerate_configs/zero3.yaml" in launch_flags
    check_module_flags(module, flags)


def test_grpo_job_serves_vllm_on_the_first_node_and_trains_on_the_others(tmp_path):
    from accelerate.commands.launch import launch_command_parser

    from rl.serve import ServeConfig

    commands = run_job(tmp_path, REPO / "recipes/slurm/grpo_vllm_server.sbatch", nodes=3)
    srun = [c for c in commands if c[0] == "srun"]
    assert "--nodelist=gpu-node-0" in srun[0] and "--nodelist=gpu-node-1,gpu-node-2" in srun[1]
    serve = [c for c in commands if c[0] == "python"]
    assert serve[0][1:3] == ["-m", "rl.serve"]
    (serve_cfg,) = parse_recipe(ServeConfig, args=serve[0][3:])
    assert serve_cfg.host == "0.0.0.0" and serve_cfg.model_name_or_path == "out/smollm3/merged"
    health = [c for c in commands if c[0] == "curl"]
    assert health and health[0][-1] == f"http://gpu-node-0:{serve_cfg.port}/health"

    launch_flags, module, flags = module_command([c for c in commands if c[0] == "accelerate"][0])
    args = launch_command_parser().parse_args([*launch_flags, "-m", module, *flags])
    assert (args.num_machines, args.num_processes, args.main_process_ip) == (2, 16, "gpu-node-1")
    assert module == "rl"
    config_class, _ = stage_configs()["rl"]
    check_module_flags(module, flags)
    (cfg,) = parse_recipe(config_class, args=[str(REPO / f) if f.startswith("recipes/") else f for f in flags])
    assert (cfg.vllm_mode, cfg.vllm_server_host, cfg.vllm_server_port) == ("server", "gpu-node-0", serve_cfg.port)
    # Training starts only after the health check answered. (The server is started in the background, so when
    # its stand-in records itself, before or after the first check, is up to the scheduler.)
    order = [c[0] for c in commands if c[0] in ("curl", "accelerate")]
    assert order.index("curl") < order.index("accelerate")


def test_grpo_job_refuses_a_single_node(tmp_path):
    job = REPO / "recipes/slurm/grpo_vllm_server.sbatch"
    with pytest.raises(AssertionError, match="needs at least 2 nodes"):
        run_job(tmp_path, job, nodes=1)


def test_slurm_jobs_name_only_files_and_modules_that_exist():
    """Every recipe, config or job path and every `-m module` in the scripts, comments included."""
    for job in SLURM_JOBS:
        text = job.read_text()
        paths = set(re.findall(r"recipes/[\w./-]+\.(?:yaml|sbatch)", text))
        assert paths, job.name
        for path in paths:
            assert (REPO / path).is_file(), f"{job.name} names {path}, which does not exist"
        modules = set(re.findall(r"-m (?!\")([\w.]+)", text)) | set(re.findall(r"MODULE=([\w.]+)", text))
        assert modules, job.name
        for module in modules:
            assert importlib.util.find_spec(module) is not None, f"{job.name} runs -m {module}, which does not exist"
            if module != "rl.serve":
                assert module in stage_configs(), f"{job.name}: {module} is not a stage with a recipe"
