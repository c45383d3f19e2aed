"""A published-style NPBG++ render, rebuilt from the published algorithm (SPEC sections
2-3) for speed comparisons: the way the published system computes a frame, not its code.

- fp32 everywhere, no inference shortcuts;
- in-plane alignment on the padded ceil(sqrt(H^2 + W^2)) square, resampled back;
- descriptors ``ym + beta^T x(d)`` for every valid point (not only the winners);
- per scale its own z-buffer: a scatter-min of the depths, then a second scatter-min of
  the point indices among the points at the winning depth (the way torch_scatter's
  ``scatter_min`` is used), then a gather of the winners' descriptors and a mask;
- the gated U-Net written out plainly, one module call per convolution with reflect
  padding (``padding_mode='reflect'``), ELU and sigmoid as separate ops.

Pixel coordinates follow the project's contract (``npbgpp_core.rasterizer``): column
``floor((u + 0.5) / W * w_s)`` at every scale, so both pipelines render the same image
(tests/test_published_pipeline.py); at full resolution that is SPEC's
``floor(screen + 0.5)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from npbgpp_core.camera import Camera
from npbgpp_core.models import NPBGPlusPlus
from npbgpp_core.models.aggregator import AggregatedScene
from npbgpp_core.models.alignment import align_camera, warp_images


class PublishedGated(nn.Module):
    """ELU(conv_f(x)) * sigmoid(conv_m(x)), 3x3 convolutions with reflect padding."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv_f = nn.Conv2d(cin, cout, 3, padding=1, padding_mode="reflect")
        self.conv_m = nn.Conv2d(cin, cout, 3, padding=1, padding_mode="reflect")
        self.act = nn.ELU()
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv_f(x)) * self.gate(self.conv_m(x))


