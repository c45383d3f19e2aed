"""The sRGB transfer function (IEC 61966-2-1), the add-on's one copy (pure numpy, no bpy).

Blender stores scene-linear colours (material inputs, colour attributes, render buffers);
point clouds, images on disk and the network work in display sRGB. Inputs are clipped to
[0, 1]. ``dtype`` is the computation and result type: float32 for image buffers, float64
where the dataset generator wants full precision.
"""

from __future__ import annotations

import numpy as np


def srgb_to_linear(x: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """Display sRGB in [0, 1] -> scene-linear."""
    x = np.clip(np.asarray(x, dtype=dtype), 0.0, 1.0)
    return np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4).astype(dtype)


def linear_to_srgb(x: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """Scene-linear -> display sRGB in [0, 1]."""
    x = np.clip(np.asarray(x, dtype=dtype), 0.0, 1.0)
    return np.where(x <= 0.0031308, x * 12.92, 1.055 * x ** (1 / 2.4) - 0.055).astype(dtype)
