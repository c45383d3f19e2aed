"""bench/rebuild_captures.py: the manifest says what the model card's table says, and a
capture committed to a small git repository made here comes back as a prepared capture
(provenance, skipped when finished), with a clear error for a missing snapshot, commit,
path or blob and nothing half-written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, os.path.dirname(__file__))
from test_capture_import import write_capture  # noqa: E402

from bench import rebuild_captures as rc  # noqa: E402
from npbgpp_core.datasets import load_scene  # noqa: E402

CARD = ROOT / "npbgpp_core" / "weights" / "MODEL_CARD.md"


def _card_rows() -> dict[str, list[str]]:
    """The model card's "Real captures" table: name -> its cells."""
    text = CARD.read_text().split("## Real captures", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in text.splitlines():
        m = re.match(r"\| `(\w+)` \|", line)
        if m:
            rows[m.group(1)] = [c.strip() for c in line.strip().strip("|").split("|")]
    return rows


def test_manifest_matches_the_model_card_table():
    rows = _card_rows()
    entries = {e["name"]: e for e in rc.load_manifest()}
    assert len(rows) == 12 and set(entries) == set(rows)
    for name, (_, repo, commit, licence, taken, images, points, use) in rows.items():
        e = entries[name]
        hexes = re.findall(r"\b[0-9a-f]{40}\b", commit)
        assert e["repo"] == repo and e["commit"] == hexes[0], name
        assert e.get("licence_commit") == (hexes[1] if len(hexes) > 1 else None), name
        assert licence.startswith(e["licence"]), name
        assert use.startswith(e["use"]), name
        assert (e["expected"]["images"], e["expected"]["points"]) == (int(images), int(points)), name
        assert e["orient"] == ("z-up" if "Z-up" in taken else "keep"), name
        recomputed = "model recomputed" in taken
        assert (e.get("sparse") is None) == recomputed, name
        if recomputed:  # the capture-sfm options the card names, and no others
            card_opts = re.search(r"model recomputed(?: \(([^)]*)\))?", taken).group(1) or ""
            opts = e["sfm"]
            assert ("--single-camera" in taken) == opts.get("single_camera", False), name
            side = re.search(r"--max-side (\d+)", card_opts)
            assert opts.get("max_side") == (int(side.group(1)) if side else None), name
            every = re.search(r"--every (\d+)", card_opts)
            assert opts.get("every", 1) == (int(every.group(1)) if every else 1), name
            # a model made under the old --single-camera rule (photos of another size skipped) says so
            assert (opts.get("other_sizes") == "drop") == ("`other_sizes: drop`" in taken), name
        for path in (e["images"], e.get("sparse") or ""):
            assert path.rstrip("/") in taken.replace("`", "") or path.split("/")[-1] in taken, (name, path)
        assert e["name"] in {"skull", "lund", "socketed_axe"} or e["use"] == "validation"


def _git(cwd: str, *args: str) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()


def _snapshot(tmp_path) -> tuple[str, str, str]:
    """A repository owner/cap under mirrors/ holding a COLMAP capture in data/ (with one extra
    photo whose blob is then removed, as a snapshot leaves out large files); (mirrors, commit,
    git dir)."""
    work = str(tmp_path / "mirrors" / "owner+cap" / "repo")
    pts, _ = write_capture(os.path.join(work, "data"))
    with open(os.path.join(work, "data", "images", "big.jpg"), "wb") as f:
        f.write(b"not brought")
    _git(work, "init", "-q")
    _git(work, "add", "-A")
    _git(work, "commit", "-q", "-m", "capture")
    commit = _git(work, "rev-parse", "HEAD")
    blob = _git(work, "rev-parse", f"{commit}:data/images/big.jpg")
    os.remove(os.path.join(work, ".git", "objects", blob[:2], blob[2:]))
    return str(tmp_path / "mirrors"), commit, os.path.join(work, ".git")


def _entry(commit: str, **kw) -> dict:
    e = {"name": "cap", "repo": "owner/cap", "commit": commit, "licence": "CC BY 4.0", "use": "validation",
         "images": "data/images", "sparse": "data/sparse/0", "orient": "keep", "expected": {"images": 3, "points": 0}}
    e.update(kw)
    return e


def _manifest(tmp_path, *entries: dict) -> str:
    path = str(tmp_path / "m.json")
    with open(path, "w") as f:
        json.dump({"captures": list(entries)}, f)
    return path


def test_rebuild_from_a_snapshot_then_skip(tmp_path, capsys):
    mirrors, commit, git_dir = _snapshot(tmp_path)
    pts = load_scene(os.path.join(os.path.dirname(git_dir), "data"), undistort=True).points
    out = str(tmp_path / "out")
    man = _manifest(tmp_path, _entry(commit, expected={"images": 3, "points": len(pts)}))
    assert rc.main(["--mirrors", mirrors, "--out", out, "--manifest", man]) == 0
    assert "built" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["cap"]  # no .partial, the work folder removed
    info = json.load(open(os.path.join(out, "cap", "capture.json")))
    assert (info["repo"], info["commit"], info["licence"], info["use"]) == ("owner/cap", commit, "CC BY 4.0",
                                                                            "validation")
    assert info["source"] == f"owner/cap@{commit}:data/images + data/sparse/0"
    record = json.load(open(os.path.join(out, "cap", "rebuild.json")))
    assert record["matches_card"] == {"images": True, "points": True}
    assert record["photos"]["taken"] == 3 and record["photos"]["not_in_snapshot"] == ["big.jpg"]
    scene = load_scene(os.path.join(out, "cap"))
    assert len(scene.views) == 3
    np.testing.assert_allclose(scene.points, pts, atol=1e-6)
    stamp = os.path.getmtime(os.path.join(out, "cap", "capture.json"))
    assert rc.main(["--mirrors", mirrors, "--out", out, "--manifest", man]) == 0
    assert "skipped" in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(out, "cap", "capture.json")) == stamp


