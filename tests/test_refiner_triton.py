"""The fused refiners (npbgpp_core/models/refiner_triton.py: ``impl="triton"``, cuDNN
convolutions + Triton epilogues, and ``impl="triton_conv"``, one implicit-GEMM kernel
per gated block) compute what the torch refiner computes: each Triton kernel against its
torch twin, the whole network against ``Refiner.forward_reference``, and the ``impl``
switch through ``model.render`` and the render service (RenderFrame.refiner_impl).

Without a GPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, numpy
on CPU tensors): the same kernel code, small shapes so the suite stays fast. On a CUDA
machine the same tests run the compiled kernels on the GPU."""

from __future__ import annotations

import math
import platform
import sys

import pytest
import torch
import torch.nn.functional as F

from npbgpp_core.models import GatedBlock, NPBGPlusPlus, NPBGPlusPlusConfig, Refiner
from npbgpp_core.models import refiner_triton as rt
from npbgpp_core.models.refiner import _pad
from npbgpp_core.rasterizer import DEFAULT_SCALES

if sys.platform == "linux" and platform.machine() == "x86_64":
    import triton  # noqa: F401 - pinned in requirements.txt for this platform: must be there
else:  # pragma: no cover - no Triton wheel elsewhere
    pytest.importorskip("triton")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ATOL = 2e-5 if DEVICE.type == "cpu" else 1e-4  # cuDNN picks other algorithms for the stacked conv


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    """Triton's interpreter on a machine without a GPU (the kernels are built per mode)."""
    if DEVICE.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert rt.supported(DEVICE)
    # fp32 against fp32: no TF32 in cuDNN's convolutions for these comparisons.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 2).to(DEVICE)


def test_gate_kernel_equals_elu_times_sigmoid_into_views():
    both = randn(2, 10, 7, 9)
    extra = randn(2, 3, 7, 9, seed=1)
    want = torch.cat([F.elu(both[:, :5]) * torch.sigmoid(both[:, 5:]), extra], 1)
    torch.testing.assert_close(rt.gate(both, extra=extra), want, atol=1e-6, rtol=1e-6)
    # Into a channel slice of a larger buffer; a channels-last (strided) source.
    buf = torch.full((2, 8, 7, 9), 7.0, device=DEVICE)
    rt.gate(both.contiguous(memory_format=torch.channels_last), out=buf[:, 3:])
    torch.testing.assert_close(buf[:, 3:], want[:, :5], atol=1e-6, rtol=1e-6)
    assert (buf[:, :3] == 7).all()  # nothing written outside the view
    with pytest.raises(ValueError, match="does not fit"):
        rt.gate(both, out=buf)


