"""nerfstudio / instant-ngp captures: one ``transforms.json`` at the scene root.

This is what nerfstudio's ``ns-process-data`` and instant-ngp's ``colmap2nerf.py`` write.
``frames[]`` hold ``file_path`` (relative to the scene folder, extension optional) and
``transform_matrix`` (camera-to-world, OpenGL camera axes: x right, y up, z backward), as
in NeRF-Synthetic. Intrinsics ``fl_x, fl_y, cx, cy, w, h`` (or ``camera_angle_x``) sit at
the top level or per frame, a frame's own value winning (as instant-ngp reads them;
nerfstudio's trainer uses a top-level value for every frame: the converters write one or
the other, so only hand-mixed files differ); ``cx, cy`` put the image centre
at ``w/2``: both converters copy COLMAP's ``cx, cy`` unchanged, and nerfstudio casts the
ray of pixel (u, v) through ``(u + 0.5 - cx) / fx``, so the OpenCV principal point is
``cx - 0.5``.

Poses load in the file's own world frame. The converters' re-orientation is already in
the matrices, and what the trainers do at load time (nerfstudio's auto-orient and scale,
instant-ngp's ``scale`` / ``offset`` / ``aabb_scale``) is not applied; ``sharpness``,
``depth_file_path`` and the like are ignored. nerfstudio's converters record what they did
to the original (COLMAP, Metashape, ...) frame: ``applied_transform`` (3x4, original ->
file frame; ns-process-data's swaps and flips axes) and, from some third-party converters,
``applied_scale`` (a factor on top of it), so that a pose in the file is
``applied_scale * applied_transform`` of the original (nerfstudio's
``transform_poses_to_original_space`` undoes them in this order). Both are kept in
``metadata`` (``applied_transform`` as a 3x4 list or None, ``applied_scale`` a float, 1.0
when absent) for going back to the original frame; neither is applied to the poses.

The point cloud must end up in the poses' frame. ``sparse_pc.ply`` (``ply_file_path``) is
written by ns-process-data with ``applied_transform`` applied to the COLMAP points (so in
the file frame, not the original COLMAP one) but without ``applied_scale``: nerfstudio's
reader multiplies that cloud by ``applied_scale``, and so does this loader (the file
``ply_file_path`` names, also when ``pc_name`` names it: a file has one frame however it is
named, and ``headless_train export`` names the cloud a run recorded). Any other cloud, chosen
with ``pc_name`` or found by a default name, is read as is, in the poses' frame (the densify
command's ``dense.ply`` is). A COLMAP
``points3D`` beside it (``colmap/sparse/0``) is in the original frame, instant-ngp writes no
cloud, and a trained model's ``ns-export pointcloud`` is in the file frame only with
``--save-world-frame`` (by default it writes the trainer's auto-oriented, scaled frame).
The same capture read from its COLMAP model and from nerfstudio's conversion therefore
gives the same images, pixels and held-out views in two world frames one rotation apart
(the file's ``applied_transform``: x and y swapped and z negated in files from older
nerfstudio versions, which the nerfstudio reader assumes when the field is missing; x, z, -y
in current ones); NPBG++'s view-dependent basis reads world-space directions,
so its renders differ a little between the two (not a misalignment).

Lens: ``camera_model`` (top level or per frame) PINHOLE / SIMPLE_PINHOLE, or a
radial-tangential one (OPENCV, SIMPLE_RADIAL, RADIAL) whose ``k1 k2 p1 p2`` are remapped
on load with ``undistort=True`` (refused without it, as COLMAP models are) to the widest
pinhole camera without blank borders (``distortion.undistorted_camera``), the view's camera. Fisheye,
equirectangular and other models, ``is_fisheye: true`` and non-zero ``k3`` / ``k4`` are
refused.

Views are sorted by ``file_path`` (as nerfstudio does) and named by it without extension
(``images/frame_00001``), whatever ``downscale``: a COLMAP capture converted to this
format (``file_path`` ``images/<name>``) keeps the COLMAP loader's order and so holds out
the same views. Split: the file's
``train_filenames`` / ``val_filenames`` / ``test_filenames`` when it has any (a missing
list is empty; train defaults to the rest), else every ``holdout_every``-th view
(0, 8, 16, ... by default; 0 disables) is test, as for COLMAP; ``*_indices`` options win.

Point cloud: ``pc_name``, else ``ply_file_path``, else the first of ``DEFAULT_PC_NAMES``
in the folder (``sparse_pc.ply`` ... ``dense.ply``, the densify command's output the
no-cloud error names; not ``point_cloud.ply``, which ``ns-export pointcloud`` writes in the
trainer's frame by default). Unlike the other formats, a lone ``.ply`` of another name is not
taken: in a transforms.json folder it is as likely in another frame (instant-ngp's mesh
export is in its scaled and offset unit cube, ``ns-export`` writes the trainer's frame) and
a cloud in the wrong frame renders as noise with no error, so the loader reports it by name
instead and the user names it with ``pc_name`` (the add-on: Import Dataset's Point Cloud).

Paths (``file_path``, ``mask_path``, ``ply_file_path``, the split lists) may use Windows
separators (``images\\frame_00001.png``, as a file written on Windows has them): ``\\`` is read
as ``/``.

Options: ``pc_name`` (a cloud other than ``ply_file_path``), ``require_points``,
``downscale=N`` (nerfstudio's ``images_N/`` / ``masks_N/`` copies, intrinsics scaled to
the images found), ``min_side=S`` (for a caller that will shrink the images to a long side
of S, as ``headless_train export --max-side``: the ``images_N/`` copy with the smallest
images whose long side is still >= S in every view, else ``images/``; a copy qualifies only
when every image and mask is there and is its full image scaled alike in x and y, the
sizes read from the files; the N chosen is ``metadata['downscale']``; :func:`copy_views`
gives that copy's views alone, for a caller shrinking only some views), ``use_masks``
(``mask_path`` per frame, default True), ``white_bg`` (background of RGBA images, which
then carry their mask as alpha), ``undistort``, ``holdout_every``, ``*_indices``,
``allow_external_paths``.
"""

