#!/usr/bin/env bash
# The device checks for a session that is lent a GPU, as one short script (at most 8 minutes;
# run it with timeout_s=540):
#   1. the CUDA-graph tests (plain and packed runs replayed from CUDA graphs give the eager records),
#   2. the fast-path table (issue: GPU-fast sweeps) for the paper's MNIST CNN with 8 and 32 members
#      and for digits, and per-task step times (issue: paper tasks),
#   3. the default sweep with packing on and off, where Hydra and submitit are importable
#      (carry their wheels: see the device tool's README).
#   bash scripts/gpu_check.sh [OUT_DIR]
# Needs torch, scikit-learn and pytest (the GPU image has them), not Hydra or submitit.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$out"
export PYTHONPATH=src:.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py 2>&1 | tee "$out/cuda_graph_tests.txt"
{
  timeout 150 python3 scripts/bench_fast_path.py --task mnist --members 8 --rounds 3
  timeout 75 python3 scripts/bench_fast_path.py --task mnist --members 32 --rounds 3 --batch-sizes 16 64 256
  timeout 75 python3 scripts/bench_fast_path.py --task digits --members 8 --rounds 3
} 2>&1 | tee "$out/fast_path.txt"
timeout 75 python3 scripts/bench_task_steps.py 2>&1 | tee "$out/task_steps.txt"
if python3 -c "import hydra, submitit, mnist1d" 2>/dev/null; then
  # a reduced default sweep (the whole one, twice, would not fit the time box)
  timeout 120 python3 scripts/bench_fast_path.py --task digits --batch-sizes 16 --rounds 1 --steps 20 --sweep \
    --sweep-overrides 'sweep.batch_sizes=[16,64]' 'sweep.seeds=[0]' sweep.lr.count=2 2>&1 | tee "$out/sweep.txt"
fi
