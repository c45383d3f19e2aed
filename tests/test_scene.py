"""NeuralScene bundles: bit-exact round trips for every kind, renders identical after
reload, atomic writes, and clear errors for corrupt, truncated, foreign and
other-version files."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from npbgpp_core import scene as scene_module
from npbgpp_core.camera import Camera
from npbgpp_core.models import NPBG, NPBGPlusPlus
from npbgpp_core.scene import FORMAT_VERSION, NeuralScene


def small_scene(n: int = 800):
    g = torch.Generator().manual_seed(0)
    pts = torch.randn(n, 3, generator=g)
    pts = pts / pts.norm(dim=1, keepdim=True)
    colors = torch.rand(n, 3, generator=g)
    cams = [Camera.look_at((3 * math.sin(a), 0.4, 3 * math.cos(a)), (0, 0, 0), fov_x_deg=45, image_size=(24, 24))
            for a in (0.0, 0.6, 1.2)]
    images = torch.rand(3, 3, 24, 24, generator=g)
    return pts, colors, cams, images


@pytest.fixture(scope="module")
def npbgpp_bundle():
    torch.manual_seed(0)
    pts, colors, cams, images = small_scene()
    model = NPBGPlusPlus().eval()
    with torch.no_grad():
        aggregated = model.aggregate(pts, images, cams)
    bundle = NeuralScene.from_aggregated(model, aggregated, colors=colors, name="sphere", metadata={"source": "test"})
    return model, aggregated, bundle, cams


def assert_same_scene(a: NeuralScene, b: NeuralScene) -> None:
    assert a.kind == b.kind
    for name in ("points", "features", "valid"):
        ta, tb = getattr(a, name), getattr(b, name)
        assert ta.dtype == tb.dtype and torch.equal(ta, tb), name
    assert (a.colors is None) == (b.colors is None)
    if a.colors is not None:
        assert torch.equal(a.colors, b.colors)
    assert a.model_config == b.model_config
    assert a.metadata == b.metadata
    assert a.model_state.keys() == b.model_state.keys()
    for k in a.model_state:
        assert torch.equal(a.model_state[k], b.model_state[k]), k


def test_npbgpp_round_trip_is_bit_exact(tmp_path, npbgpp_bundle):
    model, aggregated, bundle, cams = npbgpp_bundle
    path = tmp_path / "scene.npbgpp"
    bundle.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["scene.npbgpp"]  # no temp files left
    loaded = NeuralScene.load(path)
    assert_same_scene(bundle, loaded)
    assert loaded.metadata == {"source": "test", "name": "sphere"}
    assert not any(k.startswith("extractor.") for k in loaded.model_state)  # rendering needs no extractor
    target = Camera.look_at((1.0, 1.0, -2.5), (0, 0, 0), image_size=(20, 28))
    image = loaded.renderer().render(target)
    assert image.shape == (3, 20, 28)
    assert torch.equal(image, model.render(aggregated, target))
    raw = loaded.renderer().render_raw(target)
    assert raw.shape == (3, 20, 28)
    half = loaded.renderer(dtype=torch.bfloat16).render(target)
    assert (half - image).abs().max() < 0.1


@pytest.mark.parametrize("use_basis", [False, True])
def test_npbg_round_trip(tmp_path, npbgpp_bundle, use_basis):
    model, aggregated, _, cams = npbgpp_bundle
    pts = aggregated.points
    if use_basis:
        npbg = NPBG.from_npbgpp_coefficients(
            pts, aggregated.coefficients, model.basis.state_dict(), model.refiner.state_dict(), model.config,
            valid=aggregated.valid,
        )
    else:
        torch.manual_seed(1)
        npbg = NPBG(len(pts))
        with torch.no_grad():
            npbg.descriptors.normal_()
            npbg.background.fill_(0.3)
    bundle = NeuralScene.from_npbg(npbg, pts, name="n")
    assert bundle.kind == ("coefficients" if use_basis else "npbg")
    bundle.save(tmp_path / "n.npbgpp")
    loaded = NeuralScene.load(tmp_path / "n.npbgpp")
    assert_same_scene(bundle, loaded)
    assert torch.equal(loaded.renderer().render(cams[0]), npbg.render(pts, cams[0]))


def test_render_points_nearest_colour():
    cam = Camera.look_at((0, 0, -3), (0, 0, 0), fov_x_deg=40, image_size=(16, 16))
    pts = torch.tensor([[0.0, 0.0, 0.5], [0.0, 0.0, 0.0], [0.0, 0.0, -4.0]])  # far, near, behind the camera
    colors = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    feats = torch.zeros(3, 1, 8)
    bundle = NeuralScene(pts, colors, "npbgpp", feats, model_state=NPBGPlusPlus().state_dict())
    img = bundle.renderer().render_points(cam)
    uv, _ = cam.project(pts[1:2])
    j, i = (int(round(float(x))) for x in uv[0])
    assert torch.equal(img[:, i, j], colors[1])
    img[:, i, j] = 0
    assert (img == 0).all()  # the far point is hidden, the point behind is not drawn
    state = NPBGPlusPlus().state_dict()
    empty = NeuralScene(torch.zeros(0, 3), None, "npbgpp", torch.zeros(0, 1, 8), model_state=state)
    assert (empty.renderer().render_points(cam) == 0).all()
    assert empty.renderer().render(cam).shape == (3, 16, 16)


def test_corrupt_and_truncated_files(tmp_path, npbgpp_bundle):
    _, _, bundle, _ = npbgpp_bundle
    good = tmp_path / "good.npbgpp"
    bundle.save(good)
    data = good.read_bytes()
    for cut in (0, 5, 100, len(data) // 2, len(data) - 1):
        bad = tmp_path / f"cut{cut}.npbgpp"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=f"cut{cut}.npbgpp.*(corrupt|truncated)"):
            NeuralScene.load(bad)
    junk = tmp_path / "junk.npbgpp"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match="junk.npbgpp"):
        NeuralScene.load(junk)
    # A pickle (what torch.save writes) is rejected, never unpickled.
    pickled = tmp_path / "pickle.npbgpp"
    torch.save({"points": torch.zeros(2, 3)}, pickled)
    with pytest.raises(ValueError, match="pickle.npbgpp"):
        NeuralScene.load(pickled)
    with pytest.raises(FileNotFoundError, match="missing.npbgpp"):
        NeuralScene.load(tmp_path / "missing.npbgpp")


def test_foreign_and_other_version_files(tmp_path, npbgpp_bundle):
    _, _, bundle, _ = npbgpp_bundle
    tensors = {"points": torch.zeros(2, 3), "features": torch.zeros(2, 7, 8), "valid": torch.ones(2, dtype=torch.bool)}
    foreign = tmp_path / "foreign.safetensors"
    save_file(tensors, str(foreign))
    with pytest.raises(ValueError, match="foreign.safetensors.*not an NPBG"):
        NeuralScene.load(foreign)
    newer = tmp_path / "newer.npbgpp"
    meta = {"format": "npbgpp-neural-scene", "format_version": "2", "kind": "npbgpp", "model_config": "{}",
            "metadata": json.dumps({})}
    save_file(tensors, str(newer), metadata=meta)
    expected = rf"newer.npbgpp: mismatched bundle version.*version 2.*version {FORMAT_VERSION}"
    with pytest.raises(ValueError, match=expected):
        NeuralScene.load(newer)
    inconsistent = tmp_path / "inconsistent.npbgpp"
    wrong_valid = {**tensors, "valid": torch.ones(3, dtype=torch.bool)}
    save_file(wrong_valid, str(inconsistent), metadata={**meta, "format_version": "1"})
    with pytest.raises(ValueError, match="inconsistent.npbgpp.*valid"):
        NeuralScene.load(inconsistent)


def test_read_points_reads_the_points_alone(tmp_path, npbgpp_bundle):
    """bundle_file.read_points (torch-free, for the add-on) gives the points NeuralScene.load
    gives, in every float width, without reading the rest (damaged weights do not matter);
    foreign, other-version and truncated files are refused naming the file."""
    from npbgpp_core.bundle_file import read_points

    _, _, bundle, _ = npbgpp_bundle
    good = tmp_path / "good.npbgpp"
    bundle.save(good)
    got = read_points(good)
    assert got.dtype == np.float32 and np.array_equal(got, NeuralScene.load(good).points.numpy())
    meta = {"format": "npbgpp-neural-scene", "format_version": "1"}
    pts = bundle.points[:5].double()
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        path = tmp_path / f"{dtype}.npbgpp"
        save_file({"points": pts.to(dtype), "features": torch.full((5, 2), math.nan)}, str(path), metadata=meta)
        np.testing.assert_array_equal(read_points(path), pts.to(dtype).float().numpy())
        with pytest.raises(ValueError, match=f"{path.name}.*(tensor|inconsistent)"):
            NeuralScene.load(path)  # read whole, the file is refused (no 'valid', NaN features)
    for name, file_meta in (("foreign", {}), ("newer", {**meta, "format_version": "2"})):
        save_file({"points": pts.float()}, str(tmp_path / f"{name}.npbgpp"), metadata=file_meta or None)
        with pytest.raises(ValueError, match=f"{name}.npbgpp.*(not an NPBG|mismatched bundle version)"):
            read_points(tmp_path / f"{name}.npbgpp")
    save_file({"points": torch.zeros(4, 2)}, str(tmp_path / "flat.npbgpp"), metadata=meta)
    with pytest.raises(ValueError, match=r"flat.npbgpp: points have shape \[4, 2\]"):
        read_points(tmp_path / "flat.npbgpp")
    data = (tmp_path / "torch.float64.npbgpp").read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    start, end = json.loads(data[8:header])["points"]["data_offsets"]
    for cut in (4, header - 1, header + end - 1):
        (tmp_path / f"cut{cut}.npbgpp").write_bytes(data[:cut])
        with pytest.raises(ValueError, match=f"cut{cut}.npbgpp: corrupt or truncated"):
            read_points(tmp_path / f"cut{cut}.npbgpp")


def test_failed_save_keeps_the_old_file(tmp_path, npbgpp_bundle, monkeypatch):
    _, _, bundle, _ = npbgpp_bundle
    path = tmp_path / "keep.npbgpp"
    path.write_bytes(b"old contents")

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(scene_module.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        bundle.save(path)
    assert path.read_bytes() == b"old contents"
    assert os.listdir(tmp_path) == ["keep.npbgpp"]


def test_constructor_and_renderer_errors():
    with pytest.raises(ValueError, match="kind"):
        NeuralScene(torch.zeros(2, 3), kind="nerf", features=torch.zeros(2, 8))
    with pytest.raises(ValueError, match=r"\(N, R, C\)"):
        NeuralScene(torch.zeros(2, 3), kind="npbgpp", features=torch.zeros(2, 8))
    with pytest.raises(ValueError, match="colors"):
        NeuralScene(torch.zeros(2, 3), torch.zeros(3, 3), kind="npbg", features=torch.zeros(2, 8))
    with pytest.raises(ValueError, match="no network weights"):
        NeuralScene(torch.zeros(2, 3), kind="npbgpp", features=torch.zeros(2, 7, 8)).renderer()
    with pytest.raises(ValueError, match="lacks NPBG"):
        NeuralScene(torch.zeros(2, 3), kind="npbgpp", features=torch.zeros(2, 7, 8),
                    model_state={"basis.net.0.weight": torch.zeros(16, 18)}).renderer()


def test_nan_descriptors_are_refused_at_load(tmp_path, npbgpp_bundle):
    """A bundle whose descriptors (or points) hold NaN is refused when loaded, naming the
    file and the tensor; the same bundle without the NaN loads."""
    _, _, bundle, _ = npbgpp_bundle
    bundle.save(tmp_path / "ok.npbgpp")
    assert len(NeuralScene.load(tmp_path / "ok.npbgpp")) == len(bundle)
    for name in ("features", "points"):
        bad = NeuralScene(bundle.points.clone(), bundle.colors, bundle.kind, bundle.features.clone(), bundle.valid,
                          bundle.model_config, bundle.model_state, bundle.metadata)
        getattr(bad, name)[3].view(-1)[0] = float("nan")
        path = tmp_path / f"nan_{name}.npbgpp"
        bad.save(path)
        with pytest.raises(ValueError, match=rf"nan_{name}.npbgpp: tensor '{name}' holds 1 NaN"):
            NeuralScene.load(path)


@pytest.mark.parametrize("up", [(0.0, 0.0, 1.0), (0.35, 0.0, 1.0)], ids=["upright", "rolled"])
def test_tiled_render_equals_whole_frame(npbgpp_bundle, up):
    """A frame rendered in windows (bounded memory) equals the frame rendered at once, for
    an unrolled view and for a rolled one (windows of the aligned canvas), NPBG++ and NPBG."""
    from npbgpp_core.scene import window_grid

    model, aggregated, bundle, _ = npbgpp_bundle
    cam = Camera.look_at((0.5, -3.0, 0.8), (0, 0, 0), up, 50.0, (200, 300))
    max_pixels = (2 * 128 + 48) ** 2
    grid = window_grid(cam.image_size, max_pixels)
    assert len(grid) == 35  # 48-pixel parts: 5 x 7
    cover = np.zeros(cam.image_size, int)
    for top, left, h, w in grid:
        cover[top : top + h, left : left + w] += 1
    assert (cover == 1).all()
    renderer = bundle.renderer()
    whole = renderer.render(cam)
    tiled = renderer.render(cam, max_pixels=max_pixels)
    assert tiled.shape == whole.shape
    assert float((tiled - whole).abs().max()) < 1e-5
    torch.manual_seed(1)
    npbg = NPBG(len(bundle))
    with torch.no_grad():
        npbg.descriptors.normal_()
    npbg_renderer = NeuralScene.from_npbg(npbg, bundle.points).renderer()
    assert float((npbg_renderer.render(cam, max_pixels=max_pixels) - npbg_renderer.render(cam)).abs().max()) < 1e-5
    with pytest.raises(ValueError, match="max_pixels=1000"):
        window_grid(cam.image_size, 1000)


def test_fill_coverage_closes_small_holes_only():
    """Hand-made coverage: holes one and two pixels wide are filled (alpha 1, depth of the
    nearest neighbour), a 3x3 hole and the outside stay empty, the silhouette does not grow,
    and its inner edge is soft."""
    from npbgpp_core.scene import fill_coverage

    mask = torch.zeros(12, 16, dtype=torch.bool)
    mask[1:11, 1:15] = True
    mask[3, 3] = False  # one-pixel hole
    mask[3, 7:9] = False  # two-pixel hole
    mask[6:9, 10:13] = False  # 3x3 hole
    depth = torch.full((12, 16), 5.0)
    depth[2, 3] = 4.0  # a nearer neighbour of the one-pixel hole
    alpha, filled = fill_coverage(mask, torch.where(mask, depth, torch.tensor(float("inf"))))
    assert alpha[3, 3] == 1.0 and filled[3, 3] == 4.0
    assert alpha[3, 7] == 1.0 and alpha[3, 8] == 1.0 and filled[3, 8] == 5.0
    assert (alpha[6:9, 10:13] == 0).all() and torch.isinf(filled[6:9, 10:13]).all()
    assert (alpha[0] == 0).all() and (alpha[:, 0] == 0).all() and torch.isinf(filled[0]).all()
    assert alpha[1, 1] == pytest.approx(4 / 9) and alpha[1, 5] == pytest.approx(6 / 9)  # soft inner edge
    assert alpha[5, 5] == 1.0
    assert torch.equal(filled[mask], torch.where(mask, depth, 0)[mask])  # hits keep their own depth
    full = torch.ones(5, 6, dtype=torch.bool)  # a surface crossing every image border
    full[0, 3] = False  # a hole on the border
    alpha, filled = fill_coverage(full, torch.where(full, torch.tensor(2.0), torch.tensor(float("inf"))))
    assert alpha[0, 3] == 1.0 and filled[0, 3] == 2.0 and (alpha[1:-1, 1:-1] == 1).all()


@pytest.mark.parametrize("up", [(0.0, 0.0, 1.0), (0.35, 0.0, 1.0)], ids=["upright", "rolled"])
def test_clipped_camera_renders_like_only_the_points_inside(npbgpp_bundle, up):
    """The network's frame and the point layers of a camera with a clip range equal those of
    the same camera without one when only the points inside the range are rendered
    (select_points): clipped points reach neither the descriptor rasters nor the depth."""
    _, _, bundle, _ = npbgpp_bundle
    near, far = 2.7, 3.3
    plain = Camera.look_at((0.5, -3.0, 0.8), (0, 0, 0), up, 50.0, (48, 64))
    clipped = Camera(*plain.to_opencv(), plain.image_size, near=near, far=far)
    _, z = plain.project(bundle.points.float())
    assert float((z - near).abs().min()) > 1e-4 and float((z - far).abs().min()) > 1e-4
    inside = torch.nonzero((z > near) & (z <= far)).squeeze(1)
    assert 50 < len(inside) < len(bundle) - 200
    whole, subset = bundle.renderer(), bundle.renderer()
    subset.select_points(inside)
    got, ref = whole.render(clipped), subset.render(plain)
    assert float((got - ref).abs().max()) < 1e-5
    assert float((whole.render(plain) - ref).abs().max()) > 1e-2  # the clip range matters here
    bounded = whole.render(clipped, roll_context="bounded")  # the viewport's canvas on the CPU
    assert float((bounded - subset.render(plain, roll_context="bounded")).abs().max()) < 1e-5
    layers, ref_layers = whole.render_point_layers(clipped), subset.render_point_layers(plain)
    assert torch.equal(layers.mask, ref_layers.mask) and torch.equal(layers.depth, ref_layers.depth)
    assert bool((layers.depth[layers.mask] <= far).all())
