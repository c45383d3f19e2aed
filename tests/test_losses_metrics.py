"""Losses and metrics against hand-computed values and a brute-force SSIM."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from npbgpp_core.losses import (
    VGG19_LAYERS,
    RenderLoss,
    VGGFeatures,
    masked_l1,
    masked_l1_downsampled,
    multiscale_l1,
)
from npbgpp_core.metrics import (
    MetricSuite,
    check_border,
    crop_border,
    gradient_energy,
    mean_finite,
    psnr,
    sharpness_ratio,
    ssim,
)


def brute_force_ssim(x: np.ndarray, y: np.ndarray, size: int = 11, sigma: float = 1.5) -> float:
    """SSIM with explicit loops over every valid 11x11 window (Wang et al. 2004)."""
    ax = np.arange(size) - (size - 1) / 2
    g = np.exp(-(ax**2) / (2 * sigma**2))
    w = np.outer(g, g)
    w /= w.sum()
    c1, c2 = 0.01**2, 0.03**2
    vals = []
    for c in range(x.shape[0]):
        for i in range(x.shape[1] - size + 1):
            for j in range(x.shape[2] - size + 1):
                a = x[c, i : i + size, j : j + size]
                b = y[c, i : i + size, j : j + size]
                ma, mb = (w * a).sum(), (w * b).sum()
                va, vb = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum()
                cov = (w * (a - ma) * (b - mb)).sum()
                vals.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_psnr_hand_computed():
    gt = torch.full((3, 8, 8), 0.5)
    assert psnr(gt + 0.1, gt)[0].item() == pytest.approx(20.0, abs=1e-4)  # mse 0.01 -> 20 dB
    assert math.isinf(psnr(gt, gt)[0].item())


def test_ssim_matches_brute_force():
    rng = np.random.default_rng(0)
    x = rng.random((2, 16, 15))
    y = np.clip(x + 0.2 * rng.standard_normal(x.shape), 0, 1)
    ours = ssim(torch.from_numpy(x).float(), torch.from_numpy(y).float())[0].item()
    assert ours == pytest.approx(brute_force_ssim(x, y), abs=1e-5)
    assert ssim(torch.from_numpy(x), torch.from_numpy(x))[0].item() == pytest.approx(1.0, abs=1e-6)


def test_crop_border_and_mean():
    img = torch.arange(2 * 50 * 60, dtype=torch.float32).reshape(2, 50, 60)
    out = crop_border(img, 20)
    assert out.shape == (2, 10, 20) and out[0, 0, 0] == img[0, 20, 20]
    with pytest.raises(ValueError, match="border 25 leaves nothing of a 50x60 image"):
        crop_border(img, 25)
    # the same rule, checked before any image exists: 2 x border must stay below the shorter side
    check_border(24, 50, 60)
    check_border(0, 1, 1)
    with pytest.raises(ValueError, match="border 25 leaves nothing of a 60x50 image"):
        check_border(25, 60, 50)
    assert mean_finite([1.0, None, float("inf"), 3.0]) == 2.0


def test_masked_l1_ignores_invalid_pixels():
    pred = torch.zeros(1, 3, 4, 4)
    target = torch.ones(1, 3, 4, 4)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1
    pred[..., 2:, :] = 123.0  # garbage where the mask is 0 must not matter
    target[..., 2:, :] = -7.0
    assert masked_l1(pred, target, mask).item() == pytest.approx(1.0)
    assert masked_l1_downsampled(pred, target, mask, 2).item() == pytest.approx(1.0)


def test_l1_downsampled_is_block_mean():
    rng = torch.Generator().manual_seed(0)
    pred, target = torch.rand(1, 3, 8, 8, generator=rng), torch.rand(1, 3, 8, 8, generator=rng)
    p4 = pred.reshape(1, 3, 2, 4, 2, 4).mean((3, 5))
    t4 = target.reshape(1, 3, 2, 4, 2, 4).mean((3, 5))
    expected = (p4 - t4).abs().mean()
    assert masked_l1_downsampled(pred, target, None, 4).item() == pytest.approx(expected.item(), rel=1e-6)
    both = multiscale_l1(pred, target, None, (1, 4))
    assert both.item() == pytest.approx((pred - target).abs().mean().item() + expected.item(), rel=1e-6)


def _random_vgg19_file(path, seed=0) -> dict:
    torch.manual_seed(seed)
    ref = VGGFeatures("vgg19", VGG19_LAYERS)
    state = {f"features.{k}": v.clone() for k, v in ref.body.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(2, 2)  # a full torchvision file has more keys
    torch.save(state, path)
    return state


def test_render_loss_without_vgg_announces_fallback():
    loss = RenderLoss(vgg_weights=None)
    assert loss.mode == "l1+ssim" and "no VGG-19 weights" in loss.message
    x = torch.rand(2, 3, 16, 16)
    assert loss(x, x).item() == pytest.approx(0.0, abs=1e-5)
    assert loss(x, 1 - x).item() > 0


def test_render_loss_with_local_vgg_weights(tmp_path):
    path = str(tmp_path / "vgg19.pth")
    state = _random_vgg19_file(path)
    loss = RenderLoss(vgg_weights=path, l1_weight=0.0)
    assert loss.mode == "vgg"
    torch.testing.assert_close(loss.vgg.body[0].weight, state["features.0.weight"])
    pools = [type(m).__name__ for m in loss.vgg.body if "Pool" in type(m).__name__]
    assert pools == ["AvgPool2d"] * 4  # relu5_1 comes after the 4th pool; max pools replaced
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(1, 3, 32, 32, generator=g), torch.rand(1, 3, 32, 32, generator=g)
    assert loss(x, x).item() == 0.0
    mask = torch.ones(1, 1, 32, 32)
    mask[..., 16:] = 0
    y2 = y.clone()
    y2[..., 16:] = x[..., 16:] + 0.5  # change only masked-out pixels
    assert loss(x, y, mask).item() == pytest.approx(loss(x, y2, mask).item(), rel=1e-6)
    # Hand check of the first feature: relu1_1 = relu(conv(normalised x)).
    feats = loss.vgg(x)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    ref = torch.relu(torch.nn.functional.conv2d((x - mean) / std, state["features.0.weight"],
                                                state["features.0.bias"], padding=1))
    torch.testing.assert_close(feats[0], ref)
    assert [f.shape[1] for f in feats] == [64, 128, 256, 512, 512]


def test_vgg_weights_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        RenderLoss(vgg_weights=str(tmp_path / "nope.pth"))
    bad = tmp_path / "bad.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, bad)
    with pytest.raises(ValueError, match="features.0.bias"):
        RenderLoss(vgg_weights=str(bad))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        RenderLoss(vgg_weights=str(garbage))


def test_lpips_skipped_without_weights_and_computed_with_them(tmp_path):
    suite = MetricSuite.create(None, None)
    x = torch.rand(3, 24, 24)
    m = suite(x, x)
    assert m["lpips"] is None and "LPIPS skipped" in suite.lpips_skip_reason
    assert m["ssim"] == pytest.approx(1.0)

    from npbgpp_core.losses import VGG16_LAYERS

    torch.manual_seed(0)
    vgg = VGGFeatures("vgg16", VGG16_LAYERS, pool="max")
    torch.save({f"features.{k}": v for k, v in vgg.body.state_dict().items()}, tmp_path / "vgg16.pth")
    lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(lin, tmp_path / "lin.pth")
    suite = MetricSuite.create(str(tmp_path / "vgg16.pth"), str(tmp_path / "lin.pth"))
    assert suite.lpips is not None and suite.lpips_skip_reason is None
    y = torch.rand(3, 24, 24)
    assert suite(x, x)["lpips"] == pytest.approx(0.0, abs=1e-6)
    d1, d2 = suite(x, y)["lpips"], suite(y, x)["lpips"]
    assert d1 > 0 and d1 == pytest.approx(d2, rel=1e-5)
    missing = MetricSuite.create(str(tmp_path / "vgg16.pth"), str(tmp_path / "missing.pth"))
    assert missing.lpips is None and "missing.pth" in missing.lpips_skip_reason


# ------------------------------------------------------------------ sharpness ratio
def brute_force_gradient_energy(x: np.ndarray) -> float:
    """Mean of the squared differences of every pair of horizontal / vertical neighbours."""
    squares = []
    c, h, w = x.shape
    for k in range(c):
        for i in range(h):
            for j in range(w):
                if j + 1 < w:
                    squares.append((x[k, i, j + 1] - x[k, i, j]) ** 2)
                if i + 1 < h:
                    squares.append((x[k, i + 1, j] - x[k, i, j]) ** 2)
    return float(np.mean(squares))


def test_sharpness_of_a_step_and_its_box_blur_hand_computed():
    # Columns 0 0 1 1 on 4 rows: horizontal differences 0 1 0 per row (4 ones of 12),
    # vertical ones all 0 (12): energy 4 / 24 = 1/6.
    step = torch.tensor([0.0, 0.0, 1.0, 1.0]).expand(1, 4, 4).clone()
    assert gradient_energy(step).item() == pytest.approx(1 / 6)
    # A 1x3 box blur along rows (edge pixels repeated): 0 1/3 2/3 1, differences 1/3 each:
    # energy 12 * (1/9) / 24 = 1/18. Its total variation is unchanged (still 1 per row); the
    # ratio still drops: sqrt((1/18) / (1/6)) = sqrt(1/3).
    padded = torch.nn.functional.pad(step[None], (1, 1, 0, 0), mode="replicate")
    blurred = torch.nn.functional.avg_pool2d(padded, (1, 3), stride=1)[0]
    assert torch.allclose(blurred[0, 0], torch.tensor([0.0, 1 / 3, 2 / 3, 1.0]))
    assert gradient_energy(blurred).item() == pytest.approx(1 / 18)
    assert sharpness_ratio(blurred, step).item() == pytest.approx(math.sqrt(1 / 3), rel=1e-6)


def test_gradient_energy_matches_brute_force():
    rng = np.random.default_rng(5)
    x = rng.random((3, 7, 9))
    assert gradient_energy(torch.from_numpy(x)).item() == pytest.approx(brute_force_gradient_energy(x), rel=1e-12)


def test_sharpness_ratio_identical_scaled_constant_flat_blurred_noisy():
    g = torch.Generator().manual_seed(0)
    photo = torch.rand(2, 3, 32, 40, generator=g)
    assert sharpness_ratio(photo, photo.clone()).tolist() == [1.0, 1.0]  # exactly
    # linear in contrast: half the contrast around any offset is half as sharp
    assert sharpness_ratio(0.5 * photo + 0.25, photo).tolist() == pytest.approx([0.5, 0.5], rel=1e-6)
    assert sharpness_ratio(torch.full_like(photo, 0.3), photo).tolist() == [0.0, 0.0]
    blurred = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(photo, (1, 1, 1, 1), mode="replicate"), 3,
                                             stride=1)
    r_blur = sharpness_ratio(blurred, photo)
    assert (r_blur < 0.6).all()  # a 3x3 box blur of pixel noise keeps little of its gradient
    noisy = (photo + 0.2 * torch.randn(photo.shape, generator=g)).clamp(0, 1)
    assert (sharpness_ratio(noisy, photo) > 1.0).all()  # noise is more high frequency, not better detail
    flat = torch.full((3, 8, 8), 0.5)
    assert math.isnan(sharpness_ratio(photo[0, :, :8, :8], flat).item())
    with pytest.raises(ValueError, match="shapes differ"):
        sharpness_ratio(photo[0], photo[1, :, :31])


def _box_blur(x: torch.Tensor, f: int) -> torch.Tensor:
    """Shrink by ``f`` (area average) and enlarge back (bilinear): a blurred copy."""
    small = torch.nn.functional.avg_pool2d(x, f)
    return torch.nn.functional.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)


def test_laplacian_pyramid_loss_hand_computed_and_blind_to_offsets():
    from npbgpp_core.losses import laplacian_pyramid_loss

    # One 2x2 level: band = x - its mean = [[.75, -.25], [-.25, -.25]] against a zero band.
    x = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).view(1, 1, 2, 2)
    assert float(laplacian_pyramid_loss(x, torch.zeros_like(x), levels=1)) == pytest.approx(0.375)
    # Two levels on 4x4: level 0 of a 2x2-block image is zero; level 1 (its 2x2 means
    # [[1, 0], [0, 0]]) is the case above: mean (0 + 0.375) / 2.
    y = x.repeat_interleave(2, -2).repeat_interleave(2, -1)
    assert float(laplacian_pyramid_loss(y, torch.zeros_like(y), levels=2)) == pytest.approx(0.375 / 2)
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 3, 32, 32, generator=g)
    assert float(laplacian_pyramid_loss(img, img)) == 0.0
    assert float(laplacian_pyramid_loss(img + 0.3, img)) == pytest.approx(0.0, abs=1e-6)  # detail only
    assert 0 < float(laplacian_pyramid_loss(_box_blur(img, 2), img)) < float(laplacian_pyramid_loss(
        _box_blur(img, 4), img))
    # Masked-out pixels never count.
    mask = torch.ones(1, 1, 32, 32)
    mask[..., 16:, :] = 0
    changed = img.clone()
    changed[..., 16:, :] = torch.rand(1, 3, 16, 32, generator=g)
    assert float(laplacian_pyramid_loss(changed, img, mask)) == 0.0
    with pytest.raises(ValueError, match="levels must be >= 1"):
        laplacian_pyramid_loss(img, img, levels=0)


def _encoder():
    """The trained encoder the fits use: the bundled NPBG++ file's."""
    from npbgpp_core.pretrained import load_pretrained_npbgpp

    return load_pretrained_npbgpp().extractor.encoder


