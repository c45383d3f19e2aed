"""The installed add-on in real bpy 5.0.1: install the built zip, import a PLY, F12 and
animation renders checked against Blender's own ``world_to_camera_view``, passes, colour,
errors, register/unregister residue, worker modes."""

from __future__ import annotations

import os
import re
import struct
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from _blender_user import use_private_blender_user_folder
from _geometry_nodes import collection_on_points_tree, nodes_modifier

use_private_blender_user_folder()
bpy = pytest.importorskip("bpy")
from bpy_extras.object_utils import world_to_camera_view  # noqa: E402
from mathutils import Vector  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE = "bl_ext.user_default.npbgpp"
W, H = 64, 48


# --------------------------------------------------------------------------- EXR reader
def _exr_header(data: bytes, pos: int) -> tuple[dict[str, bytes], int]:
    header: dict[str, bytes] = {}
    while data[pos] != 0:
        end = data.index(b"\0", pos)
        end2 = data.index(b"\0", end + 1)
        size = struct.unpack_from("<i", data, end2 + 1)[0]
        header[data[pos:end].decode()] = data[end2 + 5 : end2 + 5 + size]
        pos = end2 + 5 + size
    return header, pos + 1


def _exr_channels(chl: bytes) -> list[tuple[str, int]]:
    channels, p = [], 0
    while chl[p] != 0:
        end = chl.index(b"\0", p)
        channels.append((chl[p:end].decode(), struct.unpack_from("<i", chl, end + 1)[0]))
        p = end + 1 + 16
    return channels


def read_exr(path: str) -> dict[str, np.ndarray]:
    """Channels of an uncompressed scanline OpenEXR file, single- or multi-part (Blender's
    multilayer files are multi-part in 5.0), rows top first."""
    with open(path, "rb") as f:
        data = f.read()
    magic, version = struct.unpack_from("<ii", data, 0)
    assert magic == 20000630, "not an EXR file"
    multipart = bool(version & 0x1000)
    pos, headers = 8, []
    while True:
        header, pos = _exr_header(data, pos)
        headers.append(header)
        if not multipart or data[pos] == 0:
            break
    pos += 1 if multipart else 0
    parts = []
    for header in headers:
        assert header["compression"][0] == 0, "only uncompressed EXR supported"
        xmin, ymin, xmax, ymax = struct.unpack("<iiii", header["dataWindow"])
        h = ymax - ymin + 1
        chunks = struct.unpack("<i", header["chunkCount"])[0] if "chunkCount" in header else h
        parts.append((_exr_channels(header["channels"]), xmin, ymin, xmax - xmin + 1, h, chunks))
    pos += 8 * sum(p[5] for p in parts)  # offset tables
    out: dict[str, np.ndarray] = {}
    for channels, _, _, w, h, _ in parts:
        for name, _ in channels:
            out[name] = np.zeros((h, w), np.float32)
    for _ in range(sum(p[5] for p in parts)):
        part = 0
        if multipart:
            part = struct.unpack_from("<i", data, pos)[0]
            pos += 4
        channels, _, ymin, w, _, _ = parts[part]
        y, _size = struct.unpack_from("<ii", data, pos)
        pos += 8
        for name, ptype in channels:
            dtype, nbytes = (np.float16, 2) if ptype == 1 else (np.float32, 4)
            out[name][y - ymin] = np.frombuffer(data, dtype=dtype, count=w, offset=pos).astype(np.float32)
            pos += nbytes * w
    return out


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def addon_zip(tmp_path_factory) -> str:
    """The add-on zip, built as a user downloads it."""
    sys.path.insert(0, ROOT)
    import build_addon

    return build_addon.build(str(tmp_path_factory.mktemp("dist")))


@pytest.fixture(scope="module")
def addon(addon_zip):
    """Install + enable the zip the way Blender does."""
    zip_path = addon_zip
    bpy.ops.wm.read_factory_settings(use_empty=True)
    result = bpy.ops.extensions.package_install_files(filepath=zip_path, repo="user_default", enable_on_install=True)
    assert result == {"FINISHED"}
    assert MODULE in bpy.context.preferences.addons
    yield sys.modules[MODULE]
    import addon_utils

    addon_utils.disable(MODULE)
    bpy.ops.extensions.package_uninstall(repo_index=_repo_index(), pkg_id="npbgpp")


def _repo_index() -> int:
    return [r.module for r in bpy.context.preferences.extensions.repos].index("user_default")


def _ply(path: str, n: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from npbgpp_core.ply import save_ply

    rng = np.random.default_rng(seed)
    pts = rng.uniform(-1.0, 1.0, (n, 3)).astype(np.float32)
    col = (rng.integers(0, 256, (n, 3)) / 255.0).astype(np.float32)
    save_ply(path, pts, col)
    return pts, col


@pytest.fixture()
def scene(addon, tmp_path):
    """Empty scene with an imported coloured PLY, a camera and the NPBG++ engine."""
    bpy.ops.wm.read_homefile(use_empty=True)
    assert MODULE in bpy.context.preferences.addons
    pts, col = _ply(str(tmp_path / "points.ply"))
    assert bpy.ops.import_scene.npbgpp_ply(filepath=str(tmp_path / "points.ply")) == {"FINISHED"}
    sc = bpy.context.scene
    cam_data = bpy.data.cameras.new("Cam")
    cam = bpy.data.objects.new("Cam", cam_data)
    sc.collection.objects.link(cam)
    cam.location = (0.3, -4.5, 0.6)
    cam.rotation_euler = (np.radians(85), 0.05, np.radians(3))
    sc.camera = cam
    sc.render.engine = "NPBGPP"
    sc.npbgpp.output = "POINTS"
    sc.npbgpp.worker_mode = "PROCESS"
    sc.render.resolution_x, sc.render.resolution_y, sc.render.resolution_percentage = W, H, 100
    sc.render.film_transparent = True
    sc.render.dither_intensity = 0.0
    sc.view_settings.view_transform = "Standard"
    sc.view_layers[0].use_pass_z = True
    sc.render.image_settings.media_type = "MULTI_LAYER_IMAGE"  # OpenEXR multilayer in 5.0
    sc.render.image_settings.exr_codec = "NONE"
    sc.render.image_settings.color_depth = "32"
    return {"scene": sc, "camera": cam, "points": pts, "colors": col, "dir": tmp_path}


def render_exr(sc, path: str) -> dict[str, np.ndarray]:
    sc.render.filepath = path
    bpy.ops.render.render(write_still=True)
    return read_exr(path)


def expected_pixels(sc, cam, pts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Blender's own projection: (row from top, column, view depth) per point, full image."""
    r = sc.render
    w = r.resolution_x * r.resolution_percentage // 100
    h = r.resolution_y * r.resolution_percentage // 100
    out = np.array([tuple(world_to_camera_view(sc, cam, Vector(p))) for p in pts], dtype=np.float64)
    col = np.floor(out[:, 0] * w)
    row = h - 1 - np.floor(out[:, 1] * h)
    return row, col, out[:, 2]


def check_points_image(rgb: np.ndarray, alpha: np.ndarray, depth: np.ndarray | None, sc, cam, pts, colors,
                       offset=(0, 0)) -> int:
    """Every visible isolated point shows its colour (and depth) within 1 px of where Blender
    projects it; every covered pixel has a projected point within 1 px. Returns the count."""
    row, col, z = expected_pixels(sc, cam, pts)
    row, col = row - offset[0], col - offset[1]
    h, w = alpha.shape
    inside = (z > 0) & (row >= 0) & (row < h) & (col >= 0) & (col < w)
    checked = 0
    for i in np.flatnonzero(inside):
        others = np.flatnonzero(inside & (np.abs(row - row[i]) <= 2) & (np.abs(col - col[i]) <= 2))
        if len(others) > 1:
            continue  # neighbours may hide it: only isolated points are unambiguous
        r0, c0 = int(row[i]), int(col[i])
        win = (slice(max(r0 - 1, 0), r0 + 2), slice(max(c0 - 1, 0), c0 + 2))
        assert alpha[win].max() == 1.0, f"point {i} missing near pixel ({r0}, {c0})"
        rr, cc = np.nonzero(alpha[win] == 1.0)
        got = rgb[win][rr[0], cc[0]]
        np.testing.assert_allclose(got, srgb_to_linear(colors[i]), atol=2e-3)
        if depth is not None:
            assert abs(depth[win][rr[0], cc[0]] - z[i]) <= 1e-4 * max(1.0, z[i])
        checked += 1
    covered = np.argwhere(alpha == 1.0)
    for r0, c0 in covered:
        near = inside & (np.abs(row - r0) <= 1) & (np.abs(col - c0) <= 1)
        assert near.any(), f"pixel ({r0}, {c0}) covered but no point projects there"
    assert set(np.unique(alpha)) <= {0.0, 1.0}
    return checked


def srgb_to_linear(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


def passes(exr: dict[str, np.ndarray], name: str, layer: str = "ViewLayer") -> np.ndarray:
    return np.stack([exr[f"{layer}.{name}.{c}"] for c in "RGBA"], axis=-1)


# --------------------------------------------------------------------------- tests
def move_to_new_collection(sc, obj, name: str):
    """Move ``obj`` out of its collections into a new collection ``name`` under ``sc``'s."""
    col = bpy.data.collections.new(name)
    sc.collection.children.link(col)
    for c in list(obj.users_collection):
        c.objects.unlink(obj)
    col.objects.link(obj)
    return col


def test_installed_as_extension(addon):
    assert addon.__name__ == MODULE
    assert hasattr(bpy.types.Scene, "npbgpp")
    bpy.context.scene.render.engine = "NPBGPP"  # raises TypeError for an unknown engine
    assert bpy.context.scene.render.engine == "NPBGPP"
    assert os.path.isdir(os.path.join(os.path.dirname(addon.__file__), "vendor", "npbgpp_core"))


@pytest.mark.parametrize(
    "setup",
    ["plain", "shift_aspect", "vertical_fit", "vertical_fit_aspect", "percentage_portrait", "scaled_camera"],
)
def test_points_pass_matches_blender_projection(scene, setup):
    sc, cam = scene["scene"], scene["camera"]
    if setup == "shift_aspect":
        cam.data.shift_x, cam.data.shift_y = 0.12, -0.07
        sc.render.pixel_aspect_x, sc.render.pixel_aspect_y = 1.0, 1.6
        cam.data.lens = 35.0
    elif setup == "vertical_fit":
        cam.data.sensor_fit = "VERTICAL"
        cam.data.sensor_height = 20.0
        cam.data.shift_y = 0.1
    elif setup == "vertical_fit_aspect":
        cam.data.sensor_fit = "VERTICAL"
        cam.data.sensor_height = 20.0
        sc.render.pixel_aspect_x = 1.3
    elif setup == "percentage_portrait":
        sc.render.resolution_x, sc.render.resolution_y, sc.render.resolution_percentage = 90, 130, 50
        cam.data.shift_x = -0.05
    elif setup == "scaled_camera":
        cam.scale = (2.0, 0.5, 3.0)
    if sc.render.pixel_aspect_x != sc.render.pixel_aspect_y:
        # Blender 5.0 cannot write multi-part EXR with non-square pixels
        # ("Conflicting attributes ... pixelAspectRatio"): check Combined (= points here).
        sc.render.image_settings.media_type = "IMAGE"
        sc.render.image_settings.file_format = "OPEN_EXR"
        sc.render.image_settings.color_mode = "RGBA"
        exr = render_exr(sc, str(scene["dir"] / "out.exr"))
        combined = np.stack([exr[c] for c in "RGBA"], axis=-1)
        n = check_points_image(combined[..., :3], combined[..., 3], None, sc, cam, scene["points"], scene["colors"])
        assert n >= 5
        return
    exr = render_exr(sc, str(scene["dir"] / "out.exr"))
    pts_pass = passes(exr, "NPBG Points")
    combined = passes(exr, "Combined")
    depth = exr["ViewLayer.Depth.Z"]
    n = check_points_image(pts_pass[..., :3], pts_pass[..., 3], depth, sc, cam, scene["points"], scene["colors"])
    assert n >= 5
    np.testing.assert_allclose(combined, pts_pass, atol=1e-6)  # output POINTS: Combined = points
    assert np.all(depth[pts_pass[..., 3] == 0] >= 1e9)


def test_camera_clip_range_hides_points_outside_it(scene):
    """F12 honours the camera's Clip Start / End as Cycles does: the image equals Blender's
    projection of only the points inside the range (nearer or farther points neither show
    nor hide others), and a Clip End before every point leaves the background."""
    sc, cam = scene["scene"], scene["camera"]
    pts, colors = scene["points"], scene["colors"]
    bpy.context.view_layer.update()  # the camera's matrix_world
    _, _, z = expected_pixels(sc, cam, pts)
    cam.data.clip_start, cam.data.clip_end = 4.0, 5.0
    inside = (z > 4.0) & (z <= 5.0)
    assert (z < 4.0).sum() >= 5 and (z > 5.0).sum() >= 5 and inside.sum() >= 10
    exr = render_exr(sc, str(scene["dir"] / "clip.exr"))
    pts_pass = passes(exr, "NPBG Points")
    depth = exr["ViewLayer.Depth.Z"]
    n = check_points_image(pts_pass[..., :3], pts_pass[..., 3], depth, sc, cam, pts[inside], colors[inside])
    assert n >= 5
    hit = pts_pass[..., 3] == 1.0
    assert (depth[hit] > 4.0).all() and (depth[hit] <= 5.0).all()
    cam.data.clip_start, cam.data.clip_end = 0.1, 3.0  # before the whole cloud
    exr = render_exr(sc, str(scene["dir"] / "none.exr"))
    assert (passes(exr, "Combined") == 0).all() and (exr["ViewLayer.Depth.Z"] >= 1e9).all()


def test_clip_range_removing_every_point_says_so(scene, capfd):
    """An F12 whose camera Clip Start / End removes every point in view still succeeds
    (an empty frame, as Cycles would give) and an info line says the clip range removed
    them, naming the camera, Clip Start / End and how many points (those Blender's
    world_to_camera_view puts in the image); an empty frame for another reason (the camera
    looks away) or a frame with points says nothing of the kind. A neural render of a
    bundle (points in the worker) says the same."""
    sc, cam = scene["scene"], scene["camera"]
    bpy.context.view_layer.update()
    got = np.array([tuple(world_to_camera_view(sc, cam, Vector(p))) for p in scene["points"]])
    in_view = int(((got[:, 0] >= 0) & (got[:, 0] < 1) & (got[:, 1] >= 0) & (got[:, 1] < 1) & (got[:, 2] > 0)).sum())
    assert 10 <= in_view < len(got)
    for start, end in ((0.1, 3.0), (6.0, 50.0)):  # the cloud lies at depths 3.5 .. 5.5
        cam.data.clip_start, cam.data.clip_end = start, end
        capfd.readouterr()
        exr = render_exr(sc, str(scene["dir"] / "clipped.exr"))
        assert (passes(exr, "Combined") == 0).all() and (exr["ViewLayer.Depth.Z"] >= 1e9).all()
        out = capfd.readouterr().out
        assert f"Info: NPBG++: the camera 'Cam''s clip range ({start:g} .. {end:g}) removes all {in_view} points" in out
        assert "set Clip Start / End in the camera's Lens properties" in out and "Error" not in out
    # an animation says it once per camera, not on every empty frame (a second camera: in one line at the end)
    cam2 = cam.copy()
    sc.collection.objects.link(cam2)
    for frame, c in ((1, cam), (3, cam2)):
        sc.timeline_markers.new(f"F_{frame}", frame=frame).camera = c
    sc.frame_start, sc.frame_end = 1, 4
    sc.render.image_settings.media_type = "IMAGE"
    sc.render.image_settings.file_format = "PNG"
    sc.render.filepath = str(scene["dir"] / "clipped_anim_")
    bpy.ops.render.render(animation=True)
    out = capfd.readouterr().out
    assert out.count(f"removes all {in_view} points") == 1 and "'Cam''s clip range" in out, out
    assert out.count(f"Info: NPBG++: 2 cameras of this animation rendered empty frames, their Clip Start / End "
                     f"removing every point in view ('Cam', '{cam2.name}')") == 1, out
    sc.timeline_markers.clear()
    sc.camera = cam
    bpy.data.objects.remove(cam2)
    sc.render.image_settings.media_type = "MULTI_LAYER_IMAGE"
    sc.render.image_settings.exr_codec = "NONE"
    sc.render.image_settings.color_depth = "32"
    cam.data.clip_start, cam.data.clip_end = 0.1, 100.0
    exr = render_exr(sc, str(scene["dir"] / "shown.exr"))
    assert (passes(exr, "Combined")[..., 3] == 1.0).sum() >= 5 and "clip range" not in capfd.readouterr().out
    cam.rotation_euler[2] += np.pi  # looking away: empty, but not because of the clip range
    exr = render_exr(sc, str(scene["dir"] / "away.exr"))
    assert (passes(exr, "Combined") == 0).all() and "clip range" not in capfd.readouterr().out
    cam.rotation_euler[2] -= np.pi
    _tiny_bundle(str(scene["dir"] / "tiny.npbgpp"), scene["points"], scene["colors"])
    assert bpy.ops.import_scene.npbgpp_bundle(filepath=str(scene["dir"] / "tiny.npbgpp")) == {"FINISHED"}
    assert sc.npbgpp.output == "NEURAL"
    cam.data.clip_start, cam.data.clip_end = 0.1, 3.0
    capfd.readouterr()
    exr = render_exr(sc, str(scene["dir"] / "neural.exr"))
    assert (exr["ViewLayer.Depth.Z"] >= 1e9).all()
    assert f"removes all {in_view} points in its view" in capfd.readouterr().out


def test_clip_range_removing_part_of_the_points_says_so_once(scene, capfd):
    """An F12 whose camera Clip End removes a noticeable part of the points in view
    (CLIP_NOTE_FRACTION, one in twenty, or more) renders the rest and an info line says how
    many of how many (counted with Blender's world_to_camera_view); removing fewer says
    nothing; an animation says it once, not on every frame."""
    from importlib import import_module

    engine = import_module(f"{MODULE}.engine")
    sc, cam = scene["scene"], scene["camera"]
    bpy.context.view_layer.update()
    got = np.array([tuple(world_to_camera_view(sc, cam, Vector(p))) for p in scene["points"]])
    in_view = (got[:, 0] >= 0) & (got[:, 0] < 1) & (got[:, 1] >= 0) & (got[:, 1] < 1) & (got[:, 2] > 0)
    depths = np.sort(got[in_view, 2])
    n = len(depths)
    assert 1 < engine.CLIP_NOTE_FRACTION * n and n >= 10  # removing one point is below the threshold
    cam.data.clip_start, cam.data.clip_end = 0.1, float(depths[-2] + depths[-1]) / 2  # the farthest one only
    capfd.readouterr()
    exr = render_exr(sc, str(scene["dir"] / "one_clipped.exr"))
    assert (passes(exr, "Combined")[..., 3] == 1.0).sum() >= 5 and "clip range" not in capfd.readouterr().out
    end = float(depths[n // 2 - 1] + depths[n // 2]) / 2  # the farther half
    cam.data.clip_end = end
    removed = int((depths > end).sum())
    exr = render_exr(sc, str(scene["dir"] / "half_clipped.exr"))
    assert (passes(exr, "Combined")[..., 3] == 1.0).sum() >= 5
    out = capfd.readouterr().out
    assert (f"Info: NPBG++: the camera 'Cam''s clip range (0.1 .. {end:.4g}) removes {removed} of the {n} points in "
            f"its view ({100 * removed / n:.0f}%, depths {depths[n // 2]:.4g} .. {depths[-1]:.4g}); set Clip Start / "
            "End in the camera's Lens properties to include them") in out, out
    sc.frame_start, sc.frame_end = 1, 3
    sc.render.image_settings.media_type = "IMAGE"
    sc.render.image_settings.file_format = "PNG"
    sc.render.filepath = str(scene["dir"] / "clip_anim_")
    bpy.ops.render.render(animation=True)
    assert capfd.readouterr().out.count(f"removes {removed} of the {n} points") == 1


def _animation_through_many_cameras(scene) -> list:
    """4 imported cameras (24x32 photos) that a 40x40 render does not frame, each cutting half
    of the points in its view by its Clip End, one per frame 1-4 (markers); PNG output."""
    import json

    from PIL import Image

    from npbgpp_core.ply import save_ply

    root = scene["dir"] / "many"
    (root / "train").mkdir(parents=True)
    frames = []
    for i in range(4):
        Image.fromarray(np.full((32, 24, 3), 90, np.uint8)).save(root / "train" / f"r_{i}.png")
        c2w = np.eye(4)
        c2w[:3, 3] = (0.1 * i, -4.0, 0.0)
        c2w[:3, :3] = [[1, 0, 0], [0, 0, -1], [0, 1, 0]]  # looking along +y, at the points, z up
        frames.append({"file_path": f"./train/r_{i}", "transform_matrix": c2w.tolist(), "fl_x": 30.0,
                       "fl_y": 30.0, "cx": 12.0, "cy": 16.0, "w": 24, "h": 32})
    (root / "transforms_train.json").write_text(json.dumps({"frames": frames}))
    save_ply(str(root / "points3d.ply"), scene["points"], scene["colors"])
    sc = bpy.context.scene
    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(root)) == {"FINISHED"}
    sc.npbgpp.output = "POINTS"
    sc.render.resolution_x, sc.render.resolution_y = 40, 40  # no camera's 24x32 photo
    cameras = [bpy.data.objects[f"train/r_{i}"] for i in range(4)]
    for frame, cam in enumerate(cameras, start=1):
        sc.timeline_markers.new(f"F_{frame}", frame=frame).camera = cam
        # Clip End at the middle depth of the points in its view (Blender's projection): half removed
        got = np.array([tuple(world_to_camera_view(sc, cam, Vector(p))) for p in scene["points"]])
        inside = (got[:, :2] >= 0).all(1) & (got[:, :2] < 1).all(1) & (got[:, 2] > 0)
        assert inside.sum() >= 20
        cam.data.clip_start, cam.data.clip_end = 0.1, float(np.median(got[inside, 2]))
    sc.frame_start, sc.frame_end = 1, 4
    sc.render.image_settings.media_type = "IMAGE"
    sc.render.image_settings.file_format = "PNG"
    sc.render.filepath = str(scene["dir"] / "many_")
    return cameras


def test_animation_through_many_cameras_notes_one_and_sums_up_the_rest(scene, capfd):
    """An animation whose camera changes (markers) through imported cameras that do not
    frame their photos at the render's resolution, and whose clip ranges cut points: the
    first camera's notes in full, then one line per kind naming every camera on the last
    frame, not one warning per camera; a still F12 through each still says all."""
    cameras = _animation_through_many_cameras(scene)
    sc = bpy.context.scene
    capfd.readouterr()
    bpy.ops.render.render(animation=True)
    out = capfd.readouterr().out
    assert all((scene["dir"] / f"many_{f:04d}.png").is_file() for f in range(1, 5))
    assert out.count("Warning: NPBG++: the camera 'train/r_0' was imported for a 24x32 photo") == 1, out
    assert out.count("was imported for a") == 1, out
    # the markers made it the scene camera: the note's button reads it as it is
    assert "Use Camera's Photo Size sets it)" in out and "once the camera is the scene camera" not in out, out
    assert out.count("Info: NPBG++: the camera 'train/r_0''s clip range") == 1, out
    assert out.count("s clip range (") == 1, out
    names = "'train/r_0', 'train/r_1', 'train/r_2', 'train/r_3'"
    assert out.count(f"Warning: NPBG++: 4 cameras of this animation did not show their photo's framing ({names}); "
                     "the first one's note above says why, and F12 through each says what to set.") == 1, out
    assert out.count(f"Info: NPBG++: 4 cameras of this animation had points removed by their Clip Start / End "
                     f"({names});") == 1, out
    # Frame Step 2 renders frames 1 and 3: frame 3 is the last, and its summary names the two cameras
    sc.frame_step = 2
    bpy.ops.render.render(animation=True)
    out = capfd.readouterr().out
    assert out.count("cameras of this animation did not show") == 1, out
    assert "2 cameras of this animation did not show their photo's framing ('train/r_0', 'train/r_2')" in out, out
    sc.frame_step = 1
    # a still render through another camera is a job of its own: its notes in full
    sc.frame_set(3)
    assert sc.camera == cameras[2]
    bpy.ops.render.render(write_still=True)
    out = capfd.readouterr().out
    assert "the camera 'train/r_2' was imported for a 24x32 photo" in out and "'train/r_2''s clip range" in out
    assert "cameras of this animation" not in out


def test_animation_sums_up_on_the_last_frame_it_renders(scene, capfd):
    """With Overwrite off Blender skips the frames whose files exist: when the last ones are
    skipped, the summary comes on the last frame rendered (frame 2 of 1-4 here)."""
    _animation_through_many_cameras(scene)
    sc = bpy.context.scene
    sc.render.use_overwrite = False
    for frame in (3, 4):
        with open(sc.render.frame_path(frame=frame), "wb") as f:
            f.write(b"an earlier render")
    capfd.readouterr()
    bpy.ops.render.render(animation=True)
    out = capfd.readouterr().out
    assert open(sc.render.frame_path(frame=4), "rb").read() == b"an earlier render"  # skipped
    assert out.count("was imported for a") == 1, out
    assert ("Warning: NPBG++: 2 cameras of this animation did not show their photo's framing ('train/r_0', "
            "'train/r_1')") in out, out


def test_animation_stopped_by_an_error_sums_up_the_frames_before(scene, capfd):
    """Blender ends an animation at the frame whose engine reported an error (frame 3 of 1-4
    here: an orthographic camera): the cameras noted on frames 1 and 2 are summed up then,
    as on a last frame (they were never named)."""
    cameras = _animation_through_many_cameras(scene)
    cameras[2].data.type = "ORTHO"
    capfd.readouterr()
    with pytest.raises(RuntimeError, match="renders perspective cameras only"):
        bpy.ops.render.render(animation=True)
    out = capfd.readouterr().out
    sc = bpy.context.scene
    assert os.path.isfile(sc.render.frame_path(frame=2)) and not os.path.exists(sc.render.frame_path(frame=4))
    names = "'train/r_0', 'train/r_1'"
    assert out.count(f"Warning: NPBG++: 2 cameras of this animation did not show their photo's framing ({names});") \
        == 1, out
    assert out.count(f"Info: NPBG++: 2 cameras of this animation had points removed by their Clip Start / End "
                     f"({names});") == 1, out
    assert out.count("cameras of this animation") == 2, out


def test_animation_cancelled_sums_up_on_the_frame_it_stopped(scene, capfd, monkeypatch):
    """Esc during an animation's frame: the engine's ``test_break`` turns True and the worker
    request raises Cancelled (made so here from frame 2 on; Blender's own loop does not see
    it, so the engine stops the job with an error): the cameras noted so far are summed up on
    that frame, once, not on a last frame it never reaches."""
    _animation_through_many_cameras(scene)
    engine_module = sys.modules[f"{MODULE}.engine"]
    real_render_frame = engine_module.render_frame

    def render_frame_cancelled_from_frame_2(*args, **kwargs):
        if bpy.context.scene.frame_current >= 2:
            raise engine_module.Cancelled("cancelled")
        return real_render_frame(*args, **kwargs)

    monkeypatch.setattr(engine_module, "render_frame", render_frame_cancelled_from_frame_2)
    # Blender 5.0.1 crashed writing a 16-bit PNG or an EXR of a frame without a result: the
    # engine now stops such a frame with an error (test_frame_cancelled_while_blender_goes_on_*,
    # in a child process); 8-bit, which did not crash, keeps this process safe
    sc = bpy.context.scene
    sc.render.image_settings.color_depth = "8"
    capfd.readouterr()
    with pytest.raises(RuntimeError, match="frame 2 was cancelled before it was rendered while Blender went on"):
        bpy.ops.render.render(animation=True)
    out = capfd.readouterr().out
    assert os.path.isfile(sc.render.frame_path(frame=1)) and not os.path.exists(sc.render.frame_path(frame=2))
    # frame 2's framing note was taken before its render was cancelled; frames 3 and 4 are not rendered
    assert out.count("Warning: NPBG++: 2 cameras of this animation did not show their photo's framing "
                     "('train/r_0', 'train/r_1');") == 1, out
    assert out.count("cameras of this animation") == 1, out


def _animation_escaped_after_frame_2(scene, monkeypatch) -> tuple[list[int], object]:
    """Render the many-camera animation with Esc (Blender's break flag) set once frame 2's
    engine has returned, while Blender composites and writes it; the job must end CANCELLED.
    Returns the frames the engine rendered and the engine's own render method (replaced
    for the job by ``monkeypatch``). Skips where the flag is not found."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _blender_break import blender_break_flag

    flag = blender_break_flag()
    if flag is None:
        pytest.skip("Blender's break flag was not found in this bpy build (the offsets are bpy 5.0.1's)")
    _animation_through_many_cameras(scene)
    engine_module = sys.modules[f"{MODULE}.engine"]
    real_render = engine_module.NPBGPPRenderEngine.render
    frames: list[int] = []

    def render_then_esc_on_frame_2(self, depsgraph):
        frames.append(depsgraph.scene.frame_current)
        real_render(self, depsgraph)
        if depsgraph.scene.frame_current == 2:
            flag.value = True  # Esc once the engine has given frame 2's result

    monkeypatch.setattr(engine_module.NPBGPPRenderEngine, "render", render_then_esc_on_frame_2)
    try:
        assert bpy.ops.render.render(animation=True) == {"CANCELLED"}
    finally:
        flag.value = False
    return frames, real_render


def test_animation_cancelled_between_frames_sums_up_in_the_console_and_the_panel(scene, capfd, monkeypatch):
    """Esc after frame 2's engine returned, while Blender composites and writes it (Blender's
    break flag set then): Blender ends the job without another engine call (frame 2 is not
    written), so no engine can report the summary of the cameras noted on frames 1 and 2;
    render_cancel prints it to the console, once, as Blender prints reports, and the NPBG++
    render panel shows it until the next render job starts."""
    capfd.readouterr()
    frames, real_render = _animation_escaped_after_frame_2(scene, monkeypatch)
    engine_module = sys.modules[f"{MODULE}.engine"]
    sc = bpy.context.scene
    out = capfd.readouterr().out
    assert frames == [1, 2] and os.path.isfile(sc.render.frame_path(frame=1))
    assert not os.path.exists(sc.render.frame_path(frame=2))
    names = "'train/r_0', 'train/r_1'"
    framing = f"2 cameras of this animation did not show their photo's framing ({names});"
    assert out.count(f"Warning: NPBG++: {framing}") == 1, out
    assert out.count(f"Info: NPBG++: 2 cameras of this animation had points removed by their Clip Start / End "
                     f"({names});") == 1, out
    assert out.count("(printed here: the animation was cancelled between frames)") == 2, out
    layout = _drawn("RENDER_PT_npbgpp")
    assert "The animation was cancelled between frames:" in layout.labels, layout.labels
    assert framing in " ".join(layout.labels), layout.labels
    other = bpy.data.scenes.new("Another")  # its panel says nothing of this scene's animation
    other.render.engine = "NPBGPP"
    layout = _drawn("RENDER_PT_npbgpp", context=type("C", (), {"scene": other})())
    assert not any("cancelled" in label for label in layout.labels), layout.labels
    bpy.data.scenes.remove(other)
    monkeypatch.setattr(engine_module.NPBGPPRenderEngine, "render", real_render)
    bpy.ops.render.render(write_still=True)  # a new job: the panel no longer shows the old one's
    layout = _drawn("RENDER_PT_npbgpp")
    assert not any("cancelled" in label for label in layout.labels), layout.labels


def test_cancelled_animation_summary_goes_with_its_file(scene, capfd, monkeypatch):
    """The summary an animation cancelled between frames left in the NPBG++ render panel
    (made as the test above makes it) is gone once another file is loaded (File > New here):
    it spoke of the file left behind."""
    _animation_escaped_after_frame_2(scene, monkeypatch)

    def labels() -> list[str]:
        return _drawn("RENDER_PT_npbgpp").labels

    assert "The animation was cancelled between frames:" in labels()
    name = bpy.context.scene.name
    bpy.ops.wm.read_homefile(use_empty=True)
    assert bpy.context.scene.name == name  # the same scene name: only the file load can have cleared it
    bpy.context.scene.render.engine = "NPBGPP"
    assert not any("cancelled" in label for label in labels()), labels()


# A child process renders frames 1-3 with the installed add-on; render_frame is replaced
# so that frame 2 ends without a result in a given way (a crash must not end pytest).
_NO_RESULT_SCRIPT = r"""
import ctypes, json, os, sys
import bpy
zip_path, fmt, out_dir, cases = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(",")
assert bpy.ops.extensions.package_install_files(filepath=zip_path, repo="user_default",
                                                enable_on_install=True) == {"FINISHED"}
engine = sys.modules["bl_ext.user_default.npbgpp.engine"]
real_render_frame = engine.render_frame
sys.path.insert(0, os.environ["NPBGPP_TESTS"])
from _blender_break import blender_break_flag
from npbgpp_core.ply import save_ply
import numpy as np

BREAK = blender_break_flag()

def frame_2(how):
    def render_frame(snap, geo, should_cancel=None, *args, **kwargs):
        if bpy.context.scene.frame_current == 2:
            if how == "esc":
                BREAK.value = True
                assert should_cancel()  # the engine's test_break sees Blender's break
            if how == "error":
                raise engine.WorkerError("the worker died")
            raise engine.Cancelled("cancelled")
        return real_render_frame(snap, geo, should_cancel, *args, **kwargs)
    return render_frame

for case in cases:
    how, kind = case.split("-")
    if how == "esc" and BREAK is None:
        print("CASE", json.dumps({"case": case, "outcome": "unavailable"}), flush=True)
        continue
    bpy.ops.wm.read_homefile(use_empty=True)
    sc = bpy.context.scene
    rng = np.random.default_rng(0)
    save_ply(os.path.join(out_dir, "points.ply"), rng.uniform(-1, 1, (200, 3)).astype(np.float32),
             rng.uniform(0, 1, (200, 3)).astype(np.float32))
    assert bpy.ops.import_scene.npbgpp_ply(filepath=os.path.join(out_dir, "points.ply")) == {"FINISHED"}
    cam = bpy.data.objects.new("Cam", bpy.data.cameras.new("Cam"))
    sc.collection.objects.link(cam)
    cam.location, cam.rotation_euler = (0.0, -4.5, 0.0), (1.5708, 0.0, 0.0)
    sc.camera = cam
    sc.render.engine = "NPBGPP"
    sc.npbgpp.output, sc.npbgpp.worker_mode = "POINTS", "IN_PROCESS"
    sc.render.resolution_x, sc.render.resolution_y, sc.render.resolution_percentage = 32, 24, 100
    sc.render.film_transparent = True
    sc.frame_start, sc.frame_end = 1, 3
    settings = sc.render.image_settings
    settings.media_type = "IMAGE"
    if fmt == "png16":
        settings.file_format, settings.color_depth = "PNG", "16"
    else:
        settings.file_format, settings.exr_codec, settings.color_depth = "OPEN_EXR", "NONE", "32"
    folder = os.path.join(out_dir, case)
    os.makedirs(folder)
    engine.render_frame = frame_2(how)
    try:
        if kind == "still":
            sc.frame_set(2)
            sc.render.filepath = os.path.join(folder, "still")
            outcome = sorted(bpy.ops.render.render(write_still=True))[0]
        else:
            sc.render.filepath = os.path.join(folder, "frame_")
            outcome = sorted(bpy.ops.render.render(animation=True))[0]
    except RuntimeError as exc:
        outcome = f"raised: {exc}"
    engine.render_frame = real_render_frame
    if BREAK is not None:
        BREAK.value = False
    print("CASE", json.dumps({"case": case, "outcome": outcome, "files": sorted(os.listdir(folder))}), flush=True)
"""


def _render_frame_2_without_result(addon_zip: str, tmp_path, fmt: str, cases: list[str]) -> dict[str, dict]:
    """Run :data:`_NO_RESULT_SCRIPT` in a child process; per case its outcome and files."""
    import json
    import subprocess

    script = tmp_path / "no_result.py"
    script.write_text(_NO_RESULT_SCRIPT)
    env = dict(os.environ, BLENDER_USER_RESOURCES=str(tmp_path / "blender_user"), OMP_NUM_THREADS="1",
               NPBGPP_TESTS=os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, str(script), addon_zip, fmt, str(tmp_path), ",".join(cases)],
                          capture_output=True, text=True, timeout=600, env=env)
    # a crash (SIGSEGV: return code -11) is the failure this guards against
    assert proc.returncode == 0, f"return code {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    got = [json.loads(line[5:]) for line in proc.stdout.splitlines() if line.startswith("CASE ")]
    return {c["case"]: c for c in got}


def _covered_pixels(path: str) -> int:
    """Pixels with alpha > 0 in a written frame: a 16-bit PNG (PIL) or an uncompressed EXR."""
    if path.endswith(".exr"):
        return int((read_exr(path)["A"] > 0).sum())
    from PIL import Image

    with Image.open(path) as im:
        return int((np.asarray(im.getchannel("A")) > 0).sum())


@pytest.mark.parametrize("fmt", ["png16", "exr"])
def test_frame_cancelled_while_blender_goes_on_stops_with_an_error_and_no_file(addon_zip, tmp_path, fmt):
    """Frame 2 of 1-3 cancelled (render_frame raising Cancelled) while Blender's own loop goes
    on: Blender 5.0.1 crashed writing that frame, which had no result, as a 16-bit PNG or an
    EXR (an empty result would have been written as a black frame). The engine reports an error
    instead: Blender stops, writes no file for frames 2 and 3, and frame 1 is the real render.
    A frame that failed (WorkerError) is not written either, and a still render neither."""
    ext = "png" if fmt == "png16" else "exr"
    cases = ["cancel-animation", "cancel-still", "error-animation"]
    got = _render_frame_2_without_result(addon_zip, tmp_path, fmt, cases)
    assert sorted(got) == sorted(cases), got
    cancelled = "frame 2 was cancelled before it was rendered while Blender went on"
    assert got["cancel-animation"]["outcome"].startswith("raised: Error: NPBG++: " + cancelled), got
    assert got["cancel-animation"]["files"] == [f"frame_0001.{ext}"], got
    assert _covered_pixels(str(tmp_path / "cancel-animation" / f"frame_0001.{ext}")) > 20
    assert got["cancel-still"]["outcome"].startswith("raised: Error: NPBG++: " + cancelled), got
    assert got["cancel-still"]["files"] == [], got
    assert got["error-animation"]["outcome"].startswith("raised: Error: NPBG++: the worker died"), got
    assert got["error-animation"]["files"] == [f"frame_0001.{ext}"], got


@pytest.mark.parametrize("fmt", ["png16", "exr"])
def test_frame_cancelled_by_esc_writes_nothing_and_no_error(addon_zip, tmp_path, fmt):
    """Esc during frame 2 (Blender's break flag set, as Esc or Ctrl+C in background mode do;
    the engine's render_frame then raises Cancelled): no result, no error; Blender cancels the
    job (CANCELLED) and writes nothing for frames 2 and 3, as measured: no crash, no empty
    frame left in the output folder."""
    ext = "png" if fmt == "png16" else "exr"
    got = _render_frame_2_without_result(addon_zip, tmp_path, fmt, ["esc-animation", "esc-still"])
    if got["esc-animation"]["outcome"] == "unavailable":
        pytest.skip("Blender's break flag was not found in this bpy build (the offsets are bpy 5.0.1's)")
    assert got["esc-animation"] == {"case": "esc-animation", "outcome": "CANCELLED",
                                    "files": [f"frame_0001.{ext}"]}, got
    assert _covered_pixels(str(tmp_path / "esc-animation" / f"frame_0001.{ext}")) > 20
    assert got["esc-still"] == {"case": "esc-still", "outcome": "CANCELLED", "files": []}, got


def _points_deleted_where(axis: str, operation: str) -> Callable[[Any, Any], Any]:
    """For :func:`nodes_modifier`: a Delete Geometry removing the points whose ``axis``
    coordinate ("X", "Y", "Z") compares to 0 by the Compare node's ``operation`` (e.g.
    "LESS_THAN")."""

    def delete_points(tree, geometry):
        nodes, links = tree.nodes, tree.links
        delete, xyz, compare = (nodes.new("GeometryNodeDeleteGeometry"), nodes.new("ShaderNodeSeparateXYZ"),
                                nodes.new("FunctionNodeCompare"))
        delete.domain = "POINT"
        compare.data_type, compare.operation = "FLOAT", operation
        compare.inputs["B"].default_value = 0.0
        links.new(nodes.new("GeometryNodeInputPosition").outputs[0], xyz.inputs[0])
        links.new(xyz.outputs[axis], compare.inputs["A"])
        links.new(compare.outputs["Result"], delete.inputs["Selection"])
        links.new(geometry, delete.inputs["Geometry"])
        return delete.outputs["Geometry"]

    return delete_points


def _mesh_to_points(tree, geometry):
    """For :func:`nodes_modifier`: the mesh's vertices as a point cloud (Mesh to Points)."""
    to_points = tree.nodes.new("GeometryNodeMeshToPoints")
    tree.links.new(geometry, to_points.inputs["Mesh"])
    return to_points.outputs["Points"]


def test_clip_note_counts_the_points_geometry_nodes_leave(scene, capfd):
    """The all-clipped note of a neural F12 counts the points the render draws: those the
    point object's evaluated geometry keeps (a Geometry Nodes Delete Geometry removing the
    near half of a bundle's points), not its mesh before modifiers, whose near points lie
    inside the clip range (the note said nothing)."""
    sc, cam, pts = scene["scene"], scene["camera"], scene["points"]
    _tiny_bundle(str(scene["dir"] / "tiny.npbgpp"), pts, scene["colors"])
    assert bpy.ops.import_scene.npbgpp_bundle(filepath=str(scene["dir"] / "tiny.npbgpp")) == {"FINISHED"}
    obj = sc.npbgpp.point_object
    nodes_modifier(obj, "DropNear", _points_deleted_where("Y", "LESS_THAN"))  # y < 0: the half nearer the camera
    bpy.context.view_layer.update()
    got = np.array([tuple(world_to_camera_view(sc, cam, Vector(p))) for p in pts])
    in_view = (got[:, 0] >= 0) & (got[:, 0] < 1) & (got[:, 1] >= 0) & (got[:, 1] < 1) & (got[:, 2] > 0)
    kept = pts[:, 1] >= 0.0
    end = float(got[kept & in_view, 2].min()) - 0.05  # before every kept point, after some deleted ones
    assert (in_view & ~kept & (got[:, 2] < end)).sum() >= 3 and (kept & in_view).sum() >= 5
    cam.data.clip_start, cam.data.clip_end = 0.1, end
    capfd.readouterr()
    exr = render_exr(sc, str(scene["dir"] / "clipped.exr"))
    assert (exr["ViewLayer.Depth.Z"] >= 1e9).all()
    out = capfd.readouterr().out
    assert f"clip range (0.1 .. {end:.4g}) removes all {(kept & in_view).sum()} points in its view" in out, out


@pytest.mark.parametrize("how", ["hide_render", "collection_disabled", "excluded"])
def test_point_object_hidden_in_renders_renders_nothing(scene, capfd, how):
    """A point object disabled in renders (itself, its collection, or excluded from the view
    layer) is not drawn by F12, as in Cycles: the frame is empty (transparent, depth empty),
    the render succeeds and says why in an info line. The viewport follows viewport
    visibility instead: hidden in renders alone, it still draws there; hidden (H) there, it
    does not."""
    from importlib import import_module

    scene_snapshot = import_module(f"{MODULE}.scene_snapshot")
    sc = scene["scene"]
    obj = sc.npbgpp.point_object
    assert obj is not None
    exr = render_exr(sc, str(scene["dir"] / "shown.exr"))
    assert (passes(exr, "Combined")[..., 3] == 1.0).sum() >= 5  # the same scene shows points
    if how == "hide_render":
        obj.hide_render = True
    else:
        col = move_to_new_collection(sc, obj, "Hidden")
        if how == "collection_disabled":
            col.hide_render = True
        else:
            bpy.context.view_layer.layer_collection.children["Hidden"].exclude = True
    capfd.readouterr()
    exr = render_exr(sc, str(scene["dir"] / "hidden.exr"))
    assert (passes(exr, "Combined") == 0).all() and (passes(exr, "NPBG Points") == 0).all()
    assert (exr["ViewLayer.Depth.Z"] >= 1e9).all()
    assert f"'{obj.name}' is hidden in renders: nothing to render" in capfd.readouterr().out
    viewport_snap = scene_snapshot.snapshot(sc, bpy.context.evaluated_depsgraph_get())
    if how != "excluded":  # excluded from the view layer is gone from the viewport too
        assert viewport_snap.hidden == "" and viewport_snap.points is not None
        obj.hide_set(True)
        viewport_snap = scene_snapshot.snapshot(sc, bpy.context.evaluated_depsgraph_get())
    assert "hidden in the viewport" in viewport_snap.hidden and viewport_snap.points is None


@pytest.mark.parametrize("how", ["holdout_collection", "holdout_object", "indirect_only"])
def test_point_object_holdout_or_indirect_only_renders_nothing(scene, capfd, how):
    """A point object Blender would not show directly (in a Holdout collection or with its
    own Holdout flag: a hole; in an Indirect Only collection: only in shadows and
    reflections) draws no points in F12 nor in the viewport, and the info line says which
    flag and that holdout counts as absent; with the flag off again it renders."""
    from importlib import import_module

    scene_snapshot = import_module(f"{MODULE}.scene_snapshot")
    sc = scene["scene"]
    obj = sc.npbgpp.point_object
    col = move_to_new_collection(sc, obj, "Flagged")
    layer_col = bpy.context.view_layer.layer_collection.children["Flagged"]
    if how == "holdout_collection":
        layer_col.holdout = True
        said = f"'{obj.name}' is in a Holdout collection of the view layer 'ViewLayer': NPBG++ treats holdout as absent"
    elif how == "holdout_object":
        obj.is_holdout = True
        said = f"'{obj.name}' has Holdout set (Object Properties > Visibility): NPBG++ treats holdout as absent"
    else:
        layer_col.indirect_only = True
        said = f"'{obj.name}' is in an Indirect Only collection of the view layer 'ViewLayer'"
    assert col.objects[0] == obj
    capfd.readouterr()
    exr = render_exr(sc, str(scene["dir"] / "flagged.exr"))
    assert (passes(exr, "Combined") == 0).all() and (passes(exr, "NPBG Points") == 0).all()
    assert (exr["ViewLayer.Depth.Z"] >= 1e9).all()
    out = capfd.readouterr().out
    assert said in out and "nothing to render" in out, out
    viewport_snap = scene_snapshot.snapshot(sc, bpy.context.evaluated_depsgraph_get())
    assert said in viewport_snap.hidden and viewport_snap.points is None
    layer_col.holdout = layer_col.indirect_only = obj.is_holdout = False
    exr = render_exr(sc, str(scene["dir"] / "unflagged.exr"))
    assert (passes(exr, "Combined")[..., 3] == 1.0).sum() >= 5


def test_mesh_turned_into_points_by_geometry_nodes_renders_them(scene):
    """A mesh made in Blender whose Geometry Nodes turn it into a point cloud (Mesh to
    Points: its evaluated mesh is empty, the points are the point cloud component) renders
    those points with their colours where Blender projects them, and keeps their ids."""
    from importlib import import_module

    point_source = import_module(f"{MODULE}.point_source")
    sc, cam, pts, colors = scene["scene"], scene["camera"], scene["points"], scene["colors"]
    me = bpy.data.meshes.new("made")
    me.from_pydata([tuple(p) for p in pts.tolist()], [], [])
    col = me.color_attributes.new("Col", "FLOAT_COLOR", "POINT")
    col.data.foreach_set("color_srgb", np.concatenate([colors, np.ones((len(colors), 1), np.float32)], 1).ravel())
    ids = me.attributes.new(point_source.ID_ATTRIBUTE, "INT", "POINT")
    ids.data.foreach_set("value", np.arange(len(pts), dtype=np.int32)[::-1].copy())
    obj = bpy.data.objects.new("made", me)
    sc.collection.objects.link(obj)
    sc.npbgpp.point_object = obj
    nodes_modifier(obj, "ToPoints", _mesh_to_points)
    evaluated = obj.evaluated_get(bpy.context.evaluated_depsgraph_get())
    assert len(evaluated.data.vertices) == 0  # what the add-on read: nothing rendered
    np.testing.assert_array_equal(point_source.point_ids(evaluated), np.arange(len(pts))[::-1])
    exr = render_exr(sc, str(scene["dir"] / "gn.exr"))
    pts_pass = passes(exr, "NPBG Points")
    assert check_points_image(pts_pass[..., :3], pts_pass[..., 3], exr["ViewLayer.Depth.Z"], sc, cam, pts,
                              colors) >= 5


def test_point_object_only_instanced_or_in_another_scene_says_so(scene, capfd):
    """A point object drawn only through a collection instance (its own collection
    excluded, the usual instancing set-up) or not in the rendered scene at all renders
    nothing, and the info line says which, instead of telling the user to unhide it."""
    sc = scene["scene"]
    obj = sc.npbgpp.point_object
    col = move_to_new_collection(sc, obj, "Source")
    inst = bpy.data.objects.new("Instance", None)
    inst.instance_type, inst.instance_collection = "COLLECTION", col
    sc.collection.objects.link(inst)
    bpy.context.view_layer.layer_collection.children["Source"].exclude = True
    capfd.readouterr()
    exr = render_exr(sc, str(scene["dir"] / "instanced.exr"))
    assert (passes(exr, "Combined") == 0).all()
    out = capfd.readouterr().out
    assert (f"'{obj.name}' is hidden in renders and shows only through collection instances ('Instance'), which "
            "NPBG++ does not render (it renders the object itself, at its own transform): nothing to render (include "
            "its collection in the view layer to render it)") in out, out
    sc.collection.children.unlink(col)
    sc.collection.objects.unlink(inst)
    exr = render_exr(sc, str(scene["dir"] / "elsewhere.exr"))
    assert (passes(exr, "Combined") == 0).all()
    out = capfd.readouterr().out
    assert f"the Point Object '{obj.name}' is not in the scene '{sc.name}': nothing to render" in out, out


def test_point_object_instanced_by_geometry_nodes_says_so(scene, capfd):
    """A point object disabled in renders that Geometry Nodes elsewhere draw as instances
    (Object Info > As Instance on another object's points; Blender's is_instancer is False
    for that object) gets the instances note, in F12 and in the viewport, naming the Geometry
    Nodes' object (it said 'collection instances ... include its collection in the view
    layer', which is wrong advice there); with the node group's object cleared it is plainly
    hidden again."""
    from importlib import import_module

    scene_snapshot = import_module(f"{MODULE}.scene_snapshot")
    sc = scene["scene"]
    obj = sc.npbgpp.point_object
    obj.hide_render = True
    obj.hide_set(True)
    holder = bpy.data.objects.new("Scatter", bpy.data.meshes.new("Scatter"))
    holder.data.from_pydata([(0.0, 0.0, 0.0), (2.0, 0.0, 0.0)], [], [])
    sc.collection.objects.link(holder)

    def scatter(tree, geometry):
        """An instance of the point object (Object Info, As Instance) on each of the points."""
        info, on_points = tree.nodes.new("GeometryNodeObjectInfo"), tree.nodes.new("GeometryNodeInstanceOnPoints")
        info.inputs["Object"].default_value = obj
        info.inputs["As Instance"].default_value = True
        tree.links.new(geometry, on_points.inputs["Points"])
        tree.links.new(info.outputs["Geometry"], on_points.inputs["Instance"])
        return on_points.outputs[0]

    nodes_modifier(holder, "Scatter", scatter)
    info = holder.modifiers["Scatter"].node_group.nodes["Object Info"]
    depsgraph = bpy.context.evaluated_depsgraph_get()
    assert not depsgraph.id_eval_get(holder).is_instancer
    note = (f"'{obj.name}' is hidden in the viewport and shows only through the instances the Geometry Nodes of "
            "'Scatter' make, which NPBG++ does not render (it renders the object itself, at its own transform): "
            "nothing to render (show it in the Outliner to render it)")
    hidden = scene_snapshot.snapshot(sc, depsgraph).hidden
    assert note in hidden and "collection" not in hidden, hidden
    capfd.readouterr()
    exr = render_exr(sc, str(scene["dir"] / "gn_instanced.exr"))
    assert (passes(exr, "Combined") == 0).all()
    assert note.replace("the viewport", "renders") in capfd.readouterr().out
    info.inputs["Object"].default_value = None
    hidden = scene_snapshot.snapshot(sc, bpy.context.evaluated_depsgraph_get()).hidden
    assert hidden.endswith("is hidden in the viewport: nothing to render (show it in the Outliner to render it)")


def test_tile_size_takes_no_value_that_cannot_render(scene):
    """Tile Size 1 .. MIN_TILE_SIZE - 1 (allowed by the field's range, too small for a
    tile's margins) becomes MIN_TILE_SIZE, so F12 never fails on a value the field shows;
    0 (whole frame) and larger values stay, and the tooltip says both. A small value from
    an older file fails a Neural F12 naming the setting, and does not stop Points output,
    which has no tiles."""
    from importlib import import_module

    render_job = import_module(f"{MODULE}.render_job")
    sc = scene["scene"]
    s = sc.npbgpp
    smallest = render_job.MIN_TILE_SIZE
    for value, want in ((1, smallest), (smallest - 1, smallest), (0, 0), (smallest, smallest), (5000, 5000)):
        s.tile_size = value
        assert s.tile_size == want, value
    rna = type(s).bl_rna.properties["tile_size"]
    assert rna.hard_min == 0 and "0 renders the whole frame" in rna.description
    assert f"at least {smallest}" in rna.description and f"{render_job.WINDOW_MARGIN}-pixel margin" in rna.description
    s["tile_size"] = 100  # as stored by a file saved before (no update runs)
    assert s.tile_size == 100
    exr = render_exr(sc, str(scene["dir"] / "points.exr"))
    assert (passes(exr, "Combined")[..., 3] == 1.0).sum() >= 5
    _tiny_bundle(str(scene["dir"] / "tiny.npbgpp"), scene["points"], scene["colors"])
    assert bpy.ops.import_scene.npbgpp_bundle(filepath=str(scene["dir"] / "tiny.npbgpp")) == {"FINISHED"}
    s = bpy.context.scene.npbgpp
    s["tile_size"] = 100
    assert s.output == "NEURAL"
    with pytest.raises(RuntimeError, match=re.escape(f"Tile Size (Render Properties > NPBG++ > Performance) must be "
                                                     f"0 (whole frame) or at least {smallest} pixels, not 100")):
        render_exr(bpy.context.scene, str(scene["dir"] / "neural.exr"))


def test_each_view_layer_gets_its_own_image(scene):
    """Blender renders every view layer with its own depsgraph: a layer that excludes the
    point object's collection stays empty while the other shows the points, each as a render
    of that layer alone would (whichever layer Blender renders last)."""
    sc = scene["scene"]
    single = passes(render_exr(sc, str(scene["dir"] / "single.exr")), "Combined")
    assert (single[..., 3] == 1.0).sum() >= 5
    obj = sc.npbgpp.point_object
    move_to_new_collection(sc, obj, "Points")
    second = sc.view_layers.new("Second")
    second.use_pass_z = True
    for excluded, shown in ((second, sc.view_layers[0]), (sc.view_layers[0], second)):
        for layer in sc.view_layers:
            layer.layer_collection.children["Points"].exclude = layer == excluded
        exr = render_exr(sc, str(scene["dir"] / f"layers_{excluded.name}.exr"))
        np.testing.assert_array_equal(passes(exr, "Combined", shown.name), single)
        assert (passes(exr, "Combined", excluded.name) == 0).all()
        assert (exr[f"{excluded.name}.Depth.Z"] >= 1e9).all()


@pytest.mark.parametrize("crop", [False, True])
def test_border_render(scene, crop):
    sc, cam = scene["scene"], scene["camera"]
    r = sc.render
    r.use_border, r.use_crop_to_border = True, crop
    r.border_min_x, r.border_max_x, r.border_min_y, r.border_max_y = 0.2, 0.83, 0.15, 0.7
    cam.data.shift_x = 0.05
    exr = render_exr(sc, str(scene["dir"] / "border.exr"))
    pts_pass = passes(exr, "NPBG Points")
    xmin, xmax = int(np.float32(0.2) * np.float32(W)), int(np.float32(0.83) * np.float32(W))
    ymin, ymax = int(np.float32(0.15) * np.float32(H)), int(np.float32(0.7) * np.float32(H))
    if crop:
        assert pts_pass.shape[:2] == (ymax - ymin, xmax - xmin)
        offset = (H - ymax, xmin)
        n = check_points_image(pts_pass[..., :3], pts_pass[..., 3], exr["ViewLayer.Depth.Z"], sc, cam,
                               scene["points"], scene["colors"], offset)
        assert n >= 2
    else:
        assert pts_pass.shape[:2] == (H, W)
        outside = np.ones((H, W), bool)
        outside[H - ymax : H - ymin, xmin:xmax] = False
        assert pts_pass[outside, 3].max() == 0.0
        inner = pts_pass[H - ymax : H - ymin, xmin:xmax]
        assert inner[..., 3].max() == 1.0
        # Points projecting inside the window appear where Blender puts them.
        row, col, z = expected_pixels(sc, cam, scene["points"])
        inwin = (z > 0) & (row >= H - ymax + 1) & (row < H - ymin - 1) & (col >= xmin + 1) & (col < xmax - 1)
        for r0, c0 in zip(row[inwin].astype(int), col[inwin].astype(int), strict=True):
            assert pts_pass[r0 - 1 : r0 + 2, c0 - 1 : c0 + 2, 3].max() == 1.0


def test_render_under_two_pixels_names_the_setting_and_two_pixels_render(scene):
    """Blender renders 1-pixel images (Resolution 4 at 25 %, a thin border) that npbgpp_core's
    cameras refuse: F12 says which setting to change, in width x height, and writes no file;
    2x2 renders, each pixel covered exactly where Blender's projection puts a point, with the
    nearest one's depth."""
    sc, cam = scene["scene"], scene["camera"]
    r = sc.render
    r.resolution_x, r.resolution_y, r.resolution_percentage = 8, 4, 25
    r.filepath = str(scene["dir"] / "tiny.exr")
    with pytest.raises(RuntimeError, match=r"the render is 2x1 pixels \(Resolution 8x4 at 25%\).*Resolution or its %"):
        bpy.ops.render.render(write_still=True)
    assert not os.path.exists(r.filepath)
    r.resolution_x, r.resolution_y, r.resolution_percentage = 64, 48, 100
    r.use_border, r.use_crop_to_border = True, True
    r.border_min_x, r.border_max_x, r.border_min_y, r.border_max_y = 0.5, 0.53, 0.2, 0.8  # 1 px wide
    with pytest.raises(RuntimeError, match=r"the render border is 1x\d+ pixels.*widen the border"):
        bpy.ops.render.render(write_still=True)
    assert not os.path.exists(r.filepath)
    r.use_border = False
    r.resolution_x, r.resolution_y, r.resolution_percentage = 8, 8, 25
    exr = render_exr(sc, r.filepath)
    pts_pass = passes(exr, "NPBG Points")
    assert pts_pass.shape[:2] == (2, 2)
    row, col, z = expected_pixels(sc, cam, scene["points"])
    for r0 in range(2):
        for c0 in range(2):
            here = (z > cam.data.clip_start) & (row == r0) & (col == c0)
            assert pts_pass[r0, c0, 3] == float(here.any())
            if here.any():
                assert exr["ViewLayer.Depth.Z"][r0, c0] == pytest.approx(z[here].min(), rel=1e-4)


def test_png_colour_standard_view_transform(scene):
    """A PNG written with the Standard view transform holds the PLY's 8-bit colours."""
    from PIL import Image

    sc, cam = scene["scene"], scene["camera"]
    sc.render.image_settings.media_type = "IMAGE"
    sc.render.image_settings.file_format = "PNG"
    sc.render.image_settings.color_mode = "RGBA"
    sc.render.image_settings.color_depth = "8"
    sc.render.filepath = str(scene["dir"] / "colour.png")
    bpy.ops.render.render(write_still=True)
    img = np.asarray(Image.open(scene["dir"] / "colour.png")).astype(np.float64) / 255.0
    rgb = srgb_to_linear(img[..., :3])
    n = check_points_image(rgb.astype(np.float32), (img[..., 3] > 0.5).astype(np.float32), None, sc, cam,
                           scene["points"], scene["colors"])
    assert n >= 5
    row, col, z = expected_pixels(sc, cam, scene["points"])
    # exact bytes at isolated points
    for i in range(len(row)):
        r0, c0 = int(row[i]), int(col[i])
        if z[i] > 0 and 0 <= r0 < H and 0 <= c0 < W and img[r0, c0, 3] == 1.0:
            match = np.abs(img[r0, c0, :3][None] - scene["colors"]).max(axis=1) <= 1.0 / 255 + 1e-9
            assert match.any()


def test_animation_uses_each_frames_camera(scene):
    from PIL import Image

    sc, cam = scene["scene"], scene["camera"]
    sc.frame_start, sc.frame_end = 1, 3
    poses = [(0.3, -4.5, 0.6), (1.2, -4.0, 0.2), (-0.8, -4.8, 1.0)]
    for f, loc in enumerate(poses, start=1):
        cam.location = loc
        cam.keyframe_insert("location", frame=f)
    sc.frame_set(1)
    sc.render.image_settings.media_type = "IMAGE"
    sc.render.image_settings.file_format = "PNG"
    sc.render.image_settings.color_mode = "RGBA"
    sc.render.filepath = str(scene["dir"] / "anim_")
    bpy.ops.render.render(animation=True)
    masks = []
    for f in (1, 2, 3):
        img = np.asarray(Image.open(scene["dir"] / f"anim_{f:04d}.png")).astype(np.float32) / 255.0
        sc.frame_set(f)
        n = check_points_image(srgb_to_linear(img[..., :3]).astype(np.float32), (img[..., 3] > 0.5).astype(np.float32),
                               None, sc, cam, scene["points"], scene["colors"])
        assert n >= 3
        masks.append(img[..., 3] > 0.5)
    assert (masks[0] != masks[1]).any() and (masks[1] != masks[2]).any()


def test_in_process_equals_worker_process(scene):
    sc = scene["scene"]
    a = passes(render_exr(sc, str(scene["dir"] / "a.exr")), "NPBG Points")
    sc.npbgpp.worker_mode = "IN_PROCESS"
    b = passes(render_exr(sc, str(scene["dir"] / "b.exr")), "NPBG Points")
    np.testing.assert_array_equal(a, b)


def test_worker_crash_is_reported_then_recovers(scene, addon):
    sc = scene["scene"]
    sc.render.filepath = str(scene["dir"] / "x.exr")
    bpy.ops.render.render(write_still=True)
    hub = sys.modules[f"{MODULE}.worker_client"].HUB
    proc = hub.worker.proc
    proc.kill()
    proc.wait()
    # The dead worker is noticed and a new one started: the render still succeeds.
    exr = render_exr(sc, str(scene["dir"] / "y.exr"))
    assert passes(exr, "NPBG Points")[..., 3].max() == 1.0
    assert hub.worker.proc.pid != proc.pid


def test_cancelled_render_ends_the_worker_at_once_and_the_next_render_works(scene):
    """Esc during F12 (the engine's test_break, which headless bpy cannot press: the same
    callback is given here) kills the busy worker instead of asking it to shut down, which
    it reads only after finishing the frame (Esc waited up to 5 s); the next render starts
    a new worker and gives the same image as before."""
    from importlib import import_module

    render_job = import_module(f"{MODULE}.render_job")
    client = import_module(f"{MODULE}.worker_client")
    sc, cam = scene["scene"], scene["camera"]
    _tiny_bundle(str(scene["dir"] / "tiny.npbgpp"), scene["points"], scene["colors"])
    assert bpy.ops.import_scene.npbgpp_bundle(filepath=str(scene["dir"] / "tiny.npbgpp")) == {"FINISHED"}
    want = passes(render_exr(sc, str(scene["dir"] / "before.exr")), "Combined")
    bpy.context.view_layer.update()
    snap = import_module(f"{MODULE}.scene_snapshot").snapshot(sc)
    sc.render.resolution_x, sc.render.resolution_y = 640, 480  # a frame slow enough to be cancelled
    geo = import_module(f"{MODULE}.camera_bridge").scene_camera_geometry(cam, sc)
    sc.render.resolution_x, sc.render.resolution_y = W, H
    proc = client.HUB.worker.proc
    with pytest.raises(client.Cancelled):
        render_job.render_frame(snap, geo, lambda: True)
    assert proc.returncode is not None and proc.returncode < 0  # killed, not a finished frame then Shutdown
    np.testing.assert_array_equal(passes(render_exr(sc, str(scene["dir"] / "after.exr")), "Combined"), want)
    assert client.HUB.worker.proc.pid != proc.pid


@pytest.mark.parametrize("kind", ["missing", "corrupt"])
def test_bad_bundle_reports_error(scene, kind):
    sc = scene["scene"]
    path = scene["dir"] / "scene.npbgpp"
    if kind == "corrupt":
        path.write_bytes(b"\x00garbage, not a bundle" * 10)
    sc.npbgpp.output = "NEURAL"
    sc.npbgpp.bundle = str(path)
    sc.render.filepath = str(scene["dir"] / "bad.exr")
    with pytest.raises(RuntimeError, match="scene.npbgpp"):
        bpy.ops.render.render(write_still=True)
    # Blender is fine and the next good render works.
    sc.npbgpp.output = "POINTS"
    sc.npbgpp.bundle = ""
    assert passes(render_exr(sc, str(scene["dir"] / "ok.exr")), "NPBG Points")[..., 3].max() == 1.0


def test_neural_needs_bundle_message(scene):
    sc = scene["scene"]
    sc.npbgpp.output = "NEURAL"
    sc.render.filepath = str(scene["dir"] / "n.exr")
    with pytest.raises(RuntimeError, match="bundle"):
        bpy.ops.render.render(write_still=True)


def test_stereoscopy_refused_with_a_message(scene):
    """With Stereoscopy on, Blender gives each eye its own passes: one image written once
    left the right eye black, silently. F12 says why it does not render instead."""
    sc = scene["scene"]
    sc.render.use_multiview = True
    sc.render.views_format = "STEREO_3D"
    with pytest.raises(RuntimeError, match=r"Stereoscopy is on \(Output Properties > Stereoscopy\)"):
        render_exr(sc, str(scene["dir"] / "stereo.exr"))
    sc.render.use_multiview = False
    assert (passes(render_exr(sc, str(scene["dir"] / "mono.exr")), "Combined")[..., 3] == 1.0).sum() >= 5


def test_orthographic_camera_refused(scene):
    sc = scene["scene"]
    scene["camera"].data.type = "ORTHO"
    sc.render.filepath = str(scene["dir"] / "o.exr")
    with pytest.raises(RuntimeError, match="perspective"):
        bpy.ops.render.render(write_still=True)


def test_scene_camera_that_is_not_a_camera_refused(scene):
    """Blender lets an empty be the scene camera; F12 said "AttributeError: 'NoneType' object
    has no attribute 'type'"."""
    sc = scene["scene"]
    empty = bpy.data.objects.new("Rig", None)
    sc.collection.objects.link(empty)
    sc.camera = empty
    sc.render.filepath = str(scene["dir"] / "e.exr")
    with pytest.raises(RuntimeError, match=r"scene camera 'Rig' is not a camera object \(its type is EMPTY\)") as info:
        bpy.ops.render.render(write_still=True)
    assert "AttributeError" not in str(info.value)


def _residue() -> dict:
    names = {"NPBGPPRenderEngine", "NPBGPPSceneSettings", "NPBGPPPreferences", "RENDER_PT_npbgpp",
             "IMPORT_SCENE_OT_npbgpp_ply", "NPBGPP_OT_aggregate",
             # a panel of ours under Blender's own Output > Format (bl_parent_id), and its button
             "RENDER_PT_npbgpp_format", "NPBGPP_OT_use_camera_photo_size"}
    menu = bpy.types.TOPBAR_MT_file_import
    draw_funcs = getattr(menu.draw, "_draw_funcs", [])
    return {
        "classes": sorted(n for n in names if hasattr(bpy.types, n)),
        "scene_prop": hasattr(bpy.types.Scene, "npbgpp"),
        "handlers": [h.__name__ for hs in (bpy.app.handlers.load_pre, bpy.app.handlers.load_post,
                                           bpy.app.handlers.save_pre, bpy.app.handlers.save_post,
                                           bpy.app.handlers.save_post_fail,
                                           bpy.app.handlers.render_init, bpy.app.handlers.render_complete,
                                           bpy.app.handlers.render_cancel)
                     for h in hs if "npbgpp" in (h.__module__ or "")],
        "menu": [f.__module__ for f in draw_funcs if "npbgpp" in (f.__module__ or "")],
        "engine_ops": hasattr(bpy.ops.import_scene, "npbgpp_ply") and "npbgpp_ply" in dir(bpy.ops.import_scene),
        "vendor_paths": [p for p in sys.path if p.endswith(os.path.join("npbgpp", "vendor"))],
        "panels": sorted(p.__name__ for p in bpy.types.Panel.__subclasses__()
                         if "NPBGPP" in getattr(p, "COMPAT_ENGINES", ()) and "npbgpp" not in p.__module__),
    }


def test_operators_that_change_the_scene_are_undo_steps(addon):
    """Blender pushes an undo step when an operator with UNDO in bl_options finishes (modal
    ones included); without it, Ctrl+Z after Aggregate or Fit also undid the step before
    (e.g. Import Dataset) and redo lost the bundle they set. (bpy without a window has no
    undo stack, so the flag Blender reads is what can be checked.)"""
    changes_scene = ("IMPORT_SCENE_OT_npbgpp_ply", "IMPORT_SCENE_OT_npbgpp_bundle", "IMPORT_SCENE_OT_npbgpp_dataset",
                     "NPBGPP_OT_points_from_meshes", "NPBGPP_OT_densify", "NPBGPP_OT_aggregate", "NPBGPP_OT_fit",
                     "NPBGPP_OT_use_camera_photo_size")
    assert [name for name in changes_scene if "UNDO" not in getattr(bpy.types, name).bl_options] == []


def test_job_operators_have_no_redo_and_ask_their_options_first(addon):
    """Aggregate, Densify Points and Fit to Photos run for minutes and write files: Blender's
    Adjust Last Operation panel (shown for REGISTER + UNDO operators) reran the whole job in
    execute, freezing Blender. Their registered flags (as bpy.ops reads them from Blender) keep
    UNDO and leave REGISTER out; in a window invoke shows the options in a dialog whose OK
    (execute) starts the modal job, and without a window it starts the job at once."""
    from types import SimpleNamespace

    ops = sys.modules[f"{MODULE}.operators"]
    for name in ("aggregate", "densify", "fit"):
        assert getattr(bpy.ops.npbgpp, name).bl_options == {"UNDO"}, name
    calls: list[tuple] = []

    def job(cls: type) -> SimpleNamespace:  # the operator's Python side (Blender makes the real one)
        op = SimpleNamespace(bl_label=cls.bl_label, _asked=False,
                             _start_job=lambda context: calls.append(("job", op._asked)) or {"RUNNING_MODAL"})
        op._ask_options = ops._WorkerStepJob._ask_options.__get__(op)
        return op

    def dialog(operator: object, confirm_text: str = "") -> set[str]:
        calls.append(("dialog", confirm_text))
        return {"RUNNING_MODAL"}

    window = SimpleNamespace(window=object(), window_manager=SimpleNamespace(invoke_props_dialog=dialog))
    op = job(ops.NPBGPP_OT_fit)
    assert ops.NPBGPP_OT_fit.invoke(op, window, None) == {"RUNNING_MODAL"}
    assert calls == [("dialog", "Fit to Photos")] and op._asked  # nothing started before OK
    assert ops.NPBGPP_OT_fit.execute(op, window) == {"RUNNING_MODAL"}  # OK: the modal job, not a run to the end
    assert calls[1:] == [("job", False)] and not op._asked
    calls.clear()
    assert ops.NPBGPP_OT_fit.invoke(job(ops.NPBGPP_OT_fit), SimpleNamespace(window=None), None) == {"RUNNING_MODAL"}
    assert calls == [("job", False)]


def test_unregister_ends_running_jobs_as_cancel_does(addon):
    """Disabling the add-on while a job runs: Blender frees modal operators of unregistered
    classes without cancel(), leaving the job's timer (firing for ever), progress cursor, status
    line and worker job behind. unregister() first ends each of its jobs listed in a window's
    modal_operators through its cancel(): here a worker step job holding a real window-manager
    timer and the running-job claim, next to another add-on's modal operator (left alone) and a
    job whose cancel raises (disabling goes on). (bpy without a window runs no modal operator,
    so the windows are stand-ins; the timer and window manager are Blender's.)"""
    from contextlib import nullcontext
    from types import SimpleNamespace

    ops = sys.modules[f"{MODULE}.operators"]
    wm = bpy.context.window_manager

    class Job(ops._WorkerStepJob):
        _job = "Aggregate Descriptors"

    class Broken(ops._WorkerStepJob):
        def cancel(self, context: object) -> None:
            raise RuntimeError("window gone")

    job = Job()
    job._timer = wm.event_timer_add(10.0)
    wm.progress_begin(0, 10)
    ops._RUNNING[job._job] = ops._Claim(job, lambda: True)
    other = SimpleNamespace(bl_idname="OTHER_OT_modal", cancel=lambda context: pytest.fail("not ours"))
    windows = [SimpleNamespace(modal_operators=[other, Broken()]), SimpleNamespace(modal_operators=[job])]
    overrides: list[object] = []
    context = SimpleNamespace(window_manager=wm, workspace=None,
                              temp_override=lambda window: overrides.append(window) or nullcontext())
    try:
        assert ops.end_running_jobs(windows, context) == 2
        assert job._timer is None and job._job not in ops._RUNNING  # timer removed, claim released
        assert overrides == windows  # each cancel ran in its own window
        assert ops.end_running_jobs([SimpleNamespace(modal_operators=[other])], context) == 0
    finally:
        ops._RUNNING.pop(job._job, None)
        if job._timer is not None:
            wm.event_timer_remove(job._timer)


def test_register_unregister_twice_leaves_no_residue(addon):
    import addon_utils

    enabled = _residue()
    assert enabled["classes"] and enabled["scene_prop"] and enabled["handlers"] and enabled["menu"]
    assert "DATA_PT_lens" in enabled["panels"]  # Blender's camera panels show for NPBG++
    for _ in range(2):
        addon_utils.disable(MODULE)
        gone = _residue()
        assert gone == {"classes": [], "scene_prop": False, "handlers": [], "menu": [], "engine_ops": False,
                        "vendor_paths": [], "panels": []}
        addon_utils.enable(MODULE)
        assert _residue() == enabled


# --------------------------------------------------------------------------- neural
def _tiny_bundle(path: str, pts: np.ndarray, colors: np.ndarray) -> None:
    """A random-weight NPBG++ bundle aggregated from two 32x24 views of random images."""
    import torch

    from npbgpp_core import Camera
    from npbgpp_core.models import NPBGPlusPlus
    from npbgpp_core.scene import NeuralScene

    torch.manual_seed(0)
    model = NPBGPlusPlus().eval()
    points = torch.from_numpy(pts)
    views = [Camera.look_at((0.5, 4.0, 0.5), (0, 0, 0), (0, 0, 1), 50.0, (24, 32)),
             Camera.look_at((-3.0, 2.5, 1.0), (0, 0, 0), (0, 0, 1), 50.0, (24, 32))]
    images = torch.rand(2, 3, 24, 32)
    with torch.no_grad():
        state = model.begin_scene(points)
        state.add_views(images, views)
        agg = state.finish()
    NeuralScene.from_aggregated(model, agg, torch.from_numpy(colors)).save(path)


def test_neural_combined_matches_core_render(scene):
    """Combined with output NEURAL equals npbgpp_core rendering the same camera (PNG within
    1/255 with the Standard view transform; EXR to float precision); the point object's
    transform moves the bundle."""
    from PIL import Image

    from blender_addon.camera_bridge import scene_camera_geometry
    from npbgpp_core import Camera
    from npbgpp_core.scene import NeuralScene

    sc, cam = scene["scene"], scene["camera"]
    bundle = str(scene["dir"] / "tiny.npbgpp")
    _tiny_bundle(bundle, scene["points"], scene["colors"])
    sc.npbgpp.output = "NEURAL"
    sc.npbgpp.bundle = bundle
    sc.render.film_transparent = False
    exr = render_exr(sc, str(scene["dir"] / "neural.exr"))
    combined = passes(exr, "Combined")
    bpy.context.view_layer.update()
    geo = scene_camera_geometry(cam.evaluated_get(bpy.context.evaluated_depsgraph_get()), sc)
    camera = Camera.from_opencv(geo.K, geo.R, geo.t, geo.image_size)
    want = NeuralScene.load(bundle).renderer("cpu").render(camera).permute(1, 2, 0).numpy()
    got_display = np.where(combined[..., :3] <= 0.0031308, combined[..., :3] * 12.92,
                           1.055 * np.clip(combined[..., :3], 0, 1) ** (1 / 2.4) - 0.055)
    np.testing.assert_allclose(got_display, want, atol=2e-4)
    assert combined[..., 3].min() == 1.0  # opaque film: the network paints the background
    # The same through an 8-bit PNG.
    sc.render.image_settings.media_type = "IMAGE"
    sc.render.image_settings.file_format = "PNG"
    sc.render.image_settings.color_depth = "8"
    sc.render.filepath = str(scene["dir"] / "neural.png")
    bpy.ops.render.render(write_still=True)
    png = np.asarray(Image.open(scene["dir"] / "neural.png"))[..., :3].astype(np.float64)
    assert np.abs(png - np.round(want * 255)).max() <= 1.0
    # Move, rotate and scale the point object: its world points are what the camera sees.
    obj = sc.npbgpp.point_object
    obj.location = (0.2, 0.3, -0.1)
    obj.rotation_euler = (0.1, 0.2, 0.3)
    obj.scale = (1.5, 1.5, 1.5)
    bpy.context.view_layer.update()
    sc.render.image_settings.media_type = "MULTI_LAYER_IMAGE"
    sc.render.image_settings.exr_codec = "NONE"
    sc.render.image_settings.color_depth = "32"
    exr = render_exr(sc, str(scene["dir"] / "moved.exr"))
    M = np.array(obj.matrix_world)
    world = (scene["points"] @ M[:3, :3].T + M[:3, 3]).astype(np.float32)
    pts_pass = passes(exr, "NPBG Points")
    n = check_points_image(pts_pass[..., :3], pts_pass[..., 3], exr["ViewLayer.Depth.Z"], sc, cam, world,
                           scene["colors"])
    assert n >= 5


# --------------------------------------------------------------------------- data in/out
def test_points_from_meshes_base_colour(scene):
    sc = scene["scene"]
    bpy.ops.mesh.primitive_plane_add(size=2.0, location=(0.0, 0.0, 0.5))
    plane = bpy.context.active_object
    mat = bpy.data.materials.new("Red")
    mat.diffuse_color = (0.5, 0.1, 0.05, 1.0)  # linear; used when there are no nodes
    plane.data.materials.append(mat)
    bsdf = mat.node_tree.nodes.get("Principled BSDF") if mat.node_tree else None
    if bsdf is not None:
        bsdf.inputs["Base Color"].default_value = (0.5, 0.1, 0.05, 1.0)
    for o in sc.objects:
        o.select_set(o == plane)
    assert bpy.ops.npbgpp.points_from_meshes(count=300, seed=1) == {"FINISHED"}
    pts, col = _sampled_points(sc)
    assert pts.shape == (300, 3)
    np.testing.assert_allclose(pts[:, 2], 0.5, atol=1e-5)
    assert np.abs(pts[:, :2]).max() <= 1.0 + 1e-5 and np.abs(pts[:, :2]).max() > 0.8
    expected = np.where(np.array([0.5, 0.1, 0.05]) <= 0.0031308, np.array([0.5, 0.1, 0.05]) * 12.92,
                        1.055 * np.array([0.5, 0.1, 0.05]) ** (1 / 2.4) - 0.055)
    np.testing.assert_allclose(col, np.broadcast_to(expected, col.shape), atol=2e-3)


def _write_nerf_dataset(root, cams: list, pts: np.ndarray, colors: np.ndarray, size=(24, 32)) -> None:
    """A tiny NeRF-Synthetic folder from Blender camera objects (transform_matrix is
    Blender's camera matrix_world: x right, y up, z backward)."""
    import json

    from PIL import Image

    from npbgpp_core.ply import save_ply

    h, w = size
    bpy.context.view_layer.update()  # matrix_world of freshly moved cameras
    os.makedirs(root / "train", exist_ok=True)
    rng = np.random.default_rng(3)
    frames = []
    for i, cam in enumerate(cams):
        Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8)).save(root / "train" / f"r_{i}.png")
        frames.append({"file_path": f"./train/r_{i}", "transform_matrix": [list(r) for r in cam.matrix_world]})
    angle = 2 * np.arctan(cams[0].data.sensor_width / 2 / cams[0].data.lens)
    (root / "transforms_train.json").write_text(json.dumps({"camera_angle_x": float(angle), "frames": frames}))
    for split in ("val", "test"):
        (root / f"transforms_{split}.json").write_text(json.dumps({"camera_angle_x": float(angle), "frames": []}))
    save_ply(str(root / "points3d.ply"), pts, colors)


def _import_nerf_dataset(scene) -> tuple:
    """The scene's camera and points written as a one-view dataset in scene["dir"]/"nerf" and
    imported, with the add-on's bundled weights: (the folder, the dataset's point object)."""
    root = scene["dir"] / "nerf"
    _write_nerf_dataset(root, [scene["camera"]], scene["points"], scene["colors"])
    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(root)) == {"FINISHED"}
    scene["scene"].npbgpp.weights = ""
    return root, scene["scene"].npbgpp.point_object


def test_import_dataset_cameras_reproduce_views(scene):
    sc, cam = scene["scene"], scene["camera"]
    cam2 = cam.copy()
    cam2.data = cam.data.copy()
    sc.collection.objects.link(cam2)
    cam2.location = (2.0, -3.5, 1.0)
    cam2.rotation_euler = (np.radians(75), 0.0, np.radians(30))
    bpy.context.view_layer.update()
    root = scene["dir"] / "nerf"
    _write_nerf_dataset(root, [cam, cam2], scene["points"], scene["colors"])
    originals = [(c.matrix_world.copy(), c.data.lens) for c in (cam, cam2)]
    sc.render.resolution_x, sc.render.resolution_y = 32, 24
    ref = []
    for c in (cam, cam2):
        ref.append(np.array([tuple(world_to_camera_view(sc, c, Vector(p))) for p in scene["points"]]))
    sc.render.pixel_aspect_x = 2.0  # a scene with wide pixels: the cameras are made for square ones
    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(root)) == {"FINISHED"}
    assert (sc.render.pixel_aspect_x, sc.render.pixel_aspect_y) == (1.0, 1.0)
    imported = [o for o in sc.objects if o.type == "CAMERA" and o not in (cam, cam2)]
    assert len(imported) == 2
    assert (sc.render.resolution_x, sc.render.resolution_y) == (32, 24)
    for c, want in zip(sorted(imported, key=lambda o: o.name), ref, strict=True):
        got = np.array([tuple(world_to_camera_view(sc, c, Vector(p))) for p in scene["points"]])
        np.testing.assert_allclose(got[:, :2] * [32, 24], want[:, :2] * [32, 24], atol=1e-3)
        np.testing.assert_allclose(got[:, 2], want[:, 2], rtol=1e-5)
    assert originals[0][1] == cam.data.lens
    assert sc.npbgpp.dataset_path


@pytest.mark.parametrize("fmt", ["AUTO", "NERFSTUDIO"])
def test_import_nerfstudio_transforms_cameras_reproduce_views(scene, fmt):
    """A nerfstudio / instant-ngp transforms.json folder (intrinsics in pixels, COLMAP's
    principal point convention, sparse_pc.ply by ply_file_path): the imported cameras see
    the points where Blender's own world_to_camera_view puts them for the originals."""
    import json

    from PIL import Image

    from npbgpp_core.ply import save_ply

    sc, cam = scene["scene"], scene["camera"]
    cam2 = cam.copy()
    cam2.data = cam.data.copy()
    sc.collection.objects.link(cam2)
    cam2.location = (-2.5, -3.0, 1.5)
    cam2.rotation_euler = (np.radians(70), np.radians(8), np.radians(-35))
    bpy.context.view_layer.update()
    w, h = 32, 24
    root = scene["dir"] / "ns"
    (root / "images").mkdir(parents=True)
    frames = []
    for i, c in enumerate((cam, cam2)):
        Image.fromarray(np.full((h, w, 3), 60 + 40 * i, np.uint8)).save(root / "images" / f"frame_{i:05d}.png")
        fl = c.data.lens / c.data.sensor_width * w  # sensor fit AUTO, landscape: the width
        frames.append({"file_path": f"images/frame_{i:05d}.png", "transform_matrix": [list(r) for r in c.matrix_world],
                       "fl_x": fl, "fl_y": fl, "cx": w / 2, "cy": h / 2, "w": w, "h": h})
    (root / "transforms.json").write_text(json.dumps({"camera_model": "OPENCV", "ply_file_path": "sparse_pc.ply",
                                                      "frames": frames}))
    save_ply(str(root / "sparse_pc.ply"), scene["points"], scene["colors"])
    sc.render.resolution_x, sc.render.resolution_y = w, h
    ref = [np.array([tuple(world_to_camera_view(sc, c, Vector(p))) for p in scene["points"]]) for c in (cam, cam2)]
    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(root), format=fmt) == {"FINISHED"}
    assert sc.npbgpp.dataset_format == "nerfstudio"
    imported = sorted((o for o in sc.objects if o.type == "CAMERA" and o not in (cam, cam2)), key=lambda o: o.name)
    assert [o.name for o in imported] == ["images/frame_00000", "images/frame_00001"]
    assert (sc.render.resolution_x, sc.render.resolution_y) == (w, h)
    for c, want in zip(imported, ref, strict=True):
        got = np.array([tuple(world_to_camera_view(sc, c, Vector(p))) for p in scene["points"]])
        np.testing.assert_allclose(got[:, :2] * [w, h], want[:, :2] * [w, h], atol=1e-3)
        np.testing.assert_allclose(got[:, 2], want[:, 2], rtol=1e-5)
    assert len(sc.npbgpp.point_object.data.points) == len(scene["points"])  # sparse_pc.ply


def _two_cloud_capture(scene, name: str = "two_clouds"):
    """(folder, b.ply's points): a one-frame transforms.json capture in the scene camera
    with two clouds and no ply_file_path, a.ply (the scene's points) and b.ply (10 others)."""
    import json

    from PIL import Image

    from npbgpp_core.ply import save_ply

    root = scene["dir"] / name
    (root / "images").mkdir(parents=True)
    Image.fromarray(np.full((24, 32, 3), 90, np.uint8)).save(root / "images" / "f0.png")
    frame = {"file_path": "images/f0.png", "transform_matrix": [list(r) for r in scene["camera"].matrix_world],
             "fl_x": 30.0, "fl_y": 30.0, "cx": 16.0, "cy": 12.0, "w": 32, "h": 24}
    (root / "transforms.json").write_text(json.dumps({"frames": [frame]}))
    save_ply(str(root / "a.ply"), scene["points"], scene["colors"])
    other = (scene["points"][:10] + np.float32(0.25)).astype(np.float32)
    save_ply(str(root / "b.ply"), other, scene["colors"][:10])
    return root, other


def test_import_dataset_point_cloud_setting(scene):
    """Import Dataset's Point Cloud: a transforms.json folder with two clouds and no
    ply_file_path imports without points (the loader names both files); the setting picks
    one (relative to the folder, .ply optional), which becomes Dataset Points for Aggregate;
    a name of no file is refused before anything changes; without it Dataset Points clears."""
    sc = scene["scene"]
    root, other = _two_cloud_capture(scene)

    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(root)) == {"FINISHED"}
    assert sc.npbgpp.point_object is None
    assert "['a.ply', 'b.ply'] are not read unnamed" in sc.npbgpp.dataset_no_cloud
    assert "Import Dataset's Point Cloud" in sc.npbgpp.dataset_no_cloud

    cameras = {o.name for o in sc.objects if o.type == "CAMERA"}
    with pytest.raises(RuntimeError, match=r"Point Cloud 'c.ply' names no file \(.*two_clouds.c.ply not found"):
        bpy.ops.import_scene.npbgpp_dataset(directory=str(root), point_cloud="c.ply")
    assert {o.name for o in sc.objects if o.type == "CAMERA"} == cameras and sc.npbgpp.dataset_points == ""

    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(root), point_cloud="b") == {"FINISHED"}
    obj = sc.npbgpp.point_object
    got = np.empty(len(obj.data.points) * 3, np.float32)
    obj.data.attributes["position"].data.foreach_get("vector", got)
    M = np.array(obj.matrix_world)
    np.testing.assert_allclose(got.reshape(-1, 3) @ M[:3, :3].T + M[:3, 3], other, atol=1e-6)
    assert sc.npbgpp.dataset_no_cloud == ""
    assert os.path.samefile(bpy.path.abspath(sc.npbgpp.dataset_points), root / "b.ply")

    # an upper-case extension (FUSED.PLY, as Windows tools write it) names that file, not "FUSED.PLY.ply"
    (root / "dense").mkdir()
    (root / "dense" / "FUSED.PLY").write_bytes((root / "b.ply").read_bytes())
    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(root), point_cloud="dense/FUSED.PLY") == {"FINISHED"}
    assert len(sc.npbgpp.point_object.data.points) == len(other)
    assert os.path.samefile(bpy.path.abspath(sc.npbgpp.dataset_points), root / "dense" / "FUSED.PLY")

    # a Gaussian-splat file as the cloud: the splats the PLY import keeps with its default Min Opacity
    from plyfile import PlyData, PlyElement

    from npbgpp_core.ply import load_ply

    names = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1", "scale_2", "rot_0",
             "rot_1", "rot_2", "rot_3"]
    splats = np.zeros(len(other), [(k, "f4") for k in names])
    for i, c in enumerate("xyz"):
        splats[c] = other[:, i]
    splats["opacity"] = np.linspace(-6.0, 6.0, len(other))  # opacity 0.0025 .. 0.9975
    PlyData([PlyElement.describe(splats, "vertex")]).write(str(root / "splat.ply"))
    assert bpy.ops.import_scene.npbgpp_ply(filepath=str(root / "splat.ply")) == {"FINISHED"}
    kept = len(sc.npbgpp.point_object.data.points)
    assert 0 < kept < len(other) and kept == len(load_ply(str(root / "splat.ply"), min_opacity=0.1))
    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(root), point_cloud="splat.ply") == {"FINISHED"}
    assert len(sc.npbgpp.point_object.data.points) == kept

    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(root)) == {"FINISHED"}
    assert sc.npbgpp.dataset_points == "" and sc.npbgpp.point_object is None


def test_import_dataset_names_the_other_clouds_of_its_folder(scene, capfd):
    """A COLMAP folder with COLMAP's dense output (dense/0/fused.ply) imports the sparse
    points3D, and its report adds one line naming the dense cloud, its size and the Point
    Cloud setting; importing that cloud with Point Cloud drops it from the line (none is
    left), and a folder without another cloud gets no such line."""
    from test_capture_import import write_capture

    from npbgpp_core.ply import save_ply

    sc = scene["scene"]
    root = scene["dir"] / "colmap_dense"
    pts, cols = write_capture(str(root), n_views=2)
    capfd.readouterr()
    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(root), undistort=True) == {"FINISHED"}
    assert "Also in the folder" not in capfd.readouterr().out

    (root / "dense" / "0").mkdir(parents=True)
    save_ply(str(root / "dense" / "0" / "fused.ply"), pts[:7], cols[:7] / 255.0)
    size = os.path.getsize(root / "dense" / "0" / "fused.ply")
    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(root), undistort=True) == {"FINISHED"}
    out = capfd.readouterr().out
    assert len(sc.npbgpp.point_object.data.points) == len(pts)  # the sparse points3D was imported
    assert f"Info: Imported {len(pts)} points and 2 cameras." in out
    assert f"Info: Also in the folder: dense/0/fused.ply ({size} B); choose it with Point Cloud." in out, out

    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(root), undistort=True,
                                               point_cloud="dense/0/fused.ply") == {"FINISHED"}
    out = capfd.readouterr().out
    assert len(sc.npbgpp.point_object.data.points) == 7 and "Also in the folder" not in out, out


def test_import_dataset_warns_of_a_cloud_that_misses_the_capture(scene, capfd):
    """Point Cloud naming another scene's cloud (here the capture's own grid of points moved
    two grid widths aside) imports with a warning that it misses the COLMAP model's points;
    a denser copy of the capture's own plane imports without one."""
    from test_capture_import import write_capture

    from npbgpp_core.ply import save_ply

    root = scene["dir"] / "colmap_misfit"
    pts, cols = write_capture(str(root), n_views=2)
    rng = np.random.default_rng(1)
    offsets = np.zeros((2000, 3))
    offsets[:, :2] = rng.uniform(-0.1, 0.1, (2000, 2))  # within the plane, a third of the grid's spacing
    dense = pts[rng.integers(0, len(pts), 2000)] + offsets
    save_ply(str(root / "dense.ply"), dense.astype(np.float32))
    save_ply(str(root / "other.ply"), (pts + [6.0, 0.0, 0.0]).astype(np.float32))
    capfd.readouterr()
    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(root), undistort=True,
                                               point_cloud="other.ply") == {"FINISHED"}
    out = capfd.readouterr().out
    assert "Warning: other.ply does not lie where the points of the COLMAP model" in out, out
    assert "Is it this capture's cloud, in this model's frame?" in out
    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(root), undistort=True,
                                               point_cloud="dense.ply") == {"FINISHED"}
    assert "does not lie where" not in capfd.readouterr().out


def test_aggregate_with_dataset_points_cleared_reads_the_dataset_cloud(scene, capfd):
    """Dataset Points cleared by hand after an import with Point Cloud b.ply: Aggregate read
    the format's default cloud (here none: the loader refuses two unnamed clouds), not the
    Dataset Cloud the dataset was imported with; it reads b.ply, and says so. A Dataset
    Cloud that is gone is named before any work."""
    from npbgpp_core.scene import NeuralScene

    sc = scene["scene"]
    root, other = _two_cloud_capture(scene, "cleared_points")
    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(root), point_cloud="b") == {"FINISHED"}
    sc.npbgpp.dataset_points = ""
    sc.npbgpp.weights = ""
    out = scene["dir"] / "cleared.npbgpp"
    capfd.readouterr()
    assert bpy.ops.npbgpp.aggregate(filepath=str(out)) == {"FINISHED"}
    assert "Saved 10 points of Dataset Cloud (b.ply)" in capfd.readouterr().out
    np.testing.assert_allclose(NeuralScene.load(out).points.numpy(), other, atol=1e-6)
    (root / "b.ply").rename(root / "b_moved.ply")
    with pytest.raises(RuntimeError, match=r"Dataset Cloud file .*cleared_points.b\.ply .* is gone"):
        bpy.ops.npbgpp.aggregate(filepath=str(scene["dir"] / "gone.npbgpp"))
    assert not (scene["dir"] / "gone.npbgpp").exists()


def test_data_panel_shows_the_dataset_cloud_read_only(scene):
    """Render Properties > NPBG++ > Data shows Dataset Cloud (the Point Cloud the dataset was
    imported with, which Aggregate reads with Dataset Points cleared and Densify refuses to
    replace) next to Dataset Points, greyed out and not editable: a new import sets it. It
    stays shown after Densify or the user changed Dataset Points, and a dataset imported
    without Point Cloud has none to show."""
    sc = scene["scene"]
    root, _ = _two_cloud_capture(scene, "panel_cloud")
    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(root), point_cloud="b") == {"FINISHED"}
    layout = _drawn()
    assert layout.props.index("dataset_cloud") == layout.props.index("dataset_points") + 1
    assert layout.states["dataset_cloud"] == (True, False) and layout.states["dataset_points"] == (True, True)
    assert layout.states["up_axis"] == (True, True)  # only its own row is read-only
    assert os.path.samefile(bpy.path.abspath(sc.npbgpp.dataset_cloud), root / "b.ply")
    sc.npbgpp.dataset_points = ""  # Aggregate now reads the Dataset Cloud: the panel must still say which
    assert "dataset_cloud" in _drawn().props
    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(root), point_cloud="a") == {"FINISHED"}
    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(scene["dir"] / "panel_cloud"),
                                               point_cloud="") == {"FINISHED"}
    assert sc.npbgpp.dataset_cloud == "" and "dataset_cloud" not in _drawn().props


def test_import_dataset_forgets_the_last_datasets_settings(scene):
    """Import Dataset run as the UI runs it (undo on: Blender stores the operator's last
    settings and starts the next run from them): the settings of one dataset (Point Cloud,
    Format, Undistort, Allow External Paths) are not carried to the next import, which
    otherwise read the last dataset's cloud name in another folder; the folder and Max
    Points are remembered. Not checked here: the file browser's own use of the remembered
    folder (no window in background mode)."""
    sc = scene["scene"]
    root, _ = _two_cloud_capture(scene)
    rna = bpy.ops.import_scene.npbgpp_dataset.get_rna_type()
    forgotten = {"format", "undistort", "allow_external_paths", "point_cloud"}
    assert {p.identifier for p in rna.properties if p.is_skip_save} & set(forgotten | {"directory", "max_points"}) \
        == forgotten

    def ui_import(**settings) -> set[str]:
        return bpy.ops.import_scene.npbgpp_dataset("EXEC_DEFAULT", True, **settings)

    assert ui_import(directory=str(root), point_cloud="b", format="NERFSTUDIO", undistort=True,
                     allow_external_paths=True, max_points=7) == {"FINISHED"}
    assert len(sc.npbgpp.point_object.data.points) == 7
    assert sc.npbgpp.dataset_undistort and sc.npbgpp.dataset_allow_external_paths
    last = bpy.context.window_manager.operator_properties_last("import_scene.npbgpp_dataset")
    assert last.point_cloud == "b" and last.max_points == 7  # stored: the next run starts from them

    # the next import, of the same folder here: neither b.ply nor the other dataset settings come back
    assert ui_import() == {"FINISHED"}
    assert sc.npbgpp.point_object is None and sc.npbgpp.dataset_points == ""
    assert "['a.ply', 'b.ply'] are not read unnamed" in sc.npbgpp.dataset_no_cloud
    assert not sc.npbgpp.dataset_undistort and not sc.npbgpp.dataset_allow_external_paths
    assert ui_import(point_cloud="a") == {"FINISHED"}  # the folder and Max Points are the last run's
    assert len(sc.npbgpp.point_object.data.points) == 7
    assert os.path.samefile(bpy.path.abspath(sc.npbgpp.dataset_points), root / "a.ply")


def test_import_dataset_undistort_cameras_have_the_undistorted_focal_length(scene):
    """Import Dataset's Undistort on a SIMPLE_RADIAL capture: the Blender camera frames the
    undistorted photo, whose focal length is the photo's scaled so no pixel is blank
    (hand-computed in test_capture_import), not the photo's own."""
    from test_capture_import import F, H, W, _focal_scale, write_capture

    sc = scene["scene"]
    root = scene["dir"] / "radial"
    pts, _ = write_capture(str(root), n_views=1)
    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(root), undistort=True) == {"FINISHED"}
    assert sc.npbgpp.dataset_undistort
    (cam,) = [o for o in sc.objects if o.type == "CAMERA" and o is not scene["camera"]]
    assert (sc.render.resolution_x, sc.render.resolution_y) == (W, H)
    f = F * _focal_scale(W / 2 - 0.5, H / 2 - 0.5, F)
    world = sc.npbgpp.point_object.matrix_world
    for p in pts[::17]:  # camera 0 sits at the origin looking along +Z (COLMAP frame)
        ndc = world_to_camera_view(sc, cam, world @ Vector(p))
        u, v = ndc.x * W - 0.5, (1.0 - ndc.y) * H - 0.5
        assert abs(u - (f * p[0] / p[2] + W / 2 - 0.5)) < 1e-2 and abs(v - (f * p[1] / p[2] + H / 2 - 0.5)) < 1e-2


@pytest.mark.parametrize("scale", [0.01, 10000.0])
def test_import_dataset_cameras_clip_around_the_cloud(scene, scale):
    """A dataset at another scale than Blender's default clip range (0.1 .. 1000: the whole
    cloud is nearer / farther than it here) imports cameras whose Clip Start / End hold the
    cloud: F12 through an imported camera shows every point Blender's world_to_camera_view
    puts in its image, colour and depth, where the default range showed nothing."""
    sc, cam = scene["scene"], scene["camera"]
    pts = scene["points"] * np.float32(scale)
    cam.location = tuple(np.array(cam.location) * scale)
    root = scene["dir"] / "scaled"
    _write_nerf_dataset(root, [cam], pts, scene["colors"])
    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(root)) == {"FINISHED"}
    imported = sc.camera
    assert imported is not None and imported is not cam
    sc.render.resolution_percentage = 200  # 64x48: enough pixels for isolated points
    bpy.context.view_layer.update()
    _, _, z = expected_pixels(sc, imported, pts)
    front = z[z > 0]
    assert (front < 0.1).all() if scale < 1 else (front > 1000.0).all()  # Blender's defaults cut them all
    assert imported.data.clip_start < front.min() and imported.data.clip_end > front.max()
    exr = render_exr(sc, str(scene["dir"] / "scaled.exr"))
    pts_pass = passes(exr, "NPBG Points")
    n = check_points_image(pts_pass[..., :3], pts_pass[..., 3], exr["ViewLayer.Depth.Z"], sc, imported, pts,
                           scene["colors"])
    assert n >= 5


def _view_depths(space, pts: np.ndarray) -> np.ndarray:
    """Depth of each point in front of a 3D view's eye, from the view's own location,
    rotation and distance (its view_matrix waits for a redraw)."""
    from mathutils import Matrix

    r = space.region_3d
    eye_to_world = (Matrix.Translation(r.view_location) @ r.view_rotation.to_matrix().to_4x4()
                    @ Matrix.Translation((0.0, 0.0, r.view_distance)))
    V = np.array(eye_to_world.inverted())
    return -(pts.astype(np.float64) @ V[2, :3] + V[2, 3])


@pytest.mark.parametrize("how, scale", [("dataset", 10000.0), ("ply", 0.001)])
def test_import_widens_the_3d_views_clip_range(scene, capfd, how, scale):
    """Importing points the open 3D views' clip range (Blender's 0.01 .. 1000) would cut
    widens it, with an info line: every point lies inside it from where the view is and
    after Frame Selected frames the imported (selected) cloud, Blender's own operator; an
    import the range already holds leaves it and says nothing."""
    from npbgpp_core.ply import save_ply

    spaces = [(w, a, s) for w in bpy.context.window_manager.windows for a in w.screen.areas
              for s in a.spaces if s.type == "VIEW_3D"]
    assert spaces
    for _, _, space in spaces:
        space.clip_start, space.clip_end = 0.01, 1000.0
    pts = scene["points"] * np.float32(scale)
    capfd.readouterr()
    assert bpy.ops.import_scene.npbgpp_ply(filepath=str(scene["dir"] / "points.ply")) == {"FINISHED"}
    assert "Widened" not in capfd.readouterr().out  # the unit cloud: nothing to do
    assert all((s.clip_start, s.clip_end) == pytest.approx((0.01, 1000.0)) for _, _, s in spaces)
    if how == "dataset":
        scene["camera"].location = tuple(np.array(scene["camera"].location) * scale)
        _write_nerf_dataset(scene["dir"] / "big", [scene["camera"]], pts, scene["colors"])
        assert bpy.ops.import_scene.npbgpp_dataset(directory=str(scene["dir"] / "big")) == {"FINISHED"}
    else:
        save_ply(str(scene["dir"] / "tiny.ply"), pts, scene["colors"])
        assert bpy.ops.import_scene.npbgpp_ply(filepath=str(scene["dir"] / "tiny.ply")) == {"FINISHED"}
    out = capfd.readouterr().out
    assert f"Widened the Clip Start / End of {len(spaces)} 3D view(s)" in out
    for window, area, space in spaces:
        start, end = space.clip_start, space.clip_end
        assert (start, end) != pytest.approx((0.01, 1000.0))
        depth = _view_depths(space, pts)
        assert (depth < end).all()
        region = next(r for r in area.regions if r.type == "WINDOW")
        with bpy.context.temp_override(window=window, area=area, region=region):
            assert bpy.ops.view3d.view_selected() == {"FINISHED"}
        if how == "ply":  # framing keeps a point cloud's point radius in view: zoom in to fill the view
            space.region_3d.view_distance = 3.0 * np.linalg.norm(pts - (pts.min(0) + pts.max(0)) / 2, axis=1).max()
        depth = _view_depths(space, pts)
        assert (depth > start).all() and (depth < end).all()  # the whole cloud inside
        assert not ((depth > 0.01) & (depth < 1000.0)).all()  # where Blender's default range cut it
    from importlib import import_module
    from types import SimpleNamespace

    no_window = SimpleNamespace(window_manager=SimpleNamespace(windows=[]))  # blender --background
    assert import_module(f"{MODULE}.importers").widen_view_clips(None, no_window, pts) == 0


def _mixed_dataset(scene: dict) -> Any:
    """A NeRF-style dataset folder of four views, written for ``scene`` (its points): a portrait
    photo (train/r_0, 24x32) first among three landscape ones (32x24), of which train/r_2 has
    fy/fx 1.08 and train/r_3 fy/fx 1.005 (0.06 px at its edges: not a framing anyone sees)."""
    import json

    from PIL import Image

    from npbgpp_core.ply import save_ply

    root = scene["dir"] / "mixed"
    (root / "train").mkdir(parents=True)
    frames = []
    # the portrait photo first: the resolution is the most common size (a phone capture's first
    # photo may be of the minority; mouse: 17 portrait, 39 landscape), not the first view's
    # r_3's fy/fx moves its top and bottom edges by 0.06 px: not a framing anyone sees (COLMAP
    # fits fx, fy apart; phone captures differ by 0.1-0.2%), so not counted
    for i, (w, h, fy_scale) in enumerate(((24, 32, 1.0), (32, 24, 1.0), (32, 24, 1.08), (32, 24, 1.005))):
        Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(root / "train" / f"r_{i}.png")
        c2w = np.eye(4)
        c2w[:3, 3] = (0.2 * i, -4.0, 0.5)
        c2w[:3, :3] = [[1, 0, 0], [0, 0, 1], [0, -1, 0]]  # looking along +y, z up
        frames.append({"file_path": f"./train/r_{i}", "transform_matrix": c2w.tolist(), "fl_x": 30.0,
                       "fl_y": 30.0 * fy_scale, "cx": w / 2, "cy": h / 2, "w": w, "h": h})
    (root / "transforms_train.json").write_text(json.dumps({"frames": frames}))
    save_ply(str(root / "points3d.ply"), scene["points"], scene["colors"])
    return root


def test_import_dataset_warns_of_views_blender_cannot_frame(scene, capfd):
    """Blender has one render resolution and square pixels: cameras of photos of another
    size (portrait among landscape, as in a phone capture) or with fy != fx rendered another
    framing than their photo without a word. F12 through a camera whose photo has another
    shape than the render says so (the camera's npbgpp_image_size)."""
    root = _mixed_dataset(scene)
    capfd.readouterr()
    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(root)) == {"FINISHED"}
    warnings = [line for line in capfd.readouterr().out.splitlines() if line.startswith("Warning: ")]
    assert len(warnings) == 1 and "2 of 4 cameras do not render their photo's framing" in warnings[0], warnings
    assert "(now 32x24, the most common photo size)" in warnings[0]
    # each cause counted on its own, as the resolution cures only the first
    assert "1 has a photo of another size (e.g. train/r_0 is 24x32;" in warnings[0], warnings[0]
    assert "1 has pixels that are not square (train/r_2: fy/fx 1.080)" in warnings[0], warnings[0]
    sc = bpy.context.scene
    assert (sc.render.resolution_x, sc.render.resolution_y) == (32, 24)
    assert tuple(sc.camera["npbgpp_image_size"]) == (32, 24)  # F12 right away frames its photo
    sizes = sorted(tuple(o["npbgpp_image_size"]) for o in bpy.data.objects if "npbgpp_image_size" in o)
    assert sizes == [(24, 32), (32, 24), (32, 24), (32, 24)]
    # F12 through the portrait camera at the landscape resolution says so, and what to set.
    portrait = next(o for o in bpy.data.objects if tuple(o.get("npbgpp_image_size", ())) == (24, 32))
    landscape = next(o for o in bpy.data.objects if tuple(o.get("npbgpp_image_size", ())) == (32, 24))
    sc.camera = portrait
    capfd.readouterr()
    render_exr(sc, str(scene["dir"] / "portrait.exr"))
    out = capfd.readouterr().out
    assert (f"Warning: NPBG++: the camera '{portrait.name}' was imported for a 24x32 photo, but the render is 32x24: "
            "it does not show the photo's framing (set Output Properties > Format > Resolution to 24x32") in out, out
    assert "Use Camera's Photo Size sets it)" in out and "once the camera is the scene camera" not in out, out
    # an animation says it once, not on every frame; the next render job says it again
    sc.frame_start, sc.frame_end = 1, 3
    sc.render.filepath = str(scene["dir"] / "portrait_anim_")
    bpy.ops.render.render(animation=True)
    out = capfd.readouterr().out
    assert all((scene["dir"] / f"portrait_anim_{f:04d}.exr").is_file() for f in (1, 2, 3))
    assert out.count("Warning: NPBG++: the camera") == 1, out
    bpy.ops.render.render()
    assert capfd.readouterr().out.count("Warning: NPBG++: the camera") == 1
    for cam, (rx, ry, pct) in ((portrait, (24, 32, 100)), (portrait, (48, 64, 50)), (landscape, (32, 24, 100)),
                               (scene["camera"], (24, 32, 100))):  # photo's shape, or a camera not imported
        sc.camera = cam
        sc.render.resolution_x, sc.render.resolution_y, sc.render.resolution_percentage = rx, ry, pct
        render_exr(sc, str(scene["dir"] / "framed.exr"))
        assert "framing" not in capfd.readouterr().out, (cam.name, rx, ry)
    engine = sys.modules[f"{MODULE}.engine"]  # (Blender 5.0 writes no multi-part EXR with non-square pixels)
    sc.render.resolution_x, sc.render.resolution_y, sc.render.pixel_aspect_x = 16, 32, 1.5  # shows 24x32
    assert not engine.framing_note(portrait, sc) and engine.framing_note(landscape, sc)
    sc.render.pixel_aspect_x, sc.render.pixel_aspect_y = 1.0, 1.5
    sc.render.resolution_x, sc.render.resolution_y = 32, 16  # shows 32x24
    assert engine.framing_note(portrait, sc) and not engine.framing_note(landscape, sc)
    # r_2's fy/fx 1.08: at its photo's size with square pixels F12 names the Pixel Aspect that
    # frames it, and at that aspect Blender's own projection is the dataset camera's (a
    # contradictory "the render is 32x24 ... set 32x24" came before); r_3's 0.06 px is not noted
    from npbgpp_core.datasets import load_scene

    stretched = bpy.data.objects["train/r_2"]
    assert "npbgpp_fy_over_fx" not in bpy.data.objects["train/r_3"]
    sc.render.resolution_x, sc.render.resolution_y, sc.render.resolution_percentage = 32, 24, 100
    sc.render.pixel_aspect_x = sc.render.pixel_aspect_y = 1.0
    assert not engine.framing_note(bpy.data.objects["train/r_3"], sc)
    note = engine.framing_note(stretched, sc)
    assert "fy/fx 1.0800" in note and "set Output Properties > Format > Resolution to 32x24 and Pixel Aspect X to " \
        "1.0800, Y to 1.0000" in note, note
    sc.render.pixel_aspect_x = 1.08
    assert not engine.framing_note(stretched, sc)
    data = load_scene(str(root))
    index = next(i for i, v in enumerate(data.views) if v.name == "train/r_2")
    ahead = np.random.default_rng(3).uniform([-0.6, -9.0, -0.4], [1.4, -7.0, 1.4], (80, 3))  # r_2 looks along -y
    uv, depth = data.camera(index).project(ahead)
    seen = (depth.numpy() > 0) & (uv.numpy() >= 0).all(1) & (uv.numpy() < [32, 24]).all(1)
    assert seen.sum() > 20
    got = np.array([tuple(world_to_camera_view(sc, stretched, Vector(p))) for p in ahead[seen]])
    # Blender's 0..1 spans pixel edges, OpenCV's pixel centres are integers: half a pixel apart
    np.testing.assert_allclose(got[:, 0] * 32 - 0.5, uv.numpy()[seen, 0], atol=1e-3)
    np.testing.assert_allclose((1.0 - got[:, 1]) * 24 - 0.5, uv.numpy()[seen, 1], atol=1e-3)


def test_use_camera_photo_size_frames_the_scene_camera_photo(scene, capfd):
    """Output Properties > Format > NPBG++ > Use Camera's Photo Size sets the render to the scene
    camera's photo (Resolution, and the Pixel Aspect of a camera made for fy != fx), keeping
    Resolution %: F12's framing note, the independent check, then has nothing to say; Ctrl+Z
    gives the former size back; Photo Size's Follow Render follows the new size. The import's
    warning and F12's note name the button where it is; it is greyed out, with why, for a
    camera Import Dataset did not make, or no camera."""
    engine = sys.modules[f"{MODULE}.engine"]
    bridge = sys.modules[f"{MODULE}.camera_bridge"]
    ops = sys.modules[f"{MODULE}.operators"]
    button = bridge.USE_PHOTO_SIZE_BUTTON
    panel, op = bpy.types.RENDER_PT_npbgpp_format, bpy.types.NPBGPP_OT_use_camera_photo_size
    assert (panel.bl_context, panel.bl_parent_id) == ("output", "RENDER_PT_format")  # Output Properties' tab
    assert button == f"Output Properties > {bpy.types.RENDER_PT_format.bl_label} > {panel.bl_label} > {op.bl_label}"
    assert _drawn("RENDER_PT_npbgpp_format").operators == ["npbgpp.use_camera_photo_size"]
    capfd.readouterr()
    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(_mixed_dataset(scene))) == {"FINISHED"}
    warning = next(line for line in capfd.readouterr().out.splitlines() if line.startswith("Warning: "))
    assert (f"(e.g. train/r_0 is 24x32; to render one, make it the scene camera and click {button})"
            in warning), warning
    # the stretched camera's cure is the same button: its path is said once (the warning is long already)
    assert warning.count(button) == 1 and "names its own, and the same button sets it)" in warning, warning
    sc = bpy.context.scene
    assert panel.poll(bpy.context)  # NPBG++ is the engine
    portrait = bpy.data.objects["train/r_0"]
    sc.camera = portrait
    sc.render.resolution_percentage = 50
    assert (sc.render.resolution_x, sc.render.resolution_y) == (32, 24)
    assert engine.framing_note(portrait, sc).endswith(f"or any size of that shape; {button} sets it)")
    # F12 over a 3D View with a Local Camera renders through that one (camera_override; bpy without a window
    # has no 3D View to show it): the button reads the scene camera, so the note says to make it that first
    sc.camera = bpy.data.objects["train/r_1"]
    assert engine.framing_note(portrait, sc).endswith(f"; {button} sets it once the camera is the scene camera)")
    sc.camera = portrait
    assert bpy.ops.ed.undo_push(message="before") == {"FINISHED"}
    assert bpy.ops.npbgpp.use_camera_photo_size.poll()
    assert bpy.ops.npbgpp.use_camera_photo_size() == {"FINISHED"}
    r = sc.render
    assert (r.resolution_x, r.resolution_y, r.resolution_percentage, r.pixel_aspect_x, r.pixel_aspect_y) == \
        (24, 32, 50, 1.0, 1.0)
    assert engine.framing_note(portrait, sc) == "" and engine.framing_note(bpy.data.objects["train/r_1"], sc)
    # Blender pushes the undo step of an UNDO operator in a window; bpy without one has no undo stack of
    # its own, so the test pushes it as Blender would
    assert bpy.ops.npbgpp.use_camera_photo_size.bl_options == {"REGISTER", "UNDO"}
    assert bpy.ops.ed.undo_push(message=op.bl_label) == {"FINISHED"}
    assert bpy.ops.ed.undo() == {"FINISHED"}
    sc = bpy.context.scene  # undo gives Blender new data: the old references are gone
    portrait, r = bpy.data.objects["train/r_0"], sc.render
    assert (r.resolution_x, r.resolution_y, r.resolution_percentage) == (32, 24, 50)
    assert sc.camera == portrait and engine.framing_note(portrait, sc)

    # fy/fx 1.08: the note's Pixel Aspect too, from the same arithmetic
    sc.camera = stretched = bpy.data.objects["train/r_2"]
    note = engine.framing_note(stretched, sc)
    assert note.endswith(f"Pixel Aspect X to 1.0800, Y to 1.0000; {button} sets both)"), note
    assert bpy.ops.npbgpp.use_camera_photo_size() == {"FINISHED"}
    r = sc.render
    assert (r.resolution_x, r.resolution_y, r.resolution_percentage, r.pixel_aspect_y) == (32, 24, 50, 1.0)
    assert r.pixel_aspect_x == pytest.approx(1.08) and engine.framing_note(stretched, sc) == ""
    # fy < fx (a photo made for fy/fx 1 / 1.08): Blender's Pixel Aspect is at least 1, so Y takes 1.08
    stretched["npbgpp_fy_over_fx"] = 1 / 1.08
    assert engine.framing_note(stretched, sc).endswith(f"Pixel Aspect X to 1.0000, Y to 1.0800; {button} sets both)")
    assert bpy.ops.npbgpp.use_camera_photo_size() == {"FINISHED"}
    assert (r.resolution_x, r.resolution_y, r.pixel_aspect_x) == (32, 24, 1.0)
    assert r.pixel_aspect_y == pytest.approx(1.08) and engine.framing_note(stretched, sc) == ""
    # and back to a square-pixel camera: the pixel aspect goes back to square too
    sc.camera = portrait
    assert bpy.ops.npbgpp.use_camera_photo_size() == {"FINISHED"}
    assert (r.resolution_x, r.resolution_y, r.pixel_aspect_x, r.pixel_aspect_y) == (24, 32, 1.0, 1.0)

    # Follow Render reads the new render size: a 12-MP portrait photo's camera (its property as the import writes it)
    sc.render.resolution_percentage = 100
    big = bpy.data.objects.new("big", portrait.data)
    sc.collection.objects.link(big)
    big["npbgpp_image_size"] = [3024, 4032]
    sc.camera = big
    assert ops.photo_size_text(sc) == "Reads photos at up to 2048 px long side"
    assert bpy.ops.npbgpp.use_camera_photo_size() == {"FINISHED"}
    assert (r.resolution_x, r.resolution_y) == (3024, 4032)
    assert "Reads photos at up to 4032 px long side" in _drawn().labels

    # greyed out, and why, without a photo, or for an object that is not a camera (Blender lets any be the
    # scene camera; F12 refuses it) though it carries a dataset camera's properties (copying custom properties)
    empty = bpy.data.objects.new("Empty", None)
    sc.collection.objects.link(empty)
    empty["npbgpp_image_size"], empty["npbgpp_fy_over_fx"] = [24, 32], 1.08
    assert engine.framing_note(empty, sc) == ""
    no_photo = "The scene camera 'Cam' has no photo: only cameras Import Dataset Folder made know theirs"
    for camera, why in ((bpy.data.objects["Cam"], no_photo + " (npbgpp_image_size)"),
                        (empty, "The scene camera 'Empty' is not a camera object (its type is EMPTY)"),
                        (None, "The scene has no camera")):
        sc.camera = camera
        assert not bpy.ops.npbgpp.use_camera_photo_size.poll()
        with pytest.raises(RuntimeError, match=re.escape(why)):
            bpy.ops.npbgpp.use_camera_photo_size()
    assert (r.resolution_x, r.resolution_y) == (3024, 4032)


def test_use_camera_photo_size_on_a_linked_scene_says_it_lasts_until_reload(scene, capfd):
    """Use Camera's Photo Size on a scene linked from another .blend: Blender lets the Resolution be set
    here, but saves a linked scene in its library, so the button sets it and warns, naming the library
    (as Aggregate's Bundle does, warn_linked_scene)."""
    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(_mixed_dataset(scene))) == {"FINISHED"}
    scene["scene"].camera = bpy.data.objects["train/r_0"]  # the portrait photo among landscape ones
    name, lib, linked = _linked_scene(scene["scene"], scene["dir"] / "lib_photo_size.blend")
    assert (linked.render.resolution_x, linked.render.resolution_y) == (32, 24)
    capfd.readouterr()
    with bpy.context.temp_override(scene=linked, view_layer=linked.view_layers[0]):
        assert bpy.ops.npbgpp.use_camera_photo_size() == {"FINISHED"}
    said = capfd.readouterr().out
    assert (linked.render.resolution_x, linked.render.resolution_y) == (24, 32)
    assert (f"Warning: The scene '{name}' is linked from {lib}: its Resolution changed here only until this file "
            "is reloaded") in said, said


def test_import_dataset_framing_warning_counts_each_cause(addon):
    """Hand-made views: the resolution is the most common photo size (ties: the earliest);
    photos of another size and fy != fx are counted apart, the fy/fx range given, and a fy/fx
    that moves the photo's top and bottom edges by under half a pixel is not counted."""
    from types import SimpleNamespace

    importers = sys.modules[f"{MODULE}.importers"]

    def view(name: str, h: int, w: int, fy_over_fx: float) -> SimpleNamespace:
        K = [[100.0, 0.0, w / 2], [0.0, 100.0 * fy_over_fx, h / 2], [0.0, 0.0, 1.0]]
        return SimpleNamespace(name=name, camera=SimpleNamespace(K=K, image_size=(h, w)))

    views = [view("A", 32, 24, 1.0), view("B", 24, 32, 1.05), view("C", 24, 32, 0.94), view("D", 24, 32, 1.03)]
    assert importers.render_photo_size(views) == (24, 32)
    assert importers.render_photo_size(views[:2]) == (32, 24)  # a tie: the earliest view's
    text = importers.framing_warning(views, (24, 32))
    assert text.startswith("3 of 4 cameras do not render their photo's framing"), text
    assert "(now 32x24, the most common photo size)" in text
    assert "1 has a photo of another size (e.g. A is 24x32;" in text
    # B, C move the edges by 0.6 and 0.72 px; D by 0.36 px
    assert "2 have pixels that are not square (fy/fx 0.940 to 1.050, e.g. C: 0.940)" in text, text
    # B and E share one fy/fx: the import sets the Pixel Aspect that frames both, and nothing is counted
    text = importers.framing_warning([view("B", 24, 32, 1.05), view("E", 24, 32, 1.05)], (24, 32))
    assert text == "", text
    assert importers.shared_fy_over_fx([view("B", 24, 32, 1.05), view("E", 24, 32, 1.05)]) == pytest.approx(1.05)
    text = importers.framing_warning([view("B", 24, 32, 1.05), view("E", 24, 32, 1.05), view("A", 32, 24, 1.05)],
                                     (24, 32))
    assert text.startswith("1 of 3 cameras") and "pixel aspect (now X 1.0500, Y 1.0000, the photos' fy/fx" in text
    # fy/fx 1.05 and 0.94: no one aspect frames both; the warning names an example's aspect
    assert importers.shared_fy_over_fx(views) == 1.0
    text = importers.framing_warning(views, (24, 32))
    assert "no one Pixel Aspect frames every view (X / Y = fy/fx frames one: C takes X 1.0000, Y 1.0638" in text
    # without a photo of another size, the stretched cameras' cure names the button's whole path
    text = importers.framing_warning(views[1:3], (24, 32))
    button = sys.modules[f"{MODULE}.camera_bridge"].USE_PHOTO_SIZE_BUTTON
    assert "of another size" not in text and f"names its own, and {button} sets it)" in text, text
    assert importers.framing_warning([view("D", 24, 32, 1.03)], (24, 32)) == ""
    # B and E imported with Set Pixel Aspect off (square pixels): both counted, the aspect that frames them named
    text = importers.framing_warning([view("B", 24, 32, 1.05), view("E", 24, 32, 1.05)], (24, 32), 1.0)
    assert text.startswith("2 of 2 cameras") and "pixel aspect (now square)" in text, text
    assert "Pixel Aspect X 1.0500, Y 1.0000 frames every view (Import Dataset's Set Pixel Aspect sets it" in text


def _shared_aspect_dataset(scene) -> os.PathLike:
    """A NeRF folder of 3 photos 32x24 whose pixels all have fy/fx 0.95 or 0.951 (0.6 px at 24
    rows at square pixels; 0.006 px apart), an off-centre principal point, the scene's cloud."""
    import json

    from PIL import Image

    from npbgpp_core.ply import save_ply

    root = scene["dir"] / "shared_aspect"
    (root / "train").mkdir(parents=True)
    frames = []
    for i, fy_scale in enumerate((0.95, 0.951, 0.95)):
        Image.fromarray(np.full((24, 32, 3), 90, np.uint8)).save(root / "train" / f"r_{i}.png")
        c2w = np.eye(4)
        c2w[:3, 3] = (0.2 * i, -4.0, 0.5)
        c2w[:3, :3] = [[1, 0, 0], [0, 0, 1], [0, -1, 0]]  # looking along +y, z up
        frames.append({"file_path": f"./train/r_{i}", "transform_matrix": c2w.tolist(), "fl_x": 30.0,
                       "fl_y": 30.0 * fy_scale, "cx": 14.0, "cy": 15.5, "w": 32, "h": 24})
    (root / "transforms_train.json").write_text(json.dumps({"frames": frames}))
    save_ply(str(root / "points3d.ply"), scene["points"], scene["colors"])
    return root


def test_import_dataset_pixel_aspect_and_multilayer_exr(scene, capfd):
    """Blender 5.0 writes no multilayer OpenEXR of several passes at a non-square Pixel Aspect
    (with any engine: measured with Cycles, EEVEE and Workbench too), so an import that sets
    one says so, as a warning when the scene's output already is multilayer; that render
    indeed fails here, leaving an empty file. With Set Pixel Aspect off the pixels stay
    square, the framing warning names the aspect that would frame every view, each camera
    keeps its photo's fy/fx for F12's note, and the multilayer file is written."""
    root = _shared_aspect_dataset(scene)
    sc = bpy.context.scene
    assert sc.render.image_settings.media_type == "MULTI_LAYER_IMAGE"  # the fixture's output
    capfd.readouterr()
    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(root)) == {"FINISHED"}
    out = capfd.readouterr().out
    assert "Warning: Set Pixel Aspect to X 1.0000, Y 1.0521" in out, out
    assert "Blender 5.0 writes no multilayer OpenEXR of more than one pass" in out, out
    assert "Set Pixel Aspect off" in out
    sc.camera = bpy.data.objects["train/r_0"]
    path = scene["dir"] / "aspect.exr"
    sc.render.filepath = str(path)
    with pytest.raises(RuntimeError, match="cannot save"):
        bpy.ops.render.render(write_still=True)
    said = "".join(capfd.readouterr())
    assert "Conflicting attributes" in said and "pixelAspectRatio" in said, said
    # the engine said why before Blender's own error ("Error writing render result, Success")
    assert "Warning: NPBG++: this render cannot be saved as the output's multilayer OpenEXR: Blender 5.0" in said

    for obj in [o for o in bpy.data.objects if o.type == "CAMERA" and o.name.startswith("train/")]:
        bpy.data.objects.remove(obj)
    capfd.readouterr()
    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(root), set_pixel_aspect=False) == {"FINISHED"}
    out = capfd.readouterr().out
    assert "Set Pixel Aspect to" not in out, out
    assert (sc.render.pixel_aspect_x, sc.render.pixel_aspect_y) == (1.0, 1.0)
    assert "3 of 3 cameras do not render their photo's framing" in out, out
    assert "Pixel Aspect X 1.0000, Y 1.0521 frames every view (Import Dataset's Set Pixel Aspect sets it" in out
    engine = sys.modules[f"{MODULE}.engine"]
    cam = bpy.data.objects["train/r_0"]
    np.testing.assert_allclose(cam["npbgpp_fy_over_fx"], 0.95, rtol=1e-6)  # its own, named by F12's note
    assert "Pixel Aspect X to 1.0000, Y to 1.0526" in engine.framing_note(cam, sc)
    sc.camera = cam
    square = scene["dir"] / "square.exr"
    sc.render.filepath = str(square)
    bpy.ops.render.render(write_still=True)
    assert "multilayer" not in "".join(capfd.readouterr())
    exr = read_exr(str(square))
    assert "ViewLayer.NPBG Points.A" in exr and "ViewLayer.Combined.A" in exr, sorted(exr)


def test_import_dataset_sets_the_pixel_aspect_every_view_shares(scene, capfd):
    """Photos whose pixels all have one fy/fx (to half a pixel; desk's 29 views: 0.99235) are
    framed by one Pixel Aspect: the import sets it and says so, warns of nothing, and each
    camera (its lens shift made for that aspect) projects points where the dataset's own
    camera does, by Blender's world_to_camera_view; F12 through one notes nothing."""
    from npbgpp_core.datasets import load_scene

    root = _shared_aspect_dataset(scene)
    sc = bpy.context.scene
    sc.render.pixel_aspect_x = 2.0  # an earlier scene's: the import sets the one its cameras need
    sc.render.image_settings.media_type = "IMAGE"  # not multilayer: the report is an Info
    sc.render.image_settings.file_format = "PNG"
    capfd.readouterr()
    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(root)) == {"FINISHED"}
    out = capfd.readouterr().out
    assert "Warning: " not in out, out
    assert "Info: Set Pixel Aspect to X 1.0000, Y 1.0521 (Output Properties > Format)" in out, out
    assert sc.render.pixel_aspect_x == 1.0
    np.testing.assert_allclose(sc.render.pixel_aspect_y, 1 / 0.9505, rtol=1e-6)
    data = load_scene(str(root))
    ahead = np.random.default_rng(3).uniform([-1.5, -9.0, -1.0], [2.0, -7.0, 2.0], (200, 3))  # they look along -y
    engine = sys.modules[f"{MODULE}.engine"]
    for index, view in enumerate(data.views):
        cam = bpy.data.objects[view.name]
        uv, depth = data.camera(index).project(ahead)
        seen = (depth.numpy() > 0) & (uv.numpy() >= 0).all(1) & (uv.numpy() < [32, 24]).all(1)
        assert seen.sum() > 50
        got = np.array([tuple(world_to_camera_view(sc, cam, Vector(p))) for p in ahead[seen]])
        # the views' own fy/fx differ from the aspect's by up to 0.0005: 0.006 px at the image's edge
        np.testing.assert_allclose(got[:, 0] * 32 - 0.5, uv.numpy()[seen, 0], atol=1e-3)
        np.testing.assert_allclose((1.0 - got[:, 1]) * 24 - 0.5, uv.numpy()[seen, 1], atol=1e-2)
        assert not engine.framing_note(cam, sc)
    # Blender's projection matrix of a camera at that aspect: its y scale over its x scale is fy/fx
    depsgraph = bpy.context.evaluated_depsgraph_get()
    P = np.array(bpy.data.objects["train/r_0"].calc_matrix_camera(
        depsgraph, x=32, y=24, scale_x=sc.render.pixel_aspect_x, scale_y=sc.render.pixel_aspect_y))
    np.testing.assert_allclose((P[1, 1] * 24) / (P[0, 0] * 32), 0.9505, rtol=1e-6)
    sc.camera = bpy.data.objects["train/r_1"]
    sc.render.filepath = str(scene["dir"] / "shared.png")
    capfd.readouterr()
    bpy.ops.render.render(write_still=True)
    assert "framing" not in capfd.readouterr().out
    # back to square pixels, F12 says which aspect frames the camera
    sc.render.pixel_aspect_y = 1.0
    assert "Pixel Aspect X to 1.0000, Y to 1.0521" in engine.framing_note(bpy.data.objects["train/r_1"], sc)


def test_import_dataset_allow_external_paths(scene):
    """A NeRF dataset whose file_path leaves its folder is refused by default, the message
    naming the option and where it is; with the Import Dataset dialog's Allow External
    Paths it imports, its camera points at the outside image, and Aggregate reads the
    dataset the same way."""
    import json

    sc, cam = scene["scene"], scene["camera"]
    root = scene["dir"] / "nerf_ext"
    _write_nerf_dataset(root, [cam], scene["points"], scene["colors"])
    shared = scene["dir"] / "shared_images"
    os.rename(root / "train", shared)
    meta = json.loads((root / "transforms_train.json").read_text())
    meta["frames"][0]["file_path"] = "../shared_images/r_0"
    (root / "transforms_train.json").write_text(json.dumps(meta))
    prop = bpy.ops.import_scene.npbgpp_dataset.get_rna_type().properties["allow_external_paths"]
    assert prop.default is False and not prop.is_hidden  # shown in the dialog's options, off
    assert "any file on this computer" in prop.description  # the tooltip says why it is off
    objects = set(bpy.data.objects)
    with pytest.raises(RuntimeError, match=r"outside the scene folder.*Allow External Paths in Import Dataset"):
        bpy.ops.import_scene.npbgpp_dataset(directory=str(root))
    assert set(bpy.data.objects) == objects and not sc.npbgpp.dataset_allow_external_paths
    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(root), allow_external_paths=True) == {"FINISHED"}
    (imported,) = [o for o in sc.objects if o.type == "CAMERA" and o is not cam]
    assert os.path.samefile(imported["npbgpp_image"], shared / "r_0.png")
    assert sc.npbgpp.dataset_allow_external_paths
    sc.npbgpp.weights = ""  # the bundled weights
    assert bpy.ops.npbgpp.aggregate(filepath=str(scene["dir"] / "ext.npbgpp")) == {"FINISHED"}
    sc.npbgpp.dataset_allow_external_paths = False  # Aggregate reads it as imported: now refused
    with pytest.raises(RuntimeError, match="outside the scene folder"):
        bpy.ops.npbgpp.aggregate(filepath=str(scene["dir"] / "ext2.npbgpp"))


def test_aggregate_writes_a_bundle(scene):
    import torch

    from npbgpp_core.models import NPBGPlusPlus
    from npbgpp_core.scene import NeuralScene

    sc, cam = scene["scene"], scene["camera"]
    root = scene["dir"] / "nerf"
    _write_nerf_dataset(root, [cam], scene["points"], scene["colors"])
    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(root)) == {"FINISHED"}
    sc.npbgpp.weights = str(scene["dir"] / "missing.safetensors")
    with pytest.raises(RuntimeError, match="missing.safetensors"):
        bpy.ops.npbgpp.aggregate(filepath=str(scene["dir"] / "agg.npbgpp"))
    assert not (scene["dir"] / "agg.npbgpp").exists()
    sc.npbgpp.weights = ""  # empty: the weights bundled with the add-on
    assert bpy.ops.npbgpp.aggregate(filepath=str(scene["dir"] / "bundled.npbgpp")) == {"FINISHED"}
    assert NeuralScene.load(scene["dir"] / "bundled.npbgpp").kind == "npbgpp"
    torch.manual_seed(0)
    model = NPBGPlusPlus()
    weights = scene["dir"] / "weights.pt"
    torch.save({"config": model.config.to_dict(), "state_dict": model.state_dict()}, weights)
    sc.npbgpp.weights = str(weights)
    assert bpy.ops.npbgpp.aggregate(filepath=str(scene["dir"] / "agg.npbgpp")) == {"FINISHED"}
    bundle = NeuralScene.load(scene["dir"] / "agg.npbgpp")
    assert len(bundle) == len(scene["points"]) and bundle.kind == "npbgpp"
    assert 0 < int(bundle.valid.sum()) < len(bundle)  # one view sees some points, not all
    assert sc.npbgpp.bundle == str(scene["dir"] / "agg.npbgpp")
    # Up Axis 'Auto' (default): the cameras' mean image-up direction, here the one camera's
    # local +Y in world space by Blender's own matrix (5.8 degrees off +Z: not snapped).
    cam_up = np.asarray(cam.matrix_world.to_3x3() @ Vector((0.0, 1.0, 0.0)))
    np.testing.assert_allclose(bundle.model_config["world_up"], cam_up / np.linalg.norm(cam_up), atol=1e-5)
    sc.npbgpp.up_axis = "POS_Z"
    assert bpy.ops.npbgpp.aggregate(filepath=str(scene["dir"] / "z.npbgpp")) == {"FINISHED"}
    assert NeuralScene.load(scene["dir"] / "z.npbgpp").model_config["world_up"] == [0.0, 0.0, 1.0]


def test_aggregate_says_which_points_no_photo_sees_and_why(scene, capfd):
    """Aggregate's count of seen points is those nearest to the camera at some pixel of a
    photo (a brute-force z-buffer of the dataset's camera here), and its note splits the rest
    into points in no photo's view (behind the camera) and points that lost every pixel they
    fell on to a nearer one (copies of points pushed back along their rays)."""
    import math

    from npbgpp_core.datasets import load_scene
    from npbgpp_core.scene import NeuralScene

    sc, cam = scene["scene"], scene["camera"]
    bpy.context.view_layer.update()
    eye = np.array(cam.matrix_world.translation)
    base = scene["points"].astype(np.float64)
    pushed = eye + 1.3 * (base[:10] - eye)  # the same pixels, farther
    behind = eye + 0.5 * (eye - base[10:20])  # behind the camera
    pts = np.concatenate([base, pushed, behind]).astype(np.float32)
    colors = np.concatenate([scene["colors"]] * 2)[: len(pts)]
    root = scene["dir"] / "nerf"
    _write_nerf_dataset(root, [cam], pts, colors)
    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(root)) == {"FINISHED"}
    sc.npbgpp.weights = ""
    capfd.readouterr()
    assert bpy.ops.npbgpp.aggregate(filepath=str(scene["dir"] / "seen.npbgpp")) == {"FINISHED"}
    out = capfd.readouterr().out
    # brute force: per pixel (floor(u + 0.5), floor(v + 0.5)) the point of smallest depth in front
    camera = load_scene(str(root)).camera(0)
    K, R, t = camera.to_opencv()
    x = pts.astype(np.float64) @ R.T + t
    h, w = camera.image_size
    nearest: dict[tuple[int, int], tuple[float, int]] = {}
    in_view = np.zeros(len(pts), bool)
    for i, (xc, yc, zc) in enumerate(x):
        if zc <= 1e-3:
            continue
        col, row = math.floor(K[0, 0] * xc / zc + K[0, 2] + 0.5), math.floor(K[1, 1] * yc / zc + K[1, 2] + 0.5)
        if 0 <= col < w and 0 <= row < h:
            in_view[i] = True
            nearest[(row, col)] = min(nearest.get((row, col), (np.inf, -1)), (zc, i))
    seen = np.zeros(len(pts), bool)
    seen[[i for _, i in nearest.values()]] = True
    bundle = NeuralScene.load(scene["dir"] / "seen.npbgpp")
    np.testing.assert_array_equal(bundle.valid.numpy(), seen)
    outside, lost = int((~in_view).sum()), int((in_view & ~seen).sum())
    assert outside >= 10 and lost >= 10  # the ones behind; the pushed-back copies
    assert f"Saved {len(pts)} points of the dataset's cloud ({seen.sum()} seen by the photos)" in out, out
    assert (f"Info: {seen.sum()} of the {len(pts)} points are seen: the nearest point at some pixel of a photo, the "
            f"ones NPBG++ takes descriptors for; the other {len(pts) - seen.sum()} get none and do not render: "
            f"{outside} lie in no photo's view; {lost} fall only on pixels where a nearer point wins") in out, out
    # every point seen: no note
    keep = seen.copy()
    _write_nerf_dataset(scene["dir"] / "all_seen", [cam], pts[keep], colors[keep])
    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(scene["dir"] / "all_seen")) == {"FINISHED"}
    capfd.readouterr()
    assert bpy.ops.npbgpp.aggregate(filepath=str(scene["dir"] / "all.npbgpp")) == {"FINISHED"}
    out = capfd.readouterr().out
    assert f"({keep.sum()} seen by the photos)" in out and "points are seen" not in out, out


def test_aggregate_says_how_many_photos_the_split_held_out(scene, capfd):
    """A transforms.json capture without split lists holds every 8th view out (0 and 8 of 9),
    and Aggregate reads the other 7: its report says so, as a phone capture's user expects
    every photo to count. A capture whose views are all used gets no such sentence."""
    import json

    from PIL import Image

    from npbgpp_core.ply import save_ply

    def capture(name: str, frames: int):
        root = scene["dir"] / name
        (root / "images").mkdir(parents=True)
        rows = []
        for i in range(frames):
            Image.fromarray(np.full((24, 32, 3), 60 + 10 * i, np.uint8)).save(root / "images" / f"f{i}.png")
            c2w = [list(r) for r in scene["camera"].matrix_world]
            c2w[0][3] += 0.05 * i
            rows.append({"file_path": f"images/f{i}.png", "transform_matrix": c2w, "fl_x": 30.0, "fl_y": 30.0,
                         "cx": 16.0, "cy": 12.0, "w": 32, "h": 24})
        (root / "transforms.json").write_text(json.dumps({"frames": rows, "ply_file_path": "points.ply"}))
        save_ply(str(root / "points.ply"), scene["points"], scene["colors"])
        return root

    for name, frames, note in (("nine", 9, "It used 7 of the dataset's 9 photos: its split holds 2 out for "
                                           "evaluation"), ("one", 1, None)):
        assert bpy.ops.import_scene.npbgpp_dataset(directory=str(capture(name, frames))) == {"FINISHED"}
        capfd.readouterr()
        assert bpy.ops.npbgpp.aggregate(filepath=str(scene["dir"] / f"{name}.npbgpp")) == {"FINISHED"}
        out = capfd.readouterr().out
        assert ("Saved 60 points" in out) and ((note in out) if note else ("photos: its split" not in out)), out


def test_network_setting_picks_the_bundled_file(scene):
    """Network (Auto / Scenes and Captures / Objects on a Plain Background) picks which
    bundled NPBG++ file Aggregate uses; Auto detects it from the dataset's views; a Weights
    file overrides it. The bundle names the file it was aggregated with."""
    from PIL import Image

    from npbgpp_core.pretrained import default_weights_path
    from npbgpp_core.scene import NeuralScene

    sc, cam = scene["scene"], scene["camera"]
    prop = sc.npbgpp.bl_rna.properties["network"]
    assert prop.default == "AUTO" and sc.npbgpp.network == "AUTO"
    assert [i.identifier for i in prop.enum_items] == ["AUTO", "SCENE", "OBJECT"]
    for weights, active in (("", True), ("/some/file.safetensors", False)):
        sc.npbgpp.weights = weights
        layout = _drawn()
        assert layout.props[:2] == ["network", "weights"]
        assert layout.states["network"] == (active, True)  # greyed out while a Weights file replaces it
    sc.npbgpp.weights = ""
    root = scene["dir"] / "nerf"
    _write_nerf_dataset(root, [cam], scene["points"], scene["colors"])  # random alpha: a cut-out
    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(root)) == {"FINISHED"}

    def used(name: str) -> str:
        assert bpy.ops.npbgpp.aggregate(filepath=str(scene["dir"] / name)) == {"FINISHED"}
        return NeuralScene.load(scene["dir"] / name).metadata["weights"]

    objects = os.path.basename(default_weights_path("npbgpp", "object"))
    general = os.path.basename(default_weights_path("npbgpp", "scene"))
    assert used("auto.npbgpp") == objects
    sc.npbgpp.network = "SCENE"
    assert used("scene.npbgpp") == general
    sc.npbgpp.network = "OBJECT"
    sc.npbgpp.weights = default_weights_path("npbgpp", "scene")  # a file wins over Network
    assert used("given.npbgpp") == general
    sc.npbgpp.weights, sc.npbgpp.network = "", "AUTO"
    png = root / "train" / "r_0.png"
    Image.open(png).convert("RGB").save(png)  # no alpha now: a scene
    assert used("rgb.npbgpp") == general


def test_export_dataset_renders_views(scene):
    sc = scene["scene"]
    bpy.ops.mesh.primitive_cube_add(size=1.0)
    # Blender 5.0 refuses file_format="PNG" while the media type is multi-layer: the
    # renderer must switch it and put it back.
    sc.render.image_settings.media_type = "MULTI_LAYER_IMAGE"
    out = scene["dir"] / "export"
    try:
        result = bpy.ops.npbgpp.export_dataset(directory=str(out), views=2, width=16, height=12, samples=1, points=50)
    except RuntimeError as exc:
        if "plyfile" in str(exc):
            pytest.skip(f"dataset export needs plyfile: {exc}")
        raise
    assert result == {"FINISHED"}
    assert (out / "points3d.ply").is_file()
    assert sc.render.engine == "NPBGPP"  # restored
    assert sc.render.image_settings.media_type == "MULTI_LAYER_IMAGE"


def _export_pixels(out) -> dict[str, np.ndarray]:
    """The RGBA pixels of each photo of an exported dataset, by its path in the folder."""
    from PIL import Image

    return {f"{split}/{name}": np.asarray(Image.open(out / split / name)) for split in ("train", "val", "test")
            if (out / split).is_dir() for name in sorted(os.listdir(out / split))}


def test_export_dataset_leaves_out_the_addons_point_objects(scene, capfd):
    """The add-on's own point objects (the fixture's imported PLY, 60 points around the cube,
    and the cloud Points from Selected Meshes just made of the cube) stand for the scene's
    cloud: Export Dataset neither photographs them (its photos equal those of an export with
    both disabled in renders by hand, Blender's own way to leave an object out) nor takes their
    points (points3d.ply holds the 50 sampled on the cube, not 50 + 300 + 60); the report names
    them, and their render visibility is as before."""
    from npbgpp_core.ply import load_ply

    sc = scene["scene"]
    imported = sc.npbgpp.point_object
    bpy.ops.mesh.primitive_cube_add(size=1.0)
    assert bpy.ops.npbgpp.points_from_meshes(count=300, seed=1) == {"FINISHED"}
    made = sc.npbgpp.point_object
    assert made != imported and len(made.data.points) == 300

    def export(name: str):
        out = scene["dir"] / name
        assert bpy.ops.npbgpp.export_dataset(directory=str(out), views=2, width=40, height=40, samples=1,
                                             points=50) == {"FINISHED"}
        return out

    capfd.readouterr()
    got = export("left_out")
    report = capfd.readouterr().out
    assert f"left out the NPBG++ point objects {made.name!r}, {imported.name!r}" in report or \
        f"left out the NPBG++ point objects {imported.name!r}, {made.name!r}" in report, report
    points = load_ply(got / "points3d.ply").points
    assert len(points) == 50 and np.abs(points).max() <= 0.5 + 1e-5  # on the cube only
    assert not imported.hide_render and not made.hide_render  # as they were
    imported.hide_render = made.hide_render = True
    reference = export("reference")
    photos, expected = _export_pixels(got), _export_pixels(reference)
    assert photos.keys() == expected.keys() and len(photos) == 2
    for name, pixels in photos.items():
        np.testing.assert_array_equal(pixels, expected[name], err_msg=name)
    imported.hide_render = made.hide_render = False
    sc.npbgpp.point_object = None  # the imported one is still the add-on's: marked
    assert export("marked").joinpath("points3d.ply").is_file()
    assert len(load_ply(scene["dir"] / "marked" / "points3d.ply").points) == 50


def _point_object_made_the_old_way(sc, name: str, points: np.ndarray, ids: bool = False):
    """A point object as the add-on made one before it marked them (its make_point_object since
    the first version: a vertex-only mesh with a "Col" colour, and from d09b6ec "npbgpp_id" ids
    on imported bundles and datasets, converted to a point cloud), without the mark."""
    obj = _point_cloud_object(sc, name, points, np.full((len(points), 4), 0.5), ids=ids)
    assert "npbgpp_point_object" not in obj
    return obj


def test_export_dataset_leaves_out_point_objects_an_older_addon_made(scene, capfd):
    """Point objects made before the add-on marked them, recognised by their structure: Points
    from Selected Meshes' cloud (its name) and an imported bundle's (its point ids) are left out
    of the export, as is a duplicate of a marked one (Shift+D keeps the mark: another copy of the
    cloud); a point cloud of the user's own with the same "Col" colour is scene content, its 7
    points in points3d.ply beside the 50 sampled on the cube, and so is an older one whose mark
    the user set off."""
    from npbgpp_core.ply import load_ply

    sc = scene["scene"]
    imported = sc.npbgpp.point_object
    rng = np.random.default_rng(5)
    sampled = _point_object_made_the_old_way(sc, "NPBG++ Points.001", rng.uniform(-1, 1, (30, 3)))
    bundle = _point_object_made_the_old_way(sc, "tiny", rng.uniform(-1, 1, (20, 3)), ids=True)
    scan = _point_object_made_the_old_way(sc, "Scan", rng.uniform(-0.4, 0.4, (7, 3)))
    for o in sc.objects:
        o.select_set(o == imported)
    bpy.context.view_layer.objects.active = imported
    assert bpy.ops.object.duplicate() == {"FINISHED"}
    copy = bpy.context.active_object
    assert copy != imported and copy.get("npbgpp_point_object")
    bpy.ops.mesh.primitive_cube_add(size=1.0)
    capfd.readouterr()
    out = scene["dir"] / "old_objects"
    assert bpy.ops.npbgpp.export_dataset(directory=str(out), views=2, width=16, height=16, samples=1,
                                         points=50) == {"FINISHED"}
    report = capfd.readouterr().out
    names = ", ".join(repr(o.name) for o in sorted((imported, copy, sampled, bundle), key=lambda o: o.name))
    assert f"left out the NPBG++ point objects {names} (" in report, report
    assert "to photograph one, set its custom property npbgpp_point_object to 0" in report, report  # told how
    assert scan.name not in report.split("left out")[1], report
    points = load_ply(out / "points3d.ply").points
    assert len(points) == 57 and np.abs(points).max() <= 0.5 + 1e-5  # the cube's 50 and the scan's 7
    render = sys.modules[f"{MODULE}.datagen.render"]
    assert sampled in render.addon_point_objects(sc)
    sampled["npbgpp_point_object"] = False  # the mark set off by hand: scene content, whatever its structure
    assert sampled not in render.addon_point_objects(sc)


def test_export_dataset_of_nothing_to_photograph_says_why_in_words(scene):
    """The fixture's scene holds only the add-on's own point object (left out) and a camera:
    the export fails with the renderer's sentence, naming the left-out object, and no
    internal exception name (was "Export dataset failed: NoSurfacesError: ..."); nothing is
    written."""
    out = scene["dir"] / "nothing"
    with pytest.raises(RuntimeError) as info:
        bpy.ops.npbgpp.export_dataset(directory=str(out), views=2, width=16, height=12, samples=1, points=50)
    said = str(info.value)
    assert (f"Export Dataset failed: scene 'Scene' has no visible mesh surfaces or points (left out the NPBG++ point "
            f"object {scene['scene'].npbgpp.point_object.name!r}") in said, said
    assert "NoSurfacesError" not in said and not out.exists()


def test_export_dataset_of_a_scene_without_a_rendered_view_layer_is_refused(scene):
    """Every view layer's Use for Rendering off: Blender renders nothing without a word, and
    the export failed after its preparation with the renderer's RuntimeError; refused before
    any work, naming the setting, nothing written and the scene's settings untouched. With
    one layer on again, it exports."""
    sc = scene["scene"]
    bpy.ops.mesh.primitive_cube_add(size=1.0)
    sc.view_layers.new("Second")
    for layer in sc.view_layers:
        layer.use = False
    out = scene["dir"] / "no_layer"
    with pytest.raises(RuntimeError, match=r"Export Dataset: no view layer of the scene 'Scene' is enabled for "
                                           r"rendering \('ViewLayer', 'Second'\): turn on View Layer Properties > "
                                           r"View Layer > Use for Rendering"):
        bpy.ops.npbgpp.export_dataset(directory=str(out), views=2, width=16, height=12, samples=1, points=50)
    assert not out.exists() and sc.render.engine == "NPBGPP"
    assert {o.name for o in sc.objects if o.type == "CAMERA"} == {"Cam"}
    sc.view_layers["Second"].use = True
    assert bpy.ops.npbgpp.export_dataset(directory=str(out), views=2, width=16, height=12, samples=1,
                                         points=50) == {"FINISHED"}
    assert (out / "train").is_dir()


def test_export_dataset_never_replaces_the_project(scene):
    """Export Dataset with Overwrite into the folder holding the saved .blend (or the
    imported dataset) replaced that whole folder with the dataset: the .blend deleted.
    Refused by name; both still there."""
    cam = scene["camera"]
    project = scene["dir"] / "project"
    project.mkdir()
    root = project / "nerf"
    _write_nerf_dataset(root, [cam], scene["points"], scene["colors"])
    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(root)) == {"FINISHED"}
    bpy.ops.mesh.primitive_cube_add(size=1.0)  # something to render: the export would go ahead
    blend = project / "shot.blend"
    assert bpy.ops.wm.save_as_mainfile(filepath=str(blend)) == {"FINISHED"}
    for folder, held in ((project, "the saved .blend"), (root, "the scene's dataset")):
        with pytest.raises(RuntimeError, match=f"holds {held}"):
            bpy.ops.npbgpp.export_dataset(directory=str(folder), views=2, width=16, height=12, samples=1,
                                          points=50, overwrite=True)
    assert blend.is_file() and (root / "transforms_train.json").is_file()
    assert sorted(p.name for p in project.iterdir()) == ["nerf", "shot.blend"]


def _plane_selected(sc):
    bpy.ops.mesh.primitive_plane_add(size=2.0)
    plane = bpy.context.active_object
    for o in sc.objects:
        o.select_set(o == plane)
    return plane


def _bvh_of_evaluated(obj):
    """Vertex count and world-space BVH of Blender's own evaluated mesh of ``obj`` (its loop
    triangles: Blender's own split of non-planar faces)."""
    from mathutils.bvhtree import BVHTree

    ev = obj.evaluated_get(bpy.context.evaluated_depsgraph_get())
    mesh = ev.to_mesh()
    mesh.calc_loop_triangles()
    verts = [tuple(ev.matrix_world @ v.co) for v in mesh.vertices]
    polys = [tuple(t.vertices) for t in mesh.loop_triangles]
    ev.to_mesh_clear()
    return len(verts), BVHTree.FromPolygons(verts, polys)


def _sampled_points(sc) -> tuple[np.ndarray, np.ndarray]:
    """Points and colours of ``sc``'s point object as Blender evaluates it: what Points from
    Selected Meshes sampled."""
    sys.path.insert(0, ROOT)
    from blender_addon.point_source import object_points

    return object_points(sc.npbgpp.point_object.evaluated_get(bpy.context.evaluated_depsgraph_get()))


def _distances(bvh, pts: np.ndarray) -> np.ndarray:
    """Distance of each of ``pts`` to the nearest point of the surface ``bvh``."""
    return np.array([bvh.find_nearest(Vector(p))[3] for p in pts])


def _assert_on_render_surface(pts: np.ndarray, render_bvh, viewport_bvh, apart: float = 1e-3,
                              share: float = 0.5) -> None:
    """Every one of ``pts`` lies on the render-resolution surface ``render_bvh`` (within 1e-4),
    and more than ``share`` of them lie over ``apart`` from the viewport's ``viewport_bvh``:
    the points were sampled as renders show the object, not as viewports do."""
    on_render = _distances(render_bvh, pts)
    on_viewport = _distances(viewport_bvh, pts)
    assert on_render.max() < 1e-4, on_render.max()
    assert (on_viewport > apart).mean() > share, np.median(on_viewport)


def _evaluated_bvh(sc, obj, modifier_settings=None, **data_settings):
    """:func:`_bvh_of_evaluated` of a copy of ``obj`` whose modifiers have ``modifier_settings``
    ({modifier name: {setting: value}}) and whose curve data (copied) has ``data_settings``;
    the copy and its data are removed again."""
    ref = obj.copy()
    if data_settings:
        ref.data = obj.data.copy()
        for key, value in data_settings.items():
            setattr(ref.data, key, value)
    for name, settings in (modifier_settings or {}).items():
        for key, value in settings.items():
            setattr(ref.modifiers[name], key, value)
    sc.collection.objects.link(ref)
    try:
        return _bvh_of_evaluated(ref)
    finally:
        data = ref.data
        bpy.data.objects.remove(ref)
        if data_settings:
            bpy.data.curves.remove(data)


def test_points_from_meshes_sample_the_mesh_as_it_renders(scene, capfd):
    """Points from Selected Meshes samples each mesh as renders show it (a dataset's photos,
    and so its points3d.ply): Subdivision at its Render level (3 here, 1 in viewports) and a
    modifier shown in renders only (an Array of 2); the points lie on Blender's own evaluated
    mesh at those settings, not on the viewport's. The selected object is left as it was and
    nothing else stays in the file."""
    sc = scene["scene"]
    bpy.ops.mesh.primitive_cube_add(size=2.0, location=(0.0, 0.0, 0.0))
    cube = bpy.context.active_object
    cube.name = "Rounded"
    sub = cube.modifiers.new("Sub", "SUBSURF")
    sub.levels, sub.render_levels = 1, 3
    array = cube.modifiers.new("Arr", "ARRAY")
    array.count, array.relative_offset_displace = 2, (1.5, 0.0, 0.0)
    array.show_viewport = False

    render_count, render_bvh = _evaluated_bvh(sc, cube, {"Sub": {"levels": 3}, "Arr": {"show_viewport": True}})
    viewport_count, viewport_bvh = _evaluated_bvh(sc, cube)  # level 1, no Array
    assert (render_count, viewport_count) == (2 * 386, 26)  # 6 * 4^3 + 2 per cube at level 3
    for o in sc.objects:
        o.select_set(o == cube)
    before = {o.name for o in bpy.data.objects}
    assert bpy.ops.npbgpp.points_from_meshes(count=400, seed=4) == {"FINISHED"}
    obj = sc.npbgpp.point_object
    assert {o.name for o in bpy.data.objects} == before | {obj.name}
    # nor the mesh Convert to Point Cloud leaves (the fixture's PLY import's neither)
    assert obj.type == "POINTCLOUD" and [m.name for m in bpy.data.meshes if not m.users] == []
    assert (sub.levels, sub.render_levels, array.show_viewport, array.show_render) == (1, 3, False, True)
    pts, _ = _sampled_points(sc)
    assert pts.shape == (400, 3)
    # the level-1 surface lies apart from most of them
    _assert_on_render_surface(pts, render_bvh, viewport_bvh, apart=1e-2)
    assert pts[:, 0].max() > 2.5  # the second cube of the Array, centred at x = 3


def test_points_from_meshes_at_simplifys_render_limit(scene):
    """Simplify on, its viewport limit at 0 subdivisions and its render limit at 3: the points
    lie on the surface renders show (Subdivision at level 3, Blender's own evaluation with
    Simplify off), not on the bare cube, and the scene's Simplify is left as it was."""
    sc = scene["scene"]
    bpy.ops.mesh.primitive_cube_add(size=2.0)
    cube = bpy.context.active_object
    sub = cube.modifiers.new("Sub", "SUBSURF")
    sub.levels = sub.render_levels = 3
    count, rendered = _bvh_of_evaluated(cube)  # Simplify still off
    assert count == 386
    r = sc.render
    r.use_simplify, r.simplify_subdivision, r.simplify_subdivision_render = True, 0, 3
    for o in sc.objects:
        o.select_set(o == cube)
    assert bpy.ops.npbgpp.points_from_meshes(count=300, seed=5) == {"FINISHED"}
    assert (r.use_simplify, r.simplify_subdivision, r.simplify_subdivision_render) == (True, 0, 3)
    assert len(cube.evaluated_get(bpy.context.evaluated_depsgraph_get()).data.vertices) == 8  # the viewport's
    pts, _ = _sampled_points(sc)
    on_rendered = _distances(rendered, pts)
    assert on_rendered.max() < 1e-4, on_rendered.max()
    assert np.abs(pts).max(axis=1).min() < 0.95  # off the bare cube's faces (|coordinate| 1)


def test_points_from_meshes_screw_at_its_render_steps(scene):
    """A Screw modifier turning an edge at radius 1 around z: at its Render steps (64) the
    surface is a polygonal cylinder whose every point lies between cos(pi/64) and 1 from the
    axis; its viewport steps (3) make a triangular prism, points down to 0.5 from it."""
    sc = scene["scene"]
    mesh = bpy.data.meshes.new("Edge")
    mesh.from_pydata([(1.0, 0.0, 0.0), (1.0, 0.0, 1.0)], [(0, 1)], [])
    edge = bpy.data.objects.new("Turned", mesh)
    sc.collection.objects.link(edge)
    screw = edge.modifiers.new("Screw", "SCREW")
    screw.steps, screw.render_steps = 3, 64
    for o in sc.objects:
        o.select_set(o == edge)
    assert bpy.ops.npbgpp.points_from_meshes(count=300, seed=2) == {"FINISHED"}
    assert (screw.steps, screw.render_steps) == (3, 64)
    pts, _ = _sampled_points(sc)
    radius = np.hypot(pts[:, 0], pts[:, 1])
    assert radius.min() >= np.cos(np.pi / 64) - 1e-5 and radius.max() <= 1.0 + 1e-5, (radius.min(), radius.max())


def test_points_from_meshes_ocean_at_its_render_resolution(scene):
    """An Ocean modifier's Render resolution (not its Viewport one) makes the sampled
    surface: the points lie on Blender's own evaluation of a copy at that resolution."""
    sc = scene["scene"]
    bpy.ops.mesh.primitive_plane_add(size=2.0)
    plane = bpy.context.active_object
    ocean = plane.modifiers.new("Ocean", "OCEAN")
    ocean.geometry_mode = "GENERATE"
    ocean.resolution, ocean.viewport_resolution = 6, 1

    render_count, render_bvh = _evaluated_bvh(sc, plane, {"Ocean": {"viewport_resolution": 6}})
    viewport_count, viewport_bvh = _evaluated_bvh(sc, plane)
    assert render_count > viewport_count
    for o in sc.objects:
        o.select_set(o == plane)
    assert bpy.ops.npbgpp.points_from_meshes(count=300, seed=3) == {"FINISHED"}
    assert (ocean.resolution, ocean.viewport_resolution) == (6, 1)
    pts, _ = _sampled_points(sc)
    _assert_on_render_surface(pts, render_bvh, viewport_bvh)


def test_points_from_meshes_text_and_bevelled_curve_at_render_resolution(scene, capfd):
    """A text object and a bevelled curve selected with an empty and a light: both surfaces are
    sampled as renders show them (their data's Render resolution U, not the viewport's): every
    point lies on Blender's own evaluated mesh of a copy at the render resolution, and both
    objects get points; the empty, the light and a curve with no Bevel (no faces, no points)
    are named as skipped. The user's objects and
    data keep their settings and no datablock is left behind."""
    sc = scene["scene"]
    bpy.ops.curve.primitive_bezier_circle_add(radius=1.0, location=(0.0, 0.0, 0.0))
    ring = bpy.context.active_object
    ring.data.bevel_depth, ring.data.resolution_u, ring.data.render_resolution_u = 0.2, 2, 24
    bpy.ops.object.text_add(location=(3.0, 0.0, 0.0))
    text = bpy.context.active_object
    text.data.body, text.data.extrude = "S", 0.1
    text.data.resolution_u, text.data.render_resolution_u = 1, 16
    bpy.ops.object.empty_add(location=(0.0, 0.0, 4.0))
    empty = bpy.context.active_object
    bpy.ops.object.light_add(type="POINT", location=(0.0, 0.0, 6.0))
    light = bpy.context.active_object
    bpy.ops.curve.primitive_bezier_curve_add(location=(0.0, 0.0, 8.0))
    line = bpy.context.active_object  # no Bevel nor Extrude: no faces
    ring_render, ring_render_bvh = _evaluated_bvh(sc, ring, resolution_u=24)
    ring_viewport, ring_viewport_bvh = _evaluated_bvh(sc, ring)
    text_render, text_render_bvh = _evaluated_bvh(sc, text, resolution_u=16)
    text_viewport, text_viewport_bvh = _evaluated_bvh(sc, text)
    assert ring_render > 4 * ring_viewport and text_render > 4 * text_viewport
    for o in sc.objects:
        o.select_set(o in (ring, text, empty, light, line))
    before = {n: set(getattr(bpy.data, n)) for n in ("objects", "curves", "meshes", "fonts")}
    capfd.readouterr()
    assert bpy.ops.npbgpp.points_from_meshes(count=600, seed=6) == {"FINISHED"}
    assert (f"skipped: {', '.join(sorted((empty.name, light.name)))} (no geometry: an empty, light, camera or the "
            f"like); {line.name} (no faces") in capfd.readouterr().out
    obj = sc.npbgpp.point_object
    after = {n: set(getattr(bpy.data, n)) for n in ("objects", "curves", "meshes", "fonts")}
    assert after == {**before, "objects": before["objects"] | {obj}}
    assert [m.name for m in bpy.data.meshes if not m.users] == []
    assert (ring.data.resolution_u, ring.data.render_resolution_u) == (2, 24)
    assert (text.data.resolution_u, text.data.render_resolution_u) == (1, 16)
    pts, _ = _sampled_points(sc)
    on_ring = pts[:, 0] < 2.0  # the ring lies within x <= 1.2, the letter from x = 3
    assert 50 < on_ring.sum() < 550
    for sel, render_bvh, viewport_bvh in ((on_ring, ring_render_bvh, ring_viewport_bvh),
                                          (~on_ring, text_render_bvh, text_viewport_bvh)):
        _assert_on_render_surface(pts[sel], render_bvh, viewport_bvh, share=0.3)


def test_points_from_meshes_nurbs_surface_at_render_resolution(scene):
    """A NURBS sphere (a Surface object) at Render resolution U/V 12 (2 in viewports): the points
    lie on Blender's own evaluated mesh of a copy at 12, apart from the viewport's, and the
    user's data keeps its resolutions."""
    sc = scene["scene"]
    bpy.ops.surface.primitive_nurbs_surface_sphere_add(radius=1.0)
    ball = bpy.context.active_object
    d = ball.data
    d.resolution_u = d.resolution_v = 2
    d.render_resolution_u = d.render_resolution_v = 12
    render_count, render_bvh = _evaluated_bvh(sc, ball, resolution_u=12, resolution_v=12)
    viewport_count, viewport_bvh = _evaluated_bvh(sc, ball)
    assert render_count > 10 * viewport_count
    for o in sc.objects:
        o.select_set(o == ball)
    assert bpy.ops.npbgpp.points_from_meshes(count=300, seed=9) == {"FINISHED"}
    assert (d.resolution_u, d.resolution_v, d.render_resolution_u, d.render_resolution_v) == (2, 2, 12, 12)
    pts, _ = _sampled_points(sc)
    _assert_on_render_surface(pts, render_bvh, viewport_bvh)


def test_points_from_meshes_metaball_family_at_render_resolution(scene, capfd):
    """Two metaballs of one family (Blob, Blob.001: polygonized together by the basis, Blob)
    selected: the points lie on Blender's own evaluation of that family at the basis's Render
    resolution (0.0625; 0.5 in viewports), near both balls; nothing is left behind and the
    user's resolution is kept. The member, whose own mesh is empty (the family's is the
    basis's), is not named as skipped; selected without Blob (with a cube) it is its copies'
    family's basis and gets points of its own."""
    sc = scene["scene"]
    balls = []
    for name, x in (("Blob", 0.0), ("Blob.001", 1.2)):
        bpy.ops.object.metaball_add(type="BALL", radius=1.0, location=(x, 0.0, 0.0))
        balls.append(bpy.context.active_object)
        balls[-1].name = name
    basis = balls[0].data
    basis.resolution, basis.render_resolution = 0.5, 0.0625

    viewport_count, viewport_bvh = _bvh_of_evaluated(balls[0])  # the family's mesh is its basis's
    basis.resolution = 0.0625
    render_count, render_bvh = _bvh_of_evaluated(balls[0])
    basis.resolution = 0.5
    assert render_count > 10 * viewport_count
    for o in sc.objects:
        o.select_set(o in balls)
    before = {n: set(getattr(bpy.data, n)) for n in ("objects", "metaballs", "meshes")}
    capfd.readouterr()
    assert bpy.ops.npbgpp.points_from_meshes(count=400, seed=7) == {"FINISHED"}
    assert "skipped" not in capfd.readouterr().out
    obj = sc.npbgpp.point_object
    after = {n: set(getattr(bpy.data, n)) for n in ("objects", "metaballs", "meshes")}
    assert after == {**before, "objects": before["objects"] | {obj}}
    assert (basis.resolution, basis.render_resolution) == (0.5, 0.0625)
    pts, _ = _sampled_points(sc)
    _assert_on_render_surface(pts, render_bvh, viewport_bvh)
    assert pts[:, 0].min() < -0.5 and pts[:, 0].max() > 1.7  # beyond each ball's centre
    bpy.ops.mesh.primitive_cube_add(location=(0.0, 5.0, 0.0))
    cube = bpy.context.active_object
    for o in sc.objects:
        o.select_set(o in (balls[1], cube))
    capfd.readouterr()
    assert bpy.ops.npbgpp.points_from_meshes(count=200, seed=7) == {"FINISHED"}
    out = capfd.readouterr().out
    assert "skipped" not in out
    # renders merge it with Blob: said, as the points are of its ball alone
    assert "The metaball 'Blob.001' merges in renders with 'Blob' of its family, which is not selected" in out, out
    pts, _ = _sampled_points(sc)
    near_member = np.linalg.norm(pts - [1.2, 0.0, 0.0], axis=1) < 1.0
    assert near_member.any() and (near_member | (pts[:, 1] > 3.0)).all()  # the member's ball, the cube


def test_points_from_meshes_geometry_nodes_mesh(scene):
    """A mesh whose Geometry Nodes replace it by an Ico Sphere of radius 2: the points lie on
    that sphere (Blender's evaluated mesh), not on the original plane."""
    sc = scene["scene"]
    bpy.ops.mesh.primitive_plane_add(size=0.5)
    plane = bpy.context.active_object
    tree = bpy.data.node_groups.new("Sphere", "GeometryNodeTree")
    tree.interface.new_socket("Geometry", in_out="OUTPUT", socket_type="NodeSocketGeometry")
    sphere = tree.nodes.new("GeometryNodeMeshIcoSphere")
    sphere.inputs["Radius"].default_value, sphere.inputs["Subdivisions"].default_value = 2.0, 3
    out = tree.nodes.new("NodeGroupOutput")
    tree.links.new(sphere.outputs["Mesh"], out.inputs[0])
    plane.modifiers.new("GN", "NODES").node_group = tree
    count, bvh = _bvh_of_evaluated(plane)
    assert count == 162
    for o in sc.objects:
        o.select_set(o == plane)
    assert bpy.ops.npbgpp.points_from_meshes(count=200, seed=8) == {"FINISHED"}
    pts, _ = _sampled_points(sc)
    assert _distances(bvh, pts).max() < 1e-4
    assert np.linalg.norm(pts, axis=1).min() > 1.8  # on the sphere, none on the 0.5 plane


def test_points_from_meshes_without_surfaces_is_an_error(scene):
    """Only an empty and a camera selected: a clear error naming them, and nothing added."""
    sc = scene["scene"]
    bpy.ops.object.empty_add()
    empty = bpy.context.active_object
    for o in sc.objects:
        o.select_set(o in (empty, scene["camera"]))
    before = set(bpy.data.objects)
    with pytest.raises(RuntimeError, match=r"Select one or more mesh, curve, text, surface, metaball, point cloud or "
                                           rf"hair curves objects .*\(selected: {scene['camera'].name}, {empty.name}, "
                                           "none with a surface or points\\)"):
        bpy.ops.npbgpp.points_from_meshes(count=10)
    assert set(bpy.data.objects) == before


def test_points_from_meshes_vertex_colours(scene):
    sc = scene["scene"]
    plane = _plane_selected(sc)
    attr = plane.data.color_attributes.new("Col", "FLOAT_COLOR", "POINT")
    attr.data.foreach_set("color_srgb", np.tile([0.2, 0.6, 0.9, 1.0], len(plane.data.vertices)).astype(np.float32))
    plane.data.color_attributes.active_color = attr
    assert bpy.ops.npbgpp.points_from_meshes(count=50, seed=2) == {"FINISHED"}
    from blender_addon.point_source import object_points

    _, col = object_points(sc.npbgpp.point_object)
    np.testing.assert_allclose(col, np.broadcast_to([0.2, 0.6, 0.9], col.shape), atol=2e-3)


def test_points_from_meshes_image_texture(scene):
    sc = scene["scene"]
    plane = _plane_selected(sc)
    image = bpy.data.images.new("T", 2, 2, alpha=True)
    texels = np.array([[[1, 0, 0, 1], [0, 1, 0, 1]], [[0, 0, 1, 1], [1, 1, 0, 1]]], np.float32)  # rows bottom-up
    image.pixels.foreach_set(texels.ravel())
    mat = bpy.data.materials.new("Tex")
    plane.data.materials.append(mat)
    tree = mat.node_tree
    bsdf = tree.nodes.get("Principled BSDF")
    if bsdf is None:
        pytest.skip("no Principled BSDF in a new material")
    tex = tree.nodes.new("ShaderNodeTexImage")
    tex.image = image
    tex.interpolation = "Closest"  # texel colours, as Cycles would show them
    tree.links.new(tex.outputs["Color"], bsdf.inputs["Base Color"])
    assert bpy.ops.npbgpp.points_from_meshes(count=200, seed=3) == {"FINISHED"}
    from blender_addon.point_source import object_points

    pts, col = object_points(sc.npbgpp.point_object)
    u, v = (pts[:, 0] + 1) / 2, (pts[:, 1] + 1) / 2  # the default plane's UVs
    keep = (np.abs(u - 0.5) > 0.01) & (np.abs(v - 0.5) > 0.01)  # away from texel borders
    want = texels[np.floor(v * 2).astype(int), np.floor(u * 2).astype(int), :3]
    np.testing.assert_allclose(col[keep], want[keep], atol=2e-3)
    assert keep.sum() > 150


def _point_cloud_object(sc, name: str, local: np.ndarray, rgba: np.ndarray | None = None, ids: bool = False):
    """A Point Cloud object of ``local`` points (a vertex-only mesh converted, as Blender's
    Python cannot give a new point cloud points), with a "Col" colour of ``rgba`` (sRGB) and,
    with ``ids``, "npbgpp_id" point ids 0, 1, ..."""
    mesh = bpy.data.meshes.new(name)
    mesh.vertices.add(len(local))
    mesh.attributes["position"].data.foreach_set("vector", local.astype(np.float32).ravel())
    if rgba is not None:
        mesh.color_attributes.new("Col", "FLOAT_COLOR", "POINT").data.foreach_set(
            "color_srgb", rgba.astype(np.float32).ravel())
    if ids:
        mesh.attributes.new("npbgpp_id", "INT", "POINT").data.foreach_set("value", np.arange(len(local)))
    obj = bpy.data.objects.new(name, mesh)
    sc.collection.objects.link(obj)
    for o in sc.objects:
        o.select_set(o == obj)
    bpy.context.view_layer.objects.active = obj
    assert bpy.ops.object.convert(target="POINTCLOUD") == {"FINISHED"}
    obj = bpy.context.active_object
    assert obj.type == "POINTCLOUD" and obj.name == name
    return obj


def _blender_points(obj, attribute: str = "position") -> np.ndarray:
    """World positions of ``obj``'s evaluated points as Blender places them (``matrix_world @``)."""
    data = obj.evaluated_get(bpy.context.evaluated_depsgraph_get()).data
    return np.array([tuple(obj.matrix_world @ Vector(a.vector)) for a in data.attributes[attribute].data])


def test_points_from_meshes_takes_point_clouds_as_they_are(scene, capfd):
    """A cube, a coloured Point Cloud object (moved, rotated) and one with no colours but a
    material selected: the cube gets the sampled points; every point of each cloud is taken
    as it is, at Blender's own world position, with its colour, or the material's Base Color
    (Blender's own sRGB of it) for the other; the report says so."""
    from mathutils import Color

    sc = scene["scene"]
    bpy.ops.mesh.primitive_cube_add(size=1.0, location=(0.0, 6.0, 0.0))
    cube = bpy.context.active_object
    rng = np.random.default_rng(3)
    local = rng.uniform(-1, 1, (25, 3))
    rgba = np.concatenate([rng.uniform(0, 1, (25, 3)), np.ones((25, 1))], axis=1)
    coloured = _point_cloud_object(sc, "Coloured", local, rgba)
    coloured.location, coloured.rotation_euler = (2.0, 0.0, 1.0), (0.3, 0.0, 0.7)
    plain = _point_cloud_object(sc, "Plain", local[:5])
    plain.location = (-3.0, 0.0, 0.0)
    mat = bpy.data.materials.new("Base")
    bsdf = mat.node_tree.nodes.get("Principled BSDF")
    if bsdf is None:
        pytest.skip("no Principled BSDF in a new material")
    bsdf.inputs["Base Color"].default_value = (0.2, 0.4, 0.05, 1.0)  # scene linear
    plain.data.materials.append(mat)
    bpy.context.view_layer.update()
    for o in sc.objects:
        o.select_set(o in (cube, coloured, plain))
    capfd.readouterr()
    assert bpy.ops.npbgpp.points_from_meshes(count=100, seed=2) == {"FINISHED"}
    out = capfd.readouterr().out
    assert "Sampled 100 points on surfaces and took the 30 points of 'Coloured', 'Plain' into" in out, out
    assert "skipped" not in out
    pts, col = _sampled_points(sc)
    assert pts.shape == (130, 3)
    assert (np.abs(pts[:100] - [0.0, 6.0, 0.0]) <= 0.5 + 1e-5).all()  # on the cube
    # the clouds follow in the selection's order (Blender's), each whole: compare as sets of rows
    clouds = {"Coloured": (_blender_points(coloured), rgba[:, :3]),
              "Plain": (_blender_points(plain), np.tile(Color((0.2, 0.4, 0.05)).from_scene_linear_to_srgb(), (5, 1)))}
    taken, taken_col = pts[100:], col[100:]
    for want, want_col in clouds.values():
        match = np.array([np.argmin(np.linalg.norm(taken - p, axis=1)) for p in want])
        np.testing.assert_allclose(taken[match], want, atol=1e-5)
        np.testing.assert_allclose(taken_col[match], want_col, atol=2e-3)
    assert len(np.unique(np.round(taken, 4), axis=0)) == 30


def test_points_from_meshes_takes_the_colour_attribute_the_material_reads(scene):
    """A Point Cloud object with two colour attributes, "Col" (red) and "paint" (blue), whose
    material's Base Color reads "paint" by an Attribute node: its points take blue, as renders
    show them, not the "Col" a cloud without such a material would give."""
    sc = scene["scene"]
    local = np.random.default_rng(4).uniform(-1, 1, (4, 3))
    cloud = _point_cloud_object(sc, "Painted", local, np.tile([1.0, 0.0, 0.0, 1.0], (4, 1)))
    cloud.data.attributes.new("paint", "FLOAT_COLOR", "POINT").data.foreach_set(
        "color_srgb", np.tile([0.0, 0.2, 1.0, 1.0], 4).astype(np.float32))
    mat = bpy.data.materials.new("ReadsPaint")
    bsdf = mat.node_tree.nodes.get("Principled BSDF")
    if bsdf is None:
        pytest.skip("no Principled BSDF in a new material")
    attribute = mat.node_tree.nodes.new("ShaderNodeAttribute")
    attribute.attribute_name = "paint"
    mat.node_tree.links.new(attribute.outputs["Color"], bsdf.inputs["Base Color"])
    cloud.data.materials.append(mat)
    assert bpy.ops.npbgpp.points_from_meshes(count=5, seed=1) == {"FINISHED"}
    _, col = _sampled_points(sc)
    np.testing.assert_allclose(col, np.tile([0.0, 0.2, 1.0], (4, 1)), atol=2e-3)


def test_points_from_meshes_takes_hair_control_points(scene, capfd):
    """A hair Curves object of two strands (3 and 4 points, a colour per strand) selected
    alone: its 7 control points are taken at Blender's own world positions, each with its
    strand's colour; a Volume and an empty selected with it are named as skipped, each with
    why; the Volume alone is an error naming it."""
    sc = scene["scene"]
    hair = bpy.data.hair_curves.new("Hair")
    hair.add_curves([3, 4])
    local = np.array([[0, 0, 0], [0, 0, 0.5], [0.1, 0, 1], [1, 0, 0], [1, 0.2, 0.4], [1, 0.3, 0.8], [1.1, 0.3, 1.2]])
    hair.attributes["position"].data.foreach_set("vector", local.astype(np.float32).ravel())
    strand_rgba = np.array([[0.9, 0.5, 0.1, 1.0], [0.1, 0.2, 0.8, 1.0]], np.float32)
    hair.attributes.new("Color", "FLOAT_COLOR", "CURVE").data.foreach_set("color_srgb", strand_rgba.ravel())
    obj = bpy.data.objects.new("Hair", hair)
    sc.collection.objects.link(obj)
    obj.location, obj.scale = (0.5, 1.0, -0.5), (2.0, 2.0, 2.0)
    volume = bpy.data.objects.new("Fog", bpy.data.volumes.new("Fog"))
    sc.collection.objects.link(volume)
    bpy.ops.object.empty_add()
    empty = bpy.context.active_object
    bpy.context.view_layer.update()
    for o in sc.objects:
        o.select_set(o in (obj, volume, empty))
    capfd.readouterr()
    assert bpy.ops.npbgpp.points_from_meshes(count=50, seed=1) == {"FINISHED"}
    out = capfd.readouterr().out
    assert "Took the 7 points of 'Hair' into" in out, out
    assert (f"skipped: {', '.join(sorted((empty.name, 'Fog')))}" not in out
            and "Fog (a volume: density, no surface nor points to take)" in out
            and f"{empty.name} (no geometry: an empty, light, camera or the like)" in out), out
    pts, col = _sampled_points(sc)
    np.testing.assert_allclose(pts, _blender_points(obj), atol=1e-5)
    np.testing.assert_allclose(col, np.repeat(strand_rgba[:, :3], [3, 4], axis=0), atol=2e-3)
    for o in sc.objects:
        o.select_set(o == volume)
    with pytest.raises(RuntimeError, match=r"\(selected: Fog, none with a surface or points\)"):
        bpy.ops.npbgpp.points_from_meshes(count=10)


def _made_real_bvh(sc, instancer, apart: bool = False):
    """World-space BVH of what Blender's own Object > Apply > Make Instances Real gives for
    ``instancer`` (an empty instancing a collection, or a particle emitter): its objects made
    real, joined (with ``apart``: a list of one BVH per object); they and their data are
    removed again."""
    from mathutils.bvhtree import BVHTree

    for o in sc.objects:
        o.select_set(o == instancer)
    bpy.context.view_layer.objects.active = instancer
    before = set(sc.objects)
    assert bpy.ops.object.duplicates_make_real() == {"FINISHED"}
    made = [o for o in sc.objects if o not in before]
    verts, polys, each = [], [], []
    for obj in made:
        ev = obj.evaluated_get(bpy.context.evaluated_depsgraph_get())
        mesh = ev.to_mesh()
        mesh.calc_loop_triangles()
        start = len(verts)
        polys += [tuple(len(verts) + i for i in t.vertices) for t in mesh.loop_triangles]
        verts += [tuple(ev.matrix_world @ v.co) for v in mesh.vertices]
        each.append(BVHTree.FromPolygons(verts[start:], [tuple(i - start for i in p) for p in polys[-len(
            mesh.loop_triangles):]]))
        ev.to_mesh_clear()
    for obj in made:
        bpy.data.objects.remove(obj)
    return each if apart else BVHTree.FromPolygons(verts, polys)


def test_points_from_meshes_samples_a_parent_instancing_its_child_at_its_vertices(scene, capfd):
    """A plane (moved, turned, mirrored by a negative scale) instancing its child ball at its
    4 vertices (Instancing: Vertices), both selected: renders show the 4 balls and not the
    child at its own place, so every point lies on the plane or on one of the balls Blender's
    own Make Instances Real gives, each of the 4 gets points, and none lies on the child where it
    stands (the copies Points from Selected Meshes evaluates have no children: the plane's
    balls were missing and the child was sampled at its own place). The child selected alone
    is named with why, not as having no faces; disabled in renders, it is instanced nowhere, and
    selected with the plane it is named as such (not told to select the plane)."""
    sc = scene["scene"]
    bpy.ops.mesh.primitive_plane_add(size=4.0, location=(0.0, 10.0, 1.0), rotation=(0.0, 0.0, 0.5))
    grid = bpy.context.active_object
    grid.name, grid.scale, grid.instance_type = "Grid", (1.5, -1.5, 1.5), "VERTS"
    bpy.ops.mesh.primitive_ico_sphere_add(subdivisions=2, radius=0.3)
    ball = bpy.context.active_object
    ball.parent = grid
    ball.location = (0.0, 0.0, 2.0)  # in the plane's space: 3 above its centre
    bpy.context.view_layer.update()
    own_place = np.array(ball.matrix_world.translation)
    for o in sc.objects:
        o.select_set(o in (grid, ball))
    assert bpy.ops.npbgpp.points_from_meshes(count=1000, seed=3) == {"FINISHED"}
    pts, _ = _sampled_points(sc)
    for o in sc.objects:
        o.select_set(o == ball)
    with pytest.raises(RuntimeError, match=r"Icosphere \(renders show it only where its parent 'Grid' instances it "):
        bpy.ops.npbgpp.points_from_meshes(count=10)
    balls = _made_real_bvh(sc, grid, apart=True)  # (Blender turns the plane's instancing off)
    assert len(balls) == 4
    on_ball = np.stack([_distances(bvh, pts) < 1e-4 for bvh in balls])
    on_plane = _distances(_bvh_of_evaluated(grid)[1], pts) < 1e-4
    assert (on_plane | on_ball.any(axis=0)).all(), (~(on_plane | on_ball.any(axis=0))).sum()
    assert on_ball.any(axis=1).all(), on_ball.sum(axis=1)
    assert np.linalg.norm(pts - own_place, axis=1).min() > 0.3 + 1e-3
    grid.instance_type, ball.hide_render = "VERTS", True  # renders instance a child disabled in them nowhere
    for o in sc.objects:
        o.select_set(o == grid)
    assert bpy.ops.npbgpp.points_from_meshes(count=200, seed=3) == {"FINISHED"}
    pts, _ = _sampled_points(sc)
    assert np.abs(pts[:, 2] - 1.0).max() < 1e-5  # the plane's only
    for o in sc.objects:
        o.select_set(o in (grid, ball))
    capfd.readouterr()
    assert bpy.ops.npbgpp.points_from_meshes(count=200, seed=3) == {"FINISHED"}
    assert ("skipped: Icosphere (disabled in renders, and its parent 'Grid' instances it (Instancing: Vertices / "
            "Faces): renders show it nowhere)") in capfd.readouterr().out


def _read_during_a_cycles_render(sc, read: Callable[[Any], Any]) -> Any:
    """``read(depsgraph)`` of the depsgraph of a tiny Cycles render of ``sc`` (its engine put back
    after): Blender's own answer of what a render holds."""
    from blender_addon.datagen.render import _render_tiny
    from blender_addon.datagen.surface_points import during_a_render

    engine, sc.render.engine = sc.render.engine, "CYCLES"
    try:
        return during_a_render(sc, lambda: _render_tiny(sc), read)
    finally:
        sc.render.engine = engine


def test_points_from_meshes_simulated_parent_instances_no_child_disabled_in_renders(scene):
    """A plane holding a simulation (Cloth, so sampled as it stands, not as a copy) instancing its
    children at its 4 vertices (Instancing: Vertices): a ball 2 above and one disabled in
    renders 5 above. Blender's own answer, the depsgraph of a render: it holds the first ball's
    4 instances and none of the second's. Points from Selected Meshes of the plane agrees: points
    on the plane and on the first ball's instances, none on the second's (the viewport's
    depsgraph holds them; they were sampled when the plane was not a copy)."""
    sc = scene["scene"]
    bpy.ops.mesh.primitive_plane_add(size=4.0)
    grid = bpy.context.active_object
    grid.name, grid.instance_type = "Grid", "VERTS"
    grid.modifiers.new("Cloth", "CLOTH")
    balls = []
    for name, up in (("Shown", 2.0), ("Hidden", 5.0)):
        bpy.ops.mesh.primitive_ico_sphere_add(subdivisions=1, radius=0.3)
        balls.append(bpy.context.active_object)
        balls[-1].name, balls[-1].parent, balls[-1].location = name, grid, (0.0, 0.0, up)
    balls[1].hide_render = True
    instanced = _read_during_a_cycles_render(sc, lambda dg: sorted(
        i.object.original.name for i in dg.object_instances if i.is_instance and i.parent.original == grid))
    assert instanced == ["Shown"] * 4
    for o in sc.objects:
        o.select_set(o == grid)
    assert bpy.ops.npbgpp.points_from_meshes(count=600, seed=1) == {"FINISHED"}
    pts, _ = _sampled_points(sc)
    assert pts[:, 2].max() < 2.0 + 0.3 + 1e-4, pts[:, 2].max()  # none on the hidden ball's instances
    assert (pts[:, 2] > 1.0).any() and (np.abs(pts[:, 2]) < 1e-5).any()  # on the shown ball's and the plane


def _joined_to_an_instance_of(obj: Any, collection: Any = None) -> Callable[[Any, Any], Any]:
    """For :func:`nodes_modifier`: the geometry joined to an Object Info instance (As Instance)
    of ``obj`` (None: a test sets the "Object Info" node's object later) and, given
    ``collection``, then to a Collection Info instance of it."""

    def join_them(tree, geometry):
        join, info = tree.nodes.new("GeometryNodeJoinGeometry"), tree.nodes.new("GeometryNodeObjectInfo")
        info.inputs["As Instance"].default_value = True
        if obj is not None:
            info.inputs["Object"].default_value = obj
        sockets = [geometry, info.outputs["Geometry"]]
        if collection is not None:
            collection_info = tree.nodes.new("GeometryNodeCollectionInfo")
            collection_info.inputs["Collection"].default_value = collection
            sockets.append(collection_info.outputs[0])
        for socket in sockets:  # joined in this order
            tree.links.new(socket, join.inputs[0])
        return join.outputs[0]

    return join_them


@pytest.mark.parametrize("instances", ["particles", "particles_path", "particles_hidden", "nodes", "nodes_child",
                                       "none"])
def test_points_from_meshes_names_a_child_its_parent_instances_nowhere(scene, instances, capfd):
    """A plane instancing its child ball at its 4 vertices (Instancing: Vertices) whose own
    ``instances`` take their place: hair rendering a cube, or Geometry Nodes putting an Ico
    Sphere on its points ("none": Geometry Nodes passing its mesh through, the control);
    "particles_path": the hair shown as Path in viewports, where the plane then instances the
    ball (measured in bpy 5.0.1; those instances were sampled with the plane); "particles_hidden":
    the ball disabled in renders too (it was said to be instanced by the plane); "nodes_child":
    Geometry Nodes joining to the plane's mesh an Object Info instance (As Instance) of the
    ball itself, which no depsgraph holds (it was said to be instanced by the plane).
    Blender's own answer, the depsgraph of a render: it holds the ball nowhere, neither at its
    own place nor as the plane's instances (the 4 of them in the control). The ball selected
    alone is named as shown nowhere (it was told to select the plane, whose points have no
    ball), in the control as shown where the plane instances it; selected with the plane, it is
    named as shown nowhere (it was left out silently) and no point lies on it."""
    sc = scene["scene"]
    bpy.ops.mesh.primitive_cube_add(size=0.2, location=(0.0, 0.0, -50.0))
    cube = bpy.context.active_object
    bpy.ops.mesh.primitive_plane_add(size=4.0)
    grid = bpy.context.active_object
    grid.name, grid.instance_type = "Grid", "VERTS"
    if instances.startswith("particles"):
        grid.modifiers.new("Cubes", "PARTICLE_SYSTEM")
        settings = grid.particle_systems[0].settings
        settings.type, settings.count, settings.hair_length = "HAIR", 3, 1.0
        settings.render_type, settings.instance_object = "OBJECT", cube
        settings.display_method = "PATH" if instances == "particles_path" else "RENDER"
    else:

        def spheres(tree, geometry):
            """An Ico Sphere put on each of the plane's points ("nodes"), an instance of the ball
            (its Object Info node's object set below) joined to the plane ("nodes_child"), or the
            plane passed through."""
            if instances == "nodes_child":
                return _joined_to_an_instance_of(None)(tree, geometry)
            if instances != "nodes":
                return geometry
            put, sphere = tree.nodes.new("GeometryNodeInstanceOnPoints"), tree.nodes.new("GeometryNodeMeshIcoSphere")
            tree.links.new(geometry, put.inputs["Points"])
            tree.links.new(sphere.outputs[0], put.inputs["Instance"])
            return put.outputs[0]

        nodes_modifier(grid, "Spheres", spheres)
    bpy.ops.mesh.primitive_ico_sphere_add(subdivisions=1, radius=0.3)
    ball = bpy.context.active_object
    ball.name, ball.parent, ball.location = "Ball", grid, (0.0, 0.0, 2.0)
    ball.hide_render = instances == "particles_hidden"
    if instances == "nodes_child":
        bpy.data.node_groups["Spheres"].nodes["Object Info"].inputs["Object"].default_value = ball
    rendered = _read_during_a_cycles_render(sc, lambda dg: [
        i.object.original.name for i in dg.object_instances if i.object.original == ball])
    assert rendered == ([] if instances != "none" else ["Ball"] * 4)  # all 4 the plane's instances
    for o in sc.objects:
        o.select_set(o == ball)
    nowhere = "renders show it nowhere: its parent 'Grid' (Instancing: Vertices / Faces) hides it at its own place"
    where = "renders show it only where its parent 'Grid' instances it"
    with pytest.raises(RuntimeError, match=re.escape(f"Ball ({where if instances == 'none' else nowhere}")):
        bpy.ops.npbgpp.points_from_meshes(count=10)
    if instances == "none":
        return
    for o in sc.objects:
        o.select_set(o in (grid, ball))
    capfd.readouterr()
    assert bpy.ops.npbgpp.points_from_meshes(count=300, seed=1) == {"FINISHED"}
    assert f"skipped: Ball ({nowhere}" in capfd.readouterr().out
    pts, _ = _sampled_points(sc)
    assert pts[:, 2].max() < 2.0 - 0.3, pts[:, 2].max()  # none on the ball (at z 2, radius 0.3)


def _collection_of(obj: Any, name: str) -> Any:
    """A new collection ``name``, in no scene, holding ``obj`` alone, moved out of its
    collections and to the origin: an instancer of it shows ``obj`` at the instancer's place,
    and nothing shows it at its own."""
    members = bpy.data.collections.new(name)
    for collection in obj.users_collection:
        collection.objects.unlink(obj)
    members.objects.link(obj)
    obj.location = (0.0, 0.0, 0.0)
    return members


def _grid_with_a_child_making_cubes(sc, makes: str) -> tuple[Any, Any, Any]:
    """``(grid, child, cube)``: a plane "Grid" instancing its child "Child" at its 4 vertices
    (Instancing: Vertices), the child 2 above it making instances of a cube of size 0.2 of its
    own: an empty instancing a collection of the cube ("collection"), a ball whose Geometry
    Nodes join an Object Info instance (As Instance) of the cube ("object_info"), a ball
    instancing its own child cube at its vertices ("child")."""
    bpy.ops.mesh.primitive_cube_add(size=0.2, location=(0.0, 0.0, -50.0))
    cube = bpy.context.active_object
    bpy.ops.mesh.primitive_plane_add(size=4.0)
    grid = bpy.context.active_object
    grid.name, grid.instance_type = "Grid", "VERTS"
    if makes == "collection":
        child = bpy.data.objects.new("Child", None)
        sc.collection.objects.link(child)
        child.instance_type, child.instance_collection = "COLLECTION", _collection_of(cube, "Members")
    else:
        bpy.ops.mesh.primitive_ico_sphere_add(subdivisions=1, radius=0.3)
        child = bpy.context.active_object
        child.name = "Child"
        if makes == "object_info":
            nodes_modifier(child, "WithCube", _joined_to_an_instance_of(cube))  # the ball's mesh and the cube
        else:
            child.instance_type = "VERTS"
            cube.parent = child
    child.parent, child.location = grid, (0.0, 0.0, 2.0)
    return grid, child, cube


@pytest.mark.parametrize("grid_nodes", [False, True])
@pytest.mark.parametrize("makes", ["collection", "object_info", "child"])
def test_points_from_meshes_names_a_child_that_instances_as_shown_where_its_parent_instances_it(scene, makes,
                                                                                                 grid_nodes, capfd):
    """A plane instancing its child at its 4 vertices (Instancing: Vertices), the child making
    instances of its own: an empty instancing a collection of a cube ("collection"), a ball whose
    Geometry Nodes join an Object Info instance (As Instance) of a cube ("object_info"), a ball
    instancing its own child cube at its vertices ("child"); ``grid_nodes``: the plane also has
    Geometry Nodes passing its mesh through (so its instances are read one by one: without
    Geometry Nodes it can make none of its own). Blender's own answer, the depsgraph
    of a render: it holds the child at the plane's 4 vertices, and the cubes the child makes
    there too, their parent the plane. The child selected alone is named as shown where the
    plane instances it (it was named as shown nowhere: the cubes were read as the plane's
    Geometry Nodes' instances); selected with the plane, it is not named as skipped, and a ball
    is sampled as the plane's instances."""
    from blender_addon.datagen.surface_points import instances_its_children

    sc = scene["scene"]
    grid, child, cube = _grid_with_a_child_making_cubes(sc, makes)
    if grid_nodes:
        nodes_modifier(grid, "PassThrough", lambda tree, geometry: geometry)
    rendered, instanced = _read_during_a_cycles_render(sc, lambda dg: (sorted(
        i.object.original.name for i in dg.object_instances if i.is_instance and i.parent.original == grid
        and i.object.original in (child, cube)),
        instances_its_children(grid, dg)))
    assert rendered.count("Child") == 4 and "Cube" in rendered, rendered  # at the plane's 4 vertices
    assert instanced
    for o in sc.objects:
        o.select_set(o == child)
    where = "renders show it only where its parent 'Grid' instances it"
    with pytest.raises(RuntimeError, match=re.escape(f"Child ({where}")):
        bpy.ops.npbgpp.points_from_meshes(count=10)
    for o in sc.objects:
        o.select_set(o in (grid, child))
    capfd.readouterr()
    assert bpy.ops.npbgpp.points_from_meshes(count=300, seed=1) == {"FINISHED"}
    assert "Child (" not in capfd.readouterr().out
    if makes != "collection":  # an empty has no surface (the collection's cubes are not sampled here)
        pts, _ = _sampled_points(sc)
        assert (pts[:, 2] > 1.0).any()  # on the balls at the plane's vertices


@pytest.mark.parametrize("grid_nodes", [False, True])
def test_points_from_meshes_names_a_child_instancer_not_shown_as_shown_where_its_parent_instances_it(scene,
                                                                                                     grid_nodes):
    """The plane of :func:`_grid_with_a_child_making_cubes`, its child an empty instancing a
    collection of a cube, with Show Instancer off for viewports and renders; ``grid_nodes``: the
    plane also has Geometry Nodes passing its mesh through. Blender's own answer, the depsgraph
    of a render and the viewport's: no entry of the empty, the cube at each of the plane's 4
    vertices, its parent the plane. The plane instances its children (it was found not to: the
    cubes were read as its Geometry Nodes' instances, though it has none, or with Geometry
    Nodes, though they make none), and the empty selected alone is named as shown where the
    plane instances it, not as shown nowhere."""
    from blender_addon.datagen.surface_points import instances_its_children

    sc = scene["scene"]
    grid, child, cube = _grid_with_a_child_making_cubes(sc, "collection")
    child.show_instancer_for_viewport = child.show_instancer_for_render = False
    if grid_nodes:
        nodes_modifier(grid, "PassThrough", lambda tree, geometry: geometry)

    def held(dg):
        """The names of the plane's instances of its child and of the cube, and whether it instances its children."""
        return (sorted(i.object.original.name for i in dg.object_instances if i.is_instance
                       and i.parent.original == grid and i.object.original in (child, cube)),
                instances_its_children(grid, dg))

    assert _read_during_a_cycles_render(sc, held) == held(bpy.context.evaluated_depsgraph_get()) == (["Cube"] * 4,
                                                                                                    True)
    for o in sc.objects:
        o.select_set(o == child)
    where = "renders show it only where its parent 'Grid' instances it"
    with pytest.raises(RuntimeError, match=re.escape(f"Child ({where}")):
        bpy.ops.npbgpp.points_from_meshes(count=10)


def _cube_centres(dg, grid, cube) -> np.ndarray:
    """World centres (K, 3) of the instances of ``cube`` that the depsgraph ``dg`` holds with
    ``grid`` as their instancer: directly or nested in its children's instances."""
    return np.array([tuple(i.matrix_world.translation) for i in dg.object_instances
                     if i.is_instance and i.parent is not None and i.parent.original == grid
                     and i.object.original == cube]).reshape(-1, 3)


# a point on a cube of size 0.2 lies at most its half-diagonal from its centre; a ball's surface
# (an Ico Sphere of radius 0.3 at subdivision 1) lies farther from the cube inside it
ON_CUBE = 0.1 * 3 ** 0.5 + 1e-4


def _kept_and_other_cubes() -> dict[str, Any]:
    """Two cubes of size 0.2, "Kept" and "Other", far below the scene (50 and 60 down), to be
    instanced by the tests' instancers and told apart by name."""
    cubes = {}
    for name, down in (("Kept", -50.0), ("Other", -60.0)):
        bpy.ops.mesh.primitive_cube_add(size=0.2, location=(0.0, 0.0, down))
        cubes[name] = bpy.context.active_object
        cubes[name].name = name
    return cubes


def _scene_points_match_the_render(sc, grid, cubes: dict[str, Any], rendered: dict[str, int],
                                   in_viewport: dict[str, int]) -> None:
    """The cubes ``grid`` instances as a Cycles render's depsgraph holds them (``rendered``: how many of
    each) and as the viewport's does (``in_viewport``); then scene points: each cube the render holds has
    points on every instance, a cube it leaves out has none."""
    from blender_addon.datagen.surface_points import sample_surface_points

    held = _read_during_a_cycles_render(sc, lambda dg: {n: len(_cube_centres(dg, grid, c)) for n, c in cubes.items()})
    assert held == rendered, held
    depsgraph = bpy.context.evaluated_depsgraph_get()
    centres = {name: _cube_centres(depsgraph, grid, cube) for name, cube in cubes.items()}
    assert {name: len(c) for name, c in centres.items()} == in_viewport
    pts, _ = sample_surface_points(sc, 4000, seed=3)
    for name, count in rendered.items():
        near = np.linalg.norm(pts[:, None, :] - centres[name][None, :, :], axis=2).min(axis=0)
        if count:
            assert (near <= ON_CUBE).all(), (name, near)  # each cube the render holds has points
        else:
            assert (near > ON_CUBE).all(), (name, near)


@pytest.mark.parametrize("selected", ["grid", "grid_and_child"])
@pytest.mark.parametrize("makes", ["collection", "object_info", "child"])
def test_points_from_meshes_samples_what_a_vertex_instanced_child_instances(scene, makes, selected):
    """The plane of :func:`_grid_with_a_child_making_cubes` selected (with its child, which is
    then sampled through a copy of its own, "grid_and_child"). Blender's own answer, the
    depsgraph of a render: the child at the plane's 4 vertices, and the cubes it makes there
    (4, or with a ball instancing its child cube at its 12 vertices 48, and 4 more the plane
    instances of its grandchild directly), their parent the plane. Points from Selected Meshes
    samples each of those cubes (none was: only the plane's instances of its children were
    taken), and their share of the 2,000 points is their share of the area renders show
    (Blender's own face areas), within 5 standard deviations: the cubes a child's copy makes
    are not taken twice with the child's own."""
    sc = scene["scene"]
    grid, child, cube = _grid_with_a_child_making_cubes(sc, makes)
    centres, balls = _read_during_a_cycles_render(sc, lambda dg: (_cube_centres(dg, grid, cube), sum(
        1 for i in dg.object_instances if i.is_instance and i.parent.original == grid and i.object.original == child)))
    assert len(centres) == (52 if makes == "child" else 4) and balls == 4, (len(centres), balls)
    for o in sc.objects:
        o.select_set(o == grid or selected == "grid_and_child" and o == child)
    count = 2000
    assert bpy.ops.npbgpp.points_from_meshes(count=count, seed=3) == {"FINISHED"}
    pts, _ = _sampled_points(sc)
    assert len(pts) == count
    near = np.linalg.norm(pts[:, None, :] - centres[None, :, :], axis=2)
    assert (near.min(axis=0) <= ON_CUBE).all(), (near.min(axis=0) <= ON_CUBE).sum()  # each cube has points
    on_cubes = int((near.min(axis=1) <= ON_CUBE).sum())

    def area(obj) -> float:
        """Blender's own area of ``obj``'s faces (unscaled)."""
        return sum(p.area for p in obj.data.polygons) if obj.type == "MESH" else 0.0

    cubes_area = len(centres) * area(cube)
    share = cubes_area / (cubes_area + area(grid) + balls * area(child))
    spread = 5 * (count * share * (1 - share)) ** 0.5
    assert abs(on_cubes - count * share) < spread, (on_cubes, count * share, spread)


@pytest.mark.parametrize("kind", ["collection_hidden", "object_info_hidden", "child_cube_hidden",
                                  "collection_member_hidden", "collection_of_members_hidden",
                                  "collection_particles_path", "collection_hidden_instancer_not_shown",
                                  "collection_member_hidden_instancer_not_shown"])
def test_scene_points_leave_out_what_a_child_renders_do_not_instance_makes(scene, kind):
    """The plane of :func:`_grid_with_a_child_making_cubes` (its child an empty instancing a
    collection of a cube, or a ball making an Object Info instance of it), the child disabled in
    renders ("_hidden"; "child_cube_hidden": the ball's child cube, which the plane also
    instances at its vertices, is disabled in renders; "collection_member_hidden" /
    "collection_of_members_hidden": the empty's cube / its collection is; "_instancer_not_shown":
    the empty with Show Instancer off for viewports and renders, so that no depsgraph holds an
    entry of it, only the cubes it makes), or the plane's hair
    rendering another cube and shown as Path in viewports ("particles_path"). Blender's own
    answer, the depsgraph of a render: it holds none of those cubes (nor the child at the
    plane's vertices, but where only what the child makes is disabled); the viewport's holds
    them all.
    Points of the scene as the viewport evaluates it (``sample_surface_points``' default), and
    Points from Selected Meshes of the plane holding a simulation (Cloth: sampled as it stands,
    not as a copy), lie on none of those cubes (they did: the child's instances were left out,
    not the cubes nested in them; with no entry of the empty, the cubes were taken as in none)."""
    from blender_addon.datagen.surface_points import sample_surface_points

    sc = scene["scene"]
    grid, child, cube = _grid_with_a_child_making_cubes(sc, kind.split("_")[0] if kind != "object_info_hidden"
                                                        else "object_info")
    if kind.endswith("_instancer_not_shown"):
        child.show_instancer_for_viewport = child.show_instancer_for_render = False
        kind = kind.removesuffix("_instancer_not_shown")
    if kind in ("child_cube_hidden", "collection_member_hidden"):
        cube.hide_render = True
    elif kind == "collection_of_members_hidden":
        child.instance_collection.hide_render = True
    elif kind.endswith("_hidden"):
        child.hide_render = True
    else:
        bpy.ops.mesh.primitive_cube_add(size=0.5, location=(0.0, 0.0, -80.0))
        grid.modifiers.new("Cubes", "PARTICLE_SYSTEM")
        settings = grid.particle_systems[0].settings
        settings.type, settings.count, settings.hair_length = "HAIR", 3, 1.0
        settings.render_type, settings.instance_object = "OBJECT", bpy.context.active_object
        settings.display_method = "PATH"
    assert len(_read_during_a_cycles_render(sc, lambda dg: _cube_centres(dg, grid, cube))) == 0
    centres = _cube_centres(bpy.context.evaluated_depsgraph_get(), grid, cube)
    assert len(centres) == (52 if kind == "child_cube_hidden" else 4)
    pts, _ = sample_surface_points(sc, 2000, seed=3)
    assert np.linalg.norm(pts[:, None, :] - centres[None, :, :], axis=2).min() > ON_CUBE
    grid.modifiers.new("Cloth", "CLOTH")
    for o in sc.objects:
        o.select_set(o == grid)
    assert bpy.ops.npbgpp.points_from_meshes(count=2000, seed=3) == {"FINISHED"}
    pts, _ = _sampled_points(sc)
    assert np.linalg.norm(pts[:, None, :] - centres[None, :, :], axis=2).min() > ON_CUBE


@pytest.mark.parametrize("kind", ["collection_info", "instancer_not_shown"])
def test_scene_points_tell_which_child_a_nested_instance_is_in_where_a_level_has_no_entry(scene, kind):
    """A plane instancing its children at its 4 vertices (Instancing: Vertices), where an
    instance nested in a child's has no depsgraph entry of its own at one level. "collection_info":
    a ball child disabled in renders whose Geometry Nodes join its mesh, a collection instance
    (Collection Info) of a cube "Kept" ... here left out, and an Object Info instance of a cube
    "Other"; the collection instance is no entry (measured in bpy 5.0.1: the cube in it has a
    persistent_id one place longer than the Object Info cube's). "instancer_not_shown": an empty
    disabled in renders instancing a collection of "Other", and an empty instancing a
    collection of "Kept" with Show Instancer off in viewports (measured in bpy 5.0.1: the
    viewport's depsgraph holds no entry of that empty, only the cubes it makes). Blender's own
    answer, the depsgraph of a render: with the ball disabled in renders, neither cube at the
    plane's vertices; with the empties, the 4 "Kept" cubes and no "Other". Points of the scene
    as the viewport evaluates it lie on no cube the render leaves out, and on each it holds
    (the "Kept" cubes were taken for the ball's Geometry Nodes' and kept, or for the hidden
    empty's and left out: the entry read before was taken for the one they are nested in)."""

    sc = scene["scene"]
    cubes = _kept_and_other_cubes()
    bpy.ops.mesh.primitive_plane_add(size=4.0)
    grid = bpy.context.active_object
    grid.name, grid.instance_type = "Grid", "VERTS"

    if kind == "collection_info":
        bpy.ops.mesh.primitive_ico_sphere_add(subdivisions=1, radius=0.3)
        ball = bpy.context.active_object
        members = _collection_of(cubes["Kept"], "Kepts")
        # the ball's mesh joined to an instance of "Other" and one of the collection
        nodes_modifier(ball, "WithCubes", _joined_to_an_instance_of(cubes["Other"], members))
        ball.parent, ball.location, ball.hide_render = grid, (0.0, 0.0, 2.0), True
        rendered = {"Kept": 0, "Other": 0}
    else:
        for name, up in (("Other", 2.0), ("Kept", 3.0)):
            empty = bpy.data.objects.new("Empty" + name, None)
            sc.collection.objects.link(empty)
            empty.instance_type, empty.instance_collection = "COLLECTION", _collection_of(cubes[name], name + "s")
            empty.parent, empty.location = grid, (0.0, 0.0, up)
        bpy.data.objects["EmptyOther"].hide_render = True
        bpy.data.objects["EmptyKept"].show_instancer_for_viewport = False
        rendered = {"Kept": 4, "Other": 0}
    _scene_points_match_the_render(sc, grid, cubes, rendered, {"Kept": 4, "Other": 4})


def _linked_back(sc, objects: list[Any], path: str) -> list[Any]:
    """``objects`` (all in ``sc``'s collection) written to the library ``path`` in a collection
    of their own, removed, and that collection linked back into ``sc``: the linked objects, by
    name (not editable; what they instance is linked too)."""
    holder = bpy.data.collections.new("Library objects")
    for obj in objects:
        holder.objects.link(obj)
    bpy.data.libraries.write(path, {holder}, fake_user=True)
    names = [obj.name for obj in objects]
    for obj in objects:
        bpy.data.objects.remove(obj)
    bpy.data.collections.remove(holder)
    with bpy.data.libraries.load(path, link=True) as (_, into):
        into.collections = ["Library objects"]
    sc.collection.children.link(into.collections[0])
    linked = {obj.name: obj for obj in into.collections[0].objects}
    return [linked[name] for name in names]


@pytest.mark.parametrize(("makes", "selected"), [("collection", "grid"), ("collection", "grid_and_child"),
                                                 ("object_info", "grid_and_child"),
                                                 ("collection", "grid_and_linked_child"),
                                                 ("object_info", "grid_and_linked_child")])
def test_points_from_meshes_samples_what_a_child_with_show_instancer_off_instances(scene, tmp_path, makes,
                                                                                   selected):
    """The plane of :func:`_grid_with_a_child_making_cubes`, its child making cubes (an empty
    instancing a collection of a cube, or a ball whose Geometry Nodes make an instance of it)
    with Show Instancer off for viewports and renders, selected (with the child, which is then
    sampled through a copy of its own; "grid_and_linked_child": both linked from a library,
    not editable). Blender's own answer, the depsgraph of a render: the cube at the plane's 4
    vertices (the ball's own faces not). Points from Selected Meshes samples each of them, and
    their share of the 2,000 points is their share of the area (Blender's own face areas)
    within 5 standard deviations (with the child selected none was sampled: its copy, a second
    such child of the plane making the same cubes, left both sets untold apart, and once the
    original was shown meanwhile, still the linked ones); the child's Show Instancer for
    viewports is off after (the user's object is not changed)."""
    sc = scene["scene"]
    grid, child, cube = _grid_with_a_child_making_cubes(sc, makes)
    child.show_instancer_for_viewport = child.show_instancer_for_render = False
    if selected == "grid_and_linked_child":
        grid, child = _linked_back(sc, [grid, child], str(tmp_path / "library.blend"))
        cube = next(o for o in bpy.data.objects if o.library is not None and o.name == cube.name)
        assert not child.is_editable
    centres = _read_during_a_cycles_render(sc, lambda dg: _cube_centres(dg, grid, cube))
    assert len(centres) == 4
    for o in sc.objects:
        o.select_set(o == grid or selected != "grid" and o == child)
    count = 2000
    assert bpy.ops.npbgpp.points_from_meshes(count=count, seed=3) == {"FINISHED"}
    assert not child.show_instancer_for_viewport
    pts, _ = _sampled_points(sc)
    near = np.linalg.norm(pts[:, None, :] - centres[None, :, :], axis=2)
    assert (near.min(axis=0) <= ON_CUBE).all()  # each cube has points
    on_cubes = int((near.min(axis=1) <= ON_CUBE).sum())
    cubes_area = len(centres) * sum(p.area for p in cube.data.polygons)
    share = cubes_area / (cubes_area + sum(p.area for p in grid.data.polygons))
    spread = 5 * (count * share * (1 - share)) ** 0.5
    assert abs(on_cubes - count * share) < spread, (on_cubes, count * share, spread)


def _empty_instancing(sc, cube: Any, parent: Any, up: float) -> Any:
    """A new empty "Empty<cube's name>" instancing a collection of ``cube`` alone, a child of
    ``parent`` standing ``up`` above it, with Show Instancer off for viewports and renders."""
    empty = bpy.data.objects.new("Empty" + cube.name, None)
    sc.collection.objects.link(empty)
    empty.instance_type, empty.instance_collection = "COLLECTION", _collection_of(cube, cube.name + "s")
    empty.parent, empty.location = parent, (0.0, 0.0, up)
    empty.show_instancer_for_viewport = empty.show_instancer_for_render = False
    return empty


@pytest.mark.parametrize("kind", ["nodes", "particles_path", "particles_shown_as_path", "two", "one_vertex"])
def test_scene_points_tell_which_child_with_show_instancer_off_a_nested_instance_is_in(scene, kind):
    """A parent instancing its children at its vertices (Instancing: Vertices), among them
    empties with Show Instancer off instancing a collection of a cube, which have no depsgraph
    entry of their own, only the cubes they make do. "nodes": a plane with Geometry Nodes
    passing its mesh through, its empty disabled in renders; "particles_path": the plane's hair
    rendered as Path, the empty disabled in renders; "particles_shown_as_path": the plane's hair
    rendering another cube, displayed as Path in viewports; "two": two such empties, of
    "Kept" and of "Other", the second disabled in renders; "one_vertex": a mesh of one vertex
    instancing a ball and then the empty, disabled in renders. Blender's own answer, the
    depsgraph of a render: the 4 "Kept" cubes of "two", no other cube of an empty (renders
    instance no child disabled in renders, nor what it makes; hair rendering a cube shows it in
    place of the children); the viewport's holds all those cubes. Points of the scene as the
    viewport evaluates it lie on no cube the render leaves out, and on each it holds (they were
    taken as the parent's own instances, in no child, or as nested in the ball: kept)."""

    sc = scene["scene"]
    cubes = _kept_and_other_cubes()
    if kind == "one_vertex":
        mesh = bpy.data.meshes.new("OneVertex")
        mesh.from_pydata([(1.0, 1.0, 0.0)], [], [])
        grid = bpy.data.objects.new("Grid", mesh)
        sc.collection.objects.link(grid)
        bpy.ops.mesh.primitive_ico_sphere_add(subdivisions=1, radius=0.3)
        ball = bpy.context.active_object
        ball.name, ball.parent, ball.location = "Ball", grid, (0.0, 0.0, 1.0)  # an entry before the empty's cubes
    else:
        bpy.ops.mesh.primitive_plane_add(size=4.0)
        grid = bpy.context.active_object
    grid.name, grid.instance_type = "Grid", "VERTS"
    if kind == "nodes":
        nodes_modifier(grid, "PassThrough", lambda tree, geometry: geometry)
    elif kind.startswith("particles"):
        bpy.ops.mesh.primitive_cube_add(size=0.5, location=(0.0, 0.0, -80.0))
        grid.modifiers.new("Hair", "PARTICLE_SYSTEM")
        settings = grid.particle_systems[0].settings
        settings.type, settings.count, settings.hair_length = "HAIR", 3, 1.0
        if kind == "particles_path":
            settings.render_type = "PATH"
        else:
            settings.render_type, settings.instance_object = "OBJECT", bpy.context.active_object
            settings.display_method = "PATH"
    shown = {"Kept": 4 if kind == "two" else 0, "Other": 0}
    if kind == "two":
        _empty_instancing(sc, cubes["Kept"], grid, 2.0)
    else:
        del cubes["Kept"], shown["Kept"]
    hidden = _empty_instancing(sc, cubes["Other"], grid, 3.0)
    hidden.hide_render = kind != "particles_shown_as_path"
    _scene_points_match_the_render(sc, grid, cubes, shown, {name: 1 if kind == "one_vertex" else 4 for name in cubes})


@pytest.mark.parametrize("makes", ["object_info", "ico_spheres", "points", "member", "nothing"])
def test_scene_points_leave_out_what_instances_hide_where_show_instancer_is_off_for_renders_only(scene, makes):
    """A ball (Ico Sphere of radius 0.3, 3 above the origin) with Show Instancer on for viewports
    and off for renders, whose Geometry Nodes join to its mesh an Object Info instance of a cube
    ("object_info"), Ico Spheres of radius 0.05 on its 12 vertices ("ico_spheres") or its
    vertices as points ("points"); "member": the first, as the member of a collection an empty
    instances there; "nothing": its mesh passed through. Blender's own answer, a render's
    depsgraph: no entry of the ball's mesh (the viewport's has one), the instances' and points'
    are there; the ball passed through is. Scene points from the viewport's depsgraph lie on no
    face of the ball away from its vertices (2,541 of 4,000 did, on a ball renders do not show)
    but the one passed through and, of the Ico Spheres, on each. The camera has the same flags:
    an object of no geometry is not asked for it."""
    from blender_addon.datagen.surface_points import rendered_own_points, sample_surface_points

    sc = scene["scene"]
    bpy.ops.mesh.primitive_cube_add(size=0.2, location=(0.0, 0.0, -50.0))
    cube = bpy.context.active_object
    bpy.ops.mesh.primitive_ico_sphere_add(subdivisions=1, radius=0.3, location=(0.0, 0.0, 3.0))
    ball = bpy.context.active_object
    corners = np.array([tuple(v.co) for v in ball.data.vertices]) + [0.0, 0.0, 3.0]

    def spheres_on_points(tree, geometry):
        join, put = tree.nodes.new("GeometryNodeJoinGeometry"), tree.nodes.new("GeometryNodeInstanceOnPoints")
        sphere = tree.nodes.new("GeometryNodeMeshIcoSphere")
        sphere.inputs["Radius"].default_value = 0.05
        tree.links.new(geometry, put.inputs["Points"])
        tree.links.new(sphere.outputs[0], put.inputs["Instance"])
        for socket in (geometry, put.outputs[0]):
            tree.links.new(socket, join.inputs[0])
        return join.outputs[0]

    def joined_to_points(tree, geometry):
        join = tree.nodes.new("GeometryNodeJoinGeometry")
        for socket in (geometry, _mesh_to_points(tree, geometry)):
            tree.links.new(socket, join.inputs[0])
        return join.outputs[0]

    make = {"ico_spheres": spheres_on_points, "points": joined_to_points,
            "nothing": lambda tree, geometry: geometry}.get(makes, _joined_to_an_instance_of(cube))
    nodes_modifier(ball, "Makes", make)
    ball.show_instancer_for_viewport, ball.show_instancer_for_render = True, False
    scene["camera"].show_instancer_for_render = False  # no geometry to hide (it raised a TypeError)
    if makes == "member":
        empty = bpy.data.objects.new("Instancer", None)
        sc.collection.objects.link(empty)
        empty.instance_type, empty.instance_collection = "COLLECTION", _collection_of(ball, "Balls")
        empty.location = (0.0, 0.0, 3.0)

    def balls_held(dg) -> int:
        """The entries of the ball's own mesh (itself, or the collection's member)."""
        return sum(1 for i in dg.object_instances if i.object.original == ball and i.object.type == "MESH"
                   and (not i.is_instance or makes == "member"))

    assert _read_during_a_cycles_render(sc, balls_held) == (makes == "nothing")
    assert balls_held(bpy.context.evaluated_depsgraph_get()) == 1
    pts, _ = sample_surface_points(sc, 4000, seed=3)
    from_centre = np.linalg.norm(pts - [0.0, 0.0, 3.0], axis=1)
    from_corners = np.linalg.norm(pts[:, None, :] - corners[None, :, :], axis=2).min(axis=1)
    on_faces = (from_centre > 0.2) & (from_centre < 0.31) & (from_corners > 0.06)
    assert on_faces.any() == (makes == "nothing")
    if makes == "ico_spheres":
        on_spheres = np.linalg.norm(pts[:, None, :] - corners[None, :, :], axis=2) <= 0.05 + 1e-4
        assert on_spheres.any(axis=0).all()
    if makes == "points":
        taken = rendered_own_points(bpy.context.evaluated_depsgraph_get())[0]  # the fixture's cloud's too
        assert (np.linalg.norm(taken[:, None, :] - corners[None, :, :], axis=2).min(axis=0) < 1e-4).all()


@pytest.mark.parametrize("instanced", ["EMPTY", "CURVE"])
def test_points_from_meshes_names_a_mesh_its_instances_hide_in_renders_as_not_shown_itself(scene, capfd, instanced):
    """A ball (Ico Sphere) with Show Instancer on for viewports and off for renders, whose
    Geometry Nodes join to its mesh an Object Info instance of an empty or of a curve with no
    Bevel nor Extrude (nothing to sample), selected with a plane. Blender's own answer, a
    render's depsgraph: no entry of the ball's or of what it makes with faces or points.
    Points from Selected Meshes samples the plane and names the ball as not shown itself in
    renders, the walk's rule (surface_points.hidden_by_its_instances), not as having no faces
    to sample (it has 20)."""
    from blender_addon.importers import NOT_SHOWN_ITSELF

    sc = scene["scene"]
    if instanced == "EMPTY":
        made = bpy.data.objects.new("Made", None)
    else:
        data = bpy.data.curves.new("Made", "CURVE")
        data.splines.new("POLY").points.add(1)
        made = bpy.data.objects.new("Made", data)
    sc.collection.objects.link(made)
    made.location = (0.0, 0.0, -50.0)
    plane = _plane_selected(sc)
    bpy.ops.mesh.primitive_ico_sphere_add(subdivisions=1, radius=0.3, location=(0.0, 0.0, 3.0))
    ball = bpy.context.active_object
    ball.name = "Ball"
    nodes_modifier(ball, "Makes", _joined_to_an_instance_of(made))
    ball.show_instancer_for_viewport, ball.show_instancer_for_render = True, False

    def sampled_of_ball(dg) -> int:
        """The faces and points of the entries standing for the ball."""
        return sum(len(i.object.data.polygons) if i.object.type == "MESH" else
                   len(i.object.data.points) if i.object.type == "POINTCLOUD" else 0
                   for i in dg.object_instances
                   if (i.parent if i.is_instance else i.object).original == ball)

    assert _read_during_a_cycles_render(sc, sampled_of_ball) == 0
    assert len(ball.data.polygons) == 20
    for o in sc.objects:
        o.select_set(o in (plane, ball))
    capfd.readouterr()
    assert bpy.ops.npbgpp.points_from_meshes(count=200, seed=1) == {"FINISHED"}
    out = capfd.readouterr().out
    assert f"skipped: Ball ({NOT_SHOWN_ITSELF})" in out, out
    pts, _ = _sampled_points(sc)
    assert len(pts) == 200 and (np.abs(pts[:, 2]) < 1e-5).all()


def test_scene_walk_asks_whether_particles_instance_in_renders_once_per_instancer(scene, monkeypatch):
    """Two grids of 9 vertices each instancing their child ball at their vertices (Instancing:
    Vertices), each with hair rendering a cube shown as Path in viewports. Blender's own
    answer, the viewport's depsgraph: 9 instances of each ball (renders show the cubes
    instead). The walk over what renders show leaves all 18 out, and reads each grid's
    particle settings once, not once per instance (a dense particle system makes thousands)."""
    from blender_addon.datagen import surface_points

    bpy.ops.mesh.primitive_cube_add(size=0.2, location=(0.0, 0.0, -50.0))
    cube = bpy.context.active_object
    grids, balls = [], []
    for name, x in (("GridA", -5.0), ("GridB", 5.0)):
        bpy.ops.mesh.primitive_grid_add(x_subdivisions=2, y_subdivisions=2, size=4.0, location=(x, 0.0, 0.0))
        grids.append(bpy.context.active_object)
        grids[-1].name, grids[-1].instance_type = name, "VERTS"
        grids[-1].modifiers.new("Cubes", "PARTICLE_SYSTEM")
        settings = grids[-1].particle_systems[0].settings
        settings.type, settings.count, settings.hair_length = "HAIR", 3, 1.0
        settings.render_type, settings.instance_object, settings.display_method = "OBJECT", cube, "PATH"
        bpy.ops.mesh.primitive_ico_sphere_add(subdivisions=1, radius=0.3)
        balls.append(bpy.context.active_object)
        balls[-1].parent, balls[-1].location = grids[-1], (0.0, 0.0, 2.0)
    depsgraph = bpy.context.evaluated_depsgraph_get()
    held = [i.object.original for i in depsgraph.object_instances if i.is_instance and i.object.original in balls]
    assert sorted(held.count(b) for b in balls) == [9, 9]
    asked: list[str] = []
    real = surface_points.particles_instance_in_renders
    monkeypatch.setattr(surface_points, "particles_instance_in_renders", lambda o: asked.append(o.name) or real(o))
    shown = [inst.object.original for inst, *_ in surface_points.rendered_entries(depsgraph)]
    assert not any(o in balls for o in shown) and cube in shown
    assert sorted(asked) == ["GridA", "GridB"]


def test_scene_walk_reads_each_objects_flags_afresh_on_every_walk(scene):
    """A plane instancing its child cube at its 4 vertices (Instancing: Vertices). The walk
    reads what its rules ask of an object once per walk (a dense instancer's entries are almost
    all of one child), so a change between two walks must be seen by the second: the cube
    disabled in renders is instanced nowhere (renders show none of it), then enabled again
    at the 4 vertices; the plane with Show Instancer for renders off has no entry of its own,
    then with it on again has one. Counts by hand: 4 vertices."""
    from blender_addon.datagen import surface_points

    bpy.ops.mesh.primitive_plane_add(size=4.0)
    plane = bpy.context.active_object
    plane.instance_type = "VERTS"
    bpy.ops.mesh.primitive_cube_add(size=0.3, location=(0.0, 0.0, 1.0))
    cube = bpy.context.active_object
    cube.parent = plane

    def walked() -> tuple[int, int]:
        """(instances of the cube, entries of the plane's own) the walk yields."""
        objects = [(inst.object.original, inst.is_instance)
                   for inst, *_ in surface_points.rendered_entries(bpy.context.evaluated_depsgraph_get())]
        return objects.count((cube, True)), objects.count((plane, False))

    assert walked() == (4, 1)
    cube.hide_render = True
    assert walked() == (0, 1)
    cube.hide_render = False
    plane.show_instancer_for_render = False
    assert walked() == (4, 0)
    plane.show_instancer_for_render = True
    assert walked() == (4, 1)


def test_points_from_meshes_samples_a_metaball_child_of_an_instancing_parent_where_renders_show_it(scene):
    """Two metaball children of a plane instancing its children at its 4 vertices (Instancing:
    Vertices): a ball of radius 0.5 standing at (0, 0, 2) and, 3 higher, one of a negative
    element only. Blender's own answer, the depsgraph of a render: no instance of either, the
    first's one mesh (the entry at its own place) holds a ball at each of the plane's 4
    vertices (z 2) and one at its own place (metaballs are polygonized by family, the
    parent's instances of its members included, and a metaball child is not hidden at its own
    place); the second has no mesh. The first selected alone: every point lies on one of those
    5 balls and each gets points (its copy keeps its parent); the second alone is named as
    having no surface, not told to select the plane (which has no instance of it to sample).
    The plane is found to instance its children where renders show them (the rule that tells
    apart a child its parent instances nowhere), though the render holds no instance of them."""
    from blender_addon.datagen.surface_points import instances_its_children

    sc = scene["scene"]
    bpy.ops.mesh.primitive_plane_add(size=4.0)
    grid = bpy.context.active_object
    grid.name, grid.instance_type = "Grid", "VERTS"
    centres = np.array([(x, y, 2.0) for x in (-2.0, 2.0) for y in (-2.0, 2.0)] + [(0.0, 0.0, 2.0)])
    balls = []
    for name, up, negative in (("Ball", 2.0, False), ("Hollow", 5.0, True)):
        data = bpy.data.metaballs.new(name)
        element = data.elements.new()
        element.radius, element.use_negative = 0.5, negative
        balls.append(bpy.data.objects.new(name, data))
        sc.collection.objects.link(balls[-1])
        balls[-1].parent, balls[-1].location = grid, (0.0, 0.0, up)

    def meshes(depsgraph) -> list:
        """(name, is an instance, world vertices of its mesh or None) of each entry of the balls."""
        return [(i.object.original.name, i.is_instance and i.parent.original == grid,
                 np.array([(i.matrix_world @ v.co)[:] for v in i.object.data.vertices])
                 if i.object.type == "MESH" else None)
                for i in depsgraph.object_instances if i.object.original in balls]

    rendered, instanced = _read_during_a_cycles_render(sc, lambda dg: (meshes(dg), instances_its_children(grid, dg)))
    assert sorted((name, by_grid, verts is not None) for name, by_grid, verts in rendered) == [
        ("Ball", False, False), ("Ball", False, True), ("Hollow", False, False)]
    assert instanced
    verts = next(v for name, _, v in rendered if name == "Ball" and v is not None)
    to_centre = np.linalg.norm(verts[:, None] - centres[None], axis=2)
    assert to_centre.min(axis=1).max() < 0.5 + 1e-3 and (to_centre < 0.5 + 1e-3).any(axis=0).all()
    for o in sc.objects:
        o.select_set(o == balls[0])
    assert bpy.ops.npbgpp.points_from_meshes(count=400, seed=1) == {"FINISHED"}
    pts, _ = _sampled_points(sc)
    to_centre = np.linalg.norm(pts[:, None] - centres[None], axis=2)
    assert to_centre.min(axis=1).max() < 0.5 + 1e-3, to_centre.min(axis=1).max()
    assert (to_centre < 0.5 + 1e-3).any(axis=0).all(), (to_centre < 0.5 + 1e-3).sum(axis=0)
    for o in sc.objects:
        o.select_set(o == balls[1])
    with pytest.raises(RuntimeError, match=re.escape("Hollow (no surface: its metaball elements enclose none")):
        bpy.ops.npbgpp.points_from_meshes(count=10)


@pytest.mark.parametrize("simulated", [None, "Grid", "Ball"])
def test_points_from_meshes_parent_and_its_selected_child_sample_each_instance_once(scene, simulated, capfd):
    """A plane instancing its child ball at its 4 vertices, both selected; the ball grows from
    0.3 to 0.8 in renders only (a Displace shown in renders only; in both when the ball holds
    a simulation, which is sampled as it stands). ``simulated``: the object holding a
    simulation (sampled as it stands, not as a copy): the plane (Cloth) or the ball (Soft Body).
    The child's copy keeps its parent, so the plane instanced both the child (as the viewport
    shows it) and the copy: each ball was sampled twice when the plane held a simulation, once
    too small; and only as the viewport shows it (the child's, not its copy's, instances) when
    neither did; a child holding a simulation was sampled nowhere. Blender's own answer, the
    depsgraph of a render: 4 instances of the grown ball. Every point lies on the plane or on
    one of them, each gets points, and their share of the points is their share of the area
    (each sampled once). The child is not named as skipped: it was sampled as the plane's."""
    from mathutils.bvhtree import BVHTree

    sc = scene["scene"]
    bpy.ops.mesh.primitive_plane_add(size=4.0)
    grid = bpy.context.active_object
    grid.name, grid.instance_type = "Grid", "VERTS"
    bpy.ops.mesh.primitive_ico_sphere_add(subdivisions=1, radius=0.3)
    ball = bpy.context.active_object
    ball.name, ball.parent, ball.location = "Ball", grid, (0.0, 0.0, 2.0)
    grow = ball.modifiers.new("Grow", "DISPLACE")
    grow.strength = 1.0  # no texture: every vertex 0.5 out along its normal
    grow.show_viewport = simulated == "Ball"
    if simulated == "Grid":
        grid.modifiers.new("Cloth", "CLOTH")
    elif simulated == "Ball":
        ball.modifiers.new("Soft", "SOFT_BODY")

    def instances(depsgraph) -> list[tuple[str, np.ndarray, list[tuple[int, ...]]]]:
        """The render's instances the plane makes: name, world vertices, faces."""
        return [(i.object.original.name, np.array([tuple(i.matrix_world @ v.co) for v in i.object.data.vertices]),
                 [tuple(p.vertices) for p in i.object.data.polygons])
                for i in depsgraph.object_instances if i.is_instance and i.parent.original == grid]

    rendered = _read_during_a_cycles_render(sc, instances)
    assert [name for name, _, _ in rendered] == ["Ball"] * 4
    assert all(np.isclose(np.linalg.norm(v - v.mean(axis=0), axis=1).max(), 0.8) for _, v, _ in rendered)
    balls = [BVHTree.FromPolygons([tuple(p) for p in v], faces) for _, v, faces in rendered]
    ball_area = sum(0.5 * np.linalg.norm(np.cross(v[f[1]] - v[f[0]], v[f[2]] - v[f[0]]))
                    for _, v, faces in rendered for f in faces)  # icosphere faces: triangles
    for o in sc.objects:
        o.select_set(o in (grid, ball))
    capfd.readouterr()
    assert bpy.ops.npbgpp.points_from_meshes(count=3000, seed=5) == {"FINISHED"}
    assert "skipped" not in capfd.readouterr().out
    pts, _ = _sampled_points(sc)
    on_ball = np.stack([_distances(bvh, pts) < 1e-4 for bvh in balls])
    on_plane = (np.abs(pts[:, 2]) < 1e-5) & (np.abs(pts[:, :2]) <= 2.0 + 1e-5).all(axis=1)
    assert (on_plane | on_ball.any(axis=0)).all(), (~(on_plane | on_ball.any(axis=0))).sum()
    assert on_ball.any(axis=1).all(), on_ball.sum(axis=1)
    share = on_ball.any(axis=0).mean()
    assert abs(share - ball_area / (ball_area + 16.0)) < 0.03, (share, ball_area / (ball_area + 16.0))


def _cube_and_hidden_sphere(sc, name: str, cube_size: float, radius: float, at: tuple[float, float, float],
                            sphere_up: float = 1.0):
    """A new collection ``name``, in no scene, of a cube (``cube_size`` wide, at ``at``) and a
    sphere of ``radius`` ``sphere_up`` above it, disabled in renders: the kit that collection
    instancing tests put somewhere. Returns (collection, cube, sphere)."""
    kit = bpy.data.collections.new(name)
    bpy.ops.mesh.primitive_cube_add(size=cube_size, location=at)
    cube = bpy.context.active_object
    bpy.ops.mesh.primitive_uv_sphere_add(radius=radius, location=(at[0], at[1], at[2] + sphere_up))
    sphere = bpy.context.active_object
    sphere.hide_render = True
    for obj in (cube, sphere):
        kit.objects.link(obj)
        sc.collection.objects.unlink(obj)
    return kit, cube, sphere


def test_points_from_meshes_leaves_out_a_particle_collection_member_disabled_in_renders(scene):
    """Hair particles instancing a whole collection of a cube and a sphere disabled in renders:
    the viewport's depsgraph holds the spheres' instances, renders do not (measured), so every
    point lies on the cubes Blender's own Make Instances Real gives with the sphere hidden."""
    sc = scene["scene"]
    kit, cube, sphere = _cube_and_hidden_sphere(sc, "Kit", 0.4, 0.5, (0.0, 0.0, -50.0))
    bpy.ops.mesh.primitive_plane_add(size=10.0)
    emitter = bpy.context.active_object
    emitter.show_instancer_for_render = False
    emitter.modifiers.new("Kits", "PARTICLE_SYSTEM")
    settings = emitter.particle_systems[0].settings
    settings.type, settings.count, settings.hair_length = "HAIR", 4, 1.0
    settings.render_type, settings.instance_collection, settings.use_whole_collection = "COLLECTION", kit, True
    bpy.context.view_layer.update()
    for o in sc.objects:
        o.select_set(o == emitter)
    assert bpy.ops.npbgpp.points_from_meshes(count=500, seed=5) == {"FINISHED"}
    pts, _ = _sampled_points(sc)
    sphere.hide_viewport = True  # the reference: the cubes alone made real
    cubes = _made_real_bvh(sc, emitter)
    assert (_distances(cubes, pts) < 1e-4).all(), (_distances(cubes, pts) >= 1e-4).sum()


def test_points_from_meshes_leaves_out_a_collection_info_member_disabled_in_renders(scene):
    """Geometry Nodes putting a collection (Collection Info) on each corner of a plane, the
    collection a cube (0.2 wide) and a sphere 3 above it disabled in renders: the viewport's
    depsgraph holds the spheres' instances, renders do not (measured), so every point lies on
    the cubes at the corners (the nodes output the instances only)."""
    sc = scene["scene"]
    kit, cube, sphere = _cube_and_hidden_sphere(sc, "Kit", 0.2, 0.2, (0.0, 0.0, 0.0), sphere_up=3.0)
    bpy.ops.mesh.primitive_plane_add(size=4.0)  # corners at (+-2, +-2, 0)
    plane = bpy.context.active_object
    tree, _ = collection_on_points_tree("Kits", kit)
    plane.modifiers.new("Kits", "NODES").node_group = tree
    for o in sc.objects:
        o.select_set(o == plane)
    assert bpy.ops.npbgpp.points_from_meshes(count=500, seed=6) == {"FINISHED"}
    pts, _ = _sampled_points(sc)
    corners = np.round(pts[:, :2] / 2.0) * 2.0
    assert (np.abs(corners) == 2.0).all() and (np.abs(pts - np.c_[corners, np.zeros(len(pts))]) <= 0.1 + 1e-5).all()
    assert len({tuple(c) for c in corners}) == 4


def test_points_from_meshes_samples_particles_as_renders_show_them(scene):
    """A plane emitting 10 hair particles that instance a ball, its Show Emitter off in renders
    (on in viewports) and its viewport Display Amount 40 %: renders show the 10 balls and not
    the plane, so every point lies on one of the balls Blender's own Make Instances Real gives
    at full Display Amount, and each of the 10 gets points (the viewport's 40 % gave 4, and the
    plane, 400 of the 400.5 area, nearly all). The user's settings are as they were after."""
    sc = scene["scene"]
    bpy.ops.mesh.primitive_ico_sphere_add(subdivisions=2, radius=1.0, location=(0.0, 0.0, -50.0))
    ball = bpy.context.active_object
    bpy.ops.mesh.primitive_plane_add(size=20.0)
    emitter = bpy.context.active_object
    emitter.modifiers.new("Balls", "PARTICLE_SYSTEM")
    settings = emitter.particle_systems[0].settings
    settings.type, settings.count, settings.hair_length = "HAIR", 10, 1.0
    settings.render_type, settings.instance_object, settings.particle_size = "OBJECT", ball, 0.2
    bpy.context.view_layer.update()
    balls = _made_real_bvh(sc, emitter, apart=True)  # before the viewport's display differs from renders
    assert len(balls) == 10
    settings.display_percentage = 40
    emitter.show_instancer_for_render = False
    for o in sc.objects:
        o.select_set(o == emitter)
    assert bpy.ops.npbgpp.points_from_meshes(count=1000, seed=2) == {"FINISHED"}
    pts, _ = _sampled_points(sc)
    on_ball = np.stack([_distances(bvh, pts) < 1e-4 for bvh in balls])
    assert on_ball.any(axis=0).all(), (~on_ball.any(axis=0)).sum()  # none on the plane
    assert on_ball.any(axis=1).all(), on_ball.sum(axis=1)  # all 10 balls, not the viewport's 4
    assert settings.display_percentage == 40 and emitter.show_instancer_for_viewport
    assert emitter.particle_systems[0].settings == settings and len(bpy.data.particles) == 1


def test_points_from_meshes_failing_after_copying_particle_settings_leaves_none(scene):
    """Nothing to sample on a plane whose Show Emitter is off in renders and whose particles
    instance a mesh of vertices only (after the plane's particle settings were copied at their
    render display): the error names the plane with that reason (not as a mesh without faces:
    it has one), and the temporary copies of the object and of its particle settings are gone,
    the user's settings as they were."""
    sc = scene["scene"]
    mesh = bpy.data.meshes.new("Dots")
    mesh.from_pydata([(0.0, 0.0, 0.0), (1.0, 0.0, 0.0)], [], [])
    dots = bpy.data.objects.new("Dots", mesh)
    sc.collection.objects.link(dots)
    bpy.ops.mesh.primitive_plane_add(size=2.0)
    emitter = bpy.context.active_object
    emitter.name, emitter.show_instancer_for_render = "Emitter", False
    emitter.modifiers.new("Dots", "PARTICLE_SYSTEM")
    settings = emitter.particle_systems[0].settings
    settings.type, settings.count, settings.hair_length = "HAIR", 5, 1.0
    settings.render_type, settings.instance_object, settings.display_percentage = "OBJECT", dots, 40
    bpy.context.view_layer.update()
    for o in sc.objects:
        o.select_set(o == emitter)
    objects, particles = set(bpy.data.objects), set(bpy.data.particles)
    with pytest.raises(RuntimeError, match=r"Nothing to sample points on or take points of: Emitter \(not shown "
                                           r"itself in renders \(Show Emitter / Show Instancer off\)"):
        bpy.ops.npbgpp.points_from_meshes(count=10)
    assert set(bpy.data.objects) == objects and set(bpy.data.particles) == particles
    assert emitter.particle_systems[0].settings == settings and settings.display_percentage == 40


def test_points_from_meshes_samples_emitted_particles_where_simulated(scene, capfd):
    """Emitted particles instancing a ball (radius 0.1), simulated to frame 20 (they fall below
    the plane emitting them, Show Emitter off for renders): every point lies on a ball where
    Blender's own depsgraph puts it at that frame (a temporary copy, having no simulation cache,
    put them where they are born, on the plane: measured in bpy 5.0.1), the plane is left out
    as renders leave it out, no warning is given, and the simulation is as it was."""
    sc = scene["scene"]
    bpy.ops.mesh.primitive_ico_sphere_add(radius=0.1, location=(0.0, 0.0, -50.0))
    ball = bpy.context.active_object
    ball.hide_render = True  # renders show it where the particles instance it only
    bpy.ops.mesh.primitive_plane_add(size=2.0)
    emitter = bpy.context.active_object
    emitter.name = "Emitter"
    emitter.show_instancer_for_render = False
    emitter.modifiers.new("Balls", "PARTICLE_SYSTEM")
    settings = emitter.particle_systems[0].settings
    settings.count, settings.frame_start, settings.frame_end, settings.lifetime = 20, 1, 5, 200
    settings.render_type, settings.instance_object = "OBJECT", ball
    settings.particle_size = 1.0  # the ball at its own size
    for frame in range(1, 21):
        sc.frame_set(frame)

    def centres() -> np.ndarray:
        depsgraph = bpy.context.evaluated_depsgraph_get()
        return np.array([tuple(i.matrix_world.translation) for i in depsgraph.object_instances
                         if i.is_instance and i.parent is not None and i.parent.original == emitter])

    fallen = centres()
    assert len(fallen) == 20 and fallen[:, 2].max() < -0.1  # the original's, simulated
    for o in sc.objects:
        o.select_set(o == emitter)
    capfd.readouterr()
    assert bpy.ops.npbgpp.points_from_meshes(count=300, seed=1) == {"FINISHED"}
    assert "WARNING" not in capfd.readouterr().out
    pts, _ = _sampled_points(sc)
    assert pts.shape == (300, 3)
    # the nearest ball centre: within the ball's radius (its faces lie between its inradius and 0.1)
    nearest = np.linalg.norm(pts[:, None, :] - fallen[None].astype(np.float32), axis=2).min(axis=1)
    assert nearest.max() < 0.1 + 1e-5 and nearest.min() > 0.07, (nearest.min(), nearest.max())
    np.testing.assert_allclose(centres(), fallen, atol=1e-6)  # the user's simulation kept


def _sinking(tree, geometry):
    """For :func:`nodes_modifier`: the geometry moved 0.1 down at each step of a simulation zone."""
    sim_in, sim_out = tree.nodes.new("GeometryNodeSimulationInput"), tree.nodes.new("GeometryNodeSimulationOutput")
    sim_in.pair_with_output(sim_out)
    move = tree.nodes.new("GeometryNodeTransform")
    move.inputs["Translation"].default_value = (0.0, 0.0, -0.1)
    tree.links.new(geometry, sim_in.inputs["Geometry"])
    tree.links.new(sim_in.outputs["Geometry"], move.inputs["Geometry"])
    tree.links.new(move.outputs["Geometry"], sim_out.inputs["Geometry"])
    return sim_out.outputs["Geometry"]


@pytest.mark.parametrize("kind", ["CLOTH", "SOFT_BODY", "SIMULATION_ZONE", "RIGID_BODY"])
def test_points_from_meshes_samples_a_simulation_at_the_frame(scene, capfd, kind):
    """A cloth grid (with a Subdivision at level 1, Render level 2), a falling soft-body sphere, a
    cube sinking in a Geometry Nodes simulation zone and a falling rigid-body cube, simulated to
    frame 20: every point lies on
    Blender's own evaluated mesh of the object at that frame (a temporary copy, having no
    simulation cache, showed the first step: measured in bpy 5.0.1, the cloth's copy reaches z
    -1.78 where it hangs at -1.46), the simulation is as it was, and for the cloth a warning
    names the Subdivision, sampled at its viewport level."""
    sc = scene["scene"]
    if kind == "CLOTH":
        bpy.ops.mesh.primitive_grid_add(x_subdivisions=10, y_subdivisions=10, size=2.0)
        obj = bpy.context.active_object
        obj.modifiers.new("Cloth", "CLOTH")
        sub = obj.modifiers.new("Sub", "SUBSURF")
        sub.levels, sub.render_levels = 1, 2
    elif kind == "SOFT_BODY":
        bpy.ops.mesh.primitive_ico_sphere_add()
        obj = bpy.context.active_object
        obj.modifiers.new("Soft", "SOFT_BODY")
        obj.soft_body.use_goal = False  # falls freely
    elif kind == "SIMULATION_ZONE":
        bpy.ops.mesh.primitive_cube_add()
        obj = bpy.context.active_object
        nodes_modifier(obj, "Sink", _sinking)
    else:
        bpy.ops.mesh.primitive_cube_add()
        obj = bpy.context.active_object
        bpy.ops.rigidbody.object_add()  # falls freely (its copy stood at z 0: measured in bpy 5.0.1)
    obj.name = "Simulated"
    _, start_bvh = _bvh_of_evaluated(obj)
    for frame in range(1, 21):
        sc.frame_set(frame)
    count, simulated_bvh = _bvh_of_evaluated(obj)
    z_min = min(simulated_bvh.find_nearest(Vector((0.0, 0.0, -100.0)))[0].z, 0.0)
    assert z_min < -1.1  # it moved from its first step (cube's -1 then -1.1; the grid's 0)
    for o in sc.objects:
        o.select_set(o == obj)
    capfd.readouterr()
    assert bpy.ops.npbgpp.points_from_meshes(count=300, seed=2) == {"FINISHED"}
    out = capfd.readouterr().out
    pts, _ = _sampled_points(sc)
    assert pts.shape == (300, 3)
    on_simulated = _distances(simulated_bvh, pts)
    assert on_simulated.max() < 1e-4, on_simulated.max()
    assert (_distances(start_bvh, pts) > 1e-2).mean() > 0.5  # not the unsimulated shape
    after_count, after_bvh = _bvh_of_evaluated(obj)
    assert after_count == count and _distances(after_bvh, pts).max() < 1e-4  # its cache kept
    if kind == "CLOTH":
        assert ("'Simulated' holds a simulation ('Cloth'): sampled as the viewport shows it at frame 20, with its "
                "viewport settings where renders differ: modifier 'Sub' has levels 1, render_levels 2.") in out, out
    else:
        assert "WARNING" not in out, out
    assert [o.name for o in bpy.data.objects if o.name.startswith("NPBG++ sampled")] == []


def test_points_from_meshes_samples_an_instanced_collection(scene, capfd):
    """An empty (moved, turned, scaled 2) instancing a collection whose cube it renders, selected
    beside a plane: the cube is sampled where the empty shows it, every point on the plane or on
    the cube Make Instances Real gives, the Points shared by world-space area (plane 4, cube 24);
    the collection's own cube, elsewhere, gets none, nor does its sphere disabled in renders, and
    its cube hidden in viewports (which renders show) is named in a warning. A plain empty is
    still named as skipped, and so is an empty instancing an empty collection, each with why."""
    sc = scene["scene"]
    plane = _plane_selected(sc)
    bpy.ops.mesh.primitive_cube_add(size=1.0, location=(0.0, 5.0, 0.0))
    cube = bpy.context.active_object
    kept = bpy.data.collections.new("Kept")
    kept.objects.link(cube)
    sc.collection.objects.unlink(cube)
    # renders leave out the collection's objects disabled in renders, the viewport's depsgraph those
    # hidden in viewports (measured): the first is not sampled, the second named in a warning
    bpy.ops.mesh.primitive_uv_sphere_add(radius=1.0, location=(0.0, 5.0, 3.0))
    not_rendered = bpy.context.active_object
    not_rendered.name, not_rendered.hide_render = "NotRendered", True
    bpy.ops.mesh.primitive_cube_add(size=1.0, location=(0.0, 5.0, -3.0))
    viewport_hidden = bpy.context.active_object
    viewport_hidden.name, viewport_hidden.hide_viewport = "ViewportHidden", True
    for obj in (not_rendered, viewport_hidden):
        kept.objects.link(obj)
        sc.collection.objects.unlink(obj)
    instancer = bpy.data.objects.new("Instancer", None)
    instancer.instance_type, instancer.instance_collection = "COLLECTION", kept
    instancer.location, instancer.rotation_euler, instancer.scale = (0.0, -5.0, 3.0), (0.0, 0.0, 0.4), (2.0, 2.0, 2.0)
    nothing = bpy.data.objects.new("InstancesNothing", None)
    nothing.instance_type, nothing.instance_collection = "COLLECTION", bpy.data.collections.new("Empty")
    plain = bpy.data.objects.new("Plain", None)
    for o in (instancer, nothing, plain):
        sc.collection.objects.link(o)
    bpy.context.view_layer.update()
    for o in sc.objects:
        o.select_set(o in (plane, instancer, nothing, plain))
    capfd.readouterr()
    assert bpy.ops.npbgpp.points_from_meshes(count=2000, seed=1) == {"FINISHED"}
    out = capfd.readouterr().out
    assert "Plain (no geometry: an empty, light, camera or the like)" in out, out
    assert "InstancesNothing (an empty instancing a collection with no surfaces nor points)" in out, out
    assert "Instancer" not in out.split("skipped:")[1].splitlines()[0], out
    assert "'Instancer' instances 'ViewportHidden', which renders show and viewports hide: not sampled" in out, out
    pts, _ = _sampled_points(sc)
    on_plane = (np.abs(pts[:, 2]) < 1e-5) & (np.abs(pts[:, :2]) <= 1.0 + 1e-5).all(axis=1)
    not_rendered.hide_viewport = True  # the reference: the cube alone made real
    on_cube = _distances(_made_real_bvh(sc, instancer), pts) < 1e-4
    assert len(pts) == 2000 and (on_plane | on_cube).all() and not (on_plane & on_cube).any()
    share = on_plane.mean()  # 4 of 28 by area; binomial standard deviation ~0.008
    assert abs(share - 4 / 28) < 0.04, share


def test_points_from_meshes_leaves_out_a_nested_collection_instance_disabled_in_renders(scene):
    """An empty instancing a collection that holds an empty instancing another collection, which
    holds a cube and a sphere disabled in renders: the viewport's depsgraph holds the nested
    sphere's instance, renders do not show it, so every point lies on the cube where the two
    empties put it (5 up from its own place); the sphere, 3 above it, gets none (was sampled:
    only the top collection's flags were read)."""
    sc = scene["scene"]
    inner, cube, sphere = _cube_and_hidden_sphere(sc, "Inner", 1.0, 1.0, (0.0, 0.0, 0.0), sphere_up=3.0)
    outer = bpy.data.collections.new("Outer")
    nested = bpy.data.objects.new("Nested", None)
    nested.instance_type, nested.instance_collection, nested.location = "COLLECTION", inner, (0.0, 0.0, 2.0)
    outer.objects.link(nested)
    top = bpy.data.objects.new("Top", None)
    top.instance_type, top.instance_collection, top.location = "COLLECTION", outer, (0.0, 0.0, 3.0)
    sc.collection.objects.link(top)
    bpy.context.view_layer.update()
    for o in sc.objects:
        o.select_set(o == top)
    assert bpy.ops.npbgpp.points_from_meshes(count=500, seed=4) == {"FINISHED"}
    pts, _ = _sampled_points(sc)
    assert len(pts) == 500
    assert (np.abs(pts - np.array([0.0, 0.0, 5.0])) <= 0.5 + 1e-5).all(), np.abs(pts[:, 2] - 5.0).max()


def _pure_material(name: str, rgb: tuple[float, float, float]):
    """A material named ``name`` of base colour ``rgb`` (0 or 1 per channel: the same in linear
    and sRGB), with nodes or without."""
    mat = bpy.data.materials.get(name) or bpy.data.materials.new(name)
    mat.diffuse_color = (*rgb, 1.0)
    bsdf = mat.node_tree.nodes.get("Principled BSDF") if mat.node_tree else None
    if bsdf is not None:
        bsdf.inputs["Base Color"].default_value = (*rgb, 1.0)
    return mat


def _scatter_tree(tree_object, realize: bool = False):
    """Geometry Nodes that keep their mesh and put on each of its vertices an instance of
    ``tree_object`` (scaled 0.5, turned 0.3 about Z) and one of a blue Ico Sphere (radius 0.3,
    moved up 1); with ``realize``, the same made real (Realize Instances) as one mesh."""
    tree = bpy.data.node_groups.new("Scatter", "GeometryNodeTree")
    tree.interface.new_socket("Geometry", in_out="INPUT", socket_type="NodeSocketGeometry")
    tree.interface.new_socket("Geometry", in_out="OUTPUT", socket_type="NodeSocketGeometry")
    nodes, link = tree.nodes, tree.links.new
    given, join = nodes.new("NodeGroupInput"), nodes.new("GeometryNodeJoinGeometry")
    info = nodes.new("GeometryNodeObjectInfo")
    info.inputs["Object"].default_value, info.inputs["As Instance"].default_value = tree_object, True
    trees = nodes.new("GeometryNodeInstanceOnPoints")
    trees.inputs["Scale"].default_value, trees.inputs["Rotation"].default_value = (0.5, 0.5, 0.5), (0.0, 0.0, 0.3)
    link(given.outputs[0], trees.inputs["Points"])
    link(info.outputs["Geometry"], trees.inputs["Instance"])
    ball = nodes.new("GeometryNodeMeshIcoSphere")
    ball.inputs["Radius"].default_value, ball.inputs["Subdivisions"].default_value = 0.3, 2
    blue = nodes.new("GeometryNodeSetMaterial")
    blue.inputs["Material"].default_value = _pure_material("Blue", (0.0, 0.0, 1.0))
    link(ball.outputs["Mesh"], blue.inputs["Geometry"])
    balls = nodes.new("GeometryNodeInstanceOnPoints")
    link(given.outputs[0], balls.inputs["Points"])
    link(blue.outputs[0], balls.inputs["Instance"])
    lift = nodes.new("GeometryNodeTranslateInstances")
    lift.inputs["Translation"].default_value = (0.0, 0.0, 1.0)
    link(balls.outputs[0], lift.inputs["Instances"])
    for part in (given.outputs[0], trees.outputs[0], lift.outputs[0]):
        link(part, join.inputs[0])
    out = join.outputs[0]
    if realize:
        real = nodes.new("GeometryNodeRealizeInstances")
        link(out, real.inputs[0])
        out = real.outputs[0]
    link(out, nodes.new("NodeGroupOutput").inputs[0])
    return tree


def test_points_from_meshes_samples_geometry_nodes_instances(scene):
    """A plane (4 x 4, moved) whose Geometry Nodes put on each corner an instance of a red cube object
    (scaled 0.5, turned) and of a blue Ico Sphere (not an object; moved up 1): every point lies
    on the same Geometry Nodes' Realize Instances mesh, with the colour of what it lies on
    (cube points: red, on the unit cube by the hand-made inverse transform; sphere points:
    blue, within 0.3 of a corner lifted by 1; plane points: mid grey), and the Points are
    shared by world-space area among the plane (16), the four cubes (4 x 6 x 0.25) and the four
    spheres (Blender's own area of the realized mesh's blue faces). The cube object itself,
    elsewhere and not selected, gets none."""
    from mathutils.bvhtree import BVHTree

    sc = scene["scene"]
    bpy.ops.mesh.primitive_cube_add(size=1.0, location=(20.0, 0.0, 0.0))
    cube = bpy.context.active_object
    cube.data.materials.append(_pure_material("Red", (1.0, 0.0, 0.0)))
    bpy.ops.mesh.primitive_plane_add(size=4.0, location=(1.0, 0.0, 0.5))  # corners at (1 +- 2, +-2, 0.5)
    terrain = bpy.context.active_object
    for o in sc.objects:
        o.select_set(o == terrain)
    terrain.modifiers.new("GN", "NODES").node_group = _scatter_tree(cube)
    bpy.context.view_layer.update()
    assert bpy.ops.npbgpp.points_from_meshes(count=3000, seed=3) == {"FINISHED"}
    pts, cols = _sampled_points(sc)
    # the reference: a copy whose nodes realize the instances, read by Blender
    real = terrain.copy()
    real.modifiers["GN"].node_group = _scatter_tree(cube, realize=True)
    sc.collection.objects.link(real)
    ev = real.evaluated_get(bpy.context.evaluated_depsgraph_get())
    mesh = ev.to_mesh()
    mesh.calc_loop_triangles()
    verts = [tuple(ev.matrix_world @ v.co) for v in mesh.vertices]
    bvh = BVHTree.FromPolygons(verts, [tuple(t.vertices) for t in mesh.loop_triangles])
    blue_index = [m.name if m else None for m in mesh.materials].index("Blue")
    sphere_area = sum(p.area for p in mesh.polygons if p.material_index == blue_index)  # moved only: world area
    ev.to_mesh_clear()
    assert _distances(bvh, pts).max() < 1e-4
    corners = np.array([(x, y, 0.5) for x in (-1.0, 3.0) for y in (-2.0, 2.0)])
    is_red = np.all(np.abs(cols - (1.0, 0.0, 0.0)) < 1e-3, axis=1)
    is_blue = np.all(np.abs(cols - (0.0, 0.0, 1.0)) < 1e-3, axis=1)
    is_grey = np.all(np.abs(cols - 0.8) < 1e-3, axis=1)
    assert (is_red | is_blue | is_grey).all()
    turn = np.array([[np.cos(0.3), np.sin(0.3), 0.0], [-np.sin(0.3), np.cos(0.3), 0.0], [0.0, 0.0, 1.0]])
    for p in pts[is_red]:  # back into the unit cube's frame: on its surface, |coordinate| max 0.5
        local = min((turn @ (p - c) / 0.5 for c in corners), key=lambda q: abs(np.abs(q).max() - 0.5))
        assert abs(np.abs(local).max() - 0.5) < 1e-4, local
    lifted = corners + (0.0, 0.0, 1.0)
    ball_gap = np.linalg.norm(pts[is_blue][:, None] - lifted[None], axis=2).min(axis=1)
    assert (ball_gap <= 0.3 + 1e-5).all() and (ball_gap > 0.2).all()
    assert (np.abs(pts[is_grey] - (1.0, 0.0, 0.5)) <= (2.0 + 1e-5, 2.0 + 1e-5, 1e-5)).all()
    areas = np.array([16.0, 4 * 6 * 0.25, sphere_area])
    want = areas / areas.sum()
    got = np.array([is_grey.mean(), is_red.mean(), is_blue.mean()])
    assert (np.abs(got - want) < 5 * np.sqrt(want * (1 - want) / len(pts))).all(), (got, want)
    assert is_red.sum() > 0 and is_blue.sum() > 0


def test_points_from_meshes_takes_the_points_geometry_nodes_make(scene):
    """A plane whose Geometry Nodes turn its vertices into points (Mesh to Points: a point
    cloud, which renders as points, and no faces): its 4 points are taken, at Blender's own
    evaluated positions, and it is not named as skipped."""
    sc = scene["scene"]
    plane = _plane_selected(sc)
    plane.location = (0.0, 0.0, 3.0)
    nodes_modifier(plane, "ToPoints", _mesh_to_points)
    ev = plane.evaluated_get(bpy.context.evaluated_depsgraph_get())
    geometry = ev.evaluated_geometry()  # its parts live as long as it does
    cloud = geometry.pointcloud
    want = np.array([tuple(plane.matrix_world @ Vector(a.vector)) for a in cloud.attributes["position"].data])
    assert want.shape == (4, 3)
    assert bpy.ops.npbgpp.points_from_meshes(count=10, seed=1) == {"FINISHED"}
    pts, _ = _sampled_points(sc)
    np.testing.assert_allclose(pts, want, atol=1e-6)


def test_points_from_meshes_warns_of_an_is_viewport_switch(scene, capfd):
    """A plane whose Geometry Nodes switch, by an Is Viewport node inside a nested group,
    between an Ico Sphere of radius 1 (viewports) and 2 (renders): Python evaluates the
    viewport's side, so the points lie on the radius-1 sphere, and a warning names the object
    and modifier; with the node muted, or the modifier off in renders, no warning."""
    sc = scene["scene"]
    plane = _plane_selected(sc)
    inner = bpy.data.node_groups.new("IsViewportInside", "GeometryNodeTree")
    inner.interface.new_socket("Viewport", in_out="OUTPUT", socket_type="NodeSocketBool")
    is_viewport = inner.nodes.new("GeometryNodeIsViewport")
    inner.links.new(is_viewport.outputs[0], inner.nodes.new("NodeGroupOutput").inputs[0])
    tree = bpy.data.node_groups.new("Spheres", "GeometryNodeTree")
    tree.interface.new_socket("Geometry", in_out="OUTPUT", socket_type="NodeSocketGeometry")
    nodes = tree.nodes
    small, big = nodes.new("GeometryNodeMeshIcoSphere"), nodes.new("GeometryNodeMeshIcoSphere")
    small.inputs["Radius"].default_value, big.inputs["Radius"].default_value = 1.0, 2.0
    switch = nodes.new("GeometryNodeSwitch")
    switch.input_type = "GEOMETRY"
    group = nodes.new("GeometryNodeGroup")
    group.node_tree = inner
    tree.links.new(group.outputs[0], switch.inputs["Switch"])
    tree.links.new(small.outputs["Mesh"], switch.inputs["True"])
    tree.links.new(big.outputs["Mesh"], switch.inputs["False"])
    tree.links.new(switch.outputs[0], nodes.new("NodeGroupOutput").inputs[0])
    modifier = plane.modifiers.new("Switched", "NODES")
    modifier.node_group = tree
    _, viewport_bvh = _bvh_of_evaluated(plane)
    capfd.readouterr()
    assert bpy.ops.npbgpp.points_from_meshes(count=50, seed=1) == {"FINISHED"}
    assert (f"Geometry Nodes of {plane.name!r} ('Switched') have an Is Viewport switch: sampled as viewports "
            "evaluate them") in capfd.readouterr().out
    pts, _ = _sampled_points(sc)
    assert _distances(viewport_bvh, pts).max() < 1e-4
    assert np.linalg.norm(pts, axis=1).max() < 1.01
    for change in ("mute", "show_render"):
        for o in sc.objects:
            o.select_set(o == plane)
        if change == "mute":
            is_viewport.mute = True
        else:
            is_viewport.mute, modifier.show_render = False, False
        assert bpy.ops.npbgpp.points_from_meshes(count=10, seed=1) == {"FINISHED"}
        assert "Is Viewport" not in capfd.readouterr().out, change


def test_points_from_meshes_takes_what_it_can_beside_a_flat_mesh(scene, capfd):
    """A plane squashed to no area (scale 0 on x: faces, but nothing to sample) selected with
    a Point Cloud object: the cloud's 6 points are taken and the plane is named as skipped
    with why, instead of the whole operation failing; beside a cube too, the cube gets all
    the sampled points and the plane is named."""
    sc = scene["scene"]
    flat = _plane_selected(sc)
    flat.name, flat.scale = "Flat", (0.0, 1.0, 1.0)
    local = np.random.default_rng(5).uniform(-1, 1, (6, 3))
    cloud = _point_cloud_object(sc, "Cloud", local)
    bpy.context.view_layer.update()
    for o in sc.objects:
        o.select_set(o in (flat, cloud))
    capfd.readouterr()
    assert bpy.ops.npbgpp.points_from_meshes(count=50, seed=1) == {"FINISHED"}
    out = capfd.readouterr().out
    assert "Took the 6 points of 'Cloud' into" in out, out
    assert "skipped: Flat (zero surface area: its faces are flat or scaled to nothing)" in out, out
    pts, _ = _sampled_points(sc)
    np.testing.assert_allclose(pts, _blender_points(cloud), atol=1e-5)
    bpy.ops.mesh.primitive_cube_add(size=1.0, location=(0.0, 6.0, 0.0))
    cube = bpy.context.active_object
    for o in sc.objects:
        o.select_set(o in (flat, cube))
    capfd.readouterr()
    assert bpy.ops.npbgpp.points_from_meshes(count=40, seed=1) == {"FINISHED"}
    out = capfd.readouterr().out
    assert "Sampled 40 points into" in out and "skipped: Flat (zero surface area" in out, out
    pts, _ = _sampled_points(sc)
    assert len(pts) == 40 and (np.abs(pts - [0.0, 6.0, 0.0]) <= 0.5 + 1e-5).all()


def test_points_from_meshes_warns_of_a_metaball_family_once(scene, capfd):
    """Blob.001 and Blob.002 selected, Blob (their family's basis) not: one warning names
    the family's unselected member for both selected members, not one warning each."""
    sc = scene["scene"]
    balls = []
    for name, x in (("Blob", 0.0), ("Blob.001", 1.2), ("Blob.002", 2.4)):
        bpy.ops.object.metaball_add(type="BALL", radius=1.0, location=(x, 0.0, 0.0))
        balls.append(bpy.context.active_object)
        balls[-1].name = name
    for o in sc.objects:
        o.select_set(o in balls[1:])
    capfd.readouterr()
    assert bpy.ops.npbgpp.points_from_meshes(count=50, seed=1) == {"FINISHED"}
    out = capfd.readouterr().out
    assert out.count(" in renders with ") == 1, out
    assert ("The metaballs 'Blob.001', 'Blob.002' merge in renders with 'Blob' of their family, which is not "
            "selected") in out, out


def test_points_from_meshes_samples_the_mesh_a_point_clouds_nodes_make(scene, capfd):
    """A Point Cloud object and a hair Curves object whose Geometry Nodes replace them by an
    Ico Sphere (radius 2 and 1, apart): they render that mesh, so its surface is sampled like
    a mesh's (the Points count shared by area), every point on Blender's own evaluated
    sphere of one of them, each sphere getting some; neither is named as skipped."""
    from mathutils.bvhtree import BVHTree

    if not hasattr(bpy.types.Object, "evaluated_geometry"):
        pytest.skip("Blender < 4.4 gives Python no evaluated geometry")
    sc = scene["scene"]
    objects = []
    for name, radius, x in (("Cloud", 2.0, -4.0), ("Hair", 1.0, 4.0)):
        if name == "Cloud":
            obj = _point_cloud_object(sc, name, np.zeros((3, 3)))
        else:
            obj = bpy.data.objects.new(name, bpy.data.hair_curves.new(name))
            sc.collection.objects.link(obj)
        tree = bpy.data.node_groups.new(f"Sphere{name}", "GeometryNodeTree")
        tree.interface.new_socket("Geometry", in_out="OUTPUT", socket_type="NodeSocketGeometry")
        sphere = tree.nodes.new("GeometryNodeMeshIcoSphere")
        sphere.inputs["Radius"].default_value, sphere.inputs["Subdivisions"].default_value = radius, 3
        tree.links.new(sphere.outputs["Mesh"], tree.nodes.new("NodeGroupOutput").inputs[0])
        obj.modifiers.new("GN", "NODES").node_group = tree
        obj.location = (x, 0.0, 0.0)
        objects.append(obj)
    bpy.context.view_layer.update()
    assert [o.type for o in objects] == ["POINTCLOUD", "CURVES"]
    bvhs = []
    for obj in objects:
        geometry = obj.evaluated_get(bpy.context.evaluated_depsgraph_get()).evaluated_geometry()
        mesh = geometry.mesh
        mesh.calc_loop_triangles()
        verts = [tuple(obj.matrix_world @ v.co) for v in mesh.vertices]
        bvhs.append(BVHTree.FromPolygons(verts, [tuple(t.vertices) for t in mesh.loop_triangles]))
    for o in sc.objects:
        o.select_set(o in objects)
    capfd.readouterr()
    assert bpy.ops.npbgpp.points_from_meshes(count=300, seed=2) == {"FINISHED"}
    out = capfd.readouterr().out
    assert "Sampled 300 points into" in out and "skipped" not in out, out
    pts, _ = _sampled_points(sc)
    on_cloud, on_hair = (_distances(bvh, pts) < 1e-4 for bvh in bvhs)
    assert (on_cloud | on_hair).all() and on_cloud.sum() > on_hair.sum() > 0


def test_import_bundle_creates_points_and_sets_scene(scene):
    sc = scene["scene"]
    bundle = str(scene["dir"] / "tiny.npbgpp")
    _tiny_bundle(bundle, scene["points"], scene["colors"])
    sc.npbgpp.output = "POINTS"
    assert bpy.ops.import_scene.npbgpp_bundle(filepath=bundle) == {"FINISHED"}
    assert sc.npbgpp.bundle == bundle and sc.npbgpp.output == "NEURAL"
    obj = sc.npbgpp.point_object
    from blender_addon.point_source import object_points

    pts, col = object_points(obj)
    np.testing.assert_allclose(pts, scene["points"], atol=1e-6)
    np.testing.assert_allclose(col, scene["colors"], atol=2e-3)
    with pytest.raises(RuntimeError, match="nope.npbgpp"):
        bpy.ops.import_scene.npbgpp_bundle(filepath=str(scene["dir"] / "nope.npbgpp"))


def test_import_splat_ply_gives_centres_and_dc_colours(scene):
    """A 3DGS-layout file through Blender's own PLY reader equals the core reader's cloud."""
    from plyfile import PlyData, PlyElement

    from blender_addon.point_source import object_points
    from npbgpp_core.ply import load_ply

    rng = np.random.default_rng(5)
    n = 40
    names = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2"] + [f"f_rest_{i}" for i in range(9)]
    names += ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    data = np.zeros(n, dtype=[(k, "f4") for k in names])
    for k in names:
        data[k] = rng.normal(size=n) * (3.0 if k.startswith("f_dc") else 1.0)
    path = str(scene["dir"] / "splat.ply")
    PlyData([PlyElement.describe(data, "vertex")]).write(path)
    assert bpy.ops.import_scene.npbgpp_ply(filepath=path, min_opacity=0.4) == {"FINISHED"}
    pts, col = object_points(scene["scene"].npbgpp.point_object)
    ref = load_ply(path, min_opacity=0.4)
    assert 0 < len(ref) < n
    np.testing.assert_allclose(pts, ref.points, atol=1e-6)
    np.testing.assert_allclose(col, ref.colors, atol=2e-3)
    assert (ref.colors == 0).any() and (ref.colors == 1).any()  # the clamp was exercised
    with pytest.raises(RuntimeError, match="no splat has opacity"):
        bpy.ops.import_scene.npbgpp_ply(filepath=path, min_opacity=1.0)


def test_import_splat_ply_without_opacity_keeps_every_splat(scene, capfd):
    """Some exporters drop ``opacity``: such a file came in as plain grey points (the DC
    colours lost). Now it equals the core reader's cloud (every splat, opacity 1) and a Min
    Opacity above 0 is reported as filtering nothing."""
    from test_ply import NO_OPACITY_PLY

    from blender_addon.point_source import object_points
    from npbgpp_core.ply import load_ply

    path = scene["dir"] / "no_opacity.ply"
    path.write_text(NO_OPACITY_PLY)
    capfd.readouterr()
    assert bpy.ops.import_scene.npbgpp_ply(filepath=str(path), min_opacity=0.4) == {"FINISHED"}
    printed = capfd.readouterr().out
    pts, col = object_points(scene["scene"].npbgpp.point_object)
    ref = load_ply(path)
    assert len(ref) == 3
    np.testing.assert_allclose(pts, ref.points, atol=1e-6)
    np.testing.assert_allclose(col, ref.colors, atol=2e-3)
    assert "imported 3 of 3 splats as points" in printed
    assert (f"Warning: {path}: this Gaussian-splat file has no opacity property: every splat is kept as opaque, "
            "min opacity 0.4 has nothing to filter") in printed
    assert bpy.ops.import_scene.npbgpp_ply(filepath=str(path), min_opacity=0.0) == {"FINISHED"}
    assert "Warning" not in capfd.readouterr().out


# 5 coloured vertices (the last in no face) and 2 triangles, as a meshed fused.ply holds them
_FACES_PLY_VERTICES = [(0.0, 0.0, 0.0, 255, 0, 0), (1.0, 0.0, 0.0, 0, 255, 0), (1.0, 1.0, 0.0, 0, 0, 255),
                       (0.0, 1.0, 0.5, 10, 20, 30), (5.0, 5.0, 5.0, 40, 50, 60)]
_FACES_PLY_FACES = [(0, 1, 2), (0, 2, 3)]


def _write_ply_with_faces(path, binary: bool) -> None:
    """A PLY written by hand (not by our writer nor plyfile): vertices with uchar colours
    and a face element, ascii or binary little-endian."""
    import struct

    head = ["ply", "format binary_little_endian 1.0" if binary else "format ascii 1.0",
            f"element vertex {len(_FACES_PLY_VERTICES)}", "property float x", "property float y", "property float z",
            "property uchar red", "property uchar green", "property uchar blue",
            f"element face {len(_FACES_PLY_FACES)}", "property list uchar int vertex_indices", "end_header"]
    body = b""
    for v in _FACES_PLY_VERTICES:
        body += struct.pack("<fffBBB", *v) if binary else (" ".join(map(str, v)) + "\n").encode()
    for f in _FACES_PLY_FACES:
        body += struct.pack("<Biii", 3, *f) if binary else ("3 " + " ".join(map(str, f)) + "\n").encode()
    path.write_bytes(("\n".join(head) + "\n").encode() + body)


@pytest.mark.parametrize("binary", [False, True])
def test_ply_with_faces_imports_its_vertices_as_points(scene, capfd, binary):
    """A PLY that also has faces: Import Point Cloud made a shaded mesh of it; now it is a
    point cloud of every vertex (the one in no face too) with its colour, as Import
    Dataset's Point Cloud reads the same file, and both reports say "2 faces ignored"."""
    from blender_addon.point_source import object_points

    sc = scene["scene"]
    want = np.array([v[:3] for v in _FACES_PLY_VERTICES], np.float32)
    want_colors = np.array([v[3:] for v in _FACES_PLY_VERTICES], np.float64) / 255.0
    path = scene["dir"] / "meshed.ply"
    _write_ply_with_faces(path, binary)
    capfd.readouterr()
    assert bpy.ops.import_scene.npbgpp_ply(filepath=str(path)) == {"FINISHED"}
    obj = sc.npbgpp.point_object
    assert obj.type == "POINTCLOUD" and obj.name == "meshed"
    pts, col = object_points(obj)
    np.testing.assert_allclose(pts, want, atol=1e-6)
    np.testing.assert_allclose(col, want_colors, atol=2e-3)
    assert (f"Info: Imported the points of {path} as 'meshed' (2 faces ignored: its 5 vertices are the points)."
            in capfd.readouterr().out)

    root, _ = _two_cloud_capture(scene, "meshed_capture")
    _write_ply_with_faces(root / "meshed.ply", binary)
    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(root), point_cloud="meshed.ply") == {"FINISHED"}
    pts, col = object_points(sc.npbgpp.point_object)
    np.testing.assert_allclose(pts, want, atol=1e-6)
    np.testing.assert_allclose(col, want_colors, atol=2e-3)
    assert ("Info: Imported 5 points and 1 cameras. (meshed.ply: 2 faces ignored; its vertices are the points)"
            in capfd.readouterr().out)
    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(root), point_cloud="a.ply") == {"FINISHED"}
    assert "ignored" not in capfd.readouterr().out  # a cloud of vertices alone: nothing to say


def test_splat_ply_into_a_new_file(addon, tmp_path):
    """The first import of a new file: the splat importer removed Blender's import and then
    walked the view layer's objects, which still listed it as None (AttributeError)."""
    from plyfile import PlyData, PlyElement

    from blender_addon.point_source import object_points

    names = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "rot_0"]
    data = np.zeros(5, dtype=[(k, ">f8") for k in names])  # big-endian doubles
    for k in names:
        data[k] = np.random.default_rng(1).normal(size=5)
    path = str(tmp_path / "first.ply")
    PlyData([PlyElement.describe(data, "vertex")], byte_order=">").write(path)
    bpy.ops.wm.read_homefile(use_empty=True)
    assert bpy.ops.import_scene.npbgpp_ply(filepath=path, min_opacity=0.0) == {"FINISHED"}
    obj = bpy.context.scene.npbgpp.point_object
    assert obj.name == "first" and [o.name for o in bpy.data.objects] == ["first"]
    pts, _ = object_points(obj)
    np.testing.assert_allclose(pts, np.stack([data[c] for c in "xyz"], 1), atol=1e-6)


@pytest.mark.parametrize("names, ply_type", [(("diffuse_red", "diffuse_green", "diffuse_blue"), "u1"),
                                              (("r", "g", "b"), "u2"), (("r", "g", "b"), "f4")])
def test_ply_colours_under_other_names_are_imported(scene, names, ply_type):
    """Blender's PLY reader takes red/green/blue only; files naming colours r/g/b or
    diffuse_* (read by the core reader) came in grey, without a word."""
    from plyfile import PlyData, PlyElement

    from blender_addon.point_source import object_points
    from npbgpp_core.ply import load_ply

    rng = np.random.default_rng(2)
    data = np.zeros(30, dtype=[(k, "f4") for k in "xyz"] + [(k, ply_type) for k in names])
    for k in "xyz":
        data[k] = rng.uniform(-1, 1, 30)
    top = {"u1": 255, "u2": 65535, "f4": 1.0}[ply_type]
    for k in names:
        data[k] = rng.uniform(0, top, 30) if ply_type == "f4" else rng.integers(0, top + 1, 30)
    path = str(scene["dir"] / "named.ply")
    PlyData([PlyElement.describe(data, "vertex")]).write(path)
    assert bpy.ops.import_scene.npbgpp_ply(filepath=path) == {"FINISHED"}
    pts, col = object_points(scene["scene"].npbgpp.point_object)
    ref = load_ply(path)
    assert col is not None
    np.testing.assert_allclose(pts, ref.points, atol=1e-6)
    np.testing.assert_allclose(col, ref.colors, atol=2e-3)
    attributes = scene["scene"].npbgpp.point_object.data.attributes
    assert not any(k in attributes for k in names)  # the raw values are not left behind


def test_ply_without_positions_names_what_is_missing(scene):
    """A PLY whose vertices have no x/y/z: the message names the missing properties (Blender's
    own importer only says 'failed importing, unknown error')."""
    path = str(scene["dir"] / "nopos.ply")
    with open(path, "w") as f:
        f.write("ply\nformat ascii 1.0\nelement vertex 2\nproperty float x\nproperty float w\nend_header\n1 2\n3 4\n")
    before = set(bpy.data.objects)
    with pytest.raises(RuntimeError, match=r"nopos.ply: its vertex element has no y, z \(properties: x, w\)"):
        bpy.ops.import_scene.npbgpp_ply(filepath=path)
    assert set(bpy.data.objects) == before


# --------------------------------------------------------------------------- Blender's UI
class _Layout:
    """Records what a panel's draw() offers (prop names), standing in for UILayout. A row or
    column is a layout of its own (its ``active`` and ``enabled`` are its own, as in
    Blender, and hold for its parent's too) that records into its root's lists; ``states``
    says, for each prop, whether it was drawn active and enabled."""

    def __init__(self, parent: _Layout | None = None) -> None:
        self.parent = parent
        root = parent.root if parent is not None else self
        self.root = root
        if parent is None:
            self.props: list[str] = []
            self.labels: list[str] = []
            self.operators: list[str] = []
            self.states: dict[str, tuple[bool, bool]] = {}
        self.use_property_split = self.use_property_decorate = False
        self.active = self.enabled = True

    def _state(self) -> tuple[bool, bool]:
        active, enabled, layout = True, True, self
        while layout is not None:
            active, enabled = active and layout.active, enabled and layout.enabled
            layout = layout.parent
        return active, enabled

    def prop(self, data, name, **kwargs) -> None:
        self.root.props.append(name)
        self.root.states[name] = self._state()

    def column(self, **kwargs) -> _Layout:
        return _Layout(self)

    row = column

    def label(self, text: str = "", **kwargs) -> None:
        self.root.labels.append(text)

    def operator(self, idname, **kwargs) -> None:
        self.root.operators.append(idname)


def _drawn(panel: str = "RENDER_PT_npbgpp_data", layout: Any = None, context: Any = None) -> Any:
    """``layout`` (a new :class:`_Layout` unless given) after the registered panel ``panel``
    (Render Properties > NPBG++ > Data unless named) drew into it in ``context`` (``bpy.context``
    unless given): what the panel offers now, drawn as Blender calls a panel's draw()."""
    layout = _Layout() if layout is None else layout
    getattr(bpy.types, panel).draw(type("P", (), {"layout": layout})(), bpy.context if context is None else context)
    return layout


def test_stock_panels_follow_blenders_engine_template(addon):
    """Every panel Blender tags BLENDER_RENDER shows for NPBG++ except a named exclusion
    list; View Layer > Passes offers the Depth pass; Film > Transparent, video encoding,
    colour management and post processing show; EEVEE's own panels stay hidden."""
    engine = sys.modules[f"{MODULE}.engine"]
    bpy.ops.wm.read_homefile(use_empty=True)
    sc = bpy.context.scene
    sc.render.engine = "NPBGPP"
    panels = {p.__name__: p for p in bpy.types.Panel.__subclasses__()}
    assert engine.EXCLUDED_PANELS <= set(panels)  # every exclusion names a real panel
    tagged = [n for n, p in panels.items() if "BLENDER_RENDER" in getattr(p, "COMPAT_ENGINES", ())]
    assert len(tagged) > 200
    for name in tagged:
        assert ("NPBGPP" in panels[name].COMPAT_ENGINES) == (name not in engine.EXCLUDED_PANELS), name
    for name in ("VIEWLAYER_PT_layer_passes", "VIEWLAYER_PT_npbgpp_passes", "RENDER_PT_opengl_film",
                 "RENDER_PT_color_management", "RENDER_PT_post_processing", "RENDER_PT_output",
                 "RENDER_PT_format", "RENDER_PT_frame_range", "RENDER_PT_stamp"):
        assert panels[name].poll(bpy.context), name
    for name in ("VIEWLAYER_PT_eevee_layer_passes_data", "VIEWLAYER_PT_workbench_layer_passes_data",
                 "RENDER_PT_freestyle", "RENDER_PT_eevee_film"):
        assert not panels[name].poll(bpy.context), name
    sc.render.image_settings.media_type = "VIDEO"
    sc.render.image_settings.file_format = "FFMPEG"
    assert panels["RENDER_PT_encoding"].poll(bpy.context) and panels["RENDER_PT_encoding_video"].poll(bpy.context)
    assert "use_pass_z" in _drawn("VIEWLAYER_PT_npbgpp_passes").props
    assert _drawn("RENDER_PT_opengl_film").props == ["film_transparent"]


def test_built_zip_passes_blenders_extension_validator(tmp_path):
    """The zip passes the validator behind ``blender -c extension validate`` (shipped in the
    bpy module); the same zip with a 66-character permission text is refused by it."""
    import importlib.util
    import zipfile

    sys.path.insert(0, ROOT)
    import build_addon

    scripts = bpy.utils.system_resource("SCRIPTS")
    spec = importlib.util.spec_from_file_location(
        "_npbgpp_blender_ext", os.path.join(scripts, "addons_core", "bl_pkg", "cli", "blender_ext.py"))
    blender_ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(blender_ext)
    tags = os.path.join(scripts, "modules", "_bpy_internal", "extensions", "tags.py")

    def validate(path: str) -> tuple[bool, list]:
        messages: list = []
        log = blender_ext.MessageLogger(lambda kind, data: messages.append((kind, data)) or False)
        ok = blender_ext.subcmd_author.validate(log, source_path=path, valid_tags_filepath=tags)
        return ok, [m for m in messages if m[0] in ("ERROR", "FATAL_ERROR", "WARN")]

    zip_path = build_addon.build(str(tmp_path / "dist"))
    assert validate(zip_path) == (True, [])
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(zip_path) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("blender_manifest.toml"):
                data = re.sub(rb'(?m)^files = "[^"]*"', b'files = "' + b"x" * 66 + b'"', data)
            dst.writestr(item, data)
    ok, errors = validate(str(bad))
    assert not ok and any("64 characters" in str(e[1]) for e in errors)


class _RedrawCounter:
    def __init__(self) -> None:
        self.redraws = 0

    def tag_redraw(self) -> None:
        self.redraws += 1


def test_viewport_rereads_points_only_when_the_point_object_changes(scene, monkeypatch):
    """Depsgraph updates that do not touch the point object (another object moved, a scene
    setting) reuse the points read before; moving or editing the point object re-reads them."""
    import importlib

    viewport = importlib.import_module(f"{MODULE}.viewport")  # imported lazily by the engine
    point_source = importlib.import_module(f"{MODULE}.point_source")
    reads = []
    real = point_source.object_points
    monkeypatch.setattr(point_source, "object_points", lambda *a, **k: reads.append(1) or real(*a, **k))
    sc = scene["scene"]
    other = bpy.data.objects.new("Other", None)
    sc.collection.objects.link(other)
    bpy.context.view_layer.update()
    session = viewport.ViewportSession(_RedrawCounter())

    def handler(_scene, depsgraph) -> None:
        session.scene_changed(None, depsgraph)

    bpy.app.handlers.depsgraph_update_post.append(handler)
    try:
        other.location.x = 1.0
        bpy.context.view_layer.update()
        assert len(reads) == 1 and session.snapshot.points is not None  # first snapshot reads them
        first_key = session.snapshot.points_key
        other.location.x = 2.0
        bpy.context.view_layer.update()
        sc.render.film_transparent = False
        bpy.context.view_layer.update()
        assert len(reads) == 1 and session.scene_version == 3
        assert session.snapshot.points_key == first_key
        sc.npbgpp.point_object.location.z = 0.5
        bpy.context.view_layer.update()
        assert len(reads) == 2
        np.testing.assert_allclose(session.snapshot.points, scene["points"] + [0.0, 0.0, 0.5], atol=1e-6)
        assert session.snapshot.points_key != first_key
    finally:
        bpy.app.handlers.depsgraph_update_post.remove(handler)


def test_refiner_kernels_setting_reaches_the_worker_and_the_status_says_what_ran(scene, monkeypatch):
    """Performance > Refiner Kernels (default Torch) travels in RenderFrame to the worker:
    F12 waits for fused kernels to compile, the viewport does not. The worker here has no
    GPU, so it runs torch and the viewport's status line says so."""
    import importlib

    from blender_addon.camera_bridge import scene_camera_geometry
    from npbgpp_core import protocol as P

    viewport = importlib.import_module(f"{MODULE}.viewport")
    worker_client = importlib.import_module(f"{MODULE}.worker_client")
    scene_snapshot = importlib.import_module(f"{MODULE}.scene_snapshot")
    sent = []
    forward = worker_client.ProcessWorker.request

    def recorded(self, req, *args, **kwargs):
        sent.append(req)
        return forward(self, req, *args, **kwargs)

    monkeypatch.setattr(worker_client.ProcessWorker, "request", recorded)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the worker inherits the environment
    sc, cam = scene["scene"], scene["camera"]
    assert sc.npbgpp.refiner_impl == "TORCH"
    bundle = str(scene["dir"] / "tiny.npbgpp")
    _tiny_bundle(bundle, scene["points"], scene["colors"])
    sc.npbgpp.output = "NEURAL"
    sc.npbgpp.bundle = bundle
    sc.npbgpp.refiner_impl = "TRITON"
    bpy.ops.render.render()
    frames = [r for r in sent if isinstance(r, P.RenderFrame)]
    assert [(r.refiner_impl, r.wait_for_kernels) for r in frames] == [("triton", True)]
    sent.clear()
    depsgraph = bpy.context.evaluated_depsgraph_get()
    geo = scene_camera_geometry(cam.evaluated_get(depsgraph), sc)
    session = viewport.ViewportSession(_RedrawCounter())
    session.snapshot = scene_snapshot.snapshot(sc, depsgraph)
    job = session.scheduler.request("view", geo.image_size)
    session._run(job, geo, session.snapshot, False)
    assert session.message == "" and session.frame is not None
    frames = [r for r in sent if isinstance(r, P.RenderFrame)]
    assert [(r.refiner_impl, r.wait_for_kernels) for r in frames] == [("triton", False)]
    assert session.status.startswith("refiner: torch (fused kernels "), session.status
    assert not session.recheck  # nothing compiling: no second render
    # While the worker compiles, a timer asks for the same view again (at full scale).
    session.recheck = True
    session.render_again()
    assert session.scheduler.shown is None and not session.recheck and session.engine.redraws == 1
    assert session.scheduler.request("view", geo.image_size).scale == 1.0


def test_empty_bundle_and_faceless_mesh_give_messages(scene):
    """A 0-point bundle and Points from Meshes on a mesh without faces (and a point cloud of
    no points) are refused with a sentence naming each object with why (no KeyError
    traceback), and nothing is added to the scene."""
    import torch

    from npbgpp_core.models import NPBGPlusPlus
    from npbgpp_core.scene import NeuralScene

    sc = scene["scene"]
    model = NPBGPlusPlus().eval()
    with torch.no_grad():
        empty = model.begin_scene(torch.zeros(0, 3)).finish()
    path = str(scene["dir"] / "empty.npbgpp")
    NeuralScene.from_aggregated(model, empty).save(path)
    before = set(bpy.data.objects)
    with pytest.raises(RuntimeError, match="empty holds no points: nothing to import") as info:
        bpy.ops.import_scene.npbgpp_bundle(filepath=path)
    assert "KeyError" not in str(info.value)
    assert set(bpy.data.objects) == before and sc.npbgpp.bundle == ""
    mesh = bpy.data.meshes.new("Edges")
    mesh.from_pydata([(0, 0, 0), (1, 0, 0), (0, 1, 0)], [(0, 1), (1, 2)], [])
    obj = bpy.data.objects.new("Edges", mesh)
    sc.collection.objects.link(obj)
    for o in sc.objects:
        o.select_set(o == obj)
    sc.render.use_simplify, sc.render.simplify_subdivision, sc.render.simplify_subdivision_render = True, 1, 4
    with pytest.raises(RuntimeError, match=r"Nothing to sample points on or take points of: Edges \(no faces to "
                                           "sample: a curve with no Bevel or Extrude, or a mesh of vertices or edges "
                                           "only") as info:
        bpy.ops.npbgpp.points_from_meshes(count=10)
    assert "KeyError" not in str(info.value)
    assert "NPBG++ sampled" not in str(info.value), info.value  # the user's object, not its temporary copy
    assert set(bpy.data.objects) == before | {obj}  # the temporary copy removed
    # a point cloud of no points, alone or beside that mesh: each named with why (was "no visible mesh surfaces")
    cloud = bpy.data.objects.new("NoPoints", bpy.data.pointclouds.new("NoPoints"))
    sc.collection.objects.link(cloud)
    for o in sc.objects:
        o.select_set(o == cloud)
    with pytest.raises(RuntimeError, match=r"^Error: Nothing to sample points on or take points of: NoPoints \(no "
                                           r"points\)\.\n?$"):
        bpy.ops.npbgpp.points_from_meshes(count=10)
    assert set(bpy.data.objects) == before | {obj, cloud}
    for o in sc.objects:
        o.select_set(o in (obj, cloud))
    with pytest.raises(RuntimeError, match=r"Nothing to sample points on or take points of: Edges \(no faces to "
                                           r"sample: .*\); NoPoints \(no points\)\.$"):
        bpy.ops.npbgpp.points_from_meshes(count=10)
    assert set(bpy.data.objects) == before | {obj, cloud}
    assert (sc.render.simplify_subdivision, sc.render.simplify_subdivision_render) == (1, 4)  # restored


def test_z_combine_with_a_cycles_cube_shows_no_speckles(scene):
    """A neural render of a densely sampled plane Z-combined (nearer Z wins, as Blender's
    Z Combine node) with a Cycles cube behind it: the raw point coverage has pinholes inside
    the plane, yet the neural Depth pass and alpha cover the whole plane, so no cube pixel
    shows through it."""
    sc, cam = scene["scene"], scene["camera"]
    rng = np.random.default_rng(5)
    n = 6400  # about 4 points per pixel of the plane's ~40x40 pixels: ~2% pinholes
    plane = np.stack([rng.uniform(-1, 1, n), np.zeros(n), rng.uniform(-1, 1, n)], 1).astype(np.float32)
    colors = rng.uniform(0, 1, (n, 3)).astype(np.float32)
    bundle = str(scene["dir"] / "plane.npbgpp")
    _tiny_bundle(bundle, plane, colors)
    assert bpy.ops.import_scene.npbgpp_bundle(filepath=bundle) == {"FINISHED"}
    exr = render_exr(sc, str(scene["dir"] / "neural.exr"))
    neural_depth, neural_alpha = exr["ViewLayer.Depth.Z"], passes(exr, "Combined")[..., 3]
    raw_alpha = passes(exr, "NPBG Points")[..., 3]
    # The plane's silhouette by Blender's own projection of a dense grid, shrunk by 2 pixels.
    g = np.linspace(-1, 1, 240)
    grid = np.stack(np.meshgrid(g, [0.0], g), -1).reshape(-1, 3)
    row, col, _ = expected_pixels(sc, cam, grid)
    silhouette = np.zeros((H, W), bool)
    ok = (row >= 0) & (row < H) & (col >= 0) & (col < W)
    silhouette[row[ok].astype(int), col[ok].astype(int)] = True
    interior = silhouette.copy()
    for dr in range(-2, 3):
        for dc in range(-2, 3):
            interior &= np.roll(np.roll(silhouette, dr, 0), dc, 1)
    assert interior.sum() > 500
    pinholes = interior & (raw_alpha == 0)
    assert pinholes.sum() >= 3  # the raw coverage has holes inside the plane
    for o in sc.objects:
        if o.type in ("MESH", "POINTCLOUD"):
            o.hide_render = True  # Cycles must not draw the points (nor would NPBG++ now, 4288026)
    bpy.ops.mesh.primitive_cube_add(size=3.0, location=(0.0, 2.0, 0.0))
    sc.render.engine = "CYCLES"
    sc.cycles.samples = 1
    sc.cycles.device = "CPU"
    sc.render.film_transparent = True
    cube = render_exr(sc, str(scene["dir"] / "cube.exr"))
    cube_depth, cube_alpha = cube["ViewLayer.Depth.Z"], passes(cube, "Combined")[..., 3]
    assert (cube_alpha[interior] > 0.99).all() and (cube_depth[interior] < 1e9).all()  # the cube fills the plane
    raw_depth = np.where(raw_alpha > 0, neural_depth, 1e10)
    assert (cube_depth[pinholes] < raw_depth[pinholes]).all()  # raw coverage: the cube shows through
    cube_wins = cube_depth < neural_depth
    assert not (cube_wins & interior).any()  # no speckles
    assert (neural_alpha[interior] == 1.0).all()


def test_densify_operator_on_an_imported_dataset(scene):
    """Import Dataset (Format: Detect) then Densify Points: a dense cloud on the true
    surface becomes the point object, saved next to the saved .blend; the dataset folder
    is left untouched (it may be read-only); an unsaved .blend without a path is refused."""
    from _mvs_scene import render as trace
    from _mvs_scene import ring_cameras, surface_distance, write_nerf

    from blender_addon.point_source import object_points
    from npbgpp_core.ply import load_ply

    cams = ring_cameras(6, size=(90, 120))
    root = scene["dir"] / "sphere"
    write_nerf(root, cams, [trace(c) for c in cams], sphere_only_alpha=True)
    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(root)) == {"FINISHED"}
    sc = scene["scene"]
    assert sc.npbgpp.dataset_format == "nerf_synthetic" and not sc.npbgpp.dataset_undistort
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    with pytest.raises(RuntimeError, match="save the .blend first"):
        bpy.ops.npbgpp.densify(max_points=3000)
    work = scene["dir"] / "work"
    work.mkdir()
    assert bpy.ops.wm.save_as_mainfile(filepath=str(work / "shot.blend")) == {"FINISHED"}
    sc = bpy.context.scene
    # two views can never give a point two other consistent views: said up front, nothing saved
    with pytest.raises(RuntimeError,
                       match="min_consistent=2 needs at least 3 views, got 2.*Max Views.*Min Consistent Views"):
        bpy.ops.npbgpp.densify(max_points=3000, max_views=2)
    assert not (work / "sphere_dense.ply").exists()
    assert bpy.ops.npbgpp.densify(max_points=3000) == {"FINISHED"}
    pts, col = object_points(sc.npbgpp.point_object)
    assert 500 < len(pts) <= 3000 and col is not None
    import torch

    assert (surface_distance(torch.as_tensor(pts), floor=False) < 0.035).float().mean() >= 0.9
    np.testing.assert_allclose(load_ply(work / "sphere_dense.ply").points, pts, atol=1e-5)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before  # nothing written into the dataset
    # Aggregate then uses the dense cloud, not the dataset's own points (it used to aggregate the
    # sparse cloud while the viewport showed the dense one), and the point object's ids index it.
    from blender_addon.point_source import point_ids
    from npbgpp_core.scene import NeuralScene

    assert bpy.path.abspath(sc.npbgpp.dataset_points) == str(work / "sphere_dense.ply")
    np.testing.assert_array_equal(point_ids(sc.npbgpp.point_object), np.arange(len(pts)))
    sc.npbgpp.weights = ""
    assert bpy.ops.npbgpp.aggregate(filepath=str(work / "dense.npbgpp")) == {"FINISHED"}
    bundle = NeuralScene.load(str(work / "dense.npbgpp"))
    np.testing.assert_allclose(bundle.points.numpy(), load_ply(work / "sphere_dense.ply").points, atol=1e-6)
    os.rename(work / "sphere_dense.ply", work / "moved.ply")
    with pytest.raises(RuntimeError, match="Dataset Points file .*sphere_dense.ply is gone"):
        bpy.ops.npbgpp.aggregate(filepath=str(work / "dense2.npbgpp"))
    assert not (work / "dense2.npbgpp").exists()
    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(root)) == {"FINISHED"}  # a new import: its own cloud
    assert bpy.context.scene.npbgpp.dataset_points == ""
    # The dense bundle imported next to the dataset's sparse object: its own object, not the sparse
    # one (whose ids 0..n-1 would have rendered only the first n dense points).
    sparse_obj = bpy.context.scene.npbgpp.point_object
    assert bpy.ops.import_scene.npbgpp_bundle(filepath=str(work / "dense.npbgpp")) == {"FINISHED"}
    obj = bpy.context.scene.npbgpp.point_object
    assert obj != sparse_obj and len(point_ids(obj)) == len(bundle.points)
    np.testing.assert_allclose(object_points(obj)[0], bundle.points.numpy(), atol=1e-6)
    with pytest.raises(RuntimeError, match="COLMAP|colmap|sparse"):
        bpy.ops.import_scene.npbgpp_dataset(directory=str(root), format="COLMAP")


def test_densify_rerun_replaces_its_own_cloud_in_the_dataset_folder(scene):
    """Densify Points into the dataset folder (a .blend saved there puts <name>_dense.ply
    there by default): a re-run replaces that earlier cloud, as the command line lets it
    (the add-on refused every existing file of the folder); the cloud the dataset loader
    reads (points3d.ply) is still refused, before any work, and left untouched."""
    from _mvs_scene import render as trace
    from _mvs_scene import ring_cameras, write_nerf

    from blender_addon.point_source import object_points
    from npbgpp_core.ply import load_ply, save_ply

    cams = ring_cameras(6, size=(45, 60))
    root = scene["dir"] / "sphere"
    write_nerf(root, cams, [trace(c) for c in cams], sphere_only_alpha=True)
    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(root)) == {"FINISHED"}
    assert bpy.ops.wm.save_as_mainfile(filepath=str(root / "shot.blend")) == {"FINISHED"}
    dense, sparse = root / "sphere_dense.ply", (root / "points3d.ply").read_bytes()
    save_ply(dense, np.zeros((3, 3), np.float32))  # an earlier run's cloud at the path Densify writes
    assert bpy.ops.npbgpp.densify(max_points=1000) == {"FINISHED"}
    again = load_ply(dense).points
    assert len(again) > 100
    np.testing.assert_allclose(object_points(bpy.context.scene.npbgpp.point_object)[0], again, atol=1e-5)
    with pytest.raises(RuntimeError, match=f"Densify failed: .*output {re.escape(str(root / 'points3d.ply'))} is an "
                                           "input of the scene"):
        bpy.ops.npbgpp.densify(filepath=str(root / "points3d.ply"))
    assert (root / "points3d.ply").read_bytes() == sparse


def test_densify_reads_and_keeps_the_datasets_chosen_point_cloud(scene):
    """A dataset imported with Point Cloud fused.ply (and a points3d.ply that is another
    cloud: a sphere of radius 10 around the scene): Densify Points reads fused.ply, as
    Aggregate does, so its depth ranges come from it and the dense points lie on the
    traced surface (from points3d.ply's the true depths are out of range); an output onto
    fused.ply is refused before any work and the file left as it was, also after a first
    Densify made its own cloud the Dataset Points."""
    from _mvs_scene import render as trace
    from _mvs_scene import ring_cameras, sphere_samples, surface_distance, write_nerf

    from blender_addon.point_source import object_points
    from npbgpp_core.ply import save_ply

    cams = ring_cameras(6, size=(45, 60))
    root = scene["dir"] / "sphere"
    write_nerf(root, cams, [trace(c) for c in cams], sphere_only_alpha=True)
    (root / "points3d.ply").rename(root / "fused.ply")
    save_ply(root / "points3d.ply", (sphere_samples(300) * 10).numpy())
    fused = (root / "fused.ply").read_bytes()
    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(root), point_cloud="fused.ply") == {"FINISHED"}

    refused = f"Output PLY {re.escape(str(root / 'fused.ply'))} is the Dataset Cloud, the cloud the dataset was"
    with pytest.raises(RuntimeError, match=refused):
        bpy.ops.npbgpp.densify(filepath=str(root / "fused.ply"))
    assert (root / "fused.ply").read_bytes() == fused

    assert bpy.ops.npbgpp.densify(max_points=1000, filepath=str(scene["dir"] / "dense.ply")) == {"FINISHED"}
    dense = object_points(bpy.context.scene.npbgpp.point_object)[0]
    assert len(dense) > 100
    assert float(surface_distance(dense).median()) < 0.05
    assert os.path.samefile(bpy.path.abspath(bpy.context.scene.npbgpp.dataset_points), scene["dir"] / "dense.ply")
    with pytest.raises(RuntimeError, match=refused):
        bpy.ops.npbgpp.densify(filepath=str(root / "fused.ply"))
    assert (root / "fused.ply").read_bytes() == fused


def test_densify_never_writes_over_a_cloud_the_dataset_reads_in_a_blend_without_dataset_cloud(scene):
    """A scene built the old way (a .blend saved before Dataset Cloud existed: the Point
    Cloud chosen at import, fused.ply, is recorded only as Dataset Points): Densify with
    fused.ply as its output was let through and replaced it; it is refused before any work,
    as is a Dataset Points the user set by hand and the format's own cloud points3d.ply,
    with Dataset Cloud empty (the worker reads that one) or set (it reads fused.ply). A
    Densify's own output stays replaceable by a re-run, also with Dataset Cloud empty."""
    from _mvs_scene import render as trace
    from _mvs_scene import ring_cameras, write_nerf

    from npbgpp_core.ply import load_ply, save_ply

    sc = scene["scene"]
    cams = ring_cameras(6, size=(45, 60))
    root = scene["dir"] / "sphere"
    write_nerf(root, cams, [trace(c) for c in cams], sphere_only_alpha=True)
    true_cloud = load_ply(root / "points3d.ply")
    save_ply(root / "fused.ply", true_cloud.points[::2])  # another cloud of the same surface
    files = {name: (root / name).read_bytes() for name in ("fused.ply", "points3d.ply")}
    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(root), point_cloud="fused.ply") == {"FINISHED"}
    sc.npbgpp.dataset_cloud = ""  # the old way: only Dataset Points says which cloud was chosen
    assert sc.npbgpp.densify_output == ""

    def refused(out, message: str) -> None:
        with pytest.raises(RuntimeError, match=message):
            bpy.ops.npbgpp.densify(filepath=str(out), max_points=1000)

    fused = re.escape(str(root / "fused.ply"))
    refused(root / "fused.ply", f"Output PLY {fused} is the Dataset Points file, which Aggregate reads")
    refused(root / "points3d.ply", "Densify failed: .*output .*points3d.ply is an input of the scene")
    hand = scene["dir"] / "hand.ply"
    save_ply(hand, true_cloud.points[:50])
    sc.npbgpp.dataset_points = str(hand)  # set by hand: a cloud Aggregate reads, not Densify's
    refused(hand, "is the Dataset Points file")
    assert len(load_ply(hand)) == 50
    sc.npbgpp.dataset_points = str(root / "fused.ply")
    sc.npbgpp.dataset_cloud = str(root / "fused.ply")  # the new way: the worker reads fused.ply
    refused(root / "fused.ply", f"Output PLY {fused} is the Dataset Cloud")
    refused(root / "points3d.ply", "Densify failed: .*output .*points3d.ply is the dataset's own point cloud")
    assert {name: (root / name).read_bytes() for name in files} == files

    dense = scene["dir"] / "dense.ply"
    assert bpy.ops.npbgpp.densify(filepath=str(dense), max_points=1000) == {"FINISHED"}
    assert os.path.samefile(bpy.path.abspath(sc.npbgpp.densify_output), dense)
    assert os.path.samefile(bpy.path.abspath(sc.npbgpp.dataset_points), dense)
    sc.npbgpp.dataset_cloud = ""
    save_ply(dense, np.zeros((3, 3), np.float32))  # the earlier run's cloud, recognisably replaced below
    assert bpy.ops.npbgpp.densify(filepath=str(dense), max_points=1000) == {"FINISHED"}
    assert len(load_ply(dense)) > 100
    assert {name: (root / name).read_bytes() for name in files} == files
    # a .blend saved before Densify Output existed, its Dataset Points an earlier Densify output:
    # refused (nothing tells it from a chosen Point Cloud), and the message says no more than that
    sc.npbgpp.densify_output = ""
    dense_cloud = dense.read_bytes()
    refused(dense, re.escape(
        f"Output PLY {dense} is the Dataset Points file, which Aggregate reads and which is not recorded as "
        "Densify's own output (it may be the Point Cloud the dataset was imported with; a .blend saved before "
        "that record existed has none, even for an earlier Densify output); choose another file."))
    assert dense.read_bytes() == dense_cloud
    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(root), point_cloud="fused.ply") == {"FINISHED"}
    assert sc.npbgpp.densify_output == ""  # a new import's Densify output is none yet


def _subset_bundle(path: str, keep: np.ndarray):
    """An independent reference: a smaller bundle holding only the ``keep`` points (and the
    scene's environment map, which belongs to the scene, not to its points)."""
    from npbgpp_core.scene import NeuralScene

    b = NeuralScene.load(path)
    k = torch_index(keep)
    return NeuralScene(b.points[k], None if b.colors is None else b.colors[k], b.kind, b.features[k], b.valid[k],
                       b.model_config, b.model_state, b.metadata, background=b.background)


def torch_index(mask: np.ndarray):
    import torch

    return torch.from_numpy(np.flatnonzero(mask))


def _neural_display(sc, path: str) -> np.ndarray:
    combined = passes(render_exr(sc, path), "Combined")
    return np.where(combined[..., :3] <= 0.0031308, combined[..., :3] * 12.92,
                    1.055 * np.clip(combined[..., :3], 0, 1) ** (1 / 2.4) - 0.055)


def _core_render(sc, cam, bundle) -> np.ndarray:
    from blender_addon.camera_bridge import scene_camera_geometry
    from npbgpp_core import Camera

    bpy.context.view_layer.update()
    geo = scene_camera_geometry(cam.evaluated_get(bpy.context.evaluated_depsgraph_get()), sc)
    camera = Camera.from_opencv(geo.K, geo.R, geo.t, geo.image_size)
    return bundle.renderer("cpu").render(camera).permute(1, 2, 0).numpy()


def test_neural_output_follows_deleted_points(scene):
    """Points deleted from the bundle's object (a geometry-nodes Delete Geometry) disappear
    from the Neural image: it equals the core render of a bundle holding only the rest."""
    from npbgpp_core.scene import NeuralScene

    sys.path.insert(0, ROOT)
    from blender_addon.point_source import point_ids

    sc, cam = scene["scene"], scene["camera"]
    bundle = str(scene["dir"] / "tiny.npbgpp")
    _tiny_bundle(bundle, scene["points"], scene["colors"])
    assert bpy.ops.import_scene.npbgpp_bundle(filepath=bundle) == {"FINISHED"}
    obj = sc.npbgpp.point_object
    np.testing.assert_array_equal(point_ids(obj), np.arange(len(scene["points"])))
    sc.render.film_transparent = False
    full = _neural_display(sc, str(scene["dir"] / "full.exr"))
    np.testing.assert_allclose(full, _core_render(sc, cam, NeuralScene.load(bundle)), atol=2e-4)
    nodes_modifier(obj, "Crop", _points_deleted_where("X", "GREATER_THAN"))
    bpy.context.view_layer.update()
    keep = scene["points"][:, 0] <= 0
    evaluated = obj.evaluated_get(bpy.context.evaluated_depsgraph_get())
    np.testing.assert_array_equal(np.sort(point_ids(evaluated)), np.flatnonzero(keep))
    cropped = _neural_display(sc, str(scene["dir"] / "cropped.exr"))
    np.testing.assert_allclose(cropped, _core_render(sc, cam, _subset_bundle(bundle, keep)), atol=2e-4)
    assert np.abs(cropped - full).max() > 10 * 2e-4  # the deleted half changed the image beyond the tolerance
    obj.modifiers.clear()
    np.testing.assert_allclose(_neural_display(sc, str(scene["dir"] / "again.exr")), full, atol=1e-6)


def test_dataset_max_points_then_bundle_renders_only_imported_points(scene):
    """Import a dataset with Max Points, aggregate all its points, import the bundle: no
    second cloud appears, and the Neural image shows only the imported points."""
    sc, cam = scene["scene"], scene["camera"]
    root = scene["dir"] / "nerf"
    _write_nerf_dataset(root, [cam], scene["points"], scene["colors"])
    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(root), max_points=30) == {"FINISHED"}
    sys.path.insert(0, ROOT)
    from blender_addon.point_source import point_ids
    from npbgpp_core.datasets.scene_data import subsample_indices

    obj = sc.npbgpp.point_object
    ids = point_ids(obj)
    np.testing.assert_array_equal(ids, subsample_indices(len(scene["points"]), 30))
    out = str(scene["dir"] / "agg.npbgpp")
    assert bpy.ops.npbgpp.aggregate(filepath=out) == {"FINISHED"}
    before = set(bpy.data.objects)
    assert bpy.ops.import_scene.npbgpp_bundle(filepath=out) == {"FINISHED"}
    assert set(bpy.data.objects) == before and sc.npbgpp.point_object == obj  # no duplicate cloud
    assert sc.npbgpp.bundle == out and sc.npbgpp.output == "NEURAL"
    sc.render.film_transparent = False
    keep = np.zeros(len(scene["points"]), bool)
    keep[ids] = True
    got = _neural_display(sc, str(scene["dir"] / "sub.exr"))
    np.testing.assert_allclose(got, _core_render(sc, cam, _subset_bundle(out, keep)), atol=2e-4)
    from npbgpp_core.scene import NeuralScene

    assert np.abs(got - _core_render(sc, cam, NeuralScene.load(out))).max() > 10 * 2e-4  # not all 60 points


def test_aggregate_with_max_points_then_renders(scene, capfd):
    """Aggregate with Max Points keeps fewer points than the imported dataset object names:
    the bundle's own points become the point object (ids = its rows) and F12 renders the
    whole bundle (it used to fail with 'point ids must be in [0, 30)')."""
    from blender_addon.point_source import object_points, point_ids
    from npbgpp_core.scene import NeuralScene

    sc, cam = scene["scene"], scene["camera"]
    root, dataset_obj = _import_nerf_dataset(scene)
    out = str(scene["dir"] / "sub30.npbgpp")
    assert bpy.ops.npbgpp.aggregate(filepath=out, max_points=30) == {"FINISHED"}
    bundle = NeuralScene.load(out)
    obj = sc.npbgpp.point_object
    assert obj != dataset_obj and len(bundle.points) == 30
    np.testing.assert_array_equal(point_ids(obj), np.arange(30))
    np.testing.assert_allclose(object_points(obj)[0], bundle.points.numpy(), atol=1e-6)
    sc.render.film_transparent = False
    sc.npbgpp.output = "NEURAL"
    got = _neural_display(sc, str(scene["dir"] / "sub30.exr"))
    np.testing.assert_allclose(got, _core_render(sc, cam, bundle), atol=2e-4)
    # without Max Points the dataset object stays the point object
    sc.npbgpp.point_object = dataset_obj
    assert bpy.ops.npbgpp.aggregate(filepath=str(scene["dir"] / "all.npbgpp")) == {"FINISHED"}
    assert sc.npbgpp.point_object == dataset_obj
    # a PLY imported after the dataset is not what Aggregate uses: the report says so
    _ply(str(scene["dir"] / "other.ply"), n=20, seed=5)
    assert bpy.ops.import_scene.npbgpp_ply(filepath=str(scene["dir"] / "other.ply")) == {"FINISHED"}
    capfd.readouterr()
    assert bpy.ops.npbgpp.aggregate(filepath=str(scene["dir"] / "all2.npbgpp")) == {"FINISHED"}
    out = capfd.readouterr().out
    assert f"Saved {len(scene['points'])} points of the dataset's cloud" in out
    assert "The point object 'other' is not the aggregated cloud" in out and "Dataset Points" in out
    # Import with Max Points 3 (dataset ids 0, 35, 40) then Aggregate Max Points 50: every id is a
    # row of the bundle, but rows are another subset, so ids would name other points; the bundle's own
    # points become the point object (the id range alone let the object through)
    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(root), max_points=3) == {"FINISHED"}
    np.testing.assert_array_equal(point_ids(sc.npbgpp.point_object), [0, 35, 40])
    out50 = str(scene["dir"] / "sub50.npbgpp")
    assert bpy.ops.npbgpp.aggregate(filepath=out50, max_points=50) == {"FINISHED"}
    bundle50 = NeuralScene.load(out50)
    np.testing.assert_array_equal(point_ids(sc.npbgpp.point_object), np.arange(50))
    np.testing.assert_allclose(object_points(sc.npbgpp.point_object)[0], bundle50.points.numpy(), atol=1e-6)
    # Importing the whole dataset again drops this 50-point subset's bundle (ids 0..59 would name other
    # points of it, and F12 would refuse ids past 49); a bundle of all its points is kept, and importing
    # another dataset drops that (its ids would pick arbitrary points of it).
    capfd.readouterr()
    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(root)) == {"FINISHED"}
    assert sc.npbgpp.bundle == ""
    assert f"{out50} holds other points than the imported dataset" in capfd.readouterr().out
    sc.npbgpp.bundle = str(scene["dir"] / "all.npbgpp")
    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(root)) == {"FINISHED"}
    assert sc.npbgpp.bundle == str(scene["dir"] / "all.npbgpp")
    other = scene["dir"] / "other_dataset"
    _write_nerf_dataset(other, [cam], scene["points"][:40] + 0.5, scene["colors"][:40])
    capfd.readouterr()
    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(other)) == {"FINISHED"}
    assert sc.npbgpp.bundle == ""
    assert "holds other points than the imported dataset" in capfd.readouterr().out


def test_aggregate_saved_but_points_unchecked_warns_and_f12_says_why(scene, capfd, monkeypatch):
    """Aggregate wrote a bundle of other points than the point object (Max Points) but the
    worker then fails to show them to replace it (GetBundlePoints errors): the bundle is
    saved and in use, reported so (not 'Aggregate failed'), with a WARNING that the point
    object was not replaced, why F12 fails (ids 0..59, a 30-point bundle) and what to do;
    F12 fails naming the point object, and Import Bundle as advised fixes it."""
    from npbgpp_core import protocol as P
    from npbgpp_core.scene import NeuralScene

    worker_client = sys.modules[f"{MODULE}.worker_client"]
    sc, cam = scene["scene"], scene["camera"]
    _, dataset_obj = _import_nerf_dataset(scene)
    forward = worker_client.ProcessWorker.request

    def failing(self, req, *args, **kwargs):
        if isinstance(req, P.GetBundlePoints):
            raise worker_client.WorkerError("injected: no answer")
        return forward(self, req, *args, **kwargs)

    monkeypatch.setattr(worker_client.ProcessWorker, "request", failing)
    out = str(scene["dir"] / "sub30.npbgpp")
    objects = set(bpy.data.objects)
    capfd.readouterr()
    assert bpy.ops.npbgpp.aggregate(filepath=out, max_points=30) == {"FINISHED"}
    printed = capfd.readouterr().out
    assert "Aggregate failed" not in printed and "Error" not in printed
    assert "Info: Saved 30 points of the dataset's cloud" in printed
    warning = [line for line in printed.splitlines() if line.startswith("Warning: ")]
    assert len(warning) == 1, printed
    assert "injected: no answer" in warning[0] and "'nerf'" in warning[0]
    assert "point ids reach 59 but the bundle has 30 points, so F12 fails" in warning[0]
    assert f"File > Import > NPBG++ Bundle on {out}" in warning[0]
    assert len(NeuralScene.load(out)) == 30
    assert sc.npbgpp.bundle == out and sc.npbgpp.point_object == dataset_obj and set(bpy.data.objects) == objects
    monkeypatch.setattr(worker_client.ProcessWorker, "request", forward)
    sc.npbgpp.output = "NEURAL"
    with pytest.raises(RuntimeError, match=r"point ids must be in \[0, 30\).*belongs to another bundle or dataset"):
        bpy.ops.render.render()
    assert bpy.ops.import_scene.npbgpp_bundle(filepath=out) == {"FINISHED"}
    assert sc.npbgpp.point_object != dataset_obj
    sc.render.film_transparent = False
    got = _neural_display(sc, str(scene["dir"] / "sub30.exr"))
    np.testing.assert_allclose(got, _core_render(sc, cam, NeuralScene.load(out)), atol=2e-4)


def test_aggregate_checks_the_point_object_without_loading_the_bundle(scene, capfd, monkeypatch):
    """After Aggregate saves the bundle, a point object that holds its points is settled in
    Blender from the file's points alone: the worker gets no LoadBundle (it would build a
    CPU renderer F12 then builds again on its device) nor GetBundlePoints. Only a point
    object to replace (Max Points) asks the worker for the bundle's points and colours. A
    bundle whose points cannot be read back is reported saved but unchecked."""
    from blender_addon.point_source import object_points, point_ids
    from npbgpp_core.scene import NeuralScene

    worker_client = sys.modules[f"{MODULE}.worker_client"]
    sc = scene["scene"]
    _, dataset_obj = _import_nerf_dataset(scene)
    sent: list[str] = []
    truncate: list[str] = []
    forward = worker_client.ProcessWorker.request

    def recorded(self, req, *args, **kwargs):
        sent.append(type(req).__name__)
        reply = forward(self, req, *args, **kwargs)
        if type(req).__name__ == "AggregateFinish" and truncate:
            with open(truncate[0], "r+b") as f:
                f.truncate(12)
        return reply

    monkeypatch.setattr(worker_client.ProcessWorker, "request", recorded)
    objects = set(bpy.data.objects)
    capfd.readouterr()
    assert bpy.ops.npbgpp.aggregate(filepath=str(scene["dir"] / "all.npbgpp")) == {"FINISHED"}
    assert sent == ["AggregateBegin", "AggregateView", "AggregateFinish"]
    assert sc.npbgpp.point_object == dataset_obj and set(bpy.data.objects) == objects
    assert "Warning" not in capfd.readouterr().out
    sent.clear()
    out = str(scene["dir"] / "sub30.npbgpp")
    assert bpy.ops.npbgpp.aggregate(filepath=out, max_points=30) == {"FINISHED"}
    assert sent == ["AggregateBegin", "AggregateView", "AggregateFinish", "LoadBundle", "GetBundlePoints"]
    obj = sc.npbgpp.point_object
    assert obj != dataset_obj
    np.testing.assert_array_equal(point_ids(obj), np.arange(30))
    np.testing.assert_allclose(object_points(obj)[0], NeuralScene.load(out).points.numpy(), atol=1e-6)
    sc.npbgpp.point_object = dataset_obj
    sent.clear()
    bad = str(scene["dir"] / "cut.npbgpp")
    truncate.append(bad)
    capfd.readouterr()
    assert bpy.ops.npbgpp.aggregate(filepath=bad) == {"FINISHED"}
    assert sent == ["AggregateBegin", "AggregateView", "AggregateFinish"]
    printed = capfd.readouterr().out
    assert f"Info: Saved {len(scene['points'])} points" in printed
    warning = [line for line in printed.splitlines() if line.startswith("Warning: ")]
    assert len(warning) == 1, printed
    assert "its points could not be read to check the point object 'nerf'" in warning[0]
    assert "truncated" in warning[0] and f"File > Import > NPBG++ Bundle on {bad}" in warning[0]
    assert sc.npbgpp.bundle == bad and sc.npbgpp.point_object == dataset_obj


def _record_photo_sizes(monkeypatch) -> list[int]:
    """The Photo Size (AggregateBegin.max_side) of every Aggregate the worker is asked for from now on,
    in order; the requests still go to the worker."""
    worker_client = sys.modules[f"{MODULE}.worker_client"]
    sides: list[int] = []
    forward = worker_client.ProcessWorker.request

    def recorded(self, req, *args, **kwargs):
        if type(req).__name__ == "AggregateBegin":
            sides.append(req.max_side)
        return forward(self, req, *args, **kwargs)

    monkeypatch.setattr(worker_client.ProcessWorker, "request", recorded)
    return sides


def test_aggregate_photo_size_reaches_the_worker_and_the_report(scene, capfd, monkeypatch):
    """Aggregate's Photo Size (default for renders up to 2048 px: protocol.AGGREGATE_MAX_SIDE) travels in AggregateBegin
    and the bundle records it; at 16 on the dataset's 32x24 photo the report says the photos were read at
    16 px long side (originals up to 32), at the default, above the photo's size, it says nothing of it;
    8 is refused in Photo Size's words before the worker is asked and no bundle is written."""
    from npbgpp_core.protocol import AGGREGATE_MAX_SIDE
    from npbgpp_core.scene import NeuralScene

    _import_nerf_dataset(scene)
    sides = _record_photo_sizes(monkeypatch)
    capfd.readouterr()
    default = scene["dir"] / "default.npbgpp"
    assert bpy.ops.npbgpp.aggregate(filepath=str(default)) == {"FINISHED"}
    assert sides == [AGGREGATE_MAX_SIDE]
    assert "px long side (originals" not in capfd.readouterr().out
    assert NeuralScene.load(str(default)).metadata["aggregate_max_side"] == AGGREGATE_MAX_SIDE
    small = scene["dir"] / "small.npbgpp"
    assert bpy.ops.npbgpp.aggregate(filepath=str(small), max_side=16) == {"FINISHED"}
    assert sides[-1] == 16
    assert ("Photos larger than 16 px read at 16 px long side (originals up to 32; Render Properties > NPBG++ > Data > "
            "Photo Size: Own Size reads them at their own size)") in capfd.readouterr().out
    assert NeuralScene.load(str(small)).metadata["aggregate_max_side"] == 16
    bad = scene["dir"] / "bad.npbgpp"
    with pytest.raises(RuntimeError, match=re.escape("Aggregate: Photo Size must be 0 (each photo at its own size) or "
                                                     "a whole number of pixels of at least 16, got 8.")):
        bpy.ops.npbgpp.aggregate(filepath=str(bad), max_side=8)
    assert sides == [AGGREGATE_MAX_SIDE, 16] and not bad.exists()  # refused before the worker is asked
    # the dialog's field: 0 allowed (own size), the slider's range up to 8192 as Tile Size's
    prop = bpy.ops.npbgpp.aggregate.get_rna_type().properties["max_side"]
    assert (prop.name, prop.default, prop.hard_min, prop.soft_max, prop.subtype) == (
        "Photo Size", AGGREGATE_MAX_SIDE, 0, 8192, "PIXEL")


def test_aggregate_photo_size_follows_the_render_size_unless_given(scene, monkeypatch):
    """The scene's Photo Size at its default, Follow Render, and no max_side given: Aggregate reads photos
    at the long side F12 renders at (Resolution times %,
    Blender's integer maths: 4097 at 75% is 3072), at least AGGREGATE_MAX_SIDE (2048) and at most
    AGGREGATE_RENDER_MAX_SIDE (4096: an 8064-px render reads at 4096), and the bundle records it; a
    max_side given, the constant's own value included, is used as is (0: own size).
    The property skips Blender's last-used values (SKIP_SAVE): from the UI those count as given, and
    would win over the scene's Photo Size setting (bpy.ops calls never reuse them)."""
    from npbgpp_core.scene import NeuralScene

    sc = scene["scene"]
    _import_nerf_dataset(scene)
    sides = _record_photo_sizes(monkeypatch)
    cases = [((3840, 2160, 100), {}, 3840), ((3840, 2160, 50), {}, 2048), ((1920, 1080, 100), {}, 2048),
             ((4097, 100, 75), {}, 3072), ((2160, 5000, 60), {}, 3000), ((8064, 6048, 100), {}, 4096),
             ((8064, 6048, 100), {"max_side": 0}, 0),
             ((3840, 2160, 100), {"max_side": 1024}, 1024), ((3840, 2160, 100), {"max_side": 0}, 0),
             ((3840, 2160, 100), {"max_side": 2048}, 2048)]
    for k, (resolution, given, expected) in enumerate(cases):
        sc.render.resolution_x, sc.render.resolution_y, sc.render.resolution_percentage = resolution
        out = scene["dir"] / f"{k}.npbgpp"
        assert bpy.ops.npbgpp.aggregate(filepath=str(out), **given) == {"FINISHED"}
        assert sides[-1] == expected, (resolution, given)
        assert NeuralScene.load(str(out)).metadata["aggregate_max_side"] == (expected or None)
    assert len(sides) == len(cases)
    assert bpy.ops.npbgpp.aggregate.get_rna_type().properties["max_side"].is_skip_save


def test_aggregate_reads_the_scene_photo_size_setting_unless_max_side_is_given(scene, monkeypatch):
    """Photo Size is a scene setting (scene.npbgpp): Follow Render, its default, asks the worker for the
    render's long side (3840x2160 -> 3840; its bounds: the test above, which runs on the default);
    Fixed for its Long Side (1024); Own Size for 0 (each photo at its own size); the bundle records
    it. A script's max_side wins over the setting for its run and leaves it as it was. The Long Side
    takes no value Aggregate refuses: Blender raises 8 to the least, 16."""
    from npbgpp_core.scene import NeuralScene

    sc = scene["scene"]
    s = sc.npbgpp
    _import_nerf_dataset(scene)
    sides = _record_photo_sizes(monkeypatch)
    assert s.photo_size_mode == "FOLLOW_RENDER"
    cases = [((3840, 2160, 100), "FOLLOW_RENDER", {}, 3840), ((3840, 2160, 100), "FIXED", {}, 1024),
             ((3840, 2160, 100), "OWN", {}, 0), ((3840, 2160, 100), "FIXED", {"max_side": 2048}, 2048),
             ((3840, 2160, 100), "FIXED", {"max_side": 0}, 0), ((1920, 1080, 100), "OWN", {"max_side": 640}, 640)]
    s.photo_size = 1024
    for k, (resolution, mode, given, expected) in enumerate(cases):
        sc.render.resolution_x, sc.render.resolution_y, sc.render.resolution_percentage = resolution
        s.photo_size_mode = mode
        out = scene["dir"] / f"setting{k}.npbgpp"
        assert bpy.ops.npbgpp.aggregate(filepath=str(out), **given) == {"FINISHED"}
        assert sides[-1] == expected, (resolution, mode, given)
        assert NeuralScene.load(str(out)).metadata["aggregate_max_side"] == (expected or None)
        assert (s.photo_size_mode, s.photo_size) == (mode, 1024)  # a script's max_side leaves the setting
    assert len(sides) == len(cases)
    s.photo_size = 8
    assert s.photo_size == 16


def test_the_panel_and_aggregate_s_dialog_show_the_scene_photo_size(scene):
    """Render Properties > NPBG++ > Data shows Photo Size with the size Aggregate will read at
    under its menu ("Reads photos at up to 3840 px long side": the size, which the menu does not say, not
    the menu's own name again), the Long Side field when Fixed; Aggregate's options
    dialog (its draw: bpy without a window runs no invoke, so the operator's Python side is a
    stand-in, the scene Blender's) draws the same scene setting, so a size chosen there is the scene's
    (the run reads it when it starts), and a script's max_side, which wins, in its place. invoke no
    longer sets max_side. protocol.ADDON_PHOTO_SIZE, which the worker's advice names, is the panel's
    path and the setting's name."""
    from types import SimpleNamespace

    from npbgpp_core.protocol import ADDON_PHOTO_SIZE

    ops = sys.modules[f"{MODULE}.operators"]
    sc = scene["scene"]
    s = sc.npbgpp
    sc.render.resolution_x, sc.render.resolution_y, sc.render.resolution_percentage = 2160, 3840, 100
    layout = _drawn()
    assert "photo_size_mode" in layout.props and "photo_size" not in layout.props
    assert "Reads photos at up to 3840 px long side" in layout.labels
    assert not [text for text in layout.labels if "Follow Render" in text or "Photo Size" in text]
    sc.render.resolution_percentage = 50
    assert "Reads photos at up to 2048 px long side" in _drawn().labels
    s.photo_size_mode, s.photo_size = "FIXED", 1024
    layout = _drawn()
    assert layout.props.index("photo_size") == layout.props.index("photo_size_mode") + 1
    assert not [text for text in layout.labels if text.startswith("Reads")]
    s.photo_size_mode = "OWN"
    assert "Reads every photo at full size: slowest, most memory" in _drawn().labels
    panel, data = bpy.types.RENDER_PT_npbgpp, bpy.types.RENDER_PT_npbgpp_data
    assert (panel.bl_context, data.bl_parent_id) == ("render", "RENDER_PT_npbgpp")
    name = type(s).bl_rna.properties["photo_size_mode"].name
    assert ADDON_PHOTO_SIZE == f"Render Properties > {panel.bl_label} > {data.bl_label} > {name}"

    # the dialog: invoke opens it without setting max_side; its draw is the scene's setting
    s.photo_size_mode = "FOLLOW_RENDER"
    sc.render.resolution_percentage = 100
    opened: list[object] = []
    context = SimpleNamespace(scene=sc, window=object(), window_manager=SimpleNamespace(
        invoke_props_dialog=lambda operator, confirm_text="": opened.append(operator) or {"RUNNING_MODAL"}))
    given: dict[str, int] = {}
    op = SimpleNamespace(filepath="x.npbgpp", max_points=0, max_side=ops.AGGREGATE_MAX_SIDE, _asked=False,
                         bl_label="Aggregate Descriptors", layout=None,
                         properties=SimpleNamespace(is_property_set=lambda name: name in given),
                         _inputs=lambda context: ("w.pt", "", "dataset"))
    op._ask_options = ops._WorkerStepJob._ask_options.__get__(op)
    op._photo_size = ops.NPBGPP_OT_aggregate._photo_size.__get__(op)
    assert ops.NPBGPP_OT_aggregate.invoke(op, context, None) == {"RUNNING_MODAL"}
    assert opened == [op] and op._asked and op.max_side == ops.AGGREGATE_MAX_SIDE
    op.layout = _Layout()
    ops.NPBGPP_OT_aggregate.draw(op, context)
    assert op.layout.props == ["filepath", "max_points", "photo_size_mode"]
    assert op.layout.labels == ["Reads photos at up to 3840 px long side"]
    assert op._photo_size(context) == 3840
    s.photo_size_mode, s.photo_size = "FIXED", 1024  # the user's choice in the dialog
    op.layout = _Layout()
    ops.NPBGPP_OT_aggregate.draw(op, context)
    assert op.layout.props == ["filepath", "max_points", "photo_size_mode", "photo_size"]
    assert op._photo_size(context) == 1024
    # the file browser asking for the Bundle (ask_for_output): its side panel leaves the path out, as
    # Blender's own draw of it does (its path field is the Bundle); the dialog opened over a File Browser
    # editor (Quick Favorites there; no operator of its own) still shows the Bundle
    for browsing, expected in ((op, ["max_points", "photo_size_mode", "photo_size"]),
                               (None, ["filepath", "max_points", "photo_size_mode", "photo_size"])):
        op.layout = _Layout()
        space = SimpleNamespace(type="FILE_BROWSER", active_operator=browsing)
        ops.NPBGPP_OT_aggregate.draw(op, SimpleNamespace(scene=sc, space_data=space))
        assert op.layout.props == expected, browsing
    given["max_side"] = op.max_side = 512  # bpy.ops.npbgpp.aggregate("INVOKE_DEFAULT", max_side=512)
    op.layout = _Layout()
    ops.NPBGPP_OT_aggregate.draw(op, context)
    assert op.layout.props == ["filepath", "max_points", "max_side"] and op._photo_size(context) == 512


def test_the_photo_size_setting_is_saved_with_the_blend_and_undone(scene):
    """The scene's Photo Size survives a save and reload of the .blend (Fixed 1024, Own Size); a scene
    that never set it, as in a .blend saved before the setting existed, reads back Follow Render
    and follows its render (3840 px). A change is undone and redone as any property's (Blender's
    undo steps, as the UI pushes one after each edit)."""
    ops = sys.modules[f"{MODULE}.operators"]
    sc = scene["scene"]
    sc.npbgpp.photo_size_mode, sc.npbgpp.photo_size = "FIXED", 1024
    own = bpy.data.scenes.new("own")
    own.npbgpp.photo_size_mode = "OWN"
    untouched = bpy.data.scenes.new("untouched")
    untouched.npbgpp.up_axis = "POS_Z"  # other settings stored, Photo Size never set
    untouched.render.resolution_x, untouched.render.resolution_y = 3840, 2160
    assert not untouched.npbgpp.is_property_set("photo_size_mode")
    name = sc.name
    blend = str(scene["dir"] / "photo_size.blend")
    assert bpy.ops.wm.save_as_mainfile(filepath=blend) == {"FINISHED"}
    bpy.ops.wm.read_homefile(use_empty=True)
    assert bpy.ops.wm.open_mainfile(filepath=blend) == {"FINISHED"}
    read = {n: (bpy.data.scenes[n].npbgpp.photo_size_mode, ops.scene_photo_size(bpy.data.scenes[n]))
            for n in (name, "own", "untouched")}
    assert read == {name: ("FIXED", 1024), "own": ("OWN", 0), "untouched": ("FOLLOW_RENDER", 3840)}
    assert bpy.data.scenes["untouched"].npbgpp.up_axis == "POS_Z"
    assert bpy.ops.ed.undo_push(message="before") == {"FINISHED"}
    bpy.data.scenes[name].npbgpp.photo_size = 512
    assert bpy.ops.ed.undo_push(message="Photo Size") == {"FINISHED"}
    assert bpy.ops.ed.undo() == {"FINISHED"}
    assert bpy.data.scenes[name].npbgpp.photo_size == 1024
    assert bpy.ops.ed.redo() == {"FINISHED"}
    assert bpy.data.scenes[name].npbgpp.photo_size == 512


def test_import_of_a_copied_dataset_keeps_its_bundle(scene, capfd, monkeypatch):
    """Importing a dataset keeps the scene's bundle when the new cloud's ids name the
    bundle's points, wherever the folder lies (a copy elsewhere, renamed): F12 then renders
    the bundle, and Import Bundle reuses the copy's object. It reads only the bundle's
    points (no LoadBundle: no renderer built in the worker). A dataset with other points
    still clears the bundle with a warning."""
    import shutil

    from npbgpp_core.scene import NeuralScene

    worker_client = sys.modules[f"{MODULE}.worker_client"]
    sc, cam = scene["scene"], scene["camera"]
    root, _ = _import_nerf_dataset(scene)
    out = str(scene["dir"] / "agg.npbgpp")
    assert bpy.ops.npbgpp.aggregate(filepath=out) == {"FINISHED"}
    copy = scene["dir"] / "elsewhere" / "renamed_copy"
    shutil.copytree(root, copy)
    sent = []
    forward = worker_client.ProcessWorker.request

    def recorded(self, req, *args, **kwargs):
        sent.append(type(req).__name__)
        return forward(self, req, *args, **kwargs)

    monkeypatch.setattr(worker_client.ProcessWorker, "request", recorded)
    capfd.readouterr()
    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(copy)) == {"FINISHED"}
    assert sent == ["ReadDataset"]
    assert "Warning" not in capfd.readouterr().out
    assert sc.npbgpp.bundle == out and sc.npbgpp.point_object.name.startswith("renamed_copy")
    obj, objects = sc.npbgpp.point_object, set(bpy.data.objects)
    assert bpy.ops.import_scene.npbgpp_bundle(filepath=out) == {"FINISHED"}  # the copy's object: no second cloud
    assert set(bpy.data.objects) == objects and sc.npbgpp.point_object == obj and sc.npbgpp.bundle == out
    sc.npbgpp.output = "NEURAL"
    sc.render.film_transparent = False
    got = _neural_display(sc, str(scene["dir"] / "copy.exr"))
    np.testing.assert_allclose(got, _core_render(sc, cam, NeuralScene.load(out)), atol=2e-4)
    other = scene["dir"] / "other_dataset"
    _write_nerf_dataset(other, [cam], scene["points"] + 0.5, scene["colors"])  # as many points, elsewhere
    sent.clear()
    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(other)) == {"FINISHED"}
    assert sent == ["ReadDataset"] and sc.npbgpp.bundle == ""
    warning = [line for line in capfd.readouterr().out.splitlines() if line.startswith("Warning: ")]
    assert len(warning) == 1 and f"{out} holds other points than the imported dataset {other}" in warning[0]
    assert "run Aggregate Descriptors for this one" in warning[0]


def test_bundle_exported_by_headless_train_reuses_the_dataset_object(scene):
    """A bundle written by `python -m headless_train export` of the imported dataset is
    recognised like one from Aggregate: no second copy of the cloud, and it renders the
    dataset object's points."""
    from blender_addon.point_source import point_ids
    from headless_train.export import main as export_main
    from npbgpp_core.pretrained import default_weights_path
    from npbgpp_core.scene import NeuralScene

    sc, cam = scene["scene"], scene["camera"]
    root = scene["dir"] / "nerf"
    _write_nerf_dataset(root, [cam], scene["points"], scene["colors"])
    out = str(scene["dir"] / "cli.npbgpp")
    assert export_main(["--checkpoint", default_weights_path("npbgpp"), "--scene", str(root), "--out", out,
                        "--device", "cpu"]) == 0
    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(root)) == {"FINISHED"}
    obj = sc.npbgpp.point_object
    before = set(bpy.data.objects)
    assert bpy.ops.import_scene.npbgpp_bundle(filepath=out) == {"FINISHED"}
    assert set(bpy.data.objects) == before and sc.npbgpp.point_object == obj
    np.testing.assert_array_equal(point_ids(obj), np.arange(len(NeuralScene.load(out).points)))


class _Recorder:
    """Stands in for UILayout in draw functions: records operators and labels."""

    def __init__(self) -> None:
        self.operators: list[str] = []
        self.labels: list[str] = []
        self.props: list[str] = []
        self.enabled = self.active = True

    def operator(self, idname, **kwargs):
        self.operators.append(idname)

    def label(self, text="", **kwargs):
        self.labels.append(text)

    def row(self, **kwargs):
        return self

    column = row

    def prop(self, data, name, **kwargs):
        self.props.append(name)

    def separator(self, **kwargs):
        pass

    def progress(self, **kwargs):
        pass


def test_menus_tooltips_and_preferences(addon):
    """File > Export > NPBG++ Dataset and Object > NPBG++ Points from Meshes exist; every
    setting of the add-on (scene, preferences, operators, enum items) has a tooltip; the
    preferences start a torch check when drawn and show its result."""
    for menu, idname in ((bpy.types.TOPBAR_MT_file_export, "npbgpp.export_dataset"),
                         (bpy.types.VIEW3D_MT_object, "npbgpp.points_from_meshes")):
        layout = _Recorder()
        for draw in menu.draw._draw_funcs:
            if (draw.__module__ or "").startswith(MODULE):
                draw(type("M", (), {"layout": layout})(), bpy.context)
        assert idname in layout.operators, menu.__name__
    missing = []
    ops = [("npbgpp", n) for n in dir(bpy.ops.npbgpp)] + [
        ("import_scene", n) for n in dir(bpy.ops.import_scene) if "npbgpp" in n]
    rnas = [(f"{m}.{n}", getattr(getattr(bpy.ops, m), n).get_rna_type()) for m, n in ops]
    rnas += [("scene.npbgpp", bpy.context.scene.npbgpp.bl_rna),
             ("preferences", bpy.context.preferences.addons[MODULE].preferences.bl_rna)]
    for owner, rna in rnas:
        if owner.startswith(("npbgpp.", "import_scene.")) and not rna.description:
            missing.append(owner)
        for p in rna.properties:
            if p.identifier in ("rna_type", "name", "bl_idname") or p.is_hidden:
                continue
            if not p.description:
                missing.append(f"{owner}.{p.identifier}")
            for item in getattr(p, "enum_items", ()):
                if not item.description:
                    missing.append(f"{owner}.{p.identifier}:{item.identifier}")
    assert len(rnas) > 10 and missing == []
    prefs_module = sys.modules[f"{MODULE}.preferences"]
    prefs_module._torch_status.clear()
    layout = _Recorder()
    fake = type("P", (), {"layout": layout, "python_env": ""})()
    type(bpy.context.preferences.addons[MODULE].preferences).draw(fake, bpy.context)
    assert layout.labels[0] == prefs_module.CHECKING  # the check started as the panel opened
    for thread in list(prefs_module._probes.values()):
        thread.join(120)
    assert prefs_module.torch_status_line().startswith("torch ")


def test_points_from_meshes_switches_output_and_point_size(scene, capfd):
    """Points from Meshes with Neural output and no bundle switches Output to Points and
    says why; Point Size draws each point as a square of its colour (nearer points win)."""
    sc = scene["scene"]
    sc.npbgpp.output = "NEURAL"
    bpy.ops.mesh.primitive_plane_add(size=2.0, location=(0.0, 0.0, 5.0))  # out of the camera's view
    plane = bpy.context.active_object
    for o in sc.objects:
        o.select_set(o == plane)
    capfd.readouterr()
    assert bpy.ops.npbgpp.points_from_meshes(count=20, seed=1) == {"FINISHED"}
    assert sc.npbgpp.output == "POINTS"
    assert "Output is now Points. Neural output needs a bundle" in capfd.readouterr().out
    ply_object = [o for o in sc.objects if o.name.startswith("points")][0]
    sc.npbgpp.point_object = ply_object
    one = passes(render_exr(sc, str(scene["dir"] / "size1.exr")), "NPBG Points")
    sc.npbgpp.point_size = 3
    three = passes(render_exr(sc, str(scene["dir"] / "size3.exr")), "NPBG Points")
    hits = np.argwhere(one[..., 3] == 1.0)
    checked = 0
    for r, c in hits:
        if not (3 <= r < H - 3 and 3 <= c < W - 3) or one[r - 3 : r + 4, c - 3 : c + 4, 3].sum() != 1.0:
            continue  # only points with no other point within 3 pixels
        window = three[r - 1 : r + 2, c - 1 : c + 2]
        assert (window[..., 3] == 1.0).all()
        np.testing.assert_allclose(window[..., :3], np.broadcast_to(one[r, c, :3], (3, 3, 3)), atol=1e-6)
        assert three[r - 2, c - 2, 3] == 0.0 or one[r - 4 : r + 1, c - 4 : c + 1, 3].sum() > 1
        checked += 1
    assert checked >= 3
    assert three[..., 3].sum() > 5 * one[..., 3].sum()


def test_aggregate_saves_next_to_the_blend_not_in_the_dataset(scene):
    """Without a Bundle path the bundle goes next to the saved .blend (a folder the user
    chose), never into the dataset folder; with an unsaved .blend the user is asked."""
    cam = scene["camera"]
    root = scene["dir"] / "nerf"
    _write_nerf_dataset(root, [cam], scene["points"], scene["colors"])
    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(root)) == {"FINISHED"}
    with pytest.raises(RuntimeError, match="save the .blend first"):
        bpy.ops.npbgpp.aggregate()
    work = scene["dir"] / "work"
    work.mkdir()
    assert bpy.ops.wm.save_as_mainfile(filepath=str(work / "shot.blend")) == {"FINISHED"}
    assert bpy.ops.npbgpp.aggregate() == {"FINISHED"}
    assert bpy.context.scene.npbgpp.bundle == "//nerf.npbgpp"  # the saved file's relative-paths default
    assert (work / "nerf.npbgpp").is_file()
    assert not list(root.rglob("*.npbgpp"))


def test_project_folder_moved_or_saved_elsewhere_keeps_its_bundle(scene, capfd):
    """A bundle imported into a saved .blend is stored relative (Blender's Default to
    Relative Paths, as the file browser stores images), Save As into another folder rebases
    it, Save Copy leaves the session's value alone, and the project folder (unicode, spaces)
    moved as a whole renders its own bundle after reopening; switched off, the preference
    keeps the path absolute. Paths that no longer exist after a reopen give a message."""
    import shutil

    sc = scene["scene"]
    proj = scene["dir"] / "my proj é"
    proj.mkdir()
    bundle = proj / "tiny ü.npbgpp"
    _tiny_bundle(str(bundle), scene["points"], scene["colors"])
    assert bpy.ops.wm.save_as_mainfile(filepath=str(proj / "shot.blend")) == {"FINISHED"}
    assert bpy.ops.import_scene.npbgpp_bundle(filepath=str(bundle)) == {"FINISHED"}
    sc = bpy.context.scene
    assert sc.npbgpp.bundle == "//tiny ü.npbgpp"
    (proj / "sub").mkdir()
    assert bpy.ops.wm.save_as_mainfile(filepath=str(proj / "sub" / "shot.blend")) == {"FINISHED"}
    assert sc.npbgpp.bundle == "//../tiny ü.npbgpp"
    assert bpy.path.abspath(sc.npbgpp.bundle) == bpy.path.abspath("//../tiny ü.npbgpp")
    assert bpy.ops.wm.save_as_mainfile(filepath=str(scene["dir"] / "copy.blend"), copy=True) == {"FINISHED"}
    assert sc.npbgpp.bundle == "//../tiny ü.npbgpp"  # the session is still sub/shot.blend
    with pytest.raises(RuntimeError, match="Cannot open file"):
        bpy.ops.wm.save_as_mainfile(filepath=str(scene["dir"] / "no such folder" / "x.blend"))
    assert sc.npbgpp.bundle == "//../tiny ü.npbgpp"  # nothing written: nothing rebased
    assert bpy.ops.wm.save_as_mainfile(filepath=str(proj / "shot.blend")) == {"FINISHED"}
    assert bpy.context.scene.npbgpp.bundle == "//tiny ü.npbgpp"
    want = passes(render_exr(bpy.context.scene, str(scene["dir"] / "before.exr")), "Combined")
    assert want[..., 3].max() > 0
    moved = scene["dir"] / "moved here"
    shutil.move(str(proj), str(moved))
    assert bpy.ops.wm.open_mainfile(filepath=str(moved / "shot.blend")) == {"FINISHED"}
    sc = bpy.context.scene
    assert bpy.path.abspath(sc.npbgpp.bundle) == str(moved / "tiny ü.npbgpp")
    np.testing.assert_array_equal(passes(render_exr(sc, str(scene["dir"] / "after.exr")), "Combined"), want)
    os.remove(moved / "tiny ü.npbgpp")
    with pytest.raises(RuntimeError, match=re.escape(f"NeuralScene bundle not found: {moved / 'tiny ü.npbgpp'}")):
        render_exr(sc, str(scene["dir"] / "gone.exr"))
    _tiny_bundle(str(moved / "b.npbgpp"), scene["points"], scene["colors"])
    bpy.context.preferences.filepaths.use_relative_paths = False
    try:
        assert bpy.ops.import_scene.npbgpp_bundle(filepath=str(moved / "b.npbgpp")) == {"FINISHED"}
    finally:
        bpy.context.preferences.filepaths.use_relative_paths = True
    assert bpy.context.scene.npbgpp.bundle == str(moved / "b.npbgpp")


def test_first_save_makes_the_paths_set_before_it_relative(scene):
    """A bundle imported before the file was ever saved is stored absolute (nothing to be
    relative to); the file's first save makes it relative, as Default to Relative Paths
    asks, so the project folder can still move; a Save Copy of the unsaved session leaves
    the session's value absolute. The save handlers stay registered once."""
    from importlib import import_module

    assert bpy.data.filepath == ""
    proj = scene["dir"] / "proj"
    proj.mkdir()
    bundle = proj / "b.npbgpp"
    _tiny_bundle(str(bundle), scene["points"], scene["colors"])
    assert bpy.ops.import_scene.npbgpp_bundle(filepath=str(bundle)) == {"FINISHED"}
    sc = bpy.context.scene
    assert sc.npbgpp.bundle == str(bundle)
    assert bpy.ops.wm.save_as_mainfile(filepath=str(scene["dir"] / "copy.blend"), copy=True) == {"FINISHED"}
    assert sc.npbgpp.bundle == str(bundle)
    assert bpy.ops.wm.save_as_mainfile(filepath=str(proj / "shot.blend")) == {"FINISHED"}
    assert sc.npbgpp.bundle == "//b.npbgpp"
    assert bpy.ops.wm.open_mainfile(filepath=str(scene["dir"] / "copy.blend")) == {"FINISHED"}
    assert bpy.context.scene.npbgpp.bundle == "//proj/b.npbgpp"
    blend_paths = import_module(f"{MODULE}.blend_paths")
    blend_paths.register()  # as a re-enable after a register() that failed part-way would
    assert [h.__name__ for h in bpy.app.handlers.save_pre if h.__module__ == blend_paths.__name__] == [
        "rebase_on_save"]


def test_paths_of_a_linked_scene_are_relative_to_its_library(scene):
    """A scene linked from another .blend keeps its path
    settings relative to that library file: Bundle, Dataset, ... resolve into the library's
    folder (Blender's own abspath(library=) and the hand-made path agree), and what F12
    reads (the snapshot's bundle) is that file, not one next to the open .blend."""
    from importlib import import_module

    blend_paths = import_module(f"{MODULE}.blend_paths")
    scene_snapshot = import_module(f"{MODULE}.scene_snapshot")
    lib_dir, main_dir = scene["dir"] / "library folder", scene["dir"] / "main"
    lib_dir.mkdir()
    main_dir.mkdir()
    shot = bpy.data.scenes.new("Shot")
    values = {"bundle": "//data/tiny.npbgpp", "weights": "//data/w.pt", "dataset_path": "//data/set/",
              "dataset_points": "//../elsewhere/dense.ply"}
    for name, value in values.items():
        setattr(shot.npbgpp, name, value)
    bpy.data.libraries.write(str(lib_dir / "lib.blend"), {shot})
    bpy.data.scenes.remove(shot)
    assert bpy.ops.wm.save_as_mainfile(filepath=str(main_dir / "main.blend")) == {"FINISHED"}
    with bpy.data.libraries.load(str(lib_dir / "lib.blend"), link=True, relative=True) as (_src, dst):
        dst.scenes = ["Shot"]
    linked = dst.scenes[0]
    assert linked.library is not None and linked.library.filepath.startswith("//")  # relative to main.blend
    s = linked.npbgpp
    for name, value in values.items():
        got = blend_paths.resolved(s, getattr(s, name))
        assert got == bpy.path.abspath(value, library=linked.library), name
        assert os.path.normpath(got) == os.path.normpath(os.path.join(lib_dir, value[2:])), name
        assert blend_paths.resolved(linked, value) == got  # the id itself names the same file
    assert blend_paths.resolved(s, "") == ""
    assert blend_paths.resolved(s, str(main_dir / "abs.npbgpp")) == str(main_dir / "abs.npbgpp")
    assert blend_paths.resolved(bpy.context.scene.npbgpp, "//x.npbgpp") == str(main_dir / "x.npbgpp")
    snap = scene_snapshot.snapshot(linked)
    assert os.path.normpath(snap.bundle_path) == os.path.normpath(lib_dir / "data" / "tiny.npbgpp")
    assert linked.override_create() is None  # Blender cannot override a scene: linked is the only case
    # What an operator stores reads back as the file it wrote (Aggregate, Fit, Densify, the
    # imports): a // path made against the open file named another file in a linked scene.
    assert bpy.context.preferences.filepaths.use_relative_paths
    written = os.path.normpath(main_dir / "out" / "b.npbgpp")
    assert blend_paths.stored(bpy.context.scene.npbgpp, written) == "//out/b.npbgpp"
    for owner in (s, linked, bpy.context.scene.npbgpp):
        assert os.path.normpath(blend_paths.resolved(owner, blend_paths.stored(owner, written))) == written


def _linked_scene(sc, lib):
    """``sc`` written to the .blend ``lib`` and linked from it into an empty file (the open
    file is replaced): ``(its name, lib, the linked scene)``."""
    name = sc.name
    bpy.data.libraries.write(str(lib), {sc})
    bpy.ops.wm.read_homefile(use_empty=True)
    with bpy.data.libraries.load(str(lib), link=True) as (_src, dst):
        dst.scenes = [name]
    linked = dst.scenes[0]
    assert linked.library is not None
    return name, lib, linked


def test_export_dataset_of_a_linked_scene_is_refused(scene):
    """Export Dataset of a scene linked from another .blend: its temporary camera cannot be
    linked into the scene (Blender's 'Could not (un)link' error came after the camera was
    made, which was left behind as an orphan); refused up front naming the library, nothing
    made, nothing written."""
    name, lib, linked = _linked_scene(scene["scene"], scene["dir"] / "lib_export.blend")
    objects, cameras = len(bpy.data.objects), len(bpy.data.cameras)
    out = scene["dir"] / "linked_export"
    with bpy.context.temp_override(scene=linked, view_layer=linked.view_layers[0]):
        with pytest.raises(RuntimeError, match=f"The scene '{name}' is linked from {re.escape(str(lib))}: Blender "
                                               "adds no objects to a linked scene, so the export's camera cannot go"):
            bpy.ops.npbgpp.export_dataset(directory=str(out), views=1, width=8, height=8, samples=1, points=10)
    assert (len(bpy.data.objects), len(bpy.data.cameras)) == (objects, cameras) and not out.exists()
    from blender_addon.datagen.render import render_views_of_current_scene  # its Python API: Blender's error

    with pytest.raises(RuntimeError, match=r"Could not \(un\)link the object 'npbgpp_render_camera'"):
        render_views_of_current_scene(linked, str(out), views=1, size=(8, 8), samples=1, points=10, val_views=0,
                                      test_views=0)
    assert (len(bpy.data.objects), len(bpy.data.cameras)) == (objects, cameras) and not out.exists()


def test_operators_on_a_linked_scene_say_so(scene, capfd):
    """A scene linked from another .blend (scene.library) keeps what an operator stores in
    it only until the open file is reloaded (Blender saves it in its library): Aggregate
    still runs and sets the Bundle, with a warning saying so (it said nothing). The
    operators that add a point object, which Blender cannot link into a linked scene's
    collections (Import PLY failed with Blender's own 'Could not (un)link' error, Densify
    after its work), refuse up front naming the library, adding nothing."""
    name, lib, linked = _linked_scene(_dataset_to_aggregate(scene, "nerf"), scene["dir"] / "lib.blend")
    assert linked.npbgpp.dataset_path
    out = str(scene["dir"] / "linked.npbgpp")
    capfd.readouterr()
    with bpy.context.temp_override(scene=linked, view_layer=linked.view_layers[0]):
        assert bpy.ops.npbgpp.aggregate(filepath=out) == {"FINISHED"}
        said = capfd.readouterr().out
        assert (f"Warning: The scene '{name}' is linked from {lib}: its Bundle changed here only until this file is "
                "reloaded") in said, said
        assert bpy.path.abspath(linked.npbgpp.bundle) == out and os.path.isfile(out)
        objects = len(bpy.data.objects)
        _ply(str(scene["dir"] / "more.ply"))
        for run in (lambda: bpy.ops.import_scene.npbgpp_ply(filepath=str(scene["dir"] / "more.ply")),
                    lambda: bpy.ops.import_scene.npbgpp_bundle(filepath=out),
                    lambda: bpy.ops.npbgpp.densify(filepath=str(scene["dir"] / "dense.ply"))):
            with pytest.raises(RuntimeError, match=f"The scene '{name}' is linked from {re.escape(str(lib))}: "
                                                   "Blender adds no objects to a linked scene"):
                run()
        assert len(bpy.data.objects) == objects and not (scene["dir"] / "dense.ply").exists()


def test_aggregate_subset_on_a_linked_scene_keeps_its_point_object(scene, capfd):
    """Aggregate with Max Points on a scene linked from another .blend: the bundle holds
    other points than the scene's point object, which Aggregate replaces by the bundle's
    own in a local scene; Blender links no object into a linked scene, so the bundle is
    saved and set, the point object stays, nothing is added to the file, and a warning
    names the library and what to do there (the new object's link failed with Blender's
    own error after the work, leaving an orphan object behind)."""
    name, lib, linked = _linked_scene(_dataset_to_aggregate(scene, "nerf"), scene["dir"] / "lib_subset.blend")
    point_object = linked.npbgpp.point_object
    assert point_object is not None
    objects, meshes = len(bpy.data.objects), len(bpy.data.meshes)
    out = str(scene["dir"] / "linked30.npbgpp")
    capfd.readouterr()
    with bpy.context.temp_override(scene=linked, view_layer=linked.view_layers[0]):
        assert bpy.ops.npbgpp.aggregate(filepath=out, max_points=30) == {"FINISHED"}
    said = capfd.readouterr().out
    assert bpy.path.abspath(linked.npbgpp.bundle) == out and os.path.isfile(out)
    assert linked.npbgpp.point_object == point_object
    assert (len(bpy.data.objects), len(bpy.data.meshes)) == (objects, meshes)
    assert (f"Warning: The bundle holds other points than the point object {point_object.name!r}, and the scene "
            f"'{name}' is linked from {lib}") in said, said
    assert f"open {lib} and use File > Import > NPBG++ Bundle on {out}" in said, said


def _dataset_to_aggregate(scene, folder: str, second_camera: bool = False):
    """The fixture's points written as a NeRF-Synthetic dataset ``folder`` seen by its
    camera (and a second one 2, -3.5, 1 away with ``second_camera``), imported, Weights
    cleared (the bundled network): what the Aggregate job tests start from. The scene."""
    sc, cam = scene["scene"], scene["camera"]
    cameras = [cam]
    if second_camera:
        cam2 = cam.copy()
        sc.collection.objects.link(cam2)
        cam2.location = (2.0, -3.5, 1.0)
        bpy.context.view_layer.update()
        cameras.append(cam2)
    _write_nerf_dataset(scene["dir"] / folder, cameras, scene["points"], scene["colors"])
    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(scene["dir"] / folder)) == {"FINISHED"}
    sc.npbgpp.weights = ""
    return sc


def _aggregate_stand_in(agg_op, out: str, **overrides):
    """The Python side of an Aggregate Descriptors operator writing ``out`` (Blender makes the
    real one, which a test without a window cannot): the class's job methods bound to a
    namespace whose window-side hooks (report, cleanup, status line, modal start) do nothing
    unless ``overrides`` replace them."""
    from types import SimpleNamespace

    from npbgpp_core.protocol import AGGREGATE_MAX_SIDE

    op = SimpleNamespace(filepath=out, max_points=0, max_side=AGGREGATE_MAX_SIDE, report=lambda kind, text: None,
                         _cleanup=lambda context: None, _status=lambda context, p: None,
                         _start_modal=lambda context, total: None, _worker=None, _generation=None,
                         properties=SimpleNamespace(is_property_set=lambda name: True))  # Photo Size as given
    for name, value in overrides.items():
        setattr(op, name, value)
    for name in ("_job", "_cancel_request", "_cancel_note"):
        setattr(op, name, getattr(agg_op, name))
    for name in ("_inputs", "_begin", "_step", "_progress", "_finish", "_request", "_cancel_quietly",
                 "_already_running", "_drop_after_error", "_photo_size"):
        setattr(op, name, getattr(agg_op, name).__get__(op))
    return op


def test_aggregate_modal_path_steps_views_saves_and_esc_writes_nothing(scene):
    """Aggregate in the UI (the worker step-job plumbing it shares with Densify Points and
    Fit to Photos): each timer tick aggregates one view with its status line, the tick of
    the last view saves the bundle; Esc drops the worker's aggregation and writes nothing."""
    from types import SimpleNamespace

    from npbgpp_core import protocol as P
    from npbgpp_core.scene import NeuralScene

    sc = _dataset_to_aggregate(scene, "nerf", second_camera=True)
    agg_op = sys.modules[f"{MODULE}.operators"].NPBGPP_OT_aggregate
    reports: list[tuple] = []

    def operator(out: str) -> SimpleNamespace:
        return _aggregate_stand_in(agg_op, out, report=lambda kind, text: reports.append((kind, text)),
                                   _cleanup=lambda context: reports.append(("cleanup",)),
                                   _status=lambda context, p: reports.append(("status", p.done, p.total)))

    tick, esc = SimpleNamespace(type="TIMER"), SimpleNamespace(type="ESC")
    out = str(scene["dir"] / "modal.npbgpp")
    op = operator(out)
    assert tuple(op._begin(bpy.context)) == (0, 2, False)
    assert agg_op.modal(op, bpy.context, tick) == {"RUNNING_MODAL"} and reports == [("status", 1, 2)]
    assert agg_op.modal(op, bpy.context, SimpleNamespace(type="MOUSEMOVE")) == {"PASS_THROUGH"}
    assert not os.path.exists(out)
    assert agg_op.modal(op, bpy.context, tick) == {"FINISHED"}
    assert reports[1:3] == [("status", 2, 2), ("cleanup",)], reports
    # the Saved line last (the status bar shows the last report), the unseen-points note before it
    assert reports[-1][1].startswith("Saved 60 points"), reports
    seen = int(re.search(r"\((\d+) seen by the photos\)", reports[-1][1]).group(1))
    notes = [text for _, text in reports[3:-1]]
    unseen_note = f"{seen} of the 60 points are seen"
    assert (notes == []) if seen == 60 else (len(notes) == 1 and notes[0].startswith(unseen_note)), reports
    assert sc.npbgpp.bundle == out and len(NeuralScene.load(out)) == 60
    reports.clear()
    stopped = str(scene["dir"] / "esc.npbgpp")
    op = operator(stopped)
    assert tuple(op._begin(bpy.context)) == (0, 2, False)
    assert agg_op.modal(op, bpy.context, tick) == {"RUNNING_MODAL"}
    assert agg_op.modal(op, bpy.context, esc) == {"CANCELLED"}
    assert reports[-2:] == [("cleanup",), ({"WARNING"}, "Aggregate cancelled: no bundle was written.")]
    assert not os.path.exists(stopped) and sc.npbgpp.bundle == out
    worker_error = sys.modules[f"{MODULE}.worker_client"].WorkerError
    with pytest.raises(worker_error, match="no aggregation running"):  # the worker holds none any more
        op._worker.request(P.AggregateView(1), None, 60)
    # The worker stops mid-job (Esc on an F12 kills it; so do a crash, File > New and
    # disabling the add-on): the next step says so, and starts no worker of its own.
    hub = sys.modules[f"{MODULE}.worker_client"].HUB
    for stop in ("kill", "shutdown"):
        reports.clear()
        op = operator(str(scene["dir"] / f"{stop}.npbgpp"))
        assert tuple(op._begin(bpy.context)) == (0, 2, False)
        assert agg_op.modal(op, bpy.context, tick) == {"RUNNING_MODAL"}
        proc = op._worker.proc
        if stop == "kill":
            proc.kill()
            proc.wait()
        else:
            hub.shutdown()
        assert agg_op.modal(op, bpy.context, tick) == {"CANCELLED"}
        kind, text = reports[-1]
        assert kind == {"ERROR"} and text.startswith("Aggregate failed: the NPBG++ worker stopped after the job "
                                                     "began") and text.endswith("run it again"), text
        assert not op._worker.alive() and not os.path.exists(scene["dir"] / f"{stop}.npbgpp")


def test_a_second_run_while_a_job_runs_is_refused(scene):
    """Aggregate (or Densify, Fit) started again while its modal job runs: the worker holds
    one job of a kind, so the second Begin replaced the first, whose ticks then added the
    same views twice and saved the other run's aggregation under its own name. Now the
    second run (modal or execute) is refused by name and the first finishes as if alone;
    once it ends (or its worker stops) the next run starts."""
    from types import SimpleNamespace

    from npbgpp_core.scene import NeuralScene

    _dataset_to_aggregate(scene, "nerf2", second_camera=True)
    agg_op = sys.modules[f"{MODULE}.operators"].NPBGPP_OT_aggregate
    reports: list[tuple] = []

    def operator(out: str) -> SimpleNamespace:
        return _aggregate_stand_in(agg_op, out, report=lambda kind, text: reports.append((kind, text)))

    tick = SimpleNamespace(type="TIMER")
    first, second = str(scene["dir"] / "first.npbgpp"), str(scene["dir"] / "second.npbgpp")
    op1, op2 = operator(first), operator(second)
    assert agg_op._start_job(op1, bpy.context) == {"RUNNING_MODAL"}
    assert agg_op._start_job(op2, bpy.context) == {"CANCELLED"}
    assert reports[-1][0] == {"ERROR"} and reports[-1][1].startswith("Aggregate is already running"), reports
    with pytest.raises(RuntimeError, match="Aggregate is already running"):
        bpy.ops.npbgpp.aggregate(filepath=second)
    assert agg_op.modal(op1, bpy.context, tick) == {"RUNNING_MODAL"}
    assert agg_op.modal(op1, bpy.context, tick) == {"FINISHED"}
    assert reports[-1][1].startswith("Saved 60 points") and not os.path.exists(second)
    expected = str(scene["dir"] / "alone.npbgpp")
    assert bpy.ops.npbgpp.aggregate(filepath=expected) == {"FINISHED"}  # the first run has ended
    got, want = NeuralScene.load(first), NeuralScene.load(expected)
    for name in ("points", "features"):  # each view aggregated once, as by a run alone
        np.testing.assert_allclose(getattr(got, name).detach().float().numpy(),
                                   getattr(want, name).detach().float().numpy(), atol=1e-5)
    # A job whose worker stopped mid-way (File > New, a crash) blocks nothing.
    op3 = operator(str(scene["dir"] / "third.npbgpp"))
    assert agg_op._start_job(op3, bpy.context) == {"RUNNING_MODAL"}
    op3._worker.proc.kill()
    op3._worker.proc.wait()
    assert bpy.ops.npbgpp.aggregate(filepath=second) == {"FINISHED"}


def test_a_jobs_claim_ends_with_the_job_however_it_ends(scene):
    """The one-job-per-kind claim outlived its job in two ways, refusing every later run as
    'already running' for the session: an error escaping modal() (Blender then drops the
    operator without calling cancel) and an in-process worker replaced by File > Open or
    add-on disable (HUB.shutdown; it reports alive with generation 1 for ever, and disable
    frees a running modal operator without cancel). Both now release the claim."""
    from types import SimpleNamespace

    sc = _dataset_to_aggregate(scene, "nerf2")
    ops_module = sys.modules[f"{MODULE}.operators"]
    agg_op = ops_module.NPBGPP_OT_aggregate
    hub = sys.modules[f"{MODULE}.worker_client"].HUB

    def operator(out: str) -> SimpleNamespace:
        return _aggregate_stand_in(agg_op, out)

    def broken_status(context, progress):
        raise RuntimeError("a bug in the status line")

    tick = SimpleNamespace(type="TIMER")
    op = operator(str(scene["dir"] / "first.npbgpp"))
    assert agg_op._start_job(op, bpy.context) == {"RUNNING_MODAL"}
    op._status = broken_status
    with pytest.raises(RuntimeError, match="a bug in the status line"):
        agg_op.modal(op, bpy.context, tick)
    assert op._worker.alive() and op._worker is hub.worker  # the same worker: only the claim blocked
    assert bpy.ops.npbgpp.aggregate(filepath=str(scene["dir"] / "second.npbgpp")) == {"FINISHED"}
    op = operator(str(scene["dir"] / "first.npbgpp"))
    op._status = broken_status  # the same error in invoke, after the claim
    with pytest.raises(RuntimeError, match="a bug in the status line"):
        agg_op._start_job(op, bpy.context)
    assert bpy.ops.npbgpp.aggregate(filepath=str(scene["dir"] / "second.npbgpp")) == {"FINISHED"}

    sc.npbgpp.worker_mode = "IN_PROCESS"
    op = operator(str(scene["dir"] / "third.npbgpp"))
    assert agg_op._start_job(op, bpy.context) == {"RUNNING_MODAL"}
    assert type(op._worker).__name__ == "InProcessWorker"
    hub.shutdown()  # what File > Open (load_pre) and disabling the add-on do
    assert bpy.ops.npbgpp.aggregate(filepath=str(scene["dir"] / "fourth.npbgpp")) == {"FINISHED"}
    assert os.path.isfile(scene["dir"] / "fourth.npbgpp")
    hub.shutdown()


def test_a_job_finishes_into_the_scene_it_began_in(scene):
    """A modal Aggregate set its bundle (and point object) on whichever scene was active when
    it finished: switching scenes while it ran gave another scene this dataset's bundle.
    Now the results go to the scene it began in; when that scene was deleted meanwhile,
    nothing is saved and the claim ends. And Blender's cancel (File > Open, a window
    closed) ends the timer, progress and status line as well as the worker's job."""
    from types import SimpleNamespace

    sc = _dataset_to_aggregate(scene, "nerf2")
    agg_op = sys.modules[f"{MODULE}.operators"].NPBGPP_OT_aggregate
    reports: list[tuple] = []

    def operator(out: str) -> SimpleNamespace:
        return _aggregate_stand_in(agg_op, out, report=lambda kind, text: reports.append((kind, text)),
                                   _cleanup=lambda context: reports.append(("cleanup",)))

    def shown(other):  # the user switched the window to ``other``
        return bpy.context.temp_override(scene=other, view_layer=other.view_layers[0], collection=other.collection)

    tick = SimpleNamespace(type="TIMER")
    other = bpy.data.scenes.new("Other")
    objects = set(bpy.data.objects.keys())
    out = str(scene["dir"] / "first.npbgpp")
    op = operator(out)
    assert agg_op._start_job(op, bpy.context) == {"RUNNING_MODAL"}
    with shown(other):
        assert agg_op.modal(op, bpy.context, tick) == {"FINISHED"}, reports
    assert sc.npbgpp.bundle == out and other.npbgpp.bundle == "" and other.npbgpp.point_object is None
    assert set(bpy.data.objects.keys()) == objects and not other.objects  # nothing made in the other scene

    # The scene it began in is deleted meanwhile: nothing saved, the next run starts.
    gone = sc.copy()
    gone.name = "Gone"
    gone_out = str(scene["dir"] / "gone.npbgpp")
    op = operator(gone_out)
    with shown(gone):
        assert agg_op._start_job(op, bpy.context) == {"RUNNING_MODAL"}
    bpy.data.scenes.remove(gone)
    assert agg_op.modal(op, bpy.context, tick) == {"CANCELLED"}
    assert reports[-1] == ({"ERROR"}, "Aggregate: the scene 'Gone' it was started in is gone; nothing was saved: "
                                      "run it again."), reports
    assert not os.path.exists(gone_out) and sc.npbgpp.bundle == out
    assert bpy.ops.npbgpp.aggregate(filepath=str(scene["dir"] / "next.npbgpp")) == {"FINISHED"}

    # Blender's cancel: the worker's job, the claim and the window's progress all end.
    op = operator(str(scene["dir"] / "cancelled.npbgpp"))
    assert agg_op._start_job(op, bpy.context) == {"RUNNING_MODAL"}
    op._timer = "TIMER"  # what _start_modal sets (stubbed here)
    reports.clear()
    agg_op.cancel(op, bpy.context)
    assert reports == [("cleanup",)]
    assert bpy.ops.npbgpp.aggregate(filepath=str(scene["dir"] / "after.npbgpp")) == {"FINISHED"}


def test_aggregate_after_the_file_browser_runs_as_the_modal_job(scene):
    """With an unsaved .blend, Aggregate (and Densify Points) in the UI first ask where the
    output goes; Blender then calls execute(), which ran the whole job there: Blender froze
    for its length, with no status line and no Esc. In a window it now starts the modal
    job as invoke does (ticks, claim, Esc); a script's call still runs to the end."""
    from types import SimpleNamespace

    sc = _dataset_to_aggregate(scene, "nerf2")
    assert not bpy.data.filepath
    ops_module = sys.modules[f"{MODULE}.operators"]
    agg_op = ops_module.NPBGPP_OT_aggregate
    calls: list[str] = []
    out = str(scene["dir"] / "chosen.npbgpp")
    op = SimpleNamespace(filepath="", max_points=0, max_side=ops_module.AGGREGATE_MAX_SIDE,
                         report=lambda kind, text: calls.append(text),
                         _cleanup=lambda context: calls.append("cleanup"), _status=lambda context, p: None,
                         _start_modal=lambda context, total: calls.append("modal"), _worker=None, _generation=None,
                         properties=SimpleNamespace(is_property_set=lambda name: True))  # Photo Size as given
    for name in ("_job", "_cancel_request", "_cancel_note"):
        setattr(op, name, getattr(agg_op, name))
    for name in ("_inputs", "_begin", "_step", "_progress", "_finish", "_request", "_cancel_quietly",
                 "_already_running", "_drop_after_error", "_start_job", "_photo_size"):
        setattr(op, name, getattr(agg_op, name).__get__(op))
    browser = SimpleNamespace(fileselect_add=lambda o: calls.append("browser"))
    assert ops_module.ask_for_output(op, SimpleNamespace(window_manager=browser), str(scene["dir"] / "nerf2"),
                                     ".npbgpp")
    assert calls == ["browser"] and op.filepath == "nerf2.npbgpp"
    op.filepath = out  # the user's choice
    wm = SimpleNamespace(progress_begin=lambda lo, hi: calls.append("blocking"), progress_update=lambda v: None,
                         progress_end=lambda: None)
    window = SimpleNamespace(window="WIN", window_manager=wm, scene=sc, view_layer=bpy.context.view_layer)
    assert agg_op.execute(op, window) == {"RUNNING_MODAL"}, calls
    assert calls == ["browser", "modal"] and not os.path.exists(out)
    assert agg_op.modal(op, bpy.context, SimpleNamespace(type="TIMER")) == {"FINISHED"}
    assert os.path.isfile(out) and sc.npbgpp.bundle == out
    assert bpy.ops.npbgpp.aggregate(filepath=str(scene["dir"] / "script.npbgpp")) == {"FINISHED"}  # a script
    # The user cancels the file browser instead: Blender calls cancel() on an operator that
    # began no job (no worker yet); it raised AttributeError on None.request.
    for job_op in (agg_op, ops_module.NPBGPP_OT_densify, ops_module.NPBGPP_OT_fit):
        fresh = SimpleNamespace(_worker=None, _generation=None, _job=job_op._job, _timer=None,
                                _cancel_request=job_op._cancel_request, _cleanup=lambda context: calls.append(0))
        for name in ("_request", "_cancel_quietly"):
            setattr(fresh, name, getattr(job_op, name).__get__(fresh))
        job_op.cancel(fresh, bpy.context)
    assert 0 not in calls  # no job began: another job's progress and status line stay


def test_export_dataset_cancelled_by_blender_leaves_nothing(scene):
    """Export Dataset had no cancel(): when Blender ended its modal job without a last tick
    (File > Open / New, a window closed) the half-written dataset and the scene's changed
    render settings waited for the generator's garbage collection, and the timer, progress
    cursor and status line stayed. Now cancel() does what Esc does."""
    from types import SimpleNamespace

    from blender_addon.datagen.render import render_views_steps

    sc = scene["scene"]
    bpy.ops.mesh.primitive_cube_add(size=1.0)
    export_op = sys.modules[f"{MODULE}.operators"].NPBGPP_OT_export_dataset
    out = scene["dir"] / "export"
    engine, size = sc.render.engine, (sc.render.resolution_x, sc.render.resolution_y)
    calls: list[str] = []
    op = SimpleNamespace(_cleanup=lambda context: calls.append("cleanup"), _timer="TIMER",
                         _steps=render_views_steps(sc, str(out), views=3, size=(8, 8), samples=1, points=10))
    assert next(op._steps) == (1, 3)
    assert sc.render.engine != engine or (sc.render.resolution_x, sc.render.resolution_y) != size  # mid-export
    export_op.cancel(op, bpy.context)
    assert calls == ["cleanup"] and op._steps is None
    assert not out.exists() and not [p for p in os.listdir(scene["dir"]) if p.startswith("export")]
    assert (sc.render.engine, (sc.render.resolution_x, sc.render.resolution_y)) == (engine, size)
    export_op.cancel(op, bpy.context)  # twice (the generator already closed) is harmless
    assert calls == ["cleanup", "cleanup"]
    op._timer = None  # its file browser cancelled: no job began, another job's progress stays
    export_op.cancel(op, bpy.context)
    assert calls == ["cleanup", "cleanup"]


def test_a_second_export_while_one_runs_is_refused(scene):
    """Two Export Dataset jobs at once interleaved their settings changes: the second saved
    the first's temporary render settings and camera as the scene's and restored those at
    its end (an EEVEE scene left on Cycles at 8x8 pixels, checked by hand). The second
    is now refused by name while the first runs; once it ends (or is dropped) exports start."""
    import gc

    from blender_addon.datagen.render import render_views_steps

    sc = scene["scene"]
    bpy.ops.mesh.primitive_cube_add(size=1.0)
    ops_module = sys.modules[f"{MODULE}.operators"]
    before = (sc.render.engine, sc.render.resolution_x, sc.render.resolution_y, sc.camera)
    first = render_views_steps(sc, str(scene["dir"] / "first"), views=3, size=(8, 8), samples=1, points=10)
    ops_module._claim_export(first)
    assert next(first) == (1, 3)  # running: the scene holds its temporary settings
    with pytest.raises(RuntimeError, match="Export Dataset is already running"):
        bpy.ops.npbgpp.export_dataset(directory=str(scene["dir"] / "second"), views=2, width=8, height=8,
                                      samples=1, points=10)
    assert not (scene["dir"] / "second").exists()
    assert list(first) == [(2, 3), (3, 3)]  # the first finishes as if alone
    assert (sc.render.engine, sc.render.resolution_x, sc.render.resolution_y, sc.camera) == before
    assert bpy.ops.npbgpp.export_dataset(directory=str(scene["dir"] / "second"), views=2, width=8, height=8,
                                         samples=1, points=10) == {"FINISHED"}
    assert (sc.render.engine, sc.render.resolution_x, sc.render.resolution_y, sc.camera) == before
    dropped = render_views_steps(sc, str(scene["dir"] / "dropped"), views=3, size=(8, 8), samples=1, points=10)
    ops_module._claim_export(dropped)
    next(dropped)
    del dropped  # Blender freed the operator holding it (add-on disable): its claim goes with it
    gc.collect()
    assert not ops_module._running(ops_module.EXPORT_JOB) and ops_module.EXPORT_JOB not in ops_module._RUNNING
    assert (sc.render.engine, sc.render.resolution_x, sc.render.resolution_y, sc.camera) == before


def test_outputs_never_replace_the_jobs_inputs(scene):
    """An output path typed onto a file the job reads was accepted: Aggregate with Bundle =
    the dataset's transforms_train.json wrote the bundle over it (the dataset destroyed),
    Densify onto its points3d.ply (or the scene's bundle), a bundle onto the Weights file.
    Each is refused by name, the file untouched; a new file in the dataset folder, or a
    bundle there, still works."""
    sc, cam = scene["scene"], scene["camera"]
    root = scene["dir"] / "nerf"
    _write_nerf_dataset(root, [cam], scene["points"], scene["colors"])
    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(root)) == {"FINISHED"}
    sc.npbgpp.weights = ""
    files = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    for path in (root / "transforms_train.json", root / "points3d.ply", root / "train" / "r_0.png"):
        with pytest.raises(RuntimeError, match=f"Bundle {re.escape(str(path))} is a file of the dataset"):
            bpy.ops.npbgpp.aggregate(filepath=str(path))
        # a .ply is left to the worker, which knows the dataset's cloud from an earlier dense one
        said = "Densify failed: .*output {} is an input of the scene" if path.suffix == ".ply" else \
            "Output PLY {} is a file of the dataset"
        with pytest.raises(RuntimeError, match=said.format(re.escape(str(path)))):
            bpy.ops.npbgpp.densify(filepath=str(path))
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == files
    weights = scene["dir"] / "w.safetensors"
    from npbgpp_core.pretrained import default_weights_path

    weights.write_bytes(open(default_weights_path("npbgpp", "object"), "rb").read())
    sc.npbgpp.weights = str(weights)
    with pytest.raises(RuntimeError, match="is the Weights file this job reads"):
        bpy.ops.npbgpp.aggregate(filepath=str(weights))
    inside = str(root / "mine.npbgpp")
    assert bpy.ops.npbgpp.aggregate(filepath=inside) == {"FINISHED"}
    assert bpy.ops.npbgpp.aggregate(filepath=inside) == {"FINISHED"}  # a re-run replaces its own bundle
    with pytest.raises(RuntimeError, match="Fitted Bundle .* is the Weights file this job reads"):
        bpy.ops.npbgpp.fit(steps=50, filepath=str(weights))
    bundle = bpy.path.abspath(sc.npbgpp.bundle)
    before = open(bundle, "rb").read()
    with pytest.raises(RuntimeError, match="Output PLY .* is the scene's bundle"):
        bpy.ops.npbgpp.densify(filepath=bundle)
    assert open(bundle, "rb").read() == before
    assert weights.read_bytes() == open(default_weights_path("npbgpp", "object"), "rb").read()


def test_fit_to_photos_operator(scene):
    """Fit to Photos: refused without a bundle, without the dataset or with a missing
    Weights file (naming what is missing, nothing written); after Aggregate it fits the
    bundle for Steps steps, saves <bundle>_fitted.npbgpp next to the bundle, makes it the
    scene's bundle, and the Neural image is the fitted bundle's core render."""
    from npbgpp_core.scene import NeuralScene

    sc, cam = scene["scene"], scene["camera"]
    sc.npbgpp.bundle = ""
    with pytest.raises(RuntimeError, match="needs an aggregated bundle"):
        bpy.ops.npbgpp.fit(steps=3)
    root = scene["dir"] / "nerf"
    _write_nerf_dataset(root, [cam], scene["points"], scene["colors"])
    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(root)) == {"FINISHED"}
    sc.npbgpp.weights = ""
    agg = str(scene["dir"] / "agg.npbgpp")
    assert bpy.ops.npbgpp.aggregate(filepath=agg) == {"FINISHED"}
    fitted = str(scene["dir"] / "agg_fitted.npbgpp")
    dataset = sc.npbgpp.dataset_path
    sc.npbgpp.dataset_path = ""
    with pytest.raises(RuntimeError, match="needs the dataset's photos"):
        bpy.ops.npbgpp.fit(steps=3)
    sc.npbgpp.dataset_path = dataset
    # A dataset folder moved away after the import is named as gone, not as never imported.
    os.rename(root, str(root) + "_moved")
    for run in (lambda: bpy.ops.npbgpp.fit(steps=3), lambda: bpy.ops.npbgpp.aggregate(filepath=agg),
                lambda: bpy.ops.npbgpp.densify(filepath=str(scene["dir"] / "d.ply"))):
        with pytest.raises(RuntimeError, match=f"dataset folder {re.escape(str(root))} no longer exists"):
            run()
    os.rename(str(root) + "_moved", root)
    # An output path in a missing folder is refused before the job (the file is written at its end).
    for run, field in ((lambda: bpy.ops.npbgpp.fit(steps=3, filepath=str(scene["dir"] / "no" / "f.npbgpp")),
                        "Fitted Bundle"),
                       (lambda: bpy.ops.npbgpp.aggregate(filepath=str(scene["dir"] / "no" / "a.npbgpp")), "Bundle"),
                       (lambda: bpy.ops.npbgpp.densify(filepath=str(scene["dir"] / "no" / "d.ply")), "Output PLY")):
        with pytest.raises(RuntimeError, match=f"{field} {re.escape(str(scene['dir'] / 'no'))}.*: output folder "
                                               f"does not exist: {re.escape(str(scene['dir'] / 'no'))}"):
            run()
    with pytest.raises(RuntimeError, match="is a folder"):
        bpy.ops.npbgpp.aggregate(filepath=str(scene["dir"]))
    sc.npbgpp.weights = str(scene["dir"] / "missing.safetensors")
    with pytest.raises(RuntimeError, match="missing.safetensors"):
        bpy.ops.npbgpp.fit(steps=3)
    assert not os.path.exists(fitted)
    sc.npbgpp.weights = ""
    layout = _drawn(layout=_Recorder())
    ops = layout.operators
    assert ops.index("npbgpp.fit") == ops.index("npbgpp.aggregate") + 1  # next to Aggregate
    assert layout.props.index("fit_upright") == layout.props.index("up_axis") + 1  # by the aggregate option
    # Fit Upright defaults to the library's choice and reaches the fit: the bundle renders upright
    # (the aggregated one does), the fitted one records the other choice.
    from npbgpp_core.fitting import FIT_ALIGNED

    assert type(sc.npbgpp).bl_rna.properties["fit_upright"].default == FIT_ALIGNED and sc.npbgpp.fit_upright
    assert NeuralScene.load(agg).model_config["align_during_rendering"] is True
    sc.npbgpp.fit_upright = not FIT_ALIGNED
    assert bpy.ops.npbgpp.fit(steps=3) == {"FINISHED"}
    assert sc.npbgpp.bundle == fitted
    bundle = NeuralScene.load(fitted)
    # Steps' min: fewer than 50 steps lose against no fit on real captures, so 3 is raised to 50
    assert bundle.kind == "coefficients" and bundle.metadata["fit"]["steps"] == 50
    assert bundle.model_config["align_during_rendering"] is (not FIT_ALIGNED)
    sc.npbgpp.output = "NEURAL"
    sc.render.film_transparent = False
    got = _neural_display(sc, str(scene["dir"] / "fitted.exr"))
    np.testing.assert_allclose(got, _core_render(sc, cam, bundle), atol=2e-4)
    assert np.abs(got - _core_render(sc, cam, NeuralScene.load(agg))).max() > 10 * 2e-4  # the fit changed it
    with pytest.raises(RuntimeError, match="already fitted"):  # the fitted bundle is not fitted again
        bpy.ops.npbgpp.fit(steps=3)
    # The UI's modal path: timer ticks step the fit in the worker, Esc drops it, nothing is written.
    from types import SimpleNamespace

    fit_op = sys.modules[f"{MODULE}.operators"].NPBGPP_OT_fit
    sc.npbgpp.bundle = agg
    out = str(scene["dir"] / "esc.npbgpp")
    reports: list[tuple] = []
    op = SimpleNamespace(filepath=out, steps=10_000, report=lambda kind, text: reports.append((kind, text)),
                         _cleanup=lambda context: reports.append(("cleanup",)), _status=lambda context, p: None)
    for name in ("_job", "_step_request", "_cancel_request", "_cancel_note", "_timeout"):
        setattr(op, name, getattr(fit_op, name))
    op._request = lambda name: fit_op._request(op, name)
    op._step = lambda: fit_op._step(op)
    op._cancel_quietly = lambda: fit_op._cancel_quietly(op)
    first = fit_op._begin(op, bpy.context)
    assert (first.done, first.total, first.finished) == (0, 10_000, False)
    assert fit_op.modal(op, bpy.context, SimpleNamespace(type="TIMER")) == {"RUNNING_MODAL"}  # about 0.25 s of steps
    assert fit_op.modal(op, bpy.context, SimpleNamespace(type="MOUSEMOVE")) == {"PASS_THROUGH"}
    assert fit_op.modal(op, bpy.context, SimpleNamespace(type="ESC")) == {"CANCELLED"}
    assert reports[-2:] == [("cleanup",), ({"WARNING"}, "Fit to Photos cancelled: no fitted bundle was written.")]
    assert not os.path.exists(out) and sc.npbgpp.bundle == agg
    from npbgpp_core import protocol as P

    worker_error = sys.modules[f"{MODULE}.worker_client"].WorkerError
    with pytest.raises(worker_error, match="no fit running"):  # the worker holds no fit any more
        op._worker.request(P.FitStep(), None, 60)


def _four_camera_aggregated(scene) -> str:
    """Import a NeRF dataset of the scene's camera and three more a little around it, aggregate it
    (Weights field cleared) and return the bundle's path: photos enough to keep one apart in a fit."""
    sc, cam = scene["scene"], scene["camera"]
    cams = [cam]
    for k in range(1, 4):  # three more cameras a little around the first
        other = cam.copy()
        other.data = cam.data.copy()
        other.location = (cam.location.x + 0.15 * k, cam.location.y, cam.location.z + 0.05 * k)
        sc.collection.objects.link(other)
        cams.append(other)
    root = scene["dir"] / "nerf4"
    _write_nerf_dataset(root, cams, scene["points"], scene["colors"])
    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(root)) == {"FINISHED"}
    sc.npbgpp.weights = ""
    agg = str(scene["dir"] / "agg.npbgpp")
    assert bpy.ops.npbgpp.aggregate(filepath=agg) == {"FINISHED"}
    return agg


def _kept_photo_scores(monkeypatch, scores: list[float]) -> list[float]:
    """``scores``, which ``fitting.view_psnr`` now returns one by one, in order (each popped as
    it is asked: a test refills the list for its next fit and checks it ends empty)."""
    from npbgpp_core import fitting

    monkeypatch.setattr(fitting, "view_psnr", lambda *_args: scores.pop(0))
    return scores


def _fit_through_the_operator(sc, out: str, steps: int) -> tuple[set[int], tuple]:
    """Fit to Photos of the scene's bundle to ``out`` through the operator's own begin / step /
    finish (its modal path, without the timer): (each total its progress gave, its last report).
    It ends with ``out`` the scene's bundle, its steps done the first progress's total."""
    from types import SimpleNamespace

    fit_op = sys.modules[f"{MODULE}.operators"].NPBGPP_OT_fit
    reports: list[tuple] = []
    op = SimpleNamespace(filepath=out, steps=steps, report=lambda kind, text: reports.append((kind, text)))
    for name in ("_job", "_step_request", "_cancel_request", "_cancel_note", "_timeout"):
        setattr(op, name, getattr(fit_op, name))
    op._request = lambda name: fit_op._request(op, name)
    first = fit_op._begin(op, bpy.context)
    assert first is not None, reports
    totals = {first.total}
    while True:
        progress = op._request("FitStep")
        totals.add(progress.total)
        if progress.finished:
            break
    assert progress.done == first.total
    assert fit_op._finish(op, bpy.context) == {"FINISHED"}
    assert sc.npbgpp.bundle == out
    return totals, reports[-1]


def test_fit_to_photos_checks_the_fit_on_a_held_apart_photo(scene):
    """Check Fit on a Photo (shown under Fit Upright, default the library's FIT_CHECK_VIEW)
    reaches the worker's fit: with 4 training photos the fitted bundle's metadata name the
    photo kept apart and what was kept, the bundle written is the fit or else the aggregated
    scene itself, and the operator's report says the same in one line; off, the fit is
    unchecked and the report says so."""
    from npbgpp_core.fitting import FIT_CHECK_VIEW
    from npbgpp_core.scene import NeuralScene

    sc = scene["scene"]
    agg = _four_camera_aggregated(scene)
    layout = _drawn(layout=_Recorder())
    assert layout.props.index("fit_check_view") == layout.props.index("fit_upright") + 1
    assert type(sc.npbgpp).bl_rna.properties["fit_check_view"].default == FIT_CHECK_VIEW

    sc.npbgpp.bundle, sc.npbgpp.fit_check_view = agg, True
    checked = str(scene["dir"] / "checked.npbgpp")
    totals, (kind, text) = _fit_through_the_operator(sc, checked, 50)
    saved = NeuralScene.load(checked)
    check = saved.metadata["fit"]["check"]
    assert totals == {52} and check["view"] == 2 and check["name"] == "train/r_2"
    gain = check["psnr_fitted"] - check["psnr_unfitted"]
    if check["kept"] == "fitted":
        assert saved.kind == "coefficients" and kind == {"INFO"} and gain >= -check["tolerance_db"]
        shown = float(text.split("kept the fit: ")[1].split(" dB")[0])
    else:
        assert saved.kind == "npbgpp" and kind == {"WARNING"} and gain < -check["tolerance_db"]
        assert bool((saved.features == NeuralScene.load(agg).features).all())
        shown = -float(text.split("kept the unfitted scene: the fit scored ")[1].split(" dB below it")[0])
    assert shown == pytest.approx(gain, abs=0.006)
    assert f"on held-apart photo {check['name']}; saved to {checked}" in text
    sc.npbgpp.bundle, sc.npbgpp.fit_check_view = agg, False
    plain = str(scene["dir"] / "plain.npbgpp")
    totals, (kind, text) = _fit_through_the_operator(sc, plain, 50)
    assert totals == {50} and "check" not in NeuralScene.load(plain).metadata["fit"] and kind == {"INFO"}
    assert "; the fit was not checked on a photo kept apart; saved to" in text


def test_fit_to_photos_that_loses_on_its_held_apart_photo_says_how_to_keep_a_fit(scene, monkeypatch):
    """A fit driven to lose (towards the inverted photos; in-process worker) on the photo kept
    apart: the operator warns, saves the aggregated scene itself and says how to keep a fit
    regardless; following that (Check Fit on a Photo off, fit the saved bundle again) gives a
    fitted bundle. A checked fit whose render of the kept photo is not finite (its score made
    NaN) is dropped too, and the report says the fit broke, not how to keep it."""
    import math

    from npbgpp_core import fitting
    from npbgpp_core.scene import NeuralScene

    sc = scene["scene"]
    sc.npbgpp.worker_mode = "IN_PROCESS"  # the losing loss below is this process's
    agg = _four_camera_aggregated(scene)
    monkeypatch.setattr(fitting, "coefficients_ft_loss", lambda *a, **k: lambda p, t, m: (p - (1 - t)).abs().mean())

    def fit(out: str) -> tuple:
        """Fit to Photos of the scene's bundle, 20 steps, through the operator: its report."""
        return _fit_through_the_operator(sc, out, 20)[1]

    sc.npbgpp.bundle, sc.npbgpp.fit_check_view = agg, True
    dropped = str(scene["dir"] / "dropped.npbgpp")
    kind, text = fit(dropped)
    assert NeuralScene.load(dropped).metadata["fit"]["check"]["kept"] == "unfitted"
    assert kind == {"WARNING"} and NeuralScene.load(dropped).kind == "npbgpp"
    assert text.endswith("now the scene's bundle. To keep a fit regardless, turn off Check Fit on a Photo and fit "
                         "again.")
    sc.npbgpp.fit_check_view = False
    kept = str(scene["dir"] / "kept.npbgpp")
    kind, text = fit(kept)  # the scene's bundle is now the dropped fit's file: the unfitted scene
    assert kind == {"INFO"} and NeuralScene.load(kept).kind == "coefficients" and "regardless" not in text
    real, scores = fitting.view_psnr, []

    def nan_when_fitted(*args):
        """The real score before the fit, NaN after (a fitted render that is not finite)."""
        scores.append(real(*args) if not scores else math.nan)
        return scores[-1]

    monkeypatch.setattr(fitting, "view_psnr", nan_when_fitted)
    sc.npbgpp.bundle, sc.npbgpp.fit_check_view = agg, True
    broken = str(scene["dir"] / "broken.npbgpp")
    kind, text = fit(broken)
    check = NeuralScene.load(broken).metadata["fit"]["check"]
    assert len(scores) == 2 and check["kept"] == "unfitted" and check["psnr_fitted"] is None
    assert kind == {"WARNING"} and "regardless" not in text
    assert text.endswith(f"the fit's render of held-apart photo {check['name']} was not finite; saved to {broken}, "
                         "now the scene's bundle. The fit itself broke (its render was not finite), so it is not "
                         "worth keeping: the scene renders as before the fit.")


def test_fit_to_photos_also_tries_whole_views_when_asked(scene, monkeypatch):
    """Also Try Whole Views On (drawn under Check Fit on a Photo, Auto by default, greyed while the
    check is off) reaches the worker's fit (in-process, the kept photo's scores set here: the
    whole-view fit's best): the progress counts both fits' steps, the bundle's metadata and the
    report name the recipe kept, the report gives both fits' steps and the chosen one's, and the
    bundle is the whole-view recipe's fit. With the check off the box is ignored: a plain fit of
    its own steps."""
    import torch

    from npbgpp_core import fitting
    from npbgpp_core import protocol as P
    from npbgpp_core.scene import NeuralScene
    from npbgpp_core.scene_fit import fit_bundle

    sc = scene["scene"]
    sc.npbgpp.worker_mode = "IN_PROCESS"  # the scores below are this process's
    props = type(sc.npbgpp).bl_rna.properties
    assert props["fit_check_whole_views"].default == "AUTO" and P.FitBegin("b", "d").check_recipes == ()
    for check in (True, False):
        sc.npbgpp.fit_check_view = check
        layout = _drawn()
        assert layout.props.index("fit_check_whole_views") == layout.props.index("fit_check_view") + 1
        assert layout.states["fit_check_whole_views"][1] is check and layout.states["fit_check_view"][1]
    agg = _four_camera_aggregated(scene)

    def fit(out: str, steps: int) -> tuple:
        """Fit the aggregated scene to Photos through the operator: (the totals seen, its report)."""
        sc.npbgpp.bundle = agg
        return _fit_through_the_operator(sc, out, steps)

    # the kept photo unfitted, after the crops' fit, after the whole views'
    scores = _kept_photo_scores(monkeypatch, [20.0, 19.0, 21.9])
    sc.npbgpp.fit_check_view, sc.npbgpp.fit_check_whole_views = True, "ON"
    chosen = str(scene["dir"] / "whole.npbgpp")
    totals, (kind, text) = fit(chosen, 20)  # crops' steps other than the whole views' 50
    saved = NeuralScene.load(chosen)
    check = saved.metadata["fit"]["check"]
    assert totals == {20 + fitting.WHOLE_VIEW_STEPS + 2} and scores == []
    assert check["recipe"] == "whole" and [(c["recipe"], c["steps"]) for c in check["candidates"]] == [
        ("crops", 20), ("whole", fitting.WHOLE_VIEW_STEPS)]
    assert check["kept"] == "fitted" and saved.kind == "coefficients" and kind == {"INFO"}
    assert saved.metadata["fit"]["steps"] == fitting.WHOLE_VIEW_STEPS
    assert text.startswith(f"Fitted {20 + fitting.WHOLE_VIEW_STEPS} steps in ")
    chosen_fit = saved.metadata["fit"]  # the chosen fit's steps and losses
    assert (f" s over both recipes (the one chosen: {chosen_fit['steps']} steps, loss "
            f"{chosen_fit['loss_first']:.4f} -> {chosen_fit['loss_last']:.4f}); " in text)
    assert (f"; kept the fit (whole views): +1.90 dB on held-apart photo {check['name']}; saved to {chosen}"
            in text)
    scores[:] = [20.0, 21.9]  # the whole-view recipe alone, from the same unfitted scene and seed
    alone = str(scene["dir"] / "whole_alone.npbgpp")
    fit_bundle(agg, str(scene["dir"] / "nerf4"), alone, steps=50, check_view=True, check_recipes=("whole",))
    assert torch.equal(saved.features, NeuralScene.load(alone).features)
    sc.npbgpp.fit_check_view = False  # the box stays on, unused
    plain = str(scene["dir"] / "plain.npbgpp")
    totals, (kind, text) = fit(plain, 50)
    assert totals == {50} and "check" not in NeuralScene.load(plain).metadata["fit"]
    assert text.startswith("Fitted 50 steps in ") and "recipes" not in text
    assert "; the fit was not checked on a photo kept apart; saved to" in text


def test_fit_to_photos_keeps_the_average_of_both_fits_when_asked(scene, monkeypatch):
    """Keep (drawn under Also Try Whole Views, Better on Kept Photo by default, greyed unless the
    check and Also Try Whole Views are on; its identifiers protocol.CHECK_COMBINES upper-cased) set to
    Average of Both reaches the worker's fit (in-process, the kept photo's scores set here: the
    average's within the tolerance, above both fits'): the bundle is, bit for bit, the mean of each
    recipe's fit alone, its metadata and the report name the average. With Also Try Whole Views off
    the setting is ignored: the worker is asked for the core's default (protocol.FIT_CHECK_COMBINE,
    choosing), as older callers are."""
    import torch

    from npbgpp_core import fitting
    from npbgpp_core import protocol as P
    from npbgpp_core.scene import NeuralScene
    from npbgpp_core.scene_fit import fit_bundle

    sc = scene["scene"]
    sc.npbgpp.worker_mode = "IN_PROCESS"  # the scores below are this process's
    prop = type(sc.npbgpp).bl_rna.properties["fit_check_combine"]
    assert prop.default == P.FIT_CHECK_COMBINE.upper() == "CHOOSE" and prop.name == "Keep"
    assert [item.identifier.lower() for item in prop.enum_items] == list(P.CHECK_COMBINES)
    assert [item.name for item in prop.enum_items] == ["Better on Kept Photo", "Average of Both"]
    for check, whole in ((True, "ON"), (True, "OFF"), (True, "AUTO"), (False, "ON")):
        sc.npbgpp.fit_check_view, sc.npbgpp.fit_check_whole_views = check, whole
        layout = _drawn()
        assert layout.props.index("fit_check_combine") == layout.props.index("fit_check_whole_views") + 1
        assert layout.states["fit_check_combine"][1] is (check and whole == "ON")  # Auto averages
    agg = _four_camera_aggregated(scene)
    # unfitted, after the crops' fit, the whole views', their average
    scores = _kept_photo_scores(monkeypatch, [20.0, 19.0, 19.5, 19.7])
    sent: list = []
    real_begin = fitting.iter_fit_coefficients

    def begin(*args, **kwargs):  # what the worker's fit was asked for
        sent.append(kwargs.get("check_combine"))
        return real_begin(*args, **kwargs)

    monkeypatch.setattr(fitting, "iter_fit_coefficients", begin)
    sc.npbgpp.fit_check_view, sc.npbgpp.fit_check_whole_views = True, "ON"
    sc.npbgpp.fit_check_combine = "AVERAGE"
    sc.npbgpp.bundle = agg
    averaged = str(scene["dir"] / "average.npbgpp")
    totals, (kind, text) = _fit_through_the_operator(sc, averaged, 20)
    saved = NeuralScene.load(averaged)
    check = saved.metadata["fit"]["check"]
    assert sent == ["average"] and scores == [] and totals == {20 + fitting.WHOLE_VIEW_STEPS + 2}
    assert check["recipe"] == "average" and check["combine"] == "average" and check["kept"] == "fitted"
    assert kind == {"INFO"} and text.startswith(f"Fitted {20 + fitting.WHOLE_VIEW_STEPS} steps in ")
    assert " s over both recipes and averaged them (the crops fit: 20 steps, loss " in text
    assert (f"; kept the fit (average of crops and whole views): -0.30 dB (within the 0.50 dB the check allows) on "
            f"held-apart photo {check['name']}; saved to {averaged}" in text)
    alone = {}
    for name, steps in (("crops", 20), ("whole", fitting.WHOLE_VIEW_STEPS)):
        scores[:] = [20.0, 21.0]  # each recipe alone, from the same unfitted scene and seed
        path = str(scene["dir"] / f"{name}_alone.npbgpp")
        fit_bundle(agg, str(scene["dir"] / "nerf4"), path, steps=steps, check_view=True, check_recipes=(name,))
        alone[name] = NeuralScene.load(path)
    mean = fitting.average_states([{"f": alone["crops"].features}, {"f": alone["whole"].features}])["f"]
    assert torch.equal(saved.features, mean) and not torch.equal(saved.features, alone["crops"].features)
    sc.npbgpp.fit_check_whole_views = "OFF"  # Keep stays on Average of Both, unused
    sent.clear()
    scores[:] = [20.0, 21.0]
    sc.npbgpp.bundle = agg  # the fit above made its bundle the scene's
    _, (kind, text) = _fit_through_the_operator(sc, str(scene["dir"] / "plain.npbgpp"), 20)
    assert sent == ["choose"] and "average" not in text and "recipes" not in text
    sc.npbgpp.fit_check_combine = "CHOOSE"


def test_fit_to_photos_whose_average_broke_advises_choosing_when_a_recipe_alone_would_be_kept(scene, monkeypatch):
    """Keep: Average of Both whose average renders the kept photo not finite (scores set here, in-process):
    the average is dropped; when one recipe's own render was finite and within the check's allowance the
    report advises Keep: Better on Kept Photo, naming that fit, and following it keeps that fit; when no
    recipe's render was finite, or the finite one scored too low to be kept, the report keeps saying the
    fit itself broke."""
    import math

    from npbgpp_core.scene import NeuralScene

    sc = scene["scene"]
    sc.npbgpp.worker_mode = "IN_PROCESS"  # the scores below are this process's
    agg = _four_camera_aggregated(scene)
    scores = _kept_photo_scores(monkeypatch, [])
    sc.npbgpp.fit_check_view, sc.npbgpp.fit_check_whole_views = True, "ON"
    advice = ("The average of both fits broke (its render was not finite), but the whole views fit alone scored "
              "within what the check allows: set Keep to Better on Kept Photo and fit again to keep it.")
    broke = ("The fit itself broke (its render was not finite), so it is not worth keeping: the scene renders as "
             "before the fit.")
    # unfitted, after the crops' fit, the whole views', their average
    for name, kept_scores, ending in (("one_sound", [20.0, 19.0, 19.8, math.nan], advice),
                                      ("none_finite", [20.0, math.nan, math.nan, math.nan], broke),
                                      ("too_low", [20.0, 18.0, math.nan, math.nan], broke)):
        sc.npbgpp.fit_check_combine = "AVERAGE"
        sc.npbgpp.bundle = agg
        scores[:] = kept_scores
        out = str(scene["dir"] / f"{name}.npbgpp")
        _, (kind, text) = _fit_through_the_operator(sc, out, 20)
        check = NeuralScene.load(out).metadata["fit"]["check"]
        assert scores == [] and check["kept"] == "unfitted" and check["combine"] == "average", name
        assert kind == {"WARNING"} and text.endswith(f"now the scene's bundle. {ending}"), (name, text)
        assert "regardless" not in text, name
    sc.npbgpp.fit_check_combine = "CHOOSE"  # the advice followed: the same fits, now chosen between
    sc.npbgpp.bundle = agg
    scores[:] = [20.0, 19.0, 19.8]
    chosen = str(scene["dir"] / "chosen.npbgpp")
    _, (kind, text) = _fit_through_the_operator(sc, chosen, 20)
    check = NeuralScene.load(chosen).metadata["fit"]["check"]
    assert scores == [] and check["kept"] == "fitted" and check["recipe"] == "whole" and kind == {"INFO"}
    assert NeuralScene.load(chosen).kind == "coefficients" and "kept the fit (whole views): -0.20 dB" in text


def test_fit_to_photos_auto_averages_both_fits_by_the_photos_size(scene, monkeypatch):
    """Also Try Whole Views on Auto (the default) asks the worker for the users' default, which the fit
    decides by the photos' long side (32 px here, the range of protocol.auto_check_recipes made tiny):
    inside it both recipes averaged, the bundle's metadata and the report saying the size rule chose them;
    outside it, or with Off (or the check off), the plain check."""
    from npbgpp_core import fitting
    from npbgpp_core import protocol as P
    from npbgpp_core.scene import NeuralScene

    sc = scene["scene"]
    sc.npbgpp.worker_mode = "IN_PROCESS"  # the scores and the range below are this process's
    assert sc.npbgpp.fit_check_whole_views == "AUTO" and sc.npbgpp.fit_check_view
    agg = _four_camera_aggregated(scene)  # 24x32 photos, 3 of them fitted
    sent: list = []
    real_begin = fitting.iter_fit_coefficients

    def begin(*args, **kwargs):  # what the worker's fit was asked for
        sent.append((kwargs.get("check_recipes"), kwargs.get("check_combine")))
        return real_begin(*args, **kwargs)

    monkeypatch.setattr(fitting, "iter_fit_coefficients", begin)
    monkeypatch.setattr(P, "AUTO_AVERAGE_LOW_SIDE", 24)
    monkeypatch.setattr(P, "AUTO_AVERAGE_HIGH_SIDE", 32)
    scores = _kept_photo_scores(monkeypatch, [20.0, 19.0, 19.5, 19.7])  # unfitted, crops, whole, average
    sc.npbgpp.bundle = agg
    averaged = str(scene["dir"] / "auto_average.npbgpp")
    totals, (kind, text) = _fit_through_the_operator(sc, averaged, 20)
    fit = NeuralScene.load(averaged).metadata["fit"]
    assert sent == [(P.CHECK_RECIPES, "average")] and scores == [] and totals == {20 + fitting.WHOLE_VIEW_STEPS + 2}
    assert fit["check"]["recipe"] == "average" and fit["recipes_by_size"] == {
        "long_side": 32, "range": [24, 32], "recipes": ["crops", "whole"], "combine": "average"}
    assert kind == {"INFO"} and " s over both recipes and averaged them (the crops fit: 20 steps, loss " in text
    assert ("-0.30 dB (within the 0.50 dB the check allows) on held-apart photo "
            f"{fit['check']['name']}; both recipes averaged: photos 32 px, within the 24-32 px range where the size "
            f"rule averages them; saved to {averaged}") in text
    for name, low, whole in (("above", 33, "AUTO"), ("off", 24, "OFF")):
        monkeypatch.setattr(P, "AUTO_AVERAGE_LOW_SIDE", low)
        sc.npbgpp.fit_check_whole_views = whole
        sent.clear()
        scores[:] = [20.0, 21.0]
        sc.npbgpp.bundle = agg
        out = str(scene["dir"] / f"auto_{name}.npbgpp")
        totals, (kind, text) = _fit_through_the_operator(sc, out, 20)
        fit = NeuralScene.load(out).metadata["fit"]
        assert sent == [((), "choose")] and scores == [] and totals == {20 + 2}, name
        assert "candidates" not in fit["check"] and "averaged" not in text and "recipes" not in text, name
        assert text.startswith("Fitted 20 steps in ") and "; kept the fit: +1.00 dB on held-apart photo" in text
        assert ("recipes_by_size" in fit) is (whole == "AUTO"), name
    sc.npbgpp.fit_check_whole_views = "AUTO"
    sc.npbgpp.fit_check_view = False  # no check: nothing for the size rule to choose on
    sent.clear()
    sc.npbgpp.bundle = agg
    out = str(scene["dir"] / "auto_unchecked.npbgpp")
    totals, (kind, text) = _fit_through_the_operator(sc, out, 20)
    assert sent == [((), "choose")] and totals == {20}
    assert "recipes_by_size" not in NeuralScene.load(out).metadata["fit"] and "averaged" not in text
    sc.npbgpp.fit_check_view = True


def test_fit_to_photos_whose_auto_average_broke_advises_on_and_choosing(scene, monkeypatch):
    """Auto's average broken by one recipe (its render not finite) while the other alone scored
    within the allowance: Keep is not used on Auto, so the advice names both settings (Also Try
    Whole Views On and Keep on Better on Kept Photo); followed, the same fits keep the sound one."""
    import math

    from npbgpp_core import protocol as P
    from npbgpp_core.scene import NeuralScene

    sc = scene["scene"]
    sc.npbgpp.worker_mode = "IN_PROCESS"  # the scores and the range below are this process's
    agg = _four_camera_aggregated(scene)  # 24x32 photos
    monkeypatch.setattr(P, "AUTO_AVERAGE_LOW_SIDE", 24)
    monkeypatch.setattr(P, "AUTO_AVERAGE_HIGH_SIDE", 32)
    scores = _kept_photo_scores(monkeypatch, [20.0, 19.0, 19.8, math.nan])  # unfitted, crops, whole, average
    sc.npbgpp.fit_check_view, sc.npbgpp.fit_check_whole_views = True, "AUTO"
    sc.npbgpp.fit_check_combine = "CHOOSE"  # unused on Auto: the advice cannot be this setting alone
    sc.npbgpp.bundle = agg
    out = str(scene["dir"] / "auto_broke.npbgpp")
    _, (kind, text) = _fit_through_the_operator(sc, out, 20)
    fit = NeuralScene.load(out).metadata["fit"]
    assert scores == [] and fit["check"]["kept"] == "unfitted" and fit["recipes_by_size"]["combine"] == "average"
    assert kind == {"WARNING"} and text.endswith(
        "now the scene's bundle. The average of both fits broke (its render was not finite), but the whole views "
        "fit alone scored within what the check allows: set Also Try Whole Views to On and Keep to Better on Kept "
        "Photo and fit again to keep it."), text
    sc.npbgpp.fit_check_whole_views = "ON"  # the advice followed
    sc.npbgpp.bundle = agg
    scores[:] = [20.0, 19.0, 19.8]
    chosen = str(scene["dir"] / "auto_broke_chosen.npbgpp")
    _, (kind, text) = _fit_through_the_operator(sc, chosen, 20)
    assert scores == [] and kind == {"INFO"} and "kept the fit (whole views): -0.20 dB" in text
    sc.npbgpp.fit_check_whole_views = "AUTO"


def test_also_try_whole_views_of_a_blend_saved_with_the_old_checkbox_reads_back(scene):
    """A .blend saved while Also Try Whole Views was a checkbox (BoolProperty) reads back with the
    add-on's choice: a stored True as On, a stored False as Off, never set as the default Auto
    (the item numbers OFF 0, ON 1, AUTO 2 match the stored bool). Measured with the old definition
    registered, the file saved, the add-on's own definition registered in its place, the file opened."""
    properties = sys.modules[f"{MODULE}.properties"]
    # the add-on's own definition (its annotations are strings: the module's __future__ annotations)
    new_prop = eval(properties.NPBGPPSceneSettings.__annotations__["fit_check_whole_views"], vars(properties))

    def register(prop):
        group = type("NPBGPPWholeViewsMigration", (bpy.types.PropertyGroup,), {"__annotations__": {
            "fit_check_whole_views": prop}})
        bpy.utils.register_class(group)
        bpy.types.Scene.npbgpp_whole_views_migration = bpy.props.PointerProperty(type=group)
        return group

    def unregister(group):
        del bpy.types.Scene.npbgpp_whole_views_migration
        bpy.utils.unregister_class(group)

    old = register(bpy.props.BoolProperty(name="Also Try Whole Views", default=False))
    try:
        for name, value in (("stored_true", True), ("stored_false", False), ("never_set", None)):
            sc = bpy.data.scenes.new(name)
            if value is not None:
                sc.npbgpp_whole_views_migration.fit_check_whole_views = value
        assert bpy.data.scenes["stored_false"].npbgpp_whole_views_migration.is_property_set("fit_check_whole_views")
        blend = str(scene["dir"] / "old_checkbox.blend")
        assert bpy.ops.wm.save_as_mainfile(filepath=blend) == {"FINISHED"}
    finally:
        unregister(old)
    new = register(new_prop)
    try:
        assert bpy.ops.wm.open_mainfile(filepath=blend) == {"FINISHED"}
        read = {name: bpy.data.scenes[name].npbgpp_whole_views_migration.fit_check_whole_views
                for name in ("stored_true", "stored_false", "never_set")}
        assert read == {"stored_true": "ON", "stored_false": "OFF", "never_set": "AUTO"}
        assert bpy.data.scenes["never_set"].npbgpp.fit_check_whole_views == "AUTO"  # the add-on's own too
    finally:
        unregister(new)


def _png_rgb(sc, path) -> np.ndarray:
    """F12 saved as Blender saves renders: an 8-bit RGB PNG, its codes (0 .. 255) as floats."""
    from PIL import Image

    sc.render.image_settings.media_type = "IMAGE"
    sc.render.image_settings.file_format = "PNG"
    sc.render.image_settings.color_mode = "RGB"
    sc.render.image_settings.color_depth = "8"
    sc.render.filepath = str(path)
    bpy.ops.render.render(write_still=True)
    return np.asarray(Image.open(path)).astype(np.float64)


def linear_to_srgb(x: np.ndarray) -> np.ndarray:
    x = np.clip(np.asarray(x, np.float64), 0.0, 1.0)
    return np.where(x <= 0.0031308, x * 12.92, 1.055 * x ** (1 / 2.4) - 0.055)


COLOUR_NOTE = "changes the network's colours"


def test_import_dataset_sets_photo_colours_and_renders_say_when_they_differ(scene, capfd):
    """Blender 5's default view transform (AgX) tone-maps what the engine writes: a user's
    imported photos rendered desaturated. Import Dataset sets Standard (look None, exposure
    0, gamma 1) and says so; an F12's 8-bit PNG then equals sRGB of the written linear values
    (Blender's own EXR) within 1/255 under the default dither. A user who sets AgX after the
    import keeps it: the render only notes it, once per job, and not under Standard."""
    sc = scene["scene"]
    v = sc.view_settings
    v.view_transform, v.exposure, v.gamma = "AgX", 0.5, 1.2
    sc.render.dither_intensity = 1.0  # factory settings
    sc.render.film_transparent = False
    capfd.readouterr()
    _import_nerf_dataset(scene)
    out = capfd.readouterr().out
    assert (v.view_transform, v.look, v.exposure, v.gamma) == ("Standard", "None", 0.0, 1.0)
    assert ("Info: Colour management set for the photos' colours (was View Transform AgX, Exposure 0.5, Gamma 1.2; "
            "now View Transform Standard, neutral)") in out
    assert "Render Properties > Color Management" in out
    exr = render_exr(sc, str(scene["dir"] / "linear.exr"))
    linear = passes(exr, "Combined")
    assert (linear[..., :3].max(axis=-1) > 0.05).sum() >= 5  # points drawn, not an empty frame
    codes = np.round(linear_to_srgb(linear[..., :3]) * 255)
    png = _png_rgb(sc, scene["dir"] / "standard.png")
    assert np.abs(png - codes).max() <= 1  # the dither's noise: one 8-bit step at most
    sc.render.dither_intensity = 0.0
    assert (_png_rgb(sc, scene["dir"] / "standard_no_dither.png") == codes).all()
    assert COLOUR_NOTE not in capfd.readouterr().out

    v.view_transform = "AgX"  # the user's choice after the import
    sc.frame_start, sc.frame_end = 1, 2
    sc.render.filepath = str(scene["dir"] / "agx_")
    bpy.ops.render.render(animation=True)
    out = capfd.readouterr().out
    assert out.count(f"Info: NPBG++: the scene's colour management (View Transform AgX) {COLOUR_NOTE}") == 1
    assert v.view_transform == "AgX"  # noted, not changed
    png = _png_rgb(sc, scene["dir"] / "agx.png")
    assert np.abs(png - codes).max() > 10  # what the note is about
    assert v.view_transform == "AgX" and out.count(COLOUR_NOTE) == 1


def test_an_output_colour_override_is_noted(scene, capfd):
    """Output Properties > Output > Color Management: Override gives saved images their own
    view transform: after the import set the scene to Standard, an override to AgX still
    saved tone-mapped frames (blender -b -f), and the render said nothing. Now it notes the
    override once per job; an override that is neutral, or a linear format (EXR), says nothing."""
    from PIL import Image

    sc = scene["scene"]
    sc.render.film_transparent = False
    _import_nerf_dataset(scene)
    plain = _png_rgb(sc, scene["dir"] / "follow.png")
    image = sc.render.image_settings
    image.color_management = "OVERRIDE"
    image.view_settings.view_transform = "AgX"
    image.view_settings.look = "None"
    capfd.readouterr()
    sc.frame_start, sc.frame_end = 1, 2
    sc.render.filepath = str(scene["dir"] / "agx_")
    bpy.ops.render.render(animation=True)
    out = capfd.readouterr().out
    assert out.count("Info: NPBG++: the output's colour management override (View Transform AgX) changes the "
                     "network's colours in the saved images") == 1, out
    saved = np.asarray(Image.open(scene["dir"] / "agx_0001.png")).astype(np.float64)[..., :3]
    assert np.abs(saved - plain).max() > 10  # what the note is about
    assert "scene's colour management" not in out  # the scene's own view is neutral
    image.view_settings.view_transform = "Standard"
    assert (_png_rgb(sc, scene["dir"] / "neutral.png") == plain).all()
    image.view_settings.view_transform = "AgX"
    image.media_type = "MULTI_LAYER_IMAGE"
    image.color_management = "OVERRIDE"
    render_exr(sc, str(scene["dir"] / "linear.exr"))
    assert COLOUR_NOTE not in capfd.readouterr().out


def test_colour_changes_names_each_setting(addon, tmp_path):
    """colour_changes / use_photo_colours on a new scene, one setting at a time: each named;
    Raw kept (exact too); the display device left (it is the user's monitor), noted only for
    saved 8-bit files, whose values it changes (checked with Blender's own save_render)."""
    from importlib import import_module

    colour = import_module(f"{MODULE}.colour")
    sc = bpy.data.scenes.new("colour check")
    try:
        v = sc.view_settings
        assert colour.colour_changes(sc) == ["View Transform AgX"]  # a new scene's default
        v.view_transform = "Raw"
        assert colour.colour_changes(sc) == [] and colour.colour_note(sc) == "" and colour.use_photo_colours(sc) == ""
        v.view_transform = "Standard"
        v.look = "Medium High Contrast"
        v.use_curve_mapping = True
        assert colour.colour_changes(sc) == ["Look Medium High Contrast", "Curves on"]
        assert "Look Medium High Contrast" in colour.use_photo_colours(sc)
        assert (v.look, v.use_curve_mapping, v.view_transform) == ("None", False, "Standard")
        sc.display_settings.display_device = "Display P3"
        assert colour.colour_changes(sc) == []  # the screen maps linear values to the monitor correctly
        sc.render.image_settings.file_format = "PNG"
        assert "Display Device Display P3 encodes saved 8-bit images" in colour.colour_note(sc)
        assert colour.use_photo_colours(sc) == "" and sc.display_settings.display_device == "Display P3"
        sc.render.dither_intensity = 0.0
        img = bpy.data.images.new("display check", 2, 1, float_buffer=True)
        img.pixels.foreach_set(np.array([0.8, 0.1, 0.05, 1, 0.1, 0.7, 0.1, 1], np.float32))
        saved = {}
        for device in ("Display P3", "sRGB"):  # what the note is about: the saved values move
            sc.display_settings.display_device = device
            path = str(tmp_path / f"{device}.png")
            img.save_render(path, scene=sc)
            loaded = bpy.data.images.load(path)
            saved[device] = np.round(np.array(loaded.pixels[:]).reshape(-1, 4)[:, :3] * 255)
            bpy.data.images.remove(loaded)
        bpy.data.images.remove(img)
        assert np.abs(saved["Display P3"] - saved["sRGB"]).max() > 10
        assert colour.colour_note(sc) == ""  # sRGB again
        sc.display_settings.display_device = "Display P3"
        sc.render.image_settings.file_format = "OPEN_EXR"  # stores the linear values: nothing to note
        assert colour.colour_note(sc) == ""
        sc.render.image_settings.file_format = "PNG"
        image = sc.render.image_settings
        image.color_management = "OVERRIDE"  # the override's own device decides
        image.view_settings.view_transform = "Standard"
        image.display_settings.display_device = "sRGB"
        assert colour.colour_note(sc) == ""
        image.display_settings.display_device = "Display P3"
        assert colour.output_colour_changes(sc) == ["Display Device Display P3"]
    finally:
        bpy.data.scenes.remove(sc)


def test_viewport_header_names_what_changes_the_colours(addon):
    """The rendered viewport's header line (its draw returns early in background mode, so
    the text is built apart): the status alone under a neutral view, else the status and
    the settings that change the network's colours."""
    from importlib import import_module

    viewport = import_module(f"{MODULE}.viewport")
    sc = bpy.data.scenes.new("header check")
    try:
        sc.view_settings.view_transform, sc.view_settings.exposure = "AgX", 1.0
        assert viewport.header_text("2 of 4 tiles", sc) == ("2 of 4 tiles | Color Management (View Transform AgX, "
                                                            "Exposure 1) changes the network's colours")
        assert viewport.header_text("", sc).startswith("Color Management (View Transform AgX")
        sc.view_settings.view_transform, sc.view_settings.exposure = "Standard", 0.0
        assert viewport.header_text("2 of 4 tiles", sc) == "2 of 4 tiles" and viewport.header_text("", sc) == ""
        sc.display_settings.display_device = "Display P3"  # Blender maps the engine's values to the monitor
        assert viewport.header_text("2 of 4 tiles", sc) == "2 of 4 tiles"
    finally:
        bpy.data.scenes.remove(sc)


def test_import_bundle_sets_photo_colours(scene, capfd):
    """Import Bundle sets the scene up for neural renders as Import Dataset does: a Filmic
    view with a look becomes Standard, look None, and the info line names what it was; a
    second import into the now neutral scene says nothing of colour."""
    sc = scene["scene"]
    v = sc.view_settings
    v.view_transform, v.look = "Filmic", "High Contrast"
    _tiny_bundle(str(scene["dir"] / "tiny.npbgpp"), scene["points"], scene["colors"])
    capfd.readouterr()
    assert bpy.ops.import_scene.npbgpp_bundle(filepath=str(scene["dir"] / "tiny.npbgpp")) == {"FINISHED"}
    assert (v.view_transform, v.look) == ("Standard", "None")
    assert "(was View Transform Filmic, Look High Contrast; now View Transform Standard" in \
        capfd.readouterr().out
    assert bpy.ops.import_scene.npbgpp_bundle(filepath=str(scene["dir"] / "tiny.npbgpp")) == {"FINISHED"}
    assert "Colour management" not in capfd.readouterr().out


def _write_cloudless(kind: str, root) -> None:
    """A dataset folder of ``kind`` with cameras and photos and no point cloud: an existing
    small test scene's layout with its cloud removed."""
    import json

    from PIL import Image

    if kind == "colmap":  # a COLMAP model without points3D
        from test_capture_import import write_capture

        write_capture(str(root), n_views=2)
        os.remove(root / "sparse" / "0" / "points3D.txt")
    elif kind == "nerfstudio":  # instant-ngp's transforms.json: no ply_file_path, no cloud
        (root / "images").mkdir(parents=True)
        frames = []
        for i in range(2):
            Image.fromarray(np.full((24, 32, 3), 60 + 40 * i, np.uint8)).save(root / "images" / f"f{i}.png")
            c2w = np.eye(4)
            c2w[:3, 3] = (0.3 * i, -4.0, 0.5)
            c2w[:3, :3] = [[1, 0, 0], [0, 0, 1], [0, -1, 0]]
            frames.append({"file_path": f"images/f{i}.png", "transform_matrix": c2w.tolist(), "fl_x": 30.0,
                           "fl_y": 30.0, "cx": 16.0, "cy": 12.0, "w": 32, "h": 24})
        (root / "transforms.json").write_text(json.dumps({"frames": frames}))
    else:  # NeRF-Synthetic without points3d.ply
        from _mvs_scene import render as trace
        from _mvs_scene import ring_cameras, write_nerf

        cams = ring_cameras(6, size=(90, 120))
        write_nerf(root, cams, [trace(c) for c in cams], sphere_only_alpha=True)
        os.remove(root / "points3d.ply")


@pytest.mark.parametrize("kind, fmt, loader_says", [
    ("nerf", "AUTO", "no point cloud found"),
    ("colmap", "COLMAP", "points3D file is missing"),
    ("nerfstudio", "NERFSTUDIO", "no ply_file_path and no point cloud"),
])
def test_import_dataset_without_a_cloud_makes_cameras_and_points_at_densify(scene, capfd, kind, fmt, loader_says):
    """A capture with cameras and no point cloud (each format's own "no cloud" case) imports:
    its cameras, no point object (the older one is no longer the scene's), an info line with
    the loader's message and Densify Points' place; Aggregate and F12 (Points) refuse with a
    message naming Densify Points, writing nothing (Import Dataset refused such folders)."""
    sc = scene["scene"]
    root = scene["dir"] / kind
    _write_cloudless(kind, root)
    cameras_before = {o for o in sc.objects if o.type == "CAMERA"}
    old_bundle = scene["dir"] / "old.npbgpp"
    _tiny_bundle(str(old_bundle), scene["points"], scene["colors"])
    sc.npbgpp.bundle = str(old_bundle)
    capfd.readouterr()
    # (the COLMAP capture's camera has lens distortion)
    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(root), format=fmt, undistort=kind == "colmap") \
        == {"FINISHED"}
    out = capfd.readouterr().out
    info = [line for line in out.splitlines() if "no point cloud" in line and line.startswith("Info: ")]
    assert len(info) == 1, out
    assert loader_says in info[0] and "Densify Points (Render Properties > NPBG++ > Data) makes a cloud" in info[0]
    assert "Warning: The scene's bundle" in out and sc.npbgpp.bundle == ""  # another cloud's bundle
    new_cameras = [o for o in sc.objects if o.type == "CAMERA" and o not in cameras_before]
    assert len(new_cameras) >= 2 and sc.camera in new_cameras
    assert sc.npbgpp.point_object is None and loader_says in sc.npbgpp.dataset_no_cloud
    assert sc.npbgpp.dataset_path and sc.npbgpp.dataset_format
    assert "The dataset has no point cloud: Densify Points makes one" in _drawn().labels
    sc.npbgpp.weights = ""
    with pytest.raises(RuntimeError, match=f"Aggregate needs points, and the imported dataset .* has no point cloud: "
                                           f"Densify Points \\(Render Properties.*\\(.*{loader_says}"):
        bpy.ops.npbgpp.aggregate(filepath=str(scene["dir"] / "agg.npbgpp"))
    assert not (scene["dir"] / "agg.npbgpp").exists()
    sc.npbgpp.output = "POINTS"
    with pytest.raises(RuntimeError, match="Nothing to render: the imported dataset has no point cloud. Densify "
                                           "Points"):
        render_exr(sc, str(scene["dir"] / "none.exr"))
    sc.npbgpp.output = "NEURAL"
    with pytest.raises(RuntimeError, match="Nothing to render: the imported dataset has no point cloud"):
        render_exr(sc, str(scene["dir"] / "none.exr"))


def test_densify_then_aggregate_on_a_dataset_without_a_cloud(scene, capfd):
    """The flow for a capture without a cloud: Import Dataset (cameras) -> Densify Points
    (the worker reads the dataset without its cloud) -> Aggregate (of the dense cloud) ->
    F12 through an imported camera renders the network's image of the dense points."""
    from _mvs_scene import surface_distance

    from blender_addon.point_source import object_points
    from npbgpp_core.ply import load_ply

    root = scene["dir"] / "nerf"
    _write_cloudless("nerf", root)
    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(root)) == {"FINISHED"}
    work = scene["dir"] / "work"
    work.mkdir()
    assert bpy.ops.wm.save_as_mainfile(filepath=str(work / "shot.blend")) == {"FINISHED"}
    sc = bpy.context.scene
    assert sc.npbgpp.point_object is None
    cams = [o for o in sc.objects if o.type == "CAMERA" and "npbgpp_image" in o]
    assert len(cams) == 6 and all((c.data.clip_start, c.data.clip_end) == pytest.approx((0.1, 1000.0)) for c in cams)
    for c in cams:  # a scale where Blender's default range cuts the cloud: Densify fits the range to it
        c.data.clip_start, c.data.clip_end = 5.0, 6.0
    assert bpy.ops.npbgpp.densify(max_points=3000) == {"FINISHED"}
    pts, col = object_points(sc.npbgpp.point_object)
    for c in cams:  # every dense point in front of the camera lies inside its range (Blender's own matrix)
        depth = -(np.c_[pts, np.ones(len(pts))] @ np.array(c.matrix_world.inverted()).T)[:, 2]
        depth = depth[depth > 0]
        assert c.data.clip_start < depth.min() and depth.max() < c.data.clip_end, (c.name, c.data.clip_start)
        assert "npbgpp_clip_unfitted" not in c
    assert 500 < len(pts) <= 3000 and col is not None
    import torch

    assert (surface_distance(torch.as_tensor(pts), floor=False) < 0.035).float().mean() >= 0.9
    np.testing.assert_allclose(load_ply(work / "nerf_dense.ply").points, pts, atol=1e-5)
    panel = _drawn()
    assert "dataset_points" in panel.props and not any("no point cloud" in text for text in panel.labels)
    sc.npbgpp.weights = ""
    assert bpy.ops.npbgpp.aggregate(filepath=str(work / "dense.npbgpp")) == {"FINISHED"}
    from npbgpp_core.scene import NeuralScene

    bundle = NeuralScene.load(str(work / "dense.npbgpp"))
    np.testing.assert_allclose(bundle.points.numpy(), pts, atol=1e-6)
    assert int(bundle.valid.sum()) > 0.5 * len(pts)
    # Fit to Photos reads the dataset's photos and cameras only: it begins on this one too
    from npbgpp_core import protocol as P
    from npbgpp_core.service import RenderService

    service = RenderService()
    started = service.handle(P.FitBegin(str(work / "dense.npbgpp"), str(root), 50, device="CPU"))
    # 6 photos: a checked fit (the users' default), whose two scoring renders of the kept photo count as steps
    assert isinstance(started, P.FitProgress) and started.total == 50 + 2, started
    assert isinstance(service.handle(P.FitCancel()), P.Done)
    sc.npbgpp.output = "NEURAL"
    sc.render.film_transparent = True
    sc.view_layers[0].use_pass_z = True
    sc.render.image_settings.media_type = "MULTI_LAYER_IMAGE"
    sc.render.image_settings.exr_codec = "NONE"
    sc.render.image_settings.color_depth = "32"
    exr = render_exr(sc, str(work / "f12.exr"))
    rgba = passes(exr, "Combined")
    assert rgba.shape[:2] == (90, 120)
    covered = rgba[..., 3] > 0.5
    assert 0.05 < covered.mean() < 0.95  # the sphere, not an empty or full frame
    assert np.isfinite(rgba).all() and rgba[covered][:, :3].std() > 0.01

