"""Procedural test scenes built with bpy (imported inside functions only).

Each scene is a few objects with varied materials: generated image textures (checker,
stripes, smooth noise, rings) looked up by UV, flat and glossy/metallic colours, vertex
colours, and thin parts (legs, rings, rods). Named scenes are in ``PROCEDURAL_SCENES``;
``random_<seed>`` builds a seeded random arrangement for making many training scenes.
Objects sit inside a sphere of radius ~1 around the origin; world up is +Z.
Scenes are built in a new ``bpy.types.Scene`` so the open file is left alone.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..srgb import srgb_to_linear

PROCEDURAL_SCENES = (
    "checker_cube",
    "glossy_spheres",
    "thin_table",
    "textured_monkey",
    "vertex_color_blob",
    "stacked_blocks",
    "ring_and_cone",
)

# ------------------------------------------------------------------ textures


def texture_array(kind: str, rng: np.random.Generator, size: int = 128) -> np.ndarray:
    """An (size, size, 3) float32 sRGB texture in [0, 1], top row first."""
    c1, c2 = rng.uniform(0.05, 0.95, 3), rng.uniform(0.05, 0.95, 3)
    y, x = np.mgrid[0:size, 0:size] / size
    if kind == "checker":
        n = int(rng.integers(4, 10))
        t = ((np.floor(x * n) + np.floor(y * n)) % 2)[..., None]
    elif kind == "stripes":
        n = int(rng.integers(3, 12))
        t = (0.5 + 0.5 * np.sin(2 * math.pi * n * (x + 0.3 * y)))[..., None]
    elif kind == "rings":
        n = int(rng.integers(3, 9))
        t = (0.5 + 0.5 * np.cos(2 * math.pi * n * np.hypot(x - 0.5, y - 0.5)))[..., None]
    elif kind == "noise":
        coarse = rng.uniform(0, 1, (9, 9))
        # bilinear upsampling of a coarse periodic grid: smooth, tileable noise
        gx, gy = x * 8, y * 8
        i, j = np.floor(gx).astype(int), np.floor(gy).astype(int)
        fx, fy = gx - i, gy - j
        c = coarse[: 8, : 8]
        a = c[j % 8, i % 8] * (1 - fx) + c[j % 8, (i + 1) % 8] * fx
        b = c[(j + 1) % 8, i % 8] * (1 - fx) + c[(j + 1) % 8, (i + 1) % 8] * fx
        t = (a * (1 - fy) + b * fy)[..., None]
    else:
        raise ValueError(f"unknown texture kind {kind!r}")
    return (c1 * (1 - t) + c2 * t).astype(np.float32)


def _image(name: str, rgb: np.ndarray):
    import bpy

    h, w = rgb.shape[:2]
    img = bpy.data.images.new(name, w, h, alpha=False, float_buffer=False)
    img.colorspace_settings.name = "sRGB"
    rgba = np.concatenate([rgb[::-1], np.ones((h, w, 1), np.float32)], axis=2)  # bottom row first
    img.pixels.foreach_set(np.ascontiguousarray(rgba, dtype=np.float32).ravel())
    img.pack()
    return img


def make_material(name: str, rng: np.random.Generator, kind: str | None = None):
    """A Principled BSDF material: 'flat', 'glossy', 'metal', 'vertex' (colour attribute
    'Col') or a texture kind ('checker', 'stripes', 'rings', 'noise')."""
    import bpy

    kind = kind or str(rng.choice(["flat", "glossy", "metal", "checker", "stripes", "rings", "noise"]))
    mat = bpy.data.materials.new(name)
    if mat.node_tree is None:  # Blender < 5 creates node trees on request
        mat.use_nodes = True
    nodes = mat.node_tree.nodes
    bsdf = next(n for n in nodes if n.type == "BSDF_PRINCIPLED")
    srgb = rng.uniform(0.1, 0.95, 3)
    bsdf.inputs["Base Color"].default_value = (*srgb_to_linear(srgb, np.float64), 1.0)
    bsdf.inputs["Roughness"].default_value = 0.6
    if kind == "glossy":
        bsdf.inputs["Roughness"].default_value = float(rng.uniform(0.05, 0.25))
    elif kind == "metal":
        bsdf.inputs["Metallic"].default_value = 1.0
        bsdf.inputs["Roughness"].default_value = float(rng.uniform(0.15, 0.35))
    elif kind == "vertex":
        attr = nodes.new("ShaderNodeVertexColor")
        attr.layer_name = "Col"
        mat.node_tree.links.new(attr.outputs["Color"], bsdf.inputs["Base Color"])
    elif kind != "flat":
        tex = nodes.new("ShaderNodeTexImage")
        tex.image = _image(f"{name}_{kind}", texture_array(kind, rng))
        tex.interpolation = "Linear"
        mat.node_tree.links.new(tex.outputs["Color"], bsdf.inputs["Base Color"])
    return mat


# ------------------------------------------------------------------ meshes


def _torus(bm, major: float, minor: float, seg_major: int = 32, seg_minor: int = 12) -> None:
    """Add a UV-mapped torus around +Z to a bmesh."""
    uv = bm.loops.layers.uv.verify()
    verts = []
    for i in range(seg_major + 1):
        a = 2 * math.pi * i / seg_major
        row = []
        for j in range(seg_minor + 1):
            b = 2 * math.pi * j / seg_minor
            r = major + minor * math.cos(b)
            row.append(bm.verts.new((r * math.cos(a), r * math.sin(a), minor * math.sin(b))))
        verts.append(row)
    for i in range(seg_major):
        for j in range(seg_minor):
            quad = (verts[i][j], verts[i + 1][j], verts[i + 1][j + 1], verts[i][j + 1])
            f = bm.faces.new(quad)
            for loop, (di, dj) in zip(f.loops, ((0, 0), (1, 0), (1, 1), (0, 1)), strict=True):
                loop[uv].uv = ((i + di) / seg_major, (j + dj) / seg_minor)
    bmesh_merge(bm)


def bmesh_merge(bm) -> None:
    import bmesh

    bmesh.ops.remove_doubles(bm, verts=bm.verts, dist=1e-6)


def make_mesh_object(scene, name: str, shape: str, material, location=(0, 0, 0), rotation=(0, 0, 0),
                     scale=(1, 1, 1), rng: np.random.Generator | None = None, **shape_args: Any):
    """Create an object of a primitive ``shape`` (cube, uv_sphere, ico_sphere, cylinder,
    cone, torus, monkey) with UVs, link it into ``scene`` and give it ``material``."""
    import bmesh
    import bpy
    from mathutils import Euler

    bm = bmesh.new()
    bm.loops.layers.uv.verify()
    if shape == "cube":
        bmesh.ops.create_cube(bm, size=2.0, calc_uvs=True)
    elif shape == "uv_sphere":
        bmesh.ops.create_uvsphere(bm, u_segments=32, v_segments=16, radius=1.0, calc_uvs=True)
    elif shape == "ico_sphere":
        bmesh.ops.create_icosphere(bm, subdivisions=shape_args.get("subdivisions", 3), radius=1.0, calc_uvs=True)
    elif shape in ("cylinder", "cone"):
        bmesh.ops.create_cone(bm, cap_ends=True, cap_tris=False, segments=shape_args.get("segments", 24),
                              radius1=1.0, radius2=1.0 if shape == "cylinder" else shape_args.get("tip", 0.0),
                              depth=2.0, calc_uvs=True)
    elif shape == "torus":
        _torus(bm, 1.0, shape_args.get("minor", 0.25))
    elif shape == "monkey":
        bmesh.ops.create_monkey(bm, calc_uvs=True)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    if shape_args.get("displace"):
        amp = float(shape_args["displace"])
        r = rng or np.random.default_rng(0)
        freq = r.uniform(2, 5, 3)
        phase = r.uniform(0, 2 * math.pi, 3)
        for v in bm.verts:
            n = v.co.normalized()
            v.co += n * amp * math.sin(freq[0] * v.co.x + phase[0]) * math.cos(freq[1] * v.co.y + phase[1])
    mesh = bpy.data.meshes.new(name)
    bm.to_mesh(mesh)
    bm.free()
    for p in mesh.polygons:
        p.use_smooth = shape not in ("cube",)
    if material is not None:
        mesh.materials.append(material)
        if material.get("needs_vertex_colors") or _uses_vertex_colors(material):
            _add_vertex_colors(mesh, rng or np.random.default_rng(0))
    obj = bpy.data.objects.new(name, mesh)
    obj.location = location
    obj.rotation_euler = Euler(rotation)
    obj.scale = scale
    scene.collection.objects.link(obj)
    return obj


def _uses_vertex_colors(material) -> bool:
    return material.node_tree is not None and any(n.type == "VERTEX_COLOR" for n in material.node_tree.nodes)


def _add_vertex_colors(mesh, rng: np.random.Generator) -> None:
    """Smooth per-vertex sRGB colours from the vertex positions (a 'Col' attribute)."""
    n = len(mesh.vertices)
    co = np.empty(n * 3, np.float32)
    mesh.vertices.foreach_get("co", co)
    co = co.reshape(n, 3)
    w = rng.normal(size=(3, 3)) * 2.0
    srgb = 0.5 + 0.45 * np.sin(co @ w + rng.uniform(0, 6.28, 3))
    attr = mesh.color_attributes.new("Col", "FLOAT_COLOR", "POINT")
    rgba = np.concatenate([srgb_to_linear(srgb, np.float64), np.ones((n, 1))], axis=1).astype(np.float32)
    attr.data.foreach_set("color", rgba.ravel())
    mesh.color_attributes.active_color = attr


# ------------------------------------------------------------------ scenes


def _lights(scene, rng: np.random.Generator) -> None:
    import bpy
    from mathutils import Euler

    world = bpy.data.worlds.new(f"{scene.name}_world")
    if world.node_tree is None:  # Blender < 5 creates node trees on request
        world.use_nodes = True
    bg = next(n for n in world.node_tree.nodes if n.type == "BACKGROUND")
    bg.inputs["Color"].default_value = (0.35, 0.35, 0.38, 1.0)
    bg.inputs["Strength"].default_value = 1.0
    scene.world = world
    sun = bpy.data.lights.new(f"{scene.name}_sun", "SUN")
    sun.energy = 3.0
    sun.angle = math.radians(10)
    obj = bpy.data.objects.new(f"{scene.name}_sun", sun)
    obj.rotation_euler = Euler((math.radians(40), math.radians(float(rng.uniform(-30, 30))), math.radians(30)))
    scene.collection.objects.link(obj)


def _build_named(scene, name: str, rng: np.random.Generator) -> None:
    mk = make_mesh_object
    if name == "checker_cube":
        mk(scene, "cube", "cube", make_material("cube_mat", rng, "checker"), (0, 0, 0), (0.3, 0.2, 0.5),
           (0.45, 0.45, 0.45), rng)
        mk(scene, "ball", "uv_sphere", make_material("ball_mat", rng, "glossy"), (0.55, 0.35, 0.3), scale=(0.25,) * 3)
    elif name == "glossy_spheres":
        for k, kind in enumerate(["glossy", "metal", "stripes", "flat", "noise"]):
            a = 2 * math.pi * k / 5
            mk(scene, f"s{k}", "uv_sphere", make_material(f"s{k}_mat", rng, kind),
               (0.55 * math.cos(a), 0.55 * math.sin(a), 0.1 * k - 0.2), scale=(0.28,) * 3, rng=rng)
        mk(scene, "base", "cylinder", make_material("base_mat", rng, "rings"), (0, 0, -0.55), scale=(0.9, 0.9, 0.05))
    elif name == "thin_table":
        wood = make_material("top_mat", rng, "stripes")
        mk(scene, "top", "cube", wood, (0, 0, 0.3), scale=(0.7, 0.45, 0.03))
        leg = make_material("leg_mat", rng, "metal")
        for k, (x, y) in enumerate([(-0.6, -0.37), (0.6, -0.37), (-0.6, 0.37), (0.6, 0.37)]):
            mk(scene, f"leg{k}", "cylinder", leg, (x, y, -0.15), scale=(0.025, 0.025, 0.43))
        mk(scene, "bar", "cylinder", leg, (0, -0.37, -0.35), (0, math.pi / 2, 0), (0.012, 0.012, 0.6))
        mk(scene, "vase", "cone", make_material("vase_mat", rng, "glossy"), (0.2, 0.1, 0.5), scale=(0.12, 0.12, 0.18),
           tip=0.5)
    elif name == "textured_monkey":
        mk(scene, "monkey", "monkey", make_material("monkey_mat", rng, "noise"), (0, 0, 0), (math.pi / 2, 0, 0),
           (0.6, 0.6, 0.6))
        mk(scene, "halo", "torus", make_material("halo_mat", rng, "metal"), (0, 0, 0.65), scale=(0.35, 0.35, 0.35),
           minor=0.08)
    elif name == "vertex_color_blob":
        mk(scene, "blob", "ico_sphere", make_material("blob_mat", rng, "vertex"), scale=(0.7, 0.6, 0.55), rng=rng,
           subdivisions=4, displace=0.12)
        mk(scene, "rod", "cylinder", make_material("rod_mat", rng, "flat"), (0, 0, 0.6), scale=(0.02, 0.02, 0.3))
    elif name == "stacked_blocks":
        z = -0.6
        for k in range(5):
            h = float(rng.uniform(0.08, 0.16))
            s = 0.55 - 0.08 * k
            mk(scene, f"block{k}", "cube", make_material(f"block{k}_mat", rng, ["checker", "flat", "stripes",
               "glossy", "noise"][k]), (rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05), z + h),
               (0, 0, float(rng.uniform(0, 1.5))), (s, s * 0.8, h))
            z += 2 * h
    elif name == "ring_and_cone":
        mk(scene, "ring", "torus", make_material("ring_mat", rng, "checker"), (0, 0, 0.1), (0.4, 0.2, 0),
           (0.55, 0.55, 0.55), minor=0.15)
        mk(scene, "cone", "cone", make_material("cone_mat", rng, "metal"), (0, 0, -0.2), scale=(0.3, 0.3, 0.4))
        mk(scene, "pin", "cylinder", make_material("pin_mat", rng, "flat"), (0.3, 0.3, 0.0), (0.5, 0.2, 0),
           (0.015, 0.015, 0.6))
    else:
        raise ValueError(f"unknown procedural scene {name!r}; choose one of {PROCEDURAL_SCENES} or random_<seed>")


def _build_random(scene, seed: int) -> None:
    rng = np.random.default_rng(seed)
    shapes = ["cube", "uv_sphere", "ico_sphere", "cylinder", "cone", "torus", "monkey"]
    kinds = ["flat", "glossy", "metal", "checker", "stripes", "rings", "noise", "vertex"]
    count = int(rng.integers(3, 8))
    for k in range(count):
        shape = str(rng.choice(shapes))
        r = float(rng.uniform(0.12, 0.35))
        aspect = rng.uniform(0.5, 1.5, 3)
        if rng.random() < 0.2 and shape in ("cylinder", "cube"):
            aspect = np.array([0.08, 0.08, 3.0])  # a thin rod or slat
        pos = rng.normal(size=3)
        pos = pos / np.linalg.norm(pos) * float(rng.uniform(0.0, 0.6))
        make_mesh_object(scene, f"obj{k}_{shape}", shape, make_material(f"mat{k}", rng, str(rng.choice(kinds))),
                         tuple(pos), tuple(rng.uniform(0, 2 * math.pi, 3)), tuple(r * aspect), rng,
                         displace=0.1 if shape == "ico_sphere" and rng.random() < 0.5 else 0.0, tip=0.0)


def check_procedural_name(name: str) -> None:
    """Raise ValueError unless ``name`` is one of PROCEDURAL_SCENES or ``random_<seed>``."""
    if not (name in PROCEDURAL_SCENES or (name.startswith("random_") and name[7:].isdigit())):
        raise ValueError(f"unknown procedural scene {name!r}; choose one of {PROCEDURAL_SCENES} or random_<seed>")


def build_procedural_scene(name: str, seed: int = 0):
    """Create a new ``bpy`` scene named ``npbgpp_<name>`` holding procedural scene ``name``
    (one of PROCEDURAL_SCENES or ``random_<seed>``); ``seed`` varies colours/textures of
    named scenes. Returns the scene."""
    import bpy

    check_procedural_name(name)
    scene = bpy.data.scenes.new(f"npbgpp_{name}")
    rng = np.random.default_rng([seed, sum(map(ord, name))])
    _lights(scene, rng)
    if name.startswith("random_"):
        _build_random(scene, int(name[7:]) * 1000 + seed)
    else:
        _build_named(scene, name, rng)
    return scene


def remove_scene(scene) -> None:
    """Delete a scene built here and the data blocks only it used."""
    import bpy

    objs = list(scene.collection.all_objects)
    datas = [o.data for o in objs]
    world = scene.world
    bpy.data.scenes.remove(scene)
    for o in objs:
        if o.users == 0 or all(c is None for c in o.users_collection):
            bpy.data.objects.remove(o)
    for d in datas:
        if d is not None and d.users == 0:
            mats = list(getattr(d, "materials", []))
            if isinstance(d, bpy.types.Mesh):
                bpy.data.meshes.remove(d)
            elif isinstance(d, bpy.types.Light):
                bpy.data.lights.remove(d)
            elif isinstance(d, bpy.types.Camera):
                bpy.data.cameras.remove(d)
            for m in mats:
                if m is not None and m.users == 0:
                    bpy.data.materials.remove(m)
    if world is not None and world.users == 0:
        bpy.data.worlds.remove(world)
    for img in list(bpy.data.images):
        if img.users == 0:
            bpy.data.images.remove(img)


def build_dense_instancer_scene(side: int, nested: bool = False,
                                nodes_shown_in_renders: bool | None = None) -> tuple[Any, Any]:
    """Create a new ``bpy`` scene ``npbgpp_dense_instancer`` of a flat ``side`` x ``side``
    vertex grid instancing its child at its vertices: a small triangle, or with ``nested`` an
    empty instancing a collection of two triangles (three depsgraph entries per vertex, two
    nested in the empty's). With ``nodes_shown_in_renders`` given, no child: the grid's Geometry
    Nodes put a triangle of their own on each vertex, its Show Instancer on for viewports and
    for renders as given (off: each entry, whose original is the grid, is asked whether it holds
    instances, ``surface_points._holds_instances``). The scene-points walk's worst case
    (``bench/bench_scene_walk.py``): one depsgraph entry per instance. Returns the scene and its
    evaluated viewport depsgraph; :func:`remove_scene` deletes it (the collection stays until
    the file's next purge)."""
    import bpy

    from .surface_points import evaluated_depsgraph

    scene = bpy.data.scenes.new("npbgpp_dense_instancer")
    xs, ys = np.meshgrid(np.linspace(-5.0, 5.0, side), np.linspace(-5.0, 5.0, side))
    grid_mesh = bpy.data.meshes.new("dense_grid")
    grid_mesh.from_pydata(np.stack([xs.ravel(), ys.ravel(), np.zeros(side * side)], 1).tolist(), [], [])
    grid = bpy.data.objects.new("dense_grid", grid_mesh)
    grid.instance_type = "VERTS"
    scene.collection.objects.link(grid)

    def triangle(name: str) -> Any:
        mesh = bpy.data.meshes.new(name)
        mesh.from_pydata([(0.0, 0.0, 0.0), (0.01, 0.0, 0.0), (0.0, 0.01, 0.0)], [], [(0, 1, 2)])
        return bpy.data.objects.new(name, mesh)

    if nodes_shown_in_renders is not None:
        tree = bpy.data.node_groups.new("dense_triangles", "GeometryNodeTree")
        tree.interface.new_socket("Geometry", in_out="INPUT", socket_type="NodeSocketGeometry")
        tree.interface.new_socket("Geometry", in_out="OUTPUT", socket_type="NodeSocketGeometry")
        put, shape = tree.nodes.new("GeometryNodeInstanceOnPoints"), tree.nodes.new("GeometryNodeMeshCircle")
        shape.fill_type = "NGON"
        shape.inputs["Vertices"].default_value, shape.inputs["Radius"].default_value = 3, 0.01
        tree.links.new(tree.nodes.new("NodeGroupInput").outputs[0], put.inputs["Points"])
        tree.links.new(shape.outputs[0], put.inputs["Instance"])
        tree.links.new(put.outputs[0], tree.nodes.new("NodeGroupOutput").inputs[0])
        grid.modifiers.new("dense_triangles", "NODES").node_group = tree
        grid.instance_type = "NONE"
        grid.show_instancer_for_render = nodes_shown_in_renders
        child = None
    elif nested:
        collection = bpy.data.collections.new("dense_members")
        for k in range(2):
            collection.objects.link(triangle(f"dense_member_{k}"))
        child = bpy.data.objects.new("dense_empty", None)
        child.instance_type = "COLLECTION"
        child.instance_collection = collection
    else:
        child = triangle("dense_child")
    if child is not None:
        scene.collection.objects.link(child)
        child.parent = grid
    return scene, evaluated_depsgraph(scene)
