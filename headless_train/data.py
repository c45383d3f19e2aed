"""Lightning DataModule over npbgpp_core.datasets: scene discovery (one scene, a list, or
every subfolder), point subsampling, per-epoch scene rotation, training crops with input
views and colour jitter, and full-image validation views."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.seed import pl_worker_init_function
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset, Sampler

from npbgpp_core.atomic import is_listed_name
from npbgpp_core.image_size import fit_long_side

log = logging.getLogger(__name__)


class DataConfigError(ValueError):
    """A dataset configuration that cannot work (missing folder, empty scene, ...)."""


def config_number(value: Any, key: str, kind: type = int, optional: bool = False) -> Any:
    """A numeric config value (``4``, ``"4"``, ``6e6``, ``"1e3"``) as ``kind`` (int: a whole
    number), None for null when ``optional``; DataConfigError naming ``key`` otherwise (int() and
    float() alone answered ``datasets.n_point=abc`` with "could not convert string to float: 'abc'")."""
    if value is None and optional:
        return None
    try:
        number = float(value) if isinstance(value, str) else value
        if isinstance(number, bool) or not isinstance(number, int | float) or not math.isfinite(number):
            raise ValueError  # inf too: cache_images_max_gb=inf failed on int(inf) after the check
        if kind is int:
            if number != int(number):
                raise ValueError
            return int(number)
        return float(number)
    except (ValueError, OverflowError):
        what = "a whole number" if kind is int else "a finite number"
        raise DataConfigError(f"{key} must be {what}{' or null' if optional else ''}, got {value!r}") from None


def discover_scene_dirs(dcfg: dict) -> list[tuple[str, str]]:
    """(name, folder) of every scene the dataset config names.

    ``scene_name`` picks one scene folder under ``data_root`` (or ``data_root`` itself when
    it is already a scene and has no such subfolder); otherwise ``scene_names`` lists them,
    or, when null, every subfolder of ``data_root`` is a scene, except hidden ones and
    ``*.partial-<pid>`` folders that a renderer is still writing (npbgpp_core.atomic.is_listed_name)."""
    root = dcfg.get("data_root")
    if not root:
        raise DataConfigError("datasets.data_root is not set")
    root = os.path.abspath(str(root))
    if not os.path.isdir(root):
        raise DataConfigError(f"dataset folder not found: {root} (datasets.data_root)")
    exclude = set(dcfg.get("exclude_scenes") or [])
    if dcfg.get("scene_name") not in (None, ""):
        name = str(dcfg["scene_name"])
        folder = os.path.join(root, name)
        if not os.path.isdir(folder):
            raise DataConfigError(f"scene folder not found: {folder} (datasets.scene_name={name})")
        return [(name, folder)]
    names = dcfg.get("scene_names")
    if names:
        names = [str(n) for n in names]
        missing = [n for n in names if not os.path.isdir(os.path.join(root, n))]
        if missing:
            raise DataConfigError(f"scene folders not found under {root}: {', '.join(missing)}")
    else:
        names = sorted(n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n)) and is_listed_name(n))
        if not names:
            raise DataConfigError(f"no scene folders under {root}")
    return [(n, os.path.join(root, n)) for n in names if n not in exclude]


def variant_kinds(dcfg: dict) -> tuple[str, ...] | None | bool:
    """``datasets.point_cloud_variants``: False (off), None (every ``points/*.ply`` a scene
    has) or the kinds every scene must have."""
    v = dcfg.get("point_cloud_variants")
    if v in (None, False, "", "false", "none"):
        return False
    if v is True or v in ("true", "all"):
        return None
    if isinstance(v, str):
        return tuple(k.strip() for k in v.split(",") if k.strip())
    return tuple(str(k) for k in v)


def _load_variants(folder: str, kinds: tuple[str, ...] | None, limit: int | None) -> list[tuple[str, np.ndarray]]:
    """(kind, points) of a scene's ``points/<kind>.ply`` clouds (npbgpp_core.datasets.corpus)."""
    from npbgpp_core.datasets.corpus import point_cloud_variants
    from npbgpp_core.ply import load_scene_cloud

    found = point_cloud_variants(folder, kinds)  # all of the scene's, after checking that ``kinds`` exist
    chosen = sorted(found.items()) if kinds is None else [(k, found[k]) for k in kinds]
    out = []
    for kind, path in chosen:
        try:
            pts = np.ascontiguousarray(load_scene_cloud(path).points, dtype=np.float32)
        except (OSError, ValueError) as exc:
            raise DataConfigError(f"{path}: unreadable point cloud variant ({exc})") from exc
        if pts.ndim != 2 or pts.shape[0] == 0:
            raise DataConfigError(f"{path}: point cloud variant '{kind}' has no points")
        if limit is not None and pts.shape[0] > limit:
            pts = pts[np.sort(np.random.default_rng(123).choice(pts.shape[0], size=limit, replace=False))]
        out.append((kind, pts))
    return out


class CachedImages:
    """A scene's ``load_image`` that decodes each view once and keeps the native-size image
    in memory (resizing stays on demand; the result equals the uncached loader). Shared
    ``budget`` (bytes left) bounds the memory of all scenes together; past it, views are
    decoded on every call as before."""

    def __init__(self, load, budget: list[int]):
        self.load, self.budget, self.images = load, budget, {}

    def __call__(self, i: int, size=None):
        from npbgpp_core.datasets.scene_data import _resize_tensor

        img = self.images.get(i)
        if img is None:
            img = self.load(i)
            nbytes = img.numel() * img.element_size()
            if self.budget[0] >= nbytes:
                self.images[i] = img
                self.budget[0] -= nbytes
        return img if size is None else _resize_tensor(img, size)


def prefill_image_cache(scenes: list) -> None:
    """Decode every view of scenes with a :class:`CachedImages` loader now, in this process:
    DataLoader workers forked afterwards share the decoded images instead of each
    decoding (and holding) its own copy."""
    for scene in scenes:
        for source in (scene, scene.metadata.get(INPUT_VIEW_SCENE)):  # the second: its input views' copy
            if source is not None and isinstance(source.load_image, CachedImages):
                for i in range(len(source.views)):
                    source.load_image(i)


INPUT_VIEW_SCENE = "input_view_scene"  # scene.metadata key: the scene input views are read from


def _read_input_views_from_copy(scene, folder: str, options: dict, max_side: int) -> None:
    """A nerfstudio scene trained with ``datasets.input_view_max_side=S`` reads its input
    views from the ``images_N/`` copy whose images are the smallest still >= S on their long
    side (the copy ``export --max-side S`` reads): the same input views, as those are
    shrunk to at most S anyway, for less decoding. Targets keep ``images/``: their
    resolution is the user's to choose (``+datasets.options.downscale=N``), not a side
    effect of the input-view cap. Stored as ``scene.metadata[INPUT_VIEW_SCENE]`` (views in
    the scene's order, no points) when a copy qualifies; nothing when the options already
    choose the copy (``downscale``, ``min_side``)."""
    from npbgpp_core.datasets.nerfstudio import copy_views

    if "downscale" in options or "min_side" in options:
        return
    n, views = copy_views(folder, int(max_side), **options)
    if n == 1:
        return
    if [v.name for v in views] != [v.name for v in scene.views]:  # the loader orders copies alike
        raise DataConfigError(f"scene {folder}: images_{n}/ lists other views than images/")
    scene.metadata[INPUT_VIEW_SCENE] = dataclasses.replace(
        scene, views=views, points=scene.points[:0], colors=None, metadata={"downscale": n})
    log.info("scene %s: input views read from images_%d/ (long side >= datasets.input_view_max_side=%d)",
             scene.name, n, max_side)


def input_view_scene(scene):
    """The scene whose images input views are read from (see :func:`_read_input_views_from_copy`)."""
    inputs = scene.metadata.get(INPUT_VIEW_SCENE)
    return scene if inputs is None else inputs


def load_scenes(dcfg: dict, max_points: int | None) -> list:
    """Load every configured scene as SceneData, subsampled to ``n_point`` / ``max_points`` (seed 123).
    With ``point_cloud_variants`` each scene's ``points/<kind>.ply`` files are loaded too
    (``scene.metadata['point_variants']``, [(kind, points)]); a scene without them keeps its
    default cloud. With ``cache_images`` decoded images stay in memory."""
    from npbgpp_core.datasets import load_scene
    from npbgpp_core.datasets.cloud_fit import scene_cloud_note
    from npbgpp_core.datasets.other_clouds import other_clouds, other_clouds_note

    options = dict(dcfg.get("options") or {})
    if dcfg.get("pc_name"):
        options.setdefault("pc_name", dcfg["pc_name"])
    n_point = config_number(dcfg.get("n_point"), "datasets.n_point", optional=True)
    limits = [v for v in (n_point, max_points) if v is not None]
    limit = min(limits) if limits else None
    kinds = variant_kinds(dcfg)
    max_side = config_number(dcfg.get("input_view_max_side"), "datasets.input_view_max_side", optional=True)
    budget = None
    if dcfg.get("cache_images"):
        gb = config_number(dcfg.get("cache_images_max_gb") or 0, "datasets.cache_images_max_gb", float)
        budget = [int(gb * 2**30)]
    scenes = []
    for name, folder in discover_scene_dirs(dcfg):
        variants = _load_variants(folder, kinds, limit) if kinds is not False else []
        scene_options = dict(options)
        if variants and "pc_name" not in scene_options:
            scene_options["require_points"] = False  # the variants are enough
        scene = load_scene(folder, format=dcfg.get("format"), **scene_options)
        scene.name = name
        if variants:
            scene.metadata["point_variants"] = variants
            if scene.points.shape[0] == 0:
                scene.points, scene.colors = variants[0][1], None
        if max_side is not None and scene.format == "nerfstudio":
            _read_input_views_from_copy(scene, folder, scene_options, max_side)
        n = int(scene.points.shape[0])
        if n == 0:
            raise DataConfigError(f"scene {folder} has no points (point cloud is empty)")
        note = other_clouds_note(other_clouds(scene.root, scene.metadata.get("point_cloud")), "datasets.pc_name=")
        if note and not variants:  # a corpus scene's variants are its other clouds, and read
            log.info("scene %s: %s", name, note)
        misfit = scene_cloud_note(scene)
        if misfit:
            log.warning("scene %s: %s", name, misfit)
        if limit is not None and n > limit:
            scene = scene.subsample_points(limit, seed=123)
            log.warning("scene %s: %d points exceed the limit %d; kept a random subset (seed 123)", name, n, limit)
        if not scene.train:
            raise DataConfigError(f"scene {folder} has no training views")
        if budget is not None:  # after subsample_points: its copy of the scene dropped the wrapper
            scene.load_image = CachedImages(scene.load_image, budget)  # type: ignore[method-assign]
            inputs = scene.metadata.get(INPUT_VIEW_SCENE)
            if inputs is not None:
                inputs.load_image = CachedImages(inputs.load_image, budget)
        scenes.append(scene)
    return scenes


def scenes_for_epoch(n_scenes: int, per_epoch: int | None, epoch: int, seed: int) -> list[int]:
    """Active scene indices of an epoch: consecutive windows of a seeded permutation, so
    every scene is visited once before any repeats."""
    if not per_epoch or per_epoch >= n_scenes:
        return list(range(n_scenes))
    perm = np.random.default_rng(seed).permutation(n_scenes)
    start = (epoch * per_epoch) % n_scenes
    return [int(perm[(start + k) % n_scenes]) for k in range(per_epoch)]


def scenes_for_rank(active: list[int], rank: int, world: int, mode: str) -> list[int]:
    """train_data_mode=each: every process gets its own scene(s); all: every process samples all."""
    if mode == "all" or world <= 1:
        return list(active)
    if mode != "each":
        raise DataConfigError(f"dataloader.train_data_mode must be 'all' or 'each', got {mode!r}")
    mine = active[rank::world]
    return mine if mine else [active[rank % len(active)]]


def color_jitter(images: list[torch.Tensor], rng: np.random.Generator, prob: float) -> list[torch.Tensor]:
    """Same random brightness / contrast / saturation change on every image, with probability ``prob``."""
    if prob <= 0 or rng.random() >= prob:
        return images
    b, c, s = rng.uniform(0.8, 1.2, size=3)
    out = []
    for img in images:
        x = img * b
        mean = x.mean()
        x = (x - mean) * c + mean
        gray = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).unsqueeze(0)
        x = (x - gray) * s + gray
        out.append(x.clamp(0, 1))
    return out


@dataclass
class SampleOptions:
    image_size: Any
    zoom_range: Any
    random_shift: bool
    selection_count: int
    input_view_max_side: int | None
    jitter_prob: float
    loss_on_object_mask: bool = False
    targets_per_sample: int = 1


def eval_border_crop(dcfg: Any) -> int:
    """``datasets.eval_border_crop`` (0 when unset): pixels cropped on every side of a view
    before its metrics, read here for the data module, the system's validation and the
    evaluation alike; DataConfigError for anything but a whole number >= 0 (a negative one
    cropped nothing while metrics.json recorded it as the crop)."""
    value = (dcfg.get("eval_border_crop") if dcfg is not None else None) or 0
    border = config_number(value, "datasets.eval_border_crop")
    if border < 0:
        raise DataConfigError(f"datasets.eval_border_crop must be a whole number >= 0 (pixels cropped on every side "
                              f"before metrics; 0: no crop), got {value!r}")
    return border


def targets_per_sample(dcfg: Any) -> int:
    """``datasets.targets_per_sample`` (1 when the config has no such key): target views
    trained per set of input views; DataConfigError for anything but a whole number >= 1."""
    value = dcfg.get("targets_per_sample", 1) if dcfg is not None else 1
    count = config_number(1 if value is None else value, "datasets.targets_per_sample")
    if count < 1:
        raise DataConfigError(f"datasets.targets_per_sample must be a whole number >= 1 (1: one target per set of "
                              f"input views, as published), got {value!r}")
    return count


def sample_targets(sample: dict) -> list[dict]:
    """Every target of a training sample: the sample itself (its ``image``, ``mask``,
    ``camera``), then its ``extra_targets`` (``datasets.targets_per_sample`` > 1)."""
    return [sample, *sample.get("extra_targets", ())]


def load_input_views(scene, indices: list[int], max_side: int | None) -> tuple[list[torch.Tensor], list]:
    """Images (3,h,w) and matching cameras of input views, long side at most ``max_side``: each
    view as :meth:`~npbgpp_core.datasets.scene_data.SceneData.view_at_long_side` reads it, the one
    rule the add-on's Aggregate (Photo Size) and ``export --max-side`` use, so a run is trained and
    evaluated on the inputs its exported bundle is aggregated from. (A view already within
    ``max_side`` is its own photo and camera; the camera scaled to its own size would be the same
    bits, as cx + 0.5 - 0.5 is exact for the float32 K the loaders store.)"""
    images, cams = [], []
    for i in indices:
        image, camera = scene.view_at_long_side(i, max_side)
        images.append(image)
        cams.append(camera)
    return images, cams


def _in_image(uv: torch.Tensor, depth: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return (depth > 0) & (uv[:, 0] >= -0.5) & (uv[:, 0] < w - 0.5) & (uv[:, 1] >= -0.5) & (uv[:, 1] < h - 0.5)


def crop_input_views(
    scene, indices: list[int], target_camera, points: torch.Tensor, max_side: int | None = None
) -> tuple[list[torch.Tensor], list]:
    """Input views around what the target crop shows (as published): each view is resized by the
    target's zoom (ratio of focal lengths) and cropped to twice the target crop, centred on
    the projections of the points inside the target crop (the image centre when none)."""
    th, tw = target_camera.image_size
    uv_t, d_t = target_camera.project(points)
    seen = points[_in_image(uv_t, d_t, th, tw)]
    target_f = target_camera.intrinsics().fx
    images, cams = [], []
    for i in indices:
        native = scene.views[i].camera
        zoom = target_f / native.intrinsics().fx
        nh, nw = native.image_size
        h, w = max(2, round(nh * zoom)), max(2, round(nw * zoom))
        if max_side is not None and max(h, w) > max_side:
            h, w = fit_long_side((h, w), max_side)
        cam = native.scaled((h, w))
        ch, cw = min(h, 2 * th), min(w, 2 * tw)
        cy, cx = h / 2.0, w / 2.0
        if seen.shape[0] > 0:
            uv, d = cam.project(seen)
            inside = _in_image(uv, d, h, w)
            if bool(inside.any()):
                cx, cy = (float(c) for c in uv[inside].median(0).values)
        top = int(min(max(round(cy - ch / 2), 0), h - ch))
        left = int(min(max(round(cx - cw / 2), 0), w - cw))
        image = scene.load_image(i, (h, w))[:, top : top + ch, left : left + cw].contiguous()
        images.append(image)
        cams.append(cam.cropped(top, left, ch, cw))
    return images, cams


# An extra target must show at least this share of the points the anchor crop sees (projected
# inside its image) from a direction within 90 degrees of the anchor's: a view that shows
# little of them would mostly supervise points the input views did not aggregate.
EXTRA_TARGET_MIN_SHARE = 0.5
# The anchor crop's points used to rank and centre the extra targets (a random subset of
# larger sets: the ranking costs one projection per candidate view).
EXTRA_TARGET_POINTS = 2048


def anchor_surface_points(camera, points: torch.Tensor) -> torch.Tensor:
    """The points a target crop sees: those nearest to the camera in some pixel of a coarse
    z-buffer of the crop (the front surface; a plain projection also takes every point
    behind it, which other views see far apart). The z-buffer is at most half the crop's
    resolution, and coarse enough for about 8 of the projected points per pixel, so that a
    sparse cloud's front surface covers its pixels instead of points behind it showing
    through the gaps."""
    from npbgpp_core.rasterizer import rasterize

    h, w = camera.image_size
    uv, depth = camera.project(points)
    inside = points[_in_image(uv, depth, h, w)]
    if inside.shape[0] == 0:
        return inside
    scale = min(0.5, max(math.sqrt(inside.shape[0] / (8.0 * h * w)), 2.0 / min(h, w)))
    index = rasterize(inside, camera, scales=(scale,))[0]
    return inside[torch.unique(index[index >= 0])]


def extra_target_crops(
    scene, anchor_camera, exclude: list[int], points: torch.Tensor, count: int, rng: np.random.Generator,
    random_shift: bool, with_mask: bool = False,
) -> list[dict]:
    """Up to ``count`` more target crops that share a sample's input views: training views
    other than ``exclude`` (the anchor target and the input views) that show at least
    :data:`EXTRA_TARGET_MIN_SHARE` of the points the anchor crop sees
    (:func:`anchor_surface_points`) from within 90 degrees of the anchor's direction, drawn
    (weighted by share x cosine of that angle) among the ``2 * count`` that score highest.
    Each is cropped at the anchor crop's size, resized by the anchor's zoom (ratio of focal
    lengths, raised where needed so the crop fits, as ``sample_crop`` does) and centred on
    the median projection of those points (shifted by up to 1/8 of the crop with
    ``random_shift``), with its exact camera. Fewer (none) when fewer views qualify: scenes
    with few training views train fewer targets. ``with_mask``: read each view's object
    mask (None without one; not read otherwise)."""
    th, tw = anchor_camera.image_size
    excluded = {int(v) for v in exclude}
    candidates = [int(v) for v in scene.train if int(v) not in excluded]
    if count <= 0 or not candidates:
        return []
    seen = anchor_surface_points(anchor_camera, points)
    if seen.shape[0] == 0:
        return []
    if seen.shape[0] > EXTRA_TARGET_POINTS:
        keep = np.sort(rng.choice(seen.shape[0], size=EXTRA_TARGET_POINTS, replace=False))
        seen = seen[torch.from_numpy(keep)]
    middle = seen.double().median(0).values.numpy()

    def direction(cam) -> np.ndarray:
        ray = cam.center().double().numpy() - middle
        return ray / max(float(np.linalg.norm(ray)), 1e-12)

    anchor_dir = direction(anchor_camera)
    scores = np.zeros(len(candidates))
    for k, view in enumerate(candidates):
        cam = scene.views[view].camera
        cosine = float(np.dot(anchor_dir, direction(cam)))
        if cosine <= 0:
            continue
        uv, depth = cam.project(seen)
        share = float(_in_image(uv, depth, *cam.image_size).float().mean())
        if share >= EXTRA_TARGET_MIN_SHARE:
            scores[k] = share * cosine
    order = np.argsort(-scores, kind="stable")[: 2 * count]
    pool = [int(k) for k in order if scores[k] > 0]
    if len(pool) > count:
        weights = scores[pool] / scores[pool].sum()
        pool = [pool[k] for k in rng.choice(len(pool), size=count, replace=False, p=weights)]
    anchor_f = anchor_camera.intrinsics().fx
    crops = []
    for k in pool:
        view = candidates[k]
        native = scene.views[view].camera
        nh, nw = native.image_size
        zoom = max(anchor_f / native.intrinsics().fx, th / nh, tw / nw)
        h, w = max(2, th, round(nh * zoom)), max(2, tw, round(nw * zoom))
        cam = native.scaled((h, w))
        uv, depth = cam.project(seen)
        inside = _in_image(uv, depth, h, w)
        cx, cy = (float(c) for c in uv[inside].median(0).values) if bool(inside.any()) else (w / 2.0, h / 2.0)
        if random_shift:
            cx += float(rng.integers(-(tw // 8), tw // 8 + 1))
            cy += float(rng.integers(-(th // 8), th // 8 + 1))
        top = int(min(max(round(cy - th / 2), 0), h - th))
        left = int(min(max(round(cx - tw / 2), 0), w - tw))
        image = scene.load_image(view, (h, w))[:, top : top + th, left : left + tw].contiguous()
        mask = scene.load_mask(view, (h, w)) if with_mask else None
        if mask is not None:
            mask = mask[:, top : top + th, left : left + tw].contiguous()
        crops.append({"view": view, "image": image, "mask": mask, "camera": cam.cropped(top, left, th, tw)})
    return crops


def loss_mask(image: torch.Tensor, object_mask: torch.Tensor | None, on_object: bool) -> torch.Tensor:
    """Where the loss counts on a training target crop. A crop never leaves the image, so by
    default that is every pixel: the background (e.g. NeRF-Synthetic's white) must be learned
    too. Object masks (alpha, mask/ folders) restrict the loss only when asked (``on_object``,
    ``datasets.loss_on_object_mask``) and the view has one."""
    return object_mask if on_object and object_mask is not None else torch.ones_like(image[:1])


class TrainSamples(Dataset):
    """``num_samples`` random crops per active scene for one epoch (deterministic in seed, epoch, rank).
    ``seed``: the run's and rank's; :meth:`set_epoch` (:class:`EpochOrder` passes Lightning's
    call on) makes each epoch's crops its own, also with a loader kept across epochs, which
    drew every epoch's crops from the epoch it was made in: the same crops every epoch.
    With ``opts.targets_per_sample`` = k > 1 a sample also holds up to k - 1
    ``extra_targets`` (:func:`extra_target_crops`) drawn from a generator of their own, so
    its anchor target, input views and colour jitter are those of k = 1."""

    def __init__(self, scenes: list, active: list[int], num_samples: int, opts: SampleOptions, seed: int,
                 epoch: int = 0):
        self.scenes, self.active, self.num_samples, self.opts = scenes, active, num_samples, opts
        self.base_seed = seed
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        self.seed = self.base_seed + 1000 * int(epoch)

    def __len__(self) -> int:
        return len(self.active) * self.num_samples

    def __getitem__(self, i: int) -> dict:
        from npbgpp_core.datasets import sample_crop, select_input_views

        scene_id = self.active[i // self.num_samples]
        scene = self.scenes[scene_id]
        rng = np.random.default_rng([self.seed, i])
        target = int(scene.train[int(rng.integers(len(scene.train)))])
        variants = scene.metadata.get("point_variants") or []
        variant = int(rng.integers(len(variants))) if variants else None
        image, mask, camera = sample_crop(
            scene, target, rng, image_size=self.opts.image_size, zoom_range=self.opts.zoom_range,
            random_shift=self.opts.random_shift,
        )
        sample = {"scene": scene_id, "view": target, "image": image,
                  "mask": loss_mask(image, mask, self.opts.loss_on_object_mask), "camera": camera}
        if variant is not None:
            sample["points_variant"] = variant
        inputs: list[torch.Tensor] = []
        extras: list[dict] = []
        if self.opts.selection_count > 0:
            candidates = [int(t) for t in scene.train if int(t) != target] or [target]
            chosen = select_input_views(scene, target, candidates, self.opts.selection_count, rng)
            chosen = [int(c) for c in chosen]
            if self.opts.image_size is None:  # whole target image: whole input views
                inputs, cams = load_input_views(input_view_scene(scene), chosen, self.opts.input_view_max_side)
            else:
                cloud = scene.points if variant is None else variants[variant][1]
                pts = torch.from_numpy(np.ascontiguousarray(cloud, dtype=np.float32))
                inputs, cams = crop_input_views(input_view_scene(scene), chosen, camera, pts,
                                                self.opts.input_view_max_side)
                if self.opts.targets_per_sample > 1:  # a generator of their own: the draws above stay k = 1's
                    extras = extra_target_crops(scene, camera, [target, *chosen], pts,
                                                self.opts.targets_per_sample - 1,
                                                np.random.default_rng([self.seed, i, 1]), self.opts.random_shift,
                                                self.opts.loss_on_object_mask)
            sample["input_cameras"] = cams
        for extra in extras:
            extra["mask"] = loss_mask(extra["image"], extra["mask"], self.opts.loss_on_object_mask)
        # one jitter for every target and input view: the inputs must predict the targets' colours
        jittered = color_jitter([image] + [e["image"] for e in extras] + inputs, rng, self.opts.jitter_prob)
        sample["image"] = jittered[0]
        for extra, extra_image in zip(extras, jittered[1 : 1 + len(extras)], strict=True):
            extra["image"] = extra_image
        if self.opts.targets_per_sample > 1:
            sample["extra_targets"] = extras
        if inputs:
            sample["input_images"] = jittered[1 + len(extras) :]
        return sample


def check_eval_border(border: int, scene, views: list[int]) -> None:
    """ValueError naming the view and the setting when ``datasets.eval_border_crop`` would crop
    every pixel of one of ``views`` (checked before rendering, by the evaluation and the
    validation alike)."""
    from npbgpp_core.metrics import check_border

    if border <= 0 or not views:
        return
    side, name, size = min((min(scene.views[v].camera.image_size), scene.views[v].name,
                            tuple(scene.views[v].camera.image_size)) for v in views)
    try:
        check_border(border, *size)
    except ValueError:
        raise ValueError(f"datasets.eval_border_crop={border} crops every pixel of view {name} of scene "
                         f"{scene.name} (its shorter side is {side} pixels); lower it (0: no crop)") from None


class EvalViews(Dataset):
    """Full-resolution views (validation or held-out test) of the given scenes: a scene's
    ``split`` views, else its val views, else its test views. :attr:`summary` says which (the
    validation log line quotes it), e.g. ``2 views of 1 scene (test views: no val split)``."""

    def __init__(self, scenes: list, split: str, max_views: int | None = None, border: int = 0):
        self.items: list[tuple[int, int]] = []
        taken_from: dict[str, list[str]] = {}  # split read -> scene names
        for s, scene in enumerate(scenes):
            source = next((name for name in (split, "val", "test") if getattr(scene, name)), split)
            views = list(getattr(scene, source))
            if max_views is not None:
                views = views[:max_views]
            check_eval_border(border, scene, views)
            taken_from.setdefault(source, []).append(scene.name)
            self.items += [(s, int(v)) for v in views]
        self.scenes = scenes
        mixed = len(taken_from) > 1
        parts = []
        for source, names in taken_from.items():
            which = f"{source} views" + (f" of {len(names)}" if mixed else "")
            if source != split:
                which += f" without a {split} split" if mixed else f": no {split} split"
            parts.append(which)
        count = f"{len(self.items)} view{'s' * (len(self.items) != 1)} of {len(scenes)} scene{'s' * (len(scenes) != 1)}"
        self.summary = f"{count} ({'; '.join(parts)})" if parts else count

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        s, v = self.items[i]
        scene = self.scenes[s]
        image = scene.load_image(v)
        return {"scene": s, "view": v, "image": image, "mask": torch.ones_like(image[:1]), "camera": scene.camera(v)}


class EpochOrder(Sampler[int]):
    """The shuffled order of an epoch's training samples, a function of ``seed`` and the epoch
    alone (Lightning calls :meth:`set_epoch` at each epoch's start, also on a loader kept
    across epochs), so a run resumed mid-epoch can go on where its checkpoint was taken: the
    first iteration leaves out the ``skip`` samples that were trained (once). The loader
    started the epoch's order again instead: the resumed steps retrained its first samples
    (the same crops) and never reached the rest."""

    def __init__(self, samples: TrainSamples, seed: int, epoch: int, skip: int = 0):
        self.samples, self.count, self.seed, self.epoch, self.skip = samples, len(samples), seed, epoch, skip

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.samples.set_epoch(epoch)  # before the epoch's iterator (and its workers' copies) is made

    def __len__(self) -> int:
        return self.count  # the whole epoch: Lightning counts the resumed steps as already fetched

    def __iter__(self):
        order = torch.randperm(self.count, generator=torch.Generator().manual_seed(self.seed + 131 * self.epoch))
        start, self.skip = min(self.skip, self.count), 0
        yield from order[start:].tolist()


def resumed_batches(trainer: Any) -> int:
    """How many batches of the current epoch a run resumed mid-epoch trained before its
    checkpoint (Lightning's restored batch progress; it counts them as fetched and runs the
    epoch's remaining ones); 0 when not resuming mid-epoch."""
    loop = getattr(trainer, "fit_loop", None)
    if loop is None or not loop.restarting:  # restarting: restored from a checkpoint of an unfinished epoch
        return 0
    return int(loop.epoch_loop.batch_progress.current.processed)


def collate_samples(samples: list[dict]) -> list[dict]:
    """Samples differ in size and carry cameras: keep the list as is."""
    return samples


def loader_worker_init(worker_id: int, rank: int = 0) -> None:
    """DataLoader workers ignore SIGTERM and SIGINT sent to the whole job (a scheduler, a
    terminal's Ctrl-C): the main process owns the shutdown. Otherwise the workers die
    first and torch's SIGCHLD handler aborts the final last.ckpt. Seeds each worker the
    way Lightning's ``seed_everything(workers=True)`` does (a custom init replaces that)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pl_worker_init_function(worker_id, rank)


class SceneDataModule(pl.LightningDataModule):
    """Scenes + per-epoch datasets. Scenes are loaded at construction (the systems need
    their point counts to build per-point parameters)."""

    def __init__(self, cfg, seed: int = 3407):
        super().__init__()
        d = cfg.datasets
        # plain lists and dicts: the loaders check option types (e.g. views_config must be a list)
        self.dcfg = OmegaConf.to_container(d, resolve=True) if OmegaConf.is_config(d) else dict(d)
        self.seed = int(seed)
        sys_cfg = cfg.system
        max_points = config_number(sys_cfg.get("max_points"), "system.max_points", optional=True)
        self.scenes = load_scenes(self.dcfg, max_points)
        self.per_epoch = config_number(sys_cfg.get("max_scenes_per_train_epoch"), "system.max_scenes_per_train_epoch",
                                       optional=True)
        self.batch_size = int(cfg.dataloader.batch_size)
        self.num_workers = int(cfg.dataloader.num_workers)
        self.mode = str(cfg.dataloader.train_data_mode)
        self.num_samples = config_number(d.train_num_samples, "datasets.train_num_samples")
        size = d.train_image_size
        if size is not None and not isinstance(size, int | float | str):
            size = tuple(config_number(s, "datasets.train_image_size") for s in size)
        elif size is not None:
            size = config_number(size, "datasets.train_image_size")
        zoom = d.train_random_zoom
        self.opts = SampleOptions(
            image_size=size,
            zoom_range=(1.0, 1.0) if zoom is None else tuple(config_number(z, "datasets.train_random_zoom", float)
                                                              for z in zoom),
            random_shift=bool(d.train_random_shift),
            selection_count=config_number(d.selection_count, "datasets.selection_count"),
            input_view_max_side=config_number(d.input_view_max_side, "datasets.input_view_max_side", optional=True),
            jitter_prob=config_number(d.color_jitter_prob, "datasets.color_jitter_prob", float),
            loss_on_object_mask=bool(d.loss_on_object_mask),
            targets_per_sample=targets_per_sample(d),
        )
        if self.opts.targets_per_sample > 1 and (self.opts.image_size is None or self.opts.selection_count < 1):
            raise DataConfigError(
                f"datasets.targets_per_sample={self.opts.targets_per_sample} (NPBG++ training) crops more target "
                "views around what the first one's crop shows, sharing its input views: it needs "
                "datasets.train_image_size (crops, not whole images) and datasets.selection_count >= 1 (input "
                "views); or leave it at 1")
        self.val_max = config_number(d.val_num_samples, "datasets.val_num_samples", optional=True)
        self.eval_max = config_number(d.max_eval_views, "datasets.max_eval_views", optional=True)
        self.eval_border = eval_border_crop(d)
        self.val_summary: str | None = None

    @property
    def scene_names(self) -> list[str]:
        return [s.name for s in self.scenes]

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def active_scenes(self, epoch: int) -> list[int]:
        rank, world = self._rank_world()
        active = scenes_for_epoch(len(self.scenes), self.per_epoch, epoch, self.seed)
        return scenes_for_rank(active, rank, world, self.mode)

    def _worker_init(self) -> partial[None]:
        return partial(loader_worker_init, rank=self._rank_world()[0])

    def train_dataloader(self) -> DataLoader:
        epoch = int(self.trainer.current_epoch) if getattr(self, "trainer", None) is not None else 0
        rank, world = self._rank_world()
        active = self.active_scenes(epoch)
        if len(self.scenes) > 1:
            log.info("epoch %d, rank %d: scenes %s", epoch, rank, [self.scenes[i].name for i in active])
        per_rank = self.num_samples if self.mode == "each" else max(1, math.ceil(self.num_samples / world))
        if self.num_workers > 0:
            prefill_image_cache([self.scenes[i] for i in active])
        ds = TrainSamples(self.scenes, active, per_rank, self.opts, seed=self.seed + 7919 * rank, epoch=epoch)
        done = resumed_batches(getattr(self, "trainer", None)) * self.batch_size
        order = EpochOrder(ds, self.seed + rank, epoch, skip=done)
        return DataLoader(
            ds, batch_size=self.batch_size, sampler=order, num_workers=self.num_workers,
            collate_fn=collate_samples, persistent_workers=False, drop_last=False,
            worker_init_fn=self._worker_init() if self.num_workers > 0 else None,
        )

    def val_dataloader(self) -> DataLoader:
        ds = EvalViews(self.scenes, "val", self.val_max, self.eval_border)
        self.val_summary = ds.summary  # before the ranks split the views: what val/psnr averages
        rank, world = self._rank_world()
        if world > 1:
            ds.items = ds.items[rank::world]
        return DataLoader(ds, batch_size=1, shuffle=False, num_workers=self.num_workers, collate_fn=collate_samples,
                          worker_init_fn=self._worker_init() if self.num_workers > 0 else None)
