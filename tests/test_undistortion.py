"""Undistortion to the widest pinhole camera whose every pixel sees the photo
(``distortion.undistorted_camera``): no blank pixel for pincushion or barrel lenses, the
widest such view (brute force over the border), identity untouched, one camera for the
loader and prepare-capture, and a 3D point landing where the lens model puts it."""

from __future__ import annotations

import math
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from npbgpp_core.camera import Camera
from npbgpp_core.datasets import load_scene
from npbgpp_core.datasets.capture import prepare_capture
from npbgpp_core.datasets.distortion import undistort, undistorted_camera
from npbgpp_core.datasets.errors import DatasetError
from npbgpp_core.datasets.scene_data import Distortion

W, H = 96, 64
LENSES = {
    "pincushion": Distortion(k1=0.25),
    "barrel": Distortion(k1=-0.12, k2=0.01),
    "opencv": Distortion(k1=0.08, k2=-0.02, p1=0.004, p2=-0.003),
    "barrel_tangential": Distortion(k1=-0.1, p1=-0.005, p2=0.006),
}


def _camera(f: float = 70.0, cx: float = 47.0, cy: float = 30.5) -> Camera:
    K = np.array([[f, 0.0, cx], [0.0, 1.1 * f, cy], [0.0, 0.0, 1.0]])
    return Camera.from_opencv(K, np.eye(3), np.zeros(3), (H, W))


def _sources(target_K: np.ndarray, src_K: np.ndarray, d: Distortion, u: np.ndarray, v: np.ndarray):
    """Where the lens puts target pixel (u, v) in the photo: OpenCV's radial-tangential model
    written out here, independent of the library."""
    x, y = (u - target_K[0, 2]) / target_K[0, 0], (v - target_K[1, 2]) / target_K[1, 1]
    r2 = x * x + y * y
    rad = 1 + d.k1 * r2 + d.k2 * r2 * r2
    xd = x * rad + 2 * d.p1 * x * y + d.p2 * (r2 + 2 * x * x)
    yd = y * rad + d.p1 * (r2 + 2 * y * y) + 2 * d.p2 * x * y
    return xd * src_K[0, 0] + src_K[0, 2], yd * src_K[1, 1] + src_K[1, 2]


def _border() -> tuple[np.ndarray, np.ndarray]:
    v, u = np.mgrid[0:H, 0:W]
    edge = (u == 0) | (u == W - 1) | (v == 0) | (v == H - 1)
    return u[edge].astype(np.float64), v[edge].astype(np.float64)


def _inside(us: np.ndarray, vs: np.ndarray) -> np.ndarray:
    """Bilinear support of the sample entirely inside the photo (pixel centres 0..W-1)."""
    return (us >= 0) & (us <= W - 1) & (vs >= 0) & (vs <= H - 1)


@pytest.mark.parametrize("lens", LENSES)
def test_white_photo_has_no_dark_pixel(lens):
    cam, d = _camera(), LENSES[lens]
    out = undistort(torch.ones(3, H, W), cam, d)
    assert out.shape == (3, H, W)
    assert float(out.min()) > 1 - 1e-6, f"{lens}: {(out < 1 - 1e-6).sum().item()} dark values"
    if d.k1 > 0:
        # the reference this must beat: the same K (the old target) leaves black corners
        assert float(undistort(torch.ones(3, H, W), cam, d, cam).min()) == 0.0


