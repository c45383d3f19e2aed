"""Issue 16's GPU measurements in one run (a few minutes on an H100/H200).

    python bench/gpu_speed.py                     # on a GPU machine; appends to BENCHMARKS.md
    python bench/gpu_speed.py --dry-run           # CPU, tiny sizes: every step's code, nothing written
    python bench/gpu_speed.py --cpu --steps viewport --points 1m   # host side of the viewport path

Steps, each under the remaining time budget (``--budget-s``), a failure reported and the
next step run:

1. ``info``      device, torch, Triton, whether the CUDA rasterizer loads;
2. ``stages``    1920x1080 with 3M points: rasterize, descriptors of the winners, gather,
                 refiner (fp32), as model.render runs them;
3. ``frames``    model.render fp32 and fp16 autocast at roll 0, at 45 degrees (tiled refiner)
                 and at 45 degrees on the whole canvas; the tiled-vs-whole difference; the
                 same frames with the Triton refiners (``refiner_impl="triton"``: cuDNN
                 convolutions + fused epilogues; ``"triton_conv"``: one implicit-GEMM
                 kernel per gated block);
4. ``refiner``   refiner variants: fp32, fp32/fp16 channels_last, CUDA graphs, and the
                 Triton refiners (``Refiner.impl = "triton"`` / ``"triton_conv"``) fp32/fp16,
                 eager and as a CUDA graph, with their difference to the torch refiner;
5. ``graph``     a whole frame with static shapes (bench/static_frame.py) eager and as one
                 CUDA graph, fp32 and fp16, with the torch and the Triton refiners;
                 difference to model.render;
6. ``published`` bench/bench_published.py (published-style pipeline / ours, 512x512 and
                 1920x1080, 3M points), which appends its own section;
7. ``viewport``  the add-on's viewport path at 1920x1080: worker render request (point
                 layers + NPBG++ + copy to host) -> shared-memory frame -> client copy ->
                 compose -> texture data (and the GPUTexture itself where Blender's gpu
                 module has a context; headless it has none);
8. ``compile``   torch.compile of the refiner in two fresh processes sharing an on-disk
                 inductor cache: compile time cold and warm, then ms per refiner call; the
                 same for the Triton refiners' kernels (Triton's own on-disk cache). Last:
                 the longest step (six fresh processes, cold compiles), cut first when
                 the budget runs out.

``--dry-run`` runs the same code on the CPU with tiny sizes (GPU-only variants report
"skipped"; the Triton kernels run under Triton's interpreter, so their rows check the
plumbing and the values, and their times mean nothing; the implicit-GEMM ones, slow to
interpret, only where their values are checked), for tests/test_gpu_speed.py.
Results go to stdout, ``--json`` and, on a GPU without ``--no-write``, a "GPU speed
(issue 16)" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from bench_common import ROOT, append_benchmarks, bench_camera, markdown_table, parse_ints, parse_sizes, synchronize
from bench_render import synthetic_scene

from npbgpp_core import _backend
from npbgpp_core.models import NPBGPlusPlus, NPBGPlusPlusConfig, refiner_triton

Row = list[str]
# Refiner implementations beside torch: (Refiner.impl, label).
TRITON_IMPLS = (("triton", "fused Triton"), ("triton_conv", "Triton implicit GEMM"))


def timed(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> tuple[float, float]:
    """(best, median) milliseconds of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times), statistics.median(times)


def fmt(t: tuple[float, float]) -> str:
    return f"{t[0]:.2f} / {t[1]:.2f}"


class Context:
    """What every step shares: device, sizes, model, scene, repeats, deadline."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dry = args.dry_run
        self.device = torch.device("cpu" if self.dry or args.cpu else "cuda")
        self.gpu = self.device.type == "cuda"
        self.points = 3000 if self.dry else parse_ints(args.points)[0]
        (self.h, self.w), = [(48, 64)] if self.dry else parse_sizes(args.size)
        self.repeats = 1 if self.dry else args.repeats
        self.deadline = time.time() + args.budget_s
        torch.manual_seed(0)
        self.model = NPBGPlusPlus(NPBGPlusPlusConfig()).to(self.device).eval()
        self.scene = synthetic_scene(self.model, self.points, self.device)
        self.camera = bench_camera(self.h, self.w, self.device)
        self.triton = refiner_triton.supported(self.device)
        self.triton_first_s: float | None = None  # first fused call of this process (kernel builds)

    def first_triton_call(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` once; if it is this process' first use of the Triton kernels, keep
        its wall time (JIT compiles, or loads from Triton's on-disk cache)."""
        t0 = time.perf_counter()
        fn()
        synchronize(self.device)
        if self.triton_first_s is None:
            self.triton_first_s = time.perf_counter() - t0

    def left(self) -> float:
        return self.deadline - time.time()


