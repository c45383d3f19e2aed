"""Camera: OpenCV and PyTorch3D round trips, projection against a hand-written K[R|t] in float64,
derived cameras (scaled / cropped / rolled) moving pixels as expected, look_at, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from npbgpp_core.camera import Camera


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q


def make_opencv(rng: np.random.Generator, h: int = 48, w: int = 80):
    K = np.array([[70.0 + rng.uniform(0, 10), 0, w / 2 + rng.uniform(-5, 5)],
                  [0, 65.0 + rng.uniform(0, 10), h / 2 + rng.uniform(-5, 5)],
                  [0, 0, 1]])
    R = random_rotation(rng)
    t = rng.normal(size=3)
    t[2] += 6.0
    return K, R, t, (h, w)


def points_in_front(rng: np.random.Generator, R: np.ndarray, t: np.ndarray, n: int = 50) -> np.ndarray:
    """World points whose OpenCV camera-space z is in [2, 8]."""
    cam = np.stack([rng.uniform(-1, 1, n), rng.uniform(-1, 1, n), rng.uniform(2, 8, n)], axis=1)
    return (cam - t) @ R  # R^T (x - t)


def hand_projection(K, R, t, X):
    x = X @ R.T + t
    return (x[:, :2] / x[:, 2:]) @ K[:2, :2].T + K[:2, 2], x[:, 2]


def test_opencv_round_trip():
    rng = np.random.default_rng(0)
    for _ in range(5):
        K, R, t, size = make_opencv(rng)
        cam = Camera.from_opencv(K, R, t, size, dtype=torch.float64)
        K2, R2, t2 = cam.to_opencv()
        np.testing.assert_allclose(K2, K, atol=1e-9)
        np.testing.assert_allclose(R2, R, atol=1e-12)
        np.testing.assert_allclose(t2, t, atol=1e-12)
        assert cam.image_size == size


def test_pytorch3d_convention_matches_opencv():
    """x_view = x @ R + T equals diag(-1, -1, 1) (R_cv x + t_cv); the conversion round-trips."""
    rng = np.random.default_rng(1)
    K, R, t, size = make_opencv(rng)
    cam = Camera.from_opencv(K, R, t, size, dtype=torch.float64)
    X = rng.normal(size=(20, 3))
    p3d = cam.to_pytorch3d()
    view = X @ np.array(p3d["R"]) + np.array(p3d["T"])
    expected = (X @ R.T + t) * np.array([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(view, expected, atol=1e-12)
    np.testing.assert_allclose(cam.world_to_camera(torch.from_numpy(X)).numpy(), X @ R.T + t, atol=1e-12)
    np.testing.assert_allclose(cam.center().numpy(), -R.T @ t, atol=1e-12)
    back = Camera.from_pytorch3d(**p3d, dtype=torch.float64)
    for a, b in zip(back.to_opencv(), (K, R, t), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-9)
    assert back.image_size == size


def test_project_matches_hand_computed():
    rng = np.random.default_rng(2)
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 2e-3)):
        K, R, t, size = make_opencv(rng, 37, 91)
        cam = Camera.from_opencv(K, R, t, size, dtype=dtype)
        X = points_in_front(rng, R, t)
        uv, depth = cam.project(torch.from_numpy(X).to(dtype))
        uv_ref, z_ref = hand_projection(K, R, t, X)
        np.testing.assert_allclose(uv.double().numpy(), uv_ref, atol=tol)
        np.testing.assert_allclose(depth.double().numpy(), z_ref, rtol=1e-6)


def test_project_exact_simple_case():
    # Identity pose, fx=fy=10, principal point (4.5, 2.5) on a 6x10 image.
    K = np.array([[10.0, 0, 4.5], [0, 10.0, 2.5], [0, 0, 1]])
    cam = Camera.from_opencv(K, np.eye(3), np.zeros(3), (6, 10), dtype=torch.float64)
    uv, z = cam.project(torch.tensor([[0.0, 0.0, 2.0], [0.2, -0.1, 1.0], [1.0, 1.0, 5.0]], dtype=torch.float64))
    np.testing.assert_allclose(uv.numpy(), [[4.5, 2.5], [6.5, 1.5], [6.5, 4.5]], atol=1e-12)
    np.testing.assert_allclose(z.numpy(), [2.0, 1.0, 5.0])
    # The principal point in NDC: the image centre is (4.5, 2.5), so it is zero.
    np.testing.assert_allclose(cam.to_pytorch3d()["principal_ndc"], [0.0, 0.0], atol=1e-12)
    # Shorter side 6 -> s = 2.5; focal_ndc = f / s.
    np.testing.assert_allclose(cam.to_pytorch3d()["focal_ndc"], [4.0, 4.0])


def test_unproject_inverts_project():
    rng = np.random.default_rng(3)
    K, R, t, size = make_opencv(rng)
    cam = Camera.from_opencv(K, R, t, size, dtype=torch.float64)
    X = torch.from_numpy(points_in_front(rng, R, t))
    uv, z = cam.project(X)
    np.testing.assert_allclose(cam.unproject_pixels(uv, z).numpy(), X.numpy(), atol=1e-9)


def test_scaled_moves_pixels_by_area():
    rng = np.random.default_rng(4)
    K, R, t, size = make_opencv(rng, 135, 67)
    cam = Camera.from_opencv(K, R, t, size, dtype=torch.float64)
    X = torch.from_numpy(points_in_front(rng, R, t))
    uv, _ = cam.project(X)
    for s in (0.5, 0.25, 1 / 16):
        c2 = cam.scaled(s)
        h, w = int(s * 135), int(s * 67)
        assert c2.image_size == (h, w)
        uv2, _ = c2.project(X)
        exp_u = (uv[:, 0] + 0.5) * w / 67 - 0.5
        exp_v = (uv[:, 1] + 0.5) * h / 135 - 0.5
        np.testing.assert_allclose(uv2[:, 0].numpy(), exp_u.numpy(), atol=1e-9)
        np.testing.assert_allclose(uv2[:, 1].numpy(), exp_v.numpy(), atol=1e-9)
    c3 = cam.scaled((20, 30))
    assert c3.image_size == (20, 30)
    uv3, _ = c3.project(X)
    np.testing.assert_allclose(uv3[:, 0].numpy(), ((uv[:, 0] + 0.5) * 30 / 67 - 0.5).numpy(), atol=1e-9)


def test_cropped_shifts_pixels():
    rng = np.random.default_rng(5)
    K, R, t, size = make_opencv(rng)
    cam = Camera.from_opencv(K, R, t, size, dtype=torch.float64)
    X = torch.from_numpy(points_in_front(rng, R, t))
    uv, z = cam.project(X)
    c2 = cam.cropped(7, -3, 20, 25)
    assert c2.image_size == (20, 25)
    uv2, z2 = c2.project(X)
    np.testing.assert_allclose(uv2.numpy(), (uv - torch.tensor([-3.0, 7.0], dtype=torch.float64)).numpy(), atol=1e-9)
    np.testing.assert_allclose(z2.numpy(), z.numpy())


@pytest.mark.parametrize("angle", [0.3, math.pi / 2, -2.0])
def test_rotated_in_plane_rotates_pixel_offsets(angle: float):
    rng = np.random.default_rng(6)
    K, R, t, _ = make_opencv(rng, 40, 60)
    K[1, 1] = K[0, 0]  # square pixels: a roll is an image rotation
    cam = Camera.from_opencv(K, R, t, (40, 60), dtype=torch.float64)
    X = torch.from_numpy(points_in_front(rng, R, t))
    uv, z = cam.project(X)
    c2 = cam.rotated_in_plane(angle, (72, 72))
    uv2, z2 = c2.project(X)
    k2 = c2.intrinsics()
    # The principal point offset from the centre turns with the image.
    ox, oy = K[0, 2] - 29.5, K[1, 2] - 19.5
    c, s = math.cos(angle), math.sin(angle)
    assert k2.cx == pytest.approx(35.5 + c * ox - s * oy)
    assert k2.cy == pytest.approx(35.5 + s * ox + c * oy)
    du, dv = uv[:, 0] - K[0, 2], uv[:, 1] - K[1, 2]
    np.testing.assert_allclose((uv2[:, 0] - k2.cx).numpy(), (c * du - s * dv).numpy(), atol=1e-9)
    np.testing.assert_allclose((uv2[:, 1] - k2.cy).numpy(), (s * du + c * dv).numpy(), atol=1e-9)
    np.testing.assert_allclose(z2.numpy(), z.numpy(), atol=1e-12)
    np.testing.assert_allclose(c2.center().numpy(), cam.center().numpy(), atol=1e-12)


def test_look_at():
    eye, target = np.array([1.0, 2.0, -4.0]), np.array([0.2, -0.1, 0.3])
    cam = Camera.look_at(eye, target, up=(0, 1, 0), fov_x_deg=60, image_size=(30, 40), dtype=torch.float64)
    np.testing.assert_allclose(cam.center().numpy(), eye, atol=1e-12)
    uv, z = cam.project(torch.tensor(target[None]))
    np.testing.assert_allclose(uv.numpy(), [[19.5, 14.5]], atol=1e-9)
    assert float(z[0]) == pytest.approx(np.linalg.norm(target - eye))
    # World up appears up in the image (smaller v), not mirrored.
    uv_up, _ = cam.project(torch.tensor((target + [0, 0.1, 0])[None]))
    assert float(uv_up[0, 1]) < 14.5 and abs(float(uv_up[0, 0]) - 19.5) < 0.5
    # A point on the right edge of the horizontal field of view lands on the image's outer
    # edge: u = W - 0.5 (pixel centres are at integers).
    _, R_cv, _ = cam.to_opencv()
    right, fwd = R_cv[0], R_cv[2]
    edge = eye + fwd + math.tan(math.radians(30)) * right
    uv_e, _ = cam.project(torch.tensor(edge[None]))
    assert float(uv_e[0, 0]) == pytest.approx(40 - 0.5, abs=1e-9)
    # Right-handed rotation.
    assert np.linalg.det(R_cv) == pytest.approx(1.0)
    # Standard case: camera on -Z looking at the origin; world +X is on the image's left.
    c0 = Camera.look_at((0, 0, -3), (0, 0, 0), image_size=(20, 20))
    uv0, _ = c0.project(torch.tensor([[0.1, 0.0, 0.0]]))
    assert float(uv0[0, 0]) < 9.5


def test_view_directions_and_state_dict():
    rng = np.random.default_rng(7)
    K, R, t, size = make_opencv(rng)
    cam = Camera.from_opencv(K, R, t, size, dtype=torch.float64)
    X = torch.from_numpy(rng.normal(size=(10, 3)))
    d = cam.view_directions(X)
    np.testing.assert_allclose(d.norm(dim=1).numpy(), 1.0, atol=1e-12)
    expect = (X - cam.center()) / (X - cam.center()).norm(dim=1, keepdim=True)
    np.testing.assert_allclose(d.numpy(), expect.numpy(), atol=1e-12)
    c2 = Camera.from_state_dict(cam.state_dict(), dtype=torch.float64)
    for a, b in zip(cam.to_opencv(), c2.to_opencv(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert c2.image_size == cam.image_size


def test_camera_errors():
    K = np.array([[50.0, 0, 20], [0, 50.0, 15], [0, 0, 1]])
    with pytest.raises(ValueError, match="focal"):
        Camera.from_opencv(K * np.array([[-1, 1, 1], [1, 1, 1], [1, 1, 1]]), np.eye(3), np.zeros(3), (30, 40))
    with pytest.raises(ValueError, match="focal"):
        Camera.from_pytorch3d(np.eye(3), np.zeros(3), focal_ndc=(0.0, 1.0), image_size=(30, 40))
    with pytest.raises(ValueError, match="focal"):
        Camera.from_pytorch3d(np.eye(3), np.zeros(3), focal_ndc=-2.0, image_size=(30, 40))
    skew = K.copy()
    skew[0, 1] = 3.0
    with pytest.raises(ValueError, match="skew"):
        Camera.from_opencv(skew, np.eye(3), np.zeros(3), (30, 40))
    with pytest.raises(ValueError, match="non-finite"):
        Camera.from_opencv(K, np.eye(3), [0, np.nan, 0], (30, 40))
    tiny = K.copy()
    tiny[0, 0] = 1e-50  # positive in float64, 0 once stored in float32 (a division by zero later)
    with pytest.raises(ValueError, match=r"focal length fx=1e-50, fy=.* is too small for torch.float32"):
        Camera.from_opencv(tiny, np.eye(3), np.zeros(3), (30, 40))
    assert Camera.from_opencv(tiny, np.eye(3), np.zeros(3), (30, 40), dtype=torch.float64).K[0, 0] == 1e-50
    with pytest.raises(ValueError, match=r"camera t \[0.0, 0.0, inf\] is beyond the range of torch.float32"):
        Camera.from_opencv(K, np.eye(3), [0, 0, 1e308], (30, 40))
    assert Camera.from_opencv(K, np.eye(3), [0, 0, 1e308], (30, 40), dtype=torch.float64).t[2] == 1e308
    with pytest.raises(ValueError, match="image_size"):
        Camera.from_opencv(K, np.eye(3), np.zeros(3), (1, 40))
    with pytest.raises(ValueError, match="image_size"):
        Camera.from_opencv(K, np.eye(3), np.zeros(3), (30,))
    with pytest.raises(ValueError, match="3x3"):
        Camera.from_opencv(np.eye(2), np.eye(3), np.zeros(3), (30, 40))
    with pytest.raises(ValueError, match="coincide"):
        Camera.look_at((1, 1, 1), (1, 1, 1))
    with pytest.raises(ValueError, match="parallel"):
        Camera.look_at((0, 0, 0), (0, 5, 0), up=(0, 1, 0))
    cam = Camera.look_at((0, 0, -3), (0, 0, 0))
    with pytest.raises(ValueError, match="scale"):
        cam.scaled(0.0)
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        cam.project(torch.zeros(4, 2))


def test_clip_range_defaults_checks_and_protocol_round_trip():
    """near / far default to (0, inf) and stay out of state_dict then (old files and
    datasets read the same); a bad range is refused; CameraSpec carries a set one."""
    from npbgpp_core.protocol import CameraSpec

    cam = Camera.look_at((0, 0, -3.0), (0, 0, 0), image_size=(20, 30))
    assert (cam.near, cam.far) == (0.0, math.inf) and "near" not in cam.state_dict()
    clipped = Camera(*cam.to_opencv(), cam.image_size, near=0.5, far=40.0)
    assert Camera.from_state_dict(clipped.state_dict()).clip == {"near": 0.5, "far": 40.0}
    only_near = Camera(*cam.to_opencv(), cam.image_size, near=0.5)
    assert Camera.from_state_dict(only_near.state_dict()).far == math.inf
    spec = CameraSpec.from_camera(clipped)
    assert (spec.near, spec.far) == (0.5, 40.0) and spec.to_camera().clip == clipped.clip
    assert CameraSpec.from_camera(cam).to_camera().clip == {"near": 0.0, "far": math.inf}
    for near, far in ((-1.0, 2.0), (2.0, 2.0), (3.0, 1.0), (math.nan, 1.0), (0.0, math.nan), (math.inf, math.inf)):
        with pytest.raises(ValueError, match="clip range"):
            Camera(*cam.to_opencv(), cam.image_size, near=near, far=far)
