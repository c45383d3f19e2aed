"""The checked fit (``check_view``): one training photo is kept apart, the fit runs on the
others, and a fit that scores more than ``check_tolerance`` dB lower on the kept photo than the
unfitted scene is dropped, so
that the saved bundle renders exactly as the bundle it was fitted from. The scores are checked
against PSNRs recomputed here from the saved bundles' own renders, and the fallback against a
render of the source bundle."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable

import pytest
import torch
from _train_fixtures import aggregate_with_worker, kept_photo_scores, make_tiny_scene

from npbgpp_core import fitting
from npbgpp_core import protocol as P
from npbgpp_core.datasets import load_scene
from npbgpp_core.fitting import check_view_index, iter_fit_coefficients, padded_fit_views, run_fit
from npbgpp_core.scene import NeuralScene
from npbgpp_core.scene_fit import BundleFit, fit_bundle, fitting_model
from npbgpp_core.service import RenderService


@pytest.fixture(scope="module")
def four_views(tmp_path_factory):
    """A tiny cut-out scene with 4 training views (the check keeps the third, index 2) and
    one test view, and its aggregated bundle."""
    root = tmp_path_factory.mktemp("check")
    folder = make_tiny_scene(str(root / "scene"), views=5, size=32, n_points=200, splits=(4, 0, 1))
    bundle = str(root / "agg.npbgpp")
    aggregate_with_worker(folder, bundle)
    return folder, bundle


def psnr_of(render: torch.Tensor, photo: torch.Tensor) -> float:
    """PSNR in dB, computed here (not by the code under test)."""
    mse = float(((render.float() - photo.float()) ** 2).mean())
    return 10.0 * math.log10(1.0 / mse)


def real_scores_with_one_changed(monkeypatch: pytest.MonkeyPatch, call: int,
                                 change: Callable[[float], float]) -> list[float]:
    """Make ``fitting.view_psnr`` score the kept photo as it does, except that its ``call``-th
    call (1: the unfitted scene's, 2: the fit's) returns ``change(real score)``; returns the
    real scores, one per call, as they come."""
    real = fitting.view_psnr
    scores: list[float] = []

    def changed(*args: object) -> float:
        scores.append(real(*args))
        return change(scores[-1]) if len(scores) == call else scores[-1]

    monkeypatch.setattr(fitting, "view_psnr", changed)
    return scores


def inverted_loss(*_args, **_kwargs):
    """A loss that fits the renders to the inverted photos: a fit that must lose on any photo."""
    return lambda pred, target, mask: (pred - (1 - target)).abs().mean()


def test_the_kept_view_is_the_middle_one_and_needs_three_views():
    assert [check_view_index(n) for n in range(6)] == [None, None, None, 1, 2, 2]
    assert check_view_index(9) == 4


def test_the_fit_never_sees_the_kept_photo(four_views):
    """Whole-view crops: every step's targets are training photos, never the one kept apart,
    and all the others are used."""
    folder, bundle = four_views
    data = load_scene(folder)
    scene = NeuralScene.load(bundle)
    model = fitting_model(scene, bundle, BundleFit(bundle, data, steps=1).weights)
    ids = list(data.train)
    views = padded_fit_views([data.load_image(i) for i in ids], [data.views[i].camera for i in ids])
    seen: list[int] = []

    def recording_l1(pred, target, mask):
        seen.append(next(k for k in range(len(ids)) if torch.equal(target[0], views.image(k))))
        return (pred - target).abs().mean()

    result = run_fit(iter_fit_coefficients(model, scene.aggregated_scene(), views, 12, crop=None,
                                           loss_fn=recording_l1, crops_per_step=2, check_view=True))
    assert result.check is not None and result.check.view == 2 and result.steps == 12
    assert 2 not in seen and set(seen) == {0, 1, 3}


def test_a_fit_that_loses_on_the_kept_photo_saves_the_unfitted_scene(four_views, tmp_path, monkeypatch):
    """A fit driven to lose (to the inverted photos) is dropped: the saved bundle renders exactly as
    the source bundle, and its metadata give the kept photo and both scores, which match
    PSNRs recomputed from the source bundle's render and the dropped model's."""
    folder, bundle = four_views
    data = load_scene(folder)
    monkeypatch.setattr(fitting, "coefficients_ft_loss", inverted_loss)
    job = BundleFit(bundle, data, steps=30, check_view=True)
    assert job.checked and (job.done, job.total) == (0, 32)
    seen = []
    while not job.step():
        seen.append(job.done)
    assert seen == list(range(1, 32)) and job.done == 32
    out = str(tmp_path / "fitted.npbgpp")
    job.save(out)
    saved, source = NeuralScene.load(out), NeuralScene.load(bundle)
    check = saved.metadata["fit"]["check"]
    kept_id = list(data.train)[2]
    assert check["kept"] == "unfitted" and check["view"] == 2 and check["name"] == data.views[kept_id].name
    assert check["psnr_fitted"] < check["psnr_unfitted"]
    assert saved.kind == "npbgpp" and saved.metadata["fit"]["steps"] == 30
    kept_camera = data.views[kept_id].camera
    photo = data.load_image(kept_id)
    for camera in (kept_camera, data.views[list(data.test)[0]].camera):
        with torch.no_grad():
            assert torch.equal(saved.renderer("cpu").render(camera), source.renderer("cpu").render(camera))
    with torch.no_grad():
        unfitted = source.renderer("cpu").render(kept_camera)
        dropped = job.result.model  # put back to the unfitted state: renders as the source bundle does
        back = dropped.render(source.points, kept_camera)
    assert check["psnr_unfitted"] == pytest.approx(psnr_of(unfitted, photo), abs=0.01)
    torch.testing.assert_close(back, unfitted, atol=1e-4, rtol=0)
    assert job.outcome().startswith("kept the unfitted scene: the fit scored ")
    assert job.outcome().endswith(f"dB below it (more than the 0.50 dB the check allows) on held-apart photo "
                                  f"{check['name']}")
    assert check["tolerance_db"] == fitting.CHECK_TOLERANCE_DB == 0.5


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_the_unfitted_copy_a_losing_fit_restores_is_kept_in_cpu_memory(four_views, monkeypatch, device):
    """The copy of the unfitted weights a losing fit is put back to lies in CPU memory for the
    whole fit (on a GPU one more copy of every coefficient otherwise), and the restore puts the
    model back exactly: its state equals, bit for bit, a copy taken here when the kept photo
    was first scored (before step 1). On CPU the device half cannot tell the old copy (on the
    model's device) apart; on CUDA it does."""
    folder, bundle = four_views
    data, scene, _, ids = _fitting_setup(folder, bundle)
    model = fitting_model(scene, bundle, BundleFit(bundle, data, steps=1).weights, device=device)
    views = padded_fit_views([data.load_image(i) for i in ids], [data.views[i].camera for i in ids])
    before: dict[str, torch.Tensor] = {}
    restored: list[dict[str, torch.Tensor]] = []
    scored = fitting.view_psnr

    def first_scoring_copies_the_state(fitted, points, fit_views, k):
        if not before:
            before.update({name: v.detach().cpu().clone() for name, v in fitted.state_dict().items()})
        return scored(fitted, points, fit_views, k)

    original_load = torch.nn.Module.load_state_dict

    def recording_load(module, state, *args, **kwargs):
        restored.append(dict(state))
        return original_load(module, state, *args, **kwargs)

    monkeypatch.setattr(fitting, "view_psnr", first_scoring_copies_the_state)
    monkeypatch.setattr(fitting.NPBG, "load_state_dict", recording_load)
    result = run_fit(iter_fit_coefficients(model, scene.aggregated_scene(), views, 30, check_view=True,
                                           loss_fn=inverted_loss()))
    assert result.check.kept == "unfitted" and len(restored) == 1
    assert {v.device.type for v in restored[0].values()} == {"cpu"}
    after = result.model.state_dict()
    assert set(after) == set(before)
    assert {v.device.type for v in after.values()} == {device}  # put back on the fit's device
    for name, value in before.items():
        assert torch.equal(after[name].cpu(), value), name


def test_a_fit_that_wins_on_the_kept_photo_is_saved(four_views, tmp_path):
    """The ordinary fit of this scene improves the kept photo: the fitted bundle is saved
    and its render of the kept photo scores what the check says."""
    folder, bundle = four_views
    data = load_scene(folder)
    out = str(tmp_path / "fitted.npbgpp")
    result = fit_bundle(bundle, data, out, steps=30, check_view=True)
    saved = NeuralScene.load(out)
    check = saved.metadata["fit"]["check"]
    assert result.check.kept == check["kept"] == "fitted" and saved.kind == "coefficients"
    assert check["psnr_fitted"] > check["psnr_unfitted"]
    kept_id = list(data.train)[2]
    with torch.no_grad():
        render = saved.renderer("cpu").render(data.views[kept_id].camera)
    assert check["psnr_fitted"] == pytest.approx(psnr_of(render, data.load_image(kept_id)), abs=0.01)


def test_fewer_than_three_photos_fit_unchecked_and_say_so(tmp_path):
    folder = make_tiny_scene(str(tmp_path / "scene"), views=3, size=32, n_points=100, splits=(2, 0, 1))
    bundle = str(tmp_path / "agg.npbgpp")
    aggregate_with_worker(folder, bundle)
    job = BundleFit(bundle, load_scene(folder), steps=2, check_view=True)
    assert not job.checked and job.total == 2
    while not job.step():
        pass
    out = str(tmp_path / "fitted.npbgpp")
    job.save(out)
    check = NeuralScene.load(out).metadata["fit"]["check"]
    assert check["view"] is None and check["kept"] == "fitted" and "2 input views" in check["skipped"]
    assert NeuralScene.load(out).kind == "coefficients"
    assert job.outcome() == "the fit used every photo unchecked: 2 input views, fewer than the 3 a check needs"
    assert job.outcome().count(":") == 1  # one sentence: the outcome, then why


def test_check_view_must_be_a_bool(four_views):
    folder, bundle = four_views
    with pytest.raises(ValueError, match="check_view must be True or False, got 'yes'"):
        BundleFit(bundle, load_scene(folder), steps=1, check_view="yes")


def test_the_worker_s_fit_job_carries_the_check_and_its_outcome(four_views, tmp_path, monkeypatch):
    """FitBegin(check_view=True): total counts the two scoring renders, FitResultInfo says
    what was kept in a line naming the photo; check_view=False fits unchecked."""
    folder, bundle = four_views
    monkeypatch.setattr(fitting, "coefficients_ft_loss", inverted_loss)
    service = RenderService()
    first = service.handle(P.FitBegin(bundle, folder, steps=20, device="CPU", check_view=True))
    assert isinstance(first, P.FitProgress) and (first.done, first.total) == (0, 22), first
    assert first.doing == "scoring the kept photo"  # the next step renders it, fitting nothing
    seen, doing = [], {}
    while not (progress := service.handle(P.FitStep(seconds=0.0))).finished:
        seen.append(progress.done)
        doing[progress.done] = progress.doing
    assert seen == list(range(1, 22)) and progress.done == 22 and progress.doing == ""
    assert doing[21] == "scoring the kept photo" and set(doing.values()) == {"", "scoring the kept photo"}
    assert [done for done, what in doing.items() if what] == [21]
    out = str(tmp_path / "checked.npbgpp")
    info = service.handle(P.FitFinish(out))
    assert isinstance(info, P.FitResultInfo), info
    check = NeuralScene.load(out).metadata["fit"]["check"]
    assert info.kept == check["kept"] == "unfitted" and info.steps == 20
    assert info.outcome.startswith("kept the unfitted scene") and info.outcome.endswith(check["name"])
    plain = service.handle(P.FitBegin(bundle, folder, steps=2, device="CPU", check_view=False))
    assert plain.total == 2 and plain.doing == ""
    while not service.handle(P.FitStep(seconds=0.0)).finished:
        pass
    info = service.handle(P.FitFinish(str(tmp_path / "plain.npbgpp")))
    assert info.kept == "fitted" and info.outcome == "the fit was not checked on a photo kept apart"


def _fitting_setup(folder: str, bundle: str):
    """The dataset, the source bundle, its fitting model and the training ids."""
    data = load_scene(folder)
    scene = NeuralScene.load(bundle)
    model = fitting_model(scene, bundle, BundleFit(bundle, data, steps=1).weights)
    return data, scene, model, list(data.train)


def test_a_smaller_kept_photo_is_scored_at_its_own_size(four_views):
    """Photos of different sizes are padded to one canvas for the fit; the kept photo is
    scored as a saved bundle renders its own camera (not the padded canvas, whose extra
    border the network would see), against its own pixels."""
    folder, bundle = four_views
    data, scene, model, ids = _fitting_setup(folder, bundle)
    h, w = 24, 20
    images = [data.load_image(i) for i in ids]
    cameras = [data.views[i].camera for i in ids]
    images[2], cameras[2] = images[2][:, :h, :w].contiguous(), cameras[2].cropped(0, 0, h, w)
    views = padded_fit_views(images, cameras)
    assert views.own_sizes and views.canvas == (32, 32)
    result = run_fit(iter_fit_coefficients(model, scene.aggregated_scene(), views, 0, check_view=True))
    with torch.no_grad():
        own = scene.renderer("cpu").render(cameras[2])
    assert tuple(own.shape[-2:]) == (h, w)
    assert result.check.view == 2
    assert result.check.psnr_unfitted == pytest.approx(psnr_of(own, images[2]), abs=1e-3)


def test_a_large_kept_photo_is_scored_in_windows(four_views, monkeypatch):
    """Above CHECK_VIEW_MAX_PIXELS the scoring render runs in windows, as the add-on's tiled
    frames do (here windows of 600 pixels with 4-pixel margins on the 32x32 photos): no
    network pass is larger, and the score is that of the source bundle's own windowed render."""
    from npbgpp_core import scene as scene_module
    from npbgpp_core.models.rendering import DescriptorRendering

    folder, bundle = four_views
    data, scene, model, ids = _fitting_setup(folder, bundle)
    views = padded_fit_views([data.load_image(i) for i in ids], [data.views[i].camera for i in ids])
    monkeypatch.setattr(scene_module, "WINDOW_MARGIN", 4)
    monkeypatch.setattr(fitting, "CHECK_VIEW_MAX_PIXELS", 600)
    passes: list[int] = []
    direct = DescriptorRendering._render_direct

    def recording(self, scene_, camera):
        passes.append(camera.image_size[0] * camera.image_size[1])
        return direct(self, scene_, camera)

    monkeypatch.setattr(DescriptorRendering, "_render_direct", recording)
    result = run_fit(iter_fit_coefficients(model, scene.aggregated_scene(), views, 0, check_view=True))
    assert len(passes) > 2 and max(passes) <= 600
    camera, photo = data.views[ids[2]].camera, data.load_image(ids[2])
    with torch.no_grad():
        windowed = scene.renderer("cpu").render(camera, max_pixels=600)
        whole = scene.renderer("cpu").render(camera)
    assert abs(psnr_of(windowed, photo) - psnr_of(whole, photo)) > 0.01  # the windows are seen in the score
    assert result.check.psnr_unfitted == pytest.approx(psnr_of(windowed, photo), abs=1e-3)


def test_a_fit_whose_kept_photo_render_is_not_finite_is_dropped_and_said_so(four_views, tmp_path, monkeypatch):
    """A fitted render that scores NaN (not finite) loses to the unfitted scene, and the line
    says why in words, not as 'nan dB'."""
    folder, bundle = four_views
    calls = real_scores_with_one_changed(monkeypatch, 2, lambda _: math.nan)  # the fitted model's render
    job = BundleFit(bundle, load_scene(folder), steps=2, check_view=True)
    while not job.step():
        pass
    assert len(calls) == 2 and math.isfinite(calls[0])
    out = str(tmp_path / "fitted.npbgpp")
    saved = job.save(out)
    check = saved.metadata["fit"]["check"]
    assert check["kept"] == "unfitted" and check["psnr_fitted"] is None and saved.kind == "npbgpp"
    assert job.outcome() == (f"kept the unfitted scene: the fit's render of held-apart photo {check['name']} "
                             "was not finite")


class FixedRender(torch.nn.Module):
    """A stand-in model whose inference render is a given image: a render the real model's
    clamp to [0, 1] never gives (values far out of range, infinite, NaN)."""

    def __init__(self, image: torch.Tensor) -> None:
        super().__init__()
        self.image = image
        self.device = torch.device("cpu")

    def render(self, points: torch.Tensor, camera) -> torch.Tensor:
        return self.image.clone()


def test_a_render_whose_error_is_not_finite_scores_nan(four_views):
    """An overflowing render (squared error beyond float32: mse inf) or an infinite or NaN
    pixel scores NaN, a render not finite, instead of raising 'math domain error'
    (log10 of 1 / inf); a NaN on a pixel outside the mask does not count (the score is that
    of the valid pixels, 20 dB for an error of 0.1 on each)."""
    folder, _ = four_views
    data = load_scene(folder)
    i = data.train[0]
    photo = data.load_image(i)
    views = fitting.FitViews(photo[None], [data.views[i].camera])
    points = torch.zeros(1, 3)
    for render in (photo + 1e20, photo.clone().index_put_((torch.tensor(0),) * 3, torch.tensor(math.inf)),
                   photo.clone().index_put_((torch.tensor(0),) * 3, torch.tensor(math.nan))):
        assert math.isnan(fitting.view_psnr(FixedRender(render), points, views, 0))
    mask = torch.ones(1, 1, *photo.shape[-2:])
    mask[..., 0, 0] = 0.0  # the top-left pixel is not valid; the bottom-right one is, so the extent is the photo's
    masked = fitting.FitViews(photo[None], [data.views[i].camera], mask)
    off = (photo + 0.1).index_put_((torch.arange(3), torch.tensor(0), torch.tensor(0)), torch.tensor(math.nan))
    assert fitting.view_psnr(FixedRender(off), points, masked, 0) == pytest.approx(20.0, abs=1e-4)


def test_a_fit_whose_kept_photo_render_overflows_is_dropped_as_not_finite(four_views, monkeypatch):
    """A fitted model whose render of the kept photo overflows (its pixels made 1e30 times
    larger after the fit) scores NaN and the check drops it as a broken render."""
    folder, bundle = four_views
    data, scene, model, ids = _fitting_setup(folder, bundle)
    views = padded_fit_views([data.load_image(i) for i in ids], [data.views[i].camera for i in ids])
    from npbgpp_core.models.npbg import NPBG

    real = NPBG.render
    scorings: list[int] = []

    def overflowing_after_the_fit(self, *args, **kwargs):
        scorings.append(1)
        return real(self, *args, **kwargs) * (1.0 if len(scorings) == 1 else 1e30)

    monkeypatch.setattr(NPBG, "render", overflowing_after_the_fit)  # the fit's model is an NPBG
    result = run_fit(iter_fit_coefficients(model, scene.aggregated_scene(), views, 1, crop=16, check_view=True))
    assert len(scorings) == 2 and math.isfinite(result.check.psnr_unfitted)
    assert math.isnan(result.check.psnr_fitted) and result.check.kept == "unfitted"
    assert result.check.render_not_finite


def test_a_kept_photo_the_unfitted_scene_cannot_score_keeps_the_fit(four_views, monkeypatch):
    """An unfitted score of NaN (a photo with no valid pixel to judge on) cannot judge the
    fit: the fit is kept and the line says the photo could not be scored."""
    folder, bundle = four_views
    calls = real_scores_with_one_changed(monkeypatch, 1, lambda _: math.nan)  # the unfitted scene's render
    job = BundleFit(bundle, load_scene(folder), steps=2, check_view=True)
    while not job.step():
        pass
    assert len(calls) == 2 and job.check()["kept"] == "fitted" and job.fitted_scene().kind == "coefficients"
    assert job.outcome() == f"kept the fit: held-apart photo {job.check()['name']} could not be scored"


def without_kept_photo(folder: str, out: str) -> str:
    """A copy of ``folder`` whose training split lacks the photo a check keeps apart (index 2
    of 4): the dataset the worker's own Aggregate reads for a scene built without it."""
    import json
    import shutil

    shutil.copytree(folder, out)
    path = os.path.join(out, "transforms_train.json")
    with open(path) as f:
        meta = json.load(f)
    meta["frames"] = [frame for k, frame in enumerate(meta["frames"]) if k != 2]
    with open(path, "w") as f:
        json.dump(meta, f)
    return out


@pytest.fixture(scope="module")
def bundle_without_kept(four_views, tmp_path_factory):
    """The worker's Aggregate of the four-view scene without its kept photo (a reference
    the fair check's aggregation is compared against)."""
    folder, _ = four_views
    root = tmp_path_factory.mktemp("fair")
    other = without_kept_photo(folder, str(root / "scene_without"))
    bundle = str(root / "agg_without.npbgpp")
    aggregate_with_worker(other, bundle)
    return bundle


def test_the_fair_check_scores_the_scene_aggregate_builds_without_the_kept_photo(four_views, bundle_without_kept):
    """fair_check's unfitted score of the kept photo is that of the bundle the worker's
    Aggregate writes from the dataset without it (not that of the full bundle, which has
    seen it), and a zero-step fit from it renders as that bundle."""
    folder, bundle = four_views
    data, scene, model, ids = _fitting_setup(folder, bundle)
    views = padded_fit_views([data.load_image(i) for i in ids], [data.views[i].camera for i in ids])
    result = run_fit(iter_fit_coefficients(model, scene.aggregated_scene(), views, 0, check_view=True,
                                           fair_check=True))
    camera, photo = data.views[ids[2]].camera, data.load_image(ids[2])
    reference = NeuralScene.load(bundle_without_kept)
    with torch.no_grad():
        without = reference.renderer("cpu").render(camera)
        full = scene.renderer("cpu").render(camera)
        fair = result.model.render(scene.points, camera)
    check = result.check
    assert check.view == 2 and check.aggregated_without and check.kept == "fitted"  # a tie keeps the fit
    assert check.psnr_unfitted == pytest.approx(psnr_of(without, photo), abs=1e-3)
    assert abs(psnr_of(full, photo) - check.psnr_unfitted) > 0.01  # the full bundle, having seen it, differs
    torch.testing.assert_close(fair, without, atol=1e-4, rtol=0)
    assert check.as_dict()["aggregated_without"] is True and check.as_dict()["aggregate_s"] >= 0


def test_the_kept_photo_s_pixels_do_not_touch_the_fair_aggregation(four_views):
    """Changing the kept photo's pixels (here inverting them) leaves the scene the fair check
    scores unfitted unchanged; without fair_check the unfitted scene is the full aggregation,
    which changes with them (so this test can tell the two apart)."""
    folder, bundle = four_views
    data, scene, model, ids = _fitting_setup(folder, bundle)
    images = [data.load_image(i) for i in ids]
    cameras = [data.views[i].camera for i in ids]
    changed = list(images)
    changed[2] = 1.0 - images[2]
    camera = cameras[2]
    renders = {}
    for name, photos in (("photo", images), ("inverted", changed)):
        views = padded_fit_views(photos, cameras)
        stack = torch.stack([views.image(k) for k in range(len(views.cameras))])
        agg = model.aggregate(scene.points, stack, views.cameras)  # every photo, the kept one too
        for fair in (True, False):
            fit = run_fit(iter_fit_coefficients(model, agg, views, 0, check_view=True, fair_check=fair))
            with torch.no_grad():
                renders[name, fair] = fit.model.render(scene.points, camera)
    assert torch.equal(renders["photo", True], renders["inverted", True])
    assert (renders["photo", False] - renders["inverted", False]).abs().max() > 0.01


def test_a_fair_fit_that_loses_saves_the_source_bundle_unchanged(four_views, bundle_without_kept, tmp_path,
                                                                  monkeypatch):
    """A fit driven to lose under the fair check saves the full source bundle (not the scene
    aggregated without the kept photo): it renders exactly as the source; the unfitted score
    is that of the aggregation without the photo."""
    folder, bundle = four_views
    data = load_scene(folder)
    monkeypatch.setattr(fitting, "coefficients_ft_loss", inverted_loss)
    job = BundleFit(bundle, data, steps=20, check_view=True, fair_check=True)
    assert job.total == 22
    while not job.step():
        pass
    out = str(tmp_path / "fitted.npbgpp")
    saved, source = job.save(out), NeuralScene.load(bundle)
    check = NeuralScene.load(out).metadata["fit"]["check"]
    assert check["kept"] == "unfitted" and check["aggregated_without"] is True and saved.kind == "npbgpp"
    kept_id = list(data.train)[2]
    camera = data.views[kept_id].camera
    with torch.no_grad():
        assert torch.equal(NeuralScene.load(out).renderer("cpu").render(camera), source.renderer("cpu").render(camera))
        without = NeuralScene.load(bundle_without_kept).renderer("cpu").render(camera)
        back = job.result.model.render(source.points, camera)  # the full aggregation's unfitted model
        full = source.renderer("cpu").render(camera)
    assert check["psnr_unfitted"] == pytest.approx(psnr_of(without, data.load_image(kept_id)), abs=0.01)
    torch.testing.assert_close(back, full, atol=1e-4, rtol=0)


def test_a_fair_fit_that_wins_is_saved_from_the_aggregation_without_the_photo(four_views, bundle_without_kept,
                                                                              tmp_path, monkeypatch):
    """A fit that wins under the fair check (here one step of a fit whose fitted score is
    raised by 10 dB: on this tiny scene 30-60 real steps from the aggregation without the
    kept photo still lose on it) saves the fit, which started from that aggregation: one
    step away from the bundle Aggregate writes without the photo, further from the full one."""
    folder, bundle = four_views
    data = load_scene(folder)
    calls = real_scores_with_one_changed(monkeypatch, 2, lambda score: score + 10.0)  # the fit 10 dB ahead
    out = str(tmp_path / "fitted.npbgpp")
    result = fit_bundle(bundle, data, out, steps=1, check_view=True, fair_check=True, weights="")
    saved = NeuralScene.load(out)
    check = saved.metadata["fit"]["check"]
    assert result.check.kept == check["kept"] == "fitted" and saved.kind == "coefficients"
    assert check["aggregated_without"] is True and check["psnr_fitted"] == pytest.approx(calls[1] + 10, abs=1e-3)
    camera = data.views[list(data.train)[2]].camera
    with torch.no_grad():
        fitted = saved.renderer("cpu").render(camera)
        without = NeuralScene.load(bundle_without_kept).renderer("cpu").render(camera)
        full = NeuralScene.load(bundle).renderer("cpu").render(camera)
    assert (fitted - without).abs().mean() < (fitted - full).abs().mean()


def test_fair_check_needs_a_checked_fit_and_a_bool(four_views):
    folder, bundle = four_views
    data = load_scene(folder)
    with pytest.raises(ValueError, match="fair_check .* needs check_view"):
        BundleFit(bundle, data, steps=1, check_view=False, fair_check=True)
    with pytest.raises(ValueError, match="fair_check must be True or False, got 'yes'"):
        BundleFit(bundle, data, steps=1, check_view=True, fair_check="yes")
    assert not BundleFit(bundle, data, steps=1, check_view=False).fair_check  # the default follows the check


def test_a_tolerance_without_the_check_is_refused_unless_it_is_the_default(four_views):
    """A tolerance the fit would ignore (no view kept apart) is a ValueError naming it and what it
    needs, from the library's fit, its recipe check and BundleFit alike, before any step; the
    default tolerance, which every caller passes when it sets none, is no error, unless the caller
    says it was set (checked_fit_options' tolerance_given, what the fit command passes)."""
    folder, bundle = four_views
    data, scene, model, ids = _fitting_setup(folder, bundle)
    views = padded_fit_views([data.load_image(i) for i in ids], [data.views[i].camera for i in ids])
    says = re.escape("check_tolerance 1 is how many dB the fit may lose on the view a check keeps apart; without "
                     "the check no view is kept apart: it needs check_view=True")
    with pytest.raises(ValueError, match=f"^{says}$"):
        iter_fit_coefficients(model, scene.aggregated_scene(), views, 1, check_tolerance=1)
    with pytest.raises(ValueError, match=f"^{says}$"):
        fitting.coefficients_recipe(check_view=False, check_tolerance=1)
    with pytest.raises(ValueError, match=f"^{says}$"):
        BundleFit(bundle, data, steps=1, check_view=False, check_tolerance=1)
    with pytest.raises(ValueError, match="check_tolerance 0.0 is how many dB .* needs check_view=True$"):
        BundleFit(bundle, data, steps=1, check_view=False, check_tolerance=0.0)
    assert fitting.coefficients_recipe(check_tolerance=fitting.CHECK_TOLERANCE_DB).check_tolerance == 0.5
    # a caller that can tell a tolerance set from none (a command line) has the default refused too, alike
    with pytest.raises(ValueError, match=re.escape("check_tolerance 0.5 is how many dB the fit may lose on the view")):
        fitting.checked_fit_options(False, False, 0.5, (), tolerance_given=True)
    assert fitting.checked_fit_options(False, False, 0.5, (), tolerance_given=False) == (0.5, ())
    assert not BundleFit(bundle, data, steps=1, check_view=False, check_tolerance=0.5).checked
    assert not BundleFit(bundle, data, steps=1, check_view=False).checked


def test_a_fair_check_s_first_step_says_it_aggregates_without_the_kept_photo(four_views):
    """BundleFit.doing, step by step: the fair check's first step aggregates and scores, the
    fitting step says nothing, the last scores; once finished nothing."""
    folder, bundle = four_views
    job = BundleFit(bundle, load_scene(folder), steps=1, check_view=True, fair_check=True)
    doing = [job.doing]
    while not job.step():
        doing.append(job.doing)
    assert doing == ["aggregating without the kept photo, then scoring it", "", "scoring the kept photo"]
    assert job.doing == ""


@pytest.mark.parametrize(("after", "tolerance", "kept"), [
    (19.75, 0.5, "fitted"),     # 0.25 dB below: within the tolerance
    (19.5, 0.5, "fitted"),      # exactly the tolerance below (exact in binary): kept
    (19.25, 0.5, "unfitted"),   # 0.75 dB below: more than the tolerance
    (19.75, 0.0, "unfitted"),   # no tolerance: any loss drops the fit, as before it had one
    (20.0, 0.0, "fitted"),      # a tie keeps the fit
    (18.0, 2.5, "fitted"),
])
def test_the_tolerance_decides_a_losing_fit(four_views, monkeypatch, after, tolerance, kept):
    """The fit is dropped only when it scores more than ``check_tolerance`` dB below the unfitted
    scene on the kept photo (scores set here: unfitted 20 dB); a dropped fit is put back to the
    unfitted model, a kept one is not."""
    folder, bundle = four_views
    data, scene, model, ids = _fitting_setup(folder, bundle)
    views = padded_fit_views([data.load_image(i) for i in ids], [data.views[i].camera for i in ids])
    monkeypatch.setattr(fitting, "view_psnr", kept_photo_scores(20.0, after))
    with torch.no_grad():
        source = scene.renderer("cpu").render(data.views[ids[0]].camera)
    result = run_fit(iter_fit_coefficients(model, scene.aggregated_scene(), views, 3, crop=16,
                                           check_view=True, check_tolerance=tolerance))
    assert result.check.kept == kept and result.check.tolerance == tolerance
    assert result.check.as_dict()["tolerance_db"] == tolerance
    with torch.no_grad():
        render = result.model.render(scene.points, data.views[ids[0]].camera)
    assert ((render - source).abs().max() < 1e-4) == (kept == "unfitted")


def test_a_fit_kept_within_the_tolerance_says_so(four_views, monkeypatch):
    """The default tolerance (CHECK_TOLERANCE_DB) keeps a fit 0.07 dB below the unfitted scene
    and the line says it lost, and by how much it could have."""
    folder, bundle = four_views
    monkeypatch.setattr(fitting, "view_psnr", kept_photo_scores(20.91, 20.84))
    job = BundleFit(bundle, load_scene(folder), steps=2, check_view=True)
    while not job.step():
        pass
    name = job.check()["name"]
    assert job.check()["kept"] == "fitted" and job.fitted_scene().kind == "coefficients"
    assert job.outcome() == f"kept the fit: -0.07 dB (within the 0.50 dB the check allows) on held-apart photo {name}"
    monkeypatch.setattr(fitting, "view_psnr", kept_photo_scores(20.0, 20.5))
    job = BundleFit(bundle, load_scene(folder), steps=1, check_view=True, check_tolerance=1)
    while not job.step():
        pass
    assert job.outcome() == f"kept the fit: +0.50 dB on held-apart photo {name}"  # a gain needs no allowance
    monkeypatch.setattr(fitting, "view_psnr", kept_photo_scores(20.0, 19.0))
    job = BundleFit(bundle, load_scene(folder), steps=1, check_view=True, check_tolerance=0)
    while not job.step():
        pass
    assert job.outcome() == f"kept the unfitted scene: the fit scored 1.00 dB below it on held-apart photo {name}"


def test_a_non_finite_fitted_score_loses_whatever_the_tolerance(four_views, monkeypatch):
    folder, bundle = four_views
    data, scene, model, ids = _fitting_setup(folder, bundle)
    views = padded_fit_views([data.load_image(i) for i in ids], [data.views[i].camera for i in ids])
    monkeypatch.setattr(fitting, "view_psnr", kept_photo_scores(20.0, math.nan))
    result = run_fit(iter_fit_coefficients(model, scene.aggregated_scene(), views, 1, crop=16, check_view=True,
                                           check_tolerance=100.0))
    assert result.check.kept == "unfitted"


@pytest.mark.parametrize(("bad", "says"), [
    (-0.1, "must be a finite number of dB >= 0, got -0.1"),
    (math.nan, "must be a finite number of dB >= 0, got nan"),
    (math.inf, "must be a finite number of dB >= 0, got inf"),
    ("0.5", "must be a number of dB, got '0.5'"),
    (True, "must be a number of dB, got True"),
    (None, "must be a number of dB, got None"),
])
def test_a_bad_tolerance_is_refused_before_any_step(four_views, bad, says):
    folder, bundle = four_views
    data, scene, model, ids = _fitting_setup(folder, bundle)
    views = padded_fit_views([data.load_image(i) for i in ids], [data.views[i].camera for i in ids])
    with pytest.raises(ValueError, match="check_tolerance " + re.escape(says)):
        iter_fit_coefficients(model, scene.aggregated_scene(), views, 1, check_view=True, check_tolerance=bad)
    if bad is not None:  # None is BundleFit's "the default"
        with pytest.raises(ValueError, match="check_tolerance " + re.escape(says)):
            BundleFit(bundle, data, steps=1, check_tolerance=bad)
