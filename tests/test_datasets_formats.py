"""Every dataset layout: a tiny scene is written by a writer built from the format's own
definition (not from the loader), loaded back, and checked: cameras project known 3D
points to the pixels computed independently with numpy from the writer's K, R, t;
splits, masks and format detection are right; bad inputs raise DatasetError naming the
file."""

from __future__ import annotations

import json
import math
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from npbgpp_core.datasets import DatasetError, detect_format, load_scene
from npbgpp_core.ply import save_ply

H, W = 30, 40
POINTS = np.random.default_rng(7).uniform(-0.5, 0.5, size=(50, 3))
COLORS = np.random.default_rng(8).uniform(0, 1, size=(50, 3))


def look_at_cv(eye: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV world-to-camera R, t for a camera at ``eye`` looking at the origin (world up +z)."""
    z = -eye.astype(np.float64)
    z /= np.linalg.norm(z)
    x = np.cross(z, [0.0, 0.0, -1.0])
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    R = np.stack([x, y, z])
    return R, -R @ eye


def make_cameras(n: int, seed: int = 0, square_focal: bool = False) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    cams = []
    for i in range(n):
        phi = 2 * math.pi * i / n
        eye = np.array([4 * math.cos(phi), 4 * math.sin(phi), 1.0 + 0.3 * rng.standard_normal()])
        R, t = look_at_cv(eye)
        fx = 35.0 + 5 * rng.random()
        fy = fx if square_focal else fx * (1.0 + 0.05 * rng.random())
        K = np.array([[fx, 0, W / 2 + rng.uniform(-3, 3)], [0, fy, H / 2 + rng.uniform(-3, 3)], [0, 0, 1.0]])
        cams.append((K, R, t))
    return cams


def expected_pixels(K: np.ndarray, R: np.ndarray, t: np.ndarray, points: np.ndarray = POINTS) -> np.ndarray:
    cam = points @ R.T + t
    return np.stack([K[0, 0] * cam[:, 0] / cam[:, 2] + K[0, 2], K[1, 1] * cam[:, 1] / cam[:, 2] + K[1, 2]], axis=1)


def assert_projects(camera, K, R, t, points=POINTS) -> None:
    uv, depth = camera.project(torch.as_tensor(points, dtype=torch.float64))
    assert (depth > 0).all()
    np.testing.assert_allclose(uv.double().numpy(), expected_pixels(K, R, t, points), atol=1e-3, rtol=0)


def write_png(path: str, array: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def image_pattern(i: int, channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(100 + i)
    return rng.integers(0, 256, size=(H, W, channels), dtype=np.uint8)


def mask_pattern(i: int) -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    m[5 + i % 5 : 20, 8:30] = 255
    return m


# ---------------------------------------------------------------- NeRF-Synthetic
def write_nerf(root: str, counts=(3, 2, 2), extra_keys: bool = False) -> list[tuple]:
    """transforms_{split}.json: camera_angle_x, frames with file_path (no extension) and
    camera-to-world transform_matrix in OpenGL axes (x right, y up, z back)."""
    all_cams = []
    k = 0
    for split, n in zip(("train", "val", "test"), counts, strict=True):
        cams = make_cameras(n, seed=len(all_cams) + 1, square_focal=True)
        frames = []
        for K, R, t in cams:
            c2w = np.eye(4)
            c2w[:3, :3] = R.T
            c2w[:3, 3] = -R.T @ t
            c2w[:3, 1:3] *= -1.0  # OpenCV y down, z forward -> OpenGL y up, z back
            frame = {"file_path": f"./{split}/r_{k}", "transform_matrix": c2w.tolist()}
            if extra_keys:
                # instant-ngp keys: principal point with the pixel-corner origin
                frame.update(fl_x=K[0, 0], fl_y=K[1, 1], cx=K[0, 2] + 0.5, cy=K[1, 2] + 0.5, w=W, h=H)
            else:
                K[0, 2], K[1, 2] = (W - 1) / 2, (H - 1) / 2  # centred principal point
            frames.append(frame)
            rgba = image_pattern(k, 4)
            rgba[:, :, 3] = mask_pattern(k)
            write_png(os.path.join(root, split, f"r_{k}.png"), rgba)
            k += 1
        all_cams += cams
        angle = 2 * math.atan(W / (2 * cams[0][0][0, 0])) if cams else 0.7
        if not extra_keys:
            # one focal per file (camera_angle_x): use the first camera's for all of them
            for c in cams:
                c[0][0, 0] = c[0][1, 1] = cams[0][0][0, 0]
        with open(os.path.join(root, f"transforms_{split}.json"), "w") as f:
            json.dump({"camera_angle_x": angle, "frames": frames}, f)
    save_ply(os.path.join(root, "points3d.ply"), POINTS.astype(np.float32), COLORS)
    return all_cams


@pytest.mark.parametrize("extra_keys", [False, True])
def test_nerf_synthetic(tmp_path, extra_keys):
    root = str(tmp_path / "lego")
    cams = write_nerf(root, extra_keys=extra_keys)
    assert detect_format(root) == "nerf_synthetic"
    scene = load_scene(root)
    assert scene.format == "nerf_synthetic"
    assert (scene.train, scene.val, scene.test) == ([0, 1, 2], [3, 4], [5, 6])
    for view, (K, R, t) in zip(scene.views, cams, strict=True):
        assert view.camera.image_size == (H, W)
        assert_projects(view.camera, K, R, t)
    np.testing.assert_allclose(scene.points, POINTS, atol=1e-6)
    np.testing.assert_allclose(scene.colors, np.round(COLORS * 255) / 255, atol=1e-6)
    # white compositing and alpha mask
    rgba = image_pattern(4, 4).astype(np.float64) / 255
    alpha = mask_pattern(4) / 255.0
    img = scene.load_image(4).numpy().transpose(1, 2, 0)
    np.testing.assert_allclose(img, rgba[:, :, :3] * alpha[..., None] + (1 - alpha[..., None]), atol=1e-6)
    np.testing.assert_allclose(scene.load_mask(4)[0].numpy(), alpha, atol=1e-6)
    black = load_scene(root, white_bg=False).load_image(4).numpy().transpose(1, 2, 0)
    np.testing.assert_allclose(black, rgba[:, :, :3] * alpha[..., None], atol=1e-6)


def test_nerf_resized_image_matches_scaled_camera(tmp_path):
    root = str(tmp_path / "s")
    write_nerf(root)
    scene = load_scene(root)
    img = scene.load_image(0, size=(15, 20))
    assert img.shape == (3, 15, 20)
    full = scene.load_image(0)
    np.testing.assert_allclose(img.numpy(), full.reshape(3, 15, 2, 20, 2).mean(dim=(2, 4)).numpy(), atol=2e-6)
    cam = scene.camera(0, (15, 20))
    uv_full, _ = scene.views[0].camera.project(torch.as_tensor(POINTS))
    uv_half, _ = cam.project(torch.as_tensor(POINTS))
    np.testing.assert_allclose(uv_half.numpy(), ((uv_full + 0.5) / 2 - 0.5).numpy(), atol=1e-4)


# ---------------------------------------------------------------- DTU / H3DS (IDR)
def write_idr(root: str, cams, image_names, mask_names, scale_mat: np.ndarray | None = None, p_shape=(4, 4)):
    """cameras.npz with world_mat_i = P = K[R|t] (arbitrary non-zero scale) and scale_mat_i."""
    rng = np.random.default_rng(3)
    os.makedirs(root, exist_ok=True)
    arrays = {}
    for i, (K, R, t) in enumerate(cams):
        P = np.eye(4)
        P[:3, :4] = K @ np.hstack([R, t[:, None]]) * rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 3.0)
        arrays[f"world_mat_{i}"] = P[: p_shape[0]]
        arrays[f"scale_mat_{i}"] = np.eye(4) if scale_mat is None else scale_mat
    np.savez(os.path.join(root, "cameras.npz"), **arrays)
    for i, name in enumerate(image_names):
        write_png(os.path.join(root, "image", name), image_pattern(i))
    for i, name in enumerate(mask_names or []):
        write_png(os.path.join(root, "mask", name), mask_pattern(i))


@pytest.mark.parametrize("p_shape", [(4, 4), (3, 4)])
def test_dtu(tmp_path, p_shape):
    root = str(tmp_path / "scan1")
    cams = make_cameras(49, seed=2)
    names = [f"{i:06d}.png" for i in range(49)]
    write_idr(root, cams, names, [f"{i:03d}.png" for i in range(49)], p_shape=p_shape)
    save_ply(os.path.join(root, "points3d.ply"), POINTS.astype(np.float32), COLORS)
    assert detect_format(root) == "dtu"
    scene = load_scene(root)
    assert scene.val == [5, 15, 25, 35, 45]
    assert scene.test == [7, 12, 17, 22, 27, 32, 37, 42, 47]
    assert scene.train == [i for i in range(49) if i not in scene.val + scene.test]
    for view, (K, R, t) in zip(scene.views, cams, strict=True):
        assert_projects(view.camera, K, R, t)
    np.testing.assert_array_equal(scene.load_mask(3)[0].numpy(), mask_pattern(3) / 255.0)
    np.testing.assert_allclose(scene.load_image(3).numpy().transpose(1, 2, 0), image_pattern(3) / 255.0, atol=1e-6)
    averaged = load_scene(root, average_intrinsics=True)
    K_mean = np.mean([K for K, _, _ in cams], axis=0)
    for view in averaged.views:
        np.testing.assert_allclose(view.camera.to_opencv()[0], K_mean, atol=1e-3)
    custom = load_scene(root, format="dtu", val_indices=[0], test_indices=[1, 2])
    assert (custom.val, custom.test, custom.train[:2]) == ([0], [1, 2], [3, 4])


def test_dtu_scale_mat_normalised_frame(tmp_path):
    root = str(tmp_path / "scan2")
    cams = make_cameras(4, seed=4)
    S = np.diag([2.0, 2.0, 2.0, 1.0])
    S[:3, 3] = [0.1, -0.2, 0.3]
    write_idr(root, cams, [f"{i}.png" for i in range(4)], None, scale_mat=S)
    save_ply(os.path.join(root, "cloud.ply"), POINTS.astype(np.float32))
    scene = load_scene(root, use_scale_mat=True, pc_name="cloud")
    unit = (POINTS - S[:3, 3]) / 2.0
    np.testing.assert_allclose(scene.points, unit, atol=1e-6)
    for view, (K, R, t) in zip(scene.views, cams, strict=True):
        uv, _ = view.camera.project(torch.as_tensor(unit))
        np.testing.assert_allclose(uv.numpy(), expected_pixels(K, R, t), atol=1e-3)


def test_h3ds_views_config(tmp_path):
    root = str(tmp_path / "h3ds_scene")
    cams = make_cameras(8, seed=5)
    write_idr(root, cams, [f"img_{i:04d}.jpg" for i in range(8)], [f"mask_{i:04d}.png" for i in range(8)])
    save_ply(os.path.join(root, "points3d.ply"), POINTS.astype(np.float32))
    assert detect_format(root) == "h3ds"
    scene = load_scene(root)
    assert (scene.train, scene.val, scene.test) == (list(range(8)), [], [])
    for view, (K, R, t) in zip(scene.views, cams, strict=True):
        assert_projects(view.camera, K, R, t)
    np.testing.assert_array_equal(scene.load_mask(2)[0].numpy(), mask_pattern(2) / 255.0)
    picked = load_scene(root, views_config=[1, 4, 6])
    assert (picked.train, picked.test) == ([1, 4, 6], [0, 2, 3, 5, 7])
    cfg = tmp_path / "views.json"
    cfg.write_text(json.dumps({"3": [0, 3, 5], "4": [0, 2, 4, 6]}))
    assert load_scene(root, views_config=str(cfg), num_views=4).train == [0, 2, 4, 6]
    with pytest.raises(DatasetError, match="num_views"):
        load_scene(root, views_config=str(cfg))
    with pytest.raises(DatasetError, match="out of range"):
        load_scene(root, views_config=[0, 9])


# ---------------------------------------------------------------- ScanNet
def write_scannet(root: str, names=(0, 2, 10, 11), k_size=(H, W)) -> list[tuple]:
    cams = make_cameras(len(names), seed=6)
    K = cams[0][0]
    for c in cams:
        c[0][:] = K
    os.makedirs(os.path.join(root, "images"))
    for i, n in enumerate(names):
        Image.fromarray(image_pattern(i)).save(os.path.join(root, "images", f"{n}.jpg"), quality=95)
    with open(os.path.join(root, "intrinsics.npy"), "wb") as f:
        # the published preprocessing stores a pickled dict via np.save
        np.save(f, np.array({"K": K, "height": k_size[0], "width": k_size[1]}, dtype=object), allow_pickle=True)
    ext = np.stack([np.vstack([np.hstack([R, t[:, None]]), [0, 0, 0, 1]]) for _, R, t in cams])
    np.save(os.path.join(root, "extrinsics.npy"), ext)
    save_ply(os.path.join(root, "full.ply"), POINTS.astype(np.float32), COLORS)
    return cams


def test_scannet(tmp_path):
    root = str(tmp_path / "scene0000_00")
    cams = write_scannet(root)
    assert detect_format(root) == "scannet"
    scene = load_scene(root)
    assert [v.name for v in scene.views] == ["0", "2", "10", "11"]  # integer order, not lexical
    for view, (K, R, t) in zip(scene.views, cams, strict=True):
        assert_projects(view.camera, K, R, t)
    assert scene.colors is not None and scene.load_mask(0) is None
    assert load_scene(root, test_every=2).test == [0, 2]


def test_scannet_intrinsics_for_other_size_are_scaled(tmp_path):
    root = str(tmp_path / "s")
    cams = write_scannet(root, k_size=(2 * H, 2 * W))
    scene = load_scene(root)
    K, R, t = cams[1]
    K2 = K.copy()
    K2[:2, :2] /= 2
    K2[0, 2], K2[1, 2] = (K[0, 2] + 0.5) / 2 - 0.5, (K[1, 2] + 0.5) / 2 - 0.5
    assert_projects(scene.views[1].camera, K2, R, t)
    for k_size in ((0, W), (-H, W)):  # a zero height divided by zero (a ZeroDivisionError traceback)
        bad = str(tmp_path / f"bad{k_size[0]}")
        write_scannet(bad, k_size=k_size)
        with pytest.raises(DatasetError, match=rf"intrinsics.npy: height x width {k_size[0]} x {W} is not an image"):
            load_scene(bad)


# ---------------------------------------------------------------- COLMAP
COLMAP_IDS = {"SIMPLE_PINHOLE": 0, "PINHOLE": 1, "SIMPLE_RADIAL": 2, "RADIAL": 3, "OPENCV": 4}


def rotation_to_quaternion(R: np.ndarray) -> np.ndarray:
    """(w, x, y, z) via the trace method (R proper rotation, w > 0 in our cases)."""
    w = math.sqrt(max(0.0, 1 + R[0, 0] + R[1, 1] + R[2, 2])) / 2
    x = math.copysign(math.sqrt(max(0.0, 1 + R[0, 0] - R[1, 1] - R[2, 2])) / 2, R[2, 1] - R[1, 2])
    y = math.copysign(math.sqrt(max(0.0, 1 - R[0, 0] + R[1, 1] - R[2, 2])) / 2, R[0, 2] - R[2, 0])
    z = math.copysign(math.sqrt(max(0.0, 1 - R[0, 0] - R[1, 1] + R[2, 2])) / 2, R[1, 0] - R[0, 1])
    return np.array([w, x, y, z])


def colmap_params(model: str, K: np.ndarray, dist: tuple[float, ...]) -> list[float]:
    # COLMAP principal points use the pixel-corner origin: ours + 0.5
    f, cx, cy = K[0, 0], K[0, 2] + 0.5, K[1, 2] + 0.5
    return {
        "SIMPLE_PINHOLE": [f, cx, cy],
        "PINHOLE": [K[0, 0], K[1, 1], cx, cy],
        "SIMPLE_RADIAL": [f, cx, cy, *dist[:1]],
        "RADIAL": [f, cx, cy, *dist[:2]],
        "OPENCV": [K[0, 0], K[1, 1], cx, cy, *dist[:4]],
    }[model]


def write_colmap(root: str, binary: bool, models=("PINHOLE", "SIMPLE_PINHOLE"), dist=(0.0, 0.0, 0.0, 0.0),
                 sub: str = "sparse/0", points: np.ndarray = POINTS) -> list[tuple]:
    """cameras / images / points3D per COLMAP's documented text and binary layouts."""
    n = 3
    cams = make_cameras(n, seed=9, square_focal=True)
    sparse = os.path.join(root, sub)
    os.makedirs(sparse)
    os.makedirs(os.path.join(root, "images"))
    cam_rows = []
    for i, (K, _, _) in enumerate(cams):
        model = models[i % len(models)]
        cam_rows.append((i + 1, model, colmap_params(model, K, dist)))
    names = [f"frame_{i:03d}.png" for i in range(n)]
    for i, name in enumerate(names):
        write_png(os.path.join(root, "images", name), image_pattern(i))
    # image ids in a different order from names, to check sorting by name
    img_rows = [(10 - i, rotation_to_quaternion(cams[i][1]), cams[i][2], i + 1, names[i]) for i in range(n)]
    pts = [(j + 1, points[j], np.round(COLORS[j % len(COLORS)] * 255).astype(int)) for j in range(len(points))]
    if binary:
        with open(os.path.join(sparse, "cameras.bin"), "wb") as f:
            f.write(struct.pack("<Q", len(cam_rows)))
            for cid, model, params in cam_rows:
                f.write(struct.pack("<iiQQ", cid, COLMAP_IDS[model], W, H))
                f.write(struct.pack("<" + "d" * len(params), *params))
        with open(os.path.join(sparse, "images.bin"), "wb") as f:
            f.write(struct.pack("<Q", len(img_rows)))
            for iid, q, t, cid, name in img_rows:
                f.write(struct.pack("<idddddddi", iid, *q, *t, cid))
                f.write(name.encode() + b"\0")
                f.write(struct.pack("<Q", 2))
                f.write(struct.pack("<ddqddq", 1.0, 2.0, 1, 3.0, 4.0, -1))
        with open(os.path.join(sparse, "points3D.bin"), "wb") as f:
            f.write(struct.pack("<Q", len(pts)))
            for pid, xyz, rgb in pts:
                f.write(struct.pack("<QdddBBBdQ", pid, *xyz, *rgb, 0.5, 2))
                f.write(struct.pack("<iiii", 10, 0, 9, 1))
    else:
        with open(os.path.join(sparse, "cameras.txt"), "w") as f:
            f.write("# Camera list with one line of data per camera:\n")
            for cid, model, params in cam_rows:
                f.write(f"{cid} {model} {W} {H} {' '.join(repr(float(p)) for p in params)}\n")
        with open(os.path.join(sparse, "images.txt"), "w") as f:
            f.write("# IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME\n# POINTS2D[] as (X, Y, POINT3D_ID)\n")
            for k, (iid, q, t, cid, name) in enumerate(img_rows):
                f.write(f"{iid} {' '.join(repr(float(v)) for v in (*q, *t))} {cid} {name}\n")
                f.write("1.0 2.0 1 3.0 4.0 -1\n" if k % 2 == 0 else "\n")
        with open(os.path.join(sparse, "points3D.txt"), "w") as f:
            f.write("# 3D point list\n")
            for pid, xyz, rgb in pts:
                f.write(f"{pid} {' '.join(repr(float(v)) for v in xyz)} {rgb[0]} {rgb[1]} {rgb[2]} 0.5 10 0 9 1\n")
    return cams


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("sub", ["sparse/0", "sparse"])
def test_colmap(tmp_path, binary, sub):
    root = str(tmp_path / "garden")
    cams = write_colmap(root, binary, sub=sub)
    assert detect_format(root) == "colmap"
    scene = load_scene(root)
    assert [v.name for v in scene.views] == ["frame_000", "frame_001", "frame_002"]
    for view, (K, R, t) in zip(scene.views, cams, strict=True):
        assert_projects(view.camera, K, R, t)
    np.testing.assert_allclose(scene.points, POINTS, atol=1e-6)
    np.testing.assert_allclose(scene.colors, np.round(COLORS * 255) / 255, atol=1e-6)
    assert (scene.train, scene.test) == ([1, 2], [0])
    assert load_scene(root, holdout_every=0).test == []


@pytest.mark.parametrize("binary", [True, False])
def test_colmap_points_beyond_float32_named_like_a_ply(tmp_path, binary):
    """COLMAP's float64 points3D go through the PLY reader's finite rule: a coordinate
    finite in the file but beyond float32's range is refused with the count, the first
    point and the reason."""
    root = str(tmp_path / "far")
    points = POINTS.copy()
    points[3, 1] = 1e39
    write_colmap(root, binary, points=points)
    with pytest.raises(DatasetError, match=r"points3D: 1 of 50 vertices have non-finite .*\(1 of them beyond "
                                           r"float32's range\) \(first at vertex 3\)"):
        load_scene(root)


@pytest.mark.parametrize("model", ["SIMPLE_RADIAL", "OPENCV"])
def test_colmap_distortion_refused_or_undistorted(tmp_path, model):
    root = str(tmp_path / "d")
    dist = (0.05, -0.01, 0.002, -0.001)
    cams = write_colmap(root, True, models=(model,), dist=dist)
    with pytest.raises(DatasetError, match=f"{model}.*export: --undistort; training: \\+datasets.options.undistort="
                                           "true; the add-on's Undistort.*prepare-capture.*image_undistorter"):
        load_scene(root)
    scene = load_scene(root, undistort=True)
    # the add-on's shared settings (service.load_dataset): undistort reaches COLMAP
    from npbgpp_core.service import load_dataset

    same = load_dataset(root, undistort=True)
    assert [(v.name, v.distortion) for v in same.views] == [(v.name, v.distortion) for v in scene.views]
    for view, (K, R, t) in zip(scene.views, cams, strict=True):
        assert_projects(view.source_camera, K, R, t)  # the photo's own K, before the lens
        # the undistorted pinhole camera: same pose and principal point, one focal scale
        Kt = view.camera.to_opencv()[0]
        np.testing.assert_allclose(Kt[:2, 2], K[:2, 2], atol=1e-4)
        assert Kt[0, 0] / K[0, 0] == pytest.approx(Kt[1, 1] / K[1, 1], rel=1e-6) and Kt[0, 0] != K[0, 0]
        assert_projects(view.camera, Kt, R, t)
    # Remap check: an undistorted pixel (u, v) samples the source where the lens put it.
    K, Kt = cams[0][0], scene.views[0].camera.to_opencv()[0]
    src = scene.views[0].image_path
    raw = np.asarray(Image.open(src), dtype=np.float64) / 255
    und = scene.load_image(0).numpy().transpose(1, 2, 0)
    v, u = 15, 20
    x, y = (u - Kt[0, 2]) / Kt[0, 0], (v - Kt[1, 2]) / Kt[1, 1]
    k1, k2, p1, p2 = dist if model == "OPENCV" else (dist[0], 0, 0, 0)
    r2 = x * x + y * y
    xd = x * (1 + k1 * r2 + k2 * r2 * r2) + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
    yd = y * (1 + k1 * r2 + k2 * r2 * r2) + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
    us, vs = xd * K[0, 0] + K[0, 2], yd * K[1, 1] + K[1, 2]
    j, i = int(math.floor(us)), int(math.floor(vs))
    a, b = us - j, vs - i
    bilinear = (raw[i, j] * (1 - a) * (1 - b) + raw[i, j + 1] * a * (1 - b)
                + raw[i + 1, j] * (1 - a) * b + raw[i + 1, j + 1] * a * b)
    np.testing.assert_allclose(und[v, u], bilinear, atol=1e-5)


def test_colmap_unsupported_model(tmp_path):
    root = str(tmp_path / "r")
    write_colmap(root, False, models=("RADIAL",), dist=(0.1, 0.01))
    with pytest.raises(DatasetError, match="RADIAL.*not supported"):
        load_scene(root)


# ---------------------------------------------------------------- bad input
def _break(tmp_path, what: str) -> tuple[str, str]:
    """Build a scene and break it; returns (root, text the error must contain)."""
    root = str(tmp_path / "bad")
    if what == "missing_image":
        write_nerf(root)
        os.remove(os.path.join(root, "val", "r_3.png"))
        return root, "r_3"
    if what == "unreadable_image":
        write_nerf(root)
        with open(os.path.join(root, "train", "r_1.png"), "wb") as f:
            f.write(b"not a png")
        return root, "r_1.png"
    if what == "nonfinite_matrix":
        write_nerf(root)
        p = os.path.join(root, "transforms_test.json")
        meta = json.load(open(p))
        meta["frames"][1]["transform_matrix"][0][3] = float("nan")
        json.dump(meta, open(p, "w"))
        return root, "transforms_test.json frames[1]"
    if what == "bad_json":
        write_nerf(root)
        open(os.path.join(root, "transforms_val.json"), "w").write("{")
        return root, "transforms_val.json"
    if what == "count_mismatch":
        write_idr(root, make_cameras(5), [f"{i}.png" for i in range(6)], None)
        save_ply(os.path.join(root, "points3d.ply"), POINTS.astype(np.float32))
        return root, "cameras.npz: 5 cameras but 6 images"
    if what == "mask_count":
        write_idr(root, make_cameras(3), [f"{i}.png" for i in range(3)], ["0.png", "1.png"])
        save_ply(os.path.join(root, "points3d.ply"), POINTS.astype(np.float32))
        return root, "2 masks but 3 images"
    if what == "empty_points":
        write_nerf(root)
        save_ply(os.path.join(root, "points3d.ply"), np.zeros((0, 3), np.float32))
        return root, "points3d.ply: point cloud is empty"
    if what == "no_points":
        write_nerf(root)
        os.remove(os.path.join(root, "points3d.ply"))
        # how to fix it from the command line too ('pass require_points=False' was the API's only)
        return root, "put the scene's cloud there as points3d.ply, or name a .ply with pc_name= (headless_train: " \
            "datasets.pc_name=, export --pc-name; densify --pc-name; add-on: Import Dataset's Point Cloud)"
    if what == "scannet_extrinsics":
        write_scannet(root)
        np.save(os.path.join(root, "extrinsics.npy"), np.zeros((3, 4, 4)))
        return root, "extrinsics.npy: 3 matrices but 4 images"
    if what == "colmap_truncated":
        write_colmap(root, True)
        p = os.path.join(root, "sparse", "0", "images.bin")
        data = open(p, "rb").read()
        open(p, "wb").write(data[:-7])
        return root, "images.bin: file is truncated"
    if what == "colmap_extra_bytes":
        write_colmap(root, True)
        with open(os.path.join(root, "sparse", "0", "cameras.bin"), "ab") as f:
            f.write(b"\0\0")
        return root, "cameras.bin: 2 unexpected trailing bytes"
    if what == "dtu_missing_world_mat":
        write_idr(root, make_cameras(3), [f"{i}.png" for i in range(3)], None)
        d = dict(np.load(os.path.join(root, "cameras.npz")))
        del d["world_mat_1"]
        np.savez(os.path.join(root, "cameras.npz"), **d)
        save_ply(os.path.join(root, "points3d.ply"), POINTS.astype(np.float32))
        return root, "missing [1]"
    if what == "nothing":
        os.makedirs(root)
        return root, "no known dataset layout"
    raise AssertionError(what)


@pytest.mark.parametrize(
    "what",
    ["missing_image", "unreadable_image", "nonfinite_matrix", "bad_json", "count_mismatch", "mask_count",
     "empty_points", "no_points", "scannet_extrinsics", "colmap_truncated", "colmap_extra_bytes",
     "dtu_missing_world_mat", "nothing"],
)
def test_bad_input_names_file_and_problem(tmp_path, what):
    root, text = _break(tmp_path, what)
    with pytest.raises(DatasetError) as info:
        load_scene(root)
    assert text in str(info.value)
    assert isinstance(info.value, ValueError)


def test_wrong_format_and_options(tmp_path):
    root = str(tmp_path / "n")
    write_nerf(root)
    with pytest.raises(DatasetError, match="unknown format 'llff'"):
        load_scene(root, format="llff")
    with pytest.raises(DatasetError, match="image folder not found"):
        load_scene(root, format="dtu")
    with pytest.raises(TypeError, match="white_background"):
        load_scene(root, white_background=True)
    # undistort=True where there is no lens distortion: named, not an unknown-option list, and
    # as the option this function takes (headless_train's datasets.options.undistort reaches it
    # too; the message named densify's --undistort flag)
    with pytest.raises(DatasetError, match=r"undistort=True applies to COLMAP and nerfstudio scenes only; this scene "
                                           "is nerf_synthetic") as refused:
        load_scene(root, undistort=True)
    assert "--undistort" not in str(refused.value)
    # the add-on's shared settings go only to the formats that take them (format_options)
    from npbgpp_core.datasets import format_options
    from npbgpp_core.service import load_dataset

    assert "undistort" not in format_options("nerf_synthetic") and "undistort" in format_options("colmap")
    assert "white_bg" in format_options("nerf_synthetic") and "allow_external_paths" in format_options("colmap")
    assert [v.name for v in load_dataset(root, undistort=True, allow_external_paths=True).views] == [
        v.name for v in load_scene(root).views]
    with pytest.raises(DatasetError, match=r"unknown dataset format 'llff'; choose one of \['nerf_synthetic'"):
        format_options("llff")


def test_photos_without_a_model_point_to_capture_sfm(tmp_path):
    """A folder of photos without a COLMAP model (a capture before SfM) is named as such,
    with the command that recovers the cameras; an empty folder gets no such hint."""
    from PIL import Image

    root = tmp_path / "photos"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (8, 6)).save(root / "images" / "a.jpg")
    with pytest.raises(DatasetError, match="photos in images/ without a COLMAP model.*capture-sfm"):
        load_scene(str(root))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no known dataset layout") as info:
        load_scene(str(tmp_path / "empty"))
    assert "capture-sfm" not in str(info.value) and "--format" in str(info.value)


