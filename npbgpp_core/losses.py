"""Training losses (as published): VGG-19 perceptual L1 (local torchvision-format weights,
max pools replaced by average pools, features relu1_1..relu5_1) plus L1 between the 4x
downsampled render and target. Without VGG weights: L1 + SSIM instead (announced once).
Masks mark valid pixels; pixels outside them never contribute.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from .statefiles import load_state_dict_file

log = logging.getLogger(__name__)

# torchvision `features` indices: convs and the ReLU after which a feature is taken.
_VGG_CFG = {
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}
VGG19_LAYERS = (1, 6, 11, 20, 29)  # relu1_1, relu2_1, relu3_1, relu4_1, relu5_1
VGG16_LAYERS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class VGGFeatures(nn.Module):
    """The convolutional part of torchvision's VGG, cut after the last requested ReLU."""

    def __init__(self, arch: str, layers: tuple[int, ...], pool: str = "avg"):
        super().__init__()
        self.layers = tuple(layers)
        modules: list[nn.Module] = []
        in_ch = 3
        for v in _VGG_CFG[arch]:
            if len(modules) > max(self.layers):
                break
            if v == "M":
                modules.append(nn.AvgPool2d(2, 2) if pool == "avg" else nn.MaxPool2d(2, 2))
            else:
                modules += [nn.Conv2d(in_ch, int(v), 3, padding=1), nn.ReLU(inplace=False)]
                in_ch = int(v)
        self.body = nn.Sequential(*modules[: max(self.layers) + 1])
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        for p in self.parameters():
            p.requires_grad_(False)

    def load_file(self, path: str) -> None:
        """Load torchvision-format weights: keys ``features.<i>.weight`` (full model) or ``<i>.weight``."""
        state = load_state_dict_file(path)
        own = {}
        for i, m in enumerate(self.body):
            if isinstance(m, nn.Conv2d):
                for name in ("weight", "bias"):
                    for key in (f"features.{i}.{name}", f"{i}.{name}"):
                        if key in state:
                            own[f"{i}.{name}"] = state[key]
                            break
                    else:
                        raise ValueError(f"{path}: missing VGG key features.{i}.{name} (torchvision layout expected)")
        try:
            self.body.load_state_dict(own)
        except RuntimeError as exc:
            raise ValueError(f"{path}: VGG weights do not fit: {exc}") from exc

    def forward(self, x: torch.Tensor, normalize: bool = True) -> list[torch.Tensor]:
        if normalize:
            x = (x - self.mean) / self.std
        out = []
        for i, m in enumerate(self.body):
            x = m(x)
            if i in self.layers:
                out.append(x)
        return out


def masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean absolute error over valid pixels (mask (B,1,H,W) of 0/1; None = all valid)."""
    diff = (pred - target).abs()
    if mask is None:
        return diff.mean()
    weight = mask.expand_as(diff)
    return (diff * weight).sum() / weight.sum().clamp_min(1.0)


def downsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Average-pool by ``factor`` (no-op for 1)."""
    return x if factor == 1 else F.avg_pool2d(x, factor, factor, ceil_mode=True)


def masked_l1_downsampled(pred, target, mask, factor: int) -> torch.Tensor:
    """L1 after ``factor``x average downsampling; the mask is downsampled too (partial pixels weigh less)."""
    if mask is None:
        return masked_l1(downsample(pred, factor), downsample(target, factor))
    m = downsample(mask, factor)
    p = downsample(pred * mask, factor)
    t = downsample(target * mask, factor)
    diff = (p - t).abs()
    return diff.sum() / m.expand_as(diff).sum().clamp_min(1e-6)


def ssim_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """1 - mean SSIM (Gaussian 11x11, sigma 1.5; falls back to a 3x3 window on tiny crops)."""
    from .metrics import gaussian_window

    size = 11 if min(pred.shape[-2:]) >= 11 else 3
    c = pred.shape[1]
    g = gaussian_window(size, 1.5).to(pred)
    win = (g[:, None] * g[None, :]).expand(c, 1, size, size)
    if mask is not None:
        pred, target = pred * mask, target * mask

    def blur(x):
        return F.conv2d(x, win, groups=c)

    mu_x, mu_y = blur(pred), blur(target)
    sxx = blur(pred * pred) - mu_x**2
    syy = blur(target * target) - mu_y**2
    sxy = blur(pred * target) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return 1.0 - s.mean()


def image_gradients(x: torch.Tensor, mask: torch.Tensor | None = None):
    """Forward differences along x and y, (B,C,H,W-1) and (B,C,H-1,W), and their weights
    (1 where both pixels are valid; None without a mask)."""
    dx = x[..., :, 1:] - x[..., :, :-1]
    dy = x[..., 1:, :] - x[..., :-1, :]
    if mask is None:
        return dx, dy, None, None
    return dx, dy, mask[..., :, 1:] * mask[..., :, :-1], mask[..., 1:, :] * mask[..., :-1, :]


