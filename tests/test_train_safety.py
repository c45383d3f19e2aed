"""Loading and training faults: a planted pickle payload never runs on any checkpoint path,
a run that fails at start keeps a good last.ckpt, two runs cannot share a run folder."""

from __future__ import annotations

import builtins
import contextlib
import json
import math
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from _train_fixtures import make_dataset
from hydra import compose, initialize_config_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["trainer.enable_progress_bar=false", "trainer.limit_val_batches=0", "dataloader=small",
        "datasets.train_image_size=16", "trainer.log_every_n_steps=1"]
ONE_SCENE = ["datasets=nerf_blender_one_scene", "datasets.scene_name=sceneA", "system=npbg",
             "datasets.selection_count=0", "datasets.train_num_samples=2", "trainer.max_epochs=1", *FAST]


class _Payload:
    """Unpickling this creates ``flag``: proof that a loader executed code from the file."""

    def __init__(self, flag: str) -> None:
        self.flag = flag

    def __reduce__(self):
        return (builtins.open, (self.flag, "w"))


def _plant(path: str, flag: str, system: str = "npbg") -> str:
    """A checkpoint that passes every structural check but carries a payload."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"state_dict": {}, "global_step": 1, "epoch": 0,
                "npbgpp": {"system": system, "config": {}, "scenes": ["sceneA"], "points": [300]},
                "loops": {"x": _Payload(flag)}}, path)
    return path


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> str:
    return make_dataset(str(tmp_path_factory.mktemp("tinydata")), ("sceneA",))


def run_inproc(overrides: list[str], run_dir: str):
    from headless_train.cli import run

    overrides = [*overrides, f"system.descriptors_save_dir={run_dir}/descriptors"]
    with initialize_config_module("headless_train.conf", version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    return run(cfg, run_dir)


def test_the_payload_is_live(tmp_path):
    """The trap does run under an unsafe load, so the tests below can fail."""
    flag = str(tmp_path / "ran")
    _plant(str(tmp_path / "p.ckpt"), flag)
    torch.load(str(tmp_path / "p.ckpt"), weights_only=False)
    assert os.path.exists(flag)


def test_a_planted_payload_never_runs_on_any_path(data_root, tmp_path, capsys):
    from headless_train.checkpoints import CheckpointError
    from headless_train.export import main as export_main
    from headless_train.export_weights import main as export_weights_main

    flag = str(tmp_path / "ran")
    trap = _plant(str(tmp_path / "trap.ckpt"), flag)
    refused = "refused without running it"
    # export and export-weights: exit status 2, the file and the reason named.
    out = str(tmp_path / "a.npbgpp")
    assert export_main(["--checkpoint", trap, "--scene", f"{data_root}/sceneA", "--out", out]) == 2
    assert "trap.ckpt" in capsys.readouterr().err
    assert export_weights_main(["--checkpoint", trap, "--out", str(tmp_path / "w.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "trap.ckpt" in err and refused in err
    # weights_path=
    with pytest.raises(CheckpointError, match=f"trap.ckpt.*{refused}"):
        run_inproc([f"datasets.data_root={data_root}", *ONE_SCENE, f"weights_path={trap}"], str(tmp_path / "r1"))
    # resume=true (training and eval_only)
    run_dir = str(tmp_path / "r2")
    _plant(os.path.join(run_dir, "checkpoints", "last.ckpt"), flag)
    for extra in ([], ["eval_only=true"]):
        with pytest.raises(CheckpointError, match=f"last.ckpt.*{refused}"):
            run_inproc([f"datasets.data_root={data_root}", *ONE_SCENE, "resume=true", *extra], run_dir)
    # Lightning's own checkpoint reader goes through the same function.
    from headless_train.checkpoints import AtomicCheckpointIO

    with pytest.raises(CheckpointError, match=refused):
        AtomicCheckpointIO().load_checkpoint(trap)
    assert not os.path.exists(flag)


def test_a_planted_payload_in_a_stage_folder_never_runs(data_root, tmp_path, capsys):
    """``stage`` reads the step and background of the run it resumes with weights_only=True:
    a last.ckpt carrying a payload is refused by name (exit 2) and starts no training."""
    from headless_train.stage import main as stage_main

    flag = str(tmp_path / "ran")
    work = tmp_path / "stage"
    _plant(str(work / "run" / "checkpoints" / "last.ckpt"), flag, system="npbgpp")
    assert stage_main(["--corpus", data_root, "--work", str(work), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "last.ckpt is not readable with weights_only=True" in err, err
    assert not os.path.exists(flag) and not (work / "train.log").exists()


def _step(path: str) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def test_a_run_failing_at_start_keeps_the_good_last_checkpoint(data_root, tmp_path, caplog):
    from headless_train.cli import UsageError

    run_dir = str(tmp_path / "run")
    run_inproc([f"datasets.data_root={data_root}", *ONE_SCENE], run_dir)
    last = os.path.join(run_dir, "checkpoints", "last.ckpt")
    assert _step(last) == 2
    before = {n: open(os.path.join(run_dir, "checkpoints", n), "rb").read() for n in ("epoch0.ckpt", "last.ckpt")}
    # A new run into the folder (the same command line again, resume=true forgotten) would
    # replace both files once it trained: refused before anything is loaded.
    earlier = r"holds checkpoints of an earlier run \(epoch0.ckpt, last.ckpt\).*resume=true"
    with pytest.raises(UsageError, match=earlier):
        run_inproc([f"datasets.data_root={data_root}", *ONE_SCENE], run_dir)
    # epoch files without last.ckpt (a run killed between the two saves): resume is no way out
    os.rename(last, last + ".away")
    with pytest.raises(UsageError, match=r"\(epoch0.ckpt\).*it has no last.ckpt to resume from; weights_path="):
        run_inproc([f"datasets.data_root={data_root}", *ONE_SCENE], run_dir)
    os.rename(last + ".away", last)
    # train_image_size=0 fails in the first batch of a resumed run, inside Lightning's fit
    # (on_exception runs): the file is kept.
    with pytest.raises(ValueError, match="image_size"):
        run_inproc([f"datasets.data_root={data_root}", *ONE_SCENE, "datasets.train_image_size=0", "resume=true",
                    "trainer.max_epochs=2"], run_dir)
    assert "kept as it was (this run took no training step)" in caplog.text
    assert {n: open(os.path.join(run_dir, "checkpoints", n), "rb").read() for n in before} == before
    # evaluating into the folder writes no checkpoint: allowed (and, computing no loss, says nothing of it)
    caplog.clear()
    assert run_inproc([f"datasets.data_root={data_root}", *ONE_SCENE, "eval_only=true",
                       f"weights_path={last}"], run_dir) is not None
    assert "no VGG-19 weights configured" not in caplog.text


def test_resume_into_a_folder_without_a_run_names_the_setting(data_root, tmp_path):
    from headless_train.cli import UsageError

    run_dir = str(tmp_path / "new")
    with pytest.raises(UsageError, match=r"resume=true continues the run in .*new, but it has no .*last.ckpt; leave "
                                         r"resume=true out to start a new run there"):
        run_inproc([f"datasets.data_root={data_root}", *ONE_SCENE, "resume=true"], run_dir)
    assert not os.path.exists(os.path.join(run_dir, "checkpoints"))
    # epoch files without last.ckpt: leaving resume=true out is refused as well (a new run there
    # would replace them), so the advice is another run folder; nothing is touched
    os.makedirs(os.path.join(run_dir, "checkpoints"))
    epoch = os.path.join(run_dir, "checkpoints", "epoch3.ckpt")
    with open(epoch, "wb") as f:
        f.write(b"kept")
    with pytest.raises(UsageError, match=r"has no .*last.ckpt \(checkpoints/ holds epoch3.ckpt\); start a new run in "
                                         r"another hydra.run.dir, from one of those with weights_path= if wanted$"):
        run_inproc([f"datasets.data_root={data_root}", *ONE_SCENE, "resume=true"], run_dir)
    with pytest.raises(UsageError, match="holds checkpoints of an earlier run"):
        run_inproc([f"datasets.data_root={data_root}", *ONE_SCENE], run_dir)
    assert os.listdir(os.path.join(run_dir, "checkpoints")) == ["epoch3.ckpt"]
    assert open(epoch, "rb").read() == b"kept"


def test_a_fresh_run_interrupted_behind_an_older_longer_run_keeps_its_checkpoint(tmp_path):
    """The state on disk is newer (step 44) than the interrupted run's (step 3): kept."""
    from types import SimpleNamespace

    from headless_train.checkpoints import EpochAndLastCheckpoint, atomic_torch_save

    saver = EpochAndLastCheckpoint(str(tmp_path))
    atomic_torch_save({"state_dict": {}, "global_step": 44}, saver.last_path)
    trainer = SimpleNamespace(global_step=0, global_rank=0)
    saver.on_train_start(trainer, None)
    trainer.global_step = 3
    saver.on_exception(trainer, None, KeyboardInterrupt())
    assert _step(saver.last_path) == 44 and saver.exit_status == 130


