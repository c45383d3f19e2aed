"""Rendering a scene with Blender (Cycles on the CPU) into the NeRF-Synthetic layout.

Output folder::

    transforms_train.json / transforms_val.json / transforms_test.json
    train/r_<k>.png, val/r_<k>.png, test/r_<k>.png   RGBA, 8-bit sRGB (Standard view, no dither)
    points3d.ply                                      surface points + sRGB albedo colours, then
                                                      the points rendered as points (clouds, hair)

Each json holds ``camera_angle_x`` plus exact ``fl_x, fl_y, cx, cy, w, h`` (``cx, cy``
with the pixel-corner origin, as instant-ngp / nerfstudio: the image centre is ``w/2``)
and per frame the camera-to-world ``transform_matrix`` (OpenGL camera axes). Cameras sit
on a sphere (or the upper hemisphere, world up +Z) around the scene's bounding-sphere
centre, evenly spread (Fibonacci lattice, rotated by the seed), looking at the centre,
far enough for the whole bounding sphere to fit the view. Views are shuffled (seeded)
and split into train / val / test. The bounding sphere and ``points3d.ply`` cover the
surfaces the renders show: both are read from the depsgraph Blender evaluates for a
render (:func:`.surface_points.during_a_render`, a 4x4-pixel render before the views).
``points3d.ply`` also takes whole the points the render shows as points (point clouds,
hair's control points, a mesh's Geometry Nodes points), as Points from Selected Meshes
does (:func:`.surface_points.rendered_own_points`); the bounding sphere covers them too, so a
scene of point clouds only exports (it needs no surface).
The add-on's own point objects (:func:`addon_point_objects`: its Points from Selected Meshes,
imported PLY, bundle or dataset clouds, the scene's Point Object) stand for the scene's cloud,
not its content: disabled in renders while the dataset renders (restored after, also on error or
cancel), they are in neither the photos nor ``points3d.ply``.

Command line::

    python -m blender_addon.datagen --procedural checker_cube --views 100 \
        --size 256x256 --out scenes/checker_cube [--seed 0 --hemisphere --samples 16 --points 100000]
    python -m blender_addon.datagen --blend my.blend --views 50 --size 320x240 --out out/

Python: ``render_procedural_scene(name, out_dir, views, size, seed)`` or, from the
add-on, ``render_views_of_current_scene(bpy_scene, out_dir, views, size, ...)``.
``size`` is ``(height, width)`` in Python (as ``Camera.image_size``), ``WxH`` on the
command line. bpy is imported inside functions only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from npbgpp_core.atomic import atomic_directory, occupied

from ..camera_bridge import opencv_intrinsics
from .procedural import check_procedural_name

GOLDEN_ANGLE = math.pi * (3.0 - math.sqrt(5.0))


@dataclass
class RenderSummary:
    """What a render produced."""

    out_dir: str
    views: int
    splits: dict[str, int]
    points: int
    seconds: float
    seconds_per_view: float
    camera_object: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def oidn_available() -> bool:
    """Whether this Blender's Cycles was built with OpenImageDenoise."""
    try:
        import _cycles

        return bool(getattr(_cycles, "with_openimagedenoise", False))
    except ImportError:
        return False