from __future__ import annotations

import os
import re

import numpy as np

from ..atomic import same_file
from .common import (
    PC_NAME_OPTIONS,
    check_options,
    check_points,
    finite_matrix,
    json_number,
    load_point_cloud,
    make_splits,
    path_in_root,
)
from .distortion import view_cameras
from .errors import DatasetError
from .images import has_alpha, image_size_of
from .nerf_synthetic import opencv_pose, read_transforms_json, resolve_image, transforms_intrinsics
from .scene_data import Distortion, SceneData, View

FILE = "transforms.json"
OPTIONS = (
    "pc_name", "require_points", "train_indices", "val_indices", "test_indices", "holdout_every",
    "undistort", "downscale", "min_side", "use_masks", "white_bg", "allow_external_paths",
)
PINHOLE_MODELS = ("PINHOLE", "SIMPLE_PINHOLE")
RADIAL_MODELS = ("OPENCV", "SIMPLE_RADIAL", "RADIAL")
# Without ply_file_path; dense.ply is what the no-cloud error tells the user to make. Not
# point_cloud.ply, a NeRF-Synthetic default: it is the name ``ns-export pointcloud`` writes,
# in the trainer's auto-oriented, scaled frame unless given --save-world-frame, and a cloud
# in the wrong frame renders as noise with no error (named and refused as any other .ply).
DEFAULT_PC_NAMES = ("sparse_pc.ply", "points3d.ply", "points3D.ply", "pointcloud.ply", "dense.ply")
EXPORT_PC_NAME = "point_cloud.ply"  # what ns-export pointcloud writes
SPLITS = ("train", "val", "test")


def _posix(rel: object) -> object:
    """``rel`` with Windows separators turned to ``/``: on POSIX ``images\\a.png`` would be
    one file name holding a backslash, which no capture folder has (non-strings pass, for
    path_in_root to refuse by name)."""
    return rel.replace("\\", "/") if isinstance(rel, str) else rel


