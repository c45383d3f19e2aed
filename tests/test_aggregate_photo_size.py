"""Aggregate's Photo Size (AggregateBegin.max_side, ``headless_train export --max-side``): each
photo read at most that long side with its camera scaled alike, recorded in the bundle as
"aggregate_max_side", and a fit's fair check aggregating again at the side recorded. The
references are hand aggregations of the loader's photos read at a hand-computed size."""

from __future__ import annotations

import re

import pytest
import torch
from _train_fixtures import aggregate_with_worker, make_tiny_scene

from npbgpp_core import protocol as P
from npbgpp_core.datasets import load_scene
from npbgpp_core.models.alignment import resolve_world_up
from npbgpp_core.pretrained import default_weights_path, load_pretrained_npbgpp
from npbgpp_core.scene import NeuralScene
from npbgpp_core.service import RenderService

REFUSED = "must be 0 (each photo at its own size) or a whole number of pixels of at least 16, got"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny cut-out scene of 32x32 photos: 4 training views, one test view."""
    root = tmp_path_factory.mktemp("photo_size")
    return make_tiny_scene(str(root / "scene"), views=5, size=32, n_points=200, splits=(4, 0, 1))


def hand_aggregation(folder: str, size: tuple[int, int] | None, skip: int | None = None):
    """The bundled network's aggregation of the training views, each photo read by the loader at
    ``size`` (None: its own) with its camera scaled to it, one view at a time; up +z as the
    worker's POS_Z. ``skip``: a training view (position in the train list) left out."""
    data = load_scene(folder)
    ids = [i for k, i in enumerate(data.train) if k != skip]
    model = load_pretrained_npbgpp(default_weights_path("npbgpp", "object"),
                                   world_up=resolve_world_up("POS_Z", [data.views[i].camera for i in data.train]))
    with torch.no_grad():
        state = model.begin_scene(torch.from_numpy(data.points).float())
        for i in ids:
            image = data.load_image(i) if size is None else data.load_image(i, size)
            camera = data.views[i].camera if size is None else data.camera(i, size)
            state.add_views(image[None], [camera])
        return state.finish()


def aggregated(folder: str, out: str, **begin) -> tuple[P.AggregationStarted, NeuralScene]:
    started = aggregate_with_worker(folder, out, **begin)
    return started, NeuralScene.load(out)


def test_a_capped_aggregation_reads_shrunk_photos_and_records_the_cap(folder, tmp_path):
    """Photo Size 16 on 32-px photos: the bundle is, bit for bit, the hand aggregation of the
    photos the loader reads at 16x16 with cameras scaled alike (20: 20x20), records the cap, and
    differs from the own-size bundle; the worker says what it read."""
    started, capped = aggregated(folder, str(tmp_path / "16.npbgpp"), max_side=16)
    assert (started.max_side, started.largest_side) == (16, 32)
    hand = hand_aggregation(folder, (16, 16))
    assert torch.equal(capped.features, hand.coefficients) and torch.equal(capped.valid, hand.valid)
    assert capped.metadata["aggregate_max_side"] == 16
    _, at20 = aggregated(folder, str(tmp_path / "20.npbgpp"), max_side=20)
    assert torch.equal(at20.features, hand_aggregation(folder, (20, 20)).coefficients)
    _, own = aggregated(folder, str(tmp_path / "own.npbgpp"), max_side=0)
    assert not torch.equal(own.features, capped.features)


def test_photo_size_0_and_photos_within_the_cap_are_read_as_they_are(folder, tmp_path):
    """Photo Size 0 (AggregateBegin's default) is the aggregation of before, bit for bit (the photos
    and cameras as the dataset gives them), recorded as None; a cap at or above the photos' size
    (32, 2048) changes nothing but the record."""
    started, own = aggregated(folder, str(tmp_path / "own.npbgpp"))
    assert (started.max_side, started.largest_side) == (0, 32)
    hand = hand_aggregation(folder, None)
    assert torch.equal(own.features, hand.coefficients) and torch.equal(own.valid, hand.valid)
    assert "aggregate_max_side" in own.metadata and own.metadata["aggregate_max_side"] is None
    for cap in (32, P.AGGREGATE_MAX_SIDE):
        started, bundle = aggregated(folder, str(tmp_path / f"{cap}.npbgpp"), max_side=cap)
        assert started.max_side == cap
        assert torch.equal(bundle.features, own.features) and torch.equal(bundle.valid, own.valid)
        assert bundle.metadata["aggregate_max_side"] == cap


