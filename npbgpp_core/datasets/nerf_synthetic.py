"""NeRF-Synthetic / Blender layout: ``transforms_{train,val,test}.json`` + RGBA PNGs.

Each json has ``camera_angle_x`` (horizontal field of view, radians) and ``frames`` with
``file_path`` (relative to the scene, extension optional) and ``transform_matrix``:
camera-to-world with OpenGL camera axes (x right, y up, z backward). Optional
instant-ngp style keys ``fl_x, fl_y, cx, cy, w, h`` (top level or per frame) override
the field of view; ``cx, cy`` there use the pixel-corner convention (image centre at
``w/2``), so the OpenCV principal point is ``cx - 0.5``. Without them the principal
point is the image centre and ``fy = fx``. A ``file_path`` that leaves the scene folder
(absolute, or ``..`` climbing out) is refused unless ``allow_external_paths=True``.

Splits are the json files: views are train frames, then val, then test, in file order
(0-99 / 100-199 / 200-399 for the published scenes). RGBA is composited over white
(``white_bg=True``) or black; the mask is the alpha channel.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from .common import (
    camera_from_opencv,
    check_options,
    check_rotation,
    finite_matrix,
    json_number,
    load_point_cloud,
    make_splits,
    path_in_root,
)
from .errors import DatasetError
from .images import has_alpha, image_size_of
from .scene_data import SceneData, View

SPLITS = ("train", "val", "test")
OPTIONS = ("white_bg", "pc_name", "require_points", "train_indices", "val_indices", "test_indices",
           "allow_external_paths")
DEFAULT_PC_NAMES = ("points3d.ply", "points3D.ply", "pointcloud.ply", "point_cloud.ply")
_OPENGL_TO_OPENCV = np.diag([1.0, -1.0, -1.0])


def read_transforms_json(path: str) -> dict:
    """The JSON object in ``path``; DatasetError naming it when it is missing, unreadable
    (also nesting too deep for Python's parser) or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError as exc:
        raise DatasetError(f"{path}: file not found") from exc
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise DatasetError(f"{path}: not readable JSON ({type(exc).__name__}: {exc})") from exc
    if not isinstance(meta, dict):
        raise DatasetError(f"{path}: expected a JSON object with a 'frames' list, got {type(meta).__name__}")
    return meta


def resolve_image(root: str, file_path: object, source: str, allow_external: bool = False) -> str:
    base = path_in_root(root, file_path, f"{source} file_path", allow_external)  # type: ignore[arg-type]
    if os.path.splitext(base)[1] and os.path.isfile(base):
        return base
    for ext in (".png", ".PNG", ".jpg", ".jpeg", ".exr"):
        if os.path.isfile(base + ext):
            return base + ext
    raise DatasetError(f"{source}: image for file_path {file_path!r} not found (tried {base}[.png|.jpg])")


def transforms_intrinsics(meta: dict, frame: dict, w: int, h: int, source: str) -> np.ndarray:
    """OpenCV K of one frame of a transforms json (keys of the frame win over the top
    level's) for a ``w`` x ``h`` image; DatasetError naming ``source`` and the key."""
    def get(key: str) -> float | None:
        val = frame.get(key, meta.get(key))
        return None if val is None else json_number(val, f"{source} {key}")

    def angle(key: str) -> float:
        val = get(key)
        assert val is not None
        if not (0.0 < val < math.pi):
            raise DatasetError(f"{source} {key}: {val} is not in (0, pi)")
        return val

    for key in ("w", "h"):
        val = get(key)
        if val is not None and val != (w if key == "w" else h):
            raise DatasetError(f"{source}: {key}={val:g} but the image is {w}x{h}")
    fl_x, fl_y = get("fl_x"), get("fl_y")
    if fl_x is None:
        if get("camera_angle_x") is None:
            raise DatasetError(f"{source}: neither camera_angle_x nor fl_x given")
        fl_x = 0.5 * w / math.tan(0.5 * angle("camera_angle_x"))
    if fl_y is None:
        use_angle_y = get("camera_angle_y") is not None and get("fl_x") is None
        fl_y = 0.5 * h / math.tan(0.5 * angle("camera_angle_y")) if use_angle_y else fl_x
    cx_in, cy_in = get("cx"), get("cy")
    cx = cx_in - 0.5 if cx_in is not None else (w - 1) / 2.0
    cy = cy_in - 0.5 if cy_in is not None else (h - 1) / 2.0
    K = np.array([[fl_x, 0.0, cx], [0.0, fl_y, cy], [0.0, 0.0, 1.0]])
    if not np.isfinite(K).all() or fl_x <= 0 or fl_y <= 0:
        raise DatasetError(f"{source}: bad intrinsics fl_x={fl_x}, fl_y={fl_y}, cx={cx}, cy={cy}")
    return K


def opencv_pose(transform_matrix: object, source: str) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV world-to-camera ``R, t`` of a camera-to-world ``transform_matrix`` with
    OpenGL camera axes (3x4 or 4x4; a 4x4's last row must be 0 0 0 1); DatasetError
    naming ``source`` for a non-finite, scaled, sheared or projective matrix."""
    c2w = finite_matrix(transform_matrix, [(4, 4), (3, 4)], source)
    if c2w.shape == (4, 4) and np.abs(c2w[3] - (0.0, 0.0, 0.0, 1.0)).max() > 1e-6:
        raise DatasetError(f"{source}: last row is {c2w[3].tolist()}, not [0, 0, 0, 1] (not a rigid transform)")
    check_rotation(c2w[:3, :3], source)
    R = (c2w[:3, :3] @ _OPENGL_TO_OPENCV).T
    return R, -R @ c2w[:3, 3]


def load_nerf_synthetic(root: str, **options) -> SceneData:
    check_options("nerf_synthetic", options, OPTIONS)
    white_bg = bool(options.get("white_bg", True))
    allow_external = bool(options.get("allow_external_paths", False))
    present = [s for s in SPLITS if os.path.isfile(os.path.join(root, f"transforms_{s}.json"))]
    if "train" not in present:
        raise DatasetError(f"{os.path.join(root, 'transforms_train.json')}: file not found")
    views: list[View] = []
    split_lists: dict[str, list[int]] = {s: [] for s in SPLITS}
    for split in present:
        path = os.path.join(root, f"transforms_{split}.json")
        meta = read_transforms_json(path)
        frames = meta.get("frames")
        if not isinstance(frames, list):
            raise DatasetError(f"{path}: no 'frames' list")
        for k, frame in enumerate(frames):
            source = f"{path} frames[{k}]"
            if not isinstance(frame, dict) or "file_path" not in frame or "transform_matrix" not in frame:
                raise DatasetError(f"{source}: needs 'file_path' and 'transform_matrix'")
            image_path = resolve_image(root, frame["file_path"], source, allow_external)
            h, w = image_size_of(image_path)
            R, t = opencv_pose(frame["transform_matrix"], f"{source} transform_matrix")
            K = transforms_intrinsics(meta, frame, w, h, source)
            cam = camera_from_opencv(K, R, t, (h, w), source)
            name = os.path.splitext(os.path.relpath(image_path, root))[0]
            split_lists[split].append(len(views))
            views.append(View(name, image_path, None, cam, mask_from_alpha=has_alpha(image_path)))
    if not views:
        raise DatasetError(f"{root}: the transforms files list no frames")
    train, val, test = make_splits(
        len(views),
        root,
        split_lists["val"],
        split_lists["test"],
        options.get("train_indices", split_lists["train"]),
        options.get("val_indices"),
        options.get("test_indices"),
    )
    points, colors, pc_path = load_point_cloud(
        root, options.get("pc_name"), DEFAULT_PC_NAMES, options.get("require_points", True)
    )
    return SceneData(
        name=os.path.basename(os.path.normpath(root)),
        root=root,
        format="nerf_synthetic",
        points=points,
        colors=colors,
        views=views,
        train=train,
        val=val,
        test=test,
        background=(1.0, 1.0, 1.0) if white_bg else (0.0, 0.0, 0.0),
        metadata={"point_cloud": pc_path},
    )