class PublishedUNet(nn.Module):
    """The light gated U-Net of SPEC section 3 step 7 (encoder 16/32/48/64/80 with the
    raster of each scale concatenated, decoder 48/24/12/6, 1x1 head)."""

    def __init__(self, in_channels: int = 9, out_channels: int = 3) -> None:
        super().__init__()
        widths = (16, 32, 48, 64, 80)
        self.start = PublishedGated(in_channels, widths[0])
        self.encoder = nn.ModuleList(
            [PublishedGated(widths[i - 1], widths[i] - in_channels) for i in range(1, 5)]
        )
        self.middle = PublishedGated(widths[4], widths[4])
        decoder, cin = [], widths[4]
        for skip, cout in zip((64, 48, 32, 16), (48, 24, 12, 6), strict=True):
            decoder.append(PublishedGated(cin + skip, cout))
            cin = cout
        self.decoder = nn.ModuleList(decoder)
        self.final = nn.Conv2d(cin, out_channels, 1)

    def load_from(self, refiner: nn.Module) -> PublishedUNet:
        """Copy the weights of a :class:`npbgpp_core.models.Refiner` (same network)."""
        pairs = [(self.start, refiner.first), (self.middle, refiner.center)]
        pairs += list(zip(self.encoder, refiner.down, strict=True)) + list(zip(self.decoder, refiner.up, strict=True))
        with torch.no_grad():
            for mine, theirs in pairs:
                for a, b in ((mine.conv_f, theirs.feature), (mine.conv_m, theirs.gate)):
                    a.weight.copy_(b.weight)
                    a.bias.copy_(b.bias)
            self.final.weight.copy_(refiner.head.weight)
            self.final.bias.copy_(refiner.head.bias)
        return self

    def forward(self, rasters: Sequence[torch.Tensor]) -> torch.Tensor:
        x = self.start(rasters[0])
        skips = [x]
        for block, raster in zip(self.encoder, rasters[1:], strict=True):
            x = F.avg_pool2d(x, 2)
            if raster.shape[-2:] != x.shape[-2:]:
                raster = F.interpolate(raster, size=x.shape[-2:], mode="nearest")
            x = torch.cat([block(x), raster], dim=1)
            skips.append(x)
        x = self.middle(x)
        for block, skip in zip(self.decoder, reversed(skips[:-1]), strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.final(x)


def project_points(points: torch.Tensor, camera: Camera) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch3D-style projection (the published rasterizer's): view = X @ R + T, NDC from the focal
    length and principal point, then screen pixels (x right, y down); returns u, v, z."""
    p3d = camera.to_pytorch3d()
    R, T = torch.tensor(p3d["R"]).to(points), torch.tensor(p3d["T"]).to(points)
    (fx, fy), (px, py) = p3d["focal_ndc"], p3d["principal_ndc"]
    view = points @ R + T
    z = view[:, 2]
    ndc_x = fx * view[:, 0] / z + px
    ndc_y = fy * view[:, 1] / z + py
    h, w = camera.image_size
    s = (min(h, w) - 1) / 2.0
    return -(s * ndc_x - (w - 1) / 2.0), -(s * ndc_y - (h - 1) / 2.0), z


def zbuffer_scatter_min(u: torch.Tensor, v: torch.Tensor, z: torch.Tensor, image_size: tuple[int, int],
                        size: tuple[int, int], near: float) -> torch.Tensor:
    """(h, w) index of the nearest point per pixel (-1 empty): scatter-min of depth, then
    scatter-min of the index among the points at the winning depth (lowest index wins ties)."""
    H, W = image_size
    h, w = size
    col = torch.floor((u + 0.5) / W * w)
    row = torch.floor((v + 0.5) / H * h)
    ok = torch.isfinite(u) & torch.isfinite(v) & (z > near) & (col >= 0) & (col < w) & (row >= 0) & (row < h)
    index = torch.nonzero(ok).squeeze(1)
    pix = (row[index] * w + col[index]).long()
    depth = z[index]
    zbuf = torch.full((h * w,), math.inf, device=z.device).scatter_reduce(0, pix, depth, "amin")
    front = depth == zbuf[pix]
    n = u.shape[0]
    ibuf = torch.full((h * w,), n, dtype=torch.long, device=z.device)
    ibuf = ibuf.scatter_reduce(0, pix[front], index[front], "amin")
    return torch.where(ibuf == n, torch.full_like(ibuf, -1), ibuf).view(h, w)


class PublishedStylePipeline:
    """One NPBG++ frame the published way, with the weights of an :class:`NPBGPlusPlus`
    (its basis MLP and refiner, copied into the plain :class:`PublishedUNet`)."""

    def __init__(self, model: NPBGPlusPlus) -> None:
        cfg = model.config
        self.model = model
        self.scales = tuple(cfg.scales)
        self.near = cfg.near
        self.align = cfg.align_during_rendering
        self.world_up = cfg.world_up
        device = model.device
        self.unet = PublishedUNet(model.refiner.in_channels, model.refiner.out_channels)
        self.unet = self.unet.load_from(model.refiner).to(device).eval()

    def descriptors(self, scene: AggregatedScene, camera: Camera) -> tuple[torch.Tensor, torch.Tensor]:
        """Valid points and their descriptors for the target camera (every valid point)."""
        points = scene.points[scene.valid]
        coefficients = scene.coefficients[scene.valid]
        desc = coefficients[:, 0]
        if self.model.basis is not None and coefficients.shape[1] > 1:
            d = points - camera.center().to(points)
            d = d / d.norm(dim=1, keepdim=True)
            x = self.model.basis(d)
            desc = desc + torch.einsum("nk,nkc->nc", x, coefficients[:, 1:])
        return points, desc

    def rasters(self, points: torch.Tensor, desc: torch.Tensor, camera: Camera) -> list[torch.Tensor]:
        u, v, z = project_points(points, camera)
        H, W = camera.image_size
        out = []
        for s in self.scales:
            size = (int(s * H), int(s * W))
            index = zbuffer_scatter_min(u, v, z, (H, W), size, self.near).view(-1)
            hit = index >= 0
            feats = torch.where(hit[:, None], desc[index.clamp_min(0)], torch.zeros_like(desc[:1]))
            img = torch.cat([feats, hit[:, None].to(desc.dtype)], dim=1).T.reshape(1, -1, *size)
            out.append(img)
        return out

    def render_canvas(self, scene: AggregatedScene, camera: Camera) -> torch.Tensor:
        points, desc = self.descriptors(scene, camera)
        return self.unet(self.rasters(points, desc, camera))[0]

    @torch.no_grad()
    def render(self, scene: AggregatedScene, camera: Camera) -> torch.Tensor:
        """(3, H, W) in [0, 1]: rendered on the aligned padded square, resampled back."""
        camera = camera.to(self.model.device)
        if not self.align:
            return self.render_canvas(scene, camera)[:3].clamp(0, 1)
        square, _ = align_camera(camera, self.world_up)
        out = self.render_canvas(scene, square)
        return warp_images(out.unsqueeze(0), square, camera)[0][:3].clamp(0, 1)
