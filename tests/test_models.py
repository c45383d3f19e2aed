"""NPBG++ / NPBG networks: aggregation maths against numpy, streaming invariance,
gradient flow, short optimisation runs, roll invariance and bad inputs."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from npbgpp_core.camera import Camera
from npbgpp_core.models import (
    NPBG,
    FeatureExtractor,
    NPBGConfig,
    NPBGPlusPlus,
    NPBGPlusPlusConfig,
    Refiner,
    count_parameters,
)
from npbgpp_core.rasterizer import rasterize

SIZE = (32, 32)


def sphere_scene(n: int = 2000, views: int = 4, size=SIZE, seed: int = 0):
    """Coloured points on the unit sphere and ``views`` cameras around it, with images
    made of the nearest point's colour (black background)."""
    g = torch.Generator().manual_seed(seed)
    pts = torch.randn(n, 3, generator=g)
    pts = pts / pts.norm(dim=1, keepdim=True)
    colors = 0.5 + 0.5 * torch.stack([pts[:, 0], torch.sin(3 * pts[:, 1]), pts[:, 2] * pts[:, 0]], dim=1)
    cams = [
        Camera.look_at((3 * math.sin(a), 0.6 * math.cos(2 * a), 3 * math.cos(a)), (0, 0, 0), fov_x_deg=45,
                       image_size=size)
        for a in np.linspace(0, 1.2, views)
    ]
    images = torch.stack([point_image(pts, colors, c) for c in cams])
    return pts, colors, cams, images


def point_image(pts: torch.Tensor, colors: torch.Tensor, cam: Camera) -> torch.Tensor:
    index = rasterize(pts, cam, scales=(1.0,))[0]
    img = torch.zeros(*index.shape, 3)
    img[index >= 0] = colors[index[index >= 0]]
    return img.permute(2, 0, 1)


def seeded_model(**cfg) -> NPBGPlusPlus:
    torch.manual_seed(0)
    return NPBGPlusPlus(NPBGPlusPlusConfig(**cfg))


# ------------------------------------------------------------------ building blocks
def test_refiner_parameter_count_and_odd_sizes():
    refiner = Refiner()
    n = count_parameters(refiner)
    print(f"refiner parameters: {n}")
    assert 350_000 <= n <= 600_000
    assert float(refiner.head.bias.detach()[0]) == 0.5
    H, W = 135, 67
    rasters = [torch.rand(2, 9, int(s * H), int(s * W)) for s in (1, 1 / 2, 1 / 4, 1 / 8, 1 / 16)]
    assert refiner(rasters).shape == (2, 3, H, W)
    rasters = [torch.rand(1, 9, int(s * 16), int(s * 17)) for s in (1, 1 / 2, 1 / 4, 1 / 8, 1 / 16)]
    assert Refiner(9, 4)(rasters).shape == (1, 4, 16, 17)
    with pytest.raises(ValueError, match="5 rasters"):
        refiner(rasters[:4])


