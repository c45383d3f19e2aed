"""Rasterizer against a brute-force per-pixel z-buffer written in numpy.

The reference projects in float64 from the camera's OpenCV matrices (independent of
the implementation's float32 arithmetic); points within 1e-4 of a pixel boundary at any
scale are removed from the cloud so both sides must agree exactly."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from npbgpp_core.camera import Camera
from npbgpp_core.rasterizer import (
    DEFAULT_SCALES,
    keys_to_depth,
    landing_mask,
    rasterize,
    rasterize_features,
    rasterize_keys,
)


def reference_project(cam: Camera, X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    K, R, t = cam.to_opencv()
    x = X.astype(np.float64) @ R.T + t
    with np.errstate(divide="ignore", invalid="ignore"):
        u = K[0, 0] * x[:, 0] / x[:, 2] + K[0, 2]
        v = K[1, 1] * x[:, 1] / x[:, 2] + K[1, 2]
    return u, v, x[:, 2]


def sizes_of(cam: Camera, scales) -> list[tuple[int, int]]:
    H, W = cam.image_size
    return [(int(s * H), int(s * W)) for s in scales]


def near_boundary(cam: Camera, X: np.ndarray, scales, eps: float = 1e-4) -> np.ndarray:
    H, W = cam.image_size
    u, v, _ = reference_project(cam, X)
    bad = np.zeros(len(X), dtype=bool)
    for h, w in sizes_of(cam, scales):
        for q in ((u + 0.5) / W * w, (v + 0.5) / H * h):
            with np.errstate(invalid="ignore"):
                frac = np.abs(q - np.round(q))
            bad |= np.isfinite(q) & (frac < eps)
    return bad


def brute_force(cam: Camera, X: np.ndarray, scales, near: float = 1e-3, far: float = np.inf) -> list[np.ndarray]:
    """Per pixel the (depth, index)-smallest point with ``near < z <= far``, by looping over points."""
    H, W = cam.image_size
    u, v, z = reference_project(cam, X)
    out = []
    for h, w in sizes_of(cam, scales):
        best_depth = np.full((h, w), np.inf)
        best = np.full((h, w), -1, dtype=np.int64)
        for i in range(len(X)):
            if not (np.isfinite(u[i]) and np.isfinite(v[i]) and near < z[i] <= far):
                continue
            col = math.floor((u[i] + 0.5) / W * w)
            row = math.floor((v[i] + 0.5) / H * h)
            if not (0 <= col < w and 0 <= row < h):
                continue
            if z[i] < best_depth[row, col]:  # strict: equal depth keeps the lower index
                best_depth[row, col] = z[i]
                best[row, col] = i
        out.append(best)
    return out


def clean_cloud(cam: Camera, X: np.ndarray, scales) -> np.ndarray:
    return X[~near_boundary(cam, X, scales)].astype(np.float32)


@pytest.mark.parametrize(
    "size,eye",
    [((24, 40), (0.5, 0.3, -3.0)), ((135, 67), (0.0, 0.0, -2.5)), ((33, 33), (0.1, 0.2, 0.0))],
)
def test_matches_brute_force(size, eye):
    """Random clouds (some points behind the camera / outside the image when the eye is
    inside the cloud), every default scale, odd and non-square sizes."""
    rng = np.random.default_rng(sum(size))
    cam = Camera.look_at(eye, (0, 0, 1.0), fov_x_deg=55, image_size=size)
    X = rng.normal(size=(1500, 3)) * np.array([1.5, 1.0, 1.5])
    X = clean_cloud(cam, X, DEFAULT_SCALES)
    got = rasterize(torch.from_numpy(X), cam, DEFAULT_SCALES, backend="torch")
    ref = brute_force(cam, X, DEFAULT_SCALES)
    for g, r, s in zip(got, ref, sizes_of(cam, DEFAULT_SCALES), strict=True):
        assert tuple(g.shape) == s
        np.testing.assert_array_equal(g.numpy(), r)
    assert (ref[0] >= 0).sum() > 50  # the test covers real hits
    _, _, z = reference_project(cam, X)
    assert (z < 0).any() or eye[2] < -1  # the in-cloud eye case has points behind


@pytest.mark.parametrize("chunk", [1, 7, 250, 1499])
def test_chunked_reference_matches_brute_force(chunk):
    """The torch reference streams points in chunks into the same key images: any chunk
    size gives the brute-force winners, also for duplicates in different chunks (the
    lower global index wins)."""
    from npbgpp_core.rasterizer import keys_to_index, raster_params, rasterize_keys_torch

    rng = np.random.default_rng(5)
    cam = Camera.look_at((0.3, 0.2, -3.0), (0, 0, 0), fov_x_deg=50, image_size=(30, 44))
    X = clean_cloud(cam, rng.normal(size=(1200, 3)), DEFAULT_SCALES)
    X = np.concatenate([X, X[::3]])  # exact duplicates, later indices, other chunks
    params = raster_params(cam, DEFAULT_SCALES, 1e-3, torch.device("cpu"))
    got = rasterize_keys_torch(torch.from_numpy(X), params, chunk_points=chunk)
    whole = rasterize_keys_torch(torch.from_numpy(X), params, chunk_points=None)
    for g, w_, r in zip(got, whole, brute_force(cam, X, DEFAULT_SCALES), strict=True):
        assert torch.equal(g, w_)
        np.testing.assert_array_equal(keys_to_index(g).numpy(), r)


def test_odd_scales():
    rng = np.random.default_rng(11)
    cam = Camera.look_at((0.3, 0.1, -3.0), (0, 0, 0), fov_x_deg=45, image_size=(135, 67))
    scales = (1.0, 0.7, 1 / 3, 0.1)
    X = clean_cloud(cam, rng.normal(size=(800, 3)), scales)
    got = rasterize(torch.from_numpy(X), cam, scales)
    for g, r in zip(got, brute_force(cam, X, scales), strict=True):
        np.testing.assert_array_equal(g.numpy(), r)


def test_ties_go_to_lowest_index():
    rng = np.random.default_rng(12)
    cam = Camera.look_at((0, 0, -3.0), (0, 0, 0), fov_x_deg=40, image_size=(20, 28))
    base = clean_cloud(cam, rng.normal(size=(60, 3)) * 0.5, DEFAULT_SCALES)
    # Three copies of every point in a shuffled order: identical depths everywhere.
    X = np.concatenate([base, base, base])
    perm = rng.permutation(len(X))
    X = X[perm]
    got = rasterize(torch.from_numpy(X), cam)
    ref = brute_force(cam, X, DEFAULT_SCALES)
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_array_equal(g.numpy(), r)
    # Each winner is the first occurrence of its source point.
    first = {}
    for i, p in enumerate(perm % len(base)):
        first.setdefault(p, i)
    winners = got[0][got[0] >= 0].numpy()
    assert all(first[perm[i] % len(base)] == i for i in winners)


def test_points_behind_and_outside():
    cam = Camera.look_at((0, 0, -3.0), (0, 0, 0), fov_x_deg=40, image_size=(16, 16))
    behind = torch.tensor([[0.0, 0.0, -4.0], [0.1, 0.0, -5.0], [0.0, 0.0, -3.0]])
    outside = torch.tensor([[10.0, 0.0, 0.0], [0.0, -10.0, 0.0]])
    for pts in (behind, outside, torch.cat([behind, outside])):
        for index in rasterize(pts, cam):
            assert (index == -1).all()
    # near: a point just in front of the camera counts only past `near`.
    p = torch.tensor([[0.0, 0.0, -3.0 + 0.05]])
    assert (rasterize(p, cam, near=0.01)[0] >= 0).any()
    assert (rasterize(p, cam, near=0.1)[0] == -1).all()


def test_empty_and_nonfinite_points():
    cam = Camera.look_at((0, 0, -3.0), (0, 0, 0), image_size=(17, 18))
    for index in rasterize(torch.zeros(0, 3), cam):
        assert (index == -1).all()
    good = torch.tensor([[0.0, 0.0, 0.0], [0.3, 0.2, 0.5]])
    bad = torch.tensor([[float("nan"), 0.0, 0.0], [0.0, float("inf"), 0.0], [0.0, 0.0, -float("inf")]])
    with pytest.warns(UserWarning, match="NaN/inf"):
        got = rasterize(torch.cat([good, bad]), cam)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ref = rasterize(good, cam)
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_array_equal(g.numpy(), r.numpy())
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        rasterize(torch.zeros(5, 2), cam)
    with pytest.raises(ValueError, match="empty"):
        rasterize(good, cam, scales=(1 / 32,))  # 17 x 18 / 32 is empty


def test_depth_keys():
    rng = np.random.default_rng(13)
    cam = Camera.look_at((0.2, 0.1, -3.0), (0, 0, 0), image_size=(30, 22))
    X = clean_cloud(cam, rng.normal(size=(400, 3)), DEFAULT_SCALES)
    keys = rasterize_keys(torch.from_numpy(X), cam)
    _, _, z = reference_project(cam, X)
    for k, r in zip(keys, brute_force(cam, X, DEFAULT_SCALES), strict=True):
        depth = keys_to_depth(k).numpy()
        hit = r >= 0
        assert np.isinf(depth[~hit]).all()
        np.testing.assert_allclose(depth[hit], z[r[hit]], rtol=1e-5)


def test_rasterize_features_values_and_gradient():
    rng = np.random.default_rng(14)
    cam = Camera.look_at((0.0, 0.3, -3.0), (0, 0, 0), fov_x_deg=50, image_size=(27, 35))
    X = clean_cloud(cam, rng.normal(size=(300, 3)) * 0.8, DEFAULT_SCALES)
    n, c = len(X), 5
    feats = torch.from_numpy(rng.normal(size=(n, c))).float().requires_grad_(True)
    bg = torch.tensor([0.1, -0.2, 0.3, 0.4, -0.5], requires_grad=True)
    out = rasterize_features(torch.from_numpy(X), feats, cam, DEFAULT_SCALES, background=bg)
    ref = brute_force(cam, X, DEFAULT_SCALES)
    wins = np.zeros(n)
    empty = 0
    for img, r in zip(out, ref, strict=True):
        assert img.shape == (c + 1, *r.shape)
        hit = r >= 0
        np.testing.assert_array_equal(img[c].detach().numpy(), hit.astype(np.float32))
        f = img[:c].detach().numpy()
        np.testing.assert_array_equal(f[:, hit], feats.detach().numpy()[r[hit]].T)
        np.testing.assert_array_equal(f[:, ~hit], np.repeat(bg.detach().numpy()[:, None], (~hit).sum(), 1))
        np.add.at(wins, r[hit], 1)
        empty += (~hit).sum()
    sum(img[:c].sum() for img in out).backward()
    # d(sum)/d(feature) = number of pixels the point wins over all scales.
    np.testing.assert_array_equal(feats.grad.numpy(), np.repeat(wins[:, None], c, 1))
    np.testing.assert_array_equal(bg.grad.numpy(), np.full(c, float(empty)))


def test_rasterize_features_errors():
    cam = Camera.look_at((0, 0, -3.0), (0, 0, 0), image_size=(16, 16))
    with pytest.raises(ValueError, match="features"):
        rasterize_features(torch.zeros(4, 3), torch.zeros(3, 2), cam)
    with pytest.raises(ValueError, match="background"):
        rasterize_features(torch.zeros(4, 3), torch.zeros(4, 2), cam, background=torch.zeros(3))
    out = rasterize_features(torch.zeros(0, 3), torch.zeros(0, 4), cam)
    assert all((o == 0).all() for o in out)


def _clip_cloud(near: float, far: float) -> tuple[Camera, np.ndarray]:
    """A camera clipping to [near, far] and a cloud with points in front of, inside and
    beyond that range (none within float rounding of a clip plane or a pixel edge)."""
    rng = np.random.default_rng(7)
    cam = Camera.look_at((0.2, -0.1, -3.0), (0, 0, 0), fov_x_deg=50, image_size=(30, 41), near=near, far=far)
    X = rng.uniform(-1.0, 1.0, size=(3000, 3)) * np.array([1.2, 1.0, 2.8])
    X = clean_cloud(cam, X, DEFAULT_SCALES)
    _, _, z = reference_project(cam, X)
    keep = (np.abs(z - near) > 1e-4) & (np.abs(z - far) > 1e-4)
    return cam, X[keep]


def _inside_only(cam: Camera, X: np.ndarray, near: float, far: float) -> list[np.ndarray]:
    """Brute force of only the points inside the clip range, indices mapped back to X's."""
    _, _, z = reference_project(cam, X)
    rows = np.flatnonzero((z > near) & (z <= far))
    unclipped = Camera(*cam.to_opencv(), cam.image_size)
    return [np.where(r >= 0, rows[np.maximum(r, 0)], -1) for r in brute_force(unclipped, X[rows], DEFAULT_SCALES)]


