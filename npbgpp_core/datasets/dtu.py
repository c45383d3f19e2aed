"""DTU in the IDR layout: ``image/*.png``, ``mask/*.png`` (optional), ``cameras.npz``.

Cameras: ``world_mat_i`` decomposed into K, R, t (RQ decomposition); per-view K by
default, ``average_intrinsics=True`` averages K over views as the published loader does.
``use_scale_mat=True`` expresses cameras *and points* in IDR's normalised frame.
Splits (published): val [5, 15, 25, 35, 45], test/holdout [7, 12, ..., 47], train the
rest; override with ``train_indices``/``val_indices``/``test_indices``.
Point cloud: ``pc_name`` or the first of ``points3d.ply``, ``pointcloud.ply``,
``full.ply``, else the only ``*.ply`` in the scan folder.
"""

from __future__ import annotations

import os

import numpy as np

from .common import camera_from_opencv, check_options, listdir_images, load_point_cloud, make_splits
from .errors import DatasetError
from .idr import read_idr_cameras
from .images import image_size_of
from .scene_data import SceneData, View

DTU_VAL = (5, 15, 25, 35, 45)
DTU_TEST = (7, 12, 17, 22, 27, 32, 37, 42, 47)
DEFAULT_PC_NAMES = ("points3d.ply", "pointcloud.ply", "full.ply")
OPTIONS = (
    "pc_name", "require_points", "train_indices", "val_indices", "test_indices",
    "use_scale_mat", "average_intrinsics", "use_masks",
)


def idr_image_folders(root: str, options: dict) -> tuple[str, str, list[str], bool]:
    """The IDR layout's ``image/`` and ``mask/`` folders, the image file names (at least
    one, else DatasetError) and whether masks are to be read (``use_masks`` and a mask/)."""
    image_dir = os.path.join(root, "image")
    mask_dir = os.path.join(root, "mask")
    images = listdir_images(image_dir)
    if not images:
        raise DatasetError(f"{image_dir}: no images")
    return image_dir, mask_dir, images, bool(options.get("use_masks", True)) and os.path.isdir(mask_dir)


def build_idr_views(
    root: str,
    image_names: list[str],
    mask_names: list[str] | None,
    image_dir: str,
    mask_dir: str,
    options: dict,
) -> tuple[list[View], np.ndarray | None]:
    cam_path = os.path.join(root, "cameras.npz")
    Ks, Rs, ts, scale0 = read_idr_cameras(cam_path, bool(options.get("use_scale_mat", False)))
    if len(Ks) != len(image_names):
        raise DatasetError(
            f"{cam_path}: {len(Ks)} cameras but {len(image_names)} images in {image_dir}"
        )
    if mask_names is not None and len(mask_names) != len(image_names):
        raise DatasetError(f"{mask_dir}: {len(mask_names)} masks but {len(image_names)} images in {image_dir}")
    if options.get("average_intrinsics", False):
        K_mean = np.mean(Ks, axis=0)
        Ks = [K_mean] * len(Ks)
    views = []
    for i, name in enumerate(image_names):
        image_path = os.path.join(image_dir, name)
        size = image_size_of(image_path)
        mask_path = None
        if mask_names is not None:
            mask_path = os.path.join(mask_dir, mask_names[i])
            msize = image_size_of(mask_path)
            if msize != size:
                raise DatasetError(
                    f"{mask_path}: mask is {msize[1]}x{msize[0]} but {image_path} is {size[1]}x{size[0]}"
                )
        cam = camera_from_opencv(Ks[i], Rs[i], ts[i], size, f"{cam_path} world_mat_{i}")
        views.append(View(os.path.splitext(name)[0], image_path, mask_path, cam))
    return views, scale0


def to_normalized_frame(points: np.ndarray, scale0: np.ndarray | None) -> np.ndarray:
    """Map points from the world_mat frame into the scale_mat frame (x_unit = S^-1 x)."""
    if scale0 is None:
        return points
    S_inv = np.linalg.inv(scale0)
    p = points.astype(np.float64) @ S_inv[:3, :3].T + S_inv[:3, 3]
    return p.astype(np.float32)


def load_dtu(root: str, **options) -> SceneData:
    check_options("dtu", options, OPTIONS)
    image_dir, mask_dir, images, use_masks = idr_image_folders(root, options)
    masks = listdir_images(mask_dir) if use_masks else None
    views, scale0 = build_idr_views(root, images, masks, image_dir, mask_dir, options)
    train, val, test = make_splits(
        len(views), root, DTU_VAL, DTU_TEST,
        options.get("train_indices"), options.get("val_indices"), options.get("test_indices"),
    )
    points, colors, pc_path = load_point_cloud(
        root, options.get("pc_name"), DEFAULT_PC_NAMES, options.get("require_points", True)
    )
    return SceneData(
        name=os.path.basename(os.path.normpath(root)), root=root, format="dtu",
        points=to_normalized_frame(points, scale0), colors=colors, views=views,
        train=train, val=val, test=test, background=None, metadata={"point_cloud": pc_path},
    )
