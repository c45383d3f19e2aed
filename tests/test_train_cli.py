"""Config tree and command lines: every published command line parses (Hydra ``--cfg job``),
unknown keys are named, trainer.gpus maps onto Lightning, scene rotation is seeded."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest
import yaml

from headless_train.data import DataConfigError, discover_scene_dirs, scenes_for_epoch, scenes_for_rank

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The published command lines (seed README), ``python train_net.py`` replaced by ``python -m headless_train``.
SEED_LINES = r"""
trainer.gpus=4 hydra.run.dir=experiments/npbgpp_scannet datasets=scannet_pretrain datasets.n_point=6e6 \
system=npbgpp_sphere system.visibility_scale=0.5 trainer.max_epochs=39 dataloader.train_data_mode=each \
trainer.reload_dataloaders_every_n_epochs=1
trainer.gpus=4 hydra.run.dir=experiments/npbgpp_nerf datasets=nerf_blender_pretrain system=npbgpp_sphere \
system.visibility_scale=1.0 trainer.max_epochs=24 dataloader.train_data_mode=each \
weights_path=experiments/npbgpp_scannet/checkpoints/epoch38.ckpt
trainer.gpus=4 hydra.run.dir=experiments/npbgpp_h3ds datasets=h3ds_pretrain system=npbgpp_sphere \
system.visibility_scale=1.0 trainer.max_epochs=24 dataloader.train_data_mode=each \
trainer.reload_dataloaders_every_n_epochs=1 weights_path=experiments/npbgpp_scannet/checkpoints/epoch38.ckpt
trainer.gpus=4 hydra.run.dir=experiments/npbgpp_dtu datasets=dtu_pretrain system=npbgpp_sphere \
system.visibility_scale=1.0 trainer.max_epochs=36 dataloader.train_data_mode=each \
trainer.reload_dataloaders_every_n_epochs=1  weights_path=experiments/npbgpp_scannet/checkpoints/epoch38.ckpt
trainer.gpus=1 hydra.run.dir=experiments/npbgpp_eval_scan118 datasets=dtu_one_scene \
datasets.data_root=$\{hydra:runtime.cwd\}/example/DTU_masked datasets.scene_name=scan118 system=npbgpp_sphere \
system.visibility_scale=1.0 weights_path=./checkpoints/npbgpp_dtu_nm_mvs_ft_epoch35.ckpt eval_only=true \
dataloader=small
trainer.gpus=1 hydra.run.dir=experiments/npbgpp_5ae021f2805c0854_ft datasets=h3ds_one_scene \
datasets.data_root=$\{hydra:runtime.cwd\}/example/H3DS datasets.selection_count=0 \
datasets.train_num_samples=2000 datasets.train_image_size=null datasets.train_random_shift=false \
datasets.train_random_zoom=[0.5,2.0] datasets.scene_name=5ae021f2805c0854 system=coefficients_ft \
system.max_points=1e6 system.descriptors_save_dir=$\{hydra:run.dir\}/descriptors trainer.max_epochs=20 \
system.descriptors_pretrained_dir=experiments/npbgpp_eval_5ae021f2805c0854/descriptors \
weights_path=$\{hydra:runtime.cwd\}/checkpoints/npbgpp_h3ds.ckpt dataloader=small
trainer.gpus=1 hydra.run.dir=experiments/npbgpp_5ae021f2805c0854_test datasets=h3ds_one_scene \
datasets.data_root=$\{hydra:runtime.cwd\}/example/H3DS datasets.selection_count=0 \
datasets.scene_name=5ae021f2805c0854 system=coefficients_ft system.max_points=1e6 \
system.descriptors_save_dir=$\{hydra:run.dir\}/descriptors \
system.descriptors_pretrained_dir=experiments/npbgpp_5ae021f2805c0854_ft/descriptors \
weights_path=experiments/npbgpp_5ae021f2805c0854_ft/checkpoints/last.ckpt dataloader=small eval_only=true
trainer.gpus=4 hydra.run.dir=experiments/npbg_scannet datasets=scannet_pretrain \
datasets.train_random_zoom=[0.5,2.0] datasets.train_image_size=512 datasets.selection_count=0 system=npbg \
system.descriptors_save_dir=experiments/npbg_scannet/result/descriptors trainer.max_epochs=39 \
dataloader.train_data_mode=each trainer.reload_dataloaders_every_n_epochs=1 trainer.limit_val_batches=0 \
system.max_points=11e6
trainer.gpus=4 hydra.run.dir=experiments/npbg_nerf datasets=nerf_blender_pretrain \
datasets.train_random_zoom=[0.5,2.0] datasets.train_image_size=512 datasets.selection_count=0 system=npbg \
system.descriptors_save_dir=experiments/npbg_nerf/result/descriptors trainer.max_epochs=24 \
dataloader.train_data_mode=each trainer.reload_dataloaders_every_n_epochs=1 trainer.limit_val_batches=0 \
system.max_points=4e6
trainer.gpus=4 hydra.run.dir=experiments/npbg_h3ds datasets=h3ds_pretrain datasets.train_random_zoom=[0.5,2.0] \
datasets.train_image_size=null datasets.train_random_shift=false datasets.selection_count=0 system=npbg \
system.descriptors_save_dir=experiments/npbg_h3ds/result/descriptors trainer.max_epochs=24 \
dataloader.train_data_mode=each trainer.reload_dataloaders_every_n_epochs=1 trainer.limit_val_batches=0 \
system.max_points=3e6  # Submitted batch job 1175175
trainer.gpus=4 hydra.run.dir=experiments/npbg_dtu_nm datasets=dtu_pretrain \
datasets.train_random_zoom=[0.5,2.0] datasets.train_image_size=512 datasets.selection_count=0 system=npbg \
system.descriptors_save_dir=experiments/npbg_dtu_nm/result/descriptors trainer.max_epochs=36 \
dataloader.train_data_mode=each trainer.reload_dataloaders_every_n_epochs=1 trainer.limit_val_batches=0 \
system.max_points=3e6
trainer.gpus=4 hydra.run.dir=experiments/npbg_scannet_0045 datasets=scannet_one_scene \
datasets.scene_name=scene0045_00 datasets.n_point=6e6 datasets.train_random_zoom=[0.5,2.0] \
datasets.train_image_size=512 datasets.selection_count=0 system=npbg \
system.descriptors_save_dir=experiments/npbg_scannet_0045/result/descriptors \
system.max_scenes_per_train_epoch=1 trainer.max_epochs=20 \
weights_path=experiments/npbg_scannet/result/checkpoints/epoch38.ckpt system.max_points=6e6
trainer.gpus=4 hydra.run.dir=experiments/npbg_nerf_hotdog datasets=nerf_blender_one_scene \
datasets.scene_name=hotdog datasets.train_random_zoom=[0.5,2.0] datasets.train_image_size=512 \
datasets.selection_count=0 system=npbg \
system.descriptors_save_dir=npbgplusplus/experiments/npbg_nerf_hotdog/result/descriptors \
system.max_scenes_per_train_epoch=1 trainer.max_epochs=20 \
weights_path=experiments/npbg_nerf/result/checkpoints/epoch23.ckpt system.max_points=4e6
trainer.gpus=4 hydra.run.dir=experiments/npbg_h3ds_5ae021f2805c0854 datasets=h3ds_one_scene \
datasets.scene_name=5ae021f2805c0854 datasets.train_random_zoom=[0.5,2.0] datasets.train_image_size=null \
datasets.train_random_shift=false datasets.selection_count=0 system=npbg \
system.descriptors_save_dir=experiments/npbg_h3ds_5ae021f2805c0854/result/descriptors \
system.max_scenes_per_train_epoch=1 trainer.max_epochs=20 \
weights_path=experiments/npbg_h3ds/result/checkpoints/epoch23.ckpt system.max_points=3e6
trainer.gpus=4 hydra.run.dir=experiments/npbg_dtu_nm_scan110 datasets=dtu_one_scene \
datasets.scene_name=scan110 datasets.train_random_zoom=[0.5,2.0] datasets.train_image_size=512 \
datasets.selection_count=0 system=npbg \
system.descriptors_save_dir=experiments/npbg_dtu_nm_scan110/result/descriptors \
system.max_scenes_per_train_epoch=1 trainer.max_epochs=20 \
weights_path=experiments/npbg_dtu_nm/result/checkpoints/epoch35.ckpt system.max_points=3e6
""".strip().replace(" \\\n", " ").splitlines()


def cfg_job(args: list[str], cwd: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "headless_train", *args, "--cfg", "job", "--resolve"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def _value(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d[part]
    return d


@pytest.mark.parametrize("line", SEED_LINES, ids=[f"seed{i}" for i in range(len(SEED_LINES))])
def test_seed_command_line_parses(line, tmp_path):
    args = shlex.split(line, comments=True)
    if not any(a.startswith("datasets.data_root=") for a in args):
        args.append(f"datasets.data_root={tmp_path}/data")  # point at test data
    proc = cfg_job(args, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    for a in args:
        key, value = a.split("=", 1)
        if key.startswith("hydra.") or key in ("datasets", "system", "dataloader"):
            continue
        got = _value(cfg, key)
        if "${hydra:runtime.cwd}" in value:
            assert got == value.replace("${hydra:runtime.cwd}", str(tmp_path))
        elif "${hydra:run.dir}" in value:
            run_dir = next(x.split("=", 1)[1] for x in args if x.startswith("hydra.run.dir="))
            assert got == value.replace("${hydra:run.dir}", run_dir)
        else:
            assert str(got).lower() == str(yaml.safe_load(value)).lower() or float(got) == float(value)
    system = next(a.split("=", 1)[1] for a in args if a.startswith("system="))
    assert cfg["system"]["name"] == {"npbgpp_sphere": "npbgpp", "npbg": "npbg"}.get(system, system)


def test_unknown_key_is_named(tmp_path):
    proc = cfg_job(["trainer.gpuz=1"], cwd=str(tmp_path))
    assert proc.returncode != 0 and "trainer.gpuz" in proc.stderr
    proc = cfg_job(["system=npbg", "system.aggregator=mean"], cwd=str(tmp_path))
    assert proc.returncode != 0 and "system.aggregator" in proc.stderr
    proc = cfg_job(["datasets=no_such_dataset"], cwd=str(tmp_path))
    assert proc.returncode != 0 and "no_such_dataset" in proc.stderr


def test_trainer_gpus_maps_to_lightning():
    from pytorch_lightning.strategies import DDPStrategy

    from headless_train.cli import UsageError, trainer_kwargs
    from headless_train.data import DataConfigError

    base = {"max_epochs": 2, "max_steps": -1, "limit_train_batches": 1.0, "limit_val_batches": 0,
            "check_val_every_n_epoch": 1, "reload_dataloaders_every_n_epochs": 1, "log_every_n_steps": 5,
            "enable_progress_bar": False, "num_sanity_val_steps": 0}
    kw = trainer_kwargs({**base, "gpus": 0}, "npbg")
    assert kw["accelerator"] == "cpu" and kw["devices"] == 1 and kw["strategy"] == "auto"
    kw = trainer_kwargs({**base, "gpus": 0, "cpu_processes": 2, "strategy": "auto"}, "npbg")
    assert kw["devices"] == 2 and isinstance(kw["strategy"], DDPStrategy)
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="trainer.gpus=4"):
            trainer_kwargs({**base, "gpus": 4}, "npbg")
    # a value that is no whole number names its key (int() said "invalid literal for int() with base 10")
    assert trainer_kwargs({**base, "max_epochs": "3", "max_steps": "1e3"}, "npbg")["max_steps"] == 1000
    for key, value in (("max_epochs", "abc"), ("log_every_n_steps", 2.5), ("num_nodes", "two")):
        with pytest.raises(DataConfigError, match=f"trainer.{key} must be a whole number( or null)?, got {value!r}"):
            trainer_kwargs({**base, key: value}, "npbg")


def test_eval_only_says_when_it_falls_back_to_the_cpu(monkeypatch, caplog):
    """The published test line's trainer.gpus=1 evaluates on the CPU where there is no GPU
    (training refuses, above), and the log says so; gpus=0 is quiet; a GPU is used when present."""
    import torch

    from headless_train.cli import eval_device
    from headless_train.data import DataConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level("WARNING", logger="headless_train"):
        assert eval_device(0) == torch.device("cpu") and not caplog.records
        assert eval_device("1") == torch.device("cpu")
    assert [r.getMessage() for r in caplog.records] == [
        "trainer.gpus=1 but no CUDA GPU is available here: evaluating on the CPU (trainer.gpus=0 asks for it)"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert eval_device(1) == torch.device("cuda")
    with pytest.raises(DataConfigError, match="trainer.gpus"):
        eval_device("one")


def test_scene_rotation_is_a_seeded_permutation():
    epochs = [scenes_for_epoch(10, 4, e, seed=3407) for e in range(5)]
    assert all(len(e) == 4 for e in epochs)
    first_pass = epochs[0] + epochs[1] + epochs[2][:2]
    assert sorted(first_pass) == list(range(10))  # every scene once before any repeats
    assert epochs == [scenes_for_epoch(10, 4, e, seed=3407) for e in range(5)]
    assert scenes_for_epoch(10, 4, 0, seed=1) != epochs[0] or scenes_for_epoch(10, 4, 1, seed=1) != epochs[1]
    assert scenes_for_epoch(3, None, 0, 0) == [0, 1, 2]
    assert scenes_for_rank([5, 7, 9, 11], 1, 2, "each") == [7, 11]
    assert scenes_for_rank([5], 1, 2, "each") == [5]
    assert scenes_for_rank([5, 7], 1, 2, "all") == [5, 7]


def test_scene_discovery_errors_name_the_folder(tmp_path):
    with pytest.raises(DataConfigError, match="dataset folder not found.*missing_root"):
        discover_scene_dirs({"data_root": str(tmp_path / "missing_root")})
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert [n for n, _ in discover_scene_dirs({"data_root": str(tmp_path)})] == ["a", "b"]
    assert [n for n, _ in discover_scene_dirs({"data_root": str(tmp_path), "exclude_scenes": ["a"]})] == ["b"]
    with pytest.raises(DataConfigError, match="scan999"):
        discover_scene_dirs({"data_root": str(tmp_path), "scene_name": "scan999"})
    with pytest.raises(DataConfigError, match="c"):
        discover_scene_dirs({"data_root": str(tmp_path), "scene_names": ["a", "c"]})


def test_input_views_are_cropped_around_the_target_content(tmp_path):
    import numpy as np
    import torch
    from _train_fixtures import make_tiny_scene

    from headless_train.data import crop_input_views
    from npbgpp_core.datasets import load_scene, sample_crop

    scene = load_scene(make_tiny_scene(str(tmp_path / "s"), views=6, size=32, n_points=3000))
    image, _, target = sample_crop(scene, 0, np.random.default_rng(3), image_size=8, zoom_range=(4.0, 4.0),
                                 random_shift=False)
    assert target.image_size == (8, 8)
    points = torch.from_numpy(scene.points)
    images, cams = crop_input_views(scene, [1, 2], target, points)
    for k, (img, cam) in enumerate(zip(images, cams, strict=True)):
        assert img.shape == (3, 16, 16) and cam.image_size == (16, 16)  # twice the target crop
        full_cam = scene.views[1 + k].camera.scaled((128, 128))  # the target's zoom (4x)
        full = scene.load_image(1 + k, (128, 128))
        uv_full, _ = full_cam.project(points[:5])
        uv_crop, _ = cam.project(points[:5])
        left, top = (uv_full - uv_crop)[0].round().int().tolist()
        torch.testing.assert_close((uv_full - uv_crop), torch.tensor([[left, top]] * 5, dtype=uv_full.dtype))
        torch.testing.assert_close(img, full[:, top : top + 16, left : left + 16])
        # The crop is centred on what the target crop shows (the median of those points' projections).
        uv_t, d_t = target.project(points)
        seen = points[(d_t > 0) & (uv_t >= -0.5).all(1) & (uv_t < 7.5).all(1)]
        assert seen.shape[0] > 0
        uv_s, d_s = full_cam.project(seen)
        inside = (d_s > 0) & (uv_s >= -0.5).all(1) & (uv_s < 127.5).all(1)
        centre = uv_s[inside].median(0).values
        assert abs(left + 8 - float(centre[0])) <= 1 or left in (0, 112)
        assert abs(top + 8 - float(centre[1])) <= 1 or top in (0, 112)


@pytest.mark.parametrize("name", ["npbgpp_sphere", "npbgpp_mean"])
def test_every_network_option_is_a_system_option(name):
    """The system node offers every NPBGPlusPlusConfig field with the dataclass default
    (the aggregator is the config's name), and all of them reach the network."""
    import dataclasses

    import torch

    from npbgpp_core.models import NPBGPlusPlusConfig
    from npbgpp_core.pretrained import trainer_checkpoint_weights

    with open(os.path.join(ROOT, "headless_train", "conf", "system", f"{name}.yaml"), encoding="utf-8") as f:
        scfg = yaml.safe_load(f)
    fields = {f.name for f in dataclasses.fields(NPBGPlusPlusConfig)}
    assert fields <= set(scfg)
    default = NPBGPlusPlusConfig(aggregator=name.split("_")[1]).to_dict()
    assert NPBGPlusPlusConfig.from_options(scfg).to_dict() == default  # what NPBGPlusPlusSystem builds
    changed = {"render_canvas": "square", "scales": [1.0, 0.5, 0.25, 0.125, 0.1], "near": 0.5,
               "extractor_weights": "enc.safetensors", "world_up": [0.0, 0.0, 1.0], "min_view_depth": 1.0}
    got = NPBGPlusPlusConfig.from_options({**scfg, **changed}).to_dict()
    assert {k: got[k] for k in changed} == changed
    # a checkpoint of the run: the same network, its trained extractor instead of the starting file
    ckpt = {"npbgpp": {"system": "npbgpp", "config": {**scfg, **changed}}, "state_dict": {"model.x": torch.zeros(1)}}
    _, from_ckpt, _ = trainer_checkpoint_weights(ckpt, "run.ckpt")
    assert from_ckpt == {**got, "extractor_weights": None}


def test_every_subcommand_module_has_main_and_is_listed_in_help(capsys):
    """Each name in SUBCOMMANDS resolves to a module with main(argv), and --help lists them
    all beside Hydra's own help."""
    import importlib

    from headless_train.cli import SUBCOMMANDS, main, subcommand_help

    listing = subcommand_help()
    for name, (module, summary) in SUBCOMMANDS.items():
        assert callable(importlib.import_module(module).main), name
        assert f"  {name} " in listing and summary in listing
    with pytest.raises(SystemExit):
        main(["stage", "--help"])
    assert "--corpus" in capsys.readouterr().out


def test_stage_help_says_what_a_stage_is_and_pack_help_gives_its_defaults(capsys):
    """`stage --help` ended mid-sentence ("one resumable NPBG++ training": the docstring's first
    line) and did not name `stage pack`, whose --help gave no option a word or a default. Now
    the summary is whole, pack is named, and every pack option's help states the default the
    parser really uses (read from the parser, not repeated here)."""
    import re

    from headless_train.cli import main
    from headless_train.stage import parse_pack_args

    with pytest.raises(SystemExit):
        main(["stage", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "one resumable NPBG++ training stage, sized for a lent GPU machine" in out
    assert "stage pack --help" in out
    with pytest.raises(SystemExit):
        main(["stage", "pack", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    defaults = vars(parse_pack_args(["--corpus", "c", "--out", "o"]))
    for name in ("max_side", "max_points", "max_mib"):
        flag = "--" + name.replace("_", "-")
        said = re.search(re.escape(flag) + r" \S+ [^-]*?\(default ([0-9.]+)\)", help_text)
        assert said and float(said.group(1)) == defaults[name], (flag, help_text)
    assert "(default: all)" in help_text and defaults["scenes"] is None


def test_export_logs_which_points_no_view_sees_and_why(tmp_path, caplog):
    """`headless_train export` logged only 'N of M points seen'; now it splits the unseen ones
    as the add-on's Aggregate does (NPBGPlusPlus.points_in_view): on a one-view scene, 3 points
    apart from each other (each wins its pixel), copies of them pushed back along the camera's
    rays (the same pixels, farther: each loses to its original) and 2 points behind the camera
    (on no pixel). Hand count: 3 seen, 2 in no view, 3 lost; the bundle's seen mask says which."""
    import logging
    import os
    import sys

    import numpy as np

    sys.path.insert(0, os.path.dirname(__file__))
    from _train_fixtures import make_tiny_scene

    from headless_train.export import main as export_main
    from npbgpp_core import save_ply
    from npbgpp_core.pretrained import default_weights_path
    from npbgpp_core.scene import NeuralScene

    folder = make_tiny_scene(str(tmp_path / "scene"), views=1, size=24, n_points=10, splits=(1, 0, 0))
    eye = np.array([0.0, 0.6, -3.0])  # make_tiny_scene's first camera, looking at the origin
    base = np.array([[0.07, -0.41, 0.03], [-0.13, 0.02, 0.11], [0.21, 0.37, -0.06]])
    pushed = eye + 1.5 * (base - eye)
    behind = eye + 0.5 * (eye - base[:2])
    pts = np.concatenate([base, pushed, behind]).astype(np.float32)
    save_ply(os.path.join(folder, "points3d.ply"), pts, np.full((len(pts), 3), 0.5, np.float32))
    out = str(tmp_path / "b.npbgpp")
    weights = default_weights_path("npbgpp", "object")
    with caplog.at_level(logging.INFO, logger="headless_train.export"):
        assert export_main(["--checkpoint", weights, "--scene", folder, "--out", out, "--world-up=+y"]) == 0
    assert NeuralScene.load(out).valid.tolist() == [True] * 3 + [False] * 5
    assert ("aggregated 1 views; 3 of 8 points seen (the nearest point at some pixel of a view: they get "
            "descriptors); the other 5 get none and do not render: 2 lie in no view, 3 fall only on pixels where "
            "a nearer point wins") in caplog.text, caplog.text
    caplog.clear()
    save_ply(os.path.join(folder, "points3d.ply"), pts[:3], np.full((3, 3), 0.5, np.float32))  # all seen: no split
    with caplog.at_level(logging.INFO, logger="headless_train.export"):
        assert export_main(["--checkpoint", weights, "--scene", folder, "--out", str(tmp_path / "c.npbgpp"),
                            "--world-up=+y"]) == 0
    assert "3 of 3 points seen" in caplog.text and "no view" not in caplog.text, caplog.text


def test_npbgpp_evaluation_says_when_export_aggregates_about_another_up(tmp_path):
    """An NPBG++ evaluation of a weights file aggregates about the configured system.world_up
    (published +Y), export about --world-up auto: the note names the axis the exported bundle
    really holds; a checkpoint's stored axis likewise; nothing when they agree."""
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from _train_fixtures import make_tiny_scene

    from headless_train.cli import export_world_up_note, resolve_run_world_up
    from headless_train.export import main as export_main
    from npbgpp_core.datasets import load_scene
    from npbgpp_core.pretrained import default_weights_path
    from npbgpp_core.scene import NeuralScene

    folder = make_tiny_scene(str(tmp_path / "scene"), views=4, size=24, n_points=200, splits=(3, 0, 1))
    scene = load_scene(folder)
    scene.name = "scene"
    weights = default_weights_path("npbgpp", "object")
    assert export_main(["--checkpoint", weights, "--scene", folder, "--out", str(tmp_path / "b.npbgpp")]) == 0
    exported_up = [float(v) for v in NeuralScene.load(str(tmp_path / "b.npbgpp")).model_config["world_up"]]
    assert max(abs(a - b) for a, b in zip(exported_up, (0.0, 1.0, 0.0), strict=True)) > 1e-3  # the case at hand
    exported = "[" + ",".join(str(v) for v in exported_up) + "]"
    note = export_world_up_note([0.0, 1.0, 0.0], weights, None, [scene])
    assert note is not None and f"system.world_up={exported} evaluates the bundle export writes" in note
    assert export_world_up_note(exported_up, weights, None, [scene]) is None
    # with a val view, the run's auto (its training views) is not export's (every non-held-out
    # view): the note names the numbers export uses, not auto, which would still differ
    with_val = make_tiny_scene(str(tmp_path / "with_val"), views=5, size=24, n_points=200, splits=(3, 1, 1))
    assert export_main(["--checkpoint", weights, "--scene", with_val, "--out", str(tmp_path / "v.npbgpp")]) == 0
    val_up = [float(v) for v in NeuralScene.load(str(tmp_path / "v.npbgpp")).model_config["world_up"]]
    val_scene = load_scene(with_val)
    val_scene.name = "with_val"
    scfg = {"world_up": "auto"}
    resolve_run_world_up(scfg, [val_scene])
    note = export_world_up_note(scfg["world_up"], weights, None, [val_scene])
    assert note is not None and "system.world_up=auto" not in note
    assert f"system.world_up=[{','.join(str(v) for v in val_up)}] evaluates" in note
    assert export_world_up_note(val_up, weights, None, [val_scene]) is None
    # two scenes whose exports use different axes: no one override evaluates both
    note = export_world_up_note([0.0, 1.0, 0.0], weights, None, [scene, val_scene])
    assert note is not None and "evaluate each scene alone" in note
    stored = {"npbgpp": {"config": {"world_up": [0.0, 0.0, 1.0]}}}
    note = export_world_up_note([0.0, 1.0, 0.0], "run/checkpoints/last.ckpt", stored, [scene])
    assert note is not None and "system.world_up=[0.0,0.0,1.0] evaluates" in note
    assert export_world_up_note([0.0, 0.0, 2.0], "run/checkpoints/last.ckpt", stored, [scene]) is None
