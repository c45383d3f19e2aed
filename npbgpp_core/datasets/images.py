"""Reading images and masks from disk lazily, resized on demand, as float tensors.

Images come back as ``(3, H, W)`` float32 in [0, 1] (sRGB values as stored, no
linearisation); RGBA images are composited over a background colour. Masks come back as
``(1, H, W)`` float32 in [0, 1]. Resizing uses an area-averaging filter (PIL ``BOX``) so
that a downscaled image is the mean of the full-resolution pixels it covers, which
matches how :meth:`npbgpp_core.camera.Camera.scaled` maps pixel areas.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from ..image_size import SMALLER_COPY, too_many_pixels
from .errors import DatasetError


def open_image(path: str, camera_pixels: int = 0, too_large: str = SMALLER_COPY, load: bool = False):
    """PIL's ``Image.open`` of ``path`` (the header read; with ``load`` the pixels too, else when
    loaded). PIL refuses images of more than twice ``Image.MAX_IMAGE_PIXELS`` (178,956,970 pixels
    by default) as possible decompression bombs, files whose few bytes claim a huge image: here a DatasetError
    naming the file, its pixels and ``too_large``, what to do (by default: a copy with smaller
    photos), not PIL's error about an attack. ``camera_pixels`` > 0: the size the photo's camera
    states (prepare-capture, which makes that copy, bounds it), read up to twice that whatever
    PIL's limit, as a photo as big as its calibration says is the user's own (PIL's limit is
    raised during the call, for any thread: prepare-capture runs as a command of its own).
    Missing or unreadable files: DatasetError too.
    Between PIL's limit and twice it (89.5-179 MP by default) images are read, with PIL's
    DecompressionBombWarning. Some formats check the size again as they decode (TIFF), so a
    photo read under a raised limit is loaded with ``load``, before the limit is restored, and
    a refusal while decoding is the same DatasetError."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise DatasetError(f"{path}: image file not found")
    limit = Image.MAX_IMAGE_PIXELS
    raise_limit = limit is not None and camera_pixels > limit
    try:
        if raise_limit:
            Image.MAX_IMAGE_PIXELS = camera_pixels
        img = Image.open(path)
        if load:
            try:
                img.load()
            except BaseException:
                img.close()
                raise
        return img
    except Image.DecompressionBombError as exc:
        raise DatasetError(too_many_pixels(path, exc, too_large)) from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DatasetError(f"{path}: unreadable image ({type(exc).__name__}: {exc})") from exc
    finally:
        if raise_limit:
            Image.MAX_IMAGE_PIXELS = limit


def _open(path: str):
    """:func:`open_image` of ``path``, its pixels loaded (every refusal a DatasetError)."""
    return open_image(path, load=True)


def image_size_of(path: str) -> tuple[int, int]:
    """``(H, W)`` of an image file, reading only its header. Raises DatasetError when the
    file is missing, not an image or larger than :func:`open_image` reads."""
    with open_image(path) as img:
        w, h = img.size
    return int(h), int(w)


def _resize(arr: np.ndarray, size: Sequence[int] | None) -> np.ndarray:
    """Area-resize an (H, W, C) float32 array to ``size=(h, w)``."""
    if size is None:
        return arr
    h, w = int(size[0]), int(size[1])
    if (h, w) == arr.shape[:2]:
        return arr
    if h < 1 or w < 1:
        raise ValueError(f"resize target must be positive, got {(h, w)}")
    from PIL import Image

    channels = [
        np.asarray(Image.fromarray(arr[:, :, c]).resize((w, h), Image.Resampling.BOX), dtype=np.float32)
        for c in range(arr.shape[2])
    ]
    return np.stack(channels, axis=2)