def camera_directions(count: int, seed: int, hemisphere: bool) -> np.ndarray:
    """``count`` unit vectors evenly spread on the sphere (or the upper hemisphere,
    elevation about 6 to 72 degrees), avoiding the poles; rotated about Z by the seed."""
    offset = np.random.default_rng(seed).uniform(0, 2 * math.pi)
    k = np.arange(count) + 0.5
    z = 0.1 + 0.85 * (1 - k / count) if hemisphere else 0.95 * (1 - 2 * k / count)
    phi = k * GOLDEN_ANGLE + offset
    r = np.sqrt(1 - z * z)
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def _split_counts(views: int, val: int | None, test: int | None) -> tuple[int, int, int]:
    val = (views // 10 if views >= 10 else 0) if val is None else val
    test = (views // 10 if views >= 10 else min(1, views - 1)) if test is None else test
    if val < 0 or test < 0 or val + test >= views:
        raise ValueError(f"need at least one train view: views={views}, val={val}, test={test}")
    return views - val - test, val, test


class _Settings:
    """Set attributes on bpy structs and put the old values back afterwards."""

    def __init__(self) -> None:
        self.saved: list[tuple[Any, str, Any]] = []

    def set(self, owner: Any, attr: str, value: Any) -> None:
        self.saved.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, value)

    def restore(self) -> None:
        for owner, attr, value in reversed(self.saved):
            try:
                setattr(owner, attr, value)
            except (AttributeError, TypeError, ReferenceError):
                pass


def _configure(bpy_scene, settings: _Settings, size: tuple[int, int], samples: int, seed: int,
               denoise: bool) -> None:
    r = bpy_scene.render
    settings.set(r, "engine", "CYCLES")
    c = bpy_scene.cycles
    settings.set(c, "device", "CPU")
    settings.set(c, "samples", int(samples))
    settings.set(c, "use_adaptive_sampling", False)
    settings.set(c, "use_denoising", bool(denoise))
    if denoise:
        settings.set(c, "denoiser", "OPENIMAGEDENOISE")
        settings.set(c, "denoising_input_passes", "RGB_ALBEDO_NORMAL")
    settings.set(c, "seed", int(seed))
    settings.set(c, "use_animated_seed", False)
    # Short light paths: these scenes have no glass or volumes, and speed matters more.
    for attr, value in (("max_bounces", 4), ("diffuse_bounces", 1), ("glossy_bounces", 2),
                        ("transmission_bounces", 2), ("volume_bounces", 0), ("transparent_max_bounces", 4),
                        ("caustics_reflective", False), ("caustics_refractive", False)):
        settings.set(c, attr, value)
    settings.set(r, "resolution_x", int(size[1]))
    settings.set(r, "resolution_y", int(size[0]))
    settings.set(r, "resolution_percentage", 100)
    settings.set(r, "pixel_aspect_x", 1.0)
    settings.set(r, "pixel_aspect_y", 1.0)
    settings.set(r, "film_transparent", True)
    settings.set(r, "dither_intensity", 0.0)
    settings.set(r, "use_persistent_data", True)
    settings.set(r, "use_compositing", False)
    settings.set(r, "use_sequencer", False)
    settings.set(r, "use_border", False)
    v = bpy_scene.view_settings
    settings.set(v, "view_transform", "Standard")
    settings.set(v, "look", "None")
    settings.set(v, "exposure", 0.0)
    settings.set(v, "gamma", 1.0)
    settings.set(v, "use_curve_mapping", False)
    im = r.image_settings
    if hasattr(im, "media_type"):  # Blender 5.0: PNG is refused while media_type is multilayer
        settings.set(im, "media_type", "IMAGE")
    settings.set(im, "file_format", "PNG")
    settings.set(im, "color_mode", "RGBA")
    settings.set(im, "color_depth", "8")
    settings.set(im, "compression", 15)


def check_renders_a_view_layer(bpy_scene) -> None:
    """ValueError when no view layer of ``bpy_scene`` is enabled for rendering (``ViewLayer.use``
    off for all): Blender then renders nothing and says nothing (``render.render`` returns
    FINISHED, with no image and no render depsgraph), and the dataset failed part-way with
    a traceback. Before any work, so nothing is written."""
    if not any(layer.use for layer in bpy_scene.view_layers):
        names = ", ".join(repr(layer.name) for layer in bpy_scene.view_layers)
        raise ValueError(f"no view layer of the scene {bpy_scene.name!r} is enabled for rendering ({names}): turn "
                         "on View Layer Properties > View Layer > Use for Rendering for one")


def addon_point_objects(bpy_scene) -> list[Any]:
    """The add-on's point objects: every object it made or imported as one (marked
    :data:`~blender_addon.point_source.POINT_OBJECT_MARK`: Points from Selected Meshes, PLY,
    bundle and dataset import, Densify; a duplicate keeps the mark, and is a copy of the cloud
    too), one an older add-on made before the mark, recognised by its structure
    (:func:`~blender_addon.point_source.unmarked_point_object`), and ``bpy_scene``'s Point Object
    (whatever made it). They stand for the scene's cloud, not scene content: a dataset of the
    scene photographed them as dots and took their points twice."""
    import bpy

    from ..point_source import POINT_OBJECT_MARK, unmarked_point_object

    # a mark set to False or 0 by hand says "scene content" also of an older point object
    found = [obj for obj in bpy.data.objects
             if (obj.get(POINT_OBJECT_MARK) if POINT_OBJECT_MARK in obj else unmarked_point_object(obj))]
    current = getattr(getattr(bpy_scene, "npbgpp", None), "point_object", None)
    if current is not None and current not in found:
        found.append(current)
    return found


def _leave_out_point_objects(bpy_scene, settings: _Settings) -> list[str]:
    """Disable the add-on's point objects (:func:`addon_point_objects`) in renders, through
    ``settings`` (restored with the scene's other settings, also on error or cancel): neither
    the photos nor points3d.ply (read from the render's depsgraph) take them. Returns the
    names of those of ``bpy_scene`` it disabled."""
    in_scene = set(bpy_scene.objects)
    names = []
    for obj in addon_point_objects(bpy_scene):
        if obj.hide_render:
            continue
        settings.set(obj, "hide_render", True)
        if obj in in_scene:
            names.append(obj.name)
    return sorted(names)


def left_out_note(names: Sequence[str]) -> str:
    """What the report says of the point objects :func:`_leave_out_point_objects` left out."""
    if not names:
        return ""
    from ..point_source import POINT_OBJECT_MARK

    # an object recognised by its structure alone (point_source.unmarked_point_object) may be the
    # user's: the note says how to keep one
    return (f"left out the NPBG++ point object{'s' if len(names) > 1 else ''} {', '.join(map(repr, names))} (the "
            "scene's cloud, not its content: not in the photos nor points3d.ply; to photograph one, set its custom "
            f"property {POINT_OBJECT_MARK} to 0, and clear the Point Object field if it is the scene's)")


def _render_tiny(bpy_scene) -> None:
    """Render ``bpy_scene`` once at Blender's smallest size (4x4 pixels), writing nothing:
    for :func:`~.surface_points.during_a_render`; its resolution comes back after."""
    import bpy

    r = bpy_scene.render
    size = (r.resolution_x, r.resolution_y)
    r.resolution_x = r.resolution_y = 4
    try:
        bpy.ops.render.render(scene=bpy_scene.name)
    finally:
        r.resolution_x, r.resolution_y = size


def render_views_of_current_scene(bpy_scene, out_dir: str, views: int = 100, size: Sequence[int] = (256, 256),
                                  **options: Any) -> RenderSummary:
    """Render ``views`` views of an open bpy scene into ``out_dir``, all at once (see
    :func:`render_views_steps`, which takes the same arguments)."""
    steps = render_views_steps(bpy_scene, out_dir, views, size, **options)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def render_views_steps(
    bpy_scene,
    out_dir: str,
    views: int = 100,
    size: Sequence[int] = (256, 256),
    *,
    samples: int = 16,
    seed: int = 0,
    hemisphere: bool = False,
    points: int = 100_000,
    val_views: int | None = None,
    test_views: int | None = None,
    fov_deg: float = 40.0,
    denoise: bool | None = False,
    overwrite: bool = False,
    keep_camera: bool = False,
    center: Sequence[float] | None = None,
    radius: float | None = None,
) -> Generator[tuple[int, int], None, RenderSummary]:
    """A generator yielding ``(views done, views)`` after each rendered view and returning
    the :class:`RenderSummary` (``StopIteration.value``), so that a modal operator can
    render one view per timer tick; closing it early cancels: the temporary folder is
    removed, ``out_dir`` is left as it was and the scene's settings are restored.

    Render ``views`` views of an open bpy scene into ``out_dir`` (NeRF-Synthetic layout
    + ``points3d.ply``). ``size=(height, width)``; ``fov_deg`` is the horizontal field of
    view; ``center``/``radius`` override the bounding sphere the cameras frame;
    ``denoise=True`` uses OpenImageDenoise (off by default: on 2 busy CPU cores it took
    ~4.5 s per 256x256 view against ~0.6 s without), ``None`` uses it when available. The
    scene's render settings and active camera are restored afterwards; the temporary
    camera object is removed unless ``keep_camera`` (then its name is returned). Output is
    written to a temporary folder and moved into place at the end."""
    import bpy

    from npbgpp_core.ply import save_ply

    from .surface_points import NoSurfacesError, during_a_render, rendered_surfaces

    check_renders_a_view_layer(bpy_scene)
    if denoise is None:
        denoise = oidn_available()
    h, w = int(size[0]), int(size[1])
    if h < 2 or w < 2:
        raise ValueError(f"size must be at least 2x2, got {(h, w)}")
    if views < 1:
        raise ValueError(f"views must be positive, got {views}")
    n_train, n_val, n_test = _split_counts(views, val_views, test_views)
    t0 = time.perf_counter()
    out_abs = os.path.abspath(out_dir)
    with atomic_directory(out_abs, overwrite) as tmp:
        cam_data = bpy.data.cameras.new("npbgpp_render_camera")
        cam_data.sensor_fit = "HORIZONTAL"
        cam_data.sensor_width = 36.0
        cam_data.lens = 18.0 / math.tan(math.radians(fov_deg) / 2.0)
        cam_obj = bpy.data.objects.new("npbgpp_render_camera", cam_data)
        settings = _Settings()
        try:
            bpy_scene.collection.objects.link(cam_obj)  # refused in a linked scene: the camera goes too
            _configure(bpy_scene, settings, (h, w), samples, seed, denoise)
            settings.set(bpy_scene, "camera", cam_obj)
            left_out = _leave_out_point_objects(bpy_scene, settings)
            surfaces = None
            if center is None or radius is None or points > 0:
                # what the photos show: the render's own depsgraph, read in a render of
                # the fewest pixels (the views' render reuses its scene: persistent data)
                try:
                    surfaces = during_a_render(bpy_scene, lambda: _render_tiny(bpy_scene),
                                               lambda dg: rendered_surfaces(bpy_scene, dg, int(points), seed))
                except NoSurfacesError as exc:
                    if left_out:
                        raise NoSurfacesError(f"{exc} ({left_out_note(left_out)})") from None
                    raise
                center = surfaces[0] if center is None else center
                radius = surfaces[1] if radius is None else radius
            center = np.asarray(center, dtype=np.float64)
            cam_data.clip_start = max(1e-3, radius * 0.01)
            cam_data.clip_end = radius * 100.0 + 100.0
            K = opencv_intrinsics(cam_data.lens, cam_data.sensor_width, cam_data.sensor_height, cam_data.sensor_fit,
                                  cam_data.shift_x, cam_data.shift_y, w, h)
            fx, fy, cx, cy = float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2])
            half_fov = min(math.atan(w / (2 * fx)), math.atan(h / (2 * fy)))
            distance = radius / math.sin(half_fov) * 1.05
            dirs = camera_directions(views, seed, hemisphere)
            order = np.random.default_rng(seed + 1).permutation(views)
            split_of = {}
            for k, idx in enumerate(order):
                split_of[int(idx)] = "train" if k < n_train else ("val" if k < n_train + n_val else "test")
            frames: dict[str, list] = {"train": [], "val": [], "test": []}
            from mathutils import Matrix, Vector

            for idx in range(views):
                eye = center + dirs[idx] * distance
                forward = Vector(tuple(center - eye))
                rot = forward.to_track_quat("-Z", "Y").to_matrix().to_4x4()
                cam_obj.matrix_world = Matrix.Translation(Vector(tuple(eye))) @ rot
                split = split_of[idx]
                k = len(frames[split])
                rel = f"{split}/r_{k}"
                os.makedirs(os.path.join(tmp, split), exist_ok=True)
                bpy_scene.render.filepath = os.path.join(tmp, rel + ".png")
                bpy.ops.render.render(write_still=True, scene=bpy_scene.name)
                if not os.path.isfile(os.path.join(tmp, rel + ".png")):
                    raise RuntimeError(f"Blender did not write {rel}.png (render failed)")
                m = np.array(cam_obj.matrix_world, dtype=np.float64)
                frames[split].append({"file_path": f"./{rel}", "transform_matrix": m.tolist()})
                yield idx + 1, views
            angle_x = 2.0 * math.atan(w / (2.0 * fx))
            for split, fr in frames.items():
                meta = {
                    "camera_angle_x": angle_x,
                    "fl_x": fx, "fl_y": fy, "cx": cx + 0.5, "cy": cy + 0.5, "w": w, "h": h,
                    "frames": fr,
                }
                with open(os.path.join(tmp, f"transforms_{split}.json"), "w", encoding="utf-8") as f:
                    json.dump(meta, f, indent=1)
            n_points = 0
            if surfaces is not None and surfaces[2] is not None:
                pts, cols = surfaces[2]
                save_ply(os.path.join(tmp, "points3d.ply"), pts, cols)
                n_points = len(pts)
        finally:
            settings.restore()
            if not keep_camera:
                bpy.data.objects.remove(cam_obj)
                bpy.data.cameras.remove(cam_data)
    seconds = time.perf_counter() - t0
    return RenderSummary(
        out_dir=out_abs, views=views, splits={"train": n_train, "val": n_val, "test": n_test},
        points=n_points, seconds=seconds, seconds_per_view=seconds / views,
        camera_object=cam_obj.name if keep_camera else None,
        extra={"center": center.tolist(), "radius": float(radius), "distance": distance, "left_out": left_out},
    )


