"""npbgpp_core: NPBG++ / NPBG neural point-based rendering, shared by the Blender add-on
and ``headless_train``. Never imports ``bpy``.

Public API (others rely on these names)::

    Camera                 pinhole camera: OpenCV K, R, t; PyTorch3D conversions at the edges
    OpenCVIntrinsics       fx, fy, cx, cy in pixels of an image of a given size
    rasterize              nearest-point index per pixel at several scales (-1 = empty)
    rasterize_keys         the packed (depth bits << 32 | index) z-buffer keys behind rasterize
    rasterize_descriptors  (C+1, h, w) descriptor + mask images per scale, descriptors
                           computed for the winning points only (the render path)
    rasterize_features     the same from an (N, C) feature table, differentiable
    DEFAULT_SCALES         (1, 1/2, 1/4, 1/8, 1/16)
    NPBGPlusPlus           the NPBG++ network (extractor, view-dependent aggregator, refiner)
    NPBG                   per-scene learnable descriptors + the same refiner
    NPBGPlusPlusConfig,    their network options (models/config.py, the one source of them)
    NPBGConfig
    NeuralScene            points + coefficients/descriptors + weights in one safe file
    load_ply, save_ply     PLY point clouds (and Gaussian-splat files); PointCloud holds one
    densify_scene          dense coloured PointCloud from a dataset's calibrated photos (MVS)
    fit_bundle             fit an aggregated NeuralScene to its dataset's photos (the 200-step
                           per-scene fit, by default checked on a photo kept apart) and save
                           the fitted bundle, or the unfitted one when the fit scored more
                           than CHECK_TOLERANCE_DB (0.5) lower there

Example::

    import torch, npbgpp_core as nc
    cam = nc.Camera.look_at(eye=(0, 0, -3), target=(0, 0, 0), image_size=(240, 320))
    pts = torch.randn(10_000, 3)
    index = nc.rasterize(pts, cam)[0]          # (240, 320) LongTensor, -1 where empty

Names resolve lazily so that importing the package is cheap (Blender starts fast).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Camera": ".camera",
    "OpenCVIntrinsics": ".camera",
    "rasterize": ".rasterizer",
    "rasterize_keys": ".rasterizer",
    "rasterize_descriptors": ".rasterizer",
    "rasterize_features": ".rasterizer",
    "DEFAULT_SCALES": ".rasterizer",
    "load_ply": ".ply",
    "save_ply": ".ply",
    "PointCloud": ".ply",
    "densify_scene": ".densify",
    "fit_bundle": ".scene_fit",
    "NPBGPlusPlus": ".models",
    "NPBGPlusPlusConfig": ".models",
    "NPBG": ".models",
    "NPBGConfig": ".models",
    "NeuralScene": ".scene",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'npbgpp_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
