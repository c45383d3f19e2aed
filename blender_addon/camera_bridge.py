"""Blender camera -> NPBG++ camera (OpenCV K, R, t; :meth:`CameraGeometry.to_spec` gives
the one camera message the core takes, ``npbgpp_core.protocol.CameraSpec``).

The one place Blender camera intrinsics are computed (the dataset generator uses
:func:`opencv_intrinsics` too).

The maths is split from bpy: :func:`opencv_intrinsics` and :func:`opencv_extrinsics` take
plain numbers, so they are tested against ``world_to_camera_view`` and need no torch.
Blender's viewplane (``BKE_camera_params_compute_viewplane``): with sensor fit
horizontal the sensor spans ``winx`` pixels, vertical it spans ``winy * ycor`` with
``ycor = pixel_aspect_y / pixel_aspect_x``; lens shift moves the plane by
``shift * viewfac`` pixels. Pixel (row i, column j) has its centre at ``(u, v) = (j, i)``,
rows top-down as in OpenCV.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from npbgpp_core.protocol import CameraSpec

# Blender camera axes (x right, y up, looking down -z) -> OpenCV (x right, y down, z forward).
BLENDER_TO_OPENCV = np.diag([1.0, -1.0, -1.0])


# measured in Blender 5.0.1: Cycles, EEVEE, Workbench and NPBG++ alike fail to write a file of
# Combined and Depth ("Conflicting attributes found for header :: ViewLayer.Depth
# 'pixelAspectRatio'"), leaving it empty; Combined alone is written (NPBG++ always adds its pass)
MULTILAYER_EXR_NOTE = ("Blender 5.0 writes no multilayer OpenEXR of more than one pass (NPBG++ always has two) at a "
                       "non-square Pixel Aspect, whatever the engine; OpenEXR, PNG and other single-layer formats work")


def writes_multilayer_exr(scene: Any) -> bool:
    """Whether ``scene``'s render output is a multilayer OpenEXR (Blender 5.0's Media Type
    Multi-Layer, or older Blenders' OPEN_EXR_MULTILAYER format)."""
    settings = scene.render.image_settings
    return getattr(settings, "media_type", "") == "MULTI_LAYER_IMAGE" or settings.file_format == "OPEN_EXR_MULTILAYER"


def pixel_aspect(fy_over_fx: float) -> tuple[float, float]:
    """Blender's Pixel Aspect (X, Y) whose pixels have ``fy_over_fx`` (X / Y = fy/fx: the
    lens is fx's); the smaller side is 1, as Blender keeps both at 1 or more."""
    return (fy_over_fx, 1.0) if fy_over_fx >= 1.0 else (1.0, 1.0 / fy_over_fx)


# Where the button that sets the render to the scene camera's photo (operators.NPBGPP_OT_use_camera_photo_size,
# in ui.RENDER_PT_npbgpp_format) is, as the framing notes name it (a test checks it against the panels' labels).
USE_PHOTO_SIZE_BUTTON = "Output Properties > Format > NPBG++ > Use Camera's Photo Size"


class PhotoFormat(NamedTuple):
    """The render format that shows a dataset camera's photo as taken: its photo's size and
    the fy/fx of the pixels it was made for (1: square)."""

    width: int
    height: int
    fy_over_fx: float

    @property
    def pixel_aspect(self) -> tuple[float, float]:
        """Blender's Pixel Aspect (X, Y) of these pixels (:func:`pixel_aspect`)."""
        return pixel_aspect(self.fy_over_fx)


