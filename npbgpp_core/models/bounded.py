"""Bounded-context rendering of rolled views (inference): the refiner sees the target view
plus a margin, not the whole aligned canvas.

A rolled target is rendered on the aligned (upright) canvas and resampled. The exact
result (:mod:`.tiles`) needs the refiner everywhere the output depends on: the target
plus the network's reach, about 80 full-resolution pixels, which at 45 degrees is
nearly the whole bounding-box canvas. Here every tensor of the refiner is computed only
on a region ``Omega_l`` per pyramid level (the target's pixels plus ``margin`` pixels,
as row bands; the coarse levels' bands are merged, taller, and take inputs only within
level 0's region) and holds a fixed value outside it: the network's response to an empty
input (``fill='empty'``: what it computes far inside a region where no point lands and
the background is zero) or zero (``fill='zero'``). So the network sees "nothing beyond
the view plus the margin", much as it sees nothing beyond the image border at roll 0.
This is an approximation of the exact render: close in the view's interior, different
within about the reach of its border (see BENCHMARKS.md, issue 16, for measured figures).

Why bands: a region of rectangles one band of rows high costs only a one-pixel row halo
per band and per layer (tiles pay it on four sides and gather every window); band
heights grow at the coarse levels, where few rows would make the halo dominate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .refiner import BACKGROUND_LEVELS, DECODER_CHANNELS, LEVEL_CHANNELS, Refiner

LEVELS = 5
ALIGN = 1 << (LEVELS - 1)  # canvas sides and band rows: multiples of 16 full-res pixels
BAND = 32  # band height at full resolution
MIN_ROWS = 16  # coarse levels merge bands until a band has at least this many rows
FILLS = ("empty", "zero")

Band = tuple[int, int, int, int]  # rows [r0, r1), columns [c0, c1) of one level
_ALL = slice(None)


@dataclass
class BandPlan:
    """The region of every level as bands (level pixel coordinates)."""

    size: tuple[int, int]  # canvas (H, W), a multiple of 16
    bands: list[list[Band]]  # per level
    full_fill: list[bool]  # per level: whether the coarser level's pooling reads beyond the region
    merged: list[bool]  # per level: bands merged (a band may hold pixels outside level 0's region)

    def level_size(self, level: int) -> tuple[int, int]:
        return self.size[0] >> level, self.size[1] >> level

    def mask(self, level: int) -> torch.Tensor:
        """(h, w) bool mask of the level's region (for tests and references)."""
        m = torch.zeros(self.level_size(level), dtype=torch.bool)
        for r0, r1, c0, c1 in self.bands[level]:
            m[r0:r1, c0:c1] = True
        return m

    def input_mask(self, level: int, band: Band) -> torch.Tensor | None:
        """(rows, cols) bool: the pixels of a band that lie in level 0's region (the
        inputs the network sees); None when that is the whole band."""
        if not self.merged[level]:
            return None
        r0, r1, c0, c1 = band
        m = torch.zeros(r1 - r0, c1 - c0, dtype=torch.bool)
        for a0, a1, b0, b1 in self.bands[0]:
            lo, hi = max(a0 >> level, r0), min(a1 >> level, r1)
            left, right = max(b0 >> level, c0), min(-(-b1 >> level), c1)
            if hi > lo and right > left:
                m[lo - r0 : hi - r0, left - c0 : right - c0] = True
        return None if bool(m.all()) else m

    def pixels(self, level: int = 0) -> int:
        return sum((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in self.bands[level])


def can_plan(size: tuple[int, int]) -> bool:
    h, w = size
    return h % ALIGN == 0 and w % ALIGN == 0 and h >= ALIGN and w >= ALIGN


def plan_bands(size: tuple[int, int], need: tuple[np.ndarray, np.ndarray], band: int = BAND,
               min_rows: int = MIN_ROWS) -> BandPlan:
    """Bands covering ``need`` (per-row column spans ``(lo, hi)`` on the full-resolution
    canvas ``size``): rows in blocks of ``band`` (a multiple of 16, so every level has
    whole rows), columns the block's span, rounded outwards at the coarser levels; level l
    merges ``g_l`` consecutive blocks so that a band has >= ``min_rows`` rows."""
    if not can_plan(size):
        raise ValueError(f"bounded refiner needs a canvas that is a multiple of {ALIGN}, got {size}")
    if band < ALIGN or band % ALIGN:
        raise ValueError(f"band must be a multiple of {ALIGN}, got {band}")
    h, w = size
    lo, hi = (np.asarray(a, dtype=np.int64) for a in need)
    blocks = -(-h // band)
    spans: list[tuple[int, int] | None] = []
    for k in range(blocks):
        rl, rh = lo[k * band : (k + 1) * band], hi[k * band : (k + 1) * band]
        ok = rh > rl
        if not ok.any():
            spans.append(None)
            continue
        c0, c1 = max(0, int(rl[ok].min())), min(w, int(rh[ok].max()))
        spans.append((c0, c1) if c1 > c0 else None)
    groups = [max(1, min_rows // max(1, band >> level)) for level in range(LEVELS)]
    bands: list[list[Band]] = []
    for level in range(LEVELS):
        g = groups[level]
        out: list[Band] = []
        for start in range(0, blocks, g):
            members = [s for s in spans[start : start + g] if s is not None]
            if not members:
                continue
            r0, r1 = start * band, min(h, (start + g) * band)
            # Columns rounded outwards at each level (floor / ceil of the full-res span).
            c0, c1 = min(s[0] for s in members) >> level, -(-max(s[1] for s in members) >> level)
            out.append((r0 >> level, r1 >> level, c0, c1))
        bands.append(out)
    full_fill = [level < LEVELS - 1 and groups[level + 1] != groups[level] for level in range(LEVELS)]
    return BandPlan((h, w), bands, full_fill, [g > 1 for g in groups])


# --------------------------------------------------------------- fill values
def empty_response(refiner: Refiner, dtype: torch.dtype = torch.float32, background: bool = False,
                   device: torch.device | str = "cpu") -> dict[str, list[torch.Tensor]]:
    """Per level the refiner's tensors where every input is zero in a wide neighbourhood
    (constant per channel): ``skip`` E_l, ``pooled`` P_l, ``up`` U_l, ``decoder`` D_l.
    ``background``: the background projections' biases are added (a render with a
    background raster of zeros)."""

    def run(block, c: torch.Tensor) -> torch.Tensor:
        x = c.view(1, -1, 1, 1).expand(1, c.numel(), 3, 3).contiguous()
        return block.forward_unpadded(x).reshape(-1)

    zero_in = torch.zeros(refiner.in_channels, device=device, dtype=dtype)
    skip = [run(refiner.first, zero_in)]
    pooled = [torch.zeros(0, device=device, dtype=dtype)]
    for level, block in enumerate(refiner.down, start=1):
        pooled.append(skip[-1])
        e = torch.cat([run(block, pooled[-1]), zero_in])
        if background and refiner.background_channels and level in BACKGROUND_LEVELS:
            e = e + refiner.background_proj[BACKGROUND_LEVELS.index(level)].bias.to(dtype)
        skip.append(e)
    decoder: list[torch.Tensor] = [torch.zeros(0)] * LEVELS
    up: list[torch.Tensor] = [torch.zeros(0)] * (LEVELS - 1)
    decoder[LEVELS - 1] = run(refiner.center, skip[LEVELS - 1])
    for level in range(LEVELS - 2, -1, -1):
        up[level] = decoder[level + 1]
        decoder[level] = run(refiner.up[LEVELS - 2 - level], torch.cat([up[level], skip[level]]))
    return {"skip": skip, "pooled": pooled, "up": up, "decoder": decoder}


# ----------------------------------------------------------------- execution
class _Level:
    """NHWC buffers of one level with a one-pixel frame (pixel (0, 0) at [1, 1])."""

    def __init__(self, plan: BandPlan, level: int, device: torch.device, dtype: torch.dtype):
        self.plan, self.level, self.device, self.dtype = plan, level, device, dtype
        self.h, self.w = plan.level_size(level)
        self.bands = plan.bands[level]
        self._ring: torch.Tensor | None = None

    def ring(self) -> torch.Tensor:
        """Flat indices into the framed (h + 2, w + 2) buffer of the pixels outside the
        bands that a 3x3 window of a band pixel reads (the one-pixel ring)."""
        if self._ring is None:
            wb = self.w + 2
            bands, parts = self.bands, []
            for k, (r0, r1, c0, c1) in enumerate(bands):
                rows = np.arange(r0 + 1, r1 + 1)
                parts += [rows * wb + c0, rows * wb + c1 + 1]  # left and right columns
                for row, other in ((r0 - 1, k - 1), (r1, k + 1)):
                    # The row above / below: what the neighbouring band does not cover.
                    n = bands[other] if 0 <= other < len(bands) else None
                    base = (row + 1) * wb
                    if n is not None and n[0] <= row < n[1]:
                        parts.append(base + np.arange(c0, min(n[2], c1 + 1) + 1))
                        parts.append(base + np.arange(max(n[3], c0 - 1) + 1, c1 + 2))
                    else:
                        parts.append(base + np.arange(c0, c1 + 2))
            flat = np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)
            self._ring = torch.from_numpy(flat.astype(np.int64)).to(self.device)
        return self._ring

    def new(self, channels: int, fill: torch.Tensor | None, full: bool = False) -> torch.Tensor:
        """A buffer holding ``fill`` (per channel; None: zero) wherever a layer may read
        outside the region: the one-pixel ring around the bands, or everywhere (``full``)."""
        buf = torch.empty(self.h + 2, self.w + 2, channels, device=self.device, dtype=self.dtype)
        if full:
            buf[:] = 0.0 if fill is None else fill.to(self.dtype)
        elif fill is None:
            buf.view(-1, channels).index_fill_(0, self.ring(), 0.0)
        else:
            buf.view(-1, channels)[self.ring()] = fill.to(self.dtype)
        return buf

    @staticmethod
    def window(buf: torch.Tensor, band: Band, halo: int = 1, channels: slice = _ALL) -> torch.Tensor:
        r0, r1, c0, c1 = band
        x = buf[r0 + 1 - halo : r1 + 1 + halo, c0 + 1 - halo : c1 + 1 + halo, channels].permute(2, 0, 1)[None]
        # A compact channels-last copy: oneDNN's native layout (a strided view would run
        # the convolution through NCHW reorders).
        return x.contiguous(memory_format=torch.channels_last)

    @staticmethod
    def put(buf: torch.Tensor, band: Band, values: torch.Tensor, channels: slice = _ALL) -> None:
        r0, r1, c0, c1 = band
        buf[r0 + 1 : r1 + 1, c0 + 1 : c1 + 1, channels] = values[0].permute(1, 2, 0).to(buf.dtype)


def refine_bands(
    refiner: Refiner,
    plan: BandPlan,
    raster_band: Callable[[int, Band], torch.Tensor],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    background_band: Callable[[int, Band], torch.Tensor] | None = None,
    fill: str = "empty",
) -> torch.Tensor:
    """The refiner's output (C_out, H, W) on the plan's canvas with every tensor computed
    on the plan's region and ``fill`` outside it (zero output outside the region).
    ``raster_band(level, band)`` returns the level's raster (C_in, rows, cols) on a band;
    ``background_band`` the background raster at the levels :data:`BACKGROUND_LEVELS`
    (None: no background, as the dense refiner called without one)."""
    if torch.is_grad_enabled():
        raise RuntimeError("refine_bands is an inference path: call it under torch.inference_mode()")
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {FILLS}, got {fill!r}")
    use_bg = background_band is not None and refiner.background_channels > 0
    const = empty_response(refiner, dtype, use_bg, device) if fill == "empty" else None

    def c(name: str, level: int) -> torch.Tensor | None:
        return None if const is None else const[name][level]

    levels = [_Level(plan, level, device, dtype) for level in range(LEVELS)]
    c_in = refiner.in_channels
    ups = [DECODER_CHANNELS[LEVELS - 3 - level] if level < LEVELS - 2 else LEVEL_CHANNELS[-1]
           for level in range(LEVELS - 1)]  # U_l channels: D_{l+1}'s output
    # Decoder inputs [U_l, E_l] share one buffer per level (no concatenation of windows).
    dec_in: list[torch.Tensor] = []
    for level in range(LEVELS - 1):
        fills = None if const is None else torch.cat([const["up"][level], const["skip"][level]])
        dec_in.append(levels[level].new(ups[level] + LEVEL_CHANNELS[level], fills, plan.full_fill[level]))
    e_last = levels[-1].new(LEVEL_CHANNELS[-1], c("skip", LEVELS - 1))

    def skip_buf(level: int) -> tuple[torch.Tensor, slice]:
        if level == LEVELS - 1:
            return e_last, slice(None)
        return dec_in[level], slice(ups[level], None)

    # Encoder.
    lv = levels[0]
    r0 = lv.new(c_in, None)
    for band in lv.bands:
        lv.put(r0, band, raster_band(0, band).to(dtype)[None])
    buf, ch = skip_buf(0)
    for band in lv.bands:
        lv.put(buf, band, refiner.first.forward_unpadded(lv.window(r0, band)), ch)
    del r0
    for level, block in enumerate(refiner.down, start=1):
        lv = levels[level]
        fine, fine_ch = skip_buf(level - 1)
        pooled = lv.new(LEVEL_CHANNELS[level - 1], c("pooled", level))
        for band in lv.bands:
            r0_, r1_, c0_, c1_ = band
            window = _Level.window(fine, (2 * r0_, 2 * r1_, 2 * c0_, 2 * c1_), 0, fine_ch)
            lv.put(pooled, band, F.avg_pool2d(window, 2))
        buf, ch = skip_buf(level)
        for band in lv.bands:
            raster = raster_band(level, band).to(dtype)
            keep = plan.input_mask(level, band)
            if keep is not None:  # merged bands: the inputs beyond level 0's region stay zero
                raster = raster * keep.to(device, dtype)
            out = torch.cat([block.forward_unpadded(lv.window(pooled, band)), raster[None]], 1)
            if use_bg and level in BACKGROUND_LEVELS:
                proj = refiner.background_proj[BACKGROUND_LEVELS.index(level)]
                bg = background_band(level, band).to(dtype)[None]  # type: ignore[misc]
                out = out + F.conv2d(bg, proj.weight.to(dtype), proj.bias.to(dtype))
            lv.put(buf, band, out, ch)
        del pooled
    # Centre and decoder.
    last = LEVELS - 1
    lv = levels[last]
    x = lv.new(refiner.center.feature.out_channels, c("decoder", last))
    for band in lv.bands:
        lv.put(x, band, refiner.center.forward_unpadded(lv.window(e_last, band)))
    for level in range(last - 1, -1, -1):
        lv = levels[level]
        buf = dec_in[level]
        for band in lv.bands:
            r0_, r1_, c0_, c1_ = band
            # Coarse pixels [a, b) with a one-pixel halo; fine pixel j of the 2x upsampled
            # window is global pixel 2 * a + j (bilinear, align_corners=False).
            ra, rb, ca, cb = r0_ // 2 - 1, -(-r1_ // 2) + 1, c0_ // 2 - 1, -(-c1_ // 2) + 1
            coarse = _Level.window(x, (ra + 1, rb - 1, ca + 1, cb - 1), 1)
            fine = F.interpolate(coarse, size=(2 * (rb - ra), 2 * (cb - ca)), mode="bilinear", align_corners=False)
            crop = fine[:, :, r0_ - 2 * ra : r1_ - 2 * ra, c0_ - 2 * ca : c1_ - 2 * ca]
            lv.put(buf, band, crop, slice(0, ups[level]))
        block = refiner.up[last - 1 - level]
        x = lv.new(block.feature.out_channels, c("decoder", level))
        for band in lv.bands:
            lv.put(x, band, block.forward_unpadded(lv.window(buf, band)))
        dec_in[level] = buf = None  # type: ignore[assignment]  # free memory early
    # Head (1x1) on the region only, into a zero canvas.
    lv = levels[0]
    head = refiner.head
    out = torch.zeros(lv.h + 2, lv.w + 2, refiner.out_channels, device=device, dtype=dtype)
    for band in lv.bands:
        lv.put(out, band, F.conv2d(lv.window(x, band, 0), head.weight.to(dtype), head.bias.to(dtype)))
    return out[1:-1, 1:-1].permute(2, 0, 1)


__all__ = ["BAND", "FILLS", "MIN_ROWS", "BandPlan", "can_plan", "empty_response", "plan_bands", "refine_bands"]
