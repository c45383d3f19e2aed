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
from npbgpp_core.datasets.distortion import EDGE_MARGIN
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


def _focal_scale(cx: float, cy: float, f: float) -> float:
    """Focal scale s of the undistorted camera of SIMPLE_RADIAL(f, cx, cy, K1) with the principal
    point at the image centre (cx >= cy): the corner pixel samples EDGE_MARGIN inside the photo's
    corner along the shorter side."""
    a = 1.0 - EDGE_MARGIN / cy
    roots = np.roots([a, -1.0, 0.0, -K1 * (cx * cx + cy * cy) / (f * f)])
    return max(r.real for r in roots if abs(r.imag) < 1e-9)


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
    # half the pixels: f 200 -> 100; COLMAP's centre 120 (edge convention) -> 60 -> 59.5 at pixel centres.
    # Then the pincushion (k1 > 0) narrows the view until the corner pixel (0, 0) samples the
    # photo's corner pixel, EDGE_MARGIN inside (the shorter side, 44.5 px from the centre, binds
    # first): 44.5 (1 + k1 r^2) / s = 44.5 - m with r^2 = (59.5^2 + 44.5^2) / (100 s)^2,
    # i.e. (1 - m / 44.5) s^3 - s^2 - k1 (59.5^2 + 44.5^2) / 100^2 = 0.
    s = _focal_scale(59.5, 44.5, 100.0)
    assert 1.09 < s < 1.1
    np.testing.assert_allclose(K, [[100 * s, 0, 59.5], [0, 100 * s, 44.5], [0, 0, 1]], atol=1e-4)
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
    cx, cy = W / 2 - 0.5, H / 2 - 0.5  # the corner pixel binds, as in the test above
    s = _focal_scale(cx, cy, F)
    np.testing.assert_allclose(K, [[F * s, 0, cx], [0, F * s, cy], [0, 0, 1]], atol=2e-4)


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


# ------------------------------------------------------------------ --orient z-up
def _yaw_ring_poses(G: np.ndarray, n: int = 8, pitch_deg: float = 20.0, rolls=None) -> list:
    """World-to-camera (R, t) of ``n`` cameras on a ring about the origin, looking at it from
    ``pitch_deg`` above, upright in a Z-up frame that ``G`` rotates into the capture's frame
    (capture point = G @ upright point); ``rolls`` (degrees) turns each about its optical axis."""
    out = []
    for i in range(n):
        yaw = 2 * np.pi * i / n
        p = np.radians(pitch_deg)
        f = -np.array([np.cos(p) * np.cos(yaw), np.cos(p) * np.sin(yaw), np.sin(p)])  # towards the origin
        right = np.cross(f, [0.0, 0.0, 1.0])
        right /= np.linalg.norm(right)
        R = np.stack([right, np.cross(f, right), f])  # OpenCV rows: x right, y down, z forward
        if rolls is not None:
            a = np.radians(rolls[i])
            R = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) @ R
        R = R @ G.T
        centre = G @ (-5.0 * f)
        out.append((R, -R @ centre))
    return out


def _write_posed_capture(root: str, poses: list, pts: np.ndarray, cols: np.ndarray) -> None:
    """A text COLMAP capture with the given poses (photos are placeholders of the camera's size)."""
    from npbgpp_core.datasets.colmap import rotation_to_quaternion

    os.makedirs(os.path.join(root, "sparse", "0"))
    os.makedirs(os.path.join(root, "images"))
    with open(os.path.join(root, "sparse", "0", "cameras.txt"), "w") as f:
        f.write(f"1 PINHOLE {W} {H} {F} {F} {W / 2} {H / 2}\n")
    with open(os.path.join(root, "sparse", "0", "images.txt"), "w") as f:
        for i, (R, t) in enumerate(poses):
            q = rotation_to_quaternion(R)
            f.write(f"{i + 1} {' '.join(repr(float(x)) for x in (*q, *t))} 1 v{i:02d}.png\n\n")
            Image.new("RGB", (W, H), (90, 90, 90)).save(os.path.join(root, "images", f"v{i:02d}.png"))
    with open(os.path.join(root, "sparse", "0", "points3D.txt"), "w") as f:
        for i, (p, c) in enumerate(zip(pts, cols, strict=True)):
            f.write(f"{i + 1} {p[0]!r} {p[1]!r} {p[2]!r} {c[0]} {c[1]} {c[2]} 0.5\n")


