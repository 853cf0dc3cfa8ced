#!/usr/bin/env bash
# The device checks for a session that is lent a GPU, as one short script (a few minutes):
# the fast-path table (issue: GPU-fast sweeps) and per-task step times (issue: paper tasks).
#   bash scripts/gpu_check.sh [OUT_DIR]
# Needs torch (and torchvision for the paper tasks' models) but neither Hydra nor submitit.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$out"
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"
for task in mnist digits; do
  timeout 240 python scripts/bench_fast_path.py --task "$task" --members 8 --rounds 3 2>&1 | tee "$out/fast_path_$task.txt"
done
timeout 180 python scripts/bench_task_steps.py 2>&1 | tee "$out/task_steps.txt"