def gradient_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, scales: int = 3
) -> torch.Tensor:
    """Multi-scale edge loss: mean over ``scales`` levels (full, 1/2, 1/4, ... by average
    pooling) of the mean absolute difference between the images' forward differences in
    x and y (the two directions averaged). L1 on pixels forgives a blurred edge by half
    its contrast; this term charges for every missing step. Needs no network weights."""
    if scales < 1:
        raise ValueError(f"gradient loss scales must be >= 1, got {scales}")
    total = pred.new_zeros(())
    used = 0
    for level in range(scales):
        f = 2**level
        if min(pred.shape[-2:]) // f < 2:
            break
        p, t = downsample(pred, f), downsample(target, f)
        m = None if mask is None else (downsample(mask, f) > 0.999).to(pred.dtype)
        pdx, pdy, mx, my = image_gradients(p, m)
        tdx, tdy, _, _ = image_gradients(t)
        total = total + 0.5 * (masked_l1(pdx, tdx, mx) + masked_l1(pdy, tdy, my))
        used += 1
    return total / max(used, 1)


class RenderLoss(nn.Module):
    """``vgg_weight * perceptual + l1_weight * L1(4x down)``; without VGG weights
    ``l1_weight * (L1(4x down) + ssim_weight * (1 - SSIM))``; either plus
    ``l1_weight * gradient_weight * gradient_loss`` when ``gradient_weight`` > 0.

    ``mode`` says which one is active ("vgg" or "l1+ssim") and ``message`` why.
    """

    def __init__(
        self,
        vgg_weights: str | None = None,
        vgg_weight: float = 1.0,
        l1_weight: float = 2500.0,
        l1_downsample: int = 4,
        ssim_weight: float = 0.2,
        gradient_weight: float = 0.0,
        gradient_scales: int = 3,
    ):
        super().__init__()
        self.gradient_weight, self.gradient_scales = float(gradient_weight), int(gradient_scales)
        self.vgg_weight, self.l1_weight = float(vgg_weight), float(l1_weight)
        self.l1_downsample, self.ssim_weight = int(l1_downsample), float(ssim_weight)
        self.vgg: VGGFeatures | None = None
        if vgg_weights:
            self.vgg = VGGFeatures("vgg19", VGG19_LAYERS, pool="avg")
            self.vgg.load_file(vgg_weights)
            self.vgg.eval()
            self.mode = "vgg"
            self.message = (
                f"loss: VGG-19 perceptual L1 (weights {vgg_weights}) + {l1_weight:g} x L1 at 1/{l1_downsample}"
            )
        else:
            self.mode = "l1+ssim"
            self.message = (
                "loss: no VGG-19 weights configured (loss.vgg_weights=<local torchvision vgg19 file>): "
                f"using {l1_weight:g} x (L1 at 1/{l1_downsample} + {ssim_weight:g} x (1 - SSIM)) instead of the "
                "perceptual loss"
            )
        if self.gradient_weight > 0:
            self.message += (f"; plus {l1_weight:g} x {gradient_weight:g} x multi-scale gradient L1 "
                             f"({gradient_scales} scales)")

    def train(self, mode: bool = True) -> RenderLoss:
        super().train(mode)
        if self.vgg is not None:
            self.vgg.eval()  # frozen feature extractor
        return self

    def perceptual(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        assert self.vgg is not None
        if mask is not None:
            pred, target = pred * mask, target * mask
        total = pred.new_zeros(())
        for fp, ft in zip(self.vgg(pred), self.vgg(target), strict=True):
            total = total + (fp - ft).abs().mean()
        return total

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Loss of a batch (B,3,H,W) against targets (B,3,H,W); mask (B,1,H,W) of valid pixels."""
        if pred.shape != target.shape:
            raise ValueError(f"render {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        l1 = masked_l1_downsampled(pred, target, mask, self.l1_downsample)
        edges = pred.new_zeros(())
        if self.gradient_weight > 0:
            edges = self.l1_weight * self.gradient_weight * gradient_loss(pred, target, mask, self.gradient_scales)
        if self.vgg is not None:
            return self.vgg_weight * self.perceptual(pred, target, mask) + self.l1_weight * l1 + edges
        return self.l1_weight * (l1 + self.ssim_weight * ssim_loss(pred, target, mask)) + edges


def multiscale_l1(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, factors=(1, 2, 4)
) -> torch.Tensor:
    """Sum of masked L1 at full, 1/2 and 1/4 resolution (coefficient fine-tuning)."""
    return sum(masked_l1_downsampled(pred, target, mask, f) for f in factors)


def _level_mask(mask: torch.Tensor | None, factor: int, like: torch.Tensor) -> torch.Tensor | None:
    """``mask`` average-pooled by ``factor``, 1 only where every covered pixel is valid."""
    return None if mask is None else (downsample(mask, factor) > 0.999).to(like.dtype)


def laplacian_pyramid_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, levels: int = 3
) -> torch.Tensor:
    """Band-pass (edge) loss: mean over ``levels`` Laplacian-pyramid bands of the masked L1
    between the images' bands. Band k is ``G_k - up(G_{k+1})`` with ``G_k`` the image
    average-pooled by 2^k and ``up`` a nearest x2 enlargement, so each band holds only
    the detail lost between two scales: a blurred copy keeps the low bands and loses the
    high ones, which plain L1 weighs by their small share of the pixel error. Needs no
    network weights."""
    if levels < 1:
        raise ValueError(f"laplacian loss levels must be >= 1, got {levels}")
    if pred.shape != target.shape:
        raise ValueError(f"render {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    if mask is not None:
        pred, target = pred * mask, target * mask
    total = pred.new_zeros(())
    used = 0
    for level in range(levels):
        f = 2**level
        if min(pred.shape[-2:]) // (2 * f) < 1:
            break
        bands = []
        for x in (pred, target):
            g = downsample(x, f)
            coarse = F.avg_pool2d(g, 2, 2, ceil_mode=True)
            up = coarse.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)[..., : g.shape[-2], : g.shape[-1]]
            bands.append(g - up)
        total = total + masked_l1(bands[0], bands[1], _level_mask(mask, f, pred))
        used += 1
    return total / max(used, 1)


UNTRAINED_ENCODER = (
    "the perceptual loss (perceptual_weight > 0) needs the trained NPBG++ encoder, but this model's encoder was "
    "never loaded from a weights file: it is randomly initialised (a model built from a scene bundle has no "
    "trained extractor, bundles do not store it). Fit with the model of the NPBG++ weights file "
    "(npbgpp_core.pretrained.load_pretrained_npbgpp; for a bundle npbgpp_core.scene_fit.fitting_model), "
    "or set perceptual_weight=0"
)


class EncoderFeatureLoss(nn.Module):
    """Perceptual loss from a network trained here: a frozen copy of an NPBG++ feature
    extractor's encoder (:class:`npbgpp_core.models.extractor.Encoder`, trained on this
    project's corpus; no downloaded weights). The render and the photo, ImageNet-normalised
    as the extractor sees them, go through its first stages; at each of ``levels``
    (0 = stride 2, 16 channels; 1 = stride 4, 24; 2 = stride 8, 40) the features are scaled
    to unit length over the channels at every position (so that no channel's range
    dominates) and compared by L1, averaged over channels and valid positions; the loss is
    the mean over the levels. The copy's weights never train (no gradient reaches them);
    the gradient flows to the render only.

    The encoder must have been read from a file (its ``weights_file``, see
    :class:`npbgpp_core.models.extractor.Encoder`): ValueError otherwise, since the loss of
    a randomly initialised encoder (that of a model built from a scene bundle) runs without
    error but measures nothing the trained network sees."""

    def __init__(self, encoder: nn.Module, levels: tuple[int, ...] = (0, 1, 2), eps: float = 1e-6):
        super().__init__()
        import copy

        stages = getattr(encoder, "stages", None)
        if not isinstance(stages, nn.ModuleList):
            raise ValueError("the perceptual loss needs an NPBG++ extractor encoder (a .stages ModuleList)")
        if getattr(encoder, "weights_file", None) is None:
            raise ValueError(UNTRAINED_ENCODER)
        levels = tuple(sorted({int(v) for v in levels}))
        if not levels or levels[0] < 0 or levels[-1] >= len(stages):
            raise ValueError(f"perceptual loss levels must be in 0..{len(stages) - 1}, got {levels}")
        self.levels, self.eps = levels, float(eps)
        self.stages = copy.deepcopy(stages[: levels[-1] + 1])
        for p in self.stages.parameters():
            p.requires_grad_(False)
        self.stages.eval()
        from .models.extractor import IMAGENET_MEAN, IMAGENET_STD

        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> EncoderFeatureLoss:
        super().train(mode)
        self.stages.eval()
        return self

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The unit-length features of ``x`` (B, 3, H, W) in [0, 1] at every level."""
        x = (x - self.mean.to(x)) / self.std.to(x)
        out = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.levels:
                out.append(x / (x.pow(2).sum(1, keepdim=True) + self.eps).sqrt())
        return out

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if pred.shape != target.shape:
            raise ValueError(f"render {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        if mask is not None:
            pred, target = pred * mask, target * mask
        with torch.no_grad():
            wanted = self.features(target)
        total = pred.new_zeros(())
        for fp, ft in zip(self.features(pred), wanted, strict=True):
            m = None
            if mask is not None:
                m = F.adaptive_avg_pool2d(mask, fp.shape[-2:]) > 0.999
                m = m.to(fp.dtype)
            total = total + masked_l1(fp, ft, m)
        return total / len(self.levels)


def fft_amplitude_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean absolute difference of the images' amplitude spectra (orthonormal 2-D real FFT
    per channel, so an amplitude is on the scale of a pixel value). It ignores where
    detail lies (the phase) and charges for how much of each frequency is missing: a
    blurred render lacks high-frequency amplitude even where its edges are a pixel off,
    which position-sensitive losses answer with more blur. Masked-out pixels are zeroed
    in both images. Needs no network weights."""
    if pred.shape != target.shape:
        raise ValueError(f"render {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    if mask is not None:
        pred, target = pred * mask, target * mask
    amp_p = torch.fft.rfft2(pred, norm="ortho").abs()
    amp_t = torch.fft.rfft2(target, norm="ortho").abs()
    return (amp_p - amp_t).abs().mean()
