"""Blender-rendered scenes: the written cameras agree with Blender's own projection
(world_to_camera_view), the point cloud lies on the mesh surfaces (BVHTree), and point
colours come from the materials. One small render per test session (module fixture)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

bpy = pytest.importorskip("bpy")

from _geometry_nodes import collection_on_points_tree, nodes_modifier  # noqa: E402
from bpy_extras.object_utils import world_to_camera_view  # noqa: E402
from mathutils import Matrix, Vector  # noqa: E402
from mathutils.bvhtree import BVHTree  # noqa: E402

from blender_addon.camera_bridge import opencv_intrinsics  # noqa: E402
from blender_addon.datagen.procedural import remove_scene  # noqa: E402
from blender_addon.datagen.render import render_procedural_scene, render_views_of_current_scene  # noqa: E402
from blender_addon.srgb import srgb_to_linear  # noqa: E402
from npbgpp_core.datasets import load_scene  # noqa: E402

pytestmark = pytest.mark.blender
H, W = 48, 64


def _world_meshes(scene) -> list[tuple[np.ndarray, list[tuple[int, ...]]]]:
    """World-space vertices and polygons of the scene's evaluated meshes (done here with
    plain bpy/mathutils calls, independent of the module under test)."""
    with bpy.context.temp_override(scene=scene, view_layer=scene.view_layers[0]):
        dg = bpy.context.evaluated_depsgraph_get()
    out = []
    for obj in scene.objects:
        if obj.type != "MESH":
            continue
        ev = obj.evaluated_get(dg)
        mesh = ev.to_mesh()
        verts = np.array([tuple(ev.matrix_world @ v.co) for v in mesh.vertices])
        polys = [tuple(p.vertices) for p in mesh.polygons]
        ev.to_mesh_clear()
        out.append((verts, polys))
    return out


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("blender") / "thin_table")
    summary = render_procedural_scene(
        "thin_table", out, views=4, size=(H, W), seed=3, keep_scene=True, keep_camera=True, samples=8,
        points=3000, val_views=1, test_views=1,
    )
    scene = bpy.data.scenes[summary.extra["scene"]]
    yield summary, scene
    cam = bpy.data.objects.get(summary.camera_object)
    if cam is not None:
        bpy.data.objects.remove(cam)
    remove_scene(scene)


def test_layout_and_splits(rendered):
    summary, _ = rendered
    data = load_scene(summary.out_dir)
    assert data.format == "nerf_synthetic"
    assert (len(data.train), len(data.val), len(data.test)) == (2, 1, 1)
    assert data.points.shape == (3000, 3) and data.colors is not None
    for i in range(len(data.views)):
        assert data.views[i].camera.image_size == (H, W)
        alpha = data.load_mask(i)
        assert 0.02 < float(alpha.mean()) < 0.98  # the object is in view and does not fill it


def test_cameras_match_world_to_camera_view(rendered):
    summary, scene = rendered
    data = load_scene(summary.out_dir)
    cam_obj = bpy.data.objects[summary.camera_object]
    scene.render.resolution_x, scene.render.resolution_y, scene.render.resolution_percentage = W, H, 100
    verts = np.concatenate([v for v, _ in _world_meshes(scene)])
    frames = []
    for split in ("train", "val", "test"):
        with open(os.path.join(summary.out_dir, f"transforms_{split}.json")) as f:
            frames += json.load(f)["frames"]
    assert len(frames) == len(data.views) == 4
    for view, frame in zip(data.views, frames, strict=True):
        cam_obj.matrix_world = Matrix(frame["transform_matrix"])
        ref = np.array([tuple(world_to_camera_view(scene, cam_obj, Vector(p))) for p in verts])
        expected = np.stack([ref[:, 0] * W - 0.5, (1.0 - ref[:, 1]) * H - 0.5], axis=1)
        uv, depth = view.camera.project(torch.as_tensor(verts, dtype=torch.float64))
        np.testing.assert_allclose(uv.double().numpy(), expected, atol=1e-3, rtol=0)
        np.testing.assert_allclose(depth.double().numpy(), ref[:, 2], rtol=1e-5)


def test_points_lie_on_surfaces_and_inside_silhouettes(rendered):
    summary, scene = rendered
    data = load_scene(summary.out_dir)
    trees = [BVHTree.FromPolygons([tuple(v) for v in verts], polys) for verts, polys in _world_meshes(scene)]
    dist = np.array([min(t.find_nearest(Vector(p))[3] for t in trees) for p in data.points.astype(np.float64)])
    assert dist.max() < 1e-4  # scene radius ~1; quads may triangulate differently
    # every point projects onto (or next to) the rendered object
    for i in range(len(data.views)):
        uv, _ = data.views[i].camera.project(torch.as_tensor(data.points))
        cols, rows = np.round(uv.numpy()).astype(int).T
        inside = (cols >= 0) & (cols < W) & (rows >= 0) & (rows < H)
        alpha = np.pad(data.load_mask(i)[0].numpy(), 1)
        # thin parts (legs ~0.3 px wide here) may miss their own pixel: allow a 1-pixel neighbourhood
        near = np.max([alpha[1 + dr : 1 + dr + H, 1 + dc : 1 + dc + W] for dr in (-1, 0, 1) for dc in (-1, 0, 1)], 0)
        assert inside.mean() > 0.99
        assert (near[rows[inside], cols[inside]] > 0).mean() > 0.995


def test_point_colors_from_texture_vertex_colors_and_constant(tmp_path):
    import bmesh

    scene = bpy.data.scenes.new("color_check")
    # plane z=0 over [-1,1]^2, UV = ((x+1)/2, (y+1)/2), image texture colour = (u, v, 0.5) in sRGB
    n = 256
    img = bpy.data.images.new("grad", n, n, alpha=False)
    yy, xx = np.mgrid[0:n, 0:n]
    rgba = np.stack([(xx + 0.5) / n, (yy + 0.5) / n, np.full((n, n), 0.5), np.ones((n, n))], axis=2)
    img.pixels.foreach_set(rgba.astype(np.float32).ravel())  # bottom row first: row index = v
    tex_mat = bpy.data.materials.new("tex")
    if tex_mat.node_tree is None:  # Blender < 5 creates node trees on request
        tex_mat.use_nodes = True
    tex = tex_mat.node_tree.nodes.new("ShaderNodeTexImage")
    tex.image = img
    tex.extension = "EXTEND"
    bsdf = tex_mat.node_tree.nodes["Principled BSDF"]
    tex_mat.node_tree.links.new(tex.outputs["Color"], bsdf.inputs["Base Color"])
    bm = bmesh.new()
    uv_layer = bm.loops.layers.uv.new("UVMap")
    vs = [bm.verts.new(c) for c in ((-1, -1, 0), (1, -1, 0), (1, 1, 0), (-1, 1, 0))]
    face = bm.faces.new(vs)
    for loop in face.loops:
        loop[uv_layer].uv = ((loop.vert.co.x + 1) / 2, (loop.vert.co.y + 1) / 2)
    plane = bpy.data.meshes.new("plane")
    bm.to_mesh(plane)
    bm.free()
    plane.materials.append(tex_mat)
    scene.collection.objects.link(bpy.data.objects.new("plane", plane))
    # a second plane at z=1 with vertex colours linear in position (given as sRGB)
    vc = bpy.data.meshes.new("vc")
    vc.from_pydata([(-1, -1, 1), (1, -1, 1), (1, 1, 1), (-1, 1, 1)], [], [(0, 1, 2, 3)])
    attr = vc.color_attributes.new("Col", "FLOAT_COLOR", "POINT")
    srgb = np.array([[0.1, 0.2, 0.9], [0.9, 0.2, 0.1], [0.5, 0.8, 0.3], [0.3, 0.6, 0.7]])
    linear_rgba = np.concatenate([srgb_to_linear(srgb, np.float64), np.ones((4, 1))], 1).astype(np.float32)
    attr.data.foreach_set("color", linear_rgba.ravel())
    vc_mat = bpy.data.materials.new("vcmat")
    if vc_mat.node_tree is None:  # Blender < 5 creates node trees on request
        vc_mat.use_nodes = True
    node = vc_mat.node_tree.nodes.new("ShaderNodeVertexColor")
    node.layer_name = "Col"
    vc_mat.node_tree.links.new(node.outputs["Color"], vc_mat.node_tree.nodes["Principled BSDF"].inputs["Base Color"])
    vc.materials.append(vc_mat)
    scene.collection.objects.link(bpy.data.objects.new("vc", vc))
    # a third plane at z=2 with a constant base colour
    const = bpy.data.meshes.new("const")
    const.from_pydata([(-1, -1, 2), (1, -1, 2), (1, 1, 2), (-1, 1, 2)], [], [(0, 1, 2, 3)])
    c_mat = bpy.data.materials.new("cmat")
    if c_mat.node_tree is None:  # Blender < 5 creates node trees on request
        c_mat.use_nodes = True
    c_mat.node_tree.nodes["Principled BSDF"].inputs["Base Color"].default_value = (0.2, 0.05, 0.6, 1.0)
    const.materials.append(c_mat)
    scene.collection.objects.link(bpy.data.objects.new("const", const))

    summary = render_views_of_current_scene(scene, str(tmp_path / "out"), views=2, size=(8, 8), samples=1,
                                            points=3000, val_views=0, test_views=0, seed=1)
    data = load_scene(summary.out_dir)
    p, c = data.points.astype(np.float64), data.colors.astype(np.float64)
    on = {z: np.abs(p[:, 2] - z) < 1e-6 for z in (0, 1, 2)}
    assert all(m.sum() > 500 for m in on.values())
    tol = 0.5 / 255 + 1e-3  # colours are stored as 8-bit
    u, v = (p[on[0], 0] + 1) / 2, (p[on[0], 1] + 1) / 2
    np.testing.assert_allclose(c[on[0]], np.stack([u, v, np.full_like(u, 0.5)], 1), atol=tol + 1.0 / n)
    # bilinear interpolation of the four corner colours (a planar quad split into triangles:
    # the colour is barycentric per triangle, exact for colours affine in position only,
    # so compare per triangle using the triangle's three corners)
    x, y = p[on[1], 0], p[on[1], 1]
    corners = np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], float)
    got = c[on[1]]
    ok = 0
    for tri in ((0, 1, 2), (0, 2, 3), (0, 1, 3), (1, 2, 3)):
        A = np.column_stack([corners[list(tri)], np.ones(3)])
        bary = np.linalg.solve(A.T, np.stack([x, y, np.ones_like(x)]))
        inside = (bary > -1e-9).all(axis=0)
        pred = bary.T @ srgb[list(tri)]
        ok = np.maximum(ok, (inside & (np.abs(pred - got).max(axis=1) < tol)).astype(int))
    assert ok.mean() > 0.999
    expected_const = np.where(np.array([0.2, 0.05, 0.6]) <= 0.0031308, np.array([0.2, 0.05, 0.6]) * 12.92,
                              1.055 * np.array([0.2, 0.05, 0.6]) ** (1 / 2.4) - 0.055)
    np.testing.assert_allclose(c[on[2]], np.broadcast_to(expected_const, c[on[2]].shape), atol=tol)
    remove_scene(scene)


@pytest.mark.parametrize(
    "fit, res, shift, aspect",
    [("AUTO", (64, 48), (0, 0), (1, 1)), ("AUTO", (40, 70), (0.1, -0.05), (1, 1)),
     ("VERTICAL", (64, 48), (-0.2, 0.1), (1, 1)), ("HORIZONTAL", (50, 80), (0.05, 0.2), (1, 1)),
     ("AUTO", (60, 40), (0.1, 0.1), (2, 1))],
)
def test_intrinsics_match_blender(fit, res, shift, aspect):
    scene = bpy.data.scenes.new("intr")
    cam_data = bpy.data.cameras.new("c")
    cam_data.sensor_fit, cam_data.lens, cam_data.sensor_height = fit, 30.0, 20.0
    cam_data.shift_x, cam_data.shift_y = shift
    cam = bpy.data.objects.new("c", cam_data)
    cam.matrix_world = Matrix.Translation((0.2, -0.1, 4.0))
    scene.collection.objects.link(cam)
    r = scene.render
    r.resolution_x, r.resolution_y, r.resolution_percentage = *res, 100
    r.pixel_aspect_x, r.pixel_aspect_y = aspect
    K = opencv_intrinsics(cam_data.lens, cam_data.sensor_width, cam_data.sensor_height, cam_data.sensor_fit,
                          cam_data.shift_x, cam_data.shift_y, *res, *aspect)
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    pts = np.random.default_rng(0).uniform(-1, 1, (20, 3))
    for p in pts:
        x, y, z = world_to_camera_view(scene, cam, Vector(p))
        rel = np.array(p) - np.array([0.2, -0.1, 4.0])  # camera looks down -Z, up +Y
        u = fx * rel[0] / -rel[2] + cx
        v = fy * -rel[1] / -rel[2] + cy
        assert math.isclose(u, x * res[0] - 0.5, abs_tol=1e-3)
        assert math.isclose(v, (1 - y) * res[1] - 0.5, abs_tol=1e-3)
    bpy.data.objects.remove(cam)
    bpy.data.cameras.remove(cam_data)
    bpy.data.scenes.remove(scene)


def test_every_procedural_scene_builds_and_random_is_seeded():
    from blender_addon.datagen import PROCEDURAL_SCENES
    from blender_addon.datagen.procedural import build_procedural_scene
    from blender_addon.datagen.surface_points import sample_surface_points

    assert len(PROCEDURAL_SCENES) >= 6
    for name in PROCEDURAL_SCENES:
        scene = build_procedural_scene(name)
        assert sum(o.type == "MESH" for o in scene.objects) >= 2, name
        remove_scene(scene)
    clouds = []
    for _ in range(2):
        scene = build_procedural_scene("random_17")
        clouds.append(sample_surface_points(scene, 500, seed=2))
        remove_scene(scene)
    np.testing.assert_array_equal(clouds[0][0], clouds[1][0])
    np.testing.assert_array_equal(clouds[0][1], clouds[1][1])
    other = build_procedural_scene("random_18")
    assert not np.array_equal(sample_surface_points(other, 500, seed=2)[0], clouds[0][0])
    remove_scene(other)
    with pytest.raises(ValueError, match="unknown procedural scene"):
        build_procedural_scene("nope")


def _quad(x: float, name: str, collection) -> bpy.types.Object:
    """A 0.5-wide quad centred at (x, 0, 0), in ``collection``: a point's x says which quad it is on."""
    me = bpy.data.meshes.new(name)
    me.from_pydata([(x - 0.25, -0.25, 0.0), (x + 0.25, -0.25, 0.0), (x + 0.25, 0.25, 0.0), (x - 0.25, 0.25, 0.0)],
                   [], [(0, 1, 2, 3)])
    obj = bpy.data.objects.new(name, me)
    collection.objects.link(obj)
    return obj


