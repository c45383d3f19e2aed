"""``load_scene``: one entry point for every supported layout."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .errors import DatasetError
from .scene_data import SceneData


def load_scene(path: str | os.PathLike, format: str | None = None, *,
               if_accepted: Mapping[str, Any] | None = None, **options) -> SceneData:
    """Load the scene stored in folder ``path``.

    ``format`` is one of ``nerf_synthetic``, ``dtu``, ``scannet``, ``h3ds``, ``colmap``,
    ``nerfstudio`` (nerfstudio / instant-ngp ``transforms.json``), or None to detect it
    from the files. ``options`` go to that format's loader
    (``pc_name``, ``white_bg``, ``train_indices``/``val_indices``/``test_indices``,
    ``views_config``, ``undistort``, ... see each module's docstring); unknown options
    raise TypeError, and ``undistort=True`` for a format without lens distortion a
    DatasetError. ``if_accepted`` are options for the formats that take them, ignored by
    the others (settings shared by every format, as the add-on's Import Dataset's).
    """
    from . import colmap, dtu, h3ds, nerf_synthetic, nerfstudio, scannet
    from .detect import FORMATS, check_scene_folder, detect_format

    root = os.path.abspath(os.fspath(path))
    check_scene_folder(root)
    if format is None:
        format = detect_format(root)
    formats = {
        "nerf_synthetic": (nerf_synthetic.load_nerf_synthetic, nerf_synthetic.OPTIONS),
        "dtu": (dtu.load_dtu, dtu.OPTIONS),
        "scannet": (scannet.load_scannet, scannet.OPTIONS),
        "h3ds": (h3ds.load_h3ds, h3ds.OPTIONS),
        "colmap": (colmap.load_colmap, colmap.OPTIONS),
        "nerfstudio": (nerfstudio.load_nerfstudio, nerfstudio.OPTIONS),
    }
    if format not in formats:
        raise DatasetError(f"{root}: unknown format {format!r}; choose one of {list(FORMATS)}")
    loader, accepted = formats[format]
    if options.get("undistort") and "undistort" not in accepted:
        raise DatasetError(f"{root}: undistort=True applies to COLMAP and nerfstudio scenes only; this scene is "
                           f"{format}, whose images have no lens distortion to remove")
    return loader(root, **{**{k: v for k, v in (if_accepted or {}).items() if k in accepted}, **options})
