"""The sRGB transfer function (IEC 61966-2-1), the add-on's one copy (pure numpy, no bpy).

Blender stores scene-linear colours (material inputs, colour attributes, render buffers);
point clouds, images on disk and the network work in display sRGB. Inputs are clipped to
[0, 1]. ``dtype`` is the computation and result type: float32 for image buffers, float64
where the dataset generator wants full precision.
"""

from __future__ import annotations

import numpy as np

_THRESHOLD = 0.04045  # display-sRGB end of the linear segment


def srgb_to_linear(x: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """Display sRGB in [0, 1] -> scene-linear.

    This runs on every viewport frame (a 1080p frame is 6M values), so it works in place
    on two buffers. ``((x + a) / 1.055) ** 2.4`` is evaluated as
    ``exp(2.4 * log((x + a) / 1.055))``: numpy's float32 ``exp`` / ``log`` are
    vectorised and about 2x faster together than its scalar-loop ``power``, and agree with
    the exact formula to a few float32 ulp (tests bound the error against float64).
    The curve runs on every value and a masked divide then overwrites the dark ones: cheaper
    than gathering and scattering the bright ones with a boolean index.
    """
    c = np.dtype(dtype).type
    x = np.array(x, dtype=dtype)  # a copy: the clip below runs in place
    np.clip(x, c(0.0), c(1.0), out=x)
    out = np.add(x, c(0.055), out=np.empty_like(x))  # keeps 0-d inputs arrays
    out /= c(1.055)  # before the log: 1.0 maps to exactly 1.0
    np.log(out, out=out)
    out *= c(2.4)
    np.exp(out, out=out)
    np.divide(x, c(12.92), out=out, where=x <= c(_THRESHOLD))
    return out


def linear_to_srgb(x: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """Scene-linear -> display sRGB in [0, 1]."""
    x = np.clip(np.asarray(x, dtype=dtype), 0.0, 1.0)
    return np.where(x <= 0.0031308, x * 12.92, 1.055 * x ** (1 / 2.4) - 0.055).astype(dtype)
