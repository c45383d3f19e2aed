"""Fit to Photos in the core and the worker: an aggregated bundle fitted to its dataset's
views becomes a fitted bundle that the ordinary bundle reader renders exactly as the fit's
own model does; the worker's job counts its steps, and cancelling writes nothing."""

from __future__ import annotations

import json
import os

import pytest
import torch
from _train_fixtures import aggregate_with_worker, make_tiny_scene

from npbgpp_core import protocol as P
from npbgpp_core.datasets import load_scene
from npbgpp_core.scene import NeuralScene
from npbgpp_core.scene_fit import BundleFit, fit_bundle
from npbgpp_core.service import RenderService


@pytest.fixture(scope="module")
def aggregated(tmp_path_factory):
    """A tiny cut-out scene (3 training views, one test view) and its aggregated bundle,
    written by the worker's own Aggregate job with the bundled network."""
    root = tmp_path_factory.mktemp("fit")
    folder = make_tiny_scene(str(root / "scene"), views=4, size=32, n_points=200, splits=(3, 0, 1))
    bundle = str(root / "agg.npbgpp")
    aggregate_with_worker(folder, bundle)
    return folder, bundle


def test_fitted_bundle_renders_as_the_fit(aggregated, tmp_path):
    """load -> render of the fitted bundle equals the FitResult's model's render of a
    held-out camera; the fitted coefficients moved from the aggregated ones; the old
    (aggregated) bundle still loads and renders differently."""
    folder, bundle = aggregated
    data = load_scene(folder)
    out = str(tmp_path / "fitted.npbgpp")
    torch.manual_seed(0)
    result = fit_bundle(bundle, data, out, steps=3, check_view=False)  # the fitted path (test_fit_check: the check)
    assert result.steps == 3 and len(result.losses) == 3
    fitted = NeuralScene.load(out)
    assert fitted.kind == "coefficients" and fitted.metadata["fit"]["steps"] == 3
    assert fitted.model_config["align_during_rendering"] is True  # the library's fits' default
    assert fitted.metadata["fit"]["source"] == "agg.npbgpp" and fitted.metadata["dataset"] == str(data.root)
    source = NeuralScene.load(bundle)
    assert torch.equal(fitted.points, source.points) and torch.equal(fitted.valid, source.valid)
    n, rows, c = source.features.shape
    assert not torch.allclose(fitted.features, source.features.reshape(n, rows * c))
    camera = data.views[list(data.test)[0]].camera
    with torch.no_grad():
        want = result.model.render(source.points, camera)
        got = fitted.renderer("cpu").render(camera)
        before = source.renderer("cpu").render(camera)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got - before).abs().max() > 1e-3  # the fit changed the image
    # Refitting a fitted bundle is refused, naming the file.
    with pytest.raises(ValueError, match="fitted.npbgpp.*already fitted"):
        BundleFit(out, data, steps=3)


@pytest.mark.parametrize("aligned", [False, True])
def test_fit_bundle_takes_the_upright_choice(aggregated, tmp_path, aligned):
    """fit_bundle had no ``aligned`` while the add-on's Fit to Photos chose it (FitBegin /
    BundleFit): the library entry point now takes it the same way, and the saved bundle
    records it."""
    folder, bundle = aggregated
    out = str(tmp_path / "fitted.npbgpp")
    fit_bundle(bundle, load_scene(folder), out, steps=1, aligned=aligned, check_view=False)
    assert NeuralScene.load(out).model_config["align_during_rendering"] is aligned


