"""Training systems on a tiny rendered scene (32x32 images, 300 points): losses go down,
fine-tuning / coefficient fine-tuning / evaluation / resume / export / DDP run end to end,
bad inputs give clear errors."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading

import pytest
import torch
from _train_fixtures import make_dataset, make_tiny_scene
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from npbgpp_core import atomic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["trainer.enable_progress_bar=false", "trainer.limit_val_batches=0", "dataloader=small",
        "datasets.train_image_size=16", "datasets.train_random_zoom=[0.75,1.0]", "trainer.log_every_n_steps=1"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> str:
    return make_dataset(str(tmp_path_factory.mktemp("tinydata")), ("sceneA", "sceneB"))


def cli(args: list[str], cwd: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "headless_train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def compose_cfg(overrides: list[str]):
    with initialize_config_module("headless_train.conf", version_base="1.3"):
        return compose("config", overrides=overrides)


def step_count(path: str) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


# ------------------------------------------------------------------ in-process
def _fixed_batch_descent(system_name: str, data_root: str, tmp_path, extra: list[str]) -> tuple[float, float]:
    from headless_train.data import SceneDataModule
    from headless_train.systems import build_system

    torch.manual_seed(0)
    cfg = compose_cfg([f"system={system_name}", "datasets=nerf_blender_pretrain", f"datasets.data_root={data_root}",
                       f"system.descriptors_save_dir={tmp_path}/d", "datasets.train_num_samples=2",
                       "datasets.color_jitter_prob=0", *FAST[1:], *extra])
    dm = SceneDataModule(cfg, seed=3407)
    system = build_system(OmegaConf.to_container(cfg, resolve=True), dm.scenes)
    batch = next(iter(dm.train_dataloader()))  # fixed batch, fixed seeds: deterministic
    opts = system.configure_optimizers()
    opts = opts if isinstance(opts, list) else [opts]

    def loss_now() -> torch.Tensor:
        torch.manual_seed(1)  # same auxiliary-loss pixel dropout every time
        return system.batch_loss(batch)[0]

    with torch.no_grad():
        start = float(loss_now())
    for _ in range(4):
        for o in opts:
            o.zero_grad()
        loss_now().backward()
        for o in opts:
            o.step()
    with torch.no_grad():
        end = float(loss_now())
    return start, end


def test_npbgpp_pretraining_lowers_the_loss(data_root, tmp_path):
    # lr 1e-3 instead of the recipe's 1e-4 so that four steps make a clear difference.
    start, end = _fixed_batch_descent("npbgpp_sphere", data_root, tmp_path, ["system.lr=1e-3"])
    assert math.isfinite(start) and end < 0.85 * start


def test_npbg_training_lowers_the_loss(data_root, tmp_path):
    start, end = _fixed_batch_descent("npbg", data_root, tmp_path, ["datasets.selection_count=0"])
    assert math.isfinite(start) and end < 0.8 * start


# ------------------------------------------------------------------ end to end
def run_inproc(overrides: list[str], run_dir: str):
    """The CLI's run() in this process (no interpreter start-up); paths absolute."""
    from headless_train.cli import run

    if not any(o.startswith("system.descriptors_save_dir=") for o in overrides):
        overrides = [*overrides, f"system.descriptors_save_dir={run_dir}/descriptors"]
    return run(compose_cfg(overrides), run_dir)


@pytest.fixture(scope="module")
def npbgpp_run(data_root, tmp_path_factory) -> str:
    """NPBG++ pretraining for 2 steps through ``python -m headless_train``, then resumed to 4 steps."""
    work = str(tmp_path_factory.mktemp("npbgpp"))
    args = ["datasets=nerf_blender_pretrain", f"datasets.data_root={data_root}",
            "system=npbgpp_sphere", "datasets.train_num_samples=3", "trainer.max_epochs=5",
            "dataloader.train_data_mode=each", "trainer.reload_dataloaders_every_n_epochs=1",
            "system.max_scenes_per_train_epoch=1", *FAST]
    proc = ok(cli(["hydra.run.dir=exp/pre", *args, "trainer.max_steps=2"], work))
    assert "no VGG-19 weights" in proc.stdout + proc.stderr  # the fallback loss is announced
    ckpts = os.path.join(work, "exp/pre/checkpoints")
    assert step_count(os.path.join(ckpts, "last.ckpt")) == 2
    run_inproc([*args, "trainer.max_steps=4", "resume=true"], os.path.join(work, "exp/pre"))
    return work


def test_resume_continues_the_step_count(npbgpp_run):
    ckpts = os.path.join(npbgpp_run, "exp/pre/checkpoints")
    assert step_count(os.path.join(ckpts, "last.ckpt")) == 4
    ckpt = torch.load(os.path.join(ckpts, "last.ckpt"), map_location="cpu", weights_only=False)
    assert ckpt["optimizer_states"][0]["state"]  # Adam moments travel with the checkpoint
    assert ckpt["npbgpp"]["system"] == "npbgpp" and ckpt["npbgpp"]["config"]["aggregator"] == "sphere"
    assert {"epoch0.ckpt", "last.ckpt"} <= set(os.listdir(ckpts))
    assert os.listdir(os.path.join(npbgpp_run, "exp/pre/tensorboard"))


@pytest.fixture(scope="module")
def npbgpp_eval(npbgpp_run, data_root) -> str:
    run_dir = os.path.join(npbgpp_run, "exp/eval")
    run_inproc(["datasets=nerf_blender_one_scene", f"datasets.data_root={data_root}", "datasets.scene_name=sceneA",
                "system=npbgpp_sphere", "eval_only=true", "dataloader=small",
                f"weights_path={npbgpp_run}/exp/pre/checkpoints/last.ckpt"], run_dir)
    return run_dir


def test_eval_only_writes_metrics_renders_and_coefficients(npbgpp_eval):
    with open(os.path.join(npbgpp_eval, "metrics.json")) as f:
        metrics = json.load(f)
    scene = metrics["scenes"]["sceneA"]
    assert scene["views"] == 1 and "LPIPS skipped" in metrics["lpips"]
    for image in scene["images"].values():
        assert math.isfinite(image["psnr"]) and -1 <= image["ssim"] <= 1 and image["lpips"] is None
    assert set(os.listdir(os.path.join(npbgpp_eval, "renders/sceneA"))) == {"r_5_pred.png", "r_5_gt.png"}
    from headless_train.checkpoints import load_descriptors

    coef = load_descriptors(os.path.join(npbgpp_eval, "descriptors"), "sceneA", n_points=300)
    assert coef.shape == (300, 56) and torch.isfinite(coef).all() and coef.abs().sum() > 0


def test_coefficients_ft_trains_and_evaluates(npbgpp_eval, npbgpp_run, data_root, caplog):
    common = ["datasets=h3ds_one_scene", "datasets.format=nerf_synthetic", f"datasets.data_root={data_root}",
              "datasets.scene_name=sceneA", "datasets.selection_count=0", "system=coefficients_ft",
              "system.max_points=1e6", "dataloader=small", "trainer.enable_progress_bar=false"]
    ft = os.path.join(npbgpp_run, "exp/ft")
    run_inproc([*common, "datasets.train_num_samples=2", "datasets.train_image_size=null",
                "datasets.train_random_shift=false", "datasets.train_random_zoom=[0.5,1.0]", "trainer.max_epochs=1",
                f"system.descriptors_pretrained_dir={npbgpp_eval}/descriptors",
                f"weights_path={npbgpp_run}/exp/pre/checkpoints/last.ckpt", "trainer.limit_val_batches=0",
                "loss.l1_weight=7"], ft)
    # its loss is the recipe's own: a loss.* setting given is named as unread, not silently dropped
    assert ("system=coefficients_ft trains with the published recipe's own loss (L1 at the system.loss_factors "
            "resolutions) and does not read loss.l1_weight=7") in caplog.text
    from headless_train.checkpoints import load_descriptors

    before = load_descriptors(os.path.join(npbgpp_eval, "descriptors"), "sceneA")
    after = load_descriptors(os.path.join(ft, "descriptors"), "sceneA")
    assert after.shape == before.shape and not torch.equal(after, before)  # RMSprop moved them
    from headless_train.checkpoints import load_source_checkpoint
    from headless_train.systems.coefficients_ft import coefficients_config
    from npbgpp_core.fitting import FIT_ALIGNED

    # Rolled views render as the library's fits do (the NPBG++ network renders upright);
    # a checkpoint written before the choice was recorded renders in the view's frame.
    config = load_source_checkpoint(f"{ft}/checkpoints/last.ckpt")["npbgpp"]["config"]
    assert config["align_during_rendering"] is FIT_ALIGNED
    assert coefficients_config(config).align_during_rendering is FIT_ALIGNED
    old = {k: v for k, v in config.items() if k not in ("align_during_rendering", "render_canvas")}
    assert coefficients_config(old).align_during_rendering is False
    result = run_inproc([*common, f"system.descriptors_pretrained_dir={ft}/descriptors",
                         f"weights_path={ft}/checkpoints/last.ckpt", "eval_only=true"],
                        os.path.join(npbgpp_run, "exp/ft_test"))
    assert math.isfinite(result["mean"]["psnr"])
    with pytest.raises(ValueError, match="descriptors_pretrained_dir"):
        run_inproc([*common, f"weights_path={npbgpp_run}/exp/pre/checkpoints/last.ckpt", "eval_only=true"],
                   os.path.join(npbgpp_run, "exp/ft_bad"))
    # another scene: the checkpoint's coefficients are sceneA's; sceneB's stayed random and were reported
    with pytest.raises(ValueError, match=r"system=coefficients_ft: .*last.ckpt holds no descriptors fitted to sceneB "
                                         r"\(300 points\) \(it holds sceneA \(300 points\)\)"):
        run_inproc([*common[:3], "datasets.scene_name=sceneB", *common[4:], f"weights_path={ft}/checkpoints/last.ckpt",
                    "eval_only=true"], os.path.join(npbgpp_run, "exp/ft_other"))


