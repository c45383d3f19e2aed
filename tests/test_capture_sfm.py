"""`capture-sfm`: bad inputs and a missing pycolmap exit with status 2 and leave nothing
behind (these run without pycolmap); with pycolmap installed, photos rendered from known
cameras give back those cameras' centres up to a similarity transform."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

from headless_train import capture_sfm as cs


def _photos(folder, n: int = 3, size: tuple[int, int] = (64, 48)) -> None:
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
            os.path.join(folder, f"p{i:02d}.png"))


def _run(argv: list[str], capsys) -> tuple[int, str]:
    rc = cs.main(argv)
    return rc, capsys.readouterr().err


def _leftovers(tmp_path) -> list[str]:
    return sorted(n for n in os.listdir(tmp_path) if n not in ("raw",))


def test_missing_raw_folder(tmp_path, capsys):
    rc, err = _run([str(tmp_path / "nope"), str(tmp_path / "out")], capsys)
    assert rc == 2 and "nope: no such folder of photos" in err
    assert _leftovers(tmp_path) == []


def test_folder_without_photos(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "notes.txt").write_text("not a photo")
    (raw / "sub.jpg").mkdir()  # a folder named like a photo is not one
    rc, err = _run([str(raw), str(tmp_path / "out")], capsys)
    assert rc == 2 and "holds no photos" in err and str(raw) in err
    assert _leftovers(tmp_path) == []


def test_too_few_photos_and_bad_options(tmp_path, capsys):
    raw = tmp_path / "raw"
    _photos(raw, 4)
    rc, err = _run([str(raw), str(tmp_path / "out"), "--every", "2"], capsys)  # p00, p02
    assert rc == 2 and "2 photo(s) selected, at least 3" in err
    rc, err = _run([str(raw), str(tmp_path / "out"), "--every", "0"], capsys)
    assert rc == 2 and "--every must be >= 1" in err
    rc, err = _run([str(raw), str(tmp_path / "out"), "--sequential", "-1"], capsys)
    assert rc == 2 and "--sequential must be >= 0" in err
    assert _leftovers(tmp_path) == []


def test_photos_whose_copies_would_collide(tmp_path, capsys):
    raw = tmp_path / "raw"
    _photos(raw, 3)
    Image.new("RGB", (8, 8)).save(raw / "p01.jpg")
    rc, err = _run([str(raw), str(tmp_path / "out")], capsys)
    assert rc == 2 and "p01.jpg and p01.png differ only in their suffix" in err


def test_existing_output_is_kept(tmp_path, capsys):
    raw, out = tmp_path / "raw", tmp_path / "out"
    _photos(raw, 3)
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, err = _run([str(raw), str(out)], capsys)
    assert rc == 2 and "exists and is not empty" in err and "--overwrite" in err
    assert os.listdir(out) == ["keep.txt"] and _leftovers(tmp_path) == ["out"]


def test_output_holding_the_photos_is_refused(tmp_path, capsys):
    """OUT_DIR naming the photo folder (or its parent) with --overwrite would replace the
    photos with the model built from them; refused before anything is read or written."""
    raw = tmp_path / "raw"
    _photos(raw, 3)
    before = {p.name: p.read_bytes() for p in raw.iterdir()}
    for out in (raw, tmp_path):
        rc, err = _run([str(raw), str(out), "--overwrite"], capsys)
        assert rc == 2 and "the output folder holds the photos it reads" in err, err
    assert {p.name: p.read_bytes() for p in raw.iterdir()} == before and os.listdir(tmp_path) == ["raw"]


def test_missing_pycolmap_says_it_is_optional(tmp_path, capsys, monkeypatch):
    raw, out = tmp_path / "raw", tmp_path / "out"
    _photos(raw, 3)
    monkeypatch.setitem(sys.modules, "pycolmap", None)  # makes `import pycolmap` raise ImportError
    rc, err = _run([str(raw), str(out)], capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1
    for part in ("optional", "pip install pycolmap", "separate", "prepare-capture accepts any COLMAP model",
                 "COLMAP GUI"):
        assert part in lines[0]
    assert _leftovers(tmp_path) == []  # neither out nor out.partial-<pid>


def test_cli_dispatches_capture_sfm(tmp_path, capsys, monkeypatch):
    pytest.importorskip("hydra")
    from headless_train.cli import main as cli_main

    raw = tmp_path / "raw"
    _photos(raw, 3)
    monkeypatch.setitem(sys.modules, "pycolmap", None)
    with pytest.raises(SystemExit) as exc:
        cli_main(["capture-sfm", str(raw), str(tmp_path / "out")])
    assert exc.value.code == 2 and "pip install pycolmap" in capsys.readouterr().err


def _look_at(centre: np.ndarray, target: np.ndarray) -> np.ndarray:
    """World-to-camera rotation (COLMAP: x right, y down, z forward) looking at ``target``, up = +Z."""
    fwd = (target - centre) / np.linalg.norm(target - centre)
    right = np.cross(fwd, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    down = np.cross(fwd, right)
    return np.stack([right, down, fwd])


def _texture(rng: np.random.Generator, s: np.ndarray, t: np.ndarray, cells: int = 48) -> np.ndarray:
    """Bilinearly interpolated random colours on a ``cells`` x ``cells`` grid over [0, 1]^2."""
    grid = rng.integers(0, 256, (cells + 1, cells + 1, 3)).astype(np.float64)
    x, y = np.clip(s, 0, 1) * cells, np.clip(t, 0, 1) * cells
    i, j = np.minimum(x.astype(int), cells - 1), np.minimum(y.astype(int), cells - 1)
    fx, fy = (x - i)[..., None], (y - j)[..., None]
    return ((1 - fx) * (1 - fy) * grid[i, j] + fx * (1 - fy) * grid[i + 1, j]
            + (1 - fx) * fy * grid[i, j + 1] + fx * fy * grid[i + 1, j + 1])


def _render_room(folder, n_views: int = 8) -> np.ndarray:
    """Photos (ray-cast, 320x240, f = 280 px) of a textured room corner (two walls and a floor)
    from cameras moving sideways while looking at the corner; returns the camera centres."""
    w, h, f = 320, 240, 280.0
    # plane: (axis, offset, (s axis, s range), (t axis, t range))
    planes = [(0, -2.0, (1, (-4.0, 2.0)), (2, (-1.0, 2.0))),   # left wall x = -2
              (1, 2.0, (0, (-2.0, 3.0)), (2, (-1.0, 2.0))),    # back wall y = 2
              (2, -1.0, (0, (-2.0, 3.0)), (1, (-4.0, 2.0)))]   # floor z = -1
    target = np.array([-1.0, 1.0, -0.2])
    u, v = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    rays_cam = np.stack([(u - w / 2) / f, (v - h / 2) / f, np.ones_like(u)], -1)
    centres = []
    os.makedirs(folder)
    for i in range(n_views):
        c = np.array([0.2 * i, -2.5, 0.3 + 0.05 * i])
        d = rays_cam @ _look_at(c, target)  # world directions (R^T applied row-wise)
        img = np.full((h, w, 3), 128.0)
        depth = np.full((h, w), np.inf)
        for k, (axis, off, (sa, (s0, s1)), (ta, (t0, t1))) in enumerate(planes):
            with np.errstate(divide="ignore", invalid="ignore"):
                t = (off - c[axis]) / d[..., axis]
            hit = c + t[..., None] * d
            s_n, t_n = (hit[..., sa] - s0) / (s1 - s0), (hit[..., ta] - t0) / (t1 - t0)
            ok = (t > 0) & (t < depth) & (s_n >= 0) & (s_n <= 1) & (t_n >= 0) & (t_n <= 1)
            img[ok] = _texture(np.random.default_rng(k), s_n[ok], t_n[ok])
            depth[ok] = t[ok]
        Image.fromarray(img.astype(np.uint8)).save(os.path.join(folder, f"view_{i:02d}.png"))
        centres.append(c)
    return np.array(centres)


def _similarity_residual(src: np.ndarray, dst: np.ndarray) -> float:
    """Largest distance after the best similarity transform src -> dst (Umeyama), in dst units."""
    ms, md = src.mean(0), dst.mean(0)
    a, b = src - ms, dst - md
    u, s, vt = np.linalg.svd(b.T @ a)
    d = np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt))])
    rot = u @ d @ vt
    scale = np.trace(np.diag(s) @ d) / (a * a).sum()
    return float(np.linalg.norm(scale * a @ rot.T - b, axis=1).max())


def test_real_run_recovers_known_cameras(tmp_path, capsys):
    pycolmap = pytest.importorskip("pycolmap", reason="pycolmap (optional) is not installed in this environment")
    raw, out = tmp_path / "raw", tmp_path / "out"
    truth = _render_room(raw)
    rc = cs.main([str(raw), str(out), "--max-side", "320", "--single-camera"])
    assert rc == 0, capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["database.db", "images", "sfm.json", "sparse"]
    assert sorted(os.listdir(out / "images")) == [f"view_{i:02d}.jpg" for i in range(8)]
    rec = pycolmap.Reconstruction(str(out / "sparse" / "0"))
    record = json.loads((out / "sfm.json").read_text())
    assert record["images"] == 8 and record["photos_not_imported"] == []
    assert record["registered_images"] == rec.num_reg_images() >= 6
    assert record["points"] == rec.num_points3D() > 100
    assert record["pycolmap_version"] == pycolmap.__version__ and record["options"]["single_camera"] is True
    assert len(rec.cameras) == 1
    cam = next(iter(rec.cameras.values()))
    assert (cam.width, cam.height) == (320, 240) and abs(cam.params[0] - 280.0) < 3.0  # the renderer's focal
    names, got = [], []
    for img in rec.images.values():
        if img.has_pose:
            names.append(img.name)
            got.append(img.projection_center())
    want = truth[[int(n[5:7]) for n in names]]
    assert _similarity_residual(np.array(got), want) < 0.02  # 2 cm; the cameras span 1.4 m


def test_real_run_sequential_with_every(tmp_path, capsys):
    pytest.importorskip("pycolmap", reason="pycolmap (optional) is not installed in this environment")
    raw, out = tmp_path / "raw", tmp_path / "out"
    _render_room(raw, n_views=10)
    with Image.open(raw / "view_08.png") as im:  # one portrait photo: a shared camera cannot hold it
        im.transpose(Image.Transpose.ROTATE_90).save(raw / "view_08.png")
    rc = cs.main([str(raw), str(out), "--max-side", "200", "--every", "2", "--sequential", "2", "--single-camera"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "WARNING: 1 of 5 photos were not imported" in captured.out and "150x200" in captured.out
    record = json.loads((out / "sfm.json").read_text())
    assert record["images"] == 5 and record["options"]["matching"].startswith("sequential (overlap 2")
    assert record["photos_not_imported"] == ["view_08.jpg"] and record["registered_images"] <= 4
    with Image.open(out / "images" / "view_02.jpg") as im:
        assert im.size == (200, 150)


def test_a_photo_over_pils_limit_is_named_with_its_pixels(tmp_path, monkeypatch):
    """PIL refuses images of more than twice Image.MAX_IMAGE_PIXELS (179 MP; lowered here): the
    copying step says which photo, its pixels and what to do, as CaptureSfmError (status 2), not
    PIL's DecompressionBombError naming no file."""
    raw = tmp_path / "raw"
    _photos(raw, 1, size=(64, 48))  # 3,072 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    photo = str(raw / "p00.png")
    with pytest.raises(cs.CaptureSfmError) as info:
        cs.downscale_photos([photo], str(tmp_path / "images"), 32)
    assert str(info.value) == (f"{photo}: the image has 3,072 pixels, more than the 2,000 this project reads (PIL's "
                               "guard against decompression bombs, files that claim a huge image). Downscale the "
                               "photos first (any image editor)")
