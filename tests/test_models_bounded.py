"""Bounded-context rendering of rolled views (npbgpp_core.models.bounded): the band
executor computes a defined function (every refiner tensor computed on the region, a
fixed value outside it), checked against a dense brute force of that definition; the
margin really bounds what a render depends on; roll 0 and the exact mode are unchanged."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from npbgpp_core.camera import Camera
from npbgpp_core.models import NPBGPlusPlus, NPBGPlusPlusConfig, Refiner, bounded, tiles
from npbgpp_core.models.aggregator import AggregatedScene
from npbgpp_core.models.alignment import _pixel_map, render_canvas_camera


def rolled_camera(size: tuple[int, int], roll: float) -> Camera:
    cam = Camera.look_at((2.0, 0.8, -2.0), (0, 0, 0), fov_x_deg=50, image_size=size)
    return cam.rotated_in_plane(roll)


def random_scene(n: int = 20000, seed: int = 0) -> AggregatedScene:
    g = torch.Generator().manual_seed(seed)
    pts = torch.randn(n, 3, generator=g)
    pts = pts / pts.norm(dim=1, keepdim=True)
    return AggregatedScene(pts, torch.randn(n, 7, 8, generator=g), torch.rand(n, generator=g) > 0.1)


def trained_background(refiner: Refiner, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # trained (non-zero) background projections
        for proj in refiner.background_proj:
            proj.weight.normal_(0, 0.3, generator=g)
            proj.bias.normal_(0, 0.3, generator=g)


def reference(refiner: Refiner, plan: bounded.BandPlan, rasters: list[torch.Tensor],
              background: list[torch.Tensor] | None, fill: str) -> torch.Tensor:
    """The definition, densely on the whole canvas: each tensor computed everywhere from
    inputs that hold the fill value outside the region (and beyond the canvas border),
    then replaced by the fill value outside the region."""
    const = bounded.empty_response(refiner, background=background is not None)
    if fill == "zero":
        const = {k: [torch.zeros_like(c) for c in v] for k, v in const.items()}
    masks = [plan.mask(level)[None, None] for level in range(5)]

    def keep(x, level, c):
        return torch.where(masks[level], x, c.view(1, -1, 1, 1))

    def pad(x, c):
        c = c.view(1, -1, 1, 1)
        return F.pad(x - c, (1, 1, 1, 1)) + c

    zero = torch.zeros(refiner.in_channels)
    # Inputs only within level 0's region (coarse levels compute on merged, larger bands).
    seen = [F.max_pool2d(masks[0].float(), 1 << level)[0, 0] > 0 for level in range(5)]
    r = [torch.where(seen[level], rasters[level], 0.0) for level in range(5)]
    skips = [keep(refiner.first.forward_unpadded(pad(r[0], zero)), 0, const["skip"][0])]
    for level, block in enumerate(refiner.down, start=1):
        p = keep(F.avg_pool2d(skips[-1], 2), level, const["pooled"][level])
        e = torch.cat([block.forward_unpadded(pad(p, const["pooled"][level])), r[level]], 1)
        if background is not None and level >= 2:
            e = e + refiner.background_proj[level - 2](background[level - 2])
        skips.append(keep(e, level, const["skip"][level]))
    x = keep(refiner.center.forward_unpadded(pad(skips[4], const["skip"][4])), 4, const["decoder"][4])
    for level in range(3, -1, -1):
        h, w = skips[level].shape[-2:]
        up = F.interpolate(pad(x, const["decoder"][level + 1]), size=(h + 4, w + 4), mode="bilinear",
                           align_corners=False)[:, :, 2:-2, 2:-2]
        up = keep(up, level, const["up"][level])
        both = torch.cat([up, skips[level]], 1)
        c_both = torch.cat([const["up"][level], const["skip"][level]])
        x = keep(refiner.up[3 - level].forward_unpadded(pad(both, c_both)), level, const["decoder"][level])
    return keep(refiner.head(x), 0, torch.zeros(refiner.out_channels))[0]


@pytest.mark.parametrize(("roll", "fill", "background", "band"),
                         [(math.pi / 4, "empty", 0, 32), (0.3, "zero", 0, 16), (2.2, "empty", 9, 32),
                          (-1.0, "empty", 0, 48)])
def test_band_refiner_equals_the_dense_definition(roll, fill, background, band):
    torch.manual_seed(0)
    refiner = Refiner(9, 3, background_channels=background).eval()
    if background:
        trained_background(refiner)
    cam = rolled_camera((160, 224), roll)
    canvas, _ = render_canvas_camera(cam)
    size = canvas.image_size
    need = tiles.needed_spans(tiles.target_corners(_pixel_map(canvas, cam), cam.image_size), size, margin=9)
    plan = bounded.plan_bands(size, need, band=band)
    h, w = size
    g = torch.Generator().manual_seed(1)
    rasters = [torch.randn(1, 9, h >> lv, w >> lv, generator=g) for lv in range(5)]
    bgs = [torch.randn(1, 9, h >> lv, w >> lv, generator=g) for lv in (2, 3, 4)] if background else None

    def raster_band(level, b):
        return rasters[level][0, :, b[0] : b[1], b[2] : b[3]]

    def background_band(level, b):
        return bgs[level - 2][0, :, b[0] : b[1], b[2] : b[3]]

    with torch.inference_mode():
        got = bounded.refine_bands(refiner, plan, raster_band, torch.device("cpu"),
                                   background_band=background_band if background else None, fill=fill)
        want = reference(refiner, plan, rasters, bgs, fill)
    torch.testing.assert_close(got, want, atol=3e-5, rtol=1e-5)
    # The region holds the target and leaves much of a rolled canvas out.
    assert plan.mask(0)[need[0] < need[1]].any()
    assert plan.pixels(0) < 0.9 * h * w


def test_empty_response_is_what_the_dense_refiner_computes_on_nothing():
    torch.manual_seed(0)
    refiner = Refiner(9, 3, background_channels=9).eval()
    trained_background(refiner)
    const = bounded.empty_response(refiner, background=True)
    with torch.inference_mode():
        out = refiner([torch.zeros(1, 9, 64 >> lv, 64 >> lv) for lv in range(5)],
                      [torch.zeros(1, 9, 64 >> lv, 64 >> lv) for lv in (2, 3, 4)])[0]
    want = refiner.head.weight[:, :, 0, 0] @ const["decoder"][0] + refiner.head.bias
    torch.testing.assert_close(out, want.view(3, 1, 1).expand_as(out), atol=1e-5, rtol=1e-5)


def test_plan_covers_the_need_and_merges_coarse_bands():
    need = tiles.needed_spans(np.array([[40.0, 5.0], [150.0, 60.0], [110.0, 170.0], [0.0, 115.0]]), (192, 192))
    plan = bounded.plan_bands((192, 192), need, band=32, min_rows=16)
    mask = plan.mask(0)
    for r, (lo, hi) in enumerate(zip(*need, strict=True)):
        if hi > lo:
            assert mask[r, lo:hi].all()
    assert [len(b) for b in plan.bands] == [6, 6, 3, 2, 1]  # 32-row bands, then >= 16 rows per level
    for level in range(1, 5):  # each level's region holds the one below, pooled
        fine = plan.mask(level - 1).float()[None, None]
        assert (plan.mask(level) | (F.avg_pool2d(fine, 2)[0, 0] == 0)).all()
    with pytest.raises(ValueError, match="multiple of 16"):
        bounded.plan_bands((40, 40), need)
    with pytest.raises(ValueError, match="band"):
        bounded.plan_bands((192, 192), need, band=24)


def bounded_model(background: str = "none") -> NPBGPlusPlus:
    torch.manual_seed(0)
    model = NPBGPlusPlus(NPBGPlusPlusConfig(background=background, background_rows=8)).eval()
    if background == "environment":
        trained_background(model.refiner, 5)
    with torch.no_grad():  # larger weights: an initialised refiner's output barely varies
        for name, p in model.refiner.named_parameters():
            if name.endswith("weight"):
                p.mul_(2)
    return model


@pytest.mark.parametrize("roll", [0.0, math.pi / 2, math.pi])
def test_bounded_mode_is_bit_identical_at_roll_zero_and_right_angles(roll):
    model = bounded_model()
    scene = random_scene()
    cam = rolled_camera((96, 160), 0.0)
    cam = cam.rotated_in_plane(roll) if roll else cam
    exact = model.render(scene, cam)
    model.roll_context = "bounded"
    assert torch.equal(model.render(scene, cam), exact)


@pytest.mark.parametrize(("roll", "background"), [(math.pi / 4, "none"), (0.4, "environment")])
def test_bounded_render_is_close_inside_and_bounded_by_the_margin(roll, background):
    model = bounded_model(background)
    scene = random_scene(60000)
    scene.points = (torch.rand(60000, 3, generator=torch.Generator().manual_seed(2)) - 0.5) * 4  # fills the canvas
    if background == "environment":
        scene.background = torch.randn(9, 8, 16, generator=torch.Generator().manual_seed(5))
    cam = rolled_camera((128, 192), roll)
    exact = model.render(scene, cam)
    model.roll_context, model.roll_margin = "bounded", 16
    approx = model.render(scene, cam)
    # Inside the view the bounded network nearly computes what the exact one does; near
    # the border it is an approximation.
    diff = (approx - exact).abs()
    assert float(diff[:, 48:80, 80:112].max()) < 1e-4 < float(diff.max())
    assert float(exact.std()) > 0.1

    # Points that project outside the view + margin (+ one band and 16-pixel rounding)
    # change nothing; they do change the exact render.
    canvas, _ = render_canvas_camera(cam, "bounds", model.config.world_up)
    uv, depth = cam.project(scene.points)
    h, w = cam.image_size
    reach = 16 + 32 + 16 + 2
    outside = (((uv[:, 0] < -reach) | (uv[:, 0] > w + reach) | (uv[:, 1] < -reach) | (uv[:, 1] > h + reach))
               & (depth > 0))
    uv_c, _ = canvas.project(scene.points)
    on_canvas = ((uv_c[:, 0] >= 0) & (uv_c[:, 0] < canvas.image_size[1]) & (uv_c[:, 1] >= 0)
                 & (uv_c[:, 1] < canvas.image_size[0]))
    moved = outside & on_canvas
    assert int(moved.sum()) > 100  # the rolled canvas' corners hold such points
    changed = AggregatedScene(scene.points, scene.coefficients.clone(), scene.valid, background=scene.background)
    changed.coefficients[moved] = torch.randn(int(moved.sum()), 7, 8) * 3
    assert torch.equal(model.render(changed, cam), approx)
    model.roll_context = "exact"
    assert (model.render(changed, cam) - exact).abs().max() > 1e-6


def test_roll_context_is_checked():
    model = bounded_model()
    model.roll_context = "nearby"
    with pytest.raises(ValueError, match="roll_context"):
        model.render(random_scene(100), rolled_camera((32, 48), 0.3))
    model.roll_context, model.roll_margin = "bounded", -3
    with pytest.raises(ValueError, match="roll_margin"):
        model.render(random_scene(100), rolled_camera((32, 48), 0.3))


def test_render_frame_asks_the_service_for_either_context(tmp_path):
    """RenderFrame.roll_context reaches the network: 'bounded' equals the model's bounded
    render, 'exact' (the default) the exact one, and a bad value is a Failure naming it."""
    from npbgpp_core import protocol as P
    from npbgpp_core.scene import NeuralScene
    from npbgpp_core.service import RenderService

    model = bounded_model()
    scene = random_scene(20000)
    path = str(tmp_path / "s.npbgpp")
    NeuralScene(scene.points, None, "npbgpp", scene.coefficients, scene.valid, model.config.to_dict(),
                model.state_dict()).save(path)
    service = RenderService()
    assert isinstance(service.handle(P.LoadBundle(path, device="CPU")), P.BundleInfo)
    cam = rolled_camera((64, 96), 0.6)
    spec = P.CameraSpec.from_camera(cam)
    frames = {ctx: service.handle(P.RenderFrame(spec, source="bundle", neural=True, roll_context=ctx))
              for ctx in ("exact", "bounded")}
    for ctx, frame in frames.items():
        assert isinstance(frame, P.Frame), frame
        model.roll_context = ctx
        want = model.render(scene, spec.to_camera()).permute(1, 2, 0).numpy()
        np.testing.assert_allclose(frame.pixels[..., P.NEURAL], want, atol=1e-5)
    assert np.abs(frames["exact"].pixels[..., P.NEURAL] - frames["bounded"].pixels[..., P.NEURAL]).max() > 1e-4
    assert torch.equal(torch.from_numpy(frames["exact"].pixels),
                       torch.from_numpy(service.handle(P.RenderFrame(spec, source="bundle", neural=True)).pixels))
    auto = service.handle(P.RenderFrame(spec, source="bundle", neural=True, roll_context="auto"))
    assert np.array_equal(auto.pixels, frames["bounded"].pixels)  # the service runs on the CPU
    bad = service.handle(P.RenderFrame(spec, source="bundle", neural=True, roll_context="nearby"))
    assert isinstance(bad, P.Failure) and "roll_context" in bad.error
