"""Helpers shared by the loaders: point clouds, split lists, matrix checks, P = K[R|t]."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from typing import BinaryIO

import numpy as np

from ..camera import Camera
from .errors import DatasetError


def check_options(fmt: str, options: dict, allowed: Iterable[str]) -> None:
    """Reject unknown keyword options by name (typos would otherwise pass silently)."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"{fmt} loader: unknown option(s) {unknown}; allowed: {sorted(allowed)}")


# how each caller names a scene's cloud file
PC_NAME_OPTIONS = ("pc_name= (headless_train: datasets.pc_name=, export --pc-name; densify --pc-name; "
                   "add-on: Import Dataset's Point Cloud)")

def find_point_cloud(
    root: str, pc_name: str | None, defaults: Sequence[str], require_points: bool = True
) -> str | None:
    """The file :func:`load_point_cloud` reads, by its rules and with its errors, without
    reading it: ``pc_name`` (with or without ``.ply``, relative to ``root`` or absolute)
    wins; else the first existing of ``defaults``; else the only ``.ply`` file in ``root``.
    None when there is none (or several) and ``require_points`` is False."""
    if pc_name is not None:
        # any letter case, as the folder scan below and check_output_suffix match it (FUSED.PLY)
        name = pc_name if pc_name.lower().endswith(".ply") else pc_name + ".ply"
        path = name if os.path.isabs(name) else os.path.join(root, name)
        if not os.path.isfile(path):
            raise DatasetError(f"{path}: point cloud file not found (pc_name={pc_name!r})")
        return path
    found = next((os.path.join(root, d) for d in defaults if os.path.isfile(os.path.join(root, d))), None)
    if found is not None:
        return found
    plys = sorted(f for f in os.listdir(root) if f.lower().endswith(".ply"))
    if len(plys) == 1:
        return os.path.join(root, plys[0])
    if not require_points:
        return None
    if plys:
        raise DatasetError(f"{root}: several point clouds {plys}; choose one with {PC_NAME_OPTIONS}")
    raise DatasetError(
        f"{root}: no point cloud found (looked for {list(defaults)} and any *.ply): put the scene's "
        f"cloud there as {defaults[0] if defaults else 'a .ply file'}, or name a .ply with "
        f"{PC_NAME_OPTIONS}"
    )


def load_point_cloud(
    root: str, pc_name: str | None, defaults: Sequence[str], require_points: bool = True
) -> tuple[np.ndarray, np.ndarray | None, str | None]:
    """Find (:func:`find_point_cloud`) and read the scene's point cloud. A Gaussian-splat
    file gives the splats with opacity >= ``ply.SCENE_MIN_OPACITY``. Returns ``(points,
    colors, path)``; with ``require_points=False`` a missing cloud gives ``(zeros (0, 3),
    None, None)``."""
    from ..ply import load_scene_cloud

    path = find_point_cloud(root, pc_name, defaults, require_points)
    if path is None:
        return np.zeros((0, 3), np.float32), None, None
    try:
        pc = load_scene_cloud(path)
    except (ValueError, FileNotFoundError) as exc:
        raise DatasetError(str(exc)) from exc
    return check_points(pc.points, pc.colors, path)


def check_points(points: np.ndarray, colors: np.ndarray | None, path: str) -> tuple[np.ndarray, np.ndarray | None, str]:
    """float32 points and colours clipped to [0, 1]; DatasetError naming ``path`` for an
    empty cloud, a non-finite coordinate (the PLY reader's rule, so a COLMAP float64 cloud
    beyond float32's range is named the same way) or bad colours."""
    from ..ply import finite_points

    read = np.asarray(points).reshape(-1, 3)
    with np.errstate(over="ignore"):
        points = read.astype(np.float32)
    if points.shape[0] == 0:
        raise DatasetError(f"{path}: point cloud is empty")
    try:
        finite_points(points, read, path)
    except ValueError as exc:
        raise DatasetError(str(exc)) from exc
    if colors is not None:
        colors = np.asarray(colors, dtype=np.float32).reshape(-1, 3)
        if colors.shape != points.shape:
            raise DatasetError(f"{path}: {colors.shape[0]} colours for {points.shape[0]} points")
        if not np.isfinite(colors).all():
            bad = int((~np.isfinite(colors).all(axis=1)).sum())
            raise DatasetError(f"{path}: {bad} point(s) have non-finite (NaN) colours")
        colors = np.clip(colors, 0.0, 1.0)
    return points, colors, path


