"""Preparing a real photo capture (photos + a COLMAP sparse model) for training and benchmarks.

``prepare_capture(src, out, max_size=512)`` reads ``src/sparse/0`` (or ``src/sparse``) and
``src/images``, and writes a folder ``load_scene`` reads as COLMAP:

- ``images/<name>``: each registered photo downscaled so its longer side is at most
  ``max_size`` (Lanczos), and, for a distorted camera (SIMPLE_RADIAL, OPENCV), remapped to
  the widest pinhole camera whose every pixel sees the photo (``distortion.undistorted_camera``:
  the scaled K with its focal length scaled again, no blank borders), so loading needs no
  ``undistort=True`` and gives the same cameras as loading the (same-size) source with it.
  Saved as JPEG quality 95 (the sources are JPEG already; PNG would be 5-8x larger for no
  visible gain) unless ``image_format="png"``.
- ``sparse/0/cameras.bin``: one PINHOLE camera per photo, the camera the COLMAP loader gives
  that view (``distortion.view_cameras``): the intrinsics scaled by the exact ratio of pixel
  counts (``Camera.scaled``: new width / camera width, new height / camera height; in
  COLMAP's pixel-edge convention the principal point scales by the same ratio), then, for a
  distorted camera, the undistorted camera's focal length; float32 values, as loaded.
- ``sparse/0/images.bin``: the poses unchanged, without 2D observations.
- ``sparse/0/points3D.bin``: the SfM points and colours, without tracks.
- ``capture.json``: provenance (source folder, repository, commit, licence, intended use)
  and counts.

``orient="z-up"`` rotates the whole capture about the origin (camera poses and points, so
every point projects to the same pixel) so that its estimated up becomes +Z, the up of
Blender scenes: a training corpus mixing both then needs one ``world_up``. The estimate is
the mean image-up direction of the cameras (as ``models.alignment.estimate_world_up``, but
neither snapped to an axis nor replaced by a default): when the cameras disagree (mean
shorter than ``MIN_UP_AGREEMENT``) preparing fails. ``capture.json`` then records
``orient``, ``estimated_up`` and ``rotation`` (3x3, new = rotation @ old world
coordinates). ``orient="keep"`` (default) leaves the poses as they are.

The output is built in ``<out>.partial-<pid>`` and renamed at the end
(``atomic.atomic_directory``), so an interrupted run never leaves a folder that looks
complete. Bad input raises ``DatasetError`` naming the
file.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping

import numpy as np

from ..atomic import atomic_directory
from ..image_size import fit_long_side
from .colmap import (
    CAMERA_MODELS,
    _intrinsics,
    _read_model,
    find_sparse_dir,
    quaternion_to_rotation,
    rotation_to_quaternion,
)
from .distortion import view_cameras
from .errors import DatasetError
from .images import eight_bit_levels, float_pixels, open_image

_MODEL_ID = {name: i for i, (name, _) in CAMERA_MODELS.items()}
USES = ("train", "validation")
ORIENTS = ("keep", "z-up")
# The smallest long side prepare_capture writes photos at (its max_size), in pixels; the
# commands that pass it one refuse a smaller one before any work by the same figure.
MIN_MAX_SIZE = 16
# The most pixels prepare_capture reads of one photo, whatever its camera states (it reads up to
# twice the camera's pixels, beyond PIL's decompression-bomb limit): a cameras file stating a huge
# camera must not make it decode a bomb (a PNG of a few MB claiming 10 gigapixels). 500 MP is
# beyond any camera's photo (400-MP multi-shot); reading it takes about 4.3 GB (8.6 bytes a pixel:
# BENCHMARKS.md, prepare-capture reading a 200-MP photo).
MAX_PHOTO_PIXELS = 500_000_000
# Length of the mean of the cameras' unit image-up vectors below which they are taken to
# disagree about up (0 = no agreement, 1 = all rolled alike).
MIN_UP_AGREEMENT = 0.5


def capture_up(rotations: list[np.ndarray], source: str) -> np.ndarray:
    """Unit mean image-up direction (world space) of cameras with world-to-camera rotations
    ``rotations`` (OpenCV: image y points down, so up is minus the second row).
    DatasetError naming ``source`` when the cameras disagree."""
    ups = np.asarray([-np.asarray(R, np.float64)[1] for R in rotations])
    mean = ups.mean(0)
    norm = float(np.linalg.norm(mean))
    if norm < MIN_UP_AGREEMENT:
        raise DatasetError(
            f"{source}: the cameras disagree about up (mean image-up direction has length {norm:.2f} < "
            f"{MIN_UP_AGREEMENT}: rolled or upside-down photos); cannot orient it, use --orient keep"
        )
    return mean / norm


def rotation_to_z_up(up: np.ndarray) -> np.ndarray:
    """Proper rotation (det +1) taking unit vector ``up`` to +Z along the shortest arc
    (Rodrigues); half a turn about X when ``up`` is -Z."""
    u = np.asarray(up, np.float64) / np.linalg.norm(up)
    z = np.array([0.0, 0.0, 1.0])
    c = float(u @ z)
    if c < -1.0 + 1e-12:
        return np.diag([1.0, -1.0, -1.0])
    v = np.cross(u, z)
    vx = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + vx + vx @ vx / (1.0 + c)


def _write_cameras_bin(path: str, cams: list[tuple[int, int, int, tuple[float, float, float, float]]]) -> None:
    """``cams``: (camera id, width, height, (fx, fy, cx, cy)) in COLMAP's pixel convention."""
    parts = [struct.pack("<Q", len(cams))]
    for cam_id, w, h, params in cams:
        parts.append(struct.pack("<iiQQ", cam_id, _MODEL_ID["PINHOLE"], w, h))
        parts.append(struct.pack("<4d", *params))
    with open(path, "wb") as f:
        f.write(b"".join(parts))