def test_camera_clip_range_renders_only_points_inside():
    """A camera's clip start / end (Camera.near / far): points nearer than near or beyond
    far neither show nor occlude; the index images equal rendering only the points inside
    the range, at every scale, and the depth keys stay inside it."""
    near, far = 2.4, 3.6
    cam, X = _clip_cloud(near, far)
    _, _, z = reference_project(cam, X)
    assert (z < near).sum() > 100 and (z > far).sum() > 100 and ((z > near) & (z <= far)).sum() > 100
    ref = _inside_only(cam, X, near, far)
    keys = rasterize_keys(torch.from_numpy(X), cam, DEFAULT_SCALES, backend="torch")
    for k, r in zip(keys, ref, strict=True):
        np.testing.assert_array_equal(torch.where(k == torch.iinfo(torch.int64).max, -1, k & 0xFFFFFFFF).numpy(), r)
    depth = keys_to_depth(keys[0])
    hit = torch.isfinite(depth)
    assert hit.sum() > 50 and (depth[hit] > near).all() and (depth[hit] <= far).all()
    # Without the clip range the near points hide many of those pixels: the test can fail.
    plain = rasterize(torch.from_numpy(X), Camera(*cam.to_opencv(), cam.image_size), DEFAULT_SCALES)[0].numpy()
    assert (plain != ref[0]).sum() > 20
    # The model's own near (a larger one wins) still applies.
    deeper = rasterize(torch.from_numpy(X), cam, DEFAULT_SCALES, near=3.0)[0].numpy()
    np.testing.assert_array_equal(deeper, _inside_only(cam, X, 3.0, far)[0])