@pytest.mark.parametrize("bad", [-1, 1, 15, True, 16.0, "2048"])
def test_a_photo_size_no_aggregation_can_mean_is_refused_before_any_work(folder, bad):
    """Negative, tiny (below AGGREGATE_MIN_SIDE), or not a whole number: the worker refuses it in
    words naming Photo Size, starts no job and goes on."""
    service = RenderService()
    failed = service.handle(P.AggregateBegin(folder, "", device="CPU", max_side=bad))
    assert isinstance(failed, P.Failure)
    assert failed.error == f"ValueError: Photo Size {REFUSED} {bad!r}"
    assert service.aggregation is None
    assert isinstance(service.handle(P.AggregateBegin(folder, "", device="CPU", max_side=16)), P.AggregationStarted)


def test_check_aggregate_max_side_by_hand():
    """0 and None read at own size (None); 16 and more as given; below 16 or not an int refused."""
    assert P.check_aggregate_max_side(0) is None and P.check_aggregate_max_side(None) is None
    assert P.check_aggregate_max_side(16) == 16 and P.check_aggregate_max_side(4032) == 4032
    with pytest.raises(ValueError, match="^" + re.escape(f"--max-side {REFUSED} 15") + "$"):
        P.check_aggregate_max_side(15, "--max-side")


def test_view_at_long_side_and_shrink_photo_are_the_loader_s_read_at_that_size(folder):
    """SceneData.view_at_long_side(i, N): a 32-px photo at N=16 is load_image(i, (16, 16)) with
    camera(i, (16, 16)); at N >= 32 or None the photo and camera as the dataset gives them. A
    photo read at its own size and shrunk by shrink_photo equals the loader's read at that size."""
    from npbgpp_core.datasets.scene_data import shrink_photo

    data = load_scene(folder)
    for i in range(len(data.views)):
        image, camera = data.view_at_long_side(i, 16)
        assert torch.equal(image, data.load_image(i, (16, 16))) and camera.image_size == (16, 16)
        assert torch.equal(camera.K, data.camera(i, (16, 16)).K)
        for side in (32, 40, None):
            image, camera = data.view_at_long_side(i, side)
            assert torch.equal(image, data.load_image(i)) and camera is data.views[i].camera
        shrunk, cam = shrink_photo(data.load_image(i), data.views[i].camera, 12)
        assert torch.equal(shrunk, data.load_image(i, (12, 12))) and torch.equal(cam.K, data.camera(i, (12, 12)).K)


def test_the_fair_check_aggregates_again_at_the_bundle_s_cap(folder, tmp_path, monkeypatch):
    """aggregation_without(..., max_side=16) from the fit's own-size photos is, bit for bit, the hand
    aggregation of the photos read at 16x16 without the kept one; Fit to Photos' fair check of a bundle
    aggregated at Photo Size 16 aggregates again at 16, of an own-size bundle at own size; the fit's
    photos stay at their own size."""
    from npbgpp_core import fitting
    from npbgpp_core.scene_fit import BundleFit

    data = load_scene(folder)
    views = fitting.read_fit_views(lambda k: data.load_image_pixels(data.train[k]),
                                   [data.views[i].camera for i in data.train])
    k = fitting.check_view_index(len(data.train))
    model = load_pretrained_npbgpp(default_weights_path("npbgpp", "object"),
                                   world_up=resolve_world_up("POS_Z", [data.views[i].camera for i in data.train]))
    points = torch.from_numpy(data.points).float()
    without = fitting.aggregation_without(model, points, views, k, 16)
    hand = hand_aggregation(folder, (16, 16), skip=k)
    assert torch.equal(without.coefficients, hand.coefficients) and torch.equal(without.valid, hand.valid)
    own = fitting.aggregation_without(model, points, views, k)
    assert torch.equal(own.coefficients, hand_aggregation(folder, None, skip=k).coefficients)

    seen = []
    original = fitting.aggregation_without

    def spy(model, points, views, k, max_side=None):
        seen.append((max_side, tuple(views.cameras[0].image_size)))
        return original(model, points, views, k, max_side)

    monkeypatch.setattr(fitting, "aggregation_without", spy)
    for cap, expected in ((16, 16), (0, None)):
        bundle = str(tmp_path / f"{cap}.npbgpp")
        aggregate_with_worker(folder, bundle, max_side=cap)
        job = BundleFit(bundle, data, steps=1, check_view=True, fair_check=True)
        assert job.aggregate_max_side == expected
        while not job.step():
            pass
        assert seen[-1] == (expected, (32, 32))  # the fit's photos: their own size
        assert job.check()["aggregated_without"] is True
    assert len(seen) == 2


