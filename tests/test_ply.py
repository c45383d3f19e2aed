"""PLY I/O: binary/ASCII, float/double coordinates, uchar/float colours, a hand-written
ASCII file, extra properties and broken files."""

from __future__ import annotations

import numpy as np
import pytest

from npbgpp_core.ply import load_ply, save_ply


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("coord_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("color_dtype", ["u1", "f4", None])
def test_round_trip(tmp_path, binary, coord_dtype, color_dtype):
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(57, 3)).astype(coord_dtype)
    colors = rng.uniform(size=(57, 3)) if color_dtype else None
    path = tmp_path / "cloud.ply"
    kwargs = {"color_dtype": color_dtype} if color_dtype else {}
    save_ply(path, pts, colors, binary=binary, **kwargs)
    pc = load_ply(path)
    assert pc.points.dtype == np.float32 and pc.points.shape == (57, 3)
    np.testing.assert_array_equal(pc.points, pts.astype(np.float32))
    if colors is None:
        assert pc.colors is None
    elif color_dtype == "u1":
        np.testing.assert_array_equal(pc.colors, (np.round(colors * 255) / 255).astype(np.float32))
    else:
        np.testing.assert_allclose(pc.colors, colors, atol=1e-7)
    header = path.read_bytes()[:300]
    assert (b"format binary" in header) == binary
    assert (b"property double x" in header) == (coord_dtype == np.float64)


def test_extra_properties(tmp_path):
    pts = np.arange(12, dtype=np.float32).reshape(4, 3)
    save_ply(tmp_path / "e.ply", pts, extra={"confidence": np.array([0.5, 1, 2, 3])})
    pc = load_ply(tmp_path / "e.ply")
    np.testing.assert_array_equal(pc.extra["confidence"], [0.5, 1, 2, 3])
    assert len(pc) == 4


def test_hand_written_ascii(tmp_path):
    text = """ply
format ascii 1.0
comment written by hand
element vertex 3
property float x
property float y
property float z
property uchar red
property uchar green
property uchar blue
property float nx
element face 1
property list uchar int vertex_indices
end_header
0 0 0 255 0 0 0.5
1.5 -2 3.25 0 255 51 0.25
-1 2 -3 0 0 0 1
3 0 1 2
"""
    path = tmp_path / "hand.ply"
    path.write_text(text)
    pc = load_ply(path)
    np.testing.assert_array_equal(pc.points, [[0, 0, 0], [1.5, -2, 3.25], [-1, 2, -3]])
    np.testing.assert_allclose(pc.colors, [[1, 0, 0], [0, 1, 0.2], [0, 0, 0]], atol=1e-7)
    np.testing.assert_array_equal(pc.extra["nx"], [0.5, 0.25, 1])


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.ply"):
        load_ply(tmp_path / "missing.ply")
    junk = tmp_path / "junk.ply"
    junk.write_bytes(b"this is not a ply file\n")
    with pytest.raises(ValueError, match="junk.ply"):
        load_ply(junk)
    good = tmp_path / "good.ply"
    save_ply(good, np.random.default_rng(1).normal(size=(100, 3)), binary=True)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.ply"
    truncated.write_bytes(data[: len(data) - 200])
    with pytest.raises(ValueError, match="truncated.ply"):
        load_ply(truncated)
    noxyz = tmp_path / "noxyz.ply"
    noxyz.write_text("ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\nproperty float y\nend_header\n1 2\n")
    with pytest.raises(ValueError, match="lacks coordinate"):
        load_ply(noxyz)
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        save_ply(tmp_path / "x.ply", np.zeros((3, 2)))
    with pytest.raises(ValueError, match="colors"):
        save_ply(tmp_path / "x.ply", np.zeros((3, 3)), colors=np.zeros((2, 3)))
    assert not (tmp_path / "x.ply").exists()


# --------------------------------------------------------------------------- Gaussian splats
SPLAT_NAMES = (
    ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    + [f"f_rest_{i}" for i in range(45)]
    + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
)