def test_clip_range_survives_derived_cameras():
    """Scaled, cropped, rolled and moved cameras keep the clip range, so that every path
    to the rasterizer (pyramids, windows, rolled canvases) clips the same points."""
    cam, X = _clip_cloud(2.4, 3.6)
    for derived in (cam.scaled(0.5), cam.cropped(3, 4, 20, 25), cam.rotated_in_plane(0.7), cam.to("cpu"),
                    cam.to(dtype=torch.float64), Camera.from_state_dict(cam.state_dict())):
        assert (derived.near, derived.far) == (2.4, 3.6)
    sub = cam.cropped(3, 4, 20, 25)
    ref = _inside_only(sub, X, 2.4, 3.6)[0]
    np.testing.assert_array_equal(rasterize(torch.from_numpy(X), sub, (1.0,))[0].numpy(), ref)


def test_kernel_route_of_the_clip_end_matches_the_reference():
    """The CUDA route (points beyond far blanked by nan_beyond_far, the kernel told only
    near) gives the torch reference's keys (far tested in place), checked on the CPU by
    feeding the blanked cloud to the reference with far removed."""
    import dataclasses

    from npbgpp_core.rasterizer import nan_beyond_far, raster_params, rasterize_keys_torch

    cam, X = _clip_cloud(2.4, 3.6)
    pts = torch.from_numpy(X).float()
    p = raster_params(cam, DEFAULT_SCALES, 1e-3, pts.device)
    assert p.far == np.float32(3.6) and p.near == np.float32(2.4)
    blanked = nan_beyond_far(pts, p)
    assert torch.isnan(blanked).any(dim=1).sum() > 100
    kernel_like = rasterize_keys_torch(blanked, dataclasses.replace(p, far=float("inf")))
    for a, b in zip(kernel_like, rasterize_keys_torch(pts, p), strict=True):
        assert torch.equal(a, b)
    assert nan_beyond_far(pts, dataclasses.replace(p, far=float("inf"))) is pts


