"""The fast inference paths compute what the reference (training) paths compute: the
refiner's channels-last path, the one-table raster gather, the multiply-sum
descriptors, the bounding-box render canvas (roll invariance at any angle, exact
quarter turns), the preview resolution and the allocator settings."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from npbgpp_core.camera import Camera
from npbgpp_core.models import NPBG, NPBGPlusPlus, NPBGPlusPlusConfig, Refiner
from npbgpp_core.models.aggregator import AggregatedScene, descriptors_from_coefficients
from npbgpp_core.models.alignment import alignment_angle, render_canvas_camera
from npbgpp_core.rasterizer import DEFAULT_SCALES, rasterize_descriptors, rasterize_features


def random_scene(n: int = 3000, seed: int = 0) -> AggregatedScene:
    """Points on a unit sphere with random [ym; beta] coefficients (strong contrast)."""
    g = torch.Generator().manual_seed(seed)
    pts = torch.randn(n, 3, generator=g)
    pts = pts / pts.norm(dim=1, keepdim=True)
    coefficients = torch.randn(n, 7, 8, generator=g)
    valid = torch.rand(n, generator=g) > 0.1
    return AggregatedScene(pts, coefficients, valid)


def seeded_model(**cfg) -> NPBGPlusPlus:
    torch.manual_seed(0)
    return NPBGPlusPlus(NPBGPlusPlusConfig(**cfg)).eval()


def target_camera(size=(40, 52), roll: float = 0.0) -> Camera:
    cam = Camera.look_at((2.0, 0.8, -2.0), (0, 0, 0), fov_x_deg=50, image_size=size)
    return cam.rotated_in_plane(roll) if roll else cam


# ------------------------------------------------------------------------- refiner
@pytest.mark.parametrize("out_channels", [3, 4])
def test_refiner_inference_path_equals_reference(out_channels):
    torch.manual_seed(1)
    refiner = Refiner(9, out_channels)
    H, W = 71, 38  # odd sizes: interpolation between levels, replicate pad at 1-pixel levels
    rasters = [torch.randn(2, 9, int(s * H), int(s * W)) for s in DEFAULT_SCALES]
    ref = refiner.forward_reference(rasters)
    with torch.inference_mode():
        fast = refiner(rasters)
        # permuted (channels-last strided) inputs, as rasterize_descriptors returns them
        permuted = refiner([r.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2) for r in rasters])
    assert fast.shape == ref.shape == (2, out_channels, H, W)
    assert fast.is_contiguous()
    torch.testing.assert_close(fast, ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(permuted, ref, atol=2e-5, rtol=1e-5)
    assert (ref - ref.mean()).abs().max() > 1e-2  # not a constant image


def test_refiner_uses_reference_path_with_autograd():
    refiner = Refiner()
    rasters = [torch.randn(1, 9, int(s * 32), int(s * 32)) for s in DEFAULT_SCALES]
    out = refiner(rasters)
    assert out.requires_grad
    out.sum().backward()
    assert refiner.first.feature.weight.grad is not None


# -------------------------------------------------------------- descriptors/gather
def test_inference_descriptors_equal_einsum():
    g = torch.Generator().manual_seed(0)
    coefficients = torch.randn(500, 7, 8, generator=g)
    x = torch.randn(500, 6, generator=g)
    ref = coefficients[:, 0] + torch.einsum("nk,nkc->nc", x, coefficients[:, 1:])
    with torch.no_grad():
        fast = descriptors_from_coefficients(coefficients, x)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


def test_rasterize_descriptors_inference_layout_matches_reference():
    scene = random_scene()
    cam = target_camera()
    bg = torch.randn(8)
    ref = rasterize_features(scene.points, scene.coefficients[:, 0], cam, DEFAULT_SCALES, bg)
    with torch.inference_mode():
        got = rasterize_descriptors(
            scene.points, cam, DEFAULT_SCALES, 1e-3, lambda rows: scene.coefficients[rows, 0], bg
        )
    for g, r in zip(got, ref, strict=True):
        assert torch.equal(g, r)
        assert g.stride(0) == 1  # channels innermost: the CPU refiner reads it without a copy


# ----------------------------------------------------------------- whole renders
@pytest.mark.parametrize("canvas", ["bounds", "square"])
def test_inference_render_equals_autograd_render(canvas):
    """render() (inference fast paths) equals render_raw() with autograd on (reference
    paths), for all valid points and for a partly valid cloud."""
    model = seeded_model(render_canvas=canvas)
    for scene in (random_scene(), AggregatedScene(random_scene().points, random_scene().coefficients,
                                                  torch.ones(3000, dtype=torch.bool))):
        cam = target_camera(roll=0.4)
        with torch.enable_grad():
            ref = model.render_raw(scene, cam).detach().clamp(0, 1)
        fast = model.render(scene, cam)
        torch.testing.assert_close(fast, ref, atol=3e-5, rtol=0)


def test_npbg_inference_render_equals_autograd_render():
    """NPBG (learnable background, partly active cloud): same check as above."""
    scene = random_scene()
    torch.manual_seed(0)
    model = NPBG(len(scene)).eval()
    with torch.no_grad():
        model.descriptors.normal_()
        model.background.normal_()
        model.active.copy_(scene.valid)
    cam = target_camera(roll=0.4)
    ref = model.render_raw(scene.points, cam).detach().clamp(0, 1)
    torch.testing.assert_close(model.render(scene.points, cam), ref, atol=3e-5, rtol=0)


@pytest.mark.parametrize("angle", [0.0, 0.3, -2.0, 2.9])
def test_bounds_canvas_is_roll_invariant_at_any_angle(angle):
    model = seeded_model()
    scene = random_scene()
    size = (30, 44)
    a = model.render(scene, target_camera(size, angle))
    rolled = target_camera(size, angle).rotated_in_plane(math.pi / 2, (size[1], size[0]))
    b = model.render(scene, rolled)
    torch.testing.assert_close(b, torch.rot90(a, k=-1, dims=(1, 2)), atol=2e-4, rtol=0)
    assert (a - a.mean()).abs().max() > 1e-2


def test_bounds_canvas_at_right_angles_is_the_target_size_and_exact():
    """A roll by a multiple of 90 degrees renders an H x W (or W x H) canvas and turns it
    with an exact rot90: same image as rendering the aligned camera directly."""
    model = seeded_model()
    scene = random_scene()
    base = target_camera((30, 44))  # look_at with +Y up: alignment angle 0
    for quarter in range(4):
        size = (30, 44) if quarter % 2 == 0 else (44, 30)
        cam = base.rotated_in_plane(quarter * math.pi / 2, size)
        canvas, k = render_canvas_camera(cam)
        assert k is not None and canvas.image_size == (30, 44)
        got = model.render(scene, cam)
        direct = seeded_model(align_during_rendering=False).render(scene, canvas)
        torch.testing.assert_close(got, torch.rot90(direct, k, dims=(1, 2)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("size", [(30, 44), (61, 17)])
def test_bounds_canvas_covers_the_target_image(size):
    """Every target pixel (corners included, any principal point) lands inside the
    canvas with a margin for bilinear sampling, and the canvas is aligned."""
    rng = np.random.default_rng(0)
    # random rolls, and a quarter turn (not snapped: the pixels are not square)
    for roll in [*rng.uniform(-4, 4, 12), math.pi / 2]:
        K = np.array([[40.0, 0, rng.uniform(0, size[1])], [0, 45.0, rng.uniform(0, size[0])], [0, 0, 1]])
        cam = Camera.from_opencv(K, np.eye(3), np.array([0.0, 0.0, 3.0]), size).rotated_in_plane(roll)
        canvas, k = render_canvas_camera(cam)
        assert abs(alignment_angle(canvas)) < 1e-6
        h, w = size
        corners = torch.tensor(
            [[-0.5, -0.5], [w - 0.5, -0.5], [-0.5, h - 0.5], [w - 0.5, h - 0.5]], dtype=torch.float64
        )
        world = cam.unproject_pixels(corners, torch.full((4,), 2.0, dtype=torch.float64))
        uv, _ = canvas.project(world)
        ch, cw = canvas.image_size
        assert k is None
        assert (uv[:, 0] >= -0.5 + 0.99).all() and (uv[:, 0] <= cw - 0.5 - 0.99).all()
        assert (uv[:, 1] >= -0.5 + 0.99).all() and (uv[:, 1] <= ch - 0.5 - 0.99).all()
        assert ch % 16 == 0 and cw % 16 == 0
        assert ch * cw <= (math.ceil(math.hypot(h, w)) + 2 + 15) ** 2


def test_render_canvas_option_is_checked():
    with pytest.raises(ValueError, match="render_canvas"):
        NPBGPlusPlusConfig(render_canvas="circle")
    assert NPBGPlusPlusConfig.from_dict(NPBGPlusPlusConfig(render_canvas="square").to_dict()).render_canvas == "square"


# ------------------------------------------------------------------------ preview
def test_preview_resolution():
    model = seeded_model()
    scene = random_scene()
    cam = target_camera((40, 52))
    full = model.render(scene, cam)
    assert torch.equal(model.render(scene, cam, resolution_scale=1.0), full)
    half = model.render(scene, cam, resolution_scale=0.5)
    assert half.shape == full.shape and half.min() >= 0 and half.max() <= 1
    with torch.no_grad():
        small = model.render_raw(scene, cam.scaled(0.5))
    assert small.shape == (3, 20, 26)
    # the half-resolution render, upsampled with pixel areas aligned, then clamped
    expected = torch.nn.functional.interpolate(small[None], size=(40, 52), mode="bilinear", align_corners=False)
    torch.testing.assert_close(half, expected[0].clamp(0, 1), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="resolution_scale"):
        model.render(scene, cam, resolution_scale=0.0)
    npbg = NPBG(len(scene))
    assert npbg.render(scene.points, cam, resolution_scale=0.5).shape == (3, 40, 52)


def test_scene_renderer_quality_presets():
    from npbgpp_core.scene import NeuralScene, quality_scale

    model = seeded_model()
    scene = random_scene()
    bundle = NeuralScene.from_aggregated(model, scene)
    renderer = bundle.renderer()
    cam = target_camera((40, 52))
    torch.testing.assert_close(renderer.render(cam, quality="preview"), model.render(scene, cam, resolution_scale=0.5))
    assert torch.equal(renderer.render(cam), model.render(scene, cam))
    assert quality_scale("full") == 1.0 and quality_scale(0.25) == 0.25
    with pytest.raises(ValueError, match="quality"):
        renderer.render(cam, quality="draft")
    with pytest.raises(ValueError, match="quality"):
        quality_scale(1.5)


def test_allocator_tuning_is_idempotent_and_harmless():
    import sys

    from npbgpp_core.models.allocator import tune_cpu_allocator

    first = tune_cpu_allocator()
    assert tune_cpu_allocator() == first
    if sys.platform.startswith("linux"):
        assert first  # glibc (the CI images) accepts the settings
    x = torch.randn(2000, 2000)
    assert torch.equal(x @ torch.eye(2000), x)
