"""Recognising a dataset format from the files in a scene folder."""

from __future__ import annotations

import os
import re

from .colmap import find_sparse_dir
from .errors import DatasetError

FORMATS = ("nerf_synthetic", "dtu", "scannet", "h3ds", "colmap", "nerfstudio")
_H3DS_NAME = re.compile(r"^img_\d+\.\w+$")


def check_scene_folder(root: str) -> None:
    """DatasetError unless ``root`` is a folder; a file inside a scene (transforms_train.json,
    cameras.npz, ...) is answered with its folder, which is what is meant."""
    if os.path.isfile(root):
        folder = os.path.dirname(os.path.abspath(root))
        raise DatasetError(f"{root}: is a file, not a scene folder (the scene folder holding it is "
                           f"{_colmap_scene_above(folder) or folder})")
    if not os.path.isdir(root):
        raise DatasetError(f"{root}: scene folder not found")


def _colmap_scene_above(folder: str) -> str | None:
    """The scene folder above ``folder`` when it is a COLMAP model folder (``sparse/`` or
    ``sparse/0/``, holding cameras.bin|txt), else None."""
    if not any(os.path.isfile(os.path.join(folder, f"cameras.{ext}")) for ext in ("bin", "txt")):
        return None
    up = os.path.dirname(os.path.normpath(folder))
    return os.path.dirname(up) if os.path.basename(up) == "sparse" else up


def detect_format(root: str) -> str:
    """Name of the format stored in ``root``; DatasetError when none or several match."""
    check_scene_folder(root)
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
    if os.path.isfile(os.path.join(root, "transforms.json")):
        found.append("nerfstudio")
    if not found:
        photos = os.path.isdir(os.path.join(root, "images")) and not any(
            os.path.isfile(os.path.join(root, f)) for f in ("intrinsics.npy", "extrinsics.npy"))  # not ScanNet
        hint = ("; photos in images/ without a COLMAP model: recover the cameras with `python -m headless_train "
                "capture-sfm` (headless_train/README.md)" if photos else "")
        up = _colmap_scene_above(root)
        if up:
            hint = f"; this is a COLMAP model folder: give the scene folder that holds images/ and sparse/ ({up}?)"
        elif os.path.isfile(os.path.join(root, "cameras.json")) and os.path.isdir(os.path.join(root, "point_cloud")):
            # 3DGS's cameras.json names photos it does not hold and no principal point: not a dataset
            hint = ("; this is a 3D Gaussian Splatting output (cameras.json, point_cloud/): give the COLMAP folder "
                    "it was trained from and name its point_cloud/iteration_<N>/point_cloud.ply as the cloud "
                    "(pc_name=, --pc-name, the add-on's Point Cloud), or import that file as points")
        raise DatasetError(
            f"{root}: no known dataset layout (looked for transforms_train.json, cameras.npz + image/, "
            f"intrinsics.npy + extrinsics.npy + images/, sparse/[0/]cameras.bin|txt, transforms.json){hint}; or name "
            "the format (format=, --format, the add-on's Format) to be told which of its files is missing"
        )
    if sorted(found) == ["colmap", "nerfstudio"]:
        raise DatasetError(
            f"{root}: holds both a COLMAP model ({find_sparse_dir(root)}) and a transforms.json (nerfstudio / "
            "instant-ngp); they usually place the same photos in different world frames (the converters re-orient "
            "and re-scale), so name the one to read: format='colmap' (its points3D) or format='nerfstudio' (its "
            "ply_file_path cloud) (--format, the add-on's Format)")
    if len(found) > 1:
        raise DatasetError(f"{root}: matches several layouts {found}; name the format to choose (format=, --format, "
                           "the add-on's Format)")
    return found[0]