def _tube(x: float, z: float, name: str, collection) -> bpy.types.Object:
    """A bevelled curve (radius 0.05) from (x, -0.2, z) to (x, 0.2, z), in ``collection``: Blender
    evaluates it to a mesh of its own; remove it with :func:`_remove_tube`."""
    curve = bpy.data.curves.new(name, "CURVE")
    curve.dimensions, curve.bevel_depth = "3D", 0.05
    spline = curve.splines.new("POLY")
    spline.points.add(1)
    spline.points[0].co, spline.points[1].co = (x, -0.2, z, 1.0), (x, 0.2, z, 1.0)
    tube = bpy.data.objects.new(name, curve)
    collection.objects.link(tube)
    return tube


def _remove_tube(tube) -> None:
    """Remove a curve of :func:`_tube` and its curve data (:func:`_remove_test_scene` removes only meshes')."""
    curve = tube.data
    bpy.data.objects.remove(tube)
    bpy.data.curves.remove(curve)


def _remove_test_scene(scene, collections) -> None:
    """Remove a test's ``scene``, its own ``collections`` and the objects and meshes in them."""
    for c in (scene.collection, *collections):
        for obj in list(c.objects):
            data = obj.data
            bpy.data.objects.remove(obj)
            if data is not None:
                bpy.data.meshes.remove(data)
    for c in collections:
        bpy.data.collections.remove(c)
    bpy.data.scenes.remove(scene)


