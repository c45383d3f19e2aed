"""Fit to Photos' photos in memory (issue #11): photos read from 8-bit files are stored as uint8
(4x smaller than float32) with bool masks, read straight into the padded stack, the check's views
share that stack, and every fit on them is bit for bit the fit on the same photos as float32
(the path before: a float stack and float masks built by hand here)."""

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
    views_without,
)

# (H, W) of four photos: a landscape, a portrait-ish one, one a row shorter, one as the first
SIZES = [(32, 40), (36, 30), (31, 40), (32, 40)]


def bits(x: torch.Tensor) -> torch.Tensor:
    """The float32 values' bit patterns, so that equal means bit for bit (not merely ==)."""
    return x.contiguous().view(torch.int32)


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


def float_views(images: list[torch.Tensor], cameras) -> FitViews:
    """The padded views as they were built before: a float32 stack and float32 masks."""
    H, W = max(h for h, _ in SIZES), max(w for _, w in SIZES)
    stack = torch.zeros(len(images), 3, H, W)
    masks = torch.zeros(len(images), 1, H, W)
    for k, im in enumerate(images):
        stack[k, :, : im.shape[1], : im.shape[2]] = im
        masks[k, :, : im.shape[1], : im.shape[2]] = 1.0
    return FitViews(stack, [c.cropped(0, 0, H, W) for c in cameras], masks)


def test_8bit_photos_are_stored_as_uint8_and_read_back_as_the_readers_floats(photos):
    images, cameras = photos
    views = padded_fit_views(images, cameras)
    assert views.images.dtype == torch.uint8 and views.masks is not None and views.masks.dtype == torch.bool
    # a quarter of float32's bytes for the photos, an eighth... of a float mask: one byte a pixel
    assert views.images.nbytes == 4 * 3 * 36 * 40 and views.masks.nbytes == 4 * 36 * 40
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
    assert views.images.dtype == torch.float32
    for k, im in enumerate(mixed):
        assert torch.equal(bits(views.image(k, 0, 0, *im.shape[-2:])), bits(im))
    # float64 photos are left in their own type, as before
    doubles = padded_fit_views([im.double() for im in images], cameras)
    assert doubles.images.dtype == torch.float64 and torch.equal(doubles.image(3, 0, 0, 32, 40), images[3].double())
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


def test_read_fit_views_reads_each_photo_once_in_order_and_checks_its_size(photos):
    images, cameras = photos
    read: list[int] = []

    def load(k: int) -> torch.Tensor:
        read.append(k)
        return images[k]

    views = read_fit_views(load, cameras)
    assert read == [0, 1, 2, 3] and views.images.dtype == torch.uint8
    with pytest.raises(ValueError, match=r"image 1 is \(36, 30\) but its camera \(32, 40\)"):
        read_fit_views(lambda k: images[k], [cameras[0], cameras[0]])
    with pytest.raises(ValueError, match="fitting needs at least one view"):
        read_fit_views(lambda k: images[k], [])


def test_views_without_share_the_stack_instead_of_copying_it(photos):
    images, cameras = photos
    views = padded_fit_views(images, cameras)
    rest = views_without(views, 1)
    assert rest.images.data_ptr() == views.images.data_ptr() and rest.masks.data_ptr() == views.masks.data_ptr()
    assert rest.rows == [0, 2, 3] and len(rest.cameras) == 3
    for i, k in enumerate([0, 2, 3]):
        assert torch.equal(rest.image(i), views.image(k)) and torch.equal(rest.mask(i), views.mask(k))
        assert rest.cameras[i] is views.cameras[k]
    assert views_without(rest, 0).rows == [2, 3]
    with pytest.raises(ValueError, match="rows"):
        FitViews(views.images, cameras[:2], views.masks, [0, 4])
    with pytest.raises(ValueError, match="float in \\[0, 1\\] or uint8"):
        FitViews(views.images.to(torch.int32), cameras)


def test_downsized_8bit_views_equal_the_downsized_float_views(photos):
    images, cameras = photos
    small = downsized_fit_views(padded_fit_views(images, cameras), 20)
    want = downsized_fit_views(float_views(images, cameras), 20)
    assert small.images.dtype == torch.float32 and small.images.shape == want.images.shape == (4, 3, 18, 20)
    assert torch.equal(bits(small.images), bits(want.images)) and torch.equal(small.masks, want.masks)


def test_a_checked_fit_on_8bit_views_is_bit_for_bit_the_float_fit(photos, tmp_path):
    """A checked fit with both recipes (crops and whole views shrunk to 24 px), on padded
    views: the kept photo scored on views_without's shared stack, crops converted one at a
    time; the same losses, scores and fitted state as on the float32 stack."""
    images, cameras = photos
    model, agg = env_scene()
    model = from_weights_file(model, tmp_path)
    options = dict(crop=12, check_view=True, check_recipes=("crops", "whole"), check_combine="choose",
                   whole_max_side=24, seed=1)
    eight = padded_fit_views(images, cameras)
    assert eight.images.dtype == torch.uint8
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
    scene_fit.BundleFit(bundle, data, steps=1, check_view=False)
    (views,) = seen
    ids = list(data.train) or list(range(len(data.views)))
    assert views.images.dtype == (torch.uint8 if rounded else torch.float32)
    for k, i in enumerate(ids):
        want = prepared.load_image(i) if rounded else data.load_image(i)
        assert torch.equal(bits(views.image(k)), bits(want))