def _random_rotation(seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def test_prepare_capture_never_replaces_its_source(tmp_path):
    """--out naming the source capture (or a folder holding it) with --overwrite replaced the
    capture with its downscaled copy: the original photos and model deleted. Refused by
    name, the source untouched."""
    src = tmp_path / "caps" / "src"
    write_capture(str(src))
    before = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}
    for out in (src, tmp_path / "caps"):
        with pytest.raises(DatasetError, match="the output folder holds the capture it reads"):
            prepare_capture(str(src), str(out), overwrite=True)
    assert {p: p.read_bytes() for p in src.rglob("*") if p.is_file()} == before
    assert sorted(os.listdir(tmp_path / "caps")) == ["src"]


def test_rotation_helpers_against_direct_checks():
    from npbgpp_core.datasets.capture import rotation_to_z_up
    from npbgpp_core.datasets.colmap import quaternion_to_rotation, rotation_to_quaternion

    rng = np.random.default_rng(1)
    quats = [rng.normal(size=4) for _ in range(50)] + [np.array(v, float) for v in (
        (1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1), (0, 1, 1, 0))]  # half turns: w = 0
    for q in quats:
        R = quaternion_to_rotation(q)
        np.testing.assert_allclose(quaternion_to_rotation(rotation_to_quaternion(R)), R, atol=1e-12)
    for up in [*rng.normal(size=(20, 3)), (0, 0, 1.0), (0, 0, -1.0), (1e-9, 0, -1.0), (0, 1.0, 0)]:
        u = np.asarray(up, float) / np.linalg.norm(up)
        Q = rotation_to_z_up(u)
        np.testing.assert_allclose(Q @ u, [0, 0, 1], atol=1e-9)
        np.testing.assert_allclose(Q @ Q.T, np.eye(3), atol=1e-9)
        assert abs(np.linalg.det(Q) - 1.0) < 1e-9


def test_orient_z_up_rotates_poses_and_points_and_keeps_every_projection(tmp_path):
    import torch

    from npbgpp_core.models.alignment import estimate_world_up

    G = _random_rotation(7)
    pts = np.random.default_rng(2).uniform(-1, 1, size=(200, 3))
    cols = np.random.default_rng(3).integers(0, 256, size=(200, 3))
    src = str(tmp_path / "src")
    _write_posed_capture(src, _yaw_ring_poses(G), pts, cols)
    keep, zup = str(tmp_path / "keep"), str(tmp_path / "zup")
    prepare_capture(src, keep, max_size=1000)
    summary = prepare_capture(src, zup, max_size=1000, orient="z-up", provenance={"use": "train"})

    # The cameras are upright in the frame G maps from, so the capture's up is G's image of +Z.
    np.testing.assert_allclose(summary["estimated_up"], G[:, 2], atol=1e-9)
    rot = np.asarray(summary["rotation"])
    assert summary["orient"] == "z-up" and abs(np.linalg.det(rot) - 1) < 1e-12
    np.testing.assert_allclose(rot @ G[:, 2], [0, 0, 1], atol=1e-9)
    assert json.load(open(os.path.join(zup, "capture.json")))["rotation"] == summary["rotation"]

    a, b = load_scene(keep), load_scene(zup)
    np.testing.assert_allclose(b.points, pts @ rot.T, atol=1e-5)
    assert max(abs(c) for c in np.asarray(estimate_world_up([v.camera for v in a.views], 0)) - [0, 0, 1]) > 0.1
    assert estimate_world_up([v.camera for v in b.views]) == (0.0, 0.0, 1.0)
    np.testing.assert_allclose(estimate_world_up([v.camera for v in b.views], snap_degrees=0), [0, 0, 1], atol=1e-6)
    for va, vb in zip(a.views, b.views, strict=True):
        uva, da = va.camera.project(torch.as_tensor(a.points, dtype=torch.float64))
        uvb, db = vb.camera.project(torch.as_tensor(b.points, dtype=torch.float64))
        assert bool((da > 3).all())  # every point well in front: no near-plane blow-up
        np.testing.assert_allclose(uvb.numpy(), uva.numpy(), atol=2e-3)  # float32 cameras
        np.testing.assert_allclose(db.numpy(), da.numpy(), rtol=1e-5)


def test_orient_keep_is_the_default_and_unchanged(tmp_path):
    src = str(tmp_path / "src")
    write_capture(src, n_views=2)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    prepare_capture(src, a, max_size=120)
    assert cli_main_rc(["prepare-capture", src, "--out", b, "--max-size", "120", "--orient", "keep"]) == 0
    for rel in ("sparse/0/cameras.bin", "sparse/0/images.bin", "sparse/0/points3D.bin", "capture.json",
                "images/view_00.jpg"):
        assert open(os.path.join(a, rel), "rb").read() == open(os.path.join(b, rel), "rb").read(), rel
    assert "rotation" not in json.load(open(os.path.join(a, "capture.json")))


