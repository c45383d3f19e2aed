"""A user's capture with big photos: what Aggregate Descriptors, Fit to Photos and an F12
still cost in time and memory when the photos are 1000-4032 px (BENCHMARKS.md, "A user's
capture with big photos: time and memory").

Three commands:

    python bench/bench_big_photos.py upscale SRC OUT --long-side 2048
    python bench/bench_big_photos.py run DATASET --work DIR [--stages aggregate,fit,render,score]
        [--undistort] [--round-resampled on|off] [--max-views N] [--extractor-tiles on|off]
    python bench/bench_big_photos.py extractor --size WxH [--decode auto|whole|tiles|encoder]

``upscale`` writes a copy of the COLMAP capture ``SRC`` whose photos are resized with PIL's
Lanczos filter so their long side is ``--long-side`` pixels (enlarged, or shrunk when smaller).
A prepared capture (PINHOLE cameras, as ``bench/rebuild_captures.py`` writes them) gets each
camera's intrinsics scaled with its photo (COLMAP's pixel-edge convention: fx, cx by the
width's factor, fy, cy by the height's). A raw model with lens distortion (SIMPLE_RADIAL,
OPENCV: a phone capture before ``prepare-capture`` undistorts it) is copied as it is: the
loader scales each camera to its photo's size (``distortion.view_cameras``, as it does for
prepare-capture's downscaled photos), and the distortion coefficients, on normalised
coordinates, do not change with the size; ``run --undistort`` then loads it as the add-on's
Undistort does. The poses and points are the source's. The public captures' originals are
about 1000 px, so an enlarged copy is the only way to give the pipeline photos of a phone's
size: it costs what such photos cost, not what they would score.

``run`` drives :class:`npbgpp_core.service.RenderService` with the requests the add-on sends
on its defaults (``blender_addon/operators.py``, ``render_job.py``, ``properties.py``):
``AggregateBegin`` with no weights, Network Auto and Photo Size at the add-on's default after
Import Dataset (:func:`addon_photo_size`: Import Dataset sets the render to the size most photos
have, and Photo Size, Follow Render by default, is that render's long side clamped to 2048-4096 px,
``protocol.photo_size_for_render``, the add-on's own rule; so photos of 1920 px are read at 2048,
of 4032 at their own size; ``--photo-size`` gives another, 2048 the default before the add-on's
followed the render, 0 each photo at its own size, what the section's first figures ran, before
the option), one ``AggregateView`` per view, then
``FitBegin`` (200 steps, Check Fit on a Photo, Fit Upright, Also Try Whole Views Auto) and
``FitStep`` requests of 0.25 s until finished, then ``LoadBundle`` of the fitted bundle and a
``RenderFrame`` of the first training camera widened to 1920x1080 (the network on, Tile Size 2048,
the exact roll context, torch refiner: an F12 still), and one of the first held-out camera. It
prints one JSON line per stage: wall seconds, the longest single request (the add-on's Worker
Timeout, 600 s by default, stops a worker that takes longer over one request), each request
type's count, seconds, longest and peak resident memory, the stage's peak resident memory (the
process's high-water mark, reset through ``/proc/self/clear_refs``), any failure or warning, and
each still's PSNR against its photo (:func:`still_psnr`). ``score`` renders every held-out view
of the fitted bundle at its photo's own size (``RenderFrame``, the network on, as an F12 frame of
that camera) and gives its PSNR against the photo as loaded (undistorted floats with
``--undistort``). ``--round-resampled off`` makes the fit hold undistorted photos as floats
(``scene_fit.FIT_ROUND_RESAMPLED``; the worker runs in this process). ``--extractor-tiles off``
makes the feature extractor decode every photo whole, as before it decoded big ones in tiles
(``models.extractor.TILE_ABOVE_SIDE``); ``--max-views N`` aggregates only the first N views
(shorter before/after runs).

``extractor`` times one gradient-free call of the feature extractor (random weights) on one
random image of ``--size`` and gives the peak resident memory above the process's before it:
``--decode`` auto (the module's threshold decides), whole, tiles (forced at any size), or encoder
(the encoder alone, what the tiles leave whole). The worker runs the stages
in one process, so its peak is the largest stage's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

F12_SIZE = (1080, 1920)  # (H, W) of the still
TILE_SIZE = 2048  # properties.tile_size's default: RenderFrame.max_pixels is its square
FIT_STEP_SECONDS = 0.25  # FitStep's default, what the add-on's modal operator sends
STAGES = ("aggregate", "fit", "render", "score")
DISTORTED_MODELS = ("SIMPLE_RADIAL", "OPENCV")  # the loader's models with distortion (datasets.colmap)


def upscale_capture(src: str, out: str, long_side: int) -> dict[str, Any]:
    """Write ``src`` (a COLMAP capture: PINHOLE cameras, or a raw one with SIMPLE_RADIAL /
    OPENCV) to ``out`` with photos resized to a long side of ``long_side`` px; returns the
    summary written to ``out/capture.json``."""
    from PIL import Image

    from npbgpp_core.atomic import atomic_directory
    from npbgpp_core.datasets.capture import _write_cameras_bin
    from npbgpp_core.datasets.colmap import _model_file, _read_model, find_sparse_dir

    sparse = find_sparse_dir(src)
    if sparse is None:
        raise SystemExit(f"{src}: no COLMAP sparse model")
    cams, images, _ = _read_model(sparse)
    models = {m for m, _, _, _ in cams.values()}
    if not models <= {"PINHOLE", *DISTORTED_MODELS}:
        raise SystemExit(f"{src}: cameras of {sorted(models)}; upscale reads PINHOLE, SIMPLE_RADIAL and OPENCV")
    # a distorted model is copied as it is (the loader scales its cameras to the photos), a PINHOLE one scaled
    distorted = bool(models & set(DISTORTED_MODELS))
    out_cams = []
    sizes = set()
    with atomic_directory(out, overwrite=False) as tmp:
        os.makedirs(os.path.join(tmp, "images"))
        os.makedirs(os.path.join(tmp, "sparse", "0"))
        for _, (_, _, cam_id, name) in sorted(images.items()):
            model, cw, ch, params = cams[cam_id]
            with Image.open(os.path.join(src, "images", name)) as im:
                photo = im.convert("RGB")
            if photo.size != (cw, ch):
                raise SystemExit(f"{src}/images/{name} is {photo.size}, its camera {(cw, ch)}")
            scale = long_side / max(cw, ch)
            nw, nh = round(cw * scale), round(ch * scale)
            photo.resize((nw, nh), Image.Resampling.LANCZOS).save(os.path.join(tmp, "images", name), quality=95)
            sizes.add(f"{nw}x{nh}")
            if distorted:
                continue
            fx, fy, cx, cy = params
            sx, sy = nw / cw, nh / ch  # COLMAP's principal point is measured from the pixel edge: scales as is
            out_cams.append((cam_id, nw, nh, (fx * sx, fy * sy, cx * sx, cy * sy)))
        if distorted:
            copied = ("cameras", "images", "points3D")
        else:
            copied = ("images", "points3D")
            _write_cameras_bin(os.path.join(tmp, "sparse", "0", "cameras.bin"), sorted(out_cams))
        for stem in copied:
            path = _model_file(sparse, stem)  # .bin or .txt, as the loader finds it
            if path is not None:
                shutil.copyfile(path, os.path.join(tmp, "sparse", "0", os.path.basename(path)))
        summary = {"source": os.path.abspath(src), "upscaled_to": long_side, "filter": "PIL LANCZOS",
                   "images": len(images), "image_sizes": sorted(sizes), "camera_models": sorted(models)}
        with open(os.path.join(tmp, "capture.json"), "w") as f:
            json.dump(summary, f, indent=1)
    return summary


def _reset_peak_rss() -> bool:
    """Reset the process's resident high-water mark (Linux: "5" to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    """The resident high-water mark since the last reset (VmHWM), else ru_maxrss, in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StageLog:
    """Sends requests to the service, timing each; collects failures and warnings."""

    def __init__(self, service: Any, stage: str, size: str) -> None:
        self.service, self.stage, self.size = service, stage, size
        self.longest = 0.0
        self.longest_op = ""
        self.requests = 0
        # request type -> [count, seconds in all, longest, peak RSS MiB while one ran]
        self.by_op: dict[str, list[float]] = {}
        self.stage_peak = 0.0
        self.failure = ""
        self.caught: list[warnings.WarningMessage] = []

    def ask(self, req: Any) -> Any:
        from npbgpp_core import protocol as P

        stage_peak = _peak_rss_mib()
        _reset_peak_rss()  # this request's own peak, then the stage's again
        t0 = time.perf_counter()
        reply = self.service.handle(req)
        dt = time.perf_counter() - t0
        peak = _peak_rss_mib()
        self.stage_peak = max(self.stage_peak, stage_peak, peak)
        self.requests += 1
        count, total, longest, top = self.by_op.get(type(req).__name__, [0, 0.0, 0.0, 0])
        self.by_op[type(req).__name__] = [count + 1, round(total + dt, 2), round(max(longest, dt), 2),
                                          round(max(top, peak))]
        if dt > self.longest:
            self.longest, self.longest_op = dt, type(req).__name__
        if isinstance(reply, P.Failure):
            self.failure = reply.error
            raise RuntimeError(reply.error)
        return reply

    def report(self, seconds: float, extra: dict[str, Any]) -> dict[str, Any]:
        notes = sorted({f"{w.category.__name__}: {w.message}" for w in self.caught})
        return {"size": self.size, "stage": self.stage, "seconds": round(seconds, 1),
                "longest_request_s": round(self.longest, 1), "longest_request": self.longest_op,
                "requests": self.requests, "by_request": self.by_op,
                "peak_rss_mib": round(max(self.stage_peak, _peak_rss_mib())),
                "failure": self.failure, "warnings": notes, **extra}