def _applied(meta: dict, path: str) -> tuple[list[list[float]] | None, float]:
    """The file's ``applied_transform`` (3x4 list, None when absent) and ``applied_scale``
    (1.0 when absent); DatasetError naming the field for a malformed one."""
    transform = None
    if meta.get("applied_transform") is not None:
        field = f"{path} applied_transform"
        a = finite_matrix(meta["applied_transform"], [(3, 4), (4, 4)], field)
        if a.shape == (4, 4) and np.abs(a[3] - (0.0, 0.0, 0.0, 1.0)).max() > 1e-6:
            raise DatasetError(f"{field}: last row is {a[3].tolist()}, not [0, 0, 0, 1]")
        transform = a[:3].tolist()
    scale = 1.0
    if meta.get("applied_scale") is not None:
        scale = json_number(meta["applied_scale"], f"{path} applied_scale")
        if scale <= 0.0:
            raise DatasetError(f"{path} applied_scale: {scale:g} must be positive (the factor the poses were scaled "
                               "by)")
    return transform, scale


def _downscaled(rel: object, prefix: str, n: int) -> object:
    """nerfstudio's ``<prefix><n>/<file name>`` copy of ``rel`` (``rel`` itself for n=1 or
    a non-string, which path_in_root then refuses by name)."""
    if n == 1 or not isinstance(rel, str):
        return rel
    return os.path.join(f"{prefix}{n}", os.path.basename(os.path.normpath(rel)))


def _distortion(meta: dict, frame: dict, source: str, undistort: bool) -> Distortion | None:
    def get(key: str) -> object:
        return frame.get(key, meta.get(key))

    model = get("camera_model")
    if model is not None and (not isinstance(model, str) or model not in PINHOLE_MODELS + RADIAL_MODELS):
        raise DatasetError(
            f"{source} camera_model: {model!r:.40} is not supported (supported: "
            f"{', '.join(PINHOLE_MODELS + RADIAL_MODELS)}; fisheye and equirectangular images need undistorting "
            "to a pinhole camera first, e.g. ns-process-data with a perspective camera model)"
        )
    if get("is_fisheye") not in (None, False):
        raise DatasetError(f"{source} is_fisheye: fisheye cameras are not supported (undistort the images to a "
                           "pinhole camera first)")
    k = {key: (0.0 if get(key) is None else json_number(get(key), f"{source} {key}"))
         for key in ("k1", "k2", "k3", "k4", "p1", "p2")}
    extra = {key: v for key, v in k.items() if key in ("k3", "k4") and v != 0.0}
    if extra:
        raise DatasetError(f"{source}: distortion {extra} is not supported (k1, k2, p1, p2 only); undistort the "
                           "images first (e.g. colmap image_undistorter, then ns-process-data --skip-colmap)")
    dist = Distortion(k["k1"], k["k2"], k["p1"], k["p2"])
    if dist.is_identity():
        return None
    if model in PINHOLE_MODELS:
        raise DatasetError(f"{source}: camera_model {model} but distortion k1/k2/p1/p2 = "
                           f"{[k['k1'], k['k2'], k['p1'], k['p2']]} given")
    if not undistort:
        raise DatasetError(
            f"{source}: lens distortion k1/k2/p1/p2 = {[k['k1'], k['k2'], k['p1'], k['p2']]}; pass undistort=True "
            "(densify / headless_train export: --undistort; training: +datasets.options.undistort=true; the "
            "add-on's Undistort) to remap the images on load"
        )
    return dist


def _declared_size(meta: dict, frame: dict, source: str) -> tuple[int | None, int | None]:
    """(h, w) the file gives the intrinsics for (None where it has no ``h`` / ``w``)."""
    out: list[int | None] = []
    for key in ("h", "w"):
        val = frame.get(key, meta.get(key))
        if val is None:
            out.append(None)
            continue
        num = json_number(val, f"{source} {key}")
        if num != int(num) or num < 1:
            raise DatasetError(f"{source} {key}: {num:g} is not a positive whole number of pixels")
        out.append(int(num))
    return out[0], out[1]


