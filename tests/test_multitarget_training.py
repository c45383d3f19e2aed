"""Several target views per set of input views in NPBG++ training
(``datasets.targets_per_sample``): k = 1 samples are the samples drawn before the option
existed; extra targets are other training views cropped where the anchor crop's points
are, with exact cameras; the batched step, the per-sample step and a hand-computed mean
over targets agree; bad values are refused by name."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from _train_fixtures import assert_same_gradients, make_tiny_scene, sphere_colors, sphere_points
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from npbgpp_core.datasets import sample_crop, select_input_views

SIZE = 48  # the ring scene's images
CROP = 16


def _turn_away(folder: str, frame: int) -> None:
    """Turn training camera ``frame`` of a tiny scene by 180 degrees about its up axis: it
    looks away from the sphere, so it sees none of the points."""
    path = os.path.join(folder, "transforms_train.json")
    with open(path) as f:
        meta = json.load(f)
    c2w = np.array(meta["frames"][frame]["transform_matrix"]) @ np.diag([-1.0, 1.0, -1.0, 1.0])
    meta["frames"][frame]["transform_matrix"] = c2w.tolist()
    with open(path, "w") as f:
        json.dump(meta, f)


@pytest.fixture(scope="module")
def ring_root(tmp_path_factory) -> str:
    """One scene of 12 views on a ring (10 training views, view 9 looking away)."""
    root = str(tmp_path_factory.mktemp("ring"))
    make_tiny_scene(os.path.join(root, "ring"), views=12, size=SIZE, n_points=400, splits=(10, 1, 1))
    _turn_away(os.path.join(root, "ring"), 9)
    return root


def _cfg(root: str, extra: list[str], system: str = "npbgpp_sphere"):
    up = [] if system == "npbg" else ["system.world_up=[0,1,0]"]
    with initialize_config_module("headless_train.conf", version_base="1.3"):
        return compose("config", overrides=[
            f"system={system}", "datasets=nerf_blender_pretrain", f"datasets.data_root={root}",
            "datasets.train_num_samples=6", f"datasets.train_image_size={CROP}", "dataloader=small",
            "system.descriptors_save_dir=/nonexistent/d", *up, *extra])


def _samples(root: str, extra: list[str], system: str = "npbgpp_sphere"):
    from headless_train.data import SceneDataModule

    dm = SceneDataModule(_cfg(root, extra, system), seed=3407)
    return dm, dm.train_dataloader().dataset


def _before(ds, i: int) -> dict:
    """Sample ``i`` drawn as TrainSamples drew it before targets_per_sample: the same
    generator, the same draws in the same order (target, crop, input views, jitter)."""
    from headless_train.data import color_jitter, crop_input_views

    scene = ds.scenes[ds.active[i // ds.num_samples]]
    rng = np.random.default_rng([ds.seed, i])
    target = int(scene.train[int(rng.integers(len(scene.train)))])
    image, _, camera = sample_crop(scene, target, rng, image_size=ds.opts.image_size,
                                   zoom_range=ds.opts.zoom_range, random_shift=ds.opts.random_shift)
    chosen = [int(c) for c in select_input_views(scene, target, [int(t) for t in scene.train if int(t) != target],
                                                 ds.opts.selection_count, rng)]
    inputs, cams = crop_input_views(scene, chosen, camera, torch.from_numpy(scene.points), None)
    images = color_jitter([image, *inputs], rng, ds.opts.jitter_prob)
    return {"view": target, "inputs": chosen, "image": images[0], "input_images": images[1:], "camera": camera,
            "input_cameras": cams}


def _same_anchor(sample: dict, ref: dict) -> None:
    assert sample["view"] == ref["view"]
    assert torch.equal(sample["image"], ref["image"])
    assert sample["camera"].image_size == ref["camera"].image_size
    assert torch.equal(sample["camera"].K, ref["camera"].K)
    assert len(sample["input_images"]) == len(ref["input_images"])
    for a, b in zip(sample["input_images"], ref["input_images"], strict=True):
        assert torch.equal(a, b)
    for a, b in zip(sample["input_cameras"], ref["input_cameras"], strict=True):
        assert torch.equal(a.K, b.K) and torch.equal(a.R, b.R) and torch.equal(a.t, b.t)


def test_one_target_per_sample_draws_the_samples_of_before(ring_root):
    """k = 1 (the default) gives exactly the samples drawn before the option; k = 3 gives the
    same anchor target, input views and jitter, plus its extra targets."""
    _, ds1 = _samples(ring_root, [])
    _, ds3 = _samples(ring_root, ["datasets.targets_per_sample=3"])
    assert ds1.opts.targets_per_sample == 1 and ds1.opts.jitter_prob > 0  # the jitter is drawn and applied
    extras = []
    for i in range(len(ds1)):
        ref = _before(ds1, i)
        one, three = ds1[i], ds3[i]
        assert "extra_targets" not in one
        _same_anchor(one, ref)
        _same_anchor(three, ref)
        extras.append(len(three["extra_targets"]))
    assert max(extras) == 2  # (a sample whose anchor has no other view within 90 degrees has none)


def _pixel_error(image: torch.Tensor, camera, shift: float = 0.0) -> float:
    """Median colour error between the crop's pixels and the colours of the sphere points
    that ``camera`` (its principal point moved by ``shift`` px) projects onto them: the
    tiny scene's images are renders of exactly those colours."""
    pts = sphere_points(20000, 1)  # the dense cloud the images were rendered from (seed 0 + 1)
    centre = camera.center().double().numpy()
    to_eye = centre[None] - pts
    facing = (pts * to_eye).sum(1) > 0.8 * np.linalg.norm(to_eye, axis=1)  # well inside the silhouette
    pts = pts[facing]
    uv, depth = camera.project(torch.from_numpy(pts))
    uv = uv.double().numpy() + shift
    h, w = camera.image_size
    inside = (depth.numpy() > 0) & (uv[:, 0] >= 0.5) & (uv[:, 0] < w - 1.5) & (uv[:, 1] >= 0.5) & (uv[:, 1] < h - 1.5)
    assert inside.sum() > 20, "the crop shows too little of the sphere to test"
    px = np.rint(uv[inside]).astype(int)
    found = image[:, px[:, 1], px[:, 0]].T.numpy()
    return float(np.median(np.abs(found - sphere_colors(pts[inside])).max(1)))


