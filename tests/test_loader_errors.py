"""Bad input to the PLY, NeRF-Synthetic and COLMAP readers: every failure is a DatasetError
(ValueError for PLY) naming the file and the field; input that used to be read wrongly
without a word (undercounting PLY header, NaN colours, paths leaving the scene) is refused."""

from __future__ import annotations

import json
import os
import shutil
import struct

import numpy as np
import pytest
from _train_fixtures import make_tiny_scene

from npbgpp_core import load_ply, save_ply
from npbgpp_core.datasets import DatasetError, load_scene


@pytest.fixture(scope="module")
def nerf_scene(tmp_path_factory) -> str:
    return make_tiny_scene(str(tmp_path_factory.mktemp("nerf") / "scene"), views=2, size=16, n_points=20,
                           splits=(2, 0, 0))


def _mutated(src: str, dst: str, change) -> str:
    shutil.copytree(src, dst)
    path = os.path.join(dst, "transforms_train.json")
    with open(path) as f:
        meta = json.load(f)
    change(meta)
    with open(path, "w") as f:
        json.dump(meta, f)
    return dst


def _frame0(key: str, value):
    return lambda meta: meta["frames"][0].__setitem__(key, value)


@pytest.mark.parametrize("change, field", [
    (_frame0("transform_matrix", "1 0 0 0"), "frames\\[0\\] transform_matrix: expected a matrix of numbers"),
    (_frame0("transform_matrix", [[1, 0, 0, 0], [0, 1], [0, 0, 1, 0], [0, 0, 0, 1]]),
     "frames\\[0\\] transform_matrix: expected a matrix of numbers"),
    (lambda m: m.__setitem__("camera_angle_x", "0.69"), "camera_angle_x: expected a number, got str"),
    (lambda m: m.__setitem__("camera_angle_y", 0), "camera_angle_y: 0.0 is not in \\(0, pi\\)"),
    (lambda m: m.__setitem__("w", "wide"), "w: expected a number"),
    (_frame0("file_path", 7), "file_path: expected a file path string"),
])
def test_nerf_synthetic_bad_values_name_file_and_field(nerf_scene, tmp_path, change, field):
    root = _mutated(nerf_scene, str(tmp_path / "s"), change)
    with pytest.raises(DatasetError, match=f"transforms_train.json.* {field}"):
        load_scene(root)


def test_nerf_synthetic_file_path_outside_the_scene_needs_an_option(nerf_scene, tmp_path):
    outside = str(tmp_path / "elsewhere.png")
    shutil.copy(os.path.join(nerf_scene, "images", "r_0.png"), outside)
    for path in (outside, "../elsewhere.png", "images/../../elsewhere"):
        root = _mutated(nerf_scene, str(tmp_path / f"s{len(os.listdir(tmp_path))}"), _frame0("file_path", path))
        with pytest.raises(DatasetError, match="points outside the scene folder.*allow_external_paths"):
            load_scene(root)
        scene = load_scene(root, allow_external_paths=True)
        assert scene.views[0].image_path == outside
    # Inside the folder, even through '..': accepted as before.
    root = _mutated(nerf_scene, str(tmp_path / "inside"), _frame0("file_path", "images/../images/r_0"))
    assert load_scene(root).views[0].image_path == os.path.join(root, "images", "r_0.png")


@pytest.mark.parametrize("named", ["dtu", "h3ds", "scannet", "colmap", "nerfstudio"])
def test_a_named_format_that_is_not_the_folders_says_which_it_is(nerf_scene, named):
    """A NeRF-Synthetic folder read as another format (the published DTU line's datasets=dtu_one_scene
    on it): the missing file is named, and so is the layout the folder holds; detected, it loads."""
    with pytest.raises(DatasetError, match=f"the folder holds a nerf_synthetic scene, not {named}: name that format"):
        load_scene(nerf_scene, format=named)
    assert load_scene(nerf_scene).format == "nerf_synthetic"


def test_a_broken_folder_of_the_named_format_gets_no_layout_note(nerf_scene, tmp_path):
    root = _mutated(nerf_scene, str(tmp_path / "s"), _frame0("transform_matrix", "1 0 0 0"))
    for fmt in ("nerf_synthetic", None):
        with pytest.raises(DatasetError) as err:
            load_scene(root, format=fmt)
        assert "transform_matrix" in str(err.value) and "the folder holds" not in str(err.value)