def _frame_view(root: str, meta: dict, frame: object, k: int, opts: dict) -> tuple[View, str]:
    """One frame's View and its ``file_path`` normalised relative to ``root`` (the sort key
    and, without extension, the view's name and its key in the split lists: the same for
    every ``downscale``, so the order, split and names of a scene do not change with it)."""
    path = os.path.join(root, FILE)
    source = f"{path} frames[{k}]"
    if not isinstance(frame, dict):
        raise DatasetError(f"{source}: expected an object with 'file_path' and 'transform_matrix'")
    for key in ("file_path", "transform_matrix"):
        if key not in frame:
            raise DatasetError(f"{source}: no '{key}'")
    allow_external, n = opts["allow_external"], opts["downscale"]
    rel = _posix(frame["file_path"])
    key = os.path.relpath(path_in_root(root, rel, f"{source} file_path", allow_external), root)
    image_path = resolve_image(root, _downscaled(rel, "images_", n), source, allow_external)
    size = image_size_of(image_path)
    if n == 1:  # transforms_intrinsics refuses a w / h that differs from the image
        h0, w0 = size
    else:
        h0, w0 = _full_size(root, meta, frame, source, opts)
    K = transforms_intrinsics(meta, frame, w0, h0, source)
    # a copy min_side chose was checked for its framing (_copy_fits), whatever its folder's N
    if n != 1 and not opts["auto"] and (abs(size[0] - h0 / n) > 1.0 or abs(size[1] - w0 / n) > 1.0):
        raise DatasetError(f"{image_path}: image is {size[1]}x{size[0]}, but w x h = {w0}x{h0} downscaled "
                           f"{n}x is about {w0 / n:g}x{h0 / n:g}")
    R, t = opencv_pose(frame["transform_matrix"], f"{source} transform_matrix")
    dist = _distortion(meta, frame, source, opts["undistort"])
    mask_path = None
    if opts["use_masks"] and frame.get("mask_path") is not None:
        mask_path = path_in_root(root, _downscaled(_posix(frame["mask_path"]), "masks_", n), f"{source} mask_path",
                                 allow_external)
        msize = image_size_of(mask_path)
        if msize != size:
            raise DatasetError(f"{mask_path}: mask is {msize[1]}x{msize[0]} but its image {image_path} is "
                               f"{size[1]}x{size[0]} ({source} mask_path)")
    cam, view_cam = view_cameras(K, dist, R, t, (h0, w0), size, source, source)
    alpha = mask_path is None and has_alpha(image_path)
    name = os.path.splitext(key)[0]
    if dist is None:
        return View(name, image_path, mask_path, cam, mask_from_alpha=alpha), key
    return View(name, image_path, mask_path, view_cam, mask_from_alpha=alpha, distortion=dist, source_camera=cam), key


def _full_size(root: str, meta: dict, frame: dict, source: str, opts: dict) -> tuple[int, int]:
    """(h, w) the intrinsics are given for, read with a downscaled copy: the file's ``w`` /
    ``h``; without them, an explicit ``downscale`` is refused (the full images may be gone)
    and ``min_side`` reads the full image's header."""
    h0, w0 = _declared_size(meta, frame, source)
    if h0 is not None and w0 is not None:
        return h0, w0
    if not opts["auto"]:
        raise DatasetError(f"{source}: downscale={opts['downscale']} needs the full-resolution size (w, h) in {FILE}")
    return image_size_of(resolve_image(root, _posix(frame["file_path"]), source, opts["allow_external"]))


