"""The CUDA kernel's arithmetic, run on the CPU, against the torch reference bit for bit.

kernels/csrc/rasterizer_math.h holds every float operation, the culling, the key packing,
the pixel mapping and the pyramid pooling of the CUDA kernels. Here it is compiled for the
host (g++ -ffp-contract=off: one IEEE rounding per operation, as __fmul_rn/__fadd_rn/
__fdiv_rn on the device) behind the same interface as the CUDA extension, and driven by
the real ``kernels.CudaRasterizer`` (pyramid plan, chunking, index offsets). Only the
atomics and the launch code are left to the GPU tests.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import kernels
from npbgpp_core import rasterizer as R
from npbgpp_core.camera import Camera

pytestmark = pytest.mark.filterwarnings("ignore:rasterize. dropping")
CSRC = Path(kernels.__file__).resolve().parent / "csrc"


class HostExtension:
    """The CUDA extension's rasterize_points/min_pool_keys, backed by the host build."""

    def __init__(self, library: Path) -> None:
        self.lib = ctypes.CDLL(str(library))

    @staticmethod
    def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
        assert t.is_contiguous() and t.device.type == "cpu"
        return ctypes.c_void_p(t.data_ptr())

    def rasterize_points(self, points, rotation, translation, fx, fy, cx, cy, width, height, near, images, offset):
        assert points.dtype == torch.float32 and rotation.dtype == torch.float32
        params = torch.tensor([fx, fy, cx, cy, width, height, near], dtype=torch.float32)
        # every value must already be exact in float32 (RasterParams guarantees it)
        assert params.double().tolist() == [float(v) for v in (fx, fy, cx, cy, width, height, near)]
        count = len(images)
        keys = (ctypes.c_void_p * count)(*[k.data_ptr() for k in images])
        heights = (ctypes.c_int * count)(*[k.shape[0] for k in images])
        widths = (ctypes.c_int * count)(*[k.shape[1] for k in images])
        self.lib.npbgpp_host_rasterize(
            self._ptr(points), ctypes.c_longlong(points.shape[0]), ctypes.c_longlong(offset), self._ptr(rotation),
            self._ptr(translation), self._ptr(params), ctypes.c_int(count), keys, heights, widths,
        )

    def min_pool_keys(self, fine: torch.Tensor, coarse: torch.Tensor) -> None:
        (hf, wf), (h, w) = fine.shape, coarse.shape
        assert hf % h == 0 and wf % w == 0
        self.lib.npbgpp_host_min_pool(
            self._ptr(fine), ctypes.c_int(wf), self._ptr(coarse), ctypes.c_int(h), ctypes.c_int(w),
            ctypes.c_int(hf // h), ctypes.c_int(wf // w),
        )


    def gather_forward(self, index: torch.Tensor, features: torch.Tensor, background: torch.Tensor | None):
        assert features.dtype == torch.float32 and index.dtype == torch.int64
        h, w = index.shape
        c = features.shape[1]
        out = torch.empty(c + 1, h, w)
        self.lib.npbgpp_host_gather_forward(
            self._ptr(index), ctypes.c_longlong(h * w), self._ptr(features), ctypes.c_longlong(features.shape[0]),
            ctypes.c_longlong(c), None if background is None else self._ptr(background), self._ptr(out),
        )
        return out

    def gather_backward(self, index: torch.Tensor, grad_out: torch.Tensor, num_points: int) -> torch.Tensor:
        c = grad_out.shape[0] - 1
        accum = torch.zeros(num_points, c)
        self.lib.npbgpp_host_gather_backward(
            self._ptr(index), ctypes.c_longlong(index.numel()), self._ptr(grad_out), ctypes.c_longlong(num_points),
            ctypes.c_longlong(c), self._ptr(accum),
        )
        return accum


@pytest.fixture(scope="module")
def host_rasterizer(tmp_path_factory: pytest.TempPathFactory) -> kernels.CudaRasterizer:
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    library = tmp_path_factory.mktemp("host") / "libnpbgpp_host.so"
    cmd = [cxx, "-std=c++20", "-O2", "-ffp-contract=off", "-fno-fast-math", "-Wall", "-Wextra", "-Werror",
           "-shared", "-fPIC", "-I", str(CSRC), "-o", str(library), str(CSRC / "host_harness.cpp")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return kernels.CudaRasterizer(HostExtension(library))


def _camera(image_size, eye=(0.3, -0.2, -3.0)) -> Camera:
    return Camera.look_at(eye, (0.0, 0.0, 0.0), (0.0, 1.0, 0.0), 55.0, image_size)


def _cloud(n: int, camera: Camera, seed: int) -> torch.Tensor:
    """Mostly visible points plus: far/outside points, points behind or at the camera,
    points unprojected from pixel boundaries, exact duplicates (ties), NaN/inf rows."""
    g = torch.Generator().manual_seed(seed)
    h, w = camera.image_size
    k = n // 5 + 1
    uv = torch.stack([torch.randint(0, w + 1, (k,), generator=g) - 0.5,
                      torch.randint(0, h + 1, (k,), generator=g) - 0.5], dim=1).double()
    boundary = camera.to("cpu", torch.float64).unproject_pixels(uv, torch.rand(k, generator=g).double() * 3 + 1)
    cloud = torch.cat([
        torch.rand(n, 3, generator=g) * 4 - 2,
        torch.rand(n // 10 + 1, 3, generator=g) * 40 - 20,
        camera.center().float() + torch.randn(n // 20 + 1, 3, generator=g) * 0.5,
        boundary.float(),
    ])
    cloud = torch.cat([cloud, cloud[torch.randint(0, cloud.shape[0], (n // 5 + 1,), generator=g)]])
    cloud = cloud[torch.randperm(cloud.shape[0], generator=g)].contiguous()
    cloud[:3] = torch.tensor([[float("nan"), 0, 1], [0, float("inf"), 1], [0, 0, float("-inf")]])
    return cloud


def _check(rasterizer: kernels.CudaRasterizer, points, camera, scales, near=1e-3, **kwargs) -> list[torch.Tensor]:
    params = R.raster_params(camera, scales, near, points.device)
    want = R.rasterize_keys_torch(points, params)
    got = rasterizer.rasterize_keys(points, params, device=torch.device("cpu"), **kwargs)
    assert [tuple(g.shape) for g in got] == [tuple(w.shape) for w in want]
    for s, (g, w) in enumerate(zip(got, want, strict=True)):
        diff = (g != w).nonzero()
        assert diff.numel() == 0, f"scale {s} {tuple(w.shape)}: {diff.shape[0]} pixels differ, e.g. {diff[:3].tolist()}"
    return want


@pytest.mark.parametrize("image_size", [(64, 48), (37, 91), (1080, 1920)])
@pytest.mark.parametrize(
    "scales", [R.DEFAULT_SCALES, (1.0, 0.3, 0.5, 0.7, 0.125), (2.0, 1.0, 0.1)], ids=["default", "odd", "upscaled"]
)
def test_kernel_math_matches_reference(host_rasterizer, image_size, scales) -> None:
    camera = _camera(image_size)
    want = _check(host_rasterizer, _cloud(20_000, camera, seed=image_size[1]), camera, scales)
    assert all(bool((k != R.EMPTY_KEY).any()) for k in want)  # every scale got points


def test_kernel_math_chunked_with_index_offsets(host_rasterizer) -> None:
    camera = _camera((90, 120))
    points = _cloud(30_000, camera, seed=4)
    _check(host_rasterizer, points, camera, R.DEFAULT_SCALES, chunk_points=4_321)


def test_kernel_math_other_near_planes_and_cameras(host_rasterizer) -> None:
    for k, near in enumerate((0.0, 0.5, 2.9)):
        camera = _camera((50, 70), eye=(2.0 * k - 2, 1.0, -3.0 + k))
        _check(host_rasterizer, _cloud(5_000, camera, seed=10 + k), camera, R.DEFAULT_SCALES, near=near)


def test_kernel_math_extreme_coordinates(host_rasterizer) -> None:
    """Overflowing projections, denormals, huge depths: culled or kept exactly as the reference does."""
    camera = _camera((40, 40))
    g = torch.Generator().manual_seed(7)
    base = torch.rand(2000, 3, generator=g) * 4 - 2
    scale = torch.tensor(np.float32([1e-40, 1e-20, 1e20, 3e38])).repeat_interleave(500)[:, None]
    points = torch.cat([base, base * scale, torch.tensor([[0.0, 0.0, 3e38], [3e38, 3e38, 3e38]])])
    _check(host_rasterizer, points, camera, R.DEFAULT_SCALES)


def test_kernel_math_empty_cloud(host_rasterizer) -> None:
    camera = _camera((20, 30))
    got = _check(host_rasterizer, torch.zeros(0, 3), camera, R.DEFAULT_SCALES)
    assert all(bool((k == R.EMPTY_KEY).all()) for k in got)


@pytest.mark.parametrize("with_background", [True, False])
def test_kernel_gather_matches_reference(host_rasterizer, with_background) -> None:
    """Forward exactly, feature gradient exactly (unique winners) and background gradient,
    through the real autograd function of kernels/ on the host build."""
    camera = _camera((40, 56))
    points = _cloud(3000, camera, seed=21)
    index = R.rasterize(points, camera, scales=(1.0,))[0]
    g = torch.Generator().manual_seed(5)
    features = torch.randn(points.shape[0], 6, generator=g)
    background = torch.randn(6, generator=g) if with_background else None
    upstream = torch.randn(7, 40, 56, generator=g)

    f_ref = features.clone().requires_grad_()
    b_ref = background.clone().requires_grad_() if with_background else None
    want = R.gather_features(index, f_ref, b_ref)
    (want * upstream).sum().backward()

    f_k = features.clone().requires_grad_()
    b_k = background.clone().requires_grad_() if with_background else None
    got = kernels._GatherFeatures.apply(host_rasterizer.ext, index, f_k, b_k)
    (got * upstream).sum().backward()
    assert torch.equal(got.detach(), want.detach())
    assert torch.equal(f_k.grad, f_ref.grad)
    if with_background:
        torch.testing.assert_close(b_k.grad, b_ref.grad, rtol=1e-5, atol=1e-5)


def test_kernel_gather_accumulates_shared_winners(host_rasterizer) -> None:
    """An index where points repeat (as a user may pass) sums their gradients."""
    g = torch.Generator().manual_seed(6)
    index = torch.randint(-1, 40, (17, 23), generator=g)
    features = torch.randn(40, 3, generator=g)
    upstream = torch.randn(4, 17, 23, generator=g)
    f_ref = features.clone().requires_grad_()
    (R.gather_features(index, f_ref) * upstream).sum().backward()
    f_k = features.clone().requires_grad_()
    out = kernels._GatherFeatures.apply(host_rasterizer.ext, index, f_k, None)
    (out * upstream).sum().backward()
    assert torch.equal(out.detach(), R.gather_features(index, features))
    torch.testing.assert_close(f_k.grad, f_ref.grad, rtol=1e-5, atol=1e-6)
