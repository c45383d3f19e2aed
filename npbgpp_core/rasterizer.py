"""Multi-scale nearest-point rasterization: the pure-PyTorch reference and the one entry
point to both backends.

The contract (pixel mapping, float order, keys, empty key, pyramid plan, chunk size) is
``kernels/contract.py``, shared with the CUDA kernel, which gives identical keys: a point
with full-resolution OpenCV pixel coordinates ``(u, v)`` and depth ``z`` lands at scale
``(h_s, w_s)`` on column ``floor(((u + 0.5) / W) * w_s)`` and row
``floor(((v + 0.5) / H) * h_s)``; it counts iff ``z > near``, everything is finite and
it lands inside. A camera's clip range (``Camera.near`` / ``far``, e.g. a Blender
camera's clip start / end) applies here too: ``near`` is raised to its clip start and
points deeper than its clip end are dropped (the torch reference tests ``z <= far``;
for the CUDA kernel, which knows only ``near``, they are blanked first). Per
pixel the smallest depth wins, equal depths go to the lowest point index. All arithmetic
is float32 in a fixed order (see :func:`project_for_raster`).

Entry points: :func:`rasterize` (index images), :func:`rasterize_keys` (packed keys, for
depth), :func:`rasterize_descriptors` (per-point descriptors computed only for the
winners, gathered into ``(C+1, h, w)`` images: what NPBG++ and NPBG render and train
with), :func:`rasterize_features` (the same with a given (N, C) feature table) and
:func:`landing_mask` (which points land on a pixel at all, winning it or not).

Implementation: depth and index pack into one int64 key (positive float32 bits keep
their order as integers), so one ``scatter_reduce_('amin')`` builds a z-buffer. A
coarser scale whose size divides a finer one's by a power of two in both axes is
reduced from the finer key image (exactly the same result, much less work).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ._backend import DEFAULT_CHUNK_POINTS, EMPTY_KEY, RasterParams, min_side, pyramid_plan, scale_sizes
from .camera import Camera

DEFAULT_SCALES: tuple[float, ...] = (1.0, 1 / 2, 1 / 4, 1 / 8, 1 / 16)
_log = logging.getLogger("npbgpp_core.rasterizer")

__all__ = [
    "DEFAULT_CHUNK_POINTS", "DEFAULT_SCALES", "EMPTY_KEY", "RasterParams", "gather", "gather_features",
    "keys_to_depth", "keys_to_index", "landing_mask", "min_side", "nan_beyond_far", "project_for_raster",
    "raster_params", "rasterize",
    "rasterize_descriptors", "rasterize_features", "rasterize_keys", "rasterize_keys_torch", "scale_sizes",
]


def _f32(x: float) -> float:
    return float(np.float32(x))


def raster_params(camera: Camera, scales: Sequence[float], near: float, device: torch.device) -> RasterParams:
    """The contract's float32 numbers for ``camera`` (both backends take these); the near
    plane is the larger of ``near`` and the camera's clip start, the far one its clip end."""
    if not near >= 0 or not np.isfinite(near):
        raise ValueError(f"near must be a finite number >= 0, got {near}")
    near = max(near, camera.near)
    k = camera.intrinsics()
    return RasterParams(
        R=camera.R.to(device=device, dtype=torch.float32),
        t=camera.t.to(device=device, dtype=torch.float32),
        fx=_f32(k.fx),
        fy=_f32(k.fy),
        cx=_f32(k.cx),
        cy=_f32(k.cy),
        height=camera.height,
        width=camera.width,
        near=_f32(near),
        sizes=scale_sizes(camera.image_size, scales),
        far=_f32(camera.far),
    )


