"""The fit's opt-in per-photo exposure term (``photo_exposure``): a synthetic scene whose input
photos are its true renders through known per-photo gains and offsets; with the term the fitted
render of an unseen view (which no correction touches) stays close to the true colours and the
learned corrections match the known ones, without it the fit chases the photos' exposures. Off,
the fit is the one it was (default off)."""

from __future__ import annotations

import dataclasses
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_background import env_scene, ring_cameras  # noqa: E402

from npbgpp_core.fitting import FitViews, coefficients_recipe, fit_coefficients  # noqa: E402

SIZE = (32, 32)
PHOTOS = 8
PLAIN = dict(crop=None, perceptual_weight=0.0, seed=0)  # whole views, L1 only: fast and deterministic
# 8 photos, each seen about every 4th crop for 100 steps: the default rate (PHOTO_EXPOSURE_LR, set for a
# photo seen ~6 times in a 70-photo fit) would need ~3x the steps to settle; the mechanism is the same
FAST = dict(photo_exposure=True, lr_exposure=1e-2)


@pytest.fixture(scope="module")
def exposed():
    """The model and scene (coefficients scaled up so that its renders have contrast: std ~0.09,
    not ~0.003, else a gain and an offset cannot be told apart), the true renders of 9 ring views,
    the first 8 as input photos through known gains and offsets (mean gain 1, mean offset 0:
    the term's own convention, so the known values are what it can recover), and those values."""
    model, agg = env_scene()
    agg = dataclasses.replace(agg, coefficients=agg.coefficients * 100)
    cams = ring_cameras(PHOTOS + 1, size=SIZE)
    start = fit_coefficients(model, agg, FitViews(torch.zeros(1, 3, *SIZE), cams[:1]), steps=0, **PLAIN).model
    with torch.no_grad():
        truth = torch.stack([start.render(agg.points, c).clamp(0, 1) for c in cams])
    g = torch.Generator().manual_seed(3)
    gains = 1 + 0.25 * (torch.rand(PHOTOS, 3, generator=g) - 0.5)
    offsets = 0.12 * (torch.rand(PHOTOS, 3, generator=g) - 0.5)
    gains, offsets = gains - gains.mean(0) + 1, offsets - offsets.mean(0)
    photos = truth[:PHOTOS] * gains[:, :, None, None] + offsets[:, :, None, None]
    return model, agg, cams, truth, FitViews(photos, cams[:PHOTOS]), gains, offsets


def unseen_error(fitted, agg, cam, truth) -> float:
    """Mean absolute error of the fitted render of ``cam`` against the true colours."""
    with torch.no_grad():
        return float((fitted.render(agg.points, cam).clamp(0, 1) - truth).abs().mean())


def test_the_term_keeps_an_unseen_view_at_the_true_colours_and_recovers_the_exposures(exposed):
    model, agg, cams, truth, views, gains, offsets = exposed
    without = fit_coefficients(model, agg, views, steps=100, **PLAIN)
    with_term = fit_coefficients(model, agg, views, steps=100, **FAST, **PLAIN)
    assert without.exposure is None
    off_error = unseen_error(without.model, agg, cams[PHOTOS], truth[PHOTOS])
    on_error = unseen_error(with_term.model, agg, cams[PHOTOS], truth[PHOTOS])
    assert off_error > 0.02  # the exposures pulled the scene (measured 0.042)
    assert on_error < 0.25 * off_error  # measured 0.0045
    learned_gains, learned_offsets = (v.detach() for v in with_term.exposure.values())
    assert learned_gains.shape == (PHOTOS, 3) and learned_offsets.shape == (PHOTOS, 3)
    assert torch.allclose(learned_gains.mean(0), torch.ones(3), atol=1e-6)  # the convention, held exactly
    assert torch.allclose(learned_offsets.mean(0), torch.zeros(3), atol=1e-6)
    assert float((learned_gains - gains).abs().max()) < 0.07  # known gains span 0.90-1.13; measured 0.051
    # on the scene's own colours the learned correction maps a pixel as the known one does: what an
    # offset and a gain trade between them (a gain about the pixels' mean moves them alike) is left out
    x = truth[:PHOTOS]
    known = x * gains[:, :, None, None] + offsets[:, :, None, None]
    learned = x * learned_gains[:, :, None, None] + learned_offsets[:, :, None, None]
    ratio = float((learned - known).abs().mean() / (known - x).abs().mean())
    assert ratio < 0.3, ratio  # of the exposures' own effect on the pixels
    summary = with_term.exposure.summary()
    assert summary["photo_exposure"] is True and summary["photos"] == PHOTOS
    assert summary["gain_min"] == [round(float(v), 4) for v in learned_gains.min(0).values]
    assert summary["offset_max"] == [round(float(v), 4) for v in learned_offsets.max(0).values]


