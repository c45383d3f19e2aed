"""NeuralScene bundles are checked against their own model_config when loaded: config
types, feature and weight shapes, finite values, and sizes bounded before anything the
config sizes is allocated. Every error names the file and the field."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from npbgpp_core.models import NPBG, NPBGConfig, NPBGPlusPlus
from npbgpp_core.scene import NeuralScene

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _npbg_bundle(path: str, n: int = 50) -> str:
    torch.manual_seed(0)
    model = NPBG(n, NPBGConfig())
    NeuralScene.from_npbg(model, torch.randn(n, 3), torch.rand(n, 3), name="s").save(path)
    return path


def _npbgpp_bundle(path: str, n: int = 20) -> str:
    torch.manual_seed(0)
    model = NPBGPlusPlus()
    state = {k: v for k, v in model.state_dict().items() if k.startswith(("basis.", "refiner."))}
    config = {**model.config.to_dict(), "extractor_weights": None}
    NeuralScene(torch.randn(n, 3), None, "npbgpp", torch.randn(n, 7, 8), None, config, state).save(path)
    return path


def _rewrite(src: str, dst: str, config: dict | None = None, tensors: dict | None = None) -> str:
    """Copy bundle ``src`` to ``dst`` with model_config keys and tensors replaced."""
    with safe_open(src, "pt") as f:
        meta = dict(f.metadata())
        data = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    if config:
        meta["model_config"] = json.dumps({**json.loads(meta["model_config"]), **config})
    data.update(tensors or {})
    save_file(data, dst, metadata=meta)
    return dst


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    d = tmp_path_factory.mktemp("bundles")
    return _npbg_bundle(str(d / "npbg.npbgpp")), _npbgpp_bundle(str(d / "pp.npbgpp"))


def test_good_bundles_load_and_render(bundles):
    from npbgpp_core import Camera

    cam = Camera.look_at((0, 0, -3), (0, 0, 0), image_size=(16, 16))
    for path in bundles:
        assert NeuralScene.load(path).renderer().render(cam).shape == (3, 16, 16)


@pytest.mark.parametrize("which, change, message", [
    (0, {"config": {"feature_dim": "8"}}, "option 'feature_dim' must be int, got str"),
    (0, {"config": {"predict_mask": 1}}, "option 'predict_mask' must be bool"),
    (0, {"config": {"scales": "1,0.5"}}, "option 'scales' must be tuple"),
    (1, {"config": {"world_up": None}}, "option 'world_up' must be tuple"),
    (1, {"config": {"aggregator": 3}}, "option 'aggregator' must be str"),
    (0, {"config": {"feature_dim": 10_000_000, "descriptor_dim": 10_000_000}}, "descriptor_dim=10000000 is outside"),
    (1, {"config": {"basis_dim": 5}}, "features have shape \\(20, 7, 8\\), model_config implies \\(20, 6, 8\\)"),
    (0, {"tensors": {"features": torch.zeros(50, 9)}}, "features have shape \\(50, 9\\), model_config implies"),
    (0, {"tensors": {"model.refiner.head.weight": torch.zeros(3, 5, 1, 1)}},
     "weight model.refiner.head.weight is \\(3, 5, 1, 1\\) torch.float32, model_config needs"),
    (1, {"tensors": {"model.basis.net.0.weight": torch.zeros(2, 2)}}, "weight model.basis.net.0.weight is \\(2, 2\\)"),
    (1, {"tensors": {"model.refiner.head.bias": torch.zeros(3, dtype=torch.int64)}},
     "weight model.refiner.head.bias is \\(3,\\) torch.int64"),
    (0, {"tensors": {"features": torch.full((50, 8), float("nan"))}}, "features.* (finite|NaN)"),
    (0, {"tensors": {"points": torch.full((50, 3), float("inf"))}}, "points.* (finite|NaN)"),
])
def test_bundle_checked_against_its_config(bundles, tmp_path, which, change, message):
    src = bundles[which]
    with safe_open(src, "pt") as f:
        assert set(change.get("tensors", {})) <= set(f.keys())  # replaces, never adds
    bad = _rewrite(src, str(tmp_path / "bad.npbgpp"), change.get("config"), change.get("tensors"))
    with pytest.raises(ValueError, match=f"bad.npbgpp: .*{message}"):
        NeuralScene.load(bad)


def test_a_small_bundle_claiming_a_huge_size_allocates_nothing_first(bundles, tmp_path):
    """descriptor_dim = (1 + basis_dim) * feature_dim = 1e7 in a bundle of a few kB: refused
    in a process whose peak memory stays far below the 2 GB the descriptors would take."""
    bad = _rewrite(bundles[0], str(tmp_path / "huge.npbgpp"),
                   {"use_basis": True, "feature_dim": 8, "basis_dim": 1_249_999, "descriptor_dim": 10_000_000})
    assert os.path.getsize(bad) < 2_000_000
    # The peak is VmHWM of this process image: ru_maxrss would also count the pytest parent's
    # pages that a fork()-based spawn shares before exec (seen: 1016 MB late in the suite).
    code = ("import sys\nfrom npbgpp_core.scene import NeuralScene\n"
            "try:\n    NeuralScene.load(sys.argv[1]).renderer()\nexcept ValueError as exc:\n    print(exc)\n"
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
            "print('peak_mb', int(hwm.split()[1]) // 1024)\n")
    out = subprocess.run([sys.executable, "-c", code, bad], env=dict(os.environ, PYTHONPATH=ROOT),
                         capture_output=True, text=True, timeout=120)
    assert "huge.npbgpp: inconsistent neural scene file: model_config" in out.stdout, out.stdout + out.stderr
    assert "descriptor_dim=10000000 is outside 1..1024" in out.stdout
    assert int(out.stdout.split("peak_mb")[1]) < 1000


def test_files_picked_by_mistake_are_named_for_what_they_are(tmp_path):
    """A PLY, a torch checkpoint or a weights file given as a bundle (Import Bundle, the
    Bundle field) was 'corrupt or truncated (header of 7886488381532236912 bytes ...)'."""
    from npbgpp_core.bundle_file import read_points
    from npbgpp_core.ply import save_ply

    ply = str(tmp_path / "cloud.ply")
    save_ply(ply, torch.zeros(4, 3).numpy())
    ckpt = str(tmp_path / "last.ckpt")
    torch.save({"state_dict": {}}, ckpt)
    weights = os.path.join(ROOT, "npbgpp_core", "weights", "npbgpp_sphere.safetensors")
    legacy = str(tmp_path / "old.pt")
    torch.save({"state_dict": {}}, legacy, _use_new_zipfile_serialization=False)
    for path, what in ((ply, "it is a PLY point cloud"), (ckpt, "it is a zip archive, e.g. a torch checkpoint"),
                       (legacy, "it is a pickle, e.g. a torch checkpoint of the legacy format"),
                       (weights, "it is an NPBG\\+\\+ weights file")):
        message = f"{os.path.basename(path)}: not an NPBG\\+\\+ neural scene file: {what}"
        for read in (NeuralScene.load, read_points):
            with pytest.raises(ValueError, match=message):
                read(path)