def test_descriptors_of_the_whole_cloud_load_for_the_points_a_max_points_run_keeps(data_root, tmp_path):
    """The published evaluate (every point) -> fine-tune (system.max_points) pair on a cloud over
    the limit: the fine-tune takes the rows of the points it keeps. Each row holds its own
    point's coordinates, so every loaded row must equal its point's (matched by content, not
    by index); a file with another row count is still refused."""
    from headless_train.checkpoints import save_descriptors
    from headless_train.data import SceneDataModule
    from headless_train.systems import build_system
    from npbgpp_core.datasets import load_scene
    from npbgpp_core.datasets.scene_data import subsample_indices

    whole = torch.from_numpy(load_scene(os.path.join(data_root, "sceneA")).points).float()
    assert len(whole) == 300
    folder = tmp_path / "desc"
    folder.mkdir()
    save_descriptors(str(folder), "sceneA", torch.cat([whole, -whole, whole[:, :2]], dim=1))  # 8 numbers a point
    overrides = ["datasets=nerf_blender_one_scene", f"datasets.data_root={data_root}", "datasets.scene_name=sceneA",
                 "system=npbg", "system.max_points=120", f"system.descriptors_pretrained_dir={folder}",
                 f"system.descriptors_save_dir={tmp_path}/out"]
    cfg = compose_cfg(overrides)
    system = build_system(OmegaConf.to_container(cfg, resolve=True), SceneDataModule(cfg, seed=0).scenes)
    kept = system._points_cpu[0].float()
    assert len(kept) == 120 and len(torch.unique(kept, dim=0)) == 120
    loaded = system.scene_model(0).descriptors.detach()
    assert torch.equal(loaded[:, :3], kept) and torch.equal(loaded[:, 3:6], -kept)
    assert not torch.equal(kept, whole[:120])  # a subset spread over the cloud, not its first rows
    assert torch.equal(kept, whole[torch.from_numpy(subsample_indices(300, 120))])
    save_descriptors(str(folder), "sceneA", torch.zeros(200, 8))
    with pytest.raises(ValueError, match="has 200 rows but the scene's cloud has 120 points"):
        build_system(OmegaConf.to_container(cfg, resolve=True), SceneDataModule(cfg, seed=0).scenes)


def test_coefficients_ft_renders_upright_about_the_axis_its_coefficients_were_aggregated_about(
        npbgpp_run, data_root, tmp_path):
    """The published evaluate -> fine-tune lines with no world_up flag on the fine-tune and
    no environment map: the evaluation aligned its views about system.world_up=[0,0,1] (the
    checkpoint stored +Y); its coefficient files record that axis, and coefficients_ft, whose
    model renders upright, takes it (it took the checkpoint's +Y, the coefficients then
    rendered upright about another axis than they were aggregated about). Its own
    coefficients record it for the test run. A given other axis is refused, whether the model
    renders upright or not (the learnt coefficients were written recording the given axis),
    and so is a record other than the axis of the coefficients_ft checkpoint a run continues
    (it took the files' axis)."""
    from headless_train.checkpoints import load_descriptors, load_source_checkpoint, recorded_world_up, save_descriptors

    pre = f"{npbgpp_run}/exp/pre/checkpoints/last.ckpt"
    assert load_source_checkpoint(pre)["npbgpp"]["config"]["world_up"] == [0.0, 1.0, 0.0]
    ev = str(tmp_path / "eval")
    run_inproc(["datasets=nerf_blender_one_scene", f"datasets.data_root={data_root}", "datasets.scene_name=sceneA",
                "system=npbgpp_sphere", "system.world_up=[0,0,1]", "eval_only=true", "dataloader=small",
                f"weights_path={pre}"], ev)
    assert not os.path.exists(f"{ev}/descriptors/sceneA.background")
    assert recorded_world_up(f"{ev}/descriptors/sceneA") == (0.0, 0.0, 1.0)
    ft = str(tmp_path / "ft")
    run_inproc(["datasets=h3ds_one_scene", "datasets.format=nerf_synthetic", f"datasets.data_root={data_root}",
                "datasets.scene_name=sceneA", "datasets.selection_count=0", "system=coefficients_ft",
                "dataloader=small", "trainer.enable_progress_bar=false", "datasets.train_num_samples=1",
                "trainer.max_epochs=1", "trainer.limit_val_batches=0", f"weights_path={pre}",
                f"system.descriptors_pretrained_dir={ev}/descriptors"], ft)
    config = load_source_checkpoint(f"{ft}/checkpoints/last.ckpt")["npbgpp"]["config"]
    assert config["world_up"] == [0.0, 0.0, 1.0] and config["align_during_rendering"] is True
    assert recorded_world_up(f"{ft}/descriptors/sceneA") == (0.0, 0.0, 1.0)
    line = ["datasets=h3ds_one_scene", "datasets.format=nerf_synthetic", f"datasets.data_root={data_root}",
            "datasets.scene_name=sceneA", "datasets.selection_count=0", "system=coefficients_ft", "dataloader=small",
            "eval_only=true"]
    for upright in ("null", "false"):
        with pytest.raises(ValueError, match=r"coefficients .*eval/descriptors/sceneA were aggregated about world_up "
                                             r"\[0\.0,0\.0,1\.0\].*system\.world_up=\+y -> \[0\.0,1\.0,0\.0\]"):
            run_inproc([*line, "system.world_up=+y", f"system.align_during_rendering={upright}", f"weights_path={pre}",
                        f"system.descriptors_pretrained_dir={ev}/descriptors"], str(tmp_path / "turned"))
    other = str(tmp_path / "other")
    save_descriptors(other, "sceneA", load_descriptors(f"{ev}/descriptors", "sceneA"), [0.0, 1.0, 0.0])
    with pytest.raises(ValueError, match=r"coefficients .*other/sceneA were aggregated about world_up "
                                         r"\[0\.0,1\.0,0\.0\], the coefficients_ft checkpoint .*ft/checkpoints/"
                                         r"last\.ckpt this run continues was trained with "
                                         r"system\.world_up=\[0\.0,0\.0,1\.0\]"):
        run_inproc([*line, f"weights_path={ft}/checkpoints/last.ckpt", f"system.descriptors_pretrained_dir={other}"],
                   str(tmp_path / "continued"))


