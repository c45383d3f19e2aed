"""The CPU training speed paths compute what the reference paths compute: the fused x2
bilinear upsampling + skip concatenation of the U-Net decoder (against F.interpolate +
torch.cat, values and gradients), its convolution with the input gradient computed as a
forward convolution (against F.conv2d's gradients), both as one step, the extractor with
them, aggregation of the seen points only (same renders and gradients as the whole
cloud) and the whole batched NPBG++ step of the CPU recipe (same loss and parameter
gradients on a tiny batch)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _train_fixtures import assert_same_gradients, make_dataset

from npbgpp_core import Camera
from npbgpp_core.models import NPBGPlusPlus
from npbgpp_core.models.cpu_paths import conv3x3, upsample_cat, upsample_cat_conv3x3
from npbgpp_core.models.extractor import FeatureExtractor


def reference_upsample_cat(y: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    up = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
    return torch.cat([up, skip], dim=1)


@pytest.mark.parametrize("shape", [(2, 5, 7, 9), (1, 4, 1, 1), (3, 6, 1, 5), (2, 3, 6, 1)])
def test_upsample_cat_equals_interpolate_and_cat(shape):
    g = torch.Generator().manual_seed(sum(shape))
    n, c, h, w = shape
    y = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    skip = torch.randn(n, 3, 2 * h, 2 * w, generator=g, dtype=torch.float64, requires_grad=True)
    out, ref = upsample_cat(y, skip), reference_upsample_cat(y, skip)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    grad = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(out, (y, skip), grad), torch.autograd.grad(ref, (y, skip), grad), strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    # The backward is the adjoint of the forward: finite differences agree.
    assert torch.autograd.gradcheck(upsample_cat, (y.detach()[:1, :2].requires_grad_(),
                                                   skip.detach()[:1, :1].requires_grad_()))


def test_upsample_cat_without_exact_doubling_uses_the_reference():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(2, 4, 5, 6, generator=g)
    skip = torch.randn(2, 3, 9, 12, generator=g)
    torch.testing.assert_close(upsample_cat(y, skip), reference_upsample_cat(y, skip), atol=0, rtol=0)


@pytest.mark.parametrize("shape", [(2, 5, 9, 7, 4), (1, 3, 1, 2, 6)])
def test_conv3x3_gradients_equal_conv2d(shape):
    n, cin, h, w, cout = shape
    g = torch.Generator().manual_seed(h * w)
    x = torch.randn(n, cin, h, w, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(cout, cin, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    out, ref = conv3x3(x, weight), F.conv2d(x, weight, padding=1)
    assert "Conv3x3" in type(out.grad_fn).__name__  # the custom backward runs
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    grad = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(out, (x, weight), grad), torch.autograd.grad(ref, (x, weight), grad),
                    strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    assert torch.autograd.gradcheck(conv3x3, (x.detach()[:1, :2, :4, :4].requires_grad_(),
                                              weight.detach()[:2, :2].requires_grad_()))


@pytest.mark.parametrize("skip_grad", [True, False])
def test_upsample_cat_conv3x3_equals_the_reference_functions(skip_grad):
    g = torch.Generator().manual_seed(7)
    y = torch.randn(2, 4, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    skip = torch.randn(2, 3, 10, 12, generator=g, dtype=torch.float64, requires_grad=skip_grad)
    weight = torch.randn(5, 7, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    out = upsample_cat_conv3x3(y, skip, weight)
    assert "Up2CatConv3x3" in type(out.grad_fn).__name__
    ref = F.conv2d(reference_upsample_cat(y, skip), weight, padding=1)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    inputs = (y, skip, weight) if skip_grad else (y, weight)
    grad = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(ref, inputs, grad), strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    small = (y.detach()[:1, :2, :3, :3].requires_grad_(), skip.detach()[:1, :1, :6, :6].requires_grad_(skip_grad),
             weight.detach()[:2, :3].requires_grad_())
    assert torch.autograd.gradcheck(upsample_cat_conv3x3, small)


def test_extractor_fast_decoder_equals_reference_values_and_gradients():
    torch.manual_seed(0)
    fused = FeatureExtractor(8)
    reference = FeatureExtractor(8)
    reference.load_state_dict(fused.state_dict())
    reference.fast_decoder = False
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 70, 90, generator=g), torch.rand(3, 64, 96, generator=g)]
    weights = torch.randn(8, 70, 90, generator=g)
    outs = []
    for net in (fused, reference):
        feats = net.forward_many(images)
        loss = (feats[0] * weights).mean() + feats[1].square().mean()
        outs.append((feats, torch.autograd.grad(loss, list(net.parameters()))))
    (fa, ga), (fb, gb) = outs
    for a, b in zip(fa, fb, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    for a, b in zip(ga, gb, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-3)


def _sample(seed: int, n_points: int, sizes: list[tuple[int, int]]):
    g = torch.Generator().manual_seed(seed)
    points = torch.randn(n_points, 3, generator=g) * 0.5
    points[: n_points // 3] += torch.tensor([0.0, 0.0, 6.0])  # a third of the cloud behind every view
    images, cams = [], []
    for k, (h, w) in enumerate(sizes):
        a = 0.5 * k + 0.2 * seed
        eye = (2.5 * math.sin(a), 0.3 * (k % 2), -2.5 * math.cos(a))
        cams.append(Camera.look_at(eye=eye, target=(0, 0, 0), image_size=(h, w)).rotated_in_plane(7.0 * k))
        images.append(torch.rand(3, h, w, generator=g))
    return points, images, cams


@pytest.mark.parametrize("background", ["none", "environment"])
def test_seen_only_aggregation_renders_and_trains_like_the_whole_cloud(background):
    torch.manual_seed(0)
    model = NPBGPlusPlus({"world_up": [0.0, 1.0, 0.0], "input_canvas": "bounds", "background": background})
    if background == "environment":
        for p in model.refiner.background_proj.parameters():
            torch.nn.init.normal_(p, std=0.1)  # trained-like projections: the map reaches the loss
    samples = [_sample(0, 900, [(40, 40), (40, 44), (36, 40)]), _sample(1, 600, [(32, 40), (40, 40), (40, 40)])]
    targets = [Camera.look_at(eye=(0.3, 0.2, -2.6), target=(0, 0, 0), image_size=(32, 32)),
               Camera.look_at(eye=(-2.4, 0.5, -0.8), target=(0, 0, 0), image_size=(32, 32)).rotated_in_plane(20.0)]
    params = list(model.parameters())
    results = []
    for seen_only in (True, False):
        aggs = model.aggregate_batch(samples, seen_only=seen_only)
        outs = model.render_raw_batch(aggs, targets)
        loss = sum((o * torch.linspace(0, 1, o.numel()).view(o.shape)).square().mean() for o in outs)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        results.append((aggs, outs, loss, grads))
    (aggs_s, outs_s, loss_s, grads_s), (aggs_f, outs_f, loss_f, grads_f) = results
    for (points, _, _), a_s, a_f in zip(samples, aggs_s, aggs_f, strict=True):
        assert bool(a_s.valid.all()) and 0 < len(a_s) == int(a_f.valid.sum()) < len(points)
        torch.testing.assert_close(a_s.points, a_f.points[a_f.valid])
        torch.testing.assert_close(a_s.coefficients, a_f.coefficients[a_f.valid], atol=1e-6, rtol=1e-5)
        assert torch.equal(a_s.counts, a_f.counts[a_f.valid])
    for a, b in zip(outs_s, outs_f, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(loss_s, loss_f)
    for a, b in zip(grads_s, grads_f, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_cpu_recipe_step_equals_the_reference_paths(tmp_path):
    """One batched step of the CPU training recipe (environment background, 'bounds' input
    canvas, gradient loss, auxiliary loss) with the speed paths on and off: same loss, same
    gradients of every parameter."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from headless_train.data import SceneDataModule
    from headless_train.systems import build_system

    root = make_dataset(str(tmp_path / "data"), ("sceneA", "sceneB"))
    overrides = ["system=npbgpp_sphere", "datasets=nerf_blender_pretrain", f"datasets.data_root={root}",
                 f"system.descriptors_save_dir={tmp_path}/d", "datasets.train_num_samples=2",
                 "datasets.train_image_size=16", "datasets.color_jitter_prob=0", "dataloader=small",
                 "dataloader.batch_size=2", "system.background=environment", "system.input_canvas=bounds",
                 "loss.gradient_weight=0.5", "system.world_up=[0,1,0]"]
    with initialize_config_module("headless_train.conf", version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    dm = SceneDataModule(cfg, seed=3407)
    torch.manual_seed(0)
    system = build_system(OmegaConf.to_container(cfg, resolve=True), dm.scenes)
    for p in system.model.refiner.background_proj.parameters():
        torch.nn.init.normal_(p, std=0.1)
    batch = next(iter(dm.train_dataloader()))
    assert len(batch) == 2 and "input_images" in batch[0]
    params = list(system.model.parameters())
    results = []
    for fast in (True, False):
        system.model.extractor.fast_decoder = fast
        system.seen_only_aggregation = fast
        torch.manual_seed(1)  # same auxiliary-loss pixel dropout
        loss, _ = system.batch_loss(batch)
        results.append((loss, torch.autograd.grad(loss, params, allow_unused=True)))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, atol=1e-4, rtol=1e-5)
    # the extractor, basis, refiner and projections all get gradients
    assert_same_gradients(grads_a, grads_b, len(params), rtol=1e-3)
