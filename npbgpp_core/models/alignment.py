"""In-plane alignment of views (NPBG++): pad to a square of side
ceil(sqrt(H^2 + W^2)) and roll the camera so that the world's up axis projects straight
up. The published rule uses world +Y (:data:`WORLD_UP`); every function takes
``world_up`` so Z-up scenes (Blender, NeRF-Synthetic) can use +Z: with +Y there, a camera
looking horizontally along Y sees the up axis along its optical axis, where the roll
angle is undefined and jumps under tiny camera moves.

Images are warped exactly (any fx, fy, principal point): a pixel of the aligned
camera maps to the original camera's pixel through the affine map
``K_orig @ roll^T @ K_aligned^-1`` (rolling about the optical axis keeps z).

Target renders (``align_during_rendering``) use :func:`render_canvas_camera`: by
default only the bounding box of the rolled target image is rendered (H x W with an
exact rot90 when the roll is a multiple of 90 degrees, at most the padded square at 45
degrees), instead of the published padded square (about 2x the pixels of the image).
Inference renders of a resampled canvas compute only the tiles that resampling reads
(:mod:`.tiles`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..camera import Camera

WORLD_UP = (0.0, 1.0, 0.0)


def check_world_up(world_up: Sequence[float]) -> tuple[float, float, float]:
    """``world_up`` as a unit 3-vector; ValueError for anything else."""
    try:
        v = np.asarray([float(x) for x in world_up], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"world_up must be 3 numbers, got {world_up!r}") from exc
    norm = float(np.linalg.norm(v)) if v.shape == (3,) and np.isfinite(v).all() else 0.0
    if norm < 1e-12:
        raise ValueError(f"world_up must be 3 finite numbers, not all zero, got {world_up!r}")
    return tuple(float(x) for x in v / norm)  # type: ignore[return-value]


def same_world_up(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether two up axes (any length, not all zero) are one direction, to 1e-6 once
    normalised: the one comparison of recorded, given and stored axes. ValueError for
    anything that is not a direction."""
    return max(abs(x - y) for x, y in zip(check_world_up(a), check_world_up(b), strict=True)) < 1e-6


AXIS_SNAP_DEGREES = 5.0  # estimate_world_up snaps to a coordinate axis this close


def estimate_world_up(cameras: Sequence[Camera], snap_degrees: float = AXIS_SNAP_DEGREES) -> tuple[float, float, float]:
    """The scene's up axis guessed from its cameras: the mean of their image-up directions
    in world space (photos are mostly taken upright), snapped to the nearest coordinate
    axis when within ``snap_degrees`` (then horizontal cameras get an exact 0 roll).
    Falls back to the published +Y when the cameras do not agree (mean near zero)."""
    ups = []
    for cam in cameras:
        _, R_cv, _ = cam.to_opencv()
        ups.append(-R_cv[1])  # OpenCV camera y points down the image; its row is in world space
    if not ups:
        return WORLD_UP
    mean = np.mean(np.asarray(ups, dtype=np.float64), axis=0)
    norm = float(np.linalg.norm(mean))
    if norm < 0.1:
        return WORLD_UP
    mean /= norm
    axis = int(np.argmax(np.abs(mean)))
    if math.degrees(math.acos(min(1.0, abs(float(mean[axis]))))) <= snap_degrees:
        snapped = np.zeros(3)
        snapped[axis] = math.copysign(1.0, float(mean[axis]))
        mean = snapped
    return check_world_up(mean)


UP_AXES: dict[str, tuple[float, float, float]] = {
    "+x": (1.0, 0.0, 0.0), "-x": (-1.0, 0.0, 0.0), "+y": (0.0, 1.0, 0.0),
    "-y": (0.0, -1.0, 0.0), "+z": (0.0, 0.0, 1.0), "-z": (0.0, 0.0, -1.0),
}


def parse_world_up(spec: str | Sequence[float]) -> Literal["auto"] | tuple[float, float, float]:
    """A ``world_up`` given as ``'auto'``, an axis name (``'+z'``, ``'-y'``, ... or
    ``'POS_Z'``, ``'NEG_Y'``) or 3 numbers: ``'auto'`` or the unit vector; ValueError for
    anything else. Needs no cameras, so a command can check it before reading a scene."""
    if isinstance(spec, str):
        key = spec.strip().lower().replace("pos_", "+").replace("neg_", "-")
        if key == "auto":
            return "auto"
        if key not in UP_AXES:
            raise ValueError(f"world_up must be 'auto', one of {sorted(UP_AXES)} or 3 numbers, got {spec!r}")
        return UP_AXES[key]
    return check_world_up(spec)