def test_coefficients_ft_can_render_in_the_views_frame_as_published(npbgpp_eval, npbgpp_run, data_root,
                                                                     tmp_path, monkeypatch):
    """system.align_during_rendering=false builds the published NPBG model (every view in
    its own frame) from an NPBG++ network, null the library's fits' choice; a run continuing
    a coefficients_ft checkpoint keeps its own, and a given other value is refused, as is true
    from a network that does not render upright."""
    import headless_train.systems as systems
    from npbgpp_core.fitting import FIT_ALIGNED

    built = []
    build = systems.build_system
    monkeypatch.setattr(systems, "build_system", lambda *a, **k: built.append(build(*a, **k)) or built[-1])
    common = ["datasets=nerf_blender_one_scene", f"datasets.data_root={data_root}", "datasets.scene_name=sceneA",
              "system=coefficients_ft", "dataloader=small", "eval_only=true",
              f"system.descriptors_pretrained_dir={npbgpp_eval}/descriptors"]
    pre = f"weights_path={npbgpp_run}/exp/pre/checkpoints/last.ckpt"
    for given, want in (("false", False), ("null", FIT_ALIGNED)):
        run_inproc([*common, pre, f"system.align_during_rendering={given}"], str(tmp_path / f"run_{given}"))
        assert built[-1].scene_model(0).config.align_during_rendering is want, given
    ft = str(tmp_path / "ft")
    run_inproc([*common[:-2], "eval_only=false", "datasets.train_num_samples=1", "trainer.max_epochs=1",
                "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false", pre,
                "system.align_during_rendering=false", common[-1]], ft)
    # fitted in every view's own frame, its coefficients record no axis: a run from them renders so too
    from headless_train.checkpoints import recorded_world_up

    assert recorded_world_up(f"{npbgpp_eval}/descriptors/sceneA") is not None
    assert recorded_world_up(f"{ft}/descriptors/sceneA") is None
    continued = [*common, f"weights_path={ft}/checkpoints/last.ckpt"]
    run_inproc(continued, str(tmp_path / "test"))
    assert built[-1].scene_model(0).config.align_during_rendering is False
    with pytest.raises(ValueError, match="align_during_rendering=true, but the coefficients_ft checkpoint this run "
                                         "continues was trained with false"):
        run_inproc([*continued, "system.align_during_rendering=true"], str(tmp_path / "flip"))
    with pytest.raises(ValueError, match="system.align_during_rendering must be true, false or null, got 'yes'"):
        run_inproc([*common, pre, "system.align_during_rendering=yes"], str(tmp_path / "bad"))
    # an NPBG++ network that renders every view in its own frame: true is refused naming it (it was dropped)
    from headless_train.checkpoints import atomic_torch_save

    flat = torch.load(f"{npbgpp_run}/exp/pre/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    flat["npbgpp"]["config"]["align_during_rendering"] = False
    atomic_torch_save(flat, str(tmp_path / "flat.ckpt"))
    with pytest.raises(ValueError, match=r"align_during_rendering=true, but the NPBG\+\+ network .*flat\.ckpt renders "
                                         r"every view in its own frame"):
        run_inproc([*common, f"weights_path={tmp_path}/flat.ckpt", "system.align_during_rendering=true"],
                   str(tmp_path / "flat"))
    run_inproc([*common, f"weights_path={tmp_path}/flat.ckpt"], str(tmp_path / "flat_null"))
    assert built[-1].scene_model(0).config.align_during_rendering is False


def test_a_resumed_coefficients_ft_run_keeps_its_checkpoints_render_frame(npbgpp_run, data_root, tmp_path):
    """resume=true with the published fine-tuning line (weights_path= the NPBG++ checkpoint)
    continues with the model its checkpoint holds: one written before the alignment choice
    was recorded keeps rendering in the view's frame (it was rebuilt from the NPBG++
    checkpoint and switched to upright rendering mid-run)."""
    from headless_train.checkpoints import atomic_torch_save, load_source_checkpoint

    pre = f"{npbgpp_run}/exp/pre/checkpoints/last.ckpt"
    ev = str(tmp_path / "eval")
    run_inproc(["datasets=nerf_blender_one_scene", f"datasets.data_root={data_root}", "datasets.scene_name=sceneA",
                "system=npbgpp_sphere", "eval_only=true", "dataloader=small", f"weights_path={pre}"], ev)
    ft = str(tmp_path / "ft")
    line = ["datasets=h3ds_one_scene", "datasets.format=nerf_synthetic", f"datasets.data_root={data_root}",
            "datasets.scene_name=sceneA", "datasets.selection_count=0", "system=coefficients_ft", "dataloader=small",
            "trainer.enable_progress_bar=false", "datasets.train_num_samples=1", "trainer.limit_val_batches=0",
            f"weights_path={pre}", f"system.descriptors_pretrained_dir={ev}/descriptors"]
    run_inproc([*line, "trainer.max_epochs=1"], ft)
    last = f"{ft}/checkpoints/last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["npbgpp"]["config"].pop("align_during_rendering") is True
    del ckpt["npbgpp"]["config"]["render_canvas"]
    atomic_torch_save(ckpt, last)  # as written before the fields existed
    run_inproc([*line, "trainer.max_epochs=2", "resume=true"], ft)
    resumed = load_source_checkpoint(last)
    assert resumed["epoch"] == 1 and resumed["npbgpp"]["config"]["align_during_rendering"] is False
    # resumed from coefficients recording another axis than the checkpoint's: refused naming both
    # (with system.world_up=null the files' axis was taken after the resume check had passed)
    from headless_train.checkpoints import load_descriptors, save_descriptors

    save_descriptors(str(tmp_path / "z"), "sceneA", load_descriptors(f"{ev}/descriptors", "sceneA"), [0.0, 0.0, 1.0])
    moved = [o if not o.startswith("system.descriptors_pretrained_dir=") else
             f"system.descriptors_pretrained_dir={tmp_path}/z" for o in line]
    with pytest.raises(ValueError, match=r"z/sceneA were aggregated about world_up \[0\.0,0\.0,1\.0\], the "
                                         r"coefficients_ft checkpoint .*last\.ckpt this run continues was trained with "
                                         r"system\.world_up=\[0\.0,1\.0,0\.0\]"):
        run_inproc([*moved, "trainer.max_epochs=3", "resume=true"], ft)


def test_export_bundles_render(npbgpp_run, data_root, tmp_path):
    from npbgpp_core import Camera
    from npbgpp_core.scene import NeuralScene

    out = str(tmp_path / "a.npbgpp")
    ok(cli(["export", "--checkpoint", "exp/pre/checkpoints/last.ckpt", "--scene", f"{data_root}/sceneA",
            "--out", out], npbgpp_run))
    scene = NeuralScene.load(out)
    assert scene.kind == "npbgpp" and tuple(scene.features.shape) == (300, 7, 8)
    img = scene.renderer("cpu").render(Camera.look_at((0, 0.5, -3), (0, 0, 0), image_size=(32, 32)))
    assert img.shape == (3, 32, 32) and torch.isfinite(img).all()
    from headless_train.export import main as export_main

    bad = export_main(["--checkpoint", f"{data_root}/sceneA/points3d.ply", "--scene", f"{data_root}/sceneA",
                       "--out", out])
    assert bad == 2


def test_npbg_pretrain_then_fine_tune_and_export(data_root, tmp_path, caplog):
    import logging

    from headless_train.checkpoints import CheckpointError, load_descriptors
    from headless_train.export import main as export_main
    from npbgpp_core.scene import NeuralScene

    work = str(tmp_path)
    caplog.set_level(logging.INFO)
    run_inproc(["datasets=nerf_blender_pretrain", f"datasets.data_root={data_root}", "datasets.selection_count=0",
                "system=npbg", f"system.descriptors_save_dir={work}/npbg/result/descriptors", "trainer.max_epochs=2",
                "dataloader.train_data_mode=each", "trainer.reload_dataloaders_every_n_epochs=1",
                "system.max_points=120", "datasets.train_num_samples=1", *FAST], f"{work}/npbg")
    assert sorted(os.listdir(f"{work}/npbg/result/descriptors")) == ["sceneA", "sceneB"]
    assert "kept a random subset (seed 123)" in caplog.text  # max_points < cloud is reported
    run_inproc(["datasets=nerf_blender_one_scene", f"datasets.data_root={data_root}", "datasets.scene_name=sceneB",
                "datasets.selection_count=0", "system=npbg", "system.max_scenes_per_train_epoch=1",
                "trainer.max_epochs=1", f"weights_path={work}/npbg/checkpoints/epoch1.ckpt", "system.max_points=6e6",
                "datasets.train_num_samples=2", *FAST], f"{work}/npbg_b")
    assert "loaded" in caplog.text  # the refiner came from the pretraining checkpoint
    assert load_descriptors(f"{work}/npbg_b/descriptors", "sceneB").shape == (300, 8)
    assert load_descriptors(f"{work}/npbg/result/descriptors", "sceneA").shape == (120, 8)
    out = os.path.join(work, "b.npbgpp")
    assert export_main(["--checkpoint", f"{work}/npbg_b/checkpoints/last.ckpt", "--scene", f"{data_root}/sceneB",
                        "--out", out]) == 0
    assert NeuralScene.load(out).kind == "npbg"
    # An NPBG checkpoint cannot seed NPBG++: refused, naming both systems.
    with pytest.raises(CheckpointError, match="trained by system 'npbg'.*'npbgpp'"):
        run_inproc(["datasets=nerf_blender_one_scene", f"datasets.data_root={data_root}",
                    "datasets.scene_name=sceneB", f"weights_path={work}/npbg/checkpoints/epoch1.ckpt", *FAST],
                   f"{work}/bad")


def test_bad_inputs_give_clear_errors(data_root, tmp_path):
    from headless_train.cli import UsageError
    from headless_train.data import DataConfigError

    with pytest.raises(DataConfigError, match="nowhere"):
        run_inproc(["datasets=dtu_one_scene", f"datasets.data_root={tmp_path}/nowhere", *FAST], str(tmp_path / "r"))
    with pytest.raises(UsageError, match="resume=true continues the run in .*, but it has no .*last.ckpt"):
        run_inproc(["datasets=nerf_blender_one_scene", f"datasets.data_root={data_root}",
                    "datasets.scene_name=sceneA", "resume=true", *FAST], str(tmp_path / "r"))
    empty = make_dataset(str(tmp_path / "empty"), ("sceneE",))
    from npbgpp_core import save_ply

    save_ply(os.path.join(empty, "sceneE", "points3d.ply"), torch.zeros(0, 3).numpy())
    with pytest.raises(Exception, match="point") as info:
        run_inproc(["datasets=nerf_blender_one_scene", f"datasets.data_root={empty}", "datasets.scene_name=sceneE",
                    *FAST], str(tmp_path / "r"))
    assert "sceneE" in str(info.value)
    # Through the command line: exit status 2 and the file named.
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"PK\x03\x04 truncated")
    proc = cli(["hydra.run.dir=exp/c", "datasets=nerf_blender_one_scene", f"datasets.data_root={data_root}",
                "datasets.scene_name=sceneA", f"weights_path={corrupt}", *FAST], str(tmp_path))
    assert proc.returncode == 2 and "corrupt.ckpt is corrupt" in proc.stderr