def photo_format(camera: Any) -> PhotoFormat | None:
    """The :class:`PhotoFormat` of a camera Import Dataset Folder made: its photo's width, height
    in the custom property ``npbgpp_image_size``, the fy/fx it is made for in ``npbgpp_fy_over_fx``
    (absent: square); None for another camera, an object that is not a camera (Blender lets any
    be the scene camera, and copying custom properties carries these) or a property edited to
    nonsense. The one reading of those properties: F12's framing note and the Use Camera's Photo
    Size button use it."""
    if camera.type != "CAMERA":  # F12 refuses it (scene_camera_geometry): no photo frames it
        return None
    size = camera.get("npbgpp_image_size")
    try:
        if size is None or len(size) != 2 or min(size) <= 0:
            return None
        fy_over_fx = float(camera.get("npbgpp_fy_over_fx", 1.0)) or 1.0
    except (TypeError, ValueError):  # a user's edit of the custom property (a string, a number)
        return None
    if fy_over_fx <= 0:
        return None
    return PhotoFormat(int(size[0]), int(size[1]), fy_over_fx)


def multilayer_exr_note(scene: Any) -> str:
    """For a render of ``scene``: why Blender will not save it as its output's multilayer
    OpenEXR (a non-square Pixel Aspect, :data:`MULTILAYER_EXR_NOTE`), else "". Blender's own
    message names neither ("Error writing render result, Success")."""
    r = scene.render
    if r.pixel_aspect_x == r.pixel_aspect_y or not writes_multilayer_exr(scene):
        return ""
    return (f"this render cannot be saved as the output's multilayer OpenEXR: {MULTILAYER_EXR_NOTE} (Pixel Aspect "
            f"now X {r.pixel_aspect_x:g}, Y {r.pixel_aspect_y:g}: set both to 1, or choose another file format)")


