"""Every 8-bit writer rounds as datasets.images.eight_bit_levels does (one rounding rule).

The reference is numpy's ``floor(clamp(x) * 255 + 0.5)`` in float32, written here by hand, on the
values where roundings part: each level's exact half and the float32 values either side of it,
plus values outside [0, 1]."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from blender_addon.demo import write_png
from headless_train.evaluate import save_png
from npbgpp_core.datasets.images import eight_bit_levels


def _hard_values() -> np.ndarray:
    """(3, H, W) float32: every level's half and its float32 neighbours, k/255, and outliers."""
    halves = (np.arange(256, dtype=np.float32) + np.float32(0.5)) / np.float32(255.0)
    levels = np.arange(256, dtype=np.float32) / np.float32(255.0)
    around = np.concatenate([halves, np.nextafter(halves, np.float32(-1)), np.nextafter(halves, np.float32(2)),
                             levels, np.array([-1.0, -1e-9, 1.0 + 1e-7, 2.0, 0.0, 1.0], dtype=np.float32)])
    around = np.concatenate([around, np.zeros(-len(around) % 3, dtype=np.float32)])  # three equal channels
    side = len(around) // 3
    return around[: 3 * side].reshape(3, side, 1).astype(np.float32)


def _by_hand(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: nearest level, halves up, in float32."""
    x = np.clip(image.transpose(1, 2, 0), np.float32(0), np.float32(1)).astype(np.float32)
    return np.floor(x * np.float32(255.0) + np.float32(0.5)).astype(np.uint8)


def test_eight_bit_levels_is_numpys_rounding_by_hand():
    image = _hard_values()
    got = eight_bit_levels(torch.from_numpy(image)).permute(1, 2, 0).numpy()
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, _by_hand(image))


@pytest.mark.parametrize("writer", [save_png, write_png], ids=["evaluate.save_png", "demo.write_png"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_png_writers_write_eight_bit_levels(tmp_path, writer, dtype):
    """float32 (what every caller passes: evaluation's .float() prediction, the demo's fits) is bit for bit
    the writers' former numpy rounding; float16 is rounded at its value's nearest level, where numpy's
    float16 arithmetic was a level off on 381 of these 1,032 values."""
    image = torch.from_numpy(_hard_values()).to(dtype)
    path = str(tmp_path / "out.png")
    writer(path, image) if writer is write_png else writer(image, path)
    written = np.asarray(Image.open(path))
    np.testing.assert_array_equal(written, eight_bit_levels(image).permute(1, 2, 0).numpy())


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_float_pixels_of_the_read_bytes_are_read_image_s_floats_bit_for_bit(tmp_path, mode):
    """The one conversion of stored 8-bit pixels (datasets.images.float_pixels, used by the fit's
    photo stack and SceneData.load_image_pixels): every level k of an 8-bit file as the reader's
    own float32, and each level's float turned back into itself by eight_bit_levels."""
    from npbgpp_core.datasets.images import float_pixels, read_image, read_image_pixels

    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    path = str(tmp_path / "levels.png")
    Image.fromarray(levels if mode == "L" else np.stack([levels, levels[::-1], levels.T], axis=2), mode).save(path)
    pixels = read_image_pixels(path)
    assert pixels.dtype == torch.uint8
    floats = float_pixels(pixels)
    assert floats.dtype == torch.float32 and torch.equal(floats, read_image(path))
    assert torch.equal(eight_bit_levels(floats), pixels)
    assert float_pixels(floats) is floats  # float pixels as they are, no copy
