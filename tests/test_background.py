"""The 'environment' background of NPBG++ (npbgpp_core.models.background): the map's
geometry against hand-computed directions, the splat / lookup / push-pull fill, the
aggregation of a known world, order independence of the streaming sums, the refiner's
zero-initialised projections, widening old weights and training with the option."""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

from npbgpp_core.camera import Camera
from npbgpp_core.models import NPBGPlusPlus, Refiner
from npbgpp_core.models.background import (
    BackgroundSums,
    background_rasters,
    lookup,
    map_frame,
    pixel_directions,
    push_pull,
)

UP_Z = (0.0, 0.0, 1.0)


def bin_direction(r: int, c: int, rows: int, frame) -> torch.Tensor:
    """Unit direction of bin (r, c)'s centre, from the documented angles."""
    polar = (r + 0.5) * math.pi / rows
    lon = -math.pi + (c + 0.5) * 2 * math.pi / (2 * rows)
    ref, side, up = (torch.tensor(v, dtype=torch.float32) for v in frame)
    return math.sin(polar) * (math.cos(lon) * ref + math.sin(lon) * side) + math.cos(polar) * up


def test_map_frame_is_the_documented_axes():
    assert torch.allclose(torch.tensor(map_frame(UP_Z)), torch.eye(3, dtype=torch.float64))
    # +Y up: reference +X, side = up x reference = -Z.
    expect = torch.tensor([[1.0, 0, 0], [0, 0, -1.0], [0, 1.0, 0]], dtype=torch.float64)
    assert torch.allclose(torch.tensor(map_frame((0, 1, 0))), expect)


@pytest.mark.parametrize("up", [UP_Z, (0.0, 1.0, 0.0), (0.3, -0.5, 0.8)])
def test_lookup_at_a_bin_centre_reads_that_bin(up):
    torch.manual_seed(0)
    rows = 8
    frame = map_frame(up)
    bg = torch.randn(5, rows, 2 * rows)
    for r, c in [(0, 0), (3, 7), (7, 15), (4, 0), (2, 15)]:
        got = lookup(bg, bin_direction(r, c, rows, frame)[None], up)[0]
        torch.testing.assert_close(got, bg[:, r, c], atol=2e-5, rtol=0)


def test_lookup_wraps_around_in_longitude_and_interpolates_between_bins():
    rows = 4
    bg = torch.zeros(1, rows, 2 * rows)
    bg[0, 1, 0], bg[0, 1, 7] = 2.0, 6.0
    frame = map_frame(UP_Z)
    polar = 1.5 * math.pi / rows  # row 1's centre
    # Longitude -pi (= +pi) lies half way between the last column and the first.
    d = torch.tensor([[-math.sin(polar), 0.0, math.cos(polar)]])
    torch.testing.assert_close(lookup(bg, d, UP_Z), torch.tensor([[4.0]]), atol=1e-5, rtol=0)
    # A quarter of a bin past column 0's centre: 3/4 of column 0, 1/4 of column 1 (0).
    lon = -math.pi + 0.75 * 2 * math.pi / 8
    d = math.sin(polar) * (math.cos(lon) * torch.tensor(frame[0]) + math.sin(lon) * torch.tensor(frame[1])) \
        + math.cos(polar) * torch.tensor(frame[2])
    torch.testing.assert_close(lookup(bg, d[None].float(), UP_Z), torch.tensor([[1.5]]), atol=1e-5, rtol=0)


def test_splat_is_the_adjoint_of_the_lookup_with_wrap():
    """Splatting weight w at a direction puts into each bin exactly the weight the lookup
    at that direction gives the bin (checked at the wrap seam and elsewhere)."""
    rows = 4
    for r, c, dr, dc in [(1, 7, 0.0, 0.5), (2, 3, 0.25, -0.3), (0, 0, -0.4, -0.5)]:
        polar = (r + 0.5 + dr) * math.pi / rows
        lon = -math.pi + (c + 0.5 + dc) * 2 * math.pi / (2 * rows)
        d = torch.tensor([[math.sin(polar) * math.cos(lon), math.sin(polar) * math.sin(lon), math.cos(polar)]])
        sums = BackgroundSums(1, rows, UP_Z, torch.device("cpu"))
        sums.add(torch.ones(1, 1), d)
        weights = sums.sum_w.view(rows, 2 * rows)
        assert abs(float(weights.sum()) - 1.0) < 1e-6
        eye = torch.eye(rows * 2 * rows).view(-1, rows, 2 * rows)  # one map per bin
        looked = torch.stack([lookup(e[None], d, UP_Z)[0, 0] for e in eye]).view(rows, 2 * rows)
        torch.testing.assert_close(weights, looked, atol=1e-6, rtol=0)
    assert weights[0, 0] > 0 and weights[0, 7] > 0  # the last case splits across the seam


