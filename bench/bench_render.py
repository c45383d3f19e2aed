"""Full NPBG++ frame: rasterize + descriptors (aggregator evaluation) + refiner.

    python bench/bench_render.py                  # defaults for the device, appends to BENCHMARKS.md
    python bench/bench_render.py --quick          # smoke test: tiny sizes, no file written
    python bench/bench_render.py --points 3m --sizes 1920x1080 --device cuda
    python bench/bench_render.py --variants render --rolls 0,10,45   # any roll vs roll 0, one run

The scene is synthetic (random points and random aggregated coefficients: speed does not
depend on the values). Variants on a GPU: fp32; fp16/bf16 weights with channels_last; the
refiner replayed as a CUDA graph; the refiner under torch.compile. On the CPU: fp32 with
and without channels_last. "frame" runs without in-plane alignment (image exactly WxH);
"model.render" is the public call with the configured alignment (a padded square).
Targets: H100 1920x1080 frame < 16 ms; CPU 512x512 with 1M points: frame < 400 ms and
live preview >= 4 FPS.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import time
from collections.abc import Callable
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
    synchronize,
    time_call,
)

from npbgpp_core.models import NPBGPlusPlus, NPBGPlusPlusConfig
from npbgpp_core.models.aggregator import AggregatedScene
from npbgpp_core.rasterizer import gather, rasterize, rasterize_descriptors

GPU_POINTS, GPU_SIZES = "1m,3m", "512x512,1920x1080"
# key: (label, refiner dtype, channels_last, refiner mode); "render" (model.render) is not a refiner variant
VARIANT_KEYS: dict[str, tuple[str, torch.dtype, bool, str]] = {
    "fp32": ("fp32", torch.float32, False, "eager"),
    "fp32_cl": ("fp32 channels_last", torch.float32, True, "eager"),
    "fp16_cl": ("fp16 channels_last", torch.float16, True, "eager"),
    "bf16_cl": ("bf16 channels_last", torch.bfloat16, True, "eager"),
    "fp16_cl_graph": ("fp16 channels_last, CUDA graph refiner", torch.float16, True, "graph"),
    "fp16_cl_compile": ("fp16 channels_last, torch.compile refiner", torch.float16, True, "compile"),
}
CPU_POINTS, CPU_SIZES = "1m", "512x512"


def synthetic_scene(model: NPBGPlusPlus, n: int, device: torch.device) -> AggregatedScene:
    cfg = model.config
    rows = 1 + cfg.basis_dim if cfg.aggregator == "sphere" else 1
    g = torch.Generator().manual_seed(1)
    coefficients = (torch.randn(n, rows, cfg.feature_dim, generator=g) * 0.3).to(device)
    valid = torch.ones(n, dtype=torch.bool, device=device)
    return AggregatedScene(random_cloud(n, seed=2, device=device), coefficients, valid)


def refiner_runner(model: NPBGPlusPlus, mode: str, dtype: torch.dtype, channels_last: bool,
                   example: list[torch.Tensor]) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """The refiner in the given dtype/layout, run eagerly, as a CUDA graph or compiled."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    refiner = copy.deepcopy(model.refiner).to(dtype=dtype, memory_format=fmt).eval()
    if mode == "eager":
        return refiner
    if mode == "compile":
        compiled = torch.compile(refiner, dynamic=False)
        compiled(example)  # compile now, not inside the timing
        return compiled
    if mode == "graph":
        static_in = [r.clone() for r in example]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                refiner(static_in)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = refiner(static_in)

        def run(rasters: list[torch.Tensor]) -> torch.Tensor:
            for dst, src in zip(static_in, rasters, strict=True):
                dst.copy_(src)
            graph.replay()
            return static_out

        return run
    raise ValueError(mode)


def load_line() -> str:
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return "load average unknown"
    return f"load average {one:.1f} (1 min) / {five:.1f} (5 min) on {os.cpu_count()} cores"