def make_splits(
    n: int,
    source: str,
    default_val: Sequence[int] = (),
    default_test: Sequence[int] = (),
    train_indices: Sequence[int] | None = None,
    val_indices: Sequence[int] | None = None,
    test_indices: Sequence[int] | None = None,
) -> tuple[list[int], list[int], list[int]]:
    """Train/val/test lists: val and test from the options or defaults (indices beyond
    ``n`` in the defaults are dropped), train = given or everything not in val/test."""
    def checked(name: str, idx: Sequence[int]) -> list[int]:
        out = [int(i) for i in idx]
        bad = [i for i in out if not 0 <= i < n]
        if bad:
            raise DatasetError(f"{source}: {name} indices {bad} out of range for {n} views")
        return out

    val = checked("val", val_indices) if val_indices is not None else [i for i in default_val if 0 <= i < n]
    test = checked("test", test_indices) if test_indices is not None else [i for i in default_test if 0 <= i < n]
    if train_indices is not None:
        train = checked("train", train_indices)
    else:
        held = set(val) | set(test)
        train = [i for i in range(n) if i not in held]
    return train, val, test


def finite_matrix(m: object, shape_options: Sequence[tuple[int, int]], source: str) -> np.ndarray:
    if isinstance(m, str | bytes):
        raise DatasetError(f"{source}: expected a matrix of numbers, got a string")
    try:
        complex_values = np.iscomplexobj(m)  # a complex .npy: float64 would drop the imaginary parts with a warning
        with np.errstate(over="ignore", invalid="ignore"):  # beyond float64: inf / nan, refused below
            a = np.asarray(m, dtype=np.float64) if not complex_values else None
    except (ValueError, TypeError, OverflowError) as exc:  # ragged rows, strings, objects
        raise DatasetError(f"{source}: expected a matrix of numbers ({type(exc).__name__}: {exc})") from exc
    if a is None:
        raise DatasetError(f"{source}: expected a matrix of real numbers, got complex values")
    if a.shape not in [tuple(s) for s in shape_options]:
        shapes = " or ".join(map(str, shape_options))
        raise DatasetError(f"{source}: expected a matrix of shape {shapes}, got {a.shape}")
    if not np.isfinite(a).all():
        raise DatasetError(f"{source}: matrix has non-finite values")
    return a