def test_malformed_refiner_weight_and_bad_steps_are_refused(aggregated, tmp_path):
    folder, bundle = aggregated
    data = load_scene(folder)
    out = str(tmp_path / "fitted.npbgpp")
    fit_bundle(bundle, data, out, steps=1)
    scene = NeuralScene.load(out)
    key = next(k for k in scene.model_state if k.startswith("refiner.") and scene.model_state[k].ndim == 4)
    scene.model_state[key] = scene.model_state[key][:, :1].clone()  # too few input channels
    bad = str(tmp_path / "bad.npbgpp")  # written by hand: NeuralScene.save would not check it
    from safetensors.torch import save

    header = {"format": "npbgpp-neural-scene", "format_version": "1", "kind": scene.kind,
              "model_config": json.dumps(scene.model_config),
              "metadata": json.dumps(scene.metadata)}
    with open(bad, "wb") as f:
        f.write(save(scene._tensors(), metadata=header))
    with pytest.raises(ValueError, match=rf"bad.npbgpp.*model\.{key}"):
        NeuralScene.load(bad)
    other = make_tiny_scene(str(tmp_path / "other"), views=2, size=32, n_points=50, splits=(2, 0, 0))
    with pytest.raises(ValueError, match=r"agg.npbgpp was aggregated from the dataset .*, not .*other"):
        BundleFit(bundle, load_scene(other), steps=1)
    for steps in (0, -5, 2.5, "200", True, 10**9):
        with pytest.raises(ValueError, match="fit steps must be an integer"):
            BundleFit(bundle, data, steps=steps)
    with pytest.raises(ValueError, match="would replace the bundle"):
        job = BundleFit(bundle, data, steps=1)
        while not job.step():
            pass
        job.save(bundle)


def test_worker_fit_job_counts_steps_and_cancel_writes_nothing(aggregated, tmp_path):
    folder, bundle = aggregated
    service = RenderService()
    out = str(tmp_path / "job.npbgpp")
    first = service.handle(P.FitBegin(bundle, folder, steps=4, device="CPU"))
    assert isinstance(first, P.FitProgress), first
    # checked by default (3 training views): the two scoring renders count as steps
    assert (first.done, first.total, first.finished) == (0, 6, False)
    early = service.handle(P.FitFinish(out))
    assert isinstance(early, P.Failure) and "not finished" in early.error and not os.path.exists(out)
    seen = [first.done]
    while True:
        progress = service.handle(P.FitStep(seconds=0.0))  # one step each
        assert isinstance(progress, P.FitProgress), progress
        seen.append(progress.done)
        if progress.finished:
            break
    assert seen == [0, 1, 2, 3, 4, 5, 6]
    done = service.handle(P.FitFinish(out))
    assert isinstance(done, P.FitResultInfo), done
    assert done.path == out and done.steps == 4 and NeuralScene.load(out).metadata["fit"]["steps"] == 4
    gone = service.handle(P.FitStep())
    assert isinstance(gone, P.Failure) and "no fit running" in gone.error
    # Cancel halfway: nothing written, the job is gone.
    cancelled = str(tmp_path / "cancelled.npbgpp")
    assert isinstance(service.handle(P.FitBegin(bundle, folder, steps=4, device="CPU")), P.FitProgress)
    assert service.handle(P.FitStep(seconds=0.0)).done == 1
    assert service.handle(P.FitCancel()) == P.Done()
    assert isinstance(service.handle(P.FitFinish(cancelled)), P.Failure) and not os.path.exists(cancelled)
    assert not [n for n in os.listdir(tmp_path) if n.startswith("cancelled")]
    # Bad inputs name what is wrong.
    missing = service.handle(P.FitBegin(str(tmp_path / "nope.npbgpp"), folder, device="CPU"))
    assert isinstance(missing, P.Failure) and "nope.npbgpp" in missing.error
    zero = service.handle(P.FitBegin(bundle, folder, steps=0, device="CPU"))
    assert isinstance(zero, P.Failure) and "fit steps" in zero.error