def test_extra_targets_are_other_training_views_cropped_where_the_anchor_points_are(ring_root):
    _, ds = _samples(ring_root, ["datasets.targets_per_sample=4", "datasets.color_jitter_prob=0",
                                 "datasets.train_random_zoom=[0.75,1.0]"])
    scene = ds.scenes[0]
    points = torch.from_numpy(scene.points)
    errors, shifted, counts, shares = [], [], [], []
    for i in range(len(ds)):
        sample, ref = ds[i], _before(ds, i)
        extras = sample["extra_targets"]
        views = [e["view"] for e in extras]
        counts.append(len(views))
        assert len(set(views)) == len(views) and set(views) <= {int(v) for v in scene.train}
        assert not set(views) & {ref["view"], *ref["inputs"]}
        assert 9 not in views  # the view that looks away sees none of the anchor's points
        anchor = sample["camera"]
        uv, depth = anchor.project(points)
        h, w = anchor.image_size
        in_anchor = (depth > 0) & (uv[:, 0] >= -0.5) & (uv[:, 0] < w - 0.5) & (uv[:, 1] >= -0.5) & (uv[:, 1] < h - 0.5)
        # what the anchor crop sees of the (convex, unit) sphere: the points facing its camera
        in_anchor &= ((anchor.center()[None] - points) * points).sum(1) > 0
        for extra in extras:
            cam = extra["camera"]
            assert extra["image"].shape == (3, CROP, CROP) and cam.image_size == (CROP, CROP)
            assert extra["mask"].shape == (1, CROP, CROP) and bool((extra["mask"] == 1).all())
            # the same zoom as the anchor crop (the ring's views share one focal length)
            assert cam.intrinsics().fx == pytest.approx(anchor.intrinsics().fx, rel=0.05)
            uv, depth = cam.project(points[in_anchor])
            seen = (depth > 0) & (uv[:, 0] >= -0.5) & (uv[:, 0] < CROP - 0.5) & (uv[:, 1] >= -0.5)
            seen &= uv[:, 1] < CROP - 0.5
            shares.append(float(seen.float().mean()))
            errors.append(_pixel_error(extra["image"], cam))
            shifted.append(_pixel_error(extra["image"], cam, shift=2.0))
    assert max(counts) >= 2 and sum(counts) >= len(ds)
    assert min(shares) > 0.3 and np.median(shares) > 0.6, shares  # they show the anchor crop's points
    assert max(errors) < 0.05, (errors, shifted)  # each pixel shows the colour of the points its camera projects there
    assert np.median(shifted) > 3 * np.median(errors), (errors, shifted)  # a camera 2 px off would be seen


