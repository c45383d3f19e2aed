"""Read points and colours out of a Blender object (mesh or point cloud), world space."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

COLOR_NAMES = ("Col", "Color", "color", "Cd")
ID_ATTRIBUTE = "npbgpp_id"  # per point: its index in the bundle / dataset cloud it came from
# Object custom property: the add-on made or imported this object as a point object (Points from
# Selected Meshes, PLY / bundle / dataset import, Densify): it stands for the scene's cloud, not
# scene content, so Export Dataset leaves it out of its photos and points3d.ply.
POINT_OBJECT_MARK = "npbgpp_point_object"
# The name Points from Selected Meshes has given its object from the first version on (Blender
# adds ".001" and so on to a second one).
SAMPLED_POINTS_NAME = "NPBG++ Points"
# The attributes the add-on's point objects hold: Blender's own of a point cloud made by Convert
# of a vertex-only mesh, the add-on's colour (importers.COLOR_ATTRIBUTE) and point ids.
_POINT_OBJECT_ATTRIBUTES = {"position", "radius", "Col", ID_ATTRIBUTE}


def unmarked_point_object(obj: Any) -> bool:
    """Whether ``obj`` is a point object an older add-on made, before :data:`POINT_OBJECT_MARK`
    existed, by the structure every version gave it (``git log -S make_point_object``): a point
    cloud, or a mesh of vertices only where Convert failed, holding no attribute the add-on did
    not write, and either its points' ids (:data:`ID_ATTRIBUTE`: bundle and dataset imports,
    Aggregate, Densify; a name no one else writes) or Points from Selected Meshes' name
    (:data:`SAMPLED_POINTS_NAME`, ".NNN" allowed). Imported PLY files gave no such sign (the
    object takes the file's name; a PLY the user converted looks the same), so those are not
    recognised: the scene's Point Object is left out anyway, and any other can be marked by hand."""
    data = obj.data
    if obj.type == "MESH":
        if data is None or len(data.edges) or len(data.polygons):
            return False
    elif obj.type != "POINTCLOUD" or data is None:
        return False
    names = {a.name for a in data.attributes if not a.name.startswith(".")}  # "." names are Blender's own
    if not names <= _POINT_OBJECT_ATTRIBUTES:
        return False
    stem, dot, number = obj.name.rpartition(".")
    sampled = obj.name == SAMPLED_POINTS_NAME or (dot and number.isdigit() and stem == SAMPLED_POINTS_NAME)
    return ID_ATTRIBUTE in names or bool(sampled)


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


class _Parts(list):
    """Data blocks of an evaluated geometry set, which must outlive them (its mesh and
    point cloud are freed with it)."""

    geometry: Any = None


def point_components(obj: Any) -> list[Any]:
    """The data blocks holding ``obj``'s points, with points: for an evaluated object its
    evaluated geometry's mesh and point cloud (a mesh whose Geometry Nodes turn it into
    points, e.g. Mesh to Points or Distribute Points on Faces, keeps an empty mesh as its
    data and its points in the point cloud component), else its own data."""
    if obj.type not in ("MESH", "POINTCLOUD"):
        raise ValueError(f"object {obj.name!r} is a {obj.type.lower()}, not a mesh or point cloud")
    if not (getattr(obj, "is_evaluated", False) and hasattr(obj, "evaluated_geometry")):  # Blender < 4.4
        return [obj.data]
    geometry = obj.evaluated_geometry()
    parts = _Parts(part for part in (geometry.mesh, geometry.pointcloud) if part is not None and _count(part))
    parts.geometry = geometry
    return parts if parts else [obj.data]


def _count(data: Any) -> int:
    pos_attr = data.attributes.get("position")
    return len(pos_attr.data) if pos_attr is not None else 0


def object_points(obj: Any, world: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """(N, 3) float32 positions (world space when ``world``) and (N, 3) display-sRGB
    colours (or None when some part of its geometry has none) of an evaluated mesh or
    point cloud object (every part of its :func:`point_components`)."""
    components = point_components(obj)  # once: each call evaluates the object's geometry set
    pts = _positions(obj, components, world)
    colors = []
    for data in components:
        n = _count(data)
        attr = _color_attribute(data)
        if attr is None:
            return pts, None
        rgba = np.empty(n * 4, dtype=np.float32)
        if n:
            attr.data.foreach_get("color_srgb", rgba)
        colors.append(np.clip(rgba.reshape(n, 4)[:, :3], 0.0, 1.0))
    return pts, (np.concatenate(colors) if len(pts) else None)


def object_positions(obj: Any, world: bool = True) -> np.ndarray:
    """(N, 3) float32 positions (world space when ``world``) of an evaluated mesh or point
    cloud object (every part of its :func:`point_components`), without its colours."""
    return _positions(obj, point_components(obj), world)


def _positions(obj: Any, components: list[Any], world: bool) -> np.ndarray:
    """The positions of ``obj``'s point ``components``, in world space when ``world``."""
    parts = []
    for data in components:
        n = _count(data)
        part = np.empty(n * 3, dtype=np.float32)
        if n:
            data.attributes["position"].data.foreach_get("vector", part)
        parts.append(part.reshape(n, 3))
    pts = np.concatenate(parts)
    if world and len(pts):
        M = np.array(obj.matrix_world, dtype=np.float64)
        pts = (pts.astype(np.float64) @ M[:3, :3].T + M[:3, 3]).astype(np.float32)
    return np.ascontiguousarray(pts)


def point_ids(obj: Any) -> np.ndarray | None:
    """The stable point ids (``npbgpp_id``, int per point) of an evaluated mesh or point
    cloud (the parts of its :func:`point_components` that have them), or None when it has
    none. Deleting points (edit mode, Delete Geometry) keeps the others' ids, so they still
    name the bundle's descriptors."""
    if obj.type not in ("MESH", "POINTCLOUD"):
        return None
    found = []
    for data in point_components(obj):
        attr = data.attributes.get(ID_ATTRIBUTE)
        if attr is None or attr.domain != "POINT" or attr.data_type != "INT":
            continue
        ids = np.empty(len(attr.data), dtype=np.int32)
        if len(ids):
            attr.data.foreach_get("value", ids)
        found.append(ids.astype(np.int64))
    return np.concatenate(found) if found else None


def points_key(points: np.ndarray, colors: np.ndarray | None) -> str:
    """Content hash: the worker gets the points again only when they change."""
    h = hashlib.blake2b(digest_size=16)
    h.update(np.ascontiguousarray(points).tobytes())
    if colors is not None:
        h.update(np.ascontiguousarray(colors).tobytes())
    return h.hexdigest()