def test_scene_points_only_on_what_a_render_shows_directly():
    """The scene's point cloud samples only surfaces a render shows: a quad in a Holdout
    collection (a hole in the photos), an Indirect Only one, one disabled in renders by its
    collection or its own flag, an excluded one, a Holdout object, one hidden from camera
    rays and a particle emitter whose Show Emitter is off (Cycles skips it: the depsgraph
    entry's show_self) give no points; a collection instance counts by its instancer's flags. Each quad
    sits at its own x, so a point's x says which it came from."""
    from blender_addon.datagen.surface_points import sample_surface_points

    scene = bpy.data.scenes.new("layer_flags")
    layer = scene.view_layers[0].layer_collection
    collections = {}
    for name in ("Plain", "Holdout", "Indirect", "NoRender", "Excluded", "Source"):
        collections[name] = bpy.data.collections.new(f"lf_{name}")
        scene.collection.children.link(collections[name])

    def quad(x: float, where: str, name: str) -> bpy.types.Object:
        return _quad(x, name, collections[where])

    quad(0.0, "Plain", "lf_plain")
    quad(1.0, "Holdout", "lf_holdout")
    quad(2.0, "Indirect", "lf_indirect")
    quad(3.0, "NoRender", "lf_norender")
    quad(4.0, "Excluded", "lf_excluded")
    quad(5.0, "Plain", "lf_object_holdout").is_holdout = True
    quad(6.0, "Plain", "lf_no_camera_rays").visible_camera = False
    emitter = quad(8.0, "Plain", "lf_emitter_not_shown")  # emits particles drawn as nothing; Show Emitter off
    emitter.modifiers.new("lf_particles", "PARTICLE_SYSTEM")
    particles = emitter.particle_systems[0].settings
    particles.render_type = "NONE"
    emitter.show_instancer_for_viewport = emitter.show_instancer_for_render = False
    quad(7.0, "Source", "lf_source")  # drawn only through instances, 10 and 20 to its right
    for where, dx in (("Plain", 10.0), ("Holdout", 20.0)):
        empty = bpy.data.objects.new(f"lf_instance_{where}", None)
        empty.instance_type, empty.instance_collection = "COLLECTION", collections["Source"]
        empty.location.x = dx
        collections[where].objects.link(empty)
    layer.children["lf_Holdout"].holdout = True
    layer.children["lf_Indirect"].indirect_only = True
    collections["NoRender"].hide_render = True
    layer.children["lf_Excluded"].exclude = True
    layer.children["lf_Source"].exclude = True
    try:
        points, _ = sample_surface_points(scene, 4000, seed=1)
        centres = np.round(points[:, 0]).astype(int)
        assert sorted(set(centres.tolist())) == [0, 17], np.unique(centres)  # the plain quad, the Plain instance
        assert (np.abs(points[:, 0] - centres) <= 0.25 + 1e-5).all()
        assert np.abs(points[:, 2]).max() < 1e-6
        layer.children["lf_Holdout"].holdout = False  # the flag, not the collection, left them out
        points, _ = sample_surface_points(scene, 4000, seed=1)
        assert sorted(set(np.round(points[:, 0]).astype(int).tolist())) == [0, 1, 17, 27]
    finally:
        _remove_test_scene(scene, list(collections.values()))
        bpy.data.particles.remove(particles)


def test_scene_points_on_instances_of_a_source_disabled_in_renders():
    """Scattering an object disabled in renders (the usual way: its particles' or Geometry Nodes'
    instances render, it does not) gives points on its instances, as the photos show them (the
    instanced object's own flag left them out: a scene of such instances had no surfaces at
    all); a collection instance's object disabled in renders still gives none (renders leave it
    out), nor does a child disabled in renders that its parent instances at its vertices. The
    source quad sits at x 0, the emitter's particles at x 10 (the emitter not shown: Show
    Emitter off), the collection instance's hidden quad at 20 and its shown one at 30, the
    parent's vertices near 40."""
    from blender_addon.datagen.surface_points import sample_surface_points

    scene = bpy.data.scenes.new("hidden_sources")
    main, kit = bpy.data.collections.new("hs_main"), bpy.data.collections.new("hs_kit")
    scene.collection.children.link(main)
    source = _quad(0.0, "hs_source", main)
    source.hide_render = True
    emitter = _quad(10.0, "hs_emitter", main)
    emitter.modifiers.new("hs_particles", "PARTICLE_SYSTEM")
    particles = emitter.particle_systems[0].settings
    particles.type, particles.count, particles.render_type = "HAIR", 5, "OBJECT"
    particles.instance_object, particles.particle_size = source, 0.5
    emitter.show_instancer_for_viewport = emitter.show_instancer_for_render = False
    grid = _quad(40.0, "hs_grid", main)  # instances its child at its vertices, itself not shown
    grid.instance_type = "VERTS"
    grid.show_instancer_for_viewport = grid.show_instancer_for_render = False
    child = _quad(0.0, "hs_child", main)
    child.parent, child.hide_render = grid, True  # renders instance it nowhere (measured)
    _quad(20.0, "hs_kit_hidden", kit).hide_render = True
    _quad(30.0, "hs_kit_shown", kit)
    instancer = bpy.data.objects.new("hs_instancer", None)
    instancer.instance_type, instancer.instance_collection = "COLLECTION", kit
    main.objects.link(instancer)
    try:
        points, _ = sample_surface_points(scene, 2000, seed=3)
        assert sorted(set(np.round(points[:, 0] / 10.0).astype(int).tolist())) == [1, 3], np.unique(
            np.round(points[:, 0]))
        assert (np.abs(points[:, 0] - np.round(points[:, 0] / 10.0) * 10.0) <= 0.25 + 0.125 + 1e-5).all()
    finally:
        _remove_test_scene(scene, [main, kit])
        bpy.data.particles.remove(particles)


def test_scene_points_leave_out_a_child_at_its_own_place_that_its_parent_instances():
    """A quad instancing its children at its vertices (Instancing: Vertices, itself not shown):
    renders show the children only there, but the viewport's depsgraph, which the scene's
    points are read from outside a render, also holds each at its own place (measured in bpy
    5.0.1): every point lies near the parent's vertices (x near 40), none at the children's own
    place (x near 0; were sampled there). The children: a quad (z 0) and a bevelled curve 1
    above it, whose mesh the depsgraph gives as an entry of its own, so the rule holds for all
    the child makes (the curve's points lie at z near 1)."""
    from blender_addon.datagen.surface_points import sample_surface_points

    scene = bpy.data.scenes.new("vertex_children")
    main = bpy.data.collections.new("vc_main")
    scene.collection.children.link(main)
    grid = _quad(40.0, "vc_grid", main)
    grid.instance_type = "VERTS"
    grid.show_instancer_for_viewport = grid.show_instancer_for_render = False
    _quad(0.0, "vc_child_quad", main).parent = grid
    tube = _tube(0.0, 1.0, "vc_child_curve", main)
    tube.parent = grid
    try:
        points, _ = sample_surface_points(scene, 2000, seed=5)
        assert (np.abs(points[:, 0] - 40.0) <= 0.25 + 0.25 + 1e-5).all(), (np.abs(points[:, 0]) < 1.0).sum()
        assert (points[:, 2] > 0.5).any() and (points[:, 2] < 0.5).any()  # on both children's instances
    finally:
        _remove_tube(tube)
        _remove_test_scene(scene, [main])


def test_scene_points_leave_out_particle_collection_members_disabled_in_renders():
    """Hair particles instancing a whole collection of a quad, a quad disabled in renders and a
    child collection disabled in renders (its quad): the viewport's depsgraph, which the scene's
    points are read from outside a render, holds all three quads' instances, renders only the
    first's (measured in bpy 5.0.1), so every point lies on the first quad's instances (their
    triangles read here from Blender's own depsgraph entries) and none on the others'."""
    from blender_addon.datagen.surface_points import evaluated_depsgraph, sample_surface_points

    scene = bpy.data.scenes.new("particle_kit")
    main = bpy.data.collections.new("pk_main")
    kit, kit_off = bpy.data.collections.new("pk_kit"), bpy.data.collections.new("pk_kit_off")
    scene.collection.children.link(main)
    kit.children.link(kit_off)  # the kit itself is in no scene: only its instances render
    kit_off.hide_render = True
    shown = _quad(0.0, "pk_shown", kit)
    hidden = _quad(10.0, "pk_hidden", kit)
    hidden.hide_render = True
    off = _quad(20.0, "pk_in_hidden_collection", kit_off)
    emitter = _quad(-40.0, "pk_emitter", main)
    emitter.show_instancer_for_viewport = emitter.show_instancer_for_render = False
    emitter.modifiers.new("pk_particles", "PARTICLE_SYSTEM")
    particles = emitter.particle_systems[0].settings
    particles.type, particles.count, particles.hair_length = "HAIR", 4, 1.0
    particles.render_type, particles.instance_collection, particles.use_whole_collection = "COLLECTION", kit, True
    try:
        depsgraph = evaluated_depsgraph(scene)
        placed: dict[str, list[tuple[list, list]]] = {}
        for inst in depsgraph.object_instances:
            name = inst.object.original.name
            if inst.is_instance and name in (shown.name, hidden.name, off.name):
                M = inst.matrix_world
                mesh = inst.object.original.data
                placed.setdefault(name, []).append(([tuple(M @ v.co) for v in mesh.vertices],
                                                    [tuple(p.vertices) for p in mesh.polygons]))
        assert {k: len(v) for k, v in placed.items()} == {shown.name: 4, hidden.name: 4, off.name: 4}

        def bvh(name: str) -> BVHTree:
            verts, polys = [], []
            for vs, ps in placed[name]:
                polys += [tuple(len(verts) + i for i in p) for p in ps]
                verts += vs
            return BVHTree.FromPolygons(verts, polys)

        points, _ = sample_surface_points(scene, 1000, seed=4)
        on = {name: np.array([bvh(name).find_nearest(Vector(p))[3] for p in points]) for name in placed}
        assert on[shown.name].max() < 1e-4, (on[hidden.name] < 1e-4).sum() + (on[off.name] < 1e-4).sum()
        assert min(on[hidden.name].min(), on[off.name].min()) > 0.1  # the instances lie apart (scaled to 1/20)
    finally:
        _remove_test_scene(scene, [main, kit, kit_off])
        bpy.data.particles.remove(particles)


