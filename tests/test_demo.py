"""``python -m blender_addon.demo --quick`` end to end in a subprocess (real bpy), on a small
copy of demo/scene with random-init weights files made here; and its bad-input messages."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from npbgpp_core.models import NPBG, NPBGConfig, NPBGPlusPlus
from npbgpp_core.ply import load_ply, save_ply
from npbgpp_core.pretrained import save_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_SCENE = os.path.join(ROOT, "demo", "scene")
SIZE = 64

pytestmark = pytest.mark.skipif(importlib.util.find_spec("bpy") is None, reason="bpy is not installed")


def _mini_scene(folder: str, train: int = 4, test: int = 2, points: int = 6000) -> str:
    """demo/scene cut down: the first views resized to SIZE x SIZE, a subset of the points."""
    scale = SIZE / 256.0
    for split, count in (("train", train), ("val", 0), ("test", test)):
        with open(os.path.join(DEMO_SCENE, f"transforms_{split}.json")) as f:
            meta = json.load(f)
        for key in ("fl_x", "fl_y", "cx", "cy"):
            if key in meta:
                meta[key] *= scale
        meta["w"] = meta["h"] = SIZE
        meta["frames"] = meta["frames"][:count]
        for fr in meta["frames"]:
            rel = fr["file_path"].lstrip("./") + ".png"
            os.makedirs(os.path.join(folder, os.path.dirname(rel)), exist_ok=True)
            img = Image.open(os.path.join(DEMO_SCENE, rel)).resize((SIZE, SIZE), Image.BILINEAR)
            img.save(os.path.join(folder, rel))
        with open(os.path.join(folder, f"transforms_{split}.json"), "w") as f:
            json.dump(meta, f)
    cloud = load_ply(os.path.join(DEMO_SCENE, "points3d.ply"))
    pick = np.random.default_rng(0).choice(len(cloud.points), points, replace=False)
    save_ply(os.path.join(folder, "points3d.ply"), cloud.points[pick], cloud.colors[pick])
    return folder


@pytest.fixture(scope="module")
def demo_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    scene = _mini_scene(str(root / "scene"))
    torch.manual_seed(0)
    model = NPBGPlusPlus()
    weights = str(root / "npbgpp.safetensors")
    save_weights(weights, model.state_dict(), "npbgpp", model.config.to_dict(), {"note": "test: random init"})
    refiner = str(root / "refiner.safetensors")
    save_weights(refiner, NPBG(0).refiner.state_dict(), "npbg_refiner", NPBGConfig().to_dict(), {})
    return {"root": root, "scene": scene, "weights": weights, "refiner": refiner}


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("BLENDER_USER_RESOURCES", None)  # the demo makes its own private folder
    return subprocess.run([sys.executable, "-m", "blender_addon.demo", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255.0


def test_quick_demo_writes_frames_video_metrics(demo_inputs):
    out = demo_inputs["root"] / "out"
    proc = _run(["--quick", "--scene", demo_inputs["scene"], "--out", str(out), "--weights", demo_inputs["weights"],
                 "--npbg-weights", demo_inputs["refiner"]])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    frames = [out / f"frame_{f:04d}.png" for f in range(1, 5)]
    assert all(p.is_file() for p in frames)
    images = [_png(p) for p in frames]
    assert images[0].shape == (SIZE // 2, SIZE // 2, 3)
    assert np.abs(images[0] - images[2]).mean() > 1e-3  # the camera moved between frames
    with open(out / "demo.mp4", "rb") as f:
        assert f.read(12)[4:8] == b"ftyp"
    report = json.loads((out / "metrics.json").read_text())
    for name in ("points", "npbgpp", "coefficients_ft", "npbg"):
        assert math.isfinite(report["methods"][name]["psnr"]) and 0 < report["methods"][name]["ssim"] <= 1
    assert report["methods"]["coefficients_ft"]["fit_steps"] == 3
    assert math.isfinite(report["timings"]["seconds_per_frame"])
    # (a) recomputed independently: the points PNG (RGBA, alpha = coverage) over white vs the
    # RGBA ground truth over white.
    from npbgpp_core.datasets import load_scene

    data = load_scene(demo_inputs["scene"])
    gt_rgba = np.asarray(Image.open(data.views[data.test[0]].image_path).convert("RGBA"), dtype=np.float64) / 255.0
    alpha = gt_rgba[..., 3:]
    gt_full = gt_rgba[..., :3] * alpha + (1 - alpha)  # over white, then 2x2 area average to the render size
    gt = gt_full.reshape(SIZE // 2, 2, SIZE // 2, 2, 3).mean(axis=(1, 3))
    pts_rgba = np.asarray(Image.open(out / "heldout" / "points_00.png").convert("RGBA"), dtype=np.float64) / 255.0
    assert 0 < pts_rgba[..., 3].mean() < 1  # some pixels covered by points, some not
    pts = pts_rgba[..., :3] * pts_rgba[..., 3:] + (1 - pts_rgba[..., 3:])
    psnr = 10 * math.log10(1.0 / np.mean((pts - gt) ** 2))
    assert abs(psnr - report["methods"]["points"]["per_view"][0]["psnr"]) < 0.05
    side = _png(out / "side_by_side.png")
    assert side.shape == (SIZE // 2, 3 * (SIZE // 2), 3)
    assert "(b) NPBG++" in proc.stdout and "s per frame" in proc.stdout


def test_missing_and_corrupt_weights_are_explained(demo_inputs, tmp_path):
    missing = tmp_path / "absent.safetensors"
    proc = _run(["--quick", "--scene", demo_inputs["scene"], "--out", str(tmp_path / "o"), "--weights", str(missing),
                 "--npbg-weights", demo_inputs["refiner"]])
    assert proc.returncode == 2
    # a user's own file: named as missing, with no advice to regenerate the bundled network over it
    assert str(missing) in proc.stderr and "not found" in proc.stderr and "average-weights" not in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"this is not a weights file")
    proc = _run(["--quick", "--scene", demo_inputs["scene"], "--out", str(tmp_path / "o"),
                 "--weights", demo_inputs["weights"], "--npbg-weights", str(corrupt)])
    assert proc.returncode == 2
    assert str(corrupt) in proc.stderr and "corrupt" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_unimportable_bpy_is_explained(tmp_path):
    """A machine lacking bpy's system libraries: a ``bpy`` whose import fails the way the
    real one does there (a missing shared library) shadows the installed one."""
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "bpy.py").write_text('raise ImportError("libXi.so.6: cannot open shared object file: '
                                 'No such file or directory")\n')
    env = dict(os.environ, PYTHONPATH=str(stub))
    env.pop("BLENDER_USER_RESOURCES", None)
    proc = subprocess.run([sys.executable, "-m", "blender_addon.demo", "--quick", "--out", str(tmp_path / "o")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "bpy" in proc.stderr and "libXi.so.6" in proc.stderr and "make demo" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
