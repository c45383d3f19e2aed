"""Image quality metrics for evaluation: PSNR (data range 1), SSIM (Gaussian 11x11, sigma 1.5),
the sharpness ratio (RMS image gradient of a rendering over its photo's) and LPIPS-VGG from
local weight files (nothing is downloaded; without weights LPIPS is reported as skipped with
the reason).

Images are float tensors (3, H, W) or (B, 3, H, W) in [0, 1].
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .losses import VGG16_LAYERS, VGGFeatures
from .statefiles import load_state_dict_file


def _batched(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 3:
        return x.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"expected an image (C,H,W) or a batch (B,C,H,W), got shape {tuple(x.shape)}")
    return x


def check_border(border: int, height: int, width: int) -> None:
    """ValueError when cropping ``border`` pixels on every side leaves nothing of a
    ``height`` x ``width`` image (checked before rendering as well as by :func:`crop_border`)."""
    if border > 0 and 2 * border >= min(height, width):
        raise ValueError(f"border {border} leaves nothing of a {height}x{width} image")


def crop_border(image: torch.Tensor, border: int) -> torch.Tensor:
    """Drop ``border`` pixels on every side (ScanNet evaluation crops 20 px)."""
    if border <= 0:
        return image
    h, w = image.shape[-2:]
    check_border(border, h, w)
    return image[..., border : h - border, border : w - border]


def scored_pair(pred: torch.Tensor, target: torch.Tensor, border: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The pixels a rendered view is scored on, by the evaluation (:class:`MetricSuite`) and
    by training's validation alike: both images clamped to [0, 1], ``border`` pixels cropped
    on every side (one rule, so that val/psnr and metrics.json agree on the same view)."""
    return crop_border(pred.clamp(0, 1), border), crop_border(target.clamp(0, 1), border)


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image (B,) in dB; +inf for identical images."""
    pred, target = _batched(pred).double(), _batched(target).double()
    mse = ((pred - target) ** 2).flatten(1).mean(1)
    return (10.0 * torch.log10(data_range**2 / mse)).float()


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Normalised 1-D Gaussian of ``size`` taps."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim_map(
    pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, size: int = 11, sigma: float = 1.5
) -> torch.Tensor:
    """Per-pixel SSIM (B, C, H-size+1, W-size+1) with a separable Gaussian window, valid region only."""
    pred, target = _batched(pred).double(), _batched(target).double()
    if pred.shape != target.shape:
        raise ValueError(f"shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    c = pred.shape[1]
    if min(pred.shape[-2:]) < size:
        raise ValueError(f"image {tuple(pred.shape[-2:])} is smaller than the {size}x{size} SSIM window")
    g = gaussian_window(size, sigma).to(pred.device)
    wx = g.view(1, 1, 1, size).repeat(c, 1, 1, 1)
    wy = g.view(1, 1, size, 1).repeat(c, 1, 1, 1)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(x, wx, groups=c), wy, groups=c)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur(pred), blur(target)
    sxx = blur(pred * pred) - mu_x**2
    syy = blur(target * target) - mu_y**2
    sxy = blur(pred * target) - mu_x * mu_y
    return ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))


def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Mean SSIM per image (B,)."""
    return ssim_map(pred, target, data_range).flatten(1).mean(1).float()


def gradient_energy(image: torch.Tensor) -> torch.Tensor:
    """Mean squared finite difference per image (B,): the squares of every horizontal and
    every vertical neighbour difference of every channel, averaged together. It weights the
    spectrum by 4 sin^2(w/2), so it measures high-frequency energy; a blur lowers it even
    where it keeps the total variation (a blurred step still rises by the full step)."""
    x = _batched(image).double()
    dx = (x[..., :, 1:] - x[..., :, :-1]).flatten(1)
    dy = (x[..., 1:, :] - x[..., :-1, :]).flatten(1)
    if dx.shape[1] + dy.shape[1] == 0:
        raise ValueError(f"a 1x1 image {tuple(x.shape)} has no neighbour differences")
    return (dx.pow(2).sum(1) + dy.pow(2).sum(1)) / (dx.shape[1] + dy.shape[1])


