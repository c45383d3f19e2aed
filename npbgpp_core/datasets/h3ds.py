"""H3DS: ``image/img_XXXX.jpg``, ``mask/mask_XXXX.png``, ``cameras.npz`` (IDR style).

View configurations (the published 3/4/8/16/32-view subsets) come from ``views_config``:
a list of view indices, or a path to a JSON file holding either such a list or a dict
mapping the view count (``"3"``, ``"8"``, ...) to lists, from which ``num_views`` picks.
With a configuration the selected views are the train (input) views and every other
view is test. Default (no configuration): all views train, none val/test.
Masks are matched to images by their number (``img_0007`` <-> ``mask_0007``).
"""

from __future__ import annotations

import json
import os
import re

from .common import check_options, listdir_images, load_point_cloud, make_splits
from .dtu import build_idr_views, idr_image_folders, to_normalized_frame
from .errors import DatasetError
from .scene_data import SceneData

DEFAULT_PC_NAMES = ("points3d.ply", "pointcloud.ply", "full.ply")
OPTIONS = (
    "pc_name", "require_points", "train_indices", "val_indices", "test_indices",
    "use_scale_mat", "average_intrinsics", "use_masks", "views_config", "num_views",
)
_NUM = re.compile(r"(\d+)")


def _number(name: str, source: str) -> int:
    m = _NUM.search(os.path.splitext(name)[0])
    if m is None:
        raise DatasetError(f"{source}: file name {name!r} carries no view number")
    return int(m.group(1))


def resolve_views_config(config, num_views: int | None, n: int, source: str) -> list[int] | None:
    """Turn a ``views_config`` option (list or JSON path) into a list of view indices."""
    if config is None:
        return None
    if isinstance(config, str | os.PathLike):
        path = os.fspath(config)
        if not os.path.isabs(path) and not os.path.isfile(path):
            path = os.path.join(source, path)
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise DatasetError(f"{path}: cannot read views configuration ({exc})") from exc
        source = path
    if isinstance(config, dict):
        if num_views is None:
            raise DatasetError(f"{source}: views configuration has keys {sorted(config)}; pass num_views=")
        key = str(num_views)
        if key not in config:
            raise DatasetError(f"{source}: no configuration for {num_views} views (has {sorted(config)})")
        config = config[key]
    if not isinstance(config, list | tuple) or not all(isinstance(i, int) for i in config):
        raise DatasetError(f"{source}: views configuration must be a list of integer view indices")
    bad = [i for i in config if not 0 <= i < n]
    if bad:
        raise DatasetError(f"{source}: views configuration indices {bad} out of range for {n} views")
    return list(config)


def load_h3ds(root: str, **options) -> SceneData:
    check_options("h3ds", options, OPTIONS)
    image_dir, mask_dir, images, use_masks = idr_image_folders(root, options)
    images.sort(key=lambda f: _number(f, os.path.join(image_dir, f)))
    masks = None
    if use_masks:
        by_number = {_number(f, os.path.join(mask_dir, f)): f for f in listdir_images(mask_dir)}
        numbers = [_number(f, image_dir) for f in images]
        missing = [n for n in numbers if n not in by_number]
        if missing:
            raise DatasetError(f"{mask_dir}: no mask for image number(s) {missing[:10]}")
        extra = sorted(set(by_number) - set(numbers))
        if extra:
            raise DatasetError(f"{mask_dir}: masks {[by_number[e] for e in extra[:10]]} have no image")
        masks = [by_number[n] for n in numbers]
    views, scale0 = build_idr_views(root, images, masks, image_dir, mask_dir, options)
    selected = resolve_views_config(options.get("views_config"), options.get("num_views"), len(views), root)
    train_opt = options.get("train_indices", selected)
    test_default = [i for i in range(len(views)) if selected is not None and i not in selected]
    train, val, test = make_splits(
        len(views), root, (), test_default, train_opt, options.get("val_indices"), options.get("test_indices")
    )
    points, colors, pc_path = load_point_cloud(
        root, options.get("pc_name"), DEFAULT_PC_NAMES, options.get("require_points", True)
    )
    return SceneData(
        name=os.path.basename(os.path.normpath(root)), root=root, format="h3ds",
        points=to_normalized_frame(points, scale0), colors=colors, views=views,
        train=train, val=val, test=test, background=None,
        metadata={"point_cloud": pc_path, "views_config": selected},
    )
