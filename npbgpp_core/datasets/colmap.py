"""COLMAP sparse models: ``<scene>/sparse/`` or ``<scene>/sparse/0/`` holding
``cameras``, ``images`` and ``points3D`` as ``.bin`` or ``.txt``; photos in
``<scene>/images/`` (``images_dir=`` to change).

COLMAP's pixel convention puts the centre of the top-left pixel at (0.5, 0.5); ours puts
it at (0, 0), so the principal point becomes ``cx - 0.5, cy - 0.5``.
Supported models: PINHOLE, SIMPLE_PINHOLE, and (with distortion) SIMPLE_RADIAL and
OPENCV. Distorted cameras are refused unless ``undistort=True``, which remaps each image
on load to the widest pinhole camera whose every pixel sees the photo (same size, pose and
principal point, a scaled focal length: ``distortion.undistorted_camera``), which becomes
the view's camera. Other models
(RADIAL, fisheye, ...) raise an error naming the model. Views are sorted by image name;
default split: every 8th view (0, 8, 16, ...) is test (``holdout_every=0`` disables).
Image names that leave the images folder are refused unless ``allow_external_paths=True``.
Text files must be UTF-8 (COLMAP writes them so).
"""

from __future__ import annotations

import os
import struct

import numpy as np

from .common import (
    PC_NAME_OPTIONS,
    check_options,
    check_points,
    load_point_cloud,
    make_splits,
    path_in_root,
)
from .distortion import view_cameras
from .errors import DatasetError
from .images import image_size_of
from .scene_data import Distortion, SceneData, View

# model id -> (name, number of params), from COLMAP's camera model list.
CAMERA_MODELS = {
    0: ("SIMPLE_PINHOLE", 3),
    1: ("PINHOLE", 4),
    2: ("SIMPLE_RADIAL", 4),
    3: ("RADIAL", 5),
    4: ("OPENCV", 8),
    5: ("OPENCV_FISHEYE", 8),
    6: ("FULL_OPENCV", 12),
    7: ("FOV", 5),
    8: ("SIMPLE_RADIAL_FISHEYE", 4),
    9: ("RADIAL_FISHEYE", 5),
    10: ("THIN_PRISM_FISHEYE", 12),
    11: ("RAD_TAN_THIN_PRISM_FISHEYE", 16),
}
MODEL_PARAMS = {name: n for name, n in CAMERA_MODELS.values()}
SUPPORTED = ("SIMPLE_PINHOLE", "PINHOLE", "SIMPLE_RADIAL", "OPENCV")
OPTIONS = (
    "pc_name", "require_points", "train_indices", "val_indices", "test_indices",
    "images_dir", "undistort", "holdout_every", "allow_external_paths",
)


class _Reader:
    """Bounds-checked little-endian reader for COLMAP .bin files."""

    def __init__(self, path: str) -> None:
        self.path = path
        with open(path, "rb") as f:
            self.data = f.read()
        self.pos = 0

    def read(self, fmt: str) -> tuple:
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.data):
            raise DatasetError(f"{self.path}: file is truncated (at byte {self.pos}, need {size} more)")
        out = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += size
        return out

    def skip(self, size: int) -> None:
        if self.pos + size > len(self.data):
            raise DatasetError(f"{self.path}: file is truncated (at byte {self.pos}, need {size} more)")
        self.pos += size

    def read_cstring(self) -> str:
        end = self.data.find(b"\0", self.pos)
        if end < 0:
            raise DatasetError(f"{self.path}: unterminated image name at byte {self.pos}")
        s = self.data[self.pos:end].decode("utf-8", errors="replace")
        self.pos = end + 1
        return s

    def finish(self) -> None:
        if self.pos != len(self.data):
            raise DatasetError(f"{self.path}: {len(self.data) - self.pos} unexpected trailing bytes")


def _read_cameras_bin(path: str) -> dict[int, tuple[str, int, int, tuple[float, ...]]]:
    r = _Reader(path)
    (n,) = r.read("Q")
    cams = {}
    for _ in range(n):
        cam_id, model_id, width, height = r.read("iiQQ")
        if model_id not in CAMERA_MODELS:
            raise DatasetError(f"{path}: camera {cam_id} has unknown model id {model_id}")
        name, k = CAMERA_MODELS[model_id]
        cams[cam_id] = (name, int(width), int(height), r.read("d" * k))
    r.finish()
    return cams


