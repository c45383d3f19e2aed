"""Fit to Photos' photos in memory (issue #11): photos read from 8-bit files are stored as uint8
(4x smaller than float32), photos of different sizes at their own sizes (no padded canvas, no
masks: both implied), the check's views share what is stored, and every window, mask and fit on
them is bit for bit the one on the same photos as a padded float32 stack with float32 masks (the
path before, built by hand here)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image
from test_background import env_scene, from_weights_file, ring_cameras

from npbgpp_core.datasets.images import read_image
from npbgpp_core.fitting import (
    FitViews,
    downsized_fit_views,
    eight_bit_pixels,
    iter_fit_coefficients,
    padded_fit_views,
    read_fit_views,
    run_fit,
    view_extent,
    views_without,
)

# (H, W) of four photos: a landscape, a portrait-ish one, one a row shorter, one as the first
SIZES = [(32, 40), (36, 30), (31, 40), (32, 40)]


def bits(x: torch.Tensor) -> torch.Tensor:
    """The float32 values' bit patterns, so that equal means bit for bit (not merely ==)."""
    return x.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Four 8-bit PNG photos of SIZES and their cameras; the photos as the image reader gives them."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(3)
    cameras = [ring_cameras(4, size=size)[k] for k, size in enumerate(SIZES)]
    images = []
    for k, (h, w) in enumerate(SIZES):
        path = str(folder / f"p{k}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        images.append(read_image(path))
    return images, cameras


def float_views(images: list[torch.Tensor], cameras, dtype: torch.dtype = torch.float32) -> FitViews:
    """The padded views as they were built before: a float stack (float32 unless ``dtype``) and
    float32 masks."""
    H, W = max(im.shape[1] for im in images), max(im.shape[2] for im in images)
    stack = torch.zeros(len(images), 3, H, W, dtype=dtype)
    masks = torch.zeros(len(images), 1, H, W)
    for k, im in enumerate(images):
        stack[k, :, : im.shape[1], : im.shape[2]] = im
        masks[k, :, : im.shape[1], : im.shape[2]] = 1.0
    return FitViews(stack, [c.cropped(0, 0, H, W) for c in cameras], masks)


def every_window(views: FitViews, want: FitViews, k: int) -> None:
    """View k's image and mask in ``views`` are bit for bit ``want``'s (a padded float stack) in
    every window a crop or a score reads: whole, the photo's own, inside, across the padding, past
    the canvas's edge (clipped as slicing clips), empty."""
    H, W = want.canvas
    h, w = view_extent(want, k)
    windows = [(0, 0, None, None), (0, 0, h, w), (3, 5, 9, 11), (h - 4, w - 6, 9, 11), (H - 3, W - 2, 8, 8),
               (h, 0, H - h, W), (0, w, H, W - w), (2, 2, 0, 5), (H - 12, W - 12, 12, 12)]
    for top, left, height, width in windows:
        got, ref = views.image(k, top, left, height, width), want.image(k, top, left, height, width)
        assert got.dtype == ref.dtype and got.shape == ref.shape, (k, top, left, height, width)
        assert torch.equal(bits(got), bits(ref)), (k, top, left, height, width)
        got, ref = views.mask(k, top, left, height, width), want.mask(k, top, left, height, width)
        assert got.dtype == ref.dtype and torch.equal(got, ref), (k, top, left, height, width)


def test_8bit_photos_of_different_sizes_are_stored_as_uint8_at_their_own_sizes(photos):
    images, cameras = photos
    views = padded_fit_views(images, cameras)
    assert views.own_sizes and views.masks is None and views.canvas == (36, 40)
    assert [(im.dtype, tuple(im.shape[-2:])) for im in views.images] == [(torch.uint8, s) for s in SIZES]
    # a quarter of float32's bytes for the photos, none for padding or masks: three bytes a photo pixel
    # (a padded uint8 stack and bool masks: 4 * 36 * 40 bytes a photo)
    assert views.stored_bytes == 3 * sum(h * w for h, w in SIZES)
    assert views.float_dtype == torch.float32
    want = float_views(images, cameras)
    for k in range(len(images)):
        every_window(views, want, k)
        assert views.cameras[k].image_size == want.cameras[k].image_size == (36, 40)
    for k, im in enumerate(images):
        h, w = im.shape[-2:]
        got = views.image(k, 0, 0, h, w)
        assert got.dtype == torch.float32 and torch.equal(bits(got), bits(im))
        assert float(views.image(k).sum()) == float(im.sum())  # the padding is 0
        mask = views.mask(k)
        assert mask.dtype == torch.float32 and float(mask.sum()) == h * w and bool(mask[:, :h, :w].all())
    # a window, as a random crop reads it
    assert torch.equal(bits(views.image(1, 5, 7, 9, 11)), bits(images[1][:, 5:14, 7:18]))


def test_a_photo_that_is_not_8bit_turns_the_stack_float_and_keeps_every_photo_exactly(photos):
    images, cameras = photos
    resampled = images[2] * 0.999  # not k/255: an undistorted or resized photo
    assert eight_bit_pixels(resampled) is None and eight_bit_pixels(images[2]) is not None
    mixed = [images[0], images[1], resampled, images[3]]
    views = padded_fit_views(mixed, cameras)
    assert views.float_dtype == torch.float32
    assert [im.dtype for im in views.images] == [torch.uint8, torch.uint8, torch.float32, torch.uint8]
    for k, im in enumerate(mixed):
        assert torch.equal(bits(views.image(k, 0, 0, *im.shape[-2:])), bits(im))
        every_window(views, float_views(mixed, cameras), k)
    same = padded_fit_views([images[0], images[0] * 0.999, images[3]], [cameras[0]] * 3)  # one size: a stack
    assert same.images.dtype == torch.float32 and same.masks is None
    # float64 photos are left in their own type, as before
    doubles = padded_fit_views([im.double() for im in images], cameras)
    assert doubles.float_dtype == torch.float64 and torch.equal(doubles.image(3, 0, 0, 32, 40), images[3].double())
    assert eight_bit_pixels(torch.tensor([[[float("nan")]]])) is None
    assert eight_bit_pixels(torch.full((1, 1, 1), 256 / 255)) is None  # above 1: not storable
    for outside in (-1 / 255, -float("inf"), float("inf"), 1e10):  # nor below 0, nor infinite
        assert eight_bit_pixels(torch.tensor([[[0.0, outside, 1.0]]])) is None


def test_photos_of_mixed_types_are_stacked_as_torch_stack_stacks_them(photos):
    """Same-sized photos of mixed types: the stack torch.stack made of them before (the types
    promoted, every value exact), whichever photo turns the stack float; a uint8 photo is k/255."""
    images, cameras = photos
    same = [images[0], images[3]]  # both (32, 40)
    two = [cameras[0], cameras[3]]
    eight = (images[3] * 255).round().to(torch.uint8)
    halves = images[3].half() * 0.5  # not k/255
    for mixed in ([same[0], same[1].double()],  # 8-bit float32 then float64: float32(k)/255 widened
                  [halves, same[0]],  # float16 then an 8-bit float32 photo: float32, nothing rounded
                  [same[0], halves, same[1] * 0.999],  # float16 then a float32 one not 8-bit
                  [halves, eight]):  # a uint8 photo after the stack turned float
        views = padded_fit_views(mixed, two + two[:1] if len(mixed) == 3 else two)
        want = torch.stack([im.float() / 255 if im.dtype == torch.uint8 else im for im in mixed])
        assert views.images.dtype == want.dtype
        assert all(torch.equal(views.image(k), want[k]) for k in range(len(mixed)))
    with pytest.raises(ValueError, match="image 1 must be float in \\[0, 1\\] or uint8, got torch.int32"):
        padded_fit_views([images[0], eight.to(torch.int32)], two)
    # photos of different sizes read back as the same types and values, the padding 0
    other = [cameras[1]]  # (36, 30)
    for mixed in ([images[1], same[1].double()], [halves, images[1]], [halves, images[1], same[1] * 0.999],
                  [halves, images[1] * 0.999, eight], [images[1].half(), halves]):
        cams = (two[:1] + other + two[1:])[:len(mixed)] if len(mixed) == 3 else [
            other[0] if im.shape[-1] == 30 else two[0] for im in mixed]
        views = padded_fit_views(mixed, cams)
        assert views.own_sizes
        floats = [im.float() / 255 if im.dtype == torch.uint8 else im for im in mixed]
        want = float_views(floats, cams, torch.stack([torch.zeros(1, dtype=f.dtype) for f in floats]).dtype)
        assert views.float_dtype == want.images.dtype
        for k in range(len(mixed)):
            every_window(views, want, k)


def test_read_fit_views_reads_each_photo_once_in_order_and_checks_its_size(photos):
    images, cameras = photos
    read: list[int] = []

    def load(k: int) -> torch.Tensor:
        read.append(k)
        return images[k]

    views = read_fit_views(load, cameras)
    assert read == [0, 1, 2, 3] and [im.dtype for im in views.images] == [torch.uint8] * 4
    with pytest.raises(ValueError, match=r"image 1 is \(36, 30\) but its camera \(32, 40\)"):
        read_fit_views(lambda k: images[k], [cameras[0], cameras[0]])
    with pytest.raises(ValueError, match="fitting needs at least one view"):
        read_fit_views(lambda k: images[k], [])


@pytest.mark.parametrize("own_sizes", [True, False])
def test_views_without_share_the_stored_photos_instead_of_copying_them(photos, own_sizes):
    images, cameras = photos
    if own_sizes:
        views = padded_fit_views(images, cameras)
    else:  # a padded stack with masks (as before, and as a caller may still give them)
        eight = float_views(images, cameras)
        views = FitViews((eight.images * 255).round().to(torch.uint8), eight.cameras, eight.masks.bool())
    assert views.own_sizes == own_sizes
    rest = views_without(views, 1)
    if own_sizes:
        assert rest.images is views.images and rest.masks is None
    else:
        assert rest.images.data_ptr() == views.images.data_ptr() and rest.masks.data_ptr() == views.masks.data_ptr()
    assert rest.rows == [0, 2, 3] and len(rest.cameras) == 3 and rest.canvas == views.canvas
    for i, k in enumerate([0, 2, 3]):
        assert torch.equal(rest.image(i), views.image(k)) and torch.equal(rest.mask(i), views.mask(k))
        assert rest.cameras[i] is views.cameras[k]
    assert views_without(rest, 0).rows == [2, 3]
    with pytest.raises(ValueError, match="rows"):
        FitViews(views.images, cameras[:2], views.masks, [0, 4])
    if own_sizes:
        with pytest.raises(ValueError, match="image 2 must be float in \\[0, 1\\] or uint8"):
            FitViews([im if k != 2 else im.to(torch.int32) for k, im in enumerate(views.images)], cameras)
        with pytest.raises(ValueError, match="image 1 must be \\(3, H, W\\)"):
            FitViews([views.images[0], views.images[1][:1]], cameras[:2])
        with pytest.raises(ValueError, match="implied masks: masks must be None"):
            FitViews(views.images, cameras, torch.ones(4, 1, 36, 40, dtype=torch.bool))
    else:
        with pytest.raises(ValueError, match="float in \\[0, 1\\] or uint8"):
            FitViews(views.images.to(torch.int32), cameras)


def test_downsized_8bit_views_equal_the_downsized_float_views(photos):
    images, cameras = photos
    small = downsized_fit_views(padded_fit_views(images, cameras), 20)
    want = downsized_fit_views(float_views(images, cameras), 20)
    assert small.images.dtype == torch.float32 and small.images.shape == want.images.shape == (4, 3, 18, 20)
    assert torch.equal(bits(small.images), bits(want.images)) and torch.equal(small.masks, want.masks)


@pytest.mark.parametrize("options", [
    dict(crop=12, check_view=True, check_recipes=("crops", "whole"), check_combine="choose", whole_max_side=24,
         seed=1),
    dict(crop=20, check_view=True, fair_check=True, coarse_fraction=0.5, coarse_side=16, seed=2),
], ids=["both_recipes", "fair_check_coarse"])
def test_a_checked_fit_on_8bit_views_is_bit_for_bit_the_float_fit(photos, tmp_path, options):
    """A checked fit on photos of different sizes held at their own sizes as uint8, against the
    padded float32 stack with float32 masks: with both recipes (crops and whole views shrunk to
    24 px), or a fair check (the kept photo left out of the aggregation, each photo added at its
    own size) with a coarse phase (the views shrunk, masks pooled) and crops reaching into the
    padding; the kept photo scored on views_without's shared photos, crops converted one at a
    time; the same losses, scores and fitted state."""
    images, cameras = photos
    model, agg = env_scene()
    model = from_weights_file(model, tmp_path)
    eight = padded_fit_views(images, cameras)
    assert eight.own_sizes and all(im.dtype == torch.uint8 for im in eight.images)
    a = run_fit(iter_fit_coefficients(model, agg, eight, 3, **options))
    b = run_fit(iter_fit_coefficients(model, agg, float_views(images, cameras), 3, **options))
    assert a.losses == b.losses and len(a.losses) > 0
    assert a.check is not None and b.check is not None and a.check.view == b.check.view == 2
    assert (a.check.psnr_unfitted, a.check.psnr_fitted, a.check.kept, a.check.chosen) == \
        (b.check.psnr_unfitted, b.check.psnr_fitted, b.check.kept, b.check.chosen)
    assert [c.psnr_fitted for c in a.check.candidates] == [c.psnr_fitted for c in b.check.candidates]
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[n], sb[n]) for n in sa)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_the_readers_8bit_pixels_are_its_floats_bit_for_bit(tmp_path, mode):
    # every level in each channel: uint8 k read back as float32(k) / 255 is the image reader's float
    from PIL import Image

    from npbgpp_core.datasets.images import read_image_pixels

    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    arr = np.stack([np.roll(levels, c) for c in range(channels)], axis=2)
    if mode == "RGBA":
        arr[..., 3] = 128  # alpha composited over the background: not 8-bit levels, so floats
    Image.fromarray(arr[..., 0] if mode == "L" else arr).save(tmp_path / "p.png")  # mode from the shape
    path = str(tmp_path / "p.png")
    pixels, floats = read_image_pixels(path), read_image(path)
    assert pixels.dtype == (torch.float32 if mode == "RGBA" else torch.uint8)
    if mode != "RGBA":
        assert torch.equal(pixels, eight_bit_pixels(floats))  # what the stack stored from the floats
    camera = ring_cameras(1, size=(16, 16))[0]
    got = FitViews(pixels[None], [camera]).image(0)
    assert got.dtype == torch.float32 and torch.equal(bits(got), bits(floats))
    # the stack read from them is the stack read from the floats (type and values)
    stored, stored_from_floats = (read_fit_views(lambda k, im=im: im, [camera]).images for im in (pixels, floats))
    assert stored.dtype == stored_from_floats.dtype and torch.equal(stored, stored_from_floats)


