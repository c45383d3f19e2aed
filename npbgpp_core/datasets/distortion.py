"""Undistorting images of COLMAP's SIMPLE_RADIAL / RADIAL-free OPENCV cameras on load.

For every pixel of the undistorted (pinhole) image we compute where the distorted lens
put it and sample the source there bilinearly: the geometry is exact (forward model, no
iterative inversion); the only approximation is bilinear interpolation of the source.
Output pixels whose source lies outside the photo are black (mask 0).
"""

from __future__ import annotations

import torch

from ..camera import Camera
from .scene_data import Distortion


def distort_normalized(x: torch.Tensor, y: torch.Tensor, d: Distortion) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the radial-tangential model to normalised camera coordinates."""
    r2 = x * x + y * y
    radial = 1.0 + d.k1 * r2 + d.k2 * r2 * r2
    xd = x * radial + 2.0 * d.p1 * x * y + d.p2 * (r2 + 2.0 * x * x)
    yd = y * radial + d.p1 * (r2 + 2.0 * y * y) + 2.0 * d.p2 * x * y
    return xd, yd


def undistort(img: torch.Tensor, camera: Camera, d: Distortion) -> torch.Tensor:
    """Remap a ``(C, H, W)`` image taken through distortion ``d`` to the pinhole ``camera``
    (same K, same size)."""
    c, h, w = img.shape
    k = camera.intrinsics()
    v, u = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    xd, yd = distort_normalized((u - k.cx) / k.fx, (v - k.cy) / k.fy, d)
    us, vs = xd * k.fx + k.cx, yd * k.fy + k.cy
    grid = torch.stack([(us + 0.5) / w * 2.0 - 1.0, (vs + 0.5) / h * 2.0 - 1.0], dim=-1)
    out = torch.nn.functional.grid_sample(
        img[None].double(), grid[None], mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return out[0].to(img.dtype).clamp_(0.0, 1.0)