# ---------------------------------------------------------------------------- steps
def step_info(ctx: Context) -> list[Row]:
    rows = [["torch", torch.__version__], ["device", torch.cuda.get_device_name() if ctx.gpu else "cpu (dry run)"]]
    try:
        import triton  # type: ignore[import-not-found]

        rows.append(["triton", triton.__version__])
    except ImportError:
        rows.append(["triton", "not installed"])
    op = _backend.cuda_rasterizer() if ctx.gpu else None
    rows.append(["CUDA rasterizer", "loaded" if op is not None else f"not used ({_backend.why_unavailable()})"])
    rows.append(["fused Triton refiner", "CUDA kernels" if ctx.gpu and ctx.triton else
                 "interpreter (CPU): values only, times mean nothing" if ctx.triton else "not available"])
    rows.append(["scene", f"{ctx.points:,} points, {ctx.w}x{ctx.h}"])
    return rows


def step_stages(ctx: Context) -> list[Row]:
    from npbgpp_core.rasterizer import gather, rasterize, rasterize_descriptors

    model, scene, cam, dev = ctx.model, ctx.scene, ctx.camera, ctx.device
    scales, near = model.config.scales, model.config.near
    rows = []
    with torch.inference_mode():
        index = rasterize(scene.points, cam, scales, near)
        flat = torch.cat([i.reshape(-1) for i in index])
        winners = torch.unique(flat[flat >= 0])
        desc = model.descriptors(scene, cam, winners)
        remap = torch.full((scene.points.shape[0] + 1,), -1, dtype=torch.long, device=dev)
        remap[winners] = torch.arange(winners.numel(), device=dev)
        local = [remap[i] for i in index]
        rasters = rasterize_descriptors(scene.points, cam, scales, near,
                                        lambda rows_: model.descriptors(scene, cam, rows_))
        example = [r.unsqueeze(0) for r in rasters]
        rows.append(["rasterize (5 scales)",
                     fmt(timed(lambda: rasterize(scene.points, cam, scales, near), dev, ctx.repeats))])
        rows.append(["winners (unique)", fmt(timed(lambda: torch.unique(flat[flat >= 0]), dev, ctx.repeats))])
        rows.append([f"descriptors of {winners.numel():,} winners",
                     fmt(timed(lambda: model.descriptors(scene, cam, winners), dev, ctx.repeats))])
        rows.append([f"descriptors of all {scene.points.shape[0]:,} points",
                     fmt(timed(lambda: model.descriptors(scene, cam), dev, ctx.repeats))])
        rows.append(["gather (5 scales)", fmt(timed(lambda: [gather(i, desc) for i in local], dev, ctx.repeats))])
        rows.append(["refiner fp32", fmt(timed(lambda: model.refiner(example), dev, ctx.repeats))])
        for impl, label in TRITON_IMPLS if ctx.triton else ():
            if ctx.dry and impl == "triton_conv":
                continue  # slow to interpret; its values are checked in the refiner step
            model.refiner.impl = impl
            try:
                ctx.first_triton_call(lambda: model.refiner(example))
                t = timed(lambda: model.refiner(example), dev, ctx.repeats)
                rows.append([f"refiner fp32, {label}", fmt(t)])
            finally:
                model.refiner.impl = "torch"
    return rows


