"""In-plane alignment of views (SPEC section 3, step 2): pad to a square of side
ceil(sqrt(H^2 + W^2)) and roll the camera so that world +Y projects straight up.

Images are warped exactly (any fx, fy, principal point): a pixel of the aligned
camera maps to the original camera's pixel through the affine map
``K_orig @ roll^T @ K_aligned^-1`` (rolling about the optical axis keeps z).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..camera import Camera

WORLD_UP = (0.0, 1.0, 0.0)


def alignment_angle(camera: Camera) -> float:
    """Roll angle (radians, for :meth:`Camera.rotated_in_plane`) that makes world +Y
    point up in the image; 0 when +Y is (nearly) along the optical axis."""
    _, R_cv, _ = camera.to_opencv()
    up = R_cv @ np.asarray(WORLD_UP)
    if math.hypot(up[0], up[1]) < 1e-9:
        return 0.0
    return -math.pi / 2 - math.atan2(up[1], up[0])


def aligned_size(image_size: tuple[int, int]) -> int:
    h, w = image_size
    return int(math.ceil(math.sqrt(h * h + w * w) - 1e-9))


def align_camera(camera: Camera) -> tuple[Camera, float]:
    """The aligned square camera of ``camera`` and the roll angle used."""
    angle = alignment_angle(camera)
    side = aligned_size(camera.image_size)
    return camera.rotated_in_plane(angle, (side, side)), angle


def _pixel_map(src: Camera, dst: Camera) -> np.ndarray:
    """3x3 affine map taking ``dst`` pixel coordinates to ``src`` pixel coordinates (both
    cameras share a centre and differ by a roll about the optical axis)."""
    K_s, R_s, _ = src.to_opencv()
    K_d, R_d, _ = dst.to_opencv()
    rel = R_s @ R_d.T  # dst camera coords -> src camera coords
    return K_s @ rel @ np.linalg.inv(K_d)


def warp_images(images: torch.Tensor, src: Camera, dst: Camera, mode: str = "bilinear") -> torch.Tensor:
    """Resample images (K, C, H_src, W_src) seen by ``src`` into ``dst``'s pixel grid.
    Pixels of ``dst`` outside ``src``'s image become 0."""
    M = _pixel_map(src, dst)
    h, w = dst.image_size
    hs, ws = src.image_size
    dev = images.device
    v, u = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    Mt = torch.as_tensor(M)
    us = Mt[0, 0] * u + Mt[0, 1] * v + Mt[0, 2]
    vs = Mt[1, 0] * u + Mt[1, 1] * v + Mt[1, 2]
    # grid_sample, align_corners=False: normalised -1 is the outer edge of pixel 0.
    grid = torch.stack([(us + 0.5) / ws * 2 - 1, (vs + 0.5) / hs * 2 - 1], dim=-1)
    grid = grid.to(device=dev, dtype=images.dtype if images.is_floating_point() else torch.float32)
    grid = grid.unsqueeze(0).expand(images.shape[0], -1, -1, -1)
    return F.grid_sample(images, grid, mode=mode, padding_mode="zeros", align_corners=False)


def align_views(images: torch.Tensor, cameras: list[Camera]) -> tuple[torch.Tensor, list[Camera]]:
    """Align a batch of views (K, C, H, W) with their cameras: square images, rolled cameras."""
    out, cams = [], []
    for k, cam in enumerate(cameras):
        acam, _ = align_camera(cam)
        out.append(warp_images(images[k : k + 1], cam, acam))
        cams.append(acam)
    return torch.cat(out, 0), cams
