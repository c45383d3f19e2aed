"""``python -m headless_train capture-sfm RAW_PHOTOS_DIR OUT_DIR [--max-side 1600] ...``:
recover a COLMAP model from a folder of photos with pycolmap (CPU SIFT, 4096 features per
photo, exhaustive or sequential matching, incremental mapping). ``OUT_DIR`` gets
``images/`` (downscaled JPEG copies), ``sparse/0/`` (the model with the most registered
photos), ``database.db`` (features and matches) and ``sfm.json`` (versions, options,
counts, timings): the input of ``prepare-capture``.

``--single-camera`` means one lens: the copies of one size (width x height) share one
camera, and each other size (a phone capture's other orientation) gets one camera of its
own, so no photo is dropped for its size. ``--drop-other-sizes`` keeps the old rule (one
camera, COLMAP skips photos of another size than the first photo's), which the project's
validation capture ``flowerpot`` was made with (``bench/captures.json``).

pycolmap is optional (not in requirements.txt) and imported only here; ``prepare-capture``
accepts any COLMAP model, e.g. one made with the COLMAP GUI, instead."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import sys
import time
from typing import Any

from . import oom  # torch-free, as this module: pycolmap may live in an environment without torch

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")
SIFT_MAX_FEATURES = 4096
CAMERA_MODEL = "SIMPLE_RADIAL"
MIN_REGISTERED = 3
# --single-camera's two rules for copies of another size than the first photo's
OTHER_SIZES = ("camera", "drop")  # a camera per size; skipped by COLMAP (the rule before 2026-12-01)
MISSING_PYCOLMAP = (
    "capture-sfm needs pycolmap, an optional dependency that is not installed here: "
    "`pip install pycolmap` into this environment, or into a separate one and run "
    "`PYTHONPATH=<repo> <that env>/bin/python -m headless_train capture-sfm ...` there; "
    "prepare-capture accepts any COLMAP model instead (e.g. one made with the COLMAP GUI)"
)


class CaptureSfmError(ValueError):
    """Photos or options from which no usable model can be made; the message says why."""


def import_pycolmap() -> Any:
    """The pycolmap module, or CaptureSfmError with install advice when it is missing."""
    try:
        import pycolmap
    except ImportError:
        raise CaptureSfmError(MISSING_PYCOLMAP) from None
    return pycolmap


def is_photo(name: str) -> bool:
    """Whether a file named ``name`` is a photo capture-sfm takes (:data:`PHOTO_SUFFIXES`, any case):
    the one rule, which bench/rebuild_captures.py counts and matches photos by too."""
    return os.path.splitext(name)[1].lower() in PHOTO_SUFFIXES


def list_photos(raw: str, every: int = 1) -> list[str]:
    """Every ``every``-th photo (.jpg/.jpeg/.png, any case) of ``raw`` in name order."""
    if not os.path.isdir(raw):
        raise CaptureSfmError(f"{raw}: no such folder of photos")
    if every < 1:
        raise CaptureSfmError(f"--every must be >= 1, got {every}")
    names = sorted(n for n in os.listdir(raw) if is_photo(n) and os.path.isfile(os.path.join(raw, n)))
    if not names:
        raise CaptureSfmError(f"{raw}: holds no photos ({', '.join(PHOTO_SUFFIXES)})")
    names = names[::every]
    stems: dict[str, str] = {}
    for n in names:
        stem = os.path.splitext(n)[0]
        if stem in stems:  # both would become <stem>.jpg
            raise CaptureSfmError(f"{raw}: {stems[stem]} and {n} differ only in their suffix; rename one")
        stems[stem] = n
    return [os.path.join(raw, n) for n in names]


def read_upright(path: str) -> tuple[Any, int]:
    """(the photo at ``path`` in RGB turned upright by its EXIF orientation, that orientation:
    1 where it is stored upright). The one rule by which the SfM copies are turned, so a rebuild
    that reads the originals again (bench/rebuild_captures.py) sees them as SfM did."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    from npbgpp_core.image_size import too_many_pixels

    try:
        with Image.open(path) as im:
            orientation = im.getexif().get(0x0112, 1) or 1
            return ImageOps.exif_transpose(im).convert("RGB"), int(orientation)
    except Image.DecompressionBombError as exc:  # PIL's error names no file and calls it an attack
        raise CaptureSfmError(too_many_pixels(path, exc, "Downscale the photos first (any image editor)")) from None
    except (OSError, UnidentifiedImageError) as exc:
        raise CaptureSfmError(f"{path}: cannot be read as a photo ({exc})") from None