# ------------------------------------------------------------------ COLMAP
def _colmap(root: str, images_txt: bytes, points: bytes | None = None) -> str:
    sparse = os.path.join(root, "sparse", "0")
    os.makedirs(sparse)
    os.makedirs(os.path.join(root, "images"))
    from PIL import Image

    Image.new("RGB", (32, 24)).save(os.path.join(root, "images", "a.png"))
    with open(os.path.join(sparse, "cameras.txt"), "w") as f:
        f.write("1 PINHOLE 32 24 30 30 16 12\n")
    with open(os.path.join(sparse, "images.txt"), "wb") as f:
        f.write(images_txt)
    if points is not None:
        with open(os.path.join(sparse, "points3D.bin"), "wb") as f:
            f.write(points)
    return root


def test_colmap_latin1_images_txt_names_file_and_line(tmp_path):
    text = "# comment\n1 1 0 0 0 0 0 3 1 caf\xe9.png\n\n".encode("latin-1")
    root = _colmap(str(tmp_path / "c"), text)
    with pytest.raises(DatasetError, match="images.txt:2: not UTF-8 text \\(byte 0xe9"):
        load_scene(root, require_points=False)


def test_colmap_points_count_is_bounded_by_the_file_before_allocating(tmp_path):
    record = struct.pack("<QdddBBBdQ", 1, 0.0, 0.0, 0.0, 255, 0, 0, 0.5, 0)
    root = _colmap(str(tmp_path / "c"), b"1 1 0 0 0 0 0 3 1 a.png\n\n", struct.pack("<Q", 2**62) + record)
    with pytest.raises(DatasetError, match="points3D.bin: header claims 4611686018427387904 points but the file "
                                           "holds at most 1"):
        load_scene(root)
    with open(os.path.join(root, "sparse", "0", "points3D.bin"), "wb") as f:
        f.write(struct.pack("<Q", 1) + record)
    assert load_scene(root).points.shape == (1, 3)  # the honest file still loads


def test_colmap_image_name_leaving_the_images_folder_is_refused(tmp_path):
    root = _colmap(str(tmp_path / "c"), b"1 1 0 0 0 0 0 3 1 ../../secret.png\n\n")
    with pytest.raises(DatasetError, match="image 1 .*points outside the scene folder"):
        load_scene(root, require_points=False)


# ------------------------------------------------------------------ PLY
def test_ply_coordinate_declared_as_list_is_named(tmp_path):
    path = tmp_path / "list.ply"
    path.write_text("ply\nformat ascii 1.0\nelement vertex 1\nproperty list uchar float x\nproperty float y\n"
                    "property float z\nend_header\n2 0.5 0.25 1 2\n")
    with pytest.raises(ValueError, match="list.ply: vertex property 'x' is declared as a list"):
        load_ply(path)


@pytest.mark.parametrize("binary", [True, False])
def test_ply_header_undercounting_its_vertices_is_refused(tmp_path, binary):
    pts = np.arange(15, dtype=np.float32).reshape(5, 3)
    path = tmp_path / "five.ply"
    save_ply(path, pts, binary=binary)
    np.testing.assert_array_equal(load_ply(path).points, pts)
    path.write_bytes(path.read_bytes().replace(b"element vertex 5", b"element vertex 3", 1))
    with pytest.raises(ValueError, match="five.ply: the header counts 3 vertex"):
        load_ply(path)


def _nan_colour_ply(path: str) -> None:
    rows = ["0 0 0 0.5 0.5 0.5"] * 4
    rows[2] = "0 0 0 0.5 nan 0.5"
    with open(path, "w") as f:
        f.write("ply\nformat ascii 1.0\nelement vertex 4\n" + "".join(f"property float {c}\n" for c in "xyz")
                + "property float red\nproperty float green\nproperty float blue\nend_header\n" + "\n".join(rows)
                + "\n")


def test_ply_nan_colours_are_refused_in_the_reader_the_writer_and_the_dataset(tmp_path, nerf_scene):
    path = str(tmp_path / "nan.ply")
    _nan_colour_ply(path)
    with pytest.raises(ValueError, match="nan.ply: 1 vertices have non-finite .*red, green, blue .*vertex 2"):
        load_ply(path)
    cols = np.full((4, 3), 0.5)
    cols[1, 0] = np.nan
    with pytest.raises(ValueError, match="out.ply: 1 vertices have non-finite"):
        save_ply(tmp_path / "out.ply", np.zeros((4, 3), np.float32), cols)
    assert not os.path.exists(tmp_path / "out.ply")
    root = str(tmp_path / "scene")
    shutil.copytree(nerf_scene, root)
    _nan_colour_ply(os.path.join(root, "points3d.ply"))
    with pytest.raises(DatasetError, match="points3d.ply: 1 vertices have non-finite"):
        load_scene(root)


