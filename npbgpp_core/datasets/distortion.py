"""Undistorting photos of COLMAP's SIMPLE_RADIAL / OPENCV cameras to a pinhole camera.

``undistorted_camera(camera, d)`` chooses the target: the pinhole camera with the same
image size, pose and principal point, and both focal lengths scaled by one factor ``s``
(so the pixel aspect ratio is kept), the smallest ``s`` (widest field of view) for which
every output pixel samples the photo with its whole bilinear support inside it. A lens
that pulls the picture inward (pincushion, ``k1 > 0``) gets ``s > 1`` (narrower view: the
old same-K remap left black strips there); one that pushes it outward (barrel,
``k1 < 0``) gets ``s < 1`` (wider view, no photo pixel wasted). Keeping the principal
point keeps the optical axis on the same pixel; the price is that the side with the most
distortion decides the scale, so the opposite side may leave a little of the photo
unused (COLMAP's image_undistorter instead scales each side separately and moves the
principal point).

``undistort(img, camera, d, target)`` remaps a photo to a given target camera: for every
target pixel it computes where the lens put that ray in the photo (forward model, no
iterative inversion) and samples there bilinearly. Loaders pass the target they record as
the view's camera, so image and camera always agree.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from ..camera import Camera
from .common import camera_from_opencv
from .errors import DatasetError
from .scene_data import Distortion

# Output pixels must sample at least this far (pixels) inside the outermost pixel centres,
# so the float32 rounding of the stored focal length cannot move a sample outside.
EDGE_MARGIN = 1e-3
# Focal scales beyond these bounds (a view a quarter of the photo's, or four times it) mean
# a lens model that is not a plausible fit of a non-fisheye lens.
MIN_SCALE, MAX_SCALE = 0.25, 4.0
# Largest interior grid (per axis) checked for a fold of the lens model.
FOLD_GRID = 256


def distort_normalized(x: torch.Tensor, y: torch.Tensor, d: Distortion) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the radial-tangential model to normalised camera coordinates (tensors or
    numpy arrays)."""
    r2 = x * x + y * y
    radial = 1.0 + d.k1 * r2 + d.k2 * r2 * r2
    xd = x * radial + 2.0 * d.p1 * x * y + d.p2 * (r2 + 2.0 * x * x)
    yd = y * radial + d.p1 * (r2 + 2.0 * y * y) + 2.0 * d.p2 * x * y
    return xd, yd


def _jacobian_det(x: np.ndarray, y: np.ndarray, d: Distortion) -> np.ndarray:
    """Determinant of d(xd, yd) / d(x, y): where it is not positive the model folds over."""
    r2 = x * x + y * y
    radial = 1.0 + d.k1 * r2 + d.k2 * r2 * r2
    dr = 2.0 * (d.k1 + 2.0 * d.k2 * r2)  # d radial / dx = dr * x
    a = radial + dr * x * x + 2.0 * d.p1 * y + 6.0 * d.p2 * x
    b = dr * x * y + 2.0 * d.p1 * x + 2.0 * d.p2 * y
    c = dr * x * y + 2.0 * d.p1 * x + 2.0 * d.p2 * y
    e = radial + dr * y * y + 6.0 * d.p1 * y + 2.0 * d.p2 * x
    return a * e - b * c