def downscale_photos(photos: list[str], img_dir: str, max_side: int) -> dict[str, tuple[int, int]]:
    """JPEG (q95) copies, upright by their EXIF orientation, at most ``max_side`` px; returns
    each copy's name and (width, height) in the order of ``photos``."""
    from PIL import Image

    os.makedirs(img_dir, exist_ok=True)
    sizes = {}
    for p in photos:
        im, _ = read_upright(p)
        im.thumbnail((max_side, max_side), Image.LANCZOS)
        name = os.path.splitext(os.path.basename(p))[0] + ".jpg"
        im.save(os.path.join(img_dir, name), quality=95)
        sizes[name] = im.size
    return sizes


def size_groups(sizes: dict[str, tuple[int, int]]) -> dict[str, list[str]]:
    """Copy names by size ("WxH"), the sizes in the order their first photo comes in ``sizes``
    (so the first photo's size, the one the old rule kept, comes first and gets camera 1)."""
    groups: dict[str, list[str]] = {}
    for name, (w, h) in sizes.items():
        groups.setdefault(f"{w}x{h}", []).append(name)
    return groups


def _imported(db: str) -> dict[str, int]:
    """Copy name -> camera id of every photo feature extraction put into the database."""
    con = sqlite3.connect(db)
    try:
        return dict(con.execute("SELECT name, camera_id FROM images"))
    finally:
        con.close()


def _cameras_of_sizes(groups: dict[str, list[str]], imported: dict[str, int]) -> str:
    """"1600x1200: 49 photos, camera 1; 1200x1600: 31 photos, camera 2" (imported photos only)."""
    parts = []
    for size, names in groups.items():
        ids = sorted({imported[n] for n in names if n in imported})
        if ids:
            parts.append(f"{size}: {sum(n in imported for n in names)} photos, camera "
                         + ", ".join(str(i) for i in ids))
    return "; ".join(parts)


def _log(msg: str) -> None:
    print(f"capture-sfm: {msg}", flush=True)


def capture_sfm(raw: str, out: str, max_side: int = 1600, every: int = 1, threads: int = -1,
                single_camera: bool = False, sequential: int = 0, overwrite: bool = False,
                other_sizes: str = "camera") -> dict[str, Any]:
    """Build ``out`` (atomically) from the photos in ``raw``; returns what ``sfm.json`` records.
    ``sequential`` > 0 matches each photo with the next ``sequential`` ones (quadratic
    overlap, no loop detection) instead of with all photos. ``threads``: pycolmap's CPU
    threads, -1 all cores. ``other_sizes`` (with ``single_camera``): "camera" gives the
    copies of each size one shared camera, "drop" keeps the old rule (one camera, photos of
    another size than the first one's skipped by COLMAP) for models that must be reproduced."""
    from npbgpp_core.atomic import atomic_directory, holds

    if holds(out, raw):  # --overwrite replaced the photo folder with the model built from it
        raise CaptureSfmError(f"{out}: the output folder holds the photos it reads ({raw}); replacing it would "
                              "delete them: choose another output folder")
    if max_side < 16:
        raise CaptureSfmError(f"--max-side must be >= 16 px, got {max_side}")
    if sequential < 0:
        raise CaptureSfmError(f"--sequential must be >= 0 (0: exhaustive matching), got {sequential}")
    if threads < 1 and threads != -1:
        raise CaptureSfmError(f"--threads must be >= 1, or -1 for all cores, got {threads}")
    if other_sizes not in OTHER_SIZES:
        raise CaptureSfmError(f"other_sizes must be one of {OTHER_SIZES}, got {other_sizes!r}")
    if other_sizes == "drop" and not single_camera:  # without one camera no size is dropped
        raise CaptureSfmError("--drop-other-sizes applies only with --single-camera (without it every photo "
                              "has its own camera, whatever its size): add --single-camera or leave it out")
    photos = list_photos(raw, every)
    if len(photos) < MIN_REGISTERED:
        raise CaptureSfmError(f"{raw}: {len(photos)} photo(s) selected, at least {MIN_REGISTERED} are needed")
    try:
        with atomic_directory(out, overwrite=overwrite) as tmp:
            pycolmap = import_pycolmap()
            return _reconstruct(pycolmap, photos, tmp, raw, out, max_side, every, threads, single_camera,
                                sequential, other_sizes)
    except FileExistsError as exc:
        raise CaptureSfmError(str(exc)) from None