@pytest.mark.parametrize("change, message", [
    ({"repo": "owner/other"}, "fetch github:owner/other first"),
    ({"commit": "0" * 40}, "is not in this snapshot: fetch github:owner/cap first"),
    ({"images": "data/photos"}, "no files in data/photos/"),
    ({"sparse": "data/images"}, "the snapshot lacks data/images/big.jpg"),
    ({"images": "data/images", "image_pattern": "*.png"}, "no file of data/images/ matches '*.png'"),
    ({"sparse": None, "sfm": {}, "photos": 9}, "3 photos taken from data/images/, the model card says 9"),
])
def test_missing_snapshot_commit_path_or_blob_is_named(tmp_path, capsys, change, message):
    mirrors, commit, _ = _snapshot(tmp_path)
    out = str(tmp_path / "out")
    man = _manifest(tmp_path, {**_entry(commit), **change})
    assert rc.main(["--mirrors", mirrors, "--out", out, "--manifest", man]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not os.path.exists(os.path.join(out, "cap")) and not os.path.exists(os.path.join(out, "cap.partial"))


@pytest.mark.parametrize("options, tail", [
    ({"single_camera": True, "other_sizes": "drop"}, ["--single-camera", "--drop-other-sizes"]),
    ({"single_camera": True, "other_sizes": "camera"}, ["--single-camera"]),
    ({"single_camera": True}, ["--single-camera"]),
    ({"max_side": 1200, "every": 4}, ["--max-side", "1200", "--every", "4"]),
])
def test_manifest_sfm_options_reach_the_capture_sfm_command(monkeypatch, options, tail):
    """The manifest's sfm options become capture-sfm's flags, always with one thread (every
    recorded run used one; capture-sfm's own default is all cores)."""
    calls = []

    def fake_run(cmd, env):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(rc.subprocess, "run", fake_run)
    rc.run_capture_sfm("raw", "out", options, "py")
    assert calls == [["py", "-m", "headless_train", "capture-sfm", "raw", "out", "--threads", "1", *tail]]


def test_manifest_pins_flowerpot_to_the_old_single_camera_rule(tmp_path):
    """flowerpot's 49 images came from --single-camera dropping its 31 landscape photos: the
    manifest keeps that rule; an unknown other_sizes is refused when the manifest is read."""
    entries = {e["name"]: e for e in rc.load_manifest()}
    assert entries["flowerpot"]["sfm"] == {"single_camera": True, "other_sizes": "drop"}
    assert [n for n, e in entries.items() if "other_sizes" in e.get("sfm", {})] == ["flowerpot"]
    man = _manifest(tmp_path, _entry("0" * 40, sparse=None, sfm={"single_camera": True, "other_sizes": "keep"}))
    with pytest.raises(rc.RebuildError, match=r"capture cap: sfm.other_sizes must be one of \('camera', 'drop'\), "
                                              "got 'keep'"):
        rc.load_manifest(man)


def test_unknown_name_is_refused(tmp_path, capsys):
    man = _manifest(tmp_path, _entry("0" * 40))
    assert rc.main(["--mirrors", str(tmp_path), "--out", str(tmp_path / "o"), "--manifest", man,
                    "--names", "cap,nope"]) == 2
    assert "unknown capture name(s) nope" in capsys.readouterr().err


def test_max_size_reaches_the_prepared_photos(tmp_path, capsys):
    """--max-size is the written photos' long side (the test photos are 240x180), the points
    unchanged; a size below prepare_capture's floor is refused before anything is written."""
    from PIL import Image

    mirrors, commit, git_dir = _snapshot(tmp_path)
    pts = load_scene(os.path.join(os.path.dirname(git_dir), "data"), undistort=True).points
    man = _manifest(tmp_path, _entry(commit, expected={"images": 3, "points": len(pts)}))
    out = str(tmp_path / "out")
    assert rc.main(["--mirrors", mirrors, "--out", out, "--manifest", man, "--max-size", "120"]) == 0
    photos = sorted(os.listdir(os.path.join(out, "cap", "images")))
    assert len(photos) == 3
    for name in photos:
        with Image.open(os.path.join(out, "cap", "images", name)) as im:
            assert im.size == (120, 90)
    assert json.load(open(os.path.join(out, "cap", "capture.json")))["max_size"] == 120
    np.testing.assert_allclose(load_scene(os.path.join(out, "cap")).points, pts, atol=1e-6)
    capsys.readouterr()
    small = str(tmp_path / "small")
    assert rc.main(["--mirrors", mirrors, "--out", small, "--manifest", man, "--max-size", "8"]) == 2
    assert "--max-size must be at least 16 pixels (got 8)" in capsys.readouterr().err
    assert not os.path.exists(small)


# A capture whose model capture-sfm recomputed: the snapshot holds big original photos, the SfM
# cache (``<out>/.work/cap/sfm``, which the rebuild reuses instead of running SfM) the small copies
# capture-sfm's own downscale made and a model at their size.
SFM_SIDE = 120


def _sfm_capture(tmp_path, originals: dict[str, Image.Image], f: float, k1: float,
                 points: np.ndarray) -> tuple[str, str, dict, str]:
    """(mirrors, out, manifest entry, sfm folder) for photos ``originals`` (name -> image, EXIF
    kept) whose SfM model is SIMPLE_RADIAL(f, w/2, h/2, k1) at the copies' size, poses R = I at
    -t_i (t_i as in test_capture_import's write_capture)."""
    from headless_train.capture_sfm import downscale_photos

    work = tmp_path / "mirrors" / "owner+cap" / "repo"
    (work / "data" / "photos").mkdir(parents=True)
    for name, im in originals.items():
        im.save(work / "data" / "photos" / name, quality=98, exif=im.info.get("exif", b""))
    _git(str(work), "init", "-q")
    _git(str(work), "add", "-A")
    _git(str(work), "commit", "-q", "-m", "photos")
    commit = _git(str(work), "rev-parse", "HEAD")
    out = str(tmp_path / "out")
    sfm = os.path.join(out, ".work", "cap", "sfm")
    downscale_photos([str(work / "data" / "photos" / n) for n in sorted(originals)], os.path.join(sfm, "images"),
                     SFM_SIDE)
    names = sorted(os.listdir(os.path.join(sfm, "images")))
    with Image.open(os.path.join(sfm, "images", names[0])) as im:
        w, h = im.size
    os.makedirs(os.path.join(sfm, "sparse", "0"))
    with open(os.path.join(sfm, "sparse", "0", "cameras.txt"), "w") as fh:
        fh.write(f"1 SIMPLE_RADIAL {w} {h} {f} {w / 2} {h / 2} {k1}\n")
    with open(os.path.join(sfm, "sparse", "0", "images.txt"), "w") as fh:
        for i, n in enumerate(names):
            t = np.array([0.05 * i, -0.03 * i, 0.1 * i])
            fh.write(f"{i + 1} 1 0 0 0 {t[0]} {t[1]} {t[2]} 1 {n}\n\n")
    with open(os.path.join(sfm, "sparse", "0", "points3D.txt"), "w") as fh:
        for i, p in enumerate(points):
            fh.write(f"{i + 1} {p[0]} {p[1]} {p[2]} 200 200 200 0.5\n")
    with open(os.path.join(sfm, "sfm.json"), "w") as fh:
        json.dump({"tool": "test"}, fh)
    entry = _entry(commit, images="data/photos", sparse=None, sfm={"single_camera": True}, photos=len(originals),
                   expected={"images": len(originals), "points": len(points)})
    return str(tmp_path / "mirrors"), out, entry, sfm


@pytest.mark.parametrize("max_size, size", [(1000, (479, 360)), (240, (240, 180))])
def test_bigger_max_size_reads_the_originals_with_cameras_scaled_by_hand(tmp_path, capsys, max_size, size):
    """Originals 479x360, SfM copies 120x90 (capture-sfm's thumbnail), a lens without distortion:
    --max-size above the copies' size writes photos from the originals (never enlarged), with
    f and c scaled by hand per axis in COLMAP's corner-origin pixels (479/120 across, 360/90 down)."""
    originals = {f"view_{i}.jpg": Image.new("RGB", (479, 360), (90 + 40 * i, 128, 128)) for i in range(3)}
    mirrors, out, entry, sfm = _sfm_capture(tmp_path, originals, 100.0, 0.0, np.array([[0.0, 0.0, 3.0]]))
    w, h = 120, 90
    with Image.open(os.path.join(sfm, "images", "view_0.jpg")) as im:
        assert im.size == (w, h)  # capture-sfm's thumbnail rounds 479x360 / 3.99 to 120x90
    assert rc.main(["--mirrors", mirrors, "--out", out, "--manifest", _manifest(tmp_path, entry),
                    "--max-size", str(max_size)]) == 0
    scene = load_scene(os.path.join(out, "cap"))
    sx, sy = size[0] / w, size[1] / h
    for v in scene.views:
        with Image.open(v.image_path) as im:
            assert im.size == size
        K, _, _ = v.camera.to_opencv()
        # COLMAP's c (corner origin) w/2 -> w/2 * sx; K's c is at pixel centres, half a pixel less
        np.testing.assert_allclose([K[0, 0], K[1, 1], K[0, 2], K[1, 2]],
                                   [100.0 * sx, 100.0 * sy, w / 2 * sx - 0.5, h / 2 * sy - 0.5], rtol=1e-6)
    record = json.load(open(os.path.join(out, "cap", "rebuild.json")))
    assert record["photos_read"]["read"].startswith("the original photos")
    assert record["photos_read"]["sfm_photo_sizes"] == ["120x90"]
    assert record["photos_read"]["original_sizes"] == ["479x360"]
    assert not os.path.exists(os.path.join(out, ".work"))


def test_max_size_within_the_sfm_copies_keeps_the_old_result_bit_for_bit(tmp_path):
    """--max-size at or below the SfM copies' size prepares from the copies, as before: the same
    files as prepare_capture of capture-sfm's folder (what the rebuild did for every size)."""
    import shutil

    from npbgpp_core.datasets.capture import prepare_capture

    originals = {f"view_{i}.jpg": Image.fromarray(np.random.default_rng(i).integers(0, 256, (360, 479, 3),
                                                                                    dtype=np.uint8))
                 for i in range(3)}
    mirrors, out, entry, sfm = _sfm_capture(tmp_path, originals, 100.0, 0.05, np.array([[0.0, 0.0, 3.0]]))
    ref_src = str(tmp_path / "ref_src")
    shutil.copytree(sfm, ref_src)
    assert rc.main(["--mirrors", mirrors, "--out", out, "--manifest", _manifest(tmp_path, entry),
                    "--max-size", "100"]) == 0
    ref = str(tmp_path / "ref")
    prepare_capture(ref_src, ref, max_size=100, provenance={}, orient="keep")
    for sub in ("images", os.path.join("sparse", "0")):
        names = sorted(os.listdir(os.path.join(ref, sub)))
        assert names == sorted(os.listdir(os.path.join(out, "cap", sub)))
        for n in names:
            with open(os.path.join(ref, sub, n), "rb") as a, open(os.path.join(out, "cap", sub, n), "rb") as b:
                assert a.read() == b.read(), n
    assert json.load(open(os.path.join(out, "cap", "rebuild.json")))["photos_read"]["read"].startswith(
        "capture-sfm's downscaled copies")


def test_bigger_max_size_projects_points_where_the_sfm_model_saw_them(tmp_path):
    """SIMPLE_RADIAL(50, 60, 45, 0.2) at the 120x90 SfM copies; the 480x360 originals are painted
    by projecting each point by hand through that lens to its position relative to the photo
    (corner origin), times the original's size; one original is stored turned with an EXIF
    orientation, as a phone writes it. Rebuilt at 480 px, each undistorted photo holds every
    point's disc centred where its prepared camera projects the point (within 0.2 px; the
    measured worst is 0.12)."""
    import torch

    f, k1, w, h, big = 50.0, 0.2, 120, 90, 4
    xn, yn = np.meshgrid(np.linspace(-0.45, 0.45, 7), np.linspace(-0.35, 0.35, 5))
    pts = np.stack([xn.ravel() * 3.0, yn.ravel() * 3.0, np.full(xn.size, 3.0)], 1)
    cols = np.array([[255, 40, 40], [40, 255, 40], [40, 40, 255], [255, 255, 40]])[np.arange(len(pts)) % 4]
    originals = {}
    for i in range(3):
        t = np.array([0.05 * i, -0.03 * i, 0.1 * i])
        cam = pts + t
        x, y = cam[:, 0] / cam[:, 2], cam[:, 1] / cam[:, 2]
        r = 1.0 + k1 * (x * x + y * y)
        u_rel, v_rel = (f * x * r + w / 2) / w, (f * y * r + h / 2) / h
        img = np.full((h * big, w * big, 3), 128.0)
        for u, v, c in zip(u_rel * w * big, v_rel * h * big, cols, strict=True):
            x0, y0 = int(u) - 7, int(v) - 7  # discs lie inside the photo and do not overlap
            yy, xx = np.mgrid[0:15 * 4, 0:15 * 4] / 4.0 + 0.125  # 4x4 samples a pixel, corner origin
            disc = (xx + x0 - u) ** 2 + (yy + y0 - v) ** 2 <= 5.0 ** 2  # radius 5 px
            cover = disc.reshape(15, 4, 15, 4).mean((1, 3))
            img[y0:y0 + 15, x0:x0 + 15] += cover[:, :, None] * (c - 128.0)
        im = Image.fromarray(np.round(img).astype(np.uint8))
        if i == 1:  # stored turned a quarter; EXIF orientation 6 turns it upright again
            im = im.transpose(Image.Transpose.ROTATE_90)
            exif = Image.Exif()
            exif[0x0112] = 6
            im.info["exif"] = exif.tobytes()
        originals[f"view_{i}.jpg"] = im
    mirrors, out, entry, _ = _sfm_capture(tmp_path, originals, f, k1, pts)
    assert rc.main(["--mirrors", mirrors, "--out", out, "--manifest", _manifest(tmp_path, entry),
                    "--max-size", str(w * big)]) == 0
    scene = load_scene(os.path.join(out, "cap"))
    checked = 0
    for v in scene.views:
        img = np.asarray(Image.open(v.image_path).convert("RGB"), np.float64)
        assert img.shape == (h * big, w * big, 3)
        uv, _ = v.camera.project(torch.as_tensor(pts, dtype=torch.float32))
        for (u, vv), c in zip(uv.numpy().astype(float), cols, strict=True):
            if not (8 <= u < img.shape[1] - 8 and 8 <= vv < img.shape[0] - 8):
                continue  # the undistorted view is narrower: a border disc is cut
            y0, x0 = int(vv) - 8, int(u) - 8
            win = img[y0:y0 + 17, x0:x0 + 17]
            # the disc's coverage of each pixel (its colour's share against the grey), a linear measure
            weight = np.clip((win - 128.0) @ (c - 128.0) / float((c - 128.0) @ (c - 128.0)), 0.0, 1.0)
            yy, xx = np.mgrid[y0:y0 + 17, x0:x0 + 17]
            cu = (weight * xx).sum() / weight.sum()  # pixel centres at integers, as Camera.project
            cv = (weight * yy).sum() / weight.sum()
            assert abs(cu - u) < 0.2 and abs(cv - vv) < 0.2, (v.image_path, u, vv, cu, cv)
            checked += 1
    assert checked >= 50
    record = json.load(open(os.path.join(out, "cap", "rebuild.json")))["photos_read"]
    assert record["exif_turned_upright"] == ["view_1.jpg"]


# What each EXIF orientation means (the EXIF 2.3 table, independent of PIL's ImageOps): the stored
# pixels are the upright photo put through this transpose (each one the inverse of the viewer's).
STORED_FROM_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                       4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                       6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}


