"""Training samples: random zoom + crop of a view with its matching camera, and choosing
input views for a target view by the baseline-angle score (the
published NPBG++ training sampler)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ..camera import Camera
from .scene_data import SceneData


def _rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def sample_crop(
    scene: SceneData,
    index: int,
    rng: np.random.Generator | int | None,
    image_size: int | Sequence[int] | None = 256,
    zoom_range: tuple[float, float] = (1.0, 1.0),
    random_shift: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, Camera]:
    """A training sample of view ``index``: ``(image (3,h,w), mask (1,h,w) | None, camera)``.

    The image is resized by a zoom drawn uniformly from ``zoom_range`` (relative to native
    size) and cropped to ``image_size`` (int or (h, w); None: no crop). The zoom is raised
    where needed so the crop always lies inside the image (no padded pixels). The crop is
    at a random position with ``random_shift``, else centred. The camera is exactly the
    one of the returned pixels (Camera.scaled, then Camera.cropped).
    """
    gen = _rng(rng)
    cam = scene.views[index].camera
    H, W = cam.image_size
    lo, hi = float(zoom_range[0]), float(zoom_range[1])
    if not (0 < lo <= hi):
        raise ValueError(f"zoom_range must satisfy 0 < a <= b, got {zoom_range}")
    zoom = lo if lo == hi else float(gen.uniform(lo, hi))
    if image_size is None:
        ch = cw = None
    else:
        if isinstance(image_size, int | np.integer):
            ch = cw = int(image_size)
        else:
            ch, cw = (int(s) for s in image_size)
        zoom = max(zoom, ch / H, cw / W)
    h, w = max(2, int(round(H * zoom))), max(2, int(round(W * zoom)))
    if ch is not None:
        h, w = max(h, ch), max(w, cw)
    image = scene.load_image(index, (h, w))
    mask = scene.load_mask(index, (h, w))
    camera = cam.scaled((h, w))
    if ch is None:
        return image, mask, camera
    if random_shift:
        top = int(gen.integers(0, h - ch + 1))
        left = int(gen.integers(0, w - cw + 1))
    else:
        top, left = (h - ch) // 2, (w - cw) // 2
    image = image[:, top : top + ch, left : left + cw].contiguous()
    if mask is not None:
        mask = mask[:, top : top + ch, left : left + cw].contiguous()
    return image, mask, camera.cropped(top, left, ch, cw)


def view_scores(
    scene: SceneData,
    target: int,
    candidates: Sequence[int],
    best_angle_deg: float = 15.0,
    angle_sigma_deg: float = 10.0,
    distance_sigma: float = 0.25,
) -> np.ndarray:
    """Score in (0, 1] per candidate: a Gaussian of the angle between the directions from
    the scene centre to the two cameras around ``best_angle_deg``, times a Gaussian of
    the log ratio of their distances to the centre (similar distance scores high)."""
    center = scene.scene_center()
    t = scene.views[target].camera.center().double().numpy() - center
    dt = np.linalg.norm(t)
    scores = np.empty(len(candidates))
    for k, c in enumerate(candidates):
        v = scene.views[c].camera.center().double().numpy() - center
        dv = np.linalg.norm(v)
        cosang = float(np.dot(t, v) / max(dt * dv, 1e-12))
        angle = math.degrees(math.acos(min(1.0, max(-1.0, cosang))))
        ratio = math.log(max(dv, 1e-12) / max(dt, 1e-12))
        scores[k] = math.exp(-0.5 * ((angle - best_angle_deg) / angle_sigma_deg) ** 2) * math.exp(
            -0.5 * (ratio / distance_sigma) ** 2
        )
    return scores


def select_input_views(
    scene: SceneData,
    target: int,
    candidates: Sequence[int],
    count: int,
    rng: np.random.Generator | int | None = None,
) -> list[int]:
    """Choose ``count`` input views for ``target`` among ``candidates`` (target excluded).

    With ``rng=None`` the ``count`` best-scoring views (deterministic). With an rng,
    ``count`` views drawn without replacement from the ``2*count`` best, with probability
    proportional to score (same rng state -> same choice). Fewer candidates than
    ``count``: all of them.
    """
    cands = [int(c) for c in candidates if int(c) != int(target)]
    if count <= 0 or not cands:
        return []
    if len(cands) <= count:
        return cands
    scores = view_scores(scene, target, cands)
    order = np.argsort(-scores, kind="stable")
    if rng is None:
        return [cands[i] for i in order[:count]]
    pool = order[: 2 * count]
    p = scores[pool] + 1e-9
    picked = _rng(rng).choice(len(pool), size=count, replace=False, p=p / p.sum())
    return [cands[pool[i]] for i in picked]
