"""`prepare-capture`: a synthetic COLMAP capture (text model, distorted camera, photos painted
by projecting known points through the lens model by hand) is downscaled and undistorted;
the loaded result must put every point on its own colour, with hand-computed intrinsics."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from headless_train.cli import main as cli_main
from npbgpp_core.datasets import load_scene
from npbgpp_core.datasets.capture import prepare_capture
from npbgpp_core.datasets.errors import DatasetError

W, H, F, K1 = 240, 180, 200.0, 0.2
HALF = 5  # painted squares are 11x11 source pixels


def _grid_points() -> tuple[np.ndarray, np.ndarray]:
    xn, yn = np.meshgrid(np.linspace(-0.5, 0.5, 13), np.linspace(-0.4, 0.4, 10))
    z = 3.0
    pts = np.stack([xn.ravel() * z, yn.ravel() * z, np.full(xn.size, z)], 1)
    rng = np.random.default_rng(0)
    cols = rng.integers(0, 256, size=(len(pts), 3))
    cols[:, 0] = np.where(cols.sum(1) < 150, 255, cols[:, 0])  # keep every colour away from the grey background
    return pts, cols


def _paint(pts: np.ndarray, cols: np.ndarray, t: np.ndarray) -> Image.Image:
    """Photo of a camera with R = I at -t looking along +Z, SIMPLE_RADIAL(F, W/2, H/2, K1),
    in COLMAP's convention (pixel (i, j) covers [i, i+1) x [j, j+1))."""
    img = np.full((H, W, 3), 128, np.uint8)
    cam = pts + t
    x, y = cam[:, 0] / cam[:, 2], cam[:, 1] / cam[:, 2]
    r = 1.0 + K1 * (x * x + y * y)
    u, v = F * x * r + W / 2, F * y * r + H / 2
    for ui, vi, c in zip(np.floor(u).astype(int), np.floor(v).astype(int), cols, strict=False):
        img[max(vi - HALF, 0):vi + HALF + 1, max(ui - HALF, 0):ui + HALF + 1] = c
    return Image.fromarray(img)


def write_capture(root: str, n_views: int = 3) -> tuple[np.ndarray, np.ndarray]:
    pts, cols = _grid_points()
    os.makedirs(os.path.join(root, "sparse", "0"))
    os.makedirs(os.path.join(root, "images"))
    with open(os.path.join(root, "sparse", "0", "cameras.txt"), "w") as f:
        f.write(f"# test\n1 SIMPLE_RADIAL {W} {H} {F} {W / 2} {H / 2} {K1}\n")
    with open(os.path.join(root, "sparse", "0", "images.txt"), "w") as f:
        for i in range(n_views):
            t = np.array([0.05 * i, -0.03 * i, 0.1 * i])
            f.write(f"{i + 1} 1 0 0 0 {t[0]} {t[1]} {t[2]} 1 view_{i:02d}.jpg\n\n")
            _paint(pts, cols, t).save(os.path.join(root, "images", f"view_{i:02d}.jpg"), quality=98)
    with open(os.path.join(root, "sparse", "0", "points3D.txt"), "w") as f:
        for i, (p, c) in enumerate(zip(pts, cols, strict=False)):
            f.write(f"{i + 1} {p[0]} {p[1]} {p[2]} {c[0]} {c[1]} {c[2]} 0.5\n")
    return pts, cols


def _hits(scene, pts: np.ndarray, cols: np.ndarray, tol: float = 40.0) -> float:
    """Fraction of (view, point) pairs whose projected pixel holds the point's colour."""
    import torch

    good = total = 0
    for v in scene.views:
        img = np.asarray(Image.open(v.image_path).convert("RGB"), np.float64)
        uv, _ = v.camera.project(torch.as_tensor(pts, dtype=torch.float32))
        u, w = np.round(uv.numpy()).astype(int).T
        ok = (u >= 0) & (u < img.shape[1]) & (w >= 0) & (w < img.shape[0])
        diff = np.abs(img[w[ok], u[ok]] - cols[ok]).max(1)
        good += int((diff < tol).sum())
        total += len(pts)
    return good / total