def test_a_bundle_recording_a_cap_no_aggregation_writes_is_refused(folder, tmp_path):
    """A bundle whose "aggregate_max_side" is damaged (8, a string) is refused by Fit to Photos with
    its file named, before any photo is read; fit_coefficients refuses such a cap too."""
    from npbgpp_core import fitting
    from npbgpp_core.scene_fit import BundleFit

    good = str(tmp_path / "good.npbgpp")
    aggregate_with_worker(folder, good, max_side=16)
    bundle = NeuralScene.load(good)
    data = load_scene(folder)
    for bad in (8, "16"):
        bundle.metadata["aggregate_max_side"] = bad
        path = str(tmp_path / "bad.npbgpp")
        bundle.save(path)
        with pytest.raises(ValueError) as refused:
            BundleFit(path, data, steps=1)
        assert str(refused.value) == (f"{path}: its aggregate_max_side {REFUSED} {bad!r} (the bundle's metadata is "
                                      "damaged: aggregate the dataset again)")
    model = load_pretrained_npbgpp(default_weights_path("npbgpp", "object"))
    agg = NeuralScene.load(good).aggregated_scene(model.device)
    with pytest.raises(ValueError, match="^" + re.escape(f"aggregate_max_side {REFUSED} 8") + "$"):
        fitting.fit_coefficients(model, agg, (data.load_image(0)[None], [data.views[0].camera]), steps=0,
                                 aggregate_max_side=8)


def test_export_max_side_is_the_workers_photo_size_and_records_it(folder, tmp_path):
    """``export --max-side 16`` of the bundled weights writes the bundle the worker's Aggregate
    writes at Photo Size 16 (same views and up axis), recording 16; unset, None; below 16 or
    negative it is refused in words, with no file written."""
    from headless_train.export import main as export_main

    weights = default_weights_path("npbgpp", "object")
    worker = str(tmp_path / "worker.npbgpp")
    aggregate_with_worker(folder, worker, weights, max_side=16)
    out = str(tmp_path / "export.npbgpp")
    common = ["--checkpoint", weights, "--scene", folder, "--views", "train", "--world-up", "+z", "--device", "cpu"]
    assert export_main([*common, "--out", out, "--max-side", "16"]) == 0
    exported, aggregated_ = NeuralScene.load(out), NeuralScene.load(worker)
    assert torch.equal(exported.features, aggregated_.features) and torch.equal(exported.valid, aggregated_.valid)
    assert exported.metadata["aggregate_max_side"] == 16
    own = str(tmp_path / "own.npbgpp")
    assert export_main([*common, "--out", own]) == 0
    assert NeuralScene.load(own).metadata["aggregate_max_side"] is None


