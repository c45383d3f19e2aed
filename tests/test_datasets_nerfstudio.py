"""nerfstudio / instant-ngp ``transforms.json`` scenes. The same random cameras are written
as a COLMAP model (binary, the capture writers) and as transforms.json (OpenCV w2c turned
into an OpenGL c2w by hand below); both loaders must give the same cameras, and those
cameras must put known 3D points on the pixels numpy computes from the written numbers
(COLMAP pixel convention: pixel (u, v) has its centre at (u + 0.5, v + 0.5))."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from npbgpp_core.datasets import DatasetError, detect_format, load_scene
from npbgpp_core.datasets.capture import _write_cameras_bin, _write_images_bin, _write_points_bin
from npbgpp_core.datasets.colmap import rotation_to_quaternion
from npbgpp_core.ply import save_ply

H, W = 30, 40
N_VIEWS = 10
RNG_POINTS = np.random.default_rng(11)
POINTS = RNG_POINTS.uniform(-0.5, 0.5, size=(40, 3))
COLORS = RNG_POINTS.uniform(0, 1, size=(40, 3))


def random_cameras(n: int = N_VIEWS, seed: int = 5) -> list[dict]:
    """Cameras around the origin with random roll and intrinsics; K in COLMAP's convention
    (``cx``, ``cy`` measured from the image corner), pose as OpenCV world-to-camera R, t."""
    rng = np.random.default_rng(seed)
    cams = []
    for i in range(n):
        eye = rng.normal(size=3)
        eye = eye / np.linalg.norm(eye) * rng.uniform(3.5, 4.5)
        z = -eye / np.linalg.norm(eye)
        x = np.cross(z, rng.normal(size=3))
        x /= np.linalg.norm(x)
        R = np.stack([x, np.cross(z, x), z])
        fx = rng.uniform(30, 40)
        cams.append({"name": f"frame_{i:05d}.png", "R": R, "t": -R @ eye, "fx": fx, "fy": fx * rng.uniform(0.95, 1.05),
                     "cx": W / 2 + rng.uniform(-2, 2), "cy": H / 2 + rng.uniform(-2, 2)})
    return cams


def opengl_c2w(R: np.ndarray, t: np.ndarray) -> list[list[float]]:
    """OpenCV world-to-camera (x right, y down, z forward) -> camera-to-world with OpenGL
    axes (x right, y up, z backward): invert, then flip the camera's y and z columns."""
    c2w = np.eye(4)
    c2w[:3, :3] = R.T
    c2w[:3, 3] = -R.T @ t
    c2w[:3, 1] *= -1.0
    c2w[:3, 2] *= -1.0
    return c2w.tolist()


def colmap_pixels(cam: dict, points: np.ndarray) -> np.ndarray:
    """Pixel indices (u, v) of ``points``: COLMAP coordinates minus the half-pixel."""
    pc = points @ cam["R"].T + cam["t"]
    u = cam["fx"] * pc[:, 0] / pc[:, 2] + cam["cx"] - 0.5
    v = cam["fy"] * pc[:, 1] / pc[:, 2] + cam["cy"] - 0.5
    return np.stack([u, v], axis=1)


def point_on_pixel(cam: dict, u: int, v: int, depth: float) -> np.ndarray:
    """The world point at ``depth`` seen at the centre of pixel (u, v)."""
    x = (u + 0.5 - cam["cx"]) / cam["fx"] * depth
    y = (v + 0.5 - cam["cy"]) / cam["fy"] * depth
    return cam["R"].T @ (np.array([x, y, depth]) - cam["t"])


def write_images(root: str, cams: list[dict], folder: str = "images", size: tuple[int, int] = (H, W)) -> None:
    os.makedirs(os.path.join(root, folder), exist_ok=True)
    for i, cam in enumerate(cams):
        img = np.random.default_rng(50 + i).integers(0, 100, size=(*size, 3), dtype=np.uint8)
        Image.fromarray(img).save(os.path.join(root, folder, cam["name"]))


def write_colmap_bin(root: str, cams: list[dict]) -> None:
    sparse = os.path.join(root, "sparse", "0")
    os.makedirs(sparse)
    _write_cameras_bin(os.path.join(sparse, "cameras.bin"),
                       [(i + 1, W, H, (c["fx"], c["fy"], c["cx"], c["cy"])) for i, c in enumerate(cams)])
    _write_images_bin(os.path.join(sparse, "images.bin"),
                      [(i + 1, rotation_to_quaternion(c["R"]), c["t"], i + 1, c["name"]) for i, c in enumerate(cams)])
    _write_points_bin(os.path.join(sparse, "points3D.bin"), POINTS, COLORS)


def write_transforms(root: str, cams: list[dict], order: list[int] | None = None, ply: bool = True,
                     **top) -> dict:
    """nerfstudio's layout: per-frame intrinsics, frames in ``order``, sparse_pc.ply."""
    frames = []
    for i in order if order is not None else range(len(cams)):
        c = cams[i]
        frames.append({"file_path": f"images/{c['name']}", "transform_matrix": opengl_c2w(c["R"], c["t"]),
                       "fl_x": c["fx"], "fl_y": c["fy"], "cx": c["cx"], "cy": c["cy"], "w": W, "h": H})
    meta = {"camera_model": "OPENCV", "frames": frames, **top}
    if ply:
        save_ply(os.path.join(root, "sparse_pc.ply"), POINTS.astype(np.float32), COLORS)
        meta["ply_file_path"] = "sparse_pc.ply"
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "transforms.json"), "w") as f:
        json.dump(meta, f)
    return meta


def rewrite(root: str, change) -> None:
    path = os.path.join(root, "transforms.json")
    with open(path) as f:
        meta = json.load(f)
    change(meta)
    with open(path, "w") as f:
        json.dump(meta, f)


@pytest.fixture
def capture(tmp_path) -> tuple[str, list[dict]]:
    root = str(tmp_path / "capture")
    cams = random_cameras()
    write_images(root, cams)
    write_transforms(root, cams, order=list(np.random.default_rng(1).permutation(len(cams))))
    return root, cams


