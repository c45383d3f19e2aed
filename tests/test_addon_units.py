"""Add-on pieces that need no installed add-on: camera maths against Blender's own
projection matrices, the viewport scheduler, frame composition, the worker protocol."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from collections.abc import Callable

if "bpy" not in sys.modules and "BLENDER_USER_RESOURCES" not in os.environ:
    # A private Blender user folder (installed extensions, preferences), removed at exit.
    _user_dir = tempfile.mkdtemp(prefix="npbgpp-bpy-user-")
    os.environ["BLENDER_USER_RESOURCES"] = _user_dir
    atexit.register(shutil.rmtree, _user_dir, True)

import numpy as np
import pytest
import torch

bpy = pytest.importorskip("bpy")

from blender_addon import frames, srgb  # noqa: E402
from blender_addon.camera_bridge import (  # noqa: E402
    MIN_CLIP,
    CameraGeometry,
    bounding_sphere,
    clip_range_covering,
    clipped,
    clipped_estimate,
    object_local_geometry,
    opencv_intrinsics,
    scene_camera_geometry,
    view_clip_covering,
    viewport_geometry,
)
from blender_addon.viewport import FrameScheduler, scaled_size, viewport_clip_note  # noqa: E402
from blender_addon.worker_client import ProcessWorker, WorkerError, python_for_worker  # noqa: E402
from npbgpp_core import Camera  # noqa: E402
from npbgpp_core import protocol as P  # noqa: E402
from npbgpp_core.service import RenderService  # noqa: E402


# --------------------------------------------------------------------------- camera maths
def test_camera_message_equals_core_camera():
    """The camera the add-on sends (protocol.CameraSpec) is the core camera built from the
    same OpenCV K, R, t, and projects points as the add-on's own maths does."""
    K = opencv_intrinsics(35.0, 36.0, 24.0, "AUTO", 0.1, -0.2, 64, 48, 1.0, 1.3)
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    R = q * np.sign(np.linalg.det(q))
    t = rng.normal(size=3)
    geo = CameraGeometry(K, R, t, (48, 64))
    spec = geo.to_spec()
    assert isinstance(spec, P.CameraSpec) and spec.image_size == (48, 64)
    want = Camera.from_opencv(K, R, t, (48, 64), dtype=torch.float64).state_dict()
    for key in ("K", "R", "t"):
        np.testing.assert_allclose(np.array(getattr(spec, key)), np.array(want[key]), atol=1e-12)
    pts = rng.normal(size=(20, 3)) + [0, 0, 6]
    uv, z = geo.project(pts)
    cam = spec.to_camera(dtype=torch.float64)
    uv2, z2 = cam.project(torch.from_numpy(pts))
    np.testing.assert_allclose(uv, uv2.numpy(), atol=1e-9)
    np.testing.assert_allclose(z, z2.numpy(), atol=1e-12)


@pytest.mark.parametrize(
    "fit,size,shift,lens",
    [("AUTO", (64, 48), (0.0, 0.0), 50.0), ("AUTO", (40, 70), (0.1, -0.05), 30.0),
     ("VERTICAL", (64, 48), (-0.1, 0.2), 45.0), ("HORIZONTAL", (50, 90), (0.03, 0.04), 85.0)],
)
def test_viewport_geometry_matches_blender_projection(fit, size, shift, lens):
    """The viewport path (window_matrix from calc_matrix_camera) gives the same camera as
    the render path: both equal Blender's own projection."""
    bpy.ops.wm.read_homefile(use_empty=True)
    scene = bpy.context.scene
    cam = bpy.data.objects.new("C", bpy.data.cameras.new("C"))
    scene.collection.objects.link(cam)
    cam.data.sensor_fit, cam.data.lens = fit, lens
    cam.data.shift_x, cam.data.shift_y = shift
    cam.location = (1.0, -5.0, 2.0)
    cam.rotation_euler = (1.2, 0.1, 0.2)
    scene.render.resolution_x, scene.render.resolution_y = size
    scene.render.resolution_percentage = 100
    bpy.context.view_layer.update()
    depsgraph = bpy.context.evaluated_depsgraph_get()
    w, h = size
    P = cam.calc_matrix_camera(depsgraph, x=w, y=h)
    V = cam.matrix_world.inverted()
    a = viewport_geometry(P, V, w, h)
    b = scene_camera_geometry(cam, scene)
    np.testing.assert_allclose(a.K, b.K, atol=1e-4)
    np.testing.assert_allclose(a.R, b.R, atol=1e-6)
    np.testing.assert_allclose(a.t, b.t, atol=1e-5)
    from bpy_extras.object_utils import world_to_camera_view
    from mathutils import Vector

    pts = np.random.default_rng(1).uniform(-1, 1, (10, 3))
    uv, _ = b.project(pts)
    ref = np.array([tuple(world_to_camera_view(scene, cam, Vector(p))) for p in pts])
    np.testing.assert_allclose(uv[:, 0], ref[:, 0] * w - 0.5, atol=1e-4)
    np.testing.assert_allclose(uv[:, 1], (1 - ref[:, 1]) * h - 0.5, atol=1e-4)


def test_orthographic_viewport_refused():
    P = np.eye(4)
    P[2, 2] = -0.1
    with pytest.raises(ValueError, match="orthographic"):
        viewport_geometry(P, np.eye(4), 64, 48)


def test_object_local_geometry_folds_transform():
    from mathutils import Euler, Matrix

    M = Matrix.LocRotScale((0.5, -1.0, 2.0), Euler((0.3, 0.2, 0.1)), (2.0, 2.0, 2.0))
    K = opencv_intrinsics(50, 36, 24, "AUTO", 0, 0, 64, 48)
    geo = CameraGeometry(K, np.diag([1.0, -1.0, -1.0]), np.array([0.0, 0.0, 8.0]), (48, 64))
    local, s = object_local_geometry(geo, M)
    assert s == pytest.approx(2.0)
    pts = np.random.default_rng(2).uniform(-1, 1, (10, 3))
    world = pts @ np.array(M)[:3, :3].T + np.array(M)[:3, 3]
    uv_w, z_w = geo.project(world)
    uv_l, z_l = local.project(pts)
    np.testing.assert_allclose(uv_l, uv_w, atol=1e-9)
    np.testing.assert_allclose(z_l * s, z_w, atol=1e-9)
    with pytest.raises(ValueError, match="uniform"):
        object_local_geometry(geo, Matrix.Diagonal((1.0, 2.0, 1.0, 1.0)))


def _projection_clip(P) -> tuple[float, float]:
    """near / far an OpenGL perspective projection was built with (Blender's own matrix)."""
    P = np.array(P, dtype=np.float64)
    return P[2, 3] / (P[2, 2] - 1.0), P[2, 3] / (P[2, 2] + 1.0)


def test_clip_range_follows_blenders_projection():
    """F12 takes the camera's clip start / end, the viewport the view's (the camera's when
    looking through it): both equal the near / far of the projection Blender itself draws
    with; an object's uniform scale divides them; a broken range is refused."""
    from types import SimpleNamespace

    from blender_addon.viewport import region_geometry, view_clip

    bpy.ops.wm.read_homefile(use_empty=True)
    scene = bpy.context.scene
    cam = bpy.data.objects.new("C", bpy.data.cameras.new("C"))
    scene.collection.objects.link(cam)
    scene.camera = cam
    cam.data.clip_start, cam.data.clip_end = 0.75, 12.5
    cam.location = (1.0, -5.0, 2.0)
    bpy.context.view_layer.update()
    geo = scene_camera_geometry(cam, scene)
    P = cam.calc_matrix_camera(bpy.context.evaluated_depsgraph_get(), x=64, y=48)
    np.testing.assert_allclose((geo.near, geo.far), _projection_clip(P), rtol=1e-4)
    local, s = object_local_geometry(geo, np.diag([2.5, 2.5, 2.5, 1.0]))
    assert (local.near, local.far) == pytest.approx((0.75 / s, 12.5 / s))
    assert (geo.scaled(24, 32).far, geo.cropped(1, 2, 10, 10).near) == (12.5, 0.75)
    assert geo.to_spec().near == 0.75 and geo.to_spec().far == 12.5

    space = SimpleNamespace(clip_start=0.01, clip_end=300.0, use_local_camera=False, camera=None)
    user_view = SimpleNamespace(view_perspective="PERSP", is_perspective=True, window_matrix=P,
                                view_matrix=np.array(cam.matrix_world.inverted()))
    assert view_clip(space, user_view, scene) == (0.01, 300.0)
    camera_view = SimpleNamespace(**{**vars(user_view), "view_perspective": "CAMERA"})
    clip = view_clip(space, camera_view, scene)
    assert clip == pytest.approx((0.75, 12.5))
    vgeo = region_geometry(camera_view, 64, 48, clip)
    assert (vgeo.near, vgeo.far) == pytest.approx((0.75, 12.5))
    cam.data.clip_end = 0.5  # Python can set an end before the start
    with pytest.raises(ValueError, match="Clip Start < Clip End"):
        scene_camera_geometry(cam, scene)


