"""Property-based fuzzing of the file readers (hypothesis): mutated PLY files, COLMAP
models (.txt and .bin), NeRF-Synthetic and nerfstudio transforms JSON, NeuralScene bundles, and the
numpy files of DTU (cameras.npz) and ScanNet (intrinsics.npy, extrinsics.npy). The only
exceptions allowed are the documented ones: ValueError for PLY and bundles, DatasetError
for scene folders. Anything else (IndexError, ZeroDivisionError, MemoryError, a
UnicodeDecodeError, ...) fails the test with the shrunk input.

Each reader gets up to ``NPBGPP_FUZZ_EXAMPLES`` cases (default 1000) and a wall-clock
budget (``NPBGPP_FUZZ_BUDGET_S``, default 6.5 s), run as hypothesis runs of 50 cases: after
the budget no new run starts, so a slow or shared machine cannot stall ``make test``.
Seeds are fixed (the same cases every run) unless ``NPBGPP_FUZZ_RANDOM=1``. A summary
line per reader (cases, seconds) is printed; ``pytest -s`` shows it."""

from __future__ import annotations

import io
import json
import math
import os
import random
import struct
import time
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from PIL import Image

from npbgpp_core import load_ply, save_ply
from npbgpp_core.bundle_file import read_points
from npbgpp_core.datasets import DatasetError, load_scene
from npbgpp_core.scene import NeuralScene

EXAMPLES = int(os.environ.get("NPBGPP_FUZZ_EXAMPLES", "1000"))
BUDGET_S = float(os.environ.get("NPBGPP_FUZZ_BUDGET_S", "6.5"))
CHUNK = 50
STATS: dict[str, tuple[int, float]] = {}


def run_fuzz(name: str, strategy: st.SearchStrategy, body) -> int:
    """Run ``body(drawn)`` on up to EXAMPLES inputs, in hypothesis runs of CHUNK cases with
    fixed seeds 0, 1, ... (``NPBGPP_FUZZ_RANDOM=1``: random seeds), until the cases or the
    reader's time budget are used up. Returns the number of cases run."""
    start = time.monotonic()
    cases = 0
    base = random.randrange(2**32) if os.environ.get("NPBGPP_FUZZ_RANDOM") == "1" else 0
    for k in range(3 * (EXAMPLES // CHUNK + 1)):  # hypothesis may stop a run early (space exhausted)
        if cases >= EXAMPLES or time.monotonic() - start > BUDGET_S:
            break

        @seed(base + k)
        @settings(max_examples=min(CHUNK, EXAMPLES - cases), deadline=None, database=None, derandomize=False,
                  suppress_health_check=list(HealthCheck), print_blob=True)
        @given(strategy)
        def case(drawn) -> None:
            nonlocal cases
            cases += 1
            body(drawn)

        case()
    seconds = time.monotonic() - start
    STATS[name] = (cases, seconds)
    print(f"\nfuzz {name}: {cases} cases in {seconds:.1f} s")
    assert cases >= min(EXAMPLES, CHUNK)  # at least one full run, however slow the machine
    return cases


# ------------------------------------------------------------------ mutations
INTERESTING_INTS = (0, 1, -1, 2, 3, 255, 256, 65535, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**64 - 1)
INTERESTING_TOKENS = ("nan", "inf", "-inf", "-1", "0", "1", "1e308", "-1e308", "1e-320", "3.5", "", "x", "\u00e9",
                      "99999999999999999999", "4611686018427387904", "PINHOLE", "OPENCV", "RADIAL", "SIMPLE_RADIAL",
                      "list", "uchar", "float", "double", "int", "vertex", "face", "a.png", "../a.png",
                      "/etc/passwd", "end_header", "element", "property", "binary_big_endian", "ascii")


@st.composite
def byte_mutation(draw, data: bytes) -> bytes:
    """A few byte-level edits: flips, overwrites with interesting integers, truncation,
    insertion, deletion, duplication of a chunk."""
    b = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(("flip", "byte", "int32", "int64", "float64", "truncate", "insert", "delete",
                                   "duplicate")))
        pos = draw(st.integers(0, max(len(b) - 1, 0)))
        if op == "flip" and b:
            b[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte" and b:
            b[pos] = draw(st.sampled_from((0, 1, 0x7F, 0x80, 0xFF, 0x0A, 0x20, 0xE9)))
        elif op in ("int32", "int64"):
            size = 4 if op == "int32" else 8
            value = draw(st.sampled_from(INTERESTING_INTS)) % (1 << (8 * size))
            b[pos:pos + size] = value.to_bytes(size, "little")
        elif op == "float64":
            value = draw(st.sampled_from((math.nan, math.inf, -math.inf, 0.0, -0.0, 1e308, 5e-324, -1.0)))
            b[pos:pos + 8] = struct.pack("<d", value)
        elif op == "truncate":
            del b[pos:]
        elif op == "insert":
            b[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del b[pos:pos + draw(st.integers(1, 32))]
        elif op == "duplicate":
            b[pos:pos] = b[pos:pos + draw(st.integers(1, 64))]
    return bytes(b)


@st.composite
def text_mutation(draw, text: str) -> str:
    """Token- and line-level edits of a whitespace-separated text file."""
    lines = text.split("\n")
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(("token", "token", "token", "drop_token", "add_token", "drop_line", "dup_line",
                                   "swap")))
        tokens = lines[i].split(" ")
        if op == "token":
            j = draw(st.integers(0, len(tokens) - 1))
            tokens[j] = draw(st.sampled_from(INTERESTING_TOKENS) | st.text(max_size=6)
                             | st.integers(-(2**70), 2**70).map(str))
        elif op == "drop_token" and len(tokens) > 1:
            del tokens[draw(st.integers(0, len(tokens) - 1))]
        elif op == "add_token":
            tokens.insert(draw(st.integers(0, len(tokens))), draw(st.sampled_from(INTERESTING_TOKENS)))
        elif op == "drop_line" and len(lines) > 1:
            del lines[i]
            continue
        elif op == "dup_line":
            lines.insert(i, lines[i])
            continue
        elif op == "swap":
            k = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[k] = lines[k], lines[i]
            continue
        lines[i] = " ".join(tokens)
    return "\n".join(lines)


JSON_LEAVES = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
               | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8)
               | st.sampled_from(("images/r_0", "images/r_1.png", "../r_0", "/etc/passwd", "", "0.7")))
