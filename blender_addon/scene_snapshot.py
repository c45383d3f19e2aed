"""What a render needs, read from bpy on Blender's main thread into plain values, so that
render threads and the worker never touch bpy; and the renderer connection a scene's
settings ask for."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import bpy
import numpy as np


@dataclass
class WorkerSettings:
    """How to reach the renderer: worker mode, Python environment, extra import paths."""

    mode: str = "PROCESS"
    env_path: str = ""
    extra_paths: list[str] = field(default_factory=list)
    timeout: float = 0.0  # seconds per request, 0: none


@dataclass
class SceneSnapshot(WorkerSettings):
    """Scene settings and, when they are drawn, the point object's points."""

    output: str = "POINTS"
    bundle_path: str = ""
    device: str = "AUTO"
    precision: str = "FP32"
    tile_size: int = 0  # pixels per tile side for neural frames, 0: whole frame
    point_size: int = 1
    viewport_roll_context: str = "auto"  # RenderFrame.roll_context of viewport frames (F12: exact)
    refiner_impl: str = "torch"  # RenderFrame.refiner_impl
    points: np.ndarray | None = None  # world space
    colors: np.ndarray | None = None
    points_key: str = ""
    points_object: str = ""  # name_full of the object the points were read from
    point_ids: np.ndarray | None = None  # bundle points to render (the object's npbgpp_id), None: all
    ids_key: str = "all"
    object_matrix: np.ndarray | None = None  # the bundle's object transform
    hidden: str = ""  # why nothing is drawn: the point object is hidden, Holdout or Indirect Only (for the user)
    no_points: str = ""  # what to do when there is nothing to render: the dataset has no cloud (Densify Points)


def worker_settings(scene: bpy.types.Scene) -> WorkerSettings:
    from . import preferences

    deps = preferences.deps_dir()
    s = scene.npbgpp
    return WorkerSettings(s.worker_mode, preferences.env_path(), [deps] if os.path.isdir(deps) else [],
                          float(s.worker_timeout))


def worker_for(scene: bpy.types.Scene) -> Any:
    """The renderer connection for ``scene``'s settings (started on first request)."""
    from .worker_client import HUB

    w = worker_settings(scene)
    return HUB.get(w.mode, w.env_path, w.extra_paths)


def points_touched(depsgraph: bpy.types.Depsgraph, obj: bpy.types.Object | None) -> bool:
    """Whether ``depsgraph.updates`` (inside a depsgraph handler or ``view_update``) change
    ``obj``'s world-space points: its transform, its data, or its evaluated geometry
    (dependencies such as a geometry-nodes input object show up as an update of ``obj``)."""
    if obj is None:
        return False
    watched = {obj, obj.data}
    return any(update.id.original in watched for update in depsgraph.updates)


def object_shown(obj: bpy.types.Object, depsgraph: bpy.types.Depsgraph | None) -> bool:
    """Whether ``obj`` is drawn by ``depsgraph``: for a render (F12, animation), its render
    visibility (Disable in Renders, a collection disabled for renders or excluded from the
    view layer), as Cycles and EEVEE take it: a render depsgraph holds only the objects it
    renders; for the viewport, its viewport visibility (hide_get / hide_viewport and its
    collections'), as Blender's ``visible_get``."""
    if depsgraph is None:
        return True
    if depsgraph.mode == "RENDER":
        return any(o.original == obj for o in depsgraph.objects)
    return bool(obj.visible_get(view_layer=depsgraph.view_layer))


def in_scene(obj: bpy.types.Object, scene: bpy.types.Scene) -> bool:
    """Whether ``obj`` is in one of ``scene``'s collections: a lookup by name, and a scan
    only when another object (from a library) has the same name."""
    found = scene.objects.get(obj.name)
    if found is not None and found.name_full == obj.name_full:
        return True
    return found is not None and any(o.name_full == obj.name_full for o in scene.objects)


def instancer(obj: bpy.types.Object, depsgraph: bpy.types.Depsgraph) -> tuple[str, str] | None:
    """How ``depsgraph`` draws ``obj`` as an instance, as (kind, instancing object's name):
    kind ``collection`` (a collection instance), ``nodes`` (Geometry Nodes' Object /
    Collection Info), ``particles`` or ``other``; None when it draws no instance of it. An
    instance is an evaluated copy, so an object the depsgraph did not evaluate is none: that
    check costs nothing, where the instance loop (stopped at the first match) walks every
    object and instance drawn."""
    if not depsgraph.id_eval_get(obj).is_evaluated:
        return None
    for i in depsgraph.object_instances:
        if i.is_instance and i.object.original == obj:
            parent = i.parent.original if i.parent is not None else None
            if parent is None:
                return "other", ""
            if parent.instance_type == "COLLECTION":
                return "collection", parent.name
            if any(m.type == "NODES" for m in parent.modifiers):
                return "nodes", parent.name
            return ("particles" if len(parent.particle_systems) else "other"), parent.name
    return None


