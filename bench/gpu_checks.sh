#!/usr/bin/env bash
# Every GPU check the open issues name, in one run on one lent GPU (device time is scarce: one call, each step
# capped so one failure does not eat the others' time). Run from the repository root on a CUDA machine:
#
#   bash bench/gpu_checks.sh        # logs and JSON files: $OUT/gpu_checks.tgz (default OUT: out/gpu_checks)
#
# 1. issue 21: `python -m core.infra` (matmul per dtype against the datasheet peak, bandwidths, NCCL bus bandwidth)
#    and the planner's activation estimate against a measured peak (bench/infra_gpu.py);
# 2. issue 22: the 360M preset's MFU with bf16, torch.compile and Liger (bench/throughput_gpu.sh);
# 3. issue 19: MoE grouped GEMM against the expert loop, MLA on CUDA attention kernels, and the long-context
#    curve of dense / MLA / hybrid on the GPU.
# Liger is a pure-Python wheel: carry it in .whl/ (pip download liger-kernel) and it is installed first.
set -uo pipefail
cd "$(dirname "$0")/.."
# Each script writes its JSON to $OUT; they go to a work folder and come back as one archive (the device tool
# returns at most 8 files).
FINAL=${OUT:-out/gpu_checks}
export OUT=/tmp/gpu_checks PYTHONUNBUFFERED=1 PYTHON=${PYTHON:-python3}
mkdir -p "$OUT" "$FINAL"
trap 'tar czf "$FINAL/gpu_checks.tgz" -C "$OUT" .' EXIT
if ls .whl/*.whl >/dev/null 2>&1; then
  $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/nvidia_smi.txt"
step() {  # step NAME SECONDS COMMAND...: run one check with a cap, log to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  echo "=== $name (cap ${limit}s)"; local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; local rc=$?
  tail -n 25 "$OUT/$name.log"; echo "=== $name rc=$rc in $((SECONDS - t0)) s"
}
step infra 150 $PYTHON bench/infra_gpu.py
step throughput 200 bash bench/throughput_gpu.sh
step moe 60 $PYTHON bench/moe_grouped_gemm.py
step mla 60 $PYTHON bench/mla_gpu_check.py
step long_context 60 $PYTHON bench/long_context.py --repeats 2
