"""``make demo`` / ``python -m blender_addon.demo``: a neural rendering of the bundled demo
scene in Blender (bpy as a module), with no download.

Steps: check requirements (bpy, torch, ffmpeg, weights) and say how to fix what is
missing; install the add-on zip (built from this repository, bundled weights included)
into a private Blender user folder and enable it; import ``demo/scene`` with File >
Import > NPBG++ Dataset; Aggregate Descriptors (the bundled NPBG++ network the add-on's
Network = Auto picks for the scene: objects on a plain background for the demo's RGBA
renders; ``npbgpp_core.datasets.scene_domain``); render a camera
orbit with the NPBG++ engine to ``<out>/frame_####.png`` and ``<out>/demo.mp4``; render
the held-out test views (Neural and Points output) and compare them with the Cycles
ground truth; fit (c) NPBG++ coefficients and (d) NPBG for the same fixed budget; print a
table, write ``metrics.json`` and ``side_by_side.png`` (ground truth | points | NPBG++).

Fair comparison: the ground truth PNGs are RGBA, loaded composited over white (the
``nerf_synthetic`` loader), so white is the scene's background. Raw points are scored
over white with their own coverage (a pixel no point reaches shows the background); the
networks' full images are scored as they come (they learn the background too). PSNR /
SSIM on full RGB images; no method is given the ground-truth silhouette.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SCENE = os.path.join(ROOT, "demo", "scene")
BPY_HINT = "run `make demo`, which creates .venv with Python 3.11 and installs bpy==5.0.1 into it"
PACKAGES_HINT = ("fix: run `make demo`, which creates .venv with Python 3.11 and installs bpy==5.0.1 and the other "
                 "requirements (requirements.txt) into it; if a shared library is named above, install it with "
                 "the system package manager")


ENABLED: list[str] = []  # add-ons this run enabled (disabled again at exit)


class DemoError(RuntimeError):
    """A requirement of the demo is not met; the message says how to fix it."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m blender_addon.demo", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a fast smoke run: 4 frames, half resolution, "
                   "2 held-out views, 3 fitting steps")
    p.add_argument("--frames", type=int, default=None, help="frames of the camera orbit (default 48)")
    p.add_argument("--budget-steps", type=int, default=None, help="fitting steps for (c) and (d) (default 200)")
    p.add_argument("--crop", type=int, default=None, help="fitting crop side in pixels (default 128)")
    p.add_argument("--out", default=os.path.join(ROOT, "out", "demo"), help="output folder (default out/demo)")
    p.add_argument("--scene", default=DEFAULT_SCENE, help="nerf_synthetic scene folder (default demo/scene)")
    p.add_argument("--weights", default=None, help="NPBG++ weights (default: the bundled file of the scene's "
                   "domain, as the add-on's Network = Auto picks it)")
    p.add_argument("--npbg-weights", default=None, help="NPBG refiner weights (default: the bundled file)")
    p.add_argument("--fps", type=int, default=24)
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1) // 2),
                   help="CPU threads for torch in the demo and its render worker (default: half the cores; "
                   "more threads than free cores make PyTorch many times slower)")
    args = p.parse_args(argv)
    quick = args.quick
    args.frames = args.frames if args.frames is not None else (4 if quick else 48)
    args.budget_steps = args.budget_steps if args.budget_steps is not None else (3 if quick else 200)
    args.crop = args.crop if args.crop is not None else (32 if quick else 128)
    args.percentage = 50 if quick else 100
    args.max_test_views = 2 if quick else None
    if args.frames < 2:
        p.error("--frames must be at least 2")
    if args.budget_steps < 0:
        p.error("--budget-steps must be >= 0")
    return args


# ------------------------------------------------------------------------- requirements
def check_requirements(args: argparse.Namespace) -> dict[str, str]:
    """Raise DemoError naming every unmet requirement and its fix; return the weights paths."""
    problems: list[str] = []
    if sys.version_info[:2] != (3, 11):
        problems.append(f"Python {sys.version_info[0]}.{sys.version_info[1]} runs this, but bpy==5.0.1 needs "
                        f"Python 3.11: {BPY_HINT}")
    else:
        try:
            import bpy  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - ImportError, or OSError for a missing system library
            problems.append(f"bpy (Blender as a Python module) cannot be imported ({type(exc).__name__}: {exc}): "
                            f"{BPY_HINT}")
    torch_ok = True
    try:
        import torch  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        torch_ok = False
        problems.append(f"torch cannot be imported ({exc})")
    try:
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
    except Exception as exc:  # noqa: BLE001
        problems.append(f"imageio-ffmpeg (the MP4 encoder) is unusable ({exc})")
    if not os.path.isfile(os.path.join(args.scene, "transforms_test.json")):
        problems.append(f"demo scene not found: {args.scene} (a nerf_synthetic folder; the repository ships "
                        "demo/scene, see demo/README.md to regenerate it)")
    paths: dict[str, str] = {}
    if torch_ok:  # reading the weights needs torch
        problems += _check_weights(args, paths)
    if problems:
        fix = [PACKAGES_HINT] if any(p.startswith(("bpy", "torch", "imageio", "Python")) for p in problems) else []
        raise DemoError("the demo cannot run:\n" + "\n".join(f"  - {p}" for p in problems + fix))
    return paths


