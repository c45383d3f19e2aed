"""IDR-style ``cameras.npz`` (shared by DTU and H3DS): ``world_mat_i`` = P = K [R | t]
(3x4 or 4x4) and optional ``scale_mat_i`` (normalisation: world = scale_mat @ unit)."""

from __future__ import annotations

import os
import re
import zipfile

import numpy as np

from .common import decompose_projection, finite_matrix, read_npy
from .errors import DatasetError

_KEY = re.compile(r"^world_mat_(\d+)$")


def read_idr_cameras(
    path: str, use_scale_mat: bool
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray], np.ndarray | None]:
    """Per view K, R, t (OpenCV, world-to-camera). With ``use_scale_mat`` the cameras live
    in the normalised frame (P @ scale_mat) and ``scale_mat_0`` is returned so the caller
    can map points into it; otherwise the frame of ``world_mat`` (points as published)."""
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: camera file not found")
    try:
        archive = zipfile.ZipFile(path)
        members = {n[: -len(".npy")]: n for n in archive.namelist() if n.endswith(".npy")}
    except Exception as exc:  # noqa: BLE001 - zipfile raises many types (NotImplementedError for odd versions)
        raise DatasetError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from exc
    keys = list(members)

    def matrix(key: str) -> np.ndarray:
        source = f"{path} {key}"
        try:
            with archive.open(members[key]) as f:
                return read_npy(f, archive.getinfo(members[key]).file_size, source, max_elements=64)
        except DatasetError:
            raise
        except Exception as exc:  # noqa: BLE001 - zipfile / zlib / lzma errors, unsupported methods, encryption
            raise DatasetError(f"{source}: unreadable entry ({type(exc).__name__}: {exc})") from exc

    ids = sorted(int(m.group(1)) for k in keys if (m := _KEY.match(k)))
    if not ids:
        raise DatasetError(f"{path}: no world_mat_<i> entries (keys: {keys[:10]})")
    if ids != list(range(len(ids))):
        missing = sorted(set(range(max(ids) + 1)) - set(ids))
        raise DatasetError(f"{path}: world_mat indices are not 0..{len(ids) - 1} (missing {missing[:10]})")
    Ks, Rs, ts = [], [], []
    scale0 = None
    for i in ids:
        source = f"{path} world_mat_{i}"
        P = finite_matrix(matrix(f"world_mat_{i}"), [(3, 4), (4, 4)], source)[:3, :4]
        if use_scale_mat:
            key = f"scale_mat_{i}"
            if key not in keys:
                raise DatasetError(f"{path}: use_scale_mat=True but {key} is missing")
            S = finite_matrix(matrix(key), [(4, 4)], f"{path} {key}")
            if scale0 is None:
                scale0 = S
            elif not np.allclose(S, scale0):
                raise DatasetError(f"{path}: {key} differs from scale_mat_0 (one world frame is needed)")
            P = P @ S
        K, R, t = decompose_projection(P, source)
        Ks.append(K)
        Rs.append(R)
        ts.append(t)
    return Ks, Rs, ts, scale0
