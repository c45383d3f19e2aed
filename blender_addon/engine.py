"""The "NPBG++" render engine: F12 / animation renders and the interactive viewport."""

from __future__ import annotations

import os
from typing import Any

import bpy
import numpy as np

from npbgpp_core.protocol import DEPTH

from . import frames
from .app_handlers import add_handlers, remove_handlers
from .camera_bridge import (
    USE_PHOTO_SIZE_BUTTON,
    CameraGeometry,
    clip_note_text,
    clipped,
    multilayer_exr_note,
    photo_format,
    scene_camera_geometry,
)
from .colour import colour_note
from .render_job import render_frame
from .scene_snapshot import SceneSnapshot, snapshot
from .worker_client import Cancelled, WorkerError

POINTS_PASS = "NPBG Points"


class NPBGPPRenderEngine(bpy.types.RenderEngine):
    """Neural point-based rendering (NPBG++)."""

    bl_idname = "NPBGPP"
    bl_label = "NPBG++"
    bl_use_preview = False
    bl_use_postprocess = True
    bl_use_shading_nodes_custom = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.viewport = None
        self.reported_error = False  # this frame reported an error (:meth:`_error`)
        self.gave_result = False  # this frame handed Blender a result (begin_result / end_result)

    def __del__(self) -> None:
        viewport = getattr(self, "viewport", None)
        if viewport is not None:
            viewport.close()

    # ----------------------------------------------------------------- passes
    def update_render_passes(
        self, scene: bpy.types.Scene | None = None, renderlayer: bpy.types.ViewLayer | None = None
    ) -> None:
        self.register_pass(scene, renderlayer, "Combined", 4, "RGBA", "COLOR")
        if renderlayer is not None and renderlayer.use_pass_z:
            self.register_pass(scene, renderlayer, "Depth", 1, "Z", "VALUE")
        self.register_pass(scene, renderlayer, POINTS_PASS, 4, "RGBA", "COLOR")

    # ------------------------------------------------------------------ final
    def render(self, depsgraph: bpy.types.Depsgraph) -> None:  # type: ignore[override]
        """Render one frame of one view layer. A frame ends with a result, an error (Blender
        then writes nothing and stops), or Blender cancelling (Esc: it writes nothing either)."""
        self.reported_error = self.gave_result = False
        try:
            self._render(depsgraph)
        except Exception as exc:  # noqa: BLE001 - Blender would swallow it: report instead
            self._error(f"{type(exc).__name__}: {exc}")
        if not (self.gave_result or self.reported_error or self.test_break()):
            # Blender writes a frame left without a result unless it is cancelling (Esc) or the
            # engine reported an error; 5.0.1 crashes writing one as a 16-bit PNG or TIFF or an
            # OpenEXR, and an empty result would be written as a black frame: stop the job here.
            self._error(f"frame {depsgraph.scene.frame_current} was cancelled before it was rendered while "
                        "Blender went on: the render stops here, writing nothing for that frame")
        # a frame cancelled without Blender's break flag was stopped with an error just above
        if self.is_animation and (self.reported_error or self.test_break()
                                  or depsgraph.scene.frame_current >= last_frame(depsgraph.scene)):
            # the job's last frame: its last one to render, or one cancelled (Esc) or failed,
            # after which Blender renders no more (the notes so far were never summed up)
            self._report_job_summaries()

    def _error(self, message: str) -> None:
        """Report ``message`` as an error. Blender ends an animation at a frame whose engine
        reported one: that frame is its last."""
        self.report({"ERROR"}, f"NPBG++: {message}")
        self.reported_error = True

    def _render(self, depsgraph: bpy.types.Depsgraph) -> None:
        scene = depsgraph.scene
        try:
            camera = self.camera_override or scene.camera
            if camera is None:
                raise ValueError("the scene has no camera")
            if scene.render.use_multiview:
                # Blender gives each view its own passes; one image left the right eye black.
                raise ValueError("Stereoscopy is on (Output Properties > Stereoscopy): NPBG++ renders a single "
                                 "view; turn Stereoscopy off, or render each eye's camera in its own pass")
            camera_eval = camera.evaluated_get(depsgraph)
            geo = scene_camera_geometry(camera_eval, scene)
            snap = snapshot(scene, depsgraph)
        except (ValueError, RuntimeError, OSError) as exc:
            self._error(str(exc))
            return
        framing = framing_note(camera, scene)
        if framing and self._first_of_job(FRAMING, camera.name_full, framing):
            self.report({"WARNING"}, f"NPBG++: {framing}")
        colours = colour_note(scene)
        if colours and first_time_this_job(colours):  # a note, not a change: the user may want that look
            self.report({"INFO"}, f"NPBG++: {colours}")
        multilayer = multilayer_exr_note(scene)
        if multilayer and first_time_this_job(multilayer):  # before Blender's own cryptic write error
            self.report({"WARNING"}, f"NPBG++: {multilayer}")
        self.update_stats("", f"NPBG++: rendering {geo.image_size[1]}x{geo.image_size[0]}")
        self.update_progress(0.0)
        try:
            frame, depth_scale, status, _ = render_frame(snap, geo, self.test_break)
        except Cancelled:  # Esc: Blender writes no frame from here (render() stops a job that goes on)
            return
        except (WorkerError, ValueError, RuntimeError, OSError) as exc:
            self._error(str(exc))
            return
        self.update_progress(0.8)
        if snap.hidden:  # not an error: the user hid it, as other engines would show nothing
            self.report({"INFO"}, f"NPBG++: {snap.hidden}")
        elif not np.isfinite(frame[..., DEPTH]).any():
            if camera.name_full not in _cameras_noted_this_job.get(EMPTIED, ()):
                note = clip_note(camera, geo, snap)
                # not an error either: the camera's range says so, but the user should know why (once per job
                # and camera: an animation repeated it on every empty frame)
                if note and self._first_of_job(EMPTIED, camera.name_full, note):
                    self.report({"INFO"}, f"NPBG++: {note}")
        elif camera.name_full not in _cameras_noted_this_job.get(CLIPPED, ()):
            note = clip_note(camera, geo, snap, partly=True)
            # its counts change from frame to frame: once per job and camera
            if note and self._first_of_job(CLIPPED, camera.name_full, note):
                self.report({"INFO"}, f"NPBG++: {note}")
        if status:
            self.update_stats("", f"NPBG++: {status}")
        out = frames.compose(frame, snap.output, scene.render.film_transparent, depth_scale)
        h, w = geo.image_size
        # Blender calls render() once per view layer: write that layer's passes only (a
        # result of every layer let the last layer's image replace the others').
        result = self.begin_result(0, 0, self.resolution_x, self.resolution_y, layer=depsgraph.view_layer.name)
        self.gave_result = True  # end_result below hands it over, written or not
        try:
            if (result.resolution_y, result.resolution_x) != (h, w):
                self._error(f"result is {result.resolution_x}x{result.resolution_y}, camera {w}x{h}")
                return
            for layer in result.layers:
                passes = layer.passes
                passes["Combined"].rect.foreach_set(frames.to_blender(out["combined"]))
                points_pass = passes.get(POINTS_PASS)
                if points_pass is not None:
                    points_pass.rect.foreach_set(frames.to_blender(out["points"]))
                depth_pass = passes.get("Depth")
                if depth_pass is not None:
                    depth_pass.rect.foreach_set(frames.to_blender(out["depth"]))
        finally:
            self.end_result(result)
        self.update_progress(1.0)

    def _first_of_job(self, kind: str, camera: str, note: str) -> bool:
        """Record that ``camera`` got a note of ``kind`` (:data:`JOB_NOTES`) in this render job;
        True when it is to be reported now: the job's first such note (with all it says), or
        any new one of a still render. An animation through many cameras (markers) gave one
        warning per camera; the others are named by :meth:`_report_job_summaries`."""
        cameras = _cameras_noted_this_job.setdefault(kind, [])
        if note in _reported_this_job or camera in cameras:
            return False  # an animation would repeat it on every frame
        cameras.append(camera)
        if len(cameras) > 1 and self.is_animation:
            return False
        return first_time_this_job(note)  # records the note, as the colour and EXR notes are

    def _report_job_summaries(self) -> None:
        """On an animation's last frame (:meth:`render`: also one cancelled or failed): the
        :func:`job_summaries` not given yet, as reports."""
        for level, text in job_summaries():
            self.report({level}, f"NPBG++: {text}")

    # --------------------------------------------------------------- viewport
    def view_update(self, context: bpy.types.Context, depsgraph: bpy.types.Depsgraph) -> None:
        from .viewport import ViewportSession

        if self.viewport is None:
            self.viewport = ViewportSession(self)
        self.viewport.scene_changed(context, depsgraph)

    def view_draw(self, context: bpy.types.Context, depsgraph: bpy.types.Depsgraph) -> None:
        from .viewport import ViewportSession

        if self.viewport is None:
            self.viewport = ViewportSession(self)
            self.viewport.scene_changed(context, depsgraph)
        self.viewport.draw(context, depsgraph)


