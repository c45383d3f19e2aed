"""Dense reconstruction (npbgpp_core.densify): speed, and accuracy on Blender scenes with
known geometry.

    python bench/bench_densify.py                      # CPU: accuracy (48 views 200x200) + speed (60 views 640x360)
    python bench/bench_densify.py --accuracy-only --scenes textured_monkey
    python bench/bench_densify.py --gpu                # GPU case: 100 views 1280x720 on CUDA
    python bench/bench_densify.py --gpu --dry-run      # what the GPU case would run, checked on a tiny scene
    python bench/bench_densify.py --quick              # smoke test, writes nothing
    python bench/bench_densify.py --accuracy-only --fill   # with the texture-poor fill, its points scored apart

Scenes are rendered with Cycles by ``blender_addon.datagen`` (procedural scenes, all
views used, cached under ``out/bench_densify/``) with a dense sample of the true surface
(``points3d.ply``, 300k points). Densify sees only a 2000-point subsample of it, standing
in for SfM points (depth ranges). Measures, with tol = 1% of the true bounding-box
diagonal:

- accuracy: share of dense points within tol of a true-surface sample;
- coverage: share of the visible true surface (samples that win a pixel of at least one
  used view in a nearest-point z-buffer) with a dense point within tol.

Targets: accuracy >= 90%, coverage >= 70%, >= 50k points (48 views 200x200); 60 views
640x360 within 3 minutes on the 2-core CPU; 100 views 1280x720 within 20 s on an H100.
Time covers image loading, depth maps and fusion (not rendering).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from bench_common import ROOT, add_common_args, device_from_args, markdown_table, record

from npbgpp_core.densify import DensifyOptions, densify_scene

CACHE = ROOT / "out" / "bench_densify"
ACCURACY_SCENES = "textured_monkey,checker_cube,stacked_blocks"
TRUE_POINTS = 300_000
SPARSE_POINTS = 2000


def render_scene(name: str, views: int, size: tuple[int, int], out: Path, samples: int = 16,
                 points: int = TRUE_POINTS) -> Path:
    """Render (once; cached) a procedural scene with every view in the train split."""
    if (out / "transforms_train.json").is_file():
        return out
    from blender_addon.datagen import render_procedural_scene

    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    render_procedural_scene(name, str(out), views=views, size=size, seed=0, samples=samples, points=points,
                            val_views=0, test_views=0)
    print(f"rendered {name} {views} views {size[1]}x{size[0]} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return out


def near_mask(query: torch.Tensor, ref: torch.Tensor, tol: float) -> torch.Tensor:
    """For each query point, whether some ref point lies within ``tol`` (voxel hash of
    cell size tol, the 27 cells around each query searched exhaustively)."""
    lo = torch.minimum(query.min(0).values, ref.min(0).values) - tol
    cell = lambda p: torch.floor((p - lo) / tol).long()  # noqa: E731
    dims = cell(torch.maximum(query.max(0).values, ref.max(0).values) + tol) + 2
    key = lambda c: (c[:, 0] * dims[1] + c[:, 1]) * dims[2] + c[:, 2]  # noqa: E731
    rk = key(cell(ref))
    order = torch.argsort(rk)
    rk, rs = rk[order], ref[order]
    qc = cell(query)
    found = torch.zeros(len(query), dtype=torch.bool)
    for dx in (-1, 0, 1):
        for dy in (-1, 0, 1):
            for dz in (-1, 0, 1):
                todo = torch.nonzero(~found).squeeze(1)
                if todo.numel() == 0:
                    return found
                k = key(qc[todo] + torch.tensor([dx, dy, dz]))
                start = torch.searchsorted(rk, k)
                end = torch.searchsorted(rk, k, right=True)
                count = end - start
                j = 0
                active = torch.nonzero(count > 0).squeeze(1)
                while active.numel():
                    idx = start[active] + j
                    d = (rs[idx] - query[todo[active]]).norm(dim=1)
                    hit = d <= tol
                    found[todo[active[hit]]] = True
                    j += 1
                    active = active[~hit & (count[active] > j)]
    return found


def visible_samples(points: torch.Tensor, cameras) -> torch.Tensor:
    """Samples that are the nearest point at some pixel of some camera."""
    from npbgpp_core.rasterizer import rasterize

    seen = torch.zeros(len(points), dtype=torch.bool)
    for cam in cameras:
        idx = rasterize(points, cam, scales=(1.0,), backend="torch")[0]
        seen[idx[idx >= 0].unique()] = True
    return seen


def measure(scene_dir: Path, device: str, views: int | None = None, **options) -> dict:
    """Densify a rendered scene; time and (with true points) accuracy and coverage."""
    from npbgpp_core.datasets import load_scene

    full = load_scene(scene_dir)
    truth = torch.from_numpy(full.points.astype(np.float32))
    sparse = full.subsample_points(min(SPARSE_POINTS, len(full.points)))
    used = list(range(len(full.views)))[: views or None]
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    cloud = densify_scene(sparse, used, DensifyOptions(**options), device)
    seconds = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    load = max(load0, os.getloadavg()[0])
    dense = torch.from_numpy(cloud.points)
    diag = float((truth.max(0).values - truth.min(0).values).norm())
    tol = 0.01 * diag
    near = near_mask(dense, truth, tol)
    acc = float(near.float().mean()) if len(dense) else 0.0
    fill = {}
    if options.get("fill"):
        # Fill points follow the stereo points (below max_points): a run without fill
        # says where they start, and how long the fill took.
        t1 = time.perf_counter()
        plain = len(densify_scene(sparse, used, DensifyOptions(**{**options, "fill": False}), device))
        plain_s = time.perf_counter() - t1
        fill = {"fill_points": len(dense) - plain, "fill_seconds": seconds - plain_s,
                "fill_accuracy": float(near[plain:].float().mean()) if len(dense) > plain else float("nan")}
    vis = visible_samples(truth, [full.camera(i) for i in used])
    cov = float(near_mask(truth[vis], dense, tol).float().mean()) if len(dense) else 0.0
    h, w = full.views[0].camera.image_size
    return {
        "scene": scene_dir.name, "views": len(used), "size": f"{w}x{h}", "points": len(cloud),
        "accuracy": acc, "coverage": cov, "seconds": seconds,
        "cpu_seconds": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime), "load": load, **fill,
    }


def row(r: dict, target_s: float | None) -> list:
    ok = ""
    if target_s is not None:
        ok = "yes" if r["seconds"] <= target_s else "no"
    cells = [r["scene"], r["views"], r["size"], f"{r['points']:,}", f"{100 * r['accuracy']:.1f}",
             f"{100 * r['coverage']:.1f}", f"{r['seconds']:.1f}", f"{r['cpu_seconds']:.0f}", f"{r['load']:.1f}", ok]
    if "fill_points" in r:
        cells += [f"{r['fill_points']:,}", f"{100 * r['fill_accuracy']:.1f}", f"{r['fill_seconds']:.1f}"]
    return cells


HEADERS = ["scene", "views", "size", "points", "accuracy %", "coverage %", "seconds", "CPU s", "load avg",
           "within time target"]
FILL_HEADERS = ["fill points", "fill accuracy %", "fill s (on top of densify)"]

ACCURACY_NOTE = ("Accuracy targets: >= 90% of points within 1% of the bbox diagonal of the true surface, "
                 ">= 70% of the visible true surface covered, >= 50k points (48 views 200x200)")
SPEED_NOTE = ("Speed target: 60 views 640x360 within 180 s on the 2-core CPU; 'load avg' is the "
              "machine's 1-minute load during the run (2 cores: above 2 means other jobs shared them)")
GPU_NOTE = "GPU case: 100 views 1280x720 within 20 s on an H100"


class Case(NamedTuple):
    scene: str
    views: int
    size: tuple[int, int]  # (h, w)
    target: float | None  # time target in seconds (None: the accuracy targets)
    note: str  # what the recorded table's notes say about the case's targets


def gpu_plan(args: argparse.Namespace) -> list[Case]:
    return [Case(args.speed_scene, 100, (720, 1280), 20.0, GPU_NOTE)]


def cpu_plan(args: argparse.Namespace) -> list[Case]:
    """The accuracy scenes (unless --speed-only), then the speed scene (unless --accuracy-only)."""
    accuracy = [] if args.speed_only else [Case(s, 48, (200, 200), None, ACCURACY_NOTE)
                                           for s in args.scenes.split(",")]
    speed = [] if args.accuracy_only else [Case(args.speed_scene, 60, (360, 640), 180.0, SPEED_NOTE)]
    return accuracy + speed


def run_cases(cases: list[Case], scene_for: Callable[[Case], Path], device: str, fill: bool,
              warm_up: bool) -> tuple[list[str], list[list]]:
    """Densify and score each case's scene: (headers, rows), each row printed as it comes.
    The one place every mode (CPU, GPU, --dry-run) builds its table, so the fill columns
    are in the header exactly when they are in the rows. ``warm_up``: a 10-view densify
    first (CUDA context and kernels; 10 views run the same kernels)."""
    headers = HEADERS + FILL_HEADERS if fill else HEADERS
    rows: list[list] = []
    for case in cases:
        scene = scene_for(case)
        if warm_up:
            measure(scene, device, views=10)
        rows.append(row(measure(scene, device, fill=fill), case.target))
        print(markdown_table(headers, rows[-1:]))
    return headers, rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenes", default=ACCURACY_SCENES, help="procedural scenes for the accuracy table")
    p.add_argument("--speed-scene", default="textured_monkey", help="procedural scene timed for speed")
    p.add_argument("--accuracy-only", action="store_true")
    p.add_argument("--speed-only", action="store_true")
    p.add_argument("--gpu", action="store_true", help="the GPU case: 100 views 1280x720 on CUDA, target 20 s")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan and run it on a tiny scene on the CPU (checks the code path; writes nothing)")
    p.add_argument("--cache", default=str(CACHE), help="where rendered scenes are kept")
    p.add_argument("--fill", action="store_true",
                   help="densify with fill=True; also reports the fill points' own accuracy and time (runs each "
                        "scene twice)")
    add_common_args(p)
    args = p.parse_args(argv)
    plan = gpu_plan(args) if args.gpu else cpu_plan(args)
    if not plan:
        p.error("--accuracy-only and --speed-only together leave nothing to run")
    device = device_from_args(args)
    cache = Path(args.cache)
    notes: list[str] = []
    if args.fill:
        notes.append("densify with fill=True (texture-poor regions filled); fill columns: points the fill added, "
                     "their own accuracy, and its seconds on top of densify")

    if args.quick or args.dry_run:
        for name, views, (h, w), target, _ in plan:
            print(f"plan: {name}, {views} views {w}x{h}, device {'cuda' if args.gpu else device.type}"
                  + (f", target {target:.0f} s" if target else ", accuracy/coverage/points targets"))
        if args.gpu and not args.dry_run:
            print("error: --gpu without --dry-run needs a CUDA device", file=sys.stderr)
        with tempfile.TemporaryDirectory() as tmp:
            # the first case's code path on a tiny scene, on the CPU (no time target: not its scene)
            tiny = render_scene(plan[0][0], 12, (48, 64), Path(tmp) / "tiny", samples=2, points=20_000)
            run_cases([plan[0]._replace(target=None)], lambda case: tiny, "cpu", args.fill, warm_up=args.gpu)
        return 0

    if args.gpu and device.type != "cuda":
        print("error: --gpu needs a CUDA device (use --dry-run to check the plan on a CPU)", file=sys.stderr)
        return 2

    def rendered(case: Case) -> Path:
        h, w = case.size
        return render_scene(case.scene, case.views, case.size, cache / f"{case.scene}_{case.views}_{w}x{h}")

    headers, rows = run_cases(plan, rendered, device.type, args.fill, warm_up=args.gpu)
    notes.extend(dict.fromkeys(case.note for case in plan))  # the targets of the cases run, once each
    table = markdown_table(headers, rows)
    print(table)
    record(args, "Dense reconstruction (bench_densify.py)", device, table, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
