"""Point clouds like real acquisition, simulated from rendered views (numpy only, no bpy).

Inputs are :class:`ViewMaps`: per view an sRGB image, the exact z-depth of the first
surface hit at every pixel centre (0 where the ray leaves the scene, e.g. sky), a per-pixel
"specular" flag, the OpenCV intrinsics (pixel centres at integers) and the camera-to-world
matrix with OpenCV axes (x right, y down, z forward). LiDAR instead takes a ray-casting
function. Every simulator is seeded by the ``numpy.random.Generator`` it is given and
returns a :class:`SimPoints` (float32 points, sRGB colours in [0, 1], and diagnostics).

Specifications (what the tests measure):

- ``mvs`` (dense multi-view stereo): each pixel of each view is kept with probability
  ``clip((g - grad_lo) / (grad_hi - grad_lo), 0, 1)`` where ``g`` is the local luminance
  gradient magnitude, so density follows texture and uniform regions (g < grad_lo) are
  holes; specular pixels are kept with ``specular_keep`` times that probability; pixels
  deeper than ``max_depth`` (background) or without a hit (sky) are never kept. Depth
  noise: Gaussian, standard deviation ``depth_noise`` x depth, along the pixel's ray.
  Outliers: a fraction ``outlier_fraction`` of the points is moved along its ray by a
  factor drawn from 1 ± [0.05, 0.5] (false matches floating in front of / behind the
  surface). At most ``max_points`` points (uniform subsample).
- ``sfm`` (sparse structure from motion): Harris corners (local maxima over 5x5 above
  ``corner_rel`` x the view's strongest response) that at least ``min_track`` views
  see (depth-consistent reprojection), depth noise ``depth_noise`` x depth, merged on a
  voxel grid of ``merge`` x the median depth; the strongest ``count`` are kept, ``count``
  drawn from ``count_range`` (default 5k-50k) when not given (fewer when the views have
  fewer corners: 256x256 renders of a plain room give 1-3k, outdoor scenes 3-6k).
- ``lidar``: rings of rays from each sensor position at the elevation angles
  ``np.linspace(*elevation_deg, rings)``, one ray every ``azimuth_step_deg``; range noise
  Gaussian ``range_noise`` (a distance); returns beyond ``max_range`` and a random
  ``dropout`` fraction are lost; colour from the first view that sees the point
  (depth-consistent), points no view sees are dropped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

LUMA = np.array([0.2126, 0.7152, 0.0722])


@dataclass
class ViewMaps:
    rgb: np.ndarray  # (H, W, 3) sRGB in [0, 1]
    depth: np.ndarray  # (H, W) z-depth, 0 where nothing was hit
    K: np.ndarray  # (3, 3) OpenCV, pixel centres at integers
    c2w: np.ndarray  # (4, 4) OpenCV camera axes
    specular: np.ndarray | None = None  # (H, W) bool

    @property
    def shape(self) -> tuple[int, int]:
        return self.depth.shape


@dataclass
class SimPoints:
    points: np.ndarray  # (N, 3) float32
    colors: np.ndarray  # (N, 3) float32 sRGB
    info: dict = field(default_factory=dict)


def opengl_to_opencv(c2w: np.ndarray) -> np.ndarray:
    """Camera-to-world with OpenGL camera axes -> OpenCV camera axes."""
    return np.asarray(c2w, np.float64) @ np.diag([1.0, -1.0, -1.0, 1.0])


def pixel_rays(K: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) camera-space ray directions with z = 1 through every pixel centre."""
    h, w = shape
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    return np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1)