def test_extractor_shapes_and_weights(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    ext = FeatureExtractor().eval()
    x = torch.rand(2, 3, 45, 50)
    assert ext(x).shape == (2, 8, 45, 50)
    # Encoder strides 2..32 with the published channel counts.
    feats = ext.encoder(torch.zeros(1, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in feats] == [(16, 32, 32), (24, 16, 16), (40, 8, 8), (96, 4, 4), (320, 2, 2)]
    path = tmp_path / "enc.safetensors"
    save_file({k: v.contiguous() for k, v in ext.encoder.state_dict().items()}, str(path))
    torch.manual_seed(1)
    other = FeatureExtractor(weights=str(path)).eval()
    for k, v in ext.encoder.state_dict().items():
        assert torch.equal(other.encoder.state_dict()[k], v)
    assert other.encoder.weights_file == str(path) and ext.encoder.weights_file is None  # for the perceptual loss
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        FeatureExtractor(weights=str(tmp_path / "nope.safetensors"))
    bad = tmp_path / "bad.safetensors"
    save_file({"stages.0.0.0.weight": torch.zeros(3, 3)}, str(bad))
    with pytest.raises(ValueError, match="does not match"):
        FeatureExtractor(weights=str(bad))
    with pytest.raises(ValueError, match="extractor_weights"):
        NPBGPlusPlus({"extractor_weights": str(bad)})


def test_config_round_trip_and_errors():
    cfg = NPBGPlusPlusConfig(aggregator="mean", visibility_scale=0.5)
    assert NPBGPlusPlusConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown option"):
        NPBGPlusPlusConfig.from_dict({"feature_dims": 8})
    with pytest.raises(ValueError, match="aggregator"):
        NPBGPlusPlusConfig(aggregator="sh")
    with pytest.raises(ValueError, match="scales"):
        NPBGPlusPlusConfig(scales=(1.0, 0.5))
    # differences: the options that build another network; the scenes' up axis and where
    # the encoder's weights came from are not among them
    assert cfg.differences(NPBGPlusPlusConfig(aggregator="mean", visibility_scale=0.5, world_up=(0, 0, 1),
                                              extractor_weights="enc.safetensors")) == []
    assert cfg.differences(NPBGPlusPlusConfig(visibility_scale=0.25, input_canvas="bounds")) == [
        ("aggregator", "mean", "sphere"), ("input_canvas", "square", "bounds"), ("visibility_scale", 0.5, 0.25)]
    assert NPBGConfig.from_dict(NPBGConfig().to_dict()) == NPBGConfig()
    with pytest.raises(ValueError, match="descriptor_dim"):
        NPBGConfig(descriptor_dim=16)


# ---------------------------------------------------------------------- aggregation
def test_aggregation_is_order_and_grouping_invariant():
    pts, _, cams, images = sphere_scene(views=5)
    model = seeded_model().eval()
    reference = model.aggregate(pts, images, cams)
    assert reference.coefficients.shape == (2000, 7, 8)
    rng = np.random.default_rng(0)
    for _ in range(2):
        order = rng.permutation(5)
        cuts = sorted(rng.choice(np.arange(1, 5), size=rng.integers(0, 4), replace=False))
        state = model.begin_scene(pts)
        for group in np.split(order, cuts):
            state.add_views(images[group], [cams[i] for i in group])
        scene = state.finish()
        assert torch.equal(scene.valid, reference.valid)
        torch.testing.assert_close(scene.coefficients, reference.coefficients, atol=2e-5, rtol=1e-4)
    assert reference.valid.any() and not reference.valid.all()


def test_single_view_has_zero_beta():
    pts, _, cams, images = sphere_scene()
    model = seeded_model().eval()
    scene = model.aggregate(pts, images[:1], cams[:1])
    assert scene.valid.sum() > 100
    assert torch.equal(scene.coefficients[:, 1:], torch.zeros_like(scene.coefficients[:, 1:]))
    assert (scene.coefficients[~scene.valid] == 0).all()


def numpy_bilinear(fmap: np.ndarray, u: float, v: float) -> np.ndarray:
    """Bilinear sample of (C, h, w) at pixel coordinates (u, v), centres at integers,
    edge-clamped."""
    c, h, w = fmap.shape
    u = min(max(u, 0.0), w - 1.0)
    v = min(max(v, 0.0), h - 1.0)
    j0, i0 = int(math.floor(u)), int(math.floor(v))
    j1, i1 = min(j0 + 1, w - 1), min(i0 + 1, h - 1)
    a, b = u - j0, v - i0
    return ((1 - a) * (1 - b) * fmap[:, i0, j0] + a * (1 - b) * fmap[:, i0, j1]
            + (1 - a) * b * fmap[:, i1, j0] + a * b * fmap[:, i1, j1])


def numpy_basis(model: NPBGPlusPlus, d: np.ndarray) -> np.ndarray:
    emb = np.concatenate([np.sin(d * math.pi / 2 * f) for f in (1, 2, 4)]
                         + [np.cos(d * math.pi / 2 * f) for f in (1, 2, 4)])
    layers = [m for m in model.basis.net if isinstance(m, torch.nn.Linear)]
    x = emb
    for k, lin in enumerate(layers):
        x = lin.weight.detach().double().numpy() @ x + lin.bias.detach().double().numpy()
        if k < len(layers) - 1:
            x = np.where(x > 0, x, 0.2 * x)
    return x


def test_ridge_regression_matches_numpy_least_squares():
    """For a few points: collect (x_k, y_k) over the views that see them independently
    (numpy bilinear sampling, numpy MLP) and solve the ridge problem with lstsq."""
    pts, _, cams, images = sphere_scene(views=6)
    target = Camera.look_at((2.0, 1.0, 2.5), (0, 0, 0), image_size=SIZE)
    model = seeded_model(align_input_views=False, align_during_rendering=False).eval()
    with torch.no_grad():
        scene = model.aggregate(pts, images, cams)
        fmaps = model.extractor(images).double().numpy()
        desc = model.descriptors(scene, target).double().numpy()
    visible = [set(rasterize(pts, c, scales=(1.0,))[0].flatten().tolist()) - {-1} for c in cams]
    counts = np.array([sum(i in v for v in visible) for i in range(len(pts))])
    assert torch.equal(scene.valid, torch.from_numpy(counts > 0))
    chosen = [i for i in np.argsort(-counts)[:8]] + [int(np.argmax(counts == 2))]
    X64 = pts.double().numpy()
    for i in chosen:
        xs, ys = [], []
        for k, cam in enumerate(cams):
            if i not in visible[k]:
                continue
            K, R, t = cam.to_opencv()
            xc = R @ X64[i] + t
            u, v = K[0, 0] * xc[0] / xc[2] + K[0, 2], K[1, 1] * xc[1] / xc[2] + K[1, 2]
            ys.append(numpy_bilinear(fmaps[k], u, v))
            centre = -R.T @ t
            d = (X64[i] - centre) / np.linalg.norm(X64[i] - centre)
            xs.append(numpy_basis(model, d))
        X, Y = np.array(xs), np.array(ys)
        n = len(X)
        ym = Y.mean(0)
        # Ridge with the intercept fixed to the mean: min ||X b - (Y - ym)||^2 + alpha ||b||^2.
        A = np.concatenate([X, np.sqrt(1.0) * np.eye(6)])
        B = np.concatenate([Y - ym, np.zeros((6, 8))])
        beta = np.linalg.lstsq(A, B, rcond=None)[0]
        coef = scene.coefficients[i].double().numpy()
        np.testing.assert_allclose(coef[0], ym, atol=1e-4)
        np.testing.assert_allclose(coef[1:], beta, atol=1e-4 * max(1.0, np.abs(beta).max()))
        assert n == int(scene.counts[i])
        # Descriptor for a target direction: ym + beta^T x(d).
        K, R, t = target.to_opencv()
        centre = -R.T @ t
        d = (X64[i] - centre) / np.linalg.norm(X64[i] - centre)
        np.testing.assert_allclose(desc[i], ym + beta.T @ numpy_basis(model, d), atol=1e-4)


def test_mean_aggregator():
    pts, _, cams, images = sphere_scene()
    model = seeded_model(aggregator="mean").eval()
    assert model.basis is None
    scene = model.aggregate(pts, images, cams)
    assert scene.coefficients.shape == (2000, 1, 8)
    sums = [model.aggregate(pts, images[k : k + 1], cams[k : k + 1]) for k in range(4)]
    total = sum(s.coefficients[:, 0] * s.valid[:, None] for s in sums)
    count = sum(s.valid.float() for s in sums)
    expect = total / count.clamp_min(1)[:, None]
    torch.testing.assert_close(scene.coefficients[:, 0], expect, atol=1e-5, rtol=1e-5)
    assert model.render(scene, cams[0]).shape == (3, *SIZE)


# ------------------------------------------------------------------------ gradients
def test_gradients_reach_extractor_basis_refiner():
    pts, _, cams, images = sphere_scene()
    model = seeded_model().train()
    scene = model.aggregate(pts, images[1:], cams[1:])
    assert scene.coefficients.requires_grad
    out = model.render_raw(scene, cams[0])
    aux = model.refine_feature_map(torch.rand(1, 8, 32, 32, requires_grad=True), drop_prob=0.5)
    (out - images[0]).abs().mean().backward()
    for name, module in (("extractor", model.extractor), ("basis", model.basis), ("refiner", model.refiner)):
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        assert grads, name
        assert all(torch.isfinite(g).all() for g in grads), name
        assert sum(float(g.abs().sum()) for g in grads) > 0, name
    # The auxiliary path reaches only the refiner.
    model.zero_grad()
    fmap = model.extractor(images[:1])
    aux = model.refine_feature_map(fmap, drop_prob=0.3)
    aux.abs().mean().backward()
    assert all(p.grad is None for p in model.extractor.parameters())
    assert any(p.grad is not None for p in model.refiner.parameters())


def test_refine_feature_map_dropout_and_mask():
    model = seeded_model().eval()
    fmap = torch.rand(2, 8, 40, 36)
    captured = []
    handle = model.refiner.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    out = model.refine_feature_map(fmap, drop_prob=0.0)
    handle.remove()
    assert out.shape == (2, 3, 40, 36)
    rasters = captured[0]
    assert [tuple(r.shape[-2:]) for r in rasters] == [(40, 36), (20, 18), (10, 9), (5, 4), (2, 2)]
    assert all((r[:, 8] == 1).all() for r in rasters)
    assert torch.equal(rasters[0][:, :8], fmap)
    captured.clear()
    handle = model.refiner.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    model.refine_feature_map(fmap, drop_prob=0.5)
    handle.remove()
    r0 = captured[0][0]
    kept = float(r0[:, 8].mean())
    assert 0.35 < kept < 0.65
    assert (r0[:, :8][(r0[:, 8:9] == 0).expand(-1, 8, -1, -1)] == 0).all()


def test_npbg_gradients_and_coefficients_ft_freezes_basis():
    pts, _, cams, images = sphere_scene()
    torch.manual_seed(0)
    model = NPBG(len(pts))
    out = model.render_raw(pts, cams[0])
    (out - images[0]).abs().mean().backward()
    assert model.descriptors.grad.abs().sum() > 0
    assert model.background.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.refiner.parameters())

    pp = seeded_model(align_during_rendering=False).eval()
    scene = pp.aggregate(pts, images[1:], cams[1:])
    ft = NPBG.from_npbgpp_coefficients(
        pts, scene.coefficients, pp.basis.state_dict(), pp.refiner.state_dict(), pp.config, valid=scene.valid
    )
    assert ft.descriptors.shape == (len(pts), 56)
    # Same descriptors, same refiner, zero background: the same image as NPBG++.
    torch.testing.assert_close(ft.render(pts, cams[0]), pp.render(scene, cams[0]), atol=1e-5, rtol=0)
    out = ft.render_raw(pts, cams[0])
    out.abs().mean().backward()
    assert ft.descriptors.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in ft.basis.parameters())
    with pytest.raises(ValueError, match="coefficients must be"):
        NPBG.from_npbgpp_coefficients(pts[:10], scene.coefficients, pp.basis.state_dict(),
                                      pp.refiner.state_dict(), pp.config)