def _cycles_scene(name: str) -> bpy.types.Scene:
    """A new scene rendered by Cycles at 1 sample: the renderer whose depsgraph is Blender's own answer."""
    scene = bpy.data.scenes.new(name)
    scene.render.engine = "CYCLES"
    scene.cycles.samples = 1
    return scene


def _add_camera(scene, collection, name: str) -> bpy.types.Object:
    """A camera ``name`` in ``collection``, the scene's camera (a render needs one); remove it with
    :func:`_remove_render_test_scene` (:func:`_remove_test_scene` removes only meshes' data)."""
    camera = bpy.data.objects.new(name, bpy.data.cameras.new(name))
    collection.objects.link(camera)
    scene.camera = camera
    return camera


def _remove_render_test_scene(scene, collections, camera, *data) -> None:
    """Remove a test's ``scene``, its ``camera`` of :func:`_add_camera` with its camera data, its own
    ``collections`` with the objects and meshes in them, and the other ``data`` it made (node
    groups, particle settings), which no object uses any more."""
    camera_data = camera.data
    bpy.data.objects.remove(camera)
    bpy.data.cameras.remove(camera_data)
    _remove_test_scene(scene, collections)
    bpy.data.batch_remove(data)


def _object_info_of(target):
    """For :func:`nodes_modifier`: its input joined with a Geometry Nodes instance (Object Info) of ``target``."""

    def object_info(tree, geometry):
        info = tree.nodes.new("GeometryNodeObjectInfo")
        info.inputs["Object"].default_value = target
        info.inputs["As Instance"].default_value = True
        join = tree.nodes.new("GeometryNodeJoinGeometry")
        tree.links.new(info.outputs["Geometry"], join.inputs[0])
        tree.links.new(geometry, join.inputs[0])
        return join.outputs[0]

    return object_info


def _show_self_by_entry(depsgraph) -> dict[tuple[str, str | None], bool]:
    """Each depsgraph entry's show_self, keyed by its object's name and its instancer's (None if not an instance)."""
    return {(i.object.original.name, i.parent.original.name if i.is_instance else None): i.show_self
            for i in depsgraph.object_instances}


def _read_during_a_render(scene, count: int, seed: int, read=lambda depsgraph: None) -> tuple:
    """(``read(depsgraph)``, ``count`` points on the surfaces it renders) for the depsgraph of a tiny
    render of ``scene``: Blender's own answer, beside the scene's points from the viewport's."""
    from blender_addon.datagen.render import _render_tiny
    from blender_addon.datagen.surface_points import during_a_render, rendered_surfaces

    def both(depsgraph) -> tuple:
        return read(depsgraph), rendered_surfaces(scene, depsgraph, count, seed=seed)[2][0]

    return during_a_render(scene, lambda: _render_tiny(scene), both)


def test_scene_points_follow_the_render_depsgraph_where_the_samplings_disagreed():
    """Two cases where the scene's sampling and Points from Selected Meshes' walked the depsgraph
    differently, with Blender's own answer (the depsgraph of a render, and what Cycles draws):
    a collection instance's quad whose Geometry Nodes instance (Object Info) a quad disabled in
    renders gives points on that instance, which the render's depsgraph holds (measured in bpy
    5.0.1: Cycles draws it; the scene's sampling left it out as a collection member disabled in
    renders); a particle emitter whose Show Emitter is off for renders only gives none (the
    render's entry of it has show_self off; the viewport's, which the scene's points are read
    from outside a render, on). Both from the viewport's depsgraph and the render's. The
    collection's quad sits at x 0, the instanced quad at x 10 (both y 5, the instancer's
    place), the emitter at x 20, a plain quad at x 30 (y 0); the hidden quad itself at x 10, y 0."""
    from blender_addon.datagen.surface_points import sample_surface_points

    scene = _cycles_scene("render_answer")
    main, kit = bpy.data.collections.new("ra_main"), bpy.data.collections.new("ra_kit")
    scene.collection.children.link(main)  # the kit is in no scene: only its instance renders
    hidden = _quad(10.0, "ra_hidden", main)
    hidden.hide_render = True

    nodes_modifier(_quad(0.0, "ra_member", kit), "ra_object_info", _object_info_of(hidden))
    instancer = bpy.data.objects.new("ra_instancer", None)
    instancer.instance_type, instancer.instance_collection = "COLLECTION", kit
    instancer.location.y = 5.0
    main.objects.link(instancer)
    emitter = _quad(20.0, "ra_emitter", main)
    emitter.modifiers.new("ra_particles", "PARTICLE_SYSTEM")
    particles = emitter.particle_systems[0].settings
    particles.render_type = "NONE"
    emitter.show_instancer_for_viewport, emitter.show_instancer_for_render = True, False
    _quad(30.0, "ra_plain", main)
    camera = _add_camera(scene, main, "ra_camera")

    try:
        entries, from_render = _read_during_a_render(scene, 3000, 2, _show_self_by_entry)
        assert entries[(hidden.name, instancer.name)] and (hidden.name, None) not in entries  # Blender's answer
        assert not entries[(emitter.name, None)]
        want = [(0, 5), (10, 5), (30, 0)]
        for points in (sample_surface_points(scene, 3000, seed=2)[0], from_render):
            centres = np.round(points[:, :2] / 5.0).astype(int) * 5
            assert sorted(set(map(tuple, centres.tolist()))) == want, np.unique(centres, axis=0)
            assert (np.abs(points[:, :2] - centres) <= 0.25 + 1e-5).all()
    finally:
        tree = kit.objects["ra_member"].modifiers[0].node_group
        _remove_render_test_scene(scene, [main, kit], camera, tree, particles)


@pytest.mark.parametrize("muted", ["node", "group"])
def test_scene_points_take_an_object_a_muted_collection_info_names(muted):
    """A quad (x 0) whose Geometry Nodes instance a quad disabled in renders (Object Info, x 10)
    and a collection holding it (Collection Info put on the quad's points), the Collection Info
    node muted (``muted`` "node") or the group node holding it ("group"). Blender's own answer,
    the depsgraph of a render: it holds the Object Info instance and no instance of the
    collection (measured in bpy 5.0.1: a muted node instances nothing). The scene's points, from
    either depsgraph, lie on the quad, the instance and a plain quad (x 30): the instance was
    left out of the viewport's, its object counted as a render-disabled member of the muted
    node's collection."""
    from blender_addon.datagen.surface_points import sample_surface_points

    scene = _cycles_scene(f"muted_{muted}")
    main, kit = bpy.data.collections.new("mc_main"), bpy.data.collections.new("mc_kit")
    scene.collection.children.link(main)  # the kit is in no scene: nothing but the nodes could show it
    hidden = _quad(10.0, "mc_hidden", kit)
    hidden.hide_render = True
    group, info = collection_on_points_tree("mc_collection", kit)
    info.mute = muted == "node"

    def both(tree, geometry):
        """The Object Info instance of the hidden quad, the group's output and the input once."""
        node = tree.nodes.new("GeometryNodeGroup")
        node.node_tree, node.mute = group, muted == "group"
        tree.links.new(geometry, node.inputs[0])
        join = tree.nodes.new("GeometryNodeJoinGeometry")
        tree.links.new(node.outputs[0], join.inputs[0])
        if muted == "node":  # the group outputs the instances only; muted, it passes its input through
            tree.links.new(geometry, join.inputs[0])
        return _object_info_of(hidden)(tree, join.outputs[0])

    holder = _quad(0.0, "mc_holder", main)
    nodes_modifier(holder, "mc_nodes", both)
    _quad(30.0, "mc_plain", main)
    camera = _add_camera(scene, main, "mc_camera")

    def instances(depsgraph) -> list[str]:
        """The names of the holder's instances."""
        return sorted(i.object.original.name for i in depsgraph.object_instances
                      if i.is_instance and i.parent.original == holder and i.object.type == "MESH")

    try:
        made, from_render = _read_during_a_render(scene, 2000, 8, instances)
        assert made == [hidden.name]  # Blender's answer: the Object Info instance only
        for points in (sample_surface_points(scene, 2000, seed=8)[0], from_render):
            centres = np.round(points[:, 0] / 10.0).astype(int) * 10
            assert sorted(set(centres.tolist())) == [0, 10, 30], np.unique(centres)
    finally:
        _remove_render_test_scene(scene, [main, kit], camera, holder.modifiers[0].node_group, group)


