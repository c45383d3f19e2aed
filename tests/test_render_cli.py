"""``python -m headless_train render``: a bundle rendered along a dataset's cameras, frames
between views on the straight line / shortest arc, refusals before any frame is written."""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
from _train_fixtures import make_tiny_scene  # noqa: E402

from headless_train.render import interpolate_pose, main  # noqa: E402


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q @ np.diag(np.sign(np.diag(r)))
    return q if np.linalg.det(q) > 0 else -q


def _angle(a: np.ndarray, b: np.ndarray) -> float:
    """Angle of the rotation taking a to b, from the trace (independent of the code's log map)."""
    return math.acos(max(-1.0, min(1.0, (np.trace(a.T @ b) - 1.0) / 2.0)))


@pytest.mark.parametrize("seed", range(5))
def test_frames_between_two_poses_lie_on_the_line_and_the_shortest_arc(seed):
    rng = np.random.default_rng(seed)
    ra, rb = _random_rotation(rng), _random_rotation(rng)
    ca, cb = rng.normal(size=3), rng.normal(size=3)
    r0, c0 = interpolate_pose(ra, ca, rb, cb, 0.0)
    r1, c1 = interpolate_pose(ra, ca, rb, cb, 1.0)
    assert np.allclose(r0, ra, atol=1e-9) and np.allclose(c0, ca)
    assert np.allclose(r1, rb, atol=1e-9) and np.allclose(c1, cb)
    total = _angle(ra, rb)
    for s in (0.25, 0.5, 0.8):
        rs, cs = interpolate_pose(ra, ca, rb, cb, s)
        assert np.allclose(rs @ rs.T, np.eye(3), atol=1e-9) and np.linalg.det(rs) == pytest.approx(1.0)
        assert _angle(ra, rs) == pytest.approx(s * total, abs=1e-7)  # constant speed ...
        assert _angle(rs, rb) == pytest.approx((1 - s) * total, abs=1e-7)  # ... on the shortest arc
        assert np.allclose(cs, ca + s * (cb - ca))


def test_half_turn_between_poses_stays_a_rotation():
    ra = np.eye(3)
    rb = np.diag([1.0, -1.0, -1.0])  # 180 degrees about x
    rs, _ = interpolate_pose(ra, np.zeros(3), rb, np.zeros(3), 0.5)
    assert _angle(ra, rs) == pytest.approx(math.pi / 2, abs=1e-6)
    assert _angle(rs, rb) == pytest.approx(math.pi / 2, abs=1e-6)


@pytest.fixture(scope="module")
def scene_and_bundle(tmp_path_factory):
    import npbgpp_core as nc
    from npbgpp_core.datasets import load_scene

    root = tmp_path_factory.mktemp("render")
    folder = make_tiny_scene(str(root / "scene"), views=4, size=24, n_points=400, splits=(4, 0, 0))
    scene = load_scene(folder)
    torch.manual_seed(0)
    model = nc.NPBGPlusPlus().eval()
    points = torch.from_numpy(scene.points).float()
    with torch.no_grad():
        state = model.begin_scene(points)
        state.add_views(torch.stack([scene.load_image(i) for i in range(2)]), [scene.camera(i) for i in range(2)])
        agg = state.finish()
    bundle = str(root / "scene.npbgpp")
    nc.NeuralScene.from_aggregated(model, agg, name="scene").save(bundle)
    return folder, bundle, scene


def test_render_writes_the_views_and_the_frames_between(scene_and_bundle, tmp_path, capsys):
    import npbgpp_core as nc

    folder, bundle, scene = scene_and_bundle
    out = str(tmp_path / "frames")
    assert main(["--bundle", bundle, "--scene", folder, "--out", out, "--between", "2", "--device", "cpu"]) == 0
    record = json.load(open(os.path.join(out, "frames.json")))
    frames = record["frames"]
    assert len(frames) == 4 + 2 * 3  # every view, 2 frames between each consecutive pair
    assert sorted(os.listdir(out)) == sorted(["frames.json"] + [f"frame_{k:04d}.png" for k in range(10)])
    renderer = nc.NeuralScene.load(bundle).renderer()
    for k, i in zip((0, 3, 6, 9), range(4), strict=True):  # the views themselves, unchanged
        K, R, t = (np.asarray(m) for m in scene.camera(i).to_opencv())
        assert frames[k]["s"] == 0 and np.allclose(frames[k]["K"], K) and np.allclose(frames[k]["R"], R, atol=1e-6)
        assert np.allclose(frames[k]["t"], t, atol=1e-5)
        with torch.no_grad():
            expected = renderer.render(scene.camera(i)).clamp(0, 1).permute(1, 2, 0).numpy()
        got = np.asarray(Image.open(os.path.join(out, frames[k]["file"]))).astype(np.float32) / 255
        assert got.shape == (24, 24, 3) and np.abs(got - expected).max() <= 1 / 255 + 1e-6
    assert frames[1]["s"] == pytest.approx(1 / 3) and frames[1]["views"] == [scene.views[0].name, scene.views[1].name]
    assert main(["--bundle", bundle, "--scene", folder, "--out", str(tmp_path / "small"), "--views", "1,3",
                 "--max-side", "12", "--device", "cpu"]) == 0
    small = json.load(open(tmp_path / "small" / "frames.json"))["frames"]
    assert len(small) == 2 and small[0]["size"] == [12, 12]
    assert np.asarray(Image.open(tmp_path / "small" / "frame_0001.png")).shape == (12, 12, 3)


