"""Rendering rasterized point descriptors through the refiner, upright or not: the one
path of NPBG++ (:class:`~.npbgpp.NPBGPlusPlus`) and of the NPBG / coefficients_ft model
(:class:`~.npbg.NPBG`).

With ``config.align_during_rendering`` a view rolled against ``config.world_up`` is
rendered by its aligned (upright) camera on the canvas ``config.render_canvas`` picks
(:func:`~.alignment.render_canvas_camera`) and turned back: an exact ``rot90`` at
multiples of 90 degrees, else resampled. The refiner then always sees the world upright,
as NPBG++ was trained; the price is the canvas: up to about 2x the view's pixels at 45
degrees (inference renders compute only the tiles the resampling reads, :mod:`.tiles`).

A model using :class:`DescriptorRendering` provides ``config`` (``scales``, ``near``,
``world_up``, ``align_during_rendering``, ``render_canvas``), ``refiner``, ``device`` and
four hooks saying what its "scene" argument is (NPBG++: an
:class:`~.aggregator.AggregatedScene`; NPBG: the point cloud, the descriptors being the
model's own)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..camera import Camera
from ..rasterizer import min_side, rasterize, rasterize_descriptors, scale_sizes
from .alignment import _pixel_map, render_canvas_camera, warp_images
from .refiner import BACKGROUND_LEVELS, Refiner

ROLL_CONTEXTS = ("exact", "bounded")
DEFAULT_ROLL_MARGIN = 8  # pixels of context beyond a rolled view in 'bounded' mode


def check_roll_context(context: str, margin: int) -> None:
    """ValueError unless ``context`` is one of :data:`ROLL_CONTEXTS` and ``margin`` an int >= 0."""
    if context not in ROLL_CONTEXTS:
        raise ValueError(f"roll_context must be one of {ROLL_CONTEXTS}, got {context!r}")
    if isinstance(margin, bool) or not isinstance(margin, int) or not 0 <= margin <= 1024:
        raise ValueError(f"roll_margin must be an int in 0..1024 pixels, got {margin!r}")


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def render_at_scale(
    render_fn: Callable[[Camera], torch.Tensor], camera: Camera, resolution_scale: float
) -> torch.Tensor:
    """``render_fn(camera)`` (C, H, W), or with ``resolution_scale`` < 1 rendered for
    ``camera.scaled(resolution_scale)`` and upsampled bilinearly to (H, W) (pixel areas
    map exactly, like :meth:`Camera.scaled`)."""
    if not 0 < resolution_scale <= 1:
        raise ValueError(f"resolution_scale must be in (0, 1], got {resolution_scale}")
    h, w = camera.image_size
    small = (max(1, int(resolution_scale * h)), max(1, int(resolution_scale * w)))
    if small == (h, w):
        return render_fn(camera)
    out = render_fn(camera.scaled(small))
    return F.interpolate(out.unsqueeze(0).float(), size=(h, w), mode="bilinear", align_corners=False)[0]


class DescriptorRendering:
    """Mixin (for an ``nn.Module``): ``render_raw`` / ``render`` of a scene's point
    descriptors through ``self.refiner``, on the aligned canvas when
    ``config.align_during_rendering`` (see the module doc).

    Attributes it sets (:meth:`_init_rendering`): ``tiled_rendering`` (inference renders of
    a resampled canvas run the refiner on tiles; False renders the whole canvas, the
    reference for tests and benchmarks), ``roll_context`` ('exact': the network's full
    reach on the aligned canvas, or 'bounded': the view plus ``roll_margin`` pixels, about
    the cost of roll 0, an approximation; see models/bounded.py; roll 0 and multiples of
    90 degrees are the same in both)."""

    config: Any
    refiner: Refiner
    device: torch.device

    def _init_rendering(self) -> None:
        self.tiled_rendering = True
        self.roll_context = "exact"
        self.roll_margin = DEFAULT_ROLL_MARGIN

    # ------------------------------------------------------------- the hooks
    def _cloud(self, scene: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The scene's points (N, 3) on the device and the rows that are rendered (None: all)."""
        raise NotImplementedError

    def _point_descriptors(self, scene: Any, camera: Camera, rows: torch.Tensor) -> torch.Tensor:
        """Descriptors (len(rows), C) of the scene's points ``rows`` for ``camera``."""
        raise NotImplementedError

    def _empty_descriptor(self) -> torch.Tensor | None:
        """The features of a pixel no point lands on (C,), None: zeros."""
        return None

    def _background_rasters(self, scene: Any, camera: Camera) -> list[torch.Tensor] | None:
        """The refiner's background input for ``camera`` (per level of
        :data:`BACKGROUND_LEVELS` a (C+1, h_l, w_l) map), None without a background."""
        return None

    # ------------------------------------------------------------- rendering
    def _descriptor_rasters(self, scene: Any, camera: Camera) -> list[torch.Tensor]:
        """The refiner's input: per scale a (C+1, h_s, w_s) raster of descriptors + mask."""
        points, rows = self._cloud(scene)
        cfg = self.config
        if rows is None:  # the usual case: no per-frame copy of the cloud
            return rasterize_descriptors(points, camera, cfg.scales, cfg.near,
                                         lambda r: self._point_descriptors(scene, camera, r),
                                         background=self._empty_descriptor())
        return rasterize_descriptors(points.index_select(0, rows), camera, cfg.scales, cfg.near,
                                     lambda r: self._point_descriptors(scene, camera, rows[r]),
                                     background=self._empty_descriptor())

    def _padded_view(self, camera: Camera) -> tuple[Camera, int, int] | None:
        """For a view too small for the coarsest scale (under :func:`min_side` pixels a
        side, 16 by default): the camera of a canvas that has that size with the view
        centred in it, and the view's top-left corner there; None for a view that fits.
        Rendering the canvas and cutting the view out gives the view (rolled views'
        canvases are rounded up to 16 pixels the same way)."""
        h, w = camera.image_size
        least = min_side(self.config.scales)
        if h >= least and w >= least:
            return None
        H, W = max(h, least), max(w, least)
        top, left = (H - h) // 2, (W - w) // 2
        return camera.cropped(-top, -left, H, W), top, left

    def _render_direct(self, scene: Any, camera: Camera) -> torch.Tensor:
        """The refiner's output for ``camera`` as it is (no alignment); a view too small
        for the coarsest scale through :meth:`_padded_view`."""
        padded = self._padded_view(camera)
        if padded is not None:
            canvas, top, left = padded
            h, w = camera.image_size
            return self._render_direct(scene, canvas)[:, top : top + h, left : left + w]
        background = self._background_rasters(scene, camera)
        return self.refiner([r.unsqueeze(0) for r in self._descriptor_rasters(scene, camera)],
                            None if background is None else [b.unsqueeze(0) for b in background])[0]

    def _raster_valid(self, scene: Any, canvas: Camera) -> tuple[list[torch.Tensor], torch.Tensor | None, int]:
        """The scene's rendered points rasterized into ``canvas`` at every scale: the index
        images (into the rendered points, -1 empty), those points' rows in the scene
        (None: all) and how many there are."""
        points, rows = self._cloud(scene)
        if rows is not None:
            points = points.index_select(0, rows)
        return rasterize(points, canvas, self.config.scales, self.config.near), rows, points.shape[0]

    def _winner_table(
        self, scene: Any, canvas: Camera, rows: torch.Tensor | None, n_points: int, seen: list[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Descriptors of only the points that win a pixel in ``seen`` (raster indices, -1
        empty), each with a coverage 1, as a (m + 1, C + 1) table whose last row is the
        empty pixel (the empty descriptor, coverage 0); and ``remap`` taking a raster index
        (-1 included) to its row."""
        flat = torch.cat(seen)
        used = torch.unique(flat[flat >= 0])
        desc = self._point_descriptors(scene, canvas, used if rows is None else rows[used])
        m, c = desc.shape
        empty = self._empty_descriptor()
        empty_row = desc.new_zeros(1, c + 1)
        if empty is not None:
            empty_row[0, :c] = empty.to(desc.dtype)
        table = torch.cat([torch.cat([desc, desc.new_ones(m, 1)], 1), empty_row])
        remap = torch.full((n_points + 1,), m, dtype=torch.long, device=self.device)
        remap[used] = torch.arange(m, device=self.device)
        return table, remap

    def _render_tiled(self, scene: Any, aligned: Camera, camera: Camera) -> torch.Tensor | None:
        """:meth:`_render_direct` on the ``aligned`` canvas computed only where resampling
        it into ``camera`` reads (inference), then resampled; None when the canvas or the
        scales do not suit the tiled refiner (the caller renders densely)."""
        from . import tiles

        size = aligned.image_size
        if not tiles.can_plan(size) or scale_sizes(size, self.config.scales) != tuple(
            (size[0] >> level, size[1] >> level) for level in range(tiles.LEVELS)
        ):
            return None
        corners = tiles.target_corners(_pixel_map(aligned, camera), camera.image_size)
        plan = tiles.plan_tiles(size, tiles.needed_spans(corners, size))
        dev = self.device
        indices, rows, n_points = self._raster_valid(scene, aligned)
        grids = [tiles.pad_to_grid(index, plan, level, -1).reshape(-1) for level, index in enumerate(indices)]
        seen = [grids[level].index_select(0, tiles.tile_pixels(plan, plan.raster[level], level).to(dev))
                for level in range(tiles.LEVELS)]
        table, remap = self._winner_table(scene, aligned, rows, n_points, seen)

        def raster_tiles(level: int, flat_pixels: torch.Tensor) -> torch.Tensor:
            return table.index_select(0, remap[grids[level].index_select(0, flat_pixels)])

        background_tiles = None
        background = self._background_rasters(scene, aligned)
        if background is not None:
            # Per level a table (pixels of the padded grid, C+1): rows are tile_pixels' indices.
            tables = {level: tiles.pad_to_grid(b, plan, level, 0.0).flatten(1).T.contiguous()
                      for level, b in zip(BACKGROUND_LEVELS, background, strict=True)}

            def background_tiles(level: int, flat_pixels: torch.Tensor) -> torch.Tensor:
                return tables[level].index_select(0, flat_pixels)

        dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else torch.float32
        out = tiles.refine_tiles(self.refiner, plan, raster_tiles, dev, dtype, background_tiles=background_tiles)
        return warp_images(out.unsqueeze(0), aligned, camera)[0]

    def _render_bounded(self, scene: Any, aligned: Camera, camera: Camera) -> torch.Tensor | None:
        """The ``aligned`` canvas grown by the margin, the refiner computed only on the
        target plus ``roll_margin`` pixels (:mod:`.bounded`), resampled into ``camera``;
        None when the scales do not suit it (the caller renders exactly)."""
        from . import bounded, tiles

        margin = self.roll_margin
        grow = -(-margin // bounded.ALIGN) * bounded.ALIGN
        size = (aligned.image_size[0] + 2 * grow, aligned.image_size[1] + 2 * grow)
        canvas = aligned.cropped(-grow, -grow, *size)
        if not bounded.can_plan(size) or scale_sizes(size, self.config.scales) != tuple(
            (size[0] >> level, size[1] >> level) for level in range(bounded.LEVELS)
        ):
            return None
        corners = tiles.target_corners(_pixel_map(canvas, camera), camera.image_size)
        plan = bounded.plan_bands(size, tiles.needed_spans(corners, size, margin=1 + margin))
        dev = self.device
        indices, rows, n_points = self._raster_valid(scene, canvas)
        seen = [indices[level][r0:r1, c0:c1].reshape(-1)
                for level in range(bounded.LEVELS) for r0, r1, c0, c1 in plan.bands[level]]
        table, remap = self._winner_table(scene, canvas, rows, n_points, seen)
        c = table.shape[1] - 1

        def raster_band(level: int, band: tuple[int, int, int, int]) -> torch.Tensor:
            r0, r1, c0, c1 = band
            index = remap[indices[level][r0:r1, c0:c1].reshape(-1)]
            return table.index_select(0, index).view(r1 - r0, c1 - c0, c + 1).permute(2, 0, 1)

        background_band = None
        background = self._background_rasters(scene, canvas)
        if background is not None:
            by_level = dict(zip(BACKGROUND_LEVELS, background, strict=True))

            def background_band(level: int, band: tuple[int, int, int, int]) -> torch.Tensor:
                r0, r1, c0, c1 = band
                return by_level[level][:, r0:r1, c0:c1]

        dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else torch.float32
        out = bounded.refine_bands(self.refiner, plan, raster_band, dev, dtype, background_band)
        return warp_images(out.unsqueeze(0), canvas, camera)[0]

    def canvas_camera(self, camera: Camera) -> tuple[Camera, int | None]:
        """The camera whose image the refiner computes for the target ``camera`` and how it
        becomes the target's: ``k`` quarter turns (``torch.rot90(image, k, dims=(-2, -1))``;
        0 without alignment) or None (resample with :func:`~.alignment.warp_images`)."""
        if not self.config.align_during_rendering:
            return camera, 0
        return render_canvas_camera(camera, self.config.render_canvas, self.config.world_up)

    def render_raw(self, scene: Any, camera: Camera) -> torch.Tensor:
        """Unclamped, differentiable render (3 or 4, H, W) of the target ``camera``. With
        ``align_during_rendering`` the scene is rendered by the aligned camera on the
        canvas ``config.render_canvas`` picks and turned back (rot90 or resampling).
        Without autograd a resampled 'bounds' canvas is computed only where the target
        reads it (:mod:`.tiles`; ``tiled_rendering = False`` turns that off): same image
        up to float rounding. With ``roll_context = 'bounded'`` (inference) the network
        sees only the view plus ``roll_margin`` pixels instead (:mod:`.bounded`): about
        the cost of the unrolled view at any roll, an approximation of the exact image."""
        camera = camera.to(self.device)
        if not self.config.align_during_rendering:
            return self._render_direct(scene, camera)
        aligned, quarter_turns = self.canvas_camera(camera)
        check_roll_context(self.roll_context, self.roll_margin)
        if quarter_turns is None and self.roll_context == "bounded" and not torch.is_grad_enabled():
            out = self._render_bounded(scene, aligned, camera)
            if out is not None:
                return out
        if quarter_turns is None and self.tiled_rendering and self.config.render_canvas == "bounds" \
                and not torch.is_grad_enabled():
            out = self._render_tiled(scene, aligned, camera)
            if out is not None:
                return out
        out = self._render_direct(scene, aligned)
        if quarter_turns is not None:
            return torch.rot90(out, quarter_turns, dims=(1, 2)).contiguous()
        return warp_images(out.unsqueeze(0), aligned, camera)[0]

    def forward(self, scene: Any, camera: Camera) -> torch.Tensor:
        return self.render_raw(scene, camera)

    def render(
        self, scene: Any, camera: Camera, dtype: torch.dtype | None = None,
        resolution_scale: float = 1.0, roll_context: str | None = None, refiner_impl: str | None = None,
    ) -> torch.Tensor:
        """Inference render (3, H, W) clamped to [0, 1]; ``dtype`` (e.g. torch.float16 on a
        GPU) enables autocast. ``resolution_scale`` < 1 renders internally at
        ``int(s*H) x int(s*W)`` and upsamples bilinearly (a preview: about s^2 of the
        cost, softer and not the full-quality image). ``roll_context`` overrides
        :attr:`roll_context` for this call ('exact' or 'bounded'); ``refiner_impl``
        overrides ``refiner.impl`` ('torch', or 'triton' / 'triton_conv': fused kernels,
        CUDA only)."""
        camera = camera.to(self.device)
        saved, saved_impl = self.roll_context, self.refiner.impl
        if roll_context is not None:
            check_roll_context(roll_context, self.roll_margin)
            self.roll_context = roll_context
        if refiner_impl is not None:
            self.refiner.impl = refiner_impl
        try:
            with torch.inference_mode(), autocast_context(self.device, dtype):
                out = render_at_scale(lambda cam: self.render_raw(scene, cam), camera, resolution_scale)
        finally:
            self.roll_context = saved
            self.refiner.impl = saved_impl
        # A normal tensor (clone outside inference mode): callers may edit it in place.
        return out[:3].float().clamp(0, 1).clone()
