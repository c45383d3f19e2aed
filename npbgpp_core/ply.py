"""PLY point clouds: binary (either endianness) and ASCII, float or double coordinates,
uchar (0..255) or float (0..1) colours. Extra per-vertex float properties are kept.

Gaussian-splat files (the 3D Gaussian Splatting layout: ``x, y, z, f_dc_0..2, opacity,
scale_*, rot_*, f_rest_*``) are read as point clouds: each Gaussian's centre becomes a
point, its colour is the degree-0 spherical-harmonics term ``0.5 + C0 * f_dc`` clamped to
[0, 1], and its opacity (stored as a logit) is ``sigmoid(opacity)``. The ``f_dc_*`` trio
makes a file a splat file; some exporters drop ``opacity``, whose splats are then all
opaque (opacity 1: a minimum opacity filters nothing). Only the header is needed to tell
the two apart (:func:`is_splat_header`), so Blender-side code can decide without plyfile."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .memory import is_out_of_memory

log = logging.getLogger(__name__)


@dataclass
class PointCloud:
    """Points ``(N, 3)`` float32, optional colours ``(N, 3)`` float32 in [0, 1] and
    extra named per-point float arrays."""

    points: np.ndarray
    colors: np.ndarray | None = None
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    is_splat: bool = False

    def __len__(self) -> int:
        return int(self.points.shape[0])


_COLOR_NAMES = (("red", "green", "blue"), ("r", "g", "b"), ("diffuse_red", "diffuse_green", "diffuse_blue"))
_SCALAR_NAMES = {"x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", *(c for trio in _COLOR_NAMES for c in trio)}

# Degree-0 real spherical harmonic, 1 / (2 sqrt(pi)): 3DGS stores colour as its coefficient.
SH_C0 = 0.28209479177387814
# What makes a vertex element a splat; "opacity" is read when present (exporters may drop it).
SPLAT_PROPERTIES = ("f_dc_0", "f_dc_1", "f_dc_2")
# Splats less opaque than this are left out of a splat file read as a scene's cloud
# (load_scene_cloud: a dataset's pc_name, the add-on's Point Cloud and Dataset Points, a training
# corpus's variants and packed clouds) and by the add-on's PLY import (its Min
# Opacity default): one rule, so the points Import Dataset shows are the ones Aggregate uses,
# and a 3DGS result's near-transparent floaters do not become opaque points.
SCENE_MIN_OPACITY = 0.1


def ply_vertex_properties(path: str | os.PathLike) -> list[str]:
    """Names of the ``vertex`` element's properties, from the header alone (no plyfile,
    so the add-on can call it inside Blender). Raises ValueError on a file that is not a
    PLY file or has no vertex element."""
    return [name for name, _ in ply_vertex_header(path)]


# PLY scalar types with integer values, and the largest value of each (what colour 1.0 is)
_INTEGER_MAX = {"char": 127, "int8": 127, "uchar": 255, "uint8": 255, "short": 32767, "int16": 32767,
                "ushort": 65535, "uint16": 65535, "int": 2**31 - 1, "int32": 2**31 - 1,
                "uint": 2**32 - 1, "uint32": 2**32 - 1}


def color_properties(header: list[tuple[str, str]]) -> tuple[tuple[str, str, str], float] | None:
    """The colour properties :func:`load_ply` reads from a vertex ``header`` (``(name, type)``
    pairs, :func:`ply_vertex_header`), the first trio of ``red/green/blue``, ``r/g/b``,
    ``diffuse_red/...`` present, and the divisor that maps their values to [0, 1] (the
    integer type's largest value, 1 for floats); None without colours."""
    types = dict(header)
    trio = _color_trio(types)
    return None if trio is None else (trio, float(_INTEGER_MAX.get(types[trio[0]], 1)))


def _color_trio(names: Any) -> tuple[str, str, str] | None:
    """The first of the colour name trios (``_COLOR_NAMES``) all of whose names are in ``names``."""
    return next((trio for trio in _COLOR_NAMES if all(c in names for c in trio)), None)


def _ply_header(path: str) -> list[list[str]]:
    """The words of each header line of PLY file ``path`` between the magic line and
    ``end_header`` (blank lines left out), read without plyfile; ValueError for a file
    that is not PLY or whose header does not end."""
    lines: list[list[str]] = []
    with open(path, "rb") as f:
        if f.readline().strip() != b"ply":
            raise ValueError(f"{path}: not a PLY file (no 'ply' magic line)")
        for _ in range(100_000):
            line = f.readline()
            if not line:
                raise ValueError(f"{path}: PLY header has no end_header line")
            words = line.decode("ascii", "replace").split()
            if not words:
                continue
            if words[0] == "end_header":
                return lines
            lines.append(words)
    raise ValueError(f"{path}: PLY header too long")


# Bytes of one value of each PLY scalar type in a binary file (a list's length counts as its type's).
_TYPE_BYTES = {"char": 1, "uchar": 1, "int8": 1, "uint8": 1, "short": 2, "ushort": 2, "int16": 2, "uint16": 2,
               "int": 4, "uint": 4, "int32": 4, "uint32": 4, "float": 4, "float32": 4, "double": 8, "float64": 8}


def _overcounted(path: str) -> str:
    """Why the header of PLY file ``path`` counts more rows than the file can hold, "" when it
    can (or the header does not tell): plyfile allocates the counted rows before reading an
    ASCII file or a binary one with list properties, so such a damaged header runs it out of
    memory, which must not read as a cloud too big for this computer. The least a row takes:
    2 bytes a value in ASCII (a digit and a separator), its type's bytes in binary (a list:
    its length's, for an empty list)."""
    try:
        header = _ply_header(path)
    except ValueError:
        return ""
    text = any(words[:2] == ["format", "ascii"] for words in header)
    counts: list[str] = []
    count = fewest = 0
    for words in header:
        if words[0] == "element" and len(words) >= 3:
            if not words[2].isdigit():
                return ""
            count = int(words[2])
            counts.append(f"{count:,} {words[1]}")
        elif words[0] == "property" and len(words) >= 3:
            kind = words[2] if words[1] == "list" else words[1]
            fewest += count * (2 if text else _TYPE_BYTES.get(kind, 1))
    size = os.path.getsize(path)
    if fewest <= size:
        return ""
    return (f"its header counts {', '.join(counts)}, at least {fewest:,} bytes of data, but the file has {size:,} "
            "bytes; fix the element counts in the header")


def ply_vertex_header(path: str | os.PathLike) -> list[tuple[str, str]]:
    """``(name, type)`` of the ``vertex`` element's properties (type ``list`` for list
    properties), from the header alone, as :func:`ply_vertex_properties`."""
    path = os.fspath(path)
    names: list[tuple[str, str]] = []
    in_vertex = False
    seen_vertex = False
    for words in _ply_header(path):
        if words[0] == "element":
            in_vertex = len(words) > 1 and words[1] == "vertex"
            seen_vertex |= in_vertex
        elif words[0] == "property" and in_vertex and len(words) >= 3:
            names.append((words[-1], words[1]))
    if not seen_vertex:
        raise ValueError(f"{path}: PLY file has no 'vertex' element")
    return names


def ply_element_counts(path: str | os.PathLike) -> dict[str, int]:
    """``{element name: count}`` of a PLY file's elements (``vertex``, ``face``, ...), in
    header order, from the header alone (no plyfile: the add-on calls it in Blender).
    ValueError as :func:`ply_vertex_header`, and for a count that is not a number."""
    path = os.fspath(path)
    counts: dict[str, int] = {}
    for words in _ply_header(path):
        if words[0] == "element" and len(words) >= 3:
            try:
                counts[words[1]] = int(words[2])
            except ValueError:
                raise ValueError(f"{path}: PLY element {words[1]!r} has count {words[2]!r}, not a number") from None
    return counts


def ignored_elements_note(counts: dict[str, int]) -> str:
    """What of a PLY file a point import leaves out, from :func:`ply_element_counts`: its
    elements other than ``vertex`` that hold something ("2 faces ignored", "3 faces, 1 edge
    ignored"); "" when there are none. A point cloud's points are its vertices (a fused.ply
    with faces, a scanned mesh): every reader here takes the vertex element alone."""
    parts = []
    for name, count in counts.items():
        if name == "vertex" or count <= 0:
            continue
        plural = "" if count == 1 else "s"
        parts.append(f"{count} {name}{plural}" if name in ("face", "edge") else f"{count} '{name}' element{plural}")
    return f"{', '.join(parts)} ignored" if parts else ""


def is_splat_header(names: list[str] | tuple[str, ...]) -> bool:
    """Whether vertex property ``names`` follow the Gaussian-splat layout (the ``f_dc_*``
    colour trio; ``opacity`` may be missing)."""
    return all(n in names for n in SPLAT_PROPERTIES)


def splat_colors(f_dc: np.ndarray) -> np.ndarray:
    """``(N, 3)`` SH DC coefficients -> RGB in [0, 1] (the colour seen from every side)."""
    return np.clip(0.5 + SH_C0 * np.asarray(f_dc, dtype=np.float64), 0.0, 1.0).astype(np.float32)


def no_opacity_note(path: str, min_opacity: float) -> str:
    """What a splat file without ``opacity`` means for a ``min_opacity`` filter (> 0), the
    same words in the core reader's log and the add-on's import report."""
    return (f"{path}: this Gaussian-splat file has no opacity property: every splat is kept as opaque, "
            f"min opacity {min_opacity:g} has nothing to filter")


def splat_opacity(logit: np.ndarray) -> np.ndarray:
    """Stored opacity logits -> opacity in (0, 1)."""
    x = np.asarray(logit, dtype=np.float64)
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32)  # sigmoid without overflow


