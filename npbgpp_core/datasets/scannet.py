"""Preprocessed ScanNet: ``images/<int>.jpg``, ``intrinsics.npy``, ``extrinsics.npy``,
``full.ply``.

``intrinsics.npy`` is a *pickled* dict ``{"K": 3x3, "height": h, "width": w}`` in the
published preprocessing. It is read with a restricted unpickler that only rebuilds numpy
arrays, dtypes and scalars (plain dicts, numbers and strings need no code), so a planted
payload is refused instead of run. A plain 3x3 (or 4x4) array is also accepted. We use fx,
fy *and* K's principal point (the published loader assumed a centred one); K is scaled
if the images are not ``width x height``.
``extrinsics.npy``: (num_images, 4, 4) OpenCV world-to-camera, in the order of the
sorted integer image names. Splits: all train unless ``test_every=k`` (every k-th view,
starting at 0, is test) or explicit index lists.
"""

from __future__ import annotations

import os
import pickle

import numpy as np

from .common import (
    camera_from_opencv,
    check_options,
    check_rotation,
    finite_matrix,
    json_number,
    load_point_cloud,
    make_splits,
    npy_header,
    read_npy,
)
from .errors import DatasetError
from .images import image_size_of
from .scene_data import SceneData, View

OPTIONS = ("pc_name", "require_points", "train_indices", "val_indices", "test_indices", "test_every")
DEFAULT_PC_NAMES = ("full.ply",)


# The only callables the pickle of a numpy object array needs (numpy 1.x and 2.x names).
_NUMPY_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _NUMPY_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refused {module}.{name} (only numpy arrays may be unpickled)")
        return super().find_class(module, name)


def _load_object_npy(path: str):
    """The object stored in a pickled ``.npy`` file, rebuilt without running code."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
        if not dtype.hasobject:
            raise ValueError(f"expected a pickled object array, got dtype {dtype}")
        arr = _NumpyOnlyUnpickler(f).load()
    if not isinstance(arr, np.ndarray) or arr.shape != tuple(shape) or arr.size != 1:
        raise ValueError("expected one pickled object")
    return arr.reshape(()).item()


def _read_intrinsics(path: str) -> tuple[np.ndarray, tuple[int, int] | None]:
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: intrinsics file not found")
    with open(path, "rb") as f:
        if not npy_header(f, path)[2].hasobject:
            f.seek(0)
            arr = read_npy(f, os.path.getsize(path), path, max_elements=16)
            return finite_matrix(arr, [(3, 3), (4, 4)], path)[:3, :3], None
    try:
        # Documented format: a pickled dict (see module docstring).
        obj = _load_object_npy(path)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
        raise DatasetError(f"{path}: not a readable pickled intrinsics dict ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict) or "K" not in obj:
        raise DatasetError(f"{path}: expected a dict with 'K' (and 'height', 'width')")
    K = finite_matrix(obj["K"], [(3, 3), (4, 4)], f"{path} K")[:3, :3]
    size = None
    if "height" in obj and "width" in obj:
        size = (int(json_number(obj["height"], f"{path} height")), int(json_number(obj["width"], f"{path} width")))
        if min(size) < 1:  # the scale to the images would divide by it
            raise DatasetError(f"{path}: height x width {size[0]} x {size[1]} is not an image size")
    return K, size


def load_scannet(root: str, **options) -> SceneData:
    check_options("scannet", options, OPTIONS)
    image_dir = os.path.join(root, "images")
    if not os.path.isdir(image_dir):
        raise DatasetError(f"{image_dir}: image folder not found")
    files = [f for f in os.listdir(image_dir) if not f.startswith(".")]
    bad = [f for f in files if not os.path.splitext(f)[0].isdigit()]
    if bad:
        raise DatasetError(f"{image_dir}: image names must be integers, got {bad[:5]}")
    files.sort(key=lambda f: int(os.path.splitext(f)[0]))
    if not files:
        raise DatasetError(f"{image_dir}: no images")
    K, k_size = _read_intrinsics(os.path.join(root, "intrinsics.npy"))
    ext_path = os.path.join(root, "extrinsics.npy")
    if not os.path.isfile(ext_path):
        raise DatasetError(f"{ext_path}: extrinsics file not found")
    with open(ext_path, "rb") as f:
        ext = read_npy(f, os.path.getsize(ext_path), ext_path)
    if ext.ndim != 3 or ext.shape[1:] not in ((4, 4), (3, 4)):
        raise DatasetError(f"{ext_path}: expected (num_images, 4, 4), got {ext.shape}")
    if ext.shape[0] != len(files):
        raise DatasetError(f"{ext_path}: {ext.shape[0]} matrices but {len(files)} images in {image_dir}")
    views = []
    for i, f in enumerate(files):
        source = f"{ext_path}[{i}]"
        w2c = finite_matrix(ext[i], [(4, 4), (3, 4)], source)
        check_rotation(w2c[:3, :3], source)
        path = os.path.join(image_dir, f)
        size = image_size_of(path)
        cam = camera_from_opencv(K, w2c[:3, :3], w2c[:3, 3], k_size or size, source)
        if k_size is not None and k_size != size:  # K given for another resolution than the images
            cam = cam.scaled(size)
        views.append(View(os.path.splitext(f)[0], path, None, cam))
    every = int(options.get("test_every", 0) or 0)
    default_test = list(range(0, len(views), every)) if every > 0 else []
    train, val, test = make_splits(
        len(views), root, (), default_test,
        options.get("train_indices"), options.get("val_indices"), options.get("test_indices"),
    )
    points, colors, pc_path = load_point_cloud(
        root, options.get("pc_name"), DEFAULT_PC_NAMES, options.get("require_points", True)
    )
    return SceneData(
        name=os.path.basename(os.path.normpath(root)), root=root, format="scannet",
        points=points, colors=colors, views=views, train=train, val=val, test=test,
        background=None, metadata={"point_cloud": pc_path},
    )
