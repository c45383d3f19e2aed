"""How much of each held-out view a point cloud reaches (a diagnostic for bench_quality).

    python bench/cloud_coverage.py /work/captures_dense/mouse --pc-names dense.ply dense_fill.ply

Held-out views and image sizes as ``bench_quality.py`` chooses them (test split or every
8th view; long side 256 px; clouds above 300k points subsampled with seed 123). Per cloud:
``hit`` = share of held-out pixels a projected point lands on (the nearest-point raster
NPBG++ starts from), ``covered`` = share within 4 px of such a pixel (9 x 9 dilation).
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from bench_quality import split_views

from npbgpp_core import rasterize
from npbgpp_core.datasets import load_scene
from npbgpp_core.image_size import fit_long_side


def coverage(folder: str, pc_name: str | None, max_side: int = 256, max_points: int = 300_000) -> dict[str, float]:
    """``{'points', 'hit', 'covered'}`` of one cloud over the scene's held-out views."""
    scene = load_scene(folder, pc_name=pc_name) if pc_name else load_scene(folder)
    if scene.points.shape[0] > max_points:
        scene = scene.subsample_points(max_points, seed=123)
    _, held = split_views(scene)
    points = torch.as_tensor(scene.points, dtype=torch.float32)
    hit = covered = total = 0
    for i in held:
        cam = scene.camera(i, fit_long_side(tuple(scene.views[i].camera.image_size), max_side))
        on = (rasterize(points, cam, scales=(1.0,))[0] >= 0).float()
        near = F.max_pool2d(on[None, None], 9, stride=1, padding=4)[0, 0]
        hit += float(on.sum())
        covered += float(near.sum())
        total += on.numel()
    return {"points": int(points.shape[0]), "hit": hit / total, "covered": covered / total}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("scenes", nargs="+", help="scene folders (any load_scene format)")
    p.add_argument("--pc-names", nargs="+", default=[None], help="clouds inside each scene (default: the scene's own)")
    p.add_argument("--max-side", type=int, default=256)
    a = p.parse_args(argv)
    print("| scene | cloud | points | held-out pixels hit | covered (within 4 px) |")
    print("|---|---|---|---|---|")
    for folder in a.scenes:
        for name in a.pc_names:
            c = coverage(folder, name, a.max_side)
            print(f"| {folder.rstrip('/').split('/')[-1]} | {name or 'default'} | {c['points']:,} | "
                  f"{100 * c['hit']:.1f}% | {100 * c['covered']:.1f}% |")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