def test_render_refuses_bad_input_before_writing(scene_and_bundle, tmp_path, capsys):
    folder, bundle, _ = scene_and_bundle
    before = sorted(os.listdir(folder))
    # the scene folder (or one holding it) as --out: with --overwrite it would be replaced
    assert main(["--bundle", bundle, "--scene", folder, "--out", folder, "--overwrite"]) == 2
    assert "holds the input" in capsys.readouterr().err
    assert main(["--bundle", bundle, "--scene", folder, "--out", os.path.dirname(folder), "--overwrite"]) == 2
    assert sorted(os.listdir(folder)) == before and os.path.isfile(bundle)
    missing = str(tmp_path / "none.npbgpp")
    assert main(["--bundle", missing, "--scene", folder, "--out", str(tmp_path / "a")]) == 2
    assert missing in capsys.readouterr().err
    assert main(["--bundle", bundle, "--scene", folder, "--out", str(tmp_path / "b"), "--views", "7"]) == 2
    assert "no view 7" in capsys.readouterr().err
    assert main(["--bundle", bundle, "--scene", folder, "--out", str(tmp_path / "c"), "--between", "-1"]) == 2
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("x")
    assert main(["--bundle", bundle, "--scene", folder, "--out", str(taken), "--device", "cpu"]) == 2
    assert "exists" in capsys.readouterr().err and os.listdir(taken) == ["keep.txt"]
    assert sorted(os.listdir(tmp_path)) == ["taken"]  # no output or temporary folder left by a refusal


def test_debug_raises_the_error_with_its_traceback_instead_of_the_line(scene_and_bundle, tmp_path, capsys,
                                                                      monkeypatch):
    """--debug: a refusal and an out-of-memory end are the error itself raised, not the one-line
    message; nothing written either way (the other commands' refusals: test_cli_debug)."""
    from npbgpp_core.scene import NeuralScene

    folder, bundle, _ = scene_and_bundle
    missing = str(tmp_path / "none.npbgpp")
    args = ["--bundle", missing, "--scene", folder, "--out", str(tmp_path / "a"), "--device", "cpu"]
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == f"error: neural scene file not found: {missing}"
    with pytest.raises(FileNotFoundError, match="neural scene file not found") as raised:
        main(args + ["--debug"])
    assert raised.traceback[-1].name == "load"  # raised where it happened, NeuralScene.load
    assert capsys.readouterr().err == ""

    def out_of_memory(path):
        raise MemoryError("Unable to allocate 1.00 TiB")

    monkeypatch.setattr(NeuralScene, "load", staticmethod(out_of_memory))
    args[1] = bundle
    assert main(args) == 2 and "error: out of host memory (RAM) while loading the bundle" in capsys.readouterr().err
    with pytest.raises(MemoryError, match="Unable to allocate"):
        main(args + ["--debug"])
    assert os.listdir(tmp_path) == []


def test_a_view_of_another_aspect_is_fitted_into_the_frame_unstretched(scene_and_bundle):
    """A portrait view among landscape ones (mouse's photos): one scale factor and a centred
    principal point, so a point lands where the view shows it, shifted by the margin."""
    import dataclasses

    from headless_train.render import path_cameras

    _, _, scene = scene_and_bundle
    landscape = scene.views[0].camera.scaled((12, 24))  # the frame: 12 x 24
    portrait = scene.views[1].camera.scaled((24, 12))
    views = [dataclasses.replace(scene.views[0], camera=landscape),
             dataclasses.replace(scene.views[1], camera=portrait), *scene.views[2:]]
    odd = dataclasses.replace(scene, views=views)
    frames = path_cameras(odd, [0, 1], 0, None)
    assert [f["size"] for f in frames] == [[12, 24], [12, 24]]
    K_view = np.asarray(portrait.scaled((12, 6)).to_opencv()[0])  # half size fits the 12 rows
    K = np.asarray(frames[1]["K"])
    assert K[0, 0] / K[1, 1] == pytest.approx(K_view[0, 0] / K_view[1, 1])  # square pixels stay square
    assert K[0, 0] == pytest.approx(K_view[0, 0]) and K[1, 1] == pytest.approx(K_view[1, 1])
    assert K[0, 2] == pytest.approx(K_view[0, 2] + 9.0) and K[1, 2] == pytest.approx(K_view[1, 2])  # (24 - 6) / 2
    assert np.allclose(frames[0]["K"], np.asarray(landscape.to_opencv()[0]))  # the first view sets the frame


def test_render_needs_no_cloud_of_the_dataset(scene_and_bundle, tmp_path):
    """The bundle holds the points, the dataset only the cameras: a folder whose cloud the
    loader cannot tell (two .ply files, no default name) renders the same frames."""
    import shutil

    from npbgpp_core.datasets import DatasetError, load_scene

    folder, bundle, _ = scene_and_bundle
    several = str(tmp_path / "several")
    shutil.copytree(folder, several)
    os.rename(os.path.join(several, "points3d.ply"), os.path.join(several, "a.ply"))
    shutil.copyfile(os.path.join(several, "a.ply"), os.path.join(several, "b.ply"))
    with pytest.raises(DatasetError, match="several point clouds"):
        load_scene(several)  # the case at hand
    args = ["--bundle", bundle, "--views", "0", "--device", "cpu"]
    assert main([*args, "--scene", folder, "--out", str(tmp_path / "own")]) == 0
    assert main([*args, "--scene", several, "--out", str(tmp_path / "other")]) == 0
    assert (tmp_path / "own" / "frame_0000.png").read_bytes() == (tmp_path / "other" / "frame_0000.png").read_bytes()
