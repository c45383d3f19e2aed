"""Training options of issue #11: the gradient (edge) loss, point-cloud variants per
sample, image caching, and the resumable GPU stage script (dry run on the CPU)."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _train_fixtures import make_dataset  # noqa: E402

from npbgpp_core import save_ply  # noqa: E402
from npbgpp_core.losses import RenderLoss, gradient_loss  # noqa: E402


# ------------------------------------------------------------------ gradient loss
def test_gradient_loss_hand_computed_single_scale():
    # pred row [0, 1, 3]: x-differences [1, 2]; target row [0, 0, 0]: [0, 0]; one row,
    # so no y-differences... use two rows to have both directions.
    pred = torch.tensor([[[[0.0, 1.0, 3.0], [0.0, 1.0, 1.0]]]])
    target = torch.zeros_like(pred)
    # x: |1|,|2|,|1|,|0| -> mean 1.0 ; y: |0|,|0|,|-2| -> mean 2/3 ; loss = (1 + 2/3) / 2
    value = gradient_loss(pred, target, scales=1)
    assert value.item() == pytest.approx((1.0 + 2.0 / 3.0) / 2.0)


def test_gradient_loss_ignores_constant_offsets_and_masks_invalid_pairs():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(1, 3, 16, 16, generator=g)
    assert gradient_loss(target + 0.3, target, scales=3).item() == pytest.approx(0.0, abs=1e-6)
    pred = target.clone()
    pred[..., :, 8:] += 0.5  # a step between columns 7 and 8
    mask = torch.ones(1, 1, 16, 16)
    assert gradient_loss(pred, target, mask, scales=1).item() > 0
    mask[..., :, 8:] = 0  # only the left half counts: the step is outside
    assert gradient_loss(pred, target, mask, scales=1).item() == pytest.approx(0.0, abs=1e-6)


def test_gradient_loss_prefers_the_sharp_edge_that_l1_cannot_tell_apart():
    # A step target: a blurred edge and a sharp edge of lower contrast.
    x = torch.linspace(0, 1, 32)
    target = (x > 0.5).float().expand(1, 1, 32, 32).clone()
    blurred = torch.clamp((x - 0.5) * 4 + 0.5, 0, 1).expand(1, 1, 32, 32).clone()
    sharp_off = target * 0.75 + 0.125  # same edge position, 3/4 of the contrast
    assert gradient_loss(sharp_off, target, scales=1) < gradient_loss(blurred, target, scales=1)


def test_render_loss_adds_the_weighted_gradient_term():
    g = torch.Generator().manual_seed(1)
    pred, target = torch.rand(2, 3, 24, 24, generator=g), torch.rand(2, 3, 24, 24, generator=g)
    base = RenderLoss(l1_weight=10.0)(pred, target)
    both = RenderLoss(l1_weight=10.0, gradient_weight=0.5, gradient_scales=2)
    assert "gradient" in both.message
    expected = base + 10.0 * 0.5 * gradient_loss(pred, target, None, 2)
    assert both(pred, target).item() == pytest.approx(expected.item(), rel=1e-6)


# ------------------------------------------------------------- point-cloud variants
def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_module

    with initialize_config_module("headless_train.conf", version_base="1.3"):
        return compose("config", overrides=overrides)


def _with_variants(root: str) -> str:
    make_dataset(root, ("sceneA", "sceneB"), views=5, size=24, n_points=200)
    rng = np.random.default_rng(0)
    # sceneA: two variants with distinct point counts; sceneB: none (keeps points3d.ply)
    os.makedirs(os.path.join(root, "sceneA", "points"))
    for kind, n in (("sfm", 37), ("lidar", 91)):
        save_ply(os.path.join(root, "sceneA", "points", f"{kind}.ply"), rng.normal(size=(n, 3)).astype(np.float32))
    return root


def test_point_cloud_variants_are_picked_per_sample(tmp_path):
    from headless_train.data import SceneDataModule

    root = _with_variants(str(tmp_path / "data"))
    base = ["datasets=nerf_blender_pretrain", f"datasets.data_root={root}", "datasets.train_image_size=16",
            "datasets.train_num_samples=40", "datasets.color_jitter_prob=0", "datasets.selection_count=1",
            "dataloader=small", f"system.descriptors_save_dir={tmp_path}/d"]
    dm = SceneDataModule(_compose([*base, "datasets.point_cloud_variants=true"]), seed=3407)
    a, b = dm.scenes
    assert [k for k, _ in a.metadata["point_variants"]] == ["lidar", "sfm"]
    assert "point_variants" not in b.metadata and b.points.shape[0] == 200  # falls back to points3d.ply
    ds = dm.train_dataloader().dataset
    picked = [ds[i].get("points_variant") for i in range(len(ds))]
    from_a = [p for i, p in enumerate(picked) if ds.active[i // ds.num_samples] == 0]
    from_b = [p for i, p in enumerate(picked) if ds.active[i // ds.num_samples] == 1]
    assert set(from_a) == {0, 1}  # both variants are used
    assert set(from_b) == {None}
    # the system renders with the chosen variant's cloud
    from omegaconf import OmegaConf

    from headless_train.systems import build_system

    cfg = _compose([*base, "datasets.point_cloud_variants=[sfm]", "datasets.scene_names=[sceneA]"])
    dm = SceneDataModule(cfg, seed=3407)
    system = build_system(OmegaConf.to_container(cfg, resolve=True), dm.scenes)
    assert system.points(0, 0).shape[0] == 37 and system.points(0).shape[0] == 200


def test_cached_images_equal_decoded_images(tmp_path):
    from headless_train.data import CachedImages, load_scenes

    root = _with_variants(str(tmp_path / "data"))
    dcfg = {"data_root": root, "format": "nerf_synthetic", "cache_images": True, "cache_images_max_gb": 1}
    plain = load_scenes({**dcfg, "cache_images": False}, None)[0]
    cached = load_scenes(dcfg, None)[0]
    for size in (None, (12, 12), (10, 14)):
        for _ in range(2):  # the second call reads the cache
            assert torch.equal(cached.load_image(1, size), plain.load_image(1, size))
    assert len(cached.load_image.images) == 1
    from headless_train.data import prefill_image_cache

    prefill_image_cache([cached])
    assert len(cached.load_image.images) == len(cached.views)
    # a scene whose cloud is cut to n_point / system.max_points (a copy of the scene) kept
    # its images uncached, without a word
    subsampled = load_scenes({**dcfg, "n_point": 10}, None)[0]
    assert subsampled.points.shape[0] == 10 and isinstance(subsampled.load_image, CachedImages)
    assert torch.equal(subsampled.load_image(1), plain.load_image(1))


# ------------------------------------------------------------------ stage script
def test_stage_rejects_bad_corpus_folders(tmp_path):
    from headless_train.stage import StageError, check_corpus

    with pytest.raises(StageError, match="corpus folder not found: .*nope"):
        check_corpus(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(StageError, match="bad corpus folder .*no scene folders"):
        check_corpus(str(tmp_path / "empty"))
    (tmp_path / "empty" / "junk").mkdir()
    with pytest.raises(StageError, match="bad corpus folder .*junk: not a scene folder"):
        check_corpus(str(tmp_path / "empty"))
    root = make_dataset(str(tmp_path / "data"), ("s1",), views=3, size=16, n_points=50)
    assert check_corpus(root) == ["s1"]
    with pytest.raises(StageError, match="MiB, more than"):
        check_corpus(root, max_mib=0.001)


def test_stage_refuses_a_broken_scene_before_writing_into_the_work_folder(tmp_path, capsys, monkeypatch):
    """A scene whose cloud (or cameras) does not load passed the stage's corpus check (its
    layout was recognised) and failed only in the trainer, leaving run/ and seed.ckpt behind;
    now the stage loads every scene as check-corpus does and refuses first, by file."""
    import headless_train.stage as stage

    monkeypatch.setattr(stage, "run_child", lambda *a, **k: pytest.fail("training started"))
    root = make_dataset(str(tmp_path / "data"), ("s1", "s2"), views=3, size=16, n_points=50)
    broken = os.path.join(root, "s2", "points3d.ply")
    with open(broken, "w") as f:
        f.write("not a cloud")
    work = tmp_path / "w"
    assert stage.main(["--corpus", root, "--work", str(work), "--gpus", "0"]) == 2
    err = capsys.readouterr().err
    assert f"bad corpus folder (--corpus): {broken}: not a readable PLY" in err and "Traceback" not in err, err
    assert not work.exists()
    work.mkdir()  # a work folder of earlier calls stays as it was
    (work / "stage.json").write_text("[]")
    assert stage.main(["--corpus", root, "--work", str(work), "--gpus", "0"]) == 2
    assert sorted(os.listdir(work)) == ["stage.json"] and (work / "stage.json").read_text() == "[]"


def test_stage_pack_leaves_out_unfinished_scenes_and_writes_all_or_nothing(tmp_path):
    import json

    from PIL import Image

    from headless_train.stage import StageError, folder_bytes, pack

    corpus = tmp_path / "corpus"
    for name in ("env_1", "env_2.partial-999999999", ".cache"):
        (corpus / name / "train").mkdir(parents=True)
        (corpus / name / "transforms_train.json").write_text(json.dumps({"frames": []}))
        Image.new("RGB", (64, 32), (200, 10, 10)).save(corpus / name / "train" / "r_0.png")
    out = tmp_path / "packed"
    with pytest.raises(StageError, match="would be .* MiB, over 1e-06"):
        pack(str(corpus), str(out), 16, 100, 1e-6)
    assert sorted(os.listdir(tmp_path)) == ["corpus"]  # nothing half-written
    packed = pack(str(corpus), str(out), 16, 100, 64.0)
    assert packed["out"] == str(out)
    assert sorted(os.listdir(out)) == ["env_1"]  # the folder still being rendered is not copied
    # sizes counted while copying are those of the files on disk
    assert packed["scene_bytes"] == {"env_1": folder_bytes(str(out / "env_1"))}
    assert packed["mib"] == round(folder_bytes(str(out)) / 2**20, 2)
    with Image.open(out / "env_1" / "train" / "r_0.png") as im:
        assert im.size == (16, 8)
    assert sorted(os.listdir(tmp_path)) == ["corpus", "packed"]
    # an --out inside the corpus became a folder that is no scene: every later use of the corpus failed
    with pytest.raises(StageError, match="is inside --corpus"):
        pack(str(corpus), str(corpus / "small"), 16, 100, 64.0)
    assert not (corpus / "small").exists()


def test_stage_pack_scales_pixel_intrinsics_follows_links_and_picks_scenes(tmp_path):
    """A corpus of linked scene folders (like a training list of symlinks) packs to real
    files; NeRF-style fl_x / cx / w / h are scaled with the images, so the packed scene's
    camera is the original one scaled (checked through the loader, by hand)."""
    import math

    from _train_fixtures import make_tiny_scene

    from headless_train.stage import StageError, folder_bytes, pack
    from npbgpp_core.datasets import load_scene

    src = make_tiny_scene(str(tmp_path / "src" / "a"), views=3, size=32, splits=(2, 1, 0))
    make_tiny_scene(str(tmp_path / "src" / "b"), views=3, size=32, splits=(2, 1, 0))
    for split in ("train", "val"):
        path = os.path.join(src, f"transforms_{split}.json")
        with open(path) as f:
            meta = json.load(f)
        fl = 16.0 / math.tan(0.5 * meta["camera_angle_x"])
        meta.update(fl_x=fl, fl_y=fl, cx=15.0, cy=17.0, w=32, h=32)
        meta["frames"][0]["cx"] = 14.0  # a per-frame value wins over the file's
        with open(path, "w") as f:
            json.dump(meta, f)
    corpus = tmp_path / "links"
    corpus.mkdir()
    for name in ("a", "b"):
        os.symlink(tmp_path / "src" / name, corpus / f"scene_{name}")
    out = tmp_path / "packed"
    packed = pack(str(corpus), str(out), 8, 100, 64.0, scenes="scene_a")
    assert sorted(os.listdir(out)) == ["scene_a"] and not os.path.islink(out / "scene_a")
    assert packed["scene_bytes"] == {"scene_a": folder_bytes(str(out / "scene_a"))}  # after the rewrites
    before, after = load_scene(src), load_scene(str(out / "scene_a"))
    assert len(after.views) == len(before.views) == 3
    for vb, va in zip(before.views, after.views, strict=True):
        assert va.camera.image_size == (8, 8)
        K0, K1 = np.asarray(vb.camera.K, dtype=np.float64), np.asarray(va.camera.K, dtype=np.float64)
        # pixel-centre convention: cx' = (cx + 0.5) * s - 0.5 with s = 8 / 32
        expected = K0.copy()
        expected[0, 0] *= 0.25
        expected[1, 1] *= 0.25
        expected[0, 2] = (K0[0, 2] + 0.5) * 0.25 - 0.5
        expected[1, 2] = (K0[1, 2] + 0.5) * 0.25 - 0.5
        np.testing.assert_allclose(K1, expected, rtol=1e-6, atol=1e-6)
    assert float(np.asarray(before.views[0].camera.K)[0, 2]) == pytest.approx(13.5)  # the per-frame cx
    with pytest.raises(StageError, match="no scene folder .* matches --scenes 'nope'"):
        pack(str(corpus), str(tmp_path / "none"), 8, 100, 64.0, scenes="nope")
    assert not (tmp_path / "none").exists()


def test_stage_dry_run_resumes_and_writes_weights(tmp_path, capsys):
    """Two calls of a dry-run stage: the second resumes. The first trains two targets per
    sample; the second, without --targets-per-sample, keeps them (it fell back to 1 while
    --warmup-steps kept the run's value), and a third asking for 3 is refused untrained."""
    from omegaconf import OmegaConf

    from headless_train.data import targets_per_sample
    from headless_train.stage import main
    from npbgpp_core.pretrained import read_weights

    root = make_dataset(str(tmp_path / "data"), ("s1",), views=5, size=24, n_points=150)
    work = str(tmp_path / "stage")
    args = ["--corpus", root, "--work", work, "--dry-run", "--dry-steps", "1"]
    first = ["--targets-per-sample", "2", "--crop", "128", "--lr", "1e-3", "--gradient-weight", "0.5",
             "--override", "datasets.color_jitter_prob=0"]
    assert main([*args, *first]) == 0
    capsys.readouterr()
    assert main(args) == 0
    assert "changes" not in capsys.readouterr().err  # nothing changed, nothing said
    with open(os.path.join(work, "stage.json")) as f:
        calls = json.load(f)
    assert [(c["resumed"], c["start_step"], c["end_step"]) for c in calls] == [(False, 0, 1), (True, 1, 2)]
    assert [c["targets_per_sample"] for c in calls] == [2, 2]
    assert all("datasets.targets_per_sample=2" in c["overrides"] for c in calls)
    # the resumed call, given none of the first call's options, recorded and trained with them all
    assert calls[1]["settings"] == calls[0]["settings"]
    assert {k: calls[0]["settings"][k] for k in ("crop", "lr", "gradient_weight", "override")} == {
        "crop": 128, "lr": 1e-3, "gradient_weight": 0.5, "override": ["datasets.color_jitter_prob=0"]}
    # the resumed trainer's own config, read as its data module reads it
    trained = OmegaConf.load(os.path.join(work, "run", ".hydra", "config.yaml"))
    assert trained.resume and targets_per_sample(trained.datasets) == 2
    assert trained.system.lr == 1e-3 and trained.loss.gradient_weight == 0.5 and trained.datasets.color_jitter_prob == 0
    capsys.readouterr()
    for extra, message in ((["--targets-per-sample", "3"], "this run was trained with --targets-per-sample 2"),
                           (["--lr", "2e-4"], "--lr 0.0002: this run was trained with --lr 0.001")):
        assert main([*args, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and "start a new --work folder" in err, err
    with open(os.path.join(work, "stage.json")) as f:
        assert len(json.load(f)) == 2  # refused before training: nothing recorded
    wf = read_weights(os.path.join(work, "npbgpp_sphere_stage.safetensors"), "npbgpp")
    assert wf.card["stage"]["end_step"] == 2 and wf.config["world_up"] == [0.0, 0.0, 1.0]
    assert "system.max_scenes_per_train_epoch=null" in calls[0]["overrides"]  # every scene, every epoch
    # the first call warms up from the weights; the resumed one continues that ramp (scheduler in last.ckpt)
    assert [c["warmup_steps"] for c in calls] == [200, 200]
    last = torch.load(os.path.join(work, "run", "checkpoints", "last.ckpt"), map_location="cpu", weights_only=True)
    assert last["lr_schedulers"][0]["last_epoch"] == 2


def test_stage_refuses_bad_start_weights_work_and_world_up_by_name(tmp_path, capsys, monkeypatch):
    """A missing or foreign --weights, a --work that is a file and a --world-up that is not an
    axis were tracebacks (the weights after the work folder was made); now one line naming
    the option, exit 2, nothing written and no training started. --world-up takes axis
    names as system.world_up does."""
    import headless_train.stage as stage

    monkeypatch.setattr(stage, "run_child", lambda *a, **k: pytest.fail("training started"))
    root = make_dataset(str(tmp_path / "data"), ("s1",), views=3, size=16, n_points=50)
    junk = tmp_path / "junk.ckpt"
    junk.write_text("hello")
    cases = [
        (["--weights", str(tmp_path / "nope.ckpt")], f"--weights {tmp_path / 'nope.ckpt'}: "),
        (["--weights", str(junk)], f"--weights {junk}: weights file {junk} is not a readable torch checkpoint"),
        (["--weights", os.path.join("npbgpp_core", "weights", "npbg_refiner_procedural.safetensors")],
         "holds 'npbg_refiner' weights, expected 'npbgpp'"),
        (["--world-up", "up"], "--world-up up: world_up must be"),
        (["--world-up", "0,0"], "--world-up 0,0: world_up must be 3 finite numbers"),
        (["--world-up", "auto"], "not auto"),
        (["--minutes", "0"], "--minutes 0: must be"), (["--minutes", "-1"], "--minutes -1: must be"),
        (["--minutes", "nan"], "--minutes nan: must be"), (["--batch", "0"], "--batch 0: must be at least 1"),
        (["--crop", "0"], "--crop 0: must be"), (["--lr", "-1"], "--lr -1: must be"),
        (["--max-points", "0"], "--max-points 0: must be at least 1"), (["--gpus", "-1"], "--gpus -1: must be 0"),
        (["--workers", "-2"], "--workers -2: must be 0 or more"),
        (["--targets-per-sample", "0"], "--targets-per-sample 0: must be at least 1"),
    ]
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for extra, message in cases:
        work = tmp_path / "w"
        assert stage.main(["--corpus", root, "--work", str(work), "--gpus", "0", *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
        assert not work.exists()
    afile = tmp_path / "afile"
    afile.write_text("")
    assert stage.main(["--corpus", root, "--work", str(afile), "--gpus", "0"]) == 2
    assert f"--work {afile} is a file" in capsys.readouterr().err
    inside = os.path.join(root, "stage")  # made there, it was read as a broken scene by this and every later call
    assert stage.main(["--corpus", root, "--work", inside, "--gpus", "0"]) == 2
    assert "is inside --corpus" in capsys.readouterr().err and not os.path.exists(inside)
    os.makedirs(inside)  # left there by an earlier version: named as the --work, not as a broken scene
    assert stage.main(["--corpus", root, "--work", inside, "--gpus", "0"]) == 2
    assert "is inside --corpus" in capsys.readouterr().err
    os.rmdir(inside)
    assert stage.stage_world_up("+z") == [0.0, 0.0, 1.0] and stage.stage_world_up("0,-1,0") == [0.0, -1.0, 0.0]


def test_stage_trains_the_starting_weights_own_input_canvas(tmp_path, monkeypatch):
    """Without --input-canvas a first call built a 'square' network whatever the starting
    weights were trained with (the bundled file: 'bounds'), so the stage changed the network
    (only a warning in train.log); now it takes the starting weights' canvas, a resumed call
    the run's own, and --input-canvas still overrides."""
    import headless_train.stage as stage
    from npbgpp_core.pretrained import default_weights_path, read_weights

    bundled = read_weights(default_weights_path("npbgpp"), "npbgpp").config["input_canvas"]
    seen = []

    def fake_child(cmd, *a, **k):
        seen.append(next(o for o in cmd if o.startswith("system.input_canvas=")))
        return 1, False, None

    monkeypatch.setattr(stage, "run_child", fake_child)
    root = make_dataset(str(tmp_path / "data"), ("s1",), views=3, size=16, n_points=50)
    cases = (([], bundled), (["--input-canvas", "square"], "square"), (["--input-canvas", "bounds"], "bounds"))
    for extra, want in cases:
        with pytest.raises(stage.StageError, match="training wrote no"):
            stage.run_stage(stage.parse_args(["--corpus", root, "--work", str(tmp_path / "w"), "--gpus", "0", *extra]))
        assert seen[-1] == f"system.input_canvas={want}"
    # --weights of the other canvas: its own, not the bundled file's
    from npbgpp_core.pretrained import save_weights

    bundled_file = read_weights(default_weights_path("npbgpp"), "npbgpp")
    other = "square" if bundled == "bounds" else "bounds"
    own = str(tmp_path / f"{other}.safetensors")
    save_weights(own, bundled_file.state, "npbgpp", {**bundled_file.config, "input_canvas": other}, {"source": "test"})
    with pytest.raises(stage.StageError, match="training wrote no"):
        stage.run_stage(stage.parse_args(["--corpus", root, "--work", str(tmp_path / "w2"), "--gpus", "0",
                                          "--weights", own]))
    assert seen[-1] == f"system.input_canvas={other}"
    resumed = {"config": {"input_canvas": "square"}}
    args = stage.parse_args(["--corpus", root, "--work", str(tmp_path / "w")])
    assert stage.stage_input_canvas(args, resumed, {"input_canvas": "bounds"}) == "square"


def test_a_resumed_stage_refuses_other_weights_canvas_or_background(tmp_path, capsys, monkeypatch):
    """On a resumed call --weights was ignored without a word and --input-canvas /
    --background were applied to a network trained with the run's own: now another value is
    refused by option, before the trainer starts; the same values (a repeated command line)
    are accepted. A first call reads its starting weights once (config and seed)."""
    import headless_train.stage as stage
    import npbgpp_core.pretrained as pretrained
    from npbgpp_core.pretrained import default_weights_path, read_weights, save_weights

    started = []

    def fake_child(cmd, *a, **k):
        started.append(cmd)
        return 1, False, None

    monkeypatch.setattr(stage, "run_child", fake_child)
    reads = []

    def counted(path, kind):
        reads.append(path)
        return read_weights(path, kind)

    monkeypatch.setattr(pretrained, "read_weights", counted)
    root = make_dataset(str(tmp_path / "data"), ("s1",), views=3, size=16, n_points=50)
    work = tmp_path / "w"
    bundled = default_weights_path("npbgpp")
    with pytest.raises(stage.StageError, match="training wrote no"):
        stage.run_stage(stage.parse_args(["--corpus", root, "--work", str(work), "--gpus", "0"]))
    assert reads == [bundled] and len(started) == 1
    monkeypatch.setattr(pretrained, "read_weights", read_weights)
    own = read_weights(bundled, "npbgpp").config
    canvas, background = own["input_canvas"], own.get("background", "none")
    # the run as a killed first call leaves it: seed.ckpt and a last.ckpt at step 3
    (work / "run" / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {}, "global_step": 3,
                "npbgpp": {"system": "npbgpp", "config": {"input_canvas": canvas, "background": background,
                                                          "warmup_steps": 200}, "scenes": [], "points": []}},
               work / "run" / "checkpoints" / "last.ckpt")
    other = str(tmp_path / "other.safetensors")
    wf = read_weights(bundled, "npbgpp")
    save_weights(other, wf.state, "npbgpp", wf.config, {})
    flip = {"square": "bounds", "bounds": "square"}[canvas]
    flop = {"none": "environment", "environment": "none"}[background]
    cases = [
        (["--weights", other], f"--weights {other}: the run in {work} started from {bundled} (recorded in "
                               f"{work / 'seed.ckpt'})"),
        (["--input-canvas", flip], f"--input-canvas {flip}: this run was trained with --input-canvas {canvas}"),
        (["--background", flop], f"--background {flop}: this run was trained with --background {background}"),
    ]
    for extra, message in cases:
        assert stage.main(["--corpus", root, "--work", str(work), "--gpus", "0", *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "start a new --work folder" in err and "Traceback" not in err, err
    assert len(started) == 1
    same = ["--weights", bundled, "--input-canvas", canvas, "--background", background]
    with pytest.raises(stage.StageError, match="took no step"):  # past the checks: the (fake) trainer ran
        stage.run_stage(stage.parse_args(["--corpus", root, "--work", str(work), "--gpus", "0", *same]))
    assert len(started) == 2 and "resume=true" in started[-1]
    # a run that does not record its starting weights: the option is said to be ignored
    os.remove(work / "seed.ckpt")
    with pytest.raises(stage.StageError, match="took no step"):
        stage.run_stage(stage.parse_args(["--corpus", root, "--work", str(work), "--gpus", "0", "--weights", other]))
    assert f"warning: --weights {other} is ignored" in capsys.readouterr().err and len(started) == 3


def test_stage_refuses_a_broken_stage_json_before_training(tmp_path, capsys, monkeypatch):
    """A stage.json that is not a list of calls was read only after training, failing with a
    JSONDecodeError traceback (no weights exported, the call unrecorded); now it is refused
    first, by name."""
    import headless_train.stage as stage

    monkeypatch.setattr(stage, "run_child", lambda *a, **k: pytest.fail("training started"))
    root = make_dataset(str(tmp_path / "data"), ("s1",), views=3, size=16, n_points=50)
    work = tmp_path / "w"
    work.mkdir()
    for text in ("garbage{", '{"a": 1}'):
        (work / "stage.json").write_text(text)
        assert stage.main(["--corpus", root, "--work", str(work), "--gpus", "0"]) == 2
        err = capsys.readouterr().err
        assert f"{work / 'stage.json'} is not" in err and "Traceback" not in err, err
    assert stage.read_history(str(tmp_path / "none.json")) == []


def _resumable_run(work, settings: dict | None, overrides: list[str] | None = None) -> None:
    """A stage run as a first call leaves it: last.ckpt at step 3 and that call in stage.json."""
    from npbgpp_core.pretrained import default_weights_path, read_weights

    own = read_weights(default_weights_path("npbgpp"), "npbgpp").config
    (work / "run" / "checkpoints").mkdir(parents=True)
    config = {"input_canvas": own["input_canvas"], "background": own.get("background", "none"), "warmup_steps": 200,
              "world_up": [0.0, 0.0, 1.0]}
    torch.save({"state_dict": {}, "global_step": 3,
                "npbgpp": {"system": "npbgpp", "config": config, "scenes": [], "points": []}},
               work / "run" / "checkpoints" / "last.ckpt")
    call = {"end_step": 3, "targets_per_sample": 1, "overrides": overrides or []}
    if settings is not None:
        call["settings"] = settings
    (work / "stage.json").write_text(json.dumps([call]))


def _refused_leaving_the_run_as_it_was(stage, argv: list[str], work, capsys) -> str:
    """stage.main(argv) refuses (exit 2) and leaves the run folder's listing and stage.json
    as they were; returns what it wrote to stderr, for the caller's message check."""
    listing, record = sorted(os.listdir(work)), (work / "stage.json").read_text()
    assert stage.main(argv) == 2, argv
    err = capsys.readouterr().err
    assert sorted(os.listdir(work)) == listing and (work / "stage.json").read_text() == record
    return err


def test_a_resumed_stage_keeps_left_out_options_refuses_the_networks_and_says_what_changes(
        tmp_path, capsys, monkeypatch):
    """One rule for every option of a resumed call: left out, the run's recorded value (it fell
    back to the default without a word: --crop 128 resumed at 256); another --world-up or
    --lr is refused before anything runs (the trainer refused the axis only after launch, and
    last.ckpt's optimiser overrides the lr); another per-call value is used and said in one line.
    An --override of a key an option sets is refused (stage.json recorded the option)."""
    import headless_train.stage as stage

    started = []

    def fake_child(cmd, *a, **k):
        started.append(cmd)
        return 1, False, None  # no step taken: the stage stops after the checks and the launch

    monkeypatch.setattr(stage, "run_child", fake_child)
    root = make_dataset(str(tmp_path / "data"), ("s1",), views=3, size=16, n_points=50)
    work = tmp_path / "w"
    settings = {"world_up": "0,0,1", "lr": 1e-3, "minutes": 30.0, "gpus": 0, "batch": 4, "crop": 128, "views": 2,
                "workers": 1, "max_points": 5000, "gradient_weight": 0.5, "amp": True, "max_corpus_mib": 0.5,
                "override": ["datasets.color_jitter_prob=0"]}
    _resumable_run(work, settings)
    base = ["--corpus", root, "--work", str(work)]

    def launched(extra: list[str]) -> list[str]:
        with pytest.raises(stage.StageError, match="took no step"):
            stage.run_stage(stage.parse_args([*base, *extra]))
        return started[-1]

    cmd = launched([])
    for o in ("datasets.train_image_size=128", "system.lr=0.001", "dataloader.batch_size=4",
              "datasets.selection_count=2", "dataloader.num_workers=1", "system.max_points=5000",
              "loss.gradient_weight=0.5", "trainer.gpus=0", "trainer.max_minutes=33", "system.world_up=[0,0,1]",
              "resume=true"):
        assert o in cmd, o
    assert cmd[-1] == "datasets.color_jitter_prob=0"
    assert "changes" not in capsys.readouterr().err
    cmd = launched(["--crop", "64", "--batch", "2", "--no-amp", "--lr", "0.001", "--world-up", "+z",
                    "--override", "datasets.color_jitter_prob=0.5"])
    assert "datasets.train_image_size=64" in cmd and "dataloader.batch_size=2" in cmd
    assert cmd[-1] == "datasets.color_jitter_prob=0.5"
    err = capsys.readouterr().err
    assert ("stage: this resumed call changes --batch 4 -> --batch 2, --crop 128 -> --crop 64, --amp -> --no-amp, "
            "--override "
            "datasets.color_jitter_prob=0 -> --override datasets.color_jitter_prob=0.5; the run's other settings "
            "are kept") in err, err
    n = len(started)
    refused = [
        (["--lr", "2e-4"], "--lr 0.0002: this run was trained with --lr 0.001, which a resumed call keeps"),
        (["--world-up", "0,1,0"], "--world-up 0,1,0: this run was trained with --world-up 0,0,1"),
        (["--override", "system.lr=0.1"], "--override system.lr=0.1: system.lr is set by --lr"),
        (["--override", "+datasets.targets_per_sample=2"], "is set by --targets-per-sample"),
    ]
    for extra, message in refused:
        err = _refused_leaving_the_run_as_it_was(stage, [*base, *extra], work, capsys)
        assert message in err and "Traceback" not in err, err
    assert len(started) == n
    fresh = tmp_path / "fresh"  # the clash is refused on a first call too, before the folder is made
    assert stage.main(["--corpus", root, "--work", str(fresh), "--override", "datasets.train_image_size=64"]) == 2
    assert "is set by --crop" in capsys.readouterr().err and not fresh.exists()


def test_the_model_cards_stage_recipe_repeated_verbatim_resumes_without_a_change(tmp_path, capsys):
    """The model card's CPU recipe (read from MODEL_CARD.md), given again on every call as
    its runs did, with step 3's --lr 3e-4: the second call resumes, refuses nothing, says no
    change and no defaults note, and records the same settings as the first."""
    import re
    import shlex

    from headless_train.stage import main

    card = open(os.path.join(os.path.dirname(__file__), "..", "npbgpp_core", "weights", "MODEL_CARD.md"),
                encoding="utf-8").read()
    recipe = shlex.split(re.search(r"Recipe common to all stages:\s*`([^`]+)`", card).group(1))
    assert recipe[:4] == ["python", "-m", "headless_train", "stage"] and "--gpus" in recipe
    root = make_dataset(str(tmp_path / "data"), ("s1",), views=5, size=24, n_points=150)
    work = str(tmp_path / "stage")
    command = [*recipe[4:], "--corpus", root, "--work", work, "--minutes", "15", "--lr", "3e-4",
               "--dry-run", "--dry-steps", "1"]
    assert main(command) == 0
    capsys.readouterr()
    assert main(command) == 0
    err = capsys.readouterr().err
    assert "changes" not in err and "note:" not in err and "warning" not in err, err
    with open(os.path.join(work, "stage.json")) as f:
        calls = json.load(f)
    assert [(c["resumed"], c["start_step"]) for c in calls] == [(False, 0), (True, 1)]
    assert calls[1]["settings"] == calls[0]["settings"] and calls[0]["settings"]["crop"] == 128
    assert calls[0]["settings"]["override"] == ["datasets.point_cloud_variants=true"]


def test_a_gpu_run_resumed_on_a_cpu_machine_is_refused_early_naming_gpus(tmp_path, capsys, monkeypatch):
    """A GPU session's run resumed without --gpus on a machine without CUDA took --gpus 1
    from stage.json and failed only in the started trainer (a log tail naming trainer.gpus);
    now it is refused before anything runs or is written, naming --gpus, where the 1 came
    from and the way out; --gpus 0 given trains on the CPU, said as a change."""
    import headless_train.stage as stage

    started = []
    monkeypatch.setattr(stage, "run_child", lambda cmd, *a, **k: started.append(cmd) or (1, False, None))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this machine: no CUDA GPU
    root = make_dataset(str(tmp_path / "data"), ("s1",), views=3, size=16, n_points=50)
    work = tmp_path / "w"
    _resumable_run(work, {"gpus": 1, "workers": 8})
    base = ["--corpus", root, "--work", str(work)]
    err = _refused_leaving_the_run_as_it_was(stage, base, work, capsys)
    assert (f"--gpus 1 (the run's value, recorded by call 1 in {work / 'stage.json'}, as the flag was left out): this "
            "machine has no CUDA GPUs; give --gpus 0 to train on the CPU") in err, err
    assert not started
    assert stage.main([*base, "--gpus", "2"]) == 2
    assert "--gpus 2: this machine has no CUDA GPUs" in capsys.readouterr().err
    with pytest.raises(stage.StageError, match="took no step"):
        stage.run_stage(stage.parse_args([*base, "--gpus", "0"]))
    assert "trainer.gpus=0" in started[-1] and "--gpus 1 -> --gpus 0" in capsys.readouterr().err
    fresh = tmp_path / "fresh"  # a first call without the flag: the default, refused before the folder is made
    assert stage.main(["--corpus", root, "--work", str(fresh)]) == 2
    assert "--gpus 1 (the default, as the flag was left out)" in capsys.readouterr().err and not fresh.exists()
    old = tmp_path / "old"  # a dry run's record before 'settings' shows no --gpus: the default, said so
    _resumable_run(old, None)
    (old / "stage.json").write_text(json.dumps([{"end_step": 3, "dry_run": True, "overrides": ["trainer.gpus=0"]}]))
    assert stage.main(["--corpus", root, "--work", str(old)]) == 2
    assert "--gpus 1 (the default, as the flag was left out)" in capsys.readouterr().err
    assert len(started) == 1


def test_a_bad_recorded_value_is_refused_naming_the_runs_record_and_call(tmp_path, capsys, monkeypatch):
    """A value stage.json records that can never train (crop 0 written by hand or by an old
    version) was refused as '--crop 0: must be at least 1', as if given on the command line;
    now the message says it is the run's value and which call of which stage.json recorded
    it, before anything runs or is written. The same value given is refused without that note,
    and a good --crop given over the bad record passes the check."""
    import headless_train.stage as stage

    started = []
    monkeypatch.setattr(stage, "run_child", lambda cmd, *a, **k: started.append(cmd) or (1, False, None))
    root = make_dataset(str(tmp_path / "data"), ("s1",), views=3, size=16, n_points=50)
    work = tmp_path / "w"
    _resumable_run(work, {"gpus": 0, "crop": 0})
    calls = json.loads((work / "stage.json").read_text())
    (work / "stage.json").write_text(json.dumps([{**calls[0], "settings": {"gpus": 0, "crop": 64}}, *calls]))
    base = ["--corpus", root, "--work", str(work)]
    err = _refused_leaving_the_run_as_it_was(stage, base, work, capsys)
    assert (f"--crop 0 (the run's value, recorded by call 2 in {work / 'stage.json'}, as the flag was left out): "
            "must be at least 1") in err, err
    assert not started
    assert stage.main([*base, "--crop", "0"]) == 2
    err = capsys.readouterr().err
    assert "--crop 0: must be at least 1" in err and "recorded" not in err, err
    with pytest.raises(stage.StageError, match="took no step"):  # past every check: the fake trainer ran
        stage.run_stage(stage.parse_args([*base, "--crop", "32"]))
    assert "datasets.train_image_size=32" in started[-1]
    old = tmp_path / "old"  # a call recorded before 'settings': the crop its overrides show
    _resumable_run(old, None, ["datasets.train_image_size=0", "trainer.gpus=0"])
    assert stage.main(["--corpus", root, "--work", str(old)]) == 2
    assert (f"--crop 0 (the run's value, recorded by call 1 in {old / 'stage.json'}, as the flag was left out)"
            in capsys.readouterr().err)
    assert len(started) == 1


def test_a_resumed_stage_refuses_another_background_lr_scale_override(tmp_path, capsys, monkeypatch):
    """system.background_lr_scale sets the lr of a parameter group, which last.ckpt's
    optimiser restores over the config as it does --lr's: a resumed call that changed it (or
    dropped it with its other overrides) was said as a change and trained with the run's
    value. Now refused before anything runs; the same value, written otherwise, is kept."""
    import headless_train.stage as stage

    started = []
    monkeypatch.setattr(stage, "run_child", lambda cmd, *a, **k: started.append(cmd) or (1, False, None))
    root = make_dataset(str(tmp_path / "data"), ("s1",), views=3, size=16, n_points=50)
    work = tmp_path / "w"
    _resumable_run(work, {"gpus": 0, "override": ["datasets.point_cloud_variants=true",
                                                  "system.background_lr_scale=10"]})
    record = (work / "stage.json").read_text()
    base = ["--corpus", root, "--work", str(work)]
    for extra, message in (
            (["--override", "system.background_lr_scale=20"], "--override system.background_lr_scale=20: this run "
             "was trained with system.background_lr_scale=10, which a resumed call keeps"),
            (["--override", "datasets.point_cloud_variants=true"], "system.background_lr_scale=1: this run was "
             "trained with system.background_lr_scale=10")):  # dropped: the config's 1 asked for
        assert stage.main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "leave every --override out" in err and "Traceback" not in err, err
    assert not started and (work / "stage.json").read_text() == record
    with pytest.raises(stage.StageError, match="took no step"):
        stage.run_stage(stage.parse_args([*base, "--override", "system.background_lr_scale=10.0",
                                          "--override", "datasets.color_jitter_prob=0"]))
    assert started[-1][-2:] == ["system.background_lr_scale=10.0", "datasets.color_jitter_prob=0"]
    with pytest.raises(stage.StageError, match="took no step"):
        stage.run_stage(stage.parse_args(base))  # left out: the run's list
    assert started[-1][-2:] == ["datasets.point_cloud_variants=true", "system.background_lr_scale=10"]
    assert stage._override_value(["+system.background_lr_scale=3", "system.background_lr_scale=4"],
                                 "system.background_lr_scale", 1.0) == "4"


def test_recorded_settings_read_calls_recorded_before_the_settings_key(tmp_path, capsys, monkeypatch):
    """stage.json calls written before ``settings``: the options are read back from the call's
    overrides (a dry run's tiny crop, batch, workers and GPUs are not the options'); what
    cannot be read takes the default, said in a note."""
    import argparse

    import headless_train.stage as stage

    real = argparse.Namespace(gpus=1, dry_run=False, crop=128, corpus=".", views=2, targets_per_sample=1, lr=1e-3,
                              max_points=5000, world_up="0,1,0", amp=False, batch=4, workers=2, minutes=30.0,
                              gradient_weight=0.5, input_canvas="square", background="none", warmup_steps=0,
                              max_corpus_mib=100.0, override=["datasets.color_jitter_prob=0"])
    overrides = stage.train_overrides(real, "run", "seed.ckpt", False, 10)
    got, missing = stage.recorded_settings({"overrides": overrides})
    assert missing == ["max_corpus_mib"]  # not in the overrides
    assert got == {k: getattr(real, k) for k in stage.CARRIED if k != "max_corpus_mib"}
    dry = vars(real) | {"dry_run": True, "minutes": 8.0}
    got, missing = stage.recorded_settings({"overrides": stage.train_overrides(argparse.Namespace(**dry), "run",
                                                                               None, True, 10), "dry_run": True})
    assert sorted(missing) == ["amp", "batch", "crop", "gpus", "max_corpus_mib", "workers"] and got["minutes"] == 8.0
    assert got["override"] == ["datasets.color_jitter_prob=0"] and got["lr"] == 1e-3
    with pytest.raises(stage.StageError, match="records --crop 'big'"):
        stage.recorded_settings({"settings": {"crop": "big"}})
    # resumed from a run whose record predates the settings: the defaults, with a note
    monkeypatch.setattr(stage, "run_child", lambda cmd, *a, **k: (1, False, None))
    root = make_dataset(str(tmp_path / "data"), ("s1",), views=3, size=16, n_points=50)
    work = tmp_path / "w"
    _resumable_run(work, None, ["system.lr=0.001"])
    with pytest.raises(stage.StageError, match="took no step"):
        stage.run_stage(stage.parse_args(["--corpus", root, "--work", str(work), "--gpus", "0"]))  # no CUDA needed
    err = capsys.readouterr().err
    assert "was recorded before these settings were, so this resumed call uses the defaults --minutes 8" in err, err
    assert "--lr" not in err.split("note:")[1]  # read from the record


def test_scene_discovery_skips_folders_a_renderer_is_still_writing(tmp_path):
    from headless_train.data import DataConfigError, discover_scene_dirs

    for name in ("env_1", "env_2.partial", "env_3.partial-123", ".hidden"):
        (tmp_path / name).mkdir()
    assert discover_scene_dirs({"data_root": str(tmp_path)}) == [("env_1", str(tmp_path / "env_1"))]
    (tmp_path / "env_1").rmdir()
    with pytest.raises(DataConfigError, match="no scene folders"):
        discover_scene_dirs({"data_root": str(tmp_path)})


# ------------------------------------------------------- evaluation's input views
def test_evaluation_aggregates_input_views_at_input_view_max_side(tmp_path):
    """NPBG++ evaluation aggregates its input views shrunk to datasets.input_view_max_side,
    as training and ``export --max-side`` do, not at full resolution."""
    from omegaconf import OmegaConf

    from headless_train.data import SceneDataModule
    from headless_train.systems import build_system

    root = make_dataset(str(tmp_path / "data"), views=6, size=32, n_points=300)
    base = ["datasets=nerf_blender_pretrain", f"datasets.data_root={root}", "datasets.train_image_size=16",
            "datasets.train_num_samples=2", "dataloader=small", f"system.descriptors_save_dir={tmp_path}/d"]

    def evaluated(extra: list[str]):
        cfg = _compose([*base, *extra])
        system = build_system(OmegaConf.to_container(cfg, resolve=True), SceneDataModule(cfg, seed=0).scenes)
        system.eval()
        system.prepare_eval(0)
        return system, system._eval_cache[0]

    system, shrunk = evaluated(["datasets.input_view_max_side=16"])
    _, full = evaluated([])
    # reference: the same network fed the 32x32 views resized by hand to 16x16 (intrinsics halved)
    scene = system.scenes[0]
    state = system.model.begin_scene(system.points(0))
    with torch.no_grad():
        for i in system.eval_views(0):
            assert tuple(scene.views[i].camera.image_size) == (32, 32)
            state.add_views(scene.load_image(i, (16, 16)).unsqueeze(0), [scene.camera(i, (16, 16))])
        expected = state.finish()
    assert torch.equal(shrunk.valid, expected.valid)
    assert torch.allclose(shrunk.coefficients, expected.coefficients, atol=1e-5)
    # and it is not what the full-resolution views give (the option changes the evaluation)
    both = full.valid & expected.valid
    assert not torch.allclose(full.coefficients[both], expected.coefficients[both], atol=1e-3)