@dataclass(frozen=True)
class CameraGeometry:
    """An OpenCV camera: ``K`` (3, 3), world-to-camera ``R`` (3, 3), ``t`` (3,), ``(H, W)``,
    and the clip range ``near`` / ``far`` in view depth (Blender's clip start / end; the
    defaults clip nothing)."""

    K: np.ndarray
    R: np.ndarray
    t: np.ndarray
    image_size: tuple[int, int]
    near: float = 0.0
    far: float = float("inf")

    def to_spec(self) -> CameraSpec:
        """This camera as the core's camera message (plain lists, no torch: Blender needs
        no torch when the network runs in the worker)."""
        return CameraSpec.from_opencv(self.K, self.R, self.t, self.image_size, self.near, self.far)

    def project(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixel coordinates (N, 2) and view depth (N,) of world points (float64)."""
        cam = np.asarray(points, dtype=np.float64) @ self.R.T + self.t
        z = cam[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            u = self.K[0, 0] * cam[:, 0] / z + self.K[0, 2]
            v = self.K[1, 1] * cam[:, 1] / z + self.K[1, 2]
        return np.stack([u, v], axis=1), z

    def scaled(self, height: int, width: int) -> CameraGeometry:
        """Same view at ``height`` x ``width`` pixels (pixel areas map exactly)."""
        h0, w0 = self.image_size
        sx, sy = width / w0, height / h0
        K = np.array(
            [[self.K[0, 0] * sx, 0.0, (self.K[0, 2] + 0.5) * sx - 0.5],
             [0.0, self.K[1, 1] * sy, (self.K[1, 2] + 0.5) * sy - 0.5],
             [0.0, 0.0, 1.0]]
        )
        return CameraGeometry(K, self.R, self.t, (int(height), int(width)), self.near, self.far)

    def cropped(self, top: int, left: int, height: int, width: int) -> CameraGeometry:
        """The window ``[top, top+height) x [left, left+width)`` of this image."""
        K = self.K.copy()
        K[0, 2] -= left
        K[1, 2] -= top
        return CameraGeometry(K, self.R, self.t, (int(height), int(width)), self.near, self.far)


# The smallest image side npbgpp_core.Camera takes.
MIN_RENDER_SIDE = 2


def render_size(resolution_x: int, resolution_y: int, percentage: int) -> tuple[int, int]:
    """Blender's render size ``(winx, winy)`` (integer maths, as Blender does it)."""
    return max(1, resolution_x * percentage // 100), max(1, resolution_y * percentage // 100)


def opencv_intrinsics(
    lens: float,
    sensor_width: float,
    sensor_height: float,
    sensor_fit: str,
    shift_x: float,
    shift_y: float,
    width: int,
    height: int,
    pixel_aspect_x: float = 1.0,
    pixel_aspect_y: float = 1.0,
) -> np.ndarray:
    """OpenCV K of a perspective Blender camera rendering ``width`` x ``height`` pixels."""
    if lens <= 0:
        raise ValueError(f"camera focal length must be positive, got {lens} mm")
    if pixel_aspect_x <= 0 or pixel_aspect_y <= 0:
        raise ValueError(f"pixel aspect must be positive, got {pixel_aspect_x} x {pixel_aspect_y}")
    ycor = pixel_aspect_y / pixel_aspect_x
    fit = sensor_fit
    if fit == "AUTO":
        fit = "HORIZONTAL" if pixel_aspect_x * width >= pixel_aspect_y * height else "VERTICAL"
        sensor = sensor_width
    elif fit == "HORIZONTAL":
        sensor = sensor_width
    elif fit == "VERTICAL":
        sensor = sensor_height
    else:
        raise ValueError(f"unknown sensor fit {sensor_fit!r}")
    viewfac = width if fit == "HORIZONTAL" else ycor * height
    fx = lens * viewfac / sensor
    fy = fx / ycor
    cx = width / 2.0 - 0.5 - shift_x * viewfac
    cy = height / 2.0 - 0.5 + shift_y * viewfac / ycor
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


def opencv_extrinsics(matrix_world: Any) -> tuple[np.ndarray, np.ndarray]:
    """World-to-camera ``R``, ``t`` (OpenCV axes) of a camera object's ``matrix_world``.

    Object scale is removed (a scaled camera object renders the same image in Blender)."""
    M = np.array(matrix_world, dtype=np.float64).reshape(4, 4)
    axes = M[:3, :3]
    norms = np.linalg.norm(axes, axis=0)
    if np.any(norms < 1e-12):
        raise ValueError("camera object has zero scale")
    rot = axes / norms  # camera-to-world rotation (columns: camera x, y, z in world)
    center = M[:3, 3]
    R_w2c = rot.T
    R = BLENDER_TO_OPENCV @ R_w2c
    t = -R @ center
    return R, t


def border_window(render: Any, width: int, height: int) -> tuple[int, int, int, int] | None:
    """``(top, left, h, w)`` of the render border in a ``width`` x ``height`` image, as
    Blender rounds it (float32 products truncated), or None without a border."""
    if not render.use_border:
        return None
    f32 = np.float32
    xmin = int(f32(render.border_min_x) * f32(width))
    xmax = int(f32(render.border_max_x) * f32(width))
    ymin = int(f32(render.border_min_y) * f32(height))
    ymax = int(f32(render.border_max_y) * f32(height))
    if xmax <= xmin or ymax <= ymin:
        return None
    return height - ymax, xmin, ymax - ymin, xmax - xmin


def scene_camera_geometry(camera_object: Any, scene: Any, use_border: bool = True) -> CameraGeometry:
    """Geometry of ``camera_object`` (evaluated: animation applied) as ``scene`` renders it,
    border window included when ``use_border``."""
    if camera_object.type != "CAMERA":  # Blender lets any object be the scene camera
        raise ValueError(
            f"the scene camera {camera_object.name!r} is not a camera object (its type is {camera_object.type}): "
            "NPBG++ needs a camera's lens (set Scene > Camera to a camera object)"
        )
    cam = camera_object.data
    if cam.type != "PERSP":
        raise ValueError(
            f"camera {camera_object.name!r} is {cam.type.lower()}: NPBG++ renders perspective cameras only"
        )
    r = scene.render
    width, height = render_size(r.resolution_x, r.resolution_y, r.resolution_percentage)
    K = opencv_intrinsics(
        cam.lens, cam.sensor_width, cam.sensor_height, cam.sensor_fit, cam.shift_x, cam.shift_y,
        width, height, r.pixel_aspect_x, r.pixel_aspect_y,
    )
    R, t = opencv_extrinsics(camera_object.matrix_world)
    geo = CameraGeometry(K, R, t, (height, width), *clip_range(cam.clip_start, cam.clip_end))
    window = border_window(r, width, height) if use_border else None
    if window is not None:
        geo = geo.cropped(*window)
    h, w = geo.image_size
    if h < MIN_RENDER_SIDE or w < MIN_RENDER_SIDE:
        # npbgpp_core.Camera refuses such images (its NDC scale is (min(h, w) - 1) / 2); Blender
        # renders them (Resolution is at least 4 px, but % and the border go lower)
        what = "render border" if window is not None else "render"
        raise ValueError(
            f"the {what} is {w}x{h} pixels (Resolution {r.resolution_x}x{r.resolution_y} at "
            f"{r.resolution_percentage}%): NPBG++ renders at least {MIN_RENDER_SIDE}x{MIN_RENDER_SIDE}; raise "
            "Output Properties > Format > Resolution or its %" + (", or widen the border" if window else "")
        )
    return geo


def clip_range(clip_start: float, clip_end: float) -> tuple[float, float]:
    """``(near, far)`` of a Blender clip start / end, checked (Blender keeps start > 0 and
    end > start in its UI, but Python and drivers can set anything)."""
    near, far = float(clip_start), float(clip_end)
    if not (np.isfinite(near) and near >= 0.0) or not far > near:
        raise ValueError(f"camera clip range must have 0 <= Clip Start < Clip End, got {near} and {far}")
    return near, far


def viewport_geometry(window_matrix: Any, view_matrix: Any, width: int, height: int,
                      clip: tuple[float, float] = (0.0, float("inf"))) -> CameraGeometry:
    """Camera of a 3D viewport from ``region_data.window_matrix`` (an OpenGL projection) and
    ``view_matrix`` (world to view), with the view's ``clip`` range (near, far). Lens
    shift and sensor fit are in the projection.

    OpenGL: ``x_ndc = (P00 x + P02 z) / -z``; pixel ``u = (x_ndc + 1) / 2 * width - 0.5``.
    """
    P = np.array(window_matrix, dtype=np.float64).reshape(4, 4)
    V = np.array(view_matrix, dtype=np.float64).reshape(4, 4)
    if abs(P[3, 3]) > 1e-9 or abs(P[3, 2] + 1.0) > 1e-6:
        raise ValueError("orthographic views cannot be rendered by NPBG++: switch the viewport to perspective")
    if width < 2 or height < 2:
        raise ValueError(f"viewport too small: {width}x{height}")
    # x_ndc = -(P00 X + P02 Z)/Z with camera-space X, Z (OpenGL, Z < 0 in front).
    # OpenCV: x = X, z = -Z -> x_ndc = P00 x/z - P02, y_ndc = -P11 y_cv/z - P12 (y_cv = -Y).
    fx = P[0, 0] * width / 2.0
    fy = P[1, 1] * height / 2.0
    cx = (1.0 - P[0, 2]) * width / 2.0 - 0.5
    cy = (1.0 + P[1, 2]) * height / 2.0 - 0.5
    K = np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])
    R = BLENDER_TO_OPENCV @ V[:3, :3]
    t = BLENDER_TO_OPENCV @ V[:3, 3]
    return CameraGeometry(K, R, t, (int(height), int(width)), *clip_range(*clip))