def test_scene_points_leave_out_all_an_object_disabled_in_renders_makes():
    """An emitter disabled in renders whose particles instance a shown quad, and a bevelled
    curve disabled in renders: Blender's own answer, the depsgraph of a render, holds neither
    the particles' instances nor the curve's evaluated mesh (measured in bpy 5.0.1: the
    viewport's, which the scene's points are read from outside a render, holds both; they were
    sampled), so the scene's points, from either depsgraph, lie on the shown quad (x 0) and a
    plain one (x 30) only; the emitter sits at x 10, the curve at x 20."""
    from blender_addon.datagen.surface_points import sample_surface_points

    scene = _cycles_scene("hidden_makers")
    main = bpy.data.collections.new("hm_main")
    scene.collection.children.link(main)
    source = _quad(0.0, "hm_source", main)
    emitter = _quad(10.0, "hm_emitter", main)
    emitter.hide_render = True
    emitter.modifiers.new("hm_particles", "PARTICLE_SYSTEM")
    particles = emitter.particle_systems[0].settings
    particles.type, particles.count, particles.render_type = "HAIR", 5, "OBJECT"
    particles.instance_object, particles.particle_size = source, 0.5
    tube = _tube(20.0, 0.0, "hm_curve", main)
    tube.hide_render = True
    _quad(30.0, "hm_plain", main)
    camera = _add_camera(scene, main, "hm_camera")

    def standing_names(depsgraph) -> set[str]:
        """The names of the objects that stand in the depsgraph, themselves or as an instancer."""
        return {(i.parent if i.is_instance else i.object).original.name for i in depsgraph.object_instances}

    try:
        standing, from_render = _read_during_a_render(scene, 2000, 3, standing_names)
        assert emitter.name not in standing and tube.name not in standing  # Blender's answer
        for points in (sample_surface_points(scene, 2000, seed=3)[0], from_render):
            centres = np.round(points[:, 0] / 10.0).astype(int) * 10
            assert sorted(set(centres.tolist())) == [0, 30], np.unique(centres)
    finally:
        _remove_tube(tube)
        _remove_render_test_scene(scene, [main], camera, particles)


def test_scene_points_leave_out_instances_of_what_is_not_shown_itself_in_renders():
    """An emitter whose Show Emitter is off for renders only, and a parent instancing its child
    at its vertices whose Show Instancer is, both in a collection an empty instances; and a
    top-level such emitter that a quad's Geometry Nodes instance (Object Info). Blender's own
    answer, the depsgraph of a render: each such instance's entry has show_self off (the
    parent's is not there), as the objects' own entries do; the viewport's, which the scene's
    points are read from outside a render, has it on (measured in bpy 5.0.1; they were sampled).
    The scene's points, from either depsgraph, lie on the child's instances (x 10, z 2), the
    Geometry Nodes' quad (x 20) and a plain one (x 30) only; the instanced emitter sits at x 0,
    the parent at x 10 (z 0), the top-level emitter at x 40."""
    from blender_addon.datagen.surface_points import sample_surface_points

    settings_before = set(bpy.data.particles)  # a new particle system makes settings of its own
    scene = _cycles_scene("not_shown_itself")
    main, kit = bpy.data.collections.new("ns_main"), bpy.data.collections.new("ns_kit")
    scene.collection.children.link(main)  # the kit is in no scene: only its instance renders
    emitter = _quad(0.0, "ns_emitter", kit)
    loose = _quad(40.0, "ns_loose_emitter", main)
    for obj in (emitter, loose):
        obj.modifiers.new("ns_particles", "PARTICLE_SYSTEM")
        obj.show_instancer_for_viewport, obj.show_instancer_for_render = True, False
    particles, replaced = emitter.particle_systems[0].settings, loose.particle_systems[0].settings
    particles.render_type = "NONE"
    loose.particle_systems[0].settings = particles
    bpy.data.particles.remove(replaced)  # the loose emitter's own settings, no longer used
    parent = _quad(10.0, "ns_parent", kit)
    parent.instance_type = "VERTS"
    parent.show_instancer_for_viewport, parent.show_instancer_for_render = True, False
    child = _quad(0.0, "ns_child", kit)
    child.parent, child.location.z = parent, 2.0
    instancer = bpy.data.objects.new("ns_instancer", None)
    instancer.instance_type, instancer.instance_collection = "COLLECTION", kit
    main.objects.link(instancer)

    nodes_modifier(_quad(20.0, "ns_holder", main), "ns_object_info", _object_info_of(loose))
    _quad(30.0, "ns_plain", main)
    camera = _add_camera(scene, main, "ns_camera")

    try:
        shown, from_render = _read_during_a_render(scene, 3000, 4, _show_self_by_entry)
        assert not shown[(emitter.name, instancer.name)] and not shown[(loose.name, "ns_holder")]  # Blender's answer
        assert not shown.get((parent.name, instancer.name), False)
        for points in (sample_surface_points(scene, 3000, seed=4)[0], from_render):
            centres = np.round(points[:, [0, 2]] / [10.0, 2.0]).astype(int) * [10, 2]
            assert sorted(set(map(tuple, centres.tolist()))) == [(10, 2), (20, 0), (30, 0)], np.unique(centres, axis=0)
    finally:
        tree = scene.objects["ns_holder"].modifiers[0].node_group
        _remove_render_test_scene(scene, [main, kit], camera, tree, particles)
    assert set(bpy.data.particles) == settings_before  # none left behind


def test_scene_points_take_camera_visibility_and_holdout_of_an_instance_as_cycles_does(tmp_path):
    """Cycles takes an instance's camera visibility from the instanced object and its instancer
    both, and its holdout from the instancer only (measured in bpy 5.0.1: a collection
    instance's quad marked Holdout renders opaque; one whose instancer is hidden from camera
    rays renders nothing). Blender's own answer, a 4x4 Cycles render of each quad alone (film
    transparent: alpha 1 where it is drawn, 0 where not), for collection instances of a quad
    marked Holdout (x 0), of a quad whose instancer is hidden from camera rays (x 10), and of a
    quad hidden from camera rays itself (x 20), and a plain quad (x 30). The scene's points,
    from either depsgraph, lie where the render draws: x 0 and 30."""
    from blender_addon.datagen.surface_points import sample_surface_points

    scene = _cycles_scene("instance_flags")
    scene.render.film_transparent = True
    scene.render.resolution_x = scene.render.resolution_y = 4
    scene.render.image_settings.file_format, scene.render.image_settings.color_mode = "PNG", "RGBA"
    main = bpy.data.collections.new("if_main")
    scene.collection.children.link(main)
    kits = []
    for x, name in ((0.0, "holdout"), (10.0, "instancer_unseen"), (20.0, "unseen")):
        kits.append(bpy.data.collections.new(f"if_kit_{name}"))  # in no scene: only its instance renders
        quad = _quad(x, f"if_{name}", kits[-1])
        instancer = bpy.data.objects.new(f"if_instancer_{name}", None)
        instancer.instance_type, instancer.instance_collection = "COLLECTION", kits[-1]
        main.objects.link(instancer)
        quad.is_holdout = name == "holdout"
        quad.visible_camera = name != "unseen"
        instancer.visible_camera = name != "instancer_unseen"
    _quad(30.0, "if_plain", main)
    camera = _add_camera(scene, main, "if_camera")
    camera.data.type, camera.data.ortho_scale = "ORTHO", 0.4  # sees the middle of one quad
    camera.location.z = 5.0

    def drawn(x: float) -> float:
        """Mean alpha of a render of the quad at ``x`` alone."""
        camera.location.x = x
        scene.render.filepath = str(tmp_path / f"at_{int(x)}.png")
        bpy.ops.render.render(write_still=True, scene=scene.name)
        image = bpy.data.images.load(scene.render.filepath)
        alpha = float(np.array(image.pixels[:]).reshape(-1, 4)[:, 3].mean())
        bpy.data.images.remove(image)
        return alpha

    try:
        assert [drawn(x) for x in (0.0, 10.0, 20.0, 30.0)] == [1.0, 0.0, 0.0, 1.0]  # Blender's answer
        _, from_render = _read_during_a_render(scene, 2000, 6)
        for points in (sample_surface_points(scene, 2000, seed=6)[0], from_render):
            centres = np.round(points[:, 0] / 10.0).astype(int) * 10
            assert sorted(set(centres.tolist())) == [0, 30], np.unique(centres)
    finally:
        _remove_render_test_scene(scene, [main, *kits], camera)


