"""The environment corpus's camera paths and point-cloud simulators, checked against
their specifications on analytic scenes (a textured ground plane, a wall), without bpy."""

from __future__ import annotations

import math

import numpy as np
import pytest

from blender_addon.datagen import camera_paths as cp
from blender_addon.datagen import pointsim as ps

# ------------------------------------------------------------------ camera paths


def _angle_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return np.degrees(np.arccos(np.clip((a * b).sum(-1), -1, 1)))


def _check_rotations(path: cp.CameraPath) -> None:
    R = path.c2w[:, :3, :3]
    np.testing.assert_allclose(R @ R.transpose(0, 2, 1), np.broadcast_to(np.eye(3), R.shape), atol=1e-9)
    np.testing.assert_allclose(np.linalg.det(R), 1.0, atol=1e-9)
    np.testing.assert_allclose(path.c2w[:, 3], np.broadcast_to([0, 0, 0, 1.0], (len(R), 4)))


def test_look_at_matches_hand_computed_axes():
    m = cp.look_at((2, 0, 0), (0, 0, 0))
    np.testing.assert_allclose(m[:3, 2], [1, 0, 0], atol=1e-12)  # camera looks along -z
    np.testing.assert_allclose(m[:3, 1], [0, 0, 1], atol=1e-12)  # image up = world up
    np.testing.assert_allclose(m[:3, 0], [0, 1, 0], atol=1e-12)  # facing -x, right is +y
    rolled = cp.look_at((2, 0, 0), (0, 0, 0), roll=math.radians(90))
    np.testing.assert_allclose(rolled[:3, 0], [0, 0, 1], atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_orbit_radius_height_aim_and_arc(seed):
    rng = np.random.default_rng(seed)
    c = np.array([0.5, -0.3, 0.8])
    path = cp.orbit(c, 30, rng, radius=(1.2, 2.0), height=(1.0, 1.8), arc_deg=(240, 360), aim_jitter=0.05,
                    roll_deg=3.0)
    _check_rotations(path)
    p = path.positions
    r = np.hypot(p[:, 0] - c[0], p[:, 1] - c[1])
    assert r.min() >= 1.2 - 1e-9 and r.max() <= 2.0 + 1e-9
    assert p[:, 2].min() >= 1.0 - 1e-9 and p[:, 2].max() <= 1.8 + 1e-9
    assert np.ptp(r) > 0.05 and np.ptp(p[:, 2]) > 0.05  # distance and height do vary
    bound = np.degrees(np.arctan(0.05 / np.linalg.norm(p - c, axis=1)))
    assert (_angle_deg(path.forwards, c - p) <= bound + 1e-6).all()
    az = np.unwrap(np.arctan2(p[:, 1] - c[1], p[:, 0] - c[0]))
    steps = np.diff(az)
    assert (steps > 0).all() or (steps < 0).all()  # walks one way round
    assert 240 - 1e-6 <= abs(math.degrees(az[-1] - az[0])) <= 360 + 1e-6
    # roll: the image's right axis stays within 3 degrees of horizontal
    assert (np.degrees(np.arcsin(np.abs(path.c2w[:, 2, 0]))) <= 3.0 + 0.2).all()


def test_closeup_distance_and_elevation():
    rng = np.random.default_rng(5)
    c = np.array([0.0, 0.0, 0.75])
    path = cp.closeup(c, 20, rng, distance=(0.3, 0.6), elevation_deg=(10, 60), aim_jitter=0.02)
    _check_rotations(path)
    d = path.positions - c
    dist = np.linalg.norm(d, axis=1)
    assert dist.min() >= 0.3 - 1e-9 and dist.max() <= 0.6 + 1e-9
    el = np.degrees(np.arcsin(d[:, 2] / dist))
    assert el.min() >= 10 - 1e-6 and el.max() <= 60 + 1e-6
    assert (_angle_deg(path.forwards, -d) <= np.degrees(np.arctan(0.02 / dist)) + 1e-6).all()


def test_forward_sweep_faces_one_way_from_a_rectangle():
    rng = np.random.default_rng(7)
    o, yaw = np.array([1.0, 2.0, 1.5]), math.radians(30)
    path = cp.forward(o, yaw, 25, rng, extent=(0.8, 0.5), target_distance=3.0, aim_jitter=0.05)
    _check_rotations(path)
    fwd = np.array([math.cos(yaw), math.sin(yaw), 0.0])
    right = np.array([math.sin(yaw), -math.cos(yaw), 0.0])
    rel = path.positions - o
    np.testing.assert_allclose(rel @ fwd, 0.0, atol=1e-9)  # all on the plane
    assert np.abs(rel @ right).max() <= 0.4 + 1e-9 and np.abs(rel[:, 2]).max() <= 0.25 + 1e-9
    assert np.ptp(rel @ right) > 0.3 and np.ptp(rel[:, 2]) > 0.2  # the sweep covers the rectangle
    assert (_angle_deg(path.forwards, fwd[None]) < 12).all()  # forward-facing
    assert (_angle_deg(path.forwards, path.aims - path.positions) <= np.degrees(np.arctan(0.05 / 2.9)) + 1e-6).all()


def test_walkthrough_follows_the_path_at_eye_height():
    rng = np.random.default_rng(9)
    wp = [(0, 0), (3, 0), (3, 2)]
    path = cp.walk(wp, 24, rng, eye_height=(1.4, 1.7), yaw_deg=15, pitch_deg=(-15, 5))
    _check_rotations(path)
    p = path.positions
    on_first = (np.abs(p[:, 1]) < 1e-9) & (p[:, 0] >= -1e-9) & (p[:, 0] <= 3 + 1e-9)
    on_second = (np.abs(p[:, 0] - 3) < 1e-9) & (p[:, 1] >= -1e-9) & (p[:, 1] <= 2 + 1e-9)
    assert (on_first | on_second).all()
    assert on_first.sum() > 10 and on_second.sum() > 5  # evenly spaced by length (3 + 2)
    assert p[:, 2].min() >= 1.4 - 1e-9 and p[:, 2].max() <= 1.7 + 1e-9
    f = path.forwards
    tangent = np.where(on_first[:, None] & ~on_second[:, None], [1.0, 0, 0], [0, 1.0, 0])
    yaw_err = _angle_deg(f * [1, 1, 0], tangent)
    assert (yaw_err <= 15 + 1e-6).all()
    pitch = np.degrees(np.arcsin(f[:, 2]))
    assert pitch.min() >= -15 - 1e-6 and pitch.max() <= 5 + 1e-6


def test_holdout_split_interleaves():
    train, test = cp.holdout_split(24, 8)
    assert test == [4, 12, 20] and sorted(train + test) == list(range(24))


# ------------------------------------------------------------------ analytic scene

F, SIZE = 120.0, (96, 128)


def _texture(x: np.ndarray, y: np.ndarray, kind: str, square: float = 0.1) -> np.ndarray:
    """sRGB colour on the ground plane: x < 0 uniform grey; x >= 0 a checker (``square``
    wide squares) or fine value noise."""
    out = np.full(x.shape + (3,), 0.5)
    right = x >= 0
    if kind == "checker":
        v = ((np.floor(x / square) + np.floor(y / square)) % 2) * 0.8 + 0.1
    else:
        h = np.sin(x * 311.7 + y * 183.3) * 43758.5453
        v = 0.2 + 0.6 * (h - np.floor(h))
    out[right] = v[right][:, None]
    return out


def ground_view(eye, target, kind: str = "noise", specular_y: float | None = None,
                square: float = 0.1) -> ps.ViewMaps:
    c2w = ps.opengl_to_opencv(cp.look_at(eye, target))
    K = np.array([[F, 0, SIZE[1] / 2 - 0.5], [0, F, SIZE[0] / 2 - 0.5], [0, 0, 1]])
    rays = ps.pixel_rays(K, SIZE) @ c2w[:3, :3].T  # world directions with camera z = 1
    o = c2w[:3, 3]
    with np.errstate(divide="ignore"):
        t = -o[2] / rays[..., 2]
    hit = (rays[..., 2] < 0) & (t > 0)
    depth = np.where(hit, t, 0.0)  # camera z = 1 per unit t, so t is the z-depth
    X = o[0] + t * rays[..., 0]
    Y = o[1] + t * rays[..., 1]
    rgb = np.where(hit[..., None], _texture(X, Y, kind, square), 0.7)
    spec = (Y > specular_y) & hit if specular_y is not None else None
    return ps.ViewMaps(rgb=rgb, depth=depth, K=K, c2w=c2w, specular=spec)


def ground_views(n: int = 6, kind: str = "noise", specular_y: float | None = None,
                 square: float = 0.1) -> list[ps.ViewMaps]:
    out = []
    for k in range(n):
        a = 2 * math.pi * k / n
        out.append(ground_view((1.5 * math.cos(a), 1.5 * math.sin(a), 1.6), (0.0, 0.0, 0.0), kind, specular_y, square))
    return out


def _true_depth(view: ps.ViewMaps, pix: np.ndarray) -> np.ndarray:
    return view.depth[pix[:, 0], pix[:, 1]]


# ------------------------------------------------------------------ MVS


def test_mvs_noise_outliers_holes_and_background():
    views = ground_views(6, "noise")
    rng = np.random.default_rng(0)
    sim = ps.simulate_mvs(views, rng, depth_noise=0.004, outlier_fraction=0.05, max_depth=3.0)
    P, info = sim.points.astype(np.float64), sim.info
    assert len(P) > 10_000
    rel = np.empty(len(P))
    for k, v in enumerate(views):
        sel = info["source_view"] == k
        _, z = ps.project(v, P[sel])
        rel[sel] = z / _true_depth(v, info["source_pixel"][sel]) - 1.0
    far = np.abs(rel) > 8 * 0.004
    assert abs(far.mean() - 0.05) < 0.01  # outlier fraction
    assert abs(rel[~far].std() - 0.004) < 0.0004  # depth noise std along the ray
    inliers = P[~far]
    assert np.abs(inliers[:, 2]).max() < 0.1  # on the ground
    # uniform half: a hole (up to the pixel that straddles the border, ~0.05 at grazing angles)
    assert (inliers[:, 0] < -0.06).sum() == 0
    assert (inliers[:, 0] > 0.06).sum() > 0.9 * len(inliers)
    depth_src = np.array([ps.project(views[k], P[i:i + 1])[1][0] for i, k in enumerate(info["source_view"][:2000])])
    assert (depth_src[~far[:2000]] <= 3.0 * 1.05).all()  # background beyond max_depth is dropped
    assert np.isfinite(sim.colors).all() and sim.colors.min() >= 0 and sim.colors.max() <= 1


def test_mvs_density_follows_texture_and_specular_holes():
    views = ground_views(4, "checker", specular_y=0.0, square=0.4)
    sim = ps.simulate_mvs(views, np.random.default_rng(1), outlier_fraction=0.0, specular_keep=0.1,
                          depth_noise=0.0, max_depth=3.0)
    P = sim.points.astype(np.float64)
    # checker squares are flat inside: points gather on the edges (x or y near a 0.4 multiple;
    # 44% of the area lies within 0.05 of one)
    dx = np.abs(P[:, 0] / 0.4 - np.round(P[:, 0] / 0.4)) * 0.4
    dy = np.abs(P[:, 1] / 0.4 - np.round(P[:, 1] / 0.4)) * 0.4
    assert (np.minimum(dx, dy) < 0.05).mean() > 0.98
    diffuse = ((P[:, 1] < -0.05) & (P[:, 1] > -0.8) & (P[:, 0] > 0.05) & (P[:, 0] < 0.8)).sum()
    shiny = ((P[:, 1] > 0.05) & (P[:, 1] < 0.8) & (P[:, 0] > 0.05) & (P[:, 0] < 0.8)).sum()
    assert diffuse > 300
    assert 0.05 < shiny / diffuse < 0.2  # kept at specular_keep = 0.1 of the density


def test_mvs_caps_points():
    sim = ps.simulate_mvs(ground_views(3), np.random.default_rng(2), max_points=1000, outlier_fraction=0.1)
    assert len(sim.points) == 1000 and sim.info["outlier"].sum() == 100


# ------------------------------------------------------------------ SfM


def test_sfm_points_sit_on_textured_corners():
    views = ground_views(8, "checker")
    sim = ps.simulate_sfm(views, np.random.default_rng(3), count=400, depth_noise=0.001)
    P = sim.points.astype(np.float64)
    assert 100 < len(P) <= 400
    assert len(P) == min(400, sim.info["available"])
    node = np.round(P[:, :2] / 0.1) * 0.1
    # within ~2 pixels (footprint about 2.2 / 120 per pixel) of a checker corner
    near = np.linalg.norm(P[:, :2] - node, axis=1) < 0.04
    assert near.mean() > 0.9
    assert (P[:, 0] > -0.04).all()  # nothing on the uniform half
    assert (sim.info["track"] >= 2).all()


def test_sfm_count_drawn_in_range_and_capped_by_corners():
    views = ground_views(4, "noise")
    for seed in range(3):
        sim = ps.simulate_sfm(views, np.random.default_rng(seed))
        assert 5000 <= sim.info["requested"] <= 50000
        assert len(sim.points) == min(sim.info["requested"], sim.info["available"])
    few = ps.simulate_sfm(views, np.random.default_rng(0), count=50)
    assert len(few.points) == 50


# ------------------------------------------------------------------ LiDAR


def _ground_and_wall(o: np.ndarray, d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        tg = np.where(d[:, 2] < 0, -o[:, 2] / d[:, 2], np.inf)
        tw = np.where(d[:, 0] > 0, (3.0 - o[:, 0]) / d[:, 0], np.inf)
    return np.minimum(tg, tw)


def test_lidar_rings_range_noise_and_dropout():
    sensor = np.array([0.0, 0.0, 1.5])
    kw = dict(rings=16, elevation_deg=(-30, 10), azimuth_step_deg=1.0, range_noise=0.02, require_seen=False)
    full = ps.simulate_lidar(_ground_and_wall, [sensor], [], np.random.default_rng(4), dropout=0.0, **kw)
    sim = ps.simulate_lidar(_ground_and_wall, [sensor], [], np.random.default_rng(5), dropout=0.1, **kw)
    assert len(sim.points) / len(full.points) == pytest.approx(0.9, abs=0.02)
    P = sim.points.astype(np.float64)
    d = P - sensor
    r = np.linalg.norm(d, axis=1)
    el = np.degrees(np.arcsin(d[:, 2] / r))
    rings = np.linspace(-30, 10, 16)
    assert np.abs(el[:, None] - rings[None]).min(1).max() < 1e-3  # on the scan rings
    assert len(np.unique(np.argmin(np.abs(el[:, None] - rings[None]), 1))) == 16  # every ring hits the wall/ground
    u = d / r[:, None]
    err = r - _ground_and_wall(np.repeat(sensor[None], len(u), 0), u)
    assert abs(err.mean()) < 0.003 and err.std() == pytest.approx(0.02, abs=0.002)  # range noise
    az = np.degrees(np.arctan2(d[:, 1], d[:, 0]))
    steps = np.diff(np.sort(az[np.abs(el - rings[3]) < 1e-3]))
    assert np.median(steps) == pytest.approx(1.0, abs=1e-3)  # azimuth spacing
    assert (sim.colors == 0.5).all()


def test_lidar_max_range():
    sensor = np.array([0.0, 0.0, 1.5])
    sim = ps.simulate_lidar(_ground_and_wall, [sensor], [], np.random.default_rng(0), max_range=2.5,
                            elevation_deg=(-60, -30), range_noise=0.0, require_seen=False)
    assert len(sim.points) > 100
    assert np.linalg.norm(sim.points - sensor, axis=1).max() <= 2.5 + 1e-4


def test_lidar_colours_come_from_views_that_see_the_point():
    sensor = np.array([0.0, 0.0, 1.5])
    views = [ground_view((0.0, 0.0, 1.6), (1.5, 0.2, 0.0), "checker"),
             ground_view((0.2, 0.0, 1.6), (1.5, 1.0, 0.0), "checker")]
    assert len(ps.simulate_lidar(_ground_and_wall, [sensor], [], np.random.default_rng(0)).points) == 0
    sim = ps.simulate_lidar(_ground_and_wall, [sensor], views, np.random.default_rng(0), rings=32,
                            elevation_deg=(-60, -20), azimuth_step_deg=0.5, range_noise=0.005)
    P = sim.points.astype(np.float64)
    assert len(P) > 200
    assert np.abs(P[:, 2]).max() < 0.05  # the wall is in no view: its points are dropped
    near = np.linalg.norm(P - sensor, axis=1) < 2.5  # where a view pixel is smaller than a square
    expect = _texture(P[near, 0], P[near, 1], "checker")
    assert near.sum() > 100 and (np.abs(sim.colors[near] - expect).max(1) < 0.05).mean() > 0.9


def test_walkthrough_glances_towards_a_focus_point():
    rng = np.random.default_rng(10)
    focus = np.array([1.5, 2.0, 0.8])
    path = cp.walk([(0, 0), (3, 0)], 12, rng, yaw_deg=0.0, focus=focus, focus_weight=0.5)
    f = path.forwards[:, :2] / np.linalg.norm(path.forwards[:, :2], axis=1, keepdims=True)
    p = path.positions[:, :2]
    to_focus = np.arctan2(focus[1] - p[:, 1], focus[0] - p[:, 0])
    expect = 0.5 * to_focus  # halfway between the tangent (+x, angle 0) and the focus direction
    np.testing.assert_allclose(np.arctan2(f[:, 1], f[:, 0]), expect, atol=math.radians(2.5))  # roll <= 2 deg