def _reconstruct(pycolmap: Any, photos: list[str], tmp: str, raw: str, out: str, max_side: int, every: int,
                 threads: int, single_camera: bool, sequential: int, other_sizes: str) -> dict[str, Any]:
    t0 = time.time()
    seconds: dict[str, float] = {}
    img_dir = os.path.join(tmp, "images")
    groups = size_groups(downscale_photos(photos, img_dir, max_side))
    per_size = {size: len(names) for size, names in groups.items()}
    seconds["downscale"] = time.time() - t0
    _log(f"{len(photos)} photos downscaled to <= {max_side} px ({seconds['downscale']:.0f}s): "
         + ", ".join(f"{n} of {size}" for size, n in per_size.items()))

    db = os.path.join(tmp, "database.db")
    ext = pycolmap.FeatureExtractionOptions()
    ext.num_threads = threads
    ext.max_image_size = max_side
    ext.sift.max_num_features = SIFT_MAX_FEATURES
    reader = pycolmap.ImageReaderOptions()
    reader.camera_model = CAMERA_MODEL
    if single_camera and other_sizes == "camera":
        # One extraction per size: COLMAP's SINGLE mode makes one camera per call and skips
        # images of another size than its first, so each call gets the copies of one size
        # (the flat images/ folder stays as prepare-capture reads it; PER_FOLDER would need
        # a subfolder per size).
        for names in groups.values():
            pycolmap.extract_features(db, img_dir, image_names=names, camera_mode=pycolmap.CameraMode.SINGLE,
                                      reader_options=reader, extraction_options=ext, device=pycolmap.Device.cpu)
    else:  # one camera per photo (AUTO), or the old rule: one camera, other sizes skipped by COLMAP
        mode = pycolmap.CameraMode.SINGLE if single_camera else pycolmap.CameraMode.AUTO
        pycolmap.extract_features(db, img_dir, camera_mode=mode, reader_options=reader, extraction_options=ext,
                                  device=pycolmap.Device.cpu)
    seconds["features"] = time.time() - t0 - sum(seconds.values())
    imported = _imported(db)
    cameras = len(set(imported.values()))
    _log(f"features extracted ({seconds['features']:.0f}s): {cameras} camera(s) for {len(imported)} photos"
         + (": " + _cameras_of_sizes(groups, imported) if single_camera
            else " (one per photo without --single-camera)"))
    not_imported = sorted(set(os.listdir(img_dir)) - set(imported))
    if not_imported:  # COLMAP skips a photo it cannot use with only a line in its own log
        kept = [size for size, names in groups.items() if any(n in imported for n in names)]
        why = (f"copies sizes {', '.join(per_size)}; --drop-other-sizes keeps one camera, of size {', '.join(kept)}"
               if single_camera and other_sizes == "drop" else "see COLMAP's log above")
        _log(f"WARNING: {len(not_imported)} of {len(photos)} photos were not imported by COLMAP ({why}): "
             f"{', '.join(not_imported[:5])}" + (" ..." if len(not_imported) > 5 else ""))
    if len(photos) - len(not_imported) < MIN_REGISTERED:
        raise CaptureSfmError(f"{raw}: only {len(photos) - len(not_imported)} photos could be imported "
                              f"({len(not_imported)} skipped by COLMAP, see its log), at least {MIN_REGISTERED} "
                              "are needed")

    mo = pycolmap.FeatureMatchingOptions()
    mo.num_threads = threads
    if sequential:
        so = pycolmap.SequentialPairingOptions()
        so.overlap = sequential
        so.quadratic_overlap = True
        so.loop_detection = False
        pycolmap.match_sequential(db, matching_options=mo, pairing_options=so, device=pycolmap.Device.cpu)
    else:
        pycolmap.match_exhaustive(db, matching_options=mo, device=pycolmap.Device.cpu)
    seconds["matching"] = time.time() - t0 - sum(seconds.values())
    _log(f"features matched ({seconds['matching']:.0f}s)")

    po = pycolmap.IncrementalPipelineOptions()
    po.num_threads = threads
    all_dir = os.path.join(tmp, "sparse_all")
    os.makedirs(all_dir)
    recs = pycolmap.incremental_mapping(db, img_dir, all_dir, po)
    seconds["mapping"] = time.time() - t0 - sum(seconds.values())
    models = [{"registered_images": int(r.num_reg_images()), "points": int(r.num_points3D())}
              for r in recs.values()]
    _log(f"mapping done ({seconds['mapping']:.0f}s): models {models}")
    if not recs:
        raise CaptureSfmError(f"{raw}: no model could be reconstructed from {len(photos)} photos (too few "
                              "matches: photos need to overlap; try more photos, a lower --every, or "
                              "--sequential for a video-like sequence)")
    best = max(recs.values(), key=lambda r: r.num_reg_images())
    if best.num_reg_images() < MIN_REGISTERED:
        raise CaptureSfmError(f"{raw}: the largest model registers only {best.num_reg_images()} of {len(photos)} "
                              f"photos, at least {MIN_REGISTERED} are needed")
    dst = os.path.join(tmp, "sparse", "0")
    os.makedirs(dst)
    best.write(dst)
    shutil.rmtree(all_dir)  # every model is summarised in sfm.json; only the largest is used
    seconds["total"] = time.time() - t0
    record = {
        "tool": "python -m headless_train capture-sfm",
        "pycolmap_version": pycolmap.__version__,
        "raw": os.path.abspath(raw),
        "options": {"max_side": max_side, "every": every, "threads": threads, "single_camera": single_camera,
                    "other_sizes": other_sizes if single_camera else None,
                    "matching": f"sequential (overlap {sequential}, quadratic)" if sequential else "exhaustive",
                    "sequential": sequential, "camera_model": CAMERA_MODEL,
                    "sift_max_num_features": SIFT_MAX_FEATURES, "device": "cpu"},
        "images": len(photos),
        "photos_per_size": per_size,
        "cameras": cameras,
        "photos_not_imported": not_imported,
        "registered_images": int(best.num_reg_images()),
        "points": int(best.num_points3D()),
        "mean_reprojection_error_px": float(best.compute_mean_reprojection_error()),
        "models": models,
        "model_cameras": _model_cameras(best),
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
    with open(os.path.join(tmp, "sfm.json"), "w") as f:
        json.dump(record, f, indent=2)
    _log(f"{out}: registered {record['registered_images']}/{len(photos)} photos, {record['points']} points, "
         f"mean reprojection error {record['mean_reprojection_error_px']:.3f} px ({seconds['total']:.0f}s)")
    return record


def _model_cameras(rec: Any) -> list[dict[str, Any]]:
    """The model's cameras: id, size, COLMAP model and parameters, and how many registered
    photos use each (what tells whether the sizes' focal lengths agree, as one lens's do)."""
    used: dict[int, int] = {}
    for img in rec.images.values():
        if img.has_pose:
            used[img.camera_id] = used.get(img.camera_id, 0) + 1
    return [{"camera_id": int(cid), "size": f"{cam.width}x{cam.height}", "model": cam.model.name,
             "params": [float(x) for x in cam.params], "registered_images": used.get(cid, 0)}
            for cid, cam in sorted(rec.cameras.items())]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m headless_train capture-sfm", description=__doc__.split("\n\n")[0])
    p.add_argument("raw", help="folder of photos (.jpg/.jpeg/.png)")
    p.add_argument("out", help="output folder (written atomically): images/, sparse/0/, database.db, sfm.json")
    p.add_argument("--max-side", type=int, default=1600, help="longer side of the copies in pixels (default 1600)")
    p.add_argument("--every", type=int, default=1, help="use every N-th photo in name order (default 1)")
    p.add_argument("--threads", type=int, default=-1,
                   help="CPU threads for pycolmap (default -1: all cores; the project's benchmarks pass 1)")
    p.add_argument("--single-camera", action="store_true",
                   help="one lens and zoom: the photos of one size share one camera, each other size (the other "
                        "orientation) gets one shared camera of its own (default: a camera per photo)")
    p.add_argument("--drop-other-sizes", action="store_true",
                   help="with --single-camera, the rule before 2026-12-01: ONE camera, and COLMAP skips every photo "
                        "whose size differs from the first photo's (kept to reproduce models made so)")
    p.add_argument("--sequential", type=int, default=0, metavar="OVERLAP",
                   help="match each photo with the next OVERLAP ones (video-like order) instead of all pairs")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    oom.add_debug_flag(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Command line entry; bad input (or running out of memory) exits with status 2 and one line
    on stderr, the error with its traceback with ``--debug`` (:func:`headless_train.oom.run_command`)."""
    a = parse_args(sys.argv[1:] if argv is None else argv)
    oom.step(f"recovering a model from the photos of {a.raw}",
             "lower --max-side or use fewer photos (--every), or run it on a computer with more memory")

    def body() -> int:
        capture_sfm(a.raw, a.out, a.max_side, a.every, a.threads, a.single_camera, a.sequential, a.overwrite,
                    "drop" if a.drop_other_sizes else "camera")
        return 0

    return oom.run_command(body, (CaptureSfmError,), a.debug, "cpu", gpu_fix="", prefix="capture-sfm: ")


if __name__ == "__main__":
    sys.exit(main())