def test_scene_points_leave_out_particles_of_a_collection_member_disabled_in_renders():
    """An instanced collection's two emitters whose hair particles instance a quad disabled in
    renders (the usual scatter), the one at x 0 disabled in renders itself, the one at x 10 not:
    Blender's own answer, the depsgraph of a render, holds the particles' instances of the
    second only (measured in bpy 5.0.1; the viewport's, which the scene's points are read from
    outside a render, holds both: they were sampled). The scene's points, from either
    depsgraph, lie around x 10 and on a plain quad (x 30) only."""
    from blender_addon.datagen.surface_points import sample_surface_points

    settings_before = set(bpy.data.particles)  # a new particle system makes settings of its own
    scene = _cycles_scene("hidden_member_particles")
    main, kit = bpy.data.collections.new("hp_main"), bpy.data.collections.new("hp_kit")
    scene.collection.children.link(main)  # the kit is in no scene: only its instance renders
    source = _quad(50.0, "hp_source", main)
    source.hide_render = True
    hidden, shown = _quad(0.0, "hp_hidden_emitter", kit), _quad(10.0, "hp_emitter", kit)
    hidden.hide_render = True
    for emitter in (hidden, shown):
        emitter.modifiers.new("hp_particles", "PARTICLE_SYSTEM")
    particles = hidden.particle_systems[0].settings
    particles.type, particles.count, particles.render_type = "HAIR", 5, "OBJECT"
    particles.instance_object, particles.particle_size = source, 0.5
    replaced = shown.particle_systems[0].settings
    shown.particle_systems[0].settings = particles
    bpy.data.particles.remove(replaced)  # the shown emitter's own settings, no longer used
    for emitter in (hidden, shown):
        emitter.show_instancer_for_viewport = emitter.show_instancer_for_render = False  # their particles only
    instancer = bpy.data.objects.new("hp_instancer", None)
    instancer.instance_type, instancer.instance_collection = "COLLECTION", kit
    main.objects.link(instancer)
    _quad(30.0, "hp_plain", main)
    camera = _add_camera(scene, main, "hp_camera")

    def source_instance_xs(depsgraph) -> list[float]:
        """The x of each instance of the particles' source quad."""
        return [i.matrix_world.translation.x for i in depsgraph.object_instances
               if i.is_instance and i.object.original == source]

    try:
        made, from_render = _read_during_a_render(scene, 2000, 7, source_instance_xs)
        assert len(made) == 5 and all(abs(x - 10.0) < 1.0 for x in made), made  # Blender's answer
        for points in (sample_surface_points(scene, 2000, seed=7)[0], from_render):
            centres = np.round(points[:, 0] / 10.0).astype(int) * 10
            assert sorted(set(centres.tolist())) == [10, 30], np.unique(centres)
    finally:
        _remove_render_test_scene(scene, [main, kit], camera, particles)
    assert set(bpy.data.particles) == settings_before  # none left behind


def test_scene_surfaces_read_each_curve_text_and_metaball_once():
    """A bevelled curve, a text and a metaball render one mesh each, which Blender's
    depsgraph gives as an instance of its own beside the object: the scene's surfaces are
    each read once (their total area is that of Blender's own evaluated meshes, and a
    quad's), not twice, so they do not get twice their share of the points."""
    from blender_addon.datagen.surface_points import evaluated_depsgraph, scene_triangles

    scene = bpy.data.scenes.new("read_once")
    curve = bpy.data.curves.new("ro_curve", "CURVE")
    curve.dimensions, curve.bevel_depth = "3D", 0.1
    spline = curve.splines.new("POLY")
    spline.points.add(2)
    for point, x in zip(spline.points, (0.0, 1.0, 2.0), strict=True):
        point.co = (x, 0.0, x * x, 1.0)
    text = bpy.data.curves.new("ro_text", "FONT")
    text.body = "Hi"
    meta = bpy.data.metaballs.new("ro_meta")
    meta.elements.new().radius = 1.0
    quad = bpy.data.meshes.new("ro_quad")
    quad.from_pydata([(0, 0, 0), (1, 0, 0), (1, 1, 0), (0, 1, 0)], [], [(0, 1, 2, 3)])
    objects = []
    for k, data in enumerate((curve, text, meta, quad)):
        objects.append(bpy.data.objects.new(data.name, data))
        objects[-1].location.y = 4.0 * k
        scene.collection.objects.link(objects[-1])
    try:
        depsgraph = evaluated_depsgraph(scene)
        want = 0.0
        for obj in objects:
            ev = obj.evaluated_get(depsgraph)
            want += sum(p.area for p in ev.to_mesh().polygons)
            ev.to_mesh_clear()
        meshes = scene_triangles(scene)
        assert len(meshes) == 4 and want > 1.0
        assert sum(m.area() for m in meshes) == pytest.approx(want, rel=1e-5)
    finally:
        for obj in objects:
            bpy.data.objects.remove(obj)
        bpy.data.curves.remove(curve)
        bpy.data.curves.remove(text)
        bpy.data.metaballs.remove(meta)
        bpy.data.meshes.remove(quad)
        bpy.data.scenes.remove(scene)


def test_dataset_points_and_framing_follow_render_visibility(tmp_path):
    """The dataset's points3d.ply and its cameras' framing come from what Cycles renders,
    not from the viewport: a quad in a collection disabled in viewports (the monitor icon),
    one disabled in viewports itself, one hidden in the viewport (the eye) and the second
    copy an Array modifier makes only in renders (Show in Viewport off) all get points; a
    quad disabled in renders, a Holdout one and one in an Indirect Only collection get none.
    Each quad sits at its own x, so a point's x says which it came from (the viewport
    depsgraph held only the quads at 0 and 4, and those at 9 and 10)."""
    from npbgpp_core.ply import load_ply

    scene = bpy.data.scenes.new("render_visibility")
    hidden, indirect = bpy.data.collections.new("rv_monitor"), bpy.data.collections.new("rv_indirect")
    scene.collection.children.link(hidden)
    scene.collection.children.link(indirect)

    def quad(x: float, name: str, where=None) -> bpy.types.Object:
        return _quad(x, name, where or scene.collection)

    try:
        quad(0.0, "rv_plain")
        quad(1.0, "rv_in_monitor_collection", hidden)
        quad(2.0, "rv_monitor").hide_viewport = True
        eye = quad(3.0, "rv_eye")
        array = quad(4.0, "rv_array").modifiers.new("copy", "ARRAY")
        array.count, array.relative_offset_displace, array.show_viewport = 2, (4.0, 0.0, 0.0), False  # x = 6
        quad(8.0, "rv_not_rendered").hide_render = True
        quad(9.0, "rv_holdout").is_holdout = True  # Holdout and Indirect Only: in a render's depsgraph too
        quad(10.0, "rv_indirect", indirect)
        scene.view_layers[0].layer_collection.children[indirect.name].indirect_only = True
        hidden.hide_viewport = True
        scene.view_layers[0].update()
        eye.hide_set(True, view_layer=scene.view_layers[0])
        summary = render_views_of_current_scene(scene, str(tmp_path / "out"), views=1, size=(8, 8), samples=1,
                                                points=4000, val_views=0, test_views=0, seed=1)
        points = load_ply(tmp_path / "out" / "points3d.ply").points
        centres = np.round(points[:, 0]).astype(int)
        assert sorted(set(centres.tolist())) == [0, 1, 2, 3, 4, 6], np.unique(centres)
        assert (np.abs(points[:, 0] - centres) <= 0.25 + 1e-5).all()
        # framed around x from -0.25 to 6.25, not the viewport's -0.25 .. 0.25
        assert summary.extra["center"][0] == pytest.approx(3.0)
        assert summary.extra["radius"] == pytest.approx(math.hypot(3.25, 0.25))
    finally:
        _remove_test_scene(scene, [hidden, indirect])


def _fresh_python(*args: object, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run this Python (its bpy) with ``args`` in a new process, the repository importable and
    output captured as text: the .blend files it saves or opens leave this process's data alone."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, *map(str, args)], env={**os.environ, "PYTHONPATH": root},
                          capture_output=True, text=True, timeout=timeout)


def _datagen_one_tiny_view(blend, out, points: int) -> subprocess.CompletedProcess:
    """``python -m blender_addon.datagen --blend`` of one 8x8 train view at 1 sample."""
    return _fresh_python("-m", "blender_addon.datagen", "--blend", blend, "--views", "1", "--size", "8x8",
                         "--samples", "1", "--points", points, "--val", "0", "--test", "0", "--out", out)