@pytest.mark.parametrize("scale", [0.01, 1.0, 10000.0])
def test_clip_range_covering_holds_every_point_in_front(scale):
    """The clip range an imported camera gets holds every point in front of it, by depths
    computed one point at a time (row 2 of [R | t] applied to each): start between
    MIN_CLIP and half the nearest depth, end 1.5 x the farthest; points behind are ignored."""
    rng = np.random.default_rng(7)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    R = q * np.sign(np.linalg.det(q))
    center = np.array([0.3, -0.2, 2.0]) * scale  # camera-space centre of the cloud
    cam_pts = center + rng.uniform(-3.5, 3.5, (200, 3)) * scale  # some points behind the camera
    t = rng.normal(size=3) * scale
    world = (cam_pts - t) @ R  # R^T (x - t)
    depths = [sum(R[2, k] * p[k] for k in range(3)) + t[2] for p in world]
    front = [d for d in depths if d > 0]
    assert 0 < len(front) < len(depths)
    near, far = clip_range_covering(world, R, t)
    assert MIN_CLIP <= near <= 0.5 * min(front) + 1e-12 * scale
    assert far == pytest.approx(1.5 * max(front))
    assert all(near < d < far for d in front)
    assert near == pytest.approx(0.5 * min(front))  # not clamped at these scales
    assert clip_range_covering(world[np.array(depths) < 0], R, t) is None
    tiny = clip_range_covering(np.array([[0.0, 0.0, 1e-9], [0.0, 0.0, 2.0]]), np.eye(3), np.zeros(3))
    assert tiny == (MIN_CLIP, 3.0)  # Blender's smallest Clip Start, still before the far point


def test_view_clip_covering_widens_only():
    """A 3D view's clip range is widened to the sphere seen from its eye or framed (4 radii
    away): hand-computed ends; a range that already covers it is kept."""
    pts = np.array([[1.0, 2.0, 3.0], [5.0, 2.0, 3.0], [3.0, 2.0, 3.0]])
    center, radius = bounding_sphere(pts)
    assert center.tolist() == [3.0, 2.0, 3.0] and radius == 2.0
    # eye 100 away: end (100 + 2) * 1.5; start 0.05 * 2 leaves 0.01 as it is
    assert view_clip_covering(0.01, 100.0, center + [0.0, 100.0, 0.0], center, radius) == pytest.approx((0.01, 153.0))
    # eye at the centre: the framed view, 8 away, decides the end
    assert view_clip_covering(0.5, 10.0, center, center, radius) == pytest.approx((0.1, 15.0))
    assert view_clip_covering(0.01, 1000.0, center, center, radius) == (0.01, 1000.0)
    with pytest.raises(ValueError, match="no finite points"):
        bounding_sphere(np.full((2, 3), np.nan))


def test_clipped_counts_like_brute_force_with_its_depth_shortcut():
    """``clipped`` answers a cloud wholly inside the clip range from its depths alone (F12
    asks on every frame); random cameras, ranges and clouds, some with a point on a range end
    or a NaN point: the same answer as counting every projected point by hand."""
    rng = np.random.default_rng(7)
    K = np.array([[300.0, 0.0, 160.0], [0.0, 300.0, 120.0], [0.0, 0.0, 1.0]])
    for k in range(400):
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        R, t = q * np.sign(np.linalg.det(q)), rng.normal(size=3) * 3.0
        geo = CameraGeometry(K, R, t, (240, 320), rng.uniform(0.0, 3.0), rng.uniform(3.0, 12.0))
        pts = rng.normal(size=(150, 3)) * rng.uniform(0.1, 3.0)
        if k % 4 == 1:  # a point exactly at the far end: kept, as (near, far] says
            pts[0] = np.linalg.solve(R, np.array([0.0, 0.0, geo.far]) - t)
        if k % 4 == 2:
            pts[0] = np.nan
        uv, z = geo.project(pts)
        with np.errstate(invalid="ignore"):
            seen = (z > 0) & (uv[:, 0] >= -0.5) & (uv[:, 0] < 319.5) & (uv[:, 1] >= -0.5) & (uv[:, 1] < 239.5)
            out = seen & ((z <= geo.near) | (z > geo.far))
        got = clipped(geo, pts)
        if not out.any():
            assert got is None, k
        else:
            assert (got.in_view, got.removed) == (int(seen.sum()), int(out.sum())), k
            assert (got.nearest, got.farthest) == (float(z[out].min()), float(z[out].max())), k


def test_clipped_estimate_is_close_to_the_exact_count_and_projects_a_bounded_subset(monkeypatch):
    """The viewport's clip note (asked on every frame) projects at most its sample of the
    points: random cameras and ranges over 300 000 points, the share it estimates is within
    2 points of a percent of :func:`clipped`'s exact one (tested above against counting by
    hand) wherever the note could show (5% or more), and None wherever nothing is removed."""
    import blender_addon.camera_bridge as camera_bridge

    rng = np.random.default_rng(11)
    pts = rng.normal(size=(300_000, 3)) * np.array([1.0, 2.0, 0.5])
    K = np.array([[300.0, 0.0, 160.0], [0.0, 300.0, 120.0], [0.0, 0.0, 1.0]])
    checked = 0
    for k in range(60):
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        R = q * np.sign(np.linalg.det(q))
        t = np.array([0.0, 0.0, rng.uniform(3.0, 8.0)]) + rng.normal(size=3) * 0.3
        geo = CameraGeometry(K, R, t, (240, 320), rng.uniform(0.0, 6.0), rng.uniform(6.0, 12.0))
        exact, estimate = clipped(geo, pts), clipped_estimate(geo, pts)
        if exact is None:
            assert estimate is None, k
            continue
        share = exact.removed / exact.in_view
        if share >= 0.05:
            assert estimate is not None and abs(estimate.removed / estimate.in_view - share) <= 0.02, k
            checked += 1
    assert checked >= 10
    sizes = []
    monkeypatch.setattr(camera_bridge, "clipped", lambda geo, points: sizes.append(len(points)))
    for n in (1, 999, 1000, 1001, 1_000_000):
        clipped_estimate(geo, np.zeros((n, 3)), sample=1000)
    assert sizes == [1, 999, 1000, 501, 1000]


