"""The rendering network: a light gated U-Net over the 5-scale descriptor rasters
(NPBG++'s last step): about 0.46 M parameters, no normalisation, reflect padding.

Two forward paths compute the same function:

- the reference path (training, or whenever autograd is on): one module call per
  convolution, exactly as written in the paper;
- the inference path (``torch.is_grad_enabled()`` is False, e.g. under
  ``torch.inference_mode``): activations in place and, on the CPU, channels-last
  tensors (oneDNN's native layout: no reorders around each convolution) and, for
  blocks with few output channels, the feature and gate convolutions fused into one.
  Results equal the reference path up to float rounding (tests/test_models_speedpaths.py).
  Measured on one AVX-512 core at 512x512: about 300 ms -> 165-210 ms.

Two more paths run on CUDA only (:mod:`.refiner_triton`; the GPU refiner is bound by
memory traffic and elementwise launches): ``impl = "triton"`` fuses everything between
the cuDNN convolutions into Triton kernels, ``impl = "triton_conv"`` runs each whole
gated block (input step, both convolutions, gate) as one Triton kernel. Elsewhere the
setting falls back to the paths above.

Fusing the feature and gate convolutions pays only for the decoder's 24/12/6-channel
blocks: elsewhere the strided channel halves in channels-last cost more than the fused
convolution saves. torch.compile (inductor) was tried: 54 s to compile, 4% faster.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

LEVEL_CHANNELS = (16, 32, 48, 64, 80)
IMPLS = ("torch", "triton", "triton_conv")  # Refiner.impl: inference implementations
DECODER_CHANNELS = (48, 24, 12, 6)
BACKGROUND_LEVELS = (2, 3, 4)  # encoder levels that take the optional background rasters


def _pad(x: torch.Tensor) -> torch.Tensor:
    # Reflect needs at least 2 pixels per side; tiny pyramid levels fall back to replicate.
    mode = "reflect" if min(x.shape[-2:]) >= 2 else "replicate"
    return F.pad(x, (1, 1, 1, 1), mode=mode)


class GatedBlock(nn.Module):
    """ELU(conv3x3_f(x)) * sigmoid(conv3x3_m(x)), reflect padding."""

    impl = "torch"  # set through Refiner.impl (a class default: modules pickled before it load)

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.feature = nn.Conv2d(cin, cout, 3)
        self.gate = nn.Conv2d(cin, cout, 3)
        # CPU inference: few output channels underuse oneDNN's vector width, so one
        # convolution to 2*cout costs about as much as one to cout (measured on AVX-512:
        # the full-resolution decoder block 28->6 takes 32 ms fused vs 50 ms as two).
        self.fuse_on_cpu = cout < 32 and cin > cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _pad(x)
        return F.elu(self.feature(x)) * torch.sigmoid(self.gate(x))

    def forward_inference(self, x: torch.Tensor) -> torch.Tensor:
        """Same function as :meth:`forward` without autograd: activations in place, and
        for blocks with few output channels on the CPU one fused convolution."""
        return self.forward_unpadded(_pad(x))

    def forward_unpadded(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward_inference` on an input already padded by one pixel (the tiled
        refiner passes windows of a larger image)."""
        if self.impl != "torch":
            from . import refiner_triton

            if refiner_triton.supported(x.device):
                if self.impl == "triton_conv":
                    return refiner_triton.gated_conv(self, x, pad=0)
                return refiner_triton.gated_block(self, x)
        if self.fuse_on_cpu and x.device.type == "cpu":
            weight = torch.cat([self.feature.weight, self.gate.weight])
            bias = torch.cat([self.feature.bias, self.gate.bias])
            both = F.conv2d(x, weight.to(x.dtype), bias.to(x.dtype))
            cout = self.feature.out_channels
            # Activations over the whole (channel-contiguous) tensor are faster than on
            # the strided halves; the product gathers the halves into a fresh tensor.
            return torch.mul(F.elu(both)[:, :cout], torch.sigmoid(both)[:, cout:])
        feature = F.elu(self.feature(x), inplace=True)
        return feature.mul_(torch.sigmoid_(self.gate(x)))


