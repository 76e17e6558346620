#!/usr/bin/env bash
# The first GPU run's check, about 10 minutes on one GPU (H100/H200/A100 class; not run yet: no GPU was lent while
# building this). Gemma 3 1B's 26-layer shape (random weights, the real 262,144-token vocabulary) on the real taboo
# transcripts in bf16, through training, the EK-FAC fit, one Kronfluence score shard and one Bergson index shard;
# then a table of each job's tokens/s and peak GPU memory (allocated and reserved) against the memory plan.
#
#   bash bench/gpu_check.sh [WORKDIR]          # then commit the printed table with this command line
#
# Needs: an NVIDIA driver >= 580.65.06 for torch's CUDA 13.0 build (the job stops at once otherwise, naming the fix),
# gcc and the Python headers for Triton's first compile (checked before training loads the model).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
workdir="${1:-$(mktemp -d -t gpu-check-XXXX)}"
uv run python bench/rehearsal.py --gpu --quick --cores "$(nproc)" --workdir "$workdir"
echo "logs and benchmarks: $workdir/logs/rehearsal, $workdir/benchmarks/rehearsal"