@pytest.mark.parametrize(("shape", "pool"), [
    ((2, 4, 9, 11), 1), ((1, 3, 2, 7), 1), ((1, 3, 3, 1), 1), ((1, 2, 1, 1), 1),
    ((2, 4, 9, 11), 2), ((1, 3, 2, 7), 2), ((1, 3, 3, 5), 2),  # pooled to 1 row: replicate
])
def test_pool_pad_kernel_equals_avg_pool_and_pad(shape, pool):
    x = randn(*shape)
    want = _pad(F.avg_pool2d(x, 2) if pool == 2 else x)  # reflect, or replicate below 2 pixels
    torch.testing.assert_close(rt.pool_pad(x, pool), want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(("small", "large"), [((4, 6), (9, 13)), ((2, 3), (4, 6)), ((1, 2), (2, 4)), ((1, 1), (1, 3))])
def test_up_cat_pad_kernel_equals_interpolate_cat_pad(small, large):
    x = randn(2, 5, *small)
    skip = randn(2, 3, *large, seed=1)
    up = F.interpolate(x, size=large, mode="bilinear", align_corners=False)
    want = _pad(torch.cat([up, skip], 1))
    torch.testing.assert_close(rt.up_cat_pad(x, skip), want, atol=1e-5, rtol=1e-5)


def random_block(cin: int, cout: int) -> GatedBlock:
    torch.manual_seed(2)
    return GatedBlock(cin, cout).to(DEVICE).eval()


@pytest.mark.parametrize(("shape", "pad"), [((2, 21, 9, 11), 1), ((2, 21, 9, 11), 0), ((1, 21, 1, 3), 1)])
def test_gated_conv_kernel_equals_gated_block(shape, pad):
    block = random_block(21, 6)
    x = randn(*shape)
    with torch.inference_mode():
        want = block.forward_unpadded(x) if pad == 0 else block(x)  # 1-pixel rows: replicate padding
        torch.testing.assert_close(rt.gated_conv(block, x, pad=pad), want, atol=ATOL, rtol=1e-5)
        # into a channel slice of a larger buffer, from a channels-last (strided) input
        buf = torch.full((shape[0], 9, *want.shape[-2:]), 7.0, device=DEVICE)
        rt.gated_conv(block, x.contiguous(memory_format=torch.channels_last), pad=pad, out=buf[:, 2:8])
    torch.testing.assert_close(buf[:, 2:8], want, atol=ATOL, rtol=1e-5)
    assert (buf[:, :2] == 7).all() and (buf[:, 8:] == 7).all()


def test_gated_conv_kernel_pools_and_upsamples_its_input():
    block = random_block(21, 6)
    with torch.inference_mode():
        y = randn(2, 21, 10, 13)  # odd width: avg_pool2d drops the last column
        torch.testing.assert_close(rt.gated_conv(block, y, mode=1), block(F.avg_pool2d(y, 2)), atol=ATOL, rtol=1e-5)
        x, skip = randn(2, 13, 4, 6), randn(2, 8, 9, 13, seed=1)
        up = F.interpolate(x, size=(9, 13), mode="bilinear", align_corners=False)
        torch.testing.assert_close(rt.gated_conv(block, x, mode=2, skip=skip), block(torch.cat([up, skip], 1)),
                                   atol=ATOL, rtol=1e-5)
        with pytest.raises(ValueError, match="21 channels"):
            rt.gated_conv(block, x, mode=2, skip=skip[:, :4])


def random_refiner(background_channels: int = 0) -> Refiner:
    torch.manual_seed(1)
    refiner = Refiner(9, 3, background_channels=background_channels)
    with torch.no_grad():  # the zero-initialised background projections too
        for p in refiner.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.3)
    return refiner.to(DEVICE).eval()


