"""Recognising a dataset format from the files in a scene folder."""

from __future__ import annotations

import os
import re

from .colmap import find_sparse_dir
from .errors import DatasetError

FORMATS = ("nerf_synthetic", "dtu", "scannet", "h3ds", "colmap")
_H3DS_NAME = re.compile(r"^img_\d+\.\w+$")


def detect_format(root: str) -> str:
    """Name of the format stored in ``root``; DatasetError when none or several match."""
    if not os.path.isdir(root):
        raise DatasetError(f"{root}: scene folder not found")
    found = []
    if os.path.isfile(os.path.join(root, "transforms_train.json")):
        found.append("nerf_synthetic")
    if os.path.isfile(os.path.join(root, "cameras.npz")) and os.path.isdir(os.path.join(root, "image")):
        names = [f for f in os.listdir(os.path.join(root, "image")) if not f.startswith(".")]
        found.append("h3ds" if names and all(_H3DS_NAME.match(f) for f in names) else "dtu")
    if all(os.path.isfile(os.path.join(root, f)) for f in ("intrinsics.npy", "extrinsics.npy")) and os.path.isdir(
        os.path.join(root, "images")
    ):
        found.append("scannet")
    if find_sparse_dir(root) is not None:
        found.append("colmap")
    if not found:
        photos = os.path.isdir(os.path.join(root, "images")) and not any(
            os.path.isfile(os.path.join(root, f)) for f in ("intrinsics.npy", "extrinsics.npy"))  # not ScanNet
        hint = ("; photos in images/ without a COLMAP model: recover the cameras with `python -m headless_train "
                "capture-sfm` (headless_train/README.md)" if photos else "")
        raise DatasetError(
            f"{root}: no known dataset layout (looked for transforms_train.json, cameras.npz + image/, "
            f"intrinsics.npy + extrinsics.npy + images/, sparse/[0/]cameras.bin|txt){hint}; or name the format "
            "(format=, --format, the add-on's Format) to be told which of its files is missing"
        )
    if len(found) > 1:
        raise DatasetError(f"{root}: matches several layouts {found}; name the format to choose (format=, --format, "
                           "the add-on's Format)")
    return found[0]
