"""bench/gpu_speed.py (issue 16's GPU measurements) runs end to end with --dry-run on
the CPU (the fused Triton refiner under Triton's interpreter), and its whole-frame
CUDA-graph candidate (bench/static_frame.py) renders what model.render renders: on the
CPU through the torch reference, on a GPU also replayed from the graph (skipped without
one)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from bench_common import bench_camera  # noqa: E402
from bench_render import synthetic_scene  # noqa: E402
from static_frame import StaticFrame  # noqa: E402

from npbgpp_core.models import NPBGPlusPlus, NPBGPlusPlusConfig  # noqa: E402


def test_gpu_speed_dry_run_runs_every_step_and_writes_nothing(tmp_path):
    benchmarks = ROOT / "BENCHMARKS.md"
    before = benchmarks.read_bytes()
    out = tmp_path / "gpu_speed.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_speed.py"), "--dry-run", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=400,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["dry_run"] and data["failed"] == []
    assert list(data["results"]) == ["info", "stages", "frames", "refiner", "graph", "published", "viewport", "compile"]
    values = {what: value for rows in data["results"].values() for what, value in rows}
    # The tiled refiner and the static frame reproduce the reference renders.
    assert float(values["max |tiled - whole canvas| at roll 45"]) < 1e-4
    assert float(values["static frame fp32: max |frame - model.render|"]) < 1e-4
    assert 0 <= float(values["max |bounded - exact| at roll 45 (an approximation)"]) < 0.5
    assert "skipped" in values["fp32, CUDA graph"]
    # The Triton refiners (under Triton's interpreter here) match the torch one.
    assert values["fused Triton refiner"].startswith("interpreter")
    for impl in ("fused Triton", "Triton implicit GEMM"):
        assert float(values[f"max |{impl} - torch| refiner fp32"]) < 1e-4
        assert float(values[f"max |{impl} - torch refiner| model.render fp32, roll 0"]) < 1e-4
    assert float(values["max |fused Triton - torch refiner| model.render fp32, roll 45 (tiled)"]) < 1e-4
    assert float(values["static frame fp32, fused Triton refiner: max |frame - model.render|"]) < 1e-4
    assert "skipped" in values["fp32, fused Triton, CUDA graph"]
    assert "fused Triton fp32 (interpreter), warm cache (new process): refiner ms best / median" in values
    assert benchmarks.read_bytes() == before


def scene_and_model(n: int = 5000, device: str = "cpu"):
    torch.manual_seed(0)
    model = NPBGPlusPlus(NPBGPlusPlusConfig()).to(device).eval()
    scene = synthetic_scene(model, n, torch.device(device))
    scene.valid[::7] = False  # invalid points are not rendered
    return model, scene


def test_static_frame_equals_model_render_for_any_pose_on_cpu():
    model, scene = scene_and_model()
    cam = bench_camera(40, 56)
    frame = StaticFrame(model, scene, cam)
    with torch.inference_mode():
        for angle in (0.0, 0.7):
            pose = bench_camera(40, 56, angle=angle)
            frame.set_pose(pose)
            got = frame()[:3].clamp(0, 1)
            torch.testing.assert_close(got, model.render(scene, pose), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="intrinsics"):
        frame.set_pose(bench_camera(40, 60))
    with pytest.raises(RuntimeError, match="CUDA"):
        frame.capture()


@pytest.mark.cuda
def test_static_frame_graph_replay_and_tiled_render_on_cuda():
    model, scene = scene_and_model(200_000, "cuda")
    cam = bench_camera(270, 480, "cuda")
    frame = StaticFrame(model, scene, cam)
    with torch.inference_mode():
        frame.capture()
        for angle in (0.0, 0.5):
            pose = bench_camera(270, 480, "cuda", angle=angle)
            frame.set_pose(pose)
            torch.testing.assert_close(frame()[:3].clamp(0, 1), model.render(scene, pose), atol=1e-3, rtol=0)
        rolled = cam.rotated_in_plane(math.radians(45))
        tiled, tiled16 = model.render(scene, rolled), model.render(scene, rolled, torch.float16)
        model.tiled_rendering = False
        dense, dense16 = model.render(scene, rolled), model.render(scene, rolled, torch.float16)
    torch.testing.assert_close(tiled, dense, atol=1e-3, rtol=0)
    torch.testing.assert_close(tiled16, dense16, atol=2e-2, rtol=0)  # fp16 autocast rounding