def hidden_note(obj: bpy.types.Object, scene: bpy.types.Scene, depsgraph: bpy.types.Depsgraph) -> str:
    """Why a point object :func:`object_shown` refuses draws nothing, in the user's terms:
    it is not in the scene at all, it is drawn only as instances (NPBG++ renders the object
    itself, at its own transform; what to do depends on what instances it), or hidden."""
    where = "renders" if depsgraph.mode == "RENDER" else "the viewport"
    if not in_scene(obj, scene):
        return (f"the Point Object {obj.name!r} is not in the scene {scene.name!r}: nothing to render (link it "
                "into one of the scene's collections, or choose another Point Object in Render Properties > NPBG++)")
    show = "show it in the Outliner to render it"
    found = instancer(obj, depsgraph)
    if found is not None:
        kind, by = found
        through, advice = {
            "collection": (f"collection instances ({by!r})", "include its collection in the view layer to render it"),
            "nodes": (f"the instances the Geometry Nodes of {by!r} make", show),
            "particles": (f"the particles of {by!r}", show),
        }.get(kind, ("instances" + (f" of {by!r}" if by else ""), show))
        return (f"the Point Object {obj.name!r} is hidden in {where} and shows only through {through}, which NPBG++ "
                f"does not render (it renders the object itself, at its own transform): nothing to render ({advice})")
    return f"the Point Object {obj.name!r} is hidden in {where}: nothing to render ({show})"


def not_direct_note(obj: bpy.types.Object, depsgraph: bpy.types.Depsgraph | None) -> str:
    """Why a shown point object draws nothing: Holdout (its own flag or a view-layer
    collection's: Blender cuts a hole in the image there, which a point renderer drawing
    only this object cannot show otherwise than as absent) or Indirect Only (Cycles shows
    it only through shadows and reflections, which NPBG++ does not render); else ""."""
    if depsgraph is None:
        return ""
    layer = depsgraph.view_layer
    try:
        holdout, indirect = obj.holdout_get(view_layer=layer), obj.indirect_only_get(view_layer=layer)
    except RuntimeError:  # not in the view layer: object_shown decided
        return ""
    if holdout:
        where = "has Holdout set (Object Properties > Visibility)" if obj.is_holdout else \
            f"is in a Holdout collection of the view layer {layer.name!r}"
        return (f"the Point Object {obj.name!r} {where}: NPBG++ treats holdout as absent (it draws no other objects "
                "to cut the hole in): nothing to render (turn Holdout off to render it)")
    if indirect:
        return (f"the Point Object {obj.name!r} is in an Indirect Only collection of the view layer {layer.name!r}: "
                "it would show only through shadows and reflections, which NPBG++ does not render: nothing to render "
                "(turn Indirect Only off in the Outliner to render it)")
    return ""


def snapshot(
    scene: bpy.types.Scene, depsgraph: bpy.types.Depsgraph | None = None, previous: SceneSnapshot | None = None
) -> SceneSnapshot:
    """Read everything a render needs from bpy (main thread only). The points (and their
    content hash) are taken from ``previous`` when it read them from the same object: the
    caller passes it when it knows the object did not change (see :func:`points_touched`)."""
    from .blend_paths import resolved
    from .point_source import object_points, point_ids, points_key

    s = scene.npbgpp
    w = worker_settings(scene)
    snap = SceneSnapshot(
        mode=w.mode, env_path=w.env_path, extra_paths=w.extra_paths, timeout=w.timeout, output=s.output,
        bundle_path=resolved(s, s.bundle), device=s.device, precision=s.precision,
        tile_size=s.tile_size, point_size=s.point_size, viewport_roll_context=s.viewport_roll_context.lower(),
        refiner_impl=s.refiner_impl.lower(),
    )
    obj = s.point_object
    if obj is None and s.dataset_no_cloud:
        from .importers import DENSIFY_HINT

        snap.no_points = f"the imported dataset has no point cloud. {DENSIFY_HINT}"
    if obj is not None and not object_shown(obj, depsgraph):
        snap.hidden = hidden_note(obj, scene, depsgraph)
        return snap
    snap.hidden = not_direct_note(obj, depsgraph) if obj is not None else ""
    if snap.hidden:
        return snap
    if obj is not None:
        evaluated = obj.evaluated_get(depsgraph) if depsgraph is not None else obj
        snap.object_matrix = np.array(evaluated.matrix_world, dtype=np.float64)
        snap.points_object = obj.name_full
        same = previous is not None and previous.points_object == obj.name_full
        if snap.bundle_path:
            if same and previous.bundle_path:
                snap.point_ids, snap.ids_key = previous.point_ids, previous.ids_key
            else:
                snap.point_ids = point_ids(evaluated)
                snap.ids_key = "all" if snap.point_ids is None else points_key(snap.point_ids, None)
        if snap.output != "NEURAL" or not snap.bundle_path:
            if same and previous.points is not None:
                snap.points, snap.colors, snap.points_key = previous.points, previous.colors, previous.points_key
            else:
                snap.points, snap.colors = object_points(evaluated)
                snap.points_key = points_key(snap.points, snap.colors)
    return snap
