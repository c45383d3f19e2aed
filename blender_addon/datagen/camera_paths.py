"""Camera paths like real captures, for the environment corpus (numpy only, no bpy).

Every path returns a :class:`CameraPath`: camera-to-world matrices with Blender / OpenGL
camera axes (x right, y up, looking along -z; world up +Z), the point each camera was
aimed at before hand-shake, and the parameters drawn. Kinds:

- ``orbit``: hand-held walk around a subject: azimuth advancing over an arc of
  ``arc_deg`` (default 240-360 degrees) with uneven steps, horizontal radius and camera
  height drifting smoothly inside their ranges, aim point jittered around the subject by
  at most ``aim_jitter`` (a distance), roll up to ``roll_deg``.
- ``closeup``: the same around a small subject at a short 3D distance (elevation 10-60
  degrees), over a partial arc.
- ``forward``: forward-facing sweep (LLFF-like): cameras spread over a rectangle
  ``extent`` (width, height) perpendicular to a horizontal viewing direction, all aimed
  at points near ``target`` ahead.
- ``walk``: walk-through along a polyline at eye height, looking along the path with a
  yaw wobble of at most ``yaw_deg`` and a pitch of ``pitch_deg``.

The shake model (aim jitter as a bounded offset of the aim point, a bounded roll) is what
tests check: every camera's forward axis lies within ``atan(aim_jitter / distance)`` of
the direction to its nominal aim point.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

KINDS = ("orbit", "closeup", "forward", "walk")


@dataclass
class CameraPath:
    kind: str
    c2w: np.ndarray  # (N, 4, 4), OpenGL camera axes
    aims: np.ndarray  # (N, 3) nominal aim points (before jitter)
    params: dict = field(default_factory=dict)

    @property
    def positions(self) -> np.ndarray:
        return self.c2w[:, :3, 3]

    @property
    def forwards(self) -> np.ndarray:
        return -self.c2w[:, :3, 2]


def look_at(eye: Sequence[float], target: Sequence[float], roll: float = 0.0,
            up: Sequence[float] = (0.0, 0.0, 1.0)) -> np.ndarray:
    """Camera-to-world (OpenGL axes) at ``eye`` looking at ``target``, image up towards
    ``up``, then rolled by ``roll`` radians about the viewing axis."""
    eye, target, up = (np.asarray(v, np.float64) for v in (eye, target, up))
    f = target - eye
    n = np.linalg.norm(f)
    if n < 1e-12:
        raise ValueError("look_at: eye and target coincide")
    f /= n
    r = np.cross(f, up)
    if np.linalg.norm(r) < 1e-9:  # looking straight up/down: any right vector will do
        r = np.cross(f, (1.0, 0.0, 0.0) if abs(f[0]) < 0.9 else (0.0, 1.0, 0.0))
    r /= np.linalg.norm(r)
    u = np.cross(r, f)
    if roll:
        c, s = math.cos(roll), math.sin(roll)
        r, u = c * r + s * u, -s * r + c * u
    m = np.eye(4)
    m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = r, u, -f, eye
    return m


def _smooth_walk(n: int, rng: np.random.Generator, lo: float, hi: float) -> np.ndarray:
    """``n`` values drifting smoothly inside [lo, hi] (a random low-frequency sine mix)."""
    t = np.linspace(0.0, 1.0, n)
    w = np.zeros(n)
    for k in (1, 2, 3):
        w += rng.normal() / k * np.sin(2 * math.pi * k * t + rng.uniform(0, 2 * math.pi))
    span = np.ptp(w)
    w = (w - w.min()) / span if span > 1e-12 else np.full(n, 0.5)
    # Use a random sub-range so not every path spans the whole range.
    a = rng.uniform(0.0, 0.4)
    b = rng.uniform(0.6, 1.0)
    return lo + (hi - lo) * (a + (b - a) * w)


def _jittered(eye: np.ndarray, aim: np.ndarray, rng: np.random.Generator, aim_jitter: float,
              roll_deg: float) -> np.ndarray:
    d = rng.normal(size=3)
    d *= rng.uniform(0.0, aim_jitter) / max(np.linalg.norm(d), 1e-12)
    roll = math.radians(rng.uniform(-roll_deg, roll_deg))
    return look_at(eye, aim + d, roll)


def orbit(center: Sequence[float], n: int, rng: np.random.Generator, radius: tuple[float, float],
          height: tuple[float, float], arc_deg: tuple[float, float] = (240.0, 360.0),
          aim_jitter: float = 0.05, roll_deg: float = 3.0) -> CameraPath:
    """Hand-held orbit around ``center``: horizontal distance in ``radius``, absolute camera
    height (world z) in ``height``."""
    c = np.asarray(center, np.float64)
    arc = math.radians(rng.uniform(*arc_deg))
    steps = rng.uniform(0.5, 1.5, n)
    az = rng.uniform(0, 2 * math.pi) + arc * np.concatenate([[0.0], np.cumsum(steps[:-1])]) / max(
        steps[:-1].sum(), 1e-12)
    if rng.random() < 0.5:
        az = az[::-1]
    rad = _smooth_walk(n, rng, *radius)
    hz = _smooth_walk(n, rng, *height)
    eyes = np.stack([c[0] + rad * np.cos(az), c[1] + rad * np.sin(az), hz], 1)
    c2w = np.stack([_jittered(e, c, rng, aim_jitter, roll_deg) for e in eyes])
    return CameraPath("orbit", c2w, np.repeat(c[None], n, 0),
                      dict(center=c.tolist(), radius=list(radius), height=list(height), arc_deg=math.degrees(arc),
                           aim_jitter=aim_jitter, roll_deg=roll_deg))


def closeup(center: Sequence[float], n: int, rng: np.random.Generator, distance: tuple[float, float],
            elevation_deg: tuple[float, float] = (10.0, 60.0), arc_deg: tuple[float, float] = (90.0, 200.0),
            aim_jitter: float = 0.02, roll_deg: float = 3.0) -> CameraPath:
    """Close-ups of a small subject: 3D distance in ``distance``, elevation above the
    subject's centre in ``elevation_deg``."""
    c = np.asarray(center, np.float64)
    arc = math.radians(rng.uniform(*arc_deg))
    az = rng.uniform(0, 2 * math.pi) + np.linspace(0, arc, n) + rng.normal(0, arc / (6 * n), n)
    dist = _smooth_walk(n, rng, *distance)
    el = np.radians(_smooth_walk(n, rng, *elevation_deg))
    eyes = c + np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], 1) * dist[:, None]
    c2w = np.stack([_jittered(e, c, rng, aim_jitter, roll_deg) for e in eyes])
    return CameraPath("closeup", c2w, np.repeat(c[None], n, 0),
                      dict(center=c.tolist(), distance=list(distance), elevation_deg=list(elevation_deg),
                           arc_deg=math.degrees(arc), aim_jitter=aim_jitter, roll_deg=roll_deg))