def extractor_call(width: int, height: int, decode: str = "auto") -> dict[str, Any]:
    """One gradient-free feature-extractor call on a random (1, 3, height, width) image: seconds
    and peak RSS above the process's before the call (MiB)."""
    import torch

    from npbgpp_core.models import FeatureExtractor, extractor

    if decode not in ("auto", "whole", "tiles", "encoder"):
        raise ValueError(f"decode must be auto, whole, tiles or encoder, got {decode!r}")
    if decode == "whole":
        extractor.TILE_ABOVE_SIDE = sys.maxsize
    elif decode == "tiles":
        extractor.TILE_ABOVE_SIDE = 0
    torch.manual_seed(0)
    model = FeatureExtractor(8).eval()
    image = torch.rand(1, 3, height, width)
    _reset_peak_rss()
    before = _peak_rss_mib()
    t0 = time.perf_counter()
    with torch.no_grad():
        if decode == "encoder":
            model.encoder((image - model.mean) / model.std)
        else:
            model(image)
    return {"size": f"{width}x{height}", "megapixels": round(width * height / 1e6, 2), "decode": decode,
            "tile_above_side": extractor.TILE_ABOVE_SIDE, "seconds": round(time.perf_counter() - t0, 2),
            "peak_rss_above_mib": round(_peak_rss_mib() - before)}


