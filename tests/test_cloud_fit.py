"""datasets.cloud_fit: a chosen cloud checked against the COLMAP model's own points.

References: a brute-force cell-neighbour count over every pair of points, hand-placed
points at known distances, and clouds sampled from known surfaces (the model's own, another
shape, the same shape in another frame)."""

from __future__ import annotations

import logging
import math
import os

import numpy as np
import pytest
from test_datasets_formats import write_colmap

from npbgpp_core.datasets import load_scene
from npbgpp_core.datasets.cloud_fit import CELL_SHARE, MIN_MODEL_POINTS, cloud_fit, scene_cloud_note
from npbgpp_core.ply import save_ply

RNG = np.random.default_rng(3)


def sphere(n: int, radius: float = 0.4, centre=(0.0, 0.0, 0.0), noise: float = 0.0) -> np.ndarray:
    v = RNG.normal(size=(n, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v * radius + np.asarray(centre) + RNG.normal(size=(n, 3)) * noise


def box_surface(n: int, half: float = 0.4) -> np.ndarray:
    p = RNG.uniform(-half, half, (n, 3))
    p[np.arange(n), RNG.integers(0, 3, n)] = np.where(RNG.uniform(size=n) < 0.5, -half, half)
    return p


def brute_share(cloud: np.ndarray, model: np.ndarray) -> float:
    """The definition, pair by pair: the smaller set's share of points whose grid cell
    (cells of CELL_SHARE x the model's 2nd-98th percentile diagonal, from the model's
    minimum) is within one cell on every axis of a cell of the other set."""
    cell = np.linalg.norm(np.percentile(model, 98, axis=0) - np.percentile(model, 2, axis=0)) * CELL_SHARE
    origin = model.min(axis=0)
    query, other = (cloud, model) if len(cloud) < len(model) else (model, cloud)
    q = np.floor((query - origin) / cell)
    o = np.floor((other - origin) / cell)
    near = (np.abs(q[:, None, :] - o[None, :, :]) <= 1).all(axis=2).any(axis=1)
    return float(near.mean())


@pytest.mark.parametrize("n_cloud", [40, 400, 3000])
def test_share_matches_a_brute_force_cell_neighbour_count(n_cloud):
    """Denser, sparser and far-off clouds: the share equals the pairwise count, in either
    direction (the smaller set is asked), including cloud points beyond the model's box."""
    for seed in range(4):
        rng = np.random.default_rng(seed)
        model = rng.normal(size=(300, 3)) * [1.0, 0.5, 0.2]
        cloud = np.concatenate([model[rng.integers(0, 300, n_cloud // 2)] + rng.normal(size=(n_cloud // 2, 3)) * 0.03,
                                rng.uniform(-4, 4, (n_cloud - n_cloud // 2, 3))])
        fit = cloud_fit(cloud, model)
        assert fit is not None and (fit.model_points, fit.cloud_points) == (300, n_cloud)
        assert fit.share == pytest.approx(brute_share(cloud, model), abs=1e-12)


def test_distances_that_always_and_never_count():
    """A cloud point within one cell of a model point always counts; one beyond twice the
    cell's diagonal never does. The model is a lattice about ten cells apart, so only a
    point's own shifted copy can be near it; far filler makes the cloud the larger set."""
    model = np.stack(np.meshgrid(*[np.arange(7.0)] * 3, indexing="ij"), -1).reshape(-1, 3)
    filler = np.full((400, 3), 500.0)
    cell = cloud_fit(model, model).cell
    assert cell == pytest.approx(np.linalg.norm(np.percentile(model, 98, 0) - np.percentile(model, 2, 0)) * CELL_SHARE)
    assert 4 * math.sqrt(3) * 1.01 * cell < 1.0  # a shifted copy stays out of reach of the other points
    for _ in range(20):
        direction = RNG.normal(size=3)
        direction /= np.linalg.norm(direction)
        for dist, share in ((0.99, 1.0), (2 * math.sqrt(3) * 1.01, 0.0)):
            fit = cloud_fit(np.vstack([filler, model + direction * dist * cell]), model)
            assert fit.share == share, (direction, dist, fit)


def test_clouds_of_the_same_surface_fit_and_others_do_not():
    """A dense or sparse cloud of the model's own surface fits; a cube's surface of the same
    size, the same sphere in another frame (scaled x2, as another reconstruction would
    place it) and another scene's cloud far away do not."""
    model = sphere(3000, noise=0.001)
    assert cloud_fit(sphere(200_000, noise=0.002), model).fits
    assert cloud_fit(sphere(500, noise=0.002), model).fits  # sparser than the model: asked the other way
    for other in (box_surface(200_000), sphere(200_000, radius=0.8), sphere(100_000, centre=(5.0, 0.0, 0.0)),
                  sphere(600, centre=(0.0, 0.0, 3.0))):
        fit = cloud_fit(other, model)
        assert fit is not None and not fit.fits and fit.share < 0.25, fit


def test_a_cloud_above_the_read_limit_is_judged_by_a_random_subset(monkeypatch):
    """A cloud over MAX_CLOUD_POINTS is checked through a random subset of that many points
    (then the smaller set, asked about the model): half of the cloud copies model points
    (always near), the other half lies far off or is not finite, so the subset's share is
    about one half, and its non-finite points are left out of its count."""
    from npbgpp_core.datasets import cloud_fit as module

    monkeypatch.setattr(module, "MAX_CLOUD_POINTS", 1000)
    model = sphere(3000)
    far = sphere(3000, centre=(5.0, 0.0, 0.0))
    far[::100] = np.nan
    cloud = np.vstack([model[RNG.integers(0, 3000, 3000)], far]).astype(np.float32)
    before = cloud.copy()
    fit = cloud_fit(cloud, model)
    assert 950 < fit.cloud_points < 1000 and fit.model_points == 3000
    assert fit.share == pytest.approx(0.5 * 1000 / fit.cloud_points, abs=0.06)
    np.testing.assert_array_equal(cloud, before)


def test_too_few_or_flat_models_are_not_judged_and_non_finite_points_are_ignored():
    assert cloud_fit(sphere(100), sphere(MIN_MODEL_POINTS - 1)) is None
    assert cloud_fit(sphere(100), np.zeros((100, 3))) is None  # no extent
    model = sphere(400)
    dirty = np.vstack([model, [[np.nan, 0, 0], [np.inf, 1, 1]]])
    assert cloud_fit(dirty, dirty).share == 1.0 and cloud_fit(dirty, dirty).model_points == 400
    assert cloud_fit(np.zeros((0, 3)), model).share == 0.0


@pytest.fixture
def colmap_sphere(tmp_path):
    """A COLMAP model whose points3D lie on a sphere, with the dense cloud of that sphere
    and another scene's cloud (a box three times as large) beside it."""
    root = str(tmp_path / "capture")
    write_colmap(root, binary=True, points=sphere(300, radius=0.3))
    save_ply(os.path.join(root, "dense.ply"), sphere(20_000, radius=0.3, noise=0.001).astype(np.float32))
    save_ply(os.path.join(root, "other.ply"), box_surface(20_000, half=0.9).astype(np.float32))
    save_ply(os.path.join(root, "far.ply"), sphere(100, radius=0.3, centre=(2.0, 0.0, 0.0)).astype(np.float32))
    return root


def test_colmap_loader_keeps_its_model_and_the_note_names_a_misplaced_cloud(colmap_sphere):
    own = load_scene(colmap_sphere)
    np.testing.assert_allclose(own.metadata["model_points"], own.points)
    assert scene_cloud_note(own) == ""
    assert scene_cloud_note(load_scene(colmap_sphere, pc_name="dense.ply")) == ""
    other = load_scene(colmap_sphere, pc_name="other.ply")
    note = scene_cloud_note(other)
    sparse = other.metadata["sparse"]
    assert note.startswith(f"other.ply does not lie where the points of the COLMAP model {sparse} are")
    assert "% of the model's 300 points have a point of the cloud within" in note and "another reconstruction" in note
    small = load_scene(colmap_sphere, pc_name="far.ply")
    assert "% of the cloud's 100 points have a point of the model within" in scene_cloud_note(small)


def test_the_models_own_points_are_not_checked_against_themselves(colmap_sphere, monkeypatch):
    """No cloud chosen (the default for every COLMAP load): the scene's points are the
    model's, which fit by definition; the check, seconds for a large sparse model, is not
    run. A chosen cloud, or the model's points subsampled, still is."""
    from npbgpp_core.datasets import cloud_fit as module

    calls = []
    real = module.cloud_fit
    monkeypatch.setattr(module, "cloud_fit", lambda *a, **k: calls.append(1) or real(*a, **k))
    own = load_scene(colmap_sphere)
    assert scene_cloud_note(own) == "" and calls == []
    assert scene_cloud_note(own.subsample_points(100, seed=0)) == "" and calls == [1]
    assert scene_cloud_note(load_scene(colmap_sphere, pc_name="other.ply")) != "" and calls == [1, 1]


def test_read_dataset_and_aggregation_dataset_carry_the_note(colmap_sphere):
    """The add-on's two ways to a cloud: Import Dataset's Point Cloud (read_dataset, also
    subsampled) and Aggregate's Dataset Points (with_points, which now names its file)."""
    from npbgpp_core import protocol as P
    from npbgpp_core.service import RenderService, aggregation_dataset

    service = RenderService()
    summary = service.read_dataset(P.ReadDataset(colmap_sphere, pc_name="other.ply", max_points=500))
    assert summary.cloud_note.startswith("other.ply does not lie where")
    assert service.read_dataset(P.ReadDataset(colmap_sphere, pc_name="dense.ply")).cloud_note == ""
    data = aggregation_dataset(P.AggregateBegin(colmap_sphere, "", points=os.path.join(colmap_sphere, "other.ply")))
    assert data.metadata["point_cloud"] == os.path.join(colmap_sphere, "other.ply")
    assert scene_cloud_note(data).startswith("other.ply does not lie where")


def test_training_scenes_warn_of_a_misplaced_cloud(colmap_sphere, caplog):
    from headless_train.data import load_scenes

    with caplog.at_level(logging.WARNING, logger="headless_train.data"):
        load_scenes({"data_root": os.path.dirname(colmap_sphere), "scene_names": ["capture"],
                     "pc_name": "other.ply"}, None)
    assert any("scene capture: other.ply does not lie where" in r.getMessage() for r in caplog.records), caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="headless_train.data"):
        load_scenes({"data_root": os.path.dirname(colmap_sphere), "scene_names": ["capture"],
                     "pc_name": "dense.ply"}, None)
    assert "does not lie where" not in caplog.text