def test_encoder_feature_loss_zero_on_identical_larger_when_blurrier():
    from npbgpp_core.losses import EncoderFeatureLoss

    loss = EncoderFeatureLoss(_encoder())
    g = torch.Generator().manual_seed(1)
    # a sharp image: random 4x4 blocks (detail at every level of the encoder)
    img = torch.rand(1, 3, 8, 8, generator=g).repeat_interleave(4, -2).repeat_interleave(4, -1)
    assert float(loss(img, img)) == 0.0
    sharp_to_blur = [float(loss(_box_blur(img, f), img)) for f in (2, 4, 8)]
    assert 0 < sharp_to_blur[0] < sharp_to_blur[1] < sharp_to_blur[2]
    mask = torch.ones(1, 1, 32, 32)
    mask[..., :, 16:] = 0
    changed = img.clone()
    changed[..., :, 16:] = 0.5
    assert float(loss(changed, img, mask)) == 0.0
    with pytest.raises(ValueError, match="levels must be in 0..4"):
        EncoderFeatureLoss(_encoder(), levels=(5,))
    with pytest.raises(ValueError, match="needs an NPBG\\+\\+ extractor encoder"):
        EncoderFeatureLoss(torch.nn.Conv2d(3, 3, 1))
    from npbgpp_core.models.extractor import Encoder

    with pytest.raises(ValueError, match="never loaded from a weights file"):
        EncoderFeatureLoss(Encoder())  # randomly initialised: no file was read into it


