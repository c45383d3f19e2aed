"""The same zip installs through the legacy add-on installer (bl_info) and works."""

from __future__ import annotations

import os
import sys

import pytest
from _blender_user import use_private_blender_user_folder

use_private_blender_user_folder()
bpy = pytest.importorskip("bpy")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_legacy_addon_install_enable_render_disable(tmp_path):
    import addon_utils

    if "bl_ext.user_default.npbgpp" in bpy.context.preferences.addons:
        pytest.skip("the extension build is enabled in this process")
    sys.path.insert(0, ROOT)
    import build_addon
    from npbgpp_core.ply import save_ply

    zip_path = build_addon.build(str(tmp_path / "dist"))
    assert bpy.ops.preferences.addon_install(filepath=zip_path, overwrite=True) == {"FINISHED"}
    module = addon_utils.enable("npbgpp", default_set=True)
    try:
        assert module is not None and module.bl_info["blender"] == (4, 2, 0)
        bpy.ops.wm.read_homefile(use_empty=True)
        save_ply(str(tmp_path / "p.ply"), [[0.0, 0.0, 0.0]], [[1.0, 0.5, 0.0]])
        assert bpy.ops.import_scene.npbgpp_ply(filepath=str(tmp_path / "p.ply")) == {"FINISHED"}
        sc = bpy.context.scene
        cam = bpy.data.objects.new("C", bpy.data.cameras.new("C"))
        sc.collection.objects.link(cam)
        cam.location = (0.0, -5.0, 0.0)
        cam.rotation_euler = (1.5707963, 0.0, 0.0)
        sc.camera = cam
        sc.render.engine = "NPBGPP"
        sc.npbgpp.output = "POINTS"
        sc.npbgpp.worker_mode = "IN_PROCESS"
        sc.render.resolution_x, sc.render.resolution_y = 33, 21
        sc.render.film_transparent = True
        sc.view_settings.view_transform = "Standard"
        sc.render.dither_intensity = 0.0
        sc.render.filepath = str(tmp_path / "o.png")
        bpy.ops.render.render(write_still=True)
        import numpy as np
        from PIL import Image

        img = np.asarray(Image.open(tmp_path / "o.png"))
        assert np.argwhere(img[..., 3] > 0).tolist() == [[10, 16]]  # the centre pixel
        assert img[10, 16].tolist() == [255, 128, 0, 255]
    finally:
        addon_utils.disable("npbgpp", default_set=True)
    assert not hasattr(bpy.types.Scene, "npbgpp")


def test_zip_ships_datagen_and_vendored_core_not_the_demo(tmp_path):
    import zipfile

    sys.path.insert(0, ROOT)
    import build_addon

    names = set(zipfile.ZipFile(build_addon.build(str(tmp_path / "dist"))).namelist())
    assert {"npbgpp/__init__.py", "npbgpp/srgb.py", "npbgpp/datagen/__init__.py", "npbgpp/datagen/render.py",
            "npbgpp/datagen/surface_points.py", "npbgpp/vendor/npbgpp_core/__init__.py"} <= names
    assert "npbgpp/demo.py" not in names  # it imports build_addon, which the zip does not hold
    assert "npbgpp/journey.py" not in names  # the same: it installs the zip build_addon makes
    assert not [n for n in names if n.startswith("npbgpp/vendor/npbgpp_core/datasets/") and "render" in n]