def addon_photo_size(data: Any) -> int:
    """The add-on's Photo Size, Follow Render (its default), after Import Dataset of ``data`` (a loaded scene): the
    render Import Dataset sets, the size most photos have (``image_size.most_common_size``, as
    ``importers.render_photo_size``), through the add-on's rule (``protocol.photo_size_for_render``)."""
    from npbgpp_core.image_size import most_common_size
    from npbgpp_core.protocol import photo_size_for_render

    height, width = most_common_size(tuple(v.camera.image_size) for v in data.views)
    return photo_size_for_render(width, height)


def run_stages(dataset: str, work: str, stages: list[str], size: str, photo_size: int | None = None,
               undistort: bool = False, max_views: int = 0) -> list[dict[str, Any]]:
    """Each stage in turn as the add-on asks for it; one report per stage run. ``photo_size``:
    Aggregate's Photo Size (AggregateBegin.max_side; None: the add-on's default after Import
    Dataset, :func:`addon_photo_size`; 0: each photo at its own size).
    ``undistort``: its Undistort on.
    ``max_views``: Aggregate sends only the first that many AggregateView requests (0: all), a
    shorter run for before/after comparisons of the stage (its bundle sees fewer views)."""
    import torch

    from npbgpp_core import protocol as P
    from npbgpp_core import scene_fit
    from npbgpp_core.datasets import load_scene
    from npbgpp_core.metrics import psnr
    from npbgpp_core.models import extractor
    from npbgpp_core.service import RenderService

    os.makedirs(work, exist_ok=True)
    options = {"undistort": True} if undistort else {}  # only COLMAP and nerfstudio loaders take it
    bundle, fitted = os.path.join(work, "scene.npbgpp"), os.path.join(work, "scene_fitted.npbgpp")
    service = RenderService()
    reports = []
    for stage in stages:
        _reset_peak_rss()
        log = StageLog(service, stage, size)
        extra: dict[str, Any] = {}
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                if stage == "aggregate":
                    # Weights empty, Network Auto, the operator's Photo Size (after Import Dataset: the
                    # dataset read first, as the add-on's import does)
                    if photo_size is None:
                        photo_size = addon_photo_size(load_scene(dataset, require_points=False, **options))
                    started = log.ask(P.AggregateBegin(dataset, "", max_side=photo_size, undistort=undistort))
                    views = min(started.views, max_views) if max_views > 0 else started.views
                    for k in range(views):
                        log.ask(P.AggregateView(k))
                    result = log.ask(P.AggregateFinish(bundle))
                    extra = {"views": views, "network": os.path.basename(started.weights),
                             "points": result.points, "seen": result.valid, "photo_size": photo_size,
                             "tile_above_side": extractor.TILE_ABOVE_SIDE}
                elif stage == "fit":
                    # the operator's defaults: 200 steps, Check Fit on a Photo, Fit Upright, Also Try Whole
                    # Views Auto (recipes and combine None: the worker decides by the photos' size)
                    progress = log.ask(P.FitBegin(bundle, dataset, steps=200, device="AUTO", aligned=True,
                                                  check_view=True, check_recipes=None, check_combine=None,
                                                  undistort=undistort))
                    while not progress.finished:
                        progress = log.ask(P.FitStep(FIT_STEP_SECONDS))
                    info = log.ask(P.FitFinish(fitted))
                    extra = {"fit_seconds": round(info.seconds, 1), "kept": info.kept, "outcome": info.outcome,
                             "round_resampled": scene_fit.FIT_ROUND_RESAMPLED,
                             "loss": [round(info.loss_first, 4), round(info.loss_last, 4)]}
                elif stage == "render":
                    log.ask(P.LoadBundle(fitted, "AUTO", "FP32"))
                    data = load_scene(dataset, require_points=False, **options)
                    # the F12 still of the first training camera (what a user renders), then one of
                    # the first held-out camera (a photo the bundle never saw: a fairer PSNR)
                    stills = [("train", (list(data.train) or [0])[0])] + [("held_out", i) for i in data.test[:1]]
                    for label, view in stills:
                        still = f12_camera(data.views[view].camera)
                        frame = log.ask(P.RenderFrame(P.CameraSpec.from_camera(still), "bundle", True,
                                                      TILE_SIZE * TILE_SIZE, 1, "exact", "torch", True))
                        neural = torch.from_numpy(frame.pixels[..., P.NEURAL]).permute(2, 0, 1)
                        extra[label] = {
                            "view": data.views[view].name, "frame": f"{still.width}x{still.height}",
                            "finite": bool(torch.isfinite(neural).all()),
                            "points_on_pixels": int((frame.pixels[..., P.POINTS_RGBA.stop - 1] > 0).sum()),
                            "psnr_vs_photo": round(still_psnr(neural, data.load_image(view)), 2)}
                elif stage == "score":
                    log.ask(P.LoadBundle(fitted, "AUTO", "FP32"))
                    data = load_scene(dataset, require_points=False, **options)
                    scores = {}
                    for view in data.test:
                        camera = data.views[view].camera
                        frame = log.ask(P.RenderFrame(P.CameraSpec.from_camera(camera), "bundle", True,
                                                      TILE_SIZE * TILE_SIZE, 1, "exact", "torch", True))
                        neural = torch.from_numpy(frame.pixels[..., P.NEURAL]).permute(2, 0, 1)
                        scores[data.views[view].name] = round(float(psnr(neural.float(), data.load_image(view))), 3)
                    extra = {"held_out_psnr": scores,
                             "mean_psnr": round(sum(scores.values()) / len(scores), 3) if scores else None}
                else:
                    raise ValueError(f"unknown stage {stage!r}; expected {STAGES}")
            except Exception as exc:  # noqa: BLE001 - a failing stage is what this bench reports
                log.failure = log.failure or f"{type(exc).__name__}: {exc}"
            log.caught = list(caught)
        reports.append(log.report(time.perf_counter() - t0, extra))
        print(json.dumps(reports[-1]), flush=True)
        if log.failure:
            break
    return reports


