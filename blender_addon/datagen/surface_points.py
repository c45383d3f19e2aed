"""Sampling coloured points on mesh surfaces of a bpy scene: the one surface sampler,
used for the point cloud written next to Blender renders and by the add-on's "Points
from Selected Meshes". bpy is imported inside functions only.

Points: evaluated meshes (modifiers applied, instances expanded), world space,
area-weighted uniform sampling over all triangles (seeded). Colours are the surface
albedo as sRGB in [0, 1]: the material's base colour input (Principled BSDF "Base
Color", Diffuse/Emission "Color"): an Image Texture node is looked up by UV (bilinear, or
nearest for "Closest" interpolation; repeat/clip), a Color Attribute / Attribute node
reads the mesh's colour attribute, otherwise the constant colour; meshes without a
material use their active colour attribute or mid grey. Lighting and shading are not
included.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from functools import cache, cached_property
from typing import Any, NamedTuple, TypeVar

import numpy as np

from .. import srgb

GEOMETRY_TYPES = {"MESH", "CURVE", "SURFACE", "META", "FONT"}
# Objects whose points are taken as they are (:func:`own_points`), not sampled: point clouds
# and hair curves (Blender 3.3+'s Curves objects; their strands have no surface).
POINT_TYPES = {"POINTCLOUD", "CURVES"}
MID_GREY = 0.8  # the colour of a point with no colour of its own nor a material's (an empty image's too)
T = TypeVar("T")


class NoSurfacesError(ValueError):
    """The scene (or the objects given) has no mesh surface to read: a problem of the
    scene, which a command reports as bad input, not a bug."""


def linear_to_srgb(c: np.ndarray) -> np.ndarray:
    return srgb.linear_to_srgb(c, np.float64)


def _base_color_source(mat) -> tuple:
    """('const', srgb) | ('image', image, uv_name, extension, interpolation) | ('attr', name)."""
    if mat is None:
        return ("none",)
    fallback = ("const", linear_to_srgb(np.asarray(mat.diffuse_color[:3])))
    if mat.node_tree is None:
        return fallback
    out = mat.node_tree.get_output_node("CYCLES")
    if out is None or not out.inputs["Surface"].is_linked:
        return fallback
    shader = out.inputs["Surface"].links[0].from_node
    inp = None
    for key in ("Base Color", "Color"):
        if key in shader.inputs:
            inp = shader.inputs[key]
            break
    if inp is None:
        return fallback
    if not inp.is_linked:
        return ("const", linear_to_srgb(np.asarray(inp.default_value[:3])))
    node = inp.links[0].from_node
    if node.type == "TEX_IMAGE" and node.image is not None:
        uv_name = None
        vec = node.inputs["Vector"]
        if vec.is_linked and vec.links[0].from_node.type == "UVMAP":
            uv_name = vec.links[0].from_node.uv_map or None
        return ("image", node.image, uv_name, node.extension, node.interpolation)
    if node.type == "VERTEX_COLOR":
        return ("attr", node.layer_name or None)
    if node.type == "ATTRIBUTE":
        return ("attr", node.attribute_name or None)
    return fallback


def _image_pixels(image, cache: dict) -> np.ndarray:
    """(h, w, 3) sRGB float array of a bpy image, bottom row first."""
    key = image.name
    if key not in cache:
        w, h = image.size
        if w == 0 or h == 0:
            cache[key] = np.full((1, 1, 3), MID_GREY)
        else:
            buf = np.empty(w * h * image.channels, np.float32)
            image.pixels.foreach_get(buf)
            px = buf.reshape(h, w, image.channels)[:, :, :3].astype(np.float64)
            if image.is_float or image.colorspace_settings.name not in ("sRGB", "Non-Color"):
                px = linear_to_srgb(px)
            cache[key] = px
    return cache[key]


def _sample_image(px: np.ndarray, uv: np.ndarray, extension: str, interpolation: str = "Linear") -> np.ndarray:
    h, w = px.shape[:2]
    if interpolation == "Closest":
        i, j = np.floor(uv[:, 0] * w).astype(np.int64), np.floor(uv[:, 1] * h).astype(np.int64)
        if extension == "REPEAT":
            return px[j % h, i % w]
        return px[np.clip(j, 0, h - 1), np.clip(i, 0, w - 1)]
    x = uv[:, 0] * w - 0.5
    y = uv[:, 1] * h - 0.5
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]

    def at(i, j):
        if extension == "REPEAT":
            return px[j % h, i % w]
        return px[np.clip(j, 0, h - 1), np.clip(i, 0, w - 1)]

    return (at(x0, y0) * (1 - fx) * (1 - fy) + at(x0 + 1, y0) * fx * (1 - fy)
            + at(x0, y0 + 1) * (1 - fx) * fy + at(x0 + 1, y0 + 1) * fx * fy)


def _color_attribute(mesh, name: str | None):
    attrs = mesh.color_attributes
    if name:
        return attrs.get(name)
    idx = attrs.active_color_index
    if 0 <= idx < len(attrs):
        return attrs[idx]
    return attrs[0] if len(attrs) else None


class _MeshTris:
    """World-space triangles of one evaluated mesh plus what colouring needs."""

    def __init__(self, obj_eval, matrix) -> None:
        mesh = obj_eval.to_mesh()
        try:
            mesh.calc_loop_triangles()
            nv, nt = len(mesh.vertices), len(mesh.loop_triangles)
            co = np.empty(nv * 3, np.float32)
            mesh.vertices.foreach_get("co", co)
            self.local = co.reshape(nv, 3).astype(np.float64)
            self.matrix = M = np.array(matrix, dtype=np.float64)
            self.world = self.local @ M[:3, :3].T + M[:3, 3]
            tv = np.empty(nt * 3, np.int64)
            mesh.loop_triangles.foreach_get("vertices", tv)
            self.tri_verts = tv.reshape(nt, 3)
            tl = np.empty(nt * 3, np.int64)
            mesh.loop_triangles.foreach_get("loops", tl)
            self.tri_loops = tl.reshape(nt, 3)
            mi = np.empty(nt, np.int64)
            mesh.loop_triangles.foreach_get("material_index", mi)
            self.material_index = mi
            self.uv_layers = {}
            for layer in mesh.uv_layers:
                uv = np.empty(len(mesh.loops) * 2, np.float32)
                layer.data.foreach_get("uv", uv)
                self.uv_layers[layer.name] = uv.reshape(-1, 2).astype(np.float64)
            self.active_uv = next((ly.name for ly in mesh.uv_layers if ly.active_render), None)
            self.color_attrs = {}
            for attr in mesh.color_attributes:
                n = len(attr.data)
                c = np.empty(n * 4, np.float32)
                attr.data.foreach_get("color", c)
                self.color_attrs[attr.name] = (attr.domain, linear_to_srgb(c.reshape(n, 4)[:, :3]))
            active = _color_attribute(mesh, None)
            self.active_color = active.name if active is not None else None
            self._canonical_order()
            slots = obj_eval.material_slots
            self.sources = [_base_color_source(s.material) for s in slots] or [("none",)]
        finally:
            obj_eval.to_mesh_clear()

    def _canonical_order(self) -> None:
        """Order triangles (and each triangle's corners, winding kept) by position, so
        that seeded sampling does not depend on the mesh's internal element order, which
        Blender does not keep stable between builds of the same geometry."""
        if len(self.tri_verts) == 0:
            return
        key = np.round(self.world, 6)
        vkey = np.lexsort((key[:, 2], key[:, 1], key[:, 0]))
        rank = np.empty(len(vkey), np.int64)
        rank[vkey] = np.arange(len(vkey))
        first = np.argmin(rank[self.tri_verts], axis=1)
        roll = (np.arange(3)[None, :] + first[:, None]) % 3
        rows = np.arange(len(self.tri_verts))[:, None]
        self.tri_verts = self.tri_verts[rows, roll]
        self.tri_loops = self.tri_loops[rows, roll]
        c = key[self.tri_verts].reshape(len(self.tri_verts), 9)
        order = np.lexsort(tuple(c[:, k] for k in range(8, -1, -1)))
        self.tri_verts = self.tri_verts[order]
        self.tri_loops = self.tri_loops[order]
        self.material_index = self.material_index[order]

    def corners(self) -> np.ndarray:
        return self.world[self.tri_verts]  # (T, 3, 3)

    def placed(self, matrix: Any) -> _MeshTris:
        """These triangles at the world ``matrix`` (another instance of the same geometry),
        sharing all but their world positions and areas: a mesh instanced a thousand times is
        read once."""
        other = copy.copy(self)
        other.__dict__.pop("triangle_areas", None)  # cached for this placement only
        other.matrix = M = np.array(matrix, dtype=np.float64)
        other.world = self.local @ M[:3, :3].T + M[:3, 3]
        return other

    @cached_property
    def triangle_areas(self) -> np.ndarray:
        """World-space area of each triangle: computed once, for :meth:`area` (Points from
        Selected Meshes weighs each object first) and for sampling by area (:func:`sample_triangles`)."""
        c = self.corners()
        return 0.5 * np.linalg.norm(np.cross(c[:, 1] - c[:, 0], c[:, 2] - c[:, 0]), axis=1)

    def area(self) -> float:
        """Total world-space area of the triangles (0 for a mesh flattened or scaled to nothing)."""
        return float(self.triangle_areas.sum())

    def colors(self, tri: np.ndarray, bary: np.ndarray, cache: dict) -> np.ndarray:
        out = np.full((len(tri), 3), MID_GREY)
        mats = np.clip(self.material_index[tri], 0, len(self.sources) - 1)
        for m, src in enumerate(self.sources):
            sel = np.nonzero(mats == m)[0]
            if len(sel) == 0:
                continue
            t, b = tri[sel], bary[sel]
            if src[0] == "none":
                src = ("attr", self.active_color) if self.active_color else ("const", np.full(3, MID_GREY))
            if src[0] == "const":
                out[sel] = src[1]
            elif src[0] == "image":
                uv_name = src[2] if src[2] in self.uv_layers else self.active_uv
                if uv_name is None:
                    continue
                uv = np.einsum("nk,nkc->nc", b, self.uv_layers[uv_name][self.tri_loops[t]])
                out[sel] = _sample_image(_image_pixels(src[1], cache), uv, src[3], src[4])
            elif src[0] == "attr":
                name = src[1] or self.active_color
                if name not in self.color_attrs:
                    continue
                domain, values = self.color_attrs[name]
                idx = self.tri_loops[t] if domain == "CORNER" else self.tri_verts[t]
                out[sel] = np.einsum("nk,nkc->nc", b, values[idx])
        return np.clip(out, 0.0, 1.0)


def own_points(obj_eval: Any, matrix: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """World-space points (float32 (N, 3); placed by ``matrix``, by default the object's: an
    instance's differs) and sRGB colours (float32 (N, 3) in [0, 1]) that the evaluated object
    or depsgraph entry ``obj_eval`` renders as points of its own, taken as they are, not
    sampled: a point cloud's points, and of a hair Curves object its strands' control points
    (the points the strands are drawn through); none of other kinds. Its own data only, as
    Cycles draws each depsgraph entry: the points a mesh's Geometry Nodes make come as an
    entry of their own (:func:`rendered_entries`). Colours: the points' colour attribute (of hair,
    a strand's too; the one the first material's Base Color reads by an Attribute node first,
    as renders show it), else that material's constant base colour
    (:func:`_base_color_source`), else :data:`MID_GREY`."""
    data = obj_eval.data if obj_eval.type in POINT_TYPES else None
    position = data.attributes.get("position") if data is not None else None
    n = len(position.data) if position is not None else 0
    if n == 0:  # also hair of no strands, whose offsets are empty (not one 0)
        return np.empty((0, 3), np.float32), np.empty((0, 3), np.float32)
    strand_sizes = None
    if obj_eval.type == "CURVES":
        offsets = np.empty(len(data.curves) + 1, np.int32)
        data.curve_offset_data.foreach_get("value", offsets)
        strand_sizes = np.diff(offsets)
    slots = obj_eval.material_slots
    source = _base_color_source(slots[0].material) if len(slots) else ("none",)
    fallback = np.asarray(source[1] if source[0] == "const" else np.full(3, MID_GREY), np.float64)
    read = (source[1],) if source[0] == "attr" and source[1] else ()  # the attribute the material renders
    M = np.array(obj_eval.matrix_world if matrix is None else matrix, dtype=np.float64)
    local = np.empty(n * 3, np.float32)
    position.data.foreach_get("vector", local)
    points = local.reshape(n, 3).astype(np.float64) @ M[:3, :3].T + M[:3, 3]
    colours = _own_colours(data, n, strand_sizes, read, fallback)
    return points.astype(np.float32), np.clip(colours, 0.0, 1.0).astype(np.float32)


def _entry_triangles(obj_eval: Any, matrix: Any, cache: dict) -> _MeshTris | None:
    """World-space triangles (placed by ``matrix``) of the depsgraph entry ``obj_eval`` when it
    is a mesh (a curve's, text's, surface's or metaball's evaluated mesh, and a point cloud's
    or hair's Geometry Nodes mesh, come as mesh entries of their own: :func:`rendered_entries`),
    else None. ``cache``: geometry already read this pass, by its data and materials, so each
    instance of it only moves it (:meth:`_MeshTris.placed`)."""
    if obj_eval.type != "MESH" or obj_eval.data is None:
        return None
    key = (obj_eval.data.as_pointer(), tuple(s.material.as_pointer() if s.material else 0
                                             for s in obj_eval.material_slots))
    if key not in cache:
        cache[key] = _MeshTris(obj_eval, matrix)
        return cache[key]
    return cache[key].placed(matrix)


# Instancing by vertices or faces: the object instances its children there, and renders show a
# child only there (Blender's depsgraph hides it at its own place in renders, not in viewports).
INSTANCES_CHILDREN = ("VERTS", "FACES")


def shown_only_where_instanced(obj: Any) -> bool:
    """Whether renders show the original ``obj`` only where its parent instances it at its
    vertices or faces (:data:`INSTANCES_CHILDREN`), not at its own place, where a viewport's
    depsgraph holds it too. Not a metaball: its family's one mesh holds it at its own place and
    where its parent instances it, no instance of it standing apart (measured in bpy 5.0.1, a
    render's depsgraph: a ball child of a plane instancing at its 4 vertices is a mesh of 5
    balls). A rule of :func:`rendered_entries` and of Points from Selected Meshes' skip
    reasons."""
    parent = obj.parent
    return parent is not None and parent.instance_type in INSTANCES_CHILDREN and obj.type != "META"


def instances_its_children(obj: Any, depsgraph: Any) -> bool:
    """Whether renders show ``obj``'s children where it instances them at its vertices or faces
    (:data:`INSTANCES_CHILDREN`). An instancer makes one kind of instances, the first it has of:
    its Geometry Nodes' (instances, or geometry of another type than its own, which Blender
    gives as instances), its particles' (a particle system shown in renders rendering an
    object or a collection it names), its children at its vertices or faces; its children are
    hidden at their own place all the same (:func:`shown_only_where_instanced`). Measured in
    bpy 5.0.1, a render's depsgraph: a parent whose hair renders an object or a collection,
    or whose Geometry Nodes instance an Ico Sphere on its points or make it points, instances
    its child nowhere; with particles rendering None or an object unset, its particle
    modifier off in renders, or Geometry Nodes passing its mesh through, it instances its
    child. Its particles are read at their render settings (a viewport showing them as Path
    instances the children: measured); its Geometry Nodes as ``depsgraph`` evaluates them
    (their instances are its entries' that no particle system made when none is of its
    children, whose own instances are its entries too, and the instances its evaluated
    geometry holds when it has no entry of its children: Blender holds no instance of its own
    children that its Geometry Nodes make, e.g. by an Object Info node set to As Instance;
    measured in bpy 5.0.1, both depsgraphs: such an instance, and the children at its
    vertices, are nowhere). With no Geometry Nodes modifier shown in ``depsgraph``'s mode, what
    it makes besides its particles is its children's, held or not: a child with Show Instancer
    off has no entry, only what it instances does (measured in bpy 5.0.1, both depsgraphs: an
    empty instancing a collection of a cube, the cube at each of its parent's 4 vertices)."""
    if obj.instance_type not in INSTANCES_CHILDREN or particles_instance_in_renders(obj):
        return False
    if not geometry_nodes_shown(obj, depsgraph.mode == "RENDER"):
        return True  # no Geometry Nodes' instances to take the place of its children's
    others = False
    for inst in depsgraph.object_instances:
        if (inst.is_instance and inst.parent is not None and inst.parent.original == obj
                and inst.particle_system is None):
            if inst.object.original.parent == obj:
                # its children: what they make is held beside them with ``obj`` as its parent
                # (a collection's members, their own Geometry Nodes' Object Info instances,
                # their own children: measured in bpy 5.0.1), not its Geometry Nodes' instances
                return True
            others = True
    if others:
        # its Geometry Nodes' instances, held in place of its children; or what children with Show
        # Instancer off make (they have no entry: measured in bpy 5.0.1, both depsgraphs, a plane
        # whose Geometry Nodes pass its mesh through, an empty child instancing a collection of a
        # cube: the cube at the plane's 4 vertices), when its evaluated geometry's instances are
        # its own descendants only (its children at its vertices or faces; its Geometry Nodes'
        # instances of its own children are held nowhere)
        return _makes_children_only(obj, depsgraph)
    # None held: its evaluated geometry's instances (measured in bpy 5.0.1) are its children
    # at its vertices or faces that ``depsgraph`` shows, or its Geometry Nodes' instances, also
    # of its own children, which no depsgraph holds. Metaball children are none of its entries
    # either (their family's mesh holds them), so instances of metaballs only are its children.
    import bpy

    return all(isinstance(ref, bpy.types.Object) and ref.type == "META"
               for ref in obj.evaluated_get(depsgraph).evaluated_geometry().instance_references())


def _makes_children_only(obj: Any, depsgraph: Any) -> bool:
    """Whether every instance ``obj``'s evaluated geometry holds in ``depsgraph`` is of an object
    descending from it: its children at its vertices or faces, not its Geometry Nodes'
    instances of other objects or geometry (measured in bpy 5.0.1: a plane whose Geometry Nodes
    pass its mesh through lists its children; one putting an Ico Sphere on its points, a
    Collection Info instance, lists those)."""
    import bpy

    return all(isinstance(ref, bpy.types.Object) and descends_from(ref.original, obj)
               for ref in obj.evaluated_get(depsgraph).evaluated_geometry().instance_references())


def geometry_nodes_shown(obj: Any, rendering: bool) -> bool:
    """Whether ``obj`` has a Geometry Nodes modifier shown in renders (``rendering``) or in
    viewports: only those make instances of a mesh's own (besides its particles and its children
    at its vertices or faces)."""
    shown = "show_render" if rendering else "show_viewport"
    return any(m.type == "NODES" and getattr(m, shown) for m in obj.modifiers)


def _instancer_not_shown(parent: Any, member: Any, depsgraph: Any) -> Any:
    """The descendant of ``parent`` (an instancer by vertices or faces) that an instance nested
    at a level with no entry of its own was made by, ``member`` the original object of the
    instance nested in it (None: not known): its one descendant with Show Instancer off in
    ``depsgraph``'s mode that may make ``member`` (:func:`_may_make`; measured in bpy 5.0.1,
    both depsgraphs: such an empty instancing a collection has no entry at its parent's
    vertices, the collection's members do, the parent their ``parent``). None where ``parent``'s
    Geometry Nodes make instances of their own (:func:`_makes_children_only`; a Geometry Nodes'
    collection instance has no entry either), or no such descendant or several may make it (two
    empties instancing one collection, an empty beside a descendant with Geometry Nodes or
    particles: not told apart). A particle instance of ``parent``'s, which has no entry at the
    first level either, is the caller's to tell apart (its ``particle_system``)."""
    rendering = depsgraph.mode == "RENDER"
    if geometry_nodes_shown(parent, rendering) and not _makes_children_only(parent, depsgraph):
        return None
    flag = "show_instancer_for_render" if rendering else "show_instancer_for_viewport"
    unseen = [o for o in parent.children_recursive if not getattr(o, flag)
              and (member is None or _may_make(o, member, rendering))]
    return unseen[0] if len(unseen) == 1 else None


def _may_make(obj: Any, member: Any, rendering: bool) -> bool:
    """Whether an instance of the original ``member`` may be one that ``obj`` makes, or ``obj``'s
    own geometry nested in its entry (a curve's mesh: :func:`rendered_entries`): False only
    where ``obj`` surely makes none of it (no Geometry Nodes shown in renders, ``rendering``, or
    viewports, no particle systems, and ``member`` neither in the collection it instances nor a
    descendant it instances at its vertices or faces), so that an instance is not taken as
    nested in an object that cannot have made it."""
    if member == obj or geometry_nodes_shown(obj, rendering) or len(obj.particle_systems):
        return True
    if obj.instance_type == "COLLECTION":
        return obj.instance_collection is not None and member in obj.instance_collection.all_objects.values()
    return obj.instance_type in INSTANCES_CHILDREN and descends_from(member, obj)


def particles_instance_in_renders(obj: Any) -> bool:
    """Whether a particle system of ``obj`` shown in renders renders an object or a collection
    it names: renders then show its particles' instances in place of its children's
    (:func:`instances_its_children`). A viewport showing the particles otherwise than as
    rendered (Display As Path or None) instances the children there instead (measured in bpy
    5.0.1), which :func:`rendered_entries` leaves out."""
    for modifier in getattr(obj, "modifiers", ()):
        if modifier.type == "PARTICLE_SYSTEM" and modifier.show_render:
            settings = modifier.particle_system.settings
            if settings is not None and (settings.render_type == "OBJECT" and settings.instance_object is not None
                                         or settings.render_type == "COLLECTION"
                                         and settings.instance_collection is not None):
                return True
    return False


def not_shown_itself_in_renders(obj: Any) -> bool:
    """Whether renders leave out ``obj``'s own geometry and show only what it instances: a
    particle emitter with Show Emitter off, or an instancer by vertices or faces with Show
    Instancer off, for renders (the depsgraph entry's ``show_self``). Besides, the flag hides an
    entry whose evaluated geometry holds instances (:func:`_holds_instances`), e.g. a mesh
    whose Geometry Nodes make some, told per entry, not per object (:func:`rendered_entries`);
    it means nothing to other objects. A rule of :func:`rendered_entries`."""
    return not obj.show_instancer_for_render and bool(len(obj.particle_systems)
                                                      or obj.instance_type in INSTANCES_CHILDREN)


# Per object type, the geometry it has of its own (bpy's GeometrySet): any other, like instances,
# is made as entries of their own
_OWN_GEOMETRY = {"MESH": "mesh", "POINTCLOUD": "pointcloud", "CURVES": "curves", "VOLUME": "volume",
                 "GREASEPENCIL": "grease_pencil"}


def _holds_instances(obj_eval: Any) -> bool:
    """Whether the evaluated object or depsgraph entry ``obj_eval`` holds instances or geometry of
    another type than its own (Blender makes those entries of their own), so that Show
    Instancer off hides its own geometry, and what its Geometry Nodes make stays shown
    (measured in bpy 5.0.1, a render's depsgraph, Show Instancer off for renders: of a ball whose
    Geometry Nodes add an Object Info instance of a cube, Ico Spheres on its vertices or its
    vertices as points, the ball's own mesh is not there, also as an instanced collection's
    member, the cube, the 12 Ico Spheres, the points are; with its mesh passed through only, the
    ball is). Not a camera's, a light's, an empty's: they have no geometry to hide (bpy's
    ``evaluated_geometry`` refuses them)."""
    if obj_eval.type not in GEOMETRY_TYPES | POINT_TYPES | {"VOLUME", "GREASEPENCIL"}:
        return False
    geometry = obj_eval.evaluated_geometry()
    own = _OWN_GEOMETRY.get(obj_eval.type)
    return len(geometry.instance_references()) > 0 or any(
        getattr(geometry, name) is not None for name in _OWN_GEOMETRY.values() if name != own)


def hidden_by_its_instances(obj: Any, obj_eval: Any) -> bool:
    """Whether renders leave out ``obj_eval`` (an evaluated object or depsgraph entry of the
    original ``obj``) for what it holds: Show Instancer off for renders, and it holds instances
    or geometry of another type (:func:`_holds_instances`). The rule :func:`rendered_entries`
    leaves such an entry out by, and Points from Selected Meshes names such an object by."""
    return not obj.show_instancer_for_render and _holds_instances(obj_eval)


# persistent_id's places an entry leaves unused: an instance made directly by its instancer
# (``inst.parent``) uses the first only, one nested in another instance one more per level
# (measured in bpy 5.0.1)
UNUSED_ID = 2**31 - 1


def _used_id(inst: Any) -> tuple[int, ...]:
    """The places of the depsgraph entry ``inst``'s ``persistent_id`` it uses, innermost index
    first: one for an instance its instancer makes itself, two for one nested in such an
    instance, and so on. The entry it is nested in at level ``k`` has this id's last ``k``
    places (measured in bpy 5.0.1), including one with no entry of its own (a Geometry Nodes'
    collection instance, an instancer with Show Instancer off)."""
    ids = inst.persistent_id
    if ids[1] == UNUSED_ID:  # most entries of a dense instancer: two places read, not all eight
        first = ids[0]
        return (first,) if first != UNUSED_ID else ()
    ids = tuple(ids)
    return ids[:ids.index(UNUSED_ID)] if UNUSED_ID in ids else ids


def descends_from(obj: Any, ancestor: Any) -> bool:
    """Whether ``ancestor`` is ``obj``'s parent, or its parent's, and so on: an instancer by
    vertices or faces instances all such objects (measured in bpy 5.0.1: a plane's grandchild
    at the plane's 4 vertices, besides where its own parent instances it)."""
    parent = obj.parent
    while parent is not None:
        if parent == ancestor:
            return True
        parent = parent.parent
    return False


def _descendant_disabled_in_renders(within: Sequence[_ObjectRules]) -> bool:
    """Whether an entry instanced within the objects whose rules are ``within``
    (:func:`rendered_entries`' ``within``, :func:`_object_rules` of each) is, or is nested in, an
    instance of a descendant disabled in renders that an instancer by vertices or faces makes:
    renders instance it nowhere, nor what it makes (measured in bpy 5.0.1, a render's
    depsgraph: a ball's child cube disabled in renders is at neither the ball's vertices nor
    the vertices of the plane instancing the ball, of which the ball is a child). Geometry
    Nodes' and particles' instances of an object disabled in renders are rendered: not asked."""
    return within[0].hide_render or any(
        inner.hide_render and outer.instances_children and outer.pointer in inner.ancestors  # descends_from
        for outer, inner in zip(within, within[1:], strict=False))


class _ObjectRules(NamedTuple):
    """What :func:`rendered_entries` asks of an original object, read once per walk."""

    pointer: int  # as_pointer(): the key of the walk's paths per instancer, what sets of objects hold
    ancestors: frozenset[int]  # its parent's, its parent's parent's, ... as_pointer(): :func:`descends_from`
    instances_children: bool  # an instancer by vertices or faces (:data:`INSTANCES_CHILDREN`)
    shown_only_where_instanced: bool  # :func:`shown_only_where_instanced`
    not_shown_itself: bool  # :func:`not_shown_itself_in_renders`
    shown_in_viewports_only: bool  # Show Instancer on for viewports, off for renders
    hide_render: bool


def _object_rules(obj: Any) -> _ObjectRules:
    """:class:`_ObjectRules` of the original object ``obj``, read now."""
    ancestors = []
    parent = obj.parent
    while parent is not None:
        ancestors.append(parent.as_pointer())
        parent = parent.parent
    return _ObjectRules(obj.as_pointer(), frozenset(ancestors), obj.instance_type in INSTANCES_CHILDREN,
                        shown_only_where_instanced(obj), not_shown_itself_in_renders(obj),
                        obj.show_instancer_for_viewport and not obj.show_instancer_for_render, obj.hide_render)


def rendered_entries(depsgraph: Any) -> Iterator[tuple[Any, Any, tuple[Any, ...]]]:
    """``(inst, stands_for, within)`` for each entry ``inst`` of ``depsgraph.object_instances``
    (a viewport's or a render's) that renders show, with the original object it is part of: the
    entry's own object, or for an instance its instancer (``inst.parent``; for an instance
    within an instanced collection the outermost instancer, measured in bpy 5.0.1). ``within``:
    for an instance its instancer makes of a descendant at its vertices or faces
    (:data:`INSTANCES_CHILDREN`), or one nested in such an instance (the instances that
    descendant makes: an instanced collection's objects, its Geometry Nodes' instances, its own
    children at its vertices), the originals it is instanced within, from that descendant down
    to its own object; else empty. Measured in bpy 5.0.1: a nested instance's ``parent`` is the
    outermost instancer, and it follows the instance it is nested in, its ``persistent_id`` one
    place longer and ending in that one's (:func:`_used_id`), which is how it is told apart; a
    level with no entry of its own (a Geometry Nodes' collection instance, an instancer with
    Show Instancer off) is told by that id, and left out of ``within``, but for a descendant
    with Show Instancer off at its vertices or faces (:func:`_instancer_not_shown`: the one such
    descendant that may make what is nested in it, as an empty's collection holds it, of an
    instancer whose Geometry Nodes, if any, make no instances of their own; not its particles'
    instances, which name their ``particle_system``; measured in bpy 5.0.1, both depsgraphs, a
    plane with Geometry Nodes passing its mesh through, or hair rendered as Path, and two such
    empties instancing one cube each: each cube at the plane's 4 vertices, its ``parent`` the
    plane, its id two places long). Of a parent of one vertex or face, an instance of such a
    descendant has the id its sibling before it had there, and is taken as nested in that sibling
    only where the sibling may make it (:func:`_may_make`). Not told apart: several such
    descendants that may make it (two empties instancing one collection, or one with Geometry
    Nodes or particles of its own, whose instances are unknown before they are read), where its
    instances are taken as the parent's, within none. The one
    walk over what renders show, its rules written once; which objects a caller takes
    (:func:`rendered_parts`: a selection; :func:`_shown_geometry`: the view layer, through
    :func:`seen_by_camera`) and how it reads each entry are the caller's.

    Measured in bpy 5.0.1: ``depsgraph.object_instances`` gives a curve, text, NURBS surface
    or metaball object as an entry whose data is not a mesh plus its evaluated mesh as an
    instance of its own; a mesh's Geometry Nodes points, a point cloud's or hair's Geometry
    Nodes mesh likewise; a Geometry Nodes instance of an object as that object, of other
    geometry (an Ico Sphere node's) as a temporary object of that geometry, each with its
    world matrix and ``parent`` the object whose modifier made it (also for nested
    instances). Cycles draws each entry's own data only, so a caller reads each once: its
    mesh (:func:`_entry_triangles`) or its points (:func:`own_points`).

    Left out:

    - an entry whose ``show_self`` is off, which Cycles skips (measured: a particle emitter
      with Show Emitter off, or an instancer with Show Instancer off, is an entry with it
      off); a viewport's depsgraph sets it by the viewport's flag, so an entry of such an
      object is also left out when the flag is off for renders
      (:func:`not_shown_itself_in_renders`): its own, its Geometry Nodes' output, and an
      instance of it (a collection instance's member, an Object Info instance; measured in bpy
      5.0.1: a render's depsgraph has each with ``show_self`` off, or not at all); and of an
      object with it off for renders only, an entry holding instances (:func:`hidden_by_its_instances`:
      its own mesh, an instance of it, not the instances and points its Geometry Nodes make);
    - all of an object that its parent instances at its vertices or faces, at its own place
      (its evaluated mesh, its instances): renders show it only where its parent instances it
      (:func:`shown_only_where_instanced`), which only the viewport's depsgraph also holds here;
    - an instance of such a child disabled in renders, and all nested in it: renders instance
      it nowhere, nor what it makes; only the viewport's depsgraph holds them (measured in bpy
      5.0.1: an empty instancing a collection, and a ball making an Object Info instance of a
      cube, each disabled in renders: a render's depsgraph holds neither at the parent's
      vertices, nor the cubes they make there);
    - of a viewport's depsgraph, a parent's instance of such a child, and all nested in it,
      where the parent's particles instance in renders (:func:`particles_instance_in_renders`):
      renders show those instead; a viewport displaying the particles as Path or None holds the
      child's (measured in bpy 5.0.1). Not emulated: the converse, a particle modifier shown in
      viewports only (the viewport holds its instances, renders the child's), nor Geometry
      Nodes shown in one of them only;
    - of a viewport's depsgraph, an instance of an object that renders leave out of an
      instanced collection (:func:`instances_not_rendered` of its instancer: particles' and
      Geometry Nodes' collections too; for one nested in an instance of a descendant, of that
      descendant: measured in bpy 5.0.1, a render's depsgraph holds no member disabled in
      renders, nor one of a collection disabled in renders, of an empty its parent instances at
      its vertices), and the particles such an object emits; a render's
      holds none, and its Object Info instances of such an object do render. Not told apart:
      the instances such an object's own Geometry Nodes make (the entry names only the
      outermost instancer), which a viewport's depsgraph holds (a render's leaves out such an
      object and all it makes, as it does its particles).

    Kept: particles' and Geometry Nodes' instances of an object disabled in renders (the usual
    way to scatter one), also those a collection instance's member makes (measured in bpy
    5.0.1: a render's depsgraph holds such a member's Object Info instance of a quad disabled
    in renders, its parent the collection's instancer, and Cycles draws it)."""
    viewport = depsgraph.mode != "RENDER"
    # What the rules ask of an object (bpy hashes and compares a struct by its pointer) is read
    # once per walk, not once per entry: a dense instancer's or particle system's entries are
    # almost all of one object, and each read of a bpy property costs about as much as the rest
    # of an entry's work. Per original object met, its flags:
    rules_of = cache(_object_rules)
    # viewport only: per instancer, the objects it instances that renders leave out; per such
    # set of objects, the particle systems they emit
    not_rendered = cache(lambda source: frozenset(instances_not_rendered(source)))
    systems_of = cache(lambda objects: _particle_systems(objects, depsgraph))
    # viewport only: per instancer, whether its particles instance in renders
    particles_instance = cache(particles_instance_in_renders)
    # per instancer by vertices or faces and the original nested next (None: not known): its
    # descendant an instance nested in a first level with no entry is in (:func:`_instancer_not_shown`)
    instancer_not_shown = cache(lambda parent, member: _instancer_not_shown(parent, member, depsgraph))
    # per (object, original): whether an instance of that original may be nested in that object's (:func:`_may_make`)
    may_make = cache(lambda obj, member: _may_make(obj, member, not viewport))
    # per instancer by vertices or faces (as_pointer()): for its last entry and each level it is
    # nested in, outermost first, that level's used persistent_id and original object (None: its
    # own particles' instance, or a level with no entry); read before any entry is left out, as
    # what follows may be nested in it
    paths: dict[int, list[tuple[tuple[int, ...], Any]]] = {}
    for inst in depsgraph.object_instances:
        obj = inst.object.original
        own = rules_of(obj)
        parent = inst.parent if inst.is_instance else None
        instanced = parent is not None
        if instanced:
            stands_for = parent.original
            its = rules_of(stands_for)
            # what the particles such an object emits are told apart by, and which of its own instances
            # a parent instancing its children makes (read once per entry)
            system = inst.particle_system if viewport or its.instances_children else None
        else:
            stands_for, its = obj, own
        within: tuple[Any, ...] = ()
        if instanced and its.instances_children:
            key = its.pointer
            used = _used_id(inst)
            depth = len(used)
            # an entry read before is the one this is nested in only where its id is this id's
            # tail: an outer level with no entry (a Geometry Nodes' collection instance, an
            # instancer with Show Instancer off) is not taken for the last entry of that level
            if depth == 1:  # most entries of a dense instancer: nested in none
                path = [(used, obj if system is None else None)]
                if system is None and key in own.ancestors:  # descends_from
                    within = (obj,)
            else:
                outer = {len(ids): (ids, o) for ids, o in paths.get(key, ()) if len(ids) < depth}
                path = [outer[level] if level in outer and outer[level][0] == used[depth - level:]
                        else (used[depth - level:], None) for level in range(1, depth)]
                entry_there = 1 in outer and outer[1][0] == used[depth - 1:]
                if entry_there and depth == 2 and outer[1][1] is not None:
                    # of a parent of one vertex or face, the entry read before there may be a sibling's
                    # (its id is this one's tail too), which cannot have made this instance
                    entry_there = may_make(outer[1][1], obj)
                    if not entry_there:
                        path[0] = (used[1:], None)
                if not entry_there and system is None:  # no entry at its vertex or face (not its own particles')
                    member = obj if depth == 2 else path[1][1]  # what is nested in it, if known
                    path[0] = (path[0][0], instancer_not_shown(stands_for, member))
                path.append((used, obj))
                # not within its own particles' instances, nor within one it has no entry of
                if path[0][1] is not None and key in rules_of(path[0][1]).ancestors:  # descends_from
                    within = tuple(o for _, o in path if o is not None)
            paths[key] = path
        if not inst.show_self:
            continue
        if its.shown_only_where_instanced:
            continue
        if own.not_shown_itself:  # a viewport's show_self followed the viewport's flag
            continue
        if viewport and own.shown_in_viewports_only and hidden_by_its_instances(obj, inst.object):
            continue  # likewise, an entry whose instances hide it in renders
        if not instanced:
            yield inst, stands_for, within
            continue
        if within:  # only an entry of an instancer by vertices or faces: ``key`` is its, read above
            # a one-object within is this entry's own object (depth 1)
            disabled = own.hide_render if len(within) == 1 else _descendant_disabled_in_renders(
                [rules_of(o) for o in within])
            if viewport and particles_instance(stands_for) or disabled:
                continue  # a descendant instanced at vertices / faces that renders do not instance, or nested in one
        if viewport:
            # nested in an instance of a descendant: what that descendant instances (its collection's
            # members), not the parent, which instances its descendants only
            left_out = not_rendered(within[0] if len(within) > 1 else stands_for)
            if own.pointer in left_out:
                continue  # also its Geometry Nodes instances (their original is the object)
            # particles such an object emits (its Geometry Nodes' are not told apart)
            if system is not None and system.as_pointer() in systems_of(left_out):
                continue
        yield inst, stands_for, within


def _particle_systems(objects: frozenset[int], depsgraph: Any) -> set[int]:
    """The particle systems (``as_pointer()``) of ``depsgraph``'s evaluated copies of the
    original objects ``objects`` (``as_pointer()``): what its particle instances name as their
    ``particle_system`` (measured in bpy 5.0.1), so that those of an object renders leave out
    can be told apart."""
    if not objects:
        return set()
    import bpy

    return {system.as_pointer() for obj in bpy.data.objects if obj.as_pointer() in objects and len(obj.particle_systems)
            for system in obj.evaluated_get(depsgraph).particle_systems}


def rendered_parts(depsgraph: Any, owners: Sequence[Any], originals: Sequence[Any] | None = None
                   ) -> list[tuple[list[_MeshTris], list[tuple[np.ndarray, np.ndarray]]]]:
    """Per object of ``owners`` (originals in ``depsgraph``'s view layer): the triangles (one
    :class:`_MeshTris` per mesh entry, empty ones left out) and :func:`own_points` (non-empty
    ones) of every depsgraph entry renders show of it (:func:`rendered_entries`), each at its
    own place: its own, the parts Blender evaluates for it as entries of their own, and every
    instance it makes (Geometry Nodes instances, an instanced collection's objects, particles'
    objects; nested ones too). Whether the view layer renders the owners themselves is not
    asked: they are what the caller chose.

    ``originals``: the objects ``owners`` are copies of (``importers.render_setting_copies``),
    if they are: a copy has no children, so an original instancing its children by vertices or
    faces (:data:`INSTANCES_CHILDREN`) gives its copy those instances, and a copy of such a
    child renders nothing of its own (Blender shows it only where its parent instances it, in
    renders; measured in bpy 5.0.1: the viewport's depsgraph holds it at its own place too).
    A copy keeps its parent, so that parent instances the child's copy too (measured in bpy
    5.0.1): a child with a copy is taken as its copy's instances only (once, at the render's
    settings), and what it makes there (a collection's, its Geometry Nodes' instances) as what
    its copy makes; but a copy has no children, so the original child's instances of its own
    descendants at its vertices or faces are taken (measured in bpy 5.0.1: a render's
    depsgraph holds the cubes an empty instancing a collection makes at each of its parent's
    vertices, its copy's too; the cubes a ball instancing its child cube makes there, none of
    its copy's). An owner may be its original itself (one holding a simulation, whose cache a
    copy lacks): its Show Instancer / Show Emitter for renders then leaves out its own entry,
    as a copy's does (:func:`rendered_entries`; a copy shows it in viewports)."""
    index = {o.as_pointer(): k for k, o in enumerate(owners)}
    # an original instancing its children -> its copy's index
    by_children = {o.as_pointer(): k for k, o in enumerate(originals or ()) if o.instance_type in INSTANCES_CHILDREN}
    # originals among owners' copies: a copy keeps its parent, so a parent instancing its children
    # instances the copy of a child too, at the render's settings (the child at the viewport's)
    copied = {o.as_pointer() for o, owner in zip(originals or owners, owners, strict=True) if o != owner}
    out: list[tuple[list[_MeshTris], list[tuple[np.ndarray, np.ndarray]]]] = [([], []) for _ in owners]
    cache: dict = {}
    for inst, stands_for, within in rendered_entries(depsgraph):
        # within: a parent's instance of its descendant at its vertices or faces, or one nested in it: the only
        # instances of its descendants a parent instancing its children makes (measured in bpy 5.0.1: its
        # particles' or Geometry Nodes' instances of such a child are not in the depsgraph)
        if within and within[0].as_pointer() in copied and not (len(within) > 1
                                                                 and descends_from(within[1], within[0])):
            # its copy's instance stands for it, once, and what the copy makes (its collection's, Geometry
            # Nodes', particles' instances) for what it makes; the copy has no children, so the child's own
            # instances of its descendants at its vertices or faces are the original's
            continue
        k = index.get(stands_for.as_pointer())
        if k is None and within:  # the original's instance of a descendant of its own (or of the child's copy)
            k = by_children.get(stands_for.as_pointer())
        if k is None:
            continue
        tris = _entry_triangles(inst.object, inst.matrix_world, cache)
        if tris is not None and len(tris.tri_verts):
            out[k][0].append(tris)
        points = own_points(inst.object, inst.matrix_world)
        if len(points[0]):
            out[k][1].append(points)
    return out


def collection_members(obj: Any) -> tuple[set[int], set[int], list[str]]:
    """For ``obj`` instancing a collection (else empty): the objects of that collection and its
    children, and of the collections its empties instance in turn (``as_pointer()``), those a
    render draws (neither the object nor a collection or instancing empty on its way disabled
    in renders), and the names of those it draws that are hidden in viewports (the
    object's or a collection's monitor icon). Measured in bpy 5.0.1: a collection instance in
    the viewport's depsgraph holds the objects shown in viewports, the render's those shown in
    renders; Python evaluates only the viewport's outside a render."""
    collection = getattr(obj, "instance_collection", None)
    if obj.instance_type != "COLLECTION" or collection is None:
        return set(), set(), []
    return _collection_visibility(collection)


def instances_not_rendered(obj: Any) -> set[int]:
    """The objects (``as_pointer()``) that ``obj`` instances from a collection (as an instancer,
    by its particle systems or by its Geometry Nodes) whose instances the viewport's depsgraph
    holds but renders leave out: :func:`collection_members` and
    :func:`_particle_collections_not_rendered`, the one rule every sampling of a viewport's
    depsgraph applies so that it takes what renders show."""
    members, rendered, _ = collection_members(obj)
    return (members - rendered) | _particle_collections_not_rendered(obj)


def _particle_collections_not_rendered(obj: Any) -> set[int]:
    """The objects (``as_pointer()``) of the collections ``obj``'s particle systems instance, or
    its Geometry Nodes by a Collection Info node (:func:`_node_collections`), that renders leave
    out (disabled in renders: :func:`collection_members`' rule; measured in bpy 5.0.1 for both:
    the viewport's depsgraph holds their instances, the render's not). An object disabled in
    renders that the same Geometry Nodes also instance by Object Info (which renders) is left
    out too: the depsgraph's entries do not say which node made them."""
    collections = [s.instance_collection for s in (p.settings for p in getattr(obj, "particle_systems", ()))
                   if s is not None and s.render_type == "COLLECTION" and s.instance_collection is not None]
    out: set[int] = set()
    for collection in collections + _node_collections(obj):
        members, rendered, _ = _collection_visibility(collection)
        out |= members - rendered
    return out


def unmuted_nodes(tree: Any) -> Iterator[Any]:
    """The nodes of the node tree ``tree`` (None: none) and of the node groups it uses, at any
    depth (each group once), that are not muted: what Blender evaluates. A muted node passes
    its inputs through to outputs of their type, or outputs nothing (measured in bpy 5.0.1, a
    render's depsgraph: a muted Collection Info node, or a muted group node holding one,
    instances none of its collection), so neither it nor a muted group's nodes make anything."""
    seen: set[int] = set()
    trees = [tree]
    while trees:
        tree = trees.pop()
        if tree is None or tree.as_pointer() in seen:
            continue
        seen.add(tree.as_pointer())
        for node in tree.nodes:
            if node.mute:
                continue
            yield node
            if getattr(node, "node_tree", None) is not None:
                trees.append(node.node_tree)


def _node_collections(obj: Any) -> list[Any]:
    """The collections ``obj``'s Geometry Nodes modifiers may instance: each unmuted Collection
    Info node's collection set in the node (:func:`unmuted_nodes`) and each collection the
    modifier is given as an input."""
    found: list[Any] = []
    for modifier in getattr(obj, "modifiers", ()):
        if modifier.type != "NODES" or modifier.node_group is None:
            continue
        for node in unmuted_nodes(modifier.node_group):
            if node.bl_idname == "GeometryNodeCollectionInfo":
                socket = node.inputs[0]
                if not socket.is_linked and socket.default_value is not None:
                    found.append(socket.default_value)
        for item in modifier.node_group.interface.items_tree:
            if getattr(item, "socket_type", None) == "NodeSocketCollection":
                value = modifier.get(item.identifier)
                if value is not None and hasattr(value, "all_objects"):
                    found.append(value)
    return found


def _collection_visibility(collection: Any) -> tuple[set[int], set[int], list[str]]:
    """:func:`collection_members` of an instanced ``collection``."""
    members: set[int] = set()
    rendered: set[int] = set()
    hidden: list[str] = []

    walked: set[tuple[int, bool, bool]] = set()

    def walk(coll: Any, renders: bool, shows: bool) -> None:
        renders, shows = renders and not coll.hide_render, shows and not coll.hide_viewport
        if (coll.as_pointer(), renders, shows) in walked:  # a collection met twice the same way
            return
        walked.add((coll.as_pointer(), renders, shows))
        for member in coll.objects:
            members.add(member.as_pointer())
            if renders and not member.hide_render:
                rendered.add(member.as_pointer())
                if not (shows and not member.hide_viewport) and member.name not in hidden:
                    hidden.append(member.name)
            nested = member.instance_collection if member.instance_type == "COLLECTION" else None
            if nested is not None:  # its instances are the top instancer's too (nested ones)
                walk(nested, renders and not member.hide_render, shows and not member.hide_viewport)
        for child in coll.children:
            walk(child, renders, shows)

    walk(collection, True, True)
    return members, rendered, sorted(hidden)


def _own_colours(data: Any, n: int, strand_sizes: np.ndarray | None, read: Sequence[str],
                 fallback: np.ndarray) -> np.ndarray:
    """(n, 3) sRGB colours of the ``n`` points of ``data`` (a point cloud or curves): the colour
    attribute named in ``read`` (what the material reads), else one of the points (one of
    :data:`~blender_addon.point_source.COLOR_NAMES` first), else of the strands (curves:
    repeated over each strand's ``strand_sizes`` points), else ``fallback`` for all."""
    from ..point_source import COLOR_NAMES

    domains = ("POINT",) if strand_sizes is None else ("POINT", "CURVE")
    found = [a for a in data.attributes if a.data_type in ("FLOAT_COLOR", "BYTE_COLOR") and a.domain in domains]
    found.sort(key=lambda a: (a.name not in read, domains.index(a.domain), a.name not in COLOR_NAMES))
    if not found:
        return np.broadcast_to(fallback, (n, 3))
    attr = found[0]
    rgba = np.empty(len(attr.data) * 4, np.float32)
    attr.data.foreach_get("color_srgb", rgba)
    rgb = rgba.reshape(-1, 4)[:, :3].astype(np.float64)
    return rgb if attr.domain == "POINT" else np.repeat(rgb, strand_sizes, axis=0)


def evaluated_depsgraph(bpy_scene):
    """The evaluated dependency graph of ``bpy_scene``'s first view layer (works for a
    scene that is not the window's current one)."""
    import bpy

    with bpy.context.temp_override(scene=bpy_scene, view_layer=bpy_scene.view_layers[0]):
        return bpy.context.evaluated_depsgraph_get()


def _rendered_collections(layer_collection: Any, out: set[int] | None = None) -> set[int]:
    """The collections (``as_pointer()``) whose objects a render of the view layer draws:
    neither excluded nor disabled in renders, nor inside such a collection."""
    out = set() if out is None else out
    if layer_collection.exclude or layer_collection.collection.hide_render:
        return out
    out.add(layer_collection.collection.as_pointer())
    for child in layer_collection.children:
        _rendered_collections(child, out)
    return out


def seen_by_camera(inst: Any, stands_for: Any, view_layer: Any, rendered: set[int]) -> bool:
    """Whether a render of ``view_layer`` shows directly, as Cycles takes it, the depsgraph
    instance ``inst`` that renders show as part of ``stands_for`` (:func:`rendered_entries`,
    whose rules are not repeated here): ``stands_for`` (its instancer, for an instance) is not
    disabled in renders, which leave out all it makes too (measured in bpy 5.0.1: a render's
    depsgraph holds neither such an emitter's particle instances nor such a curve's evaluated
    mesh, the viewport's both; an instance *of* an object disabled in renders is shown:
    :func:`rendered_entries`), the object and ``stands_for`` are both visible to camera rays,
    and ``stands_for`` is in one of the ``rendered`` collections
    (:func:`_rendered_collections`) and neither Holdout (a hole in the image) nor Indirect Only
    there (Blender's own ``holdout_get`` / ``indirect_only_get``: the object's flag or any of
    its view-layer collections'). As Cycles takes an instance (measured in bpy 5.0.1): camera
    rays by the instanced object's flag and its instancer's, Holdout by the instancer's only
    (a collection instance's quad marked Holdout renders opaque). Even a render's depsgraph
    (:func:`during_a_render`) holds Holdout, Indirect Only and objects hidden from camera
    rays, and the viewport's also those disabled in renders: their points were not in the
    photos."""
    obj = inst.object.original
    if stands_for.hide_render or not (obj.visible_camera and stands_for.visible_camera):
        return False
    if not any(c.as_pointer() in rendered for c in stands_for.users_collection):
        return False
    return not (stands_for.holdout_get(view_layer=view_layer) or stands_for.indirect_only_get(view_layer=view_layer))


def scene_triangles(bpy_scene, objects: Sequence[Any] | None = None, depsgraph: Any = None) -> list[_MeshTris]:
    """Evaluated world-space triangles of every geometry object (instances included) of
    ``depsgraph`` (by default the viewport's of ``bpy_scene``'s first view layer) that a
    render of its view layer shows directly (:func:`_shown_geometry`), or of ``objects``
    only (each once at its own place, whether render-visible or not). Only a render's
    depsgraph (:func:`during_a_render`) holds objects disabled in viewports, shows an emitter
    or instancer itself by its Show Emitter / Show Instancer for renders (a viewport's entry's
    ``show_self`` follows the viewport's: :func:`rendered_entries`) and evaluates modifiers as
    a render does."""
    if depsgraph is None:
        depsgraph = evaluated_depsgraph(bpy_scene)
    out = []
    if objects is not None:
        for obj in objects:
            if obj.type not in GEOMETRY_TYPES:
                continue
            ev = obj.evaluated_get(depsgraph)
            tris = _MeshTris(ev, ev.matrix_world.copy())
            if len(tris.tri_verts):
                out.append(tris)
        return out
    return _shown_geometry(depsgraph, points=False)[0]


def _shown_geometry(depsgraph: Any, surfaces: bool = True, points: bool = True
                    ) -> tuple[list[_MeshTris], tuple[np.ndarray, np.ndarray]]:
    """What a render of ``depsgraph``'s view layer shows directly (:func:`rendered_entries`
    that are :func:`seen_by_camera`), each instance at its own place, from one pass over its
    entries: the triangles of its mesh entries (with ``surfaces``; a curve's, text's,
    surface's or metaball's evaluated mesh is one) and the :func:`own_points` (and colours) of
    its point cloud and hair entries (with ``points``; empty without), each entry read once."""
    view_layer = depsgraph.view_layer
    rendered = _rendered_collections(view_layer.layer_collection)
    types = GEOMETRY_TYPES | POINT_TYPES if points else GEOMETRY_TYPES
    meshes = []
    parts = [(np.empty((0, 3), np.float32), np.empty((0, 3), np.float32))]
    cache: dict = {}
    for inst, stands_for, _ in rendered_entries(depsgraph):
        obj = inst.object
        if obj.type not in types or not seen_by_camera(inst, stands_for, view_layer, rendered):
            continue
        if surfaces:
            tris = _entry_triangles(obj, inst.matrix_world, cache)
            if tris is not None and len(tris.tri_verts):
                meshes.append(tris)
        if points:
            parts.append(own_points(obj, inst.matrix_world))
    return meshes, (np.concatenate([p for p, _ in parts]), np.concatenate([c for _, c in parts]))


def sample_surface_points(bpy_scene, count: int, seed: int = 0, objects: Sequence[Any] | None = None,
                          depsgraph: Any = None, what: str = "") -> tuple[np.ndarray, np.ndarray]:
    """``count`` points (float32 (N, 3)) uniformly on the render-visible surfaces (or on
    ``objects``' surfaces) and their sRGB albedo colours (float32 (N, 3) in [0, 1]);
    ``what``: what errors call the objects (by default their names; copies' are not the
    user's)."""
    meshes = scene_triangles(bpy_scene, objects, depsgraph)
    what = what or (f"scene {bpy_scene.name!r}" if objects is None else f"objects {[o.name for o in objects]}")
    return sample_triangles(meshes, count, seed, what)


def sample_triangles(meshes: list[_MeshTris], count: int, seed: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """:func:`sample_surface_points` of triangles already read (:func:`rendered_parts`,
    :func:`scene_triangles`; ``what``: their owner, for errors)."""
    if not meshes:
        raise NoSurfacesError(f"{what}: no visible mesh surfaces to sample points on")
    areas = np.concatenate([m.triangle_areas for m in meshes])
    total = areas.sum()
    if not total > 0:
        raise NoSurfacesError(f"{what}: meshes have zero surface area")
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(areas), size=count, p=areas / total)
    r1, r2 = rng.random(count), rng.random(count)
    s1 = np.sqrt(r1)
    bary = np.stack([1 - s1, s1 * (1 - r2), s1 * r2], axis=1)
    offsets = np.cumsum([0] + [len(m.tri_verts) for m in meshes])
    mesh_of = np.searchsorted(offsets, picked, side="right") - 1  # the mesh each sample lies on
    tri_of = picked - offsets[mesh_of]
    # Instances of one geometry (:meth:`_MeshTris.placed`: they share its triangle arrays) are
    # coloured and placed in one pass: a pass per instance made thousands of instances cost
    # count x instances (5 s for 100k points on 20k instances)
    geometries: dict[int, list[int]] = {}
    for k, m in enumerate(meshes):
        geometries.setdefault(id(m.tri_verts), []).append(k)
    geometry_of = np.empty(len(meshes), np.int64)
    for g, ks in enumerate(geometries.values()):
        geometry_of[ks] = g
    sample_geometry = geometry_of[mesh_of]  # the geometry each sample lies on
    by_geometry = np.argsort(sample_geometry, kind="stable")
    bounds = np.searchsorted(sample_geometry[by_geometry], np.arange(len(geometries) + 1))
    points = np.empty((count, 3))
    colors = np.empty((count, 3))
    cache: dict = {}
    for g, ks in enumerate(geometries.values()):
        sel = by_geometry[bounds[g]:bounds[g + 1]]
        if len(sel) == 0:
            continue
        m, tri = meshes[ks[0]], tri_of[sel]
        if len(ks) == 1:
            points[sel] = np.einsum("nk,nkc->nc", bary[sel], m.world[m.tri_verts[tri]])
        else:  # each sample moved by its own instance's matrix
            local = np.einsum("nk,nkc->nc", bary[sel], m.local[m.tri_verts[tri]])
            M = np.stack([meshes[k].matrix for k in ks])[np.searchsorted(ks, mesh_of[sel])]
            points[sel] = np.einsum("nij,nj->ni", M[:, :3, :3], local) + M[:, :3, 3]
        colors[sel] = m.colors(tri, bary[sel], cache)
    return points.astype(np.float32), colors.astype(np.float32)


def _bounds(meshes: list[_MeshTris], bpy_scene: Any, points: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Centre and radius of a sphere around the vertices of ``meshes`` and the world ``points``
    (those a render shows as points, or None)."""
    parts = [m.world for m in meshes] + ([] if points is None or not len(points) else [points.astype(np.float64)])
    if not parts:
        what = "mesh surfaces" if points is None else "mesh surfaces or points"
        raise NoSurfacesError(f"scene {bpy_scene.name!r} has no visible {what}")
    verts = np.concatenate(parts)
    center = 0.5 * (verts.min(axis=0) + verts.max(axis=0))
    radius = float(np.linalg.norm(verts - center, axis=1).max())
    if not radius > 0:  # cameras at distance 0 from it looked nowhere
        raise NoSurfacesError(f"scene {bpy_scene.name!r}: all it shows lies at one place {center.round(6).tolist()}, "
                              "which no camera can frame")
    return center, radius


def rendered_own_points(depsgraph: Any) -> tuple[np.ndarray, np.ndarray]:
    """The points (and colours) a render of ``depsgraph``'s view layer shows as points: the
    :func:`own_points` of each point cloud, hair and mesh whose Geometry Nodes make points that
    it shows directly (:func:`_shown_geometry`), at each instance's place. What Points from
    Selected Meshes takes of such objects when they are selected, so the two agree."""
    return _shown_geometry(depsgraph, surfaces=False)[1]


def rendered_surfaces(bpy_scene, depsgraph: Any, count: int, seed: int = 0
                      ) -> tuple[np.ndarray, float, tuple[np.ndarray, np.ndarray] | None]:
    """``(centre, radius, points)`` of what ``depsgraph`` shows a camera: the sphere around its
    surfaces' vertices and the points it shows as points (:func:`rendered_own_points`), so a
    scene of point clouds only is framed too, and ``count`` :func:`sample_surface_points` (none
    without surfaces; None for 0), from one read of its meshes, followed by those points, taken
    whole as Points from Selected Meshes takes them. Meant for the depsgraph a render evaluates
    (``mode == 'RENDER'``), whose objects are valid only while the render runs
    (:func:`during_a_render`)."""
    meshes, (own, own_colours) = _shown_geometry(depsgraph)  # one pass over its instances
    center, radius = _bounds(meshes, bpy_scene, own)
    if count <= 0:
        return center, radius, None
    if not meshes:
        return center, radius, (own, own_colours)
    points, colours = sample_triangles(meshes, count, seed, f"scene {bpy_scene.name!r}")
    return center, radius, (np.concatenate([points, own]), np.concatenate([colours, own_colours]))


def during_a_render(bpy_scene, render: Callable[[], Any], use: Callable[[Any], T]) -> T:
    """``use(depsgraph)`` on the depsgraph Blender evaluates for a render of ``bpy_scene``
    (the first view layer it renders), while ``render()`` renders it.

    A render evaluates its own depsgraph (``mode == 'RENDER'``): render visibility (an
    object or collection disabled in viewports, the monitor icon, is in it; one disabled in
    renders is not) and modifiers' render settings (Show in Renders, render levels).
    ``bpy.context.evaluated_depsgraph_get()`` is the viewport's, which differs in all of
    these, so a dataset's points read there missed what the photos show. Python sees that
    depsgraph only in ``frame_change_post``, which Blender calls with it once the render
    has evaluated a view layer; its objects are freed after the render, so ``use`` runs in
    the handler. What ``use`` raises is raised here (Blender only prints what a handler
    raises)."""
    import bpy

    got: list[tuple[bool, Any]] = []

    def evaluated(scene: Any, depsgraph: Any = None) -> None:
        if got or depsgraph is None or depsgraph.mode != "RENDER" or scene != bpy_scene:
            return
        try:
            got.append((True, use(depsgraph)))
        except Exception as exc:  # noqa: BLE001 - raised again below, where the caller can see it
            got.append((False, exc))

    handlers = bpy.app.handlers.frame_change_post
    handlers.append(evaluated)
    try:
        render()
    finally:
        handlers.remove(evaluated)
    if not got:
        raise RuntimeError(f"rendering the scene {bpy_scene.name!r} evaluated no view layer (is any view layer "
                           "enabled for rendering?)")
    ok, value = got[0]
    if not ok:
        raise value
    return value