JSON_VALUES = st.recursive(JSON_LEAVES, lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=6), c,
                                                                                              max_size=4),
                           max_leaves=12)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


@st.composite
def json_mutation(draw, obj):
    """Replace, delete or add a value somewhere in a JSON document (structure-aware)."""
    obj = json.loads(json.dumps(obj))
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(obj))
        path = draw(st.sampled_from(paths))
        op = draw(st.sampled_from(("replace", "replace", "delete", "add", "number")))
        if not path:
            if op == "replace":
                obj = draw(JSON_VALUES)
            continue
        parent = obj
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        if op == "delete":
            del parent[key]
        elif op == "add" and isinstance(parent, dict):
            parent[draw(st.sampled_from(("camera_angle_y", "fl_x", "fl_y", "cx", "w", "h", "frames", "x")))] = \
                draw(JSON_VALUES)
        elif op == "number":
            parent[key] = draw(st.sampled_from((0, -1, 1e308, -1e-320, math.nan, math.inf, 2**64, 3.2, True, "1")))
        else:
            parent[key] = draw(JSON_VALUES)
    return obj


def _dumps(obj) -> bytes:
    return json.dumps(obj, allow_nan=True).encode()


# ------------------------------------------------------------------ seeds
def _ply_seeds(folder: str) -> list[bytes]:
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(6, 3)).astype(np.float32)
    cols = rng.random((6, 3))
    seeds = []
    for k, (binary, cdt, extra) in enumerate([(True, "u1", None), (False, "u1", None), (True, "f4", {"q": cols[:, 0]}),
                                              (False, "f4", None)]):
        path = os.path.join(folder, f"seed{k}.ply")
        save_ply(path, pts.astype(np.float64) if k == 3 else pts, cols, extra=extra, binary=binary, color_dtype=cdt)
        seeds.append(open(path, "rb").read())
    big_endian = seeds[0].replace(b"binary_little_endian", b"binary_big_endian")
    header, body = big_endian.split(b"end_header\n", 1)
    swapped = np.frombuffer(body, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("r", "u1"), ("g", "u1"),
                                         ("b", "u1")]).astype([("x", ">f4"), ("y", ">f4"), ("z", ">f4"), ("r", "u1"),
                                                               ("g", "u1"), ("b", "u1")])
    seeds.append(header + b"end_header\n" + swapped.tobytes())
    splat = os.path.join(folder, "splat.ply")  # a Gaussian-splat layout (read through its own path)
    save_ply(splat, pts, extra={"f_dc_0": cols[:, 0], "f_dc_1": cols[:, 1], "f_dc_2": cols[:, 2],
                                "opacity": cols[:, 0] - 0.5, "scale_0": cols[:, 1]})
    seeds.append(open(splat, "rb").read())
    seeds.append(b"ply\nformat ascii 1.0\ncomment mesh\nelement vertex 3\nproperty float x\nproperty float y\n"
                 b"property float z\nproperty uchar red\nproperty uchar green\nproperty uchar blue\nelement face 1\n"
                 b"property list uchar int vertex_indices\nend_header\n0 0 0 255 0 0\n1 0 0 0 255 0\n0 1 0 0 0 255\n"
                 b"3 0 1 2\n")
    for s in seeds:
        load_ply_bytes(folder, s)  # every seed is valid
    return seeds


