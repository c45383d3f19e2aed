"""The "environment" background of NPBG++ (``NPBGPlusPlusConfig.background``): a map of
extractor features over world directions, aggregated from the parts of the input views
where no point of the cloud lands, so that the refiner sees the scene's own surroundings
where the cloud leaves a pixel empty (instead of painting one learnt constant colour).

The map is equirectangular, ``rows`` x ``2 * rows`` bins: rows are the polar angle from
``world_up`` (row 0 around +up, the last row around -up), columns the longitude around it,
measured from the reference axis :func:`map_frame` fixes (the world coordinate axis least
aligned with up, made perpendicular to it; +X for +Y-up and +Z-up scenes), counter-
clockwise seen from above (towards ``up x reference``), wrapping at +-180 degrees. Bin
``(r, c)`` has its centre at polar angle ``(r + 0.5) * pi / rows`` and longitude
``-pi + (c + 0.5) * 2 pi / cols``.

Aggregation (:class:`BackgroundSums`): per input view the feature map is resampled to the
original view's pixel grid (no aligned-canvas frame) and average-pooled to 1/8 of its size
(:data:`BACKGROUND_SCALE`); pixels on which the cloud lands at that size, dilated by one
pixel so object borders do not leak, are dropped; every other pixel is splatted
bilinearly (longitude wrapping, rows clamped at the poles) at its ray direction (camera
centre through the pixel centre) into running sums of features and weights. Sums make
the result independent of the order and grouping of views. :meth:`BackgroundSums.finish`
divides, fills empty bins from their neighbours by push-pull (a pyramid of sums, filled
coarse to fine with bilinear upsampling) and appends a confidence channel
``clamp(weight, 0, 1)`` (0 in filled bins): a (C + 1, rows, cols) tensor, differentiable
in the features.

Rendering (:func:`background_rasters`) looks the map up bilinearly at the ray direction of
every pixel of the refiner's levels :data:`~npbgpp_core.models.refiner.BACKGROUND_LEVELS` (the same interpolation as the
splat: a direction at a bin centre reads that bin).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..camera import Camera
from ..rasterizer import scale_sizes
from .refiner import BACKGROUND_LEVELS

BACKGROUND_MODES = ("none", "environment")
BACKGROUND_SCALE = 1 / 8  # input views are pooled to this fraction of their size


def check_rows(rows: int) -> int:
    """``background_rows``: a power of two in 2..256 (the push-pull pyramid halves it)."""
    if isinstance(rows, bool) or not isinstance(rows, int) or not 2 <= rows <= 256 or rows & (rows - 1):
        raise ValueError(f"background_rows must be a power of two in 2..256, got {rows!r}")
    return rows


def map_frame(world_up: Sequence[float]) -> np.ndarray:
    """Rows (reference, side, up) (3, 3) of the map's frame: ``up`` = ``world_up``,
    ``reference`` = the coordinate axis least aligned with up (lowest index on ties)
    minus its component along up, normalised; ``side`` = up x reference."""
    up = np.asarray(world_up, dtype=np.float64)
    up = up / np.linalg.norm(up)
    axis = int(np.argmin(np.abs(up)))
    e = np.zeros(3)
    e[axis] = 1.0
    ref = e - float(e @ up) * up
    ref /= np.linalg.norm(ref)
    side = np.cross(up, ref)
    return np.stack([ref, side, up])


def map_coordinates(
    directions: torch.Tensor, world_up: Sequence[float], rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Continuous bin coordinates ``(x, y)`` (M,) of unit world ``directions`` (M, 3) in a
    ``rows`` x ``2 rows`` map: bin centres at integers."""
    frame = torch.as_tensor(map_frame(world_up), dtype=directions.dtype, device=directions.device)
    local = directions @ frame.T  # (M, 3): components along reference, side, up
    polar = torch.acos(local[:, 2].clamp(-1.0, 1.0))
    longitude = torch.atan2(local[:, 1], local[:, 0])
    cols = 2 * rows
    x = (longitude + torch.pi) * (cols / (2 * torch.pi)) - 0.5
    y = polar * (rows / torch.pi) - 0.5
    return x, y


def bin_directions(rows: int, world_up: Sequence[float]) -> torch.Tensor:
    """Unit world directions (rows * 2 rows, 3), row-major, of the bin centres of a
    ``rows`` x ``2 rows`` map (polar angle ``(r + 0.5) pi / rows`` from up, longitude
    ``-pi + (c + 0.5) pi / rows`` from the reference axis of :func:`map_frame`)."""
    check_rows(rows)
    polar = (torch.arange(rows, dtype=torch.float64) + 0.5) * (torch.pi / rows)
    longitude = -torch.pi + (torch.arange(2 * rows, dtype=torch.float64) + 0.5) * (torch.pi / rows)
    p, lon = torch.meshgrid(polar, longitude, indexing="ij")
    local = torch.stack([p.sin() * lon.cos(), p.sin() * lon.sin(), p.cos()], dim=-1).reshape(-1, 3)
    frame = torch.as_tensor(map_frame(world_up))
    return (local @ frame).to(torch.float32)


