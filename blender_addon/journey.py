"""A user's capture through the installed add-on, end to end, against the library pipeline
and the photo.

In real bpy: install the built add-on zip into a private user folder, start from factory
settings (a scene as a new user gets it), Import Dataset, set the engine to NPBG++, Aggregate
Descriptors with the bundled weights (Network Auto), then F12 through the imported camera of
the held-out view (bench_quality's split: the test split or every 8th view; render size =
the photo's size) and save an 8-bit PNG as Blender saves renders. Each render runs under
the scene's colour management as the import left it, and under AgX (Blender's default)
and Standard set by hand.

The library reference is the ``npbgpp_core`` pipeline at the same size: aggregated from
the views the add-on aggregates (the dataset's training views: the add-on leaves its test split
out too, so the held-out photo is unseen by both) and, as bench_quality does, from the input
views (every view outside the test split, val included).

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python blender_addon/journey.py /work/captures/video_sfm

Prints a table and writes ``<out>/journey.json`` and the PNGs (default out/journey).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def install_addon(workdir: str):
    """The zip a user downloads, installed and enabled in the private user folder."""
    import addon_utils
    import bpy

    import build_addon

    zip_path = build_addon.build(os.path.join(workdir, "dist"))
    if bpy.ops.preferences.addon_install(filepath=zip_path, overwrite=True) != {"FINISHED"}:
        raise RuntimeError(f"could not install {zip_path}")
    if addon_utils.enable("npbgpp", default_set=True) is None:
        raise RuntimeError("could not enable the npbgpp add-on")


def read_png(path: str) -> np.ndarray:
    """(H, W, 3) uint8 of an 8-bit PNG (Blender's own file)."""
    import bpy

    img = bpy.data.images.load(path, check_existing=False)
    try:
        w, h = img.size
        px = np.empty(w * h * 4, np.float32)
        img.pixels.foreach_get(px)
        # Blender's image pixels of a byte image are its bytes / 255, bottom row first
        return np.round(px.reshape(h, w, 4)[::-1, :, :3] * 255.0).astype(np.uint8)
    finally:
        bpy.data.images.remove(img)


REFERENCES = ("library_all_views", "library_inputs_only", "library_blender_camera_clipped", "library_blender_camera")


def psnr8(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)) / 255.0**2
    return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)


def to8(image) -> np.ndarray:
    """(3, H, W) float tensor in [0, 1] -> (H, W, 3) uint8, rounded as an 8-bit PNG is."""
    return np.round(image.clamp(0, 1).permute(1, 2, 0).numpy().astype(np.float64) * 255.0).astype(np.uint8)


def library_images(folder: str, held: int, inputs: list[int], all_views: list[int],
                   blender_camera: dict, max_side: int | None) -> dict[str, np.ndarray]:
    """The npbgpp_core pipeline's image of view ``held`` at the photo's size, aggregated from
    ``all_views`` (as the add-on does) and from ``inputs`` (bench_quality's split), each photo read
    at the long side ``max_side`` the add-on's Aggregate read it at (its bundle's ``aggregate_max_side``:
    its Photo Size, Follow Render by default, follows the render, so photos above 2048 px are not read at
    the constant; None: own size); and, from
    ``all_views``, through the camera the add-on derived from the Blender camera object
    (``blender_camera``: K, R, t, near, far), with and without its clip range."""
    import torch

    from npbgpp_core.camera import Camera
    from npbgpp_core.datasets import load_scene, scene_domain
    from npbgpp_core.models.alignment import resolve_world_up
    from npbgpp_core.pretrained import default_weights_path, load_pretrained_npbgpp

    scene = load_scene(folder)
    weights = default_weights_path("npbgpp", scene_domain(scene))
    points = torch.from_numpy(np.ascontiguousarray(scene.points, dtype=np.float32))
    out = {"weights": os.path.basename(weights)}
    for name, views in (("library_all_views", all_views), ("library_inputs_only", inputs)):
        up = resolve_world_up("auto", [scene.views[i].camera for i in views])
        model = load_pretrained_npbgpp(weights, world_up=up)
        with torch.no_grad():
            state = model.begin_scene(points)
            for i in views:
                image, camera = scene.view_at_long_side(i, max_side)
                state.add_views(image[None], [camera])
            agg = state.finish()
            image = model.render(agg, scene.camera(held))
            out[name] = to8(image[0] if image.dim() == 4 else image)
            if name == "library_all_views":
                b = blender_camera
                size = scene.camera(held).image_size
                for tag, clip in (("blender_camera_clipped", {"near": b["near"], "far": b["far"]}),
                                  ("blender_camera", {})):
                    cam = Camera.from_opencv(np.array(b["K"]), np.array(b["R"]), np.array(b["t"]), size, **clip)
                    image = model.render(agg, cam)
                    out[f"library_{tag}"] = to8(image[0] if image.dim() == 4 else image)
    out["photo"] = to8(scene.load_image(held))
    return out


