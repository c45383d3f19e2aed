"""The refiner evaluated only where an output needs it (inference, CPU or GPU).

A rolled target view is rendered on an axis-aligned canvas of the aligned camera (its
bounding box, up to 2x the pixels at 45 degrees) and resampled. Most of that canvas is
never sampled: the target image covers exactly H x W of it. This module runs the
5-level gated U-Net of :class:`~npbgpp_core.models.refiner.Refiner` on tiles that cover
only the pixels each layer's needed outputs depend on, so a frame costs about the same
at any roll. The values it computes equal the dense network's (same convolutions,
same reflect padding at the canvas border, same pooling and bilinear upsampling) up to
float rounding.

How: needs are propagated backwards as per-row column spans, level by level (a 3x3
convolution widens a need by one pixel, average pooling doubles it, bilinear upsampling
halves it). Every level uses the same grid of tiles, ``TILE >> level`` pixels wide, so a
pooled tile is exactly the pooling of the finer tile with the same index. Each tensor
lives in a padded channels-last buffer; a layer gathers the ``(t + 2)^2`` windows of its
needed tiles with one ``index_select``, runs the convolution without padding on the
batch of windows and writes the tiles back. Pixels outside a tensor's need hold
garbage (uninitialised memory), which by construction never reaches a needed pixel
(``poison=`` fills buffers with NaN to test exactly that).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .refiner import BACKGROUND_LEVELS, Refiner

TILE = 32  # tile side at full resolution; level l uses TILE >> l
LEVELS = 5
_BIG = 1 << 40


# ----------------------------------------------------------------- row spans
# A region of an (h, w) grid: per row a half-open column interval [lo, hi); empty rows
# have lo = _BIG, hi = -_BIG so unions are plain minimum / maximum.


def _empty(h: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full(h, _BIG, dtype=np.int64), np.full(h, -_BIG, dtype=np.int64)


def _clip(lo: np.ndarray, hi: np.ndarray, w: int) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = np.maximum(lo, 0), np.minimum(hi, w)
    empty = hi <= lo
    return np.where(empty, _BIG, lo), np.where(empty, -_BIG, hi)


def _dilate(span: tuple[np.ndarray, np.ndarray], w: int) -> tuple[np.ndarray, np.ndarray]:
    """Every pixel within one pixel (8-neighbourhood) of the region."""
    lo, hi = span
    lo_p = np.concatenate([[_BIG], lo, [_BIG]])
    hi_p = np.concatenate([[-_BIG], hi, [-_BIG]])
    lo2 = np.minimum(np.minimum(lo_p[:-2], lo_p[1:-1]), lo_p[2:]) - 1
    hi2 = np.maximum(np.maximum(hi_p[:-2], hi_p[1:-1]), hi_p[2:]) + 1
    return _clip(lo2, hi2, w)


def _union(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    return np.minimum(a[0], b[0]), np.maximum(a[1], b[1])


def _to_finer(span: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """What a 2x2 average pool of the region reads on the finer level."""
    lo, hi = span
    lo2, hi2 = np.repeat(lo, 2), np.repeat(hi, 2)
    empty = hi2 <= lo2
    return np.where(empty, _BIG, 2 * lo2), np.where(empty, -_BIG, 2 * hi2)


def _to_coarser(span: tuple[np.ndarray, np.ndarray], h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """What 2x bilinear upsampling (align_corners=False) of the region reads on the coarser
    (h, w) level: fine row r reads coarse rows floor(r/2 - 1/4) and the next, clamped."""
    lo, hi = span
    rows = np.arange(lo.shape[0])
    out_lo, out_hi = _empty(h)
    ok = hi > lo
    for first in (np.clip((rows - 1) // 2, 0, h - 1), np.clip((rows + 1) // 2, 0, h - 1)):
        c_lo = np.where(ok, (lo - 1) // 2, _BIG)
        c_hi = np.where(ok, hi // 2 + 1, -_BIG)
        np.minimum.at(out_lo, first, c_lo)
        np.maximum.at(out_hi, first, c_hi)
    return _clip(out_lo, out_hi, w)


# ---------------------------------------------------------------------- plan
@dataclass
class TileSet:
    """Tiles (row ti, column tj of the shared grid) covering one tensor's need."""

    ti: torch.Tensor
    tj: torch.Tensor

    def __len__(self) -> int:
        return int(self.ti.numel())