# Odd levels (nearest-resampled rasters); a 1-pixel-high coarsest level (replicate padding).
@pytest.mark.parametrize(("impl", "H", "W"), [("triton", 37, 22), ("triton", 16, 32), ("triton_conv", 16, 32)])
def test_fused_refiner_equals_reference(impl, H, W):
    refiner = random_refiner()
    rasters = [randn(2, 9, int(s * H), int(s * W), seed=i) for i, s in enumerate(DEFAULT_SCALES)]
    # Channels-last strided rasters, as rasterize_descriptors returns them.
    permuted = [r.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2) for r in rasters]
    ref = refiner.forward_reference(rasters)
    with torch.inference_mode():
        # (The implicit-GEMM kernels are slow to interpret: one call each.)
        fused = (rt.refine_gemm if impl == "triton_conv" else rt.refine)(refiner, permuted)
        refiner.impl = impl
        dispatched = refiner(rasters) if impl == "triton" else rt.refine(refiner, rasters)
    assert fused.shape == ref.shape == (2, 3, H, W)
    torch.testing.assert_close(fused, ref, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(dispatched, ref, atol=ATOL, rtol=1e-5)
    assert (ref - ref.mean()).abs().max() > 1e-2  # not a constant image


@pytest.mark.parametrize("impl", ["triton", "triton_conv"])
def test_fused_refiner_with_background_and_updated_weights(impl):
    refiner = random_refiner(background_channels=9)
    H, W = 32, 24
    rasters = [randn(1, 9, int(s * H), int(s * W), seed=i) for i, s in enumerate(DEFAULT_SCALES)]
    background = [randn(1, 9, int(s * H), int(s * W), seed=10 + i) for i, s in enumerate(DEFAULT_SCALES[2:])]
    refiner.impl = impl
    for _ in range(2):  # the stacked weights are cached: an in-place update must reach them
        ref = refiner.forward_reference(rasters, background)
        with torch.inference_mode():
            fused = refiner(rasters, background)
        torch.testing.assert_close(fused, ref, atol=ATOL, rtol=1e-5)
        with torch.no_grad():
            refiner.up[-1].gate.weight.mul_(-1.5)
            refiner.first.feature.bias.add_(0.5)


@pytest.mark.parametrize("impl", ["triton", "triton_conv"])
def test_impl_is_checked_and_falls_back_to_torch_where_unsupported(monkeypatch, impl):
    refiner = random_refiner()
    with pytest.raises(ValueError, match="impl"):
        refiner.impl = "cuda"
    refiner.impl = impl
    assert {b.impl for b in refiner.modules() if isinstance(b, GatedBlock)} == {impl}
    monkeypatch.setattr(rt, "supported", lambda device: False)
    calls = []
    for name in ("refine", "refine_gemm", "gated_block", "gated_conv"):
        monkeypatch.setattr(rt, name, lambda *a, **k: calls.append(a))
    rasters = [randn(1, 9, int(s * 16), int(s * 16), seed=i) for i, s in enumerate(DEFAULT_SCALES)]
    with torch.inference_mode():
        out = refiner(rasters)
    assert calls == []
    torch.testing.assert_close(out, refiner.forward_reference(rasters), atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize(("impl", "whole", "block"), [("triton", "refine", "gated_block"),
                                                     ("triton_conv", "refine_gemm", "gated_conv")])
def test_model_render_selects_the_fused_refiner_also_for_rolled_views(monkeypatch, impl, whole, block):
    from npbgpp_core.camera import Camera
    from npbgpp_core.models.aggregator import AggregatedScene

    torch.manual_seed(0)
    model = NPBGPlusPlus(NPBGPlusPlusConfig()).to(DEVICE).eval()
    g = torch.Generator().manual_seed(0)
    pts = torch.randn(2000, 3, generator=g)
    scene = AggregatedScene((pts / pts.norm(dim=1, keepdim=True)).to(DEVICE),
                            torch.randn(2000, 7, 8, generator=g).to(DEVICE), torch.ones(2000, dtype=torch.bool))
    cam = Camera.look_at((2.0, 0.8, -2.0), (0, 0, 0), fov_x_deg=50, image_size=(16, 24)).to(DEVICE)
    calls = {"refine": 0, "block": 0}
    refine, gated_block = getattr(rt, whole), getattr(rt, block)

    def count(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(rt, whole, count("refine", refine))
    monkeypatch.setattr(rt, block, count("block", gated_block))
    # Roll 45: the tiled (exact) and the band (bounded) executors call the blocks (both
    # through GatedBlock.forward_unpadded; the band executor only once, slow to interpret).
    cases = [(0.0, "exact"), (math.radians(45), "exact")] + [(math.radians(45), "bounded")] * (impl == "triton")
    for roll, context in cases:
        view = cam.rotated_in_plane(roll) if roll else cam
        want = model.render(scene, view, roll_context=context)
        before = dict(calls)
        got = model.render(scene, view, roll_context=context, refiner_impl=impl)
        assert model.refiner.impl == "torch"  # the override is for that call only
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
        assert calls != before
    assert calls["refine"] >= 1 and calls["block"] >= 1


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["triton", "triton_conv"])
def test_fused_refiner_compiled_on_cuda_at_1080p_fp32_and_fp16(impl):
    """The compiled kernels at the size the GPU benchmark times (bench/gpu_speed.py), fp32
    without TF32 (the fixture) and fp16 autocast."""
    refiner = random_refiner()
    H, W = 1080, 1920
    rasters = [randn(1, 9, int(s * H), int(s * W), seed=i) for i, s in enumerate(DEFAULT_SCALES)]
    with torch.inference_mode():
        ref = refiner(rasters)
        refiner.impl = impl
        torch.testing.assert_close(refiner(rasters), ref, atol=1e-4, rtol=1e-4)
        half = [r.half() for r in rasters]
        with torch.autocast("cuda", dtype=torch.float16):
            fused16 = refiner(half)
        refiner.impl = "torch"
        with torch.autocast("cuda", dtype=torch.float16):
            ref16 = refiner(half)
    assert fused16.dtype == ref16.dtype
    torch.testing.assert_close(fused16.float(), ref16.float(), atol=3e-2, rtol=0)


# Without a GPU the interpreter checks what the kernels compute, not that Triton's compiler
# accepts them (it is laxer about types and shapes): compile them ahead of time for an
# H100 (sm_90; Triton ships ptxas, no GPU or driver needed) in the variants the launchers
# use at 1080p, so a lent GPU's time is not spent on a kernel that does not build.
POINTERS = {"src", "dst", "extra", "x", "skip", "wf", "wg", "bf", "bg"}


def _compile_for_h100(kernel, dtype: str, constexprs: dict) -> dict:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {p.name: "constexpr" if p.is_constexpr else f"*{dtype}" if p.name in POINTERS
                 else "fp32" if p.name.startswith("scale") else "i32" for p in kernel.params}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32))
    return compiled.asm