class Refiner(nn.Module):
    """Gated U-Net: 5 rasters (B, C_in, h_i, w_i) (feature channels + mask; level i at
    ``int(scale_i * H)``) -> (B, 3 [+1 mask], H, W), unbounded (clamp for display).

    With ``background_channels`` > 0 the forward pass also takes 3 background rasters
    (B, background_channels, h_i, w_i) for the encoder levels :data:`BACKGROUND_LEVELS`:
    each level adds ``background_proj[j](background_j)`` (a 1x1 convolution to the level's
    channels) after concatenating its descriptor raster. The projections start at zero
    (weights and bias), so the network computes exactly the function without them until
    they are trained; omitted backgrounds count as zero (no addition).

    :attr:`impl` picks the inference implementation: 'torch' (default), 'triton' (fused
    kernels between the cuDNN convolutions) or 'triton_conv' (one Triton kernel per
    gated block, convolutions included), both in :mod:`.refiner_triton` and used only on
    CUDA with Triton installed, the torch path elsewhere. Training always runs the
    reference."""

    _impl = "torch"  # see impl (a class default: modules pickled before it load)

    def __init__(self, in_channels: int = 9, out_channels: int = 3, background_channels: int = 0) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.background_channels = background_channels
        c = LEVEL_CHANNELS
        if c[1] <= in_channels:
            raise ValueError(f"refiner input has too many channels ({in_channels})")
        self.first = GatedBlock(in_channels, c[0])
        self.down = nn.ModuleList([GatedBlock(c[i - 1], c[i] - in_channels) for i in range(1, 5)])
        self.center = GatedBlock(c[4], c[4])
        ups = []
        cin = c[4]
        for skip, cout in zip(reversed(c[:4]), DECODER_CHANNELS, strict=True):
            ups.append(GatedBlock(cin + skip, cout))
            cin = cout
        self.up = nn.ModuleList(ups)
        self.head = nn.Conv2d(cin, out_channels, 1)
        with torch.no_grad():
            self.head.bias.fill_(0.5)
        if background_channels > 0:
            self.background_proj = nn.ModuleList(
                [nn.Conv2d(background_channels, c[level], 1) for level in BACKGROUND_LEVELS]
            )
            for proj in self.background_proj:
                nn.init.zeros_(proj.weight)
                nn.init.zeros_(proj.bias)

    @property
    def impl(self) -> str:
        """Inference implementation: 'torch', 'triton' or 'triton_conv' (see the class
        docstring)."""
        return self._impl

    @impl.setter
    def impl(self, value: str) -> None:
        if value not in IMPLS:
            raise ValueError(f"refiner impl must be one of {IMPLS}, got {value!r}")
        self._impl = value
        for block in self.modules():
            if isinstance(block, GatedBlock):
                block.impl = value  # the tiled and bounded executors call the blocks

    def _check(self, rasters: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(rasters) != 5:
            raise ValueError(f"refiner takes 5 rasters (one per scale), got {len(rasters)}")
        rasters = [r if r.ndim == 4 else r.unsqueeze(0) for r in rasters]
        for r in rasters:
            if r.shape[1] != self.in_channels:
                raise ValueError(f"refiner rasters must have {self.in_channels} channels, got {tuple(r.shape)}")
        return rasters

    def _check_background(self, background: Sequence[torch.Tensor] | None) -> list[torch.Tensor] | None:
        if background is None or self.background_channels == 0:
            return None
        if len(background) != len(BACKGROUND_LEVELS):
            raise ValueError(f"refiner takes {len(BACKGROUND_LEVELS)} background rasters, got {len(background)}")
        background = [b if b.ndim == 4 else b.unsqueeze(0) for b in background]
        for b in background:
            if b.shape[1] != self.background_channels:
                raise ValueError(f"background rasters must have {self.background_channels} channels, "
                                 f"got {tuple(b.shape)}")
        return background

    def forward(self, rasters: Sequence[torch.Tensor],
                background: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        rasters = self._check(rasters)
        if not torch.is_grad_enabled():
            return self._forward_inference(rasters, background)
        return self.forward_reference(rasters, background)

    def forward_reference(self, rasters: Sequence[torch.Tensor],
                          background: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """The network as published, one module call per convolution (differentiable)."""
        return self._run(self._check(rasters), self._check_background(background), inference=False)

    def _forward_inference(self, rasters: list[torch.Tensor],
                           background: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """:meth:`forward_reference` with in-place activations, channels-last on the CPU."""
        bg = self._check_background(background)
        if self._impl != "torch":
            from . import refiner_triton

            if refiner_triton.supported(rasters[0].device):
                run = refiner_triton.refine_gemm if self._impl == "triton_conv" else refiner_triton.refine
                return run(self, rasters, bg)
        if rasters[0].device.type == "cpu":
            rasters = [r.contiguous(memory_format=torch.channels_last) for r in rasters]
            if bg is not None:
                bg = [b.contiguous(memory_format=torch.channels_last) for b in bg]
        return self._run(rasters, bg, inference=True).contiguous()

    def _run(self, rasters: Sequence[torch.Tensor], background: Sequence[torch.Tensor] | None,
             inference: bool) -> torch.Tensor:
        """The U-Net; ``inference`` picks each gated block's in-place path."""

        def gated(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
            return block.forward_inference(x) if inference else block(x)

        x = gated(self.first, rasters[0])
        skips = [x]
        for i, block in enumerate(self.down, start=1):
            x = F.avg_pool2d(x, 2)
            r = rasters[i]
            if r.shape[-2:] != x.shape[-2:]:
                r = F.interpolate(r, size=x.shape[-2:], mode="nearest")
            x = torch.cat([gated(block, x), r.to(x.dtype)], dim=1)
            if background is not None and i in BACKGROUND_LEVELS:
                j = BACKGROUND_LEVELS.index(i)
                b = background[j]
                if b.shape[-2:] != x.shape[-2:]:
                    b = F.interpolate(b, size=x.shape[-2:], mode="nearest")
                x = x + self.background_proj[j](b.to(x.dtype))
            skips.append(x)
        x = gated(self.center, x)
        for block, skip in zip(self.up, reversed(skips[:4]), strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = gated(block, torch.cat([x, skip], dim=1))
        return self.head(x)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