def framing_note(camera: bpy.types.Object, scene: bpy.types.Scene) -> str:
    """For a camera Import Dataset Folder made (:func:`photo_format`: its photo's size and the fy/fx
    it is made for, when not square: the one every view shares, or its photo's own,
    importers.shared_fy_over_fx): why its render does not show the photo's framing, when the
    render's shape (resolution times pixel aspect) differs from the photo's field of view (w / fx
    by h / fy, the photo's shape times fy/fx), else "". Blender has one resolution and pixel
    aspect for all cameras: a portrait photo among landscape ones needs the resolution changed, a
    photo with fy != fx the pixel aspect (X / Y = fy / fx: the lens is fx's); the note names the
    button that sets both (:data:`USE_PHOTO_SIZE_BUTTON`)."""
    fmt = photo_format(camera)
    if fmt is None:
        return ""
    w, h, fy_over_fx = fmt
    r = scene.render
    shape = (r.resolution_x * r.pixel_aspect_x) / (r.resolution_y * r.pixel_aspect_y)
    if abs(shape * h / (w * fy_over_fx) - 1.0) <= 1e-3:
        return ""
    # the button reads the scene camera; F12 over a 3D View with a Local Camera renders through that
    # one (RenderEngine.camera_override), which the button then does not see
    # (in a render the camera is the depsgraph's evaluated copy: compared as the originals)
    is_scene_camera = scene.camera is not None and camera.original == scene.camera.original
    once = "" if is_scene_camera else " once the camera is the scene camera"
    if abs(fy_over_fx - 1.0) <= 1e-6:
        return (f"the camera {camera.name!r} was imported for a {w}x{h} photo, but the render is {r.resolution_x}x"
                f"{r.resolution_y}: it does not show the photo's framing (set Output Properties > Format > "
                f"Resolution to {w}x{h}, or any size of that shape; {USE_PHOTO_SIZE_BUTTON} sets it{once})")
    ax, ay = fmt.pixel_aspect
    return (f"the camera {camera.name!r} was imported for a {w}x{h} photo with fy/fx {fy_over_fx:.4f}, but the "
            f"render is {r.resolution_x}x{r.resolution_y} with Pixel Aspect {r.pixel_aspect_x:g}:"
            f"{r.pixel_aspect_y:g}: it does not show the photo's framing (set Output Properties > Format > Resolution "
            f"to {w}x{h} and Pixel Aspect X to {ax:.4f}, Y to {ay:.4f}; {USE_PHOTO_SIZE_BUTTON} sets both{once})")