def _to_float(img) -> np.ndarray:
    """PIL image -> (H, W, C) float32 in [0, 1] with C in {1, 2, 3, 4}."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img, dtype=np.float32)
        return (a / (65535.0 if a.max() > 255 else 255.0))[:, :, None]
    if mode == "F":
        return np.asarray(img, dtype=np.float32)[:, :, None]
    if mode not in ("L", "LA", "RGB", "RGBA"):
        img = img.convert("RGBA" if "A" in mode or "transparency" in img.info else "RGB")
    a = np.asarray(img, dtype=np.float32) / 255.0
    return a[:, :, None] if a.ndim == 2 else a


def read_image(
    path: str,
    size: Sequence[int] | None = None,
    background: Sequence[float] | None = (1.0, 1.0, 1.0),
) -> torch.Tensor:
    """Read an image as ``(3, H, W)`` float32 in [0, 1], resized to ``size=(h, w)``.

    An alpha channel is composited over ``background`` (``None`` keeps the colour
    channels unchanged, i.e. drops alpha).
    """
    return _composited(_to_float(_open(path)), size, background)


def read_image_pixels(path: str, background: Sequence[float] | None = (1.0, 1.0, 1.0)) -> torch.Tensor:
    """The image :func:`read_image` reads at its own size, but as ``(3, H, W)`` uint8 holding k
    when the file stores 8-bit grey or RGB without alpha (read_image's floats are then exactly
    float32(k) / 255): a caller that stores photos as 8 bits takes them as read, instead of
    converting them to floats and scanning those for 8-bit levels again. Other files (alpha,
    16-bit, palette, float): read_image's float32."""
    img = _open(path)
    if img.mode in ("L", "RGB"):  # the modes _to_float divides by 255 as they are
        arr = np.asarray(img, dtype=np.uint8)
        arr = np.repeat(arr[:, :, None], 3, axis=2) if arr.ndim == 2 else arr
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
    return _composited(_to_float(img), None, background)


def float_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """Pixels as float in [0, 1], the one conversion of stored 8-bit pixels: uint8 k
    (:func:`read_image_pixels`', :func:`eight_bit_levels`') as float32(k) / 255, a division as
    :func:`read_image` computes it, so that an 8-bit photo's values are bit for bit its; float
    pixels as they are (no copy)."""
    if pixels.dtype == torch.uint8:
        return pixels.to(torch.float32).div_(255.0)
    return pixels


def eight_bit_levels(image: torch.Tensor) -> torch.Tensor:
    """A float image in [0, 1] as uint8 levels, each the nearest (halves up: floor(x * 255 + 0.5),
    in float32 as prepare-capture writes its undistorted photos), so that k / 255 is within 1/510
    of the float. Values outside [0, 1] are clamped first."""
    levels = image.to(torch.float32).clamp(0.0, 1.0).mul_(255.0).add_(0.5).floor_()
    return levels.to(torch.uint8)


def _composited(arr: np.ndarray, size: Sequence[int] | None,
                background: Sequence[float] | None) -> torch.Tensor:
    """:func:`read_image`'s (3, H, W) float32 of ``arr`` (:func:`_to_float`'s), alpha composited
    over ``background`` (None: dropped), grey repeated, resized to ``size``."""
    c = arr.shape[2]
    if c in (2, 4):
        rgb, alpha = arr[:, :, : c - 1], arr[:, :, c - 1 :]
        if rgb.shape[2] == 1:
            rgb = np.repeat(rgb, 3, axis=2)
        if background is not None:
            bg = np.asarray(background, dtype=np.float32).reshape(1, 1, 3)
            rgb = rgb * alpha + bg * (1.0 - alpha)
        arr = rgb
    elif c == 1:
        arr = np.repeat(arr, 3, axis=2)
    arr = _resize(np.ascontiguousarray(arr, dtype=np.float32), size)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).clamp_(0.0, 1.0)


def has_alpha(path: str) -> bool:
    """Whether an image file stores an alpha channel (header only)."""
    with open_image(path) as img:
        return img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info


def read_alpha(path: str, size: Sequence[int] | None = None) -> torch.Tensor:
    """The alpha channel of an RGBA image as ``(1, H, W)`` float32."""
    arr = _to_float(_open(path))
    if arr.shape[2] not in (2, 4):
        raise DatasetError(f"{path}: image has no alpha channel to use as a mask")
    a = _resize(np.ascontiguousarray(arr[:, :, -1:]), size)
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


def read_mask(path: str, size: Sequence[int] | None = None) -> torch.Tensor:
    """A mask image as ``(1, H, W)`` float32 in [0, 1] (first channel; alpha if it is
    the only varying channel of an RGBA mask)."""
    arr = _to_float(_open(path))
    if arr.shape[2] == 4 and float(arr[:, :, :3].max() - arr[:, :, :3].min()) == 0.0:
        m = arr[:, :, 3:4]
    else:
        m = arr[:, :, :1]
    m = _resize(np.ascontiguousarray(m), size)
    return torch.from_numpy(np.ascontiguousarray(m.transpose(2, 0, 1))).clamp_(0.0, 1.0)