def step_frames(ctx: Context) -> list[Row]:
    model, scene, dev = ctx.model, ctx.scene, ctx.device
    rolled = ctx.camera.rotated_in_plane(math.radians(45))
    rows = []
    for name, cam, dtype, tiled, context in (
        ("model.render fp32, roll 0", ctx.camera, None, True, "exact"),
        ("model.render fp16 autocast, roll 0", ctx.camera, torch.float16, True, "exact"),
        ("model.render fp32, roll 45 (tiled refiner)", rolled, None, True, "exact"),
        ("model.render fp32, roll 45 (whole canvas)", rolled, None, False, "exact"),
        ("model.render fp16 autocast, roll 45 (tiled)", rolled, torch.float16, True, "exact"),
        # The band executor of roll_context='bounded' was measured on the CPU only.
        (f"model.render fp32, roll 45 (bounded context, margin {model.roll_margin})", rolled, None, True,
         "bounded"),
        ("model.render fp16 autocast, roll 45 (bounded context)", rolled, torch.float16, True, "bounded"),
    ):
        if dtype is not None and not ctx.gpu:
            rows.append([name, "skipped (fp16 needs CUDA)"])
            continue
        model.tiled_rendering = tiled
        try:
            t = timed(lambda cam=cam, dtype=dtype, context=context: model.render(scene, cam, dtype,
                                                                                  roll_context=context),
                      dev, ctx.repeats)
            rows.append([name, fmt(t)])
        finally:
            model.tiled_rendering = True
    for impl, label in TRITON_IMPLS if ctx.triton else ():
        ctx.first_triton_call(lambda impl=impl: model.render(scene, ctx.camera, refiner_impl=impl))
        views = (("roll 0", ctx.camera), ("roll 45 (tiled)", rolled))
        if ctx.dry and impl == "triton_conv":
            views = views[:1]  # slow to interpret
        else:
            for name, cam, dtype in (
                (f"model.render fp32, roll 0, {label} refiner", ctx.camera, None),
                (f"model.render fp16 autocast, roll 0, {label} refiner", ctx.camera, torch.float16),
                (f"model.render fp32, roll 45 (tiled), {label} refiner", rolled, None),
            ):
                if dtype is not None and not ctx.gpu:
                    rows.append([name, "skipped (fp16 needs CUDA)"])
                    continue
                t = timed(lambda cam=cam, dtype=dtype, impl=impl: model.render(scene, cam, dtype, refiner_impl=impl),
                          dev, ctx.repeats)
                rows.append([name, fmt(t)])
        for view, cam in views:
            diff = (model.render(scene, cam, refiner_impl=impl) - model.render(scene, cam)).abs().max()
            rows.append([f"max |{label} - torch refiner| model.render fp32, {view}", f"{diff.item():.2e}"])
    if not ctx.triton:
        rows.append(["model.render, Triton refiners", "skipped (Triton not available)"])
    a = model.render(scene, rolled)
    model.tiled_rendering = False
    b = model.render(scene, rolled)
    model.tiled_rendering = True
    rows.append(["max |tiled - whole canvas| at roll 45", f"{(a - b).abs().max().item():.2e}"])
    c = model.render(scene, rolled, roll_context="bounded")
    rows.append(["max |bounded - exact| at roll 45 (an approximation)", f"{(c - a).abs().max().item():.2e}"])
    if ctx.gpu:
        a = model.render(scene, rolled, torch.float16)
        model.tiled_rendering = False
        b = model.render(scene, rolled, torch.float16)
        model.tiled_rendering = True
        rows.append(["max |tiled - whole canvas| at roll 45, fp16 autocast", f"{(a - b).abs().max().item():.2e}"])
    return rows


def step_refiner(ctx: Context) -> list[Row]:
    from npbgpp_core.rasterizer import rasterize_descriptors

    model, scene, cam, dev = ctx.model, ctx.scene, ctx.camera, ctx.device
    with torch.inference_mode():
        rasters = rasterize_descriptors(scene.points, cam, model.config.scales, model.config.near,
                                        lambda r: model.descriptors(scene, cam, r))
    rows = []
    outputs = {}
    for name, dtype, cl, graph, impl in (
        ("fp32", torch.float32, False, False, "torch"),
        ("fp32 channels_last", torch.float32, True, False, "torch"),
        ("fp16 channels_last", torch.float16, True, False, "torch"),
        ("fp32, CUDA graph", torch.float32, False, True, "torch"),
        ("fp16 channels_last, CUDA graph", torch.float16, True, True, "torch"),
        # The fused kernels take any strides but write NCHW: contiguous inputs suit them.
        *((f"{precision}, {label}{graph_}", dtype, False, bool(graph_), impl)
          for impl, label in TRITON_IMPLS for graph_ in ("", ", CUDA graph")
          for precision, dtype in (("fp32", torch.float32), ("fp16", torch.float16))),
    ):
        if not ctx.gpu and (graph or dtype != torch.float32):
            rows.append([name, "skipped (needs CUDA)"])
            continue
        if impl != "torch" and not ctx.triton:
            rows.append([name, "skipped (Triton not available)"])
            continue
        fmt_ = torch.channels_last if cl else torch.contiguous_format
        refiner = copy.deepcopy(model.refiner).to(dtype=dtype, memory_format=fmt_).eval()
        refiner.impl = impl
        example = [r.unsqueeze(0).to(dtype).contiguous(memory_format=fmt_) for r in rasters]
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = refiner(example)  # the warm-up, and the value compared below
            synchronize(dev)
            if impl != "torch" and ctx.triton_first_s is None:
                ctx.triton_first_s = time.perf_counter() - t0
            if not graph:
                outputs[name] = out.float()
            if ctx.dry and impl == "triton_conv":
                rows.append([name, "value only in the dry run (slow to interpret)"])
                continue
            if graph:
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(3):
                        refiner(example)
                torch.cuda.current_stream().wait_stream(stream)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    refiner(example)
                rows.append([name, fmt(timed(g.replay, dev, ctx.repeats))])
            else:
                t = timed(lambda refiner=refiner, example=example: refiner(example), dev, ctx.repeats)
                rows.append([name, fmt(t)])
    for (_, label), precision in ((x, p) for x in TRITON_IMPLS for p in ("fp32", "fp16")):
        fused = outputs.get(f"{precision}, {label}")
        ref = outputs.get("fp32" if precision == "fp32" else "fp16 channels_last")
        if fused is not None and ref is not None:
            rows.append([f"max |{label} - torch| refiner {precision}", f"{(fused - ref).abs().max().item():.2e}"])
    if ctx.triton_first_s is not None:
        rows.append(["Triton refiners: first call of the process, s (kernel JIT or disk cache)",
                     f"{ctx.triton_first_s:.2f}"])
    return rows