def _fit(loss_fn, param_groups, steps: int) -> list[float]:
    opt = torch.optim.Adam(param_groups)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_npbgpp_training_steps_reduce_loss():
    pts, _, cams, images = sphere_scene(size=(20, 20))
    model = seeded_model().train()

    def loss_fn():
        scene = model.aggregate(pts, images[1:], cams[1:])
        return (model.render_raw(scene, cams[0]) - images[0]).abs().mean()

    groups = [
        {"params": model.refiner.parameters(), "lr": 1e-3},
        {"params": [*model.extractor.parameters(), *model.basis.parameters()], "lr": 1e-4},
    ]
    losses = _fit(loss_fn, groups, steps=8)
    print("NPBG++ losses", [round(v, 4) for v in losses])
    assert min(losses[-2:]) < 0.95 * losses[0]


def test_npbg_training_steps_reduce_loss():
    pts, _, cams, images = sphere_scene(size=(20, 20))
    torch.manual_seed(0)
    model = NPBG(len(pts))

    def loss_fn():
        return sum((model.render_raw(pts, c) - img).abs().mean() for c, img in zip(cams, images, strict=True))

    losses = _fit(loss_fn, [{"params": model.parameters(), "lr": 1e-3}], steps=10)
    print("NPBG losses", [round(v, 4) for v in losses])
    assert min(losses[-3:]) < 0.95 * losses[0]


