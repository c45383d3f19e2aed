"""File > Import: PLY points, NeuralScene bundles, dataset folders; points from meshes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import bpy
import numpy as np
from bpy.props import BoolProperty, EnumProperty, FloatProperty, IntProperty, StringProperty
from bpy_extras.io_utils import ImportHelper

from npbgpp_core.ply import SCENE_MIN_OPACITY

from .blend_paths import resolved, stored
from .camera_bridge import (
    BLENDER_TO_OPENCV,
    MULTILAYER_EXR_NOTE,
    USE_PHOTO_SIZE_BUTTON,
    bounding_sphere,
    clip_range_covering,
    pixel_aspect,
    view_clip_covering,
    writes_multilayer_exr,
)
from .colour import use_photo_colours
from .operators import refused_in_linked_scene
from .point_source import ID_ATTRIBUTE, POINT_OBJECT_MARK, SAMPLED_POINTS_NAME, object_positions

COLOR_ATTRIBUTE = "Col"
# Camera property: imported without a cloud, so its Clip Start / End are Blender's defaults until
# Densify Points makes one (fit_unfitted_clips).
CLIP_UNFITTED = "npbgpp_clip_unfitted"
# What a dataset without a point cloud needs next (import's info line, Aggregate's and F12's refusals).
DENSIFY_HINT = ("Densify Points (Render Properties > NPBG++ > Data) makes a cloud from the photos; then Aggregate "
                "Descriptors.")


# --------------------------------------------------------------------------- helpers
def make_point_object(
    name: str, points: np.ndarray, colors: np.ndarray | None, context: Any, ids: np.ndarray | None = None
) -> bpy.types.Object:
    """A point cloud object from (N, 3) points, display-sRGB colours (N, 3) or None and
    stable point ids (N,) or None (stored as the ``npbgpp_id`` attribute; a vertex-only
    mesh converted to a point cloud, a mesh if conversion is unavailable).
    ValueError for no points: Blender cannot make an empty point cloud."""
    pts = np.ascontiguousarray(points, dtype=np.float32).reshape(-1, 3)
    if len(pts) == 0:
        raise ValueError(f"{name} holds no points: nothing to import")
    mesh = bpy.data.meshes.new(name)
    mesh.vertices.add(len(pts))
    mesh.attributes["position"].data.foreach_set("vector", pts.ravel())
    if colors is not None:
        attr = mesh.color_attributes.new(COLOR_ATTRIBUTE, "FLOAT_COLOR", "POINT")
        rgba = np.ones((len(pts), 4), np.float32)
        rgba[:, :3] = np.clip(colors, 0.0, 1.0)
        attr.data.foreach_set("color_srgb", rgba.ravel())
    if ids is not None:
        id_attr = mesh.attributes.new(ID_ATTRIBUTE, "INT", "POINT")
        id_attr.data.foreach_set("value", np.ascontiguousarray(ids, dtype=np.int32).ravel())
    mesh.update()
    obj = bpy.data.objects.new(name, mesh)
    context.collection.objects.link(obj)
    for other in context.view_layer.objects:
        other.select_set(False)
    obj.select_set(True)
    context.view_layer.objects.active = obj
    return to_point_cloud(obj, context)


def to_point_cloud(obj: bpy.types.Object, context: Any) -> bpy.types.Object:
    """The point cloud object Blender's Convert makes of the mesh object ``obj`` (every
    vertex with its attributes; edges and faces dropped), or ``obj`` itself where Convert
    fails (a mesh renders the same). The mesh Convert leaves without users is removed: it
    held every point until the file was reopened."""
    mesh = obj.data
    try:
        with context.temp_override(selected_objects=[obj], active_object=obj, object=obj):
            bpy.ops.object.convert(target="POINTCLOUD")
    except RuntimeError:
        return obj
    if mesh.users == 0:
        bpy.data.meshes.remove(mesh)
    return context.view_layer.objects.active or obj


def fit_unfitted_clips(scene: Any, points: np.ndarray) -> int:
    """Set the Clip Start / End of ``scene``'s cameras that Import Dataset Folder made without
    a cloud (:data:`CLIP_UNFITTED`) to cover ``points`` (world space), as an import with a
    cloud does (:func:`clip_range_covering`); returns how many changed."""
    from .camera_bridge import opencv_extrinsics

    changed = 0
    for obj in scene.objects:
        if obj.type != "CAMERA" or not obj.get(CLIP_UNFITTED):
            continue
        R, t = opencv_extrinsics(obj.matrix_world)
        clip = clip_range_covering(points, R, t)
        if clip is not None:
            obj.data.clip_start, obj.data.clip_end = clip
            changed += 1
        del obj[CLIP_UNFITTED]
    return changed


def use_point_object(context: Any, obj: bpy.types.Object) -> None:
    """Make ``obj`` the scene's Point Object, marked as the add-on's (:data:`POINT_OBJECT_MARK`:
    Export Dataset leaves it out of its photos and points)."""
    try:
        obj[POINT_OBJECT_MARK] = True
    except (AttributeError, TypeError):  # linked from a library: the scene's Point Object is left out anyway
        pass
    context.scene.npbgpp.point_object = obj


def create_camera(
    name: str, K: np.ndarray, R: np.ndarray, t: np.ndarray, size: tuple[int, int], context: Any,
    points: np.ndarray | None = None, fy_over_fx: float = 1.0,
) -> bpy.types.Object:
    """A Blender camera object reproducing an OpenCV camera (horizontal sensor fit, 36 mm
    sensor, the lens from fx, lens shift for the principal point) in a scene whose Pixel
    Aspect X / Y is ``fy_over_fx`` (:func:`pixel_aspect`; Blender divides the vertical shift
    by Y / X, so the shift depends on it), its Clip Start / End covering the world ``points``
    in front of it (:func:`clip_range_covering`: Blender's default range would cut a cloud
    at another scale than its own)."""
    h, w = size
    cam = bpy.data.cameras.new(name)
    cam.sensor_fit = "HORIZONTAL"
    cam.sensor_width = 36.0
    cam.lens = float(K[0, 0]) * 36.0 / w
    cam.shift_x = (w / 2.0 - 0.5 - float(K[0, 2])) / w
    cam.shift_y = (float(K[1, 2]) - h / 2.0 + 0.5) / (w * fy_over_fx)
    clip = clip_range_covering(points, R, t) if points is not None else None
    if clip is not None:
        cam.clip_start, cam.clip_end = clip
    obj = bpy.data.objects.new(name, cam)
    R_blender = BLENDER_TO_OPENCV @ np.asarray(R, np.float64)  # world -> Blender camera axes
    center = -np.asarray(R, np.float64).T @ np.asarray(t, np.float64)
    M = np.eye(4)
    M[:3, :3] = R_blender.T
    M[:3, 3] = center
    from mathutils import Matrix

    obj.matrix_world = Matrix([list(map(float, row)) for row in M])  # a plain list would be read column-major
    context.collection.objects.link(obj)
    return obj


def widen_view_clips(op: Any, context: Any, points: np.ndarray) -> int:
    """Widen the Clip Start / End of the open windows' 3D views that would cut ``points``
    (world space), seen from where each view is or after framing them
    (:func:`view_clip_covering`), and say so in ``op``'s report; as importers of scenes at
    other scales do. Returns how many views changed; none without a window (background)."""
    wm = getattr(context, "window_manager", None)
    spaces = [space for window in (wm.windows if wm is not None else ()) if window.screen is not None
              for area in window.screen.areas for space in area.spaces if space.type == "VIEW_3D"]
    if not spaces or len(points) == 0:
        return 0
    from mathutils import Vector

    try:
        center, radius = bounding_sphere(points)
    except ValueError:
        return 0
    ranges = []
    for space in spaces:
        rv3d = space.region_3d  # its view_matrix is only updated on redraw: the eye from the view's own values
        eye = np.array(rv3d.view_location) + np.array(rv3d.view_rotation @ Vector((0.0, 0.0, rv3d.view_distance)))
        start, end = view_clip_covering(space.clip_start, space.clip_end, eye, center, radius)
        if start < space.clip_start or end > space.clip_end:
            space.clip_start, space.clip_end = start, end
            ranges.append((start, end))
    if ranges:
        start, end = min(r[0] for r in ranges), max(r[1] for r in ranges)
        op.report({"INFO"}, f"Widened the Clip Start / End of {len(ranges)} 3D view(s) to {start:.3g} .. {end:.3g} "
                            "so that they do not cut the imported points (sidebar > View > Clip Start / End).")
    return len(ranges)


def report_photo_colours(op: Any, scene: Any) -> None:
    """An import for neural rendering: the scene's colour management shows the network's
    (the photos') colours from now on, and the info line says what it was and how to set it back."""
    note = use_photo_colours(scene)
    if note:
        op.report({"INFO"}, note)


def _photo_size(view: Any) -> tuple[int, int]:
    """(h, w) of a dataset view's photo."""
    h, w = view.camera.image_size
    return int(h), int(w)


def render_photo_size(views: list) -> tuple[int, int]:
    """(h, w) of the photo size most views have (ties: the earliest view's), the one render
    resolution the import sets: a phone capture mixes portrait and landscape photos, and the
    first view's size framed the minority wrongly (mouse: 17 portrait, 39 landscape)."""
    from npbgpp_core.image_size import most_common_size

    return most_common_size(_photo_size(view) for view in views)


def _fy_over_fx(view: Any) -> float:
    return float(view.camera.K[1][1]) / float(view.camera.K[0][0])


def stretched_fy_over_fx(view: Any, pixel_fy_over_fx: float = 1.0) -> float | None:
    """A dataset view's fy/fx when a camera made for pixels of fy/fx ``pixel_fy_over_fx``
    (:func:`create_camera`, the scene's Pixel Aspect X / Y; 1: square) moves its photo's top
    and bottom edges by half a pixel or more, else None: COLMAP fits fx and fy apart
    (PINHOLE), and on phone photos they differ by 0.1-0.2% (test_colmap), a shift no one can
    see. The import's framing warning counts these views (relative to the Pixel Aspect it
    sets, :func:`shared_fy_over_fx`)."""
    fy_over_fx = _fy_over_fx(view)
    off = abs(fy_over_fx / pixel_fy_over_fx - 1.0) * _photo_size(view)[0] / 2.0
    return fy_over_fx if off >= 0.5 else None


def shared_fy_over_fx(views: list) -> float:
    """The pixels' fy/fx that frames every view to half a pixel when some need other than
    square ones: the middle of their fy/fx range (desk's 29 views all have 0.99235, a 1.1 px
    stretch at square pixels); 1.0 when square pixels frame them all, or when no one value
    does (mouse: 0.987 to 1.082), as Blender has one Pixel Aspect per scene."""
    if not views or all(stretched_fy_over_fx(view) is None for view in views):
        return 1.0
    ratios = [_fy_over_fx(view) for view in views]
    middle = (min(ratios) + max(ratios)) / 2.0
    return middle if all(stretched_fy_over_fx(view, middle) is None for view in views) else 1.0


def _aspect_text(fy_over_fx: float) -> str:
    x, y = pixel_aspect(fy_over_fx)
    return f"X {x:.4f}, Y {y:.4f}"


def framing_warning(views: list, size: tuple[int, int], aspect: float | None = None) -> str:
    """What the import says of the dataset views whose cameras (:func:`create_camera`, at the
    Pixel Aspect fy/fx ``aspect``; None: :func:`shared_fy_over_fx`'s, which the import sets
    unless told not to) do not reproduce their photo at the render resolution ``size`` (h, w):
    another photo size, or pixels whose fy/fx differs from that aspect's enough to move the
    photo's top or bottom edge by half a pixel or more, each counted with an example, as one
    cure (the resolution) does not help the other; "" when every view fits."""
    if not views:
        return ""
    shared = shared_fy_over_fx(views)
    aspect = shared if aspect is None else aspect
    other = [view for view in views if _photo_size(view) != tuple(size)]
    ratios = [(stretched_fy_over_fx(view, aspect), view) for view in views]
    stretched = [(ratio, view) for ratio, view in ratios if ratio is not None]
    if not other and not stretched:
        return ""
    h, w = size
    parts = []
    if other:
        vh, vw = _photo_size(other[0])
        has = "has a photo" if len(other) == 1 else "have photos"
        parts.append(f"{len(other)} {has} of another size (e.g. {other[0].name} is {vw}x{vh}; to render one, make it "
                     f"the scene camera and click {USE_PHOTO_SIZE_BUTTON})")
    if stretched:
        worst_ratio, worst = max(stretched, key=lambda rv: abs(rv[0] - 1.0))
        if len(stretched) == 1:
            which = f"1 has pixels that are not square ({worst.name}: fy/fx {worst_ratio:.3f})"
        else:
            low, high = f"{min(r for r, _ in stretched):.3f}", f"{max(r for r, _ in stretched):.3f}"
            span = low if low == high else f"{low} to {high}, e.g. {worst.name}: {worst_ratio:.3f}"
            which = f"{len(stretched)} have pixels that are not square (fy/fx {span})"
        if shared != aspect:  # the import was told to keep square pixels
            cure = (f"Pixel Aspect {_aspect_text(shared)} frames every view (Import Dataset's Set Pixel Aspect sets "
                    f"it; {MULTILAYER_EXR_NOTE})")
        else:
            button = "the same button" if other else USE_PHOTO_SIZE_BUTTON  # its path once per warning
            cure = ("no one Pixel Aspect frames every view (X / Y = fy/fx frames one: "
                    f"{worst.name} takes {_aspect_text(worst_ratio)}; F12 through such a camera names its own, "
                    f"and {button} sets it)")
        parts.append(f"{which}: at square pixels their renders are stretched against the photo by that ratio, and "
                     + cure)
    count = len({id(v) for v in other} | {id(v) for _, v in stretched})
    now = "square" if aspect == 1.0 else f"{_aspect_text(aspect)}, the photos' fy/fx {aspect:.4f}"
    return (f"{count} of {len(views)} cameras do not render their photo's framing: Blender has one render "
            f"resolution (now {w}x{h}, the most common photo size) and pixel aspect (now {now}); "
            + ", and ".join(parts) + ". Aggregate and Fit use the dataset's own cameras; each camera's photo size "
            "is in its npbgpp_image_size property.")


def _bundle_object(context: Any, bundle_points: np.ndarray) -> bpy.types.Object | None:
    """The scene's point object when its ids name the bundle's points (each id the bundle
    point at the object's position): a dataset imported from wherever its folder now lies,
    or this bundle imported before. A bundle of another cloud of the same dataset (Densify's,
    or the sparse one after a dense bundle) gets its own object, or it would render only the
    points whose ids happen to exist."""
    obj = context.scene.npbgpp.point_object
    return obj if obj is not None and holds_bundle_points(obj, bundle_points) else None


def holds_bundle_points(obj: bpy.types.Object, bundle_points: np.ndarray) -> bool:
    """Whether each of the object's point ids names the bundle point at the object's
    (local) position of that point: the ids are rows of this bundle."""
    from .point_source import point_ids

    ids = point_ids(obj)
    if ids is None or len(ids) == 0 or int(ids.min()) < 0 or int(ids.max()) >= len(bundle_points):
        return False
    pts = object_positions(obj, world=False)
    ref = np.asarray(bundle_points, np.float32)[ids]
    tol = 1e-4 * float(np.ptp(ref, axis=0).max()) + 1e-6
    return float(np.abs(pts - ref).max()) <= tol


def _drop_bundle_of_another_cloud(op: Any, context: Any, dataset: str) -> None:
    """After importing ``dataset``: a scene bundle whose points are not the new point
    object's (each id naming the bundle point at the object's position, wherever the
    dataset folder now lies) is cleared with a warning, since the ids would pick arbitrary
    points of it. Reads only the bundle's points; a bundle that cannot be read is kept (F12
    reports what is wrong with it)."""
    from npbgpp_core.bundle_file import read_points

    s = context.scene.npbgpp
    bundle = resolved(s, s.bundle)
    if not bundle or not os.path.isfile(bundle) or s.point_object is None:
        return
    try:
        points = read_points(bundle)
    except (ValueError, OSError):
        return
    if holds_bundle_points(s.point_object, points):
        return
    s.bundle = ""
    op.report({"WARNING"}, f"The scene's bundle {bundle} holds other points than the imported dataset {dataset} "
                           "at their ids (another dataset or cloud, or a Max Points subset): no longer used; run "
                           "Aggregate Descriptors for this one, or File > Import > NPBG++ Bundle to render the "
                           "bundle with its own points.")


def _drop_bundle_without_cloud(op: Any, context: Any, dataset: str) -> None:
    """After importing ``dataset``, which has no point cloud: the scene's bundle is no longer
    used (with a warning), since no point object of this dataset can say which of its points
    to render (Import Dataset Folder drops an older Densify cloud too)."""
    s = context.scene.npbgpp
    if not s.bundle:
        return
    bundle = resolved(s, s.bundle)
    s.bundle = ""
    op.report({"WARNING"}, f"The scene's bundle {bundle} is no longer used: the imported dataset {dataset} has no "
                           "point cloud to render it with. Run Densify Points, then Aggregate Descriptors, or File > "
                           "Import > NPBG++ Bundle to render the bundle with its own points.")


def _ignored_in_cloud(cloud_file: str) -> str:
    """The import report's note when the PLY file a dataset's loader read as its cloud holds
    more than vertices, e.g. " (fused.ply: 2 faces ignored; its vertices are the points)"
    (the loaders read the vertex element alone, as Import Point Cloud does); "" otherwise,
    and for a file whose header cannot be read again (the loader read it: nothing to say)."""
    from npbgpp_core.ply import ignored_elements_note, ply_element_counts

    if not cloud_file.lower().endswith(".ply"):
        return ""
    try:
        ignored = ignored_elements_note(ply_element_counts(cloud_file))
    except (ValueError, OSError):
        return ""
    return f" ({os.path.basename(cloud_file)}: {ignored}; its vertices are the points)" if ignored else ""


# --------------------------------------------------------------------------- PLY
class IMPORT_SCENE_OT_npbgpp_ply(bpy.types.Operator, ImportHelper):
    """Import a PLY point cloud (with colours) or a Gaussian-splat PLY (centres and base colours) for NPBG++"""

    bl_idname = "import_scene.npbgpp_ply"
    bl_label = "Import NPBG++ Points (.ply)"
    bl_options = {"REGISTER", "UNDO"}
    filename_ext = ".ply"
    filter_glob: StringProperty(default="*.ply", options={"HIDDEN"})  # type: ignore[valid-type]
    min_opacity: FloatProperty(  # type: ignore[valid-type]
        name="Min Opacity",
        default=SCENE_MIN_OPACITY,  # what a splat file used as a dataset's Point Cloud keeps
        min=0.0,
        max=1.0,
        description="Gaussian-splat files only: splats less opaque than this are dropped (0: keep all; "
        "a file without opacity keeps all)",
    )

    def execute(self, context: Any) -> set[str]:
        from npbgpp_core.ply import (
            color_properties,
            ignored_elements_note,
            is_splat_header,
            ply_element_counts,
            ply_vertex_header,
        )

        if refused_in_linked_scene(self, context.scene, "the imported point object"):
            return {"CANCELLED"}
        path = bpy.path.abspath(self.filepath)
        if not os.path.isfile(path):
            self.report({"ERROR"}, f"PLY file not found: {path}")
            return {"CANCELLED"}
        try:
            header = ply_vertex_header(path)
            properties = [name for name, _ in header]
            splat = is_splat_header(properties)
            colors = None if splat else color_properties(header)
            # Blender's reader takes red/green/blue only: r/g/b or diffuse_* arrive as raw attributes
            raw_colors = colors if colors is not None and colors[0] != ("red", "green", "blue") else None
            ignored = ignored_elements_note(ply_element_counts(path))
        except (ValueError, OSError) as exc:
            self.report({"ERROR"}, f"Cannot read PLY {path}: {exc}")
            return {"CANCELLED"}
        missing = [c for c in "xyz" if c not in properties]
        if missing:  # Blender's importer says only "failed importing, unknown error"
            self.report({"ERROR"}, f"Cannot read PLY {path}: its vertex element has no {', '.join(missing)} "
                                   f"(properties: {', '.join(properties) or 'none'})")
            return {"CANCELLED"}
        before = set(bpy.data.objects)
        try:
            bpy.ops.wm.ply_import(filepath=path, import_colors="SRGB", import_attributes=splat or bool(raw_colors))
        except RuntimeError as exc:
            self.report({"ERROR"}, f"Cannot read PLY {path}: {exc}")
            return {"CANCELLED"}
        new = [o for o in bpy.data.objects if o not in before]
        if not new:
            self.report({"ERROR"}, f"The PLY file {path} holds no points.")
            return {"CANCELLED"}
        obj = new[0]
        if splat:
            return self._finish_splat(context, path, obj)
        if raw_colors is not None and obj.type == "MESH":
            _colors_from_attributes(obj.data, *raw_colors)
        if obj.type == "MESH":
            # a PLY with faces (a fused.ply meshed, a scan) is imported for its points too, as a
            # dataset's cloud is read: Blender's conversion keeps every vertex, loose ones too,
            # with its colour, and drops edges and faces (not a shaded mesh the user must convert)
            obj = to_point_cloud(obj, context)
        use_point_object(context, obj)
        count = len(obj.data.points) if obj.type == "POINTCLOUD" else len(obj.data.vertices)
        note = f" ({ignored}: its {count} vertices are the points)" if ignored else ""
        self.report({"INFO"}, f"Imported the points of {path} as {obj.name!r}{note}.")
        widen_view_clips(self, context, object_positions(obj))
        return {"FINISHED"}

    def _finish_splat(self, context: Any, path: str, imported: Any) -> set[str]:
        """Blender read the splat properties as float attributes; keep centres and colours."""
        from npbgpp_core.ply import no_opacity_note, splat_colors, splat_keep

        mesh = imported.data
        n = len(mesh.vertices)
        pts = np.zeros(n * 3, np.float32)
        mesh.attributes["position"].data.foreach_get("vector", pts)
        fields = {}
        has_opacity = "opacity" in mesh.attributes
        for name in ("f_dc_0", "f_dc_1", "f_dc_2", "opacity") if has_opacity else ("f_dc_0", "f_dc_1", "f_dc_2"):
            arr = np.zeros(n, np.float32)
            mesh.attributes[name].data.foreach_get("value", arr)
            fields[name] = arr
        matrix = np.array(imported.matrix_world, np.float64)  # the importer's axis conversion
        name = imported.name
        _, keep = splat_keep(fields.get("opacity"), n, self.min_opacity)
        if keep.any():
            pts = pts.reshape(-1, 3)[keep].astype(np.float64) @ matrix[:3, :3].T + matrix[:3, 3]
            colors = splat_colors(np.stack([fields[f"f_dc_{i}"] for i in range(3)], axis=1)[keep])
            imported.name = mesh.name = name + ".splat"  # the new object takes the file's name
            # Made before the import is removed: within this operator the view layer still lists
            # a removed object, as None, and make_point_object walks that list.
            obj = make_point_object(name, pts.astype(np.float32), colors, context)
        bpy.data.objects.remove(imported)
        if mesh.users == 0:
            bpy.data.meshes.remove(mesh)
        if not keep.any():
            self.report({"ERROR"}, f"{path}: no splat has opacity >= {self.min_opacity:g}")
            return {"CANCELLED"}
        use_point_object(context, obj)
        self.report({"INFO"}, f"imported {int(keep.sum())} of {n} splats as points ({obj.name})")
        if not has_opacity and self.min_opacity > 0.0:
            self.report({"WARNING"}, no_opacity_note(path, self.min_opacity))
        widen_view_clips(self, context, pts)
        return {"FINISHED"}


def _colors_from_attributes(mesh: Any, names: tuple[str, str, str], divisor: float) -> None:
    """The point colour attribute from three raw float attributes holding a PLY's colour
    values (``divisor`` maps them to [0, 1], as :func:`npbgpp_core.ply.load_ply` reads them)."""
    n = len(mesh.vertices)
    rgba = np.ones((n, 4), np.float32)
    for i, name in enumerate(names):
        values = np.zeros(n, np.float32)
        mesh.attributes[name].data.foreach_get("value", values)
        rgba[:, i] = np.clip(values / divisor, 0.0, 1.0)
    for name in names:
        mesh.attributes.remove(mesh.attributes[name])
    attr = mesh.color_attributes.new(COLOR_ATTRIBUTE, "FLOAT_COLOR", "POINT")
    attr.data.foreach_set("color_srgb", rgba.ravel())


# --------------------------------------------------------------------------- bundle
class IMPORT_SCENE_OT_npbgpp_bundle(bpy.types.Operator, ImportHelper):
    """Import a NeuralScene bundle: its points as an object, the bundle as the scene's renderer"""

    bl_idname = "import_scene.npbgpp_bundle"
    bl_label = "Import NPBG++ Bundle"
    bl_options = {"REGISTER", "UNDO"}
    filename_ext = ".npbgpp"
    filter_glob: StringProperty(default="*.npbgpp;*.safetensors", options={"HIDDEN"})  # type: ignore[valid-type]

    def execute(self, context: Any) -> set[str]:
        from npbgpp_core import protocol as P

        from .scene_snapshot import worker_for
        from .worker_client import WorkerError

        if refused_in_linked_scene(self, context.scene, "the bundle's point object"):
            return {"CANCELLED"}
        path = bpy.path.abspath(self.filepath)
        s = context.scene.npbgpp
        try:
            worker = worker_for(context.scene)
            worker.request(P.LoadBundle(path, "CPU", "FP32"))
            reply = worker.request(P.GetBundlePoints())
            existing = _bundle_object(context, reply.points)
            if existing is None:
                name = os.path.splitext(os.path.basename(path))[0]
                obj = make_point_object(name, reply.points, reply.colors, context, np.arange(len(reply.points)))
            else:
                obj = existing
                self.report({"INFO"}, f"The bundle holds the points of {obj.name!r} (its point ids name them): it "
                                      "renders them, no second copy imported")
        except (WorkerError, ValueError, OSError) as exc:
            self.report({"ERROR"}, f"Cannot import bundle {path}: {exc}")
            return {"CANCELLED"}
        s.bundle = stored(s, path)
        use_point_object(context, obj)
        s.output = "NEURAL"
        widen_view_clips(self, context, object_positions(obj))
        report_photo_colours(self, context.scene)
        return {"FINISHED"}


# --------------------------------------------------------------------------- dataset
DATASET_FORMATS = [
    ("AUTO", "Detect", "Tell the layout from the files"),
    ("NERF_SYNTHETIC", "NeRF-Synthetic / Blender", "transforms_*.json with RGBA images"),
    ("DTU", "DTU", "A DTU scan folder"),
    ("SCANNET", "ScanNet", "A ScanNet scene folder"),
    ("H3DS", "H3DS", "An H3DS scene folder"),
    ("COLMAP", "COLMAP", "sparse/0 model (cameras, images, points3D) and images/"),
    ("NERFSTUDIO", "nerfstudio / instant-ngp", "transforms.json at the folder's root (ns-process-data, colmap2nerf) "
     "and its images; the point cloud its ply_file_path names (sparse_pc.ply)"),
]
EXTERNAL_PATHS_TOOLTIP = (
    "NeRF-Synthetic, COLMAP and nerfstudio: read images whose paths in the dataset's files leave the dataset folder "
    "(absolute, or climbing out with ..). Off by default because a dataset from elsewhere could otherwise "
    "make the add-on open any file on this computer; turn it on only for a dataset you made or trust"
)
class IMPORT_SCENE_OT_npbgpp_dataset(bpy.types.Operator):
    """Import a dataset folder (NeRF-Synthetic, DTU, ScanNet, H3DS, COLMAP, nerfstudio / instant-ngp): points and
    input cameras"""

    bl_idname = "import_scene.npbgpp_dataset"
    bl_label = "Import NPBG++ Dataset"
    bl_options = {"REGISTER", "UNDO"}
    directory: StringProperty(subtype="DIR_PATH", description="The dataset folder")  # type: ignore[valid-type]
    # SKIP_SAVE on the settings that describe one dataset: Blender would otherwise start the next
    # import with the last one's values, applying another dataset's cloud, format or trust to it.
    # The folder and Max Points (a budget of this computer) are remembered, as importers' paths are.
    format: EnumProperty(  # type: ignore[valid-type]
        name="Format", items=DATASET_FORMATS, default="AUTO", description="Layout of the dataset folder",
        options={"SKIP_SAVE"},
    )
    max_points: IntProperty(  # type: ignore[valid-type]
        name="Max Points", default=0, min=0, description="Keep at most this many points, chosen at random (0: all)",
    )
    undistort: BoolProperty(  # type: ignore[valid-type]
        name="Undistort (COLMAP, nerfstudio)", default=False,
        description="COLMAP models and nerfstudio transforms.json with lens distortion (k1, k2, p1, p2): remap "
                    "the photos on load to the widest pinhole camera without blank borders (otherwise such "
                    "datasets are refused)",
        options={"SKIP_SAVE"},
    )
    allow_external_paths: BoolProperty(  # type: ignore[valid-type]
        name="Allow External Paths", default=False,
        description=EXTERNAL_PATHS_TOOLTIP, options={"SKIP_SAVE"},
    )
    # remembered: whether renders go to multilayer OpenEXR is the user's, not one dataset's
    set_pixel_aspect: BoolProperty(  # type: ignore[valid-type]
        name="Set Pixel Aspect", default=True,
        description="When every photo's pixels share one height/width ratio (fy/fx) that is not 1, set the scene's "
                    "Pixel Aspect to it so that renders frame the photos. Blender 5.0 writes no multilayer OpenEXR "
                    "at a non-square Pixel Aspect (any engine); off: square pixels, and the import says how much "
                    "the renders are stretched",
    )
    point_cloud: StringProperty(  # type: ignore[valid-type]
        name="Point Cloud", default="",
        description="A .ply file to use as the dataset's cloud, relative to the dataset folder (or absolute), in "
                    "the same world frame as its cameras; it also becomes Dataset Points, the cloud Aggregate "
                    "uses. Empty: the format's own cloud (e.g. nerfstudio's ply_file_path, COLMAP's points3D)",
        options={"SKIP_SAVE"},
    )

    def invoke(self, context: Any, event: Any) -> set[str]:
        context.window_manager.fileselect_add(self)
        return {"RUNNING_MODAL"}

    def _chosen_cloud(self, folder: str) -> str | None:
        """Absolute path of the Point Cloud setting's file ("" when unset); None, with an
        error report, when it names no file (checked here so that a typo is not imported as
        "no cloud": the worker's loader would refuse it too, but later and less plainly)."""
        name = self.point_cloud.strip()
        if not name:
            return ""
        path = os.path.normpath(os.path.join(folder, bpy.path.abspath(name)))
        if not path.lower().endswith(".ply"):
            path += ".ply"  # as the loaders read pc_name (FUSED.PLY is a .ply name)
        if not os.path.isfile(path):
            self.report({"ERROR"}, f"Cannot import dataset {folder}: Point Cloud {name!r} names no file ({path} not "
                                   "found; a .ply relative to the dataset folder, or absolute)")
            return None
        return path

    def execute(self, context: Any) -> set[str]:
        from npbgpp_core import protocol as P

        from .scene_snapshot import worker_for
        from .worker_client import WorkerError

        if refused_in_linked_scene(self, context.scene, "the dataset's cameras and point object"):
            return {"CANCELLED"}
        path = bpy.path.abspath(self.directory)
        cloud = self._chosen_cloud(path)
        if cloud is None:
            return {"CANCELLED"}
        try:
            fmt = None if self.format == "AUTO" else self.format.lower()
            reply = worker_for(context.scene).request(
                P.ReadDataset(path, fmt, self.max_points, self.undistort, self.allow_external_paths, cloud))
        except (WorkerError, ValueError, OSError) as exc:
            self.report({"ERROR"}, f"Cannot import dataset {path}: {exc}")
            return {"CANCELLED"}
        name = reply.name or os.path.basename(os.path.normpath(path))
        no_cloud = reply.no_cloud
        if not no_cloud:
            try:
                obj = make_point_object(name, reply.points, reply.colors, context, reply.point_ids)
            except ValueError as exc:
                self.report({"ERROR"}, f"Cannot import dataset {path}: {exc}")
                return {"CANCELLED"}
            use_point_object(context, obj)
        else:  # the older dataset's object would render in the new cameras
            context.scene.npbgpp.point_object = None
        collection = bpy.data.collections.new(f"{name} cameras")
        context.scene.collection.children.link(collection)
        cameras = []
        # the Pixel Aspect set below, which the cameras are made for
        aspect = shared_fy_over_fx(reply.views) if self.set_pixel_aspect else 1.0
        for view in reply.views:
            c = view.camera
            # a view no one aspect frames: made for its own fy/fx, the Pixel Aspect F12 names for it
            made_for = aspect if aspect != 1.0 else stretched_fy_over_fx(view) or 1.0
            cam = create_camera(view.name, np.array(c.K), np.array(c.R), np.array(c.t), c.image_size, context,
                                reply.points if len(reply.points) else None, made_for)
            for col in list(cam.users_collection):
                col.objects.unlink(cam)
            collection.objects.link(cam)
            cameras.append(cam)
            cam["npbgpp_image"] = view.image_path
            if no_cloud:
                cam[CLIP_UNFITTED] = True  # Densify Points fits its clip range to the cloud it makes
            cam["npbgpp_image_size"] = [int(c.image_size[1]), int(c.image_size[0])]  # width, height
            if made_for != 1.0:  # F12 names the Pixel Aspect it needs (checks the scene's)
                cam["npbgpp_fy_over_fx"] = made_for
        context.scene.npbgpp.dataset_path = stored(context.scene, path)
        # the new dataset's own cloud, not an older dense one; a chosen cloud is what Aggregate reads too
        context.scene.npbgpp.dataset_points = stored(context.scene, cloud) if cloud else ""
        context.scene.npbgpp.dataset_cloud = stored(context.scene, cloud) if cloud else ""
        context.scene.npbgpp.densify_output = ""  # an earlier dataset's dense cloud is no re-run's of this one
        context.scene.npbgpp.dataset_no_cloud = no_cloud
        context.scene.npbgpp.dataset_format = reply.format or ""
        context.scene.npbgpp.dataset_undistort = self.undistort
        context.scene.npbgpp.dataset_allow_external_paths = self.allow_external_paths
        render_size = render_photo_size(reply.views) if reply.views else None
        if render_size is not None:
            h, w = render_size
            context.scene.render.resolution_x, context.scene.render.resolution_y = w, h
            context.scene.render.resolution_percentage = 100
            # the pixels the cameras are made for: square, or every photo's shared fy/fx
            context.scene.render.pixel_aspect_x, context.scene.render.pixel_aspect_y = pixel_aspect(aspect)
            # a camera whose photo has that size, so that F12 right after the import frames it
            context.scene.camera = next(cam for cam, view in zip(cameras, reply.views, strict=True)
                                        if _photo_size(view) == render_size)
        if no_cloud:
            # the hint first: Blender cuts a report after about 1000 characters, and the loader's can be long
            self.report({"INFO"}, f"Imported {len(reply.views)} cameras and no points: the dataset has no point "
                                  f"cloud. {DENSIFY_HINT} ({no_cloud})")
        else:
            self.report({"INFO"}, f"Imported {len(reply.points)} points and {len(reply.views)} cameras."
                                  f"{_ignored_in_cloud(reply.cloud_file)}")
        if reply.other_clouds:  # e.g. COLMAP's dense fused.ply beside the sparse points3D just imported
            from npbgpp_core.datasets.other_clouds import other_clouds_note

            self.report({"INFO"}, other_clouds_note(reply.other_clouds, "Point Cloud") + ".")
        if reply.cloud_note:  # e.g. another capture's cloud chosen as Point Cloud
            self.report({"WARNING"}, reply.cloud_note + ".")
        if render_size is not None and aspect != 1.0:
            # a warning when the scene's output already is multilayer: its next render would not be written
            kind = "WARNING" if writes_multilayer_exr(context.scene) else "INFO"
            self.report({kind}, f"Set Pixel Aspect to {_aspect_text(aspect)} (Output Properties > Format): the "
                                f"photos' pixels are not square (fy/fx {aspect:.4f}, every view to half a pixel), "
                                f"and the cameras frame their photos at that aspect. {MULTILAYER_EXR_NOTE} (import "
                                "with Set Pixel Aspect off for square pixels).")
        report_photo_colours(self, context.scene)
        widen_view_clips(self, context, reply.points)
        framing = framing_warning(reply.views, render_size, aspect) if render_size is not None else ""
        if framing:
            self.report({"WARNING"}, framing)
        if no_cloud:
            _drop_bundle_without_cloud(self, context, path)
        else:
            _drop_bundle_of_another_cloud(self, context, path)
        return {"FINISHED"}


# --------------------------------------------------------------------------- meshes
# Modifier settings that renders and viewports have apart, as (viewport's, render's) property
# names: every such pair of Blender 5.0's modifiers (found by listing each type's properties).
RENDER_SETTINGS = {
    "SUBSURF": (("levels", "render_levels"),),
    "MULTIRES": (("levels", "render_levels"),),
    "SCREW": (("steps", "render_steps"),),
    "OCEAN": (("viewport_resolution", "resolution"),),
}
# The same for object data: curves, texts and NURBS surfaces (a render resolution of 0 means
# the viewport's, so it is copied only when set) and metaballs; every such pair in bpy 5.0.1.
_CURVE_RESOLUTIONS = (("resolution_u", "render_resolution_u"), ("resolution_v", "render_resolution_v"))
DATA_RENDER_SETTINGS = {
    "CURVE": _CURVE_RESOLUTIONS, "FONT": _CURVE_RESOLUTIONS, "SURFACE": _CURVE_RESOLUTIONS,
    "META": (("resolution", "render_resolution"),),
}
# A particle system's viewport display of the objects or collection it instances, and what a render
# takes instead (measured in bpy 5.0.1: the viewport's depsgraph holds Display Amount percent of
# the particles, none with Display As None, and Children's viewport Display Amount).
PARTICLE_RENDER_SETTINGS = (
    ("display_method", lambda settings: "RENDER"),
    ("display_percentage", lambda settings: 100),
    ("child_percent", lambda settings: settings.rendered_child_count),
)
# Modifiers that step a simulation frame by frame into a cache of the object's own: a copy has
# none (measured in bpy 5.0.1, 20 frames stepped: a cloth grid's copy evaluates to min z -1.78
# where the original hangs at -1.46, a soft body's copy stands where the original fell from, a
# Geometry Nodes simulation zone's copy shows its first step, emitted particles stand where born;
# a rigid body, not a modifier, likewise: :func:`simulations`).
SIMULATION_MODIFIERS = {"CLOTH", "SOFT_BODY", "FLUID", "DYNAMIC_PAINT"}
# Geometry Nodes nodes whose output is a cache of earlier frames (a simulation zone, a Bake node).
SIMULATION_NODES = {"GeometryNodeSimulationInput", "GeometryNodeSimulationOutput", "GeometryNodeBake"}
# Prefix of the copies' names: a metaball copy named so forms a family (a basis and the
# objects named as it plus ".NNN", polygonized together) of the selected members only,
# apart from the user's family.
COPY_PREFIX = "NPBG++ sampled "


@contextmanager
def render_setting_copies(objects: list, scene: Any) -> Iterator[list]:
    """Copies of ``objects`` linked to ``scene`` (a mesh's sharing its data), whose modifiers
    are set as renders evaluate them: shown where Show in Renders is on, and each setting a
    modifier has apart for renders (:data:`RENDER_SETTINGS`: Subdivision's and Multires' Render
    levels, Screw's Render steps, Ocean's Render resolution) copied to its viewport twin;
    Simplify's subdivision and child particles limits are the render's meanwhile. Curves, texts, surfaces and
    metaballs get a copy of their data at its render resolution (:data:`DATA_RENDER_SETTINGS`);
    a particle system instancing objects gets a copy of its settings that shows all a render
    instances (:data:`PARTICLE_RENDER_SETTINGS`). A copy shows its instancer (Show
    Instancer / Show Emitter) in viewports, and renders' flag is applied by
    ``surface_points.rendered_entries``: a child with it off has no depsgraph entry, only what it
    makes does (measured in bpy 5.0.1: an empty instancing a collection, a ball whose Geometry
    Nodes make an instance), so a copy with it off, a second such child of its parent making the
    same instances, left the instances of both untold apart, and the copy's, which stand for the
    original, untaken.
    The viewport's depsgraph, the one Python can evaluate without a render, evaluates the
    viewport's settings; the photos of a dataset, and its points3d.ply
    (``datagen.surface_points.during_a_render``), show the render's. The copies are removed
    and Simplify restored on leaving, errors included, so the user's objects (linked ones too)
    and scene are as they were. An object holding a simulation (:func:`simulations`) is given
    itself, not a copy: a copy has no simulation cache, and changing the original's settings
    could free its cache; its settings that differ for renders are the viewport's
    (:func:`viewport_differences`). Not emulated: a Geometry Nodes "Is Viewport" switch (the
    operator warns of one, :func:`viewport_switches`); metaballs
    of a family combine only with its selected members (the operator names the others)."""
    copies: list = []
    data_copies: list = []
    settings_copies: list = []
    r = scene.render
    limit, children = r.simplify_subdivision, r.simplify_child_particles
    try:
        if r.use_simplify:
            r.simplify_subdivision = r.simplify_subdivision_render
            r.simplify_child_particles = r.simplify_child_particles_render
        for obj in objects:
            if simulations(obj):  # sampled as it stands, cache and all (:func:`viewport_differences`)
                copies.append(obj)
                continue
            copy = obj.copy()
            copies.append(copy)
            copy.name = COPY_PREFIX + obj.name
            copy.hide_viewport = False  # evaluated in the viewport's depsgraph
            if obj.type in DATA_RENDER_SETTINGS:
                copy.data = obj.data.copy()  # the user's data keeps its viewport resolution
                data_copies.append(copy.data)
                for viewport, render in DATA_RENDER_SETTINGS[obj.type]:
                    if getattr(copy.data, render):
                        setattr(copy.data, viewport, getattr(copy.data, render))
            for modifier in copy.modifiers:
                modifier.show_viewport = modifier.show_render
                for viewport, render in RENDER_SETTINGS.get(modifier.type, ()):
                    setattr(modifier, viewport, getattr(modifier, render))
            # Show Instancer / Show Emitter on: the copy has entries of its own, so what it makes is told
            # from what its original makes; which of them renders show is the walk's rule, by the flag
            # for renders (surface_points.not_shown_itself_in_renders, hidden_by_its_instances)
            copy.show_instancer_for_viewport = True
            for system in copy.particle_systems:
                if system.settings is not None and system.settings.render_type in ("OBJECT", "COLLECTION"):
                    system.settings = settings = system.settings.copy()  # the user's keeps its display
                    settings_copies.append(settings)
                    for viewport, render in PARTICLE_RENDER_SETTINGS:
                        setattr(settings, viewport, render(settings))
            scene.collection.objects.link(copy)
        yield copies
    finally:
        for copy, obj in zip(copies, objects, strict=False):
            if copy != obj:
                bpy.data.objects.remove(copy)
        for settings in settings_copies:
            bpy.data.particles.remove(settings)
        for data in data_copies:
            (bpy.data.metaballs if isinstance(data, bpy.types.MetaBall) else bpy.data.curves).remove(data)
        if r.simplify_subdivision != limit:
            r.simplify_subdivision = limit
        if r.simplify_child_particles != children:
            r.simplify_child_particles = children


def metaball_family(name: str) -> str:
    """The family a metaball object named ``name`` belongs to (its name less a ".NNN"): Blender
    polygonizes a family into one mesh, its first-named member's (the basis), the others'
    evaluating empty (measured in bpy 5.0.1: Blob.001 is the basis when Blob is absent)."""
    stem, dot, number = name.rpartition(".")
    return stem if dot and number.isdigit() else name


# Why Points from Selected Meshes skips a selected object, by its kind (:func:`skip_reason`).
NO_FACES = ("no faces to sample: a curve with no Bevel or Extrude, or a mesh of vertices or edges only (Object > "
            "Convert > Point Cloud makes its vertices points)")
NO_POINTS = "no points"
# A metaball (its family, when sampled with it) polygonized to nothing: e.g. negative elements only.
NO_METABALL_SURFACE = "no surface: its metaball elements enclose none (negative elements only, or too small)"
# A child of an object instancing it at its vertices or faces: renders show it only there.
INSTANCED_BY_PARENT = ("renders show it only where its parent {parent!r} instances it (Instancing: Vertices / "
                       "Faces): select that to sample those")
# A child of such a parent whose particles or Geometry Nodes make instances: those take the place of its
# children's (measured in bpy 5.0.1: a render's depsgraph holds no instance of the child, nor the child;
# nor a Geometry Nodes instance of that child itself, e.g. Object Info As Instance, in either depsgraph).
NOT_INSTANCED_BY_PARENT = ("renders show it nowhere: its parent {parent!r} (Instancing: Vertices / Faces) hides it "
                           "at its own place and instances its particles' or Geometry Nodes' instances instead of "
                           "its children")
# Such a child disabled in renders: renders instance it nowhere (measured in bpy 5.0.1: a render's depsgraph
# holds none of its parent's instances of it).
HIDDEN_INSTANCED_BY_PARENT = ("disabled in renders, and its parent {parent!r} instances it (Instancing: Vertices / "
                              "Faces): renders show it nowhere")
# An emitter or instancer whose Show Emitter / Show Instancer is off for renders: renders show only what
# it instances (the depsgraph entry's show_self), here nothing with a surface or points.
NOT_SHOWN_ITSELF = ("not shown itself in renders (Show Emitter / Show Instancer off), and what it instances has no "
                    "surfaces nor points")
# Faces whose world-space area is 0: nothing to spread points over (the sampler would refuse them all).
NO_AREA = "zero surface area: its faces are flat or scaled to nothing"
SKIP_REASONS = {
    "VOLUME": "a volume: density, no surface nor points to take",
    "GREASEPENCIL": "grease pencil strokes are not sampled",
}
NO_GEOMETRY = "no geometry: an empty, light, camera or the like"
# An empty whose instanced collection renders nothing to sample (no surfaces nor points).
EMPTY_COLLECTION = "an empty instancing a collection with no surfaces nor points"


def instances_a_collection(obj: Any) -> bool:
    """Whether ``obj`` is an empty instancing a collection: it renders that collection's
    objects (its instances), which Points from Selected Meshes samples as it does any
    object's instances."""
    return obj.type == "EMPTY" and obj.instance_type == "COLLECTION" and obj.instance_collection is not None


def skip_reason(obj: Any) -> str:
    """Why Points from Selected Meshes takes nothing of ``obj``, by its type, when its type has
    neither surfaces nor points of its own nor instances a collection (:data:`SKIP_REASONS`,
    else :data:`NO_GEOMETRY`)."""
    return SKIP_REASONS.get(obj.type, NO_GEOMETRY)


def skipped_text(skipped: list[tuple[str, str]]) -> str:
    """``skipped`` ((name, reason) pairs) as one report phrase: the names of each reason, sorted,
    then the reason in brackets; reasons in order of first appearance."""
    by_reason: dict[str, list[str]] = {}
    for name, reason in skipped:
        by_reason.setdefault(reason, []).append(name)
    return "; ".join(f"{', '.join(sorted(names))} ({reason})" for reason, names in by_reason.items())


def unselected_family_members(meshes: list, scene: Any) -> list[tuple[list[str], list[str]]]:
    """Per metaball family (:func:`metaball_family`) of ``meshes`` that has members in ``scene``
    that are not selected: its selected members' names and the others'. Renders merge them all
    into one surface; the copies sampled form a family of the selected members only."""
    chosen = {o.name for o in meshes}
    selected: dict[str, list[str]] = {}
    for obj in meshes:
        if obj.type == "META":
            selected.setdefault(metaball_family(obj.name), []).append(obj.name)
    out = []
    for family, names in selected.items():
        others = sorted(o.name for o in scene.objects if o.type == "META" and o.name not in chosen
                        and metaball_family(o.name) == family)
        if others:
            out.append((sorted(names), others))
    return out


def has_node(tree: Any, kinds: set[str]) -> bool:
    """Whether the node tree ``tree``, or a node group it uses (at any depth), has an unmuted
    node whose ``bl_idname`` is one of ``kinds`` (``datagen.surface_points.unmuted_nodes``)."""
    from .datagen.surface_points import unmuted_nodes

    return any(node.bl_idname in kinds for node in unmuted_nodes(tree))


def has_is_viewport_node(tree: Any) -> bool:
    """Whether the node tree ``tree``, or a node group it uses (at any depth), has an unmuted
    Is Viewport node."""
    return has_node(tree, {"GeometryNodeIsViewport"})


def simulations(obj: Any) -> list[str]:
    """The names of ``obj``'s modifiers shown in renders that hold a simulation stepped frame by
    frame, whose cache a copy of ``obj`` lacks: cloth, soft body, fluid, dynamic paint
    (:data:`SIMULATION_MODIFIERS`), a particle system of emitted particles or of hair with hair
    dynamics, and Geometry Nodes with a simulation zone or a Bake node (:data:`SIMULATION_NODES`);
    "Rigid Body" first for an object in the scene's rigid body simulation (measured in bpy 5.0.1:
    a cube dropped from z 5 is at z 1.94 at frame 20, its copy at z 5)."""
    out = ["Rigid Body"] if getattr(obj, "rigid_body", None) is not None else []
    for modifier in getattr(obj, "modifiers", ()):
        if not modifier.show_render:
            continue
        if modifier.type == "PARTICLE_SYSTEM":
            system = modifier.particle_system
            simulated = system.settings is not None and (system.settings.type == "EMITTER"
                                                         or system.use_hair_dynamics)
        elif modifier.type == "NODES":
            simulated = has_node(modifier.node_group, SIMULATION_NODES)
        else:
            simulated = modifier.type in SIMULATION_MODIFIERS
        if simulated:
            out.append(modifier.name)
    return out


def viewport_differences(obj: Any) -> list[str]:
    """What of ``obj`` the viewport evaluates otherwise than renders, in words (empty when
    nothing): modifiers shown in one of them only, each modifier's setting of
    :data:`RENDER_SETTINGS`, its data's of :data:`DATA_RENDER_SETTINGS`, its particles' display
    of :data:`PARTICLE_RENDER_SETTINGS`, and Show Instancer / Show Emitter on for renders only.
    What an object sampled as it stands (one holding a simulation) is sampled with."""
    out = []
    for modifier in obj.modifiers:
        if modifier.show_viewport != modifier.show_render:
            out.append(f"modifier {modifier.name!r} is shown in {'renders' if modifier.show_render else 'viewports'}"
                       " only")
        elif modifier.show_render:
            for viewport, render in RENDER_SETTINGS.get(modifier.type, ()):
                if getattr(modifier, viewport) != getattr(modifier, render):
                    out.append(f"modifier {modifier.name!r} has {viewport} {getattr(modifier, viewport)}, "
                               f"{render} {getattr(modifier, render)}")
    for viewport, render in DATA_RENDER_SETTINGS.get(obj.type, ()):
        if getattr(obj.data, render) and getattr(obj.data, viewport) != getattr(obj.data, render):
            out.append(f"its data has {viewport} {getattr(obj.data, viewport)}, {render} {getattr(obj.data, render)}")
    for system in obj.particle_systems:
        settings = system.settings
        if settings is not None and settings.render_type in ("OBJECT", "COLLECTION"):
            for viewport, render in PARTICLE_RENDER_SETTINGS:
                if viewport == "display_method" and settings.display_method != "NONE":
                    continue  # only None leaves the viewport without the instances
                if viewport == "child_percent" and settings.child_type == "NONE":
                    continue
                if getattr(settings, viewport) != render(settings):
                    out.append(f"particles {settings.name!r} have {viewport} {getattr(settings, viewport)!r} "
                               f"(renders: {render(settings)!r})")
    if obj.show_instancer_for_render and not obj.show_instancer_for_viewport:
        out.append("Show Instancer / Show Emitter is on for renders only")
    return out


def viewport_switches(obj: Any) -> list[str]:
    """The names of ``obj``'s Geometry Nodes modifiers shown in renders whose nodes have an Is
    Viewport switch (:func:`has_is_viewport_node`): their viewport side is what Python evaluates
    outside a render (measured in bpy 5.0.1: only a render's depsgraph, seen in a handler while
    it renders, evaluates Is Viewport as False)."""
    return [m.name for m in obj.modifiers
            if m.type == "NODES" and m.show_render and has_is_viewport_node(m.node_group)]


class NPBGPP_OT_points_from_meshes(bpy.types.Operator):
    """Sample points (with colours) on the surfaces of the selected meshes, curves, texts, surfaces and
    metaballs as they render (modifiers' render settings: Show in Renders, Subdivision's Render levels; curves'
    Render resolution), their Geometry Nodes instances and an instanced collection's objects included, and take
    the points of selected point clouds and hair curves as they are"""

    bl_idname = "npbgpp.points_from_meshes"
    bl_label = "Points from Selected Meshes"
    bl_options = {"REGISTER", "UNDO"}
    count: IntProperty(  # type: ignore[valid-type]
        name="Points", default=100_000, min=1,
        description="Points sampled over all selected meshes, spread by surface area (point clouds and hair curves "
                    "give all their points besides)",
    )
    seed: IntProperty(  # type: ignore[valid-type]
        name="Seed", default=0, description="Random seed: the same seed gives the same points",
    )

    def execute(self, context: Any) -> set[str]:
        from .datagen.surface_points import (
            GEOMETRY_TYPES,
            POINT_TYPES,
            collection_members,
            hidden_by_its_instances,
            instances_its_children,
            not_shown_itself_in_renders,
            rendered_parts,
            sample_triangles,
            shown_only_where_instanced,
        )

        # curves, texts, surfaces and metaballs too: Blender evaluates them to a mesh; an empty
        # instancing a collection renders that collection's objects, sampled as its instances
        # one pass: a membership test of chosen per selected object grew with the square of the selection
        chosen: list[Any] = []
        skipped: list[tuple[str, str]] = []
        for o in context.selected_objects:
            if o.type in GEOMETRY_TYPES | POINT_TYPES or instances_a_collection(o):
                chosen.append(o)
            else:
                skipped.append((o.name, skip_reason(o)))
        if not chosen:
            given = f" (selected: {', '.join(sorted(n for n, _ in skipped))}, none with a surface or points)" \
                if skipped else ""
            self.report({"ERROR"}, "Select one or more mesh, curve, text, surface, metaball, point cloud or hair "
                                   f"curves objects (or empties instancing a collection) to sample points on{given}.")
            return {"CANCELLED"}
        if refused_in_linked_scene(self, context.scene, "the sampled point object"):
            return {"CANCELLED"}

        try:
            with render_setting_copies(chosen, context.scene) as copies:
                depsgraph = context.evaluated_depsgraph_get()
                # per object: the triangles and points of all it renders (its own, its evaluated
                # mesh or points, its Geometry Nodes / collection / particle instances), read once;
                # one of zero area is skipped alone, not failing the others
                owned = rendered_parts(depsgraph, copies, chosen)
                areas = [sum(t.area() for t in tris) for tris, _ in owned]
                # point clouds', hair's, a mesh's Geometry Nodes points: taken as they are
                taken_from = [o.name for o, (_, pts) in zip(chosen, owned, strict=True) if pts]
                surfaces = [t for (tris, _), a in zip(owned, areas, strict=True) if a > 0 for t in tris]
                parts = [p for _, pts in owned for p in pts]
                # a metaball member's points are its basis's: not skipped when that family was sampled
                families = {metaball_family(o.name) for o, a in zip(chosen, areas, strict=True)
                            if o.type == "META" and a > 0}
                chosen_at = {o.as_pointer() for o in chosen}
                for obj, copy, (tris, pts), area in zip(chosen, copies, owned, areas, strict=True):
                    if area > 0 or pts or (obj.type == "META" and metaball_family(obj.name) in families):
                        continue
                    # e.g. a curve with no Bevel or Extrude: sampled nothing, so named with the skipped
                    # a child its parent instances at its vertices or faces; a metaball child is not one: its
                    # family's surface holds it at its own place and where its parent instances it, its copy's
                    # too (the copy keeps its parent; measured in bpy 5.0.1: a render's depsgraph holds no
                    # instance of it, and its one mesh a ball there and at each vertex), so one that sampled
                    # nothing has no surface anywhere
                    if shown_only_where_instanced(obj):
                        # first: a parent instancing other things does not instance it, disabled in renders or not
                        if not instances_its_children(obj.parent, depsgraph):
                            reason = NOT_INSTANCED_BY_PARENT.format(parent=obj.parent.name)
                        elif obj.hide_render:
                            reason = HIDDEN_INSTANCED_BY_PARENT.format(parent=obj.parent.name)
                        elif obj.parent.as_pointer() in chosen_at:
                            continue  # sampled where renders show it: as its selected parent's instances
                        else:
                            reason = INSTANCED_BY_PARENT.format(parent=obj.parent.name)
                    elif tris:
                        reason = NO_AREA
                    elif not_shown_itself_in_renders(obj) or hidden_by_its_instances(obj,
                                                                                 copy.evaluated_get(depsgraph)):
                        # its own faces were left out as renders leave them out: by the flag alone, or where
                        # its copy's evaluated geometry holds instances (the walk's rule for its entry)
                        reason = NOT_SHOWN_ITSELF
                    elif obj.type == "EMPTY":
                        reason = EMPTY_COLLECTION
                    elif obj.type in POINT_TYPES:
                        reason = NO_POINTS
                    elif obj.type == "META":
                        reason = NO_METABALL_SURFACE
                    else:
                        reason = NO_FACES
                    skipped.append((obj.name, reason))
                if not surfaces and not parts:  # each object named with why (the sampler's error said "mesh")
                    raise ValueError(f"Nothing to sample points on or take points of: {skipped_text(skipped)}.")
                sampled = 0
                if surfaces:
                    names = [o.name for o, a in zip(chosen, areas, strict=True) if a > 0]
                    parts.insert(0, sample_triangles(surfaces, self.count, self.seed, what=f"objects {names}"))
                    sampled = len(parts[0][0])
                points = np.concatenate([pts for pts, _ in parts])
                colors = np.concatenate([cols for _, cols in parts])
        except ValueError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        obj = make_point_object(SAMPLED_POINTS_NAME, points, colors, context)
        use_point_object(context, obj)
        if skipped:
            self.report({"WARNING"}, f"Sampled the objects with a surface or points; skipped: {skipped_text(skipped)}.")
        for instancer in chosen:
            hidden = collection_members(instancer)[2]
            if hidden:
                self.report({"WARNING"}, f"{instancer.name!r} instances {', '.join(map(repr, hidden))}, which "
                                         "renders show and viewports hide: not sampled (Python evaluates the "
                                         "viewport's instances; show them in viewports to sample them).")
        for simulated in chosen:  # sampled as it stands (no copy: a copy has no simulation cache)
            held = simulations(simulated)
            differences = viewport_differences(simulated) if held else []
            if differences:
                self.report({"WARNING"}, f"{simulated.name!r} holds a simulation "
                                         f"({', '.join(map(repr, held))}): sampled as the viewport "
                                         f"shows it at frame {context.scene.frame_current}, with its viewport "
                                         f"settings where renders differ: {'; '.join(differences)}.")
        switches = {o.name: viewport_switches(o) for o in chosen}
        if any(switches.values()):
            named = ", ".join(f"{name!r} ({', '.join(map(repr, mods))})" for name, mods in switches.items() if mods)
            self.report({"WARNING"}, f"Geometry Nodes of {named} have an Is Viewport switch: sampled as viewports "
                                     "evaluate them (its True side); renders, and a dataset's photos, take its "
                                     "False side.")
        for names, others in unselected_family_members(chosen, context.scene):  # one warning per family
            these = (f"The metaball {names[0]!r} merges", "its") if len(names) == 1 else \
                (f"The metaballs {', '.join(map(repr, names))} merge", "their")
            which = "which is" if len(others) == 1 else "which are"
            self.report({"WARNING"}, f"{these[0]} in renders with {', '.join(map(repr, others))} of {these[1]} "
                                     f"family, {which} not selected: sampled without "
                                     f"{'it' if len(others) == 1 else 'them'} (select "
                                     f"{'it' if len(others) == 1 else 'them'} too for the merged surface).")
        what = f"Sampled {sampled} points" if sampled else ""
        if taken_from:
            took = f"took the {len(points) - sampled} points of {', '.join(map(repr, sorted(taken_from)))}"
            what = f"{what} on surfaces and {took}" if sampled else took[0].upper() + took[1:]
        s = context.scene.npbgpp
        if s.output == "NEURAL" and not s.bundle:
            s.output = "POINTS"
            self.report({"INFO"}, f"{what} into {obj.name!r}; Output is now Points. Neural output needs a bundle: "
                                  "export a dataset of the scene, import it and Aggregate.")
        elif s.output == "NEURAL":
            self.report({"INFO"}, f"{what} into {obj.name!r}. Output stays Neural and renders the bundle; switch "
                                  "Output to Points to see the new points.")
        else:
            self.report({"INFO"}, f"{what} into {obj.name!r}.")
        return {"FINISHED"}


def menu_object(self: Any, context: Any) -> None:
    self.layout.separator()
    self.layout.operator(NPBGPP_OT_points_from_meshes.bl_idname, text="NPBG++ Points from Meshes",
                         icon="OUTLINER_OB_POINTCLOUD")


def menu_import(self: Any, context: Any) -> None:
    self.layout.operator(IMPORT_SCENE_OT_npbgpp_ply.bl_idname, text="NPBG++ Points (.ply)")
    self.layout.operator(IMPORT_SCENE_OT_npbgpp_bundle.bl_idname, text="NPBG++ Bundle")
    self.layout.operator(IMPORT_SCENE_OT_npbgpp_dataset.bl_idname, text="NPBG++ Dataset Folder")


CLASSES = (
    IMPORT_SCENE_OT_npbgpp_ply, IMPORT_SCENE_OT_npbgpp_bundle, IMPORT_SCENE_OT_npbgpp_dataset,
    NPBGPP_OT_points_from_meshes,
)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.TOPBAR_MT_file_import.append(menu_import)
    bpy.types.VIEW3D_MT_object.append(menu_object)


def unregister() -> None:
    bpy.types.VIEW3D_MT_object.remove(menu_object)
    bpy.types.TOPBAR_MT_file_import.remove(menu_import)
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