def splat_keep(logits: np.ndarray | None, count: int, min_opacity: float) -> tuple[np.ndarray, np.ndarray]:
    """The opacity of ``count`` splats and the mask of those ``min_opacity`` keeps: the one
    rule for :func:`load_ply` and the add-on's import. ``logits`` are the stored
    ``opacity`` values, None when the file has none (some exporters drop it): then every
    splat counts as opaque (opacity 1) and is kept."""
    opacity = np.ones(count, np.float32) if logits is None else splat_opacity(logits)
    return opacity, opacity >= float(min_opacity)


def load_ply(path: str | os.PathLike, min_opacity: float = 0.0) -> PointCloud:
    """Read the ``vertex`` element of a PLY file.

    A Gaussian-splat file gives its centres and DC colours, ``extra={'opacity': ...}``
    (in [0, 1]) and ``is_splat=True``; splats with opacity below ``min_opacity`` are
    dropped (ValueError if none is left). One without an ``opacity`` property keeps every
    splat with opacity 1 (logged when ``min_opacity`` > 0). ``min_opacity`` has no effect
    on other files.
    """
    if not 0.0 <= float(min_opacity) <= 1.0:
        raise ValueError(f"min_opacity must lie in [0, 1], got {min_opacity}")
    from plyfile import PlyData, PlyParseError

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"PLY file not found: {path}")
    try:
        ply = PlyData.read(path)
    except (PlyParseError, ValueError, EOFError, IndexError, KeyError) as exc:
        raise ValueError(f"{path}: not a readable PLY file ({type(exc).__name__}: {exc})") from exc
    except Exception as exc:  # plyfile raises a variety of errors on truncated data
        if is_out_of_memory(exc):  # a cloud too big for this computer is not a bad file
            damage = _overcounted(path)  # but a header counting rows the file cannot hold is one
            if not damage:
                raise
            raise ValueError(f"{path}: not a readable PLY file ({damage})") from exc
        raise ValueError(f"{path}: not a readable PLY file ({type(exc).__name__}: {exc})") from exc
    if "vertex" not in [e.name for e in ply.elements]:
        raise ValueError(f"{path}: PLY file has no 'vertex' element")
    check_ply_layout(path, ply)
    v = ply["vertex"].data
    names = v.dtype.names or ()
    missing = [c for c in "xyz" if c not in names]
    if missing:
        raise ValueError(f"{path}: vertex element lacks coordinate properties {missing}")
    pts64 = np.stack([np.asarray(v[c], dtype=np.float64) for c in "xyz"], axis=1)
    with np.errstate(over="ignore"):
        pts = pts64.astype(np.float32)
    if is_splat_header(names):
        opacity, keep = splat_keep(v["opacity"] if "opacity" in names else None, len(pts), min_opacity)
        if "opacity" not in names and float(min_opacity) > 0.0:
            log.warning(no_opacity_note(path, float(min_opacity)))
        if len(pts) and not keep.any():
            raise ValueError(f"{path}: no splat has opacity >= {min_opacity} (max {float(opacity.max()):.3g})")
        finite_points(pts, pts64, path, only=keep)  # a dropped splat's coordinates do not matter
        f_dc = np.stack([np.asarray(v[f"f_dc_{i}"]) for i in range(3)], axis=1)
        finite_colors(f_dc.astype(np.float64), path, ("f_dc_0", "f_dc_1", "f_dc_2"))
        return PointCloud(pts[keep], splat_colors(f_dc[keep]), {"opacity": opacity[keep]}, is_splat=True)
    finite_points(pts, pts64, path)
    colors = None
    used = {"x", "y", "z"}
    trio = _color_trio(names)
    if trio is not None:
        raw = np.stack([np.asarray(v[c]) for c in trio], axis=1)
        if np.issubdtype(raw.dtype, np.integer):
            colors = raw.astype(np.float64) / float(np.iinfo(raw.dtype).max)
        else:
            colors = finite_colors(raw.astype(np.float64), path, trio)
        colors = np.clip(colors, 0.0, 1.0).astype(np.float32)
        used.update(trio)
    extra = {}
    for n in names:
        if n not in used and n not in ("alpha",):
            arr = np.asarray(v[n])
            if arr.ndim == 1 and np.issubdtype(arr.dtype, np.number):
                extra[n] = arr.astype(np.float32)
    return PointCloud(pts, colors, extra)


