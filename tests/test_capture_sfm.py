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
    with Image.open(raw / "view_08.png") as im:  # one portrait photo: the old rule's one camera cannot hold it
        im.transpose(Image.Transpose.ROTATE_90).save(raw / "view_08.png")
    rc = cs.main([str(raw), str(out), "--max-side", "200", "--every", "2", "--sequential", "2", "--single-camera",
                  "--drop-other-sizes"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "WARNING: 1 of 5 photos were not imported" in captured.out and "150x200" in captured.out
    assert "--drop-other-sizes keeps one camera, of size 200x150" in captured.out
    record = json.loads((out / "sfm.json").read_text())
    assert record["images"] == 5 and record["options"]["matching"].startswith("sequential (overlap 2")
    assert record["options"]["other_sizes"] == "drop" and record["cameras"] == 1
    assert record["photos_per_size"] == {"200x150": 4, "150x200": 1}
    assert record["photos_not_imported"] == ["view_08.jpg"] and record["registered_images"] <= 4
    with Image.open(out / "images" / "view_02.jpg") as im:
        assert im.size == (200, 150)


PORTRAIT = (1, 4, 6, 9)  # the views turned portrait (a phone held upright): 4 of 10, among the landscape ones


def _render_room_both_orientations(raw) -> np.ndarray:
    """_render_room's 10 views with PORTRAIT turned a quarter counter-clockwise: the same lens
    (f = 280 px) rolled 90 degrees about its axis, a 240x320 photo (no mirror: SIFT would not
    match a transposed one, and no camera takes one)."""
    truth = _render_room(raw, n_views=10)
    for i in PORTRAIT:
        with Image.open(raw / f"view_{i:02d}.png") as im:
            im.transpose(Image.Transpose.ROTATE_90).save(raw / f"view_{i:02d}.png")
    return truth


def test_single_camera_gives_each_orientation_one_camera(tmp_path, capsys):
    """--single-camera with portrait and landscape photos of one lens: every photo imported and
    registered, one camera per size whose focal lengths agree with each other and with the
    renderer's; before, the 4 portrait photos were skipped by COLMAP."""
    pycolmap = pytest.importorskip("pycolmap", reason="pycolmap (optional) is not installed in this environment")
    raw, out = tmp_path / "raw", tmp_path / "out"
    truth = _render_room_both_orientations(raw)
    rc = cs.main([str(raw), str(out), "--max-side", "320", "--single-camera", "--threads", "1"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "WARNING" not in captured.out
    assert "2 camera(s) for 10 photos: 320x240: 6 photos, camera 1; 240x320: 4 photos, camera 2" in captured.out
    record = json.loads((out / "sfm.json").read_text())
    assert record["images"] == 10 and record["photos_not_imported"] == [] and record["cameras"] == 2
    assert record["photos_per_size"] == {"320x240": 6, "240x320": 4}
    assert record["options"]["other_sizes"] == "camera" and record["options"]["threads"] == 1
    rec = pycolmap.Reconstruction(str(out / "sparse" / "0"))
    assert record["registered_images"] == rec.num_reg_images() == 10
    sizes = {(c.width, c.height): c for c in rec.cameras.values()}
    assert sorted(sizes) == [(240, 320), (320, 240)]
    f_land, f_port = sizes[(320, 240)].params[0], sizes[(240, 320)].params[0]
    assert abs(f_land - 280.0) < 3.0 and abs(f_port - 280.0) < 3.0 and abs(f_land - f_port) < 3.0
    assert [(c["size"], c["registered_images"]) for c in record["model_cameras"]] == [("320x240", 6),
                                                                                       ("240x320", 4)]
    assert [c["params"][0] for c in record["model_cameras"]] == [f_land, f_port]
    for img in rec.images.values():
        cam = rec.cameras[img.camera_id]
        assert (cam.width, cam.height) == ((240, 320) if int(img.name[5:7]) in PORTRAIT else (320, 240)), img.name
    names = [img.name for img in rec.images.values()]
    got = np.array([img.projection_center() for img in rec.images.values()])
    assert _similarity_residual(got, truth[[int(n[5:7]) for n in names]]) < 0.02  # 2 cm, as above

    # The old rule (--drop-other-sizes, pinned for the validation capture flowerpot): one
    # camera, the first photo's size; COLMAP skips the 4 portrait photos.
    old = tmp_path / "old"
    rc = cs.main([str(raw), str(old), "--max-side", "320", "--single-camera", "--drop-other-sizes", "--threads", "1"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "WARNING: 4 of 10 photos were not imported" in captured.out
    record = json.loads((old / "sfm.json").read_text())
    assert record["photos_not_imported"] == [f"view_{i:02d}.jpg" for i in PORTRAIT] and record["cameras"] == 1
    assert record["registered_images"] <= 6 and [c["size"] for c in record["model_cameras"]] == ["320x240"]


def test_sequential_matching_pairs_neighbours_by_name_across_sizes(tmp_path, capsys):
    """--single-camera extracts one size at a time, so COLMAP numbers the photos size by size;
    --sequential must still pair each photo with its next ones in name order, whatever their
    size: three sizes (landscape, portrait, a centred 300x240 crop), names with a space and a
    non-ASCII letter, every photo registered, each in a camera of its own copy's size."""
    pytest.importorskip("pycolmap", reason="pycolmap (optional) is not installed in this environment")
    import sqlite3

    raw, out = tmp_path / "raw", tmp_path / "out"
    _render_room_both_orientations(raw)
    for i in (3, 7):  # a third size, same lens and centre
        with Image.open(raw / f"view_{i:02d}.png") as im:
            im.crop((10, 0, 310, 240)).save(raw / f"view_{i:02d}.png")
    os.rename(raw / "view_05.png", raw / "vue 05 é.png")  # sorts last
    rc = cs.main([str(raw), str(out), "--max-side", "320", "--single-camera", "--sequential", "2",
                  "--threads", "1"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    record = json.loads((out / "sfm.json").read_text())
    assert record["photos_per_size"] == {"320x240": 4, "240x320": 4, "300x240": 2} and record["cameras"] == 3
    assert record["photos_not_imported"] == [] and record["registered_images"] == 10
    con = sqlite3.connect(out / "database.db")
    try:
        cams = {cid: (w, h) for cid, w, h in con.execute("SELECT camera_id, width, height FROM cameras")}
        images = {iid: (name, cid) for iid, name, cid in con.execute("SELECT image_id, name, camera_id FROM images")}
        pair_ids = [pid for (pid,) in con.execute("SELECT pair_id FROM matches")]
    finally:
        con.close()
    for name, cid in images.values():
        with Image.open(out / "images" / name) as im:
            assert im.size == cams[cid], name
    by_name = sorted(name for name, _ in images.values())
    by_id = [images[i][0] for i in sorted(images)]
    assert by_id != by_name  # numbered size by size: an order by id would pair other photos
    # COLMAP's pair id: id1 * 2147483647 + id2 (id1 < id2)
    pairs = {frozenset((images[p // 2147483647][0], images[p % 2147483647][0])) for p in pair_ids}
    expected = {frozenset((by_name[k], by_name[k + d])) for d in (1, 2) for k in range(len(by_name) - d)}
    assert pairs == expected
    size = {name: cams[cid] for name, cid in images.values()}
    # sizes in name order L P L C P P C L P L: 8 of the 9 next-photo pairs and 6 of the 8
    # second-next ones join two sizes
    assert sum(len({size[n] for n in pair}) == 2 for pair in pairs) == 14


def test_drop_other_sizes_needs_single_camera_and_threads_are_checked(tmp_path, capsys):
    """Bad combinations exit with status 2 before anything is read (no pycolmap needed)."""
    raw = tmp_path / "raw"
    _photos(raw, 3)
    rc, err = _run([str(raw), str(tmp_path / "out"), "--drop-other-sizes"], capsys)
    assert rc == 2 and "--drop-other-sizes applies only with --single-camera" in err
    for bad in ("0", "-2"):
        rc, err = _run([str(raw), str(tmp_path / "out"), "--threads", bad], capsys)
        assert rc == 2 and f"--threads must be >= 1, or -1 for all cores, got {bad}" in err
    with pytest.raises(cs.CaptureSfmError, match="other_sizes must be one of"):
        cs.capture_sfm(str(raw), str(tmp_path / "out"), single_camera=True, other_sizes="keep")
    assert _leftovers(tmp_path) == []


def test_cli_defaults_and_new_flags_reach_capture_sfm(tmp_path, monkeypatch):
    """--threads defaults to all cores (-1); --single-camera alone asks for a camera per size,
    with --drop-other-sizes for the old rule."""
    calls = []
    monkeypatch.setattr(cs, "capture_sfm", lambda *a, **k: calls.append(a))
    assert cs.main(["raw", "out"]) == 0
    assert cs.main(["raw", "out", "--single-camera"]) == 0
    assert cs.main(["raw", "out", "--single-camera", "--drop-other-sizes", "--threads", "1"]) == 0
    assert [(c[4], c[5], c[8]) for c in calls] == [(-1, False, "camera"), (-1, True, "camera"), (1, True, "drop")]


def test_prepare_capture_takes_a_camera_per_orientation(tmp_path):
    """What capture-sfm --single-camera now writes for a phone capture, a model with a landscape
    and a portrait SIMPLE_RADIAL camera of one lens, prepares: each photo at its own orientation,
    its pinhole camera hand-computed, every point on its own colour in every view."""
    pytest.importorskip("hydra", reason="prepare-capture's stack (torch, hydra) is not installed here")
    sys.path.insert(0, os.path.dirname(__file__))
    from test_capture_import import K1, F, H, W, _focal_scale, _hits, write_capture

    from npbgpp_core.datasets import load_scene
    from npbgpp_core.datasets.capture import prepare_capture

    src, dst = tmp_path / "src", tmp_path / "dst"
    pts, cols = write_capture(str(src), n_views=4)
    # Views 2 and 4 (image ids) turned a quarter counter-clockwise: a point at (x, y) of the
    # W x H photo is at (y, W - x) of the H x W one, i.e. camera axes (X, Y, Z) -> (Y, -X, Z)
    # (rotation -90 degrees about Z, quaternion (cos 45, 0, 0, -sin 45)) and principal point
    # (H/2, W/2); the radial distortion depends on the radius only, so k1 is the same.
    roll = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    lines = (src / "sparse" / "0" / "images.txt").read_text().split("\n")
    for k, line in enumerate(lines):
        tok = line.split()
        if tok and int(tok[0]) in (2, 4):
            t = roll @ np.array([float(x) for x in tok[5:8]])
            lines[k] = f"{tok[0]} {np.sqrt(0.5)} 0 0 {-np.sqrt(0.5)} {t[0]} {t[1]} {t[2]} 2 {tok[9]}"
            photo = src / "images" / tok[9]
            with Image.open(photo) as im:
                im.transpose(Image.Transpose.ROTATE_90).save(photo, quality=98)
    (src / "sparse" / "0" / "images.txt").write_text("\n".join(lines))
    with open(src / "sparse" / "0" / "cameras.txt", "a") as f:
        f.write(f"2 SIMPLE_RADIAL {H} {W} {F} {H / 2} {W / 2} {K1}\n")

    summary = prepare_capture(str(src), str(dst), max_size=120)
    assert summary["images"] == 4 and summary["image_sizes"] == ["120x90", "90x120"]
    scene = load_scene(str(dst))
    s = _focal_scale(59.5, 44.5, 100.0)  # as test_capture_import's landscape camera: the short side binds
    for i, v in enumerate(scene.views):  # in name order: view_00 .. view_03
        K, R, t = v.camera.to_opencv()
        portrait = i in (1, 3)
        with Image.open(v.image_path) as im:
            assert im.size == ((90, 120) if portrait else (120, 90))
        centre = (44.5, 59.5) if portrait else (59.5, 44.5)
        np.testing.assert_allclose(K, [[100 * s, 0, centre[0]], [0, 100 * s, centre[1]], [0, 0, 1]], atol=1e-4)
        np.testing.assert_allclose(R, roll if portrait else np.eye(3), atol=1e-6)
    assert _hits(scene, pts, cols) > 0.97


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