def scene_weights_domain(scene_dir: str) -> str | None:
    """The data domain of a scene folder (which bundled NPBG++ file suits it), or None when
    the folder cannot be read (reported by the scene check)."""
    from npbgpp_core.datasets import DatasetError, load_scene, scene_domain

    try:
        return scene_domain(load_scene(scene_dir))
    except (DatasetError, OSError):
        return None


def _check_weights(args: argparse.Namespace, paths: dict[str, str]) -> list[str]:
    """Check the weights files (``--weights`` or the bundled file of the scene's domain,
    ``--npbg-weights`` or the bundled refiner); their paths go into ``paths``."""
    try:
        from npbgpp_core.pretrained import DEFAULT_DOMAIN, WeightsError, default_weights_path, read_weights
    except Exception as exc:  # noqa: BLE001
        return [f"npbgpp_core cannot be imported ({exc}): run the demo from the repository root"]
    args.domain = None if args.weights else scene_weights_domain(args.scene) or DEFAULT_DOMAIN
    problems = []
    for kind, given in (("npbgpp", args.weights), ("npbg_refiner", args.npbg_weights)):
        domain = args.domain if kind == "npbgpp" and args.domain else DEFAULT_DOMAIN
        path = os.path.abspath(given) if given else default_weights_path(kind, domain)
        try:
            read_weights(path, kind)
        except (FileNotFoundError, WeightsError) as exc:
            problems.append(str(exc).replace("\n", "\n    "))
            continue
        paths[kind] = path
    return problems


# ------------------------------------------------------------------------------ Blender
def enable_addon(workdir: str) -> Any:
    """Build the add-on zip (as a user downloads it), install it into the private user
    folder and enable it."""
    import addon_utils
    import bpy

    sys.path.insert(0, ROOT)
    import build_addon

    try:
        zip_path = build_addon.build(os.path.join(workdir, "dist"))
    except (ValueError, OSError) as exc:
        raise DemoError(f"cannot build the add-on zip: {exc}") from exc
    size = os.path.getsize(zip_path)
    if bpy.ops.preferences.addon_install(filepath=zip_path, overwrite=True) != {"FINISHED"}:
        raise DemoError(f"Blender could not install the add-on zip {zip_path}")
    module = addon_utils.enable("npbgpp", default_set=True)
    ENABLED.append("npbgpp")
    if module is None:
        raise DemoError("Blender could not enable the npbgpp add-on")
    print(f"add-on installed from {os.path.relpath(zip_path, ROOT) if zip_path.startswith(ROOT) else zip_path} "
          f"({size / 1e6:.1f} MB)")
    return module


def orbit_camera(scene: Any, template: Any, center: Any, radius: float, height: float, frames: int) -> Any:
    """A camera (lens of ``template``) keyframed on a full circle around ``center``."""
    import math

    import bpy
    from mathutils import Vector

    cam = bpy.data.objects.new("Demo Orbit", template.data.copy())
    scene.collection.objects.link(cam)
    target = Vector(center)
    for f in range(frames):
        angle = 2.0 * math.pi * f / frames
        cam.location = target + Vector((radius * math.cos(angle), radius * math.sin(angle), height))
        cam.rotation_euler = (target - cam.location).to_track_quat("-Z", "Y").to_euler()
        cam.keyframe_insert("location", frame=f + 1)
        cam.keyframe_insert("rotation_euler", frame=f + 1)
    scene.frame_start, scene.frame_end = 1, frames
    scene.camera = cam
    return cam


def read_png(path: str, over_white: bool = False) -> Any:
    """(3, H, W) float tensor in [0, 1] from an 8-bit PNG (RGBA composited over white
    with its own alpha when ``over_white``)."""
    import numpy as np
    import torch
    from PIL import Image

    if not os.path.isfile(path):
        raise DemoError(f"Blender wrote no image {path} (see the messages above)")
    arr = np.asarray(Image.open(path).convert("RGBA"), dtype=np.float32) / 255.0
    rgb = arr[..., :3]
    if over_white:
        rgb = rgb * arr[..., 3:] + (1.0 - arr[..., 3:])
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).contiguous()