def _interrupt_training(work: str, run: str, args: list[str], interrupt, **popen) -> tuple[str, str, int]:
    """Start ``python -m headless_train`` (last.ckpt every 2 steps), wait for the first
    last.ckpt (training is under way), call ``interrupt(proc)``; returns (output, last.ckpt
    path, exit status)."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "headless_train", f"hydra.run.dir={run}", *args,
                             "trainer.last_checkpoint_every_n_steps=2"],
                            cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    last = os.path.join(work, run, "checkpoints", "last.ckpt")
    waited = threading.Event()
    for _ in range(3000):  # bounded polling for the first checkpoint (no timing assertion)
        if os.path.isfile(last) or proc.poll() is not None:
            break
        waited.wait(0.1)
    assert proc.poll() is None, "".join(output)[-2000:]
    interrupt(proc)
    proc.wait(timeout=120)
    reader.join(timeout=10)
    return "".join(output), last, proc.returncode


ENDLESS_NPBG = ["datasets=nerf_blender_one_scene", "datasets.scene_name=sceneA", "system=npbg",
                "datasets.selection_count=0", "datasets.train_num_samples=100000", "trainer.max_epochs=1", *FAST]


def test_ctrl_c_leaves_a_usable_last_checkpoint(data_root, tmp_path):
    work = str(tmp_path)
    args = [f"datasets.data_root={data_root}", *ENDLESS_NPBG]
    # A job started in the background inherits SIGINT as "ignored" (then Python never raises
    # KeyboardInterrupt): give the child the default disposition, as a terminal's Ctrl-C has.
    text, last, status = _interrupt_training(work, "exp/int", args, lambda proc: proc.send_signal(signal.SIGINT),
                                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert "interrupted (KeyboardInterrupt): saved" in text, text[-2000:]
    assert status == 130, text[-2000:]  # 128 + SIGINT, as a shell reports Ctrl-C
    steps = step_count(last)
    assert steps >= 2
    run_inproc([*args, "resume=true", f"trainer.max_steps={steps + 1}"], os.path.join(work, "exp/int"))
    assert step_count(last) == steps + 1


def test_sigterm_to_the_whole_job_with_loader_workers_still_saves(data_root, tmp_path):
    """A scheduler (Slurm, systemd, ``timeout``) sends SIGTERM to every process of the job,
    DataLoader workers included; their deaths must not abort the final checkpoint."""
    args = [f"datasets.data_root={data_root}", *ENDLESS_NPBG, "dataloader.num_workers=2"]
    text, last, status = _interrupt_training(str(tmp_path), "exp/term", args,
                                             lambda proc: os.killpg(proc.pid, signal.SIGTERM), start_new_session=True)
    assert "interrupted (SIGTERMException): saved" in text, text[-3000:]
    assert status == 143, text[-3000:]  # not 0: `train && export` and schedulers see the interruption
    assert "could not save" not in text
    assert step_count(last) >= 2


@pytest.fixture
def python_sigint():
    """Python's own SIGINT handler, as in a terminal (a background job inherits SIGINT ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_during_a_logger_write_stops_at_the_next_batch(data_root, tmp_path, monkeypatch, python_sigint):
    """A Ctrl-C that arrives while TensorBoard's writer enqueues an event is acted on at the
    next batch boundary, never inside the writer: a KeyboardInterrupt between its queue taking
    the event and waking the writer thread left the shutdown's flush waiting for the writer's
    120 s flush interval (the Ctrl-C test then timed out on a loaded machine)."""
    from tensorboard.summary.writer.event_file_writer import _AsyncWriter

    last = tmp_path / "r" / "checkpoints" / "last.ckpt"
    original = _AsyncWriter.write
    seen = {"sent": 0, "raised_inside_writer": 0}

    def write(self, data):
        if last.is_file() and not seen["sent"]:
            seen["sent"] = 1
            try:
                signal.raise_signal(signal.SIGINT)
                return original(self, data)
            except KeyboardInterrupt:
                seen["raised_inside_writer"] += 1
                raise
        return original(self, data)

    monkeypatch.setattr(_AsyncWriter, "write", write)
    args = [f"datasets.data_root={data_root}", *ENDLESS_NPBG, "trainer.last_checkpoint_every_n_steps=2",
            "trainer.max_steps=30"]
    with pytest.raises(SystemExit) as info:
        run_inproc(args, str(tmp_path / "r"))
    assert seen == {"sent": 1, "raised_inside_writer": 0}
    assert info.value.code == 130
    assert 2 <= step_count(str(last)) < 30
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored after the run


def test_a_second_ctrl_c_stops_at_once(tmp_path, python_sigint):
    from headless_train.checkpoints import EpochAndLastCheckpoint

    saver = EpochAndLastCheckpoint(str(tmp_path))
    saver._defer_ctrl_c()
    try:
        signal.raise_signal(signal.SIGINT)  # first: only noted
        assert saver._sigint_pending
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    finally:
        saver._restore_ctrl_c()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_two_process_ddp_on_cpu(data_root, tmp_path):
    work = str(tmp_path)
    proc = ok(cli(["hydra.run.dir=exp/ddp", "datasets=nerf_blender_pretrain", f"datasets.data_root={data_root}",
            "system=npbg", "datasets.selection_count=0", "datasets.train_num_samples=2",
            "dataloader.train_data_mode=each", "trainer.cpu_processes=2", "trainer.max_steps=2",
            "trainer.max_epochs=1", *FAST], work, timeout=400))
    assert step_count(os.path.join(work, "exp/ddp/checkpoints/last.ckpt")) == 2
    text = proc.stdout + proc.stderr
    # train_data_mode=each: every process trains on its own scene.
    assert "rank 0: scenes ['sceneA']" in text and "rank 1: scenes ['sceneB']" in text, text[-3000:]


@pytest.mark.blender
def test_training_and_eval_on_a_blender_rendered_scene(tmp_path):
    """The published pipeline on a scene Blender rendered (6 views, 32x32, 400 surface points)."""
    root = tmp_path / "blender"
    code = ("from blender_addon.datagen import render_procedural_scene; "
            f"render_procedural_scene('checker_cube', {str(root / 'cube')!r}, views=6, size=(32, 32), seed=0, "
            "points=400)")
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    render = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert render.returncode == 0, render.stderr[-2000:]  # bpy runs in its own process
    common = ["datasets=blender_one_scene", f"datasets.data_root={root}", "datasets.scene_name=cube",
              "system=npbgpp_sphere", *FAST]
    run_dir = str(tmp_path / "run")
    run_inproc([*common, "datasets.train_num_samples=2", "trainer.max_steps=2"], run_dir)
    assert step_count(os.path.join(run_dir, "checkpoints/last.ckpt")) == 2
    result = run_inproc([*common, "eval_only=true", f"weights_path={run_dir}/checkpoints/last.ckpt"],
                        str(tmp_path / "eval"))
    cube = result["scenes"]["cube"]
    assert cube["views"] >= 1 and math.isfinite(cube["mean"]["psnr"]) and math.isfinite(cube["mean"]["ssim"])


def test_full_disk_during_training_keeps_the_previous_checkpoint(data_root, tmp_path, monkeypatch):
    import errno


    args = ["datasets=nerf_blender_one_scene", f"datasets.data_root={data_root}", "datasets.scene_name=sceneA",
            "system=npbg", "datasets.selection_count=0", "datasets.train_num_samples=50", "trainer.max_epochs=3",
            *FAST]
    run_dir = str(tmp_path / "run")
    run_inproc([*args, "trainer.max_steps=2"], run_dir)
    last = os.path.join(run_dir, "checkpoints/last.ckpt")
    assert step_count(last) == 2

    def full_disk(fileobj, data: bytes) -> None:
        fileobj.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "_write_bytes", full_disk)
    with pytest.raises(OSError, match="disk full while writing .*last.ckpt"):
        run_inproc([*args, "trainer.max_steps=4", "trainer.last_checkpoint_every_n_steps=1", "resume=true"], run_dir)
    monkeypatch.undo()
    assert step_count(last) == 2  # the previous checkpoint is intact and loads
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["epoch0.ckpt", "last.ckpt"]


def test_loss_mask_covers_the_background_unless_asked(data_root):
    """RGBA scenes: by default the loss counts every crop pixel (the white background must
    be learned); loss_on_object_mask=true restricts it to the image's alpha."""
    from headless_train.data import SceneDataModule

    base = ["datasets=nerf_blender_pretrain", f"datasets.data_root={data_root}", "datasets.train_num_samples=1",
            "datasets.train_image_size=null", "datasets.train_random_zoom=null", "datasets.color_jitter_prob=0"]
    default = SceneDataModule(compose_cfg(base), seed=3407).train_dataloader().dataset[0]
    assert bool((default["mask"] == 1).all())
    masked = SceneDataModule(compose_cfg([*base, "datasets.loss_on_object_mask=true"]), seed=3407)
    sample = masked.train_dataloader().dataset[0]
    scene = masked.scenes[sample["scene"]]
    alpha = scene.load_mask(sample["view"])
    assert 0 < float(alpha.mean()) < 1  # the tiny scene has background pixels
    assert torch.equal(sample["mask"], alpha)


def test_keep_epoch_checkpoints_keeps_only_the_newest(data_root, tmp_path):
    run_dir = str(tmp_path / "keep")
    args = ["datasets=nerf_blender_one_scene", f"datasets.data_root={data_root}", "datasets.scene_name=sceneA",
            "system=npbg", "datasets.selection_count=0", "datasets.train_num_samples=1", "trainer.max_epochs=4", *FAST]
    run_inproc([*args, "trainer.keep_epoch_checkpoints=2"], run_dir)
    names = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))
    assert names == ["epoch2.ckpt", "epoch3.ckpt", "last.ckpt"]
    with pytest.raises(ValueError, match="keep_epoch_checkpoints"):
        run_inproc([*args, "trainer.keep_epoch_checkpoints=0"], str(tmp_path / "bad"))


def test_list_options_reach_the_loader_as_lists(tmp_path):
    """`+datasets.options.views_config=[...]` (H3DS input views) arrives as an OmegaConf
    ListConfig; the loader takes lists and refused it as 'must be a list'."""
    from test_datasets_formats import POINTS, make_cameras, write_idr

    from headless_train.data import SceneDataModule
    from npbgpp_core import save_ply

    scene = tmp_path / "H3DS" / "5ae021f2805c0854"
    write_idr(str(scene), make_cameras(6, seed=5), [f"img_{i:04d}.jpg" for i in range(6)],
              [f"mask_{i:04d}.png" for i in range(6)])
    save_ply(str(scene / "points3d.ply"), POINTS.astype("float32"))
    cfg = compose_cfg(["datasets=h3ds_one_scene", f"datasets.data_root={tmp_path}/H3DS",
                       "+datasets.options.views_config=[0,2,4]"])
    loaded = SceneDataModule(cfg, seed=3407).scenes[0]
    assert (loaded.train, loaded.test) == ([0, 2, 4], [1, 3, 5])