def project_for_raster(points: torch.Tensor, p: RasterParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 ``(u, v, z)`` for (N, 3) float32 points, each op rounded to float32 in the
    contract's order (no fused multiply-add). Reference twin of ``project_point`` in
    kernels/csrc/rasterizer_math.h (and the reverse): camera ``x_c = x*R00 + y*R01 +
    z*R02 + t0`` left to right (likewise y_c, z_c), ``u = (x_c / z_c) * fx + cx``."""
    R, t = p.R, p.t
    x, y, z = points[:, 0], points[:, 1], points[:, 2]
    xc = x * R[0, 0] + y * R[0, 1] + z * R[0, 2] + t[0]
    yc = x * R[1, 0] + y * R[1, 1] + z * R[1, 2] + t[1]
    zc = x * R[2, 0] + y * R[2, 1] + z * R[2, 2] + t[2]
    u = (xc / zc) * p.fx + p.cx
    v = (yc / zc) * p.fy + p.cy
    return u, v, zc


def _size_divisors(p: RasterParams, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The full-resolution ``W``, ``H`` as 0-dim float32 tensors on ``device``, for
    :func:`_normalized`. Divide by these, not Python numbers: on CUDA torch computes a
    division by a CPU scalar as a multiplication by its float32 reciprocal (an ulp off at
    times), which would make the reference device-dependent; this way CPU, GPU and kernel
    all divide."""
    width = torch.tensor(float(p.width), dtype=torch.float32, device=device)
    height = torch.tensor(float(p.height), dtype=torch.float32, device=device)
    return width, height


def _normalized(
    points: torch.Tensor, p: RasterParams, width: torch.Tensor, height: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(qx, qy, z, valid)`` of (N, 3) float32 points: ``q = ((u + 0.5) / W, (v + 0.5) / H)``
    and whether the point counts (finite, ``near < z <= far``). Reference twin of
    ``project_point`` in kernels/csrc/rasterizer_math.h. ``width`` / ``height``: from
    :func:`_size_divisors`."""
    u, v, z = project_for_raster(points, p)
    valid = torch.isfinite(u) & torch.isfinite(v) & (z > p.near) & (z <= p.far)
    return (u + 0.5) / width, (v + 0.5) / height, z, valid


def _pixel_of(
    qx: torch.Tensor, qy: torch.Tensor, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Column ``floor(qx * w)``, row ``floor(qy * h)`` (float32) of ``q`` in an ``size`` =
    (h, w) image and whether that lies inside. Reference twin of ``pixel_of`` in
    kernels/csrc/rasterizer_math.h."""
    h, w = size
    col = torch.floor(qx * w)
    row = torch.floor(qy * h)
    return col, row, (col >= 0) & (col < w) & (row >= 0) & (row < h)


def _scatter_direct(buf: torch.Tensor, qx, qy, key, valid, size: tuple[int, int]) -> None:
    """Keep the smallest key per pixel of the flat ``buf`` (h*w + 1 slots, the last a spare)."""
    h, w = size
    col, row, inside = _pixel_of(qx, qy, size)
    ok = valid & inside
    # Culled points go to a spare slot h*w (dropped below) instead of being filtered out:
    # no boolean indexing (nonzero + 4 gathers, a host sync on GPU), same keys.
    pix = torch.where(ok, row, h).long() * w + torch.where(ok, col, 0).long()
    buf.scatter_reduce_(0, pix, key, reduce="amin", include_self=True)


def _keys_from_finer(fine: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Min-pool a finer key image whose size is a power-of-two multiple of ``size``.
    Reference twin of the kernel's ``min_pool_keys`` (``pooled_key`` in rasterizer_math.h)."""
    h, w = size
    return fine.view(h, fine.shape[0] // h, w, fine.shape[1] // w).amin(dim=(1, 3))


def rasterize_keys_torch(
    points: torch.Tensor, p: RasterParams, chunk_points: int | None = DEFAULT_CHUNK_POINTS
) -> list[torch.Tensor]:
    """Packed (depth bits << 32 | index) key images per scale; EMPTY_KEY where empty.
    Reference twin of ``kernels.CudaRasterizer.rasterize_keys`` (which gives the same keys).

    Points go through in chunks of ``chunk_points`` (None: all at once) into the same key
    images, so temporary memory stays near 70 bytes x chunk (about 0.3 GB by default)
    for any cloud size; keys hold global indices, so the result does not depend on it."""
    n = points.shape[0]
    if n >= 2**31:
        raise ValueError("at most 2**31 - 1 points per rasterization")
    device = points.device
    plan = pyramid_plan(p.sizes)
    direct: dict[int, torch.Tensor] = {}
    for i, source in plan:
        if source is None:
            h, w = p.sizes[i]
            direct[i] = torch.full((h * w + 1,), EMPTY_KEY, dtype=torch.int64, device=device)
    width, height = _size_divisors(p, device)
    step = max(1, n if not chunk_points else min(n, int(chunk_points)))
    for start in range(0, n, step):
        chunk = points[start : start + step]
        qx, qy, z, valid = _normalized(chunk, p, width, height)
        index = torch.arange(start, start + chunk.shape[0], device=device, dtype=torch.int64)
        key = (z.view(torch.int32).to(torch.int64) << 32) | index
        for i, buf in direct.items():
            _scatter_direct(buf, qx, qy, key, valid, p.sizes[i])
    out: dict[int, torch.Tensor] = {i: buf[:-1].view(p.sizes[i]) for i, buf in direct.items()}
    for i, source in plan:
        if source is not None:
            out[i] = _keys_from_finer(out[source], p.sizes[i])
    return [out[i] for i in range(len(p.sizes))]


def keys_to_index(keys: torch.Tensor) -> torch.Tensor:
    idx = keys & 0xFFFFFFFF
    return torch.where(keys == EMPTY_KEY, torch.full_like(idx, -1), idx)


def _prepare_points(points: torch.Tensor) -> torch.Tensor:
    if not isinstance(points, torch.Tensor):
        points = torch.as_tensor(np.asarray(points))
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points must be (N, 3), got {tuple(points.shape)}")
    if not points.is_floating_point():
        raise TypeError(f"points must be a floating-point tensor, got {points.dtype}")
    points = points.detach().to(torch.float32).contiguous()
    if points.shape[0] and not torch.isfinite(points).all():
        bad = int((~torch.isfinite(points).all(dim=1)).sum())
        warnings.warn(f"rasterize: dropping {bad} points with NaN/inf coordinates", stacklevel=3)
    return points


def nan_beyond_far(points: torch.Tensor, p: RasterParams) -> torch.Tensor:
    """``points`` with those beyond ``p.far`` (the contract's float32 view depth ``z_c >
    far``) replaced by NaN, for the CUDA kernel only: its arguments carry ``near`` but not
    ``far``, and non-finite points never land while every other point keeps its index.
    The torch reference tests ``far`` itself (no whole-cloud copy). ``points`` unchanged
    when ``far`` is inf."""
    if p.far == float("inf") or not points.shape[0]:
        return points
    R, t = p.R, p.t
    z = points[:, 0] * R[2, 0] + points[:, 1] * R[2, 1] + points[:, 2] * R[2, 2] + t[2]  # project_for_raster's z_c
    return torch.where((z > p.far).unsqueeze(1), torch.full_like(points[:1], float("nan")), points)


_announced: set[str] = set()


def _announce(chosen: str, why: str) -> None:
    """Log one line per backend actually used (the first time it is used)."""
    if chosen not in _announced:
        _announced.add(chosen)
        _log.info("rasterizer backend: %s%s", chosen, f" ({why})" if why else "")


def _choose_backend(backend: str, points: torch.Tensor) -> str:
    from . import _backend

    if backend not in ("auto", "torch", "cuda"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'cuda', got {backend!r}")
    if backend == "torch":
        _announce("torch", "requested")
        return "torch"
    if backend == "cuda":
        if not points.is_cuda:
            raise ValueError(
                f"backend='cuda' needs points on a CUDA device, got points on {points.device}; "
                "move them with points.cuda() or use backend='auto'"
            )
        if _backend.cuda_rasterizer() is None:
            why = _backend.why_unavailable()
            raise RuntimeError(f"backend='cuda' requested but the CUDA kernel is unavailable: {why}")
        _announce("cuda", "")
        return "cuda"
    available = points.is_cuda and _backend.cuda_rasterizer() is not None
    chosen = "cuda" if available else "torch"
    _announce(chosen, "" if available else (_backend.why_unavailable() if points.is_cuda else "points not on CUDA"))
    return chosen


def rasterize_keys(
    points: torch.Tensor,
    camera: Camera,
    scales: Sequence[float] = DEFAULT_SCALES,
    near: float = 1e-3,
    backend: str = "auto",
) -> list[torch.Tensor]:
    """Packed z-buffer keys per scale (see module doc); used to get depth and index."""
    points = _prepare_points(points)
    p = raster_params(camera, scales, near, points.device)
    if points.shape[0] == 0:
        return [torch.full(s, EMPTY_KEY, dtype=torch.int64, device=points.device) for s in p.sizes]
    if _choose_backend(backend, points) == "cuda":
        from . import _backend

        return _backend.cuda_rasterizer().rasterize_keys(nan_beyond_far(points, p), p)  # type: ignore[union-attr]
    return rasterize_keys_torch(points, p)


def rasterize(
    points: torch.Tensor,
    camera: Camera,
    scales: Sequence[float] = DEFAULT_SCALES,
    near: float = 1e-3,
    backend: str = "auto",
) -> list[torch.Tensor]:
    """Index of the nearest point per pixel per scale (LongTensor ``(h_s, w_s)``, -1 empty)."""
    return [keys_to_index(k) for k in rasterize_keys(points, camera, scales, near, backend)]


def landing_mask(points: torch.Tensor, camera: Camera, scale: float = 1.0, near: float = 1e-3) -> torch.Tensor:
    """Which points (bool (N,)) land on a pixel of :func:`rasterize`'s image at ``scale``,
    winning it or not: finite, in front of ``near`` (and the camera's clip start), not
    beyond its clip end, inside the image. The z-buffer's own mapping (the contract's,
    which the CUDA kernel shares), so the same on either backend; torch only, as it needs
    no z-buffer. A point that lands and wins no pixel lost each one it fell on to a nearer
    point."""
    points = _prepare_points(points)
    p = raster_params(camera, (scale,), near, points.device)
    qx, qy, _, valid = _normalized(points, p, *_size_divisors(p, points.device))
    return valid & _pixel_of(qx, qy, p.sizes[0])[2]


def keys_to_depth(keys: torch.Tensor) -> torch.Tensor:
    """View depth of the winning point per pixel (float32), +inf where empty."""
    bits = (keys >> 32).to(torch.int32)
    depth = bits.view(torch.float32).clone()
    depth[keys == EMPTY_KEY] = float("inf")
    return depth


def _gather_features_all(
    indices: Sequence[torch.Tensor], features: torch.Tensor, background: torch.Tensor | None
) -> list[torch.Tensor]:
    """:func:`gather_features` for several index images.

    Per image: one ``index_select`` of the winning rows, the background where a pixel is
    empty, and the mask channel, written into one (h, w, C+1) buffer. The work follows the
    pixels, not the cloud (a lookup table of all N points cost 6x more per scale on the CPU)."""
    n, c = features.shape
    if background is None:
        background = features.new_zeros(c)
    background = background.to(features.dtype).reshape(1, c)
    out = []
    for index in indices:
        h, w = index.shape
        flat = index.reshape(-1).to(device=features.device, dtype=torch.int64)
        if bool((flat >= n).any()):
            raise IndexError(f"gather_features: point index {int(flat.max())} out of range for {n} points")
        hit = (flat >= 0).unsqueeze(1)
        if n:
            picked = torch.where(hit, features.index_select(0, flat.clamp(min=0)), background)
        else:
            picked = background.expand(flat.shape[0], c)
        pixels = torch.cat([picked, hit.to(features.dtype)], dim=1).view(h, w, c + 1).permute(2, 0, 1)
        channels_last = not torch.is_grad_enabled() and pixels.device.type == "cpu"
        out.append(pixels if channels_last else pixels.contiguous())
    return out


def gather_features(
    index: torch.Tensor, features: torch.Tensor, background: torch.Tensor | None = None
) -> torch.Tensor:
    """(C+1, h, w): features of the winning points (background where empty) and a 0/1 mask
    channel. Differentiable w.r.t. ``features`` and ``background``. Reference twin of
    ``kernels.CudaRasterizer.gather_features`` (and the reverse); index values below 0 are
    empty, values >= N raise here (the kernel counts them as empty).

    Without autograd on the CPU the result keeps the gathered buffer's channels-last
    strides (what the CPU refiner wants); otherwise it is contiguous."""
    return _gather_features_all([index], features, background)[0]


def _gather_all(
    indices: Sequence[torch.Tensor], features: torch.Tensor, background: torch.Tensor | None, backend: str
) -> list[torch.Tensor]:
    from . import _backend

    if backend not in ("auto", "torch", "cuda"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'cuda', got {backend!r}")
    if backend != "torch" and features.is_cuda:
        op = _backend.cuda_rasterizer()
        if op is not None:
            return [op.gather_features(index, features, background) for index in indices]
        if backend == "cuda":
            why = _backend.why_unavailable()
            raise RuntimeError(f"backend='cuda' requested but the CUDA kernel is unavailable: {why}")
    elif backend == "cuda":
        raise ValueError(f"backend='cuda' needs features on a CUDA device, got features on {features.device}")
    return _gather_features_all(indices, features, background)


def gather(
    index: torch.Tensor, features: torch.Tensor, background: torch.Tensor | None = None, backend: str = "auto"
) -> torch.Tensor:
    """:func:`gather_features` on a backend: the CUDA kernel for CUDA features when it
    loads ('auto' or 'cuda'; its backward is a scatter-add), else the torch reference."""
    return _gather_all([index], features, background, backend)[0]


def rasterize_descriptors(
    points: torch.Tensor,
    camera: Camera,
    scales: Sequence[float],
    near: float,
    descriptor_fn: Callable[[torch.Tensor], torch.Tensor],
    background: torch.Tensor | None = None,
    backend: str = "auto",
) -> list[torch.Tensor]:
    """Per scale a ``(C+1, h_s, w_s)`` image: the descriptors of the winning points
    (background where empty), then a 0/1 mask. Descriptors are computed
    (``descriptor_fn(rows) -> (M, C)`` for a LongTensor of point indices) only for the
    points that win at least one pixel: rendering cost does not grow with hidden or
    off-screen points. Differentiable w.r.t. the descriptors (and ``background``)."""
    indices = rasterize(points, camera, scales, near, backend)
    flat = torch.cat([i.reshape(-1) for i in indices])
    used = torch.unique(flat[flat >= 0])
    desc = descriptor_fn(used)
    # Point index -> row of ``desc``; -1 (empty) reads the extra last slot, which stays -1.
    n = points.shape[0]
    remap = torch.full((n + 1,), -1, dtype=torch.long, device=used.device)
    remap[used] = torch.arange(used.shape[0], device=used.device)
    return _gather_all([remap[index] for index in indices], desc, background, backend)


def rasterize_features(
    points: torch.Tensor,
    features: torch.Tensor,
    camera: Camera,
    scales: Sequence[float] = DEFAULT_SCALES,
    background: torch.Tensor | None = None,
    near: float = 1e-3,
    backend: str = "auto",
) -> list[torch.Tensor]:
    """Per scale a ``(C+1, h_s, w_s)`` image: winning point features, then a 0/1 mask
    (:func:`rasterize_descriptors` with the rows of an (N, C) feature table)."""
    if features.ndim != 2 or features.shape[0] != points.shape[0]:
        raise ValueError(
            f"features must be (N, C) with N={points.shape[0]} matching points, got {tuple(features.shape)}"
        )
    if background is not None and background.numel() != features.shape[1]:
        raise ValueError(f"background must have C={features.shape[1]} values, got {background.numel()}")
    return rasterize_descriptors(points, camera, scales, near, lambda rows: features[rows.to(features.device)],
                                 background, backend)
