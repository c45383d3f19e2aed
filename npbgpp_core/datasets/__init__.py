"""Datasets: loading published scene layouts into cameras + images + point clouds, training
samples, and rendering new scenes with Blender.

Public names::

    load_scene(path, format=None, **options) -> SceneData
    SceneData, View, Distortion, DatasetError
    detect_format(path) -> str
    sample_crop(scene, index, rng, image_size=256, zoom_range=(1, 1), random_shift=True)
    select_input_views(scene, target, candidates, count, rng=None) -> list[int]
    render_procedural_scene(name, out_dir, views, size, seed=0, ...)  (needs bpy)
    render_views_of_current_scene(bpy_scene, out_dir, views, size, ...)  (needs bpy)
    PROCEDURAL_SCENES: names accepted by render_procedural_scene (plus ``random_<seed>``)

Nothing here imports ``bpy`` at import time.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_scene": ".loader",
    "SceneData": ".scene_data",
    "View": ".scene_data",
    "Distortion": ".scene_data",
    "DatasetError": ".errors",
    "detect_format": ".detect",
    "FORMATS": ".detect",
    "sample_crop": ".sampling",
    "select_input_views": ".sampling",
    "view_scores": ".sampling",
    "render_procedural_scene": ".render_blender",
    "render_views_of_current_scene": ".render_blender",
    "PROCEDURAL_SCENES": ".procedural",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'npbgpp_core.datasets' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
