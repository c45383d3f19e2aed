#!/usr/bin/env bash
# One-shot GPU check of the CUDA rasterizer (for a machine with a GPU, nvcc and a CUDA
# build of torch): build, the GPU tests, then the headline benchmarks, appended to
# BENCHMARKS.md. About 5-8 minutes on an H100 (the first build takes 1-2 of them).
#   bash bench/gpu_check.sh [python]
set -euo pipefail
PY=${1:-${PYTHON:-.venv/bin/python}}
cd "$(dirname "$0")/.."
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'; print(torch.cuda.get_device_name())"
"$PY" -m kernels.build --quiet
"$PY" -m pytest -q -m cuda tests/test_kernels.py tests/test_rasterizer.py
"$PY" bench/bench_rasterizer.py --points 100k,1m,3m,10m --sizes 512x512,1920x1080,3840x2160
"$PY" bench/bench_render.py --points 1m,3m --sizes 512x512,1920x1080
"$PY" bench/bench_prepare.py --views 10,30,100,300 --size 800x800 --points 1m
