"""NPBG++ training's lr warm-up (``system.warmup_steps``, ``stage --warmup-steps``): the lr
each param group uses, the background group's ratio, warm-up 0 as before, resume."""

from __future__ import annotations

import os
import re

import pytest
import torch
from _train_fixtures import make_dataset
from hydra import compose, initialize_config_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LR, SCALE = 1e-3, 10.0


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> str:
    return make_dataset(str(tmp_path_factory.mktemp("warmdata")), ("sceneA",))


def run(data_root: str, run_dir: str, extra: list[str]) -> dict:
    """A tiny in-process NPBG++ run (environment background, lr scale 10 on its projections);
    returns its last.ckpt."""
    from headless_train.cli import run as cli_run

    overrides = ["datasets=nerf_blender_pretrain", f"datasets.data_root={data_root}", "system=npbgpp_sphere",
                 "system.background=environment", f"system.lr={LR}", f"system.background_lr_scale={SCALE}",
                 "datasets.train_num_samples=8", "trainer.max_epochs=100", "trainer.enable_progress_bar=false",
                 "trainer.limit_val_batches=0", "dataloader=small", "datasets.train_image_size=16",
                 "datasets.color_jitter_prob=0", "trainer.last_checkpoint_every_n_steps=1",
                 f"system.descriptors_save_dir={run_dir}/d", *extra]
    with initialize_config_module("headless_train.conf", version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    cli_run(cfg, run_dir)
    return torch.load(os.path.join(run_dir, "checkpoints", "last.ckpt"), map_location="cpu", weights_only=False)


def group_lrs(ckpt: dict) -> list[float]:
    return [g["lr"] for g in ckpt["optimizer_states"][0]["param_groups"]]


def test_warmup_ramps_every_group_and_resumes_mid_ramp(data_root, tmp_path):
    run_dir = str(tmp_path / "r")
    n = 4
    ckpt = run(data_root, run_dir, [f"system.warmup_steps={n}", "trainer.max_steps=2"])
    # step s (0-based) uses (s + 1) / (n + 1) of the configured lr: after 2 steps the next
    # step (s = 2) uses 3/5, the environment projections 10x that
    assert ckpt["global_step"] == 2 and ckpt["lr_schedulers"][0]["last_epoch"] == 2
    assert group_lrs(ckpt) == pytest.approx([LR * 3 / 5, LR * SCALE * 3 / 5], rel=1e-9)
    # resumed mid-ramp: continues at 4/5, not from the start
    ckpt = run(data_root, run_dir, [f"system.warmup_steps={n}", "trainer.max_steps=3", "resume=true"])
    assert ckpt["global_step"] == 3 and ckpt["lr_schedulers"][0]["last_epoch"] == 3
    assert group_lrs(ckpt) == pytest.approx([LR * 4 / 5, LR * SCALE * 4 / 5], rel=1e-9)
    ckpt = run(data_root, run_dir, [f"system.warmup_steps={n}", "trainer.max_steps=6", "resume=true"])
    assert group_lrs(ckpt) == pytest.approx([LR, LR * SCALE], rel=1e-9)  # ramp done: the configured lrs

    from headless_train.cli import UsageError

    with pytest.raises(UsageError, match="was trained with system.warmup_steps=4"):
        run(data_root, run_dir, ["system.warmup_steps=0", "trainer.max_steps=7", "resume=true"])


def test_the_first_step_moves_weights_by_the_warmed_up_lr(data_root, tmp_path):
    # Adam's first update is lr * g / (|g| + eps): with the same start and batch, warm-up N
    # moves every weight 1 / (N + 1) as far as warm-up 0 does.
    start = run(data_root, str(tmp_path / "s"), ["system.warmup_steps=0", "trainer.max_steps=1"])["state_dict"]
    seed = [f"weights_path={tmp_path}/s/checkpoints/last.ckpt", "trainer.max_steps=1"]
    plain = run(data_root, str(tmp_path / "a"), ["system.warmup_steps=0", *seed])
    warm = run(data_root, str(tmp_path / "b"), ["system.warmup_steps=3", *seed])
    assert plain["lr_schedulers"] == [] and group_lrs(plain) == [LR, LR * SCALE]  # no scheduler at all
    compared = 0
    for key, w0 in start.items():
        d_plain = plain["state_dict"][key] - w0
        d_warm = warm["state_dict"][key] - w0
        big = d_plain.abs() > 0.5 * LR  # weights with a gradient well above Adam's eps
        if key.startswith("model.") and big.any():
            torch.testing.assert_close(d_warm[big], d_plain[big] / 4, rtol=1e-3, atol=1e-9)
            compared += int(big.sum())
    assert compared > 1000


def test_a_resumed_run_refuses_another_world_up(data_root, tmp_path):
    """Resuming with another system.world_up than the checkpoint's is refused, naming both
    (before, the new up was taken silently); the same direction spelled otherwise resumes."""
    from headless_train.cli import UsageError

    run_dir = str(tmp_path / "u")
    assert run(data_root, run_dir, ["trainer.max_steps=1"])["npbgpp"]["config"]["world_up"] == [0.0, 1.0, 0.0]
    with pytest.raises(UsageError, match=re.escape("was trained with system.world_up=[0.0,1.0,0.0]; resume it with "
                                                   "that value (got system.world_up=[0.0,0.0,1.0])")):
        run(data_root, run_dir, ["system.world_up=[0.0,0.0,1.0]", "trainer.max_steps=2", "resume=true"])
    with pytest.raises(UsageError, match=re.escape("(got system.world_up=-y -> [0.0,-1.0,0.0])")):
        run(data_root, run_dir, ["system.world_up=-y", "trainer.max_steps=2", "resume=true"])
    assert run(data_root, run_dir, ["system.world_up=+y", "trainer.max_steps=2", "resume=true"])["global_step"] == 2


@pytest.mark.parametrize("text", ["-1", "1.5", "abc"])
def test_a_bad_warmup_gets_the_same_error_everywhere(text, data_root, tmp_path, capsys):
    """One parser (npbgpp_core.fitting.warmup_steps_value) behind the trainer's
    system.warmup_steps (a new run and a resumed one), the stage's --warmup-steps and the
    fitting recipe: the same message, naming the field and the value as typed. The stage
    refuses it before reading the corpus (here a missing folder) or writing anything."""
    from headless_train.cli import check_resumed_warmup
    from headless_train.stage import main as stage_main
    from npbgpp_core.fitting import coefficients_recipe

    expected = f"must be an integer >= 0, got {text}"
    with pytest.raises(ValueError, match=re.escape(f"system.warmup_steps {expected}")):
        run(data_root, str(tmp_path / "n"), [f"system.warmup_steps={text}", "trainer.max_steps=1"])
    resumable = {"npbgpp": {"config": {"warmup_steps": 4}}, "lr_schedulers": [{"last_epoch": 2}]}
    with pytest.raises(ValueError, match=re.escape(f"system.warmup_steps {expected}")):
        check_resumed_warmup(resumable, "last.ckpt", {"warmup_steps": {"-1": -1, "1.5": 1.5}.get(text, text)})
    work = tmp_path / "stage"
    assert stage_main(["--corpus", str(tmp_path / "missing"), "--work", str(work), "--warmup-steps", text]) == 2
    assert capsys.readouterr().err.strip() == f"error: --warmup-steps {expected}"
    assert not work.exists()
    with pytest.raises(ValueError, match=re.escape(f"warmup_steps {expected}")):
        coefficients_recipe(warmup_steps={"-1": -1, "1.5": 1.5}.get(text, text))


def test_warmup_values_read_by_the_stage_and_the_parser():
    from headless_train.stage import DEFAULT_WARMUP_STEPS, StageError, stage_warmup, warmup_arg
    from npbgpp_core.fitting import warmup_steps_value

    assert [warmup_steps_value(v) for v in (None, 0, 7, "7", " 12 ")] == [0, 0, 7, 7, 12]
    for bad, shown in ((True, "True"), ("", "''"), (3.0, "3.0"), ("-2", "-2")):
        with pytest.raises(ValueError, match=re.escape(f"x must be an integer >= 0, got {shown}")):
            warmup_steps_value(bad, "x")
    assert warmup_arg(None) is None and warmup_arg("0") == 0
    with pytest.raises(StageError, match="--warmup-steps must be an integer >= 0, got -3"):
        warmup_arg("-3")
    assert stage_warmup(None, None) == DEFAULT_WARMUP_STEPS
    run_cfg = {"config": {"warmup_steps": 50}}
    assert stage_warmup(None, run_cfg) == 50  # a resumed call keeps it
    assert stage_warmup(None, {"config": {}}) == 0  # runs from before the option
    with pytest.raises(StageError, match="started with --warmup-steps 50"):
        stage_warmup(7, run_cfg)
    with pytest.raises(StageError, match="the run's system.warmup_steps must be an integer >= 0, got -5"):
        stage_warmup(None, {"config": {"warmup_steps": -5}})