def forward(origin: Sequence[float], yaw: float, n: int, rng: np.random.Generator, extent: tuple[float, float],
            target_distance: float, aim_jitter: float = 0.05, roll_deg: float = 2.0) -> CameraPath:
    """Forward-facing sweep: cameras on a ``extent`` = (width, height) rectangle centred
    at ``origin``, perpendicular to the horizontal direction ``yaw`` (radians from +X),
    aimed at points around ``origin + target_distance * direction``."""
    o = np.asarray(origin, np.float64)
    fwd = np.array([math.cos(yaw), math.sin(yaw), 0.0])
    right = np.array([math.sin(yaw), -math.cos(yaw), 0.0])
    up = np.array([0.0, 0.0, 1.0])
    # A loose spiral covers the rectangle the way a person sweeps a phone.
    t = np.linspace(0, 1, n)
    ang = 2 * math.pi * rng.uniform(1.5, 2.5) * t + rng.uniform(0, 2 * math.pi)
    sx = np.clip(0.5 * (0.3 + 0.7 * t) * np.cos(ang) + rng.normal(0, 0.05, n), -0.5, 0.5)
    sy = np.clip(0.5 * (0.3 + 0.7 * t) * np.sin(ang) + rng.normal(0, 0.05, n), -0.5, 0.5)
    eyes = o + sx[:, None] * extent[0] * right + sy[:, None] * extent[1] * up
    target = o + target_distance * fwd
    c2w = np.stack([_jittered(e, target + (e - o) * 0.3, rng, aim_jitter, roll_deg) for e in eyes])
    aims = np.stack([target + (e - o) * 0.3 for e in eyes])
    return CameraPath("forward", c2w, aims,
                      dict(origin=o.tolist(), yaw=yaw, extent=list(extent), target_distance=target_distance,
                           aim_jitter=aim_jitter, roll_deg=roll_deg))