def test_eval_without_held_out_views_says_how_to_choose_them(tmp_path):
    from test_datasets_formats import POINTS, make_cameras, write_idr

    from npbgpp_core import save_ply

    scene = tmp_path / "H3DS" / "5ae021f2805c0854"
    write_idr(str(scene), make_cameras(4, seed=5), [f"img_{i:04d}.jpg" for i in range(4)], None)
    save_ply(str(scene / "points3d.ply"), POINTS.astype("float32"))
    with pytest.raises(ValueError, match=r"5ae021f2805c0854.*datasets\.options\.views_config"):
        run_inproc(["datasets=h3ds_one_scene", f"datasets.data_root={tmp_path}/H3DS", "eval_only=true", *FAST],
                   str(tmp_path / "r"))


def test_export_uses_the_cloud_the_run_fitted(tmp_path, capsys):
    """NPBG trained on another cloud of the scene (datasets.pc_name=dense.ply): export loaded
    the scene's default points3d.ply and, that one being larger, silently subsampled it to
    the descriptor count (descriptors on the wrong points). The run now records its cloud,
    and --pc-name picks one for NPBG++ exports."""
    from headless_train.export import main as export_main
    from npbgpp_core import save_ply
    from npbgpp_core.scene import NeuralScene

    root = make_dataset(str(tmp_path / "data"), ("sceneD",))
    dense = torch.randn(200, 3).numpy() * 0.5
    save_ply(os.path.join(root, "sceneD", "dense.ply"), dense)
    run_inproc(["datasets=nerf_blender_one_scene", f"datasets.data_root={root}", "datasets.scene_name=sceneD",
                "datasets.pc_name=dense.ply", "datasets.selection_count=0", "system=npbg", "trainer.max_epochs=1",
                "datasets.train_num_samples=1", *FAST], str(tmp_path / "run"))
    out = str(tmp_path / "d.npbgpp")
    assert export_main(["--checkpoint", str(tmp_path / "run/checkpoints/last.ckpt"), "--scene",
                        os.path.join(root, "sceneD"), "--out", out]) == 0
    torch.testing.assert_close(NeuralScene.load(out).points, torch.from_numpy(dense).float())
    weights = os.path.join(ROOT, "npbgpp_core", "weights", "npbgpp_sphere.safetensors")
    assert export_main(["--checkpoint", weights, "--scene", os.path.join(root, "sceneD"), "--pc-name", "dense.ply",
                        "--views", "all", "--out", out]) == 0
    assert NeuralScene.load(out).points.shape == (200, 3)
    # a cloud outside the scene folder is recorded by its absolute path
    elsewhere = str(tmp_path / "elsewhere.ply")
    save_ply(elsewhere, dense[:150])
    run_inproc(["datasets=nerf_blender_one_scene", f"datasets.data_root={root}", "datasets.scene_name=sceneD",
                f"datasets.pc_name={elsewhere}", "datasets.selection_count=0", "system=npbg", "trainer.max_epochs=1",
                "datasets.train_num_samples=1", *FAST], str(tmp_path / "run2"))
    assert export_main(["--checkpoint", str(tmp_path / "run2/checkpoints/last.ckpt"), "--scene",
                        os.path.join(root, "sceneD"), "--out", out]) == 0
    torch.testing.assert_close(NeuralScene.load(out).points, torch.from_numpy(dense[:150]).float())
    # that cloud moved: the message names it and --pc-name, not a pc_name= nobody gave
    os.replace(elsewhere, str(tmp_path / "moved.ply"))
    args = ["--checkpoint", str(tmp_path / "run2/checkpoints/last.ckpt"), "--scene", os.path.join(root, "sceneD"),
            "--out", str(tmp_path / "m.npbgpp")]
    capsys.readouterr()
    assert export_main(args) == 2
    assert "was fitted to the point cloud " + elsewhere + " (its run's datasets.pc_name)" in capsys.readouterr().err
    assert export_main([*args, "--pc-name", str(tmp_path / "moved.ply")]) == 0


def test_a_cloud_on_another_drive_is_recorded_by_its_absolute_path(tmp_path, monkeypatch):
    """os.path.relpath raises ValueError on Windows for paths on two drives (C: scene, D:
    cloud); point_cloud_name let it escape, which stopped the checkpoint being saved."""
    from types import SimpleNamespace

    from headless_train.systems.base import point_cloud_name

    scene = SimpleNamespace(root=str(tmp_path / "scene"), metadata={"point_cloud": str(tmp_path / "scene/dense.ply")})
    assert point_cloud_name(scene) == "dense.ply"

    def no_common_drive(path: str, start: str | None = None) -> str:
        raise ValueError(f"path is on mount 'D:', start on mount 'C:' ({path}, {start})")

    monkeypatch.setattr(os.path, "relpath", no_common_drive)
    assert point_cloud_name(scene) == os.path.abspath(str(tmp_path / "scene/dense.ply"))


@pytest.mark.parametrize("override, message", [
    ("datasets.n_point=abc", "datasets.n_point must be a whole number or null, got 'abc'"),
    ("system.max_points=lots", "system.max_points must be a whole number or null, got 'lots'"),
    ("datasets.selection_count=x", "datasets.selection_count must be a whole number, got 'x'"),
    ("datasets.train_random_zoom=[a,2]", "datasets.train_random_zoom must be a finite number, got 'a'"),
    ("datasets.cache_images_max_gb=inf", "datasets.cache_images_max_gb must be a finite number, got inf"),
    ("datasets.train_image_size=big", "datasets.train_image_size must be a whole number, got 'big'"),
])
def test_a_config_number_that_is_not_a_number_names_its_key(data_root, override, message):
    """int() / float() alone said "could not convert string to float: 'abc'"."""
    from headless_train.data import DataConfigError, SceneDataModule

    cfg = compose_cfg(["datasets=nerf_blender_one_scene", f"datasets.data_root={data_root}",
                       "datasets.scene_name=sceneA", "datasets.cache_images=true", override])
    with pytest.raises(DataConfigError, match=message):
        SceneDataModule(cfg, seed=3407)
    assert SceneDataModule(compose_cfg(["datasets=nerf_blender_one_scene", f"datasets.data_root={data_root}",
                                        "datasets.scene_name=sceneA", "datasets.n_point=1e2"]),
                           seed=3407).scenes[0].points.shape[0] == 100


def test_an_eval_border_crop_larger_than_the_views_is_named_before_rendering(data_root, tmp_path):
    """ScanNet's configs crop 20 pixels; on smaller views the evaluation rendered, then said
    'border 20 leaves nothing of a 30x40 image' without naming the option."""
    run = tmp_path / "r"
    with pytest.raises(ValueError, match=r"datasets.eval_border_crop=16 crops every pixel of view images/r_5 of scene "
                                         r"sceneA \(its shorter side is 32 pixels\)"):
        run_inproc(["datasets=nerf_blender_one_scene", f"datasets.data_root={data_root}", "datasets.scene_name=sceneA",
                    "datasets.eval_border_crop=16", "eval_only=true", *FAST], str(run))
    assert not (run / "renders").exists()
    # a later scene's small views: refused before the first scene is rendered (its work was lost)
    root = str(tmp_path / "mixed")
    make_tiny_scene(os.path.join(root, "big"), size=48)
    make_tiny_scene(os.path.join(root, "small"), size=24, seed=3)
    with pytest.raises(ValueError, match=r"eval_border_crop=12 crops every pixel of view images/r_5 of scene small"):
        run_inproc(["datasets=nerf_blender_pretrain", f"datasets.data_root={root}", "datasets.selection_count=0",
                    "datasets.eval_border_crop=12", "eval_only=true", *FAST], str(run))
    assert not (run / "renders").exists()
    # a value that is no number names its key (int() said "invalid literal for int() with base 10")
    with pytest.raises(ValueError, match=r"datasets.eval_border_crop must be a whole number, got 'wide'"):
        run_inproc(["datasets=nerf_blender_one_scene", f"datasets.data_root={data_root}", "datasets.scene_name=sceneA",
                    "datasets.eval_border_crop=wide", "eval_only=true", *FAST], str(run))


def test_validation_psnr_is_the_evaluations_on_the_same_views_and_says_what_it_averages(tmp_path, caplog):
    """val/psnr (14.60 on the progress bar) and the test line (14.582) looked like two figures
    for one model: the bar rounds to 3 significant figures, and validation skipped the
    evaluation's border crop. A scene without val views validates on its test views: the
    log line's val/psnr after the last epoch is then metrics.json's PSNR of the same weights
    (to its 3 decimals), and the line names the step and the views it averages."""
    import logging
    import re

    root = str(tmp_path / "data")
    make_tiny_scene(os.path.join(root, "sceneA"), views=6, splits=(4, 0, 2))
    base = ["datasets=nerf_blender_one_scene", f"datasets.data_root={root}", "datasets.scene_name=sceneA",
            "system=npbg", "datasets.selection_count=0", "datasets.train_num_samples=2",
            "datasets.eval_border_crop=3", *FAST, "trainer.limit_val_batches=1.0", "trainer.max_epochs=2"]
    run = str(tmp_path / "run")
    with caplog.at_level(logging.INFO):
        run_inproc(base, run)
        result = run_inproc([*base, "resume=true", "eval_only=true"], run)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("validation after")]
    assert len(lines) == 2, lines
    found = re.fullmatch(r"validation after step 4 \(epoch 1\): val/psnr (\S+), the mean over 2 views of 1 scene "
                         r"\(test views: no val split\)", lines[-1])
    assert found, lines[-1]
    assert abs(float(found[1]) - result["mean"]["psnr"]) <= 0.0005 + 1e-6
    assert "sceneA: PSNR" in caplog.text and "(2 test views)" in caplog.text