def write_png(path: str, image: Any) -> None:
    """(3, H, W) in [0, 1] -> 8-bit PNG (eight_bit_levels, the one rounding), written via a temporary file."""
    from PIL import Image

    from npbgpp_core.datasets.images import eight_bit_levels

    arr = eight_bit_levels(image.detach().cpu()).permute(1, 2, 0).numpy()
    tmp = path + ".tmp.png"
    Image.fromarray(arr).save(tmp)
    os.replace(tmp, path)


def encode_mp4(frame_paths: list[str], out: str, fps: int) -> None:
    import imageio_ffmpeg
    import numpy as np
    from PIL import Image

    first = np.asarray(Image.open(frame_paths[0]).convert("RGB"))
    h, w = first.shape[:2]
    tmp = out + ".tmp.mp4"
    writer = imageio_ffmpeg.write_frames(tmp, (w, h), fps=fps, codec="libx264", pix_fmt_out="yuv420p",
                                         macro_block_size=2, output_params=["-loglevel", "error"])
    writer.send(None)
    for p in frame_paths:
        writer.send(np.ascontiguousarray(np.asarray(Image.open(p).convert("RGB"))))
    writer.close()
    os.replace(tmp, out)


def render_still(scene: Any, path: str) -> float:
    import bpy

    scene.render.filepath = path
    t = time.perf_counter()
    bpy.ops.render.render(write_still=True)
    return time.perf_counter() - t


# ------------------------------------------------------------------------------ metrics
def score(pred: Any, target: Any) -> dict[str, float]:
    from npbgpp_core.metrics import psnr, ssim

    return {"psnr": float(psnr(pred, target)[0]), "ssim": float(ssim(pred, target)[0])}


def mean_scores(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(r[k] for r in rows) / len(rows) for k in ("psnr", "ssim")}