def test_a_bundle_exported_by_headless_train_is_fitted_only_to_its_own_dataset(tmp_path):
    """`headless_train export` recorded its scene as 'scene_root', Aggregate as 'dataset', and
    the fit's check (another scene's photos would silently ruin the bundle) reads 'dataset':
    an exported bundle was fitted to any dataset without a word."""
    from headless_train.export import main as export_main
    from npbgpp_core.pretrained import default_weights_path

    mine = make_tiny_scene(str(tmp_path / "mine"), views=4, size=32, n_points=200, splits=(3, 0, 1))
    other = make_tiny_scene(str(tmp_path / "other"), views=4, size=32, n_points=150, seed=5, splits=(3, 0, 1))
    out = str(tmp_path / "cli.npbgpp")
    assert export_main(["--checkpoint", default_weights_path("npbgpp", "object"), "--scene", mine, "--out", out,
                        "--device", "cpu"]) == 0
    meta = NeuralScene.load(out).metadata
    assert meta["dataset"] == os.path.abspath(mine) and meta["domain"] == "object"
    with pytest.raises(ValueError, match=r"cli.npbgpp was aggregated from the dataset .*mine, not .*other"):
        BundleFit(out, load_scene(other), steps=1)
    assert BundleFit(out, load_scene(mine), steps=1).weights == default_weights_path("npbgpp", "object")
    # a bundle exported before export wrote "dataset" names it "scene_root"
    old = NeuralScene.load(out)
    old.metadata = {k: v for k, v in old.metadata.items() if k not in ("dataset", "domain")}
    old.metadata["scene_root"] = os.path.abspath(mine)
    old.save(str(tmp_path / "old.npbgpp"))
    with pytest.raises(ValueError, match=r"old.npbgpp was aggregated from the dataset .*mine, not .*other"):
        BundleFit(str(tmp_path / "old.npbgpp"), load_scene(other), steps=1)


def test_a_bundle_exported_from_a_training_run_fits_with_that_run_s_network(tmp_path):
    """The fit needs the encoder of the network a bundle was aggregated with. A bundle that
    `headless_train export` made from a run's checkpoint was refused ('aggregated with
    another NPBG++ network than npbgpp_sphere.safetensors') unless that file was named;
    the bundle records it, and the fit now takes it."""
    from headless_train.checkpoints import _file_checkpoint
    from headless_train.export import main as export_main
    from npbgpp_core.models import NPBGPlusPlus, NPBGPlusPlusConfig

    mine = make_tiny_scene(str(tmp_path / "mine"), views=4, size=32, n_points=200, splits=(3, 0, 1))
    torch.manual_seed(0)
    config = NPBGPlusPlusConfig(world_up=(0.0, 0.0, 1.0), input_canvas="bounds")  # not the bundled files' config
    model = NPBGPlusPlus(config)
    ckpt = _file_checkpoint("run.ckpt", "npbgpp", "model.", model.state_dict(), config.to_dict())
    ckpt_path = str(tmp_path / "last.ckpt")
    torch.save(ckpt, ckpt_path)
    out = str(tmp_path / "run.npbgpp")
    assert export_main(["--checkpoint", ckpt_path, "--scene", mine, "--out", out, "--device", "cpu"]) == 0
    job = BundleFit(out, load_scene(mine), steps=1)
    assert job.weights == ckpt_path


