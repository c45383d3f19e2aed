"""bench_big_photos' enlarged copies of a capture: the photos are the source's, enlarged, and
the cameras still see the points where the enlarged photos show them; its F12 camera keeps a
training camera's horizontal field of view."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, os.path.dirname(__file__))
from test_datasets_formats import POINTS, H, W, write_colmap  # noqa: E402

from bench import bench_big_photos as bbp  # noqa: E402
from npbgpp_core.datasets import load_scene  # noqa: E402


def _pixels(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), np.float64)


def test_upscaled_copy_projects_the_points_where_the_enlarged_photos_show_them(tmp_path: Path) -> None:
    src, out = str(tmp_path / "src"), str(tmp_path / "big")
    write_colmap(src, binary=True, models=("PINHOLE",))  # 40x30 photos of random pixels
    summary = bbp.upscale_capture(src, out, 2 * W)
    assert summary["image_sizes"] == [f"{2 * W}x{2 * H}"]
    small, big = load_scene(src), load_scene(out)
    assert [v.name for v in big.views] == [v.name for v in small.views]
    np.testing.assert_allclose(big.points, POINTS, atol=1e-6)
    for vs, vb in zip(small.views, big.views, strict=True):
        assert vb.camera.image_size == (2 * H, 2 * W)
        us, ds = vs.camera.project(torch.as_tensor(POINTS, dtype=torch.float32))
        ub, db = vb.camera.project(torch.as_tensor(POINTS, dtype=torch.float32))
        # pixel centres at integers: a point at edge coordinate e (from the image's left or top
        # edge) is at pixel e - 0.5, and enlarging by 2 doubles e
        torch.testing.assert_close(ub + 0.5, (us + 0.5) * 2, atol=1e-3, rtol=1e-5)
        torch.testing.assert_close(db, ds)
    # the photos are their sources enlarged: 2x2 means of the enlarged photo follow the source's
    # random pixels, not another view's
    photos = sorted(os.listdir(os.path.join(src, "images")))
    for k, name in enumerate(photos):
        enlarged = _pixels(os.path.join(out, "images", name))
        shrunk = enlarged.reshape(H, 2, W, 2, 3).mean((1, 3)).ravel()
        own = _pixels(os.path.join(src, "images", name)).ravel()
        other = _pixels(os.path.join(src, "images", photos[(k + 1) % len(photos)])).ravel()
        assert np.corrcoef(shrunk, own)[0, 1] > 0.9
        assert abs(np.corrcoef(shrunk, other)[0, 1]) < 0.2


def test_upscale_copies_a_distorted_model_which_the_loader_scales_to_the_photos(tmp_path: Path) -> None:
    # a raw OPENCV model (a phone capture before prepare-capture): copied byte for byte, and loaded
    # with undistort=True the lens's camera sees every point at twice its edge coordinates in the
    # photos enlarged 2x, with the same distortion coefficients; the undistorted camera keeps the
    # principal point (edge coordinates doubled) and nearly doubles its focal length (the widest view
    # is found on each size's own pixel grid, with a margin in pixels)
    src, out = str(tmp_path / "src"), str(tmp_path / "big")
    write_colmap(src, binary=True, models=("OPENCV",), dist=(0.1, -0.02, 0.003, 0.001))
    summary = bbp.upscale_capture(src, out, 2 * W)
    assert summary["image_sizes"] == [f"{2 * W}x{2 * H}"] and summary["camera_models"] == ["OPENCV"]
    for name in ("cameras.bin", "images.bin", "points3D.bin"):
        assert Path(out, "sparse", "0", name).read_bytes() == Path(src, "sparse", "0", name).read_bytes()
    small, big = load_scene(src, undistort=True), load_scene(out, undistort=True)
    pts = torch.as_tensor(POINTS, dtype=torch.float32)
    for vs, vb in zip(small.views, big.views, strict=True):
        assert vb.distortion == vs.distortion and vb.camera.image_size == (2 * H, 2 * W)
        (us, ds), (ub, db) = vs.source_camera.project(pts), vb.source_camera.project(pts)
        torch.testing.assert_close(ub + 0.5, (us + 0.5) * 2, atol=1e-3, rtol=1e-5)
        torch.testing.assert_close(db, ds)
        ks, kb = vs.camera.intrinsics(), vb.camera.intrinsics()
        assert (kb.cx + 0.5, kb.cy + 0.5) == pytest.approx((2 * (ks.cx + 0.5), 2 * (ks.cy + 0.5)), abs=1e-4)
        assert kb.fx / ks.fx == pytest.approx(2.0, rel=1e-3) and kb.fy / ks.fy == pytest.approx(2.0, rel=1e-3)


def test_upscale_refuses_a_model_the_loader_does_not_read(tmp_path: Path) -> None:
    src = str(tmp_path / "src")
    write_colmap(src, binary=False, models=("PINHOLE",))
    cameras = Path(src, "sparse", "0", "cameras.txt")
    rows = [line.split() for line in cameras.read_text().splitlines() if not line.startswith("#")]
    cameras.write_text("".join(f"{r[0]} RADIAL {r[2]} {r[3]} {r[4]} {r[6]} {r[7]} 0.1 0.0\n" for r in rows))
    with pytest.raises(SystemExit, match="RADIAL"):
        bbp.upscale_capture(src, str(tmp_path / "big"), 2 * W)
    assert not os.path.exists(tmp_path / "big")


def test_f12_camera_keeps_the_horizontal_field_of_view(tmp_path: Path) -> None:
    """A point on a photo's left or right edge, or at its principal point, lands on the same
    place of the 1920x1080 still (edge coordinates scaled by 1920 / the photo's width)."""
    src = str(tmp_path / "src")
    write_colmap(src, binary=True, models=("PINHOLE",))
    camera = load_scene(src).views[0].camera
    still = bbp.f12_camera(camera)
    assert still.image_size == (1080, 1920)
    u, depth = camera.project(torch.as_tensor(POINTS, dtype=torch.float32))
    v, depth2 = still.project(torch.as_tensor(POINTS, dtype=torch.float32))
    s = 1920 / W
    torch.testing.assert_close(v[:, 0] + 0.5, (u[:, 0] + 0.5) * s, atol=1e-3, rtol=1e-5)
    # rows: the still's centre row is the photo's centre row scaled
    torch.testing.assert_close(v[:, 1] + 0.5 - 540, (u[:, 1] + 0.5 - H / 2) * s, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(depth2, depth)


def test_a_failing_stage_reports_the_service_s_own_error_and_stops(tmp_path: Path, capsys) -> None:
    """A request the service answers with a Failure: the stage's report carries that Failure's
    error word for word (not an error of the bench's own), and no later stage runs."""
    from npbgpp_core import protocol as P
    from npbgpp_core.service import RenderService

    missing = str(tmp_path / "no_such_capture")
    expected = RenderService().handle(P.AggregateBegin(missing, ""))
    assert isinstance(expected, P.Failure) and expected.error
    # Photo Size given: unset, the stage reads the dataset first for the add-on's default
    reports = bbp.run_stages(missing, str(tmp_path / "work"), ["aggregate", "fit"], "0 px", photo_size=2048)
    assert [(r["stage"], r["failure"], r["requests"]) for r in reports] == [("aggregate", expected.error, 1)]
    assert capsys.readouterr().out.count("\n") == 1  # one JSON line: the failed stage's


def test_still_psnr_compares_the_still_with_the_photo_s_centre_rows_at_its_width() -> None:
    """A photo twice the still's width (each pixel repeated 2 x 2, so the area resize gives the
    small photo back exactly) and 4 rows taller at that width: the still is compared with rows 2-7
    of the small photo; 0.1 off everywhere is an MSE of 0.01, 20 dB; the same rows exactly: inf."""
    small = torch.rand(3, 10, 8, generator=torch.Generator().manual_seed(0)) * 0.8
    photo = small.repeat_interleave(2, 1).repeat_interleave(2, 2)
    assert bbp.still_psnr(small[:, 2:8] + 0.1, photo) == pytest.approx(20.0, abs=1e-4)
    assert bbp.still_psnr(small[:, 2:8].clone(), photo) == float("inf")
    assert bbp.still_psnr(small[:, 1:7] + 0.1, photo) < 15  # rows one off: not the same picture


def test_score_stage_gives_each_held_out_views_psnr_against_its_loaded_photo(tmp_path: Path, monkeypatch) -> None:
    """The score stage on a tiny scene's bundle (copied in as the fitted one): one PSNR per held-out
    view, the bundle's render of its camera at the photo's size against the photo as loaded, here
    computed by hand from the squared error; ``--round-resampled off`` sets the fit's switch."""
    from _train_fixtures import make_tiny_scene

    from headless_train.export import main as export_main
    from npbgpp_core import scene_fit
    from npbgpp_core.pretrained import default_weights_path
    from npbgpp_core.scene import NeuralScene

    folder = make_tiny_scene(str(tmp_path / "scene"), views=4, size=24, n_points=300, splits=(2, 0, 2))
    work = tmp_path / "work"
    work.mkdir()
    assert export_main(["--checkpoint", default_weights_path("npbgpp", "object"), "--scene", folder,
                        "--out", str(work / "scene_fitted.npbgpp")]) == 0
    monkeypatch.setattr(scene_fit, "FIT_ROUND_RESAMPLED", True)
    json_path = tmp_path / "r.jsonl"
    assert bbp.main(["run", folder, "--work", str(work), "--stages", "score", "--round-resampled", "off",
                     "--json", str(json_path)]) == 0
    assert scene_fit.FIT_ROUND_RESAMPLED is False
    import json

    (report,) = [json.loads(line) for line in json_path.read_text().splitlines()]
    data = load_scene(folder, require_points=False)
    renderer = NeuralScene.load(str(work / "scene_fitted.npbgpp")).renderer("cpu")
    want = {}
    for i in data.test:
        with torch.no_grad():
            pred = renderer.render(data.views[i].camera).double()
        mse = float(((pred - data.load_image(i).double()) ** 2).mean())
        want[data.views[i].name] = 10 * np.log10(1.0 / mse)
    assert report["held_out_psnr"].keys() == want.keys() and len(want) == 2
    for name, db in want.items():
        assert report["held_out_psnr"][name] == pytest.approx(db, abs=0.01)
    assert report["mean_psnr"] == pytest.approx(sum(report["held_out_psnr"].values()) / 2, abs=1e-3)


@pytest.mark.parametrize("decode", ["whole", "tiles", "encoder"])
def test_extractor_command_reports_one_call(decode: str, capsys, monkeypatch) -> None:
    import json

    from npbgpp_core.models import extractor

    monkeypatch.setattr(extractor, "TILE_ABOVE_SIDE", extractor.TILE_ABOVE_SIDE)  # the command sets it
    assert bbp.main(["extractor", "--size", "96x64", "--decode", decode]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["size"] == "96x64" and report["decode"] == decode and report["peak_rss_above_mib"] >= 0
    assert report["tile_above_side"] == {"whole": sys.maxsize, "tiles": 0}.get(decode, extractor.TILE_ABOVE_SIDE)


def test_run_s_photo_size_is_the_add_on_s_after_import_dataset(tmp_path: Path, monkeypatch) -> None:
    """Unset, run's Photo Size is the add-on's after Import Dataset: the long side most photos have
    (Import Dataset's render) clamped by protocol.photo_size_for_render, the add-on's own rule (here
    with the bounds lowered to 16-20 so that 24-px photos are clamped at 20, cheaply); given, it is
    used as is."""
    from _train_fixtures import make_tiny_scene

    from npbgpp_core import protocol as P

    folder = make_tiny_scene(str(tmp_path / "scene"), views=3, size=24, n_points=200, splits=(3, 0, 0))
    monkeypatch.setattr(P, "AGGREGATE_MAX_SIDE", 16)
    monkeypatch.setattr(P, "AGGREGATE_RENDER_MAX_SIDE", 20)
    (report,) = bbp.run_stages(folder, str(tmp_path / "a"), ["aggregate"], "24 px")
    assert not report["failure"] and report["photo_size"] == 20
    (report,) = bbp.run_stages(folder, str(tmp_path / "b"), ["aggregate"], "24 px", photo_size=18)
    assert not report["failure"] and report["photo_size"] == 18


def test_the_add_on_s_photo_size_of_a_dataset_by_hand() -> None:
    """addon_photo_size on datasets whose photos' sizes (h, w) are given: the size most photos
    have (a tie: the earliest), its long side clamped to [2048, 4096]."""
    from types import SimpleNamespace

    def data(*sizes):
        return SimpleNamespace(views=[SimpleNamespace(camera=SimpleNamespace(image_size=s)) for s in sizes])

    assert bbp.addon_photo_size(data((2160, 3840))) == 3840
    assert bbp.addon_photo_size(data((1080, 1920), (1080, 1920))) == 2048
    assert bbp.addon_photo_size(data((6048, 8064))) == 4096
    assert bbp.addon_photo_size(data((3024, 4032), (2304, 3072), (2304, 3072))) == 3072  # most photos'
    assert bbp.addon_photo_size(data((3024, 2268), (2160, 3840))) == 3024  # a tie: the earliest