def write_splat_file(path, xyz, f_dc, opacity_logit, text=False):
    """A 3DGS-layout file written field by field with plyfile (not through save_ply)."""
    from plyfile import PlyData, PlyElement

    data = np.zeros(len(xyz), dtype=[(n, "f4") for n in SPLAT_NAMES])
    for i, c in enumerate("xyz"):
        data[c] = xyz[:, i]
    for i in range(3):
        data[f"f_dc_{i}"] = f_dc[:, i]
    data["opacity"] = opacity_logit
    data["scale_0"] = -3.0
    data["rot_0"] = 1.0
    PlyData([PlyElement.describe(data, "vertex")], text=text).write(str(path))


@pytest.mark.parametrize("text", [False, True])
def test_splat_centres_colours_opacity(tmp_path, text):
    xyz = np.array([[0, 0, 0], [1, 2, 3], [-1, 0.5, 2], [4, 4, 4]], np.float32)
    f_dc = np.array([[0, 0, 0], [1, -1, 2], [-5, 3, 0.5], [0, 0, 0]], np.float32)
    logit = np.array([0.0, np.log(9.0), -np.log(9.0), -1000.0], np.float32)  # opacity 0.5, 0.9, 0.1, 0
    path = tmp_path / "splat.ply"
    write_splat_file(path, xyz, f_dc, logit, text=text)
    from npbgpp_core.ply import is_splat_header, ply_vertex_properties

    assert is_splat_header(ply_vertex_properties(path))
    pc = load_ply(path)
    assert pc.is_splat and len(pc) == 4
    np.testing.assert_array_equal(pc.points, xyz)
    # By hand: 0.5 + 0.28209479 * f, clamped to [0, 1].
    expected = [[0.5, 0.5, 0.5], [0.78209479, 0.21790521, 1.0], [0.0, 1.0, 0.64104740], [0.5, 0.5, 0.5]]
    np.testing.assert_allclose(pc.colors, expected, atol=1e-6)
    np.testing.assert_allclose(pc.extra["opacity"], [0.5, 0.9, 0.1, 0.0], atol=1e-6)
    assert set(pc.extra) == {"opacity"}  # SH rest, scales and rotations are not point properties
    kept = load_ply(path, min_opacity=0.3)
    np.testing.assert_array_equal(kept.points, xyz[[0, 1]])
    np.testing.assert_allclose(kept.colors, np.array(expected)[[0, 1]], atol=1e-6)
    with pytest.raises(ValueError, match=r"splat.ply: no splat has opacity >= 0.95"):
        load_ply(path, min_opacity=0.95)
    with pytest.raises(ValueError, match="min_opacity"):
        load_ply(path, min_opacity=1.5)


def test_non_finite_centre_of_a_dropped_splat_does_not_refuse_the_file(tmp_path):
    """min_opacity drops splats before coordinates are checked: a NaN centre in a dropped
    splat is no error, while one in a kept splat is (numbered as in the file)."""
    xyz = np.array([[0, 0, 0], [np.nan, 2, 3], [-1, 0.5, 2], [1, 1, 1]], np.float32)
    logit = np.array([np.log(9.0), -np.log(9.0), np.log(9.0), np.log(9.0)], np.float32)  # opacity .9 .1 .9 .9
    path = tmp_path / "nan_splat.ply"
    write_splat_file(path, xyz, np.zeros((4, 3), np.float32), logit)
    kept = load_ply(path, min_opacity=0.3)
    np.testing.assert_array_equal(kept.points, xyz[[0, 2, 3]])
    with pytest.raises(ValueError, match=r"nan_splat\.ply: 1 of 4 vertices have non-finite .*first at vertex 1\)"):
        load_ply(path)


NO_OPACITY_PLY = """ply
format ascii 1.0
comment some exporters drop opacity
element vertex 3
property float x
property float y
property float z
property float f_dc_0
property float f_dc_1
property float f_dc_2
end_header
0 0 0 0 0 0
1 2 3 1 -1 2
-1 0.5 2 -5 3 0.5
"""