def object_local_geometry(geo: CameraGeometry, matrix_world: Any) -> tuple[CameraGeometry, float]:
    """Camera seeing an object's local space as ``geo`` sees the object in the world.

    Returns the camera and the object's uniform scale ``s`` (local depth * s = world
    depth; the clip range is divided by it). Non-uniform scale cannot be folded into a
    pinhole camera: ValueError."""
    M = np.array(matrix_world, dtype=np.float64).reshape(4, 4)
    lin = M[:3, :3]
    scales = np.linalg.norm(lin, axis=0)
    s = float(scales.mean())
    if s <= 0 or np.ptp(scales) > 1e-5 * s or abs(np.linalg.det(lin / s) - 1.0) > 1e-4:
        raise ValueError("the point object must have a uniform, positive scale to render a neural bundle")
    rot = lin / s
    R = geo.R @ rot
    t = (geo.R @ M[:3, 3] + geo.t) / s
    return CameraGeometry(geo.K, R, t, geo.image_size, geo.near / s, geo.far / s), s


# Blender keeps a clip start / end at least this (its RNA hard minimum).
MIN_CLIP = 1e-6
CLIP_NEAR_FRACTION = 0.5  # clip start: this fraction of the nearest point's depth
CLIP_FAR_MARGIN = 1.5  # clip end: this many times the farthest point's depth (room to move)


