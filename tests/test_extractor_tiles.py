"""The extractor's tiled decoder (gradient-free calls on big images, e.g. aggregating 12-MP
photos at their own size) against the whole-image decoder, on random weights."""

from __future__ import annotations

import math

import pytest
import torch

from npbgpp_core.models import FeatureExtractor, NPBGPlusPlus, NPBGPlusPlusConfig
from npbgpp_core.models import extractor as extractor_module
from tests.test_models import sphere_scene


def random_extractor(seed: int = 0) -> FeatureExtractor:
    """An extractor with every weight random, GroupNorm scales and shifts included (their
    default 1 / 0 would hide a wrong normalisation)."""
    torch.manual_seed(seed)
    model = FeatureExtractor(8).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.5 if p.ndim == 1 else 1.0) / max(1, p[0].numel()) ** 0.5)
    return model


def whole(model: FeatureExtractor, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(images)


@pytest.fixture
def forced_tiles(monkeypatch):
    """``force(tile, halo, margins)``: every gradient-free call tiles, with small tiles (many of
    them, cut by the image border)."""
    def force(tile: int, halo: int = extractor_module.DECODER_HALO,
              margins: tuple[int, ...] = extractor_module.DECODER_MARGINS) -> None:
        monkeypatch.setattr(extractor_module, "TILE_ABOVE_SIDE", 0)
        monkeypatch.setattr(extractor_module, "DECODER_TILE", tile)
        monkeypatch.setattr(extractor_module, "DECODER_HALO", halo)
        monkeypatch.setattr(extractor_module, "DECODER_MARGINS", margins)
    return force


def head_calls(model: FeatureExtractor) -> list[int]:
    """A list that grows by one at each call of the extractor's head: once per whole decode,
    once per tile."""
    calls: list[int] = []
    model.head.register_forward_hook(lambda *_: calls.append(1))
    return calls


def assert_close_relative(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    scale = want.abs().max().item()
    assert scale > 0
    err = (got - want).abs().max().item()
    assert err <= rel * scale, f"max abs difference {err:.3g} > {rel} x {scale:.3g}"


@pytest.mark.parametrize("fast", [True, False])
def test_decoder_reach_is_inside_the_halo_and_margins(fast):
    """The footprint of the gradient of one output pixel w.r.t. every tensor a tile cuts (the
    deepest features and the first skip: DECODER_HALO; each of the first four blocks' outputs
    and the skip that joins it in the next block: that block's DECODER_MARGINS entry), in
    full-resolution pixels, for pixels at every offset within a 32-pixel cell."""
    model = random_extractor()
    model.fast_decoder = fast
    size = 448
    images = torch.rand(1, 3, size, size)
    with torch.no_grad():
        feats = model.encoder((images - model.mean) / model.std)
    bottom = feats[-1].clone().requires_grad_()
    skips = [f.clone().requires_grad_() for f in reversed(feats[:-1])] + [images.clone().requires_grad_()]
    cut, bounds = [bottom, skips[0]], [extractor_module.DECODER_HALO] * 2
    y = bottom
    for j, (block, skip) in enumerate(zip(model.decoder, skips, strict=True)):
        y = block(y, skip, fast)
        if j < 4:
            cut += [y, skips[j + 1]]
            bounds += [extractor_module.DECODER_MARGINS[j]] * 2
    out = model.head(y)
    reach = [0] * len(cut)
    for offset in range(32):
        py, px = 192 + offset, 192 + (offset * 7) % 32
        grads = torch.autograd.grad(out[0, offset % 8, py, px], cut, retain_graph=True)
        for i, (level, grad) in enumerate(zip(cut, grads, strict=True)):
            stride = size // level.shape[-2]
            rows, cols = (grad.abs().sum((0, 1)) > 0).nonzero().unbind(1)
            # the footprint must not touch the image border, or it would be cut short
            assert rows.min() > 0 and cols.min() > 0
            assert rows.max() < level.shape[-2] - 1 and cols.max() < level.shape[-1] - 1
            # a level pixel i covers full-resolution pixels [i * stride, (i + 1) * stride - 1]
            reach[i] = max(reach[i], py - rows.min().item() * stride, (rows.max().item() + 1) * stride - 1 - py,
                           px - cols.min().item() * stride, (cols.max().item() + 1) * stride - 1 - px)
    assert all(r <= b for r, b in zip(reach, bounds, strict=True)), (reach, bounds)
    assert reach[0] > 64  # the deepest features reach past 2 cells of 32 px: the halo is needed


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("tile", [32, 96])
def test_tiled_decode_equals_whole_decode(forced_tiles, fast, tile):
    """K views of an odd size (padded to 320 x 544: tiles cut by the border and by the
    padding), the tiled output equals the whole one to float rounding."""
    model = random_extractor(1)
    model.fast_decoder = fast
    images = torch.rand(3, 3, 301, 517)
    want = whole(model, images)
    forced_tiles(tile)
    calls = head_calls(model)
    got = whole(model, images)
    assert got.shape == want.shape == (3, 8, 301, 517)
    assert len(calls) == -(-320 // tile) * -(-544 // tile)
    assert_close_relative(got, want)


# The reach past the core's own 32-px cells (cores start on multiples of 32), measured like the
# footprint above but from the cell's edge instead of the pixel: 64 px into the deepest features,
# 32 / 16 / 8 / 2 into blocks 1-4's outputs. The module's halo and margins are twice that.
TIGHT_HALO, TIGHT_MARGINS = 64, (32, 16, 8, 2)


@pytest.mark.parametrize("halo, margins, exact", [
    (TIGHT_HALO, TIGHT_MARGINS, True),
    (TIGHT_HALO - 32, TIGHT_MARGINS, False),
    (TIGHT_HALO, (16, 16, 8, 2), False),
    (TIGHT_HALO, (32, 8, 8, 2), False),
    (TIGHT_HALO, (32, 16, 4, 2), False),
    (TIGHT_HALO, (32, 16, 8, 0), False),
])
def test_a_halo_or_margin_below_the_reach_is_not_exact(forced_tiles, halo, margins, exact):
    """The equality depends on every bound: at the reach past the core's cells the tiles are
    exact, and one bound lowered a step (the others kept) makes the map visibly different, so
    the tests' tolerance is not what makes them pass."""
    model = random_extractor(2)
    images = torch.rand(1, 3, 200, 260)
    want = whole(model, images)
    forced_tiles(64, halo, margins)
    calls = head_calls(model)
    got = whole(model, images)
    assert len(calls) == 4 * 5
    err = (got - want).abs().max().item()
    assert (err <= 1e-5 * want.abs().max().item()) == exact, err


@pytest.mark.parametrize("halo, margins", [(32, (64, 32, 16, 8)), (128, (64, 32, 64, 8))])
def test_margins_wider_than_the_box_they_are_cut_from_are_refused(halo, margins):
    """A kept box wider than the box it is cut from would slice from a negative start (the
    reference upsampling then resamples the mis-sized tile without a word): refused."""
    model = random_extractor(6)
    images = torch.rand(1, 3, 96, 128)
    with torch.no_grad():
        top, skips = _levels(model, images)
        with pytest.raises(ValueError, match="at most the halo and the margins before it"):
            model._decode_tiles(top, skips, 32, halo, margins)


def test_forward_many_tiled_equals_whole(forced_tiles):
    """Images of different sizes, NHWC or not, as aggregation's 'bounds' canvases call it."""
    model = random_extractor(3)
    images = [torch.rand(3, 230, 190), torch.rand(3, 130, 250), torch.rand(3, 225, 180)]
    with torch.no_grad():
        wants = [model.forward_many(images, channels_last=cl) for cl in (False, True)]
    forced_tiles(64)
    calls = head_calls(model)
    for channels_last, want in zip((False, True), wants, strict=True):
        with torch.no_grad():
            got = model.forward_many(images, channels_last=channels_last)
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape
            assert_close_relative(g, w)
    # per call, two padded sizes: 256 x 192 (two images, one batch): 4 x 3 tiles; 160 x 256: 3 x 4
    assert len(calls) == 2 * (4 * 3 + 3 * 4)


def test_small_images_and_gradients_decode_whole(forced_tiles):
    """Below TILE_ABOVE_SIDE nothing changes, bit for bit; with a gradient wanted (the
    training step) the decoder never tiles, whatever the size."""
    model = random_extractor(4)
    images = torch.rand(2, 3, 100, 140)
    with torch.no_grad():
        top, skips = _levels(model, images)
        reference = model._decode(top, skips)[..., :100, :140]
    calls = head_calls(model)
    assert torch.equal(whole(model, images), reference)  # default budget: whole, as before
    assert len(calls) == 1
    forced_tiles(32)
    out = model(images)  # grad enabled, the weights require it: whole
    assert out.grad_fn is not None and len(calls) == 2
    assert torch.equal(out.detach(), reference)
    whole(model, images)
    assert len(calls) == 2 + 4 * 5  # the same call without a gradient tiles


@pytest.mark.parametrize("case, tiles", [
    ("inference_mode", True),
    ("frozen weights, grad enabled", True),  # nothing to differentiate: no graph either way
    ("frozen weights, image requires grad", False),  # a caller differentiating w.r.t. the image
    ("no_grad, image requires grad", True),
])
def test_tiling_follows_whether_a_gradient_is_wanted(forced_tiles, case, tiles):
    """Tiles exactly when no gradient can flow through the call; a call that builds a graph
    decodes whole and its gradient w.r.t. the image is the whole decode's."""
    model = random_extractor(7)
    images = torch.rand(1, 3, 96, 128)
    want = whole(model, images)
    forced_tiles(32)
    calls = head_calls(model)
    if case.startswith("frozen"):
        model.requires_grad_(False)
    if case.endswith("image requires grad"):
        images.requires_grad_()
    if case == "inference_mode":
        with torch.inference_mode():
            got = model(images)
    elif case.startswith("no_grad"):
        with torch.no_grad():
            got = model(images)
    else:
        got = model(images)
    assert len(calls) == (3 * 4 if tiles else 1)
    assert got.requires_grad == (case == "frozen weights, image requires grad")
    assert_close_relative(got.detach(), want)


def test_the_threshold_keeps_2048_px_photos_whole_and_tiles_4k_frames():
    """TILE_ABOVE_SIDE sits at the padded side of the largest canvas a 2048-px photo gets (the square
    of its in-plane alignment, ceil(2048 * sqrt 2) = 2897 px, padded to 2912): those decode whole, bit
    for bit as before, while a 3840 x 2160 frame (4K renders' Photo Size) tiles, though it has fewer
    padded pixels than that canvas (the reason the rule is a side, not a pixel count)."""
    def padded(side: int) -> int:
        return -(-side // 32) * 32

    canvas = padded(math.ceil(2048 * math.sqrt(2)))
    assert canvas == 2912 and extractor_module.TILE_ABOVE_SIDE == canvas
    assert padded(3840) > extractor_module.TILE_ABOVE_SIDE and padded(3840) * padded(2160) < canvas * canvas


def test_the_threshold_is_the_padded_long_side(monkeypatch):
    """An image tiles when its padded long side exceeds TILE_ABOVE_SIDE, not at it; one tile
    high (the default 512-px tile over a 96-px image), the tiles run along the width."""
    model = random_extractor(8)
    images = torch.rand(1, 3, 90, 1100)  # padded 96 x 1120
    calls = head_calls(model)
    monkeypatch.setattr(extractor_module, "TILE_ABOVE_SIDE", 1120)
    want = whole(model, images)
    assert len(calls) == 1
    monkeypatch.setattr(extractor_module, "TILE_ABOVE_SIDE", 1119)
    got = whole(model, images)
    assert len(calls) == 1 + 3  # 1120 = 512 + 512 + 96
    assert_close_relative(got, want)


def _levels(model: FeatureExtractor, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    h, w = images.shape[-2:]
    pad = (0, (-w) % 32, 0, (-h) % 32)
    x = torch.nn.functional.pad((images - model.mean) / model.std, pad)
    feats = model.encoder(x)
    return feats[-1], list(reversed(feats[:-1])) + [torch.nn.functional.pad(images, pad)]


@pytest.mark.parametrize("canvas", ["square", "bounds"])
def test_aggregation_with_tiles_equals_whole(forced_tiles, canvas):
    """A scene aggregated with every view's extractor call tiled gives the same descriptors."""
    pts, _, cams, images = sphere_scene(views=3, size=(90, 120))
    torch.manual_seed(0)
    model = NPBGPlusPlus(NPBGPlusPlusConfig(input_canvas=canvas)).eval()
    with torch.no_grad():
        want = model.aggregate(pts, images, cams)
        forced_tiles(32)
        calls = head_calls(model.extractor)
        got = model.aggregate(pts, images, cams)
    assert len(calls) > 3
    assert torch.equal(got.valid, want.valid) and want.valid.any()
    assert_close_relative(got.coefficients, want.coefficients, rel=1e-5)


def test_tiles_keep_the_autocast_dtype(forced_tiles):
    """Under autocast the tiled map has the whole map's lowered dtype (not the input's)."""
    model = random_extractor(5)
    images = torch.rand(1, 3, 96, 128)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(images)
        forced_tiles(32)
        got = model(images)
    assert want.dtype == got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=0.05 * want.float().abs().max().item(), rtol=0)
