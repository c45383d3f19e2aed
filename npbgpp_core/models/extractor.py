"""Per-image feature extractor: a small from-scratch encoder (strides 2..32 with
16/24/40/96/320 channels, inverted-residual blocks with GroupNorm, so each image's
features depend on that image only, in training too: streaming aggregation gives the
same result for any grouping of views) and the published decoder
(5 x [bilinear x2, concat skip, 3x3 conv without bias, LeakyReLU], widths
256/128/64/32/16, raw RGB as the last skip, 1x1 head to ``out_channels``)."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from ..statefiles import load_state_dict_file
from .cpu_paths import upsample_cat_conv3x3

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ENCODER_CHANNELS = (16, 24, 40, 96, 320)
DECODER_CHANNELS = (256, 128, 64, 32, 16)
NORM_GROUPS = 8
# Gradient-free calls on images whose padded long side is above this decode in tiles
# (:meth:`FeatureExtractor._decode_tiles`): a whole call's peak memory is mostly the decoder's
# full-resolution blocks (one 4000 x 3000 image, one thread: 5,625 MiB whole, 1,711 MiB tiled, the
# encoder alone 1,431; BENCHMARKS "Aggregate at own size in tiles"). 2912 is the padded side of the
# largest canvas a photo up to 2048 px gets (the 2897-px square of a 2048 x 2048 photo's in-plane
# alignment), so those decode whole and bit for bit as before, while a 3840 x 2160 photo, which the
# add-on's Photo Size now reads at 4K renders, tiles (3,924 -> 1,193 MiB: BENCHMARKS "The extractor at
# the render sizes Photo Size now follows"). A side, not a pixel count: 3840 x 2176 padded pixels are
# fewer than 2912 x 2912.
TILE_ABOVE_SIDE = 2912
# Core side of a decoder tile, full-resolution pixels, a multiple of 32 (the encoder's stride) so
# every level's slice starts on a whole pixel. DECODER_HALO: the pixels around the core that the
# decoder's inputs (the deepest features and the first skip) are cut with; DECODER_MARGINS: those
# kept around the core after each of the first four blocks (strides 16, 8, 4, 2; the last block
# keeps only the core), each a multiple of its stride. Each covers the reach of the core's output
# into that level, its gradient footprint (tests/test_extractor_tiles.py: 93 px into the deepest
# features, 61 into the first skip, 45 / 21 / 9 / 3 into the outputs of blocks 1-4), so the
# full-resolution blocks, most of the work, compute the core plus 8 px. Measured from the core's
# 32-px cell edges instead of the pixel, what a tile needs is half that (64 and 32 / 16 / 8 / 2,
# exact; one step lower is not): the constants keep a factor of 2.
DECODER_TILE = 512
DECODER_HALO = 128
DECODER_MARGINS = (64, 32, 16, 8)


def _conv_bn_act(
    cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1, act: bool = True
) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.GroupNorm(NORM_GROUPS, cout),
    ]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2-style block: 1x1 expand, depthwise kxk (stride), 1x1 project."""

    def __init__(self, cin: int, cout: int, stride: int = 1, expand: int = 3, kernel: int = 3) -> None:
        super().__init__()
        mid = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn_act(cin, mid, 1))
        layers.append(_conv_bn_act(mid, mid, kernel, stride, groups=mid))
        layers.append(_conv_bn_act(mid, cout, 1, act=False))
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


class Encoder(nn.Module):
    """Five feature levels at strides 2, 4, 8, 16, 32 with 16/24/40/96/320 channels.

    ``weights_file`` is the file its weights were read from (an ``extractor_weights``
    file, or a weights file or trainer checkpoint holding the whole network:
    :func:`npbgpp_core.pretrained.build_network`); None while they are the random
    initialisation, as in a model built from a scene bundle (bundles leave the extractor
    out). The fit's perceptual loss (:class:`npbgpp_core.losses.EncoderFeatureLoss`)
    refuses an encoder without one: a random network's features are no measure of an image."""

    def __init__(self) -> None:
        super().__init__()
        self.weights_file: str | None = None
        c1, c2, c3, c4, c5 = ENCODER_CHANNELS
        self.stages = nn.ModuleList(
            [
                nn.Sequential(_conv_bn_act(3, 32, 3, 2), InvertedResidual(32, c1, 1, expand=1)),
                nn.Sequential(InvertedResidual(c1, c2, 2, 3), InvertedResidual(c2, c2, 1, 3)),
                nn.Sequential(InvertedResidual(c2, c3, 2, 3, kernel=5), InvertedResidual(c3, c3, 1, 3, kernel=5)),
                nn.Sequential(InvertedResidual(c3, c4, 2, 6), InvertedResidual(c4, c4, 1, 3)),
                nn.Sequential(InvertedResidual(c4, c5, 2, 6, kernel=5)),
            ]
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


class DecoderBlock(nn.Module):
    def __init__(self, cin: int, cskip: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin + cskip, cout, 3, padding=1, bias=False)
        self.act = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, fast: bool = True) -> torch.Tensor:
        """Upsample ``x`` to ``skip``'s size, concatenate, convolve; ``fast``: the exact CPU
        speed paths of :mod:`.cpu_paths`, else the reference functions."""
        if not fast:
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            return self.act(self.conv(torch.cat([x, skip], dim=1)))
        return self.act(upsample_cat_conv3x3(x, skip, self.conv.weight))