def test_prepare_capture_downscales_undistorts_and_keeps_geometry(tmp_path):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    pts, cols = write_capture(src)
    summary = prepare_capture(src, out, max_size=120, provenance={"repo": "a/b", "use": "validation"})
    assert summary["images"] == 3 and summary["points"] == len(pts)
    assert summary["undistorted_images"] == 3 and summary["image_sizes"] == ["120x90"]
    assert json.load(open(os.path.join(out, "capture.json")))["repo"] == "a/b"
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]  # no temporary folder left

    scene = load_scene(out)  # no undistort=True needed: the output is PINHOLE
    assert scene.format == "colmap" and len(scene.views) == 3
    np.testing.assert_allclose(scene.points, pts, atol=1e-6)
    np.testing.assert_allclose(scene.colors, cols / 255.0, atol=1e-6)
    K, R, t = scene.views[1].camera.to_opencv()
    # half the pixels: f 200 -> 100; COLMAP's centre 120 (edge convention) -> 60 -> 59.5 at pixel centres
    np.testing.assert_allclose(K, [[100, 0, 59.5], [0, 100, 44.5], [0, 0, 1]], atol=1e-4)
    np.testing.assert_allclose(R, np.eye(3), atol=1e-6)
    np.testing.assert_allclose(t, [0.05, -0.03, 0.1], atol=1e-6)
    assert Image.open(scene.views[0].image_path).size == (120, 90)

    assert _hits(scene, pts, cols) > 0.97
    # The reference this must beat: the same photos downscaled without undistortion put
    # the outer points (3-4 px of lens distortion at this size) off their squares.
    outer = (np.abs(pts[:, 0]) > 1.3) | (np.abs(pts[:, 1]) > 1.0)
    assert _hits(scene, pts[outer], cols[outer]) > 0.97
    raw = str(tmp_path / "raw")
    os.makedirs(os.path.join(raw, "images"))
    os.makedirs(os.path.join(raw, "sparse", "0"))
    for name in os.listdir(os.path.join(src, "images")):
        Image.open(os.path.join(src, "images", name)).resize((120, 90), Image.Resampling.LANCZOS).save(
            os.path.join(raw, "images", name), quality=98)
    with open(os.path.join(raw, "sparse", "0", "cameras.txt"), "w") as f:
        f.write(f"1 SIMPLE_PINHOLE {W} {H} {F} {W / 2} {H / 2}\n")
    for name in ("images.txt", "points3D.txt"):
        with open(os.path.join(src, "sparse", "0", name)) as a, open(os.path.join(raw, "sparse", "0", name), "w") as b:
            b.write(a.read())
    assert _hits(load_scene(raw), pts[outer], cols[outer]) < 0.6


def test_prepare_capture_keeps_small_photos_and_png(tmp_path):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    write_capture(src, n_views=2)
    s = prepare_capture(src, out, max_size=1000, image_format="png")
    assert s["image_sizes"] == [f"{W}x{H}"]
    assert sorted(os.listdir(os.path.join(out, "images"))) == ["view_00.png", "view_01.png"]
    K, _, _ = load_scene(out).views[0].camera.to_opencv()
    np.testing.assert_allclose(K, [[F, 0, W / 2 - 0.5], [0, F, H / 2 - 0.5], [0, 0, 1]], atol=1e-4)


def test_prepare_capture_bad_folders(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="not a COLMAP capture"):
        prepare_capture(str(empty), str(tmp_path / "o1"))
    with pytest.raises(DatasetError, match="capture folder not found"):
        prepare_capture(str(tmp_path / "nowhere"), str(tmp_path / "o1"))

    src = str(tmp_path / "src")
    write_capture(src)
    os.remove(os.path.join(src, "images", "view_02.jpg"))
    out = str(tmp_path / "o2")
    with pytest.raises(DatasetError, match=r"view_02\.jpg: photo of .* not found"):
        prepare_capture(src, out)
    assert sorted(os.listdir(tmp_path)) == ["empty", "src"]  # no output, no temporary folder

    Image.new("RGB", (100, 100)).save(os.path.join(src, "images", "view_02.jpg"))
    with pytest.raises(DatasetError, match=r"view_02\.jpg: image is 100x100 but camera 1 is 240x180"):
        prepare_capture(src, out)

    os.makedirs(out)
    with pytest.raises(SystemExit) as exc:
        cli_main(["prepare-capture", src, "--out", out])
    assert exc.value.code == 2
    assert "already exists" in capsys.readouterr().err