def step_graph(ctx: Context) -> list[Row]:
    from static_frame import StaticFrame

    model, scene, cam, dev = ctx.model, ctx.scene, ctx.camera, ctx.device
    rows = []
    variants = [("fp32", None, "torch"), ("fp16 autocast", torch.float16, "torch")]
    for impl, name in TRITON_IMPLS if ctx.triton else ():
        if not (ctx.dry and impl == "triton_conv"):  # slow to interpret
            variants += [(f"fp32, {name} refiner", None, impl), (f"fp16 autocast, {name} refiner", torch.float16, impl)]
    with torch.inference_mode():
        ref = model.render(scene, cam)
        for label, dtype, impl in variants:
            if dtype is not None and not ctx.gpu:
                rows.append([f"static frame {label}", "skipped (needs CUDA)"])
                continue
            model.refiner.impl = impl  # the frame calls model.refiner; a captured graph keeps its kernels
            try:
                frame = StaticFrame(model, scene, cam, dtype)
                frame.set_pose(cam)
                rows.append([f"static frame {label}, eager", fmt(timed(frame, dev, ctx.repeats))])
                diff = (frame()[:3].float().clamp(0, 1) - ref).abs().max().item()
                rows.append([f"static frame {label}: max |frame - model.render|", f"{diff:.2e}"])
                if not ctx.gpu:
                    rows.append([f"static frame {label}, CUDA graph", "skipped (needs CUDA)"])
                    continue
                frame.capture()
                other = ctx.camera.rotated_in_plane(0.0)
                frame.set_pose(other)
                rows.append([f"static frame {label}, CUDA graph replay", fmt(timed(frame, dev, ctx.repeats))])
                diff = (frame()[:3].float().clamp(0, 1) - ref).abs().max().item()
                rows.append([f"static frame {label}, graph: max |frame - model.render|", f"{diff:.2e}"])
            finally:
                model.refiner.impl = "torch"
    return rows


def compile_worker(args: argparse.Namespace) -> int:
    """Child process of the compile step: compile the refiner (inductor or Triton cache
    from the environment), time the first call and then ``--repeats`` calls; print one
    JSON line. ``--triton IMPL``: that Triton refiner (Refiner.impl), fp32 NCHW, instead
    of torch.compile (fp16 channels_last)."""
    device = torch.device(args.device)
    h, w = args.worker_size
    torch.manual_seed(0)
    model = NPBGPlusPlus(NPBGPlusPlusConfig()).to(device).eval()
    dtype = torch.float16 if device.type == "cuda" and not args.triton else torch.float32
    fmt_ = torch.contiguous_format if args.triton else torch.channels_last
    refiner = model.refiner.to(dtype=dtype, memory_format=fmt_)
    rasters = [torch.randn(1, 9, int(s * h), int(s * w), device=device).to(dtype).contiguous(memory_format=fmt_)
               for s in model.config.scales]
    t0 = time.perf_counter()
    if args.triton:
        if not refiner_triton.supported(device):
            raise SystemExit(f"fused Triton refiner not supported on {device}")
        refiner.impl = args.triton
    run = refiner if args.no_compile or args.triton else torch.compile(refiner, dynamic=False)
    with torch.inference_mode():
        run(rasters)
        synchronize(device)
        first = time.perf_counter() - t0
        best, median = timed(lambda: run(rasters), device, args.repeats)
    print(json.dumps({"first_call_s": first, "best_ms": best, "median_ms": median}))
    return 0