# ------------------------------------------------------------------------ rendering
def test_render_shapes_and_range():
    pts, _, cams, images = sphere_scene()
    model = seeded_model(predict_mask=True).eval()
    scene = model.aggregate(pts, images, cams)
    target = Camera.look_at((1.0, 0.5, -2.5), (0, 0, 0), image_size=(24, 37))
    raw = model.render_raw(scene, target)
    assert raw.shape == (4, 24, 37)
    img = model.render(scene, target)
    assert img.shape == (3, 24, 37) and img.dtype == torch.float32
    assert img.min() >= 0 and img.max() <= 1
    assert not img.requires_grad
    desc = model.descriptors(scene, target)
    assert desc.shape == (2000, 8) and (desc[~scene.valid] == 0).all()
    bf16 = model.render(scene, target, dtype=torch.bfloat16)
    assert bf16.shape == (3, 24, 37) and (bf16 - img).abs().max() < 0.1


@pytest.mark.parametrize("size", [(32, 32), (30, 40)])
def test_render_is_roll_invariant(size):
    """Rolling the target camera by 90 degrees rotates the rendered image by 90 degrees."""
    pts, _, cams, images = sphere_scene()
    model = seeded_model().eval()
    # Inputs rolled arbitrarily: alignment removes the roll before feature extraction.
    scene = model.aggregate(pts, images, cams)
    target = Camera.look_at((2.0, 0.8, -2.0), (0, 0, 0), fov_x_deg=50, image_size=size)
    rolled = target.rotated_in_plane(math.pi / 2, (size[1], size[0]))
    a = model.render(scene, target)
    b = model.render(scene, rolled)
    assert b.shape == (3, size[1], size[0])
    # roll by +90 degrees: a pixel right of the centre moves below it (clockwise turn).
    torch.testing.assert_close(b, torch.rot90(a, k=-1, dims=(1, 2)), atol=2e-4, rtol=0)
    assert (a - a.mean()).abs().max() > 1e-3  # the image is not constant