def procedural_scene_done(scene_dir: str) -> bool:
    """Whether ``scene_dir`` holds a finished render of this module: the folder only appears
    complete (``atomic_directory``) and always with ``transforms_train.json``. The test
    ``bench/gpu_session.py prepare --render-objects`` skips finished ``random_<seed>`` by (the
    command line refuses any non-empty ``--out``), as ``environments.env_scene_done``."""
    return os.path.isfile(os.path.join(scene_dir, "transforms_train.json"))


def render_procedural_scene(
    name: str,
    out_dir: str,
    views: int = 100,
    size: Sequence[int] = (256, 256),
    seed: int = 0,
    keep_scene: bool = False,
    **options: Any,
) -> RenderSummary:
    """Build procedural scene ``name`` (see ``procedural.PROCEDURAL_SCENES`` and
    ``random_<seed>``) in a new bpy scene and render it with
    :func:`render_views_of_current_scene` (``options`` go there). The scene is deleted
    afterwards unless ``keep_scene`` (its name is then in ``summary.extra['scene']``)."""
    from .procedural import build_procedural_scene, remove_scene

    scene = build_procedural_scene(name, seed)
    try:
        summary = render_views_of_current_scene(scene, out_dir, views, size, seed=seed, **options)
        summary.extra["scene"] = scene.name
    finally:
        if not keep_scene:
            remove_scene(scene)
    return summary


