"""Worker frames -> Blender pass buffers (pure numpy, no bpy).

Network output and point colours are display sRGB; Blender's buffers hold scene-linear
values, so they go through the inverse sRGB transfer function (with the Standard view
transform Blender re-encodes them to the same 8-bit values). Blender buffers are
bottom row first; frames from the worker are top row first.
"""

from __future__ import annotations

import numpy as np

from npbgpp_core.protocol import DEPTH, NEURAL, NEURAL_ALPHA, NEURAL_DEPTH, POINTS_RGBA

from .srgb import srgb_to_linear

EMPTY_DEPTH = 1.0e10  # Blender's Z for pixels nothing covers
HALF_MAX = 65504.0


def depth_preview(depth: np.ndarray, hit: np.ndarray) -> np.ndarray:
    """Grey display image of view depth: near white, far dark, empty black."""
    out = np.zeros(depth.shape, dtype=np.float32)
    if hit.any():
        d = depth[hit]
        lo, hi = float(d.min()), float(d.max())
        out[hit] = 1.0 - 0.9 * (d - lo) / (hi - lo) if hi > lo else 1.0
    return out


def compose(frame: np.ndarray, output: str, transparent: bool, depth_scale: float = 1.0) -> dict[str, np.ndarray]:
    """Top-down images for Blender: 'combined' (H, W, 4) scene-linear premultiplied RGBA,
    'points' (H, W, 4), 'depth' (H, W) in scene units (``depth_scale`` folds an object's
    uniform scale back in). Neural output takes alpha and depth with the holes between
    points filled (the frame's NEURAL_ALPHA / NEURAL_DEPTH), so that a Z-combine with other
    renders shows nothing through them; Points and Depth outputs show the raw points."""
    points_rgb = frame[..., POINTS_RGBA.start : POINTS_RGBA.start + 3]
    hit = frame[..., POINTS_RGBA.stop - 1] > 0.5
    coverage, raw_depth = hit.astype(np.float32), frame[..., DEPTH]
    if output == "NEURAL":
        coverage, raw_depth = frame[..., NEURAL_ALPHA], frame[..., NEURAL_DEPTH]
    covered = coverage > 0
    depth = np.where(covered, raw_depth * np.float32(depth_scale), np.float32(EMPTY_DEPTH)).astype(np.float32)
    if output == "NEURAL":
        display = frame[..., NEURAL]
    elif output == "POINTS":
        display = points_rgb
    elif output == "DEPTH":
        display = np.repeat(depth_preview(depth, hit)[..., None], 3, axis=2)
    else:
        raise ValueError(f"unknown output {output!r}")
    alpha = coverage.astype(np.float32) if transparent else np.ones(hit.shape, np.float32)
    combined = np.empty(frame.shape[:2] + (4,), np.float32)
    combined[..., :3] = srgb_to_linear(display) * alpha[..., None]
    combined[..., 3] = alpha
    points = np.empty_like(combined)
    points[..., :3] = srgb_to_linear(points_rgb) * hit[..., None]
    points[..., 3] = hit
    return {"combined": combined, "points": points, "depth": depth}


def to_blender(image: np.ndarray) -> np.ndarray:
    """Flip rows (Blender is bottom row first) and flatten to contiguous float32 1-D,
    the only form ``foreach_set`` accepts safely."""
    return np.ascontiguousarray(image[::-1], dtype=np.float32).ravel()