def unproject(view: ViewMaps, rows: np.ndarray, cols: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """World points at pixels (rows, cols) and z-depths ``depth`` of ``view``."""
    x = (cols - view.K[0, 2]) / view.K[0, 0] * depth
    y = (rows - view.K[1, 2]) / view.K[1, 1] * depth
    cam = np.stack([x, y, depth], -1)
    return cam @ view.c2w[:3, :3].T + view.c2w[:3, 3]


def project(view: ViewMaps, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(u, v) pixel coordinates (N, 2) and z-depth (N,) of world points in ``view``."""
    R, t = view.c2w[:3, :3], view.c2w[:3, 3]
    cam = (points - t) @ R
    z = cam[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        u = view.K[0, 0] * cam[:, 0] / z + view.K[0, 2]
        v = view.K[1, 1] * cam[:, 1] / z + view.K[1, 2]
    return np.stack([u, v], 1), z


def luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., :3] @ LUMA


def gradient_magnitude(rgb: np.ndarray) -> np.ndarray:
    """Luminance gradient magnitude (central differences, per pixel, edge-replicated)."""
    y = np.pad(luminance(rgb), 1, mode="edge")
    gx = 0.5 * (y[1:-1, 2:] - y[1:-1, :-2])
    gy = 0.5 * (y[2:, 1:-1] - y[:-2, 1:-1])
    return np.hypot(gx, gy)


def _box(a: np.ndarray, r: int) -> np.ndarray:
    """Mean over a (2r+1)^2 window, edge-replicated."""
    p = np.pad(a, r, mode="edge")
    c = np.cumsum(np.cumsum(p, 0), 1)
    c = np.pad(c, ((1, 0), (1, 0)))
    k = 2 * r + 1
    return (c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]) / (k * k)


def harris(rgb: np.ndarray, k: float = 0.05, window: int = 1) -> np.ndarray:
    """Harris corner response of the luminance (structure tensor over a 3x3 window)."""
    y = np.pad(luminance(rgb), 1, mode="edge")
    gx = 0.5 * (y[1:-1, 2:] - y[1:-1, :-2])
    gy = 0.5 * (y[2:, 1:-1] - y[:-2, 1:-1])
    a, b, c = _box(gx * gx, window), _box(gx * gy, window), _box(gy * gy, window)
    return a * c - b * b - k * (a + c) ** 2


def _local_max(r: np.ndarray, radius: int = 2) -> np.ndarray:
    p = np.pad(r, radius, mode="constant", constant_values=-np.inf)
    h, w = r.shape
    m = np.full(r.shape, -np.inf)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            m = np.maximum(m, p[dy:dy + h, dx:dx + w])
    return r >= m


def visible_in(view: ViewMaps, points: np.ndarray, tol: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """Whether each point is seen by ``view`` (inside the image, depth within ``tol`` x
    depth of the view's depth map) and its nearest pixel (rows, cols)."""
    uv, z = project(view, points)
    h, w = view.shape
    col = np.round(uv[:, 0]).astype(np.int64, copy=False) if len(uv) else np.zeros(0, np.int64)
    row = np.round(uv[:, 1]).astype(np.int64, copy=False) if len(uv) else np.zeros(0, np.int64)
    inside = (z > 0) & (col >= 0) & (col < w) & (row >= 0) & (row < h)
    ok = np.zeros(len(points), bool)
    d = view.depth[row[inside], col[inside]]
    ok[inside] = (d > 0) & (np.abs(d - z[inside]) <= tol * np.maximum(d, 1e-9))
    return ok, np.stack([np.clip(row, 0, h - 1), np.clip(col, 0, w - 1)], 1)


def simulate_mvs(views: Sequence[ViewMaps], rng: np.random.Generator, *, grad_lo: float = 0.01,
                 grad_hi: float = 0.06, specular_keep: float = 0.1, depth_noise: float = 0.003,
                 outlier_fraction: float = 0.02, max_depth: float | None = None,
                 max_points: int = 300_000) -> SimPoints:
    """Dense MVS-like points from ``views`` (see the module docstring)."""
    pts, cols, src_view, src_pix, rel_err = [], [], [], [], []
    for k, v in enumerate(views):
        g = gradient_magnitude(v.rgb)
        p = np.clip((g - grad_lo) / (grad_hi - grad_lo), 0.0, 1.0)
        if v.specular is not None:
            p = np.where(v.specular, p * specular_keep, p)
        valid = v.depth > 0
        if max_depth is not None:
            valid &= v.depth <= max_depth
        keep = valid & (rng.random(v.depth.shape) < p)
        r, c = np.nonzero(keep)
        noise = rng.normal(0.0, depth_noise, len(r))
        d = v.depth[r, c] * (1.0 + noise)
        pts.append(unproject(v, r, c, d))
        cols.append(v.rgb[r, c, :3])
        src_view.append(np.full(len(r), k))
        src_pix.append(np.stack([r, c], 1))
        rel_err.append(noise)
    P, C = np.concatenate(pts), np.concatenate(cols)
    sv, sp, err = np.concatenate(src_view), np.concatenate(src_pix), np.concatenate(rel_err)
    if len(P) > max_points:
        sel = np.sort(rng.choice(len(P), max_points, replace=False))
        P, C, sv, sp, err = P[sel], C[sel], sv[sel], sp[sel], err[sel]
    n_out = int(round(outlier_fraction * len(P)))
    out_idx = rng.choice(len(P), n_out, replace=False) if n_out else np.zeros(0, np.int64)
    if n_out:
        factor = rng.uniform(0.05, 0.5, n_out) * rng.choice([-1.0, 1.0], n_out)
        for k in np.unique(sv[out_idx]):
            sel = out_idx[sv[out_idx] == k]
            v = views[k]
            r, c = sp[sel, 0], sp[sel, 1]
            d = v.depth[r, c] * (1.0 + err[sel] + factor[sv[out_idx] == k])
            P[sel] = unproject(v, r, c, d)
        err[out_idx] = err[out_idx] + factor
    outlier = np.zeros(len(P), bool)
    outlier[out_idx] = True
    return SimPoints(P.astype(np.float32), np.clip(C, 0, 1).astype(np.float32),
                     dict(kind="mvs", source_view=sv, source_pixel=sp, relative_depth_error=err, outlier=outlier,
                          depth_noise=depth_noise, outlier_fraction=outlier_fraction))


def simulate_sfm(views: Sequence[ViewMaps], rng: np.random.Generator, *, count: int | None = None,
                 count_range: tuple[int, int] = (5_000, 50_000), corner_rel: float = 0.001,
                 min_track: int = 2, depth_noise: float = 0.001, merge: float = 0.002,
                 max_depth: float | None = None) -> SimPoints:
    """Sparse SfM-like points on textured corners (see the module docstring)."""
    if count is None:
        count = int(rng.integers(count_range[0], count_range[1] + 1))
    cand, ccol, score, sv, sp = [], [], [], [], []
    depths = []
    for k, v in enumerate(views):
        R = harris(v.rgb)
        valid = v.depth > 0
        if max_depth is not None:
            valid &= v.depth <= max_depth
        peak = R.max() if R.size else 0.0
        if not peak > 0:
            continue
        m = _local_max(R) & (R > corner_rel * peak) & valid
        r, c = np.nonzero(m)
        d = v.depth[r, c] * (1.0 + rng.normal(0.0, depth_noise, len(r)))
        cand.append(unproject(v, r, c, d))
        ccol.append(v.rgb[r, c, :3])
        score.append(R[r, c] / peak)
        sv.append(np.full(len(r), k))
        sp.append(np.stack([r, c], 1))
        depths.append(v.depth[valid])
    if not cand:
        return SimPoints(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.float32),
                         dict(kind="sfm", requested=count, available=0))
    P, C, S = np.concatenate(cand), np.concatenate(ccol), np.concatenate(score)
    SV, SP = np.concatenate(sv), np.concatenate(sp)
    track = np.zeros(len(P), np.int64)
    for v in views:
        track += visible_in(v, P, tol=max(0.01, 5 * depth_noise))[0]
    keep = track >= min_track
    P, C, S, SV, SP, track = P[keep], C[keep], S[keep], SV[keep], SP[keep], track[keep]
    # Detections of one corner in several views become one point (the strongest).
    voxel = merge * float(np.median(np.concatenate(depths))) if depths else 1.0
    order = np.argsort(-S)
    keys = np.floor(P[order] / voxel).astype(np.int64)
    _, first = np.unique(keys, axis=0, return_index=True)
    sel = order[np.sort(first)]
    sel = sel[np.argsort(-S[sel])][:count]
    return SimPoints(P[sel].astype(np.float32), np.clip(C[sel], 0, 1).astype(np.float32),
                     dict(kind="sfm", requested=count, available=int(len(first)), source_view=SV[sel],
                          source_pixel=SP[sel], track=track[sel], depth_noise=depth_noise))


def lidar_rays(sensor: Sequence[float], rings: int, elevation_deg: tuple[float, float],
               azimuth_step_deg: float, yaw0: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Unit ray directions (N, 3) of one 360-degree sweep and each ray's ring index."""
    el = np.radians(np.linspace(elevation_deg[0], elevation_deg[1], rings))
    az = yaw0 + np.radians(np.arange(0.0, 360.0, azimuth_step_deg))
    E, A = np.meshgrid(el, az, indexing="ij")
    d = np.stack([np.cos(E) * np.cos(A), np.cos(E) * np.sin(A), np.sin(E)], -1).reshape(-1, 3)
    ring = np.repeat(np.arange(rings), len(az))
    return d, ring


RayCaster = Callable[[np.ndarray, np.ndarray], np.ndarray]


def simulate_lidar(raycast: RayCaster, sensors: Sequence[Sequence[float]], views: Sequence[ViewMaps],
                   rng: np.random.Generator, *, rings: int = 32, elevation_deg: tuple[float, float] = (-25.0, 15.0),
                   azimuth_step_deg: float = 0.4, range_noise: float = 0.01, max_range: float = 30.0,
                   dropout: float = 0.02, require_seen: bool = True) -> SimPoints:
    """LiDAR-like scans from each position in ``sensors`` (see the module docstring).
    ``raycast(origins, dirs)`` returns the distance to the first hit (inf for none).
    ``require_seen=False`` keeps points no view sees, in mid grey."""
    pts, ring_of, sensor_of, ranges, true_ranges = [], [], [], [], []
    for s, pos in enumerate(sensors):
        d, ring = lidar_rays(pos, rings, elevation_deg, azimuth_step_deg, rng.uniform(0, 2 * math.pi))
        o = np.repeat(np.asarray(pos, np.float64)[None], len(d), 0)
        dist = np.asarray(raycast(o, d), np.float64)
        ok = np.isfinite(dist) & (dist <= max_range) & (rng.random(len(d)) >= dropout)
        r = dist[ok] + rng.normal(0.0, range_noise, ok.sum())
        pts.append(o[ok] + d[ok] * r[:, None])
        ring_of.append(ring[ok])
        sensor_of.append(np.full(ok.sum(), s))
        ranges.append(r)
        true_ranges.append(dist[ok])
    P = np.concatenate(pts)
    ring_a, sens_a = np.concatenate(ring_of), np.concatenate(sensor_of)
    rng_a, true_a = np.concatenate(ranges), np.concatenate(true_ranges)
    C = np.full((len(P), 3), -1.0)
    seen = np.zeros(len(P), bool)
    for v in views:
        # Sensor noise moves points off the surface: accept a few noise widths.
        tol = 0.01 + 4 * range_noise / max(float(np.median(v.depth[v.depth > 0])) if (v.depth > 0).any() else 1.0,
                                             1e-6)
        ok, pix = visible_in(v, P, tol=tol)
        new = ok & ~seen
        C[new] = v.rgb[pix[new, 0], pix[new, 1], :3]
        seen |= ok
    if not require_seen:
        C[~seen] = 0.5
        seen[:] = True
    return SimPoints(P[seen].astype(np.float32), np.clip(C[seen], 0, 1).astype(np.float32),
                     dict(kind="lidar", ring=ring_a[seen], sensor=sens_a[seen], range=rng_a[seen],
                          true_range=true_a[seen], sensors=np.asarray(sensors, np.float64),
                          ring_elevations_deg=np.linspace(elevation_deg[0], elevation_deg[1], rings),
                          range_noise=range_noise, unseen_dropped=int((~seen).sum())))