@contextlib.contextmanager
def lock_held(folder: str, env: dict[str, str]) -> Iterator[subprocess.Popen]:
    """Another process holding the run lock (headless_train.runlock) on ``folder`` for the
    block; then SIGKILLed: the lock file still names it, the kernel drops the flock. It holds
    until its stdin closes, not for a fixed time: the block's subprocess may take up to 240 s
    on a loaded machine, and a holder gone before it would free the lock."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from headless_train.runlock import RunLock; "
         f"RunLock({folder!r}).acquire(); print('held', flush=True); sys.stdin.read()"],
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait(timeout=30)
        holder.stdin.close()
        holder.stdout.close()


@pytest.mark.parametrize("override, message", [
    ("trainer.max_minutes=abc", "trainer.max_minutes must be a finite number or null, got 'abc'"),
    ("trainer.last_checkpoint_every_n_steps=often", "trainer.last_checkpoint_every_n_steps must be a whole number or "
                                                    "null, got 'often'"),
    ("trainer.reload_dataloaders_every_n_epochs=x", "trainer.reload_dataloaders_every_n_epochs must be a whole number, "
                                                    "got 'x'"),
    ("eval_only=true trainer.gpus=one", "trainer.gpus must be a whole number or null, got 'one'"),
    # int() alone: 'invalid literal for int()', a traceback (OverflowError) for inf, and 1.5 kept 1 epoch file
    ("trainer.keep_epoch_checkpoints=abc", "trainer.keep_epoch_checkpoints must be a whole number or null, got 'abc'"),
    ("trainer.keep_epoch_checkpoints=inf", "trainer.keep_epoch_checkpoints must be a whole number or null, got inf"),
    ("trainer.keep_epoch_checkpoints=1.5", "trainer.keep_epoch_checkpoints must be a whole number or null, got 1.5"),
    ("trainer.keep_epoch_checkpoints=0", "trainer.keep_epoch_checkpoints must be null or >= 1, got 0"),
])
def test_a_trainer_value_that_is_no_number_names_its_key(data_root, tmp_path, override, message):
    """These reached int() / float() alone: "could not convert string to float: 'abc'"."""
    from headless_train.data import DataConfigError

    with pytest.raises(DataConfigError, match=message):
        run_inproc([*ONE_SCENE, f"datasets.data_root={data_root}", *override.split()], str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_missing_vgg_file_names_the_option_before_loading_anything(tmp_path):
    """loss.vgg_weights at a missing file said only 'weights file: file not found: PATH', after
    the datasets were loaded. It now names the option and the way out, before any loading
    (the data root here does not exist either: the run stops at the option first)."""
    missing = str(tmp_path / "vgg19.pth")
    with pytest.raises(FileNotFoundError) as info:
        run_inproc([f"datasets.data_root={tmp_path}/no_data", *ONE_SCENE, f"loss.vgg_weights={missing}"],
                   str(tmp_path / "run"))
    message = str(info.value)
    assert message.startswith(f"loss.vgg_weights={missing}: file not found"), message
    assert "VGG-19" in message and "loss.vgg_weights" in message.split("file not found", 1)[1]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_two_runs_cannot_share_a_folder_and_a_stale_lock_is_taken_over(data_root, tmp_path, caplog):
    from headless_train.cli import UsageError

    run_dir = str(tmp_path / "run")
    env = dict(os.environ, PYTHONPATH=ROOT)
    with lock_held(run_dir, env) as holder:
        with pytest.raises(UsageError, match=f"in use by another run \\(pid {holder.pid}"):
            run_inproc([f"datasets.data_root={data_root}", *ONE_SCENE], run_dir)
        # The command line refuses before Hydra writes its .hydra/ config files into the folder.
        proc = subprocess.run([sys.executable, "-m", "headless_train", f"hydra.run.dir={run_dir}",
                               f"datasets.data_root={data_root}", *ONE_SCENE], env=dict(env, OMP_NUM_THREADS="1"),
                              capture_output=True, text=True, timeout=240)
        assert proc.returncode == 2 and f"in use by another run (pid {holder.pid}" in proc.stderr, proc.stderr
        assert sorted(os.listdir(run_dir)) == ["run.lock"]  # refused before writing anything
    with open(os.path.join(run_dir, "run.lock")) as f:
        assert f.read().split()[0] == str(holder.pid)
    run_inproc([f"datasets.data_root={data_root}", *ONE_SCENE], run_dir)
    assert f"took over the lock of pid {holder.pid}" in caplog.text
    assert _step(os.path.join(run_dir, "checkpoints", "last.ckpt")) == 2
    with open(os.path.join(run_dir, "run.lock")) as f:
        assert f.read() == ""  # released at the end of the run


def test_an_interpolated_run_folder_is_locked_before_hydra_writes_into_it(tmp_path):
    """hydra.run.dir with an interpolation is resolved and locked before Hydra writes .hydra/:
    a second run into the same resolved folder refuses and leaves the first run's files
    alone; with the default outputs/${now:...} the folder Hydra fills is the one locked."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    first = tmp_path / "runs" / "headless_train"  # ${hydra:job.name} is headless_train (conf/config.yaml)
    (first / ".hydra").mkdir(parents=True)
    (first / ".hydra" / "config.yaml").write_text("the first run's config\n")
    with lock_held(str(first), env) as holder:
        args = [f"hydra.run.dir={tmp_path}/runs/${{hydra:job.name}}", f"datasets.data_root={tmp_path}/none"]
        proc = subprocess.run([sys.executable, "-m", "headless_train", *args], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=240)
        assert proc.returncode == 2 and f"in use by another run (pid {holder.pid}" in proc.stderr, proc.stderr
        assert sorted(os.listdir(first)) == [".hydra", "run.lock"]
        assert os.listdir(first / ".hydra") == ["config.yaml"]
        assert (first / ".hydra" / "config.yaml").read_text() == "the first run's config\n"
    proc = subprocess.run([sys.executable, "-m", "headless_train", f"datasets.data_root={tmp_path}/none"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2 and "dataset folder not found" in proc.stderr, proc.stderr
    (day,) = os.listdir(tmp_path / "outputs")
    (clock,) = os.listdir(tmp_path / "outputs" / day)
    folder = tmp_path / "outputs" / day / clock
    assert {"run.lock", ".hydra"} <= set(os.listdir(folder))
    assert f"dir: {folder}\n" in (folder / ".hydra" / "hydra.yaml").read_text()  # Hydra used the locked folder


def test_a_multirun_sweep_folder_is_locked_before_hydra_writes_into_it(tmp_path):
    """``python -m headless_train -m``: the sweep folder is locked when the multirun starts,
    before Hydra writes multirun.yaml or any job's .hydra/ into it, so a second sweep into
    the same folder refuses (naming hydra.sweep.dir) and writes nothing; without a holder the
    sweep fills the locked folder and releases it."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    sweep = tmp_path / "sweep"
    args = [sys.executable, "-m", "headless_train", "-m", f"hydra.sweep.dir={sweep}",
            f"datasets.data_root={tmp_path}/none", "seed=1,2"]
    with lock_held(str(sweep), env) as holder:
        proc = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 2 and f"in use by another run (pid {holder.pid}" in proc.stderr, proc.stderr
        assert "choose another hydra.sweep.dir" in proc.stderr
        assert sorted(os.listdir(sweep)) == ["run.lock"]  # no multirun.yaml, no job folder
    proc = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2 and "dataset folder not found" in proc.stderr, proc.stderr  # the first job ran
    assert {"run.lock", "multirun.yaml", "0"} <= set(os.listdir(sweep))
    assert {"run.lock", ".hydra"} <= set(os.listdir(sweep / "0"))
    assert (sweep / "run.lock").read_text() == ""  # released when the sweep ended


@pytest.mark.parametrize("meta, extra", [
    ({"system": 3, "config": {}}, {}),
    ({"system": "npbg", "config": []}, {}),
    ({"system": "npbg", "config": {}, "scenes": "sceneA"}, {}),
    ({"system": "npbg", "config": {}, "scenes": ["a", "b"], "points": [300]}, {}),
    ({"system": "npbg", "config": {}, "scenes": ["a"], "points": [-1]}, {}),
    ({"system": "npbg", "config": {}}, {"global_step": "44"}),
    ({"system": "npbg", "config": {"descriptor_dim": torch.zeros(2)}}, {}),  # found by probing export-weights
])
def test_malformed_checkpoint_metadata_is_refused_by_name(tmp_path, capsys, meta, extra):
    """Plain data passes weights_only loading; its structure is checked before use."""
    from headless_train.checkpoints import CheckpointError, checkpoint_system, load_checkpoint_file
    from headless_train.export_weights import main as export_weights_main

    path = str(tmp_path / "odd.ckpt")
    torch.save({"state_dict": {"refiner.w": torch.zeros(1)}, "npbgpp": meta, **extra}, path)
    with pytest.raises(CheckpointError, match="odd.ckpt: malformed 'npbgpp' metadata"):
        checkpoint_system(load_checkpoint_file(path), path)
    assert export_weights_main(["--checkpoint", path, "--out", str(tmp_path / "w.safetensors")]) == 2
    assert "odd.ckpt" in capsys.readouterr().err


def test_export_of_a_checkpoint_without_optional_metadata_exits_2(data_root, tmp_path, capsys):
    """'config' and 'points' may be absent from the metadata: export names the file, no KeyError
    (found by probing export with mutated checkpoints)."""
    from headless_train.export import main as export_main

    for system, meta in (("npbgpp", {}), ("npbg", {"scenes": ["sceneA"]})):
        path = str(tmp_path / f"{system}.ckpt")
        torch.save({"state_dict": {"model.x": torch.zeros(1)}, "npbgpp": {"system": system, **meta}}, path)
        assert export_main(["--checkpoint", path, "--scene", f"{data_root}/sceneA", "--out",
                            str(tmp_path / "o.npbgpp"), "--device", "cpu"]) == 2
        assert f"{system}.ckpt" in capsys.readouterr().err


def test_export_checks_the_output_path_before_aggregating(data_root, tmp_path, capsys, monkeypatch):
    """--out in a missing folder (or naming a folder) is refused before the checkpoint is
    used: it used to be found only after the whole aggregation."""
    import headless_train.export as export
    from headless_train.stage import seed_checkpoint
    from npbgpp_core.pretrained import default_weights_path

    ckpt = seed_checkpoint(default_weights_path("npbgpp"), str(tmp_path / "seed.ckpt"))
    monkeypatch.setattr(export, "export_npbgpp", lambda *a, **k: pytest.fail("aggregated before checking --out"))
    scene = f"{data_root}/sceneA"
    assert export.main(["--checkpoint", ckpt, "--scene", scene, "--out", str(tmp_path / "no" / "a.npbgpp")]) == 2
    assert f"--out {tmp_path / 'no' / 'a.npbgpp'}: output folder does not exist: {tmp_path / 'no'}" in \
        capsys.readouterr().err
    assert export.main(["--checkpoint", ckpt, "--scene", scene, "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    # a bundle under another suffix (a weights file's, a typo) was written as asked; the
    # add-on's Import Bundle and Aggregate name bundles .npbgpp
    for bad in ("a.safetensors", "a.npbgpp.bak", "anpbgpp"):
        out = tmp_path / bad
        assert export.main(["--checkpoint", ckpt, "--scene", scene, "--out", str(out)]) == 2
        assert f"--out {out} must end with .npbgpp" in capsys.readouterr().err
        assert not out.exists()
    with pytest.raises(pytest.fail.Exception, match="aggregated before"):  # any letter case passes
        export.main(["--checkpoint", ckpt, "--scene", scene, "--out", str(tmp_path / "A.NPBGPP")])


def test_export_never_writes_over_what_it_reads(data_root, tmp_path, capsys, monkeypatch):
    """--out naming the --checkpoint, the scene's cloud or its camera file was written over
    with the bundle (the weights file or the dataset lost, exit 0). Refused by name, each
    file unchanged; a bundle into the scene folder is still written."""
    import shutil

    import headless_train.export as export
    from headless_train.stage import seed_checkpoint
    from npbgpp_core.pretrained import default_weights_path

    ckpt = seed_checkpoint(default_weights_path("npbgpp"), str(tmp_path / "seed.ckpt"))
    scene = tmp_path / "sceneA"
    shutil.copytree(f"{data_root}/sceneA", scene)
    for target in (tmp_path / "seed.ckpt", scene / "points3d.ply", scene / "transforms_train.json"):
        before = target.read_bytes()
        assert export.main(["--checkpoint", ckpt, "--scene", str(scene), "--out", str(target)]) == 2
        err = capsys.readouterr().err
        assert f"--out {target} is " in err and "write the bundle to another file" in err, err
        assert target.read_bytes() == before
    monkeypatch.setattr(export, "export_npbgpp", lambda *a, **k: pytest.fail("reached the aggregation"))
    with pytest.raises(pytest.fail.Exception):  # a new file in the scene folder passes the checks
        export.main(["--checkpoint", ckpt, "--scene", str(scene), "--out", str(scene / "s.npbgpp")])


def test_weights_path_takes_a_weights_file_and_names_network_differences(data_root, tmp_path, caplog):
    """weights_path= accepts an NPBG++ weights file (the bundled network: the project ships no
    checkpoint; it used to say 'has no state_dict'). A run whose system options build another
    network than the file's is warned with the overrides to pass, and the background
    mismatch is named in the error."""
    import logging
    import math

    from npbgpp_core.pretrained import default_weights_path, read_weights

    weights = default_weights_path("npbgpp")
    config = read_weights(weights, "npbgpp").config
    common = [f"datasets.data_root={data_root}", "datasets=nerf_blender_one_scene", "datasets.scene_name=sceneA",
              "system=npbgpp_sphere", f"weights_path={weights}", "eval_only=true", *FAST]
    other_up = [0.0, 1.0, 0.0] if config["world_up"] != [0.0, 1.0, 0.0] else [1.0, 0.0, 0.0]
    up = "system.world_up=[" + ",".join(str(v) for v in other_up) + "]"
    as_trained = [f"system.background={config['background']}", f"system.input_canvas={config['input_canvas']}",
                  "system.world_up=[" + ",".join(str(float(v)) for v in config["world_up"]) + "]"]
    with caplog.at_level(logging.WARNING, logger="headless_train"):
        result = run_inproc([*common, *as_trained], str(tmp_path / "ok"))
    assert math.isfinite(result["mean"]["psnr"]) and "was trained with" not in caplog.text
    caplog.clear()
    other_canvas = "square" if config["input_canvas"] != "square" else "bounds"
    with caplog.at_level(logging.WARNING, logger="headless_train"):
        run_inproc([*common, as_trained[0], f"system.input_canvas={other_canvas}", up], str(tmp_path / "canvas"))
    assert (f"was trained with system.input_canvas={config['input_canvas']}; this run builds "
            f"system.input_canvas={other_canvas}") in caplog.text
    assert "world_up" not in caplog.text  # the scenes' up axis, not a property of the weights
    assert config["background"] == "environment"  # the shipped file: the next check relies on it
    with pytest.raises(ValueError, match="add system.background=environment"):
        run_inproc([*common, "system.background=none", *as_trained[1:]], str(tmp_path / "bg"))
    with pytest.raises(Exception, match="weights file not found"):
        run_inproc([*common[:4], f"weights_path={tmp_path}/none.safetensors", "eval_only=true", *FAST],
                   str(tmp_path / "missing"))


def test_export_takes_a_weights_file(data_root, tmp_path):
    """export --checkpoint accepts an NPBG++ weights file (the bundled network) and writes the
    bundle that aggregating with that network directly gives."""
    from headless_train.export import main as export_main
    from npbgpp_core.datasets import load_scene
    from npbgpp_core.pretrained import default_weights_path, load_pretrained_npbgpp
    from npbgpp_core.scene import NeuralScene

    weights, out = default_weights_path("npbgpp"), str(tmp_path / "w.npbgpp")
    assert export_main(["--checkpoint", weights, "--scene", f"{data_root}/sceneA", "--out", out,
                        "--device", "cpu", "--world-up", "+z"]) == 0  # the file's own up
    bundle = NeuralScene.load(out)
    scene = load_scene(f"{data_root}/sceneA")
    model = load_pretrained_npbgpp(weights).eval()
    held = set(scene.test)
    with torch.no_grad():
        state = model.begin_scene(torch.from_numpy(scene.points).float())
        for i in (i for i in range(len(scene.views)) if i not in held):
            state.add_views(scene.load_image(i).unsqueeze(0), [scene.camera(i)])
        ref = state.finish()
    assert bundle.kind == "npbgpp" and list(bundle.model_config["world_up"]) == list(model.config.world_up)
    torch.testing.assert_close(bundle.features, ref.coefficients.float(), atol=1e-5, rtol=1e-5)


def _rotated_scene(folder: str, rotation: np.ndarray) -> str:
    """The tiny scene (Y-up cameras) with its poses and points turned by ``rotation``: every
    point keeps its pixel in every view, only the up axis of the world moves."""
    from _train_fixtures import make_tiny_scene

    from npbgpp_core import load_ply, save_ply

    make_tiny_scene(folder)
    m = np.eye(4)
    m[:3, :3] = rotation
    for split in ("train", "val", "test"):
        path = os.path.join(folder, f"transforms_{split}.json")
        with open(path) as f:
            meta = json.load(f)
        for frame in meta["frames"]:
            frame["transform_matrix"] = (m @ np.asarray(frame["transform_matrix"])).tolist()
        with open(path, "w") as f:
            json.dump(meta, f)
    cloud = load_ply(os.path.join(folder, "points3d.ply"))
    save_ply(os.path.join(folder, "points3d.ply"), (cloud.points @ rotation.T).astype(np.float32), cloud.colors)
    return folder


def test_export_of_a_weights_file_takes_the_scenes_up_like_the_addon(tmp_path, capsys, monkeypatch):
    """export --checkpoint <weights file> aggregates with the scene's up axis, by default
    resolve_world_up('auto', cameras of the aggregated views) as the add-on's Aggregate with
    Up Axis: Auto (it always used the file's +Z: another bundle, silently); a bad --world-up,
    or one given with a run's checkpoint, exits 2 naming the option before any work."""
    import headless_train.export as export
    from npbgpp_core.datasets import load_scene
    from npbgpp_core.models.alignment import resolve_world_up
    from npbgpp_core.pretrained import default_weights_path, load_pretrained_npbgpp, read_weights
    from npbgpp_core.scene import NeuralScene

    a = math.radians(35.0)  # the scene's +Y (its cameras' up) becomes (sin a, cos a, 0) rotated about X
    turn_z = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    turn_x = np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]], dtype=np.float64)
    root = _rotated_scene(str(tmp_path / "tilted"), turn_x @ turn_z)
    weights, out = default_weights_path("npbgpp"), str(tmp_path / "t.npbgpp")
    assert export.main(["--checkpoint", weights, "--scene", root, "--out", out, "--device", "cpu"]) == 0
    scene = load_scene(root)
    held = set(scene.test)
    views = [i for i in range(len(scene.views)) if i not in held]
    up = resolve_world_up("auto", [scene.views[i].camera for i in views])
    # the turned +Y, not snapped (35 degrees off +Z): the ring of views left out by the test split
    # leaves the mean a few degrees off it
    assert float(np.dot(up, turn_x @ turn_z @ [0, 1, 0])) > math.cos(math.radians(5)) and max(np.abs(up)) < 0.9
    assert list(read_weights(weights, "npbgpp").config["world_up"]) == [0.0, 0.0, 1.0]

    def aggregate(world_up):
        model = load_pretrained_npbgpp(weights, world_up=world_up).eval()
        with torch.no_grad():
            state = model.begin_scene(torch.from_numpy(scene.points).float())
            for i in views:
                state.add_views(scene.load_image(i).unsqueeze(0), [scene.camera(i)])
            return state.finish()

    bundle, ref = NeuralScene.load(out), aggregate(up)
    assert list(bundle.model_config["world_up"]) == pytest.approx(list(up))
    torch.testing.assert_close(bundle.features, ref.coefficients.float(), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(bundle.features, aggregate(None).coefficients.float(), atol=1e-3)  # the old +Z
    numbers = str(tmp_path / "n.npbgpp")
    assert export.main(["--checkpoint", weights, "--scene", root, "--out", numbers, "--device", "cpu",
                        "--world-up=" + ",".join(str(v) for v in up)]) == 0  # '=': the text may start with '-'
    torch.testing.assert_close(NeuralScene.load(numbers).features, bundle.features)

    monkeypatch.setattr(export, "export_npbgpp", lambda *a, **k: pytest.fail("aggregated despite a bad --world-up"))
    capsys.readouterr()
    for bad in ("sideways", "0,0,0", "1,2"):
        assert export.main(["--checkpoint", weights, "--scene", root, "--out", str(tmp_path / "b.npbgpp"),
                            "--world-up", bad]) == 2
        assert "--world-up must be 'auto', one of" in capsys.readouterr().err
    assert export.main(["--checkpoint", str(tmp_path / "run.ckpt"), "--scene", root, "--out",
                        str(tmp_path / "c.npbgpp"), "--world-up", "+z"]) == 2
    assert "--world-up applies to weights files" in capsys.readouterr().err
    assert not any(tmp_path.glob("[bc].npbgpp"))


def test_coefficients_ft_from_a_weights_file_takes_the_runs_world_up(data_root, tmp_path, monkeypatch):
    """system=coefficients_ft seeded from a weights file builds its model with the run's
    system.world_up (it took the file's +Z whatever the run said); null keeps the source's.
    Coefficients that record no axis (an evaluation before the record, which aggregated about
    its default +Y) render every view in its own frame unless asked (they rendered upright
    about the weights file's +Z). Coefficients recording +Y give the run +Y (a map's own
    record, written earlier, is ignored) and refuse a given +Z naming the file."""
    import headless_train.systems as systems
    from headless_train.checkpoints import save_descriptors
    from npbgpp_core.fitting import FIT_ALIGNED
    from npbgpp_core.pretrained import default_weights_path, read_weights

    weights = default_weights_path("npbgpp")
    config = read_weights(weights, "npbgpp").config
    assert list(config["world_up"]) == [0.0, 0.0, 1.0]
    coefficients = str(tmp_path / "coefficients")
    coefs = torch.rand(300, (1 + config["basis_dim"]) * config["feature_dim"])
    save_descriptors(coefficients, "sceneA", coefs)
    built = []
    build = systems.build_system
    monkeypatch.setattr(systems, "build_system", lambda *a, **k: built.append(build(*a, **k)) or built[-1])
    common = [f"datasets.data_root={data_root}", "datasets=nerf_blender_one_scene", "datasets.scene_name=sceneA",
              "system=coefficients_ft", f"weights_path={weights}", f"system.descriptors_pretrained_dir={coefficients}",
              "eval_only=true", *FAST]
    for given, up in (("+y", (0.0, 1.0, 0.0)), ("[1,0,0]", (1.0, 0.0, 0.0)), ("null", (0.0, 0.0, 1.0))):
        run_inproc([*common, f"system.world_up={given}"], str(tmp_path / f"run{len(built)}"))
        model = built[-1].scene_model(0)
        assert model.config.world_up == up and model.config.background == config["background"], given
        assert model.config.align_during_rendering is False, given
    run_inproc([*common, "system.align_during_rendering=true"], str(tmp_path / f"run{len(built)}"))
    assert built[-1].scene_model(0).config.align_during_rendering is True
    assert built[-1].scene_model(0).config.world_up == (0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="system.world_up"):
        run_inproc([*common, "system.world_up=[0,0,0]"], str(tmp_path / "bad"))
    env = built[-1].scene_model(0).environment
    maps = str(tmp_path / "maps")
    save_descriptors(maps, "sceneA", coefs, [0.0, 1.0, 0.0])
    env_map = torch.rand(env.shape[0], env[0].numel())
    from safetensors.torch import save

    os.makedirs(maps, exist_ok=True)
    with open(os.path.join(maps, "sceneA.background"), "wb") as f:  # as written earlier, with a record
        f.write(save({"descriptors": env_map}, metadata={"world_up": "[0.0, 0.0, 1.0]"}))
    with_maps = [o if not o.startswith("system.descriptors_pretrained_dir=") else
                 f"system.descriptors_pretrained_dir={maps}" for o in common]
    for given in ("null", "+y"):
        run_inproc([*with_maps, f"system.world_up={given}"], str(tmp_path / f"run{len(built)}"))
        model = built[-1].scene_model(0)
        assert model.config.world_up == (0.0, 1.0, 0.0), given
        assert model.config.align_during_rendering is FIT_ALIGNED, given
        torch.testing.assert_close(model.environment.detach().reshape(env_map.shape), env_map)
    with pytest.raises(ValueError, match=r"coefficients .*maps/sceneA were aggregated about world_up \[0\.0,1\.0,0\.0\]"
                                         r".*system\.world_up=\+z -> \[0\.0,0\.0,1\.0\]"):
        run_inproc([*with_maps, "system.world_up=+z"], str(tmp_path / "turned"))


def test_coefficients_ft_refuses_coefficients_of_different_axes(tmp_path):
    """Coefficients of the run's scenes recording different axes leave no one axis: refused
    naming them and saying to fine-tune those scenes in separate runs (it said to give
    system.world_up, which was then refused); files without a record (written before it, or
    torch.save'd) do not count; a record that is not a direction is named; a file cut inside
    its header records nothing, and reading it names the damage."""
    from headless_train.checkpoints import load_descriptors, recorded_world_up, save_descriptors
    from headless_train.cli import resolve_coefficients_frame

    folder = str(tmp_path / "d")
    save_descriptors(folder, "a", torch.rand(9, 8), [0.0, 0.0, 1.0])
    save_descriptors(folder, "b", torch.rand(9, 8), [0.0, 1.0, 0.0])
    save_descriptors(folder, "c", torch.rand(9, 8))
    torch.save(torch.rand(9, 8), str(tmp_path / "d" / "e"))
    assert recorded_world_up(str(tmp_path / "d" / "a")) == (0.0, 0.0, 1.0)
    assert recorded_world_up(str(tmp_path / "d" / "c")) is None
    assert recorded_world_up(str(tmp_path / "d" / "e")) is None
    network = {"system": "npbgpp", "config": {"world_up": [1.0, 0.0, 0.0]}}

    def frame(names: list[str], **options) -> tuple[list[float], bool]:
        scfg = {"world_up": None, "align_during_rendering": None, "descriptors_pretrained_dir": folder, **options}
        resolve_coefficients_frame(scfg, names, network, "net.ckpt")
        return scfg["world_up"], scfg["align_during_rendering"]

    with pytest.raises(ValueError, match=r"different up axes \(.*d/a: \[0\.0,0\.0,1\.0\], .*d/b: "
                                         r"\[0\.0,1\.0,0\.0\]\): fine-tune those scenes in separate runs"):
        frame(["a", "b"])
    assert frame(["b", "c", "e", "missing"]) == ([0.0, 1.0, 0.0], True)
    assert frame(["c", "e"]) == ([1.0, 0.0, 0.0], False)
    assert frame(["c", "e"], world_up=[0, 0, 2]) == ([0.0, 0.0, 1.0], False)
    from safetensors.torch import save

    with open(os.path.join(folder, "x"), "wb") as f:
        f.write(save({"descriptors": torch.rand(9, 8)}, metadata={"world_up": "[0, 0]"}))
    with pytest.raises(ValueError, match=r"d/x: unreadable world_up record"):
        frame(["x"])
    with open(os.path.join(folder, "a"), "r+b") as f:
        f.truncate(30)
    assert recorded_world_up(os.path.join(folder, "a")) is None
    assert frame(["a", "b"]) == ([0.0, 1.0, 0.0], True)
    with pytest.raises(ValueError, match=r"cannot read descriptor file .*d/a"):
        load_descriptors(folder, "a")


def test_npbg_run_starts_from_the_bundled_refiner_file(data_root, tmp_path, caplog, capsys):
    """weights_path= with the NPBG refiner weights file starts system=npbg from its refiner
    (the published NPBG fine-tuning command names an NPBG checkpoint; the project ships this
    file instead)."""
    import logging

    from npbgpp_core.pretrained import default_weights_path, read_weights

    weights = default_weights_path("npbg_refiner")
    run_dir = str(tmp_path / "npbg")
    with caplog.at_level(logging.INFO):
        run_inproc([f"datasets.data_root={data_root}", *ONE_SCENE, f"weights_path={weights}",
                    "trainer.max_epochs=0"], run_dir)
    file_state = read_weights(weights, "npbg_refiner").state
    assert f"loaded {len(file_state)} tensors from {weights}" in caplog.text
    from headless_train.export import main as export_main

    assert export_main(["--checkpoint", weights, "--scene", f"{data_root}/sceneA", "--out",
                        str(tmp_path / "r.npbgpp")]) == 2  # a refiner alone has no scene's descriptors
    assert "holds no fitted scene" in capsys.readouterr().err


def test_world_up_auto_is_resolved_from_the_cameras(data_root, tmp_path, caplog):
    """system.world_up=auto (or an axis name) becomes the numbers the add-on's Up Axis: Auto
    gives for the scene's training cameras (estimate_world_up), in the network and the
    checkpoint; a bad value is named."""
    import logging

    from headless_train.cli import UsageError
    from npbgpp_core.datasets import load_scene
    from npbgpp_core.models.alignment import estimate_world_up
    from npbgpp_core.pretrained import default_weights_path, read_weights

    weights = default_weights_path("npbgpp")
    config = read_weights(weights, "npbgpp").config
    common = [f"datasets.data_root={data_root}", "datasets=nerf_blender_one_scene", "datasets.scene_name=sceneA",
              "system=npbgpp_sphere", f"weights_path={weights}", f"system.background={config['background']}",
              f"system.input_canvas={config['input_canvas']}", "trainer.max_steps=1", *FAST]
    scene = load_scene(f"{data_root}/sceneA")
    expected = estimate_world_up([scene.views[i].camera for i in scene.train])
    run_dir = str(tmp_path / "auto")
    with caplog.at_level(logging.INFO, logger="headless_train"):
        run_inproc([*common, "system.world_up=auto"], run_dir)
    assert "system.world_up=auto: [" in caplog.text
    ckpt = torch.load(os.path.join(run_dir, "checkpoints", "last.ckpt"), map_location="cpu", weights_only=True)
    assert ckpt["npbgpp"]["config"]["world_up"] == pytest.approx(list(expected))
    run_dir = str(tmp_path / "axis")
    run_inproc([*common, "system.world_up=-y"], run_dir)
    ckpt = torch.load(os.path.join(run_dir, "checkpoints", "last.ckpt"), map_location="cpu", weights_only=True)
    assert ckpt["npbgpp"]["config"]["world_up"] == [0.0, -1.0, 0.0]
    with pytest.raises(UsageError, match="system.world_up: world_up must be 'auto'"):
        run_inproc([*common, "system.world_up=sideways"], str(tmp_path / "bad"))


@pytest.mark.parametrize("world_up", ["auto", "+z", [0.0, 1.0, 0.0]])
def test_network_differences_are_named_whatever_world_up_says(tmp_path, world_up):
    """The weights_path warning compares the networks without world_up: a run given
    system.world_up=auto or an axis name (text, resolved from the cameras only later) is
    still told that its input_canvas builds another network (it was silently skipped: the
    text made the run's config unreadable)."""
    from headless_train.checkpoints import network_differences, weights_file_checkpoint
    from npbgpp_core.pretrained import default_weights_path

    path = default_weights_path("npbgpp")
    ckpt = weights_file_checkpoint(path)
    own = dict(ckpt["npbgpp"]["config"])
    other = "square" if own["input_canvas"] != "square" else "bounds"
    assert network_differences(ckpt, path, {**own, "world_up": world_up}) == []
    assert network_differences(ckpt, path, {**own, "input_canvas": other, "world_up": world_up}) == [
        ("input_canvas", own["input_canvas"], other)]


def _export_refuses_damaged_meta(data_root: str, tmp_path, capsys, records: dict, field: str) -> str:
    """Export of an NPBG checkpoint of sceneA whose metadata holds ``records``: refused with
    status 2 naming the checkpoint and the malformed ``field``, no traceback, no bundle.
    Returns the checkpoint's path."""
    from headless_train.export import main as export_main

    path = str(tmp_path / "odd.ckpt")
    meta = {"system": "npbg", "config": {}, "scenes": ["sceneA"], "points": [300], **records}
    torch.save({"state_dict": {"refiner.w": torch.zeros(1)}, "npbgpp": meta}, path)
    out = tmp_path / "o.npbgpp"
    assert export_main(["--checkpoint", path, "--scene", f"{data_root}/sceneA", "--out", str(out),
                        "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {path}: malformed 'npbgpp' metadata: {field} is " in err, err
    assert "Traceback" not in err and not out.exists()
    return path


@pytest.mark.parametrize("clouds", [[5], "points3d.ply", [["points3d.ply"]], ["a.ply", "b.ply"]])
def test_export_names_a_damaged_point_clouds_record(data_root, tmp_path, capsys, clouds):
    """An NPBG checkpoint whose recorded cloud (npbgpp.point_clouds) is damaged: export
    failed with a TypeError naming neither the checkpoint nor the field (or read a string's
    first letter as the cloud); it is refused naming both, as other malformed metadata."""
    _export_refuses_damaged_meta(data_root, tmp_path, capsys, {"point_clouds": clouds}, "point_clouds")


@pytest.mark.parametrize("digests", [[5], "ab", [None], ["a", "b"]])
def test_a_damaged_point_digests_record_is_refused_not_ignored(data_root, tmp_path, capsys, digests):
    """A damaged npbgpp.point_digests record turned the check of a cloud's points off without
    a word (recorded_digest read it as no digest, resume compared file names only); export,
    resume and eval refuse it naming the checkpoint and the field, as point_clouds."""
    from headless_train.checkpoints import CheckpointError, check_compatible

    path = _export_refuses_damaged_meta(data_root, tmp_path, capsys,
                                        {"point_clouds": ["points3d.ply"], "point_digests": digests}, "point_digests")
    with pytest.raises(CheckpointError, match="point_digests is"):  # what resume and eval run first
        check_compatible(torch.load(path, weights_only=False), path, "npbg")


def _run_printed_command(command: str, printed: str, cwd: str) -> None:
    """Run ``command``, which ``printed`` must hold as is, through bash as a user pasting it
    would (``python`` is this interpreter, the repository importable)."""
    assert command in printed, printed
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    subprocess.run(["bash", "-c", command], check=True, cwd=cwd, env=env)


def _splat_file(path: str, points: np.ndarray, logits: np.ndarray) -> None:
    from plyfile import PlyData, PlyElement

    names = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1", "scale_2",
             "rot_0", "rot_1", "rot_2", "rot_3"]
    data = np.zeros(len(points), [(k, "f4") for k in names])
    for i, c in enumerate("xyz"):
        data[c] = points[:, i]
    data["opacity"] = logits
    data["rot_0"] = 1.0
    PlyData([PlyElement.describe(data, "vertex")]).write(path)


def test_a_run_fitted_to_every_splat_is_told_why_its_point_count_changed(tmp_path, capsys):
    """An NPBG run fitted to a splat file before splat clouds kept only the splats with
    opacity >= 0.1 recorded every splat (20); the file now loads as 10, and export / resume
    refused with a bare point count. The refusal says why and how to proceed; following it
    (every splat written as a plain cloud, named with --pc-name) exports the run."""
    from types import SimpleNamespace

    from headless_train.cli import UsageError, check_resumed_scenes
    from headless_train.export import main as export_main
    from headless_train.systems.base import module_key, plain_cloud_command, points_digest
    from npbgpp_core.models import NPBG, NPBGConfig
    from npbgpp_core.ply import load_ply, save_ply
    from npbgpp_core.scene import NeuralScene

    root = make_dataset(str(tmp_path / "data"), ("sceneS",))
    scene_dir = os.path.join(root, "sceneS")
    every = load_ply(os.path.join(scene_dir, "points3d.ply")).points[:20]
    splats = os.path.join(scene_dir, "splats.ply")
    _splat_file(splats, every, np.tile([-5.0, 3.0], 10))  # opacity 0.0067 and 0.95: half go
    torch.manual_seed(0)
    model = NPBG(20, NPBGConfig())
    state = {f"refiner.{k}": v for k, v in model.refiner.state_dict().items()}
    state.update({f"scene_models.{module_key('sceneS')}.{k}": v for k, v in model.state_dict().items()})
    meta = {"system": "npbg", "config": {"name": "npbg"}, "scenes": ["sceneS"], "points": [20],
            "point_clouds": ["splats.ply"], "point_digests": [points_digest(every)]}
    ckpt = str(tmp_path / "run.ckpt")
    torch.save({"state_dict": state, "npbgpp": meta, "global_step": 1}, ckpt)
    out = str(tmp_path / "s.npbgpp")
    export = ["--checkpoint", ckpt, "--scene", scene_dir, "--out", out, "--device", "cpu"]
    assert export_main(export) == 2
    err = capsys.readouterr().err
    assert "has 10 points but the checkpoint's 'sceneS' has 20 descriptors" in err, err
    assert f"{splats} is a Gaussian-splat file of 20 splats: the run was fitted to every splat" in err, err
    assert "opacity >= 0.1 (10 of them)" in err and "name that file with --pc-name all_splats.ply " in err, err
    assert not os.path.exists(out)
    # the advice, followed
    _run_printed_command(plain_cloud_command(splats, os.path.join(scene_dir, "all_splats.ply")), err, str(tmp_path))
    assert export_main([*export, "--pc-name", "all_splats.ply"]) == 0
    np.testing.assert_array_equal(NeuralScene.load(out).points.numpy(), every)

    scene = SimpleNamespace(name="sceneS", root=scene_dir, metadata={"point_cloud": splats},
                            points=load_ply(splats, min_opacity=0.1).points)
    with pytest.raises(UsageError, match=r"this run loads sceneS \(10 points\).* Gaussian-splat file of 20 splats.*"
                                         r"name that file with datasets.pc_name"):
        check_resumed_scenes(meta, "run.ckpt", "npbg", [scene])
    # another cloud with fewer points than recorded: no such note
    plain = SimpleNamespace(name="sceneS", root=scene_dir, metadata={"point_cloud": os.path.join(scene_dir, "x.ply")},
                            points=every[:10])
    save_ply(plain.metadata["point_cloud"], every[:10])
    with pytest.raises(UsageError) as exc:
        check_resumed_scenes(meta, "run.ckpt", "npbg", [plain])
    assert "splat" not in str(exc.value)


def test_the_splat_note_names_the_plain_cloud_as_the_option_takes_it(tmp_path):
    """A splat file in a subfolder of the scene (exports/splats.ply): the note's plain cloud
    is written beside it, and the option must name it from the scene folder; it said a bare
    'all_splats.ply', which names no file there (load_point_cloud reads pc_name from the
    scene folder)."""
    from types import SimpleNamespace

    from headless_train.systems.base import dropped_splats_note

    (tmp_path / "exports").mkdir()
    splats = str(tmp_path / "exports" / "splats.ply")
    every = np.arange(12, dtype=np.float32).reshape(4, 3)
    _splat_file(splats, every, np.array([-5.0, 3.0, -5.0, 3.0]))
    scene = SimpleNamespace(root=str(tmp_path), metadata={"point_cloud": splats}, points=every[[1, 3]])
    note = dropped_splats_note(scene, 4, "--pc-name")
    assert f'save_ply("{tmp_path / "exports" / "all_splats.ply"}"' in note
    assert "name that file with --pc-name exports/all_splats.ply " in note, note
    assert "with datasets.pc_name=exports/all_splats.ply " in dropped_splats_note(scene, 4, "datasets.pc_name")


def test_the_splat_notes_commands_run_whatever_the_paths_hold(tmp_path):
    """The note's one-liner pasted the paths into Python quotes inside shell double quotes: a
    path holding ' ended the Python literal, one holding $ was expanded by the shell. Run
    through bash as printed, it writes every splat whatever the paths hold, and the option
    naming the written file splits (shell, then Hydra's override parser) back to that name."""
    from types import SimpleNamespace

    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from headless_train.systems.base import dropped_splats_note, option_argument, plain_cloud_command
    from npbgpp_core.ply import load_ply

    root = tmp_path / "scene it's $HOME"
    sub = root / 'exp\'s "$x" `y` dir'
    sub.mkdir(parents=True)
    splats = str(sub / "splats.ply")
    every = np.arange(12, dtype=np.float32).reshape(4, 3)
    _splat_file(splats, every, np.array([-5.0, 3.0, -5.0, 3.0]))
    scene = SimpleNamespace(root=str(root), metadata={"point_cloud": splats}, points=every[[1, 3]])
    plain = str(sub / "all_splats.ply")
    name = os.path.relpath(plain, root)
    note = dropped_splats_note(scene, 4, "--pc-name")
    _run_printed_command(plain_cloud_command(splats, plain), note, str(tmp_path))
    np.testing.assert_array_equal(load_ply(plain).points, every)
    assert f"name that file with {option_argument('--pc-name', name)} " in note
    assert shlex.split(option_argument("--pc-name", name)) == ["--pc-name", name]
    hydra_note = dropped_splats_note(scene, 4, "datasets.pc_name")
    assert f"name that file with {option_argument('datasets.pc_name', name)} " in hydra_note
    parser = OverridesParser.create()
    for value in (name, "all_splats.ply", "a b.ply", "it's.ply", "back\\'slash.ply", "ends in\\", 'dq"x.ply',
                  "café/all_splats.ply", "x${y}.ply", "$HOME/a.ply"):
        [argument] = shlex.split(option_argument("datasets.pc_name", value))
        [override] = parser.parse_overrides([argument])
        # what the run's config reads: OmegaConf resolves ${...} in the parsed value
        read = OmegaConf.create({"pc_name": override.value()}).pc_name
        assert (override.key_or_group, read) == ("datasets.pc_name", value), argument