def test_scannet_refuses_no_pickle_garbage(tmp_path):
    root = str(tmp_path / "s")
    write_scannet(root)
    with open(os.path.join(root, "intrinsics.npy"), "wb") as f:
        np.save(f, np.array([pickle.dumps("x")], dtype=object), allow_pickle=True)
    with pytest.raises(DatasetError, match="intrinsics.npy"):
        load_scene(root)


def test_a_file_or_a_model_folder_given_as_the_scene_names_the_scene_folder(tmp_path):
    """transforms_train.json was 'scene folder not found' (it exists); sparse/0 got the
    generic 'no known dataset layout'."""
    root = str(tmp_path / "garden")
    write_colmap(root, binary=True)
    # a file of a COLMAP model: the scene folder is above the model folder (sparse/0 is no scene folder)
    with pytest.raises(DatasetError, match=r"cameras.bin: is a file, not a scene folder \(the scene folder holding "
                                           r"it is .*garden\)"):
        load_scene(os.path.join(root, "sparse", "0", "cameras.bin"))
    save_ply(os.path.join(root, "points3d.ply"), np.zeros((2, 3), np.float32))
    with pytest.raises(DatasetError, match=r"points3d.ply: is a file, not a scene folder \(the scene folder holding "
                                           r"it is .*garden\)"):
        load_scene(os.path.join(root, "points3d.ply"))
    with pytest.raises(DatasetError, match=r"this is a COLMAP model folder: give the scene folder that holds images/ "
                                           r"and sparse/ \(.*garden\?\)"):
        load_scene(os.path.join(root, "sparse", "0"))
    with pytest.raises(DatasetError, match="scene folder not found"):
        load_scene(os.path.join(root, "nothere"))


