"""How a capture's dense cloud agrees with its own SfM points (real captures have no true surface).

    python bench/densify_vs_sparse.py /work/captures/lund /work/captures/beer --max-image-size 384 [--plane-tilts 80]

Densifies each capture (``densify_scene``, default options but those given; one torch
thread) and compares the cloud with the capture's sparse points, which came from feature
matching, not from densify: ``sparse covered`` = share of the sparse points with a dense
point within 1% of the extent, ``dense near sparse`` = share of the dense points with a
sparse point that near (extent: the diagonal of the sparse points' 2nd-98th percentile box,
so a few stray SfM points do not set it). Exact nearest neighbours (``torch.cdist`` in
blocks). The second share is low on object captures, where most dense points lie between
sparse ones: it compares runs, it is not an accuracy.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import numpy as np
import torch
from bench_common import ROOT  # noqa: F401  (puts the repository on sys.path)

from npbgpp_core.datasets import load_scene
from npbgpp_core.densify import densify_scene


def nearest_distance(query: np.ndarray, ref: np.ndarray, block: int = 2048) -> np.ndarray:
    """Distance from each of ``query`` (N, 3) to its nearest point of ``ref`` (M, 3)."""
    q = torch.as_tensor(query, dtype=torch.float64)
    r = torch.as_tensor(ref, dtype=torch.float64)
    out = []
    for s in range(0, len(q), block):
        d = torch.full((min(block, len(q) - s),), float("inf"), dtype=torch.float64)
        for t in range(0, len(r), 32 * block):
            d = torch.minimum(d, torch.cdist(q[s : s + block], r[t : t + 32 * block]).min(dim=1).values)
        out.append(d)
    return torch.cat(out).numpy()


def agreement(folder: str, **options) -> dict[str, float]:
    """Points, shares (0-1), wall and CPU seconds of one densify run of ``folder``."""
    scene = load_scene(folder)
    sparse = np.asarray(scene.points, np.float64)
    extent = float(np.linalg.norm(np.percentile(sparse, 98, axis=0) - np.percentile(sparse, 2, axis=0)))
    cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    dense = np.asarray(densify_scene(scene, **options).points, np.float64)
    cpu1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
    tol = 0.01 * extent
    return {
        "points": len(dense), "seconds": wall,
        "cpu_seconds": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
        "sparse_covered": float((nearest_distance(sparse, dense) < tol).mean()) if len(dense) else 0.0,
        "dense_near_sparse": float((nearest_distance(dense, sparse) < tol).mean()) if len(dense) else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("scenes", nargs="+", help="capture folders with a sparse cloud (any load_scene format)")
    p.add_argument("--max-image-size", type=int, default=384)
    p.add_argument("--plane-tilts", type=float, nargs="*", default=[], metavar="DEG")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    print("| capture | plane tilts | points | sparse covered % | dense near sparse % | seconds | CPU s | load avg |")
    print("|---|---|---|---|---|---|---|---|")
    for folder in a.scenes:
        r = agreement(folder, max_image_size=a.max_image_size, plane_tilts=tuple(a.plane_tilts))
        tilts = " ".join(f"{t:g}" for t in a.plane_tilts) or "none"
        print(f"| {folder.rstrip('/').split('/')[-1]} | {tilts} | {r['points']:,} | {100 * r['sparse_covered']:.1f} | "
              f"{100 * r['dense_near_sparse']:.1f} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | "
              f"{os.getloadavg()[0]:.1f} |")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