def test_a_datasets_pixels_are_its_images(tmp_path):
    # load_image_pixels: uint8 for a view stored as an 8-bit RGB file, load_image's floats otherwise
    # (the tiny scene's RGBA photos, composited over the background); bit for bit load_image once read
    from _train_fixtures import make_tiny_scene
    from PIL import Image

    from npbgpp_core.datasets import load_scene

    folder = make_tiny_scene(str(tmp_path / "scene"), views=3, size=16, n_points=20, splits=(3, 0, 0))
    data = load_scene(folder)
    first = data.views[0].image_path
    with Image.open(first) as im:
        im.convert("RGB").save(first)  # an 8-bit RGB photo, as a phone's
    for i in range(len(data.views)):
        pixels, floats = data.load_image_pixels(i), data.load_image(i)
        assert pixels.dtype == (torch.uint8 if i == 0 else torch.float32)
        got = FitViews(pixels[None], [data.views[i].camera]).image(0)
        assert torch.equal(bits(got), bits(floats))


def test_largest_image_size_is_the_view_with_most_pixels():
    # hand-made views: the longest side (90) is not the most pixels (60 x 70 = 4200 > 90 x 40 = 3600);
    # the first of equals; only the ids asked about; None for none (the out-of-memory advice's photo)
    from npbgpp_core.datasets.scene_data import SceneData, View

    sizes = [(90, 40), (60, 70), (70, 60), (100, 100)]
    views = [View(f"v{k}", f"v{k}.png", None, ring_cameras(1, size=size)[0]) for k, size in enumerate(sizes)]
    data = SceneData("s", ".", "test", np.zeros((0, 3), np.float32), None, views, [0, 1, 2], [], [3])
    assert data.largest_image_size([0, 1, 2]) == (60, 70)
    assert data.largest_image_size([2, 1]) == (70, 60)
    assert data.largest_image_size([0]) == (90, 40) and data.largest_image_size([]) is None


