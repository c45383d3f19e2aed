#!/usr/bin/env bash
# One-shot GPU check of the CUDA rasterizer and the GPU paths (for a machine with a GPU,
# nvcc and a CUDA build of torch): build the kernel, run the CUDA tests, the headline
# benchmarks (appended to BENCHMARKS.md) and a short training run on the GPU.
#
#   bash bench/gpu_check.sh [python]
#
# Every step runs under its own time limit and the whole script under BUDGET_S seconds
# (default 540): a step that fails or runs out of time is reported and the next one
# still runs, so one session on a lent GPU gives as many answers as possible.
# LOG_DIR (default bench/gpu_logs) receives gpu_check.log and a copy of BENCHMARKS.md
# after each benchmark. Extra pure-Python packages (hydra, omegaconf, plyfile for the
# training run) are taken from ./.pydeps when that folder exists.
set -uo pipefail
PY=${1:-${PYTHON:-.venv/bin/python}}
cd "$(dirname "$0")/.."
BUDGET_S=${BUDGET_S:-540}
LOG_DIR=${LOG_DIR:-bench/gpu_logs}
mkdir -p "$LOG_DIR"
LOG="$LOG_DIR/gpu_check.log"
: >"$LOG"
DEADLINE=$(($(date +%s) + BUDGET_S))
[ -d .pydeps ] && export PYTHONPATH="$PWD/.pydeps${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
FAILED=()

# step NAME LIMIT_S COMMAND...: run with min(LIMIT_S, time left) and log the outcome
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((DEADLINE - $(date +%s) - 5))
    ((limit > left)) && limit=$left
    if ((limit < 15)); then
        echo "=== $name: skipped, budget spent" | tee -a "$LOG"
        FAILED+=("$name(skipped)")
        return
    fi
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    local t0 rc
    t0=$(date +%s)
    timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    echo "=== $name: rc=$rc after $(($(date +%s) - t0))s" | tee -a "$LOG"
    ((rc != 0)) && FAILED+=("$name(rc=$rc)")
    cp BENCHMARKS.md "$LOG_DIR/BENCHMARKS.md" 2>/dev/null
    return 0
}

step info 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
    $PY -c 'import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda, \
    torch.cuda.get_device_name(), torch.cuda.is_available())'; nvcc --version | tail -1"
step build 200 "$PY" -m kernels.build --quiet
step tests 150 "$PY" -m pytest -p no:hydra_pytest -p no:cacheprovider -q -rfE -m cuda \
    tests/test_kernels.py tests/test_rasterizer.py tests/test_models.py tests/test_refiner_triton.py
step bench_rasterizer 100 "$PY" bench/bench_rasterizer.py --device cuda \
    --points 100k,1m,3m,10m --sizes 512x512,1920x1080,3840x2160
step bench_render 110 "$PY" bench/bench_render.py --device cuda --points 1m,3m --sizes 512x512,1920x1080 \
    --repeats 10 --variants fp32,fp16_cl,bf16_cl,fp16_cl_graph,render
step bench_prepare 90 "$PY" bench/bench_prepare.py --device cuda --views 10,30,100,300 --size 800x800 --points 3m
step bench_render_compile 90 "$PY" bench/bench_render.py --device cuda --points 3m --sizes 1920x1080 \
    --repeats 10 --variants fp16_cl_compile
rm -rf "$LOG_DIR/train"
step train_gpu 70 "$PY" -m headless_train hydra.run.dir="$LOG_DIR/train" trainer.gpus=1 \
    datasets.data_root="$PWD/demo" datasets.scene_name=scene datasets.train_num_samples=64 \
    trainer.max_epochs=1 trainer.enable_progress_bar=false dataloader=small
[ -f "$LOG_DIR/train/headless_train.log" ] && cp "$LOG_DIR/train/headless_train.log" "$LOG_DIR/train.log"
rm -rf "$LOG_DIR/train"

if ((${#FAILED[@]})); then
    echo "=== gpu_check: FAILED ${FAILED[*]}" | tee -a "$LOG"
    exit 1
fi
echo "=== gpu_check: all steps passed" | tee -a "$LOG"
