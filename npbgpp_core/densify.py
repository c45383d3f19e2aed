"""Dense coloured point clouds from calibrated photos (multi-view stereo, torch only).

``python -m npbgpp_core.densify SCENE --out dense.ply`` or, as a function,
``densify_scene(load_scene(SCENE)) -> PointCloud``. Runs on CPU, CUDA and MPS.

Method, per reference view:

1. Neighbours: the views scored highest by overlap (the share of the reference frustum,
   sampled inside the depth range, that lands inside the other image) times a Gaussian
   of the triangulation angle at the reference view's scene points (best near 15 degrees)
   times a Gaussian of the log of how much larger or smaller the other view sees them
   (distance and focal length).
2. Depth range: the 2nd-98th percentile of the scene's sparse points seen by the view,
   widened; without points (instant-ngp's transforms.json has none), the view's distance
   to the point the cameras' optical axes meet (their mean centre for parallel axes).
3. Plane sweep in inverse depth at half size: every neighbour's grey image is warped onto
   each fronto-parallel plane of the reference and compared by ZNCC over a small window;
   per plane the mean of the best ``top_k`` neighbours counts (robust to occlusion in one
   of them). With ``plane_tilts`` planes tilted about the camera's x and y axes are swept
   too (ground and walls seen at a grazing angle). Winner takes all, a parabola through
   the scores around the winner, then local sweeps at full size around the upsampled
   estimate give sub-plane depth. Pixels whose window finds too little texture keep a
   coarser level's depth (a separate quarter-size sweep sees wider), marked weak: fusion
   asks more views to agree on them.
4. Geometric consistency: a reference pixel's 3D point is projected into the other
   views' depth maps, their depth at that pixel projected back; it is consistent with a
   view when it comes back within ``pixel_tolerance`` pixels and ``depth_tolerance``
   relative depth. Points consistent with fewer than ``min_consistent`` views (plus
   ``weak_extra_views`` for weak depths) are dropped.
5. Fusion: a kept point is the mean of its own and its consistent matches' 3D points and
   colours; matched pixels of later views are not used again (no duplicate points).
   Normals (optional) come from the depth map's gradient. Over ``max_points``, a voxel
   grid keeps one point per cell.

6. Fill (``fill=True``, :func:`fill_points`): texture-poor pixels (tables, walls, paper)
   where stereo found no consistent depth take the depth of a plane fitted robustly to
   the consistent depths around them. Every ``fill_stride``-th such pixel becomes a point
   when neighbouring views' completed depth maps agree with it and they see the same
   colour there. In a texture-poor region approximate geometry still gives nearly the
   right colour from nearby viewpoints, which is what a neural point renderer needs.

Masks (mask files or alpha) restrict reference pixels; distorted COLMAP cameras are
undistorted by the dataset loader (``undistort=True``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .camera import Camera
from .ply import PointCloud

ProgressFn = Callable[[str, int, int], None]
Step = tuple[str, int, int]  # (stage, views done in it, views in it)


# Score given to depths kept from a coarser level (see coarse_fill).
WEAK_SCORE = -3.0


class DensifyError(ValueError):
    """Input that dense reconstruction cannot work with (named in the message)."""


class DensifyCancelled(RuntimeError):
    """Raised when ``should_stop`` returned True."""


@dataclass
class DensifyOptions:
    """Settings of :func:`densify_views` / :func:`densify_scene` (defaults suit 48-100
    views of an object or a room at up to 1280 pixels)."""

    max_points: int = 2_000_000
    image_scale: float = 1.0
    max_image_size: int = 1280
    neighbors: int = 4
    top_k: int = 2
    depth_planes: int = 48
    refine_steps: int = 8
    coarse_levels: int = 1
    coarse_fill: bool = True
    fill_levels: int = 1
    weak_extra_views: int = 2
    window: int = 5
    min_score: float = 0.5
    min_texture: float = 0.01
    min_consistent: int = 2
    consistency_views: int = 8
    pixel_tolerance: float = 1.0
    depth_tolerance: float = 0.01
    normals: bool = False
    depth_range: tuple[float, float] | None = None
    # Degrees; per tilt four more plane families in the sweep, tilted about the camera's
    # x and y axes: slanted ground and walls (a walk forward) match (see _slanted_sweep).
    # Off by default: about 2.3x the time, 8-15% fewer points on the Blender scenes and
    # textured_monkey under its 1% accuracy target (BENCHMARKS.md, "Forward walks").
    plane_tilts: tuple[float, ...] = ()
    seed: int = 0
    # Texture-poor fill (off: measured +0.18 dB fitted on four captures, but fill points
    # on curved surfaces miss the 1% accuracy target; see fill_points and BENCHMARKS.md).
    fill: bool = False
    fill_stride: int = 4
    fill_texture: float = 0.1
    fill_max_window: float = 0.5
    fill_fit_tolerance: float = 0.01
    fill_depth_tolerance: float = 0.02
    fill_pixel_tolerance: float = 2.0
    fill_color_tolerance: float = 0.06
    fill_min_views: int = 2

    def check(self, names: Mapping[str, str] | None = None) -> None:
        """Raise :class:`DensifyError` naming the first setting that can never work.

        ``names`` maps fields to the options a caller's user types (the command line passes
        its flags, ``{"max_points": "--max-points"}``) so that messages name those; fields
        it leaves out are fixed for that user and only their values are quoted. Without
        ``names`` messages name the fields (``max_points=0``)."""

        def shown(field: str) -> str:
            value = getattr(self, field)
            if names is None or field not in names:
                return f"{field}={value!r}"
            if isinstance(value, tuple):  # as typed: --depth-range 5 1
                typed = (f"{v:g}" if isinstance(v, float) else repr(v) for v in value)
                return f"{names[field]} {' '.join(typed)}"
            return f"{names[field]} {value:g}" if isinstance(value, float) else f"{names[field]} {value}"

        def other(field: str) -> str:
            return shown(field) if names is None or field in names else str(getattr(self, field))

        def positive(value: object) -> bool:
            return isinstance(value, (int, float)) and math.isfinite(value) and value > 0

        rules = [
            ("max_points", self.max_points >= 1, "must be at least 1"),
            ("image_scale", 0.0 < self.image_scale <= 4.0, "must lie in (0, 4]"),
            ("max_image_size", self.max_image_size >= 0, "must be at least 0 (0: no limit)"),
            ("neighbors", self.neighbors >= 1, "must be at least 1"),
            ("top_k", 1 <= self.top_k <= self.neighbors,
             f"must lie in 1..{self.neighbors} (no more than {other('neighbors')})"),
            ("depth_planes", self.depth_planes >= 3, "must be at least 3"),
            ("window", self.window >= 3 and self.window % 2 == 1, "must be odd and at least 3"),
            ("consistency_views", self.consistency_views >= 1, "must be at least 1"),
            ("min_consistent", 1 <= self.min_consistent <= self.consistency_views,
             f"must lie in 1..{self.consistency_views} (each point is checked against at most "
             f"{other('consistency_views')} other views)"),
            ("depth_range", self.depth_range is None
             or (0 < self.depth_range[0] < self.depth_range[1] and math.isfinite(self.depth_range[1])),
             "needs 0 < near < far, both finite"),
            ("plane_tilts", isinstance(self.plane_tilts, tuple)
             and all(isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t <= 90 for t in self.plane_tilts)
             and len(set(self.plane_tilts)) == len(self.plane_tilts),
             "must be a tuple of different angles in degrees, each in (0, 90] (none: fronto-parallel planes only)"),
            ("fill_stride", self.fill_stride >= 1, "must be at least 1"),
            ("fill_min_views", self.fill_min_views >= 1, "must be at least 1"),
            ("fill_max_window", 0.0 < self.fill_max_window <= 1.0, "must lie in (0, 1]"),
            *((name, positive(getattr(self, name)), "must be a number > 0")
              for name in ("fill_texture", "fill_fit_tolerance", "fill_depth_tolerance", "fill_pixel_tolerance",
                           "fill_color_tolerance")),
        ]
        for field, ok, rule in rules:
            if not ok:
                raise DensifyError(f"{shown(field)}: {rule}")


def pick_device(device: str = "auto") -> torch.device:
    """``auto``: CUDA, else MPS, else CPU; or the named device (an error if missing)."""
    device = device.lower()
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise DensifyError(f"device must be auto, cpu, cuda or mps, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DensifyError("device 'cuda' requested but torch sees no CUDA device")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DensifyError("device 'mps' requested but MPS is not available")
    return torch.device(device)


# --------------------------------------------------------------------------- geometry
@dataclass
class _Cam:
    K: torch.Tensor  # (3, 3)
    Kinv: torch.Tensor
    R: torch.Tensor  # world -> camera (OpenCV)
    t: torch.Tensor
    h: int
    w: int

    @property
    def center(self) -> torch.Tensor:
        return -self.R.T @ self.t


def _cam(camera: Camera, device: torch.device) -> _Cam:
    K, R, t = camera.to_opencv()
    K64 = torch.as_tensor(K)
    return _Cam(
        K64.float().to(device), torch.linalg.inv(K64).float().to(device),
        torch.as_tensor(R).float().to(device), torch.as_tensor(t).float().to(device), *camera.image_size,
    )


def _rays(c: _Cam) -> torch.Tensor:
    """(3, H*W) camera-space rays with z = 1 through every pixel centre."""
    dev = c.K.device
    v, u = torch.meshgrid(torch.arange(c.h, device=dev, dtype=torch.float32),
                          torch.arange(c.w, device=dev, dtype=torch.float32), indexing="ij")
    pix = torch.stack([u.reshape(-1), v.reshape(-1), torch.ones(c.h * c.w, device=dev)])
    return c.Kinv @ pix


def _project(c: _Cam, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """World points (3, N) -> u, v, depth in camera ``c``."""
    x = c.K @ (c.R @ X + c.t[:, None])
    z = x[2]
    zs = torch.where(z.abs() > 1e-9, z, torch.full_like(z, 1e-9))
    return x[0] / zs, x[1] / zs, z


def _in_view(c: _Cam, X: torch.Tensor) -> torch.Tensor:
    """Which world points (3, N) lie in front of camera ``c`` and project inside its image."""
    u, v, z = _project(c, X)
    return (z > 0) & (u >= 0) & (u <= c.w - 1) & (v >= 0) & (v <= c.h - 1)


def _unproject(c: _Cam, rays: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
    """Rays (3, N) at camera depth (N,) -> world points (3, N)."""
    return c.R.T @ (rays * depth[None] - c.t[:, None])


def _box(x: torch.Tensor, k: int) -> torch.Tensor:
    """Mean over a k x k window, same size; x is (..., H, W). The k//2-pixel border is
    zero (callers never use it)."""
    r = k // 2
    return F.pad(_box_inner(x, k), (r, r, r, r))


def _box_inner(x: torch.Tensor, k: int) -> torch.Tensor:
    """Mean over every k x k window lying inside x: (..., H-k+1, W-k+1). Shifted slice
    sums: several times faster than avg_pool2d on CPU, and exact."""
    r = k // 2
    h, w = x.shape[-2:]
    rows = x[..., :, 0 : w - 2 * r] + x[..., :, 1 : w - 2 * r + 1]
    for d in range(2, k):
        rows += x[..., :, d : d + w - 2 * r]
    inner = rows[..., 0 : h - 2 * r, :] + rows[..., 1 : h - 2 * r + 1, :]
    for d in range(2, k):
        inner += rows[..., d : d + h - 2 * r, :]
    return inner.mul_(1.0 / (k * k))


def _gray(img: torch.Tensor) -> torch.Tensor:
    return (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2]).contiguous()


# --------------------------------------------------------------------------- view choice
def cameras_center(cameras: Sequence[Camera]) -> np.ndarray:
    """Where a capture without sparse points is looked at: the point nearest (least squares)
    to every camera's optical axis when that point lies in front of the cameras and the axes
    are not near parallel (an object-centred capture), else the mean camera centre."""
    centers = np.stack([c.center().double().numpy() for c in cameras])
    axes = np.stack([c.to_opencv()[1][2] for c in cameras]).astype(np.float64)  # OpenCV +z in world
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    proj = np.eye(3)[None] - axes[:, :, None] * axes[:, None, :]  # onto each axis' normal plane
    A, b = proj.sum(0), np.einsum("nij,nj->i", proj, centers)
    if np.linalg.eigvalsh(A)[0] > 0.05 * len(cameras):  # axes spread by more than about 13 degrees
        point = np.linalg.solve(A, b)
        if np.median(((point - centers) * axes).sum(1)) > 0:
            return point
    return centers.mean(0)


def depth_range_of(camera: Camera, points: np.ndarray | None, fallback_center: np.ndarray) -> tuple[float, float]:
    """Depth range of a view from the sparse points it sees (2nd-98th percentile, widened
    by 25%); from the scene centre's distance when fewer than 20 points are seen."""
    if points is not None and len(points) > 0:
        uv, z = camera.project(torch.as_tensor(points, dtype=torch.float64))
        h, w = camera.image_size
        ok = (z > 0) & (uv[:, 0] >= -0.5) & (uv[:, 0] <= w - 0.5) & (uv[:, 1] >= -0.5) & (uv[:, 1] <= h - 0.5)
        zs = z[ok].double().numpy()
        if len(zs) >= 20:
            near, far = np.percentile(zs, [2.0, 98.0])
            return float(max(near * 0.75, 1e-4)), float(far * 1.25)
    dist = float(np.linalg.norm(camera.center().double().numpy() - fallback_center))
    if dist <= 1e-9:
        raise DensifyError("cannot guess a depth range (no sparse points and the camera sits at the scene centre); "
                           "pass depth_range=(near, far) (the command's --depth-range NEAR FAR)")
    return dist * 0.3, dist * 1.7