def test_extra_targets_crop_their_object_mask_at_their_window(ring_root):
    """With ``datasets.loss_on_object_mask`` an extra target's mask is its view's alpha cropped
    where its image is: 1 where the dense sphere the images were rendered from projects
    through the extra camera, 0 elsewhere (a mask cropped at another window disagrees along
    the silhouette, one left all ones wherever the crop shows background)."""
    _, ds = _samples(ring_root, ["datasets.targets_per_sample=3", "datasets.loss_on_object_mask=true"])
    dense = torch.from_numpy(sphere_points(20000, 1))
    agree, partial = [], 0
    for i in range(len(ds)):
        for extra in ds[i]["extra_targets"]:
            cam = extra["camera"]
            h, w = cam.image_size
            uv, depth = cam.project(dense)
            px = torch.round(uv).long()
            hit = (depth > 0) & (px[:, 0] >= 0) & (px[:, 0] < w) & (px[:, 1] >= 0) & (px[:, 1] < h)
            covered = torch.zeros(h, w, dtype=torch.bool)
            covered[px[hit, 1], px[hit, 0]] = True
            assert extra["mask"].shape == (1, h, w)
            agree.append(float(((extra["mask"][0] > 0.5) == covered).float().mean()))
            partial += int(0 < float(extra["mask"].mean()) < 1)
    assert partial >= 3 and min(agree) > 0.9, agree


def test_few_training_views_give_fewer_extra_targets(tmp_path):
    """4 training views and 3 input views leave no other view: samples without extras, no error;
    with 2 input views at most the one view left."""
    root = str(tmp_path / "few")
    make_tiny_scene(os.path.join(root, "s"), views=12, size=32, n_points=200)  # training views 30 degrees apart
    _, ds = _samples(root, ["datasets.targets_per_sample=3"])
    assert all(ds[i]["extra_targets"] == [] for i in range(len(ds)))
    _, ds = _samples(root, ["datasets.targets_per_sample=3", "datasets.selection_count=2"])
    counts = [len(ds[i]["extra_targets"]) for i in range(len(ds))]
    assert max(counts) == 1  # the one view left, when it sees the anchor's points within 90 degrees


def test_samples_are_a_function_of_seed_epoch_and_index(ring_root):
    _, a = _samples(ring_root, ["datasets.targets_per_sample=3"])
    _, b = _samples(ring_root, ["datasets.targets_per_sample=3"])
    b.set_epoch(1)
    assert any(not torch.equal(a[i]["image"], b[i]["image"]) for i in range(len(a)))
    b.set_epoch(0)
    for i in (4, 0, 5):
        x, y = a[i], b[i]
        assert [e["view"] for e in x["extra_targets"]] == [e["view"] for e in y["extra_targets"]]
        for e, f in zip(x["extra_targets"], y["extra_targets"], strict=True):
            assert torch.equal(e["image"], f["image"]) and torch.equal(e["camera"].K, f["camera"].K)