def walk(waypoints: Sequence[Sequence[float]], n: int, rng: np.random.Generator,
         eye_height: tuple[float, float] = (1.4, 1.7), yaw_deg: float = 15.0,
         pitch_deg: tuple[float, float] = (-15.0, 5.0), roll_deg: float = 2.0,
         focus: Sequence[float] | None = None, focus_weight: float = 0.0) -> CameraPath:
    """Walk-through along the horizontal polyline ``waypoints`` ((x, y) or (x, y, _)),
    evenly spaced by arc length, at eye height, looking along the path; with ``focus``,
    the heading turns by ``focus_weight`` (0..1) of the angle towards that point (a person
    glancing at what they walk past), before the yaw wobble."""
    wp = np.asarray(waypoints, np.float64)[:, :2]
    if len(wp) < 2:
        raise ValueError("walk: need at least two waypoints")
    seg = np.linalg.norm(np.diff(wp, axis=0), axis=1)
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    s = np.linspace(0, cum[-1], n)
    idx = np.clip(np.searchsorted(cum, s, side="right") - 1, 0, len(seg) - 1)
    frac = (s - cum[idx]) / np.maximum(seg[idx], 1e-12)
    xy = wp[idx] + (wp[idx + 1] - wp[idx]) * frac[:, None]
    tangent = (wp[idx + 1] - wp[idx]) / np.maximum(seg[idx], 1e-12)[:, None]
    hz = _smooth_walk(n, rng, *eye_height)
    heading = np.arctan2(tangent[:, 1], tangent[:, 0])
    if focus is not None and focus_weight > 0:
        to_focus = np.arctan2(focus[1] - xy[:, 1], focus[0] - xy[:, 0])
        heading = heading + focus_weight * ((to_focus - heading + math.pi) % (2 * math.pi) - math.pi)
    yaw = heading + np.radians(_smooth_walk(n, rng, -yaw_deg, yaw_deg))
    pitch = np.radians(_smooth_walk(n, rng, *pitch_deg))
    c2w, aims = [], []
    for k in range(n):
        eye = np.array([xy[k, 0], xy[k, 1], hz[k]])
        d = np.array([math.cos(yaw[k]) * math.cos(pitch[k]), math.sin(yaw[k]) * math.cos(pitch[k]),
                      math.sin(pitch[k])])
        aims.append(eye + d)
        c2w.append(look_at(eye, eye + d, math.radians(rng.uniform(-roll_deg, roll_deg))))
    return CameraPath("walk", np.stack(c2w), np.stack(aims),
                      dict(waypoints=wp.tolist(), eye_height=list(eye_height), yaw_deg=yaw_deg,
                           pitch_deg=list(pitch_deg), roll_deg=roll_deg,
                           focus=None if focus is None else [float(v) for v in focus], focus_weight=focus_weight))


def holdout_split(n: int, every: int = 8) -> tuple[list[int], list[int]]:
    """Train / test indices along a path: every ``every``-th view (from ``every // 2``) is
    test, so test views are interleaved with the training views as in real captures."""
    test = list(range(every // 2, n, every))
    return [k for k in range(n) if k not in test], test