def test_push_pull_keeps_observations_and_fills_between_them():
    rows, cols = 8, 16
    v = torch.zeros(2, rows, cols)
    w = torch.zeros(rows, cols)
    v[:, 2, 3], w[2, 3] = torch.tensor([1.0, -1.0]) * 0.5, 0.5
    v[:, 5, 12], w[5, 12] = torch.tensor([3.0, 2.0]) * 2.0, 2.0
    out = push_pull(v, w)
    torch.testing.assert_close(out[:, 2, 3], torch.tensor([1.0, -1.0]))
    torch.testing.assert_close(out[:, 5, 12], torch.tensor([3.0, 2.0]))
    assert bool(torch.isfinite(out).all())
    assert float(out[0].min()) >= 1.0 - 1e-6 and float(out[0].max()) <= 3.0 + 1e-6  # convex blends
    assert len(torch.unique(out[0].round(decimals=4))) > 4  # not a constant fill
    # One observation: that value everywhere; none: zeros.
    one = push_pull(v * (w == 0.5), w * (w == 0.5))
    torch.testing.assert_close(one[0], torch.full((rows, cols), 1.0))
    assert bool((push_pull(torch.zeros(2, rows, cols), torch.zeros(rows, cols)) == 0).all())


def test_pixel_directions_are_the_rays_through_pixel_centres():
    cam = Camera.look_at((1.0, -2.0, 0.7), (0.1, 0.2, 0.0), up=UP_Z, fov_x_deg=60, image_size=(48, 64))
    h, w = 6, 8
    dirs = pixel_directions(cam, (h, w)).view(h, w, 3)
    for i, j in [(0, 0), (3, 5), (5, 7)]:
        u, v = (j + 0.5) * 64 / w - 0.5, (i + 0.5) * 48 / h - 0.5  # pixel areas map exactly
        p = cam.unproject_pixels(torch.tensor([[u, v]], dtype=torch.float32), torch.tensor([2.0]))[0]
        ref = (p - cam.center()) / (p - cam.center()).norm()
        torch.testing.assert_close(dirs[i, j], ref, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ aggregation
class PointwiseExtractor(nn.Module):
    """Features = a fixed linear map of each pixel's RGB (no spatial mixing)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(-1, 1, channels * 3).view(channels, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.einsum("ck,bkhw->bchw", self.weight, images)

    def forward_many(self, images, channels_last: bool = False):
        return [self.forward(im[None])[0] for im in images]


def ring_cameras(n: int, size=(64, 96)) -> list[Camera]:
    return [Camera.look_at((3 * math.cos(a), 3 * math.sin(a), 0.4 * (k % 2)), (0, 0, 0), up=UP_Z, fov_x_deg=60,
                           image_size=size) for k, a in enumerate(2 * math.pi * k / n for k in range(n))]


def ball(n: int, radius: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(n, 3, generator=g)
    return p / p.norm(dim=1, keepdim=True) * radius * torch.rand(n, 1, generator=g) ** (1 / 3)


def env_model(**cfg) -> NPBGPlusPlus:
    torch.manual_seed(0)
    return NPBGPlusPlus({"background": "environment", "world_up": list(UP_Z), "background_rows": 8, **cfg}).eval()


def from_weights_file(model: NPBGPlusPlus, folder) -> NPBGPlusPlus:
    """``model`` as the fits receive it: read back from an (fp32, exact) weights file, so that
    its encoder counts as loaded (the perceptual loss refuses one never read from a file)."""
    from npbgpp_core.pretrained import load_pretrained_npbgpp, save_weights

    path = os.path.join(str(folder), "model.safetensors")
    save_weights(path, model.state_dict(), "npbgpp", model.config.to_dict(), {}, fp16=False)
    return load_pretrained_npbgpp(path)


def test_uniform_world_gives_its_features_everywhere_and_objects_do_not_leak():
    """Views of an object (red, where its cloud lands) in a uniform blue world: the map
    holds the blue's features in every bin (observed or filled), confidence 1 where seen."""
    from npbgpp_core.rasterizer import rasterize

    model = env_model(input_canvas="bounds")
    model.extractor = PointwiseExtractor(8)
    points = ball(4000, 0.5)
    cams = ring_cameras(6)
    blue, red = torch.tensor([0.1, 0.3, 0.9]), torch.tensor([1.0, 0.0, 0.0])
    images = []
    for cam in cams:
        hit = rasterize(points, cam, scales=(1.0,))[0] >= 0
        assert 0.02 < float(hit.float().mean()) < 0.5
        img = blue[:, None, None].expand(3, *cam.image_size).clone()
        img[:, hit] = red[:, None]
        images.append(img)
    with torch.no_grad():
        scene = model.aggregate(points, torch.stack(images), cams)
    bg = scene.background
    assert bg.shape == (9, 8, 16)
    expect = model.extractor.weight.detach() @ blue
    torch.testing.assert_close(bg[:8], expect[:, None, None].expand(8, 8, 16), atol=1e-5, rtol=0)
    conf = bg[8]
    assert float(conf.max()) == 1.0 and bool(((conf >= 0) & (conf <= 1)).all())
    assert float(conf[:, :].sum()) > 10  # the horizon band is seen from the ring
    assert float(conf[0].max()) == 0.0  # nobody looks straight up: filled, confidence 0


def test_streaming_in_any_order_or_grouping_equals_one_call_and_the_batch():
    model = env_model()
    points = ball(300, 0.6, seed=1)
    cams = ring_cameras(5, size=(48, 64))
    cams.append(Camera.look_at((3, 0, 0), (6, 0, 0), up=UP_Z, image_size=(48, 64)))  # sees no point
    g = torch.Generator().manual_seed(2)
    images = torch.rand(len(cams), 3, 48, 64, generator=g)
    with torch.no_grad():
        one = model.aggregate(points, images, cams)
        state = model.begin_scene(points)
        for k in [4, 0, 5]:
            state.add_views(images[k : k + 1], [cams[k]])
        state.add_views(images[[3, 1, 2]], [cams[3], cams[1], cams[2]])
        streamed = state.finish()
        batched = model.aggregate_batch([(points, list(images), cams)])[0]
    assert one.background is not None and float(one.background[8].sum()) > 0
    for other in (streamed, batched):
        torch.testing.assert_close(other.background, one.background, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(other.coefficients, one.coefficients, atol=1e-5, rtol=1e-5)
    # The view that sees no point adds background: without it the map changes.
    with torch.no_grad():
        fewer = model.aggregate(points, images[:5], cams[:5])
    assert (fewer.background - one.background).abs().max() > 1e-4


def test_empty_cloud_and_fully_covered_views():
    model = env_model()
    cams = ring_cameras(2, size=(32, 32))
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        empty = model.aggregate(torch.zeros(0, 3), images, cams)
        assert empty.background is not None and float(empty.background[8].sum()) > 0
        # A cloud in front of every pixel: no background sample, zeros.
        yz = torch.stack(torch.meshgrid(torch.linspace(-3, 3, 200), torch.linspace(-3, 3, 200),
                                        indexing="ij"), -1).reshape(-1, 2)
        wall = torch.cat([torch.zeros(yz.shape[0], 1), yz], 1)  # the plane x = 0 fills the view
        covered = model.aggregate(wall, images[:1], [Camera.look_at((3, 0, 0), (0, 0, 0), up=UP_Z,
                                                                      image_size=(32, 32))])
    assert bool((covered.background == 0).all())


def test_background_gradients_reach_the_extractor():
    model = env_model()
    model.train()
    points = ball(200, 0.5)
    cams = ring_cameras(2, size=(32, 48))
    scene = model.aggregate(points, torch.rand(2, 3, 32, 48), cams)
    scene.background[:8].sum().backward()
    grad = model.extractor.head.weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0


# -------------------------------------------------------------------- refiner
def random_rasters(b: int, h: int, w: int, c: int = 9, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(b, c, h >> lvl, w >> lvl, generator=g) for lvl in range(5)]


def test_zero_projections_give_exactly_the_old_refiner():
    torch.manual_seed(0)
    old = Refiner(9, 3)
    new = Refiner(9, 3, background_channels=9)
    missing, unexpected = new.load_state_dict(old.state_dict(), strict=False)
    assert sorted(missing) == sorted(f"background_proj.{j}.{p}" for j in range(3) for p in ("weight", "bias"))
    assert not unexpected
    rasters = random_rasters(2, 64, 96)
    bg = [torch.randn(2, 9, 64 >> lvl, 96 >> lvl) for lvl in (2, 3, 4)]
    assert torch.equal(new(rasters, bg), old(rasters))
    with torch.no_grad():
        assert torch.equal(new(rasters, bg), old(rasters))
        assert torch.equal(new(rasters), old(rasters))  # omitted background: no addition
    with torch.no_grad():
        new.background_proj[1].weight.normal_()
    assert not torch.allclose(new(rasters, bg), old(rasters))
    with torch.no_grad():  # inference path == reference path with the background
        torch.testing.assert_close(new(rasters, bg), new.forward_reference(rasters, bg), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="background rasters must have 9 channels"):
        new(rasters, [b[:, :3] for b in bg])


def test_model_none_has_no_background_and_environment_renders_it():
    none = NPBGPlusPlus()
    assert not any("background" in k for k in none.state_dict())
    model = env_model()
    with torch.no_grad():
        for proj in model.refiner.background_proj:
            proj.weight.normal_()
    points = ball(300, 0.5)
    cams = ring_cameras(4, size=(64, 64))
    with torch.no_grad():
        scene = model.aggregate(points, torch.rand(4, 3, 64, 64), cams)
        target = Camera.look_at((2.5, 1.0, 0.5), (0, 0, 0), up=UP_Z, image_size=(64, 64)).rotated_in_plane(0.4)
        a = model.render(scene, target)
        flat = model.render(type(scene)(scene.points, scene.coefficients, scene.valid, scene.counts,
                                        torch.zeros_like(scene.background)), target)
        assert (a - flat).abs().max() > 1e-3
        # The batched training path renders the same image.
        batch = model.render_raw_batch([scene], [target])[0]
        torch.testing.assert_close(batch[:3].clamp(0, 1), a, atol=1e-5, rtol=0)
        # A scene without a map renders as a map of zeros.
        none_scene = type(scene)(scene.points, scene.coefficients, scene.valid, scene.counts, None)
        torch.testing.assert_close(model.render(none_scene, target), flat, atol=0, rtol=0)
    rasters = background_rasters(scene.background, target, [(16, 16), (8, 8)], UP_Z, 9)
    assert [tuple(r.shape) for r in rasters] == [(9, 16, 16), (9, 8, 8)]


# ------------------------------------------------------------------ weights
def test_widen_old_weights_into_an_environment_model(tmp_path):
    from npbgpp_core.pretrained import WeightsError, load_pretrained_npbgpp, save_weights, widen_for_background

    torch.manual_seed(0)
    old = NPBGPlusPlus({"world_up": list(UP_Z)})
    model = env_model(background_rows=16)
    with pytest.raises(RuntimeError, match="background_proj"):
        model.load_state_dict(old.state_dict())  # strict everywhere else
    model.load_state_dict(widen_for_background(old.state_dict(), model))
    assert all(float(p.detach().abs().sum()) == 0 for p in model.refiner.background_proj.parameters())
    assert torch.equal(model.refiner.first.feature.weight, old.refiner.first.feature.weight)
    with pytest.raises(ValueError, match="no background projections"):
        widen_for_background(old.state_dict(), old)
    # A weights file stores its config: an environment model loads as one, strictly.
    path = str(tmp_path / "env.safetensors")
    save_weights(path, model.state_dict(), "npbgpp", model.config.to_dict(), {}, fp16=False)
    loaded = load_pretrained_npbgpp(path)
    assert loaded.config.background == "environment" and loaded.config.background_rows == 16
    bad = str(tmp_path / "bad.safetensors")
    save_weights(bad, old.state_dict(), "npbgpp", model.config.to_dict(), {}, fp16=False)
    with pytest.raises(WeightsError, match="does not fit"):
        load_pretrained_npbgpp(bad)


def test_config_rejects_bad_background_options():
    from npbgpp_core.models import NPBGPlusPlusConfig

    with pytest.raises(ValueError, match="background must be one of"):
        NPBGPlusPlusConfig(background="sky")
    with pytest.raises(ValueError, match="background_rows must be a power of two"):
        NPBGPlusPlusConfig(background_rows=12)
    assert NPBGPlusPlusConfig().to_dict()["background"] == "none"


# ------------------------------------------------------------------ training
def test_one_training_step_with_the_environment_background(tmp_path):
    """The trainer's batched NPBG++ step with system.background=environment: a finite loss
    whose gradient reaches the background projections (and through them, once they are
    non-zero, the extractor)."""
    from _train_fixtures import make_dataset
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from headless_train.data import SceneDataModule
    from headless_train.systems import build_system

    root = make_dataset(str(tmp_path / "data"), ("sceneA",), size=80)  # input views 80 px: 10x10 at 1/8
    with initialize_config_module("headless_train.conf", version_base="1.3"):
        cfg = compose("config", overrides=[
            "system=npbgpp_sphere", "datasets=nerf_blender_pretrain", f"datasets.data_root={root}",
            f"system.descriptors_save_dir={tmp_path}/d", "datasets.train_num_samples=2", "datasets.color_jitter_prob=0",
            "dataloader=small", "datasets.train_image_size=40", "system.background=environment",
            "system.background_rows=4", "system.world_up=[0,1,0]"])
    torch.manual_seed(0)
    dm = SceneDataModule(cfg, seed=3407)
    system = build_system(OmegaConf.to_container(cfg, resolve=True), dm.scenes)
    assert system.model.config.background == "environment"
    batch = next(iter(dm.train_dataloader()))
    opt = system.configure_optimizers()
    loss, _ = system.batch_loss(batch)
    assert math.isfinite(float(loss.detach()))
    loss.backward()
    proj = system.model.refiner.background_proj
    assert any(float(p.weight.grad.abs().sum()) > 0 for p in proj)
    opt.step()
    opt.zero_grad()
    system.batch_loss(batch)[0].backward()
    assert float(system.model.extractor.head.weight.grad.abs().sum()) > 0


def test_background_lr_scale_gives_the_projections_their_own_step(tmp_path):
    """system.background_lr_scale: the projections' Adam group has lr x scale, every other
    parameter keeps lr, and no parameter is in two groups or left out."""
    from _train_fixtures import make_dataset
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from headless_train.data import SceneDataModule
    from headless_train.systems import build_system

    root = make_dataset(str(tmp_path / "data"), ("sceneA",), size=48)
    with initialize_config_module("headless_train.conf", version_base="1.3"):
        cfg = compose("config", overrides=[
            "system=npbgpp_sphere", "datasets=nerf_blender_pretrain", f"datasets.data_root={root}",
            f"system.descriptors_save_dir={tmp_path}/d", "system.background=environment",
            "system.background_rows=4", "system.lr=2e-4", "system.background_lr_scale=10"])
    system = build_system(OmegaConf.to_container(cfg, resolve=True), SceneDataModule(cfg, seed=0).scenes)
    groups = system.configure_optimizers().param_groups
    proj = {id(p) for p in system.model.refiner.background_proj.parameters()}
    assert [g["lr"] for g in groups] == [2e-4, pytest.approx(2e-3)]
    assert {id(p) for p in groups[1]["params"]} == proj
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in system.model.parameters())


@pytest.fixture(scope="module")
def env_stage(tmp_path_factory) -> tuple[str, str]:
    """``stage --background environment`` from background-less weights (a published-style
    network saved as a weights file), two dry-run calls: (data root, stage folder)."""
    from _train_fixtures import make_dataset

    from headless_train.stage import main
    from npbgpp_core.models import NPBGPlusPlus
    from npbgpp_core.pretrained import save_weights

    tmp = tmp_path_factory.mktemp("envstage")
    root = make_dataset(str(tmp / "data"), ("s1",), views=5, size=64, n_points=150)
    work = str(tmp / "stage")
    torch.manual_seed(0)
    seed = NPBGPlusPlus({"world_up": (0.0, 0.0, 1.0)})
    seed_file = str(tmp / "none.safetensors")
    save_weights(seed_file, seed.state_dict(), "npbgpp", seed.config.to_dict(), {})
    assert main(["--corpus", root, "--work", work, "--dry-run", "--dry-steps", "1", "--background", "environment",
                 "--weights", seed_file]) == 0
    assert main(["--corpus", root, "--work", work, "--dry-run", "--dry-steps", "1"]) == 0  # resumes as environment
    return root, work


def test_stage_starts_an_environment_run_from_old_weights(env_stage):
    """The seed is widened, CPU steps train, the exported weights load as an environment model."""
    import json
    import os

    from npbgpp_core.pretrained import default_weights_path, load_pretrained_npbgpp, read_weights

    _, work = env_stage
    seed = os.path.join(os.path.dirname(work), "none.safetensors")
    assert read_weights(seed, "npbgpp").config.get("background", "none") == "none"
    assert read_weights(default_weights_path("npbgpp"), "npbgpp").config["background"] == "environment"
    with open(os.path.join(work, "stage.json")) as f:
        calls = json.load(f)
    assert [c["background"] for c in calls] == ["environment", "environment"]
    assert [c["end_step"] for c in calls] == [1, 2]
    assert "system.background=environment" in calls[0]["overrides"]
    out = os.path.join(work, "npbgpp_sphere_stage.safetensors")
    wf = read_weights(out, "npbgpp")
    assert wf.config["background"] == "environment" and "refiner.background_proj.0.weight" in wf.state
    model = load_pretrained_npbgpp(out)
    assert model.config.background == "environment"


def test_coefficients_ft_learns_the_environment_map(env_stage, tmp_path):
    """NPBG++ evaluation writes each scene's map beside its coefficients; coefficients_ft
    starts its learnable map from it and trains it; the exported bundle renders."""
    import os

    from hydra import compose, initialize_config_module

    from headless_train.checkpoints import load_descriptors, recorded_world_up
    from headless_train.cli import run
    from npbgpp_core.scene import NeuralScene

    root, work = env_stage
    ckpt = os.path.join(work, "run", "checkpoints", "last.ckpt")

    def state_up(path: str) -> list[float]:
        return list(torch.load(path, map_location="cpu", weights_only=True)["npbgpp"]["config"]["world_up"])

    def run_inproc(overrides: list[str], run_dir: str):
        with initialize_config_module("headless_train.conf", version_base="1.3"):
            cfg = compose("config", overrides=[*overrides, f"system.descriptors_save_dir={run_dir}/descriptors"])
        return run(cfg, run_dir)

    # The published sequence without a world_up flag: the evaluation aligns at its default +Y,
    # though the checkpoint (stage: Z-up) stored +Z; its coefficients record +Y, and
    # coefficients_ft takes that frame (it took the checkpoint's +Z and read the map turned).
    assert state_up(ckpt) == [0.0, 0.0, 1.0]
    ev = str(tmp_path / "eval")
    run_inproc(["datasets=nerf_blender_one_scene", f"datasets.data_root={root}", "datasets.scene_name=s1",
                "system=npbgpp_sphere", "system.background=environment",
                "eval_only=true", "dataloader=small", f"weights_path={ckpt}"], ev)
    env = load_descriptors(os.path.join(ev, "descriptors"), "s1.background")
    assert env.shape == (9, 16 * 32) and float(env[8].sum()) > 0  # confidence: some bins seen
    assert recorded_world_up(os.path.join(ev, "descriptors", "s1")) == (0.0, 1.0, 0.0)
    common = ["datasets=h3ds_one_scene", "datasets.format=nerf_synthetic", f"datasets.data_root={root}",
              "datasets.scene_name=s1", "datasets.selection_count=0", "system=coefficients_ft",
              "dataloader=small", "trainer.enable_progress_bar=false"]
    ft = str(tmp_path / "ft")
    run_inproc([*common, "datasets.train_num_samples=2", "datasets.train_image_size=null", "trainer.max_epochs=1",
                f"system.descriptors_pretrained_dir={ev}/descriptors", f"weights_path={ckpt}",
                "trainer.limit_val_batches=0"], ft)
    state = torch.load(os.path.join(ft, "checkpoints", "last.ckpt"), map_location="cpu", weights_only=True)
    learnt = [v for k, v in state["state_dict"].items() if k.endswith(".environment")]
    assert len(learnt) == 1 and learnt[0].shape == (9, 16, 32)
    assert not torch.equal(learnt[0], env.view(9, 16, 32))  # RMSprop moved it
    assert state["npbgpp"]["config"]["background"] == "environment"
    assert state_up(os.path.join(ft, "checkpoints", "last.ckpt")) == [0.0, 1.0, 0.0]
    assert recorded_world_up(os.path.join(ft, "descriptors", "s1")) == (0.0, 1.0, 0.0)
    # its descriptors folder carries the learnt map too, for a run that starts from it (it had
    # only the coefficients: such a run warned and started the map from zeros)
    torch.testing.assert_close(load_descriptors(os.path.join(ft, "descriptors"), "s1.background"),
                               learnt[0].reshape(9, -1))
    from headless_train.export import main as export_main

    out = str(tmp_path / "ft.npbgpp")
    assert export_main(["--checkpoint", os.path.join(ft, "checkpoints", "last.ckpt"), "--scene",
                        os.path.join(root, "s1"), "--out", out]) == 0
    bundle = NeuralScene.load(out)
    assert bundle.kind == "coefficients" and torch.equal(bundle.model_state["environment"], learnt[0])
    img = bundle.renderer("cpu").render(Camera.look_at((0, -3, 0.5), (0, 0, 0), up=UP_Z, image_size=(32, 32)))
    assert img.shape == (3, 32, 32) and bool(torch.isfinite(img).all())


# ------------------------------------------------------------------ bundles
def env_scene(seed: int = 0):
    model = env_model()
    with torch.no_grad():
        for proj in model.refiner.background_proj:
            proj.weight.normal_()
        points = ball(300, 0.5, seed)
        scene = model.aggregate(points, torch.rand(4, 3, 64, 64), ring_cameras(4, size=(64, 64)))
    return model, scene


def test_bundle_round_trip_keeps_the_map_and_renders_like_the_model(tmp_path):
    from npbgpp_core.scene import NeuralScene

    model, scene = env_scene()
    path = str(tmp_path / "env.npbgpp")
    NeuralScene.from_aggregated(model, scene, name="env").save(path)
    bundle = NeuralScene.load(path)
    assert torch.equal(bundle.background, scene.background)
    renderer = bundle.renderer("cpu")
    target = Camera.look_at((2.5, 1.0, 0.5), (0, 0, 0), up=UP_Z, image_size=(64, 64)).rotated_in_plane(0.3)
    torch.testing.assert_close(renderer.render(target), model.render(scene, target), atol=1e-6, rtol=0)
    renderer.select_points(torch.arange(100))  # rebuilding the scene keeps the map
    assert renderer.aggregated.background is not None
    # Windowed rendering (bounded memory) carries it too: windows of an unrolled view
    # equal the whole frame.
    renderer.select_points(None)
    upright = Camera.look_at((2.5, 1.0, 0.5), (0, 0, 0), up=UP_Z, image_size=(320, 320))
    whole = renderer.render(upright)
    torch.testing.assert_close(renderer.render(upright, max_pixels=(256 + 96) ** 2), whole, atol=1e-4, rtol=0)


def test_bundle_refuses_a_malformed_or_missing_map(tmp_path):
    from safetensors.torch import load_file, save_file

    from npbgpp_core.scene import NeuralScene

    model, scene = env_scene()
    good = str(tmp_path / "good.npbgpp")
    NeuralScene.from_aggregated(model, scene).save(good)
    from safetensors import safe_open

    with safe_open(good, framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(good)

    def write(name: str, **change) -> str:
        t = dict(tensors)
        for k, v in change.items():
            if v is None:
                t.pop(k)
            else:
                t[k] = v
        path = str(tmp_path / name)
        save_file(t, path, metadata=meta)
        return path

    with pytest.raises(ValueError, match=r"wrong.npbgpp: .*background has shape \(9, 4, 8\), model_config implies "
                                         r"\(9, 8, 16\)"):
        NeuralScene.load(write("wrong.npbgpp", background=torch.zeros(9, 4, 8)))
    with pytest.raises(ValueError, match="missing.npbgpp: .*no 'background' tensor"):
        NeuralScene.load(write("missing.npbgpp", background=None))
    with pytest.raises(ValueError, match="nan.npbgpp: tensor 'background' holds 1 NaN"):
        bad = tensors["background"].clone()
        bad[0, 0, 0] = float("nan")
        NeuralScene.load(write("nan.npbgpp", background=bad))
    none_model = NPBGPlusPlus({"world_up": list(UP_Z)})
    plain = NeuralScene.from_aggregated(none_model, type(scene)(scene.points, scene.coefficients, scene.valid))
    plain.background = scene.background
    with pytest.raises(ValueError, match="background: a \\(9, 8, 16\\) map, but this npbgpp model_config has no"):
        plain.check()


def test_fit_coefficients_learns_the_scene_map(tmp_path):
    from npbgpp_core.fitting import FitViews, fit_coefficients

    model, scene = env_scene()
    model = from_weights_file(model, tmp_path)
    cams = ring_cameras(4, size=(64, 64))
    views = FitViews(torch.rand(4, 3, 64, 64), cams)
    fit = fit_coefficients(model, scene, views, steps=0)
    assert torch.equal(fit.model.environment.detach(), scene.background)
    fit = fit_coefficients(model, scene, views, steps=3, crop=32)
    assert fit.model.environment is not None and not torch.equal(fit.model.environment.detach(), scene.background)
    assert any(p is fit.model.environment for p in fit.model.descriptor_parameters())
    img = fit.model.render(scene.points, cams[0])
    assert img.shape == (3, 64, 64) and bool(torch.isfinite(img).all())


def test_fitted_model_renders_a_view_that_sees_no_point(tmp_path):
    """A fitting crop may see no point at all (sparse clouds, padded canvases): the fitted
    model then renders the map alone, as the NPBG++ model does for that view."""
    from npbgpp_core.fitting import FitViews, fit_coefficients

    model, scene = env_scene()
    model = from_weights_file(model, tmp_path)
    fit = fit_coefficients(model, scene, FitViews(torch.rand(4, 3, 64, 64), ring_cameras(4, size=(64, 64))),
                           steps=0)
    away = Camera.look_at((3, 0, 0), (6, 0, 0), up=UP_Z, fov_x_deg=40, image_size=(32, 32))
    assert int((away.project(scene.points)[1] > 0).sum()) == 0
    with torch.no_grad():
        img = fit.model.render_raw(scene.points, away)
        ref = model.render(scene, away)
    assert torch.allclose(img[:3].clamp(0, 1), ref, atol=1e-5)
    # Empty space through a training step too: the loss and its gradients stay finite.
    fit = fit_coefficients(model, scene, FitViews(torch.rand(1, 3, 32, 32), [away]), steps=2, crop=16)
    assert len(fit.losses) == 2 and all(math.isfinite(v) for v in fit.losses)


def test_service_aggregates_and_renders_with_the_map(tmp_path):
    """The add-on's worker path: aggregation requests with environment weights write a
    bundle holding the map, and neural frames of that bundle render with it."""
    import numpy as np
    from _train_fixtures import aggregate_with_worker, make_tiny_scene

    from npbgpp_core import protocol as P
    from npbgpp_core.pretrained import save_weights
    from npbgpp_core.scene import NeuralScene
    from npbgpp_core.service import RenderService

    model = env_model()
    with torch.no_grad():
        for proj in model.refiner.background_proj:
            proj.weight.normal_()
    weights = str(tmp_path / "env.safetensors")
    save_weights(weights, model.state_dict(), "npbgpp", model.config.to_dict(), {}, fp16=False)
    folder = make_tiny_scene(str(tmp_path / "scene"), views=4, size=64, n_points=150, splits=(4, 0, 0))
    service = RenderService()
    out = str(tmp_path / "s.npbgpp")
    aggregate_with_worker(folder, out, weights, service=service, up_axis="+Y")
    bundle = NeuralScene.load(out)
    assert bundle.background is not None and bundle.background.shape == (9, 8, 16)
    assert float(bundle.background[8].sum()) > 0
    assert isinstance(service.handle(P.LoadBundle(out, device="CPU")), P.BundleInfo)
    cam = Camera.look_at((0.5, 0.8, -3.0), (0, 0, 0), image_size=(48, 64))
    frame = service.handle(P.RenderFrame(P.CameraSpec.from_camera(cam), source="bundle", neural=True))
    assert isinstance(frame, P.Frame), frame
    direct = bundle.renderer("cpu").render(cam).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(frame.pixels[..., P.NEURAL], direct, atol=1e-5)
    blank = NeuralScene.load(out)
    blank.background = torch.zeros_like(blank.background)
    assert np.abs(blank.renderer("cpu").render(cam).permute(1, 2, 0).numpy() - direct).max() > 1e-3