@pytest.mark.parametrize("orientation", sorted(STORED_FROM_UPRIGHT))
def test_bigger_max_size_turns_each_exif_orientation_upright_as_the_sfm_copy(tmp_path, orientation):
    """An original stored turned or mirrored with EXIF orientation 2-8 (random 20-px blocks, no
    symmetry) is prepared upright: the rebuilt photo matches the upright pattern and capture-sfm's
    copy of the same original, both by the EXIF table above."""
    rng = np.random.default_rng(orientation)
    upright = np.kron(rng.integers(0, 2, (12, 16, 1)) * 200 + 28, np.ones((20, 20, 3))).astype(np.uint8)  # 320x240
    originals = {}
    for i in range(3):
        im = Image.fromarray(upright)
        if i == 2:  # PNG: lossless, and the upright copy keeps the original's name
            im = im.transpose(STORED_FROM_UPRIGHT[orientation])
            exif = Image.Exif()
            exif[0x0112] = orientation
            im.info["exif"] = exif.tobytes()
        originals[f"view_{i}.png"] = im
    mirrors, out, entry, sfm = _sfm_capture(tmp_path, originals, 100.0, 0.0, np.array([[0.0, 0.0, 3.0]]))
    copy = np.asarray(Image.open(os.path.join(sfm, "images", "view_2.jpg")).convert("RGB"), np.float64)
    assert copy.shape == (90, 120, 3)  # capture-sfm turned its copy upright (320x240 -> 120x90)
    assert rc.main(["--mirrors", mirrors, "--out", out, "--manifest", _manifest(tmp_path, entry),
                    "--max-size", "320"]) == 0
    got = np.asarray(Image.open(os.path.join(out, "cap", "images", "view_2.jpg")).convert("RGB"), np.float64)
    assert got.shape == upright.shape
    assert np.abs(got - upright).mean() < 3.0  # JPEG q95 of the upright pattern; a wrong turn is ~100 off
    small = np.asarray(Image.fromarray(got.astype(np.uint8)).resize((120, 90), Image.Resampling.LANCZOS), np.float64)
    assert np.abs(small - copy).mean() < 6.0
    record = json.load(open(os.path.join(out, "cap", "rebuild.json")))["photos_read"]
    assert record["exif_turned_upright"] == ["view_2.png"]


