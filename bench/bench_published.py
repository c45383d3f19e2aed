"""Side by side: this project's NPBG++ frame against a published-style pipeline.

    python bench/bench_published.py                  # CPU defaults, appends to BENCHMARKS.md
    python bench/bench_published.py --quick          # smoke test: tiny sizes, no file written
    python bench/bench_published.py --device cuda --points 3m

Both pipelines render the same synthetic scene (random points and coefficients, random
weights: speed does not depend on the values) for the same camera, one after the other
in every repeat so that load on shared machines hits both alike. "ours" is
``model.render`` with the default configuration (bounding-box canvas, tiles for rolled
views, winners-only descriptors, packed-key z-buffer, inference refiner);
"published-style" is ``bench/published_pipeline.py`` (padded-square canvas, descriptors
of every point, two scatter-mins per scale, the plain fp32 U-Net). The ratio is
published / ours on the full frame. Target (issue 16): at least 5x at 1920x1080 on the GPU.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch
from bench_common import (
    add_common_args,
    bench_camera,
    device_from_args,
    markdown_table,
    parse_ints,
    parse_sizes,
    record,
    synchronize,
)
from bench_render import synthetic_scene
from published_pipeline import PublishedStylePipeline

from npbgpp_core.models import NPBGPlusPlus, NPBGPlusPlusConfig

CPU_POINTS, GPU_POINTS = "1m", "3m"
SIZES = "512x512,1920x1080"


def load_line() -> str:
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return "load average unknown"
    return f"load average {one:.1f} (1 min) / {five:.1f} (5 min) on {os.cpu_count()} cores"


def time_pair(fns: dict[str, callable], device: torch.device, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each function, interleaved: one warm-up each, then
    ``repeats`` rounds in which every function runs once."""
    for fn in fns.values():
        fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(1, repeats)):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", help=f"point counts (default GPU {GPU_POINTS}, CPU {CPU_POINTS})")
    parser.add_argument("--sizes", default=None, help=f"image sizes WxH (default {SIZES})")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default GPU 20, CPU 3)")
    parser.add_argument("--roll", type=float, default=0.0, help="camera roll in degrees (default 0)")
    add_common_args(parser)
    args = parser.parse_args(argv)
    device = device_from_args(args)
    gpu = device.type == "cuda"
    if args.quick:
        counts, sizes, repeats = [3000], [(48, 64)], 1
    else:
        counts = parse_ints(args.points or (GPU_POINTS if gpu else CPU_POINTS))
        sizes = parse_sizes(args.sizes or SIZES)
        repeats = args.repeats or (20 if gpu else 3)
    load_before = load_line()
    model = NPBGPlusPlus(NPBGPlusPlusConfig()).to(device).eval()
    published = PublishedStylePipeline(model)
    rows = []
    for n in counts:
        scene = synthetic_scene(model, n, device)
        for h, w in sizes:
            camera = bench_camera(h, w, device)
            if args.roll:
                camera = camera.rotated_in_plane(math.radians(args.roll))
            times = time_pair(
                {"ours": lambda camera=camera, scene=scene: model.render(scene, camera),
                 "published": lambda camera=camera, scene=scene: published.render(scene, camera)},
                device, repeats,
            )
            ours, pub = times["ours"], times["published"]
            ratio_med = statistics.median(pub) / statistics.median(ours)
            rows.append([f"{n:,}", f"{w}x{h}", f"{args.roll:g}",
                         f"{min(ours) * 1e3:.1f} / {statistics.median(ours) * 1e3:.1f}",
                         f"{min(pub) * 1e3:.1f} / {statistics.median(pub) * 1e3:.1f}",
                         f"{ratio_med:.1f}x (best {min(pub) / min(ours):.1f}x)"])
            print(" | ".join(rows[-1]), flush=True)
    table = markdown_table(
        ["points", "image WxH", "roll deg", "ours ms best / median", "published-style ms best / median",
         "ratio published / ours (median)"], rows,
    )
    print()
    print(table)
    notes = [
        f"device {device}; NPBG++ default config, random weights, synthetic cloud; {repeats} interleaved rounds "
        "after one warm-up each; full frame = camera in, clamped (3, H, W) image out",
        "ours: model.render (bounding-box aligned canvas, tiled refiner when rolled, descriptors of winners only, "
        "packed-key z-buffer, inference refiner); published-style: bench/published_pipeline.py (padded "
        "ceil(sqrt(H^2+W^2)) square, descriptors of all points, per scale scatter-min of depth then of index "
        "+ gather, plain fp32 U-Net); same image on the same canvas (tests/test_published_pipeline.py)",
        f"machine load: before {load_before}; after {load_line()}",
    ]
    record(args, "published-style pipeline", device, table, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
