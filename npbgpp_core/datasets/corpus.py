"""A training corpus folder: one scene per sub-folder, each in a layout ``load_scene``
reads (the environment corpus writes NeRF-Synthetic folders ``env_<seed>``; prepared
captures are COLMAP folders), optionally with point-cloud variants ``points/<kind>.ply``
(``mvs``, ``sfm``, ``lidar``, ``surface``) beside the default cloud, so training can pick
one per sample.

``corpus_scenes(root)`` lists the scene folders (sorted; hidden folders and the
``<name>.partial-<pid>`` folders a renderer is still writing, ``atomic.is_listed_name``, are
skipped), ``point_cloud_variants(scene)`` maps each kind to
its file, and ``check_corpus(root)`` loads every scene's cameras and clouds and raises a
``DatasetError`` naming the first bad file. ``python -m headless_train check-corpus ROOT``
runs the check from the command line.
"""

from __future__ import annotations

import os

from ..atomic import is_listed_name, is_partial_name
from .detect import detect_format
from .errors import DatasetError

POINT_KINDS = ("mvs", "sfm", "lidar", "surface")
VARIANT_DIR = "points"


def corpus_scenes(root: str) -> list[str]:
    """Scene folders directly under ``root`` (sorted by name). Every sub-folder must be a
    scene, except hidden ones and unfinished ``*.partial-<pid>`` folders (a renderer is still
    writing them, or was killed while writing them; ``atomic.is_listed_name``): a folder
    that is neither raises an error naming it rather than being left out."""
    if not os.path.isdir(root):
        raise DatasetError(f"{root}: corpus folder not found")
    names = sorted(n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n)) and not n.startswith("."))
    scenes = []
    for n in names:
        if not is_listed_name(n):
            continue
        path = os.path.join(root, n)
        try:
            detect_format(path)
        except DatasetError as exc:
            raise DatasetError(f"{path}: not a scene folder of corpus {root}: {exc}") from exc
        scenes.append(path)
    if not scenes:
        partial = [n for n in names if is_partial_name(n)]
        extra = f" ({len(partial)} unfinished *.partial folder(s))" if partial else ""
        raise DatasetError(f"{root}: no scene folders found{extra}")
    return scenes


def point_cloud_variants(scene: str, kinds: tuple[str, ...] | None = None) -> dict[str, str]:
    """``{kind: path}`` of ``scene/points/<kind>.ply``; ``kinds`` given: each must exist."""
    folder = os.path.join(scene, VARIANT_DIR)
    found = {}
    if os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            stem, ext = os.path.splitext(name)
            if ext.lower() == ".ply":
                path = os.path.join(folder, name)
                if os.path.getsize(path) == 0:
                    raise DatasetError(f"{path}: empty file")
                found[stem] = path
    if kinds is not None:
        missing = [k for k in kinds if k not in found]
        if missing:
            have = ", ".join(found) or "none"
            raise DatasetError(f"{folder}: point cloud variant(s) {', '.join(missing)} missing "
                               f"(expected {VARIANT_DIR}/<kind>.ply; present: {have})")
    return found


def check_corpus(root: str, kinds: tuple[str, ...] | None = None) -> list[dict]:
    """Load every scene of ``root`` (cameras, image sizes, default cloud and each variant
    cloud); returns one summary per scene. The first bad file raises ``DatasetError``."""
    from ..ply import load_scene_cloud
    from .loader import load_scene

    out = []
    for scene in corpus_scenes(root):
        data = load_scene(scene)
        counts = {}
        for kind, path in point_cloud_variants(scene, kinds).items():
            try:
                pc = load_scene_cloud(path)  # a splat variant: as a scene's own splat cloud
            except (ValueError, OSError) as exc:
                raise DatasetError(f"{path}: not a readable PLY point cloud ({exc})") from exc
            if len(pc.points) == 0:
                raise DatasetError(f"{path}: point cloud has no points")
            counts[kind] = len(pc.points)
        out.append(dict(scene=scene, format=data.format, views=len(data.views), train=len(data.train),
                        test=len(data.test), points=len(data.points), variants=counts))
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m headless_train check-corpus ROOT [--kinds mvs,sfm,lidar,surface]``"""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m headless_train check-corpus",
                                description="Check that every scene of a corpus folder loads (its cameras, "
                                            "images and point-cloud variants); exit status 2 names the first bad "
                                            "file.")
    p.add_argument("root", help="corpus folder: one scene folder per subfolder")
    p.add_argument("--kinds", default=None,
                   help="comma-separated point variants every scene must have (points/<kind>.ply, e.g. mvs,sfm)")
    a = p.parse_args(argv)
    kinds = tuple(k for k in a.kinds.split(",") if k) if a.kinds else None
    try:
        rows = check_corpus(a.root, kinds)
    except DatasetError as exc:
        print(f"check-corpus: {exc}", file=sys.stderr)
        return 2
    for r in rows:
        var = " ".join(f"{k}={v}" for k, v in r["variants"].items())
        print(f"{os.path.basename(r['scene'])}: {r['format']}, {r['train']} train / {r['test']} test views, "
              f"{r['points']} points {var}")
    print(f"{len(rows)} scenes OK")
    return 0