def npy_header(fp: BinaryIO, source: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) from the header of an open ``.npy`` stream."""
    try:
        version = np.lib.format.read_magic(fp)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        return read_header(fp)
    except Exception as exc:  # noqa: BLE001 - numpy parses the header with ast (SyntaxError, TokenError, ...)
        raise DatasetError(f"{source}: not a readable .npy header ({type(exc).__name__}: {exc})") from exc


def read_npy(fp: BinaryIO, size: int, source: str, max_elements: int | None = None) -> np.ndarray:
    """One numeric array from an open ``.npy`` stream holding ``size`` bytes. The header's
    shape is checked against the bytes present (and ``max_elements``) before anything is
    allocated, so a small file cannot claim terabytes; object (pickled) arrays are refused."""
    shape, fortran, dtype = npy_header(fp, source)
    if dtype.hasobject:
        raise DatasetError(f"{source}: holds pickled Python objects, expected an array of numbers")
    if any(int(d) < 0 for d in shape) or dtype.itemsize == 0:
        raise DatasetError(f"{source}: invalid .npy header (shape {tuple(shape)}, dtype {dtype})")
    count = math.prod(int(d) for d in shape)
    need, have = count * dtype.itemsize, size - fp.tell()
    if need > have:
        raise DatasetError(f"{source}: header claims an array of shape {tuple(shape)} ({need} bytes) but only "
                           f"{have} bytes follow")
    if max_elements is not None and count > max_elements:
        raise DatasetError(f"{source}: array of shape {tuple(shape)} is too large (at most {max_elements} values)")
    data = fp.read(need)
    if len(data) != need:
        raise DatasetError(f"{source}: truncated .npy array ({len(data)} of {need} bytes)")
    try:
        return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C").copy()
    except (ValueError, TypeError) as exc:
        raise DatasetError(f"{source}: unreadable .npy array ({exc})") from exc


def json_number(value: object, source: str) -> float:
    """A number (int or float, also numpy's; not bool or string) as a finite float."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | float | np.integer | np.floating):
        raise DatasetError(f"{source}: expected a number, got {type(value).__name__} {value!r:.40}")
    try:
        out = float(value)
    except OverflowError as exc:  # an integer too large for a float
        raise DatasetError(f"{source}: number {value!r:.40} is out of range") from exc
    if not np.isfinite(out):
        raise DatasetError(f"{source}: expected a finite number, got {out}")
    return out


def path_in_root(root: str, relative: str, source: str, allow_external: bool = False) -> str:
    """``root/relative``, normalised; refuses a path that leaves ``root`` (absolute, or with
    ``..`` climbing out) unless ``allow_external``: a scene file should not make the
    loader read files elsewhere on the machine. Symbolic links inside ``root`` are the
    user's own choice and are followed."""
    if not isinstance(relative, str) or not relative or "\0" in relative:
        raise DatasetError(f"{source}: expected a file path string, got {relative!r:.60}")
    path = os.path.normpath(os.path.join(root, relative))
    if not allow_external:
        base = os.path.normpath(root)
        if os.path.commonpath([base, os.path.abspath(path)]) != os.path.abspath(base):
            raise DatasetError(
                f"{source}: path {relative!r} points outside the scene folder {root}; "
                "pass the loader option allow_external_paths=True (headless_train: "
                "+datasets.options.allow_external_paths=true; export: --allow-external-paths; add-on: "
                "Allow External Paths in Import Dataset) if that is intended"
            )
    return path


def check_rotation(R: np.ndarray, source: str, tol: float = 1e-4) -> None:
    """DatasetError naming ``source`` unless ``R`` is a proper rotation (within ``tol``)."""
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # huge entries: inf / nan, refused below
        err, det = float(np.abs(R @ R.T - np.eye(3)).max()), float(np.linalg.det(R))
    if not (err <= tol and abs(det - 1.0) <= tol):  # written so that nan fails too
        raise DatasetError(f"{source}: rotation part is not orthonormal with determinant 1 (scaled or sheared?)")


def decompose_projection(P: np.ndarray, source: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split a 3x4 (or 4x4) projection ``P = K [R | t]`` (any non-zero scale) into K
    (upper triangular, positive diagonal, K[2,2]=1), R (rotation) and t, with an RQ
    decomposition of the left 3x3 block."""
    P = np.asarray(P, dtype=np.float64)[:3, :4]
    M = P[:, :3]
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # huge entries: refused below
        det, size = float(np.linalg.det(M)), float(np.abs(M).max() ** 3)  # numpy powers overflow to inf
    if not (math.isfinite(det) and math.isfinite(size)) or abs(det) < 1e-12 * max(1.0, size):
        raise DatasetError(f"{source}: projection matrix is singular")
    if det < 0:  # P is defined up to scale: choose the sign giving a proper rotation
        P = -P
        M = -M
    # RQ via QR of the row/column-reversed transpose.
    flip = np.eye(3)[::-1]
    q, r = np.linalg.qr((flip @ M).T)
    K = flip @ r.T @ flip
    R = flip @ q.T
    signs = np.diag(np.sign(np.diag(K)))
    K = K @ signs
    R = signs @ R
    if np.linalg.det(R) < 0:  # cannot happen when det(M) > 0 and diag(K) > 0
        raise DatasetError(f"{source}: could not decompose projection into a proper rotation")
    t = np.linalg.solve(K, P[:, 3])
    K = K / K[2, 2]
    skew = K[0, 1]
    if abs(skew) > 1e-6 * K[0, 0]:
        raise DatasetError(f"{source}: intrinsics have skew {skew:g} (not supported)")
    K[0, 1] = 0.0
    return K, R, t


def camera_from_opencv(K: np.ndarray, R: np.ndarray, t: np.ndarray, size: tuple[int, int], source: str) -> Camera:
    try:
        return Camera.from_opencv(K, R, t, size)
    except ValueError as exc:
        raise DatasetError(f"{source}: {exc}") from exc


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".exr", ".bmp", ".tif", ".tiff")


def listdir_images(folder: str, exts: Sequence[str] = IMAGE_EXTENSIONS) -> list[str]:
    if not os.path.isdir(folder):
        raise DatasetError(f"{folder}: image folder not found")
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(tuple(exts)) and not f.startswith("."))
