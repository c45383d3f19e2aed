"""What every loader returns: views (image path, optional mask path, Camera) plus a point
cloud and train/val/test index lists."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..camera import Camera
from ..image_size import fit_long_side
from .errors import DatasetError
from .images import eight_bit_levels, float_pixels, read_alpha, read_image, read_image_pixels, read_mask

log = logging.getLogger(__name__)


def subsample_indices(n: int, max_points: int, seed: int = 123) -> np.ndarray:
    """Sorted indices of the points :meth:`SceneData.subsample_points` keeps out of ``n``."""
    if max_points <= 0:
        raise ValueError(f"max_points must be positive, got {max_points}")
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))


@dataclass
class Distortion:
    """Lens distortion of the source image (OpenCV / COLMAP radial-tangential model):
    ``k1, k2, p1, p2`` on normalised camera coordinates. The View's ``camera`` is the
    undistorted pinhole camera (``distortion.undistorted_camera``), its ``source_camera``
    the K the photo was taken with; images are remapped on load."""

    k1: float = 0.0
    k2: float = 0.0
    p1: float = 0.0
    p2: float = 0.0

    def is_identity(self) -> bool:
        return self.k1 == 0.0 and self.k2 == 0.0 and self.p1 == 0.0 and self.p2 == 0.0


@dataclass
class View:
    """One photograph: where its image (and mask) lives and the camera that took it.

    ``camera.image_size`` is the native size of the image file. ``mask_from_alpha``
    means the mask is the image's own alpha channel (NeRF-Synthetic / Blender renders).
    A distorted photo has ``distortion`` and ``source_camera`` (the pinhole K it was taken
    with, before the lens); ``camera`` is then the pinhole camera the loaded image is
    remapped to, which differs in focal length (no blank borders).
    """

    name: str
    image_path: str
    mask_path: str | None
    camera: Camera
    mask_from_alpha: bool = False
    distortion: Distortion | None = None
    source_camera: Camera | None = None

    def __post_init__(self) -> None:
        if self.distortion is not None and not self.distortion.is_identity() and self.source_camera is None:
            raise ValueError(f"view {self.name}: a distorted view needs its source_camera")


@dataclass
class SceneData:
    """A loaded scene. ``points`` (N, 3) float32, ``colors`` (N, 3) float32 in [0, 1] or
    None, ``views`` in file order, ``train``/``val``/``test`` index lists into ``views``.
    ``background`` is the colour RGBA images are composited on (None: alpha dropped)."""

    name: str
    root: str
    format: str
    points: np.ndarray
    colors: np.ndarray | None
    views: list[View]
    train: list[int]
    val: list[int]
    test: list[int]
    background: tuple[float, float, float] | None = (1.0, 1.0, 1.0)
    metadata: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.views)

    @property
    def cameras(self) -> list[Camera]:
        return [v.camera for v in self.views]

    def _check_index(self, i: int) -> View:
        if not 0 <= i < len(self.views):
            raise IndexError(f"view index {i} out of range for {len(self.views)} views of {self.root}")
        return self.views[i]

    def camera(self, i: int, size: Sequence[int] | None = None) -> Camera:
        """Camera of view ``i``, for an image resized to ``size=(h, w)`` when given."""
        cam = self._check_index(i).camera
        return cam if size is None else cam.scaled((int(size[0]), int(size[1])))

    def largest_image_size(self, ids: Sequence[int]) -> tuple[int, int] | None:
        """``(H, W)`` of the view among ``ids`` whose camera has the most pixels (the first of
        equals; None for no ids): what a job reading those photos at their own size holds most of."""
        sizes = (tuple(self.views[i].camera.image_size) for i in ids)
        return max(((int(h), int(w)) for h, w in sizes), key=lambda hw: hw[0] * hw[1], default=None)

    def load_image(self, i: int, size: Sequence[int] | None = None) -> torch.Tensor:
        """Image of view ``i`` as ``(3, H, W)`` float32 in [0, 1] (native size, or resized
        to ``size=(h, w)``; the matching camera is ``self.camera(i, size)``)."""
        v = self._check_index(i)
        if v.distortion is not None and not v.distortion.is_identity():
            from .distortion import undistort

            img = read_image(v.image_path, None, self.background)
            img = undistort(img, v.source_camera, v.distortion, v.camera)
            return _resize_tensor(img, size)
        return read_image(v.image_path, size, self.background)

    def view_at_long_side(self, i: int, max_side: int | None) -> tuple[torch.Tensor, Camera]:
        """Photo ``(3, h, w)`` and camera of view ``i`` with the long side at most ``max_side``
        pixels: a larger photo shrunk by :func:`~npbgpp_core.image_size.fit_long_side` with the
        loaders' area resize (:meth:`load_image` at that size) and its camera scaled alike
        (:meth:`camera`); one no larger, or ``max_side`` None, as :meth:`load_image` and the view's
        camera give it (never enlarged). The one reading of "this view at long side N" of every
        aggregation: the add-on's Aggregate (Photo Size), ``headless_train export --max-side``,
        training's input views and bench_quality (:func:`shrink_photo`: the same for a photo
        already read)."""
        own = tuple(int(s) for s in self._check_index(i).camera.image_size)
        size = fit_long_side(own, max_side)
        if size == own:
            return self.load_image(i), self.camera(i)
        return self.load_image(i, size), self.camera(i, size)

    def load_image_pixels(self, i: int, round_resampled: bool = False) -> torch.Tensor:
        """Image of view ``i`` at its own size as :meth:`load_image` gives it, but uint8 (k for
        k/255) when it is an 8-bit file read as it is (:func:`read_image_pixels`), for a caller
        that stores 8-bit photos as uint8. An undistorted view is resampled, so its floats are
        not k/255: as floats, or with ``round_resampled`` (an 8-bit grey or RGB file only) as
        uint8 rounded to the nearest level (:func:`eight_bit_levels`, within 1/510 of the
        floats: the photos prepare-capture writes for the same view). Other files (16-bit,
        alpha) stay floats either way: rounding would lose levels they hold."""
        v = self._check_index(i)
        if v.distortion is None or v.distortion.is_identity():
            return read_image_pixels(v.image_path, self.background)
        if not round_resampled:
            return self.load_image(i)
        from .distortion import undistort

        pixels = read_image_pixels(v.image_path, self.background)
        # k/255 exactly as read_image divides (load_image's floats), then the same remap
        img = undistort(float_pixels(pixels), v.source_camera, v.distortion, v.camera)
        return eight_bit_levels(img) if pixels.dtype == torch.uint8 else img

    def load_mask(self, i: int, size: Sequence[int] | None = None) -> torch.Tensor | None:
        """Mask of view ``i`` as ``(1, H, W)`` float32 in [0, 1], or None when the view
        has none."""
        v = self._check_index(i)
        if v.mask_path is None and not v.mask_from_alpha:
            return None
        undistorted = v.distortion is not None and not v.distortion.is_identity()
        load_size = None if undistorted else size
        if v.mask_path is not None:
            m = read_mask(v.mask_path, load_size)
        else:
            m = read_alpha(v.image_path, load_size)
        if undistorted:
            from .distortion import undistort

            m = _resize_tensor(undistort(m, v.source_camera, v.distortion, v.camera), size)
        h, w = m.shape[1:]
        expected = tuple(size) if size is not None else v.camera.image_size
        if (h, w) != tuple(int(s) for s in expected):
            raise DatasetError(f"{v.mask_path}: mask is {w}x{h} but its image is {expected[1]}x{expected[0]}")
        return m

    def subsample_points(self, max_points: int, seed: int = 123) -> SceneData:
        """A copy with at most ``max_points`` points, chosen uniformly at random (seeded).
        The number dropped is logged and stored in ``metadata['points_dropped']``."""
        n = int(self.points.shape[0])
        if n <= max_points:
            subsample_indices(n, max_points, seed)  # checks max_points
            return dataclasses.replace(self, metadata={**self.metadata, "points_dropped": 0})
        keep = subsample_indices(n, max_points, seed)
        dropped = n - max_points
        log.info("%s: kept %d of %d points (dropped %d)", self.name, max_points, n, dropped)
        return dataclasses.replace(
            self,
            points=self.points[keep],
            colors=None if self.colors is None else self.colors[keep],
            metadata={**self.metadata, "points_dropped": dropped},
        )

    def scene_center(self) -> np.ndarray:
        """Centre of the scene: the point cloud's mean, or the camera centres' mean."""
        if self.points.shape[0] > 0:
            return self.points.astype(np.float64).mean(axis=0)
        return np.stack([v.camera.center().double().numpy() for v in self.views]).mean(axis=0)


def scene_input_at(scene: SceneData, path: str | os.PathLike, outputs: tuple[str, ...]) -> str | None:
    """The input of ``scene`` that writing ``path`` would replace, else None: its point
    cloud, a photo or mask, a file of its COLMAP model, or any other existing file in its
    folder whose name does not end in one of ``outputs`` (the kind of file the caller writes,
    e.g. ``(".ply",)`` for a dense cloud, which a re-run may replace; camera files such as
    transforms_train.json never). Commands
    refuse such an output by name (it replaced the user's data without a word)."""
    from ..atomic import holds, same_file

    target = os.path.realpath(path)
    inputs = [scene.metadata.get("point_cloud")]
    inputs += [p for v in scene.views for p in (v.image_path, v.mask_path)]
    for p in inputs:
        if p and same_file(target, p):
            return str(p)
    sparse = scene.metadata.get("sparse")  # a COLMAP model's folder: every file in it is read
    if sparse and holds(sparse, target):
        return target
    if scene.root and os.path.isfile(target) and holds(scene.root, target) \
            and not target.lower().endswith(outputs):
        return target
    return None


def shrink_photo(image: torch.Tensor, camera: Camera, max_side: int | None) -> tuple[torch.Tensor, Camera]:
    """:meth:`SceneData.view_at_long_side` for a photo already read at its own size: ``image``
    ``(C, H, W)`` floats in [0, 1] and its ``camera``, shrunk so the long side is at most
    ``max_side`` (:func:`~npbgpp_core.image_size.fit_long_side`, the loaders' area resize, clamped
    to [0, 1] as :func:`~npbgpp_core.datasets.images.read_image` does; the camera scaled alike);
    no larger, or ``max_side`` None: both returned as they are. A view's photo read by the
    loader and shrunk here equals the loader's own read at that size (a fit's fair check
    aggregates its photos again this way, :func:`npbgpp_core.fitting.aggregation_without`)."""
    own = (int(image.shape[-2]), int(image.shape[-1]))
    size = fit_long_side(own, max_side)
    if size == own:
        return image, camera
    return _resize_tensor(image.detach().cpu(), size).clamp_(0.0, 1.0), camera.scaled(size)


def _resize_tensor(img: torch.Tensor, size: Sequence[int] | None) -> torch.Tensor:
    if size is None or tuple(img.shape[1:]) == (int(size[0]), int(size[1])):
        return img
    from .images import _resize

    arr = _resize(np.ascontiguousarray(img.permute(1, 2, 0).numpy()), size)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