def test_kernels_compile_for_an_h100_without_a_gpu(monkeypatch, tmp_path):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the compiled kernels, not the interpreted ones
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # really compile
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    k = rt._kernels()
    elementwise = {"BLOCK_C": rt.BLOCK_C, "BLOCK_P": rt.BLOCK_P}
    builds = [
        (k.gate, "fp16", elementwise),
        (k.pool_pad, "fp32", {"POOL": 2, "REFLECT": True, **elementwise}),
        (k.pool_pad, "fp32", {"POOL": 1, "REFLECT": False, **elementwise}),
        (k.up_cat_pad, "fp32", {"REFLECT": True, **elementwise}),
        # first block; the first encoder level; the last decoder block in fp16; tiles (ieee)
        (k.gated_conv, "fp32", {"MODE": 0, "PAD": 1, "REFLECT": True, "PRECISION": "tf32",
                                **rt.conv_tiles(9, 16, 1920 * 1080)}),
        (k.gated_conv, "fp32", {"MODE": 1, "PAD": 1, "REFLECT": True, "PRECISION": "tf32",
                                **rt.conv_tiles(16, 23, 960 * 540)}),
        (k.gated_conv, "fp16", {"MODE": 2, "PAD": 1, "REFLECT": True, "PRECISION": "tf32",
                                **rt.conv_tiles(28, 6, 1920 * 1080)}),
        (k.gated_conv, "fp32", {"MODE": 0, "PAD": 0, "REFLECT": False, "PRECISION": "ieee",
                                **rt.conv_tiles(144, 48, 64 * 64)}),
    ]
    ptx = []
    for kernel, dtype, constexprs in builds:
        asm = _compile_for_h100(kernel, dtype, constexprs)
        assert asm["cubin"] and ".target sm_90" in asm["ptx"]
        ptx.append(asm["ptx"])
    # The implicit GEMM runs on tensor cores in TF32 and fp16 (IEEE fp32 on FMA units).
    assert all("mma" in text for text in ptx[4:7]) and "mma" not in ptx[7]


# --------------------------------------------------------------------------- the service
def _service_with_bundle(tmp_path, device: str):
    """A RenderService holding a random NPBG++ bundle on ``device``, and a 16x24 camera."""
    from npbgpp_core import protocol as P
    from npbgpp_core.camera import Camera
    from npbgpp_core.scene import NeuralScene
    from npbgpp_core.service import RenderService

    torch.manual_seed(0)
    model = NPBGPlusPlus(NPBGPlusPlusConfig()).eval()
    g = torch.Generator().manual_seed(0)
    pts = torch.randn(2000, 3, generator=g)
    path = str(tmp_path / "s.npbgpp")
    NeuralScene(pts / pts.norm(dim=1, keepdim=True), None, "npbgpp", torch.randn(2000, 7, 8, generator=g),
                torch.ones(2000, dtype=torch.bool), model.config.to_dict(), model.state_dict()).save(path)
    service = RenderService()
    assert isinstance(service.handle(P.LoadBundle(path, device=device)), P.BundleInfo)
    cam = Camera.look_at((2.0, 0.8, -2.0), (0, 0, 0), fov_x_deg=50, image_size=(16, 24))
    return service, P.CameraSpec.from_camera(cam)


def test_service_runs_and_reports_torch_where_the_fused_refiner_cannot_run(monkeypatch, tmp_path):
    """On the CPU without Triton's interpreter a fused choice renders with torch, and the
    frame says so (and why); bad names are refused naming the field."""
    import numpy as np

    from npbgpp_core import protocol as P
    from npbgpp_core.models.refiner import IMPLS

    assert P.REFINER_IMPLS == IMPLS
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    service, spec = _service_with_bundle(tmp_path, "CPU")
    want = service.handle(P.RenderFrame(spec, "bundle", neural=True))
    assert (want.refiner, want.note) == ("torch", "")
    for impl in ("triton", "triton_conv"):
        got = service.handle(P.RenderFrame(spec, "bundle", neural=True, refiner_impl=impl))
        assert got.refiner == "torch" and "CUDA only" in got.note and not got.compiling, got
        assert np.array_equal(got.pixels, want.pixels)
    points_only = service.handle(P.RenderFrame(spec, "bundle", refiner_impl="triton"))
    assert points_only.refiner == "" and points_only.note == ""  # no network ran
    bad = service.handle(P.RenderFrame(spec, "bundle", neural=True, refiner_impl="cuda"))
    assert isinstance(bad, P.Failure) and "refiner_impl" in bad.error