def f12_camera(camera: Any) -> Any:
    """``camera`` (a training view's) as a 1920x1080 output sees it: the horizontal field of
    view kept (Blender's sensor fit for a landscape frame), the principal point's offset from
    the centre scaled alike, square pixels."""
    import numpy as np

    from npbgpp_core.camera import Camera

    K, R, t = camera.to_opencv()
    h, w = camera.image_size
    H, W = F12_SIZE
    s = W / w
    # OpenCV's K has pixel centres at integers: the offset from the image's centre is taken
    # in edge coordinates (+0.5), where scaling is exact, and brought back (-0.5)
    cx = W / 2 + (K[0, 2] + 0.5 - w / 2) * s - 0.5
    cy = H / 2 + (K[1, 2] + 0.5 - h / 2) * s - 0.5
    K2 = np.array([[K[0, 0] * s, 0.0, cx], [0.0, K[1, 1] * s, cy], [0.0, 0.0, 1.0]])
    return Camera.from_opencv(K2, R, t, (H, W))


def still_psnr(still: Any, photo: Any) -> float:
    """PSNR in dB of a (3, H, W) still of :func:`f12_camera` against its training photo
    (3, h, w): the photo area-resized to the still's width and cut to the still's rows about
    its centre (the field of view the still keeps). The same for every photo size when the
    pipeline does not depend on it; the sub-pixel offset of the rounded rows costs a little."""
    import torch.nn.functional as F

    from npbgpp_core.metrics import psnr

    H, W = still.shape[-2:]
    h, w = photo.shape[-2:]
    rows = round(h * W / w)
    scaled = F.interpolate(photo[None], size=(rows, W), mode="area")[0]
    top = (rows - H) // 2
    return float(psnr(still.float(), scaled[:, top:top + H]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("upscale", help="enlarge a prepared capture's photos (and cameras)")
    up.add_argument("src")
    up.add_argument("out")
    up.add_argument("--long-side", type=int, required=True)
    run = sub.add_parser("run", help="Aggregate, Fit to Photos and an F12 still, as the add-on asks")
    run.add_argument("dataset")
    run.add_argument("--work", required=True, help="folder for the bundles")
    run.add_argument("--stages", default=",".join(STAGES))
    run.add_argument("--threads", type=int, default=1, help="torch threads (the worker: cores - 1)")
    run.add_argument("--json", default="", help="also append the reports to this file")
    run.add_argument("--photo-size", type=int, default=None,
                     help="Aggregate's Photo Size in pixels (default: the add-on's after Import Dataset, the "
                     "long side most photos have clamped to 2048-4096, protocol.photo_size_for_render; "
                     "0: each photo at its own size, as before the option)")
    run.add_argument("--undistort", action="store_true", help="distorted COLMAP cameras: the add-on's Undistort")
    run.add_argument("--round-resampled", choices=("on", "off"), default="on",
                     help="off: the fit holds undistorted photos as floats (scene_fit.FIT_ROUND_RESAMPLED False)")
    run.add_argument("--max-views", type=int, default=0,
                     help="Aggregate only the first that many views (0: all)")
    run.add_argument("--extractor-tiles", choices=("on", "off"), default="on",
                     help="off: the feature extractor decodes every photo whole, as before tiling "
                     "(models.extractor.TILE_ABOVE_SIDE unlimited)")
    ex = sub.add_parser("extractor", help="one feature-extractor call's time and peak memory")
    ex.add_argument("--size", required=True, help="WxH, e.g. 4000x3000")
    ex.add_argument("--decode", default="auto", choices=("auto", "whole", "tiles", "encoder"))
    ex.add_argument("--threads", type=int, default=1, help="torch threads")
    a = ap.parse_args(argv)
    if a.cmd == "extractor":
        import torch

        torch.set_num_threads(a.threads)
        width, height = (int(v) for v in a.size.lower().split("x"))
        print(json.dumps(extractor_call(width, height, a.decode)))
        return 0
    if a.cmd == "upscale":
        print(json.dumps(upscale_capture(a.src, a.out, a.long_side)))
        return 0
    import torch

    torch.set_num_threads(a.threads)
    from npbgpp_core import scene_fit
    from npbgpp_core.datasets import load_scene

    scene_fit.FIT_ROUND_RESAMPLED = a.round_resampled == "on"
    if a.extractor_tiles == "off":
        from npbgpp_core.models import extractor

        extractor.TILE_ABOVE_SIDE = sys.maxsize
    data = load_scene(a.dataset, require_points=False, **({"undistort": True} if a.undistort else {}))
    size = f"{max(data.views[0].camera.image_size)} px"
    # the add-on's default from the dataset read here, not read again inside the timed Aggregate stage
    photo_size = addon_photo_size(data) if a.photo_size is None else a.photo_size
    reports = run_stages(a.dataset, a.work, a.stages.split(","), size, photo_size, a.undistort, a.max_views)
    if a.json:
        with open(a.json, "a") as f:
            for r in reports:
                f.write(json.dumps(r) + "\n")
    return 1 if any(r["failure"] for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
