"""Read points and colours out of a Blender object (mesh or point cloud), world space."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

COLOR_NAMES = ("Col", "Color", "color", "Cd")
ID_ATTRIBUTE = "npbgpp_id"  # per point: its index in the bundle / dataset cloud it came from


def _color_attribute(data: Any) -> Any | None:
    attrs = data.attributes
    for name in COLOR_NAMES:
        a = attrs.get(name)
        if a is not None and a.domain == "POINT" and a.data_type in ("FLOAT_COLOR", "BYTE_COLOR"):
            return a
    for a in attrs:
        if a.domain == "POINT" and a.data_type in ("FLOAT_COLOR", "BYTE_COLOR"):
            return a
    return None


def object_points(obj: Any, world: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """(N, 3) float32 positions (world space when ``world``) and (N, 3) display-sRGB
    colours (or None) of an evaluated mesh or point cloud object."""
    pts = object_positions(obj, world)
    n = len(pts)
    colors = None
    attr = _color_attribute(obj.data)
    if attr is not None and n:
        rgba = np.empty(n * 4, dtype=np.float32)
        attr.data.foreach_get("color_srgb", rgba)
        colors = np.clip(rgba.reshape(n, 4)[:, :3], 0.0, 1.0)
    return pts, colors


def object_positions(obj: Any, world: bool = True) -> np.ndarray:
    """(N, 3) float32 positions (world space when ``world``) of an evaluated mesh or point
    cloud object, without reading its colours."""
    if obj.type not in ("MESH", "POINTCLOUD"):
        raise ValueError(f"object {obj.name!r} is a {obj.type.lower()}, not a mesh or point cloud")
    pos_attr = obj.data.attributes.get("position")
    n = len(pos_attr.data) if pos_attr is not None else 0
    pts = np.empty(n * 3, dtype=np.float32)
    if n:
        pos_attr.data.foreach_get("vector", pts)
    pts = pts.reshape(n, 3)
    if world and n:
        M = np.array(obj.matrix_world, dtype=np.float64)
        pts = (pts.astype(np.float64) @ M[:3, :3].T + M[:3, 3]).astype(np.float32)
    return np.ascontiguousarray(pts)


def point_ids(obj: Any) -> np.ndarray | None:
    """The stable point ids (``npbgpp_id``, int per point) of an evaluated mesh or point
    cloud, or None when it has none. Deleting points (edit mode, Delete Geometry) keeps the
    others' ids, so they still name the bundle's descriptors."""
    attr = obj.data.attributes.get(ID_ATTRIBUTE) if obj.type in ("MESH", "POINTCLOUD") else None
    if attr is None or attr.domain != "POINT" or attr.data_type != "INT":
        return None
    ids = np.empty(len(attr.data), dtype=np.int32)
    if len(ids):
        attr.data.foreach_get("value", ids)
    return ids.astype(np.int64)


def points_key(points: np.ndarray, colors: np.ndarray | None) -> str:
    """Content hash: the worker gets the points again only when they change."""
    h = hashlib.blake2b(digest_size=16)
    h.update(np.ascontiguousarray(points).tobytes())
    if colors is not None:
        h.update(np.ascontiguousarray(colors).tobytes())
    return h.hexdigest()
