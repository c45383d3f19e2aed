"""Blender-side dataset generation: procedural scenes, Cycles renders of a scene into the
NeRF-Synthetic layout, and coloured points sampled on mesh surfaces.

Run as ``python -m blender_addon.datagen --procedural NAME | --blend FILE ...`` (see
``render.py``); it ships inside the add-on (its "Export dataset" operator uses it). This is
where ``bpy``, ``mathutils`` and ``_cycles`` are used (imported inside functions, so the
package imports without Blender); ``npbgpp_core`` reads what it writes
(``npbgpp_core.datasets.load_scene``) and never imports it.

Public names::

    render_procedural_scene(name, out_dir, views, size, seed=0, ...)
    render_views_of_current_scene(bpy_scene, out_dir, views, size, ...)
    build_procedural_scene(name, seed=0), remove_scene(scene)
    PROCEDURAL_SCENES: names accepted by render_procedural_scene (plus ``random_<seed>``)
    sample_surface_points(bpy_scene, count, seed=0, objects=None) -> (points, sRGB colours)
    render_env_scene(seed, out_dir, views=24, size=(256, 256), ...), build_env_scene(seed)
        environment scenes for the training corpus (``environments.py``; camera paths in
        ``camera_paths.py``, point-cloud simulators in ``pointsim.py`` and photo
        degradations in ``photo.py`` are numpy-only and import without Blender)
"""

from __future__ import annotations

from typing import Any

from .procedural import PROCEDURAL_SCENES, build_procedural_scene, remove_scene
from .render import RenderSummary, render_procedural_scene, render_views_of_current_scene
from .surface_points import sample_surface_points

__all__ = [
    "PROCEDURAL_SCENES",
    "RenderSummary",
    "build_env_scene",
    "build_procedural_scene",
    "remove_scene",
    "render_env_scene",
    "render_procedural_scene",
    "render_views_of_current_scene",
    "sample_surface_points",
]


def __getattr__(name: str) -> Any:
    # environments loads lazily: imported here, ``python -m blender_addon.datagen.environments``
    # (the corpus command) printed runpy's "found in sys.modules ... unpredictable behaviour"
    if name in ("build_env_scene", "render_env_scene"):
        from . import environments

        return getattr(environments, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