def test_input_roll_barely_changes_aggregation():
    """Rolling an input view (and its image) leaves the aggregated coefficients nearly
    unchanged thanks to input alignment (up to resampling)."""
    pts, colors, cams, images = sphere_scene()
    model = seeded_model().eval()
    ref = model.aggregate(pts, images, cams)
    rolled = [c.rotated_in_plane(math.pi / 2) for c in cams]
    rolled_images = torch.stack([point_image(pts, colors, c) for c in rolled])
    got = model.aggregate(pts, rolled_images, rolled)
    both = ref.valid & got.valid
    err = (got.coefficients[both, 0] - ref.coefficients[both, 0]).abs().median()
    spread = ref.coefficients[both, 0].std()
    assert err < 0.2 * spread


# ------------------------------------------------------------------------ bad input
def test_empty_cloud_and_points_behind():
    _, _, cams, images = sphere_scene()
    model = seeded_model().eval()
    empty = model.aggregate(torch.zeros(0, 3), images, cams)
    assert empty.coefficients.shape == (0, 7, 8) and empty.valid.shape == (0,)
    blank = model.render(empty, cams[0])
    assert blank.shape == (3, *SIZE)
    # A cloud entirely behind the target camera renders exactly like an empty one.
    eye = torch.tensor(cams[0].center().tolist())
    behind = eye + (eye / eye.norm()) * torch.rand(200, 3).add(1.0)
    scene = model.aggregate(behind, images, cams)
    assert not scene.valid.any()
    torch.testing.assert_close(model.render(scene, cams[0]), blank, atol=0, rtol=0)
    npbg = NPBG(0)
    assert npbg.render(torch.zeros(0, 3), cams[0]).shape == (3, *SIZE)