# The part of the points in view a camera's clip range may remove before a rendered
# frame gets a note: one in twenty (fewer is hard to notice among the others).
CLIP_NOTE_FRACTION = 0.05


def selected_bundle_points(snap: SceneSnapshot) -> np.ndarray | None:
    """The points of ``snap``'s bundle that its evaluated point object selects (its
    ``npbgpp_id``; all without ids), in that object's local frame; None when unreadable."""
    from npbgpp_core.bundle_file import read_points

    try:
        points = read_points(snap.bundle_path)
    except (ValueError, OSError):
        return None
    if snap.point_ids is not None:
        ids = snap.point_ids
        points = points[ids[(ids >= 0) & (ids < len(points))]]
    return points


def drawn_points(snap: SceneSnapshot) -> np.ndarray | None:
    """The world points a render of ``snap`` draws: the snapshot's (the evaluated point
    object's), else :func:`selected_bundle_points` placed by that object's evaluated
    transform; None when unreadable."""
    points = snap.points
    if points is None and snap.bundle_path:
        points = selected_bundle_points(snap)
        if points is not None and snap.object_matrix is not None and len(points):
            M = snap.object_matrix
            points = points.astype(np.float64) @ M[:3, :3].T + M[:3, 3]
    return points


def clip_note(camera: bpy.types.Object, geo: CameraGeometry, snap: SceneSnapshot, partly: bool = False) -> str:
    """Why points the render draws (:func:`drawn_points`) are missing because of the
    camera's Clip Start / End, else "": for an empty frame, when the clip range removed
    every point in its view; with ``partly``, for a frame with points, when it removed
    :data:`CLIP_NOTE_FRACTION` of them or more."""
    points = drawn_points(snap)
    found = clipped(geo, points) if points is not None else None
    if found is None or found.all == partly:  # an empty frame's note is "all"; a frame with points has some
        return ""
    share = found.removed / found.in_view
    if partly and share < CLIP_NOTE_FRACTION:
        return ""
    return clip_note_text(found, (geo.near, geo.far), camera.name, estimated=False)


