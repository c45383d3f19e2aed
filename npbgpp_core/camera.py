"""Pinhole cameras in the OpenCV convention; PyTorch3D's convention only at the edges.

A :class:`Camera` holds OpenCV ``K`` (3, 3), world-to-camera ``R`` (3, 3) and ``t`` (3,):
``x_cam = R @ x_world + t`` with camera axes x right, y down, z forward, and
``u = fx * x / z + cx``, ``v = fy * y / z + cy``, the centre of pixel (row i, column j)
at ``(u, v) = (j, i)``. :meth:`Camera.project`, the rasterizer and the CUDA kernel all
use this frame.

The published system stores PyTorch3D cameras (``PerspectiveCameras(in_ndc=True)``: a
row-vector ``R``, ``T`` with ``x_view = x_world @ R + T``, view axes +X left, +Y up, +Z
forward, and NDC intrinsics where the shorter image side spans [-1, 1]);
:meth:`Camera.from_pytorch3d` / :meth:`Camera.to_pytorch3d` convert, with
``s = (min(H, W) - 1) / 2``, ``u = (W - 1) / 2 - s * ndc_x`` and
``v = (H - 1) / 2 - s * ndc_y`` (the published rasterizer's pixel mapping).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .protocol import NO_CLIP_FAR, NO_CLIP_NEAR

# diag(-1, -1, 1): OpenCV camera axes <-> PyTorch3D view axes.
_FLIP = torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float64)

ArrayLike = torch.Tensor | np.ndarray | Sequence


def _as64(x: ArrayLike) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(device="cpu", dtype=torch.float64)
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


def _check_size(image_size: Sequence[int]) -> tuple[int, int]:
    if len(image_size) != 2:
        raise ValueError(f"image_size must be (H, W), got {tuple(image_size)!r}")
    h, w = int(image_size[0]), int(image_size[1])
    if h != image_size[0] or w != image_size[1]:
        raise ValueError(f"image_size must hold integers, got {tuple(image_size)!r}")
    if h < 2 or w < 2:
        raise ValueError(f"image_size must be at least 2x2 pixels, got {(h, w)}")
    return h, w


def _ndc_scale(h: int, w: int) -> float:
    return (min(h, w) - 1) / 2.0


@dataclass(frozen=True)
class OpenCVIntrinsics:
    """fx, fy, cx, cy in pixels of an image of ``width`` x ``height``."""

    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int


class Camera:
    """One perspective camera: OpenCV ``K`` (3, 3), world-to-camera ``R`` (3, 3), ``t`` (3,)
    as float tensors of ``dtype`` on ``device``; ``image_size`` is ``(H, W)`` in pixels.
    ``K`` has no skew and positive focal lengths.

    ``near`` / ``far`` are the clip range in view depth (scene units along the optical
    axis, a Blender camera's clip start / end): the rasterizer draws only points with
    ``near < z <= far`` (:func:`npbgpp_core.rasterizer.rasterize_keys`). The defaults (0,
    inf) clip nothing beyond the rasterizer's own ``near``; every derived camera
    (scaled, cropped, rolled, moved to another device) keeps them."""

    __slots__ = ("K", "R", "t", "image_size", "near", "far")

    def __init__(
        self,
        K: ArrayLike,
        R: ArrayLike,
        t: ArrayLike,
        image_size: Sequence[int],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        near: float = NO_CLIP_NEAR,
        far: float = NO_CLIP_FAR,
    ) -> None:
        near, far = float(near), float(far)
        if not (math.isfinite(near) and near >= 0.0) or math.isnan(far) or not far > near:
            raise ValueError(f"camera clip range must be 0 <= near < far (near finite), got near={near}, far={far}")
        K = _as64(K)
        R = _as64(R)
        t = _as64(t).reshape(-1)
        if K.shape != (3, 3):
            raise ValueError(f"K must be 3x3, got {tuple(K.shape)}")
        if R.shape != (3, 3) or t.shape != (3,):
            raise ValueError(f"R must be 3x3 and t a 3-vector, got {tuple(R.shape)} and {tuple(t.shape)}")
        for name, value in (("K", K), ("R", R), ("t", t)):
            if not torch.isfinite(value).all():
                raise ValueError(f"camera {name} has non-finite values: {value.tolist()}")
        if abs(float(K[0, 1])) > 1e-9 * max(1.0, abs(float(K[0, 0]))):
            raise ValueError(f"skewed intrinsics (K[0,1]={float(K[0, 1])}) are not supported")
        fx, fy = float(K[0, 0]), float(K[1, 1])
        if fx <= 0 or fy <= 0:
            raise ValueError(f"focal length must be positive, got fx={fx}, fy={fy}")
        K = torch.tensor([[fx, 0.0, float(K[0, 2])], [0.0, fy, float(K[1, 2])], [0.0, 0.0, 1.0]],
                         dtype=torch.float64)
        self.image_size: tuple[int, int] = _check_size(image_size)
        self.K = K.to(dtype=dtype, device=device)
        self.R = R.to(dtype=dtype, device=device)
        self.t = t.to(dtype=dtype, device=device)
        for name, value in (("K", self.K), ("t", self.t)):  # finite in float64, inf once stored (1e308 -> float32)
            if not torch.isfinite(value).all():
                raise ValueError(f"camera {name} {value.tolist()} is beyond the range of {dtype}")
        if not (float(self.K[0, 0]) > 0.0 and float(self.K[1, 1]) > 0.0):  # 1e-50 -> 0 in float32
            raise ValueError(f"focal length fx={fx:g}, fy={fy:g} is too small for {dtype} (stored as "
                             f"{float(self.K[0, 0]):g}, {float(self.K[1, 1]):g})")
        self.near: float = near
        self.far: float = far

    @property
    def clip(self) -> dict[str, float]:
        """``near`` and ``far`` as keyword arguments (for building a derived camera)."""
        return {"near": self.near, "far": self.far}

    # ------------------------------------------------------------------ basics
    @property
    def device(self) -> torch.device:
        return self.R.device

    @property
    def dtype(self) -> torch.dtype:
        return self.R.dtype

    @property
    def height(self) -> int:
        return self.image_size[0]

    @property
    def width(self) -> int:
        return self.image_size[1]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Camera:
        return Camera(self.K, self.R, self.t, self.image_size, dtype=dtype or self.dtype, device=device or self.device,
                      **self.clip)

    def __repr__(self) -> str:
        k = self.intrinsics()
        return (
            f"Camera(image_size={self.image_size}, fx={k.fx:.3f}, fy={k.fy:.3f}, "
            f"cx={k.cx:.3f}, cy={k.cy:.3f}, center={self.center().tolist()}"
            + (f", near={self.near}, far={self.far})" if self.clips else ")")
        )

    @property
    def clips(self) -> bool:
        """Whether the clip range differs from the defaults (0, inf)."""
        return self.near != NO_CLIP_NEAR or self.far != NO_CLIP_FAR

    def state_dict(self) -> dict:
        """Plain-python form (lists: ``K``, ``R``, ``t``, ``image_size``; ``near`` / ``far``
        only when they are set, ``far`` None for no far limit), safe to JSON-encode."""
        d = {
            "K": self.K.double().cpu().tolist(),
            "R": self.R.double().cpu().tolist(),
            "t": self.t.double().cpu().tolist(),
            "image_size": list(self.image_size),
        }
        if self.clips:
            d["near"] = self.near
            d["far"] = None if self.far == NO_CLIP_FAR else self.far
        return d

    @classmethod
    def from_state_dict(cls, d: dict, **kwargs) -> Camera:
        far = d.get("far")
        return cls(d["K"], d["R"], d["t"], d["image_size"], near=d.get("near", NO_CLIP_NEAR),
                   far=NO_CLIP_FAR if far is None else far, **kwargs)

    # -------------------------------------------------------------- OpenCV I/O
    @classmethod
    def from_opencv(
        cls,
        K: ArrayLike,
        R: ArrayLike,
        t: ArrayLike,
        image_size: Sequence[int],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        **clip: float,
    ) -> Camera:
        """Build from OpenCV ``K`` (3x3), world-to-camera ``R`` (3x3) and ``t`` (3,) (the
        constructor; the name says which convention the numbers are in); ``clip``:
        ``near`` / ``far`` as in the constructor."""
        return cls(K, R, t, image_size, dtype=dtype, device=device, **clip)

    def intrinsics(self) -> OpenCVIntrinsics:
        """OpenCV intrinsics as Python floats."""
        K = self.K.double().cpu()
        return OpenCVIntrinsics(fx=float(K[0, 0]), fy=float(K[1, 1]), cx=float(K[0, 2]), cy=float(K[1, 2]),
                                width=self.width, height=self.height)

    def to_opencv(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """float64 numpy copies of ``K`` (3x3), ``R`` (3x3), ``t`` (3,)."""
        return self.K.double().cpu().numpy(), self.R.double().cpu().numpy(), self.t.double().cpu().numpy()

    # ----------------------------------------------------------- PyTorch3D I/O
    @classmethod
    def from_pytorch3d(
        cls,
        R: ArrayLike,
        T: ArrayLike,
        focal_ndc: ArrayLike,
        principal_ndc: ArrayLike = (0.0, 0.0),
        image_size: Sequence[int] = (256, 256),
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> Camera:
        """Build from a PyTorch3D ``PerspectiveCameras(in_ndc=True)``'s row-vector ``R``,
        ``T`` and NDC ``focal_ndc`` (a number or 2-vector), ``principal_ndc``."""
        R_p3d = _as64(R)
        T_p3d = _as64(T).reshape(-1)
        f = _as64(focal_ndc).reshape(-1)
        p = _as64(principal_ndc).reshape(-1)
        if R_p3d.shape != (3, 3) or T_p3d.shape != (3,):
            raise ValueError(f"R must be 3x3 and T a 3-vector, got {tuple(R_p3d.shape)} and {tuple(T_p3d.shape)}")
        if f.numel() == 1:
            f = f.repeat(2)
        if f.shape != (2,) or p.shape != (2,):
            raise ValueError("focal_ndc and principal_ndc must be 2-vectors")
        if not (torch.isfinite(f).all() and torch.isfinite(p).all()):
            raise ValueError(f"camera intrinsics have non-finite values: {f.tolist()}, {p.tolist()}")
        if (f <= 0).any():
            raise ValueError(f"focal length must be positive, got focal_ndc={f.tolist()}")
        h, w = _check_size(image_size)
        s = _ndc_scale(h, w)
        K = [[float(f[0]) * s, 0.0, (w - 1) / 2.0 - float(p[0]) * s],
             [0.0, float(f[1]) * s, (h - 1) / 2.0 - float(p[1]) * s], [0.0, 0.0, 1.0]]
        return cls(K, torch.diag(_FLIP) @ R_p3d.T, _FLIP * T_p3d, (h, w), dtype=dtype, device=device)

    def to_pytorch3d(self) -> dict[str, list]:
        """PyTorch3D ``R``, ``T``, ``focal_ndc``, ``principal_ndc`` and ``image_size`` (float64
        lists): the arguments of :meth:`from_pytorch3d`."""
        h, w = self.image_size
        s = _ndc_scale(h, w)
        k = self.intrinsics()
        return {
            "R": (torch.diag(_FLIP) @ self.R.double().cpu()).T.tolist(),
            "T": (_FLIP * self.t.double().cpu()).tolist(),
            "focal_ndc": [k.fx / s, k.fy / s],
            "principal_ndc": [((w - 1) / 2.0 - k.cx) / s, ((h - 1) / 2.0 - k.cy) / s],
            "image_size": [h, w],
        }

    # ---------------------------------------------------------------- geometry
    def center(self) -> torch.Tensor:
        """Camera centre in world coordinates (3,): solves ``R @ C + t = 0``."""
        return -(self.t @ self.R)

    def world_to_camera(self, points: torch.Tensor) -> torch.Tensor:
        """(N, 3) world points to OpenCV camera space, computed elementwise in a fixed
        order (the rasterizer's, see ``rasterizer.project_for_raster``)."""
        R = self.R.to(points.dtype)
        t = self.t.to(points.dtype)
        x, y, z = points[:, 0], points[:, 1], points[:, 2]
        rows = [x * R[i, 0] + y * R[i, 1] + z * R[i, 2] + t[i] for i in range(3)]
        return torch.stack(rows, dim=1)

    def project(self, points: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Project (N, 3) world points: OpenCV pixel coordinates (N, 2) and view depth (N,).

        Points at or behind the camera plane get non-finite or meaningless pixel
        coordinates; callers filter by ``depth``.
        """
        pts = torch.as_tensor(points)
        if pts.ndim != 2 or pts.shape[-1] != 3:
            raise ValueError(f"points must be (N, 3), got {tuple(pts.shape)}")
        if not pts.is_floating_point():
            pts = pts.float()
        pts = pts.to(self.device)
        cam = self.world_to_camera(pts)
        k = self.intrinsics()
        depth = cam[:, 2]
        u = (cam[:, 0] / depth) * k.fx + k.cx
        v = (cam[:, 1] / depth) * k.fy + k.cy
        return torch.stack([u, v], dim=1), depth

    def unproject_pixels(self, uv: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`project`: pixel coordinates (N, 2) and depth (N,) to world points."""
        k = self.intrinsics()
        xc = (uv[:, 0] - k.cx) / k.fx * depth
        yc = (uv[:, 1] - k.cy) / k.fy * depth
        cam = torch.stack([xc, yc, depth], dim=1).to(self.R.dtype)
        return (cam - self.t) @ self.R

    def view_directions(self, points: torch.Tensor) -> torch.Tensor:
        """Unit vectors from the camera centre to each point (N, 3)."""
        d = points - self.center().to(points.dtype)
        return d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)

    # ------------------------------------------------------------ derived cams
    def _with(self, K: np.ndarray, R: ArrayLike | None = None, t: ArrayLike | None = None,
              image_size: Sequence[int] | None = None) -> Camera:
        """This camera with other intrinsics (and pose / size), same dtype and device."""
        return Camera(K, self.R if R is None else R, self.t if t is None else t, image_size or self.image_size,
                      dtype=self.dtype, device=self.device, **self.clip)

    def scaled(self, scale: float | tuple[int, int]) -> Camera:
        """Camera of the same view at another resolution.

        ``scale`` is a factor (image ``int(scale*H) x int(scale*W)``, as in the
        rasterizer's pyramid) or an explicit ``(h, w)``. Pixel areas map exactly: full
        resolution pixel coordinate ``u`` becomes ``(u + 0.5) * w / W - 0.5``.
        """
        H, W = self.image_size
        if isinstance(scale, tuple | list):
            h, w = int(scale[0]), int(scale[1])
        else:
            if not scale > 0:
                raise ValueError(f"scale must be positive, got {scale}")
            h, w = int(scale * H), int(scale * W)
        h, w = _check_size((h, w))
        sx, sy = w / W, h / H
        k = self.intrinsics()
        K = np.array(
            [
                [k.fx * sx, 0.0, (k.cx + 0.5) * sx - 0.5],
                [0.0, k.fy * sy, (k.cy + 0.5) * sy - 0.5],
                [0.0, 0.0, 1.0],
            ]
        )
        return self._with(K, image_size=(h, w))

    def cropped(self, top: int, left: int, height: int, width: int) -> Camera:
        """Camera seeing the window ``[top, top+height) x [left, left+width)`` of this one's
        image (the window may extend beyond the image: padding)."""
        k = self.intrinsics()
        K = np.array([[k.fx, 0.0, k.cx - left], [0.0, k.fy, k.cy - top], [0.0, 0.0, 1.0]])
        return self._with(K, image_size=(height, width))

    def rotated_in_plane(self, angle: float, image_size: Sequence[int] | None = None) -> Camera:
        """Camera rolled by ``angle`` radians about its optical axis (the image content
        turns by ``-angle``), principal point moved to the centre of ``image_size``."""
        h, w = _check_size(image_size or self.image_size)
        k = self.intrinsics()
        c, s = math.cos(angle), math.sin(angle)
        roll = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
        _, R_cv, t_cv = self.to_opencv()
        # Principal point offset from the image centre turns with the image.
        ox, oy = k.cx - (self.width - 1) / 2.0, k.cy - (self.height - 1) / 2.0
        ox2, oy2 = c * ox - s * oy, s * ox + c * oy
        K = np.array(
            [[k.fx, 0.0, (w - 1) / 2.0 + ox2], [0.0, k.fy, (h - 1) / 2.0 + oy2], [0.0, 0.0, 1.0]]
        )
        return self._with(K, roll @ R_cv, roll @ t_cv, (h, w))

    @classmethod
    def look_at(
        cls,
        eye: ArrayLike,
        target: ArrayLike,
        up: ArrayLike = (0.0, 1.0, 0.0),
        fov_x_deg: float = 50.0,
        image_size: Sequence[int] = (256, 256),
        **kwargs,
    ) -> Camera:
        """Camera at ``eye`` looking at ``target`` with ``up`` roughly up in the image."""
        eye_ = _as64(eye).reshape(3)
        z = _as64(target).reshape(3) - eye_
        if float(z.norm()) == 0:
            raise ValueError("look_at: eye and target coincide")
        z = z / z.norm()
        up_ = _as64(up).reshape(3)
        x = torch.linalg.cross(z, up_)  # OpenCV x right = down x forward = forward x up
        if float(x.norm()) < 1e-9:
            raise ValueError("look_at: up is parallel to the viewing direction")
        x = x / x.norm()
        y = torch.linalg.cross(z, x)
        R_cv = torch.stack([x, y, z])
        t_cv = -R_cv @ eye_
        h, w = _check_size(image_size)
        fx = (w / 2.0) / math.tan(math.radians(fov_x_deg) / 2.0)
        K = [[fx, 0, (w - 1) / 2.0], [0, fx, (h - 1) / 2.0], [0, 0, 1]]
        return cls.from_opencv(K, R_cv, t_cv, (h, w), **kwargs)
