"""Scene preparation: aggregating K input views into NPBG++ coefficients, then saving.

    python bench/bench_prepare.py                 # defaults for the device, appends to BENCHMARKS.md
    python bench/bench_prepare.py --quick         # smoke test: tiny sizes, no file written
    python bench/bench_prepare.py --views 10,100,300 --size 800x800 --points 1m --device cuda

Per K: begin_scene + add_views (in batches) + finish (the feature extractor, visibility
z-buffer, sampling, running sums and the per-point ridge solve), and
NeuralScene.from_aggregated(...).save(...) of the result. Views are random images on a
circle of cameras around a random cloud (speed does not depend on the pixel values).
Target: H100, 100 views of 800x800 in < 10 s.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch
from bench_common import (
    add_common_args,
    bench_camera,
    device_from_args,
    fmt_mb,
    markdown_table,
    parse_ints,
    parse_sizes,
    peak_memory,
    random_cloud,
    record,
    synchronize,
)

from npbgpp_core.models import NPBGPlusPlus, NPBGPlusPlusConfig
from npbgpp_core.scene import NeuralScene

GPU_VIEWS, GPU_SIZE, GPU_POINTS, GPU_BATCH = "10,30,100,300", "800x800", "1m", 8
CPU_VIEWS, CPU_SIZE, CPU_POINTS, CPU_BATCH = "4,10", "256x256", "200k", 2


def prepare(model: NPBGPlusPlus, points: torch.Tensor, views: int, size: tuple[int, int], batch: int,
            device: torch.device) -> tuple[float, int, object]:
    """Seconds and peak extra bytes to aggregate ``views`` views, and the scene."""
    h, w = size
    g = torch.Generator(device=device).manual_seed(views)  # images made on the device: no host work timed
    with peak_memory(device) as mem:
        synchronize(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            state = model.begin_scene(points)
            for start in range(0, views, batch):
                k = min(batch, views - start)
                cams = [bench_camera(h, w, device, angle=2 * math.pi * (start + i) / views) for i in range(k)]
                images = torch.rand(k, 3, h, w, generator=g, device=device)
                state.add_views(images, cams)
            scene = state.finish()
        synchronize(device)
        seconds = time.perf_counter() - t0
    return seconds, mem["bytes"], scene


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--views", help=f"view counts K (default GPU {GPU_VIEWS}, CPU {CPU_VIEWS})")
    parser.add_argument("--size", help=f"view size WxH (default GPU {GPU_SIZE}, CPU {CPU_SIZE})")
    parser.add_argument("--points", help=f"cloud size (default GPU {GPU_POINTS}, CPU {CPU_POINTS})")
    parser.add_argument("--batch", type=int, help=f"views per add_views call (GPU {GPU_BATCH}, CPU {CPU_BATCH})")
    add_common_args(parser)
    args = parser.parse_args(argv)

    device = device_from_args(args)
    gpu = device.type == "cuda"
    if args.quick:
        view_counts, size, n, batch = [2], (32, 32), 2000, 2
    else:
        view_counts = parse_ints(args.views or (GPU_VIEWS if gpu else CPU_VIEWS))
        size = parse_sizes(args.size or (GPU_SIZE if gpu else CPU_SIZE))[0]
        n = parse_ints(args.points or (GPU_POINTS if gpu else CPU_POINTS))[0]
        batch = args.batch or (GPU_BATCH if gpu else CPU_BATCH)

    model = NPBGPlusPlus(NPBGPlusPlusConfig()).to(device).eval()
    points = random_cloud(n, seed=3, device=device)
    prepare(model, points, min(2, view_counts[0]), size, batch, device)  # warm-up (kernels, allocator)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for views in view_counts:
            seconds, peak, scene = prepare(model, points, views, size, batch, device)
            t0 = time.perf_counter()
            NeuralScene.from_aggregated(model, scene).save(Path(tmp) / "scene.npbgpp")
            save_s = time.perf_counter() - t0
            seen = int(scene.valid.sum())
            rows.append([views, f"{size[1]}x{size[0]}", f"{n:,}", f"{seconds:.2f}", f"{seconds / views * 1e3:.0f}",
                         fmt_mb(peak), f"{seen:,}", f"{save_s:.2f}"])
            print(" | ".join(str(c) for c in rows[-1]), flush=True)

    table = markdown_table(
        ["views K", "view WxH", "points", "aggregate s", "ms / view", "peak MB", "points seen", "save s"], rows
    )
    print()
    print(table)
    notes = [
        f"device {device}, NPBG++ default config (sphere aggregator, input-view alignment on), random weights, "
        f"{batch} views per add_views call",
    ]
    record(args, "Scene preparation (aggregating K views)", device, table, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