def _system(root: str, extra: list[str], system: str = "npbgpp_sphere"):
    from headless_train.systems import build_system

    dm, ds = _samples(root, extra, system)
    cfg = OmegaConf.to_container(_cfg(root, extra, system), resolve=True)
    torch.manual_seed(0)
    return build_system(cfg, dm.scenes), ds


def test_batched_and_per_sample_steps_give_the_mean_over_every_target(ring_root):
    """With two targets per sample the batched step (one aggregate per sample rendered for
    both targets), the per-sample step and the mean of the two one-target losses agree, and
    so do the gradients of the two steps."""
    system, ds = _system(ring_root, ["datasets.targets_per_sample=2", "loss.aux_drop_prob=0",
                                     "datasets.color_jitter_prob=0"])
    batch = [ds[0], ds[3]]
    assert all(len(s["extra_targets"]) == 1 for s in batch)
    params = [p for p in system.model.parameters() if p.requires_grad]
    results = []
    for batched in (True, False):
        system.scfg["batched_step"] = batched
        loss, parts = system.batch_loss(batch)
        results.append((loss, parts, torch.autograd.grad(loss, params, allow_unused=True)))
    (loss_b, parts_b, grads_b), (loss_s, parts_s, grads_s) = results
    torch.testing.assert_close(loss_b, loss_s, atol=1e-4, rtol=1e-5)
    for key in ("render", "aux"):
        torch.testing.assert_close(parts_b[key], parts_s[key], atol=1e-5, rtol=1e-5)
    assert_same_gradients(grads_b, grads_s, len(params), rtol=2e-3)
    # by hand: each target as the only target of its sample, one loss per target, their mean
    with torch.no_grad():
        singles = []
        for s in batch:
            alone = {k: v for k, v in s.items() if k != "extra_targets"}
            singles.append(system.sample_loss(alone)[0])
            for e in s["extra_targets"]:
                singles.append(system.sample_loss(dict(alone, image=e["image"], mask=e["mask"],
                                                       camera=e["camera"]))[0])
    torch.testing.assert_close(loss_b.detach(), torch.stack(singles).mean(), atol=1e-4, rtol=1e-5)
    # samples of different target counts (a scene with few views) weigh by their targets
    system.scfg["batched_step"] = True
    uneven = [batch[0], dict(batch[1], extra_targets=[])]
    with torch.no_grad():
        loss_u = system.batch_loss(uneven)[0]
        system.scfg["batched_step"] = False
        torch.testing.assert_close(system.batch_loss(uneven)[0], loss_u, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(loss_u, torch.stack(singles[:3]).mean(), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("value", ["0", "-1", "1.5", "abc"])
def test_bad_targets_per_sample_values_are_refused_by_name(ring_root, value):
    from headless_train.data import DataConfigError

    with pytest.raises(DataConfigError, match="datasets.targets_per_sample"):
        _samples(ring_root, [f"datasets.targets_per_sample={value}"])


def test_targets_per_sample_needs_crops_input_views_and_npbgpp(ring_root):
    from headless_train.data import DataConfigError

    for extra in (["datasets.train_image_size=null"], ["datasets.selection_count=0"]):
        with pytest.raises(DataConfigError, match="targets_per_sample=2 .*needs datasets.train_image_size"):
            _samples(ring_root, ["datasets.targets_per_sample=2", *extra])
    _samples(ring_root, ["datasets.targets_per_sample=1", "datasets.selection_count=0"])  # NPBG's default: fine
    for system in ("npbg", "coefficients_ft"):
        with pytest.raises(ValueError, match=f"targets_per_sample=2: .*system={system} trains one target"):
            _system(ring_root, ["datasets.targets_per_sample=2"], system)


def test_stage_passes_targets_per_sample_to_the_trainer():
    from headless_train.stage import parse_args, train_overrides

    args = parse_args(["--corpus", "c", "--work", "w", "--targets-per-sample", "3"])
    assert "datasets.targets_per_sample=3" in train_overrides(args, "run", None, False, 10)
    assert parse_args(["--corpus", "c", "--work", "w"]).targets_per_sample is None  # resolved by the stage
    limit = next(o for o in train_overrides(args, "run", None, False, 10) if o.startswith("trainer.max_minutes="))
    assert math.isfinite(float(limit.split("=")[1]))  # --minutes left out: the first-call default, 8 (+ margin)


def test_stage_targets_per_sample_keeps_the_runs_own(capsys):
    """--targets-per-sample follows the one rule of the stage's CARRIED options: a first call
    takes the flag or 1; a resumed call the value its last recorded call trained with (read
    also from calls recorded before it joined ``settings`` and before the option, which
    trained one target) and refuses another value; with no recorded call, one note names
    the default it uses (there were two messages: the defaults note and a warning)."""
    from headless_train.stage import StageError, parse_args, recorded_settings, stage_settings

    def chosen(flag: list[str], resume: bool, calls: list[dict]) -> int:
        args = parse_args(["--corpus", "c", "--work", "w", *flag])
        stage_settings(args, resume, calls, None, "h", "w")
        return args.targets_per_sample

    assert chosen([], False, []) == 1
    assert chosen(["--targets-per-sample", "4"], False, [{"settings": {"targets_per_sample": 2}}]) == 4  # a new run
    two = [{"settings": {"targets_per_sample": 1}}, {"settings": {"targets_per_sample": 2}}]
    assert chosen([], True, two) == 2
    assert chosen(["--targets-per-sample", "2"], True, two) == 2  # the same value, as a repeated command gives it
    with pytest.raises(StageError, match=r"--targets-per-sample 1: this run was trained with --targets-per-sample 2, "
                                         r"which a resumed call keeps .*--weights w/npbgpp_sphere_stage.safetensors"):
        chosen(["--targets-per-sample", "1"], True, two)

    def recorded(call: dict) -> int:
        return recorded_settings(call)[0]["targets_per_sample"]

    assert recorded({"settings": {"lr": 0.1}, "targets_per_sample": 3}) == 3  # beside settings, before it joined
    assert recorded({"targets_per_sample": 3, "overrides": ["datasets.targets_per_sample=2"]}) == 3
    legacy = {"overrides": ["datasets.selection_count=3", "datasets.targets_per_sample=3", "system.lr=0.1"]}
    assert recorded(legacy) == 3
    assert recorded({"overrides": ["system.lr=0.1"]}) == 1 and recorded({"settings": {}}) == 1  # before the option
    with pytest.raises(StageError, match="records --targets-per-sample 'two'"):
        recorded({"settings": {"targets_per_sample": "two"}})
    capsys.readouterr()
    assert chosen([], True, []) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("note: h records no call of the run, so this resumed call uses "
                                                    "the defaults") and "--targets-per-sample 1," in err, err
    assert chosen(["--targets-per-sample", "5"], True, []) == 5
    assert "targets-per-sample" not in capsys.readouterr().err  # given: nothing to say


# one process of a 2-process gloo group: a DDP-wrapped Linear (seeded, the same on both) trains
# on rows 0..split-1 (rank 0) or split.. (rank 1) of seeded rows, the loss the mean over its own
# rows times distributed_loss_scale, as training_step scales it; rank 0 saves the gradients
_DDP_CHILD = """
import os, sys, torch, torch.distributed as dist
from headless_train.systems.base import distributed_loss_scale
rank, store, out, split = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
torch.manual_seed(0)
model = torch.nn.Linear(3, 2)
ddp = torch.nn.parallel.DistributedDataParallel(model)
rows = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
mine = rows[:split] if rank == 0 else rows[split:]
loss = ddp(mine).pow(2).mean(dim=1).mean()
(loss * distributed_loss_scale(len(mine), "cpu")).backward()
if rank == 0:
    torch.save([model.weight.grad, model.bias.grad], out)
# gloo's teardown races between the two processes: destroy_process_group (even after a
# barrier) aborted one of them with std::terminate in about 1 run of 15 here. After the
# barrier both have their gradients and rank 0's file is closed, so leave without teardown.
dist.barrier()
os._exit(0)
"""


def test_process_loss_scales_make_the_average_of_process_means_the_mean_over_every_target():
    """DDP averages the processes' gradients; each process's loss is the mean over its own
    targets. Scaled by process_loss_scale, the average of the processes' losses (and so of
    their gradients, which are linear in them) is the mean over every target: hand-made
    per-target losses on 3 processes with 1, 4 and 2 targets. Alone, the scale is 1."""
    from headless_train.systems.base import distributed_loss_scale, process_loss_scale

    per_target = [[0.9], [0.1, 0.2, 0.3, 0.4], [0.5, 0.7]]
    world, everyone = len(per_target), [v for ts in per_target for v in ts]
    means = [sum(ts) / len(ts) for ts in per_target]
    averaged = sum(process_loss_scale(len(ts), len(everyone), world) * m
                   for ts, m in zip(per_target, means, strict=True)) / world
    assert math.isclose(averaged, sum(everyone) / len(everyone), rel_tol=1e-12)  # 0.4428...
    assert not math.isclose(sum(means) / world, averaged, rel_tol=1e-3)  # unscaled: 0.5, the bias fixed
    assert process_loss_scale(3, 6, 2) == 1.0  # equal counts: DDP's average was already the mean
    assert distributed_loss_scale(4, "cpu") == 1.0  # no process group: one process, nothing to scale


def test_training_step_backpropagates_the_loss_times_the_process_scale(ring_root, monkeypatch):
    """training_step backpropagates its batch's mean loss times distributed_loss_scale of the
    batch's target count (a sample with an extra target counts 2, one with none 1), the loss
    that DDP's gradient average needs; it logs and returns the unscaled mean. The scale is a
    stand-in here (3.0, recording the count it is asked about): the gloo test checks its value."""
    import headless_train.systems.base as base

    system, ds = _system(ring_root, ["datasets.targets_per_sample=2", "loss.aux_drop_prob=0",
                                     "datasets.color_jitter_prob=0"])
    batch = [ds[0], dict(ds[3], extra_targets=[])]
    asked, backward, logged = [], [], {}

    class Optimiser:
        def zero_grad(self) -> None:
            pass

        def step(self) -> None:
            pass

    monkeypatch.setattr(base, "distributed_loss_scale", lambda count, device: asked.append(count) or 3.0)
    monkeypatch.setattr(system, "manual_backward", backward.append)
    monkeypatch.setattr(system, "optimizer_list", lambda: [Optimiser()])
    monkeypatch.setattr(system, "scheduler_list", list)
    monkeypatch.setattr(system, "log", lambda name, value, **_: logged.setdefault(name, value))
    returned = system.training_step(batch, 0)
    assert asked == [3]
    assert len(backward) == 1 and backward[0].requires_grad
    torch.testing.assert_close(backward[0].detach(), 3.0 * returned)
    torch.testing.assert_close(logged["train/loss"], returned)


@pytest.mark.slow
def test_two_process_gloo_gradients_are_those_of_the_mean_over_every_target(tmp_path):
    """A real 2-process DDP group on the CPU (gloo): with 1 and 4 targets on the two processes,
    the synchronised gradient of the scaled per-process means equals the single-process
    gradient of the mean over all 5 targets (brute force here), which the unscaled average
    of the two means does not give."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS="1")
    out, store = tmp_path / "grads.pt", tmp_path / "store"
    procs = [subprocess.Popen([sys.executable, "-c", _DDP_CHILD, str(rank), str(store), str(out), "1"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    synced = torch.load(out, weights_only=True)

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    rows = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    per_target = model(rows).pow(2).mean(dim=1)
    reference = torch.autograd.grad(per_target.mean(), [model.weight, model.bias], retain_graph=True)
    unscaled = torch.autograd.grad((per_target[:1].mean() + per_target[1:].mean()) / 2, [model.weight, model.bias])
    for got, want, biased in zip(synced, reference, unscaled, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        assert not torch.allclose(biased, want, rtol=1e-3)
