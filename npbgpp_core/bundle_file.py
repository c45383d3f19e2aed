"""The framing of NeuralScene files (safetensors: an 8-byte length, a JSON header, then
the tensors' bytes) and their points read without torch: the add-on checks a bundle
against a point object in Blender's own Python, which may have no torch, and needs only
the header and the points, not the weights. :mod:`npbgpp_core.scene` reads whole files."""

from __future__ import annotations

import json
import os
import struct
from typing import Any, BinaryIO

import numpy as np

from .file_kind import KIND_NAMES, file_kind
from .memory import is_out_of_memory
from .pretrained import FORMAT_NAME as WEIGHTS_FORMAT_NAME  # torch-free at import, as this module

FORMAT_NAME = "npbgpp-neural-scene"
FORMAT_VERSION = 1
_MAX_HEADER = 100_000_000
_FLOATS = {"F16": "<f2", "F32": "<f4", "F64": "<f8"}


def read_header(f: BinaryIO, size: int, path: str) -> tuple[dict[str, Any], int]:
    """``(header, data_start)`` of a file of ``size`` bytes open at its start: the JSON header
    (tensor entries and ``__metadata__``, checked to be an object) and where the tensors'
    bytes begin. ValueError naming ``path`` for bad framing."""
    if size < 8:
        raise ValueError(f"{path}: corrupt or truncated neural scene file ({size} bytes)")
    head = f.read(8)
    (n,) = struct.unpack("<Q", head)
    if n > size - 8 or n > _MAX_HEADER:
        kind = file_kind(head)  # a file picked by mistake is named, not called corrupt
        if kind in ("zip", "pickle"):
            raise ValueError(f"{path}: not an NPBG++ neural scene file: it is {KIND_NAMES[kind]} "
                             "(python -m headless_train export makes a bundle of one)")
        if kind == "ply":
            raise ValueError(f"{path}: not an NPBG++ neural scene file: it is {KIND_NAMES[kind]}")
        raise ValueError(f"{path}: corrupt or truncated neural scene file (header of {n} bytes, file {size})")
    try:
        header = json.loads(f.read(n).decode("utf-8"))
    except Exception as exc:  # noqa: BLE001
        if is_out_of_memory(exc):  # a header this file holds, too big for this computer: not a bad file
            raise
        raise ValueError(f"{path}: corrupt neural scene file (unreadable header: {exc})") from exc
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: not an NPBG++ neural scene file (no metadata)")
    return header, 8 + n


def check_format(meta: dict[str, Any], path: str) -> None:
    """ValueError unless the header's metadata names this format and version."""
    if meta.get("format") == WEIGHTS_FORMAT_NAME:
        raise ValueError(f"{path}: not an NPBG++ neural scene file: it is an NPBG++ weights file (a network "
                         "without a scene; aggregating a dataset with it makes a bundle)")
    if meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{path}: not an NPBG++ neural scene file (format {meta.get('format')!r})")
    version = meta.get("format_version")
    if version != str(FORMAT_VERSION):
        raise ValueError(
            f"{path}: mismatched bundle version: the file has format version {version}, "
            f"this code reads version {FORMAT_VERSION}"
        )


def point_count(path: str | os.PathLike) -> int:
    """The number of points a NeuralScene file holds, from its header alone (the out-of-memory
    advice names it for a bundle too big to load). ValueError naming the file when the header
    does not say."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        header = read_header(f, os.path.getsize(path), path)[0]
    entry = header.get("points")
    shape = entry.get("shape") if isinstance(entry, dict) else None
    if not (isinstance(shape, list) and len(shape) == 2 and isinstance(shape[0], int) and shape[0] >= 0):
        raise ValueError(f"{path}: neural scene file has no (N, 3) 'points' tensor")
    return shape[0]


def read_points(path: str | os.PathLike) -> np.ndarray:
    """The (N, 3) float32 points of a NeuralScene file, reading only its header and the
    ``points`` tensor. ValueError naming the file for a foreign, damaged or non-finite one."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        header, start = read_header(f, size, path)
        check_format(header["__metadata__"], path)
        entry = header.get("points")
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: neural scene file lacks tensors ['points']")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or (dtype not in _FLOATS and dtype != "BF16"):
            raise ValueError(f"{path}: points are {dtype!r}, not floats")
        if not (isinstance(shape, list) and len(shape) == 2 and shape[1] == 3 and isinstance(shape[0], int)
                and shape[0] >= 0):
            raise ValueError(f"{path}: points have shape {shape}, not (N, 3)")
        width = 2 if dtype == "BF16" else np.dtype(_FLOATS[dtype]).itemsize
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] and offsets[1] - offsets[0] == shape[0] * 3 * width
                and start + offsets[1] <= size):
            raise ValueError(f"{path}: corrupt or truncated neural scene file (points at {offsets}, file {size})")
        f.seek(start + offsets[0])
        raw = f.read(offsets[1] - offsets[0])
    if dtype == "BF16":  # the upper half of a float32
        pts = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        pts = np.frombuffer(raw, _FLOATS[dtype])
    pts = pts.astype(np.float32).reshape(-1, 3)
    if not np.isfinite(pts).all():
        raise ValueError(f"{path}: points hold NaN or infinite values; the bundle is damaged")
    return pts
