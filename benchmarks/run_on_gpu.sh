#!/usr/bin/env bash
# The GPU checks in one go, for a CUDA machine that has torch and torchvision but maybe
# no network and no mlflow: missing wheels travel in .whl/ (see docs/training.md, "On a GPU").
# Writes its logs and JSON under ${OUT:-benchmarks/results}. COMPILE=1 adds a torch.compile run
# (it compiles each contender and recompiles for the last, smaller batch: minutes).
set -uo pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 PLANTML_CACHE_DIR=${PLANTML_CACHE_DIR:-/tmp/plantml-cache} MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# without plantml's small dependencies, pytest would stop at the plugin and the benchmark at its imports
if ! python3 -c "import plantml.testing.plugin, plantml.training.run" 2>"$OUT/imports.log"; then
    echo "run_on_gpu: plantml does not import here ($(tail -1 "$OUT/imports.log")): run benchmarks/gpu_wheels.sh" \
         "where pip works, then call the device with carry: [\".whl\"]" >&2
    exit 3
fi
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
# every step runs even when one before it failed; the exit status names those that failed (pipefail: a step fails when its command does)
failed=""
# the plugin by its module: plantml only on PYTHONPATH has no entry point (an installed one's bears the same name)
python3 -m pytest -p plantml.testing.plugin -m gpu -q -p no:cacheprovider tests/unit/test_training_gpu.py 2>&1 | tee "$OUT/pytest_gpu.log" || failed="$failed pytest"
# --line-buffered: a benchmark stopped at the caller's time limit still leaves the backbones it finished in the log
python3 benchmarks/gpu_throughput.py --output "$OUT/gpu_throughput.json" 2>&1 | grep --line-buffered -v "INFO mlflow\|INFO alembic" | tee "$OUT/gpu_throughput.log" || failed="$failed gpu_throughput"
if [ "${COMPILE:-0}" = 1 ]; then
    timeout 300 python3 benchmarks/gpu_throughput.py --backbones resnet18 --compile --epochs 3 --output "$OUT/gpu_compile.json" 2>&1 | grep --line-buffered -v "INFO mlflow\|INFO alembic" | tee "$OUT/gpu_compile.log" || failed="$failed compile"
fi
GPUS=$(nvidia-smi -L | wc -l)
if [ "$GPUS" -ge 2 ]; then  # one model on every GPU (NCCL) against one GPU
    python3 benchmarks/ddp_scaling.py --device cuda --nproc "$GPUS" --image-size 224 --batch-size 128 --output "$OUT/ddp_scaling_gpu.json" 2>&1 | tee "$OUT/ddp_scaling_gpu.log" || failed="$failed ddp_scaling"
fi
if [ -n "$failed" ]; then
    echo "run_on_gpu: failed:$failed (logs in $OUT)" >&2
    exit 1
fi