def test_validation_views_summary_and_border_check():
    """EvalViews says which split each scene's validation views come from (the log line quotes
    it) and refuses, naming the option, a border crop that leaves nothing of a view."""
    from types import SimpleNamespace

    from headless_train.data import EvalViews

    def scene(name: str, val: list[int], test: list[int], side: int = 32):
        cam = SimpleNamespace(image_size=(side, side + 8))
        views = [SimpleNamespace(name=f"v{i}", camera=cam) for i in range(6)]
        return SimpleNamespace(name=name, views=views, train=[0, 1], val=val, test=test)

    both, no_val = scene("a", [2], [3, 4]), scene("b", [], [3, 4, 5])
    assert EvalViews([both], "val").summary == "1 view of 1 scene (val views)"
    assert EvalViews([no_val], "val").summary == "3 views of 1 scene (test views: no val split)"
    assert EvalViews([no_val], "val", max_views=2).items == [(0, 3), (0, 4)]
    mixed = EvalViews([both, no_val, scene("c", [1], [])], "val")
    assert mixed.items == [(0, 2), (1, 3), (1, 4), (1, 5), (2, 1)]
    assert mixed.summary == "5 views of 3 scenes (val views of 2; test views of 1 without a val split)"
    with pytest.raises(ValueError, match=r"datasets.eval_border_crop=10 crops every pixel of view v3 of scene b "
                                         r"\(its shorter side is 20 pixels\)"):
        EvalViews([both, scene("b", [], [3], side=20)], "val", border=10)
    assert len(EvalViews([both], "val", border=10)) == 1


def test_validation_scores_a_view_with_the_border_the_evaluation_reads(data_root, tmp_path, monkeypatch):
    """validation_step read datasets.eval_border_crop with a bare int(): a value the data module
    and the evaluation accept ('1e1', a whole number) failed at the first validation, an epoch
    into the run. It is read once, as they read it, and val/psnr of a view is the PSNR of its
    clamped, border-cropped pixels, computed here by hand in numpy."""
    import numpy as np

    from headless_train.data import DataConfigError, EvalViews, SceneDataModule
    from headless_train.systems import build_system
    from npbgpp_core.metrics import MetricSuite

    def cfg_with(border: str):
        return compose_cfg(["system=npbg", "datasets=nerf_blender_pretrain", f"datasets.data_root={data_root}",
                            f"system.descriptors_save_dir={tmp_path}/d", f"datasets.eval_border_crop={border}",
                            *FAST[1:]])

    scenes = SceneDataModule(cfg_with("'1e1'"), seed=0).scenes
    system = build_system(OmegaConf.to_container(cfg_with("'1e1'"), resolve=True), scenes)
    assert system.eval_border == 10
    with pytest.raises(DataConfigError, match="datasets.eval_border_crop must be a whole number"):
        build_system(OmegaConf.to_container(cfg_with("2.5"), resolve=True), scenes)
    logged: list[float] = []
    monkeypatch.setattr(system, "log", lambda name, value, **kw: logged.append(float(value)))
    sample = EvalViews(system.scenes, "val")[0]
    system.eval()
    with torch.no_grad():
        system.validation_step([sample], 0)
        pred = system.render_eval(int(sample["scene"]), sample["camera"]).numpy()
    crop = (slice(None), slice(10, -10), slice(10, -10))
    mse = float(((np.clip(pred, 0, 1)[crop] - np.clip(sample["image"].numpy(), 0, 1)[crop]) ** 2).mean())
    assert pred.shape[1] == 32 and len(logged) == 1
    assert logged[0] == pytest.approx(10 * math.log10(1 / mse), abs=1e-4)
    suite = MetricSuite(None, None, border=10)
    assert logged[0] == pytest.approx(suite(torch.from_numpy(pred), sample["image"])["psnr"], abs=1e-5)


def test_a_negative_eval_border_crop_is_refused_where_it_is_read(data_root, tmp_path):
    """datasets.eval_border_crop below 0 cropped nothing while metrics.json recorded the
    negative number as the crop; now the data module, the system and the evaluation refuse
    it by name (one reader, data.eval_border_crop) before anything is rendered or written."""
    from headless_train.data import DataConfigError, SceneDataModule
    from headless_train.evaluate import evaluate
    from headless_train.systems import build_system

    message = r"datasets.eval_border_crop must be a whole number >= 0 .*got -3"
    run = tmp_path / "r"
    base = ["datasets=nerf_blender_one_scene", f"datasets.data_root={data_root}", "datasets.scene_name=sceneA",
            "system=npbg", f"system.descriptors_save_dir={tmp_path}/d", *FAST]
    with pytest.raises(DataConfigError, match=message):
        run_inproc([*base, "datasets.eval_border_crop=-3", "eval_only=true"], str(run))
    assert not (run / "metrics.json").exists() and not (run / "renders").exists()
    with pytest.raises(DataConfigError, match=message):
        SceneDataModule(compose_cfg([*base, "datasets.eval_border_crop=-3"]), seed=0)
    good = OmegaConf.to_container(compose_cfg(base), resolve=True)
    scenes = SceneDataModule(compose_cfg(base), seed=0).scenes
    negative = {**good, "datasets": {**good["datasets"], "eval_border_crop": "-3"}}
    with pytest.raises(DataConfigError, match=message.replace("-3", "'-3'")):
        build_system(negative, scenes)
    system = build_system(good, scenes)
    with pytest.raises(DataConfigError, match=message.replace("-3", "'-3'")):
        evaluate(system, negative, str(run))
    assert not (run / "metrics.json").exists()


def test_resuming_npbg_on_other_scenes_is_refused_naming_them(data_root, tmp_path):
    """Resuming an NPBG run with another scene set (or point count) failed in
    load_state_dict with a page of unexpected keys."""
    from headless_train.cli import UsageError

    base = ["datasets=nerf_blender_pretrain", f"datasets.data_root={data_root}", "datasets.selection_count=0",
            "system=npbg", "datasets.train_num_samples=1", "system.max_points=100", *FAST]
    run = str(tmp_path / "run")
    run_inproc([*base, "trainer.max_epochs=1"], run)
    with pytest.raises(UsageError, match=r"holds the descriptors of sceneA \(100 points\), sceneB \(100 points\); "
                                         r"this run loads sceneA \(100 points\)"):
        run_inproc([*base, "datasets.scene_names=[sceneA]", "trainer.max_epochs=2", "resume=true"], run)
    with pytest.raises(UsageError, match=r"this run loads sceneA \(80 points\), sceneB \(80 points\)"):
        run_inproc([*base, "system.max_points=80", "trainer.max_epochs=2", "resume=true"], run)
    run_inproc([*base, "trainer.max_epochs=2", "resume=true"], run)  # the same scenes resume


def test_checkpoint_saves_and_resume_set_weights_only_explicitly(data_root, tmp_path, caplog, recwarn):
    """Lightning logged "`weights_only` was not set, defaulting to `False`" at every checkpoint
    the run wrote (trainer.save_checkpoint without it); the checkpoints set it, the resumed
    load reads with weights_only=True (AtomicCheckpointIO), and no warning names it."""
    import logging

    base = ["datasets=nerf_blender_one_scene", f"datasets.data_root={data_root}", "datasets.scene_name=sceneA",
            "datasets.selection_count=0", "system=npbg", "datasets.train_num_samples=1", *FAST]
    run = str(tmp_path / "run")
    with caplog.at_level(logging.DEBUG):
        run_inproc([*base, "trainer.max_epochs=1"], run)
        run_inproc([*base, "trainer.max_epochs=2", "resume=true"], run)
    assert os.path.isfile(os.path.join(run, "checkpoints", "epoch1.ckpt"))  # two epochs, saved twice each
    said = [r.getMessage() for r in caplog.records if "weights_only" in r.getMessage()]
    said += [str(w.message) for w in recwarn if "weights_only" in str(w.message)]
    assert not said, said
    last = torch.load(os.path.join(run, "checkpoints", "last.ckpt"), map_location="cpu", weights_only=True)
    assert last["optimizer_states"] and last["lr_schedulers"] is not None  # a full checkpoint, as before


def test_npbg_evaluation_needs_descriptors_fitted_to_the_scene(data_root, tmp_path):
    """An NPBG checkpoint fitted on sceneB, evaluated on sceneA: the refiner loaded, sceneA's
    descriptors stayed random, and metrics.json reported them as the model's quality."""
    from headless_train.cli import UsageError

    base = ["datasets=nerf_blender_one_scene", f"datasets.data_root={data_root}", "datasets.selection_count=0",
            "system=npbg", "datasets.train_num_samples=1", *FAST]
    run_inproc([*base, "datasets.scene_name=sceneB", "trainer.max_epochs=1"], str(tmp_path / "b"))
    weights = f"weights_path={tmp_path}/b/checkpoints/last.ckpt"
    with pytest.raises(UsageError, match=r"holds no descriptors fitted to sceneA \(300 points\) \(it holds sceneB "
                                         r"\(300 points\)\)"):
        run_inproc([*base, "datasets.scene_name=sceneA", weights, "eval_only=true"], str(tmp_path / "ea"))
    with pytest.raises(UsageError, match=r"fitted to sceneB \(120 points\)"):
        run_inproc([*base, "datasets.scene_name=sceneB", "system.max_points=120", weights, "eval_only=true"],
                   str(tmp_path / "eb"))
    result = run_inproc([*base, "datasets.scene_name=sceneB", weights, "eval_only=true"], str(tmp_path / "ok"))
    assert math.isfinite(result["mean"]["psnr"])