def resample_map(background: torch.Tensor, rows: int, world_up: Sequence[float]) -> torch.Tensor:
    """A map (C', rows, 2 rows) whose every bin holds ``background`` (C', r, 2 r) looked up
    (:func:`lookup`, bilinear) at that bin's centre direction: the same environment at
    another resolution (a finer map to fit: BENCHMARKS.md "A finer environment map").
    Differentiable in ``background``; ``rows`` is checked like ``background_rows``."""
    dirs = bin_directions(rows, world_up).to(background.device)
    c = background.shape[0]
    return lookup(background, dirs, world_up).T.reshape(c, rows, 2 * rows)


def _taps(x: torch.Tensor, y: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat bin indices (4, M) and bilinear weights (4, M) of coordinates (x, y): columns
    wrap around, rows are clamped (the poles)."""
    cols = 2 * rows
    x0, y0 = torch.floor(x), torch.floor(y)
    fx, fy = x - x0, y - y0
    x0, y0 = x0.long(), y0.long()
    c0, c1 = torch.remainder(x0, cols), torch.remainder(x0 + 1, cols)
    r0, r1 = y0.clamp(0, rows - 1), (y0 + 1).clamp(0, rows - 1)
    index = torch.stack([r0 * cols + c0, r0 * cols + c1, r1 * cols + c0, r1 * cols + c1])
    weight = torch.stack([(1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx])
    return index, weight


def pixel_directions(camera: Camera, size: tuple[int, int]) -> torch.Tensor:
    """Unit world directions (h * w, 3), row-major, of the rays through the pixel centres
    of ``camera``'s image resampled to ``size`` = (h, w) (pixel areas map exactly, as in
    the rasterizer's pyramid and :meth:`Camera.scaled`)."""
    h, w = size
    H, W = camera.image_size
    k = camera.intrinsics()
    dev = camera.device
    u = (torch.arange(w, device=dev, dtype=torch.float64) + 0.5) * (W / w) - 0.5
    v = (torch.arange(h, device=dev, dtype=torch.float64) + 0.5) * (H / h) - 0.5
    x = ((u - k.cx) / k.fx)[None, :].expand(h, w)
    y = ((v - k.cy) / k.fy)[:, None].expand(h, w)
    cam = torch.stack([x, y, torch.ones_like(x)], dim=-1).reshape(-1, 3)
    world = cam @ camera.R.to(torch.float64)  # R^T applied to row vectors
    return (world / world.norm(dim=1, keepdim=True)).to(torch.float32)


def lookup(background: torch.Tensor, directions: torch.Tensor, world_up: Sequence[float]) -> torch.Tensor:
    """Bilinear samples (M, C') of a map (C', rows, cols) at unit world ``directions`` (M, 3)."""
    c, rows, cols = background.shape
    x, y = map_coordinates(directions.to(torch.float32), world_up, rows)
    index, weight = _taps(x, y, rows)
    # (bins, C'); contiguous: index_select on the transposed view is ~15x slower on the CPU.
    flat = background.reshape(c, rows * cols).T.contiguous()
    taps = flat.index_select(0, index.reshape(-1)).view(4, -1, c)
    return (taps * weight[:, :, None].to(taps.dtype)).sum(0)


def background_rasters(
    background: torch.Tensor | None, camera: Camera, sizes: Sequence[tuple[int, int]], world_up: Sequence[float],
    channels: int,
) -> list[torch.Tensor]:
    """Per size (h, w) a (channels, h, w) raster of the map looked up at the ray direction
    of every pixel of ``camera``'s image at that size; zeros for ``background`` None (no
    observation)."""
    out = []
    for h, w in sizes:
        if background is None:
            out.append(torch.zeros(channels, h, w, device=camera.device))
            continue
        if background.ndim != 3 or background.shape[0] != channels:
            raise ValueError(f"scene background must be ({channels}, rows, cols), got {tuple(background.shape)}")
        dirs = pixel_directions(camera, (h, w)).to(background.device)
        out.append(lookup(background, dirs, world_up).T.reshape(channels, h, w))
    return out


def refiner_background_rasters(
    background: torch.Tensor | None, camera: Camera, scales: Sequence[float], world_up: Sequence[float],
    channels: int,
) -> list[torch.Tensor]:
    """The refiner's background input: :func:`background_rasters` at the sizes of the
    pyramid ``scales`` for ``camera`` at the levels :data:`BACKGROUND_LEVELS` (1/4, 1/8, 1/16)."""
    sizes = scale_sizes(camera.image_size, scales)
    return background_rasters(background, camera, [sizes[level] for level in BACKGROUND_LEVELS], world_up, channels)


def push_pull(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Fill a map: ``values`` (C, rows, cols) sums of features, ``weight`` (rows, cols) sums
    of weights. Bins with weight > 0 hold ``values / weight``; the others the bilinear
    upsampling (longitude wrapping) of the filled map one pyramid level coarser, whose bins
    sum 2x2 bins of the finer level. All zeros when no bin has weight."""
    sums = [(values, weight)]
    while sums[-1][1].shape[0] > 1 or sums[-1][1].shape[1] > 1:
        v, w = sums[-1]
        kh, kw = (2 if w.shape[0] > 1 else 1), (2 if w.shape[1] > 1 else 1)
        sums.append((F.avg_pool2d(v[None], (kh, kw))[0] * (kh * kw), F.avg_pool2d(w[None], (kh, kw))[0] * (kh * kw)))
    filled = None
    for v, w in reversed(sums):
        mean = v / w.clamp_min(1e-12)
        if filled is None:
            filled = torch.where(w > 0, mean, torch.zeros_like(mean))
            continue
        h, wd = w.shape
        kw = wd // filled.shape[2]
        padded = torch.cat([filled[:, :, -1:], filled, filled[:, :, :1]], dim=2)  # wrap one column each side
        up = F.interpolate(padded[None], size=(h, (filled.shape[2] + 2) * kw), mode="bilinear",
                           align_corners=False)[0]
        up = up[:, :, kw : kw + wd]
        filled = torch.where(w > 0, mean, up)
    assert filled is not None
    return filled


class BackgroundSums:
    """Running sums of the environment map: features (C, rows * cols) and weights (rows * cols);
    :meth:`add` is differentiable (out of place when autograd tracks the features)."""

    def __init__(self, channels: int, rows: int, world_up: Sequence[float], device: torch.device,
                 dtype: torch.dtype = torch.float32) -> None:
        self.channels, self.rows, self.cols = channels, check_rows(rows), 2 * rows
        self.world_up = tuple(world_up)
        self.sum_f = torch.zeros(rows * self.cols, channels, device=device, dtype=dtype)
        self.sum_w = torch.zeros(rows * self.cols, device=device, dtype=dtype)
        self._tracked = False

    def add(self, features: torch.Tensor, directions: torch.Tensor) -> None:
        """Splat samples ``features`` (M, C) at unit world ``directions`` (M, 3)."""
        if features.shape[0] == 0:
            return
        x, y = map_coordinates(directions.detach().to(torch.float32), self.world_up, self.rows)
        index, weight = _taps(x, y, self.rows)
        index, weight = index.reshape(-1), weight.reshape(-1).to(self.sum_f.dtype)
        values = (features.to(self.sum_f.dtype)[None] * weight.view(4, -1, 1)).reshape(-1, self.channels)
        grad = torch.is_grad_enabled() and (features.requires_grad or self._tracked)
        self._tracked = grad
        self.sum_f = self.sum_f.index_add(0, index, values) if grad else self.sum_f.index_add_(0, index, values)
        self.sum_w = self.sum_w.index_add_(0, index, weight)

    def finish(self) -> torch.Tensor:
        """The map (C + 1, rows, cols): filled features and the confidence channel."""
        w = self.sum_w.view(self.rows, self.cols)
        v = self.sum_f.T.reshape(self.channels, self.rows, self.cols)
        filled = push_pull(v, w)
        return torch.cat([filled, w.clamp(0, 1)[None].to(filled.dtype)], dim=0)


def view_samples(
    feature_map: torch.Tensor, feature_camera: Camera, camera: Camera, points: torch.Tensor, near: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Background samples of one input view: ``feature_map`` (C, h, w) is the extractor's
    output for ``feature_camera`` (the aligned canvas, or ``camera`` itself). Returns
    features (M, C) and unit world directions (M, 3) of the pixels of ``camera``'s image at
    :data:`BACKGROUND_SCALE` on which no point of ``points`` lands (dilated by one pixel)."""
    from ..rasterizer import rasterize
    from .alignment import warp_images

    H, W = camera.image_size
    h, w = int(H * BACKGROUND_SCALE), int(W * BACKGROUND_SCALE)
    c = feature_map.shape[0]
    if h < 1 or w < 1:
        return feature_map.new_zeros(0, c), feature_map.new_zeros(0, 3)
    if feature_camera is not camera:
        feature_map = warp_images(feature_map[None], feature_camera, camera)[0]
    pooled = F.adaptive_avg_pool2d(feature_map[None].float(), (h, w))[0]
    if points.shape[0]:
        assert scale_sizes(camera.image_size, (BACKGROUND_SCALE,))[0] == (h, w)
        index = rasterize(points, camera, scales=(BACKGROUND_SCALE,), near=near)[0]
        covered = F.max_pool2d((index >= 0).float()[None, None], 3, stride=1, padding=1)[0, 0] > 0
        free = torch.nonzero(~covered.reshape(-1)).squeeze(1)
    else:
        free = torch.arange(h * w, device=pooled.device)
    dirs = pixel_directions(camera, (h, w)).to(pooled.device).index_select(0, free)
    feats = pooled.reshape(c, h * w).T.index_select(0, free)
    return feats, dirs
