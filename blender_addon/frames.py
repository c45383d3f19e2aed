"""Worker frames -> Blender pass buffers (pure numpy, no bpy).

Network output and point colours are display sRGB; Blender's buffers hold scene-linear
values, so they go through the inverse sRGB transfer function (with the Standard view
transform Blender re-encodes them to the same 8-bit values). Blender buffers are
bottom row first; frames from the worker are top row first.
"""

from __future__ import annotations

from collections.abc import Collection

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


PASSES = ("combined", "points", "depth")
OUTPUTS = ("NEURAL", "POINTS", "DEPTH")


def compose(frame: np.ndarray, output: str, transparent: bool, depth_scale: float = 1.0,
            passes: Collection[str] = PASSES) -> dict[str, np.ndarray]:
    """Top-down images for Blender: 'combined' (H, W, 4) scene-linear premultiplied RGBA,
    'points' (H, W, 4), 'depth' (H, W) in scene units (``depth_scale`` folds an object's
    uniform scale back in). Neural output takes alpha and depth with the holes between
    points filled (the frame's NEURAL_ALPHA / NEURAL_DEPTH), so that a Z-combine with other
    renders shows nothing through them; Points and Depth outputs show the raw points.

    Only the images named in ``passes`` are built (the viewport draws 'combined' alone;
    each image costs a full-frame sRGB conversion or more)."""
    if output not in OUTPUTS:
        raise ValueError(f"unknown output {output!r}")
    unknown = set(passes) - set(PASSES)
    if unknown:
        raise ValueError(f"unknown passes {sorted(unknown)}, expected some of {PASSES}")
    points_rgb = frame[..., POINTS_RGBA.start : POINTS_RGBA.start + 3]
    hit = frame[..., POINTS_RGBA.stop - 1] > 0.5
    out: dict[str, np.ndarray] = {}
    depth = None
    if "depth" in passes or output == "DEPTH":
        if output == "NEURAL":
            covered, raw_depth = frame[..., NEURAL_ALPHA] > 0, frame[..., NEURAL_DEPTH]
        else:
            covered, raw_depth = hit, frame[..., DEPTH]
        depth = np.where(covered, raw_depth * np.float32(depth_scale), np.float32(EMPTY_DEPTH)).astype(np.float32)
        if "depth" in passes:
            out["depth"] = depth
    if "combined" in passes:
        if output == "NEURAL":
            display = frame[..., NEURAL]
        elif output == "POINTS":
            display = points_rgb
        else:
            display = np.repeat(depth_preview(depth, hit)[..., None], 3, axis=2)
        alpha = (frame[..., NEURAL_ALPHA] if output == "NEURAL" else hit).astype(np.float32) if transparent else None
        out["combined"] = _linear_rgba(display, alpha)
    if "points" in passes:
        out["points"] = _linear_rgba(points_rgb, hit.astype(np.float32))
    return out


def _linear_rgba(srgb: np.ndarray, alpha: np.ndarray | None, rows: int = 64) -> np.ndarray:
    """(H, W, 4) float32: ``srgb_to_linear(srgb) * alpha`` and ``alpha`` (``None``: opaque,
    nothing multiplied). Converted in blocks of ``rows`` rows: a block's temporaries stay
    in cache, which saves about a fifth of a 1080p frame's time over whole-frame passes."""
    h, w = srgb.shape[:2]
    out = np.empty((h, w, 4), np.float32)
    for r in range(0, h, rows):
        lin = srgb_to_linear(srgb[r : r + rows])
        if alpha is None:
            out[r : r + rows, :, :3] = lin
        else:
            np.multiply(lin, alpha[r : r + rows, :, None], out=out[r : r + rows, :, :3])
    out[..., 3] = 1.0 if alpha is None else alpha
    return out


def to_blender(image: np.ndarray) -> np.ndarray:
    """Flip rows (Blender is bottom row first) and flatten to contiguous float32 1-D,
    the only form ``foreach_set`` accepts safely."""
    return np.ascontiguousarray(image[::-1], dtype=np.float32).ravel()
