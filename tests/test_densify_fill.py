"""Fill of texture-poor regions in dense clouds (npbgpp_core.densify, ``fill=True``) on the
analytic scene of ``_mvs_scene``: a flat-coloured disc on the textured floor, which plane
sweep cannot match inside."""

from __future__ import annotations

import math

import pytest
import torch
from _mvs_scene import FLOOR_Z, render, ring_cameras, sphere_samples, surface_distance

from npbgpp_core.densify import (
    DensifyError,
    DensifyJob,
    DensifyOptions,
    densify_views,
    fill_points,
    main,
    plane_fill,
)

DISC = (1.5 * math.cos(math.radians(-50)), 1.5 * math.sin(math.radians(-50)), 0.45)


@pytest.fixture(scope="module")
def disc_ring():
    cams = ring_cameras(6, size=(120, 160))
    return cams, [render(c, flat=DISC) for c in cams]


def _on_disc(points: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    p = torch.as_tensor(points)
    return torch.hypot(p[:, 0] - DISC[0], p[:, 1] - DISC[1]) <= DISC[2] - margin


def _disc_pixels(cam, depth: torch.Tensor) -> torch.Tensor:
    """Pixels (H, W) whose true surface point lies on the disc."""
    from npbgpp_core.densify import _cam, _rays, _unproject

    c = _cam(cam, torch.device("cpu"))
    X = _unproject(c, _rays(c), depth.reshape(-1))
    return (_on_disc(X.T) & (depth.reshape(-1) > 0) & ((X[2] - FLOOR_Z).abs() < 1e-3)).reshape(depth.shape)


def test_plane_fill_is_exact_on_a_plane(disc_ring):
    """Inverse depth of a plane is affine in pixel coordinates: the fit to exact floor
    depths around the disc gives back the floor's depth inside it (to float32 rounding),
    and pixels beyond the support (the empty sky) stay empty."""
    cams, views = disc_ring
    for k in (2, 4):
        true = views[k][1]
        hole = _disc_pixels(cams[k], true)
        assert hole.sum() > 300
        valid = (true > 0) & ~hole
        filled = plane_fill(torch.where(valid, true, 0.0), valid, max_window=120, fit_tolerance=0.01)
        got = filled[hole] > 0
        assert got.float().mean() > 0.95
        rel = ((filled[hole] - true[hole]).abs() / true[hole])[got]
        assert float(rel.max()) < 1e-4
        # Rows of sky far above the floor's far edge: no plane reaches them.
        assert (filled[:10] == 0).all()
        assert (filled[valid] == 0).all()  # valid pixels are not touched


def _consistent_true(views):
    depths = torch.stack([v[1] for v in views])
    images = torch.stack([v[0] for v in views])
    return depths, images


def test_fill_points_lie_on_the_disc_and_wrong_views_are_outvoted(disc_ring):
    cams, views = disc_ring
    depths, images = _consistent_true(views)
    holes = torch.stack([_disc_pixels(c, v[1]) for c, v in zip(cams, views, strict=True)])
    consistent = (depths > 0) & ~holes
    partners = [[j for j in range(len(cams)) if j != i] for i in range(len(cams))]
    opt = DensifyOptions(fill=True, fill_stride=1)
    cloud = fill_points(cams, depths, consistent, images, partners, opt)
    p = torch.as_tensor(cloud.points)
    assert len(cloud) > 300
    disc = _on_disc(p, margin=-0.02)
    assert float(disc.float().mean()) > 0.98  # the hole is filled ...
    assert float((p[disc, 2] - FLOOR_Z).abs().max()) < 1e-3
    # ... and a few sky pixels along the sphere's outline, from the sphere's own plane.
    assert bool((surface_distance(p[~disc]) < 0.01).all())
    # Colours: the disc's own colour.
    inner = _on_disc(p, margin=0.03)  # the rim mixes in the floor (anti-aliasing)
    assert float((torch.as_tensor(cloud.colors)[inner] - torch.tensor([0.55, 0.45, 0.35])).abs().max()) < 0.02
    # One view's depths 10% too deep: its fill plane is wrong, the others do not agree,
    # and its points never enter the cloud (the others still fill the disc).
    bad = depths.clone()
    bad[3] *= 1.1
    cloud_bad = fill_points(cams, bad, consistent, images, partners, opt)
    pb = torch.as_tensor(cloud_bad.points)
    assert len(cloud_bad) > 0.5 * len(cloud)
    assert float(surface_distance(pb).max()) < 1e-2
    assert float((pb[_on_disc(pb, margin=-0.02), 2] - FLOOR_Z).abs().max()) < 1e-3
    # Fewer agreeing views than asked for: nothing.
    none = fill_points(cams, depths, consistent, images, [[j] for j in range(1, 6)] + [[0]],
                       DensifyOptions(fill=True, fill_min_views=2))
    assert len(none) == 0


def test_fill_rejects_planes_across_depth_steps():
    """A textureless world (one colour everywhere, so colour cannot decide): a band of
    rows without depth crosses the sphere's outline and the floor behind it. Planes fitted
    across the step, or views that disagree, must not add points between sphere and floor."""
    cams = ring_cameras(6, size=(120, 160))
    views = [render(c, supersample=1) for c in cams]
    depths = torch.stack([v[1] for v in views])
    images = torch.full((6, 3, 120, 160), 0.5)
    consistent = depths > 0
    consistent[:, 60:80] = False
    partners = [[j for j in range(6) if j != i] for i in range(6)]
    cloud = fill_points(cams, depths, consistent, images, partners, DensifyOptions(fill=True, fill_stride=1))
    d = surface_distance(torch.as_tensor(cloud.points))
    assert len(cloud) > 1000
    # Within 1% of the viewing distance (about 4): nothing in the gap.
    assert float((d > 0.04).float().mean()) < 0.005, float((d > 0.04).float().mean())


def test_densify_with_fill_covers_the_disc(disc_ring):
    cams, views = disc_ring
    images = [v[0] for v in views]
    sparse = sphere_samples(300).numpy()
    plain = densify_views(images, cams, None, sparse, DensifyOptions(), device="cpu")
    filled = densify_views(images, cams, None, sparse, DensifyOptions(fill=True, fill_stride=2), device="cpu")
    n = len(plain)
    # Fill only adds points after the stereo ones: those are unchanged.
    assert torch.equal(torch.as_tensor(filled.points[:n]), torch.as_tensor(plain.points))
    assert torch.equal(torch.as_tensor(filled.colors[:n]), torch.as_tensor(plain.colors))
    extra = torch.as_tensor(filled.points[n:])
    inner_plain = int(_on_disc(torch.as_tensor(plain.points), margin=0.1).sum())
    inner_fill = int(_on_disc(extra, margin=0.1).sum())
    assert inner_fill > 3 * max(inner_plain, 10), (inner_plain, inner_fill)
    assert int(_on_disc(extra, margin=-0.05).sum()) >= 0.9 * len(extra)  # the disc and its rim
    on = _on_disc(extra, margin=0.05)
    # Fill depths are as good as the stereo depths around the disc they come from: those
    # are biased near the flat rim (the stereo points on the disc are off by 0.044 in the
    # median). Half the fill points lie within 1% of the viewing distance (about 3.5).
    err = (extra[on, 2] - FLOOR_Z).abs()
    stereo = torch.as_tensor(plain.points)
    stereo_err = (stereo[_on_disc(stereo, margin=0.05), 2] - FLOOR_Z).abs()
    assert float(err.median()) < min(0.035, float(stereo_err.median())), (err.median(), stereo_err.median())


def test_fill_options_and_cli(tmp_path, disc_ring, capsys):
    img = torch.rand(3, 40, 60)
    cams = ring_cameras(2, size=(40, 60))
    for bad, match in [({"fill_stride": 0}, "fill_stride"), ({"fill_min_views": 0}, "fill_min_views"),
                       ({"fill_max_window": 1.5}, "fill_max_window"), ({"fill_texture": 0.0}, "fill_texture"),
                       ({"fill_color_tolerance": float("nan")}, "fill_color_tolerance"),
                       ({"fill_depth_tolerance": -1.0}, "fill_depth_tolerance")]:
        with pytest.raises(DensifyError, match=match):
            densify_views([img, img], cams, options=DensifyOptions(fill=True, **bad), device="cpu")
    from _mvs_scene import write_nerf

    from npbgpp_core.datasets import load_scene

    cams, views = disc_ring
    write_nerf(tmp_path / "scene", cams, views, sphere_only_alpha=False)
    assert main([str(tmp_path / "scene"), "--out", str(tmp_path / "x.ply"), "--fill-stride", "0"]) == 2
    assert "--fill-stride" in capsys.readouterr().err and not (tmp_path / "x.ply").exists()
    scene = load_scene(tmp_path / "scene")
    assert DensifyJob(scene, options=DensifyOptions(fill=True)).total == 5 * len(cams)
    assert DensifyJob(scene, options=DensifyOptions(fill=False)).total == 3 * len(cams)


def test_service_passes_fill_to_the_job(tmp_path, disc_ring):
    """The add-on's Densify Points sends its Fill option through the worker protocol."""
    from _mvs_scene import write_nerf

    from npbgpp_core import protocol as P
    from npbgpp_core.densify import DensifyOptions as Opt
    from npbgpp_core.service import RenderService

    cams, views = disc_ring
    write_nerf(tmp_path / "scene", cams, views, sphere_only_alpha=False)
    service = RenderService()
    assert P.DensifyBegin(str(tmp_path / "scene")).fill == Opt.fill  # one default
    on = service.handle(P.DensifyBegin(str(tmp_path / "scene"), device="CPU", fill=True))
    assert isinstance(on, P.DensifyProgress) and on.total == 5 * len(cams)
    off = service.handle(P.DensifyBegin(str(tmp_path / "scene"), device="CPU", fill=False))
    assert isinstance(off, P.DensifyProgress) and off.total == 3 * len(cams)