@pytest.fixture(scope="module")
def distorted(tmp_path_factory):
    """A distorted COLMAP capture (SIMPLE_RADIAL, 8-bit JPEG photos) loaded with undistort=True, and
    prepare-capture's copy of it at the same size as PNG (its undistorted photos rounded to 8 bits)."""
    from test_capture_import import write_capture

    from npbgpp_core.datasets import load_scene
    from npbgpp_core.datasets.capture import prepare_capture

    root = tmp_path_factory.mktemp("distorted")
    src, out = str(root / "src"), str(root / "prepared")
    write_capture(src, n_views=3)
    prepare_capture(src, out, max_size=1000, image_format="png")  # no downscaling
    return src, load_scene(src, undistort=True), load_scene(out)


def test_undistorted_8bit_photos_are_rounded_to_prepare_captures_pixels(distorted):
    # round_resampled: uint8, bit for bit the photo prepare-capture wrote for the same view and the
    # nearest levels of load_image's floats rounded by hand in numpy, so within 1/510 of those floats;
    # without it load_image's floats as before
    _, data, prepared = distorted
    for i in range(len(data.views)):
        assert data.views[i].distortion is not None
        floats = data.load_image(i)
        rounded = data.load_image_pixels(i, round_resampled=True)
        assert rounded.dtype == torch.uint8 and rounded.shape == floats.shape
        with Image.open(prepared.views[i].image_path) as im:
            written = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
        assert torch.equal(rounded, written)
        by_hand = (floats.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)  # nearest level, halves up
        assert torch.equal(rounded, torch.from_numpy(by_hand).permute(2, 0, 1))
        err = (rounded.to(torch.float64) / 255.0 - floats.to(torch.float64)).abs().max()
        assert 0.0 < float(err) <= 1.0 / 510.0 + 1e-7  # resampled: not k/255 before rounding
        plain = data.load_image_pixels(i)
        assert plain.dtype == torch.float32 and torch.equal(bits(plain), bits(floats))