# Blender's engine template: every panel tagged BLENDER_RENDER shows for this engine,
# except these, which draw settings NPBG++ ignores.
EXCLUDED_PANELS = frozenset({
    "RENDER_PT_freestyle",  # Freestyle lines are not drawn on neural renders
    "VIEWLAYER_PT_freestyle", "VIEWLAYER_PT_freestyle_animation", "VIEWLAYER_PT_freestyle_edge_detection",
    "VIEWLAYER_PT_freestyle_lineset", "VIEWLAYER_PT_freestyle_lineset_collection",
    "VIEWLAYER_PT_freestyle_lineset_edgetype", "VIEWLAYER_PT_freestyle_lineset_facemarks",
    "VIEWLAYER_PT_freestyle_lineset_visibilty", "VIEWLAYER_PT_freestyle_linestyle_alpha",
    "VIEWLAYER_PT_freestyle_linestyle_color", "VIEWLAYER_PT_freestyle_linestyle_geometry",
    "VIEWLAYER_PT_freestyle_linestyle_strokes", "VIEWLAYER_PT_freestyle_linestyle_strokes_chaining",
    "VIEWLAYER_PT_freestyle_linestyle_strokes_dashedline", "VIEWLAYER_PT_freestyle_linestyle_strokes_selection",
    "VIEWLAYER_PT_freestyle_linestyle_strokes_sorting", "VIEWLAYER_PT_freestyle_linestyle_strokes_splitting",
    "VIEWLAYER_PT_freestyle_linestyle_strokes_splitting_pattern", "VIEWLAYER_PT_freestyle_linestyle_texture",
    "VIEWLAYER_PT_freestyle_linestyle_thickness", "VIEWLAYER_PT_freestyle_style_modules",
    "MATERIAL_PT_freestyle_line",
})
# Panels other engines own that NPBG++ needs: View Layer > Passes (its Data child is
# ours, ui.VIEWLAYER_PT_npbgpp_passes) and Film > Transparent (Workbench's Film panel
# draws only that).
EXTRA_PANELS = ("VIEWLAYER_PT_layer_passes", "RENDER_PT_opengl_film")


def get_panels() -> list[type]:
    """Blender's own panels shown for this engine: all BLENDER_RENDER ones but
    :data:`EXCLUDED_PANELS`, plus :data:`EXTRA_PANELS`."""
    panels = []
    for panel in bpy.types.Panel.__subclasses__():
        engines = getattr(panel, "COMPAT_ENGINES", None)
        if engines is None or panel.__name__ in EXCLUDED_PANELS:
            continue
        if "BLENDER_RENDER" in engines or panel.__name__ in EXTRA_PANELS:
            panels.append(panel)
    return panels


# Warnings given in the current render job (F12 or an animation: Blender calls render()
# per frame and view layer); emptied when a job starts and ends.
_reported_this_job: set[str] = set()
# Notes given per camera: the names of the cameras that had each in the current render job.
FRAMING, CLIPPED, EMPTIED = "framing", "clip range", "empty frame"
_cameras_noted_this_job: dict[str, list[str]] = {}
# Per kind: the report level and what the animation's summary says the cameras did.
JOB_NOTES = {
    FRAMING: ("WARNING", "did not show their photo's framing"),
    CLIPPED: ("INFO", "had points removed by their Clip Start / End"),
    EMPTIED: ("INFO", "rendered empty frames, their Clip Start / End removing every point in view"),
}
SUMMARY_NAMES = 8  # cameras named in a summary line; the rest are counted