def cli_main_rc(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exc:
        cli_main(argv)
    return int(exc.value.code or 0)


def test_orient_refuses_cameras_that_disagree_about_up(tmp_path, capsys):
    pts = np.random.default_rng(2).uniform(-1, 1, size=(20, 3))
    cols = np.full((20, 3), 200)
    src = str(tmp_path / "src")
    # half the photos upright, half upside down: the mean image-up direction vanishes
    _write_posed_capture(src, _yaw_ring_poses(np.eye(3), rolls=[0, 180] * 4), pts, cols)
    with pytest.raises(DatasetError, match=r"sparse/0 images: the cameras disagree about up .*length 0\.00"):
        prepare_capture(src, str(tmp_path / "out"), orient="z-up")
    assert cli_main_rc(["prepare-capture", src, "--out", str(tmp_path / "out"), "--orient", "z-up"]) == 2
    assert "--orient keep" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["src"]  # nothing written
    with pytest.raises(DatasetError, match="orient must be one of"):
        prepare_capture(src, str(tmp_path / "out"), orient="y-up")
    prepare_capture(src, str(tmp_path / "out"))  # keep still works


# ------------------------------------------------------------------ mixed training corpus
def test_mixed_corpus_of_blender_scenes_and_captures_loads_and_stages(tmp_path):
    from _train_fixtures import make_tiny_scene

    from headless_train.data import load_scenes
    from headless_train.stage import check_corpus
    from headless_train.stage import main as stage_main
    from npbgpp_core.ply import save_ply

    corpus = tmp_path / "corpus"
    make_tiny_scene(str(corpus / "env_1"), views=5, size=24, n_points=150)
    os.makedirs(corpus / "env_1" / "points")
    save_ply(str(corpus / "env_1" / "points" / "mvs.ply"), np.random.default_rng(0).normal(size=(40, 3)))
    src = str(tmp_path / "src")
    pts, _ = write_capture(src, n_views=5)
    prepare_capture(src, str(corpus / "capture"), max_size=64)

    assert check_corpus(str(corpus)) == ["capture", "env_1"]  # a COLMAP capture counts as a scene
    scenes = load_scenes({"data_root": str(corpus), "format": None, "point_cloud_variants": True,
                          "cache_images": True, "cache_images_max_gb": 1}, None)
    cap, env = scenes
    assert (cap.format, env.format) == ("colmap", "nerf_synthetic")
    np.testing.assert_allclose(cap.points, pts, atol=1e-6)  # no variants: its own SfM cloud
    assert "point_variants" not in cap.metadata and len(cap.train) == 4  # view 0 is the test split
    assert [k for k, _ in env.metadata["point_variants"]] == ["mvs"]
    assert cap.load_image(1).shape == (3, 48, 64)

    work = str(tmp_path / "stage")
    assert stage_main(["--corpus", str(corpus), "--work", work, "--dry-run", "--dry-steps", "1"]) == 0
    calls = json.load(open(os.path.join(work, "stage.json")))
    assert calls[0]["scenes"] == ["capture", "env_1"] and "datasets.format=null" in calls[0]["overrides"]
    assert "scenes ['capture', 'env_1']" in open(os.path.join(work, "train.log")).read()


def test_training_and_export_name_the_dense_cloud_beside_the_sparse_one(tmp_path, caplog):
    """A COLMAP capture whose folder holds COLMAP's dense/0/fused.ply trains and exports from
    the sparse points3D (the loaders' default); headless_train's scene loading and export
    each log one line naming the dense cloud and the setting that picks it. Without it, or
    with it chosen, no such line."""
    import logging

    from headless_train.data import load_scenes
    from headless_train.export import main as export_main
    from npbgpp_core.ply import save_ply
    from npbgpp_core.pretrained import default_weights_path

    data = tmp_path / "data"
    pts, cols = write_capture(str(data / "garden"), n_views=2)
    dcfg = {"data_root": str(data), "format": "colmap", "options": {"undistort": True}}
    caplog.set_level(logging.INFO)
    load_scenes(dcfg, None)
    assert "Also in the folder" not in caplog.text

    (data / "garden" / "dense" / "0").mkdir(parents=True)
    dense = data / "garden" / "dense" / "0" / "fused.ply"
    save_ply(str(dense), pts[:9], cols[:9] / 255.0)
    size = os.path.getsize(dense)
    caplog.clear()
    (scene,) = load_scenes(dcfg, None)
    assert len(scene.points) == len(pts)
    assert f"scene garden: Also in the folder: dense/0/fused.ply ({size} B); choose it with datasets.pc_name=" \
        in caplog.text
    caplog.clear()
    (scene,) = load_scenes({**dcfg, "pc_name": "dense/0/fused.ply"}, None)
    assert len(scene.points) == 9 and "Also in the folder" not in caplog.text

    args = ["--checkpoint", default_weights_path("npbgpp", "object"), "--scene", str(data / "garden"),
            "--device", "cpu", "--views", "all", "--undistort"]
    caplog.clear()
    assert export_main([*args, "--out", str(tmp_path / "a.npbgpp")]) == 0
    assert f"scene garden: Also in the folder: dense/0/fused.ply ({size} B); choose it with --pc-name" \
        in caplog.text
    caplog.clear()
    assert export_main([*args, "--out", str(tmp_path / "b.npbgpp"), "--pc-name", "dense/0/fused.ply"]) == 0
    assert "Also in the folder" not in caplog.text


def test_photos_over_pils_limit_refused_by_the_readers_and_read_by_prepare_capture(tmp_path, monkeypatch):
    """PIL refuses images of more than twice Image.MAX_IMAGE_PIXELS (179 MP by default; lowered
    here so that the 240x180 photos, 43,200 pixels, are over it): loading the dataset or reading
    a photo is a DatasetError naming the photo, its pixels and prepare-capture (it was PIL's own
    DecompressionBombError, naming no file), and prepare-capture reads photos as big as their
    camera states, so the copy it advises can be made. Between the limit and twice it photos
    are read, with PIL's warning (a 100-MP photo by default). A photo larger than its camera
    states stays refused."""
    from npbgpp_core.datasets.images import read_image

    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    write_capture(src, n_views=2)
    photo = os.path.join(src, "images", "view_00.jpg")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40_000)
    with pytest.warns(Image.DecompressionBombWarning):
        assert read_image(photo).shape == (3, H, W)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)
    refused = f"{photo}: the image has 43,200 pixels, more than the 40,000 this project reads"
    for read in (lambda root: load_scene(root, undistort=True), lambda _: read_image(photo)):
        with pytest.raises(DatasetError) as info:
            read(src)
        message = str(info.value)
        assert message.startswith(refused) and "prepare-capture SRC --out DST --max-size 2048" in message

    prepare_capture(src, out, max_size=120)
    assert Image.MAX_IMAGE_PIXELS == 20_000  # raised for the photos' opening only
    assert [v.camera.image_size for v in load_scene(out).views] == [(90, 120)] * 2

    Image.new("RGB", (2 * W, 2 * H)).save(os.path.join(src, "images", "view_01.jpg"))  # 4x its camera's pixels
    bigger = r"view_01\.jpg: the image has 172,800 pixels, more than the 86,400 "
    with pytest.raises(DatasetError, match=bigger) as info:
        prepare_capture(src, str(tmp_path / "out2"), max_size=120)
    # what to do there: not prepare-capture again, which is what failed
    assert str(info.value).endswith(f"Camera 1 in {os.path.join(src, 'sparse', '0')} states {W}x{H}; prepare-capture "
                                    "reads a photo of up to twice its camera's pixels (at most 500,000,000): "
                                    "downscale the photo first (any image editor: the camera is scaled to match) or "
                                    "check that it is this capture's photo")


