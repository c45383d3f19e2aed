"""The short-fit knobs of npbgpp_core.fitting (FitRecipe): learning-rate schedule values
computed by hand, frozen refiner parts that really stay put, the decoupled pull toward the
aggregated coefficients, a separate background rate, crops per step, and the plain recipe
against a hand-written RMSprop + Adam loop; photos of different sizes padded with masks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_background import env_scene, from_weights_file, ring_cameras

from npbgpp_core.fitting import (
    FIT_WARMUP_STEPS,
    FitViews,
    coefficients_ft_loss,
    coefficients_recipe,
    downsized_fit_views,
    fit_coefficients,
    lr_factor,
    padded_fit_views,
    random_crop,
)
from npbgpp_core.losses import gradient_loss, multiscale_l1
from npbgpp_core.models import NPBG


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    model, agg = env_scene()
    model = from_weights_file(model, tmp_path_factory.mktemp("weights"))
    cams = ring_cameras(3, size=(32, 32))
    g = torch.Generator().manual_seed(5)
    return model, agg, FitViews(torch.rand(3, 3, 32, 32, generator=g), cams)


def test_lr_factor_matches_hand_computed_values():
    assert [lr_factor(s, 10) for s in (0, 5, 9)] == [1.0, 1.0, 1.0]
    assert [lr_factor(s, 10, warmup_steps=3) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    # cosine over steps 2..9 after a 2-step warm-up: 0.5 (1 + cos(pi (s - 2) / 8))
    assert lr_factor(0, 10, 2, "cosine") == pytest.approx(1 / 3)
    assert lr_factor(2, 10, 2, "cosine") == pytest.approx(1.0)
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5)
    assert lr_factor(8, 10, 2, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 6 / 8)))
    assert lr_factor(4, 8, 0, "cosine") == pytest.approx(0.5)
    with pytest.raises(ValueError, match="schedule must be one of"):
        lr_factor(0, 10, schedule="linear")


def test_coefficient_fits_ramp_their_rates_over_the_first_20_steps_whatever_their_length():
    import inspect

    assert FIT_WARMUP_STEPS == 20
    assert coefficients_recipe().recipe.warmup_steps == 20
    assert inspect.signature(fit_coefficients).parameters["warmup_steps"].default == 20
    # (step + 1) / 21 for steps 0..19, then 1; a 2-step fit is the start of a 200-step one
    assert [lr_factor(s, 2, 20) for s in range(2)] == pytest.approx([1 / 21, 2 / 21])
    assert [lr_factor(s, 200, 20) for s in (0, 9, 19, 20, 199)] == pytest.approx([1 / 21, 10 / 21, 20 / 21, 1, 1])


def test_default_first_step_moves_each_coefficient_a_21st_of_rmsprops_first_step(scene):
    """RMSprop's first step is lr * g / sqrt(0.01 g^2) = 10 lr per touched value (its mean
    square starts at zero): 0.1 at lr 0.01 without the ramp, 0.1 / 21 with it."""
    model, agg, views = scene
    start = agg.coefficients.reshape(agg.coefficients.shape[0], -1)
    for warmup, size in ((0, 0.1), (None, 0.1 / 21)):
        kw = {} if warmup is None else {"warmup_steps": warmup}
        moved = fit_coefficients(model, agg, views, steps=1, crop=None, **kw).model.descriptors.detach() - start
        assert float(moved.abs().max()) == pytest.approx(size, rel=1e-3)


def rolled_camera(degrees: float, size=(48, 64)):
    from npbgpp_core.camera import Camera

    up = (math.sin(math.radians(degrees)), 0.0, math.cos(math.radians(degrees)))
    return Camera.look_at((0.5, 3, 0.6), (0, 0, 0), up=up, fov_x_deg=60, image_size=size)


def test_zero_step_aligned_fit_renders_as_npbgpp_and_unaligned_in_the_views_frame(scene):
    """The zero-step coefficients_ft model holds the aggregated scene unchanged (same
    descriptors, map and refiner). ``aligned=True`` renders it as NPBG++ does, on the upright
    canvas: the NPBG++ render at any roll, by each of its executors (tiled inference, the
    whole canvas, the bounded roll context, and the differentiable training path).
    ``aligned=False`` (the published NPBG) renders in the view's own frame: at a 40 degree
    roll that is NPBG++ with ``align_during_rendering`` off, not its aligned render (the
    video_sfm held-out view, rolled -57.5 degrees, scores 15.21 vs 15.40 dB from this alone)."""
    import copy
    import dataclasses

    from npbgpp_core.models.alignment import alignment_angle

    model, agg, views = scene
    aligned = fit_coefficients(model, agg, views, steps=0, perceptual_weight=0, aligned=True).model
    plain = fit_coefficients(model, agg, views, steps=0, perceptual_weight=0, aligned=False).model
    assert aligned.config.align_during_rendering and not plain.config.align_during_rendering
    # upright by default (BENCHMARKS.md "Upright fitted scenes")
    assert fit_coefficients(model, agg, views, steps=0, perceptual_weight=0).model.config.align_during_rendering
    unaligned = copy.deepcopy(model)
    unaligned.config = dataclasses.replace(model.config, align_during_rendering=False)
    for degrees, rolled in ((0, False), (40, True), (90, True)):
        cam = rolled_camera(degrees)
        assert (abs(alignment_angle(cam, model.config.world_up)) > 0.5) == rolled
        want = model.render(agg, cam)
        torch.testing.assert_close(aligned.render(agg.points, cam), want, atol=1e-6, rtol=0)
        torch.testing.assert_close(aligned.render(agg.points, cam, roll_context="bounded"),
                                   model.render(agg, cam, roll_context="bounded"), atol=1e-6, rtol=0)
        torch.testing.assert_close(aligned.render_raw(agg.points, cam), model.render_raw(agg, cam),
                                   atol=1e-6, rtol=0)  # autograd on: the training path
        img = plain.render(agg.points, cam)
        torch.testing.assert_close(img, unaligned.render(agg, cam), atol=1e-6, rtol=0)
        gap = float((img - want).abs().max())
        assert (gap > 1e-3) if rolled else (gap < 1e-6)


def test_aligned_tiled_render_fills_empty_pixels_with_the_learnt_background(scene):
    """The fitted model's background vector (what NPBG puts where no point lands) reaches the
    tiled inference render of a rolled view as it reaches the whole canvas's render
    (rasterize_descriptors' empty pixels), and it changes the image."""
    model, agg, views = scene
    fitted = fit_coefficients(model, agg, views, steps=0, perceptual_weight=0, aligned=True).model
    cam = rolled_camera(33, size=(80, 96))
    with torch.no_grad():
        before = fitted.render(agg.points, cam)
        fitted.background.copy_(torch.linspace(-2, 2, fitted.background.numel()))
    tiled = fitted.render(agg.points, cam)
    fitted.tiled_rendering = False
    torch.testing.assert_close(tiled, fitted.render(agg.points, cam), atol=1e-5, rtol=0)
    assert float((tiled - before).abs().max()) > 1e-2


def test_aligned_fit_trains_on_the_upright_canvas(scene):
    """The fit's training renders take the same path as its final ones: the first loss of a
    one-crop, whole-image step on a rolled view is the loss of the NPBG++ aligned render
    (aligned) or of the view-frame render (unaligned)."""
    import copy
    import dataclasses

    model, agg, _ = scene
    cam = rolled_camera(40)
    photo = torch.rand(1, 3, *cam.image_size, generator=torch.Generator().manual_seed(3))
    one = FitViews(photo, [cam])
    unaligned = copy.deepcopy(model)
    unaligned.config = dataclasses.replace(model.config, align_during_rendering=False)
    for flag, reference in ((True, model), (False, unaligned)):
        fit = fit_coefficients(model, agg, one, steps=1, crop=None, crops_per_step=1, perceptual_weight=0,
                               aligned=flag)
        with torch.no_grad():
            want = multiscale_l1(reference.render_raw(agg, cam)[:3][None], photo, None, (1, 2, 4))
        assert fit.losses[0] == pytest.approx(float(want), rel=1e-5)


def test_fitted_scene_keeps_its_alignment_through_a_bundle(scene, tmp_path):
    """A fitted bundle records the choice (its config's ``align_during_rendering``) and the
    bundle reader renders it so (in windows too); a file written before the field
    existed (no such key) renders in the view's frame, as it did."""
    from npbgpp_core.scene import NeuralScene

    model, agg, views = scene
    cam = rolled_camera(40, size=(96, 128))
    for flag in (True, False):
        fitted = fit_coefficients(model, agg, views, steps=1, perceptual_weight=0, aligned=flag).model
        path = str(tmp_path / f"fitted_{flag}.npbgpp")
        NeuralScene.from_npbg(fitted, agg.points).save(path)
        bundle = NeuralScene.load(path)
        assert bundle.model_config["align_during_rendering"] is flag
        renderer = bundle.renderer("cpu")
        want = fitted.render(agg.points, cam)
        torch.testing.assert_close(renderer.render(cam), want, atol=1e-6, rtol=0)
        if flag:  # windows (bounded memory) of the upright canvas, as NPBG++ renders them
            big = rolled_camera(40, size=(400, 400))
            whole = renderer.render(big)
            torch.testing.assert_close(renderer.render(big, max_pixels=(256 + 128) ** 2), whole, atol=1e-4, rtol=0)
            old = NeuralScene.load(path)
            del old.model_config["align_during_rendering"], old.model_config["render_canvas"]
            old_path = str(tmp_path / "old.npbgpp")
            old.save(old_path)
            got = NeuralScene.load(old_path).renderer("cpu").render(cam)
            fitted.config.align_during_rendering = False
            torch.testing.assert_close(got, fitted.render(agg.points, cam), atol=1e-6, rtol=0)
            assert float((got - want).abs().max()) > 1e-3


def test_one_default_step_lowers_the_training_loss_near_a_good_start(scene):
    """Photos close to the unfitted render (a little darker): the unramped first step
    overshoots (the loss grows about tenfold, as the 2-step fits of real captures that
    ended below no fit), the default one lowers it. Same view, whole image: losses[1] is
    the loss after one step."""
    model, agg, views = scene
    start = fit_coefficients(model, agg, views, steps=0).model
    with torch.no_grad():
        photo = (0.9 * start.render(agg.points, views.cameras[0]).clamp(0, 1) + 0.05)[None]
    one = FitViews(photo, views.cameras[:1])
    before, after = fit_coefficients(model, agg, one, steps=2, crop=None).losses
    assert after < before
    before, after = fit_coefficients(model, agg, one, steps=2, crop=None, warmup_steps=0).losses
    assert after > 3 * before


def test_bad_recipe_values_are_named():
    for kwargs, text in (({"train_refiner": "encoder"}, "train_refiner must be one of"),
                         ({"crops_per_step": 0}, "crops_per_step must be >= 1"),
                         ({"warmup_steps": -1}, "warmup_steps must be an integer >= 0, got -1"),
                         ({"coefficient_decay": -0.1}, "descriptor_decay must be >= 0"),
                         ({"coefficient_optimizer": "sgd"}, "descriptor_optimizer must be one of"),
                         ({"lr_refiner": float("nan")}, "lr_refiner must be >= 0"),
                         ({"gradient_weight": -1.0}, "gradient_weight must be a finite number >= 0"),
                         ({"laplacian_weight": float("inf")}, "laplacian_weight must be a finite number >= 0"),
                         ({"perceptual_weight": "x"}, "perceptual_weight must be a finite number >= 0"),
                         ({"fft_weight": -2}, "fft_weight must be a finite number >= 0"),
                         ({"aligned": 1}, "aligned must be True or False, got 1"),
                         ({"coarse_fraction": 1.5}, "coarse_fraction must be in \\[0, 1\\], got 1.5"),
                         ({"coarse_fraction": -0.1}, "coarse_fraction must be in"),
                         ({"coarse_side": 8}, "coarse_side must be an integer >= 16 pixels, got 8"),
                         ({"coarse_side": 256.0}, "coarse_side must be an integer >= 16 pixels, got 256.0"),
                         ({"coarse_side": True}, "coarse_side must be an integer >= 16 pixels, got True")):
        with pytest.raises(ValueError, match=text):
            coefficients_recipe(**kwargs)


def _refiner_change(model, fit) -> dict[str, bool]:
    """Per refiner parameter name: whether the fit changed it."""
    start = model.refiner.state_dict()
    return {k: not torch.equal(start[k], v) for k, v in fit.model.refiner.state_dict().items()}


def test_frozen_refiner_parts_do_not_change(scene):
    model, agg, views = scene
    common = dict(steps=3, crop=None, lr_refiner=1e-2, schedule="constant", warmup_steps=0)
    changed = _refiner_change(model, fit_coefficients(model, agg, views, train_refiner="none", **common))
    assert not any(changed.values())
    changed = _refiner_change(model, fit_coefficients(model, agg, views, train_refiner="head", **common))
    assert {k for k, c in changed.items() if c} == {"head.weight", "head.bias"}
    changed = _refiner_change(model, fit_coefficients(model, agg, views, train_refiner="decoder", **common))
    moved = {k for k, c in changed.items() if c}
    assert moved and all(k.startswith(("up.", "head.")) for k in moved)
    assert any(k.startswith("up.") for k in moved)
    fit = fit_coefficients(model, agg, views, train_refiner="all", **common)
    moved = {k for k, c in _refiner_change(model, fit).items() if c}
    assert any(k.startswith("first.") for k in moved) and any(k.startswith("down.") for k in moved)
    assert all(p.requires_grad for p in fit.model.refiner.parameters())  # frozen ones handed back trainable


def test_coefficient_decay_pulls_back_to_the_aggregated_values(scene):
    model, agg, views = scene
    start = agg.coefficients.reshape(agg.coefficients.shape[0], -1)
    common = dict(steps=4, crop=None, lr_coefficients=0.01, warmup_steps=0, schedule="constant")
    free = fit_coefficients(model, agg, views, coefficient_decay=0.0, **common).model.descriptors.detach()
    half = fit_coefficients(model, agg, views, coefficient_decay=20.0, **common).model.descriptors.detach()
    # lr * decay = 1: every step ends exactly back at the start
    full = fit_coefficients(model, agg, views, coefficient_decay=100.0, **common).model.descriptors.detach()
    d_free, d_half = (free - start).norm(), (half - start).norm()
    assert d_free > 0 and 0 < d_half < 0.8 * d_free
    assert torch.allclose(full, start, atol=1e-6)


def test_background_rate_is_separate(scene):
    model, agg, views = scene
    fit = fit_coefficients(model, agg, views, steps=3, crop=None, lr_coefficients=0.01, lr_background=0.0)
    assert torch.equal(fit.model.environment.detach(), agg.background)
    assert not torch.equal(fit.model.descriptors.detach().reshape(agg.coefficients.shape), agg.coefficients)
    fit = fit_coefficients(model, agg, views, steps=3, crop=None, lr_coefficients=0.0, lr_background=0.01)
    assert not torch.equal(fit.model.environment.detach(), agg.background)
    assert torch.equal(fit.model.descriptors.detach().reshape(agg.coefficients.shape), agg.coefficients)


def test_crops_per_step_average_identical_crops_like_one(scene):
    model, agg, views = scene
    one = FitViews(views.images[:1], views.cameras[:1])
    # plain L1: the feature loss's float noise on near-zero gradients is scaled up by RMSprop
    a = fit_coefficients(model, agg, one, steps=3, crop=None, crops_per_step=1, perceptual_weight=0.0)
    b = fit_coefficients(model, agg, one, steps=3, crop=None, crops_per_step=3, perceptual_weight=0.0)
    assert a.losses == pytest.approx(b.losses, rel=1e-5)
    assert torch.allclose(a.model.descriptors, b.model.descriptors, atol=1e-5)  # the fit moves them by 0.28


def hand_written_fit(model, agg, views_of_step: list[FitViews], crop: int, seed: int) -> NPBG:
    """The published loop, written out: RMSprop (lr 0.01) on the coefficients and the map, Adam
    (lr 1e-3) on the whole refiner, constant rates, one random crop a step drawn from
    ``views_of_step[step]``, plain multi-scale L1; the fitted model."""
    ref = fit_coefficients(model, agg, views_of_step[0], steps=0).model
    ref.train()
    rms = torch.optim.RMSprop([ref.descriptors, ref.background, ref.environment], lr=0.01)
    adam = torch.optim.Adam(ref.refiner.parameters(), lr=1e-3)
    rng = np.random.default_rng(seed)
    for views in views_of_step:
        _, image, _, cam = random_crop(views, rng, crop)
        loss = multiscale_l1(ref.render_raw(agg.points, cam)[:3][None], image, None, (1, 2, 4))
        rms.zero_grad()
        adam.zero_grad()
        loss.backward()
        rms.step()
        adam.step()
    return ref


def assert_same_fitted_parameters(fitted: NPBG, ref: NPBG) -> None:
    assert torch.allclose(fitted.descriptors, ref.descriptors, atol=1e-6)
    assert torch.allclose(fitted.environment, ref.environment, atol=1e-6)
    for (name, p), q in zip(fitted.refiner.named_parameters(), ref.refiner.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), name


def test_plain_recipe_equals_a_hand_written_rmsprop_adam_loop(scene):
    """constant rate, whole refiner, RMSprop, one crop: the published loop, written out."""
    model, agg, views = scene
    fit = fit_coefficients(model, agg, views, steps=3, crop=16, lr_coefficients=0.01, lr_refiner=1e-3,
                           lr_background=None, train_refiner="all", crops_per_step=1, warmup_steps=0,
                           schedule="constant", coefficient_decay=0.0, coefficient_optimizer="rmsprop",
                           gradient_weight=0.0, perceptual_weight=0.0, seed=4)
    assert_same_fitted_parameters(fit.model, hand_written_fit(model, agg, [views] * 3, crop=16, seed=4))


def test_gradient_weight_adds_the_edge_loss():
    g = torch.Generator().manual_seed(1)
    p, t = torch.rand(1, 3, 16, 16, generator=g), torch.rand(1, 3, 16, 16, generator=g)
    plain = multiscale_l1(p, t, None, (1, 2, 4))
    assert float(coefficients_ft_loss()(p, t, None)) == pytest.approx(float(plain))
    assert float(coefficients_ft_loss(gradient_weight=0.5)(p, t, None)) == pytest.approx(
        float(plain + 0.5 * gradient_loss(p, t)))


def test_average_from_returns_the_mean_of_the_iterates(scene):
    """Constant rate, same seed: the first iterate of a 2-step fit is the 1-step fit."""
    model, agg, views = scene
    common = dict(crop=16, lr_refiner=1e-3, seed=3, schedule="constant", warmup_steps=0)
    one = fit_coefficients(model, agg, views, steps=1, **common).model
    two = fit_coefficients(model, agg, views, steps=2, **common).model
    mean = fit_coefficients(model, agg, views, steps=2, average_from=0.0, **common).model
    last = fit_coefficients(model, agg, views, steps=2, average_from=0.5, **common).model  # only step 1
    for name in ("descriptors", "environment"):
        a, b = getattr(one, name).detach(), getattr(two, name).detach()
        assert not torch.allclose(a, b)
        assert torch.allclose(getattr(mean, name), (a + b) / 2, atol=1e-6)
        assert torch.allclose(getattr(last, name), b, atol=1e-6)
    for (key, p), q, r in zip(mean.refiner.named_parameters(), one.refiner.parameters(), two.refiner.parameters(),
                              strict=True):
        assert torch.allclose(p, (q + r) / 2, atol=1e-6), key
    with pytest.raises(ValueError, match="average_from must be in"):
        coefficients_recipe(average_from=1.5)


def test_coefficients_recipe_keeps_the_keywords_and_defaults_of_fit_coefficients():
    """coefficients_recipe (the early check bench_quality runs on its flags) mirrors
    fit_coefficients' recipe keywords: same names, same defaults, so the two cannot drift."""
    import inspect

    from npbgpp_core.fitting import fit_coefficients

    recipe = inspect.signature(coefficients_recipe).parameters
    fit = inspect.signature(fit_coefficients).parameters
    assert recipe, "coefficients_recipe takes no keywords"
    for name, param in recipe.items():
        assert name in fit, name
        assert fit[name].default == param.default, name


def test_padded_fit_views_keep_every_photo_and_mask_the_padding():
    # A landscape and a portrait photo (a phone capture) and one a row shorter (COLMAP's
    # undistorted photos): nothing dropped or resampled.
    cams = ring_cameras(3, size=(20, 30))
    cams[1] = ring_cameras(3, size=(30, 20))[1]
    cams[2] = ring_cameras(3, size=(19, 30))[2]
    g = torch.Generator().manual_seed(2)
    images = [torch.rand(3, *c.image_size, generator=g) for c in cams]
    views = padded_fit_views(images, cams)
    # each kept at its own size, read back padded to the 30 x 30 canvas with its mask
    assert views.own_sizes and views.canvas == (30, 30) and [tuple(im.shape) for im in views.images] == [
        (3, *c.image_size) for c in cams]
    for k, (im, cam) in enumerate(zip(images, cams, strict=True)):
        h, w = im.shape[-2:]
        assert torch.equal(views.image(k, 0, 0, h, w), im)
        assert float(views.mask(k).sum()) == h * w and bool((views.mask(k, 0, 0, h, w) == 1).all())
        assert tuple(views.cameras[k].image_size) == (30, 30)
        # The canvas grows at the bottom and right: every world point keeps its pixel.
        pts = torch.tensor([[0.0, 0.0, 0.0], [0.3, -0.2, 0.1], [-0.4, 0.5, 0.2]], dtype=torch.float64)
        uv, z = cam.project(pts)
        uv2, z2 = views.cameras[k].project(pts)
        assert torch.allclose(uv, uv2) and torch.allclose(z, z2)
    # The padding never enters the loss: any prediction there gives the same value.
    pred = torch.rand(1, 3, 30, 30, generator=g)
    other = pred.clone()
    other[..., 20:, :] = 5.0
    for k in range(3):
        target, mask = views.image(k)[None], views.mask(k)[None]
        h, w = images[k].shape[-2:]
        assert float(multiscale_l1(pred, target, mask, (1,))) == pytest.approx(
            float((pred[..., :h, :w] - images[k]).abs().mean()), rel=1e-5)
        if h == 20:
            assert float(multiscale_l1(other, target, mask)) == pytest.approx(
                float(multiscale_l1(pred, target, mask)), rel=1e-6)


def test_padded_fit_views_same_size_and_bad_input():
    cams = ring_cameras(2, size=(16, 24))
    images = [torch.rand(3, 16, 24), torch.rand(3, 16, 24)]
    views = padded_fit_views(images, cams)
    assert views.masks is None and torch.equal(views.images, torch.stack(images))  # not 8-bit: kept as given
    with pytest.raises(ValueError, match=r"image 1 is \(16, 20\) but its camera \(16, 24\)"):
        padded_fit_views([images[0], torch.rand(3, 16, 20)], cams)
    with pytest.raises(ValueError, match="2 images but 1 cameras"):
        padded_fit_views(images, cams[:1])



def test_sharpening_weights_add_their_losses_and_need_their_network(scene):
    from npbgpp_core.losses import EncoderFeatureLoss, laplacian_pyramid_loss

    g = torch.Generator().manual_seed(1)
    p, t = torch.rand(1, 3, 16, 16, generator=g), torch.rand(1, 3, 16, 16, generator=g)
    plain = multiscale_l1(p, t, None, (1, 2, 4))
    assert float(coefficients_ft_loss(laplacian_weight=2.0)(p, t, None)) == pytest.approx(
        float(plain + 2.0 * laplacian_pyramid_loss(p, t)))
    net = EncoderFeatureLoss(scene[0].extractor.encoder)
    both = coefficients_ft_loss(gradient_weight=0.5, perceptual_weight=0.25, perceptual=net)(p, t, None)
    assert float(both) == pytest.approx(float(plain + 0.5 * gradient_loss(p, t) + 0.25 * net(p, t)))
    with pytest.raises(ValueError, match="perceptual_weight > 0 needs the perceptual loss network"):
        coefficients_ft_loss(perceptual_weight=1.0)
    from npbgpp_core.losses import fft_amplitude_loss

    assert float(coefficients_ft_loss(fft_weight=3.0)(p, t, None)) == pytest.approx(
        float(plain + 3.0 * fft_amplitude_loss(p, t)))
    with pytest.raises(ValueError, match="laplacian_weight must be a finite number >= 0"):
        coefficients_ft_loss(laplacian_weight=float("nan"))


def test_perceptual_fit_leaves_the_model_and_its_extractor_untouched(scene):
    model, agg, views = scene
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = fit_coefficients(model, agg, views, steps=2, crop=16, seed=3, perceptual_weight=0.0)
    sharp = fit_coefficients(model, agg, views, steps=2, crop=16, seed=3, perceptual_weight=1.0, laplacian_weight=1.0)
    assert sharp.steps == 2 and all(math.isfinite(v) for v in sharp.losses)
    assert sharp.losses[0] > plain.losses[0]  # same first crops, extra terms
    assert not torch.allclose(sharp.model.descriptors, plain.model.descriptors)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_default_fit_loss_is_l1_plus_three_times_the_models_own_encoder_features(scene):
    """The default (BENCHMARKS.md "Sharpening loss in the 200-step fit"): the same steps as
    an explicit loss_fn of multi-scale L1 + 3 x EncoderFeatureLoss(model.extractor.encoder)."""
    from npbgpp_core.losses import EncoderFeatureLoss

    model, agg, views = scene
    default = fit_coefficients(model, agg, views, steps=2, crop=16, seed=5)
    explicit = fit_coefficients(model, agg, views, steps=2, crop=16, seed=5, loss_fn=coefficients_ft_loss(
        perceptual_weight=3.0, perceptual=EncoderFeatureLoss(model.extractor.encoder)))
    assert default.losses == pytest.approx(explicit.losses, rel=1e-6)
    plain = fit_coefficients(model, agg, views, steps=2, crop=16, seed=5, perceptual_weight=0.0)
    assert plain.losses[0] < default.losses[0]


def test_perceptual_fit_refuses_a_bundle_model_whose_encoder_is_random(scene, tmp_path):
    """Bundles leave the extractor out: the model a bundle renders with has a random
    encoder, and a perceptual fit with it would run without error on meaningless features.
    It is refused by name (steps 0 too: before any step); without the perceptual term the
    bundle's model fits; the weights file's model (the shipped flows' fitting_model) fits
    with it, exactly as the model the bundle was aggregated with."""
    from npbgpp_core.losses import EncoderFeatureLoss
    from npbgpp_core.scene import NeuralScene
    from npbgpp_core.scene_fit import fitting_model

    model, agg, views = scene
    path = str(tmp_path / "s.npbgpp")
    NeuralScene.from_aggregated(model, agg, name="s").save(path)
    bundle = NeuralScene.load(path)
    from_bundle = bundle.renderer("cpu").model
    assert from_bundle.extractor.encoder.weights_file is None
    for steps in (0, 2):
        with pytest.raises(ValueError, match="never loaded from a weights file.*fitting_model.*perceptual_weight=0"):
            fit_coefficients(from_bundle, agg, views, steps=steps, crop=16)
    with pytest.raises(ValueError, match="never loaded from a weights file"):
        EncoderFeatureLoss(from_bundle.extractor.encoder)
    plain = fit_coefficients(from_bundle, agg, views, steps=2, crop=16, seed=3, perceptual_weight=0.0)
    same = fit_coefficients(model, agg, views, steps=2, crop=16, seed=3, perceptual_weight=0.0)
    assert plain.losses == pytest.approx(same.losses, rel=1e-6)  # the bundle's basis and refiner: the same fit
    # the weights file the bundle was aggregated with: its model carries the trained encoder
    weights = model.extractor.encoder.weights_file
    fitting = fitting_model(bundle, path, weights, "cpu")
    assert fitting.extractor.encoder.weights_file == weights
    ok = fit_coefficients(fitting, bundle.aggregated_scene(), views, steps=2, crop=16, seed=3)
    ref = fit_coefficients(model, agg, views, steps=2, crop=16, seed=3)
    assert ok.losses == pytest.approx(ref.losses, rel=1e-6) and all(math.isfinite(v) for v in ok.losses)
    # a bundle aggregated with another network is refused, naming the option that differs
    bundle.model_config["input_canvas"] = "bounds" if bundle.model_config["input_canvas"] == "square" else "square"
    with pytest.raises(ValueError, match=r"another NPBG\+\+ network .*config differs in \['input_canvas'\]"):
        fitting_model(bundle, path, weights, "cpu")


def block_mean(x: torch.Tensor, k: int) -> torch.Tensor:
    """(N, C, H, W) averaged over k x k blocks, written out (the reference for the area resize)."""
    n, c, h, w = x.shape
    return x.reshape(n, c, h // k, k, w // k, k).mean(dim=(3, 5))


def test_downsized_fit_views_are_block_means_with_matching_cameras_and_strict_masks():
    cams = ring_cameras(2, size=(32, 48))
    g = torch.Generator().manual_seed(3)
    images = torch.rand(2, 3, 32, 48, generator=g)
    masks = torch.ones(2, 1, 32, 48)
    masks[1, :, 31:, :] = 0  # one padded row: the coarse row over it is not valid
    masks[1, :, :, 45:] = 0
    small = downsized_fit_views(FitViews(images, cams, masks), 24)
    assert small.images.shape == (2, 3, 16, 24)
    assert torch.allclose(small.images, block_mean(images, 2), atol=1e-6)
    want = torch.ones(2, 1, 16, 24)
    want[1, :, 15:, :] = 0
    want[1, :, :, 22:] = 0  # columns 44-45 and 46-47 each hold a padded one
    assert torch.equal(small.masks, want)
    # the same 3D point lands on the same spot of the picture: pixel centres map by (u + 0.5) / 2 - 0.5
    R = cams[0].R.to(torch.float64)
    point = cams[0].center().to(torch.float64) + R.T @ torch.tensor([0.4, -0.3, 3.0], dtype=torch.float64)
    uv_full, _ = cams[0].project(point[None])
    uv_small, _ = small.cameras[0].project(point[None])
    assert torch.allclose(uv_small, (uv_full + 0.5) / 2 - 0.5, atol=1e-6)
    assert tuple(small.cameras[1].image_size) == (16, 24)
    same = FitViews(images, cams)
    assert downsized_fit_views(same, 48) is same  # already small enough: untouched
    with pytest.raises(ValueError, match="coarse_side must be an integer >= 16"):
        downsized_fit_views(same, 4)


def test_downsized_masks_drop_every_coarse_pixel_a_masked_pixel_enters_however_large_its_window():
    """Photos 600 x 1000 shrunk to 16 columns (a coarse pixel averages ~38 x 63 pixels, a
    non-integer ratio): the image is 1 on five scattered masked pixels and 0 elsewhere, so a
    coarse pixel's average is 0 exactly when no masked pixel enters it; the coarse mask must
    be valid exactly there."""
    cam = ring_cameras(1, size=(600, 1000))
    masks = torch.ones(1, 1, 600, 1000)
    for y, x in ((0, 0), (37, 500), (300, 333), (451, 62), (599, 999)):
        masks[0, 0, y, x] = 0
    images = (1 - masks).expand(1, 3, 600, 1000).contiguous()
    small = downsized_fit_views(FitViews(images, cam, masks), 16)
    assert small.images.shape == (1, 3, 10, 16)
    clean = small.images[:, :1] == 0
    assert 5 <= int((~clean).sum()) < clean.numel()  # each masked pixel reaches at least one coarse pixel
    assert torch.equal(small.masks, clean.to(small.masks.dtype))


def test_coarse_phase_fits_its_first_steps_on_the_shrunk_photos(scene):
    """coarse_fraction 0.5 of 4 steps: a hand-written loop whose first 2 crops come from the
    views block-averaged to half size (cameras Camera.scaled) and the last 2 from the full
    views, same seed: the same coefficients, map and refiner."""
    model, agg, views = scene
    knobs = dict(lr_coefficients=0.01, lr_refiner=1e-3, crops_per_step=1, warmup_steps=0,
                 perceptual_weight=0.0, seed=4)
    fit = fit_coefficients(model, agg, views, steps=4, crop=12, coarse_fraction=0.5, coarse_side=16, **knobs)
    half = FitViews(block_mean(views.images, 2), [c.scaled((16, 16)) for c in views.cameras])
    assert_same_fitted_parameters(fit.model, hand_written_fit(model, agg, [half, half, views, views], crop=12, seed=4))
    plain = fit_coefficients(model, agg, views, steps=4, crop=12, coarse_fraction=0.0, **knobs)
    assert not torch.allclose(plain.model.descriptors, fit.model.descriptors, atol=1e-4)


def test_coarse_phase_leaves_photos_no_larger_than_its_side_alone(scene):
    model, agg, views = scene  # 32 x 32 photos
    knobs = dict(steps=3, crop=16, perceptual_weight=0.0, seed=2)
    plain = fit_coefficients(model, agg, views, coarse_fraction=0.0, **knobs)
    coarse = fit_coefficients(model, agg, views, coarse_fraction=1.0, coarse_side=32, **knobs)
    assert plain.losses == coarse.losses
    assert torch.equal(plain.model.descriptors, coarse.model.descriptors)


def test_an_averaging_check_averages_every_tensor_the_environment_map_too(scene):
    """check_combine="average" on a model with a learnt environment map: every floating tensor of the
    kept model (descriptors, background, environment map, refiner, the frozen basis) is, bit for bit,
    the mean of the two recipes' fitted states computed here in float64 and rounded once; the bool
    'active' buffer is theirs. A tolerance no fit exceeds keeps the mean."""
    model, agg, views = scene
    fit = fit_coefficients(model, agg, views, steps=2, crop=16, perceptual_weight=0.0, check_view=True,
                           check_recipes=("crops", "whole"), check_combine="average", check_tolerance=1000.0,
                           keep_candidates=True)
    crops, whole = fit.candidate_states["crops"], fit.candidate_states["whole"]
    state = fit.model.state_dict()
    assert fit.check.kept == "fitted" and set(state) == set(crops) == set(whole)
    assert {"environment", "background", "descriptors", "active"} <= set(state)
    assert not torch.equal(crops["environment"], whole["environment"])
    for key, value in state.items():
        if value.is_floating_point():
            expected = ((crops[key].double() + whole[key].double()) / 2).to(value.dtype)
        else:
            assert torch.equal(crops[key], whole[key]), key
            expected = crops[key]
        assert value.dtype == crops[key].dtype and torch.equal(value.cpu(), expected), key