def test_encoder_feature_loss_trains_the_render_only_and_never_its_network():
    from npbgpp_core.losses import EncoderFeatureLoss

    encoder = _encoder()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    loss = EncoderFeatureLoss(encoder)
    frozen = {k: v.clone() for k, v in loss.state_dict().items()}
    g = torch.Generator().manual_seed(2)
    target = torch.rand(1, 3, 24, 24, generator=g).requires_grad_(True)
    pred = torch.rand(1, 3, 24, 24, generator=g).requires_grad_(True)
    opt = torch.optim.SGD([pred], lr=1.0)
    start = float(loss(pred, target).detach())
    for _ in range(3):
        opt.zero_grad()
        value = loss(pred, target)
        value.backward()
        opt.step()
    assert pred.grad is not None and float(pred.grad.abs().sum()) > 0
    assert target.grad is None
    assert all(p.grad is None and not p.requires_grad for p in loss.parameters())
    assert all(p.grad is None for p in encoder.parameters())
    for k, v in loss.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert float(loss(pred, target).detach()) < start
    loss.train()
    assert not loss.stages.training


def test_fft_amplitude_loss_ignores_shifts_and_charges_blur():
    from npbgpp_core.losses import fft_amplitude_loss

    # Hand-computed: an impulse of 1 on 4x4 has a flat orthonormal spectrum, every amplitude
    # 1/4, against zeros: mean |1/4 - 0| over the 4 x 3 rfft bins = 0.25.
    x = torch.zeros(1, 1, 4, 4)
    x[..., 1, 2] = 1.0
    assert float(fft_amplitude_loss(x, torch.zeros_like(x))) == pytest.approx(0.25)
    g = torch.Generator().manual_seed(3)
    img = torch.rand(1, 3, 32, 32, generator=g)
    assert float(fft_amplitude_loss(img, img)) == 0.0
    # a circular shift moves the phase only
    assert float(fft_amplitude_loss(torch.roll(img, (3, 5), (-2, -1)), img)) == pytest.approx(0.0, abs=1e-6)
    assert 0 < float(fft_amplitude_loss(_box_blur(img, 2), img)) < float(fft_amplitude_loss(_box_blur(img, 4), img))
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., :16, :] = 1
    assert float(fft_amplitude_loss(img + mask.logical_not() * 0.5, img, mask)) == 0.0