def _parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--size must look like 256x256 (WxH), got {text!r}") from exc
    if w < 2 or h < 2:
        raise argparse.ArgumentTypeError(f"--size must be at least 2x2, got {text!r}")
    return h, w


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m blender_addon.datagen", description=__doc__.split("\n")[0]
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--blend", help="render the active scene of this .blend file")
    src.add_argument("--procedural", help="procedural scene name, or random_<seed>")
    p.add_argument("--views", type=int, default=100)
    p.add_argument("--size", type=_parse_size, default=(256, 256), help="WxH, e.g. 256x256")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hemisphere", action="store_true", help="cameras on the upper hemisphere only")
    p.add_argument("--samples", type=int, default=16, help="Cycles samples per pixel")
    p.add_argument("--points", type=int, default=100_000,
                   help="points sampled on surfaces into points3d.ply, which also takes point clouds' and hair's "
                        "points whole (0: no points3d.ply)")
    p.add_argument("--val", type=int, default=None, help="number of val views (default views//10)")
    p.add_argument("--test", type=int, default=None, help="number of test views (default views//10)")
    p.add_argument("--fov", type=float, default=40.0, help="horizontal field of view in degrees")
    p.add_argument("--denoise", action="store_true", help="denoise with OpenImageDenoise (slow on CPU)")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    opts = dict(samples=args.samples, hemisphere=args.hemisphere, points=args.points, val_views=args.val,
                test_views=args.test, fov_deg=args.fov, denoise=args.denoise, overwrite=args.overwrite)
    # Only the checks of the command line and of its inputs end in one line and status 2: an
    # error once the render runs is a bug whose traceback is needed.
    try:
        if args.views < 1:
            raise ValueError(f"--views must be positive, got {args.views}")
        _split_counts(args.views, args.val, args.test)
        if args.procedural:
            check_procedural_name(args.procedural)
        elif not os.path.isfile(args.blend):
            raise ValueError(f"{args.blend}: .blend file not found")
        if args.blend:
            from npbgpp_core.atomic import holds

            if holds(args.out, args.blend):  # --overwrite replaced the folder, the .blend with it
                raise ValueError(f"--out {args.out} holds the --blend file {args.blend}; writing the dataset there "
                                 "replaces the whole folder: choose another --out")
        if not args.overwrite and occupied(args.out):
            raise ValueError(f"{os.path.abspath(args.out)}: exists and is not empty (pass --overwrite to replace it)")
        if args.blend:
            import bpy

            try:
                bpy.ops.wm.open_mainfile(filepath=os.path.abspath(args.blend))
            except RuntimeError as exc:
                raise ValueError(f"{args.blend}: cannot open the .blend file ({str(exc).strip()})") from exc
            try:
                check_renders_a_view_layer(bpy.context.scene)
            except ValueError as exc:
                raise ValueError(f"{args.blend}: {exc}") from None
    except ValueError as exc:
        print(f"python -m blender_addon.datagen: error: {exc}", file=sys.stderr)
        return 2
    if args.procedural:
        summary = render_procedural_scene(args.procedural, args.out, args.views, args.size, args.seed, **opts)
    else:
        from .surface_points import NoSurfacesError

        try:
            summary = render_views_of_current_scene(bpy.context.scene, args.out, args.views, args.size,
                                                    seed=args.seed, **opts)
        except NoSurfacesError as exc:
            # the .blend's own problem, found where the surfaces are read: in the render's
            # depsgraph (what viewports hide is rendered), by a 4x4-pixel render before any view
            print(f"python -m blender_addon.datagen: error: {args.blend}: {exc}", file=sys.stderr)
            return 2
    note = left_out_note(summary.extra.get("left_out", ()))
    print(f"wrote {summary.views} views {summary.splits} and {summary.points} points to {summary.out_dir} "
          f"in {summary.seconds:.1f} s ({summary.seconds_per_view:.2f} s/view){'; ' + note if note else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
