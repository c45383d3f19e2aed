"""A corpus folder (scenes + points/<kind>.ply variants): listing, checking, and a clear
error naming the file for each kind of bad folder."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from headless_train.cli import main as cli_main
from npbgpp_core.datasets.corpus import check_corpus, corpus_scenes, point_cloud_variants
from npbgpp_core.datasets.errors import DatasetError
from npbgpp_core.ply import save_ply


def make_scene(root: str, variants=("mvs", "sfm")) -> str:
    os.makedirs(os.path.join(root, "train"))
    frames = []
    for k in range(2):
        Image.new("RGB", (16, 12), (k * 100, 50, 50)).save(os.path.join(root, "train", f"r_{k}.png"))
        m = np.eye(4)
        m[:3, 3] = (0, -3 - k, 0.5)
        m[:3, :3] = [[1, 0, 0], [0, 0, -1], [0, 1, 0]]  # OpenGL camera looking along +y
        frames.append({"file_path": f"./train/r_{k}", "transform_matrix": m.tolist()})
    with open(os.path.join(root, "transforms_train.json"), "w") as f:
        json.dump({"camera_angle_x": 0.9, "frames": frames}, f)
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "points"))
    save_ply(os.path.join(root, "points3d.ply"), rng.normal(size=(50, 3)).astype(np.float32),
             rng.uniform(size=(50, 3)).astype(np.float32))
    for k, kind in enumerate(variants):
        save_ply(os.path.join(root, "points", f"{kind}.ply"), rng.normal(size=(10 + k, 3)).astype(np.float32),
                 rng.uniform(size=(10 + k, 3)).astype(np.float32))
    return root


def test_good_corpus_lists_scenes_and_variants(tmp_path, capsys):
    make_scene(str(tmp_path / "env_2"))
    make_scene(str(tmp_path / "env_1"), variants=("mvs", "sfm", "lidar", "surface"))
    os.makedirs(tmp_path / "env_3.partial")  # still being rendered: skipped
    assert [os.path.basename(s) for s in corpus_scenes(str(tmp_path))] == ["env_1", "env_2"]
    v = point_cloud_variants(str(tmp_path / "env_1"))
    assert sorted(v) == ["lidar", "mvs", "sfm", "surface"] and v["mvs"].endswith(os.path.join("points", "mvs.ply"))
    rows = check_corpus(str(tmp_path), kinds=("mvs", "sfm"))
    assert [r["variants"] for r in rows] == [{"lidar": 12, "mvs": 10, "sfm": 11, "surface": 13},
                                             {"mvs": 10, "sfm": 11}]
    assert rows[0]["views"] == 2 and rows[0]["points"] == 50
    with pytest.raises(SystemExit) as exc:
        cli_main(["check-corpus", str(tmp_path)])
    assert exc.value.code == 0 and "2 scenes OK" in capsys.readouterr().out


def _error(root, kinds=None) -> str:
    with pytest.raises(DatasetError) as exc:
        check_corpus(str(root), kinds)
    return str(exc.value)


def test_bad_corpus_folders_name_the_problem(tmp_path, capsys):
    assert "corpus folder not found" in _error(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    assert "no scene folders found" in _error(tmp_path / "empty")
    (tmp_path / "only_partial" / "env_1.partial").mkdir(parents=True)
    assert "1 unfinished *.partial" in _error(tmp_path / "only_partial")

    bad = tmp_path / "c1"
    make_scene(str(bad / "env_1"))
    (bad / "notes").mkdir()
    msg = _error(bad)
    assert "notes: not a scene folder of corpus" in msg and "transforms_train.json" in msg

    c2 = tmp_path / "c2"
    make_scene(str(c2 / "env_1"))
    os.remove(c2 / "env_1" / "train" / "r_1.png")
    assert "transforms_train.json frames[1]: image for file_path './train/r_1' not found" in _error(c2)

    c3 = tmp_path / "c3"
    make_scene(str(c3 / "env_1"))
    msg = _error(c3, ("mvs", "lidar"))
    assert "env_1/points: point cloud variant(s) lidar missing" in msg and "present: mvs, sfm" in msg

    c4 = tmp_path / "c4"
    make_scene(str(c4 / "env_1"))
    open(c4 / "env_1" / "points" / "sfm.ply", "wb").close()
    assert "points/sfm.ply: empty file" in _error(c4)
    with open(c4 / "env_1" / "points" / "sfm.ply", "wb") as f:
        f.write(b"not a ply at all\n")
    assert "points/sfm.ply" in _error(c4)

    with pytest.raises(SystemExit) as exc:
        cli_main(["check-corpus", str(c4)])
    assert exc.value.code == 2 and "sfm.ply" in capsys.readouterr().err


def test_a_splat_variant_keeps_the_splats_a_scene_cloud_keeps(tmp_path):
    """A points/<kind>.ply variant that is a Gaussian-splat file was read with every splat,
    near-transparent ones as opaque points, while the same file as a scene's cloud keeps
    those with opacity >= 0.1: sigmoid(-5) = 0.0067 and sigmoid(-2.3) = 0.091 go, sigmoid(-2)
    = 0.119 stays (hand-computed). The check, the trainer's variants and stage pack agree."""
    from plyfile import PlyData, PlyElement

    from headless_train.data import _load_variants
    from headless_train.stage import pack
    from npbgpp_core.datasets import load_scene
    from npbgpp_core.ply import load_ply

    scene = make_scene(str(tmp_path / "corpus" / "env_1"), variants=("mvs",))
    names = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1", "scale_2",
             "rot_0", "rot_1", "rot_2", "rot_3"]
    xyz = np.arange(15, dtype=np.float32).reshape(5, 3)
    data = np.zeros(5, [(k, "f4") for k in names])
    for i, c in enumerate("xyz"):
        data[c] = xyz[:, i]
    data["opacity"] = [-5.0, -2.0, -2.3, 0.0, 3.0]
    data["rot_0"] = 1.0
    PlyData([PlyElement.describe(data, "vertex")]).write(os.path.join(scene, "points", "splat.ply"))
    kept = xyz[[1, 3, 4]]
    as_scene = load_scene(scene, pc_name="points/splat.ply").points
    np.testing.assert_array_equal(as_scene, kept)
    assert check_corpus(str(tmp_path / "corpus"))[0]["variants"] == {"mvs": 10, "splat": 3}
    (kind, points), = _load_variants(scene, ("splat",), None)
    assert kind == "splat"
    np.testing.assert_array_equal(points, kept)
    pack(str(tmp_path / "corpus"), str(tmp_path / "packed"), 16, 1000, 10.0)
    np.testing.assert_array_equal(load_ply(tmp_path / "packed" / "env_1" / "points" / "splat.ply").points, kept)