def _write_images_bin(path: str, images: list[tuple[int, np.ndarray, np.ndarray, int, str]]) -> None:
    parts = [struct.pack("<Q", len(images))]
    for image_id, q, t, cam_id, name in images:
        parts.append(struct.pack("<i4d3di", image_id, *q, *t, cam_id))
        parts.append(name.encode("utf-8") + b"\0")
        parts.append(struct.pack("<Q", 0))
    with open(path, "wb") as f:
        f.write(b"".join(parts))


def _write_points_bin(path: str, xyz: np.ndarray, rgb: np.ndarray) -> None:
    rec = struct.Struct("<QdddBBBdQ")
    cols = np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)
    parts = [struct.pack("<Q", len(xyz))]
    for i in range(len(xyz)):
        parts.append(rec.pack(i + 1, *map(float, xyz[i]), *map(int, cols[i]), 0.0, 0))
    with open(path, "wb") as f:
        f.write(b"".join(parts))


def prepare_capture(
    src: str,
    out: str,
    max_size: int = 512,
    images_dir: str = "images",
    image_format: str = "jpg",
    provenance: Mapping[str, str] | None = None,
    overwrite: bool = False,
    orient: str = "keep",
) -> dict:
    """Write a downscaled, undistorted copy of the COLMAP capture ``src`` to ``out``
    (rotated so up is +Z with ``orient="z-up"``); returns the summary also written to
    ``out/capture.json``."""
    import torch
    from PIL import Image

    from .distortion import undistort

    if max_size < MIN_MAX_SIZE:
        raise DatasetError(f"max_size must be at least {MIN_MAX_SIZE} pixels (got {max_size})")
    if image_format not in ("jpg", "png"):
        raise DatasetError(f"image_format must be 'jpg' or 'png' (got {image_format!r})")
    if orient not in ORIENTS:
        raise DatasetError(f"orient must be one of {ORIENTS} (got {orient!r})")
    prov = dict(provenance or {})
    if prov.get("use") not in (None, *USES):
        raise DatasetError(f"use must be one of {USES} (got {prov['use']!r})")
    if not os.path.isdir(src):
        raise DatasetError(f"{src}: capture folder not found")
    sparse = find_sparse_dir(src)
    if sparse is None:
        raise DatasetError(f"{src}: no sparse/0/cameras.(bin|txt) or sparse/cameras.(bin|txt): not a COLMAP capture")
    cams, images, points = _read_model(sparse)
    if not images:
        raise DatasetError(f"{sparse}: images file lists no images")
    if points is None or len(points[0]) == 0:
        raise DatasetError(f"{sparse}: points3D file is missing or has no points")
    photo_dir = os.path.join(src, images_dir)
    if not os.path.isdir(photo_dir):
        raise DatasetError(f"{photo_dir}: image folder not found")
    from ..atomic import holds

    if holds(out, src):  # --overwrite replaced the source with its downscaled copy
        raise DatasetError(f"{out}: the output folder holds the capture it reads ({src}); replacing it would "
                           "delete the original photos and model: choose another output folder")
    if os.path.exists(out) and not overwrite:
        raise DatasetError(f"{out}: already exists (pass overwrite=True / --overwrite to replace it)")
    rot = up = None
    if orient == "z-up":
        up = capture_up([quaternion_to_rotation(np.asarray(q, float)) for q, _, _, _ in images.values()],
                        f"{sparse} images")
        rot = rotation_to_z_up(up)

    out_cams, out_images, sizes = [], [], []
    undistorted = 0
    with atomic_directory(out, overwrite) as tmp:
        os.makedirs(os.path.join(tmp, "images"))
        os.makedirs(os.path.join(tmp, "sparse", "0"))
        for n, (image_id, (q, t, cam_id, name)) in enumerate(sorted(images.items(), key=lambda kv: kv[1][3])):
            if cam_id not in cams:
                raise DatasetError(f"{sparse} image {image_id} ({name}): camera {cam_id} is not in the cameras file")
            model, cw, ch, params = cams[cam_id]
            K, dist = _intrinsics(model, params, cam_id, f"{sparse} cameras", True)
            path = os.path.join(photo_dir, name)
            if not os.path.isfile(path):
                raise DatasetError(f"{path}: photo of {sparse} image {image_id} not found")
            try:
                # a photo as big as its camera states is read whatever PIL's decompression-bomb limit
                # (this copy with smaller photos is what the readers' refusal of bigger ones advises),
                # up to MAX_PHOTO_PIXELS: PIL reads up to twice the limit it is given
                too_large = (f"Camera {cam_id} in {sparse} states {cw}x{ch}; prepare-capture reads a photo of up to "
                             f"twice its camera's pixels (at most {MAX_PHOTO_PIXELS:,}): downscale the photo first "
                             "(any image editor: the camera is scaled to match) or check that it is this capture's "
                             "photo")
                # loaded under the raised limit: TIFF checks the size again as it decodes
                with open_image(path, min(cw * ch, MAX_PHOTO_PIXELS // 2), too_large, load=True) as im:
                    photo = im.convert("RGB")
            except OSError as exc:
                raise DatasetError(f"{path}: cannot read image ({exc})") from exc
            pw, ph = photo.size
            if abs(pw / cw - ph / ch) > 0.01:
                raise DatasetError(f"{path}: image is {pw}x{ph} but camera {cam_id} is {cw}x{ch} (aspect differs)")
            nw, nh = fit_long_side((pw, ph), max_size)
            if (nw, nh) != (pw, ph):
                photo = photo.resize((nw, nh), Image.Resampling.LANCZOS)
            # the loader's own cameras of this photo at its new size (load_scene(src, undistort=True))
            cam, target = view_cameras(K, dist, np.eye(3), np.zeros(3), (ch, cw), (nh, nw), path,
                                       f"{sparse} cameras: camera {cam_id} ({model})")
            if dist is not None:
                # the one conversion of 8-bit pixels: bit for bit the float32 division by 255 this wrote
                # itself (test_capture_import checks every level)
                arr = float_pixels(torch.from_numpy(np.array(photo)).permute(2, 0, 1))
                arr = undistort(arr, cam, dist, target)
                photo = Image.fromarray(eight_bit_levels(arr).permute(1, 2, 0).numpy())
                undistorted += 1
            t_in = target.intrinsics()  # back to COLMAP's pixel-edge principal point
            fx, fy, cx, cy = t_in.fx, t_in.fy, t_in.cx + 0.5, t_in.cy + 0.5
            stem = os.path.splitext(name)[0]
            out_name = stem + "." + image_format
            dst = os.path.join(tmp, "images", out_name)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if image_format == "jpg":
                photo.save(dst, quality=95)
            else:
                photo.save(dst)
            out_cams.append((n + 1, nw, nh, (fx, fy, cx, cy)))
            q = np.asarray(q, float)
            if rot is not None:
                # x_cam = R x + t = (R rot^T)(rot x) + t: the translation is unchanged
                q = rotation_to_quaternion(quaternion_to_rotation(q) @ rot.T)
            out_images.append((image_id, q, np.asarray(t, float), n + 1, out_name))
            sizes.append((nw, nh))
        _write_cameras_bin(os.path.join(tmp, "sparse", "0", "cameras.bin"), out_cams)
        _write_images_bin(os.path.join(tmp, "sparse", "0", "images.bin"), out_images)
        xyz = points[0] if rot is None else np.asarray(points[0], np.float64) @ rot.T
        _write_points_bin(os.path.join(tmp, "sparse", "0", "points3D.bin"), xyz, points[1])
        summary = {
            "source": os.path.abspath(src),
            **prov,
            "images": len(out_images),
            "points": int(len(points[0])),
            "max_size": max_size,
            "image_sizes": sorted({f"{w}x{h}" for w, h in sizes}),
            "undistorted_images": undistorted,
            "source_camera_models": sorted({cams[c][0] for _, _, c, _ in images.values()}),
        }
        if rot is not None:
            summary.update(orient=orient, estimated_up=[float(x) for x in up],
                           rotation=[[float(x) for x in row] for row in rot])
        with open(os.path.join(tmp, "capture.json"), "w") as f:
            json.dump(summary, f, indent=1)
    return summary


# Memory of reading and downscaling a photo, in bytes a pixel (BENCHMARKS.md, prepare-capture reading
# a 200-MP photo: 8.6, the decoded photo, its RGB conversion and the resampling's copy).
PREPARE_BYTES_PER_PIXEL = 9
