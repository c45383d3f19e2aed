"""Cost of the clip-range notes for one frame of 1M points, on the CPU: F12's exact count
(``camera_bridge.clipped``, asked once per rendered frame) against the viewport's estimate
(``viewport.viewport_clip_note``: a strided subset of ``CLIP_ESTIMATE_POINTS``), with every
point inside the range and with a quarter clipped. ``python -m bench.bench_clip_note``;
prints one JSON line (best of ``--repeat`` runs, milliseconds)."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import numpy as np


def best_ms(fn: Callable[[], object], repeat: int) -> float:
    """The fastest of ``repeat`` calls of ``fn``, in milliseconds (the least disturbed by
    other work on a shared machine)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--points", type=int, default=1_000_000)
    p.add_argument("--repeat", type=int, default=9)
    args = p.parse_args()
    from blender_addon.camera_bridge import CameraGeometry, clipped, clipped_estimate
    from blender_addon.viewport import viewport_clip_note

    pts = np.random.default_rng(0).uniform(-1.0, 1.0, (args.points, 3)).astype(np.float32)
    K = np.array([[500.0, 0.0, 320.0], [0.0, 500.0, 240.0], [0.0, 0.0, 1.0]])
    R, t = np.eye(3), np.array([0.0, 0.0, 4.0])  # depths 3 .. 5
    out = {"points": args.points}
    for case, near in (("inside", 0.1), ("quarter_clipped", 3.5)):
        geo = CameraGeometry(K, R, t, (480, 640), near, 100.0)
        for name, fn in (("f12_exact", clipped), ("viewport_estimate", clipped_estimate),
                         ("viewport_note", lambda g, p: viewport_clip_note(g, p, ""))):
            out[f"{name}_{case}_ms"] = round(best_ms(lambda fn=fn, geo=geo: fn(geo, pts), args.repeat), 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