@pytest.mark.cuda
def test_cuda_backend_clips_like_the_reference():
    from npbgpp_core import _backend

    if _backend.cuda_rasterizer() is None:
        pytest.skip(f"CUDA rasterizer unavailable: {_backend.why_unavailable()}")
    cam, X = _clip_cloud(2.4, 3.6)
    got = rasterize(torch.from_numpy(X).cuda(), cam.to("cuda"), backend="cuda")
    for g, r in zip(got, _inside_only(cam, X, 2.4, 3.6), strict=True):
        np.testing.assert_array_equal(g.cpu().numpy(), r)


@pytest.mark.cuda
def test_cuda_backend_matches_brute_force():
    from npbgpp_core import _backend

    if _backend.cuda_rasterizer() is None:
        pytest.skip(f"CUDA rasterizer unavailable: {_backend.why_unavailable()}")
    rng = np.random.default_rng(15)
    cam = Camera.look_at((0.5, 0.3, -3.0), (0, 0, 1.0), fov_x_deg=55, image_size=(135, 67))
    X = clean_cloud(cam, rng.normal(size=(5000, 3)), DEFAULT_SCALES)
    X = np.concatenate([X, X[:100]])  # exact ties too
    got = rasterize(torch.from_numpy(X).cuda(), cam.to("cuda"), backend="cuda")
    for g, r in zip(got, brute_force(cam, X, DEFAULT_SCALES), strict=True):
        np.testing.assert_array_equal(g.cpu().numpy(), r)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_landing_mask_is_the_points_a_brute_force_zbuffer_places(scale):
    """landing_mask: the points the brute-force z-buffer places on a pixel (in front of near,
    inside the camera's clip range and the image), winning it or not; every winner is one,
    and with a cloud denser than the image some land without winning."""
    near, far = 2.4, 3.6
    cam, X = _clip_cloud(near, far)
    X = clean_cloud(cam, X, (scale,))
    H, W = cam.image_size
    h, w = sizes_of(cam, (scale,))[0]
    u, v, z = reference_project(cam, X)
    with np.errstate(invalid="ignore"):
        col, row = np.floor((u + 0.5) / W * w), np.floor((v + 0.5) / H * h)
        ref = np.isfinite(u) & (z > near) & (z <= far) & (col >= 0) & (col < w) & (row >= 0) & (row < h)
    got = landing_mask(torch.from_numpy(X), cam, scale).numpy()
    np.testing.assert_array_equal(got, ref)
    winners = brute_force(cam, X, (scale,), near=near, far=far)[0]
    won = np.zeros(len(X), bool)
    won[winners[winners >= 0]] = True
    assert got[won].all() and (got & ~won).sum() > 100 and (~got).sum() > 100