@pytest.mark.parametrize("impl", ["triton", "triton_conv"])
def test_service_compiles_the_fused_refiner_aside_then_renders_with_it(monkeypatch, tmp_path, impl):
    """As on CUDA (here: the interpreter, told it compiles): the first viewport frame runs
    torch while a thread compiles the kernels, saying so; a frame that waits (F12) and the
    frames after it run the fused refiner, equal to torch's frame; torch again on request."""
    import threading

    import numpy as np

    from npbgpp_core import protocol as P
    from npbgpp_core import service as S

    monkeypatch.setattr(S, "fused_kernels_compile", lambda device: True)
    release = threading.Event()
    compile_and_render = S.KernelWarmup._run

    def held(self, *args):  # the compilation is still running at the first frame
        release.wait(60)
        compile_and_render(self, *args)

    monkeypatch.setattr(S.KernelWarmup, "_run", held)
    service, spec = _service_with_bundle(tmp_path, DEVICE.type.upper())
    want = service.handle(P.RenderFrame(spec, "bundle", neural=True))
    first = service.handle(P.RenderFrame(spec, "bundle", neural=True, refiner_impl=impl))
    assert (first.refiner, first.note, first.compiling) == ("torch", "compiling fused kernels...", True), first
    assert np.array_equal(first.pixels, want.pixels)
    release.set()
    waited = service.handle(P.RenderFrame(spec, "bundle", neural=True, refiner_impl=impl, wait_for_kernels=True))
    assert (waited.refiner, waited.note, waited.compiling) == (impl, "", False), waited
    np.testing.assert_allclose(waited.pixels, want.pixels, atol=1e-4, rtol=0)
    assert np.abs(waited.pixels[..., P.NEURAL] - 0.5).max() > 1e-2  # not a flat image
    again = service.handle(P.RenderFrame(spec, "bundle", neural=True, refiner_impl=impl))
    assert again.refiner == impl and not again.compiling and np.array_equal(again.pixels, waited.pixels)
    back = service.handle(P.RenderFrame(spec, "bundle", neural=True))
    assert back.refiner == "torch" and np.array_equal(back.pixels, want.pixels)


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["triton", "triton_conv"])
def test_service_compiles_into_tritons_disk_cache_on_cuda(monkeypatch, tmp_path, impl):
    """The real thing on a GPU: a fresh kernel cache, kernels compiled on the service's
    thread, written to TRITON_CACHE_DIR (what a later worker loads instead of compiling),
    then frames with the fused refiner equal to torch's."""
    import numpy as np

    from npbgpp_core import protocol as P

    cache = tmp_path / "triton"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    rt._build_kernels.cache_clear()  # new kernel objects: nothing compiled in this process yet
    service, spec = _service_with_bundle(tmp_path, "CUDA")
    want = service.handle(P.RenderFrame(spec, "bundle", neural=True))
    first = service.handle(P.RenderFrame(spec, "bundle", neural=True, refiner_impl=impl))
    assert first.refiner in ("torch", impl), first  # torch unless the thread was already done
    waited = service.handle(P.RenderFrame(spec, "bundle", neural=True, refiner_impl=impl, wait_for_kernels=True))
    assert (waited.refiner, waited.note) == (impl, ""), waited
    np.testing.assert_allclose(waited.pixels, want.pixels, atol=1e-4, rtol=0)
    assert any(cache.rglob("*.cubin")), "no compiled kernel in TRITON_CACHE_DIR"


def test_service_falls_back_to_torch_when_the_kernels_fail(monkeypatch, tmp_path):
    """A compilation that raises leaves torch running, and every frame says why."""
    import numpy as np

    from npbgpp_core import protocol as P
    from npbgpp_core import service as S

    def broken(*args, **kwargs):
        raise RuntimeError("ptxas failed")

    monkeypatch.setattr(S, "fused_kernels_compile", lambda device: True)
    monkeypatch.setattr(rt, "refine", broken)
    service, spec = _service_with_bundle(tmp_path, DEVICE.type.upper())
    want = service.handle(P.RenderFrame(spec, "bundle", neural=True))
    got = service.handle(P.RenderFrame(spec, "bundle", neural=True, refiner_impl="triton", wait_for_kernels=True))
    assert got.refiner == "torch" and got.note == "fused kernels failed: RuntimeError: ptxas failed", got
    assert not got.compiling  # failed, not compiling: the viewport does not keep asking
    assert np.array_equal(got.pixels, want.pixels)