def test_splat_without_opacity_keeps_every_splat_opaque(tmp_path, caplog):
    """A splat file without ``opacity`` (x, y, z, f_dc_* only) was read as a plain cloud
    without colours: its DC colours were lost. Now: centres, DC colours, opacity 1, and a
    min_opacity that has nothing to filter says so."""
    import logging

    path = tmp_path / "no_opacity.ply"
    path.write_text(NO_OPACITY_PLY)
    with caplog.at_level(logging.WARNING, logger="npbgpp_core.ply"):
        pc = load_ply(path, min_opacity=0.5)
    assert pc.is_splat and len(pc) == 3
    np.testing.assert_array_equal(pc.points, [[0, 0, 0], [1, 2, 3], [-1, 0.5, 2]])
    # By hand: 0.5 + 0.28209479 * f, clamped to [0, 1].
    np.testing.assert_allclose(pc.colors, [[0.5, 0.5, 0.5], [0.78209479, 0.21790521, 1.0], [0.0, 1.0, 0.64104740]],
                               atol=1e-6)
    np.testing.assert_array_equal(pc.extra["opacity"], [1.0, 1.0, 1.0])
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: this Gaussian-splat file has no opacity property: every splat is kept as opaque, "
        "min opacity 0.5 has nothing to filter"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="npbgpp_core.ply"):
        assert len(load_ply(path)) == 3
    assert not caplog.records  # no filter asked for: nothing to say


def test_splat_detection_needs_every_splat_property(tmp_path):
    from npbgpp_core.ply import ply_vertex_properties

    plain = tmp_path / "plain.ply"
    save_ply(plain, np.zeros((2, 3)), np.ones((2, 3)), extra={"opacity": np.zeros(2), "f_dc_0": np.zeros(2)})
    assert ply_vertex_properties(plain) == ["x", "y", "z", "red", "green", "blue", "opacity", "f_dc_0"]
    pc = load_ply(plain, min_opacity=0.5)  # not a splat: the threshold does not apply
    assert not pc.is_splat and len(pc) == 2 and set(pc.extra) == {"opacity", "f_dc_0"}
    junk = tmp_path / "junk.ply"
    junk.write_bytes(b"solid ascii stl\n")
    with pytest.raises(ValueError, match="junk.ply: not a PLY file"):
        ply_vertex_properties(junk)
    faces = tmp_path / "faces.ply"
    faces.write_text("ply\nformat ascii 1.0\nelement face 0\nproperty list uchar int vertex_indices\nend_header\n")
    with pytest.raises(ValueError, match="no 'vertex' element"):
        ply_vertex_properties(faces)


def test_aggregating_another_cloud_names_a_missing_or_empty_file(tmp_path):
    """service.with_points (Aggregate's Dataset Points) leaves the missing-file check to
    load_ply; an empty cloud is refused by name."""
    from npbgpp_core.service import with_points

    with pytest.raises(FileNotFoundError, match=f"PLY file not found: {tmp_path / 'gone.ply'}"):
        with_points(None, str(tmp_path / "gone.ply"))
    save_ply(tmp_path / "empty.ply", np.zeros((0, 3), np.float32))
    with pytest.raises(ValueError, match="point cloud to aggregate holds no points: .*empty.ply"):
        with_points(None, str(tmp_path / "empty.ply"))


def test_color_properties_from_the_header(tmp_path):
    """What the add-on's importer needs to colour points as load_ply does, without plyfile."""
    from npbgpp_core.ply import color_properties, ply_vertex_header

    path = tmp_path / "c.ply"
    path.write_text("ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\nproperty float y\nproperty float z\n"
                    "property ushort diffuse_red\nproperty ushort diffuse_green\nproperty ushort diffuse_blue\n"
                    "element face 0\nproperty list uchar int vertex_indices\nend_header\n0 0 0 65535 0 32768\n")
    header = ply_vertex_header(path)
    assert header[3] == ("diffuse_red", "ushort")
    assert color_properties(header) == (("diffuse_red", "diffuse_green", "diffuse_blue"), 65535.0)
    assert color_properties([("x", "float"), ("r", "float"), ("g", "float"), ("b", "float")])[1] == 1.0
    assert color_properties([("x", "float"), ("red", "uchar")]) is None