def sharpness_ratio(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """How sharp a rendering is next to its photo, per image (B,): the RMS image gradient of
    ``pred`` over that of ``target``, ``sqrt(gradient_energy(pred) / gradient_energy(target))``,
    over all pixels (the ones PSNR uses). 1.0 = as much fine detail as the photo (exactly
    1.0 for an identical image), < 1 blurrier (a constant image gives 0), > 1 more
    high-frequency energy than the photo: noise, speckle or ringing, not better detail.
    Linear in contrast (``0.5 * target`` gives 0.5). NaN where the photo is flat. PSNR and
    SSIM reward a blurry mean; this number shows it."""
    pred, target = _batched(pred), _batched(target)
    if pred.shape != target.shape:
        raise ValueError(f"shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    ep, et = gradient_energy(pred), gradient_energy(target)
    ratio = torch.where(et > 0, (ep / et.clamp_min(1e-300)).sqrt(), torch.full_like(et, float("nan")))
    return ratio.float()


# LPIPS (VGG variant): unit-normalised VGG-16 features at relu1_2..relu5_3, squared
# differences weighted per channel by learned non-negative 1x1 "lin" layers, spatial mean, summed.
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)
_LPIPS_CHANNELS = (64, 128, 256, 512, 512)


class LPIPSVGG(nn.Module):
    """LPIPS with a VGG-16 backbone (torchvision-format weights) and the 5 linear heads
    (keys ``lin{i}.model.1.weight`` as in the reference release, or ``lin{i}.weight``)."""

    def __init__(self, vgg16_weights: str, lin_weights: str):
        super().__init__()
        self.features = VGGFeatures("vgg16", VGG16_LAYERS, pool="max")
        self.features.load_file(vgg16_weights)
        lin_state = load_state_dict_file(lin_weights)
        self.lins = nn.ParameterList()
        for i, ch in enumerate(_LPIPS_CHANNELS):
            w = None
            for key in (f"lin{i}.model.1.weight", f"lin{i}.weight"):
                if key in lin_state:
                    w = lin_state[key]
                    break
            if w is None:
                raise ValueError(f"{lin_weights}: no LPIPS head for layer {i} (expected key lin{i}.model.1.weight)")
            if w.numel() != ch:
                raise ValueError(f"{lin_weights}: lin{i} has {w.numel()} weights, expected {ch}")
            self.lins.append(nn.Parameter(w.reshape(1, ch, 1, 1).float(), requires_grad=False))
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1))
        self.eval()

    @torch.no_grad()
    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """LPIPS distance per image (B,), inputs in [0, 1]."""
        pred, target = _batched(pred).float(), _batched(target).float()
        a = self.features((pred * 2 - 1 - self.shift) / self.scale, normalize=False)
        b = self.features((target * 2 - 1 - self.shift) / self.scale, normalize=False)
        total = torch.zeros(pred.shape[0], device=pred.device)
        for fa, fb, lin in zip(a, b, self.lins, strict=True):
            fa = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            fb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + ((fa - fb) ** 2 * lin).sum(1).mean((1, 2))
        return total


@dataclass
class MetricSuite:
    """PSNR + SSIM always; LPIPS only with local weights (``lpips_skip_reason`` otherwise)."""

    lpips: LPIPSVGG | None
    lpips_skip_reason: str | None
    border: int = 0

    @classmethod
    def create(
        cls, lpips_vgg_weights: str | None, lpips_lin_weights: str | None, border: int = 0, device: str = "cpu"
    ) -> MetricSuite:
        if not lpips_vgg_weights or not lpips_lin_weights:
            return cls(None, "LPIPS skipped: metrics.lpips_vgg_weights and metrics.lpips_lin_weights "
                       "(local files) are not both configured and nothing can be downloaded", border)
        for path in (lpips_vgg_weights, lpips_lin_weights):
            if not os.path.isfile(path):
                return cls(None, f"LPIPS skipped: weights file not found: {path}", border)
        return cls(LPIPSVGG(lpips_vgg_weights, lpips_lin_weights).to(device), None, border)

    def __call__(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, float | None]:
        """Metrics of one image pair (3,H,W) as plain floats (lpips None when skipped)."""
        pred, target = scored_pair(pred, target, self.border)
        out: dict[str, float | None] = {
            "psnr": float(psnr(pred, target)[0]),
            "ssim": float(ssim(pred, target)[0]),
            "lpips": None,
        }
        if self.lpips is not None:
            dev = next(self.lpips.buffers()).device
            out["lpips"] = float(self.lpips(pred.to(dev), target.to(dev))[0])
        return out


def mean_finite(values: list[float | None]) -> float | None:
    """Average ignoring None; +inf PSNR (identical images) is kept out of the mean."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None