# exact tiled refiner, exact whole canvas, bounded context ('bounded:M': roll_margin M)
ROLL_MODES = ("tiled", "whole", "bounded")


def set_roll_mode(model: NPBGPlusPlus, mode: str, margin: int) -> None:
    name, _, m = mode.partition(":")
    model.tiled_rendering = name != "whole"
    model.roll_context = "bounded" if name == "bounded" else "exact"
    model.roll_margin = int(m) if m else margin


def roll_sweep(model: NPBGPlusPlus, counts: list[int], sizes: list[tuple[int, int]], rolls: list[float],
               device: torch.device, repeats: int, margin: int, modes: list[str]) -> list[list[str]]:
    """model.render at each roll in each of ``modes`` (:data:`ROLL_MODES`: exact with the
    tiled refiner, exact on the whole canvas, bounded context with ``roll_margin`` =
    ``margin``); every (roll, mode) once per round so that load drifts hit all alike.
    Ratios are given for wall time and for the process' CPU time (with one torch thread
    the latter leaves out the time the shared cores spent on other jobs)."""
    from npbgpp_core.models.alignment import render_canvas_camera

    rows = []
    for n in counts:
        scene = synthetic_scene(model, n, device)
        for h, w in sizes:
            cams = {r: bench_camera(h, w, device).rotated_in_plane(math.radians(r)) if r else bench_camera(h, w, device)
                    for r in rolls}
            runs = {(r, mode): cam for r, cam in cams.items() for mode in modes}
            wall: dict = {key: [] for key in runs}
            cpu: dict = {key: [] for key in runs}
            for rnd in range(repeats + 1):  # round 0 is the warm-up
                for (r, mode), cam in runs.items():
                    set_roll_mode(model, mode, margin)
                    synchronize(device)
                    t0, c0 = time.perf_counter(), time.process_time()
                    model.render(scene, cam)
                    synchronize(device)
                    if rnd:
                        wall[(r, mode)].append(time.perf_counter() - t0)
                        cpu[(r, mode)].append(time.process_time() - c0)
            set_roll_mode(model, "tiled", margin)
            base = statistics.median(wall[(rolls[0], modes[0])])
            base_cpu = statistics.median(cpu[(rolls[0], modes[0])])
            for r, cam in cams.items():
                canvas = render_canvas_camera(cam, model.config.render_canvas, model.config.world_up)[0].image_size
                row = [f"{n:,}", f"{w}x{h}", f"{r:g}", f"{canvas[0]}x{canvas[1]}"]
                for mode in modes:
                    t, c = wall[(r, mode)], cpu[(r, mode)]
                    row += [f"{min(t) * 1e3:.1f} / {statistics.median(t) * 1e3:.1f}",
                            f"{statistics.median(t) / base:.2f} / {statistics.median(c) / base_cpu:.2f}"]
                rows.append(row)
                print(" | ".join(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", help=f"point counts (default GPU {GPU_POINTS}, CPU {CPU_POINTS})")
    parser.add_argument("--sizes", help=f"image sizes WxH (default GPU {GPU_SIZES}, CPU {CPU_SIZES})")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant (slow to build)")
    parser.add_argument("--variants", help="comma list of variant keys to run (default all for the device): "
                        + ",".join(VARIANT_KEYS) + ",render (model.render)")
    parser.add_argument("--rolls", help="camera rolls in degrees for a model.render roll table, timed interleaved "
                        "in one run: exact (tiled refiner), exact (whole canvas), bounded context (e.g. 0,10,45)")
    parser.add_argument("--roll-modes", default=",".join(ROLL_MODES),
                        help=f"modes of the roll table, the first is the roll-0 base: {','.join(ROLL_MODES)}, "
                        "bounded:MARGIN (e.g. tiled,bounded:8,bounded:16)")
    parser.add_argument("--roll-margin", type=int, default=None,
                        help="roll_margin of the bounded-context column (default the model's)")
    add_common_args(parser)
    args = parser.parse_args(argv)

    device = device_from_args(args)
    gpu = device.type == "cuda"
    if args.quick:
        counts, sizes, repeats = [2000], [(64, 64)], 1
    else:
        counts = parse_ints(args.points or (GPU_POINTS if gpu else CPU_POINTS))
        sizes = parse_sizes(args.sizes or (GPU_SIZES if gpu else CPU_SIZES))
        repeats = args.repeats or (20 if gpu else 3)
    if args.variants:
        keys = [k.strip() for k in args.variants.split(",") if k.strip()]
        unknown = [k for k in keys if k not in VARIANT_KEYS and k != "render"]
        if unknown:
            parser.error(f"unknown variant(s) {unknown}; choose from {','.join(VARIANT_KEYS)},render")
        if not gpu and any(k != "render" and (VARIANT_KEYS[k][1] != torch.float32 or VARIANT_KEYS[k][3] != "eager")
                           for k in keys):
            parser.error("fp16/bf16, CUDA graph and compile variants need --device cuda")
    elif gpu:
        keys = ["fp32", "fp16_cl", "bf16_cl", "fp16_cl_graph"]
        if not args.no_compile and not args.quick:
            keys.append("fp16_cl_compile")
    else:
        keys = ["fp32", "fp32_cl"]
    variants = [VARIANT_KEYS[k] for k in keys if k != "render"]
    render_variants = not args.variants or "render" in keys

    model = NPBGPlusPlus(NPBGPlusPlusConfig()).to(device).eval()
    scales, near = model.config.scales, model.config.near
    frame_rows, stage_rows = [], []
    for n in counts:
        scene = synthetic_scene(model, n, device)
        points = scene.points
        for h, w in sizes:
            camera = bench_camera(h, w, device)
            with torch.inference_mode():
                index = rasterize(points, camera, scales, near)
                flat = torch.cat([i.reshape(-1) for i in index])
                winners = torch.unique(flat[flat >= 0])
                desc = model.descriptors(scene, camera)

                def descriptors_of(rows, camera=camera, scene=scene):
                    return model.descriptors(scene, camera, rows)  # scene.valid is all True

                rasters = rasterize_descriptors(points, camera, scales, near, descriptors_of)
                t_rast = time_call(partial(rasterize, points, camera, scales, near), device, repeats)
                t_desc = time_call(partial(descriptors_of, winners), device, repeats)
                t_gath = time_call(lambda: [gather(i, desc) for i in index], device, repeats)  # noqa: B023
                stage_rows.append([f"{n:,}", f"{w}x{h}", fmt_ms(t_rast), fmt_mb(t_rast.peak_bytes),
                                   f"{winners.numel():,}", fmt_ms(t_desc), fmt_ms(t_gath)])
                for name, dtype, channels_last, mode in variants:
                    fmt = torch.channels_last if channels_last else torch.contiguous_format
                    example = [r.unsqueeze(0).to(dtype).contiguous(memory_format=fmt) for r in rasters]
                    try:
                        run_refiner = refiner_runner(model, mode, dtype, channels_last, example)

                        def frame(dtype=dtype, fmt=fmt, run_refiner=run_refiner, camera=camera,
                                  descriptors_of=descriptors_of, points=points):
                            rs = rasterize_descriptors(points, camera, scales, near, descriptors_of)
                            return run_refiner([r.unsqueeze(0).to(dtype).contiguous(memory_format=fmt) for r in rs])

                        t_ref = time_call(partial(run_refiner, example), device, repeats)
                        t_frame = time_call(frame, device, repeats)
                    except Exception as exc:  # noqa: BLE001 - report and go on with the other variants
                        frame_rows.append([f"{n:,}", f"{w}x{h}", name, f"failed: {type(exc).__name__}: {exc}"[:80],
                                           "", "", ""])
                        print(" | ".join(frame_rows[-1]), flush=True)
                        continue
                    frame_rows.append([f"{n:,}", f"{w}x{h}", name, fmt_ms(t_ref), fmt_ms(t_frame),
                                       f"{1 / t_frame.median:.1f}", fmt_mb(t_frame.peak_bytes)])
                    print(" | ".join(frame_rows[-1]), flush=True)
            if not render_variants:
                continue
            t_render = time_call(partial(model.render, scene, camera), device, repeats)
            frame_rows.append([f"{n:,}", f"{w}x{h}", "model.render fp32 (with alignment)", "", fmt_ms(t_render),
                               f"{1 / t_render.median:.1f}", fmt_mb(t_render.peak_bytes)])
            print(" | ".join(frame_rows[-1]), flush=True)
            if gpu:
                t_r16 = time_call(partial(model.render, scene, camera, torch.float16), device, repeats)
                frame_rows.append([f"{n:,}", f"{w}x{h}", "model.render fp16 autocast (with alignment)", "",
                                   fmt_ms(t_r16), f"{1 / t_r16.median:.1f}", fmt_mb(t_r16.peak_bytes)])

    roll_table = ""
    if args.rolls:
        rolls = [float(r) for r in args.rolls.split(",") if r.strip()]
        margin = model.roll_margin if args.roll_margin is None else args.roll_margin
        modes = [m.strip() for m in args.roll_modes.split(",") if m.strip()]
        if not modes or any(m.partition(":")[0] not in ROLL_MODES or (m.partition(":")[2] and (
                m.partition(":")[0] != "bounded" or not m.partition(":")[2].isdigit())) for m in modes):
            parser.error(f"--roll-modes takes a comma list of {','.join(ROLL_MODES)} (bounded:MARGIN for a "
                         f"margin of its own), got {args.roll_modes!r}")
        roll_rows = roll_sweep(model, counts, sizes, rolls, device, repeats, margin, modes)
        names = {"tiled": "exact (tiled)", "whole": "exact whole canvas"}
        header = ["points", "image WxH", "roll deg", "canvas HxW"]
        for mode in modes:
            label = names.get(mode) or f"bounded (margin {mode.partition(':')[2] or margin})"
            header += [f"{label} ms best / median", "x roll 0: wall / CPU (medians)"]
        roll_table = markdown_table(header, roll_rows)
        print()
        print(roll_table)
    frame_table = markdown_table(
        ["points", "image WxH", "variant", "refiner ms best / median", "frame ms best / median", "FPS (median)",
         "frame peak MB"], frame_rows
    )
    stage_table = markdown_table(
        ["points", "image WxH", "rasterize ms (5 scales)", "rasterize peak MB", "winning points",
         "descriptors ms (winners)", "gather ms (5 scales)"],
        stage_rows,
    )
    print()
    print(stage_table)
    print()
    print(frame_table)
    notes = [
        f"device {device}, NPBG++ default config (sphere aggregator, 8 features, 5 scales), random weights",
        f"ms as best / median of {repeats} runs after 1 warm-up; "
        "frame = rasterize + descriptors of the winning points + gather + refiner (as NPBG++ renders), "
        "no alignment; model.render includes in-plane alignment (renders the rolled target's bounding box, "
        "exactly H x W at roll 0, then warps back)",
    ]
    if roll_table:
        notes.append(f"roll table: model.render at each roll, exact with the tiled refiner (roll_context='exact', "
                     f"the default), exact on the whole aligned canvas (tiled_rendering=False) and/or with the bounded "
                     f"context (roll_context='bounded'), all interleaved round by round ({repeats} rounds after a "
                     f"warm-up) so machine load hits every column alike; ratios against the first mode at roll 0, of "
                     f"median wall time and of median process CPU time; {load_line()}")
    record(args, "Full frame (NPBG++)", device, stage_table + "\n\n" + frame_table
           + ("\n\n" + roll_table if roll_table else ""), notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
