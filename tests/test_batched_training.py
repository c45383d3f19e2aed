"""The batched NPBG++ training step (one extractor call per padded size, one accumulation
and solve over concatenated clouds, one refiner call) against the per-sample paths."""

from __future__ import annotations

import math

import torch

from npbgpp_core import Camera
from npbgpp_core.models import NPBGPlusPlus


def _sample(seed: int, sizes: list[tuple[int, int]], n_points: int):
    g = torch.Generator().manual_seed(seed)
    points = torch.randn(n_points, 3, generator=g) * 0.5
    images, cams = [], []
    for k, (h, w) in enumerate(sizes):
        a = 0.7 * k + 0.3 * seed
        eye = (2.5 * math.sin(a), 0.4 * (k % 2), -2.5 * math.cos(a))
        cams.append(Camera.look_at(eye=eye, target=(0, 0, 0), image_size=(h, w)))
        images.append(torch.rand(3, h, w, generator=g))
    return points, images, cams


def _model() -> NPBGPlusPlus:
    torch.manual_seed(0)
    return NPBGPlusPlus({"world_up": [0.0, 1.0, 0.0]}).eval()


def test_extractor_forward_many_equals_one_call_per_image():
    model = _model()
    g = torch.Generator().manual_seed(1)
    # 40x50 and 60x64 both pad to 64x64 (one call); 33x90 pads to 64x96 (another).
    images = [torch.rand(3, h, w, generator=g) for h, w in ((40, 50), (60, 64), (33, 90))]
    with torch.no_grad():
        many = model.extractor.forward_many(images, channels_last=True)
        for img, out in zip(images, many, strict=True):
            alone = model.extractor(img[None])[0]
            assert out.shape == alone.shape
            torch.testing.assert_close(out, alone, atol=2e-5, rtol=1e-4)


def test_batched_aggregation_equals_per_sample_aggregation():
    model = _model()
    samples = [_sample(0, [(48, 40), (48, 40), (30, 36)], 400), _sample(1, [(32, 32), (50, 60), (32, 32)], 250)]
    with torch.no_grad():
        batched = model.aggregate_batch(samples)
        for (points, images, cams), agg in zip(samples, batched, strict=True):
            state = model.begin_scene(points)
            for img, cam in zip(images, cams, strict=True):
                state.add_views(img[None], [cam])
            ref = state.finish()
            assert torch.equal(agg.valid, ref.valid) and torch.equal(agg.counts, ref.counts)
            assert int(ref.valid.sum()) > 50  # the views see the cloud: a real comparison
            torch.testing.assert_close(agg.coefficients, ref.coefficients, atol=2e-4, rtol=1e-3)


def test_batched_render_and_gradients_equal_per_sample():
    model = _model()
    samples = [_sample(2, [(40, 40), (40, 40)], 300), _sample(3, [(40, 40), (36, 44)], 300)]
    targets = [Camera.look_at(eye=(0.3, 0.2, -2.6), target=(0, 0, 0), image_size=(32, 32)),
               Camera.look_at(eye=(-2.4, 0.5, -0.8), target=(0, 0, 0), image_size=(32, 32))]
    aggs = model.aggregate_batch(samples)
    outs = model.render_raw_batch(aggs, targets)
    loss_b = sum(o.square().mean() for o in outs)
    grads_b = torch.autograd.grad(loss_b, list(model.refiner.parameters()) + list(model.extractor.parameters()))
    loss_s = 0.0
    for (points, images, cams), cam in zip(samples, targets, strict=True):
        state = model.begin_scene(points)
        for img, c in zip(images, cams, strict=True):
            state.add_views(img[None], [c])
        out = model.render_raw(state.finish(), cam)
        loss_s = loss_s + out.square().mean()
    grads_s = torch.autograd.grad(loss_s, list(model.refiner.parameters()) + list(model.extractor.parameters()))
    torch.testing.assert_close(loss_b, loss_s, atol=1e-5, rtol=1e-4)
    for a, b in zip(grads_b, grads_s, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=2e-3)


def test_bounds_input_canvas_at_roll_zero_is_the_unaligned_view():
    # look_at cameras with +Y up have roll 0 for world_up +Y: the 'bounds' canvas is the
    # image itself, so aggregation equals aggregation without input alignment.
    torch.manual_seed(0)
    bounds = NPBGPlusPlus({"world_up": [0.0, 1.0, 0.0], "input_canvas": "bounds"}).eval()
    plain = NPBGPlusPlus({"world_up": [0.0, 1.0, 0.0], "align_input_views": False}).eval()
    plain.load_state_dict(bounds.state_dict())
    points, images, cams = _sample(4, [(40, 48), (40, 48), (36, 40)], 300)
    with torch.no_grad():
        a = bounds.aggregate(points, torch.stack(images[:2]), cams[:2])
        b = plain.aggregate(points, torch.stack(images[:2]), cams[:2])
        batched = bounds.aggregate_batch([(points, images, cams)])[0]
        state = bounds.begin_scene(points)
        for img, cam in zip(images, cams, strict=True):
            state.add_views(img[None], [cam])
        ref = state.finish()
    torch.testing.assert_close(a.coefficients, b.coefficients, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batched.coefficients, ref.coefficients, atol=2e-4, rtol=1e-3)