@pytest.mark.parametrize("lens", LENSES)
def test_the_view_is_the_widest_with_every_border_pixel_inside(lens):
    cam, d = _camera(), LENSES[lens]
    target = undistorted_camera(cam, d, "test camera")
    K, Kt = cam.to_opencv()[0], target.to_opencv()[0]
    # same size, pose, principal point and pixel aspect; only the focal length moves
    assert target.image_size == cam.image_size
    assert torch.equal(target.R, cam.R) and torch.equal(target.t, cam.t)
    np.testing.assert_allclose(Kt[:2, 2], K[:2, 2], atol=1e-5)
    s = Kt[0, 0] / K[0, 0]
    assert Kt[1, 1] / K[1, 1] == pytest.approx(s, rel=1e-6)
    assert s > 1.0 if d.k1 > 0 else s < 1.0  # pincushion narrows, barrel widens
    u, v = _border()
    assert _inside(*_sources(Kt, K, d, u, v)).all()
    wider = Kt.copy()
    wider[0, 0] /= 1.01
    wider[1, 1] /= 1.01
    assert not _inside(*_sources(wider, K, d, u, v)).all()


def test_identity_distortion_keeps_the_camera():
    cam = _camera()
    for d in (None, Distortion()):
        same = undistorted_camera(cam, d)
        assert torch.equal(same.K, cam.K) and torch.equal(same.R, cam.R) and same.image_size == cam.image_size
    img = torch.rand(3, H, W)
    torch.testing.assert_close(undistort(img, cam, Distortion()), img, atol=1e-6, rtol=0)


@pytest.mark.parametrize("d, match", [
    (Distortion(k1=-1.0), "folds over inside the photo"),  # r - r^3 peaks at 0.38 < the half width 0.67
    (Distortion(k1=float("nan")), "non-finite lens distortion"),
    (Distortion(k1=500.0), "no plausible pinhole view"),  # the view would shrink about 7-fold
])
def test_bad_lens_models_are_refused_naming_the_camera(d, match):
    with pytest.raises(DatasetError, match=f"cameras.bin: camera 3 \\(OPENCV\\): .*{match}"):
        undistorted_camera(_camera(), d, "cameras.bin: camera 3 (OPENCV)")


@pytest.mark.parametrize("d", [Distortion(k1=1e200), Distortion(k2=-1e300), Distortion(p1=1e308),
                               Distortion(k1=1e-300, k2=1e300)])