def test_resume_and_evaluation_compare_the_recorded_cloud_file(tmp_path, capsys):
    """A resumed or evaluated NPBG run whose datasets.pc_name names another cloud file of the
    same size as its checkpoint's passed the name / point-count check: the descriptors sat
    on other points. The checkpoint records its cloud; another one is refused, naming both,
    and so is the recorded file holding other points (a cloud rewritten in place)."""
    import numpy as np

    from headless_train.cli import UsageError
    from npbgpp_core import load_ply, save_ply

    root = make_dataset(str(tmp_path / "data"), ("sceneD",))
    default = load_ply(os.path.join(root, "sceneD", "points3d.ply")).points
    save_ply(os.path.join(root, "sceneD", "other.ply"), np.random.default_rng(1).normal(size=default.shape) * 0.5)
    base = ["datasets=nerf_blender_one_scene", f"datasets.data_root={root}", "datasets.scene_name=sceneD",
            "datasets.selection_count=0", "system=npbg", "datasets.train_num_samples=1", *FAST]
    run = str(tmp_path / "run")
    run_inproc([*base, "trainer.max_epochs=1"], run)
    with pytest.raises(UsageError, match=r"resume=true: .*last.ckpt holds descriptors fitted to another point cloud "
                                         r"\(scene sceneD was fitted to points3d.ply, this run loads other.ply, "
                                         r"and other points"):
        run_inproc([*base, "datasets.pc_name=other.ply", "trainer.max_epochs=2", "resume=true"], run)
    weights = f"weights_path={run}/checkpoints/last.ckpt"
    with pytest.raises(UsageError, match=r"eval_only=true with system=npbg: .*fitted to another point cloud "
                                         r"\(scene sceneD was fitted to points3d.ply, this run loads other.ply, "
                                         r"and other points"):
        run_inproc([*base, "datasets.pc_name=other.ply", weights, "eval_only=true"], str(tmp_path / "e"))
    # the cloud it was fitted to, named or by default, is accepted
    run_inproc([*base, "datasets.pc_name=points3d.ply", weights, "eval_only=true"], str(tmp_path / "e2"))
    run_inproc([*base, "trainer.max_epochs=2", "resume=true"], run)
    # the recorded file rewritten with other points of the same count (a densify re-run into it)
    # passed both checks by its name: the checkpoint's digest refuses it, naming the file
    cloud = os.path.join(root, "sceneD", "points3d.ply")
    os.replace(cloud, cloud + ".fitted")
    save_ply(cloud, default + np.float32(0.01))
    with pytest.raises(UsageError, match=r"resume=true: .*last.ckpt holds descriptors fitted to another point cloud "
                                         r"\(scene sceneD was fitted to points3d.ply, which now holds other points\)"):
        run_inproc([*base, "trainer.max_epochs=3", "resume=true"], run)
    with pytest.raises(UsageError, match=r"eval_only=true with system=npbg: .*\(scene sceneD was fitted to "
                                         r"points3d.ply, which now holds other points\)"):
        run_inproc([*base, weights, "eval_only=true"], str(tmp_path / "e3"))
    # export put those descriptors on the rewritten points without a word
    from headless_train.export import main as export_main

    out = str(tmp_path / "d.npbgpp")
    export = ["--checkpoint", f"{run}/checkpoints/last.ckpt", "--scene", os.path.join(root, "sceneD"), "--out", out]
    assert export_main(export) == 2
    err = capsys.readouterr().err
    assert f"last.ckpt (npbg) fitted scene 'sceneD' to other points than {cloud} holds" in err, err
    assert "--pc-name" in err and not os.path.exists(out)
    os.replace(cloud + ".fitted", cloud)  # the points it was fitted to, back: accepted again
    run_inproc([*base, weights, "eval_only=true"], str(tmp_path / "e4"))
    assert export_main(export) == 0


def test_a_moved_cloud_outside_the_scene_folder_is_recognised_by_its_points(tmp_path):
    """A cloud outside the scene folder was recorded (and compared) by its absolute path only,
    so moving it, or the project folder holding scene and cloud, made resume and evaluation
    refuse the very cloud the run was fitted to. The checkpoint records a digest of the
    points: a moved file with the same points is accepted, one with other points is not."""
    from headless_train.cli import UsageError
    from headless_train.systems.base import points_digest
    from npbgpp_core import load_ply, save_ply

    project = tmp_path / "project"
    root = make_dataset(str(project / "data"), ("sceneD",))
    default = load_ply(os.path.join(root, "sceneD", "points3d.ply")).points
    os.makedirs(project / "clouds")
    save_ply(str(project / "clouds" / "dense.ply"), default[::-1].copy())
    base = ["datasets=nerf_blender_one_scene", "datasets.scene_name=sceneD", "datasets.selection_count=0",
            "system=npbg", "datasets.train_num_samples=1", *FAST]
    run = str(tmp_path / "run")
    run_inproc([*base, f"datasets.data_root={root}", f"datasets.pc_name={project}/clouds/dense.ply",
                "trainer.max_epochs=1"], run)
    meta = torch.load(f"{run}/checkpoints/last.ckpt", map_location="cpu", weights_only=True)["npbgpp"]
    assert meta["point_clouds"] == [f"{project}/clouds/dense.ply"]
    assert meta["point_digests"] == [points_digest(default[::-1])]
    moved = tmp_path / "moved"
    os.replace(project, moved)  # the whole project folder: scene and cloud
    root = str(moved / "data")
    save_ply(str(moved / "clouds" / "other.ply"), default[::-1] + 0.01)  # same size, other points
    with pytest.raises(UsageError, match=r"resume=true: .*fitted to another point cloud \(scene sceneD was fitted to "
                                         r".*project/clouds/dense.ply, this run loads .*moved/clouds/other.ply, and "
                                         r"other points"):
        run_inproc([*base, f"datasets.data_root={root}", f"datasets.pc_name={moved}/clouds/other.ply",
                    "trainer.max_epochs=2", "resume=true"], run)
    weights = f"weights_path={run}/checkpoints/last.ckpt"
    with pytest.raises(UsageError, match=r"eval_only=true .*this run loads .*other.ply, and other points"):
        run_inproc([*base, f"datasets.data_root={root}", f"datasets.pc_name={moved}/clouds/other.ply", weights,
                    "eval_only=true"], str(tmp_path / "e"))
    run_inproc([*base, f"datasets.data_root={root}", f"datasets.pc_name={moved}/clouds/dense.ply", weights,
                "eval_only=true"], str(tmp_path / "e2"))
    run_inproc([*base, f"datasets.data_root={root}", f"datasets.pc_name={moved}/clouds/dense.ply",
                "trainer.max_epochs=2", "resume=true"], run)
    # a checkpoint written before digests were recorded: only the recorded file, and the message says so
    from types import SimpleNamespace

    from headless_train.cli import check_resumed_scenes

    del meta["point_digests"]
    cloud = str(moved / "clouds" / "dense.ply")
    scene = SimpleNamespace(name="sceneD", root=os.path.join(root, "sceneD"), metadata={"point_cloud": cloud},
                            points=load_ply(cloud).points)
    with pytest.raises(UsageError, match=r"records no point digest .*put the cloud back there"):
        check_resumed_scenes(meta, "old.ckpt", "npbg", [scene])


def test_export_of_a_distorted_colmap_capture(tmp_path):
    """The loader's refusal of a distorted COLMAP model said '--undistort', which export did
    not have: such a capture could not be exported without preparing it first."""
    from test_datasets_formats import write_colmap

    from headless_train.export import main as export_main
    from npbgpp_core.scene import NeuralScene

    root = str(tmp_path / "garden")
    write_colmap(root, True, models=("SIMPLE_RADIAL",), dist=(0.05, 0.0, 0.0, 0.0))
    weights = os.path.join(ROOT, "npbgpp_core", "weights", "npbgpp_sphere.safetensors")
    out = str(tmp_path / "g.npbgpp")
    assert export_main(["--checkpoint", weights, "--scene", root, "--out", out, "--device", "cpu"]) == 2
    assert not os.path.exists(out)
    assert export_main(["--checkpoint", weights, "--scene", root, "--out", out, "--device", "cpu",
                        "--undistort", "--views", "all"]) == 0
    assert NeuralScene.load(out).points.shape == (50, 3)


def test_a_resumed_npbg_evaluation_uses_the_resumed_descriptors(data_root, tmp_path):
    """eval_only=true resume=true on a run seeded with weights_path=<refiner file> (the run's
    own command line plus eval_only): the fitted-descriptors check read the refiner file,
    which holds none, and refused the run whose last.ckpt holds them."""
    refiner = os.path.join(ROOT, "npbgpp_core", "weights", "npbg_refiner_procedural.safetensors")
    base = ["datasets=nerf_blender_one_scene", f"datasets.data_root={data_root}", "datasets.selection_count=0",
            "datasets.scene_name=sceneB", "system=npbg", "datasets.train_num_samples=1", f"weights_path={refiner}",
            *FAST]
    run = str(tmp_path / "run")
    run_inproc([*base, "trainer.max_epochs=1"], run)
    result = run_inproc([*base, "resume=true", "eval_only=true"], run)
    assert math.isfinite(result["mean"]["psnr"])
    # the same figures as evaluating last.ckpt as weights_path: the resumed weights were the ones evaluated
    ckpt = os.path.join(run, "checkpoints", "last.ckpt")
    same = run_inproc([*[o for o in base if not o.startswith("weights_path=")], f"weights_path={ckpt}",
                       "eval_only=true"], str(tmp_path / "other"))
    assert same["mean"] == result["mean"]