def test_nonfinite_points_are_dropped():
    pts, _, cams, images = sphere_scene()
    model = seeded_model().eval()
    ref = model.aggregate(pts, images, cams)
    bad = torch.tensor([[float("nan"), 0, 0], [0, float("inf"), 0]])
    with pytest.warns(UserWarning, match="NaN/inf"):
        scene = model.aggregate(torch.cat([pts, bad]), images, cams)
    assert not scene.valid[-2:].any()
    torch.testing.assert_close(scene.coefficients[:-2], ref.coefficients, atol=1e-6, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = model.render(scene, cams[1])
    torch.testing.assert_close(out, model.render(ref, cams[1]), atol=1e-6, rtol=0)


def test_bad_images_raise():
    pts, _, cams, images = sphere_scene()
    model = seeded_model().eval()
    state = model.begin_scene(pts)
    with pytest.raises(ValueError, match=r"\(K, 3, H, W\)"):
        state.add_views(images[:, :2], cams)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        state.add_views(images * 255, cams)
    with pytest.raises(ValueError, match="uint8"):
        state.add_views((images * 255).to(torch.uint8), cams)
    with pytest.raises(ValueError, match="cameras"):
        state.add_views(images, cams[:2])
    with pytest.raises(ValueError, match="camera 0"):
        state.add_views(images[:1], [cams[0].scaled(0.5)])
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        model.begin_scene(torch.zeros(10, 2))
    with pytest.raises(ValueError, match="points"):
        NPBG(10).render(torch.zeros(9, 3), cams[0])


def test_rasterize_descriptors_matches_rasterize_features():
    """Descriptors computed only for winning points give the same rasters and gradients
    as rasterizing every point's descriptor."""
    from npbgpp_core.rasterizer import DEFAULT_SCALES, rasterize_descriptors, rasterize_features

    pts, _, cams, _ = sphere_scene()
    feats = torch.randn(len(pts), 8, requires_grad=True)
    bg = torch.randn(8)
    asked = []

    def fn(rows):
        asked.append(rows)
        return feats[rows] * 2

    got = rasterize_descriptors(pts, cams[0], DEFAULT_SCALES, 1e-3, fn, bg)
    ref = rasterize_features(pts, feats * 2, cams[0], DEFAULT_SCALES, bg)
    for g, r in zip(got, ref, strict=True):
        assert torch.equal(g, r)
    assert len(asked[0]) < len(pts) // 2  # only the front hemisphere's winners
    (g_got,) = torch.autograd.grad(sum(g.sum() for g in got), feats)
    (g_ref,) = torch.autograd.grad(sum(r.sum() for r in ref), feats)
    assert torch.equal(g_got, g_ref)


def test_alignment_points_world_up_upwards_and_warps_exactly():
    from npbgpp_core.models import align_camera, warp_images

    rng = np.random.default_rng(3)
    for _ in range(5):
        eye = rng.normal(size=3) * 3
        up = rng.normal(size=3)  # arbitrary roll
        cam = Camera.look_at(eye, (0, 0, 0), up=up, image_size=(30, 44), dtype=torch.float64)
        aligned, _ = align_camera(cam)
        side = math.ceil(math.hypot(30, 44))
        assert aligned.image_size == (side, side)
        uv, _ = aligned.project(torch.tensor([[0.0, 0.0, 0.0], [0.0, 1e-3, 0.0]], dtype=torch.float64))
        du, dv = (uv[1] - uv[0]).tolist()
        assert dv < 0 and abs(du) < 1e-6 * abs(dv) + 1e-12
        np.testing.assert_allclose(aligned.center().numpy(), cam.center().numpy(), atol=1e-9)
    cam = Camera.look_at((1.0, 2.0, -3.0), (0, 0, 0), image_size=(20, 20))
    img = torch.rand(1, 3, 20, 20)
    torch.testing.assert_close(warp_images(img, cam, cam), img, atol=1e-5, rtol=0)
    rolled = cam.rotated_in_plane(math.pi / 2)
    torch.testing.assert_close(warp_images(img, cam, rolled), torch.rot90(img, k=-1, dims=(2, 3)), atol=1e-5, rtol=0)
    # Warping a smooth image into the padded square and back restores it.
    yy, xx = torch.meshgrid(torch.arange(20.0), torch.arange(20.0), indexing="ij")
    smooth = (0.5 + 0.25 * torch.sin(xx / 4) + 0.2 * torch.cos(yy / 5)).expand(1, 3, 20, 20)
    aligned, _ = align_camera(cam)
    there = warp_images(smooth, cam, aligned)
    assert there.shape == (1, 3, 29, 29) and (there == 0).any()  # padded corners
    back = warp_images(there, aligned, cam)
    inner = (back - smooth)[..., 1:-1, 1:-1].abs()
    assert inner.max() < 0.03


@pytest.mark.cuda
def test_cuda_matches_cpu_and_autocast():
    pts, _, cams, images = sphere_scene()
    model = seeded_model().eval()
    scene = model.aggregate(pts, images, cams)
    ref = model.render(scene, cams[0])
    gpu = model.to("cuda")
    scene_gpu = gpu.aggregate(pts.cuda(), images.cuda(), cams)
    torch.testing.assert_close(scene_gpu.coefficients.cpu(), scene.coefficients, atol=1e-3, rtol=1e-3)
    out = gpu.render(scene_gpu, cams[0])
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), ref, atol=2e-3, rtol=0)
    half = gpu.render(scene_gpu, cams[0], dtype=torch.float16)
    assert half.dtype == torch.float32 and (half.cpu() - ref).abs().max() < 0.05