def run(folder: str, out: str, workdir: str) -> dict:
    import bpy

    from npbgpp_core.datasets import load_scene

    install_addon(workdir)
    bpy.ops.wm.read_factory_settings(use_empty=True)
    import addon_utils

    addon_utils.enable("npbgpp", default_set=True)  # factory settings disable add-ons
    sc = bpy.context.scene
    defaults = {"view_transform": sc.view_settings.view_transform, "look": sc.view_settings.look,
                "exposure": sc.view_settings.exposure, "gamma": sc.view_settings.gamma,
                "display_device": sc.display_settings.display_device,
                "dither_intensity": sc.render.dither_intensity}
    if bpy.ops.import_scene.npbgpp_dataset(directory=folder) != {"FINISHED"}:
        raise RuntimeError(f"Import Dataset failed for {folder}")
    after_import = {"view_transform": sc.view_settings.view_transform, "look": sc.view_settings.look,
                    "exposure": sc.view_settings.exposure, "gamma": sc.view_settings.gamma}
    sc.render.engine = "NPBGPP"
    sc.npbgpp.weights = ""  # Network Auto: the bundled file of the dataset's domain
    bundle = os.path.join(out, "journey.npbgpp")
    if bpy.ops.npbgpp.aggregate(filepath=bundle) != {"FINISHED"}:
        raise RuntimeError("Aggregate Descriptors failed")
    sc.npbgpp.output = "NEURAL"

    data = load_scene(folder)
    n = len(data.views)
    held = (list(data.test) or list(range(0, n, 8)))[0]
    test_set = set(data.test) or set(range(0, n, 8))
    inputs = [i for i in range(n) if i not in test_set]
    all_views = list(data.train) or list(range(n))
    cams = {str(o.get("npbgpp_image")): o for o in bpy.data.objects if o.type == "CAMERA"}
    sc.camera = cams[str(data.views[held].image_path)]
    h, w = data.views[held].camera.image_size
    sc.render.resolution_x, sc.render.resolution_y, sc.render.resolution_percentage = w, h, 100
    sc.render.film_transparent = False
    sc.render.image_settings.file_format = "PNG"
    sc.render.image_settings.color_mode = "RGB"
    sc.render.image_settings.color_depth = "8"

    from importlib import import_module

    bridge = import_module("npbgpp.camera_bridge")
    geo = bridge.scene_camera_geometry(sc.camera.evaluated_get(bpy.context.evaluated_depsgraph_get()), sc)
    blender_camera = {"K": geo.K.tolist(), "R": geo.R.tolist(), "t": geo.t.tolist(), "near": float(geo.near),
                      "far": float(geo.far)}
    renders: dict[str, np.ndarray] = {}
    settings = [("as_imported", None, None), ("agx_dither1", "AgX", 1.0),
                ("standard_dither1", "Standard", 1.0), ("standard_dither0", "Standard", 0.0)]
    for name, view, dither in settings:
        if view is not None:
            sc.view_settings.view_transform = view
            sc.render.dither_intensity = dither
        sc.render.filepath = os.path.join(out, f"f12_{name}.png")
        bpy.ops.render.render(write_still=True)
        renders[name] = read_png(sc.render.filepath)
    bpy.ops.npbgpp.stop_worker()

    from npbgpp_core.scene import NeuralScene

    # the Photo Size the add-on's Aggregate used, as its bundle records it
    lib = library_images(folder, held, inputs, all_views, blender_camera,
                         NeuralScene.load(bundle).metadata["aggregate_max_side"])
    report = {"scene": folder, "held_out_view": held, "view_name": data.views[held].name, "size": [h, w],
              "inputs": inputs, "addon_aggregated_views": all_views, "weights": lib["weights"],
              "factory_defaults": defaults, "after_import": after_import, "renders": {}}
    for name, img in renders.items():
        row = {"psnr_photo": psnr8(img, lib["photo"])}
        for ref in REFERENCES:
            d = np.abs(img.astype(int) - lib[ref].astype(int))
            row[f"vs_{ref}"] = {"max": int(d.max()), "mean": float(d.mean()), "over_1": float((d > 1).mean())}
        report["renders"][name] = row
    dataset_camera = data.camera(held)
    report["camera_difference"] = {
        "K": float(np.abs(np.array(blender_camera["K"]) - dataset_camera.K.double().numpy()).max()),
        "R": float(np.abs(np.array(blender_camera["R"]) - dataset_camera.R.double().numpy()).max()),
        "t": float(np.abs(np.array(blender_camera["t"]) - dataset_camera.t.double().numpy().ravel()).max()),
        "near_far": [blender_camera["near"], blender_camera["far"]]}
    for ref in REFERENCES:
        report[ref] = {"psnr_photo": psnr8(lib[ref], lib["photo"])}
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("scene", help="a capture folder (any load_scene format)")
    p.add_argument("--out", default=str(ROOT / "out" / "journey"))
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="npbgpp-journey-")
    os.environ.setdefault("BLENDER_USER_RESOURCES", os.path.join(workdir, "blender_user"))
    try:
        report = run(os.path.abspath(args.scene), os.path.abspath(args.out), workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    with open(os.path.join(args.out, "journey.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
