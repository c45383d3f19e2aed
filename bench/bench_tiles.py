"""Peak memory of one large NPBG++ frame rendered whole vs in tiles (SceneRenderer.render
with max_pixels), on the CPU: ``python -m bench.bench_tiles --size 4000 --mode tiled``.
Run each mode in its own process (peak RSS is per process); prints one JSON line."""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size", type=int, default=4000, help="frame side in pixels")
    p.add_argument("--mode", choices=("whole", "tiled"), required=True)
    p.add_argument("--tile", type=int, default=2048, help="tile side (the add-on's Tile Size)")
    p.add_argument("--points", type=int, default=200_000)
    args = p.parse_args()
    torch.set_num_threads(1)
    from npbgpp_core import Camera
    from npbgpp_core.pretrained import load_pretrained_npbgpp
    from npbgpp_core.scene import NeuralScene

    torch.manual_seed(0)
    model = load_pretrained_npbgpp(world_up=(0, 0, 1))
    pts = torch.rand(args.points, 3) * 2 - 1
    views = [Camera.look_at((3 * torch.cos(torch.tensor(a)).item(), 3 * torch.sin(torch.tensor(a)).item(), 1.0),
                            (0, 0, 0), (0, 0, 1), 50.0, (64, 64)) for a in (0.0, 1.5, 3.0, 4.5)]
    with torch.no_grad():
        agg = model.aggregate(pts, torch.rand(4, 3, 64, 64), views)
    renderer = NeuralScene.from_aggregated(model, agg).renderer("cpu")
    del model
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cam = Camera.look_at((0.5, -3.5, 0.8), (0, 0, 0), (0.2, 0, 1), 50.0, (args.size, args.size))
    start = time.perf_counter()
    out = renderer.render(cam, max_pixels=args.tile ** 2 if args.mode == "tiled" else 0)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"size": args.size, "mode": args.mode, "tile": args.tile, "seconds": round(seconds, 1),
                      "peak_rss_mb": round(peak), "rss_before_render_mb": round(base),
                      "mean": float(out.mean())}))


if __name__ == "__main__":
    main()