@pytest.mark.parametrize("bad", ["8", "-5"])
def test_export_refuses_a_max_side_below_16(folder, tmp_path, capsys, bad):
    from headless_train.export import main as export_main

    out = tmp_path / "bad.npbgpp"
    assert export_main(["--checkpoint", default_weights_path("npbgpp", "object"), "--scene", folder,
                        "--out", str(out), f"--max-side={bad}", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip() == f"error: --max-side {REFUSED} {bad}"
    assert not out.exists()


def test_out_of_memory_in_aggregate_first_suggests_a_smaller_photo_size(folder, monkeypatch):
    """Out of memory while aggregating names the largest photo, the size it was read at, and first a
    Photo Size below that size, named where the add-on keeps it (the scene setting in Render Properties >
    NPBG++ > Data; export: --max-side), then a copy with smaller photos; at Photo Size 0 (Own Size) it
    says the photos were read at their own size; at the least Photo Size (16, which Aggregate refuses to
    go below) it suggests only the copy, as export does at --max-side 16."""
    service = RenderService()
    for cap, read, smaller in (
            (16, "The largest photo is 32x32 pixels, read at 16x16. Aggregate Descriptors reads every photo at most "
                 "16 px on the long side (the Photo Size setting's 16 px)", None),
            (24, "The largest photo is 32x32 pixels, read at 24x24. Aggregate Descriptors reads every photo at most "
                 "24 px on the long side (the Photo Size setting's 24 px)", "set a Photo Size below 24"),
            (0, "The largest photo is 32x32 pixels. Aggregate Descriptors reads every photo at its own size (the "
                "Photo Size setting's Own Size)", "set a Photo Size below 32"),
            (2048, "The largest photo is 32x32 pixels, read at its own size. Aggregate Descriptors reads every "
                   "photo at most 2048 px on the long side (the Photo Size setting's 2048 px)",
                   "set a Photo Size below 32")):
        assert isinstance(service.handle(P.AggregateBegin(folder, "", device="CPU", max_side=cap)),
                          P.AggregationStarted)

        def oom(*args, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 15.00 GiB")

        monkeypatch.setattr(service.aggregation.state, "add_views", oom)
        failed = service.handle(P.AggregateView(0))
        assert isinstance(failed, P.Failure)
        assert failed.error.startswith("out of memory on cpu while aggregating descriptors (CUDA out of memory.")
        assert read in failed.error, failed.error
        advice = failed.error.split(read)[1]
        if smaller is None:
            assert "Photo Size" not in advice and "--max-side" not in advice, advice
            assert "): import a copy of the dataset with smaller photos" in advice, advice
        else:
            assert advice.index(smaller) < advice.index("prepare-capture"), advice
            assert (f"{smaller} (Render Properties > NPBG++ > Data > Photo Size: Fixed; headless_train export: "
                    "--max-side), or import a copy") in advice, advice
        assert "--max-size 2048" in advice
        assert service.handle(P.AggregateCancel()) == P.Done()


@pytest.mark.parametrize("max_points", [0, 150])
def test_out_of_memory_before_any_photo_is_read_names_the_cloud_and_max_points(folder, monkeypatch, max_points):
    """Aggregate's start reads the cloud and the network and aggregates no photo (AggregateView
    does): out of memory there asks for fewer points (below the Max Points set), never a smaller
    Photo Size; the service goes on and aggregates afterwards."""
    from npbgpp_core import service as service_module

    service = RenderService()
    real = service_module.aggregation_dataset

    def oom(req):
        raise MemoryError("Unable to allocate 30.0 GiB for an array with shape (1000000000, 8) and data type float32")

    monkeypatch.setattr(service_module, "aggregation_dataset", oom)
    failed = service.handle(P.AggregateBegin(folder, "", device="CPU", max_side=2048, max_points=max_points))
    assert isinstance(failed, P.Failure)
    fewer = "a Max Points below 150" if max_points else "a Max Points"
    assert failed.error == (
        "out of memory on cpu while starting Aggregate Descriptors (reading the point cloud and the network), "
        "before aggregating any photo (Unable to allocate 30.0 GiB for an array with shape (1000000000, 8) and "
        "data type float32). It holds every point of the cloud with its descriptor: aggregate fewer points (set "
        f"{fewer} in its options, headless_train export: --max-points, or choose a smaller point cloud) or run it "
        "on a computer with more memory"), failed.error
    assert "Photo Size" not in failed.error and "photos" not in failed.error
    monkeypatch.setattr(service_module, "aggregation_dataset", real)
    assert isinstance(service.handle(P.AggregateBegin(folder, "", device="CPU")), P.AggregationStarted)
    assert service.handle(P.AggregateCancel()) == P.Done()


@pytest.mark.parametrize("width, height, side", [
    (3840, 2160, 3840), (2160, 3840, 3840),  # 4K, landscape or portrait: its own long side
    (1920, 1080, 2048), (64, 48, 2048),  # renders up to 2048 px: the 2048-px cap
    (2048, 2048, 2048), (4096, 1, 4096),
    (8064, 6048, 4096), (4097, 4097, 4096),  # 48 MP and anything above 4096: 4096
])
def test_photo_size_for_render_by_hand(width, height, side):
    """The one rule of Photo Size Follow Render, the add-on's default (its operators.default_photo_size,
    with the size F12 renders at, and bench_big_photos run's): the render's long side within 2048-4096."""
    assert P.photo_size_for_render(width, height) == side


def test_the_docs_state_the_default_photo_size_the_add_on_uses():
    """The READMEs give Photo Size's default as the add-on computes it (operators.default_photo_size):
    the render's long side within protocol.AGGREGATE_MAX_SIDE and AGGREGATE_RENDER_MAX_SIDE, 2048 only
    for renders up to 2048 px; changing either number makes this fail until they follow."""
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def text(path: str) -> str:
        with open(os.path.join(root, path), encoding="utf-8") as f:
            return " ".join(f.read().split())

    side, most = P.AGGREGATE_MAX_SIDE, P.AGGREGATE_RENDER_MAX_SIDE
    addon_doc = text("blender_addon/README.md")
    assert (f"default: the render's long side, at least {side}, `npbgpp_core.protocol.AGGREGATE_MAX_SIDE`, "
            f"and at most {most}") in addon_doc
    assert f"at least {side} and at most {most}" in addon_doc
    readme = text("README.md")
    assert f"at most {side} px on its long side by default for renders up to {side} px" in readme
    assert f"at least {side} and at most {most} (`protocol.AGGREGATE_RENDER_MAX_SIDE`)" in readme
    export_doc = text("headless_train/README.md")
    assert f"Photo Size, default {side} for renders up to {side} px: `npbgpp_core.protocol.AGGREGATE_MAX_SIDE`" \
        in export_doc
    assert (f"pass `--max-side {side}` for the bundle the add-on writes for renders up to {side} px; it follows "
            f"larger renders up to {most}") in export_doc
    for doc in (addon_doc, readme, export_doc):  # the old unconditional default is gone
        assert f"default {side}," not in doc and f"default {side}:" not in doc


def test_training_s_input_views_are_read_as_aggregate_reads_them(folder):
    """headless_train's load_input_views (training's input views and its evaluation's aggregation)
    reads each view as SceneData.view_at_long_side does, bit for bit what it read before by hand
    (fit_long_side, then load_image and camera at that size, own size included): the photos and the
    K, R, t of their cameras, on the tiny scene and on its views given an off-centre principal point
    and fx != fy (the camera scaled to its own size keeps the same float32 bits)."""
    import dataclasses

    from headless_train.data import load_input_views
    from npbgpp_core.camera import Camera
    from npbgpp_core.image_size import fit_long_side

    data = load_scene(folder)
    skewed = []
    for v in data.views:
        R, t = v.camera.R, v.camera.t
        K = [[40.123457, 0.0, 15.373], [0.0, 38.7654321, 17.0417], [0.0, 0.0, 1.0]]
        skewed.append(dataclasses.replace(v, camera=Camera(K, R, t, v.camera.image_size, near=0.25, far=9.0)))
    ids = list(range(len(data.views)))
    for scene in (data, dataclasses.replace(data, views=skewed)):
        for side in (None, 40, 32, 31, 17, 16):
            images, cams = load_input_views(scene, ids, side)
            for i, image, camera in zip(ids, images, cams, strict=True):
                size = fit_long_side(tuple(scene.views[i].camera.image_size), side)
                reference = scene.camera(i, size)
                assert image.shape[-2:] == size and torch.equal(image, scene.load_image(i, size))
                assert camera.image_size == reference.image_size and camera.clip == reference.clip
                for got, want in ((camera.K, reference.K), (camera.R, reference.R), (camera.t, reference.t)):
                    assert got.dtype == want.dtype and torch.equal(got, want)


def test_a_cap_shrinks_only_the_photos_above_it_in_a_dataset_of_mixed_sizes(folder, tmp_path):
    """One training photo 20x20 among 32x32 ones (its camera follows its own size, as the loader
    reads it): Photo Size 24 shrinks the 32-px photos to 24x24 and reads the 20-px one as it is;
    the bundle is, bit for bit, the hand aggregation of exactly those reads, and the worker reports
    the largest own size (32) it capped."""
    import shutil

    from PIL import Image

    mixed = str(tmp_path / "mixed")
    shutil.copytree(folder, mixed)
    small = load_scene(mixed).views[1].image_path
    with Image.open(small) as im:
        im.resize((20, 20), Image.Resampling.BOX).save(small)
    data = load_scene(mixed)
    assert [tuple(data.views[i].camera.image_size) for i in data.train] == [(32, 32), (20, 20), (32, 32), (32, 32)]
    started, bundle = aggregated(mixed, str(tmp_path / "24.npbgpp"), max_side=24)
    assert (started.max_side, started.largest_side) == (24, 32)
    model = load_pretrained_npbgpp(default_weights_path("npbgpp", "object"),
                                   world_up=resolve_world_up("POS_Z", [data.views[i].camera for i in data.train]))
    with torch.no_grad():
        state = model.begin_scene(torch.from_numpy(data.points).float())
        for i in data.train:
            size = (20, 20) if i == 1 else (24, 24)
            state.add_views(data.load_image(i, size)[None], [data.camera(i, size)])
        hand = state.finish()
    assert torch.equal(bundle.features, hand.coefficients) and torch.equal(bundle.valid, hand.valid)


def test_a_bundle_written_before_the_record_is_fair_checked_at_own_size(folder, tmp_path):
    """A bundle without "aggregate_max_side" (written before Photo Size) is read as aggregated
    at the photos' own size: Fit to Photos takes it, its fair check aggregating again at own size."""
    from npbgpp_core.scene_fit import BundleFit

    path = str(tmp_path / "old.npbgpp")
    aggregate_with_worker(folder, path)
    bundle = NeuralScene.load(path)
    del bundle.metadata["aggregate_max_side"]
    bundle.save(path)
    assert "aggregate_max_side" not in NeuralScene.load(path).metadata
    job = BundleFit(path, load_scene(folder), steps=1, check_view=True, fair_check=True)
    assert job.aggregate_max_side is None


def test_a_distorted_photo_is_undistorted_at_its_own_size_then_shrunk_with_the_undistorted_camera(tmp_path):
    """A SIMPLE_RADIAL capture read with undistort: view_at_long_side shrinks the photo remapped
    at its own size (the loader's undistortion, then the area resize), with the undistorted pinhole
    camera scaled to that size (not the lens's source camera); shrink_photo of the photo read as
    floats (load_image_pixels) equals it bit for bit, and of the photo as Fit to Photos holds it
    (rounded to 8 bits, scene_fit.FIT_ROUND_RESAMPLED) is within 1/510 of it, so a fair check of a
    capped bundle of distorted photos aggregates what the worker aggregated, to 8 bits."""
    from test_capture_import import write_capture

    from npbgpp_core.datasets.distortion import undistort
    from npbgpp_core.datasets.images import _resize, read_image
    from npbgpp_core.datasets.scene_data import shrink_photo
    from npbgpp_core.image_size import fit_long_side
    from npbgpp_core.scene_fit import FIT_ROUND_RESAMPLED

    root = str(tmp_path / "lens")
    write_capture(root, n_views=2)
    data = load_scene(root, undistort=True)
    for i, v in enumerate(data.views):
        assert v.distortion is not None and not torch.equal(v.camera.K, v.source_camera.K)
        own = tuple(v.camera.image_size)
        side = max(own) // 2 + 1  # an odd factor: sizes rounded
        size = fit_long_side(own, side)
        image, camera = data.view_at_long_side(i, side)
        remapped = undistort(read_image(v.image_path, None, data.background), v.source_camera, v.distortion, v.camera)
        by_hand = torch.from_numpy(_resize(remapped.permute(1, 2, 0).contiguous().numpy(), size)).permute(2, 0, 1)
        assert tuple(image.shape[-2:]) == size and torch.equal(image, by_hand)
        assert torch.equal(camera.K, v.camera.scaled(size).K) and camera.image_size == size
        floats = data.load_image_pixels(i)  # undistorted, not rounded: floats
        assert floats.dtype == torch.float32
        shrunk, cam = shrink_photo(floats, v.camera, side)
        assert torch.equal(shrunk, image) and torch.equal(cam.K, camera.K)
        # what the fit holds (BundleFit reads with FIT_ROUND_RESAMPLED) and its fair check shrinks: FitViews.image's
        # k/255 of the rounded levels; an area resize averages, so it stays within half a level
        assert FIT_ROUND_RESAMPLED
        held = data.load_image_pixels(i, round_resampled=FIT_ROUND_RESAMPLED)
        assert held.dtype == torch.uint8
        shrunk, cam = shrink_photo(held.to(torch.float32) / 255.0, v.camera, side)
        assert torch.equal(cam.K, camera.K) and (shrunk - image).abs().max() <= 1 / 510 + 1e-6