def test_non_finite_coordinates_refused_with_a_count(tmp_path):
    """NaN / inf coordinates (and finite doubles beyond float32's range, which would read
    as inf) are refused as the dataset loaders refuse them, naming the file, counting the
    vertices and giving the first; a clean file of the same layout reads."""
    head = ("ply\nformat ascii 1.0\nelement vertex 5\n"
            "property double x\nproperty double y\nproperty double z\nend_header\n")
    rows = ["0 0 0", "1 nan 0", "2 0 inf", "-inf 1 1", "1e39 0 0"]
    path = tmp_path / "bad.ply"
    path.write_text(head + "\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=r"bad\.ply: 4 of 5 vertices have non-finite \(NaN or infinite\) "
                                         r"coordinates \(1 of them beyond float32's range\) \(first at vertex 1\)"):
        load_ply(path)
    path.write_text(head.replace("vertex 5", "vertex 2") + "0 0 0\n1e30 -2 3\n")
    np.testing.assert_array_equal(load_ply(path).points, np.array([[0, 0, 0], [1e30, -2, 3]], np.float32))
    binary = tmp_path / "bad_binary.ply"
    save_ply(binary, np.array([[0.0, 0.0, 0.0], [np.nan, 1.0, 2.0]], np.float32), binary=True)
    with pytest.raises(ValueError, match=r"bad_binary\.ply: 1 of 2 vertices .* \(first at vertex 1\)"):
        load_ply(binary)


def test_dataset_loader_refuses_non_finite_cloud_the_same_way(tmp_path):
    from npbgpp_core.datasets.common import DatasetError, load_point_cloud

    save_ply(tmp_path / "cloud.ply", np.array([[0.0, 0.0, 1.0], [np.inf, 0.0, 0.0]], np.float32))
    with pytest.raises(DatasetError, match=r"cloud\.ply: 1 of 2 vertices have non-finite"):
        load_point_cloud(str(tmp_path), str(tmp_path / "cloud.ply"), ())


def test_element_counts_and_ignored_elements_from_the_header(tmp_path):
    """Element counts read from the header alone (the add-on's import note), checked against
    plyfile's reading of the same hand-written file; the note names what a point import
    leaves out, and nothing for a file of vertices alone."""
    from plyfile import PlyData

    from npbgpp_core.ply import ignored_elements_note, ply_element_counts

    path = tmp_path / "mesh.ply"
    path.write_text("ply\nformat ascii 1.0\ncomment made by hand\nelement vertex 3\nproperty float x\n"
                    "property float y\nproperty float z\nelement face 1\nproperty list uchar int vertex_indices\n"
                    "element edge 1\nproperty int vertex1\nproperty int vertex2\nelement material 0\n"
                    "property float red\nend_header\n0 0 0\n1 0 0\n0 1 0\n3 0 1 2\n0 1\n")
    counts = ply_element_counts(path)
    assert counts == {e.name: e.count for e in PlyData.read(str(path)).elements}
    assert counts == {"vertex": 3, "face": 1, "edge": 1, "material": 0}
    assert ignored_elements_note(counts) == "1 face, 1 edge ignored"
    assert ignored_elements_note({"vertex": 9, "face": 2, "tristrips": 3}) == "2 faces, 3 'tristrips' elements ignored"
    assert ignored_elements_note({"vertex": 9}) == ""
    assert len(load_ply(path)) == 3  # the reader takes the vertices alone
    path.write_text("ply\nformat ascii 1.0\nelement vertex many\nproperty float x\nend_header\n")
    with pytest.raises(ValueError, match="element 'vertex' has count 'many', not a number"):
        ply_element_counts(path)