def test_world_up_plus_z_makes_upright_cameras_render_without_alignment():
    """A Z-up scene aligned with world_up=+Z: cameras with a horizontal x axis (Blender's
    upright cameras) have roll exactly 0, so the aligned render is the direct render."""
    from npbgpp_core.models.alignment import alignment_angle, render_canvas_camera

    pts, _, cams, images = sphere_scene()
    model = seeded_model(world_up=(0.0, 0.0, 1.0)).eval()
    scene = model.aggregate(pts, images, cams)
    target = Camera.look_at((2.0, -2.5, 1.2), (0, 0, 0), up=(0, 0, 1), fov_x_deg=50, image_size=(24, 36))
    assert alignment_angle(target, (0, 0, 1)) == 0.0
    assert abs(alignment_angle(target)) > 0.1  # the published +Y rule would roll this camera
    canvas, quarter_turns = render_canvas_camera(target, "bounds", (0, 0, 1))
    assert quarter_turns == 0 and canvas.image_size == (24, 36)
    with torch.no_grad():
        torch.testing.assert_close(model.render_raw(scene, target), model._render_direct(scene, target),
                                   atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["npbgpp", "npbg"])
def test_views_smaller_than_the_coarsest_level_render(kind):
    """An upright view under 16 pixels a side (a small F12 or a coarse viewport frame) failed
    with 'scale 0.0625 of a 15x20 image gives an empty 0x1 image', while rolled ones
    rendered. It shows the pixels of a 16-pixel view of the same camera that contain it."""
    pts, _, cams, images = sphere_scene()
    if kind == "npbgpp":
        model = seeded_model(world_up=(0.0, 0.0, 1.0)).eval()
        scene = model.aggregate(pts, images, cams)
    else:
        torch.manual_seed(0)
        model, scene = NPBG(len(pts), NPBGConfig()).eval(), pts
    view = Camera.look_at((2.0, -2.5, 1.2), (0, 0, 0), up=(0, 0, 1), fov_x_deg=50, image_size=(15, 9))
    with torch.no_grad():
        small = model.render_raw(scene, view)
        large = model.render_raw(scene, view.cropped(0, -3, 16, 16))  # the view at rows 0..14, columns 3..11
    assert small.shape[1:] == (15, 9)
    torch.testing.assert_close(small, large[:, :15, 3:12], atol=1e-5, rtol=0)


def test_batched_render_pads_views_smaller_than_the_coarsest_level():
    """render_raw_batch (headless training's batched path) renders a view under 16 pixels
    a side as render_raw does (it failed with 'gives an empty ... image'), as it does a
    small quarter-turned one, a small rolled one and one of ordinary size in the same batch."""
    pts, _, cams, images = sphere_scene()
    model = seeded_model(world_up=(0.0, 0.0, 1.0)).eval()
    scene = model.aggregate(pts, images, cams)
    small = Camera.look_at((2.0, -2.5, 1.2), (0, 0, 0), up=(0, 0, 1), fov_x_deg=50, image_size=(15, 9))
    turned = Camera.look_at((-2.2, 2.0, 0.0), (0, 0, 0), up=(2.0, 2.2, 0.0), fov_x_deg=50, image_size=(7, 12))
    rolled = Camera.look_at((-2.2, 2.0, 1.0), (0, 0, 0), up=(1, 0, 0), fov_x_deg=50, image_size=(7, 12))
    assert [model.canvas_camera(v)[1] for v in (small, turned, rolled)] == [0, 3, None]
    views = [small, cams[0], turned, rolled]
    with torch.no_grad():
        batch = model.render_raw_batch([scene] * 4, views)
        single = [model.render_raw(scene, v) for v in views]
    for b, s, v in zip(batch, single, views, strict=True):
        assert b.shape[1:] == tuple(v.image_size)
        torch.testing.assert_close(b, s, atol=1e-5, rtol=0)


