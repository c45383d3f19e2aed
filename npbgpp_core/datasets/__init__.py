"""Datasets: loading published scene layouts into cameras + images + point clouds, and
training samples. (Rendering new scenes with Blender lives on the Blender side:
``blender_addon.datagen``.)

Public names::

    load_scene(path, format=None, **options) -> SceneData
    format_options(format) -> the options load_scene takes for that format
    SceneData, View, Distortion, DatasetError
    detect_format(path) -> str
    scene_domain(scene) -> "scene" | "object"   (which bundled NPBG++ file suits it)
    sample_crop(scene, index, rng, image_size=256, zoom_range=(1, 1), random_shift=True)
    select_input_views(scene, target, candidates, count, rng=None) -> list[int]

Nothing here imports ``bpy``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_scene": ".loader",
    "format_options": ".loader",
    "own_cloud_file": ".loader",
    "SceneData": ".scene_data",
    "View": ".scene_data",
    "Distortion": ".scene_data",
    "DatasetError": ".errors",
    "detect_format": ".detect",
    "FORMATS": ".detect",
    "scene_domain": ".domain",
    "sample_crop": ".sampling",
    "select_input_views": ".sampling",
    "view_scores": ".sampling",
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