def load_ply_bytes(folder: str, data: bytes):
    path = os.path.join(folder, "case.ply")
    with open(path, "wb") as f:
        f.write(data)
    return load_ply(path)


def _image_folder(folder: str, names: list[str], size: tuple[int, int] = (24, 32)) -> None:
    os.makedirs(folder, exist_ok=True)
    for name in names:
        Image.new("RGBA", (size[1], size[0]), (128, 64, 32, 255)).save(os.path.join(folder, name))


def _colmap_seed(root: str) -> dict[str, bytes]:
    """A two-image COLMAP model in both encodings (written by hand from the format spec)."""
    _image_folder(os.path.join(root, "images"), ["a.png", "b.png"])
    cams_txt = "# Camera list\n1 PINHOLE 32 24 30 31 16 12\n2 SIMPLE_RADIAL 32 24 30 16 12 0\n"
    imgs_txt = ("# Image list\n1 1 0 0 0 0 0 3 1 a.png\n10 12 1\n"
                "2 0.9950 0.0998 0 0 0.1 0 3 2 b.png\n\n")
    pts_txt = "# 3D points\n1 0 0 0 255 0 0 0.5 1 0\n2 0.1 0.2 0.3 0 255 0 0.5\n3 -0.1 0 0.2 0 0 255 0.1 2 0 1 0\n"
    cams_bin = struct.pack("<Q", 2) + struct.pack("<iiQQ4d", 1, 1, 32, 24, 30, 31, 16, 12) \
        + struct.pack("<iiQQ4d", 2, 2, 32, 24, 30, 16, 12, 0)
    imgs_bin = struct.pack("<Q", 2)
    for image_id, q, cam, name, n2d in ((1, (1, 0, 0, 0), 1, b"a.png", 1), (2, (0.995, 0.0998, 0, 0), 2, b"b.png", 0)):
        imgs_bin += struct.pack("<i4d3di", image_id, *q, 0, 0, 3 if image_id == 1 else 3, cam) + name + b"\0"
        imgs_bin += struct.pack("<Q", n2d) + b"".join(struct.pack("<ddq", 10, 12, 1) for _ in range(n2d))
    pts_bin = struct.pack("<Q", 3)
    for pid, xyz, rgb, track in ((1, (0, 0, 0), (255, 0, 0), 1), (2, (0.1, 0.2, 0.3), (0, 255, 0), 0),
                                 (3, (-0.1, 0, 0.2), (0, 0, 255), 2)):
        pts_bin += struct.pack("<Q3d3BdQ", pid, *xyz, *rgb, 0.5, track) + b"\0" * (8 * track)
    return {"cameras.txt": cams_txt.encode(), "images.txt": imgs_txt.encode(), "points3D.txt": pts_txt.encode(),
            "cameras.bin": cams_bin, "images.bin": imgs_bin, "points3D.bin": pts_bin}


def _write_model(sparse: str, files: dict[str, bytes], ext: str) -> None:
    for name in os.listdir(sparse):
        os.remove(os.path.join(sparse, name))
    for name, data in files.items():
        if name.endswith(ext):
            with open(os.path.join(sparse, name), "wb") as f:
                f.write(data)