def test_out_of_memory_in_aggregate_or_fit_names_the_photos_not_the_frame(aggregated, monkeypatch):
    """Aggregate and Fit read every photo at its own size: running out of memory there names the
    largest photo and a copy with smaller photos (BENCHMARKS.md, A user's capture with big
    photos), not the F12 frame's Resolution % a render's failure suggests; the service goes on."""
    import npbgpp_core.scene_fit as scene_fit

    folder, bundle = aggregated
    data = load_scene(folder)
    h, w = max((tuple(v.camera.image_size) for v in data.views), key=lambda hw: hw[0] * hw[1])

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 15.00 GiB")

    service = RenderService()
    assert isinstance(service.handle(P.AggregateBegin(folder, "", device="CPU")), P.AggregationStarted)
    monkeypatch.setattr(service.aggregation.state, "add_views", oom)
    failed = service.handle(P.AggregateView(0))
    assert isinstance(failed, P.Failure)
    assert failed.error.startswith("out of memory on cpu while aggregating descriptors (CUDA out of memory.")
    assert f"The largest photo is {w}x{h} pixels" in failed.error and "--max-size 2048" in failed.error
    assert "Resolution %" not in failed.error
    assert service.handle(P.AggregateCancel()) == P.Done()

    assert isinstance(service.handle(P.FitBegin(bundle, folder, steps=4, device="CPU")), P.FitProgress)
    monkeypatch.setattr(service.fit, "step", oom)
    failed = service.handle(P.FitStep(seconds=0.0))
    assert isinstance(failed, P.Failure)
    assert failed.error.startswith("out of memory on cpu while fitting to the photos (CUDA out of memory.")
    assert f"The largest photo is {w}x{h} pixels" in failed.error and "Resolution %" not in failed.error
    # a smaller copy is another dataset: the fit's bundle does not fit it, its own aggregation does
    assert "smaller photos, aggregate it and fit that bundle (a COLMAP capture" in failed.error
    assert "switch Device to CPU" not in failed.error  # it ran on the CPU already
    service.fit.device = "cuda"  # a job on a GPU: moving it to the CPU is advice too
    failed = service.handle(P.FitStep(seconds=0.0))
    assert failed.error.startswith("out of memory on cuda while fitting to the photos")
    assert failed.error.endswith("--max-size 2048), or switch Device to CPU when the GPU is the one that is full")
    assert service.handle(P.FitCancel()) == P.Done()

    # out of memory while the fit reads the photos: no job yet, the device asked for
    monkeypatch.setattr(scene_fit, "BundleFit", oom)
    failed = service.handle(P.FitBegin(bundle, folder, steps=4, device="CPU"))
    assert isinstance(failed, P.Failure)
    assert failed.error.startswith("out of memory on cpu while fitting to the photos (CUDA out of memory.")
    assert "largest photo" not in failed.error and "prepare-capture" in failed.error
    monkeypatch.undo()
    assert isinstance(service.handle(P.FitBegin(bundle, folder, steps=4, device="CPU")), P.FitProgress)


def test_out_of_memory_in_densify_or_loading_a_bundle_names_no_frame(aggregated, monkeypatch):
    """Densify Points holds every view it matches: running out of memory there names its own
    Image Scale and Max Views, not the F12 frame's Resolution %; finishing an aggregation has no
    frame either. Neither suggests switching to the CPU the job runs on; the service goes on."""
    folder, bundle = aggregated

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 15.00 GiB")

    service = RenderService()
    assert isinstance(service.handle(P.DensifyBegin(folder, device="CPU")), P.DensifyProgress)
    monkeypatch.setattr(service.densify, "step", oom)
    failed = service.handle(P.DensifyStep(seconds=0.0))
    assert isinstance(failed, P.Failure)
    assert failed.error == ("out of memory on cpu while densifying points (CUDA out of memory. Tried to allocate "
                            "15.00 GiB). Densify Points holds every view it matches: lower its Image Scale or Max "
                            "Views")
    assert service.handle(P.DensifyCancel()) == P.Done()

    assert isinstance(service.handle(P.AggregateBegin(folder, "", device="CPU")), P.AggregationStarted)
    monkeypatch.setattr(service.aggregation, "finish", oom)
    failed = service.handle(P.AggregateFinish(os.path.join(os.path.dirname(bundle), "never.npbgpp")))
    assert isinstance(failed, P.Failure)
    assert failed.error == ("out of memory on cpu while finishing Aggregate Descriptors (CUDA out of memory. Tried "
                            "to allocate 15.00 GiB)")  # the add-on's words, not the request's name
    monkeypatch.undo()
    assert isinstance(service.handle(P.LoadBundle(bundle, "CPU")), P.BundleInfo)