@pytest.mark.parametrize(("reload", "targets"), [(0, 1), (1, 1), (0, 2)])
def test_a_run_resumed_mid_epoch_trains_the_rest_of_that_epoch(data_root, tmp_path, monkeypatch, recwarn, reload,
                                                               targets):
    """Resumed from a checkpoint taken mid-epoch (every stage call), the loader began the
    epoch's order again: the steps after the resume trained the epoch's first samples a second
    time (the same crops: a sample is a function of seed, epoch and index) and the rest of the
    epoch never, while Lightning warned that the loader is not resumable. The resumed run trains
    exactly the samples an uninterrupted run trains after that step, and nothing is warned.
    With two targets per sample (scenes of 10 training views, so that there are views left to
    add) the extra targets are the same too."""
    from headless_train import data

    seen: list[tuple[int, int, tuple[int, ...]]] = []
    get = data.TrainSamples.__getitem__

    def recorded(self, i: int) -> dict:
        sample = get(self, i)
        seen.append((self.seed, i, tuple(e["view"] for e in sample.get("extra_targets", ()))))
        return sample

    monkeypatch.setattr(data.TrainSamples, "__getitem__", recorded)
    root, more = data_root, []
    if targets > 1:
        root = make_dataset(str(tmp_path / "ring"), ("sceneA", "sceneB"), views=12, splits=(10, 1, 1))
        more = [f"datasets.targets_per_sample={targets}"]
    args = ["datasets=nerf_blender_pretrain", f"datasets.data_root={root}", "system=npbgpp_sphere",
            "datasets.train_num_samples=3", "trainer.max_epochs=5", "system.max_scenes_per_train_epoch=null",
            f"trainer.reload_dataloaders_every_n_epochs={reload}", "trainer.last_checkpoint_every_n_steps=1", *FAST,
            *more]
    run_inproc([*args, "trainer.max_steps=9"], str(tmp_path / "whole"))  # 6 samples (2 scenes x 3) per epoch
    whole = seen[:]
    assert len(whole) == 9 and sorted(i for _, i, _ in whole[:6]) == list(range(6))
    assert (sum(len(extra) for _, _, extra in whole) > 0) == (targets > 1)
    # each epoch its own crops (seed + 1000 * epoch), also with the loader kept across epochs
    # (reload 0), which drew every epoch's crops with the seed of the epoch it was made in
    assert {seed for seed, _, _ in whole[:6]} == {3407} and {seed for seed, _, _ in whole[6:]} == {4407}
    seen.clear()
    from headless_train.checkpoints import EpochAndLastCheckpoint

    batch_end = EpochAndLastCheckpoint.on_train_batch_end

    def stop_after_step_2(self, trainer, *a) -> None:  # as a stage's SIGTERM or Ctrl-C stops a call mid-epoch
        batch_end(self, trainer, *a)
        if trainer.global_step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(EpochAndLastCheckpoint, "on_train_batch_end", stop_after_step_2)
    with pytest.raises(SystemExit):
        run_inproc([*args, "trainer.max_steps=9"], str(tmp_path / "split"))
    monkeypatch.setattr(EpochAndLastCheckpoint, "on_train_batch_end", batch_end)
    assert step_count(str(tmp_path / "split/checkpoints/last.ckpt")) == 2
    run_inproc([*args, "trainer.max_steps=9", "resume=true"], str(tmp_path / "split"))
    assert seen == whole
    assert not [w for w in recwarn if "dataloader is not resumable" in str(w.message)]


def test_a_run_stopped_by_its_step_or_time_limit_resumes_where_it_stopped(data_root, tmp_path, monkeypatch):
    """trainer.max_steps / trainer.max_minutes end an epoch early; the checkpoint Lightning then
    took at the epoch's end recorded the epoch as finished, so the resumed run went on with the
    next epoch and the rest of the stopped one was never trained. Resumed (from last.ckpt), each
    trains exactly the samples an uninterrupted run trains after that step; a run stopped at an
    epoch's last step goes on with the next epoch."""
    from types import SimpleNamespace

    from headless_train import checkpoints, data

    seen: list[tuple[int, int]] = []
    get = data.TrainSamples.__getitem__
    monkeypatch.setattr(data.TrainSamples, "__getitem__",
                        lambda self, i: (seen.append((self.seed, i)), get(self, i))[1])
    args = ["datasets=nerf_blender_pretrain", f"datasets.data_root={data_root}", "system=npbgpp_sphere",
            "datasets.train_num_samples=3", "trainer.max_epochs=5", "system.max_scenes_per_train_epoch=null", *FAST]
    run_inproc([*args, "trainer.max_steps=9"], str(tmp_path / "whole"))  # 6 samples (2 scenes x 3) per epoch
    whole = seen[:]
    assert len(whole) == 9
    # one clock tick per reading: on_train_start reads it once, each batch end once, so a
    # 3 s limit stops the run after its 3rd step
    clock = iter(range(1000))
    stops = {"steps2": (["trainer.max_steps=2"], 2, 0), "epoch_end": (["trainer.max_steps=6"], 6, 0),
             "minutes": (["trainer.max_steps=9", "trainer.max_minutes=0.05"], 3, 0)}
    for name, (stop, step, epoch) in stops.items():
        seen.clear()
        run_dir = tmp_path / name
        with monkeypatch.context() as patch:
            patch.setattr(checkpoints, "time", SimpleNamespace(monotonic=lambda: float(next(clock))))
            run_inproc([*args, *stop], str(run_dir))
        last = torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
        assert (last["global_step"], last["epoch"]) == (step, epoch), name
        assert sorted(os.listdir(run_dir / "checkpoints")) == ["epoch0.ckpt", "last.ckpt"], name
        assert seen == whole[:step], name
        # resumed by hand from the epoch file (copied to last.ckpt): it records what last.ckpt
        # does, the stopped epoch unfinished, so the rest of that epoch is trained too
        by_hand = tmp_path / f"{name}_epoch_file"
        shutil.copytree(run_dir, by_hand)
        shutil.copyfile(run_dir / "checkpoints/epoch0.ckpt", by_hand / "checkpoints/last.ckpt")
        epoch_file = torch.load(by_hand / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
        assert (epoch_file["global_step"], epoch_file["epoch"]) == (step, epoch), name
        run_inproc([*args, "trainer.max_steps=9", "resume=true"], str(run_dir))
        assert seen == whole, name
        assert step_count(str(run_dir / "checkpoints/last.ckpt")) == 9
        seen[:] = whole[:step]
        run_inproc([*args, "trainer.max_steps=9", "resume=true"], str(by_hand))
        assert seen == whole, name


def test_a_stop_by_a_callback_listed_after_the_saver_resumes_where_it_stopped(data_root, tmp_path, monkeypatch):
    """A callback listed after the checkpoint callback that sets should_stop at a batch's end:
    the saver ran first and missed the stop, the epoch ended early and both its checkpoints
    (epoch0.ckpt, last.ckpt) recorded it finished, so the resumed run skipped the rest of the
    epoch. Lightning runs a Checkpoint callback last: the resumed run trains exactly what an
    uninterrupted one trains after that step, from last.ckpt and from the epoch file alike."""
    import pytorch_lightning as pl

    from headless_train import data

    seen: list[tuple[int, int]] = []
    get = data.TrainSamples.__getitem__
    monkeypatch.setattr(data.TrainSamples, "__getitem__",
                        lambda self, i: (seen.append((self.seed, i)), get(self, i))[1])
    args = ["datasets=nerf_blender_pretrain", f"datasets.data_root={data_root}", "system=npbgpp_sphere",
            "datasets.train_num_samples=3", "trainer.max_epochs=5", "system.max_scenes_per_train_epoch=null",
            "trainer.max_steps=9", *FAST]
    run_inproc(args, str(tmp_path / "whole"))  # 6 samples (2 scenes x 3) per epoch
    whole = seen[:]
    assert len(whole) == 9

    class StopAtStep2(pl.Callback):
        def on_train_batch_end(self, trainer, *a) -> None:
            if trainer.global_step == 2:
                trainer.should_stop = True

    trainer_class = pl.Trainer

    def with_stop_listed_last(*a, callbacks=(), **kw):
        return trainer_class(*a, callbacks=[*callbacks, StopAtStep2()], **kw)

    seen.clear()
    run_dir = tmp_path / "stopped"
    with monkeypatch.context() as patch:
        patch.setattr(pl, "Trainer", with_stop_listed_last)
        run_inproc(args, str(run_dir))
    assert seen == whole[:2]
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["epoch0.ckpt", "last.ckpt"]
    assert step_count(str(run_dir / "checkpoints/last.ckpt")) == 2
    # enable_checkpointing=True with the saver as the run's Checkpoint: Lightning added no
    # ModelCheckpoint of its own (it would write <run>/tensorboard/checkpoints/epoch=..ckpt)
    assert "checkpoints" not in os.listdir(run_dir / "tensorboard")
    by_hand = tmp_path / "epoch_file"
    shutil.copytree(run_dir, by_hand)
    shutil.copyfile(run_dir / "checkpoints/epoch0.ckpt", by_hand / "checkpoints/last.ckpt")
    for folder in (run_dir, by_hand):
        seen[:] = whole[:2]
        run_inproc([*args, "resume=true"], str(folder))
        assert seen == whole, folder.name
        assert step_count(str(folder / "checkpoints/last.ckpt")) == 9


def test_training_warns_nothing_of_lightnings_pytree_deprecation(data_root, tmp_path, recwarn):
    """torch 2.13 deprecates the LeafSpec that Lightning 2.6's pytree helper builds at every
    fit: a FutureWarning about Lightning's code printed at each training start. Filtered
    where training starts (that message, category and module alone): a short run warns of
    no LeafSpec, while the same warning raised from another module still shows."""
    import warnings

    run_inproc(["datasets=nerf_blender_one_scene", f"datasets.data_root={data_root}", "datasets.scene_name=sceneA",
                "system=npbg", "datasets.selection_count=0", "datasets.train_num_samples=2", "trainer.max_steps=2",
                *FAST], str(tmp_path / "run"))
    assert not [w for w in recwarn if "LeafSpec" in str(w.message)], [str(w.message) for w in recwarn]
    warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning, stacklevel=1)
    assert [w for w in recwarn if "LeafSpec" in str(w.message)]
