"""Camera-like degradations applied to each saved render of the environment corpus
(numpy + Pillow, no bpy), so the ground truth looks like phone photos rather than clean
renders:

1. exposure: linear radiance times ``2 ** stops``, stops uniform in ``exposure_stops``;
2. white balance: red and blue gains ``exp(U(-wb, wb))`` relative to green;
3. sensor noise: Gaussian in linear light, standard deviation
   ``noise * sqrt(value + 0.01)`` (shot-noise-like), ``noise`` uniform in ``noise_range``;
4. 8-bit sRGB, then a JPEG round trip at a quality uniform in ``jpeg_quality``
   (blocking, ringing and chroma subsampling as real photos have).

The drawn values are returned so the corpus records them per view.
"""

from __future__ import annotations

import io

import numpy as np

from ..srgb import linear_to_srgb, srgb_to_linear


def jitter_photo(rgb: np.ndarray, rng: np.random.Generator, exposure_stops: tuple[float, float] = (-0.5, 0.5),
                 wb: float = 0.08, noise_range: tuple[float, float] = (0.002, 0.01),
                 jpeg_quality: tuple[int, int] = (60, 95)) -> tuple[np.ndarray, dict]:
    """``rgb``: (H, W, 3) sRGB uint8 or float in [0, 1]. Returns the degraded (H, W, 3)
    uint8 image and the parameters drawn."""
    from PIL import Image

    x = rgb.astype(np.float64) / 255.0 if rgb.dtype == np.uint8 else rgb.astype(np.float64)
    stops = float(rng.uniform(*exposure_stops))
    gains = np.array([np.exp(rng.uniform(-wb, wb)), 1.0, np.exp(rng.uniform(-wb, wb))])
    sigma = float(rng.uniform(*noise_range))
    q = int(rng.integers(jpeg_quality[0], jpeg_quality[1] + 1))
    lin = srgb_to_linear(x[..., :3], np.float64) * (2.0 ** stops) * gains
    lin = lin + rng.normal(0.0, 1.0, lin.shape) * sigma * np.sqrt(np.clip(lin, 0, None) + 0.01)
    out = np.clip(np.round(linear_to_srgb(lin, np.float64) * 255.0), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(out).save(buf, format="JPEG", quality=q)
    buf.seek(0)
    with Image.open(buf) as im:
        out = np.asarray(im.convert("RGB")).copy()
    return out, dict(exposure_stops=stops, wb_gains=gains.tolist(), noise=sigma, jpeg_quality=q)