def _border_pixels(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    u = np.arange(w, dtype=np.float64)
    v = np.arange(h, dtype=np.float64)
    us = np.concatenate([u, u, np.zeros(h), np.full(h, w - 1.0)])
    vs = np.concatenate([np.zeros(w), np.full(w, h - 1.0), v, v])
    return us, vs


def undistorted_camera(camera: Camera, d: Distortion | None, source: str = "camera") -> Camera:
    """The pinhole camera (same size, pose, principal point and clip range) with the widest
    field of view whose every pixel samples inside the photo that ``camera`` (its K) took
    through distortion ``d``; ``camera`` itself when there is no distortion. DatasetError
    naming ``source`` for non-finite coefficients or a lens model that folds over inside
    the region the output would use, or needs an implausible focal scale."""
    if d is None or d.is_identity():
        return camera
    k = camera.intrinsics()
    h, w = camera.image_size
    s = _focal_scale(k.fx, k.fy, k.cx, k.cy, h, w, float(d.k1), float(d.k2), float(d.p1), float(d.p2))
    if isinstance(s, str):
        raise DatasetError(f"{source}: {s}")
    K = np.array([[k.fx * s, 0.0, k.cx], [0.0, k.fy * s, k.cy], [0.0, 0.0, 1.0]])
    return Camera(K, camera.R, camera.t, camera.image_size, dtype=camera.K.dtype, device=camera.device,
                  **camera.clip)


def view_cameras(K: np.ndarray, d: Distortion | None, R: np.ndarray, t: np.ndarray,
                 k_size: tuple[int, int], image_size: tuple[int, int], source: str,
                 lens_source: str) -> tuple[Camera, Camera]:
    """``(photo camera, view camera)`` of a photo of ``image_size`` (h, w) whose ``K``
    (OpenCV, pixel centres at integers) is given for ``k_size``: the photo's camera is
    ``Camera.scaled`` to its size (a resized copy, nerfstudio's ``images_N``); the view
    camera, which loaded images are remapped to, is :func:`undistorted_camera` of it (the
    same camera without distortion). The one construction for the COLMAP and nerfstudio
    loaders and prepare-capture, so all record the same cameras. DatasetError naming
    ``source`` (the photo) or ``lens_source`` (its lens)."""
    cam = camera_from_opencv(K, R, t, k_size, source)
    if tuple(image_size) != tuple(k_size):
        cam = cam.scaled((int(image_size[0]), int(image_size[1])))
    return cam, undistorted_camera(cam, d, lens_source)


@functools.lru_cache(maxsize=256)
def _focal_scale(fx: float, fy: float, cx: float, cy: float, h: int, w: int,
                 k1: float, k2: float, p1: float, p2: float) -> float | str:
    """The focal scale of ``undistorted_camera``, or why there is none (cached: a capture's
    views share a handful of lenses)."""
    d = Distortion(k1, k2, p1, p2)
    coeffs = (k1, k2, p1, p2)
    if not all(math.isfinite(c) for c in coeffs):
        return f"non-finite lens distortion {coeffs}"
    if h < 2 or w < 2:
        return f"cannot undistort a {w}x{h} image (needs at least 2x2 pixels)"
    bu, bv = _border_pixels(h, w)
    lo_u, hi_u = EDGE_MARGIN, w - 1.0 - EDGE_MARGIN
    lo_v, hi_v = EDGE_MARGIN, h - 1.0 - EDGE_MARGIN

    def slack(s: float) -> tuple[float, bool]:
        """Smallest distance (pixels) of a border sample inside the allowed box (negative:
        outside), and whether the model folds at a border pixel."""
        x, y = (bu - cx) / (fx * s), (bv - cy) / (fy * s)
        with np.errstate(over="ignore", invalid="ignore"):  # huge coefficients: inf / nan, infeasible below
            xd, yd = distort_normalized(x, y, d)
            us, vs = xd * fx + cx, yd * fy + cy
            # numpy's min keeps a nan (Python's min of floats may drop it, by argument order)
            m = float(np.concatenate([us - lo_u, hi_u - us, vs - lo_v, hi_v - vs]).min())
            folds = not bool((_jacobian_det(x, y, d) > 0.0).all())  # nan counts as a fold
        return (m if math.isfinite(m) else -math.inf), folds

    def feasible(s: float) -> bool:
        m, folds = slack(s)
        return m >= 0.0 and not folds

    strong = (f"lens distortion {coeffs} leaves no plausible pinhole view inside the photo "
              f"(focal scale outside [{MIN_SCALE}, {MAX_SCALE}]); is the camera model right?")
    if feasible(1.0):
        hi, lo = 1.0, 0.5
        while feasible(lo):
            hi, lo = lo, lo / 2.0
            if lo < MIN_SCALE:
                return strong
    else:
        lo, hi = 1.0, 2.0
        while not feasible(hi):
            lo, hi = hi, hi * 2.0
            if hi > MAX_SCALE:
                return strong
    while hi - lo > 1e-10 * hi:
        mid = 0.5 * (lo + hi)
        if feasible(mid):
            hi = mid
        else:
            lo = mid
    s = hi
    if slack(s)[0] > 0.5:
        # No border sample reaches the photo's edge: the fold, not the photo, limited the view.
        return (f"lens distortion {coeffs} folds over inside the photo (the model maps two directions "
                "to one pixel); is the camera model right?")
    gy = np.linspace(0.0, h - 1.0, min(h, FOLD_GRID))
    gx = np.linspace(0.0, w - 1.0, min(w, FOLD_GRID))
    gv, gu = np.meshgrid(gy, gx, indexing="ij")
    with np.errstate(over="ignore", invalid="ignore"):
        det = _jacobian_det((gu - cx) / (fx * s), (gv - cy) / (fy * s), d)
    if not (det > 0.0).all():  # written so that nan folds too
        return f"lens distortion {coeffs} folds over inside the undistorted view; is the camera model right?"
    return s


def source_pixels(target: Camera, camera: Camera, d: Distortion) -> tuple[torch.Tensor, torch.Tensor]:
    """Photo pixel positions ``(u, v)`` (float64, ``target.image_size``) that each pixel of
    ``target`` samples in a photo taken by ``camera`` (its K) through distortion ``d``."""
    h, w = target.image_size
    t, k = target.intrinsics(), camera.intrinsics()
    v, u = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    xd, yd = distort_normalized((u - t.cx) / t.fx, (v - t.cy) / t.fy, d)
    return xd * k.fx + k.cx, yd * k.fy + k.cy


def undistort(img: torch.Tensor, camera: Camera, d: Distortion, target: Camera | None = None) -> torch.Tensor:
    """Remap a ``(C, H, W)`` photo taken by ``camera`` (its K) through distortion ``d`` to
    the pinhole ``target`` (default: ``undistorted_camera(camera, d)``). Samples outside
    the photo read as 0, which the default target never needs."""
    if target is None:
        target = undistorted_camera(camera, d)
    _, h, w = img.shape
    us, vs = source_pixels(target, camera, d)
    grid = torch.stack([(us + 0.5) / w * 2.0 - 1.0, (vs + 0.5) / h * 2.0 - 1.0], dim=-1)
    out = torch.nn.functional.grid_sample(
        img[None].double(), grid[None], mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return out[0].to(img.dtype).clamp_(0.0, 1.0)