# ------------------------------------------------------------------ ScanNet
class _Payload:
    """Unpickling this creates ``flag``: proof that a loader executed code from the file."""

    def __init__(self, flag: str) -> None:
        self.flag = flag

    def __reduce__(self):
        return (open, (self.flag, "w"))


def test_scannet_pickled_intrinsics_never_run_code(tmp_path):
    from test_datasets_formats import write_scannet

    root = str(tmp_path / "s")
    write_scannet(root)
    assert load_scene(root).views  # the published pickled-dict format still loads
    flag = str(tmp_path / "ran")
    path = os.path.join(root, "intrinsics.npy")
    payload = np.array({"K": np.eye(3), "x": _Payload(flag)}, dtype=object)
    np.save(path, payload, allow_pickle=True)
    np.load(path, allow_pickle=True)  # the payload is live: an unrestricted load runs it
    assert os.path.exists(flag)
    os.remove(flag)
    with pytest.raises(DatasetError, match="intrinsics.npy: not a readable pickled intrinsics dict .*refused"):
        load_scene(root)
    assert not os.path.exists(flag)


# ------------------------------------------------------------------ numpy headers (DTU, ScanNet)
def _claim_shape(data: bytes, shape: str) -> bytes:
    """The same .npy file with the header's shape replaced (header re-padded as numpy does)."""
    start, end = data.index(b"{"), data.index(b"}") + 1
    body = data[data.index(b"\n", end) + 1:]
    header = data[start:end].decode("latin1")
    raw = (header[:header.index("'shape':")] + f"'shape': {shape}, }}").encode("latin1")
    raw += b" " * ((-(10 + len(raw) + 1)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(raw)) + raw + body


def test_npy_and_npz_headers_claiming_terabytes_allocate_nothing(tmp_path):
    import io
    import zipfile

    from test_datasets_formats import make_cameras, write_idr, write_scannet

    dtu = str(tmp_path / "dtu")
    write_idr(dtu, make_cameras(3, seed=2), [f"{i:03d}.png" for i in range(3)], None)
    save_ply(os.path.join(dtu, "points3d.ply"), np.zeros((4, 3), np.float32))
    assert len(load_scene(dtu).views) == 3
    path = os.path.join(dtu, "cameras.npz")
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    assert np.load(io.BytesIO(_claim_shape(members["world_mat_1.npy"], "(4, 4)"))).shape == (4, 4)  # the helper
    members["world_mat_1.npy"] = _claim_shape(members["world_mat_1.npy"], "(1099511627776, 4)")
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for n, m in members.items():
            z.writestr(n, m)
    with open(path, "wb") as f:
        f.write(out.getvalue())
    with pytest.raises(DatasetError, match="cameras.npz world_mat_1: header claims an array of shape "
                                           "\\(1099511627776, 4\\)"):
        load_scene(dtu)

    scannet = str(tmp_path / "scannet")
    write_scannet(scannet)
    ext = os.path.join(scannet, "extrinsics.npy")
    with open(ext, "rb") as f:
        data = f.read()
    with open(ext, "wb") as f:
        f.write(_claim_shape(data, "(1099511627776, 4, 4)"))
    with pytest.raises(DatasetError, match="extrinsics.npy: header claims an array of shape \\(1099511627776, 4, 4\\)"):
        load_scene(scannet)


def test_npz_with_an_unsupported_zip_version_is_a_dataset_error(tmp_path):
    """zipfile raises NotImplementedError for a version it cannot extract (found by the fuzzer)."""
    from test_datasets_formats import make_cameras, write_idr

    dtu = str(tmp_path / "dtu")
    write_idr(dtu, make_cameras(2, seed=2), ["000.png", "001.png"], None)
    save_ply(os.path.join(dtu, "points3d.ply"), np.zeros((4, 3), np.float32))
    path = os.path.join(dtu, "cameras.npz")
    data = bytearray(open(path, "rb").read())
    central = data.index(b"PK\x01\x02")
    data[central + 6:central + 8] = struct.pack("<H", 235)  # "version needed to extract": 23.5
    open(path, "wb").write(bytes(data))
    with pytest.raises(DatasetError, match="cameras.npz: not a readable .npz file \\(NotImplementedError"):
        load_scene(dtu)