# --------------------------------------------------------------------------------- main
def run(args: argparse.Namespace, weights: dict[str, str], workdir: str) -> dict[str, Any]:
    import bpy
    import torch

    from npbgpp_core.datasets import load_scene
    from npbgpp_core.fitting import FitViews, fit_coefficients, fit_npbg
    from npbgpp_core.pretrained import load_pretrained_npbg_refiner
    from npbgpp_core.scene import NeuralScene
    from npbgpp_core.scene_fit import fitting_model

    torch.set_num_threads(max(1, args.threads))
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):  # stale frames of a longer earlier run would end up in the MP4
        if name.startswith("frame_") and name.endswith(".png"):
            os.unlink(os.path.join(out, name))
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    enable_addon(workdir)
    bpy.ops.wm.read_homefile(use_empty=True)
    scene_dir = os.path.abspath(args.scene)
    t = time.perf_counter()
    if bpy.ops.import_scene.npbgpp_dataset(directory=scene_dir) != {"FINISHED"}:
        raise DemoError(f"importing {scene_dir} failed")
    timings["import_s"] = time.perf_counter() - t
    sc = bpy.context.scene
    s = sc.npbgpp
    if args.weights:
        s.weights = weights["npbgpp"]
    else:  # empty Weights: the add-on's Network = Auto picks the bundled file
        s.network = "AUTO"
        print(f"NPBG++ network: {os.path.basename(weights['npbgpp'])} (bundled, for the {args.domain} domain "
              "detected from the scene's views)", flush=True)
    sc.render.engine = "NPBGPP"
    # PNG bytes = sRGB of what the engine wrote: the import set the view to Standard, neutral
    if sc.view_settings.view_transform != "Standard":
        raise DemoError(f"the import left View Transform {sc.view_settings.view_transform}, not Standard")
    sc.render.dither_intensity = 0.0
    sc.render.film_transparent = False
    sc.render.image_settings.file_format = "PNG"
    sc.render.image_settings.color_mode = "RGB"
    sc.render.resolution_percentage = args.percentage
    bundle_path = os.path.join(out, "demo_scene.npbgpp")
    print("aggregating NPBG++ descriptors from the input views ...", flush=True)
    t = time.perf_counter()
    if bpy.ops.npbgpp.aggregate(filepath=bundle_path) != {"FINISHED"}:
        raise DemoError("Aggregate Descriptors failed (see the messages above)")
    timings["aggregate_s"] = time.perf_counter() - t
    used = NeuralScene.load(bundle_path).metadata.get("weights")
    if used != os.path.basename(weights["npbgpp"]):
        raise DemoError(f"Aggregate Descriptors used the NPBG++ weights {used!r}, not {weights['npbgpp']}")
    s.output = "NEURAL"

    data = load_scene(scene_dir)
    test = list(data.test)[: args.max_test_views] if args.max_test_views else list(data.test)
    if not test:
        raise DemoError(f"{scene_dir} has no held-out test views (transforms_test.json)")
    cams_by_image = {str(o.get("npbgpp_image")): o for o in bpy.data.objects if o.type == "CAMERA"}
    train_cams = [cams_by_image[str(data.views[i].image_path)] for i in data.train]
    centre = data.points.mean(axis=0)
    locs = [tuple(c.matrix_world.translation) for c in train_cams]
    radius = float(sum(((x - centre[0]) ** 2 + (y - centre[1]) ** 2) ** 0.5 for x, y, _ in locs) / len(locs))
    height = float(sum(z - centre[2] for _, _, z in locs) / len(locs))
    orbit_camera(sc, train_cams[0], tuple(float(c) for c in centre), radius, height, args.frames)

    print(f"rendering a {args.frames}-frame orbit with the NPBG++ engine ...", flush=True)
    sc.render.filepath = os.path.join(out, "frame_####")
    t = time.perf_counter()
    bpy.ops.render.render(animation=True)
    timings["animation_s"] = time.perf_counter() - t
    timings["seconds_per_frame"] = timings["animation_s"] / args.frames
    frame_paths = [os.path.join(out, f"frame_{f:04d}.png") for f in range(1, args.frames + 1)]
    missing = [p for p in frame_paths if not os.path.isfile(p)]
    if missing:
        raise DemoError(f"the animation render wrote no {missing[0]} (see the messages above)")
    t = time.perf_counter()
    encode_mp4(frame_paths, os.path.join(out, "demo.mp4"), args.fps)
    timings["encode_s"] = time.perf_counter() - t

    print(f"rendering {len(test)} held-out views (Neural and Points) ...", flush=True)
    held = os.path.join(out, "heldout")
    os.makedirs(held, exist_ok=True)
    neural_s = 0.0
    engine_images: dict[str, list] = {"points": [], "npbgpp": []}
    for k, i in enumerate(test):
        sc.camera = cams_by_image[str(data.views[i].image_path)]
        s.output = "NEURAL"
        neural_s += render_still(sc, os.path.join(held, f"npbgpp_{k:02d}.png"))
        s.output = "POINTS"
        sc.render.film_transparent, sc.render.image_settings.color_mode = True, "RGBA"  # coverage as alpha
        render_still(sc, os.path.join(held, f"points_{k:02d}.png"))
        sc.render.film_transparent, sc.render.image_settings.color_mode = False, "RGB"
        engine_images["npbgpp"].append(read_png(os.path.join(held, f"npbgpp_{k:02d}.png")))
        engine_images["points"].append(read_png(os.path.join(held, f"points_{k:02d}.png"), over_white=True))
    timings["heldout_neural_seconds_per_view"] = neural_s / len(test)
    bpy.ops.npbgpp.stop_worker()  # the engine is done: its worker process would only compete for the CPU
    size = tuple(engine_images["npbgpp"][0].shape[-2:])

    gts = [data.load_image(i, size) for i in test]  # RGBA over white
    test_cams = [data.camera(i, size) for i in test]

    def evaluate(images: list) -> tuple[list, list[dict[str, float]]]:
        images = [img.clamp(0, 1) for img in images]
        return images, [score(c, g) for c, g in zip(images, gts, strict=True)]

    results: dict[str, Any] = {}
    comps: dict[str, list] = {}
    for name in ("points", "npbgpp"):
        comps[name], rows = evaluate(engine_images[name])
        results[name] = {**mean_scores(rows), "per_view": rows}

    # Training views for the fitting budget (same size as the renders).
    views = FitViews(  # full images: the background is part of what is fitted
        torch.stack([data.load_image(i, size) for i in data.train]),
        [data.camera(i, size) for i in data.train],
        None,
    )
    bundle = NeuralScene.load(bundle_path)
    aggregated = bundle.aggregated_scene("cpu")
    print(f"(c) fine-tuning NPBG++ coefficients for {args.budget_steps} steps ...", flush=True)
    # The fit's perceptual loss needs the weights file's encoder, which the bundle leaves out.
    fit_model = fitting_model(bundle, bundle_path, weights["npbgpp"], "cpu")
    fit_c = fit_coefficients(fit_model, aggregated, views, steps=args.budget_steps, crop=args.crop)
    pts = aggregated.points
    comps["coefficients_ft"], rows = evaluate([fit_c.model.render(pts, c) for c in test_cams])
    results["coefficients_ft"] = {**mean_scores(rows), "per_view": rows, "fit_seconds": fit_c.seconds,
                                  "fit_steps": fit_c.steps, "loss_first": _first(fit_c.losses),
                                  "loss_last": _last(fit_c.losses)}
    print(f"(d) fitting NPBG for {args.budget_steps} steps ...", flush=True)
    refiner = load_pretrained_npbg_refiner(weights["npbg_refiner"])
    all_points = torch.from_numpy(data.points).float()
    fit_d = fit_npbg(all_points, views, refiner.state, steps=args.budget_steps, crop=args.crop,
                     config=refiner.config)
    comps["npbg"], rows = evaluate([fit_d.model.render(all_points, c) for c in test_cams])
    results["npbg"] = {**mean_scores(rows), "per_view": rows, "fit_seconds": fit_d.seconds, "fit_steps": fit_d.steps,
                       "loss_first": _first(fit_d.losses), "loss_last": _last(fit_d.losses)}

    for name in ("coefficients_ft", "npbg"):
        for k, img in enumerate(comps[name]):
            write_png(os.path.join(held, f"{name}_{k:02d}.png"), img)
    side = torch.cat([gts[0], comps["points"][0], comps["npbgpp"][0]], dim=2)
    write_png(os.path.join(out, "side_by_side.png"), side)
    timings["total_s"] = time.perf_counter() - t0
    report = {
        "scene": scene_dir, "frames": args.frames, "resolution": list(size), "test_views": len(test),
        "budget_steps": args.budget_steps, "crop": args.crop, "timings": timings, "methods": results,
        "weights": weights, "domain": getattr(args, "domain", None),
        "comparison": "raw points over white with their own coverage, network images as rendered; "
        "PSNR/SSIM on full RGB images against the Cycles ground truth (RGBA over white)",
        "torch_threads": torch.get_num_threads(),
    }
    tmp = os.path.join(out, "metrics.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    os.replace(tmp, os.path.join(out, "metrics.json"))
    return report


def _first(values: list[float]) -> float | None:
    return values[0] if values else None


def _last(values: list[float]) -> float | None:
    return values[-1] if values else None


def format_table(report: dict[str, Any]) -> str:
    t = report["timings"]
    m = report["methods"]
    h, w = report["resolution"]
    lines = [
        f"NPBG++ demo: {report['frames']} frames at {w}x{h}, {t['seconds_per_frame']:.2f} s per frame "
        f"(animation render, CPU); aggregation {t['aggregate_s']:.1f} s; total {t['total_s']:.0f} s",
        f"held-out views: {report['test_views']} (never used for aggregation or fitting), fitting budget "
        f"{report['budget_steps']} steps at {report['crop']}x{report['crop']} crops",
        "",
        f"{'method':<46} {'PSNR dB':>8} {'SSIM':>7} {'fit s':>7}",
    ]
    names = [
        ("points", "(a) raw nearest-point colours"),
        ("npbgpp", "(b) NPBG++, no per-scene fitting"),
        ("coefficients_ft", f"(c) NPBG++ + coefficient fine-tuning ({report['budget_steps']} st)"),
        ("npbg", f"(d) NPBG fitted ({report['budget_steps']} steps)"),
    ]
    for key, label in names:
        r = m[key]
        fit = f"{r['fit_seconds']:7.1f}" if "fit_seconds" in r else f"{'-':>7}"
        lines.append(f"{label:<46} {r['psnr']:8.2f} {r['ssim']:7.4f} {fit}")
    lines.append("")
    lines.append("(ground truth: Cycles RGBA over white; raw points over white where no point lands)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Before torch is imported; the render worker process inherits it.
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(max(1, args.threads))
    workdir = tempfile.mkdtemp(prefix="npbgpp-demo-")
    # A private Blender user folder: installing the add-on never touches the user's own Blender.
    os.environ["BLENDER_USER_RESOURCES"] = os.path.join(workdir, "blender_user")
    try:
        try:
            weights = check_requirements(args)
            report = run(args, weights, workdir)
        except DemoError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print()
        print(format_table(report))
        out = os.path.abspath(args.out)
        out = os.path.relpath(out) if out.startswith(os.getcwd() + os.sep) else out
        print(f"\nwrote {out}/frame_####.png, {out}/demo.mp4, {out}/side_by_side.png, {out}/metrics.json")
        return 0
    finally:
        while ENABLED:
            import addon_utils

            addon_utils.disable(ENABLED.pop(), default_set=True)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