def test_an_unreadable_original_is_a_clear_error(tmp_path, capsys):
    """The SfM's copies came from real photos but the snapshot's original is a Git LFS pointer
    (text): the rebuild at a larger --max-size stops with one line naming the photo and the
    size to rebuild at instead (was PIL's traceback), and leaves no prepared folder."""
    originals = {f"view_{i}.jpg": Image.new("RGB", (479, 360), (90 + 40 * i, 128, 128)) for i in range(3)}
    mirrors, out, entry, _ = _sfm_capture(tmp_path, originals, 100.0, 0.0, np.array([[0.0, 0.0, 3.0]]))
    work = tmp_path / "mirrors" / "owner+cap" / "repo"
    (work / "data" / "photos" / "view_1.jpg").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 123456\n")
    _git(str(work), "commit", "-q", "-am", "pointer")
    entry["commit"] = _git(str(work), "rev-parse", "HEAD")
    assert rc.main(["--mirrors", mirrors, "--out", out, "--manifest", _manifest(tmp_path, entry),
                    "--max-size", "479"]) == 2
    err = capsys.readouterr().err
    assert "view_1.jpg: cannot be read as a photo" in err and "rebuild at --max-size 120 or less" in err
    assert len(err.strip().splitlines()) == 1
    assert not os.path.exists(os.path.join(out, "cap")) and not os.path.exists(os.path.join(out, "cap.partial"))


def test_a_photo_is_what_capture_sfm_takes(tmp_path):
    """The rebuild counts and matches photos by capture-sfm's own rule (capture_sfm.is_photo: one
    PHOTO_SUFFIXES, any case): the folders it checks are the ones capture-sfm reads."""
    from headless_train import capture_sfm

    assert rc.is_photo is capture_sfm.is_photo
    for name in ("a.JPG", "b.jpeg", "c.png", "d.txt", "e.tif", "f.heic"):
        (tmp_path / name).write_bytes(b"x")
    assert rc._photo_count(str(tmp_path)) == len(capture_sfm.list_photos(str(tmp_path))) == 3