def _copy_long_side(root: str, meta: dict, frames: list, n: int, opts: dict) -> int | None:
    """The smallest long side of the images in ``images_<n>/``, or None when that copy
    cannot stand in for ``images/``: an image (or, with masks, a ``masks_<n>/`` mask) is
    missing, or one is not the full image scaled alike in x and y (within a pixel). The
    sizes come from the files, not from the folder's name."""
    path = os.path.join(root, FILE)
    side = None
    for k, frame in enumerate(frames):
        source = f"{path} frames[{k}]"
        if not isinstance(frame, dict) or not isinstance(frame.get("file_path"), str):
            return None  # the load reports it by name
        try:
            rel = _posix(frame["file_path"])
            h, w = image_size_of(resolve_image(root, _downscaled(rel, "images_", n), source, opts["allow_external"]))
            h0, w0 = _full_size(root, meta, frame, source, opts)
            mask = frame.get("mask_path")
            if opts["use_masks"] and mask is not None and not os.path.isfile(
                    path_in_root(root, _downscaled(_posix(mask), "masks_", n), source, opts["allow_external"])):
                return None
        except DatasetError:
            return None
        if abs(h - h0 * w / w0) > 1.0:
            return None
        side = max(h, w) if side is None else min(side, max(h, w))
    return side


def _choose_downscale(root: str, meta: dict, frames: list, min_side: int, opts: dict) -> int:
    """N of the ``images_<N>/`` copy with the smallest images whose long side is still at
    least ``min_side`` in every view; 1 (``images/``) when no copy is."""
    best: tuple[int, int] | None = None
    for entry in sorted(os.listdir(root)):
        match = re.fullmatch(r"images_(\d+)", entry)
        if match is None or int(match.group(1)) < 2 or not os.path.isdir(os.path.join(root, entry)):
            continue
        n = int(match.group(1))
        side = _copy_long_side(root, meta, frames, n, opts)
        if side is not None and side >= min_side and (best is None or side < best[0]):
            best = (side, n)
    return 1 if best is None else best[1]


def _split_lists(root: str, meta: dict, keys: list[str], allow_external: bool) -> dict[str, list[int]] | None:
    """Indices of the file's ``<split>_filenames`` lists, or None when it has none."""
    present = [s for s in SPLITS if f"{s}_filenames" in meta]
    if not present:
        return None
    where = {os.path.splitext(key)[0]: i for i, key in enumerate(keys)}
    out: dict[str, list[int]] = {}
    for split in present:
        field = f"{os.path.join(root, FILE)} {split}_filenames"
        names = meta[f"{split}_filenames"]
        if not isinstance(names, list):
            raise DatasetError(f"{field}: expected a list of file paths")
        idx, missing = [], []
        for name in names:
            key = os.path.splitext(os.path.relpath(path_in_root(root, _posix(name), field, allow_external), root))[0]
            if key in where:
                idx.append(where[key])
            else:
                missing.append(name)
        if missing:
            raise DatasetError(f"{field}: {len(missing)} name(s) match no frame's file_path, e.g. {missing[:3]}")
        out[split] = sorted(set(idx))
    return out


def _ply_file_path(root: str, meta: dict, allow_external: bool) -> str | None:
    """The cloud the ``transforms.json`` names (``ply_file_path``), None when it names none."""
    ply = meta.get("ply_file_path")
    field = f"{os.path.join(root, FILE)} ply_file_path"
    return None if ply is None else path_in_root(root, _posix(ply), field, allow_external)


def _default_cloud(root: str) -> str | None:
    """The first existing of :data:`DEFAULT_PC_NAMES` in ``root``, else None."""
    return next((os.path.join(root, n) for n in DEFAULT_PC_NAMES if os.path.isfile(os.path.join(root, n))), None)


def own_cloud_file(root: str, **options) -> str | None:
    """The cloud file :func:`load_nerfstudio` reads when no ``pc_name`` names one (its
    ``ply_file_path``, else the first of :data:`DEFAULT_PC_NAMES`), found as it finds it
    but not read; None when there is none. ``options``: the loader's
    (``allow_external_paths`` lets ``ply_file_path`` lie outside ``root``)."""
    own = _ply_file_path(root, read_transforms_json(os.path.join(root, FILE)),
                         bool(options.get("allow_external_paths", False)))
    if own is not None:
        return own if os.path.isfile(own) else None
    return _default_cloud(root)