def resolve_world_up(spec: str | Sequence[float], cameras: Sequence[Camera] = ()) -> tuple[float, float, float]:
    """A ``world_up`` from :func:`parse_world_up`'s ``spec``, ``'auto'`` being
    :func:`estimate_world_up` over ``cameras``."""
    up = parse_world_up(spec)
    return estimate_world_up(cameras) if up == "auto" else up


def alignment_angle(camera: Camera, world_up: Sequence[float] = WORLD_UP) -> float:
    """Roll angle (radians, for :meth:`Camera.rotated_in_plane`) that makes ``world_up``
    point up in the image; 0 when it is (nearly) along the optical axis."""
    _, R_cv, _ = camera.to_opencv()
    up = R_cv @ np.asarray(world_up, dtype=np.float64)
    if math.hypot(up[0], up[1]) < 1e-9:
        return 0.0
    return -math.pi / 2 - math.atan2(up[1], up[0])


def aligned_size(image_size: tuple[int, int]) -> int:
    h, w = image_size
    return int(math.ceil(math.sqrt(h * h + w * w) - 1e-9))


def align_camera(camera: Camera, world_up: Sequence[float] = WORLD_UP) -> tuple[Camera, float]:
    """The aligned square camera of ``camera`` and the roll angle used."""
    angle = alignment_angle(camera, world_up)
    side = aligned_size(camera.image_size)
    return camera.rotated_in_plane(angle, (side, side)), angle


RENDER_CANVASES = ("bounds", "square")
RIGHT_ANGLE_TOLERANCE = 1e-6  # radians: rolls this close to k * 90 degrees are snapped
CANVAS_MARGIN = 1  # pixels around the rolled target in the bounds canvas (bilinear taps)
# Resampled bounds canvases are rounded up to a multiple of 16 pixels: every level of
# the default 1..1/16 pyramid is then an exact power-of-two reduction, which the
# rasterizer builds from the finer key image instead of scattering all points again
# (measured, 1M points on one core: 640x640 in 67 ms, 638x638 in 149 ms).
CANVAS_MULTIPLE = 16


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def render_canvas_camera(
    camera: Camera, canvas: str = "bounds", world_up: Sequence[float] = WORLD_UP
) -> tuple[Camera, int | None]:
    """The aligned camera a target view is rendered with (``align_during_rendering``)
    and, when the roll is a multiple of 90 degrees, the ``k`` of the exact
    ``torch.rot90(render, k, dims=(-2, -1))`` that turns its image into the target's
    (None: resample with :func:`warp_images`).

    ``canvas='square'`` (published): a ceil(sqrt(H^2 + W^2)) square, always resampled.
    ``canvas='bounds'``: only the bounding box of the rolled target image plus
    :data:`CANVAS_MARGIN` pixels on each side for bilinear sampling, centred in a canvas
    rounded up to a multiple of :data:`CANVAS_MULTIPLE`. A roll within
    :data:`RIGHT_ANGLE_TOLERANCE` of a multiple of 90 degrees is snapped to it and the
    canvas is exactly H x W or W x H (odd quarter turns only with square pixels,
    fx == fy). Rolling the target camera by any angle gives the same aligned camera and
    canvas (square pixels), so renders stay roll invariant."""
    if canvas not in RENDER_CANVASES:
        raise ValueError(f"render canvas must be one of {RENDER_CANVASES}, got {canvas!r}")
    if canvas == "square":
        return align_camera(camera, world_up)[0], None
    angle = alignment_angle(camera, world_up)
    h, w = camera.image_size
    K, R_cv, t_cv = camera.to_opencv()
    fx, fy = K[0, 0], K[1, 1]
    quarter = round(angle / (math.pi / 2))
    square_pixels = abs(fx - fy) <= 1e-9 * max(abs(fx), abs(fy))
    if abs(angle - quarter * (math.pi / 2)) <= RIGHT_ANGLE_TOLERANCE and (quarter % 2 == 0 or square_pixels):
        k = quarter % 4
        size = (h, w) if k % 2 == 0 else (w, h)
        return camera.rotated_in_plane(quarter * (math.pi / 2), size), k
    # Target image corners (pixel edges) as rays, rolled into the aligned camera: their
    # pixel bounding box (same focal lengths) gives the canvas size and principal point.
    c, s = math.cos(angle), math.sin(angle)
    roll = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    corners = np.array([[-0.5, -0.5, 1.0], [w - 0.5, -0.5, 1.0], [-0.5, h - 0.5, 1.0], [w - 0.5, h - 0.5, 1.0]])
    rays = roll @ np.linalg.inv(K) @ corners.T  # (3, 4), z stays 1 (roll about the axis)
    u, v = fx * rays[0] / rays[2], fy * rays[1] / rays[2]
    # Round the extent with a small tolerance so rolled copies of a camera agree.
    bw = _round_up(int(math.ceil(u.max() - u.min() - 1e-6)) + 2 * CANVAS_MARGIN, CANVAS_MULTIPLE)
    bh = _round_up(int(math.ceil(v.max() - v.min() - 1e-6)) + 2 * CANVAS_MARGIN, CANVAS_MULTIPLE)
    # Centre the bounding box in the canvas (symmetric margins).
    cx = (bw - 1) / 2.0 - (u.max() + u.min()) / 2.0
    cy = (bh - 1) / 2.0 - (v.max() + v.min()) / 2.0
    K_aligned = np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])
    aligned = Camera.from_opencv(
        K_aligned, roll @ R_cv, roll @ t_cv, (bh, bw), dtype=camera.R.dtype, device=camera.device, **camera.clip
    )
    return aligned, None


