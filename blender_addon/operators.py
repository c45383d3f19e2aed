"""Operators: aggregate NPBG++ descriptors into a bundle; export a dataset of this scene."""

from __future__ import annotations

import os
from typing import Any

import bpy
from bpy.props import BoolProperty, IntProperty, StringProperty


def bundled_weights() -> str:
    """The NPBG++ weights shipped with the add-on (npbgpp_core/weights), used when the
    Weights setting is empty."""
    try:
        from npbgpp_core.pretrained import default_weights_path
    except ImportError:
        return ""
    return default_weights_path("npbgpp")


class NPBGPP_OT_aggregate(bpy.types.Operator):
    """Compute NPBG++ descriptors of the imported dataset's points from its views and save a bundle"""

    bl_idname = "npbgpp.aggregate"
    bl_label = "Aggregate Descriptors"
    filepath: StringProperty(name="Bundle", subtype="FILE_PATH", default="")  # type: ignore[valid-type]
    max_points: IntProperty(name="Max Points", default=0, min=0)  # type: ignore[valid-type]

    def execute(self, context: Any) -> set[str]:
        from npbgpp_core import protocol as P

        from .scene_snapshot import worker_for
        from .worker_client import WorkerError

        s = context.scene.npbgpp
        weights = bpy.path.abspath(s.weights) if s.weights else bundled_weights()
        if not weights or not os.path.isfile(weights):
            where = f"not found: {weights}" if s.weights else f"none set, and the bundled file is missing: {weights}"
            self.report({"ERROR"}, f"Aggregate needs NPBG++ weights: set Weights in Render Properties > NPBG++ "
                                   f"({where})")
            return {"CANCELLED"}
        dataset = bpy.path.abspath(s.dataset_path) if s.dataset_path else ""
        if not dataset or not os.path.isdir(dataset):
            self.report({"ERROR"}, "Aggregate needs a dataset: use File > Import > NPBG++ Dataset Folder first")
            return {"CANCELLED"}
        out = bpy.path.abspath(self.filepath) if self.filepath else os.path.join(dataset, "scene.npbgpp")
        wm = context.window_manager
        try:
            worker = worker_for(context.scene)
            count = worker.request(P.AggregateBegin(
                dataset, weights, s.dataset_format or None, s.device, self.max_points, s.up_axis,
            ), None, s.worker_timeout).views
            wm.progress_begin(0, max(1, count))
            try:
                for k in range(count):
                    worker.request(P.AggregateView(k), None, s.worker_timeout)
                    wm.progress_update(k + 1)
                reply = worker.request(P.AggregateFinish(out), None, s.worker_timeout)
            finally:
                wm.progress_end()
        except (WorkerError, ValueError, OSError) as exc:
            self.report({"ERROR"}, f"Aggregate failed: {exc}")
            return {"CANCELLED"}
        s.bundle = out
        up = ", ".join(f"{v:g}" for v in reply.world_up)
        self.report({"INFO"}, f"saved {reply.points} points ({reply.valid} seen) to {out}; up axis ({up})")
        return {"FINISHED"}


class NPBGPP_OT_export_dataset(bpy.types.Operator):
    """Render views of this scene into a NeRF-Synthetic style dataset folder (images, cameras, points)"""

    bl_idname = "npbgpp.export_dataset"
    bl_label = "Export Dataset"
    directory: StringProperty(subtype="DIR_PATH")  # type: ignore[valid-type]
    views: IntProperty(name="Views", default=50, min=1)  # type: ignore[valid-type]
    width: IntProperty(name="Width", default=256, min=8)  # type: ignore[valid-type]
    height: IntProperty(name="Height", default=256, min=8)  # type: ignore[valid-type]
    samples: IntProperty(name="Samples", default=16, min=1)  # type: ignore[valid-type]
    points: IntProperty(name="Points", default=100_000, min=1)  # type: ignore[valid-type]
    overwrite: BoolProperty(name="Overwrite", default=False)  # type: ignore[valid-type]

    def invoke(self, context: Any, event: Any) -> set[str]:
        context.window_manager.fileselect_add(self)
        return {"RUNNING_MODAL"}

    def execute(self, context: Any) -> set[str]:
        if not self.directory:
            self.report({"ERROR"}, "choose an output folder")
            return {"CANCELLED"}
        try:
            from .datagen.render import render_views_of_current_scene
        except ImportError as exc:
            self.report({"ERROR"}, f"the dataset renderer is unavailable: {exc}")
            return {"CANCELLED"}
        try:
            summary = render_views_of_current_scene(
                context.scene, bpy.path.abspath(self.directory), views=self.views, size=(self.height, self.width),
                samples=self.samples, points=self.points, overwrite=self.overwrite,
            )
        except Exception as exc:  # noqa: BLE001 - the renderer is other code: report anything it raises
            self.report({"ERROR"}, f"Export dataset failed: {type(exc).__name__}: {exc}")
            return {"CANCELLED"}
        self.report({"INFO"}, f"exported {summary}")
        return {"FINISHED"}


class NPBGPP_OT_stop_worker(bpy.types.Operator):
    """Stop the NPBG++ worker process (it restarts on the next render)"""

    bl_idname = "npbgpp.stop_worker"
    bl_label = "Stop Worker"

    def execute(self, context: Any) -> set[str]:
        from .worker_client import HUB

        HUB.shutdown()
        return {"FINISHED"}


CLASSES = (NPBGPP_OT_aggregate, NPBGPP_OT_export_dataset, NPBGPP_OT_stop_worker)


register, unregister = bpy.utils.register_classes_factory(CLASSES)