def step_compile(ctx: Context) -> list[Row]:
    cache = Path(ctx.args.cache_dir) if ctx.args.cache_dir else Path(tempfile.mkdtemp(prefix="npbgpp_inductor_"))
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache), TORCHINDUCTOR_FX_GRAPH_CACHE="1",
               TORCHINDUCTOR_AUTOGRAD_CACHE="1", TRITON_CACHE_DIR=str(cache / "triton_fused"),
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "bench")]))
    if ctx.dry:
        env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--compile-worker", "--device", str(ctx.device),
           "--worker-size", str(ctx.h), str(ctx.w), "--repeats", str(ctx.repeats)]
    if ctx.dry:
        cmd.append("--no-compile")  # the plumbing only: inductor on a busy CPU takes minutes
    rows = []
    variants = [("eager (dry run)" if ctx.dry else "torch.compile fp16 channels_last", [])]
    for impl, label in TRITON_IMPLS:
        if not ctx.triton:
            rows.append([f"{label} fp32", "skipped (Triton not available)"])
        elif ctx.dry and impl == "triton_conv":
            rows.append([f"{label} fp32", "skipped in the dry run (slow to interpret)"])
        else:
            variants.append((f"{label} fp32" + (" (interpreter)" if ctx.dry else ""), ["--triton", impl]))
    for what, extra in variants:
        for label in ("cold cache", "warm cache (new process)"):
            limit = max(10.0, min(240.0, ctx.left() - 5))
            t0 = time.perf_counter()
            out = subprocess.run(cmd + extra, env=env, capture_output=True, text=True, timeout=limit)
            wall = time.perf_counter() - t0
            if out.returncode != 0:
                rows.append([f"{what}, {label}", f"failed: {out.stderr.strip().splitlines()[-1:]}"])
                continue
            res = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append([f"{what}, {label}: first call s / process wall s",
                         f"{res['first_call_s']:.1f} / {wall:.1f}"])
            rows.append([f"{what}, {label}: refiner ms best / median",
                         f"{res['best_ms']:.2f} / {res['median_ms']:.2f}"])
    rows.append(["inductor cache", str(cache)])
    return rows


def step_published(ctx: Context) -> list[Row]:
    import bench_published

    argv = ["--quick", "--device", "cpu"] if ctx.dry else [
        "--device", "cuda", "--points", ctx.args.points, "--sizes", "512x512,1920x1080", "--repeats", "10"]
    if ctx.args.no_write:
        argv.append("--no-write")
    bench_published.main(argv)
    return [["published-style / ours", "see the table above (and its BENCHMARKS.md section)"]]


def step_viewport(ctx: Context) -> list[Row]:
    from multiprocessing import resource_tracker

    import numpy as np

    from blender_addon import frames, viewport, worker, worker_client
    from npbgpp_core import protocol as P
    from npbgpp_core.scene import NeuralScene
    from npbgpp_core.service import RenderService

    dev = ctx.device
    service = RenderService()
    bundle = NeuralScene.from_aggregated(ctx.model, ctx.scene, name="bench")
    service.bundle, service.renderer, service.device = bundle, bundle.renderer(dev), str(dev)
    request = P.RenderFrame(P.CameraSpec.from_camera(ctx.camera.to("cpu")), source="bundle", neural=True)
    reply = service.handle(request)
    if isinstance(reply, P.Failure):
        raise RuntimeError(reply.error)
    rows = [["worker: render request (points + NPBG++ + to host)",
             fmt(timed(lambda: service.handle(request), dev, ctx.repeats))]]
    buffer = worker._FrameBuffer()
    pixels = np.ascontiguousarray(reply.pixels, dtype=np.float32)
    try:
        name = buffer.put(pixels)
        rows.append(["worker: frame into shared memory", fmt(timed(lambda: buffer.put(pixels), dev, ctx.repeats))])
        def read() -> np.ndarray:
            out = worker_client._read_shared(name, pixels.shape)
            # _read_shared drops the block from this process' resource tracker (it belongs
            # to the worker); here the worker is this process, which still unlinks it.
            resource_tracker.register(buffer.shm._name, "shared_memory")
            return out

        rows.append(["client: frame out of shared memory", fmt(timed(read, dev, ctx.repeats))])
        frame = read()
    finally:
        buffer.close()
    viewport_passes = ("combined",)  # what the viewport asks for; F12 renders build every pass
    rows.append(["client: compose (viewport: combined only)",
                 fmt(timed(lambda: frames.compose(frame, "NEURAL", False, passes=viewport_passes), dev, ctx.repeats))])
    rows.append(["client: compose (F12 render: all passes)",
                 fmt(timed(lambda: frames.compose(frame, "NEURAL", False), dev, ctx.repeats))])
    combined = frames.compose(frame, "NEURAL", False, passes=viewport_passes)["combined"]
    try:
        rows.append(["Blender: GPUTexture (make_texture)",
                     fmt(timed(lambda: viewport.make_texture(combined), dev, ctx.repeats))])
    except Exception as exc:  # noqa: BLE001 - headless: no gpu module or no context
        half = viewport.HALF_MAX
        rows.append(["Blender: texture data (flip, clamp, float32)", fmt(timed(
            lambda: np.ascontiguousarray(np.clip(combined[::-1], -half, half), dtype=np.float32).ravel(),
            dev, ctx.repeats))])
        rows.append(["Blender: GPUTexture upload", f"not measured ({type(exc).__name__}: {str(exc)[:60]})"])
    return rows