def test_undistorted_16bit_photos_stay_floats(tmp_path):
    # a 16-bit photo holds more levels than 8 bits: never rounded, load_image's floats either way
    from test_capture_import import write_capture

    from npbgpp_core.datasets import load_scene

    src = str(tmp_path / "src")
    write_capture(src, n_views=1)
    path = os.path.join(src, "images", "view_00.jpg")
    with Image.open(path) as im:
        grey = np.asarray(im.convert("L"), dtype=np.uint16) * 257 + 3  # not a multiple of 257: 16-bit levels
    Image.fromarray(grey.astype(np.uint16)).save(path, format="PNG")  # PNG bytes under the model's name
    data = load_scene(src, undistort=True)
    floats = data.load_image(0)
    for pixels in (data.load_image_pixels(0, round_resampled=True), data.load_image_pixels(0)):
        assert pixels.dtype == torch.float32 and torch.equal(bits(pixels), bits(floats))


@pytest.mark.parametrize("rounded", [True, False])
def test_fit_to_photos_holds_undistorted_8bit_photos_as_uint8(distorted, tmp_path, monkeypatch, rounded):
    # BundleFit's stack (what read_fit_views returned to it): uint8, the prepared capture's photos,
    # with FIT_ROUND_RESAMPLED; float32 as load_image gives them without (the fit before)
    from headless_train.export import main as export_main
    from npbgpp_core import fitting, scene_fit
    from npbgpp_core.pretrained import default_weights_path

    src, data, prepared = distorted
    bundle = str(tmp_path / "b.npbgpp")
    assert export_main(["--checkpoint", default_weights_path("npbgpp", "object"), "--scene", src, "--undistort",
                        "--out", bundle]) == 0
    seen = []

    def spy(load, cameras):
        seen.append(read_fit_views(load, cameras))
        return seen[-1]

    monkeypatch.setattr(fitting, "read_fit_views", spy)
    monkeypatch.setattr(scene_fit, "FIT_ROUND_RESAMPLED", rounded)
    job = scene_fit.BundleFit(bundle, data, steps=1, check_view=False)
    (views,) = seen
    ids = list(data.train) or list(range(len(data.views)))
    assert views.images.dtype == (torch.uint8 if rounded else torch.float32)
    for k, i in enumerate(ids):
        want = prepared.load_image(i) if rounded else data.load_image(i)
        assert torch.equal(bits(views.image(k)), bits(want))
    # the fitted bundle's fit record says which photos the fit held, whatever the switch is afterwards
    monkeypatch.setattr(scene_fit, "FIT_ROUND_RESAMPLED", not rounded)
    while not job.step():
        pass
    assert job.fitted_scene().metadata["fit"]["round_resampled"] is rounded