def _nerf_seed(root: str) -> dict:
    _image_folder(os.path.join(root, "images"), ["r_0.png", "r_1.png"], (16, 16))
    save_ply(os.path.join(root, "points3d.ply"), np.zeros((3, 3), np.float32) + np.arange(3)[:, None])
    c2w = [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 4], [0, 0, 0, 1]]
    return {"camera_angle_x": 0.69, "frames": [
        {"file_path": "./images/r_0", "transform_matrix": c2w},
        {"file_path": "images/r_1.png", "transform_matrix": c2w, "fl_x": 20.0, "cx": 8.0, "w": 16, "h": 16}]}


def _expect(allowed: tuple[type[BaseException], ...], fn, *args):
    """Run a reader; documented errors are fine, anything else propagates (and fails)."""
    try:
        return fn(*args)
    except allowed:
        return None


# ------------------------------------------------------------------ tests
@pytest.fixture(scope="module")
def ply_env(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("fuzz_ply"))
    return folder, _ply_seeds(folder)


@st.composite
def ply_case(draw, seeds: list[bytes]) -> bytes:
    seed_file = draw(st.sampled_from(seeds))
    if draw(st.booleans()):
        header, sep, body = seed_file.partition(b"end_header")
        return draw(text_mutation(header.decode("ascii"))).encode("utf-8") + sep + body
    return draw(byte_mutation(seed_file))


def test_fuzz_ply(ply_env):
    folder, seeds = ply_env

    def body(mutated: bytes) -> None:
        cloud = _expect((ValueError,), load_ply_bytes, folder, mutated)
        if cloud is not None:  # what is accepted is well formed
            assert cloud.points.ndim == 2 and cloud.points.shape[1] == 3 and cloud.points.dtype == np.float32
            if cloud.colors is not None:
                assert cloud.colors.shape == cloud.points.shape and np.isfinite(cloud.colors).all()
                assert cloud.colors.min() >= 0 and cloud.colors.max() <= 1

    run_fuzz("ply", ply_case(seeds), body)


@pytest.mark.parametrize("ext", [".txt", ".bin"])
def test_fuzz_colmap(tmp_path, ext):
    root = str(tmp_path / "scene")
    sparse = os.path.join(root, "sparse", "0")
    os.makedirs(sparse)
    seed = _colmap_seed(root)
    _write_model(sparse, seed, ext)
    assert len(load_scene(root, format="colmap").views) == 2  # the seed is valid
    names = [n for n in seed if n.endswith(ext)]

    @st.composite
    def colmap_case(draw) -> dict[str, bytes]:
        files = dict(seed)
        name = draw(st.sampled_from(names))
        if ext == ".txt" and draw(st.integers(0, 3)) > 0:
            files[name] = draw(text_mutation(seed[name].decode())).encode("utf-8")
        else:
            files[name] = draw(byte_mutation(seed[name]))
        return files

    def body(files: dict[str, bytes]) -> None:
        _write_model(sparse, files, ext)
        scene = _expect((DatasetError,), load_scene, root, "colmap")
        if scene is not None:
            assert np.isfinite(scene.points).all() and all(v.image_path.startswith(root) for v in scene.views)

    run_fuzz(f"colmap{ext}", colmap_case(), body)


def test_fuzz_nerf_synthetic_json(tmp_path):
    root = str(tmp_path / "scene")
    meta = _nerf_seed(root)
    path = os.path.join(root, "transforms_train.json")
    with open(path, "wb") as f:
        f.write(_dumps(meta))
    assert len(load_scene(root).views) == 2
    # 4 in 5 structure-aware (the JSON parses), 1 in 5 raw bytes
    mutations = st.integers(0, 4).flatmap(
        lambda k: json_mutation(meta).map(_dumps) if k else byte_mutation(_dumps(meta)))

    def body(text: bytes) -> None:
        with open(path, "wb") as f:
            f.write(text)
        scene = _expect((DatasetError,), load_scene, root)
        if scene is not None:
            assert all(v.image_path.startswith(root) for v in scene.views)

    run_fuzz("nerf_json", mutations, body)