def job_summaries() -> list[tuple[str, str]]:
    """(report level, text) of one line per kind of note (:data:`JOB_NOTES`) that more cameras
    of this render job than the one reported in full had (:meth:`NPBGPPRenderEngine._first_of_job`),
    naming them; each kind once per job (a job renders its last frame once per view layer, and
    :func:`_render_job_cancelled` asks too)."""
    lines = []
    for kind, (level, what) in JOB_NOTES.items():
        cameras = _cameras_noted_this_job.get(kind, [])
        if len(cameras) < 2 or not first_time_this_job(f"summary of {kind}"):
            continue
        names = ", ".join(repr(name) for name in cameras[:SUMMARY_NAMES])
        more = f" and {len(cameras) - SUMMARY_NAMES} more" if len(cameras) > SUMMARY_NAMES else ""
        lines.append((level, f"{len(cameras)} cameras of this animation {what} ({names}{more}); the first one's "
                             "note above says why, and F12 through each says what to set."))
    return lines


# The summaries of the last render job, cancelled between frames (:func:`_render_job_cancelled`),
# that no engine could report, by the name of the scene it rendered: that scene's NPBG++ render
# panel shows them until the next job starts or another file (or File > New) is loaded. Written
# in the render thread, read by the panel's draw: replaced whole, never changed in place.
cancelled_job_summaries: dict[str, list[tuple[str, str]]] = {}


def first_time_this_job(note: str) -> bool:
    """True the first time ``note`` comes in the current render job, recording it: an
    animation would repeat it on every frame."""
    if note in _reported_this_job:
        return False
    _reported_this_job.add(note)
    return True


def last_frame(scene: bpy.types.Scene) -> int:
    """The last frame an animation render of ``scene`` renders: Frame Step may skip End, and
    with Overwrite off Blender skips the frames whose image files exist (a movie's are not
    skipped), so the summaries come on the last frame left after the current one."""
    step = max(1, scene.frame_step)
    last = scene.frame_start + (scene.frame_end - scene.frame_start) // step * step
    r = scene.render
    if r.use_overwrite or r.is_movie_format:
        return last
    while last > scene.frame_current and os.path.exists(r.frame_path(frame=last)):
        last -= step
    return last


@bpy.app.handlers.persistent
def _render_job_edge(*_args) -> None:
    """render_init / render_complete: a new job reports its warnings again (and the panel no
    longer shows an earlier job's :data:`cancelled_job_summaries`); load_post: those of the
    file left behind."""
    global cancelled_job_summaries
    _reported_this_job.clear()
    _cameras_noted_this_job.clear()
    cancelled_job_summaries = {}


@bpy.app.handlers.persistent
def _render_job_cancelled(scene: Any = None, *_args) -> None:
    """render_cancel: Esc while Blender writes a frame's image (or composites it) ends an
    animation with no engine left to report the :func:`job_summaries` (Blender checks its break
    flag after the engine's frame and before the next one's: pipeline.cc RE_RenderAnim; an
    Esc before that frame's engine returns is summed up by that engine, :meth:`render`).
    Blender's Python has no report list without an operator or engine, and this handler runs
    in the render job's thread, which must not call operators: the summaries are printed to
    the console as Blender prints reports, and kept for ``scene``'s NPBG++ render panel (only
    plain Python data is touched here: the panel reads it in the main thread)."""
    global cancelled_job_summaries
    lines = job_summaries()
    for level, text in lines:
        print(f"{level.capitalize()}: NPBG++: {text} (printed here: the animation was cancelled between frames)")
    _render_job_edge()
    if lines and isinstance(scene, bpy.types.Scene):
        cancelled_job_summaries = {scene.name_full: lines}


JOB_HANDLERS = (("render_init", _render_job_edge), ("render_complete", _render_job_edge),
                ("render_cancel", _render_job_cancelled), ("load_post", _render_job_edge))

CLASSES = (NPBGPPRenderEngine,)
_tagged_panels: list[type] = []  # the Blender panels register() tagged, untagged by unregister()


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    for panel in get_panels():
        if NPBGPPRenderEngine.bl_idname not in panel.COMPAT_ENGINES:
            panel.COMPAT_ENGINES.add(NPBGPPRenderEngine.bl_idname)
            _tagged_panels.append(panel)
    add_handlers(JOB_HANDLERS)


def unregister() -> None:
    remove_handlers(JOB_HANDLERS)
    while _tagged_panels:
        _tagged_panels.pop().COMPAT_ENGINES.discard(NPBGPPRenderEngine.bl_idname)
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