def test_same_cameras_as_colmap_and_the_written_pixels(tmp_path, capture):
    root, cams = capture
    assert detect_format(root) == "nerfstudio"
    ns = load_scene(root)
    assert ns.format == "nerfstudio"
    # frames were written shuffled: views come sorted by image path, as COLMAP's by name
    assert [v.name for v in ns.views] == [f"images/frame_{i:05d}" for i in range(N_VIEWS)]
    write_colmap_bin(root, cams)
    with pytest.raises(DatasetError, match="both a COLMAP model.*transforms.json.*format='colmap'.*format='nerfst"):
        detect_format(root)
    col = load_scene(root, format="colmap")
    assert load_scene(root, format="nerfstudio").format == "nerfstudio"
    for v_ns, v_col, cam in zip(ns.views, col.views, cams, strict=True):
        K1, R1, t1 = v_ns.camera.to_opencv()
        K2, R2, t2 = v_col.camera.to_opencv()
        np.testing.assert_allclose(K1, K2, atol=1e-4)
        np.testing.assert_allclose(R1, R2, atol=1e-5)
        np.testing.assert_allclose(t1, t2, atol=1e-4)
        assert v_ns.camera.image_size == v_col.camera.image_size == (H, W)
        uv, depth = v_ns.camera.project(torch.as_tensor(POINTS))
        assert (depth > 0).all()
        np.testing.assert_allclose(uv.double().numpy(), colmap_pixels(cam, POINTS), atol=1e-3)
    np.testing.assert_allclose(ns.points, POINTS, atol=1e-6)  # sparse_pc.ply, the file's own frame
    np.testing.assert_allclose(ns.colors, COLORS, atol=0.51 / 255)  # stored as 8-bit
    assert ns.metadata["point_cloud"].endswith("sparse_pc.ply")
    assert ns.background is None and all(not v.mask_from_alpha and v.distortion is None for v in ns.views)


def test_a_known_point_lands_on_its_drawn_pixel(tmp_path):
    root = str(tmp_path / "dot")
    cams = random_cameras(3, seed=8)
    write_images(root, cams)
    write_transforms(root, cams)
    rng = np.random.default_rng(2)
    targets = []
    for cam in cams:
        u, v = int(rng.integers(3, W - 3)), int(rng.integers(3, H - 3))
        path = os.path.join(root, "images", cam["name"])
        img = np.array(Image.open(path))
        img[v, u] = 255
        Image.fromarray(img).save(path)
        targets.append((u, v, point_on_pixel(cam, u, v, rng.uniform(3.0, 4.0))))
    scene = load_scene(root)
    for i, (u, v, X) in enumerate(targets):
        uv, _ = scene.views[i].camera.project(torch.as_tensor(X[None]))
        np.testing.assert_allclose(uv[0].double().numpy(), [u, v], atol=1e-3)
        img = scene.load_image(i)
        col, row = (int(round(float(c))) for c in uv[0])
        assert torch.all(img[:, row, col] == 1.0)
        assert float(img.amax(dim=0).flatten().topk(2).values[1]) < 0.5  # the only bright pixel


def test_holdout_and_explicit_split_lists(capture):
    root, _ = capture
    s = load_scene(root)
    assert s.test == [0, 8] and s.val == [] and s.train == [1, 2, 3, 4, 5, 6, 7, 9]
    assert s.metadata["split"] == "holdout"
    s = load_scene(root, holdout_every=3)
    assert s.test == [0, 3, 6, 9]
    assert load_scene(root, holdout_every=0).train == list(range(N_VIEWS))
    rewrite(root, lambda m: m.update(train_filenames=[f"images/frame_{i:05d}.png" for i in (7, 1, 2)],
                                     val_filenames=["./images/frame_00004.png"],
                                     test_filenames=["images/frame_00009", "images/frame_00000.png"]))
    s = load_scene(root)
    assert (s.train, s.val, s.test) == ([1, 2, 7], [4], [0, 9])
    assert s.metadata["split"] == "filenames"
    s = load_scene(root, test_indices=[5])  # the options win
    assert s.test == [5] and s.train == [1, 2, 7]
    rewrite(root, lambda m: m.pop("train_filenames"))
    s = load_scene(root)  # train: everything not listed elsewhere
    assert (s.train, s.val, s.test) == ([1, 2, 3, 5, 6, 7, 8], [4], [0, 9])
    rewrite(root, lambda m: m.update(val_filenames=["images/nope.png"]))
    with pytest.raises(DatasetError, match=r"transforms.json val_filenames: 1 name\(s\) match no frame.*nope.png"):
        load_scene(root)


def test_instant_ngp_file_loads_in_its_own_frame(tmp_path):
    """colmap2nerf's keys: shared intrinsics at the top level, aabb_scale / scale / offset
    (instant-ngp's own load-time transform, not applied), sharpness per frame, ./ paths."""
    root = str(tmp_path / "ngp")
    cams = random_cameras(4, seed=3)
    for c in cams[1:]:
        c.update(fx=cams[0]["fx"], fy=cams[0]["fy"], cx=cams[0]["cx"], cy=cams[0]["cy"])
    write_images(root, cams)
    c0 = cams[0]
    meta = {"camera_angle_x": 2 * math.atan(W / (2 * c0["fx"])), "fl_x": c0["fx"], "fl_y": c0["fy"], "cx": c0["cx"],
            "cy": c0["cy"], "w": W, "h": H, "k1": 0.0, "k2": 0.0, "p1": 0.0, "p2": 0.0, "aabb_scale": 16,
            "scale": 0.33, "offset": [0.5, 0.5, 0.5],
            "frames": [{"file_path": f"./images/{c['name']}", "sharpness": 50.0,
                        "transform_matrix": opengl_c2w(c["R"], c["t"])} for c in cams]}
    with open(os.path.join(root, "transforms.json"), "w") as f:
        json.dump(meta, f)
    with pytest.raises(DatasetError, match="no ply_file_path and no point cloud.*instant-ngp writes none.*same world "
                                           "frame.*pc_name="):
        load_scene(root)
    assert load_scene(root, require_points=False).points.shape == (0, 3)
    save_ply(os.path.join(root, "mine.ply"), POINTS.astype(np.float32), COLORS)
    # a lone .ply of another name may be in another frame (instant-ngp's mesh export): named, not read
    with pytest.raises(DatasetError, match=r"no cloud of a default name .*\['mine.ply'\] is not read unnamed.*"
                                           r"choose it with pc_name=.*Point Cloud"):
        load_scene(root)
    assert load_scene(root, require_points=False).points.shape == (0, 3)
    scene = load_scene(root, pc_name="mine.ply")
    assert scene.metadata["point_cloud"].endswith("mine.ply")
    assert scene.metadata["applied_transform"] is None and scene.metadata["applied_scale"] == 1.0
    for view, cam in zip(scene.views, cams, strict=True):
        uv, _ = view.camera.project(torch.as_tensor(POINTS))
        np.testing.assert_allclose(uv.double().numpy(), colmap_pixels(cam, POINTS), atol=1e-3)