STEPS: dict[str, Callable[[Context], list[Row]]] = {
    "info": step_info, "stages": step_stages, "frames": step_frames, "refiner": step_refiner,
    "graph": step_graph, "published": step_published, "viewport": step_viewport, "compile": step_compile,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, nothing written")
    parser.add_argument("--cpu", action="store_true", help="run the chosen steps on the CPU at full size "
                        "(e.g. --steps viewport: the host side of the viewport path); writes nothing")
    parser.add_argument("--points", default="3m")
    parser.add_argument("--size", default="1920x1080", help="WxH")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip the remaining steps after this")
    parser.add_argument("--steps", default=",".join(STEPS), help="comma list of steps to run")
    parser.add_argument("--json", help="write the results here as JSON")
    parser.add_argument("--cache-dir", help="inductor cache for the compile step (default: a fresh temp folder)")
    parser.add_argument("--no-write", action="store_true", help="do not append to BENCHMARKS.md")
    parser.add_argument("--compile-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-compile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--triton", choices=[impl for impl, _ in TRITON_IMPLS], help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--worker-size", type=int, nargs=2, default=(1080, 1920), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.compile_worker:
        return compile_worker(args)
    if not args.dry_run and not args.cpu and not torch.cuda.is_available():
        parser.error("no CUDA GPU visible; use --dry-run on a CPU machine")
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        parser.error(f"unknown steps {unknown}; choose from {','.join(STEPS)}")
    if args.dry_run:
        torch.set_num_threads(1)  # small tensors; shared CPUs stall with more threads
        # The fused refiner's kernels through Triton's interpreter (read when they are built).
        os.environ["TRITON_INTERPRET"] = "1"
    ctx = Context(args)
    results: dict[str, list[Row]] = {}
    failed = []
    for name in steps:
        if ctx.left() < 5:
            results[name] = [["skipped", "time budget spent"]]
            failed.append(name)
            continue
        t0 = time.perf_counter()
        try:
            results[name] = STEPS[name](ctx)
        except Exception as exc:  # noqa: BLE001 - report and go on with the next step
            traceback.print_exc()
            results[name] = [["failed", f"{type(exc).__name__}: {str(exc)[:200]}"]]
            failed.append(name)
        print(f"=== {name} ({time.perf_counter() - t0:.1f} s)", flush=True)
        print(markdown_table(["what", "ms best / median (or value)"], results[name]), flush=True)
    body = "\n\n".join(f"**{name}**\n\n" + markdown_table(["what", "ms best / median (or value)"], rows)
                       for name, rows in results.items())
    if args.json:
        summary = {"dry_run": args.dry_run, "failed": failed, "results": results}
        Path(args.json).write_text(json.dumps(summary, indent=1))
    if ctx.gpu and not args.no_write:
        notes = [f"bench/gpu_speed.py: {ctx.points:,} random points, {ctx.w}x{ctx.h}, random weights, "
                 f"best / median of {ctx.repeats} after a warm-up"]
        append_benchmarks("GPU speed (issue 16)", ctx.device, body, notes)
    print(f"=== gpu_speed: {'FAILED ' + ','.join(failed) if failed else 'all steps ran'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
