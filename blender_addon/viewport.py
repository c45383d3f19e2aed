"""Interactive viewport: camera maths, frame scheduling and the render thread.

:class:`FrameScheduler` is a small state machine with no bpy and no clock: the view
drawn at ``request`` decides the next job (coarse while the view moves, full resolution
once the same view is asked for again), and every finished frame newer than the one on
screen is shown, even when the view has moved on meanwhile: on a CPU a frame takes longer
than a mouse-drag step, and a slightly stale image beats an empty viewport. When the
view stops, the next job refines it at full resolution.
:class:`ViewportSession` runs jobs on a background thread against the worker and draws
the newest frame with the ``gpu`` module (never in background mode). Only Blender's main
thread registers timers: one started with each job polls for its end, and while the worker
compiles fused kernels at most one more waits to render the view again.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .camera_bridge import CameraGeometry, viewport_geometry
from .colour import colour_changes

MOVING_SCALE = 0.25
HALF_MAX = 65504.0
POLL_SECONDS = 0.02  # how often the main thread looks whether a render job has finished
RECHECK_SECONDS = 1.0  # while the worker compiles fused kernels: re-render the view this often


@dataclass(frozen=True)
class Job:
    frame_id: int
    target: Hashable  # (view key, (H, W))
    size: tuple[int, int]  # pixels to render (H, W)
    scale: float


def scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    return max(2, int(round(size[0] * scale))), max(2, int(round(size[1] * scale)))


class FrameScheduler:
    """Which resolution to render next; which finished frames are still wanted."""

    def __init__(self, moving_scale: float = MOVING_SCALE, still_scale: float = 1.0) -> None:
        self.moving_scale = moving_scale
        self.still_scale = still_scale
        self.last_target: Hashable | None = None
        self.in_flight: Job | None = None
        self.shown: Job | None = None
        self.failed_target: Hashable | None = None  # not retried until the view or scene changes
        self.next_id = 0

    def request(self, view_key: Hashable, size: tuple[int, int]) -> Job | None:
        """Called on every draw with the current view: a job to start, or None (one is
        running, or the frame on screen is already the best for this view)."""
        target = (view_key, tuple(size))
        moving = target != self.last_target
        self.last_target = target
        if self.in_flight is not None or target == self.failed_target:
            return None
        if self.shown is not None and self.shown.target == target and self.shown.scale >= self.still_scale:
            return None
        scale = min(self.moving_scale, self.still_scale) if moving else self.still_scale
        self.next_id += 1
        self.in_flight = Job(self.next_id, target, scaled_size(tuple(size), scale), scale)
        return self.in_flight

    def result(self, frame_id: int) -> bool:
        """A job finished: True to show its frame (the newest finished one, even when the
        view has moved since), False for an unknown id."""
        job = self.in_flight
        if job is None or job.frame_id != frame_id:
            return False
        self.in_flight = None
        self.shown = job
        return True

    def failed(self, frame_id: int) -> None:
        """A job raised: forget it, and do not ask again for the same view (no retry loop)."""
        if self.in_flight is not None and self.in_flight.frame_id == frame_id:
            self.failed_target = self.in_flight.target
            self.in_flight = None

    def invalidate(self) -> None:
        """The scene changed: the frame on screen must be re-rendered."""
        self.shown = None
        self.failed_target = None


def viewed_camera(space: Any, region_data: Any, scene: Any) -> Any:
    """The camera object a 3D view looks through (its local camera, else the scene's), or
    None when it is not in camera view."""
    camera = space.camera if space.use_local_camera and space.camera is not None else scene.camera
    if region_data.view_perspective == "CAMERA" and camera is not None and camera.type == "CAMERA":
        return camera
    return None


def view_clip(space: Any, region_data: Any, scene: Any) -> tuple[float, float]:
    """The clip range (near, far) Blender draws a 3D view with: the scene camera's clip
    start / end when looking through it, else the view's own (View > Clip Start / End)."""
    camera = viewed_camera(space, region_data, scene)
    if camera is not None:
        return camera.data.clip_start, camera.data.clip_end
    return space.clip_start, space.clip_end


def viewport_clip_note(geo: CameraGeometry, points: np.ndarray | None, camera: str) -> str:
    """The viewport's counterpart of F12's clip note (engine.clip_note): when the view's
    clip range (``camera``'s, by name, in camera view; else the 3D view's own) removes all
    the points in view or an estimated :data:`engine.CLIP_NOTE_FRACTION` of them or more
    (:func:`clipped_estimate`, a bounded cost on every frame), what and how to fix it; else
    "". ``points``: what the frame draws (world), None when unknown."""
    from .camera_bridge import clip_note_text, clipped_estimate
    from .engine import CLIP_NOTE_FRACTION

    found = clipped_estimate(geo, points) if points is not None and len(points) else None
    if found is None:
        return ""
    share = found.removed / found.in_view
    if share < CLIP_NOTE_FRACTION:
        return ""
    return clip_note_text(found, (geo.near, geo.far), camera, estimated=True)


def region_geometry(region_data: Any, width: int, height: int,
                    clip: tuple[float, float] = (0.0, float("inf"))) -> CameraGeometry:
    """Camera of a 3D viewport region (perspective only; ValueError otherwise) with the
    view's ``clip`` range (:func:`view_clip`)."""
    if not region_data.is_perspective:
        raise ValueError("orthographic views cannot be rendered by NPBG++: switch the viewport to perspective")
    return viewport_geometry(region_data.window_matrix, region_data.view_matrix, width, height, clip)


def header_text(status: str, scene: Any) -> str:
    """The viewport header's line (without the "NPBG++: " prefix): ``status``, and while the
    scene's colour management changes the network's colours, which settings do (said on
    every draw while it holds: the viewport has no job to say it once per)."""
    changes = colour_changes(scene)
    if not changes:
        return status
    return (f"{status} | " if status else "") + f"Color Management ({', '.join(changes)}) changes the network's colours"


class ViewportSession:
    """One viewport's renderer: snapshot on the main thread, render on a thread, draw."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.scheduler = FrameScheduler()
        self.lock = threading.Lock()
        self.snapshot: Any = None
        self.scene_version = 0
        self.frame: tuple[int, np.ndarray] | None = None  # (frame_id, display RGBA top-down)
        self.texture: Any = None
        self.texture_id = -1
        self.message = ""
        self.status = ""  # the worker's note on the last frame (which refiner ran)
        self.clip_note = ""  # what the view's clip range removes of the last frame's points (viewport_clip_note)
        self._bundle_points: tuple[Any, np.ndarray | None] = (None, None)  # (key, points) for the clip note
        self.recheck = False  # the worker is compiling fused kernels: render the view again soon
        self.thread: threading.Thread | None = None
        self.closed = False
        # One bound-method object, so that bpy.app.timers can tell whether it is pending
        # (each ``self.render_again`` is a new object, and Blender registers it again).
        self._render_again = self.render_again

    def close(self) -> None:
        """The engine is freed: no more redraws, and no re-render timer left behind."""
        import bpy

        self.closed = True
        if threading.current_thread() is threading.main_thread() and bpy.app.timers.is_registered(self._render_again):
            bpy.app.timers.unregister(self._render_again)

    def scene_changed(self, context: Any, depsgraph: Any) -> None:
        from .scene_snapshot import points_touched, snapshot

        scene = depsgraph.scene
        try:
            # Re-reading and hashing millions of points is the slow part: only when they changed.
            previous = None if points_touched(depsgraph, scene.npbgpp.point_object) else self.snapshot
            self.snapshot = snapshot(scene, depsgraph, previous)
            self.message = ""
        except (ValueError, RuntimeError, OSError) as exc:
            self.snapshot = None
            self.message = str(exc)
        self.scene_version += 1
        self.scheduler.invalidate()

    def _note_points(self, geo: CameraGeometry, snap: Any) -> tuple[CameraGeometry, np.ndarray | None]:
        """``(geometry, points)`` for the clip note of a frame of ``snap`` through ``geo``:
        the snapshot's world points, or the bundle's points the point object selects
        (engine.selected_bundle_points, read once per bundle file and selection, not on every
        frame) in its local frame with ``geo`` carried into that frame (moving the object
        re-reads nothing, and transforms no point)."""
        if snap.points is not None or not snap.bundle_path:
            return geo, snap.points
        from npbgpp_core.atomic import file_version

        from .engine import selected_bundle_points

        try:
            stamp = file_version(snap.bundle_path)
        except OSError:
            return geo, None
        key = (snap.bundle_path, stamp, snap.ids_key)
        if self._bundle_points[0] != key:
            self._bundle_points = (key, selected_bundle_points(snap))
        M = snap.object_matrix
        if M is None:
            return geo, self._bundle_points[1]
        # camera of world points M x: R (A x + b) + t; project and the depths take any R
        local = CameraGeometry(geo.K, geo.R @ M[:3, :3], geo.R @ M[:3, 3] + geo.t, geo.image_size, geo.near, geo.far)
        return local, self._bundle_points[1]

    def _run(self, job: Job, geo: CameraGeometry, snap: Any, transparent: bool, camera: str = "") -> None:
        from . import frames
        from .render_job import render_frame

        try:
            got = render_frame(snap, geo, roll_context=snap.viewport_roll_context, wait_for_kernels=False)
            image = frames.compose(got.pixels, snap.output, transparent, got.depth_scale,
                                   passes=("combined",))["combined"]
            note = viewport_clip_note(*self._note_points(geo, snap), camera)
            with self.lock:
                if self.scheduler.result(job.frame_id):
                    self.frame = (job.frame_id, image)
                    self.message = ""
                    self.status = got.status
                    self.clip_note = note
                    self.recheck = got.compiling
        except Exception as exc:  # noqa: BLE001 - shown in the viewport header, never raised
            with self.lock:
                self.scheduler.failed(job.frame_id)
                self.message = str(exc)

    def start_job(self, job: Job, geo: CameraGeometry, snap: Any, transparent: bool,
                  camera: str = "") -> threading.Thread:
        """Main thread only: render ``job`` on a thread, and redraw when it ends (a timer
        registered here polls the thread; bpy.app.timers is not safe to call from others).
        ``camera``: the name of the camera the view looks through ("" for none), for the
        clip note."""
        import bpy

        thread = threading.Thread(target=self._run, args=(job, geo, snap, transparent, camera), daemon=True)
        self.thread = thread
        thread.start()
        engine = self.engine

        def redraw_when_done() -> float | None:
            if thread.is_alive() and not self.closed:
                return POLL_SECONDS
            try:
                engine.tag_redraw()
            except ReferenceError:  # the engine (viewport) is gone
                pass
            if self.recheck and not self.closed and not bpy.app.timers.is_registered(self._render_again):
                bpy.app.timers.register(self._render_again, first_interval=RECHECK_SECONDS)
            return None

        bpy.app.timers.register(redraw_when_done, first_interval=POLL_SECONDS)
        return thread

    def render_again(self) -> None:
        """Main thread (a one-shot timer): render the view again, e.g. with the fused kernels
        once the worker has compiled them (no view change would ask for it). The frame that
        results schedules the next one only while the worker still says it is compiling."""
        with self.lock:
            if not self.recheck or self.closed:
                return
            self.recheck = False
            self.scheduler.invalidate()
        try:
            self.engine.tag_redraw()
        except ReferenceError:
            pass

    def draw(self, context: Any, depsgraph: Any) -> None:
        import bpy

        if bpy.app.background:
            return
        region, rv3d = context.region, context.region_data
        scene = depsgraph.scene
        try:
            geo = region_geometry(rv3d, region.width, region.height, view_clip(context.space_data, rv3d, scene))
        except ValueError as exc:
            self.engine.update_stats("", f"NPBG++: {exc}")
            return
        if self.snapshot is None:
            self.engine.update_stats("", f"NPBG++: {self.message}")
            return
        key = (tuple(map(tuple, rv3d.view_matrix)), tuple(map(tuple, rv3d.window_matrix)), self.scene_version)
        with self.lock:
            self.scheduler.still_scale = float(scene.npbgpp.preview_scale)
            job = self.scheduler.request(key, (region.height, region.width))
        if job is not None:
            camera = viewed_camera(context.space_data, rv3d, scene)
            self.start_job(job, geo.scaled(*job.size), self.snapshot, scene.render.film_transparent,
                           camera.name if camera is not None else "")
        status = self.message or " | ".join(note for note in (self.status, self.clip_note) if note)
        text = header_text(status, scene)
        if text:
            self.engine.update_stats("", f"NPBG++: {text}")
        self._draw_frame(scene, region)

    def _draw_frame(self, scene: Any, region: Any) -> None:
        import gpu

        with self.lock:
            frame = self.frame
        if frame is None:
            return
        frame_id, image = frame
        if frame_id != self.texture_id:
            self.texture = make_texture(image)
            self.texture_id = frame_id
        gpu.state.blend_set("ALPHA_PREMULT")
        self.engine.bind_display_space_shader(scene)
        draw_texture(self.texture, region.width, region.height)
        self.engine.unbind_display_space_shader()
        gpu.state.blend_set("NONE")


def make_texture(image: np.ndarray) -> Any:
    """Half-float RGBA texture of a top-down (H, W, 4) image (values clamped to the half
    range; OpenGL textures are bottom row first). Needs a GPU context."""
    import gpu

    h, w = image.shape[:2]
    data = np.ascontiguousarray(np.clip(image[::-1], -HALF_MAX, HALF_MAX), dtype=np.float32).ravel()
    buffer = gpu.types.Buffer("FLOAT", data.size, data)
    return gpu.types.GPUTexture((w, h), format="RGBA16F", data=buffer)


def draw_texture(texture: Any, width: int, height: int) -> None:
    """Stretch the texture over a ``width`` x ``height`` region (coarse frames scale up)."""
    from gpu_extras.presets import draw_texture_2d

    draw_texture_2d(texture, (0, 0), width, height)