def test_fuzz_nerfstudio_json(tmp_path):
    """transforms.json of nerfstudio / instant-ngp: shared and per-frame intrinsics, lens
    keys, masks, split lists, ply_file_path (loaded with undistort=True, so the lens keys
    are read)."""
    root = str(tmp_path / "scene")
    _image_folder(os.path.join(root, "images"), ["a.png", "b.png"], (16, 16))
    _image_folder(os.path.join(root, "masks"), ["a.png"], (16, 16))
    save_ply(os.path.join(root, "sparse_pc.ply"), np.zeros((3, 3), np.float32) + np.arange(3)[:, None])
    c2w = [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 4], [0, 0, 0, 1]]
    meta = {"camera_model": "OPENCV", "fl_x": 20.0, "fl_y": 21.0, "cx": 8.0, "cy": 8.0, "w": 16, "h": 16,
            "k1": 0.01, "k2": 0.0, "p1": 0.0, "p2": 0.001, "ply_file_path": "sparse_pc.ply",
            "train_filenames": ["images/a.png"], "test_filenames": ["images/b.png"], "aabb_scale": 16,
            "frames": [{"file_path": "images/a.png", "transform_matrix": c2w, "mask_path": "masks/a.png"},
                       {"file_path": "./images/b", "transform_matrix": c2w, "fl_x": 19.0, "sharpness": 3.0}]}
    path = os.path.join(root, "transforms.json")
    with open(path, "wb") as f:
        f.write(_dumps(meta))
    assert len(load_scene(root, undistort=True).views) == 2
    mutations = st.integers(0, 4).flatmap(
        lambda k: json_mutation(meta).map(_dumps) if k else byte_mutation(_dumps(meta)))

    def body(text: bytes) -> None:
        with open(path, "wb") as f:
            f.write(text)
        scene = _expect((DatasetError,), lambda: load_scene(root, "nerfstudio", undistort=True))
        if scene is not None:
            assert all(v.image_path.startswith(root) for v in scene.views)
            assert np.isfinite(scene.points).all()

    run_fuzz("nerfstudio_json", mutations, body)


def _bundle_seed(path: str) -> bytes:
    from npbgpp_core.models import NPBG, NPBGConfig

    torch.manual_seed(0)
    model = NPBG(6, NPBGConfig())
    NeuralScene.from_npbg(model, torch.randn(6, 3), torch.rand(6, 3), name="fuzz").save(path)
    return open(path, "rb").read()