def test_command_line_blend_file(tmp_path):
    """--blend renders the saved file's scene through main(); run in a fresh process."""
    blend = tmp_path / "scene.blend"
    make = (
        "import bpy; from blender_addon.datagen.procedural import build_procedural_scene; "
        "s = build_procedural_scene('ring_and_cone'); bpy.context.window.scene = s; "
        f"bpy.ops.wm.save_as_mainfile(filepath={str(blend)!r})"
    )
    _fresh_python("-c", make, timeout=120).check_returncode()
    out = tmp_path / "out"
    res = _fresh_python("-m", "blender_addon.datagen", "--blend", blend, "--views", "3", "--size", "24x16",
                        "--samples", "1", "--points", "200", "--out", out, "--test", "1", "--val", "0", "--hemisphere")
    assert res.returncode == 0, res.stderr[-2000:]
    data = load_scene(str(out))
    assert data.views[0].camera.image_size == (16, 24)
    assert (len(data.train), len(data.test), data.points.shape) == (2, 1, (200, 3))
    assert all(float(v.camera.center()[2]) > data.points[:, 2].mean() for v in data.views)  # upper hemisphere
    again = _fresh_python("-m", "blender_addon.datagen", "--blend", blend, "--views", "3", "--size", "24x16",
                          "--out", out)
    assert again.returncode == 2 and "not empty" in again.stderr and "Traceback" not in again.stderr
    # --out holding the .blend with --overwrite replaced that folder, deleting the .blend
    over = _fresh_python("-m", "blender_addon.datagen", "--blend", blend, "--views", "3", "--size", "24x16",
                         "--samples", "1", "--points", "50", "--out", tmp_path, "--overwrite")
    assert over.returncode == 2 and "holds the --blend file" in over.stderr, over.stderr[-2000:]
    assert blend.is_file() and (out / "transforms_train.json").is_file()


def test_command_line_blend_file_hidden_in_viewports(tmp_path):
    """--blend on a file whose meshes are all hidden in viewports (a collection's monitor
    icon, an object's) but rendered: the dataset is made, with points on both (the early
    check read the viewport's depsgraph and refused it); a file whose only mesh is disabled
    in renders is refused with status 2 and one line naming the file, nothing written."""
    make = (
        "import bpy, sys\n"
        "for path, hide_render in ((sys.argv[1], False), (sys.argv[2], True)):\n"
        "    bpy.ops.wm.read_homefile(use_empty=True)\n"
        "    sc = bpy.context.scene\n"
        "    col = bpy.data.collections.new('monitor_off'); sc.collection.children.link(col)\n"
        "    for x, where in ((0.0, col), (2.0, sc.collection)):\n"
        "        me = bpy.data.meshes.new('q')\n"
        "        me.from_pydata([(x-.5, -.5, 0), (x+.5, -.5, 0), (x+.5, .5, 0), (x-.5, .5, 0)], [], [(0, 1, 2, 3)])\n"
        "        ob = bpy.data.objects.new('q', me); where.objects.link(ob)\n"
        "        ob.hide_viewport = where is sc.collection; ob.hide_render = hide_render\n"
        "    col.hide_viewport = True\n"
        "    bpy.ops.wm.save_as_mainfile(filepath=path)\n"
    )
    shown, unrendered = tmp_path / "hidden.blend", tmp_path / "unrendered.blend"
    _fresh_python("-c", make, shown, unrendered, timeout=120).check_returncode()
    res = _datagen_one_tiny_view(shown, tmp_path / "out", points=400)
    assert res.returncode == 0, res.stderr[-2000:]
    x = load_scene(str(tmp_path / "out")).points[:, 0]
    assert len(x) == 400 and ((np.abs(x) <= 0.5 + 1e-5) | (np.abs(x - 2.0) <= 0.5 + 1e-5)).all()
    assert (x < 1.0).any() and (x > 1.0).any()
    res = _datagen_one_tiny_view(unrendered, tmp_path / "refused", points=400)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1] == (f"python -m blender_addon.datagen: error: {unrendered}: scene "
                                                   "'Scene' has no visible mesh surfaces or points")
    assert not (tmp_path / "refused").exists() and not [p for p in os.listdir(tmp_path) if "partial" in p]


def test_command_line_blend_file_without_a_rendered_view_layer(tmp_path):
    """--blend on a file saved with every view layer's Use for Rendering off: Blender renders
    nothing (render.render returns FINISHED without an image), and datagen ended in a
    traceback after its preparation; refused with status 2 and one line naming the file,
    the scene, its layers and the setting, before any work: nothing written."""
    make = (
        "import bpy, sys\n"
        "bpy.ops.wm.read_homefile(use_empty=True)\n"
        "sc = bpy.context.scene\n"
        "me = bpy.data.meshes.new('q')\n"
        "me.from_pydata([(-.5, -.5, 0), (.5, -.5, 0), (.5, .5, 0), (-.5, .5, 0)], [], [(0, 1, 2, 3)])\n"
        "sc.collection.objects.link(bpy.data.objects.new('q', me))\n"
        "sc.view_layers.new('Second')\n"
        "for layer in sc.view_layers: layer.use = False\n"
        "bpy.ops.wm.save_as_mainfile(filepath=sys.argv[1])\n"
    )
    blend = tmp_path / "no_layer.blend"
    _fresh_python("-c", make, blend, timeout=120).check_returncode()
    res = _datagen_one_tiny_view(blend, tmp_path / "out", points=50)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1] == (
        f"python -m blender_addon.datagen: error: {blend}: no view layer of the scene 'Scene' is enabled for "
        "rendering ('ViewLayer', 'Second'): turn on View Layer Properties > View Layer > Use for Rendering for one")
    assert sorted(os.listdir(tmp_path)) == ["no_layer.blend"]


def test_command_line_bad_input_exits_2_with_one_line(tmp_path, capsys):
    """An unknown procedural scene, an existing --out, bad view counts or a missing .blend:
    exit status 2 and the reason, no traceback, nothing written."""
    from blender_addon.datagen.render import main

    assert main(["--procedural", "nosuch", "--views", "2", "--size", "8x8", "--out", str(tmp_path / "a")]) == 2
    assert "unknown procedural scene 'nosuch'" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    assert main(["--procedural", "checker_cube", "--views", "2", "--size", "8x8", "--out",
                 str(tmp_path / "full")]) == 2
    assert "not empty" in capsys.readouterr().err and (tmp_path / "full" / "x").read_text() == "keep"
    assert main(["--procedural", "checker_cube", "--views", "2", "--val", "1", "--test", "1", "--size", "8x8",
                 "--out", str(tmp_path / "b")]) == 2
    assert "need at least one train view: views=2, val=1, test=1" in capsys.readouterr().err
    assert main(["--blend", str(tmp_path / "nosuch.blend"), "--out", str(tmp_path / "c")]) == 2
    assert ".blend file not found" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]


def test_command_line_error_during_render_keeps_its_traceback(tmp_path, monkeypatch):
    """Only argument and input checks become one line and status 2: a ValueError raised
    while the views are rendered is a bug and propagates (with its traceback); the
    half-written output is removed."""
    from blender_addon.datagen import render

    def broken(*args, **kwargs):
        raise ValueError("a bug deep in the render")

    monkeypatch.setattr(render, "camera_directions", broken)
    with pytest.raises(ValueError, match="a bug deep in the render"):
        render.main(["--procedural", "checker_cube", "--views", "2", "--size", "8x8", "--samples", "1",
                     "--out", str(tmp_path / "out")])
    assert list(tmp_path.iterdir()) == []


def test_render_restores_scene_settings(tmp_path):
    from blender_addon.datagen.procedural import build_procedural_scene

    scene = build_procedural_scene("checker_cube")
    before = (scene.render.engine, scene.render.resolution_x, scene.view_settings.view_transform, scene.camera)
    n_objects = len(bpy.data.objects)
    render_views_of_current_scene(scene, str(tmp_path / "o"), views=2, size=(8, 8), samples=1, points=10,
                                  val_views=0, test_views=0)
    after = (scene.render.engine, scene.render.resolution_x, scene.view_settings.view_transform, scene.camera)
    assert before == after and len(bpy.data.objects) == n_objects
    assert not [p for p in os.listdir(tmp_path) if "partial" in p]
    remove_scene(scene)