def _tiles(span: tuple[np.ndarray, np.ndarray], t: int, grid: tuple[int, int]) -> TileSet:
    lo, hi = span
    gh, gw = grid
    pad = gh * t - lo.shape[0]
    lo = np.concatenate([lo, np.full(pad, _BIG)]).reshape(gh, t).min(axis=1)
    hi = np.concatenate([hi, np.full(pad, -_BIG)]).reshape(gh, t).max(axis=1)
    ti, tj = [], []
    for i in range(gh):
        if hi[i] > lo[i]:
            cols = np.arange(lo[i] // t, (hi[i] - 1) // t + 1)
            ti.append(np.full(cols.shape, i))
            tj.append(cols)
    if not ti:
        return TileSet(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    return TileSet(torch.from_numpy(np.concatenate(ti)), torch.from_numpy(np.concatenate(tj)))


@dataclass
class TilePlan:
    """Which tiles every tensor of the refiner needs on a canvas for a region of
    needed output pixels (see :func:`plan_tiles`)."""

    size: tuple[int, int]  # canvas (H, W), a multiple of 2**(LEVELS-1)
    grid: tuple[int, int]  # tiles per column and row, same at every level
    tile0: int  # tile side at full resolution; level l uses tile0 >> l
    out: TileSet  # D_0 (decoder output at full resolution, then the 1x1 head)
    decoder: list[TileSet]  # D_l, l = 0..4 (D_4 is the centre block)
    upsampled: list[TileSet]  # U_l, l = 0..3
    skip: list[TileSet]  # E_l, l = 0..4 (E_0 the first block, E_l = [down_l(P_l), R_l])
    pooled: list[TileSet]  # P_l, l = 1..4 (index 0 unused)
    raster: list[TileSet]  # R_l, l = 0..4
    needed_pixels: int  # pixels of the canvas the output needs
    needs: dict  # the exact per-row spans behind each tile set: needs[name][level]

    def level_size(self, level: int) -> tuple[int, int]:
        return self.size[0] >> level, self.size[1] >> level

    def tile(self, level: int) -> int:
        return self.tile0 >> level


def can_plan(size: tuple[int, int]) -> bool:
    """Whether :func:`plan_tiles` handles a canvas: every level an exact half of the one
    above and at least 2x2 (reflect padding)."""
    h, w = size
    m = 1 << (LEVELS - 1)
    return h % m == 0 and w % m == 0 and h >= 2 * m and w >= 2 * m


def plan_tiles(size: tuple[int, int], need: tuple[np.ndarray, np.ndarray], tile: int = TILE) -> TilePlan:
    """Tiles of every refiner tensor so that the output is exact on ``need`` (per-row
    column spans ``(lo, hi)`` on the canvas ``size``); ``tile`` pixels wide at full
    resolution (a multiple of 16)."""
    if not can_plan(size):
        raise ValueError(f"tiled refiner needs a canvas that is a multiple of {1 << (LEVELS - 1)}, got {size}")
    if tile < 1 << LEVELS - 1 or tile % (1 << LEVELS - 1):
        raise ValueError(f"tile must be a multiple of {1 << (LEVELS - 1)}, got {tile}")
    h0, w0 = size
    grid = (-(-h0 // tile), -(-w0 // tile))
    sizes = [(h0 >> level, w0 >> level) for level in range(LEVELS)]
    need = _clip(need[0].astype(np.int64), need[1].astype(np.int64), w0)

    def tiles(span, level):
        return _tiles(span, tile >> level, grid)

    n_dec: list = [None] * LEVELS
    n_up: list = [None] * (LEVELS - 1)
    n_dec[0] = need
    for level in range(LEVELS - 1):
        # D_l = gated(cat(U_l, E_l)): a 3x3 convolution reads one pixel around.
        n_up[level] = _dilate(n_dec[level], sizes[level][1])
        n_dec[level + 1] = _to_coarser(n_up[level], *sizes[level + 1])
    n_skip: list = [None] * LEVELS
    n_pool: list = [None] * LEVELS
    n_skip[LEVELS - 1] = _dilate(n_dec[LEVELS - 1], sizes[-1][1])  # the centre block reads E_4
    for level in range(LEVELS - 1, 0, -1):
        n_pool[level] = _dilate(n_skip[level], sizes[level][1])  # down_l reads P_l
        # E_{l-1} feeds the decoder at its level (through U's need) and the pooling.
        n_skip[level - 1] = _union(n_up[level - 1], _to_finer(n_pool[level]))
    n_r0 = _dilate(n_skip[0], w0)  # the first block reads R_0
    lo, hi = need
    needed_pixels = int(np.clip(hi - lo, 0, None).sum())
    needs = {"out": [need], "decoder": n_dec, "upsampled": n_up, "skip": n_skip, "pooled": n_pool,
             "raster": [n_r0, *n_skip[1:]]}
    return TilePlan(
        size=(h0, w0), grid=grid, tile0=tile, out=tiles(need, 0),
        decoder=[tiles(n_dec[level], level) for level in range(LEVELS)],
        upsampled=[tiles(n_up[level], level) for level in range(LEVELS - 1)],
        skip=[tiles(n_skip[level], level) for level in range(LEVELS)],
        pooled=[TileSet(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))]
        + [tiles(n_pool[level], level) for level in range(1, LEVELS)],
        raster=[tiles(n_r0, 0)] + [tiles(n_skip[level], level) for level in range(1, LEVELS)],
        needed_pixels=needed_pixels, needs=needs,
    )


def needed_spans(corners: np.ndarray, size: tuple[int, int], margin: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Canvas pixels a bilinear resampling reads when its sample points fill the convex
    quadrilateral ``corners`` (4, 2) of canvas pixel coordinates (x, y), in order around
    it: row y is read by samples with y - 1 <= s_y < y + 1, columns floor(s_x) and the
    next; ``margin`` more pixels against rounding."""
    h, w = size
    rows = np.arange(h, dtype=np.float64)
    lo = np.full(h, np.inf)
    hi = np.full(h, -np.inf)
    y0, y1 = rows - 1 - margin, rows + 1 + margin
    for k in range(len(corners)):
        (px, py), (qx, qy) = corners[k], corners[(k + 1) % len(corners)]
        if abs(qy - py) < 1e-12:
            inside = (py >= y0) & (py <= y1)
            for x in (px, qx):
                lo = np.where(inside, np.minimum(lo, x), lo)
                hi = np.where(inside, np.maximum(hi, x), hi)
            continue
        ta, tb = (y0 - py) / (qy - py), (y1 - py) / (qy - py)
        t_min, t_max = np.minimum(ta, tb), np.maximum(ta, tb)
        hit = (t_max >= 0) & (t_min <= 1)  # the edge crosses the slab
        t0, t1 = np.clip(t_min, 0, 1), np.clip(t_max, 0, 1)
        for t in (t0, t1):
            x = px + t * (qx - px)
            lo = np.where(hit, np.minimum(lo, x), lo)
            hi = np.where(hit, np.maximum(hi, x), hi)
    ok = hi >= lo
    lo_i = np.where(ok, np.floor(np.where(ok, lo, 0)) - margin, _BIG).astype(np.int64)
    hi_i = np.where(ok, np.floor(np.where(ok, hi, 0)) + 2 + margin, -_BIG).astype(np.int64)
    return _clip(lo_i, hi_i, w)


def tile_pixels(plan: TilePlan, tiles: TileSet, level: int) -> torch.Tensor:
    """Flat indices (n * t * t,) of the tiles' pixels in the level's image padded to the
    tile grid (row length ``grid[1] * t``), tile by tile, row-major inside a tile."""
    t = plan.tile(level)
    r = torch.arange(t)
    rows = tiles.ti[:, None] * t + r[None]
    cols = tiles.tj[:, None] * t + r[None]
    return (rows[:, :, None] * (plan.grid[1] * t) + cols[:, None, :]).reshape(-1)


def pad_to_grid(image: torch.Tensor, plan: TilePlan, level: int, fill: int | float) -> torch.Tensor:
    """An (h, w) (or (C, h, w)) image of the level padded with ``fill`` to the tile grid's size."""
    t = plan.tile(level)
    gh, gw = plan.grid
    h, w = image.shape[-2:]
    out = image.new_full((*image.shape[:-2], gh * t, gw * t), fill)
    out[..., :h, :w] = image
    return out


# ------------------------------------------------------------------ buffers
class _Buffers:
    """Padded channels-last (NHWC) buffers of one level and index helpers for tiles."""

    def __init__(self, plan: TilePlan, device: torch.device, dtype: torch.dtype, poison: float | None):
        self.plan, self.device, self.dtype, self.poison = plan, device, dtype, poison
        self._index_cache: dict = {}

    def new(self, level: int, channels: int) -> torch.Tensor:
        t = self.plan.tile(level)
        gh, gw = self.plan.grid
        shape = (gh * t + 2, gw * t + 2, channels)
        if self.poison is None:
            return torch.empty(shape, device=self.device, dtype=self.dtype)
        return torch.full(shape, self.poison, device=self.device, dtype=self.dtype)

    def index(self, tiles: TileSet, level: int, halo: int, width: int, offset: int) -> torch.Tensor:
        """Flat pixel indices (n * s * s,) of the tiles grown by ``halo`` in an image of
        row length ``width`` whose pixel (0, 0) sits at (offset, offset)."""
        key = (id(tiles), level, halo, width, offset)
        if key not in self._index_cache:
            t = self.plan.tile(level)
            r = torch.arange(-halo, t + halo)
            rows = tiles.ti[:, None] * t + r[None] + offset
            cols = tiles.tj[:, None] * t + r[None] + offset
            flat = (rows[:, :, None] * width + cols[:, None, :]).reshape(-1)
            self._index_cache[key] = flat.to(self.device)
        return self._index_cache[key]

    def windows(self, buf: torch.Tensor, tiles: TileSet, level: int, halo: int = 1) -> torch.Tensor:
        """(n, C, t + 2 halo, t + 2 halo) channels-last windows of the tiles."""
        t = self.plan.tile(level) + 2 * halo
        c = buf.shape[-1]
        idx = self.index(tiles, level, halo, buf.shape[1], 1)
        return buf.view(-1, c).index_select(0, idx).view(len(tiles), t, t, c).permute(0, 3, 1, 2)

    def write(self, buf: torch.Tensor, tiles: TileSet, level: int, values: torch.Tensor,
              need: tuple[str, int] | None = None) -> None:
        """Store (n, C, t, t) tile values into the buffer (an indexed assignment into a
        (grid, grid, t, t, C) view copies whole tile rows, faster than per pixel)."""
        t = self.plan.tile(level)
        gh, gw = self.plan.grid
        hb, wb, c = buf.shape
        view = buf.as_strided((gh, gw, t, t, c), (t * wb * c, t * c, wb * c, c, 1), buf.storage_offset() + (wb + 1) * c)
        key = ("tiles", id(tiles))
        if key not in self._index_cache:
            self._index_cache[key] = (tiles.ti.to(self.device), tiles.tj.to(self.device))
        ti, tj = self._index_cache[key]
        # Autocast may return some ops in float32 (e.g. upsampling); buffers keep one dtype.
        view[ti, tj] = values.permute(0, 2, 3, 1).to(buf.dtype)
        if self.poison is not None and need is not None:
            # Strict test mode: what the tiles computed beyond the exact need is poisoned too.
            lo, hi = self.plan.needs[need[0]][need[1]]
            cols = np.arange(wb - 2)
            mask = np.zeros((hb - 2, wb - 2), dtype=bool)
            mask[: lo.shape[0]] = (cols[None] >= lo[:, None]) & (cols[None] < hi[:, None])
            inner = buf[1:-1, 1:-1]
            inner[torch.from_numpy(~mask).to(buf.device)] = self.poison

    def fill_border(self, buf: torch.Tensor, level: int, mode: str) -> None:
        """The one-pixel frame around the level's real (h, w) pixels: 'reflect' (the
        refiner's convolution padding) or 'replicate' (bilinear upsampling's clamping)."""
        h, w = self.plan.level_size(level)
        k = 2 if mode == "reflect" else 1
        buf[0, 1 : w + 1] = buf[k, 1 : w + 1]
        buf[h + 1, 1 : w + 1] = buf[h + 1 - k, 1 : w + 1]
        buf[: h + 2, 0] = buf[: h + 2, k]
        buf[: h + 2, w + 1] = buf[: h + 2, w + 1 - k]


def _gated(block, windows: torch.Tensor) -> torch.Tensor:
    return block.forward_unpadded(windows)


def refine_tiles(
    refiner: Refiner,
    plan: TilePlan,
    raster_tiles: Callable[[int, torch.Tensor], torch.Tensor],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    poison: float | None = None,
    background_tiles: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The refiner's output (C_out, H, W) on the plan's canvas, exact on the needed pixels
    (zero outside the tiles that hold them). ``raster_tiles(level, flat)`` returns the
    level's raster (M, C_in) at flat pixel indices :func:`tile_pixels` of the level's
    image padded to the tile grid (:func:`pad_to_grid`); ``background_tiles`` the same
    for the refiner's background rasters at the levels :data:`BACKGROUND_LEVELS` (None:
    no background, as the dense refiner called without one)."""
    if torch.is_grad_enabled():
        raise RuntimeError("refine_tiles is an inference path: call it under torch.inference_mode()")
    bufs = _Buffers(plan, device, dtype, poison)
    c_in = refiner.in_channels

    def raster(level: int, tiles: TileSet) -> torch.Tensor:
        t = plan.tile(level)
        values = raster_tiles(level, tile_pixels(plan, tiles, level).to(device)).to(dtype)  # (n * t * t, C_in)
        return values.view(len(tiles), t, t, c_in).permute(0, 3, 1, 2)

    # Encoder.
    r0 = bufs.new(0, c_in)
    bufs.write(r0, plan.raster[0], 0, raster(0, plan.raster[0]), ("raster", 0))
    bufs.fill_border(r0, 0, "reflect")
    skips = [bufs.new(0, refiner.first.feature.out_channels)]
    bufs.write(skips[0], plan.skip[0], 0, _gated(refiner.first, bufs.windows(r0, plan.skip[0], 0)), ("skip", 0))
    bufs.fill_border(skips[0], 0, "reflect")
    del r0
    for level, block in enumerate(refiner.down, start=1):
        pooled_tiles = plan.pooled[level]
        fine = bufs.windows(skips[-1], pooled_tiles, level - 1, halo=0)
        pooled = bufs.new(level, fine.shape[1])
        bufs.write(pooled, pooled_tiles, level, F.avg_pool2d(fine, 2), ("pooled", level))
        bufs.fill_border(pooled, level, "reflect")
        tiles = plan.skip[level]
        out = _gated(block, bufs.windows(pooled, tiles, level))
        both = torch.cat([out, raster(level, tiles)], dim=1)
        if background_tiles is not None and refiner.background_channels and level in BACKGROUND_LEVELS:
            # The projection is 1x1: per pixel, so tiles need no halo of the background.
            proj = refiner.background_proj[BACKGROUND_LEVELS.index(level)]
            t, cb = plan.tile(level), refiner.background_channels
            values = background_tiles(level, tile_pixels(plan, tiles, level).to(device)).to(dtype)
            values = values.view(len(tiles), t, t, cb).permute(0, 3, 1, 2)
            both = both + F.conv2d(values, proj.weight.to(dtype), proj.bias.to(dtype))
        skip = bufs.new(level, both.shape[1])
        bufs.write(skip, tiles, level, both, ("skip", level))
        bufs.fill_border(skip, level, "reflect")
        skips.append(skip)
    # Centre and decoder.
    last = LEVELS - 1
    x = bufs.new(last, refiner.center.feature.out_channels)
    centre = _gated(refiner.center, bufs.windows(skips[last], plan.decoder[last], last))
    bufs.write(x, plan.decoder[last], last, centre, ("decoder", last))
    for level in range(last - 1, -1, -1):
        bufs.fill_border(x, level + 1, "replicate")
        t = plan.tile(level)
        up_tiles = plan.upsampled[level]
        coarse = bufs.windows(x, up_tiles, level + 1)  # (n, C, t/2 + 2, t/2 + 2)
        fine = F.interpolate(coarse, size=(t + 4, t + 4), mode="bilinear", align_corners=False)
        up = bufs.new(level, fine.shape[1])
        bufs.write(up, up_tiles, level, fine[:, :, 2 : t + 2, 2 : t + 2], ("upsampled", level))
        bufs.fill_border(up, level, "reflect")
        tiles = plan.decoder[level]
        block = refiner.up[last - 1 - level]
        both = torch.cat([bufs.windows(up, tiles, level), bufs.windows(skips[level], tiles, level)], dim=1)
        x = bufs.new(level, block.feature.out_channels)
        bufs.write(x, tiles, level, _gated(block, both), ("decoder", level))
        skips[level] = up = None  # type: ignore[assignment]  # free memory early
    # Head (1x1) on the needed tiles only, into a zero canvas.
    out_tiles = plan.out
    head = refiner.head
    values = F.conv2d(bufs.windows(x, out_tiles, 0, halo=0), head.weight.to(dtype), head.bias.to(dtype))
    h, w = plan.size
    gh, gw = plan.grid
    canvas = torch.zeros(gh * plan.tile0 + 2, gw * plan.tile0 + 2, values.shape[1], device=device, dtype=dtype)
    bufs.write(canvas, out_tiles, 0, values)
    return canvas[1 : h + 1, 1 : w + 1].permute(2, 0, 1)


def target_corners(pixel_map: np.ndarray, target_size: Sequence[int]) -> np.ndarray:
    """Canvas pixel coordinates (4, 2) of the target image's corner pixel centres under
    the 3x3 affine ``pixel_map`` (target pixels -> canvas pixels), in order around."""
    h, w = target_size
    corners = np.array([[0.0, 0.0, 1.0], [w - 1.0, 0.0, 1.0], [w - 1.0, h - 1.0, 1.0], [0.0, h - 1.0, 1.0]])
    mapped = (pixel_map @ corners.T).T
    return mapped[:, :2] / mapped[:, 2:3]


def tile_fraction(plan: TilePlan) -> float:
    """Share of the canvas' full-resolution tiles the output needs (for logs/benchmarks)."""
    gh, gw = plan.grid
    return len(plan.out) / max(1, gh * gw)


__all__ = ["TILE", "TilePlan", "can_plan", "needed_spans", "pad_to_grid", "plan_tiles", "refine_tiles",
           "target_corners", "tile_fraction", "tile_pixels"]