def _read_images_bin(path: str) -> dict[int, tuple[np.ndarray, np.ndarray, int, str]]:
    r = _Reader(path)
    (n,) = r.read("Q")
    images = {}
    for _ in range(n):
        (image_id,) = r.read("i")
        q = np.array(r.read("dddd"))
        t = np.array(r.read("ddd"))
        (cam_id,) = r.read("i")
        name = r.read_cstring()
        (n2d,) = r.read("Q")
        r.skip(24 * n2d)  # (x, y, point3D_id) per 2D point: not needed
        images[image_id] = (q, t, cam_id, name)
    r.finish()
    return images


def _read_points_bin(path: str) -> tuple[np.ndarray, np.ndarray]:
    r = _Reader(path)
    (n,) = r.read("Q")
    record = struct.Struct("<QdddBBBdQ")  # id, xyz, rgb, error, track length
    data, pos, size = r.data, r.pos, len(r.data)
    if n > (size - pos) // record.size:  # checked before allocating n rows
        raise DatasetError(f"{path}: header claims {n} points but the file holds at most "
                           f"{(size - pos) // record.size} ({size} bytes)")
    pts = np.empty((n, 3), np.float64)
    cols = np.empty((n, 3), np.float64)
    for i in range(n):
        if pos + record.size > size:
            raise DatasetError(f"{path}: file is truncated (point {i} of {n})")
        _, x, y, z, cr, cg, cb, _, track = record.unpack_from(data, pos)
        pts[i] = (x, y, z)
        cols[i] = (cr, cg, cb)
        pos += record.size + 8 * track  # (image_id, point2D_idx) int32 pairs: not needed
    if pos > size:
        raise DatasetError(f"{path}: file is truncated (last point's track)")
    r.pos = pos
    r.finish()
    return pts, cols / 255.0


def _text_lines(path: str) -> list[tuple[int, list[str]]]:
    out = []
    with open(path, "rb") as f:
        for no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DatasetError(f"{path}:{no}: not UTF-8 text (byte {raw[exc.start]:#04x} at column "
                                   f"{exc.start + 1}); re-save the file as UTF-8") from exc
            s = line.strip()
            if s.startswith("#"):
                continue
            out.append((no, s.split()))
    return out


def _read_cameras_txt(path: str) -> dict[int, tuple[str, int, int, tuple[float, ...]]]:
    cams = {}
    for no, tok in _text_lines(path):
        if not tok:
            continue
        try:
            cam_id, model, width, height = int(tok[0]), tok[1], int(tok[2]), int(tok[3])
            params = tuple(float(x) for x in tok[4:])
        except (ValueError, IndexError) as exc:
            raise DatasetError(f"{path}:{no}: malformed camera line ({exc})") from exc
        if model not in MODEL_PARAMS:
            raise DatasetError(f"{path}:{no}: unknown camera model {model!r}")
        if len(params) != MODEL_PARAMS[model]:
            raise DatasetError(f"{path}:{no}: {model} needs {MODEL_PARAMS[model]} params, got {len(params)}")
        cams[cam_id] = (model, width, height, params)
    return cams


def _read_images_txt(path: str) -> dict[int, tuple[np.ndarray, np.ndarray, int, str]]:
    images = {}
    lines = _text_lines(path)
    # Image lines alternate with POINTS2D lines (which may be empty).
    k = 0
    while k < len(lines):
        no, tok = lines[k]
        if not tok:
            k += 1
            continue
        try:
            image_id = int(tok[0])
            q = np.array([float(x) for x in tok[1:5]])
            t = np.array([float(x) for x in tok[5:8]])
            cam_id = int(tok[8])
            name = " ".join(tok[9:])
        except (ValueError, IndexError) as exc:
            raise DatasetError(f"{path}:{no}: malformed image line ({exc})") from exc
        if not name or q.shape != (4,) or t.shape != (3,):
            raise DatasetError(f"{path}:{no}: malformed image line")
        images[image_id] = (q, t, cam_id, name)
        k += 2  # skip the POINTS2D line
    return images


def _read_points_txt(path: str) -> tuple[np.ndarray, np.ndarray]:
    pts, cols = [], []
    for no, tok in _text_lines(path):
        if not tok:
            continue
        if len(tok) < 7:
            raise DatasetError(f"{path}:{no}: malformed point line (needs POINT3D_ID X Y Z R G B ...)")
        try:
            pts.append([float(x) for x in tok[1:4]])
            cols.append([int(x) for x in tok[4:7]])
        except (ValueError, IndexError) as exc:
            raise DatasetError(f"{path}:{no}: malformed point line ({exc})") from exc
    return np.asarray(pts, np.float64).reshape(-1, 3), np.asarray(cols, np.float64).reshape(-1, 3) / 255.0