@st.composite
def bundle_mutation(draw, data: bytes) -> bytes:
    """Edits of the safetensors header (tensor dtypes, shapes, offsets, the model_config and
    metadata JSON) or of raw bytes."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    body = data[8 + n:]
    op = draw(st.sampled_from(("config", "config", "tensor", "tensor", "bytes", "meta")))
    if op == "bytes":
        return draw(byte_mutation(data))
    if op == "config":
        config = json.loads(header["__metadata__"]["model_config"])
        header["__metadata__"]["model_config"] = json.dumps(draw(json_mutation(config)), allow_nan=True)
    elif op == "meta":
        meta = header["__metadata__"]
        key = draw(st.sampled_from(sorted(meta)))
        meta[key] = draw(st.sampled_from(("", "npbg", "npbgpp", "coefficients", "2", "{}", "[]", "null", "nan")))
    else:
        name = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        field = draw(st.sampled_from(("dtype", "shape", "data_offsets")))
        if field == "dtype":
            header[name]["dtype"] = draw(st.sampled_from(("F16", "BF16", "F64", "I64", "U8", "BOOL", "F32", "I32")))
        elif field == "shape":
            shape = header[name]["shape"]
            header[name]["shape"] = draw(st.lists(st.sampled_from((0, 1, 2, 3, 6, 8, 7, 56, 10**7, 2**40)),
                                                  max_size=4) | st.just(shape[::-1]))
        else:
            offsets = header[name]["data_offsets"]
            header[name]["data_offsets"] = [offsets[0], draw(st.sampled_from((offsets[0], offsets[1] - 4,
                                                                                 offsets[1] + 4, 2**40)))]
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def test_fuzz_bundles(tmp_path):
    path = str(tmp_path / "case.npbgpp")
    seed = _bundle_seed(str(tmp_path / "seed.npbgpp"))
    assert len(NeuralScene.load(str(tmp_path / "seed.npbgpp"))) == 6
    renderers = [0]

    def body(mutated: bytes) -> None:
        with open(path, "wb") as f:
            f.write(mutated)
        points = _expect((ValueError,), read_points, path)  # the add-on's torch-free read of the points
        assert points is None or (points.dtype == np.float32 and points.shape[1:] == (3,)
                                   and np.isfinite(points).all())
        scene = _expect((ValueError,), NeuralScene.load, path)
        if scene is not None:  # a bundle that loads must also build its renderer, and give read_points' points
            assert np.array_equal(points, scene.points.float().numpy())
            renderers[0] += 1
            scene.renderer(tune_allocator=False)

    run_fuzz("bundle", bundle_mutation(seed), body)
    print(f"fuzz bundle: {renderers[0]} accepted bundles built a renderer")


# ------------------------------------------------------------------ numpy files (DTU, ScanNet)
NPY_SHAPES = ("()", "(0,)", "(4,)", "(4, 4)", "(3, 3)", "(4, 4, 4)", "(1099511627776, 4)", "(4, 1099511627776, 4)",
              "(-1, 4)", "(4, 4, 4, 4)", "(2**70,)", "x")
NPY_DESCR = ("'<f8'", "'>f8'", "'<f4'", "'<i8'", "'|u1'", "'|O'", "'<U4'", "'|V8'", "'<c16'", "[('a', '<f8')]")


@st.composite
def npy_mutation(draw, data: bytes) -> bytes:
    """Edit the header dict of a .npy file (shape, dtype, order; the length prefix kept
    consistent), or its raw bytes."""
    if draw(st.integers(0, 2)) == 0:
        return draw(byte_mutation(data))
    start, end = data.index(b"{"), data.index(b"}") + 1
    header = data[start:end].decode("latin1")
    field = draw(st.sampled_from(("shape", "descr", "fortran_order")))
    if field == "shape":
        new = draw(st.sampled_from(NPY_SHAPES))
        header = header[:header.index("'shape':")] + f"'shape': {new}, }}"
    elif field == "descr":
        old = header.split("'descr':")[1].split(",")[0].strip()
        header = header.replace(old, draw(st.sampled_from(NPY_DESCR)), 1)
    else:
        header = header.replace("False", "True") if "False" in header else header.replace("True", "False")
    raw = header.encode("latin1")
    raw += b" " * ((-(10 + len(raw) + 1)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(raw)) + raw + data[end:].lstrip(b" ").lstrip(b"\n")


@st.composite
def npz_mutation(draw, data: bytes) -> bytes:
    """Mutate one member of a .npz archive, or the archive's raw bytes."""
    if draw(st.integers(0, 3)) == 0:
        return draw(byte_mutation(data))
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        members = {n: z.read(n) for n in z.namelist()}
    name = draw(st.sampled_from(sorted(members)))
    op = draw(st.sampled_from(("mutate", "mutate", "drop", "rename")))
    if op == "drop":
        del members[name]
    elif op == "rename":
        members[draw(st.sampled_from(("world_mat_9.npy", "world_mat_-1.npy", "world_mat_x.npy", "scale_mat_0")))] = \
            members.pop(name)
    else:
        members[name] = draw(npy_mutation(members[name]))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for n, m in members.items():
            z.writestr(n, m)
    return out.getvalue()


def _numpy_scene(root: str, kind: str) -> dict[str, bytes]:
    from test_datasets_formats import make_cameras, write_idr, write_scannet

    if kind == "dtu":
        write_idr(root, make_cameras(3, seed=2), [f"{i:03d}.png" for i in range(3)], None)
        save_ply(os.path.join(root, "points3d.ply"), np.random.default_rng(0).normal(size=(10, 3)))
        names = ("cameras.npz",)
    else:
        write_scannet(root)
        names = ("intrinsics.npy", "extrinsics.npy")
    return {n: open(os.path.join(root, n), "rb").read() for n in names}


@pytest.mark.parametrize("kind", ["dtu", "scannet"])
def test_fuzz_numpy_camera_files(tmp_path, kind):
    root = str(tmp_path / kind)
    seed_files = _numpy_scene(root, kind)
    assert load_scene(root).views  # the seed is valid

    @st.composite
    def numpy_case(draw) -> tuple[str, bytes]:
        name = draw(st.sampled_from(sorted(seed_files)))
        mutate = npz_mutation if name.endswith(".npz") else npy_mutation
        return name, draw(mutate(seed_files[name]))

    def body(case: tuple[str, bytes]) -> None:
        name, data = case
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)
        try:
            _expect((DatasetError,), load_scene, root)
        finally:
            with open(os.path.join(root, name), "wb") as f:
                f.write(seed_files[name])

    run_fuzz(kind, numpy_case(), body)
