"""The tiled refiner (npbgpp_core.models.tiles) computes what the dense refiner
computes on every pixel a rolled render samples, and reads nothing it did not compute."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from npbgpp_core.camera import Camera
from npbgpp_core.models import NPBGPlusPlus, NPBGPlusPlusConfig, Refiner, tiles
from npbgpp_core.models.aggregator import AggregatedScene
from npbgpp_core.models.alignment import _pixel_map, render_canvas_camera


def rolled_camera(size: tuple[int, int], roll: float) -> Camera:
    cam = Camera.look_at((2.0, 0.8, -2.0), (0, 0, 0), fov_x_deg=50, image_size=size)
    return cam.rotated_in_plane(roll)


def plan_for(cam: Camera, tile: int = tiles.TILE) -> tuple[Camera, tiles.TilePlan, tuple[np.ndarray, np.ndarray]]:
    canvas, quarter = render_canvas_camera(cam)
    assert quarter is None
    need = tiles.needed_spans(tiles.target_corners(_pixel_map(canvas, cam), cam.image_size), canvas.image_size)
    return canvas, tiles.plan_tiles(canvas.image_size, need, tile), need


def span_mask(need: tuple[np.ndarray, np.ndarray], size: tuple[int, int]) -> torch.Tensor:
    mask = torch.zeros(size, dtype=torch.bool)
    for r, (lo, hi) in enumerate(zip(*need, strict=True)):
        if hi > lo:
            mask[r, lo:hi] = True
    return mask


@pytest.mark.parametrize("roll", [0.3, math.pi / 4, -2.0])
def test_needed_spans_hold_every_bilinear_tap_and_skip_the_corners(roll):
    cam = rolled_camera((90, 150), roll)
    canvas, _, need = plan_for(cam)
    mask = span_mask(need, canvas.image_size)
    # Brute force: every target pixel centre mapped into the canvas, its 4 bilinear taps.
    h, w = cam.image_size
    v, u = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    pts = _pixel_map(canvas, cam) @ np.stack([u.ravel(), v.ravel(), np.ones(u.size)])
    x0, y0 = np.floor(pts[0]).astype(int), np.floor(pts[1]).astype(int)
    for dx in (0, 1):
        for dy in (0, 1):
            assert mask[y0 + dy, x0 + dx].all()
    # Not everything: the rolled view leaves canvas corners unread (about half at 45 deg).
    frac = mask.float().mean().item()
    assert frac < (0.8 if abs(roll) > 0.5 else 0.95)
    assert frac > h * w / mask.numel()


@pytest.mark.parametrize(("tile", "out_channels", "background"), [(16, 3, 0), (32, 4, 0), (64, 3, 0), (32, 3, 9)])
def test_tiled_refiner_equals_dense_refiner_on_needed_pixels(tile, out_channels, background):
    torch.manual_seed(0)
    refiner = Refiner(9, out_channels, background_channels=background).eval()
    if background:
        with torch.no_grad():  # trained (non-zero) background projections
            for proj in refiner.background_proj:
                proj.weight.normal_(0, 0.3)
                proj.bias.normal_(0, 0.3)
    # Large enough that even the encoder (whose need grows by the receptive field,
    # about 80 pixels) leaves parts of the canvas out.
    cam = rolled_camera((320, 320), math.pi / 4 + 0.1)
    canvas, plan, need = plan_for(cam, tile)
    h, w = canvas.image_size
    g = torch.Generator().manual_seed(1)
    rasters = [torch.randn(h >> level, w >> level, 9, generator=g) for level in range(tiles.LEVELS)]
    grids = [tiles.pad_to_grid(torch.arange((h >> lv) * (w >> lv)).view(h >> lv, w >> lv), plan, lv, -1).reshape(-1)
             for lv in range(tiles.LEVELS)]

    def raster_tiles(level: int, flat: torch.Tensor) -> torch.Tensor:
        index = grids[level][flat]
        table = torch.cat([rasters[level].reshape(-1, 9), torch.zeros(1, 9)])  # -1 (outside): zeros
        return table[index]

    bgs = {lv: torch.randn(background, h >> lv, w >> lv, generator=g) for lv in (2, 3, 4)} if background else {}

    def background_tiles(level: int, flat: torch.Tensor) -> torch.Tensor:
        padded = tiles.pad_to_grid(bgs[level], plan, level, float("nan"))  # outside the image: never read
        return padded.flatten(1).T[flat]

    with torch.inference_mode():
        dense = refiner([r.permute(2, 0, 1)[None] for r in rasters],
                        [bgs[lv][None] for lv in (2, 3, 4)] if background else None)[0]
        # Strict mode: NaN in every buffer pixel outside each tensor's exact need, so any
        # read of a pixel the plan did not ask for shows in the output.
        tiled = tiles.refine_tiles(refiner, plan, raster_tiles, torch.device("cpu"), poison=float("nan"),
                                   background_tiles=background_tiles if background else None)
    mask = span_mask(need, (h, w))
    assert tiled.shape == dense.shape
    assert not torch.isnan(tiled[:, mask]).any()
    torch.testing.assert_close(tiled[:, mask], dense[:, mask], atol=2e-5, rtol=1e-5)
    assert len(plan.out) < plan.grid[0] * plan.grid[1]  # tiles were skipped
    assert min(float((hi - lo).clip(0).sum()) / ((h >> lv) * (w >> lv))
               for lv, (lo, hi) in enumerate(plan.needs["skip"])) < 0.9  # the encoder's too


def random_scene(n: int = 20000, seed: int = 0) -> AggregatedScene:
    g = torch.Generator().manual_seed(seed)
    pts = torch.randn(n, 3, generator=g)
    pts = pts / pts.norm(dim=1, keepdim=True)
    return AggregatedScene(pts, torch.randn(n, 7, 8, generator=g), torch.rand(n, generator=g) > 0.1)


@pytest.mark.parametrize(("roll", "background"), [(0.05, "none"), (0.7, "none"), (math.pi / 4, "none"),
                                                (2.5, "none"), (0.7, "environment"), (2.5, "environment")])
def test_model_render_tiled_equals_dense_canvas(roll, background):
    torch.manual_seed(0)
    model = NPBGPlusPlus(NPBGPlusPlusConfig(background=background, background_rows=8)).eval()
    scene = random_scene()
    if background == "environment":
        g = torch.Generator().manual_seed(5)
        scene.background = torch.randn(9, 8, 16, generator=g)
        with torch.no_grad():  # trained (non-zero) projections
            for proj in model.refiner.background_proj:
                proj.weight.normal_(0, 0.3, generator=g)
                proj.bias.normal_(0, 0.3, generator=g)
    cam = rolled_camera((96, 160), roll)
    calls = []
    original = tiles.refine_tiles

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    tiles.refine_tiles, fast = spy, None
    try:
        fast = model.render(scene, cam)
    finally:
        tiles.refine_tiles = original
    assert calls, "the tiled path was not taken"
    model.tiled_rendering = False
    dense = model.render(scene, cam)
    torch.testing.assert_close(fast, dense, atol=2e-5, rtol=0)
    assert (dense - dense.mean()).abs().max() > 1e-2
    if background == "environment":  # the map reaches the image
        scene.background = torch.zeros_like(scene.background)
        assert (model.render(scene, cam) - dense).abs().max() > 1e-3


def test_plan_rejects_canvases_and_tiles_it_cannot_split():
    need = tiles.needed_spans(np.array([[1.0, 1.0], [30.0, 1.0], [30.0, 30.0], [1.0, 30.0]]), (40, 40))
    assert not tiles.can_plan((40, 40))
    with pytest.raises(ValueError, match="multiple of 16"):
        tiles.plan_tiles((40, 40), need)
    with pytest.raises(ValueError, match="tile"):
        tiles.plan_tiles((48, 48), need, tile=24)
