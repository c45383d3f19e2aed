"""``load_scene``: one entry point for every supported layout."""

from __future__ import annotations

import os

from .errors import DatasetError
from .scene_data import SceneData


def load_scene(path: str | os.PathLike, format: str | None = None, **options) -> SceneData:
    """Load the scene stored in folder ``path``.

    ``format`` is one of ``nerf_synthetic``, ``dtu``, ``scannet``, ``h3ds``, ``colmap``,
    or None to detect it from the files. ``options`` go to that format's loader
    (``pc_name``, ``white_bg``, ``train_indices``/``val_indices``/``test_indices``,
    ``views_config``, ``undistort``, ... see each module's docstring); unknown options
    raise TypeError.
    """
    from .colmap import load_colmap
    from .detect import FORMATS, detect_format
    from .dtu import load_dtu
    from .h3ds import load_h3ds
    from .nerf_synthetic import load_nerf_synthetic
    from .scannet import load_scannet

    root = os.path.abspath(os.fspath(path))
    if not os.path.isdir(root):
        raise DatasetError(f"{root}: scene folder not found")
    if format is None:
        format = detect_format(root)
    loaders = {
        "nerf_synthetic": load_nerf_synthetic,
        "dtu": load_dtu,
        "scannet": load_scannet,
        "h3ds": load_h3ds,
        "colmap": load_colmap,
    }
    if format not in loaders:
        raise DatasetError(f"{root}: unknown format {format!r}; choose one of {list(FORMATS)}")
    return loaders[format](root, **options)