def _point_cloud(root: str, meta: dict, options: dict, scale: float
                 ) -> tuple[np.ndarray, np.ndarray | None, str | None]:
    """(points, colours, path) in the poses' frame; ``scale``: the file's applied_scale."""
    from ..ply import load_scene_cloud

    require = options.get("require_points", True)
    field = f"{os.path.join(root, FILE)} ply_file_path"
    own = _ply_file_path(root, meta, bool(options.get("allow_external_paths", False)))
    if options.get("pc_name") is not None:
        pts, cols, path = load_point_cloud(root, options["pc_name"], (), require)
        if scale != 1.0 and own is not None and path is not None and same_file(path, own):
            # the file's own cloud, however it is named: export and a resumed run name the cloud
            # a run recorded, which was this one read scaled
            pts = check_points(pts.astype(np.float64) * scale, cols, path)[0]
        return pts, cols, path
    if own is not None:
        if not os.path.isfile(own):
            if not require:  # as a COLMAP model without points3D: the caller needs only the cameras
                return np.zeros((0, 3), np.float32), None, None
            raise DatasetError(f"{field}: {own} not found (or name another cloud with {PC_NAME_OPTIONS})")
        try:
            pc = load_scene_cloud(own)  # a splat file: as load_point_cloud reads one
        except (ValueError, OSError) as exc:
            raise DatasetError(f"{field}: {exc}") from exc
        pts, cols, path = check_points(pc.points, pc.colors, own)
        if scale != 1.0:  # written before the scale (nerfstudio's reader multiplies it in as well)
            pts = check_points(pts.astype(np.float64) * scale, cols, own)[0]
        return pts, cols, path
    found = _default_cloud(root)
    if found is not None:
        return load_point_cloud(root, found, (), require)
    if not require:
        return np.zeros((0, 3), np.float32), None, None
    plys = sorted(f for f in os.listdir(root) if f.lower().endswith(".ply"))
    if plys:  # not read unnamed: its frame is unknown (see the module docstring)
        export = (f" ({EXPORT_PC_NAME} is the name ns-export pointcloud writes, in the poses' frame only when run "
                  "with --save-world-frame)" if EXPORT_PC_NAME in plys else "")
        raise DatasetError(
            f"{os.path.join(root, FILE)}: no ply_file_path and no cloud of a default name ({list(DEFAULT_PC_NAMES)}) "
            f"in {root}; {plys} {'is' if len(plys) == 1 else 'are'} not read unnamed, as a .ply there may be in "
            f"another frame (an instant-ngp mesh export, ns-export's trainer frame){export}. If one is in the same "
            f"world frame as the transform_matrix poses, choose it with {PC_NAME_OPTIONS}"
        )
    raise DatasetError(
        f"{os.path.join(root, FILE)}: no ply_file_path and no point cloud in {root} (looked for "
        f"{list(DEFAULT_PC_NAMES)}). instant-ngp writes none; nerfstudio's ns-process-data "
        "writes sparse_pc.ply. Put a cloud in the same world frame as the transform_matrix poses there (a "
        "COLMAP points3D is in another frame; ns-export pointcloud needs --save-world-frame), or name it with "
        f"{PC_NAME_OPTIONS}; or make one from the photos: python -m npbgpp_core.densify {root} --out "
        f"{os.path.join(root, 'dense.ply')}"
    )


def _read_meta(root: str) -> tuple[dict, list]:
    """The parsed ``transforms.json`` and its non-empty ``frames`` list."""
    path = os.path.join(root, FILE)
    meta = read_transforms_json(path)
    frames = meta.get("frames")
    if not isinstance(frames, list):
        raise DatasetError(f"{path}: no 'frames' list")
    if not frames:
        raise DatasetError(f"{path} frames: the list is empty")
    return meta, frames