def clip_range_covering(points: np.ndarray, R: np.ndarray, t: np.ndarray) -> tuple[float, float] | None:
    """Clip start / end for the OpenCV camera ``R``, ``t`` (world to camera) that keep every
    point of ``points`` (N, 3) in front of it inside the clip range, with margin: start
    :data:`CLIP_NEAR_FRACTION` of the nearest depth, end :data:`CLIP_FAR_MARGIN` times the
    farthest (both at least :data:`MIN_CLIP`). Imported datasets come at any scale (COLMAP's
    is arbitrary, DTU's millimetres), where Blender's default 0.1 .. 1000 cuts them. None
    when no point is in front (the camera's defaults are then as good as any)."""
    pts = np.asarray(points, np.float64).reshape(-1, 3)
    z = pts @ np.asarray(R, np.float64)[2] + float(np.asarray(t, np.float64)[2])
    z = z[np.isfinite(z) & (z > 0.0)]
    if len(z) == 0:
        return None
    far = max(float(z.max()) * CLIP_FAR_MARGIN, 2.0 * MIN_CLIP)
    near = min(max(float(z.min()) * CLIP_NEAR_FRACTION, MIN_CLIP), far / 2.0)
    return near, far


def bounding_sphere(points: np.ndarray) -> tuple[np.ndarray, float]:
    """Centre (the bounding box's) and radius of a sphere holding every finite point."""
    pts = np.asarray(points, np.float64).reshape(-1, 3)
    pts = pts[np.isfinite(pts).all(axis=1)]
    if len(pts) == 0:
        raise ValueError("no finite points")
    center = (pts.min(axis=0) + pts.max(axis=0)) / 2.0
    return center, float(np.linalg.norm(pts - center, axis=1).max())


VIEW_FRAMING_DISTANCE = 4.0  # View All / Frame Selected puts the eye about this many radii from the centre
VIEW_NEAR_FRACTION = 0.05  # of the radius: a framed or zoomed-in view keeps the cloud in front of its start


def view_clip_covering(clip_start: float, clip_end: float, eye: np.ndarray, center: np.ndarray,
                       radius: float) -> tuple[float, float]:
    """A 3D view's clip start / end widened (never narrowed) so that a cloud in the sphere
    ``center``, ``radius`` is not clipped, seen from the view's ``eye`` or after framing it
    (View All / Frame Selected, :data:`VIEW_FRAMING_DISTANCE` radii away): end past the far
    side of the sphere from the farther of the two with :data:`CLIP_FAR_MARGIN`, start at
    most :data:`VIEW_NEAR_FRACTION` of the radius."""
    distance = float(np.linalg.norm(np.asarray(eye, np.float64) - np.asarray(center, np.float64)))
    far = (max(distance, VIEW_FRAMING_DISTANCE * radius) + radius) * CLIP_FAR_MARGIN
    near = max(VIEW_NEAR_FRACTION * radius, MIN_CLIP)
    return min(float(clip_start), near), max(float(clip_end), far)


@dataclass(frozen=True)
class Clipped:
    """What a camera's clip range removes of the points in its view (in front of it and
    inside its image): ``removed`` of ``in_view``, at depths ``nearest`` .. ``farthest``."""

    in_view: int
    removed: int
    nearest: float
    farthest: float

    @property
    def all(self) -> bool:
        return self.removed == self.in_view


