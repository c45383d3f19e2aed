"""Clouds a dataset folder holds besides the one its loader read (COLMAP's dense
fused.ply beside the sparse points3D the loader reads, nerfstudio's exports): listed by
name and size so that the add-on and the command line can say so. Torch-free (the add-on
formats the note in Blender's Python)."""

from __future__ import annotations

import os
from collections.abc import Sequence

# Folders below a dataset folder where other tools leave clouds that no loader reads by
# default: COLMAP's dense reconstruction (dense/, dense/<n>/: fused.ply, meshed-*.ply) and
# nerfstudio's ns-export pointcloud (exports/pcd/). The folder itself holds our densify's
# dense.ply, nerfstudio's sparse_pc.ply, fused.ply copied beside sparse/. Not points/: a
# corpus's variants, which datasets.point_cloud_variants names.
OTHER_CLOUD_FOLDERS = ("", "dense", "dense/*", "exports/pcd")
NOTE_MAX_CLOUDS = 4  # names in a note; the rest are counted


def other_clouds(root: str, read: str | None) -> list[tuple[str, int]]:
    """``(path relative to root with "/", size in bytes)`` of each ``.ply`` file in the
    dataset folder ``root`` and in :data:`OTHER_CLOUD_FOLDERS` that is not ``read`` (the
    cloud the loader read; None: none, or not a file there such as COLMAP's points3D), in
    order of path. Names and sizes only (no file is opened): a hint that the scene has
    another cloud, e.g. COLMAP's dense fused.ply, which NPBG++ renders better from."""
    from ..atomic import same_file

    if not root:
        return []
    folders: list[str] = []
    for rel in OTHER_CLOUD_FOLDERS:
        if rel.endswith("/*"):
            parent = os.path.join(root, rel[:-2])
            try:
                subs = sorted(e.name for e in os.scandir(parent) if e.is_dir())
            except OSError:
                continue
            folders += [f"{rel[:-2]}/{name}" for name in subs]
        else:
            folders.append(rel)
    found = []
    for rel in folders:
        try:
            entries = list(os.scandir(os.path.join(root, rel)))
        except OSError:  # no such folder, or not readable: nothing to hint at
            continue
        for e in entries:
            if not e.name.lower().endswith(".ply") or not e.is_file():
                continue
            if read and same_file(e.path, read):
                continue
            try:
                size = e.stat().st_size
            except OSError:
                continue
            found.append((f"{rel}/{e.name}" if rel else e.name, size))
    return sorted(found)


def other_clouds_note(clouds: Sequence[tuple[str, int]], choose: str) -> str:
    """One line naming ``clouds`` (:func:`other_clouds`) and how to pick one (``choose``,
    the caller's setting, e.g. "Point Cloud"); "" when there are none."""
    if not clouds:
        return ""
    names = [f"{name} ({size_text(size)})" for name, size in clouds[:NOTE_MAX_CLOUDS]]
    if len(clouds) > NOTE_MAX_CLOUDS:
        names.append(f"{len(clouds) - NOTE_MAX_CLOUDS} more .ply")
    return f"Also in the folder: {', '.join(names)}; choose {'it' if len(clouds) == 1 else 'one'} with {choose}"


def size_text(size: int) -> str:
    """A file size for a message: B, kB, then MB with one decimal (2500.0 MB, not 2.5 GB)."""
    if size < 1_000_000:
        return f"{size / 1000:.0f} kB" if size >= 1000 else f"{size} B"
    return f"{size / 1e6:.1f} MB"
