"""PLY point clouds: binary (either endianness) and ASCII, float or double coordinates,
uchar (0..255) or float (0..1) colours. Extra per-vertex float properties are kept."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np


@dataclass
class PointCloud:
    """Points ``(N, 3)`` float32, optional colours ``(N, 3)`` float32 in [0, 1] and
    extra named per-point float arrays."""

    points: np.ndarray
    colors: np.ndarray | None = None
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.points.shape[0])


_COLOR_NAMES = (("red", "green", "blue"), ("r", "g", "b"), ("diffuse_red", "diffuse_green", "diffuse_blue"))


def load_ply(path: str | os.PathLike) -> PointCloud:
    """Read the ``vertex`` element of a PLY file."""
    from plyfile import PlyData, PlyParseError

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"PLY file not found: {path}")
    try:
        ply = PlyData.read(path)
    except (PlyParseError, ValueError, EOFError, IndexError, KeyError) as exc:
        raise ValueError(f"{path}: not a readable PLY file ({type(exc).__name__}: {exc})") from exc
    except Exception as exc:  # plyfile raises a variety of errors on truncated data
        raise ValueError(f"{path}: not a readable PLY file ({type(exc).__name__}: {exc})") from exc
    if "vertex" not in [e.name for e in ply.elements]:
        raise ValueError(f"{path}: PLY file has no 'vertex' element")
    v = ply["vertex"].data
    names = v.dtype.names or ()
    missing = [c for c in "xyz" if c not in names]
    if missing:
        raise ValueError(f"{path}: vertex element lacks coordinate properties {missing}")
    pts = np.stack([np.asarray(v[c], dtype=np.float64) for c in "xyz"], axis=1).astype(np.float32)
    colors = None
    used = {"x", "y", "z"}
    for trio in _COLOR_NAMES:
        if all(c in names for c in trio):
            raw = np.stack([np.asarray(v[c]) for c in trio], axis=1)
            if np.issubdtype(raw.dtype, np.integer):
                colors = raw.astype(np.float64) / float(np.iinfo(raw.dtype).max)
            else:
                colors = raw.astype(np.float64)
            colors = np.clip(colors, 0.0, 1.0).astype(np.float32)
            used.update(trio)
            break
    extra = {}
    for n in names:
        if n not in used and n not in ("alpha",):
            arr = np.asarray(v[n])
            if arr.ndim == 1 and np.issubdtype(arr.dtype, np.number):
                extra[n] = arr.astype(np.float32)
    return PointCloud(pts, colors, extra)


def save_ply(
    path: str | os.PathLike,
    points: np.ndarray,
    colors: np.ndarray | None = None,
    extra: dict[str, np.ndarray] | None = None,
    binary: bool = True,
    color_dtype: str = "u1",
) -> None:
    """Write a PLY file. ``colors`` in [0, 1]; stored as uchar (``color_dtype='u1'``) or
    float (``'f4'``). Written to a temporary file and renamed, so a failure leaves no
    half-written file."""
    from plyfile import PlyData, PlyElement

    pts = np.asarray(points)
    if hasattr(points, "detach"):
        pts = points.detach().cpu().numpy()  # type: ignore[union-attr]
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError(f"points must be (N, 3), got {pts.shape}")
    n = pts.shape[0]
    fields: list[tuple[str, str]] = [("x", "f4"), ("y", "f4"), ("z", "f4")]
    if pts.dtype == np.float64:
        fields = [("x", "f8"), ("y", "f8"), ("z", "f8")]
    cols = None
    if colors is not None:
        cols = np.asarray(colors, dtype=np.float64)
        if cols.shape != (n, 3):
            raise ValueError(f"colors must be (N, 3) = ({n}, 3), got {cols.shape}")
        if color_dtype not in ("u1", "f4"):
            raise ValueError("color_dtype must be 'u1' or 'f4'")
        fields += [("red", color_dtype), ("green", color_dtype), ("blue", color_dtype)]
    extra = extra or {}
    for name, arr in extra.items():
        if np.asarray(arr).shape != (n,):
            raise ValueError(f"extra property {name!r} must have shape ({n},)")
        fields.append((name, "f4"))
    data = np.empty(n, dtype=fields)
    for i, c in enumerate("xyz"):
        data[c] = pts[:, i]
    if cols is not None:
        c01 = np.clip(cols, 0.0, 1.0)
        for i, c in enumerate(("red", "green", "blue")):
            data[c] = np.round(c01[:, i] * 255.0).astype(np.uint8) if color_dtype == "u1" else c01[:, i]
    for name, arr in extra.items():
        data[name] = np.asarray(arr, dtype=np.float32)
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        PlyData([PlyElement.describe(data, "vertex")], text=not binary).write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
