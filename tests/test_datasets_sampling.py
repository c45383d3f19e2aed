"""Training samples: crops carry the exact camera of their pixels; view selection follows
the baseline-angle score; point subsampling keeps colours aligned."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from npbgpp_core.camera import Camera
from npbgpp_core.datasets import SceneData, View, sample_crop, select_input_views

H, W = 48, 64


def _scene(tmp_path, with_mask: bool = True) -> SceneData:
    rng = np.random.default_rng(0)
    views = []
    for i in range(2):
        img = rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
        path = str(tmp_path / f"{i}.png")
        Image.fromarray(img).save(path)
        mask_path = None
        if with_mask:
            mask_path = str(tmp_path / f"m{i}.png")
            Image.fromarray(rng.integers(0, 2, size=(H, W), dtype=np.uint8) * 255).save(mask_path)
        cam = Camera.look_at((0.3 * i, 0.2, -3.0), (0, 0, 0), fov_x_deg=50, image_size=(H, W))
        views.append(View(str(i), path, mask_path, cam))
    pts = np.random.default_rng(1).uniform(-0.5, 0.5, (100, 3)).astype(np.float32)
    return SceneData("t", str(tmp_path), "test", pts, pts.copy() + 0.5, views, [0, 1], [], [], None)


def _find_offset(full: torch.Tensor, crop: torch.Tensor) -> tuple[int, int]:
    h, w = crop.shape[1:]
    for top in range(full.shape[1] - h + 1):
        for left in range(full.shape[2] - w + 1):
            if torch.equal(full[:, top : top + h, left : left + w], crop):
                return top, left
    raise AssertionError("crop not found in the image")


@pytest.mark.parametrize("zoom", [1.0, 2.0])
def test_crop_pixels_and_camera_agree(tmp_path, zoom):
    scene = _scene(tmp_path)
    image, mask, cam = sample_crop(scene, 1, np.random.default_rng(5), image_size=(20, 24), zoom_range=(zoom, zoom))
    assert image.shape == (3, 20, 24) and mask.shape == (1, 20, 24) and cam.image_size == (20, 24)
    zh, zw = int(H * zoom), int(W * zoom)
    full = scene.load_image(1, (zh, zw))
    top, left = _find_offset(full, image)
    assert torch.equal(scene.load_mask(1, (zh, zw))[:, top : top + 20, left : left + 24], mask)
    # the crop camera sees a point where the full camera does, scaled and shifted
    uv_full, _ = scene.views[1].camera.project(torch.as_tensor(scene.points))
    uv_crop, _ = cam.project(torch.as_tensor(scene.points))
    expected = (uv_full + 0.5) * zoom - 0.5 - torch.tensor([left, top], dtype=uv_full.dtype)
    torch.testing.assert_close(uv_crop, expected, atol=1e-3, rtol=0)


def test_crop_deterministic_centred_and_always_inside(tmp_path):
    scene = _scene(tmp_path, with_mask=False)
    a = sample_crop(scene, 0, np.random.default_rng(9), 16, (0.5, 1.5))
    b = sample_crop(scene, 0, np.random.default_rng(9), 16, (0.5, 1.5))
    assert torch.equal(a[0], b[0]) and a[1] is None
    img, _, cam = sample_crop(scene, 0, np.random.default_rng(1), 16, (1.0, 1.0), random_shift=False)
    full = scene.load_image(0)
    assert _find_offset(full, img) == ((H - 16) // 2, (W - 16) // 2)
    # a crop larger than the zoomed image raises the zoom instead of padding
    big, _, cam = sample_crop(scene, 0, np.random.default_rng(2), (64, 64), (0.1, 0.2))
    assert big.shape == (3, 64, 64) and cam.image_size == (64, 64)
    whole, _, cam = sample_crop(scene, 0, np.random.default_rng(2), None, (0.5, 0.5))
    assert whole.shape == (3, H // 2, W // 2)


def _circle_scene(angles_deg, distances) -> SceneData:
    views = []
    for k, (a, d) in enumerate(zip(angles_deg, distances, strict=True)):
        eye = (d * math.sin(math.radians(a)), 0.0, -d * math.cos(math.radians(a)))
        views.append(View(str(k), "", None, Camera.look_at(eye, (0, 0, 0), image_size=(8, 8))))
    pts = np.zeros((1, 3), np.float32)
    return SceneData("c", "", "test", pts, None, views, list(range(len(views))), [], [], None)


def test_select_input_views_prefers_15_degrees_and_similar_distance():
    angles = [0, 3, 10, 15, 15, 20, 40, 90, 180]
    dists = [3, 3, 3, 3, 6, 3, 3, 3, 3]
    scene = _circle_scene(angles, dists)
    cands = list(range(len(angles)))
    assert select_input_views(scene, 0, cands, 3, rng=None) == [3, 2, 5]  # 15, then 10 and 20 degrees
    assert 0 not in select_input_views(scene, 0, cands, 8, rng=None)
    draws = [select_input_views(scene, 0, cands, 2, rng=np.random.default_rng(s)) for s in range(20)]
    assert draws == [select_input_views(scene, 0, cands, 2, rng=np.random.default_rng(s)) for s in range(20)]
    assert all(set(d) <= {3, 2, 5, 1} for d in draws)  # drawn from the 2*count best
    assert len({tuple(d) for d in draws}) > 1
    assert select_input_views(scene, 0, [0, 4], 3, rng=None) == [4]


def test_subsample_points(tmp_path):
    scene = _scene(tmp_path)
    sub = scene.subsample_points(30, seed=4)
    assert sub.points.shape == (30, 3) and sub.metadata["points_dropped"] == 70
    np.testing.assert_array_equal(sub.colors, sub.points + 0.5)
    rows = {tuple(p) for p in scene.points.tolist()}
    assert all(tuple(p) in rows for p in sub.points.tolist())
    np.testing.assert_array_equal(scene.subsample_points(30, seed=4).points, sub.points)
    assert scene.subsample_points(500).points.shape == (100, 3)
    assert len(scene.points) == 100 and os.path.isfile(scene.views[0].image_path)
