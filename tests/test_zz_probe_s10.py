import os, sys
import bpy
import numpy as np
import pytest
from test_addon_render import addon, scene, _write_nerf_dataset, MODULE  # noqa


def test_probe(scene, capfd):
    sc, cam = scene["scene"], scene["camera"]
    root = scene["dir"] / "nerf"
    _write_nerf_dataset(root, [cam], scene["points"], scene["colors"])
    assert bpy.ops.import_scene.npbgpp_dataset(directory=str(root)) == {"FINISHED"}
    sc.npbgpp.weights = ""
    def run(label, f):
        try:
            r = f()
        except Exception as exc:
            r = f"EXC {type(exc).__name__}: {exc}"
        print(f"PROBE {label}: {r}", file=sys.stderr)
    obj = sc.npbgpp.point_object
    bpy.data.objects.remove(obj)
    run("agg after delete", lambda: bpy.ops.npbgpp.aggregate(filepath=str(scene["dir"] / "a.npbgpp")))
    print("PROBE point obj now", sc.npbgpp.point_object, file=sys.stderr)
    sc.npbgpp.output = "NEURAL"
    run("render", lambda: bpy.ops.render.render(write_still=False))
    run("fit", lambda: bpy.ops.npbgpp.fit(steps=50))
    print("PROBE bundle", sc.npbgpp.bundle, file=sys.stderr)
    if sc.npbgpp.point_object: bpy.data.objects.remove(sc.npbgpp.point_object)
    run("render2", lambda: bpy.ops.render.render(write_still=False))
    # object unlinked from scene but alive
    run("agg2", lambda: bpy.ops.npbgpp.aggregate(filepath=str(scene["dir"] / "b.npbgpp")))
    o = sc.npbgpp.point_object
    print("PROBE obj", o, file=sys.stderr)
    if o:
        for c in list(o.users_collection): c.objects.unlink(o)
    run("agg3 unlinked", lambda: bpy.ops.npbgpp.aggregate(filepath=str(scene["dir"] / "c.npbgpp")))
    run("render3", lambda: bpy.ops.render.render(write_still=False))