def load_scene_cloud(path: str | os.PathLike) -> PointCloud:
    """A PLY file read as a scene's cloud: a dataset's cloud (``pc_name``, a nerfstudio
    ``ply_file_path``), the add-on's Dataset Points, a training corpus's ``points/<kind>.ply``
    variants. The one reading of them, so a Gaussian-splat file gives the same splats (opacity
    >= :data:`SCENE_MIN_OPACITY`) wherever it is a scene's cloud."""
    return load_ply(path, min_opacity=SCENE_MIN_OPACITY)


def finite_points(points: np.ndarray, read: np.ndarray, path: str, only: np.ndarray | None = None) -> None:
    """ValueError naming the file, how many vertices and the first one when a coordinate
    is NaN or infinite, or finite in the file (``read``) but beyond float32's range. The
    same rule as the dataset loaders' (``datasets.common.check_points``) and the colours':
    refused, not dropped, so that a cloud's point indices (bundles, ``npbgpp_id``) never
    shift silently. ``only``: a mask of the vertices that count (splats kept by opacity);
    vertices are numbered as in the file either way."""
    bad = ~np.isfinite(points).all(axis=1)
    if only is not None:
        bad &= only
    if bad.any():
        overflow = int((bad & np.isfinite(read).all(axis=1)).sum())
        why = f" ({overflow} of them beyond float32's range)" if overflow else ""
        raise ValueError(f"{path}: {int(bad.sum())} of {len(points)} vertices have non-finite (NaN or infinite) "
                         f"coordinates{why} (first at vertex {int(np.argmax(bad))}): remove them from the file")


