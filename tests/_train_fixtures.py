"""Tiny NeRF-Synthetic-layout scenes for the trainer tests, made without Blender: a
coloured sphere seen by cameras on a ring, images from the project's own rasterizer
(a dense cloud, so every object pixel is covered), a sparse point cloud beside them; and
helpers several test files share (gradient comparison, the worker's Aggregate of a scene,
set scores of a checked fit's kept photo)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from npbgpp_core import Camera, rasterize, save_ply

if TYPE_CHECKING:
    from npbgpp_core.protocol import AggregationStarted
    from npbgpp_core.service import RenderService


def sphere_points(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = rng.normal(size=(n, 3))
    return (p / np.linalg.norm(p, axis=1, keepdims=True)).astype(np.float32)


def sphere_colors(p: np.ndarray) -> np.ndarray:
    """A smooth pattern so views differ and there is something to learn."""
    return np.stack([0.5 + 0.4 * np.sin(3 * p[:, 0]), 0.5 + 0.4 * np.cos(2 * p[:, 1]),
                     0.5 + 0.4 * p[:, 2]], 1).astype(np.float32)


def make_tiny_scene(
    folder: str, views: int = 6, size: int = 32, n_points: int = 300, seed: int = 0,
    splits: tuple[int, int, int] = (4, 1, 1),
) -> str:
    """Write ``folder`` (transforms_{train,val,test}.json, RGBA PNGs, points3d.ply); returns it."""
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    dense = sphere_points(20000, seed + 1)
    dense_t = torch.from_numpy(dense)
    dense_c = sphere_colors(dense)
    fov = 50.0
    frames = []
    for i in range(views):
        a = 2 * math.pi * i / views
        eye = (3.0 * math.sin(a), 0.6 + 0.2 * (i % 2), -3.0 * math.cos(a))
        cam = Camera.look_at(eye=eye, target=(0, 0, 0), fov_x_deg=fov, image_size=(size, size))
        index = rasterize(dense_t, cam, scales=(1.0,))[0].numpy()
        rgba = np.zeros((size, size, 4), np.float32)
        hit = index >= 0
        rgba[hit, :3] = dense_c[index[hit]]
        rgba[hit, 3] = 1.0
        name = f"images/r_{i}"
        Image.fromarray((rgba * 255 + 0.5).astype(np.uint8)).save(os.path.join(folder, name + ".png"))
        _, R_cv, t_cv = cam.to_opencv()
        w2c = np.eye(4)
        w2c[:3, :3], w2c[:3, 3] = R_cv, t_cv
        c2w = np.linalg.inv(w2c) @ np.diag([1.0, -1.0, -1.0, 1.0])  # OpenCV -> OpenGL camera axes
        frames.append({"file_path": "./" + name, "transform_matrix": c2w.tolist()})
    start = 0
    for split, count in zip(("train", "val", "test"), splits, strict=True):
        meta = {"camera_angle_x": math.radians(fov), "frames": frames[start : start + count]}
        start += count
        with open(os.path.join(folder, f"transforms_{split}.json"), "w") as f:
            json.dump(meta, f)
    pts = sphere_points(n_points, seed + 2)
    save_ply(os.path.join(folder, "points3d.ply"), pts, sphere_colors(pts))
    return folder


def tiny_scene_and_bundle(root: str, views: int, splits: tuple[int, int, int]) -> tuple[str, str]:
    """A :func:`make_tiny_scene` (24 px, 300 points) in ``root``/scene and its bundle, exported
    with the bundled object weights by ``headless_train export``: (scene folder, bundle path)."""
    from headless_train.export import main as export_main
    from npbgpp_core.pretrained import default_weights_path

    folder = make_tiny_scene(os.path.join(root, "scene"), views=views, size=24, n_points=300, splits=splits)
    bundle = os.path.join(root, "scene.npbgpp")
    assert export_main(["--checkpoint", default_weights_path("npbgpp", "object"), "--scene", folder,
                        "--out", bundle]) == 0
    return folder, bundle


def make_dataset(root: str, names: tuple[str, ...] = ("sceneA",), **kwargs) -> str:
    """A data_root holding one tiny scene per name."""
    for k, name in enumerate(names):
        make_tiny_scene(os.path.join(root, name), seed=10 * k, **kwargs)
    return root


def assert_same_gradients(
    grads_a: tuple[torch.Tensor | None, ...], grads_b: tuple[torch.Tensor | None, ...], n_params: int, rtol: float
) -> None:
    """Two gradient tuples of one parameter list (``torch.autograd.grad(..., allow_unused=True)``)
    agree parameter by parameter, and more than half the parameters get a nonzero gradient, so
    the comparison is not passed by gradients that are all zero."""
    nonzero = 0
    for a, b in zip(grads_a, grads_b, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=rtol)
            nonzero += int(a.abs().sum() > 0)
    assert nonzero > n_params // 2


def kept_photo_scores(before: float, after: float) -> Callable[..., float]:
    """A stand-in for ``npbgpp_core.fitting.view_psnr`` in a checked fit: it scores the kept
    photo ``before`` dB unfitted (its first call) and ``after`` dB fitted, so the fit's loss
    there is known exactly whatever the fit did."""
    calls: list[int] = []

    def fake(*_args: object) -> float:
        calls.append(1)
        return before if len(calls) == 1 else after
    return fake


def scores_in_turn(*scores: float) -> Callable[..., float]:
    """A stand-in for ``npbgpp_core.fitting.view_psnr`` in a choosing check: the kept photo's
    scores in the order the check asks for them (unfitted, then after each recipe's fit), so
    which recipe wins there is known whatever the fits did. Its ``left`` attribute is the list
    of scores not asked for yet ([] once the check asked for every one)."""
    left = list(scores)

    def fake(*_args: object) -> float:
        return left.pop(0)
    fake.left = left  # type: ignore[attr-defined]
    return fake


def aggregate_with_worker(folder: str, out: str, weights: str = "", service: RenderService | None = None,
                          **begin: Any) -> AggregationStarted:
    """Write ``folder``'s aggregated bundle to ``out`` with the worker's own Aggregate job (what
    the add-on runs: AggregateBegin, one AggregateView per view, AggregateFinish), asserting each
    reply; returns the AggregationStarted reply (the weights and domain it chose). ``service``:
    a RenderService to run it on (a new one when None; give one to use it after). ``begin``:
    other AggregateBegin fields; the defaults here are device "CPU" and up_axis "POS_Z"."""
    from npbgpp_core import protocol as P
    from npbgpp_core.service import RenderService as Service

    service = Service() if service is None else service
    started = service.handle(P.AggregateBegin(folder, weights, **{"device": "CPU", "up_axis": "POS_Z", **begin}))
    assert isinstance(started, P.AggregationStarted), started
    for k in range(started.views):
        assert service.handle(P.AggregateView(k)) == P.Done()
    finished = service.handle(P.AggregateFinish(out))
    assert isinstance(finished, P.AggregationResult), finished
    return started
