"""The rasterizer contract both backends import: the torch reference
(``npbgpp_core.rasterizer``, reached through ``npbgpp_core/_backend.py``) and the CUDA
kernel (``kernels.CudaRasterizer``). Plain Python and torch only: it never imports
``npbgpp_core`` (dependencies point inward) and needs no GPU.

A point with world coordinates ``x`` projects with the OpenCV ``R``, ``t``, ``fx, fy,
cx, cy`` of :class:`RasterParams`, every float32 operation rounded once in this order:
``x_c = x*R00 + y*R01 + z*R02 + t0`` (likewise ``y_c``, ``z_c``, left to right),
``u = (x_c / z_c) * fx + cx``, ``v = (y_c / z_c) * fy + cy``. It counts iff ``z_c > near``
(and ``z_c <= far``) and ``u``, ``v`` are finite, and lands at scale ``(h_s, w_s)`` on column
``floor(((u + 0.5) / W) * w_s)``, row ``floor(((v + 0.5) / H) * h_s)`` when inside. Its
key is ``float_bits(z_c) << 32 | index``; per pixel the smallest key wins (nearest point,
ties to the lowest index); :data:`EMPTY_KEY` marks empty pixels. Scales follow
:func:`pyramid_plan`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

EMPTY_KEY: int = torch.iinfo(torch.int64).max
# Points per pass: the torch reference's chunk (about 70 bytes of temporaries per point)
# and the CUDA backend's streaming chunk for points not on the GPU (12 bytes per point).
DEFAULT_CHUNK_POINTS: int = 1 << 22


@dataclass(frozen=True)
class RasterParams:
    """The float32 numbers both backends use; computed once per call
    (``npbgpp_core.rasterizer.raster_params``)."""

    R: torch.Tensor  # (3, 3) float32 OpenCV world-to-camera rotation on the points' device
    t: torch.Tensor  # (3,) OpenCV translation
    fx: float  # float32-representable
    fy: float
    cx: float
    cy: float
    height: int
    width: int
    near: float
    sizes: tuple[tuple[int, int], ...]
    # The clip end (float32; inf: none). The torch reference tests it with near; the CUDA
    # kernel's arguments carry only near, so its caller blanks points beyond far first
    # (npbgpp_core.rasterizer.nan_beyond_far).
    far: float = float("inf")


def scale_sizes(image_size: Sequence[int], scales: Sequence[float]) -> tuple[tuple[int, int], ...]:
    """Image sizes ``(int(s*H), int(s*W))`` of the pyramid; each must be at least 1x1."""
    H, W = int(image_size[0]), int(image_size[1])
    sizes = []
    for s in scales:
        if not (isinstance(s, int | float) and s > 0):
            raise ValueError(f"scales must be positive numbers, got {s!r}")
        h, w = int(s * H), int(s * W)
        if h < 1 or w < 1:
            raise ValueError(f"scale {s} of a {H}x{W} image gives an empty {h}x{w} image")
        sizes.append((h, w))
    if not sizes:
        raise ValueError("scales must not be empty")
    return tuple(sizes)


def min_side(scales: Sequence[float]) -> int:
    """The fewest pixels a side of an image whose every scale of :func:`scale_sizes` is at
    least one pixel (16 for the default pyramid down to 1/16)."""
    coarsest = min(scales)
    if not (isinstance(coarsest, int | float) and coarsest > 0):
        raise ValueError(f"scales must be positive numbers, got {coarsest!r}")
    least = max(1, math.ceil(1.0 / coarsest))
    while int(coarsest * least) < 1:  # scale_sizes' rounding: 1/s may round down
        least += 1
    return least


def pow2_ratio(fine: int, coarse: int) -> int | None:
    """``fine / coarse`` when it is a power of two (1 included), else None."""
    if coarse <= 0 or fine % coarse:
        return None
    r = fine // coarse
    return r if r & (r - 1) == 0 else None


def pyramid_plan(sizes: Sequence[tuple[int, int]]) -> list[tuple[int, int | None]]:
    """(scale, source) in processing order, largest image first: source None = rasterize
    the points directly, else the index of a finer scale whose size is a power-of-two
    multiple in both axes, whose key image min-pooled gives exactly the same keys. Of
    several such scales the smallest is taken (the cheapest to pool)."""
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i][0] * sizes[i][1])
    plan: list[tuple[int, int | None]] = []
    done: list[int] = []
    for i in order:
        h, w = sizes[i]
        sources = [j for j in done if pow2_ratio(sizes[j][0], h) and pow2_ratio(sizes[j][1], w)]
        source = min(sources, key=lambda j: sizes[j][0] * sizes[j][1]) if sources else None
        plan.append((i, source))
        done.append(i)
    return plan