def test_point_cloud_choice(capture):
    root, _ = capture
    other = POINTS[:5] + 1.0
    save_ply(os.path.join(root, "dense.ply"), other.astype(np.float32))
    np.testing.assert_allclose(load_scene(root).points, POINTS, atol=1e-6)  # ply_file_path wins over others
    np.testing.assert_allclose(load_scene(root, pc_name="dense").points, other, atol=1e-6)
    os.remove(os.path.join(root, "sparse_pc.ply"))
    with pytest.raises(DatasetError, match=r"transforms.json ply_file_path: .*sparse_pc.ply not found.*pc_name="):
        load_scene(root)
    # without require_points (densify needs only the cameras), a missing cloud is none, as for a
    # COLMAP model without points3D; the other .ply in the folder is not taken in its place
    scene = load_scene(root, require_points=False)
    assert scene.points.shape == (0, 3) and scene.metadata["point_cloud"] is None and len(scene.views) == N_VIEWS


def test_without_ply_file_path_dense_ply_is_found_beside_other_clouds(capture):
    """The no-cloud error tells an instant-ngp user to write dense.ply; with another .ply in
    the folder (an exported mesh) that file was not found and the error asked for it again.
    dense.ply is now a default name; several other clouds are named as such."""
    root, _ = capture
    rewrite(root, lambda meta: meta.pop("ply_file_path"))
    os.remove(os.path.join(root, "sparse_pc.ply"))
    other = POINTS[:5] + 1.0
    save_ply(os.path.join(root, "mesh.ply"), POINTS[:7].astype(np.float32))
    save_ply(os.path.join(root, "dense.ply"), other.astype(np.float32))
    scene = load_scene(root)
    assert scene.metadata["point_cloud"] == os.path.join(root, "dense.ply")
    np.testing.assert_allclose(scene.points, other, atol=1e-6)
    os.rename(os.path.join(root, "dense.ply"), os.path.join(root, "other.ply"))
    with pytest.raises(DatasetError, match=r"no cloud of a default name .*\['mesh.ply', 'other.ply'\] are not "
                                           r"read unnamed.*choose it with pc_name="):
        load_scene(root)


def test_ns_export_point_cloud_is_not_a_default_cloud(capture):
    """``ns-export pointcloud`` writes point_cloud.ply in the trainer's auto-oriented, scaled
    frame (without --save-world-frame); as a default name it was read as the scene's cloud and
    rendered as noise with no error. It is named in the refusal and read when chosen."""
    root, _ = capture
    rewrite(root, lambda meta: meta.pop("ply_file_path"))
    os.remove(os.path.join(root, "sparse_pc.ply"))
    trainer_frame = (POINTS - POINTS.mean(0)) * 0.3  # nerfstudio's centring and scaling
    save_ply(os.path.join(root, "point_cloud.ply"), trainer_frame.astype(np.float32))
    with pytest.raises(DatasetError, match=r"\['point_cloud.ply'\] is not read unnamed.*point_cloud.ply is the name "
                                           r"ns-export pointcloud writes.*--save-world-frame.*pc_name="):
        load_scene(root)
    scene = load_scene(root, pc_name="point_cloud.ply")
    np.testing.assert_allclose(scene.points, trainer_frame, atol=1e-6)
    # NeRF-Synthetic folders keep it as a default name
    from npbgpp_core.datasets import nerf_synthetic

    assert "point_cloud.ply" in nerf_synthetic.DEFAULT_PC_NAMES