def _inside_clip_range(geo: CameraGeometry, points: np.ndarray) -> bool:
    """Whether every one of the world ``points`` (N >= 1, float64) lies at a view depth inside
    ``geo``'s clip range (near, far], from their depths alone (one matrix-vector product, no
    pixel coordinates). A margin far above the rounding by which these depths may differ from
    :meth:`CameraGeometry.project`'s leaves borderline clouds to the exact count."""
    r, t = geo.R[2], float(geo.t[2])
    z = points @ r + t
    nearest, farthest = float(z.min()), float(z.max())
    margin = 1e-9 * (1.0 + abs(t) + float(np.abs(points).max()) * float(np.abs(r).sum()))
    return nearest > geo.near + margin and farthest <= geo.far - margin  # False for NaN


def clipped(geo: CameraGeometry, points: np.ndarray) -> Clipped | None:
    """What ``geo``'s clip range (near, far] removes of the world ``points`` in its view,
    or None when it removes none (or none is in view at all)."""
    points = np.asarray(points, np.float64).reshape(-1, 3)
    if len(points) and _inside_clip_range(geo, points):
        return None  # F12 asks this on every frame that drew points: skip projecting them all
    uv, z = geo.project(points)
    h, w = geo.image_size
    with np.errstate(invalid="ignore"):
        seen = ((z > 0) & (uv[:, 0] >= -0.5) & (uv[:, 0] < w - 0.5) & (uv[:, 1] >= -0.5) & (uv[:, 1] < h - 0.5))
    z = z[seen]
    out = z[(z <= geo.near) | (z > geo.far)]
    if len(out) == 0:
        return None
    return Clipped(len(z), len(out), float(out.min()), float(out.max()))


# The viewport's clip note projects at most this many of the points (an evenly strided
# subset): about 2 ms on a busy 2-core CPU, where all of 1M points took ~90 ms (~30 ms when
# every depth lies inside the range); the share removed it estimates is within about 1%.
CLIP_ESTIMATE_POINTS = 50_000


def clipped_estimate(geo: CameraGeometry, points: np.ndarray, sample: int = CLIP_ESTIMATE_POINTS) -> Clipped | None:
    """:func:`clipped` of an evenly strided subset of at most ``sample`` of the world
    ``points``, for the viewport, which asks on every frame: its counts are the subset's,
    so ``removed / in_view`` estimates the share of the points in view the clip range
    removes. None when it removes none of the subset."""
    points = np.asarray(points).reshape(-1, 3)
    step = max(1, -(-len(points) // max(1, sample)))
    return clipped(geo, points[::step])


def clip_note_text(found: Clipped, clip: tuple[float, float], camera: str, estimated: bool) -> str:
    """The text of the clip note, F12's (engine.clip_note, exact counts) and the viewport's
    (viewport.viewport_clip_note, a share estimated from a subset) alike, so that their
    wording cannot drift: what the clip range ``clip`` (near, far) removes of the points in
    view (``found``) and where to change it, ``camera``'s Lens properties (the camera's name)
    or, with "", the 3D view's sidebar. Only an exact "all" says the frame is empty: an
    estimate's subset may miss a point inside the range."""
    near, far = clip
    if camera:
        where = f"the camera {camera!r}'s clip range ({near:.4g} .. {far:.4g})"
        fix = "set Clip Start / End in the camera's Lens properties to include them"
    else:
        where = f"the 3D view's clip range ({near:.4g} .. {far:.4g})"
        fix = "set Clip Start / End in the sidebar's View tab to include them"
    depths = f"depths {found.nearest:.4g} .. {found.farthest:.4g}"
    percent = 100.0 * found.removed / found.in_view
    if estimated:
        amount = "all the" if found.all else f"about {percent:.0f}% of the"
        return f"{where} removes {amount} points in its view ({depths}); {fix}"
    if found.all:
        return f"{where} removes all {found.in_view} points in its view ({depths}): nothing rendered; {fix}"
    amount = f"{found.removed} of the {found.in_view}"
    return f"{where} removes {amount} points in its view ({percent:.0f}%, {depths}); {fix}"
