"""Two bundled NPBG++ networks chosen per data domain: the detection rule
(``npbgpp_core.datasets.scene_domain``) on scenes made here, the bundled files, and the
places that pick a file for a scene (worker service, demo, bench_quality)."""

from __future__ import annotations

import glob
import os
import sys

import numpy as np
import pytest
import torch
from _train_fixtures import aggregate_with_worker, make_tiny_scene
from PIL import Image

from npbgpp_core import protocol as P
from npbgpp_core.datasets import load_scene, scene_domain
from npbgpp_core.datasets.domain import MIN_TRANSPARENT, transparent_fraction
from npbgpp_core.pretrained import (
    DOMAINS,
    WEIGHTS_DIR,
    check_file,
    default_weights_path,
    load_pretrained_npbgpp,
    main,
    read_weights,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OBJECTS = os.path.join(WEIGHTS_DIR, "npbgpp_sphere_objects.safetensors")
GENERAL = os.path.join(WEIGHTS_DIR, "npbgpp_sphere.safetensors")


def _rewrite_pngs(folder: str, change) -> None:
    """Apply ``change`` (RGBA uint8 array -> PIL image) to every PNG of a scene folder."""
    for path in glob.glob(os.path.join(folder, "**", "*.png"), recursive=True):
        change(np.asarray(Image.open(path).convert("RGBA"))).save(path)


def _alpha_with_holes(holes: int):
    """RGBA fully opaque except ``holes`` pixels of the first row(s) at alpha 0."""
    def change(rgba: np.ndarray) -> Image.Image:
        out = rgba.copy()
        out[..., 3] = 255
        out.reshape(-1, 4)[:holes, 3] = 0
        return Image.fromarray(out)
    return change


@pytest.fixture()
def cutout(tmp_path):
    """A sphere rendered on a transparent background (RGBA, NeRF-Synthetic layout)."""
    return make_tiny_scene(str(tmp_path / "cutout"), views=4, size=32, n_points=200, splits=(3, 0, 1))


def test_rgba_with_transparent_pixels_is_an_object(cutout):
    scene = load_scene(cutout)
    alpha = np.asarray(Image.open(scene.views[0].image_path))[..., 3]
    assert (alpha < 128).mean() > 0.2  # the fixture really is a cut-out
    assert scene_domain(scene) == "object"
    # Alpha dropped (no compositing colour): the loader keeps whatever the RGB holds.
    scene.background = None
    assert scene_domain(scene) == "scene"


def test_opaque_rgba_and_rgb_are_scenes(cutout):
    _rewrite_pngs(cutout, _alpha_with_holes(0))  # RGBA whose alpha is 255 everywhere
    scene = load_scene(cutout)
    assert all(v.mask_from_alpha for v in scene.views) and scene.background is not None
    assert transparent_fraction(scene) == 0.0 and scene_domain(scene) == "scene"
    _rewrite_pngs(cutout, lambda rgba: Image.fromarray(np.ascontiguousarray(rgba[..., :3])))
    scene = load_scene(cutout)
    assert not any(v.mask_from_alpha for v in scene.views) and scene_domain(scene) == "scene"


def test_threshold_counts_transparent_pixels(cutout):
    """32x32 views (read at full size: under PROBE_SIDE): 1% of 1024 px is 10.24 px."""
    _rewrite_pngs(cutout, _alpha_with_holes(8))
    scene = load_scene(cutout)
    assert transparent_fraction(scene) == pytest.approx(8 / 1024)
    assert scene_domain(scene) == "scene"
    _rewrite_pngs(cutout, _alpha_with_holes(12))
    scene = load_scene(cutout)
    assert transparent_fraction(scene) == pytest.approx(12 / 1024) and 12 / 1024 >= MIN_TRANSPARENT
    assert scene_domain(scene) == "object"


def test_colmap_capture_is_a_scene_even_with_rgba_photos(tmp_path):
    from test_datasets_formats import write_colmap

    root = str(tmp_path / "capture")
    write_colmap(root, binary=True)
    _rewrite_pngs(root, _alpha_with_holes(10_000))  # transparent everywhere: still a capture
    scene = load_scene(root)
    assert scene.format == "colmap" and scene_domain(scene) == "scene"


def test_default_weights_path_per_domain():
    assert DOMAINS == ("scene", "object")
    assert default_weights_path("npbgpp") == GENERAL == default_weights_path("npbgpp", "scene")
    assert default_weights_path("npbgpp", "object") == OBJECTS
    # One NPBG refiner for every domain.
    assert default_weights_path("npbg_refiner", "object") == default_weights_path("npbg_refiner")
    with pytest.raises(ValueError, match="unknown data domain 'room'"):
        default_weights_path("npbgpp", "room")
    with pytest.raises(ValueError, match="unknown data domain"):
        load_pretrained_npbgpp(domain="objects")


def test_both_bundled_files_load_and_are_valid(capsys):
    objects = load_pretrained_npbgpp(domain="object")
    general = load_pretrained_npbgpp()
    assert objects.config.background == "none" and general.config.background == "environment"
    assert objects.config.world_up == general.config.world_up == (0.0, 0.0, 1.0)
    assert objects.card["demo_heldout_textured_monkey"]["b_psnr_db"] == 26.96  # its own card travels inside
    assert check_file(OBJECTS)["domain"] == "object" and check_file(GENERAL)["domain"] == "scene"
    total = sum(os.path.getsize(p) for p in glob.glob(os.path.join(WEIGHTS_DIR, "*.safetensors")))
    assert total <= 20e6
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.count('"valid": true') == 3 and OBJECTS in out and GENERAL in out


def test_missing_objects_file_names_its_git_restore(tmp_path, capsys, monkeypatch):
    import npbgpp_core.pretrained as pretrained

    monkeypatch.setattr(pretrained, "WEIGHTS_DIR", str(tmp_path))  # the bundled files, missing
    gone = tmp_path / "npbgpp_sphere_objects.safetensors"
    with pytest.raises(FileNotFoundError, match=r"git show 02641b0\^:npbgpp_core/weights/"):
        read_weights(str(gone), "npbgpp")
    with pytest.raises(FileNotFoundError, match="average-weights"):  # the general file is retrained
        read_weights(str(tmp_path / "npbgpp_sphere.safetensors"), "npbgpp")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not weights")
    assert main([str(bad)]) == 2 and "unusable" in capsys.readouterr().err


def test_service_picks_the_network_by_domain_and_bundles_render_with_their_own(cutout, tmp_path):
    """Aggregate with empty weights: the worker detects the domain, uses that bundled file
    and names it; the bundle then renders with the network it embeds (the objects file's),
    the image the objects network gives directly and not the general one's."""
    from npbgpp_core import Camera
    from npbgpp_core.scene import NeuralScene
    from npbgpp_core.service import RenderService

    service = RenderService()
    out = str(tmp_path / "auto.npbgpp")
    started = aggregate_with_worker(cutout, out, service=service)
    assert (started.weights, started.domain) == (OBJECTS, "object")
    bundle = NeuralScene.load(out)
    assert bundle.metadata["weights"] == os.path.basename(OBJECTS) and bundle.metadata["domain"] == "object"
    forced = aggregate_with_worker(cutout, str(tmp_path / "scene.npbgpp"), service=service, domain="scene")
    assert (forced.weights, forced.domain) == (GENERAL, "scene")
    given = aggregate_with_worker(cutout, str(tmp_path / "given.npbgpp"), GENERAL, service=service, domain="object")
    assert (given.weights, given.domain) == (GENERAL, "")  # a file given wins over the domain
    bad = service.handle(P.AggregateBegin(cutout, "", device="CPU", domain="rooms"))
    assert isinstance(bad, P.Failure) and "unknown data domain 'rooms'" in bad.error

    data = load_scene(cutout)
    cam = Camera.look_at((0.4, 2.5, -2.0), (0, 0, 0), fov_x_deg=50.0, image_size=(32, 32))
    assert isinstance(service.handle(P.LoadBundle(out, device="CPU")), P.BundleInfo)
    frame = service.handle(P.RenderFrame(P.CameraSpec.from_camera(cam), source="bundle", neural=True))
    assert isinstance(frame, P.Frame), frame
    points = torch.from_numpy(np.asarray(data.points, np.float32))
    images = torch.stack([data.load_image(i) for i in data.train])
    cams = [data.camera(i) for i in data.train]
    direct = {}
    for name, path in (("objects", OBJECTS), ("general", GENERAL)):
        model = load_pretrained_npbgpp(path, world_up=(0, 0, 1))
        with torch.no_grad():
            direct[name] = model.render(model.aggregate(points, images, cams), cam).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(frame.pixels[..., P.NEURAL], direct["objects"], atol=1e-4)
    assert np.abs(direct["general"] - direct["objects"]).mean() > 1e-2


def test_demo_picks_the_file_of_the_scene_domain(cutout, tmp_path):
    import argparse

    from blender_addon.demo import _check_weights

    args = argparse.Namespace(scene=cutout, weights=None, npbg_weights=None)
    paths: dict[str, str] = {}
    assert _check_weights(args, paths) == []
    assert paths["npbgpp"] == OBJECTS and args.domain == "object"
    _rewrite_pngs(cutout, lambda rgba: Image.fromarray(np.ascontiguousarray(rgba[..., :3])))
    assert _check_weights(args, paths) == [] and paths["npbgpp"] == GENERAL and args.domain == "scene"
    args.weights = OBJECTS  # --weights wins over the scene's domain
    assert _check_weights(args, paths) == [] and paths["npbgpp"] == OBJECTS and args.domain is None


def test_bench_quality_picks_per_scene_and_records_it(cutout, tmp_path):
    sys.path.insert(0, ROOT)
    from bench.bench_quality import evaluate_scene, markdown, parse_args

    rgb = make_tiny_scene(str(tmp_path / "rgb"), views=4, size=32, n_points=200, splits=(3, 0, 1))
    _rewrite_pngs(rgb, lambda rgba: Image.fromarray(np.ascontiguousarray(rgba[..., :3])))
    args = parse_args(["--scenes", cutout, rgb, "--methods", "npbgpp"])
    refiner = default_weights_path("npbg_refiner")
    auto = [evaluate_scene(f, args, {"npbgpp": None, "npbg_refiner": refiner}) for f in (cutout, rgb)]
    assert [(r["weights"], r["domain"]) for r in auto] == [(OBJECTS, "object"), (GENERAL, "scene")]
    assert auto[0]["background"] == "none" and auto[1]["background"] == "environment"
    report = {"methods": ["npbgpp"], "scenes": auto,
              "average": {"npbgpp": {"psnr": 1.0, "ssim": 0.5, "scenes": 2}}}
    table = markdown(report)
    assert "| NPBG++ weights |" in table and "| npbgpp_sphere_objects |" in table
    forced = evaluate_scene(cutout, args, {"npbgpp": GENERAL, "npbg_refiner": refiner})
    assert (forced["weights"], forced["domain"]) == (GENERAL, None)
    assert "NPBG++ weights" not in markdown({**report, "scenes": [forced, forced]})