def test_huge_lens_coefficients_are_refused_quietly(d):
    """Coefficients near the float64 limit (the readers' fuzz cases) overflow to inf / nan:
    refused as implausible with no numpy 'overflow encountered' line printed first."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DatasetError, match="cam 7: lens distortion .* no plausible pinhole view"):
            undistorted_camera(_camera(), d, "cam 7")


def test_loader_refuses_a_folding_lens_naming_the_camera(tmp_path):
    from test_datasets_formats import write_colmap

    root = str(tmp_path / "fold")
    write_colmap(root, True, models=("OPENCV",), dist=(-3.0, 0.0, 0.0, 0.0))
    with pytest.raises(DatasetError, match=r"cameras: camera 1 \(OPENCV\): lens distortion .*folds over"):
        load_scene(root, undistort=True)


def test_loader_and_prepare_capture_give_the_same_cameras(tmp_path):
    from test_capture_import import write_capture

    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    write_capture(src, n_views=2)
    prepare_capture(src, out, max_size=1000, image_format="png")  # no downscaling
    loaded, prepared = load_scene(src, undistort=True), load_scene(out)
    assert [v.name for v in loaded.views] == [v.name for v in prepared.views]
    for i, (a, b) in enumerate(zip(loaded.views, prepared.views, strict=True)):
        assert torch.equal(a.camera.K, b.camera.K) and torch.equal(a.camera.R, b.camera.R)
        assert torch.equal(a.camera.t, b.camera.t) and a.camera.image_size == b.camera.image_size
        assert not torch.equal(a.camera.K, a.source_camera.K)
        # and the same pixels (PNG: 8-bit rounding only)
        diff = (loaded.load_image(i) - prepared.load_image(i)).abs()
        assert float(diff.max()) <= 1.0 / 255 + 1e-6


def test_downscaled_prepare_capture_records_the_loaders_cameras(tmp_path):
    """Downscaled to an odd size with intrinsics that float32 does not hold exactly: the
    prepared cameras.bin gives the cameras that loading the source model over photos of
    that size with undistort=True gives (one construction, distortion.view_cameras)."""
    from test_capture_import import write_capture

    src, out, copy = str(tmp_path / "src"), str(tmp_path / "out"), str(tmp_path / "copy")
    write_capture(src, n_views=2)
    with open(os.path.join(src, "sparse", "0", "cameras.txt"), "w") as f:
        f.write("1 SIMPLE_RADIAL 240 180 200.123456789 120.3 90.7 0.2\n")
    prepare_capture(src, out, max_size=97, image_format="png")
    prepared = load_scene(out)
    h, w = prepared.views[0].camera.image_size
    assert (w, h) == (97, 73)
    shutil.copytree(os.path.join(src, "sparse"), os.path.join(copy, "sparse"))
    os.makedirs(os.path.join(copy, "images"))
    for name in os.listdir(os.path.join(src, "images")):
        Image.open(os.path.join(src, "images", name)).resize((w, h)).save(os.path.join(copy, "images", name))
    loaded = load_scene(copy, undistort=True)
    for a, b in zip(loaded.views, prepared.views, strict=True):
        assert torch.equal(a.camera.K, b.camera.K), (a.camera.K, b.camera.K)
    # and the hand formula: COLMAP's edge-convention principal point scales with the pixels
    src_k = loaded.views[0].source_camera.intrinsics()
    assert src_k.cx == pytest.approx(120.3 * 97 / 240 - 0.5, abs=1e-4)
    assert src_k.cy == pytest.approx(90.7 * 73 / 180 - 0.5, abs=1e-4)


def test_a_point_lands_where_the_lens_model_puts_it(tmp_path):
    """Hand-computed: f = 100, principal point (63.5, 47.5) at pixel centres, k1 = 0.2.
    The point (0.5, -0.25, 1) in camera space has r^2 = 0.3125, so the lens puts it at
    (0.5, -0.25) * 1.0625 = (0.53125, -0.265625), pixel (116.625, 20.9375) of the photo.
    A smooth blob painted there must, after undistortion, be centred on the pixel where the
    undistorted camera projects the point."""
    w, h, f, k1 = 128, 96, 100.0, 0.2
    us, vs = 116.625, 20.9375
    yy, xx = np.mgrid[0:h, 0:w]
    blob = np.exp(-((xx - us) ** 2 + (yy - vs) ** 2) / (2 * 2.0**2))
    root = tmp_path / "lens"
    (root / "sparse" / "0").mkdir(parents=True)
    (root / "images").mkdir()
    Image.fromarray(np.repeat(np.round(blob * 255).astype(np.uint8)[..., None], 3, 2)).save(root / "images" / "a.png")
    (root / "sparse" / "0" / "cameras.txt").write_text(f"1 SIMPLE_RADIAL {w} {h} {f} {w / 2} {h / 2} {k1}\n")
    (root / "sparse" / "0" / "images.txt").write_text("1 1 0 0 0 0 0 0 1 a.png\n\n")
    (root / "sparse" / "0" / "points3D.txt").write_text("1 0.5 -0.25 1 255 255 255 0.5\n")
    scene = load_scene(str(root), undistort=True)
    cam = scene.views[0].camera
    uv, _ = cam.project(torch.tensor([[0.5, -0.25, 1.0]], dtype=torch.float64))
    img = scene.load_image(0)[0].double().numpy()
    img = np.where(img > 0.05, img, 0.0)  # the blob only
    cu, cv = float((img * xx).sum() / img.sum()), float((img * yy).sum() / img.sum())
    assert math.hypot(cu - float(uv[0, 0]), cv - float(uv[0, 1])) < 0.1, (cu, cv, uv)
    # the undistorted camera really differs from the photo's K (else this proves little)
    Kt = cam.to_opencv()[0]
    assert Kt[0, 0] > f * 1.05 and abs(float(uv[0, 0]) - us) > 1.0
    assert os.path.isfile(scene.views[0].image_path)
