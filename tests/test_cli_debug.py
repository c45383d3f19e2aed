"""``--debug`` on every command outside Hydra (export, fit, render, stage, stage pack,
prepare-capture, export-weights, average-weights, capture-sfm): a bad input ends with one line
and exit status 2 without it, and is the error itself raised, with the traceback of where it
happened, with it (headless_train.oom.run_command, the one way they end); nothing written
either way."""

from __future__ import annotations

import importlib
import os

import pytest

MISSING = "/nonexistent-npbgpp-input"

# (command module, its arguments with one bad input, the error --debug raises, the function it
# is raised in, the one line without --debug)
CASES = [
    ("headless_train.export", ["--checkpoint", "none.ckpt", "--scene", MISSING, "--out", "o.npbgpp"],
     "CheckpointError", "load_checkpoint_file", "error: checkpoint not found: none.ckpt"),
    ("headless_train.fit", ["--bundle", "none.npbgpp", "--scene", MISSING, "--out", "o.npbgpp"],
     "DatasetError", "check_scene_folder", f"error: {MISSING}: scene folder not found"),
    ("headless_train.stage", ["--gpus", "0", "--corpus", MISSING, "--work", "w"],
     "StageError", "check_corpus", f"error: corpus folder not found: {MISSING} (--corpus)"),
    ("headless_train.stage", ["pack", "--corpus", MISSING, "--out", "p"],
     "StageError", "pack", f"error: corpus folder not found: {MISSING}"),
    ("headless_train.prepare_capture", [MISSING, "--out", "o"],
     "DatasetError", "prepare_capture", f"prepare-capture: {MISSING}: capture folder not found"),
    ("headless_train.export_weights", ["--checkpoint", "none.ckpt", "--out", "w.safetensors"],
     "CheckpointError", "load_checkpoint_file", "error: checkpoint not found: none.ckpt"),
    ("headless_train.average_weights", ["--out", "m.safetensors", "one.safetensors"],
     "AverageWeightsError", "average_weights", "error: average-weights needs at least 2 files, got 1"),
    ("headless_train.capture_sfm", [MISSING, "o"],
     "CaptureSfmError", "list_photos", f"capture-sfm: {MISSING}: no such folder of photos"),
]


@pytest.mark.parametrize("module, argv, error, where, line", CASES,
                         ids=[f"{c[0].split('.')[-1]}{'-pack' if c[1][0] == 'pack' else ''}" for c in CASES])
def test_a_bad_input_is_one_line_and_with_debug_the_error_raised_where_it_happened(
        module, argv, error, where, line, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main = importlib.import_module(module).main
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(line) and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    with pytest.raises(Exception) as raised:
        main(argv + ["--debug"])
    assert type(raised.value).__name__ == error and line.split(": ", 1)[1].split(" (")[0] in str(raised.value)
    assert raised.traceback[-1].name == where  # the real traceback, not one made in the command's main
    assert capsys.readouterr().err == ""
    assert os.listdir(tmp_path) == []



def test_stage_debug_runs_its_training_child_with_hydra_verbose_and_faulthandler(tmp_path, monkeypatch):
    """`stage --debug`'s training child: the error it ends with in one line (out of memory, a
    DataLoader worker's crash) is written with its traceback into train.log only with
    hydra.verbose=headless_train (cli.hydra_main), and native code's crash leaves a Python stack only
    under python -X faulthandler, so --debug gives the child both, as it passes --debug to its export;
    without --debug neither, and with an --override of hydra.verbose that one. The child here
    (stage.run_child) records its command and fails as an out-of-memory child does."""
    import sys

    from _train_fixtures import make_dataset

    from headless_train import stage

    root = make_dataset(str(tmp_path / "data"), ("sceneA",))
    commands: list[list[str]] = []

    def child(cmd, log, *args, **kwargs):
        commands.append(cmd)
        log.write("[2026-12-01 06:50:00,000][headless_train][ERROR] - error: out of host memory (RAM) while "
                  "training (MemoryError). Lower dataloader.batch_size (now 1), ...\n")
        log.flush()
        return 2, False, None

    monkeypatch.setattr(stage, "run_child", child)
    for k, (extra, verbose) in enumerate((([], []), (["--debug"], ["hydra.verbose=headless_train"]),
                                          (["--debug", "--override", "hydra.verbose=true"], ["hydra.verbose=true"]))):
        python = [sys.executable, "-X", "faulthandler"] if extra else [sys.executable]
        argv = ["--corpus", root, "--work", str(tmp_path / f"work{k}"), "--dry-run", *extra]
        if "--debug" in extra:
            with pytest.raises(stage.StageError, match="training wrote no"):
                stage.main(argv)
        else:
            assert stage.main(argv) == 2
        assert commands[-1][:len(python) + 2] == [*python, "-m", "headless_train"]
        assert [o for o in commands[-1] if o.startswith("hydra.verbose")] == verbose, extra
