"""``load_scene``: one entry point for every supported layout."""

from __future__ import annotations

import os
from collections.abc import Callable

from .errors import DatasetError
from .scene_data import SceneData


def _formats() -> dict[str, tuple[Callable[..., SceneData], tuple[str, ...]]]:
    """Each format's loader and the options it takes."""
    from . import colmap, dtu, h3ds, nerf_synthetic, nerfstudio, scannet

    return {
        "nerf_synthetic": (nerf_synthetic.load_nerf_synthetic, nerf_synthetic.OPTIONS),
        "dtu": (dtu.load_dtu, dtu.OPTIONS),
        "scannet": (scannet.load_scannet, scannet.OPTIONS),
        "h3ds": (h3ds.load_h3ds, h3ds.OPTIONS),
        "colmap": (colmap.load_colmap, colmap.OPTIONS),
        "nerfstudio": (nerfstudio.load_nerfstudio, nerfstudio.OPTIONS),
    }


def own_cloud_file(path: str | os.PathLike, format: str | None = None, **options) -> str | None:
    """The cloud file the scene in folder ``path`` is read with when no ``pc_name`` names
    one (the format's default names or only ``.ply``, nerfstudio's ``ply_file_path``,
    COLMAP's ``points3D``), found by the loader's own rules without reading the cloud or
    the cameras; None when there is none or the loader could not tell (several ``.ply``).
    ``format`` and ``options`` as for :func:`load_scene` (``pc_name`` is ignored).

    Found here, not recorded by the loaders: their ``metadata["point_cloud"]`` is the file
    they read, the chosen one when ``pc_name`` names one, and the callers (densify's
    ``check_not_the_own_cloud``) need the default cloud exactly then, when no loader looks it up."""
    from . import colmap, common, dtu, h3ds, nerf_synthetic, nerfstudio, scannet
    from .detect import FORMATS, check_scene_folder, detect_format

    root = os.path.abspath(os.fspath(path))
    check_scene_folder(root)
    format = format or detect_format(root)
    by_default_names = {"nerf_synthetic": nerf_synthetic.DEFAULT_PC_NAMES, "dtu": dtu.DEFAULT_PC_NAMES,
                        "h3ds": h3ds.DEFAULT_PC_NAMES, "scannet": scannet.DEFAULT_PC_NAMES}
    if format in by_default_names:  # load_point_cloud's rules, as these loaders read it
        return common.find_point_cloud(root, None, by_default_names[format], require_points=False)
    if format == "colmap":
        return colmap.own_cloud_file(root, **options)
    if format == "nerfstudio":
        return nerfstudio.own_cloud_file(root, **options)
    raise DatasetError(f"{root}: unknown format {format!r}; choose one of {list(FORMATS)}")


def format_options(format: str) -> tuple[str, ...]:
    """The options :func:`load_scene` takes for ``format``, so that a caller with settings
    shared by every format (the add-on's Import Dataset: Undistort, Allow External Paths)
    passes each only where it applies. DatasetError for an unknown format."""
    from .detect import FORMATS

    formats = _formats()
    if format not in formats:
        raise DatasetError(f"unknown dataset format {format!r}; choose one of {list(FORMATS)}")
    return formats[format][1]


def load_scene(path: str | os.PathLike, format: str | None = None, **options) -> SceneData:
    """Load the scene stored in folder ``path``.

    ``format`` is one of ``nerf_synthetic``, ``dtu``, ``scannet``, ``h3ds``, ``colmap``,
    ``nerfstudio`` (nerfstudio / instant-ngp ``transforms.json``), or None to detect it
    from the files. ``options`` go to that format's loader
    (``pc_name``, ``white_bg``, ``train_indices``/``val_indices``/``test_indices``,
    ``views_config``, ``undistort``, ... see each module's docstring and
    :func:`format_options`); unknown options raise TypeError, and ``undistort=True`` for a
    format without lens distortion a DatasetError.
    """
    from .detect import FORMATS, check_scene_folder, detect_format

    root = os.path.abspath(os.fspath(path))
    check_scene_folder(root)
    named = format is not None
    if format is None:
        format = detect_format(root)
    formats = _formats()
    if format not in formats:
        raise DatasetError(f"{root}: unknown format {format!r}; choose one of {list(FORMATS)}")
    loader, accepted = formats[format]
    if options.get("undistort") and "undistort" not in accepted:
        raise DatasetError(f"{root}: undistort=True applies to COLMAP and nerfstudio scenes only; this scene is "
                           f"{format}, whose images have no lens distortion to remove")
    try:
        return loader(root, **options)
    except DatasetError as exc:
        layout = _other_layout(root, format) if named else None
        if layout is None:
            raise
        # a named format's missing file ("image folder not found") hid that the folder is another layout
        raise DatasetError(f"{exc} (the folder holds a {layout} scene, not {format}: name that format, or none to "
                           "detect it)") from exc


def _other_layout(root: str, format: str) -> str | None:
    """The format :func:`detect_format` finds in ``root`` when it is one other than ``format``, else None."""
    from .detect import detect_format

    try:
        found = detect_format(root)
    except DatasetError:
        return None
    return found if found != format else None
