"""An analytic multi-view scene for dense-reconstruction tests: a textured unit sphere at
the origin above a textured floor (z = -1), seen by cameras on a ring. Colours and depths
come from exact ray intersections (no rasterizer, no MVS code). Optionally a disc of the
floor is one flat colour (a texture-poor region bounded by textured floor)."""

from __future__ import annotations

import json
import math

import numpy as np
import torch

from npbgpp_core.camera import Camera

FLOOR_Z = -1.0
RADIUS = 1.0
FLAT_COLOR = (0.55, 0.45, 0.35)
Disc = tuple[float, float, float]  # centre x, y on the floor, radius


def texture(p: torch.Tensor) -> torch.Tensor:
    """(N, 3) points -> (N, 3) colours in [0, 1]: 3D sinusoids in three octaves (periods
    from about 0.05 to 1 unit), like natural texture at several scales."""
    g = torch.Generator().manual_seed(7)
    acc = torch.zeros(p.shape[0], 3, dtype=torch.float64)
    for octave in (6.0, 24.0, 80.0):
        freqs = torch.randn(4, 3, generator=g, dtype=torch.float64) * octave
        phases = torch.rand(4, 3, generator=g, dtype=torch.float64) * 6.28
        for k in range(4):
            acc += torch.sin(p.double() @ freqs[k][:, None] + phases[k][None])
    return (0.5 + acc / 8.0).clamp(0, 1).float()


def ring_cameras(n: int, size: tuple[int, int] = (96, 128), radius: float = 4.0, elevation_deg: float = 25.0,
                 step_deg: float = 12.0, fov_deg: float = 55.0) -> list[Camera]:
    cams = []
    for i in range(n):
        a = math.radians(i * step_deg)
        e = math.radians(elevation_deg)
        eye = (radius * math.cos(a) * math.cos(e), radius * math.sin(a) * math.cos(e), radius * math.sin(e))
        cams.append(Camera.look_at(eye=eye, target=(0, 0, -0.2), up=(0, 0, 1), fov_x_deg=fov_deg, image_size=size))
    return cams


def render(cam: Camera, floor: bool = True, supersample: int = 2,
           flat: Disc | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(image (3,H,W), depth (H,W) 0 where empty, sphere mask (H,W) bool)``; the image is
    the mean of ``supersample``^2 samples per pixel (anti-aliased, like a camera), depth and
    mask are taken at pixel centres. ``flat``: a floor disc of colour ``FLAT_COLOR``."""
    img, depth, sphere = _trace(cam, floor, flat)
    if supersample > 1:
        h, w = cam.image_size
        big = _trace(cam.scaled((h * supersample, w * supersample)), floor, flat)[0]
        img = torch.nn.functional.avg_pool2d(big[None], supersample)[0]
    return img, depth, sphere


def _trace(cam: Camera, floor: bool, flat: Disc | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    K, R, t = (torch.as_tensor(x, dtype=torch.float64) for x in cam.to_opencv())
    h, w = cam.image_size
    v, u = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    pix = torch.stack([u.reshape(-1), v.reshape(-1), torch.ones(h * w, dtype=torch.float64)])
    rays_cam = torch.linalg.inv(K) @ pix  # z = 1: the ray parameter is the depth
    o = -R.T @ t
    d = (R.T @ rays_cam).T  # world direction per unit depth
    b = d @ o
    a = (d * d).sum(1)
    c = float(o @ o) - RADIUS**2
    disc = b * b - a * c
    t_sphere = torch.where(disc >= 0, (-b - disc.clamp_min(0).sqrt()) / a, torch.full_like(b, math.inf))
    t_sphere = torch.where(t_sphere > 0, t_sphere, torch.full_like(b, math.inf))
    t_floor = torch.full_like(b, math.inf)
    if floor:
        tf = (FLOOR_Z - o[2]) / d[:, 2]
        hit = (tf > 0) & ((o[None] + tf[:, None] * d)[:, :2].abs() <= 3.0).all(1)
        t_floor = torch.where(hit, tf, t_floor)
    depth = torch.minimum(t_sphere, t_floor)
    hit = torch.isfinite(depth)
    X = o[None] + depth.clamp_max(1e3)[:, None] * d
    img = torch.where(hit[:, None], texture(X).double(), torch.zeros(h * w, 3, dtype=torch.float64))
    sphere = hit & (t_sphere <= t_floor)
    if flat is not None:
        on = hit & ~sphere & (torch.hypot(X[:, 0] - flat[0], X[:, 1] - flat[1]) <= flat[2])
        img = torch.where(on[:, None], torch.tensor(FLAT_COLOR, dtype=torch.float64), img)
    return (img.T.reshape(3, h, w).float(), torch.where(hit, depth, 0.0).reshape(h, w).float(),
            sphere.reshape(h, w))


def surface_distance(points: torch.Tensor, floor: bool = True) -> torch.Tensor:
    """Distance of (N, 3) points to the scene surface (sphere, and the floor square)."""
    p = torch.as_tensor(points, dtype=torch.float64)
    ds = (p.norm(dim=1) - RADIUS).abs()
    if not floor:
        return ds
    off = (p[:, :2].abs() - 3.0).clamp_min(0)
    df = torch.sqrt((p[:, 2] - FLOOR_Z) ** 2 + (off**2).sum(1))
    return torch.minimum(ds, df)


def sphere_samples(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return (p / p.norm(dim=1, keepdim=True) * RADIUS).float()


def write_nerf(root, cams, views, sphere_only_alpha: bool) -> None:
    """NeRF-Synthetic folder: RGBA PNGs (alpha = the sphere only, or everything hit),
    OpenGL camera-to-world matrices and a sparse point cloud on the sphere."""
    from PIL import Image

    from npbgpp_core.ply import save_ply

    (root / "train").mkdir(parents=True)
    frames = []
    for i, (cam, (img, depth, sphere)) in enumerate(zip(cams, views, strict=True)):
        alpha = sphere if sphere_only_alpha else depth > 0
        rgba = torch.cat([img, alpha[None].float()]).permute(1, 2, 0).numpy()
        Image.fromarray(np.round(rgba * 255).astype(np.uint8)).save(root / "train" / f"r_{i}.png")
        K, R, t = cam.to_opencv()
        c2w = np.eye(4)
        c2w[:3, :3] = R.T @ np.diag([1.0, -1.0, -1.0])
        c2w[:3, 3] = -R.T @ t
        frames.append({"file_path": f"./train/r_{i}", "transform_matrix": c2w.tolist()})
    w = cams[0].image_size[1]
    angle = 2 * math.atan(w / (2 * cams[0].intrinsics().fx))
    for split in ("train", "val", "test"):
        meta = {"camera_angle_x": angle, "frames": frames if split == "train" else []}
        (root / f"transforms_{split}.json").write_text(json.dumps(meta))
    save_ply(root / "points3d.ply", sphere_samples(300).numpy())