def _pixel_map(src: Camera, dst: Camera) -> np.ndarray:
    """3x3 affine map taking ``dst`` pixel coordinates to ``src`` pixel coordinates (both
    cameras share a centre and differ by a roll about the optical axis)."""
    K_s, R_s, _ = src.to_opencv()
    K_d, R_d, _ = dst.to_opencv()
    rel = R_s @ R_d.T  # dst camera coords -> src camera coords
    return K_s @ rel @ np.linalg.inv(K_d)


def _normalizer(size: tuple[int, int]) -> np.ndarray:
    """Pixel coordinates -> grid_sample coordinates (align_corners=False: -1 is the outer
    edge of pixel 0, pixel centres at integers)."""
    h, w = size
    return np.array([[2.0 / w, 0.0, 1.0 / w - 1.0], [0.0, 2.0 / h, 1.0 / h - 1.0], [0.0, 0.0, 1.0]])


def warp_images(images: torch.Tensor, src: Camera, dst: Camera, mode: str = "bilinear") -> torch.Tensor:
    """Resample images (K, C, H_src, W_src) seen by ``src`` into ``dst``'s pixel grid.
    Pixels of ``dst`` outside ``src``'s image become 0."""
    theta = _normalizer(src.image_size) @ _pixel_map(src, dst) @ np.linalg.inv(_normalizer(dst.image_size))
    dtype = images.dtype if images.is_floating_point() else torch.float32
    if dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    theta_t = torch.as_tensor(theta[:2], dtype=dtype, device=images.device)
    k, c = images.shape[:2]
    h, w = dst.image_size
    grid = F.affine_grid(theta_t.unsqueeze(0).expand(k, -1, -1), [k, c, h, w], align_corners=False)
    return F.grid_sample(images.to(dtype), grid, mode=mode, padding_mode="zeros", align_corners=False)


def align_views(
    images: torch.Tensor, cameras: list[Camera], world_up: Sequence[float] = WORLD_UP, canvas: str = "square"
) -> tuple[torch.Tensor | list[torch.Tensor], list[Camera]]:
    """Align a batch of views (K, C, H, W) with their cameras: rolled cameras and their
    images. ``canvas='square'`` (published): diagonal squares, one (K, C, S, S) tensor.
    ``canvas='bounds'``: each view on its :func:`render_canvas_camera` canvas (an exact
    ``rot90`` of the image at multiples of 90 degrees), a list of (C, h_k, w_k) images."""
    if canvas == "square":
        out, cams = [], []
        for k, cam in enumerate(cameras):
            acam, _ = align_camera(cam, world_up)
            out.append(warp_images(images[k : k + 1], cam, acam))
            cams.append(acam)
        return torch.cat(out, 0), cams
    views, cams = [], []
    for k, cam in enumerate(cameras):
        acam, quarter_turns = render_canvas_camera(cam, "bounds", world_up)
        if quarter_turns is None:
            views.append(warp_images(images[k : k + 1], cam, acam)[0])
        else:  # rot90(aligned, k) is the image, so the aligned image is rot90(image, -k)
            views.append(torch.rot90(images[k], -quarter_turns, dims=(1, 2)).contiguous())
        cams.append(acam)
    return views, cams