def test_off_is_the_default_and_the_fit_it_was(exposed):
    """photo_exposure=False is the default and draws the same crops: the same fitted parameters,
    bit for bit (test_fitting_recipe checks that fit against a hand-written loop)."""
    model, agg, _, _, views, _, _ = exposed
    default = fit_coefficients(model, agg, views, steps=3, crop=16, perceptual_weight=0.0, seed=2)
    off = fit_coefficients(model, agg, views, steps=3, crop=16, perceptual_weight=0.0, seed=2, photo_exposure=False)
    assert default.losses == off.losses and off.exposure is None
    for (name, p), q in zip(default.model.state_dict().items(), off.model.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_the_check_scores_the_uncorrected_render_and_the_kept_photo_gets_no_correction(exposed):
    """A checked fit: the kept photo (index 4 of 8) is not fitted, so corrections exist for the 7
    others only, and its score is the plain render's PSNR against it, recomputed here."""
    model, agg, cams, _, views, _, _ = exposed
    fit = fit_coefficients(model, agg, views, steps=20, check_view=True, check_tolerance=100.0, **FAST,
                           **PLAIN)  # the fit kept whatever it scores, so that its model is the scored one
    k = fit.check.view
    assert k == 4 and fit.exposure.summary()["photos"] == PHOTOS - 1
    with torch.no_grad():
        render = fit.model.render(agg.points, cams[k]).clamp(0, 1)
    mse = float(((render - views.images[k]) ** 2).mean())
    assert fit.check.kept == "fitted"
    assert fit.check.psnr_fitted == pytest.approx(10 * math.log10(1 / mse), abs=1e-3)


def test_a_bad_value_is_named():
    with pytest.raises(ValueError, match="photo_exposure must be True or False, got 'yes'"):
        coefficients_recipe(photo_exposure="yes")


def test_fit_command_records_the_term_and_the_bundle_renders_without_it(tmp_path, capsys):
    """headless_train fit --photo-exposure: the metadata says it was used with the values' range,
    the last line gives it; without the flag no record."""
    from _train_fixtures import tiny_scene_and_bundle

    from headless_train.fit import main
    from npbgpp_core.scene import NeuralScene

    folder, bundle = tiny_scene_and_bundle(str(tmp_path), views=4, splits=(3, 0, 1))
    out = str(tmp_path / "exposed.npbgpp")
    capsys.readouterr()
    assert main(["--bundle", bundle, "--scene", folder, "--out", out, "--steps", "2", "--device", "cpu",
                 "--no-check-view", "--photo-exposure"]) == 0
    record = NeuralScene.load(out).metadata["fit"]["exposure"]
    assert record["photo_exposure"] is True and record["photos"] == 3
    assert all(len(record[key]) == 3 for key in ("gain_min", "gain_max", "offset_min", "offset_max"))
    assert "per-photo exposure (in the fit's loss only): gains " in capsys.readouterr().err
    plain = str(tmp_path / "plain.npbgpp")
    assert main(["--bundle", bundle, "--scene", folder, "--out", plain, "--steps", "2", "--device", "cpu",
                 "--no-check-view"]) == 0
    assert "exposure" not in NeuralScene.load(plain).metadata["fit"]