def choose_neighbors(
    cams: Sequence[_Cam], ranges: Sequence[tuple[float, float]], count: int, best_angle_deg: float = 15.0,
    scale_sigma: float = 0.2,
) -> list[list[tuple[int, float]]]:
    """Per view, up to ``count`` ``(index, score)`` pairs, best first, score > 0 only.

    Score = overlap x (exp(-((angle - best) / 10)^2 / 2) + 0.001) x exp(-(ln(scale) /
    scale_sigma)^2 / 2). Overlap is the share of the reference's scene points (its 8 x 8
    pixel grid at 6 depths of its range, equal steps in 1 / depth) inside the other image.
    The angle is the median (the lower middle value for an even count) triangulation angle
    at the grid's points at depth sqrt(near * far) that the other view sees (at its 6-depth
    points it sees when it sees none of those). The angle at the image centre alone, the
    rule before, is 0 for a view straight ahead or behind (a walk or drive forward), though
    off-centre pixels of such a pair triangulate well. The scale is the median, over the
    same points, of their distance to the other camera over their distance to the
    reference's, divided by the ratio of the two focal lengths in pixels (``sqrt(fx*fy)``):
    how much more of the scene one pixel of the other view covers there. On a walk the views
    several steps behind see the reference's points from twice as far, at the best angle but
    half the size, and matched that way the depth maps of the lund capture were off by a
    median 17-40% (BENCHMARKS.md); a view as far away with twice the focal length (a zoomed
    or larger photo) sees them at the same size. Views with no overlap or under 1 degree (no
    baseline) are left out."""
    n = len(cams)
    out: list[list[tuple[int, float]]] = []
    if n == 0:
        return out
    # Pixels per unit of scene at unit distance (one host copy for all views).
    focal = torch.stack([c.K.diagonal()[:2] for c in cams]).cpu().double().prod(dim=1).sqrt().tolist()
    for r in range(n):
        c = cams[r]
        near, far = ranges[r]
        gv, gu = torch.meshgrid(torch.linspace(0, c.h - 1, 8, device=c.K.device),
                                torch.linspace(0, c.w - 1, 8, device=c.K.device), indexing="ij")
        rays = c.Kinv @ torch.stack([gu.reshape(-1), gv.reshape(-1), torch.ones(64, device=c.K.device)])
        depths = 1.0 / torch.linspace(1.0 / near, 1.0 / far, 6, device=c.K.device)
        X = torch.cat([_unproject(c, rays, torch.full((64,), float(d), device=c.K.device)) for d in depths], dim=1)
        mid = _unproject(c, rays, torch.full((64,), math.sqrt(near * far), device=c.K.device))
        scored = []
        for s in range(n):
            if s == r:
                continue
            o = cams[s]
            inside = _in_view(o, X)
            overlap = float(inside.float().mean())
            if overlap <= 0.0:
                continue
            seen = mid[:, _in_view(o, mid)]
            if seen.shape[1] == 0:  # it sees only nearer or farther parts of the range
                seen = X[:, inside]
            a, b = c.center[:, None] - seen, o.center[:, None] - seen
            cosang = (a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0)).clamp_min(1e-12)
            angle = math.degrees(float(torch.acos(cosang.clamp(-1.0, 1.0)).median()))
            if angle < 1.0:
                continue
            # The floor keeps wide-baseline views usable when nothing better exists.
            score = overlap * (math.exp(-0.5 * ((angle - best_angle_deg) / 10.0) ** 2) + 1e-3)
            # A view much nearer or farther, or zoomed in or out, sees the reference's windows
            # scaled: 5 x 5 ZNCC fails. Equal focal lengths subtract exactly 0.
            log_scale = (float(torch.log(b.norm(dim=0) / a.norm(dim=0).clamp_min(1e-12)).median())
                         - math.log(focal[s] / focal[r]))
            scored.append((s, score * math.exp(-0.5 * (log_scale / scale_sigma) ** 2)))
        scored.sort(key=lambda p: -p[1])
        out.append(scored[:count])
    return out