def test_masks_and_downscaled_copies(tmp_path):
    root = str(tmp_path / "masked")
    cams = random_cameras(3, seed=4)
    write_images(root, cams)
    write_images(root, cams, "images_2", (H // 2, W // 2))
    meta = write_transforms(root, cams)
    for i, c in enumerate(cams):
        for folder, (h, w) in (("masks", (H, W)), ("masks_2", (H // 2, W // 2))):
            m = np.zeros((h, w), np.uint8)
            m[2 + i: h - 2, 3: w - 3] = 255
            os.makedirs(os.path.join(root, folder), exist_ok=True)
            Image.fromarray(m).save(os.path.join(root, folder, c["name"]))
        meta["frames"][i]["mask_path"] = f"masks/{c['name']}"
    with open(os.path.join(root, "transforms.json"), "w") as f:
        json.dump(meta, f)
    scene = load_scene(root)
    for i, c in enumerate(cams):
        want = np.asarray(Image.open(os.path.join(root, "masks", c["name"])), np.float32) / 255.0
        np.testing.assert_array_equal(scene.load_mask(i)[0].numpy(), want)
    assert load_scene(root, use_masks=False).load_mask(0) is None
    half = load_scene(root, downscale=2)
    assert half.views[0].image_path.endswith(os.path.join("images_2", cams[0]["name"]))
    assert half.views[0].mask_path.endswith(os.path.join("masks_2", cams[0]["name"]))
    for view, full in zip(half.views, scene.views, strict=True):
        assert view.camera.image_size == (H // 2, W // 2)
        np.testing.assert_allclose(view.camera.K.numpy(), full.camera.scaled((H // 2, W // 2)).K.numpy(), atol=1e-5)
    # a mask of another size than its image
    Image.fromarray(np.zeros((H, W + 1), np.uint8)).save(os.path.join(root, "masks", cams[1]["name"]))
    with pytest.raises(DatasetError, match=rf"masks/{cams[1]['name']}: mask is {W + 1}x{H} but its image"):
        load_scene(root)


def test_undistort_matches_the_colmap_path(tmp_path):
    """OPENCV k1, k2, p1, p2: refused without undistort=True; with it the images are
    remapped exactly as the COLMAP loader remaps the same OPENCV camera."""
    root = str(tmp_path / "lens")
    cams = random_cameras(2, seed=6)
    write_images(root, cams)
    dist = {"k1": 0.08, "k2": -0.02, "p1": 0.003, "p2": -0.002}
    write_transforms(root, cams, **dist)
    with pytest.raises(DatasetError, match=r"frames\[0\]: lens distortion k1/k2/p1/p2 = \[0.08, -0.02, 0.003, -0.002\]"
                                           ".*undistort=True"):
        load_scene(root)
    ns = load_scene(root, undistort=True)
    assert ns.views[0].distortion is not None
    assert (ns.views[0].distortion.k1, ns.views[0].distortion.p2) == (0.08, -0.002)
    sparse = os.path.join(root, "sparse", "0")
    os.makedirs(sparse)
    with open(os.path.join(sparse, "cameras.txt"), "w") as f:
        for i, c in enumerate(cams):
            f.write(f"{i + 1} OPENCV {W} {H} {c['fx']!r} {c['fy']!r} {c['cx']!r} {c['cy']!r} 0.08 -0.02 0.003 -0.002\n")
    with open(os.path.join(sparse, "images.txt"), "w") as f:
        for i, c in enumerate(cams):
            q = rotation_to_quaternion(c["R"])
            f.write(f"{i + 1} {' '.join(repr(float(x)) for x in (*q, *c['t']))} {i + 1} {c['name']}\n\n")
    col = load_scene(root, format="colmap", undistort=True, require_points=False)
    for i in range(2):
        ref = col.load_image(i)
        assert not torch.equal(ref, col.load_image(i) * 0)  # something to compare
        torch.testing.assert_close(ns.load_image(i), ref, atol=1e-6, rtol=0)
        # to the same undistorted camera, which is not the photo's K (no blank borders)
        assert torch.equal(ns.views[i].camera.K, col.views[i].camera.K)
        assert not torch.equal(ns.views[i].camera.K, ns.views[i].source_camera.K)


@pytest.mark.parametrize(("change", "message"), [
    (lambda m: m.update(camera_model="OPENCV_FISHEYE"), r"camera_model: 'OPENCV_FISHEYE' is not supported"),
    (lambda m: m["frames"][2].update(camera_model="EQUIRECTANGULAR"),
     r"frames\[2\] camera_model: 'EQUIRECTANGULAR' is not supported"),
    (lambda m: m.update(is_fisheye=True), r"is_fisheye: fisheye cameras are not supported"),
    (lambda m: m.update(k3=0.01), r"distortion \{'k3': 0.01\} is not supported"),
    (lambda m: m.update(k1=0.1, camera_model="PINHOLE"), r"camera_model PINHOLE but distortion"),
])
def test_unsupported_lenses_are_refused(capture, change, message):
    root, _ = capture
    rewrite(root, change)
    with pytest.raises(DatasetError, match=message) as info:
        load_scene(root, undistort=True)
    assert "transforms.json" in str(info.value)


def _scaled(m: dict) -> None:
    m["frames"][1]["transform_matrix"][0][0] *= 1.5


def _projective(m: dict) -> None:
    m["frames"][1]["transform_matrix"][3] = [0.0, 0.0, 0.1, 1.0]


def _nan(m: dict) -> None:
    m["frames"][1]["transform_matrix"][1][3] = float("nan")


@pytest.mark.parametrize(("change", "message"), [
    (lambda m: m.pop("frames"), r"transforms.json: no 'frames' list"),
    (lambda m: m.update(frames=[]), r"transforms.json frames: the list is empty"),
    (lambda m: m["frames"][1].pop("transform_matrix"), r"frames\[1\]: no 'transform_matrix'"),
    (lambda m: m["frames"][1].pop("file_path"), r"frames\[1\]: no 'file_path'"),
    (_scaled, r"frames\[1\] transform_matrix: rotation part is not orthonormal"),
    (_projective, r"frames\[1\] transform_matrix: last row is .*not a rigid transform"),
    (_nan, r"frames\[1\] transform_matrix: matrix has non-finite values"),
    (lambda m: m["frames"][1].update(transform_matrix=[[1, 0], [0, 1]]), r"frames\[1\] transform_matrix: expected"),
    (lambda m: m["frames"][1].update(file_path="images/missing.png"), r"frames\[1\]: image for file_path .*missing"),
    (lambda m: m["frames"][1].update(w=W + 2), rf"frames\[1\]: w={W + 2} but the image is {W}x{H}"),
    (lambda m: m["frames"][1].update(h="30"), r"frames\[1\] h: expected a number, got str"),
    (lambda m: [f.pop("fl_x") for f in m["frames"]], r"frames\[0\]: neither camera_angle_x nor fl_x given"),
    (lambda m: m["frames"][1].update(fl_y=-3.0), r"frames\[1\]: bad intrinsics"),
    (lambda m: m["frames"][1].update(mask_path="masks/none.png"), r"masks/none.png: image file not found"),
    (lambda m: m["frames"][1].update(file_path="../outside.png"), r"frames\[1\] file_path: path '../outside.png' "
                                                                   "points outside the scene folder"),
    (lambda m: m.update(ply_file_path=3), r"ply_file_path: expected a file path string"),
    (lambda m: m["frames"].append(m["frames"][0]), r"frames: image .* is listed twice"),
])
def test_bad_input_names_file_and_field(capture, change, message):
    root, _ = capture
    rewrite(root, change)
    with pytest.raises(DatasetError, match=message) as info:
        load_scene(root)
    assert os.path.join(root, "") in str(info.value) or "transforms.json" in str(info.value)


@pytest.mark.parametrize(("content", "message"), [
    (None, r"transforms.json: file not found"),
    ("{not json", r"transforms.json: not readable JSON"),
    ("[1, 2]", r"transforms.json: expected a JSON object with a 'frames' list, got list"),
    (b"\xff\xfe{", r"transforms.json: not readable JSON"),
])
def test_missing_or_unreadable_json(tmp_path, content, message):
    root = tmp_path / "broken"
    root.mkdir()
    if isinstance(content, str):
        (root / "transforms.json").write_text(content)
    elif content is not None:
        (root / "transforms.json").write_bytes(content)
    with pytest.raises(DatasetError, match=message):
        load_scene(str(root), format="nerfstudio")
    if content is not None:
        assert detect_format(str(root)) == "nerfstudio"  # detected by the file, then refused by name


@pytest.mark.parametrize(("fmt", "file"), [("nerfstudio", "transforms.json"),
                                          ("nerf_synthetic", "transforms_train.json")])
def test_json_nested_too_deep_for_the_parser(tmp_path, fmt, file):
    """Both transforms formats read through one reader: nesting beyond Python's recursion
    limit is a DatasetError naming the file (nerf_synthetic raised RecursionError)."""
    (tmp_path / file).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DatasetError, match=rf"{file}: not readable JSON \(RecursionError"):
        load_scene(str(tmp_path), format=fmt)


def test_detect_with_nerfstudios_own_colmap_folder(capture):
    """ns-process-data keeps its COLMAP run in colmap/sparse/0: not a COLMAP scene root."""
    root, cams = capture
    write_colmap_bin(os.path.join(root, "colmap"), cams)
    assert detect_format(root) == "nerfstudio"


def test_downscale_option_checks(capture):
    root, _ = capture
    with pytest.raises(DatasetError, match="downscale=0 must be a whole number"):
        load_scene(root, downscale=0)
    with pytest.raises(DatasetError, match=r"images_2/frame_\d+.png: image file not found|image for file_path"):
        load_scene(root, downscale=2)


def test_headless_train_dataset_config(tmp_path):
    """``datasets=nerfstudio_one_scene`` reads a transforms.json scene (with the loader's options)."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from headless_train.data import load_scenes

    cams = random_cameras(3, seed=9)
    root = tmp_path / "data" / "kitchen"
    write_images(str(root), cams)
    write_transforms(str(root), cams, k1=0.05)
    with initialize_config_module("headless_train.conf", version_base="1.3"):
        cfg = compose("config", overrides=["datasets=nerfstudio_one_scene", f"datasets.data_root={tmp_path / 'data'}",
                                           "datasets.scene_name=kitchen", "+datasets.options.undistort=true"])
    dcfg = OmegaConf.to_container(cfg.datasets, resolve=True)
    assert dcfg["format"] == "nerfstudio"
    (scene,) = load_scenes(dcfg, None)
    assert scene.format == "nerfstudio" and scene.name == "kitchen" and len(scene.views) == 3
    assert scene.views[0].distortion is not None and scene.points.shape == POINTS.shape


# nerfstudio's colmap_to_json re-orients the world after turning the poses to OpenGL axes:
# rows x and y swapped, z negated (recorded in transforms.json as applied_transform), and
# writes sparse_pc.ply with the same map applied to the COLMAP points.
NS_APPLIED = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])


def test_converted_capture_matches_its_colmap_model(tmp_path):
    """One capture as a COLMAP model and as nerfstudio's conversion of it (re-oriented world,
    shuffled frames, sparse_pc.ply): the same views in the same order, the same held-out
    views at every downscale, cameras and points one known rotation apart, and identical
    point renders. The names sort differently with and without their extension
    ('a-b.png' < 'a.png' but 'a' < 'a-b'): the order must be COLMAP's."""
    from npbgpp_core.rasterizer import rasterize

    names = ["a-b.png", "a.png", "Z9.png", "frame_10.png", "frame_9.png", "b.png", "a_b.png", "0.png", "c.png",
             "d.png"]
    cams = random_cameras(len(names), seed=12)
    c0 = cams[0]
    for cam, name in zip(cams, names, strict=True):  # one shared camera: colmap_to_json writes one
        cam.update(name=name, fx=c0["fx"], fy=c0["fy"], cx=c0["cx"], cy=c0["cy"])
    col_root, ns_root = str(tmp_path / "colmap"), str(tmp_path / "ns")
    write_images(col_root, cams)
    write_colmap_bin(col_root, cams)
    write_images(ns_root, cams)
    write_images(ns_root, cams, "images_2", (H // 2, W // 2))
    frames = []
    for i in np.random.default_rng(3).permutation(len(cams)):
        c = cams[i]
        c2w = np.asarray(opengl_c2w(c["R"], c["t"]))
        c2w[:3] = NS_APPLIED @ c2w[:3]
        frames.append({"file_path": f"images/{c['name']}", "transform_matrix": c2w.tolist()})
    meta = {  # COLMAP's fx, fy, cx, cy copied through unchanged
        "camera_model": "OPENCV", "fl_x": c0["fx"], "fl_y": c0["fy"], "cx": c0["cx"], "cy": c0["cy"], "w": W, "h": H,
        "k1": 0.0, "k2": 0.0, "p1": 0.0, "p2": 0.0, "frames": frames, "ply_file_path": "sparse_pc.ply",
        "applied_transform": np.hstack([NS_APPLIED, np.zeros((3, 1))]).tolist()}
    with open(os.path.join(ns_root, "transforms.json"), "w") as f:
        json.dump(meta, f)
    save_ply(os.path.join(ns_root, "sparse_pc.ply"), (POINTS @ NS_APPLIED.T).astype(np.float32), COLORS)

    col, ns, half = load_scene(col_root), load_scene(ns_root), load_scene(ns_root, downscale=2)
    order = sorted(names)
    assert [v.name for v in col.views] == [os.path.splitext(n)[0] for n in order]
    assert [v.name for v in ns.views] == [v.name for v in half.views] == [f"images/{os.path.splitext(n)[0]}"
                                                                         for n in order]
    assert (ns.train, ns.val, ns.test) == (half.train, half.val, half.test) == (col.train, col.val, col.test)
    assert col.test == [0, 8]
    np.testing.assert_allclose(ns.points, POINTS @ NS_APPLIED.T, atol=1e-6)
    drawn = 0
    for v_col, v_ns in zip(col.views, ns.views, strict=True):
        K1, R1, t1 = v_col.camera.to_opencv()
        K2, R2, t2 = v_ns.camera.to_opencv()
        np.testing.assert_allclose(K2, K1, atol=1e-4)
        np.testing.assert_allclose(R2 @ NS_APPLIED, R1, atol=1e-6)  # w2c_ns(A x) = w2c_col(x)
        np.testing.assert_allclose(t2, t1, atol=1e-5)
        index_col = rasterize(torch.as_tensor(col.points), v_col.camera, scales=(1.0,))[0]
        index_ns = rasterize(torch.as_tensor(ns.points), v_ns.camera, scales=(1.0,))[0]
        assert torch.equal(index_col, index_ns)
        drawn += int((index_col >= 0).sum())
    assert drawn >= len(names) * 20  # most points land in most views


def test_half_size_photos_colmap_and_images_2_agree_with_hand_pixels(tmp_path):
    """Photos at half the model's size: the COLMAP loader (resized images/) and nerfstudio's
    images_2/ copies give one camera, and a point lands where the full-size pixel centre
    maps by hand: u_half + 0.5 = (u_full + 0.5) / 2."""
    cams = random_cameras(3, seed=21)
    root = str(tmp_path / "half")
    write_images(root, cams, "images", (H // 2, W // 2))
    write_colmap_bin(root, cams)
    write_images(root, cams, "images_2", (H // 2, W // 2))
    write_transforms(root, cams)
    col, ns = load_scene(root, format="colmap"), load_scene(root, format="nerfstudio", downscale=2)
    for v_col, v_ns, cam in zip(col.views, ns.views, cams, strict=True):
        assert v_col.camera.image_size == v_ns.camera.image_size == (H // 2, W // 2)
        np.testing.assert_allclose(v_col.camera.K.numpy(), v_ns.camera.K.numpy(), atol=1e-5)
        uv, _ = v_col.camera.project(torch.as_tensor(POINTS))
        np.testing.assert_allclose(uv.double().numpy(), (colmap_pixels(cam, POINTS) + 0.5) / 2 - 0.5, atol=1e-3)


def _rotation(seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q @ np.diag(np.sign(np.diag(r)))
    return q if np.linalg.det(q) > 0 else -q


def test_applied_transform_and_scale_keep_cloud_and_poses_together(tmp_path):
    """One capture written twice: plain (its own frame) and as a converter writes it after
    moving the world by applied_transform = [A | a] and scaling by applied_scale s (a pose
    in the file is s * (A x + a) of the original; sparse_pc.ply is A x + a, before the scale,
    which nerfstudio's reader multiplies in). Both must put the cloud on the same pixels,
    worked out by hand from the original cameras."""
    cams = random_cameras(4, seed=31)
    plain, moved = str(tmp_path / "plain"), str(tmp_path / "moved")
    write_images(plain, cams)
    write_transforms(plain, cams)
    A, a, s = _rotation(7), np.array([0.3, -1.2, 2.0]), 2.5
    write_images(moved, cams)
    meta = write_transforms(moved, cams, ply=False, applied_transform=np.hstack([A, a[:, None]]).tolist(),
                            applied_scale=s)
    for frame in meta["frames"]:
        c2w = np.asarray(frame["transform_matrix"])
        c2w[:3, :3] = A @ c2w[:3, :3]
        c2w[:3, 3] = s * (A @ c2w[:3, 3] + a)
        frame["transform_matrix"] = c2w.tolist()
    meta["ply_file_path"] = "sparse_pc.ply"
    with open(os.path.join(moved, "transforms.json"), "w") as f:
        json.dump(meta, f)
    save_ply(os.path.join(moved, "sparse_pc.ply"), (POINTS @ A.T + a).astype(np.float32), COLORS)

    p, m = load_scene(plain), load_scene(moved)
    assert m.metadata["applied_scale"] == s
    np.testing.assert_allclose(m.metadata["applied_transform"], np.hstack([A, a[:, None]]))
    assert p.metadata["applied_transform"] is None and p.metadata["applied_scale"] == 1.0
    np.testing.assert_allclose(m.points, s * (POINTS @ A.T + a), atol=1e-5)
    for v_p, v_m, cam in zip(p.views, m.views, cams, strict=True):
        want = colmap_pixels(cam, POINTS)
        for scene, view in ((p, v_p), (m, v_m)):
            uv, depth = view.camera.project(torch.as_tensor(scene.points, dtype=torch.float64))
            assert (depth > 0).all()
            np.testing.assert_allclose(uv.double().numpy(), want, atol=2e-3)
    # the same file named with pc_name (as export names a run's recorded cloud) is read the
    # same way, scaled; it was refused as ambiguous
    for name in ("sparse_pc.ply", os.path.join(moved, "sparse_pc")):
        named = load_scene(moved, pc_name=name)
        np.testing.assert_allclose(named.points, m.points, atol=1e-6)
        assert named.metadata["point_cloud"] == os.path.join(moved, "sparse_pc.ply")
    # another cloud named with pc_name is read as is, in the poses' frame (densify's dense.ply is)
    save_ply(os.path.join(moved, "dense.ply"), (s * (POINTS @ A.T + a)).astype(np.float32))
    np.testing.assert_allclose(load_scene(moved, pc_name="dense").points, m.points, atol=1e-5)


def test_export_of_an_npbg_run_on_a_scaled_capture(tmp_path):
    """An NPBG run on a capture with applied_scale records its cloud as sparse_pc.ply (the
    file's ply_file_path, read scaled), and export names the recorded cloud as pc_name: the
    loader refused that as ambiguous ('leave pc_name empty', an option the user never gave),
    so such a run could not be exported. The bundle holds the scaled cloud it was fitted to."""
    from headless_train.export import main as export_main
    from headless_train.systems.base import module_key, point_cloud_name, points_digest
    from npbgpp_core.models import NPBG, NPBGConfig
    from npbgpp_core.scene import NeuralScene

    cams = random_cameras(3, seed=35)
    root = str(tmp_path / "scaled")
    write_images(root, cams)
    A, a, s = _rotation(9), np.array([0.1, 0.4, -0.7]), 1.7
    meta = write_transforms(root, cams, ply=False, applied_transform=np.hstack([A, a[:, None]]).tolist(),
                            applied_scale=s)
    meta["ply_file_path"] = "sparse_pc.ply"
    with open(os.path.join(root, "transforms.json"), "w") as f:
        json.dump(meta, f)
    save_ply(os.path.join(root, "sparse_pc.ply"), (POINTS @ A.T + a).astype(np.float32), COLORS)
    scene = load_scene(root)  # as the trainer loads it, with datasets.pc_name=null
    torch.manual_seed(0)
    model = NPBG(len(scene.points), NPBGConfig())
    state = {f"refiner.{k}": v for k, v in model.refiner.state_dict().items()}
    state.update({f"scene_models.{module_key(scene.name)}.{k}": v for k, v in model.state_dict().items()})
    record = {"system": "npbg", "config": {"name": "npbg"}, "scenes": [scene.name], "points": [len(scene.points)],
              "point_clouds": [point_cloud_name(scene)], "point_digests": [points_digest(scene.points)]}
    assert record["point_clouds"] == ["sparse_pc.ply"]
    torch.save({"state_dict": state, "npbgpp": record, "global_step": 1}, tmp_path / "run.ckpt")
    out = str(tmp_path / "scaled.npbgpp")
    assert export_main(["--checkpoint", str(tmp_path / "run.ckpt"), "--scene", root, "--out", out,
                        "--device", "cpu"]) == 0
    np.testing.assert_allclose(NeuralScene.load(out).points.numpy(), s * (POINTS @ A.T + a), atol=1e-5)


def test_a_splat_file_as_ply_file_path_keeps_the_splats_pc_name_keeps(capture):
    """ply_file_path naming a Gaussian-splat file kept every splat, near-transparent ones as
    opaque points, while the same file named with pc_name (or as Dataset Points) keeps those
    with opacity >= 0.1: sigmoid(-5) = 0.0067 and sigmoid(-2.3) = 0.091 go, sigmoid(-2) =
    0.119 stays (hand-computed)."""
    from plyfile import PlyData, PlyElement

    root, _ = capture
    names = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1", "scale_2",
             "rot_0", "rot_1", "rot_2", "rot_3"]
    data = np.zeros(5, [(k, "f4") for k in names])
    for i, c in enumerate("xyz"):
        data[c] = POINTS[:5, i]
    data["opacity"] = [-5.0, -2.0, -2.3, 0.0, 3.0]
    data["rot_0"] = 1.0
    PlyData([PlyElement.describe(data, "vertex")]).write(os.path.join(root, "splats.ply"))
    rewrite(root, lambda meta: meta.update(ply_file_path="splats.ply"))
    own, named = load_scene(root), load_scene(root, pc_name="splats.ply")
    np.testing.assert_allclose(own.points, POINTS[[1, 3, 4]], atol=1e-6)
    np.testing.assert_allclose(named.points, own.points)


@pytest.mark.parametrize(("change", "message"), [
    (lambda m: m.update(applied_scale=0), r"transforms.json applied_scale: 0 must be positive"),
    (lambda m: m.update(applied_scale="2"), r"transforms.json applied_scale: expected a number, got str"),
    (lambda m: m.update(applied_transform=[[1, 0, 0], [0, 1, 0]]),
     r"transforms.json applied_transform: expected a matrix of shape \(3, 4\) or \(4, 4\)"),
    (lambda m: m.update(applied_transform=[[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]),
     r"transforms.json applied_transform: last row is"),
])
def test_bad_applied_fields_are_named(capture, change, message):
    root, _ = capture
    rewrite(root, change)
    with pytest.raises(DatasetError, match=message):
        load_scene(root)


def test_windows_separators_in_paths(capture):
    """A transforms.json written on Windows: file_path, mask_path, ply_file_path and the
    split lists with backslashes name the same files, views and split as forward slashes."""
    root, cams = capture
    want = load_scene(root, holdout_every=0)
    os.makedirs(os.path.join(root, "masks"))
    os.makedirs(os.path.join(root, "pc"))
    os.rename(os.path.join(root, "sparse_pc.ply"), os.path.join(root, "pc", "sparse_pc.ply"))
    for c in cams:
        Image.fromarray(np.full((H, W), 255, np.uint8)).save(os.path.join(root, "masks", c["name"]))

    def windows(meta: dict) -> None:
        for frame in meta["frames"]:
            name = frame["file_path"].split("/")[-1]
            frame["file_path"] = "images\\" + name
            frame["mask_path"] = ".\\masks\\" + name
        meta["ply_file_path"] = "pc\\sparse_pc.ply"
        meta["test_filenames"] = ["images\\frame_00003.png"]

    rewrite(root, windows)
    got = load_scene(root)
    assert [v.name for v in got.views] == [v.name for v in want.views]
    assert [v.image_path for v in got.views] == [v.image_path for v in want.views]
    assert got.views[0].mask_path == os.path.join(root, "masks", cams[0]["name"])
    assert got.test == [3]
    assert got.metadata["point_cloud"] == os.path.join(root, "pc", "sparse_pc.ply")
    np.testing.assert_allclose(got.points, POINTS, atol=1e-6)


def test_min_side_reads_the_smallest_copy_still_large_enough(tmp_path):
    """images_2/ (20x15), images_4/ (10x8: 7.5 rounded up, so not 30/4) and images_8/ (5x4)
    beside images/ (40x30): min_side picks the copy with the smallest long side >= it, with
    intrinsics scaled by the size read (a point lands where the full-size pixel centre maps
    by hand: (u + 0.5) * w_copy / W - 0.5); a copy missing a file or framed otherwise is
    passed over."""
    cams = random_cameras(3, seed=41)
    root = str(tmp_path / "copies")
    write_images(root, cams)
    for n, size in ((2, (15, 20)), (4, (8, 10)), (8, (4, 5))):
        write_images(root, cams, f"images_{n}", size)
    write_transforms(root, cams)
    full = load_scene(root)
    assert full.metadata["downscale"] == 1
    for min_side, n, size in ((15, 2, (15, 20)), (10, 4, (8, 10)), (11, 2, (15, 20)), (5, 8, (4, 5)),
                              (40, 1, (H, W)), (41, 1, (H, W))):
        s = load_scene(root, min_side=min_side)
        assert s.metadata["downscale"] == n, min_side
        folder = "images" if n == 1 else f"images_{n}"
        for view, ref, cam in zip(s.views, full.views, cams, strict=True):
            assert view.image_path == os.path.join(root, folder, cam["name"])
            assert view.camera.image_size == size and view.name == ref.name
            np.testing.assert_allclose(view.camera.K.numpy(), ref.camera.scaled(size).K.numpy(), atol=1e-5)
            uv, _ = view.camera.project(torch.as_tensor(POINTS))
            scale = np.array([size[1] / W, size[0] / H])
            np.testing.assert_allclose(uv.double().numpy(), (colmap_pixels(cam, POINTS) + 0.5) * scale - 0.5,
                                       atol=1e-3)
        assert (s.train, s.test) == (full.train, full.test)
    # without w / h in the file the full size comes from images/
    rewrite(root, lambda m: [(f.pop("w"), f.pop("h")) for f in m["frames"]])
    s = load_scene(root, min_side=10)
    assert s.metadata["downscale"] == 4
    np.testing.assert_allclose(s.views[1].camera.K.numpy(), full.views[1].camera.scaled((8, 10)).K.numpy(), atol=1e-5)
    # a copy missing one image, or of another framing (cropped square), is not used
    os.remove(os.path.join(root, "images_8", cams[2]["name"]))
    write_images(root, cams, "images_3", (7, 7))
    assert load_scene(root, min_side=5).metadata["downscale"] == 4
    # masks: a copy without its masks_N/ is not used either
    os.makedirs(os.path.join(root, "masks"))
    for c in cams:
        Image.fromarray(np.full((H, W), 255, np.uint8)).save(os.path.join(root, "masks", c["name"]))
    rewrite(root, lambda m: [f.update(mask_path=f["file_path"].replace("images/", "masks/")) for f in m["frames"]])
    assert load_scene(root, min_side=5).metadata["downscale"] == 1
    assert load_scene(root, min_side=5, use_masks=False).metadata["downscale"] == 4


@pytest.mark.parametrize(("options", "message"), [
    ({"min_side": 0}, r"min_side=0 must be a whole number of pixels >= 1"),
    ({"min_side": 12.5}, r"min_side=12.5 must be a whole number"),
    ({"min_side": 10, "downscale": 2}, r"downscale=2 and min_side=10 both choose the image copy"),
])
def test_min_side_option_checks(capture, options, message):
    root, _ = capture
    with pytest.raises(DatasetError, match=message):
        load_scene(root, **options)


def test_export_max_side_reads_the_downscaled_copy(tmp_path, monkeypatch):
    """`headless_train export --max-side S` on a nerfstudio scene aggregates from the
    smallest images_N/ copy still S pixels long (min_side), else from images/."""
    from headless_train.export import main as export_main
    from npbgpp_core.datasets import scene_data
    from npbgpp_core.pretrained import default_weights_path

    cams = random_cameras(4, seed=43)
    root = str(tmp_path / "ns")
    write_images(root, cams)
    write_images(root, cams, "images_2", (H // 2, W // 2))
    write_transforms(root, cams)
    read = []
    real = scene_data.read_image
    monkeypatch.setattr(scene_data, "read_image", lambda path, *a, **k: read.append(path) or real(path, *a, **k))
    weights = default_weights_path("npbgpp", "object")
    for max_side, folder in (("16", "images_2"), ("25", "images")):
        read.clear()
        out = str(tmp_path / f"s{max_side}.npbgpp")
        assert export_main(["--checkpoint", weights, "--scene", root, "--out", out, "--device", "cpu",
                            "--max-side", max_side, "--views", "all"]) == 0
        assert sorted(read) == [os.path.join(root, folder, c["name"]) for c in cams], max_side


def test_aggregate_reads_the_captures_own_cloud_as_dataset_points_scaled(tmp_path):
    """Import Dataset Folder with Point Cloud naming a capture's own ply_file_path cloud
    (sparse_pc.ply, applied_scale 2.5) reads it scaled and makes it Dataset Points; Aggregate
    read Dataset Points as a plain file, unscaled, so the bundle's points missed the photos'
    frame by the factor 2.5. It reads the dataset's own file as its loader does; another file
    (a dense cloud, written in the poses' frame) is read as it is."""
    from npbgpp_core import protocol as P
    from npbgpp_core.service import aggregation_dataset

    cams = random_cameras(3, seed=5)
    root = str(tmp_path / "scaled")
    write_images(root, cams)
    write_transforms(root, cams, ply=False, applied_scale=2.5)
    with open(os.path.join(root, "transforms.json")) as f:
        meta = json.load(f)
    meta["ply_file_path"] = "sparse_pc.ply"
    with open(os.path.join(root, "transforms.json"), "w") as f:
        json.dump(meta, f)
    save_ply(os.path.join(root, "sparse_pc.ply"), POINTS.astype(np.float32), COLORS)
    save_ply(os.path.join(root, "dense.ply"), POINTS[:7].astype(np.float32))
    own = os.path.join(root, "sparse_pc.ply")
    for points, pc_name in ((own, own), (own, ""), ("", own), ("", "")):
        data = aggregation_dataset(P.AggregateBegin(root, "", points=points, pc_name=pc_name))
        np.testing.assert_allclose(data.points, 2.5 * POINTS, atol=1e-5)
    dense = aggregation_dataset(P.AggregateBegin(root, "", points=os.path.join(root, "dense.ply"), pc_name=own))
    np.testing.assert_allclose(dense.points, POINTS[:7], atol=1e-6)


def test_training_reads_input_views_from_the_copy_input_view_max_side_allows(tmp_path, monkeypatch):
    """Training on a nerfstudio folder with datasets.input_view_max_side=S reads its input
    views from the images_N/ copy export --max-side S reads (the smallest still S long),
    shrunk to the same sizes and cameras as from images/; the targets stay full-size
    (images/). No copy that large, or downscale= given: nothing changes."""
    from headless_train import data
    from headless_train.data import SampleOptions, TrainSamples, input_view_scene, load_scenes
    from npbgpp_core.datasets import scene_data

    cams = random_cameras(6, seed=47)
    root = str(tmp_path / "data" / "ns")
    write_images(root, cams)
    write_images(root, cams, "images_2", (H // 2, W // 2))
    write_transforms(root, cams)
    read: list[str] = []
    real = scene_data.read_image
    monkeypatch.setattr(scene_data, "read_image", lambda path, *a, **k: read.append(path) or real(path, *a, **k))

    def samples(max_side: int | None, **options) -> tuple[object, list[dict]]:
        dcfg = {"format": "nerfstudio", "data_root": str(tmp_path / "data"), "scene_name": "ns",
                "input_view_max_side": max_side, "options": options}
        scene = load_scenes(dcfg, None)[0]
        opts = SampleOptions(image_size=None, zoom_range=(1.0, 1.0), random_shift=False, selection_count=2,
                             input_view_max_side=max_side, jitter_prob=0.0)
        train = TrainSamples([scene], [0], 4, opts, seed=3)
        return scene, [train[i] for i in range(len(train))]

    full = os.path.join(root, "images")
    read.clear()
    scene, got = samples(None)
    assert input_view_scene(scene) is scene and all(os.path.dirname(p) == full for p in read)
    with monkeypatch.context() as patch:  # input views shrunk from images/, to compare with the copy's
        patch.setattr(data, "_read_input_views_from_copy", lambda *a: None)
        _, reference = samples(16)
    for max_side, copy in ((16, "images_2"), (20, "images_2"), (21, None)):
        read.clear()
        scene, got = samples(max_side)
        folder = os.path.join(root, copy or "images")
        assert (input_view_scene(scene) is scene) == (copy is None)
        n_inputs = sum(len(s["input_images"]) for s in got)
        assert len(read) == len(got) + n_inputs
        assert sorted(os.path.dirname(p) for p in read) == sorted([full] * len(got) + [folder] * n_inputs)
        for sample in got:
            assert sample["image"].shape[1:] == (H, W)
            for image, cam in zip(sample["input_images"], sample["input_cameras"], strict=True):
                assert max(image.shape[1:]) <= max_side and tuple(cam.image_size) == tuple(image.shape[1:])
        if max_side == 16:
            for sample, ref in zip(got, reference, strict=True):
                for cam, ref_cam in zip(sample["input_cameras"], ref["input_cameras"], strict=True):
                    assert cam.image_size == ref_cam.image_size
                    np.testing.assert_allclose(cam.K.numpy(), ref_cam.K.numpy(), atol=1e-5)
    # downscale= chooses the copy for every view: no second copy
    scene, _ = samples(16, downscale=2)
    assert input_view_scene(scene) is scene and scene.views[0].image_path.startswith(os.path.join(root, "images_2"))
    # cache_images: the copy's images are decoded once up front too, beside the targets'
    cached = load_scenes({"format": "nerfstudio", "data_root": str(tmp_path / "data"), "scene_name": "ns",
                          "input_view_max_side": 16, "cache_images": True, "cache_images_max_gb": 1}, None)
    read.clear()
    data.prefill_image_cache(cached)
    assert sorted(read) == sorted(os.path.join(root, folder, c["name"]) for folder in ("images", "images_2")
                                  for c in cams)


def test_own_cloud_file_is_the_cloud_the_loader_reads_unchosen_found_without_reading_it(capture, monkeypatch):
    """The nerfstudio cloud Densify must not write over when another is chosen: the file
    load_scene reads with no pc_name (its metadata, require_points=False), ply_file_path
    (none when that file is missing: no other .ply is taken in its place), else a default
    name, found without reading a cloud."""
    import npbgpp_core.ply as ply
    from npbgpp_core.datasets import own_cloud_file

    def unread_own_cloud() -> str | None:
        with monkeypatch.context() as patch:
            for name in ("load_scene_cloud", "load_ply"):
                patch.setattr(ply, name, lambda *a, **k: pytest.fail("a cloud was read"))
            return own_cloud_file(root, pc_name="dense")

    root, _ = capture
    save_ply(os.path.join(root, "dense.ply"), POINTS[:5].astype(np.float32))
    found = []
    for change in (lambda: None, lambda: os.remove(os.path.join(root, "sparse_pc.ply")),
                   lambda: rewrite(root, lambda meta: meta.pop("ply_file_path")),
                   lambda: os.remove(os.path.join(root, "dense.ply"))):
        change()
        want = load_scene(root, require_points=False).metadata["point_cloud"]
        assert unread_own_cloud() == want
        found.append(want)
    assert found == [os.path.join(root, "sparse_pc.ply"), None, os.path.join(root, "dense.ply"), None]