def quaternion_to_rotation(q: np.ndarray) -> np.ndarray:
    """Rotation matrix of a (w, x, y, z) quaternion (normalised first)."""
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])


def rotation_to_quaternion(R: np.ndarray) -> np.ndarray:
    """(w, x, y, z) unit quaternion of a rotation matrix, w >= 0 (inverse of
    :func:`quaternion_to_rotation`); Shepperd's branch on the largest component."""
    R = np.asarray(R, dtype=np.float64)
    tr = R[0, 0] + R[1, 1] + R[2, 2]
    cands = np.array([1 + tr, 1 + R[0, 0] - R[1, 1] - R[2, 2], 1 - R[0, 0] + R[1, 1] - R[2, 2],
                      1 - R[0, 0] - R[1, 1] + R[2, 2]])
    k = int(np.argmax(cands))
    s = 2.0 * np.sqrt(cands[k])
    if k == 0:
        q = [s / 4, (R[2, 1] - R[1, 2]) / s, (R[0, 2] - R[2, 0]) / s, (R[1, 0] - R[0, 1]) / s]
    elif k == 1:
        q = [(R[2, 1] - R[1, 2]) / s, s / 4, (R[0, 1] + R[1, 0]) / s, (R[0, 2] + R[2, 0]) / s]
    elif k == 2:
        q = [(R[0, 2] - R[2, 0]) / s, (R[0, 1] + R[1, 0]) / s, s / 4, (R[1, 2] + R[2, 1]) / s]
    else:
        q = [(R[1, 0] - R[0, 1]) / s, (R[0, 2] + R[2, 0]) / s, (R[1, 2] + R[2, 1]) / s, s / 4]
    q = np.asarray(q)
    q /= np.linalg.norm(q)
    return -q if q[0] < 0 else q


def find_sparse_dir(root: str) -> str | None:
    for d in (os.path.join(root, "sparse", "0"), os.path.join(root, "sparse")):
        if _model_file(d, "cameras") is not None:
            return d
    return None


def own_cloud_file(root: str, **options) -> str | None:
    """The file of the model's own points (``points3D.bin``, else ``.txt``, as
    :func:`_read_model` picks it), which :func:`load_colmap` reads when no ``pc_name``
    names a cloud; found without reading it (None when there is none). ``options``: the
    loader's, none of which moves it."""
    sparse = find_sparse_dir(root)
    return None if sparse is None else _model_file(sparse, "points3D")


def _model_file(sparse: str, stem: str) -> str | None:
    """The model file ``stem`` in ``sparse``: ``stem.bin``, else ``stem.txt``, else None."""
    return next((p for p in (os.path.join(sparse, f"{stem}.{e}") for e in ("bin", "txt")) if os.path.isfile(p)), None)


def _read_model(sparse: str):
    out = []
    for stem, rb, rt in (
        ("cameras", _read_cameras_bin, _read_cameras_txt),
        ("images", _read_images_bin, _read_images_txt),
        ("points3D", _read_points_bin, _read_points_txt),
    ):
        path = _model_file(sparse, stem)
        if path is not None:
            out.append(rb(path) if path.endswith(".bin") else rt(path))
        elif stem == "points3D":
            out.append(None)
        else:
            raise DatasetError(f"{sparse}: {stem}.bin / {stem}.txt not found")
    return out


