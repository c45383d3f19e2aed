"""NPBG++ (Rakhimov et al., CVPR 2022): per-image feature extraction, view-dependent streaming
aggregation of point descriptors, multi-scale rasterization and the refiner."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..camera import Camera
from ..rasterizer import landing_mask, rasterize
from .aggregator import AggregatedScene, BasisMLP, RunningSums, descriptors_from_coefficients
from .alignment import align_views, warp_images
from .background import BackgroundSums, refiner_background_rasters, view_samples
from .config import NPBGPlusPlusConfig
from .refiner import BACKGROUND_LEVELS, Refiner
from .rendering import DescriptorRendering


def check_points(points: torch.Tensor | Any) -> torch.Tensor:
    """(N, 3) floating points as a float32 tensor (NaN/inf rows are kept; the
    rasterizer drops them with a warning)."""
    if not isinstance(points, torch.Tensor):
        points = torch.as_tensor(points)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points must be (N, 3), got {tuple(points.shape)}")
    if not points.is_floating_point():
        raise ValueError(f"points must be floating point, got {points.dtype}")
    return points.detach().to(torch.float32)


def check_images(images: torch.Tensor, cameras: Sequence[Camera] | Camera) -> tuple[torch.Tensor, list[Camera]]:
    """Validate a batch of input views: float (K, 3, H, W) in [0, 1], one camera per image
    with the image's size. A single (3, H, W) image with one camera is accepted too."""
    if isinstance(cameras, Camera):
        cameras = [cameras]
    cameras = list(cameras)
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a torch tensor (K, 3, H, W), got {type(images).__name__}")
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be RGB (K, 3, H, W), got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be float RGB in [0, 1], got dtype {images.dtype} (divide uint8 by 255)")
    if len(cameras) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {len(cameras)} cameras")
    if images.numel():
        lo, hi = float(images.min()), float(images.max())
        if not (lo >= -1e-3 and hi <= 1 + 1e-3):
            raise ValueError(f"images must be float RGB in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
    h, w = images.shape[-2:]
    for k, cam in enumerate(cameras):
        if not isinstance(cam, Camera):
            raise ValueError(f"camera {k} is a {type(cam).__name__}, not a Camera")
        if tuple(cam.image_size) != (h, w):
            raise ValueError(f"camera {k} is for a {cam.image_size} image but the image is {(h, w)}")
    return images, cameras


def sample_features(feature_map: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear samples (M, C) of a (C, h, w) map at OpenCV pixel coordinates (M, 2)
    (pixel centres at integers)."""
    c, h, w = feature_map.shape
    grid = torch.stack([(uv[:, 0] + 0.5) / w * 2 - 1, (uv[:, 1] + 0.5) / h * 2 - 1], dim=1)
    grid = grid.to(feature_map.dtype).view(1, 1, -1, 2)
    out = F.grid_sample(feature_map[None], grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.view(c, -1).T


class SceneAggregation:
    """Streaming aggregation for one point cloud: call :meth:`add_views` any number of
    times (any order, any grouping), then :meth:`finish`."""

    def __init__(self, model: NPBGPlusPlus, points: torch.Tensor) -> None:
        self.model = model
        self.device = model.device
        self.points = check_points(points).to(self.device)
        cfg = model.config
        basis_dim = cfg.basis_dim if cfg.aggregator == "sphere" else None
        self.sums = RunningSums(self.points.shape[0], cfg.feature_dim, basis_dim, self.device)
        self.background = model.new_background_sums()
        self.views_added = 0
        self.max_batch = 4  # views per extractor call (bounds memory for many large views)

    def add_views(self, images: torch.Tensor, cameras: Sequence[Camera] | Camera) -> None:
        """Accumulate the features of K input views (images (K, 3, H, W) in [0, 1])."""
        images, cameras = check_images(images, cameras)
        self.views_added += len(cameras)
        if (self.points.shape[0] == 0 and self.background is None) or not cameras:
            return
        images = images.to(self.device, torch.float32)
        cameras = [c.to(self.device) for c in cameras]
        for start in range(0, len(cameras), self.max_batch):
            self._add_batch(images[start : start + self.max_batch], cameras[start : start + self.max_batch])

    def _add_batch(self, images: torch.Tensor, cameras: list[Camera]) -> None:
        model, cfg = self.model, self.model.config
        visible = [model.visible_points(self.points, cam) for cam in cameras]
        # With a background every view counts (its uncovered pixels), seen points or not.
        keep = [k for k, index in enumerate(visible) if index.numel() > 0 or self.background is not None]
        if not keep:
            return
        images, cameras, visible = images[keep], [cameras[k] for k in keep], [visible[k] for k in keep]
        if cfg.align_input_views:
            feat_images, feat_cams = align_views(images, cameras, cfg.world_up, cfg.input_canvas)
        else:
            feat_images, feat_cams = images, cameras
        if isinstance(feat_images, list):  # 'bounds' canvases may differ in size
            features = model.extractor.forward_many(feat_images)
        else:
            features = model.extractor(feat_images)
        for k, (cam, index) in enumerate(zip(cameras, visible, strict=True)):
            if self.background is not None:
                self.background.add(*view_samples(features[k], feat_cams[k], cam, self.points, cfg.near))
                if index.numel() == 0:
                    continue
            pts = self.points[index]
            uv, _ = feat_cams[k].project(pts)
            y = sample_features(features[k], uv)
            x = model.basis(cam.view_directions(pts)) if model.basis is not None else None
            self.sums.add(index, y, x)

    def finish(self) -> AggregatedScene:
        coefficients, valid = self.sums.solve(self.model.config.ridge_alpha)
        background = None if self.background is None else self.background.finish()
        return AggregatedScene(self.points, coefficients, valid, self.sums.count.detach().long(), background)


class NPBGPlusPlus(DescriptorRendering, nn.Module):
    """The NPBG++ network: ``.extractor`` (U-Net), ``.basis`` (direction MLP, None for the
    mean aggregator) and ``.refiner`` (5-scale gated U-Net).

    Typical use::

        state = model.begin_scene(points)
        state.add_views(images, cameras)        # as often as needed
        scene = state.finish()
        image = model.render(scene, camera)     # (3, H, W) in [0, 1]

    Where no point lands the published network gets zeros and can only paint a learnt
    constant. With ``config.background='environment'`` aggregation also builds
    ``scene.background``, a map of extractor features over world directions taken from the
    input views' pixels the cloud leaves uncovered (:mod:`.background`); renders look it up
    at every pixel's ray for the refiner's levels 1/4, 1/8 and 1/16, where zero-initialised
    1x1 projections add it (old weights enter through
    :func:`npbgpp_core.pretrained.widen_for_background` and compute the old function until
    trained). The default ``'none'`` is the published network, unchanged.
    """

    def __init__(self, config: NPBGPlusPlusConfig | dict | None = None) -> None:
        super().__init__()
        if not isinstance(config, NPBGPlusPlusConfig):
            config = NPBGPlusPlusConfig.from_dict(config)
        self.config = config
        from .extractor import FeatureExtractor

        self.extractor = FeatureExtractor(config.feature_dim, weights=config.extractor_weights)
        self.basis = BasisMLP(config.basis_dim) if config.aggregator == "sphere" else None
        self.refiner = Refiner(config.feature_dim + 1, 4 if config.predict_mask else 3,
                               background_channels=config.background_channels)
        self._init_rendering()  # tiled_rendering, roll_context, roll_margin (see DescriptorRendering)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ------------------------------------------------------------ aggregation
    def visible_points(self, points: torch.Tensor, camera: Camera) -> torch.Tensor:
        """Indices of the points that win their pixel on a z-buffer at
        ``visibility_scale`` x the camera's resolution (as published)."""
        cfg = self.config
        index = rasterize(points, camera.to(points.device), scales=(cfg.visibility_scale,),
                          near=self._visibility_near())[0]
        return index[index >= 0]

    def points_in_view(self, points: torch.Tensor, camera: Camera) -> torch.Tensor:
        """Which points (bool (N,)) land on a pixel of :meth:`visible_points`' z-buffer,
        winning it or not (``rasterizer.landing_mask``): the rest lie outside the view."""
        return landing_mask(points, camera.to(points.device), self.config.visibility_scale, self._visibility_near())

    def _visibility_near(self) -> float:
        """The near plane of the input views' visibility z-buffer: ``near``, raised to
        ``min_view_depth`` (the published quirk, when on); one rule for both methods above."""
        return max(self.config.near, self.config.min_view_depth)

    def new_background_sums(self) -> BackgroundSums | None:
        """Empty running sums of a scene's environment map (None without a background)."""
        cfg = self.config
        if cfg.background == "none":
            return None
        return BackgroundSums(cfg.feature_dim, cfg.background_rows, cfg.world_up, self.device)

    def begin_scene(self, points: torch.Tensor) -> SceneAggregation:
        return SceneAggregation(self, points)

    def aggregate(self, points: torch.Tensor, images: torch.Tensor, cameras: Sequence[Camera]) -> AggregatedScene:
        """begin_scene + add_views + finish in one call."""
        state = self.begin_scene(points)
        state.add_views(images, cameras)
        return state.finish()

    # --------------------------------------------------------------- rendering
    def descriptors(self, scene: AggregatedScene, camera: Camera, index: torch.Tensor | None = None) -> torch.Tensor:
        """Per-point descriptors ``ym + beta^T x(d)`` for the target ``camera`` (N, C),
        zero for invalid points (or only the rows ``index``)."""
        dev = self.device
        points = scene.points.to(dev)
        coefficients = scene.coefficients.to(dev)
        if index is not None:  # index_select: several times faster than advanced indexing
            points, coefficients = points.index_select(0, index), coefficients.index_select(0, index)
        x = None
        if self.basis is not None and coefficients.shape[1] > 1:
            x = self.basis(camera.to(dev).view_directions(points))
        desc = descriptors_from_coefficients(coefficients, x)
        if index is None:
            desc = desc * scene.valid.to(dev)[:, None].to(desc.dtype)
        return desc

    def _cloud(self, scene: AggregatedScene) -> tuple[torch.Tensor, torch.Tensor | None]:
        valid = scene.valid.to(self.device)
        return scene.points.to(self.device), None if bool(valid.all()) else torch.nonzero(valid).squeeze(1)

    def _point_descriptors(self, scene: AggregatedScene, camera: Camera, rows: torch.Tensor) -> torch.Tensor:
        return self.descriptors(scene, camera, rows)

    def _background_rasters(self, scene: AggregatedScene, camera: Camera) -> list[torch.Tensor] | None:
        """The refiner's background input for ``camera``: per level of
        :data:`BACKGROUND_LEVELS` a (C+1, h_l, w_l) lookup of ``scene.background`` at the
        pixels' ray directions (zeros when the scene has none); None without a background."""
        cfg = self.config
        if cfg.background == "none":
            return None
        background = scene.background
        if background is not None:
            background = background.to(self.device)
        return refiner_background_rasters(background, camera, cfg.scales, cfg.world_up, cfg.background_channels)

    # ------------------------------------------------- batched (training) paths
    def aggregate_batch(
        self, samples: Sequence[tuple[torch.Tensor, Sequence[torch.Tensor], Sequence[Camera]]],
        channels_last: bool = False, seen_only: bool = False,
    ) -> list[AggregatedScene]:
        """Aggregate several independent samples ``(points, images (3,H,W) list, cameras)``
        at once: one extractor call per padded image size over every sample's views, one
        basis-MLP call, one accumulation and one ridge solve over the concatenated clouds.
        Equals ``begin_scene`` / ``add_views`` / ``finish`` per sample (up to float
        summation order); the per-sample Python work left is visibility and sampling.

        ``seen_only``: each result holds only the points some input view sees (ascending
        index order, all valid). Rendering drops unseen points anyway, so renders are the
        same; the sums, the solve and their backward then cost the seen points instead of
        the whole cloud (training: a crop's views see a fraction of the scene)."""
        cfg, dev = self.config, self.device
        clouds = [check_points(points).to(dev) for points, _, _ in samples]
        feat_images: list[torch.Tensor] = []
        jobs: list[tuple[int, Camera, Camera, torch.Tensor]] = []
        for s, (_, images, cameras) in enumerate(samples):
            for img, cam in zip(images, cameras, strict=True):
                batch, cams = check_images(img, [cam])
                cam = cams[0].to(dev)
                index = self.visible_points(clouds[s], cam)
                if index.numel() == 0 and cfg.background == "none":
                    continue
                batch = batch.to(dev, torch.float32)
                if cfg.align_input_views:
                    aligned, fcams = align_views(batch, [cam], cfg.world_up, cfg.input_canvas)
                    feat_images.append(aligned[0])
                else:
                    fcams = [cam]
                    feat_images.append(batch[0])
                jobs.append((s, cam, fcams[0], index))
        # seen_only: per sample, cloud index -> row of the sums
        local: list[torch.Tensor | None] = [None] * len(samples)
        if seen_only:
            kept = []
            for s, cloud in enumerate(clouds):
                seen = [index for (t, _, _, index) in jobs if t == s]
                rows = torch.unique(torch.cat(seen)) if seen else torch.zeros(0, dtype=torch.long, device=dev)
                remap = torch.full((cloud.shape[0],), -1, dtype=torch.long, device=dev)
                remap[rows] = torch.arange(rows.numel(), device=dev)
                local[s] = remap
                kept.append(cloud.index_select(0, rows))
            views_clouds, clouds = clouds, kept
        else:
            views_clouds = clouds
        sizes = [int(c.shape[0]) for c in clouds]
        offsets = [0]
        for n in sizes[:-1]:
            offsets.append(offsets[-1] + n)
        basis_dim = cfg.basis_dim if cfg.aggregator == "sphere" else None
        sums = RunningSums(sum(sizes), cfg.feature_dim, basis_dim, dev)
        backgrounds = [self.new_background_sums() for _ in samples]
        if jobs:
            features = self.extractor.forward_many(feat_images, channels_last=channels_last)
            idx, ys, dirs = [], [], []
            for (s, cam, fcam, index), feat in zip(jobs, features, strict=True):
                bg = backgrounds[s]
                if bg is not None:
                    bg.add(*view_samples(feat, fcam, cam, views_clouds[s], cfg.near))
                    if index.numel() == 0:
                        continue
                pts = views_clouds[s].index_select(0, index)
                uv, _ = fcam.project(pts)
                ys.append(sample_features(feat, uv))
                idx.append((index if local[s] is None else local[s][index]) + offsets[s])
                if self.basis is not None:
                    dirs.append(cam.view_directions(pts))
            if ys:
                x = self.basis(torch.cat(dirs)) if self.basis is not None else None
                sums.add(torch.cat(idx), torch.cat(ys), x)
        coefficients, valid = sums.solve(cfg.ridge_alpha)
        counts = sums.count.detach().long()
        return [AggregatedScene(clouds[s], coefficients[o : o + n], valid[o : o + n], counts[o : o + n],
                                None if backgrounds[s] is None else backgrounds[s].finish())
                for s, (o, n) in enumerate(zip(offsets, sizes, strict=True))]

    def render_raw_batch(self, scenes: Sequence[AggregatedScene], cameras: Sequence[Camera]) -> list[torch.Tensor]:
        """``render_raw`` of several (scene, camera) pairs with one refiner call per canvas
        size (the refiner has no normalisation: the result equals one call per pair). A
        view too small for the coarsest scale is padded and cut out as ``render_raw`` does."""
        plans = []
        for scene, camera in zip(scenes, cameras, strict=True):
            camera = camera.to(self.device)
            aligned, quarter_turns = self.canvas_camera(camera)
            padded = self._padded_view(aligned)
            canvas = aligned if padded is None else padded[0]
            plans.append((camera, aligned, quarter_turns, self._descriptor_rasters(scene, canvas),
                          self._background_rasters(scene, canvas), padded))
        groups: dict[tuple[int, ...], list[int]] = {}
        for k, plan in enumerate(plans):
            groups.setdefault(tuple(plan[3][0].shape), []).append(k)
        outs: list[torch.Tensor | None] = [None] * len(plans)
        for members in groups.values():
            levels = [torch.stack([plans[k][3][lvl] for k in members]) for lvl in range(len(plans[members[0]][3]))]
            background = None
            if plans[members[0]][4] is not None:
                background = [torch.stack([plans[k][4][j] for k in members]) for j in range(len(BACKGROUND_LEVELS))]
            refined = self.refiner(levels, background)
            for j, k in enumerate(members):
                camera, aligned, quarter_turns, _, _, padded = plans[k]
                out = refined[j]
                if padded is not None:
                    _, top, left = padded
                    out = out[:, top : top + aligned.height, left : left + aligned.width]
                if quarter_turns is not None and quarter_turns != 0:
                    out = torch.rot90(out, quarter_turns, dims=(1, 2)).contiguous()
                elif quarter_turns is None:
                    out = warp_images(out.unsqueeze(0), aligned, camera)[0]
                outs[k] = out
        return outs  # type: ignore[return-value]

    # -------------------------------------------------------- auxiliary loss
    def refine_feature_map(
        self, feature_map: torch.Tensor, drop_prob: float = 0.5, detach: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Run the refiner on 5-scale rasters built from a dense feature map (B, C, H, W):
        nearest-neighbour downsampling to ``int(s*H) x int(s*W)``, then per scale each
        pixel is dropped with probability ``drop_prob`` (features 0, mask 0). With
        ``detach`` gradients reach only the refiner (the published auxiliary loss)."""
        return refine_dense(self.refiner, feature_map, self.config.scales, drop_prob, detach, generator)


def refine_dense(
    refiner: Refiner, feature_map: torch.Tensor, scales: Sequence[float], drop_prob: float,
    detach: bool = True, generator: torch.Generator | None = None,
) -> torch.Tensor:
    if feature_map.ndim != 4:
        raise ValueError(f"feature_map must be (B, C, H, W), got {tuple(feature_map.shape)}")
    if not 0 <= drop_prob < 1:
        raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
    if detach:
        feature_map = feature_map.detach()
    b, _, h, w = feature_map.shape
    rasters = []
    for s in scales:
        size = (max(1, int(s * h)), max(1, int(s * w)))
        level = feature_map if size == (h, w) else F.interpolate(feature_map, size=size, mode="nearest")
        keep = torch.rand((b, 1, *size), device=level.device, generator=generator) >= drop_prob
        keep = keep.to(level.dtype)
        rasters.append(torch.cat([level * keep, keep], dim=1))
    return refiner(rasters)