def _grow(box: tuple[int, int, int, int], m: int, h: int, w: int) -> tuple[int, int, int, int]:
    """``box`` (top, bottom, left, right) grown by ``m`` pixels each side, cut at an h x w image."""
    return max(0, box[0] - m), min(h, box[1] + m), max(0, box[2] - m), min(w, box[3] + m)


def _cut(t: torch.Tensor, box: tuple[int, int, int, int], stride: int) -> torch.Tensor:
    """The part of a level of ``stride`` under ``box`` (full-resolution pixels, multiples of stride)."""
    return t[..., box[0] // stride : box[1] // stride, box[2] // stride : box[3] // stride]


class FeatureExtractor(nn.Module):
    """U-Net: image (K, 3, H, W) in [0, 1] -> feature map (K, out_channels, H, W).

    The image is ImageNet-normalised and zero-padded (after normalisation) at the
    bottom/right to a multiple of 32; the output is cropped back to H x W. Without a gradient
    (aggregation) an image whose padded long side is above ``TILE_ABOVE_SIDE`` is decoded in
    tiles, in bounded decoder memory, equal to the whole decode up to float rounding
    (:meth:`_decode_tiles`).
    """

    def __init__(self, out_channels: int = 8, weights: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.encoder = Encoder()
        skips = list(reversed(ENCODER_CHANNELS[:-1])) + [3]
        cin = ENCODER_CHANNELS[-1]
        blocks = []
        for cskip, cout in zip(skips, DECODER_CHANNELS, strict=True):
            blocks.append(DecoderBlock(cin, cskip, cout))
            cin = cout
        self.decoder = nn.ModuleList(blocks)
        self.head = nn.Conv2d(cin, out_channels, 1)
        # False: the decoder runs the reference functions (F.interpolate + cat, nn.Conv2d)
        # that tests and bench_train compare the CPU speed paths of .cpu_paths against.
        self.fast_decoder = True
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if weights:
            self.load_encoder_weights(weights)

    def load_encoder_weights(self, path: str | os.PathLike) -> None:
        """Load encoder weights from a local ``.safetensors`` or torch state-dict file
        (keys as in ``self.encoder.state_dict()``, optionally prefixed ``encoder.``)."""
        path = os.fspath(path)
        state = load_state_dict_file(path, "extractor_weights")
        state = {k[len("encoder."):] if k.startswith("encoder.") else k: v for k, v in state.items()}
        own = self.encoder.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        wrong = sorted(k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape))
        if missing or unexpected or wrong:
            raise ValueError(
                f"extractor_weights: {path} does not match this encoder: {len(missing)} missing "
                f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
                f"{len(wrong)} with wrong shapes (e.g. {wrong[:3]})"
            )
        self.encoder.load_state_dict(state)
        self.encoder.weights_file = path

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"extractor expects images (K, 3, H, W), got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        x = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        ph, pw = (-h) % 32, (-w) % 32
        x = F.pad(x, (0, pw, 0, ph))
        raw = F.pad(images, (0, pw, 0, ph))
        return self._padded(x, raw)[..., :h, :w]

    def forward_many(self, images: list[torch.Tensor], channels_last: bool = False) -> list[torch.Tensor]:
        """Feature maps of images (3, H_k, W_k) of any sizes, in as few network calls as
        possible: images whose sizes round up to the same multiple of 32 share one call.
        The result equals ``forward`` on each image alone (the padding is the same and
        GroupNorm is per image). ``channels_last`` runs the convolutions in NHWC (faster
        on CPUs)."""
        groups: dict[tuple[int, int], list[int]] = {}
        for k, img in enumerate(images):
            if img.ndim != 3 or img.shape[0] != 3:
                raise ValueError(f"extractor expects images (3, H, W), got {tuple(img.shape)}")
            h, w = img.shape[-2:]
            groups.setdefault((h + (-h) % 32, w + (-w) % 32), []).append(k)
        out: list[torch.Tensor | None] = [None] * len(images)
        for (hp, wp), members in groups.items():
            xs, raws = [], []
            for k in members:
                img = images[k]
                h, w = img.shape[-2:]
                x = (img - self.mean[0].to(img.dtype)) / self.std[0].to(img.dtype)
                xs.append(F.pad(x, (0, wp - w, 0, hp - h)))
                raws.append(F.pad(img, (0, wp - w, 0, hp - h)))
            x, raw = torch.stack(xs), torch.stack(raws)
            if channels_last:
                nhwc = torch.channels_last
                x, raw = x.contiguous(memory_format=nhwc), raw.contiguous(memory_format=nhwc)
            feats = self._padded(x, raw)
            if channels_last:  # NCHW again: the per-point sampling that follows is slow on NHWC
                feats = feats.contiguous()
            for j, k in enumerate(members):
                h, w = images[k].shape[-2:]
                out[k] = feats[j, :, :h, :w]
        return out  # type: ignore[return-value]

    def _padded(self, x: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        """The U-Net on normalised images ``x`` and raw images ``raw`` padded to a multiple of 32.

        The encoder always runs on whole images: its GroupNorms normalise over the whole
        image, so a tile's encoder features would differ from the whole image's. The decoder
        is local (convolutions, bilinear upsampling, LeakyReLU), so a gradient-free call on
        images whose padded long side is above ``TILE_ABOVE_SIDE`` decodes in tiles, equal to
        the whole decode up to float rounding, in a fraction of its memory."""
        feats = self.encoder(x)
        skips = list(reversed(feats[:-1])) + [raw]
        h, w = raw.shape[-2:]
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or raw.requires_grad or any(p.requires_grad for p in self.parameters()))
        if not needs_grad and max(h, w) > TILE_ABOVE_SIDE:
            return self._decode_tiles(feats[-1], skips)
        return self._decode(feats[-1], skips)

    def _decode(self, y: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        """Decoder and head on the deepest features ``y`` and the skips, finest last."""
        for block, skip in zip(self.decoder, skips, strict=True):
            y = block(y, skip, self.fast_decoder)
        return self.head(y)

    def _decode_tiles(
        self, y: torch.Tensor, skips: list[torch.Tensor], tile: int | None = None, halo: int | None = None,
        margins: tuple[int, ...] | None = None,
    ) -> torch.Tensor:
        """:meth:`_decode` tile by tile: each ``tile`` x ``tile`` core of the padded image is
        decoded from the deepest features and the first skip cut over the core plus ``halo``
        pixels each side; after each block but the last only the core plus that block's
        ``margins`` entry is kept (and the next skip cut to match); after the last, the core.
        Cuts stop at the padded image's border, where the tile's zero padding and edge repeat
        are the whole image's; bounds are multiples of each level's stride, so every slice is
        exact. With each halo and margin at least the reach of the core's output into that
        level, every core pixel sees exactly the values the whole decode gives it. None: the
        module's ``DECODER_TILE``, ``DECODER_HALO``, ``DECODER_MARGINS``."""
        tile = DECODER_TILE if tile is None else tile
        halo = DECODER_HALO if halo is None else halo
        margins = DECODER_MARGINS if margins is None else margins
        raw = skips[-1]
        n, _, h, w = raw.shape
        strides = [h // skip.shape[-2] for skip in skips]  # 16, 8, 4, 2, 1
        # Each kept box must lie inside the box it is cut from: a wider margin would slice from a
        # negative start, and the next block's upsampling would silently resample a mis-sized tile.
        widths = (halo, *margins)  # non-increasing, the last >= 0: every one >= 0
        if (tile <= 0 or tile % 32 or halo % 32 or len(margins) != len(skips) - 1
                or any(m % s for m, s in zip(margins, strides, strict=False))
                or any(a < b for a, b in zip(widths, widths[1:], strict=False)) or widths[-1] < 0):
            raise ValueError(f"tile ({tile}) and halo ({halo}) must be multiples of 32, tile > 0, and "
                             f"margins {margins} multiples of the strides {strides[:-1]}, each at most the "
                             "halo and the margins before it, none negative")
        out: torch.Tensor | None = None  # made at the first tile, of its dtype (autocast may lower it)
        for y0 in range(0, h, tile):
            for x0 in range(0, w, tile):
                core = (y0, min(y0 + tile, h), x0, min(x0 + tile, w))
                box = _grow(core, halo, h, w)  # (top, bottom, left, right), full-resolution pixels
                part = _cut(y, box, 32)
                for j, (block, skip, stride) in enumerate(zip(self.decoder, skips, strides, strict=True)):
                    part = block(part, _cut(skip, box, stride), self.fast_decoder)
                    kept = _grow(core, margins[j], h, w) if j < len(margins) else core
                    inner = (kept[0] - box[0], kept[1] - box[0], kept[2] - box[2], kept[3] - box[2])
                    part, box = _cut(part, inner, stride), kept
                part = self.head(part)
                if out is None:
                    out = part.new_empty(n, part.shape[1], h, w)
                out[..., core[0] : core[1], core[2] : core[3]] = part
        assert out is not None  # h, w > 0: at least one tile
        return out