def _intrinsics(model: str, params: tuple[float, ...], cam_id: int, source: str, undistort: bool):
    if model not in SUPPORTED:
        raise DatasetError(
            f"{source}: camera {cam_id} uses COLMAP model {model}, which is not supported "
            f"(supported: {', '.join(SUPPORTED)}). Undistort with COLMAP first: colmap image_undistorter "
            "--image_path images --input_path sparse/0 --output_path undistorted --output_type COLMAP"
        )
    if model == "SIMPLE_PINHOLE":
        f, cx, cy = params
        fx, fy, dist = f, f, Distortion()
    elif model == "PINHOLE":
        fx, fy, cx, cy = params
        dist = Distortion()
    elif model == "SIMPLE_RADIAL":
        f, cx, cy, k = params
        fx, fy, dist = f, f, Distortion(k1=k)
    else:
        fx, fy, cx, cy, k1, k2, p1, p2 = params
        dist = Distortion(k1, k2, p1, p2)
    if not dist.is_identity() and not undistort:
        raise DatasetError(
            f"{source}: camera {cam_id} ({model}) has lens distortion {params[-4 if model == 'OPENCV' else -1:]}; "
            "pass undistort=True (densify / headless_train export: --undistort; training: "
            "+datasets.options.undistort=true; the add-on's Undistort) to remap images on load, or undistort "
            "once with `python -m headless_train prepare-capture` or COLMAP: colmap image_undistorter "
            "--image_path images --input_path sparse/0 --output_path undistorted --output_type COLMAP"
        )
    K = np.array([[fx, 0.0, cx - 0.5], [0.0, fy, cy - 0.5], [0.0, 0.0, 1.0]])
    return K, (None if dist.is_identity() else dist)


def load_colmap(root: str, **options) -> SceneData:
    check_options("colmap", options, OPTIONS)
    sparse = find_sparse_dir(root)
    if sparse is None:
        raise DatasetError(f"{root}: no sparse/cameras.(bin|txt) or sparse/0/cameras.(bin|txt)")
    cams, images, points = _read_model(sparse)
    if not images:
        raise DatasetError(f"{sparse}: images file lists no images")
    image_dir = os.path.join(root, options.get("images_dir", "images"))
    if not os.path.isdir(image_dir):
        raise DatasetError(f"{image_dir}: image folder not found")
    undistort = bool(options.get("undistort", False))
    allow_external = bool(options.get("allow_external_paths", False))
    views = []
    for image_id, (q, t, cam_id, name) in sorted(images.items(), key=lambda kv: kv[1][3]):
        source = f"{sparse} image {image_id} ({name})"
        if cam_id not in cams:
            raise DatasetError(f"{source}: refers to camera {cam_id}, not in cameras file")
        model, width, height, params = cams[cam_id]
        if not (np.isfinite(q).all() and np.isfinite(t).all() and np.isfinite(params).all()):
            raise DatasetError(f"{source}: non-finite pose or camera parameters")
        if width < 1 or height < 1:
            raise DatasetError(f"{sparse} cameras: camera {cam_id} has size {width}x{height}")
        if np.linalg.norm(q) < 1e-12:
            raise DatasetError(f"{source}: zero quaternion")
        K, dist = _intrinsics(model, params, cam_id, f"{sparse} cameras", undistort)
        path = path_in_root(image_dir, name, source, allow_external)
        size = image_size_of(path)
        if abs(size[1] / width - size[0] / height) > 0.01:
            raise DatasetError(f"{path}: image is {size[1]}x{size[0]} but camera {cam_id} is {width}x{height}")
        cam, view_cam = view_cameras(K, dist, quaternion_to_rotation(q), t, (height, width), size, source,
                                     f"{sparse} cameras: camera {cam_id} ({model})")
        if dist is None:
            views.append(View(os.path.splitext(name)[0], path, None, cam))
            continue
        views.append(View(os.path.splitext(name)[0], path, None, view_cam, distortion=dist, source_camera=cam))
    every = int(options.get("holdout_every", 8) or 0)
    train, val, test = make_splits(
        len(views), root, (), list(range(0, len(views), every)) if every > 0 else [],
        options.get("train_indices"), options.get("val_indices"), options.get("test_indices"),
    )
    require = options.get("require_points", True)
    # the model's own points, kept to check a chosen cloud against (datasets.cloud_fit)
    model_points = None if points is None or len(points[0]) == 0 else np.asarray(points[0], np.float32)
    if options.get("pc_name") is not None:
        pts, cols, pc_path = load_point_cloud(root, options["pc_name"], (), require)
    elif points is None or len(points[0]) == 0:
        if require:
            raise DatasetError(f"{sparse}: points3D file is missing or has no points (name a .ply with "
                               f"{PC_NAME_OPTIONS})")
        pts, cols, pc_path = np.zeros((0, 3), np.float32), None, None
    else:
        pts, cols, pc_path = check_points(points[0], points[1], os.path.join(sparse, "points3D"))
    return SceneData(
        name=os.path.basename(os.path.normpath(root)), root=root, format="colmap",
        points=pts, colors=cols, views=views, train=train, val=val, test=test,
        background=None, metadata={"point_cloud": pc_path, "sparse": sparse, "model_points": model_points},
    )