# --------------------------------------------------------------------------- depth maps
class _Matcher:
    """ZNCC of a reference view against warped neighbours for given inverse depths."""

    def __init__(self, ref: _Cam, ref_gray: torch.Tensor, nbrs: list[tuple[_Cam, torch.Tensor]], opt: DensifyOptions):
        self.ref, self.k, self.top_k = ref, opt.window, min(opt.top_k, len(nbrs))
        I = ref_gray
        mu = _box(I, self.k)
        var = (_box(I * I, self.k) - mu * mu).clamp_min(0.0)
        self.I, self.mu, self.sigma = I, mu, var.sqrt()
        rays = _rays(ref)
        self.nbrs = []
        for cam, gray in nbrs:
            R_rel = cam.R @ ref.R.T
            t_rel = cam.t - R_rel @ ref.t
            # Pixel in the neighbour ~ a + rho * b for inverse depth rho; x, y pre-scaled to
            # grid_sample's [-1, 1] (align_corners=True: pixel centres 0 and w-1 at -1, 1).
            a = cam.K @ R_rel @ rays
            b = cam.K @ t_rel
            to_grid = torch.tensor([2.0 / (cam.w - 1), 2.0 / (cam.h - 1)], device=a.device)
            axy = (a[:2].T * to_grid - a[2:].T).reshape(ref.h, ref.w, 2)
            bxy = b[:2] * to_grid - b[2]
            az = a[2].reshape(ref.h, ref.w, 1)
            pair = torch.stack([gray, torch.ones_like(gray)])[None]
            self.nbrs.append((cam, pair, axy, az, bxy, b[2]))

    def score(self, inv_depth: torch.Tensor, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        """inv_depth (P, H, W) -> aggregated ZNCC (P, H, W), -1 where no view sees it.

        ``rows`` / ``cols``: inv_depth covers only that block of the image (a band of a
        slanted sweep); its k//2-pixel border is scored -1 like the image's."""
        P, H, W = inv_depth.shape
        rho = inv_depth[..., None]
        # Scores of the k//2-pixel border stay -1: windows there leave the image.
        per = torch.full((len(self.nbrs), P, H, W), -1.0, device=inv_depth.device)
        # The whole image is the block of all rows and columns (slices: views, no copies).
        block = (rows or slice(None), cols or slice(None))
        r = self.k // 2
        iy, ix = slice(r, H - r), slice(r, W - r)
        I, mu_in, sigma_in = self.I[block], self.mu[block][iy, ix], self.sigma[block][iy, ix]
        for n, (_c, pair, axy_full, az_full, bxy, bz) in enumerate(self.nbrs):
            axy, az = axy_full[block], az_full[block]
            z = az + rho * bz
            grid = (axy + rho * bxy).div_(z.clamp_min(1e-6))
            # Behind the camera: push off the image so the in-bounds channel reads 0.
            grid.masked_fill_(z <= 1e-6, 4.0)
            # One batch of P*H rows: grid_sample then reads the neighbour image once.
            sampled = F.grid_sample(pair, grid.reshape(1, P * H, W, 2), mode="bilinear", padding_mode="zeros",
                                    align_corners=True)[0].reshape(2, P, H, W)
            J, inside = sampled[0], sampled[1, :, iy, ix]
            muJ = _box_inner(J, self.k)
            varJ = _box_inner(J * J, self.k).sub_(muJ * muJ).clamp_min_(0.0)
            cov = _box_inner(J * I, self.k).sub_(muJ * mu_in)
            ncc = cov.div_(varJ.sqrt_().mul_(sigma_in).add_(1e-6)).clamp_(-1.0, 1.0)
            per[n, :, iy, ix] = ncc.masked_fill_(inside < 0.999, -1.0)
        n = len(self.nbrs)
        if self.top_k == n:
            return per.mean(dim=0)
        if self.top_k == n - 1:
            return (per.sum(dim=0) - per.min(dim=0).values) / self.top_k
        if n == 4 and self.top_k == 2:
            # The two best of four without a sort: max of the pair maxima, then the
            # larger of the smaller pair maximum and the larger pair minimum.
            hi1, lo1 = torch.maximum(per[0], per[1]), torch.minimum(per[0], per[1])
            hi2, lo2 = torch.maximum(per[2], per[3]), torch.minimum(per[2], per[3])
            second = torch.maximum(torch.minimum(hi1, hi2), torch.maximum(lo1, lo2))
            return (torch.maximum(hi1, hi2) + second) * 0.5
        acc = torch.zeros((P, H, W), device=inv_depth.device)
        for _ in range(self.top_k):
            best, idx = per.max(dim=0)
            acc += best
            per.scatter_(0, idx[None], -2.0)
        return acc / self.top_k


def _parabola(scores: torch.Tensor, best: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Sub-sample offset in [-0.5, 0.5] of the maximum of a parabola through the winner
    ``idx`` of ``scores`` (P, H, W) and its two neighbours."""
    lo = scores.gather(0, (idx - 1).clamp_min(0)[None])[0]
    hi = scores.gather(0, (idx + 1).clamp_max(scores.shape[0] - 1)[None])[0]
    denom = lo - 2 * best + hi
    return torch.where(denom < -1e-6, 0.5 * (lo - hi) / denom, torch.zeros_like(best)).clamp(-0.5, 0.5)


def _plane_sweep(
    m: _Matcher, depth_range: tuple[float, float], planes: int, tilts: Sequence[float] = ()
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Inverse depth (H, W) by winner-takes-all over ``planes`` fronto-parallel planes
    evenly spaced in inverse depth, with parabola refinement; also the score and the
    plane spacing. Pixels won by the first or last plane get score -1 (out of range).

    ``tilts`` (degrees): per tilt, four more plane families tilted by it about the
    camera's x and y axes (:func:`_slanted_sweep`); a pixel keeps the family whose
    winner scores best."""
    ref = m.ref
    dev = m.I.device
    near, far = depth_range
    inv = torch.linspace(1.0 / near, 1.0 / far, planes, device=dev)
    step = float(inv[0] - inv[1])
    scores = torch.empty((planes, ref.h, ref.w), device=dev)
    chunk = max(1, min(planes, (1 << 22) // max(1, ref.h * ref.w)))
    for s in range(0, planes, chunk):
        p = inv[s : s + chunk]
        scores[s : s + len(p)] = m.score(p[:, None, None].expand(-1, ref.h, ref.w))
    best, idx = scores.max(dim=0)
    rho = inv[idx] - _parabola(scores, best, idx) * step
    best = best.masked_fill((idx == 0) | (idx == planes - 1), -1.0)
    for tilt in tilts:
        t = math.radians(tilt)
        for axis, sign in ((0, 1.0), (0, -1.0), (1, 1.0), (1, -1.0)):
            normal = [0.0, 0.0, math.cos(t)]
            normal[1 - axis] = sign * math.sin(t)  # about the x axis (axis 0) the normal leans along y
            rho_t, best_t = _slanted_sweep(m, depth_range, step, normal, axis)
            better = best_t > best
            rho, best = torch.where(better, rho_t, rho), torch.where(better, best_t, best)
    return rho, best, step


# A slanted family skips pixels whose ray meets its planes at under about 6 degrees
# (n . ray below this, ray with z = 1): such a plane is seen edge-on.
_MIN_INCIDENCE = 0.1
# Largest ratio of n . ray within one band of a slanted sweep (but for bands of
# _BAND_MIN lines): its planes are spaced for the band's largest n . ray, so every pixel
# is sampled at the fronto-parallel spacing or finer, at most this many times finer
# (the planes a band sweeps beyond the need, i.e. its extra time).
_BAND_RATIO = 1.3
# Fewest rows (columns) per band: each band re-reads window-radius rows on both sides.
_BAND_MIN = 8


def _slanted_sweep(
    m: _Matcher, depth_range: tuple[float, float], step: float, normal: Sequence[float], axis: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse depth and score (H, W) over planes ``normal . X = c`` of the reference
    camera (OpenCV axes), tilted about its x (``axis`` 0) or y (1) axis. On such a plane
    inverse depth is ``(normal . ray) / c``: linear across the window, so ZNCC compares
    a slanted patch (a street's ground and walls, scaled by a step forward, do not match
    fronto-parallel windows). ``normal . ray`` varies along one image axis, so the image
    is cut into bands across it, each swept over the ``1 / c`` that put its pixels inside
    the depth range at about the fronto-parallel ``step``. Pixels no plane reaches,
    won at a band's first or last plane, or out of range score -1."""
    ref = m.ref
    dev = m.I.device
    near, far = depth_range
    g = (torch.tensor(normal, device=dev, dtype=torch.float32) @ _rays(ref)).reshape(ref.h, ref.w)
    rho = torch.zeros_like(g)
    best = torch.full_like(g, -1.0)
    r = m.k // 2
    along = g if axis == 0 else g.T  # lines (rows for a tilt about x) of the band direction
    # One host copy per family: the band cuts below are host-side decisions.
    lo_line, hi_line = torch.stack([along.min(dim=1).values, along.max(dim=1).values]).tolist()
    length = along.shape[0]
    start = r
    while start < length - r:
        end = start + 1
        g_lo, g_hi = lo_line[start], hi_line[start]
        while end < length - r:
            lo, hi = min(g_lo, lo_line[end]), max(g_hi, hi_line[end])
            if end - start >= _BAND_MIN and (lo <= 0 or hi / lo > _BAND_RATIO):
                break
            g_lo, g_hi, end = lo, hi, end + 1
        band, start = slice(start, end), end
        if g_hi < _MIN_INCIDENCE:
            continue
        g_lo = max(g_lo, _MIN_INCIDENCE)
        # Inverse depths s * g with s in [1 / (far g_hi), 1 / (near g_lo)] cover the range at every pixel.
        s_lo, s_hi = 1.0 / (far * g_hi), 1.0 / (near * g_lo)
        count = max(3, int(math.ceil((s_hi - s_lo) * g_hi / step)) + 1)
        inv = torch.linspace(s_hi, s_lo, count, device=dev)
        ds = (s_hi - s_lo) / (count - 1)  # linspace's spacing, without a device sync per band
        block = slice(band.start - r, band.stop + r)
        rows, cols = (block, None) if axis == 0 else (None, block)
        gb = g[block] if axis == 0 else g[:, block]
        scores = torch.empty((count, *gb.shape), device=dev)
        chunk = max(1, min(count, (1 << 22) // max(1, gb.numel())))
        for s in range(0, count, chunk):
            p = inv[s : s + chunk]
            scores[s : s + len(p)] = m.score(p[:, None, None] * gb, rows, cols)
        b, idx = scores.max(dim=0)
        rb = (inv[idx] - _parabola(scores, b, idx) * ds) * gb
        bad = (idx == 0) | (idx == count - 1) | (gb < _MIN_INCIDENCE) | (rb < 1.0 / far) | (rb > 1.0 / near)
        b = b.masked_fill(bad, -1.0)
        core = (slice(r, gb.shape[0] - r), slice(None)) if axis == 0 else (slice(None), slice(r, gb.shape[1] - r))
        target = (band, slice(None)) if axis == 0 else (slice(None), band)
        rho[target], best[target] = rb[core], b[core]
    return rho, best


def _local_sweep(m: _Matcher, rho: torch.Tensor, half_width: float, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Refine inverse depth per pixel over ``2*steps+1`` hypotheses in ``rho +- half_width``."""
    offs = torch.linspace(-half_width, half_width, 2 * steps + 1, device=rho.device)
    hyp = (rho[None] + offs[:, None, None]).clamp_min(1e-8)
    sc = m.score(hyp)
    best, idx = sc.max(dim=0)
    fine = float(offs[1] - offs[0])
    out = hyp.gather(0, idx[None])[0] - _parabola(sc, best, idx) * fine
    # Winners on the edge of the window sit on a slope: leave them to the score test.
    edge = (idx == 0) | (idx == 2 * steps)
    return out, best.masked_fill(edge, -1.0)


def _median3(x: torch.Tensor) -> torch.Tensor:
    """3x3 median (edges replicated): removes isolated wrong depths before refinement, so
    that a pixel's window sees a coherent surface."""
    p = F.pad(x[None, None], (1, 1, 1, 1), mode="replicate")
    return p.unfold(2, 3, 1).unfold(3, 3, 1).reshape(*x.shape, 9).median(dim=-1).values


def _half(c: Camera, gray: torch.Tensor) -> tuple[Camera, torch.Tensor]:
    """Camera and grey image at half resolution (2x2 means; an odd last row/column dropped)."""
    h, w = gray.shape
    h2, w2 = h // 2, w // 2
    cam = c.cropped(0, 0, 2 * h2, 2 * w2).scaled((h2, w2))
    return cam, F.avg_pool2d(gray[None, None, : 2 * h2, : 2 * w2], 2)[0, 0]


def depth_map(
    ref_cam: Camera, ref_image: torch.Tensor, nbr_cams: Sequence[Camera], nbr_images: Sequence[torch.Tensor],
    depth_range: tuple[float, float], options: DensifyOptions | None = None, mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depth map ``(H, W)`` of ``ref_image`` (3, H, W) by plane sweep against the neighbours
    (0 where unreliable) and its ZNCC score ``(H, W)``. Each camera matches its image's size."""
    return _depth_from_gray(ref_cam, _gray(ref_image), list(nbr_cams), [_gray(i) for i in nbr_images],
                            depth_range, options or DensifyOptions(), mask)


def _depth_from_gray(
    ref_cam: Camera, ref_gray: torch.Tensor, nbr_cams: list[Camera], nbr_grays: list[torch.Tensor],
    depth_range: tuple[float, float], opt: DensifyOptions, mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    dev = ref_gray.device

    levels = [(ref_cam, ref_gray, nbr_cams, nbr_grays)]
    fill_levels = opt.fill_levels if opt.coarse_fill else 0
    for _ in range(opt.coarse_levels + fill_levels):
        rc, rg, ncs, ngs = levels[-1]
        if min(rg.shape) < 8 * opt.window:
            break
        half = [_half(c, g) for c, g in zip(ncs, ngs, strict=True)]
        levels.append((*_half(rc, rg), [h[0] for h in half], [h[1] for h in half]))
    # The coarsest fill_levels levels only fill texture-poor pixels: the depth path
    # proper starts afresh, with its own plane sweep, coarse_levels below full size.
    fresh = {len(levels) - 1, min(len(levels) - 1, opt.coarse_levels)}
    rho = step = ok = weak = None
    for level in range(len(levels) - 1, -1, -1):
        rc, rg, ncs, ngs = levels[level]
        m = _Matcher(_cam(rc, dev), rg, [(_cam(c, dev), g) for c, g in zip(ncs, ngs, strict=True)], opt)
        coarse_rho = coarse_ok = None
        if rho is not None:
            coarse_rho = F.interpolate(_median3(rho)[None, None], size=rg.shape, mode="bilinear",
                                       align_corners=False)[0, 0]
            coarse_ok = F.interpolate(ok[None, None].float(), size=rg.shape, mode="nearest")[0, 0] > 0.5
        if level in fresh:
            rho, best, step = _plane_sweep(m, depth_range, opt.depth_planes, opt.plane_tilts)
            if opt.refine_steps > 0:
                rho2, best2 = _local_sweep(m, rho, step, opt.refine_steps)
                better = best2 > best
                rho, best = torch.where(better, rho2, rho), torch.maximum(best, best2)
        else:
            # Coarse estimate, then a finer window: +-1.5 plane steps, then +-0.4.
            k = max(2, opt.refine_steps // 2)
            rho, best = _local_sweep(m, coarse_rho, 1.5 * step, k)
            rho2, best2 = _local_sweep(m, _median3(rho), 0.4 * step, k)
            better = best2 > best
            rho, best = torch.where(better, rho2, rho), torch.maximum(best, best2)
        ok = (best >= opt.min_score) & (m.sigma >= opt.min_texture) & (rho > 0)
        if opt.coarse_fill and coarse_ok is not None:
            # Where this level's window sees too little texture, a coarser level's wider
            # view may still have matched: keep its depth, marked weak (fusion then asks
            # for more agreeing views, as it is less precise).
            fill = ~ok & coarse_ok & (coarse_rho > 0)
            rho = torch.where(fill, coarse_rho, rho)
            weak = fill
            ok = ok | fill
    r = m.k // 2
    valid = ok.clone()
    valid[:r] = False
    valid[-r:] = False
    valid[:, :r] = False
    valid[:, -r:] = False
    if mask is not None:
        valid &= mask.to(dev) >= 0.5
    depth = torch.where(valid, 1.0 / rho.clamp_min(1e-8), torch.zeros_like(rho))
    if weak is not None:
        best = best.masked_fill(weak & valid, WEAK_SCORE)
    return depth, best


# --------------------------------------------------------------------------- fusion
def _normals(c: _Cam, depth: torch.Tensor, rays: torch.Tensor) -> torch.Tensor:
    """World normals (3, H, W) from central differences of the camera-space points,
    facing the camera; zero where a neighbour pixel has no depth."""
    X = (rays.reshape(3, c.h, c.w) * depth[None])
    dx = torch.zeros_like(X)
    dy = torch.zeros_like(X)
    dx[:, :, 1:-1] = X[:, :, 2:] - X[:, :, :-2]
    dy[:, 1:-1] = X[:, 2:] - X[:, :-2]
    n = torch.linalg.cross(dx, dy, dim=0)
    n = n / n.norm(dim=0, keepdim=True).clamp_min(1e-12)
    flip = (n * X).sum(0, keepdim=True) > 0
    n = torch.where(flip, -n, n)
    ok = depth > 0
    ok2 = torch.zeros_like(ok)
    ok2[1:-1, 1:-1] = ok[1:-1, 2:] & ok[1:-1, :-2] & ok[2:, 1:-1] & ok[:-2, 1:-1]
    n = n * ok2[None]
    return (c.R.T @ n.reshape(3, -1)).reshape(3, c.h, c.w)


def fuse(
    cams: Sequence[Camera], depths: torch.Tensor, images: torch.Tensor, partners: Sequence[Sequence[int]],
    options: DensifyOptions | None = None,
) -> PointCloud:
    """Fuse depth maps ``(V, H, W)`` (0 = none) of images ``(V, 3, H, W)`` into one cloud.

    ``partners[i]`` are the views view ``i`` is checked against. A pixel becomes a point
    when at least ``min_consistent`` of them agree (see the module docstring); its matched
    pixels in later views are not used again."""
    return _drain(_fuse_steps(cams, depths, images, partners, options or DensifyOptions()))


def _drain(steps: Generator[Step, None, PointCloud], progress: ProgressFn | None = None,
           should_stop: Callable[[], bool] | None = None) -> PointCloud:
    """Run a step generator to its end: the cloud it returns."""
    while True:
        if should_stop is not None and should_stop():
            steps.close()
            raise DensifyCancelled("densify cancelled")
        try:
            stage, done, total = next(steps)
        except StopIteration as stop:
            return stop.value
        if progress is not None:
            progress(stage, done, total)


def _fuse_steps(
    cams: Sequence[Camera], depths: torch.Tensor, images: torch.Tensor, partners: Sequence[Sequence[int]],
    opt: DensifyOptions, weak: torch.Tensor | None = None,
) -> Generator[Step, None, PointCloud]:
    parts, _ = yield from _fused_points(cams, depths, images, partners, opt, weak)
    return _cloud(parts, opt)


Parts = tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]  # points, colours, normals


def _fused_points(
    cams: Sequence[Camera], depths: torch.Tensor, images: torch.Tensor, partners: Sequence[Sequence[int]],
    opt: DensifyOptions, weak: torch.Tensor | None = None,
) -> Generator[Step, None, tuple[Parts, torch.Tensor]]:
    """Fused points (lists of (N, 3) pieces) and the consistent pixels (V, H, W): those
    that became a point or matched one."""
    dev = depths.device
    V, H, W = depths.shape
    cs = [_cam(c, dev) for c in cams]
    rays = [_rays(c) for c in cs]
    used = torch.zeros((V, H * W), dtype=torch.bool, device=dev)
    kept = torch.zeros((V, H * W), dtype=torch.bool, device=dev)
    out_p, out_c, out_n = [], [], []
    for i in range(V):
        d = depths[i].reshape(-1)
        sel = torch.nonzero((d > 0) & ~used[i]).squeeze(1)
        if sel.numel() == 0 or not partners[i]:
            yield ("fuse", i + 1, V)
            continue
        X = _unproject(cs[i], rays[i][:, sel], d[sel])
        count, sumX, sumC, matches = _partner_votes(
            cs, rays, depths, images, i, partners[i], sel, X, d[sel], opt.pixel_tolerance, opt.depth_tolerance)
        need = opt.min_consistent
        if weak is not None:
            need = need + weak[i].reshape(-1)[sel].long() * opt.weak_extra_views
        keep = count >= need
        kept[i, sel[keep]] = True
        for j, pix, ok in matches:
            used[j, pix[ok & keep]] = True
        n = (count + 1).float()[None]
        out_p.append(((sumX / n)[:, keep]).T)
        out_c.append(((sumC / n)[:, keep]).T)
        if opt.normals:
            out_n.append(_normals(cs[i], depths[i], rays[i]).reshape(3, -1)[:, sel][:, keep].T)
        yield ("fuse", i + 1, V)
    return (out_p, out_c, out_n), (kept | used).reshape(V, H, W)


def _partner_votes(
    cs: Sequence[_Cam], rays: Sequence[torch.Tensor], depths: torch.Tensor, images: torch.Tensor, i: int,
    partners: Sequence[int], sel: torch.Tensor, X: torch.Tensor, d: torch.Tensor, pixel_tolerance: float,
    depth_tolerance: float, colour: tuple[torch.Tensor, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[int, torch.Tensor, torch.Tensor]]]:
    """The cross-view check of view ``i``'s points ``X`` (its pixels ``sel`` at depths ``d``):
    a partner j agrees when its depth map at the point's projection gives back a point that
    lands within ``pixel_tolerance`` pixels of the pixel and ``depth_tolerance`` relative
    depth, and, with ``colour = (blurred images, tolerance)``, sees the same blurred colour.
    Returns the agreeing count, the sums of the agreeing points and colours (``X`` and view
    i's colours included) and per partner (j, its pixels, agrees)."""
    V, H, W = depths.shape
    u0, v0 = (sel % W).float(), (sel // W).float()
    count = torch.zeros(sel.numel(), dtype=torch.long, device=depths.device)
    sumX = X.clone()
    sumC = images[i].reshape(3, -1)[:, sel].clone()
    col_i = None if colour is None else colour[0][i].reshape(3, -1)[:, sel]
    matches = []
    for j in partners:
        u, v, z = _project(cs[j], X)
        ui, vi = torch.round(u).long(), torch.round(v).long()
        inside = (z > 0) & (ui >= 0) & (ui < W) & (vi >= 0) & (vi < H)
        pix = vi.clamp(0, H - 1) * W + ui.clamp(0, W - 1)
        dj = depths[j].reshape(-1)[pix]
        Xj = _unproject(cs[j], rays[j][:, pix], dj)
        ub, vb, zb = _project(cs[i], Xj)
        err = torch.hypot(ub - u0, vb - v0)
        ok = inside & (dj > 0) & (err < pixel_tolerance) & ((zb - d).abs() < depth_tolerance * d)
        if colour is not None:
            ok &= (colour[0][j].reshape(3, -1)[:, pix] - col_i).abs().mean(0) < colour[1]
        count += ok.long()
        sumX += Xj * ok[None]
        sumC += images[j].reshape(3, -1)[:, pix] * ok[None]
        matches.append((j, pix, ok))
    return count, sumX, sumC, matches


def _cloud(parts: Parts, opt: DensifyOptions) -> PointCloud:
    """One cloud from point pieces, within ``max_points`` (earlier pieces win a voxel)."""
    out_p, out_c, out_n = parts
    if not out_p:
        return PointCloud(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.float32))
    pts = torch.cat(out_p).cpu()
    col = torch.cat(out_c).clamp(0, 1).cpu()
    nrm = torch.cat(out_n).cpu() if opt.normals else None
    keep_idx = _voxel_limit(pts, opt.max_points)
    pts, col = pts[keep_idx], col[keep_idx]
    extra = {}
    if nrm is not None:
        nrm = nrm[keep_idx]
        extra = {"nx": nrm[:, 0].numpy(), "ny": nrm[:, 1].numpy(), "nz": nrm[:, 2].numpy()}
    return PointCloud(pts.numpy().astype(np.float32), col.numpy().astype(np.float32), extra)


# --------------------------------------------------------------------------- fill
# A hole pixel takes a window's plane only within this many standard deviations (of the
# window's supporting pixel positions) of their centroid: interpolation, not extrapolation.
_FILL_REACH = 2.0
# Share of a plane-fit window that must hold valid depth.
_FILL_SUPPORT = 0.1


def texture_of(gray: torch.Tensor, k: int = 7) -> torch.Tensor:
    """Standard deviation of ``gray`` (H, W) over a k x k window (windows cut at the border)."""
    x = torch.stack([gray, gray * gray])[None]
    m = F.avg_pool2d(x, k, stride=1, padding=k // 2, count_include_pad=False)[0]
    return (m[1] - m[0] * m[0]).clamp_min(0.0).sqrt()


def plane_fill(depth: torch.Tensor, valid: torch.Tensor, max_window: int, fit_tolerance: float) -> torch.Tensor:
    """Depth (H, W) for pixels without ``valid`` depth, from planes fitted to the valid
    depths around them; 0 where no plane is trusted.

    Inverse depth of a plane is affine in pixel coordinates, so an affine fit of inverse
    depth over a window is exact on planar surfaces. The image is cut into cells of f x f
    pixels (f = 2, 4, 8 ...); each cell fits one plane to the valid depths of the 5f x 5f
    window around it, robustly (a window holding an object and the table behind it fits
    the surface with most support: start from the median, refit on the inliers twice).
    A cell's pixels take the finest fit with enough inliers (``_FILL_SUPPORT`` of the
    window), an RMS residual within ``fit_tolerance`` (relative), and the pixel within
    ``_FILL_REACH`` standard deviations of the inliers' positions (bounded holes, not open
    extrapolation); windows stop at ``max_window`` pixels."""
    H, W = depth.shape
    dev = depth.device
    out = torch.zeros((H, W), dtype=torch.float32, device=dev)
    todo = ~valid
    rho_all = torch.where(valid, 1.0 / depth.float().clamp_min(1e-12), torch.zeros((), device=dev))
    f = 2
    while 5 * f <= max_window and bool(todo.any()):
        s = max(1, f // 4)  # at most 20 x 20 samples per window
        hc, wc = -(-H // f), -(-W // f)
        pad = (0, wc * f - W, 0, hc * f - H)
        r = F.pad(rho_all, pad)[::s, ::s]
        ok = F.pad(valid, pad)[::s, ::s]
        k, st, p = 5 * f // s, f // s, 2 * f // s
        win = F.unfold(torch.stack([r, ok.float()])[None], k, padding=p, stride=st)[0].reshape(2, k * k, hc * wc)
        rho, w = win[0].T, win[1].T > 0.5  # (cells, samples)
        # Sample offsets from the cell centre, in units of f.
        off = (torch.arange(k, device=dev, dtype=torch.float32) * s - 2 * f - (f - 1) / 2) / f
        y = off[:, None].expand(k, k).reshape(-1)
        x = off[None, :].expand(k, k).reshape(-1)
        xy = torch.stack([torch.ones_like(x), x, y, x * x, x * y, y * y], 1)
        level = torch.where(w, rho, torch.full_like(rho, float("nan"))).nanmedian(dim=1).values.nan_to_num(0.0)
        inl = w & ((rho - level[:, None]).abs() <= 0.15 * level[:, None])
        coef = torch.stack([level, torch.zeros_like(level), torch.zeros_like(level)], 1)
        for band in (4.0, 2.0, None):
            coef = _affine_fit(xy, rho, inl, coef)
            pred = coef @ xy[:, :3].T
            if band is not None:
                inl = w & ((rho - pred).abs() <= band * fit_tolerance * coef[:, :1].abs())
        wi = inl.float()
        m = wi @ xy
        n = m[:, 0].clamp_min(1)
        resid = (((rho - pred) ** 2 * wi).sum(1) / n).sqrt()
        mx, my = m[:, 1] / n, m[:, 2] / n
        cxx = m[:, 3] / n - mx * mx + 0.01
        cyy = m[:, 5] / n - my * my + 0.01
        cxy = m[:, 4] / n - mx * my
        n = m[:, 0]
        good_cell = (n >= _FILL_SUPPORT * k * k) & (resid <= fit_tolerance * coef[:, 0]) & (coef[:, 0] > 0)
        # Per pixel: its cell's plane, at its offset from the cell centre.
        vv, uu = torch.meshgrid(torch.arange(H, device=dev), torch.arange(W, device=dev), indexing="ij")
        cell = (vv // f) * wc + (uu // f)
        px = ((uu % f).float() - (f - 1) / 2) / f
        py = ((vv % f).float() - (f - 1) / 2) / f
        c = coef[cell]
        val = c[..., 0] + c[..., 1] * px + c[..., 2] * py
        dx, dy = px - mx[cell], py - my[cell]
        det = cxx[cell] * cyy[cell] - cxy[cell] ** 2
        reach = (cyy[cell] * dx * dx - 2 * cxy[cell] * dx * dy + cxx[cell] * dy * dy) / det.clamp_min(1e-12)
        good = todo & good_cell[cell] & (reach <= _FILL_REACH**2) & (val > 0)
        out = torch.where(good, 1.0 / val.clamp_min(1e-12), out)
        todo &= ~good
        f *= 2
    return out.to(depth.dtype)


def _affine_fit(xy: torch.Tensor, rho: torch.Tensor, inl: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Per row, least-squares ``rho ~ a + b x + c y`` over ``inl`` (cells, samples) -> (cells, 3);
    ``fallback`` where fewer than 3 samples. ``xy``: (samples, 6) = 1, x, y, xx, xy, yy."""
    wi = inl.float()
    m = wi @ xy  # the same sample layout in every window: moments by one product
    A = torch.stack([m[:, [0, 1, 2]], m[:, [1, 3, 4]], m[:, [2, 4, 5]]], 1).double()
    # A small ridge on the slopes keeps a window whose inliers lie on a line solvable.
    A = A + torch.diag(torch.tensor([1e-7, 1e-4, 1e-4], device=xy.device, dtype=A.dtype)) * m[:, :1, None].clamp_min(1)
    rhs = ((wi * rho) @ xy[:, :3]).double()
    sol = torch.linalg.solve(A, rhs[..., None])[..., 0].float()
    usable = (m[:, 0] >= 3) & torch.isfinite(sol).all(1)
    return torch.where(usable[:, None], sol, fallback)


def _blur3(img: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(img[None], 3, stride=1, padding=1, count_include_pad=False)[0]


def _fill_steps(
    cams: Sequence[Camera], depths: torch.Tensor, consistent: torch.Tensor, images: torch.Tensor,
    masks: Sequence[torch.Tensor | None] | None, partners: Sequence[Sequence[int]], opt: DensifyOptions,
) -> Generator[Step, None, Parts]:
    """Points for texture-poor pixels without a consistent depth (see :func:`fill_points`)."""
    dev = depths.device
    V, H, W = depths.shape
    cs = [_cam(c, dev) for c in cams]
    rays = [_rays(c) for c in cs]
    max_window = int(opt.fill_max_window * max(H, W))
    # Completed depth maps: consistent depth, else a plane where the photo is texture-poor.
    done = torch.where(consistent, depths, torch.zeros_like(depths))
    poor = torch.zeros((V, H, W), dtype=torch.bool, device=dev)
    blurred = torch.empty_like(images)
    for i in range(V):
        ok = texture_of(_gray(images[i])) < opt.fill_texture
        if masks is not None and masks[i] is not None:
            ok &= masks[i][0].to(dev) >= 0.5
        filled = plane_fill(done[i], consistent[i], max_window, opt.fill_fit_tolerance)
        poor[i] = ok & ~consistent[i] & (filled > 0)
        done[i] = torch.where(poor[i], filled, done[i])
        blurred[i] = _blur3(images[i])
        yield ("fill", i + 1, 2 * V)
    grid = torch.zeros((H, W), dtype=torch.bool, device=dev)
    grid[:: opt.fill_stride, :: opt.fill_stride] = True
    taken = torch.zeros((V, H * W), dtype=torch.bool, device=dev)
    spread = 2 * (opt.fill_stride // 2) + 1
    out_p, out_c, out_n = [], [], []
    for i in range(V):
        # A fill point claims the pixels it matched in other views, with their stride
        # neighbourhood: one point per region, not one per view.
        near = F.max_pool2d(taken[i].reshape(1, 1, H, W).float(), spread, stride=1, padding=spread // 2)[0, 0] > 0
        sel = torch.nonzero((poor[i] & grid & ~near).reshape(-1)).squeeze(1)
        if sel.numel() == 0 or not partners[i]:
            yield ("fill", V + i + 1, 2 * V)
            continue
        d = done[i].reshape(-1)[sel]
        X = _unproject(cs[i], rays[i][:, sel], d)
        # Texture-poor means one colour around the pixel: the views must see that colour.
        count, sumX, sumC, matches = _partner_votes(
            cs, rays, done, images, i, partners[i], sel, X, d, opt.fill_pixel_tolerance,
            opt.fill_depth_tolerance, (blurred, opt.fill_color_tolerance))
        keep = count >= opt.fill_min_views
        for j, pix, ok in matches:
            taken[j, pix[ok & keep]] = True
        n = (count + 1).float()[None]
        out_p.append(((sumX / n)[:, keep]).T)
        out_c.append(((sumC / n)[:, keep]).T)
        if opt.normals:
            out_n.append(_normals(cs[i], done[i], rays[i]).reshape(3, -1)[:, sel][:, keep].T)
        yield ("fill", V + i + 1, 2 * V)
    return out_p, out_c, out_n


def fill_points(
    cams: Sequence[Camera], depths: torch.Tensor, consistent: torch.Tensor, images: torch.Tensor,
    partners: Sequence[Sequence[int]], options: DensifyOptions | None = None,
    masks: Sequence[torch.Tensor | None] | None = None,
) -> PointCloud:
    """Points for texture-poor regions where stereo found no consistent depth.

    Per view, pixels without ``consistent`` depth whose photo is texture-poor (grey
    standard deviation over 7 x 7 pixels below ``fill_texture``) take the depth of a plane
    fitted to the consistent depths around them (:func:`plane_fill`). On a grid of
    ``fill_stride`` pixels, such a pixel becomes a point when at least ``fill_min_views``
    of its ``partners`` agree: their completed depth maps give back the same point (within
    ``fill_pixel_tolerance`` pixels and ``fill_depth_tolerance`` relative depth) and they
    see the same colour (mean absolute difference of 3 x 3 blurred RGB below
    ``fill_color_tolerance``). In a texture-poor region an approximate depth still gives
    the right colour from nearby viewpoints; the checks keep planes that cross a depth
    step or disagree between views out."""
    opt = options or DensifyOptions()
    opt.check()
    parts = _drain(_fill_steps(cams, depths, consistent, images, masks, partners, opt))
    return _cloud(parts, opt)


def _voxel_limit(pts: torch.Tensor, max_points: int) -> torch.Tensor:
    """Indices of at most ``max_points`` points: one per cell of the finest voxel grid
    that fits (bisection on the cell size), the lowest index in each cell."""
    n = pts.shape[0]
    if n <= max_points:
        return torch.arange(n)
    lo_b, hi_b = pts.min(0).values, pts.max(0).values
    diag = float((hi_b - lo_b).norm())

    def cells(size: float) -> torch.Tensor:
        key = torch.floor((pts - lo_b) / size).long()
        _, inv = torch.unique(key, dim=0, return_inverse=True)
        first = torch.full((int(inv.max()) + 1,), n, dtype=torch.long)
        first.scatter_reduce_(0, inv, torch.arange(n), reduce="amin")
        return first

    lo, hi = diag * 1e-6, diag  # cells(hi) has few points; cells(lo) too many
    best = cells(hi)
    for _ in range(16):
        mid = math.sqrt(lo * hi)
        c = cells(mid)
        if c.numel() <= max_points:
            hi, best = mid, c
        else:
            lo = mid
    return torch.sort(best).values[:max_points]


# --------------------------------------------------------------------------- drivers
def densify_views(
    images: Sequence[torch.Tensor], cameras: Sequence[Camera], masks: Sequence[torch.Tensor | None] | None = None,
    sparse_points: np.ndarray | None = None, options: DensifyOptions | None = None, device: str = "auto",
    progress: ProgressFn | None = None, should_stop: Callable[[], bool] | None = None,
    names: Sequence[str] | None = None,
) -> PointCloud:
    """Dense cloud from in-memory ``images`` (3, H, W) in [0, 1] and their ``cameras``
    (same sizes). ``sparse_points`` (N, 3) set the depth ranges."""
    opt = options or DensifyOptions()
    opt.check()
    steps = _view_steps(list(images), list(cameras), masks, sparse_points, opt, pick_device(device), names)
    return _drain(steps, progress, should_stop)


def _view_steps(
    images: list[torch.Tensor], cameras: list[Camera], masks: Sequence[torch.Tensor | None] | None,
    sparse_points: np.ndarray | None, opt: DensifyOptions, dev: torch.device, names: Sequence[str] | None,
) -> Generator[Step, None, PointCloud]:
    n = len(images)
    names = list(names) if names is not None else [f"view {i}" for i in range(n)]
    if n == 0:
        raise DensifyError("no views to densify")
    if n == 1:
        raise DensifyError(f"densify needs at least 2 views, got 1 ({names[0]})")
    if len(cameras) != n:
        raise DensifyError(f"{n} images but {len(cameras)} cameras")
    shapes = {tuple(im.shape[1:]) for im in images}
    if len(shapes) != 1:
        raise DensifyError(f"all views must have one size for fusion, got {sorted(shapes)}")
    center = (np.asarray(sparse_points, np.float64).mean(0) if sparse_points is not None and len(sparse_points)
              else cameras_center(cameras))
    ranges = [opt.depth_range or depth_range_of(c, sparse_points, center) for c in cameras]
    # Tiny per-pair geometry: on the CPU, a GPU would spend its time on V^2 small syncs.
    cpu = torch.device("cpu")
    nbrs = choose_neighbors([_cam(c, cpu) for c in cameras], ranges, max(opt.neighbors, opt.consistency_views))
    if not any(nbrs):
        raise DensifyError(f"no two of the {n} views overlap: nothing can be matched ({', '.join(names[:5])}...)")
    if opt.min_consistent > n - 1:  # a point is checked against the other views only: it could never pass
        need = opt.min_consistent + 1
        raise DensifyError(f"min_consistent={opt.min_consistent} needs at least {need} views, got {n} "
                           f"({', '.join(names[:5])}): use more views (--views, --max-views; the add-on's Max Views) "
                           "or a smaller min_consistent (--min-consistent; the add-on's Min Consistent Views)")
    imgs = [im.to(dev, torch.float32) for im in images]
    grays = [_gray(im) for im in imgs]
    depths = torch.zeros((n, *imgs[0].shape[1:]), device=dev)
    weak = torch.zeros((n, *imgs[0].shape[1:]), dtype=torch.bool, device=dev)
    for i in range(n):
        sweep_nbrs = [j for j, _ in nbrs[i][: opt.neighbors]]
        if sweep_nbrs:
            mask = masks[i] if masks is not None else None
            depths[i], score = _depth_from_gray(cameras[i], grays[i], [cameras[j] for j in sweep_nbrs],
                                                [grays[j] for j in sweep_nbrs], ranges[i], opt,
                                                None if mask is None else mask[0])
            weak[i] = score == WEAK_SCORE
        yield ("depth", i + 1, n)
    partners = [[j for j, _ in nb[: opt.consistency_views]] for nb in nbrs]
    stack = torch.stack(imgs)
    parts, consistent = yield from _fused_points(cameras, depths, stack, partners, opt, weak)
    if opt.fill:
        extra = yield from _fill_steps(cameras, depths, consistent, stack, masks, partners, opt)
        parts = tuple(a + b for a, b in zip(parts, extra, strict=True))
    return _cloud(parts, opt)


def _processing_size(camera: Camera, opt: DensifyOptions) -> tuple[int, int]:
    h, w = camera.image_size
    s = opt.image_scale
    s = min(s, opt.max_image_size / max(h, w)) if opt.max_image_size else s
    return max(2, int(round(h * s))), max(2, int(round(w * s)))


def _views_problem(views: Sequence[int], view_names: Sequence[str]) -> str | None:
    """What is wrong with densifying the scene views ``views`` (indices into
    ``view_names``): one it lacks, one given twice, fewer than two (None: nothing)."""
    n = len(view_names)
    wrong = [i for i in views if not 0 <= i < n]
    if wrong:
        return f"view {wrong[0]} is out of range (the scene has {n} views, 0..{n - 1})"
    repeated = next((i for k, i in enumerate(views) if i in views[:k]), None)
    if repeated is not None:
        return f"view {repeated} is given more than once"
    if not views:
        return "no views to densify (it needs at least 2)"
    if len(views) == 1:
        return f"densify needs at least 2 views, got 1 ({view_names[views[0]]})"
    return None


class DensifyJob:
    """Densify a scene in small steps (one view each: load, depth map, fusion), so that a
    caller (the add-on's worker) can report progress and stop between steps.

    ``job.step()`` does one step and returns True when the cloud is ready
    (``job.result``); ``job.stage``, ``job.done``, ``job.total`` say where it is. Bad
    input raises :class:`DensifyError` in the constructor."""

    def __init__(self, scene, views: Sequence[int] | None = None, options: DensifyOptions | None = None,
                 device: str = "auto") -> None:
        self.options = opt = options or DensifyOptions()
        opt.check()
        idx = list(views) if views is not None else list(scene.train or range(len(scene.views)))
        problem = _views_problem(idx, [v.name for v in scene.views])
        if problem:
            raise DensifyError(f"{scene.root}: {problem}")
        self.scene, self.views, self.device = scene, idx, pick_device(device)
        self.stage, self.done, self.total = "load", 0, (5 if opt.fill else 3) * len(idx)
        self.result: PointCloud | None = None
        self._steps = self._run()

    def _run(self) -> Generator[Step, None, PointCloud]:
        scene, idx, opt = self.scene, self.views, self.options
        size = _processing_size(scene.views[idx[0]].camera, opt)
        images, cams, masks = [], [], []
        for k, i in enumerate(idx):
            images.append(scene.load_image(i, size))
            masks.append(scene.load_mask(i, size))
            cams.append(scene.camera(i, size))
            yield ("load", k + 1, len(idx))
        pts = scene.points if scene.points is not None and len(scene.points) else None
        return (yield from _view_steps(images, cams, masks, pts, opt, self.device,
                                       [scene.views[i].name for i in idx]))

    def step(self) -> bool:
        if self.result is not None:
            return True
        try:
            stage, done, _ = next(self._steps)
        except StopIteration as stop:
            self.result = stop.value
            self.stage, self.done = "done", self.total
            return True
        offset = {"load": 0, "depth": 1, "fuse": 2, "fill": 3}[stage] * len(self.views)
        self.stage, self.done = stage, offset + done
        return False


def densify_scene(
    scene, views: Sequence[int] | None = None, options: DensifyOptions | None = None, device: str = "auto",
    progress: ProgressFn | None = None, should_stop: Callable[[], bool] | None = None, **overrides,
) -> PointCloud:
    """Dense coloured cloud of a :class:`~npbgpp_core.datasets.SceneData`.

    ``views``: indices used (default: the training views, else all). Keyword
    ``overrides`` set :class:`DensifyOptions` fields (``max_points=``, ``normals=`` ...).
    ``progress(stage, done, total)`` is called per view for ``'load'``, ``'depth'``,
    ``'fuse'``; ``should_stop()`` returning True raises :class:`DensifyCancelled`."""
    opt = dataclasses.replace(options) if options is not None else DensifyOptions()
    for k, v in overrides.items():
        if not hasattr(opt, k):
            raise TypeError(f"densify_scene: unknown option {k!r}")
        setattr(opt, k, v)
    job = DensifyJob(scene, views, opt, device)
    return _drain(job._steps, progress, should_stop)


def _parse_views(text: str, n: int, train: list[int], names: Sequence[str] = ()) -> list[int]:
    """``train``, ``all`` or a list like ``0,2,5-9`` whose items may also be view names
    (``train/r_0``, a COLMAP image name; a user knows those, not indices) (ValueError
    naming the text)."""
    if text == "train":
        return list(train or range(n))
    if text == "all":
        return list(range(n))
    index = {name: i for i, name in enumerate(names)}
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if part in index:  # before ranges: names may hold '-'
            i = index[part]
            if part.isdigit() and int(part) != i and int(part) < n:  # ScanNet-like numbered views
                raise ValueError(f"--views {text!r}: {part!r} is both view index {int(part)} ({names[int(part)]}) and "
                                 f"the name of view {i}; write {i} for the view named {part}, or "
                                 f"{int(part)}-{int(part)} for index {int(part)}")
            out.append(i)
            continue
        try:
            if "-" in part:
                a, b = part.split("-", 1)
                out.extend(range(int(a), int(b) + 1))
            elif part:
                out.append(int(part))
        except ValueError:
            raise ValueError(f"--views {text!r}: {part!r} is neither a view index nor a view name; expected "
                             f"train, all, indices like 0,2,5-9 or names like {names[0] if names else 'r_0'}"
                             ) from None
    return out


# The command's flags for the DensifyOptions fields it sets, so that refusals name them.
_FLAGS = {"max_points": "--max-points", "image_scale": "--scale", "max_image_size": "--max-image-size",
          "depth_planes": "--planes", "neighbors": "--neighbors", "min_consistent": "--min-consistent",
          "depth_range": "--depth-range", "plane_tilts": "--plane-tilts", "fill_stride": "--fill-stride",
          "fill_texture": "--fill-texture"}


def _options(a: argparse.Namespace) -> DensifyOptions:
    """The options of ``main``; a ValueError names the first option, as typed, whose value
    can never work. DensifyOptions.check holds the bounds of its fields; only what it does
    not know about is checked here."""
    from .datasets import FORMATS

    checks = [
        (a.format is None or a.format in FORMATS,
         f"--format {a.format}: unknown format; choose one of {list(FORMATS)}"),
        (a.max_views == 0 or a.max_views >= 2,
         f"--max-views {a.max_views}: must be 0 (all views) or at least 2 (densify matches views in pairs)"),
        (a.threads >= 0, f"--threads {a.threads}: must be at least 0 (0: torch's default)"),
    ]
    problem = next((message for ok, message in checks if not ok), None)
    if problem is not None:
        raise ValueError(problem)
    opt = DensifyOptions(
        max_points=a.max_points, image_scale=a.scale, max_image_size=a.max_image_size, depth_planes=a.planes,
        neighbors=a.neighbors, top_k=min(DensifyOptions.top_k, a.neighbors), min_consistent=a.min_consistent,
        normals=a.normals, depth_range=tuple(a.depth_range) if a.depth_range else None,
        plane_tilts=tuple(a.plane_tilts),
        fill=a.fill, fill_stride=a.fill_stride, fill_texture=a.fill_texture,
    )
    opt.check(_FLAGS)
    try:
        pick_device(a.device)
    except DensifyError as exc:
        raise ValueError(f"--device {a.device}: {exc}") from None
    return opt


def check_not_an_input(out: str, scene, field: str = "--out") -> None:
    """Refuse an output ``out`` (``field``: what the caller calls it) that is one of the
    files the scene was read from (:func:`~npbgpp_core.datasets.scene_data.scene_input_at`):
    writing there replaced the user's input without a word. Another ``.ply`` in the scene's
    folder, such as an earlier run's dense cloud, may be replaced: the one rule of the
    command line and the add-on's Densify Points."""
    from .datasets.scene_data import scene_input_at

    path = scene_input_at(scene, out, (".ply",))  # a bundle in the folder is no place for a cloud
    if path is not None:
        # a re-run into an instant-ngp folder finds its earlier dense.ply as the scene's cloud
        name = "dense_2.ply" if os.path.basename(os.path.realpath(out)) == "dense.ply" else "dense.ply"
        raise ValueError(f"{field} {out} is an input of the scene ({path}); write the dense cloud to another "
                         f"file, e.g. {os.path.join(os.path.dirname(out) or '.', name)}")


def check_output(out: str, scene, field: str = "--out") -> None:
    """Refuse a dense cloud's output ``out`` before the work: an input of the scene
    (:func:`check_not_an_input`), then a name without ``.ply`` (no reader would take the
    file for a cloud). The command line's and the add-on's Densify Points' one check."""
    from .atomic import check_output_suffix

    check_not_an_input(out, scene, field)
    try:  # after the input check: a photo or camera file named as the output is better named as an input
        check_output_suffix(out, ".ply")
    except ValueError as exc:
        raise ValueError(f"{field} {exc}") from None


def check_not_the_own_cloud(out: str, scene, field: str = "--out", allow_external_paths: bool = False) -> None:
    """With a chosen cloud (pc_name), refuse an output ``out`` that is the format's own
    cloud of ``scene``, the one its folder is read with when none is chosen
    (``datasets.own_cloud_file`` of the scene's folder and format, found without reading the
    cloud again; ``allow_external_paths`` as the scene was loaded): :func:`check_output` sees
    only the chosen one, and a dense cloud written over points3d.ply destroyed the dataset's
    own cloud. A folder whose own cloud the loader cannot tell (several .ply) has none to
    refuse."""
    from .atomic import same_file
    from .datasets import DatasetError, own_cloud_file

    try:
        own = own_cloud_file(scene.root, scene.format, allow_external_paths=allow_external_paths)
    except DatasetError:
        return
    if own and same_file(out, own):
        raise ValueError(f"{field} {out} is the dataset's own point cloud ({own}), which it is read with when no "
                         "other cloud is chosen; write the dense cloud to another file")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m npbgpp_core.densify", description=__doc__.split("\n")[0])
    p.add_argument("scene", help="scene folder in any load_scene format")
    p.add_argument("--out", required=True, help="output PLY file")
    p.add_argument("--format", default=None, help="dataset format (default: detect)")
    p.add_argument("--undistort", action="store_true", help="COLMAP, nerfstudio: undistort distorted cameras on load")
    p.add_argument("--pc-name", default=None, metavar="FILE.ply",
                   help="the scene's point cloud file, relative to SCENE (load_scene's pc_name): the depth ranges "
                   "come from it and --out may not replace it; default: the format's own cloud")
    p.add_argument("--views", default="train",
                   help="'train' (default), 'all', or indices and view names like 0,2,5-9,train/r_12 (a number "
                   "that is also another view's name is refused: N-N is index N)")
    p.add_argument("--max-views", type=int, default=0, help="use at most this many, evenly spaced (0: all)")
    p.add_argument("--max-points", type=int, default=DensifyOptions.max_points, help="size limit of the cloud")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--min-consistent", type=int, default=DensifyOptions.min_consistent,
                   help="views that must agree with a point")
    p.add_argument("--scale", type=float, default=1.0, help="image scale for matching (e.g. 0.5)")
    p.add_argument("--max-image-size", type=int, default=DensifyOptions.max_image_size,
                   help="longest image side for matching (0: no limit)")
    p.add_argument("--planes", type=int, default=DensifyOptions.depth_planes, help="depth planes per view")
    p.add_argument("--neighbors", type=int, default=DensifyOptions.neighbors, help="views matched per view")
    p.add_argument("--normals", action="store_true", help="write normals (nx, ny, nz)")
    p.add_argument("--depth-range", type=float, nargs=2, metavar=("NEAR", "FAR"), default=None,
                   help="depths searched in every view, in scene units (default: from the sparse points)")
    p.add_argument("--plane-tilts", type=float, nargs="*", metavar="DEG", default=list(DensifyOptions.plane_tilts),
                   help="also sweep planes tilted by these angles about each camera's x and y axes, e.g. 80 for "
                        "the ground and walls of a walk along a street (about 2.3x the time); none: "
                        "fronto-parallel planes only (the default)")
    p.add_argument("--fill", action=argparse.BooleanOptionalAction, default=DensifyOptions.fill,
                   help="add points on texture-poor regions without stereo depth: planes fitted to the depth "
                        "around them, kept where neighbouring views agree on depth and colour")
    p.add_argument("--fill-stride", type=int, default=DensifyOptions.fill_stride,
                   help="fill points every this many pixels")
    p.add_argument("--fill-texture", type=float, default=DensifyOptions.fill_texture,
                   help="fill only where the grey standard deviation over 7x7 pixels is below this")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default; 1 is much faster when other jobs share the cores)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    a = p.parse_args(argv)
    from .atomic import check_output_file

    try:
        check_output_file(a.out, "dense.ply")  # before the work (minutes on a CPU), not when the cloud is written
    except OSError as exc:
        print(f"error: --out {exc}", file=sys.stderr)
        return 2
    try:
        opt = _options(a)
    except ValueError as exc:  # DensifyError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    from .datasets import DatasetError, load_scene
    from .datasets.cloud_fit import scene_cloud_note
    from .ply import save_ply

    try:
        # The sparse cloud only narrows the depth search, so a capture without one (instant-ngp's
        # transforms.json) is densified from the cameras' spread alone.
        options = {"require_points": False, **({"undistort": True} if a.undistort else {})}
        if a.pc_name:
            options["pc_name"] = a.pc_name
        scene = load_scene(a.scene, a.format, **options)  # refuses --undistort for a format without distortion
        check_output(a.out, scene)
        if a.pc_name:
            check_not_the_own_cloud(a.out, scene)
        misfit = scene_cloud_note(scene) if a.pc_name else ""
        if misfit:  # its depth ranges would come from that cloud
            print(f"warning: {misfit}", file=sys.stderr)
        views = _parse_views(a.views, len(scene.views), scene.train, [v.name for v in scene.views])
        problem = _views_problem(views, [v.name for v in scene.views])
        if problem:
            raise ValueError(f"--views {a.views!r}: {problem}")
        if a.max_views and len(views) > a.max_views:  # --max-views is 0 or >= 2: still enough views
            views = [views[int(round(k))] for k in np.linspace(0, len(views) - 1, a.max_views)]
        t0 = time.perf_counter()

        def report(stage: str, done: int, total: int) -> None:
            if not a.quiet and (done == total or done % 10 == 0):
                print(f"{stage}: {done}/{total} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)

        cloud = densify_scene(scene, views, opt, a.device, progress=report)
    except KeyboardInterrupt:
        print(f"interrupted: nothing written to {a.out}", file=sys.stderr)
        return 130
    except (DatasetError, ValueError, TypeError, FileNotFoundError) as exc:  # DensifyError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if len(cloud) == 0:
        guessed = "" if a.depth_range else ": set it with --depth-range NEAR FAR"
        print(f"error: no consistent points (views too far apart, too little texture, or a wrong depth "
              f"range{guessed})", file=sys.stderr)
        return 1
    try:
        save_ply(a.out, cloud.points, cloud.colors, extra=cloud.extra or None)
    except OSError as exc:  # e.g. the disk filled up during the work: nothing half-written is left
        print(f"error: --out {a.out}: could not write the cloud: {exc.strerror or exc}", file=sys.stderr)
        return 1
    if not a.quiet:
        print(f"{len(cloud)} points -> {a.out} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