def test_stage_pack_names_a_cloud_no_scene_can_read(tmp_path, capsys):
    """stage pack of a corpus with a Gaussian-splat file none of whose splats reaches opacity
    0.1 (sigmoid(-3) = 0.047, hand-computed) or with a file that is no PLY: a traceback of
    load_ply's ValueError before; now one line naming the file, status 2, nothing written."""
    from plyfile import PlyData, PlyElement

    from headless_train.stage import main as stage_main

    scene = make_scene(str(tmp_path / "corpus" / "env_1"), variants=("mvs",))
    names = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "rot_0"]
    data = np.zeros(4, [(k, "f4") for k in names])
    data["x"] = np.arange(4)
    data["opacity"] = -3.0
    faint = os.path.join(scene, "points", "faint.ply")
    PlyData([PlyElement.describe(data, "vertex")]).write(faint)
    out = tmp_path / "packed"
    args = ["pack", "--corpus", str(tmp_path / "corpus"), "--out", str(out)]
    assert stage_main(args) == 2
    err = capsys.readouterr().err
    assert f"error: {faint}: not a point cloud a scene can read" in err and "no splat has opacity >= 0.1" in err, err
    assert "Traceback" not in err and not out.exists()
    os.remove(faint)
    broken = os.path.join(scene, "points", "broken.ply")
    with open(broken, "w") as f:
        f.write("not a cloud")
    assert stage_main(args) == 2
    assert f"error: {broken}: not a point cloud a scene can read" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["corpus"]


def test_stage_pack_names_a_photo_over_pils_limit_and_a_broken_one(tmp_path, monkeypatch, capsys):
    """stage pack opened corpus photos with PIL's own Image.open: a photo over PIL's limit was
    its DecompressionBombError traceback (naming no file, calling it an attack), a broken one
    an UnidentifiedImageError traceback; now the readers' line naming the photo and its pixels,
    what to do, status 2, nothing written (PIL's limit lowered to 50: PIL refuses above 100
    pixels, the 16x12 photos have 192)."""
    from headless_train.stage import main as stage_main

    scene = make_scene(str(tmp_path / "corpus" / "env_1"), variants=("mvs",))
    photos = [os.path.join(scene, "train", f"r_{k}.png") for k in range(2)]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)
    out = tmp_path / "packed"
    args = ["pack", "--corpus", str(tmp_path / "corpus"), "--out", str(out)]
    assert stage_main(args) == 2
    err = capsys.readouterr().err
    assert any(err == (f"error: {p}: the image has 192 pixels, more than the 100 this project reads (PIL's guard "
                       "against decompression bombs, files that claim a huge image). Downscale it first (any image "
                       "editor), or leave its scene out with --scenes (nothing was written)\n") for p in photos), err
    assert not out.exists()
    monkeypatch.undo()
    for p in photos:
        with open(p, "wb") as f:
            f.write(b"not a photo")
    assert stage_main(args) == 2
    err = capsys.readouterr().err
    assert any(err.startswith(f"error: {p}: not an image PIL reads (cannot identify image file") for p in photos), err
    assert err.rstrip().endswith("fix or remove it, or leave its scene out with --scenes (nothing was written)"), err
    assert sorted(os.listdir(tmp_path)) == ["corpus"]


def test_stage_pack_out_of_memory_names_the_photo_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """Out of memory reading a corpus photo (injected: a real one needs gigabytes) was a
    MemoryError traceback; now one line naming the photo, what to do, status 2, nothing written."""
    from headless_train import stage

    make_scene(str(tmp_path / "corpus" / "env_1"), variants=("mvs",))

    def no_memory(path):
        raise MemoryError()

    monkeypatch.setattr(stage, "_open_corpus_image", no_memory)
    out = tmp_path / "packed"
    assert stage.main(["pack", "--corpus", str(tmp_path / "corpus"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"error: out of host memory \(RAM\) while packing \S+\.png \(MemoryError\)\. Downscale it "
                        r"first \(any image editor\), or leave its scene out with --scenes; nothing was written\n",
                        err), err
    assert sorted(os.listdir(tmp_path)) == ["corpus"]