def finite_colors(colors: np.ndarray, path: str, names: tuple[str, ...]) -> np.ndarray:
    """``colors`` unchanged, or ValueError naming the file and properties when a value is
    NaN or infinite (clipping would silently turn NaN into a colour)."""
    bad = ~np.isfinite(colors).all(axis=1)
    if bad.any():
        raise ValueError(f"{path}: {int(bad.sum())} vertices have non-finite (NaN or infinite) colour values in "
                         f"properties {', '.join(names)} (first at vertex {int(np.argmax(bad))})")
    return colors


def check_ply_layout(path: str, ply: Any) -> None:
    """Refuse what plyfile reads without complaint but would be read wrongly: a coordinate
    or colour declared as a list property, and data beyond what the header counts (a
    header that undercounts its vertices would otherwise drop the rest silently)."""
    from plyfile import PlyListProperty

    vertex = ply["vertex"]
    for prop in vertex.properties:
        if isinstance(prop, PlyListProperty) and prop.name in _SCALAR_NAMES:
            raise ValueError(f"{path}: vertex property {prop.name!r} is declared as a list; it must be a scalar")
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    end = head.find(b"end_header")
    newline = head.find(b"\n", end) if end >= 0 else -1
    if newline < 0:
        return
    start = newline + 1
    counts = ", ".join(f"{e.count} {e.name}" for e in ply.elements)
    if ply.text:
        with open(path, "rb") as f:
            f.seek(start)
            lines = sum(1 for line in f if line.strip())
        expected = sum(e.count for e in ply.elements)
        if lines > expected:
            raise ValueError(f"{path}: the header counts {counts} ({expected} data lines) but the file has "
                             f"{lines} data lines; fix the element count in the header")
        return
    if any(isinstance(p, PlyListProperty) for e in ply.elements for p in e.properties):
        return  # variable-length records: the size cannot be predicted from the header
    record = [sum(np.dtype(p.val_dtype).itemsize for p in e.properties) for e in ply.elements]
    expected = sum(e.count * r for e, r in zip(ply.elements, record, strict=True))
    extra = os.path.getsize(path) - start - expected
    smallest = min((r for r in record if r > 0), default=0)
    if smallest and extra >= smallest:
        raise ValueError(f"{path}: the header counts {counts} ({expected} bytes of data) but the file holds "
                         f"{extra} more bytes (at least {extra // smallest} more records); fix the element "
                         "count in the header")


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
        finite_colors(cols, os.fspath(path), ("colors",))  # NaN would become an arbitrary uchar
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
