"""A corpus folder (scenes + points/<kind>.ply variants): listing, checking, and a clear
error naming the file for each kind of bad folder."""

from __future__ import annotations

import json
import os

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