@pytest.mark.parametrize("R", [
    [[1e200, 1e200, 0.0], [1e200, -1e200, 0.0], [0.0, 0.0, 1.0]],  # R R^T overflows: inf and inf - inf = nan
    [[1e300, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
    [[float("nan"), 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],  # nan compares False with every tolerance
])
def test_rotation_check_refuses_huge_entries_without_numpy_warnings(R):
    """A pose with entries near the float64 limit printed numpy's 'overflow encountered in
    matmul' before the refusal (the nerfstudio fuzz): the check is quiet, and a nan error
    (where > tol is False) still refuses."""
    import warnings

    from npbgpp_core.datasets.common import check_rotation

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DatasetError, match="cam 0: rotation part is not orthonormal"):
            check_rotation(np.array(R), "cam 0")
    check_rotation(np.eye(3), "cam 0")


def test_camera_matrices_refuse_complex_and_huge_values_quietly():
    """A complex .npy matrix was cast to float64 dropping its imaginary parts (numpy's
    ComplexWarning, then loaded); a projection with entries near the float64 limit or a
    zero one printed numpy's overflow / divide warnings before the refusal (the readers'
    fuzz on DTU / H3DS cameras). Both now refuse by name, without a warning."""
    import warnings

    from npbgpp_core.datasets.common import decompose_projection, finite_matrix

    P = np.hstack([np.diag([500.0, 500.0, 1.0]), np.zeros((3, 1))])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DatasetError, match="world_mat_0: expected a matrix of real numbers, got complex"):
            finite_matrix(P.astype(np.complex128) * 1j, [(3, 4)], "world_mat_0")
        for bad in (P * 1e120, np.zeros((3, 4))):
            with pytest.raises(DatasetError, match="world_mat_0: projection matrix is singular"):
                decompose_projection(bad, "world_mat_0")
        K, R, t = decompose_projection(P, "world_mat_0")  # the hand case still decomposes
    np.testing.assert_allclose(K, np.diag([500.0, 500.0, 1.0]))
    np.testing.assert_allclose(R, np.eye(3), atol=1e-12)


def test_add_on_reads_a_dataset_without_a_cloud_and_only_that(tmp_path):
    """The add-on's Import Dataset (RenderService.read_dataset): a dataset with its cloud
    reads as always; without one, its cameras with no points and the loader's message; a
    cloud that is there but broken is still refused (not read as no cloud)."""
    from npbgpp_core import protocol as P
    from npbgpp_core.service import RenderService

    root = str(tmp_path / "nerf")
    write_nerf(root)
    service = RenderService()
    full = service.read_dataset(P.ReadDataset(root))
    assert full.no_cloud == "" and len(full.points) == len(POINTS) and len(full.views) == 7
    os.remove(os.path.join(root, "points3d.ply"))
    bare = service.read_dataset(P.ReadDataset(root, max_points=5))
    assert bare.points.shape == (0, 3) and len(bare.point_ids) == 0 and bare.colors is None
    assert [v.name for v in bare.views] == [v.name for v in full.views]
    assert "no point cloud found" in bare.no_cloud and root in bare.no_cloud
    with open(os.path.join(root, "points3d.ply"), "wb") as f:
        f.write(b"ply\nformat binary_little_endian 1.0\nelement vertex 5\nproperty float x\nend_header\n")
    with pytest.raises(DatasetError, match="points3d.ply"):
        service.read_dataset(P.ReadDataset(root))


def write_fused_ply(path: str, points: np.ndarray, colors: np.ndarray, coord: str = "f4") -> None:
    """A cloud in the layout of COLMAP's stereo_fusion output (fused.ply): x, y, z (float, or
    double), nx, ny, nz (float), red, green, blue (uchar)."""
    from plyfile import PlyData, PlyElement

    data = np.zeros(len(points), [("x", coord), ("y", coord), ("z", coord), ("nx", "f4"), ("ny", "f4"),
                                  ("nz", "f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    for i, c in enumerate("xyz"):
        data[c] = points[:, i]
    data["nz"] = 1.0
    for i, c in enumerate(("red", "green", "blue")):
        data[c] = np.round(colors[:, i] * 255).astype(np.uint8)
    PlyData([PlyElement.describe(data, "vertex")]).write(path)


@pytest.mark.parametrize("name", ["dense/FUSED.PLY", "dense/fused.Ply"])
def test_colmap_dense_cloud_named_in_upper_case(tmp_path, name):
    """A COLMAP capture (in a folder whose name has a space) with its dense cloud named with
    an upper-case extension, as Windows tools write it: pc_name reads that file, relative or
    absolute, rather than looking for ``FUSED.PLY.ply``; the fused layout's normals are not colours."""
    root = str(tmp_path / "my capture")
    write_colmap(root, binary=True)
    dense = (POINTS[:5] * 2.0).astype(np.float64)
    os.makedirs(os.path.join(root, "dense"))
    write_fused_ply(os.path.join(root, name), dense, COLORS[:5], coord="f8")
    for pc_name in (name, os.path.join(root, name)):
        scene = load_scene(root, pc_name=pc_name)
        np.testing.assert_allclose(scene.points, dense, atol=1e-6)
        np.testing.assert_allclose(scene.colors, np.round(COLORS[:5] * 255) / 255, atol=1e-6)
        assert os.path.samefile(scene.metadata["point_cloud"], os.path.join(root, name))


def test_splat_file_as_the_scene_cloud_keeps_the_splats_the_ply_import_keeps(tmp_path):
    """A 3D Gaussian Splatting result named as a capture's cloud (pc_name; the add-on's Point
    Cloud and Dataset Points, service.with_points) gives the splats with opacity >= 0.1, the
    add-on PLY import's default, not every splat: sigmoid(-2.0) = 0.119 is kept,
    sigmoid(-2.3) = 0.091 and sigmoid(-5) = 0.0067 are not (hand-computed)."""
    from plyfile import PlyData, PlyElement

    from npbgpp_core.ply import SCENE_MIN_OPACITY
    from npbgpp_core.service import with_points

    root = str(tmp_path / "capture")
    write_colmap(root, binary=True)
    logits = np.array([-5.0, -2.0, -2.3, 0.0, 3.0], np.float32)
    names = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", *(f"f_rest_{i}" for i in range(45)),
             "opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    data = np.zeros(5, [(k, "f4") for k in names])
    for i, c in enumerate("xyz"):
        data[c] = POINTS[:5, i]
    data["f_rest_0"] = 7.0  # view-dependent terms: not part of the colour
    data["opacity"] = logits
    data["rot_0"] = 1.0
    os.makedirs(os.path.join(root, "gs"))
    path = os.path.join(root, "gs", "point_cloud.ply")
    PlyData([PlyElement.describe(data, "vertex")]).write(path)
    assert SCENE_MIN_OPACITY == 0.1
    scene = load_scene(root, pc_name="gs/point_cloud.ply")
    np.testing.assert_allclose(scene.points, POINTS[[1, 3, 4]], atol=1e-6)
    np.testing.assert_allclose(scene.colors, 0.5, atol=1e-6)  # f_dc = 0: grey
    replaced = with_points(load_scene(root), path)  # Aggregate of Dataset Points
    np.testing.assert_allclose(replaced.points, scene.points)


def test_gaussian_splatting_output_folder_points_at_its_colmap_source(tmp_path):
    """A 3D Gaussian Splatting output folder (cameras.json, point_cloud/iteration_30000/) is
    no dataset: the refusal says to load the COLMAP folder and name the splat file as its cloud."""
    root = tmp_path / "gs_output"
    (root / "point_cloud" / "iteration_30000").mkdir(parents=True)
    (root / "cameras.json").write_text("[]")
    with pytest.raises(DatasetError, match=r"3D Gaussian Splatting output .*COLMAP folder.*point_cloud.ply"):
        load_scene(str(root))
    (root / "cameras.json").unlink()
    with pytest.raises(DatasetError) as info:
        load_scene(str(root))
    assert "Gaussian" not in str(info.value)


def test_other_clouds_lists_the_clouds_the_loader_did_not_read(tmp_path):
    """A COLMAP folder with COLMAP's dense output and other clouds: other_clouds lists the
    .ply files of the folder, dense/, dense/<n>/ and exports/pcd/ by path with their sizes
    (no corpus points/, no other folder, no folder named .ply), in path order; a cloud the
    loader read (pc_name) is left out; the note names them and how to choose."""
    from npbgpp_core.datasets.other_clouds import other_clouds, other_clouds_note

    root = tmp_path / "garden"
    write_colmap(str(root), binary=True)
    files = {"dense/fused.ply": 1200, "dense/0/fused.ply": 12_345_678, "dense/0/meshed-poisson.PLY": 50,
             "fused.ply": 3000, "sparse_pc.ply": 10, "exports/pcd/point_cloud.ply": 7,
             "points/surface.ply": 5, "other/deep.ply": 5, "dense/0/stereo/x.ply": 5, "notes.txt": 5}
    for rel, size in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"\0" * size)
    (root / "dir.ply").mkdir()
    expected = [("dense/0/fused.ply", 12_345_678), ("dense/0/meshed-poisson.PLY", 50), ("dense/fused.ply", 1200),
                ("exports/pcd/point_cloud.ply", 7), ("fused.ply", 3000), ("sparse_pc.ply", 10)]

    scene = load_scene(str(root))  # the sparse points3D: no .ply read
    assert scene.metadata["point_cloud"].endswith("points3D")
    assert other_clouds(scene.root, scene.metadata["point_cloud"]) == expected
    assert other_clouds(str(root), None) == expected

    save_ply(str(root / "fused.ply"), POINTS, COLORS)  # now a real cloud, read by name
    read = load_scene(str(root), pc_name="fused")
    size = os.path.getsize(root / "fused.ply")
    assert other_clouds(read.root, read.metadata["point_cloud"]) == [e for e in expected if e[0] != "fused.ply"]
    assert ("fused.ply", size) in other_clouds(str(root), str(root / "dense" / "fused.ply"))
    assert ("dense/fused.ply", 1200) not in other_clouds(str(root), str(root / "dense" / ".." / "dense" / "fused.ply"))

    assert other_clouds_note([], "Point Cloud") == ""
    assert other_clouds_note([("dense/0/fused.ply", 12_345_678)], "Point Cloud") == \
        "Also in the folder: dense/0/fused.ply (12.3 MB); choose it with Point Cloud"
    assert other_clouds_note(expected, "--pc-name") == (
        "Also in the folder: dense/0/fused.ply (12.3 MB), dense/0/meshed-poisson.PLY (50 B), dense/fused.ply (1 kB), "
        "exports/pcd/point_cloud.ply (7 B), 2 more .ply; choose one with --pc-name")
    assert other_clouds(str(tmp_path / "gone"), None) == [] and other_clouds("", None) == []


def _own_cloud_unread(monkeypatch, root: str, **options) -> str | None:
    """``own_cloud_file`` with every cloud reader failing: it finds the file without reading it."""
    import npbgpp_core.ply as ply
    from npbgpp_core.datasets import colmap, own_cloud_file

    def unread(*args, **kwargs):
        raise AssertionError("a cloud was read")

    with monkeypatch.context() as patch:
        for module, name in ((ply, "load_scene_cloud"), (ply, "load_ply"), (colmap, "_read_points_bin"),
                             (colmap, "_read_points_txt")):
            patch.setattr(module, name, unread)
        return own_cloud_file(root, **options)


def test_own_cloud_file_is_the_cloud_each_loader_reads_unchosen_found_without_reading_it(tmp_path, monkeypatch):
    """Densify's check that its output is not the format's own cloud (when another is chosen)
    asks for that cloud's file without loading the dataset again: the file load_scene reads
    with no pc_name (its metadata, with require_points=False), by each format's default
    names, else the only .ply, else none (several .ply: the loader cannot tell, so None);
    COLMAP's points3D file (.bin or .txt) where the loader reads the model's points."""
    cams = make_cameras(4, seed=4)
    scenes = {"nerf_synthetic": str(tmp_path / "lego"), "dtu": str(tmp_path / "scan1"),
              "h3ds": str(tmp_path / "h3ds_scene"), "scannet": str(tmp_path / "scene0000_00")}
    write_nerf(scenes["nerf_synthetic"])
    write_idr(scenes["dtu"], make_cameras(49, seed=2), [f"{i:06d}.png" for i in range(49)], None)
    write_idr(scenes["h3ds"], cams, [f"img_{i:04d}.jpg" for i in range(4)], [f"mask_{i:04d}.png" for i in range(4)])
    write_scannet(scenes["scannet"])
    defaults = {"nerf_synthetic": "points3d.ply", "dtu": "pointcloud.ply", "h3ds": "full.ply", "scannet": "full.ply"}
    for fmt, root in scenes.items():
        for name in os.listdir(root):
            if name.endswith(".ply"):
                os.remove(os.path.join(root, name))
        assert detect_format(root) == fmt
        cases = []
        for kept, extra in ((defaults[fmt], "mine.ply"), ("mine.ply", None), ("mine.ply", "other.ply"), (None, None)):
            for name in os.listdir(root):
                if name.endswith(".ply"):
                    os.remove(os.path.join(root, name))
            for name in (kept, extra):
                if name:
                    save_ply(os.path.join(root, name), POINTS.astype(np.float32))
            want = load_scene(root, require_points=False).metadata["point_cloud"]
            cases.append(None if want is None else os.path.basename(want))
            assert _own_cloud_unread(monkeypatch, root) == want, (fmt, kept, extra)
            assert _own_cloud_unread(monkeypatch, root, pc_name="mine") == want, (fmt, kept, extra)
        # the default name beats another cloud; the only .ply is read; several or none: none
        assert cases == [defaults[fmt], "mine.ply", None, None], fmt
    for binary in (True, False):
        root = str(tmp_path / f"garden_{binary}")
        write_colmap(root, binary)
        save_ply(os.path.join(root, "fused.ply"), POINTS.astype(np.float32))  # not the model's own cloud
        scene = load_scene(root)
        assert scene.metadata["point_cloud"] == os.path.join(scene.metadata["sparse"], "points3D")
        own = _own_cloud_unread(monkeypatch, root, format="colmap")
        assert own == os.path.join(scene.metadata["sparse"], "points3D.bin" if binary else "points3D.txt")
        os.remove(own)
        assert load_scene(root, require_points=False).metadata["point_cloud"] is None
        assert _own_cloud_unread(monkeypatch, root) is None
