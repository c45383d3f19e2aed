"""Whether a scene's chosen cloud lies where the scene's own reconstruction put its points.

A COLMAP model carries its sparse points (points3D), triangulated from the very photos the
cameras belong to. A cloud the user chooses instead (COLMAP's dense fused.ply, our densify's
dense.ply, a splat file) must lie on the same surfaces in the same frame. Another scene's
cloud, or the same scene from another reconstruction (another frame and scale), does not,
and renders as noise without any error; a projection check cannot tell, since such a cloud
often falls inside every camera's view. So the check is geometric against the model's own
points: the share of them with a chosen-cloud point nearby. Numpy only (the add-on runs it
in Blender's Python)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The neighbourhood is the 3x3x3 block of grid cells around a model point, cells of this
# share of the model points' extent (the diagonal of their 2nd-98th percentile box): a
# cloud point within one cell size always counts, one beyond twice the cell diagonal never.
CELL_SHARE = 0.01
# A chosen cloud "fits" when at least this share of the model's points have a cloud point
# nearby (see BENCHMARKS.md "A chosen cloud checked against the capture's own points").
MIN_FIT_SHARE = 0.7
# Fewer model points than this say too little about where the surfaces are.
MIN_MODEL_POINTS = 30
# Cloud points a check reads at most (a random subset above it; the share hardly moves).
MAX_CLOUD_POINTS = 2_000_000


@dataclass(frozen=True)
class CloudFit:
    """``share`` of the points of the smaller of the two clouds (the scene's own sparse
    ``model_points``, or the chosen cloud when it is the smaller) that have a point of the
    other within about ``cell`` (scene units)."""

    share: float
    model_points: int
    cloud_points: int
    cell: float

    @property
    def fits(self) -> bool:
        return self.share >= MIN_FIT_SHARE


def cloud_fit(cloud: np.ndarray, model_points: np.ndarray, cell_share: float = CELL_SHARE) -> CloudFit | None:
    """How well ``cloud`` (N, 3) and ``model_points`` (M, 3), the scene's own sparse points,
    lie on the same surfaces: the share of the smaller set's points with a point of the larger
    one nearby (a dense cloud covers surfaces the sparse model has no point on, so only that
    direction is fair; a cloud sparser than the model is asked the other way round). None
    when the model has fewer than :data:`MIN_MODEL_POINTS` finite points or no extent.
    Non-finite points of either are ignored."""
    model = np.asarray(model_points, np.float64).reshape(-1, 3)
    model = model[np.isfinite(model).all(axis=1)]
    if len(model) < MIN_MODEL_POINTS:
        return None
    lo, hi = np.percentile(model, 2, axis=0), np.percentile(model, 98, axis=0)
    cell = float(np.linalg.norm(hi - lo)) * cell_share
    if not cell > 0:
        return None
    pts = np.asarray(cloud).reshape(-1, 3)
    if len(pts) > MAX_CLOUD_POINTS:
        # the subset before the float64 copy: a dense cloud of 20M points was held twice more
        pts = pts[np.random.default_rng(0).choice(len(pts), MAX_CLOUD_POINTS, replace=False)]
    pts = pts.astype(np.float64)
    pts = pts[np.isfinite(pts).all(axis=1)]
    if len(pts) == 0:
        return CloudFit(0.0, len(model), 0, cell)
    origin = model.min(axis=0)
    model_cells = np.floor((model - origin) / cell)
    cloud_cells = np.floor((pts - origin) / cell)
    # keys over the model's cells plus a margin of one: cloud cells beyond it neighbour no model
    # cell, so they are dropped from the occupied set, or are misses when the cloud is queried
    base = model_cells.min(axis=0) - 1
    span = model_cells.max(axis=0) - base + 2  # every kept key lies in [0, span) per axis
    if float(np.prod(span)) >= 2.0**62:  # a model this spread out in cells cannot be keyed
        return None
    span_i = span.astype(np.int64)
    inside = ((cloud_cells >= base) & (cloud_cells < base + span)).all(axis=1)

    def keys(c: np.ndarray) -> np.ndarray:
        c = (c - base).astype(np.int64)
        return (c[:, 0] * span_i[1] + c[:, 1]) * span_i[2] + c[:, 2]

    cloud_smaller = len(pts) < len(model)
    occupied = np.unique(keys(model_cells if cloud_smaller else cloud_cells[inside]))
    query = cloud_cells[inside] if cloud_smaller else model_cells
    hit = np.zeros(len(query), bool)
    if len(occupied) and len(query):
        for offset in np.stack(np.meshgrid(*[[-1, 0, 1]] * 3, indexing="ij"), -1).reshape(-1, 3):
            # a query cell at the margin steps one beyond it: a key off the grid, never occupied
            shifted = query + offset
            on_grid = ((shifted >= base) & (shifted < base + span)).all(axis=1)
            k = keys(np.where(on_grid[:, None], shifted, base))
            at = np.minimum(np.searchsorted(occupied, k), len(occupied) - 1)
            hit |= on_grid & (occupied[at] == k)
    queried = len(pts) if cloud_smaller else len(model)  # cloud points off the grid are misses
    return CloudFit(float(hit.sum()) / queried, len(model), len(pts), cell)


def cloud_fit_note(fit: CloudFit | None, cloud: str, model: str) -> str:
    """A warning when ``fit`` says the cloud (named ``cloud``) misses the model's points
    (``model`` names them, e.g. "the COLMAP model <sparse folder>"); "" when it fits or
    cannot be checked."""
    if fit is None or fit.fits:
        return ""
    which = (f"the cloud's {fit.cloud_points} points have a point of the model" if fit.cloud_points < fit.model_points
             else f"the model's {fit.model_points} points have a point of the cloud")
    return (f"{cloud} does not lie where the points of {model} are: only {100 * fit.share:.0f}% of {which} within "
            f"{fit.cell:.3g} scene units. Is it this capture's cloud, in this model's frame? Another scene's cloud, "
            "or one from another reconstruction of these photos, renders as noise")


def scene_cloud_note(scene) -> str:
    """:func:`cloud_fit_note` for a loaded scene (``SceneData``) whose loader kept its
    reconstruction's own points (``metadata["model_points"]``: COLMAP); "" otherwise, and
    when the scene's cloud is those points."""
    import os

    model = scene.metadata.get("model_points")
    if model is None or len(scene.points) == 0:
        return ""
    if np.shape(scene.points) == np.shape(model) and np.array_equal(scene.points, model):
        # the model's own points (no cloud chosen, the default) fit by definition; checking
        # them took seconds for a large sparse model on every load (BENCHMARKS.md)
        return ""
    cloud = scene.metadata.get("point_cloud")
    sparse = scene.metadata.get("sparse")
    return cloud_fit_note(cloud_fit(scene.points, model), os.path.basename(cloud) if cloud else "The cloud",
                          f"the COLMAP model {sparse}" if sparse else "the model")
