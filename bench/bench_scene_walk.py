"""Speed of the scene-points walk over a dense instancer (``surface_points.rendered_entries``).

    python bench/bench_scene_walk.py                        # 317 x 317 grid instancing a triangle, 7 walks
    python bench/bench_scene_walk.py --against c4ea18b      # interleaved with the walk of that commit
    python bench/bench_scene_walk.py --case nested --quick  # smoke test: a 20 x 20 grid
    python bench/bench_scene_walk.py --case nodes_off_for_renders  # Geometry Nodes' triangles

A grid (``--side`` vertices a side; 317 makes 100,489) instancing its child at its vertices, in
real bpy, the viewport's depsgraph (``procedural.build_dense_instancer_scene``): ``single``, a
child triangle (one entry per vertex); ``nested``, a child empty instancing a collection of two
triangles (three per vertex: the empty and the two nested in it); ``nodes``, no child, the
grid's Geometry Nodes putting a triangle on each vertex, ``nodes_off_for_renders`` the same with
its Show Instancer off for renders only (each entry asked whether it holds instances). Prints
the median and range of the walk's seconds per implementation, each walk run in turn with the
other (``--against``) so that the machine's load falls on both alike; the entries both yield are
checked equal first. Writes nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def module_at(revision: str) -> ModuleType:
    """``blender_addon.datagen.surface_points`` as committed at ``revision`` (git), loaded beside
    the working tree's as a module of the same package, so that its relative imports resolve."""
    source = subprocess.run(["git", "show", f"{revision}:blender_addon/datagen/surface_points.py"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    with tempfile.TemporaryDirectory(prefix="walk_") as folder:  # read once: the module keeps its code
        path = Path(folder) / "surface_points_then.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location("blender_addon.datagen._surface_points_then", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def entries(walk: Any, depsgraph: Any) -> list[tuple[Any, ...]]:
    """What ``walk`` yields, as comparable values: each entry's id, object, instancer and within."""
    return [(tuple(inst.persistent_id), inst.object.original.name, stands_for.name, tuple(o.name for o in within))
            for inst, stands_for, within in walk(depsgraph)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=("single", "nested", "nodes", "nodes_off_for_renders"), default="single")
    parser.add_argument("--side", type=int, default=317, help="grid vertices a side (317: 100,489 instances)")
    parser.add_argument("--repeats", type=int, default=7, help="timed walks per implementation")
    parser.add_argument("--against", default="", help="a git revision whose walk is timed in turn with this one")
    parser.add_argument("--quick", action="store_true", help="a 20 x 20 grid, 2 repeats (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.side, args.repeats = 20, 2
    if args.side < 2 or args.repeats < 1:
        parser.error("--side must be at least 2 and --repeats at least 1")
    from blender_addon.datagen import surface_points
    from blender_addon.datagen.procedural import build_dense_instancer_scene

    walks = {"working tree": surface_points.rendered_entries}
    if args.against:
        walks = {args.against: module_at(args.against).rendered_entries, **walks}
    nodes = {"nodes": True, "nodes_off_for_renders": False}.get(args.case)
    _scene, depsgraph = build_dense_instancer_scene(args.side, nested=args.case == "nested",
                                                    nodes_shown_in_renders=nodes)
    yielded = {name: entries(walk, depsgraph) for name, walk in walks.items()}
    first = next(iter(yielded.values()))
    if any(other != first for other in yielded.values()):
        print("error: the walks yield different entries", file=sys.stderr)
        return 1
    seconds: dict[str, list[float]] = {name: [] for name in walks}
    for _ in range(args.repeats):
        for name, walk in walks.items():
            start = time.perf_counter()
            for _entry in walk(depsgraph):
                pass
            seconds[name].append(time.perf_counter() - start)
    print(f"{args.case}: {args.side} x {args.side} grid, {len(first):,} entries yielded, {args.repeats} walks each")
    print("| walk | median s | min s | max s |")
    print("|---|---|---|---|")
    for name, times in seconds.items():
        print(f"| {name} | {statistics.median(times):.3f} | {min(times):.3f} | {max(times):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