def _load_views(root: str, meta: dict, frames: list, options: dict) -> tuple[list[View], list[str], int, dict]:
    """The frames' views in the scene's order (by ``file_path``), their keys, the
    ``images_N`` copy read (N) and the parsed options."""
    path = os.path.join(root, FILE)
    n = options.get("downscale", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DatasetError(f"{root}: downscale={n!r} must be a whole number >= 1")
    min_side = options.get("min_side")
    if min_side is not None:
        if isinstance(min_side, bool) or not isinstance(min_side, int) or min_side < 1:
            raise DatasetError(f"{root}: min_side={min_side!r} must be a whole number of pixels >= 1")
        if n != 1:
            raise DatasetError(f"{root}: downscale={n} and min_side={min_side} both choose the image copy; give one")
    opts = {"allow_external": bool(options.get("allow_external_paths", False)), "downscale": n,
            "undistort": bool(options.get("undistort", False)), "use_masks": bool(options.get("use_masks", True)),
            "auto": min_side is not None}
    if min_side is not None:
        n = opts["downscale"] = _choose_downscale(root, meta, frames, min_side, opts)
    loaded = [_frame_view(root, meta, frame, k, opts) for k, frame in enumerate(frames)]
    loaded.sort(key=lambda vk: vk[1])
    views, keys = [v for v, _ in loaded], [key for _, key in loaded]
    seen: set[str] = set()
    for v in views:
        if v.image_path in seen:
            raise DatasetError(f"{path} frames: image {v.image_path} is listed twice")
        seen.add(v.image_path)
    return views, keys, n, opts


def copy_views(root: str, min_side: int, **options) -> tuple[int, list[View]]:
    """(N, views) of the ``images_N/`` copy that ``min_side`` chooses (1: ``images/``), in
    the scene's view order, without reading its point cloud: a caller that shrinks only some
    views (headless_train's input views, ``datasets.input_view_max_side``) reads those
    from the copy and the others from the scene :func:`load_nerfstudio` loaded. ``options``:
    the loader's; those choosing the copy (``downscale``, ``min_side``) are refused."""
    check_options("nerfstudio", options, OPTIONS)
    for key in ("downscale", "min_side"):
        if key in options:
            raise DatasetError(f"{root}: copy_views chooses the image copy itself; {key}= is not taken")
    meta, frames = _read_meta(root)
    views, _, n, _ = _load_views(root, meta, frames, {**options, "min_side": min_side})
    return n, views


def load_nerfstudio(root: str, **options) -> SceneData:
    """Load the ``transforms.json`` scene in folder ``root`` (see the module docstring)."""
    check_options("nerfstudio", options, OPTIONS)
    path = os.path.join(root, FILE)
    meta, frames = _read_meta(root)
    views, keys, n, opts = _load_views(root, meta, frames, options)
    lists = _split_lists(root, meta, keys, opts["allow_external"])
    if lists is not None:
        default_val, default_test = lists.get("val", []), lists.get("test", [])
        default_train = lists.get("train")
    else:
        every = int(options.get("holdout_every", 8) or 0)
        default_val, default_test, default_train = [], list(range(0, len(views), every)) if every > 0 else [], None
    train_opt = options.get("train_indices", default_train)
    train, val, test = make_splits(len(views), root, default_val, default_test, train_opt,
                                   options.get("val_indices"), options.get("test_indices"))
    applied_transform, applied_scale = _applied(meta, path)
    points, colors, pc_path = _point_cloud(root, meta, options, applied_scale)
    white_bg = bool(options.get("white_bg", True))
    return SceneData(
        name=os.path.basename(os.path.normpath(root)), root=root, format="nerfstudio",
        points=points, colors=colors, views=views, train=train, val=val, test=test,
        background=((1.0, 1.0, 1.0) if white_bg else (0.0, 0.0, 0.0)) if any(v.mask_from_alpha for v in views)
        else None,
        metadata={"point_cloud": pc_path, "split": "filenames" if lists is not None else "holdout",
                  "applied_transform": applied_transform, "applied_scale": applied_scale, "downscale": n},
    )
