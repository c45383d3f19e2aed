"""``python -m headless_train prepare-capture SRC --out DST [--max-size 512] ...``: the command
line of :func:`npbgpp_core.datasets.capture.prepare_capture` (downscale, undistort and orient a
COLMAP photo capture into a folder the loaders read). Here, not in the core, so that it ends on
an error as the other commands do (:func:`headless_train.oom.run_command`)."""

from __future__ import annotations

import argparse

from npbgpp_core.datasets.capture import ORIENTS, PREPARE_BYTES_PER_PIXEL, USES, prepare_capture
from npbgpp_core.datasets.errors import DatasetError

from . import oom

# What to do when reading the photos runs out of memory (the output folder is atomic: nothing is written).
MEMORY_ADVICE = (f"it reads one photo at a time at its own size, about {PREPARE_BYTES_PER_PIXEL} bytes a pixel (a "
                 "200-MP photo: 1.7 GB): downscale the largest photos first (any image editor: the cameras are scaled "
                 "to match) or run it on a computer with more memory; nothing was written")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m headless_train prepare-capture",
        description="Downscale (and undistort) a COLMAP photo capture into a folder the loaders read.",
    )
    p.add_argument("src", help="capture folder: images/ + sparse/0/{cameras,images,points3D}.(bin|txt)")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--max-size", type=int, default=512, help="longer image side in pixels (default 512)")
    p.add_argument("--images-dir", default="images", help="photo folder inside SRC (default images)")
    p.add_argument("--format", choices=("jpg", "png"), default="jpg", help="output image format (default jpg q95)")
    p.add_argument("--repo", default=None, help="provenance: source repository (owner/name)")
    p.add_argument("--commit", default=None, help="provenance: commit the files came from")
    p.add_argument("--licence", default=None, help="provenance: the repository's licence")
    p.add_argument("--use", choices=USES, default=None, help="provenance: train or validation only")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--orient", choices=ORIENTS, default="keep",
                   help="keep the poses (default) or rotate the capture so the cameras' mean up is +Z")
    oom.add_debug_flag(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """0 on success, 2 with one line (``prepare-capture: ...``) on bad input or when memory runs out."""
    a = parse_args(argv)
    prov = {k: v for k, v in (("repo", a.repo), ("commit", a.commit), ("licence", a.licence), ("use", a.use)) if v}
    oom.step("reading the photos", MEMORY_ADVICE)

    def body() -> int:
        s = prepare_capture(a.src, a.out, a.max_size, a.images_dir, a.format, prov, a.overwrite, a.orient)
        print(f"{a.out}: {s['images']} images ({', '.join(s['image_sizes'])}), {s['points']} points, "
              f"{s['undistorted_images']} undistorted")
        return 0

    return oom.run_command(body, (DatasetError,), a.debug, "cpu", gpu_fix="", prefix="prepare-capture: ")
