"""Rasterizer speed: torch reference vs the CUDA kernel (when it loads), 5 scales.

    python bench/bench_rasterizer.py                 # defaults for the device, appends to BENCHMARKS.md
    python bench/bench_rasterizer.py --quick         # smoke test: tiny sizes, no file written
    python bench/bench_rasterizer.py --points 1m,3m --sizes 1920x1080 --device cuda

Prints median time and peak extra memory per (points, image size) and backend; the GPU
target is kernel >= 5x faster than the reference at 3M points, 1920x1080 (H100); the CPU
target is 1M points at 512x512 in < 150 ms.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
from bench_common import (
    add_common_args,
    bench_camera,
    device_from_args,
    fmt_mb,
    fmt_ms,
    markdown_table,
    parse_ints,
    parse_sizes,
    random_cloud,
    record,
    time_call,
)

from npbgpp_core import rasterizer as R

GPU_POINTS = "100k,1m,3m,10m"
GPU_SIZES = "512x512,1920x1080,3840x2160"
CPU_POINTS = "100k,1m,3m"
CPU_SIZES = "512x512,1920x1080"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", help=f"point counts (default GPU {GPU_POINTS}, CPU {CPU_POINTS})")
    parser.add_argument("--sizes", help=f"image sizes WxH (default GPU {GPU_SIZES}, CPU {CPU_SIZES})")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per case (median)")
    add_common_args(parser)
    args = parser.parse_args(argv)

    device = device_from_args(args)
    gpu = device.type == "cuda"
    if args.quick:
        counts, sizes, repeats = [2000], [(48, 64)], 1
    else:
        counts = parse_ints(args.points or (GPU_POINTS if gpu else CPU_POINTS))
        sizes = parse_sizes(args.sizes or (GPU_SIZES if gpu else CPU_SIZES))
        repeats = args.repeats or (10 if gpu else 5)

    kernel, why = None, "CPU run"
    if gpu:
        from npbgpp_core import _backend

        kernel = _backend.cuda_rasterizer()
        why = _backend.why_unavailable()

    rows = []
    for n in counts:
        points = random_cloud(n, seed=n % 1000, device=device)
        for h, w in sizes:
            camera = bench_camera(h, w, device)
            params = R.raster_params(camera, R.DEFAULT_SCALES, 1e-3, device)
            ref = time_call(partial(R.rasterize_keys_torch, points, params), device, repeats)
            cu = None
            if kernel is not None:
                cu = time_call(partial(kernel.rasterize_keys, points, params), device, repeats)
            speedup = f"{ref.median / cu.median:.1f}x" if cu else "n/a"
            rows.append([f"{n:,}", f"{w}x{h}", fmt_ms(ref), fmt_mb(ref.peak_bytes), fmt_ms(cu),
                         fmt_mb(cu.peak_bytes if cu else None), speedup])
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
        if gpu:
            torch.cuda.empty_cache()

    headers = ["points", "image WxH", "torch ms best / median", "torch peak MB", "kernel ms best / median",
               "kernel peak MB", "speedup (median)"]
    table = markdown_table(headers, rows)
    print()
    print(table)
    notes = [
        f"device {device}, 5 scales (1, 1/2, 1/4, 1/8, 1/16), best and median of {repeats} runs after 1 warm-up",
        "peak MB: torch.cuda.max_memory_allocated growth on GPU, RSS growth (sampled 1 ms) on CPU",
    ]
    if kernel is None:
        notes.append(f"CUDA kernel not measured: {why}")
    record(args, "Rasterizer: torch reference vs CUDA kernel", device, table, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