def test_fit_to_photos_of_mixed_sizes_is_bit_for_bit_the_padded_stacks(tmp_path, monkeypatch):
    # BundleFit on a dataset of 8-bit photos of three sizes (a square, one turned portrait, one a
    # row shorter): the photos held at their own sizes as uint8 give the fitted bundle that a padded
    # float32 stack with float32 masks, built here by hand from the reader's floats, gives
    from _train_fixtures import make_tiny_scene

    from headless_train.export import main as export_main
    from npbgpp_core import fitting
    from npbgpp_core.datasets import load_scene
    from npbgpp_core.pretrained import default_weights_path
    from npbgpp_core.scene_fit import BundleFit

    folder = make_tiny_scene(str(tmp_path / "scene"), views=5, size=32, n_points=300, splits=(4, 0, 1))
    for k, box in ((0, (0, 0, 32, 32)), (1, (4, 0, 28, 32)), (2, (0, 0, 32, 31)), (3, (0, 0, 32, 32))):
        path = os.path.join(folder, "images", f"r_{k}.png")
        with Image.open(path) as im:
            im.convert("RGB").crop(box).save(path)  # 8-bit RGB, as a phone's
    bundle = str(tmp_path / "b.npbgpp")
    assert export_main(["--checkpoint", default_weights_path("npbgpp", "object"), "--scene", folder,
                        "--out", bundle]) == 0
    data = load_scene(folder, require_points=False)
    assert {data.views[i].camera.image_size for i in data.train} == {(32, 32), (32, 24), (31, 32)}

    def by_hand(load, cameras):
        photos = [read_image(data.views[data.train[k]].image_path) for k in range(len(cameras))]
        return float_views(photos, cameras)

    fitted = {}
    for name in ("own_sizes", "by_hand"):
        if name == "by_hand":
            monkeypatch.setattr(fitting, "read_fit_views", by_hand)
        job = BundleFit(bundle, data, steps=3, check_view=True)
        while not job.step():
            pass
        check = job.result.check
        fitted[name] = (job.result.losses, (check.psnr_unfitted, check.psnr_fitted, check.kept), job.fitted_scene())
    (la, ca, a), (lb, cb, b) = fitted["own_sizes"], fitted["by_hand"]
    assert la == lb and len(la) == 3 and ca == cb
    assert torch.equal(a.features, b.features) and torch.equal(a.valid, b.valid)
    assert a.model_state.keys() == b.model_state.keys()
    assert all(torch.equal(a.model_state[n], b.model_state[n]) for n in a.model_state)
