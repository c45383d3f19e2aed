"""Checkpoint files: atomic writes survive a full disk, corrupt / foreign checkpoints are
refused with the file named, descriptor files round-trip."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
import torch

from headless_train import checkpoints as ck
from npbgpp_core import atomic


def _full_disk_after(nbytes: int):
    def writer(fileobj, data: bytes) -> None:
        fileobj.write(data[:nbytes])  # part of the file reaches the disk, then it is full
        raise OSError(errno.ENOSPC, "No space left on device")

    return writer


def test_atomic_write_keeps_previous_file_on_full_disk(tmp_path, monkeypatch):
    path = str(tmp_path / "last.ckpt")
    ck.atomic_torch_save({"state_dict": {"w": torch.ones(3)}, "global_step": 7}, path)
    before = open(path, "rb").read()
    monkeypatch.setattr(atomic, "_write_bytes", _full_disk_after(10))
    with pytest.raises(OSError, match="disk full") as info:
        ck.atomic_torch_save({"state_dict": {"w": torch.zeros(3)}, "global_step": 8}, path)
    assert info.value.errno == errno.ENOSPC
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["last.ckpt"]  # no temp file left behind
    assert ck.load_checkpoint_file(path)["global_step"] == 7


def test_checkpoint_io_used_by_lightning_is_atomic(tmp_path, monkeypatch):
    io = ck.AtomicCheckpointIO()
    path = tmp_path / "epoch0.ckpt"
    io.save_checkpoint({"state_dict": {"a": torch.arange(4)}}, path)
    monkeypatch.setattr(atomic, "_write_bytes", _full_disk_after(3))
    with pytest.raises(OSError):
        io.save_checkpoint({"state_dict": {"a": torch.zeros(4)}}, path)
    torch.testing.assert_close(io.load_checkpoint(path)["state_dict"]["a"], torch.arange(4))


def test_corrupt_and_missing_checkpoints_are_named(tmp_path):
    bad = tmp_path / "broken.ckpt"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(ck.CheckpointError, match="broken.ckpt.*corrupt"):
        ck.load_checkpoint_file(str(bad))
    with pytest.raises(ck.CheckpointError, match="not found.*nothere.ckpt"):
        ck.load_checkpoint_file(str(tmp_path / "nothere.ckpt"))
    torch.save({"weights": 1}, tmp_path / "plain.ckpt")
    with pytest.raises(ck.CheckpointError, match="no state_dict"):
        ck.load_checkpoint_file(str(tmp_path / "plain.ckpt"))


def test_system_compatibility():
    npbg = {"state_dict": {}, "npbgpp": {"system": "npbg", "config": {}}}
    sphere = {"state_dict": {}, "npbgpp": {"system": "npbgpp", "config": {"aggregator": "sphere"}}}
    with pytest.raises(ck.CheckpointError, match="trained by system 'npbg'.*'npbgpp'"):
        ck.check_compatible(npbg, "x.ckpt", "npbgpp")
    assert ck.check_compatible(sphere, "x.ckpt", "coefficients_ft") == "npbgpp"
    assert ck.check_compatible(sphere, "x.ckpt", "npbgpp", {"aggregator": "sphere"}) == "npbgpp"
    with pytest.raises(ck.CheckpointError, match="aggregator 'sphere'"):
        ck.check_compatible(sphere, "x.ckpt", "npbgpp", {"aggregator": "mean"})
    with pytest.raises(ck.CheckpointError, match="not written by headless_train"):
        ck.check_compatible({"state_dict": {}}, "x.ckpt", "npbg")


def test_descriptor_files_round_trip(tmp_path):
    t = torch.randn(5, 56, dtype=torch.float64)
    path = ck.save_descriptors(str(tmp_path / "descriptors"), "scan118", t)
    assert path.endswith(os.path.join("descriptors", "scan118"))
    back = ck.load_descriptors(str(tmp_path / "descriptors"), "scan118", n_points=5)
    assert back.dtype == torch.float32
    torch.testing.assert_close(back, t.float())
    torch.save(torch.ones(4, 8), tmp_path / "descriptors" / "plain")  # published-style plain tensor
    assert ck.load_descriptors(str(tmp_path / "descriptors"), "plain").shape == (4, 8)
    with pytest.raises(ValueError, match="5 rows but the scene's cloud has 6"):
        ck.load_descriptors(str(tmp_path / "descriptors"), "scan118", n_points=6)
    with pytest.raises(FileNotFoundError, match="missing"):
        ck.load_descriptors(str(tmp_path / "descriptors"), "missing")


def test_a_file_that_is_no_checkpoint_says_what_it_is(tmp_path):
    """A PLY or a bundle given as a checkpoint got torch.load's page about weights_only
    ('Re-running torch.load with weights_only set to False will likely succeed')."""
    from npbgpp_core import save_ply

    ply = tmp_path / "points3d.ply"
    save_ply(str(ply), np.zeros((3, 3), np.float32))
    with pytest.raises(ck.CheckpointError, match=r"points3d.ply is not a torch checkpoint: it is a PLY point cloud"
                       ) as info:
        ck.load_checkpoint_file(str(ply))
    assert "weights_only" not in str(info.value)
    from safetensors.torch import save_file

    bundle = tmp_path / "scene.npbgpp"
    save_file({"points": torch.zeros(2, 3)}, str(bundle))
    with pytest.raises(ck.CheckpointError, match=r"scene.npbgpp is not a torch checkpoint: it is a safetensors"):
        ck.load_checkpoint_file(str(bundle))


def test_a_missing_checkpoint_names_what_its_folder_holds(tmp_path):
    """The published NPBG fine-tuning lines seed from <run>/result/checkpoints/epoch38.ckpt;
    this trainer writes <run>/checkpoints/, and a shorter run has no epoch38."""
    run = tmp_path / "npbg_scannet"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("epoch0.ckpt", "last.ckpt"):
        torch.save({"state_dict": {}}, run / "checkpoints" / name)
    with pytest.raises(ck.CheckpointError, match=r"epoch38.ckpt \(.*npbg_scannet/checkpoints holds epoch0.ckpt, "
                                                 r"last.ckpt; runs keep their checkpoints in <run dir>/checkpoints/"):
        ck.load_checkpoint_file(str(run / "result" / "checkpoints" / "epoch38.ckpt"))
    with pytest.raises(ck.CheckpointError, match=r"epoch38.ckpt \(.*checkpoints holds epoch0.ckpt, last.ckpt\)$"):
        ck.load_checkpoint_file(str(run / "checkpoints" / "epoch38.ckpt"))


def test_descriptors_of_another_cloud_name_the_writing_runs_cloud_settings(tmp_path):
    """A descriptors file whose row count is not the scene's cloud (a fine-tune that forgot
    the evaluation's datasets.pc_name) names the setting and, from the writing run's Hydra
    config, the values to copy."""
    run = tmp_path / "eval_run"
    folder = str(run / "descriptors")
    ck.save_descriptors(folder, "scene", torch.zeros(5, 56))
    with pytest.raises(ValueError, match="has 5 rows but the scene's cloud has 3 points") as plain:
        ck.load_descriptors(folder, "scene", 3)
    assert "datasets.pc_name" in str(plain.value) and "that run" not in str(plain.value)  # no config to read
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text(
        "datasets:\n  pc_name: dense.ply\n  n_point: null\nsystem:\n  max_points: 1000000.0\n")
    with pytest.raises(ValueError) as named:
        ck.load_descriptors(folder, "scene", 3)
    assert (f"that run ({run}) had datasets.pc_name=dense.ply datasets.n_point=null system.max_points=1000000.0"
            in str(named.value))
    assert ck.load_descriptors(folder, "scene", 5).shape == (5, 56)  # the right cloud loads


def test_files_too_big_for_memory_are_not_called_corrupt(tmp_path, monkeypatch):
    """Running out of memory while reading a checkpoint, a descriptor file or a weights file is
    raised as it came (they were 'corrupt or not a torch checkpoint', 'cannot read descriptor
    file', 'corrupt or not a safetensors file' / 'not a readable torch checkpoint'); any other
    failure still names the file as bad."""
    import safetensors

    from npbgpp_core import pretrained

    ckpt = str(tmp_path / "last.ckpt")
    torch.save({"state_dict": {}}, ckpt)
    ck.save_descriptors(str(tmp_path / "descriptors"), "scene", torch.ones(2, 3))
    pt = str(tmp_path / "net.pt")
    torch.save({"config": {}, "state_dict": {}}, pt)
    st = str(tmp_path / "net.safetensors")
    (tmp_path / "net.safetensors").write_bytes(b"\0" * 64)

    def read_all():
        descriptors = str(tmp_path / "descriptors")
        for read in (lambda: ck.load_checkpoint_file(ckpt), lambda: ck.load_descriptors(descriptors, "scene"),
                     lambda: pretrained.read_weights(pt, "npbgpp"), lambda: pretrained.read_weights(st, "npbgpp")):
            with pytest.raises(Exception) as info:
                read()
            yield info.value

    def fail(error):
        def raise_it(*args, **kwargs):
            raise error
        return raise_it

    for error in (MemoryError("Unable to allocate 9.0 GiB"), torch.OutOfMemoryError("CUDA out of memory.")):
        monkeypatch.setattr(torch, "load", fail(error))
        monkeypatch.setattr(safetensors, "safe_open", fail(error))
        monkeypatch.setattr("safetensors.torch.load_file", fail(error))
        assert [type(e) for e in read_all()] == [type(error)] * 4
    monkeypatch.setattr(torch, "load", fail(RuntimeError("PytorchStreamReader failed reading zip archive")))
    monkeypatch.setattr(safetensors, "safe_open", fail(RuntimeError("invalid header")))
    monkeypatch.setattr("safetensors.torch.load_file", fail(RuntimeError("invalid header")))
    assert [type(e).__name__ for e in read_all()] == ["CheckpointError", "ValueError", "WeightsError", "WeightsError"]