def test_render_steps_can_be_cancelled_leaving_nothing(tmp_path):
    """The step-wise dataset renderer (one view per step, as Export Dataset's background job
    runs it) yields its progress; closing it after the first view leaves no output folder
    and no temporary files, and restores the scene's settings and camera."""
    from blender_addon.datagen.render import render_views_steps

    scene = bpy.data.scenes.new("npbgpp_steps")
    try:
        mesh = bpy.data.meshes.new("quad")
        mesh.from_pydata([(-1, -1, 0), (1, -1, 0), (1, 1, 0), (-1, 1, 0)], [], [(0, 1, 2, 3)])
        scene.collection.objects.link(bpy.data.objects.new("quad", mesh))
        scene.render.resolution_x, scene.render.resolution_y = 123, 45
        engine = scene.render.engine
        objects = set(bpy.data.objects.keys())
        killed = subprocess.Popen([sys.executable, "-c", "pass"])  # a render killed mid-way left its folder
        killed.wait()
        os.makedirs(tmp_path / f"out.partial-{killed.pid}" / "train")
        steps = render_views_steps(scene, str(tmp_path / "out"), views=3, size=(8, 8), samples=1, points=10)
        assert next(steps) == (1, 3)
        steps.close()
        assert os.listdir(tmp_path) == []  # neither this run's folder nor the killed one's
        assert (scene.render.resolution_x, scene.render.resolution_y, scene.render.engine) == (123, 45, engine)
        assert scene.camera is None and set(bpy.data.objects.keys()) == objects  # its camera is gone
        done = list(render_views_steps(scene, str(tmp_path / "out"), views=2, size=(8, 8), samples=1, points=10))
        assert done == [(1, 2), (2, 2)] and os.path.isfile(tmp_path / "out" / "points3d.ply")
    finally:
        remove_scene(scene)


def test_render_leaves_out_the_addons_point_objects_and_restores_them(tmp_path):
    """An object the add-on marked as its point object (:data:`POINT_OBJECT_MARK`; here a quad,
    at x = 2) is disabled in renders while the dataset renders (its points are not in
    points3d.ply, the cameras do not frame it) and enabled again after: when the steps are
    closed early (Esc), at the end, and when the export fails (nothing left but it: the error
    names it). One already disabled in renders stays so and is not named."""
    from blender_addon.datagen.render import render_views_steps
    from blender_addon.datagen.surface_points import NoSurfacesError
    from blender_addon.point_source import POINT_OBJECT_MARK
    from npbgpp_core.ply import load_ply

    scene = bpy.data.scenes.new("left_out_points")
    try:
        plain = _quad(0.0, "lo_plain", scene.collection)
        marked = _quad(2.0, "lo_marked", scene.collection)
        hidden = _quad(4.0, "lo_marked_hidden", scene.collection)
        marked[POINT_OBJECT_MARK] = hidden[POINT_OBJECT_MARK] = True
        hidden.hide_render = True
        options = dict(views=2, size=(8, 8), samples=1, points=100, val_views=0, test_views=0, seed=1)
        steps = render_views_steps(scene, str(tmp_path / "cancelled"), **options)
        assert next(steps) == (1, 2) and marked.hide_render  # left out while it renders
        steps.close()
        assert not marked.hide_render and hidden.hide_render and not (tmp_path / "cancelled").exists()
        summary = render_views_of_current_scene(scene, str(tmp_path / "out"), **options)
        assert not marked.hide_render and hidden.hide_render
        assert summary.extra["left_out"] == ["lo_marked"]
        points = load_ply(tmp_path / "out" / "points3d.ply").points
        assert len(points) == 100 and np.abs(points[:, 0]).max() <= 0.25 + 1e-5  # the plain quad's only
        assert summary.extra["center"][0] == pytest.approx(0.0, abs=1e-6)  # framed without it
        mesh = plain.data
        bpy.data.objects.remove(plain)
        bpy.data.meshes.remove(mesh)
        with pytest.raises(NoSurfacesError, match=r"left out the NPBG\+\+ point object 'lo_marked' \(the scene's "
                                                  r"cloud, not its content"):
            render_views_of_current_scene(scene, str(tmp_path / "failed"), **options)
        assert not marked.hide_render and hidden.hide_render and not (tmp_path / "failed").exists()
    finally:
        _remove_test_scene(scene, [])


def _mesh_to_points(tree, geometry):
    """For :func:`nodes_modifier`: a Mesh to Points node of the modifier's input mesh."""
    node = tree.nodes.new("GeometryNodeMeshToPoints")
    tree.links.new(geometry, node.inputs["Mesh"])
    return node.outputs["Points"]


def test_dataset_points_take_the_point_clouds_and_hair_a_render_shows(tmp_path):
    """points3d.ply holds, besides the points sampled on surfaces, every point the render shows
    as points, as Points from Selected Meshes takes them: a Point Cloud object's (5 points a
    Points node makes), a hair object's (3 control points), those a mesh's Geometry Nodes make
    (Mesh to Points of a 4-vertex quad) and a hair instanced by an empty (at the empty's
    place); not a point cloud disabled in renders. Each sits at its own x."""
    from npbgpp_core.ply import load_ply

    scene = bpy.data.scenes.new("dataset_own_points")
    kept = bpy.data.collections.new("dop_instanced")  # in no scene: drawn through the instancer only
    made = []

    def link(name: str, data, x: float, collection=None) -> bpy.types.Object:
        obj = bpy.data.objects.new(name, data)
        obj.location = (x, 0.0, 0.0)
        (collection or scene.collection).objects.link(obj)
        made.append(obj)
        return obj

    def points_node(tree, _geometry):
        node = tree.nodes.new("GeometryNodePoints")
        node.inputs["Count"].default_value = 5
        return node.outputs["Points"]

    try:
        made.append(_quad(0.0, "dop_surface", scene.collection))
        nodes_modifier(link("dop_cloud", bpy.data.pointclouds.new("dop_cloud"), 20.0), "dop_points", points_node)
        for name, x, collection in (("dop_hair", 30.0, None), ("dop_instanced_hair", 0.0, kept)):
            hair = bpy.data.hair_curves.new(name)
            hair.add_curves([3])
            link(name, hair, x, collection)
        nodes_modifier(_quad(40.0, "dop_to_points", scene.collection), "dop_mesh_points", _mesh_to_points)
        made.append(scene.collection.objects["dop_to_points"])
        hidden = link("dop_not_rendered", bpy.data.pointclouds.new("dop_hidden"), 50.0)
        nodes_modifier(hidden, "dop_hidden_points", points_node)
        hidden.hide_render = True
        instancer = link("dop_instancer", None, 60.0)
        instancer.instance_type, instancer.instance_collection = "COLLECTION", kept
        scene.view_layers[0].update()
        render_views_of_current_scene(scene, str(tmp_path / "out"), views=1, size=(8, 8), samples=1,
                                      points=100, val_views=0, test_views=0, seed=1)
        points = load_ply(tmp_path / "out" / "points3d.ply").points
        centres = np.round(points[:, 0] / 10.0).astype(int) * 10
        got = {int(c): int(n) for c, n in zip(*np.unique(centres, return_counts=True), strict=True)}
        assert got == {0: 100, 20: 5, 30: 3, 40: 4, 60: 3}, got
        assert (np.abs(points[:, 0] - centres) <= 0.25 + 1e-5).all()
    finally:
        for obj in made:
            bpy.data.objects.remove(obj)
        bpy.data.collections.remove(kept)
        bpy.data.scenes.remove(scene)


def test_dataset_of_points_only_frames_the_points(tmp_path):
    """A scene whose only render-visible content is points (a mesh that Geometry Nodes turn
    into its 4 corner points, at x = 0, and a hair of 3 control points at x = 3) exports: the
    cameras frame the points (the sphere around x from -0.25 to 3) and points3d.ply holds the 7
    (was: "no visible mesh surfaces", the sphere covering surfaces only). The hair alone, its
    points all at one place, is refused: no camera frames a point."""
    from blender_addon.datagen.surface_points import NoSurfacesError
    from npbgpp_core.ply import load_ply

    scene = bpy.data.scenes.new("points_only")
    made = []

    try:
        hair = bpy.data.hair_curves.new("po_hair")
        hair.add_curves([3])
        made.append(bpy.data.objects.new("po_hair", hair))
        made[0].location.x = 3.0
        scene.collection.objects.link(made[0])
        with pytest.raises(NoSurfacesError, match=r"scene 'points_only': all it shows lies at one place "
                                                  r"\[3\.0, 0\.0, 0\.0\], which no camera can frame"):
            render_views_of_current_scene(scene, str(tmp_path / "point"), views=1, size=(8, 8), samples=1)
        assert not (tmp_path / "point").exists()
        made.append(_quad(0.0, "po_to_points", scene.collection))
        nodes_modifier(made[1], "po_mesh_points", _mesh_to_points)
        summary = render_views_of_current_scene(scene, str(tmp_path / "out"), views=1, size=(8, 8), samples=1,
                                                points=100, val_views=0, test_views=0, seed=1)
        points = load_ply(tmp_path / "out" / "points3d.ply").points
        assert sorted(np.round(points[:, 0], 2).tolist()) == [-0.25, -0.25, 0.25, 0.25, 3.0, 3.0, 3.0]
        assert summary.points == 7
        assert summary.extra["center"] == pytest.approx([1.375, 0.0, 0.0])
        assert summary.extra["radius"] == pytest.approx(math.hypot(1.625, 0.25))
    finally:
        for obj in made:
            bpy.data.objects.remove(obj)
        bpy.data.scenes.remove(scene)