def test_min_side_is_the_least_size_scale_sizes_accepts():
    from npbgpp_core.rasterizer import min_side, scale_sizes

    for scales in ((1.0, 0.5, 0.25, 0.125, 0.0625), (1.0, 0.3), (1.0, 1 / 3), (0.7,), (1.0, 0.1)):
        n = min_side(scales)
        scale_sizes((n, n), scales)
        with pytest.raises(ValueError, match="empty"):
            scale_sizes((n - 1, n), scales)
    assert min_side((1.0, 0.5, 0.25, 0.125, 0.0625)) == 16


def test_world_up_turns_that_axis_upright():
    from npbgpp_core.models.alignment import align_camera

    rng = np.random.default_rng(8)
    for world_up in [(0, 0, 1), (0, -1, 0), (1, 1, 0)]:
        up = np.asarray(world_up, float) / np.linalg.norm(world_up)
        for _ in range(4):
            cam = Camera.look_at(rng.normal(size=3) * 3, (0, 0, 0), up=rng.normal(size=3), image_size=(20, 28),
                                 dtype=torch.float64)
            aligned, _ = align_camera(cam, world_up)
            uv, _ = aligned.project(torch.tensor(np.stack([np.zeros(3), 1e-3 * up])))
            du, dv = (uv[1] - uv[0]).tolist()
            assert dv < 0 and abs(du) < 1e-6 * abs(dv) + 1e-12


def test_estimate_and_resolve_world_up():
    from npbgpp_core.models.alignment import estimate_world_up, parse_world_up, resolve_world_up

    rng = np.random.default_rng(2)
    cams = []
    for k in range(12):  # a ring of upright cameras in a Z-up world, each tilted a little
        a = 2 * math.pi * k / 12
        eye = (3 * math.cos(a), 3 * math.sin(a), 1.0 + 0.3 * rng.normal())
        cam = Camera.look_at(eye, (0, 0, 0), up=(0, 0, 1), image_size=(16, 16))
        cams.append(cam.rotated_in_plane(math.radians(rng.normal() * 3)))
    assert estimate_world_up(cams) == (0.0, 0.0, 1.0)
    raw = np.asarray(estimate_world_up(cams, snap_degrees=0))
    assert raw[2] > 0.95 and not np.allclose(raw, (0, 0, 1))
    flipped = [c.rotated_in_plane(math.pi) for c in cams]  # all upside down
    assert estimate_world_up(flipped) == (0.0, 0.0, -1.0)
    opposite = cams[:2] + [c.rotated_in_plane(math.pi) for c in cams[:2]]
    assert estimate_world_up(opposite) == (0.0, 1.0, 0.0)  # no agreement: the published +Y
    assert resolve_world_up("AUTO", cams) == (0.0, 0.0, 1.0)
    assert resolve_world_up("NEG_Y") == resolve_world_up("-y") == (0.0, -1.0, 0.0)
    assert resolve_world_up([0, 0, 5]) == (0.0, 0.0, 1.0)
    for bad in ("up", [0, 0, 0], [1, 2], [float("nan"), 0, 1]):
        with pytest.raises(ValueError, match="world_up"):
            resolve_world_up(bad)
        with pytest.raises(ValueError, match="world_up"):
            parse_world_up(bad)
    # parsing needs no cameras: 'auto' stays 'auto' until resolve_world_up has them
    assert parse_world_up(" Auto ") == "auto" and parse_world_up("POS_Z") == (0.0, 0.0, 1.0)
    assert parse_world_up(["0", "-2", "0"]) == (0.0, -1.0, 0.0)
    with pytest.raises(ValueError, match="world_up"):
        NPBGPlusPlusConfig(world_up=(0, 0, 0))


def test_bundle_keeps_world_up_and_old_bundles_mean_plus_y(tmp_path):
    from npbgpp_core.scene import NeuralScene

    pts, _, cams, images = sphere_scene(n=300)
    model = seeded_model(world_up=(0.0, 0.0, 1.0)).eval()
    agg = model.aggregate(pts, images, cams)
    NeuralScene.from_aggregated(model, agg).save(tmp_path / "z.npbgpp")
    loaded = NeuralScene.load(tmp_path / "z.npbgpp")
    assert loaded.model_config["world_up"] == [0.0, 0.0, 1.0]
    assert loaded.renderer("cpu").model.config.world_up == (0.0, 0.0, 1.0)
    old = dict(loaded.model_config)
    del old["world_up"]  # bundles written before the option existed
    assert NPBGPlusPlusConfig.from_dict(old).world_up == (0.0, 1.0, 0.0)
