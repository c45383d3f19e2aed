"""The CUDA rasterizer (kernels/) against the torch reference of npbgpp_core.rasterizer.

GPU tests (``@pytest.mark.cuda``) demand bit-identical key images (depth bits and index,
same tie rule) and gather results equal to the reference; they skip without a GPU. The
CPU tests check the backend dispatch and the loader's errors.
"""

from __future__ import annotations

import logging

import pytest
import torch

import kernels
from npbgpp_core import rasterizer as R
from npbgpp_core.camera import Camera

pytestmark = pytest.mark.filterwarnings("ignore:rasterize. dropping")


def _camera(image_size: tuple[int, int], device: str = "cpu") -> Camera:
    return Camera.look_at((0.3, -0.2, -3.0), (0.0, 0.0, 0.0), (0.0, 1.0, 0.0), 55.0, image_size).to(device)


def _cloud(n: int, camera: Camera, seed: int = 0) -> torch.Tensor:
    """Random points with the hard cases mixed in: exact duplicates (depth ties), points
    behind the camera and outside the image, points unprojected from pixel boundaries
    (u + 0.5 an integer, where rounding decides the column), NaN/inf rows."""
    g = torch.Generator().manual_seed(seed)
    parts = [torch.rand(n, 3, generator=g) * 4 - 2]  # around the origin, mostly visible
    parts.append(torch.rand(n // 10 + 1, 3, generator=g) * 40 - 20)  # far out, often outside
    parts.append(camera.center().float().cpu() + torch.randn(n // 20 + 1, 3, generator=g) * 0.5)  # near/behind
    h, w = camera.image_size
    k = n // 10 + 1
    uv = torch.stack(
        [
            torch.randint(0, w + 1, (k,), generator=g).double() - 0.5,
            torch.randint(0, h + 1, (k,), generator=g).double() - 0.5,
        ],
        dim=1,
    )
    depth = torch.rand(k, generator=g).double() * 3 + 1
    cam64 = camera.to("cpu", torch.float64)
    parts.append(cam64.unproject_pixels(uv, depth).float())
    cloud = torch.cat(parts)
    dup = torch.randint(0, cloud.shape[0], (n // 10 + 1,), generator=g)
    cloud = torch.cat([cloud, cloud[dup]])  # same point, later index: ties
    cloud = cloud[torch.randperm(cloud.shape[0], generator=g)]
    cloud[:3] = torch.tensor([[float("nan"), 0, 1], [0, float("inf"), 1], [0, 0, float("-inf")]])
    return cloud.contiguous()


def _reference_keys(points: torch.Tensor, camera: Camera, scales) -> list[torch.Tensor]:
    points = points.cpu()
    params = R.raster_params(camera.to("cpu"), scales, 1e-3, points.device)
    return R.rasterize_keys_torch(points, params)


def _kernel_keys(points: torch.Tensor, camera: Camera, scales, **kwargs) -> list[torch.Tensor]:
    op = kernels.load_rasterizer()
    params = R.raster_params(camera.to(points.device), scales, 1e-3, points.device)
    return op.rasterize_keys(points, params, **kwargs)


def _assert_same_keys(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for s, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.dtype == torch.int64 and g.shape == w.shape, (s, g.shape, w.shape)
        g = g.cpu()
        diff = (g != w).nonzero()
        assert diff.numel() == 0, f"scale {s}: {diff.shape[0]} pixels differ, first at {diff[:3].tolist()}"


# ----------------------------------------------------------------------------- CPU


def test_auto_backend_on_cpu_is_torch_and_logged_once(caplog: pytest.LogCaptureFixture, monkeypatch) -> None:
    monkeypatch.setattr(R, "_announced", set())
    cam = _camera((16, 24))
    pts = _cloud(200, cam)
    with caplog.at_level(logging.INFO, logger="npbgpp_core.rasterizer"):
        got = R.rasterize(pts, cam, backend="auto")
        R.rasterize(pts, cam, backend="auto")
    lines = [r.getMessage() for r in caplog.records if "rasterizer backend" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("rasterizer backend: torch"), lines
    want = R.rasterize(pts, cam, backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_cuda_backend_on_cpu_tensors_is_a_clear_error() -> None:
    cam = _camera((32, 32))
    with pytest.raises(ValueError, match="backend='cuda' needs points on a CUDA device"):
        R.rasterize(torch.zeros(4, 3), cam, backend="cuda")
    with pytest.raises(ValueError, match="backend must be"):
        R.rasterize(torch.zeros(4, 3), cam, backend="gpu")


def test_loader_error_names_the_missing_piece() -> None:
    problem = kernels.toolchain_problem()
    if problem is None:
        pytest.skip("CUDA toolchain and GPU present")
    with pytest.raises(RuntimeError, match="CUDA rasterizer unavailable: .*(CUDA|nvcc|GPU)"):
        kernels.load_rasterizer()


def test_pyramid_plan_pools_only_from_power_of_two_multiples() -> None:
    sizes = R.scale_sizes((1080, 1920), R.DEFAULT_SCALES)  # ..., 135x240, 67x120
    plan = dict(kernels.pyramid_plan(sizes))
    assert plan == {0: None, 1: 0, 2: 1, 3: 2, 4: None}
    sizes = R.scale_sizes((100, 60), (1.0, 0.3, 0.5, 0.25))  # 100x60, 30x18, 50x30, 25x15
    plan = dict(kernels.pyramid_plan(sizes))
    assert plan == {0: None, 1: None, 2: 0, 3: 2}


def test_min_pooling_a_finer_key_image_equals_direct_rasterization() -> None:
    """The identity the kernel's pyramid relies on, checked with the reference pieces."""
    cam = _camera((96, 160))
    pts = _cloud(3000, cam, seed=5)
    fine, coarse = _reference_keys(pts, cam, (1.0, 1 / 8))
    direct = R.rasterize_keys_torch(pts, R.raster_params(cam, (1 / 8,), 1e-3, pts.device))[0]
    assert torch.equal(fine.view(12, 8, 20, 8).amin(dim=(1, 3)), direct)
    assert torch.equal(coarse, direct)


# ----------------------------------------------------------------------------- GPU

SCALE_SETS = [R.DEFAULT_SCALES, (1.0, 0.3, 0.5, 0.7, 0.125), tuple(1.0 / k for k in range(1, 11))]


@pytest.mark.cuda
@pytest.mark.parametrize("image_size", [(64, 48), (37, 91), (256, 256)])
@pytest.mark.parametrize("scales", SCALE_SETS, ids=["default", "odd", "ten"])
def test_keys_identical_to_reference(image_size, scales) -> None:
    cam = _camera(image_size)
    pts = _cloud(20_000, cam, seed=image_size[0])
    _assert_same_keys(_kernel_keys(pts.cuda(), cam, scales), _reference_keys(pts, cam, scales))


@pytest.mark.cuda
def test_reference_is_the_same_on_gpu_and_cpu() -> None:
    cam = _camera((1080, 1920))
    pts = _cloud(300_000, cam, seed=3)
    params = R.raster_params(cam.to("cuda"), R.DEFAULT_SCALES, 1e-3, torch.device("cuda"))
    _assert_same_keys(R.rasterize_keys_torch(pts.cuda(), params), _reference_keys(pts, cam, R.DEFAULT_SCALES))


@pytest.mark.cuda
def test_full_hd_with_odd_pyramid_sizes_and_public_dispatch() -> None:
    cam = _camera((1080, 1920))
    pts = _cloud(500_000, cam, seed=7)
    want = [R.keys_to_index(k) for k in _reference_keys(pts, cam, R.DEFAULT_SCALES)]
    got = R.rasterize(pts.cuda(), cam.to("cuda"), backend="cuda")
    assert [tuple(g.shape) for g in got] == [(1080, 1920), (540, 960), (270, 480), (135, 240), (67, 120)]
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g.cpu(), w)
    auto = R.rasterize(pts.cuda(), cam.to("cuda"), backend="auto")
    assert all(torch.equal(a, g) for a, g in zip(auto, got, strict=True))


@pytest.mark.cuda
def test_ties_go_to_the_lowest_index() -> None:
    cam = _camera((32, 32))
    base = torch.tensor([[0.1, 0.2, 0.0], [0.5, -0.3, 0.2]])
    pts = torch.cat([base[[1]], base.repeat(5, 1)])  # index 0 and 2,4,... equal; 1,3,... equal
    got = _kernel_keys(pts.cuda(), cam, (1.0,))[0]
    idx = R.keys_to_index(got.cpu())
    assert sorted(idx[idx >= 0].tolist()) == [0, 1]


@pytest.mark.cuda
def test_empty_and_all_culled_clouds() -> None:
    cam = _camera((30, 50))
    for pts in (torch.zeros(0, 3), torch.tensor([[0.0, 0.0, -10.0], [1e6, 0.0, 0.0]])):
        got = R.rasterize_keys(pts.cuda(), cam.to("cuda"), backend="cuda")
        assert [tuple(k.shape) for k in got] == [tuple(s) for s in R.scale_sizes((30, 50), R.DEFAULT_SCALES)]
        assert all(bool((k == R.EMPTY_KEY).all()) for k in got)
        _assert_same_keys(_kernel_keys(pts.cuda(), cam, R.DEFAULT_SCALES), _reference_keys(pts, cam, R.DEFAULT_SCALES))


@pytest.mark.cuda
def test_points_streamed_from_cpu_in_chunks_match() -> None:
    cam = _camera((120, 90))
    pts = _cloud(50_000, cam, seed=11)
    got = _kernel_keys(pts, cam.to("cuda"), R.DEFAULT_SCALES, chunk_points=7_777)
    _assert_same_keys(got, _reference_keys(pts, cam, R.DEFAULT_SCALES))


@pytest.mark.cuda
@pytest.mark.slow
def test_ten_million_points_full_hd() -> None:
    cam = _camera((1080, 1920))
    g = torch.Generator().manual_seed(42)
    pts = torch.rand(10_200_000, 3, generator=g) * 4 - 2
    pts[::97] = pts[1::97][: pts[::97].shape[0]]  # ties
    pts[::101, 2] = -50.0  # behind the camera
    cuda_pts = pts.cuda()
    got = _kernel_keys(cuda_pts, cam, R.DEFAULT_SCALES)
    params = R.raster_params(cam.to("cuda"), R.DEFAULT_SCALES, 1e-3, torch.device("cuda"))
    want = R.rasterize_keys_torch(cuda_pts, params)
    for g_, w_ in zip(got, want, strict=True):
        assert torch.equal(g_, w_)


def _index_with_duplicates(h: int, w: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, n, (h, w), generator=g)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_gather_forward_equals_reference(dtype) -> None:
    op = kernels.load_rasterizer()
    g = torch.Generator().manual_seed(1)
    features = torch.randn(500, 5, generator=g).to(dtype)
    background = torch.randn(5, generator=g).to(dtype)
    index = _index_with_duplicates(23, 31, 500, 2)
    for bg in (background, None):
        want = R.gather_features(index, features, bg)
        got = op.gather_features(index.cuda(), features.cuda(), None if bg is None else bg.cuda())
        assert got.dtype == dtype and torch.equal(got.cpu(), want)


@pytest.mark.cuda
def test_gather_backward_equals_reference() -> None:
    op = kernels.load_rasterizer()
    cam = _camera((40, 56))
    pts = _cloud(4000, cam, seed=9)
    index = R.rasterize(pts, cam, scales=(1.0,))[0]  # winners are unique: exact gradients
    g = torch.Generator().manual_seed(3)
    features = torch.randn(pts.shape[0], 8, generator=g)
    background = torch.randn(8, generator=g)
    upstream = torch.randn(9, 40, 56, generator=g)

    f_ref, b_ref = features.clone().requires_grad_(), background.clone().requires_grad_()
    (R.gather_features(index, f_ref, b_ref) * upstream).sum().backward()
    f_cu = features.cuda().requires_grad_()
    b_cu = background.cuda().requires_grad_()
    (op.gather_features(index.cuda(), f_cu, b_cu) * upstream.cuda()).sum().backward()
    assert torch.equal(f_cu.grad.cpu(), f_ref.grad)
    torch.testing.assert_close(b_cu.grad.cpu(), b_ref.grad, rtol=1e-5, atol=1e-5)

    dup = _index_with_duplicates(40, 56, pts.shape[0] // 50, 4)  # many pixels per point
    f_ref = features[: pts.shape[0] // 50].clone().requires_grad_()
    (R.gather_features(dup, f_ref) * upstream).sum().backward()
    f_cu = features[: pts.shape[0] // 50].cuda().requires_grad_()
    (op.gather_features(dup.cuda(), f_cu) * upstream.cuda()).sum().backward()
    torch.testing.assert_close(f_cu.grad.cpu(), f_ref.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_rasterize_features_cuda_equals_torch() -> None:
    cam = _camera((48, 64))
    pts = _cloud(6000, cam, seed=13)
    features = torch.randn(pts.shape[0], 4)
    background = torch.randn(4)
    want = R.rasterize_features(pts, features, cam, background=background, backend="torch")
    got = R.rasterize_features(
        pts.cuda(), features.cuda(), cam.to("cuda"), background=background.cuda(), backend="cuda"
    )
    for g_, w_ in zip(got, want, strict=True):
        assert torch.equal(g_.cpu(), w_)


def test_gather_dispatch_on_cpu_is_the_reference() -> None:
    g = torch.Generator().manual_seed(8)
    features, background = torch.randn(30, 3, generator=g), torch.randn(3, generator=g)
    index = torch.randint(-1, 30, (5, 7), generator=g)
    want = R.gather_features(index, features, background)
    assert torch.equal(R.gather(index, features, background), want)
    assert torch.equal(R.gather(index, features, background, backend="torch"), want)
    with pytest.raises(ValueError, match="needs features on a CUDA device"):
        R.gather(index, features, background, backend="cuda")