def test_prepare_capture_reads_no_more_than_its_bound_whatever_a_camera_states(tmp_path, monkeypatch):
    """A cameras file stating a huge camera must not let prepare-capture decode a decompression
    bomb (a few-MB PNG claiming 10 gigapixels is 30 GB as RGB): it reads photos up to twice its
    camera's pixels but never more than MAX_PHOTO_PIXELS. Scaled down here: PIL refuses above
    40,000 pixels, the bound is 60,000, the camera states 1000x the photos' side (43.2 G pixels):
    the capture's 43,200-pixel photos are read, a 172,800-pixel one is refused (it was read: the
    camera's pixels were PIL's limit for it)."""
    from npbgpp_core.datasets import capture

    src = str(tmp_path / "src")
    write_capture(src, n_views=2)
    k = 1000
    with open(os.path.join(src, "sparse", "0", "cameras.txt"), "w") as f:
        f.write(f"1 SIMPLE_RADIAL {W * k} {H * k} {F * k} {W * k / 2} {H * k / 2} {K1}\n")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)
    monkeypatch.setattr(capture, "MAX_PHOTO_PIXELS", 60_000)
    with pytest.warns(Image.DecompressionBombWarning):  # over half the bound: read, with PIL's warning
        prepare_capture(src, str(tmp_path / "out"), max_size=120)
    assert Image.MAX_IMAGE_PIXELS == 20_000
    Image.new("RGB", (2 * W, 2 * H)).save(os.path.join(src, "images", "view_01.jpg"))
    refused = r"view_01\.jpg: the image has 172,800 pixels, more than the 60,000 .* \(at most 60,000\): downscale"
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(DatasetError, match=refused):  # view_00 read
        prepare_capture(src, str(tmp_path / "out2"), max_size=120)
    assert not os.path.exists(tmp_path / "out2")