def test_viewport_frames_carry_the_clip_note_f12_gives(monkeypatch):
    """A viewport frame whose clip range removes part of the points says so in the header
    line, as F12 does once per render (the camera's range in camera view, the 3D view's
    otherwise, an estimated share: engine.CLIP_NOTE_FRACTION or more); a frame without
    clipping says nothing; a bundle's points are read once, not on every frame."""
    import blender_addon.engine as engine
    from blender_addon.scene_snapshot import SceneSnapshot
    from blender_addon.worker_client import HUB

    session, _, snap, geo = _points_viewport(20_000, (60, 80), "clip")
    depth = 5.0 - snap.points[:, 2].astype(np.float64)  # the camera looks down -z from z = 5
    try:
        clipping = CameraGeometry(geo.K, geo.R, geo.t, geo.image_size, 5.3, 100.0)
        exact = clipped(clipping, snap.points)
        job = session.scheduler.request("view", (60, 80))
        session._run(job, clipping.scaled(*job.size), snap, True, "Cam")
        assert exact.removed / exact.in_view > 0.2  # most points are in view; depths 4 .. 6
        share = float(session.clip_note.split("about ")[1].split("%")[0])
        assert abs(share - 100.0 * exact.removed / exact.in_view) <= 2.0, session.clip_note
        assert session.clip_note.startswith("the camera 'Cam''s clip range (5.3 .. 100) removes about ")
        assert session.clip_note.endswith("; set Clip Start / End in the camera's Lens properties to include them")
        job = session.scheduler.request("view", (60, 80))
        session._run(job, CameraGeometry(geo.K, geo.R, geo.t, geo.image_size, 0.1, 100.0).scaled(*job.size), snap,
                     True, "")
        assert session.clip_note == "" and depth.min() > 0.1
        job = session.scheduler.request("view-2", (60, 80))
        session._run(job, CameraGeometry(geo.K, geo.R, geo.t, geo.image_size, 0.1, 4.5).scaled(*job.size), snap,
                     True, "")
        assert session.clip_note.startswith("the 3D view's clip range (0.1 .. 4.5) removes about ")
    finally:
        HUB.shutdown()
    # a bundle's points (the snapshot holds none): read once, in the point object's frame,
    # the camera carried into it; the same note as for the world points, however it moves
    local = snap.points.astype(np.float64)
    reads = []
    monkeypatch.setattr(engine, "selected_bundle_points", lambda s: reads.append(s) or local)
    rot, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(3, 3)))
    shown = 0
    for scale, shift in ((1.0, 0.0), (2.5, 0.4), (0.5, -0.3)):
        M = np.eye(4)
        M[:3, :3], M[:3, 3] = rot * scale, shift
        bundle = SceneSnapshot(output="NEURAL", bundle_path=__file__, ids_key="all", object_matrix=M)
        world = local @ M[:3, :3].T + M[:3, 3]
        np.testing.assert_allclose(world, engine.drawn_points(SceneSnapshot(points=world)))
        view = CameraGeometry(geo.K, geo.R, geo.t, geo.image_size, 4.8, 100.0)
        exact = clipped(view, world)
        moved_geo, points = session._note_points(view, bundle)
        uv, z = moved_geo.project(points)
        want_uv, want_z = view.project(world)
        np.testing.assert_allclose(z, want_z, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(uv, want_uv, rtol=1e-9, atol=1e-6)
        note = viewport_clip_note(moved_geo, points, "")
        if exact is None or exact.removed / exact.in_view < 0.05:
            assert note == "", scale
        else:
            share = float(note.split("about ")[1].split("%")[0])
            assert abs(share - 100.0 * exact.removed / exact.in_view) <= 2.0, (scale, note)
            shown += 1
    assert len(reads) == 1 and shown >= 2


def test_f12_and_viewport_clip_notes_word_the_same_facts_alike():
    """F12's note (exact counts) and the viewport's (an estimated share) are built by one
    function (camera_bridge.clip_note_text), so their wording cannot drift; their whole text
    for 20 points on the optical axis at depths 1 .. 20, counted by hand: a range ending at
    15.5 removes the 5 at 16 .. 20 (25%), one ending at 0.5 all of them."""
    from types import SimpleNamespace

    import blender_addon.engine as engine
    from blender_addon.scene_snapshot import SceneSnapshot

    points = np.stack([np.zeros(20), np.zeros(20), np.arange(1.0, 21.0)], axis=1)
    K = np.array([[300.0, 0.0, 160.0], [0.0, 300.0, 120.0], [0.0, 0.0, 1.0]])
    part = CameraGeometry(K, np.eye(3), np.zeros(3), (240, 320), 0.1, 15.5)
    every = CameraGeometry(K, np.eye(3), np.zeros(3), (240, 320), 0.1, 0.5)
    camera, snap = SimpleNamespace(name="Cam"), SceneSnapshot(points=points)
    lens = "set Clip Start / End in the camera's Lens properties to include them"
    sidebar = "set Clip Start / End in the sidebar's View tab to include them"
    assert engine.clip_note(camera, part, snap, partly=True) == (
        f"the camera 'Cam''s clip range (0.1 .. 15.5) removes 5 of the 20 points in its view (25%, depths 16 .. 20); "
        f"{lens}")
    assert engine.clip_note(camera, every, snap) == (
        f"the camera 'Cam''s clip range (0.1 .. 0.5) removes all 20 points in its view (depths 1 .. 20): nothing "
        f"rendered; {lens}")
    assert viewport_clip_note(part, points, "Cam") == (
        f"the camera 'Cam''s clip range (0.1 .. 15.5) removes about 25% of the points in its view (depths 16 .. 20); "
        f"{lens}")
    assert viewport_clip_note(every, points, "Cam") == (
        f"the camera 'Cam''s clip range (0.1 .. 0.5) removes all the points in its view (depths 1 .. 20); {lens}")
    assert viewport_clip_note(part, points, "") == (
        f"the 3D view's clip range (0.1 .. 15.5) removes about 25% of the points in its view (depths 16 .. 20); "
        f"{sidebar}")
    assert viewport_clip_note(every, points, "") == (
        f"the 3D view's clip range (0.1 .. 0.5) removes all the points in its view (depths 1 .. 20); {sidebar}")
    # each says nothing where the other's rule does: F12's empty-frame note only of "all"
    assert engine.clip_note(camera, part, snap) == "" and engine.clip_note(camera, every, snap, partly=True) == ""


def test_scaled_geometry_matches_core():
    K = opencv_intrinsics(50, 36, 24, "AUTO", 0.1, 0.05, 64, 48)
    geo = CameraGeometry(K, np.eye(3), np.array([0.0, 0.0, 3.0]), (48, 64))
    small = geo.scaled(12, 16)
    core = Camera.from_opencv(geo.K, geo.R, geo.t, geo.image_size, dtype=torch.float64).scaled((12, 16))
    np.testing.assert_allclose(small.K, core.to_opencv()[0], atol=1e-9)


# --------------------------------------------------------------------------- scheduler
def test_scheduler_coarse_while_moving_full_when_still():
    s = FrameScheduler(moving_scale=0.25, still_scale=1.0)
    size = (100, 200)
    job = s.request("A", size)
    assert job is not None and job.scale == 0.25 and job.size == (25, 50)
    assert s.request("B", size) is None  # busy: nothing new starts
    assert s.result(job.frame_id) is True  # the view moved on: shown anyway, stale beats empty (issue #13)
    job2 = s.request("B", size)  # same view as the last draw: still -> full resolution
    assert job2 is not None and job2.scale == 1.0 and job2.size == size
    assert s.result(job2.frame_id) is True
    assert s.request("B", size) is None  # best frame already on screen
    job3 = s.request("C", size)  # moving again
    assert job3 is not None and job3.scale == 0.25
    assert s.result(job3.frame_id) is True
    job4 = s.request("C", size)  # stopped: refine
    assert job4.scale == 1.0
    assert s.result(job4.frame_id + 100) is False  # unknown ids are ignored
    assert s.in_flight is job4


def test_scheduler_invalidate_and_failure():
    s = FrameScheduler(moving_scale=0.5, still_scale=0.5)
    job = s.request("A", (10, 10))
    assert job.scale == 0.5
    s.failed(job.frame_id)
    assert s.request("A", (10, 10)) is None  # a failing view is not retried in a loop
    s.invalidate()  # ... until the scene changes (or the view moves)
    again = s.request("A", (10, 10))
    assert again is not None and again.frame_id != job.frame_id
    assert s.result(again.frame_id)
    assert s.request("A", (10, 10)) is None
    s.invalidate()
    assert s.request("A", (10, 10)) is not None
    assert scaled_size((3, 3), 0.1) == (2, 2)


# --------------------------------------------------------------------------- frames
def test_srgb_round_trip_and_reference_values():
    x = np.linspace(0, 1, 256, dtype=np.float32)
    np.testing.assert_allclose(srgb.linear_to_srgb(srgb.srgb_to_linear(x)), x, atol=1e-5)
    assert srgb.srgb_to_linear(np.float32(0.5)) == pytest.approx(0.214041, abs=1e-5)
    assert srgb.srgb_to_linear(np.float32(0.04)) == pytest.approx(0.04 / 12.92)


def _srgb_to_linear_f64(x: np.ndarray) -> np.ndarray:
    """IEC 61966-2-1 written out in float64: the reference for the fast float32 path."""
    x = np.clip(np.asarray(x, np.float64), 0.0, 1.0)
    return np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


def test_srgb_to_linear_matches_float64_formula():
    rng = np.random.default_rng(5)
    eight_bit = np.arange(256, dtype=np.float32) / np.float32(255.0)
    threshold = np.float32(0.04045)
    edge = np.array([np.nextafter(threshold, np.float32(0)), threshold, np.nextafter(threshold, np.float32(1))])
    floats = np.concatenate([rng.uniform(-0.5, 1.5, 200_000).astype(np.float32), edge, [0.0, 1.0]]).astype(np.float32)
    for x in (eight_bit, floats, floats[:200_000].reshape(-1, 2)[:, :1]):  # the last is a strided view
        got = srgb.srgb_to_linear(x)
        assert got.dtype == np.float32 and got.shape == x.shape
        assert np.abs(got - _srgb_to_linear_f64(x)).max() <= 2e-6
    ends = srgb.srgb_to_linear(np.array([-1.0, 0.0, 1.0, 7.0], np.float32))
    assert ends.tolist() == [0.0, 0.0, 1.0, 1.0]  # black and white stay exact
    got64 = srgb.srgb_to_linear(floats, np.float64)
    assert got64.dtype == np.float64
    np.testing.assert_allclose(got64, _srgb_to_linear_f64(floats), rtol=0, atol=1e-12)
    assert np.isnan(srgb.srgb_to_linear(np.array([np.nan], np.float32))).all()
    scalar = srgb.srgb_to_linear(np.float32(0.5))
    assert scalar.shape == () and scalar == pytest.approx(0.214041, abs=1e-5)


def _compose_reference(frame: np.ndarray, output: str, transparent: bool, depth_scale: float) -> dict:
    """compose's contract spelled out pixel-wise in float64, independent of frames.py."""
    f = frame.astype(np.float64)
    hit = f[..., 6] > 0.5
    neural = output == "NEURAL"
    covered = f[..., P.NEURAL_ALPHA] > 0 if neural else hit
    depth = np.where(covered, (f[..., P.NEURAL_DEPTH] if neural else f[..., P.DEPTH]) * depth_scale, frames.EMPTY_DEPTH)
    if neural:
        display = f[..., 0:3]
    elif output == "POINTS":
        display = f[..., 3:6]
    else:
        d = depth[hit]
        grey = np.zeros(hit.shape)
        grey[hit] = 1.0 - 0.9 * (d - d.min()) / (d.max() - d.min())
        display = np.repeat(grey[..., None], 3, axis=2)
    alpha = (f[..., P.NEURAL_ALPHA] if neural else hit.astype(np.float64)) if transparent else np.ones(hit.shape)
    combined = np.concatenate([_srgb_to_linear_f64(display) * alpha[..., None], alpha[..., None]], axis=2)
    points = np.concatenate([_srgb_to_linear_f64(f[..., 3:6]) * hit[..., None], hit[..., None]], axis=2)
    return {"combined": combined, "points": points, "depth": depth}


@pytest.mark.parametrize("output", ["NEURAL", "POINTS", "DEPTH"])
@pytest.mark.parametrize("transparent", [False, True])
def test_compose_matches_reference_on_a_random_frame(output, transparent):
    rng = np.random.default_rng(11)
    h, w = 70, 150  # more rows than one conversion block
    f = rng.uniform(-0.1, 1.1, (h, w, P.FRAME_CHANNELS)).astype(np.float32)
    f[..., 6] = rng.random((h, w)) > 0.4
    f[..., P.DEPTH] = np.where(f[..., 6] > 0.5, rng.uniform(1, 9, (h, w)), np.inf)
    f[..., P.NEURAL_ALPHA] = np.where(rng.random((h, w)) > 0.3, rng.random((h, w)), 0.0)
    f[..., P.NEURAL_DEPTH] = rng.uniform(1, 9, (h, w))
    want = _compose_reference(f, output, transparent, 1.5)
    out = frames.compose(f, output, transparent, depth_scale=1.5)
    assert set(out) == {"combined", "points", "depth"}
    for name, ref in want.items():
        assert out[name].dtype == np.float32 and out[name].shape == ref.shape
        np.testing.assert_allclose(out[name], ref, rtol=1e-6, atol=2e-6, err_msg=name)
    only = frames.compose(f, output, transparent, depth_scale=1.5, passes=("combined",))
    assert set(only) == {"combined"}
    np.testing.assert_array_equal(only["combined"], out["combined"])
    assert set(frames.compose(f, output, transparent, passes=("depth",))) == {"depth"}
    with pytest.raises(ValueError, match="bogus"):
        frames.compose(f, output, transparent, passes=("combined", "bogus"))


def test_compose_alpha_depth_and_flip():
    f = np.zeros((3, 4, P.FRAME_CHANNELS), np.float32)
    f[..., 0:3] = 0.5
    f[1, 2, 3:6] = (1.0, 0.0, 0.5)
    f[1, 2, 6] = 1.0
    f[..., 7] = np.inf
    f[1, 2, 7] = 2.5
    f[..., P.NEURAL_ALPHA], f[..., P.NEURAL_DEPTH] = f[..., 6], f[..., 7]  # one point: nothing to fill
    out = frames.compose(f, "NEURAL", transparent=True, depth_scale=2.0)
    assert out["depth"][1, 2] == 5.0 and out["depth"][0, 0] == frames.EMPTY_DEPTH
    assert out["combined"][1, 2, 3] == 1.0 and out["combined"][0, 0].tolist() == [0, 0, 0, 0]
    np.testing.assert_allclose(out["combined"][1, 2, :3], frames.srgb_to_linear(np.full(3, 0.5, np.float32)))
    opaque = frames.compose(f, "POINTS", transparent=False)
    assert opaque["combined"][0, 0, 3] == 1.0
    np.testing.assert_allclose(opaque["points"][1, 2], [1.0, 0.0, frames.srgb_to_linear(np.float32(0.5)), 1.0])
    flat = frames.to_blender(out["depth"])
    assert flat.dtype == np.float32 and flat.ndim == 1 and flat.flags.c_contiguous
    assert flat[1 * 4 + 2] == 5.0  # row 1 of 3 stays row 1 when flipped
    flat_c = frames.to_blender(out["combined"]).reshape(3, 4, 4)
    np.testing.assert_array_equal(flat_c[::-1], out["combined"])
    with pytest.raises(ValueError):
        frames.compose(f, "BOGUS", True)


# --------------------------------------------------------------------------- worker
def test_python_for_worker(tmp_path):
    assert python_for_worker("") == sys.executable  # torch importable here
    (tmp_path / "bin").mkdir()
    exe = tmp_path / "bin" / "python3"
    exe.write_text("")
    assert python_for_worker(str(tmp_path)) == str(exe)
    with pytest.raises(WorkerError, match="does not exist"):
        python_for_worker(str(tmp_path / "nope"))


def test_process_worker_equals_in_process_and_cleans_up(tmp_path):
    rng = np.random.default_rng(0)
    pts = rng.uniform(-1, 1, (300, 3)).astype(np.float32)
    col = rng.uniform(0, 1, (300, 3)).astype(np.float32)
    cam = P.CameraSpec.from_camera(Camera.look_at((0, -4, 1), (0, 0, 0), (0, 0, 1), 50.0, (24, 40)))
    local = RenderService()
    local.set_points(P.SetPoints(pts, col))
    want = local.render(P.RenderFrame(cam)).pixels
    worker = ProcessWorker(sys.executable)
    try:
        info = worker.start()
        assert "CPU" in info.devices
        worker.request(P.SetPoints(pts, col))
        got = worker.request(P.RenderFrame(cam)).pixels
        np.testing.assert_array_equal(got, want)
        with pytest.raises(WorkerError, match="needs a NeuralScene bundle"):
            worker.request(P.RenderFrame(cam, neural=True))
        assert worker.alive()  # errors do not end the worker
        with pytest.raises(WorkerError, match="not found"):
            worker.request(P.LoadBundle(str(tmp_path / "missing.npbgpp")))
        proc = worker.proc
    finally:
        worker.stop()
    assert proc.poll() is not None and worker.proc is None


def test_frames_cross_the_worker_pipe_with_every_field():
    """The worker leaves a frame's pixels in shared memory and the client reads them back:
    the refiner, the note and the structured ``compiling`` flag arrive unchanged."""
    import dataclasses
    import pickle

    from blender_addon.worker import _FrameBuffer
    from blender_addon.worker_client import _read_shared

    names = {f.name for f in dataclasses.fields(P.Frame)} - {"pixels"}
    assert names == {f.name for f in dataclasses.fields(P.SharedFrame)} - {"shm", "shape"} and "compiling" in names
    pixels = np.random.default_rng(0).uniform(-1, 1, (4, 5, P.FRAME_CHANNELS)).astype(np.float32)
    for compiling in (True, False):
        frame = P.Frame(pixels, "torch", "a note", compiling)
        block = _FrameBuffer()
        try:
            shared = pickle.loads(pickle.dumps(P.SharedFrame.of(frame, block.put(pixels))))  # as over the pipe
            back = shared.with_pixels(_read_shared(shared.shm, shared.shape))
        finally:
            block.close()
        assert (back.refiner, back.note, back.compiling) == ("torch", "a note", compiling)
        np.testing.assert_array_equal(back.pixels, pixels)


def test_render_service_depth_is_view_depth():
    pts = np.array([[0.0, 0.0, 0.0], [0.3, 0.2, 1.0]], np.float32)
    cam = Camera.look_at((0, -5, 0), (0, 0, 0), (0, 0, 1), 60.0, (32, 32))
    service = RenderService()
    service.set_points(P.SetPoints(pts, None))
    frame = service.render(P.RenderFrame(P.CameraSpec.from_camera(cam))).pixels
    uv, z = cam.project(torch.from_numpy(pts))
    for (u, v), d in zip(uv.tolist(), z.tolist(), strict=True):
        r, c = int(np.floor(v + 0.5)), int(np.floor(u + 0.5))
        assert frame[r, c, 6] == 1.0
        assert frame[r, c, 7] == pytest.approx(d, rel=1e-6)
    assert np.isinf(frame[0, 0, 7]) and frame[0, 0, 6] == 0.0


def test_pip_install_failure_is_explained(tmp_path):
    from blender_addon import preferences

    preferences._Install.running = True
    preferences._pip_install(str(tmp_path / "no-python"), str(tmp_path / "deps"))
    assert not preferences._Install.running
    assert preferences._Install.message.startswith("cannot run pip")
    assert str(tmp_path / "no-python") in preferences._Install.message


class _Engine:
    """Stands in for the RenderEngine's only use here (redraw requests)."""

    def __init__(self) -> None:
        self.redraws = 0

    def tag_redraw(self) -> None:
        self.redraws += 1


def _points_viewport(n: int, size: tuple[int, int], key: str):
    """A ViewportSession on an :class:`_Engine`, a snapshot of ``n`` random points shown as
    POINTS (cache key ``key``) and a camera of ``size`` (h, w) 5 units back on the z axis:
    (session, engine, snapshot, geometry)."""
    from blender_addon.scene_snapshot import SceneSnapshot
    from blender_addon.viewport import ViewportSession

    pts = np.random.default_rng(0).uniform(-1, 1, (n, 3)).astype(np.float32)
    snap = SceneSnapshot(output="POINTS", mode="IN_PROCESS", points=pts, colors=None, points_key=key)
    K = opencv_intrinsics(50, 36, 24, "AUTO", 0, 0, size[1], size[0])
    geo = CameraGeometry(K, np.diag([1.0, -1.0, -1.0]), np.array([0.0, 0.0, 5.0]), size)
    engine = _Engine()
    return ViewportSession(engine), engine, snap, geo


def test_viewport_session_renders_jobs_off_thread_and_shows_newest():
    from blender_addon.worker_client import HUB

    session, _, snap, geo = _points_viewport(200, (60, 80), "k")
    try:
        job = session.scheduler.request("view-1", (60, 80))
        session._run(job, geo.scaled(*job.size), snap, True)
        assert session.frame is not None and session.frame[1].shape == (15, 20, 4)
        assert session.frame[1][..., 3].max() == 1.0
        job2 = session.scheduler.request("view-1", (60, 80))  # still: full resolution
        assert job2.size == (60, 80)
        session.scheduler.request("view-2", (60, 80))  # the view moves while job2 renders
        session._run(job2, geo.scaled(*job2.size), snap, True)
        assert session.frame[0] == job2.frame_id  # stale (the view moved on) but newest: shown (issue #13)
    finally:
        HUB.shutdown()


def test_viewport_coarse_neural_frame_of_a_small_viewport(tmp_path):
    """A viewport 60 pixels high renders its moving frames at 1/4: 15 pixels, under the
    network's coarsest level. The frame failed ('scale 0.0625 of a 15x20 image gives an
    empty 0x1 image') until the view stopped; it now shows the neural image."""
    from blender_addon.scene_snapshot import SceneSnapshot
    from blender_addon.worker_client import HUB
    from npbgpp_core.models import NPBG, NPBGConfig
    from npbgpp_core.scene import NeuralScene

    pts = np.random.default_rng(0).uniform(-1, 1, (200, 3)).astype(np.float32)
    torch.manual_seed(0)
    bundle = str(tmp_path / "b.npbgpp")
    NeuralScene.from_npbg(NPBG(200, NPBGConfig()), torch.from_numpy(pts), None, name="b").save(bundle)
    from blender_addon.viewport import ViewportSession

    snap = SceneSnapshot(output="NEURAL", mode="IN_PROCESS", bundle_path=bundle, points=pts, colors=None,
                         points_key="n")
    K = opencv_intrinsics(50, 36, 24, "AUTO", 0, 0, 80, 60)
    geo = CameraGeometry(K, np.diag([1.0, -1.0, -1.0]), np.array([0.0, 0.0, 5.0]), (60, 80))
    session = ViewportSession(_Engine())
    try:
        job = session.scheduler.request("moving", (60, 80))
        assert job.size == (15, 20)
        session._run(job, geo.scaled(*job.size), snap, True)
        assert session.message == "" and session.frame is not None and session.frame[1].shape == (15, 20, 4)
    finally:
        HUB.shutdown()


_GPU_SCRIPT = r"""
import sys
sys.path.insert(0, sys.argv[1])
import bpy, numpy as np
from mathutils import Matrix
from blender_addon.viewport import make_texture, draw_texture
out = {}
class ProbeEngine(bpy.types.RenderEngine):
    bl_idname = "NPBGPP_GPU_PROBE"
    bl_label = "probe"
    bl_use_gpu_context = True
    def render(self, depsgraph):
        import gpu
        img = np.zeros((6, 8, 4), np.float32)
        img[0, 0] = (1, 0, 0, 1)
        img[5, 7] = (0, 0.5, 1e6, 1)
        img[2, 3] = (0.25, 0.75, 0.125, 1)
        off = gpu.types.GPUOffScreen(8, 6, format="RGBA32F")
        with off.bind():
            fb = gpu.state.active_framebuffer_get()
            fb.clear(color=(0, 0, 0, 0))
            with gpu.matrix.push_pop():
                gpu.matrix.load_matrix(Matrix.Identity(4))
                gpu.matrix.load_projection_matrix(Matrix.Identity(4))
                gpu.matrix.translate((-1, -1))
                gpu.matrix.scale((2 / 8, 2 / 6))
                draw_texture(make_texture(img), 8, 6)
            buf = fb.read_color(0, 0, 8, 6, 4, 0, "FLOAT")
        off.free()
        buf.dimensions = 8 * 6 * 4
        out["px"] = np.array(buf, np.float32).reshape(6, 8, 4)[::-1]
bpy.utils.register_class(ProbeEngine)
sc = bpy.context.scene
sc.render.engine = "NPBGPP_GPU_PROBE"
sc.render.resolution_x, sc.render.resolution_y = 8, 6
bpy.ops.render.render()
np.save(sys.argv[2], out["px"])
"""


def test_viewport_texture_upload_and_draw(tmp_path):
    """The viewport's half-float texture path, drawn into an offscreen buffer under a
    headless GPU context (Mesa EGL); a separate process, since a missing EGL aborts."""
    import ctypes.util
    import subprocess

    if ctypes.util.find_library("EGL") is None:
        pytest.skip("no EGL library: no headless GPU context")
    script = tmp_path / "gpu_probe.py"
    script.write_text(_GPU_SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "px.npy"
    proc = subprocess.run([sys.executable, str(script), root, str(out)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "EGL" in proc.stderr + proc.stdout and not out.exists():
        pytest.skip(f"headless GPU context unavailable: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    px = np.load(out)
    np.testing.assert_array_equal(px[0, 0], [1, 0, 0, 1])  # top-left stays top-left
    np.testing.assert_array_equal(px[2, 3], [0.25, 0.75, 0.125, 1])
    np.testing.assert_array_equal(px[5, 7], [0, 0.5, 65504.0, 1])  # clamped to the half range
    assert px[1, 1].tolist() == [0, 0, 0, 0]


def test_torch_status_names_the_worker_torch():
    from blender_addon import preferences

    line = preferences.torch_status(refresh=True)
    assert line.startswith(f"torch {torch.__version__} (") and sys.executable in line and "missing" not in line


def test_torch_status_of_a_program_that_is_not_python(tmp_path):
    """A Python Environment naming another program (it exits 0, printing nothing or its arguments): a status
    line saying so, not a ValueError on the probe's thread (the preferences then showed
    'checking...' for ever)."""
    from blender_addon import preferences

    for name, body in (("not_python", "exit 0"), ("echoes", 'echo "$@"')):  # silent, or printing its arguments
        program = tmp_path / name
        program.write_text(f"#!/bin/sh\n{body}\n")
        program.chmod(0o755)
        line = preferences._probe(str(program), "")
        assert line == f"{program} does not look like a Python interpreter (it did not run the torch check)"


def test_worker_in_env_without_packages_explains(tmp_path):
    """A Python environment lacking numpy/torch: the start fails with the worker's own
    error message, and nothing is left running."""
    import subprocess
    import venv

    base = getattr(sys, "_base_executable", sys.executable)
    env_dir = tmp_path / "bare"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = python_for_worker(str(env_dir))
    probe = subprocess.run([python, "-c", "import numpy"], capture_output=True)
    if probe.returncode == 0:
        pytest.skip(f"the base interpreter {base} has numpy")
    worker = ProcessWorker(python)
    with pytest.raises(WorkerError, match="(?s)failed to start.*No module named"):
        worker.start(timeout=60)
    assert worker.proc is None and worker.log_path == ""


@pytest.mark.skipif(os.name == "nt", reason="stands in for the worker with a shell script")
@pytest.mark.parametrize("script, timeout, why", [
    ("read key\nexit 3\n", 60.0, "exited with code 3"),
    ("read key\nexec sleep 60\n", 0.5, "did not connect in time"),
])
def test_failed_worker_start_leaves_no_thread_behind(tmp_path, script, timeout, why):
    """A worker that exits, or never connects, before connecting: the start fails with the
    reason, and the thread that waited for its connection has ended (it stayed blocked in
    accept for good before), as has the process."""
    import threading

    fake = tmp_path / "fake-python"
    fake.write_text("#!/bin/sh\n" + script)
    fake.chmod(0o755)
    before = set(threading.enumerate())
    worker = ProcessWorker(str(fake))
    with pytest.raises(WorkerError, match=f"failed to start: it {why}"):
        worker.start(timeout=timeout)
    left = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert left == [], left
    assert worker.proc is None and worker.log_path == ""


def test_every_request_is_answered_by_the_service_with_its_reply_type(tmp_path):
    """Each protocol request names a service method; a wrong input comes back as a
    Failure naming the problem, and the service keeps answering."""
    service = RenderService()
    for req in P.REQUESTS:
        assert callable(getattr(service, req.op)), req.__name__
        assert issubclass(req.reply, P.Reply)
        assert req.doing and req.__name__ not in req.doing  # messages' words, not the request's name
    assert len({r.op for r in P.REQUESTS}) == len(P.REQUESTS)
    bad = service.handle(P.SetPoints(np.zeros((4, 2), np.float32)))
    assert isinstance(bad, P.Failure) and "(N, 3)" in bad.error
    assert isinstance(service.handle({"op": "hello"}), P.Failure)  # untyped messages are refused
    assert isinstance(service.handle(P.AggregateView(0)), P.Failure)  # nothing to aggregate
    assert service.handle(P.AggregateCancel()) == P.Done()
    assert service.handle(P.SetPoints(np.zeros((4, 3), np.float32))) == P.PointCount(4)
    spec = P.CameraSpec.from_camera(Camera.look_at((0, -4, 1), (0, 0, 0), (0, 0, 1), 50.0, (8, 10)))
    cam = spec.to_camera(dtype=torch.float64)
    K, R, t = cam.to_opencv()
    np.testing.assert_allclose(K, np.array(spec.K), atol=1e-9)
    np.testing.assert_allclose(R, np.array(spec.R), atol=1e-12)
    assert isinstance(service.handle(P.RenderFrame(spec, source="bogus")), P.Failure)
    frame = service.handle(P.RenderFrame(spec))
    assert isinstance(frame, P.Frame) and frame.pixels.shape == (8, 10, P.FRAME_CHANNELS)


def test_scheduler_shows_frames_during_continuous_motion():
    """A CPU viewport: every frame takes three draws to render and the view changes at
    every draw. Frames keep appearing while moving (each the newest finished one, at the
    coarse scale), and the view is refined at full resolution once it stops."""
    s = FrameScheduler(moving_scale=0.25, still_scale=1.0)
    size = (80, 120)
    running: list = []  # (job, draws left)
    shown, started = [], 0
    for step in range(93):
        job = s.request(("view", step), size)
        if job is not None:
            started += 1
            running.append([job, 3])
        for item in running:
            item[1] -= 1
        for item in [r for r in running if r[1] == 0]:
            running.remove(item)
            if s.result(item[0].frame_id):
                shown.append(item[0])
    assert started == 31
    assert len(shown) == 31  # was 0: every frame dropped as stale
    assert all(j.scale == 0.25 for j in shown)
    assert [j.frame_id for j in shown] == sorted(j.frame_id for j in shown)
    final = ("view", 92)
    for _ in range(20):  # the view stops
        if not running and s.shown.target == (final, size) and s.shown.scale == 1.0:
            break
        job = s.request(final, size)
        if job is not None:
            running.append([job, 3])
        for item in list(running):
            item[1] -= 1
            if item[1] == 0:
                running.remove(item)
                s.result(item[0].frame_id)
    assert s.shown.target == (final, size) and s.shown.size == size
    assert s.request(final, size) is None  # nothing more to do


def test_viewport_timers_are_registered_on_the_main_thread_only(monkeypatch):
    """The job's redraw timer is registered by the thread that starts the job (Blender's
    main thread), never by the render thread; it redraws once the job is done."""
    import threading

    from blender_addon.worker_client import HUB

    registered = []

    def register(fn, first_interval=0.0, **kwargs):
        registered.append((fn, threading.current_thread() is threading.main_thread()))

    monkeypatch.setattr(bpy.app.timers, "register", register)
    session, engine, snap, geo = _points_viewport(100, (30, 40), "t")
    try:
        job = session.scheduler.request("v", (30, 40))
        thread = session.start_job(job, geo.scaled(*job.size), snap, True)
        thread.join(60)
        assert not thread.is_alive() and session.frame is not None
        assert len(registered) == 1 and registered[0][1]  # from the main thread, once
        poll = registered[0][0]
        assert poll() is None and engine.redraws == 1  # done: redraw, timer ends
    finally:
        HUB.shutdown()


def test_viewport_keeps_one_rerender_timer_while_the_kernels_compile(monkeypatch):
    """Every frame finished while the worker compiles its fused kernels wants the view
    rendered again: however many finish, one re-render timer is pending (Blender's own
    timers); none once the kernels are ready; none after the engine is freed."""
    from blender_addon import render_job
    from blender_addon.worker_client import HUB

    timers = bpy.app.timers
    real_register, real_unregister = timers.register, timers.unregister
    pending: list = []  # one entry per registration Blender holds

    def register(fn, **kwargs):
        real_register(fn, **kwargs)
        pending.append(fn)

    def unregister(fn):
        real_unregister(fn)
        pending.remove(fn)

    def fire(fn) -> None:  # what Blender does with a due timer: call it, drop it when it returns None
        if fn() is None:
            unregister(fn)

    monkeypatch.setattr(timers, "register", register)
    monkeypatch.setattr(timers, "unregister", unregister)
    compiling = [True]  # what the worker says about its kernels (the frames themselves are real)
    real_render = render_job.render_frame
    monkeypatch.setattr(render_job, "render_frame",
                        lambda *a, **k: real_render(*a, **k)._replace(compiling=compiling[0]))
    session, engine, snap, geo = _points_viewport(100, (30, 40), "c")

    def finish_frame(view: str) -> None:  # a draw starts a job; its poll timer fires once it has ended
        job = session.scheduler.request(view, (30, 40))
        assert job is not None
        thread = session.start_job(job, geo.scaled(*job.size), snap, True)
        poll = pending[-1]
        thread.join(60)
        fire(poll)
        assert all(timers.is_registered(fn) for fn in pending)

    try:
        for i in range(4):  # the view moves while the kernels compile: a frame per draw
            finish_frame(f"view-{i}")
            assert len(pending) == 1 and session.recheck, pending
        fire(pending[0])  # still compiling: the view is rendered again, and again after that
        assert pending == [] and session.scheduler.shown is None and engine.redraws == 5
        finish_frame("view-3")
        assert len(pending) == 1
        compiling[0] = False  # the kernels are ready: one last re-render, then no timer
        fire(pending[0])
        finish_frame("view-3")
        assert pending == [] and not session.recheck and session.scheduler.shown.scale == 1.0
        compiling[0] = True  # the engine is freed with a re-render pending: its timer goes with it
        finish_frame("view-4")
        assert len(pending) == 1
        session.close()
        assert pending == []
    finally:
        for fn in pending:
            real_unregister(fn)
        HUB.shutdown()


def _stopped_then_replaced(fail: Callable[[ProcessWorker, P.RenderFrame], None]) -> None:
    """Start a worker holding 50 points, stop its process (SIGSTOP: the frame asked next waits)
    and call ``fail(worker, frame)``, which asks for the frame and checks its error; then the
    stopped process must be gone and the next requests start a fresh worker that renders."""
    import signal

    if not hasattr(signal, "SIGSTOP"):
        pytest.skip("needs SIGSTOP")
    pts = np.random.default_rng(0).uniform(-1, 1, (50, 3)).astype(np.float32)
    cam = P.CameraSpec.from_camera(Camera.look_at((0, -4, 1), (0, 0, 0), (0, 0, 1), 50.0, (12, 16)))
    worker = ProcessWorker(sys.executable)
    try:
        worker.start()
        worker.request(P.SetPoints(pts, None))
        proc = worker.proc
        os.kill(proc.pid, signal.SIGSTOP)
        fail(worker, P.RenderFrame(cam))
        assert proc.poll() is not None and worker.proc is None  # the stopped process is gone
        worker.request(P.SetPoints(pts, None), timeout=60)
        assert worker.request(P.RenderFrame(cam), timeout=60).pixels[..., 6].max() == 1.0
        assert worker.proc.pid != proc.pid
    finally:
        worker.stop()


def test_frozen_worker_times_out_and_is_replaced():
    """A worker that stops answering (SIGSTOP) fails the request after the timeout with a
    message saying what happened and what to do; it is killed, and the next request starts
    a fresh worker."""
    def times_out(worker: ProcessWorker, frame: P.RenderFrame) -> None:
        with pytest.raises(WorkerError, match=r"did not finish rendering a frame within 1\.5 s.*Worker Timeout"):
            worker.request(frame, timeout=1.5)

    _stopped_then_replaced(times_out)


def test_a_worker_killed_mid_request_is_reported_as_likely_out_of_memory():
    """The kernel's out-of-memory killer ends a worker with SIGKILL, mostly while it answers (a
    big photo, a big frame): the request fails saying that (it said "lost the NPBG++ worker:
    [Errno 104] Connection reset by peer"), and the next request starts a fresh worker."""
    import signal
    import threading

    def killed(worker: ProcessWorker, frame: P.RenderFrame) -> None:
        threading.Timer(0.5, os.kill, (worker.proc.pid, signal.SIGKILL)).start()  # busy with the frame till then
        with pytest.raises(WorkerError) as info:
            worker.request(frame, timeout=60)
        assert str(info.value).startswith("the NPBG++ worker was killed (SIGKILL) while rendering a frame: most "
                                          "often by the system's out-of-memory killer")

    _stopped_then_replaced(killed)


def test_out_of_memory_names_the_cause_and_the_fix(monkeypatch):
    from npbgpp_core import scene as scene_module

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 15.00 GiB")

    monkeypatch.setattr(scene_module, "render_point_layers", oom)
    service = RenderService()
    service.set_points(P.SetPoints(np.zeros((3, 3), np.float32)))
    spec = P.CameraSpec.from_camera(Camera.look_at((0, -4, 1), (0, 0, 0), (0, 0, 1), 50.0, (30, 40)))
    reply = service.handle(P.RenderFrame(spec))
    assert isinstance(reply, P.Failure)
    assert reply.error.startswith("out of memory on cpu while rendering 40x30 pixels (CUDA out of memory.")
    assert reply.error.endswith("). Render fewer pixels (Output > Resolution %)")  # on the CPU: no GPU advice
    monkeypatch.undo()
    assert isinstance(service.handle(P.RenderFrame(spec)), P.Frame)  # the service goes on


def test_install_torch_cpu_build_and_pips_own_progress(tmp_path):
    """Install PyTorch with the CPU build: torch comes from PyTorch's CPU index, the rest
    from PyPI; pip's raw progress lines become the progress bar and a readable message."""
    from blender_addon import preferences

    log = tmp_path / "calls.txt"
    fake = tmp_path / "python"
    fake.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> "{log}"\n'
        'case "$*" in *--version*) echo "pip 24.2 from /x (python 3.11)"; exit 0;; esac\n'
        'case "$*" in *torch==*) echo "Collecting torch==2.13.0"; echo "Progress 50000000 of 200000000";'
        ' echo "Progress 200000000 of 200000000";; esac\n'
        'echo "Successfully installed"\n'
    )
    fake.chmod(0o755)
    shown: list = []
    preferences._Install.running = True
    preferences._pip_install(str(fake), str(tmp_path / "deps"), "CPU", lambda m, f: shown.append((m, f)))
    calls = log.read_text().splitlines()
    assert calls[0].endswith("pip --version")
    torch_call, rest_call = calls[1].split(), calls[2].split()
    assert torch_call[torch_call.index("--index-url") + 1] == preferences.CPU_INDEX
    assert preferences.TORCH_PIN in torch_call and "--progress-bar" in torch_call
    assert preferences.TORCH_PIN not in rest_call and "--index-url" not in rest_call
    assert all(r in rest_call for r in preferences.WORKER_REQUIREMENTS if r != preferences.TORCH_PIN)
    assert ("Downloading torch==2.13.0: 50 of 200 MB", 0.25) in shown
    assert ("Downloading torch==2.13.0: 200 of 200 MB", 1.0) in shown
    message = preferences._Install.message
    assert message.startswith("Installed torch==2.13.0") and "CPU build" in message
    assert not preferences._Install.running
    cuda = preferences.pip_commands("py", "t", "CUDA", False)
    assert len(cuda) == 1 and "--index-url" not in cuda[0] and preferences.TORCH_PIN in cuda[0]


def test_bundle_point_selection_renders_subset_and_refuses_foreign_ids(tmp_path):
    """SelectBundlePoints renders only those points (the points layer holds no other);
    ids beyond the bundle fail that request and every render after it, naming the cause,
    until a fitting selection comes."""
    from npbgpp_core.models import NPBGPlusPlus
    from npbgpp_core.scene import NeuralScene

    torch.manual_seed(0)
    model = NPBGPlusPlus().eval()
    pts = torch.tensor([[-0.5, 0.0, 0.0], [0.5, 0.0, 0.0], [0.0, 0.0, 0.5]])
    view = Camera.look_at((0, -4, 0), (0, 0, 0), (0, 0, 1), 50.0, (24, 32))
    with torch.no_grad():
        agg = model.aggregate(pts, torch.rand(1, 3, 24, 32), [view])
    NeuralScene.from_aggregated(model, agg, torch.eye(3)).save(tmp_path / "b.npbgpp")
    service = RenderService()
    assert service.handle(P.LoadBundle(str(tmp_path / "b.npbgpp"), "CPU")) == P.BundleInfo(3, "cpu")
    spec = P.CameraSpec.from_camera(view)
    full = service.handle(P.RenderFrame(spec, "bundle")).pixels
    assert service.handle(P.SelectBundlePoints(np.array([1]))) == P.PointCount(1)
    one = service.handle(P.RenderFrame(spec, "bundle")).pixels
    assert one[..., 6].sum() == 1 and full[..., 6].sum() == 3  # one point left of three
    np.testing.assert_array_equal(one[one[..., 6] > 0][0, 3:6], [0.0, 1.0, 0.0])  # point 1's colour
    bad = service.handle(P.SelectBundlePoints(np.array([0, 7])))
    assert isinstance(bad, P.Failure) and "[0, 3)" in bad.error and "another bundle" in bad.error
    again = service.handle(P.RenderFrame(spec, "bundle", neural=True))
    assert isinstance(again, P.Failure) and "another bundle" in again.error
    assert isinstance(service.handle(P.SelectBundlePoints(None)), P.PointCount)
    np.testing.assert_array_equal(service.handle(P.RenderFrame(spec, "bundle")).pixels, full)


def test_bundle_resaved_with_the_same_size_and_time_is_read_again(tmp_path):
    """A bundle saved again with the same size and modification time (a re-save within a
    FAT or SMB timestamp tick, made here with os.utime) is read again on the next
    LoadBundle: the service answers with the new points, not the ones it held."""
    from npbgpp_core.models import NPBGPlusPlus
    from npbgpp_core.scene import NeuralScene

    torch.manual_seed(0)
    model = NPBGPlusPlus().eval()
    view = Camera.look_at((0, -4, 0), (0, 0, 0), (0, 0, 1), 50.0, (24, 32))
    path = tmp_path / "b.npbgpp"

    def save(points: torch.Tensor) -> None:
        with torch.no_grad():
            agg = model.aggregate(points, torch.rand(1, 3, 24, 32), [view])
        NeuralScene.from_aggregated(model, agg, torch.eye(3)).save(path)

    first = torch.tensor([[-0.5, 0.0, 0.0], [0.5, 0.0, 0.0], [0.0, 0.0, 0.5]])
    save(first)
    old = path.stat()
    service = RenderService()
    assert service.handle(P.LoadBundle(str(path), "CPU")) == P.BundleInfo(3, "cpu")
    np.testing.assert_array_equal(service.handle(P.GetBundlePoints()).points, first.numpy())
    second = first * 0.5
    save(second)
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))
    new = path.stat()
    assert (new.st_size, new.st_mtime_ns) == (old.st_size, old.st_mtime_ns)  # what the cache read before
    assert service.handle(P.LoadBundle(str(path), "CPU")) == P.BundleInfo(3, "cpu")
    np.testing.assert_array_equal(service.handle(P.GetBundlePoints()).points, second.numpy())


def test_modal_job_starts_and_cleans_up_progress_timer_and_status():
    """The one modal plumbing of Aggregate, Densify, Fit to Photos and Export Dataset: a timer, the progress
    bar and the status text are all released on cleanup, and cleanup twice is harmless."""
    from types import SimpleNamespace

    from blender_addon.operators import (
        NPBGPP_OT_aggregate,
        NPBGPP_OT_densify,
        NPBGPP_OT_export_dataset,
        NPBGPP_OT_fit,
        _ModalJob,
    )

    assert all(issubclass(c, _ModalJob)
               for c in (NPBGPP_OT_aggregate, NPBGPP_OT_densify, NPBGPP_OT_fit, NPBGPP_OT_export_dataset))
    calls: list[tuple] = []
    wm = SimpleNamespace(
        progress_begin=lambda lo, hi: calls.append(("begin", lo, hi)),
        progress_end=lambda: calls.append(("end",)),
        event_timer_add=lambda step, window: calls.append(("timer", window)) or "TIMER",
        event_timer_remove=lambda timer: calls.append(("remove", timer)),
        modal_handler_add=lambda op: calls.append(("modal", op)),
    )
    workspace = SimpleNamespace(status_text_set=lambda text: calls.append(("status", text)))
    context = SimpleNamespace(window_manager=wm, window="WIN", workspace=workspace)
    job = _ModalJob()
    job._start_modal(context, 7)
    job._show_status(context, "view 0 of 7")
    assert calls == [("begin", 0, 7), ("timer", "WIN"), ("modal", job), ("status", "view 0 of 7")]
    calls.clear()
    job._cleanup(context)
    assert calls == [("remove", "TIMER"), ("end",), ("status", None)] and job._timer is None
    calls.clear()
    job._cleanup(SimpleNamespace(window_manager=wm, workspace=None))
    assert calls == [("end",)]


def test_fit_to_photos_status_says_when_a_step_scores_the_kept_photo():
    """The status line of Fit to Photos names what a step does when it fits nothing (the
    worker's FitProgress.doing), and is the plain step count otherwise."""
    from types import SimpleNamespace

    from blender_addon.operators import NPBGPP_OT_fit, _ModalJob
    from npbgpp_core import protocol as P

    shown: list[str] = []
    context = SimpleNamespace(workspace=SimpleNamespace(status_text_set=shown.append))
    job = _ModalJob()
    NPBGPP_OT_fit._status(job, context, P.FitProgress(201, 202, False, "scoring the kept photo"))
    NPBGPP_OT_fit._status(job, context, P.FitProgress(7, 202, False))
    assert shown == ["Fit to Photos: step 201 of 202, scoring the kept photo (Esc to cancel)",
                     "Fit to Photos: step 7 of 202 (Esc to cancel)"]


def test_render_photo_size_is_the_most_common_size_ties_the_earliest():
    """Import Dataset's one render resolution: the size most photos have, counted by hand
    (3 landscape against 2 portrait, the portrait first); a tie goes to the earliest view's."""
    from types import SimpleNamespace

    from blender_addon.importers import render_photo_size

    def views(*sizes):
        return [SimpleNamespace(camera=SimpleNamespace(image_size=s)) for s in sizes]

    portrait, landscape = (512, 384), (384, 512)
    assert render_photo_size(views(portrait, landscape, portrait, landscape, landscape)) == landscape
    assert render_photo_size(views(portrait, landscape, landscape, portrait)) == portrait
    assert render_photo_size(views(landscape, portrait)) == landscape
    assert render_photo_size(views(*[landscape] * 3000, *[portrait] * 2999)) == landscape


@pytest.mark.parametrize("case", ["single", "nested", "nodes", "nodes_off_for_renders"])
def test_dense_instancer_scene_holds_one_instance_per_vertex_and_its_bench_runs(case):
    """bench_scene_walk's scene (``procedural.build_dense_instancer_scene``), a 3 x 3 grid
    instancing its child at its vertices: Blender's viewport depsgraph holds the child at each
    of the 9 vertices, and with ``nested`` each of the 2 collection members there too; the
    "nodes" cases' Geometry Nodes' triangle (a 3-vertex face) at each, the instances' original
    the grid (counted by hand). The bench itself runs in --quick mode and prints its table,
    writing nothing; the walk yields the grid itself but in "nodes_off_for_renders"."""
    import subprocess

    from blender_addon.datagen.procedural import build_dense_instancer_scene, remove_scene

    nested, nodes = case == "nested", {"nodes": True, "nodes_off_for_renders": False}.get(case)
    scene, depsgraph = build_dense_instancer_scene(3, nested=nested, nodes_shown_in_renders=nodes)
    try:
        counts: dict[str, int] = {}
        for inst in depsgraph.object_instances:
            if inst.is_instance and inst.parent.original.name == "dense_grid":
                assert nodes is None or (len(inst.object.data.vertices), len(inst.object.data.polygons)) == (3, 1)
                counts[inst.object.original.name] = counts.get(inst.object.original.name, 0) + 1
        expected = ({"dense_empty": 9, "dense_member_0": 9, "dense_member_1": 9} if nested
                    else {"dense_child" if nodes is None else "dense_grid": 9})
        assert counts == expected
    finally:
        remove_scene(scene)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    benchmarks = os.path.join(root, "BENCHMARKS.md")
    with open(benchmarks, "rb") as f:
        before = f.read()
    proc = subprocess.run([sys.executable, os.path.join(root, "bench", "bench_scene_walk.py"), "--quick",
                           "--case", case], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    yielded = (3 if nested else 1) * 400 + (nodes is not False)
    assert f"{case}: 20 x 20 grid, {yielded:,} entries yielded" in proc.stdout
    assert sum(line.startswith("| working tree |") for line in proc.stdout.splitlines()) == 1
    with open(benchmarks, "rb") as f:
        assert f.read() == before
