"""A finer environment map for the fit (issue #12): ``resample_map`` against a
hand-computed bilinear resampling, ``fit_coefficients(background_rows=...)`` and the
fitted bundle that records the map's rows."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_background import UP_Z, bin_direction, env_scene, from_weights_file, ring_cameras

from npbgpp_core.models.background import bin_directions, lookup, map_frame, resample_map


@pytest.mark.parametrize("up", [UP_Z, (0.0, 1.0, 0.0), (0.3, -0.5, 0.8)])
def test_bin_directions_are_the_documented_bin_centres(up):
    rows = 4
    frame = map_frame(up)
    got = bin_directions(rows, up)
    assert got.shape == (rows * 2 * rows, 3)
    for r in range(rows):
        for c in range(2 * rows):
            torch.testing.assert_close(got[r * 2 * rows + c], bin_direction(r, c, rows, frame), atol=1e-6, rtol=0)


def reference_resample(old: np.ndarray, rows: int) -> np.ndarray:
    """Bilinear resampling written out: new bin (r, c) sits at old continuous coordinates
    y = (r + 0.5) R / rows - 0.5, x = (c + 0.5) R / rows - 0.5 (R = old rows); columns wrap,
    rows clamp at the poles."""
    ch, R, C = old.shape
    out = np.zeros((ch, rows, 2 * rows))
    for r in range(rows):
        for c in range(2 * rows):
            y, x = (r + 0.5) * R / rows - 0.5, (c + 0.5) * R / rows - 0.5
            y0, x0 = math.floor(y), math.floor(x)
            fy, fx = y - y0, x - x0
            for dy, wy in ((0, 1 - fy), (1, fy)):
                for dx, wx in ((0, 1 - fx), (1, fx)):
                    rr = min(max(y0 + dy, 0), R - 1)
                    out[:, r, c] += wy * wx * old[:, rr, (x0 + dx) % C]
    return out


@pytest.mark.parametrize("rows", [4, 16, 32])
def test_resample_map_is_bilinear_resampling_with_wrap_and_clamped_poles(rows):
    torch.manual_seed(1)
    old = torch.randn(3, 8, 16)
    got = resample_map(old, rows, (0.0, 1.0, 0.0))
    assert got.shape == (3, rows, 2 * rows)
    np.testing.assert_allclose(got.numpy(), reference_resample(old.double().numpy(), rows), atol=2e-5)


def test_same_rows_is_the_map_and_a_finer_map_reads_the_same_at_the_old_bin_centres():
    torch.manual_seed(2)
    old = torch.randn(2, 8, 16)
    torch.testing.assert_close(resample_map(old, 8, UP_Z), old, atol=2e-5, rtol=0)
    # A map linear in the polar bin index (away from the poles, where rows clamp) is
    # reproduced exactly by the finer map: looked up at the old centres it gives the old bins.
    lin = (torch.arange(8, dtype=torch.float32)[:, None] * 0.7 - 1.0).expand(8, 16)[None].clone()
    fine = resample_map(lin, 32, UP_Z)
    dirs = bin_directions(8, UP_Z)
    back = lookup(fine, dirs, UP_Z).T.reshape(1, 8, 16)
    torch.testing.assert_close(back[:, 1:-1], lin[:, 1:-1], atol=1e-5, rtol=0)


def test_resample_map_rejects_bad_rows():
    with pytest.raises(ValueError, match="background_rows must be a power of two in 2..256, got 24"):
        resample_map(torch.zeros(2, 8, 16), 24, UP_Z)


def test_fit_at_finer_rows_starts_from_the_resampled_map_and_the_bundle_keeps_its_rows(tmp_path):
    from npbgpp_core.fitting import FitViews, fit_coefficients
    from npbgpp_core.scene import NeuralScene

    model, scene = env_scene()  # an 8-row map
    model = from_weights_file(model, tmp_path)
    cams = ring_cameras(4, size=(64, 64))
    views = FitViews(torch.rand(4, 3, 64, 64), cams)
    fit = fit_coefficients(model, scene, views, steps=0, background_rows=16)
    assert fit.model.config.background_rows == 16 and model.config.background_rows == 8
    torch.testing.assert_close(fit.model.environment.detach(), resample_map(scene.background, 16, UP_Z))
    same = fit_coefficients(model, scene, views, steps=0)  # None: the map's own rows
    assert torch.equal(same.model.environment.detach(), scene.background)
    fit = fit_coefficients(model, scene, views, steps=2, crop=32, background_rows=16)
    path = str(tmp_path / "fitted.npbgpp")
    NeuralScene.from_npbg(fit.model, scene.points, name="fitted").save(path)
    bundle = NeuralScene.load(path)
    assert bundle.model_config["background_rows"] == 16
    assert torch.equal(bundle.model_state["environment"], fit.model.environment.detach())
    torch.testing.assert_close(bundle.renderer("cpu").render(cams[1]), fit.model.render(scene.points, cams[1]),
                               atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="background_rows must be a power of two in 2..256, got 12"):
        fit_coefficients(model, scene, views, steps=0, background_rows=12)


def test_bench_flag_reaches_the_fit_and_a_bad_value_is_named():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.bench_quality import QualityError, check_fit_options, fit_options, parse_args

    args = parse_args(["--scenes", "x", "--background-rows", "64"])
    assert fit_options(args) == {"background_rows": 64}
    check_fit_options(args)
    with pytest.raises(QualityError, match="background_rows must be a power of two in 2..256, got 48"):
        check_fit_options(parse_args(["--scenes", "x", "--background-rows", "48"]))