def test_prepare_capture_reads_tiff_photos_over_pils_limit_as_it_reads_jpegs(tmp_path, monkeypatch):
    """TIFF checks PIL's limit again as it decodes (TiffImageFile.load_prepare), not only when
    the file is opened: prepare-capture raised the limit to the camera's pixels for the opening
    only, so a TIFF photo over PIL's limit (as the JPEGs above) failed with PIL's own
    DecompressionBombError, naming no file, in the very command advised for such photos."""
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    write_capture(src, n_views=2)
    for name in ("view_00.jpg", "view_01.jpg"):  # TIFF content: PIL goes by the bytes, not the name
        path = os.path.join(src, "images", name)
        with Image.open(path) as im:
            im.convert("RGB").save(path, format="TIFF")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # the 43,200-pixel photos are over it
    prepare_capture(src, out, max_size=120)
    assert Image.MAX_IMAGE_PIXELS == 20_000
    assert [v.camera.image_size for v in load_scene(out).views] == [(90, 120)] * 2


def test_prepare_capture_out_of_memory_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """Out of memory while reading a photo (injected: a real one needs gigabytes) was a
    MemoryError traceback; now one line as the refusals (exit 2), what to do, no output folder;
    with --debug the MemoryError itself."""
    from headless_train.prepare_capture import main
    from npbgpp_core.datasets import capture

    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    write_capture(src, n_views=2)

    def no_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate 1.60 GiB for an array with shape (20000, 10000, 3) and data type uint8")

    monkeypatch.setattr(capture, "open_image", no_memory)
    assert main([src, "--out", out]) == 2
    err = capsys.readouterr().err
    assert err == ("prepare-capture: out of host memory (RAM) while reading the photos (Unable to allocate 1.60 GiB "
                   "for an array with shape (20000, 10000, 3) and data type uint8). It reads one photo at a time at "
                   "its own size, about 9 bytes a pixel (a 200-MP photo: 1.7 GB): downscale the largest photos first "
                   "(any image editor: the cameras are scaled to match) or run it on a computer with more memory; "
                   "nothing was written\n"), err
    with pytest.raises(MemoryError, match="Unable to allocate 1.60 GiB"):
        main([src, "--out", out, "--debug"])
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_prepare_capture_reads_photos_as_float_pixels_bit_for_bit(tmp_path, monkeypatch):
    """Undistortion reads each 8-bit photo through datasets.images.float_pixels, the one conversion of
    8-bit pixels, which on every level k is bit for bit the float32(k) / 255 prepare-capture computed
    itself before (so its undistorted photos are unchanged)."""
    import torch

    import npbgpp_core.datasets.capture as capture
    from npbgpp_core.datasets.images import float_pixels

    levels = np.arange(256, dtype=np.uint8)
    by_hand = np.asarray(levels, dtype=np.float32) / 255.0  # the former arithmetic (float32 in numpy < 2 too)
    assert by_hand.dtype == np.float32
    got = float_pixels(torch.from_numpy(levels.copy()))
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy().view(np.uint32), by_hand.view(np.uint32))

    seen = []

    def spy(pixels):
        seen.append((pixels.dtype, tuple(pixels.shape)))
        return float_pixels(pixels)

    monkeypatch.setattr(capture, "float_pixels", spy)
    src = str(tmp_path / "src")
    write_capture(src, n_views=2)
    summary = prepare_capture(src, str(tmp_path / "out"), max_size=120)
    assert summary["undistorted_images"] == 2
    assert seen == [(torch.uint8, (3, 90, 120))] * 2
