"""A private Blender user folder for the add-on tests (installed extensions, preferences),
removed at exit. Call before the first ``import bpy`` of the process: bpy reads
BLENDER_USER_RESOURCES once, when it starts."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile


def use_private_blender_user_folder() -> None:
    if "bpy" in sys.modules or "BLENDER_USER_RESOURCES" in os.environ:
        return
    folder = tempfile.mkdtemp(prefix="npbgpp-bpy-user-")
    os.environ["BLENDER_USER_RESOURCES"] = folder
    atexit.register(shutil.rmtree, folder, True)
